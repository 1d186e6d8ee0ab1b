"""Compiled recurrence passes (``_native.c``), built on first use; optional.

The BPTT scans of ``recurrences.backward_scan`` and the elementwise part of
``recurrences.forward_details`` after the activations (the LSTM's cell states,
the LSTM's and the GRU's scan factors), compiled; and the largest eigenvalue
of a Gram matrix for sigma_max(W_hh) (``top_eigenvalue``: Lanczos with a
proof, in place of a dense eigensolver that finds all n of them).
The eager PyTorch versions are the reference and the fallback. On the CPU, at
small layer sizes, most of their time is PyTorch's per-call overhead (four or
five elementwise calls and one product per timestep, ~20 us a timestep); the
compiled loop does the same arithmetic in one pass per timestep and calls the
BLAS that PyTorch itself links, so it never returns to Python (LSTM B16 T50
H64: 1.2 -> 0.5 ms; T100 H256: 14 -> 9 ms).

Used for float32 and float64 tensors on the CPU when a C compiler (``$CC``,
``cc``, ``gcc`` or ``clang``) and PyTorch's exported ``sgemm_``/``dgemm_`` are
found, and only after a self-test against the eager versions passes. The shared
libraries are cached in ``$SEQSCOPE_CACHE_DIR`` (default ``~/.cache/seqscope``)
under a name that hashes the source, the compiler and the platform.
``SEQSCOPE_NATIVE=0`` turns them off. Anything missing or failing means the
eager versions run: recording never depends on this module.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("seqscope")

_SOURCE = Path(__file__).with_name("_native.c")
_TYPES = {torch.float32: ("f32", "float", "sgemm_"), torch.float64: ("f64", "double", "dgemm_")}
_lock = threading.Lock()
# dtype -> (scan functions by kind name, address of the matching gemm)
_loaded: dict[torch.dtype, tuple[dict[str, Any], int]] | None = None
# addresses of PyTorch's dgemv_ and dpotrf_ (top_eigenvalue), None where it exports none
_lapack: tuple[int, int] | None = None
# PyTorch's MKL's per-thread thread count (MKL_Set_Num_Threads_Local, its C interface), None without MKL: with it,
# top_eigenvalue can run on the writer thread with its BLAS held to a few threads
_mkl_local_threads: Any = None
_reason = "not tried yet"


_background: threading.Thread | None = None


def load_in_background() -> None:
    """Build (or load from the cache) and self-test the compiled passes on a
    daemon thread, so that the first recorded step does not wait for the
    compiler; watch() calls this. The process waits for that thread at exit: a
    daemon thread still inside PyTorch when the interpreter shuts down aborts the
    process ("terminate called without an active exception", exit status 134),
    which a short script that ends before the self-test does would hit."""
    global _background
    if _background is not None:
        return
    _background = threading.Thread(target=enabled, name="seqscope-native", daemon=True)
    _background.start()
    atexit.register(_background.join, 300)  # a compiler that hangs is killed after 120 s per build


def status() -> str:
    """One line: whether the compiled scans are in use, and if not, why."""
    _load()
    return "compiled scans in use" if _loaded else f"compiled scans off: {_reason}"


def enabled() -> bool:
    return bool(_load())


def _load() -> dict[torch.dtype, tuple[dict[str, Any], int]]:
    """Build (or find in the cache) and load the libraries, once per process."""
    global _loaded, _reason
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is None:
            try:
                _loaded = _build_and_load()
                _reason = ""
            except Exception as exc:  # noqa: BLE001 - any failure means: use the eager scan
                _loaded = {}
                _reason = " ".join(str(exc).split()) or type(exc).__name__
                log.debug("seqscope: %s", _reason)
    return _loaded


def _torch_blas() -> ctypes.CDLL:
    """PyTorch's CPU library, which exports the BLAS it was built with."""
    lib_dir = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        if (lib_dir / name).exists():
            return ctypes.CDLL(str(lib_dir / name))
    raise RuntimeError(f"no libtorch_cpu in {lib_dir}")


def _compiler() -> str:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return str(shutil.which(candidate))
    raise RuntimeError("no C compiler found (set CC, or install gcc)")


