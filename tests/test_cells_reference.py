"""Cell loops (nn.LSTMCell / GRUCell / RNNCell) against plain-math references
unrolled with autograd and retain_grad on every h_t and c_t."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from torch import nn

import seqscope
from tests import reference as ref
from tests.examples_runner import run_example

T, B, IN, HID = 7, 4, 3, 5


def cell_weights(cell: nn.Module) -> dict[str, torch.Tensor]:
    w = {"w_ih": cell.weight_ih, "w_hh": cell.weight_hh}
    if cell.bias:
        w["b_ih"], w["b_hh"] = cell.bias_ih, cell.bias_hh
    return {k: v.detach().clone().requires_grad_(True) for k, v in w.items()}


def kind_of(cell: nn.Module) -> str:
    if isinstance(cell, nn.LSTMCell):
        return "lstm"
    if isinstance(cell, nn.GRUCell):
        return "gru"
    return "rnn_" + cell.nonlinearity


def make_cell(kind: str, n_in: int, n_hid: int, bias: bool = True) -> nn.Module:
    if kind == "lstm":
        c = nn.LSTMCell(n_in, n_hid, bias=bias)
    elif kind == "gru":
        c = nn.GRUCell(n_in, n_hid, bias=bias)
    else:
        c = nn.RNNCell(n_in, n_hid, bias=bias, nonlinearity=kind[4:])
    with torch.no_grad():
        for p in c.parameters():
            p.uniform_(-0.7, 0.7)
    return c.double()


class Loop(nn.Module):
    """Two stacked cells in one loop, then ``future`` steps fed from the model's own output."""

    def __init__(self, kind: str, stacked: bool, future: int, bias: bool = True) -> None:
        super().__init__()
        self.kind, self.stacked, self.future = kind, stacked, future
        self.c1 = make_cell(kind, IN, HID, bias)
        self.c2 = make_cell(kind, HID, HID, bias) if stacked else None
        self.head = nn.Linear(HID, IN).double()

    def step(self, x, s1, s2):
        s1 = self.c1(x, s1)
        top = s1[0] if self.kind == "lstm" else s1
        if self.c2 is not None:
            s2 = self.c2(top, s2)
            top = s2[0] if self.kind == "lstm" else s2
        return s1, s2, self.head(top)

    def forward(self, x):
        s1 = s2 = None
        outs = []
        for t in range(x.shape[0]):
            s1, s2, y = self.step(x[t], s1, s2)
            outs.append(y)
        for _ in range(self.future):
            s1, s2, y = self.step(outs[-1], s1, s2)
            outs.append(y)
        return torch.stack(outs)


def reference_loop(model: Loop, x):
    """The same computation in plain tensor math; every state keeps its gradient."""
    cells = [model.c1] + ([model.c2] if model.c2 is not None else [])
    ws = [cell_weights(c) for c in cells]
    head_w = model.head.weight.detach()
    head_b = model.head.bias.detach()
    kind = model.kind
    states = [[None, None] for _ in cells]
    record = [{"x": [], "h": [], "c": [], "hp": [], "cp": [], "gates": []} for _ in cells]
    outs = []
    inputs = list(x.unbind(0))

    def run(inp):
        for i, w in enumerate(ws):
            h, c = states[i]
            if h is None:
                h = torch.zeros(inp.shape[0], HID, dtype=inp.dtype)
                c = torch.zeros(inp.shape[0], HID, dtype=inp.dtype) if kind == "lstm" else None
            rec = record[i]
            rec["x"].append(inp)
            rec["hp"].append(h)
            rec["cp"].append(c)
            h, c, g = ref.cell_step(kind, inp, h, c, w)
            h.retain_grad()
            if c is not None:
                c.retain_grad()
            rec["h"].append(h)
            rec["c"].append(c)
            rec["gates"].append(g)
            states[i] = [h, c]
            inp = h
        return inp @ head_w.T + head_b

    for xt in inputs:
        outs.append(run(xt))
    for _ in range(model.future):
        outs.append(run(outs[-1]))
    return torch.stack(outs), record, ws


def own_recurrence_profile(kind, w, rec, b):
    """||(dh_T/dh_t)^T v|| through the cell's own recurrence (inputs held fixed)."""
    n = len(rec["h"])
    hs, h = [], rec["hp"][0][b].detach().clone()
    c = rec["cp"][0][b].detach().clone() if kind == "lstm" else None
    wd = {k: v.detach() for k, v in w.items()}
    h = h.requires_grad_(True)
    for t in range(n):
        h, c, _ = ref.cell_step(kind, rec["x"][t][b].detach(), h, c, wd)
        hs.append(h)
    v = ref.unit_direction(rec["h"][-1].grad[b])
    grads = torch.autograd.grad(hs[-1], hs, grad_outputs=v, allow_unused=True)
    return np.array([0.0 if gr is None else ref.norm(gr).item() for gr in grads])


CASES = [(k, s, f) for k in ("lstm", "gru", "rnn_tanh", "rnn_relu") for (s, f) in ((False, 0), (True, 3))]


@pytest.mark.parametrize("kind,stacked,future", CASES,
                         ids=[f"{k}-{'stacked-future' if s else 'single'}" for k, s, f in CASES])
def test_cell_loop_matches_reference(kind, stacked, future, tmp_path, scan_path):
    check_cell_loop(kind, stacked, future, tmp_path, torch.device("cpu"))


