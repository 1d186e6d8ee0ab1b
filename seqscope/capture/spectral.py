"""Largest singular value of a recurrent weight matrix, sigma_max(W_hh).

Weights on the CPU: computed at capture time on the training thread with
PyTorch (its own thread pool, no second thread team competing for the cores;
on a 2-core machine this cost a recorded LSTM step 0.7 ms at H=64 and 4 ms at
H=256 on the writer thread, against ~0.1 and ~2.5 ms here). Weights on an
accelerator: a host copy is taken at forward time and the value is computed on
the writer thread, so the training thread never waits for the device.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from seqscope.capture import native
from seqscope.capture import recurrences as rec
from seqscope.capture.host import copy_to_host


def at_capture(w: torch.Tensor | None) -> tuple[float | None, np.ndarray | None, Callable[[], None] | None]:
    """(sigma_max now, None, None) for CPU weights; (None, host copy, a function
    that waits for the copy) for device weights (sigma_max_host on the writer
    thread: the copy is queued now, so it holds the weights as of this forward
    pass); (nan, None, None) without a matrix."""
    if w is None or w.numel() == 0 or w.dim() != 2:
        return float("nan"), None, None
    if w.device.type == "cpu":
        return sigma_max(w), None, None
    host, ready = copy_to_host(w.detach())
    return None, host.numpy(), ready


def sigma_max(w: torch.Tensor) -> float:
    """sigma_max of a CPU tensor: the square root of the largest eigenvalue of its
    Gram matrix (cheaper than an SVD), the Gram product in the weights' precision
    (float32 for float32 weights, float64 where float32 overflows), the
    eigenvalue in float64 (relative error against a float64 SVD below 1e-8 on
    matrices up to 2048x512, badly scaled ones included). NaN for a matrix with
    NaN, inf when only float64 overflow stops it, NaN when the solver fails.

    The eigenvalue comes from the compiled Lanczos iteration with its proof
    (native.top_eigenvalue: 1.8-2.9x faster than the dense eigensolver at n = 256
    and 512) where it can say, else from torch.linalg.eigvalsh."""
    w = w.detach()
    with rec.no_autocast(w.device):  # a record finished inside the next step's autocast region
        return _sigma_max(w)


def _sigma_max(w: torch.Tensor) -> float:
    precisions = (torch.float64,) if w.dtype == torch.float64 else (torch.float32, torch.float64)
    try:
        for precision in precisions:
            m = w.to(precision)
            gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
            top = native.top_eigenvalue(gram)
            if top is None:  # no compiled code yet, or no proof: the dense eigensolver
                if not bool(torch.isfinite(gram).all()):
                    continue
                top = float(torch.linalg.eigvalsh(gram.double())[-1])
            elif math.isnan(top):  # a NaN or an infinity in the Gram matrix
                continue
            return math.sqrt(max(top, 0.0))
        return float("inf") if bool(torch.isfinite(w).all()) else float("nan")
    except RuntimeError:  # LAPACK did not converge: a statistic, never an error in training
        return float("nan")


def sigma_max_host(matrix: np.ndarray, ready: Callable[[], None] | None = None) -> float:
    """Largest singular value of ``matrix`` [rows, cols]: the square root of the
    largest eigenvalue of its Gram matrix (cheaper than a full SVD). The Gram
    product runs in the matrix's own precision (float32: relative error of the
    result ~1e-7 against a float64 SVD, measured up to 2048x512, including badly
    scaled matrices; float64 where float32 overflows), the eigenvalue in float64:
    by the compiled Lanczos iteration with its proof (native.top_eigenvalue) where
    PyTorch's BLAS is MKL, whose threads can be held for this thread alone (on an
    H100 machine's host numpy's dense eigensolver took 14-19 ms at H=512), else
    by numpy's dense eigensolver.

    For weights on an accelerator: runs on the writer thread, from a host copy
    taken at forward time, with numpy's BLAS held to ``writer_blas_threads()``
    threads: one on a small machine, where a second thread team (torch's OpenMP,
    or OpenBLAS workers that spin after each call) measurably slowed the training
    thread's own kernels (8x on a 2-core machine); a few on a machine with cores
    to spare, where the float64 eigensolver at H=512 (~18 ms on one core) otherwise
    bounds how fast recorded GPU steps can follow each other.
    """
    if ready is not None:
        ready()  # the host copy has arrived
    if matrix.size == 0:
        return float("nan")  # a user-written cell without a recurrent weight matrix
    with _blas_controller().limit(limits=writer_blas_threads(), user_api="blas"):
        # float32 overflows for exploding weights: then float64 throughout
        precisions: tuple[type[np.floating[Any]], ...] = (
            (np.float64,) if matrix.dtype == np.float64 else (np.float32, np.float64))
        for precision in precisions:
            w = matrix.astype(precision, copy=False)
            with np.errstate(over="ignore", invalid="ignore"):
                gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
            if np.isfinite(gram).all():
                # the compiled Lanczos iteration with its proof (native.top_eigenvalue, its BLAS
                # held to the same threads); the dense eigensolver where it cannot say
                top = native.top_eigenvalue(torch.from_numpy(gram), threads=writer_blas_threads())
                if top is None:  # (the matrix is finite here: no NaN comes back)
                    top = float(np.linalg.eigvalsh(gram.astype(np.float64))[-1])
                return float(np.sqrt(max(top, 0.0)))
    return float("inf") if np.isfinite(matrix).all() else float("nan")


@functools.lru_cache(maxsize=1)
def writer_blas_threads() -> int:
    """BLAS threads for the writer thread's eigensolver: 1 below 8 usable cores,
    else a quarter of them, at most 8 (a GPU machine's training thread needs one
    core to launch kernels, and its DataLoader workers some more)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return 1 if cores < 8 else min(8, cores // 4)


@functools.lru_cache(maxsize=1)
def _blas_controller() -> ThreadpoolController:
    """Found once: looking up the loaded BLAS libraries reads /proc/self/maps
    (about 1 ms, which was most of a small layer's writer time)."""
    return ThreadpoolController()
