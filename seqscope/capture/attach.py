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

A module with a parametrization (torch.nn.utils.parametrize) has a class
``__deepcopy__`` of its own, which copy.deepcopy calls instead of
``__getstate__``; it copies ``__dict__`` as it is. Such a module gets an instance
``__deepcopy__`` too, which copies the same state without seqscope's entries.
"""

from __future__ import annotations

import collections
import copy
import copyreg
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
        return self.without(state)

    def without(self, state: dict[str, Any]) -> dict[str, Any]:
        """A copy of the module's state ``state`` without seqscope's entries."""
        state = dict(state)
        state.pop("__getstate__", None)
        state.pop("__deepcopy__", None)
        if self.forward is not None and state.get("forward") is self.forward:
            del state["forward"]
        for name in _HOOK_DICTS:
            hooks = state.get(name)
            if hooks and any(key in self.hook_ids for key in hooks):
                state[name] = collections.OrderedDict((k, v) for k, v in hooks.items() if k not in self.hook_ids)
        return state

    def empty(self) -> bool:
        return not self.hook_ids and self.forward is None


def _parametrized_deepcopy(module: nn.Module) -> bool:
    """Whether the module's class has the ``__deepcopy__`` that
    torch.nn.utils.parametrize gives parametrized modules (a deep copy of
    ``__dict__`` and of any slots, bypassing ``__getstate__``)."""
    found = getattr(type(module), "__deepcopy__", None)
    return found is not None and getattr(found, "__name__", "") == "default_deepcopy"


class _DeepcopyWithout:
    """A parametrized module's ``__deepcopy__`` while seqscope is attached to it:
    what the class's own does (a new instance, a deep copy of ``__dict__`` and of
    any slots), with seqscope's entries left out of ``__dict__``."""

    def __init__(self, state: _StateWithout) -> None:
        self.state = state

    def __call__(self, memo: dict[int, Any]) -> Any:
        module = self.state.module()
        assert module is not None
        replica = memo.get(id(module))
        if replica is not None:
            return replica
        replica = type(module).__new__(type(module))
        memo[id(module)] = replica
        # the instance's own dictionary, as the default deep copy takes it (a parametrized
        # module's class __getstate__ refuses, to keep it out of serialised files)
        replica.__dict__.update(copy.deepcopy(self.state.without(module.__dict__), memo))
        for slot in copyreg._slotnames(type(module)):  # type: ignore[attr-defined]
            if hasattr(module, slot):
                setattr(replica, slot, copy.deepcopy(getattr(module, slot), memo))
        return replica


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
    if _parametrized_deepcopy(module) and "__deepcopy__" not in module.__dict__:
        module.__dict__["__deepcopy__"] = _DeepcopyWithout(made)
    return made


def _drop_if_empty(module: nn.Module, state: _StateWithout) -> None:
    if state.empty() and module.__dict__.get("__getstate__") is state:
        del module.__dict__["__getstate__"]
        found = module.__dict__.get("__deepcopy__")
        if isinstance(found, _DeepcopyWithout) and found.state is state:
            del module.__dict__["__deepcopy__"]


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
