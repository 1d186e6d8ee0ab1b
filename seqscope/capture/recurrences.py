"""Per-timestep quantities of one recurrent layer direction, without autograd.

Fused modules (``torch._VF.lstm`` and friends) never expose their gates or the
total gradient at each timestep. This module reconstructs both from what the
fused call does expose: the layer's input sequence ``x``, its output sequence
``h``, the initial state and the gradients that arrive from outside the
recurrence. Everything is exact up to floating-point rounding.

Axes: all sequence tensors are time-major, ``[time, sequence, unit]`` in the
order the direction processes them (reverse layers are flipped per sequence by
the caller). ``valid`` is a ``[time, sequence]`` bool mask of real (non-padded)
timesteps; padded timesteps always come after a sequence's last valid one.

Forward (PyTorch's parametrisation, torch/nn/modules/rnn.py):

- LSTM, rows ``[i | f | g | o]``: ``a_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh``,
  ``i, f, o = sigmoid``, ``g = tanh``, ``c_t = f c_{t-1} + i g``,
  ``h_t = W_hr (o tanh c_t)`` (``W_hr`` = identity without proj_size).
- GRU, rows ``[r | z | n]``: ``r, z = sigmoid(W_i x + b_i + W_h h + b_h)``,
  ``n = tanh(W_in x + b_in + r (W_hn h_{t-1} + b_hn))``, ``h_t = (1 - z) n + z h_{t-1}``.
- RNN: ``h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``, act = tanh or relu.

Backward (backpropagation through time, written as a scan from the last step):
``e_t`` are the external gradients on ``h_t`` (the layer output's gradient, plus
``dL/dh_n`` at the last valid step) and ``e^c_t`` on ``c_t`` (``dL/dc_n``). Then

- LSTM: ``dh_t = e_t + W_hh^T da_{t+1}``, ``dm_t = W_hr^T dh_t``,
  ``dc_t = e^c_t + dm_t o_t (1 - tanh^2 c_t) + f_{t+1} dc_{t+1}``,
  ``da_t = [dc g i(1-i) | dc c_{t-1} f(1-f) | dc i (1-g^2) | dm tanh(c) o(1-o)]``.
- GRU: ``dh_t = e_t + z_{t+1} dh_{t+1} + W_hh^T [dr | dz | r dn]_{t+1}`` with
  ``dn = dh (1-z)(1-n^2)``, ``dz = dh (h_{t-1} - n) z(1-z)``,
  ``dr = dn (W_hn h_{t-1} + b_hn) r(1-r)``.
- RNN: ``dh_t = e_t + W_hh^T (act'(a_{t+1}) dh_{t+1})``.

``dh_t`` and ``dc_t`` are the total derivatives dL/dh_t and dL/dc_t that an
unrolled autograd graph would give. The propagation profile runs the same scan
with ``e`` zero except a unit vector ``v`` at each sequence's last valid step.
The elementwise factors are computed for all timesteps at once; the loop body
is one matrix product and a few in-place elementwise ops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch

from seqscope.capture import graphs, native
from seqscope.trace import schema

log = logging.getLogger("seqscope")


@dataclasses.dataclass
class LayerWeights:
    """Weights of one layer direction, in PyTorch's layout."""

    kind: str
    w_ih: torch.Tensor  # [G*H, input]
    w_hh: torch.Tensor  # [G*H, output]
    b_ih: torch.Tensor | None  # [G*H]
    b_hh: torch.Tensor | None  # [G*H]
    w_hr: torch.Tensor | None = None  # [output, H] (LSTM proj_size)


@dataclasses.dataclass
class ForwardDetails:
    """What the forward pass computed at every timestep, plus the factors the
    backward scan needs. Time-major, processing order."""

    kind: str
    gates: torch.Tensor | None  # [time, sequence, gate, unit], activated
    cell: torch.Tensor | None  # [time, sequence, unit] (LSTM)
    factors: dict[str, torch.Tensor]


_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(run: torch.dtype) -> torch.dtype:
    """The dtype a layer is recomputed in: float32 for a layer that ran in half
    precision (autocast, or a half-precision model), the layer's own otherwise."""
    return torch.float32 if run in _HALF else run


