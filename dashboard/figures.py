"""Figure builders: plain functions from numpy arrays to plotly figures.

No Dash and no file access here, so every view is testable without a browser.
Figures are plain dicts (``{"data": [...], "layout": {...}}``), as Dash sends
them: a ``go.Figure`` validated and then copied every property of every figure
of a slider move on the server, most of the step callback's time. The tests
validate each builder's output by building a ``go.Figure`` from it.
Arrays go into the figures as numpy (``to_dict`` sends them base64-encoded).
NaN and Inf are never dropped silently: heatmaps draw them in a distinct colour
(NONFINITE_COLOUR) on an overlay and count them in the title; padded timesteps
are masked (left blank) and said so.
"""

from __future__ import annotations

import base64
import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.io as pio

NONFINITE_COLOUR = "#ff00ff"
MAX_CELLS = 250_000  # a heatmap with more cells than this is reduced on the server
Figure = dict[str, Any]  # {"data": [trace, ...], "layout": {...}}: plotly's figure as JSON
_TANH_GATES = frozenset({"cell", "new"})
SEVERITY_COLOUR = {"error": "#d62728", "warning": "#ff7f0e", "info": "#1f77b4"}


def _base_layout(title: str, height: int = 320) -> dict[str, Any]:
    return {"title": {"text": title, "font": {"size": 14}}, "height": height,
            "margin": {"l": 60, "r": 20, "t": 40, "b": 40}}


def colour_scale(name: str) -> list[list[Any]]:
    """A named colour scale as the [position, colour] pairs plotly.js draws. A figure sent as a
    dict goes to plotly.js without plotly.py's validation, which is what used to expand names;
    plotly.js knows few of plotly.py's names ("RdBu_r" is not one: it drew another scale)."""
    return [list(pair) for pair in _scale_pairs(name)]


@functools.cache
def _scale_pairs(name: str) -> tuple[tuple[float, str], ...]:
    import plotly.colors

    return tuple((float(pos), colour) for pos, colour in plotly.colors.get_colorscale(name))


@functools.lru_cache(maxsize=1)
def _template() -> dict[str, Any]:
    return pio.templates["plotly_white"].to_plotly_json()  # type: ignore[no-any-return]


def to_dict(fig: Figure) -> Figure:
    """The figure as Dash sends it: in the dashboard's template (converted from
    plotly's once, and shared), its traces' numpy arrays as plotly.js typed arrays
    (base64; Dash's encoder would write each number out in decimal, twice the
    bytes). The builder's own dict is left as it is."""
    return {**fig, "data": [_typed(trace) for trace in fig.get("data", [])],
            "layout": {**fig.get("layout", {}), "template": _template()}}


# numpy dtypes that plotly.js's typed-array spec ({"dtype", "bdata", "shape"}) takes, by its names
_TYPED = {"float32": "f4", "float64": "f8", "int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2",
          "int32": "i4", "uint32": "u4"}


def _typed(value: Any) -> Any:
    """``value`` with every numpy array in it (dicts and lists walked) as a typed
    array spec: float16 as float32, bool as uint8, 64-bit integers as 32-bit
    ones where they fit and as float64 where they do not."""
    if isinstance(value, dict):
        return {key: _typed(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_typed(v) for v in value]
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        return value
    a = value
    if a.dtype == np.float16:
        a = a.astype(np.float32)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8)
    elif a.dtype.kind in "iu" and a.dtype.name not in _TYPED:  # 64-bit
        fits = a.size == 0 or (a.min() >= np.iinfo(np.int32).min and a.max() <= np.iinfo(np.int32).max)
        a = a.astype(np.int32 if fits else np.float64)
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))  # plotly.js reads little-endian
    spec = {"dtype": _TYPED[a.dtype.name], "bdata": base64.b64encode(a.data).decode("ascii")}
    if a.ndim > 1:
        spec["shape"] = ", ".join(str(n) for n in a.shape)
    return spec


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
) -> Figure:
    """A heatmap of ``z`` [y, x]; ``mask`` marks padding (drawn blank, not counted).
    NaN and Inf are drawn in NONFINITE_COLOUR and counted in the title."""
    traces, notes = _heatmap_traces(z, x=x, y=y, x_title=x_title, y_title=y_title, mask=mask, log=log,
                                    colorscale=colorscale, zmid=zmid, colorbar_title=colorbar_title)
    full = title + ("  —  " + ", ".join(notes) if notes else "")
    return {"data": traces, "layout": {**_base_layout(full, height), "xaxis": {"title": {"text": x_title}},
                                       "yaxis": {"title": {"text": y_title}}}}


