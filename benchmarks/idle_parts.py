"""Where an unrecorded training step's cost goes (part 2's "hooks installed but
idle"): a 1-unit nn.LSTM trained by SGD, plain against watched with a schedule
that records nothing, and watched with one part of seqscope's per-step work
switched off at a time. Loops of 200 steps take turns, 20 rounds, medians; the
extra microseconds a step over the plain loop, per variant.

    python benchmarks/idle_parts.py [--device cuda] [--profile OUT_FILE]

Variants ('switched off' means replaced by a no-op for that loop only):
- idle: seqscope as shipped;
- no output hooks: Scope._watch_outputs (gradient hooks on the forward's outputs);
- no parameter hooks: Scope._watch_backward (gradient hooks on chosen parameters);
- no hooks: both;
- no log: the loop does not call scope.log(loss=loss).
--profile: cProfile over 2000 idle steps (every thread: Python 3.12's cProfile
sees the autograd device thread's hooks too), top functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import tempfile
import time
from typing import Any

import torch
from torch import nn

import seqscope
from seqscope.capture import scope as scope_mod

OFF: dict[str, dict[str, Any]] = {
    "idle": {},
    "no output hooks": {"_watch_outputs": lambda self, step, output: None},
    "no parameter hooks": {"_watch_backward": lambda self, step, whole_model=False: None},
    "no hooks": {"_watch_outputs": lambda self, step, output: None,
                 "_watch_backward": lambda self, step, whole_model=False: None},
    "no log": {},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--profile", default=None)
    args = parser.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    tmp = tempfile.mkdtemp(prefix="seqscope-idle-parts-")
    x = torch.randn(2, 1, 1, device=dev)
    loops: dict[str, tuple[nn.Module, torch.optim.Optimizer, seqscope.Scope | None]] = {}
    for name in ["plain", *OFF]:
        torch.manual_seed(0)
        m = nn.LSTM(1, 1).to(dev)
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        scope = None if name == "plain" else seqscope.watch(m, os.path.join(tmp, f"{len(loops)}.h5"),
                                                            every=lambda s: False)
        loops[name] = (m, opt, scope)

    def run(name: str, n: int = 200) -> float:
        m, opt, scope = loops[name]
        saved = {attr: getattr(scope_mod.Scope, attr) for attr in OFF.get(name, {})}
        for attr, fn in OFF.get(name, {}).items():
            setattr(scope_mod.Scope, attr, fn)
        log = scope is not None and name != "no log"
        try:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                loss = m(x)[0].sum()
                loss.backward()
                if log:
                    scope.log(loss=loss)
                opt.step()
                opt.zero_grad()
            if cuda:
                torch.cuda.synchronize()
            return (time.perf_counter() - t0) / n * 1e6
        finally:
            for attr, fn in saved.items():
                setattr(scope_mod.Scope, attr, fn)

    times: dict[str, list[float]] = {k: [] for k in loops}
    names = list(loops)
    for r in range(-2, args.rounds):
        order = names[r % len(names):] + names[:r % len(names)] if r >= 0 else names
        for name in order:
            dt = run(name)
            if r >= 0:
                times[name].append(dt)
    plain = statistics.median(times["plain"])
    print(f"device {dev}, plain step {plain:.1f} us (1-unit LSTM, SGD), medians of {args.rounds} rounds x 200 steps")
    for name in names[1:]:
        print(f"  {name:<20} {statistics.median(times[name]) - plain:+7.1f} us a step")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run("idle", 2000)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
        with open(args.profile, "w") as f:
            f.write(buf.getvalue())
    for _, _, scope in loops.values():
        if scope is not None:
            scope.close()


if __name__ == "__main__":
    main()
