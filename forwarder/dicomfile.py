"""Inspect a DICOM file without decoding it: UIDs, transfer syntax, and whether it is complete."""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "BadUID",
    "DicomInfo",
    "InvalidDicom",
    "MissingUID",
    "NotDicom",
    "Truncated",
    "escape_bytes",
    "inspect",
    "locate",
    "uid_problem",
]

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory: not a storage instance

_SOP_CLASS = 0x00080016
_SOP_INSTANCE = 0x00080018
_STUDY = 0x0020000D
_META_SOP_CLASS = 0x00020002
_META_SOP_INSTANCE = 0x00020003
_META_TS = 0x00020010
_WANTED = frozenset({_SOP_CLASS, _SOP_INSTANCE, _STUDY})

_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
# Explicit VRs with a 2-byte reserved field and a 4-byte length
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_ALL_VRS = _LONG_VRS | frozenset(
    {
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
        b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    }
)  # fmt: skip
_MAX_DEPTH = 64
_EXPLICIT_LE = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length
_IMPLICIT_LE = struct.Struct("<HHL")  # group, element, 32-bit length
_UL_LE = struct.Struct("<L")


class InvalidDicom(ValueError):
    """The file cannot be sent as it is; ``reason`` is one line for the operator."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class NotDicom(InvalidDicom):
    """Not a DICOM file (no DICM marker and no recognisable data set)."""


class Truncated(InvalidDicom):
    """The encoded lengths run past the end of the file: still being written, or cut short."""


class MissingUID(InvalidDicom):
    """SOP Class UID or SOP Instance UID is missing."""


class BadUID(InvalidDicom):
    """A Transfer Syntax, SOP Class or SOP Instance UID that no peer can be sent."""


@dataclass(frozen=True)
class DicomInfo:
    """What the sender needs to know about one file, read from its header only."""

    path: Path
    size: int
    mtime_ns: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    study_uid: str | None
    dataset_offset: int  # where the data set starts (after preamble and file meta)


class _Reader:
    """Walks encoded elements by their lengths, skipping over values it does not need.

    The file is read in chunks of `CHUNK` bytes and walked in memory: a value is skipped by
    moving a position, so a header costs a slice and an unpack, and the pixel data of an image
    (past the chunk) is never read. Reading with a seek per element cost ~100 lseek calls
    per file.
    """

    CHUNK = 16384

    def __init__(self, fp: BinaryIO, path: Path, end: int) -> None:
        self.fp = fp
        self.path = path
        self.end = end
        self.pos = 0
        self._buf = b""
        self._base = 0  # file offset of _buf[0]

    def peek(self, n: int) -> bytes:
        """Up to `n` bytes at the position, without moving it (fewer at the end of the file)."""
        off = self.pos - self._base
        if off < 0 or off + n > len(self._buf):
            self.fp.seek(self.pos)
            self._buf = self.fp.read(max(n, self.CHUNK))
            self._base = self.pos
            off = 0
        return self._buf[off : off + n]

    def read(self, n: int) -> bytes:
        data = self.peek(n)
        if len(data) != n:
            raise Truncated(
                self.path, f"file ends inside an element at byte {self.pos + len(data)}"
            )
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        pos = self.pos + n
        if pos > self.end:
            raise Truncated(
                self.path,
                f"an element of {n} bytes at byte {self.pos} runs past the end of the "
                f"file ({self.end} bytes)",
            )
        self.pos = pos

    def header(self, explicit: bool, little: bool) -> tuple[int, bytes | None, int]:
        """Read one element header: (tag, VR or None, length)."""
        raw = self.read(8)
        e = "<" if little else ">"
        group, elem = struct.unpack(e + "HH", raw[:4])
        tag = group << 16 | elem
        if group == 0xFFFE:  # items and delimiters never have a VR
            return tag, None, struct.unpack(e + "L", raw[4:])[0]
        if not explicit:
            return tag, None, struct.unpack(e + "L", raw[4:])[0]
        vr = raw[4:6]
        if vr in _LONG_VRS:
            return tag, vr, struct.unpack(e + "L", self.read(4))[0]
        if vr not in _ALL_VRS:
            raise NotDicom(self.path, f"invalid VR {vr!r} at byte {self.pos - 8}")
        return tag, vr, struct.unpack(e + "H", raw[6:])[0]

    def dataset(
        self,
        explicit: bool,
        little: bool,
        *,
        wanted: Iterable[int] = (),
        until: int | None = None,
        depth: int = 0,
        stop_after: int | None = None,
    ) -> dict[int, bytes]:
        """Walk a data set to `until` (an end offset) or to an item delimiter.

        Returns the raw values of the `wanted` tags at this level.
        """
        if depth > _MAX_DEPTH:
            raise NotDicom(self.path, "sequences nested too deeply")
        wanted = frozenset(wanted)
        found: dict[int, bytes] = {}
        limit = self.end if until is None else until
        fast = little and stop_after is None
        while self.pos < limit:
            if fast:
                self._walk_chunk(explicit, wanted, limit, found)
                if self.pos >= limit:
                    break
            tag, vr, length = self.header(explicit, little)
            if tag == _ITEM_END:  # end of an undefined-length item
                return found
            if stop_after is not None and tag > stop_after:
                return found
            if length == _UNDEFINED:
                # SQ, or encapsulated pixel data / UN: items until the sequence delimiter.
                # The contents of an undefined-length UN are implicit VR little endian.
                inner_explicit = explicit and vr != b"UN"
                inner_little = little or vr == b"UN"
                self.items(inner_explicit, inner_little, depth + 1)
            elif tag in wanted:
                if self.pos + length > self.end:
                    raise Truncated(self.path, f"element {tag:08X} runs past the end of the file")
                found[tag] = self.read(length)
            else:
                self.skip(length)
        if self.pos != limit:
            raise Truncated(self.path, "an element runs past the end of its container")
        return found

    def _walk_chunk(
        self, explicit: bool, wanted: frozenset[int], limit: int, found: dict[int, bytes]
    ) -> None:
        """Walk the little-endian elements that lie in the chunk, in one tight loop.

        What `dataset` does one method call at a time, for the common case; it stops short of
        anything else (items and sequences, an element header or wanted value past the chunk,
        a bad VR, a length past the end of the file) and leaves that to `dataset`, which
        raises the same errors either way. Three times faster on a typical header.
        """
        buf = self._buf
        base = self._base
        off = self.pos - base
        if off < 0:
            return
        size = len(buf)
        stop = min(size, limit - base)
        end = self.end - base
        unpack = (_EXPLICIT_LE if explicit else _IMPLICIT_LE).unpack_from
        while off + 8 <= stop:
            if explicit:
                group, elem, vr, length = unpack(buf, off)
                if vr in _LONG_VRS:
                    if off + 12 > size:
                        break
                    length = _UL_LE.unpack_from(buf, off + 8)[0]
                    start = off + 12
                elif vr in _ALL_VRS:
                    start = off + 8
                else:
                    break
            else:
                group, elem, length = unpack(buf, off)
                start = off + 8
            if group == 0xFFFE or length == _UNDEFINED:
                break
            nxt = start + length
            if nxt > end:
                break
            tag = group << 16 | elem
            if tag in wanted:
                if nxt > size:
                    break
                found[tag] = buf[start:nxt]
            off = nxt
        self.pos = base + off

    def items(self, explicit: bool, little: bool, depth: int) -> None:
        while True:
            tag, _, length = self.header(explicit, little)
            if tag == _SEQ_END:
                return
            if tag != _ITEM:
                raise NotDicom(
                    self.path, f"expected an item, found ({tag >> 16:04X},{tag & 0xFFFF:04X})"
                )
            if length == _UNDEFINED:
                # ends at its item delimiter; a missing one shows up as Truncated on the
                # next header read
                self.dataset(explicit, little, until=self.end, depth=depth)
            else:
                self.skip(length)


def _text(value: bytes | None) -> str | None:
    if value is None:
        return None
    text = value.rstrip(b"\x00 ").decode("ascii", errors="replace").strip()
    return text or None


_UID_MAX = 64
_UID_NAMES = {
    _META_TS: "Transfer Syntax UID (0002,0010)",
    _META_SOP_CLASS: "Media Storage SOP Class UID (0002,0002)",
    _META_SOP_INSTANCE: "Media Storage SOP Instance UID (0002,0003)",
    _SOP_CLASS: "SOP Class UID (0008,0016)",
    _SOP_INSTANCE: "SOP Instance UID (0008,0018)",
}


def escape_bytes(raw: bytes, limit: int = 80) -> str:
    """`raw` as printable ASCII: anything else (and the backslash) as ``\\xNN``; cut at `limit`."""
    shown = raw[:limit]
    text = "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in shown)
    return text + ("..." if len(raw) > limit else "")


def uid_problem(uid: str) -> str | None:
    """Why `uid` (padding already stripped) cannot be sent as a UID, or None when it can.

    Rejected: anything but ASCII digits and dots, more than 64 characters, an empty
    component (a leading, trailing or doubled dot). These cannot be encoded in an
    association request or a C-STORE command, or no peer parses them. Accepted although
    PS3.5 9.1 forbids them: components with a leading zero ("1.2.03"). Real archives hold
    such UIDs from old modalities, DCMTK's dcmsend and most PACS accept them, and refusing
    them here would quarantine instances a peer would store; a peer that does refuse one
    says so with a C-STORE status, which the retry policy handles per destination.
    """
    if not uid:
        return "empty"
    if len(uid) > _UID_MAX:
        return f"{len(uid)} characters (at most {_UID_MAX})"
    if uid.strip("0123456789."):
        return "not only digits and dots"
    if "" in uid.split("."):
        return "an empty component"
    return None


def _uid(path: Path, tag: int, value: bytes | None) -> str | None:
    """The UID in `value` with its NUL/space padding stripped; None when absent or empty.

    Raises BadUID (naming the element and showing the value escaped) for a UID that
    `uid_problem` refuses.
    """
    if value is None:
        return None
    raw = value.rstrip(b"\x00 ").lstrip(b" ")
    if not raw:
        return None
    text = raw.decode("ascii", errors="replace")
    problem = uid_problem(text)
    if problem is not None:
        raise BadUID(path, f"invalid {_UID_NAMES[tag]} '{escape_bytes(raw)}': {problem}")
    return text


def _guess_encoding(head: bytes) -> tuple[bool, bool] | None:
    """(explicit, little) for a raw data set without file meta, or None if not DICOM-like."""
    if len(head) < 8:
        return None
    group_le = struct.unpack("<H", head[:2])[0]
    group_be = struct.unpack(">H", head[:2])[0]
    # Group 0000 (command) only as a leading (0000,0000) group length of 4 bytes: two zero
    # bytes alone are how many other formats start (an ICC profile read as (0000,xxxx)
    # with a 2 GB length was reported as "Truncated", i.e. still being written).
    group_length = head[:4] == b"\x00\x00\x00\x00" and (
        head[4:8] == b"\x04\x00\x00\x00" or head[4:8] == b"UL\x04\x00"
    )
    if 0x0002 <= group_le <= 0x0010 or group_length:
        little = True
    elif 0x0002 <= group_be <= 0x0010:
        little = False
    else:
        return None
    explicit = head[4:6] in _ALL_VRS
    if not little and not explicit:
        return None  # implicit VR big endian does not exist
    return explicit, little


def _ts_encoding(ts: str) -> tuple[bool, bool, bool]:
    """(explicit, little, deflated) for a transfer syntax; compressed ones are explicit LE."""
    if ts == IMPLICIT_LE:
        return False, True, False
    if ts == EXPLICIT_BE:
        return True, False, False
    return True, True, ts == DEFLATED_LE


def _inflate_check(fp: BinaryIO, path: Path, prefix_size: int = 1 << 16) -> bytes:
    """Inflate a deflated data set chunk by chunk; return its first bytes.

    Raises Truncated when the deflate stream does not end, NotDicom when it is corrupt.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    prefix = bytearray()
    try:
        while chunk := fp.read(1 << 20):
            out = inflater.decompress(chunk, 1 << 20)
            while True:
                if len(prefix) < prefix_size:
                    prefix += out[: prefix_size - len(prefix)]
                if not inflater.unconsumed_tail:
                    break
                out = inflater.decompress(inflater.unconsumed_tail, 1 << 20)
    except zlib.error as exc:
        raise NotDicom(path, f"corrupt deflated data set: {exc}") from exc
    if not inflater.eof:
        raise Truncated(path, "the deflated data set ends before its deflate stream does")
    return bytes(prefix)