class _FusedLSTMCell(torch.autograd.Function):
    """nn.LSTMCell's step as one autograd node returning (h, c), gradients of
    unused outputs left undefined: the shape of CUDA's fused LSTMCell kernel,
    whose c_t hook sees only the gradient from later calls."""

    @staticmethod
    def forward(ctx, x, h, c, w_ih, w_hh, b_ih, b_hh):  # type: ignore[no-untyped-def]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, h, c, w_ih, w_hh, b_ih, b_hh)
        return _FusedLSTMCell.step(x, h, c, w_ih, w_hh, b_ih, b_hh)

    @staticmethod
    def step(x, h, c, w_ih, w_hh, b_ih, b_hh):  # type: ignore[no-untyped-def]
        a = x @ w_ih.T + h @ w_hh.T + (0 if b_ih is None else b_ih + b_hh)
        i, f, g, o = a.chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c_new), c_new

    @staticmethod
    def backward(ctx, g_h, g_c):  # type: ignore[no-untyped-def]
        saved = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(True) if t is not None else None for t in saved]
        with torch.enable_grad():
            h_new, c_new = _FusedLSTMCell.step(*inputs)
        outs, grads = zip(*[(o, g) for o, g in ((h_new, g_h), (c_new, g_c)) if g is not None])
        wanted = [t for t in inputs if t is not None]
        got = iter(torch.autograd.grad(outs, wanted, grads, allow_unused=True))
        return tuple(next(got) if t is not None else None for t in inputs)


class _FusedCellVF:
    """torch._VF with lstm_cell replaced by _FusedLSTMCell."""

    def __getattr__(self, name):  # type: ignore[no-untyped-def]
        return getattr(torch._VF, name)

    @staticmethod
    def lstm_cell(x, hx, w_ih, w_hh, b_ih=None, b_hh=None):  # type: ignore[no-untyped-def]
        return _FusedLSTMCell.apply(x, hx[0], hx[1], w_ih, w_hh, b_ih, b_hh)


@pytest.mark.parametrize("stacked,future", [(False, 0), (True, 3)], ids=["single", "stacked-future"])
def test_lstm_cell_whose_h_and_c_come_from_one_node(stacked, future, tmp_path, monkeypatch, scan_path):
    """Found while preparing the GPU check: CUDA runs nn.LSTMCell as one fused node,
    so the hook on c_t misses the part of dL/dc_t that flows through h_t inside the
    call (and the last c_t's hook gets None). Reproduced on the CPU; the recorded
    cell-state norms must still be the reference's."""
    import torch.nn.modules.rnn as rnn_module

    monkeypatch.setattr(rnn_module, "_VF", _FusedCellVF())
    check_cell_loop("lstm", stacked, future, tmp_path, torch.device("cpu"))
    cell = nn.LSTMCell(2, 3).double()
    h, c = cell(torch.randn(1, 2, dtype=torch.float64))
    assert h.grad_fn is c.grad_fn, "the stand-in no longer makes h and c one node"


def check_cell_loop(kind: str, stacked: bool, future: int, tmp_path, device: torch.device,
                    update_between: bool = False, parametrization: str | None = None) -> None:
    """The loop on ``device``, recorded; the reference on the CPU. ``update_between``:
    the parameters change in place after the backward pass (as in an optimizer
    step) and the next step's forward runs, which is when seqscope finishes step
    0's record (gates, propagation, sigma_max): it must still hold step 0's numbers.
    ``parametrization``: one of torch.nn.utils.parametrizations put on each cell's
    weight_hh (the reference reads the weight it computes)."""
    torch.manual_seed(0)
    model = Loop(kind, stacked, future)
    if parametrization is not None:
        for cell in (model.c1, model.c2):
            if cell is not None:
                getattr(torch.nn.utils.parametrizations, parametrization)(cell, "weight_hh")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, IN, generator=g, dtype=torch.float64)
    target = torch.randn(T + future, B, IN, generator=g, dtype=torch.float64)
    on_device = copy.deepcopy(model).to(device)
    reference = model
    if parametrization is not None and device.type != "cpu":
        # the reference runs with the weight as the device computes it, which rounds
        # differently from the CPU's: CUDA's weight_norm takes the norm's square root in
        # float32, float64 tensors too (seen on an H200: 2.6e-6 apart in a hidden state)
        # (a model without the parametrization: removing it from a copy would remove it
        # from the class the copies share)
        reference = Loop(kind, stacked, future)
        with torch.no_grad():
            for ref_cell, cell, dev_cell in ((reference.c1, model.c1, on_device.c1),
                                             (reference.c2, model.c2, on_device.c2)):
                if ref_cell is not None:
                    for name in ("weight_ih", "bias_ih", "bias_hh"):
                        getattr(ref_cell, name).copy_(getattr(cell, name))
                    ref_cell.weight_hh.copy_(dev_cell.weight_hh.cpu())
            reference.head.load_state_dict(model.head.state_dict())
    path = tmp_path / "t.h5"
    with seqscope.watch(on_device, path, every=1, sequences=B, precision="full"):
        out = on_device(x.to(device))
        ((out - target.to(device)) ** 2).sum().backward()
        if update_between:
            with torch.no_grad():
                for p in on_device.parameters():
                    p.mul_(-0.5).add_(0.25)
            on_device(x.to(device))
    torch.testing.assert_close(check_cell_step(path, 0, reference, x, target), out.cpu().detach())


