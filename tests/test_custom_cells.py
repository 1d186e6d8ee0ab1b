"""User-written cells named in watch(cells=...), against autograd references."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import seqscope
from seqscope.errors import UnsupportedModelError
from tests import reference as ref

T, B, IN, HID = 6, 3, 2, 4


class PeepholeLSTM(nn.Module):
    """A hand-written LSTM with peephole connections; state is a tuple (h, c)."""

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Linear(IN, 4 * HID).double()
        self.weight_hh = nn.Parameter(torch.randn(4 * HID, HID, dtype=torch.float64) * 0.5)
        self.peep = nn.Parameter(torch.randn(3, HID, dtype=torch.float64) * 0.5)

    def gates(self, x, state):
        h, c = state
        a = self.W(x) + h @ self.weight_hh.T
        ai, af, ag, ao = a.chunk(4, dim=-1)
        i = torch.sigmoid(ai + self.peep[0] * c)
        f = torch.sigmoid(af + self.peep[1] * c)
        g = torch.tanh(ag)
        return i, f, g, ao

    def forward(self, x, state):
        i, f, g, ao = self.gates(x, state)
        c = f * state[1] + i * g
        o = torch.sigmoid(ao + self.peep[2] * c)
        return o * torch.tanh(c), c


@dataclasses.dataclass
class MinState:
    h: torch.Tensor


class MinimalGRU(nn.Module):
    """A minimal gated unit whose state is a dataclass."""

    def __init__(self) -> None:
        super().__init__()
        self.wx = nn.Linear(IN, 2 * HID).double()
        self.weight_hh = nn.Parameter(torch.randn(2 * HID, HID, dtype=torch.float64) * 0.6)

    def forward(self, x, state):
        a = self.wx(x) + state.h @ self.weight_hh.T
        z = torch.sigmoid(a[:, :HID])
        n = torch.tanh(a[:, HID:])
        return MinState((1 - z) * state.h + z * n)


class Model(nn.Module):
    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x):
        if isinstance(self.cell, PeepholeLSTM):
            state = (x.new_zeros(x.shape[1], HID), x.new_zeros(x.shape[1], HID))
        else:
            state = MinState(x.new_zeros(x.shape[1], HID))
        outs = []
        for t in range(x.shape[0]):
            state = self.cell(x[t], state)
            outs.append(state[0] if isinstance(state, tuple) else state.h)
        return torch.stack(outs)


def peephole_gates(cell, x, state):
    i, f, g, ao = cell.gates(x, state)
    return {"input": i, "forget": f, "cell": g}


CUSTOM_CASES = [(which, dtype, scale, amp) for which in ("peephole-tuple-state", "minimal-dataclass-state")
                for (dtype, scale, amp) in ((torch.float64, 1.0, False), (torch.float32, 1e22, False),
                                            (torch.float32, 1e-24, False), (torch.float32, 1.0, True))]


@pytest.mark.parametrize("which,dtype,scale,amp", CUSTOM_CASES,
                         ids=[f"{w}-{str(d)[6:]}-x{s:g}" + ("-autocast" if a else "") for w, d, s, a in CUSTOM_CASES])
def test_custom_cell_matches_autograd(which, dtype, scale, amp, tmp_path):
    """float32 cases: gradients ~1e22 or ~1e-24 per element, whose squares leave
    float32's range; their norms (float64) must not. ``amp``: the loop runs under
    torch.autocast (bfloat16), the reference too; the re-runs after the step
    (gates, propagation) must run as the cell did."""
    check_custom_cell(which, dtype, scale, amp, tmp_path)


UPDATED_CASES = [(which, amp) for which in ("peephole-tuple-state", "minimal-dataclass-state") for amp in (False, True)]


@pytest.mark.parametrize("which,amp", UPDATED_CASES,
                         ids=[w + ("-autocast" if a else "") for w, a in UPDATED_CASES])
def test_parameters_updated_before_the_next_step_do_not_change_the_custom_cell_record(which, amp, tmp_path):
    """The gates, the propagation profile (a re-run of the cell) and sigma_max of a
    step are computed from the parameters the step's calls ran with, although the
    optimizer has changed them in place before seqscope finishes the step."""
    check_custom_cell(which, torch.float64 if not amp else torch.float32, 1.0, amp, tmp_path, update_between=True)


def check_custom_cell(which, dtype, scale, amp, tmp_path, update_between: bool = False,
                      device: torch.device | None = None) -> None:
    """``update_between``: the parameters change in place after the backward pass
    (as in an optimizer step) and the next step's forward runs, which is when
    seqscope finishes step 0's record. ``device``: where the model runs and is
    recorded (the reference runs on the CPU; ``amp`` is CPU autocast, CPU only)."""
    device = device or torch.device("cpu")
    assert not (amp and device.type != "cpu")
    region = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    torch.manual_seed(0)
    cell = (PeepholeLSTM() if which.startswith("peephole") else MinimalGRU()).to(dtype)
    original = copy.deepcopy(cell)  # the reference's cell: the weights of step 0
    model = Model(cell).to(device)
    x = torch.randn(T, B, IN, dtype=torch.float64).to(dtype)
    cells = {cell: peephole_gates} if which.startswith("peephole") else [cell]
    path = tmp_path / "t.h5"
    with seqscope.watch(model, path, every=1, sequences=B, precision="full", cells=cells):
        with region():
            out = model(x.to(device))
        out = out.float() if amp else out
        (scale * (out.pow(2).sum() + out[-1].sum())).backward()
        if update_between:
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(-0.5).add_(0.25)
            with region():
                model(x.to(device))
    cell = original
    # reference: the same loop, unrolled with retain_grad on every state; norms in float64
    hs, cs, states = [], [], []
    state = (torch.zeros(B, HID, dtype=dtype), torch.zeros(B, HID, dtype=dtype)) \
        if which.startswith("peephole") else MinState(torch.zeros(B, HID, dtype=dtype))
    for t in range(T):
        states.append(state)
        with region():
            state = cell(x[t], state)
        h = state[0] if isinstance(state, tuple) else state.h
        h.retain_grad()
        hs.append(h)
        if isinstance(state, tuple):
            state[1].retain_grad()
            cs.append(state[1])
    ref_out = torch.stack(hs).float() if amp else torch.stack(hs)
    (scale * (ref_out.pow(2).sum() + ref_out[-1].sum())).backward(retain_graph=True)
    gh = [[ref.norm(h.grad[b]).item() for h in hs] for b in range(B)]
    gc = [[ref.norm(c.grad[b]).item() for c in cs] for b in range(B)]
    exact, grads_tol = (1e-12, 1e-10) if dtype == torch.float64 else (1e-6, 2e-4)
    with seqscope.open(path) as trace:
        assert trace.layers == ["cell"]
        assert trace.layer_info("cell").kind == "custom"
        for b in range(B):
            np.testing.assert_allclose(trace.hidden("cell", 0)[b].data, ref_out[:, b].detach().numpy(), rtol=exact)
            np.testing.assert_allclose(trace.grad_norms("cell", 0)["hidden"][b].data, gh[b], rtol=grads_tol)
            if cs:
                np.testing.assert_allclose(trace.grad_norms("cell", 0)["cell"][b].data, gc[b], rtol=grads_tol)
                gates = trace.gates("cell", 0)
                assert set(gates) == {"input", "forget", "cell"}
                with region():
                    want_i = torch.stack([cell.gates(x[t], states[t])[0][b] for t in range(T)]).detach()
                want_i = (want_i.float() if amp else want_i).numpy()
                np.testing.assert_allclose(gates["input"][b].data, want_i, rtol=exact)
            # propagation: the unit gradient at the last call walked back with autograd
            v = ref.unit_direction(hs[-1].grad[b])
            back = torch.autograd.grad(hs[-1][b], hs, grad_outputs=v.to(hs[-1].dtype), retain_graph=True)
            want_p = [ref.norm(gr[b]).item() for gr in back]
            np.testing.assert_allclose(trace.propagation("cell", 0)[b].data, want_p, rtol=grads_tol)
        want_sigma = torch.linalg.svdvals(cell.weight_hh.detach().double())[0].item()
        assert trace.scalars()["sigma_max/cell"].values[0] == pytest.approx(want_sigma, rel=1e-6)


@pytest.mark.parametrize("which", ["peephole-tuple-state", "minimal-dataclass-state"])
def test_a_custom_cell_loop_run_on_two_inputs_before_one_backward_pass(which, tmp_path):
    """A siamese model: the loop runs on batch a, then from a zero state on batch b,
    and one loss uses both. The propagation profile is autograd's through what ran:
    from b's last call back through b's loop, zero on a's calls. Until session 20 the
    re-run chained b's first call to a's last state, so b's calls ran from states
    they never had, and the profile reached into a's loop."""
    torch.manual_seed(0)
    cell = PeepholeLSTM() if which.startswith("peephole") else MinimalGRU()
    model = Model(cell)
    a, b = torch.randn(T, B, IN, dtype=torch.float64), torch.randn(T, B, IN, dtype=torch.float64)
    path = tmp_path / "t.h5"
    cells = {cell: peephole_gates} if which.startswith("peephole") else [cell]
    with seqscope.watch(model, path, every=1, sequences=B, precision="full", cells=cells):
        ya, yb = model(a), model(b)
        (ya.pow(2).sum() + (ya - yb).pow(2).sum()).backward()
    # reference: both loops unrolled with retain_grad on every h_t
    hs = []
    for x in (a, b):
        state = (torch.zeros(B, HID, dtype=torch.float64), torch.zeros(B, HID, dtype=torch.float64)) \
            if which.startswith("peephole") else MinState(torch.zeros(B, HID, dtype=torch.float64))
        for t in range(T):
            state = cell(x[t], state)
            h = state[0] if isinstance(state, tuple) else state.h
            h.retain_grad()
            hs.append(h)
    ra, rb = torch.stack(hs[:T]), torch.stack(hs[T:])
    (ra.pow(2).sum() + (ra - rb).pow(2).sum()).backward(retain_graph=True)
    with seqscope.open(path) as trace:
        profiles = check_chain(trace, hs)
    assert all(list(p[:T]) == [0.0] * T for p in profiles)  # nothing flows back into a's loop


