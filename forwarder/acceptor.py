"""A DICOM association as an acceptor, on a socket one thread owns: negotiate, then serve stores.

The receiver's side of what ``forwarder.association`` and ``forwarder.wire`` do for the
sender: the A-ASSOCIATE-RQ is parsed and answered (AC or RJ), then the data phase runs on
the connection's own thread with blocking reads, no reactor threads and no polling, one
C-STORE (or C-ECHO) at a time: a data set goes fragment by fragment into the file a `Store`
handler opens for it, never into memory whole, and is answered with the status the handler
returns. pynetdicom's acceptor (two threads per association waking every millisecond, and a
decode of every command through pydicom) received 125-175 small instances/s on the
development VM where DCMTK's storescp received 840-1090 (bench/README.md "Receiving").

The PDU layouts are PS3.8 9.3.2-9.3.8; the command sets PS3.7 9.3.1 (C-STORE) and 9.3.5
(C-ECHO); the file meta PS3.10 7.1.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from forwarder.association import (
    APPLICATION_CONTEXT,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
)
from forwarder.commitmsg import STORAGE_COMMITMENT
from forwarder.filemeta import file_meta
from forwarder.wire import (
    ABORT,
    ASSOCIATE_AC,
    ASSOCIATE_RJ,
    PDATA,
    RELEASE_RP,
    RELEASE_RQ,
    VERIFICATION,
    Link,
    Request,
    WireError,
    _element,
    _us,
    decode_command,
)

__all__ = [
    "Proposal",
    "Rejection",
    "Store",
    "accept",
    "decode_associate_rq",
    "encode_response",
    "file_meta",
    "is_storage",
    "serve",
]

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
NO_DATA_SET = 0x0101
_PDV = struct.Struct(">LBB")
_ITEM = struct.Struct(">BxH")
ACCEPTANCE = 0
ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
TRANSFER_SYNTAXES_NOT_SUPPORTED = 4


@dataclass(frozen=True)
class Proposal:
    """What an A-ASSOCIATE-RQ asked for."""

    called_aet: str
    calling_aet: str
    contexts: tuple[tuple[int, str, tuple[str, ...]], ...]  # (id, abstract syntax, syntaxes)
    max_pdu: int  # the peer's receive limit; 0 = unlimited
    roles: tuple[tuple[str, int, int], ...] = ()  # SCP/SCU role selection: (class, scu, scp)


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason."""

    result: int
    source: int
    reason: int


CALLING_AET_NOT_RECOGNISED = Rejection(1, 1, 3)
CALLED_AET_NOT_RECOGNISED = Rejection(1, 1, 7)
LOCAL_LIMIT_EXCEEDED = Rejection(2, 3, 2)
NO_REASON = Rejection(1, 1, 1)


