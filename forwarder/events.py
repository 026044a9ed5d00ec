"""One log line per delivery event, and the running counts of them for the heartbeat."""

from __future__ import annotations

import logging
import threading

from forwarder.logs import fields
from forwarder.outbox import Delivery
from forwarder.status import status_hex

__all__ = ["Events"]

LOGGER = logging.getLogger("forwarder.daemon")

COUNTED = ("sent", "quarantined", "retry")
"""The outcomes counted for the heartbeat (`forwarder status`); "warning" and "committed"
count as sent, "stored" (awaiting commitment) not yet."""


class Events:
    """Logs delivery events (file, instance, destination, outcome, status) and counts them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(COUNTED, 0)

    def count(self, outcome: str) -> None:
        # a warning is sent; so is an instance the peer committed to (Storage Commitment),
        # and one stored and awaiting that is not yet
        key = "sent" if outcome in ("warning", "committed") else outcome
        if key in self._counts:
            with self._lock:
                self._counts[key] += 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def delivery(
        self, level: int, outcome: str, d: Delivery, detail: str, status: int | None = None
    ) -> None:
        """One line for one delivery event, naming file, instance, destination and outcome."""
        self.count(outcome)
        if not LOGGER.isEnabledFor(level):  # per instance: skip building a line nobody reads
            return
        LOGGER.log(
            level,
            f"{outcome}: {d.path} ({d.sop_instance_uid}) -> {d.destination}: {detail}",
            extra=fields(
                path=d.path,
                sop_instance_uid=d.sop_instance_uid,
                study_uid=d.study_uid,
                destination=d.destination,
                outcome=outcome,
                status=status_hex(status),
            ),
        )