def check_chain(trace: Any, hs: list[torch.Tensor]) -> list[np.ndarray]:
    """Step 0 of the custom cell "cell" in ``trace`` against the reference's h_t
    (float64, ``retain_grad``, after the loss's backward with ``retain_graph``): its
    hidden states, gradient norms, and propagation profile, which is autograd's from
    the last h_t back (zero where nothing flows). Returns the reference profiles."""
    assert list(trace.steps) == [0]
    profiles = []
    for b in range(hs[0].shape[0]):
        np.testing.assert_allclose(trace.hidden("cell", 0)[b].data, torch.stack(hs)[:, b].detach().numpy(),
                                   rtol=1e-12)
        np.testing.assert_allclose(trace.grad_norms("cell", 0)["hidden"][b].data,
                                   [ref.norm(h.grad[b]).item() for h in hs], rtol=1e-10)
        v = ref.unit_direction(hs[-1].grad[b])
        back = torch.autograd.grad(hs[-1][b], hs, grad_outputs=v, retain_graph=True, allow_unused=True)
        profiles.append(np.array([0.0 if g is None else ref.norm(g[b]).item() for g in back]))
        np.testing.assert_allclose(trace.propagation("cell", 0)[b].data, profiles[-1], rtol=1e-10, atol=1e-300)
    return profiles


