"""The outbox's SQL: schema, migrations, pragmas and statements, as constants."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from forwarder.dicomfile import DicomInfo
from forwarder.outbox.records import Commitment, Delivery, State

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

# Version 5: retention. Delivered rows (SENT, GONE) older than ``outbox.keep_sent_days`` are
# deleted oldest first, through ``deliveries_delivered`` (only those rows are in it), and the
# ``retention`` row says up to when, so that ``forwarder find`` can tell a UID past retention
# from one never queued. The file shrinks back through incremental auto_vacuum: a new outbox
# sets it before its first table (`PRAGMA_AUTO_VACUUM`), an existing one gets it from one
# VACUUM after this step (VACUUM cannot run inside a transaction).
_SCHEMA_V5_RETENTION: Final[tuple[str, ...]] = (
    """
    CREATE INDEX IF NOT EXISTS deliveries_delivered
        ON deliveries (done_at) WHERE state IN (2, 4)
    """,
    """
    CREATE TABLE IF NOT EXISTS retention (
        id            INTEGER PRIMARY KEY CHECK (id = 1),
        -- every delivered row done before this is deleted, but for the rows spared
        pruned_before REAL    NOT NULL
    ) STRICT
    """,
    "PRAGMA user_version = 5",
)

# Version 6: per-destination transforms. A destination that de-identifies sends the instance
# under a new SOP Instance UID: the row keeps the one that went out, so that ``forwarder find``
# answers for the original UID and for the sent one.
_SCHEMA_V6_SENT_UID: Final[tuple[str, ...]] = (
    "ALTER TABLE deliveries ADD COLUMN sent_uid TEXT",
    """
    CREATE INDEX IF NOT EXISTS deliveries_sent_uid
        ON deliveries (sent_uid) WHERE sent_uid IS NOT NULL
    """,
    "PRAGMA user_version = 6",
)


# Version 7: Storage Commitment. A delivery to a destination that asks for commitment goes
# from INFLIGHT to 5 COMMITTING ("stored, awaiting commitment") with the Transaction UID it
# waits on (``commit_uid``), and becomes SENT only when the peer reports it committed. The
# state CHECK cannot be altered, so the table is rebuilt as in version 3 (ids, the
# AUTOINCREMENT counter and every column carried over). ``commitments`` holds the open
# transactions, so that they survive restarts: when to ask (again), how often it was asked.
# The rebuild copies every row once: 300,000 rows (118 MB) in 4.4 s on the development VM.
# No comments inside the statements: SQLite keeps their text in sqlite_master, which must stay
# within its first page. The states are those of `State`; the CHECKs say: leased iff INFLIGHT,
# done iff final, a transaction iff COMMITTING. ``commitments``: ``asked_at`` is when the peer
# last accepted the request (NULL: never), ``attempts`` the requests sent, ``next_ask_at`` when
# to ask (again), pushed on while a worker asks (a lease).
def _compact(sql: str) -> str:
    """`sql` with its runs of blanks as one space: the text sqlite_master keeps."""
    return " ".join(sql.split())


_SCHEMA_V7_COMMITMENT: Final[tuple[str, ...]] = (
    _compact("""
    CREATE TABLE deliveries_v7 (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        path             BLOB    NOT NULL CHECK (length(path) > 0),
        size             INTEGER NOT NULL CHECK (size >= 0),
        mtime_ns         INTEGER NOT NULL,
        sop_class_uid    TEXT    NOT NULL,
        sop_instance_uid TEXT    NOT NULL,
        transfer_syntax  TEXT    NOT NULL,
        study_uid        TEXT,
        destination      TEXT    NOT NULL CHECK (destination <> ''),
        state            INTEGER NOT NULL DEFAULT 0 CHECK (state IN (0, 1, 2, 3, 4, 5)),
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
        sent_as          TEXT,
        sent_uid         TEXT,
        commit_uid       TEXT,
        CHECK ((state = 1) = (lease_until IS NOT NULL)),
        CHECK ((state IN (2, 3, 4)) = (done_at IS NOT NULL)),
        CHECK ((state = 5) = (commit_uid IS NOT NULL))
    ) STRICT
    """),
    """
    INSERT INTO deliveries_v7 (id, path, size, mtime_ns, sop_class_uid, sop_instance_uid,
                               transfer_syntax, study_uid, destination, state, attempts,
                               next_attempt_at, lease_until, first_attempt_at,
                               last_attempt_at, last_status, last_error, created_at,
                               updated_at, done_at, dataset_offset, refusals, sent_as, sent_uid)
    SELECT id, path, size, mtime_ns, sop_class_uid, sop_instance_uid, transfer_syntax,
           study_uid, destination, state, attempts, next_attempt_at, lease_until,
           first_attempt_at, last_attempt_at, last_status, last_error, created_at,
           updated_at, done_at, dataset_offset, refusals, sent_as, sent_uid
      FROM deliveries
    """,
    "DELETE FROM sqlite_sequence WHERE name = 'deliveries_v7'",
    """
    INSERT INTO sqlite_sequence (name, seq)
    SELECT 'deliveries_v7', max(coalesce((SELECT seq FROM sqlite_sequence
                                           WHERE name = 'deliveries'), 0),
                                coalesce((SELECT max(id) FROM deliveries_v7), 0))
    """,
    "DROP TABLE deliveries",
    "ALTER TABLE deliveries_v7 RENAME TO deliveries",
    *(sql for sql in _SCHEMA_V1 if "INDEX" in sql and "ON deliveries " in sql),
    *(sql for sql in _SCHEMA_V5_RETENTION if "INDEX" in sql),
    *(sql for sql in _SCHEMA_V6_SENT_UID if "INDEX" in sql),
    """
    CREATE INDEX IF NOT EXISTS deliveries_commit
        ON deliveries (commit_uid) WHERE commit_uid IS NOT NULL
    """,
    _compact("""
    CREATE TABLE IF NOT EXISTS commitments (
        uid         TEXT    PRIMARY KEY,
        destination TEXT    NOT NULL CHECK (destination <> ''),
        created_at  REAL    NOT NULL,
        asked_at    REAL,
        attempts    INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
        next_ask_at REAL    NOT NULL,
        last_status INTEGER,
        last_error  TEXT
    ) STRICT
    """),
    "CREATE INDEX IF NOT EXISTS commitments_due ON commitments (destination, next_ask_at)",
    "PRAGMA user_version = 7",
)

# Version 8: the receiver's ack log (forwarder.acklog). An instance is acknowledged once it is
# in an ack log segment; it is queued (its file made, its rows added) later, and ``acklog``
# says, per segment, the last record queued: committed in the same transaction as its rows, so
# that after a crash a record is queued again exactly when its rows are not there.
_SCHEMA_V8_ACKLOG: Final[tuple[str, ...]] = (
    # compact: sqlite_master keeps the text, and must stay within its first page (version 7)
    _compact("""
    CREATE TABLE IF NOT EXISTS acklog (
        segment TEXT    PRIMARY KEY,
        seq     INTEGER NOT NULL
    ) STRICT
    """),
    "PRAGMA user_version = 8",
)

MIGRATIONS: Final[tuple[tuple[int, tuple[str, ...]], ...]] = (
    (1, _SCHEMA_V1),
    (2, _SCHEMA_V2),
    (3, _SCHEMA_V3),
    (4, _SCHEMA_V4_SENT_AS),
    (5, _SCHEMA_V5_RETENTION),
    (6, _SCHEMA_V6_SENT_UID),
    (7, _SCHEMA_V7_COMMITMENT),
    (8, _SCHEMA_V8_ACKLOG),
)
"""(version reached, statements) in order; version 0 is an empty database."""

SCHEMA_VERSION: Final = MIGRATIONS[-1][0]
"""The ``PRAGMA user_version`` this module reads and writes."""

# Per-connection settings. journal_mode is persistent and set once by a writer (below).
PRAGMAS: Final[tuple[str, ...]] = (
    "PRAGMA synchronous = FULL",  # fsync the WAL at every commit: survives power loss
    "PRAGMA journal_size_limit = 67108864",  # truncate the WAL back to 64 MiB after checkpoints
)
PRAGMA_WAL: Final = "PRAGMA journal_mode = WAL"
PRAGMA_QUERY_ONLY: Final = "PRAGMA query_only = ON"
GET_VERSION: Final = "PRAGMA user_version"
PROBE_WRITE: Final = f"PRAGMA user_version = {SCHEMA_VERSION}"
"""Rewrites the header with the version it has: a write that changes nothing, to find a
read-only file (SQLite opens one read-only without a word) when it is opened, not later."""

# --------------------------------------------------------------------------------------------
# Statements.

COLUMNS: Final = (
    "id, path, destination, state, size, mtime_ns, sop_class_uid, sop_instance_uid, "
    "transfer_syntax, study_uid, attempts, next_attempt_at, first_attempt_at, "
    "last_attempt_at, last_status, last_error, created_at, done_at, dataset_offset, refusals, "
    "sent_as, sent_uid, commit_uid"
)
SELECT: Final = "SELECT " + COLUMNS + " FROM deliveries"

SQL_IS_KNOWN: Final = """
    SELECT 1 FROM deliveries WHERE path = ? AND size = ? AND mtime_ns = ? LIMIT 1
