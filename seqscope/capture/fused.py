"""Recording PyTorch's fused recurrent modules (nn.RNN, nn.GRU, nn.LSTM).

On a recorded step the module runs layer by layer, one fused call per layer
with that layer's own weights (the same kernels, so the same numbers as the
stacked call), which makes every layer's output a real autograd tensor. For the
first few sequences of the batch the gates and cell states are recomputed from
each layer's input and output (capture.recurrences); gradient hooks on the
layer's output and final states keep what backward delivers, and the analytic
BPTT scan runs on it when the step is finalized. Later calls in the same step
that are given the state the last call returned (a decoder loop calling the
module once per timestep) continue the record: their timesteps follow the first
call's, and the scan carries the propagation profile from call to call.
On every other step the module's own forward runs untouched.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import _VF, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from seqscope.capture import attach, spectral
from seqscope.capture import recurrences as rec
from seqscope.capture.host import constant_on_device
from seqscope.trace import schema

if TYPE_CHECKING:
    from seqscope.capture.scope import Scope, StepState

log = logging.getLogger("seqscope")

FUSED_TYPES: tuple[type[nn.Module], ...] = (nn.LSTM, nn.GRU, nn.RNN)
_BASE_FORWARDS = {nn.LSTM.forward, nn.GRU.forward, nn.RNN.forward}


def module_kind(module: nn.Module) -> str:
    """The trace kind of a fused module or of the matching *Cell module."""
    if isinstance(module, (nn.LSTM, nn.LSTMCell)):
        return schema.KIND_LSTM
    if isinstance(module, (nn.GRU, nn.GRUCell)):
        return schema.KIND_GRU
    if isinstance(module, (nn.RNN, nn.RNNCell)):
        return schema.KIND_RNN_TANH if module.nonlinearity == "tanh" else schema.KIND_RNN_RELU
    raise TypeError(type(module).__name__)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why seqscope cannot record this fused module, or None."""
    if type(module).forward not in _BASE_FORWARDS:
        return (
            f"{type(module).__name__} overrides forward(); seqscope records nn.RNN/GRU/LSTM "
            "and subclasses that keep their forward"
        )
    return None


def layer_names(module_name: str, module: nn.RNNBase) -> list[tuple[int, int, str]]:
    """(layer, direction, trace name) for every layer direction of the module."""
    directions = 2 if module.bidirectional else 1
    return [
        (k, d, f"{module_name}.l{k}" + ("_reverse" if d else ""))
        for k in range(module.num_layers)
        for d in range(directions)
    ]


@dataclasses.dataclass
class LayerCapture:
    """What one layer direction recorded on one step, on the device."""

    layer_id: int
    kind: str
    hidden: torch.Tensor  # [time, sequence, output]
    gates: torch.Tensor | None  # [time, sequence, gate, unit]
    cell: torch.Tensor | None  # [time, sequence, unit]
    lengths: torch.Tensor  # [sequence] int64, on the CPU
    sequence_index: torch.Tensor  # [sequence] int64, on the CPU
    # sigma_max(W_hh): computed at forward time for CPU weights (sigma), or from a host
    # copy taken then (w_hh) on the writer thread for device weights (capture.spectral)
    sigma: float | None
    w_hh: np.ndarray | None
    w_hh_ready: Callable[[], None] | None  # waits for w_hh's copy (capture.host)
    grad_hidden: torch.Tensor | None = None  # [time, sequence]
    grad_cell: torch.Tensor | None = None
    propagation: torch.Tensor | None = None


def sigma_fields(w_hh: torch.Tensor | None) -> dict[str, Any]:
    """LayerCapture's sigma / w_hh fields for this recurrent matrix (capture.spectral)."""
    sigma, host, ready = spectral.at_capture(w_hh)
    return {"sigma": sigma, "w_hh": host, "w_hh_ready": ready}