def as_run(t: torch.Tensor, run: torch.dtype, calc: torch.dtype) -> torch.Tensor:
    """``t`` as a kernel that ran in ``run`` saw it (rounded to ``run`` where that is
    narrower: autocast casts float32 weights, inputs and initial states to the half
    precision it runs in), then in ``calc``. No copy when nothing changes."""
    if t.dtype != run and run in _HALF:
        t = t.to(run)
    return t.to(calc)


def weights_as_run(w: LayerWeights, run: torch.dtype, calc: torch.dtype) -> LayerWeights:
    """The layer's weights as the kernel used them, in ``calc`` (see as_run)."""
    def conv(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else as_run(t, run, calc)
    return LayerWeights(w.kind, conv(w.w_ih), conv(w.w_hh), conv(w.b_ih), conv(w.b_hh),  # type: ignore[arg-type]
                        conv(w.w_hr))


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype of the caller's autocast region on this device, or None. Its
    products (the fused kernels, linear and matmul) ran in that dtype, on copies
    of weights and inputs rounded to it."""
    try:
        if _AUTOCAST_BY_DEVICE_TYPE:
            if torch.is_autocast_enabled(device.type):
                return torch.get_autocast_dtype(device.type)
            return None
        # PyTorch before 2.4: one pair of functions per device type, and
        # is_autocast_enabled() takes no argument (it is CUDA's)
        old = _OLD_AUTOCAST.get(device.type)
        if old is not None and old[0]():
            return old[1]()
    except (RuntimeError, TypeError, ValueError):  # a device type autocast does not know
        pass
    return None


# torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type): PyTorch 2.4 and later
_AUTOCAST_BY_DEVICE_TYPE = hasattr(torch, "get_autocast_dtype")
_OLD_AUTOCAST: dict[str, tuple[Any, Any]] = {
    "cpu": (getattr(torch, "is_autocast_cpu_enabled", None), getattr(torch, "get_autocast_cpu_dtype", None)),
    "cuda": (torch.is_autocast_enabled, getattr(torch, "get_autocast_gpu_dtype", None)),
}
_OLD_AUTOCAST = {k: v for k, v in _OLD_AUTOCAST.items() if v[0] is not None and v[1] is not None}


def run_dtype(output: torch.dtype, autocast: torch.dtype | None) -> torch.dtype:
    """The precision a layer's products ran in: the autocast dtype where there was
    one (CPU autocast runs nn.GRU's products in bfloat16 but returns float32), the
    output's dtype otherwise (a half-precision model)."""
    return autocast if autocast is not None else output


def in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread: a forward call
    then is a recomputation (torch.utils.checkpoint)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def in_transform() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is running on this
    thread: its forward passes compute with wrapped tensors that have no storage and
    whose gradients autograd's hooks never see."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return active is not None and bool(active())


def current_autograd_node() -> Any:
    """The autograd node whose backward is running on this thread (in a reentrant
    checkpoint's recomputation: that checkpoint's node), None outside backward or
    where PyTorch does not say."""
    node = getattr(torch._C, "_current_autograd_node", None)
    return node() if node is not None else None


def no_autocast(device: torch.device) -> Any:
    """A context in which seqscope's own arithmetic is not recast by the caller's
    autocast region (it would run the recomputation in half precision, or fail on
    mixed dtypes); a no-op when autocast is off."""
    if autocast_dtype(device) is not None:
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def previous(seq: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """[x_{-1}=first, x_0, ..., x_{T-2}] along the time axis."""
    return torch.cat([first.unsqueeze(0), seq[:-1]], dim=0)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w^T + b over [time, sequence, feature] as one 2-D product."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.mm(flat, w.t()) if b is None else torch.addmm(b, flat, w.t())
    return out.view(x.shape[0], x.shape[1], -1)


def _pre_activation(x: torch.Tensor, h_prev: torch.Tensor, w: LayerWeights) -> torch.Tensor:
    """W_ih x_t + b_ih + W_hh h_{t-1} + b_hh for all timesteps: two products."""
    bias = w.b_ih if w.b_hh is None else (w.b_hh if w.b_ih is None else w.b_ih + w.b_hh)
    a = _linear(x, w.w_ih, bias)  # both biases in the first product: no extra pass
    a2 = a.view(-1, a.shape[-1])
    hp = h_prev.reshape(-1, h_prev.shape[-1])
    a2.addmm_(hp, w.w_hh.t())
    return a


def forward_details(
    w: LayerWeights,
    x: torch.Tensor,
    h: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor | None,
    valid: torch.Tensor | None,
    h_prev: torch.Tensor | None = None,
    c_prev: torch.Tensor | None = None,
    cell: torch.Tensor | None = None,
    compiled: bool = True,
    run: torch.dtype | None = None,
) -> ForwardDetails:
    """Recompute gates (and LSTM cell states) from the layer's input ``x``
    [time, sequence, input], output ``h`` [time, sequence, output] and initial
    state ``h0``/``c0`` [sequence, unit]. ``valid`` [time, sequence] masks
    padding; None when every sequence has every timestep.

    Cell loops pass the states each call actually received (``h_prev``,
    ``c_prev`` [time, sequence, unit]) and returned (``cell``): the gates are
    then exact even when the loop changes the state between calls.

    ``compiled``: for an LSTM or a GRU on the CPU, the scan's factors (and the
    LSTM's cell states) come from the compiled passes (capture.native) when they
    are available.

    ``run``: the precision the layer's products ran in. Where it is a half
    precision (autocast), their operands ``x`` and ``h_prev`` are rounded to it,
    as the kernel's were (``w`` must be rounded already, weights_as_run);
    everything elementwise uses the states as recorded."""
    if h_prev is None:
        h_prev = previous(h, h0)
    x_p, hp_p = (x, h_prev) if run is None else (as_run(x, run, x.dtype), as_run(h_prev, run, h_prev.dtype))
    # zero the backward factors on padding (nothing to do without padding)
    vmask = None if valid is None else valid.unsqueeze(-1).to(h.dtype)

    def masked(t: torch.Tensor, gate_axis: bool = False) -> torch.Tensor:
        """Zero on padding; ``t`` itself (no extra pass over it) without padding."""
        if vmask is None:
            return t
        return t * (vmask.unsqueeze(2) if gate_axis else vmask)
    if w.kind == schema.KIND_LSTM:
        assert c0 is not None
        a = _pre_activation(x_p, hp_p, w)
        n_time, n_seq = a.shape[:2]
        a = a.view(n_time, n_seq, 4, -1)
        gates = torch.sigmoid(a)
        gates[:, :, 2] = torch.tanh(a[:, :, 2])
        if compiled and native.supports(gates):
            try:
                cell, factors = native.lstm_factors(gates, c0, cell, c_prev, valid)
                return ForwardDetails(w.kind, gates, cell, factors)
            except ValueError as exc:  # a layout the compiled passes do not take
                log.debug("seqscope: %s", exc)
        i, f, g, o = gates.unbind(2)
        if cell is None:
            ig = i * g
            replayed = graphs.replay("cell-states", _cell_states, [ig, f, c0])
            cell = (replayed if replayed is not None else _cell_states(ig, f, c0))[0]
            assert cell is not None
        if c_prev is None:
            c_prev = previous(cell, c0)
        tc = torch.tanh(cell)
        factors = {
            # dc_t += dm_t * A_t
            "A": masked(o * (1 - tc * tc)),
            # da_t[i,f,g] = dc_t * P3_t
            "P3": masked(torch.stack([g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g)], dim=2), True),
            # da_t[o] = dm_t * Bo_t
            "Bo": masked(tc * o * (1 - o)),
            # dc_{t} += f_{t+1} dc_{t+1}
            "F": masked(f),
        }
        return ForwardDetails(w.kind, gates, cell, factors)
    if w.kind == schema.KIND_GRU:
        gi = _linear(x_p, w.w_ih, w.b_ih)
        gh = _linear(hp_p, w.w_hh, w.b_hh)
        n_time, n_seq = gi.shape[:2]
        gi = gi.view(n_time, n_seq, 3, -1)
        gh = gh.view(n_time, n_seq, 3, -1)
        rz = torch.sigmoid(gi[:, :, :2] + gh[:, :, :2])  # r and z in one pass
        n = torch.tanh(gi[:, :, 2] + rz[:, :, 0] * gh[:, :, 2])
        gates = torch.cat([rz, n.unsqueeze(2)], dim=2)
        if compiled and native.supports(gates):
            try:
                return ForwardDetails(w.kind, gates, None, native.gru_factors(gates, gh, h_prev, valid))
            except ValueError as exc:  # a layout the compiled pass does not take
                log.debug("seqscope: %s", exc)
        return ForwardDetails(w.kind, gates, None, gru_factors(gates, gh, h_prev, valid))
    if w.kind == schema.KIND_RNN_TANH:
        return ForwardDetails(w.kind, None, None, {"D": masked(1 - h * h)})
    if w.kind == schema.KIND_RNN_RELU:
        return ForwardDetails(w.kind, None, None, {"D": masked((h > 0).to(h.dtype))})
    raise ValueError(f"unknown recurrent kind {w.kind!r}")


def _cell_states(ig: torch.Tensor, f: torch.Tensor, c0: torch.Tensor) -> tuple[torch.Tensor]:
    """c_t = f_t c_{t-1} + i_t g_t over time, from ``ig`` = i*g and ``f`` [time, sequence, unit]."""
    cell = torch.empty_like(ig)
    prev = c0
    for ig_t, f_t, c_t in zip(ig.unbind(0), f.unbind(0), cell.unbind(0)):
        prev = torch.addcmul(ig_t, f_t, prev, out=c_t)
    return (cell,)


def gru_factors(gates: torch.Tensor, gh: torch.Tensor, h_prev: torch.Tensor,
                valid: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The GRU scan's factors from the activated gates [time, sequence, 3, unit]
    (rows r, z, n), the recurrent products ``gh`` = W_hh h_{t-1} + b_hh in the same
    layout, and h_{t-1} [time, sequence, unit]; zero on padding (``valid``).
    W_hh^T [dr | dz | r dn] = W_hh^T (dh F3), and dh_{t-1} += Z dh_t."""
    r, z, n = gates.unbind(2)
    fn = (1 - z) * (1 - n * n)
    f3 = torch.stack([fn * gh[:, :, 2] * r * (1 - r), (h_prev - n) * z * (1 - z), r * fn], dim=2)
    if valid is None:
        return {"F3": f3, "Z": z}
    vmask = valid.unsqueeze(-1).to(gates.dtype)
    return {"F3": f3 * vmask.unsqueeze(2), "Z": z * vmask}


def backward_scan(
    w: LayerWeights,
    details: ForwardDetails,
    ext_h: torch.Tensor,
    ext_c: torch.Tensor | None,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Total gradients by BPTT.

    ``ext_h`` [time, R, sequence, output] and ``ext_c`` [time, R, sequence, unit]
    hold R independent sets of external gradients (R=2: the loss's gradient and
    the propagation seed) that share one pass over time. Returns dL/dh_t and
    (LSTM) dL/dc_t in the same shapes. Padded timesteps must carry zero external
    gradient; their factors are zero, so nothing flows through them.

    ``overwrite``: the compiled scan may run in ``ext_h``/``ext_c`` themselves (no
    copy); their contents are undefined afterwards.

    On the CPU the compiled scan (capture.native) runs the same recurrence when it
    is available; this eager one is the fallback and the tests' second path. On a
    GPU the results can be a CUDA graph's own buffers (capture.graphs): use them
    before the next backward_scan of the same shapes.
    """
    if native.supports(ext_h):
        try:
            return native.backward_scan(details.kind, w.w_hh, w.w_hr, details.factors, ext_h, ext_c,
                                        overwrite=overwrite)
        except ValueError as exc:  # a layout the compiled scan does not take: run the eager one
            log.debug("seqscope: %s", exc)
    if ext_h.is_cuda:
        replayed = _scan_as_graph(w, details, ext_h, ext_c)
        if replayed is not None:
            return replayed
    with subnormals_flushed(ext_h.device):
        return eager_backward_scan(w, details, ext_h, ext_c)


# a float32 subnormal number (2^-140): a product with it is 0 where this thread flushes them
_SUBNORMAL = torch.tensor([2.0**-140])


@contextlib.contextmanager
def subnormals_flushed(device: torch.device) -> Iterator[None]:
    """On the CPU: the block runs with subnormal numbers flushed to zero on this
    thread, as the compiled scans run (see flush_subnormals in _native.c: where a
    propagation vanishes it passes through the subnormal range, ~20 times slower
    per operation on x86), and the thread's mode is put back afterwards. PyTorch
    has no getter for that mode: a product with a subnormal tells it."""
    if device.type != "cpu" or (_SUBNORMAL * 1.0).item() == 0.0 or not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _scan_as_graph(w: LayerWeights, details: ForwardDetails, ext_h: torch.Tensor,
                   ext_c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """eager_backward_scan replayed as a CUDA graph (capture.graphs), or None."""
    names = sorted(details.factors)
    optional = [("w_hr", w.w_hr), ("ext_c", ext_c)]
    present = [n for n, t in optional if t is not None]
    inputs = [w.w_hh, ext_h] + [details.factors[n] for n in names] + [t for _, t in optional if t is not None]

    def scan(w_hh: torch.Tensor, e_h: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        factors = dict(zip(names, rest))
        extra = dict(zip(present, rest[len(names):]))
        lw = dataclasses.replace(w, w_hh=w_hh, w_hr=extra.get("w_hr"))
        return eager_backward_scan(lw, ForwardDetails(details.kind, None, None, factors), e_h, extra.get("ext_c"))

    # not copied out: backward_scan's callers reduce dh and dc to norms at once
    out = graphs.replay(f"scan-{details.kind}-{','.join(present)}", scan, inputs, copy_out=False)
    return None if out is None else (out[0], out[1])  # type: ignore[return-value]


def eager_backward_scan(
    w: LayerWeights,
    details: ForwardDetails,
    ext_h: torch.Tensor,
    ext_c: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """backward_scan in PyTorch calls: any device and dtype."""
    n_time, reps, n_seq = ext_h.shape[:3]
    rows = reps * n_seq
    # rows = (R, sequence) flattened, so every product in the loop is a 2-D mm
    ext = ext_h.reshape(n_time, rows, -1)
    # dh_t starts as the external gradient; each step adds its recurrent part in place
    # (addmm_ into dh_{t-1}: no copy of ext_{t-1} first, one kernel fewer per timestep)
    dh_all = ext.clone()
    dh_t = dh_all.unbind(0)
    w_hh = w.w_hh

    def per_row(factor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[time, sequence, ...] -> per-timestep [rows, ...] (repeated over R)."""
        rep = factor.repeat((1, reps) + (1,) * (factor.dim() - 2))
        return rep.unbind(0)

    f = details.factors
    if details.kind == schema.KIND_LSTM:
        hidden = f["A"].shape[-1]
        if ext_c is not None:
            dc_all = ext_c.reshape(n_time, rows, hidden).clone()
        else:
            dc_all = ext.new_zeros((n_time, rows, hidden))
        dc_t = dc_all.unbind(0)
        a_t, f_t, p3_t, bo_t = per_row(f["A"]), per_row(f["F"]), per_row(f["P3"]), per_row(f["Bo"])
        dpre = ext.new_empty((rows, 4, hidden))
        dpre3, dpre_o, dpre_flat = dpre[:, :3], dpre[:, 3], dpre.view(rows, 4 * hidden)
        w_hr = w.w_hr
        for t in range(n_time - 1, -1, -1):
            dh = dh_t[t]
            dm = torch.mm(dh, w_hr) if w_hr is not None else dh
            dc = dc_t[t].addcmul_(dm, a_t[t])
            torch.mul(p3_t[t], dc.unsqueeze(1), out=dpre3)
            torch.mul(dm, bo_t[t], out=dpre_o)
            if t > 0:
                dc_t[t - 1].addcmul_(f_t[t], dc)
                dh_t[t - 1].addmm_(dpre_flat, w_hh)
        return dh_all.view(ext_h.shape), dc_all.view(n_time, reps, n_seq, hidden)
    if details.kind == schema.KIND_GRU:
        hidden = f["Z"].shape[-1]
        f3_t, z_t = per_row(f["F3"]), per_row(f["Z"])
        dpre = ext.new_empty((rows, 3, hidden))
        dpre_flat = dpre.view(rows, 3 * hidden)
        for t in range(n_time - 1, 0, -1):
            dh = dh_t[t]
            torch.mul(f3_t[t], dh.unsqueeze(1), out=dpre)
            dh_t[t - 1].addmm_(dpre_flat, w_hh).addcmul_(dh, z_t[t])
        return dh_all.view(ext_h.shape), None
    # plain RNN
    d_t = per_row(f["D"])
    da = ext.new_empty((rows, w_hh.shape[0]))
    for t in range(n_time - 1, 0, -1):
        torch.mul(dh_t[t], d_t[t], out=da)
        dh_t[t - 1].addmm_(da, w_hh)
    return dh_all.view(ext_h.shape), None


def step_back(w: LayerWeights, details: ForwardDetails, dh0: torch.Tensor, dc0: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scan's recurrence one step further back than its first timestep: from
    the totals at t=0 (``dh0`` [sequence, output] and, for an LSTM, ``dc0`` [sequence,
    unit], as backward_scan returned them) to the initial state h_{-1} (and c_{-1}).
    The same arithmetic as eager_backward_scan's step from t to t-1."""
    f = details.factors
    if details.kind == schema.KIND_LSTM:
        assert dc0 is not None
        dm = torch.mm(dh0, w.w_hr) if w.w_hr is not None else dh0
        dpre = torch.cat([f["P3"][0] * dc0.unsqueeze(1), (dm * f["Bo"][0]).unsqueeze(1)], dim=1)
        return torch.mm(dpre.flatten(1), w.w_hh), f["F"][0] * dc0
    if details.kind == schema.KIND_GRU:
        dpre = f["F3"][0] * dh0.unsqueeze(1)
        return torch.mm(dpre.flatten(1), w.w_hh).addcmul_(dh0, f["Z"][0]), None
    return torch.mm(dh0 * f["D"][0], w.w_hh), None


def norms(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Euclidean norms along ``dim`` in float64, whatever ``t``'s dtype: the
    squares of float32 gradients overflow above ~1.8e19 and vanish below
    ~1e-19, exactly where gradients explode or vanish."""
    return torch.linalg.vector_norm(t, dim=dim, dtype=torch.float64)


def unit_seed(last_grad: torch.Tensor) -> torch.Tensor:
    """The propagation seed v [sequence, output]: the direction of the gradient
    at each sequence's last step, or the uniform unit vector where that
    gradient is zero or not finite (so the profile always exists). Normalised
    in float64, returned in the gradient's dtype."""
    g = last_grad.double()
    norm = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
    # 0 < norm < inf: false for NaN too (one kernel fewer per comparison than isfinite)
    ok = (norm > 0) & (norm < math.inf)
    # g / norm is NaN or Inf exactly where ok is False, and where() drops it there
    return torch.where(ok, g / norm, last_grad.shape[-1] ** -0.5).to(last_grad.dtype)


def seed_last_steps(ext_h: torch.Tensor, last: torch.Tensor | None) -> None:
    """Put the propagation seed into ``ext_h`` [time, 2, sequence, output]: at each
    sequence's last step (``last`` [sequence], on ext_h's device; None: the last
    timestep for all), row 1 becomes unit_seed of row 0. In one compiled pass on
    the CPU (capture.native) when it is there."""
    if native.supports(ext_h):
        try:
            native.unit_seed_in_place(ext_h, last)
            return
        except ValueError as exc:  # a layout the compiled pass does not take
            log.debug("seqscope: %s", exc)
    if last is None:
        ext_h[-1, 1] = unit_seed(ext_h[-1, 0])
    else:
        seq = torch.arange(ext_h.shape[2], device=ext_h.device)
        ext_h[last, 1, seq] = unit_seed(ext_h[last, 0, seq])


def flip_index(lengths: torch.Tensor, n_time: int) -> torch.Tensor:
    """Index [time, sequence] that reverses each sequence within its length and
    leaves padding in place; applying it twice is the identity."""
    t = torch.arange(n_time, device=lengths.device).unsqueeze(1)
    rev = lengths.unsqueeze(0) - 1 - t
    return torch.where(t < lengths.unsqueeze(0), rev, t)


def take_time(seq: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """seq[index[t, k], k, ...] for a time-major ``seq``."""
    idx = index.reshape(index.shape + (1,) * (seq.dim() - 2)).expand_as(seq)
    return torch.gather(seq, 0, idx)
