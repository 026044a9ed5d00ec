"""The receiver's ack log (``forwarder.acklog``): what was acknowledged is found again after a
crash, landed into files and outbox rows once, and nothing else ever is.

The first tests drive `AckLog`, `AckSink`, `scan` and `Lander` directly, on real segment files
(1 MiB each), real spool files and a real outbox; the last run ``forwarder run`` with
``[receive]``, a pynetdicom modality and a pynetdicom destination, and kill it with SIGKILL
between the answers and the landing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sqlite3
import struct
import threading
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from conftest import SCP, free_port, wait_for
from pydicom.filewriter import dcmwrite
from stages import Calls, disposer
from test_daemon import Corpus, Forwarder, dest, to_toml
from test_receive import Modality, Receiving, ct, instances
from test_receive import corpus as corpus
from test_receive import rcv as rcv
from test_receive import small_disk as small_disk

from forwarder.acklog import (
    FOLDER,
    HEADER_SIZE,
    MAGIC,
    MAGIC_V1,
    META_ROOM,
    SPARE,
    AckLog,
    AckSink,
    Lander,
    Record,
    Segment,
    scan,
)
from forwarder.config import ReceiveSettings
from forwarder.dicomfile import inspect_stream
from forwarder.enqueue import Intake
from forwarder.outbox import Outbox, OutboxCorruptError, State
from forwarder.receiver import Receiver, SpoolFile

SEGMENT = 1 << 20
"""Segments of the unit tests: small, so that an instance can outgrow one."""
PIECE = 64 << 10
"""Bytes per `AckSink.write` (a PDU's worth, as the receiver writes them)."""


# -- helpers ----------------------------------------------------------------------------------


@dataclass
class Instance:
    """A DICOM file as the receiver would hold it, and the record it would write for it."""

    uid: str
    data: bytes
    meta: dict[str, Any]


def instance(corpus: Corpus, folder: str = "CT01", to: tuple[str, ...] = ("a",)) -> Instance:
    """A small real DICOM file and the meta `Receiver._acknowledge` writes for it."""
    uid, data = corpus.encode()
    return Instance(uid, data, meta_for(data, folder, to))


def meta_for(data: bytes, folder: str, to: tuple[str, ...]) -> dict[str, Any]:
    info = inspect_stream(BytesIO(data), Path("x.dcm"), len(data), 0)
    return {
        "folder": folder,
        "uid": info.sop_instance_uid,
        "sop_class": info.sop_class_uid,
        "ts": info.transfer_syntax,
        "study": info.study_uid,
        "offset": info.dataset_offset,
        "to": list(to),
        "calling_aet": folder,
        "peer": "127.0.0.1",
    }


FILLER: dict[str, Any] = {
    "folder": "CT01",
    "uid": "1.2.3.4",
    "sop_class": "1.2.840.10008.5.1.4.1.1.7",
    "ts": "1.2.840.10008.1.2.1",
    "study": None,
    "offset": 0,
    "to": ["a"],
}
"""The keys a record must have for the lander (`acklog._meta_ok`), for records of random bytes."""


class Logs:
    """AckLogs on one directory, each as a run of the daemon would open it; closed at the end."""

    def __init__(self, directory: Path, spool: Path) -> None:
        self.dir = directory
        self.spool = spool
        self.opened: list[AckLog] = []

    def open(
        self, marks: dict[str, int] | None = None, segment_size: int = SEGMENT
    ) -> tuple[AckLog, list[Record]]:
        log = AckLog(self.dir, segment_size=segment_size)
        self.opened.append(log)
        return log, log.open(marks or {})

    def segment(self, log: AckLog) -> Segment:
        """A segment taken as an association takes one (made first, as the lander would)."""
        if log.wants():
            log.prepare()
        seg = log.take()
        assert seg is not None, log.unable
        return seg

    def retake(self, log: AckLog, path: Path) -> Segment:
        """The free segment at `path`, taken as an association takes one (with the lander's
        spares taken first when they come before it)."""
        seg = next((s for s in iter(log.take, None) if s.path == path), None)
        assert seg is not None, f"{path} is not free"
        return seg

    def sink(self, log: AckLog, seg: Segment) -> AckSink:
        return AckSink(log, seg, lambda: SpoolFile(self.spool))

    def put(self, log: AckLog, seg: Segment, data: bytes, meta: dict[str, Any]) -> Record:
        """Write `data` in pieces, then commit it with `meta` (completed with what the lander
        needs where it has not got it): acknowledged."""
        sink = self.sink(log, seg)
        for at in range(0, len(data), PIECE):
            sink.write(data[at : at + PIECE])
        rec = sink.commit({**FILLER, **meta})
        assert rec is not None and sink.spilled is None
        return rec

    def close(self) -> None:
        for log in self.opened:
            log.close()


@pytest.fixture
def logs(tmp_path: Path) -> Iterator[Logs]:
    spool = tmp_path / "incoming"
    spool.mkdir()
    made = Logs(tmp_path / "received" / FOLDER, spool)
    try:
        yield made
    finally:
        made.close()


def data_of(rec: Record) -> bytes:
    return os.pread(rec.segment.fd, rec.size, rec.data_offset)


def found(records: list[Record]) -> list[tuple[str, int, int]]:
    """(segment, seq, start) of each record: what identifies it across AckLogs."""
    return [(r.segment.name, r.seq, r.start) for r in records]


def folder_maker(root: Path) -> Callable[[str], Path]:
    """`Lander`'s `folder`: a calling AE's folder under `root`, made when missing (as
    `Receiver._folder` does: a regular file in its place is an OSError)."""

    def folder(name: str) -> Path:
        path = root / name
        if not path.is_dir():
            path.mkdir(parents=True, exist_ok=True)
        return path

    return folder


class Landing:
    """A `Lander` on a real outbox, making files under `root`; stopped at the end."""

    def __init__(
        self, log: AckLog, root: Path, enqueue: Callable[..., int], records: list[Record]
    ) -> None:
        self.queued = threading.Event()
        self.damaged: list[OutboxCorruptError] = []
        self.lander = Lander(
            log,
            enqueue=enqueue,
            folder=folder_maker(root),
            queued=self.queued.set,
            damaged=lambda _where, exc: self.damaged.append(exc),
        )
        self.lander.start(records)

    def wait_landed(self, n: int, timeout: float = 5) -> None:
        wait_for(lambda: self.lander.landed >= n, timeout)
        assert self.lander.landed == n

    def stop(self) -> None:
        self.lander.stop(5)
        assert not self.damaged

    def segment(self, log: AckLog) -> Segment:
        """The segment the lander made ahead of need, taken as an association takes it."""
        wait_for(lambda: log.counts()[0] >= 1, 5)
        seg = log.take()
        assert seg is not None
        return seg


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "state" / "outbox.sqlite3") as ob:
        yield ob


def assert_landed(ob: Outbox, root: Path, inst: Instance) -> None:
    """`inst` has its file (exactly its bytes) under its folder, and a PENDING row per
    destination naming that file."""
    path = root / str(inst.meta["folder"]) / f"{inst.uid}.dcm"
    assert path.read_bytes() == inst.data
    rows = ob.find(inst.uid)
    assert sorted(r.destination for r in rows) == sorted(inst.meta["to"])
    for row in rows:
        assert row.path == str(path)
        assert row.size == len(inst.data)
        assert row.state is State.PENDING
        assert row.sop_class_uid == inst.meta["sop_class"]
        assert row.transfer_syntax == inst.meta["ts"]
        assert row.study_uid == inst.meta["study"]
        assert row.dataset_offset == inst.meta["offset"]
        assert row.mtime_ns == path.stat().st_mtime_ns


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and FOLDER not in p.parts)


# -- segments, records and the scan -------------------------------------------------------------


