"""Crashes, bad values, bad files, full disks: nothing lost, nothing leaked,
training never harmed."""

from __future__ import annotations

import errno
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

import seqscope
from seqscope.cli import main as cli_main
from seqscope.diagnose import diagnose
from seqscope.errors import TraceError
from tests.test_scope import _Tagger

TRAINER = textwrap.dedent("""
    import sys, torch
    from torch import nn
    import seqscope
    torch.manual_seed(0)
    model = nn.LSTM(3, 16, num_layers=2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with seqscope.watch(model, sys.argv[1], every=1) as scope:
        for step in range(100000):
            out, _ = model(torch.randn(20, 4, 3))
            loss = out.pow(2).mean()
            loss.backward()
            scope.log(loss=loss)
            print(step, repr(loss.item()), flush=True)
            opt.step()
            opt.zero_grad()
""")


@pytest.mark.parametrize("seed", range(5))
def test_sigkill_at_a_random_moment_leaves_a_readable_trace(tmp_path, seed):
    from seqscope.trace import writer as writer_mod

    path = tmp_path / "killed.h5"
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, str(path)], stdout=subprocess.PIPE, text=True)
    losses: dict[int, float] = {}
    target = random.Random(seed).randint(3, 60)  # steps before the kill
    # after the writer's group window (20 ms): the step just printed has had time to commit
    delay = writer_mod._WINDOW + random.Random(seed + 100).random() * 0.05
    try:
        for line in proc.stdout:
            step, value = line.split()
            losses[int(step)] = float(value)
            if int(step) >= target:
                time.sleep(delay)
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    for line in proc.stdout.read().splitlines():  # what it printed before dying
        if len(line.split()) == 2:
            step, value = line.split()
            losses[int(step)] = float(value)
    with seqscope.open(path) as trace:
        assert not trace.closed_cleanly
        steps = list(trace.steps)
        # every committed step is there, in order, and intact
        assert steps == list(range(len(steps)))
        assert len(steps) >= target - 6  # at most the step in flight and the writer's short queue are lost
        loss = trace.scalars()["loss"]
        for s, v in zip(loss.steps, loss.values):
            assert v == losses[int(s)]
        for s in steps:
            for layer in trace.layers:
                assert np.isfinite(trace.hidden(layer, s)).all()
                assert np.isfinite(trace.grad_norms(layer, s)["cell"]).all()
        diagnose(trace)
    assert cli_main(["info", str(path)]) == 0
    assert cli_main(["diagnose", str(path), "--json"]) == 0


def _writer_threads() -> int:
    return sum(t.name == "seqscope-writer" for t in threading.enumerate())


def test_keyboard_interrupt_closes_everything(tmp_path):
    model = nn.GRU(2, 4)
    before = _writer_threads()
    with pytest.raises(KeyboardInterrupt):
        with seqscope.watch(model, tmp_path / "t.h5", every=1):
            for step in range(5):
                model(torch.randn(3, 2, 2))[0].sum().backward()
                if step == 3:
                    raise KeyboardInterrupt
    assert _writer_threads() == before
    assert "forward" not in model.__dict__ and not model._forward_pre_hooks
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert list(trace.steps) == [0, 1, 2]  # step 3 was interrupted
        assert trace.closed_cleanly


UNCLOSED = textwrap.dedent("""
    import atexit, os, sys, torch
    from torch import nn
    is_child = False

    def report():  # registered before seqscope's own exit handler, so it runs after it
        if is_child:
            print("the child closed the scope" if scope._closed else "the child left the scope open", flush=True)

    atexit.register(report)
    import seqscope
    torch.manual_seed(0)
    model = nn.GRU(2, 4)
    scope = seqscope.watch(model, sys.argv[1], every=50)  # never closed
    for step in range(120):
        model(torch.randn(3, 2, 2))[0].sum().backward()
        scope.log(loss=float(step))
        if step == 119 and sys.argv[2] == "raise":
            raise RuntimeError("the script fails in its last step")
    if sys.argv[2] == "fork":  # a child that exits through the interpreter (not os._exit)
        pid = os.fork()
        if pid == 0:
            is_child = True
            sys.exit(0)
        os.waitpid(pid, 0)
""")


