"""Tests for forwarder.outbox: real SQLite files, real threads, real processes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from forwarder import outbox as outbox_module
from forwarder.dicomfile import DicomInfo
from forwarder.outbox import (
    SCHEMA_VERSION,
    Delivery,
    Mark,
    Outbox,
    OutboxBusyError,
    OutboxError,
    PathConflictError,
    State,
    schema,
)

REPO = Path(__file__).resolve().parents[1]
T0 = 1_000_000.0  # "now" of most tests; time only moves when a test moves it
LEASE = 300.0


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leaked, f"threads left running: {leaked}"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "outbox.sqlite3"


@pytest.fixture
def outbox(db_path: Path) -> Iterator[Outbox]:
    with Outbox(db_path) as ob:
        yield ob


def rec(i: int = 1, **changes: Any) -> DicomInfo:
    """A file's facts, numbered `i`; study = i // 10."""
    if "path" in changes:
        changes["path"] = Path(changes["path"])
    base = DicomInfo(
        path=Path(f"/in/{i:07d}.dcm"),
        size=1000 + i,
        mtime_ns=1_700_000_000_000_000_000 + i,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=f"1.2.3.{i}",
        transfer_syntax="1.2.840.10008.1.2.1",
        study_uid=f"1.2.9.{i // 10}",
        dataset_offset=336,
    )
    return replace(base, **changes)


def raw(db_path: Path) -> closing[sqlite3.Connection]:
    """A plain connection for looking under the hood (columns the API does not show)."""
    return closing(sqlite3.connect(db_path, isolation_level=None))


def column(db_path: Path, delivery_id: int, name: str) -> Any:
    with raw(db_path) as conn:
        sql = {
            "lease_until": "SELECT lease_until FROM deliveries WHERE id = ?",
            "updated_at": "SELECT updated_at FROM deliveries WHERE id = ?",
        }[name]
        return conn.execute(sql, (delivery_id,)).fetchone()[0]


def one(ob: Outbox, delivery_id: int) -> Delivery:
    (row,) = [d for d in ob.list(limit=1_000_000) if d.id == delivery_id]
    return row


def run_python(code: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )


# ------------------------------------------------------------------------------- schema


def test_creates_parent_dir_schema_and_wal(db_path: Path) -> None:
    with Outbox(db_path) as ob:
        assert ob.path == db_path
        conn = ob._connection()
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"deliveries", "destinations", "heartbeat"} <= names
    assert {
        "deliveries_claim",
        "deliveries_file",
        "deliveries_sop",
        "deliveries_study",
        "deliveries_done",
        "deliveries_backlog",
    } <= names


def test_reopen_keeps_rows_and_version(db_path: Path) -> None:
    with Outbox(db_path) as ob:
        assert ob.enqueue(rec(1), ["a", "b"], T0) == 2
    with Outbox(db_path) as ob:
        assert ob.counts() == {
            "a": {**dict.fromkeys(State, 0), State.PENDING: 1},
            "b": {**dict.fromkeys(State, 0), State.PENDING: 1},
        }
        assert ob.enqueue(rec(1), ["a", "b"], T0) == 0


def _empty_file(p: Path) -> None:
    p.touch()


def _empty_db_delete_journal(p: Path) -> None:
    with raw(p) as conn:
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.execute("PRAGMA user_version = 0")
        conn.execute("VACUUM")


