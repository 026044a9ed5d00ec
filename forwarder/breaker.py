"""One destination's circuit breaker: paused until when, after how many failures in a row."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable

from forwarder.logs import fields
from forwarder.outbox import Outbox, OutboxError
from forwarder.policy import RetryLimits, pause_for

__all__ = ["MIN_HOLD_SECONDS", "Breaker"]

LOGGER = logging.getLogger("forwarder.daemon")

MIN_HOLD_SECONDS = 60.0
"""The shortest pause of a destination that refuses us (AE titles, not authorised)."""


class Breaker:
    """Pauses a destination after association failures, backing off; a store ends the pause.

    The outbox's ``destinations`` row is the record (`forwarder status` reads it, and a
    restart resumes a pause from it); this object is its cache for the workers, written
    through on every change. Thread-safe: all workers of the destination share it.
    """

    def __init__(
        self, name: str, outbox: Outbox, now: float, rand: Callable[[], float] = random.random
    ) -> None:
        self.name = name
        self._outbox = outbox
        self._rand = rand
        self._lock = threading.Lock()
        self.paused_until = 0.0
        self.failures = 0
        self.load(now)

    def load(self, now: float) -> None:
        """Take over a pause recorded in the outbox that lasts beyond `now` (one that
        outlived the last run, or this destination's workers before a reload)."""
        try:
            info = self._outbox.destination_info().get(self.name)
        except OutboxError as exc:  # start unpaused: a failure pauses it again
            LOGGER.warning(
                f"destination {self.name}: its recorded pause cannot be read ({exc}); "
                "starting unpaused",
                extra=fields(destination=self.name, outcome="outbox-error"),
            )
            return
        if info is not None and info.paused(now):
            with self._lock:
                self.paused_until = info.paused_until or 0.0
                self.failures = info.consecutive_failures

    def remaining(self, now: float) -> float:
        """Seconds the destination stays paused (0 when it is not)."""
        return max(0.0, self.paused_until - now)

    def succeeded(self) -> None:
        """A store was answered: end a pause and the count of failures (logged once)."""
        if not self.failures:
            return
        with self._lock:
            self.failures = 0
            self.paused_until = 0.0
        self._outbox.resume_destination(self.name)
        LOGGER.info(
            f"destination {self.name} is back",
            extra=fields(destination=self.name, outcome="resumed"),
        )

    def trip(self, reason: str, retry: RetryLimits, *, hold: bool, now: float) -> float:
        """Pause after one more failure, backing off as `retry` says; `hold` (the peer refuses
        us) pauses at least `MIN_HOLD_SECONDS`. Returns the end of the pause."""
        with self._lock:
            self.failures += 1
            wait = pause_for(self.failures, retry.initial_seconds, retry.max_seconds, self._rand())
            if hold:
                wait = max(wait, min(MIN_HOLD_SECONDS, retry.max_seconds))
            self.paused_until = max(self.paused_until, now + wait)
            until, failures = self.paused_until, self.failures
        self._outbox.pause_destination(self.name, until, reason, now, failure=True)
        level = logging.ERROR if failures == 1 or hold else logging.WARNING
        LOGGER.log(
            level,
            f"destination {self.name} paused for {until - now:.0f} s "
            f"(failure {failures} in a row): {reason}",
            extra=fields(destination=self.name, outcome="paused"),
        )
        return until
