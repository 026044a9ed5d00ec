"""A DICOM association as a requestor, on a socket one thread owns: connect, negotiate, release.

The connect, the A-ASSOCIATE-RQ/AC/RJ exchange, the data phase (``forwarder.wire``), the
A-RELEASE and the A-ABORT all run on the caller's thread; no other thread ever touches the
socket, so no reader can take a response from another (pynetdicom's association runs a
reactor thread beside the caller, and the two raced for C-STORE responses under load).
pynetdicom stays the reference these encoders are tested against, and the SCP of the tests.

The PDU layouts are PS3.8 9.3.2-9.3.4 (A-ASSOCIATE-RQ/AC/RJ) and 9.3.6-9.3.8 (release, abort);
the presentation context rules are PS3.8 9.3.2.2 and 9.3.3.2.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from forwarder.contexts import MAX_CONTEXTS
from forwarder.logs import one_line
from forwarder.status import Classification, classify_association
from forwarder.wire import (
    ABORT,
    ASSOCIATE_AC,
    ASSOCIATE_RJ,
    ASSOCIATE_RQ,
    PDATA,
    RELEASE_RP,
    RELEASE_RQ,
    Link,
    WireError,
)

if TYPE_CHECKING:  # the settings (pydantic) stay unimported for `forwarder send ADDR PORT`
    from forwarder.config import Destination

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "Association",
    "AssociationFailed",
    "Peer",
    "ae_title_problem",
    "client_tls_context",
    "decode_associate_ac",
    "encode_associate_rq",
    "open_association",
]

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
# A UUID-derived UID (PS3.5 B.2: no registration needed), fixed for this implementation.
IMPLEMENTATION_CLASS_UID = "2.25.81305744741288710800729917292279474870"
IMPLEMENTATION_VERSION_NAME = "DICOM_FORWARDER"  # at most 16 characters
_SEND_PDU_CAP = 1 << 20
"""The largest PDU ever sent, whatever the peer allows: a peer limit of 0 (unlimited) would
otherwise put a whole file in one PDV."""


_MAX_PDUS_BEFORE_RP = 16
"""PDUs read while waiting for an A-RELEASE-RP before the association is aborted instead."""


@dataclass(frozen=True)
class Peer:
    """Where and how to associate: address, AE titles, limits and timeouts."""

    host: str
    port: int
    called_aet: str = "ANY-SCP"
    calling_aet: str = "STORESCU"
    max_pdu: int = 16382
    connect_timeout: float | None = 10.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 30.0
    network_timeout: float = 30.0
    tls: ssl.SSLContext | None = None
    tls_server_name: str | None = None
    name: str = ""

    @classmethod
    def from_destination(cls, dest: Destination) -> Peer:
        """Build a peer from a configured destination (TLS context included)."""
        tls = None
        server_name = None
        if dest.tls is not None:
            tls = client_tls_context(
                ca=dest.tls.ca, cert=dest.tls.cert, key=dest.tls.key, verify=dest.tls.verify
            )
            server_name = dest.tls.server_name or dest.host
        return cls(
            host=dest.host,
            port=dest.port,
            called_aet=dest.called_aet,
            calling_aet=dest.calling_aet,
            max_pdu=dest.max_pdu,
            connect_timeout=dest.connect_timeout,
            acse_timeout=dest.acse_timeout,
            dimse_timeout=dest.dimse_timeout,
            network_timeout=dest.network_timeout,
            tls=tls,
            tls_server_name=server_name,
            name=dest.name,
        )

    @property
    def label(self) -> str:
        return self.name or f"{self.called_aet}@{self.host}:{self.port}"


def client_tls_context(
    *,
    ca: Path | str | None = None,
    cert: Path | str | None = None,
    key: Path | str | None = None,
    verify: bool = True,
) -> ssl.SSLContext:
    """A client (server-authenticating) TLS context; verifies chain and host name by default."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    if cert:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class AssociationFailed(Exception):
    """No association could be established; ``classification`` says why and what to do.

    ``busy`` is True for an A-ASSOCIATE-RJ "rejected-transient" (PS3.8 9.3.4: temporary
    congestion, local limit exceeded): the peer is up and takes no more associations now.
    """

    def __init__(self, classification: Classification, *, busy: bool = False) -> None:
        self.classification = classification
        self.busy = busy
        super().__init__(classification.describe())


