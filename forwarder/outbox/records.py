"""What the outbox hands out and takes in: states, outcomes, rows and its errors."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

from forwarder.dicomfile import DicomInfo

__all__ = [
    "FINAL_STATES",
    "Commitment",
    "Delivery",
    "DestinationInfo",
    "Heartbeat",
    "Mark",
    "OutboxBusyError",
    "OutboxCorruptError",
    "OutboxError",
    "OutboxFullError",
    "OutboxReadOnlyError",
    "PathConflictError",
    "Pruned",
    "State",
]


class State(IntEnum):
    """Where one delivery stands; mirrored by the ``CHECK`` on ``deliveries.state``."""

    PENDING = 0
    """Waiting, possibly until ``next_attempt_at`` after a transient failure."""
    INFLIGHT = 1
    """Claimed by a worker under a lease (``lease_until``)."""
    SENT = 2
    """The peer answered success or warning."""
    QUARANTINED = 3
    """Permanent failure, or retries exhausted, for this destination."""
    GONE = 4
    """The source file disappeared before it could be sent."""
    COMMITTING = 5
    """Stored, awaiting the peer's Storage Commitment (``commit_uid`` is the transaction);
    not final: the file stays until the peer commits, and a failed reference sends it again."""


FINAL_STATES: Final = frozenset({State.SENT, State.QUARANTINED, State.GONE})
"""States that carry a ``done_at``. `State.COMMITTING` is not one: its file is kept."""


class OutboxError(Exception):
    """The outbox cannot do what was asked (bad database, closed, read-only, SQLite error)."""


class OutboxBusyError(OutboxError):
    """Another process held the write lock for longer than the busy timeout."""


class PathConflictError(OutboxError):
    """Moving rows to a new path would collide with rows already there for the same file."""


class OutboxFullError(OutboxError):
    """The disk (or the file system's quota) holding the outbox is full: nothing was written.

    Transient: the same write succeeds once space is freed.
    """


class OutboxCorruptError(OutboxError):
    """The outbox file is damaged (SQLite reports a malformed page or a non-database file).

    Not transient: restore the file from a backup (see ``forwarder outbox check``).
    """


class OutboxReadOnlyError(OutboxError):
    """The outbox file, or its folder, cannot be written (permissions, read-only mount)."""


@dataclass(frozen=True)
class Mark:
    """One outcome for `Outbox.mark_many`: the state a delivery goes to, and why."""

    delivery_id: int
    state: State
    """SENT, PENDING (a retry, due at `next_attempt_at`), QUARANTINED, GONE, or COMMITTING
    (stored; awaiting the commitment of transaction `commit_uid`, which a batch still being
    sent holds back until `next_attempt_at`)."""
    status: int | None = None
    error: str | None = None
    """The reason; for SENT, the warning (or None)."""
    next_attempt_at: float | None = None
    count_attempt: bool = True
    refusal: bool = False
    """The peer refused this instance (counted in ``refusals`` as well as ``attempts``), as
    opposed to a transient failure (out of resources, no response)."""
    sent_as: str | None = None
    """For SENT: how it went out ("as is", "converted to ...", "decompressed to ...")."""
    sent_uid: str | None = None
    """For SENT: the SOP Instance UID that went out, when a transform changed it."""
    commit_uid: str | None = None
    """For COMMITTING: the Transaction UID the row waits on (opened if new: first due at
    `next_attempt_at`, or at once without it)."""


@dataclass(frozen=True)
class Commitment:
    """One open Storage Commitment transaction (a row of ``commitments``)."""

    uid: str
    """The Transaction UID."""
    destination: str
    created_at: float
    asked_at: float | None
    """When the peer last accepted the request (None: never yet)."""
    attempts: int
    """Requests (N-ACTION-RQ) sent for it."""
    next_ask_at: float
    """When it is asked (again): at once when opened, ``timeout_seconds`` after a request
    the peer accepted, later after one it did not."""
    last_status: int | None
    last_error: str | None


@dataclass(frozen=True)
class Delivery:
    """One row of the outbox: one file to one destination, as handed to workers and the CLI.

    The file's facts are `file`, as the enqueuer inspected them; the properties below read
    them for callers that want one fact.
    """

    id: int
    file: DicomInfo
    """The file as queued. For a row queued without a data set offset (`offset_known` is
    False) its ``dataset_offset`` is 0 and means nothing: read the file meta again."""
    destination: str
    state: State
    attempts: int
    next_attempt_at: float
    first_attempt_at: float | None
    last_attempt_at: float | None
    last_status: int | None
    last_error: str | None
    created_at: float
    done_at: float | None
    offset_known: bool = True
    """False for a row queued by a version that did not record the data set offset."""
    refusals: int = 0
    """Of `attempts`, those the peer refused the instance itself; the rest were transient."""
    sent_as: str | None = None
    """Once SENT: "as is", "converted to ..." or "decompressed to ..." (None before, or for
    rows sent by a version that did not record it)."""
    sent_uid: str | None = None
    """Once SENT by a destination whose transform gave the instance a new SOP Instance UID
    (de-identification): that UID; None otherwise."""
    commit_uid: str | None = None
    """While COMMITTING: the Storage Commitment transaction it waits on."""

    @property
    def stored_uid(self) -> str:
        """The SOP Instance UID the peer holds: `sent_uid` or the instance's own."""
        return self.sent_uid or self.file.sop_instance_uid

    @property
    def path(self) -> str:
        """The file's path as ``str`` (``os.fsdecode`` of the stored bytes)."""
        return str(self.file.path)

    @property
    def size(self) -> int:
        return self.file.size

    @property
    def mtime_ns(self) -> int:
        return self.file.mtime_ns

    @property
    def sop_class_uid(self) -> str:
        return self.file.sop_class_uid

    @property
    def sop_instance_uid(self) -> str:
        return self.file.sop_instance_uid

    @property
    def transfer_syntax(self) -> str:
        return self.file.transfer_syntax

    @property
    def study_uid(self) -> str | None:
        return self.file.study_uid

    @property
    def dataset_offset(self) -> int | None:
        """Where the data set starts, from the enqueuer's inspection, so a worker need not
        read the file meta again; None when the row does not know it (`offset_known`)."""
        return self.file.dataset_offset if self.offset_known else None

    @property
    def transient_failures(self) -> int:
        """Attempts that failed for a passing reason (out of resources, no response)."""
        stored = self.state in (State.SENT, State.COMMITTING)
        return max(0, self.attempts - self.refusals - stored)


@dataclass(frozen=True)
class DestinationInfo:
    """Circuit-breaker state of one destination (a row of the ``destinations`` table)."""

    name: str
    paused_until: float | None
    pause_reason: str | None
    paused_at: float | None
    """When the current pause began (kept while a pause is extended); None when not paused."""
    last_success_at: float | None
    last_error: str | None
    last_error_at: float | None
    consecutive_failures: int

    def paused(self, now: float) -> bool:
        """Return True while claims for this destination return nothing."""
        return self.paused_until is not None and self.paused_until > now


@dataclass(frozen=True)
class Heartbeat:
    """The daemon's last sign of life."""

    pid: int
    updated_at: float
    started_at: float
    info: dict[str, Any]


@dataclass(frozen=True)
class Pruned:
    """What one call of `Outbox.prune_delivered` did."""

    deleted: int
    """Rows deleted."""
    last: tuple[float, int] | None
    """The ``(done_at, id)`` of the last row looked at (the ``after`` given when none was):
    where the next call goes on."""
    done: bool
    """No row done before ``before`` is left past `last`: the pass is over, and ``before`` is
    recorded as the retention horizon."""
