"""Two stacked nn.LSTMCell layers in a loop learn to continue sine waves.

Each call of a cell is a timestep in the trace; after the observed part the
model keeps predicting from its own output (the "future" timesteps are
recorded too).

    python examples/sine_cells.py [--steps 300] [--out runs/sine_cells.h5]
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import seqscope


def sine_batch(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """[time, batch, 1] sine waves with random phase and frequency."""
    phase = torch.rand(batch, generator=generator) * 2 * math.pi
    freq = 0.1 + 0.2 * torch.rand(batch, generator=generator)
    t = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    return torch.sin(freq * t + phase).unsqueeze(-1)


class SinePredictor(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.cell1 = nn.LSTMCell(1, hidden)
        self.cell2 = nn.LSTMCell(hidden, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, future: int = 10) -> torch.Tensor:
        s1 = s2 = None
        outs = []
        for t in range(x.shape[0]):
            s1 = self.cell1(x[t], s1)
            s2 = self.cell2(s1[0], s2)
            outs.append(self.head(s2[0]))
        for _ in range(future):  # predict the future from the model's own output
            s1 = self.cell1(outs[-1], s1)
            s2 = self.cell2(s1[0], s2)
            outs.append(self.head(s2[0]))
        return torch.stack(outs)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="two LSTMCells continue sine waves")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--out", default="runs/sine_cells.h5")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = SinePredictor()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    observed, future = 40, 10
    with seqscope.watch(model, args.out, every=args.every) as scope:
        for step in range(args.steps):
            wave = sine_batch(16, observed + future + 1, gen)
            pred = model(wave[:observed], future=future)
            loss = nn.functional.mse_loss(pred, wave[1 : observed + future + 1])
            loss.backward()
            scope.log(loss=loss)
            opt.step()
            opt.zero_grad()
            if step % 50 == 0 or step == args.steps - 1:
                print(f"step {step:4d}  loss {loss.item():.4f}")
    print(f"trace: {scope.path}   layers: cell1, cell2 (50 timesteps each: 40 observed + 10 predicted)")
    return scope.path


if __name__ == "__main__":
    main()
