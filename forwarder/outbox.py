"""Outbox: the durable SQLite queue of deliveries, one row per (file, destination).

This is the only module that touches SQLite. Every other module sees frozen dataclasses
(`FileRecord` in, `Delivery`, `DestinationInfo`, `Heartbeat` out) and `OutboxError`.

Durability
----------
The database runs in WAL mode with ``synchronous=FULL``: every commit is fsynced to the WAL
before it returns, so a kill -9, a crash or a power loss at any point leaves either the whole
of a change or none of it. Every change is one short ``BEGIN IMMEDIATE`` transaction, taken
before the first read of the change so that two writers never deadlock upgrading their locks.
Nothing is ever dequeued destructively: a claimed row stays in the table as ``INFLIGHT`` under
a lease (``lease_until``) and returns to ``PENDING`` when the lease expires
(`Outbox.recover_leases`), or at once at daemon start-up (``all_inflight=True``).

Threads and processes
---------------------
One `Outbox` is shared by the threads of the daemon (one enqueuer, N sender workers, one
housekeeping thread), and operator CLI processes open their own. Each thread gets its own
connection (`threading.local`), because:

* readers never wait: each read runs on its own WAL snapshot, also while another thread of the
  daemon is in the middle of a commit (an fsync can take milliseconds) -- a single shared
  connection behind a lock would make every ``counts()`` for the metrics endpoint queue behind
  every commit;
* writers of one process queue on one in-process lock (`threading.Lock`) around the
  ``BEGIN IMMEDIATE ... COMMIT`` instead of SQLite's busy handler: N workers marking rows at
  the same time are served one after the other at once. Waiting for *other processes* (a CLI
  ``retry``, whose transactions are as short as ours) is a loop of short jittered polls up to
  ``busy_timeout`` (`_BUSY_POLL`), not SQLite's busy handler: that one sleeps up to 100 ms
  between tries and, against a busy daemon, a CLI writer using it was starved outright in
  tests (it kept waking up inside the daemon's transactions).

The connections are opened with ``check_same_thread=False`` only so that `Outbox.close` (and the
opening of a connection for a new thread) can close the connections of threads that are gone;
a connection is never used by two live threads. Call `Outbox.close` once the threads using the
outbox have stopped.

Measured on the development VM (tests/test_outbox.py builds the same backlog): one commit
with ``synchronous=FULL`` costs about 0.3 ms against 0.13 ms with NORMAL -- nothing next to a
C-STORE, so we keep FULL; ``enqueue_many`` writes about 60,000 rows/s, ``claim`` of 64 rows
out of a 100,000-row backlog takes about 1.3 ms through the ``deliveries_claim`` index, and
the file grows by about 430 bytes per row.

A CLI opens the outbox with ``readonly=True`` for queries: a ``mode=ro`` connection that never
writes, never migrates and reads a WAL snapshot without blocking the daemon or being blocked by it
(like any WAL reader, it may create the empty ``-wal``/``-shm`` files beside the database).

Schema
------
Versioned with ``PRAGMA user_version``; `MIGRATIONS` takes a database from any older version
to `SCHEMA_VERSION`, one transaction per step. States are the `State` IntEnum, mirrored by a
``CHECK`` constraint, and the tables are ``STRICT``. The SQL lives below as constants with
``?``/``:name`` placeholders; the few queries with optional filters are joined from constant
fragments, never from values. Paths are stored as the bytes of the name (``os.fsencode``) and
handed out as ``str`` (``os.fsdecode``): a name that is not UTF-8 round-trips exactly.

Errors
------
Every SQLite error becomes an `OutboxError`; the ones a caller acts on have subclasses:
`OutboxBusyError` (another process held the lock too long), `OutboxFullError` (no space:
transient), `OutboxReadOnlyError` (the file or folder cannot be written; found when a writer
opens the outbox, not at its first write), `OutboxCorruptError` (damaged pages: restore from a
backup; `Outbox.integrity_check` finds them all).
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

__all__ = [
    "FINAL_STATES",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Delivery",
    "DestinationInfo",
    "FileRecord",
    "Heartbeat",
    "Mark",
    "Outbox",
    "OutboxBusyError",
    "OutboxCorruptError",
    "OutboxError",
    "OutboxFullError",
    "OutboxReadOnlyError",
    "PathConflictError",
    "State",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_SQLITE: Final = (3, 37, 0)
"""Oldest SQLite library we run on: ``UPDATE ... RETURNING`` (3.35) and ``STRICT`` tables (3.37)."""

BUSY_TIMEOUT_SECONDS: Final = 10.0
"""Default wait for another process's write transaction before `OutboxBusyError`."""

_BUSY_POLL: Final = (0.0005, 0.004)
"""First and longest pause (seconds, before jitter) between tries of a locked database."""

PRUNE_BATCH: Final = 5000
"""Rows deleted per transaction by `Outbox.prune`, so a big prune never holds the lock long."""


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


FINAL_STATES: Final = frozenset({State.SENT, State.QUARANTINED, State.GONE})
"""States that carry a ``done_at``."""


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
class FileRecord:
    """What the enqueuer knows about one complete DICOM file.

    ``(path, size, mtime_ns)`` identifies one version of one file: the same path with another
    size or mtime is another file.
    """

    path: str
    size: int
    mtime_ns: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    study_uid: str | None
    dataset_offset: int | None = None
    """Where the data set starts (after preamble and file meta), as inspected; None: unknown."""


@dataclass(frozen=True)
class Mark:
    """One outcome for `Outbox.mark_many`: the state a delivery goes to, and why."""

    delivery_id: int
    state: State
    """SENT, PENDING (a retry, due at `next_attempt_at`), QUARANTINED or GONE."""
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


@dataclass(frozen=True)
class Delivery:
    """One row of the outbox: one file to one destination, as handed to workers and the CLI."""

    id: int
    path: str
    destination: str
    state: State
    size: int
    mtime_ns: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    study_uid: str | None
    attempts: int
    next_attempt_at: float
    first_attempt_at: float | None
    last_attempt_at: float | None
    last_status: int | None
    last_error: str | None
    created_at: float
    done_at: float | None
    dataset_offset: int | None = None
    """From the enqueuer's inspection, so a worker need not read the file meta again; None
    for rows queued by an older version."""
    refusals: int = 0
    """Of `attempts`, those the peer refused the instance itself; the rest were transient."""
    sent_as: str | None = None
    """Once SENT: "as is", "converted to ..." or "decompressed to ..." (None before, or for
    rows sent by an older version)."""

    @property
    def transient_failures(self) -> int:
        """Attempts that failed for a passing reason (out of resources, no response)."""
        return max(0, self.attempts - self.refusals - (self.state is State.SENT))


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


# --------------------------------------------------------------------------------------------
# Schema. Each migration takes the database from the version before it to its own version in
# one transaction; its last statement sets PRAGMA user_version (a literal: pragmas take no
# parameters). Never edit a released migration: append a new one.