def inspect(path: Path | str, *, follow_symlinks: bool = True) -> DicomInfo:
    """Read the file meta and header of a DICOM file and check that it is complete.

    Only element headers are read; values are skipped, so pixel data is never
    read (a deflated data set is inflated in chunks to prove it ends). With
    ``follow_symlinks=False`` a symlink at `path` is not opened (OSError ELOOP).

    Raises
    ------
    NotDicom
        Not DICOM at all.
    Truncated
        An element's length runs past the end of the file (still being written, or cut).
    MissingUID
        No SOP Class UID or SOP Instance UID.
    BadUID
        A Transfer Syntax, SOP Class or SOP Instance UID (file meta or data set) that
        `uid_problem` refuses: the file is invalid, so it never reaches an association.
    OSError
        The file cannot be opened or read (vanished, permissions).
    """
    path = Path(path)
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    with os.fdopen(os.open(path, flags), "rb") as fp:
        st = os.fstat(fp.fileno())
        size = st.st_size
        reader = _Reader(fp, path, size)
        head = reader.peek(132)
        meta: dict[int, bytes] = {}
        has_meta = False
        if len(head) == 132 and head[128:132] == b"DICM":
            has_meta = True
            reader.pos = 132
        if has_meta or (len(head) >= 8 and head[:2] == b"\x02\x00" and head[4:6] in _ALL_VRS):
            meta = _read_meta(reader)
            ts = _uid(path, _META_TS, meta.get(_META_TS))
            # The sender may take the file meta's copies for the C-STORE (a chunked send)
            for tag in (_META_SOP_CLASS, _META_SOP_INSTANCE):
                _uid(path, tag, meta.get(tag))
            if ts is None:
                raise NotDicom(path, "file meta has no Transfer Syntax UID (0002,0010)")
        else:
            guess = _guess_encoding(head)
            if guess is None:
                if size == 0:
                    raise Truncated(path, "empty file")
                if size < 132 and not head[:128].strip(b"\x00") and b"DICM".startswith(head[128:]):
                    # a zero preamble (the usual one) with the DICM marker still to come
                    raise Truncated(path, "the file ends inside the 128-byte preamble")
                raise NotDicom(path, "no DICM marker and no recognisable DICOM data set")
            explicit, little = guess
            ts = IMPLICIT_LE if not explicit else (EXPLICIT_LE if little else EXPLICIT_BE)
        offset = reader.pos
        explicit, little, deflated = _ts_encoding(ts)
        walked = True  # the data set was read past where its SOP UIDs belong
        if deflated:
            fp.seek(offset)
            prefix = _inflate_check(fp, path)
            sub = _Reader(io.BytesIO(prefix), path, len(prefix))
            try:
                found = sub.dataset(True, True, wanted=_WANTED, stop_after=_STUDY)
            except Truncated:  # the prefix is only the first part of the data set
                found, walked = {}, False
        else:
            found = reader.dataset(explicit, little, wanted=_WANTED)
            if offset == size:
                raise Truncated(path, "file meta only, no data set")
    sop_class = _uid(path, _SOP_CLASS, found.get(_SOP_CLASS))
    sop_instance = _uid(path, _SOP_INSTANCE, found.get(_SOP_INSTANCE))
    if not walked:
        # Only when the data set could not be read that far: the file meta's copies.
        # A data set without its own UIDs is invalid even when the meta has them (the
        # peer gets the data set, and the C-STORE's UIDs must be the data set's).
        sop_class = sop_class or _uid(path, _META_SOP_CLASS, meta.get(_META_SOP_CLASS))
        sop_instance = sop_instance or _uid(path, _META_SOP_INSTANCE, meta.get(_META_SOP_INSTANCE))
    if not sop_class:
        raise MissingUID(path, "no SOP Class UID (0008,0016)")
    if not sop_instance:
        raise MissingUID(path, "no SOP Instance UID (0008,0018)")
    return DicomInfo(
        path=path,
        size=size,
        mtime_ns=st.st_mtime_ns,
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        transfer_syntax=ts,
        study_uid=_text(found.get(_STUDY)),
        dataset_offset=offset,
    )