@pytest.mark.parametrize(
    "prepare",
    [None, _empty_file, _empty_db_delete_journal],
    ids=["no file", "empty file", "version 0 rollback-journal db"],
)
def test_migrates_version_0_to_current(
    db_path: Path, prepare: Callable[[Path], None] | None
) -> None:
    if prepare is not None:
        db_path.parent.mkdir(parents=True)
        prepare(db_path)
    with Outbox(db_path) as ob:
        assert ob.enqueue(rec(1), ["a"], T0) == 1
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _version_1_db(db_path: Path) -> None:
    """A database as the first release wrote it, with one pending row."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with raw(db_path) as conn:
        for statement in outbox_module.MIGRATIONS[0][1]:
            conn.execute(statement)
        r = rec(1)
        conn.execute(
            "INSERT INTO deliveries (path, size, mtime_ns, sop_class_uid, sop_instance_uid,"
            " transfer_syntax, study_uid, destination, next_attempt_at, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 'a', ?, ?, ?)",
            (
                str(r.path),
                r.size,
                r.mtime_ns,
                r.sop_class_uid,
                r.sop_instance_uid,
                r.transfer_syntax,
                r.study_uid,
                T0,
                T0,
                T0,
            ),
        )
        conn.commit()


def test_migrates_version_1_keeping_rows_without_offset(db_path: Path) -> None:
    _version_1_db(db_path)
    with Outbox(db_path) as ob:
        (old,) = ob.claim("a", 10, T0 + 1, 60)
        assert (old.sop_instance_uid, old.dataset_offset) == ("1.2.3.1", None)
        assert ob.enqueue(rec(2, dataset_offset=1234), ["a"], T0) == 1
        (new,) = ob.claim("a", 10, T0 + 1, 60)
        assert new.dataset_offset == 1234
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_migrates_version_2_and_records_how_a_delivery_was_sent(db_path: Path) -> None:
    _version_1_db(db_path)
    with raw(db_path) as conn:  # a version 2 database (as the release before this one)
        for statement in outbox_module.MIGRATIONS[1][1]:
            conn.execute(statement)
        conn.commit()
    with Outbox(db_path) as ob:
        ob.enqueue_many([rec(2), rec(3)], ["a"], T0)
        first, second, third = ob.claim("a", 10, T0 + 1, 60)
        assert first.sent_as is None
        how = "decompressed to Explicit VR Little Endian"
        ob.mark_many(
            [
                Mark(first.id, State.SENT, 0, sent_as=how),
                Mark(second.id, State.SENT, 0, sent_as="as is"),
                Mark(third.id, State.SENT, 0),
            ],
            T0 + 2,
        )
        sent = {d.sop_instance_uid: d.sent_as for d in ob.list(states=[State.SENT])}
        assert sent == {"1.2.3.1": how, "1.2.3.2": "as is", "1.2.3.3": None}
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_known_files_and_files_states_answer_for_a_batch(db_path: Path) -> None:
    with Outbox(db_path) as ob:
        ob.enqueue_many([rec(i) for i in range(1, 4)], ["a", "b"], T0)
        (d,) = [x for x in ob.claim("a", 10, T0 + 1, 60) if x.sop_instance_uid == "1.2.3.2"]
        ob.mark_sent(d.id, 0, T0 + 2)
        key = {i: (str(rec(i).path), rec(i).size, rec(i).mtime_ns) for i in range(1, 5)}
        other_version = (key[1][0], key[1][1] + 1, key[1][2])
        assert ob.known_files([key[1], key[2], key[4], other_version]) == {key[1], key[2]}
        assert ob.known_files([]) == set()
        states = ob.files_states([key[2], key[3], key[4], other_version])
        assert states == {
            key[2]: {"a": State.SENT, "b": State.PENDING},
            key[3]: {"a": State.INFLIGHT, "b": State.PENDING},
        }
        many = [(f"/nowhere/{i}.dcm", 1, 1) for i in range(1200)] + [key[1]]
        assert ob.known_files(many) == {key[1]}  # past one IN (...) list


def test_migrations_are_consecutive_and_end_with_user_version() -> None:
    versions = [v for v, _ in outbox_module.MIGRATIONS]
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    for version, statements in outbox_module.MIGRATIONS:
        assert statements[-1] == f"PRAGMA user_version = {version}"


@pytest.mark.parametrize("readonly", [False, True])
def test_refuses_a_newer_schema(db_path: Path, readonly: bool) -> None:
    Outbox(db_path).close()
    with raw(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(OutboxError, match="newer"):
        Outbox(db_path, readonly=readonly)


def test_readonly_refuses_missing_or_old_db(db_path: Path) -> None:
    with pytest.raises(OutboxError, match="no outbox"):
        Outbox(db_path, readonly=True)
    assert not db_path.parent.exists()  # readonly creates nothing
    db_path.parent.mkdir()
    db_path.touch()  # version 0
    with pytest.raises(OutboxError, match="migrate"):
        Outbox(db_path, readonly=True)


def test_readonly_never_writes(db_path: Path) -> None:
    with Outbox(db_path) as ob:
        ob.enqueue(rec(1), ["a"], T0)
    digest = hashlib.sha256(db_path.read_bytes()).hexdigest()
    with Outbox(db_path, readonly=True) as ro:
        assert ro.readonly
        assert [d.sop_instance_uid for d in ro.list()] == ["1.2.3.1"]
        writes: list[Callable[[], object]] = [
            lambda: ro.enqueue(rec(2), ["a"], T0),
            lambda: ro.claim("a", 1, T0, LEASE),
            lambda: ro.heartbeat(T0, {}),
            lambda: ro.recover_leases(T0, all_inflight=True),
            lambda: ro.prune_delivered(T0),
            lambda: ro.vacuum_step(),
        ]
        for write in writes:
            with pytest.raises(OutboxError, match="read-only"):
                write()
    assert hashlib.sha256(db_path.read_bytes()).hexdigest() == digest


def test_state_check_constraint_mirrors_the_enum(outbox: Outbox, db_path: Path) -> None:
    with raw(db_path) as conn:
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'deliveries'").fetchone()
        in_list = ", ".join(str(int(s)) for s in State)
        assert f"CHECK (state IN ({in_list}))" in sql[0]
        insert = (
            "INSERT INTO deliveries (path, size, mtime_ns, sop_class_uid, sop_instance_uid, "
            "transfer_syntax, destination, state, next_attempt_at, created_at, updated_at, "
            "lease_until, done_at, commit_uid) "
            "VALUES (?, 1, 1, 'c', 's', 't', 'a', ?, 0, 0, 0, ?, ?, ?)"
        )
        for state in State:
            lease = 1.0 if state is State.INFLIGHT else None
            done = 1.0 if state in outbox_module.FINAL_STATES else None
            tx = "1.2.3" if state is State.COMMITTING else None
            conn.execute(insert, (f"/ok/{state.name}".encode(), int(state), lease, done, tx))
        for bad in (-1, len(State)):
            with pytest.raises(sqlite3.IntegrityError):
                conn.execute(insert, (f"/bad/{bad}".encode(), bad, None, None, None))
        # the lease, done_at and transaction invariants are enforced too
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute(insert, (b"/bad/lease", int(State.INFLIGHT), None, None, None))
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute(insert, (b"/bad/done", int(State.SENT), None, None, None))
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute(insert, (b"/bad/tx", int(State.COMMITTING), None, None, None))
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute(insert, (b"/bad/tx2", int(State.PENDING), None, None, "1.2.3"))


def test_refuses_a_file_that_is_not_a_database(db_path: Path) -> None:
    db_path.parent.mkdir()
    db_path.write_bytes(b"this is not an SQLite database, it is a DICOM file" * 100)
    for readonly in (False, True):
        with pytest.raises(OutboxError, match="not a database"):
            Outbox(db_path, readonly=readonly)


def test_busy_error_when_another_process_holds_the_lock_too_long(db_path: Path) -> None:
    with Outbox(db_path, busy_timeout=0.05) as ob, raw(db_path) as other:
        ob.enqueue(rec(1), ["a"], T0)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(OutboxBusyError):
            ob.claim("a", 1, T0, LEASE)
        assert ob.counts()["a"][State.PENDING] == 1  # reads go on meanwhile
        other.execute("ROLLBACK")
        assert len(ob.claim("a", 1, T0, LEASE)) == 1  # and the write lock was not kept


def test_connections_of_ended_threads_are_closed(outbox: Outbox) -> None:
    for _ in range(5):
        t = threading.Thread(target=outbox.counts)
        t.start()
        t.join()
    # the main thread's, plus the last thread's until the next thread connects or close()
    assert len(outbox._conns) <= 2


def test_closed_outbox_raises(db_path: Path) -> None:
    ob = Outbox(db_path)
    ob.close()
    ob.close()  # idempotent
    with pytest.raises(OutboxError, match="closed"):
        ob.counts()


# ------------------------------------------------------------------------------- enqueue


@pytest.mark.parametrize(
    ("second", "destinations", "added"),
    [
        (rec(1), ["a", "b"], 0),
        (rec(1), ["a", "b", "c"], 1),
        (rec(1), ["b"], 0),
        (rec(1, size=5), ["a", "b"], 2),
        (rec(1, mtime_ns=5), ["a", "b"], 2),
        (rec(1, path="/in/elsewhere.dcm"), ["a", "b"], 2),
        (rec(1, sop_instance_uid="9.9"), ["a", "b"], 0),  # the key is (path, size, mtime_ns)
        (rec(2), [], 0),
    ],
    ids=[
        "same file",
        "new destination",
        "subset of destinations",
        "size changed",
        "mtime changed",
        "other path",
        "same version other uid",
        "no destinations",
    ],
)
def test_enqueue_dedup(
    outbox: Outbox, second: DicomInfo, destinations: list[str], added: int
) -> None:
    first = rec(1)
    assert not outbox.is_known(str(first.path), first.size, first.mtime_ns)
    assert outbox.enqueue(first, ["a", "b"], T0) == 2
    assert outbox.is_known(str(first.path), first.size, first.mtime_ns)
    assert outbox.enqueue(second, destinations, T0 + 1) == added
    known = added > 0 or (str(second.path), second.size, second.mtime_ns) == (
        str(first.path),
        first.size,
        first.mtime_ns,
    )
    assert outbox.is_known(str(second.path), second.size, second.mtime_ns) == known
    assert len(outbox.list()) == 2 + added


def test_enqueue_sets_pending_row(outbox: Outbox) -> None:
    outbox.enqueue(rec(3), ["a"], T0)
    (d,) = outbox.list()
    assert (d.path, d.destination, d.state, d.attempts) == (str(rec(3).path), "a", State.PENDING, 0)
    assert (d.next_attempt_at, d.created_at, d.done_at) == (T0, T0, None)
    assert (d.first_attempt_at, d.last_attempt_at, d.last_status, d.last_error) == (
        None,
        None,
        None,
        None,
    )
    assert (d.size, d.mtime_ns, d.sop_class_uid, d.transfer_syntax, d.study_uid) == (
        rec(3).size,
        rec(3).mtime_ns,
        rec(3).sop_class_uid,
        rec(3).transfer_syntax,
        rec(3).study_uid,
    )


def test_enqueue_many_counts_only_new_rows(outbox: Outbox) -> None:
    outbox.enqueue(rec(1), ["a"], T0)
    assert outbox.enqueue_many([rec(1), rec(2), rec(2), rec(3)], ["a", "b"], T0) == 5
    assert outbox.enqueue_many([], ["a"], T0) == 0


def test_enqueue_routed_queues_each_file_for_its_own_destinations(outbox: Outbox) -> None:
    added = outbox.enqueue_routed(
        [(rec(1), ["a"]), (rec(2), ["a", "b"]), (rec(3), []), (rec(4), ["b"])], T0
    )
    assert added == 4
    rows = {(d.sop_instance_uid, d.destination) for d in outbox.list(limit=10)}
    assert rows == {("1.2.3.1", "a"), ("1.2.3.2", "a"), ("1.2.3.2", "b"), ("1.2.3.4", "b")}
    assert outbox.enqueue_routed([(rec(3), [])], T0) == 0
    with pytest.raises(OutboxError):  # one transaction: all or nothing
        outbox.enqueue_routed([(rec(5), ["a"]), (rec(6, size=-1), ["b"])], T0)
    assert len(outbox.list(limit=10)) == 4


def test_enqueue_many_is_all_or_nothing(outbox: Outbox) -> None:
    with pytest.raises(OutboxError):
        outbox.enqueue_many([rec(1), rec(2, size=-1)], ["a"], T0)  # CHECK (size >= 0)
    assert outbox.counts() == {}


def test_enqueue_wants_absolute_paths(outbox: Outbox) -> None:
    with pytest.raises(ValueError, match="absolute"):
        outbox.enqueue(rec(1, path="in/x.dcm"), ["a"], T0)


# ------------------------------------------------------------------------------- claim


def test_claim_oldest_due_first_with_limit_and_lease(outbox: Outbox, db_path: Path) -> None:
    outbox.enqueue_many([rec(i) for i in range(1, 6)], ["a", "b"], T0)
    # push rec(1) and rec(2) of "a" back: 1 due at T0+50, 2 due at T0+20
    first = outbox.claim("a", 2, T0, LEASE)
    assert [d.path for d in first] == [str(rec(1).path), str(rec(2).path)]
    outbox.mark_retry(first[0].id, 0xA700, "out of resources", T0, T0 + 50)
    outbox.mark_retry(first[1].id, 0xA700, "out of resources", T0, T0 + 20)

    now = T0 + 30
    batch = outbox.claim("a", 2, now, LEASE)
    assert [d.path for d in batch] == [
        str(rec(3).path),
        str(rec(4).path),
    ]  # by (next_attempt_at, id)
    assert all(d.state is State.INFLIGHT and d.destination == "a" for d in batch)
    assert column(db_path, batch[0].id, "lease_until") == now + LEASE
    batch = outbox.claim("a", 10, now, LEASE)
    assert [d.path for d in batch] == [
        str(rec(5).path),
        str(rec(2).path),
    ]  # rec(1) not due until +50
    assert outbox.claim("a", 10, now, LEASE) == []
    assert [d.path for d in outbox.claim("a", 10, T0 + 50, LEASE)] == [str(rec(1).path)]
    assert len(outbox.claim("b", 100, now, LEASE)) == 5  # other destination untouched


def test_claim_returns_nothing_while_paused(outbox: Outbox) -> None:
    outbox.enqueue(rec(1), ["a", "b"], T0)
    outbox.pause_destination("a", T0 + 60, "association rejected", T0)
    assert outbox.claim("a", 10, T0 + 59, LEASE) == []
    assert len(outbox.claim("b", 10, T0, LEASE)) == 1
    assert len(outbox.claim("a", 10, T0 + 60, LEASE)) == 1  # the pause ran out


@pytest.mark.parametrize(("limit", "lease"), [(0, LEASE), (1, 0.0)])
def test_claim_rejects_bad_arguments(outbox: Outbox, limit: int, lease: float) -> None:
    with pytest.raises(ValueError):
        outbox.claim("a", limit, T0, lease)


# ------------------------------------------------------------------------------- marks

_NOW = T0 + 10


@pytest.mark.parametrize(
    ("mark", "state", "attempts", "status", "error", "done", "first"),
    [
        (lambda ob, i: ob.mark_sent(i, 0, _NOW), State.SENT, 1, 0, None, _NOW, _NOW),
        (
            lambda ob, i: ob.mark_sent(i, 0xB000, _NOW, warning="coercion"),
            State.SENT,
            1,
            0xB000,
            "coercion",
            _NOW,
            _NOW,
        ),
        (
            lambda ob, i: ob.mark_retry(i, 0xA700, "busy", _NOW, _NOW + 5),
            State.PENDING,
            1,
            0xA700,
            "busy",
            None,
            _NOW,
        ),
        (
            lambda ob, i: ob.mark_retry(i, None, "refused", _NOW, _NOW + 5, count_attempt=False),
            State.PENDING,
            0,
            None,
            "refused",
            None,
            None,
        ),
        (
            lambda ob, i: ob.mark_quarantined(i, 0xA900, "dataset mismatch", _NOW),
            State.QUARANTINED,
            1,
            0xA900,
            "dataset mismatch",
            _NOW,
            _NOW,
        ),
        (
            lambda ob, i: ob.mark_gone(i, "no such file", _NOW),
            State.GONE,
            0,
            None,
            "no such file",
            _NOW,
            None,
        ),
    ],
    ids=["sent", "sent with warning", "retry", "retry outage", "quarantined", "gone"],
)
def test_mark_transitions(
    outbox: Outbox,
    db_path: Path,
    mark: Callable[[Outbox, int], None],
    state: State,
    attempts: int,
    status: int | None,
    error: str | None,
    done: float | None,
    first: float | None,
) -> None:
    outbox.enqueue(rec(1), ["a"], T0)
    (d,) = outbox.claim("a", 1, T0, LEASE)
    mark(outbox, d.id)
    after = one(outbox, d.id)
    assert (after.state, after.attempts, after.last_status, after.last_error) == (
        state,
        attempts,
        status,
        error,
    )
    tried = None if state is State.GONE else _NOW
    assert (after.done_at, after.first_attempt_at, after.last_attempt_at) == (done, first, tried)
    assert column(db_path, d.id, "lease_until") is None
    assert column(db_path, d.id, "updated_at") == _NOW
    if state is State.PENDING:
        assert after.next_attempt_at == _NOW + 5


def test_attempts_count_only_counted_tries(outbox: Outbox) -> None:
    outbox.enqueue(rec(1), ["a"], T0)
    (d,) = outbox.claim("a", 1, T0, LEASE)
    outbox.mark_retry(d.id, None, "connection refused", T0, T0 + 1, count_attempt=False)
    (d,) = outbox.claim("a", 1, T0 + 1, LEASE)
    outbox.mark_retry(d.id, 0xA700, "out of resources", T0 + 1, T0 + 2)
    (d,) = outbox.claim("a", 1, T0 + 2, LEASE)
    assert d.attempts == 1
    outbox.release([d.id], T0 + 2)
    (d,) = outbox.claim("a", 1, T0 + 3, LEASE)
    outbox.mark_sent(d.id, 0, T0 + 4)
    d = one(outbox, d.id)
    assert (d.attempts, d.first_attempt_at, d.last_attempt_at) == (2, T0 + 1, T0 + 4)


@pytest.mark.parametrize(
    ("setup", "mark", "expected"),
    [
        # a row whose lease was recovered is no longer the worker's to retry or quarantine
        ("recovered", lambda ob, i: ob.mark_retry(i, None, "x", _NOW, _NOW), State.PENDING),
        ("recovered", lambda ob, i: ob.mark_quarantined(i, None, "x", _NOW), State.PENDING),
        ("recovered", lambda ob, i: ob.mark_gone(i, "x", _NOW), State.PENDING),
        ("recovered", lambda ob, i: ob.release([i], _NOW), State.PENDING),
        # ... but a success is the truth whatever happened meanwhile
        ("recovered", lambda ob, i: ob.mark_sent(i, 0, _NOW), State.SENT),
        ("sent", lambda ob, i: ob.mark_retry(i, None, "x", _NOW, _NOW), State.SENT),
        ("sent", lambda ob, i: ob.mark_sent(i, 0, _NOW + 99), State.SENT),
        ("quarantined", lambda ob, i: ob.mark_gone(i, "x", _NOW), State.QUARANTINED),
    ],
    ids=[
        "retry after recovery",
        "quarantine after recovery",
        "gone after recovery",
        "release after recovery",
        "sent after recovery",
        "retry after sent",
        "sent twice",
        "gone after quarantine",
    ],
)
def test_stale_marks(
    outbox: Outbox, setup: str, mark: Callable[[Outbox, int], None], expected: State
) -> None:
    outbox.enqueue(rec(1), ["a"], T0)
    (d,) = outbox.claim("a", 1, T0, LEASE)
    if setup == "recovered":
        outbox.recover_leases(T0, all_inflight=True)
    elif setup == "sent":
        outbox.mark_sent(d.id, 0, T0 + 1)
    else:
        outbox.mark_quarantined(d.id, None, "rejected", T0 + 1)
    before = one(outbox, d.id)
    mark(outbox, d.id)
    after = one(outbox, d.id)
    assert after.state is expected
    if expected is before.state:
        assert after == before  # left alone entirely


def test_mark_unknown_id_is_ignored(outbox: Outbox) -> None:
    outbox.mark_sent(12345, 0, T0)
    outbox.mark_retry(12345, None, "x", T0, T0)
    assert outbox.counts() == {}
    assert outbox.destination_info() == {}


def test_mark_many_records_a_batch_in_one_transaction(outbox: Outbox) -> None:
    outbox.enqueue_many([rec(i) for i in range(1, 6)], ["a"], T0)
    batch = outbox.claim("a", 5, T0, LEASE)
    d1, d2, d3, d4, d5 = (d.id for d in batch)
    outbox.mark_many(
        [
            Mark(d1, State.SENT, 0x0000),
            Mark(d2, State.SENT, 0xB000, "coercion"),
            Mark(d3, State.PENDING, 0xA700, "out of resources", T0 + 10),
            Mark(d4, State.QUARANTINED, 0xA900, "does not match"),
            Mark(d5, State.GONE, None, "vanished"),
            Mark(d3, State.QUARANTINED, 0xA900, "late: no longer in flight"),  # ignored
        ],
        T0 + 1,
    )
    assert [one(outbox, i).state for i in (d1, d2, d3, d4, d5)] == [
        State.SENT,
        State.SENT,
        State.PENDING,
        State.QUARANTINED,
        State.GONE,
    ]
    assert one(outbox, d2).last_error == "coercion"
    assert one(outbox, d3).next_attempt_at == T0 + 10
    assert one(outbox, d3).attempts == 1
    assert one(outbox, d5).attempts == 0
    assert outbox.destination_info()["a"].last_success_at == T0 + 1
    with pytest.raises(ValueError):
        outbox.mark_many([Mark(d1, State.INFLIGHT)], T0 + 2)


def test_release_keeps_place_in_line(outbox: Outbox) -> None:
    outbox.enqueue_many([rec(1), rec(2), rec(3)], ["a"], T0)
    batch = outbox.claim("a", 2, T0 + 1, LEASE)
    outbox.release([d.id for d in batch], T0 + 2)
    again = outbox.claim("a", 3, T0 + 2, LEASE)
    assert [d.path for d in again] == [str(rec(1).path), str(rec(2).path), str(rec(3).path)]
    assert all(d.attempts == 0 for d in again)
    outbox.release([], T0)  # nothing to do


def test_recover_leases(outbox: Outbox) -> None:
    outbox.enqueue_many([rec(1), rec(2), rec(3)], ["a"], T0)
    outbox.claim("a", 1, T0, 10.0)  # lease until T0+10
    outbox.claim("a", 1, T0 + 5, 10.0)  # lease until T0+15
    assert outbox.recover_leases(T0 + 9.9) == 0
    assert outbox.recover_leases(T0 + 10) == 1
    assert outbox.counts()["a"][State.INFLIGHT] == 1
    outbox.claim("a", 5, T0 + 10, 10.0)
    assert outbox.recover_leases(T0 + 10, all_inflight=True) == 3
    assert outbox.counts()["a"][State.PENDING] == 3
    assert outbox.recover_leases(T0 + 10, all_inflight=True) == 0


def test_next_due(outbox: Outbox) -> None:
    assert outbox.next_due("a", T0) is None
    outbox.enqueue_many([rec(1), rec(2)], ["a"], T0)
    assert outbox.next_due("a", T0) == T0
    one_, two = outbox.claim("a", 2, T0, LEASE)
    assert outbox.next_due("a", T0) is None  # in flight rows are nobody's to wait for
    outbox.mark_retry(one_.id, None, "x", T0, T0 + 30)
    outbox.mark_retry(two.id, None, "x", T0, T0 + 20)
    assert outbox.next_due("a", T0) == T0 + 20
    outbox.pause_destination("a", T0 + 25, "down", T0)
    assert outbox.next_due("a", T0) == T0 + 25  # not before the pause ends
    assert outbox.next_due("a", T0 + 25) == T0 + 20  # pause over: due already


def test_file_states(outbox: Outbox) -> None:
    r = rec(1)
    assert outbox.file_states(str(r.path), r.size, r.mtime_ns) == {}
    outbox.enqueue(r, ["a", "b", "c"], T0)
    outbox.enqueue(rec(1, size=1), ["a"], T0)  # another version of the same path
    a, b, _ = (outbox.claim(name, 1, T0, LEASE)[0] for name in ("a", "b", "c"))
    outbox.mark_sent(a.id, 0, T0)
    outbox.mark_quarantined(b.id, 0xC000, "cannot understand", T0)
    assert outbox.file_states(str(r.path), r.size, r.mtime_ns) == {
        "a": State.SENT,
        "b": State.QUARANTINED,
        "c": State.INFLIGHT,
    }


def test_set_path(outbox: Outbox) -> None:
    outbox.enqueue(rec(1), ["a", "b"], T0)
    outbox.enqueue(rec(2), ["a"], T0)
    assert outbox.set_path(str(rec(1).path), "/quarantine/x.dcm", now=T0 + 1) == 2
    assert outbox.set_path("/nowhere.dcm", "/elsewhere.dcm") == 0
    assert not outbox.is_known(str(rec(1).path), rec(1).size, rec(1).mtime_ns)
    assert outbox.file_states("/quarantine/x.dcm", rec(1).size, rec(1).mtime_ns) == {
        "a": State.PENDING,
        "b": State.PENDING,
    }
    assert {d.path for d in outbox.list(destination="b")} == {"/quarantine/x.dcm"}
    with pytest.raises(ValueError, match="absolute"):
        outbox.set_path(str(rec(2).path), "relative.dcm")


def test_set_path_conflict(outbox: Outbox) -> None:
    outbox.enqueue(rec(1), ["a"], T0)
    outbox.enqueue(rec(1, path="/archive/x.dcm"), ["a"], T0)
    with pytest.raises(PathConflictError):
        outbox.set_path(str(rec(1).path), "/archive/x.dcm")
    assert {d.path for d in outbox.list()} == {str(rec(1).path), "/archive/x.dcm"}  # rolled back


# ------------------------------------------------------------------------------- operator


def _waiting(outbox: Outbox) -> None:
    """rec 1, 2, 30 to a and b; every row waits for a retry at T0+100 except (30, b)."""
    outbox.enqueue_many([rec(1), rec(2), rec(30)], ["a", "b"], T0)
    for d in outbox.claim("a", 10, T0, LEASE) + outbox.claim("b", 2, T0, LEASE):
        outbox.mark_retry(d.id, 0xA700, "busy", T0, T0 + 100)


@pytest.mark.parametrize(
    ("filters", "changed"),
    [
        ({}, {(1, "a"), (2, "a"), (30, "a"), (1, "b"), (2, "b")}),
        ({"destination": "a"}, {(1, "a"), (2, "a"), (30, "a")}),
        ({"study_uid": "1.2.9.0"}, {(1, "a"), (2, "a"), (1, "b"), (2, "b")}),
        ({"destination": "b", "study_uid": "1.2.9.3"}, set()),  # (30, "b") is due already
    ],
    ids=["all", "destination", "study", "both"],
)
def test_retry_now(outbox: Outbox, filters: dict[str, str], changed: set[tuple[int, str]]) -> None:
    _waiting(outbox)
    assert outbox.retry_now(T0 + 1, **filters) == len(changed)
    due_now = {
        (int(d.sop_instance_uid.rsplit(".", 1)[1]), d.destination)
        for d in outbox.list(states=[State.PENDING])
        if d.next_attempt_at == T0 + 1
    }
    assert due_now == changed
    assert all(d.attempts == 1 for d in outbox.list(states=[State.PENDING]) if d.destination == "a")


def test_requeue(outbox: Outbox) -> None:
    outbox.enqueue_many([rec(1), rec(2), rec(3), rec(4)], ["a"], T0)
    q, g, s, p = outbox.claim("a", 4, T0, LEASE)
    outbox.mark_retry(q.id, 0xA700, "busy", T0, T0)
    (q,) = outbox.claim("a", 1, T0, LEASE)
    outbox.mark_quarantined(q.id, 0xA900, "rejected", T0 + 1)
    outbox.mark_gone(g.id, "vanished", T0 + 1)
    outbox.mark_sent(s.id, 0, T0 + 1)
    outbox.release([p.id], T0 + 1)

    changed = outbox.requeue([q.id, g.id, s.id, p.id, 999], T0 + 5, new_path="/in/back.dcm")
    assert changed == 2
    again = {d.id: d for d in outbox.list(states=[State.PENDING])}
    assert set(again) == {q.id, g.id, p.id}
    for d in (again[q.id], again[g.id]):
        assert (d.attempts, d.first_attempt_at, d.done_at, d.next_attempt_at) == (
            0,
            None,
            None,
            T0 + 5,
        )
        assert d.path == "/in/back.dcm"
    assert again[q.id].last_error == "rejected"  # kept for reference
    assert one(outbox, s.id).state is State.SENT
    assert {d.id for d in outbox.claim("a", 10, T0 + 5, LEASE)} == {q.id, g.id, p.id}


def test_requeue_keeps_path_without_new_path(outbox: Outbox) -> None:
    outbox.enqueue(rec(1), ["a"], T0)
    (d,) = outbox.claim("a", 1, T0, LEASE)
    outbox.mark_gone(d.id, "vanished", T0)
    assert outbox.requeue([d.id], T0) == 1
    assert one(outbox, d.id).path == str(rec(1).path)


def _finish(outbox: Outbox, destination: str, state: State, now: float) -> None:
    for d in outbox.claim(destination, 1000, now, LEASE):
        if state is State.SENT:
            outbox.mark_sent(d.id, 0, now)
        elif state is State.QUARANTINED:
            outbox.mark_quarantined(d.id, 0xA900, "rejected", now)
        elif state is State.GONE:
            outbox.mark_gone(d.id, "vanished", now)


@pytest.mark.parametrize(
    ("sibling", "pruned"),
    [
        (State.SENT, 2),
        (State.GONE, 2),
        (State.PENDING, 0),
        (State.INFLIGHT, 0),
        (State.QUARANTINED, 0),
    ],
)
def test_prune_keeps_files_with_unfinished_rows(
    outbox: Outbox, sibling: State, pruned: int
) -> None:
    outbox.enqueue(rec(1), ["a", "b"], T0)
    _finish(outbox, "a", State.SENT, T0)
    if sibling is State.INFLIGHT:
        outbox.claim("b", 1, T0, LEASE)
    elif sibling is not State.PENDING:
        _finish(outbox, "b", sibling, T0)
    assert outbox.prune_delivered(T0 + 1).deleted == pruned
    assert outbox.prune_delivered(T0 + 1).deleted == 0
    assert len(outbox.list()) == 2 - pruned


def test_prune_age_and_batches(outbox: Outbox) -> None:
    outbox.enqueue_many([rec(i) for i in range(10)], ["a"], T0)
    for i, d in enumerate(outbox.claim("a", 10, T0, LEASE)):
        outbox.mark_sent(d.id, 0, T0 + i)
    deleted, after, calls = 0, None, 0
    while True:  # done at T0+0 .. T0+6: three calls of three rows, the last finds one
        result = outbox.prune_delivered(T0 + 7, 3, after=after)
        deleted, after, calls = deleted + result.deleted, result.last, calls + 1
        assert result.deleted <= 3
        if result.done:
            break
    assert (deleted, calls) == (7, 3)
    assert outbox.retention_horizon() == T0 + 7
    assert sorted(d.done_at or 0 for d in outbox.list()) == [T0 + 7, T0 + 8, T0 + 9]
    # a pruned file is no longer known, so the same unchanged file would be queued again
    assert not outbox.is_known(str(rec(0).path), rec(0).size, rec(0).mtime_ns)


def test_counts_sent_since_oldest_pending(outbox: Outbox) -> None:
    assert (outbox.counts(), outbox.sent_since(0), outbox.oldest_pending()) == ({}, {}, {})
    outbox.enqueue_many([rec(1), rec(2)], ["a", "b"], T0)
    outbox.enqueue(rec(3), ["a", "b"], T0 + 50)
    _finish(outbox, "a", State.SENT, T0 + 60)  # all three of a
    (b1,) = outbox.claim("b", 1, T0 + 60, LEASE)
    outbox.mark_quarantined(b1.id, 0xA900, "rejected", T0 + 61)
    outbox.claim("b", 1, T0 + 62, LEASE)  # rec(2) in flight, rec(3) pending
    zero = dict.fromkeys(State, 0)
    assert outbox.counts() == {
        "a": {**zero, State.SENT: 3},
        "b": {**zero, State.QUARANTINED: 1, State.INFLIGHT: 1, State.PENDING: 1},
    }
    assert outbox.sent_since(T0 + 60) == {"a": 3}
    assert outbox.sent_since(T0 + 61) == {}
    assert outbox.oldest_pending() == {"b": T0}  # the in-flight rec(2), created at T0


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, [(1, "a"), (1, "b"), (2, "a"), (2, "b"), (11, "a"), (11, "b")]),
        ({"destination": "b"}, [(1, "b"), (2, "b"), (11, "b")]),
        ({"states": [State.SENT]}, [(1, "a")]),
        (
            {"states": [State.PENDING, State.QUARANTINED]},
            [(1, "b"), (2, "a"), (2, "b"), (11, "a"), (11, "b")],
        ),
        ({"states": []}, []),
        ({"study_uid": "1.2.9.1"}, [(11, "a"), (11, "b")]),
        ({"path": str(rec(2).path)}, [(2, "a"), (2, "b")]),
        ({"destination": "a", "states": [State.PENDING], "study_uid": "1.2.9.0"}, [(2, "a")]),
        ({"limit": 3}, [(1, "a"), (1, "b"), (2, "a")]),
    ],
    ids=["all", "destination", "state", "states", "no states", "study", "path", "and", "limit"],
)
def test_list(outbox: Outbox, filters: dict[str, Any], expected: list[tuple[int, str]]) -> None:
    outbox.enqueue_many([rec(1), rec(2), rec(11)], ["a", "b"], T0)
    (d,) = outbox.claim("a", 1, T0, LEASE)
    outbox.mark_sent(d.id, 0, T0)
    (d,) = outbox.claim("b", 1, T0, LEASE)
    outbox.mark_quarantined(d.id, 0xA900, "rejected", T0)
    got = [
        (int(d.sop_instance_uid.rsplit(".", 1)[1]), d.destination) for d in outbox.list(**filters)
    ]
    assert got == expected


def test_find_by_instance_or_study(outbox: Outbox) -> None:
    outbox.enqueue_many([rec(1), rec(2), rec(11)], ["a", "b"], T0)
    assert [(d.sop_instance_uid, d.destination) for d in outbox.find("1.2.3.2")] == [
        ("1.2.3.2", "a"),
        ("1.2.3.2", "b"),
    ]
    assert {d.sop_instance_uid for d in outbox.find("1.2.9.0")} == {"1.2.3.1", "1.2.3.2"}
    assert outbox.find("1.2.777") == []


# ------------------------------------------------------------------------------- breaker, health


def test_destination_breaker(outbox: Outbox) -> None:
    assert outbox.destination_info() == {}
    outbox.record_destination_error("a", "connection refused", T0)
    outbox.record_destination_error("a", "connection refused again", T0 + 1)
    outbox.pause_destination("a", T0 + 60, "2 failures", T0 + 1)
    # ran out with no store answered since: the same outage, paused since its start
    outbox.pause_destination("a", T0 + 120, "still down", T0 + 61)
    outbox.pause_destination("a", T0 + 300, "still down", T0 + 100)  # extended: same pause
    info = outbox.destination_info()["a"]
    assert (info.paused_until, info.pause_reason, info.paused_at) == (
        T0 + 300,
        "still down",
        T0 + 1,
    )
    assert (info.last_error, info.last_error_at, info.consecutive_failures) == (
        "connection refused again",
        T0 + 1,
        2,
    )
    assert info.paused(T0 + 299) and not info.paused(T0 + 300)
    outbox.resume_destination("a")
    outbox.resume_destination("never-paused")
    info = outbox.destination_info()["a"]
    assert (info.paused_until, info.pause_reason, info.paused_at) == (None, None, None)

    outbox.enqueue(rec(1), ["a"], T0)
    (d,) = outbox.claim("a", 1, T0 + 400, LEASE)
    outbox.mark_sent(d.id, 0, T0 + 401)
    info = outbox.destination_info()["a"]
    assert (info.last_success_at, info.consecutive_failures) == (T0 + 401, 0)
    assert info.last_error == "connection refused again"  # history is kept


def test_heartbeat(outbox: Outbox, db_path: Path) -> None:
    assert outbox.read_heartbeat() is None
    outbox.heartbeat(T0, {"version": "0.1.0", "queued": 3})
    outbox.heartbeat(T0 + 5, {"version": "0.1.0", "path": Path("/in")})
    hb = outbox.read_heartbeat()
    assert hb is not None
    assert (hb.pid, hb.started_at, hb.updated_at) == (os.getpid(), T0, T0 + 5)
    assert hb.info == {"version": "0.1.0", "path": "/in"}
    with Outbox(db_path) as restarted:  # a new daemon: a new start time
        restarted.heartbeat(T0 + 100, {})
        with Outbox(db_path, readonly=True) as cli:
            hb = cli.read_heartbeat()
    assert hb is not None and (hb.started_at, hb.updated_at, hb.info) == (T0 + 100, T0 + 100, {})


# ------------------------------------------------------------------------------- concurrency


def test_threads_never_claim_the_same_row(outbox: Outbox) -> None:
    total = 600
    outbox.enqueue_many([rec(i) for i in range(total)], ["a"], T0)
    claimed: list[list[int]] = [[] for _ in range(4)]
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(n: int) -> None:
        try:
            start.wait()
            while batch := outbox.claim("a", 7, T0, LEASE):
                claimed[n].extend(d.id for d in batch)
                for d in batch:
                    outbox.mark_sent(d.id, 0, T0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    ids = [i for part in claimed for i in part]
    assert len(ids) == len(set(ids)) == total
    assert all(claimed), "every thread should have had a share"
    assert outbox.counts()["a"][State.SENT] == total
    assert len(outbox._conns) >= 4  # one connection per thread, closed by close()


_CLAIM_ALL = """
import json, sys, time
from forwarder.outbox import Outbox
ids = []
with Outbox(sys.argv[1]) as ob:
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    while batch := ob.claim("a", 5, 1e9, 300.0):
        ids += [d.id for d in batch]
        for d in batch:
            ob.mark_sent(d.id, 0, 1e9)
        time.sleep(0.001)  # like a worker, it sends between its transactions
