"""When a watched file is completely written: its events folded per path, and the settle rules."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

__all__ = ["SECOND_LOOK", "Candidate", "Kind", "Mark", "SettleRules", "Sig", "sig"]

SECOND_LOOK = 0.1
"""A file found by a scan is looked at again this soon (at most the settle time) before its
mtime is trusted: it must be unchanged between the two looks."""

Sig = int
"""A file's (size, mtime_ns) packed exactly into one int: a third of a tuple's memory, which
counts with one per file of a 100,000-file inbox."""


def sig(st: os.stat_result) -> Sig:
    """What "unchanged" compares: (st_size, st_mtime_ns), as one `Sig`."""
    return (st.st_size << 64) + (st.st_mtime_ns & 0xFFFF_FFFF_FFFF_FFFF)


class Kind(Enum):
    """What one file event says, reduced to what the tracker needs."""

    CREATED = "created"  # a new name appeared (Created; also a file moved in from outside)
    MOVED_IN = "moved_in"  # renamed into place inside the tree: the write-then-rename pattern
    MODIFIED = "modified"  # data written (or truncated)
    ATTRIB = "attrib"  # metadata changed (mtime set after close by `cp -p`, chmod)
    CLOSED = "closed"  # closed after writing
    GONE = "gone"  # deleted or moved away
    FORGOTTEN = "forgotten"  # the daemon disposed of it: forget that it was reported


@dataclass(slots=True)
class Mark:
    """The events seen for one path since the tracker last looked, folded in order."""

    dropped: bool = False
    """The file went away at some point: drop all state first."""
    forgotten: bool = False
    """Drop the memory of having reported the file at this path: `Watcher.forget` was called,
    or a new file took the name (created or moved in), so what was reported there is gone."""
    changed_at: float | None = None
    """Time of the last event after the drop that says the file is there and may have changed."""
    written: bool | None = None
    """True after a write not yet followed by a close-write; None when nothing was seen."""

    def fold(self, kind: Kind, now: float) -> None:
        if kind is Kind.FORGOTTEN:
            self.forgotten = True
        elif kind is Kind.GONE:
            self.dropped = True
            self.changed_at = self.written = None
        elif kind is Kind.CREATED:
            # A new name: a file reported at this path was deleted in place (not reported, see
            # forwarder.inotify), so a copy of it with the same size and mtime is new again.
            self.forgotten = True
            self.changed_at = now
        elif kind is Kind.ATTRIB:
            self.changed_at = now
        elif kind is Kind.MOVED_IN:  # a new inode took the name: what we knew of the old is void
            self.forgotten = True
            self.changed_at, self.written = now, False
        elif kind is Kind.MODIFIED:
            self.changed_at, self.written = now, True
        elif kind is Kind.CLOSED:
            self.changed_at, self.written = now, False


@dataclass(slots=True)
class Candidate:
    """A file being watched until it is complete."""

    root: str
    last_change: float
    """Last time an event or a stat showed a change; readiness counts from here."""
    due: float = math.inf
    """When the tracker looks at it next (inf: not scheduled)."""
    sig: Sig | None = None
    """(size, mtime_ns) at the last look; None before the first."""
    written: bool | None = None
    """True: seen written and not closed-after-writing since. False: seen closed after writing,
    or moved in, and not written since. None: neither seen (found by a scan)."""


@dataclass(frozen=True, slots=True)
class SettleRules:
    """How long a candidate must stay unchanged, and when its mtime already says it has."""

    settle: float
    """Seconds a file must stay unchanged to be ready."""
    grace: float
    """Seconds instead of `settle` for a file seen written and not closed since (>= `settle`)."""
    poll: bool
    """Events come from polling: there are no close events, `settle` always applies."""
    from_mtime: bool
    """An mtime `settle` seconds old may make a file ready at once (see `aged`)."""
    wall_clock: Callable[[], float]
    """Wall-clock time, compared with mtimes."""

    def wait(self, cand: Candidate) -> float:
        """How long `cand` must stay unchanged: the grace when seen written and not closed."""
        if not self.poll and cand.written:
            return self.grace
        return self.settle

    def aged(self, st: os.stat_result, cand: Candidate, *, steady: bool) -> bool:
        """True when the file's mtime says it has been unchanged for the settle time.

        Every write sets the mtime, so an mtime `settle` seconds in the past means no write
        since; a future mtime (another clock) says nothing. Trusted only for a file seen
        closed after writing or moved in (`cand.written is False`), or found unchanged between
        two looks (`steady`: a scan found it, or its events were lost); never for a file seen
        written and not closed since (a writer may set an old mtime first: SMB's sticky write
        time), nor for an mtime in whole seconds (a coarse clock, as on vfat or some network
        file systems, cannot tell a file written just now from one a second old).
        """
        if not self.from_mtime or cand.written or not (cand.written is False or steady):
            return False
        if st.st_mtime_ns % 1_000_000_000 == 0:
            return False
        age = self.wall_clock() - st.st_mtime_ns / 1e9
        return age >= self.settle

    def first_look(self, st: os.stat_result, cand: Candidate) -> float:
        """Seconds until a file a scan just found is looked at: the settle time, or
        `SECOND_LOOK` when its mtime already says it is old (the second look confirms it)."""
        if self.aged(st, cand, steady=True):
            return min(SECOND_LOOK, self.settle)
        return self.settle
