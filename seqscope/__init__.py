"""seqscope: see inside recurrent networks while they train.

    with seqscope.watch(model, "runs/trace.h5", every=50) as scope:
        ...training loop...; scope.log(loss=loss)
    trace = seqscope.open("runs/trace.h5")
"""

from __future__ import annotations

from seqscope import schedules
from seqscope.capture.scope import Scope, watch
from seqscope.errors import (
    NotATraceError,
    NotInTraceError,
    SeqscopeError,
    TraceCorruptError,
    TraceError,
    TraceNotFoundError,
    TraceVersionError,
    UnsupportedModelError,
)
from seqscope.trace.reader import LayerInfo, Series, Trace, open_trace

open = open_trace  # noqa: A001 - the public name is seqscope.open

__version__ = "0.1.0"

__all__ = [
    "LayerInfo",
    "NotATraceError",
    "NotInTraceError",
    "Scope",
    "SeqscopeError",
    "Series",
    "Trace",
    "TraceCorruptError",
    "TraceError",
    "TraceNotFoundError",
    "TraceVersionError",
    "UnsupportedModelError",
    "open",
    "schedules",
    "watch",
]