"""

MANY: Final = 500
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

SQL_ACKLOG_MARK: Final = """
    INSERT INTO acklog (segment, seq) VALUES (?, ?)
    ON CONFLICT (segment) DO UPDATE SET seq = max(seq, excluded.seq)
"""
SQL_ACKLOG_MARKS: Final = "SELECT segment, seq FROM acklog"

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
    + COLUMNS
)

SQL_MARK_SENT: Final = """
    UPDATE deliveries
       SET state = 2, lease_until = NULL, done_at = :now, updated_at = :now,
           attempts = attempts + 1, first_attempt_at = coalesce(first_attempt_at, :now),
           last_attempt_at = :now, last_status = :status, last_error = :warning,
           sent_as = :sent_as, sent_uid = :sent_uid, commit_uid = NULL
     WHERE id = :id AND state <> 2
    RETURNING destination
"""

# Storage Commitment. A store answered success to a destination that asks for commitment:
# the row waits on its transaction (opened in the same write transaction).
SQL_MARK_STORED: Final = """
    UPDATE deliveries
       SET state = 5, lease_until = NULL, updated_at = :now, commit_uid = :commit_uid,
           attempts = attempts + 1, first_attempt_at = coalesce(first_attempt_at, :now),
           last_attempt_at = :now, last_status = :status, last_error = :warning,
           sent_as = :sent_as, sent_uid = :sent_uid
     WHERE id = :id AND state = 1
    RETURNING destination