class _NormedGRU(nn.Module):
    """A user-written cell around an nn.GRUCell (which seqscope records too): layer
    normalisation of the GRU's output; the state is a 1-tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.GRUCell(IN, HID).double()
        self.norm = nn.LayerNorm(HID).double()

    def forward(self, x, state):
        return (self.norm(self.inner(x, state[0])),)


def test_a_custom_cell_loop_written_in_the_training_script_records_each_step(tmp_path):
    """The training script runs the loop over timesteps, calling the watched model's
    custom cell itself (the model is an nn.ModuleDict, without a forward): each forward
    and backward pass is one step. Three SGD steps, every one recorded; the custom
    cell's h_t and ||dL/dh_t||, and those of the nn.GRUCell inside it, equal the
    unrolled loop's on the weights each step ran with. The re-run of the custom cell
    that seqscope makes after each step calls the inner GRUCell again: that re-run is
    no new step and adds no timestep to the GRUCell's record (it once recursed
    without end)."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"cell": _NormedGRU(), "head": nn.Linear(HID, 1).double()})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    path = tmp_path / "t.h5"
    steps = []
    with seqscope.watch(model, path, every=1, sequences=B, precision="full", cells=[model["cell"]]):
        for _ in range(3):
            x = torch.randn(T, B, IN, generator=g, dtype=torch.float64)
            steps.append((copy.deepcopy(model), x))
            state = (torch.zeros(B, HID, dtype=torch.float64),)
            for t in range(T):
                state = model["cell"](x[t], state)
            model["head"](state[0]).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
    with seqscope.open(path) as trace:
        assert list(trace.steps) == [0, 1, 2]
        assert sorted(trace.layers) == ["cell", "cell.inner"]
        for step, (before, x) in enumerate(steps):
            # the reference: the same loop on the step's weights, unrolled with retain_grad
            inner_h, outer_h = [], []
            h = torch.zeros(B, HID, dtype=torch.float64)
            for t in range(T):
                a = before["cell"].inner(x[t], h)
                h = before["cell"].norm(a)
                for t_, lst in ((a, inner_h), (h, outer_h)):
                    t_.retain_grad()
                    lst.append(t_)
            before["head"](h).pow(2).sum().backward()
            for name, hs in (("cell", outer_h), ("cell.inner", inner_h)):
                want_h = torch.stack(hs, dim=1).detach().numpy()  # [sequence, time, unit]
                np.testing.assert_allclose(trace.hidden(name, step).data, want_h, rtol=1e-12, atol=1e-14)
                want_g = np.array([[ref.norm(t_.grad[b]).item() for t_ in hs] for b in range(B)])
                np.testing.assert_allclose(trace.grad_norms(name, step)["hidden"].data, want_g, rtol=1e-10)


def test_dict_state_is_flattened():
    from seqscope.capture.cells import flatten_state

    h, c = torch.zeros(2, 3), torch.ones(2, 3)
    tensors, rebuild = flatten_state({"h": h, "c": c})
    assert tensors[0] is h and tensors[1] is c
    rebuilt = rebuild([c, h])
    assert rebuilt["h"] is c and rebuilt["c"] is h


def test_custom_cell_errors(tmp_path):
    with pytest.raises(UnsupportedModelError, match="not a submodule"):
        seqscope.watch(Model(MinimalGRU()), tmp_path / "a.h5", cells=[MinimalGRU()])
    with pytest.raises(UnsupportedModelError, match="cell modules themselves"):
        seqscope.watch(Model(MinimalGRU()), tmp_path / "b.h5", cells=["cell"])
    cell = MinimalGRU()  # the model itself as its cell: each call would be a step, and its replay recursed
    with pytest.raises(UnsupportedModelError, match="the watched model itself"):
        seqscope.watch(cell, tmp_path / "c.h5", cells=[cell])