def _heatmap_traces(
    z: np.ndarray,
    *,
    x: Sequence[Any] | np.ndarray | None = None,
    y: Sequence[Any] | np.ndarray | None = None,
    x_title: str = "",
    y_title: str = "",
    mask: np.ndarray | None = None,
    log: bool = False,
    colorscale: str = "RdBu_r",
    zmid: float | None = None,
    colorbar_title: str = "",
    axes: tuple[str, str] = ("x", "y"),
    coloraxis: str | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The traces of one heatmap (the values, and an overlay for NaN/Inf) and
    the notes its title needs."""
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
    colour: dict[str, Any] = {"coloraxis": coloraxis} if coloraxis else {
        "colorscale": colour_scale(colorscale), "colorbar": {"title": {"text": colorbar_title}}}
    if zmid is not None and not coloraxis:
        colour["zmid"] = zmid
    coords = {key: v for key, v in (("x", xs), ("y", ys)) if v is not None}
    traces = [{
        "type": "heatmap", "z": values.astype(np.float32), **coords, "hoverongaps": False, "xaxis": axes[0],
        "yaxis": axes[1], **colour,
        "hovertemplate": f"{x_title} %{{x}}<br>{y_title} %{{y}}<br>"
        + ("log10 value %{z:.3g}" if log else "value %{z:.4g}") + "<extra></extra>",
    }]
    if n_nan or n_inf:
        traces.append({
            "type": "heatmap", "z": nonfinite.astype(np.float32), **coords, "showscale": False, "hoverongaps": False,
            "colorscale": [[0, NONFINITE_COLOUR], [1, NONFINITE_COLOUR]], "name": "NaN/Inf", "xaxis": axes[0],
            "yaxis": axes[1], "hovertemplate": "NaN or Inf<extra></extra>",
        })
    notes = []
    if n_nan or n_inf:
        notes.append(f"<span style='color:{NONFINITE_COLOUR}'>NaN {n_nan}, Inf {n_inf}</span>")
    if mask.any():
        notes.append("padding masked")
    if fr > 1 or fc > 1:
        notes.append(f"shown at 1/{fr}x1/{fc} resolution")
    return traces, notes


def gates_figure(gates: dict[str, np.ma.MaskedArray], sequence: int, row_height: int = 280) -> Figure:
    """All gates of one sequence in one figure, two per row, each [unit, time].
    One figure (not one per gate) so that the browser updates it in place when
    the step changes."""
    names = list(gates)
    if not names:
        return empty_figure("No gates recorded for this layer: a plain RNN has none; a cell of your own "
                            "has them when watch(cells={cell: gates_function}) gives a function.")
    cols = 2 if len(names) > 1 else 1
    rows = math.ceil(len(names) / cols)
    gap_x, gap_y = 0.08, 0.24 / rows
    width, height = (1 - gap_x * (cols - 1)) / cols, (1 - gap_y * (rows - 1)) / rows
    # fixed colour ranges, shared: gates within [0, 1] (sigmoid) on [0, 1], tanh gates on [-1, 1], so
    # that colours mean the same at every step of a replay (and two colour bars are
    # drawn, not one per gate); a user-written gate outside both gets its own
    axis_of: dict[str, str] = {}
    axes: dict[str, dict[str, Any]] = {}
    own = 0  # gates with a colour axis of their own
    for name in names:
        values = np.ma.compressed(gates[name][sequence])
        finite = values[np.isfinite(values)] if values.size else values
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if lo >= 0 and hi <= 1 and name not in _TANH_GATES:
            axis_of[name] = "coloraxis"
            axes["coloraxis"] = {"colorscale": colour_scale("Viridis"), "cmin": 0, "cmax": 1}
        elif lo >= -1 and hi <= 1:
            axis_of[name] = "coloraxis2"
            axes["coloraxis2"] = {"colorscale": colour_scale("RdBu_r"), "cmin": -1, "cmax": 1}
        else:
            own += 1
            axis_of[name] = f"coloraxis{2 + own}"
            axes[axis_of[name]] = {"colorscale": colour_scale("Viridis")}
    for i, key in enumerate(axes):
        span = 1 / len(axes)
        axes[key]["colorbar"] = {"x": 1.01, "xanchor": "left", "y": 1 - (i + 0.5) * span, "len": span * 0.9,
                                 "thickness": 12, "title": {"text": ", ".join(n for n in names if axis_of[n] == key)}}
    traces: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    layout: dict[str, Any] = {"title": {"text": "", "font": {"size": 14}}, "height": row_height * rows,
                              "margin": {"l": 60, "r": 90, "t": 30, "b": 40}}
    for i, name in enumerate(names):
        r, c = divmod(i, cols)
        x0, y1 = c * (width + gap_x), 1 - r * (height + gap_y)
        x_dom = [max(x0, 0.0), min(x0 + width, 1.0)]
        y_dom = [max(y1 - height, 0.0), min(y1, 1.0)]
        suffix = "" if i == 0 else str(i + 1)
        g = gates[name][sequence]  # [time, unit]
        z = np.ma.filled(g.astype(np.float64), np.nan).T
        parts, notes = _heatmap_traces(z, mask=np.ma.getmaskarray(g).T, x_title="timestep", y_title="unit",
                                       axes=("x" + suffix, "y" + suffix), coloraxis=axis_of[name])
        traces += parts
        layout["xaxis" + suffix] = {"domain": x_dom, "anchor": "y" + suffix,
                                    "title": {"text": "timestep" if r == rows - 1 else ""}}
        layout["yaxis" + suffix] = {"domain": y_dom, "anchor": "x" + suffix, "title": {"text": "unit"}}
        annotations.append({
            "text": f"{name} gate, sequence {sequence}" + ("  —  " + ", ".join(notes) if notes else ""),
            "x": sum(x_dom) / 2, "y": y_dom[1], "xref": "paper", "yref": "paper", "xanchor": "center",
            "yanchor": "bottom", "showarrow": False, "font": {"size": 13}})
    layout["annotations"] = annotations
    layout.update(axes)
    return {"data": traces, "layout": layout}


# the overview's two lines and their axes: loss (left), global gradient norm (right)
OVERVIEW_COLOURS = {"y": "#636efa", "y2": "#00a67e"}
# the current-step marker's colour on each figure that has one (by the dashboard's graph id)
MARKER_COLOURS = {"overview": "#444", "gradflow": "white"}


def overview_figure(
    loss: tuple[np.ndarray, np.ndarray] | None,
    grad_norm: tuple[np.ndarray, np.ndarray] | None,
    findings: Sequence[dict[str, Any]] = (),
    current_step: int | None = None,
) -> Figure:
    """Loss and global gradient norm over training steps (log y), findings marked."""
    traces: list[dict[str, Any]] = []
    for name, series, axis in (("loss", loss, "y"), ("global gradient norm", grad_norm, "y2")):
        if series is None or not len(series[0]):
            continue
        steps, values = np.asarray(series[0]), np.asarray(series[1], dtype=np.float64)
        finite = np.isfinite(values)
        traces.append({"type": "scatter", "x": steps[finite], "y": values[finite], "name": name, "mode": "lines",
                       "yaxis": axis, "line": {"color": OVERVIEW_COLOURS[axis]}})
        if (~finite).any():
            traces.append({
                "type": "scatter", "x": steps[~finite],
                "y": np.full(int((~finite).sum()), np.nanmax(values[finite]) if finite.any() else 1.0),
                "mode": "markers", "marker": {"color": NONFINITE_COLOUR, "symbol": "x", "size": 9},
                "name": f"{name}: NaN/Inf ({int((~finite).sum())})", "yaxis": axis,
            })
    # shape 0: the current-step marker, when one is asked for (the dashboard draws its own
    # over the figure instead: moving a shape costs a full redraw of the figure)
    shapes = [] if current_step is None else [_vline(current_step, MARKER_COLOURS["overview"])]
    for f in findings:
        shapes.append({"type": "rect", "xref": "x", "x0": f["first_step"],
                       "x1": max(f["last_step"], f["first_step"]) + 1e-9, "yref": "y domain", "y0": 0, "y1": 1,
                       "fillcolor": SEVERITY_COLOUR.get(f["severity"], "#888"), "opacity": 0.10,
                       "line": {"width": 0}})
    # each axis in its line's colour, labelled in powers of ten (plotly's default mixes SI
    # prefixes, "1T", with powers beyond them); the gradient norm's own ticks ("tickmode": "auto"):
    # an overlaying axis otherwise took the loss axis's tick positions, labelled
    # 3.29246, 32.86504, ... (and clipped to one digit in a narrow window)
    layout = {**_base_layout("Overview: loss and global gradient norm", 340),
              "yaxis": {"title": {"text": "loss", "font": {"color": OVERVIEW_COLOURS["y"]}}, "type": "log",
                        "exponentformat": "power", "tickfont": {"color": OVERVIEW_COLOURS["y"]}},
              "yaxis2": {"title": {"text": "grad norm", "font": {"color": OVERVIEW_COLOURS["y2"]}},
                         "type": "log", "overlaying": "y", "side": "right", "tickmode": "auto",
                         "showgrid": False, "exponentformat": "power", "tickfont": {"color": OVERVIEW_COLOURS["y2"]}},
              "legend": {"orientation": "h", "y": -0.25}, "xaxis": {"title": {"text": "training step"}},
              "shapes": shapes}
    return {"data": traces, "layout": layout}


def _vline(x: float, colour: str) -> dict[str, Any]:
    """A dotted vertical line at ``x`` over the plot's height (as ``go.Figure.add_vline``)."""
    return {"type": "line", "xref": "x", "x0": x, "x1": x, "yref": "y domain", "y0": 0, "y1": 1,
            "line": {"dash": "dot", "color": colour}}


def gradient_flow_figure(steps: np.ndarray, norms: np.ndarray, mask: np.ndarray, layer: str,
                         current_step: int | None = None) -> Figure:
    """Training step x timestep heatmap of ||dL/dh_t|| (log colour)."""
    fig = heatmap(norms.T, x=steps, y=np.arange(norms.shape[1]), mask=mask.T, log=True, colorscale="Viridis",
                  title=f"Gradient flow in {layer}: ||dL/dh_t|| (median over stored sequences)",
                  x_title="training step", y_title="timestep", colorbar_title="log10", height=360)
    # shape 0: the current-step marker, when one is asked for (as in overview_figure)
    if current_step is not None:
        fig["layout"]["shapes"] = [_vline(current_step, MARKER_COLOURS["gradflow"])]
    return fig


def propagation_figure(profile: np.ma.MaskedArray, selected: int | None, layer: str, step: int) -> Figure:
    """The propagation profile of one step: one line per stored sequence, log y."""
    data = np.ma.filled(profile.astype(np.float64), np.nan)
    traces: list[dict[str, Any]] = []
    for k in range(data.shape[0]):
        y = data[k]
        highlight = selected is None or k == selected
        traces.append({"type": "scatter", "x": np.arange(len(y)), "y": np.where(y > 0, y, np.nan), "mode": "lines",
                       "name": f"sequence {k}", "line": {"width": 2.5 if highlight else 1},
                       "opacity": 1.0 if highlight else 0.35})
    bad = ~np.isfinite(data) & ~np.ma.getmaskarray(profile)
    if bad.any():
        t = np.nonzero(bad)[1]
        traces.append({"type": "scatter", "x": t, "y": np.ones(len(t)), "mode": "markers",
                       "name": f"NaN/Inf ({int(bad.sum())})",
                       "marker": {"color": NONFINITE_COLOUR, "symbol": "x", "size": 9}})
    resolution = 2.0**-23
    layout = {
        **_base_layout(f"Propagation profile, {layer}, step {step} (1 at the last timestep)"),
        "showlegend": False,
        "yaxis": {"type": "log", "title": {"text": "||(dh_T/dh_t)^T v||"}, "exponentformat": "power"},
        "xaxis": {"title": {"text": "timestep"}},
        # the float32 resolution line
        "shapes": [{"type": "line", "xref": "x domain", "x0": 0, "x1": 1, "yref": "y", "y0": resolution,
                    "y1": resolution, "line": {"dash": "dot", "color": "#999"}}],
        "annotations": [{"text": "float32 resolution", "xref": "x domain", "x": 1, "xanchor": "right",
                         "yref": "y", "y": math.log10(resolution), "yanchor": "bottom", "showarrow": False,
                         "font": {"size": 10}}],
    }
    return {"data": traces, "layout": layout}


def saturation_figure(gates: dict[str, np.ma.MaskedArray], margin: float = 0.02) -> Figure:
    """Fraction of saturated gate values over time, one line per gate."""
    traces: list[dict[str, Any]] = []
    for name, g in gates.items():
        data = np.ma.filled(g.astype(np.float64), np.nan)  # [sequence, time, unit]
        valid = ~np.ma.getmaskarray(g)
        if name in ("cell", "new"):
            sat = np.abs(data) > 1 - margin
        else:
            sat = (data < margin) | (data > 1 - margin)
        frac = np.where(valid.any(axis=(0, 2)),
                        (sat & valid).sum(axis=(0, 2)) / np.maximum(valid.sum(axis=(0, 2)), 1), np.nan)
        traces.append({"type": "scatter", "x": np.arange(len(frac)), "y": frac, "mode": "lines", "name": name})
    return {"data": traces, "layout": {**_base_layout(f"Gate saturation (within {margin} of the bounds)"),
                                       "yaxis": {"range": [0, 1], "title": {"text": "saturated fraction"}},
                                       "xaxis": {"title": {"text": "timestep"}}}}


def empty_figure(message: str) -> Figure:
    return {"data": [], "layout": {**_base_layout("", 200), "xaxis": {"visible": False}, "yaxis": {"visible": False},
                                   "annotations": [{"text": message, "showarrow": False, "x": 0.5, "y": 0.5,
                                                    "xref": "paper", "yref": "paper"}]}}
