"""The outbox's retention: delete old delivered rows in batches, give the space back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from forwarder.outbox.queries import Queries
from forwarder.outbox.records import Pruned
from forwarder.outbox.schema import (
    SQL_PRUNE_CANDIDATES,
    SQL_PRUNE_ONE,
    SQL_SET_HORIZON,
    incremental_vacuum,
    path_str,
)

__all__ = ["PRUNE_LIMIT", "VACUUM_STEP_PAGES", "Pruning"]

PRUNE_LIMIT: Final = 500
"""Rows `Pruning.prune_delivered` looks at (and at most deletes) per call: one short write."""

VACUUM_STEP_PAGES: Final = 1024
"""Free pages `Pruning.vacuum_step` gives back per call (4 MiB at the default page size)."""


class Pruning(Queries):
    """The retention writes of `Outbox`: short, bounded, and for `forwarder.retention`."""

    def prune_delivered(
        self,
        before: float,
        limit: int = PRUNE_LIMIT,
        keep: Callable[[str], bool] | None = None,
        *,
        after: tuple[float, int] | None = None,
    ) -> Pruned:
        """Delete up to `limit` delivered rows (SENT, GONE) done before `before`.

        One call is one batch of a pass: it looks at the next `limit` such rows past `after`
        (oldest ``done_at`` first; None: from the oldest) and deletes them in one short
        ``BEGIN IMMEDIATE`` transaction, never one long write lock. Pass the result's ``last``
        as `after` to the next call, with the same `before`, until its ``done`` is True: the
        pass is then over, and `before` is recorded as the retention horizon
        (`retention_horizon`) in the transaction of that last batch.

        Never deleted: PENDING, INFLIGHT, COMMITTING and QUARANTINED rows; a row whose file version
        still has a row in one of those states (re-enqueueing the file could send it again to the
        destinations that have it); and a row for whose path `keep` returns True. `keep` is for
        files still in the inbox (disposition ``keep`` leaves them there): without their rows a
        restart would send them again. It is called outside the transaction, once per row per pass,
        and may touch the file system.

        Raises
        ------
        ValueError
            When `limit` is not positive.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        done, last_id = after if after is not None else (float("-inf"), 0)
        params = {
            "before": before,
            "after_done": done,
            "after_id": last_id,
            "limit": limit,
        }
        rows = self._query("prune_delivered", SQL_PRUNE_CANDIDATES, params)
        doomed = [
            {"id": row_id, "before": before}
            for _done_at, row_id, path in rows
            if keep is None or not keep(path_str(path))
        ]
        over = len(rows) < limit
        deleted = 0
        if doomed or over:
            with self._write("prune_delivered") as conn:
                changes = conn.total_changes
                conn.executemany(SQL_PRUNE_ONE, doomed)
                deleted = conn.total_changes - changes
                if over:
                    conn.execute(SQL_SET_HORIZON, {"before": before})
        last = (float(rows[-1][0]), int(rows[-1][1])) if rows else after
        return Pruned(deleted, last, over)

    def vacuum_step(self, pages: int = VACUUM_STEP_PAGES) -> int:
        """Give up to `pages` free pages back to the file system; returns the free pages left.

        One short write (``PRAGMA incremental_vacuum``) that moves pages from the end of the
        file into free ones and truncates it; the daemon's readers are not blocked (WAL),
        and the file itself shrinks once the WAL is checkpointed.
        """
        if pages < 1:
            raise ValueError(f"pages must be at least 1, got {pages}")
        sql = incremental_vacuum(pages)
        # A statement run by executescript: the pragma frees one page per step and
        # execute() steps once; executescript runs it to the end, as its own transaction
        # (it would commit one left open, so it runs outside `_write`).
        self._script("vacuum_step", sql)
        return self.free_pages()
