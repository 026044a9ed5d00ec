"""Tests for forwarder.retention: `Retention.loop(now)` against real outbox files, a fake clock."""

from __future__ import annotations

import io
import logging
import math
import os
import sqlite3
import time
from contextlib import closing, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from test_outbox import LEASE, T0, db_path, outbox, raw, rec  # and its outbox fixtures

from forwarder.cli import main as cli_main
from forwarder.config import ConfigError, load_settings
from forwarder.outbox import MIGRATIONS, SCHEMA_VERSION, Mark, Outbox, State
from forwarder.outbox import db as outbox_db
from forwarder.retention import (
    BUSY_SECONDS,
    IDLE_SECONDS,
    MIN_FREE_PAGES,
    SWEEP_SECONDS,
    Retention,
    still_in,
)

__all__ = ["db_path", "outbox"]  # fixtures, imported for pytest

DAY = 86400.0


def finish(ob: Outbox, destination: str, state: State, now: float, limit: int = 1000) -> None:
    """Take up to `limit` due rows of `destination` to `state` at `now`, in one transaction."""
    status = {State.SENT: 0, State.QUARANTINED: 0xA900, State.GONE: None}[state]
    marks = [Mark(d.id, state, status, "why") for d in ob.claim(destination, limit, now, LEASE)]
    ob.mark_many(marks, now)


def drain(retention: Retention, now: float, calls: int = 10_000) -> list[float]:
    """Call `loop(now)` until it is caught up; return the delays it asked for."""
    delays = []
    for _ in range(calls):
        delays.append(retention.loop(now))
        if delays[-1] != BUSY_SECONDS:
            return delays
    raise AssertionError(f"not caught up after {calls} calls")


def states(ob: Outbox) -> dict[str, State]:
    """sop_instance_uid/destination -> state of every row."""
    return {f"{d.sop_instance_uid}/{d.destination}": d.state for d in ob.list(limit=10**6)}


