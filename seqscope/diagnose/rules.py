"""Diagnosis rules: from a trace to findings with evidence and a remedy.

Pure numpy over the trace reader; no torch. Every threshold is a named
constant here and documented, with its source, in docs/diagnosis.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from seqscope.trace import schema
from seqscope.trace.reader import LayerInfo, Series, Trace

# float32 resolution: a gradient contribution smaller than 2^-23 of the one it
# is added to is lost in float32 arithmetic (the unit roundoff is 2^-24).
FLOAT32_RESOLUTION = 2.0**-23
# Vanishing: the propagated gradient falls below FLOAT32_RESOLUTION before it has
# walked back this fraction of the sequence.
HORIZON_FRACTION = 0.5
# Exploding: the propagated gradient grows this much going back through time...
GROWTH_WARNING = 1e2
GROWTH_ERROR = 1.0 / FLOAT32_RESOLUTION
# ...or the global gradient norm jumps this far above its running median
# (Pascanu et al. 2013 found clipping thresholds up to 10x the average norm to work).
SPIKE_FACTOR = 10.0
SPIKE_WINDOW = 10  # recorded steps in the running median
# Persistence: a condition is "sustained" when it holds on this many recorded
# steps in a row, or on every recorded step if the trace has fewer.
MIN_RUN = 3
# Plateau: the loss's median over the last third of training is not this much
# lower than over the middle third.
PLATEAU_IMPROVEMENT = 0.05
# Gate saturation: a sigmoid gate within SATURATION_MARGIN of 0 or 1 (tanh: of +-1).
SATURATION_MARGIN = 0.02
SATURATION_WARNING = 0.5  # fraction of gate values saturated
FORGET_CLOSED = 0.1  # forget gate below this counts as "closed"
DEAD_UNIT_WARNING = 0.5  # fraction of relu units that are zero everywhere
SAMPLED_STEPS = 12  # steps read for the bulk (state/gate) rules

# derivative bound gamma of the recurrent nonlinearity: sigma_max(W_hh) < 1/gamma
# is sufficient for vanishing gradients (Pascanu et al. 2013)
GAMMA = {schema.KIND_RNN_TANH: 1.0, schema.KIND_RNN_RELU: 1.0}

SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


@dataclasses.dataclass
class Finding:
    """One diagnosis: what, how bad, where, when, the numbers, what to do."""

    kind: str
    severity: str  # "error" | "warning" | "info"
    layer: str | None
    first_step: int
    last_step: int
    evidence: dict[str, Any]
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "severity": self.severity,
            "layer": self.layer,
            "first_step": self.first_step,
            "last_step": self.last_step,
            "evidence": _jsonable(self.evidence),
            "message": self.message,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):  # numpy scalars (np.bool_ too) as Python ones
        value = value.item()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}"


# ---- per-step measurements ------------------------------------------------------------------


def horizon(profile: np.ndarray, direction: int) -> int:
    """Timesteps back from the direction's last step over which the propagated
    gradient stays at or above FLOAT32_RESOLUTION (NaN counts as below).
    ``profile`` is one sequence's valid part, in input order."""
    lagged = profile[::-1] if direction == 0 else profile
    below = np.nonzero(~(lagged >= FLOAT32_RESOLUTION))[0]
    return int(below[0]) if len(below) else len(lagged)


@dataclasses.dataclass
class StepMeasure:
    step: int
    horizon: float  # median over sequences
    length: float  # median valid length
    growth: float  # largest propagated gradient (profile is 1 at the last step)
    decay_per_step: float  # geometric-mean factor per timestep over the horizon
    finite: bool  # False when the profile holds NaN/Inf (the nonfinite rule reports those)