_SCHEMA_V1: Final[tuple[str, ...]] = (
    """
    CREATE TABLE IF NOT EXISTS deliveries (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, even after prune
        path             TEXT    NOT NULL CHECK (path <> ''),
        size             INTEGER NOT NULL CHECK (size >= 0),
        mtime_ns         INTEGER NOT NULL,
        sop_class_uid    TEXT    NOT NULL,
        sop_instance_uid TEXT    NOT NULL,
        transfer_syntax  TEXT    NOT NULL,
        study_uid        TEXT,
        destination      TEXT    NOT NULL CHECK (destination <> ''),
        -- State: 0 PENDING, 1 INFLIGHT, 2 SENT, 3 QUARANTINED, 4 GONE
        state            INTEGER NOT NULL DEFAULT 0 CHECK (state IN (0, 1, 2, 3, 4)),
        attempts         INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
        next_attempt_at  REAL    NOT NULL,
        lease_until      REAL,
        first_attempt_at REAL,
        last_attempt_at  REAL,
        last_status      INTEGER,
        last_error       TEXT,
        created_at       REAL    NOT NULL,
        updated_at       REAL    NOT NULL,
        done_at          REAL,
        CHECK ((state = 1) = (lease_until IS NOT NULL)),       -- leased iff INFLIGHT
        CHECK ((state IN (2, 3, 4)) = (done_at IS NOT NULL))   -- done iff final
    ) STRICT
    """,
    # claim, next_due, counts (covering), retry_now by destination
    """
    CREATE INDEX IF NOT EXISTS deliveries_claim
        ON deliveries (destination, state, next_attempt_at)
    """,
    # dedup key: is_known, enqueue, file_states; its prefix serves lookups by path
    # (set_path, list(path=...), prune's sibling check), so there is no separate path index
    """
    CREATE UNIQUE INDEX IF NOT EXISTS deliveries_file
        ON deliveries (path, size, mtime_ns, destination)
    """,
    "CREATE INDEX IF NOT EXISTS deliveries_sop ON deliveries (sop_instance_uid)",
    "CREATE INDEX IF NOT EXISTS deliveries_study ON deliveries (study_uid)",
    # sent_since and prune (state = 2), recover_leases (state = 1), list(states=...)
    "CREATE INDEX IF NOT EXISTS deliveries_done ON deliveries (state, done_at)",
    # oldest_pending (named with INDEXED BY: the planner would pick deliveries_done and then
    # read every backlog row from the table, 3x slower); only the backlog is in it
    """
    CREATE INDEX IF NOT EXISTS deliveries_backlog
        ON deliveries (destination, created_at) WHERE state IN (0, 1)
    """,
    """
    CREATE TABLE IF NOT EXISTS destinations (
        name                 TEXT PRIMARY KEY,
        paused_until         REAL,
        pause_reason         TEXT,
        paused_at            REAL,
        last_success_at      REAL,
        last_error           TEXT,
        last_error_at        REAL,
        consecutive_failures INTEGER NOT NULL DEFAULT 0 CHECK (consecutive_failures >= 0)
    ) STRICT
    """,
    """
    CREATE TABLE IF NOT EXISTS heartbeat (
        id         INTEGER PRIMARY KEY CHECK (id = 1),
        pid        INTEGER NOT NULL,
        updated_at REAL    NOT NULL,
        started_at REAL    NOT NULL,
        info       TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(info))
    ) STRICT
    """,
    "PRAGMA user_version = 1",
)

_SCHEMA_V2: Final[tuple[str, ...]] = (
    # the data set offset found by the enqueuer: workers stat the file instead of reading
    # its file meta again before every send (NULL for rows queued before)
    "ALTER TABLE deliveries ADD COLUMN dataset_offset INTEGER CHECK (dataset_offset >= 0)",
    "PRAGMA user_version = 2",
)

# Version 3 rebuilds the table (a STRICT column's type cannot be altered):
# * ``path`` becomes a BLOB holding the name's bytes (``os.fsencode``). Names on Linux are bytes,
#   not text: a Latin-1 ``\xe9`` cannot be stored as TEXT at all (it killed the enqueuer). Old
#   rows keep their UTF-8 bytes, which is what ``os.fsencode`` gives for them.
# * ``refusals`` counts the attempts the peer refused the instance itself (0xCxxx, 0x0110,
#   0x021x, an unreadable file), apart from transient failures (0xA7xx, no response), so the
#   policy limits each on its own.
# The AUTOINCREMENT counter is carried over, so ids stay never reused.
_SCHEMA_V3: Final[tuple[str, ...]] = (
    """
    CREATE TABLE deliveries_v3 (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        path             BLOB    NOT NULL CHECK (length(path) > 0),
        size             INTEGER NOT NULL CHECK (size >= 0),
        mtime_ns         INTEGER NOT NULL,
        sop_class_uid    TEXT    NOT NULL,
        sop_instance_uid TEXT    NOT NULL,
        transfer_syntax  TEXT    NOT NULL,
        study_uid        TEXT,
        destination      TEXT    NOT NULL CHECK (destination <> ''),
        -- State: 0 PENDING, 1 INFLIGHT, 2 SENT, 3 QUARANTINED, 4 GONE
        state            INTEGER NOT NULL DEFAULT 0 CHECK (state IN (0, 1, 2, 3, 4)),
        attempts         INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
        next_attempt_at  REAL    NOT NULL,
        lease_until      REAL,
        first_attempt_at REAL,
        last_attempt_at  REAL,
        last_status      INTEGER,
        last_error       TEXT,
        created_at       REAL    NOT NULL,
        updated_at       REAL    NOT NULL,
        done_at          REAL,
        dataset_offset   INTEGER CHECK (dataset_offset >= 0),
        refusals         INTEGER NOT NULL DEFAULT 0 CHECK (refusals BETWEEN 0 AND attempts),
        CHECK ((state = 1) = (lease_until IS NOT NULL)),       -- leased iff INFLIGHT
        CHECK ((state IN (2, 3, 4)) = (done_at IS NOT NULL))   -- done iff final
    ) STRICT
    """,
    """
    INSERT INTO deliveries_v3 (id, path, size, mtime_ns, sop_class_uid, sop_instance_uid,
                               transfer_syntax, study_uid, destination, state, attempts,
                               next_attempt_at, lease_until, first_attempt_at,
                               last_attempt_at, last_status, last_error, created_at,
                               updated_at, done_at, dataset_offset)
    SELECT id, CAST(path AS BLOB), size, mtime_ns, sop_class_uid, sop_instance_uid,
           transfer_syntax, study_uid, destination, state, attempts, next_attempt_at,
           lease_until, first_attempt_at, last_attempt_at, last_status, last_error,
           created_at, updated_at, done_at, dataset_offset
      FROM deliveries
    """,
    """
    DELETE FROM sqlite_sequence WHERE name = 'deliveries_v3'
    """,
    """
    INSERT INTO sqlite_sequence (name, seq)
    SELECT 'deliveries_v3', max(coalesce((SELECT seq FROM sqlite_sequence
                                           WHERE name = 'deliveries'), 0),
                                coalesce((SELECT max(id) FROM deliveries_v3), 0))
    """,
    "DROP TABLE deliveries",
    "ALTER TABLE deliveries_v3 RENAME TO deliveries",
    *(sql for sql in _SCHEMA_V1 if "INDEX" in sql and "ON deliveries " in sql),
    "PRAGMA user_version = 3",
)