def check_cell_step(path, step: int, model: Loop, x, target) -> torch.Tensor:
    """Step ``step`` of the trace at ``path`` against the reference loop run on
    ``model`` (a CPU copy with the weights that step's calls ran with) on ``x``,
    with the loss ``((output - target) ** 2).sum()``; returns the reference's output."""
    kind = model.kind
    ref_out, records, ws = reference_loop(model, x)
    ((ref_out - target) ** 2).sum().backward()
    names = ["c1", "c2"] if model.stacked else ["c1"]
    with seqscope.open(path) as trace:
        assert trace.layers == names
        for name, rec, w in zip(names, records, ws):
            n = len(rec["h"])
            assert n == x.shape[0] + model.future  # each call is a timestep, the future included
            hidden = trace.hidden(name, step)
            grads = trace.grad_norms(name, step)
            prop = trace.propagation(name, step)
            gates = trace.gates(name, step)
            for b in range(x.shape[1]):
                np.testing.assert_allclose(hidden[b].data, torch.stack(rec["h"])[:, b].detach().numpy(),
                                           rtol=1e-6, atol=1e-9)
                want = [torch.linalg.vector_norm(h.grad[b]).item() for h in rec["h"]]
                np.testing.assert_allclose(grads["hidden"][b].data, want, rtol=1e-5)
                for gname, values in gates.items():
                    want_g = torch.stack([gg[gname][b] for gg in rec["gates"]]).detach().numpy()
                    np.testing.assert_allclose(values[b].data, want_g, rtol=1e-6, atol=1e-9)
                if kind == "lstm":
                    np.testing.assert_allclose(trace.cell(name, step)[b].data,
                                               torch.stack(rec["c"])[:, b].detach().numpy(), rtol=1e-6, atol=1e-9)
                    want_c = [torch.linalg.vector_norm(c.grad[b]).item() for c in rec["c"]]
                    np.testing.assert_allclose(grads["cell"][b].data, want_c, rtol=1e-5)
                np.testing.assert_allclose(prop[b].data, own_recurrence_profile(kind, w, rec, b),
                                           rtol=1e-5, atol=1e-300)
            want_sigma = torch.linalg.svdvals(w["w_hh"].detach())[0].item()
            assert trace.scalars()["sigma_max/" + name].values[step] == pytest.approx(want_sigma, rel=1e-6)
    return ref_out.detach()


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_a_cell_loop_written_in_the_training_script_records_each_step(kind, tmp_path, scan_path):
    """The training script runs the loop over timesteps itself, calling the watched
    model's cells (through ``Loop.step``), never the model's forward: each forward
    and backward pass is one step. Three SGD steps, every one recorded, each equal
    to the reference loop on the weights that step ran with."""
    check_script_loop(kind, tmp_path, torch.device("cpu"))


class StepModel(Loop):
    """A model whose forward is one timestep of the loop: the training script calls
    the model itself once per timestep (as PyTorch's character-level RNN tutorials do)."""

    def forward(self, x_t, s1=None, s2=None):
        return self.step(x_t, s1, s2)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_a_model_called_once_per_timestep_records_one_step_per_backward_pass(kind, tmp_path, scan_path):
    """The watched model itself is called once per timestep, then one backward pass
    and an optimizer step: each step is the whole loop (every call a timestep, with
    the total gradients of the one backward pass), not one step per call. Until
    session 20 each call began a step of one timestep, recorded before its backward
    pass had run (no gradients but for the last call's)."""
    check_script_loop(kind, tmp_path, torch.device("cpu"), model_per_timestep=True)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_a_cell_loop_run_on_two_inputs_before_one_backward_pass(kind, tmp_path, scan_path):
    """A siamese model: its cell loop runs on batch a, then again from a zero state on
    batch b, and one loss uses both. The step's record holds every call (a's, then
    b's); the gradient norms are the total ones. The propagation profile from the
    last call walks back through b's loop only and is zero on a's calls, on which
    h_T does not depend (until session 20 the scan walked on through them as if b's
    first call had received a's last state)."""
    check_two_inputs(kind, tmp_path, torch.device("cpu"))


def check_two_inputs(kind: str, tmp_path, device: torch.device) -> None:
    """The siamese loop on ``device``, the reference on the CPU."""
    torch.manual_seed(0)
    model = Loop(kind, stacked=False, future=0)
    on_device = copy.deepcopy(model).to(device)
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(T, B, IN, generator=g, dtype=torch.float64) for _ in range(2))
    path = tmp_path / "t.h5"
    with seqscope.watch(on_device, path, every=1, sequences=B, precision="full"):
        ya, yb = on_device(a.to(device)), on_device(b.to(device))
        (ya.pow(2).sum() + (ya - yb).pow(2).sum()).backward()
    ra, rec_a, _ = reference_loop(model, a)
    rb, rec_b, w = reference_loop(model, b)
    (ra.pow(2).sum() + (ra - rb).pow(2).sum()).backward()
    rec_a, rec_b = rec_a[0], rec_b[0]
    with seqscope.open(path) as trace:
        assert list(trace.steps) == [0]
        hidden = trace.hidden("c1", 0)
        grads = trace.grad_norms("c1", 0)
        prop = trace.propagation("c1", 0)
        assert hidden.shape[1] == 2 * T
        for s in range(B):
            np.testing.assert_allclose(hidden[s].data, torch.stack(rec_a["h"] + rec_b["h"])[:, s].detach().numpy(),
                                       rtol=1e-6, atol=1e-9)
            want = [torch.linalg.vector_norm(h.grad[s]).item() for h in rec_a["h"] + rec_b["h"]]
            np.testing.assert_allclose(grads["hidden"][s].data, want, rtol=1e-5)
            if kind == "lstm":
                want_c = [torch.linalg.vector_norm(c.grad[s]).item() for c in rec_a["c"] + rec_b["c"]]
                np.testing.assert_allclose(grads["cell"][s].data, want_c, rtol=1e-5)
            np.testing.assert_array_equal(prop[s, :T].data, np.zeros(T))
            np.testing.assert_allclose(prop[s, T:].data, own_recurrence_profile(kind, w[0], rec_b, s),
                                       rtol=1e-5, atol=1e-300)


