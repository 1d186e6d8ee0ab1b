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

import dataclasses

import torch

from seqscope.trace import schema


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


def previous(seq: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """[x_{-1}=first, x_0, ..., x_{T-2}] along the time axis."""
    return torch.cat([first.unsqueeze(0), seq[:-1]], dim=0)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    out = torch.matmul(x, w.t())
    if b is not None:
        out = out + b
    return out


def forward_details(
    w: LayerWeights,
    x: torch.Tensor,
    h: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor | None,
    valid: torch.Tensor,
) -> ForwardDetails:
    """Recompute gates (and LSTM cell states) from the layer's input ``x``
    [time, sequence, input], output ``h`` [time, sequence, output] and initial
    state ``h0``/``c0`` [sequence, unit]."""
    h_prev = previous(h, h0)
    vmask = valid.unsqueeze(-1).to(h.dtype)  # zero the backward factors on padding
    if w.kind == schema.KIND_LSTM:
        assert c0 is not None
        a = _linear(x, w.w_ih, w.b_ih) + _linear(h_prev, w.w_hh, w.b_hh)
        n_time, n_seq = a.shape[:2]
        a = a.view(n_time, n_seq, 4, -1)
        gates = torch.sigmoid(a)
        gates[:, :, 2] = torch.tanh(a[:, :, 2])
        i, f, g, o = gates.unbind(2)
        ig = i * g
        cell = torch.empty_like(ig)
        prev = c0
        for t in range(n_time):
            prev = torch.addcmul(ig[t], f[t], prev, out=cell[t])
        c_prev = previous(cell, c0)
        tc = torch.tanh(cell)
        factors = {
            # dc_t += dm_t * A_t
            "A": o * (1 - tc * tc) * vmask,
            # da_t[i,f,g] = dc_t * P3_t
            "P3": torch.stack([g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g)], dim=2)
            * vmask.unsqueeze(2),
            # da_t[o] = dm_t * Bo_t
            "Bo": tc * o * (1 - o) * vmask,
            # dc_{t} += f_{t+1} dc_{t+1}
            "F": f * vmask,
        }
        return ForwardDetails(w.kind, gates, cell, factors)
    if w.kind == schema.KIND_GRU:
        gi = _linear(x, w.w_ih, w.b_ih)
        gh = _linear(h_prev, w.w_hh, w.b_hh)
        n_time, n_seq = gi.shape[:2]
        gi = gi.view(n_time, n_seq, 3, -1)
        gh = gh.view(n_time, n_seq, 3, -1)
        r = torch.sigmoid(gi[:, :, 0] + gh[:, :, 0])
        z = torch.sigmoid(gi[:, :, 1] + gh[:, :, 1])
        n = torch.tanh(gi[:, :, 2] + r * gh[:, :, 2])
        gates = torch.stack([r, z, n], dim=2)
        fn = (1 - z) * (1 - n * n)
        factors = {
            # W_hh^T [dr | dz | r dn] = W_hh^T (dh * F3)
            "F3": torch.stack(
                [fn * gh[:, :, 2] * r * (1 - r), (h_prev - n) * z * (1 - z), r * fn], dim=2
            )
            * vmask.unsqueeze(2),
            "Z": z * vmask,
        }
        return ForwardDetails(w.kind, gates, None, factors)
    if w.kind == schema.KIND_RNN_TANH:
        return ForwardDetails(w.kind, None, None, {"D": (1 - h * h) * vmask})
    if w.kind == schema.KIND_RNN_RELU:
        return ForwardDetails(w.kind, None, None, {"D": (h > 0).to(h.dtype) * vmask})
    raise ValueError(f"unknown recurrent kind {w.kind!r}")


def backward_scan(
    w: LayerWeights,
    details: ForwardDetails,
    ext_h: torch.Tensor,
    ext_c: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Total gradients by BPTT.

    ``ext_h`` [time, R, sequence, output] and ``ext_c`` [time, R, sequence, unit]
    hold R independent sets of external gradients (R=2: the loss's gradient and
    the propagation seed) that share one pass over time. Returns dL/dh_t and
    (LSTM) dL/dc_t in the same shapes. Padded timesteps must carry zero external
    gradient; their factors are zero, so nothing flows through them.
    """
    n_time = ext_h.shape[0]
    dh_all = ext_h.clone()
    f = details.factors
    w_hh = w.w_hh
    if details.kind == schema.KIND_LSTM:
        dc_all = ext_c.clone() if ext_c is not None else None
        if dc_all is None:
            dc_all = ext_h.new_zeros(ext_h.shape[:3] + (f["A"].shape[-1],))
        r_, k_, hidden = dc_all.shape[1:]
        dpre = dc_all.new_empty((r_, k_, 4, hidden))
        carry: torch.Tensor | None = None
        for t in range(n_time - 1, -1, -1):
            dh = dh_all[t]
            if carry is not None:
                dh.add_(carry)
            dm = torch.matmul(dh, w.w_hr) if w.w_hr is not None else dh
            dc = dc_all[t]
            dc.addcmul_(dm, f["A"][t])
            if t + 1 < n_time:
                dc.addcmul_(f["F"][t + 1], dc_all[t + 1])
            torch.mul(f["P3"][t], dc.unsqueeze(2), out=dpre[:, :, :3])
            torch.mul(dm, f["Bo"][t], out=dpre[:, :, 3])
            carry = torch.matmul(dpre.view(r_, k_, 4 * hidden), w_hh)
        return dh_all, dc_all
    if details.kind == schema.KIND_GRU:
        r_, k_ = ext_h.shape[1:3]
        hidden = f["Z"].shape[-1]
        dpre = ext_h.new_empty((r_, k_, 3, hidden))
        carry = None
        for t in range(n_time - 1, -1, -1):
            dh = dh_all[t]
            if carry is not None:
                dh.add_(carry)
            torch.mul(f["F3"][t], dh.unsqueeze(2), out=dpre)
            carry = torch.matmul(dpre.view(r_, k_, 3 * hidden), w_hh)
            carry.addcmul_(dh, f["Z"][t])
        return dh_all, None
    # plain RNN
    carry = None
    for t in range(n_time - 1, -1, -1):
        dh = dh_all[t]
        if carry is not None:
            dh.add_(carry)
        carry = torch.matmul(dh * f["D"][t], w_hh)
    return dh_all, None


def unit_seed(last_grad: torch.Tensor) -> torch.Tensor:
    """The propagation seed v [sequence, output]: the direction of the gradient
    at each sequence's last step, or the uniform unit vector where that
    gradient is zero or not finite (so the profile always exists)."""
    norm = torch.linalg.vector_norm(last_grad, dim=-1, keepdim=True)
    uniform = torch.full_like(last_grad, last_grad.shape[-1] ** -0.5)
    ok = (norm > 0) & torch.isfinite(norm)
    return torch.where(ok, last_grad / torch.where(ok, norm, torch.ones_like(norm)), uniform)


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
