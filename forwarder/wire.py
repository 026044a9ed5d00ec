"""DICOM upper-layer PDUs on a socket the caller owns: framing, P-DATA-TF, DIMSE command sets.

One :class:`Link` per association, used by one thread only, from the connect to the close:
nothing else ever reads or writes its socket. The A-ASSOCIATE exchange is built on it in
``forwarder.association``; the C-STORE and C-ECHO messages of the data phase are here.
Each store goes out with one ``sendall`` per PDU, read from disk with positional reads, and
its response is read with one ``recv`` in the usual case; a socket timeout is the DIMSE
timeout.

The wire formats are PS3.8 9.3 (PDUs) and PS3.7 9.3 (C-STORE-RQ/RSP, C-ECHO-RQ/RSP) and
10.3 (N-ACTION-RQ/RSP, N-EVENT-REPORT-RQ/RSP, for Storage Commitment). A request the peer sends
us on the association (an N-EVENT-REPORT-RQ) is handed to `Link.on_request` and answered on the
spot, also while a response of ours is awaited.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import socket
import ssl
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ABORT",
    "ASSOCIATE_AC",
    "ASSOCIATE_RJ",
    "ASSOCIATE_RQ",
    "C_ECHO_RSP",
    "C_STORE_RSP",
    "N_ACTION_RSP",
    "N_EVENT_REPORT_RQ",
    "PDATA",
    "RELEASE_RP",
    "RELEASE_RQ",
    "VERIFICATION",
    "FileData",
    "Link",
    "Request",
    "RequestHandler",
    "Response",
    "SourceUnreadable",
    "WireError",
    "decode_command",
    "encode_action_command",
    "encode_echo_command",
    "encode_event_report_response",
    "encode_store_command",
]

ASSOCIATE_RQ = 0x01
ASSOCIATE_AC = 0x02
ASSOCIATE_RJ = 0x03
PDATA = 0x04
RELEASE_RQ = 0x05
RELEASE_RP = 0x06
ABORT = 0x07

C_STORE_RSP = 0x8001
C_ECHO_RSP = 0x8030
N_EVENT_REPORT_RQ = 0x0100
N_EVENT_REPORT_RSP = 0x8100
N_ACTION_RQ = 0x0130
N_ACTION_RSP = 0x8130
_NO_DATA_SET = 0x0101

_PDU_HEADER = struct.Struct(">BxL")
_PDV_HEADER = struct.Struct(">LBB")  # item length, context ID, message control header
_HEADERS = _PDU_HEADER.size + _PDV_HEADER.size  # 12 bytes in front of every fragment
MAX_PDU_IN = 1 << 24
"""The largest PDU accepted from a peer (16 MiB); a longer length is nonsense or an attack."""
_RECV_SIZE = 1 << 16  # what one recv asks for
_CANCEL_POLL = 0.1  # how often a wait for a slow peer looks whether it was cancelled
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


if hasattr(os, "preadv"):

    def _read_at(fd: int, buf: memoryview, pos: int) -> int:
        return os.preadv(fd, [buf], pos)

else:  # pragma: no cover - macOS before 11: no preadv

    def _read_at(fd: int, buf: memoryview, pos: int) -> int:
        os.lseek(fd, pos, os.SEEK_SET)
        return os.readv(fd, [buf])


@dataclass(frozen=True)
class FileData:
    """A data set streamed from disk: `head` (in memory, sent first; usually empty) and then
    the file at `path` from `offset` to its end.

    A head is how a transform that changes only the header (``set``/``remove``) sends its
    result: the changed elements from memory, the rest (the pixel data) from the source.
    """

    path: Path
    offset: int
    head: bytes = b""


class SourceUnreadable(Exception):
    """The file could not be opened; nothing of the store was sent (the association is fine)."""

    def __init__(self, error: OSError) -> None:
        self.error = error
        super().__init__(error.strerror or str(error))


class WireError(Exception):
    """The association is unusable (peer aborted, closed, timed out or spoke nonsense).

    ``unsent`` is True when the first write of a message failed: the connection was already
    gone (e.g. the peer aborted the association as soon as it was established), the peer
    cannot have the instance, and it may go again on a fresh association.
    """

    def __init__(self, message: str, *, unsent: bool = False) -> None:
        super().__init__(message)
        self.unsent = unsent


@dataclass(frozen=True)
class Response:
    """A DIMSE response: status, the message it answers, and the peer's error comment."""

    status: int
    message_id: int
    error_comment: str | None = None


