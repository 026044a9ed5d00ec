"""End to end: ``forwarder run`` with ``[destinations.transform]``: what each peer stored.

Real daemon processes, real in-process SCPs (and DCMTK storescp), real files. The engine
itself (set/remove, de-identification, compression) is tested in test_transform.py; here,
that the daemon sends each destination its own copy and records what went out.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from conftest import SCP, data_file, make_instance, wait_for
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from test_daemon import (  # the daemon fixtures and helpers
    Forwarder,
    cpu_seconds,
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

POOLED = {"set": {"InstitutionName": "Gateway A"}, "transfer_syntax": "rle"}
"""A transform done in the pool's processes (a `set` alone is spliced by the sender)."""


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
    # spliced by the sender itself: no transform process, no copy written
    assert not descendants(fwd.pid)
    assert not any((fwd.outbox_path.parent / SPOOL_DIR).iterdir())
    assert fwd.stop() == 0
    assert "transform: started" not in fwd.text()
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


def test_a_spliced_copy_is_converted_for_a_peer_that_refuses_its_syntax(
    fwd: Forwarder, make_scp: Callable[..., SCP]
) -> None:
    """A `set` on an explicit VR file, to a peer that takes implicit VR only: the spliced
    copy is written out and converted, with the change and the pixels."""
    from pydicom import dcmread

    peer = make_scp(transfer_syntaxes=["1.2.840.10008.1.2"])
    fwd.configure(
        [dest("implicit", peer.port, transform={"set": {"InstitutionName": "Gateway A"}})]
    ).start()
    uid = "1.2.826.0.1.3680043.10.1175.77"
    make_instance(fwd.inbox / "ct.dcm", uid)
    fwd.wait(has_all(peer, [uid]), what="the converted copy")
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert not any((fwd.outbox_path.parent / SPOOL_DIR).iterdir())  # removed once answered
    assert fwd.stop() == 0
    (got,) = peer.received
    assert got.transfer_syntax == "1.2.840.10008.1.2"
    theirs = stored(peer, uid)
    assert theirs.InstitutionName == "Gateway A"  # type: ignore[attr-defined]
    assert theirs.PixelData == dcmread(data_file("CT_small.dcm")).PixelData  # type: ignore[attr-defined]
    (row,) = fwd.deliveries()
    assert row.state == State.SENT and "Implicit VR Little Endian" in (row.sent_as or "")


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
        [dest("regional", peer.port, transform=POOLED)],
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


def test_sigterm_to_every_process_at_once_stops_cleanly(
    fwd: Forwarder, make_scp: Callable[..., SCP]
) -> None:
    # systemd's default KillMode (control-group) sends SIGTERM to the daemon and to every
    # process it started at the same moment: the pool must not die under the daemon's feet
    peer = make_scp()
    fwd.configure(
        [dest("regional", peer.port, transform=POOLED)],
        transform={"workers": 2},
    ).start()
    uids = [routed_file(fwd.inbox / f"a{i}.dcm", "CT") for i in range(3)]
    fwd.wait(has_all(peer, uids), what="the copies")
    everyone = {fwd.pid, *descendants(fwd.pid)}
    assert len(everyone) > 2
    for pid in everyone:
        os.kill(pid, signal.SIGTERM)
    assert fwd.proc is not None
    assert fwd.proc.wait(20) == 0  # (fwd.stop() would send a second SIGTERM: exit at once)
    log = fwd.text()
    assert "died" not in log and "Traceback" not in log, log
    assert wait_for(lambda: not alive(everyone), timeout=10), f"left behind: {alive(everyone)}"


def test_an_idle_daemon_with_a_started_pool_costs_no_cpu(
    fwd: Forwarder, make_scp: Callable[..., SCP]
) -> None:
    peer = make_scp()
    fwd.configure(
        [dest("regional", peer.port, transform={"transfer_syntax": "jpeg-ls-lossless"})],
        transform={"workers": 2},
        sender={"linger_seconds": 0},
    ).start()
    uid = routed_file(fwd.inbox / "a.dcm", "CT")
    fwd.wait(has_all(peer, [uid]), what="the copy")
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    everyone = {fwd.pid, *descendants(fwd.pid)}

    def cpu() -> float:
        return sum(cpu_seconds(p) for p in alive(everyone))

    threading.Event().wait(1.0)  # the last store's bookkeeping
    cpu0, w0 = cpu(), time.monotonic()
    threading.Event().wait(3.0)  # the measurement window itself
    idle = (cpu() - cpu0) / (time.monotonic() - w0)
    assert fwd.stop() == 0
    assert idle < 0.02, f"{idle * 100:.2f} % CPU while idle"


