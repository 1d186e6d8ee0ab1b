"""capture.graphs: the CUDA-graph replay of the per-timestep loops. The graphs
themselves need a GPU (tests/test_fused_reference.py's CUDA test records
repeated layouts); here the wiring around them runs on the CPU: the inputs
handed to a graph rebuild the same scan, and the cache's rules."""

from __future__ import annotations

import pytest
import torch

from seqscope.capture import graphs
from seqscope.capture import recurrences as rec


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    graphs.reset()
    monkeypatch.setattr(graphs, "_off", False)  # the default (SEQSCOPE_CUDA_GRAPHS=0 turns them off)
    yield
    graphs.reset()


def test_graphs_are_on_unless_turned_off():
    import os
    import subprocess
    import sys

    code = "from seqscope.capture import graphs; print(graphs._off)"
    for value, off in ((None, "False"), ("0", "True"), (" 0 ", "True"), ("1", "False")):
        env = {k: v for k, v in os.environ.items() if k != "SEQSCOPE_CUDA_GRAPHS"}
        if value is not None:
            env["SEQSCOPE_CUDA_GRAPHS"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == off


def _layer(kind: str, proj: int = 0):
    torch.manual_seed(0)
    t, s, h, n_in = 6, 3, 5, 2
    gates = {"lstm": 4, "gru": 3}.get(kind, 1)
    out = proj or h
    w = rec.LayerWeights(kind, torch.randn(gates * h, n_in, dtype=torch.float64),
                         torch.randn(gates * h, out, dtype=torch.float64), None, None,
                         torch.randn(proj, h, dtype=torch.float64) if proj else None)
    c0 = torch.randn(s, h, dtype=torch.float64) if kind == "lstm" else None
    details = rec.forward_details(w, torch.randn(t, s, n_in, dtype=torch.float64),
                                  torch.tanh(torch.randn(t, s, out, dtype=torch.float64)),
                                  torch.zeros(s, out, dtype=torch.float64), c0, None, compiled=False)
    ext_h = torch.randn(t, 2, s, out, dtype=torch.float64)
    ext_c = torch.randn(t, 2, s, h, dtype=torch.float64) if kind == "lstm" else None
    return w, details, ext_h, ext_c


@pytest.mark.parametrize("kind,proj,with_c", [("lstm", 0, True), ("lstm", 3, True), ("lstm", 0, False),
                                              ("gru", 0, False), ("rnn_tanh", 0, False)])
def test_the_graph_inputs_rebuild_the_same_scan(kind, proj, with_c, monkeypatch):
    """What replay() hands a graph (flattened tensors and a function of them)
    computes what the eager scan computes from the original objects."""
    w, details, ext_h, ext_c = _layer(kind, proj)
    ext_c = ext_c if with_c else None
    calls = []

    def run_directly(name, fn, inputs, copy_out=True):  # a graph replays fn on copies of inputs
        calls.append((name, copy_out))
        return fn(*[t.clone() for t in inputs])

    monkeypatch.setattr(graphs, "replay", run_directly)
    got = rec._scan_as_graph(w, details, ext_h, ext_c)
    want = rec.eager_backward_scan(w, details, ext_h, ext_c)
    assert calls and got is not None
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    if want[1] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_cpu_tensors_are_never_captured():
    w, details, ext_h, ext_c = _layer("lstm")
    for _ in range(3):
        assert graphs.replay("x", lambda *ts: (ts[0],), [ext_h]) is None


class _FakeGraph:
    """Stands in for a captured graph: counts captures, runs the function."""

    captured = 0

    def __init__(self, fn, inputs):
        _FakeGraph.captured += 1
        self.fn = fn

    def run(self, inputs, copy_out):
        return self.fn(*inputs)


def test_a_layout_is_captured_the_second_time_and_kept_for_eight(monkeypatch):
    monkeypatch.setattr(graphs, "_Graph", _FakeGraph)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    _FakeGraph.captured = 0
    x = torch.ones(2)

    def double(t):
        return (2 * t,)

    assert graphs.replay("f", double, [x]) is None  # first sighting: the caller runs it
    assert graphs.replay("f", double, [x])[0].tolist() == [2.0, 2.0]
    assert graphs.replay("f", double, [x])[0].tolist() == [2.0, 2.0]
    assert _FakeGraph.captured == 1
    for n in range(3, 12):  # nine more layouts, each seen twice: the first one is evicted
        for _ in range(2):
            graphs.replay("f", double, [torch.ones(n)])
    assert _FakeGraph.captured == 10
    assert graphs.replay("f", double, [x])[0].tolist() == [2.0, 2.0]  # seen again: captured again
    assert _FakeGraph.captured == 11


def test_a_failing_capture_turns_graphs_off_and_the_caller_runs_eagerly(monkeypatch, caplog):
    def broken(fn, inputs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_Graph", broken)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    x = torch.ones(2)
    assert graphs.replay("f", lambda t: (t,), [x]) is None
    with caplog.at_level("WARNING", logger="seqscope"):
        assert graphs.replay("f", lambda t: (t,), [x]) is None
    assert graphs._off
    assert any("CUDA graphs turned off" in r.getMessage() for r in caplog.records)
