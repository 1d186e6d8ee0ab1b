"""Unrecorded steps' cost, before and after a change, side by side: part 2's
"hooks installed but idle" measure (benchmarks/run.py, idle_cost_us: a 1-unit
nn.LSTM trained by SGD, scope.log(loss=...) each step, a schedule that records
nothing) run by the ``seqscope`` of an earlier git revision and by the working
tree's, each in processes of its own that take turns (the order alternates by
round). Each process times plain and watched loops of 200 steps interleaved and
prints the watched loop's extra microseconds a step (run.py's own function, with
either side's seqscope); the summary gives each side's median over the rounds and
the median of the per-round differences.

    python benchmarks/idle_ab.py --before 663977f [--device cuda] [--rounds 6]
    python benchmarks/idle_ab.py --before-tree DIR ...   # DIR holds the earlier seqscope/ package
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MEASURE = """
import sys
import torch
sys.path.insert(0, sys.argv[2])  # benchmarks/ of the working tree; seqscope from PYTHONPATH
from run import idle_cost_us
print(idle_cost_us(torch.device(sys.argv[1])))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--before", help="git revision whose seqscope/ is 'before'")
    group.add_argument("--before-tree", help="a directory holding the 'before' seqscope/ package")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="seqscope-idle-ab-"))
    try:
        if args.before_tree:
            before = Path(args.before_tree).resolve()
        else:
            before = scratch / "before"
            before.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, "seqscope"],
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
        trees = {"before": before, "after": ROOT}
        extra: dict[str, list[float]] = {k: [] for k in trees}
        for r in range(args.rounds):
            for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
                env = dict(os.environ, PYTHONPATH=str(trees[side]))
                out = subprocess.run([sys.executable, "-c", MEASURE, args.device, str(ROOT / "benchmarks")], env=env,
                                     cwd=scratch, capture_output=True, text=True, check=True).stdout.split()
                extra[side].append(float(out[-1]))
                print(f"round {r} {side}: {float(out[-1]):+.1f} us a step", flush=True)
        diffs = [a - b for a, b in zip(extra["after"], extra["before"])]
        print(f"\n{args.device}: unrecorded steps' extra cost (1-unit LSTM, SGD), medians of {args.rounds} rounds: "
              f"before {statistics.median(extra['before']):.0f} us, "
              f"after {statistics.median(extra['after']):.0f} us; after - before, median of the rounds' "
              f"differences: {statistics.median(diffs):+.0f} us")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
