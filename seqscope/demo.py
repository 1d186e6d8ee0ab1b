"""A small recorded training run: a 2-layer LSTM learns the adding problem.

The adding problem (Hochreiter & Schmidhuber 1997): each timestep carries a
random number in [0, 1] and a marker; exactly two timesteps are marked, and the
target is the sum of their numbers. Predicting the mean gives MSE 1/6 ~ 0.167,
so a loss well below that means the network carries information across time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

import seqscope

log = logging.getLogger("seqscope")


def adding_batch(batch: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [batch, time, 2] (value, marker) and targets [batch]."""
    values = torch.rand(batch, length, generator=generator)
    marks = torch.zeros(batch, length)
    first = torch.randint(0, length // 2, (batch,), generator=generator)
    second = torch.randint(length // 2, length, (batch,), generator=generator)
    rows = torch.arange(batch)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    return torch.stack([values, marks], dim=-1), (values * marks).sum(dim=1)


class AddingModel(nn.Module):
    def __init__(self, hidden: int = 32, cell: str = "lstm", layers: int = 2) -> None:
        super().__init__()
        rnn_type = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell]
        self.rnn = rnn_type(2, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).squeeze(-1)


def run(
    path: str | os.PathLike[str] = "runs/demo.h5",
    steps: int = 600,
    length: int = 30,
    batch: int = 32,
    every: int = 10,
    seed: int = 0,
) -> Path:
    """Train with seqscope recording every ``every`` steps; returns the trace path.
    With the defaults the loss leaves the 1/6 plateau after about 450 steps."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = AddingModel()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.MSELoss()
    with seqscope.watch(model, path, every=every) as scope:
        for step in range(steps):
            x, y = adding_batch(batch, length, gen)
            loss = loss_fn(model(x), y)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scope.log(loss=loss)
            opt.step()
            opt.zero_grad()
            if step % 100 == 0 or step == steps - 1:
                log.info("step %d  loss %.4f (predicting the mean gives 0.167)", step, loss.item())
    return Path(scope.path or path)  # another path if another run was writing to this one
