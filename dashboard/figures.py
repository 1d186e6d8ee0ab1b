"""Figure builders: plain functions from numpy arrays to plotly figures.

No Dash and no file access here, so every view is testable without a browser.
Arrays go into the figures as numpy (plotly sends them base64-encoded).
NaN and Inf are never dropped silently: heatmaps draw them in a distinct colour
(NONFINITE_COLOUR) on an overlay and count them in the title; padded timesteps
are masked (left blank) and said so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

NONFINITE_COLOUR = "#ff00ff"
MAX_CELLS = 250_000  # a heatmap with more cells than this is reduced on the server
SEVERITY_COLOUR = {"error": "#d62728", "warning": "#ff7f0e", "info": "#1f77b4"}


def _layout(fig: go.Figure, title: str, height: int = 320) -> go.Figure:
    fig.update_layout(title={"text": title, "font": {"size": 14}}, height=height,
                      margin={"l": 60, "r": 20, "t": 40, "b": 40}, template="plotly_white")
    return fig


def count_nonfinite(values: np.ndarray, mask: np.ndarray | None = None) -> tuple[int, int]:
    """(NaN count, Inf count) over unmasked entries."""
    data = np.asarray(values, dtype=np.float64)
    valid = np.ones(data.shape, bool) if mask is None else ~mask
    return int(np.isnan(data[valid]).sum()), int(np.isinf(data[valid]).sum())


def reduce_grid(z: np.ndarray, max_cells: int = MAX_CELLS) -> tuple[np.ndarray, int, int]:
    """Block-reduce a 2-D array to at most ``max_cells`` cells: finite cells by
    their mean, a block holding any NaN/Inf keeps that (so it stays visible).
    Returns (reduced, row factor, column factor)."""
    rows, cols = z.shape
    fr = fc = 1
    while (math.ceil(rows / fr) * math.ceil(cols / fc)) > max_cells:
        if math.ceil(rows / fr) >= math.ceil(cols / fc):
            fr *= 2
        else:
            fc *= 2
    if fr == fc == 1:
        return z, 1, 1
    pr, pc = (-rows) % fr, (-cols) % fc
    padded = np.pad(z.astype(np.float64), ((0, pr), (0, pc)), constant_values=np.nan)
    grid = padded.reshape(padded.shape[0] // fr, fr, padded.shape[1] // fc, fc).swapaxes(1, 2)
    blocks = grid.reshape(grid.shape[0], grid.shape[1], -1)
    with np.errstate(all="ignore"):
        finite = np.where(np.isfinite(blocks), blocks, np.nan)
        out = np.nanmean(finite, axis=-1) if blocks.size else np.zeros(blocks.shape[:2])
    has_inf = np.isinf(blocks).any(axis=-1)
    # NaN from padding alone is not data; a real NaN in a block is
    out = np.where(has_inf, np.inf, out)
    return out, fr, fc


def _log10(z: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isfinite(z) & (z > 0), np.log10(np.where(z > 0, z, 1.0)), np.where(z == 0, -45.0, np.nan))


def heatmap(
    z: np.ndarray,
    *,
    title: str,
    x: Sequence[Any] | np.ndarray | None = None,
    y: Sequence[Any] | np.ndarray | None = None,
    x_title: str = "",
    y_title: str = "",
    mask: np.ndarray | None = None,
    log: bool = False,
    colorscale: str = "RdBu_r",
    zmid: float | None = None,
    colorbar_title: str = "",
    height: int = 320,
) -> go.Figure:
    """A heatmap of ``z`` [y, x]; ``mask`` marks padding (drawn blank, not counted).
    NaN and Inf are drawn in NONFINITE_COLOUR and counted in the title."""
    z = np.asarray(z, dtype=np.float64)
    mask = np.zeros(z.shape, bool) if mask is None else np.asarray(mask, bool)
    n_nan, n_inf = count_nonfinite(z, mask)
    shown = np.where(mask, np.nan, z)
    nonfinite = np.where(~mask & ~np.isfinite(z), 1.0, np.nan)
    shown, fr, fc = reduce_grid(shown)
    nonfinite, _, _ = reduce_grid(nonfinite)
    nonfinite = np.where(np.isfinite(nonfinite), 1.0, np.nan)
    values = _log10(shown) if log else np.where(np.isfinite(shown), shown, np.nan)
    xs = None if x is None else np.asarray(x)[::fc]
    ys = None if y is None else np.asarray(y)[::fr]
    fig = go.Figure()
    fig.add_trace(go.Heatmap(
        z=values.astype(np.float32), x=xs, y=ys, colorscale=colorscale, zmid=zmid,
        colorbar={"title": {"text": colorbar_title}}, hoverongaps=False,
        hovertemplate=f"{x_title} %{{x}}<br>{y_title} %{{y}}<br>"
        + ("log10 value %{z:.3g}" if log else "value %{z:.4g}") + "<extra></extra>",
    ))
    if n_nan or n_inf:
        fig.add_trace(go.Heatmap(
            z=nonfinite.astype(np.float32), x=xs, y=ys, showscale=False, hoverongaps=False,
            colorscale=[[0, NONFINITE_COLOUR], [1, NONFINITE_COLOUR]], name="NaN/Inf",
            hovertemplate="NaN or Inf<extra></extra>",
        ))
    notes = []
    if n_nan or n_inf:
        notes.append(f"<span style='color:{NONFINITE_COLOUR}'>NaN {n_nan}, Inf {n_inf}</span>")
    if mask.any():
        notes.append("padding masked")
    if fr > 1 or fc > 1:
        notes.append(f"shown at 1/{fr}x1/{fc} resolution")
    full = title + ("  —  " + ", ".join(notes) if notes else "")
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text=y_title)
    return _layout(fig, full, height)


def overview_figure(
    loss: tuple[np.ndarray, np.ndarray] | None,
    grad_norm: tuple[np.ndarray, np.ndarray] | None,
    findings: Sequence[dict[str, Any]] = (),
    current_step: int | None = None,
) -> go.Figure:
    """Loss and global gradient norm over training steps (log y), findings marked."""
    fig = go.Figure()
    for name, series, axis in (("loss", loss, "y"), ("global gradient norm", grad_norm, "y2")):
        if series is None or not len(series[0]):
            continue
        steps, values = np.asarray(series[0]), np.asarray(series[1], dtype=np.float64)
        finite = np.isfinite(values)
        fig.add_trace(go.Scatter(x=steps[finite], y=values[finite], name=name, mode="lines", yaxis=axis))
        if (~finite).any():
            fig.add_trace(go.Scatter(
                x=steps[~finite], y=np.full(int((~finite).sum()), np.nanmax(values[finite]) if finite.any() else 1.0),
                mode="markers", marker={"color": NONFINITE_COLOUR, "symbol": "x", "size": 9},
                name=f"{name}: NaN/Inf ({int((~finite).sum())})", yaxis=axis,
            ))
    # shape 0 is the current-step marker (the slider callback patches it)
    fig.add_vline(x=current_step if current_step is not None else 0, line_dash="dot", line_color="#444")
    for f in findings:
        colour = SEVERITY_COLOUR.get(f["severity"], "#888")
        fig.add_vrect(x0=f["first_step"], x1=max(f["last_step"], f["first_step"]) + 1e-9, fillcolor=colour,
                      opacity=0.10, line_width=0)
    fig.update_layout(yaxis={"title": "loss", "type": "log"},
                      yaxis2={"title": "grad norm", "type": "log", "overlaying": "y", "side": "right"},
                      legend={"orientation": "h", "y": -0.25}, xaxis={"title": "training step"})
    return _layout(fig, "Overview: loss and global gradient norm", 340)


def gradient_flow_figure(steps: np.ndarray, norms: np.ndarray, mask: np.ndarray, layer: str,
                         current_step: int | None = None) -> go.Figure:
    """Training step x timestep heatmap of ||dL/dh_t|| (log colour)."""
    fig = heatmap(norms.T, x=steps, y=np.arange(norms.shape[1]), mask=mask.T, log=True, colorscale="Viridis",
                  title=f"Gradient flow in {layer}: ||dL/dh_t|| (median over stored sequences)",
                  x_title="training step", y_title="timestep", colorbar_title="log10", height=360)
    # shape 0: the current-step marker (the slider callback patches it)
    marker = current_step if current_step is not None else (int(steps[0]) if len(steps) else 0)
    fig.add_vline(x=marker, line_dash="dot", line_color="white")
    return fig


def propagation_figure(profile: np.ma.MaskedArray, selected: int | None, layer: str, step: int) -> go.Figure:
    """The propagation profile of one step: one line per stored sequence, log y."""
    fig = go.Figure()
    data = np.ma.filled(profile.astype(np.float64), np.nan)
    for k in range(data.shape[0]):
        y = data[k]
        highlight = selected is None or k == selected
        fig.add_trace(go.Scatter(
            x=np.arange(len(y)), y=np.where(y > 0, y, np.nan), mode="lines", name=f"sequence {k}",
            line={"width": 2.5 if highlight else 1}, opacity=1.0 if highlight else 0.35,
        ))
    bad = ~np.isfinite(data) & ~np.ma.getmaskarray(profile)
    if bad.any():
        t = np.nonzero(bad)[1]
        fig.add_trace(go.Scatter(x=t, y=np.ones(len(t)), mode="markers", name=f"NaN/Inf ({int(bad.sum())})",
                                 marker={"color": NONFINITE_COLOUR, "symbol": "x", "size": 9}))
    fig.add_hline(y=2.0**-23, line_dash="dot", line_color="#999", annotation_text="float32 resolution",
                  annotation_font_size=10)
    fig.update_yaxes(type="log", title_text="||(dh_T/dh_t)^T v||", exponentformat="power")
    fig.update_xaxes(title_text="timestep")
    fig.update_layout(showlegend=False)
    return _layout(fig, f"Propagation profile, {layer}, step {step} (1 at the last timestep)")


def saturation_figure(gates: dict[str, np.ma.MaskedArray], margin: float = 0.02) -> go.Figure:
    """Fraction of saturated gate values over time, one line per gate."""
    fig = go.Figure()
    for name, g in gates.items():
        data = np.ma.filled(g.astype(np.float64), np.nan)  # [sequence, time, unit]
        valid = ~np.ma.getmaskarray(g)
        if name in ("cell", "new"):
            sat = np.abs(data) > 1 - margin
        else:
            sat = (data < margin) | (data > 1 - margin)
        frac = np.where(valid.any(axis=(0, 2)),
                        (sat & valid).sum(axis=(0, 2)) / np.maximum(valid.sum(axis=(0, 2)), 1), np.nan)
        fig.add_trace(go.Scatter(x=np.arange(len(frac)), y=frac, mode="lines", name=name))
    fig.update_yaxes(range=[0, 1], title_text="saturated fraction")
    fig.update_xaxes(title_text="timestep")
    return _layout(fig, f"Gate saturation (within {margin} of the bounds)")


def empty_figure(message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, "", 200)