@pytest.mark.parametrize("end", ["normal", "raise", "fork"])
def test_a_scope_the_script_never_closes_is_closed_at_exit(tmp_path, end):
    """``scope = seqscope.watch(...)`` without ``with`` or ``close()``: at exit the
    queued records and the scalars of the steps since the last recorded one are
    written and the file is closed cleanly (they were lost with the writer, a daemon
    thread). A script that ends on an unhandled exception loses only the step that
    the exception interrupted. A forked child exiting leaves the parent's file alone."""
    path = tmp_path / "t.h5"
    proc = subprocess.run([sys.executable, "-c", UNCLOSED, str(path), end], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == (1 if end == "raise" else 0), proc.stderr
    if end == "fork":
        assert "the child left the scope open" in proc.stdout
    with seqscope.open(path) as trace:
        assert trace.closed_cleanly
        assert list(trace.steps) == [0, 50, 100]
        last = 118 if end == "raise" else 119
        assert list(trace.scalars()["loss"].steps) == list(range(last + 1))


def test_an_empty_batch_is_not_a_recording_failure(tmp_path, caplog):
    """A batch of zero sequences (a filter left nothing) has nothing to record: no
    warning (seqscope's one warning about failed recordings stays for real ones), and
    the steps after it are recorded."""
    model = _Tagger()  # a fused layer and a cell loop
    with caplog.at_level(logging.WARNING, logger="seqscope"):
        with seqscope.watch(model, tmp_path / "t.h5", every=1):
            for batch in (0, 2, 0, 3):
                (model(torch.randn(4, batch, 3)).sum() + sum(p.sum() for p in model.parameters())).backward()
    assert not [r for r in caplog.records if r.name == "seqscope"], caplog.text
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert list(trace.steps) == [1, 3]
        assert trace.hidden("rnn.l0", 3).shape == (3, 4, 4)
        assert trace.hidden("cell", 3).shape == (3, 4, 4)


def test_max_bytes_stops_recording_with_one_warning(tmp_path, caplog):
    model = nn.LSTM(4, 32)
    with caplog.at_level(logging.WARNING, logger="seqscope"):
        with seqscope.watch(model, tmp_path / "t.h5", every=1, max_bytes=200_000) as scope:
            for step in range(20):
                model(torch.randn(50, 8, 4))[0].sum().backward()
                scope.log(loss=float(step))
    warnings = [r for r in caplog.records if "max_bytes" in r.getMessage()]
    assert len(warnings) == 1
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert 0 < len(trace.steps) < 20
        assert trace.closed_cleanly  # a budget is not an error: the file was closed properly


def test_full_disk_stops_recording_training_goes_on(tmp_path, caplog, monkeypatch):
    from seqscope.trace import writer as writer_mod

    real = writer_mod.TraceWriter._write
    calls = {"n": 0}

    def failing(self, record):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, record)

    monkeypatch.setattr(writer_mod.TraceWriter, "_write", failing)
    monkeypatch.setattr(writer_mod, "_GROUP_MAX", 1)  # one record per write: the 4th write fails
    model = nn.RNN(2, 3)
    with caplog.at_level(logging.WARNING, logger="seqscope"):
        with seqscope.watch(model, tmp_path / "t.h5", every=1) as scope:
            for step in range(12):
                model(torch.randn(4, 2, 2))[0].sum().backward()
                scope.log(loss=float(step))
    assert sum("No space left" in r.getMessage() for r in caplog.records) == 1
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert list(trace.steps) == [0, 1, 2]
        assert not trace.closed_cleanly  # the write error is visible in `seqscope info`


