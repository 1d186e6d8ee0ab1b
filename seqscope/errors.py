"""Exception types raised by seqscope; each message is one line a user can act on."""

from __future__ import annotations


class SeqscopeError(Exception):
    """Base class of every error seqscope raises on purpose."""


class UnsupportedModelError(SeqscopeError, ValueError):
    """watch() was given a model or option seqscope cannot record."""


class TraceError(SeqscopeError):
    """A trace could not be opened or read."""


class TraceNotFoundError(TraceError, FileNotFoundError):
    """The trace path does not exist."""


class NotATraceError(TraceError):
    """The file is not HDF5, or an HDF5 file that seqscope did not write."""


class TraceVersionError(TraceError):
    """The trace was written by a newer seqscope schema than this one reads."""


class TraceCorruptError(TraceError):
    """The file is a seqscope trace but its contents are damaged."""


class NotInTraceError(TraceError, LookupError):
    """A layer, step or quantity that the trace does not hold."""
