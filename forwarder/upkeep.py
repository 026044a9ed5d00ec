"""The outbox's upkeep from the main loop: expired leases queued again, old rows pruned."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from forwarder.outbox import Outbox
from forwarder.retention import Retention, still_in

__all__ = ["Upkeep"]

LOGGER = logging.getLogger("forwarder.daemon")

MIN_LEASE_CHECK_SECONDS = 1.0
"""Expired leases are looked for every quarter lease, but not more often than this."""
PRUNE_AFTER_ERROR_SECONDS = 60.0
"""Retention tries again this long after the outbox refused a step."""


class Upkeep:
    """Queues again what was in flight at the last stop and what outlived its lease, and
    prunes delivered rows past ``outbox.keep_sent_days`` a step at a time.

    `loop` runs the steps due; an `OutboxError` reaches the caller, and the step is tried
    again when it is next due (the start-up recovery: every second).
    """

    def __init__(
        self,
        outbox: Outbox,
        lease_seconds: float,
        keep_seconds: float,
        folders: list[Path],
        *,
        requeued: Callable[[], None],
        held: Callable[[], Sequence[int]] = tuple,
    ) -> None:
        self.outbox = outbox
        self.requeued = requeued  # rows are due again: wake the workers
        self.held = held  # the rows live workers are sending now
        self.recovered_at_start = False
        self._lease_at = 0.0  # monotonic
        self._prune_at = 0.0  # monotonic
        self.configure(lease_seconds, keep_seconds, folders)

    def configure(self, lease_seconds: float, keep_seconds: float, folders: list[Path]) -> None:
        """Take new settings (a reload); a retention turned on or shortened applies now."""
        self._lease_every = max(lease_seconds / 4, MIN_LEASE_CHECK_SECONDS)
        self._lease_seconds = lease_seconds
        # a file still in a watched folder keeps its rows: pruned, a restart would send it again
        self.retention = Retention(self.outbox, keep_seconds, still_in(folders))
        self._prune_at = 0.0

    @property
    def next_at(self) -> float:
        """When (monotonic) a step is next due."""
        return min(self._lease_at, self._prune_at)

    def recover_at_start(self, wall: float) -> None:
        """Queue again what was in flight at the last stop: before any worker of ours holds a
        row, or from the main loop while the outbox could not be written (then no worker
        could claim one either)."""
        recovered = self.outbox.recover_leases(wall, all_inflight=True)
        self.recovered_at_start = True
        if recovered:
            LOGGER.info(f"{recovered} deliveries were in flight at the last stop; queued again")
            self.requeued()

    def loop(self, now: float, wall: float) -> None:
        """Run the steps due at monotonic `now`; `wall` is the outbox's clock."""
        if now >= self._lease_at:
            if not self.recovered_at_start:  # the outbox could not be written at start-up
                self._lease_at = now + MIN_LEASE_CHECK_SECONDS
                self.recover_at_start(wall)
            else:
                self._lease_at = now + self._lease_every
                # a batch may take longer than a lease (a slow peer, long transforms): what
                # a live worker holds is renewed, or another association would send it too
                self.outbox.renew_leases(self.held(), wall + self._lease_seconds)
                n = self.outbox.recover_leases(wall)
                if n:
                    LOGGER.warning(f"{n} deliveries outlived their lease; queued again")
                    self.requeued()
        if now >= self._prune_at:
            self._prune_at = now + PRUNE_AFTER_ERROR_SECONDS
            self._prune_at = now + self.retention.loop(wall)
