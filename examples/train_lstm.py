"""Train a small LSTM on the adding problem with seqscope recording.

    python examples/train_lstm.py [--steps 400] [--out runs/train_lstm.h5]

The training loop below is ordinary PyTorch; the seqscope lines are marked.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import seqscope  # seqscope
from seqscope.demo import AddingModel, adding_batch


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--out", default="runs/train_lstm.h5")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = AddingModel(hidden=32, cell="lstm")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    with seqscope.watch(model, args.out, every=args.every) as scope:  # seqscope
        for step in range(args.steps):
            x, y = adding_batch(32, args.length, gen)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            scope.log(loss=loss)  # seqscope
            opt.step()
            opt.zero_grad()
            if step % 100 == 0:
                print(f"step {step:4d}  loss {loss.item():.4f}")

    trace = seqscope.open(scope.path)  # seqscope
    print(f"trace written to {scope.path}: {len(trace.steps)} recorded steps, layers {trace.layers}")
    trace.close()
    return scope.path


if __name__ == "__main__":
    main()