"""

SQL_OPEN_COMMITMENT: Final = """
    INSERT INTO commitments (uid, destination, created_at, next_ask_at)
    VALUES (:uid, :destination, :now, :ask_at)
    ON CONFLICT (uid) DO NOTHING
"""

# the batch that opened a transaction is over: it may be asked now (unless asked already)
SQL_COMMITMENT_DUE: Final = """
    UPDATE commitments SET next_ask_at = :now
     WHERE uid = :uid AND asked_at IS NULL AND attempts = 0 AND next_ask_at > :now
"""

COMMITMENT_COLUMNS: Final = (
    "uid, destination, created_at, asked_at, attempts, next_ask_at, last_status, last_error"
)

# due requests of a destination, leased by pushing next_ask_at on (no two askers at once)
SQL_CLAIM_ASKS: Final = (
    """
    UPDATE commitments SET next_ask_at = :lease_until
     WHERE uid IN (SELECT uid FROM commitments
                    WHERE destination = :destination AND next_ask_at <= :now
                    ORDER BY next_ask_at, uid LIMIT :limit)
    RETURNING """
    + COMMITMENT_COLUMNS
)

# an accepted request clears the last error; one that failed without a word (no association)
# keeps the one before
SQL_ASKED: Final = """
    UPDATE commitments
       SET asked_at = coalesce(:asked_at, asked_at), attempts = attempts + :counted,
           next_ask_at = :next_ask_at,
           last_status = CASE WHEN :asked_at IS NOT NULL THEN :status
                              ELSE coalesce(:status, last_status) END,
           last_error = CASE WHEN :asked_at IS NOT NULL THEN NULL
                             ELSE coalesce(:error, last_error) END
     WHERE uid = :uid
"""

# a request refused with a failure status: its UID must not be reused (PS3.4 J.3.2.1.2)
SQL_RENAME_COMMITMENT: Final = "UPDATE commitments SET uid = :new WHERE uid = :old"
SQL_RENAME_COMMITTING: Final = """
    UPDATE deliveries SET commit_uid = :new, updated_at = :now
     WHERE commit_uid = :old AND state = 5
"""

SQL_NEXT_ASK: Final = "SELECT min(next_ask_at) FROM commitments WHERE destination = ?"

SQL_COMMITMENT: Final = "SELECT " + COMMITMENT_COLUMNS + " FROM commitments WHERE uid = ?"

SQL_COMMITMENTS: Final = (
    "SELECT " + COMMITMENT_COLUMNS + " FROM commitments ORDER BY destination, created_at"
)

SQL_COMMITMENT_ROWS: Final = SELECT + " WHERE commit_uid = ? AND state = 5 ORDER BY id"

# a report's outcome for one row still waiting on that transaction
SQL_MARK_COMMITTED: Final = """
    UPDATE deliveries
       SET state = 2, done_at = :now, updated_at = :now, commit_uid = NULL
     WHERE id = :id AND state = 5 AND commit_uid = :uid
