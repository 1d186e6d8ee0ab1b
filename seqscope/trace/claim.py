"""One writer per trace file.

A trace's writer runs in SWMR mode, and HDF5 drops its own file lock once SWMR
writing begins (so that readers can open the file). Without a lock of seqscope's
own, a second run given the same path -- two runs of a sweep, the ranks of a
distributed job, a run started again while the first still trains -- truncated
the file under the first run's writer, and both then wrote into it: a trace
that neither could read. So:

- The writer holds a lock on the file for as long as it writes: a POSIX lock on
  one byte far beyond any file's end, so that it never meets HDF5's own lock
  (``flock``). On Linux it is an open-file-description lock, which the process
  keeps when some other handle on the same file is closed (a ``seqscope.open``
  of the trace in the writing process); elsewhere a process-wide ``lockf``. The
  kernel drops it when the process ends, however it ends, so a crashed run
  never blocks the next.
- A path whose file a live writer holds is not touched: the new run writes to
  the first free ``<stem>-2<suffix>``, ``-3``, ... and says so once.
- An earlier trace at the path is unlinked, not truncated: a dashboard or a
  reader that has it open keeps reading the earlier run intact (the dashboard
  then follows the path to the new file), and HDF5's shared lock of such a
  reader no longer stops the new run from starting.
- Except the trace of a run that never closed it (killed, preempted, crashed
  outside Python) with data in it: that is kept, and the new run goes to a
  numbered path as above.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

from seqscope.trace.probe import check_readable
from seqscope.trace.reader import open_trace

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock, the earlier file is truncated
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("seqscope")

_LOCK_START = 1 << 62  # one byte here: beyond any file's end, so no other lock covers it
_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", None)
_FALLBACK_NAMES = 1000


def _try_lock(fd: int) -> bool:
    """Take the writer's lock on the file open as ``fd``; False when another
    writer holds it."""
    if fcntl is None:  # pragma: no cover
        return True
    try:
        if _OFD_SETLK is not None:
            # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for an OFD lock)
            fcntl.fcntl(fd, _OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, _LOCK_START, 1, 0))
        else:  # pragma: no cover - macOS, BSD
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _LOCK_START, os.SEEK_SET)
    except (BlockingIOError, PermissionError):
        return False
    except OSError:
        # a file system without POSIX locks (some network mounts): write without one
        return True
    return True


def unfinished_run(path: Path) -> str | None:
    """What an unfinished trace at ``path`` holds ("12 recorded steps"), when it is
    one: a seqscope trace with data whose writer never closed it (its process was
    killed, or crashed outside Python). None for anything else. Read as the command
    line reads traces: first in a child process, since a damaged file can make the
    HDF5 library hang or crash, which must not happen to a training process."""
    try:
        check_readable(path)
        with open_trace(path) as trace:
            info = trace.info()
    except Exception:  # noqa: BLE001 - not a readable trace: nothing to keep
        return None
    if info["closed_cleanly"]:
        return None
    if info["recorded_steps"]:
        return f"{info['recorded_steps']} recorded steps"
    return "logged values and no recorded step" if info["scalars"] or info["evaluation_passes"] else None


def _claim_one(path: Path) -> tuple[int | None, str | None]:
    """The file at ``path``, empty and locked for this process, as an open
    descriptor, or None when another writer holds the file there or when it holds
    an unfinished run, which is kept; and what that unfinished run holds."""
    for _ in range(20):  # each retry means another process replaced the file meanwhile
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if not _try_lock(fd):
                os.close(fd)
                return None, None
            held = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_ino, now.st_dev) != (held.st_ino, held.st_dev):
                os.close(fd)
                continue
            if held.st_size == 0:
                return fd, None
            # the trace of a run that was killed is what its user most needs: never replaced
            unfinished = unfinished_run(path)
            if unfinished is not None:
                os.close(fd)
                return None, unfinished
            # an earlier trace: replace it rather than truncate it under its readers
            try:
                os.unlink(path)
            except PermissionError:  # a directory we may not change: truncate in place, as before
                os.ftruncate(fd, 0)
                return fd, None
            os.close(fd)
        except BaseException:
            try:
                os.close(fd)
            except OSError:
                pass
            raise
    raise OSError(f"{path} kept being replaced by other processes while seqscope tried to claim it")


def claim(path: Path) -> tuple[Path, int | None]:
    """A path for a new trace, with its writer's lock held (the descriptor to
    close once the trace file is closed; None without POSIX locks). ``path``
    itself unless a live writer holds it or it holds an unfinished run's trace."""
    if os.path.islink(path):
        path = Path(os.path.realpath(path))  # write through the link, as opening it did
    if fcntl is None:  # pragma: no cover
        return path, None
    fd, unfinished = _claim_one(path)
    if fd is not None:
        return path, fd
    for n in range(2, _FALLBACK_NAMES):
        other = path.with_name(f"{path.stem}-{n}{path.suffix}")
        if other.exists() or other.is_symlink():
            continue  # an earlier run's trace: left as it is
        fd, _ = _claim_one(other)
        if fd is not None:
            if unfinished:
                log.warning(
                    "seqscope: %s holds a run that ended without closing its trace (killed, or crashed outside "
                    "Python), with %s: it is kept, and this run records to %s (delete or move the old trace to "
                    "record at its path again)",
                    path, unfinished, other,
                )
            else:
                log.warning(
                    "seqscope: %s is being written by another run (another process, or another watch() in this "
                    "one); this run records to %s",
                    path, other,
                )
            return other, fd
    raise OSError(f"{path} and {_FALLBACK_NAMES - 2} numbered paths beside it are in use")


def release(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
