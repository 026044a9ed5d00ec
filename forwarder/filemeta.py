"""The Part 10 header this forwarder writes: preamble, ``DICM`` and the file meta group.

One encoder for every file we make: an instance received over the network (the meta built
from the negotiated transfer syntax), a transformed copy, a STOW-RS part for a file that came
without a header. Encoded directly (explicit VR little endian, PS3.10 7.1): pydicom's writer
cost a fifth of a spliced ``set``/``remove``.
"""

from __future__ import annotations

import struct

from forwarder.association import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

__all__ = ["file_meta"]


def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and a group 0002 naming the instance, the transfer syntax of its
    data set and this implementation.

    Raises UnicodeEncodeError for a UID that is not ASCII, struct.error for one too long for
    an element (callers that must not write a bad UID check it first: `uid_problem`).
    """
    version = IMPLEMENTATION_VERSION_NAME.encode("ascii")
    body = (
        _explicit(0x00020001, b"OB", b"\x00\x01")
        + _explicit(0x00020002, b"UI", _ui(sop_class))
        + _explicit(0x00020003, b"UI", _ui(sop_instance))
        + _explicit(0x00020010, b"UI", _ui(transfer_syntax))
        + _explicit(0x00020012, b"UI", _ui(IMPLEMENTATION_CLASS_UID))
        + _explicit(0x00020013, b"SH", version + (b" " if len(version) % 2 else b""))
    )
    length = _explicit(0x00020000, b"UL", struct.pack("<L", len(body)))
    return bytes(128) + b"DICM" + length + body