print(json.dumps(ids))
"""


def test_processes_never_claim_the_same_row(outbox: Outbox, db_path: Path) -> None:
    outbox.enqueue_many([rec(i) for i in range(400)], ["a"], T0)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CLAIM_ALL, str(db_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        for _ in range(2)
    ]
    for p in procs:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    shares = [json.loads(out) for out in outs]
    ids = [i for share in shares for i in share]
    assert len(ids) == len(set(ids)) == 400
    assert all(shares), "both processes should have had a share"
    assert outbox.counts()["a"][State.SENT] == 400


_READ_COUNTS = """
import json, sys, time
from forwarder.outbox import Outbox
t = time.monotonic()
with Outbox(sys.argv[1], readonly=True, busy_timeout=0.2) as ob:
    counts = {d: {s.name: n for s, n in c.items() if n} for d, c in ob.counts().items()}
    rows = len(ob.list(limit=1000))
print(json.dumps({"counts": counts, "rows": rows, "seconds": time.monotonic() - t}))
"""


def test_reader_process_is_not_blocked_by_a_writer(outbox: Outbox, db_path: Path) -> None:
    outbox.enqueue_many([rec(i) for i in range(5)], ["a"], T0)
    with raw(db_path) as writer:
        writer.execute("BEGIN EXCLUSIVE")  # the strongest lock a writer can hold in WAL mode
        writer.execute("UPDATE deliveries SET state = 2, done_at = 1")  # not committed
        result = run_python(_READ_COUNTS, str(db_path))
        writer.execute("ROLLBACK")
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["counts"] == {"a": {"PENDING": 5}}  # the committed snapshot
    assert seen["rows"] == 5


_HOLD_SNAPSHOT = """
import sys
from forwarder.outbox import Outbox
with Outbox(sys.argv[1], readonly=True) as ob:
    conn = ob._connection()
    conn.execute("BEGIN")
    n = conn.execute("SELECT count(*) FROM deliveries").fetchone()[0]
    print(n, flush=True)
    sys.stdin.readline()  # hold the read transaction until told
    print(conn.execute("SELECT count(*) FROM deliveries").fetchone()[0], flush=True)
    conn.execute("COMMIT")
