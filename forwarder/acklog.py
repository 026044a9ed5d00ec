"""The ack log: a received instance is made durable with one write before it is acknowledged.

One association is strictly serial: the modality waits for each answer before it sends the
next instance, so every durable write before the answer is paid by every instance. Writing an
instance to a file of its own, linking it into place and committing its outbox rows costs
three (the file's fsync, its folder's, SQLite's WAL), each a journal commit of the file system.
The ack log costs one ``fdatasync`` over blocks that are already allocated, which does not
need the file system's journal at all.

- **Segments.** ``<receive.dir>/.acklog/NNNNNNNN.ack``: files of `SEGMENT_SIZE` bytes, filled
  with zeros once when they are made (the `Lander` thread makes them ahead of need), then
  written over again and again. An association takes a free segment and is its only writer
  until it gives it back (the association ends, or the segment has under `ROOM` bytes left).
- **Records.** An instance's bytes (file meta and data set, exactly the file it becomes) are
  written into the segment as they arrive, and their CRC-32C computed meanwhile; then a small
  JSON record of what the receiver decided (its folder, UIDs, destinations) and the header
  before them (magic, sequence number, the segment's epoch: a random number drawn for each
  use of it, lengths, the bytes' CRC-32C, a CRC-32 of the header and the JSON); one
  ``fdatasync``; then the instance is answered 0x0000. A crash during that ``fdatasync`` may
  leave the header on the disk and not all the bytes: the bytes' CRC tells (such a record was
  never answered; one the disk damaged after its answer is passed over the same way, with an
  error naming the instance). A record the daemon did not finish has no valid header, and a
  record from the segment's earlier use has another epoch: a scan stops at either. (The CRC-32C is
  computed in hardware, ~0.03 ms per 512 KB, while the next fragment arrives; a second
  ``fdatasync`` before the header, as earlier versions did, costs ~0.2 ms before every
  answer, and zlib's CRC-32 ~0.17 ms.)
- **Landing.** The `Lander` thread then does what the receiver used to do before the answer,
  for many records at once: it makes each record's file in ``<dir>/<calling AE>/`` (never
  over another file), fsyncs the files and their folders, and commits their outbox rows
  together with the segment's mark (table ``acklog``: the last record landed) in one
  transaction. A segment given back with every record landed is free again. In a burst a
  batch gathers for `GATHER` seconds after the last one ended: every fsync of the lander is a
  journal commit and a flush of the disk's cache, which the associations' own flushes wait
  behind. It also keeps `SPARE` free segments made ahead of need.
- **Restart.** `AckLog.open` scans every segment for records after its mark; the lander lands
  them before anything else. A file made but not committed has no outbox row: the receiver's
  sweep removes it first, and its record makes it again.

An instance that does not fit (larger than what its segment has left), or that arrives while
no segment is free or landing fails (a full disk, an outbox that cannot be written), is
written the direct way, to a file of its own committed before the answer: slower, never
wrong. The log is bounded: at most `MAX_SEGMENTS` segments.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import secrets
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final, Protocol, cast

import crc32c

from forwarder.dicomfile import DicomInfo
from forwarder.filing import fsync_dir
from forwarder.outbox import OutboxCorruptError, OutboxError

__all__ = [
    "FOLDER",
    "AckLog",
    "AckSink",
    "Lander",
    "Record",
    "Segment",
]

LOGGER = logging.getLogger("forwarder.receiver")

FOLDER = ".acklog"
"""The folder of `receive.dir` that holds the segments."""
SUFFIX = ".ack"
CLAIM_POLL = 0.05
SEGMENT_SIZE = 16 << 20
ROOM = 4 << 20
"""A segment with less room than this left is given back before the next instance starts."""
MAX_SEGMENTS = 64
"""At most this many segments (1 GiB): with none free, instances are written the direct way."""
KEEP_FREE = 4
"""Free segments kept beyond those the associations hold now; the others are removed."""
SPARE = 2
"""Free segments the lander keeps made ahead: an association that fills its segment takes
the next at once, instead of writing instances the direct way while one is made."""
MAGIC = b"FWDACK02"
"""A record's header; it carries the CRC-32C of the record's bytes."""
MAGIC_V1 = b"FWDACK01"
"""A record's header as earlier versions wrote it: no CRC of the bytes (they were synced
before the header was written). Such records, left by an upgrade, are still landed."""
FREE = b"FWDFREE1"
"""The first header of a free segment: no record starts there, and it carries the sequence
number reached when the segment was freed, so that numbering goes on from there even when the
outbox's marks are gone (an outbox made anew)."""
_FIELDS = struct.Struct("<8sQQQII")  # magic, seq, epoch, data length, meta length, data CRC
_FIELDS_V1 = struct.Struct("<8sQQQI")  # the same without the data CRC (`MAGIC_V1`, `FREE`)
_CRC = struct.Struct("<I")
HEADER_SIZE = 64
ALIGN = 4096
META_ROOM = 1 << 16
"""Room kept after an instance's bytes for its record (a larger record goes the direct way)."""
CHUNK = 1 << 20
HEAD = 1 << 16
"""The first bytes of an instance kept in memory as they are written: the header walk before
the answer reads them there (the UIDs and the attributes routing names come early)."""
WRITEBACK_MIN = 1 << 16
"""A fragment this large has its writeback started as soon as it is written."""
MAX_BATCH = 256
"""Records landed in one transaction at most."""
MAX_BATCH_BYTES = 64 << 20
PREPARE_BACKOFF = 30.0
"""Seconds before a segment that could not be made (a full disk) is tried again."""
GATHER = 0.05
"""Seconds a batch gathers records after the last one ended (a burst). The lander's fsyncs
are journal commits and device flushes; fewer of them keep the flushes an association waits
for before each answer short (1000 CT over one association: 2.5 -> 2.1 s)."""
RETRY_FIRST, RETRY_MAX = 1.0, 30.0
"""Seconds before landing is tried again after a failure, doubling up to the second."""


