"""Reading traces: bad input gets one clear error; live and crashed traces read."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import seqscope
from seqscope.cli import main as cli_main
from seqscope.errors import NotATraceError, NotInTraceError, TraceNotFoundError, TraceVersionError
from tests.examples_runner import run_example


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "t.h5"
    rnn = nn.GRU(3, 4, num_layers=2)
    with seqscope.watch(rnn, path, every=2) as scope:
        for s in range(5):
            out, _ = rnn(torch.randn(6, 2, 3))
            loss = out.pow(2).mean()
            loss.backward()
            scope.log(loss=loss, accuracy=0.5)
    return path


def test_bad_paths_raise_specific_errors(tmp_path, small_trace):
    with pytest.raises(TraceNotFoundError, match="not found"):
        seqscope.open(tmp_path / "missing.h5")
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(NotATraceError, match="not an HDF5 file"):
        seqscope.open(text)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(NotATraceError, match="not a seqscope trace"):
        seqscope.open(other)
    newer = tmp_path / "newer.h5"
    newer.write_bytes(small_trace.read_bytes())
    with h5py.File(newer, "r+") as f:
        f.attrs["version"] = 99
    with pytest.raises(TraceVersionError, match="upgrade seqscope"):
        seqscope.open(newer)
    with pytest.raises(NotATraceError):
        seqscope.open(tmp_path)


def test_missing_layer_and_step(small_trace):
    with seqscope.open(small_trace) as trace:
        assert list(trace.steps) == [0, 2, 4]
        with pytest.raises(NotInTraceError, match="layer 'nope'"):
            trace.hidden("nope", 0)
        with pytest.raises(NotInTraceError, match="step 3 is not in the trace"):
            trace.hidden("gru.l0", 3)
        with pytest.raises(NotInTraceError, match="not an LSTM"):
            trace.cell("gru.l0", 0)
        assert set(trace.gates("gru.l1", 2)) == {"reset", "update", "new"}
        scalars = trace.scalars()
        assert list(scalars["accuracy"].steps) == [0, 1, 2, 3, 4]
        assert "sigma_max/gru.l1" in scalars and "grad_norm/weight_hh_l1" in scalars


def test_cli_info_and_errors(small_trace, tmp_path, capsys):
    assert cli_main(["info", str(small_trace)]) == 0
    out = capsys.readouterr().out
    assert "gru.l1" in out and "recorded steps 3" in out and "closed cleanly yes" in out
    assert cli_main(["info", str(tmp_path / "missing.h5")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err
    # as a real process: one line on stderr, exit code 2, no traceback
    proc = subprocess.run([sys.executable, "-m", "seqscope", "info", str(tmp_path / "missing.h5")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_a_trace_is_written_with_an_h5py_built_on_hdf5_before_1_14(tmp_path, monkeypatch):
    """h5py 3.8 (within seqscope's h5py>=3.8) bundles HDF5 1.12 and knows no
    libver 'v114': watch() failed at once with its KeyError. Simulated here by
    taking 'v114' out of h5py's table of format names; the trace is written and
    read back, and its recorded states are the model's."""
    from h5py._hl import files

    monkeypatch.delitem(files.libver_dict, "v114", raising=False)
    with pytest.raises(KeyError):
        h5py.File(tmp_path / "probe.h5", "w", libver=("v110", "v114"))
    rnn = nn.GRU(3, 4)
    x = torch.randn(6, 2, 3)
    with seqscope.watch(rnn, tmp_path / "t.h5", every=1, sequences=2, precision="full"):
        out, _ = rnn(x)
        out.pow(2).mean().backward()
    with seqscope.open(tmp_path / "t.h5") as trace:
        h = trace.hidden("gru.l0", 0)
        np.testing.assert_array_equal(h.data, out.detach().transpose(0, 1).numpy())


def test_unbounded_values_keep_their_range(tmp_path):
    rnn = nn.RNN(2, 3, nonlinearity="relu").double()
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(torch.eye(3) * 40.0)
        rnn.weight_ih_l0.fill_(0.5)
    x = torch.ones(30, 1, 2, dtype=torch.float64)
    with seqscope.watch(rnn, tmp_path / "t.h5", every=1):
        out, _ = rnn(x)
        out[-1].sum().backward()
    with seqscope.open(tmp_path / "t.h5") as trace:
        h = trace.hidden("rnn.l0", 0)  # relu states are unbounded: kept in the model's dtype under "auto"
        assert np.isfinite(h.data).all() and h.max() > 1e45
        g = trace.grad_norms("rnn.l0", 0)["hidden"]
        assert g[0, 0] > 1e40  # beyond float32's range: norms are float64


def test_cli_dashboard_binds_localhost_and_refuses_bad_traces(tmp_path, capsys):
    from seqscope.cli import build_parser

    args = build_parser().parse_args(["dashboard", "x.h5"])
    assert args.host == "127.0.0.1" and args.port == 8050
    assert cli_main(["dashboard", str(tmp_path / "missing.h5")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_dashboard_on_a_port_in_use_is_one_line(small_trace, capsys):
    """A second dashboard on the same port: one line that names the way out, exit 2,
    and no banner announcing an address that serves another program."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli_main(["dashboard", str(small_trace), "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and f"127.0.0.1:{port}" in err and f"--port {port + 1}" in err, err


def test_demo_and_example_write_traces(tmp_path, capsys):
    out = tmp_path / "demo.h5"
    assert cli_main(["demo", "--out", str(out), "--steps", "12", "--every", "5", "--no-dashboard"]) == 0
    assert f"trace written to {out}" in capsys.readouterr().out
    with seqscope.open(out) as trace:
        assert list(trace.steps) == [0, 5, 10]
        assert trace.layers == ["rnn.l0", "rnn.l1"]
    # while another run writes to the path, the demo names the path it wrote to
    with seqscope.watch(nn.LSTM(2, 3), out):
        assert cli_main(["demo", "--out", str(out), "--steps", "2", "--every", "5", "--no-dashboard"]) == 0
    said = capsys.readouterr().out
    assert f"trace written to {tmp_path / 'demo-2.h5'}" in said and f"dashboard {tmp_path / 'demo-2.h5'}" in said
    path = run_example("train_lstm", tmp_path, "--steps", "6", "--every", "2")
    with seqscope.open(path) as trace:
        assert list(trace.steps) == [0, 2, 4]
        assert set(trace.gates("rnn.l1", 4)) == {"input", "forget", "cell", "output"}


def test_cli_output_into_a_closed_pipe_is_not_a_traceback(small_trace):
    # `true` exits without reading: every write of ours meets a closed pipe
    proc = subprocess.run(f"{sys.executable} -m seqscope info {small_trace} | true", shell=True,
                          capture_output=True, text=True)
    assert proc.stderr == ""


def _small_record(step: int, data: np.ndarray):
    """One writer record of layer rnn.l0: ``data`` [sequence, time, unit] and a loss of step / 10."""
    import time

    from seqscope.trace import schema
    from seqscope.trace.writer import ArrayRecord, StepRecord
    arrays = [ArrayRecord(step, 0, schema.FIELD_HIDDEN, data),
              ArrayRecord(step, 0, schema.FIELD_LENGTHS, np.full(data.shape[0], data.shape[1], np.int64)),
              ArrayRecord(step, 0, schema.FIELD_SEQUENCE_INDEX, np.arange(data.shape[0], dtype=np.int64))]
    layer = [(b"rnn.l0", b"rnn", b"rnn_tanh", 0, 0, 2, 3, 3, b"")] if step == 0 else []
    return StepRecord((step, time.time(), 2, 4, 2, schema.PHASE_TRAIN), arrays, [(step, 0, step / 10)], layer,
                      ["loss"] if step == 0 else [])


def _record_groups(writer, on_write=None) -> list[list[int]]:
    """The steps of each group that ``writer`` commits, in order (filled as it
    writes); ``on_write(groups)`` runs before each group is written."""
    groups: list[list[int]] = []
    real = writer._write

    def counting(records):
        groups.append([r.step_row[0] for r in records])
        if on_write is not None:
            on_write(groups)
        return real(records)

    writer._write = counting
    return groups


def test_records_that_queue_up_are_committed_together_and_in_order(tmp_path):
    """While the writer is busy, later records wait in the queue; the next write
    takes all of them (one commit) and every one of them reads back exactly."""
    import threading

    from seqscope.trace.writer import TraceWriter

    release, entered = threading.Event(), threading.Event()
    writer = TraceWriter(tmp_path / "g.h5", {}, queue_size=8)

    def hold_first(groups):
        if len(groups) == 1:  # the first write holds the writer until the other four are queued
            entered.set()
            release.wait(10)
    groups = _record_groups(writer, hold_first)
    rng = np.random.default_rng(0)
    data = {step: rng.normal(size=(2, 4, 3)).astype(np.float32) for step in range(5)}
    for step in range(5):
        writer.submit(_small_record(step, data[step]))
        if step == 0:
            assert entered.wait(10)
    release.set()
    writer.close()
    assert groups == [[0], [1, 2, 3, 4]]
    with seqscope.open(tmp_path / "g.h5") as trace:
        assert list(trace.steps) == [0, 1, 2, 3, 4]
        for step in range(5):
            np.testing.assert_array_equal(trace.hidden("rnn.l0", step), data[step])
        assert list(trace.scalars()["loss"].values) == [0.0, 0.1, 0.2, 0.3, 0.4]
        assert trace.closed_cleanly


def test_the_writer_waits_for_copies_in_flight_before_it_reads_a_record(tmp_path):
    """A record from a GPU holds arrays whose device-to-host copies may still be
    running (capture.host); its ``ready`` functions wait for them. The writer
    must call them before it reads the arrays, and before the deferred scalars
    (sigma_max from a weight copy) run. Here the data arrive only in ``ready``."""
    import time

    from seqscope.trace import schema
    from seqscope.trace.writer import ArrayRecord, StepRecord, TraceWriter

    hidden = np.zeros((2, 4, 3), np.float32)  # what a pinned buffer holds before the copy lands
    want = np.arange(24, dtype=np.float32).reshape(2, 4, 3)
    order = []

    def arrive() -> None:
        time.sleep(0.05)
        hidden[...] = want
        order.append("ready")

    def sigma() -> float:
        order.append("deferred")
        return float(hidden.sum())

    writer = TraceWriter(tmp_path / "r.h5", {})
    layer = [(b"rnn.l0", b"rnn", b"rnn_tanh", 0, 0, 2, 3, 3, b"")]
    arrays = [ArrayRecord(0, 0, schema.FIELD_HIDDEN, hidden),
              ArrayRecord(0, 0, schema.FIELD_LENGTHS, np.full(2, 4, np.int64)),
              ArrayRecord(0, 0, schema.FIELD_SEQUENCE_INDEX, np.arange(2, dtype=np.int64))]
    writer.submit(StepRecord((0, time.time(), 2, 4, 2, schema.PHASE_TRAIN), arrays, [], layer, ["sigma"],
                             [(0, 0, sigma)], [arrive]))
    writer.close()
    assert order == ["ready", "deferred"]
    with seqscope.open(tmp_path / "r.h5") as trace:
        np.testing.assert_array_equal(trace.hidden("rnn.l0", 0), want)
        assert trace.scalars()["sigma"].values[0] == want.sum()


def test_records_within_the_group_window_are_committed_together_and_drain_does_not_wait(tmp_path, monkeypatch):
    """Records that arrive within the writer's window of a group's first record go
    to the file as one group (one commit); drain() writes at once instead of
    waiting for the window to close."""
    import time

    from seqscope.trace import writer as writer_mod

    monkeypatch.setattr(writer_mod, "_WINDOW", 60.0)  # a window no test run outlasts
    writer = writer_mod.TraceWriter(tmp_path / "w.h5", {})
    groups = _record_groups(writer)
    rng = np.random.default_rng(0)
    data = {step: rng.normal(size=(2, 4, 3)).astype(np.float32) for step in range(6)}
    for step in range(3):
        writer.submit(_small_record(step, data[step]))
    start = time.monotonic()
    writer.drain()
    assert time.monotonic() - start < 30, "drain() waited for the window"
    assert groups == [[0, 1, 2]]
    for step in range(3, 6):
        writer.submit(_small_record(step, data[step]))
    writer.close()  # also ends an open window at once
    assert groups == [[0, 1, 2], [3, 4, 5]]
    with seqscope.open(tmp_path / "w.h5") as trace:
        assert list(trace.steps) == list(range(6))
        for step in range(6):
            np.testing.assert_array_equal(trace.hidden("rnn.l0", step), data[step])
        assert trace.closed_cleanly


def test_a_lone_record_is_committed_when_the_window_closes(tmp_path, monkeypatch):
    """Without drain() or close(), a record (recording every 50 steps: nothing else
    arrives) is committed once its window closes, and a reader sees it."""
    import time

    from seqscope.trace import writer as writer_mod

    monkeypatch.setattr(writer_mod, "_WINDOW", 0.2)
    writer = writer_mod.TraceWriter(tmp_path / "l.h5", {})
    try:
        want = np.arange(24, dtype=np.float32).reshape(2, 4, 3)
        writer.submit(_small_record(0, want))
        with seqscope.open(tmp_path / "l.h5") as trace:
            deadline = time.monotonic() + 30
            while not len(trace.steps) and time.monotonic() < deadline:
                time.sleep(0.05)
                trace.refresh()
            assert list(trace.steps) == [0]
            np.testing.assert_array_equal(trace.hidden("rnn.l0", 0), want)
    finally:
        writer.close()


def test_a_records_own_work_does_not_wait_for_the_group_window(tmp_path, monkeypatch):
    """The window delays only the append and the flushes: a record's deferred scalar
    (sigma_max of a GPU layer's weights, the writer's costliest work) runs as soon
    as the record arrives, so the writer is never idle while there is work."""
    import threading

    from seqscope.trace import writer as writer_mod

    monkeypatch.setattr(writer_mod, "_WINDOW", 60.0)
    ran = threading.Event()

    def deferred() -> float:
        ran.set()
        return 2.5
    writer = writer_mod.TraceWriter(tmp_path / "d.h5", {})
    record = _small_record(0, np.zeros((2, 4, 3), np.float32))
    record.new_scalar_names.append("sigma")
    record.deferred_scalars.append((0, 1, deferred))
    writer.submit(record)
    assert ran.wait(20), "the deferred scalar waited for the window"
    writer.drain()
    writer.close()
    with seqscope.open(tmp_path / "d.h5") as trace:
        assert list(trace.scalars()["sigma"].values) == [2.5]
