"""Session 13's two GPU changes, before against after, side by side in one process:
recorded steps of nn.LSTM / nn.GRU / nn.RNN (benchmark part 1's sizes), each module
watched twice, one copy as at the session's start, one as now, blocks interleaved
with the plain module's (benchmarks/run.py's `interleaved`, writer drained inside
the block). 'Before' means, for that copy alone:
- its writer thread computes sigma_max(W_hh) with numpy's dense eigensolver (as
  when PyTorch's MKL cannot be limited per thread), not the compiled Lanczos;
- the stored sequences' indices and lengths are copied to the device every step.

    python benchmarks/gpu_ab.py OUT_DIR [cpu]   # cpu: a dry run of the script itself
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import interleaved  # noqa: E402

import seqscope  # noqa: E402
from seqscope.capture import cells, fused, host, native  # noqa: E402

SIZES = [(16, 50, 32, 64), (32, 100, 64, 256), (64, 200, 128, 512)]


def main(out_dir: str, device: str = "cuda") -> None:
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_ab: no CUDA device")
    dev = torch.device(device)
    old_writers: set[int] = set()
    compiled_top = native.top_eigenvalue
    real_constant = host.constant_on_device

    def top_eigenvalue(gram, loaded=None, threads=None):  # the dense solver on the old copy's writer
        if threads is not None and threading.get_ident() in old_writers:
            return None
        return compiled_top(gram, loaded, threads)
    native.top_eigenvalue = top_eigenvalue
    old_now = [False]

    def constant_on_device(t, d):  # a copy every step while the old copy runs
        return host.copy_to_device(t, d) if old_now[0] else real_constant(t, d)
    fused.constant_on_device = cells.constant_on_device = constant_on_device

    tmp = tempfile.mkdtemp(prefix="seqscope-gpu-ab-")
    lines = ["| module | B, T, I, H | plain step | before | after | after / before |", "|---|---|---|---|---|---|"]
    for kind in ("lstm", "gru", "rnn"):
        for (b, t, i, h) in SIZES:
            torch.manual_seed(0)
            cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
            plain_m, old_m, new_m = cls(i, h).to(dev), cls(i, h).to(dev), cls(i, h).to(dev)
            old_m.load_state_dict(plain_m.state_dict())
            new_m.load_state_dict(plain_m.state_dict())
            x = torch.randn(t, b, i, device=dev)
            old_scope = seqscope.watch(old_m, os.path.join(tmp, f"{kind}{h}-old.h5"), every=1)
            new_scope = seqscope.watch(new_m, os.path.join(tmp, f"{kind}{h}-new.h5"), every=1)
            old_writers.add(old_scope.writer._thread.ident)

            def step(m: nn.Module) -> None:
                out, _ = m(x)
                out.pow(2).mean().backward()

            def old() -> None:
                old_now[0] = True
                try:
                    step(old_m)
                finally:
                    old_now[0] = False
            res = interleaved({"plain": lambda: step(plain_m), "old": old, "new": lambda: step(new_m)}, 7, dev,
                              block=5, after={"old": old_scope.writer.drain, "new": new_scope.writer.drain})
            old_scope.close()
            new_scope.close()
            p = res["plain"]
            lines.append(f"| nn.{kind.upper()} | {b}, {t}, {i}, {h} | {p * 1e3:.1f} ms | {res['old'] / p:.2f}x | "
                         f"{res['new'] / p:.2f}x | {res['new'] / res['old']:.2f} |")
            print(lines[-1], flush=True)
    with open(os.path.join(out_dir, "gpu-ab.md"), "a") as f:
        f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".", *sys.argv[2:3])