"""

SQL_COMMIT_RETRY: Final = """
    UPDATE deliveries
       SET state = 0, commit_uid = NULL, next_attempt_at = :next_attempt_at, updated_at = :now,
           last_status = :status, last_error = :error, refusals = refusals + :refusal
     WHERE id = :id AND state = 5 AND commit_uid = :uid
"""

SQL_COMMIT_QUARANTINED: Final = """
    UPDATE deliveries
       SET state = 3, commit_uid = NULL, done_at = :now, updated_at = :now,
           last_status = :status, last_error = :error, refusals = refusals + :refusal
     WHERE id = :id AND state = 5 AND commit_uid = :uid
"""

SQL_CLOSE_COMMITMENT: Final = """
    DELETE FROM commitments
     WHERE uid = :uid
       AND NOT EXISTS (SELECT 1 FROM deliveries WHERE commit_uid = :uid)
"""

SQL_AWAITING: Final = """
    SELECT destination, count(*), min(last_attempt_at) FROM deliveries
     WHERE state = 5 GROUP BY destination
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

SQL_RENEW_LEASE: Final = """
    UPDATE deliveries SET lease_until = :until
     WHERE id = :id AND state = 1 AND lease_until < :until
"""

# the transaction a batch opened (held back until its lease end) is held as long as the batch
SQL_RENEW_HELD_COMMITMENT: Final = """
    UPDATE commitments SET next_ask_at = :until
     WHERE uid = (SELECT commit_uid FROM deliveries WHERE id = :id AND state = 5)
       AND asked_at IS NULL AND attempts = 0 AND next_ask_at < :until
"""

SQL_RECOVER_ALL: Final = """
    UPDATE deliveries SET state = 0, lease_until = NULL, updated_at = :now
     WHERE state = 1
"""

# start-up: transactions never asked yet, held back by a batch or leased by a request that the
# last stop cut short, are due at once (as in-flight rows are queued again)
SQL_RECOVER_ASKS: Final = """
    UPDATE commitments SET next_ask_at = :now
     WHERE next_ask_at > :now AND asked_at IS NULL AND attempts = 0 AND last_error IS NULL
"""

SQL_FILE_ROWS: Final = SELECT + " WHERE path = ? AND size = ? AND mtime_ns = ? ORDER BY id"

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
           -- one outage, one start: a pause extended before it ran out, or a new pause
           -- with no store answered since the last one began (health measures the outage)
           paused_at = CASE WHEN destinations.paused_until > excluded.paused_at
                              OR coalesce(destinations.last_success_at, 0)
                                 < coalesce(destinations.paused_at, 0)
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
    + COLUMNS
    + """, max(last_attempt_at) FROM deliveries
     WHERE state IN (0, 1, 3) AND last_error IS NOT NULL GROUP BY destination
"""
)

# an instance's rows by its own UID or by the UID a transform sent it under (every row of
# it: the other destinations got the original), or a study's rows
SQL_FIND: Final = (
    SELECT
    + """ WHERE sop_instance_uid = :uid OR study_uid = :uid
             OR sop_instance_uid IN (SELECT sop_instance_uid FROM deliveries
                                      WHERE sent_uid = :uid)
          ORDER BY id"""
)

# Optional filters, joined with AND in a fixed order; values only ever go through placeholders.
LIST_FILTERS: Final[tuple[tuple[str, str], ...]] = (
    ("destination", "destination = :destination"),
    ("states", "state IN (SELECT value FROM json_each(:states))"),
    ("study_uid", "study_uid = :study_uid"),
    ("path", "path = :path"),
)
LIST_ORDER: Final = " ORDER BY id LIMIT :limit"

RETRY_NOW_BASE: Final = """
    UPDATE deliveries SET next_attempt_at = :now, updated_at = :now
     WHERE state = 0 AND next_attempt_at > :now"""