"""


def test_daemon_is_not_blocked_by_a_reader_process(db_path: Path) -> None:
    with Outbox(db_path, busy_timeout=0.2) as daemon:
        daemon.enqueue_many([rec(i) for i in range(5)], ["a"], T0)
        reader = subprocess.Popen(
            [sys.executable, "-c", _HOLD_SNAPSHOT, str(db_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            assert reader.stdout is not None and reader.stdin is not None
            assert reader.stdout.readline().strip() == "5"
            # the reader holds a snapshot; the daemon writes on (busy_timeout is only 0.2 s)
            assert daemon.enqueue_many([rec(i) for i in range(5, 10)], ["a"], T0) == 5
            assert len(daemon.claim("a", 3, T0, LEASE)) == 3
            reader.stdin.write("\n")
            reader.stdin.flush()
            assert reader.stdout.readline().strip() == "5"  # its snapshot did not move
            assert reader.wait(timeout=30) == 0
        finally:
            if reader.poll() is None:
                reader.kill()
            reader.wait()
            assert reader.stdout is not None and reader.stdin is not None
            reader.stdout.close()
            reader.stdin.close()


_ENQUEUE_FOREVER = """
import sys
from pathlib import Path
from forwarder.dicomfile import DicomInfo
from forwarder.outbox import Outbox
ob = Outbox(sys.argv[1])
i = int(sys.argv[2])
start = i
while True:
    rec = DicomInfo(
        Path(f"/in/{i:07d}.dcm"), 1000 + i, i * 7, "1.2.840.10008.5.1.4.1.1.2",
        f"1.2.3.{i}", "1.2.840.10008.1.2.1", f"1.2.9.{i // 10}", 336,
    )
    ob.enqueue(rec, ("a", "b", "c"), float(i))
    for d in ob.claim("a", 2, float(i), 60.0):
        ob.mark_sent(d.id, 0, float(i))
    i += 1
    if i == start + 20:
        print("running", flush=True)
