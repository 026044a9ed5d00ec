"""Group commit: the received instances of several associations queued in one outbox transaction."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from forwarder.dicomfile import DicomInfo
from forwarder.filing import fsync_dir

__all__ = ["GroupCommit"]

Routed = tuple[DicomInfo, Sequence[str]]
Enqueue = Callable[[Sequence[Routed], float], int]

MAX_GROUP = 512
"""Instances committed in one transaction at most; the rest wait for the next."""


@dataclass
class _Ticket:
    routed: Sequence[Routed]
    folders: Iterable[Path]
    done: bool = False
    error: BaseException | None = None
    added: int = 0


class GroupCommit:
    """Commits what several threads hand in with as few fsyncs and transactions as they allow.

    Each caller of `commit` waits until its own rows are committed (or the transaction that
    held them failed, raising its error). The first caller to find no commit under way leads:
    it takes every ticket waiting (up to `MAX_GROUP`), fsyncs their folders once each, and
    queues all their rows in one transaction; the others wait for it. While one group is
    being committed the next one gathers, so N associations storing at once share the fsyncs
    (the folders' and SQLite's WAL's) instead of paying one each. A lone caller pays no wait.
    """

    def __init__(self, enqueue: Enqueue, clock: Callable[[], float]) -> None:
        self._enqueue = enqueue
        self._clock = clock
        self._cond = threading.Condition()
        self._waiting: list[_Ticket] = []
        self._leading = False
        self.groups = 0  # transactions committed (for tests and the benchmark)
        self.instances = 0

    def commit(self, routed: Sequence[Routed], folders: Iterable[Path]) -> int:
        """Queue `routed` after making the names in `folders` durable; returns the rows its
        group added.

        Raises what `fsync_dir` (OSError) or the outbox (OutboxError) raised for the group.
        """
        ticket = _Ticket(routed, tuple(folders))
        with self._cond:
            self._waiting.append(ticket)
            while not ticket.done and self._leading:
                self._cond.wait()
            if ticket.done:
                return self._result(ticket)
            self._leading = True
            group, self._waiting = self._waiting[:MAX_GROUP], self._waiting[MAX_GROUP:]
        try:
            self._run(group)
        finally:
            with self._cond:
                self._leading = False
                self._cond.notify_all()
        return self._result(ticket)

    @staticmethod
    def _result(ticket: _Ticket) -> int:
        if ticket.error is not None:
            raise ticket.error
        return ticket.added

    def _run(self, group: list[_Ticket]) -> None:
        error: BaseException | None = None
        added = 0
        try:
            for folder in dict.fromkeys(f for t in group for f in t.folders):
                fsync_dir(folder)
            rows = [r for t in group for r in t.routed]
            added = self._enqueue(rows, self._clock()) if rows else 0
        except BaseException as exc:  # every ticket of the group gets the error: all or none
            error = exc
        with self._cond:
            for t in group:
                t.done, t.error = True, error
                t.added = added if error is None else 0
            if error is None:
                self.groups += 1
                self.instances += sum(len(t.routed) for t in group)