def _cache_dir() -> Path:
    configured = os.environ.get("SEQSCOPE_CACHE_DIR")
    xdg = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    base = Path(configured) if configured else xdg / "seqscope"
    try:
        base.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=base, delete=True)
        probe.close()
        return base
    except OSError:
        return Path(tempfile.mkdtemp(prefix="seqscope-native-"))


def _build_and_load() -> dict[torch.dtype, tuple[dict[str, Any], int]]:
    global _lapack, _mkl_local_threads
    if os.environ.get("SEQSCOPE_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        raise RuntimeError("SEQSCOPE_NATIVE=0")
    blas = _torch_blas()
    cc = _compiler()
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + "|".join([cc, sys.platform, platform.machine()]).encode()).hexdigest()[:16]
    cache = _cache_dir()
    out: dict[torch.dtype, tuple[dict[str, Any], int]] = {}
    for dtype, (suffix, scalar, gemm_name) in _TYPES.items():
        gemm = ctypes.cast(getattr(blas, gemm_name), ctypes.c_void_p).value
        if not gemm:
            raise RuntimeError(f"PyTorch's library exports no {gemm_name}")
        target = cache / f"scan-{key}-{suffix}.so"
        if not target.exists():
            _compile(cc, scalar, suffix, cache, target)
        try:
            lib = ctypes.CDLL(str(target))
        except OSError:  # a damaged cached file: built again, once
            target.unlink(missing_ok=True)
            _compile(cc, scalar, suffix, cache, target)
            lib = ctypes.CDLL(str(target))
        p, i = ctypes.c_void_p, ctypes.c_int
        # every argument typed: an untyped Python int would be passed as a 32-bit int
        signatures = {"lstm_scan": [p, i, i, i, i, i] + [p] * 10, "gru_scan": [p, i, i, i, i] + [p] * 5,
                      "rnn_scan": [p, i, i, i, i] + [p] * 4, "lstm_cells": [i, i, i, p, p, p],
                      "lstm_factors": [i, i, i] + [p] * 10, "gru_factors": [i, i, i] + [p] * 6,
                      "top_eigenvalue": [p, p, i, i, ctypes.c_double, p, p, p],
                      "unit_seed": [i, i, i, p, p]}
        funcs = {}
        for name, argtypes in signatures.items():
            func = getattr(lib, f"seqscope_{name}_{suffix}")
            func.argtypes, func.restype = argtypes, ctypes.c_int
            funcs[name] = func
        out[dtype] = (funcs, gemm)
    gemv, potrf = (ctypes.cast(getattr(blas, name, None) or 0, ctypes.c_void_p).value for name in ("dgemv_", "dpotrf_"))
    _lapack = (gemv, potrf) if gemv and potrf else None
    local = getattr(blas, "MKL_Set_Num_Threads_Local", None) if _lapack is not None else None
    if local is not None:
        local.argtypes, local.restype = [ctypes.c_int], ctypes.c_int
    _mkl_local_threads = local
    if sys.byteorder != "little":
        raise RuntimeError("compiled scans are built for little-endian machines only")
    _self_test(out)
    return out