FULL_DISK = textwrap.dedent("""
    import logging, os, sys, torch
    from torch import nn
    import seqscope
    logging.basicConfig(level=logging.WARNING, format="LOG %(message)s")
    torch.manual_seed(0)
    model = nn.LSTM(4, 64)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with seqscope.watch(model, sys.argv[1], every=1, precision="float32") as scope:
        for step in range(40):
            loss = model(torch.randn(50, 8, 4))[0].pow(2).mean()
            loss.backward()
            scope.log(loss=loss)
            opt.step()
            opt.zero_grad()
            print("step", step, flush=True)
""")


def test_a_real_full_disk_keeps_committed_steps_and_training_goes_on(tmp_path):
    """ENOSPC from a real filesystem: an 8 MB tmpfs that a recorded run overfills."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        reason = f"mounting a small tmpfs needs root: {mounted.stderr.strip()}"
        if os.environ.get("SEQSCOPE_REQUIRE_FULL_DISK") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        path = disk / "t.h5"
        run = subprocess.run([sys.executable, "-c", FULL_DISK, str(path)], capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr
        assert run.stdout.count("step ") == 40  # training went on to the end
        logs = [line for line in run.stderr.splitlines() if line.startswith("LOG ")]
        assert len(logs) == 1 and logs[0].startswith("LOG seqscope: writing") and "No space left on device" in logs[0]
        assert "Traceback" not in run.stderr
        with seqscope.open(path) as trace:
            steps = list(trace.steps)
            assert 0 < len(steps) < 40 and steps == list(range(len(steps)))  # committed steps, in order
            assert not trace.closed_cleanly
            for s in steps:
                assert np.isfinite(trace.hidden("lstm.l0", s)).all()
                assert np.isfinite(trace.grad_norms("lstm.l0", s)["cell"]).all()
            assert set(trace.scalars()["loss"].steps) >= set(steps)
        assert cli_main(["info", str(path)]) == 0
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_memory_stays_flat_over_10000_recorded_steps(tmp_path):
    model = nn.GRU(2, 4)
    x = torch.randn(5, 2, 2)
    with seqscope.watch(model, tmp_path / "t.h5", every=1, sequences=1) as scope:
        for step in range(10_000):
            model(x)[0].sum().backward()
            scope.log(loss=1.0)
            if step == 2_000:
                baseline = _rss_mb()
        grown = _rss_mb() - baseline
    assert grown < 40, f"resident memory grew {grown:.1f} MB over 8000 recorded steps"
    with seqscope.open(tmp_path / "t.h5") as trace:
        assert len(trace.steps) == 10_000


@pytest.fixture(scope="module")
def good_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "good.h5"
    model = nn.LSTM(2, 3, num_layers=2)
    with seqscope.watch(model, path, every=1) as scope:
        for step in range(3):
            model(torch.randn(4, 2, 2))[0].sum().backward()
            scope.log(loss=float(step))
    return path


READ_ALL = textwrap.dedent("""
    import os, sys
    import seqscope
    from seqscope.errors import TraceError
    try:
        with seqscope.open(sys.argv[1]) as trace:
            trace.info()
            trace.scalars()
            for step in trace.steps:
                for layer in trace.layers:
                    trace.hidden(layer, step)
                    trace.cell(layer, step)
                    trace.gates(layer, step)
                    trace.grad_norms(layer, step)
                    trace.propagation(layer, step)
            seqscope.diagnose(trace)
    except TraceError as exc:
        print(exc, file=sys.stderr)
        os._exit(2)
    os._exit(0)
