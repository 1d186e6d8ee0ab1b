"""watch() as a user meets it: the model computes what it computed without
seqscope, hooks go away, steps are numbered sensibly, bad set-ups fail loudly."""

from __future__ import annotations

import contextlib
import copy
import io
import logging

import numpy as np
import pytest
import torch
import torch.optim.optimizer as optim_mod
from torch import nn

import seqscope
from seqscope.errors import UnsupportedModelError
from tests import reference as ref
from tests.test_custom_cells import sgd_steps


class Tagger(nn.Module):
    """Embedding -> 2-layer bidirectional LSTM -> GRU -> linear: several recurrent modules."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 5)
        self.enc = nn.LSTM(5, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.dec = nn.GRU(12, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens, hx=None):
        out, _ = self.enc(self.emb(tokens), hx)
        out, h = self.dec(out)
        return self.head(out), h


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 11, (4, 9), generator=g), torch.randint(0, 3, (4, 9), generator=g)


def _hook_counts(model: nn.Module):
    return (
        sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()),
        sum("forward" in m.__dict__ for m in model.modules()),
        len(optim_mod._global_optimizer_pre_hooks),
        len(optim_mod._global_optimizer_post_hooks),
        sum(len(p._backward_hooks or {}) for p in model.parameters()),  # gradient hooks on parameters
    )


def _train(model, steps, scope=None, seed0=0):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    outs, grads = [], []
    for s in range(steps):
        x, y = _batch(seed0 + s)
        logits, _ = model(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, 3), y.reshape(-1))
        loss.backward()
        outs.append(logits.detach().clone())
        grads.append([p.grad.clone() for p in model.parameters()])
        if scope is not None:
            scope.log(loss=loss)
        opt.step()
        opt.zero_grad()
    return outs, grads


def test_model_computes_the_same_with_seqscope(tmp_path):
    torch.manual_seed(0)
    model = Tagger().double().eval()  # eval: deterministic, so recorded steps must match too
    baseline = Tagger().double().eval()
    baseline.load_state_dict(model.state_dict())
    ref_outs, ref_grads = _train(baseline, 6)
    with seqscope.watch(model, tmp_path / "t.h5", every=2) as scope:
        outs, grads = _train(model, 6, scope)
    for step in range(6):  # steps 0, 2, 4 recorded; 1, 3, 5 not
        torch.testing.assert_close(outs[step], ref_outs[step], rtol=1e-12, atol=1e-13)
        for g, rg in zip(grads[step], ref_grads[step]):
            torch.testing.assert_close(g, rg, rtol=1e-10, atol=1e-13)
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert list(trace.steps) == [0, 2, 4]
        assert trace.layers == ["enc.l0", "enc.l0_reverse", "enc.l1", "enc.l1_reverse", "dec.l0"]
        loss = trace.scalars()["loss"]
        assert list(loss.steps) == [0, 1, 2, 3, 4, 5]  # logged scalars are kept for every step
        assert trace.hidden("enc.l1_reverse", 2).shape == (4, 9, 6)
        assert trace.grad_norms("dec.l0", 4)["hidden"].shape == (4, 9)


def test_unrecorded_steps_are_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = Tagger().train()
    baseline = Tagger().train()
    baseline.load_state_dict(model.state_dict())
    ref_outs, ref_grads = _train(baseline, 3, seed0=10)
    with seqscope.watch(model, tmp_path / "t.h5", every=1000) as scope:
        _train(model, 1, scope, seed0=10)  # step 0 is recorded
    # with a fresh scope whose schedule records nothing, every step is plain
    model2 = Tagger().train()
    model2.load_state_dict(baseline.state_dict())
    torch.manual_seed(0)
    model3 = Tagger().train()
    model3.load_state_dict(model2.state_dict())
    with seqscope.watch(model2, tmp_path / "u.h5", every=lambda s: False) as scope:
        outs, grads = _train(model2, 3, scope, seed0=20)
    ref_outs, ref_grads = _train(model3, 3, seed0=20)
    for a, b in zip(outs, ref_outs):
        assert torch.equal(a, b)
    for ga, gb in zip(grads, ref_grads):
        assert all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_hooks_removed_after_close_exception_and_nesting(tmp_path):
    model = Tagger()
    other = nn.RNN(3, 4)
    before = _hook_counts(model), _hook_counts(other)

    scope = seqscope.watch(model, tmp_path / "a.h5", every=lambda s: s == 0)
    assert _hook_counts(model) != before[0]
    for _ in range(2):  # a recorded step, then one that is not (their parameter hooks differ)
        model(_batch(0)[0])[0].sum().backward()
        assert _hook_counts(model)[4] > 0
    scope.close()
    scope.close()  # idempotent
    assert (_hook_counts(model), _hook_counts(other)) == before

    with pytest.raises(KeyError):
        with seqscope.watch(model, tmp_path / "b.h5", every=1):
            model(_batch(0)[0])[0].sum().backward()
            raise KeyError("boom")
    assert (_hook_counts(model), _hook_counts(other)) == before

    with seqscope.watch(model, tmp_path / "c.h5", every=1):
        with seqscope.watch(other, tmp_path / "d.h5", every=1):
            assert _hook_counts(other) != before[1]
            assert _hook_counts(other)[2:4] == (before[1][2] + 2, before[1][3] + 2)  # one per scope
        assert _hook_counts(other)[:2] == before[1][:2]  # the inner scope removed only its own hooks
        assert _hook_counts(other)[2:4] == (before[1][2] + 1, before[1][3] + 1)
        assert _hook_counts(model) != before[0]
    assert (_hook_counts(model), _hook_counts(other)) == before


def test_interrupted_step_is_dropped_and_file_readable(tmp_path):
    model = Tagger()
    with pytest.raises(RuntimeError, match="interrupt"):
        with seqscope.watch(model, tmp_path / "t.h5", every=1) as scope:
            for s in range(3):
                x, _ = _batch(s)
                model(x)[0].sum().backward()
                scope.log(loss=float(s))
                if s == 2:
                    raise RuntimeError("interrupt")
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert list(trace.steps) == [0, 1]  # step 2 was in flight
        assert list(trace.scalars()["loss"].steps) == [0, 1]
        assert trace.closed_cleanly


def test_watching_the_same_module_twice_fails_loudly(tmp_path):
    model = Tagger()
    with seqscope.watch(model, tmp_path / "a.h5"):
        with pytest.raises(UnsupportedModelError, match="already watched") as info:
            seqscope.watch(model, tmp_path / "b.h5")
        # the message names the scope in the way and how to close it
        assert str(tmp_path / "a.h5") in str(info.value) and "scope.close()" in str(info.value)
        # the failed watch left the first one intact
        assert "forward" in model.enc.__dict__
    assert "forward" not in model.enc.__dict__


def test_unsupported_models_fail_at_watch(tmp_path):
    class MyLSTM(nn.LSTM):
        def forward(self, x, hx=None):
            return super().forward(x * 2, hx)

    with pytest.raises(UnsupportedModelError, match="overrides forward"):
        seqscope.watch(MyLSTM(3, 4), tmp_path / "a.h5")
    with pytest.raises(UnsupportedModelError, match="no recurrent layer"):
        seqscope.watch(nn.Linear(3, 4), tmp_path / "b.h5")
    with pytest.raises(ValueError, match="precision"):
        seqscope.watch(nn.GRU(3, 4), tmp_path / "c.h5", precision="float8")
    with pytest.raises(ValueError, match="preset"):
        seqscope.watch(nn.GRU(3, 4), tmp_path / "d.h5", every="sometimes")


def test_once_the_model_runs_only_its_calls_begin_steps(tmp_path):
    """Layer calls begin steps only while the watched model's forward has never run
    with autograd on. A layer called with autograd on before the model's first
    forward (a shape probe at set-up) is no step: the steps are numbered as without
    it, step 0 holds the first forward's states, and the cells lose the pre-hooks
    that reported their calls. From then on a layer called outside the model's
    forward (here the test's own call that computes the states each step will
    have) begins no step."""
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(2, 3, batch_first=True).double()
            self.cell = nn.GRUCell(3, 3).double()

        def forward(self, x):
            out, h = self.rnn(x)
            return self.cell(out[:, -1], h[0])

    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs = [torch.randn(4, 5, 2, dtype=torch.float64) for _ in range(3)]
    states = []
    with seqscope.watch(model, tmp_path / "t.h5", every=1, sequences=4, precision="full"):
        model.rnn(torch.zeros(1, 5, 2, dtype=torch.float64))  # the probe
        model.cell(torch.zeros(1, 3, dtype=torch.float64))
        assert model.cell._forward_pre_hooks
        for x in xs:
            states.append(model.rnn(x)[0].detach())  # what the step's forward will compute
            model(x).pow(2).sum().backward()
            assert not model.cell._forward_pre_hooks
            opt.step()
            opt.zero_grad()
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert list(trace.steps) == [0, 1, 2]
        for step, want in enumerate(states):
            np.testing.assert_allclose(trace.hidden("rnn.l0", step).data, want.numpy(), rtol=1e-12)
            assert trace.hidden("cell", step).shape == (4, 1, 3)


def test_truncated_bptt_numbers_each_batch(tmp_path):
    torch.manual_seed(0)
    rnn = nn.LSTM(3, 5)
    head = nn.Linear(5, 1)
    opt = torch.optim.Adam(list(rnn.parameters()) + list(head.parameters()), lr=1e-2)
    stream = torch.randn(60, 2, 3)
    with seqscope.watch(rnn, tmp_path / "t.h5", every=2) as scope:
        state = None
        for chunk in stream.split(10):  # 6 chunks, hidden state carried across
            out, state = rnn(chunk, state)
            state = tuple(s.detach() for s in state)
            loss = head(out).pow(2).mean()
            loss.backward()
            scope.log(loss=loss)
            opt.step()
            opt.zero_grad()
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert list(trace.steps) == [0, 2, 4]
        assert list(trace.scalars()["loss"].steps) == list(range(6))
        # the carried state is the initial state of the next chunk's record
        h_prev = trace.hidden("lstm.l0", 0)
        assert h_prev.shape == (2, 10, 5)


def test_lbfgs_closure_is_one_step_recorded_once(tmp_path):
    torch.manual_seed(0)
    rnn = nn.GRU(2, 3)
    x = torch.randn(5, 2, 2)
    opt = torch.optim.LBFGS(rnn.parameters(), max_iter=4)
    passes = []

    def closure():
        opt.zero_grad()
        out, _ = rnn(x)
        loss = out.pow(2).mean()
        loss.backward()
        passes.append(loss.item())
        return loss

    with seqscope.watch(rnn, tmp_path / "t.h5", every=1) as scope:
        for _ in range(3):
            loss = opt.step(closure)
            scope.log(loss=loss)
    assert len(passes) > 3  # LBFGS evaluated the closure several times per step
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert list(trace.steps) == [0, 1, 2]
        assert list(trace.scalars()["loss"].steps) == [0, 1, 2]


def test_a_fused_layer_called_once_per_timestep_with_its_own_state_is_recorded_whole(tmp_path, caplog):
    """A decoder loop that calls nn.LSTM on one timestep at a time, each call given the
    state the one before returned: seqscope records every call, one after another, as
    one record of all the timesteps (the numbers of the layer unrolled over the whole
    sequence), and says nothing about calls left out. A closure's repeated passes
    (LBFGS) are no such call either."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 5).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = lstm

        def forward(self, x):
            state, outs = None, []
            for t in range(x.shape[0]):
                out, state = self.rnn(x[t : t + 1], state)
                outs.append(out)
            return torch.cat(outs)

    model = Decoder()
    path = tmp_path / "t.h5"
    with caplog.at_level("WARNING", logger="seqscope"):
        with seqscope.watch(model, path, every=1, precision="full"):
            for _ in range(3):
                model(x).pow(2).mean().backward()
    assert not [r for r in caplog.records if "ran more than once" in r.getMessage()]

    # the reference: the layer unrolled over the whole sequence with autograd, same loss
    layers, outputs, _, _ = ref.run_reference(lstm, [x[:, b] for b in range(x.shape[1])])
    torch.stack(outputs).pow(2).mean().backward(retain_graph=True)
    whole = layers[(0, 0)]
    with seqscope.open(path) as trace:
        assert list(trace.steps) == [0, 1, 2]
        hidden = trace.hidden("rnn.l0", 2)
        grads = trace.grad_norms("rnn.l0", 2)
        assert hidden.shape == (2, 6, 5)  # every call's timestep
        for b in range(x.shape[1]):
            np.testing.assert_allclose(hidden[b].data, torch.stack(whole.h[b]).detach().numpy(), rtol=1e-12)
            np.testing.assert_allclose(grads["hidden"][b].data, [ref.norm(h.grad).item() for h in whole.h[b]],
                                       rtol=1e-10)
            np.testing.assert_allclose(grads["cell"][b].data, [ref.norm(c.grad).item() for c in whole.c[b]],
                                       rtol=1e-10)
        for b in range(x.shape[1]):  # propagation() runs backward passes that add to .grad: last
            np.testing.assert_allclose(trace.propagation("rnn.l0", 2)[b].data, ref.propagation(whole, b, 0).numpy(),
                                       rtol=1e-10)

    caplog.clear()
    opt = torch.optim.LBFGS(lstm.parameters(), max_iter=3)

    def closure():
        opt.zero_grad()
        loss = lstm(x)[0].pow(2).mean()
        loss.backward()
        return loss

    with caplog.at_level("WARNING", logger="seqscope"):
        with seqscope.watch(lstm, tmp_path / "lbfgs.h5", every=1):
            opt.step(closure)
    assert not [r for r in caplog.records if "ran more than once" in r.getMessage()]


