"""seqscope: see inside recurrent networks while they train.

    with seqscope.watch(model, "runs/trace.h5", every=50) as scope:
        ...training loop...; scope.log(loss=loss)
    trace = seqscope.open("runs/trace.h5")

Names are imported lazily, so reading traces (``seqscope.open``, the CLI, the
dashboard) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "watch": ("seqscope.capture.scope", "watch"),
    "Scope": ("seqscope.capture.scope", "Scope"),
    "open": ("seqscope.trace.reader", "open_trace"),
    "Trace": ("seqscope.trace.reader", "Trace"),
    "LayerInfo": ("seqscope.trace.reader", "LayerInfo"),
    "Series": ("seqscope.trace.reader", "Series"),
    "diagnose": ("seqscope.diagnose.rules", "diagnose"),
    "Finding": ("seqscope.diagnose.rules", "Finding"),
    "schedules": ("seqscope.schedules", None),
    "SeqscopeError": ("seqscope.errors", "SeqscopeError"),
    "UnsupportedModelError": ("seqscope.errors", "UnsupportedModelError"),
    "TraceError": ("seqscope.errors", "TraceError"),
    "TraceNotFoundError": ("seqscope.errors", "TraceNotFoundError"),
    "NotATraceError": ("seqscope.errors", "NotATraceError"),
    "TraceVersionError": ("seqscope.errors", "TraceVersionError"),
    "TraceCorruptError": ("seqscope.errors", "TraceCorruptError"),
    "NotInTraceError": ("seqscope.errors", "NotInTraceError"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'seqscope' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


if TYPE_CHECKING:
    from seqscope import schedules as schedules
    from seqscope.capture.scope import Scope as Scope
    from seqscope.capture.scope import watch as watch
    from seqscope.diagnose.rules import Finding as Finding
    from seqscope.diagnose.rules import diagnose as diagnose
    from seqscope.errors import (
        NotATraceError as NotATraceError,
    )
    from seqscope.errors import (
        NotInTraceError as NotInTraceError,
    )
    from seqscope.errors import (
        SeqscopeError as SeqscopeError,
    )
    from seqscope.errors import (
        TraceCorruptError as TraceCorruptError,
    )
    from seqscope.errors import (
        TraceError as TraceError,
    )
    from seqscope.errors import (
        TraceNotFoundError as TraceNotFoundError,
    )
    from seqscope.errors import (
        TraceVersionError as TraceVersionError,
    )
    from seqscope.errors import (
        UnsupportedModelError as UnsupportedModelError,
    )
    from seqscope.trace.reader import LayerInfo as LayerInfo
    from seqscope.trace.reader import Series as Series
    from seqscope.trace.reader import Trace as Trace
    from seqscope.trace.reader import open_trace as open  # noqa: A004, F401