def test_committed_records_are_found_again_in_order_with_their_exact_bytes(logs: Logs) -> None:
    log, left = logs.open()
    assert left == []
    a = logs.segment(log)
    b = logs.segment(log)  # two associations at once: their records interleave
    assert a.name != b.name
    sizes = [1, 5000, 3 * PIECE + 7, 4096 - HEADER_SIZE, 200_000, 17]
    written: list[tuple[Record, bytes, dict[str, Any]]] = []
    for n, size in enumerate(sizes):
        data = os.urandom(size)  # no pattern: a record read one byte off is seen
        meta = {"n": n, "uid": f"1.2.3.{n}", "to": ["a", "b"]}
        written.append((logs.put(log, a if n % 2 == 0 else b, data, meta), data, meta))
    (logs.dir / "00000099.ack.tmp").write_bytes(b"half made")  # a segment being made
    (logs.dir / "notes.txt").write_bytes(MAGIC * 10)  # not a segment

    again, records = logs.open()  # the daemon started again: no mark yet
    assert found(records) == [(r.segment.name, r.seq, r.start) for r, _, _ in written]
    assert [r.seq for r in records] == sorted(r.seq for r in records)
    for rec, (_, data, meta) in zip(records, written, strict=True):
        assert rec.size == len(data)
        assert data_of(rec) == data
        assert meta.items() <= rec.meta.items()
    assert not (logs.dir / "00000099.ack.tmp").exists()
    assert again.counts() == (2, len(sizes))


def test_records_at_or_before_their_mark_are_not_returned(logs: Logs) -> None:
    log, _ = logs.open()
    a, b = logs.segment(log), logs.segment(log)
    ra = [logs.put(log, a, os.urandom(3000 + n), {"n": n}) for n in range(4)]
    rb = [logs.put(log, b, os.urandom(100), {"n": 10 + n}) for n in range(2)]
    marks = {a.name: ra[1].seq, b.name: rb[1].seq}  # two of a landed, all of b

    again, records = logs.open(marks)
    assert found(records) == found(ra[2:])
    assert again.counts() == (2, 2)
    # b has nothing to land: it is free, and a record written into it now comes after every
    # mark (else the next start would take it for landed)
    seg = again.take()
    assert seg is not None and seg.name == b.name
    new = logs.put(again, seg, b"new", {"n": 99})
    assert new.seq > max(marks.values()) and new.seq > ra[-1].seq

    _, records = logs.open({a.name: ra[-1].seq, b.name: rb[1].seq})
    assert found(records) == found([new])


def _zero_header(rec: Record) -> None:
    os.pwrite(rec.segment.fd, bytes(HEADER_SIZE), rec.start)


def _flip(rec: Record, at: int, mask: int) -> None:
    """XOR the byte at `at` of `rec`'s segment with `mask`."""
    (byte,) = os.pread(rec.segment.fd, 1, at)
    os.pwrite(rec.segment.fd, bytes((byte ^ mask,)), at)


def _flip_meta(rec: Record) -> None:
    _flip(rec, rec.data_offset + rec.size + 3, 0x20)  # inside the JSON: its CRC fails


def _flip_length(rec: Record) -> None:
    _flip(rec, rec.start + 8 + 8 + 8, 0x01)  # after magic, seq, epoch: the data length


