"""Failure scenario: a relu RNN whose recurrent weights are scaled above 1,
trained without gradient clipping.

The gradient grows exponentially backwards through time; a few steps in, the
updates blow the weights up and the loss turns to inf/NaN. ``seqscope
diagnose`` reports exploding gradients and the step where the trouble starts.

    python examples/exploding_rnn.py [--steps 300] [--out runs/exploding_rnn.h5]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import seqscope
from seqscope.demo import AddingModel, adding_batch


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="relu RNN with W_hh scaled above 1 (exploding gradients)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--length", type=int, default=60)
    parser.add_argument("--scale", type=float, default=1.3)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", default="runs/exploding_rnn.h5")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = AddingModel(hidden=64, cell="rnn", layers=1)
    model.rnn.nonlinearity = "relu"
    with torch.no_grad():
        nn.init.orthogonal_(model.rnn.weight_hh_l0)
        model.rnn.weight_hh_l0.mul_(args.scale)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    with seqscope.watch(model, args.out, every=args.every) as scope:
        for step in range(args.steps):
            x, y = adding_batch(32, args.length, gen)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()  # no clipping: that is the failure
            scope.log(loss=loss)
            opt.step()
            opt.zero_grad()
            if step % 25 == 0 or step == args.steps - 1:
                print(f"step {step:4d}  loss {loss.item():.4g}")
    print(f"trace: {scope.path}   next: seqscope diagnose {scope.path}")
    return scope.path


if __name__ == "__main__":
    main()