def check_script_loop(kind: str, tmp_path, device: torch.device, model_per_timestep: bool = False) -> None:
    """Three SGD steps of a loop over timesteps in the script (``Loop.step``, or with
    ``model_per_timestep`` the watched model itself) on ``device``, each against the
    reference on the CPU."""
    torch.manual_seed(0)
    model = (StepModel if model_per_timestep else Loop)(kind, stacked=True, future=2)
    on_device = copy.deepcopy(model).to(device)
    step_fn = on_device if model_per_timestep else on_device.step
    opt = torch.optim.SGD(on_device.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    path = tmp_path / "t.h5"
    steps = []
    with seqscope.watch(on_device, path, every=1, sequences=B, precision="full"):
        for _ in range(3):
            x = torch.randn(T, B, IN, generator=g, dtype=torch.float64)
            target = torch.randn(T + model.future, B, IN, generator=g, dtype=torch.float64)
            with torch.no_grad():  # a plain CPU copy: seqscope's hooks stay on the watched model
                before = copy.deepcopy(model)
                for p, q in zip(before.parameters(), on_device.parameters()):
                    p.copy_(q)
            s1 = s2 = None
            outs = []
            for t in range(T):
                s1, s2, y = step_fn(x[t].to(device), s1, s2)
                outs.append(y)
            for _ in range(model.future):
                s1, s2, y = step_fn(outs[-1], s1, s2)
                outs.append(y)
            out = torch.stack(outs)
            ((out - target.to(device)) ** 2).sum().backward()
            opt.step()
            opt.zero_grad()
            steps.append((before, x, target, out.detach().cpu()))
    with seqscope.open(path) as trace:
        assert list(trace.steps) == [0, 1, 2]
    for step, (before, x, target, out) in enumerate(steps):
        torch.testing.assert_close(check_cell_step(path, step, before, x, target), out)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_a_cell_loop_run_through_functional_call_is_recorded_with_the_tensors_it_was_given(kind, tmp_path,
                                                                                          scan_path):
    """torch.func.functional_call runs the watched loop on new tensors of the caller's
    at every step (a meta-learning inner loop): three steps, each its own, each equal
    to the reference loop on that step's tensors."""
    torch.manual_seed(0)
    model = Loop(kind, stacked=True, future=2)
    g = torch.Generator().manual_seed(1)
    path = tmp_path / "t.h5"
    steps = []
    with seqscope.watch(model, path, every=1, sequences=B, precision="full"):
        for i in range(3):
            x = torch.randn(T, B, IN, generator=g, dtype=torch.float64)
            target = torch.randn(T + model.future, B, IN, generator=g, dtype=torch.float64)
            given = {name: (p.detach() * (0.7 + 0.2 * i)).requires_grad_() for name, p in model.named_parameters()}
            out = torch.func.functional_call(model, given, (x,))
            ((out - target) ** 2).sum().backward()
            used = Loop(kind, stacked=True, future=2)
            used.load_state_dict({name: t.detach() for name, t in given.items()})
            steps.append((used, x, target, out.detach()))
    with seqscope.open(path) as trace:
        assert list(trace.steps) == [0, 1, 2]
    for step, (used, x, target, out) in enumerate(steps):
        torch.testing.assert_close(check_cell_step(path, step, used, x, target), out)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_parameters_updated_before_the_next_step_do_not_change_the_cell_record(kind, tmp_path, scan_path):
    """A cell's gates, propagation profile and sigma_max are computed when the step
    ends, after the optimizer has changed the weights in place: from the weights
    the step's calls ran with."""
    check_cell_loop(kind, True, 3, tmp_path, torch.device("cpu"), update_between=True)


PARAMETRIZED_CELLS = [(k, p) for k in ("lstm", "gru", "rnn_tanh") for p in ("weight_norm", "orthogonal")]


@pytest.mark.parametrize("kind,parametrization", PARAMETRIZED_CELLS, ids=[f"{k}-{p}" for k, p in PARAMETRIZED_CELLS])
def test_parametrized_cells_are_recorded_with_the_weights_their_calls_used(kind, parametrization, tmp_path,
                                                                            scan_path):
    """A cell whose weight_hh is parametrized (weight_norm; orthogonal, a remedy for
    vanishing and exploding gradients) has no parameter named weight_hh: the value
    is computed at each call from the originals. seqscope keeps the value the
    step's first call computed; its gates, propagation profile and sigma_max are
    the reference's, also when the originals change before the step ends. (Until
    session 15 every such step failed to record: KeyError 'weight_hh'.)"""
    check_cell_loop(kind, True, 3, tmp_path, torch.device("cpu"), update_between=True,
                    parametrization=parametrization)


EXTREME = [(k, s) for k in ("lstm", "gru", "rnn_tanh") for s in (1e22, 1e-24)]


@pytest.mark.parametrize("kind,scale", EXTREME, ids=[f"{k}-{s:g}" for k, s in EXTREME])
def test_float32_cell_loop_gradient_norms_beyond_the_range_of_their_squares(kind, scale, tmp_path, scan_path):
    """A float32 cell loop with gradients ~1e22 or ~1e-24 per element: their
    squares leave float32's range, their norms must not (float64 norms)."""
    torch.manual_seed(0)
    model = Loop(kind, stacked=True, future=0).float()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, IN, generator=g)
    target = torch.randn(T, B, IN, generator=g)
    path = tmp_path / "t.h5"
    with seqscope.watch(model, path, every=1, sequences=B, precision="full"):
        out = model(x)
        (scale * ((out - target) ** 2).sum()).backward()
    ref_out, records, ws = reference_loop(model, x)
    (scale * ((ref_out - target) ** 2).sum()).backward()
    with seqscope.open(path) as trace:
        for name, rec, w in zip(["c1", "c2"], records, ws):
            grads = trace.grad_norms(name, 0)
            prop = trace.propagation(name, 0)
            for b in range(B):
                want = [ref.norm(h.grad[b]).item() for h in rec["h"]]
                np.testing.assert_allclose(grads["hidden"][b].data, want, rtol=2e-4)
                if kind == "lstm":
                    want_c = [ref.norm(c.grad[b]).item() for c in rec["c"]]
                    np.testing.assert_allclose(grads["cell"][b].data, want_c, rtol=2e-4)
                np.testing.assert_allclose(prop[b].data, own_recurrence_profile(kind, w, rec, b),
                                           rtol=2e-4, atol=1e-300)
        scalars = trace.scalars()
        for pname, p in model.named_parameters():
            assert scalars["grad_norm/" + pname].values[0] == pytest.approx(ref.norm(p.grad).item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_autocast_cell_loop_is_recorded_at_the_values_the_model_had(kind, tmp_path, scan_path):
    """Mixed precision: under torch.autocast (bfloat16 on the CPU) the cells'
    products run in bfloat16 on rounded copies of the float32 weights and inputs
    (RNNCell also returns bfloat16; LSTMCell and GRUCell return float32). The
    reference is unrolled in float64 from the weights and inputs as the cell saw
    them, each call's output replaced by the cell's own (straight-through)."""
    torch.manual_seed(0)
    model = Loop(kind, stacked=False, future=0).float()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, IN, generator=g)
    target = torch.randn(T, B, IN, generator=g)
    seen = []
    handle = model.c1.register_forward_hook(lambda m, a, o: seen.append(o))
    path = tmp_path / "t.h5"
    with seqscope.watch(model, path, every=1, sequences=B, precision="full"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        ((out.float() - target) ** 2).sum().backward()
    handle.remove()
    is_lstm = kind == "lstm"
    h_actual = [(o[0] if is_lstm else o).detach().double() for o in seen]
    c_actual = [o[1].detach().double() for o in seen] if is_lstm else None
    w = {k: v.detach().bfloat16().double().requires_grad_(True) for k, v in cell_weights(model.c1).items()}
    head_w = model.head.weight.detach().bfloat16().double()
    head_b = model.head.bias.detach().bfloat16().double()
    x64 = x.double()
    h = torch.zeros(B, HID, dtype=torch.float64)
    c = torch.zeros(B, HID, dtype=torch.float64) if is_lstm else None
    hs, cs, gates, ys = [], [], [], []
    for t in range(T):
        h_new, c_new, gts = ref.cell_step(kind, x64[t], h, c, w, product=ref.rounded_operands(torch.bfloat16))
        # one step from the cell's own state lands on its output, up to bfloat16 rounding
        torch.testing.assert_close(h_new.detach(), h_actual[t], rtol=1e-2, atol=1e-2)
        if is_lstm:  # c_t first, so that h_t = o tanh(c_t) depends on the corrected c_t
            c = c_new + (c_actual[t] - c_new).detach()
            c.retain_grad()
            h_new = gts["output"] * torch.tanh(c)
        h = h_new + (h_actual[t] - h_new).detach()
        h.retain_grad()
        hs.append(h)
        cs.append(c)
        gates.append(gts)
        ys.append(h @ head_w.T + head_b)
    ((torch.stack(ys) - target.double()) ** 2).sum().backward(retain_graph=True)
    with seqscope.open(path) as trace:
        rec_gates = trace.gates("c1", 0)
        grads = trace.grad_norms("c1", 0)
        prop = trace.propagation("c1", 0)
        for b in range(B):
            np.testing.assert_array_equal(trace.hidden("c1", 0)[b].data, torch.stack(h_actual)[:, b].numpy())
            for gname, values in rec_gates.items():
                want = torch.stack([gg[gname][b] for gg in gates]).detach().numpy()
                np.testing.assert_allclose(values[b].data, want, rtol=1e-5, atol=1e-6)
            # dL/dh_t comes through the bfloat16 head: a few parts in a thousand
            np.testing.assert_allclose(grads["hidden"][b].data, [ref.norm(hh.grad[b]).item() for hh in hs], rtol=2e-2)
            if is_lstm:
                np.testing.assert_allclose(grads["cell"][b].data, [ref.norm(cc.grad[b]).item() for cc in cs],
                                           rtol=2e-2)
            v = ref.unit_direction(hs[-1].grad[b])
            back = torch.autograd.grad(hs[-1][b], hs, grad_outputs=v, retain_graph=True, allow_unused=True)
            want_p = [0.0 if gr is None else ref.norm(gr[b]).item() for gr in back]
            np.testing.assert_allclose(prop[b].data, want_p, rtol=0.1, atol=1e-300)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_cell_loop_under_activation_checkpointing(kind, reentrant, tmp_path, scan_path):
    """A cell loop inside torch.utils.checkpoint: the calls run again during
    backward; each timestep is recorded once, with the reference's numbers
    (use_reentrant=True: the recomputation is the only pass with autograd on)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    loop = Loop(kind, stacked=True, future=0)

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.loop = loop

        def forward(self, x):
            return checkpoint(self.loop, x, use_reentrant=reentrant)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, IN, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(T, B, IN, generator=g, dtype=torch.float64)
    model = Checkpointed()
    path = tmp_path / "t.h5"
    with seqscope.watch(model, path, every=1, sequences=B, precision="full"):
        ((model(x) - target) ** 2).sum().backward()
    ref_out, records, ws = reference_loop(loop, x)
    ((ref_out - target) ** 2).sum().backward()
    with seqscope.open(path) as trace:
        assert list(trace.steps) == [0]
        for name, rec in zip(["loop.c1", "loop.c2"], records):
            hidden = trace.hidden(name, 0)
            assert hidden.shape[:2] == (B, T)  # each call once, not again for the recomputation
            grads = trace.grad_norms(name, 0)
            for b in range(B):
                np.testing.assert_allclose(hidden[b].data, torch.stack(rec["h"])[:, b].detach().numpy(), rtol=1e-12)
                np.testing.assert_allclose(grads["hidden"][b].data, [ref.norm(h.grad[b]).item() for h in rec["h"]],
                                           rtol=1e-10)
                if kind == "lstm":
                    np.testing.assert_allclose(grads["cell"][b].data,
                                               [ref.norm(c.grad[b]).item() for c in rec["c"]], rtol=1e-10)


class _CheckpointedPerStep(Loop):
    """``Loop`` with each timestep (both cells and the head) in a torch.utils.checkpoint
    of its own, the states passed as tensors (as use_reentrant=True needs)."""

    def __init__(self, kind: str, stacked: bool, future: int, reentrant: bool) -> None:
        super().__init__(kind, stacked, future)
        self.reentrant = reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        k = 2 if self.kind == "lstm" else 1
        flat = [x.new_zeros(x.shape[1], HID)] * (k * (2 if self.c2 is not None else 1))

        def one(inp, *flat):
            s1 = tuple(flat[:k]) if k == 2 else flat[0]
            s2 = (tuple(flat[k:]) if k == 2 else flat[k]) if self.c2 is not None else None
            s1, s2, y = self.step(inp, s1, s2)
            states = [s1] + ([s2] if s2 is not None else [])
            return (y, *[t for s in states for t in (s if k == 2 else (s,))])

        outs: list[torch.Tensor] = []
        for t in range(x.shape[0] + self.future):
            y, *flat = checkpoint(one, x[t] if t < x.shape[0] else outs[-1], *flat, use_reentrant=self.reentrant)
            outs.append(y)
        return torch.stack(outs)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_cell_loop_with_each_timestep_checkpointed(kind, reentrant, tmp_path, scan_path):
    """Each timestep in a checkpoint of its own. With use_reentrant=True the cells
    run under no_grad in the forward pass and again in the backward pass, timestep
    by timestep from the last: until session 19 seqscope recorded the calls in that
    order, so h_t ran backwards in time, with its gradient norms, and the propagation
    profile was that of the reversed chain. Every recorded number against the
    reference (two stacked cells, three steps fed from the model's own output)."""
    check_checkpointed_per_step(kind, reentrant, tmp_path, torch.device("cpu"))


def check_checkpointed_per_step(kind: str, reentrant: bool, tmp_path, device: torch.device) -> None:
    """The loop of ``_CheckpointedPerStep`` on ``device``, recorded; the reference on the CPU."""
    torch.manual_seed(0)
    model = _CheckpointedPerStep(kind, stacked=True, future=3, reentrant=reentrant)
    on_device = copy.deepcopy(model).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, IN, generator=g, dtype=torch.float64)
    target = torch.randn(T + 3, B, IN, generator=g, dtype=torch.float64)
    path = tmp_path / "t.h5"
    with seqscope.watch(on_device, path, every=1, sequences=B, precision="full"):
        out = on_device(x.to(device).requires_grad_(True))
        ((out - target.to(device)) ** 2).sum().backward()
    torch.testing.assert_close(check_cell_step(path, 0, model, x, target), out.detach().cpu())


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_a_script_loop_checkpointed_per_timestep(reentrant, tmp_path, caplog):
    """A loop in the training script (the watched model is never called) with each
    cell call in a checkpoint. Non-reentrant: recorded, every step. Reentrant: the
    cell runs under no_grad in the forward pass, so no step ever begins, and nothing
    can be recorded; until session 19 nothing said so. Now a warning does, once."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    cell = make_cell("lstm", IN, HID)
    model = nn.ModuleDict({"cell": cell})
    x = torch.randn(T, B, IN, dtype=torch.float64, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="seqscope"):
        with seqscope.watch(model, tmp_path / "t.h5", every=1):
            for _ in range(3):
                h = c = torch.zeros(B, HID, dtype=torch.float64)
                for t in range(T):
                    h, c = checkpoint(lambda a, b, d: cell(a, (b, d)), x[t], h, c, use_reentrant=reentrant)
                h.pow(2).sum().backward()
    said = [r.getMessage() for r in caplog.records if "inside a backward pass" in r.getMessage()]
    with seqscope.open(tmp_path / "t.h5") as trace:
        if reentrant:
            assert len(said) == 1 and "use_reentrant=False" in said[0] and list(trace.steps) == []
        else:
            assert said == [] and list(trace.steps) == [0, 1, 2]
            assert trace.hidden("cell", 2).shape[:2] == (B, T)


class EncoderDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.LSTM(IN, HID).double()
        self.decoder = make_cell("lstm", IN, HID)
        self.head = nn.Linear(HID, IN).double()

    def forward(self, x, steps=4):
        _, (h, c) = self.encoder(x)
        state = (h[0], c[0])
        y = x[-1]
        outs = []
        for _ in range(steps):
            state = self.decoder(y, state)
            y = self.head(state[0])
            outs.append(y)
        return torch.stack(outs)


def test_encoder_decoder_fused_and_cell_in_one_trace(tmp_path):
    torch.manual_seed(0)
    model = EncoderDecoder()
    x = torch.randn(T, B, IN, dtype=torch.float64)
    path = tmp_path / "t.h5"
    with seqscope.watch(model, path, every=1, sequences=B, precision="full"):
        model(x).pow(2).sum().backward()
    # reference: encoder unrolled by tests/reference.py, decoder in plain math, one graph
    layers, _, h_n, c_n = ref.run_reference(model.encoder, list(x.unbind(1)))
    w = cell_weights(model.decoder)
    hw, hb = model.head.weight.detach(), model.head.bias.detach()
    h, c, y = h_n[0], c_n[0], x[-1]
    dec_h, dec_c, outs = [], [], []
    for _ in range(4):
        h, c, _g = ref.cell_step("lstm", y, h, c, w)
        h.retain_grad()
        c.retain_grad()
        dec_h.append(h)
        dec_c.append(c)
        y = h @ hw.T + hb
        outs.append(y)
    torch.stack(outs).pow(2).sum().backward()
    with seqscope.open(path) as trace:
        assert trace.layers == ["encoder.l0", "decoder"]
        enc = trace.grad_norms("encoder.l0", 0)
        dec = trace.grad_norms("decoder", 0)
        for b in range(B):
            want_enc = [torch.linalg.vector_norm(hh.grad).item() for hh in layers[(0, 0)].h[b]]
            np.testing.assert_allclose(enc["hidden"][b].data, want_enc, rtol=1e-5)
            want_dec = [torch.linalg.vector_norm(hh.grad[b]).item() for hh in dec_h]
            np.testing.assert_allclose(dec["hidden"][b].data, want_dec, rtol=1e-5)
            want_dc = [torch.linalg.vector_norm(cc.grad[b]).item() for cc in dec_c]
            np.testing.assert_allclose(dec["cell"][b].data, want_dc, rtol=1e-5)


def test_lbfgs_and_evaluation_calls_are_not_recorded_twice(tmp_path):
    torch.manual_seed(0)
    model = Loop("gru", stacked=True, future=2)
    x = torch.randn(T, B, IN, dtype=torch.float64)
    # reference for step 0: its first closure pass runs with the initial weights
    ref_out, records, _ = reference_loop(model, x)
    ref_out.pow(2).mean().backward()
    want_h = torch.stack(records[0]["h"]).detach()
    want_g = [[torch.linalg.vector_norm(h.grad[b]).item() for h in records[0]["h"]] for b in range(B)]
    opt = torch.optim.LBFGS(model.parameters(), max_iter=3)
    passes = []

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        passes.append(1)
        return loss

    with seqscope.watch(model, tmp_path / "t.h5", every=1, sequences=B, precision="full") as scope:
        for _ in range(2):
            scope.log(loss=opt.step(closure))
            with torch.no_grad():
                model(x)  # evaluation: not a training step
    assert len(passes) > 2
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert list(trace.steps) == [0, 1]
        for name in ("c1", "c2"):
            assert trace.hidden(name, 1).shape[1] == T + 2  # one pass, not several
        # step 0 holds the first closure pass, exactly
        for b in range(B):
            np.testing.assert_allclose(trace.hidden("c1", 0)[b].data, want_h[:, b].numpy(), rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(trace.grad_norms("c1", 0)["hidden"][b].data, want_g[b], rtol=1e-5)


def test_sine_example_records_both_cells(tmp_path):
    path = run_example("sine_cells", tmp_path, "--steps", "3", "--every", "1")
    with seqscope.open(path) as trace:
        assert trace.layers == ["cell1", "cell2"]
        assert list(trace.steps) == [0, 1, 2]
        assert trace.hidden("cell2", 2).shape == (8, 50, 32)
        assert np.isfinite(trace.propagation("cell1", 1)).all()


def test_evaluation_pass_is_recorded_without_gradients_and_apart(tmp_path):
    torch.manual_seed(0)
    model = Loop("lstm", stacked=True, future=2)
    x = torch.randn(T, B, IN, dtype=torch.float64)
    x_eval = torch.randn(T + 3, B, IN, dtype=torch.float64)  # a different length: nothing can mix
    path = tmp_path / "t.h5"
    with seqscope.watch(model, path, every=2, sequences=B, precision="full"):
        for _ in range(3):
            model(x).pow(2).mean().backward()
            with torch.no_grad():
                evaluated = model(x_eval)
    with seqscope.open(path) as trace:
        assert list(trace.steps) == [0, 2]
        assert list(trace.eval_steps) == [0, 2]  # evaluation passes of the recorded steps
        train = trace.hidden("c1", 2)
        assert train.shape == (B, T + 2, HID)
        ev = trace.hidden("c1", 2, phase="eval")
        assert ev.shape == (B, T + 3 + 2, HID)
        with pytest.raises(seqscope.NotInTraceError):
            trace.grad_norms("c1", 2)["hidden"]  # present for training ...
            trace._read("c1", 2, "grad_hidden", "eval")  # ... and absent for evaluation
    # the evaluation record holds what the evaluation computed
    _, records, _ = reference_loop(model, x_eval)
    h_top = torch.stack(records[1]["h"])
    with seqscope.open(path) as trace:
        np.testing.assert_allclose(trace.hidden("c2", 2, phase="eval")[0].data, h_top[:, 0].detach().numpy(),
                                   rtol=1e-6, atol=1e-9)
        assert set(trace.gates("c2", 2, phase="eval")) == {"input", "forget", "cell", "output"}
    assert evaluated.shape[0] == T + 3 + 2


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_a_model_called_once_per_timestep_is_evaluated_in_one_pass(kind, tmp_path):
    """Under torch.no_grad() the watched model is called once per timestep, each call
    given the state the last one returned: one evaluation pass holds every call, not
    one timestep (until session 20 each call was a pass of its own, and only the first
    was recorded). A second loop on another batch starts from a new state: another
    pass, not recorded again for the same step number. Two training steps (every=1)
    number the passes."""
    torch.manual_seed(0)
    model = StepModel(kind, stacked=True, future=2)
    g = torch.Generator().manual_seed(1)
    path = tmp_path / "t.h5"
    evaluated = []

    def loop(x):
        s1 = s2 = None
        outs = []
        for t in range(x.shape[0]):
            s1, s2, y = model(x[t], s1, s2)
            outs.append(y)
        for _ in range(model.future):
            s1, s2, y = model(outs[-1], s1, s2)
            outs.append(y)
        return torch.stack(outs)

    with seqscope.watch(model, path, every=1, sequences=B, precision="full"):
        for _ in range(2):
            x = torch.randn(T, B, IN, generator=g, dtype=torch.float64)
            loop(x).pow(2).mean().backward()
            x_eval = torch.randn(T + 1, B, IN, generator=g, dtype=torch.float64)
            with torch.no_grad():
                loop(x_eval)
                loop(torch.randn(T, B, IN, generator=g, dtype=torch.float64))  # another batch: not recorded
            evaluated.append((copy.deepcopy(model), x_eval))
    with seqscope.open(path) as trace:
        assert list(trace.steps) == [0, 1]
        assert list(trace.eval_steps) == [0, 1]
        for step, (weights, x_eval) in enumerate(evaluated):
            _, records, _ = reference_loop(weights, x_eval)
            for name, rec in zip(("c1", "c2"), records):
                hidden = trace.hidden(name, step, phase="eval")
                assert hidden.shape == (B, T + 1 + model.future, HID)
                gates = trace.gates(name, step, phase="eval")
                for b in range(B):
                    np.testing.assert_allclose(hidden[b].data, torch.stack(rec["h"])[:, b].detach().numpy(),
                                               rtol=1e-6, atol=1e-9)
                    for gname, values in gates.items():
                        want = torch.stack([gg[gname][b] for gg in rec["gates"]]).detach().numpy()
                        np.testing.assert_allclose(values[b].data, want, rtol=1e-6, atol=1e-9)


def test_an_evaluation_pass_cut_short_by_an_exception_is_dropped(tmp_path):
    """An evaluation forward that raises after some cell calls: the next forward drops
    that pass, never writing half of it (step 0 keeps no evaluation record: its one
    recorded pass was the interrupted one), and the next step's pass is recorded whole."""
    torch.manual_seed(0)
    model = Loop("gru", stacked=False, future=0)
    x = torch.randn(T, B, IN, dtype=torch.float64)
    x_eval = torch.randn(T, B, IN, dtype=torch.float64)

    def fail(module, args, output):
        raise RuntimeError("the head failed")

    path = tmp_path / "t.h5"
    with seqscope.watch(model, path, every=1, sequences=B, precision="full"):
        for step in range(2):
            model(x).pow(2).mean().backward()
            with torch.no_grad():
                if step == 0:
                    handle = model.head.register_forward_hook(fail)
                    with pytest.raises(RuntimeError, match="the head failed"):
                        model(x_eval)  # after the first cell call
                    handle.remove()
                model(x_eval)
    with seqscope.open(path) as trace:
        assert list(trace.steps) == [0, 1]
        assert list(trace.eval_steps) == [1]
        _, records, _ = reference_loop(model, x_eval)
        np.testing.assert_allclose(trace.hidden("c1", 1, phase="eval")[0].data,
                                   torch.stack(records[0]["h"])[:, 0].detach().numpy(), rtol=1e-6, atol=1e-9)


def test_cell_hooks_exist_only_during_recorded_steps(tmp_path):
    """On steps the schedule does not pick, a watched cell carries no forward hook
    (it cost every call ~7 us); recorded steps and evaluation passes still get
    every call."""
    torch.manual_seed(0)
    model = Loop("gru", stacked=True, future=0)
    x = torch.randn(T, B, IN, dtype=torch.float64)
    seen = []

    class Probe(nn.Module):  # reports, from inside the forward, whether the cells are hooked
        def __init__(self) -> None:
            super().__init__()
            self.loop = model

        def forward(self, x):
            seen.append(bool(self.loop.c1._forward_hooks) and bool(self.loop.c2._forward_hooks))
            return self.loop(x)

    probe = Probe()
    with seqscope.watch(probe, tmp_path / "t.h5", every=2):
        for _ in range(4):
            probe(x).sum().backward()
        with torch.no_grad():
            probe(x)  # an evaluation pass of step 3: not picked by every=2
    assert seen == [True, False, True, False, False]
    assert not model.c1._forward_hooks and not model.c2._forward_hooks  # gone after the scope
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert list(trace.steps) == [0, 2]
        assert trace.hidden("loop.c1", 2).shape[:2] == (B, T)