def _flip_data(rec: Record) -> None:
    _flip(rec, rec.data_offset + rec.size // 2, 0x01)  # one byte of the instance itself


def _raw_header(
    magic: bytes, seq: int, epoch: int, size: int, body: bytes, data_crc: int | None = None
) -> bytes:
    """A record header built here, not by the module under test: magic, seq, epoch, data
    length, JSON length, the bytes' CRC-32C (none for `MAGIC_V1`), then the CRC-32 of those
    fields and the JSON; `HEADER_SIZE` bytes."""
    fields = struct.pack("<8sQQQI", magic, seq, epoch, size, len(body))
    if data_crc is not None:
        fields += struct.pack("<I", data_crc)
    header = fields + struct.pack("<I", zlib.crc32(fields, zlib.crc32(body)))
    return header + bytes(HEADER_SIZE - len(header))


def _old_block(rec: Record) -> None:
    """A crash during the record's one fdatasync: its header reached the disk, one block of
    its bytes did not (what the block held before is read back: here the zeros the segment
    was made of)."""
    os.pwrite(rec.segment.fd, bytes(4096), rec.data_offset + 4096)


@pytest.mark.parametrize(
    "damage",
    [_zero_header, _flip_meta, _flip_length],
    ids=["header-never-written", "meta-damaged", "header-damaged"],
)
def test_a_record_whose_header_does_not_hold_is_not_returned_and_ends_the_scan(
    logs: Logs, damage: Callable[[Record], None]
) -> None:
    log, _ = logs.open()
    seg = logs.segment(log)
    recs = [logs.put(log, seg, os.urandom(20_000 + n), {"n": n}) for n in range(3)]
    damage(recs[1])
    _, records = logs.open()
    assert found(records) == found(recs[:1])  # the third is whole but beyond the scan
    assert scan(records[0].segment, 0)[1] == recs[0].seq


@pytest.mark.parametrize("damage", [_flip_data, _old_block], ids=["bytes-damaged", "torn"])
def test_the_last_record_whose_bytes_fail_their_crc_is_not_returned_and_said(
    logs: Logs, damage: Callable[[Record], None], caplog: pytest.LogCaptureFixture
) -> None:
    """A crash during a record's one fdatasync can leave its header on the disk and not all
    its bytes (it was never answered): the CRC of the bytes tells, and the log says so."""
    log, _ = logs.open()
    seg = logs.segment(log)
    recs = [logs.put(log, seg, os.urandom(20_000 + n), {"n": n}) for n in range(3)]
    damage(recs[2])
    caplog.set_level(logging.WARNING, logger="forwarder")
    _, records = logs.open()
    assert found(records) == found(recs[:2])
    said = [r for r in caplog.records if f"record {recs[2].seq} " in r.getMessage()]
    assert [r.levelname for r in said] == ["WARNING"], caplog.text
    assert seg.name in said[0].getMessage() and "fail their CRC" in said[0].getMessage()


def _put_v1(seg: Segment, data: bytes, meta: dict[str, Any], seq: int) -> Record:
    """A record as earlier versions wrote it (`MAGIC_V1`: bytes synced, then a header without
    their CRC), at the segment's next place."""
    body = json.dumps({**FILLER, **meta}, separators=(",", ":")).encode()
    header = _raw_header(MAGIC_V1, seq, seg.epoch, len(data), body)
    start = seg.offset
    os.pwrite(seg.fd, data + body, start + HEADER_SIZE)
    os.pwrite(seg.fd, header, start)
    seg.offset = (start + HEADER_SIZE + len(data) + len(body) + 4095) // 4096 * 4096
    return Record(seg, start, seq, len(data), {**FILLER, **meta})


def test_records_an_earlier_version_left_are_still_found_after_an_upgrade(logs: Logs) -> None:
    """Earlier versions wrote no CRC of the bytes (they synced them before the header): a
    daemon upgraded while its ack log still held such records must land them."""
    log, _ = logs.open()
    seg = logs.segment(log)
    data = [os.urandom(5000 + n) for n in range(3)]
    old = [_put_v1(seg, d, {"n": n}, log.next_seq()) for n, d in enumerate(data)]
    log.close()  # the old daemon stops; the new one starts

    again, records = logs.open()
    assert found(records) == found(old)
    assert [data_of(r) for r in records] == data
    assert again.counts() == (1, 3)


def test_an_instance_written_but_never_committed_is_not_returned(logs: Logs) -> None:
    log, _ = logs.open()
    seg = logs.segment(log)
    done = [logs.put(log, seg, os.urandom(5000), {"n": n}) for n in range(2)]
    sink = logs.sink(log, seg)  # the daemon died while this one arrived, or before its header
    sink.write(os.urandom(300_000))
    sink.complete()
    _, records = logs.open()
    assert found(records) == found(done)


def test_a_reused_segment_never_yields_the_records_of_its_earlier_use(logs: Logs) -> None:
    """Even with no marks at all (the outbox made anew): a freed segment's first header is
    no record, and a stale record further on belongs to its earlier use, whatever its CRC.

    With no marks and every segment freed, nothing tells the next run which sequence numbers
    were used: its first segment's epoch must still differ from the one its stale records
    carry."""
    log, _ = logs.open()
    seg = logs.segment(log)
    old = [logs.put(log, seg, os.urandom(6000), {"use": 1, "n": n}) for n in range(3)]
    log.landed(old)
    log.give_back(seg)  # every record landed: free again, its first header no record
    assert os.pread(seg.fd, len(MAGIC), 0) != MAGIC  # no record starts there now
    assert os.pread(seg.fd, len(MAGIC), old[1].start) == MAGIC  # the stale ones are there
    log.close()

    # the daemon stops; the outbox is made anew (no marks); the daemon starts again
    log, records = logs.open()
    assert records == []
    seg = logs.retake(log, old[0].segment.path)
    # the new use's first record ends where the old first did: the scan's next header is
    # the old second record's, whole and with a valid CRC
    new = logs.put(log, seg, os.urandom(6000), {"use": 2, "n": 0})
    assert (new.start, new.size) == (old[0].start, old[0].size)
    assert seg.offset == old[1].start
    log.close()  # and dies (kill -9) with it acknowledged, not landed

    _, records = logs.open()
    assert found(records) == found([new]), (
        f"stale records of the segment's earlier use came back: {[r.meta for r in records]}"
    )
    assert (records[0].meta["use"], records[0].meta["n"]) == (2, 0)


def test_a_segment_freed_at_start_keeps_the_sequence_reached_for_an_outbox_made_anew(
    logs: Logs,
) -> None:
    """A segment whose records were all landed but not given back (kill -9 after landing) is
    freed by the next `open`: its free header must carry the sequence number that run
    reached, not 0, else a later run with no marks reuses the old epoch and its scan walks
    on into the stale records."""
    log, _ = logs.open()
    seg = logs.segment(log)
    old = [logs.put(log, seg, os.urandom(6000), {"use": 1, "n": n}) for n in range(3)]
    marks = {seg.name: old[-1].seq}  # landed and committed; killed before the give-back
    log.close()

    log, records = logs.open(marks)  # frees it
    assert records == []
    log.close()

    # the outbox is made anew (no marks); the daemon starts again
    log, records = logs.open()
    assert records == []
    seg = logs.retake(log, old[0].segment.path)
    assert seg.epoch > old[-1].seq, f"epoch {seg.epoch} may be one the stale records carry"
    new = logs.put(log, seg, os.urandom(6000), {"use": 2, "n": 0})
    assert seg.offset == old[1].start  # the next header the scan reads is a stale one
    log.close()  # and dies with it acknowledged, not landed

    _, records = logs.open()
    assert found(records) == found([new]), (
        f"stale records of the segment's earlier use came back: {[r.meta for r in records]}"
    )


def test_an_instance_larger_than_the_room_left_moves_to_a_spool_file(logs: Logs) -> None:
    log, _ = logs.open()
    seg = logs.segment(log)
    first = logs.put(log, seg, os.urandom(1000), {"n": 0})
    offset = seg.offset
    big = os.urandom(SEGMENT + SEGMENT // 2 + 13)
    sink = logs.sink(log, seg)
    for at in range(0, len(big), 100_003):  # pieces not aligned to anything
        sink.write(big[at : at + 100_003])
    assert sink.spilled is not None
    assert Path(sink.name).parent == logs.spool and sink.name == sink.spilled.name
    sink.complete()
    sink.close()
    assert Path(sink.name).read_bytes() == big
    assert seg.offset == offset and log.counts()[1] == 1  # the segment is as it was
    sink.discard()
    assert not Path(sink.name).exists()

    # a record that does not fit its room: not committed, spilled whole (the direct way)
    data = os.urandom(3000)
    sink = logs.sink(log, seg)
    sink.write(data)
    assert sink.commit({"uid": "1.2.3", "padding": "x" * META_ROOM}) is None
    assert seg.offset == offset and log.counts()[1] == 1
    spool = sink.spill()
    assert sink.spilled is spool
    spool.complete()
    sink.close()
    assert Path(spool.name).read_bytes() == data
    sink.discard()

    _, records = logs.open()
    assert found(records) == found([first])


# -- the lander -------------------------------------------------------------------------------


def test_the_lander_makes_the_files_rows_and_marks_of_acknowledged_records(
    logs: Logs, outbox: Outbox, corpus: Corpus, tmp_path: Path
) -> None:
    root = tmp_path / "received"
    log, records = logs.open(outbox.acklog_marks())
    landing = Landing(log, root, outbox.enqueue_routed, records)
    try:
        seg = landing.segment(log)
        insts = [
            instance(corpus, "CT01", ("a",)),
            instance(corpus, "MR02", ("a", "b")),
            instance(corpus, "CT01", ("b",)),
        ]
        recs = [logs.put(log, seg, inst.data, inst.meta) for inst in insts]
        for rec in recs:
            landing.lander.add(rec)
        landing.wait_landed(3)
        assert landing.queued.is_set()
        for inst in insts:
            assert_landed(outbox, root, inst)
        assert len(outbox.list()) == 4
        assert outbox.acklog_marks() == {seg.name: recs[-1].seq}
        assert log.counts()[1] == 0
        log.give_back(seg)  # landed and given back: free, its first header no record
        assert os.pread(seg.fd, len(MAGIC), 0) != MAGIC  # no record starts there now
    finally:
        landing.stop()
    log.close()
    _, records = logs.open(outbox.acklog_marks())
    assert records == []


def test_the_lander_keeps_spare_segments_made_ahead_of_need(
    logs: Logs, outbox: Outbox, tmp_path: Path
) -> None:
    """An association that fills its segment takes the next at once: one made only when the
    last free one was taken leaves the instances meanwhile to the direct way (slow)."""
    log, records = logs.open(outbox.acklog_marks())
    landing = Landing(log, tmp_path / "received", outbox.enqueue_routed, records)
    try:
        wait_for(lambda: log.counts()[0] >= SPARE, 5)
        first = log.take()
        assert first is not None
        landing.lander.wake()  # as the receiver's `wanted` does when a segment is taken
        wait_for(lambda: log.counts()[0] >= SPARE + 1, 5)  # made again before it is needed
        second = log.take()
        assert second is not None and second is not first
    finally:
        landing.stop()


def test_records_in_the_batch_being_landed_still_count_as_not_queued(
    logs: Logs, outbox: Outbox, corpus: Corpus, tmp_path: Path
) -> None:
    """`forwarder status` shows "N acknowledged, being queued": a batch the lander holds (a
    slow disk, a busy outbox) is part of N until its rows are committed."""
    entered, gate = threading.Event(), threading.Event()

    def enqueue(*args: Any) -> int:
        entered.set()
        assert gate.wait(10)
        return outbox.enqueue_routed(*args)

    log, records = logs.open(outbox.acklog_marks())
    landing = Landing(log, tmp_path / "received", enqueue, records)
    try:
        seg = landing.segment(log)
        for inst in [instance(corpus, "CT01", ("a",)) for _ in range(3)]:
            landing.lander.add(logs.put(log, seg, inst.data, inst.meta))
        assert entered.wait(5)
        assert landing.lander.pending() == 3
        gate.set()
        landing.wait_landed(3)
        assert landing.lander.pending() == 0
    finally:
        gate.set()
        landing.stop()


def test_records_left_by_a_crash_are_landed_once_at_the_next_start(
    logs: Logs, outbox: Outbox, corpus: Corpus, tmp_path: Path
) -> None:
    root = tmp_path / "received"
    log, records = logs.open(outbox.acklog_marks())
    landing = Landing(log, root, outbox.enqueue_routed, records)
    try:
        seg = landing.segment(log)
        insts = [instance(corpus) for _ in range(4)]
        landing.lander.add(logs.put(log, seg, insts[0].data, insts[0].meta))
        landing.wait_landed(1)
    finally:
        landing.stop()
    # acknowledged, and the daemon died before landing them
    left = [logs.put(log, seg, inst.data, inst.meta) for inst in insts[1:]]
    log.close()

    log, records = logs.open(outbox.acklog_marks())
    assert found(records) == found(left)
    landing = Landing(log, root, outbox.enqueue_routed, records)
    try:
        landing.wait_landed(3)
    finally:
        landing.stop()
    for inst in insts:
        assert_landed(outbox, root, inst)
    assert len(files_under(root)) == 4 and len(outbox.list()) == 4
    assert outbox.acklog_marks() == {seg.name: left[-1].seq}
    log.close()
    _, records = logs.open(outbox.acklog_marks())
    assert records == []


class _Switch:
    """The lander's `enqueue`: the outbox it writes to, which the test changes."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    def enqueue(self, *args: Any) -> int:
        return self.outbox.enqueue_routed(*args)


@pytest.mark.parametrize("cause", ["folder", "outbox"])
def test_landing_that_fails_keeps_the_records_and_lands_them_once_it_can(
    logs: Logs,
    outbox: Outbox,
    corpus: Corpus,
    tmp_path: Path,
    cause: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="forwarder.receiver")
    root = tmp_path / "received"
    root.mkdir()
    log, _ = logs.open()
    seg = logs.segment(log)
    # CT01's file is made first in the batch: it must not stay when MR02's fails
    insts = [instance(corpus, "CT01", ("a", "b")), instance(corpus, "MR02", ("a",))]
    recs = [logs.put(log, seg, inst.data, inst.meta) for inst in insts]
    switch = _Switch(outbox)
    readonly: Outbox | None = None
    if cause == "folder":
        (root / "MR02").write_bytes(b"a regular file where the folder goes")
    else:
        readonly = Outbox(outbox.path, readonly=True)
        switch.outbox = readonly
    landing = Landing(log, root, switch.enqueue, recs)
    try:
        wait_for(lambda: landing.lander.failing, 5)
        failing = landing.lander.failing
        assert failing is not None
        assert ("cannot write to disk" if cause == "folder" else "outbox unavailable") in failing
        assert files_under(root) == ([root / "MR02"] if cause == "folder" else [])
        assert outbox.list() == [] and outbox.acklog_marks() == {}
        assert landing.lander.pending() == 2 and log.counts()[1] == 2
        assert "2 acknowledged instance(s) cannot be queued yet" in caplog.text
        # the cause goes away: the next try (RETRY_FIRST, 1 s) lands both
        if cause == "folder":
            (root / "MR02").unlink()
        else:
            switch.outbox = outbox
        landing.wait_landed(2, timeout=8)
        assert landing.lander.failing is None
    finally:
        landing.stop()
        if readonly is not None:
            readonly.close()
    for inst in insts:
        assert_landed(outbox, root, inst)
    assert len(files_under(root)) == 2
    assert outbox.acklog_marks() == {seg.name: recs[-1].seq}
    assert "acknowledged instances are queued again" in caplog.text


def _receiver(tmp_path: Path, outbox: Outbox) -> Receiver:
    """A receiver in this process (as the daemon makes one at start and at each reload of
    ``[receive]``) into ``tmp/received``, on a port of its own, for destination "a"."""
    settings = ReceiveSettings(listen=f"127.0.0.1:{free_port()}", dir=tmp_path / "received")
    intake = Intake(
        destinations=("a",), follow_symlinks=False, invalid_grace_seconds=0, keeps_delivered=False
    )
    return Receiver(
        settings,
        outbox,
        disposer(outbox, tmp_path, Calls()),
        intake,
        queued=lambda: None,
        damaged=lambda where, exc: pytest.fail(f"outbox damaged in {where}: {exc}"),
    )


def test_a_receiver_started_while_the_last_one_still_lands_never_lands_a_record_twice(
    outbox: Outbox, corpus: Corpus, tmp_path: Path
) -> None:
    """A reload of ``[receive]`` stops the receiver and starts a new one on the same folder.
    When the old lander is still in a batch (here: the outbox is locked by another writer),
    the new receiver must not scan, land or reuse the same records and segments meanwhile."""
    old = _receiver(tmp_path, outbox)
    old.start()
    new: Receiver | None = None
    starting: threading.Thread | None = None
    blocker = sqlite3.connect(outbox.path, isolation_level=None, timeout=0)
    try:
        wait_for(lambda: old.acklog.counts()[0] >= 1, 10)  # a segment: the ack log way
        blocker.execute("BEGIN IMMEDIATE")  # the lander's commit waits (up to 10 s)
        datasets = instances(corpus, 5)
        uids = {str(ds.SOPInstanceUID) for ds in datasets}
        assert old.address is not None
        modality = Modality(old.address[1])
        modality.push(datasets)
        assert modality.acked() == uids, modality.answers
        wait_for(lambda: old.lander.landing > 0, 5)  # a batch in the lander's hands
        old.stop(timeout=0.2)  # its lander does not end in time

        new = _receiver(tmp_path, outbox)
        starting = threading.Thread(target=new.start, name="test-start")
        starting.start()
        starting.join(1.0)  # (the fixed receiver waits here for the old lander to end)
        blocker.execute("ROLLBACK")
        starting.join(15)
        assert not starting.is_alive()
        assert new.address is not None
        wait_for(lambda: new.lander.pending() == 0 and new.acklog.counts()[1] == 0, 10)
        wait_for(lambda: old.lander.landed + new.lander.landed >= len(uids), 10)
    finally:
        if blocker.in_transaction:
            blocker.execute("ROLLBACK")
        blocker.close()
        if starting is not None:
            starting.join(15)
        if new is not None:
            new.stop()
        old.stop()
    rows = outbox.list()
    assert sorted(r.sop_instance_uid for r in rows) == sorted(uids), (
        "an acknowledged instance was queued twice (or not at all)"
    )
    received = tmp_path / "received"
    files = [p for p in received.rglob("*.dcm") if p.parent.name == "CT01"]
    assert sorted(p.name for p in files) == sorted(f"{u}.dcm" for u in uids)
    assert {r.path for r in rows} == {str(p) for p in files}
    assert old.acklog.counts() == (0, 0)  # closed once its lander ended


# -- the daemon ---------------------------------------------------------------------------------


def _block_landing(rcv: Receiving) -> Path:
    """Make landing fail once the receiver has a segment to acknowledge into: a regular file
    where the calling AE's folder goes (CT01). Returns that file."""
    segments = rcv.received_dir / FOLDER
    rcv.wait(lambda: list(segments.glob("*.ack")), 10, "a segment made ahead of need")
    blocker = rcv.received_dir / "CT01"
    blocker.write_bytes(b"not a folder")
    return blocker


def _one_stuck(rcv: Receiving, corpus: Corpus) -> tuple[Path, str]:
    """One instance acknowledged through the ack log that cannot be landed (`_block_landing`):
    the blocking file and the instance's UID."""
    blocker = _block_landing(rcv)
    datasets = instances(corpus, 4)
    modality = Modality(rcv.port)
    assoc = modality.associate([str(ds.SOPClassUID) for ds in datasets])
    assert assoc.is_established
    try:
        for ds in datasets:  # the direct way (0xA700) until the segment is free to take
            if _store(assoc, modality, ds) == 0x0000:
                break
        rcv.wait_log("1 acknowledged instance(s) cannot be queued yet")
    finally:
        assoc.release()
    acked = modality.acked()
    assert len(acked) == 1, modality.answers
    return blocker, next(iter(acked))


def _store(assoc: Any, modality: Modality, ds: Any) -> int | None:
    """One C-STORE, its answer recorded as `Modality.push` records it."""
    rsp = assoc.send_c_store(ds)
    status = rsp.get("Status") if rsp else None
    uid = str(ds.SOPInstanceUID)
    modality.answers[uid] = None if status is None else int(status)
    if status is None:
        modality.lost += 1
    return modality.answers[uid]


def _push_then_kill(rcv: Receiving, datasets: list[Any]) -> Modality:
    """Store `datasets` on one association and SIGKILL the daemon right after the last answer
    (before the association is released)."""
    modality = Modality(rcv.port)
    assoc = modality.associate([str(ds.SOPClassUID) for ds in datasets])
    assert assoc.is_established
    try:
        for ds in datasets:
            if not assoc.is_established:  # pynetdicom lost a fast response and aborted (see
                uid = str(ds.SOPInstanceUID)  # `Modality`): the rest is never answered
                modality.answers[uid] = None
                modality.lost += 1
                continue
            _store(assoc, modality, ds)
        rcv.kill()
    finally:
        assoc.abort()
    return modality


def _counts(scp: SCP) -> Counter[str]:
    return Counter(scp.uids())


def test_kill_9_right_after_the_answers_delivers_each_acknowledged_instance_once(
    rcv: Receiving, make_scp: Callable[..., SCP], corpus: Corpus
) -> None:
    rcv.configure_receiving([dest("a", free_port())]).start()  # the destination is down
    datasets = instances(corpus, 20)
    modality = _push_then_kill(rcv, datasets)
    acked = modality.acked()
    assert set(modality.answers.values()) <= {0x0000, None}, modality.answers
    assert len(acked) == 20 - modality.lost, modality.answers

    pacs = make_scp()
    rcv.configure_receiving([dest("a", pacs.port)]).start()
    rcv.wait(lambda: acked <= set(pacs.uids()), 20, "every acknowledged instance")
    rcv.wait(lambda: not rcv.received_files(), 15, "received folder emptied")
    assert rcv.stop() == 0
    counts = _counts(pacs)
    assert {uid: n for uid, n in counts.items() if n != 1} == {}, "sent twice"
    assert set(counts) <= {str(ds.SOPInstanceUID) for ds in datasets}
    assert not rcv.spooled()
    with Outbox(rcv.outbox_path, readonly=True) as ob:
        marks = ob.acklog_marks()
        assert {r.sop_instance_uid for r in ob.list(limit=1000)} == set(counts)
    log = AckLog(rcv.received_dir / FOLDER)
    try:
        assert log.open(marks) == []  # every record landed
    finally:
        log.close()


@pytest.mark.parametrize("end", ["kill", "stop"])
def test_acknowledged_instances_that_could_not_be_landed_are_sent_after_a_restart(
    rcv: Receiving, make_scp: Callable[..., SCP], corpus: Corpus, end: str
) -> None:
    """The window made certain: the calling AE's folder cannot be made (a regular file in its
    place), so what the ack log acknowledged stays in it until the daemon is killed (or
    stopped: its last try to land fails as well)."""
    rcv.configure_receiving([dest("a", free_port())]).start()
    blocker = _block_landing(rcv)
    datasets = instances(corpus, 8)
    modality = Modality(rcv.port)
    assoc = modality.associate([str(ds.SOPClassUID) for ds in datasets])
    assert assoc.is_established
    try:
        # until the segment is free to take (made a moment ago) an instance goes the direct
        # way, which cannot make the folder either: 0xA700; then one is acknowledged
        todo = iter(datasets)
        for ds in todo:
            if _store(assoc, modality, ds) == 0x0000:
                break
        rcv.wait_log("1 acknowledged instance(s) cannot be queued yet: cannot write to disk")
        # landing fails: every new instance goes the direct way, and is refused
        for ds in todo:
            assert _store(assoc, modality, ds) in (0xA700, None)
        if end == "kill":
            rcv.kill()
    finally:
        assoc.abort()
    if end == "stop":
        assert rcv.stop() == 0
        assert "1 acknowledged instance(s) are still only in" in rcv.text()  # told, with why
    acked = modality.acked()
    lost = {uid for uid, s in modality.answers.items() if s is None}  # the SCU lost the answer
    assert len(acked) == 1 or lost, modality.answers
    refused = {uid for uid, s in modality.answers.items() if s == 0xA700}
    assert len(refused) >= 4, modality.answers

    blocker.unlink()
    pacs = make_scp()
    rcv.configure_receiving([dest("a", pacs.port)]).start()
    text = rcv.text(since_start=True)
    assert "1 instance(s) acknowledged by the last run are being queued" in text
    rcv.wait(lambda: acked <= set(pacs.uids()), 20, "the acknowledged instance")
    rcv.wait(lambda: not rcv.received_files(), 15, "received folder emptied")
    assert rcv.stop() == 0
    counts = _counts(pacs)  # each once, none of the refused (a lost answer may have been 0x0000)
    assert acked <= set(counts) <= acked | lost and set(counts.values()) == {1}, counts


@pytest.mark.parametrize("change", ["dir", "off"])
def test_a_reload_never_strands_acknowledged_instances_in_the_old_ack_log(
    rcv: Receiving, make_scp: Callable[..., SCP], corpus: Corpus, change: str
) -> None:
    """An instance acknowledged and not queued yet (landing fails: the calling AE's folder
    cannot be made) lives only in ``receive.dir/.acklog``. A reload that points receive.dir
    elsewhere, or turns receiving off, would leave it where no run looks again: the running
    [receive] is kept instead, said in one line, and the instance arrives once it can."""
    pacs = make_scp()
    rcv.configure_receiving([dest("a", pacs.port)]).start()
    blocker, uid = _one_stuck(rcv, corpus)

    cfg = rcv.config
    if change == "dir":
        cfg["receive"]["dir"] = str(rcv.tmp / "elsewhere")
    else:
        del cfg["receive"]["listen"]
    rcv.cfg.write_text(to_toml(cfg))
    rcv.signal(signal.SIGHUP)
    rcv.wait_log("reloaded")
    assert "reload keeps the running [receive]" in rcv.text(since_start=True)
    if not blocker.is_dir():  # the restarted receiver's start sweep may have removed it
        blocker.unlink(missing_ok=True)
    rcv.wait(lambda: uid in pacs.uids(), 30, "the acknowledged instance")
    rcv.wait(lambda: not rcv.received_files(), 15, "received folder emptied")
    # queued: the next reload applies the change
    rcv.signal(signal.SIGHUP)
    rcv.wait_log("reloaded", count=2)
    if change == "dir":
        rcv.wait_log(f"into {rcv.tmp / 'elsewhere'}")
    else:
        assert not Modality(rcv.port).associate([str(ct().SOPClassUID)]).is_established
    assert rcv.stop() == 0
    assert _counts(pacs)[uid] == 1


def _write_record(directory: Path, data: bytes, meta: dict[str, Any]) -> Record:
    """A segment as a crash would leave it: one acknowledged record, not landed."""
    log = AckLog(directory)
    try:
        assert log.open({}) == []
        log.prepare()
        seg = log.take()
        assert seg is not None, log.unable
        sink = AckSink(log, seg, lambda: pytest.fail("an instance this small never spills"))
        sink.write(data)
        rec = sink.commit(meta)
        assert rec is not None
        return rec
    finally:
        log.close()


def _left_ct(rcv: Receiving) -> tuple[bytes, Record]:
    """A CT from CT01 for destination "a" that the last run acknowledged and never queued:
    its bytes, and its record left in `rcv`'s ack log."""
    buf = BytesIO()
    dcmwrite(buf, ct(), enforce_file_format=True)
    data = buf.getvalue()
    return data, _write_record(rcv.received_dir / FOLDER, data, meta_for(data, "CT01", ("a",)))


def test_a_record_left_in_the_ack_log_is_sent_once_and_never_again(
    rcv: Receiving, make_scp: Callable[..., SCP], corpus: Corpus
) -> None:
    pacs = make_scp()
    rcv.configure_receiving([dest("a", pacs.port)])
    data, rec = _left_ct(rcv)
    uid = rec.meta["uid"]
    # and the file its landing had begun, never committed: the sweep removes it first
    half = rcv.received_dir / "CT01" / f"{uid}.dcm"
    half.parent.mkdir()
    half.write_bytes(data[:1000])

    rcv.start()
    text = rcv.text(since_start=True)
    assert "1 instance(s) acknowledged by the last run are being queued" in text
    rcv.wait(lambda: uid in pacs.uids(), 15, "the acknowledged instance")
    (got,) = [r for r in pacs.received if r.sop_instance_uid == uid]
    assert got.encoded == data[rec.meta["offset"] :]  # the record's bytes, not the half file's
    rcv.wait(lambda: not rcv.received_files(), 15, "received folder emptied")
    with Outbox(rcv.outbox_path, readonly=True) as ob:
        assert ob.acklog_marks() == {rec.segment.name: rec.seq}
        (row,) = ob.find(uid)
        assert row.state is State.SENT and row.path == str(half)
    assert rcv.stop() == 0

    rcv.start()  # the record is still in its segment's bytes: the mark says it is landed
    assert "acknowledged by the last run" not in rcv.text(since_start=True)
    (later,) = instances(corpus, 1)
    modality = Modality(rcv.port)
    modality.push([later])
    rcv.wait(lambda: str(later.SOPInstanceUID) in pacs.uids(), 15, "an instance after it")
    assert rcv.stop() == 0
    counts = _counts(pacs)
    assert set(counts) == {uid, str(later.SOPInstanceUID)} and counts[uid] == 1
    assert counts[str(later.SOPInstanceUID)] <= 1 + modality.lost  # re-sent by the SCU
    # the half-made file was acknowledged (its record makes it again): the sweep that removed
    # it must not tell the operator it never was, nor that the modality sends it again
    said = [ln for ln in rcv.text().splitlines() if str(half) in ln and "never acknow" in ln]
    assert not said, said[0]


def test_without_room_for_a_segment_instances_go_the_direct_way(
    rcv: Receiving, make_scp: Callable[..., SCP], corpus: Corpus, small_disk: Path
) -> None:
    pacs = make_scp()
    rcv.received_dir = small_disk / "received"  # 2 MiB: a 16 MiB segment cannot be made
    rcv.configure_receiving([dest("a", pacs.port)]).start()
    rcv.wait_log("cannot make an ack log segment")
    datasets = instances(corpus, 10)
    modality = Modality(rcv.port)
    modality.push(datasets)
    uids = {str(ds.SOPInstanceUID) for ds in datasets}
    assert modality.acked() == uids, modality.answers
    rcv.wait(lambda: uids <= set(pacs.uids()), 15, "every instance")
    rcv.wait(lambda: not rcv.received_files(), 15, "received folder emptied")
    assert rcv.stop() == 0
    counts = _counts(pacs)
    assert set(counts) == uids
    # a store whose answer pynetdicom's SCU lost is sent again by it (see Modality): twice
    assert sum(counts.values()) - len(uids) <= modality.lost, counts
    assert not [p for p in (rcv.received_dir / FOLDER).iterdir()]  # no segment, no .tmp
    assert re.search(r"cannot make an ack log segment in .*: No space left", rcv.text())


@pytest.mark.parametrize(
    "bad",
    [{"to": []}, {"folder": ".."}, {"uid": "../../etc/x"}, {"offset": "12"}],
    ids=["no-destination", "folder-dotdot", "uid-path", "offset-text"],
)
def test_a_record_the_lander_cannot_land_is_left_with_an_error_not_queued(
    logs: Logs, bad: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Only another version of the daemon could write one; it must neither block the lander
    (tried again for ever) nor make a file outside `receive.dir`."""
    log, _ = logs.open()
    seg = logs.segment(log)
    good = logs.put(log, seg, os.urandom(500), {"n": 0})
    sink = logs.sink(log, seg)
    sink.write(os.urandom(500))
    assert sink.commit({**FILLER, **bad}) is not None
    with caplog.at_level(logging.ERROR, logger="forwarder.receiver"):
        _, records = logs.open()
    assert found(records) == found([good])
    assert "is not one this version can queue" in caplog.text


@pytest.mark.parametrize("magic", [MAGIC, MAGIC_V1], ids=["header", "header-v1"])
def test_a_header_forged_inside_an_earlier_instance_is_never_taken_for_a_record(
    logs: Logs, magic: bytes
) -> None:
    """A modality controls the bytes of its instances. Left in a segment from an earlier use,
    they could hold, at an offset a later use's records reach, a header with a valid CRC for
    the epoch that later use will have: after a crash the scan would take it for a record,
    with the destinations and folder it names. Epochs are random: there is none to foresee."""
    log, _ = logs.open()
    seg = logs.segment(log)  # use 1
    guess = log._seq + 2  # use 2's epoch, were epochs counted: one seq for use 1's record
    at = 2 * 4096  # where use 2's third record starts after two of 3000 bytes
    body = json.dumps({**FILLER, "to": ["elsewhere"]}, separators=(",", ":")).encode()
    # exactly as the daemon writes one (with the CRC-32C of its bytes, none, for `MAGIC`)
    header = _raw_header(magic, 10**6, guess, 0, body, 0 if magic == MAGIC else None)
    forged = bytearray(os.urandom(40_000))  # its bytes start at 64 in the segment
    forged[at - HEADER_SIZE : at - HEADER_SIZE + len(header)] = header  # segment offset `at`
    forged[at : at + len(body)] = body  # its JSON, right after its header (no bytes)
    old = logs.put(log, seg, bytes(forged), {"n": 0})
    log.landed([old])
    log.give_back(seg)
    seg2 = log.take()  # use 2
    assert seg2 is seg
    new = [logs.put(log, seg, os.urandom(3000), {"n": n}) for n in range(2)]
    assert seg.offset == at
    log.close()  # the daemon dies

    _, records = logs.open()
    assert found(records) == found(new), [r.meta for r in records]


# -- review s8: the change's edges ----------------------------------------------------------------


def test_a_window_serves_every_read_and_seek_with_the_bytes_of_its_file(tmp_path: Path) -> None:
    """`_Window` with a head (the first bytes in memory) returns exactly the file's bytes for
    reads inside the head, straddling its end, past it, after seeks past the end, of every
    size, through `read` and `readinto`."""
    import random

    from forwarder.acklog import _Window

    rng = random.Random(8)
    data = os.urandom(200_000)
    path = tmp_path / "w"
    path.write_bytes(b"x" * 100 + data)
    fd = os.open(path, os.O_RDONLY)
    try:
        for head_len in (0, 1, 4095, 65536, len(data)):
            w = _Window(fd, 100, len(data), data[:head_len])
            for _ in range(2000):
                pos = rng.choice(
                    [
                        0,
                        head_len - 1,
                        head_len,
                        head_len + 1,
                        len(data) + 5,
                        rng.randrange(len(data)),
                    ]
                )
                pos = max(0, pos)
                n = rng.choice([-1, 0, 1, 16384, head_len, rng.randrange(1, 70_000)])
                assert w.seek(pos) == pos
                if n < 0 or rng.random() < 0.5:
                    got = w.read(n)
                else:
                    buf = bytearray(max(n, 0))
                    got = bytes(buf[: w.readinto(buf)])
                want = data[pos:] if n < 0 else data[pos : pos + n]
                assert got == want, (head_len, pos, n)
                assert w.tell() == pos + len(want)
    finally:
        os.close(fd)


def _file_with_syntax(path: Path, ds: Any, syntax: str) -> Path:
    """A Part 10 file whose file meta names `syntax` (what pynetdicom's chunked send proposes
    and sends under) and whose data set is `ds` in explicit VR little endian."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    from forwarder.filemeta import file_meta

    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)  # the data set alone, no file meta
    meta = file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax)
    path.write_bytes(meta + body.getvalue())
    return path


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the test SCU's own warning
@pytest.mark.parametrize("way", ["acklog", "direct"])
def test_an_invalid_negotiated_transfer_syntax_gets_c000_on_either_way(
    rcv: Receiving,
    make_scp: Callable[..., SCP],
    corpus: Corpus,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    way: str,
) -> None:
    """A peer proposes (and sends under) a transfer syntax UID that `uid_problem` refuses
    ("not only digits and dots"; pynetdicom only checks its length): 0xC000 on either way.
    The ack log way starts its header walk after the file meta it wrote (`dataset_at`) and
    must still check the syntax: answered 0x0000, the instance would be quarantined by the
    sender ("invalid Transfer Syntax UID") while the modality believes it delivered."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    bad = "1.2.840.10008.1.2.1.x"
    pacs = make_scp()
    rcv.configure_receiving([dest("a", pacs.port)]).start()
    segments = rcv.received_dir / FOLDER
    rcv.wait(lambda: list(segments.glob("*.ack")), 10, "a segment made ahead of need")
    (ds,) = instances(corpus, 1)
    if way == "direct":  # larger than a segment: spilled, inspected from its spool file
        ds.add_new(0x7FE00010, "OB", bytes(17 << 20))
    path = _file_with_syntax(tmp_path / "bad-ts.dcm", ds, bad)
    modality = Modality(rcv.port)
    assoc = modality.associate([str(ds.SOPClassUID)], [bad])
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(path)
        status = int(rsp.Status) if rsp else None
    finally:
        assoc.release()
    assert status == 0xC000, f"answered {status if status is None else hex(status)}"
    assert rcv.stop() == 0


def test_a_reload_that_keeps_the_running_receive_keeps_its_disposal_layout_too(
    rcv: Receiving, make_scp: Callable[..., SCP], corpus: Corpus
) -> None:
    """A reload that keeps the running [receive] (acknowledged instances wait in its ack
    log) keeps it everywhere: the disposer's layout (an instance landed later is archived
    as ``archive/<calling AE>/<uid>.dcm`` like every received one, not at the top) and the
    upkeep's kept folders (with ``on_success = "keep"`` rows of files still there stay)."""
    pacs = make_scp()
    rcv.configure_receiving(
        [dest("a", pacs.port)], disposition={"on_success": "move", "archive_dir": str(rcv.archive)}
    ).start()
    blocker, uid = _one_stuck(rcv, corpus)
    cfg = rcv.config
    cfg["receive"]["dir"] = str(rcv.tmp / "elsewhere")
    rcv.cfg.write_text(to_toml(cfg))
    rcv.signal(signal.SIGHUP)
    rcv.wait_log("reloaded")
    assert "reload keeps the running [receive]" in rcv.text(since_start=True)
    if not blocker.is_dir():
        blocker.unlink(missing_ok=True)
    rcv.wait(lambda: uid in pacs.uids(), 30, "the acknowledged instance")
    rcv.wait(lambda: list(rcv.archive.rglob(f"{uid}*.dcm")), 15, "the instance archived")
    assert rcv.stop() == 0
    assert list(rcv.archive.rglob(f"{uid}*.dcm")) == [rcv.archive / "CT01" / f"{uid}.dcm"]


