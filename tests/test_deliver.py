"""The deliver stage driven one `Worker.loop(now)` at a time: a real outbox, a real SCP."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SCP, free_port, make_instance
from stages import Calls, destination, queue_files, worker

from forwarder.config import Destination, RetrySettings
from forwarder.deliver import Worker
from forwarder.outbox import Outbox, State

CT_UIDS = [f"1.2.826.0.1.3680043.2.1125.9.{i}" for i in range(3)]


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "outbox.sqlite3") as box:
        yield box


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / "in" / f"{i}.dcm" for i in range(len(CT_UIDS))]
    for path, uid in zip(paths, CT_UIDS, strict=True):
        make_instance(path, uid)
    return paths


def one_loop(outbox: Outbox, dest: Destination, now: float = 0.0) -> tuple[Worker, Calls]:
    """A worker of `dest` runs one iteration at `now`, then ends its association."""
    calls = Calls()
    w = worker(outbox, dest, calls, now=now)
    try:
        w.loop(now)
    finally:
        w.close()
    return w, calls


def states(outbox: Outbox) -> dict[str, State]:
    return {d.sop_instance_uid: d.state for d in outbox.list(limit=100)}


def test_one_loop_sends_the_due_files_and_lets_them_go(
    outbox: Outbox, files: list[Path], scp: SCP
) -> None:
    queue_files(outbox, files, ["pacs"])
    _w, calls = one_loop(outbox, destination(scp.port))
    assert sorted(scp.uids()) == sorted(CT_UIDS)  # what the peer actually received
    assert set(states(outbox).values()) == {State.SENT}
    assert sorted(d.sop_instance_uid for d in calls.done) == sorted(CT_UIDS)


def test_a_transient_status_is_retried_later_and_the_file_stays(
    outbox: Outbox, files: list[Path], scp: SCP
) -> None:
    queue_files(outbox, files[:1], ["pacs"])
    scp.statuses = [0xA700]  # out of resources
    _w, calls = one_loop(outbox, destination(scp.port))
    (row,) = outbox.list(limit=10)
    assert row.state is State.PENDING and row.last_status == 0xA700
    assert row.next_attempt_at is not None and row.next_attempt_at > 0.0
    assert calls.done == [] and scp.uids() == []


def test_a_refused_instance_is_quarantined_and_let_go(
    outbox: Outbox, files: list[Path], scp: SCP
) -> None:
    queue_files(outbox, files[:1], ["pacs"])
    scp.statuses = [0xA900]  # data set does not match SOP class: the peer refuses it
    _w, calls = one_loop(outbox, destination(scp.port))
    (row,) = outbox.list(limit=10)
    assert row.state is State.QUARANTINED and row.last_status == 0xA900
    assert [d.id for d in calls.done] == [row.id]


def test_a_peer_that_is_down_pauses_the_destination_and_keeps_the_files(
    outbox: Outbox, files: list[Path]
) -> None:
    queue_files(outbox, files, ["pacs"])
    w, calls = one_loop(outbox, destination(free_port()), now=100.0)
    assert set(states(outbox).values()) == {State.PENDING}  # given back, no attempt burnt
    assert all(d.attempts == 0 for d in outbox.list(limit=10))
    info = outbox.destination_info()["pacs"]
    assert info.paused(100.0) and info.consecutive_failures == 1
    assert w.crew.breaker.remaining(100.0) > 0  # the breaker and the outbox agree
    assert calls.done == []


def test_a_file_changed_after_it_was_queued_is_not_sent(
    outbox: Outbox, files: list[Path], scp: SCP
) -> None:
    queue_files(outbox, files[:1], ["pacs"])
    st = files[0].stat()
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    _w, calls = one_loop(outbox, destination(scp.port))
    (row,) = outbox.list(limit=10)
    assert row.state is State.GONE and "changed" in (row.last_error or "")
    assert scp.uids() == [] and calls.done == []  # the new version has rows of its own


def test_a_file_deleted_after_it_was_queued_is_gone_and_let_go(
    outbox: Outbox, files: list[Path], scp: SCP
) -> None:
    queue_files(outbox, files[:1], ["pacs"])
    files[0].unlink()
    _w, calls = one_loop(outbox, destination(scp.port))
    (row,) = outbox.list(limit=10)
    assert row.state is State.GONE and len(calls.done) == 1
    assert scp.uids() == []


def test_nothing_due_claims_nothing(outbox: Outbox, files: list[Path], scp: SCP) -> None:
    queue_files(outbox, files[:1], ["pacs"])
    calls = Calls()
    w = worker(outbox, destination(scp.port, name="other"), calls)
    w.wake.set()  # the idle wait after an empty claim returns at once
    try:
        w.loop(0.0)
    finally:
        w.close()
    assert states(outbox) == {CT_UIDS[0]: State.PENDING} and scp.uids() == []


def test_the_destination_is_back_before_the_store_that_shows_it_is_logged(
    outbox: Outbox, files: list[Path], scp: SCP, caplog: pytest.LogCaptureFixture
) -> None:
    # As in 1642feb: "destination pacs is back" is logged, then the "sent:" line of the store
    # that ended the pause (an operator reading the log sees the cause before the effect).
    queue_files(outbox, files[:1], ["pacs"])
    calls = Calls()
    w = worker(outbox, destination(scp.port), calls, now=1e6)
    w.crew.breaker.trip("cannot connect", RetrySettings(), hold=False, now=0.0)
    caplog.set_level(logging.INFO, logger="forwarder")
    try:
        w.loop(1e6)
    finally:
        w.close()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("forwarder")]
    back = next(i for i, m in enumerate(lines) if m == "destination pacs is back")
    sent = next(i for i, m in enumerate(lines) if m.startswith("sent: "))
    assert back < sent, lines


def test_an_idle_worker_opens_no_association(outbox: Outbox, files: list[Path], scp: SCP) -> None:
    # Once the destination's contexts are known, a worker opens its association before it
    # claims; with nothing due it must not: an idle daemon would knock on the PACS every 30 s.
    queue_files(outbox, files[:1], ["pacs"])
    calls = Calls()
    w = worker(outbox, destination(scp.port), calls)
    try:
        w.loop(0.0)  # sends the file; the crew now knows its contexts
        w.close()
        assert scp.associations == 1 and w.crew.contexts
        w.wake.set()  # the idle wait returns at once
        w.loop(1.0)
    finally:
        w.close()
    assert scp.associations == 1
