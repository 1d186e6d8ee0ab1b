"""seqscope benchmarks: every figure is a ratio of two things measured side by
side in the same run (interleaved repetitions, median).

    python benchmarks/run.py            # full sizes, writes benchmarks/results.md
    python benchmarks/run.py --quick    # tiny sizes (CI: keeps the code from rotting)
    python benchmarks/run.py --device cuda --only recorder

Parts: 1 recorder overhead per fused module and size, against an unrolled
autograd recorder and an LSTMCell loop; 2 a realistic LM training loop at
every=50 / every=10 / hooks idle; 3 trace bytes per recorded step and writer
throughput.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

import seqscope
from seqscope.capture import graphs, native

RESULTS = Path(__file__).with_name("results.md")
SIZES = [(16, 50, 32, 64), (32, 100, 64, 256), (64, 200, 128, 512)]
QUICK_SIZES = [(4, 6, 3, 5)]


_SCRATCH: list[str] = []  # main()'s scratch root, removed when the run ends


def scratch() -> str:
    """A new folder for a benchmark's traces, under the run's scratch root (the
    dashboard part alone writes 1 GiB: nothing is left behind in /tmp)."""
    return tempfile.mkdtemp(dir=_SCRATCH[-1] if _SCRATCH else None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], None]], reps: int, device: torch.device, warmup: int = 2,
                block: int = 1, after: dict[str, Callable[[], None]] | None = None,
                samples: dict[str, list[float]] | None = None) -> dict[str, float]:
    """Median seconds per call of each function: blocks of ``block`` calls,
    blocks of the functions interleaved. ``after[name]`` runs inside the timed
    block (seqscope's writer drain: its disk work is charged to the recorded run,
    not to whichever function happens to run next). ``samples``, if given, receives
    each function's seconds per call in every round, in round order."""
    after = after or {}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(block):
                fn()
            if name in after:
                after[name]()
            sync(device)
            times[name].append((time.perf_counter() - t0) / block)
    if samples is not None:
        samples.update(times)
    return {k: statistics.median(v) for k, v in times.items()}


class NaiveRecorder:
    """The approach seqscope avoids: unroll the cell in Python with autograd and
    a tensor hook on every h_t and c_t (records the same norms)."""

    def __init__(self, cell: nn.Module) -> None:
        self.cell = cell
        self.norms: list[torch.Tensor] = []

    def _keep(self, g: torch.Tensor | None) -> None:
        if g is not None:  # None: an output the loss does not use (CUDA's fused LSTMCell, the last c)
            self.norms.append(g.norm(dim=-1))

    def step(self, x: torch.Tensor) -> None:
        batch = x.shape[1]
        hidden = self.cell.hidden_size
        h = x.new_zeros(batch, hidden)
        c = x.new_zeros(batch, hidden)
        outs = []
        self.norms = []
        for t in range(x.shape[0]):
            if isinstance(self.cell, nn.LSTMCell):
                h, c = self.cell(x[t], (h, c))
                c.register_hook(self._keep)
            else:
                h = self.cell(x[t], h)
            h.register_hook(self._keep)
            outs.append(h)
        torch.stack(outs).pow(2).mean().backward()
        torch.stack(self.norms).cpu()  # one copy, as seqscope does


