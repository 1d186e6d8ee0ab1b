"""``seqscope.watch``: the one object that owns every hook and the trace writer.

Steps. A training step begins with a forward pass of the watched model while
autograd is enabled. Forward passes inside one ``optimizer.step()`` call (the
closure of LBFGS and friends) belong to the step that the first of them began;
only that first pass is recorded. In training mode, forward passes before a
backward pass has reached the model (or an optimizer step has run) belong to the
step in progress (``_before_backward``): a model called once per timestep, or on
two inputs before one loss, runs one step per backward pass.

A training loop need not call the watched model itself: a sequence-to-sequence
loop calls ``model.encoder`` and ``model.decoder`` in turn, and a container
(``nn.ModuleDict``) has no forward at all. Until the watched model's own forward
runs with autograd on, a step begins at the first call of one of its recurrent
layers after the previous step's backward pass reached a recurrent layer, or
after an optimizer step (``enter_layer``). Once the watched model's forward has
run, its calls alone begin steps, as above. ``scope.log(step=n)`` renames the step in
progress to ``n`` and numbering continues from ``n + 1``.

A recorded step is written when the next step begins or when the scope
closes. A step interrupted by an exception is dropped, never half-written.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import itertools
import logging
import math
import os
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from seqscope import schedules
from seqscope.capture import attach, native, spectral
from seqscope.capture import recurrences as rec
from seqscope.capture.cells import CELL_TYPES, CellRecorder, CustomCellRecorder, GatesFn
from seqscope.capture.fused import (
    FUSED_TYPES,
    FusedRecorder,
    LayerCapture,
    layer_names,
    module_kind,
    unsupported_reason,
)
from seqscope.capture.host import copy_to_host
from seqscope.errors import SeqscopeError, UnsupportedModelError
from seqscope.trace import schema
from seqscope.trace.writer import ArrayRecord, StepRecord, TraceWriter, one_line

log = logging.getLogger("seqscope")

_FLOAT_STORAGE = {"float16": torch.float16, "float32": torch.float32}
_PENDING_SCALARS_MAX = 4096  # unrecorded steps' scalars are written in batches of this size
# forward passes of the watched model with autograd on, and no backward pass or optimizer step,
# after which a step ends anyway: a recorded step keeps each cell call's states (an inference loop
# run without torch.no_grad() in training mode would otherwise grow one step without bound)
MAX_FORWARDS_PER_STEP = 10_000

# scopes not closed yet, with the process that opened them: closed at interpreter exit
_OPEN_SCOPES: weakref.WeakKeyDictionary[Scope, int] = weakref.WeakKeyDictionary()


def _close_open_scopes() -> None:
    """At interpreter exit, close the scopes that a script left open (``watch``
    without ``with`` and without ``close()``): the queued records and the scalars
    not written yet go to the file, which is closed cleanly. Without this the
    writer, a daemon thread, died with them. The step in progress is kept unless
    the interpreter exits on an unhandled exception, which may have cut it short.
    A forked child that exits through the interpreter leaves its parent's scopes
    alone (their file is the parent's)."""
    keep = not (hasattr(sys, "last_value") or hasattr(sys, "last_exc"))
    for scope, pid in list(_OPEN_SCOPES.items()):
        if pid != os.getpid():
            continue
        try:
            scope._end(keep_current=keep)
        except Exception:  # noqa: BLE001, S110 - the interpreter is exiting; nothing to tell
            pass


atexit.register(_close_open_scopes)


@dataclasses.dataclass
class StepState:
    """One training step in flight."""

    step: int
    recorded: bool
    wall_time: float
    batch_size: int = 0
    recorded_modules: set[int] = dataclasses.field(default_factory=set)
    # per fused recorder (id): its calls in this step, each given the state the one before
    # it returned (capture.fused: a decoder loop calling nn.GRU once per timestep)
    chains: dict[int, Any] = dataclasses.field(default_factory=dict)
    captures: list[LayerCapture] = dataclasses.field(default_factory=list)
    param_grad_norms: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    handles: list[RemovableHandle] = dataclasses.field(default_factory=list)
    failed: bool = False
    cell_calls: dict[int, Any] = dataclasses.field(default_factory=dict)
    cell_recorders: list[Any] = dataclasses.field(default_factory=list)
    # (module name, function): fused layers' BPTT scans, run when the step is finalized
    pending_scans: list[tuple[str, Callable[[], None]]] = dataclasses.field(default_factory=list)
    repeated_pass: bool = False  # a closure ran the model again within this step
    # a backward pass reached the model's watched parameters since the step began, so the
    # next forward (or, for steps begun at a layer's call, Scope.enter_layer, the next
    # layer call) begins a step
    backward_seen: bool = False
    # gradient hooks that set backward_seen are in place (_watch_backward, _watch_outputs)
    watching_backward: bool = False
    # the step began at the watched model's forward: a backward pass that reaches the model's
    # first or last trainable parameter ends it too (a step begun at a layer's call: only one
    # that reaches a recurrent layer's parameters)
    whole_model: bool = False
    forwards: int = 1  # forward passes of the watched model in this step
    # began with the watched model in eval mode (model.eval()) and autograd on: a
    # validation loop without torch.no_grad() if no backward pass or optimizer step follows
    eval_mode: bool = False
    phase: int = schema.PHASE_TRAIN
    # with watch(grad_scaler=...): the loss scale this step's backward ran with (a
    # tensor copy, read without a device sync) and the optimizer steps seen before it
    grad_scale: Any = None
    optimizer_steps: int = 0

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class Scope:
    """Records a model's recurrent layers into a trace. Use ``seqscope.watch``."""

    def __init__(
        self,
        model: nn.Module,
        path: str | os.PathLike[str],
        *,
        every: int | str | schedules.Schedule = 50,
        sequences: int | Sequence[int] = 8,
        precision: str = "auto",
        max_bytes: int | None = None,
        cells: Sequence[nn.Module] | Mapping[nn.Module, GatesFn | None] | None = None,
        grad_scaler: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise UnsupportedModelError(f"watch() needs a torch.nn.Module, got {type(model).__name__}")
        if grad_scaler is not None and not callable(getattr(grad_scaler, "get_scale", None)):
            raise ValueError(f"grad_scaler= takes a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
        self.grad_scaler = grad_scaler
        self._optimizer_steps = 0
        self.model = model
        # the trace's path; None in a process of a distributed job that records nothing
        self.path: str | None = os.fspath(path)
        self.schedule = schedules.resolve(every)
        if precision not in schema.PRECISIONS:
            raise ValueError(f"precision must be one of {schema.PRECISIONS}, got {precision!r}")
        self.precision = precision
        if isinstance(sequences, int):
            if sequences < 1:
                raise ValueError(f"sequences must be >= 1, got {sequences}")
            self._sequences: int | list[int] = sequences
        else:
            self._sequences = [int(i) for i in sequences]
            if not self._sequences or min(self._sequences) < 0:
                raise ValueError("sequences must be a positive count or a list of batch indices")

        self._recorders: list[FusedRecorder] = []
        self._cell_recorders: list[CellRecorder] = []
        self._custom_recorders: list[CustomCellRecorder] = []
        self._custom_cells: dict[nn.Module, GatesFn | None] = {}
        if cells is not None:
            items = cells.items() if isinstance(cells, Mapping) else ((c, None) for c in cells)
            for cell, fn in items:
                if not isinstance(cell, nn.Module):
                    raise UnsupportedModelError(f"cells= takes the cell modules themselves, got {type(cell).__name__}")
                if fn is not None and not callable(fn):
                    raise UnsupportedModelError("a cell's gates function must be callable (cell, x_t, state) -> dict")
                self._custom_cells[cell] = fn
        self._layer_rows: list[tuple[Any, ...]] = []
        self._find_layers()

        self._scalar_ids: dict[str, int] = {}
        self._new_scalar_names: list[str] = []
        self._new_layers = list(self._layer_rows)
        self._pending_scalars: list[tuple[int, str, Any]] = []
        self._next_step = 0
        self._current: StepState | None = None
        self._eval: StepState | None = None  # an evaluation pass (forward under no_grad) in flight
        # whether the watched model's forward of that pass is running; a recorded pass stays
        # open after it, and the next forward under no_grad that receives one of its outputs
        # (_eval_outputs, weak references) continues it: a model called once per timestep
        self._eval_in_forward = False
        self._eval_outputs: list[weakref.ref[torch.Tensor]] = []
        self._eval_recorded_for: int | None = None
        self._called_again: set[int] = set()  # fused modules warned about: a second call in one step
        # the parameters whose gradient hooks tell that a backward pass reached the model
        # (_watch_backward): each recurrent layer's first trainable one, then the model's first
        # and last; and those hooks, which stay until the parameters are chosen again or close()
        self._backward_params: list[nn.Parameter] = []
        # where each of them is registered: (its module's _parameters, its name there)
        self._backward_slots: list[tuple[dict[str, Any], str, torch.Tensor]] = []
        self._backward_handles: list[RemovableHandle] = []
        self._backward_layer_ids: set[int] = set()  # of those, the recurrent layers' parameters
        self._opt_depth = 0
        self._opt_has_pass = False
        self._handles: list[RemovableHandle] = []
        self._model_handles: list[RemovableHandle] = []
        # until the watched model's forward runs with autograd on, layer calls begin steps
        # (enter_layer); the pre-hooks on cells that report their calls for it
        self.steps_from_layers = True
        self._entry_handles: list[tuple[nn.Module, RemovableHandle]] = []
        self._finalizing = False  # a step's record is being made (_finalize)
        self._closed = False
        self._warned = False
        self._warned_backward = False
        self._warned_eval_mode = False
        self._warned_reentrant = False
        self._warned_forwards = False
        self._warned_transform = False

        config = {
            "every": getattr(self.schedule, "__name__", repr(every)),
            "sequences": self._sequences,
            "precision": precision,
            "torch": torch.__version__,
            "model": type(model).__name__,
            "grad_scaler": grad_scaler is not None,
        }
        self.writer: TraceWriter
        rank, world = distributed_rank()
        if "{rank}" in self.path:
            self.path = self.path.replace("{rank}", str(rank))
        elif rank != 0:
            # another process of a distributed job, whose rank 0 records: nothing to do here
            log.info("seqscope: process %d of %d records nothing (rank 0 does; put {rank} in the path "
                     "to record every process)", rank, world)
            self.path = None
            self._closed = True
            return
        # the hooks first: a model that cannot be watched leaves an earlier trace at the path as it was
        try:
            self._install()
        except BaseException:
            self._uninstall()
            raise
        try:
            self.writer = TraceWriter(self.path, config, max_bytes=max_bytes)
        except OSError as exc:
            self._uninstall()
            raise SeqscopeError(f"cannot write the trace {self.path}: {one_line(exc)}") from exc
        except BaseException:
            self._uninstall()
            raise
        self.path = os.fspath(self.writer.path)  # another path if another run writes to this one
        # build (or load from the cache) the compiled scans now, off the training
        # thread, so that the first recorded step does not wait for the compiler
        native.load_in_background()
        _OPEN_SCOPES[self] = os.getpid()

    # ---- discovery ------------------------------------------------------------------------
    def _find_layers(self) -> None:
        problems = []
        for name, module in self.model.named_modules():
            if isinstance(module, nn.DataParallel) and len(module.device_ids) > 1:
                # its replicas would run seqscope's hooks and forward on the original
                # module's device, from several threads: an error at the first pass
                raise UnsupportedModelError(
                    f"{name or 'the model'} is an nn.DataParallel over {len(module.device_ids)} devices, whose "
                    "replicas seqscope cannot record; use DistributedDataParallel (as PyTorch recommends), which "
                    "seqscope records, or watch the model inside it on one device"
                )
            if not isinstance(module, FUSED_TYPES):
                continue
            reason = unsupported_reason(module)
            if reason:
                problems.append(f"{name or type(module).__name__}: {reason}")
                continue
            display = name or _class_name(module)
            kind = module_kind(module)
            assert isinstance(module, nn.RNNBase)
            ids = {}
            out_size = module.proj_size if getattr(module, "proj_size", 0) > 0 else module.hidden_size
            n_dir = 2 if module.bidirectional else 1
            for k, d, lname in layer_names(display, module):
                ids[(k, d)] = len(self._layer_rows)
                in_size = module.input_size if k == 0 else out_size * n_dir
                self._layer_rows.append(
                    (lname.encode(), display.encode(), kind.encode(), k, d, in_size, module.hidden_size, out_size, b"")
                )
            self._recorders.append(FusedRecorder(self, display, module, ids))
        for name, module in self.model.named_modules():
            if not isinstance(module, CELL_TYPES):
                continue
            display = name or _class_name(module)
            lid = len(self._layer_rows)
            size = module.hidden_size
            ckind = module_kind(module).encode()
            self._layer_rows.append(
                (display.encode(), display.encode(), ckind, 0, 0, module.input_size, size, size, b"")
            )
            self._cell_recorders.append(CellRecorder(self, display, module, lid))
        names = {id(m): n for n, m in self.model.named_modules()}
        for cell, fn in self._custom_cells.items():
            if isinstance(cell, CELL_TYPES + FUSED_TYPES):
                continue  # recorded anyway
            if id(cell) not in names:
                raise UnsupportedModelError(
                    f"cells=: a {type(cell).__name__} that is not a submodule of the watched model; "
                    "pass the module object that the model calls (e.g. model.my_cell)"
                )
            if cell is self.model:
                # the watched model's forward begins training steps, and its hooks would see
                # seqscope's own re-runs of the cell for its propagation profile
                raise UnsupportedModelError(
                    "cells=: the watched model itself; watch the module whose forward runs the loop "
                    "over timesteps, or a model that contains the cell"
                )
            display = names[id(cell)] or type(cell).__name__.lower()
            self._custom_recorders.append(CustomCellRecorder(self, display, cell, fn))
        if problems:
            raise UnsupportedModelError("cannot record: " + "; ".join(problems))
        if not self._recorders and not self._cell_recorders and not self._custom_recorders:
            # a recurrent layer compiled with TorchScript is a ScriptModule: no hooks, no Python forward
            scripted = [name or "the model" for name, module in self.model.named_modules()
                        if isinstance(module, torch.jit.ScriptModule)
                        and getattr(module, "original_name", "") in {t.__name__ for t in (*FUSED_TYPES, *CELL_TYPES)}]
            hint = (f"; {', '.join(scripted)} is compiled with TorchScript (torch.jit.script or trace), whose "
                    "modules seqscope cannot record: watch the model unscripted (script it after training)"
                    if scripted else "")
            raise UnsupportedModelError(
                "no recurrent layer (nn.RNN, nn.GRU, nn.LSTM, nn.RNNCell, nn.GRUCell, nn.LSTMCell) "
                f"found in {getattr(self.model, 'original_name', type(self.model).__name__)}{hint}"
            )

    def _install(self) -> None:
        for r in self._recorders:
            r.install()
        # cell hooks are installed per recorded step (_sync_cell_hooks)
        # noted in attach: copy.deepcopy(model) and torch.save(model) leave them out
        m = self.model
        self._model_handles = [attach.hook_added(m, m.register_forward_pre_hook(self._on_model_forward,
                                                                                with_kwargs=True)),
                               attach.hook_added(m, m.register_forward_hook(self._on_model_forward_end,
                                                                            with_kwargs=True))]
        # fused layers call enter_layer from their forward; cells report their calls here
        for c in (*self._cell_recorders, *self._custom_recorders):
            handle = c.module.register_forward_pre_hook(self._on_cell_entry)
            self._entry_handles.append((c.module, attach.hook_added(c.module, handle)))
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._handles.append(register_optimizer_step_pre_hook(self._on_optimizer_pre))
        self._handles.append(register_optimizer_step_post_hook(self._on_optimizer_post))

    def _sync_cell_hooks(self) -> None:
        """Forward hooks on cells exist only while a recorded step or evaluation
        pass is in progress: on other steps a cell call costs nothing (a forward
        hook costs every call ~7 us, 0.7 ms per step of a 100-step cell loop)."""
        wanted = not self._closed and any(s is not None and s.recorded for s in (self._current, self._eval))
        for c in (*self._cell_recorders, *self._custom_recorders):
            if wanted:
                c.install()
            else:
                c.remove()

    def _uninstall(self) -> None:
        for r in self._recorders:
            r.remove()
        for c in self._cell_recorders:
            c.remove()
        for u in self._custom_recorders:
            u.remove()
        for h in self._model_handles:
            attach.hook_removed(self.model, h)
        self._model_handles.clear()
        self._stop_steps_from_layers()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._unhook_backward_params()
        if self._current is not None:
            self._current.remove_hooks()

    # ---- step boundaries ----------------------------------------------------------------------
    def _on_optimizer_pre(self, *_: Any) -> None:
        self._opt_depth += 1
        if self._opt_depth == 1:
            self._opt_has_pass = False
            self._optimizer_steps += 1

    def _on_optimizer_post(self, *_: Any) -> None:
        self._opt_depth = max(0, self._opt_depth - 1)

    @torch.compiler.disable  # seqscope's own code is never traced by torch.compile
    def _on_model_forward(self, module: nn.Module, args: Any, kwargs: Any = None) -> None:
        if self._closed or rec.in_backward():
            return  # a recomputation inside backward (activation checkpointing) is no new step
        if rec.in_transform():
            self._say_transform()
            return
        if self._eval is not None:
            if not self._eval_in_forward and not torch.is_grad_enabled() and self._continues_eval(args, kwargs):
                self._eval.forwards += 1
                self._eval_in_forward = True
                return  # the model called again on its own output under no_grad: the same pass
            self._end_eval()
        if not torch.is_grad_enabled():
            self._begin_eval()
            return
        if self.steps_from_layers:
            self._stop_steps_from_layers()  # the model's own calls begin steps from now on
            current = self._current  # until now every step began at a layer call (enter_layer)
            if current is not None and self._untouched(current):
                # layer calls before the model's first forward, with no backward pass or
                # optimizer step since (a shape probe at set-up): no step; numbering as without them
                current.remove_hooks()
                self._current = None
                self._next_step = current.step
        if self._opt_depth > 0:
            if self._opt_has_pass and self._current is not None:
                self._current.repeated_pass = True
                return  # another closure evaluation of the same optimizer step
            self._opt_has_pass = True
        elif module.training and self._current is not None and self._before_backward(self._current):
            self._current.forwards += 1
            if self._current.forwards <= MAX_FORWARDS_PER_STEP:
                return  # the model called again before the step's backward pass: the same step
            self._say_forwards_without_backward()
        self._begin_step()
        if self._current is not None:
            self._current.eval_mode = not module.training
            self._watch_backward(self._current, whole_model=True)

    def _say_transform(self) -> None:
        if self._warned_transform:
            return
        self._warned_transform = True
        log.warning("seqscope: the watched model ran inside a torch.func transform (grad, vjp, jacrev, vmap, ...); "
                    "such passes compute on wrapped tensors that seqscope cannot record, and are left out: they "
                    "begin no step, and the steps around them are recorded as usual (said once)")

    def _say_forwards_without_backward(self) -> None:
        if self._warned_forwards:
            return
        self._warned_forwards = True
        log.warning("seqscope: the watched model ran %d forward passes with autograd on and no backward pass or "
                    "optimizer step between them; seqscope begins a new step here (and every %d such passes) so "
                    "that its record stays bounded. Run inference under torch.no_grad() (said once)",
                    MAX_FORWARDS_PER_STEP, MAX_FORWARDS_PER_STEP)

    def _before_backward(self, step: StepState) -> bool:
        """Whether ``step`` (begun by a training-mode forward of the watched model)
        is still before its backward pass: no backward pass has reached the model and
        no optimizer step has run since it began. A model called once per timestep, or
        on two inputs before one backward pass (a siamese network, two views of a
        batch), runs one step. A step in eval mode (a validation loop without
        torch.no_grad()), and one whose model has no trainable parameter to watch, end
        at the next forward as before."""
        return step.watching_backward and not step.eval_mode and self._untouched(step)

    def _untouched(self, step: StepState) -> bool:
        """Neither a backward pass (that seqscope's hooks saw) nor an optimizer step
        since ``step`` began."""
        return not step.backward_seen and step.optimizer_steps == self._optimizer_steps

    def _stop_steps_from_layers(self) -> None:
        self.steps_from_layers = False
        for module, handle in self._entry_handles:
            attach.hook_removed(module, handle)
        self._entry_handles.clear()

    @torch.compiler.disable  # seqscope's own code is never traced by torch.compile
    def _on_cell_entry(self, module: nn.Module, args: Any) -> None:
        self.enter_layer()

    @torch.compiler.disable  # seqscope's own code is never traced by torch.compile
    def enter_layer(self) -> None:
        """A recurrent layer is called while the watched model's own forward has never
        run with autograd on (the loop calls its parts, or the model is a container):
        the call begins a step unless it belongs to the step in progress, that is,
        unless that step has seen neither a backward pass through a recurrent layer
        nor an optimizer step. Inside ``optimizer.step(closure)``, the closure's first
        layer call begins the step; calls after its backward pass are later
        evaluations of the same step. Calls under ``no_grad`` are not recorded here:
        evaluation passes are recorded when they call the watched model."""
        if self._closed or self._finalizing or not torch.is_grad_enabled() or rec.in_transform():
            return
        if rec.in_backward():
            if self._current is None and not self._warned_reentrant:
                # the layer's forward ran under no_grad, and runs again only now: a reentrant
                # checkpoint in a loop that never calls the watched model (no step ever begins)
                self._warned_reentrant = True
                log.warning(
                    "seqscope: a recurrent layer ran for the first time inside a backward pass "
                    "(torch.utils.checkpoint with use_reentrant=True, in a loop that does not call the watched "
                    "model): nothing is recorded; checkpoint with use_reentrant=False, or call the watched model")
            return
        current = self._current
        if self._opt_depth > 0:
            if self._opt_has_pass:
                if current is not None and current.backward_seen:
                    current.repeated_pass = True
                return
            self._opt_has_pass = True
        elif current is not None and self._untouched(current):
            return
        self._begin_step()
        if self._current is not None:
            self._watch_backward(self._current)

    def _watch_backward(self, step: StepState, whole_model: bool = False) -> None:
        """Note ``step`` as watching for its backward pass: a gradient hook on each
        recurrent layer's first trainable parameter (and with ``whole_model``, on the
        model's first and last trainable parameters, for recurrent layers that are
        frozen) sets ``backward_seen`` on the step in progress when a backward pass
        reaches it. The hooks stay from step to step: the parameters are chosen once,
        and again when one of them no longer requires grad or is no longer its module's
        (torch.func.functional_call runs the model on tensors of the caller's, in the
        modules' places; choosing walked the model's parameters, ~20 us, and registering
        and removing hooks each step cost ~25 us of an unrecorded step's ~140 us)."""
        params = self._backward_params
        if not params or not all(p.requires_grad for p in params) \
                or not all(slots.get(name) is p for slots, name, p in self._backward_slots):
            self._hook_backward_params()
            params = self._backward_params
        step.whole_model = whole_model
        if params and (whole_model or self._backward_layer_ids):
            step.watching_backward = True

    def _hook_backward_params(self) -> None:
        """Choose the parameters of _watch_backward and hook them (their earlier hooks
        removed). A parameter that takes no hook (a subclass) costs that signal only."""
        self._unhook_backward_params()
        modules: list[nn.Module] = [r.module for r in self._recorders]
        modules += [c.module for c in (*self._cell_recorders, *self._custom_recorders)]
        layers = [p for p in (next((p for p in m.parameters() if p.requires_grad), None) for m in modules)
                  if p is not None]
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        params = list({id(p): p for p in layers + trainable[:1] + trainable[-1:]}.values())
        self._backward_layer_ids = {id(p) for p in layers}
        hooked = []
        for p in params:
            try:
                handle = p.register_hook(functools.partial(self._backward_reached, id(p) in self._backward_layer_ids))
            except Exception as exc:  # noqa: BLE001 - never break training
                log.debug("seqscope: no gradient hook on %s: %s", type(p).__name__, exc)
                self._backward_layer_ids.discard(id(p))
                continue
            self._backward_handles.append(handle)
            hooked.append(p)
        self._backward_params = hooked  # none (nothing trainable): chosen again at the next step
        self._backward_slots = [slot for slot in (_parameter_slot([*modules, self.model], p) for p in hooked)
                                if slot is not None]

    def _unhook_backward_params(self) -> None:
        for h in self._backward_handles:
            h.remove()
        self._backward_handles.clear()
        self._backward_params = []
        self._backward_slots = []
        self._backward_layer_ids = set()

    def _backward_reached(self, layer_param: bool, grad: torch.Tensor | None) -> None:
        """A backward pass reached a parameter of _watch_backward: the step in progress
        has seen its backward pass (a model's first or last parameter counts for a step
        begun at the model's forward only)."""
        step = self._current
        if step is not None and (layer_param or step.whole_model) and not self._finalizing:
            step.backward_seen = True  # (not a custom cell's re-run while a record is finished)

    def _note_eval_mode_step(self, step: StepState) -> None:
        """Say once that a step ran the model in eval mode with autograd on and
        neither a backward pass nor an optimizer step followed: a validation loop
        without torch.no_grad(), counted (and maybe recorded) as a training step."""
        if self._warned_eval_mode or not step.eval_mode or not self._untouched(step) \
                or step.phase != schema.PHASE_TRAIN:
            return
        self._warned_eval_mode = True
        log.warning(
            "seqscope: step %d ran the model in eval mode (model.eval()) with autograd on, and no backward pass or "
            "optimizer step followed: an evaluation loop without torch.no_grad()? seqscope counts such passes as "
            "training steps; run evaluation under torch.no_grad() (which also saves memory) to have it recorded as "
            "an evaluation pass, and training steps numbered as your loop numbers them", step.step,
        )

    def _begin_step(self) -> None:
        if self._eval is not None:
            self._end_eval()
        if self._current is not None:
            self._finalize(self._current)
        n = self._next_step
        self._next_step += 1
        try:
            recorded = bool(self.schedule(n)) and self.writer.failed is None
        except Exception as exc:  # noqa: BLE001
            self.recording_failed(f"schedule raised {type(exc).__name__}: {exc}")
            recorded = False
        self._current = StepState(step=n, recorded=recorded, wall_time=time.time(),
                                  optimizer_steps=self._optimizer_steps)
        if recorded:
            self._hook_parameters(self._current)
        self._sync_cell_hooks()

    def _begin_eval(self) -> None:
        """An evaluation pass: recorded (without gradients) once per step number
        that the schedule picks, numbered with the training step in progress."""
        n = self._current.step if self._current is not None else self._next_step
        try:
            wanted = bool(self.schedule(n))
        except Exception:  # noqa: BLE001 - reported for training steps already
            wanted = False
        recorded = wanted and self._eval_recorded_for != n and self.writer.failed is None
        self._eval = StepState(step=n, recorded=recorded, wall_time=time.time(), phase=schema.PHASE_EVAL)
        self._eval_in_forward = True
        if recorded:
            self._eval_recorded_for = n
        self._sync_cell_hooks()

    def _continues_eval(self, args: Any, kwargs: Any) -> bool:
        """Whether a forward under no_grad continues the open evaluation pass: it
        receives one of the pass's last outputs (the state of a model called once per
        timestep), and the pass has not reached MAX_FORWARDS_PER_STEP."""
        assert self._eval is not None
        if self._eval.forwards >= MAX_FORWARDS_PER_STEP:
            return False
        outputs = {id(t) for t in (r() for r in self._eval_outputs) if t is not None}
        return any(id(t) in outputs for t in _input_tensors(args, kwargs))

    def _end_eval(self) -> None:
        """Write the evaluation pass in flight; one whose forward did not end (an
        exception cut it short) is dropped."""
        state, self._eval = self._eval, None
        self._eval_outputs = []
        if state is None:
            return
        if self._eval_in_forward:
            state.remove_hooks()
        else:
            self._finalize(state)
        self._eval_in_forward = False
        self._sync_cell_hooks()

    @torch.compiler.disable  # seqscope's own code is never traced by torch.compile
    def _on_model_forward_end(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if rec.in_backward() or rec.in_transform():
            return
        if self._eval is not None and not torch.is_grad_enabled():
            self._eval_in_forward = False
            if self._eval.recorded and not self._eval.failed:
                # kept open: the model's next forward under no_grad may continue it (_continues_eval)
                self._eval_outputs = [weakref.ref(t) for t in _output_tensors(output)]
            else:
                self._end_eval()
        elif self._current is not None and not self._current.backward_seen and torch.is_grad_enabled() \
                and (not self._current.watching_backward or _may_want_input_gradients(args, kwargs)):
            self._watch_outputs(self._current, output)

    def _watch_outputs(self, step: StepState, output: Any) -> None:
        """Hooks on the forward's outputs (_note_backward_through) that note a backward
        pass reaching them: one that reaches no parameter (``torch.autograd.grad`` with
        respect to the input, as an adversarial attack on the input computes it) ends
        the step as well. Placed only where the parameters' hooks may miss a backward
        pass: the step watches no parameter, or an input requires grad. A backward pass
        that reaches neither a watched parameter nor an input is one that accumulates
        into a few of the model's inner parameters alone (``backward(inputs=...)``), a
        case left to the optimizer step to end the step (the hooks cost ~35 us a step)."""
        _note_backward_through(step, [t for t in _output_tensors(output) if t.requires_grad])

    def _hook_parameters(self, step: StepState) -> None:
        """Each parameter's gradient from this step's backward pass: a tensor hook
        sees the pass's own gradient, before it is added to ``.grad`` (with gradient
        accumulation ``.grad`` also holds the earlier micro-batches')."""
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue

            def hook(grad: torch.Tensor | None, name: str = name) -> None:
                if grad is None:
                    return
                if name in step.param_grad_norms:  # the first backward pass of the step wins
                    self.note_another_backward(step)
                    return
                self.note_grad_scale(step)
                # float64 throughout: a float32 norm overflows above ~1.8e19
                step.param_grad_norms[name] = torch.linalg.vector_norm(grad.detach(), dtype=torch.float64)

            step.handles.append(p.register_hook(hook))

    def note_another_backward(self, step: StepState) -> None:
        """A gradient hook of ``step`` fired again: a second backward pass through the
        same forward (or an autograd.grad call before the backward, or the inner
        backward of a reentrant checkpoint reaching a parameter that the outer one
        reaches too). The step keeps its first pass's gradients; said once per scope,
        except for the repeated closure evaluations of one LBFGS step, which are
        expected."""
        if step.repeated_pass or self._warned_backward:
            return
        self._warned_backward = True
        log.warning("seqscope: step %d ran more than one backward pass through the watched model (backward() "
                    "called again on the same forward, torch.autograd.grad before it, or a parameter used both "
                    "inside and outside a torch.utils.checkpoint with use_reentrant=True); seqscope records the "
                    "gradients of a step's first backward pass, while .grad holds their sum. Sum the losses and "
                    "call backward() once, or checkpoint with use_reentrant=False, to record the whole gradient "
                    "(said once)", step.step)

    def note_grad_scale(self, step: StepState) -> None:
        """Keep the loss scale of watch(grad_scaler=...) that this step's backward runs
        with (called from its gradient hooks: after the step, update() changes it)."""
        if self.grad_scaler is None or step.grad_scale is not None:
            return
        try:
            scale = getattr(self.grad_scaler, "_scale", None)  # torch.amp.GradScaler: a tensor, no sync
            if isinstance(scale, torch.Tensor):
                step.grad_scale = scale.detach().reshape(()).double().clone()
            elif self.grad_scaler.is_enabled():
                step.grad_scale = float(self.grad_scaler.get_scale())
            else:
                step.grad_scale = 1.0
        except Exception as exc:  # noqa: BLE001 - a statistic, never an error in training
            log.debug("seqscope: could not read the GradScaler's scale: %s", exc)

    # ---- called by recorders -------------------------------------------------------------------
    def _active(self) -> StepState | None:
        """The record that module calls go to: the training step, or the evaluation
        pass when autograd is off."""
        if torch.is_grad_enabled():
            return self._current
        return self._eval if self._eval_in_forward else None

    def recording_step_for(self, recorder: FusedRecorder, input: Any = None,  # noqa: A002
                           hx: Any = None) -> StepState | None:
        """The step to record this module's forward into, or None to run it plainly."""
        step = self._active()
        if step is None or not step.recorded or step.failed or self._closed or self._finalizing \
                or rec.in_transform():  # (last: an unrecorded step pays nothing for it)
            return None
        if id(recorder) in step.recorded_modules:
            # an LBFGS closure's next pass, or a recomputation inside backward (checkpointing),
            # is the same call again; a call given the state that the module's last call
            # returned continues its record (a decoder loop); anything else is data this
            # step does not keep
            if step.repeated_pass or rec.in_backward():
                return None
            if recorder.continues(step, input, hx):
                return step
            if id(recorder) not in self._called_again:
                self._called_again.add(id(recorder))
                cell = {schema.KIND_LSTM: "LSTMCell", schema.KIND_GRU: "GRUCell"}.get(recorder.kind, "RNNCell")
                log.warning(
                    "seqscope: %s ran more than once in one step (a step lasts until a backward pass reaches the "
                    "model: a model run on two inputs, or a forward pass whose backward pass was skipped); only its "
                    "first call of each step, and the calls that continue it, are recorded (a call continues the "
                    "one before when it is given the state that call returned, as in a decoder loop; an "
                    "nn.%s in the loop is recorded call by call whatever its state)", recorder.name, cell)
            return None
        step.recorded_modules.add(id(recorder))
        return step

    def add_layer(self, name: str, kind: str, input_size: int, hidden_size: int, output_size: int,
                  gate_names: Sequence[str] = ()) -> int:
        """Register a layer discovered while training (a user-written cell); returns its id."""
        row = (name.encode(), name.encode(), kind.encode(), 0, 0, input_size, hidden_size, output_size,
               ",".join(gate_names).encode())
        self._layer_rows.append(row)
        self._new_layers.append(row)
        return len(self._layer_rows) - 1

    def cell_step(self) -> StepState | None:
        """The step that cell calls are recorded into, or None."""
        step = self._active()
        if step is None or not step.recorded or step.failed or step.repeated_pass or self._closed \
                or self._finalizing or rec.in_transform():
            return None
        return step

    def select_sequences(self, batch: int) -> torch.Tensor:
        if isinstance(self._sequences, int):
            return torch.arange(min(batch, self._sequences), dtype=torch.long)
        chosen = [i for i in self._sequences if i < batch]
        if not chosen:
            chosen = [0]
        return torch.tensor(chosen, dtype=torch.long)

    def recording_failed(self, message: str) -> None:
        """Drop the current step's record; training goes on."""
        step = self._active()
        if step is not None:
            step.failed = True
        if not self._warned:
            log.warning("seqscope: %s; this step is not recorded (further failures are logged at debug)", message)
            self._warned = True
        else:
            log.debug("seqscope: %s", message)

    # ---- public API ------------------------------------------------------------------------------
    @property
    def step(self) -> int | None:
        """Number of the step in progress (None before the first forward)."""
        return None if self._current is None else self._current.step

    def log(self, step: int | None = None, **scalars: float | torch.Tensor) -> None:
        """Log scalars (floats or 0-d tensors; a tensor is copied as it is now and
        read without a host sync at the next recorded step) for the step in
        progress. ``step=n`` renames the step in progress to ``n``."""
        if self._closed:
            return
        if step is not None:
            step = int(step)
            if self._current is not None:
                old = self._current.step
                if old != step:
                    self._pending_scalars = [
                        (step if s == old else s, k, v) for (s, k, v) in self._pending_scalars
                    ]
                    self._current.step = step
            self._next_step = step + 1
        if self._current is None:
            target = self._next_step if step is None else step
        else:
            target = self._current.step
        for name, value in scalars.items():
            if isinstance(value, torch.Tensor):
                value = value.detach()
                if value.numel() != 1:
                    raise ValueError(f"scope.log({name}=...) needs a scalar, got shape {tuple(value.shape)}")
                if value.is_cpu and not value.is_complex():
                    value = value.item()  # read now: on the CPU there is no device to wait for
                else:
                    # a copy: the value is read at the next recorded step (no host sync now), and
                    # the loop may change the tensor in place before then (a scheduler's fill_ of
                    # a tensor learning rate, an optimizer step on a logged parameter, a running
                    # average)
                    value = (value.reshape(()) if value.dim() else value).clone()
            self._pending_scalars.append((target, name, value))
        if len(self._pending_scalars) >= _PENDING_SCALARS_MAX:
            self.writer.submit(self._scalars_only())

    def close(self) -> None:
        """Write the last step, remove every hook, close the file. Idempotent."""
        self._end(keep_current=True)

    def __enter__(self) -> Scope:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._end(keep_current=exc_type is None)

    def _end(self, keep_current: bool) -> None:
        if self._closed:
            return
        try:
            if self._eval is not None:  # written if its forward ended, dropped if the exit interrupted it
                self._end_eval()
            if self._current is not None:
                if keep_current:
                    self._finalize(self._current)
                else:
                    self._current.remove_hooks()
                    old = self._current.step
                    self._pending_scalars = [p for p in self._pending_scalars if p[0] != old]
                self._current = None
            if self._pending_scalars or self._new_layers:
                self.writer.submit(self._scalars_only())
        except Exception as exc:  # noqa: BLE001
            log.warning("seqscope: writing the last step failed: %s", exc)
        finally:
            self._closed = True
            _OPEN_SCOPES.pop(self, None)
            self._uninstall()
            self.writer.close()

    # ---- writing ----------------------------------------------------------------------------
    def _scalar_id(self, name: str) -> int:
        sid = self._scalar_ids.get(name)
        if sid is None:
            sid = self._scalar_ids[name] = len(self._scalar_ids)
            self._new_scalar_names.append(name)
        return sid

    def _take_names(self) -> list[str]:
        names, self._new_scalar_names = self._new_scalar_names, []
        return names

    def _take_layers(self) -> list[tuple[Any, ...]]:
        rows, self._new_layers = self._new_layers, []
        return rows

    def _scalars_only(self) -> StepRecord:
        """A record of the pending scalars (and new layers or names) alone."""
        rows, ready = self._take_scalars()
        return StepRecord(None, [], rows, self._take_layers(), self._take_names(), ready=ready)

    def _take_scalars(self, extra: Iterable[tuple[int, str, Any]] = ()
                      ) -> tuple[list[tuple[int, int, float]], list[Callable[[], None]]]:
        """Pending and extra scalars as (step, name id, value) rows, and the
        functions that fill in the values of device tensors: those are copied to
        the host in one transfer per device without waiting (capture.host); the
        writer thread calls the functions before it reads the rows."""
        items = list(self._pending_scalars) + list(extra)
        self._pending_scalars = []
        rows = [(int(s), self._scalar_id(name), v if isinstance(v, torch.Tensor) else float(v))
                for (s, name, v) in items]
        by_device: dict[torch.device, list[int]] = {}
        for i, (_, _, v) in enumerate(items):
            if isinstance(v, torch.Tensor):
                by_device.setdefault(v.device, []).append(i)
        ready: list[Callable[[], None]] = []
        for idx in by_device.values():
            host, wait = copy_to_host(torch.stack([items[i][2].double() for i in idx]))

            def fill(idx: list[int] = idx, host: torch.Tensor = host, wait: Callable[[], None] | None = wait) -> None:
                if wait is not None:
                    wait()
                for i, value in zip(idx, host.tolist()):
                    rows[i] = (rows[i][0], rows[i][1], value)

            if wait is None:
                fill()
            else:
                ready.append(fill)
        return rows, ready  # type: ignore[return-value]  # tensors until ready has run

    def _storage_dtype(self, capture: LayerCapture, field: str, model_dtype: torch.dtype) -> torch.dtype:
        full = model_dtype if model_dtype in (torch.float32, torch.float64) else torch.float32
        if self.precision == "full":
            return full
        if self.precision in _FLOAT_STORAGE:
            return _FLOAT_STORAGE[self.precision]
        # auto: float16 for values bounded by 1, the model's precision otherwise
        bounded = field == schema.FIELD_GATES or (
            field == schema.FIELD_HIDDEN
            and capture.kind in (schema.KIND_GRU, schema.KIND_RNN_TANH, schema.KIND_LSTM)
            and not self._is_projected(capture)
        )
        return torch.float16 if bounded else full

    def _is_projected(self, capture: LayerCapture) -> bool:
        row = self._layer_rows[capture.layer_id]
        return bool(row[7] != row[6])

    def _finalize(self, step: StepState) -> None:
        """Turn a finished step into a StepRecord and hand it to the writer. What it
        runs of the model (a custom cell's re-run for its propagation profile, and
        the watched cells that cell calls) is neither a step nor recorded."""
        self._finalizing = True
        try:
            self._finish(step)
        finally:
            self._finalizing = False

    def _finish(self, step: StepState) -> None:
        step.remove_hooks()
        self._note_eval_mode_step(step)
        if step.recorded and not step.failed:
            for name, scan in step.pending_scans:
                try:
                    scan()
                except Exception as exc:  # noqa: BLE001 - never break training
                    self.recording_failed(f"gradient scan of {name} failed: {type(exc).__name__}: {exc}")
                    step.failed = True
                    return
            step.pending_scans.clear()
            for recorder in step.cell_recorders:
                try:
                    capture = recorder.build_capture(step)
                except Exception as exc:  # noqa: BLE001 - never break training
                    self.recording_failed(f"recording {recorder.name} failed: {type(exc).__name__}: {exc}")
                    return
                if capture is not None:
                    step.captures.append(capture)
        if not step.recorded or step.failed or not step.captures:
            if step.recorded and not step.captures and not step.failed:
                log.debug("seqscope: step %d ran no recurrent layer", step.step)
            return
        try:
            record = self._build_record(step)
        except Exception as exc:  # noqa: BLE001 - never break training
            self.recording_failed(f"preparing step {step.step} failed: {type(exc).__name__}: {exc}")
            return
        self.writer.submit(record)

    def _build_record(self, step: StepState) -> StepRecord:
        training = step.phase != schema.PHASE_EVAL
        scale = step.grad_scale if training else None
        if scale is not None:  # watch(grad_scaler=...): gradients as they are after unscaling
            for cap in step.captures:
                cap.grad_hidden = None if cap.grad_hidden is None else _unscaled(cap.grad_hidden, scale)
                cap.grad_cell = None if cap.grad_cell is None else _unscaled(cap.grad_cell, scale)
            step.param_grad_norms = {k: _unscaled(v, scale) for k, v in step.param_grad_norms.items()}
        # (layer id, field, time-major tensor, the dtype it is stored in)
        items: list[tuple[int, str, torch.Tensor, torch.dtype]] = []
        checked: list[list[torch.Tensor]] = []  # per capture: its arrays in the model's own dtype
        n_time = n_seq = 0
        for cap in step.captures:
            dtype = cap.hidden.dtype
            fields = ((schema.FIELD_HIDDEN, cap.hidden), (schema.FIELD_CELL, cap.cell), (schema.FIELD_GATES, cap.gates),
                      (schema.FIELD_GRAD_HIDDEN, cap.grad_hidden), (schema.FIELD_GRAD_CELL, cap.grad_cell),
                      (schema.FIELD_PROPAGATION, cap.propagation))
            present = [(field, t) for field, t in fields if t is not None]
            for field, t in present:
                stored = self._storage_dtype(cap, field, dtype) if field in schema.BULK_FIELDS else torch.float64
                items.append((cap.layer_id, field, t, stored))
            checked.append([t for _, t in present])
            n_time = max(n_time, cap.hidden.shape[0])
            n_seq = max(n_seq, cap.hidden.shape[1])
        # NaN/Inf in the model's own values (before any float16 storage). Evaluation
        # passes record no scalars. On the CPU: one sum per array, exact counts only for
        # a layer whose sums are not finite. On a device the exact count is computed
        # there and copied with the other scalars without waiting (no device sync).
        probes = [None if _count_on_device(ts[0].device) else torch.stack([_finite_probe(t) for t in ts]).sum()
                  for ts in checked] if training else []
        on_host, ready = _to_host(items)
        arrays = [ArrayRecord(step.step, lid, field, arr, step.phase) for (lid, field, arr) in on_host]
        for cap in step.captures:
            for field, ints in ((schema.FIELD_LENGTHS, cap.lengths), (schema.FIELD_SEQUENCE_INDEX, cap.sequence_index)):
                arrays.append(ArrayRecord(step.step, cap.layer_id, field, ints.numpy().astype(np.int64), step.phase))
        extra: list[tuple[int, str, Any]] = []
        deferred: list[tuple[int, int, Callable[[], float]]] = []
        if not training:
            # an evaluation pass adds arrays only: its scalars would collide with the
            # training step of the same number, and logged scalars belong to training
            step_row = (step.step, step.wall_time, step.batch_size, n_time, n_seq, step.phase)
            return StepRecord(step_row, arrays, [], self._take_layers(), self._take_names(), [], ready)
        host_probes = [p.cpu() for p in probes if p is not None]
        finite = iter(torch.isfinite(torch.stack(host_probes)).tolist() if host_probes else [])
        for cap, ts, probe in zip(step.captures, checked, probes):
            name = self._layer_rows[cap.layer_id][0].decode()
            sigma_name = schema.SCALAR_SIGMA_PREFIX + name
            if cap.sigma is not None:  # computed at capture time (weights on the CPU)
                extra.append((step.step, sigma_name, cap.sigma))
            elif cap.w_hh is not None:  # from the host copy, on the writer thread (no device sync here)
                deferred.append((step.step, self._scalar_id(sigma_name),
                                 functools.partial(spectral.sigma_max_host, cap.w_hh, cap.w_hh_ready)))
            # on a device: the count as a tensor, copied with the other scalars (no sync)
            count: Any = _nonfinite_count(ts) if probe is None else (
                0.0 if next(finite) else float(_nonfinite_count(ts)))
            extra.append((step.step, schema.SCALAR_NONFINITE_PREFIX + name, count))
        if self.grad_scaler is not None:
            # the scale this step's gradients were divided by, and whether the optimizer
            # step was skipped (a GradScaler skips steps whose gradients are not finite)
            if scale is not None:
                extra.append((step.step, schema.SCALAR_GRAD_SCALE, scale))
            extra.append((step.step, schema.SCALAR_OPTIMIZER_SKIPPED,
                          float(self._optimizer_steps == step.optimizer_steps)))
        if step.param_grad_norms:
            norms = step.param_grad_norms
            first = next(iter(norms.values()))
            total = torch.linalg.vector_norm(torch.stack([n.to(first.device) for n in norms.values()]))
            extra.append((step.step, schema.SCALAR_GRAD_NORM, total))
            for pname, n in norms.items():
                extra.append((step.step, schema.SCALAR_PARAM_GRAD_PREFIX + pname, n))
        scalars, scalars_ready = self._take_scalars(extra)
        step_row = (step.step, step.wall_time, step.batch_size, n_time, n_seq, step.phase)
        return StepRecord(step_row, arrays, scalars, self._take_layers(), self._take_names(), deferred,
                          ready + scalars_ready)


def _note_backward_through(step: StepState, tensors: Iterable[torch.Tensor]) -> None:
    """A hook that sets ``step.backward_seen`` when a backward pass reaches one of
    ``tensors`` (removed when the step ends): a pre-hook on the autograd node that
    made it, one per node (outputs that one node made, as cuDNN's LSTM makes its
    output and final states, need one; a node's pre-hook costs about half a tensor
    hook's), or a gradient hook on a tensor that no node made. A tensor that takes
    no hook (a subclass) costs that signal only, never the training step."""
    def seen(_: Any) -> None:
        step.backward_seen = True

    hooked: dict[int, Any] = {}  # the nodes themselves: a freed wrapper's id could come back for another node
    for t in tensors:
        try:
            node = t.grad_fn
            if node is None:  # a leaf
                handle = t.register_hook(seen)
            elif id(node) in hooked:
                continue
            else:
                handle = node.register_prehook(seen)
                hooked[id(node)] = node
        except Exception as exc:  # noqa: BLE001 - never break training
            log.debug("seqscope: no gradient hook on %s: %s", type(t).__name__, exc)
            continue
        step.handles.append(handle)
        step.watching_backward = True


def _parameter_slot(roots: list[nn.Module], p: torch.Tensor) -> tuple[dict[str, Any], str, torch.Tensor] | None:
    """The ``_parameters`` dict of the module under ``roots`` that holds ``p``, its
    name there, and ``p``: a slot that torch.func.functional_call fills with another
    tensor while it runs the model."""
    for root in roots:
        for module in root.modules():
            for name, q in module._parameters.items():
                if q is p:
                    return module._parameters, name, p
    return None


def _may_want_input_gradients(args: Any, kwargs: Any) -> bool:
    """Whether a backward pass may compute gradients of the forward's inputs: one of
    them requires grad, or none was found among them (an input of its own kind, whose
    tensors the walk does not reach)."""
    if not kwargs and args and all(isinstance(a, torch.Tensor) for a in args):  # model(x), model(x, h): no walk
        return any(a.requires_grad for a in args)
    found = _input_tensors(args, kwargs)
    return not found or any(t.requires_grad for t in found)


def _input_tensors(args: Any, kwargs: Any) -> list[torch.Tensor]:
    """The tensors among a forward's positional and keyword arguments (_output_tensors' walk)."""
    return _output_tensors(args) + (_output_tensors(kwargs) if kwargs else [])


def _output_tensors(output: Any, depth: int = 0) -> list[torch.Tensor]:
    """The tensors of a model's output: itself, or inside tuples, lists and dicts
    (two levels: ``(output, (h, c))``), eight at most."""
    if isinstance(output, torch.Tensor):
        return [output]
    if depth >= 2:
        return []
    items = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    found: list[torch.Tensor] = []
    for item in items:
        found += _output_tensors(item, depth + 1)
        if len(found) >= 8:
            return found[:8]
    return found


def _class_name(module: nn.Module) -> str:
    """The name of a watched model that is itself the recurrent module: its class's,
    in lower case ("lstm"); for a parametrized module (torch.nn.utils.parametrize
    makes its class "ParametrizedLSTM") the class it was made from."""
    cls = type(module)
    if parametrize.is_parametrized(module) and cls.__name__.startswith("Parametrized") and cls.__bases__:
        cls = cls.__bases__[0]
    return cls.__name__.lower()


def _unscaled(t: torch.Tensor, scale: Any) -> torch.Tensor:
    return t / (scale.to(t.device) if isinstance(scale, torch.Tensor) else scale)


def _count_on_device(device: torch.device) -> bool:
    """Whether a layer's NaN/Inf count is computed where its arrays are (no device
    sync: the count travels to the host with the step's other scalars). CUDA only:
    other devices keep the probe, read on the training thread as before."""
    return device.type == "cuda"


def _nonfinite_count(ts: list[torch.Tensor]) -> torch.Tensor:
    """How many entries of ``ts`` are NaN or infinite, as a float64 tensor on their device.
    ``t * 0`` is NaN exactly there (0 * inf and 0 * NaN are NaN, 0 * a finite value is
    +-0): two kernels per array where ``isfinite(t).sum()`` launches five on a GPU."""
    return torch.stack([torch.count_nonzero(t * 0) for t in ts]).sum().double()


def _finite_probe(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t``: finite when every entry is (a false alarm, a sum that
    overflows, only costs an exact count)."""
    low = t.dtype in (torch.float16, torch.bfloat16)
    return (t.sum(dtype=torch.float32) if low else t.sum()).double()


def _to_host(items: list[tuple[int, str, torch.Tensor, torch.dtype]]
             ) -> tuple[list[tuple[int, str, np.ndarray]], list[Callable[[], None]]]:
    """The arrays as numpy ``[sequence, time, ...]`` in their storage dtypes, from
    time-major tensors, and the functions that wait for device-to-host transfers
    (capture.host: the writer thread calls them before it reads the arrays).

    Each array takes one copy kernel (transposed and converted at once); on a
    device they land in one buffer per (device, dtype), which crosses to the host
    in one transfer."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, (_, _, t, dtype) in enumerate(items):
        groups.setdefault((t.device, dtype), []).append(i)
    out: list[np.ndarray | None] = [None] * len(items)
    ready: list[Callable[[], None]] = []

    def stored_shape(t: torch.Tensor) -> tuple[int, ...]:
        return (t.shape[1], t.shape[0], *t.shape[2:])
    for (device, dtype), idx in groups.items():
        if device.type == "cpu":
            for i in idx:
                t = items[i][2]
                out[i] = torch.empty(stored_shape(t), dtype=dtype).copy_(t.transpose(0, 1)).numpy()
            continue
        shapes = [stored_shape(items[i][2]) for i in idx]
        ends = list(itertools.accumulate(math.prod(shape) for shape in shapes))
        spans = list(zip(idx, shapes, [0, *ends[:-1]], ends))
        buffer = torch.empty(ends[-1], dtype=dtype, device=device)
        for i, shape, start, end in spans:
            buffer[start:end].view(shape).copy_(items[i][2].transpose(0, 1))
        host, wait = copy_to_host(buffer)
        if wait is not None:
            ready.append(wait)
        flat = host.numpy()
        for i, shape, start, end in spans:
            out[i] = flat[start:end].reshape(shape)
    return [(lid, field, arr) for (lid, field, _, _), arr in zip(items, out) if arr is not None], ready


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of this process in a distributed job: from
    torch.distributed once its process group exists, else from the RANK and
    WORLD_SIZE variables that torchrun sets; (0, 1) outside one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        return 0, 1
    return (rank, world) if 0 <= rank < world else (0, 1)


def watch(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    every: int | str | schedules.Schedule = 50,
    sequences: int | Sequence[int] = 8,
    precision: str = "auto",
    max_bytes: int | None = None,
    cells: Sequence[nn.Module] | Mapping[nn.Module, GatesFn | None] | None = None,
    grad_scaler: Any = None,
) -> Scope:
    """Record ``model``'s recurrent layers into the HDF5 trace at ``path``.

    path: the trace file. An earlier trace there is replaced (a dashboard showing
        it moves to the new run). While another run writes to that path, this one
        records to ``<stem>-2<suffix>`` (the next free number) and says so; the
        path used is ``scope.path``. In a distributed job (torch.distributed, or
        torchrun's RANK and WORLD_SIZE) only rank 0 records, unless the path
        contains ``{rank}``, which each process replaces with its rank; elsewhere
        ``scope.path`` is None and the scope does nothing.
    every: record step n when ``n % every == 0``; or a function ``step -> bool``;
        or a preset name ("dense-early", "always").
    sequences: how many sequences of each batch (the first ones), or which batch
        indices, to store per recorded step. Norms are exact for those.
    precision: storage of states and gates: "auto" (float16 for values bounded
        by 1: gates, LSTM/GRU/tanh-RNN hidden states; the model's float32 or
        float64 otherwise),
        "float16", "float32" or "full" (the model's dtype). Gradient norms are
        always float64.
    max_bytes: stop recording (with one warning; training goes on) when the
        trace would grow beyond this many bytes of data.
    cells: user-written cells to record, each a submodule called as
        ``cell(x_t, state, ...) -> state`` or ``-> (output, state)`` (state: a
        tensor, a tuple of tensors or a dict or dataclass of tensors, h first, c
        second if any; further arguments go to seqscope's re-run). A mapping gives each
        cell a function ``(cell, x_t, state) -> {gate name: [batch, unit]}``.
        nn.RNNCell/GRUCell/LSTMCell and nn.RNN/GRU/LSTM are found by themselves.
    grad_scaler: the ``torch.amp.GradScaler`` of mixed-precision training, if any.
        Its scale multiplies every gradient of the backward pass; with it given,
        recorded gradient norms are divided by the scale each step ran with (as
        after ``scaler.unscale_``), and the trace notes the scale and the steps
        whose optimizer step the scaler skipped (non-finite scaled gradients).
    """
    return Scope(model, path, every=every, sequences=sequences, precision=precision, max_bytes=max_bytes,
                 cells=cells, grad_scaler=grad_scaler)