def _uid(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", "replace")


def _items(body: bytes, pos: int, end: int) -> list[tuple[int, bytes]]:
    out = []
    while pos + 4 <= end:
        item_type, length = _ITEM.unpack_from(body, pos)
        pos += 4
        if pos + length > end:
            raise WireError("malformed A-ASSOCIATE-RQ item")
        out.append((item_type, body[pos : pos + length]))
        pos += length
    return out


def decode_associate_rq(body: bytes) -> Proposal:
    """Decode an A-ASSOCIATE-RQ body (PS3.8 9.3.2); unknown items are skipped.

    Raises WireError when it is too short or an item runs past its end.
    """
    if len(body) < 68:
        raise WireError("A-ASSOCIATE-RQ too short")
    called = body[4:20].decode("ascii", "replace").strip()
    calling = body[20:36].decode("ascii", "replace").strip()
    contexts = []
    max_pdu = 0
    roles = []
    for item_type, value in _items(body, 68, len(body)):
        if item_type == 0x20 and len(value) >= 4:
            abstract = ""
            syntaxes = []
            for sub_type, sub in _items(value, 4, len(value)):
                if sub_type == 0x30:
                    abstract = _uid(sub)
                elif sub_type == 0x40:
                    syntaxes.append(_uid(sub))
            contexts.append((value[0], abstract, tuple(syntaxes)))
        elif item_type == 0x50:
            for sub_type, sub in _items(value, 0, len(value)):
                if sub_type == 0x51 and len(sub) == 4:
                    max_pdu = struct.unpack(">L", sub)[0]
                elif sub_type == 0x54 and len(sub) >= 4:
                    n = struct.unpack(">H", sub[:2])[0]
                    if len(sub) >= 2 + n + 2:
                        roles.append((_uid(sub[2 : 2 + n]), sub[2 + n], sub[3 + n]))
    return Proposal(called, calling, tuple(contexts), max_pdu, tuple(roles))


def _item(item_type: int, value: bytes) -> bytes:
    return _ITEM.pack(item_type, len(value)) + value


def is_storage(abstract_syntax: str) -> bool:
    """True for a SOP class the receiver stores: every storage class pynetdicom knows, and
    every one it does not know (private or newer than its list), as pynetdicom's
    "unrestricted storage service" decides; False for its known non-storage classes
    (query/retrieve, worklist, print...)."""
    from pydicom.uid import UID
    from pynetdicom import sop_class

    if abstract_syntax in _storage_classes():
        return True
    if abstract_syntax == VERIFICATION:
        return False
    uid = UID(abstract_syntax)
    return uid.is_private or not hasattr(sop_class, uid.keyword or "-")


_STORAGE: frozenset[str] | None = None


def _storage_classes() -> frozenset[str]:
    global _STORAGE
    if _STORAGE is None:
        from pynetdicom.sop_class import _STORAGE_CLASSES

        _STORAGE = frozenset(str(u) for u in _STORAGE_CLASSES.values())
    return _STORAGE


def accept(proposal: Proposal) -> dict[int, tuple[int, str]]:
    """The result of each proposed context: storage classes (standard, private, unknown) in
    the first transfer syntax proposed, Verification and Storage Commitment (a peer reporting
    on a new association) likewise; anything else refused."""
    results: dict[int, tuple[int, str]] = {}
    for cx_id, abstract, syntaxes in proposal.contexts:
        first = syntaxes[0] if syntaxes else ""
        if not syntaxes:
            results[cx_id] = (TRANSFER_SYNTAXES_NOT_SUPPORTED, "")
        elif abstract in (VERIFICATION, STORAGE_COMMITMENT) or (abstract and is_storage(abstract)):
            results[cx_id] = (ACCEPTANCE, first)
        else:
            results[cx_id] = (ABSTRACT_SYNTAX_NOT_SUPPORTED, first)
    return results


def encode_associate_ac(
    proposal: Proposal, results: dict[int, tuple[int, str]], max_pdu: int
) -> bytes:
    """The body of the A-ASSOCIATE-AC (PS3.8 9.3.3) answering `proposal` with `results`."""
    items = [_item(0x10, APPLICATION_CONTEXT.encode("ascii"))]
    for cx_id, (result, ts) in results.items():
        items.append(_item(0x21, bytes((cx_id, 0, result, 0)) + _item(0x40, ts.encode("ascii"))))
    accepted = {a for cx, a, _ in proposal.contexts if results.get(cx, (1, ""))[0] == ACCEPTANCE}
    roles = b"".join(  # the roles asked for, granted (a peer reporting as the SCP of a class)
        _item(0x54, struct.pack(">H", len(uid)) + uid.encode("ascii") + bytes((scu, scp)))
        for uid, scu, scp in proposal.roles
        if uid in accepted
    )
    user = (
        _item(0x51, struct.pack(">L", max_pdu))
        + _item(0x52, IMPLEMENTATION_CLASS_UID.encode("ascii"))
        + roles
        + _item(0x55, IMPLEMENTATION_VERSION_NAME.encode("ascii"))
    )
    items.append(_item(0x50, user))
    called = proposal.called_aet.encode("ascii", "replace").ljust(16, b" ")[:16]
    calling = proposal.calling_aet.encode("ascii", "replace").ljust(16, b" ")[:16]
    return struct.pack(">HH", 1, 0) + called + calling + bytes(32) + b"".join(items)


def encode_associate_rj(rejection: Rejection) -> bytes:
    return bytes((0, rejection.result, rejection.source, rejection.reason))


def encode_response(
    field: int,
    sop_class: str,
    message_id: int,
    status: int,
    sop_instance: str | None = None,
    comment: str | None = None,
) -> bytes:
    """The command set of a C-STORE-RSP or C-ECHO-RSP (implicit VR little endian)."""
    elements = [
        _element(0x00000002, sop_class.encode("ascii", "replace")),
        _us(0x00000100, field),
        _us(0x00000120, message_id),
        _us(0x00000800, NO_DATA_SET),
        _us(0x00000900, status),
    ]
    if comment:
        text = comment.encode("ascii", "replace")[:64]
        elements.append(_element(0x00000902, text + (b" " if len(text) % 2 else b"")))
    if sop_instance is not None:
        elements.append(_element(0x00001000, sop_instance.encode("ascii", "replace")))
    body = b"".join(elements)
    return _element(0x00000000, struct.pack("<L", len(body))) + body


class Sink(Protocol):
    """Where one data set goes while it arrives (`Store.begin` opens it)."""

    def write(self, data: bytes | memoryview) -> int: ...

    def discard(self) -> None: ...


class Store(Protocol):
    """What the data phase calls: a sink per data set, then a status for it."""

    def begin(self, sop_class: str, sop_instance: str, transfer_syntax: str) -> Sink: ...

    def store(self, sink: Sink, sop_class: str, sop_instance: str) -> tuple[int, str | None]: ...

    def request(self, request: Request, transfer_syntax: str) -> bytes:
        """Any other request (an N-EVENT-REPORT-RQ): the command set of its response."""
        ...


MAX_REQUEST_DATA_SET = 16 << 20
"""The largest data set of a request other than a C-STORE (a commitment report) kept in memory."""


@dataclass
class _Message:
    cx_id: int
    command: dict[int, bytes]
    sink: Sink | None = None
    data: bytearray | None = None  # the data set of a request other than a C-STORE


def _text(raw: bytes | None) -> str:
    return "" if raw is None else _uid(raw)


def _number(raw: bytes | None) -> int:
    return struct.unpack("<H", raw[:2])[0] if raw and len(raw) >= 2 else 0


def serve(
    link: Link,
    accepted: dict[int, str],
    store: Store,
    peer_max_pdu: int,
    released: Callable[[], None] = lambda: None,
) -> None:
    """The data phase: read PDUs until release or abort, storing and answering each C-STORE,
    answering each C-ECHO; `accepted` maps context ids to their transfer syntax.

    A data set cut short by an abort, a closed connection or a timeout is discarded.

    Raises
    ------
    WireError
        The peer aborted, closed, timed out or sent nonsense (the caller aborts and closes).
    """
    del peer_max_pdu  # responses are ~150 bytes: below any peer's limit
    command = bytearray()
    message: _Message | None = None
    try:
        while True:
            pdu_type, body = link.read_pdu_into("network timeout")
            if pdu_type == RELEASE_RQ:
                link.send_pdu(RELEASE_RP, bytes(4))
                released()
                return
            if pdu_type == ABORT:
                raise WireError("the peer aborted the association (A-ABORT)")
            if pdu_type != PDATA:
                raise WireError(f"unexpected PDU type 0x{pdu_type:02X} in the data phase")
            view = memoryview(body)
            pos, end = 0, len(body)
            while pos + 6 <= end:
                item_len, cx_id, mch = _PDV.unpack_from(body, pos)
                if item_len < 2 or pos + 4 + item_len > end:
                    raise WireError(f"malformed PDV item (length {item_len})")
                fragment = view[pos + 6 : pos + 4 + item_len]
                pos += 4 + item_len
                if cx_id not in accepted:
                    raise WireError(f"a PDV on presentation context {cx_id}, not accepted")
                if mch & 0x01:  # command
                    if message is not None:
                        raise WireError("a command arrived before the last data set ended")
                    command += fragment
                    if mch & 0x02:
                        elems = decode_command(bytes(command))
                        command.clear()
                        message = _Message(cx_id, elems)
                        if _number(elems.get(0x00000800)) == NO_DATA_SET:
                            _answer(link, message, None, store, accepted[cx_id])
                            message = None
                        elif _number(elems.get(0x00000100)) == C_STORE_RQ:
                            message.sink = _begin(message, accepted[cx_id], store)
                        else:
                            message.data = bytearray()
                else:  # data set
                    if message is None or (message.sink is None and message.data is None):
                        raise WireError("a data set fragment without its command")
                    if message.sink is not None:
                        message.sink.write(fragment)
                    else:
                        assert message.data is not None
                        message.data += fragment
                        if len(message.data) > MAX_REQUEST_DATA_SET:
                            raise WireError("a request's data set larger than 16 MiB")
                    if mch & 0x02:
                        _answer(link, message, message.sink, store, accepted[message.cx_id])
                        message = None
    finally:
        if message is not None and message.sink is not None:
            message.sink.discard()


def _begin(message: _Message, transfer_syntax: str, store: Store) -> Sink:
    elems = message.command
    if _number(elems.get(0x00000100)) != C_STORE_RQ:
        raise WireError("a data set with a command other than C-STORE-RQ")
    return store.begin(_text(elems.get(0x00000002)), _text(elems.get(0x00001000)), transfer_syntax)


def _answer(
    link: Link, message: _Message, sink: Sink | None, store: Store, transfer_syntax: str
) -> None:
    elems = message.command
    field = _number(elems.get(0x00000100))
    msg_id = _number(elems.get(0x00000110))
    sop_class = _text(elems.get(0x00000002))
    if field not in (C_ECHO_RQ, C_STORE_RQ):
        data = None if message.data is None else bytes(message.data)
        rsp = store.request(Request(message.cx_id, elems, data), transfer_syntax)
    elif field == C_ECHO_RQ and sink is None:
        rsp = encode_response(C_ECHO_RSP, sop_class, msg_id, 0x0000)
    elif field == C_STORE_RQ and sink is not None:
        sop_instance = _text(elems.get(0x00001000))
        message.sink = None  # the store owns it now (keeps it, or discards it)
        status, comment = store.store(sink, sop_class, sop_instance)
        rsp = encode_response(C_STORE_RSP, sop_class, msg_id, status, sop_instance, comment)
    else:
        raise WireError(f"unsupported DIMSE command 0x{field:04X}")
    link.send_pdu(PDATA, _PDV.pack(len(rsp) + 2, message.cx_id, 0x03) + rsp)


__all__ += ["ASSOCIATE_AC", "ASSOCIATE_RJ", "encode_associate_ac", "encode_associate_rj"]
