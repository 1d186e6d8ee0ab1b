"""A small generated trace for dashboard tests: a 2-layer LSTM whose forget gates
are shut (vanishing) and whose loss is blown up at step 12 (a gradient spike)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import seqscope


def make_trace(path: Path, steps: int = 16, spike_at: int = 12) -> Path:
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 16, num_layers=2)
    with torch.no_grad():
        lstm.bias_ih_l1[16:32].fill_(-4.0)
    opt = torch.optim.SGD(lstm.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    with seqscope.watch(lstm, path, every=1, sequences=3) as scope:
        for step in range(steps):
            out, _ = lstm(torch.randn(70, 4, 3, generator=g))
            loss = out[-1].pow(2).sum() * (1e4 if step == spike_at else 1.0)
            loss.backward()
            scope.log(loss=loss)
            opt.step()
            opt.zero_grad()
    return path
