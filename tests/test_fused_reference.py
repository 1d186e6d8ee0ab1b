"""Every number seqscope records for fused modules, against the unrolled
autograd reference in tests/reference.py, over the configuration matrix."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

import seqscope
from seqscope.capture import graphs, recurrences
from seqscope.capture import scope as scope_module
from seqscope.diagnose import diagnose
from tests import reference as ref
from tests.test_cells_reference import check_cell_loop, check_checkpointed_per_step, check_script_loop, check_two_inputs
from tests.test_custom_cells import check_custom_cell, check_memory_argument, check_training_unchanged


@dataclasses.dataclass(frozen=True)
class Config:
    kind: str
    layers: int = 1
    bidirectional: bool = False
    batch_first: bool = False
    proj: int = 0
    bias: bool = True
    h0: bool = False
    packed: bool = False
    dtype: torch.dtype = torch.float64

    @property
    def id(self) -> str:
        parts = [self.kind, f"L{self.layers}"]
        for flag in ("bidirectional", "batch_first", "packed", "h0"):
            if getattr(self, flag):
                parts.append(flag)
        if self.proj:
            parts.append(f"proj{self.proj}")
        if not self.bias:
            parts.append("nobias")
        if self.dtype == torch.float32:
            parts.append("f32")
        return "-".join(parts)


def _configs() -> list[Config]:
    out = []
    for kind in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
        out += [
            Config(kind),
            Config(kind, layers=2),
            Config(kind, layers=2, bidirectional=True),
            Config(kind, batch_first=True),
            Config(kind, bias=False),
            Config(kind, h0=True, layers=2),
            Config(kind, packed=True),
            Config(kind, packed=True, bidirectional=True, layers=2, h0=True),
            Config(kind, dtype=torch.float32),
        ]
    out += [
        Config("lstm", proj=3),
        Config("lstm", proj=3, layers=2, bidirectional=True, packed=True, h0=True),
        Config("gru", batch_first=True, bidirectional=True, packed=True),
    ]
    return out


CONFIGS = _configs()
IN, HID, T, B = 4, 6, 7, 5
LENGTHS = [5, 7, 2, 6, 4]  # unsorted on purpose


def make_module(cfg: Config) -> nn.Module:
    common = dict(num_layers=cfg.layers, bidirectional=cfg.bidirectional, batch_first=cfg.batch_first, bias=cfg.bias)
    if cfg.kind == "lstm":
        m = nn.LSTM(IN, HID, proj_size=cfg.proj, **common)
    elif cfg.kind == "gru":
        m = nn.GRU(IN, HID, **common)
    else:
        m = nn.RNN(IN, HID, nonlinearity=cfg.kind[4:], **common)
    with torch.no_grad():
        for p in m.parameters():  # larger than default init so gradients vary a lot over time
            p.uniform_(-0.6, 0.6)
    return m.to(cfg.dtype)


def make_inputs(cfg: Config, gen: torch.Generator):
    lengths = LENGTHS if cfg.packed else [T] * B
    seqs = [torch.randn(n, IN, generator=gen, dtype=torch.float64).to(cfg.dtype) for n in lengths]
    n_dir = 2 if cfg.bidirectional else 1
    out = cfg.proj or HID
    h0 = c0 = None
    if cfg.h0:
        h0 = (0.5 * torch.randn(cfg.layers * n_dir, B, out, generator=gen, dtype=torch.float64)).to(cfg.dtype)
        c0 = (0.5 * torch.randn(cfg.layers * n_dir, B, HID, generator=gen, dtype=torch.float64)).to(cfg.dtype)
    return seqs, h0, c0


def module_input(cfg: Config, seqs):
    if cfg.packed:
        return pack_sequence(seqs, enforce_sorted=False)
    x = torch.stack(seqs, dim=1)  # [T, B, I]
    return x.transpose(0, 1) if cfg.batch_first else x


def per_sequence_outputs(cfg: Config, output):
    if cfg.packed:
        padded, lengths = pad_packed_sequence(output, batch_first=True)
        return [padded[b, : lengths[b]] for b in range(len(lengths))]
    if cfg.batch_first:
        return [output[b] for b in range(output.shape[0])]
    return [output[:, b] for b in range(output.shape[1])]


def make_loss_terms(cfg: Config, gen: torch.Generator):
    n_dir = 2 if cfg.bidirectional else 1
    out = cfg.proj or HID
    r = torch.randn(B, T, n_dir * out, generator=gen, dtype=torch.float64).to(cfg.dtype)
    q = torch.randn(cfg.layers * n_dir, B, out, generator=gen, dtype=torch.float64).to(cfg.dtype)
    s = torch.randn(cfg.layers * n_dir, B, HID, generator=gen, dtype=torch.float64).to(cfg.dtype)
    return r, q, s


def loss_of(outputs, h_n, c_n, terms):
    r, q, s = terms
    loss = sum((r[b, : o.shape[0]] * o).sum() + 0.5 * (o * o).sum() for b, o in enumerate(outputs))
    loss = loss + (q * h_n).sum()
    if c_n is not None:
        loss = loss + (s * c_n).sum()
    return loss


def _tol(cfg: Config, device: torch.device | None = None):
    """Relative tolerances: the module's own output and the loss against the
    reference, recorded states, recorded gradient norms; absolute ones for the
    module's output and the states."""
    if cfg.dtype == torch.float64:
        return dict(module=1e-5, loss=1e-6, states=1e-6, grads=1e-5, atol_module=1e-6, atol_states=1e-7)
    if device is not None and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        # cuDNN runs float32 RNNs in TF32 (products of 10-bit mantissas): the module itself is
        # ~1e-3 off a float32 reference, and seqscope's recomputation (full float32) is too
        return dict(module=2e-2, loss=3e-3, states=2e-2, grads=5e-2, atol_module=1e-2, atol_states=1e-2)
    if device is not None and device.type == "cuda":  # float32 sums in cuDNN's order: ~1e-6 apart
        return dict(module=1e-4, loss=1e-5, states=1e-4, grads=1e-3, atol_module=1e-5, atol_states=1e-5)
    return dict(module=1e-5, loss=1e-6, states=2e-5, grads=2e-4, atol_module=1e-6, atol_states=1e-7)


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.id for c in CONFIGS])
def test_recorded_numbers_match_unrolled_reference(cfg: Config, tmp_path, scan_path):
    check_against_reference(cfg, tmp_path, torch.device("cpu"))


UPDATED = [Config("lstm", layers=2, bidirectional=True, packed=True), Config("lstm", proj=3, h0=True),
           Config("gru", layers=2, batch_first=True), Config("rnn_tanh", bidirectional=True),
           Config("lstm", dtype=torch.float32)]


@pytest.mark.parametrize("cfg", UPDATED, ids=[c.id for c in UPDATED])
def test_parameters_updated_before_the_next_step_do_not_change_the_record(cfg: Config, tmp_path, scan_path):
    """seqscope finishes a step's record (the BPTT scan) when the next step begins,
    after the optimizer has changed the weights in place: the scan must use the
    weights the step's forward pass ran with."""
    check_against_reference(cfg, tmp_path, torch.device("cpu"), update_between=True)


LOOPED = [Config("lstm", layers=2, packed=True), Config("gru", bidirectional=True, h0=True)]


