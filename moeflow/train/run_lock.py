"""One run per output directory: rank 0 holds an exclusive lock on `<out_dir>/.moeflow.lock` for
the whole run, taken before anything in the directory is read, cleared or written.

The lock is the operating system's (`flock`), held through an open file: it is released when the
process ends, however it ends (a crash, SIGKILL, a lost node), so no stale lock is ever left behind
and nothing needs cleaning up. The file records who holds it (host, pid, start time), so a second
run is told which run owns the directory. On Linux NFS v4 mounts `flock` locks are shared with
other clients; on file systems without locking the lock is only as good as the file system's.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> first = RunLock.acquire(folder)
    >>> try:
    ...     RunLock.acquire(folder)
    ... except RunDirectoryBusyError as exc:
    ...     print(str(exc).replace(str(folder), "DIR"))  # doctest: +ELLIPSIS
    train.out_dir ('DIR') is in use by another run (host ..., pid ..., started ...): ...
    >>> first.release()
    >>> RunLock.acquire(folder).release()  # free again
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".moeflow.lock"
logger = logging.getLogger(__name__)


class RunDirectoryBusyError(ValueError):
    """Another live run holds the output directory (a usage error: exit status 2)."""


class RunLock:
    """An exclusive hold on an output directory (see the module doc)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, out_dir: Path) -> RunLock:
        """Take the lock of `out_dir` (which must exist) or raise `RunDirectoryBusyError` naming the
        run that holds it."""
        import fcntl

        path = Path(out_dir) / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held: another live run
            holder = _describe(_read(fd))
            os.close(fd)
            raise RunDirectoryBusyError(
                f"train.out_dir ({str(out_dir)!r}) is in use by another run ({holder}): wait for "
                "it to end or stop it, or choose another --train.out_dir"
            ) from None
        except OSError as exc:  # a file system without locks (some network mounts): go on
            logger.warning(
                "train.out_dir (%r) cannot be locked (%s): nothing stops a second run from "
                "writing into it while this one runs",
                str(out_dir),
                exc.strerror or exc,
            )
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        return cls(path, fd)

    def __del__(self) -> None:  # a lock dropped without release (an abandoned Trainer)
        self.release()

    def release(self) -> None:
        """Give the directory up (closing the file drops the lock); the file stays, harmless."""
        if getattr(self, "_fd", None) is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "host and pid not yet written"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since", 0))))
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {since}"
