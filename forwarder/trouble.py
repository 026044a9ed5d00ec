"""The outbox cannot be written: since when and why, logged once a minute for every stage."""

from __future__ import annotations

import logging
import threading
import time

from forwarder.logs import fields, iso
from forwarder.outbox import OutboxError

__all__ = ["OutboxTrouble", "pause_after"]

LOGGER = logging.getLogger("forwarder.daemon")

LOG_EVERY_SECONDS = 60.0
"""How often a lasting outbox trouble is logged again."""
MAX_PAUSE_SECONDS = 30.0
"""The longest a stage waits after unexpected errors in a row."""


def pause_after(failures: int) -> float:
    """Seconds a stage waits after `failures` unexpected errors in a row (0.5 s .. 30 s)."""
    return float(min(MAX_PAUSE_SECONDS, 0.5 * 2 ** min(failures - 1, 6)))


class OutboxTrouble:
    """The outbox cannot be written (full disk, read-only, locked too long) since when, and why.

    Every stage reports its failed writes here and carries on: the trouble is logged once a
    minute, not once per thread and try; `problem` names it for `health`; the first write that
    works again ends it (logged). Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.since: float | None = None  # wall clock
        self.reason = ""
        self._logged = 0.0  # monotonic

    def report(self, what: str, exc: OutboxError) -> None:
        now = time.monotonic()
        with self._lock:
            first = self.since is None
            if first:
                self.since = time.time()
            self.reason = str(exc)
            due = first or now - self._logged >= LOG_EVERY_SECONDS
            if due:
                self._logged = now
        if due:
            LOGGER.error(
                f"outbox {what}: {exc}; new files stay in the inbox, sending resumes by "
                "itself once the outbox can be written (repeated once a minute while it lasts)",
                extra=fields(outcome="outbox-error"),
            )

    def clear(self) -> None:
        with self._lock:
            since, self.since = self.since, None
        if since is not None:
            LOGGER.warning(
                f"the outbox can be written again after {time.time() - since:.0f} s; resuming",
                extra=fields(outcome="outbox-ok"),
            )

    def problem(self) -> str | None:
        """One line for `health`, or None."""
        with self._lock:
            if self.since is None:
                return None
            return f"the outbox cannot be written since {iso(self.since)}: {self.reason}"


def damaged(where: str, exc: OutboxError, path: object) -> str:
    """The one line that stops the daemon on a damaged outbox, saying what to do."""
    return f"{where}: {exc}: run `forwarder outbox check` and restore {path} from a backup"
