"""The compiled BPTT scans (capture.native): what happens around them. Their
numbers are checked against the unrolled autograd reference by every test that
takes the scan_path fixture (test_fused_reference, test_cells_reference), once
per path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from seqscope.capture import native
from seqscope.capture import recurrences as rec
from tests.conftest import need_native

ROOT = Path(__file__).resolve().parents[1]

# records one step of a small LSTM and prints the scan status and the first gradient norm
RECORD = textwrap.dedent("""
    import sys, torch, seqscope
    from seqscope.capture import native
    torch.manual_seed(0)
    m = torch.nn.LSTM(3, 5)
    with seqscope.watch(m, sys.argv[1], every=1) as scope:
        out, _ = m(torch.randn(7, 2, 3))
        out.pow(2).sum().backward()
    with seqscope.open(sys.argv[1]) as trace:
        print(native.status())
        print(float(trace.grad_norms("lstm.l0", 0)["hidden"][0, 0]))
""")


def _record(tmp_path: Path, name: str, **env: str) -> list[str]:
    full = {**os.environ, "SEQSCOPE_CACHE_DIR": str(tmp_path / f"cache-{name}"), **env}
    run = subprocess.run([sys.executable, "-c", RECORD, str(tmp_path / f"{name}.h5")], env=full, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip().splitlines()


def test_without_a_compiler_or_when_turned_off_the_eager_scan_records_the_same(tmp_path):
    if not native.enabled():
        pytest.skip(native.status())
    compiled = _record(tmp_path, "compiled")
    broken = _record(tmp_path, "broken", CC="false", PATH="/nonexistent")
    failing = _record(tmp_path, "failing", CC="/bin/false")
    off = _record(tmp_path, "off", SEQSCOPE_NATIVE="0")
    assert compiled[0] == "compiled scans in use"
    assert broken[0].startswith("compiled scans off: no C compiler")
    assert failing[0].startswith("compiled scans off: false failed")
    assert float(failing[1]) == pytest.approx(float(compiled[1]), rel=1e-5)
    assert off[0] == "compiled scans off: SEQSCOPE_NATIVE=0"
    assert float(broken[1]) == pytest.approx(float(compiled[1]), rel=1e-5)
    assert float(off[1]) == pytest.approx(float(compiled[1]), rel=1e-5)


def test_processes_building_at_once_share_the_cache(tmp_path):
    if not native.enabled():
        pytest.skip(native.status())
    env = {**os.environ, "SEQSCOPE_CACHE_DIR": str(tmp_path / "cache")}
    code = "from seqscope.capture import native; print(native.status())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert outs == ["compiled scans in use"] * 3
    # what a build cut off long ago left behind is cleared by the next build, a fresh one is not
    old, fresh = tmp_path / "cache" / "building-old.so", tmp_path / "cache" / "building-fresh.so"
    old.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    os.utime(old, (0, 0))
    for lib in (tmp_path / "cache").glob("scan-*.so"):
        lib.unlink()
    assert subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300).stdout.strip() == "compiled scans in use"
    assert not old.exists() and fresh.exists()
    fresh.unlink()
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".so", ".so"]  # no temporary files left


def test_a_damaged_cached_library_is_built_again(tmp_path):
    if not native.enabled():
        pytest.skip(native.status())
    env = {**os.environ, "SEQSCOPE_CACHE_DIR": str(tmp_path / "cache")}
    code = "from seqscope.capture import native; print(native.status())"

    def status() -> str:
        run = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        return run.stdout.strip()

    assert status() == "compiled scans in use"
    libraries = sorted((tmp_path / "cache").glob("*.so"))
    assert len(libraries) == 2
    for lib in libraries:
        lib.write_bytes(b"not a shared library")  # a disk that filled up mid-copy, say
    assert status() == "compiled scans in use"
    assert all(lib.read_bytes() != b"not a shared library" for lib in libraries)


def test_a_layout_the_compiled_scan_does_not_take_runs_the_eager_one():
    if not native.enabled():
        pytest.skip(native.status())
    torch.manual_seed(0)
    t, s, h = 6, 3, 4
    w = rec.LayerWeights("gru", torch.randn(3 * h, 2), torch.randn(3 * h, h), None, None)
    details = rec.forward_details(w, torch.randn(t, s, 2), torch.rand(t, s, h), torch.zeros(s, h), None, None)
    ext = torch.randn(t, 2, s, h)
    want = rec.eager_backward_scan(w, details, ext, None)[0]
    # a factor of the wrong shape: refused before any pointer reaches C
    bad = rec.ForwardDetails("gru", details.gates, None, {**details.factors, "Z": details.factors["Z"][:, :2]})
    with pytest.raises(ValueError, match="native scan"):
        native.backward_scan("gru", w.w_hh, None, bad.factors, ext, None)
    # a non-contiguous weight is copied, not refused
    w_t = rec.LayerWeights("gru", w.w_ih, w.w_hh.t().contiguous().t(), None, None)
    torch.testing.assert_close(rec.backward_scan(w_t, details, ext, None)[0], want, rtol=1e-5, atol=1e-6)
    # float16 is not compiled: the eager scan runs
    assert not native.supports(ext.half())


def test_the_compiled_factor_passes_take_non_contiguous_inputs_and_padding():
    """The GRU and LSTM factor passes against the eager ones with strided inputs
    (copied, and the copies held while C reads them) and padded sequences."""
    if not native.enabled():
        pytest.skip(native.status())
    torch.manual_seed(0)
    t, s, h = 7, 3, 5
    valid = torch.arange(t).unsqueeze(1) < torch.tensor([7, 4, 1]).unsqueeze(0)

    def strided(x: torch.Tensor) -> torch.Tensor:
        """The same values in a layout that is not contiguous."""
        out = x.transpose(0, 1).contiguous().transpose(0, 1)
        assert not out.is_contiguous()
        return out

    gates = torch.rand(t, s, 3, h)
    gh, h_prev = torch.randn(t, s, 3, h), torch.randn(t, s, h)
    want = rec.gru_factors(gates, gh, h_prev, valid)
    got = native.gru_factors(gates, strided(gh), strided(h_prev), valid)
    for key in ("F3", "Z"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)

    w = rec.LayerWeights("lstm", torch.randn(4 * h, 2), torch.randn(4 * h, h), None, None)
    c0, cell, c_prev = torch.randn(s, h), torch.randn(t, s, h), torch.randn(t, s, h)
    eager = rec.forward_details(w, torch.randn(t, s, 2), torch.tanh(torch.randn(t, s, h)), torch.zeros(s, h), c0,
                                valid, h_prev=torch.randn(t, s, h), c_prev=c_prev, cell=cell, compiled=False)
    assert eager.gates is not None
    _, factors = native.lstm_factors(eager.gates, c0, cell, strided(c_prev), valid)
    for key, value in eager.factors.items():
        torch.testing.assert_close(factors[key], value, rtol=1e-6, atol=1e-7)


def test_a_script_that_ends_while_the_passes_load_exits_cleanly(tmp_path):
    """watch() loads the compiled passes on a background thread. A script that
    ended while that thread was still inside PyTorch (here: cells called outside
    the model's forward, so no step ever waits for the passes) aborted at exit
    with status 134. Run with a warm cache and with a cold one (the build)."""
    script = textwrap.dedent("""
        import sys, torch, seqscope
        model = torch.nn.Module()
        model.cell = cell = torch.nn.LSTMCell(2, 4)
        with seqscope.watch(model, sys.argv[1], every=1):
            state = None
            for x in torch.randn(6, 3, 2):
                state = cell(x, state)
            state[0].sum().backward()
        print("done")
    """)
    cache = tmp_path / "cache"
    for attempt in range(4):  # the first builds; the others load from the cache
        run = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"t{attempt}.h5")], cwd=ROOT,
                             env={**os.environ, "SEQSCOPE_CACHE_DIR": str(cache)}, capture_output=True, text=True,
                             timeout=300)
        assert (run.returncode, run.stdout.strip()) == (0, "done"), run.stderr[-2000:]
        # the build finished (a script that ended first would leave only partial "building-" files)
        assert len(list(cache.glob("scan-*.so"))) == 2, sorted(p.name for p in cache.iterdir())


def _eigen_cases() -> list[tuple[str, np.ndarray]]:
    """Weight matrices whose Gram matrices (W^T W) the top-eigenvalue test takes."""
    rng = np.random.default_rng(3)
    torch.manual_seed(3)

    def orthogonal(n: int) -> np.ndarray:
        return np.linalg.qr(rng.standard_normal((n, n)))[0]

    cases = [(f"{mk.__name__} default init H={h}", mk(4, h).weight_hh_l0.detach().numpy())
             for mk in (torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN) for h in (1, 2, 7, 64, 200)]
    cases += [
        ("orthogonal (a cluster of equal singular values)", orthogonal(96)),
        ("four stacked orthogonal blocks", np.vstack([orthogonal(40) for _ in range(4)])),
        ("orthogonal, slightly perturbed", orthogonal(80) + 1e-4 * rng.standard_normal((80, 80))),
        ("low rank plus noise", rng.standard_normal((70, 3)) @ rng.standard_normal((3, 70))
         + 1e-3 * rng.standard_normal((70, 70))),
        ("rank one", np.outer(rng.standard_normal(50), rng.standard_normal(50))),
        ("two equal top singular values", np.diag(np.r_[2.0, 2.0, rng.uniform(0, 1.9, 60)])),
        ("top two 1e-9 apart", np.diag(np.r_[2.0, 2.0 - 1e-9, rng.uniform(0, 1.9, 60)])),
        ("exploding (1e15)", 1e15 * rng.standard_normal((64, 64))),
        ("vanishing (1e-20)", 1e-20 * rng.standard_normal((64, 64))),
        ("zero", np.zeros((32, 32))),
        ("wide (more columns than rows)", rng.standard_normal((20, 90))),
    ]
    return cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_compiled_top_eigenvalue_matches_a_dense_float64_eigensolver(dtype):
    """native.top_eigenvalue (Lanczos, proven by a Cholesky factorization) against
    numpy's dense float64 eigensolver on the same matrix, over matrices that a
    recurrent layer's W_hh can be: PyTorch's default initializations, orthogonal
    ones (all singular values equal), clustered or repeated top singular values,
    low rank, badly scaled, zero. It must give an answer (not hand over to the
    dense solver) on every one of them, and that answer must be within 1e-8."""
    need_native()
    for name, w in _eigen_cases():
        m = torch.from_numpy(np.ascontiguousarray(w)).to(dtype)
        gram = m.T @ m
        want = np.linalg.eigvalsh(gram.double().numpy())[-1]
        got = native.top_eigenvalue(gram)
        assert got is not None, name
        assert got == pytest.approx(want, rel=1e-8, abs=1e-300), name


def _lanczos_start(n: int) -> np.ndarray:
    """The start vector of _native.c's Lanczos iteration (its generator, replayed)."""
    s, out = 0x9E3779B97F4A7C15, []
    for _ in range(n):
        s = (s * 6364136223846793005 + 1442695040888963407) % 2**64
        out.append((s >> 11) / 2.0**53 - 0.5)
    return np.array(out)


def test_a_top_eigenvalue_the_iteration_cannot_prove_goes_to_the_dense_eigensolver():
    """A matrix whose top eigenvector is orthogonal to the iteration's start vector:
    Lanczos then never sees the top eigenvalue (it finds 1, the top is 3). The
    proof fails, top_eigenvalue says so (None), and sigma_max still gives the
    true value through torch.linalg.eigvalsh. A NaN gives NaN; without the
    compiled code top_eigenvalue says nothing."""
    need_native()
    from seqscope.capture import spectral

    n = 48
    start = _lanczos_start(n)
    u = np.random.default_rng(0).standard_normal(n)
    u -= (u @ start) / (start @ start) * start
    u /= np.linalg.norm(u)
    gram = np.eye(n) + 2 * np.outer(u, u)  # eigenvalues 3 (along u) and 1
    assert native.top_eigenvalue(torch.from_numpy(gram)) is None
    w = np.eye(n) + (np.sqrt(3) - 1) * np.outer(u, u)  # W^T W = gram
    assert spectral.sigma_max(torch.from_numpy(w)) == pytest.approx(np.sqrt(3), rel=1e-12)
    assert np.isnan(native.top_eigenvalue(torch.tensor([[1.0, np.nan], [np.nan, 1.0]])))
    assert native.top_eigenvalue(torch.eye(3), loaded={}) is None


def test_the_writers_top_eigenvalue_limits_its_blas_threads_for_its_own_thread_only():
    """On the writer thread (weights on a GPU) top_eigenvalue runs with PyTorch's
    MKL held to the given threads for the calling thread alone, and restores that
    thread's setting afterwards, also when the call fails. Without MKL it cannot
    limit them and says nothing (None), so the writer keeps numpy's solver."""
    import threading

    need_native()
    gram = torch.from_numpy(np.diag(np.arange(1.0, 41.0)))
    if native._mkl_local_threads is None:
        assert native.top_eigenvalue(gram, threads=1) is None
        assert native.top_eigenvalue(gram) == pytest.approx(40.0, rel=1e-12)
        return
    real = native._mkl_local_threads
    calls: list[tuple[str, int]] = []

    def recording(n: int) -> int:
        calls.append((threading.current_thread().name, n))
        return real(n)
    results: list[float | None] = []
    try:
        native._mkl_local_threads = recording
        worker = threading.Thread(target=lambda: results.append(native.top_eigenvalue(gram, threads=3)),
                                  name="writer-like")
        worker.start()
        worker.join()
        assert results == [pytest.approx(40.0, rel=1e-12)]
        # set to 3, then back to that thread's previous setting (0: the global one)
        assert calls == [("writer-like", 3), ("writer-like", 0)]
        calls.clear()
        assert native.top_eigenvalue(gram) == pytest.approx(40.0, rel=1e-12)
        assert calls == []  # the training thread's own calls leave MKL's setting alone
        assert native.top_eigenvalue(torch.tensor([[1.0, np.nan], [np.nan, 1.0]]), threads=2) != 1.0
        assert calls[-1][1] == 0  # restored after a NaN too
    finally:
        native._mkl_local_threads = real


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_the_compiled_propagation_seed_matches_the_eager_one_on_extreme_rows(dtype):
    """The propagation seed, compiled, against recurrences.unit_seed, with each
    kind of row it must survive: zero (the uniform seed), NaN and infinite
    entries, values whose float32 squares overflow (1e25) or vanish (1e-30), and
    for float64 a sum of squares that overflows a double (1e200: PyTorch's norm
    is inf there too, and the seed uniform). Padded last steps included."""
    need_native()
    gen = torch.Generator().manual_seed(0)
    n_time, n_seq, hidden = 6, 7, 5
    ext = torch.randn(n_time, 2, n_seq, hidden, generator=gen, dtype=dtype)
    last = torch.tensor([5, 5, 3, 0, 2, 4, 5])
    ext[5, 0, 0] = 0
    ext[5, 0, 1, 2] = float("nan")
    ext[3, 0, 2, 0] = float("-inf")
    ext[0, 0, 3] *= 1e25
    ext[2, 0, 4] *= 1e-30
    if dtype == torch.float64:
        ext[4, 0, 5] *= 1e200
    seq = torch.arange(n_seq)
    for at in (last, None):
        want = ext.clone()
        if at is None:
            want[-1, 1] = rec.unit_seed(want[-1, 0])
        else:
            want[at, 1, seq] = rec.unit_seed(want[at, 0, seq])
        got = ext.clone()
        native.unit_seed_in_place(got, at)
        torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0, equal_nan=True)
        # what the fused recorder calls: the compiled pass here
        dispatched = ext.clone()
        rec.seed_last_steps(dispatched, at)
        torch.testing.assert_close(dispatched, got, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError):
        native.unit_seed_in_place(ext.clone(), torch.tensor([6, 0, 0, 0, 0, 0, 0]))  # past the last timestep
    with pytest.raises(ValueError):
        native.unit_seed_in_place(ext[:, :1].clone(), None)  # one seed row, not two