RETRY_NOW_FILTERS: Final[tuple[tuple[str, str], ...]] = (
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

# Retention. Candidates oldest first from a cursor ``(done_at, id)``, so rows the caller spares
# are looked at once per pass, not again at every batch; each is deleted only if, in the write
# transaction, it is still delivered, still old enough, and no row of the same file version is
# still waiting or quarantined (re-enqueueing that file could then send it again to the
# destinations that already have it).
_SIBLING_UNFINISHED: Final = """
    EXISTS (SELECT 1 FROM deliveries AS o
             WHERE o.path = deliveries.path AND o.size = deliveries.size
               AND o.mtime_ns = deliveries.mtime_ns AND o.state IN (0, 1, 3, 5))"""

SQL_PRUNE_CANDIDATES: Final = (
    """
    SELECT done_at, id, path FROM deliveries INDEXED BY deliveries_delivered
     WHERE state IN (2, 4) AND done_at < :before
       AND (done_at, id) > (:after_done, :after_id)
       AND NOT"""
    + _SIBLING_UNFINISHED
    + """
     ORDER BY done_at, id LIMIT :limit
"""
)

SQL_PRUNE_ONE: Final = (
    """
    DELETE FROM deliveries
     WHERE id = :id AND state IN (2, 4) AND done_at < :before
       AND NOT"""
    + _SIBLING_UNFINISHED
)

SQL_SET_HORIZON: Final = """
    INSERT INTO retention (id, pruned_before) VALUES (1, :before)
    ON CONFLICT (id) DO UPDATE SET pruned_before = max(pruned_before, excluded.pruned_before)
"""

SQL_HORIZON: Final = "SELECT pruned_before FROM retention WHERE id = 1"

# free pages that incremental_vacuum can give back: none before the file has that mode
SQL_FREE_PAGES: Final = """
    SELECT CASE WHEN auto_vacuum = 2 THEN freelist_count ELSE 0 END
      FROM pragma_auto_vacuum(), pragma_freelist_count()
"""
SQL_AUTO_VACUUM: Final = "PRAGMA auto_vacuum"
AUTO_VACUUM_INCREMENTAL: Final = 2
"""What ``PRAGMA auto_vacuum`` reads when free pages are given back by `incremental_vacuum`."""
PRAGMA_AUTO_VACUUM: Final = "PRAGMA auto_vacuum = INCREMENTAL"
"""Set by a writer before anything else: it takes effect on a new file (before its first
table, and before WAL mode is set), and on an existing one at its next VACUUM."""
SQL_VACUUM: Final = "VACUUM"
SQL_LIVE_BYTES: Final = """
    SELECT (page_count - freelist_count) * page_size
      FROM pragma_page_count(), pragma_freelist_count(), pragma_page_size()
"""


def incremental_vacuum(pages: int) -> str:
    """The statement giving up to `pages` free pages back to the file system (pragmas take
    no parameters: the count is an int, formatted as such)."""
    return f"PRAGMA incremental_vacuum({int(pages)})"


SQL_INTEGRITY: Final = "PRAGMA integrity_check"
SQL_QUICK_CHECK: Final = "PRAGMA quick_check"


def compose(base: str, fragments: Sequence[tuple[str, str]], given: Mapping[str, Any]) -> str:
    """Join `base` with the constant fragments whose key has a non-None value in `given`."""
    clauses = [sql for key, sql in fragments if given.get(key) is not None]
    return base + "".join(" AND " + sql for sql in clauses)


def delivery(row: Sequence[Any]) -> Delivery:
    """A row selected with `COLUMNS` as a `Delivery`."""
    offset = row[18]
    return Delivery(
        id=row[0],
        file=DicomInfo(
            path=Path(path_str(row[1])),
            size=row[4],
            mtime_ns=row[5],
            sop_class_uid=row[6],
            sop_instance_uid=row[7],
            transfer_syntax=row[8],
            study_uid=row[9],
            dataset_offset=0 if offset is None else offset,
        ),
        destination=row[2],
        state=State(row[3]),
        attempts=row[10],
        next_attempt_at=row[11],
        first_attempt_at=row[12],
        last_attempt_at=row[13],
        last_status=row[14],
        last_error=row[15],
        created_at=row[16],
        done_at=row[17],
        offset_known=offset is not None,
        refusals=row[19],
        sent_as=row[20],
        sent_uid=row[21],
        commit_uid=row[22],
    )


def commitment(row: Sequence[Any]) -> Commitment:
    """A row selected with `COMMITMENT_COLUMNS` as a `Commitment`."""
    return Commitment(*row)


def path_bytes(path: str | os.PathLike[str]) -> bytes:
    """A path as stored: its bytes on disk (a name that is not UTF-8 survives the round trip)."""
    return os.fsencode(path)


def path_str(stored: bytes) -> str:
    """A stored path back as the str the rest of the program uses (``os.fsdecode``)."""
    return os.fsdecode(stored)


def check_absolute(path: str | os.PathLike[str]) -> None:
    """Raise ValueError unless `path` is absolute (rows never hold relative paths)."""
    if not os.path.isabs(path):
        raise ValueError(f"outbox paths must be absolute, got {os.fspath(path)!r}")