def locate(
    path: Path | str,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    study_uid: str | None,
) -> DicomInfo:
    """Re-open a file that `inspect` already checked: its size, mtime and data set offset.

    Reads the preamble and file meta only (no walk of the data set); the caller compares
    size and mtime with what `inspect` saw to know the file is the one it checked.

    Raises
    ------
    OSError
        The file is gone or unreadable.
    InvalidDicom
        The file meta is no longer readable (the file was replaced).
    """
    path = Path(path)
    with open(path, "rb") as fp:
        st = os.fstat(fp.fileno())
        reader = _Reader(fp, path, st.st_size)
        head = reader.peek(132)
        has_meta = len(head) == 132 and head[128:132] == b"DICM"
        offset = 0
        if has_meta or (len(head) >= 8 and head[:2] == b"\x02\x00" and head[4:6] in _ALL_VRS):
            reader.pos = 132 if has_meta else 0
            _read_meta(reader)
            offset = reader.pos
    return DicomInfo(
        path=path,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        sop_class_uid=sop_class_uid,
        sop_instance_uid=sop_instance_uid,
        transfer_syntax=transfer_syntax,
        study_uid=study_uid,
        dataset_offset=offset,
    )


def _read_meta(reader: _Reader) -> dict[int, bytes]:
    """Read group 0002 (always explicit VR little endian); leaves the file at the data set."""
    found: dict[int, bytes] = {}
    meta_end: int | None = None  # from (0002,0000) File Meta Information Group Length
    while True:
        pos = reader.pos
        peek = reader.peek(2)
        # A file cut in or right after its file meta is still being written (or was cut):
        # without these checks it read as "no Transfer Syntax UID", i.e. not DICOM.
        if len(peek) < 2:
            raise Truncated(reader.path, "the file ends in or right after its file meta")
        if meta_end is not None and meta_end > reader.end:
            raise Truncated(reader.path, "the file ends inside its file meta")
        if struct.unpack("<H", peek)[0] != 0x0002:
            return found
        tag, _, length = reader.header(True, True)
        if length == _UNDEFINED:
            raise NotDicom(reader.path, "undefined length in the file meta")
        if pos + length > reader.end:
            raise Truncated(reader.path, "the file meta runs past the end of the file")
        found[tag] = reader.read(length)
        if tag == 0x00020000 and length == 4:
            meta_end = reader.pos + struct.unpack("<L", found[tag])[0]
