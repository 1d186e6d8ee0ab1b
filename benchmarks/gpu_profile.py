"""Where a recorded step's time goes on a GPU: torch.profiler over a few
recorded and plain steps of nn.LSTM / nn.GRU at benchmark part 1's sizes.

    python benchmarks/gpu_profile.py OUT_DIR [cpu]   # cpu: a dry run of the script itself

Appends to OUT_DIR/gpu-profile.txt, for each module and size: the top operators by self CPU time
and by device time, and how often the training thread waited for the device
(cudaStreamSynchronize, cudaMemcpy device-to-host, .item()). Used by
benchmarks/gpu_check.sh; on a CPU-only machine it exits with a message.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import seqscope

SIZES = [(16, 50, 32, 64), (32, 100, 64, 256), (64, 200, 128, 512)][: int(os.environ.get("SEQSCOPE_PROFILE_SIZES", "3"))]
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "aten::_local_scalar_dense",
         "cudaEventSynchronize")


def _host_allocs(avg) -> dict[str, tuple[int, float]]:  # type: ignore[no-untyped-def]
    """Calls and CPU ms of the CUDA runtime's pinned-memory allocation and release."""
    return {e.key: (e.count, round(e.self_cpu_time_total / 1e3, 3)) for e in avg
            if e.key in ("cudaHostAlloc", "cudaFreeHost", "cudaHostRegister")}


def main(out_dir: str, device: str = "cuda") -> None:
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_profile: no CUDA device")
    dev = torch.device(device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()
    tmp = tempfile.mkdtemp(prefix="seqscope-gpu-profile-")
    for kind in ("lstm", "gru"):
        for (b, t, i, h) in SIZES:
            torch.manual_seed(0)
            cls = nn.LSTM if kind == "lstm" else nn.GRU
            plain_m, rec_m = cls(i, h).to(dev), cls(i, h).to(dev)
            rec_m.load_state_dict(plain_m.state_dict())
            x = torch.randn(t, b, i, device=dev)
            scope = seqscope.watch(rec_m, os.path.join(tmp, f"{kind}{h}.h5"), every=1)

            def step(m: nn.Module) -> None:
                out, _ = m(x)
                out.pow(2).mean().backward()

            lines = [f"nn.{kind.upper()} B={b} T={t} I={i} H={h}"]
            for name, m in (("plain", plain_m), ("recorded", rec_m)):
                for _ in range(3):
                    step(m)
                scope.writer.drain()
                sync()
                # wall time split: forward (to the point it returns) and backward, synchronized
                fwd, bwd, ret = [], [], []
                for _ in range(10):
                    sync()
                    t0 = time.perf_counter()
                    out, _ = m(x)
                    t1 = time.perf_counter()
                    out.pow(2).mean().backward()
                    t2 = time.perf_counter()
                    sync()
                    t3 = time.perf_counter()
                    fwd.append(t1 - t0)
                    bwd.append(t3 - t1)
                    ret.append(t2 - t1)
                    if name == "recorded":
                        scope.writer.drain()
                fwd.sort()
                bwd.sort()
                ret.sort()
                lines.append(f"{name}: forward returns after {fwd[5] * 1e3:.2f} ms, backward returns after {ret[5] * 1e3:.2f} ms, "
                             f"backward+sync {bwd[5] * 1e3:.2f} ms "
                             f"(medians of 10)")
                with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])) as prof:
                    for _ in range(5):
                        step(m)
                    sync()
                if name == "recorded":
                    scope.writer.drain()
                avg = prof.key_averages()
                waits = {e.key: e.count for e in avg if any(w in e.key for w in WAITS)}
                lines.append(f"{name}: waits for the device over 5 steps: {waits}")
                lines.append(f"{name}: kernel launches over 5 steps: "
                             f"{sum(e.count for e in avg if e.key in ('cudaLaunchKernel', 'cuLaunchKernel', 'cudaLaunchKernelExC'))}")
                lines.append(f"{name}: pinned-memory allocations over 5 steps (writer drained after the 5): "
                             f"{_host_allocs(avg)}")
                lines.append(avg.table(sort_by="self_cpu_time_total", row_limit=22))
                lines.append(avg.table(sort_by="self_device_time_total", row_limit=12))
                if name == "recorded":
                    # the benchmark's own pattern: each step's record written before the next
                    # (session 13 saw 9 cudaHostAlloc per 5 steps above; are they only this
                    # profile's undrained steps?)
                    with profile(activities=[ProfilerActivity.CPU]
                                 + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])) as prof:
                        for _ in range(5):
                            step(m)
                            scope.writer.drain()
                        sync()
                    lines.append(f"{name}: pinned-memory allocations over 5 steps, each drained: "
                                 f"{_host_allocs(prof.key_averages())}")
            scope.close()
            with open(os.path.join(out_dir, "gpu-profile.txt"), "a") as f:
                f.write("\n".join(lines) + "\n\n")
            print("\n".join(line for line in lines if "\n" not in line), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".", *sys.argv[2:3])
