"""Walk the encoded elements of a DICOM file by their lengths, without decoding their values."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from forwarder.dicomerrors import NotDicom, Truncated

__all__ = ["ALL_VRS", "Reader", "guess_encoding", "read_meta"]

_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
# Explicit VRs with a 2-byte reserved field and a 4-byte length
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
ALL_VRS = _LONG_VRS | frozenset(
    {
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
        b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    }
)  # fmt: skip
_MAX_DEPTH = 64
_EXPLICIT_LE = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length
_IMPLICIT_LE = struct.Struct("<HHL")  # group, element, 32-bit length
_UL_LE = struct.Struct("<L")


class Reader:
    """Walks encoded elements by their lengths, skipping over values it does not need.

    The file is read in chunks of `CHUNK` bytes and walked in memory: a value is skipped by
    moving a position, so a header costs a slice and an unpack, and the pixel data of an image
    (past the chunk) is never read. A seek per element would cost ~100 lseek calls per
    file.
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
        if vr not in ALL_VRS:
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
                elif vr in ALL_VRS:
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


def read_meta(reader: Reader) -> dict[int, bytes]:
    """Read group 0002 (always explicit VR little endian); leaves the file at the data set."""
    found: dict[int, bytes] = {}
    meta_end: int | None = None  # from (0002,0000) File Meta Information Group Length
    while True:
        pos = reader.pos
        peek = reader.peek(2)
        # A file cut in or right after its file meta is still being written (or was cut):
        # without these checks it would read as "no Transfer Syntax UID", i.e. not DICOM.
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


def guess_encoding(head: bytes) -> tuple[bool, bool] | None:
    """(explicit, little) for a raw data set without file meta, or None if not DICOM-like."""
    if len(head) < 8:
        return None
    group_le = struct.unpack("<H", head[:2])[0]
    group_be = struct.unpack(">H", head[:2])[0]
    # Group 0000 (command) only as a leading (0000,0000) group length of 4 bytes: two zero
    # bytes alone are how many other formats start (an ICC profile read as (0000,xxxx)
    # shows a 2 GB length, which would count as "Truncated", i.e. still being written).
    group_length = head[:4] == b"\x00\x00\x00\x00" and (
        head[4:8] == b"\x04\x00\x00\x00" or head[4:8] == b"UL\x04\x00"
    )
    if 0x0002 <= group_le <= 0x0010 or group_length:
        little = True
    elif 0x0002 <= group_be <= 0x0010:
        little = False
    else:
        return None
    explicit = head[4:6] in ALL_VRS
    if not little and not explicit:
        return None  # implicit VR big endian does not exist
    return explicit, little