# -- the A-ASSOCIATE PDUs ------------------------------------------------------------------


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(value)) + value


def ae_title_problem(title: str) -> str | None:
    """Why `title` cannot be an AE title (PS3.5 6.2: 1 to 16 characters of the default
    repertoire, no backslash or control character), or None."""
    if not title.strip() or len(title) > 16:
        return "an AE title is 1 to 16 characters"
    if not all(" " <= ch <= "~" and ch != "\\" for ch in title):
        return "an AE title is printable ASCII without a backslash"
    return None


def _ae(title: str) -> bytes:
    problem = ae_title_problem(title)
    if problem is not None:
        raise ValueError(f"AE title {title!r}: {problem}")
    return title.encode("ascii").ljust(16, b" ")


def encode_associate_rq(
    called_aet: str,
    calling_aet: str,
    contexts: Sequence[tuple[int, str, Sequence[str]]],
    max_pdu: int,
) -> bytes:
    """The body of an A-ASSOCIATE-RQ (PS3.8 9.3.2) proposing `contexts` (id, abstract, syntaxes).

    `max_pdu` is our receive limit (0: unlimited).

    Raises
    ------
    ValueError
        An AE title or UID that cannot be encoded (not ASCII, too long).
    """
    items = [_item(0x10, APPLICATION_CONTEXT.encode("ascii"))]
    for cx_id, abstract, syntaxes in contexts:
        sub = [_item(0x30, abstract.encode("ascii"))]
        sub += [_item(0x40, ts.encode("ascii")) for ts in syntaxes]
        items.append(_item(0x20, bytes((cx_id, 0, 0, 0)) + b"".join(sub)))
    user = (
        _item(0x51, struct.pack(">L", max_pdu))
        + _item(0x52, IMPLEMENTATION_CLASS_UID.encode("ascii"))
        + _item(0x55, IMPLEMENTATION_VERSION_NAME.encode("ascii"))
    )
    items.append(_item(0x50, user))
    fixed = struct.pack(">HH", 1, 0) + _ae(called_aet) + _ae(calling_aet) + bytes(32)
    return fixed + b"".join(items)


@dataclass(frozen=True)
class Accepted:
    """What an A-ASSOCIATE-AC said: the contexts' results and the peer's receive limit."""

    results: dict[int, tuple[int, str]]  # context id -> (result, transfer syntax)
    max_pdu: int  # the peer's limit; 0 = unlimited


