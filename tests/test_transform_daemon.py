"""End to end: ``forwarder run`` with ``[destinations.transform]``: what each peer stored.

Real daemon processes, real in-process SCPs (and DCMTK storescp), real files. The engine
itself (set/remove, de-identification, compression) is tested in test_transform.py; here,
that the daemon sends each destination its own copy and records what went out.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

from conftest import SCP, wait_for
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from test_daemon import (  # the daemon fixtures and helpers
    Forwarder,
    dest,
    fwd,
    has_all,
    once,
    received,
    routed_file,
)

from forwarder.outbox import Outbox, State
from forwarder.transformpool import SPOOL_DIR

__all__ = ["fwd"]  # fixtures, imported for pytest


def stored(scp: SCP, uid: str) -> object:
    """The data set `scp` received under `uid`, decoded."""
    (got,) = [r for r in scp.received if r.sop_instance_uid == uid]
    fp = DicomBytesIO(got.encoded)
    ts = got.transfer_syntax
    fp.is_little_endian = True
    fp.is_implicit_VR = ts == "1.2.840.10008.1.2"
    return read_dataset(fp, fp.is_implicit_VR, True)


def test_set_and_remove_reach_one_destination_the_other_gets_the_file_as_is(
    fwd: Forwarder, make_scp: Callable[..., SCP]
) -> None:
    plain, regional = make_scp(), make_scp()
    fwd.configure(
        [
            dest("plain", plain.port),
            dest(
                "regional",
                regional.port,
                transform={
                    "set": {"PatientID": "SITE1-{PatientID}", "InstitutionName": "Gateway A"},
                    "remove": ["SeriesDescription"],
                },
            ),
        ],
        transform={"workers": 2},
    ).start()
    uids = [routed_file(fwd.inbox / f"ct{i}.dcm", "CT", "AX 5mm") for i in range(5)]
    fwd.wait(has_all(plain, uids), what="the files at plain")
    fwd.wait(has_all(regional, uids), what="the copies at regional")
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0
    assert received(plain) == received(regional) == once(uids)
    for uid in uids:
        mine, theirs = stored(plain, uid), stored(regional, uid)
        assert mine.PatientID == "FWD-ROUTE" and mine.SeriesDescription == "AX 5mm"
        assert theirs.PatientID == "SITE1-FWD-ROUTE"
        assert theirs.InstitutionName == "Gateway A"
        assert "SeriesDescription" not in theirs
    rows = {(d.destination, d.sent_as) for d in fwd.deliveries()}
    assert rows == {("plain", "as is"), ("regional", "transformed to Explicit VR Little Endian")}
    spool = fwd.outbox_path.parent / SPOOL_DIR
    assert not any(spool.iterdir())  # every copy removed once sent


def burned_in_file(path: Path) -> str:
    """A small CT instance that says its pixels carry burned-in annotation; its UID."""
    uid = routed_file(path, "CT")
    from pydicom import dcmread

    ds = dcmread(path)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(path.with_suffix(".tmp"), enforce_file_format=True)
    os.replace(path.with_suffix(".tmp"), path)
    return uid


def test_a_refused_transform_quarantines_for_that_destination_only(
    fwd: Forwarder, make_scp: Callable[..., SCP]
) -> None:
    plain, research = make_scp(), make_scp()
    fwd.configure(
        [
            dest("plain", plain.port),
            dest("research", research.port, transform={"deidentify": "basic"}),
        ],
        transform={"workers": 1},
    )
    (fwd.tmp / "in").mkdir(exist_ok=True)
    burned = burned_in_file(fwd.tmp / "in" / "burned.dcm")
    fwd.start()
    os.replace(fwd.tmp / "in" / "burned.dcm", fwd.inbox / "burned.dcm")
    good = routed_file(fwd.inbox / "good.dcm", "CT")
    fwd.wait(has_all(plain, [burned, good]), what="both at plain")
    fwd.wait(lambda: len(research.received) == 1, what="the good one at research")
    fwd.wait(lambda: len(fwd.quarantined()) == 1, what="the burned-in file quarantined")
    assert fwd.stop() == 0
    (q,) = fwd.quarantined()
    sidecar = json.loads(Path(f"{q}.json").read_text())
    assert "burned-in annotation" in sidecar["reason"], sidecar
    assert received(plain) == once([burned, good])
    assert burned not in research.uids()  # de-identified: the good one came under a new UID
    assert good not in research.uids()
    with Outbox(fwd.outbox_path, readonly=True) as ob:
        (row,) = [d for d in ob.find(good) if d.destination == "research"]
    assert row.state is State.SENT and row.sent_uid == research.uids()[0]


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, grandchildren ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out


def test_transform_processes_die_with_the_daemon_and_a_killed_one_is_replaced(
    fwd: Forwarder, make_scp: Callable[..., SCP]
) -> None:
    peer = make_scp()
    fwd.configure(
        [dest("regional", peer.port, transform={"set": {"InstitutionName": "Gateway A"}})],
        transform={"workers": 2},
    ).start()
    first = routed_file(fwd.inbox / "first.dcm", "CT")
    fwd.wait(has_all(peer, [first]), what="the first copy")
    pool = fwd.wait(lambda: descendants(fwd.pid) or None, what="the transform processes")
    # a transform process dies (OOM killer, a codec crash): the next files still go out
    (server,) = [p for p in pool if descendants(p)]  # the forkserver: the pool's parent
    os.kill(min(descendants(server)), signal.SIGKILL)
    more = [routed_file(fwd.inbox / f"more{i}.dcm", "CT") for i in range(3)]
    fwd.wait(has_all(peer, more), what="the files after the kill")
    assert received(peer) == once([first, *more])
    # kill -9 of the daemon leaves no transform process behind
    pool = descendants(fwd.pid)
    assert pool
    fwd.kill()
    assert wait_for(lambda: not alive(pool), timeout=10), f"left behind: {alive(pool)}"


def test_without_transforms_no_pool_no_spool_and_leftover_copies_go_at_start(
    fwd: Forwarder, make_scp: Callable[..., SCP]
) -> None:
    peer = make_scp()
    spool = fwd.outbox_path.parent / SPOOL_DIR
    fwd.configure([dest("plain", peer.port)]).start()
    uid = routed_file(fwd.inbox / "a.dcm", "CT")
    fwd.wait(has_all(peer, [uid]), what="the file")
    assert not descendants(fwd.pid)  # the streaming path: no process started
    assert not spool.exists()
    assert fwd.stop() == 0
    # a copy left by a daemon killed while sending: removed when the pool starts
    spool.mkdir()
    (spool / "17.dcm").write_bytes(b"left over")
    (spool / "18.dcm.part").write_bytes(b"left over")
    fwd.configure([dest("plain", peer.port, transform={"set": {"StationName": "GW"}})]).start()
    uid = routed_file(fwd.inbox / "b.dcm", "CT")
    fwd.wait(has_all(peer, [uid]), what="the copy")
    assert fwd.stop() == 0
    assert not any(spool.iterdir())
    assert "transform: removed 2 copies left in" in fwd.text()