def slow_file(path: Path, frames: int) -> str:
    """A noisy 512x512 multi-frame image: JPEG 2000 takes about 0.1 s a frame to encode."""
    import numpy as np
    from pydicom import dcmread

    uid = routed_file(path.with_suffix(".tmp"), "OT")
    ds = dcmread(path.with_suffix(".tmp"))
    rng = np.random.default_rng(5)
    ds.Rows = ds.Columns = 512
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.NumberOfFrames = frames
    ds.PixelData = rng.integers(0, 4096, size=(frames, 512, 512), dtype=np.uint16).tobytes()
    ds["PixelData"].VR = "OW"
    ds.save_as(path.with_suffix(".tmp"), enforce_file_format=True)
    os.replace(path.with_suffix(".tmp"), path)
    return uid


def test_stop_does_not_wait_for_the_transforms_under_way(
    fwd: Forwarder, make_scp: Callable[..., SCP]
) -> None:
    """SIGTERM while the pool encodes big images: the daemon is gone within about its
    shutdown_timeout (systemd's TimeoutStopSec kills it otherwise), leaving no process and no
    copy; the instances are sent after the restart."""
    import time

    peer = make_scp()
    fwd.configure(
        [dest("remote", peer.port, transform={"transfer_syntax": "jpeg2000-lossless"})],
        transform={"workers": 1},
        shutdown_timeout=1,
    )
    (fwd.tmp / "in").mkdir(exist_ok=True)
    uids = [slow_file(fwd.tmp / "in" / f"big{i}.dcm", 30) for i in range(2)]  # ~3 s each
    fwd.start()
    for i in range(2):
        os.replace(fwd.tmp / "in" / f"big{i}.dcm", fwd.inbox / f"big{i}.dcm")
    fwd.wait_log("transform: started 1 process(es)", timeout=20)
    pool = descendants(fwd.pid)
    start = time.monotonic()
    assert fwd.stop(timeout=30) == 0
    took = time.monotonic() - start
    assert took < 3.0, f"stopping took {took:.1f} s with shutdown_timeout = 1\n{fwd.tail()}"
    assert wait_for(lambda: not alive(pool), timeout=10), f"left behind: {alive(pool)}"
    assert "Traceback" not in fwd.text(), fwd.tail()
    assert not peer.received
    fwd.start()
    fwd.wait(has_all(peer, uids), timeout=60, what="the copies after the restart")
    assert fwd.stop() == 0
    assert not any((fwd.outbox_path.parent / SPOOL_DIR).iterdir())


def test_a_long_transform_is_work_not_a_stuck_worker(
    fwd: Forwarder, make_scp: Callable[..., SCP]
) -> None:
    """A big image takes longer to encode than the stall limit (the default 180 s against a
    tomosynthesis or cine file in JPEG 2000; 2 s against ~3 s images here): the daemon stays
    healthy (an unhealthy one stops feeding systemd's watchdog and is killed and restarted,
    the same file again each time). A batch of such files is progress, not one long stall."""
    peer = make_scp()
    fwd.configure(
        [dest("remote", peer.port, transform={"transfer_syntax": "jpeg2000-lossless"})],
        transform={"workers": 1},
        health={"heartbeat_seconds": 0.5, "stall_seconds": 2},
    )
    (fwd.tmp / "in").mkdir(exist_ok=True)
    uids = [slow_file(fwd.tmp / "in" / f"big{i}.dcm", 25) for i in range(2)]  # ~2.5 s each
    fwd.start()
    for i in range(2):
        os.replace(fwd.tmp / "in" / f"big{i}.dcm", fwd.inbox / f"big{i}.dcm")
    fwd.wait_log("transform: started 1 process(es)", timeout=20)
    verdicts = []
    while not has_all(peer, uids)():
        health = fwd.health()
        verdicts.append((health.returncode, health.stderr.strip()))
        assert fwd.alive(), fwd.tail()
    assert len(verdicts) >= 3
    assert all(code == 0 for code, _ in verdicts), [v for v in verdicts if v[0]]
    assert fwd.stop() == 0


