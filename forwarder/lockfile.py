"""Advisory lock files: one daemon per outbox and per inbox, for as long as it runs."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from types import TracebackType

__all__ = ["Held", "LockError", "LockedError", "hold"]


class LockError(Exception):
    """The lock file cannot be created or locked at all (permissions, read-only file system)."""


class LockedError(LockError):
    """Another process holds the lock; ``pid`` is the holder's (None when it wrote none)."""

    def __init__(self, path: Path, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        holder = f"pid {pid}" if pid is not None else "another process"
        super().__init__(f"{path} is held by {holder}")


class Held:
    """A lock taken by `hold`; released by `release` or at exit (the kernel drops it with the
    process, so a kill -9 never leaves a stale lock behind)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        """Unlock and close. Idempotent. The file is left in place: removing it would let a
        third process lock a new file while a second still waits on the old one."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> Held:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _holder(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):  # no pid, or garbage
        return int(os.pread(fd, 32, 0).split()[0])
    return None


def hold(path: Path) -> Held:
    """Take an exclusive ``flock`` on `path` (created if missing) and write our pid into it.

    Never waits: a lock held elsewhere raises at once. ``flock`` locks belong to the open
    file, so a second `hold` of the same path fails in the same process too.

    Raises
    ------
    LockedError
        When another open of the file holds the lock; names the pid written by the holder.
    LockError
        When the file cannot be opened or locked.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise LockError(f"cannot open the lock file {path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _holder(fd)
        os.close(fd)
        raise LockedError(path, pid) from None
    except OSError as exc:
        os.close(fd)
        raise LockError(f"cannot lock {path}: {exc.strerror}") from exc
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:  # the lock holds without the pid; a second daemon just cannot name us
        pass
    return Held(path, fd)