def test_a_model_called_on_two_inputs_before_one_backward_pass_is_one_step(tmp_path, caplog):
    """A siamese encoder: the watched model runs on two batches, one loss compares
    them, one backward pass, one optimizer step. That is one step (not two, the
    first recorded before its backward pass had run): the layer's first call is
    recorded with the total gradients of the loss, which reach it through both
    terms, and seqscope says once that the second call is not recorded. Three SGD
    steps against the unrolled reference on the weights each step ran with."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 5).double()
    opt = torch.optim.SGD(lstm.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    path = tmp_path / "t.h5"
    runs = []
    with caplog.at_level("WARNING", logger="seqscope"):
        with seqscope.watch(lstm, path, every=1, precision="full") as scope:
            for _ in range(3):
                a, b = (torch.randn(6, 2, 3, generator=gen, dtype=torch.float64) for _ in range(2))
                before = copy.deepcopy(lstm)
                out_a, (h_a, _) = lstm(a)
                _, (h_b, _) = lstm(b)
                (out_a.pow(2).mean() + (h_a - h_b).pow(2).sum()).backward()
                opt.step()
                opt.zero_grad()
                runs.append((before, a, b))
            assert scope.step == 2
    said = [r.getMessage() for r in caplog.records if "ran more than once" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("seqscope: lstm "), said

    with seqscope.open(path) as trace:
        assert list(trace.steps) == [0, 1, 2]
        for step, (before, a, b) in enumerate(runs):
            layers_a, outs_a, hn_a, _ = ref.run_reference(before, [a[:, i] for i in range(2)])
            _, _, hn_b, _ = ref.run_reference(before, [b[:, i] for i in range(2)])
            (torch.stack(outs_a).pow(2).mean() + (hn_a - hn_b).pow(2).sum()).backward(retain_graph=True)
            layer = layers_a[(0, 0)]
            hidden = trace.hidden("lstm.l0", step)
            grads = trace.grad_norms("lstm.l0", step)
            prop = trace.propagation("lstm.l0", step)
            for i in range(2):
                np.testing.assert_allclose(hidden[i].data, torch.stack(layer.h[i]).detach().numpy(), rtol=1e-12)
                np.testing.assert_allclose(grads["hidden"][i].data, [ref.norm(h.grad).item() for h in layer.h[i]],
                                           rtol=1e-10)
                np.testing.assert_allclose(grads["cell"][i].data, [ref.norm(c.grad).item() for c in layer.c[i]],
                                           rtol=1e-10)
                np.testing.assert_allclose(prop[i].data, ref.propagation(layer, i, 0).numpy(), rtol=1e-10)


def test_a_forward_pass_whose_backward_pass_is_skipped_joins_the_next_step(tmp_path):
    """A loop that skips the backward pass of a batch (its loss was NaN): that forward
    pass and the next batch's are one step, whose record holds the skipped batch's
    states (the layer's first call of the step) and no gradients, which it never had;
    steps are numbered as the loop's optimizer steps."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4).double()
    opt = torch.optim.SGD(lstm.parameters(), lr=0.1)
    batches = [torch.randn(5, 2, 3, dtype=torch.float64) for _ in range(4)]
    path = tmp_path / "t.h5"
    weights = []
    with seqscope.watch(lstm, path, every=1, precision="full") as scope:
        for i, x in enumerate(batches):
            weights.append(copy.deepcopy(lstm))
            loss = lstm(x)[0].pow(2).mean()
            if i == 1:
                continue  # "loss is NaN": no backward pass, no optimizer step
            loss.backward()
            opt.step()
            opt.zero_grad()
        assert scope.step == 2
    with seqscope.open(path) as trace:
        assert list(trace.steps) == [0, 1, 2]
        assert not trace.has("lstm.l0", 1, "grad_hidden")
        assert trace.has("lstm.l0", 2, "grad_hidden")
        for step, batch in ((1, 1), (2, 3)):
            layers, _, _, _ = ref.run_reference(weights[batch], [batches[batch][:, i] for i in range(2)])
            for i in range(2):
                np.testing.assert_allclose(trace.hidden("lstm.l0", step)[i].data,
                                           torch.stack(layers[(0, 0)].h[i]).detach().numpy(), rtol=1e-12)


@pytest.mark.parametrize("attack_on", ["output", "final_state"])
def test_a_backward_pass_to_the_input_alone_ends_the_step(attack_on, tmp_path):
    """An adversarial step: the gradient with respect to the input alone
    (torch.autograd.grad, which reaches no parameter), then a training pass on the
    perturbed input. The training pass is a step of its own, recorded against the
    reference: the output's gradient hooks saw the first backward pass. The attack's
    loss uses the output, or the final hidden state alone (another autograd node on
    the CPU: each output's node is hooked)."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4).double()
    opt = torch.optim.SGD(lstm.parameters(), lr=0.1)
    path = tmp_path / "t.h5"
    runs = []
    with seqscope.watch(lstm, path, every=1, precision="full") as scope:
        for _ in range(2):
            x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
            out, (h_n, _) = lstm(x)
            g, = torch.autograd.grad((out if attack_on == "output" else h_n).pow(2).sum(), x)
            x_adv = (x + 0.1 * g.sign()).detach()
            before = copy.deepcopy(lstm)
            lstm(x_adv)[0].pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            runs.append((before, x_adv))
        assert scope.step == 3
    with seqscope.open(path) as trace:
        assert list(trace.steps) == [0, 1, 2, 3]
        for step, (before, x_adv) in zip((1, 3), runs):
            layers, outs, _, _ = ref.run_reference(before, [x_adv[:, i] for i in range(2)])
            torch.stack(outs).pow(2).mean().backward()
            layer = layers[(0, 0)]
            for i in range(2):
                np.testing.assert_allclose(trace.hidden("lstm.l0", step)[i].data,
                                           torch.stack(layer.h[i]).detach().numpy(), rtol=1e-12)
                np.testing.assert_allclose(trace.grad_norms("lstm.l0", step)["hidden"][i].data,
                                           [ref.norm(h.grad).item() for h in layer.h[i]], rtol=1e-10)


def test_an_output_that_takes_no_gradient_hook_does_not_stop_training(tmp_path):
    """seqscope hooks the model's output tensors to see a backward pass reach them
    (where an input requires grad); an output that refuses a hook (a tensor subclass)
    costs that signal only: the parameters' hooks still end each step, and training
    goes on."""
    class NoHooks(torch.Tensor):
        def register_hook(self, hook):
            raise RuntimeError("this tensor takes no hooks")

        @property
        def grad_fn(self):
            raise RuntimeError("this tensor shows no autograd node")

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(2, 3)

        def forward(self, x):
            return self.rnn(x)[0].as_subclass(NoHooks)

    model = Model()
    with seqscope.watch(model, tmp_path / "t.h5", every=1) as scope:
        for _ in range(3):
            model(torch.randn(4, 2, 2, requires_grad=True)).sum().backward()
        assert scope.step == 2
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert list(trace.steps) == [0, 1, 2]


def test_steps_end_at_backward_passes_while_layers_are_frozen_and_thawed(tmp_path):
    """The parameters whose gradient hooks end a step are chosen once and kept from
    step to step; freezing the recurrent layer (fine-tuning the rest) or the whole
    model part by part, and thawing it again, chooses them anew. A loop without an
    optimizer step, so that only the backward passes can end the steps."""
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 3)
            self.rnn = nn.LSTM(3, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.rnn(self.emb(x))[0])

    model = Model()
    x = torch.randint(0, 10, (5, 2))
    with seqscope.watch(model, tmp_path / "t.h5", every=lambda s: False) as scope:
        for phase, frozen in enumerate(([], [model.rnn], [model.rnn, model.emb], [model.rnn, model.emb, model.head],
                                        [])):
            for m in (model.emb, model.rnn, model.head):
                m.requires_grad_(m not in frozen)
            for i in range(3):
                out = model(x)
                if out.requires_grad:
                    out.sum().backward()
                # each pass with a backward pass is a step; with nothing trainable, so is each forward
                assert scope.step == 3 * phase + i, (phase, frozen, i)
    assert all(not p._backward_hooks for p in model.parameters())


def test_parameters_that_take_no_gradient_hook_do_not_stop_training(tmp_path, monkeypatch):
    """The same for the parameters seqscope hooks on every step (unrecorded steps:
    recorded ones hook every parameter, as before this session): the output's hooks
    still end each step, and training goes on."""
    def refuse(self, hook):
        raise RuntimeError("this parameter takes no hooks")

    monkeypatch.setattr(nn.Parameter, "register_hook", refuse, raising=False)
    model = nn.GRU(2, 3)
    with seqscope.watch(model, tmp_path / "t.h5", every=lambda s: False) as scope:
        for _ in range(3):
            model(torch.randn(4, 2, 2))[0].sum().backward()
        assert scope.step == 2


def test_forward_passes_without_a_backward_pass_end_a_step_at_the_cap(tmp_path, caplog, monkeypatch):
    """An inference loop in training mode without torch.no_grad(): no backward pass
    ever ends the step, so a step ends after MAX_FORWARDS_PER_STEP forward passes
    (each recorded step keeps its cell calls' states: it must stay bounded), and
    seqscope says why, once."""
    from seqscope.capture import scope as scope_module

    monkeypatch.setattr(scope_module, "MAX_FORWARDS_PER_STEP", 5)

    class PerStep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = nn.GRUCell(2, 3)

        def forward(self, x, h):
            return self.cell(x, h)

    net = PerStep()
    with caplog.at_level("WARNING", logger="seqscope"):
        with seqscope.watch(net, tmp_path / "t.h5", every=1) as scope:
            h = torch.zeros(1, 3)
            for _ in range(12):
                h = net(torch.randn(1, 2), h)
            assert scope.step == 2  # 5 + 5 + 2 passes
    said = [r.getMessage() for r in caplog.records if "forward passes with autograd on" in r.getMessage()]
    assert len(said) == 1, said
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert list(trace.steps) == [0, 1, 2]
        assert [trace.hidden("cell", s).shape[1] for s in (0, 1, 2)] == [5, 5, 2]


def test_user_step_numbers_and_schedules(tmp_path):
    rnn = nn.RNN(2, 3)
    x = torch.randn(4, 1, 2)
    with seqscope.watch(rnn, tmp_path / "t.h5", every=lambda s: s % 100 == 0) as scope:
        for step in range(1000, 1205):
            out, _ = rnn(x)
            out.sum().backward()
            scope.log(step=step, loss=float(step))
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert list(trace.steps) == [1000, 1100, 1200]
        loss = trace.scalars()["loss"]
        assert loss.steps[0] == 1000 and loss.steps[-1] == 1204
        np.testing.assert_array_equal(loss.values, loss.steps.astype(float))
    sched = seqscope.schedules.dense_early(50)
    picked = [s for s in range(2000) if sched(s)]
    assert picked[:100] == list(range(100))
    assert 100 < len(picked) < 400 and 1950 in picked and 1951 not in picked


def test_evaluation_passes_are_not_steps(tmp_path):
    rnn = nn.LSTM(2, 3)
    x = torch.randn(4, 2, 2)
    with seqscope.watch(rnn, tmp_path / "t.h5", every=1):
        for _ in range(2):
            rnn(x)[0].sum().backward()
            with torch.no_grad():
                rnn(x)
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert list(trace.steps) == [0, 1]
        assert list(trace.eval_steps) == [0, 1]  # recorded apart, without gradients
        assert trace.hidden("lstm.l0", 1, phase="eval").shape == (2, 4, 3)
        assert not trace.has("lstm.l0", 1, "grad_hidden", phase="eval")
        assert trace.has("lstm.l0", 1, "grad_hidden")


@pytest.mark.parametrize("where", ["training thread (CPU weights)", "writer thread, compiled eigenvalue",
                                   "writer thread, dense eigensolver"])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e21])
def test_sigma_max_matches_a_float64_svd_even_for_exploding_weights(scale, where, monkeypatch):
    """sigma_max(W_hh) uses a float32 Gram product for float32 weights; weights large
    enough to overflow it (an exploding run) fall back to float64. Both the CPU
    path (torch, at capture time) and the device path (numpy, on the writer: its
    eigenvalue by the compiled Lanczos iteration where PyTorch's BLAS is MKL, else,
    or where that cannot prove its value, by numpy's dense eigensolver)."""
    import warnings

    from seqscope.capture import native, spectral
    from tests.conftest import need_native, skip_or_fail

    answered = []
    if where.endswith("compiled eigenvalue"):
        need_native()
        if native._mkl_local_threads is None:
            skip_or_fail("no compiled eigenvalue for the writer: PyTorch's BLAS is not MKL")
        compiled = native.top_eigenvalue

        def counting(gram, loaded=None, threads=None):
            top = compiled(gram, loaded, threads)
            answered.append(threads if top is not None else None)
            return top
        monkeypatch.setattr(native, "top_eigenvalue", counting)
    elif where.endswith("dense eigensolver"):
        monkeypatch.setattr(native, "top_eigenvalue", lambda gram, loaded=None, threads=None: None)

    def sigma(w: np.ndarray) -> float:
        if where.startswith("training"):
            return spectral.sigma_max(torch.from_numpy(w))
        return spectral.sigma_max_host(w)

    rng = np.random.default_rng(1)
    w = (rng.uniform(-1, 1, (256, 64)) * scale).astype(np.float32)
    w[:, 3] *= 30  # a dominant direction
    want = np.linalg.svd(w.astype(np.float64), compute_uv=False)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = sigma(w)
    assert got == pytest.approx(want, rel=1e-6)
    assert np.isnan(sigma(np.where(np.eye(4, 3) > 0, np.nan, 1.0).astype(np.float32)))
    # a wide matrix (more columns than rows) takes the other Gram product
    assert sigma(np.ascontiguousarray(w.T)) == pytest.approx(want, rel=1e-6)
    assert np.isinf(sigma(np.full((3, 2), 1e300)))
    if where.endswith("compiled eigenvalue"):  # it answered, with the writer's BLAS threads
        assert answered and set(answered) == {spectral.writer_blas_threads()}


@pytest.mark.parametrize("cores,threads", [(1, 1), (2, 1), (7, 1), (8, 2), (16, 4), (128, 8)])
def test_the_writers_eigensolver_uses_spare_cores_only(cores, threads, monkeypatch):
    """sigma_max on the writer thread (weights on a GPU): one BLAS thread on a small
    machine, where a second thread team slows training; a few where cores are spare."""
    import os

    from seqscope.capture import spectral

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert spectral.writer_blas_threads.__wrapped__() == threads


def test_the_stored_sequences_indices_are_copied_to_the_device_once_per_value(monkeypatch):
    """On an accelerator the stored sequences' indices and lengths go to the device
    once per value, not every step (each copy cost the training thread 50-100 us on
    an H100 host). A different value gets its own copy; the cache stays small. The
    'meta' device stands in for a GPU here; the CUDA test records through it."""
    from seqscope.capture import host

    copies = []
    real = host.copy_to_device

    def counting(t, device):
        copies.append(t.tolist())
        return real(t, device)
    monkeypatch.setattr(host, "copy_to_device", counting)
    monkeypatch.setattr(host, "_constants", {})
    meta = torch.device("meta")
    a = host.constant_on_device(torch.arange(8), meta)
    assert host.constant_on_device(torch.arange(8), meta) is a and a.device == meta
    b = host.constant_on_device(torch.arange(1, 9), meta)
    assert b is not a and copies == [list(range(8)), list(range(1, 9))]
    assert host.constant_on_device(torch.arange(8, dtype=torch.int32), meta).dtype == torch.int32  # its own entry
    cpu = torch.arange(8)
    assert host.constant_on_device(cpu, torch.device("cpu")) is cpu  # nothing to copy
    for i in range(300):
        host.constant_on_device(torch.tensor([i]), meta)
    assert len(host._constants) <= 256


def test_logged_tensors_keep_their_value_at_the_log_call(tmp_path):
    """scope.log keeps a tensor until the next recorded step (no host sync before):
    a tensor the loop changes in place afterwards (a learning rate as a tensor,
    which schedulers update with fill_; a learnable temperature; a running
    average) must still be recorded with the value it had when it was logged."""
    model = nn.LSTM(2, 3)
    running = torch.zeros(())
    temperature = nn.Parameter(torch.tensor(1.0))
    opt = torch.optim.SGD([*model.parameters(), temperature], lr=0.1)
    logged = []
    with seqscope.watch(model, tmp_path / "t.h5", every=4) as scope:
        for step in range(9):
            out, _ = model(torch.randn(5, 2, 2))
            loss = out.pow(2).mean() * temperature
            loss.backward()
            running.mul_(0.5).add_(float(step))
            scope.log(running=running, temperature=temperature, loss=loss)
            logged.append((float(running), float(temperature.detach()), float(loss.detach())))
            opt.step()
            opt.zero_grad()
    with seqscope.open(tmp_path / "t.h5") as trace:
        scalars = trace.scalars()
        for i, name in enumerate(("running", "temperature", "loss")):
            assert list(scalars[name].steps) == list(range(9))
            np.testing.assert_array_equal(scalars[name].values, [row[i] for row in logged])


class _Tagger(nn.Module):
    """A fused layer, then a cell loop over its output."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 4)
        self.cell = nn.GRUCell(4, 4)

    def forward(self, x):
        out, _ = self.rnn(x)
        h = out[0]
        for t in range(out.shape[0]):
            h = self.cell(out[t], h)
        return h


def _no_seqscope_in(module: nn.Module) -> None:
    for m in module.modules():
        assert "forward" not in m.__dict__ and "__getstate__" not in m.__dict__ and "__deepcopy__" not in m.__dict__
        for name in ("_forward_pre_hooks", "_forward_hooks"):
            assert not getattr(m, name), f"{type(m).__name__}.{name} still holds a hook"


def test_deep_copies_of_a_watched_model_with_a_parametrized_cell_are_plain_models(tmp_path):
    """A parametrized module's class (torch.nn.utils.parametrize) has a __deepcopy__
    of its own, which copies the instance's dictionary as it is, seqscope's hooks
    included: copy.deepcopy raised "cannot pickle '_thread.lock'" while seqscope
    watched a model with a weight-normed cell (until session 15). The copy is the
    plain model, during recorded steps and others, and can be watched itself."""
    torch.manual_seed(0)
    model = _Tagger()
    nn.utils.parametrizations.weight_norm(model.cell, "weight_hh")
    x = torch.randn(5, 2, 3)
    copies = []
    with seqscope.watch(model, tmp_path / "t.h5", every=2):
        for _ in range(4):
            model(x).sum().backward()
            copies.append(copy.deepcopy(model))
            copies[-1](x).sum().backward()
    _no_seqscope_in(model)
    for m in copies:
        _no_seqscope_in(m)
        torch.testing.assert_close(m(x), model(x))
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert list(trace.steps) == [0, 2]
    with seqscope.watch(copies[0], tmp_path / "copy.h5", every=1):
        copies[0](x).sum().backward()
    with seqscope.open(tmp_path / "copy.h5") as trace:
        assert list(trace.steps) == [0] and trace.layers == ["rnn.l0", "cell"]


def test_copies_and_pickles_of_a_watched_model_are_plain_models(tmp_path):
    """Training loops deep-copy models (an early-stopping snapshot, an EMA teacher)
    and torch.save them whole; both raised while seqscope watched. A copy is now
    the plain model: it runs, it is not watched (its steps are not the trace's), it
    can be watched itself, and a pickle of it names nothing of seqscope."""
    torch.manual_seed(0)
    model = _Tagger()
    x = torch.randn(5, 2, 3)
    copies, pickles = [], []
    with seqscope.watch(model, tmp_path / "t.h5", every=2) as scope:
        for step in range(4):
            model(x).sum().backward()
            # during a recorded step the cells and parameters carry hooks too
            copies.append(copy.deepcopy(model))
            copies[-1](x).sum().backward()  # the copy runs, and its forward is no step of the scope
            buffer = io.BytesIO()
            torch.save(model, buffer)
            pickles.append(buffer.getvalue())
            assert scope.step == step
    _no_seqscope_in(model)  # and nothing is left on the original once the scope is closed
    for data in pickles:
        assert b"seqscope" not in data
    loaded = [torch.load(io.BytesIO(data), weights_only=False) for data in pickles]
    for m in copies + loaded:
        _no_seqscope_in(m)
        torch.testing.assert_close(m(x), model(x))  # the same weights, and it runs
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert list(trace.steps) == [0, 2]
    with seqscope.watch(copies[0], tmp_path / "copy.h5", every=1):  # a copy can be watched itself
        copies[0](x).sum().backward()
    with seqscope.open(tmp_path / "copy.h5") as trace:
        assert list(trace.steps) == [0] and trace.layers == ["rnn.l0", "cell"]


class _SpectralNet(nn.Module):
    """A fused GRU and an LSTMCell loop, each with a spectral norm on a recurrent weight:
    every computation of the weight in training mode runs a power iteration, which
    changes the model's state."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 6, num_layers=2)
        nn.utils.parametrizations.spectral_norm(self.rnn, "weight_hh_l0")
        self.cell = nn.LSTMCell(6, 6)
        nn.utils.parametrizations.spectral_norm(self.cell, "weight_hh")

    def forward(self, x):
        out, _ = self.rnn(x)
        h = c = torch.zeros(x.shape[1], 6)
        for t in range(x.shape[0]):
            h, c = self.cell(out[t], (h, c))
        return h


def test_watching_parametrized_layers_leaves_training_unchanged(tmp_path):
    """seqscope reads a parametrized weight as the model's own forward computed it,
    and never computes it again itself: a spectral norm would run one more power
    iteration each time. Four SGD steps, every one recorded, give bit-identical
    losses and states (power-iteration vectors included) with and without seqscope."""

    def train(watched: bool):
        torch.manual_seed(0)
        model = _SpectralNet()
        x = torch.randn(7, 4, 3)
        return sgd_steps(model, x, tmp_path / "t.h5" if watched else None), model.state_dict()

    want_losses, want_state = train(watched=False)
    losses, state = train(watched=True)
    assert losses == want_losses
    for name, value in want_state.items():
        assert torch.equal(state[name], value), name
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert list(trace.steps) == [0, 1, 2, 3]
        assert trace.layers == ["rnn.l0", "rnn.l1", "cell"]


class _FrozenEncoder(nn.Module):
    """A frozen LSTM under a trainable head."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 4).requires_grad_(False)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


@pytest.mark.parametrize("loop", ["eval without no_grad", "eval under no_grad", "training in eval mode",
                                  "frozen recurrent layers in eval mode"])
def test_an_evaluation_loop_without_no_grad_is_said_once(loop, tmp_path, caplog):
    """Validation with model.eval() but autograd on begins a step at each pass, as
    training does: seqscope cannot tell them apart at the forward pass. When neither
    a backward pass nor an optimizer step follows such a pass, seqscope says so,
    once, with the step. Evaluation under no_grad, and training in eval mode (a
    backward pass follows, or with frozen recurrent layers an optimizer step), say
    nothing."""
    torch.manual_seed(0)
    model = _FrozenEncoder() if loop.startswith("frozen") else _Tagger()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    with caplog.at_level(logging.WARNING, logger="seqscope"):
        with seqscope.watch(model, tmp_path / "trace.h5", every=1) as scope:
            for _ in range(3):
                model.train(loop == "eval without no_grad" or loop == "eval under no_grad")
                model(torch.randn(5, 2, 3)).sum().backward()
                opt.step()
                opt.zero_grad()
                if loop.startswith("eval"):
                    model.eval()
                    with torch.no_grad() if loop == "eval under no_grad" else contextlib.nullcontext():
                        model(torch.randn(5, 2, 3))
            steps = scope.step
    said = [r.getMessage() for r in caplog.records if "eval mode" in r.getMessage()]
    if loop == "eval without no_grad":
        assert len(said) == 1 and "step 1 ran the model in eval mode" in said[0], said
        assert steps == 5  # the three training passes and the validation passes between them
    else:
        assert said == []
        assert steps == 2


def test_a_torchrun_process_other_than_rank_0_records_nothing(tmp_path, monkeypatch):
    """torchrun's RANK and WORLD_SIZE, before any process group exists: a process
    other than rank 0 installs nothing and writes nothing; {rank} in the path gives
    each process its own trace."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = nn.LSTM(3, 4)
    with seqscope.watch(model, tmp_path / "trace.h5", every=1) as scope:
        _no_seqscope_in(model)
        out, _ = model(torch.randn(5, 2, 3))
        out.sum().backward()
        scope.log(loss=1.0)
        assert scope.path is None and scope.step is None
    assert list(tmp_path.iterdir()) == []
    with seqscope.watch(model, tmp_path / "trace-{rank}.h5", every=1) as scope:
        assert scope.path == str(tmp_path / "trace-1.h5")
        out, _ = model(torch.randn(5, 2, 3))
        out.sum().backward()
    monkeypatch.setenv("RANK", "0")
    with seqscope.watch(model, tmp_path / "trace.h5", every=1) as scope:
        assert scope.path == str(tmp_path / "trace.h5")
    for name in ("trace-1.h5", "trace.h5"):
        with seqscope.open(tmp_path / name) as trace:
            assert trace.closed_cleanly


def test_data_parallel_over_several_devices_is_refused_at_watch(tmp_path):
    """nn.DataParallel over several GPUs runs replicas whose forward would be
    seqscope's, bound to the original module (another device, other threads): an
    error at the first training pass. watch() refuses it with the way out. (No GPU
    here: the device list is set by hand; on one device, DataParallel calls the
    module itself, which is recorded.)"""
    model = Tagger()
    dp = nn.DataParallel(model)
    with seqscope.watch(dp, tmp_path / "one.h5", every=1):
        dp(_batch(0)[0])[0].sum().backward()
    with seqscope.open(tmp_path / "one.h5") as trace:
        assert list(trace.steps) == [0] and "module.enc.l0" in trace.layers
    dp.device_ids = [0, 1]
    with pytest.raises(UnsupportedModelError, match="DistributedDataParallel"):
        seqscope.watch(dp, tmp_path / "two.h5")
    assert not (tmp_path / "two.h5").exists()
    _no_seqscope_in(dp)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_a_recurrent_layer_compiled_with_torchscript_is_named_in_the_error(tmp_path):
    """A model scripted or traced with TorchScript holds ScriptModules, which take no
    hooks and have no Python forward: watch() says which layer is compiled and what
    to do, rather than only that it found no recurrent layer."""
    with pytest.raises(UnsupportedModelError, match=r"found in LSTM; the model is compiled with TorchScript"):
        seqscope.watch(torch.jit.script(nn.LSTM(3, 5)), tmp_path / "a.h5")

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(5, 1)
            self.rnn = torch.jit.trace(nn.GRU(3, 5), torch.randn(4, 2, 3))

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    with pytest.raises(UnsupportedModelError, match=r"rnn is compiled with TorchScript .* watch the model unscripted"):
        seqscope.watch(Wrapper(), tmp_path / "b.h5")
    with pytest.raises(UnsupportedModelError, match=r"no recurrent layer .* found in Linear$"):
        seqscope.watch(nn.Linear(2, 2), tmp_path / "c.h5")
    assert not any(tmp_path.iterdir())