def _header(
    magic: bytes, seq: int, epoch: int, size: int, body: bytes = b"", data_crc: int | None = None
) -> bytes:
    """A header of `HEADER_SIZE` bytes: its fields (with `data_crc`, the CRC-32C of the
    record's bytes, unless None: `FREE` and `MAGIC_V1` headers) and the CRC-32 of them and of
    `body` (the record's JSON; none for a `FREE` header)."""
    if data_crc is None:
        fields = _FIELDS_V1.pack(magic, seq, epoch, size, len(body))
    else:
        fields = _FIELDS.pack(magic, seq, epoch, size, len(body), data_crc)
    header = fields + _CRC.pack(zlib.crc32(fields, zlib.crc32(body)))
    return header + bytes(HEADER_SIZE - len(header))


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(eq=False)
class Segment:
    """One segment file, open for reading and writing while the daemon runs."""

    path: Path
    fd: int
    size: int
    epoch: int = 0  # a random number drawn when its current use began
    offset: int = 0  # where its next record goes (its owner's)
    pending: int = 0  # records acknowledged and not landed yet (under the log's lock)
    owned: bool = False
    broken: bool = False  # a write or fdatasync failed: never written again

    @property
    def name(self) -> str:
        return self.path.name

    def room(self) -> int:
        return self.size - self.offset


@dataclass(frozen=True, eq=False)
class Record:
    """An acknowledged instance in a segment: its bytes start at ``start + HEADER_SIZE``."""

    segment: Segment
    start: int
    seq: int
    size: int
    meta: Mapping[str, Any]

    @property
    def data_offset(self) -> int:
        return self.start + HEADER_SIZE