@pytest.mark.parametrize("cfg", LOOPED, ids=[c.id for c in LOOPED])
def test_a_training_loop_records_each_step_as_its_forward_ran(cfg: Config, tmp_path, scan_path):
    """Adam over five steps, new data each step, every step recorded: each record
    equals the reference unrolled on the parameters the step's forward pass had
    (a copy taken just before it), and the parameter gradient norms equal
    PyTorch's own for that step."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    model = make_module(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    steps = []  # per step: the parameters before its forward, its data, PyTorch's gradient norms
    path = tmp_path / "trace.h5"
    with seqscope.watch(model, path, every=1, sequences=B, precision="full"):
        for _ in range(5):
            seqs, h0, c0 = make_inputs(cfg, gen)
            terms = make_loss_terms(cfg, gen)
            before = {k: v.detach().clone() for k, v in model.state_dict().items()}
            hx = None if h0 is None else ((h0, c0) if cfg.kind == "lstm" else h0)
            output, state = model(module_input(cfg, seqs), hx)
            h_n, c_n = state if cfg.kind == "lstm" else (state, None)
            loss_of(per_sequence_outputs(cfg, output), h_n, c_n, terms).backward()
            pg = {name: ref.norm(p.grad).item() for name, p in model.named_parameters()}
            opt.step()
            opt.zero_grad()
            steps.append((before, seqs, h0, c0, terms, pg))
    with seqscope.open(path) as trace:
        check_steps(trace, cfg, steps)


def check_steps(trace: Any, cfg: Config, steps: list[tuple[Any, ...]], prefix: str | None = None) -> None:
    """The trace holds one step per entry of ``steps``, each (the weights its forward
    pass ran with, its sequences, h0, c0, loss terms, PyTorch's gradient norms),
    and each step passes check_step."""
    assert list(trace.steps) == list(range(len(steps)))
    for step, (weights, seqs, h0, c0, terms, pg) in enumerate(steps):
        module = make_module(cfg)
        module.load_state_dict(weights)
        check_step(trace, step, cfg, module, seqs, h0, c0, terms, pg, prefix)


def check_step(trace: Any, step: int, cfg: Config, module: nn.Module, seqs, h0, c0, terms,
               pg: dict[str, float], prefix: str | None = None) -> None:
    """Step ``step`` of ``trace`` against the reference unrolled on ``module`` (a
    module with the weights that step's forward pass ran with), and the parameter
    gradient norms against ``pg`` (PyTorch's own for that step). ``prefix``: the
    trace's name of the module (its kind by default, as for a watched bare module)."""
    tol = _tol(cfg)
    n_dir = 2 if cfg.bidirectional else 1
    prefix = prefix or cfg.kind.split("_")[0]
    scalars = trace.scalars()
    layers, ref_out, ref_hn, ref_cn = ref.run_reference(module, seqs, h0, c0)
    loss_of(ref_out, ref_hn, ref_cn, terms).backward(retain_graph=True)
    # the reference's gradient norms, read before propagation() runs more backward passes
    ref_gh = {key: [[ref.norm(h.grad).item() for h in hs] for hs in lay.h] for key, lay in layers.items()}
    ref_gc = {key: [[ref.norm(c.grad).item() for c in cs] for cs in lay.c] for key, lay in layers.items()} \
        if cfg.kind == "lstm" else {}
    for name, want in pg.items():
        assert scalars["grad_norm/" + name].values[step] == pytest.approx(want, rel=1e-6)
    for (k, d), layer in layers.items():
        name = f"{prefix}.l{k}" + ("_reverse" if d else "")
        grads = trace.grad_norms(name, step)
        prop = trace.propagation(name, step)
        gates = trace.gates(name, step)
        want_sigma = torch.linalg.svdvals(ref.layer_weights(module, k, d)["w_hh"].detach())[0].item()
        assert scalars["sigma_max/" + name].values[step] == pytest.approx(want_sigma, rel=1e-5)
        for b, seq in enumerate(seqs):
            n = len(seq)
            np.testing.assert_allclose(trace.hidden(name, step)[b, :n].data,
                                       torch.stack(layer.h[b]).detach().numpy(),
                                       rtol=tol["states"], atol=tol["atol_states"])
            np.testing.assert_allclose(grads["hidden"][b, :n].data, ref_gh[(k, d)][b], rtol=tol["grads"])
            np.testing.assert_allclose(prop[b, :n].data, ref.propagation(layer, b, d).numpy(),
                                       rtol=tol["grads"], atol=1e-300)
            for gname, values in gates.items():
                want_g = torch.stack([g[gname] for g in layer.gates[b]]).detach().numpy()
                np.testing.assert_allclose(values[b, :n].data, want_g, rtol=tol["states"],
                                           atol=tol["atol_states"])
            if cfg.kind == "lstm":
                np.testing.assert_allclose(grads["cell"][b, :n].data, ref_gc[(k, d)][b], rtol=tol["grads"])
    assert len(layers) == cfg.layers * n_dir


PARAMETRIZED = [("lstm", "weight_norm", "weight_hh_l0"), ("rnn_tanh", "orthogonal", "weight_hh_l0"),
                ("gru", "spectral_norm", "weight_hh_l1")]


@pytest.mark.parametrize("kind,how,weight", PARAMETRIZED, ids=[f"{k}-{h}" for k, h, _ in PARAMETRIZED])
def test_parametrized_weights_are_recorded_as_the_forward_used_them(kind, how, weight, tmp_path, scan_path):
    """torch.nn.utils.parametrizations on a recurrent weight: weight_norm, orthogonal
    (a remedy for vanishing and exploding gradients) and spectral_norm, whose power
    iteration changes the weight at every forward pass in training mode. Three SGD
    steps; each record equals the reference unrolled on the weights that step's
    forward pass computed (read right after it, in eval mode: a spectral norm then
    computes the weight from its vectors as they are, without iterating again).
    The parameter gradient norms are PyTorch's, under the originals' names."""
    check_parametrized(kind, how, weight, tmp_path, torch.device("cpu"))


def check_parametrized(kind: str, how: str, weight: str, tmp_path, device: torch.device) -> None:
    """The module on ``device``, the reference on the CPU with the weights as the
    device computed them."""
    cfg = Config(kind, layers=2)
    torch.manual_seed(0)
    model = make_module(cfg)
    getattr(torch.nn.utils.parametrizations, how)(model, weight)
    model = model.to(device)
    names = list(make_module(cfg).state_dict())  # the plain module's: weight_ih_l0, weight_hh_l0, ...

    def used() -> dict[str, torch.Tensor]:
        model.eval()  # a spectral norm computes the weight from its vectors as they are
        try:
            return {name: getattr(model, name).detach().cpu().clone() for name in names}
        finally:
            model.train()

    steps = sgd_steps_with_weights(model, cfg, tmp_path / "trace.h5", device, used)
    assert any(name.startswith("parametrizations.") for name in steps[0][5])
    with seqscope.open(tmp_path / "trace.h5") as trace:
        # a watched parametrized module is named after the class it was made from
        assert trace.layers == [f"{kind.split('_')[0]}.l0", f"{kind.split('_')[0]}.l1"]
        check_steps(trace, cfg, steps)


def sgd_steps_with_weights(model: nn.Module, cfg: Config, path, device: torch.device,
                           used: Callable[[], dict[str, torch.Tensor]]) -> list[tuple[Any, ...]]:
    """Three SGD steps of ``model`` on ``device``, every one recorded into ``path``;
    per step, as check_steps takes them: the weights its forward pass ran with
    (``used()`` right after it), its sequences, h0, c0, loss terms, and PyTorch's
    gradient norms."""
    gen = torch.Generator().manual_seed(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    steps = []
    with seqscope.watch(model, path, every=1, sequences=B, precision="full"):
        for _ in range(3):
            seqs, h0, c0 = make_inputs(cfg, gen)
            terms = make_loss_terms(cfg, gen)
            output, state = model(module_input(cfg, [x.to(device) for x in seqs]))
            weights = used()
            h_n, c_n = state if cfg.kind == "lstm" else (state, None)
            loss_of(per_sequence_outputs(cfg, output), h_n, c_n, tuple(t.to(device) for t in terms)).backward()
            pg = {name: ref.norm(p.grad.cpu()).item() for name, p in model.named_parameters()}
            opt.step()
            opt.zero_grad()
            steps.append((weights, seqs, h0, c0, terms, pg))
    return steps


class _WeightDrop(nn.Module):
    """AWD-LSTM's DropConnect on the recurrent weights (Merity et al., 2018): the raw
    weights are parameters of this wrapper; each forward pass sets a dropped-out copy
    as the module's ``weight_hh_l<k>``, a plain tensor where a Parameter was."""

    def __init__(self, rnn: nn.Module, p: float) -> None:
        super().__init__()
        self.rnn, self.p = rnn, p
        self.names = [f"weight_hh_l{k}" for k in range(rnn.num_layers)]
        for name in self.names:
            raw = rnn._parameters.pop(name)
            self.register_parameter(name + "_raw", nn.Parameter(raw.detach().clone()))

    def forward(self, x):
        for name in self.names:
            setattr(self.rnn, name, nn.functional.dropout(getattr(self, name + "_raw"), self.p, self.training))
        return self.rnn(x)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrent_weights_set_before_each_forward_are_recorded_as_used(kind, tmp_path, scan_path):
    """A wrapper that sets the module's recurrent weights before each forward pass
    (AWD-LSTM's weight drop: a new dropout mask on W_hh at every step). Three SGD
    steps of a 2-layer module on packed sequences; each record equals the reference
    unrolled on the weights that step's forward pass used, and the parameter
    gradient norms are PyTorch's, the raw weights' included."""
    check_weight_drop(kind, tmp_path, torch.device("cpu"))


def check_weight_drop(kind: str, tmp_path, device: torch.device) -> None:
    """The wrapped module on ``device``, the reference on the CPU."""
    cfg = Config(kind, layers=2, packed=True)
    torch.manual_seed(0)
    module = make_module(cfg)
    names = list(module.state_dict())
    model = _WeightDrop(module, 0.5).to(device)
    steps = sgd_steps_with_weights(model, cfg, tmp_path / "trace.h5", device, lambda: {
        name: getattr(module, name).detach().cpu().clone() for name in names})
    assert "weight_hh_l0_raw" in steps[0][5]
    for used, *_ in steps:  # the masks differ from step to step
        assert (used["weight_hh_l0"] == 0).any()
    with seqscope.open(tmp_path / "trace.h5") as trace:
        assert trace.layers == ["rnn.l0", "rnn.l1"]
        check_steps(trace, cfg, steps, prefix="rnn")


@pytest.mark.parametrize("update", ["optimizer", "accumulation", "by hand", "lbfgs"])
def test_a_loop_that_calls_the_models_parts_records_each_step(update, tmp_path, scan_path, caplog):
    """A sequence-to-sequence loop calls ``model["enc"]`` and ``model["dec"]``, never
    the watched model (an nn.ModuleDict, which has no forward): each forward and
    backward pass is one step, whether an optimizer steps after each, after every
    second (gradient accumulation), or the loop updates the weights itself with no
    optimizer. With LBFGS each optimizer step is one step, recorded at the closure's
    first evaluation. Every record equals the references unrolled on the weights its
    pass ran with; the parameter gradient norms are that pass's own."""
    enc_cfg, dec_cfg = Config("gru", layers=2), Config("lstm", bidirectional=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    model = nn.ModuleDict({"enc": make_module(enc_cfg), "dec": make_module(dec_cfg)})
    params = list(model.parameters())
    opt: torch.optim.Optimizer | None = None
    if update in ("optimizer", "accumulation"):
        opt = torch.optim.SGD(params, lr=0.05)
    elif update == "lbfgs":
        opt = torch.optim.LBFGS(params, lr=0.1, max_iter=3)
    steps = []  # per step: the weights before its pass, each part's inputs and terms, its gradient norms
    path = tmp_path / "trace.h5"

    def one_pass():
        parts = {}
        for name, cfg in (("enc", enc_cfg), ("dec", dec_cfg)):
            seqs, h0, c0 = make_inputs(cfg, gen)
            parts[name] = (cfg, seqs, h0, c0, make_loss_terms(cfg, gen))
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        grads_before = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
        loss = 0
        for name, (cfg, seqs, h0, c0, terms) in parts.items():
            output, state = model[name](module_input(cfg, seqs))
            h_n, c_n = state if cfg.kind == "lstm" else (state, None)
            loss = loss + loss_of(per_sequence_outputs(cfg, output), h_n, c_n, terms)
        loss.backward()
        pg = {name: ref.norm(p.grad - g).item() for (name, p), g in zip(model.named_parameters(), grads_before)}
        return loss, (before, parts, pg)

    with seqscope.watch(model, path, every=1, sequences=B, precision="full"):
        for i in range(4):
            if update == "lbfgs":
                evaluations = []

                def closure(evaluations=evaluations):
                    opt.zero_grad()
                    loss, step = one_pass()
                    evaluations.append(step)
                    return loss

                opt.step(closure)
                assert len(evaluations) > 1  # one step, several passes through the model
                steps.append(evaluations[0])
                continue
            steps.append(one_pass()[1])
            if update == "optimizer" or (update == "accumulation" and i % 2 == 1):
                opt.step()
                opt.zero_grad()
            elif update == "by hand":
                with torch.no_grad():
                    for p in params:
                        p -= 0.05 * p.grad
                        p.grad = None
    assert "ran more than once" not in caplog.text
    with seqscope.open(path) as trace:
        assert list(trace.steps) == [0, 1, 2, 3]
        for step, (before, parts, pg) in enumerate(steps):
            for name, (cfg, seqs, h0, c0, terms) in parts.items():
                module = make_module(cfg)
                module.load_state_dict({k[len(name) + 1:]: v for k, v in before.items() if k.startswith(name + ".")})
                own = {k: v for k, v in pg.items() if k.startswith(name + ".")}
                check_step(trace, step, cfg, module, seqs, h0, c0, terms, own, prefix=name)


def test_a_model_in_distributed_data_parallel_is_recorded(tmp_path):
    """DistributedDataParallel (one process, gloo): seqscope watches the wrapper; its
    gradient hooks run beside DDP's gradient reduction. Three SGD steps against the
    reference."""
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cfg = Config("lstm", layers=2, h0=True)
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(3)
        model = make_module(cfg)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.2)
        steps = []
        with seqscope.watch(ddp, tmp_path / "trace.h5", every=1, sequences=B, precision="full"):
            for _ in range(3):
                seqs, h0, c0 = make_inputs(cfg, gen)
                terms = make_loss_terms(cfg, gen)
                before = {k: v.detach().clone() for k, v in model.state_dict().items()}
                output, (h_n, c_n) = ddp(module_input(cfg, seqs), (h0, c0))
                loss_of(per_sequence_outputs(cfg, output), h_n, c_n, terms).backward()
                pg = {name: ref.norm(p.grad).item() for name, p in ddp.named_parameters()}
                opt.step()
                opt.zero_grad()
                steps.append((before, seqs, h0, c0, terms, pg))
        with seqscope.open(tmp_path / "trace.h5") as trace:
            assert trace.layers == ["module.l0", "module.l1"]
            check_steps(trace, cfg, steps, prefix="module")
    finally:
        dist.destroy_process_group()


def _distributed_worker(rank: int, world: int, tmp: str) -> None:
    """One process of test_each_process_of_a_distributed_job: DistributedDataParallel
    (gloo), two steps watched with the plain path, then two with {rank} in the path.
    Saves each step's inputs, this process's own gradient norms (a copy of the model
    run on its batch alone) and those that DDP leaves in .grad (averaged over the
    processes)."""
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        cfg = Config("lstm", layers=2, h0=True)
        torch.manual_seed(0)
        model = make_module(cfg)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.2)
        gen = torch.Generator().manual_seed(10 + rank)
        runs = {}
        for label, path in (("plain", f"{tmp}/trace.h5"), ("ranks", f"{tmp}/trace-rank{{rank}}.h5")):
            steps = []
            with seqscope.watch(ddp, path, every=1, sequences=B, precision="full") as scope:
                for _ in range(2):
                    seqs, h0, c0 = make_inputs(cfg, gen)
                    terms = make_loss_terms(cfg, gen)
                    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    alone = make_module(cfg)
                    alone.load_state_dict(before)
                    out, (h_n, c_n) = alone(module_input(cfg, seqs), (h0, c0))
                    loss_of(per_sequence_outputs(cfg, out), h_n, c_n, terms).backward()
                    own = {"module." + n: ref.norm(p.grad).item() for n, p in alone.named_parameters()}
                    out, (h_n, c_n) = ddp(module_input(cfg, seqs), (h0, c0))
                    loss_of(per_sequence_outputs(cfg, out), h_n, c_n, terms).backward()
                    averaged = {n: ref.norm(p.grad).item() for n, p in ddp.named_parameters()}
                    scope.log(rank=rank)
                    opt.step()
                    opt.zero_grad()
                    steps.append((before, seqs, h0, c0, terms, own, averaged))
            runs[label] = (scope.path, steps)
        torch.save(runs, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_each_process_of_a_distributed_job(tmp_path):
    """DistributedDataParallel over two processes: with a plain path rank 0 alone
    records (the other process's scope does nothing, so the two never write one
    file); with {rank} in the path each process records its own trace. A trace holds
    its process's numbers: its batch, and its gradients before DDP averages them
    across the processes."""
    torch.multiprocessing.spawn(_distributed_worker, args=(2, str(tmp_path)), nprocs=2)
    runs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert runs[0]["plain"][0] == str(tmp_path / "trace.h5")
    assert runs[1]["plain"][0] is None
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == ["trace-rank0.h5", "trace-rank1.h5", "trace.h5"]
    cfg = Config("lstm", layers=2, h0=True)
    for rank, label in ((0, "plain"), (0, "ranks"), (1, "ranks")):
        path, steps = runs[rank][label]
        assert path == str(tmp_path / ("trace.h5" if label == "plain" else f"trace-rank{rank}.h5"))
        with seqscope.open(path) as trace:
            assert trace.layers == ["module.l0", "module.l1"]
            assert list(trace.scalars()["rank"].values) == [rank, rank]
            check_steps(trace, cfg, [s[:6] for s in steps], prefix="module")
        for *_, own, averaged in steps:
            # the processes' batches differ, so the averaged gradient is not this one's
            assert max(abs(own[n] - averaged[n]) / averaged[n] for n in own) > 1e-3


def test_a_second_backward_pass_is_said_once_and_the_first_is_recorded(tmp_path, caplog):
    """Two losses, each with its own backward() on one forward pass: .grad holds the
    sum, which no hook sees whole. seqscope records the first pass (hidden-state
    and parameter gradients alike, not a mix of passes) and says so once."""
    cfg = Config("lstm")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    module = make_module(cfg)
    seqs, h0, c0 = make_inputs(cfg, gen)
    terms = make_loss_terms(cfg, gen)
    watched, alone = copy.deepcopy(module), copy.deepcopy(module)
    path = tmp_path / "trace.h5"
    with caplog.at_level(logging.WARNING, logger="seqscope"):
        with seqscope.watch(watched, path, every=1, sequences=B, precision="full"):
            for _ in range(2):
                output, (h_n, c_n) = watched(module_input(cfg, seqs))
                loss_of(per_sequence_outputs(cfg, output), h_n, c_n, terms).backward(retain_graph=True)
                output.pow(3).sum().backward()
    said = [r for r in caplog.records if "more than one backward pass" in r.getMessage()]
    assert len(said) == 1
    # the first loss alone: PyTorch's parameter gradients, the reference's BPTT norms
    output, (h_n, c_n) = alone(module_input(cfg, seqs))
    loss_of(per_sequence_outputs(cfg, output), h_n, c_n, terms).backward()
    layers, ref_out, ref_hn, ref_cn = ref.run_reference(module, seqs)
    loss_of(ref_out, ref_hn, ref_cn, terms).backward()
    with seqscope.open(path) as trace:
        for step in (0, 1):
            for name, p in alone.named_parameters():
                want = ref.norm(p.grad).item()
                assert trace.scalars()["grad_norm/" + name].values[step] == pytest.approx(want, rel=1e-9)
            grads = trace.grad_norms("lstm.l0", step)
            layer = layers[(0, 0)]
            for b in range(B):
                np.testing.assert_allclose(grads["hidden"][b].data, [ref.norm(h.grad).item() for h in layer.h[b]],
                                           rtol=1e-9)
                np.testing.assert_allclose(grads["cell"][b].data, [ref.norm(c.grad).item() for c in layer.c[b]],
                                           rtol=1e-9)


class _SharedAcrossCheckpoint(nn.Module):
    """A parameter used before a checkpointed segment and inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(IN, IN).double()
        self.rnn = nn.GRU(IN, HID).double()

    def forward(self, x, reentrant: bool):
        def segment(z):
            return self.rnn(self.proj(z))[0]
        return torch.utils.checkpoint.checkpoint(segment, self.proj(x), use_reentrant=reentrant)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_a_parameter_used_inside_and_outside_a_checkpoint(reentrant, tmp_path, caplog):
    """Non-reentrant checkpointing is one backward pass: the parameter's recorded
    gradient norm is PyTorch's. A reentrant checkpoint runs an inner backward pass,
    so a parameter used inside and outside it gets its gradient in two parts;
    seqscope records the first and says so once."""
    torch.manual_seed(0)
    model = _SharedAcrossCheckpoint()
    x = torch.randn(T, B, IN, dtype=torch.float64, requires_grad=True)
    path = tmp_path / "trace.h5"
    with caplog.at_level(logging.WARNING, logger="seqscope"):
        with seqscope.watch(model, path, every=1):
            model(x, reentrant).pow(2).sum().backward()
    said = [r for r in caplog.records if "more than one backward pass" in r.getMessage()]
    want = ref.norm(model.proj.weight.grad).item()
    with seqscope.open(path) as trace:
        got = trace.scalars()["grad_norm/proj.weight"].values[0]
    if reentrant:
        assert len(said) == 1 and "use_reentrant=False" in said[0].getMessage()
        assert got < want * (1 - 1e-6)  # a part of the gradient, as the warning says
    else:
        assert not said
        assert got == pytest.approx(want, rel=1e-12)


CUDA_CONFIGS = [c for c in CONFIGS if c.dtype == torch.float64 and (c.layers == 2 or c.packed or c.proj)] + [
    Config(kind, dtype=torch.float32) for kind in ("lstm", "gru", "rnn_tanh")]


def test_recorded_numbers_on_cuda_match_unrolled_reference(tmp_path, caplog):
    """The module and the recording on the GPU (cuDNN), the reference on the CPU
    in the module's dtype, over a subset of the configurations, LSTMCell/GRUCell/
    RNNCell loops, LSTM/GRU/RNN under autocast float16 and bfloat16 (check_autocast),
    a GradScaler (check_grad_scaler), NaN/Inf counts (check_nonfinite), parameters
    updated in place before a step's record is finished (update_between),
    parametrized cells and modules, weights set before each forward (weight drop),
    torch.compile (inductor, reduce-overhead), loops over timesteps in the training
    script or a model called once per timestep, a fused module called once per
    timestep in a decoder loop, a cell loop run on two inputs before
    one backward pass, user-written cells, a custom cell's re-runs leaving training unchanged
    (the CUDA generator), and CUDA graphs (one test, so that a machine without CUDA
    shows one skip). SEQSCOPE_REQUIRE_CUDA=1 (set by benchmarks/gpu_check.sh) turns
    the skip into a failure."""
    if not torch.cuda.is_available():
        if os.environ.get("SEQSCOPE_REQUIRE_CUDA") == "1":
            pytest.fail("SEQSCOPE_REQUIRE_CUDA=1 but torch.cuda.is_available() is False")
        pytest.skip("no CUDA device (run benchmarks/gpu_check.sh on a GPU machine)")
    failures: list[str] = []

    def attempt(label: str, check: Callable[[Path], object]) -> None:
        (tmp_path / label).mkdir()
        try:
            check(tmp_path / label)
        except Exception as exc:  # noqa: BLE001 - one check's crash must not hide the others' results
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            failures.append(f"{label}: {type(exc).__name__}: " + " | ".join(lines[:6]))

    cuda = torch.device("cuda")
    # every layout first with the eager per-timestep loops (CUDA graphs off: SEQSCOPE_CUDA_GRAPHS=0)
    graphs.reset()
    graphs_default, graphs._off = graphs._off, True
    for cfg in CUDA_CONFIGS:
        attempt(cfg.id, lambda folder, cfg=cfg: check_against_reference(cfg, folder, cuda))
        if cfg.dtype == torch.float32:  # and with cuDNN's TF32 off: float32 tolerances as on the CPU
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                attempt(cfg.id + "-no-tf32", lambda folder, cfg=cfg: check_against_reference(cfg, folder, cuda))
    # the same layouts again, with CUDA graphs on (the default, capture.graphs): the
    # per-timestep loops now replay as graphs
    graphs.reset()
    graphs._off = False
    repeated = [c for c in CUDA_CONFIGS if c.packed and c.bidirectional] + [Config("rnn_tanh", layers=2)]
    for rep in range(3):
        for cfg in repeated:
            attempt(f"{cfg.id}-repeat{rep}", lambda folder, cfg=cfg: check_against_reference(cfg, folder, cuda))
    if graphs._off or not graphs._graphs:
        failures.append(f"CUDA graphs were not used (off: {graphs._off}, captured: {len(graphs._graphs)})")
    # while the writer thread of a scope works (it waits on copies' events): a capture
    # must not be invalidated by it (seen on an H200 with PyTorch's default global mode)
    attempt("graphs-while-the-writer-works", lambda folder: check_graphs_while_writing(folder, cuda))
    graphs.reset()
    graphs._off = graphs_default  # the rest with seqscope's defaults
    for kind in ("lstm", "gru", "rnn_tanh"):
        # cell loops (CUDA runs LSTMCell and GRUCell as fused kernels); cuDNN under autocast float16
        attempt(f"cells-{kind}", lambda folder, kind=kind: check_cell_loop(kind, True, 3, folder, cuda))
        attempt(f"cells-{kind}-updated", lambda folder, kind=kind: check_cell_loop(kind, True, 3, folder, cuda,
                                                                                    update_between=True))
        attempt(f"autocast-float16-{kind}", lambda folder, kind=kind: check_autocast(kind, folder, cuda, torch.float16))
        attempt(f"autocast-bfloat16-{kind}", lambda folder, kind=kind: check_autocast(kind, folder, cuda,
                                                                                     torch.bfloat16))
    attempt("grad-scaler", lambda folder: check_grad_scaler(folder, cuda))
    for cfg in UPDATED:  # parameters updated in place before the step's record is finished
        attempt(cfg.id + "-updated", lambda folder, cfg=cfg: check_against_reference(cfg, folder, cuda,
                                                                                      update_between=True))
    attempt("nonfinite-count", lambda folder: check_nonfinite(folder, cuda))  # counted on the GPU, no sync
    for parametrization in ("weight_norm", "orthogonal"):  # the value each cell call computed
        attempt(f"cells-lstm-{parametrization}", lambda folder, p=parametrization: check_cell_loop(
            "lstm", True, 3, folder, cuda, update_between=True, parametrization=p))
    for kind, how, weight in PARAMETRIZED:  # cuDNN on weights computed at each forward
        attempt(f"{kind}-{how}", lambda folder, k=kind, h=how, w=weight: check_parametrized(k, h, w, folder, cuda))
    for mode in (None, "reduce-overhead"):  # torch.compile: inductor, and with PyTorch's own CUDA graphs
        attempt(f"compiled-{mode or 'default'}", lambda folder, m=mode: check_compiled(folder, cuda, m))
    for kind in ("lstm", "gru"):  # recurrent weights set before each forward (AWD-LSTM's weight drop)
        attempt(f"weight-drop-{kind}", lambda folder, k=kind: check_weight_drop(k, folder, cuda))
    for kind in ("lstm", "gru"):  # a loop over timesteps in the script: steps begin at the cells' calls
        attempt(f"script-loop-{kind}", lambda folder, k=kind: check_script_loop(k, folder, cuda))
        # the watched model itself called once per timestep: one step per backward pass
        attempt(f"model-per-timestep-{kind}", lambda folder, k=kind: check_script_loop(k, folder, cuda,
                                                                                      model_per_timestep=True))
        attempt(f"cells-two-inputs-{kind}", lambda folder, k=kind: check_two_inputs(k, folder, cuda))
    for kind, chunk, proj, batch_first in (("lstm", 1, 3, True), ("gru", 1, 0, False), ("rnn_tanh", 4, 0, False)):
        # a fused module called once per timestep (or chunk), each call given the state the one before returned
        attempt(f"decoder-{kind}-by{chunk}", lambda folder, a=(kind, chunk, proj, batch_first): check_decoder_loop(
            *a, folder, caplog, cuda))
    for which in ("peephole-tuple-state", "minimal-dataclass-state"):  # user-written cells
        attempt(f"custom-{which}-updated", lambda folder, w=which: check_custom_cell(
            w, torch.float64, 1.0, False, folder, update_between=True, device=cuda))
    for extra in ("dropout", "batchnorm"):  # the CUDA generator forked around seqscope's re-runs
        attempt(f"custom-cell-{extra}-unchanged", lambda folder, e=extra: check_training_unchanged(e, True, folder,
                                                                                                   cuda))
    for kind in ("lstm", "gru"):  # each timestep in a reentrant checkpoint: calls recomputed newest first
        attempt(f"checkpointed-per-step-{kind}", lambda folder, k=kind: check_checkpointed_per_step(k, True, folder,
                                                                                                    cuda))
    for batch_first, sources in ((False, 7), (False, None), (True, None)):  # a memory argument's layout
        attempt(f"memory-{'batch-first' if batch_first else 'time-major'}-{sources or 'square'}",
                lambda folder, bf=batch_first, s=sources: check_memory_argument(bf, s, folder, cuda))
    assert not failures, "\n".join(failures)


def check_graphs_while_writing(tmp_path, device: torch.device) -> None:
    """Many recorded steps of new layouts back to back, the writer never drained
    in between, so that captures overlap its work; then the CUDA random number
    generator must still work (a failed capture leaves it unusable) and graphs
    must still be on."""
    graphs.reset()
    torch.manual_seed(0)
    for n_time in (5, 6, 7, 8):
        model = nn.LSTM(IN, HID, num_layers=2).to(device)
        with seqscope.watch(model, tmp_path / f"w{n_time}.h5", every=1):
            for _ in range(4):
                out, _ = model(torch.randn(n_time, B, IN, device=device))
                out.pow(2).sum().backward()
    torch.randn(3, device=device)
    assert not graphs._off and graphs._graphs, "CUDA graphs were turned off by a failed capture"


def check_against_reference(cfg: Config, tmp_path, device: torch.device, loss_scale: float = 1.0,
                            update_between: bool = False) -> None:
    """``loss_scale`` multiplies the loss (and so every gradient): gradients far
    from 1 must keep their norms, which float32 squares would not.
    ``update_between``: the parameters change in place after the backward pass (as
    in an optimizer step) and the next step's forward runs, which is when seqscope
    finishes step 0's record: the record must still hold step 0's numbers."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    module = make_module(cfg)
    seqs, h0, c0 = make_inputs(cfg, gen)
    terms = make_loss_terms(cfg, gen)
    on_device = copy.deepcopy(module).to(device)

    def dev(t):
        return None if t is None else t.to(device)

    hx = None if h0 is None else ((dev(h0), dev(c0)) if cfg.kind == "lstm" else dev(h0))
    path = tmp_path / "trace.h5"
    with seqscope.watch(on_device, path, every=1, sequences=B, precision="full") as scope:
        output, state = on_device(module_input(cfg, [dev(x) for x in seqs]), hx)
        h_n, c_n = state if cfg.kind == "lstm" else (state, None)
        loss = loss_scale * loss_of(per_sequence_outputs(cfg, output), h_n, c_n, tuple(dev(t) for t in terms))
        loss.backward()
        scope.log(loss=loss)
        if update_between:
            with torch.no_grad():
                for p in on_device.parameters():
                    p.mul_(-0.5).add_(0.25)
            on_device(module_input(cfg, [dev(x) for x in seqs]), hx)

    layers, ref_out, ref_hn, ref_cn = ref.run_reference(module, seqs, h0, c0)
    ref_loss = loss_scale * loss_of(ref_out, ref_hn, ref_cn, terms)
    ref_loss.backward(retain_graph=True)
    # the reference reproduces the module itself
    tol = _tol(cfg, device)
    for got, want in zip(per_sequence_outputs(cfg, output), ref_out):
        torch.testing.assert_close(got.detach().cpu(), want.detach(), rtol=tol["module"], atol=tol["atol_module"])

    n_dir = 2 if cfg.bidirectional else 1
    # read the reference's gradients before propagation() runs more backward passes
    # (norms in float64: the squares of float32 gradients overflow above ~1.8e19 and
    # vanish below ~1e-19, and seqscope promises float64 norms)
    ref_gh = {key: [[ref.norm(h.grad).item() for h in hs] for hs in lay.h]
              for key, lay in layers.items()}
    ref_gc = {key: [[ref.norm(c.grad).item() for c in cs] for cs in lay.c]
              for key, lay in layers.items()} if cfg.kind == "lstm" else {}
    # the module's own parameter gradients (PyTorch's autograd), their norms in float64
    ref_pg = {name: ref.norm(p.grad.cpu()).item() for name, p in on_device.named_parameters()}
    with seqscope.open(path) as trace:
        assert list(trace.steps) == ([0, 1] if update_between else [0])
        expected_names = [f"{cfg.kind.split('_')[0]}.l{k}" + ("_reverse" if d else "")
                          for k in range(cfg.layers) for d in range(n_dir)]
        assert trace.layers == expected_names
        np.testing.assert_allclose(trace.scalars()["loss"].values, [ref_loss.item()], rtol=tol["loss"])
        for k in range(cfg.layers):
            for d in range(n_dir):
                name = expected_names[k * n_dir + d]
                layer = layers[(k, d)]
                hidden = trace.hidden(name, 0)
                grads = trace.grad_norms(name, 0)
                prop = trace.propagation(name, 0)
                gates = trace.gates(name, 0)
                lengths = trace.lengths(name, 0)
                assert list(lengths) == [len(s) for s in seqs]
                assert list(trace.sequence_index(name, 0)) == list(range(B))
                for b, length in enumerate(lengths):
                    # padding is masked, real timesteps are not
                    assert not np.ma.getmaskarray(hidden[b, :length]).any()
                    assert np.ma.getmaskarray(hidden[b, length:]).all()
                    want_h = torch.stack(layer.h[b]).detach().numpy()
                    np.testing.assert_allclose(hidden[b, :length].data, want_h, rtol=tol["states"],
                                               atol=tol["atol_states"])
                    want_gh = np.array(ref_gh[(k, d)][b])
                    np.testing.assert_allclose(grads["hidden"][b, :length].data, want_gh, rtol=tol["grads"])
                    want_p = ref.propagation(layer, b, d).numpy()
                    np.testing.assert_allclose(prop[b, :length].data, want_p, rtol=tol["grads"], atol=1e-300)
                    last = length - 1 if d == 0 else 0
                    assert prop[b, last] == pytest.approx(1.0, rel=1e-12 if cfg.dtype == torch.float64 else 1e-6)
                    for gname, values in gates.items():
                        want_g = torch.stack([g[gname] for g in layer.gates[b]]).detach().numpy()
                        np.testing.assert_allclose(values[b, :length].data, want_g, rtol=tol["states"],
                                                   atol=tol["atol_states"])
                    if cfg.kind == "lstm":
                        want_c = torch.stack(layer.c[b]).detach().numpy()
                        np.testing.assert_allclose(trace.cell(name, 0)[b, :length].data, want_c,
                                                   rtol=tol["states"], atol=tol["atol_states"])
                        want_gc = np.array(ref_gc[(k, d)][b])
                        np.testing.assert_allclose(grads["cell"][b, :length].data, want_gc, rtol=tol["grads"])
                expected_gates = {"lstm": 4, "gru": 3}.get(cfg.kind, 0)
                assert len(gates) == expected_gates
                # largest singular value of W_hh
                w_hh = ref.layer_weights(module, k, d)["w_hh"]
                want_sigma = torch.linalg.svdvals(w_hh.double())[0].item()
                got_sigma = trace.scalars()["sigma_max/" + name].values[0]
                assert got_sigma == pytest.approx(want_sigma, rel=1e-5)
        scalars = trace.scalars()
        for name, want in ref_pg.items():
            assert scalars["grad_norm/" + name].values[0] == pytest.approx(want, rel=1e-6)
        total = float(np.sqrt(sum(v * v for v in ref_pg.values())))
        assert scalars["grad_norm"].values[0] == pytest.approx(total, rel=1e-6)


EXTREME = [(kind, scale) for kind in ("lstm", "gru", "rnn_tanh") for scale in (1e22, 1e-24)]


@pytest.mark.parametrize("kind,scale", EXTREME, ids=[f"{k}-{s:g}" for k, s in EXTREME])
def test_float32_gradient_norms_beyond_the_range_of_their_squares(kind, scale, tmp_path, scan_path):
    """A float32 model whose gradients are ~1e22 (exploding) or ~1e-24 (vanishing):
    each element is an ordinary float32, but its square is not (overflow above
    ~1.8e19, underflow below ~1e-19). Recorded norms, the propagation seed's
    direction and the parameter gradient norms must still be the true ones."""
    cfg = Config(kind, layers=2, dtype=torch.float32)
    check_against_reference(cfg, tmp_path, torch.device("cpu"), loss_scale=scale)


def test_parameter_and_global_gradient_norms(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential()
    lstm = nn.LSTM(3, 5, num_layers=2).double()
    head = nn.Linear(5, 1).double()

    x = torch.randn(6, 4, 3, dtype=torch.float64)
    with seqscope.watch(lstm, tmp_path / "t.h5", every=1) as scope:
        out, _ = lstm(x)
        loss = head(out).pow(2).mean()
        loss.backward()
        scope.log(loss=loss)
    with seqscope.open(tmp_path / "t.h5") as trace:
        scalars = trace.scalars()
        for name, p in lstm.named_parameters():
            got = scalars["grad_norm/" + name].values[0]
            assert got == pytest.approx(torch.linalg.vector_norm(p.grad).item(), rel=1e-12)
        total = torch.sqrt(sum(p.grad.pow(2).sum() for p in lstm.parameters())).item()
        assert scalars["grad_norm"].values[0] == pytest.approx(total, rel=1e-12)
    del model


def test_sequence_selection_and_float16_storage(tmp_path):
    cfg = Config("lstm", layers=2, packed=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    module = make_module(cfg)
    seqs, _, _ = make_inputs(cfg, gen)
    terms = make_loss_terms(cfg, gen)
    for sequences in (2, [3, 1]):
        path = tmp_path / f"t{sequences}.h5"
        module.zero_grad()
        with seqscope.watch(module, path, every=1, sequences=sequences, precision="float16"):
            output, (h_n, c_n) = module(module_input(cfg, seqs))
            loss_of(per_sequence_outputs(cfg, output), h_n, c_n, terms).backward()
        layers, ref_out, ref_hn, ref_cn = ref.run_reference(module, seqs)
        loss_of(ref_out, ref_hn, ref_cn, terms).backward(retain_graph=True)
        chosen = [0, 1] if sequences == 2 else [3, 1]
        with seqscope.open(path) as trace:
            assert list(trace.sequence_index("lstm.l1", 0)) == chosen
            hidden = trace.hidden("lstm.l1", 0)
            cell = trace.cell("lstm.l1", 0)
            grads = trace.grad_norms("lstm.l1", 0)["hidden"]
            for row, b in enumerate(chosen):
                n = len(seqs[b])
                want_h = torch.stack(layers[(1, 0)].h[b]).detach().numpy()
                want_c = torch.stack(layers[(1, 0)].c[b]).detach().numpy()
                # float16 keeps 11 significant bits
                np.testing.assert_allclose(hidden[row, :n].data, want_h, rtol=2**-10, atol=2**-14)
                np.testing.assert_allclose(cell[row, :n].data, want_c, rtol=2**-10, atol=2**-14)
                want_g = [torch.linalg.vector_norm(h.grad).item() for h in layers[(1, 0)].h[b]]
                np.testing.assert_allclose(grads[row, :n].data, want_g, rtol=1e-5)  # norms stay float64


def test_dropout_between_layers_records_what_the_model_computed(tmp_path):
    torch.manual_seed(0)
    module = nn.LSTM(IN, HID, num_layers=3, dropout=0.5).double().train()
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randn(T, IN, generator=gen, dtype=torch.float64) for _ in range(B)]
    x = torch.stack(seqs, dim=1)
    torch.manual_seed(123)
    with seqscope.watch(module, tmp_path / "t.h5", every=1, sequences=B, precision="full"):
        out, (h_n, c_n) = module(x)
        (out.pow(2).sum() + h_n.sum()).backward()
    # the recorder draws one dropout mask per layer boundary, shape [T, B, H]
    torch.manual_seed(123)
    masks = [torch.nn.functional.dropout(torch.ones(T, B, HID, dtype=torch.float64), 0.5, True) for _ in range(2)]
    layers, ref_out, ref_hn, ref_cn = ref.run_reference(module, seqs, dropout_masks=masks)
    torch.testing.assert_close(torch.stack(ref_out, 1), out.detach())
    (torch.stack(ref_out, 1).pow(2).sum() + ref_hn.sum()).backward()
    with seqscope.open(tmp_path / "t.h5") as trace:
        for k in range(3):
            for b in range(B):
                want = [torch.linalg.vector_norm(h.grad).item() for h in layers[(k, 0)].h[b]]
                np.testing.assert_allclose(trace.grad_norms(f"lstm.l{k}", 0)["hidden"][b].data, want, rtol=1e-5)
                want_c = torch.stack(layers[(k, 0)].c[b]).detach().numpy()
                np.testing.assert_allclose(trace.cell(f"lstm.l{k}", 0)[b].data, want_c, rtol=1e-6, atol=1e-9)


def test_unbatched_input(tmp_path):
    torch.manual_seed(0)
    module = nn.GRU(IN, HID, num_layers=2).double()
    x = torch.randn(T, IN, dtype=torch.float64)
    with seqscope.watch(module, tmp_path / "t.h5", every=1, precision="full"):
        out, h = module(x)
        assert out.shape == (T, HID) and h.shape == (2, HID)
        out.sum().backward()
    layers, ref_out, _, _ = ref.run_reference(module, [x])
    ref_out[0].sum().backward()
    with seqscope.open(tmp_path / "t.h5") as trace:
        want = [torch.linalg.vector_norm(h.grad).item() for h in layers[(0, 0)].h[0]]
        np.testing.assert_allclose(trace.grad_norms("gru.l0", 0)["hidden"][0].data, want, rtol=1e-5)


class _OneNode(torch.autograd.Function):
    """Identity on a layer's (output, h_n[, c_n]) that makes them outputs of one
    autograd node with undefined gradients left undefined: the shape of cuDNN's
    RNN node, where a loss on the output alone calls h_n's tensor hooks with None."""

    @staticmethod
    def forward(ctx, *outputs):  # type: ignore[no-untyped-def]
        ctx.set_materialize_grads(False)
        return tuple(o.view_as(o) for o in outputs)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[no-untyped-def]
        return grads


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_final_states_the_loss_does_not_use(kind, tmp_path, monkeypatch):
    """Found on an H200: the recorder's hook crashed the backward pass when the
    loss used only the output. Reproduced on the CPU by giving the layer's
    outputs cuDNN's single autograd node; the norms must still be the reference's."""
    from seqscope.capture import fused

    def one_node(fn):  # type: ignore[no-untyped-def]
        def run(*args):  # type: ignore[no-untyped-def]
            out = fn(*args)
            return _OneNode.apply(*out)
        return run

    seen_none = []

    def spy(register):  # type: ignore[no-untyped-def]
        def register_hook(self, hook):  # type: ignore[no-untyped-def]
            def wrapped(g):  # type: ignore[no-untyped-def]
                seen_none.append(g is None)
                return hook(g)
            return register(self, wrapped)
        return register_hook

    monkeypatch.setattr(fused, "_VF", types.SimpleNamespace(**{k: one_node(getattr(torch._VF, k))
                                                              for k in ("lstm", "gru", "rnn_tanh", "rnn_relu")}))
    monkeypatch.setattr(torch.Tensor, "register_hook", spy(torch.Tensor.register_hook))
    torch.manual_seed(0)
    module = make_module(Config(kind, layers=2))
    x = torch.randn(T, B, IN, dtype=torch.float64)
    with seqscope.watch(module, tmp_path / "t.h5", every=1, sequences=B, precision="full"):
        out, _ = module(x)
        out.pow(2).sum().backward()
    monkeypatch.undo()
    assert any(seen_none), "no hook saw an undefined gradient: the test no longer reproduces cuDNN's node"
    layers, ref_out, _, _ = ref.run_reference(module, list(x.unbind(1)))
    torch.stack(ref_out, 1).pow(2).sum().backward()
    with seqscope.open(tmp_path / "t.h5") as trace:
        for k in range(2):
            for b in range(B):
                want = [torch.linalg.vector_norm(h.grad).item() for h in layers[(k, 0)].h[b]]
                np.testing.assert_allclose(trace.grad_norms(f"{kind}.l{k}", 0)["hidden"][b].data, want, rtol=1e-6)


def _torch_runs_lstm_under_cpu_autocast() -> bool:
    """Whether PyTorch itself can run an nn.LSTM under CPU bfloat16 autocast here:
    its oneDNN kernel has no bfloat16 LSTM on some CPUs (an AVX2-only AMD EPYC:
    'could not create a primitive descriptor'), with or without seqscope."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nn.LSTM(2, 3)(torch.zeros(2, 1, 2))
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("kind", [
    pytest.param("lstm", marks=pytest.mark.skipif(
        not _torch_runs_lstm_under_cpu_autocast(),
        reason="PyTorch's own nn.LSTM cannot run under CPU bfloat16 autocast on this CPU (oneDNN)")),
    "gru", "rnn_tanh"])
def test_autocast_layers_are_recorded_at_the_values_the_model_had(kind, tmp_path, scan_path):
    """Mixed precision: under torch.autocast (bfloat16 on the CPU) the products of
    nn.LSTM, nn.RNN and nn.GRU run in bfloat16 on bfloat16 copies of the float32
    weights and inputs (LSTM and RNN also return bfloat16, GRU float32)."""
    out_dtype = check_autocast(kind, tmp_path, torch.device("cpu"), torch.bfloat16)
    assert out_dtype == (torch.float32 if kind == "gru" else torch.bfloat16)


def test_autocast_is_seen_through_the_functions_of_pytorch_before_2_4(tmp_path, monkeypatch):
    """PyTorch before 2.4 has no torch.is_autocast_enabled(device_type): the
    autocast region is read from its per-device functions (is_autocast_cpu_enabled,
    get_autocast_cpu_dtype). Taking autocast as off there recomputed the gates in
    float32 (the GRU check failed on torch 2.1.0). The older path, forced here, on
    this PyTorch, where those functions remain (deprecated)."""
    monkeypatch.setattr(recurrences, "_AUTOCAST_BY_DEVICE_TYPE", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert recurrences.autocast_dtype(torch.device("cpu")) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert recurrences.autocast_dtype(torch.device("cpu")) == torch.bfloat16
        assert check_autocast("gru", tmp_path, torch.device("cpu"), torch.bfloat16) == torch.float32


def check_autocast(kind: str, tmp_path, device: torch.device, amp: torch.dtype) -> torch.dtype:
    """One layer run under autocast(amp) on ``device``, recorded. The reference is
    unrolled in float64 on the CPU from the weights and inputs as the kernel saw
    them (the products' operands rounded to ``amp``), each step's output replaced by
    the module's own (a straight-through correction), so gates, cell states and
    BPTT gradients are taken at the values the model actually had. Returns the
    dtype the module returned."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    module = make_module(Config(kind, dtype=torch.float32))
    x = torch.randn(T, B, IN, generator=gen)
    r = torch.randn(T, B, HID, generator=gen)
    path = tmp_path / "trace.h5"
    on_device = copy.deepcopy(module).to(device)
    with seqscope.watch(on_device, path, every=1, sequences=B, precision="full"):
        with torch.autocast(device.type, dtype=amp):
            out, _ = on_device(x.to(device))
        o = out.float()
        (r.to(device) * o + 0.5 * o * o).sum().backward()

    w = {k: v.detach().to(amp).double().requires_grad_(True) for k, v in ref.layer_weights(module, 0, 0).items()}
    x64 = x.double()
    actual = out.detach().cpu().double()
    h = torch.zeros(B, HID, dtype=torch.float64)
    c = torch.zeros(B, HID, dtype=torch.float64) if kind == "lstm" else None
    hs, cs, gates = [], [], []
    step_tol = 1e-2  # half-precision rounding of the kernel's products and outputs
    for t in range(T):
        h_new, c, g = ref.cell_step(kind, x64[t], h, c, w, product=ref.rounded_operands(amp))
        # the reference models the kernel: one step from the module's own state lands
        # on its output, up to the output's rounding
        torch.testing.assert_close(h_new.detach(), actual[t], rtol=step_tol, atol=step_tol)
        h = h_new + (actual[t] - h_new).detach()
        h.retain_grad()
        if c is not None:
            c.retain_grad()
        hs.append(h)
        cs.append(c)
        gates.append(g)
    hs_all = torch.stack(hs)
    (r.double() * hs_all + 0.5 * hs_all * hs_all).sum().backward(retain_graph=True)
    name = f"{kind.split('_')[0]}.l0"
    with seqscope.open(path) as trace:
        hidden = trace.hidden(name, 0)
        rec_gates = trace.gates(name, 0)
        grads = trace.grad_norms(name, 0)
        prop = trace.propagation(name, 0)
        for b in range(B):
            np.testing.assert_array_equal(hidden[b].data, actual[:, b].numpy())  # stored as the model had them
            for gname, values in rec_gates.items():
                want = torch.stack([g[gname][b] for g in gates]).detach().numpy()
                np.testing.assert_allclose(values[b].data, want, rtol=1e-5, atol=1e-6)
            if kind == "lstm":
                want_c = torch.stack([cc[b] for cc in cs]).detach().numpy()
                np.testing.assert_allclose(trace.cell(name, 0)[b].data, want_c, rtol=1e-5, atol=1e-6)
                want_gc = [ref.norm(cc.grad[b]).item() for cc in cs]
                np.testing.assert_allclose(grads["cell"][b].data, want_gc, rtol=2e-2)
            # dL/dh_t reaches the recorder as the gradient of a half-precision tensor: rounded
            want_gh = [ref.norm(hh.grad[b]).item() for hh in hs]
            np.testing.assert_allclose(grads["hidden"][b].data, want_gh, rtol=2e-2)
            v = ref.unit_direction(hs[-1].grad[b])
            back = torch.autograd.grad(hs[-1][b], hs, grad_outputs=v, retain_graph=True, allow_unused=True)
            want_p = [ref.norm(gr[b]).item() for gr in back]
            # the recurrence's Jacobians use act'(a) at half-precision outputs (1 - h^2 of a
            # saturated unit is known to a few percent), and the error compounds over time
            np.testing.assert_allclose(prop[b].data, want_p, rtol=0.1, atol=1e-300)
    return out.dtype


def two_layer_lstm_problem():
    """A 2-layer float64 LSTM, its input sequences, initial states and loss terms."""
    cfg = Config("lstm", layers=2)
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    module = make_module(cfg)
    seqs, h0, c0 = make_inputs(cfg, gen)
    return cfg, module, seqs, h0, c0, make_loss_terms(cfg, gen)


def test_grad_scaler_gradients_are_recorded_unscaled_and_skipped_steps_noted(tmp_path):
    """watch(grad_scaler=...): the recorded gradient norms are those of the unscaled
    gradients (against the unrolled reference without any scaling), the scale and
    the steps whose optimizer step the scaler skipped are in the trace."""
    check_grad_scaler(tmp_path, torch.device("cpu"))


def check_grad_scaler(tmp_path, device: torch.device) -> None:
    """The GradScaler test on ``device`` (the reference on the CPU)."""
    cfg, reference_module, seqs, h0, c0, terms = two_layer_lstm_problem()
    module = copy.deepcopy(reference_module).to(device)
    seqs_dev = [x.to(device) for x in seqs]
    terms_dev = tuple(t.to(device) for t in terms)
    opt = torch.optim.SGD(module.parameters(), lr=0.0)  # the same weights at every step
    scaler = ref.grad_scaler(device.type, init_scale=2.0**10)
    path = tmp_path / "trace.h5"
    with seqscope.watch(module, path, every=1, sequences=B, precision="full", grad_scaler=scaler):
        for step in range(3):
            output, (h_n, c_n) = module(module_input(cfg, seqs_dev))
            loss = loss_of(per_sequence_outputs(cfg, output), h_n, c_n, terms_dev)
            if step == 1:
                loss = loss * 1e307  # times the scale: not finite; the scaler skips this step
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    layers, ref_out, ref_hn, ref_cn = ref.run_reference(reference_module, seqs, h0, c0)
    loss_of(ref_out, ref_hn, ref_cn, terms).backward(retain_graph=True)
    names = {"w_ih": "weight_ih", "w_hh": "weight_hh", "b_ih": "bias_ih", "b_hh": "bias_hh"}
    ref_params = {f"{names[key]}_l{k}": ref.norm(w.grad).item()
                  for (k, _), layer in layers.items() for key, w in layer.weights.items()}
    assert len(ref_params) == len(list(module.parameters())) == 8
    rtol = 1e-10 if device.type == "cpu" else 1e-8  # cuDNN's float64 sums in another order
    with seqscope.open(path) as trace:
        scalars = trace.scalars()
        assert list(scalars["amp/grad_scale"].values) == [1024.0, 1024.0, 512.0]
        assert list(scalars["amp/optimizer_step_skipped"].values) == [0.0, 1.0, 0.0]
        assert not np.isfinite(scalars["grad_norm"].values[1])
        for step in (0, 2):
            for k in range(cfg.layers):
                grads = trace.grad_norms(f"lstm.l{k}", step)
                for b in range(B):
                    want = [ref.norm(h.grad).item() for h in layers[(k, 0)].h[b]]
                    np.testing.assert_allclose(grads["hidden"][b].data, want, rtol=rtol)
                    want_c = [ref.norm(c.grad).item() for c in layers[(k, 0)].c[b]]
                    np.testing.assert_allclose(grads["cell"][b].data, want_c, rtol=rtol)
            for name, want in ref_params.items():
                assert scalars["grad_norm/" + name].values[step] == pytest.approx(want, rel=rtol)


def test_gradient_accumulation_records_each_pass_own_parameter_gradients(tmp_path):
    """Two forward/backward passes before an optimizer step (gradient
    accumulation, no zero_grad between): each pass is a step, and its parameter
    gradient norms are those of its own backward, not of the running sum in .grad."""
    torch.manual_seed(0)
    module = nn.GRU(3, 4).double()
    reference = copy.deepcopy(module)
    xs = [torch.randn(5, 2, 3, dtype=torch.float64) for _ in range(3)]
    with seqscope.watch(module, tmp_path / "t.h5", every=1):
        for x in xs:
            out, _ = module(x)
            out.pow(2).sum().backward()
    with seqscope.open(tmp_path / "t.h5") as trace:
        scalars = trace.scalars()
        for step, x in enumerate(xs):
            reference.zero_grad()
            out, _ = reference(x)
            out.pow(2).sum().backward()
            for name, p in reference.named_parameters():
                assert scalars["grad_norm/" + name].values[step] == pytest.approx(ref.norm(p.grad).item(), rel=1e-12)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_a_model_run_through_functional_call_is_recorded_with_the_tensors_it_was_given(kind, tmp_path, scan_path):
    """torch.func.functional_call runs the watched model on tensors of the caller's
    (a meta-learning inner loop, an ensemble's weights), new ones at every step, which
    the model's own parameters never see a backward pass through. Three steps, each
    its own, each equal to the reference unrolled on that step's tensors, with the
    gradient norms of those tensors as the parameter gradient norms."""
    cfg = Config(kind, layers=2)
    torch.manual_seed(0)
    model = make_module(cfg)
    gen = torch.Generator().manual_seed(3)
    steps = []
    with seqscope.watch(model, tmp_path / "trace.h5", every=1, sequences=B, precision="full"):
        for i in range(3):
            seqs, h0, c0 = make_inputs(cfg, gen)
            terms = make_loss_terms(cfg, gen)
            given = {name: (p.detach() * (0.6 + 0.2 * i)).requires_grad_() for name, p in model.named_parameters()}
            output, state = torch.func.functional_call(model, given, (module_input(cfg, seqs),))
            h_n, c_n = state if cfg.kind == "lstm" else (state, None)
            loss_of(per_sequence_outputs(cfg, output), h_n, c_n, terms).backward()
            pg = {name: ref.norm(t.grad).item() for name, t in given.items()}
            steps.append(({name: t.detach().clone() for name, t in given.items()}, seqs, h0, c0, terms, pg))
    assert all(p.grad is None for p in model.parameters())
    with seqscope.open(tmp_path / "trace.h5") as trace:
        check_steps(trace, cfg, steps)


def test_passes_inside_torch_func_transforms_are_left_out(tmp_path, caplog):
    """The watched model run inside torch.func transforms: a jacobian with respect
    to the input between training steps (jacrev), and steps whose gradients come
    from torch.func.grad. Those passes compute on wrapped tensors; they begin no
    step and are not recorded (said once), training runs as unwatched, and the
    ordinary steps around them are recorded exactly (before, the first transform's
    pass lost the step before it, whose record was finished inside the transform)."""
    cfg = Config("lstm", layers=2)
    torch.manual_seed(0)
    model = make_module(cfg)
    unwatched = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)

    def train(m: nn.Module) -> list[tuple[Any, ...]]:
        gen.manual_seed(3)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        steps = []
        for _ in range(3):
            seqs, h0, c0 = make_inputs(cfg, gen)
            terms = make_loss_terms(cfg, gen)
            weights = {name: t.detach().clone() for name, t in m.state_dict().items()}
            output, (h_n, c_n) = m(module_input(cfg, seqs))
            loss_of(per_sequence_outputs(cfg, output), h_n, c_n, terms).backward()
            pg = {name: ref.norm(p.grad).item() for name, p in m.named_parameters()}
            saliency = torch.func.jacrev(lambda x: m(x)[0].sum())(module_input(cfg, seqs))
            params = {name: p.detach() for name, p in m.named_parameters()}
            x = module_input(cfg, seqs)
            meta = torch.func.grad(lambda ps, x=x: torch.func.functional_call(m, ps, (x,))[0].pow(2).sum())(params)
            opt.step()
            opt.zero_grad()
            steps.append((weights, seqs, h0, c0, terms, pg, saliency, meta))
        return steps

    with caplog.at_level(logging.WARNING, logger="seqscope"):
        with seqscope.watch(model, tmp_path / "trace.h5", every=1, sequences=B, precision="full"):
            watched = train(model)
    said = [r for r in caplog.records if "torch.func transform" in r.getMessage()]
    assert len(said) == 1
    assert not [r for r in caplog.records if "failed" in r.getMessage()]
    for got, want in zip(watched, train(unwatched)):
        torch.testing.assert_close(got[6], want[6], rtol=0, atol=0)
        for name in want[7]:
            torch.testing.assert_close(got[7][name], want[7][name], rtol=0, atol=0)
    torch.testing.assert_close(dict(model.state_dict()), dict(unwatched.state_dict()), rtol=0, atol=0)
    with seqscope.open(tmp_path / "trace.h5") as trace:
        check_steps(trace, cfg, [s[:6] for s in watched])


DECODERS = [("lstm", 1, 0, False), ("lstm", 4, 3, True), ("gru", 1, 0, True), ("rnn_tanh", 1, 0, False),
            ("rnn_relu", 4, 0, False), ("gru", 7, 0, False)]


@pytest.mark.parametrize("kind,chunk,proj,batch_first", DECODERS,
                         ids=[f"{k}-by{c}" + (f"-proj{p}" if p else "") + ("-batch_first" if bf else "")
                              for k, c, p, bf in DECODERS])
def test_a_decoder_loop_that_calls_the_module_once_per_timestep_is_recorded_whole(kind, chunk, proj, batch_first,
                                                                                   tmp_path, scan_path, caplog):
    """A 2-layer module called on ``chunk`` timesteps at a time (1: a decoder loop),
    each call given the state the one before returned, one backward pass: one
    record of all the timesteps, equal to the module unrolled over the whole sequence.
    Each call's h_n is also used by the loss (as an attention query is), so the
    gradient that reaches a call's final state is more than the next call's share;
    the LSTM's last c_n is in the loss too. The last row (chunk 7 of 7 timesteps) is
    the single call, for comparison. An evaluation pass of the same loop under
    no_grad records the whole sequence's states too."""
    check_decoder_loop(kind, chunk, proj, batch_first, tmp_path, caplog, torch.device("cpu"))


def check_decoder_loop(kind: str, chunk: int, proj: int, batch_first: bool, tmp_path, caplog,
                       device: torch.device) -> None:
    """The module on ``device``, the reference on the CPU (float64 throughout)."""
    torch.manual_seed(0)
    n_time, batch, layers = 7, 3, 2
    if kind == "lstm":
        module = nn.LSTM(IN, HID, num_layers=layers, proj_size=proj, batch_first=batch_first)
    elif kind == "gru":
        module = nn.GRU(IN, HID, num_layers=layers, batch_first=batch_first)
    else:
        module = nn.RNN(IN, HID, num_layers=layers, nonlinearity=kind[4:], batch_first=batch_first)
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-0.6, 0.6)
    out_size = proj or HID
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n_time, batch, IN, generator=gen, dtype=torch.float64)
    query = torch.randn(n_time, layers, batch, out_size, generator=gen, dtype=torch.float64)
    ends = [min(t0 + chunk, n_time) for t0 in range(0, n_time, chunk)]

    def decode(m):
        state, outs, used = None, [], 0.0
        for t0, t1 in zip([0] + ends[:-1], ends):
            part = (x[t0:t1].transpose(0, 1) if batch_first else x[t0:t1]).to(device)
            out, state = m(part, state)
            outs.append(out.transpose(0, 1) if batch_first else out)
            h = state[0] if kind == "lstm" else state
            used = used + (query[t1 - 1].to(device) * h).sum()
        loss = torch.cat(outs).pow(2).sum() + used
        return loss + state[1].sum() if kind == "lstm" else loss

    path = tmp_path / "t.h5"
    on_device = copy.deepcopy(module).to(device)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="seqscope"):
        with seqscope.watch(on_device, path, every=1, sequences=batch, precision="full"):
            decode(on_device).backward()
            with torch.no_grad():
                decode(on_device)
    assert not [r for r in caplog.records if "ran more than once" in r.getMessage()]

    layers_ref, outputs, _, c_n = ref.run_reference(module, [x[:, b] for b in range(batch)])
    used = sum((query[t1 - 1, k, b] * layers_ref[(k, 0)].h[b][t1 - 1]).sum()
               for t1 in ends for k in range(layers) for b in range(batch))
    loss = torch.stack(outputs).pow(2).sum() + used
    (loss + c_n.sum() if kind == "lstm" else loss).backward(retain_graph=True)
    want_gh = {k: [[ref.norm(h.grad).item() for h in hs] for hs in lay.h] for k, lay in
               ((k, layers_ref[(k, 0)]) for k in range(layers))}
    want_gc = {k: [[ref.norm(c.grad).item() for c in cs] for cs in layers_ref[(k, 0)].c] for k in range(layers)} \
        if kind == "lstm" else {}
    with seqscope.open(path) as trace:
        assert list(trace.steps) == [0] and list(trace.eval_steps) == [0]
        for k in range(layers):
            lay = layers_ref[(k, 0)]
            name = f"{kind.split('_')[0]}.l{k}"
            hidden, grads, gates = trace.hidden(name, 0), trace.grad_norms(name, 0), trace.gates(name, 0)
            assert hidden.shape == (batch, n_time, out_size)
            want_sigma = torch.linalg.svdvals(lay.weights["w_hh"].detach())[0].item()
            assert trace.scalars()["sigma_max/" + name].values[0] == pytest.approx(want_sigma, rel=1e-10)
            for b in range(batch):
                want_h = torch.stack(lay.h[b]).detach().numpy()
                np.testing.assert_allclose(hidden[b].data, want_h, rtol=1e-12, atol=1e-14)
                np.testing.assert_allclose(trace.hidden(name, 0, phase="eval")[b].data, want_h, rtol=1e-12,
                                           atol=1e-14)
                np.testing.assert_allclose(grads["hidden"][b].data, want_gh[k][b], rtol=1e-10)
                for gname, values in gates.items():
                    want_g = torch.stack([g[gname] for g in lay.gates[b]]).detach().numpy()
                    np.testing.assert_allclose(values[b].data, want_g, rtol=1e-12, atol=1e-14)
                if kind == "lstm":
                    np.testing.assert_allclose(trace.cell(name, 0)[b].data, torch.stack(lay.c[b]).detach().numpy(),
                                               rtol=1e-12, atol=1e-14)
                    np.testing.assert_allclose(grads["cell"][b].data, want_gc[k][b], rtol=1e-10)
            for b in range(batch):  # propagation() runs backward passes that add to .grad: last
                np.testing.assert_allclose(trace.propagation(name, 0)[b].data, ref.propagation(lay, b, 0).numpy(),
                                           rtol=1e-10, atol=1e-300)


def test_a_call_given_another_state_is_not_taken_as_continuing_the_record(tmp_path, caplog):
    """The calls after the first continue the record only when given the very state
    the call before returned: a state detached (or changed) between the calls starts
    again, and as before only the first call of the step is recorded, with a warning."""
    torch.manual_seed(0)
    module = nn.GRU(IN, HID).double()
    x = torch.randn(4, 2, IN, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="seqscope"):
        with seqscope.watch(module, tmp_path / "t.h5", every=1, precision="full"):
            state, outs = None, []
            for t in range(4):
                out, state = module(x[t : t + 1], state)
                state = state.detach()
                outs.append(out)
            torch.cat(outs).pow(2).sum().backward()
    assert len([r for r in caplog.records if "ran more than once" in r.getMessage()]) == 1
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert trace.hidden("gru.l0", 0).shape == (2, 1, HID)


def test_torch_compile_does_not_trace_the_recorder(tmp_path):
    """A torch.compile'd model: seqscope's hooks and recording are never traced
    (torch.compiler.disable), so compiling a watched model builds the same graphs
    as compiling it unwatched, and the recorded numbers are the reference's."""
    cfg = Config("lstm")
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = make_module(cfg)
            self.head = nn.Linear(HID, 1).double()

        def forward(self, x):
            out, _ = self.rnn(x)
            return torch.tanh(self.head(out))

    seqs, _, _ = make_inputs(cfg, gen)
    x = module_input(cfg, seqs)

    def compiled_graphs(model: nn.Module, watched: bool) -> list[int]:
        graphs: list[int] = []

        def backend(gm, example_inputs):
            graphs.append(len(gm.graph.nodes))
            return gm.forward

        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend)
        ctx = seqscope.watch(compiled, tmp_path / "trace.h5", every=1, sequences=B, precision="full") \
            if watched else contextlib.nullcontext()
        with ctx:
            compiled(x).pow(2).sum().backward()
        return graphs

    model = Model()
    plain_graphs = compiled_graphs(copy.deepcopy(model), watched=False)
    assert compiled_graphs(model, watched=True) == plain_graphs
    layers, ref_out, _, _ = ref.run_reference(model.rnn, seqs)
    head = copy.deepcopy(model.head)
    torch.tanh(head(torch.stack(ref_out, 1))).pow(2).sum().backward()
    with seqscope.open(tmp_path / "trace.h5") as trace:
        assert trace.layers == ["_orig_mod.rnn.l0"]
        grads = trace.grad_norms("_orig_mod.rnn.l0", 0)
        for b in range(B):
            want = [ref.norm(h.grad).item() for h in layers[(0, 0)].h[b]]
            np.testing.assert_allclose(grads["hidden"][b].data, want, rtol=1e-10)


class _RnnHead(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.rnn = make_module(cfg)
        self.head = nn.Linear(HID, 1).to(cfg.dtype)

    def forward(self, x):
        out, _ = self.rnn(x)
        return torch.tanh(self.head(out))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TorchScript calls inside inductor (torch 2.13)
def test_a_model_compiled_by_inductor_is_recorded_step_after_step(tmp_path):
    """torch.compile with its default backend (inductor): three steps on different
    batches, each step's record against the reference."""
    check_compiled(tmp_path, torch.device("cpu"), None)


def check_compiled(tmp_path, device: torch.device, mode: str | None) -> None:
    """A torch.compile'd model on ``device`` (inductor; ``mode="reduce-overhead"``:
    PyTorch's own CUDA graphs around the graph breaks at seqscope's code, whose
    output buffers a later replay overwrites). Three steps on different batches,
    the weights unchanged, each step's hidden states and gradient norms against the
    reference on the CPU."""
    cfg = Config("lstm", layers=2)
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    model = _RnnHead(cfg)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model).to(device), mode=mode)
    batches = []
    with seqscope.watch(compiled, tmp_path / "trace.h5", every=1, sequences=B, precision="full"):
        for _ in range(3):
            seqs, _, _ = make_inputs(cfg, gen)
            compiled(module_input(cfg, [x.to(device) for x in seqs])).pow(2).sum().backward()
            batches.append(seqs)
    torch._dynamo.reset()
    tol = _tol(cfg, device)
    with seqscope.open(tmp_path / "trace.h5") as trace:
        assert list(trace.steps) == [0, 1, 2]
        for step, seqs in enumerate(batches):
            layers, ref_out, _, _ = ref.run_reference(model.rnn, seqs)
            head = copy.deepcopy(model.head)
            torch.tanh(head(torch.stack(ref_out, 1))).pow(2).sum().backward()
            for k in range(cfg.layers):
                name = f"_orig_mod.rnn.l{k}"
                grads, hidden = trace.grad_norms(name, step), trace.hidden(name, step)
                for b in range(B):
                    np.testing.assert_allclose(hidden[b].data, torch.stack(layers[(k, 0)].h[b]).detach().numpy(),
                                               rtol=tol["states"], atol=tol["atol_states"])
                    want = [ref.norm(h.grad).item() for h in layers[(k, 0)].h[b]]
                    np.testing.assert_allclose(grads["hidden"][b].data, want, rtol=tol["grads"])