def measure_layer(trace: Trace, info: LayerInfo, steps: Iterable[int]) -> list[StepMeasure]:
    out = []
    for step in steps:
        if not trace.has(info.name, int(step), schema.FIELD_PROPAGATION):
            continue
        prop = trace.propagation(info.name, int(step))
        lengths = trace.lengths(info.name, int(step))
        horizons, growths, decays = [], [], []
        for k, n in enumerate(lengths):
            if n <= 0:
                continue
            prof = np.asarray(prop.data[k, :n], dtype=np.float64)
            h = horizon(prof, info.direction)
            horizons.append(h)
            finite_values = prof[np.isfinite(prof)]
            growths.append(float(np.max(finite_values)) if len(finite_values) else math.inf)
            if n >= 2:
                lagged = prof[::-1] if info.direction == 0 else prof
                reach = max(1, min(h, int(n)) - 1)
                end = lagged[reach]
                decays.append(float(end) ** (1.0 / reach) if end > 0 and math.isfinite(end) else 0.0)
        if not horizons:
            continue
        valid = ~np.ma.getmaskarray(prop)
        finite = bool(np.isfinite(prop.data[valid]).all())
        out.append(
            StepMeasure(
                step=int(step),
                horizon=float(np.median(horizons)),
                length=float(np.median(lengths[lengths > 0])),
                growth=float(np.max(growths)),
                decay_per_step=float(np.median(decays)) if decays else math.nan,
                finite=finite,
            )
        )
    return out


def _runs(flags: Sequence[bool]) -> list[tuple[int, int]]:
    """[start, end] index pairs (inclusive) of consecutive True values."""
    runs, start = [], None
    for i, f in enumerate(flags):
        if f and start is None:
            start = i
        if not f and start is not None:
            runs.append((start, i - 1))
            start = None
    if start is not None:
        runs.append((start, len(flags) - 1))
    return runs


def _sustained(run: tuple[int, int], total: int) -> bool:
    return run[1] - run[0] + 1 >= min(MIN_RUN, total)


def loss_plateaued(loss: Series | None) -> bool | None:
    """True when the loss stopped improving (last third vs middle third), None without a loss."""
    if loss is None or len(loss.values) < 9:
        return None
    values = loss.values[np.isfinite(loss.values)]
    if len(values) < 9:
        return None
    third = len(values) // 3
    middle = float(np.median(values[third : 2 * third]))
    last = float(np.median(values[2 * third :]))
    # improving means by a fraction of the loss's size, whatever its sign (a Gaussian
    # negative log-likelihood goes below zero)
    return last > middle - PLATEAU_IMPROVEMENT * abs(middle)


def _value_at(series: Series | None, step: int) -> float:
    if series is None:
        return math.nan
    idx = np.nonzero(series.steps == step)[0]
    return float(series.values[idx[-1]]) if len(idx) else math.nan


# ---- rules ------------------------------------------------------------------------------------


def _bad_span(steps: np.ndarray, bad: np.ndarray) -> tuple[int, int, bool, str]:
    """First and last step of the bad values; whether they last to the end (a diverged run)
    rather than come and go (skipped batches, a GradScaler not given to watch); and when, in
    words: from the step where the final bad run begins, with any earlier bad steps."""
    idx = np.nonzero(bad)[0]
    first, last, lasting = int(steps[idx[0]]), int(steps[idx[-1]]), bool(bad[-1])
    if not lasting:
        return first, last, False, (f"at {len(idx)} of {len(bad)} steps, from step {first} to {last} "
                                    "(finite in between or after)")
    good = np.nonzero(~bad)[0]
    start = int(good[-1]) + 1 if len(good) else 0  # where the final run of bad values begins
    earlier = int(bad[:start].sum())
    also = f"; also at {earlier} earlier, the first at step {first}" if earlier else ""
    return first, last, True, f"from step {int(steps[start])} on ({len(bad) - start} steps{also})"