""")


# no shrinking: every example spawns processes, and a hang costs the watchdog's time
@settings(max_examples=30, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_or_truncated_files_give_trace_errors(good_trace, tmp_path_factory, data):
    raw = bytearray(good_trace.read_bytes())
    mode = data.draw(st.sampled_from(["truncate", "flip", "zero_block"]))
    if mode == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif mode == "flip":
        for _ in range(data.draw(st.integers(1, 20))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    else:
        start = data.draw(st.integers(0, len(raw) - 1))
        stop = start + data.draw(st.integers(1, 4096))
        raw[start:stop] = bytes(len(raw[start:stop]))
    path = tmp_path_factory.mktemp("bad") / "bad.h5"
    path.write_bytes(bytes(raw))
    # A byte-level corruption can hang or crash the HDF5 library itself, so the
    # in-process read runs in a child process here, as the command line does.
    try:
        proc = subprocess.run([sys.executable, "-c", READ_ALL, str(path)], capture_output=True, text=True,
                              timeout=15)
    except subprocess.TimeoutExpired:
        pass  # a hang inside the HDF5 library: the command line below must still answer
    else:
        assert proc.returncode in (0, 2), proc.stderr  # 2: one TraceError, never another exception
    # the command line never hangs and never shows a traceback
    cli = subprocess.run([sys.executable, "-m", "seqscope", "info", str(path)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "SEQSCOPE_PROBE_TIMEOUT": "5"})
    assert cli.returncode in (0, 2) and "Traceback" not in cli.stderr, cli.stderr


def test_writing_with_a_reader_open(tmp_path):
    """SWMR: a reader opened while training writes sees new steps after refresh()."""
    path = tmp_path / "live.h5"
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if int(line.split()[0]) >= 5:
                break
        trace = seqscope.open(path)
        first = len(trace.steps)
        deadline = time.time() + 20
        while len(trace.steps) < first + 5 and time.time() < deadline:
            time.sleep(0.2)
            trace.refresh()
        assert len(trace.steps) >= first + 5
        last = int(trace.steps[-1])
        assert trace.hidden("lstm.l1", last).shape[1] == 20
        trace.close()
    finally:
        proc.kill()
        proc.wait()


def _run_steps(scope, model, n, tag):
    for _ in range(n):
        out, _ = model(torch.randn(6, 2, 3))
        out.pow(2).mean().backward()
        scope.log(run=tag)


def test_a_second_run_on_a_path_in_use_records_beside_it(tmp_path, caplog):
    """Two runs given one path (a sweep, a run started again while the first
    trains): the second used to truncate the first's file and write into it, a
    trace that neither could read. Now the second records to the first free
    numbered path beside it, with one warning; an earlier trace at a numbered path
    is left alone, and a forked child that exits does not release the first run's
    claim."""
    path = tmp_path / "trace.h5"
    model = nn.LSTM(3, 5)
    with seqscope.watch(model, tmp_path / "trace-2.h5", every=1) as earlier:
        _run_steps(earlier, model, 1, 0)
    first = seqscope.watch(model, path, every=1)
    _run_steps(first, model, 2, 1)
    pid = os.fork()
    if pid == 0:  # a DataLoader worker's lifetime, in short
        os._exit(0)
    os.waitpid(pid, 0)
    other = nn.LSTM(3, 5)  # a model is watched by one scope at a time
    with caplog.at_level(logging.WARNING, logger="seqscope"):
        second = seqscope.watch(other, path, every=1)
    said = [r.getMessage() for r in caplog.records if "another run" in r.getMessage()]
    assert len(said) == 1 and str(tmp_path / "trace-3.h5") in said[0], said
    assert second.path == str(tmp_path / "trace-3.h5") and first.path == str(path)
    for _ in range(3):
        _run_steps(first, model, 1, 1)
        _run_steps(second, other, 1, 2)
    first.close()
    second.close()
    for name, run, steps in (("trace.h5", 1, 5), ("trace-2.h5", 0, 1), ("trace-3.h5", 2, 3)):
        with seqscope.open(tmp_path / name) as trace:
            assert trace.closed_cleanly and list(trace.steps) == list(range(steps)), name
            assert set(trace.scalars()["run"].values) == {run}
            assert trace.hidden("lstm.l0", steps - 1).shape == (2, 6, 5)
    # once the first run has closed, its path is free again
    with seqscope.watch(model, path, every=1) as third:
        assert third.path == str(path)


def test_a_new_run_replaces_a_trace_that_a_reader_has_open(tmp_path):
    """A dashboard open on the last run's trace held HDF5's shared lock, and the
    next run on that path stopped at watch() with BlockingIOError. The earlier file
    is now replaced, not truncated: the reader goes on reading the earlier run,
    whole."""
    path = tmp_path / "trace.h5"
    model = nn.GRU(3, 5)
    with seqscope.watch(model, path, every=1) as scope:
        _run_steps(scope, model, 2, 1)
    reader = seqscope.open(path)
    before = reader.hidden("gru.l0", 1).data.copy()
    assert not reader.replaced()
    with seqscope.watch(model, path, every=1) as scope:
        assert scope.path == str(path)
        _run_steps(scope, model, 4, 2)
    assert reader.replaced()  # what a reader asks to move to the new run (the dashboard does)
    reader.refresh()
    assert list(reader.steps) == [0, 1]
    np.testing.assert_array_equal(reader.hidden("gru.l0", 1).data, before)
    assert set(reader.scalars()["run"].values) == {1}
    reader.close()
    with seqscope.open(path) as trace:
        assert list(trace.steps) == [0, 1, 2, 3] and set(trace.scalars()["run"].values) == {2}


def test_an_earlier_trace_that_cannot_be_unlinked_is_overwritten_in_place(tmp_path, monkeypatch):
    """A directory where the earlier trace may be written but not removed (a sticky
    /tmp with another user's file, an immutable directory): the new run truncates the
    file in place and records into it, at the same path (the fallback of the claim,
    untested until session 19)."""
    from seqscope.trace import claim

    path = tmp_path / "trace.h5"
    model = nn.GRU(3, 5)
    with seqscope.watch(model, path, every=1) as scope:
        _run_steps(scope, model, 2, 1)
    real_unlink = os.unlink
    refused: list[str] = []

    def unlink(target, *args, **kwargs):
        if os.fspath(target) == os.fspath(path):
            refused.append(os.fspath(target))
            raise PermissionError(1, "Operation not permitted", os.fspath(target))
        return real_unlink(target, *args, **kwargs)

    monkeypatch.setattr(claim.os, "unlink", unlink)
    inode = os.stat(path).st_ino
    with seqscope.watch(model, path, every=1) as scope:
        assert scope.path == str(path)
        _run_steps(scope, model, 3, 2)
    assert refused and os.stat(path).st_ino == inode  # the same file, truncated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.h5"]
    with seqscope.open(path) as trace:
        assert list(trace.steps) == [0, 1, 2] and set(trace.scalars()["run"].values) == {2}


def test_a_watch_that_fails_leaves_the_earlier_trace_as_it_was(tmp_path):
    """watch() checks the model before it touches the path: a model that cannot be
    watched used to leave the earlier trace there truncated. A path that cannot be
    written is one line, with the path."""
    path = tmp_path / "trace.h5"
    model = nn.LSTM(3, 5)
    with seqscope.watch(model, path, every=1) as scope:
        _run_steps(scope, model, 2, 1)
    with seqscope.watch(model, tmp_path / "other.h5"):
        with pytest.raises(seqscope.UnsupportedModelError, match="already watched"):
            seqscope.watch(model, path)
    with seqscope.open(path) as trace:
        assert list(trace.steps) == [0, 1] and trace.closed_cleanly
    (tmp_path / "file").write_text("")
    with pytest.raises(seqscope.SeqscopeError, match="cannot write the trace") as info:
        seqscope.watch(model, tmp_path / "file" / "trace.h5")
    assert "\n" not in str(info.value) and str(tmp_path / "file" / "trace.h5") in str(info.value)
    with seqscope.watch(model, path, every=1) as scope:  # nothing of the failed watch() is left
        _run_steps(scope, model, 1, 2)


def _committed_steps(path: Path) -> int:
    """How many steps a live run's trace holds, read as the dashboard reads it (0
    before its first commit)."""
    try:
        with seqscope.open(path) as trace:
            return len(trace.steps)
    except (seqscope.SeqscopeError, OSError):
        return 0


def test_a_killed_run_never_blocks_the_next_and_its_trace_is_kept(tmp_path, caplog):
    """The claim on a path is the writer's lock, which the kernel drops with the
    process: while another process trains on the path, a new run goes beside it.
    Once that process is killed its lock is gone, but its trace (never closed, with
    the steps it committed) is what its user most needs: the next run keeps it and
    goes beside it, saying why; moved away, the path is free again."""
    path = tmp_path / "live.h5"
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, str(path)], stdout=subprocess.PIPE, text=True)
    model = nn.LSTM(3, 16, num_layers=2)
    try:
        for line in proc.stdout:
            if int(line.split()[0]) >= 3:
                break
        # its writer commits on its own thread: on a loaded machine it had committed nothing
        # yet when the process was killed (seen once in CI beside other work)
        deadline = time.monotonic() + 60
        while _committed_steps(path) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        with caplog.at_level(logging.WARNING, logger="seqscope"):
            with seqscope.watch(model, path, every=1) as beside:
                assert beside.path == str(tmp_path / "live-2.h5")
        assert "being written by another run" in caplog.records[-1].getMessage()
    finally:
        proc.kill()
        proc.wait()
    with seqscope.open(path) as killed:
        assert not killed.closed_cleanly and len(killed.steps) >= 3
        kept = list(killed.steps)
    with caplog.at_level(logging.WARNING, logger="seqscope"):
        with seqscope.watch(model, path, every=1) as scope:
            assert scope.path == str(tmp_path / "live-3.h5")
            _run_steps(scope, model, 1, 3)
    said = caplog.records[-1].getMessage()
    assert "ended without closing its trace" in said and f"{len(kept)} recorded steps" in said, said
    with seqscope.open(path) as killed:
        assert list(killed.steps) == kept
    path.rename(tmp_path / "killed.h5")
    with seqscope.watch(model, path, every=1) as scope:
        assert scope.path == str(path)
        _run_steps(scope, model, 1, 3)
    with seqscope.open(path) as trace:
        assert list(trace.steps) == [0] and trace.closed_cleanly


def test_a_damaged_file_at_the_path_is_replaced(tmp_path):
    """Whether an earlier file at the path holds an unfinished run is read as the
    command line reads traces (first in a child process: a damaged file can hang
    the HDF5 library); a file that cannot be read is replaced, as before."""
    path = tmp_path / "trace.h5"
    model = nn.LSTM(3, 5)
    scope = seqscope.watch(model, path, every=1)
    _run_steps(scope, model, 3, 1)
    scope.writer.drain()
    data = path.read_bytes()
    scope.close()
    path.write_bytes(data[: len(data) // 2])  # a copy cut short
    with seqscope.watch(model, path, every=1) as scope:
        assert scope.path == str(path)
        _run_steps(scope, model, 1, 2)
    with seqscope.open(path) as trace:
        assert list(trace.steps) == [0] and trace.closed_cleanly


def test_no_code_runs_when_reading(tmp_path):
    """Traces are HDF5 arrays and JSON; the reader never unpickles or torch.loads."""
    root = Path(seqscope.__file__).parent
    sources = list(root.rglob("*.py")) + list((root.parent / "dashboard").rglob("*.py"))
    for src in sources:
        text = src.read_text()
        assert "pickle" not in text and "torch.load" not in text, src
    # an object-dtype attribute cannot smuggle in a pickle either: config is parsed as JSON
    path = tmp_path / "t.h5"
    model = nn.RNN(2, 2)
    with seqscope.watch(model, path, every=1):
        model(torch.randn(2, 1, 2))[0].sum().backward()
    with h5py.File(path, "r+") as f:
        f.attrs["config"] = "not json {"
    with pytest.raises(TraceError):
        seqscope.open(path)
