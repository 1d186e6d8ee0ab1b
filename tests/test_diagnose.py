"""Diagnosis on real training runs (the examples) and on its own arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import seqscope
from seqscope.cli import main as cli_main
from seqscope.diagnose import diagnose
from seqscope.diagnose.rules import FLOAT32_RESOLUTION, _exploding, _nonfinite, horizon, loss_plateaued
from seqscope.trace.reader import Series
from tests.examples_runner import run_example
from tests.reference import grad_scaler


def kinds(findings, severity=None):
    return {(f.kind, f.layer) for f in findings if severity is None or f.severity == severity}


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scenarios")
    return {
        "vanishing": run_example("vanishing_rnn", tmp),
        "exploding": run_example("exploding_rnn", tmp),
        "healthy": run_example("healthy_gru", tmp),
        "char_lm": run_example("char_lm", tmp),
    }


def test_vanishing_tanh_rnn_is_reported(traces):
    with seqscope.open(traces["vanishing"]) as trace:
        loss = trace.scalars()["loss"].values
        findings = diagnose(trace)
    assert abs(np.median(loss[-100:]) - 1 / 6) < 0.03  # the loss stays at the baseline
    errors = [f for f in findings if f.severity == "error"]
    assert [f.kind for f in errors] == ["vanishing_gradient"]
    f = errors[0]
    assert f.layer == "rnn.l0"
    assert f.evidence["horizon_timesteps"] < 0.5 * f.evidence["sequence_length"]
    assert f.evidence["loss_plateaued"] is True
    assert "LSTM or GRU" in f.message


def test_exploding_relu_rnn_reports_where_it_starts(traces):
    with seqscope.open(traces["exploding"]) as trace:
        findings = diagnose(trace)
        grad = trace.scalars()["grad_norm"]
    errors = [f for f in findings if f.severity == "error"]
    assert {"exploding_gradient", "nonfinite"} <= {f.kind for f in errors}
    first = min(f.first_step for f in errors)
    # the start is the first recorded step whose gradient norm is 10x its running median or non-finite
    values = grad.values
    start = next(int(grad.steps[i]) for i in range(3, len(values))
                 if not np.isfinite(values[i]) or values[i] > 10 * np.median(values[max(0, i - 10):i]))
    assert first == start
    exploding = [f for f in errors if f.kind == "exploding_gradient"]
    assert exploding[0].first_step == start
    assert "clip gradients at about" in exploding[0].message
    # once its states are NaN, the relu layer's propagation profile is all zeros (the scan's relu
    # factor of NaN is 0): that is the divergence, already reported, not a vanishing gradient whose
    # remedy would be to switch to an LSTM
    nonfinite_layer = next(f for f in errors if f.kind == "nonfinite" and f.layer == "rnn.l0")
    assert not [f for f in findings if f.layer == "rnn.l0" and f.last_step >= nonfinite_layer.first_step
                and f.kind in ("vanishing_gradient", "dead_units")]


def test_healthy_gru_has_no_errors(traces):
    with seqscope.open(traces["healthy"]) as trace:
        loss = trace.scalars()["loss"].values
        findings = diagnose(trace)
    assert np.median(loss[-100:]) < 0.02  # it did learn
    assert not [f for f in findings if f.severity == "error"], [f.message for f in findings]


def test_char_lm_has_no_error_vanishing_or_exploding(traces):
    with seqscope.open(traces["char_lm"]) as trace:
        loss = trace.scalars()["loss"].values
        findings = diagnose(trace)
    assert np.median(loss[-30:]) < np.median(loss[:30])
    bad = [f for f in findings if f.severity == "error"
           and f.kind in ("vanishing_gradient", "exploding_gradient")]
    assert not bad, [f.message for f in bad]


def test_cli_diagnose_json_strict_and_bad_input(traces, tmp_path, capsys):
    assert cli_main(["diagnose", str(traces["vanishing"]), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    f = payload["findings"][0]
    assert set(f) == {"kind", "severity", "layer", "first_step", "last_step", "evidence", "message"}
    assert cli_main(["diagnose", str(traces["vanishing"]), "--strict"]) == 1
    out = capsys.readouterr().out
    assert "[ERROR] vanishing_gradient in rnn.l0" in out
    assert cli_main(["diagnose", str(traces["healthy"]), "--strict"]) == 0
    capsys.readouterr()
    # every example's findings as JSON (numpy scalars in the evidence, non-finite numbers), the same
    # findings as the text report
    for name, path in traces.items():
        assert cli_main(["diagnose", str(path), "--json"]) == 0, name
        payload = json.loads(capsys.readouterr().out)
        with seqscope.open(path) as trace:
            expected = [f.to_dict() for f in diagnose(trace)]
        assert [(f["kind"], f["layer"], f["first_step"], f["message"]) for f in payload["findings"]] == [
            (f["kind"], f["layer"], f["first_step"], f["message"]) for f in expected], name
        if name == "exploding":
            spike = next(f for f in payload["findings"]
                         if f["kind"] == "exploding_gradient" and "peak" in f["evidence"])
            assert spike["evidence"]["recovered"] is False and spike["evidence"]["peak"] == "inf"
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # HDF5 signature, then garbage
    proc = subprocess.run([sys.executable, "-m", "seqscope", "diagnose", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "seqscope", "diagnose", str(tmp_path / "nope.h5"), "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_horizon_counts_timesteps_above_float32_resolution():
    decay = 0.5
    profile = decay ** np.arange(60)[::-1]  # 1.0 at the last step, forward direction
    expected = int(np.floor(np.log(FLOAT32_RESOLUTION) / np.log(decay))) + 1
    assert horizon(profile, 0) == expected
    assert horizon(profile[::-1], 1) == expected  # a reverse layer ends at t=0
    assert horizon(np.ones(10), 0) == 10
    assert horizon(np.array([np.nan, 1.0]), 0) == 1


def test_a_gradient_norm_that_stays_non_finite_is_one_spike_to_the_end():
    """The global-norm spike rule judges each step against the median of the previous 10 recorded
    steps. A norm that goes NaN for good is one spike to the last step, also once the window holds
    no finite value any more; one that comes back is a spike that recovered."""
    steps = np.arange(0, 60, 2)
    diverged = np.r_[np.ones(5), 50.0, np.full(24, np.nan)]
    recovered = np.r_[np.ones(5), np.nan, np.full(24, 1.2)]
    for values, last, came_back in ((diverged, int(steps[-1]), False), (recovered, 10, True)):
        found = _exploding(None, [], {}, {"grad_norm": Series(steps, values)})
        assert [(f.first_step, f.last_step, f.evidence["recovered"]) for f in found] == [(10, last, came_back)]
        assert found[0].severity == ("warning" if came_back else "error")
        assert found[0].evidence["running_median_before"] == 1.0


def test_a_loss_that_is_nan_at_some_steps_only_is_not_called_a_divergence():
    """NaN at a few steps, finite after (a bad batch whose update was skipped): a warning that says
    where, not "training diverged"; NaN from some step to the end is the divergence, an error."""
    steps = np.arange(40)
    transient = np.r_[np.full(10, 2.0), np.nan, np.full(9, 1.5), np.inf, np.full(19, 1.0)]
    diverged = np.r_[np.full(10, 2.0), np.full(30, np.nan)]
    no_layers = SimpleNamespace(layers=[])
    (f,) = _nonfinite(no_layers, {"loss": Series(steps, transient)})
    assert (f.severity, f.first_step, f.last_step, f.evidence["lasting"]) == ("warning", 10, 20, False)
    assert "at 2 of 40 steps, from step 10 to 20" in f.message and "diverged" not in f.message
    (f,) = _nonfinite(no_layers, {"loss": Series(steps, diverged)})
    assert (f.severity, f.first_step, f.last_step, f.evidence["lasting"]) == ("error", 10, 39, True)
    assert "from step 10 on (30 steps): training diverged" in f.message
    # a bad batch early, then a divergence: the divergence, and the earlier step said with it
    both = np.r_[np.full(5, 2.0), np.nan, np.full(14, 1.5), np.full(20, np.nan)]
    (f,) = _nonfinite(no_layers, {"loss": Series(steps, both)})
    assert (f.severity, f.first_step, f.last_step, f.evidence["lasting"]) == ("error", 5, 39, True)
    assert "from step 20 on (20 steps; also at 1 earlier, the first at step 5): training diverged" in f.message
    (f,) = _nonfinite(no_layers, {"grad_norm": Series(steps, transient)})
    assert "at 2 of 40 steps" in f.message and f.evidence["lasting"] is False


def test_plateau_detection():
    steps = np.arange(90)
    assert loss_plateaued(Series(steps, np.r_[np.linspace(1, 0.17, 30), np.full(60, 0.17)])) is True
    assert loss_plateaued(Series(steps, np.linspace(1, 0.01, 90))) is False
    assert loss_plateaued(None) is None
    # a loss below zero: improving from -1.0 to -1.01 is a plateau, from -1.0 to -2.0 is not
    assert loss_plateaued(Series(steps, np.r_[np.full(30, 0.5), np.full(30, -1.0), np.full(30, -1.01)])) is True
    assert loss_plateaued(Series(steps, np.r_[np.full(30, 0.5), np.full(30, -1.0), np.full(30, -2.0)])) is False


@pytest.mark.parametrize("bias", [-4.0, 1.0], ids=["forget-closed", "forget-open"])
def test_lstm_forget_bias_decides_vanishing(tmp_path, bias):
    """Not one of the scenarios: an LSTM whose forget gates are shut (bias -4) on
    long sequences vanishes; the same LSTM with bias +1 does not."""
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 32)
    with torch.no_grad():
        lstm.bias_ih_l0[32:64].fill_(bias)
        lstm.bias_hh_l0[32:64].fill_(0.0)
    path = tmp_path / "t.h5"
    with seqscope.watch(lstm, path, every=1) as scope:
        for _ in range(6):
            out, _ = lstm(torch.randn(120, 8, 4))
            loss = out[-1].pow(2).sum()
            loss.backward()
            scope.log(loss=loss)
    with seqscope.open(path) as trace:
        findings = diagnose(trace)
    vanishing = [f for f in findings if f.kind == "vanishing_gradient"]
    if bias < 0:
        assert vanishing and vanishing[0].evidence["horizon_timesteps"] < 60
        assert "forget-gate bias" in vanishing[0].message
    else:
        assert not vanishing


def test_grad_scaler_skips_are_one_note_not_a_divergence(tmp_path):
    """Mixed-precision training whose GradScaler skips a few steps (scaled gradients
    not finite) is healthy: the skipped steps make one note, not a non-finite or
    exploding-gradient error. A run whose every step is skipped is flagged."""
    torch.manual_seed(0)
    model = nn.GRU(3, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = grad_scaler("cpu", init_scale=2.0**10)
    x = torch.randn(12, 4, 3)
    path = tmp_path / "amp.h5"
    with seqscope.watch(model, path, every=1, grad_scaler=scaler) as scope:
        for step in range(30):
            out, _ = model(x)
            loss = out.pow(2).mean()
            scope.log(loss=loss)
            scaled = scaler.scale(loss * (1e308 if step in (3, 4, 17) else 1.0))  # overflows at 3 steps
            scaled.backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    with seqscope.open(path) as trace:
        found = diagnose(trace)
    kinds = {(f.kind, f.severity) for f in found}
    assert ("scaler_skipped_steps", "info") in kinds, kinds
    note = next(f for f in found if f.kind == "scaler_skipped_steps")
    assert (note.first_step, note.last_step, note.evidence["recorded_steps_skipped"]) == (3, 17, 3)
    assert not [f for f in found if f.severity == "error"], found
    assert not [f for f in found if f.kind in ("nonfinite", "exploding_gradient")], found

    # a scaler that skips every step: training does not move; flagged
    path3 = tmp_path / "always.h5"
    with seqscope.watch(model, path3, every=1, grad_scaler=scaler) as scope:
        for step in range(6):
            out, _ = model(x)
            scaler.scale(out.pow(2).mean() * float("inf")).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    with seqscope.open(path3) as trace:
        note = [f for f in diagnose(trace) if f.kind == "scaler_skipped_steps"]
    assert len(note) == 1 and note[0].severity == "warning" and note[0].evidence["recorded_steps_skipped"] == 6

    # without the scaler the same overflows are real non-finite gradients
    path2 = tmp_path / "no-scaler.h5"
    torch.manual_seed(0)
    model = nn.GRU(3, 8)
    with seqscope.watch(model, path2, every=1) as scope:
        for step in range(6):
            out, _ = model(x)
            (out.pow(2).mean() * (1e308 * 1024 if step == 3 else 1.0)).backward()
            model.zero_grad()
    with seqscope.open(path2) as trace:
        assert any(f.kind == "nonfinite" and f.severity == "error" for f in diagnose(trace))


def test_an_empty_trace_is_not_reported_healthy(tmp_path, capsys):
    """A trace whose run recorded no step (closed before its first, or a schedule
    that picked none) says so, instead of "gradients neither vanish nor explode"."""
    path = tmp_path / "empty.h5"
    with seqscope.watch(nn.LSTM(2, 3), path):
        pass
    assert cli_main(["diagnose", str(path)]) == 0
    out = capsys.readouterr().out
    assert "no recorded training steps" in out and "neither vanish" not in out
    assert cli_main(["diagnose", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"findings": []}


@pytest.mark.parametrize("argv", [
    ["dashboard", "TRACE", "--port", "80610"],
    ["dashboard", "TRACE", "--port", "0"],
    ["dashboard", "TRACE", "--port", "http"],
    ["demo", "--no-dashboard", "--steps", "-5"],
    ["demo", "--no-dashboard", "--every", "0"],
    ["demo", "--no-dashboard", "--steps", "2.5"],
], ids=["port-too-large", "port-zero", "port-not-a-number", "negative-steps", "every-zero", "fractional-steps"])
def test_bad_command_line_values_give_one_line_and_exit_2(argv, tmp_path):
    """Each used to end in a traceback (a port beyond 65535: dash's assertion; --every 0:
    the schedule's ValueError) or, for negative --steps, in a demo that trained nothing."""
    option, value = argv[-2:]
    out = tmp_path / "demo.h5"
    argv = [str(tmp_path / "t.h5") if a == "TRACE" else a for a in argv] + ["--out", str(out)] * (argv[0] == "demo")
    proc = subprocess.run([sys.executable, "-m", "seqscope", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"argument {option}: '{value}' is not" in proc.stderr, proc.stderr
    assert not out.exists()  # nothing trained, nothing written
