"""Independent references: recurrent layers unrolled one timestep at a time in
plain tensor math, with autograd holding every h_t and c_t (retain_grad).

Nothing here imports seqscope. The cell equations follow PyTorch's documented
parametrisation (torch.nn.LSTM / GRU / RNN docs); ``check_against_module``
confirms the reference reproduces the fused module before it is trusted.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn


def kind_of(module: nn.Module) -> str:
    if isinstance(module, nn.LSTM):
        return "lstm"
    if isinstance(module, nn.GRU):
        return "gru"
    return "rnn_" + module.nonlinearity


def cell_step(kind, x, h, c, w, product=None):
    """One timestep for one sequence. Returns (h, c, gates dict). ``product``
    rounds the operands of the matrix products (as autocast does); the
    elementwise parts use ``h`` and ``c`` as given."""
    p = product or (lambda t: t)
    x, hp = p(x), p(h)
    if kind == "lstm":
        a = x @ w["w_ih"].T + hp @ w["w_hh"].T
        if "b_ih" in w:
            a = a + w["b_ih"] + w["b_hh"]
        ai, af, ag, ao = a.chunk(4, dim=-1)
        i, f, g, o = torch.sigmoid(ai), torch.sigmoid(af), torch.tanh(ag), torch.sigmoid(ao)
        c_new = f * c + i * g
        h_new = o * torch.tanh(c_new)
        if "w_hr" in w:
            h_new = h_new @ w["w_hr"].T
        return h_new, c_new, {"input": i, "forget": f, "cell": g, "output": o}
    if kind == "gru":
        gi = x @ w["w_ih"].T
        gh = hp @ w["w_hh"].T
        if "b_ih" in w:
            gi = gi + w["b_ih"]
            gh = gh + w["b_hh"]
        ir, iz, in_ = gi.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r = torch.sigmoid(ir + hr)
        z = torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return (1 - z) * n + z * h, None, {"reset": r, "update": z, "new": n}
    a = x @ w["w_ih"].T + hp @ w["w_hh"].T
    if "b_ih" in w:
        a = a + w["b_ih"] + w["b_hh"]
    return (torch.tanh(a) if kind == "rnn_tanh" else torch.relu(a)), None, {}


def rounded_operands(dtype: torch.dtype):
    """A ``product=`` function for cell_step: ``t`` rounded to ``dtype``, as
    autocast rounds a product's operands; the gradient passes unrounded
    (straight through)."""
    def rounded(t: torch.Tensor) -> torch.Tensor:
        return t + (t.to(dtype).to(t.dtype) - t).detach()
    return rounded


def layer_weights(module, k, d):
    sfx = f"_l{k}" + ("_reverse" if d else "")
    w = {"w_ih": getattr(module, "weight_ih" + sfx), "w_hh": getattr(module, "weight_hh" + sfx)}
    if module.bias:
        w["b_ih"] = getattr(module, "bias_ih" + sfx)
        w["b_hh"] = getattr(module, "bias_hh" + sfx)
    if getattr(module, "proj_size", 0) > 0:
        w["w_hr"] = getattr(module, "weight_hr" + sfx)
    return {name: t.detach().clone().requires_grad_(True) for name, t in w.items()}


@dataclasses.dataclass
class RefLayer:
    """Per sequence lists over time of h_t, c_t and gates of one layer direction."""

    h: list[list[torch.Tensor]]
    c: list[list[torch.Tensor]]
    gates: list[list[dict[str, torch.Tensor]]]
    weights: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # leaves: .grad after backward


def run_reference(module, seqs, h0=None, c0=None, dropout_masks=None):
    """Unroll ``module`` over the list of sequences ``seqs`` (each [L_b, input]).

    Returns (layers, outputs, h_n, c_n): layers maps (k, d) -> RefLayer; outputs
    is a list per sequence of [L_b, D*out] tensors; h_n/c_n are
    [layers*D, batch, out] built from the final states.
    ``dropout_masks[k]`` (optional) multiplies layer k's output before layer k+1
    ([time, batch, D*out], time-major).
    """
    kind = kind_of(module)
    n_dir = 2 if module.bidirectional else 1
    out_size = module.proj_size if getattr(module, "proj_size", 0) > 0 else module.hidden_size
    batch = len(seqs)
    dtype = seqs[0].dtype
    layers = {}
    inputs = [s for s in seqs]
    h_fin = [[None] * batch for _ in range(module.num_layers * n_dir)]
    c_fin = [[None] * batch for _ in range(module.num_layers * n_dir)]
    for k in range(module.num_layers):
        outs_dir = []
        for d in range(n_dir):
            w = layer_weights(module, k, d)
            ref = RefLayer([], [], [], w)
            dir_out = []
            for b in range(batch):
                x = inputs[b]
                length = x.shape[0]
                idx = k * n_dir + d
                h = (h0[idx, b] if h0 is not None else torch.zeros(out_size, dtype=dtype)).clone()
                c = None
                if kind == "lstm":
                    c = (c0[idx, b] if c0 is not None else torch.zeros(module.hidden_size, dtype=dtype)).clone()
                hs = [None] * length
                cs = [None] * length
                gs = [None] * length
                order = range(length) if d == 0 else range(length - 1, -1, -1)
                for t in order:
                    h, c, g = cell_step(kind, x[t], h, c, w)
                    h.retain_grad()
                    if c is not None:
                        c.retain_grad()
                    hs[t], cs[t], gs[t] = h, c, g
                h_fin[idx][b] = h
                c_fin[idx][b] = c
                ref.h.append(hs)
                ref.c.append(cs)
                ref.gates.append(gs)
                dir_out.append(torch.stack(hs))
            layers[(k, d)] = ref
            outs_dir.append(dir_out)
        inputs = [torch.cat([outs_dir[d][b] for d in range(n_dir)], dim=-1) for b in range(batch)]
        if dropout_masks is not None and k + 1 < module.num_layers:
            inputs = [inp * dropout_masks[k][: inp.shape[0], b] for b, inp in enumerate(inputs)]
    h_n = torch.stack([torch.stack(row) for row in h_fin])
    c_n = torch.stack([torch.stack(row) for row in c_fin]) if kind == "lstm" else None
    return layers, inputs, h_n, c_n


def norm(t: torch.Tensor, dim=None) -> torch.Tensor:
    """Euclidean norm in float64, whatever the tensor's dtype (the squares of
    float32 values overflow above ~1.8e19 and vanish below ~1e-19)."""
    return torch.linalg.vector_norm(t.double(), dim=dim)


def unit_direction(g: torch.Tensor) -> torch.Tensor:
    """g / ||g|| (computed in float64, returned in g's dtype), or the uniform
    unit vector where g is zero or not finite."""
    n = norm(g)
    if n > 0 and torch.isfinite(n):
        return (g.double() / n).to(g.dtype)
    return torch.full_like(g, g.numel() ** -0.5)


def propagation(ref: RefLayer, b: int, d: int):
    """||(dh_last/dh_t)^T v|| for every t of sequence b, v the unit gradient at
    the last processed step (uniform where that gradient is zero)."""
    hs = ref.h[b]
    last = hs[-1] if d == 0 else hs[0]
    v = unit_direction(last.grad)
    grads = torch.autograd.grad(last, hs, grad_outputs=v, retain_graph=True, allow_unused=True)
    return torch.stack(
        [norm(gr) if gr is not None else torch.zeros((), dtype=torch.float64) for gr in grads]
    )


def grad_scaler(device_type: str, **kwargs):
    """A GradScaler for ``device_type``: torch.amp.GradScaler (PyTorch 2.3 and
    later); before it only CUDA had one (torch.cuda.amp.GradScaler), so a CPU
    test is skipped there, with its reason."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device_type, **kwargs)
    if device_type == "cuda":
        return torch.cuda.amp.GradScaler(**kwargs)
    pytest.skip(f"PyTorch {torch.__version__} has no GradScaler for the CPU (torch.amp.GradScaler: 2.3 and later)")


def flushes_subnormals() -> bool:
    """Whether this thread flushes float32 subnormal numbers to zero: a product with one is 0."""
    return (torch.tensor([2.0**-140]) * 1.0).item() == 0.0


def check_vanishing_profile(got: np.ndarray, want: np.ndarray) -> None:
    """A recorded propagation profile against a float64 reference that vanishes below float32's
    range (which the reference must reach): equal above 1e-27, at most that below, and no value
    in float32's subnormal range (0, 1.2e-38)."""
    assert want.min() < 1e-40  # the case reaches the subnormal range
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-27)
    magnitude = np.abs(np.asarray(got, dtype=np.float64))
    assert not ((magnitude > 0) & (magnitude < np.finfo(np.float32).tiny)).any(), got
