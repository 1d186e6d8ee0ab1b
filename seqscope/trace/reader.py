"""Read a seqscope trace: ``seqscope.open(path)`` returns a :class:`Trace`.

The reader loads only the small tables (layers, steps, index, scalars) and reads
each array on demand, so opening a large trace is fast. It sees only rows that
the writer committed, which makes a trace whose writer crashed, or that is
still being written, readable as of its last complete step.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

from seqscope.errors import (
    NotATraceError,
    NotInTraceError,
    TraceCorruptError,
    TraceError,
    TraceNotFoundError,
    TraceVersionError,
)
from seqscope.trace import schema


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One recorded layer (one direction of one layer of a recurrent module)."""

    id: int
    name: str
    module: str
    kind: str
    layer: int
    direction: int
    input_size: int
    hidden_size: int
    output_size: int
    custom_gates: tuple[str, ...] = ()

    @property
    def gate_names(self) -> tuple[str, ...]:
        return self.custom_gates or schema.GATE_NAMES.get(self.kind, ())


class Series(NamedTuple):
    """A scalar over training steps."""

    steps: np.ndarray  # int64 [record]
    values: np.ndarray  # float64 [record]


class Trace:
    """A recorded trace. Arrays come back as numpy masked arrays whose padded
    timesteps (sequences shorter than the batch's longest) are masked."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise TraceNotFoundError(f"trace not found: {self.path}")
        if self.path.is_dir():
            raise NotATraceError(f"{self.path} is a directory, not a trace file")
        try:
            is_hdf5 = h5py.is_hdf5(self.path)
        except OSError as exc:
            raise NotATraceError(f"cannot read {self.path}: {exc}") from None
        if not is_hdf5:
            raise NotATraceError(f"{self.path} is not an HDF5 file, so not a seqscope trace")
        self._file = self._open_file()
        self._identity = self._file_identity()
        self._abspath = os.path.abspath(self.path)  # replaced() asks about this path, whatever the cwd later
        try:
            self._check_header()
            self.refresh()
        except TraceError:
            self._file.close()
            raise
        except Exception as exc:  # noqa: BLE001 - h5py raises many types on damaged files
            self._file.close()
            raise TraceCorruptError(f"{self.path} is damaged: {type(exc).__name__}: {exc}") from None

    def _open_file(self) -> h5py.File:
        errors = []
        for kwargs in ({"swmr": True}, {}):
            try:
                return h5py.File(self.path, "r", **kwargs)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
        raise TraceCorruptError(f"cannot open {self.path}: {errors[-1]}")

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.fstat(self._file.id.get_vfd_handle())
        except Exception:  # noqa: BLE001 - a driver without a file descriptor
            return None
        return st.st_dev, st.st_ino

    def replaced(self) -> bool:
        """True when the path now names another file than the one open here: a new
        run started on the same path (``watch`` replaces an earlier trace rather
        than overwrite it, so this one stays readable). Open the path again to
        read the new run."""
        if self._identity is None:
            return False
        try:
            st = os.stat(self._abspath)
        except OSError:
            return False  # removed, and the new file not there yet
        return (st.st_dev, st.st_ino) != self._identity

    def _check_header(self) -> None:
        attrs = self._file.attrs
        if attrs.get("format") != schema.FORMAT_NAME:
            raise NotATraceError(f"{self.path} is an HDF5 file but not a seqscope trace")
        version = int(attrs.get("version", -1))
        if version > schema.SCHEMA_VERSION:
            raise TraceVersionError(
                f"{self.path} uses trace schema version {version}; this seqscope reads up to "
                f"{schema.SCHEMA_VERSION}: upgrade seqscope"
            )
        if version < 1:
            raise TraceCorruptError(f"{self.path} has an invalid schema version {version}")
        self.schema_version = version
        self.config: dict[str, Any] = json.loads(attrs.get("config", "{}"))

    # ---- loading -----------------------------------------------------------------
    def refresh(self) -> None:
        """Pick up steps committed since the trace was opened (live traces)."""
        try:
            self._load()
        except TraceError:
            raise
        except Exception as exc:  # noqa: BLE001 - h5py raises many types on damaged files
            raise TraceCorruptError(f"{self.path} is damaged: {type(exc).__name__}: {exc}") from None

    def _load(self) -> None:
        f = self._file
        commit_ds = f["commit"]
        if hasattr(commit_ds, "refresh"):
            commit_ds.refresh()
        commit = np.asarray(commit_ds[...], dtype=np.int64)
        if commit.shape != (schema.COMMIT_SIZE,):
            raise TraceCorruptError(f"{self.path}: commit table has shape {commit.shape}")
        self.closed_cleanly = bool(commit[schema.COMMIT_CLOSED])
        tables: dict[str, np.ndarray] = {}
        for name, (dtype, counter) in schema.TABLES.items():
            dset = f[name]
            dset.refresh()
            n = int(commit[counter])
            if n < 0 or n > dset.shape[0]:
                raise TraceCorruptError(f"{self.path}: table {name} has {dset.shape[0]} rows, {n} committed")
            tables[name] = np.asarray(dset[:n]) if n else np.zeros(0, dtype)
        for heap in schema.HEAPS:
            f[heap].refresh()
        self._layers = [
            LayerInfo(
                id=i,
                name=row["name"].decode(),
                module=row["module"].decode(),
                kind=row["kind"].decode(),
                layer=int(row["layer"]),
                direction=int(row["direction"]),
                input_size=int(row["input_size"]),
                hidden_size=int(row["hidden_size"]),
                output_size=int(row["output_size"]),
                custom_gates=tuple(n for n in row["gates"].decode().split(",") if n),
            )
            for i, row in enumerate(tables["layers"])
        ]
        self._layer_by_name = {info.name: info for info in self._layers}
        self._step_table = tables["steps"]
        self._scalar_names = [n.decode() for n in tables["scalar_names"]]
        self._scalar_rows = tables["scalars"]
        index = tables["index"]
        self._index: dict[tuple[int, int, int, int], np.void] = {
            (int(r["step"]), int(r["layer"]), int(r["field"]), int(r["phase"])): r for r in index
        }

    # ---- context manager -----------------------------------------------------------
    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Trace({str(self.path)!r}, steps={len(self.steps)}, layers={self.layers})"

    # ---- tables ---------------------------------------------------------------------
    @property
    def steps(self) -> np.ndarray:
        """Recorded training steps, ascending (int64)."""
        table = self._step_table
        return np.asarray(table["step"][table["phase"] == schema.PHASE_TRAIN], dtype=np.int64)

    @property
    def eval_steps(self) -> np.ndarray:
        """Step numbers of recorded evaluation passes (forwards under torch.no_grad();
        read them with ``phase="eval"``)."""
        table = self._step_table
        return np.asarray(table["step"][table["phase"] == schema.PHASE_EVAL], dtype=np.int64)

    @property
    def step_table(self) -> np.ndarray:
        """One row per recorded step: see schema.STEP_DTYPE."""
        return self._step_table.copy()

    @property
    def layers(self) -> list[str]:
        return [info.name for info in self._layers]

    def layer_info(self, layer: str) -> LayerInfo:
        try:
            return self._layer_by_name[layer]
        except KeyError:
            raise NotInTraceError(
                f"layer {layer!r} is not in the trace; it has {self.layers}"
            ) from None

    def scalars(self) -> dict[str, Series]:
        """Every logged scalar over steps: loss, grad_norm, grad_norm/<param>,
        sigma_max/<layer> and whatever was passed to ``scope.log``."""
        out: dict[str, Series] = {}
        rows = self._scalar_rows
        for name_id, name in enumerate(self._scalar_names):
            sel = rows[rows["name"] == name_id]
            order = np.argsort(sel["step"], kind="stable")
            out[name] = Series(sel["step"][order].astype(np.int64), sel["value"][order].astype(np.float64))
        return out

    # ---- arrays ---------------------------------------------------------------------
    def _read(self, layer: str, step: int, field: str, phase: str = "train") -> np.ndarray:
        info = self.layer_info(layer)
        key = (int(step), info.id, schema.FIELD_ID[field], _phase(phase))
        row = self._index.get(key)
        if row is None:
            known = self.steps if phase == "train" else self.eval_steps
            if int(step) not in set(known.tolist()):
                what = "step" if phase == "train" else "evaluation pass at step"
                raise NotInTraceError(f"{what} {step} is not in the trace (recorded: {_summary(known)})")
            raise NotInTraceError(f"no {field} recorded for layer {layer!r} at step {step} ({phase})")
        heap = schema.HEAPS[int(row["heap"])]
        ndim = int(row["ndim"])
        shape = tuple(int(s) for s in row["shape"][:ndim])
        size = int(np.prod(shape))
        offset = int(row["offset"])
        try:
            dset = self._file[heap]
            if offset < 0 or size < 0 or offset + size > dset.shape[0]:
                raise TraceCorruptError(f"{self.path}: {field} of {layer} at step {step} lies outside the data")
            data = np.asarray(dset[offset : offset + size]).reshape(shape)
        except TraceError:
            raise
        except Exception as exc:  # noqa: BLE001 - h5py raises many types on damaged files
            raise TraceCorruptError(f"{self.path}: cannot read {field} of {layer} at step {step}: {exc}") from None
        if data.dtype == np.float16:
            data = data.astype(np.float32)
        return data

    def lengths(self, layer: str, step: int, phase: str = "train") -> np.ndarray:
        """Valid timesteps of each stored sequence [sequence]."""
        return self._read(layer, step, schema.FIELD_LENGTHS, phase)

    def sequence_index(self, layer: str, step: int, phase: str = "train") -> np.ndarray:
        """Batch index of each stored sequence [sequence]."""
        return self._read(layer, step, schema.FIELD_SEQUENCE_INDEX, phase)

    def _masked(self, layer: str, step: int, field: str, phase: str = "train") -> np.ma.MaskedArray:
        data = self._read(layer, step, field, phase)
        lengths = self.lengths(layer, step, phase)
        n_time = data.shape[1]
        valid = np.arange(n_time)[None, :] < lengths[:, None]  # [sequence, time]
        mask = np.broadcast_to(~valid.reshape(valid.shape + (1,) * (data.ndim - 2)), data.shape)
        return np.ma.MaskedArray(data, mask=mask.copy())

    def hidden(self, layer: str, step: int, phase: str = "train") -> np.ma.MaskedArray:
        """h_t [sequence, time, unit]. ``phase="eval"`` reads an evaluation pass."""
        return self._masked(layer, step, schema.FIELD_HIDDEN, phase)

    def cell(self, layer: str, step: int, phase: str = "train") -> np.ma.MaskedArray:
        """c_t [sequence, time, unit] (LSTM layers, and user cells with a second state tensor)."""
        info = self.layer_info(layer)
        if info.kind == schema.KIND_CUSTOM and self.has(layer, step, schema.FIELD_CELL, phase):
            return self._masked(layer, step, schema.FIELD_CELL, phase)
        if info.kind != schema.KIND_LSTM:
            raise NotInTraceError(f"layer {layer!r} is not an LSTM layer: it has no cell state")
        return self._masked(layer, step, schema.FIELD_CELL, phase)

    def gates(self, layer: str, step: int, phase: str = "train") -> dict[str, np.ma.MaskedArray]:
        """Activated gates, each [sequence, time, unit]: input/forget/cell/output
        (LSTM), reset/update/new (GRU); empty for a plain RNN."""
        names = self.layer_info(layer).gate_names
        if not names:
            return {}
        stacked = self._masked(layer, step, schema.FIELD_GATES, phase)
        return {name: stacked[:, :, i, :] for i, name in enumerate(names)}

    def grad_norms(self, layer: str, step: int) -> dict[str, np.ma.MaskedArray]:
        """Total BPTT gradient norms [sequence, time]: ``hidden`` = ||dL/dh_t||,
        ``cell`` = ||dL/dc_t|| (LSTM)."""
        out = {"hidden": self._masked(layer, step, schema.FIELD_GRAD_HIDDEN)}
        if self.layer_info(layer).kind == schema.KIND_LSTM or self.has(layer, step, schema.FIELD_GRAD_CELL):
            out["cell"] = self._masked(layer, step, schema.FIELD_GRAD_CELL)
        return out

    def propagation(self, layer: str, step: int) -> np.ma.MaskedArray:
        """||(dh_T/dh_t)^T v|| [sequence, time]; 1.0 at the timestep where the
        layer's direction ends (the last valid timestep forward, t=0 reverse)."""
        return self._masked(layer, step, schema.FIELD_PROPAGATION)

    def has(self, layer: str, step: int, field: str, phase: str = "train") -> bool:
        info = self.layer_info(layer)
        return (int(step), info.id, schema.FIELD_ID[field], _phase(phase)) in self._index

    def info(self) -> dict[str, Any]:
        """A summary of what the trace holds."""
        steps = self.steps
        return {
            "path": str(self.path),
            "schema_version": self.schema_version,
            "closed_cleanly": self.closed_cleanly,
            "bytes": self.path.stat().st_size,
            "recorded_steps": len(steps),
            "evaluation_passes": len(self.eval_steps),
            "first_step": int(steps[0]) if len(steps) else None,
            "last_step": int(steps[-1]) if len(steps) else None,
            "layers": [dataclasses.asdict(info) for info in self._layers],
            "scalars": list(self._scalar_names),
        }


def _phase(phase: str) -> int:
    try:
        return schema.PHASES[phase]
    except KeyError:
        raise ValueError(f"phase must be one of {sorted(schema.PHASES)}, got {phase!r}") from None


def _summary(steps: np.ndarray) -> str:
    if len(steps) == 0:
        return "none"
    if len(steps) <= 6:
        return ", ".join(str(int(s)) for s in steps)
    return f"{int(steps[0])}, {int(steps[1])}, ... {int(steps[-1])} ({len(steps)} in all)"


def open_trace(path: str | os.PathLike[str]) -> Trace:
    """Open a trace for reading. Raises a :class:`seqscope.errors.TraceError`
    subclass with a one-line message on anything that is not a readable trace."""
    return Trace(path)