CHECKPOINTING = [(True, False, True), (True, False, False), (False, False, True), (False, True, True)]


@pytest.mark.parametrize("reentrant,whole,states", CHECKPOINTING,
                         ids=["reentrant-layer", "reentrant-layer-output-only", "non-reentrant-layer",
                              "non-reentrant-whole-model"])
def test_activation_checkpointing_records_the_reference_gradients(reentrant, whole, states, tmp_path, scan_path,
                                                                  caplog):
    """The recurrent module inside torch.utils.checkpoint: its forward runs again
    during backward (the first time under no_grad with use_reentrant=True), and the
    gradients reach the recomputed outputs in a nested backward pass. ``whole``:
    the watched model is the checkpointed module itself (its recomputation inside
    backward is no new step). ``states``: the checkpointed function returns the
    final states too (otherwise only the output gets a gradient)."""
    from torch.utils.checkpoint import checkpoint

    cfg, module, seqs, _, _, terms = two_layer_lstm_problem()
    x = module_input(cfg, seqs).requires_grad_(True)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = module

        def forward(self, t):
            return checkpoint(run, t, use_reentrant=reentrant)

    def run(t):
        out, (h_n, c_n) = module(t)
        return (out, h_n, c_n) if states else out

    path = tmp_path / "trace.h5"
    watched = module if whole else Model()
    with caplog.at_level("WARNING", logger="seqscope"), \
            seqscope.watch(watched, path, every=1, sequences=B, precision="full"):
        result = checkpoint(run, x, use_reentrant=reentrant) if whole else watched(x)
        output, h_n, c_n = result if states else (result, None, None)
        if not states:  # no final-state terms in the loss
            h_n = torch.zeros(cfg.layers, B, HID, dtype=cfg.dtype)
            c_n = torch.zeros(cfg.layers, B, HID, dtype=cfg.dtype)
        loss_of(per_sequence_outputs(cfg, output), h_n, c_n, terms).backward()
    # the recomputation inside backward is the same call again, not a second call of the step
    assert not [r for r in caplog.records if "ran more than once" in r.getMessage()]
    layers, ref_out, ref_hn, ref_cn = ref.run_reference(module, seqs)
    if not states:
        ref_hn, ref_cn = h_n, c_n
    loss_of(ref_out, ref_hn, ref_cn, terms).backward(retain_graph=True)
    with seqscope.open(path) as trace:  # the layer is "lstm" either way (module path or type name)
        assert list(trace.steps) == [0]
        for k in range(cfg.layers):
            grads = trace.grad_norms(f"lstm.l{k}", 0)
            prop = trace.propagation(f"lstm.l{k}", 0)
            for b in range(B):
                layer = layers[(k, 0)]
                np.testing.assert_allclose(grads["hidden"][b].data, [ref.norm(h.grad).item() for h in layer.h[b]],
                                           rtol=1e-10)
                np.testing.assert_allclose(grads["cell"][b].data, [ref.norm(c.grad).item() for c in layer.c[b]],
                                           rtol=1e-10)
                np.testing.assert_allclose(prop[b].data, ref.propagation(layer, b, 0).numpy(), rtol=1e-10,
                                           atol=1e-300)


