"""Tests for forwarder.outbox under hostile input: names that are not UTF-8, a full disk, a
damaged file, and the count of refusals kept apart from transient failures. Real SQLite files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_outbox import raw, rec  # the same records and raw connection

from forwarder import outbox as outbox_module
from forwarder.outbox import (
    SCHEMA_VERSION,
    Mark,
    Outbox,
    OutboxCorruptError,
    OutboxFullError,
    State,
)

T0 = 1_000_000.0
LATIN1 = os.fsdecode(b"/in/caf\xe9.dcm")  # a Latin-1 name: not valid UTF-8


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "outbox.sqlite3"


# ---------------------------------------------------------------------- names not in UTF-8


def test_a_name_that_is_not_utf8_round_trips_through_every_path_query(db_path: Path) -> None:
    r = rec(1, path=LATIN1)
    key = (str(r.path), r.size, r.mtime_ns)
    with Outbox(db_path) as ob:
        assert ob.known_files([key]) == set()
        assert ob.enqueue(r, ["a"], T0) == 1
        assert ob.known_files([key]) == {key}
        assert ob.is_known(*key)
        assert ob.files_states([key]) == {key: {"a": State.PENDING}}
        (d,) = ob.claim("a", 10, T0, 60)
        assert d.path == LATIN1
        assert os.fsencode(d.path) == b"/in/caf\xe9.dcm"  # the very bytes of the name
        assert [x.id for x in ob.list(path=LATIN1)] == [d.id]
        moved = os.fsdecode(b"/q/caf\xe9.dcm")
        assert ob.set_path(LATIN1, moved) == 1
        assert ob.file_states(moved, r.size, r.mtime_ns) == {"a": State.INFLIGHT}
    with raw(db_path) as conn:
        assert conn.execute("SELECT path FROM deliveries").fetchone()[0] == b"/q/caf\xe9.dcm"


def test_utf8_and_latin1_spellings_of_a_name_are_two_files(db_path: Path) -> None:
    utf8, latin1 = "/in/café.dcm", LATIN1
    with Outbox(db_path) as ob:
        assert ob.enqueue_many([rec(1, path=utf8), rec(1, path=latin1)], ["a"], T0) == 2
        assert sorted(d.path for d in ob.list()) == sorted([utf8, latin1])


def _version_2_db(db_path: Path, rows: int) -> None:
    """A database as release 2 wrote it (path as TEXT), with `rows` rows, the last one pruned."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with raw(db_path) as conn:
        for _version, statements in outbox_module.MIGRATIONS[:2]:
            for statement in statements:
                conn.execute(statement)
        for i in range(1, rows + 1):
            r = rec(i)
            conn.execute(
                "INSERT INTO deliveries (path, size, mtime_ns, sop_class_uid, sop_instance_uid,"
                " transfer_syntax, study_uid, destination, next_attempt_at, created_at,"
                " updated_at, dataset_offset, state, attempts, done_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'a', ?, ?, ?, 300, 2, 1, ?)",
                (str(r.path), r.size, r.mtime_ns, r.sop_class_uid, r.sop_instance_uid,
                 r.transfer_syntax, r.study_uid, T0, T0, T0, T0),
            )  # fmt: skip
        conn.execute("DELETE FROM deliveries WHERE id = ?", (rows,))


def test_migrating_version_2_keeps_rows_paths_and_never_reuses_an_id(db_path: Path) -> None:
    _version_2_db(db_path, 3)
    with Outbox(db_path) as ob:
        old = ob.list()
        assert [(d.id, d.path, d.state, d.dataset_offset) for d in old] == [
            (1, str(rec(1).path), State.SENT, 300),
            (2, str(rec(2).path), State.SENT, 300),
        ]
        assert ob.known_files([(str(rec(1).path), rec(1).size, rec(1).mtime_ns)])
        assert ob.enqueue(rec(1), ["a"], T0) == 0  # still known after the migration
        ob.enqueue(rec(9, path=LATIN1), ["a"], T0)
        (new,) = ob.list(path=LATIN1)
        assert new.id > 3  # 3 was used, then pruned: never given out again
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 8
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        assert "deliveries_v3" not in names and "deliveries_v7" not in names
        assert "acklog" in names  # version 8: the receiver's ack log marks
        # every index survives the rebuilds of versions 3 and 7
        assert {
            "deliveries_claim",
            "deliveries_file",
            "deliveries_sop",
            "deliveries_study",
            "deliveries_done",
            "deliveries_backlog",
            "deliveries_delivered",
            "deliveries_sent_uid",
            "deliveries_commit",
            "commitments",
            "commitments_due",
        } <= names


