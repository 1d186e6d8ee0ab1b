"""Failure scenario: a vanilla tanh RNN on the adding problem with T=100.

The loss stays near 1/6 (what predicting the mean gives): the gradient from the
prediction at the last timestep fades before it reaches the marked inputs.
``seqscope diagnose`` on the trace reports vanishing gradients.

    python examples/vanishing_rnn.py [--steps 600] [--out runs/vanishing_rnn.h5]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import seqscope
from seqscope.demo import AddingModel, adding_batch


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="tanh RNN on the adding problem (vanishing gradients)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--out", default="runs/vanishing_rnn.h5")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = AddingModel(hidden=64, cell="rnn", layers=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with seqscope.watch(model, args.out, every=args.every) as scope:
        for step in range(args.steps):
            x, y = adding_batch(64, args.length, gen)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            scope.log(loss=loss)
            opt.step()
            opt.zero_grad()
            if step % 100 == 0 or step == args.steps - 1:
                print(f"step {step:4d}  loss {loss.item():.4f}  (predicting the mean: 0.167)")
    print(f"trace: {scope.path}   next: seqscope diagnose {scope.path}")
    return scope.path


if __name__ == "__main__":
    main()
