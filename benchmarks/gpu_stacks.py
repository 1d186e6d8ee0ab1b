"""Where the training thread's CPU time goes in a recorded step on a GPU, by Python call site:
torch.profiler with stacks over a few recorded steps of nn.LSTM / nn.GRU.

    python benchmarks/gpu_stacks.py OUT_DIR [cpu]   # cpu: a dry run of the script itself

Appends to OUT_DIR/gpu-stacks.txt: the operators with the most self CPU time, grouped by the
innermost seqscope call sites (aten::index_select first: session 9 saw 40-214 us per call).
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import seqscope

SIZES = [(32, 100, 64, 256), (64, 200, 128, 512)]


def main(out_dir: str, device: str = "cuda") -> None:
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_stacks: no CUDA device")
    dev = torch.device(device)
    tmp = tempfile.mkdtemp(prefix="seqscope-gpu-stacks-")
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
            for _ in range(3):
                step()
            scope.writer.drain()
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            with profile(activities=acts, with_stack=True, record_shapes=True) as prof:
                for _ in range(3):
                    step()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            scope.writer.drain()
            scope.close()
            lines.append(f"=== nn.{kind.upper()} B={b} T={t} I={i} H={h}, recorded, 3 steps")
            by_shape = prof.key_averages(group_by_input_shape=True)
            sel = [e for e in by_shape if e.key in ("aten::index_select", "aten::copy_", "aten::to", "aten::_to_copy")]
            sel.sort(key=lambda e: -e.self_cpu_time_total)
            for e in sel[:12]:
                lines.append(f"{e.key} shapes={e.input_shapes} count={e.count} self_cpu_total={e.self_cpu_time_total:.0f}us "
                             f"cpu_total={e.cpu_time_total:.0f}us")
            sites: dict = {}
            for e in prof.events():
                if e.name in ("aten::index_select", "aten::copy_", "aten::_to_copy") and e.device_type.name == "CPU":
                    frames, parent = [], e.cpu_parent
                    while parent is not None and len(frames) < 3:
                        if "seqscope/" in parent.name:
                            frames.append(parent.name.split("seqscope/")[-1])
                        parent = parent.cpu_parent
                    where = " < ".join(frames) or "(no seqscope frame)"
                    n, us = sites.get((e.name, where), (0, 0.0))
                    sites[(e.name, where)] = (n + 1, us + e.self_cpu_time_total)
            for (name, where), (n, us) in sorted(sites.items(), key=lambda kv: -kv[1][1])[:14]:
                lines.append(f"site {name} x{n} self_cpu={us:.0f}us at {where}")
            lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    with open(os.path.join(out_dir, "gpu-stacks.txt"), "a") as f:
        f.write("\n".join(lines) + "\n\n")
    print("\n".join(ln for ln in lines if ln.startswith(("aten", "===", "site"))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".", *sys.argv[2:3])