def file_size(db_path: Path) -> int:
    """The database file's size once its WAL is written back into it."""
    with closing(sqlite3.connect(db_path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db_path.stat().st_size


def test_old_delivered_rows_go_waiting_and_quarantined_rows_stay(outbox: Outbox) -> None:
    outbox.enqueue_many([rec(i) for i in range(1, 7)], ["a"], T0)
    finish(outbox, "a", State.SENT, T0, limit=2)  # 1, 2: sent long ago
    finish(outbox, "a", State.GONE, T0, limit=1)  # 3: vanished long ago
    finish(outbox, "a", State.QUARANTINED, T0, limit=1)  # 4: refused long ago
    outbox.claim("a", 1, T0, LEASE)  # 5: in flight (its lease long expired), 6: pending
    outbox.enqueue(rec(7), ["a"], T0 + 9 * DAY)
    finish(outbox, "a", State.SENT, T0 + 9 * DAY)  # 7 (and 6): sent yesterday
    retention = Retention(outbox, keep_seconds=7 * DAY)
    assert drain(retention, T0 + 10 * DAY)[-1] == IDLE_SECONDS
    assert states(outbox) == {
        "1.2.3.4/a": State.QUARANTINED,
        "1.2.3.5/a": State.INFLIGHT,
        "1.2.3.6/a": State.SENT,
        "1.2.3.7/a": State.SENT,
    }
    assert outbox.retention_horizon() == T0 + 3 * DAY
    # much later, the young ones go too; waiting and quarantined rows never do
    drain(retention, T0 + 100 * DAY)
    assert states(outbox) == {"1.2.3.4/a": State.QUARANTINED, "1.2.3.5/a": State.INFLIGHT}


def test_a_delivered_row_stays_while_its_file_has_another_destination_waiting(
    outbox: Outbox,
) -> None:
    outbox.enqueue(rec(1), ["a", "b"], T0)
    finish(outbox, "a", State.SENT, T0)
    drain(Retention(outbox, DAY), T0 + 10 * DAY)
    assert states(outbox) == {"1.2.3.1/a": State.SENT, "1.2.3.1/b": State.PENDING}


def test_batches_are_bounded_and_one_line_is_logged_per_pass(
    outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    outbox.enqueue_many([rec(i) for i in range(35)], ["a"], T0)
    finish(outbox, "a", State.SENT, T0)
    retention = Retention(outbox, DAY, batch=10)
    left = []
    with caplog.at_level(logging.INFO, logger="forwarder.retention"):
        for _ in range(3):
            assert retention.loop(T0 + 2 * DAY) == BUSY_SECONDS  # more to prune
            left.append(len(outbox.list(limit=100)))
        assert retention.loop(T0 + 2 * DAY) == IDLE_SECONDS  # fewer than a batch: caught up
    assert left == [25, 15, 5]  # at most one batch per call
    assert outbox.list() == []
    lines = [r.getMessage() for r in caplog.records if r.name == "forwarder.retention"]
    assert len(lines) == 1, lines
    assert "pruned 35 delivered row(s) finished before 1970-01-13T13:46:40Z" in lines[0]
    # caught up: a later pass that deletes nothing says nothing
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="forwarder.retention"):
        drain(retention, T0 + 3 * DAY)
    assert not [r for r in caplog.records if r.name == "forwarder.retention"]


def test_spared_files_keep_their_rows_and_do_not_hold_back_the_others(
    outbox: Outbox, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    kept = [inbox / f"{i}.dcm" for i in range(3)]  # delivered first, still in the inbox
    for path in kept:
        path.write_bytes(b"x")
    outbox.enqueue_many([rec(i, path=p) for i, p in enumerate(kept)], ["a"], T0)
    finish(outbox, "a", State.SENT, T0)
    # delivered later; their files left the inbox, or never were in it
    (tmp_path / "archive").mkdir()
    (tmp_path / "archive" / "9.dcm").write_bytes(b"x")
    outbox.enqueue_many([rec(i) for i in range(10, 17)], ["a"], T0 + 1)
    outbox.enqueue(rec(9, path=tmp_path / "archive" / "9.dcm"), ["a"], T0 + 1)
    finish(outbox, "a", State.SENT, T0 + 1)
    retention = Retention(outbox, DAY, still_in([inbox]), batch=2)
    drain(retention, T0 + 2 * DAY)
    assert sorted(d.path for d in outbox.list()) == sorted(map(str, kept))
    # the file leaves the inbox: its row goes at the next sweep from the oldest row
    kept[1].unlink()
    drain(retention, T0 + 2 * DAY + IDLE_SECONDS)
    assert len(outbox.list()) == 3  # passes go on from where the last one stopped
    drain(retention, T0 + 2 * DAY + SWEEP_SECONDS + 1)
    assert sorted(d.path for d in outbox.list()) == [str(kept[0]), str(kept[2])]


def test_keep_zero_prunes_nothing(outbox: Outbox) -> None:
    outbox.enqueue(rec(1), ["a"], T0)
    finish(outbox, "a", State.SENT, T0)
    retention = Retention(outbox, 0)
    assert not retention.enabled
    assert retention.loop(T0 + 1000 * DAY) == math.inf
    assert len(outbox.list()) == 1
    assert outbox.retention_horizon() is None


def test_the_file_shrinks_after_pruning(outbox: Outbox, db_path: Path) -> None:
    n = 20_000
    outbox.enqueue_many([rec(i) for i in range(n)], ["a"], T0)
    for i in range(0, n, 2000):
        finish(outbox, "a", State.SENT, T0 + i, limit=2000)
    full = file_size(db_path)
    assert full > n * 250
    retention = Retention(outbox, DAY)
    delays = drain(retention, T0 + 2 * DAY)
    assert len(delays) > n / 500  # one batch per call, then a vacuum step or more
    assert outbox.list() == [] and outbox.free_pages() < MIN_FREE_PAGES  # the rest: left
    assert file_size(db_path) < full / 10


def _version_4_db(db_path: Path) -> dict[str, State]:
    """A database as release 4 made it (no auto_vacuum), with rows in every state."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with raw(db_path) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        for _version, statements in MIGRATIONS[:4]:
            for statement in statements:
                conn.execute(statement)
        rows = {}
        for i in range(1, 3001):
            r, state = rec(i), State(i % 5)  # the states of version 4
            conn.execute(
                "INSERT INTO deliveries (path, size, mtime_ns, sop_class_uid, sop_instance_uid,"
                " transfer_syntax, study_uid, destination, next_attempt_at, created_at,"
                " updated_at, dataset_offset, state, attempts, lease_until, done_at, sent_as)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'a', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (os.fsencode(r.path), r.size, r.mtime_ns, r.sop_class_uid, r.sop_instance_uid,
                 r.transfer_syntax, r.study_uid, T0, T0, T0, None if i % 7 else 336,
                 int(state), 1, T0 + LEASE if state is State.INFLIGHT else None,
                 T0 + i if state in (State.SENT, State.QUARANTINED, State.GONE) else None,
                 "as is" if state is State.SENT else None),
            )  # fmt: skip
            rows[f"{r.sop_instance_uid}/a"] = state
        conn.execute("INSERT INTO destinations (name, paused_until) VALUES ('a', ?)", (T0,))
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    return rows


def free_list(db_path: Path) -> int:
    with raw(db_path) as conn:
        return int(conn.execute("PRAGMA freelist_count").fetchone()[0])


def test_migrating_version_4_keeps_every_row_and_lets_the_file_shrink(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = _version_4_db(db_path)
    with raw(db_path) as conn:
        dump = sorted(conn.execute("SELECT * FROM deliveries"))
    with caplog.at_level(logging.INFO, logger="forwarder.outbox"), Outbox(db_path) as ob:
        assert states(ob) == before
        assert ob.destination_info()["a"].paused_until == T0
        offsets = {d.id: d.dataset_offset for d in ob.list(limit=10_000)}
        assert offsets[7] == 336 and offsets[8] is None  # rows queued without an offset
    assert any("VACUUM" in r.getMessage() for r in caplog.records), caplog.text
    migrated = [r.getMessage() for r in caplog.records if "schema version" in r.getMessage()]
    assert migrated == [
        f"outbox {db_path} migrated from schema version 4 to {SCHEMA_VERSION}"
    ]  # one line
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        # every row as it was; the columns of later versions added empty
        rows = sorted(conn.execute("SELECT * FROM deliveries"))
        assert [row[: len(dump[0])] for row in rows] == dump
        # sent_uid (version 6), commit_uid (version 7)
        assert {row[len(dump[0]) :] for row in rows} == {(None, None)}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="forwarder.outbox"), Outbox(db_path):
        pass  # converted once: no VACUUM at the next start
    assert not any("VACUUM" in r.getMessage() for r in caplog.records), caplog.text


def test_a_large_version_4_outbox_is_rewritten_later_and_reuses_its_pages_meanwhile(
    db_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    _version_4_db(db_path)
    monkeypatch.setattr(outbox_db, "VACUUM_AT_OPEN_MAX_BYTES", 100_000)  # under its live data
    with caplog.at_level(logging.INFO, logger="forwarder.outbox"), Outbox(db_path) as ob:
        with raw(db_path) as conn:
            assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0  # not rewritten
        drain(Retention(ob, DAY), T0 + 10 * DAY)  # 1200 of the 3000 rows were delivered
        assert len(ob.list(limit=10_000)) == 1800 and ob.free_pages() == 0
        size, free = file_size(db_path), free_list(db_path)
        assert free > 0
        ob.enqueue_many([rec(i) for i in range(10_000, 10_100)], ["a"], T0 + 10 * DAY)
        assert free_list(db_path) < free  # the new rows went into freed pages
    assert "not rewritten yet (VACUUM)" in caplog.text
    monkeypatch.undo()  # pruning brought its live data under the limit: the next start does it
    with Outbox(db_path) as ob:
        assert ob.free_pages() == 0
    assert file_size(db_path) < size


def test_a_new_outbox_shrinks_without_a_vacuum(db_path: Path) -> None:
    Outbox(db_path).close()
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2


# ------------------------------------------------------------------------------- find


def find(config: Path, uid: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        status = cli_main(["find", uid, "--config", str(config)])
    return status, out.getvalue()


@pytest.mark.parametrize("keep_days", [30, 0.001, 0])
def test_find_says_when_a_uid_is_past_retention(tmp_path: Path, keep_days: float) -> None:
    db_path = tmp_path / "outbox.sqlite3"
    config = tmp_path / "forwarder.toml"
    config.write_text(
        f'[outbox]\npath = "{db_path}"\nkeep_sent_days = {keep_days}\n'
        '[[destinations]]\nname = "a"\nhost = "127.0.0.1"\nport = 104\ncalled_aet = "PACS"\n'
    )
    with Outbox(db_path) as ob:
        ob.enqueue_many([rec(1), rec(2)], ["a"], T0)
        finish(ob, "a", State.SENT, T0)
    kept = f"delivered rows are kept {keep_days:g} days, outbox.keep_sent_days"
    if keep_days:
        assert find(config, "1.2.3.9") == (
            1,
            f"1.2.3.9: not in the outbox: never queued ({kept}; none pruned yet)\n",
        )
    with Outbox(db_path) as ob:
        drain(Retention(ob, keep_days * DAY), T0 + 40 * DAY)
    status, out = find(config, "1.2.3.1")
    if not keep_days:  # kept forever: found, and an unknown UID is told as before
        assert status == 0 and out.startswith("1.2.3.1: SOP Instance\n")
        assert find(config, "1.2.3.9") == (
            1,
            "1.2.3.9: not in the outbox (never queued, or pruned long after delivery)\n",
        )
        return
    horizon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0 + 40 * DAY - keep_days * DAY))
    assert (status, out) == (
        1,
        f"1.2.3.1: not in the outbox: never queued, or delivered before {horizon} and past "
        f"retention ({kept})\n",
    )


# ------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("-1", "outbox.keep_sent_days: Input should be greater than or equal to 0 (got -1)"),
        ('"soon"', "outbox.keep_sent_days: Input should be a valid number"),
        ("inf", "outbox.keep_sent_days: Input should be a finite number"),
    ],
)
def test_keep_sent_days_must_be_a_number_of_days(tmp_path: Path, value: str, error: str) -> None:
    config = tmp_path / "forwarder.toml"
    config.write_text(f"[outbox]\nkeep_sent_days = {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    (line,) = caught.value.lines()
    assert line.startswith(f"{config}: {error}")


def test_keep_sent_days_defaults_to_30_and_0_keeps_forever(tmp_path: Path) -> None:
    config = tmp_path / "forwarder.toml"
    config.write_text("[outbox]\n")
    assert load_settings(config).outbox.keep_sent_seconds == 30 * DAY
    config.write_text("[outbox]\nkeep_sent_days = 0\n")
    assert load_settings(config).outbox.keep_sent_seconds == 0
