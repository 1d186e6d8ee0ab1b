"""Where the training thread's time goes in a recorded step on a GPU, by Python
function: cProfile over recorded steps of nn.LSTM / nn.GRU (the training thread
only; the writer's work is drained outside the profile).

    python benchmarks/gpu_cprofile.py OUT_DIR [cpu]   # cpu: a dry run of the script itself

Appends to OUT_DIR/gpu-cprofile.txt the top functions by cumulative and by own time.
On a GPU the recorded step is bound by this thread's CPU time (kernel launches,
ATen calls), so this is where its time goes; cProfile's own overhead inflates
the many small calls.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import tempfile
import time

import torch
from torch import nn

import seqscope

SIZES = [(16, 50, 32, 64), (32, 100, 64, 256)]


def main(out_dir: str, device: str = "cuda") -> None:
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_cprofile: no CUDA device")
    dev = torch.device(device)
    tmp = tempfile.mkdtemp(prefix="seqscope-gpu-cprofile-")
    lines = []
    for kind in ("lstm", "gru"):
        for (b, t, i, h) in SIZES:
            torch.manual_seed(0)
            m = (nn.LSTM if kind == "lstm" else nn.GRU)(i, h).to(dev)
            x = torch.randn(t, b, i, device=dev)
            scope = seqscope.watch(m, os.path.join(tmp, f"{kind}{h}.h5"), every=1)

            def step() -> None:
                out, _ = m(x)
                out.pow(2).mean().backward()
            for _ in range(5):
                step()
            scope.writer.drain()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            prof = cProfile.Profile()
            n = 10
            t0 = time.perf_counter()
            for _ in range(n):
                prof.enable()
                step()
                prof.disable()
                scope.writer.drain()
            wall = (time.perf_counter() - t0) / n
            scope.close()
            buf = io.StringIO()
            stats = pstats.Stats(prof, stream=buf)
            stats.sort_stats("cumulative").print_stats(40)
            stats.sort_stats("tottime").print_stats(25)
            lines.append(f"=== nn.{kind.upper()} B={b} T={t} I={i} H={h}: {n} recorded steps under cProfile, "
                         f"{wall * 1e3:.2f} ms per step with the writer drained")
            lines.append(buf.getvalue())
    with open(os.path.join(out_dir, "gpu-cprofile.txt"), "a") as f:
        f.write("\n".join(lines) + "\n\n")
    print("\n".join(ln for ln in lines if ln.startswith("===")), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".", *sys.argv[2:3])
