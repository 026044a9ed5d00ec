"""Retention: delete delivered outbox rows older than ``outbox.keep_sent_days``, a batch a call."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path, PurePath
from typing import Final

from forwarder.logs import fields, iso
from forwarder.outbox import PRUNE_LIMIT, VACUUM_STEP_PAGES, Outbox

__all__ = ["BUSY_SECONDS", "IDLE_SECONDS", "SWEEP_SECONDS", "Retention", "still_in"]

LOGGER = logging.getLogger("forwarder.retention")

BUSY_SECONDS: Final = 0.05
"""Pause between two batches while there is more to prune or to vacuum: the workers' own
writes get the lock in between."""

IDLE_SECONDS: Final = 60.0
"""Pause once caught up: rows come of age by the minute, never in a rush ..."""

IDLE_FRACTION: Final = 0.1
"""... unless the retention is that short: then a tenth of it (a row stays at most 10 % past
its time)."""

MIN_FREE_PAGES: Final = 256
"""Free pages (1 MiB at the default page size) worth giving back to the file system. Fewer are
left to new rows: the daemon's own updates free a few pages all the time, and giving them back
at once would be a write transaction every `BUSY_SECONDS` beside the workers' (a send burst
measured 15 % slower)."""

SWEEP_SECONDS: Final = 3600.0
"""How often a pass starts again from the oldest row instead of where the last one stopped, for
the rows it passed over: spared ones (their file may have left the inbox since), rows whose
``done_at`` was already old when they became delivered (a discarded quarantine), a clock set
back."""


class Retention:
    """Deletes delivered outbox rows older than `keep_seconds` and gives the space back.

    Parameters
    ----------
    outbox
        The daemon's outbox (read-write).
    keep_seconds
        How long delivered (SENT, GONE) rows are kept; 0 keeps them forever (`loop` does
        nothing). Waiting and quarantined rows are never deleted, whatever their age.
    spare
        Called with the path of each row old enough to go; True keeps the row. Pass
        `still_in` of the watched folders: a file still there (disposition ``keep``, or a
        delete that failed) would be sent again by the next start if its rows were gone.
    batch, vacuum_pages
        Rows looked at, and free pages given back, per call of `loop`.

    Notes
    -----
    No thread of its own: the daemon calls `loop` from its main loop, and tests call it with
    any ``now``. Errors of the outbox (`forwarder.outbox.OutboxError`) reach the caller.
    """

    def __init__(
        self,
        outbox: Outbox,
        keep_seconds: float,
        spare: Callable[[str], bool] | None = None,
        *,
        batch: int = PRUNE_LIMIT,
        vacuum_pages: int = VACUUM_STEP_PAGES,
    ) -> None:
        if keep_seconds < 0:
            raise ValueError(f"keep_seconds must be 0 or more, got {keep_seconds}")
        self._outbox = outbox
        self._keep = keep_seconds
        self._spare = spare
        self._batch = batch
        self._vacuum_pages = vacuum_pages
        self._before: float | None = None  # the cut-off of the pass under way
        self._after: tuple[float, int] | None = None  # the last row looked at
        self._swept_at = -math.inf  # when a pass last started from the oldest row
        self._deleted = 0  # by the pass under way

    @property
    def enabled(self) -> bool:
        """False when delivered rows are kept forever (``keep_sent_days = 0``)."""
        return self._keep > 0

    def loop(self, now: float) -> float:
        """Prune one batch and give back one step of free pages; return when to call again.

        Returns
        -------
        float
            Seconds until the next call: `BUSY_SECONDS` while there is more to do,
            `IDLE_SECONDS` (or a tenth of a shorter retention) once caught up, ``math.inf``
            when disabled (take the minimum with the other stages' delays before waiting).
        """
        if not self.enabled:
            return math.inf
        if self._before is None:
            if not now - SWEEP_SECONDS < self._swept_at <= now:
                self._after, self._swept_at = None, now
            self._before = now - self._keep
        result = self._outbox.prune_delivered(
            self._before, self._batch, self._spare, after=self._after
        )
        self._deleted += result.deleted
        self._after = result.last
        free = self._outbox.free_pages()
        if free >= MIN_FREE_PAGES:
            free = self._outbox.vacuum_step(self._vacuum_pages)
        if not result.done:
            return BUSY_SECONDS
        if self._deleted:
            when = iso(self._before)
            LOGGER.info(
                f"outbox: pruned {self._deleted} delivered row(s) finished before {when} "
                f"(kept {self._keep / 86400:g} days: outbox.keep_sent_days)",
                extra=fields(outcome="pruned"),
            )
        self._before, self._deleted = None, 0
        return BUSY_SECONDS if free >= MIN_FREE_PAGES else self._idle

    @property
    def _idle(self) -> float:
        return max(BUSY_SECONDS, min(IDLE_SECONDS, self._keep * IDLE_FRACTION))


def still_in(folders: Iterable[Path]) -> Callable[[str], bool]:
    """A `Retention` ``spare``: True for a path inside one of `folders` that still exists."""
    roots = [PurePath(os.path.abspath(f)) for f in folders]

    def spare(path: str) -> bool:
        inside = any(PurePath(path).is_relative_to(root) for root in roots)
        return inside and os.path.lexists(path)

    return spare
