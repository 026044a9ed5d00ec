"""Tests for forwarder.sidecar: the quarantine sidecar's constructors, JSON and versions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from forwarder.dicomfile import DicomInfo
from forwarder.outbox import Delivery, State
from forwarder.sidecar import SIDECAR_VERSION, DestinationRecord, Sidecar, SidecarError

NOW = 1_795_000_000.0  # 2026-11-18T11:06:40Z; whole seconds survive the ISO round trip


def row(destination: str, state: State, **kw: Any) -> Delivery:
    file = DicomInfo(
        path=Path("/in/a.dcm"),
        size=100,
        mtime_ns=1,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid="1.2.3",
        transfer_syntax="1.2.840.10008.1.2.1",
        study_uid="1.2",
        dataset_offset=0,
    )
    values: dict[str, Any] = {
        "id": 7,
        "file": file,
        "destination": destination,
        "state": state,
        "attempts": 1,
        "next_attempt_at": NOW,
        "first_attempt_at": NOW - 60,
        "last_attempt_at": NOW - 1,
        "last_status": 0x0000,
        "last_error": None,
        "created_at": NOW - 120,
        "done_at": NOW - 1,
    }
    return Delivery(**(values | kw))


ROWS = [
    row("pacs", State.SENT, id=1),
    row("archive", State.QUARANTINED, id=2, attempts=4, refusals=3, last_status=0xA900,
        last_error="0xA900 data set does not match SOP class"),
    row("backup", State.QUARANTINED, id=3, attempts=2, refusals=2, last_status=None,
        last_error="0xC000 cannot understand", first_attempt_at=None),
]  # fmt: skip

# What daemon.py wrote for ROWS as a dict literal (sidecar version 1), key for key.
V1_REFUSED = {
    "reason": (
        "archive: 0xA900 data set does not match SOP class; backup: 0xC000 cannot understand"
    ),
    "sop_instance_uid": "1.2.3",
    "study_uid": "1.2",
    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
    "quarantined_at": "2026-11-18T11:06:40Z",
    "destinations": {
        "archive": {
            "state": "quarantined",
            "status": "0xA900",
            "meaning": "0xA900 data set does not match SOP class",
            "attempts": 4,
            "refusals": 3,
            "transient_failures": 1,
            "first_attempt": "2026-11-18T11:05:40Z",
            "last_attempt": "2026-11-18T11:06:39Z",
            "delivery_id": 2,
        },
        "backup": {
            "state": "quarantined",
            "status": None,
            "meaning": "0xC000 cannot understand",
            "attempts": 2,
            "refusals": 2,
            "transient_failures": 0,
            "first_attempt": None,
            "last_attempt": "2026-11-18T11:06:39Z",
            "delivery_id": 3,
        },
    },
    "delivered_to": ["pacs"],
    "original_path": "/in/a.dcm",
    "quarantined_path": "/q/a.dcm",
}


def test_refused_holds_what_the_daemon_wrote_plus_the_version() -> None:
    side = Sidecar.refused(ROWS, NOW).placed(Path("/in/a.dcm"), Path("/q/a.dcm"))
    assert side.to_json() == {**V1_REFUSED, "version": SIDECAR_VERSION}
    assert side.version == 2 and side.delivered_to == ("pacs",)
    assert set(side.destinations) == {"archive", "backup"}  # never the one that has it


def test_invalid_has_a_reason_and_no_destinations() -> None:
    side = Sidecar.invalid("not DICOM: no preamble", NOW)
    data = side.to_json()
    assert data["reason"] == "not DICOM: no preamble" and data["destinations"] == {}
    assert data["version"] == 2 and data["quarantined_at"] == "2026-11-18T11:06:40Z"
    assert data["sop_instance_uid"] is None and data["delivered_to"] == []


def test_write_then_read_gives_the_same_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "a.dcm.json"
    side = Sidecar.refused(ROWS, NOW).placed(Path("/in/a.dcm"), Path("/q/a.dcm"))
    side.write(path)
    assert json.loads(path.read_text())["version"] == 2
    assert Sidecar.read(path) == side
    assert [p.name for p in tmp_path.iterdir()] == ["a.dcm.json"]  # no temporary left


def test_a_version_1_sidecar_is_read(tmp_path: Path) -> None:
    path = tmp_path / "a.dcm.json"
    path.write_text(json.dumps(V1_REFUSED))
    side = Sidecar.read(path)
    assert side.version == 1
    assert side.reason == V1_REFUSED["reason"] and side.delivered_to == ("pacs",)
    archive = side.destinations["archive"]
    assert archive == DestinationRecord.of(ROWS[1])
    assert archive.status == 0xA900 and archive.state is State.QUARANTINED
    assert side.quarantined_at == NOW and side.original_path == "/in/a.dcm"
    # the written form of a version 1 sidecar read back is today's, apart from its version
    assert side.to_json() == {**V1_REFUSED, "version": 1}


def test_a_minimal_version_1_sidecar_is_read(tmp_path: Path) -> None:
    """The invalid-file sidecar of version 1, and one written by hand: keys may be missing."""
    path = tmp_path / "x.json"
    path.write_text('{"reason": "r", "quarantined_at": "2026-11-18T11:06:40Z", "destinations": {}}')
    side = Sidecar.read(path)
    assert (side.version, side.reason, side.quarantined_at) == (1, "r", NOW)
    assert side.destinations == {} and side.original_path is None
    path.write_text('{"original_path": "/in/b.dcm"}')
    assert Sidecar.read(path).original_path == "/in/b.dcm"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read"),
        ("not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"version": 3}', "version 3"),
        ('{"version": 0}', "version 0"),
        ('{"version": true}', "version"),
        ('{"reason": 5}', "reason"),
        ('{"original_path": ["/x"]}', "original_path"),
        ('{"quarantined_at": "yesterday"}', "quarantined_at"),
        ('{"destinations": []}', "destinations"),
        ('{"delivered_to": [1]}', "delivered_to"),
        ('{"destinations": {"p": {"state": "lost"}}}', "destinations.p.state"),
        ('{"destinations": {"p": {"status": 43264}}}', "destinations.p.status"),
        ('{"destinations": {"p": {"attempts": "4"}}}', "destinations.p.attempts"),
    ],
)
def test_read_raises_sidecar_error(
    tmp_path: Path, content: str | bytes | None, problem: str
) -> None:
    path = tmp_path / "a.dcm.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(SidecarError, match=problem) as err:
        Sidecar.read(path)
    assert str(path) in str(err.value)