def _nonfinite(trace: Trace, scalars: dict[str, Series]) -> list[Finding]:
    findings = []
    loss = scalars.get(schema.SCALAR_LOSS)
    if loss is not None:
        bad = ~np.isfinite(loss.values)
        if bad.any():
            first, last, lasting, when = _bad_span(loss.steps, bad)
            count = int(bad.sum())
            cause = ("training diverged" if lasting else
                     "those steps' batches or the loss's arithmetic (a log of 0, a division by 0) produce it")
            what = f"the loss is NaN/Inf {when}: {cause}"
            findings.append(
                Finding(
                    "nonfinite", "error" if lasting else "warning", None, first, last,
                    {"quantity": "loss", "count": count, "first_step": first, "lasting": lasting,
                     "last_finite_loss": float(loss.values[~bad][loss.steps[~bad] < first][-1])
                     if (~bad & (loss.steps < first)).any() else math.nan},
                    f"{what}. Look at the first non-finite layer and the exploding-gradient findings; clip gradients "
                    "and lower the learning rate.",
                )
            )
    for info in _layers(trace):
        counts = scalars.get(schema.SCALAR_NONFINITE_PREFIX + info.name)
        if counts is None:
            continue
        bad = counts.values > 0
        if not bad.any():
            continue
        first, last, lasting, when = _bad_span(counts.steps, bad)
        findings.append(
            Finding(
                "nonfinite", "error", info.name, first, last,
                {"quantity": "states, gates or gradient norms", "first_step": first,
                 "nonfinite_values_at_first_step": int(counts.values[bad][0]),
                 "recorded_steps_affected": int(bad.sum()), "lasting": lasting},
                f"NaN/Inf in {info.name} {when}; {int(counts.values[bad][0])} values at step {first}. "
                "Non-finite states usually follow an exploding gradient: clip gradients, lower the learning rate.",
            )
        )
    grad = scalars.get(schema.SCALAR_GRAD_NORM)
    if grad is not None:
        bad = ~np.isfinite(grad.values)
        if bad.any():
            first, last, lasting, when = _bad_span(grad.steps, bad)
            findings.append(
                Finding(
                    "nonfinite", "error", None, first, last,
                    {"quantity": "global gradient norm", "first_step": first,
                     "recorded_steps_affected": int(bad.sum()), "lasting": lasting},
                    f"the gradient is NaN/Inf {when}. Clip gradients and lower the learning rate.",
                )
            )
    # report the earliest first: that is where to look
    findings.sort(key=lambda f: (f.first_step, f.layer is None))
    return findings


def _weight_hh_param(info: LayerInfo, scalars: dict[str, Series]) -> str | None:
    suffix = f"weight_hh_l{info.layer}" + ("_reverse" if info.direction else "")
    for name in (f"{info.module}.{suffix}", suffix):
        if schema.SCALAR_PARAM_GRAD_PREFIX + name in scalars:
            return name
    return None


def _vanishing(trace: Trace, info: LayerInfo, measures: list[StepMeasure], scalars: dict[str, Series],
               plateau: bool | None) -> list[Finding]:
    measures = [m for m in measures if m.finite]
    if not measures:
        return []
    flags = [m.horizon < HORIZON_FRACTION * m.length for m in measures]
    findings = []
    sigma = scalars.get(schema.SCALAR_SIGMA_PREFIX + info.name)
    for run in _runs(flags):
        sel = measures[run[0] : run[1] + 1]
        first, last = sel[0].step, sel[-1].step
        to_end = run[1] == len(measures) - 1
        hz = float(np.median([m.horizon for m in sel]))
        length = float(np.median([m.length for m in sel]))
        decay = float(np.median([m.decay_per_step for m in sel]))
        sig = _value_at(sigma, last)
        evidence: dict[str, Any] = {
            "horizon_timesteps": hz,
            "sequence_length": length,
            "resolution": FLOAT32_RESOLUTION,
            "decay_per_timestep": decay,
            "recorded_steps": len(sel),
            "sigma_max_w_hh": sig,
        }
        gamma = GAMMA.get(info.kind)
        sufficient = gamma is not None and math.isfinite(sig) and sig < 1.0 / gamma
        if gamma is not None:
            evidence["one_over_gamma"] = 1.0 / gamma
        if plateau is not None:
            evidence["loss_plateaued"] = plateau
        if to_end and _sustained(run, len(measures)):
            severity = "warning" if plateau is False else "error"
        elif to_end:
            severity = "warning"
        else:
            severity = "info"
        what = (
            f"vanishing gradient in {info.name}: a gradient at the last timestep falls below float32 "
            f"resolution ({FLOAT32_RESOLUTION:.1e}) after {hz:.0f} of {length:.0f} timesteps "
            f"(x{_fmt(decay)} per step), so nothing the loss says about the last step reaches the first "
            f"{length - hz:.0f} timesteps"
        )
        if sufficient and gamma is not None:
            what += f"; sigma_max(W_hh) = {_fmt(sig)} < 1/gamma = {1 / gamma:g} guarantees it (Pascanu et al. 2013)"
        if severity == "info":
            what += f"; it recovered after step {last}"
        elif plateau:
            what += "; the loss has stopped improving"
        if info.kind in (schema.KIND_RNN_TANH, schema.KIND_RNN_RELU):
            remedy = "switch this vanilla RNN to an LSTM or GRU"
        elif info.kind == schema.KIND_LSTM:
            remedy = "initialise the forget-gate bias to 1 or more (bias_ih/bias_hh rows H:2H)"
        elif info.kind == schema.KIND_GRU:
            remedy = "initialise the update-gate bias positive so units keep their state (bias rows H:2H)"
        else:
            remedy = "give the cell a gated path that can carry its state unchanged (as LSTM/GRU do)"
        remedy += f", or shorten the sequences / truncation length to about {max(1, int(hz))} timesteps"
        findings.append(Finding("vanishing_gradient", severity, info.name, first, last, evidence,
                                f"{what}. Remedy: {remedy}."))
    return findings