_SCHEMA_V4_SENT_AS: Final[tuple[str, ...]] = (
    # how a SENT delivery went out: "as is", "converted to <syntax>", "decompressed to <syntax>"
    # (a peer that refused the file's own syntax got something else: the operator must see it)
    "ALTER TABLE deliveries ADD COLUMN sent_as TEXT",
    "PRAGMA user_version = 4",
)

MIGRATIONS: Final[tuple[tuple[int, tuple[str, ...]], ...]] = (
    (1, _SCHEMA_V1),
    (2, _SCHEMA_V2),
    (3, _SCHEMA_V3),
    (4, _SCHEMA_V4_SENT_AS),
)
"""(version reached, statements) in order; version 0 is an empty database."""

SCHEMA_VERSION: Final = MIGRATIONS[-1][0]
"""The ``PRAGMA user_version`` this module reads and writes."""

# Per-connection settings. journal_mode is persistent and set once by a writer (below).
_PRAGMAS: Final[tuple[str, ...]] = (
    "PRAGMA synchronous = FULL",  # fsync the WAL at every commit: survives power loss
    "PRAGMA journal_size_limit = 67108864",  # truncate the WAL back to 64 MiB after checkpoints
)
_PRAGMA_WAL: Final = "PRAGMA journal_mode = WAL"
_PRAGMA_QUERY_ONLY: Final = "PRAGMA query_only = ON"
_GET_VERSION: Final = "PRAGMA user_version"
_PROBE_WRITE: Final = f"PRAGMA user_version = {SCHEMA_VERSION}"
"""Rewrites the header with the version it has: a write that changes nothing, to find a
read-only file (SQLite opens one read-only without a word) when it is opened, not later."""

# --------------------------------------------------------------------------------------------
# Statements.

_COLUMNS: Final = (
    "id, path, destination, state, size, mtime_ns, sop_class_uid, sop_instance_uid, "
    "transfer_syntax, study_uid, attempts, next_attempt_at, first_attempt_at, "
    "last_attempt_at, last_status, last_error, created_at, done_at, dataset_offset, refusals, "
    "sent_as"
)
_SELECT: Final = "SELECT " + _COLUMNS + " FROM deliveries"

SQL_IS_KNOWN: Final = """
    SELECT 1 FROM deliveries WHERE path = ? AND size = ? AND mtime_ns = ? LIMIT 1
"""

_MANY: Final = 500
"""Paths per ``IN (...)`` look-up of the batch queries (SQLite allows 32,766 parameters)."""

SQL_ENQUEUE: Final = """
    INSERT INTO deliveries (path, size, mtime_ns, sop_class_uid, sop_instance_uid,
                            transfer_syntax, study_uid, destination, state, attempts,
                            next_attempt_at, created_at, updated_at, dataset_offset)
    VALUES (:path, :size, :mtime_ns, :sop_class_uid, :sop_instance_uid,
            :transfer_syntax, :study_uid, :destination, 0, 0,
            :now, :now, :now, :dataset_offset)
    ON CONFLICT (path, size, mtime_ns, destination) DO NOTHING
"""

SQL_PAUSED_UNTIL: Final = """
    SELECT paused_until FROM destinations WHERE name = ? AND paused_until > ?
"""

SQL_COUNT_DUE: Final = """
    SELECT count(*) FROM (SELECT 1 FROM deliveries
                           WHERE destination = :destination AND state = 0
                             AND next_attempt_at <= :now
                           LIMIT :cap)
"""

SQL_CLAIM: Final = (
    """
    UPDATE deliveries
       SET state = 1, lease_until = :lease_until, updated_at = :now
     WHERE id IN (SELECT id FROM deliveries
                   WHERE destination = :destination AND state = 0
                     AND next_attempt_at <= :now
                   ORDER BY next_attempt_at, id
                   LIMIT :limit)
    RETURNING """
    + _COLUMNS
)

SQL_MARK_SENT: Final = """
    UPDATE deliveries
       SET state = 2, lease_until = NULL, done_at = :now, updated_at = :now,
           attempts = attempts + 1, first_attempt_at = coalesce(first_attempt_at, :now),
           last_attempt_at = :now, last_status = :status, last_error = :warning,
           sent_as = :sent_as
     WHERE id = :id AND state <> 2
    RETURNING destination
"""

SQL_DEST_SUCCESS: Final = """
    INSERT INTO destinations (name, last_success_at, consecutive_failures)
    VALUES (:name, :now, 0)
    ON CONFLICT (name) DO UPDATE
       SET last_success_at = excluded.last_success_at, consecutive_failures = 0
"""

SQL_MARK_RETRY: Final = """
    UPDATE deliveries
       SET state = 0, lease_until = NULL, next_attempt_at = :next_attempt_at,
           updated_at = :now, last_attempt_at = :now,
           last_status = :status, last_error = :error,
           attempts = attempts + :counted, refusals = refusals + :refusal,
           first_attempt_at = CASE WHEN :counted THEN coalesce(first_attempt_at, :now)
                                   ELSE first_attempt_at END
     WHERE id = :id AND state = 1
"""

SQL_MARK_QUARANTINED: Final = """
    UPDATE deliveries
       SET state = 3, lease_until = NULL, done_at = :now, updated_at = :now,
           attempts = attempts + 1, refusals = refusals + :refusal,
           first_attempt_at = coalesce(first_attempt_at, :now),
           last_attempt_at = :now, last_status = :status, last_error = :error
     WHERE id = :id AND state = 1
"""

SQL_MARK_GONE: Final = """
    UPDATE deliveries
       SET state = 4, lease_until = NULL, done_at = :now, updated_at = :now,
           last_error = :error
     WHERE id = :id AND state = 1
"""

SQL_RELEASE: Final = """
    UPDATE deliveries SET state = 0, lease_until = NULL, updated_at = :now
     WHERE id = :id AND state = 1
"""

SQL_RECOVER_EXPIRED: Final = """
    UPDATE deliveries SET state = 0, lease_until = NULL, updated_at = :now
     WHERE state = 1 AND lease_until <= :now
"""

SQL_RECOVER_ALL: Final = """
    UPDATE deliveries SET state = 0, lease_until = NULL, updated_at = :now
     WHERE state = 1
"""

SQL_FILE_STATES: Final = """
    SELECT destination, state FROM deliveries WHERE path = ? AND size = ? AND mtime_ns = ?
"""

