"""Part 5 on a GPU: peak device memory of recorded training steps against plain
ones (torch.cuda.max_memory_allocated), for part 5's model (2-layer nn.LSTM,
B=32, T=100, I=64, H=256) and a larger one (B=64, T=200, I=128, H=512).

    python benchmarks/gpu_memory.py OUT_DIR [cpu]   # cpu: a dry run of the script itself

Each model runs 5 plain steps, then 5 steps with every step recorded (writer
drained after each, as training drains it), with the peak reset before each
phase. 'Step peak': the peak during the phase less what was allocated before it
(the model, its input and, for the recorded phase, nothing of seqscope's yet).
Appends the table to OUT_DIR/gpu-memory.md and prints it.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
from torch import nn

import seqscope

SIZES = [(32, 100, 64, 256), (64, 200, 128, 512)]


def main(out_dir: str, device: str = "cuda") -> None:
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_memory: no CUDA device")
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    tmp = tempfile.mkdtemp(prefix="seqscope-gpu-memory-")
    lines = ["| 2-layer nn.LSTM, B, T, I, H | allocated before | plain step peak | recorded step peak | ratio |",
             "|---|---|---|---|---|"]
    for (b, t, i, h) in SIZES:
        torch.manual_seed(0)
        m = nn.LSTM(i, h, num_layers=2).to(dev)
        x = torch.randn(t, b, i, device=dev)
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)

        def step() -> None:
            out, _ = m(x)
            out.pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def phase(scope: seqscope.Scope | None) -> tuple[float, float]:
            step()  # warm-up outside the measured peak (cuDNN workspaces, lazy state)
            if scope is not None:
                scope.writer.drain()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() if cuda else 0
            for _ in range(5):
                step()
                if scope is not None:
                    scope.writer.drain()
            if cuda:
                torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() if cuda else 0
            return before / 2**20, (peak - before) / 2**20

        before, plain = phase(None)
        scope = seqscope.watch(m, os.path.join(tmp, f"mem{h}.h5"), every=1)
        _, recorded = phase(scope)
        scope.close()
        ratio = recorded / plain if plain > 0 else float("nan")
        lines.append(f"| {b}, {t}, {i}, {h} | {before:.1f} MiB | {plain:.1f} MiB | {recorded:.1f} MiB | "
                     f"{ratio:.2f}x |")
    with open(os.path.join(out_dir, "gpu-memory.md"), "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".", *sys.argv[2:3])