def _self_test(loaded: dict[torch.dtype, tuple[dict[str, Any], int]]) -> None:
    """Each compiled scan against the eager one on a small problem with
    padding, before any real use: a BLAS that takes other arguments than the
    ones passed, or a miscompiled library, turns the compiled scans off."""
    from seqscope.capture import recurrences as rec

    gen = torch.Generator().manual_seed(0)
    n_time, n_seq, n_in, hidden, proj = 5, 3, 2, 4, 3
    valid = torch.arange(n_time).unsqueeze(1) < torch.tensor([5, 3, 1]).unsqueeze(0)
    for dtype in loaded:
        for kind, gates, out_size in (("lstm", 4, hidden), ("lstm", 4, proj), ("gru", 3, hidden),
                                      ("rnn_tanh", 1, hidden)):
            def rand(*shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
                return torch.randn(*shape, generator=gen, dtype=dtype)

            w = rec.LayerWeights(kind, rand(gates * hidden, n_in), rand(gates * hidden, out_size), rand(gates * hidden),
                                 None, rand(out_size, hidden) if out_size != hidden else None)
            h = torch.tanh(rand(n_time, n_seq, out_size))
            c0 = rand(n_seq, hidden)
            details = rec.forward_details(w, rand(n_time, n_seq, n_in), h, rand(n_seq, out_size),
                                          c0 if kind == "lstm" else None, valid, compiled=False)
            mask = valid.to(dtype)[:, None, :, None]
            ext_h = rand(n_time, 2, n_seq, out_size) * mask
            ext_c = rand(n_time, 2, n_seq, hidden) * mask if kind == "lstm" else None
            pairs = list(zip(backward_scan(kind, w.w_hh, w.w_hr, details.factors, ext_h, ext_c, loaded),
                             rec.eager_backward_scan(w, details, ext_h, ext_c)))
            if kind == "lstm":
                assert details.gates is not None and details.cell is not None
                cell, factors = lstm_factors(details.gates, c0, None, None, valid, loaded)
                pairs += [(cell, details.cell)] + [(factors[k], details.factors[k]) for k in sorted(factors)]
            if kind == "gru":
                assert details.gates is not None
                gh = rand(n_time, n_seq, 3, hidden)
                h_prev = rand(n_time, n_seq, hidden)
                want = rec.gru_factors(details.gates, gh, h_prev, valid)
                got = gru_factors(details.gates, gh, h_prev, valid, loaded)
                pairs += [(got[k], want[k]) for k in sorted(want)]
            for a, b in pairs:
                if a is not None and b is not None and not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
                    raise RuntimeError(f"compiled {kind} recurrence ({dtype}) disagrees with the eager one")
        # the propagation seed, with a zero row and rows that are not finite
        ext = torch.randn(n_time, 2, n_seq, hidden, generator=gen, dtype=dtype)
        ext[4, 0, 0] = 0
        ext[2, 0, 1, 1] = float("nan")
        ext[0, 0, 2, 0] = float("inf")
        last = torch.tensor([4, 2, 0])
        want_ext = ext.clone()
        seq = torch.arange(n_seq)
        want_ext[last, 1, seq] = rec.unit_seed(ext[last, 0, seq])
        got_ext = ext.clone()
        unit_seed_in_place(got_ext, last, loaded)
        want_ext[-1, 1] = rec.unit_seed(want_ext[-1, 0])
        unit_seed_in_place(got_ext, None, loaded)
        if not torch.allclose(got_ext, want_ext, rtol=1e-6, atol=1e-7, equal_nan=True):
            raise RuntimeError(f"compiled propagation seed ({dtype}) disagrees with the eager one")
        if _lapack is not None:  # top_eigenvalue against the dense eigensolver
            sample = torch.randn(7, 5, generator=gen, dtype=dtype)
            gram = sample.T @ sample
            top = float(torch.linalg.eigvalsh(gram.double())[-1])
            found = top_eigenvalue(gram, loaded)
            if found is None or abs(found - top) > 1e-6 * top:
                raise RuntimeError(f"compiled top eigenvalue ({dtype}) disagrees with the dense eigensolver")


def _compile(cc: str, scalar: str, suffix: str, cache: Path, target: Path) -> None:
    # a build cut off by the end of its process (watch() starts it on a daemon thread)
    # leaves its partial output behind: those older than ten minutes are removed
    for stale in cache.glob("building-*.so"):
        try:
            if time.time() - stale.stat().st_mtime > 600:
                stale.unlink()
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(dir=cache, prefix="building-", suffix=".so")
    os.close(fd)
    try:
        run = subprocess.run(
            [cc, "-O3", "-shared", "-fPIC", f"-DSCALAR={scalar}", f"-DNAME(x)=x##_{suffix}", "-o", tmp, str(_SOURCE)],
            capture_output=True, text=True, timeout=120, check=False,
        )
        if run.returncode != 0:
            first = (run.stderr or run.stdout).strip().splitlines()
            raise RuntimeError(f"{Path(cc).name} failed: {first[0] if first else run.returncode}")
        os.replace(tmp, target)  # atomic: processes building at once each leave a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class _Check:
    """Shape, dtype, device and layout checks before raw pointers go to C: a
    mismatch raises (the caller then runs the eager scan), never reaches C."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, t: torch.Tensor | None, shape: tuple[int, ...]) -> int:
        if t is None:
            return 0
        if (t.device.type != "cpu" or t.dtype != self.dtype or tuple(t.shape) != shape
                or not t.is_contiguous() or t.data_ptr() == 0):
            raise ValueError(f"native scan: expected {self.dtype} {shape} contiguous on the CPU, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
        return int(t.data_ptr())


def supports(ext_h: torch.Tensor) -> bool:
    """Whether the compiled scan can run on these external gradients."""
    return ext_h.device.type == "cpu" and ext_h.dtype in _TYPES and bool(_load().get(ext_h.dtype))


def backward_scan(
    kind: str,
    w_hh: torch.Tensor,
    w_hr: torch.Tensor | None,
    factors: dict[str, torch.Tensor],
    ext_h: torch.Tensor,
    ext_c: torch.Tensor | None,
    loaded: dict[torch.dtype, tuple[dict[str, Any], int]] | None = None,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """recurrences.backward_scan, compiled; same arguments and results.
    ``overwrite``: the results may be written into ``ext_h``/``ext_c`` (no copy)."""
    from seqscope.trace import schema

    funcs, gemm = (loaded if loaded is not None else _load())[ext_h.dtype]
    n_time, reps, n_seq, out_size = ext_h.shape
    rows = reps * n_seq
    check = _Check(ext_h.dtype)
    f = {k: v.contiguous() for k, v in factors.items()}
    def work(ext: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """The buffer the scan runs in: ``ext`` itself when the caller allows it."""
        if overwrite and ext.is_contiguous():
            return ext.view(shape)
        return ext.reshape(shape).clone(memory_format=torch.contiguous_format)

    dh = work(ext_h, (n_time, rows, out_size))
    w_hh = w_hh.contiguous()
    if kind == schema.KIND_LSTM:
        hidden = f["A"].shape[-1]
        w_hr = None if w_hr is None else w_hr.contiguous()
        if w_hr is None and hidden != out_size:
            raise ValueError("native scan: LSTM output size differs from hidden size without W_hr")
        if ext_c is not None:
            dc = work(ext_c, (n_time, rows, hidden))
        else:
            dc = ext_h.new_zeros((n_time, rows, hidden))
        dpre = ext_h.new_empty((rows, 4 * hidden))
        dm = ext_h.new_empty((rows, hidden)) if w_hr is not None else None
        per_seq = (n_time, n_seq, hidden)
        args: list[Any] = [
            gemm, n_time, reps, n_seq, hidden, out_size,
            check(dh, (n_time, rows, out_size)), check(dc, (n_time, rows, hidden)),
            check(f["A"], per_seq), check(f["F"], per_seq), check(f["P3"], (n_time, n_seq, 3, hidden)),
            check(f["Bo"], per_seq), check(w_hh, (4 * hidden, out_size)),
            check(w_hr, (out_size, hidden)), check(dpre, (rows, 4 * hidden)),
            check(dm, (rows, hidden)),
        ]
        funcs["lstm_scan"](*args)
        return dh.view(ext_h.shape), dc.view(n_time, reps, n_seq, hidden)
    if kind == schema.KIND_GRU:
        per_seq = (n_time, n_seq, out_size)
        dpre = ext_h.new_empty((rows, 3 * out_size))
        funcs["gru_scan"](
            gemm, n_time, reps, n_seq, out_size, check(dh, (n_time, rows, out_size)),
            check(f["F3"], (n_time, n_seq, 3, out_size)), check(f["Z"], per_seq),
            check(w_hh, (3 * out_size, out_size)), check(dpre, (rows, 3 * out_size)))
        return dh.view(ext_h.shape), None
    if kind in (schema.KIND_RNN_TANH, schema.KIND_RNN_RELU):
        da = ext_h.new_empty((rows, out_size))
        funcs["rnn_scan"](
            gemm, n_time, reps, n_seq, out_size, check(dh, (n_time, rows, out_size)),
            check(f["D"], (n_time, n_seq, out_size)), check(w_hh, (out_size, out_size)),
            check(da, (rows, out_size)))
        return dh.view(ext_h.shape), None
    raise ValueError(f"native scan: unknown kind {kind!r}")


def lstm_factors(
    gates: torch.Tensor,
    c0: torch.Tensor,
    cell: torch.Tensor | None,
    c_prev: torch.Tensor | None,
    valid: torch.Tensor | None,
    loaded: dict[torch.dtype, tuple[dict[str, Any], int]] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The LSTM part of recurrences.forward_details after the activations: cell
    states (unless given) and the scan's factors, in two compiled passes and one
    PyTorch tanh. Same arguments as there; returns (cell, factors)."""
    funcs, _ = (loaded if loaded is not None else _load())[gates.dtype]
    n_time, n_seq, four, hidden = gates.shape
    if four != 4:
        raise ValueError(f"native scan: LSTM gates of shape {tuple(gates.shape)}")
    check = _Check(gates.dtype)
    per_seq = (n_time, n_seq, hidden)
    if cell is None:
        cell = gates.new_empty(per_seq)
        funcs["lstm_cells"](n_time, n_seq, hidden, check(gates, (n_time, n_seq, 4, hidden)),
                            check(c0, (n_seq, hidden)), check(cell, per_seq))
    else:
        cell = cell.contiguous()
    tc = torch.tanh(cell)
    factors = {"A": gates.new_empty(per_seq), "F": gates.new_empty(per_seq), "Bo": gates.new_empty(per_seq),
               "P3": gates.new_empty((n_time, n_seq, 3, hidden))}
    mask = _padding_mask(valid, n_time, n_seq)
    c_prev = None if c_prev is None else c_prev.contiguous()  # held here while C reads it
    funcs["lstm_factors"](
        n_time, n_seq, hidden, check(gates, (n_time, n_seq, 4, hidden)), check(tc, per_seq), check(cell, per_seq),
        check(c0, (n_seq, hidden)), check(c_prev, per_seq), 0 if mask is None else mask.data_ptr(),
        check(factors["A"], per_seq), check(factors["F"], per_seq), check(factors["P3"], (n_time, n_seq, 3, hidden)),
        check(factors["Bo"], per_seq))
    return cell, factors


def _padding_mask(valid: torch.Tensor | None, n_time: int, n_seq: int) -> torch.Tensor | None:
    """``valid`` as the uint8 [time, sequence] array the compiled passes read, or
    None without padding. The caller holds the returned tensor while C reads it."""
    if valid is None:
        return None
    mask = valid.to(torch.uint8).contiguous()
    if mask.device.type != "cpu" or tuple(mask.shape) != (n_time, n_seq):
        raise ValueError(f"native scan: padding mask of shape {tuple(mask.shape)}")
    return mask


def gru_factors(
    gates: torch.Tensor,
    gh: torch.Tensor,
    h_prev: torch.Tensor,
    valid: torch.Tensor | None,
    loaded: dict[torch.dtype, tuple[dict[str, Any], int]] | None = None,
) -> dict[str, torch.Tensor]:
    """recurrences.gru_factors in one compiled pass; same arguments and results."""
    funcs, _ = (loaded if loaded is not None else _load())[gates.dtype]
    n_time, n_seq, three, hidden = gates.shape
    if three != 3:
        raise ValueError(f"native scan: GRU gates of shape {tuple(gates.shape)}")
    check = _Check(gates.dtype)
    per_gate = (n_time, n_seq, 3, hidden)
    factors = {"F3": gates.new_empty(per_gate), "Z": gates.new_empty((n_time, n_seq, hidden))}
    mask = _padding_mask(valid, n_time, n_seq)
    gh, h_prev = gh.contiguous(), h_prev.contiguous()  # held here while C reads them
    funcs["gru_factors"](
        n_time, n_seq, hidden, check(gates, per_gate), check(gh, per_gate), check(h_prev, (n_time, n_seq, hidden)),
        0 if mask is None else mask.data_ptr(), check(factors["F3"], per_gate),
        check(factors["Z"], (n_time, n_seq, hidden)))
    return factors


def unit_seed_in_place(ext_h: torch.Tensor, last: torch.Tensor | None,
                       loaded: dict[torch.dtype, tuple[dict[str, Any], int]] | None = None) -> None:
    """recurrences.seed_last_steps in one compiled pass: in ``ext_h`` [time, 2,
    sequence, unit], row [last[s], 1, s] becomes recurrences.unit_seed of row
    [last[s], 0, s] (``last`` [sequence] on the CPU; None: the last timestep)."""
    funcs, _ = (loaded if loaded is not None else _load())[ext_h.dtype]
    n_time, reps, n_seq, out_size = ext_h.shape
    if reps != 2:
        raise ValueError(f"native seed: expected [time, 2, sequence, unit], got {tuple(ext_h.shape)}")
    at = None
    if last is not None:
        at = last.to(torch.int64).contiguous()  # held here while C reads it
        if at.device.type != "cpu" or tuple(at.shape) != (n_seq,):
            raise ValueError(f"native seed: last steps of shape {tuple(at.shape)} on {at.device}")
    check = _Check(ext_h.dtype)
    code = funcs["unit_seed"](n_time, n_seq, out_size, check(ext_h, (n_time, 2, n_seq, out_size)),
                              0 if at is None else at.data_ptr())
    if code != 0:
        raise ValueError("native seed: a last step outside the sequence")


_EIG_EPS = 1e-8  # top_eigenvalue's proof: no eigenvalue above theta (1 + this)
_EIG_STEPS = 160  # Lanczos steps at most, then the dense eigensolver takes over


def top_eigenvalue(gram: torch.Tensor,
                   loaded: dict[torch.dtype, tuple[dict[str, Any], int]] | None = None,
                   threads: int | None = None) -> float | None:
    """The largest eigenvalue of the symmetric CPU float32/float64 matrix
    ``gram`` (its lower triangle, as torch.linalg.eigvalsh reads it), by the
    compiled Lanczos iteration of ``_native.c``. The value theta is a Ritz
    value, so (in exact arithmetic) no larger than the largest eigenvalue, and
    a Cholesky factorization proves that no eigenvalue exceeds theta (1 + 1e-8):
    sigma_max = sqrt(theta) is within 5e-9 of the true one for this matrix (a
    float32 Gram product itself is good to ~2e-7).

    NaN when the matrix holds a NaN or an infinity. None when this cannot say,
    and the caller then runs a dense eigensolver: the compiled code is not
    loaded, or not loaded yet (this never waits for the build), or the proof
    failed (for example on a top eigenvalue less than 1e-8 apart from the next
    whose eigenvectors the iteration has not yet separated). ``loaded``: the
    libraries to use (the self-test's, before they are published).

    ``threads``: for a call off the training thread (the writer's), the BLAS
    threads this call may use, set for the calling thread only; None where
    PyTorch's BLAS cannot be limited per thread (it is not MKL), so that no
    second thread team competes with the training thread's."""
    loaded = loaded if loaded is not None else _loaded
    if not loaded or _lapack is None or gram.dtype not in loaded or gram.device.type != "cpu":
        return None
    if threads is not None and _mkl_local_threads is None:
        return None
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        return None
    n = gram.shape[0]
    funcs, _ = loaded[gram.dtype]
    gram = gram.contiguous()
    steps = min(n, _EIG_STEPS)
    work = torch.empty(n * n + (steps + 1) * n + n + (steps + 1) + 2 * steps, dtype=torch.float64)
    top = ctypes.c_double(0.0)
    previous = None if threads is None else _mkl_local_threads(max(1, threads))
    try:
        code = funcs["top_eigenvalue"](_lapack[0], _lapack[1], n, steps, _EIG_EPS, gram.data_ptr(), work.data_ptr(),
                                       ctypes.addressof(top))
    finally:
        if previous is not None:
            _mkl_local_threads(previous)  # 0: this thread follows the global setting again
    if code == 3:
        return float("nan")
    return top.value if code == 0 else None