def _clip_suggestion(grad: Series | None, before_step: int) -> float | None:
    if grad is None:
        return None
    ok = np.isfinite(grad.values) & (grad.steps < before_step)
    if not ok.any():
        return None
    value = float(np.median(grad.values[ok]))
    if value <= 0:
        return None
    digits = -int(math.floor(math.log10(value))) + 1
    return round(value, digits)


def _exploding(trace: Trace, layers: list[LayerInfo], measures: dict[str, list[StepMeasure]],
               scalars: dict[str, Series]) -> list[Finding]:
    findings = []
    grad = scalars.get(schema.SCALAR_GRAD_NORM)
    # (a) global gradient norm spikes against its running median
    spike_steps: list[int] = []
    if grad is not None and len(grad.values) > 3:
        finite_before = np.concatenate([[0], np.cumsum(np.isfinite(grad.values))])
        for i in range(3, len(grad.values)):
            v = float(grad.values[i])
            if not math.isfinite(v):
                # a spike while there is a finite history to judge it by (however far back: a
                # norm that stays NaN for good is one spike to the end, not one that stops
                # once its window holds no finite value)
                if finite_before[i] >= 3:
                    spike_steps.append(i)
                continue
            prior = grad.values[max(0, i - SPIKE_WINDOW) : i]
            prior = prior[np.isfinite(prior)]
            if len(prior) < 3:
                continue
            med = float(np.median(prior))
            if med > 0 and v > SPIKE_FACTOR * med:
                spike_steps.append(i)
    # (b) propagated gradient growing back through time, per layer
    for info in layers:
        ms = [m for m in measures.get(info.name, []) if m.finite]
        flags = [m.growth >= GROWTH_WARNING for m in ms]
        for run in _runs(flags):
            sel = ms[run[0] : run[1] + 1]
            growth = max(m.growth for m in sel)
            first, last = sel[0].step, sel[-1].step
            severe = growth >= GROWTH_ERROR or not math.isfinite(growth)
            sustained = _sustained(run, len(ms))
            severity = "error" if severe or sustained else "warning"
            clip = _clip_suggestion(grad, first)
            sigma = _value_at(scalars.get(schema.SCALAR_SIGMA_PREFIX + info.name), first)
            evidence = {"max_growth": growth, "recorded_steps": len(sel), "sigma_max_w_hh": sigma,
                        "global_grad_norm_at_start": _value_at(grad, first), "suggested_clip": clip}
            gamma = GAMMA.get(info.kind)
            if gamma is not None:
                evidence["one_over_gamma"] = 1.0 / gamma
            msg = (f"exploding gradient in {info.name} from step {first}: a gradient at the last timestep grows "
                   f"x{_fmt(growth)} walking back through time")
            if gamma is not None and math.isfinite(sigma) and sigma > 1.0 / gamma:
                msg += f" (sigma_max(W_hh) = {_fmt(sigma)} > 1/gamma = {1 / gamma:g}, necessary for exploding)"
            remedy = (f"clip gradients at about {clip:g} (the median global norm before step {first}; "
                      "torch.nn.utils.clip_grad_norm_)") if clip else "clip gradients (torch.nn.utils.clip_grad_norm_)"
            findings.append(Finding("exploding_gradient", severity, info.name, first, last, evidence,
                                    f"{msg}. Remedy: {remedy}, and lower the learning rate."))
    if grad is not None and spike_steps:
        groups = _runs([i in set(spike_steps) for i in range(len(grad.values))])
        for run in groups:
            i0, i1 = run
            first, last = int(grad.steps[i0]), int(grad.steps[i1])
            prior = grad.values[max(0, i0 - SPIKE_WINDOW) : i0]
            med = float(np.median(prior[np.isfinite(prior)]))
            window = grad.values[i0 : i1 + 1]
            start_value = float(window[0])
            peak = float(np.max(window[np.isfinite(window)])) if np.isfinite(window).any() else math.inf
            if not np.isfinite(window).all():
                peak = math.inf
            after = grad.values[i1 + 1 :]
            recovered = len(after) > 0 and bool(np.isfinite(after).all()) and bool(np.all(after < SPIKE_FACTOR * med))
            severity = "warning" if recovered else "error"
            layer = _blame_layer(layers, scalars, int(grad.steps[i0]))
            clip = _clip_suggestion(grad, first)
            ratio = start_value / med if med else math.inf
            evidence = {"global_grad_norm_at_start": start_value, "peak": peak, "running_median_before": med,
                        "ratio_at_start": ratio, "recovered": recovered, "suggested_clip": clip}
            msg = (f"the global gradient norm jumps to {_fmt(start_value)} at step {first}, "
                   f"{_fmt(ratio)}x its running median {_fmt(med)}")
            if peak > start_value:
                msg += f", and reaches {_fmt(peak)}"
            msg += "; it came back down" if recovered else "; it did not come back down"
            if layer:
                msg += f" (the largest jump of a recurrent weight's gradient is in {layer})"
            remedy = f"clip gradients at about {clip:g}" if clip else "clip gradients"
            findings.append(Finding("exploding_gradient", severity, layer, first, last, evidence,
                                    f"{msg}. Remedy: {remedy} (Pascanu et al. 2013: 0.5-10x the average norm), "
                                    "and lower the learning rate."))
    return findings


