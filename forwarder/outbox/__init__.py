"""Outbox: the durable SQLite queue of deliveries, one row per (file, destination).

This package is the only code that touches SQLite. Every other module sees frozen dataclasses
(`forwarder.dicomfile.DicomInfo` in; `Delivery`, `DestinationInfo`, `Heartbeat` out) and
`OutboxError`. Its modules: `records` (those types and the errors), `schema` (the SQL and the
migrations), `db` (connections, transactions, migrating), `queries` (the reads), `pruning`
(retention) and `store` (`Outbox`, the writes).

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
  between tries and, against a busy daemon, starves a CLI writer outright (it keeps waking up
  inside the daemon's transactions).

The connections are opened with ``check_same_thread=False`` only so that `Outbox.close` (and the
opening of a connection for a new thread) can close the connections of threads that are gone;
a connection is never used by two live threads. Call `Outbox.close` once the threads using the
outbox have stopped.

Measured on the development VM (tests/test_outbox.py builds the same backlog): one commit
with ``synchronous=FULL`` costs about 0.3 ms against 0.13 ms with NORMAL -- nothing next to a
C-STORE, so we keep FULL; ``enqueue_many`` writes about 60,000 rows/s, ``claim`` of 64 rows
out of a 100,000-row backlog takes about 1.3 ms through the ``deliveries_claim`` index, and
the file grows by about 680 bytes per row with real inbox paths and UIDs
(bench/bench_outbox_size.py).

A CLI opens the outbox with ``readonly=True`` for queries: a ``mode=ro`` connection that never
writes, never migrates and reads a WAL snapshot without blocking the daemon or being blocked by it
(like any WAL reader, it may create the empty ``-wal``/``-shm`` files beside the database).

Retention
---------
Delivered rows (SENT, GONE) are deleted once older than the retention (`Outbox.prune_delivered`, in
batches of short transactions, driven by `forwarder.retention`); PENDING, INFLIGHT, COMMITTING and
QUARANTINED rows never are. The file uses incremental auto_vacuum, so `Outbox.vacuum_step` gives the
freed pages back in bounded steps; a file created before schema 5 is converted by one VACUUM when a
writer first opens it. `Outbox.retention_horizon` says up to when rows were pruned, for
``forwarder find``.

Storage Commitment
------------------
A delivery to a destination that asks for commitment goes INFLIGHT -> COMMITTING (stored,
awaiting the peer's report) under a transaction (``commit_uid``; a ``commitments`` row holds
when to ask the peer, and how often it was asked), and becomes SENT only on the peer's success
reference (`Outbox.settle_commitment`); COMMITTING is not final, so its file stays.

Schema
------
Versioned with ``PRAGMA user_version``; `MIGRATIONS` takes a database from any older version
to `SCHEMA_VERSION`, one transaction per step. States are the `State` IntEnum, mirrored by a
``CHECK`` constraint, and the tables are ``STRICT``. The SQL lives in `schema` as constants with
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

from forwarder.outbox.db import BUSY_TIMEOUT_SECONDS, MIN_SQLITE
from forwarder.outbox.pruning import PRUNE_LIMIT, VACUUM_STEP_PAGES
from forwarder.outbox.records import (
    FINAL_STATES,
    Commitment,
    Delivery,
    DestinationInfo,
    Heartbeat,
    Mark,
    OutboxBusyError,
    OutboxCorruptError,
    OutboxError,
    OutboxFullError,
    OutboxReadOnlyError,
    PathConflictError,
    Pruned,
    State,
)
from forwarder.outbox.schema import MIGRATIONS, SCHEMA_VERSION
from forwarder.outbox.store import Outbox

__all__ = [
    "BUSY_TIMEOUT_SECONDS",
    "FINAL_STATES",
    "MIGRATIONS",
    "MIN_SQLITE",
    "PRUNE_LIMIT",
    "SCHEMA_VERSION",
    "VACUUM_STEP_PAGES",
    "Commitment",
    "Delivery",
    "DestinationInfo",
    "Heartbeat",
    "Mark",
    "Outbox",
    "OutboxBusyError",
    "OutboxCorruptError",
    "OutboxError",
    "OutboxFullError",
    "OutboxReadOnlyError",
    "PathConflictError",
    "Pruned",
    "State",
]
