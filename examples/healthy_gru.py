"""Healthy scenario: a GRU learns the adding problem with T=50.

The loss falls from the 1/6 baseline to below 0.01 in about 600 steps;
``seqscope diagnose`` on the trace reports no error-severity finding.

    python examples/healthy_gru.py [--steps 1000] [--out runs/healthy_gru.h5]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import seqscope
from seqscope.demo import AddingModel, adding_batch


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="GRU on the adding problem (healthy training)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--out", default="runs/healthy_gru.h5")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = AddingModel(hidden=64, cell="gru", layers=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with seqscope.watch(model, args.out, every=args.every) as scope:
        for step in range(args.steps):
            x, y = adding_batch(64, args.length, gen)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            scope.log(loss=loss)
            opt.step()
            opt.zero_grad()
            if step % 100 == 0 or step == args.steps - 1:
                print(f"step {step:4d}  loss {loss.item():.4f}")
    print(f"trace: {scope.path}   next: seqscope diagnose {scope.path}")
    return scope.path


if __name__ == "__main__":
    main()