# ------------------------------------------------------------- transient vs refused


def test_refusals_are_counted_apart_from_transient_failures(db_path: Path) -> None:
    with Outbox(db_path) as ob:
        ob.enqueue(rec(1), ["a"], T0)
        for n, (status, refusal) in enumerate([(0xA700, False), (None, False), (0xC000, True)]):
            (d,) = ob.claim("a", 1, T0 + n, 60)
            ob.mark_many([Mark(d.id, State.PENDING, status, "x", T0 + n, refusal=refusal)], T0)
        (d,) = ob.claim("a", 1, T0 + 9, 60)
        assert (d.attempts, d.refusals, d.transient_failures) == (3, 1, 2)
        ob.mark_quarantined(d.id, 0xC000, "rejected", T0 + 9, refusal=True)
        (q,) = ob.list()
        assert (q.state, q.attempts, q.refusals, q.transient_failures) == (
            State.QUARANTINED,
            4,
            2,
            2,
        )
        assert ob.requeue([q.id], T0 + 10) == 1
        (back,) = ob.list()
        assert (back.attempts, back.refusals) == (0, 0)


def test_an_uncounted_retry_counts_no_refusal_either(db_path: Path) -> None:
    with Outbox(db_path) as ob:
        ob.enqueue(rec(1), ["a"], T0)
        (d,) = ob.claim("a", 1, T0, 60)
        ob.mark_many(
            [Mark(d.id, State.PENDING, 0x0124, "held", T0, count_attempt=False, refusal=True)], T0
        )
        (d,) = ob.list()
        assert (d.attempts, d.refusals) == (0, 0)


# ------------------------------------------------------------------- full disk, damage


def test_a_full_database_raises_outbox_full_and_works_again_with_room(db_path: Path) -> None:
    with Outbox(db_path) as ob:
        ob.enqueue(rec(1), ["a"], T0)
        conn = ob._connection()
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "disk is full"
        big = [rec(i, sop_instance_uid="1." * 30 + str(i)) for i in range(2, 3000)]
        with pytest.raises(OutboxFullError, match="full"):
            ob.enqueue_many(big, ["a", "b"], T0)
        assert len(ob.list()) == 1  # nothing of the failed batch
        conn.execute("PRAGMA max_page_count = 1073741823")
        assert ob.enqueue_many(big, ["a"], T0) == len(big)


def _corrupt(db_path: Path) -> None:
    """Overwrite the pages in the middle of the file with garbage (as a bad disk would)."""
    size = db_path.stat().st_size
    page = 4096
    with open(db_path, "r+b") as fp:
        for offset in range(2 * page, size - page, page):
            fp.seek(offset + 100)
            fp.write(b"\xde\xad\xbe\xef" * 200)


def _filled(db_path: Path, n: int = 3000) -> None:
    with Outbox(db_path) as ob:
        ob.enqueue_many([rec(i) for i in range(n)], ["a", "b"], T0)
    with raw(db_path) as conn:  # everything in the main file, nothing left in the WAL
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def test_integrity_check_finds_damaged_pages(db_path: Path) -> None:
    _filled(db_path)
    with Outbox(db_path, readonly=True) as ob:
        assert ob.integrity_check() == []
        assert ob.integrity_check(quick=True) == []
    _corrupt(db_path)
    with Outbox(db_path, readonly=True) as ob:
        assert ob.integrity_check(quick=True)
        assert ob.integrity_check()


def test_reading_a_damaged_page_raises_outbox_corrupt(db_path: Path) -> None:
    _filled(db_path)
    _corrupt(db_path)
    with Outbox(db_path, readonly=True) as ob, pytest.raises(OutboxCorruptError, match="damaged"):
        ob.counts()


_OPEN = """
import sys
from forwarder.outbox import Outbox
with Outbox(sys.argv[1]) as ob:
    print("ready", flush=True)
"""


def test_processes_opening_one_outbox_at_once_both_open_it(tmp_path: Path) -> None:
    # An operator command opening the outbox while the daemon (re)opens it: SQLite's first
    # look at the WAL index answers "locked" for a moment, which is waited out, not fatal.
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo)}
    for i in range(16):
        path = tmp_path / f"outbox{i}.sqlite3"
        Outbox(path).close()
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _OPEN, str(path)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for _ in range(2)
        ]
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert (p.returncode, out.strip()) == (0, "ready"), err