@dataclass(frozen=True)
class Request:
    """A DIMSE request the peer sent us: its command elements and data set (None: none)."""

    context_id: int
    command: dict[int, bytes]
    data_set: bytes | None

    @property
    def field(self) -> int:
        return _ushort(self.command, 0x00000100) or 0

    @property
    def message_id(self) -> int:
        return _ushort(self.command, 0x00000110) or 0

    def uid(self, tag: int) -> str:
        """A UID element of the command, "" when absent."""
        return self.command.get(tag, b"").rstrip(b"\x00 ").decode("ascii", "replace")


RequestHandler = Callable[[Request], bytes]
"""Answers a request of the peer: returns the command set of the response."""


def _ushort(elems: dict[int, bytes], tag: int) -> int | None:
    value = elems.get(tag)
    return struct.unpack("<H", value[:2])[0] if value is not None and len(value) >= 2 else None


def _element(tag: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def _us(tag: int, value: int) -> bytes:
    return _element(tag, struct.pack("<H", value))


def _group(*elements: bytes) -> bytes:
    body = b"".join(elements)
    return _element(0x00000000, struct.pack("<L", len(body))) + body


def encode_store_command(
    sop_class: str, sop_instance: str, message_id: int, priority: int = 2
) -> bytes:
    """The command set of a C-STORE-RQ, implicit VR little endian (PS3.7 9.3.1.1).

    Raises
    ------
    UnicodeEncodeError
        A UID is not ASCII (``forwarder.dicomfile`` refuses such files before they get here).
    """
    return _group(
        _element(0x00000002, sop_class.encode("ascii")),
        _us(0x00000100, 0x0001),  # Command Field: C-STORE-RQ
        _us(0x00000110, message_id),
        _us(0x00000700, priority),
        _us(0x00000800, 0x0000),  # Command Data Set Type: present
        _element(0x00001000, sop_instance.encode("ascii")),
    )


VERIFICATION = "1.2.840.10008.1.1"


def encode_echo_command(message_id: int) -> bytes:
    """The command set of a C-ECHO-RQ (PS3.7 9.3.5.1)."""
    return _group(
        _element(0x00000002, VERIFICATION.encode("ascii")),
        _us(0x00000100, 0x0030),  # Command Field: C-ECHO-RQ
        _us(0x00000110, message_id),
        _us(0x00000800, 0x0101),  # Command Data Set Type: none
    )


def encode_action_command(
    sop_class: str, sop_instance: str, message_id: int, action_type: int
) -> bytes:
    """The command set of an N-ACTION-RQ with a data set (PS3.7 10.3.4.1)."""
    return _group(
        _element(0x00000003, sop_class.encode("ascii")),  # Requested SOP Class UID
        _us(0x00000100, N_ACTION_RQ),
        _us(0x00000110, message_id),
        _us(0x00000800, 0x0000),  # Command Data Set Type: present
        _element(0x00001001, sop_instance.encode("ascii")),  # Requested SOP Instance UID
        _us(0x00001008, action_type),
    )


def encode_event_report_response(request: Request, status: int) -> bytes:
    """The command set of the N-EVENT-REPORT-RSP answering `request` (PS3.7 10.3.1.2)."""
    elements = [
        _element(0x00000002, request.command.get(0x00000002, b"")),  # Affected SOP Class UID
        _us(0x00000100, N_EVENT_REPORT_RSP),
        _us(0x00000120, request.message_id),
        _us(0x00000800, _NO_DATA_SET),
        _us(0x00000900, status),
    ]
    if 0x00001000 in request.command:  # Affected SOP Instance UID
        elements.append(_element(0x00001000, request.command[0x00001000]))
    if 0x00001002 in request.command:  # Event Type ID
        elements.append(_element(0x00001002, request.command[0x00001002]))
    return _group(*elements)


def decode_command(data: bytes) -> dict[int, bytes]:
    """The elements of an implicit VR little endian command set, by tag."""
    out: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos + 8 <= end:
        group, elem, length = struct.unpack_from("<HHL", data, pos)
        pos += 8
        if pos + length > end:
            raise WireError("malformed command set in the response")
        out[group << 16 | elem] = data[pos : pos + length]
        pos += length
    return out


class Link:
    """PDUs over one connected socket (plain or TLS) that this object alone reads and writes.

    Every failure of the connection is a :class:`WireError`; after one, the link is only
    good for :meth:`close`. Not thread-safe: one association, one thread.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._inbuf = bytearray()  # received and not yet parsed (normally empty)
        self._buf = bytearray()  # one fragment of a file, reused
        self._sent_any = False  # has any byte of the current message gone out?
        self._pdv_queue: collections.deque[tuple[int, int, bytes]] = collections.deque()
        # answers the peer's requests (N-EVENT-REPORT-RQ); None: a request is a protocol error
        self.on_request: RequestHandler | None = None
        self._timeout: float | None = sock.gettimeout()

    # -- plumbing ---------------------------------------------------------------------

    def settimeout(self, seconds: float | None) -> None:
        """The limit for each send and receive from now on (a stalled peer, not a slow file)."""
        if seconds != self._timeout:
            self.sock.settimeout(seconds)
            self._timeout = seconds

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """``sendall``, with every socket error (TLS ones included) a WireError."""
        try:
            self.sock.sendall(data)
        except TimeoutError as exc:
            raise WireError("timed out writing to the peer") from exc
        except OSError as exc:
            raise WireError(
                f"connection lost while sending: {exc.strerror or exc}",
                unsent=not self._sent_any,
            ) from exc
        self._sent_any = True

    def send_pdu(self, pdu_type: int, body: bytes) -> None:
        """One whole PDU: type, reserved byte, length, `body`."""
        self.send(_PDU_HEADER.pack(pdu_type, len(body)) + body)

    def pending(self) -> bool:
        """Has the peer sent something not yet read? Never blocks."""
        if self._inbuf or self._pdv_queue:
            return True
        sock = self.sock
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):  # closed
            return True
        return bool(readable)

    def wait_readable(self, timeout: float, cancel: threading.Event | None = None) -> bool:
        """Wait up to `timeout` for the peer to send something; False when `cancel` is set.

        Raises
        ------
        WireError
            Nothing came within `timeout`.
        """
        deadline = time.monotonic() + timeout
        while not self.pending():
            left = deadline - time.monotonic()
            if left <= 0:
                raise WireError(f"no answer from the peer within {timeout:g} s")
            if cancel is not None and cancel.is_set():
                return False
            with contextlib.suppress(OSError, ValueError):
                select.select([self.sock], [], [], min(left, _CANCEL_POLL))
        return True

    def _quickack(self) -> None:
        """Re-arm TCP_QUICKACK: the kernel drops out of quick-ACK mode on its own.

        A peer that leaves Nagle on (Debian's DCMTK) holds the second half of its response
        until our ACK of the first; a delayed ACK makes that 40 ms per store.
        """
        if _QUICKACK is not None:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)

    def _recv_at_least(self, n: int, what: str) -> None:
        """Receive until `n` bytes are buffered; a response usually comes in one `recv`.

        Whatever the peer sends is read in one go (a C-STORE-RSP PDU is ~100 bytes). Bytes
        past the PDU stay buffered for the next read.
        """
        sock = self.sock
        data = self._inbuf
        with self._receiving(what):
            while len(data) < n:
                self._quickack()
                chunk = sock.recv(max(n - len(data), _RECV_SIZE))
                if not chunk:
                    raise WireError("the peer closed the connection")
                data += chunk

    @contextlib.contextmanager
    def _receiving(self, what: str) -> Iterator[None]:
        """Socket errors while receiving as WireErrors; `what` names a timeout."""
        try:
            yield
        except TimeoutError as exc:
            raise WireError(f"{what}: no answer from the peer within {self._timeout:g} s") from exc
        except OSError as exc:  # reset, TLS error
            raise WireError(f"connection lost: {exc.strerror or exc}") from exc

    def _take(self, n: int, what: str) -> bytes:
        self._recv_at_least(n, what)
        out = bytes(self._inbuf[:n])
        del self._inbuf[:n]
        return out

    def read_pdu(self, what: str = "DIMSE timeout") -> tuple[int, bytes]:
        """The next PDU from the peer: its type and body. `what` names a timeout."""
        pdu_type, length = _PDU_HEADER.unpack(self._take(6, what))
        if length > MAX_PDU_IN:
            raise WireError(f"PDU of {length} bytes from the peer")
        return pdu_type, self._take(length, what)

    def read_pdu_into(self, what: str = "DIMSE timeout") -> tuple[int, bytes | bytearray]:
        """`read_pdu` for an acceptor's data phase: a large body is received straight into a
        buffer of its own (no copy through the read buffer)."""
        pdu_type, length = _PDU_HEADER.unpack(self._take(6, what))
        if length > MAX_PDU_IN:
            raise WireError(f"PDU of {length} bytes from the peer")
        have = len(self._inbuf)
        if length <= have or length < _RECV_SIZE:
            return pdu_type, self._take(length, what)
        body = bytearray(length)
        body[:have] = self._inbuf
        self._inbuf.clear()
        pos = have
        with memoryview(body) as view, self._receiving(what):
            while pos < length:
                self._quickack()
                n = self.sock.recv_into(view[pos:], length - pos)
                if not n:
                    raise WireError("the peer closed the connection")
                pos += n
        return pdu_type, body

    # -- the data phase ---------------------------------------------------------------

    @staticmethod
    def _pdu_header(buf: bytearray | memoryview, at: int, cx_id: int, mch: int, n: int) -> None:
        _PDU_HEADER.pack_into(buf, at, PDATA, n + 6)
        _PDV_HEADER.pack_into(buf, at + 6, n + 2, cx_id, mch)

    def send_message(
        self,
        cx_id: int,
        command: bytes,
        payload: FileData | tuple[Path, int] | bytes | None,
        max_pdu: int,
    ) -> None:
        """Write one DIMSE request: the command PDU, then the data set in fragments.

        `max_pdu` is the peer's receive limit. The command and a data set that fits in one
        fragment leave in one ``sendall``.

        Raises
        ------
        WireError
            The connection broke (the association is gone).
        SourceUnreadable
            The file could not be opened: nothing was sent, the association is usable.
        OSError
            The file could not be read (a partial data set may be on the wire: the
            association must be aborted).
        """
        # PDV item: 4 bytes length, context ID, control header. Fragments are kept even:
        # DCMTK aborts on an odd one ("DIMSE: Odd Fragment Length").
        frag = (max_pdu - 6) & ~1
        if len(command) > frag:
            raise WireError("command set larger than the peer's PDU")  # never with real UIDs
        self._sent_any = False
        head = bytearray(_HEADERS + len(command))
        self._pdu_header(head, 0, cx_id, 0x03, len(command))
        head[_HEADERS:] = command
        if payload is None:
            self.send(head)
        elif isinstance(payload, bytes):
            chunks = self._fragments(cx_id, payload, frag)
            self.send(bytes(head) + next(chunks))
            for chunk in chunks:
                self.send(chunk)
        elif isinstance(payload, FileData):
            self._send_file(cx_id, head, payload, frag)
        else:
            self._send_file(cx_id, head, FileData(*payload), frag)

    def _fragments(self, cx_id: int, data: bytes, frag: int) -> Iterator[bytes]:
        if len(data) % 2:
            data += b"\x00"  # see _send_file
        total = len(data)
        pos = 0
        while True:
            n = min(frag, total - pos)
            last = pos + n >= total
            out = bytearray(_HEADERS + n)
            self._pdu_header(out, 0, cx_id, 0x02 if last else 0x00, n)
            out[_HEADERS:] = data[pos : pos + n]
            yield bytes(out)
            pos += n
            if last:
                return

    def _send_file(self, cx_id: int, head: bytearray, payload: FileData, frag: int) -> None:
        if len(self._buf) != _HEADERS + frag:
            self._buf = bytearray(_HEADERS + frag)
        buf = self._buf
        view = memoryview(buf)
        try:
            fd = os.open(payload.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:  # nothing is on the wire yet: the association is fine
            raise SourceUnreadable(exc) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # replaced by a folder (open() would have failed)
                raise SourceUnreadable(
                    IsADirectoryError(21, "not a regular file", str(payload.path))
                )
            # positional reads: no seeks (every system call lets another thread take the GIL)
            pos = payload.offset
            first = memoryview(payload.head)  # sent before the file's bytes
            remaining = len(first) + st.st_size - payload.offset
            pending: bytes | None = bytes(head)  # the command rides with the first fragment
            while True:
                n = min(frag, remaining)
                k = min(n, len(first))
                if k:
                    view[_HEADERS : _HEADERS + k] = first[:k]
                    first = first[k:]
                got = _read_at(fd, view[_HEADERS + k : _HEADERS + n], pos) if n > k else 0
                if got != n - k:
                    raise OSError(5, "file shrank while it was being sent")
                pos += got
                remaining -= n
                if n % 2:  # only ever the last fragment: `frag` is even
                    # An odd-length data set: a deflated one whose stream was not padded
                    # (image_dfl.dcm). PDVs must be even, so pad with a NUL as the
                    # deflate encoders do; DCMTK aborts the association otherwise.
                    buf[_HEADERS + n] = 0
                    n += 1
                self._pdu_header(buf, 0, cx_id, 0x00 if remaining else 0x02, n)
                if pending is not None:
                    self.send(pending + view[: _HEADERS + n])
                    pending = None
                else:
                    self.send(view[: _HEADERS + n])
                if not remaining:
                    return
        finally:
            os.close(fd)

    def read_response(self, field: int = C_STORE_RSP) -> Response:
        """Read PDUs until a complete response arrives; decode it as `field`.

        Requests of the peer met on the way (an N-EVENT-REPORT-RQ) are answered through
        `on_request` and the wait goes on. A data set after the response (an N-ACTION reply)
        is read and dropped.

        Raises
        ------
        WireError
            Timeout, abort, release request or anything but the expected response.
        """
        while True:
            cx_id, command = self._read_command()
            elems = decode_command(command)
            kind = _ushort(elems, 0x00000100)
            if kind is not None and not kind & 0x8000:  # a request of the peer
                self._serve(cx_id, elems)
                continue
            if _ushort(elems, 0x00000800) not in (None, _NO_DATA_SET):
                self._read_data_set()
            return _response(elems, field)

    def serve_pending(self) -> None:
        """Answer the request whose first PDU is waiting (see `peek_pdu_type`).

        Raises
        ------
        WireError
            What came is not a request we answer, or the connection failed.
        """
        cx_id, command = self._read_command()
        elems = decode_command(command)
        kind = _ushort(elems, 0x00000100)
        if kind is None or kind & 0x8000:
            raise WireError("the peer sent a response nobody asked for")
        self._serve(cx_id, elems)

    def peek_pdu_type(self) -> int:
        """The type of the next PDU, without taking it (blocks until a byte comes)."""
        if self._pdv_queue:
            return PDATA
        self._recv_at_least(1, "waiting for the peer")
        return self._inbuf[0]

    def _serve(self, cx_id: int, elems: dict[int, bytes]) -> None:
        data = None
        if _ushort(elems, 0x00000800) not in (None, _NO_DATA_SET):
            data = self._read_data_set()
        request = Request(cx_id, elems, data)
        if self.on_request is None or request.field != N_EVENT_REPORT_RQ:
            raise WireError(f"unexpected request 0x{request.field:04X} from the peer")
        answer = self.on_request(request)
        head = bytearray(_HEADERS + len(answer))
        self._pdu_header(head, 0, cx_id, 0x03, len(answer))
        head[_HEADERS:] = answer
        self.send(head)

    def _next_pdv(self) -> tuple[int, int, bytes]:
        """The next PDV item from the peer: (context ID, control header, fragment).

        A P-DATA-TF may carry several items (the end of a command and the start of its data
        set): the ones not yet asked for wait in ``_pdv_queue``.
        """
        if self._pdv_queue:
            return self._pdv_queue.popleft()
        pdu_type, body = self.read_pdu()
        if pdu_type == ABORT:
            raise WireError("the peer aborted the association (A-ABORT)")
        if pdu_type == RELEASE_RQ:
            raise WireError("the peer asked to release the association mid-transfer")
        if pdu_type != PDATA:
            raise WireError(f"unexpected PDU type 0x{pdu_type:02X} from the peer")
        size = len(body)
        if size < 6:
            raise WireError("P-DATA-TF without a PDV item from the peer")
        item_len, cx, mch = _PDV_HEADER.unpack_from(body, 0)
        end = 4 + item_len
        if item_len < 2 or end > size:
            raise WireError(f"malformed PDV item (length {item_len}) from the peer")
        pos = end
        while pos + 6 <= size:  # more items in this PDU (rare): queued
            n, c, m = _PDV_HEADER.unpack_from(body, pos)
            if n < 2 or pos + 4 + n > size:
                raise WireError(f"malformed PDV item (length {n}) from the peer")
            self._pdv_queue.append((c, m, body[pos + 6 : pos + 4 + n]))
            pos += 4 + n
        return cx, mch, body[6:end]

    def _read_command(self) -> tuple[int, bytes]:
        """The next whole command set: (context ID, bytes)."""
        cx, mch, fragment = self._next_pdv()
        if mch == 0x03:  # the whole command in one fragment: the usual case
            return cx, fragment
        command = bytearray()
        while True:
            if not mch & 0x01:
                raise WireError("the peer sent a data set where a command was due")
            command += fragment
            if mch & 0x02:
                return cx, bytes(command)
            cx, mch, fragment = self._next_pdv()

    def _read_data_set(self) -> bytes:
        """The data set that follows a command (P-DATA PDVs up to the last fragment)."""
        data = bytearray()
        while True:
            _cx, mch, fragment = self._next_pdv()
            if mch & 0x01:
                raise WireError("the peer sent a command where a data set was due")
            data += fragment
            if len(data) > MAX_PDU_IN:
                raise WireError("data set from the peer larger than 16 MiB")
            if mch & 0x02:
                return bytes(data)


def _response(elems: dict[int, bytes], expected: int) -> Response:
    field = elems.get(0x00000100)
    if field is None or struct.unpack("<H", field[:2])[0] != expected:
        raise WireError(f"the peer answered with something other than 0x{expected:04X}")
    status = elems.get(0x00000900)
    msg_id = elems.get(0x00000120)
    if status is None or msg_id is None:
        raise WireError("response without a status or message ID")
    comment = elems.get(0x00000902)
    return Response(
        status=struct.unpack("<H", status[:2])[0],
        message_id=struct.unpack("<H", msg_id[:2])[0],
        error_comment=comment.rstrip(b"\x00 ").decode("latin-1") if comment else None,
    )