"""


def test_kill_9_in_the_middle_of_enqueues_leaves_a_sound_db(db_path: Path) -> None:
    Outbox(db_path).close()
    files = 0
    for _ in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", _ENQUEUE_FOREVER, str(db_path), str(files)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert child.stdout is not None
        try:
            assert child.stdout.readline().strip() == "running"
            time.sleep(0.2)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
        assert child.returncode == -signal.SIGKILL

        with Outbox(db_path) as ob:
            assert ob.integrity_check() == []
            ob.recover_leases(0, all_inflight=True)
            rows = ob.list(limit=10_000_000)
            by_file: dict[str, set[str]] = {}
            for d in rows:
                i = int(d.sop_instance_uid.rsplit(".", 1)[1])
                assert d.path == f"/in/{i:07d}.dcm"
                assert (d.size, d.mtime_ns, d.created_at) == (1000 + i, i * 7, float(i))
                assert d.study_uid == f"1.2.9.{i // 10}"
                assert d.state in (State.PENDING, State.SENT)
                by_file.setdefault(d.path, set()).add(d.destination)
            # every enqueue was all three rows or none, and none was lost
            assert all(dests == {"a", "b", "c"} for dests in by_file.values())
            assert sorted(by_file) == [f"/in/{i:07d}.dcm" for i in range(len(by_file))]
            assert len(by_file) >= files + 20
            files = len(by_file)


# ------------------------------------------------------------------------------- scale


def _plan(db_path: Path, sql: str, params: dict[str, Any]) -> list[str]:
    with raw(db_path) as conn:
        return [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]


def test_100k_backlog_claims_through_the_index(outbox: Outbox, db_path: Path) -> None:
    recs = [rec(i) for i in range(100_000)]
    assert outbox.enqueue_many(recs, ["pacs"], T0) == 100_000
    batch = outbox.claim("pacs", 64, T0, LEASE)
    assert [d.path for d in batch] == [str(r.path) for r in recs[:64]]

    plan = _plan(
        db_path,
        schema.SQL_CLAIM,
        {"destination": "pacs", "now": T0, "limit": 64, "lease_until": T0 + LEASE},
    )
    assert any("USING COVERING INDEX deliveries_claim" in line for line in plan), plan
    assert not any(line.startswith("SCAN") or "TEMP B-TREE" in line for line in plan), plan


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("SQL_IS_KNOWN", "deliveries_file"),
        ("SQL_FILE_STATES", "deliveries_file"),
        ("SQL_SET_PATH", "deliveries_file"),
        ("SQL_NEXT_DUE", "deliveries_claim"),
        ("SQL_COUNTS", "deliveries_claim"),
        ("SQL_SENT_SINCE", "deliveries_done"),
        ("SQL_OLDEST_PENDING", "deliveries_backlog"),
        ("SQL_RECOVER_EXPIRED", "deliveries_done"),
        ("SQL_PRUNE_CANDIDATES", "deliveries_delivered"),
        ("SQL_PRUNE_ONE", "deliveries_file"),
        ("SQL_FIND", "deliveries_sop"),
        ("SQL_FIND", "deliveries_study"),
    ],
)
def test_queries_use_indexes(outbox: Outbox, db_path: Path, name: str, index: str) -> None:
    sql: str = getattr(schema, name)
    params = dict.fromkeys(
        (
            *("path", "size", "mtime_ns", "old_path", "new_path", "now", "uid", "id"),
            *("before", "limit", "after_done", "after_id"),
        ),
        1,
    )
    positional = (1,) * sql.count("?")
    with raw(db_path) as conn:
        rows = conn.execute("EXPLAIN QUERY PLAN " + sql, positional or params).fetchall()
    plan = [row[3] for row in rows]
    assert any(index in line for line in plan), plan
    # no full scan of the table; counts reads the (smaller) covering index
    assert not any(line == "SCAN deliveries" for line in plan), plan


def test_a_new_outbox_is_logged_once_as_created(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "new.sqlite3"
    with caplog.at_level(logging.INFO, logger="forwarder.outbox"):
        Outbox(path).close()
        Outbox(path).close()  # up to date: nothing to say
    lines = [r.getMessage() for r in caplog.records if "schema" in r.getMessage()]
    assert lines == [f"outbox {path} created (schema version {SCHEMA_VERSION})"]