@pytest.mark.parametrize("count_on_device", [False, True], ids=["host-probe", "device-count"])
def test_nonfinite_values_are_recorded_and_training_goes_on(tmp_path, monkeypatch, count_on_device):
    # device-count: the path of layers on a CUDA device (the exact count computed where
    # the arrays are and copied with the other scalars, no device sync), run on the CPU
    if count_on_device:
        monkeypatch.setattr(scope_module, "_count_on_device", lambda device: True)
    check_nonfinite(tmp_path, torch.device("cpu"))


def check_nonfinite(tmp_path, device: torch.device) -> None:
    """A NaN in one input: recorded where it spreads, counted per layer and step
    (against a count of the stored arrays), found by diagnose; training goes on.
    Also run on CUDA by the GPU check (above)."""
    torch.manual_seed(0)
    model = nn.LSTM(2, 4).to(device)
    head = nn.Linear(4, 1).to(device)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.1)
    with seqscope.watch(model, tmp_path / "t.h5", every=1, precision="float32") as scope:
        for step in range(4):
            x = torch.randn(5, 3, 2)
            if step == 1:
                x[2, 0, 1] = float("nan")
            loss = head(model(x.to(device))[0]).pow(2).mean()
            loss.backward()
            scope.log(loss=loss)
            opt.step()
            opt.zero_grad()
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert list(trace.steps) == [0, 1, 2, 3]
        h = trace.hidden("lstm.l0", 1)
        assert np.isnan(h[0, 2:]).all() and np.isfinite(h[1:]).all()  # NaN from t=2 on in sequence 0 only
        assert np.isfinite(trace.hidden("lstm.l0", 0)).all()
        assert np.isnan(trace.scalars()["loss"].values[1])
        assert trace.scalars()["nonfinite/lstm.l0"].values[1] > 0
        for step in range(4):
            # the count covers every stored array (float32 storage: the model's own values)
            stored = [trace.hidden("lstm.l0", step), trace.cell("lstm.l0", step), trace.propagation("lstm.l0", step)]
            stored += list(trace.gates("lstm.l0", step).values()) + list(trace.grad_norms("lstm.l0", step).values())
            want = sum(int(np.size(a) - np.isfinite(np.ma.getdata(a)).sum()) for a in stored)
            assert trace.scalars()["nonfinite/lstm.l0"].values[step] == want
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # NaN data: findings, not numpy warnings
            found = diagnose(trace)
    first = [f for f in found if f.kind == "nonfinite"]
    assert first and min(f.first_step for f in first) == 1


def test_the_propagation_seed_is_the_last_gradients_direction_or_uniform():
    """unit_seed: the direction of each sequence's last gradient; the uniform unit
    vector where that gradient is zero, NaN or infinite (the profile always exists)."""
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0], [float("nan"), 1.0], [float("inf"), 1.0], [-1e-30, 0.0]])
    want = torch.tensor([[0.6, 0.8], [2 ** -0.5, 2 ** -0.5], [2 ** -0.5, 2 ** -0.5], [2 ** -0.5, 2 ** -0.5],
                         [-1.0, 0.0]])
    seed = recurrences.unit_seed(g)
    assert seed.dtype == g.dtype
    torch.testing.assert_close(seed, want, rtol=1e-7, atol=0)
