"""Append recorded steps to a trace file from a background thread.

The training thread hands over numpy arrays (already on the host) and returns;
a single writer thread owns the HDF5 file. Each group of records (those that
queued up while the previous group was written, or arrived within ``_WINDOW``
seconds of the group's first) is appended, flushed, and only then counted in
``/commit`` (flushed again), so a process killed at any moment leaves a file
whose committed part is complete.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from h5py import h5s, h5t

from seqscope.trace import claim, schema

log = logging.getLogger("seqscope")

_LIBVER = ("v110", "v114")  # SWMR-capable, and readable by HDF5 >= 1.10
_GROUP_MAX = 16  # records committed together at most
# Group commit window: records that arrive within this many seconds of a group's first
# record are written with it (one append per table and one pair of flushes per group;
# each record's own work, such as sigma_max of a GPU layer's weights, is not delayed).
# With every step recorded this halves the writer's CPU time per record at H=64, time that
# a 2-core machine takes from training (benchmarks/profiling.md, session 9). A process
# killed outright loses at most this window's records on top of the queue's.
_WINDOW = 0.02
_FLUSH: Any = object()  # queued by drain(): write what is waiting now, without the window


def _keep_open(handles: list[Any]) -> None:
    """After a failed write (a full disk), HDF5 can neither flush nor close the
    file, and freeing its handles afterwards -- by close(), by garbage
    collection, or at interpreter exit -- crashed the process with a segfault in
    H5D_close (seen with the HDF5 1.14 that h5py wheels bundle, on a real full
    tmpfs). The handles are therefore kept until the process ends: one open file
    descriptor and the HDF5 cache of one file. The committed part of the trace
    on disk is complete and readable."""
    for handle in handles:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(handle))


def one_line(exc: BaseException) -> str:
    """An exception as one line. HDF5's messages span lines and bury the cause
    ("errno = 28, error message = 'No space left on device'") in the middle."""
    text = " ".join(str(exc).split())
    cause = re.search(r"error message = '([^']*)'", text)
    if cause and cause.group(1) not in text[: text.find("(")]:
        return f"{cause.group(1)} ({type(exc).__name__}: {text})"
    return f"{type(exc).__name__}: {text}"


def _create_file(path: Path) -> h5py.File:
    """A new HDF5 file at ``path``, in the formats of _LIBVER. An h5py built with
    HDF5 before 1.14 (h5py 3.8 bundles 1.12) knows no 'v114': its newest format,
    'latest', is then the bound (KeyError is h5py's answer to an unknown name)."""
    try:
        return h5py.File(path, "w", libver=_LIBVER, rdcc_nbytes=0)
    except KeyError:
        return h5py.File(path, "w", libver=(_LIBVER[0], "latest"), rdcc_nbytes=0)


@dataclasses.dataclass
class ArrayRecord:
    step: int
    layer: int
    field: str
    data: np.ndarray
    phase: int = schema.PHASE_TRAIN


@dataclasses.dataclass
class StepRecord:
    """Everything one recorded training step adds to the trace."""

    step_row: tuple[int, float, int, int, int, int] | None
    arrays: list[ArrayRecord]
    scalars: list[tuple[int, int, float]]  # (step, name id, value)
    new_layers: list[tuple[Any, ...]]  # rows of schema.LAYER_DTYPE
    new_scalar_names: list[str]
    # (step, name id, function): scalars computed on the writer thread, off the
    # training thread (for example a singular value of a weight copy)
    deferred_scalars: list[tuple[int, int, Callable[[], float]]] = dataclasses.field(default_factory=list)
    # functions to call before reading ``arrays``: waits for device-to-host copies still
    # in flight (capture.host), so that the training thread never waits for them
    ready: list[Callable[[], None]] = dataclasses.field(default_factory=list)


class TraceWriter:
    """Owns the trace file and the thread that writes it.

    ``submit`` never touches the disk; it blocks only when ``queue_size``
    records are already waiting (bounded memory). After a write error or when
    ``max_bytes`` is reached, recording stops with one warning and ``submit``
    returns False; the caller keeps training.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        config: dict[str, Any],
        *,
        queue_size: int = 4,
        max_bytes: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.failed: str | None = None  # why recording stopped (write error or max_bytes)
        self._io_error = False
        self._bytes = 0
        self._queue: queue.Queue[StepRecord | None] = queue.Queue(maxsize=queue_size)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # the path, unless another run writes there (claim.py); held until the file is closed
        self.path, self._lock = claim.claim(self.path)
        # No chunk cache: records are appended once and never read back here, so
        # caching their chunks only adds a copy and moves the disk work into the
        # flushes (15-25% of the writer's time per record, H=64 to H=512)
        try:
            self._file = _create_file(self.path)
        except BaseException:
            claim.release(self._lock)
            raise
        try:
            self._create(config)
        except BaseException:
            self._file.close()
            claim.release(self._lock)
            raise
        self._counts = [0] * schema.COMMIT_SIZE
        names = list(schema.TABLES) + list(schema.HEAPS)
        self._dsets = {name: self._file[name].id for name in names}
        self._lengths = dict.fromkeys(names, 0)
        # HDF5 memory types of the appended arrays, made once (h5py makes one per call,
        # ~30-90 us for the compound tables)
        self._mtypes: dict[tuple[str, np.dtype[Any]], Any] = {}
        self._commit = self._file["commit"]
        self._heap_len = [0] * len(schema.HEAPS)
        self._thread = threading.Thread(target=self._run, name="seqscope-writer", daemon=True)
        self._thread.start()
        self._closed = False

    # ---- set-up ------------------------------------------------------------
    def _create(self, config: dict[str, Any]) -> None:
        f = self._file
        f.attrs["format"] = schema.FORMAT_NAME
        f.attrs["version"] = schema.SCHEMA_VERSION
        f.attrs["created"] = time.time()
        f.attrs["config"] = json.dumps(config, default=str)
        for name, (dtype, _) in schema.TABLES.items():
            f.create_dataset(
                name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(schema.TABLE_CHUNK,)
            )
        for name, heap_dtype in zip(schema.HEAPS, schema.HEAP_DTYPES):
            f.create_dataset(
                name, shape=(0,), maxshape=(None,), dtype=heap_dtype, chunks=(schema.HEAP_CHUNK,)
            )
        f.create_dataset("commit", data=np.zeros(schema.COMMIT_SIZE, dtype=np.int64))
        f.flush()
        f.swmr_mode = True

    # ---- training-thread side ---------------------------------------------------
    def submit(self, record: StepRecord) -> bool:
        if self.failed is not None or self._closed:
            return False
        self._queue.put(record)
        return True

    def close(self) -> None:
        """Write what is queued, mark the file closed cleanly, close it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        try:
            if not self._io_error:
                self._counts[schema.COMMIT_CLOSED] = 1
                self._file["commit"][...] = np.asarray(self._counts, dtype=np.int64)
                self._file.flush()
        except Exception as exc:  # noqa: BLE001 - a failing close must not raise into training
            log.warning("seqscope: could not mark %s as closed: %s", self.path, one_line(exc))
        finally:
            if self._io_error:
                _keep_open([self._file, self._file.id, self._commit, self._commit.id, *self._dsets.values()])
            else:
                try:
                    self._file.close()
                except Exception as exc:  # noqa: BLE001
                    log.warning("seqscope: closing %s failed: %s", self.path, one_line(exc))
                claim.release(self._lock)  # after a write error the lock stays with the handles

    # ---- writer thread -------------------------------------------------------------
    def drain(self) -> None:
        """Block until every submitted record is written (for benchmarks and tests)."""
        if self._closed:
            return  # close() wrote everything; no thread would take the flush
        self._queue.put(_FLUSH)  # ends the writer's wait for more records now
        self._queue.join()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            try:
                self._gather(batch)
                records = [r for r in batch if isinstance(r, StepRecord)]
                if records and self.failed is None:
                    self._write(records)
            except Exception as exc:  # noqa: BLE001 - disk full, I/O errors: stop recording
                self._io_error = True
                self.failed = one_line(exc)
                log.warning(
                    "seqscope: writing %s failed (%s); recording stopped, training goes on",
                    self.path,
                    self.failed,
                )
            finally:
                for _ in batch:
                    self._queue.task_done()
            if batch[-1] is None:
                return

    def _gather(self, batch: list[Any]) -> None:
        """Group commit: the records that queued up while the last group was written,
        and those that arrive within ``_WINDOW`` seconds of the group's first, go to the
        file together, with one pair of flushes. Each record's own work (waiting for
        its device copies, computing its deferred scalars) runs as it arrives: the
        window never leaves this thread idle while there is work, which matters where
        that work is what bounds the recording rate (sigma_max at H=512 on a GPU)."""
        deadline = time.monotonic() + _WINDOW
        while True:
            if self.failed is None:  # after a failure nothing more is written
                self._prepare(batch[-1])
            if batch[-1] is None or batch[-1] is _FLUSH or len(batch) >= _GROUP_MAX:
                return
            wait = deadline - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait())
            except queue.Empty:
                return

    def _prepare(self, record: Any) -> None:
        """Wait for a record's device-to-host copies, then compute its deferred
        scalars (in that order: they read the copies). Once per record."""
        if not isinstance(record, StepRecord):
            return
        for wait in record.ready:  # device-to-host copies still in flight
            wait()
        record.ready = []
        for step, name_id, compute in record.deferred_scalars:
            try:
                value = float(compute())
            except Exception:  # noqa: BLE001 - a failed statistic is recorded as NaN
                value = float("nan")
            record.scalars.append((step, name_id, value))
        record.deferred_scalars = []

    def _append(self, name: str, rows: np.ndarray, counter: int | None) -> int:
        """Append rows to a 1-D dataset through h5py's low-level API (a quarter
        of the high-level call's cost, which matters: this thread competes with
        training for the GIL and the cores)."""
        dset = self._dsets[name]
        start = self._lengths[name]
        count = len(rows)
        if count:
            dset.set_extent((start + count,))
            fspace = dset.get_space()
            fspace.select_hyperslab((start,), (count,))
            key = (name, rows.dtype)
            mtype = self._mtypes.get(key)
            if mtype is None:  # what h5py would build on every call: built once per dataset
                mtype = self._mtypes[key] = h5t.py_create(rows.dtype)
            dset.write(h5s.create_simple((count,)), fspace, np.ascontiguousarray(rows), mtype=mtype)
            self._lengths[name] = start + count
        if counter is not None:
            self._counts[counter] = start + count
        self._bytes += rows.nbytes
        return start

    def _write(self, records: Sequence[StepRecord]) -> None:
        """Append records in order and commit them together."""
        if self.max_bytes is not None:
            size = 0
            for n, record in enumerate(records):
                size += sum(a.data.nbytes for a in record.arrays)
                if self._bytes + size > self.max_bytes:
                    self.failed = f"max_bytes={self.max_bytes} reached"
                    log.warning(
                        "seqscope: trace %s reached max_bytes=%d; recording stopped, training goes on",
                        self.path,
                        self.max_bytes,
                    )
                    records = records[:n]
                    break
            if not records:
                return
        for record in records:
            self._prepare(record)  # where _gather has not
        new_layers = [row for r in records for row in r.new_layers]
        if new_layers:
            self._append("layers", np.array(new_layers, dtype=schema.LAYER_DTYPE), schema.COMMIT_LAYERS)
        new_names = [n.encode() for r in records for n in r.new_scalar_names]
        if new_names:
            self._append("scalar_names", np.array(new_names, schema.SCALAR_NAME_DTYPE), schema.COMMIT_SCALAR_NAMES)
        index_rows = self._write_arrays([a for r in records for a in r.arrays])
        if len(index_rows):
            self._append("index", index_rows, schema.COMMIT_INDEX)
        scalars = [row for r in records for row in r.scalars]
        if scalars:
            self._append("scalars", np.array(scalars, schema.SCALAR_DTYPE), schema.COMMIT_SCALARS)
        step_rows = [r.step_row for r in records if r.step_row is not None]
        if step_rows:
            self._append("steps", np.array(step_rows, schema.STEP_DTYPE), schema.COMMIT_STEPS)
        # Data first, then the counters that make it visible: a kill between the
        # two flushes loses these records, never corrupts an earlier one.
        self._file.flush()
        self._commit.id.write(h5s.create_simple((schema.COMMIT_SIZE,)), self._commit.id.get_space(),
                              np.asarray(self._counts, dtype=np.int64))
        self._file.flush()

    def _write_arrays(self, arrays: Sequence[ArrayRecord]) -> np.ndarray:
        """Concatenate all arrays of a record per heap: one append per heap."""
        n = len(arrays)
        steps = np.empty(n, np.int64)
        layers = np.empty(n, np.int32)
        fields = np.empty(n, np.int16)
        heaps = np.empty(n, np.int8)
        offsets = np.empty(n, np.int64)
        shapes = np.ones((n, 4), np.int32)
        ndims = np.empty(n, np.int8)
        phases = np.empty(n, np.int8)
        per_heap: dict[int, list[np.ndarray]] = {}
        heap_len = list(self._heap_len)
        for i, rec in enumerate(arrays):
            heap = schema.HEAP_ID[rec.data.dtype]
            steps[i] = rec.step
            layers[i] = rec.layer
            fields[i] = schema.FIELD_ID[rec.field]
            heaps[i] = heap
            offsets[i] = heap_len[heap]
            shapes[i, : rec.data.ndim] = rec.data.shape
            ndims[i] = rec.data.ndim
            phases[i] = rec.phase
            heap_len[heap] += rec.data.size
            per_heap.setdefault(heap, []).append(rec.data.reshape(-1))
        for heap, parts in per_heap.items():
            data = np.concatenate(parts) if len(parts) > 1 else parts[0]
            start = self._append(schema.HEAPS[heap], data, None)
            if start != self._heap_len[heap]:
                raise RuntimeError("heap offsets out of step with the file")
            self._heap_len[heap] = start + data.size
        index = np.empty(n, dtype=schema.INDEX_DTYPE)
        index["step"], index["layer"], index["field"], index["heap"] = steps, layers, fields, heaps
        index["offset"], index["shape"], index["ndim"], index["phase"] = offsets, shapes, ndims, phases
        return index
