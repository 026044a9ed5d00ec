"""The dispose stage: a file leaves the inbox when the outbox says every delivery is final."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_instance
from stages import Calls, disposer, finish, queue_files

from forwarder.outbox import Outbox, State

UID = "1.2.826.0.1.3680043.2.1125.8.1"


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "outbox.sqlite3") as box:
        yield box


@pytest.fixture
def queued(tmp_path: Path, outbox: Outbox) -> Path:
    path = tmp_path / "in" / "a.dcm"
    make_instance(path, UID)
    queue_files(outbox, [path], ["one", "two"])
    return path


def test_a_file_stays_until_every_destination_is_final(
    tmp_path: Path, outbox: Outbox, queued: Path
) -> None:
    calls = Calls()
    stage = disposer(outbox, tmp_path, calls)
    finish(outbox, one=State.SENT)
    stage.done(outbox.list(limit=10))
    assert queued.exists() and calls.forgotten == []
    finish(outbox, two=State.SENT)
    stage.done(outbox.list(limit=10))
    assert not queued.exists() and calls.forgotten == [queued]


def test_move_archives_the_file_and_its_rows_follow(
    tmp_path: Path, outbox: Outbox, queued: Path
) -> None:
    stage = disposer(outbox, tmp_path, Calls(), on_success="move")
    finish(outbox, one=State.SENT, two=State.SENT)
    stage.done(outbox.list(limit=10))
    target = tmp_path / "sent" / "a.dcm"
    assert target.exists() and not queued.exists()
    assert {d.path for d in outbox.list(limit=10)} == {str(target)}


def test_a_refused_file_is_quarantined_with_a_sidecar_naming_who_refused(
    tmp_path: Path, outbox: Outbox, queued: Path
) -> None:
    stage = disposer(outbox, tmp_path, Calls())
    finish(outbox, one=State.SENT, two=State.QUARANTINED)
    stage.done(outbox.list(limit=10))
    target = tmp_path / "quarantine" / "a.dcm"
    sidecar = json.loads(Path(f"{target}.json").read_text())
    assert target.exists() and not queued.exists()
    assert list(sidecar["destinations"]) == ["two"] and sidecar["delivered_to"] == ["one"]
    assert sidecar["sop_instance_uid"] == UID and "refused" in sidecar["reason"]


def test_a_file_that_cannot_leave_is_tried_again_by_loop(
    tmp_path: Path, outbox: Outbox, queued: Path
) -> None:
    (tmp_path / "sent").write_text("a file where the archive folder should be")
    stage = disposer(outbox, tmp_path, Calls(), on_success="move")
    finish(outbox, one=State.SENT, two=State.SENT)
    stage.done(outbox.list(limit=10))
    assert queued.exists()  # kept, and logged once
    (tmp_path / "sent").unlink()
    stage.loop(0.0)  # not due yet
    assert queued.exists()
    stage.loop(float("inf"))
    assert (tmp_path / "sent" / "a.dcm").exists() and not queued.exists()


def test_an_invalid_file_is_quarantined_with_its_reason(tmp_path: Path, outbox: Outbox) -> None:
    path = tmp_path / "in" / "junk.txt"
    path.parent.mkdir()
    path.write_text("not DICOM")
    calls = Calls()
    disposer(outbox, tmp_path, calls).quarantine_invalid(path, "not DICOM: no preamble")
    sidecar = json.loads((tmp_path / "quarantine" / "junk.txt.json").read_text())
    assert sidecar["reason"] == "not DICOM: no preamble" and sidecar["destinations"] == {}
    assert calls.forgotten == [path]


def test_a_file_back_after_it_vanished_but_no_longer_dicom_is_quarantined(
    tmp_path: Path, outbox: Outbox, queued: Path
) -> None:
    st = queued.stat()
    finish(outbox, one=State.GONE, two=State.GONE)
    queued.write_bytes(b"\0" * st.st_size)  # same path, size and mtime, not DICOM
    os.utime(queued, ns=(st.st_atime_ns, st.st_mtime_ns))
    calls = Calls()
    disposer(outbox, tmp_path, calls).dispose(queued, st.st_size, st.st_mtime_ns)
    sidecar = json.loads((tmp_path / "quarantine" / "a.dcm.json").read_text())
    assert "back after it vanished unsent" in sidecar["reason"]
    assert not queued.exists() and calls.queued == 0
