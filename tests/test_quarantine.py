"""Tests for forwarder.quarantine and ``forwarder quarantine``, without a daemon.

The outbox is real and written through its API as the daemon writes it; the quarantined files
and their sidecars are put in place by `filing.quarantine` (version 2) or written as the
daemon wrote them before sidecars had a version (version 1).
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from forwarder import filing
from forwarder.cli import main as cli_main
from forwarder.config import load_settings
from forwarder.dicomfile import DicomInfo
from forwarder.logs import iso
from forwarder.outbox import Outbox, State
from forwarder.policy import IDLE_SECONDS
from forwarder.quarantine import QuarantinedFile, entries, files
from forwarder.sidecar import Sidecar

NOW = 1_795_000_000.0
UID = "1.2.826.0.1.3680043.8.498.1"
STUDY = "1.2.826.0.1.3680043.8.498.2"


@dataclass
class Place:
    root: Path
    inbox: Path
    quarantine: Path
    outbox: Path
    config: Path

    def cli(self, *argv: str) -> tuple[int, str, str]:
        """``forwarder quarantine ARGV --config ...`` in this process."""
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            try:
                status = cli_main(["quarantine", *argv, "--config", str(self.config)])
            except SystemExit as exc:
                status = int(exc.code or 0)
        return status, out.getvalue(), err.getvalue()

    def rows(self) -> dict[str, tuple[State, str]]:
        with Outbox(self.outbox, readonly=True) as ob:
            return {d.destination: (d.state, d.path) for d in ob.list(limit=100)}


@pytest.fixture
def place(tmp_path: Path) -> Place:
    p = Place(
        tmp_path, tmp_path / "in", tmp_path / "q", tmp_path / "outbox.sqlite3", tmp_path / "f.toml"
    )
    p.inbox.mkdir()
    p.quarantine.mkdir()
    p.config.write_text(
        f'[watch]\npaths = ["{p.inbox}"]\n[outbox]\npath = "{p.outbox}"\n'
        f'[quarantine]\ndir = "{p.quarantine}"\n',
        encoding="utf-8",
    )
    Outbox(p.outbox).close()
    return p


def refused_in_outbox(place: Place, name: str) -> Path:
    """A file in the inbox that pacs stored and archive refused for good (0xA900), as the
    daemon records it; returns the file."""
    path = place.inbox / "sub" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"DICM" * 32)
    st = path.stat()
    rec = DicomInfo(
        path=path,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=UID,
        transfer_syntax="1.2.840.10008.1.2.1",
        study_uid=STUDY,
        dataset_offset=0,
    )
    with Outbox(place.outbox) as ob:
        ob.enqueue(rec, ["pacs", "archive"], NOW)
        (pacs,) = ob.claim("pacs", 1, NOW, 60)
        (archive,) = ob.claim("archive", 1, NOW, 60)
        ob.mark_sent(pacs.id, 0x0000, NOW)
        error = "0xA900 data set does not match SOP class"
        ob.mark_quarantined(archive.id, 0xA900, error, NOW, refusal=True)
    return path


def quarantine_v1(place: Place, path: Path) -> Path:
    """Move `path` into quarantine with the sidecar the daemon wrote before version 2."""
    with Outbox(place.outbox) as ob:
        rows = ob.list(path=str(path), limit=100)
        target = place.quarantine / path.relative_to(place.inbox)
        target.parent.mkdir(parents=True, exist_ok=True)
        v1: dict[str, Any] = {
            "reason": "; ".join(
                f"{r.destination}: {r.last_error}" for r in rows if r.state is State.QUARANTINED
            ),
            "sop_instance_uid": rows[0].sop_instance_uid,
            "study_uid": rows[0].study_uid,
            "sop_class_uid": rows[0].sop_class_uid,
            "quarantined_at": iso(NOW),
            "destinations": {
                r.destination: {
                    "state": r.state.name.lower(),
                    "status": None if r.last_status is None else f"0x{r.last_status:04X}",
                    "meaning": r.last_error,
                    "attempts": r.attempts,
                    "refusals": r.refusals,
                    "transient_failures": r.transient_failures,
                    "first_attempt": iso(r.first_attempt_at),
                    "last_attempt": iso(r.last_attempt_at),
                    "delivery_id": r.id,
                }
                for r in rows
                if r.state is not State.SENT
            },
            "delivered_to": sorted(r.destination for r in rows if r.state is State.SENT),
            "original_path": str(path),
            "quarantined_path": str(target),
        }
        Path(f"{target}.json").write_text(json.dumps(v1, indent=2, sort_keys=True))
        path.rename(target)
        ob.set_path(str(path), str(target), now=NOW)
    return target


def test_a_version_1_sidecar_is_listed_shown_and_requeued(place: Place) -> None:
    target = quarantine_v1(place, refused_in_outbox(place, "a.dcm"))
    notes = place.quarantine / "notes.txt"
    notes.write_text("not DICOM")
    v1_invalid = {"reason": "not DICOM: no preamble", "quarantined_at": iso(NOW)}
    Path(f"{notes}.json").write_text(json.dumps({**v1_invalid, "destinations": {}}))

    status, out, err = place.cli("list", "--json")
    assert status == 0, err
    listed = {(e["path"], e["destination"]): e for e in json.loads(out)["entries"]}
    assert set(listed) == {(str(target), "archive"), (str(notes), None)}
    assert listed[(str(target), "archive")]["status"] == "0xA900"
    never = listed[(str(notes), None)]
    assert never["reason"] == "not DICOM: no preamble"
    assert never["quarantined_at"] == iso(NOW)

    status, out, err = place.cli("show", "sub/a.dcm")
    assert status == 0, err
    assert f"original:     {place.inbox / 'sub' / 'a.dcm'}" in out
    assert "archive: 0xA900 data set does not match SOP class" in out
    status, out, err = place.cli("show", "sub/a.dcm", "--json")
    shown = json.loads(out)["sidecar"]
    assert shown["version"] == 1 and shown["delivered_to"] == ["pacs"]
    assert shown["destinations"]["archive"]["status"] == "0xA900"

    status, out, err = place.cli("requeue", "sub/a.dcm")
    assert status == 0, err
    back = place.inbox / "sub" / "a.dcm"
    assert f"-> {back} for archive" in out
    assert f"the daemon sends them within about {IDLE_SECONDS:g} s" in out
    assert back.is_file() and not target.exists() and not Path(f"{target}.json").exists()
    assert place.rows() == {"pacs": (State.SENT, str(back)), "archive": (State.PENDING, str(back))}

    status, out, err = place.cli("requeue", "notes.txt")
    assert status == 0, err
    assert (place.inbox / "notes.txt").is_file()  # examined afresh by the daemon
    assert "for a fresh look by the daemon" in out


def test_the_daemon_s_version_2_sidecar_is_what_the_commands_read(place: Place) -> None:
    path = refused_in_outbox(place, "b.dcm")
    with Outbox(place.outbox) as ob:
        rows = ob.list(path=str(path), limit=100)
        target = filing.quarantine(
            path, [place.inbox], place.quarantine, Sidecar.refused(rows, NOW)
        )
        ob.set_path(str(path), str(target), now=NOW)
    written = json.loads(Path(f"{target}.json").read_text())
    assert written["version"] == 2 and written["original_path"] == str(path)
    settings = load_settings(place.config)
    (f,) = files(settings)
    assert f == QuarantinedFile.at(target)
    assert f.sidecar is not None and f.sidecar.destinations["archive"].refusals == 1
    assert (
        f.quarantined_at == NOW and f.reason == "archive: 0xA900 data set does not match SOP class"
    )
    with Outbox(place.outbox, readonly=True) as ob:
        (entry,) = entries(settings, ob)
    assert (entry.destination, entry.status, entry.sop_instance_uid) == ("archive", 0xA900, UID)


def test_a_bad_sidecar_counts_as_none(place: Place) -> None:
    lost = place.quarantine / "lost.dcm"
    lost.write_bytes(b"x")
    Path(f"{lost}.json").write_text('{"version": 99, "reason": "from the future"}')
    orphan = place.quarantine / "gone.dcm.json"  # its file was deleted by hand
    Sidecar.invalid("x", NOW).placed(place.inbox / "gone.dcm", place.quarantine / "gone.dcm").write(
        orphan
    )
    (f,) = files(load_settings(place.config))
    assert f.path == lost and f.sidecar is None and f.reason is None
    status, out, err = place.cli("list")
    assert status == 0, err
    assert "lost.dcm" in out and "no sidecar" in out and "gone.dcm" not in out
