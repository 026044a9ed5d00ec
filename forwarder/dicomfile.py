"""Inspect a DICOM file without decoding it: UIDs, transfer syntax, and whether it is complete."""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from forwarder.dicomerrors import BadUID, InvalidDicom, MissingUID, NotDicom, Truncated
from forwarder.elements import ALL_VRS, Reader, guess_encoding, read_meta

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
    # the top-level attributes `inspect` was asked for that the file has: tag -> its values
    # as text (a multi-valued attribute has one per backslash-separated value)
    attributes: Mapping[int, tuple[str, ...]] = field(default_factory=dict, hash=False)


def _values(raw: bytes) -> tuple[str, ...]:
    """A text attribute's values: Latin-1 (ASCII's superset: never fails), split at the
    backslash, each without its padding."""
    text = raw.decode("latin-1").rstrip("\x00 ")
    return tuple(v.strip(" \x00") for v in text.split("\\"))


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


def inspect(
    path: Path | str, *, follow_symlinks: bool = True, attributes: frozenset[int] = frozenset()
) -> DicomInfo:
    """Read the file meta and header of a DICOM file and check that it is complete.

    Only element headers are read; values are skipped, so pixel data is never
    read (a deflated data set is inflated in chunks to prove it ends). With
    ``follow_symlinks=False`` a symlink at `path` is not opened (OSError ELOOP).
    The top-level `attributes` (tags) the file has come back in ``DicomInfo.attributes``,
    read by the same walk (not inside sequences; in a deflated data set, only those in its
    first 64 KiB).

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
        return inspect_stream(fp, path, st.st_size, st.st_mtime_ns, attributes=attributes)


def _find_dataset(reader: Reader, path: Path, size: int) -> tuple[str, dict[int, bytes]]:
    """The transfer syntax and the file meta (empty without one), from the file meta or from
    a data set with none; `reader` is left at the start of the data set."""
    head = reader.peek(132)
    meta: dict[int, bytes] = {}
    has_meta = False
    if len(head) == 132 and head[128:132] == b"DICM":
        has_meta = True
        reader.pos = 132
    if has_meta or (len(head) >= 8 and head[:2] == b"\x02\x00" and head[4:6] in ALL_VRS):
        meta = read_meta(reader)
        ts = _uid(path, _META_TS, meta.get(_META_TS))
        # The sender may take the file meta's copies for the C-STORE (a chunked send)
        for tag in (_META_SOP_CLASS, _META_SOP_INSTANCE):
            _uid(path, tag, meta.get(tag))
        if ts is None:
            raise NotDicom(path, "file meta has no Transfer Syntax UID (0002,0010)")
        return ts, meta
    guess = guess_encoding(head)
    if guess is None:
        if size == 0:
            raise Truncated(path, "empty file")
        if size < 132 and not head[:128].strip(b"\x00") and b"DICM".startswith(head[128:]):
            # a zero preamble (the usual one) with the DICM marker still to come
            raise Truncated(path, "the file ends inside the 128-byte preamble")
        raise NotDicom(path, "no DICM marker and no recognisable DICOM data set")
    explicit, little = guess
    return IMPLICIT_LE if not explicit else (EXPLICIT_LE if little else EXPLICIT_BE), meta


def inspect_stream(
    fp: BinaryIO,
    path: Path,
    size: int,
    mtime_ns: int,
    *,
    attributes: frozenset[int] = frozenset(),
    dataset_at: tuple[int, str] | None = None,
) -> DicomInfo:
    """`inspect` of the `size` bytes of an open, seekable stream (`path` names it in errors
    and in the result): a received instance checked where it was written, before it has a
    file of its own. `dataset_at` (the data set's offset and transfer syntax) skips the file
    meta, for a caller that wrote it itself (not for a deflated syntax: its walk may need the
    meta's UIDs)."""
    reader = Reader(fp, path, size)
    meta: dict[int, bytes] = {}
    ts = None
    if dataset_at is not None:
        # checked and stripped as it reads back from the file meta it stands for
        ts = _uid(path, _META_TS, dataset_at[1].encode("ascii", "replace"))
        if ts is not None and not _ts_encoding(ts)[2]:
            reader.pos = dataset_at[0]
        else:
            ts = None
    if ts is None:
        ts, meta = _find_dataset(reader, path, size)
    offset = reader.pos
    explicit, little, deflated = _ts_encoding(ts)
    # the same walk reads the attributes routing rules name: no cost without rules
    wanted = _WANTED | attributes if attributes else _WANTED
    stop_after = max(_STUDY, *attributes) if attributes else _STUDY
    walked = True  # the data set was read past where its SOP UIDs belong
    if deflated:
        fp.seek(offset)
        prefix = _inflate_check(fp, path)
        sub = Reader(io.BytesIO(prefix), path, len(prefix))
        try:
            found = sub.dataset(True, True, wanted=wanted, stop_after=stop_after)
        except Truncated:  # the prefix is only the first part of the data set
            found, walked = {}, False
    else:
        found = reader.dataset(explicit, little, wanted=wanted)
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
        mtime_ns=mtime_ns,
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        transfer_syntax=ts,
        study_uid=_text(found.get(_STUDY)),
        dataset_offset=offset,
        attributes={t: _values(found[t]) for t in attributes if t in found} if attributes else {},
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
        reader = Reader(fp, path, st.st_size)
        head = reader.peek(132)
        has_meta = len(head) == 132 and head[128:132] == b"DICM"
        offset = 0
        if has_meta or (len(head) >= 8 and head[:2] == b"\x02\x00" and head[4:6] in ALL_VRS):
            reader.pos = 132 if has_meta else 0
            read_meta(reader)
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