def test_unsupported_state_is_reported_and_training_goes_on(tmp_path, caplog):
    class OddCell(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(IN, HID)

        def forward(self, x, state):
            return [torch.tanh(self.lin(x)), "not a tensor"]  # a list with a string: not a state

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = OddCell()
            self.rnn = nn.GRU(IN, HID)

        def forward(self, x):
            self.cell(x[0], None)
            return self.rnn(x)[0]

    model = M()
    with seqscope.watch(model, tmp_path / "t.h5", every=1, cells=[model.cell]):
        for _ in range(2):
            model(torch.randn(T, B, IN)).sum().backward()
    assert any("holds no tensors seqscope can find" in r.getMessage() for r in caplog.records)
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert trace.layers == ["rnn.l0"] and list(trace.steps) == [0, 1]


def test_custom_cell_with_h_and_c_from_one_node(tmp_path, caplog):
    """A custom cell built on one fused autograd Function returning (h, c): c's
    hook misses the part of dL/dc_t that flows through h_t inside the call, which
    seqscope cannot derive for an arbitrary cell. Hidden-state norms are still
    exact; cell-state norms are left out, with one warning, never written wrong."""
    from tests.test_cells_reference import _FusedLSTMCell

    class Fused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w_ih = nn.Parameter(torch.randn(4 * HID, IN, dtype=torch.float64) * 0.5)
            self.w_hh = nn.Parameter(torch.randn(4 * HID, HID, dtype=torch.float64) * 0.5)

        def forward(self, x, state):
            return _FusedLSTMCell.apply(x, state[0], state[1], self.w_ih, self.w_hh, None, None)

    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = Fused()

        def forward(self, x):
            state = (torch.zeros(B, HID, dtype=torch.float64), torch.zeros(B, HID, dtype=torch.float64))
            hs = []
            for t in range(T):
                state = self.cell(x[t], state)
                hs.append(state[0])
            return hs

    torch.manual_seed(0)
    model = Loop()
    cell = model.cell
    x = torch.randn(T, B, IN, dtype=torch.float64)

    with caplog.at_level("WARNING", logger="seqscope"):
        with seqscope.watch(model, tmp_path / "t.h5", every=1, sequences=B, precision="full", cells=[cell]):
            torch.stack(model(x)).pow(2).sum().backward()
    assert sum("one autograd node" in r.getMessage() for r in caplog.records) == 1
    hs = model(x)
    for h in hs:
        h.retain_grad()
    torch.stack(hs).pow(2).sum().backward()
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert "cell" not in trace.grad_norms("cell", 0)
        for b in range(B):
            want = [ref.norm(h.grad[b]).item() for h in hs]
            np.testing.assert_allclose(trace.grad_norms("cell", 0)["hidden"][b].data, want, rtol=1e-10)


def sgd_steps(model: nn.Module, x: torch.Tensor, path, steps: int = 4, **watch: Any) -> list[float]:
    """``steps`` SGD steps (lr 0.1) on the sum of squares of ``model(x)``, every one
    recorded into ``path`` by seqscope (``watch``: more arguments of seqscope.watch),
    or not watched at all when ``path`` is None; the losses."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    scope = seqscope.watch(model, path, every=1, **watch) if path is not None else None
    with scope if scope is not None else contextlib.nullcontext():
        for _ in range(steps):
            loss = model(x).pow(2).sum()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    return losses


class _CellWith(nn.Module):
    """An Elman cell with one part that has state or randomness in training mode:
    batch normalisation of the pre-activation (recurrent batch norm), dropout, or
    a spectral norm on the recurrent weight (a power iteration at every call)."""

    def __init__(self, extra: str) -> None:
        super().__init__()
        self.ih = nn.Linear(IN, HID).double()
        self.hh = nn.Linear(HID, HID, bias=False).double()
        self.bn = nn.BatchNorm1d(HID).double() if extra == "batchnorm" else None
        self.drop = nn.Dropout(0.3) if extra == "dropout" else None
        if extra in ("spectral_norm", "orthogonal", "weight_norm"):
            getattr(nn.utils.parametrizations, extra)(self.hh, "weight")

    def pre(self, x, h):
        a = self.ih(x) + self.hh(h)
        if self.bn is not None:
            a = self.bn(a)
        return self.drop(a) if self.drop is not None else a

    def forward(self, x, h):
        return torch.tanh(self.pre(x, h))


class _ElmanLoop(nn.Module):
    def __init__(self, extra: str) -> None:
        super().__init__()
        self.cell = _CellWith(extra)

    def forward(self, x):
        h = torch.zeros(x.shape[1], HID, dtype=x.dtype, device=x.device)
        outs = []
        for t in range(x.shape[0]):
            h = self.cell(x[t], h)
            outs.append(h)
        return torch.stack(outs)


def _pre_gate(cell, x, h):
    """A gates function that runs the cell's batch norm, dropout or power iteration once more."""
    return {"pre": torch.sigmoid(cell.pre(x, h))}


SIDE_EFFECTS = [(extra, gates) for extra in ("batchnorm", "dropout", "spectral_norm") for gates in (False, True)]


@pytest.mark.parametrize("extra,with_gates", SIDE_EFFECTS,
                         ids=[e + ("-gates-function" if g else "") for e, g in SIDE_EFFECTS])
def test_watching_a_custom_cell_leaves_its_training_unchanged(extra, with_gates, tmp_path):
    """seqscope runs a user's cell again after each recorded step (the propagation
    profile) and calls its gates function at each call. Until session 15 those
    runs, in training mode, updated the model's batch-norm statistics and its
    spectral norm's vectors, and drew from the random number generator that
    training draws its dropout masks from: a watched run trained differently.
    Four SGD steps, watched and not: bit-identical losses, parameters, buffers and
    random stream afterwards; and the watched run recorded every step."""
    check_training_unchanged(extra, with_gates, tmp_path, torch.device("cpu"))


def check_training_unchanged(extra: str, with_gates: bool, tmp_path, device: torch.device) -> None:
    """On the CPU bit for bit; on a GPU to 1e-6 (a different dropout draw would be
    ~1e-1 off)."""

    def train(watched: bool):
        torch.manual_seed(0)
        model = _ElmanLoop(extra).to(device)
        x = torch.randn(T, B, IN, dtype=torch.float64).to(device)
        cells = {model.cell: _pre_gate} if with_gates else [model.cell]
        losses = sgd_steps(model, x, tmp_path / "t.h5" if watched else None, cells=cells)
        return losses, model.state_dict(), torch.rand(4, device=device)

    want_losses, want_state, want_next = train(watched=False)
    losses, state, following = train(watched=True)
    exact = device.type == "cpu"
    if exact:
        assert losses == want_losses
    else:
        np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
    assert set(state) == set(want_state)
    for name, value in want_state.items():
        if exact or not value.is_floating_point():
            assert torch.equal(state[name], value), name
        else:
            torch.testing.assert_close(state[name], value, rtol=1e-6, atol=1e-9, msg=name)
    assert torch.equal(following, want_next)
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert list(trace.steps) == [0, 1, 2, 3]
        for step in trace.steps:
            profile = trace.propagation("cell", step)
            assert np.isfinite(profile).all()
            np.testing.assert_allclose(profile[:, -1], 1.0, rtol=1e-12)
            if with_gates:
                assert set(trace.gates("cell", step)) == {"pre"}


@pytest.mark.parametrize("how", ["orthogonal", "weight_norm"])
def test_a_custom_cells_parametrized_recurrent_weight_gives_the_sigma_max_of_its_value(how, tmp_path):
    """A custom cell whose recurrent weight is parametrized reads it as ``hh.weight``,
    computed at each call from ``hh.parametrizations.weight.original*``. sigma_max
    is that of the computed weight (orthogonal: 1), not of the original it is
    computed from (until session 15 it was the original's)."""
    torch.manual_seed(0)
    model = _ElmanLoop(how)
    with torch.no_grad():
        for p in model.cell.hh.parametrizations.weight.parameters():
            p.mul_(3.0)  # originals far from their computed value
    x = torch.randn(T, B, IN, dtype=torch.float64)
    with seqscope.watch(model, tmp_path / "t.h5", every=1, cells=[model.cell]):
        model(x).pow(2).sum().backward()
        used = model.cell.hh.weight.detach().clone()
    want = torch.linalg.svdvals(used)[0].item()
    # what was recorded before: the first 2-D parameter named like a recurrent weight, an original
    first = next(p for name, p in model.cell.named_parameters() if p.dim() == 2 and "hh" in name)
    assert abs(torch.linalg.svdvals(first.detach())[0].item() - want) > 1e-2 * want
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert trace.scalars()["sigma_max/cell"].values[0] == pytest.approx(want, rel=1e-9)


def test_the_propagation_re_run_does_not_call_the_cells_forward_hooks(tmp_path):
    """A forward hook of the user's on a custom cell (one that collects activations
    for an activation penalty, say) sees the training run's calls only, not
    seqscope's re-run of the cell after each recorded step (until session 15 it saw
    every re-run call too, and such a penalty changed)."""
    torch.manual_seed(0)
    model = _ElmanLoop("none")
    x = torch.randn(T, B, IN, dtype=torch.float64)
    seen = []
    model.cell.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    with seqscope.watch(model, tmp_path / "t.h5", every=1, cells=[model.cell]):
        for _ in range(3):
            seen.clear()
            model(x).pow(2).sum().backward()
            assert len(seen) == T
    assert len(seen) == T  # closing the scope finishes the last step without calling the hook
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert list(trace.steps) == [0, 1, 2]
        np.testing.assert_allclose(trace.propagation("cell", 2)[:, -1], 1.0, rtol=1e-12)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("with_gates", [False, True], ids=["", "gates-function"])
def test_seqscopes_re_runs_call_none_of_the_users_hooks_on_the_cells_submodules(with_gates, tmp_path):
    """Hooks of the user's on a submodule of a custom cell, and process-wide module
    hooks, see the training run's calls only: not seqscope's re-run of the cell after
    each recorded step, nor its gates function's calls. A forward hook collecting
    activations for an activation penalty (AWD-LSTM's pattern) made the watched run
    fail at its second backward pass until session 18: the re-run's outputs, whose
    graph seqscope's own backward pass had freed, landed in the penalty. Four SGD
    steps, watched and not: bit-identical losses and the same hook calls."""
    import torch.nn.modules.module as module_mod

    def train(path):
        torch.manual_seed(0)
        model = _ElmanLoop("none")
        acts: list[torch.Tensor] = []
        calls = {"pre": 0, "backward": 0, "global": 0}
        model.cell.hh.register_forward_hook(lambda module, args, out: acts.append(out))
        model.cell.hh.register_forward_pre_hook(lambda module, args: calls.__setitem__("pre", calls["pre"] + 1))
        model.cell.hh.register_full_backward_hook(
            lambda module, gi, go: calls.__setitem__("backward", calls["backward"] + 1))
        every = module_mod.register_module_forward_hook(
            lambda module, args, out: calls.__setitem__("global", calls["global"] + 1))
        x = torch.randn(T, B, IN, dtype=torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        cells = {model.cell: _pre_gate} if with_gates else [model.cell]
        losses = []
        scope = seqscope.watch(model, path, every=1, cells=cells) if path is not None else None
        try:
            with scope if scope is not None else contextlib.nullcontext():
                for _ in range(4):
                    acts.clear()
                    out = model(x)
                    assert len(acts) == T
                    loss = out.pow(2).sum() + 0.1 * sum(a.pow(2).mean() for a in acts)
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                    losses.append(loss.item())
        finally:
            every.remove()
        return losses, calls, model.state_dict()

    want_losses, want_calls, want_state = train(None)
    losses, calls, state = train(tmp_path / "t.h5")
    assert losses == want_losses
    assert calls == want_calls
    for name, value in want_state.items():
        assert torch.equal(state[name], value), name
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert list(trace.steps) == [0, 1, 2, 3]
        if with_gates:
            assert set(trace.gates("cell", 3)) == {"pre"}
        np.testing.assert_allclose(trace.propagation("cell", 3)[:, -1], 1.0, rtol=1e-12)


def test_a_pruned_weight_in_a_custom_cell_is_computed_in_the_re_run_from_the_steps_parameters(tmp_path):
    """torch.nn.utils.prune computes a submodule's weight in a forward pre-hook from
    ``weight_orig`` and its mask. seqscope's re-run for the propagation profile keeps
    that pre-hook (its other hooks do not run): the profile is that of the weight the
    step's calls used, although the optimizer changed ``weight_orig`` and a call of the
    cell outside the loop (under no_grad) computed the weight anew before the step's
    record was finished."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = _ElmanLoop("none")
    before = copy.deepcopy(model.cell)  # the reference's cell: step 0's weights, pruned alike
    for cell in (model.cell, before):
        prune.l1_unstructured(cell.hh, "weight", amount=0.5)
    x = torch.randn(T, B, IN, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with seqscope.watch(model, tmp_path / "t.h5", every=1, sequences=B, precision="full", cells=[model.cell]):
        model(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            model.cell(x[0], torch.zeros(B, HID, dtype=torch.float64))  # the weight computed anew
        model(x).pow(2).sum().backward()
    hs = []
    h = torch.zeros(B, HID, dtype=torch.float64)
    for t in range(T):
        h = before(x[t], h)
        h.retain_grad()
        hs.append(h)
    torch.stack(hs).pow(2).sum().backward(retain_graph=True)
    with seqscope.open(tmp_path / "t.h5") as trace:
        profile = trace.propagation("cell", 0)
        for b in range(B):
            v = ref.unit_direction(hs[-1].grad[b])
            back = torch.autograd.grad(hs[-1][b], hs, grad_outputs=v, retain_graph=True)
            np.testing.assert_allclose(profile[b].data, [ref.norm(g[b]).item() for g in back], rtol=1e-10)


class _AttendingCell(nn.Module):
    """A decoder cell called with more than (x_t, state): a mask (positional), the
    timestep (an int) and an attention memory (keyword), as attention decoders are."""

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Linear(IN + 2 * HID, HID).double()
        self.seen: list[int] = []

    def forward(self, x, h, mask, t, memory=None):
        if h is None:  # the first call of a loop that starts from None
            h = x.new_zeros(x.shape[0], HID)
        scores = torch.softmax((memory * h.unsqueeze(1)).sum(-1), dim=-1)  # [batch, source]
        self.last_scores = scores.detach()  # kept for a plot, as attention decoders do
        self.seen.append(t)
        context = (scores.unsqueeze(-1) * memory).sum(1)
        return torch.tanh(self.W(torch.cat([x, h, context], -1))) * mask + 0.01 * t


@pytest.mark.parametrize("first_state", ["zeros", "None"])
def test_a_cell_called_with_more_arguments_is_re_run_with_them(first_state, tmp_path):
    """A user-written cell that takes arguments beyond (x_t, state): seqscope's re-run
    for the propagation profile failed without them (TypeError), and the whole step
    was dropped, every step, the other layers' records too (until session 18). Now
    the re-run gets each call's arguments as the call had them, and the record equals
    the unrolled reference with those arguments held fixed. What the cell keeps in its
    attributes (the last attention scores, the timesteps it saw) is the training
    loop's after each step, not the re-run's (2 of 3 sequences stored)."""
    torch.manual_seed(0)
    cell = _AttendingCell()
    gru = nn.GRU(IN, HID).double()
    model = nn.ModuleDict({"cell": cell, "gru": gru})
    x = torch.randn(T, B, IN, dtype=torch.float64)
    memory = torch.randn(B, 5, HID, dtype=torch.float64)
    masks = [(torch.rand(B, HID, generator=torch.Generator().manual_seed(t)) > 0.2).double() for t in range(T)]
    original = copy.deepcopy(cell)

    def loop(c, keep=None):
        c.seen.clear()
        h = torch.zeros(B, HID, dtype=torch.float64) if first_state == "zeros" else None
        for t in range(T):
            h = c(x[t], h, masks[t], t, memory=memory)
            if keep is not None:
                h.retain_grad()
                keep.append(h)
        return h

    with seqscope.watch(model, tmp_path / "t.h5", every=1, sequences=2, precision="full", cells=[cell]):
        for _ in range(3):
            (loop(cell).pow(2).sum() + gru(x)[0].pow(2).sum()).backward()
            assert cell.seen == list(range(T)) and cell.last_scores.shape == (B, 5)
            cell.seen.append("the user's")
    assert cell.seen == [*range(T), "the user's"] and cell.last_scores.shape == (B, 5)  # after the last re-run
    hs: list[torch.Tensor] = []
    loop(original, hs).pow(2).sum().backward(retain_graph=True)  # the reference
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert list(trace.steps) == [0, 1, 2] and sorted(trace.layers) == ["cell", "gru.l0"]
        prop = trace.propagation("cell", 0)
        assert prop.data.shape == (2, T)
        for b in range(2):
            np.testing.assert_allclose(trace.hidden("cell", 0)[b].data,
                                       torch.stack(hs)[:, b].detach().numpy(), rtol=1e-12)
            np.testing.assert_allclose(trace.grad_norms("cell", 0)["hidden"][b].data,
                                       [ref.norm(h.grad[b]).item() for h in hs], rtol=1e-10)
            v = ref.unit_direction(hs[-1].grad[b])
            back = torch.autograd.grad(hs[-1][b], hs, grad_outputs=v, retain_graph=True)
            np.testing.assert_allclose(prop[b].data, [ref.norm(g[b]).item() for g in back], rtol=1e-10)


def test_a_cell_that_cannot_be_re_run_is_recorded_without_its_profile(tmp_path, caplog):
    """A cell whose forward cannot run again outside the training loop (here: it
    counts its calls and refuses more than the loop makes) still gets its states and
    gradient norms recorded, and the other layers their whole record; its
    propagation profile is missing, said once. Training is unchanged."""

    class OnceOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.W = nn.Linear(IN + HID, HID).double()
            self.calls = 0

        def forward(self, x, h):
            self.calls += 1
            if self.calls > T:
                raise RuntimeError("called more often than the loop calls me")
            return torch.tanh(self.W(torch.cat([x, h], -1)))

    torch.manual_seed(0)
    model = nn.ModuleDict({"cell": OnceOnly(), "gru": nn.GRU(IN, HID).double()})
    x = torch.randn(T, B, IN, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="seqscope"):
        with seqscope.watch(model, tmp_path / "t.h5", every=1, cells=[model["cell"]]):
            for _ in range(3):
                model["cell"].calls = 0
                h = torch.zeros(B, HID, dtype=torch.float64)
                for t in range(T):
                    h = model["cell"](x[t], h)
                (h.pow(2).sum() + model["gru"](x)[0].pow(2).sum()).backward()
    said = [r.getMessage() for r in caplog.records if "no propagation profile" in r.getMessage()]
    assert len(said) == 1 and "called more often" in said[0]
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert list(trace.steps) == [0, 1, 2]
        for step in trace.steps:
            assert np.isfinite(trace.grad_norms("cell", step)["hidden"].data).all()
            assert np.isfinite(trace.propagation("gru.l0", step).data).all()


class _PairLSTM(nn.Module):
    """An LSTM cell in the convention of PyTorch's scripted-LSTM examples: it returns
    ``(output, (h, c))``, not the state alone."""

    def __init__(self) -> None:
        super().__init__()
        self.weight_ih = nn.Parameter(torch.randn(4 * HID, IN, dtype=torch.float64) * 0.5)
        self.weight_hh = nn.Parameter(torch.randn(4 * HID, HID, dtype=torch.float64) * 0.5)
        self.bias = nn.Parameter(torch.randn(4 * HID, dtype=torch.float64) * 0.1)

    def forward(self, x, state):
        h, c = state
        i, f, g, o = (x @ self.weight_ih.T + h @ self.weight_hh.T + self.bias).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, (h, c)


def test_a_cell_that_returns_its_output_and_its_state_is_recorded(tmp_path):
    """``out, state = cell(x_t, state)``: the state is the second item. seqscope said
    it found no tensors in such a cell's return value and did not record it (until
    session 18). Hidden and cell states, both gradient norms, the propagation profile
    and sigma_max against the unrolled reference."""
    torch.manual_seed(0)
    cell = _PairLSTM()
    model = nn.ModuleDict({"cell": cell})
    x = torch.randn(T, B, IN, dtype=torch.float64)
    original = copy.deepcopy(cell)

    def loop(c, hs=None, cs=None):
        state = (torch.zeros(B, HID, dtype=torch.float64), torch.zeros(B, HID, dtype=torch.float64))
        outs = []
        for t in range(T):
            out, state = c(x[t], state)
            if hs is not None:
                for kept, tensor in ((hs, state[0]), (cs, state[1])):
                    tensor.retain_grad()
                    kept.append(tensor)
            outs.append(out)
        return torch.stack(outs)

    with seqscope.watch(model, tmp_path / "t.h5", every=1, sequences=B, precision="full", cells=[cell]):
        loop(cell).pow(2).sum().backward()
    hs: list[torch.Tensor] = []
    cs: list[torch.Tensor] = []
    loop(original, hs, cs).pow(2).sum().backward(retain_graph=True)  # the reference
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert trace.layers == ["cell"] and list(trace.steps) == [0]
        grads = trace.grad_norms("cell", 0)
        for b in range(B):
            np.testing.assert_allclose(trace.hidden("cell", 0)[b].data, torch.stack(hs)[:, b].detach().numpy(),
                                       rtol=1e-12)
            np.testing.assert_allclose(trace.cell("cell", 0)[b].data, torch.stack(cs)[:, b].detach().numpy(),
                                       rtol=1e-12)
            np.testing.assert_allclose(grads["hidden"][b].data, [ref.norm(h.grad[b]).item() for h in hs], rtol=1e-10)
            np.testing.assert_allclose(grads["cell"][b].data, [ref.norm(c.grad[b]).item() for c in cs], rtol=1e-10)
            v = ref.unit_direction(hs[-1].grad[b])
            back = torch.autograd.grad(hs[-1][b], hs, grad_outputs=v, retain_graph=True)
            np.testing.assert_allclose(trace.propagation("cell", 0)[b].data, [ref.norm(g[b]).item() for g in back],
                                       rtol=1e-10)
        want_sigma = torch.linalg.svdvals(original.weight_hh.detach())[0].item()
        assert trace.scalars()["sigma_max/cell"].values[0] == pytest.approx(want_sigma, rel=1e-9)


class _MemoryCell(nn.Module):
    """A decoder cell attending over an encoder memory with nn.MultiheadAttention,
    time-major ([source, batch, unit], its default) or batch-first. With ``drop``,
    dropout on the attention's context (training mode)."""

    def __init__(self, batch_first: bool, drop: bool = False) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.attention = nn.MultiheadAttention(HID, 2, batch_first=batch_first).double()
        self.W = nn.Linear(IN + 2 * HID, HID).double()
        self.drop = nn.Dropout(0.5) if drop else nn.Identity()

    def forward(self, x, h, memory):
        query = h.unsqueeze(1 if self.batch_first else 0)
        context, _ = self.attention(query, memory, memory)
        context = context[:, 0] if self.batch_first else context[0]
        return torch.tanh(self.W(torch.cat([x, h, self.drop(context)], -1)))


def _memory_loop(cell, x, memory, hs=None):
    h = torch.zeros(B, HID, dtype=torch.float64, device=x.device)
    for t in range(T):
        h = cell(x[t], h, memory)
        if hs is not None:
            h.retain_grad()
            hs.append(h)
    return h


MEMORIES = [(False, 7), (False, B), (True, B)]


@pytest.mark.parametrize("batch_first,sources", MEMORIES, ids=["time-major", "time-major-square", "batch-first-square"])
def test_a_memory_argument_is_re_run_with_the_stored_sequences_rows(batch_first, sources, tmp_path):
    """A further argument laid out [source, batch, ...] (time-major) is K-selected
    along its second dimension for the re-run (session 18). One [batch, batch, ...]
    (as many sources as sequences): which dimension holds the sequences cannot be
    told from its shape. Until session 19 seqscope took the first, so a time-major
    one gave the re-run the wrong rows, and a propagation profile of another
    computation, silently. Now the first call is re-run with both, and the layout
    that reproduces the call's output is used. The profile against the unrolled
    reference (2 of 3 sequences stored)."""
    check_memory_argument(batch_first, sources, tmp_path, torch.device("cpu"))


def check_memory_argument(batch_first: bool, sources: int | None, tmp_path, device: torch.device) -> None:
    """The memory-attending cell on ``device``, recorded; the reference on the CPU.
    ``sources=None``: as many as the batch's sequences."""
    sources = B if sources is None else sources
    torch.manual_seed(0)
    original = _MemoryCell(batch_first)
    cell = copy.deepcopy(original).to(device)
    model = nn.ModuleDict({"cell": cell})
    x = torch.randn(T, B, IN, dtype=torch.float64)
    memory = torch.randn(B, sources, HID, dtype=torch.float64) if batch_first else \
        torch.randn(sources, B, HID, dtype=torch.float64)
    with seqscope.watch(model, tmp_path / "t.h5", every=1, sequences=[2, 0], precision="full", cells=[cell]):
        _memory_loop(cell, x.to(device), memory.to(device)).pow(2).sum().backward()
    hs: list[torch.Tensor] = []
    _memory_loop(original, x, memory, hs).pow(2).sum().backward(retain_graph=True)  # the reference
    with seqscope.open(tmp_path / "t.h5") as trace:
        prop = trace.propagation("cell", 0)
        assert prop.data.shape == (2, T)
        for row, b in enumerate([2, 0]):
            v = ref.unit_direction(hs[-1].grad[b])
            back = torch.autograd.grad(hs[-1][b], hs, grad_outputs=v, retain_graph=True)
            np.testing.assert_allclose(prop[row].data, [ref.norm(g[b]).item() for g in back],
                                       rtol=1e-10 if device.type == "cpu" else 1e-8)


def test_a_square_memory_whose_layout_cannot_be_settled_costs_the_profile_only(tmp_path, caplog):
    """Where neither layout reproduces the call's output (here a dropout whose mask
    the re-run does not draw again), the layer is recorded without its propagation
    profile, said once; its states and gradient norms, and the other layers, are
    recorded as always."""
    torch.manual_seed(0)
    cell = _MemoryCell(batch_first=False, drop=True)
    model = nn.ModuleDict({"cell": cell, "gru": nn.GRU(IN, HID).double()})
    x = torch.randn(T, B, IN, dtype=torch.float64)
    memory = torch.randn(B, B, HID, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="seqscope"):
        with seqscope.watch(model, tmp_path / "t.h5", every=1, sequences=[2, 0], cells=[cell]):
            for _ in range(2):
                (_memory_loop(cell, x, memory).pow(2).sum() + model["gru"](x)[0].pow(2).sum()).backward()
    said = [r.getMessage() for r in caplog.records if "no propagation profile" in r.getMessage()]
    assert len(said) == 1 and "both the batch size" in said[0], said
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert list(trace.steps) == [0, 1]
        for step in trace.steps:
            assert not trace.has("cell", step, "propagation")
            assert np.isfinite(trace.grad_norms("cell", step)["hidden"].data).all()
            assert np.isfinite(trace.propagation("gru.l0", step).data).all()


class _CheckpointedElman(nn.Module):
    """An Elman loop over a cell of one's own, each call in a reentrant checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = _CellWith("none")

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = torch.zeros(x.shape[1], HID, dtype=x.dtype)
        outs = []
        for t in range(x.shape[0]):
            h = checkpoint(self.cell, x[t], h, use_reentrant=True)
            outs.append(h)
        return torch.stack(outs)


def test_a_custom_cell_checkpointed_call_by_call_is_recorded_in_time_order(tmp_path):
    """Each call in its own torch.utils.checkpoint(use_reentrant=True): the calls
    that seqscope sees are the recomputations in the backward pass, from the last
    timestep to the first. Recorded states, gradient norms and the propagation
    profile in time order, against the unrolled reference (until session 19: reversed)."""
    torch.manual_seed(0)
    model = _CheckpointedElman()
    original = copy.deepcopy(model.cell)
    x = torch.randn(T, B, IN, dtype=torch.float64, requires_grad=True)
    with seqscope.watch(model, tmp_path / "t.h5", every=1, sequences=B, precision="full", cells=[model.cell]):
        model(x).pow(2).sum().backward()
    hs = []
    h = torch.zeros(B, HID, dtype=torch.float64)
    for t in range(T):
        h = original(x[t].detach(), h)
        h.retain_grad()
        hs.append(h)
    torch.stack(hs).pow(2).sum().backward(retain_graph=True)
    with seqscope.open(tmp_path / "t.h5") as trace:
        check_chain(trace, hs)


def test_two_sequences_through_one_checkpointed_cell_are_recorded_in_the_forward_order(tmp_path):
    """Two sequences through one cell in one forward pass (a siamese encoder), each
    call in a reentrant checkpoint: the recomputations come from the last call
    backwards across both loops. Recorded in the order of the forward pass, as
    without checkpointing: the first sequence's timesteps, then the second's; the
    states and the gradient norms against the unrolled reference."""
    class Siamese(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = _CheckpointedElman()

        def forward(self, a, b):
            return (self.enc(a) - self.enc(b)).pow(2).sum()

    torch.manual_seed(0)
    model = Siamese()
    original = copy.deepcopy(model.enc.cell)
    x = torch.randn(T, B, IN, dtype=torch.float64, requires_grad=True)
    y = torch.randn(T, B, IN, dtype=torch.float64, requires_grad=True)
    with seqscope.watch(model, tmp_path / "t.h5", every=1, sequences=B, precision="full", cells=[model.enc.cell]):
        model(x, y).backward()
    hs: list[torch.Tensor] = []
    outs = []
    for inputs in (x, y):
        h = torch.zeros(B, HID, dtype=torch.float64)
        seq = []
        for t in range(T):
            h = original(inputs[t].detach(), h)
            h.retain_grad()
            hs.append(h)
            seq.append(h)
        outs.append(torch.stack(seq))
    (outs[0] - outs[1]).pow(2).sum().backward()
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert list(trace.steps) == [0]
        hidden = trace.hidden("enc.cell", 0)
        assert hidden.shape[:2] == (B, 2 * T)
        for b in range(B):
            np.testing.assert_allclose(hidden[b].data, torch.stack(hs)[:, b].detach().numpy(), rtol=1e-12)
            np.testing.assert_allclose(trace.grad_norms("enc.cell", 0)["hidden"][b].data,
                                       [ref.norm(h.grad[b]).item() for h in hs], rtol=1e-10)


def test_a_custom_cells_propagation_that_vanishes_below_float32s_range_has_no_subnormal_numbers(tmp_path):
    """A user-written float32 cell whose gradients vanish: the propagation profile
    (autograd over a re-run of the cell) passes through float32's subnormal range,
    ~20 times slower per operation on x86, and is computed with such numbers
    flushed to zero, as the scans are (test_native). Against an unrolled float64
    autograd reference: equal above 1e-27, at most that below, never subnormal; the
    training thread's floating-point mode is the same afterwards."""
    torch.manual_seed(0)
    model = _ElmanLoop("none").float()
    cell = model.cell
    with torch.no_grad():
        cell.hh.weight.mul_(0.05)
    x = torch.randn(90, 2, IN)
    path = tmp_path / "vanishing.h5"
    with seqscope.watch(model, path, every=1, sequences=2, cells=[cell]):
        model(x).pow(2).sum().backward()
    assert not ref.flushes_subnormals()  # the mode is the caller's again

    double = copy.deepcopy(cell).double()
    hs = []
    h = torch.zeros(2, HID, dtype=torch.float64)
    for t in range(x.shape[0]):
        h = double(x[t].double(), h)
        hs.append(h)
    with seqscope.open(path) as trace:
        for b in range(2):
            v = ref.unit_direction(hs[-1].detach()[b] * 2)  # the loss's gradient at the last step, 2 h_T
            back = torch.autograd.grad(hs[-1][b], hs, grad_outputs=v, retain_graph=True)
            ref.check_vanishing_profile(trace.propagation("cell", 0)[b].data,
                                        np.array([ref.norm(g[b]).item() for g in back]))