SQL_SET_PATH: Final = """
    UPDATE deliveries SET path = :new_path, updated_at = coalesce(:now, updated_at)
     WHERE path = :old_path
"""

SQL_NEXT_DUE: Final = """
    SELECT min(next_attempt_at) FROM deliveries WHERE destination = ? AND state = 0
"""

SQL_PAUSE: Final = """
    INSERT INTO destinations (name, paused_until, pause_reason, paused_at)
    VALUES (:name, :until, :reason, :now)
    ON CONFLICT (name) DO UPDATE
       SET paused_until = excluded.paused_until,
           pause_reason = excluded.pause_reason,
           paused_at = CASE WHEN destinations.paused_until > excluded.paused_at
                            THEN coalesce(destinations.paused_at, excluded.paused_at)
                            ELSE excluded.paused_at END
"""

SQL_RESUME: Final = """
    UPDATE destinations SET paused_until = NULL, pause_reason = NULL, paused_at = NULL
     WHERE name = ?
"""

SQL_DEST_ERROR: Final = """
    INSERT INTO destinations (name, last_error, last_error_at, consecutive_failures)
    VALUES (:name, :error, :now, 1)
    ON CONFLICT (name) DO UPDATE
       SET last_error = excluded.last_error, last_error_at = excluded.last_error_at,
           consecutive_failures = destinations.consecutive_failures + 1
"""

SQL_DEST_INFO: Final = """
    SELECT name, paused_until, pause_reason, paused_at, last_success_at, last_error,
           last_error_at, consecutive_failures
      FROM destinations ORDER BY name
"""

SQL_HEARTBEAT: Final = """
    INSERT INTO heartbeat (id, pid, updated_at, started_at, info)
    VALUES (1, :pid, :now, :started_at, :info)
    ON CONFLICT (id) DO UPDATE
       SET pid = excluded.pid, updated_at = excluded.updated_at,
           started_at = excluded.started_at, info = excluded.info
"""

SQL_READ_HEARTBEAT: Final = "SELECT pid, updated_at, started_at, info FROM heartbeat WHERE id = 1"

SQL_COUNTS: Final = """
    SELECT destination, state, count(*) FROM deliveries GROUP BY destination, state
"""

SQL_SENT_SINCE: Final = """
    SELECT destination, count(*) FROM deliveries
     WHERE state = 2 AND done_at >= ? GROUP BY destination
"""

SQL_OLDEST_PENDING: Final = """
    SELECT destination, min(created_at) FROM deliveries INDEXED BY deliveries_backlog
     WHERE state IN (0, 1) GROUP BY destination
"""

# bare columns with max(): SQLite returns them from the row holding the maximum. The states
# filter reads the backlog and the quarantined rows through deliveries_done, not the SENT bulk.
SQL_LAST_FAILURES: Final = (
    "SELECT "
    + _COLUMNS
    + """, max(last_attempt_at) FROM deliveries
     WHERE state IN (0, 1, 3) AND last_error IS NOT NULL GROUP BY destination
"""
)

SQL_FIND: Final = _SELECT + " WHERE sop_instance_uid = :uid OR study_uid = :uid ORDER BY id"

# Optional filters, joined with AND in a fixed order; values only ever go through placeholders.
_LIST_FILTERS: Final[tuple[tuple[str, str], ...]] = (
    ("destination", "destination = :destination"),
    ("states", "state IN (SELECT value FROM json_each(:states))"),
    ("study_uid", "study_uid = :study_uid"),
    ("path", "path = :path"),
)
_LIST_ORDER: Final = " ORDER BY id LIMIT :limit"

_RETRY_NOW_BASE: Final = """
    UPDATE deliveries SET next_attempt_at = :now, updated_at = :now
     WHERE state = 0 AND next_attempt_at > :now"""
_RETRY_NOW_FILTERS: Final[tuple[tuple[str, str], ...]] = (
    ("destination", "destination = :destination"),
    ("study_uid", "study_uid = :study_uid"),
)

SQL_REQUEUE: Final = """
    UPDATE deliveries
       SET state = 0, attempts = 0, refusals = 0, first_attempt_at = NULL, next_attempt_at = :now,
           lease_until = NULL, done_at = NULL, updated_at = :now,
           path = coalesce(:new_path, path)
     WHERE id = :id AND state IN (3, 4)
"""

SQL_DISCARD: Final = """
    UPDATE deliveries SET state = 4, last_error = :reason, updated_at = :now
     WHERE id = :id AND state = 3
"""

SQL_PRUNE: Final = """
    DELETE FROM deliveries WHERE id IN (
        SELECT d.id FROM deliveries AS d
         WHERE d.state = 2 AND d.done_at < :older_than
           AND NOT EXISTS (SELECT 1 FROM deliveries AS o
                            WHERE o.path = d.path AND o.size = d.size
                              AND o.mtime_ns = d.mtime_ns AND o.state IN (0, 1, 3))
         LIMIT :batch)
"""

SQL_INTEGRITY: Final = "PRAGMA integrity_check"
SQL_QUICK_CHECK: Final = "PRAGMA quick_check"


def _compose(base: str, fragments: Sequence[tuple[str, str]], given: Mapping[str, Any]) -> str:
    """Join `base` with the constant fragments whose key has a non-None value in `given`."""
    clauses = [sql for key, sql in fragments if given.get(key) is not None]
    return base + "".join(" AND " + sql for sql in clauses)


def _delivery(row: Sequence[Any]) -> Delivery:
    return Delivery(
        id=row[0],
        path=_path_str(row[1]),
        destination=row[2],
        state=State(row[3]),
        size=row[4],
        mtime_ns=row[5],
        sop_class_uid=row[6],
        sop_instance_uid=row[7],
        transfer_syntax=row[8],
        study_uid=row[9],
        attempts=row[10],
        next_attempt_at=row[11],
        first_attempt_at=row[12],
        last_attempt_at=row[13],
        last_status=row[14],
        last_error=row[15],
        created_at=row[16],
        done_at=row[17],
        dataset_offset=row[18],
        refusals=row[19],
        sent_as=row[20],
    )


def _path_bytes(path: str) -> bytes:
    """A path as stored: its bytes on disk (a name that is not UTF-8 survives the round trip)."""
    return os.fsencode(path)


def _path_str(stored: bytes) -> str:
    """A stored path back as the str the rest of the program uses (``os.fsdecode``)."""
    return os.fsdecode(stored)


def _check_absolute(path: str) -> None:
    if not os.path.isabs(path):
        raise ValueError(f"outbox paths must be absolute, got {path!r}")


def _is_unique_violation(exc: BaseException | None) -> bool:
    return (
        isinstance(exc, sqlite3.IntegrityError)
        and getattr(exc, "sqlite_errorname", "") == "SQLITE_CONSTRAINT_UNIQUE"
    )


def _is_busy(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))


