"""The dashboard's data source: one trace, read on demand, cached per layer.

The app is handed this object (``create_app(source)``), never a path from the
browser: nothing typed into the page can reach another file. All trace access
goes through one lock (Dash serves callbacks from several threads).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from seqscope.diagnose import diagnose
from seqscope.errors import NotInTraceError
from seqscope.trace import schema
from seqscope.trace.reader import Trace, open_trace


class TraceSource:
    def __init__(self, path: str) -> None:
        self.path = path
        self.trace: Trace = open_trace(path)
        self._lock = threading.RLock()
        self._grad_cache: dict[str, tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        self._findings: list[dict[str, Any]] | None = None
        self._findings_empty = False  # whether they were found on a trace without recorded steps
        self.findings_version = 0  # bumped whenever a diagnosis finishes
        self._diagnosing = False
        self._diagnoses_wanted = 0
        # bumped when a new run replaced the trace at the path and the source moved to it
        self.run = 0
        self.start_diagnosis()

    # ---- live -----------------------------------------------------------------------
    def refresh(self) -> bool:
        """Pick up newly committed steps, or move to a new run written to the same
        path (``self.run`` goes up); True when either happened."""
        with self._lock:  # one thread moves to the new run (Dash serves several)
            if self.trace.replaced():
                try:
                    new = open_trace(self.path)
                except Exception:  # noqa: BLE001 - the new run's file is being created: next time
                    return False
                old, self.trace = self.trace, new
                old.close()
                self._grad_cache.clear()
                self._findings = None
                self.findings_version += 1
                self.run += 1
                moved = True
            else:
                moved = False
        if moved:
            self.start_diagnosis()
            return True
        with self._lock:
            before = len(self.trace.steps)
            try:
                self.trace.refresh()
            except Exception:  # noqa: BLE001 - a half-written moment: keep what we have
                return False
            grew = len(self.trace.steps) != before
        if grew:
            self.start_diagnosis()
        return grew

    # ---- tables ---------------------------------------------------------------------
    @property
    def steps(self) -> np.ndarray:
        with self._lock:
            return self.trace.steps

    @property
    def layers(self) -> list[str]:
        with self._lock:
            return self.trace.layers

    def kind(self, layer: str) -> str:
        with self._lock:
            return self.trace.layer_info(layer).kind

    def check_layer(self, layer: Any) -> str:
        """A layer name from the browser, validated against the trace."""
        layers = self.layers
        if isinstance(layer, str) and layer in layers:
            return layer
        if not layers:
            raise NotInTraceError("the trace has no layers yet")
        return layers[0]

    def series(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        with self._lock:
            s = self.trace.scalars().get(name)
        return None if s is None else (s.steps, s.values)

    # ---- arrays -----------------------------------------------------------------------
    def grad_matrix(self, layer: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(steps, ||dL/dh_t|| [step, time] median over stored sequences, padding mask)."""
        with self._lock:
            steps = self.trace.steps
            cached = self._grad_cache.get(layer)
            if cached is not None and cached[0] == len(steps):
                return cached[1]
            start = 0
            rows: list[np.ndarray] = []  # per step: the median over stored sequences at each timestep
            pads: list[np.ndarray] = []  # per step: the timesteps that are padding in every stored sequence
            if cached is not None and cached[0] < len(steps):
                old_steps, old_norms, old_mask = cached[1]
                rows, pads = list(old_norms), list(old_mask)
                start = len(old_steps)
            for step in steps[start:]:
                if not self.trace.has(layer, int(step), schema.FIELD_GRAD_HIDDEN):
                    rows.append(np.zeros(0))
                    pads.append(np.zeros(0, bool))
                    continue
                g = self.trace.grad_norms(layer, int(step))["hidden"]
                with np.errstate(all="ignore"):
                    med = np.ma.median(g, axis=0)  # over sequences, padding ignored
                rows.append(np.ma.filled(med.astype(np.float64), np.nan) if np.ma.isMaskedArray(med)
                            else np.asarray(med, dtype=np.float64))
                pads.append(np.asarray(np.ma.getmaskarray(g).all(axis=0)))
            width = max((len(r) for r in rows), default=0)
            norms = np.full((len(rows), width), np.nan)
            mask = np.ones((len(rows), width), bool)
            # padding (a timestep no stored sequence reaches, or beyond a step's last one) and steps
            # without gradients are masked, drawn blank; a real NaN stays NaN and unmasked (magenta)
            for i, (r, pad) in enumerate(zip(rows, pads)):
                norms[i, : len(r)] = r
                mask[i, : len(r)] = pad
            result = (steps.copy(), norms, mask)
            self._grad_cache[layer] = (len(steps), result)
            return result

    def step_data(self, layer: str, step: int) -> dict[str, Any]:
        with self._lock:
            t = self.trace
            out: dict[str, Any] = {"hidden": t.hidden(layer, step)}
            info = t.layer_info(layer)
            if info.kind == schema.KIND_LSTM or t.has(layer, step, schema.FIELD_CELL):
                out["cell"] = t.cell(layer, step)
            out["gates"] = t.gates(layer, step)
            if t.has(layer, step, schema.FIELD_PROPAGATION):
                out["propagation"] = t.propagation(layer, step)
            out["lengths"] = t.lengths(layer, step)
            out["sequence_index"] = t.sequence_index(layer, step)
            return out

    # ---- findings -------------------------------------------------------------------
    def start_diagnosis(self) -> None:
        """Diagnose on a background thread so the page never waits for it."""
        with self._lock:
            self._diagnoses_wanted += 1
            if self._diagnosing:
                return  # the running diagnosis goes round again when it ends
            self._diagnosing = True

        def run() -> None:
            try:
                diagnose_until_current()
            except BaseException:
                with self._lock:
                    self._diagnosing = False
                raise

        def diagnose_until_current() -> None:
            while True:
                with self._lock:
                    wanted = self._diagnoses_wanted
                    try:
                        found = [f.to_dict() for f in diagnose(self.trace)]
                    except Exception as exc:  # noqa: BLE001 - the dashboard shows the error instead
                        found = [{"kind": "diagnosis_failed", "severity": "warning", "layer": None,
                                  "first_step": 0, "last_step": 0, "evidence": {},
                                  "message": f"diagnosis failed: {exc}"}]
                    # an empty list reads differently for a trace without recorded steps (no_findings)
                    empty = not len(self.trace.steps)
                    if found != self._findings or empty != self._findings_empty:
                        self._findings, self._findings_empty = found, empty
                        self.findings_version += 1
                    if wanted == self._diagnoses_wanted:  # nothing new since this one began
                        self._diagnosing = False
                        return

        threading.Thread(target=run, name="seqscope-diagnose", daemon=True).start()

    def findings(self) -> list[dict[str, Any]] | None:
        """Findings as dicts, or None while the first diagnosis is running."""
        return self._findings

    def wait_for_findings(self, timeout: float = 60.0) -> list[dict[str, Any]] | None:
        import time

        deadline = time.monotonic() + timeout
        while self._findings is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self._findings
