"""Check that a trace can be read, in a child process with a time limit.

A file damaged at the byte level can make the HDF5 library itself loop forever
or crash, which no exception handler can catch. The command line tools first
open the trace here — ``python -m seqscope.trace.probe PATH`` reads the header,
the tables and the last step of every layer — and only then in their own
process. Reading needs only h5py and numpy, so the probe starts in ~0.2 s.
"""

from __future__ import annotations

import os
import subprocess
import sys

from seqscope.errors import TraceCorruptError, TraceError

PROBE_TIMEOUT_S = float(os.environ.get("SEQSCOPE_PROBE_TIMEOUT", "20"))


def probe(path: str) -> None:
    """Open and read a sample of the trace; raises TraceError on a bad trace."""
    from seqscope.trace.reader import open_trace

    with open_trace(path) as trace:
        steps = trace.steps
        if len(steps):
            last = int(steps[-1])
            for layer in trace.layers:
                if trace.has(layer, last, "hidden"):
                    trace.hidden(layer, last)
                    trace.gates(layer, last)


def check_readable(path: str | os.PathLike[str], timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise TraceCorruptError when reading ``path`` hangs or crashes the HDF5
    library; other problems are left for the caller's own open to report."""
    cmd = [sys.executable, "-m", "seqscope.trace.probe", os.fspath(path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TraceCorruptError(
            f"{path} is damaged: the HDF5 library did not finish reading it within {timeout:g} s"
        ) from None
    if proc.returncode < 0:
        raise TraceCorruptError(f"{path} is damaged: reading it crashed the HDF5 library (signal {-proc.returncode})")


def main() -> int:
    try:
        probe(sys.argv[1])
    except TraceError as exc:
        print(exc, file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