def test_a_transform_that_never_ends_makes_the_daemon_unhealthy(
    fwd: Forwarder, make_scp: Callable[..., SCP]
) -> None:
    """A hung codec (here: the pool's process stopped with SIGSTOP) on a small file is still
    a stuck worker once the stall limit and the file's allowance have passed."""
    peer = make_scp()
    fwd.configure(
        [dest("remote", peer.port, transform=POOLED)],
        transform={"workers": 1},
        health={"heartbeat_seconds": 0.5, "stall_seconds": 2},
    ).start()
    first = routed_file(fwd.inbox / "first.dcm", "CT")
    fwd.wait(has_all(peer, [first]), what="the first copy")
    (server,) = [p for p in descendants(fwd.pid) if descendants(p)]  # the forkserver
    (worker,) = descendants(server)
    os.kill(worker, signal.SIGSTOP)
    try:
        hung = routed_file(fwd.inbox / "hung.dcm", "CT")
        health = fwd.wait(
            lambda: (h := fwd.health()).returncode == 1 and h, timeout=20, what="unhealthy"
        )
        assert "send-remote-0" in health.stderr and "transform" in health.stderr, health.stderr
    finally:
        os.kill(worker, signal.SIGCONT)
    fwd.wait(has_all(peer, [first, hung]), what="the copy once the process goes on")
    fwd.wait(lambda: fwd.health().returncode == 0, what="healthy again")
    assert fwd.stop() == 0


def test_copies_left_by_a_killed_daemon_go_at_start_even_without_transforms(
    fwd: Forwarder, make_scp: Callable[..., SCP]
) -> None:
    """Copies left in the spool (a kill -9 while sending; set/remove copies carry the
    patient's data) are removed at the next start even when the config no longer has a
    transform (no pool is started then)."""
    peer = make_scp()
    spool = fwd.outbox_path.parent / SPOOL_DIR
    spool.mkdir(parents=True)
    (spool / "3.dcm").write_bytes(b"a copy with a patient's name")
    (spool / "4.dcm.part").write_bytes(b"half a copy")
    (spool / "notes.txt").write_bytes(b"not ours")
    fwd.configure([dest("plain", peer.port)]).start()
    uid = routed_file(fwd.inbox / "a.dcm", "CT")
    fwd.wait(has_all(peer, [uid]), what="the file")
    assert fwd.stop() == 0
    assert sorted(p.name for p in spool.iterdir()) == ["notes.txt"]
    assert "transform: removed 2 copies left in" in fwd.text()


def test_a_cheap_transform_does_not_wait_behind_another_destinations_batch(
    fwd: Forwarder, make_scp: Callable[..., SCP]
) -> None:
    """Destinations share the pool: one that only sets an attribute must not wait for a whole
    batch of another one's JPEG 2000 encodes (a batch is up to sender.batch_size files; a
    tomosynthesis or cine file takes minutes)."""
    research, regional = make_scp(), make_scp()
    fwd.configure(
        [
            dest(
                "research",
                research.port,
                match={"Modality": "OT"},
                transform={"transfer_syntax": "jpeg2000-lossless"},
            ),
            dest(
                "regional",
                regional.port,
                match={"Modality": "CT"},
                transform=POOLED,  # (a set alone is spliced by the sender: no pool)
            ),
        ],
        transform={"workers": 1},
    )
    (fwd.tmp / "in").mkdir(exist_ok=True)
    big = [slow_file(fwd.tmp / "in" / f"big{i}.dcm", 15) for i in range(5)]  # ~1.5 s each
    fwd.start()
    for i in range(5):
        os.replace(fwd.tmp / "in" / f"big{i}.dcm", fwd.inbox / f"big{i}.dcm")
    fwd.wait_log("transform: started 1 process(es)", timeout=20)
    small = routed_file(fwd.inbox / "small.dcm", "CT")
    fwd.wait(has_all(regional, [small]), timeout=60, what="the small copy")
    before = len(research.received)
    fwd.wait(has_all(research, big), timeout=90, what="the big copies")
    assert fwd.stop() == 0
    assert before <= 3, f"the small copy waited for {before} of the 5 big encodes"
