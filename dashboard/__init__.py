"""The seqscope dashboard (installed as ``seqscope.dashboard``)."""

from seqscope.dashboard.app import create_app, serve
from seqscope.dashboard.data import TraceSource

__all__ = ["TraceSource", "create_app", "serve"]
