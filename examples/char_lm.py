"""Healthy scenario: a 2-layer character-level LSTM language model with
gradient clipping, trained on the Python standard library's own source files
(on every machine, no download).

    python examples/char_lm.py [--steps 300] [--out runs/char_lm.h5]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn

import seqscope


def stdlib_text(max_bytes: int = 400_000) -> bytes:
    """The first ``max_bytes`` of the standard library's .py files, in sorted order."""
    root = Path(os.__file__).parent
    chunks, size = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


class CharLM(nn.Module):
    def __init__(self, vocab: int = 256, embed: int = 64, hidden: int = 256, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True, dropout=0.1)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor, state=None):
        out, state = self.lstm(self.embed(tokens), state)
        return self.head(out), state


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="character-level LSTM language model (healthy training)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--out", default="runs/char_lm.h5")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    data = torch.tensor(list(stdlib_text()), dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    model = CharLM()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    with seqscope.watch(model, args.out, every=args.every) as scope:
        for step in range(args.steps):
            starts = torch.randint(0, len(data) - args.length - 1, (args.batch,), generator=gen)
            window = torch.stack([data[s : s + args.length + 1] for s in starts.tolist()])
            logits, _ = model(window[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, 256), window[:, 1:].reshape(-1))
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            scope.log(loss=loss)
            opt.step()
            opt.zero_grad()
            if step % 50 == 0 or step == args.steps - 1:
                print(f"step {step:4d}  loss {loss.item():.3f} nats/char")
    print(f"trace: {scope.path}   next: seqscope diagnose {scope.path}")
    return scope.path


if __name__ == "__main__":
    main()