class _Window(io.RawIOBase):
    """`size` bytes of a file descriptor from `base`, as a seekable read-only stream; the
    first bytes are served from `head` (the same bytes, kept in memory) when it has them."""

    def __init__(self, fd: int, base: int, size: int, head: bytes = b"") -> None:
        super().__init__()
        self._fd, self._base, self._size, self._pos = fd, base, size, 0
        self._head = head

    def read(self, n: int = -1) -> bytes:
        left = self._size - self._pos
        n = left if n < 0 else min(n, left)
        if n <= 0:
            return b""
        pos = self._pos
        if pos + n <= len(self._head):
            data = self._head[pos : pos + n]
        else:
            data = os.pread(self._fd, n, self._base + pos)
        self._pos += len(data)
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        start = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, start + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class AckLog:
    """The segments under `directory`: who writes where, and which are free."""

    def __init__(
        self,
        directory: Path,
        *,
        segment_size: int = SEGMENT_SIZE,
        max_segments: int = MAX_SEGMENTS,
        wanted: Callable[[], None] = lambda: None,
    ) -> None:
        self.dir = directory
        self.segment_size = segment_size
        self.max_segments = max_segments
        self._wanted = wanted  # asks the lander to make a segment
        self._lock = threading.Lock()
        self._segments: dict[str, Segment] = {}
        self._free: list[Segment] = []
        self._seq = 0
        self._serial = 0
        self._want = False
        self._unable_until = 0.0  # a segment could not be made: not before then again
        self._claimed: int | None = None  # the fd of `dir` that holds its flock
        self.unable: str | None = None

    # -- start and end -------------------------------------------------------------------

    def claim(self, wait: float = 0.0) -> None:
        """Own the segments until `close` (an ``flock`` on `dir` itself: no file to make on a
        full disk), before the marks they are opened with are read: another AckLog on them
        (a receiver still stopping after a reload, its lander or an association not ended
        yet; another daemon) would land their records a second time, or free a segment it
        still writes. Waits up to `wait` seconds for the other one to close; raises OSError
        (EBUSY when it has not)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        deadline = time.monotonic() + wait
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise OSError(
                            errno.EBUSY,
                            "still used by a receiver that is stopping, or by another daemon",
                            str(self.dir),
                        ) from None
                time.sleep(CLAIM_POLL)
        except BaseException:
            os.close(fd)
            raise
        self._claimed = fd

    def open(self, marks: Mapping[str, int]) -> list[Record]:
        """Open the segments the last run left (`marks`: the outbox's ``acklog_marks``);
        returns their records not landed yet, oldest first. Raises OSError."""
        self.dir.mkdir(parents=True, exist_ok=True)
        found: list[Record] = []
        empty: list[Segment] = []
        top = max(marks.values(), default=0)
        for entry in sorted(os.scandir(self.dir), key=lambda e: e.name):
            if not entry.name.endswith(SUFFIX) or not entry.is_file(follow_symlinks=False):
                if entry.name.endswith(".tmp"):  # being made when the daemon stopped
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                continue
            with contextlib.suppress(ValueError):
                self._serial = max(self._serial, int(entry.name.removesuffix(SUFFIX)))
            fd = os.open(entry.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            seg = Segment(Path(entry.path), fd, os.fstat(fd).st_size)
            records, highest = scan(seg, marks.get(seg.name, 0))
            top = max(top, highest)
            self._segments[seg.name] = seg
            seg.pending = len(records)
            found += records
            if not records:
                empty.append(seg)
        self._seq = top
        for seg in empty:  # once `_seq` is known: their free headers carry it
            self._release(seg)
        self._want = len(self._free) < SPARE  # the lander makes them before the first association
        found.sort(key=lambda r: r.seq)
        return found

    def close(self) -> None:
        with self._lock:
            for seg in self._segments.values():
                with contextlib.suppress(OSError):
                    os.close(seg.fd)
            self._segments.clear()
            self._free.clear()
            if self._claimed is not None:
                os.close(self._claimed)  # lets the flock go
                self._claimed = None

    # -- associations --------------------------------------------------------------------

    def take(self) -> Segment | None:
        """A free segment for an association to write into, or None (none free: the lander is
        asked for one, and the instance is written the direct way)."""
        with self._lock:
            seg = self._free.pop() if self._free else None
            if seg is not None:
                # random, not counted: bytes a modality sent, left in the segment by an earlier
                # use, can then never hold a header of this use (they would have to foresee it)
                seg.epoch, seg.offset, seg.owned = secrets.randbits(63), 0, True
            want = len(self._free) < SPARE and time.monotonic() >= self._unable_until
            if want and len(self._segments) < self.max_segments:
                self._want = True
            else:
                want = False
        if want:
            self._wanted()
        return seg

    def give_back(self, seg: Segment) -> None:
        """The association is done with `seg`: free once its records are landed."""
        with self._lock:
            seg.owned = False
            if seg.pending == 0:
                self._release(seg)

    def next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def added(self, seg: Segment) -> None:
        with self._lock:
            seg.pending += 1

    def landed(self, records: Iterable[Record]) -> None:
        with self._lock:
            for rec in records:
                seg = rec.segment
                seg.pending -= 1
                if seg.pending == 0 and not seg.owned:
                    self._release(seg)

    def _release(self, seg: Segment) -> None:
        """`seg` holds nothing to land: free it, or remove it (under the lock, or at open).

        Its first header becomes a `FREE` one (not synced: the outbox's mark is what counts),
        so that an outbox made anew never sees the old records."""
        if seg.name not in self._segments:
            return
        owned = sum(1 for s in self._segments.values() if s.owned)
        if not seg.broken:
            try:
                os.pwrite(seg.fd, _header(FREE, self._seq, 0, 0), 0)
            except OSError:
                seg.broken = True
        if seg.broken or len(self._free) >= KEEP_FREE + owned:
            del self._segments[seg.name]
            with contextlib.suppress(OSError):
                os.close(seg.fd)
            with contextlib.suppress(OSError):
                os.unlink(seg.path)
            return
        self._free.append(seg)  # `take` starts its next use at offset 0

    # -- the lander's side ---------------------------------------------------------------

    def wants(self) -> bool:
        with self._lock:
            return self._want

    def prepare(self) -> None:
        """Make one segment (zeros written and synced, then renamed into place), when one was
        asked for (fewer than `SPARE` free; asked again while still fewer). A failure (a full
        disk) is logged once and not tried again for a while."""
        with self._lock:
            self._want = False
            if len(self._free) >= SPARE or len(self._segments) >= self.max_segments:
                return
            self._serial += 1
            name = f"{self._serial:08d}{SUFFIX}"
        final = self.dir / name
        tmp = final.with_name(name + ".tmp")
        fd = -1
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            zeros = bytes(CHUNK)
            for at in range(0, self.segment_size, CHUNK):
                _pwrite_all(fd, zeros[: min(CHUNK, self.segment_size - at)], at)
            os.fsync(fd)
            os.rename(tmp, final)
            fsync_dir(self.dir)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            with self._lock:
                self._unable_until = time.monotonic() + PREPARE_BACKOFF
                first = self.unable is None
                self.unable = f"cannot make an ack log segment in {self.dir}: {exc.strerror or exc}"
            if first:
                LOGGER.warning(
                    f"receive: {self.unable}; instances are written one file each (slower) "
                    f"until there is room"
                )
            return
        with self._lock:
            seg = Segment(final, fd, self.segment_size)
            self._segments[name] = seg
            self._free.append(seg)
            self._want = len(self._free) < SPARE and len(self._segments) < self.max_segments
            if self.unable is not None:
                LOGGER.info(f"receive: ack log segments can be made again in {self.dir}")
            self.unable = None

    def counts(self) -> tuple[int, int]:
        """(segments, records acknowledged and not landed)."""
        with self._lock:
            return len(self._segments), sum(s.pending for s in self._segments.values())


def scan(seg: Segment, mark: int) -> tuple[list[Record], int]:
    """The records of `seg` after `mark`, and the highest sequence number it shows (of its
    current use, or the one it was freed at).

    Reads from the start: the first record gives the epoch; the scan stops at the first header
    that is not a record, whose CRC fails, or that belongs to another epoch. A record whose
    header holds and whose bytes fail their CRC is passed over with a line in the log: either
    a crash cut its one ``fdatasync`` short (it was never answered, and nothing of its use
    follows it), or the disk damaged it after it was answered (whole records follow it).
    """
    out: list[Record] = []
    failed: list[tuple[int, Mapping[str, Any]]] = []  # bytes that fail their CRC
    pos, epoch, last, highest = 0, -1, -1, 0
    while pos + HEADER_SIZE <= seg.size:
        head = os.pread(seg.fd, HEADER_SIZE, pos)
        if len(head) < HEADER_SIZE:
            break
        start, (magic, seq, ep, size, meta_len) = pos, _FIELDS_V1.unpack_from(head)
        # a header is valid when it is the one `_header` makes of its fields (CRC included)
        if pos == 0 and head == _header(FREE, seq, 0, 0):
            return [], seq  # freed at that number: nothing to land
        end = pos + HEADER_SIZE + size + meta_len
        if magic not in (MAGIC, MAGIC_V1) or end > seg.size or meta_len > META_ROOM:
            break
        if epoch < 0:
            epoch = ep
        if ep != epoch or seq <= last:
            break
        body = os.pread(seg.fd, meta_len, end - meta_len)
        data_crc = _FIELDS.unpack_from(head)[5] if magic == MAGIC else None
        if head != _header(magic, seq, ep, size, body, data_crc):
            break
        try:
            meta = json.loads(body)
        except ValueError:
            break
        if not _meta_ok(meta):  # written by this module: only another version could do this
            LOGGER.error(f"{seg.path}: record {seq} is not one this version can queue; left there")
            break
        last, highest = seq, max(highest, seq)
        pos = _aligned(end)
        if seq <= mark:  # landed whole: its bytes are not read again
            continue
        if data_crc is not None and _crc(seg.fd, start + HEADER_SIZE, size) != data_crc:
            failed.append((seq, meta))
            continue
        out.append(Record(seg, start, seq, size, meta))
    for seq, meta in failed:
        what = f"{seg.path}: record {seq} ({meta['uid']} from {meta.get('calling_aet', '?')})"
        if any(r.seq > seq for r in out):
            LOGGER.error(
                f"{what} was acknowledged and its bytes are damaged on the disk (their CRC "
                f"fails); not queued: that instance must be sent again"
            )
        else:
            LOGGER.warning(
                f"{what}: its bytes fail their CRC (a crash cut its write short before it was "
                f"acknowledged, or the disk damaged it); not queued"
            )
    return out, highest


def _crc(fd: int, at: int, size: int) -> int:
    """The CRC-32C of `size` bytes of `fd` from `at` (OSError when they cannot be read)."""
    crc = 0
    for start in range(at, at + size, CHUNK):
        crc = crc32c.crc32c(os.pread(fd, min(CHUNK, at + size - start), start), crc)
    return crc


_META_TYPES: Final = {
    "folder": str,
    "uid": str,
    "sop_class": str,
    "ts": str,
    "offset": int,
    "to": list,
}


def _meta_ok(meta: object) -> bool:
    """Is `meta` a record the lander can land (its folder a plain name of `dir`)?"""
    if not isinstance(meta, dict):
        return False
    if not all(isinstance(meta.get(k), t) for k, t in _META_TYPES.items()):
        return False
    folder, uid = meta["folder"], meta["uid"]
    names_ok = "/" not in folder + uid and folder not in ("", ".", "..") and uid
    return bool(meta["to"] and names_ok)


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, at: int) -> None:
    view = memoryview(data)
    try:
        while view:
            n = os.pwrite(fd, view, at)
            view, at = view[n:], at + n
    finally:
        view.release()


class _Spool(Protocol):
    """What `AckSink` hands an instance to when it does not fit: a `receiver.SpoolFile`."""

    name: str
    error: OSError | None
    invalid: str | None
    size: int

    def write(self, data: bytes | bytearray | memoryview) -> int: ...
    def complete(self) -> None: ...
    def sync(self) -> None: ...
    def close(self) -> None: ...
    def discard(self) -> None: ...


class AckSink:
    """Where a data set is written while it arrives, when its association holds a segment.

    Like `receiver.SpoolFile` (``write``, ``complete``, ``close``, ``discard``; a write error
    is kept, not raised), plus `commit`. Each fragment is written as it comes (a PDU's
    worth). When the instance outgrows the segment's room it is
    moved to a spool file made by `spill` (`spilled` is then that file) and goes on there.
    """

    def __init__(self, log: AckLog, segment: Segment, spill: Callable[[], _Spool]) -> None:
        self.log = log
        self.segment = segment
        self.start = segment.offset
        self.error: OSError | None = None
        self.invalid: str | None = None
        self.size = 0
        self.spilled: _Spool | None = None
        self._spill = spill
        self._limit = segment.size - self.start - HEADER_SIZE - META_ROOM  # bytes that fit
        self._head = bytearray()  # the first `HEAD` bytes, for `stream`
        self._crc = 0  # of the bytes written, for the header
        self.dataset_at: tuple[int, str] | None = None  # set by whoever writes the file meta

    @property
    def name(self) -> str:
        return self.spilled.name if self.spilled is not None else str(self.segment.path)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.spilled is None and self.error is None and self.size + len(data) > self._limit:
            self.spill()
        if self.spilled is not None:
            return self.spilled.write(data)
        if self.error is None:
            at = self.start + HEADER_SIZE + self.size
            if self.size < HEAD:
                self._head += data[: HEAD - self.size]
            try:
                _pwrite_all(self.segment.fd, data, at)
                if len(data) >= WRITEBACK_MIN:
                    # start writing it to the disk now, while the next fragment arrives: the
                    # fdatasync before the answer then waits for the last one only (dirty
                    # pages are not dropped by this advice, only clean ones)
                    os.posix_fadvise(self.segment.fd, at, len(data), os.POSIX_FADV_DONTNEED)
                # here, while the peer sends the next fragment: only the last one's CRC is
                # computed while the peer waits for the answer
                self._crc = crc32c.crc32c(data, self._crc)
            except OSError as exc:
                self.error = exc
                self.segment.broken = True
            self.size += len(data)
        return len(data)

    def spill(self) -> _Spool:
        """Move what has arrived to a spool file (`spill`), and write the rest there."""
        if self.spilled is not None:
            return self.spilled
        spool = self._spill()
        if self.error is not None:
            spool.error = self.error
        fd, base = self.segment.fd, self.start + HEADER_SIZE
        try:
            for at in range(0, self.size, CHUNK):
                spool.write(os.pread(fd, min(CHUNK, self.size - at), base + at))
        except OSError as exc:
            spool.error = spool.error or exc
        spool.invalid = self.invalid
        self.spilled = spool
        return spool

    def complete(self) -> None:
        """Raises the first write error (OSError)."""
        if self.spilled is not None:
            self.spilled.complete()
        elif self.error is not None:
            raise self.error

    def stream(self) -> BinaryIO:
        """The instance's bytes, to read (after `complete`)."""
        # unbuffered: `dicomfile.Reader` reads in chunks of its own
        base = self.start + HEADER_SIZE
        return cast(BinaryIO, _Window(self.segment.fd, base, self.size, bytes(self._head)))

    def commit(self, meta: Mapping[str, Any]) -> Record | None:
        """Write `meta` and the header, ``fdatasync``: the instance is durable and may be
        answered. Returns its record, or None when `meta` does not fit (then `spill` it).

        Raises OSError (the segment is not written again)."""
        self.complete()
        body = json.dumps(meta, separators=(",", ":")).encode()
        if len(body) > META_ROOM:
            return None
        seg = self.segment
        seq = self.log.next_seq()
        data_end = self.start + HEADER_SIZE + self.size
        header = _header(MAGIC, seq, seg.epoch, self.size, body, self._crc)
        try:
            _pwrite_all(seg.fd, body, data_end)
            _pwrite_all(seg.fd, header, self.start)
            # one flush for all: a crash during it may leave the header and not all the bytes,
            # and the CRC of the bytes then tells `scan` (it was never answered)
            os.fdatasync(seg.fd)
        except OSError:
            seg.broken = True
            raise
        seg.offset = _aligned(data_end + len(body))
        self.log.added(seg)
        return Record(seg, self.start, seq, self.size, dict(meta))

    def sync(self) -> None:
        if self.spilled is not None:
            self.spilled.sync()

    def close(self) -> None:
        if self.spilled is not None:
            self.spilled.close()

    def discard(self) -> None:
        """Forget the instance: its room in the segment is written over by the next one."""
        if self.spilled is not None:
            self.spilled.discard()


Routed = tuple[DicomInfo, Sequence[str]]


@dataclass
class _Made:
    record: Record
    path: Path
    fd: int


class Lander:
    """The thread that lands acknowledged records (see the module docstring).

    `enqueue` is the outbox's ``enqueue_routed``; `folder` makes (once, durably) and returns
    a calling AE's folder; `queued` wakes the workers. Landing that fails (a full disk, an
    outbox that cannot be written) is tried again after 1 s, 2 s ... 30 s; meanwhile
    `failing` says why, and the receiver writes new instances the direct way.
    """

    def __init__(
        self,
        log: AckLog,
        *,
        enqueue: Callable[[Sequence[Routed], float, Mapping[str, int]], int],
        folder: Callable[[str], Path],
        queued: Callable[[], None],
        damaged: Callable[[str, OutboxCorruptError], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.log = log
        self._enqueue = enqueue
        self._folder = folder
        self._queued = queued
        self._damaged = damaged
        self._clock = clock
        self._cond = threading.Condition()
        self._todo: deque[Record] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._retry_at = 0.0
        self._backoff = 0.0
        self._last_end = -GATHER  # monotonic time the last batch ended
        self._landing = 0  # records in the batch being landed (`landing`)
        self.failing: str | None = None
        self.landed = 0  # records landed by this run (tests and status)

    def start(self, records: Iterable[Record] = ()) -> None:
        with self._cond:
            self._todo.extend(records)
        self._thread = threading.Thread(target=self._run, name="receiver-lander", daemon=True)
        self._thread.start()

    def add(self, record: Record) -> None:
        with self._cond:
            self._todo.append(record)
            # with records waiting already, the lander is landing, or waits for a batch to
            # gather: it looks again by itself (waking it for each record costs the
            # association its thread switch and the GIL)
            if len(self._todo) == 1 or len(self._todo) == MAX_BATCH:
                self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    @property
    def landing(self) -> int:
        """Records in the batch being landed now."""
        with self._cond:
            return self._landing

    def pending(self) -> int:
        """Records acknowledged and not queued yet: waiting, or in the batch being landed."""
        with self._cond:
            return len(self._todo) + self._landing

    def stop(self, timeout: float) -> bool:
        """Land what is waiting (one try), then end; False when the thread has not ended
        within `timeout` (a disk that hangs, a long backlog): it goes on landing then, and
        `join` waits for it. What is left is landed at the next start."""
        with self._cond:
            self._stopping = True
            self._retry_at = 0.0
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
            self._thread = None
        return True

    def join(self) -> None:
        """Wait for the thread to end (after `stop`), however long that takes."""
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    start = self._start()
                    due = self._todo and now >= start
                    if due or self._stopping or self.log.wants():
                        break
                    self._cond.wait(start - now if self._todo else None)
                stopping = self._stopping
                batch = self._batch() if due or stopping else []
                self._landing = len(batch)
            if batch:  # before a spare segment: landing is what a destination waits for
                self._try(batch)
                self._last_end = time.monotonic()
            if self.log.wants() and not stopping:
                self.log.prepare()
            if stopping:
                with self._cond:
                    if not self._todo or self.failing is not None:
                        return

    def _start(self) -> float:
        """When the records waiting are to be landed: after a failure, its retry time; in a
        burst (the last batch ended moments ago), once the batch has gathered (`GATHER`);
        else now. Under the condition's lock."""
        if len(self._todo) >= MAX_BATCH:
            return self._retry_at
        return max(self._retry_at, self._last_end + GATHER)

    def _batch(self) -> list[Record]:
        batch: list[Record] = []
        size = 0
        while self._todo and len(batch) < MAX_BATCH and size < MAX_BATCH_BYTES:
            rec = self._todo.popleft()
            batch.append(rec)
            size += rec.size
        return batch

    def _try(self, batch: list[Record]) -> None:
        try:
            self._land(batch)
        except Exception as exc:  # put back and tried again, whatever it was: never ends the thread
            with self._cond:
                self._todo.extendleft(reversed(batch))
                self._landing = 0
                self._backoff = min(RETRY_MAX, max(RETRY_FIRST, self._backoff * 2))
                self._retry_at = time.monotonic() + self._backoff
                why = _why(exc)
                first = self.failing != why
                self.failing = why
            if isinstance(exc, OutboxCorruptError):
                self._damaged("receiver", exc)
            if first:
                expected = isinstance(exc, OSError | OutboxError)
                head = batch[0]
                (LOGGER.error if expected else LOGGER.exception)(
                    f"receive: {len(batch)} acknowledged instance(s) cannot be queued yet: {why} "
                    f"(the first: {head.meta['uid']} from {head.meta.get('calling_aet', '?')}, "
                    f"record {head.seq} of {head.segment.path}); trying again in "
                    f"{self._backoff:g} s (new instances are written the direct way meanwhile)"
                )
            return
        self.log.landed(batch)
        with self._cond:
            self._landing = 0
            if self.failing is not None:
                LOGGER.info("receive: acknowledged instances are queued again")
            self.failing, self._backoff = None, 0.0
            self.landed += len(batch)
        self._queued()

    def _land(self, batch: list[Record]) -> None:
        """Make the batch's files, sync them, commit their rows and marks: all or none."""
        made: list[_Made] = []
        try:
            for rec in batch:
                folder = self._folder(str(rec.meta["folder"]))
                fd, path = _create(folder, str(rec.meta["uid"]))
                made.append(_Made(rec, path, fd))
                _copy(rec.segment.fd, rec.data_offset, fd, rec.size)
                # start its writeback now: the fsyncs below then find it done, and the first
                # one's journal commit carries every file's blocks
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            for m in made:
                os.fsync(m.fd)
            for folder in dict.fromkeys(m.path.parent for m in made):
                fsync_dir(folder)
            routed: list[Routed] = []
            marks: dict[str, int] = {}
            for m in made:
                meta, st = m.record.meta, os.fstat(m.fd)
                info = DicomInfo(
                    path=m.path,
                    size=st.st_size,
                    mtime_ns=st.st_mtime_ns,
                    sop_class_uid=str(meta["sop_class"]),
                    sop_instance_uid=str(meta["uid"]),
                    transfer_syntax=str(meta["ts"]),
                    study_uid=meta.get("study"),
                    dataset_offset=int(meta["offset"]),
                )
                routed.append((info, [str(d) for d in meta["to"]]))
                seg = m.record.segment.name
                marks[seg] = max(marks.get(seg, 0), m.record.seq)
            self._enqueue(routed, self._clock(), marks)
        except BaseException:
            for m in made:
                with contextlib.suppress(OSError):
                    os.unlink(m.path)
            raise
        finally:
            for m in made:
                with contextlib.suppress(OSError):
                    os.close(m.fd)


def _create(folder: Path, uid: str) -> tuple[int, Path]:
    """A new file ``<uid>.dcm`` in `folder`, or ``<uid>.1.dcm`` ... when taken: never another's."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    for n in range(100000):
        path = folder / (f"{uid}.dcm" if n == 0 else f"{uid}.{n}.dcm")
        try:
            return os.open(path, flags, 0o644), path
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, "no free name", str(folder / uid))


def _copy(src: int, offset: int, dst: int, size: int) -> None:
    """`size` bytes of `src` from `offset` to `dst` (at its start), in the kernel."""
    done = 0
    while done < size:
        try:
            n = os.copy_file_range(src, dst, size - done, offset + done, done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = 0
        if n == 0:  # not supported here, or a short source: copy it ourselves
            data = os.pread(src, min(CHUNK, size - done), offset + done)
            if not data:
                raise OSError(errno.EIO, "ack log record shorter than its header says")
            _pwrite_all(dst, data, done)
            n = len(data)
        done += n


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return f"cannot write to disk: {exc.strerror or exc}"
    if isinstance(exc, OutboxError):
        return f"outbox unavailable: {exc}"
    return f"internal error: {exc!r}"
