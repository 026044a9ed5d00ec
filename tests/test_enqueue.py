"""The enqueue stage driven one `Enqueuer.loop(now)` at a time against a real outbox."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import data_file, make_instance
from pydicom import dcmread
from stages import Calls, disposer, finish

from forwarder.dicomfile import DICOMDIR_SOP_CLASS
from forwarder.enqueue import Enqueuer, Intake
from forwarder.inodes import InodeIndex
from forwarder.outbox import Outbox, State
from forwarder.routing import Router
from forwarder.trouble import OutboxTrouble
from forwarder.watcher import ReadyFile

UID = "1.2.826.0.1.3680043.2.1125.7.1"
GRACE = 10.0


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "outbox.sqlite3") as box:
        yield box


def enqueuer(
    outbox: Outbox,
    tmp_path: Path,
    calls: Calls,
    router: Router | None = None,
    on_success: str = "delete",
) -> Enqueuer:
    intake = Intake(
        destinations=("one", "two"),
        follow_symlinks=False,
        invalid_grace_seconds=GRACE,
        keeps_delivered=on_success == "keep",
        router=router,
    )
    inodes = InodeIndex()
    return Enqueuer(
        outbox,
        intake,
        disposer(outbox, tmp_path, calls, on_success),
        inodes,
        OutboxTrouble(),
        forget=calls.forget,
        queued=calls.on_queued,
        fatal=calls.on_fatal,
        clock=lambda: 5.0,
    )


@contextmanager
def away(path: Path) -> Iterator[None]:
    """The file is out of the inbox meanwhile, then back, unchanged (same size and mtime)."""
    kept = path.with_name(f".away-{path.name}")
    os.rename(path, kept)
    try:
        yield
    finally:
        os.rename(kept, path)


def ready(path: Path) -> ReadyFile:
    st = path.stat()
    return ReadyFile(path, st.st_size, st.st_mtime_ns, path.parent, st.st_dev, st.st_ino)


def test_a_ready_file_becomes_one_row_per_destination(tmp_path: Path, outbox: Outbox) -> None:
    path = tmp_path / "in" / "a.dcm"
    make_instance(path, UID)
    calls = Calls()
    stage = enqueuer(outbox, tmp_path, calls)
    stage.offer(ready(path))
    stage.loop(0.0)
    rows = outbox.list(limit=10)
    assert sorted(d.destination for d in rows) == ["one", "two"]
    assert {(d.sop_instance_uid, d.state, d.path) for d in rows} == {
        (UID, State.PENDING, str(path))
    }
    assert calls.queued == 1
    stage.offer(ready(path))  # offered again (a rescan): known, not queued twice
    stage.loop(1.0)
    assert len(outbox.list(limit=10)) == 2 and calls.queued == 1


def test_not_dicom_waits_out_the_grace_then_goes_to_quarantine(
    tmp_path: Path, outbox: Outbox
) -> None:
    path = tmp_path / "in" / "a.dcm"
    path.parent.mkdir()
    path.write_bytes(b"\0" * 200)
    calls = Calls()
    stage = enqueuer(outbox, tmp_path, calls)
    stage.offer(ready(path))
    stage.loop(100.0)
    stage.loop(100.0 + GRACE - 1)
    assert path.exists() and outbox.list(limit=10) == []
    stage.loop(100.0 + GRACE)
    assert not path.exists() and (tmp_path / "quarantine" / "a.dcm").exists()


def test_a_file_that_becomes_dicom_within_the_grace_is_queued(
    tmp_path: Path, outbox: Outbox
) -> None:
    path = tmp_path / "in" / "a.dcm"
    path.parent.mkdir()
    path.write_bytes(b"\0" * 200)
    stage = enqueuer(outbox, tmp_path, Calls())
    stage.offer(ready(path))
    stage.loop(100.0)
    make_instance(path, UID)
    stage.loop(101.0)
    assert [d.sop_instance_uid for d in outbox.list(limit=10)] == [UID, UID]


def test_a_dicomdir_goes_to_quarantine(tmp_path: Path, outbox: Outbox) -> None:
    path = tmp_path / "in" / "DICOMDIR"
    path.parent.mkdir()
    ds = dcmread(data_file("CT_small.dcm"))  # a DICOMDIR's SOP Class on a readable file
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DICOMDIR_SOP_CLASS
    ds.save_as(path, enforce_file_format=True)
    stage = enqueuer(outbox, tmp_path, Calls())
    stage.offer(ready(path))
    stage.loop(0.0)
    assert outbox.list(limit=10) == [] and (tmp_path / "quarantine" / "DICOMDIR").exists()


def test_a_file_delivered_before_is_disposed_of_not_sent_again(
    tmp_path: Path, outbox: Outbox
) -> None:
    path = tmp_path / "in" / "a.dcm"
    make_instance(path, UID)
    stage = enqueuer(outbox, tmp_path, Calls())
    stage.offer(ready(path))
    stage.loop(0.0)
    finish(outbox, 6.0, one=State.SENT, two=State.SENT)
    stage.offer(ready(path))  # as after a crash between the commit and the delete
    stage.loop(1.0)
    assert not path.exists()
    assert {d.state for d in outbox.list(limit=10)} == {State.SENT}


def test_a_file_that_vanished_unsent_and_comes_back_the_same_is_sent_not_deleted(
    tmp_path: Path, outbox: Outbox
) -> None:
    # Queued, deleted before it was sent (its rows GONE), then dropped again with the same
    # path, size and mtime (cp -p, rsync -t): it has not reached anybody, so it is sent.
    path = tmp_path / "in" / "a.dcm"
    make_instance(path, UID)
    calls = Calls()
    stage = enqueuer(outbox, tmp_path, calls)
    stage.offer(ready(path))
    stage.loop(0.0)
    with away(path):
        finish(outbox, 6.0, one=State.SENT, two=State.GONE)  # "one" had it before it vanished
    stage.offer(ready(path))
    stage.loop(1.0)
    assert path.exists()
    states = {d.destination: d.state for d in outbox.list(limit=10)}
    assert states == {"one": State.SENT, "two": State.PENDING}
    assert calls.queued == 2


def test_a_file_back_after_it_vanished_is_sent_when_its_name_had_an_earlier_instance(
    tmp_path: Path, outbox: Outbox
) -> None:
    # Modalities reuse file names: a.dcm was one instance, delivered and deleted; a new
    # instance under the same name vanished before it was sent and came back unchanged.
    # The rows of the earlier instance at that path must not hide the GONE rows of this one.
    path = tmp_path / "in" / "a.dcm"
    make_instance(path, UID)
    calls = Calls()
    stage = enqueuer(outbox, tmp_path, calls)
    stage.offer(ready(path))
    stage.loop(0.0)
    finish(outbox, 6.0, one=State.SENT, two=State.SENT)
    path.unlink()  # delivered: disposed of
    second = UID + ".2"
    make_instance(path, second)
    os.utime(path, ns=(1_000_000_000_123, 1_000_000_000_123))  # another version for sure
    stage.offer(ready(path))
    stage.loop(1.0)
    with away(path):
        finish(outbox, 8.0, one=State.GONE, two=State.GONE)
    stage.offer(ready(path))
    stage.loop(2.0)
    assert path.exists()
    states = {(d.sop_instance_uid, d.destination): d.state for d in outbox.list(limit=10)}
    assert states == {
        (UID, "one"): State.SENT,
        (UID, "two"): State.SENT,
        (second, "one"): State.PENDING,
        (second, "two"): State.PENDING,
    }


def test_a_file_back_after_it_vanished_for_one_destination_is_not_deleted_by_another(
    tmp_path: Path, outbox: Outbox
) -> None:
    # "two" found the file gone (GONE) while "one" still waited (paused, or behind a
    # backlog); the file came back unchanged before "one" sent it. Once "one" has it the file
    # has still not reached "two": it must not be deleted as delivered.
    path = tmp_path / "in" / "a.dcm"
    make_instance(path, UID)
    calls = Calls()
    stage = enqueuer(outbox, tmp_path, calls)
    stage.offer(ready(path))
    stage.loop(0.0)
    with away(path):
        stage.disposer.done(finish(outbox, 6.0, two=State.GONE))
    stage.offer(ready(path))
    stage.loop(1.0)
    # what the worker does once the mark is committed
    stage.disposer.done(finish(outbox, 8.0, one=State.SENT))
    assert path.exists()


# -- routing -------------------------------------------------------------------------------


def _routed(path: Path, uid: str, modality: str, series: str = "AX") -> ReadyFile:
    make_instance(path, uid)
    ds = dcmread(path)
    ds.Modality = modality
    ds.SeriesDescription = series
    ds.save_as(path, enforce_file_format=True)
    st = path.stat()
    return ReadyFile(path, st.st_size, st.st_mtime_ns, path.parents[1], st.st_dev, st.st_ino)


def _router(unmatched: str = "quarantine") -> Router:
    return Router.build(
        [
            (
                "one",
                {"Modality": ["CT", "PT"], "path": "siteA/**"},
                {"SeriesDescription": "*SCOUT*"},
            ),
            ("two", {"Modality": "MR"}, {}),
        ],
        unmatched,  # type: ignore[arg-type]
    )


def test_rows_only_for_the_destinations_that_want_the_instance(
    tmp_path: Path, outbox: Outbox
) -> None:
    calls = Calls()
    stage = enqueuer(outbox, tmp_path, calls, _router())
    inbox = tmp_path / "in"
    stage.offer(_routed(inbox / "siteA" / "ct.dcm", UID + "1", "CT"))
    stage.offer(_routed(inbox / "siteA" / "mr.dcm", UID + "2", "MR"))
    stage.offer(_routed(inbox / "siteA" / "pt.dcm", UID + "3", "PT"))
    stage.loop(0.0)
    rows = {(d.sop_instance_uid, d.destination) for d in outbox.list(limit=10)}
    assert rows == {(UID + "1", "one"), (UID + "2", "two"), (UID + "3", "one")}
    assert calls.queued == 1  # one batch, one transaction


@pytest.mark.parametrize(
    ("name", "modality", "series", "why"),
    [
        ("siteA/scout.dcm", "CT", "CHEST SCOUT", "SeriesDescription 'CHEST SCOUT' is excluded"),
        ("siteB/ct.dcm", "CT", "AX", "path 'siteB/ct.dcm' does not match 'siteA/**'"),
        ("siteA/us.dcm", "US", "AX", "Modality 'US' does not match ['CT', 'PT']"),
    ],
)
def test_an_instance_no_destination_wants_is_quarantined_with_the_reason(
    tmp_path: Path, outbox: Outbox, name: str, modality: str, series: str, why: str
) -> None:
    calls = Calls()
    stage = enqueuer(outbox, tmp_path, calls, _router())
    path = tmp_path / "in" / name
    stage.offer(_routed(path, UID, modality, series))
    stage.loop(0.0)
    assert outbox.list(limit=10) == [] and calls.queued == 0
    assert not path.exists()
    target = tmp_path / "quarantine" / name
    assert target.exists()
    reason = json.loads(Path(f"{target}.json").read_text())["reason"]
    assert reason.startswith("no destination matched: one: ")
    assert why in reason
    assert f"two: Modality '{modality}' does not match 'MR'" in reason


@pytest.mark.parametrize("on_success", ["delete", "move", "keep"])
def test_unmatched_dispose_treats_it_as_a_delivered_file(
    tmp_path: Path, outbox: Outbox, on_success: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls = Calls()
    stage = enqueuer(outbox, tmp_path, calls, _router("dispose"), on_success)
    path = tmp_path / "in" / "siteA" / "us.dcm"
    stage.offer(_routed(path, UID, "US"))
    with caplog.at_level(logging.INFO, logger="forwarder.daemon"):
        stage.loop(0.0)
    assert outbox.list(limit=10) == []
    assert not (tmp_path / "quarantine").exists()
    assert path.exists() is (on_success == "keep")
    assert (tmp_path / "sent" / "siteA" / "us.dcm").exists() is (on_success == "move")
    lines = [r.getMessage() for r in caplog.records if "no destination wants it" in r.getMessage()]
    assert len(lines) == 1 and "Modality 'US'" in lines[0]
    # a kept file is not offered again by the watcher (not forgotten): logged once
    assert (path in calls.forgotten) is (on_success != "keep")


def test_a_new_router_applies_to_files_examined_after_it(tmp_path: Path, outbox: Outbox) -> None:
    calls = Calls()
    stage = enqueuer(outbox, tmp_path, calls, _router())
    stage.offer(_routed(tmp_path / "in" / "siteA" / "a.dcm", UID + "1", "MR"))
    stage.loop(0.0)
    stage.intake = replace(
        stage.intake, router=Router.build([("one", {}, {}), ("two", {"Modality": "CT"}, {})])
    )
    stage.offer(_routed(tmp_path / "in" / "siteA" / "b.dcm", UID + "2", "MR"))
    stage.loop(1.0)
    rows = {(d.sop_instance_uid, d.destination) for d in outbox.list(limit=10)}
    assert rows == {(UID + "1", "two"), (UID + "2", "one")}