@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_a_propagation_that_vanishes_below_float32s_range_is_recorded_without_subnormal_numbers(
        tmp_path, scan_path, kind):
    """A layer whose gradients vanish: the propagation seed shrinks by orders of
    magnitude per timestep, through float32's subnormal range (below 1.2e-38),
    where each operation on x86 costs ~20 times more (session 25: the LSTM scan
    at B64 T200 H512 took 0.65 s instead of 0.07). The scans flush such values to
    zero. Recorded against an unrolled float64 autograd reference: equal where the
    reference is above 1e-27, at most that where it is below, never subnormal;
    and the training thread's floating-point mode is the same afterwards."""
    import seqscope
    from tests import reference as ref

    torch.manual_seed(0)
    make = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[kind]
    module = make(3, 6)
    with torch.no_grad():
        module.weight_hh_l0.mul_(0.05)
        if kind != "rnn":  # the LSTM's forget gate, the GRU's update gate near 0: no carry either
            module.bias_ih_l0[6:12] -= 4.0
    x = torch.randn(90, 2, 3)
    path = tmp_path / "vanishing.h5"
    with seqscope.watch(module, path, every=1):
        module(x)[0].pow(2).sum().backward()
    assert not ref.flushes_subnormals()  # recording left this thread's mode alone

    double = make(3, 6).double()
    double.load_state_dict({k: v.double() for k, v in module.state_dict().items()})
    layers, outs, _, _ = ref.run_reference(double, [x[:, b].double() for b in range(2)])
    sum(o.pow(2).sum() for o in outs).backward(retain_graph=True)
    with seqscope.open(path) as trace:
        prop = trace.propagation(f"{kind}.l0", 0)
        for b in range(2):
            ref.check_vanishing_profile(prop[b].data, ref.propagation(layers[(0, 0)], b, 0).numpy())