def test_a_reload_never_strands_what_a_receiver_that_could_not_start_left_in_its_ack_log(
    rcv: Receiving, make_scp: Callable[..., SCP], corpus: Corpus
) -> None:
    """The last run acknowledged an instance and stopped before it was queued (its ack log
    holds the record). This run's receiver cannot start (the port is taken); a reload then
    turns receiving off. The record is queued all the same (a receiver lands what it found
    before it listens), or the reload keeps [receive] and says so: never stranded silently."""
    import socket

    pacs = make_scp()
    rcv.configure_receiving([dest("a", pacs.port)])
    uid = _left_ct(rcv)[1].meta["uid"]
    with socket.create_server(("127.0.0.1", rcv.port)):  # someone else has the port
        Forwarder.start(rcv)
        rcv.wait_log("cannot start the receiver")
    # the operator gives up on receiving here (the port is free again by now)
    cfg = rcv.config
    del cfg["receive"]["listen"]
    rcv.cfg.write_text(to_toml(cfg))
    rcv.signal(signal.SIGHUP)
    rcv.wait_log("reloaded")
    text = rcv.text(since_start=True)
    kept = "reload keeps the running [receive]" in text
    try:
        rcv.wait(lambda: uid in pacs.uids(), 8, "the acknowledged instance")
        arrived = True
    except AssertionError:
        arrived = False
    assert rcv.stop() == 0
    assert kept or arrived, "the acknowledged record is stranded in the old ack log, silently"