def _blame_layer(layers: list[LayerInfo], scalars: dict[str, Series], step: int) -> str | None:
    best, best_ratio = None, 0.0
    for info in layers:
        pname = _weight_hh_param(info, scalars)
        if pname is None:
            continue
        series = scalars[schema.SCALAR_PARAM_GRAD_PREFIX + pname]
        now = _value_at(series, step)
        prior = series.values[series.steps < step]
        prior = prior[np.isfinite(prior)]
        if not len(prior):
            continue
        med = float(np.median(prior[-SPIKE_WINDOW:]))
        ratio = math.inf if not math.isfinite(now) else (now / med if med > 0 else 0.0)
        if ratio > best_ratio:
            best, best_ratio = info.name, ratio
    return best


def _sample(steps: np.ndarray) -> list[int]:
    if len(steps) <= SAMPLED_STEPS:
        return [int(s) for s in steps]
    idx = np.linspace(0, len(steps) - 1, SAMPLED_STEPS).round().astype(int)
    return [int(steps[i]) for i in sorted(set(idx.tolist()))]


def _saturation(trace: Trace, info: LayerInfo, steps: list[int]) -> list[Finding]:
    if info.kind not in (schema.KIND_LSTM, schema.KIND_GRU) or not steps:
        return []
    tail = steps[len(steps) // 2 :]  # judge the second half of training
    sat, closed = [], []
    for step in tail:
        try:
            gates = trace.gates(info.name, step)
        except Exception:  # noqa: BLE001 - a step without gates is skipped
            continue
        fractions = []
        for name, g in gates.items():
            vals = g.compressed()
            vals = vals[np.isfinite(vals)]  # NaN/Inf are the nonfinite rule's, not saturation
            if not len(vals):
                continue
            if name in ("cell", "new"):
                fractions.append(float(np.mean(np.abs(vals) > 1 - SATURATION_MARGIN)))
            else:
                fractions.append(float(np.mean((vals < SATURATION_MARGIN) | (vals > 1 - SATURATION_MARGIN))))
        if fractions:
            sat.append(float(np.mean(fractions)))
        if "forget" in gates:
            f = gates["forget"].compressed()
            f = f[np.isfinite(f)]
            if len(f):
                closed.append(float(np.mean(f < FORGET_CLOSED)))
    findings = []
    if sat and float(np.median(sat)) >= SATURATION_WARNING:
        frac = float(np.median(sat))
        findings.append(Finding(
            "gate_saturation", "warning", info.name, tail[0], tail[-1],
            {"saturated_fraction": frac, "margin": SATURATION_MARGIN, "sampled_steps": len(sat)},
            f"{frac:.0%} of {info.name}'s gate activations sit within {SATURATION_MARGIN} of their bounds "
            "in the second half of training; saturated gates pass almost no gradient. Remedy: lower the "
            "learning rate, normalise the inputs, or add layer normalisation.",
        ))
    if closed and float(np.median(closed)) >= SATURATION_WARNING:
        frac = float(np.median(closed))
        findings.append(Finding(
            "forget_gate_closed", "warning", info.name, tail[0], tail[-1],
            {"closed_fraction": frac, "threshold": FORGET_CLOSED},
            f"{frac:.0%} of {info.name}'s forget-gate values are below {FORGET_CLOSED}: the cell forgets at "
            "every step, so gradients vanish along the cell path. Remedy: initialise the forget-gate bias to 1.",
        ))
    return findings


def _dead_units(trace: Trace, info: LayerInfo, steps: list[int]) -> list[Finding]:
    if info.kind != schema.KIND_RNN_RELU or not steps:
        return []
    step = steps[-1]
    try:
        h = trace.hidden(info.name, step)
    except Exception:  # noqa: BLE001
        return []
    data = np.where(np.ma.getmaskarray(h), 0.0, np.asarray(h.data))
    dead = np.all(data == 0, axis=(0, 1))
    frac = float(np.mean(dead))
    if frac < DEAD_UNIT_WARNING:
        return []
    return [Finding(
        "dead_units", "warning", info.name, step, step,
        {"dead_fraction": frac, "dead_units": int(dead.sum()), "units": int(dead.size)},
        f"{int(dead.sum())} of {dead.size} relu units of {info.name} are zero at every timestep of every stored "
        "sequence. Remedy: lower the learning rate, or use tanh / an LSTM or GRU.",
    )]


def _layers(trace: Trace) -> list[LayerInfo]:
    return [trace.layer_info(name) for name in trace.layers]


def _finite_steps(steps: np.ndarray, nonfinite: Series | None) -> np.ndarray:
    """The recorded steps at which a layer's stored values hold no NaN/Inf."""
    if nonfinite is None:
        return steps
    return steps[~np.isin(steps, nonfinite.steps[nonfinite.values > 0])]


def _scaler_skips(scalars: dict[str, Series]) -> np.ndarray:
    """Recorded steps whose gradients a GradScaler found not finite and whose
    optimizer step it skipped (watch(grad_scaler=...)): the scale was too high for
    float16, not a divergence of the model."""
    skipped = scalars.get(schema.SCALAR_OPTIMIZER_SKIPPED)
    grad = scalars.get(schema.SCALAR_GRAD_NORM)
    if skipped is None or grad is None:
        return np.zeros(0, np.int64)
    steps = skipped.steps[skipped.values > 0]
    nonfinite = grad.steps[~np.isfinite(grad.values)]
    return np.intersect1d(steps, nonfinite)


def _without_steps(scalars: dict[str, Series], steps: np.ndarray) -> dict[str, Series]:
    """The gradient-derived scalars with these steps left out."""
    out = dict(scalars)
    for name, series in scalars.items():
        if name == schema.SCALAR_GRAD_NORM or name.startswith(
                (schema.SCALAR_PARAM_GRAD_PREFIX, schema.SCALAR_NONFINITE_PREFIX)):
            keep = ~np.isin(series.steps, steps)
            out[name] = Series(series.steps[keep], series.values[keep])
    return out


def _scaler_finding(skips: np.ndarray, recorded: int) -> Finding:
    severe = len(skips) > recorded / 2
    return Finding(
        "scaler_skipped_steps", "warning" if severe else "info", None, int(skips[0]), int(skips[-1]),
        {"recorded_steps_skipped": int(len(skips)), "recorded_steps": recorded},
        f"the GradScaler found non-finite scaled gradients at {len(skips)} of {recorded} recorded steps and "
        "skipped their optimizer steps (they are left out of the gradient findings)"
        + (": more than half of the steps, so training barely moves; the gradients overflow even at a low "
           "scale, which points to exploding gradients: clip them after scaler.unscale_(optimizer)." if severe
           else "; routine while it lowers its scale."),
    )


def diagnose(trace: Trace) -> list[Finding]:
    """All findings for a trace, most severe and earliest first."""
    scalars = trace.scalars()
    layers = _layers(trace)
    steps = trace.steps
    findings: list[Finding] = []
    skips = _scaler_skips(scalars)
    if len(skips):
        findings.append(_scaler_finding(skips, len(steps)))
        scalars = _without_steps(scalars, skips)
        steps = steps[~np.isin(steps, skips)]
    plateau = loss_plateaued(scalars.get(schema.SCALAR_LOSS))
    # a layer's numbers at a step where it holds NaN/Inf describe a model that has already
    # diverged (relu of NaN is 0 in the scan, so its profile "vanishes"): the nonfinite rule
    # reports those steps, the layer rules judge the finite ones
    finite_steps = {info.name: _finite_steps(steps, scalars.get(schema.SCALAR_NONFINITE_PREFIX + info.name))
                    for info in layers}
    measures = {info.name: measure_layer(trace, info, finite_steps[info.name]) for info in layers}
    findings += _nonfinite(trace, scalars)
    findings += _exploding(trace, layers, measures, scalars)
    for info in layers:
        sampled = _sample(finite_steps[info.name])
        findings += _vanishing(trace, info, measures[info.name], scalars, plateau)
        findings += _saturation(trace, info, sampled)
        findings += _dead_units(trace, info, sampled)
    findings.sort(key=lambda f: (SEVERITY_ORDER[f.severity], f.first_step))
    return findings


def no_findings(recorded_steps: int | None = None) -> str:
    """What an empty list of findings means: nothing wrong in the recorded steps, or
    nothing recorded to look at (a trace whose run has not reached a recorded step)."""
    if recorded_steps == 0:
        return "no findings: the trace holds no recorded training steps, so there is nothing to diagnose."
    return "no findings: gradients neither vanish nor explode in this trace."


def render_text(findings: list[Finding], source: str = "", recorded_steps: int | None = None) -> str:
    """A readable report. ``recorded_steps``: the trace's count, which says whether
    an empty report means a healthy run or an empty trace."""
    if not findings:
        return f"seqscope diagnose {source}: {no_findings(recorded_steps)}"
    lines = [f"seqscope diagnose {source}: {len(findings)} finding(s)"]
    counts = {s: sum(f.severity == s for f in findings) for s in SEVERITY_ORDER}
    lines.append("  " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    for f in findings:
        where = f.layer or "model"
        span = f"step {f.first_step}" if f.first_step == f.last_step else f"steps {f.first_step}-{f.last_step}"
        lines.append("")
        lines.append(f"[{f.severity.upper()}] {f.kind} in {where}, {span}")
        lines.append(f"  {f.message}")
        ev = ", ".join(f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in f.evidence.items())
        lines.append(f"  evidence: {ev}")
    return "\n".join(lines)


__all__ = ["Finding", "diagnose", "render_text", "no_findings", "horizon", "loss_plateaued"]

