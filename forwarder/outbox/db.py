"""The outbox's SQLite plumbing: connections per thread, transactions, waits and migrations."""

from __future__ import annotations

import builtins
import functools
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

from forwarder.outbox.records import (
    OutboxBusyError,
    OutboxCorruptError,
    OutboxError,
    OutboxFullError,
    OutboxReadOnlyError,
)
from forwarder.outbox.schema import (
    AUTO_VACUUM_INCREMENTAL,
    GET_VERSION,
    MIGRATIONS,
    PRAGMA_AUTO_VACUUM,
    PRAGMA_QUERY_ONLY,
    PRAGMA_WAL,
    PRAGMAS,
    PROBE_WRITE,
    SCHEMA_VERSION,
    SQL_AUTO_VACUUM,
    SQL_INTEGRITY,
    SQL_LIVE_BYTES,
    SQL_QUICK_CHECK,
    SQL_VACUUM,
)

__all__ = [
    "BUSY_TIMEOUT_SECONDS",
    "MIN_SQLITE",
    "VACUUM_AT_OPEN_MAX_BYTES",
    "Database",
    "is_unique_violation",
]

LOGGER = logging.getLogger("forwarder.outbox")
T = TypeVar("T")

MIN_SQLITE: Final = (3, 37, 0)
"""Oldest SQLite library we run on: ``UPDATE ... RETURNING`` (3.35) and ``STRICT`` tables (3.37)."""

BUSY_TIMEOUT_SECONDS: Final = 10.0
"""Default wait for another process's write transaction before `OutboxBusyError`."""

_BUSY_POLL: Final = (0.0005, 0.004)
"""First and longest pause (seconds, before jitter) between tries of a locked database."""

_MB: Final = 1024 * 1024

VACUUM_AT_OPEN_MAX_BYTES: Final = 1024 * _MB
"""Largest live data (pages in use) that opening a pre-schema-5 outbox rewrites with VACUUM
to give it incremental auto_vacuum: at tens of MB/s that is well within the 90 s the systemd
unit allows a start."""


def is_unique_violation(exc: BaseException | None) -> bool:
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


class Database:
    """One SQLite outbox file: opened, migrated, and one connection per thread.

    The parameters, errors and thread rules are `Outbox`'s (its subclass, the one to use).
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
                # before WAL mode: a new file takes it then; it may wait for another writer
                self._patiently(lambda: conn.execute(PRAGMA_AUTO_VACUUM))
                mode = self._patiently(lambda: conn.execute(PRAGMA_WAL).fetchone()[0])
                if str(mode).lower() != "wal":
                    raise OutboxError(f"{self._path}: cannot use WAL mode (journal_mode={mode})")
                self._migrate(conn)
            version = conn.execute(GET_VERSION).fetchone()[0]
            if not readonly and version == SCHEMA_VERSION:
                self._give_incremental_vacuum(conn)
                try:
                    with self._write(f"writing to {self._path}") as probe:
                        probe.execute(PROBE_WRITE)
                except OutboxFullError as exc:  # writable, just no room now: the caller copes
                    LOGGER.warning(f"outbox: {exc}")
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
        return f"<{type(self).__name__} {self._path} ({mode}{', closed' if self._closed else ''})>"

    def __enter__(self) -> Self:
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
            # a first look at the WAL index waits while another process opens or checkpoints
            for pragma in PRAGMAS:
                self._patiently(functools.partial(conn.execute, pragma))
            if self._readonly:
                conn.execute(PRAGMA_QUERY_ONLY)
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
                        LOGGER.exception(f"outbox: rollback failed after {what}")
                if isinstance(exc, sqlite3.Error):
                    raise _translate(exc, what) from exc
                raise

    def _script(self, what: str, sql: str) -> None:
        """Run `sql` to its end as its own transaction (``executescript``), for the statements
        that do their work one step at a time; it never runs inside `_write`."""
        if self._readonly:
            raise OutboxError(f"{what}: the outbox {self._path} is open read-only")
        conn = self._connection()
        with self._write_lock:
            try:
                self._patiently(lambda: conn.executescript(sql))
            except sqlite3.Error as exc:
                raise _translate(exc, what) from exc

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
        """Bring the schema to `SCHEMA_VERSION`, one transaction per step (safe to race).

        Logged once: a new outbox as created, an older one as migrated from its version.
        """
        start: int | None = None
        for version, statements in MIGRATIONS:
            with self._write(f"migrating {self._path} to schema {version}"):
                current = conn.execute(GET_VERSION).fetchone()[0]
                if current > SCHEMA_VERSION:
                    return  # reported by __init__
                if current >= version:
                    continue
                if current != version - 1:
                    raise OutboxError(f"no migration from schema {current} to {version}")
                for sql in statements:
                    conn.execute(sql)
                start = current if start is None else start
        if start == 0:
            LOGGER.info(f"outbox {self._path} created (schema version {SCHEMA_VERSION})")
        elif start is not None:
            LOGGER.info(
                f"outbox {self._path} migrated from schema version {start} to {SCHEMA_VERSION}"
            )

    def _give_incremental_vacuum(self, conn: sqlite3.Connection) -> None:
        """Make a file created before schema 5 able to shrink: one VACUUM, logged.

        Only while its live data is under `VACUUM_AT_OPEN_MAX_BYTES`: a VACUUM copies the live
        pages, and a longer one would outlast a service manager's start timeout (killed, it
        would start over at every start). Above that, pruning frees pages that new rows reuse,
        so the file stops growing, and a later start converts it once pruning has brought the
        live data under the limit. Checked at every read-write open, so a VACUUM cut short (a
        crash, a full disk, another process holding the lock) is done at a later one.
        """
        if conn.execute(SQL_AUTO_VACUUM).fetchone()[0] == AUTO_VACUUM_INCREMENTAL:
            return
        before = self._path.stat().st_size
        live = conn.execute(SQL_LIVE_BYTES).fetchone()[0]
        if live > VACUUM_AT_OPEN_MAX_BYTES:
            LOGGER.info(
                "outbox %s: not rewritten yet (VACUUM) to shrink back after pruning: %.0f MB "
                "of live data, more than %.0f MB; its free pages are reused meanwhile",
                self._path,
                live / _MB,
                VACUUM_AT_OPEN_MAX_BYTES / _MB,
            )
            return
        LOGGER.info(
            "outbox %s: rewriting it once (VACUUM, %.1f MB) so that it shrinks back as "
            "delivered rows are pruned",
            self._path,
            before / _MB,
        )
        started = time.monotonic()

        def vacuum() -> None:
            conn.execute(PRAGMA_AUTO_VACUUM)
            conn.execute(SQL_VACUUM)

        with self._write_lock:
            try:
                self._patiently(vacuum)
            except sqlite3.Error as exc:
                error = _translate(exc, "VACUUM")
                if not isinstance(error, OutboxFullError | OutboxBusyError):
                    raise error from exc
                LOGGER.warning(
                    "outbox %s: %s; it is tried again at the next start, and until then the "
                    "file does not shrink after pruning",
                    self._path,
                    error,
                )
                return
        LOGGER.info(
            "outbox %s: VACUUM done in %.1f s (%.1f MB -> %.1f MB)",
            self._path,
            time.monotonic() - started,
            before / _MB,
            self._path.stat().st_size / _MB,
        )

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
