"""What storing fewer sequences buys at part 1's sizes: recorded / plain step of
nn.LSTM / nn.GRU / nn.RNN with ``watch(sequences=S)`` for S = 8 (the default),
4, 2 and 1, all in one process, blocks interleaved with the plain module's
(benchmarks/run.py's ``interleaved``, writer drained inside the block).

It answers one of the options put to #6's owner for the small layers ("record
less"): if even one stored sequence stays above 1.5x, the recording's cost there
is per record, not per sequence.

    python benchmarks/fewer_sequences.py [--sizes 1] [--reps 15]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import SIZES, interleaved  # noqa: E402

import seqscope  # noqa: E402

COUNTS = (8, 4, 2, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, default=1, help="how many of part 1's sizes, smallest first")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    device = torch.device("cpu")
    tmp = tempfile.mkdtemp(prefix="seqscope-fewer-")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| module | B, T, I, H | plain step | " + " | ".join(f"S={s}" for s in COUNTS) + " |")
    print("|---|---|---|" + "---|" * len(COUNTS))
    for kind, cls in (("LSTM", nn.LSTM), ("GRU", nn.GRU), ("RNN", nn.RNN)):
        for (b, t, i, h) in SIZES[: args.sizes]:
            torch.manual_seed(0)
            plain = cls(i, h)
            x = torch.randn(t, b, i)
            watched = {}
            scopes = {}
            for s in COUNTS:
                m = cls(i, h)
                m.load_state_dict(plain.state_dict())
                watched[s] = m
                scopes[s] = seqscope.watch(m, os.path.join(tmp, f"{kind}{h}-{s}.h5"), every=1, sequences=s)

            def step(m: nn.Module) -> None:
                out, _ = m(x)
                out.pow(2).mean().backward()

            fns = {"plain": lambda: step(plain), **{str(s): (lambda s=s: step(watched[s])) for s in COUNTS}}
            rounds: dict[str, list[float]] = {}
            interleaved(fns, args.reps, device, block=5,
                        after={str(s): scopes[s].writer.drain for s in COUNTS}, samples=rounds)
            for sc in scopes.values():
                sc.close()
            p = statistics.median(rounds["plain"])
            ratios = [statistics.median(rounds[str(s)]) / p for s in COUNTS]  # as run.py: median / median
            print(f"| nn.{kind} | {b}, {t}, {i}, {h} | {p * 1e3:.1f} ms | "
                  + " | ".join(f"{r:.2f}x" for r in ratios) + " |", flush=True)


if __name__ == "__main__":
    main()