def _translate(exc: sqlite3.Error, what: str) -> OutboxError:
    """Map a SQLite error to the outbox's exceptions (callers never import sqlite3)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if _is_busy(exc):
        return OutboxBusyError(f"{what}: the outbox is locked by another process ({exc})")
    if name == "SQLITE_FULL":
        return OutboxFullError(f"{what}: the disk holding the outbox is full ({exc})")
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return OutboxCorruptError(f"{what}: the outbox is damaged ({exc})")
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")):
        return OutboxReadOnlyError(f"{what}: the outbox cannot be written ({exc})")
    return OutboxError(f"{what}: {exc}")


class Outbox:
    """The durable queue of deliveries in one SQLite file.

    Parameters
    ----------
    path
        The database file. Unless `readonly`, its parent directory is created, and so is the
        schema, and an older schema is migrated to `SCHEMA_VERSION`.
    readonly
        Open with ``mode=ro`` for queries (the CLI): nothing is ever written, writing methods
        raise `OutboxError`, and queries read a WAL snapshot without blocking the daemon.
    busy_timeout
        Seconds to wait for another process's write transaction before `OutboxBusyError`.

    Raises
    ------
    OutboxError
        When the file or its directory cannot be opened or created, the file is not an
        outbox, its schema is newer than this code, a read-only open finds no database or an
        older schema, or the SQLite library is too old.

    Notes
    -----
    Every method takes the time as ``now`` (unix seconds) and never reads the clock, so tests
    drive time. Methods are safe to call from any thread; see the module docstring.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        readonly: bool = False,
        busy_timeout: float = BUSY_TIMEOUT_SECONDS,
    ) -> None:
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise OutboxError(
                f"SQLite {sqlite3.sqlite_version} is too old for the outbox "
                f"(needs {'.'.join(map(str, MIN_SQLITE))} or later)"
            )
        self._path = Path(path).absolute()
        self._readonly = readonly
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._conns: dict[threading.Thread, sqlite3.Connection] = {}
        self._conns_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        self._started_at: float | None = None
        if readonly:
            if not self._path.is_file():
                raise OutboxError(f"no outbox at {self._path}")
        else:
            try:
                self._path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutboxError(f"cannot create {self._path.parent}: {exc.strerror}") from exc
        try:
            conn = self._connection()
            if not readonly:
                mode = self._patiently(lambda: conn.execute(_PRAGMA_WAL).fetchone()[0])
                if str(mode).lower() != "wal":
                    raise OutboxError(f"{self._path}: cannot use WAL mode (journal_mode={mode})")
                self._migrate(conn)
            version = conn.execute(_GET_VERSION).fetchone()[0]
            if not readonly and version == SCHEMA_VERSION:
                try:
                    with self._write(f"writing to {self._path}") as probe:
                        probe.execute(_PROBE_WRITE)
                except OutboxFullError as exc:  # writable, just no room now: the caller copes
                    log.warning("outbox: %s", exc)
        except sqlite3.Error as exc:
            self.close()
            raise _translate(exc, f"opening {self._path}") from exc
        except BaseException:
            self.close()
            raise
        if version != SCHEMA_VERSION:
            self.close()
            if version > SCHEMA_VERSION:
                raise OutboxError(
                    f"{self._path} has schema version {version}, newer than this forwarder "
                    f"understands ({SCHEMA_VERSION}); upgrade the forwarder"
                )
            raise OutboxError(
                f"{self._path} has schema version {version}, this forwarder needs "
                f"{SCHEMA_VERSION}; start the daemon once (read-write) to migrate it"
            )

    # ---------------------------------------------------------------------------- plumbing

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def readonly(self) -> bool:
        """True when opened with ``readonly=True``."""
        return self._readonly

    def __repr__(self) -> str:
        mode = "ro" if self._readonly else "rw"
        return f"<Outbox {self._path} ({mode}{', closed' if self._closed else ''})>"

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close every connection of every thread. Idempotent; later calls raise `OutboxError`.

        Call it once the threads that use the outbox have stopped.
        """
        with self._conns_lock:
            self._closed = True
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            conn.close()

    def _open(self) -> sqlite3.Connection:
        if self._readonly:
            target, uri = self._path.as_uri() + "?mode=ro", True
        else:
            target, uri = str(self._path), False
        conn = sqlite3.connect(
            target,
            timeout=0,  # no SQLite busy handler: `_patiently` waits instead
            isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
            check_same_thread=False,  # see the module docstring; only close() crosses threads
            uri=uri,
        )
        try:
            for pragma in _PRAGMAS:
                conn.execute(pragma)
            if self._readonly:
                conn.execute(_PRAGMA_QUERY_ONLY)
        except BaseException:
            conn.close()
            raise
        return conn

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and not self._closed:
            return conn
        with self._conns_lock:
            if self._closed:
                raise OutboxError(f"the outbox {self._path} is closed")
            # Connections of threads that have ended are closed here, not leaked.
            for thread in [t for t in self._conns if not t.is_alive()]:
                self._conns.pop(thread).close()
            conn = self._open()
            self._conns[threading.current_thread()] = conn
        self._local.conn = conn
        return conn

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: committed on success, rolled back on any error."""
        if self._readonly:
            raise OutboxError(f"{what}: the outbox {self._path} is open read-only")
        conn = self._connection()
        with self._write_lock:
            try:
                self._patiently(lambda: conn.execute("BEGIN IMMEDIATE"))
            except sqlite3.Error as exc:
                raise _translate(exc, what) from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:  # keep the original error; the lock is released
                        log.exception("outbox: rollback failed after %s", what)
                if isinstance(exc, sqlite3.Error):
                    raise _translate(exc, what) from exc
                raise

    def _query(self, what: str, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> Any:
        """All rows of one read statement (one statement = one consistent snapshot)."""
        conn = self._connection()
        try:
            return self._patiently(lambda: conn.execute(sql, params).fetchall())
        except sqlite3.Error as exc:
            raise _translate(exc, what) from exc

    def _patiently(self, attempt: Callable[[], T]) -> T:
        """Run `attempt` until the database is not locked, for up to ``busy_timeout`` seconds.

        Raises the last `sqlite3.Error` when the time is up or the error is not a lock.
        """
        deadline = time.monotonic() + self._busy_timeout
        pause, longest = _BUSY_POLL
        while True:
            try:
                return attempt()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(pause * random.uniform(0.5, 1.5))
            pause = min(pause * 2, longest)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Bring the schema to `SCHEMA_VERSION`, one transaction per step (safe to race)."""
        for version, statements in MIGRATIONS:
            with self._write(f"migrating {self._path} to schema {version}"):
                current = conn.execute(_GET_VERSION).fetchone()[0]
                if current > SCHEMA_VERSION:
                    return  # reported by __init__
                if current >= version:
                    continue
                if current != version - 1:
                    raise OutboxError(f"no migration from schema {current} to {version}")
                for sql in statements:
                    conn.execute(sql)
                log.info("outbox %s migrated to schema version %d", self._path, version)

    def integrity_check(self, *, quick: bool = False) -> builtins.list[str]:
        """Run ``PRAGMA integrity_check`` (``quick_check`` with `quick`); return the problems.

        An empty list: the file is sound. ``quick_check`` reads every page but skips the
        comparison of indexes with their tables: it is several times faster and what the
        daemon runs at start-up. A file too damaged to be read at all gives one problem
        (the SQLite error), not an exception.
        """
        sql = SQL_QUICK_CHECK if quick else SQL_INTEGRITY
        try:
            rows = self._query("integrity check", sql)
        except OutboxCorruptError as exc:
            return [str(exc)]
        problems = [str(row[0]) for row in rows]
        return [] if problems == ["ok"] else problems

    # ---------------------------------------------------------------------------- enqueuer

    def is_known(self, path: str, size: int, mtime_ns: int) -> bool:
        """Return True when any row, in any state, exists for this exact file version."""
        return bool(self._query("is_known", SQL_IS_KNOWN, (_path_bytes(path), size, mtime_ns)))

    def known_files(
        self, keys: Iterable[tuple[str, int, int]]
    ) -> builtins.set[tuple[str, int, int]]:
        """The ``(path, size, mtime_ns)`` of `keys` that have rows: `is_known` for a batch."""
        return set(self._rows_of_paths("known_files", set(keys)))

    def files_states(
        self, keys: Iterable[tuple[str, int, int]]
    ) -> dict[tuple[str, int, int], dict[str, State]]:
        """`file_states` for a batch: ``(path, size, mtime_ns) -> {destination: state}``.

        Keys without rows are left out.
        """
        out: dict[tuple[str, int, int], dict[str, State]] = {}
        for key, dest, state in self._rows_of_paths("files_states", set(keys), states=True):
            out.setdefault(key, {})[dest] = State(state)
        return out

    def _rows_of_paths(
        self, what: str, keys: builtins.set[tuple[str, int, int]], *, states: bool = False
    ) -> Iterator[Any]:
        """The rows of `keys` (each a file version), looked up by path through the
        ``deliveries_file`` index: their key, or (key, destination, state) with `states`."""
        paths = sorted({_path_bytes(k[0]) for k in keys})
        cols = "path, size, mtime_ns" + (", destination, state" if states else "")
        for i in range(0, len(paths), _MANY):
            chunk = paths[i : i + _MANY]
            sql = f"SELECT {cols} FROM deliveries WHERE path IN ({', '.join('?' * len(chunk))})"
            for row in self._query(what, sql, chunk):
                key = (_path_str(row[0]), row[1], row[2])
                if key in keys:  # other versions of the same path are not asked for
                    yield (key, row[3], row[4]) if states else key

    def enqueue(self, rec: FileRecord, destinations: Sequence[str], now: float) -> int:
        """Queue one file for each destination that has no row yet for this file version.

        New rows are `State.PENDING`, due at `now`. The same unchanged file enqueued twice adds
        nothing; a changed file (same path, other size or mtime) gets new rows.

        Returns
        -------
        int
            The number of rows added.

        Raises
        ------
        ValueError
            When ``rec.path`` is not absolute.
        """
        return self.enqueue_many((rec,), destinations, now)

    def enqueue_many(
        self, recs: Sequence[FileRecord], destinations: Sequence[str], now: float
    ) -> int:
        """`enqueue` for many files in one transaction (all or none); returns rows added."""
        for rec in recs:
            _check_absolute(rec.path)
        if not recs or not destinations:
            return 0
        params = (
            {
                "path": _path_bytes(rec.path),
                "size": rec.size,
                "mtime_ns": rec.mtime_ns,
                "sop_class_uid": rec.sop_class_uid,
                "sop_instance_uid": rec.sop_instance_uid,
                "transfer_syntax": rec.transfer_syntax,
                "study_uid": rec.study_uid,
                "destination": dest,
                "now": now,
                "dataset_offset": rec.dataset_offset,
            }
            for rec in recs
            for dest in destinations
        )
        with self._write("enqueue") as conn:
            before = conn.total_changes
            conn.executemany(SQL_ENQUEUE, params)
            return conn.total_changes - before

    # ---------------------------------------------------------------------------- workers

    def claim(
        self,
        destination: str,
        limit: int,
        now: float,
        lease_seconds: float,
        share: int = 1,
    ) -> builtins.list[Delivery]:
        """Lease up to `limit` due rows of `destination` to the caller.

        With `share` > 1 (that many callers drain the destination together), a caller takes
        at most 1/`share` of the due rows (at least one), so that near the end of a backlog
        every caller gets some and they finish together. Counting is bounded by
        `limit` x `share` rows: it costs the same whatever the backlog.

        In one ``BEGIN IMMEDIATE`` transaction, the `State.PENDING` rows of `destination` with
        ``next_attempt_at <= now`` become `State.INFLIGHT` with ``lease_until = now +
        lease_seconds``, oldest first by ``(next_attempt_at, id)``. No two callers, in any
        thread or process, ever get the same row until its lease is released or recovered.

        Returns
        -------
        list of Delivery
            In ``(next_attempt_at, id)`` order; empty when nothing is due or the destination is
            paused (``paused_until > now``).
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds}")
        with self._write("claim") as conn:
            if conn.execute(SQL_PAUSED_UNTIL, (destination, now)).fetchone() is not None:
                return []
            if share > 1:
                cap = limit * share
                due = conn.execute(
                    SQL_COUNT_DUE, {"destination": destination, "now": now, "cap": cap}
                ).fetchone()[0]
                limit = min(limit, max(1, -(-due // share)))
            rows = conn.execute(
                SQL_CLAIM,
                {
                    "destination": destination,
                    "now": now,
                    "limit": limit,
                    "lease_until": now + lease_seconds,
                },
            ).fetchall()
        claimed = [_delivery(row) for row in rows]
        claimed.sort(key=lambda d: (d.next_attempt_at, d.id))  # RETURNING has no order
        return claimed

    def mark_many(self, marks: Sequence[Mark], now: float) -> None:
        """Record several outcomes in one transaction: one fsync for a whole batch.

        Each `Mark` follows the rules of the single-row method for its state (`mark_sent`,
        `mark_retry`, `mark_quarantined`, `mark_gone`); rows those would leave alone are
        left alone here too (logged).
        """
        ignored: builtins.list[tuple[Mark, str]] = []
        with self._write("mark_many") as conn:
            for m in marks:
                params: dict[str, Any] = {"id": m.delivery_id, "now": now, "status": m.status}
                if m.state is State.SENT:
                    sent = {**params, "warning": m.error, "sent_as": m.sent_as}
                    row = conn.execute(SQL_MARK_SENT, sent).fetchone()
                    if row is None:
                        ignored.append((m, "unknown or already sent"))
                    else:
                        conn.execute(SQL_DEST_SUCCESS, {"name": row[0], "now": now})
                    continue
                if m.state is State.PENDING:
                    if m.next_attempt_at is None:
                        raise ValueError("a retry needs next_attempt_at")
                    sql = SQL_MARK_RETRY
                    params.update(
                        error=m.error or "",
                        next_attempt_at=m.next_attempt_at,
                        counted=1 if m.count_attempt else 0,
                        refusal=1 if m.refusal and m.count_attempt else 0,
                    )
                elif m.state is State.QUARANTINED:
                    sql = SQL_MARK_QUARANTINED
                    params.update(error=m.error or "", refusal=1 if m.refusal else 0)
                elif m.state is State.GONE:
                    sql = SQL_MARK_GONE
                    params = {"id": m.delivery_id, "now": now, "error": m.error or ""}
                else:
                    raise ValueError(f"cannot mark a delivery {m.state.name}")
                if not conn.execute(sql, params).rowcount:
                    ignored.append((m, "it is not in flight"))
        for m, why in ignored:
            log.warning(
                "outbox: marking delivery %d %s ignored: %s", m.delivery_id, m.state.name, why
            )

    def mark_sent(
        self, delivery_id: int, status: int, now: float, warning: str | None = None
    ) -> None:
        """Record that the peer stored the instance (success or warning `status`).

        The row becomes `State.SENT` (from any other state: the peer has it, whatever else
        happened meanwhile), ``done_at = now``, one more attempt, ``last_status = status``,
        ``last_error = warning``. The destination's ``last_success_at`` becomes `now` and its
        ``consecutive_failures`` 0. A row already SENT, or an unknown id, is left alone (logged).
        """
        self.mark_many([Mark(delivery_id, State.SENT, status, warning)], now)

    def mark_retry(
        self,
        delivery_id: int,
        status: int | None,
        error: str,
        now: float,
        next_attempt_at: float,
        *,
        count_attempt: bool = True,
        refusal: bool = False,
    ) -> None:
        """Put an in-flight row back to `State.PENDING`, due at `next_attempt_at`.

        With `count_attempt` (a transient failure of this instance) ``attempts`` grows by one
        and ``first_attempt_at`` is set if unset; without (a destination outage: no
        association) neither changes, so an outage burns no attempts and starts no age clock.
        ``last_attempt_at``, ``last_status`` and ``last_error`` are recorded either way. A row
        that is not `State.INFLIGHT` (its lease was recovered, an operator acted) is left alone.
        """
        mark = Mark(
            delivery_id, State.PENDING, status, error, next_attempt_at, count_attempt, refusal
        )
        self.mark_many([mark], now)

    def mark_quarantined(
        self,
        delivery_id: int,
        status: int | None,
        error: str,
        now: float,
        *,
        refusal: bool = False,
    ) -> None:
        """An in-flight row becomes `State.QUARANTINED` (counts an attempt; sets ``done_at``).

        With `refusal` the attempt is counted in ``refusals`` too. A row that is not
        `State.INFLIGHT` is left alone (logged).
        """
        mark = Mark(delivery_id, State.QUARANTINED, status, error, refusal=refusal)
        self.mark_many([mark], now)

    def mark_gone(self, delivery_id: int, error: str, now: float) -> None:
        """An in-flight row becomes `State.GONE`: its file vanished (no attempt counted).

        A row that is not `State.INFLIGHT` is left alone (logged).
        """
        self.mark_many([Mark(delivery_id, State.GONE, None, error)], now)

    def release(self, delivery_ids: Sequence[int], now: float) -> None:
        """Return in-flight rows to `State.PENDING` without counting an attempt.

        For shutdown, or a destination paused in the middle of a batch. Their
        ``next_attempt_at`` is unchanged, so they are first in line again. Rows not in flight
        are left alone.
        """
        if not delivery_ids:
            return
        with self._write("release") as conn:
            conn.executemany(SQL_RELEASE, ({"id": i, "now": now} for i in delivery_ids))

    def recover_leases(self, now: float, *, all_inflight: bool = False) -> int:
        """Return rows whose lease expired (``lease_until <= now``) to `State.PENDING`.

        With `all_inflight` every in-flight row is returned, expired or not: for daemon
        start-up, when no worker of ours can still hold one. Returns the rows recovered.
        """
        sql = SQL_RECOVER_ALL if all_inflight else SQL_RECOVER_EXPIRED
        with self._write("recover_leases") as conn:
            return conn.execute(sql, {"now": now}).rowcount

    def file_states(self, path: str, size: int, mtime_ns: int) -> dict[str, State]:
        """Return destination -> state of every row of this exact file version."""
        rows = self._query("file_states", SQL_FILE_STATES, (_path_bytes(path), size, mtime_ns))
        return {dest: State(state) for dest, state in rows}

    def set_path(self, old_path: str, new_path: str, *, now: float | None = None) -> int:
        """Point every row of `old_path` at `new_path` (the file was moved); returns rows changed.

        ``updated_at`` becomes `now` when given.

        Raises
        ------
        PathConflictError
            When `new_path` already has rows for the same (size, mtime_ns, destination).
        ValueError
            When `new_path` is not absolute.
        """
        _check_absolute(new_path)
        params = {
            "old_path": _path_bytes(old_path),
            "new_path": _path_bytes(new_path),
            "now": now,
        }
        try:
            with self._write("set_path") as conn:
                return conn.execute(SQL_SET_PATH, params).rowcount
        except OutboxError as exc:
            if _is_unique_violation(exc.__cause__):
                raise PathConflictError(
                    f"cannot move rows of {old_path} to {new_path}: rows for that file exist"
                ) from exc.__cause__
            raise

    def next_due(self, destination: str, now: float) -> float | None:
        """Return when `claim` will next find work for `destination`, or None if it never will.

        That is the earliest ``next_attempt_at`` of its `State.PENDING` rows, but not before
        the end of a pause (``paused_until > now``). It may be in the past: work is due now.
        """
        due = self._query("next_due", SQL_NEXT_DUE, (destination,))[0][0]
        if due is None:
            return None
        paused = self._query("next_due", SQL_PAUSED_UNTIL, (destination, now))
        return max(float(due), float(paused[0][0])) if paused else float(due)

    # ---------------------------------------------------------------------------- breaker

    def pause_destination(self, name: str, until: float, reason: str, now: float) -> None:
        """Make `claim` return nothing for `name` until `until`.

        ``paused_at`` keeps the start of a pause that is extended before it ran out.
        """
        with self._write("pause_destination") as conn:
            conn.execute(SQL_PAUSE, {"name": name, "until": until, "reason": reason, "now": now})

    def resume_destination(self, name: str) -> None:
        """End a pause of `name` now (no-op when not paused)."""
        with self._write("resume_destination") as conn:
            conn.execute(SQL_RESUME, (name,))

    def record_destination_error(self, name: str, error: str, now: float) -> None:
        """Record a failure to reach `name`: last error, its time, one more consecutive failure.

        `mark_sent` resets ``consecutive_failures`` to 0.
        """
        with self._write("record_destination_error") as conn:
            conn.execute(SQL_DEST_ERROR, {"name": name, "error": error, "now": now})

    def destination_info(self) -> dict[str, DestinationInfo]:
        """Return name -> circuit-breaker state of every destination that has one."""
        rows = self._query("destination_info", SQL_DEST_INFO)
        return {row[0]: DestinationInfo(*row) for row in rows}

    # ---------------------------------------------------------------------------- health

    def heartbeat(self, now: float, info: Mapping[str, Any]) -> None:
        """Record that this process is alive at `now`, with a summary `info` for `read_heartbeat`.

        `info` is stored as JSON; values JSON cannot hold are stored as their ``str``.
        ``started_at`` is the time of this `Outbox`'s first heartbeat, not kept across
        restarts (the pid is no proof of the same process: in a container it is always 1).
        """
        if self._started_at is None:
            self._started_at = now
        payload = json.dumps(dict(info), sort_keys=True, default=str)
        params = {"pid": os.getpid(), "now": now, "started_at": self._started_at, "info": payload}
        with self._write("heartbeat") as conn:
            conn.execute(SQL_HEARTBEAT, params)

    def read_heartbeat(self) -> Heartbeat | None:
        """Return the last heartbeat, or None when no daemon ever wrote one."""
        rows = self._query("read_heartbeat", SQL_READ_HEARTBEAT)
        if not rows:
            return None
        pid, updated_at, started_at, info = rows[0]
        return Heartbeat(
            pid=pid, updated_at=updated_at, started_at=started_at, info=json.loads(info)
        )

    # ---------------------------------------------------------------------------- operator

    def counts(self) -> dict[str, dict[State, int]]:
        """Return destination -> state -> rows, with every `State` present (0 when none)."""
        result: dict[str, dict[State, int]] = {}
        for dest, state, count in self._query("counts", SQL_COUNTS):
            result.setdefault(dest, dict.fromkeys(State, 0))[State(state)] = count
        return result

    def sent_since(self, since: float) -> dict[str, int]:
        """Return destination -> rows that became `State.SENT` at or after `since`."""
        return dict(self._query("sent_since", SQL_SENT_SINCE, (since,)))

    def oldest_pending(self) -> dict[str, float]:
        """Return destination -> ``created_at`` of its oldest PENDING or INFLIGHT row."""
        return dict(self._query("oldest_pending", SQL_OLDEST_PENDING))

    def last_failures(self) -> dict[str, Delivery]:
        """Return destination -> its row that failed last (by ``last_attempt_at``).

        Among rows still waiting (PENDING, INFLIGHT) or QUARANTINED that carry a
        ``last_error``: the most recent refusal or error of each destination, for
        ``forwarder status``. Association failures are in `destination_info`.
        """
        rows = self._query("last_failures", SQL_LAST_FAILURES)
        return {row[2]: _delivery(row) for row in rows}

    def list(
        self,
        *,
        destination: str | None = None,
        states: Sequence[State] | None = None,
        study_uid: str | None = None,
        path: str | None = None,
        limit: int = 100,
    ) -> builtins.list[Delivery]:
        """Return up to `limit` rows matching every filter given, oldest (lowest id) first."""
        params: dict[str, Any] = {
            "destination": destination,
            "states": None if states is None else json.dumps([int(s) for s in states]),
            "study_uid": study_uid,
            "path": None if path is None else _path_bytes(path),
            "limit": limit,
        }
        sql = _compose(_SELECT + " WHERE 1", _LIST_FILTERS, params) + _LIST_ORDER
        return [_delivery(row) for row in self._query("list", sql, params)]

    def find(self, uid: str) -> builtins.list[Delivery]:
        """Return every row whose SOP Instance UID or Study Instance UID is `uid`, by id."""
        return [_delivery(row) for row in self._query("find", SQL_FIND, {"uid": uid})]

    def retry_now(
        self, now: float, *, destination: str | None = None, study_uid: str | None = None
    ) -> int:
        """Make `State.PENDING` rows waiting for a retry due at `now`; returns rows changed.

        Limited to `destination` and/or `study_uid` when given. Attempts are not reset.
        """
        params = {"now": now, "destination": destination, "study_uid": study_uid}
        sql = _compose(_RETRY_NOW_BASE, _RETRY_NOW_FILTERS, params)
        with self._write("retry_now") as conn:
            return conn.execute(sql, params).rowcount

    def requeue(self, delivery_ids: Sequence[int], now: float, new_path: str | None = None) -> int:
        """Send QUARANTINED or GONE rows again: back to `State.PENDING`, due at `now`.

        ``attempts`` is reset to 0 and ``first_attempt_at`` and ``done_at`` cleared; the last
        status and error are kept for reference. The path becomes `new_path` when given (the
        operator moved the file back). Rows in other states are left alone.

        Returns
        -------
        int
            The rows requeued.

        Raises
        ------
        PathConflictError
            When `new_path` already has rows for the same file version and destination.
        """
        if new_path is not None:
            _check_absolute(new_path)
        stored = None if new_path is None else _path_bytes(new_path)
        params = ({"id": i, "now": now, "new_path": stored} for i in delivery_ids)
        try:
            with self._write("requeue") as conn:
                before = conn.total_changes
                conn.executemany(SQL_REQUEUE, params)
                return conn.total_changes - before
        except OutboxError as exc:
            if _is_unique_violation(exc.__cause__):
                raise PathConflictError(
                    f"cannot requeue at {new_path}: rows for that file exist"
                ) from exc.__cause__
            raise

    def discard(self, delivery_ids: Sequence[int], reason: str, now: float) -> int:
        """Close QUARANTINED rows as `State.GONE` with `reason`; returns rows changed.

        For an operator deleting quarantined files: those destinations will never get them.
        ``done_at`` and ``last_status`` are kept; `reason` replaces ``last_error``. Rows in
        other states are left alone.
        """
        if not delivery_ids:
            return 0
        params = ({"id": i, "reason": reason, "now": now} for i in delivery_ids)
        with self._write("discard") as conn:
            before = conn.total_changes
            conn.executemany(SQL_DISCARD, params)
            return conn.total_changes - before

    def prune(self, older_than: float) -> int:
        """Delete `State.SENT` rows done before `older_than`; returns rows deleted.

        A SENT row is kept while any row of the same file version is still PENDING, INFLIGHT
        or QUARANTINED, so that re-enqueueing that file can never send it again to the
        destinations that already have it. Deletes in batches of `PRUNE_BATCH`, one short
        transaction each, so the daemon never waits long behind a prune.
        """
        deleted = 0
        while True:
            with self._write("prune") as conn:
                n = conn.execute(
                    SQL_PRUNE, {"older_than": older_than, "batch": PRUNE_BATCH}
                ).rowcount
            deleted += n
            if n < PRUNE_BATCH:
                return deleted
