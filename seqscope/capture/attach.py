"""What seqscope attaches to the user's modules, kept out of their copies.

seqscope puts hooks on the watched model and its cells, and replaces a fused
module's ``forward`` with its own. Training loops copy models:
``copy.deepcopy(model)`` for an early-stopping snapshot or an EMA teacher,
``torch.save(model)`` for a checkpoint. Both go through the module's
``__getstate__``, and both failed while seqscope was watching (a deep copy of its
writer's lock; serialising its schedule). Each module seqscope attaches to gets
an instance ``__getstate__`` that returns nn.Module's own state without
seqscope's hooks and forward: the copy is the plain module, unwatched, and a
checkpoint holds nothing of seqscope (it loads where seqscope is not installed).
"""

from __future__ import annotations

import collections
import weakref
from typing import Any

from torch import nn

# nn.Module's dictionaries keyed by hook id
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


class _StateWithout:
    """A module's ``__getstate__`` while seqscope is attached to it."""

    def __init__(self, module: nn.Module) -> None:
        self.module = weakref.ref(module)
        self.hook_ids: set[int] = set()
        self.forward: Any = None  # seqscope's forward, while it replaces the module's

    def __call__(self) -> Any:
        module = self.module()
        assert module is not None  # called on the module that holds this object
        state = type(module).__getstate__(module)  # nn.Module's: a copy of __dict__
        if not isinstance(state, dict):  # a class with a state of its own kind: left as it is
            return state  # type: ignore[no-any-return]
        state = dict(state)
        state.pop("__getstate__", None)
        if self.forward is not None and state.get("forward") is self.forward:
            del state["forward"]
        for name in _HOOK_DICTS:
            hooks = state.get(name)
            if hooks and any(key in self.hook_ids for key in hooks):
                state[name] = collections.OrderedDict((k, v) for k, v in hooks.items() if k not in self.hook_ids)
        return state

    def empty(self) -> bool:
        return not self.hook_ids and self.forward is None


def _state_of(module: nn.Module, create: bool) -> _StateWithout | None:
    found = module.__dict__.get("__getstate__")
    if isinstance(found, _StateWithout):
        return found
    if not create:
        return None
    if found is not None:
        return None  # the module has an instance __getstate__ of its own: left alone
    made = _StateWithout(module)
    module.__dict__["__getstate__"] = made
    return made


def _drop_if_empty(module: nn.Module, state: _StateWithout) -> None:
    if state.empty() and module.__dict__.get("__getstate__") is state:
        del module.__dict__["__getstate__"]


def hook_added(module: nn.Module, handle: Any) -> Any:
    """Note a hook seqscope registered on ``module`` (its RemovableHandle, returned)."""
    state = _state_of(module, create=True)
    if state is not None:
        state.hook_ids.add(handle.id)
    return handle


def hook_removed(module: nn.Module, handle: Any) -> None:
    """``handle.remove()``, and forget it."""
    handle.remove()
    state = _state_of(module, create=False)
    if state is not None:
        state.hook_ids.discard(handle.id)
        _drop_if_empty(module, state)


def forward_replaced(module: nn.Module, forward: Any) -> None:
    """Note that ``module.forward`` is seqscope's ``forward`` now."""
    state = _state_of(module, create=True)
    if state is not None:
        state.forward = forward


def forward_restored(module: nn.Module) -> None:
    state = _state_of(module, create=False)
    if state is not None:
        state.forward = None
        _drop_if_empty(module, state)