def test_records_added_from_many_threads_in_bursts_and_pauses_all_land_promptly(
    logs: Logs, outbox: Outbox, tmp_path: Path
) -> None:
    """The lander is notified only for the first record waiting (and at `MAX_BATCH`): records
    added while it lands, while it gathers (`GATHER`), while it makes a spare segment, or
    just before it waits, must still land, each within a short while."""
    import random
    import time

    log, records = logs.open(outbox.acklog_marks())
    landing = Landing(log, tmp_path / "received", outbox.enqueue_routed, records)
    added = [0]
    lock = threading.Lock()
    late: list[float] = []

    def take() -> Segment:  # as the receiver's `wanted` does: the lander is woken to make one
        def got() -> Segment | None:
            seg = log.take()
            landing.lander.wake()
            return seg

        return wait_for(got, 10)  # type: ignore[no-any-return]

    segs = [take() for _ in range(4)]

    def association(n: int) -> None:
        rng = random.Random(n)
        seg = segs[n]
        for i in range(30):
            rec = logs.put(log, seg, os.urandom(300), {"uid": f"1.2.3.{n}.{i}", "folder": f"A{n}"})
            landing.lander.add(rec)
            with lock:
                added[0] += 1
            if rng.random() < 0.3:  # a pause: what was added lands meanwhile
                want = time.monotonic() + 3.0
                while landing.lander.pending() and time.monotonic() < want:
                    time.sleep(0.005)
                if landing.lander.pending():
                    late.append(time.monotonic())
            else:
                time.sleep(rng.random() * 0.02)
        log.give_back(seg)

    threads = [threading.Thread(target=association, args=(n,)) for n in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        landing.wait_landed(120, timeout=5)
        assert landing.lander.pending() == 0 and log.counts()[1] == 0
    finally:
        landing.stop()
    # pending() waits for the other threads' records too; a pause that saw none land in 3 s
    # is a record waiting for a wake-up that never came
    assert not late, f"{len(late)} pause(s) with records not landed within 3 s"
    assert len(outbox.list(limit=1000)) == 120


def test_a_stop_while_a_batch_gathers_lands_it_and_leaves_nothing_pending(
    logs: Logs, outbox: Outbox, corpus: Corpus, tmp_path: Path
) -> None:
    log, records = logs.open(outbox.acklog_marks())
    landing = Landing(log, tmp_path / "received", outbox.enqueue_routed, records)
    seg = landing.segment(log)
    first = instance(corpus)
    landing.lander.add(logs.put(log, seg, first.data, first.meta))
    landing.wait_landed(1)
    rest = [instance(corpus) for _ in range(3)]
    for inst in rest:  # within GATHER of the last batch: they wait for it to gather
        landing.lander.add(logs.put(log, seg, inst.data, inst.meta))
    assert landing.lander.stop(5)
    assert landing.lander.pending() == 0 and landing.lander.landed == 4
    for inst in [first, *rest]:
        assert_landed(outbox, tmp_path / "received", inst)


# -- review s9: one fdatasync, the bytes' CRC-32C -------------------------------------------------


def test_fragments_of_one_reused_buffer_land_whole_at_every_edge(logs: Logs) -> None:
    """The acceptor hands `AckSink.write` memoryview slices of one buffer it reads every PDU
    into: each record's CRC-32C must be the one of the bytes the scan reads back, for an empty
    instance, one whose JSON ends exactly on a 4 KiB boundary, and one after an instance that
    spilled out of the same room."""
    log, _ = logs.open()
    seg = logs.segment(log)
    buf = bytearray(PIECE)  # one buffer, written over for every fragment

    def put(data: bytes, meta: dict[str, Any], step: int = 16_381) -> Record:
        sink = logs.sink(log, seg)
        for at in range(0, len(data), step):
            piece = data[at : at + step]
            buf[: len(piece)] = piece
            sink.write(memoryview(buf)[: len(piece)])
            buf[: len(piece)] = os.urandom(len(piece))  # the next PDU overwrites it
        rec = sink.commit({**FILLER, **meta})
        assert rec is not None and sink.spilled is None
        return rec

    sent: list[tuple[Record, bytes]] = []
    sent.append((put(b"", {"n": 0}), b""))
    body = len(json.dumps({**FILLER, "n": 1}, separators=(",", ":")).encode())
    size = 3 * 4096 - HEADER_SIZE - body - seg.offset % 4096  # JSON ends on the boundary
    data = os.urandom(size)
    sent.append((put(data, {"n": 1}), data))
    assert seg.offset % 4096 == 0 and seg.offset == sent[-1][0].start + 3 * 4096
    # an instance too large for the room spills; the next one starts where it started
    big = logs.sink(log, seg)
    for _ in range(0, SEGMENT, PIECE):
        big.write(os.urandom(PIECE))
    assert big.spilled is not None
    big.complete()
    big.close()
    big.discard()
    data = os.urandom(100_000)
    sent.append((put(data, {"n": 2}, step=PIECE - 6), data))
    log.close()  # killed: nothing landed

    _, records = logs.open()
    assert found(records) == found([r for r, _ in sent])
    assert [data_of(r) for r in records] == [d for _, d in sent]


def _torn(
    logs: Logs,
    before: bytes,
    after: bytes,
    start: int,
    end: int,
    units: frozenset[int],
    marks: dict[str, int],
) -> list[Record]:
    """The segment as a power loss during one record's ``fdatasync`` may leave it: of the
    512-byte sectors from `start` to `end`, those in `units` reached the disk (`after`), the
    others hold what the disk held before (`before`); then a new run opens it with `marks`."""
    seg_path = logs.dir / sorted(p.name for p in logs.dir.glob("*.ack"))[0]
    image = bytearray(after)
    for n, at in enumerate(range(start, end, 512)):
        if n not in units:
            image[at : at + 512] = before[at : at + 512]
    seg_path.write_bytes(image)
    log = AckLog(logs.dir, segment_size=SEGMENT)
    try:
        return log.open(marks)
    finally:
        log.close()


@pytest.mark.parametrize(
    "reused", ["fresh", "reused", "reused-free-lost"], ids=["fresh", "reused", "free-lost"]
)
@pytest.mark.parametrize("which", [0, 1], ids=["first-record", "second-record"])
def test_a_power_loss_during_the_one_fdatasync_never_lands_other_bytes(
    logs: Logs, reused: str, which: int
) -> None:
    """Whatever sectors of a record reach the disk before the power goes (its header's, its
    bytes', its JSON's; the others hold what was there: zeros, or an earlier use's records
    laid out at the same places; with or without the free header `give_back` wrote over the
    first, never synced), the next scan returns the records answered before it, and the
    record itself only with exactly the bytes sent."""
    import random

    log, _ = logs.open()
    seg = logs.segment(log)
    stale, marks = b"", {}
    if reused != "fresh":  # an earlier use, landed and freed: its headers lie where this use's go
        old = [logs.put(log, seg, os.urandom(9000), {"use": 1, "n": n}) for n in range(3)]
        stale = os.pread(seg.fd, SEGMENT, 0)  # its first header before the free one
        log.landed(old)
        marks = {seg.name: old[-1].seq}  # committed with their outbox rows
        log.give_back(seg)
        seg = logs.retake(log, seg.path)
    sizes = [9000, 9000 + 4096]
    recs: list[Record] = []
    sent: list[bytes] = []
    for n, size in enumerate(sizes[: which + 1]):
        before = os.pread(seg.fd, SEGMENT, 0)
        if reused == "reused-free-lost" and n == 0:
            before = stale  # the free header never reached the disk
        data = os.urandom(size)
        recs.append(logs.put(log, seg, data, {"use": 2, "n": n}))
        sent.append(data)
    after = os.pread(seg.fd, SEGMENT, 0)
    rec = recs[-1]
    start, end = rec.start, seg.offset
    count = (end - start) // 512
    rng = random.Random(9)
    cases = {frozenset(range(count))}  # all of it: the record is whole
    cases |= {frozenset(range(count)) - {n} for n in range(count)}  # one sector missing
    cases |= {frozenset({n}) for n in range(count)}  # one sector there
    cases |= {frozenset(range(n)) for n in range(count)}  # a prefix
    cases |= {frozenset(n for n in range(count) if rng.random() < 0.5) for _ in range(60)}
    log.close()

    for units in sorted(cases, key=sorted):
        records = _torn(logs, before, after, start, end, units, marks)
        got = {r.seq for r in records}
        assert set(got) <= {r.seq for r in recs}, f"stale records came back ({sorted(units)})"
        with (logs.dir / rec.segment.name).open("rb") as f:
            for r, data in zip(recs, sent, strict=True):
                f.seek(r.data_offset)
                if r is not rec:  # answered before the power went: found, whole
                    assert r.seq in got, f"answered record {r.seq} lost ({sorted(units)})"
                if r.seq in got:
                    assert f.read(r.size) == data, f"torn bytes landed ({sorted(units)})"
        if len(units) == count:
            assert rec.seq in got


@pytest.mark.parametrize("damage", [_flip_data, _old_block], ids=["bytes-damaged", "torn"])
def test_an_acknowledged_record_damaged_on_the_disk_is_said_and_the_next_ones_still_land(
    logs: Logs, damage: Callable[[Record], None], caplog: pytest.LogCaptureFixture
) -> None:
    """A crash leaves at most its last record torn, with nothing after it. A record whose
    bytes fail their CRC while whole records of the same use follow was answered and damaged
    afterwards (the disk): it cannot be queued, and the log says which instance must be sent
    again; the records after it are still landed (the scan used to stop there and free the
    segment over them, without a word: review s9)."""
    log, _ = logs.open()
    seg = logs.segment(log)
    meta = [{"uid": f"1.2.3.{n}", "calling_aet": "CT01"} for n in range(3)]
    recs = [logs.put(log, seg, os.urandom(20_000), m) for m in meta]
    damage(recs[0])  # one block of an answered record's bytes rots
    log.close()

    caplog.set_level(logging.WARNING, logger="forwarder")
    again, records = logs.open()
    assert found(records) == found(recs[1:])
    assert [data_of(r) for r in records] == [data_of(r) for r in recs[1:]]
    assert again.counts() == (1, 2)  # held for the two, not freed over them
    said = [r for r in caplog.records if seg.name in r.getMessage()]
    assert [r.levelname for r in said] == ["ERROR"], caplog.text
    assert f"record {recs[0].seq} (1.2.3.0 from CT01)" in said[0].getMessage()
    assert "sent again" in said[0].getMessage()