def _uid(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", "replace")


def decode_associate_ac(body: bytes) -> Accepted:
    """Decode an A-ASSOCIATE-AC body (PS3.8 9.3.3); unknown items are skipped.

    Raises
    ------
    WireError
        The body is cut short or its items overrun it.
    """
    results: dict[int, tuple[int, str]] = {}
    max_pdu = 0
    pos, end = 68, len(body)  # protocol version, reserved, 2 x 16 AE, 32 reserved
    if end < pos:
        raise WireError("A-ASSOCIATE-AC too short")
    while pos < end:
        if pos + 4 > end:
            raise WireError("malformed A-ASSOCIATE-AC")
        item_type, length = struct.unpack_from(">BxH", body, pos)
        value = body[pos + 4 : pos + 4 + length]
        if len(value) != length:
            raise WireError("malformed A-ASSOCIATE-AC")
        pos += 4 + length
        if item_type == 0x21 and length >= 4:
            cx_id, result = value[0], value[2]
            ts = ""
            sub = 4
            while sub + 4 <= length:
                sub_type, sub_len = struct.unpack_from(">BxH", value, sub)
                if sub_type == 0x40:
                    ts = _uid(value[sub + 4 : sub + 4 + sub_len])
                sub += 4 + sub_len
            results[cx_id] = (result, ts)
        elif item_type == 0x50:
            sub = 0
            while sub + 4 <= length:
                sub_type, sub_len = struct.unpack_from(">BxH", value, sub)
                if sub_type == 0x51 and sub_len == 4:
                    max_pdu = struct.unpack_from(">L", value, sub + 4)[0]
                sub += 4 + sub_len
    return Accepted(results, max_pdu)


# -- the association -------------------------------------------------------------------


@dataclass
class Association:
    """An established association; the socket belongs to it until :meth:`close`.

    ``accepted`` maps each accepted abstract syntax to its (context ID, transfer syntax)
    pairs. Empty when the peer accepted none: the association is then already aborted.
    """

    peer: Peer
    link: Link
    proposed: frozenset[tuple[str, tuple[str, ...]]]
    accepted: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    send_pdu: int = _SEND_PDU_CAP  # the largest PDU we send: the peer's limit, capped
    msg_id: int = 0
    closed: bool = False
    opened_at: float = field(default_factory=time.monotonic)
    rtt: float = 0.0
    """Seconds from the A-ASSOCIATE-RQ to the answer: a network round trip plus the peer's
    own time, which is what each C-STORE's response waits for too."""

    def next_message_id(self) -> int:
        """1..65535, then it wraps (a Message ID is an unsigned short)."""
        self.msg_id = self.msg_id % 65535 + 1
        return self.msg_id

    def alive(self) -> bool:
        """True when nothing from the peer is waiting: no abort, close or release request.

        Never blocks, but to answer a request the peer sent (`Link.on_request`: a commitment
        report). A peer's A-RELEASE-RQ (idle timeout) is answered, and the association is then
        over; so is one the peer aborted or closed.
        """
        if self.closed:
            return False
        while self.link.pending():
            try:
                self.link.settimeout(self.peer.acse_timeout)
                if self.link.on_request is None or self.link.peek_pdu_type() != PDATA:
                    break
                self.link.serve_pending()  # a request of the peer (a commitment report)
            except WireError:  # closed, reset, or not a request we answer
                self.abort()
                return False
        else:
            return True
        try:
            pdu_type, _ = self.link.read_pdu("A-RELEASE")
        except WireError:  # closed or reset: nothing to answer
            self.close()
            return False
        if pdu_type == RELEASE_RQ:
            with contextlib.suppress(WireError):
                self.link.send_pdu(RELEASE_RP, bytes(4))
            self.close()
        elif pdu_type == ABORT:
            self.close()
        else:  # anything else unasked is a protocol error: abort it
            self.abort()
        return False

    def release(self) -> None:
        """A-RELEASE-RQ, then wait (ACSE timeout) for the A-RELEASE-RP; abort if none comes."""
        if self.closed:
            return
        try:
            self.link.settimeout(self.peer.acse_timeout)
            self.link.send_pdu(RELEASE_RQ, bytes(4))
            for _ in range(_MAX_PDUS_BEFORE_RP):
                pdu_type, _ = self.link.read_pdu("A-RELEASE")
                if pdu_type == RELEASE_RP:
                    break
                if pdu_type == RELEASE_RQ:  # release collision (PS3.8 7.2.2): we requested
                    self.link.send_pdu(RELEASE_RP, bytes(4))
                    continue
                if pdu_type == ABORT:
                    break
                # a late P-DATA (a response nobody waits for): skip it
            else:
                raise WireError("no A-RELEASE-RP among the peer's answers")
        except WireError:
            self.abort()
            return
        self.close()

    def abort(self) -> None:
        """A-ABORT (service user) at once, then close; never raises."""
        if self.closed:
            return
        with contextlib.suppress(WireError, OSError):
            self.link.settimeout(1.0)
            self.link.send_pdu(ABORT, bytes(4))
        self.close()

    def close(self) -> None:
        """Drop the connection without a word (after an abort or a release)."""
        self.closed = True
        self.link.close()


def _connect(peer: Peer) -> socket.socket:
    """A TCP (and TLS) connection to the peer, tuned; raises AssociationFailed."""
    try:
        sock = socket.create_connection((peer.host, peer.port), timeout=peer.connect_timeout)
    except TimeoutError:
        raise _failed(f"cannot connect: timed out after {peer.connect_timeout:g} s") from None
    except socket.gaierror as exc:
        raise _failed(f"cannot connect: cannot resolve {peer.host!r}: {exc.strerror}") from None
    except OSError as exc:
        raise _failed(f"cannot connect: {exc.strerror or exc}") from None
    # TCP_NODELAY: small stores would wait on Nagle + delayed ACK (~40 ms each).
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if peer.tls is None:
        return sock
    try:
        sock.settimeout(peer.acse_timeout)
        return peer.tls.wrap_socket(sock, server_hostname=peer.tls_server_name or peer.host)
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        raise _failed(f"TLS: certificate verify failed: {exc.verify_message}") from None
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise _failed(f"TLS handshake failed: {one_line(exc)}") from None


def _failed(detail: str) -> AssociationFailed:
    return AssociationFailed(classify_association(rejected=False, detail=detail))


def open_association(
    peer: Peer,
    contexts: Iterable[tuple[str, Sequence[str]]],
    cancel: threading.Event | None = None,
) -> Association:
    """Connect to `peer` and negotiate `contexts` (abstract syntax, transfer syntaxes).

    Setting `cancel` ends the wait for the peer's answer early (an association nobody needs
    any more, or a shutdown); the request then fails as "cancelled".

    Returns an established Association; when the peer accepted none of the contexts, its
    ``accepted`` is empty and it is already aborted.

    Raises
    ------
    AssociationFailed
        Refused, unreachable, timed out, TLS failure, rejected (with the A-ASSOCIATE-RJ's
        result, source and reason) or aborted by the peer.
    ValueError
        More than 128 contexts, or an AE title or UID that cannot be encoded.
    """
    proposals = [(2 * i + 1, abstract, tuple(ts)) for i, (abstract, ts) in enumerate(contexts)]
    if len(proposals) > MAX_CONTEXTS:
        raise ValueError(f"{len(proposals)} presentation contexts; at most {MAX_CONTEXTS}")
    rq = encode_associate_rq(peer.called_aet, peer.calling_aet, proposals, peer.max_pdu)
    link = Link(_connect(peer))
    try:
        link.settimeout(peer.acse_timeout)
        link.send_pdu(ASSOCIATE_RQ, rq)
        asked = time.monotonic()
        if not link.wait_readable(peer.acse_timeout, cancel):
            with contextlib.suppress(WireError):
                link.send_pdu(ABORT, bytes(4))
            link.close()
            raise _failed("association request cancelled")
        pdu_type, body = link.read_pdu("association request")
        rtt = time.monotonic() - asked
    except WireError as exc:
        link.close()
        raise _failed(f"association failed: {exc}") from None
    if pdu_type == ASSOCIATE_RJ and len(body) >= 4:
        link.close()
        result, source, reason = body[1], body[2], body[3]
        raise AssociationFailed(
            classify_association(rejected=True, result=result, source=source, diagnostic=reason),
            busy=result == 2,
        )
    if pdu_type == ABORT:
        link.close()
        raise _failed("association aborted by the peer during negotiation")
    if pdu_type != ASSOCIATE_AC:
        link.close()
        raise _failed(f"association failed: PDU type 0x{pdu_type:02X} instead of an answer")
    try:
        ac = decode_associate_ac(body)
    except WireError as exc:
        with contextlib.suppress(WireError):
            link.send_pdu(ABORT, bytes(4))
        link.close()
        raise _failed(f"association failed: {exc}") from None
    assoc = Association(
        peer, link, frozenset((abstract, ts) for _, abstract, ts in proposals), rtt=rtt
    )
    for cx_id, abstract, syntaxes in proposals:
        result, ts = ac.results.get(cx_id, (-1, ""))
        if result == 0 and ts in syntaxes:  # accepted, in a syntax we offered in it
            assoc.accepted.setdefault(abstract, []).append((cx_id, ts))
    if ac.max_pdu > 0:
        assoc.send_pdu = min(ac.max_pdu, _SEND_PDU_CAP)
    link.settimeout(peer.dimse_timeout)
    if not assoc.accepted:
        assoc.abort()  # PS3.8 7.1.1.x: nothing to talk about
    return assoc
