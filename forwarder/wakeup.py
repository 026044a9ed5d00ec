"""Wake the daemon's main loop from a signal handler or another thread, without a lock."""

from __future__ import annotations

import contextlib
import os
import select
from collections import deque

__all__ = ["Wakeup"]


class Wakeup:
    """A self-pipe: `set` writes a byte, `wait` sleeps until one arrives or the time is up.

    The pipe lives as long as the process: a signal may arrive at any time until it exits.
    A signal handler runs in the main thread between two of its bytecodes, possibly while the
    main loop holds a `threading.Event`'s lock (inside its ``wait`` or ``clear``): an
    ``Event.set`` there waits for that lock forever. Writing to a pipe and appending to a deque
    take no Python lock, so a handler may do both at any moment.
    """

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.signals: deque[int] = deque()
        """Signals received and not yet handled, oldest first (see `signal`)."""

    def set(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe is a wake-up pending already
            os.write(self._w, b"\0")

    def signal(self, signum: int) -> None:
        """Record `signum` for the main loop and wake it: safe in a signal handler."""
        self.signals.append(signum)
        self.set()

    def wait(self, timeout: float) -> None:
        """Return once woken (what woke it is consumed) or after `timeout` seconds."""
        with contextlib.suppress(InterruptedError):
            select.select([self._r], [], [], max(0.0, timeout))
        with contextlib.suppress(BlockingIOError):
            while os.read(self._r, 4096):
                pass