def own_copy(t: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """``t`` (a parameter as a kernel used it), copied where it still shares the
    parameter's memory. The BPTT scan runs when the step ends and must use the
    weights of that step's forward pass; by then the optimizer has usually
    updated the parameters in place. On a GPU the copy is queued on the current
    stream, before the optimizer's kernels. (Cell loops copy their parameters at
    the step's first call: capture.cells.)"""
    if t.untyped_storage().data_ptr() == parameter.untyped_storage().data_ptr():
        return t.clone()
    return t


@dataclasses.dataclass
class _Direction:
    """Per-direction state kept between forward and backward of one step."""

    weights: rec.LayerWeights
    details: rec.ForwardDetails
    flip: torch.Tensor | None  # time index for reverse directions
    capture: LayerCapture


# the propagation carried back to a call's initial state: (h, c) [sequence, ...] (recurrences.step_back)
Carry = tuple[torch.Tensor, torch.Tensor | None] | None


def _cat_time(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Time-major parts one after another; None where any part is None."""
    present = [t for t in parts if t is not None]
    return torch.cat(present) if present and len(present) == len(parts) else None


@dataclasses.dataclass
class _Call:
    """One call of one layer within a step: its directions, the gradients that reach
    its output, h_n and c_n, and its BPTT scan (FusedRecorder._scan with this call's
    arguments: ``scan(carried, carry_out)``)."""

    dirs: list[_Direction]
    grads: list[torch.Tensor | None]
    scan: Callable[..., Carry]


@dataclasses.dataclass
class _Chain:
    """A module's calls within one step. ``state``: what its last call returned
    (h_n, c_n); a call given that state continues the record (a decoder loop that
    calls the module once per timestep). Only a unidirectional module on padded
    (not packed) input continues: every stored sequence then has every timestep."""

    state: tuple[torch.Tensor | None, torch.Tensor | None]
    layers: list[list[_Call]]
    open: bool


class FusedRecorder:
    """Wraps one fused module's forward for the lifetime of a Scope."""

    def __init__(self, scope: Scope, name: str, module: nn.RNNBase, layer_ids: dict[tuple[int, int], int]):
        self.scope = scope
        self.name = name
        self.module = module
        self.kind = module_kind(module)
        self.layer_ids = layer_ids
        self._installed = False

    # ---- install / remove ------------------------------------------------------------
    def install(self) -> None:
        if "forward" in self.module.__dict__:
            from seqscope.errors import UnsupportedModelError

            other = getattr(self.module.__dict__["forward"], "__self__", None)
            if isinstance(other, FusedRecorder):
                # typically a scope opened without `with` and never closed (a notebook cell run again)
                raise UnsupportedModelError(
                    f"{self.name} is already watched by the scope writing {other.scope.path}; close that one "
                    "first (scope.close()), or use `with seqscope.watch(...)`, which closes it"
                )
            raise UnsupportedModelError(f"{self.name} has its own instance forward, which seqscope would replace")
        forward = self._forward
        self.module.forward = forward  # type: ignore[method-assign]
        attach.forward_replaced(self.module, forward)  # copies of the module leave it out
        self._installed = True

    def remove(self) -> None:
        if self._installed and self.module.__dict__.get("forward") == self._forward:
            del self.module.__dict__["forward"]
            attach.forward_restored(self.module)
        self._installed = False

    def _original(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.module).forward(self.module, *args, **kwargs)

    # ---- forward -------------------------------------------------------------------------
    @torch.compiler.disable  # seqscope's own code is never traced by torch.compile
    def _forward(self, input: Any, hx: Any = None) -> Any:  # noqa: A002 - nn.LSTM's own name
        if self.scope.steps_from_layers:  # the loop calls the model's parts, not the model
            self.scope.enter_layer()
        step = self.scope.recording_step_for(self, input, hx)
        if step is None:
            return self._original(input, hx)
        try:
            return self._recorded_forward(step, input, hx)
        except Exception as exc:  # noqa: BLE001 - never break training; run the module as it is
            self.scope.recording_failed(f"recording {self.name} failed: {type(exc).__name__}: {exc}")
            return self._original(input, hx)

    def continues(self, step: StepState, input: Any, hx: Any) -> bool:  # noqa: A002
        """Whether this call continues the module's record in ``step``: it is given,
        as its initial state, the very tensors that the step's last call returned."""
        chain = step.chains.get(id(self))
        if chain is None or not chain.open or hx is None or isinstance(input, PackedSequence):
            return False
        if self.kind == schema.KIND_LSTM:
            return isinstance(hx, (tuple, list)) and len(hx) == 2 and hx[0] is chain.state[0] \
                and hx[1] is chain.state[1]
        return hx is chain.state[0]

    def _recorded_forward(self, step: StepState, input: Any, hx: Any) -> Any:  # noqa: A002
        m = self.module
        kind = self.kind
        is_lstm = kind == schema.KIND_LSTM
        n_dir = 2 if m.bidirectional else 1
        n_layers = m.num_layers
        out_size = m.proj_size if getattr(m, "proj_size", 0) > 0 else m.hidden_size
        packed = isinstance(input, PackedSequence)
        unbatched = False
        m._update_flat_weights()

        if packed:
            data, batch_sizes, sorted_idx, unsorted_idx = input
            batch = int(batch_sizes[0])
            dtype, device = data.dtype, data.device
            # lengths in the caller's batch order (batch_sizes lives on the CPU)
            lengths_sorted = (batch_sizes.unsqueeze(0) > torch.arange(batch).unsqueeze(1)).sum(1)
            lengths_all = lengths_sorted if unsorted_idx is None else lengths_sorted[unsorted_idx.cpu()]
            n_time = int(batch_sizes.shape[0])
            layer_input: torch.Tensor = data
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"expected 2-D or 3-D input, got {input.dim()}-D")
            unbatched = input.dim() == 2
            x = input.unsqueeze(0 if m.batch_first else 1) if unbatched else input
            if m.batch_first:
                x = x.transpose(0, 1)
            n_time, batch = x.shape[0], x.shape[1]
            dtype, device = x.dtype, x.device
            lengths_all = torch.full((batch,), n_time, dtype=torch.long)
            batch_sizes = sorted_idx = unsorted_idx = None
            layer_input = x
        if batch == 0 or n_time == 0:  # an empty batch: nothing to record, and no failure to report
            return self._original(input, hx)

        # initial states, in the caller's batch order
        if hx is None:
            h0 = torch.zeros(n_layers * n_dir, batch, out_size, dtype=dtype, device=device)
            c0 = torch.zeros(n_layers * n_dir, batch, m.hidden_size, dtype=dtype, device=device) if is_lstm else None
        else:
            h0, c0 = (hx[0], hx[1]) if is_lstm else (hx, None)
            if unbatched:
                h0 = h0.unsqueeze(1)
                c0 = c0.unsqueeze(1) if c0 is not None else None
        if not packed:
            user_layout = x.transpose(0, 1) if m.batch_first else x
            m.check_forward_args(user_layout, (h0, c0) if is_lstm else h0, None)  # type: ignore[arg-type]
        h0_run = h0 if sorted_idx is None else h0.index_select(1, sorted_idx)
        c0_run = None if c0 is None else (c0 if sorted_idx is None else c0.index_select(1, sorted_idx))

        step.batch_size = max(step.batch_size, batch)
        amp = rec.autocast_dtype(device)  # the caller's autocast region, if any
        select = self.scope.select_sequences(batch)  # CPU int64, caller's order
        select_dev = constant_on_device(select, device)
        lengths = lengths_all[select]
        lengths_dev = constant_on_device(lengths, device)
        # lengths live on the CPU: deciding "no padding" costs no device sync
        full = int(lengths.min()) == n_time  # every stored sequence has every timestep
        valid = None if full else torch.arange(n_time, device=device).unsqueeze(1) < lengths_dev.unsqueeze(0)
        flip = rec.flip_index(lengths_dev, n_time) if n_dir == 2 else None

        def padded(seq: torch.Tensor) -> torch.Tensor:
            """Time-major [time, selected sequence, feature] in the caller's order."""
            if packed:
                unpacked, _ = pad_packed_sequence(
                    PackedSequence(seq, batch_sizes, sorted_idx, unsorted_idx), total_length=n_time
                )
                return unpacked.index_select(1, select_dev)
            return seq.index_select(1, select_dev)

        chain: _Chain | None = step.chains.get(id(self))
        first_call = chain is None
        if chain is None:
            chain = _Chain((None, None), [[] for _ in range(n_layers)], open=n_dir == 1 and not packed)
            step.chains[id(self)] = chain

        flat = m._flat_weights
        per_dir = len(flat) // (n_layers * n_dir)
        fn: Any = {
            schema.KIND_LSTM: _VF.lstm,
            schema.KIND_GRU: _VF.gru,
            schema.KIND_RNN_TANH: _VF.rnn_tanh,
            schema.KIND_RNN_RELU: _VF.rnn_relu,
        }[kind]
        h_n: list[torch.Tensor] = []
        c_n: list[torch.Tensor] = []
        x_next: torch.Tensor | None = None
        for k in range(n_layers):
            weights: list[torch.Tensor] = flat[k * n_dir * per_dir : (k + 1) * n_dir * per_dir]  # type: ignore[assignment]
            sl = slice(k * n_dir, (k + 1) * n_dir)
            state: Any = (h0_run[sl], c0_run[sl]) if is_lstm and c0_run is not None else h0_run[sl]
            if packed:
                result = fn(layer_input, batch_sizes, state, weights, m.bias, 1, 0.0, m.training, m.bidirectional)
            else:
                result = fn(layer_input, state, weights, m.bias, 1, 0.0, m.training, m.bidirectional, False)
            out = result[0]
            hn_k = result[1]
            cn_k = result[2] if is_lstm else None
            with torch.no_grad(), rec.no_autocast(device):
                x_sel = x_next if x_next is not None else padded(layer_input)
                out_sel = padded(out)
                dirs = self._capture_layer(
                    k, weights, per_dir, x_sel, out_sel, h0[sl], None if c0 is None else c0[sl],
                    select_dev, lengths, select, valid, flip, out_size, rec.run_dtype(out.dtype, amp),
                    with_sigma=first_call,
                )
            self._hook_gradients(step, dirs, out, hn_k, cn_k, padded, unsorted_idx, select_dev, lengths_dev, n_time,
                                 full, chain.layers[k], first_call)
            h_n.append(hn_k)
            if cn_k is not None:
                c_n.append(cn_k)
            # the next layer's input, selected and padded, is this output unless dropout changes it
            x_next = out_sel
            if k + 1 < n_layers and m.dropout > 0 and m.training:
                out = F.dropout(out, p=m.dropout, training=True)
                x_next = None
            layer_input = out

        h_final = torch.cat(h_n, 0)
        c_final = torch.cat(c_n, 0) if is_lstm else None
        output: Any
        if packed:
            output = PackedSequence(layer_input, batch_sizes, sorted_idx, unsorted_idx)
            if unsorted_idx is not None:
                h_final = h_final.index_select(1, unsorted_idx)
                c_final = c_final.index_select(1, unsorted_idx) if c_final is not None else None
        else:
            output = layer_input.transpose(0, 1) if m.batch_first else layer_input
            if unbatched:
                output = output.squeeze(1 if not m.batch_first else 0)
                h_final = h_final.squeeze(1)
                c_final = c_final.squeeze(1) if c_final is not None else None
        chain.state = (h_final, c_final)  # a next call given these continues the record
        return (output, (h_final, c_final)) if is_lstm else (output, h_final)

    # ---- per-layer capture ---------------------------------------------------------------
    def _capture_layer(
        self,
        k: int,
        weights: list[torch.Tensor],
        per_dir: int,
        x: torch.Tensor,
        out: torch.Tensor,
        h0: torch.Tensor,
        c0: torch.Tensor | None,
        select_dev: torch.Tensor,
        lengths: torch.Tensor,
        select: torch.Tensor,
        valid: torch.Tensor | None,
        flip: torch.Tensor | None,
        out_size: int,
        run: torch.dtype,
        with_sigma: bool = True,
    ) -> list[_Direction]:
        m = self.module
        dirs = []
        n_dir = 2 if m.bidirectional else 1
        # ``run``: the precision the fused kernel's products ran in (half precision
        # under autocast); the recomputation runs in float32 then
        calc = rec.compute_dtype(run)
        for d in range(n_dir):
            w = weights[d * per_dir : (d + 1) * per_dir]
            lw = rec.weights_as_run(rec.LayerWeights(
                kind=self.kind,
                w_ih=w[0].detach(),
                w_hh=w[1].detach(),
                b_ih=w[2].detach() if m.bias else None,
                b_hh=w[3].detach() if m.bias else None,
                w_hr=w[-1].detach() if getattr(m, "proj_size", 0) > 0 else None,
            ), run, calc)
            # the BPTT scan runs when the step ends, after an optimizer step may have changed
            # the parameters in place: it gets the recurrent weights this forward ran with
            lw.w_hh = own_copy(lw.w_hh, w[1])
            lw.w_hr = None if lw.w_hr is None else own_copy(lw.w_hr, w[-1])
            xd = x.detach().to(calc)
            hd = out[..., d * out_size : (d + 1) * out_size].detach().to(calc)
            fl = flip if d == 1 else None
            if fl is not None:
                xd = rec.take_time(xd, fl)
                hd = rec.take_time(hd, fl)
            h0d = h0[d].detach().index_select(0, select_dev).to(calc)
            c0d = None if c0 is None else c0[d].detach().index_select(0, select_dev).to(calc)
            details = rec.forward_details(lw, xd, hd, h0d, c0d, valid, run=run)
            gates, cell = details.gates, details.cell
            if fl is not None:
                gates = None if gates is None else rec.take_time(gates, fl)
                cell = None if cell is None else rec.take_time(cell, fl)
            capture = LayerCapture(
                layer_id=self.layer_ids[(k, d)],
                kind=self.kind,
                hidden=out[..., d * out_size : (d + 1) * out_size].detach(),
                gates=gates,
                cell=cell,
                lengths=lengths,
                sequence_index=select,
                # of the parameter itself; a call that continues the record keeps the first's
                **(sigma_fields(w[1].detach()) if with_sigma else sigma_fields(None)),
            )
            dirs.append(_Direction(lw, details, fl, capture))
        return dirs

    def _hook_gradients(
        self,
        step: StepState,
        dirs: list[_Direction],
        out: torch.Tensor,
        hn: torch.Tensor,
        cn: torch.Tensor | None,
        padded: Callable[[torch.Tensor], torch.Tensor],
        unsorted_idx: torch.Tensor | None,
        select_dev: torch.Tensor,
        lengths_dev: torch.Tensor,
        n_time: int,
        full: bool,
        calls: list[_Call],
        first_call: bool,
    ) -> None:
        """A tensor hook on the layer's output and final states keeps the gradients
        that reach them (the stored sequences' only; the first backward of the step
        wins); the BPTT scan runs on them when the step is finalized. Tensor hooks
        fire in every kind of backward pass, a reentrant checkpoint's recomputation
        included, where a multi-tensor hook never fires. ``calls``: this layer's calls
        in the step so far, this one not yet among them; a call after the first
        continues the first's record (_merge_calls, when the step is finalized)."""
        out_size = dirs[0].capture.hidden.shape[-1]
        grads: list[torch.Tensor | None] = [None, None, None]  # output (selected, padded), h_n, c_n
        def scan(carried: Carry = None, carry_out: bool = False) -> Carry:
            return self._scan(dirs, grads[0], grads[1], grads[2], unsorted_idx, select_dev, lengths_dev, n_time,
                              out_size, full, carried, carry_out)

        calls.append(_Call(dirs, grads, scan))
        if first_call:
            for d in dirs:
                step.captures.append(d.capture)

            def finish() -> None:
                with torch.no_grad(), rec.no_autocast(out.device):
                    if len(calls) > 1:
                        self._merge_calls(calls)
                    elif any(g is not None for g in grads):  # else no backward pass reached this layer
                        scan()

            step.pending_scans.append((self.name, finish))
        if not out.requires_grad:
            return  # nothing will flow back through this layer

        def keep(i: int) -> Callable[[torch.Tensor | None], None]:
            def hook(g: torch.Tensor | None) -> None:
                # g is None for an output the loss does not use when the outputs share one
                # autograd node (cuDNN's RNN: a loss on the output alone leaves h_n undefined)
                if g is not None and grads[i] is not None:
                    self.scope.note_another_backward(step)
                elif g is not None:
                    self.scope.note_grad_scale(step)
                    with torch.no_grad():
                        grads[i] = padded(g.detach()) if i == 0 else g.detach()
            return hook

        for i, t in enumerate((out, hn, cn)):
            if t is not None and t.requires_grad:
                step.handles.append(t.register_hook(keep(i)))

    def _merge_calls(self, calls: list[_Call]) -> None:
        """A layer called more than once in a step, each call given the state the
        one before returned: each call's scan runs, last call first; the gradient row
        takes each call's own external gradients (autograd's at its h_n and c_n
        already hold what flows back from the later calls through their initial
        state), and the propagation row is seeded at the last call's last timestep
        only, each earlier call taking at its last timestep what the later call's
        scan carried back to its initial state. Then the first call's capture becomes
        the whole chain's: its timesteps followed by each later call's."""
        if any(g is not None for call in calls for g in call.grads):
            carried: Carry = None
            for i, call in enumerate(reversed(calls)):
                carried = call.scan(carried, carry_out=i + 1 < len(calls))
        caps = [call.dirs[0].capture for call in calls]
        first = caps[0]
        first.hidden = torch.cat([c.hidden for c in caps])
        first.lengths = torch.full_like(first.lengths, first.hidden.shape[0])
        first.gates, first.cell = _cat_time([c.gates for c in caps]), _cat_time([c.cell for c in caps])
        first.grad_hidden = _cat_time([c.grad_hidden for c in caps])
        first.propagation = _cat_time([c.propagation for c in caps])
        first.grad_cell = _cat_time([c.grad_cell for c in caps])

    def _scan(
        self,
        dirs: list[_Direction],
        go: torch.Tensor | None,
        g_hn: torch.Tensor | None,
        g_cn: torch.Tensor | None,
        unsorted_idx: torch.Tensor | None,
        select_dev: torch.Tensor,
        lengths_dev: torch.Tensor,
        n_time: int,
        out_size: int,
        full: bool,
        carried: Carry = None,
        carry_out: bool = False,
    ) -> Carry:
        """``go``: the output's gradient, stored sequences only [time, sequence, ...].
        ``full``: every stored sequence has every timestep (no padding).
        ``carried``: the propagation seed at the last timestep, carried back from the
        call that continues this one (_merge_calls; a unidirectional call), instead of
        the unit gradient there. ``carry_out``: return what the propagation carries
        back to this call's initial state (recurrences.step_back), for the call before."""
        n_sel = select_dev.shape[0]

        def final_state(g: torch.Tensor | None, d: int) -> torch.Tensor | None:
            if g is None:
                return None
            g = g[d]
            if unsorted_idx is not None:
                g = g.index_select(0, unsorted_idx)
            return g.index_select(0, select_dev)

        last: torch.Tensor | None = None
        if full:  # each sequence's last step is the last timestep: plain indexing
            def at_last(r: int) -> tuple[Any, ...]:
                return (n_time - 1, r)
        else:
            last = (lengths_dev - 1).clamp(min=0)
            seq = torch.arange(n_sel, device=lengths_dev.device)

            def at_last(r: int) -> tuple[Any, ...]:
                return (last, r, seq)
        carry: Carry = None
        for d, direction in enumerate(dirs):
            lw = direction.weights
            ref = lw.w_hh  # the recomputation's dtype (float32 for a half-precision run) and device
            ext_h = torch.zeros((n_time, 2, n_sel, out_size), dtype=ref.dtype, device=ref.device)
            if go is not None:
                god = go[..., d * out_size : (d + 1) * out_size]
                if direction.flip is not None:
                    god = rec.take_time(god, direction.flip)
                ext_h[:, 0] = god
            ghn = final_state(g_hn, d)
            if ghn is not None:
                ext_h[at_last(0)] += ghn
            ext_c = None
            if self.kind == schema.KIND_LSTM:
                assert direction.details.cell is not None
                ext_c = torch.zeros((n_time, 2, n_sel, direction.details.cell.shape[-1]), dtype=ref.dtype,
                                    device=ref.device)
                gcn = final_state(g_cn, d)
                if gcn is not None:
                    ext_c[at_last(0)] += gcn
            if carried is None:
                # propagation seed: the unit gradient at each sequence's last step (see unit_seed)
                rec.seed_last_steps(ext_h, last)
            else:
                ext_h[at_last(1)] = carried[0]
                if ext_c is not None and carried[1] is not None:
                    ext_c[at_last(1)] = carried[1]
            # ext_h / ext_c are this scan's own: the compiled scan may run in them
            dh, dc = rec.backward_scan(lw, direction.details, ext_h, ext_c, overwrite=True)
            if carry_out:  # dh and dc may be a CUDA graph's buffers: read before the next scan
                carry = rec.step_back(lw, direction.details, dh[0, 1], None if dc is None else dc[0, 1])
            norms_h = rec.norms(dh)  # [time, 2, sequence], float64
            grad_hidden, propagation = norms_h[:, 0], norms_h[:, 1]
            grad_cell = rec.norms(dc[:, 0]) if dc is not None else None
            if direction.flip is not None:
                grad_hidden = rec.take_time(grad_hidden, direction.flip)
                propagation = rec.take_time(propagation, direction.flip)
                grad_cell = None if grad_cell is None else rec.take_time(grad_cell, direction.flip)
            cap = direction.capture
            if cap.grad_hidden is None:  # first backward of the step wins
                cap.grad_hidden, cap.propagation, cap.grad_cell = grad_hidden, propagation, grad_cell
        return carry