def eager_scans(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` with seqscope's compiled passes and CUDA graphs turned off (the
    eager PyTorch loops, as before they existed, and as on a machine without a
    C compiler)."""
    def run() -> None:
        supports, graphs_off = native.supports, graphs._off
        native.supports = lambda *_: False  # type: ignore[assignment]
        graphs._off = True
        try:
            fn()
        finally:
            native.supports = supports  # type: ignore[assignment]
            graphs._off = graphs_off
    return run


def arithmetic_floor(module: nn.RNNBase, x: torch.Tensor, n_seq: int = 8) -> Callable[[], None]:
    """The recording's own arithmetic for one layer and step, and nothing else, with
    seqscope's own functions on ``n_seq`` stored sequences (its default): the gate
    recomputation (forward_details: products, activations, cell states, the scan's
    factors), the BPTT scan for both seeds (the loss's gradient and the propagation
    seed) and sigma_max(W_hh). No hooks, selection, padding, norms, host copies or
    writer: a recorded step cannot cost less than a plain one plus this."""
    from seqscope.capture import recurrences as rec
    from seqscope.capture import spectral
    from seqscope.capture.fused import module_kind
    from seqscope.trace import schema

    p = {name: t.detach() for name, t in module.named_parameters()}
    w = rec.LayerWeights(module_kind(module), p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"], p["bias_hh_l0"])
    lstm = w.kind == schema.KIND_LSTM
    xs = x[:, :n_seq].contiguous()
    with torch.no_grad():
        hs = module(xs)[0].contiguous()
    n_time, s, hidden = hs.shape
    h0 = hs.new_zeros(s, hidden)
    c0 = h0 if lstm else None
    ext_h = torch.randn(n_time, 2, s, hidden, device=x.device)
    ext_c = torch.randn(n_time, 2, s, hidden, device=x.device) if lstm else None

    def run() -> None:
        details = rec.forward_details(w, xs, hs, h0, c0, None)
        rec.backward_scan(w, details, ext_h.clone(), None if ext_c is None else ext_c.clone(), overwrite=True)
        if x.device.type == "cpu":
            spectral.sigma_max(w.w_hh)  # CPU weights: computed on the training thread
        else:
            spectral.at_capture(w.w_hh)  # device weights: only the host copy here, the value on the writer
    return run


def middle_half(ratios: list[float]) -> str:
    """The interquartile range of per-round ratios, as "1.38-1.50"."""
    if len(ratios) < 2:
        return "one round"
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return f"{q1:.2f}-{q3:.2f}"


def part1(sizes, reps: int, device: torch.device, kinds: list[str]) -> list[str]:
    rows = ["| module | B, T, I, H | plain step | seqscope | seqscope, eager scans | naive unrolled recorder "
            "| cell loop (no recording) | recording arithmetic alone (floor) |",
            "|---|---|---|---|---|---|---|---|"]
    tmp = scratch()
    for kind in kinds:
        for (b, t, i, h) in sizes:
            torch.manual_seed(0)
            make = {"lstm": lambda: nn.LSTM(i, h), "gru": lambda: nn.GRU(i, h), "rnn": lambda: nn.RNN(i, h)}[kind]
            plain_m, rec_m, eager_m = make().to(device), make().to(device), make().to(device)
            for m in (rec_m, eager_m):
                m.load_state_dict(plain_m.state_dict())
            cell = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}[kind](i, h).to(device)
            x = torch.randn(t, b, i, device=device)
            scope = seqscope.watch(rec_m, os.path.join(tmp, f"{kind}{b}.h5"), every=1)
            eager_scope = seqscope.watch(eager_m, os.path.join(tmp, f"{kind}{b}-eager.h5"), every=1)
            scopes = [scope, eager_scope]
            naive = NaiveRecorder(cell)

            def plain() -> None:
                out, _ = plain_m(x)
                out.pow(2).mean().backward()

            def recorded() -> None:
                out, _ = rec_m(x)
                out.pow(2).mean().backward()

            @eager_scans
            def recorded_eager() -> None:
                out, _ = eager_m(x)
                out.pow(2).mean().backward()

            def cell_loop() -> None:
                hh = x.new_zeros(b, h)
                cc = x.new_zeros(b, h)
                outs = []
                for s in range(t):
                    if kind == "lstm":
                        hh, cc = cell(x[s], (hh, cc))
                    else:
                        hh = cell(x[s], hh)
                    outs.append(hh)
                torch.stack(outs).pow(2).mean().backward()

            fns = {"plain": plain, "rec": recorded, "eager": recorded_eager, "naive": lambda: naive.step(x),
                   "cell": cell_loop, "floor": arithmetic_floor(plain_m, x)}
            rounds: dict[str, list[float]] = {}
            res = interleaved(fns, reps, device, block=5,
                              after=dict(zip(("rec", "eager"), (sc.writer.drain for sc in scopes))), samples=rounds)
            spread = middle_half([r / q for r, q in zip(rounds["rec"], rounds["plain"])])
            for sc in scopes:
                sc.close()
            p = res["plain"]
            rows.append(f"| nn.{kind.upper()} | {b}, {t}, {i}, {h} | {p * 1e3:.1f} ms | **{res['rec'] / p:.2f}x** ({spread}) | "
                        f"{res['eager'] / p:.2f}x | {res['naive'] / p:.2f}x | {res['cell'] / p:.2f}x | "
                        f"{1 + res['floor'] / p:.2f}x |")
            print(rows[-1], flush=True)
    return rows


def part1b(quick: bool, reps: int, device: torch.device) -> list[str]:
    """A 2-layer nn.LSTMCell loop, recorded every step vs not watched."""
    b, t, h = (4, 6, 8) if quick else (32, 100, 128)

    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.LSTMCell(h, h), nn.LSTMCell(h, h)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s1 = s2 = None
            outs = []
            for step in range(x.shape[0]):
                s1 = self.c1(x[step], s1)
                s2 = self.c2(s1[0], s2)
                outs.append(s2[0])
            return torch.stack(outs)

    torch.manual_seed(0)
    plain_m, rec_m, idle_m = Loop().to(device), Loop().to(device), Loop().to(device)
    rec_m.load_state_dict(plain_m.state_dict())
    idle_m.load_state_dict(plain_m.state_dict())
    x = torch.randn(t, b, h, device=device)
    tmp = scratch()
    scope = seqscope.watch(rec_m, os.path.join(tmp, "cells.h5"), every=1)
    # watched, but no step after the first is recorded: what the hooks cost on other steps
    idle_scope = seqscope.watch(idle_m, os.path.join(tmp, "idle.h5"), every=lambda n: n == 0)
    res = interleaved({"plain": lambda: plain_m(x).pow(2).mean().backward(),
                       "rec": lambda: rec_m(x).pow(2).mean().backward(),
                       "idle": lambda: idle_m(x).pow(2).mean().backward()}, reps, device, block=3,
                      after={"rec": scope.writer.drain})
    scope.close()
    idle_scope.close()
    p = res["plain"]
    return ["| cell loop | B, T, H | plain step | recorded / plain | watched, step not recorded / plain |",
            "|---|---|---|---|---|",
            f"| 2 x nn.LSTMCell | {b}, {t}, {h} | {p * 1e3:.1f} ms | **{res['rec'] / p:.2f}x** | "
            f"{res['idle'] / p:.3f}x |"]


def part2(quick: bool, reps: int, device: torch.device) -> list[str]:
    vocab, embed, hidden, batch, length = (50, 8, 16, 4, 8) if quick else (256, 64, 256, 32, 64)

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(vocab, embed)
            self.rnn = nn.LSTM(embed, hidden, num_layers=2, batch_first=True)
            self.head = nn.Linear(hidden, vocab)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(self.emb(x))[0])

    tmp = scratch()
    # 50 steps per block: each holds exactly one step that every=50 records (its
    # first; five for every=10), and short blocks interleave the four loops finely
    steps = 20 if quick else 50
    data = torch.randint(0, vocab, (steps + 5, batch, length + 1), device=device)
    configs: dict[str, object] = {"none": None, "idle": (lambda s: False), "every=50": 50, "every=10": 10}
    models = {}
    for name, every in configs.items():
        torch.manual_seed(0)
        m = LM().to(device)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        scope = seqscope.watch(m, os.path.join(tmp, f"lm{len(models)}.h5"), every=every) if every is not None else None
        models[name] = (m, opt, scope)

    # Every step timed on its own. The four loops take turns in blocks of `steps` steps,
    # in an order that rotates every round (no loop always runs after the same one).
    # A block's recorded steps sit at the same positions in every round (every=50: its
    # first step), so the median of each position over the rounds is that position's
    # typical time: the recorded step, the steps after it while the writer thread
    # still runs, and the idle ones. Their sum over the block against the plain
    # loop's sum of medians is the loop's overhead; per-step medians keep a stray
    # slow step (this machine's noise is +-10% on a whole block) out of the estimate.
    rounds = 3 if quick else max(reps, 15)
    names = list(configs)
    per_step: dict[str, list[list[float]]] = {k: [] for k in names}
    for r in range(-1, rounds):  # round -1: warm-up
        order = names[r % len(names):] + names[:r % len(names)] if r >= 0 else names
        for k in order:
            m, opt, scope = models[k]
            times = []
            for s in range(steps):
                sync(device)
                t0 = time.perf_counter()
                window = data[s]
                logits = m(window[:, :-1])
                loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), window[:, 1:].reshape(-1))
                loss.backward()
                if scope is not None:
                    scope.log(loss=loss)
                opt.step()
                opt.zero_grad()
                if s == steps - 1 and scope is not None:
                    scope.writer.drain()  # a record still being written is charged to this block
                sync(device)
                times.append(time.perf_counter() - t0)
            if r >= 0:
                per_step[k].append(times)
    for _, _, scope in models.values():
        if scope is not None:
            scope.close()

    def position_medians(k: str) -> list[float]:
        return [statistics.median(block[p] for block in per_step[k]) for p in range(steps)]

    plain_pos = position_medians("none")
    base = sum(plain_pos)
    idle_us = idle_cost_us(device)
    rows = [f"Training loop: 2-layer LSTM LM, B={batch}, T={length}, H={hidden}, Adam step included. The four "
            f"loops take turns in blocks of {steps} steps, in an order that rotates every round, {rounds} rounds; "
            f"every step is timed on its own ({base / steps * 1e3:.1f} ms per plain step). Overhead: the sum over "
            "a block's step positions of each position's median over the rounds, against the same sum for the "
            "plain loop (the recorded step, the steps during which the writer thread still runs and the idle "
            "ones, each at its typical time). 'Recorded steps': the recorded step's own time; seqscope "
            "finishes its record (BPTT scan, host copies) when the next step begins, so that cost shows in the "
            "next position, which the overhead includes. Whole blocks: the median over rounds of the block's "
            "total against the plain block of the same round.", "",
            "| seqscope | overhead (per-step medians) | recorded steps (median) | whole blocks, median | "
            "whole blocks, range |", "|---|---|---|---|---|"]
    for k in ("idle", "every=50", "every=10"):
        pos = position_medians(k)
        every = {"idle": 0, "every=50": 50, "every=10": 10}[k]
        # the steps this loop recorded (round -1 was the warm-up: its steps are numbered from 0)
        recorded = [block[p] / plain_pos[p] for r, block in enumerate(per_step[k]) for p in range(steps)
                     if every and ((r + 1) * steps + p) % every == 0]
        rec_ratio = f"{statistics.median(recorded):.2f}x a plain step" if recorded else "none"
        blocks = [sum(a) / sum(b) - 1 for a, b in zip(per_step[k], per_step["none"])]
        rows.append(f"| {k} | **{100 * (sum(pos) / base - 1):+.1f}%** | {rec_ratio} | "
                    f"{100 * statistics.median(blocks):+.1f}% | "
                    f"{100 * min(blocks):+.1f}% .. {100 * max(blocks):+.1f}% |")
    rows += ["", f"Hooks installed but idle, measured directly (a 1-unit LSTM, so the hooks' own time is "
             f"not lost in the noise of a real step): **{idle_us:.0f} us per training step** "
             f"({100 * idle_us * 1e-6 / (base / steps):.2f}% of the plain LM step above)."]
    # the loop comparison above resolves a few percent at best on a noisy machine; the
    # same figure from its parts: one recorded LM step against one plain step, interleaved
    torch.manual_seed(0)
    plain_m, rec_m = LM().to(device), LM().to(device)
    rec_m.load_state_dict(plain_m.state_dict())
    window = data[0]
    scope = seqscope.watch(rec_m, os.path.join(tmp, "lm-step.h5"), every=1)

    def one_step(m: nn.Module) -> Callable[[], None]:
        def fn() -> None:
            logits = m(window[:, :-1])
            nn.functional.cross_entropy(logits.reshape(-1, vocab), window[:, 1:].reshape(-1)).backward()
        return fn

    single = interleaved({"plain": one_step(plain_m), "rec": one_step(rec_m)}, max(5, 2 * reps), device, block=3,
                         after={"rec": scope.writer.drain})
    scope.close()
    extra = single["rec"] / single["plain"] - 1
    idle_frac = idle_us * 1e-6 / single["plain"]
    rows += ["", f"From the parts: a recorded LM step costs {single['rec'] / single['plain']:.2f}x a plain one "
             f"(forward + backward, writer drained; {single['plain'] * 1e3:.1f} ms plain), so the expected loop "
             f"overhead is **{100 * (extra / 50 + idle_frac):.1f}% at every=50** and "
             f"**{100 * (extra / 10 + idle_frac):.1f}% at every=10** (the optimizer step, not recorded, "
             "would only lower these)."]
    print("\n".join(rows), flush=True)
    return rows


def idle_cost_us(device: torch.device) -> float:
    """Per-step cost of seqscope's hooks when the step is not recorded: forward
    pre-hook, module wrapper, optimizer hooks and scope.log, on a model so small
    that they are a visible part of its step."""
    torch.manual_seed(0)
    m = nn.LSTM(1, 1).to(device)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    x = torch.randn(2, 1, 1, device=device)
    tmp = scratch()
    plain_m = nn.LSTM(1, 1).to(device)
    plain_opt = torch.optim.SGD(plain_m.parameters(), lr=0.0)

    def run(model: nn.Module, optim: torch.optim.Optimizer, scope: seqscope.Scope | None) -> Callable[[], None]:
        def fn() -> None:
            for _ in range(200):
                loss = model(x)[0].sum()
                loss.backward()
                if scope is not None:
                    scope.log(loss=loss)
                optim.step()
                optim.zero_grad()
        return fn

    scope = seqscope.watch(m, os.path.join(tmp, "idle.h5"), every=lambda s: False)
    res = interleaved({"plain": run(plain_m, plain_opt, None), "idle": run(m, opt, scope)}, 15, device, warmup=2)
    scope.close()
    return (res["idle"] - res["plain"]) / 200 * 1e6


def part3(quick: bool, device: torch.device) -> list[str]:
    b, t, i, h = (4, 6, 3, 5) if quick else (32, 100, 64, 256)
    tmp = scratch()
    rows = ["| storage | bytes per recorded step | writer throughput | submit wait (training thread) |", "|---|---|---|---|"]
    for precision in ("auto", "float32"):
        torch.manual_seed(0)
        m = nn.LSTM(i, h, num_layers=2).to(device)
        x = torch.randn(t, b, i, device=device)
        path = os.path.join(tmp, f"bytes-{precision}.h5")
        n = 5 if quick else 30
        scope = seqscope.watch(m, path, every=1, precision=precision)
        writer = scope.writer
        waits = []
        real_submit = writer.submit

        def timed_submit(record, real_submit=real_submit):
            t0 = time.perf_counter()
            ok = real_submit(record)
            waits.append(time.perf_counter() - t0)
            return ok

        writer.submit = timed_submit  # type: ignore[method-assign]
        t0 = time.perf_counter()
        for _ in range(n):
            out, _ = m(x)
            out.pow(2).mean().backward()
        scope.close()
        elapsed = time.perf_counter() - t0
        size = os.path.getsize(path)
        with seqscope.open(path) as trace:
            recorded = len(trace.steps)
        rows.append(f"| {precision} (2-layer LSTM, {min(b, 8)} of {b} sequences, T={t}, H={h}) | "
                    f"{size / recorded / 1e3:.1f} kB | {size / elapsed / 1e6:.1f} MB/s (incl. training) | "
                    f"median {statistics.median(waits) * 1e6:.0f} us |")
        print(rows[-1], flush=True)
    return rows


def make_big_trace(path: str, target_bytes: int) -> int:
    """A synthetic trace of about ``target_bytes``: 2 LSTM layers, H=256,
    8 sequences x 200 timesteps per step, written through the real writer."""

    from seqscope.trace import schema
    from seqscope.trace.writer import ArrayRecord, StepRecord, TraceWriter

    k, t, h = 8, 200, 256
    rng = np.random.default_rng(0)
    layers = [(f"rnn.l{i}".encode(), b"rnn", b"lstm", i, 0, h, h, h, b"") for i in range(2)]
    writer = TraceWriter(path, {"synthetic": True}, queue_size=2)
    hidden = rng.uniform(-1, 1, (k, t, h)).astype(np.float16)
    cell = rng.normal(0, 2, (k, t, h)).astype(np.float32)
    gates = rng.uniform(0, 1, (k, t, 4, h)).astype(np.float16)
    per_step = 2 * (hidden.nbytes + cell.nbytes + gates.nbytes)
    steps = max(2, target_bytes // per_step)
    names = ["loss", "grad_norm"]
    for step in range(int(steps)):
        arrays = []
        decay = np.exp(-np.arange(t)[::-1] / (20 + step % 50))
        for lid in range(2):
            norms = np.tile(decay, (k, 1)) * (1 + 0.1 * rng.random((k, t)))
            for field, data in ((schema.FIELD_HIDDEN, hidden), (schema.FIELD_CELL, cell), (schema.FIELD_GATES, gates),
                                (schema.FIELD_GRAD_HIDDEN, norms), (schema.FIELD_GRAD_CELL, norms),
                                (schema.FIELD_PROPAGATION, decay[None].repeat(k, 0)),
                                (schema.FIELD_LENGTHS, np.full(k, t, np.int64)),
                                (schema.FIELD_SEQUENCE_INDEX, np.arange(k, dtype=np.int64))):
                arrays.append(ArrayRecord(step, lid, field, data))
        scalars = [(step, 0, float(1 / (1 + step))), (step, 1, float(1 + rng.random()))]
        writer.submit(StepRecord((step, time.time(), 32, t, k, schema.PHASE_TRAIN), arrays, scalars,
                                 layers if step == 0 else [], names if step == 0 else []))
    writer.close()
    if writer.failed:
        raise RuntimeError(f"writing the synthetic trace failed: {writer.failed}")
    return int(steps)


def part4(quick: bool) -> list[str]:
    """Dashboard on a large trace: start-up and the slider callback's work."""
    import plotly.io as pio

    from seqscope.dashboard import TraceSource, create_app, figures

    tmp = scratch()
    path = os.path.join(tmp, "big.h5")
    target = 20 * 2**20 if quick else 2**30
    t0 = time.perf_counter()
    steps = make_big_trace(path, target)
    size = os.path.getsize(path)
    print(f"generated {size / 2**30:.2f} GiB trace, {steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    # start-up: open the trace, build the app, serve the page and the first views
    t0 = time.perf_counter()
    src = TraceSource(path)
    app = create_app(src)
    client = app.server.test_client()
    assert client.get("/").status_code == 200
    s, norms, mask = src.grad_matrix("rnn.l0")
    pio.to_json(figures.gradient_flow_figure(s, norms, mask, "rnn.l0"))
    startup = time.perf_counter() - t0
    # slider callback: the app's own step callback through its HTTP handler (read the
    # step, build the 8 figures, serialise the response), as the browser calls it
    import random

    deps = client.get("/_dash-dependencies").get_json()
    views = next(d for d in deps if "step-label.children" in d["output"])
    outputs = [{"id": o.split(".")[0], "property": o.split(".")[1]} for o in views["output"].strip(".").split("...")]
    rnd = random.Random(0)
    lat = []
    for _ in range(10 if quick else 60):
        index = rnd.randrange(len(src.steps))
        body = {"output": views["output"], "outputs": outputs, "changedPropIds": ["slider.value"], "state": [],
                "inputs": [{"id": "slider", "property": "value", "value": index},
                           {"id": "layer", "property": "value", "value": "rnn.l0"},
                           {"id": "sequence", "property": "value", "value": 0},
                           {"id": "run", "property": "data", "value": 0}]}
        t1 = time.perf_counter()
        reply = client.post("/_dash-update-component", json=body)
        lat.append(time.perf_counter() - t1)
        if reply.status_code != 200:
            raise RuntimeError(f"step callback failed: {reply.status_code}")
    lat.sort()
    p95 = lat[int(0.95 * (len(lat) - 1))]
    rows = [f"Trace: {size / 2**30:.2f} GiB, {steps} recorded steps, 2 LSTM layers, 8 sequences x 200 timesteps x 256 units.",
            "", "| measure | value | target |", "|---|---|---|",
            f"| open trace + build app + serve page + first gradient-flow view | {startup:.2f} s | < 2 s |",
            f"| slider callback (the app's step callback through its request handler: read the step, build and "
            f"serialise its 5 figures), median | {lat[len(lat) // 2] * 1e3:.0f} ms | |",
            f"| slider callback, 95th percentile | {p95 * 1e3:.0f} ms | < 300 ms |"]
    measured = browser_latency(app, len(src.steps), 8 if quick else 40)
    if isinstance(measured, str):
        rows.append(f"| slider in a real browser | not measured: {measured} | < 300 ms |")
    else:
        browser, per_figure, unchanged = measured
        browser.sort()
        rows += [f"| slider in headless Chromium, key press to the step's figures drawn, median "
                 f"| {browser[len(browser) // 2] * 1e3:.0f} ms | |",
                 f"| slider in headless Chromium, 95th percentile | {browser[int(0.95 * (len(browser) - 1))] * 1e3:.0f} ms "
                 "| < 300 ms |"]
        if per_figure:
            parts = ", ".join(f"{name} {statistics.median(ms):.0f}" for name, ms in per_figure.items())
            total = sum(statistics.median(ms) for ms in per_figure.values())
            rows += ["", f"Where a move's browser time goes: Plotly.react per figure, median ms over the moves: {parts} "
                         f"(sum {total:.0f} ms); the rest is the request, the step callback and Dash's rendering."]
        if unchanged:
            shown = {name: ms for name, ms in unchanged.items() if name in per_figure}
            parts = ", ".join(f"{name} {ms:.0f}" for name, ms in shown.items())
            total = sum(shown.values())
            rows += ["", f"Plotly.react on each of those figures unchanged (its own data and layout again), median "
                         f"ms: {parts} (sum {total:.0f} ms): plotly.js draws a figure whole whatever changed (its "
                         "subplots' axes, and each heatmap's every cell), so this is part of every move whatever the "
                         "server sends."]
    return rows


def browser_latency(app: object, n_steps: int, moves: int
                    ) -> tuple[list[float], dict[str, list[float]], dict[str, float]] | str:
    """Seconds from a slider key press in headless Chromium until the page shows
    the new step (label and propagation figure drawn by Plotly), over HTTP to the
    dashboard's own server, the milliseconds each figure's Plotly.react took
    per move (by the graph's id), and the median milliseconds of Plotly.react on
    each figure unchanged (its own data and layout again: plotly.js's work for the
    figure as it is, which no change in what the server sends can remove); or why
    it could not be measured."""
    import socket
    import threading

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return "the playwright package is not installed"
    if chromium is None:
        return "no Chromium on this machine"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    threading.Thread(target=lambda: app.run(host="127.0.0.1", port=port, debug=False),  # type: ignore[attr-defined]
                     daemon=True).start()
    flags = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-dev-shm-usage"]
    out: list[float] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=flags)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        for _ in range(100):
            try:
                page.goto(f"http://127.0.0.1:{port}/")
                break
            except Exception:  # noqa: BLE001 - the server thread is still starting
                time.sleep(0.1)
        page.wait_for_selector("#propagation .gtitle", timeout=60_000)
        page.evaluate(_TIME_PLOTLY_REACT)
        page.locator("#slider [role=slider]").focus()
        shown = ("(n) => document.querySelector('#step-label').textContent.startsWith('step ' + n + ' ')"
                 " && document.querySelector('#propagation .gtitle').textContent.includes('step ' + n)")
        index = 0
        per_figure: dict[str, list[float]] = {}
        for _ in range(min(moves, n_steps - 1)):
            index += 1
            page.evaluate("() => { window.__seqscopeReact = []; }")
            t0 = time.perf_counter()
            page.keyboard.press("ArrowRight")
            page.wait_for_function(shown, arg=index, polling="raf", timeout=30_000)
            out.append(time.perf_counter() - t0)
            moved: dict[str, float] = {}
            for name, ms in page.evaluate("() => window.__seqscopeReact"):
                moved[name] = moved.get(name, 0.0) + ms
            for name, ms in moved.items():
                per_figure.setdefault(name, []).append(ms)
        unchanged = page.evaluate(_TIME_UNCHANGED)
        browser.close()
    return out, per_figure, unchanged


# Wraps Plotly.react in the page: each call's synchronous time (Plotly draws within
# it), by the id of the dcc.Graph around the plot
_TIME_PLOTLY_REACT = """() => {
  const react = window.Plotly.react;
  window.__seqscopeReact = [];
  window.Plotly.react = function (gd, ...rest) {
    const t0 = performance.now();
    const result = react.call(this, gd, ...rest);
    const owner = gd.parentElement && gd.parentElement.closest('[id]');
    window.__seqscopeReact.push([owner ? owner.id : '?', performance.now() - t0]);
    return result;
  };
}"""


# Plotly.react on each figure with its own data and a copy of its own layout (nothing
# changed: no data revision, no attribute), 9 times: the median of its synchronous
# time (as _TIME_PLOTLY_REACT measures it per move), by graph id
_TIME_UNCHANGED = """async () => {
  const out = {};
  for (const gd of document.querySelectorAll('.js-plotly-plot')) {
    const owner = gd.parentElement && gd.parentElement.closest('[id]');
    const ms = [];
    for (let i = 0; i < 9; i++) {
      const t0 = performance.now();
      const drawn = window.Plotly.react(gd, gd.data, {...gd.layout});
      ms.push(performance.now() - t0);  // its synchronous time, as measured per move
      await drawn;
    }
    ms.sort((a, b) => a - b);
    out[owner ? owner.id : '?'] = ms[4];
  }
  return out;
}"""


PEAK = """
import resource, sys, torch
from torch import nn
import seqscope
b, t, i, h, record = 32, 100, 64, 256, sys.argv[1] == "1"
torch.manual_seed(0)
m = nn.LSTM(i, h, num_layers=2)
x = torch.randn(t, b, i)
scope = seqscope.watch(m, sys.argv[2], every=1) if record else None
for _ in range(5):
    out, _ = m(x)
    out.pow(2).mean().backward()
if scope:
    scope.close()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def part5(quick: bool) -> list[str]:
    import subprocess

    tmp = scratch()
    rss = {}
    for record in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", PEAK, record, os.path.join(tmp, "peak.h5")],
                             capture_output=True, text=True, check=True)
        rss[record] = int(out.stdout.strip().splitlines()[-1]) / 1024
    return ["Peak resident memory of a process running 5 steps of a 2-layer LSTM (B=32, T=100, I=64, H=256), "
            "every step recorded vs none (includes the Python interpreter and torch itself).", "",
            "| plain | recorded | ratio |", "|---|---|---|",
            f"| {rss['0']:.0f} MiB | {rss['1']:.0f} MiB | {rss['1'] / rss['0']:.2f}x |"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--only", choices=["recorder", "loop", "trace", "dashboard", "memory"], default=None)
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results.md; --quick: none)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sizes = QUICK_SIZES if args.quick else SIZES
    reps = 3 if args.quick else args.reps
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads, {native.status()}")
    if device.type == "cuda":
        machine += f", GPU {torch.cuda.get_device_name(device)}"
    _SCRATCH.append(tempfile.mkdtemp(prefix="seqscope-bench-"))
    try:
        lines = run_parts(args, argv, device, sizes, reps, machine)
    finally:
        shutil.rmtree(_SCRATCH.pop(), ignore_errors=True)
    print("\n".join(lines))
    out = args.out or (None if args.quick else str(RESULTS))
    if out:
        Path(out).write_text("\n".join(lines) + "\n")
        print(f"results written to {out}")


def run_parts(args: argparse.Namespace, argv: list[str], device: torch.device,
              sizes: list[tuple[int, int, int, int]], reps: int, machine: str) -> list[str]:
    lines = ["# seqscope benchmark results", "", f"Machine: {machine}. Date: {time.strftime('%Y-%m-%d')}.",
             f"Command: `{' '.join(['python benchmarks/run.py', *argv])}`", ""]
    if args.only in (None, "recorder"):
        lines += ["## 1. Recorded step / plain fused step (forward + backward), every step recorded", "",
                  "Ratios to the plain fused module's step, medians of interleaved repetitions. In brackets after "
                  "seqscope's ratio: the middle half (interquartile range) of the ratios of its block to the plain "
                  "block of the same round, a measure of this run's noise; where it straddles 1.5x, the row meets or "
                  "misses the target only within that noise. seqscope stores "
                  "8 sequences per step (default); the naive recorder computes norms for the whole batch. "
                  "'seqscope': its defaults (on a GPU, the per-timestep loops replayed as CUDA graphs). "
                  "'eager scans': the same recording with the compiled passes (capture/_native.c) and CUDA graphs "
                  "(capture/graphs.py) turned off, as on a machine without a C compiler, or as before they existed. "
                  "'Recording arithmetic alone': 1 + (the time of the recording's own arithmetic for the layer: gate "
                  "recomputation, the BPTT scan for both seeds and sigma_max(W_hh), on the 8 stored sequences, with "
                  "seqscope's own functions and nothing else) / plain step: no recorder built this way can be "
                  "cheaper; where it is above 1.5x, the target cannot be met without recording less.", ""]
        lines += part1(sizes, reps, device, ["lstm", "gru", "rnn"]) + [""]
        lines += ["Cell loops (each call a timestep; totals from tensor hooks, every step recorded):", ""]
        lines += part1b(args.quick, reps, device) + [""]
    if args.only in (None, "loop"):
        lines += ["## 2. Realistic training loop", ""] + part2(args.quick, reps, device) + [""]
    if args.only in (None, "trace"):
        lines += ["## 3. Trace size and writer", ""] + part3(args.quick, device) + [""]
    if args.only in (None, "dashboard"):
        lines += ["## 4. Dashboard on a large trace", ""] + part4(args.quick) + [""]
    if args.only in (None, "memory"):
        lines += ["## 5. Peak memory", ""] + part5(args.quick) + [""]
    notes = Path(__file__).with_name("profiling.md")
    if notes.exists() and not args.quick:
        lines += [notes.read_text()]
    return lines


if __name__ == "__main__":
    main()
