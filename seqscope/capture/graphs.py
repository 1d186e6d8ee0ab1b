"""seqscope's per-timestep loops replayed as CUDA graphs on NVIDIA GPUs.

On the CPU the BPTT scan and the LSTM cell-state recomputation run compiled
(capture.native). On a GPU they run as PyTorch calls: a few small kernels per
timestep, each launched from Python. Measured on an H200 (benchmarks/results-
cuda.md), a recorded LSTM step (B64 T200 H512) launched ~2300 kernels against
the plain step's ~800, and its time went to launching them, not to the GPU's
work. A CUDA graph launches the same kernels with one call.

A graph is captured for a layout (the loop, its tensors' shapes and dtypes) the
second time that layout is seen: a layout seen once (a sequence length that
changes every batch) runs eagerly, as before. Graphs are kept for the 8 most
recent layouts and replayed on static copies of the inputs; the results are
copied out, except the scan's, which its callers reduce to norms at once. The
kernels are the eager ones, so the numbers are the same. Any failure turns
graphs off for the process (the eager loop runs).

**On by default; ``SEQSCOPE_CUDA_GRAPHS=0`` turns them off.** On an H200 (session
6) a capture was once invalidated by another thread's CUDA call (the writer
thread waiting on a copy's event; PyTorch captures in "global" mode by default),
and PyTorch then left its CUDA random number generator in capture state: the
training script's next ``torch.randn`` on the GPU raised. Captures run in
"thread_local" mode since, where other threads' calls cannot invalidate them;
on an H100 (session 9) the CUDA test's graph checks passed with it, a capture
while the writer waits on copies included (benchmarks/profiling.md).
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable, Hashable, Sequence

import torch

log = logging.getLogger("seqscope")

_MAX_GRAPHS = 8
_seen: collections.Counter[Hashable] = collections.Counter()
_graphs: collections.OrderedDict[Hashable, _Graph] = collections.OrderedDict()
_off = os.environ.get("SEQSCOPE_CUDA_GRAPHS", "1").strip() == "0"

Outputs = tuple[torch.Tensor | None, ...]


class _Graph:
    """One captured loop: static inputs, the graph, its outputs."""

    def __init__(self, fn: Callable[..., Outputs], inputs: Sequence[torch.Tensor]) -> None:
        self.inputs = [torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t) for t in inputs]
        device = self.inputs[0].device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture (library handles, workspaces)
            fn(*self.inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (seqscope's writer waiting on a copy,
        # a DataLoader's pinning thread) must not invalidate this capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = fn(*self.inputs)

    def run(self, inputs: Sequence[torch.Tensor], copy_out: bool) -> Outputs:
        for static, t in zip(self.inputs, inputs):
            static.copy_(t)
        self.graph.replay()
        if not copy_out:
            return self.outputs
        # copied out: the next replay overwrites the graph's own buffers
        return tuple(None if o is None else o.clone() for o in self.outputs)


def replay(name: str, fn: Callable[..., Outputs], inputs: Sequence[torch.Tensor],
           copy_out: bool = True) -> Outputs | None:
    """``fn(*inputs)`` from a CUDA graph of it, or None where the caller should
    run ``fn`` itself: not on a GPU, graphs off, the layout's first sighting, or
    inside a capture of the caller's own. ``fn`` must be capturable: kernels
    only, no host synchronisation, its control flow fixed by the shapes.

    ``copy_out=False``: the outputs are the graph's own buffers, not copies (one
    copy kernel fewer per output): the caller must be done with them, in stream
    order, before the same layout is replayed again."""
    global _off
    if _off or not inputs or not all(t.is_cuda for t in inputs):
        return None
    try:
        if torch.cuda.is_current_stream_capturing():
            return None
        key = (name, tuple((tuple(t.shape), t.dtype, t.device) for t in inputs))
        graph = _graphs.get(key)
        if graph is None:
            if len(_seen) > 4096:  # layouts that never repeat: forget them
                _seen.clear()
            _seen[key] += 1
            if _seen[key] < 2:
                return None
            graph = _Graph(fn, inputs)
            _graphs[key] = graph
            if len(_graphs) > _MAX_GRAPHS:
                _graphs.popitem(last=False)
        _graphs.move_to_end(key)
        return graph.run(inputs, copy_out)
    except Exception as exc:  # noqa: BLE001 - the eager loop is always there
        _off = True
        _graphs.clear()
        log.warning("seqscope: CUDA graphs turned off (%s: %s); the eager loops run", type(exc).__name__, exc)
        return None


def reset() -> None:
    """Forget every graph and layout (tests)."""
    _seen.clear()
    _graphs.clear()
