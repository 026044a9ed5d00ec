"""The C-STORE data phase on an established association's socket: P-DATA-TF in, P-DATA-TF out.

pynetdicom negotiates, releases and aborts associations; for the stores themselves its
DUL/DIMSE machinery costs ~1.5 ms of Python per instance across two threads (queues, a
state machine, pydicom-encoded command sets, a polling reactor), and its association
reactor can steal a response from ``send_c_store``. While a batch is in flight this
module borrows the socket instead: the DUL reactor is told the socket has nothing to
read, and the stores are written and their responses read here, synchronously, with
one ``sendall`` per PDU and a socket timeout as the DIMSE timeout.

The wire format is PS3.8 9.3.5 (P-DATA-TF) and PS3.7 9.3.1 (C-STORE-RQ/RSP).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom.transport import AssociationSocket

__all__ = [
    "Channel",
    "Response",
    "SourceUnreadable",
    "WireError",
    "decode_command",
    "encode_store_command",
]

_PDATA = 0x04
_RELEASE_RQ = 0x05
_ABORT = 0x07
_PDU_HEADER = struct.Struct(">BxL")
_PDV_HEADER = struct.Struct(">LBB")  # item length, context ID, message control header
_HEADERS = _PDU_HEADER.size + _PDV_HEADER.size  # 12 bytes in front of every fragment
_MAX_PDU_IN = 1 << 24  # refuse absurd PDU lengths from a peer (16 MiB)
_RECV_SIZE = 1 << 16  # what one recv asks for
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


if hasattr(os, "preadv"):

    def _read_at(fd: int, buf: memoryview, pos: int) -> int:
        return os.preadv(fd, [buf], pos)

else:  # pragma: no cover - macOS before 11: no preadv

    def _read_at(fd: int, buf: memoryview, pos: int) -> int:
        os.lseek(fd, pos, os.SEEK_SET)
        return os.readv(fd, [buf])


class SourceUnreadable(Exception):
    """The file could not be opened; nothing of the store was sent (the association is fine)."""

    def __init__(self, error: OSError) -> None:
        self.error = error
        super().__init__(error.strerror or str(error))


class WireError(Exception):
    """The association is unusable (peer aborted, closed, timed out or spoke nonsense).

    ``unsent`` is True when the first write of a store failed: the connection was already
    gone (e.g. the peer aborted the association as soon as it was established), the peer
    cannot have the instance, and it may go again on a fresh association.
    """

    def __init__(self, message: str, *, unsent: bool = False) -> None:
        super().__init__(message)
        self.unsent = unsent


@dataclass(frozen=True)
class Response:
    """A C-STORE-RSP: status, plus the error comment when the peer gave one."""

    status: int
    message_id: int
    error_comment: str | None = None


def _element(tag: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def _us(tag: int, value: int) -> bytes:
    return _element(tag, struct.pack("<H", value))


def encode_store_command(
    sop_class: str, sop_instance: str, message_id: int, priority: int = 2
) -> bytes:
    """The command set of a C-STORE-RQ, implicit VR little endian (PS3.7 9.3.1.1)."""
    body = b"".join(
        (
            _element(0x00000002, sop_class.encode("ascii")),
            _us(0x00000100, 0x0001),  # Command Field: C-STORE-RQ
            _us(0x00000110, message_id),
            _us(0x00000700, priority),
            _us(0x00000800, 0x0000),  # Command Data Set Type: present
            _element(0x00001000, sop_instance.encode("ascii")),
        )
    )
    return _element(0x00000000, struct.pack("<L", len(body))) + body


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


_BORROW_LOCK = threading.Lock()
"""Makes the reactor's look at a socket and a `Channel` borrowing it mutually exclusive.

Without it the reactor could read the flag (not borrowed), lose the GIL, and run its
``select`` after a batch had started and a response had arrived: it then read that response
(pynetdicom logged "Connection closed before the entire PDU was received" and "timed out")
and the batch waited out the DIMSE timeout for it (seen once in a few dozen daemon bursts)."""


class _BorrowedSocket(AssociationSocket):
    """An AssociationSocket whose reactor sees nothing to read while it is borrowed."""

    _fwd_borrowed = False

    @property
    def ready(self) -> bool:
        with _BORROW_LOCK:
            if self._fwd_borrowed:
                return False
            return bool(super().ready)


class Channel:
    """Borrow an established association's socket for a batch of C-STOREs.

    Use as a context manager around the batch; the socket goes back to pynetdicom on exit.
    After a :class:`WireError` the association must be aborted, never reused.
    """

    def __init__(self, assoc: Any, max_pdu: int, dimse_timeout: float) -> None:
        self._assoc = assoc
        self._asock = assoc.dul.socket
        self._sock: socket.socket = self._asock.socket
        # PDV item: 4 bytes length, context ID, control header. Fragments are kept even:
        # DCMTK aborts on an odd one ("DIMSE: Odd Fragment Length").
        self._fragment = (max_pdu - 6) & ~1
        self._timeout = dimse_timeout
        self._buf = bytearray(_HEADERS + self._fragment)
        self._inbuf = bytearray()  # received and not yet parsed (normally empty)
        self._saved_timeout: float | None = None
        self._sent_any = False  # has any byte of the current store gone out?

    def __enter__(self) -> Channel:
        with _BORROW_LOCK:
            if self._asock.__class__ is not _BorrowedSocket:
                self._asock.__class__ = _BorrowedSocket
            self._asock._fwd_borrowed = True
        self._saved_timeout = self._sock.gettimeout()
        self._sock.settimeout(self._timeout)
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self._sock.settimeout(self._saved_timeout)
        with _BORROW_LOCK:
            self._asock._fwd_borrowed = False
        self._assoc.dul._idle_timer.restart()

    # -- sending --------------------------------------------------------------------

    def _pdu_header(
        self, buf: bytearray | memoryview, at: int, cx_id: int, mch: int, n: int
    ) -> None:
        _PDU_HEADER.pack_into(buf, at, _PDATA, n + 6)
        _PDV_HEADER.pack_into(buf, at + 6, n + 2, cx_id, mch)

    def send_store(
        self,
        cx_id: int,
        command: bytes,
        payload: tuple[Path, int] | bytes,
    ) -> None:
        """Write one C-STORE-RQ: the command PDU, then the data set in fragments.

        The command and a data set that fits in one fragment leave in one ``sendall``.

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
        frag = self._fragment
        if len(command) > frag:
            raise WireError("command set larger than the peer's PDU")  # never with real UIDs
        self._sent_any = False
        head = bytearray(_HEADERS + len(command))
        self._pdu_header(head, 0, cx_id, 0x03, len(command))
        head[_HEADERS:] = command
        if isinstance(payload, bytes):
            chunks: Iterator[bytes | memoryview] = self._fragments(cx_id, payload)
            first = next(chunks)
            self._send(bytes(head) + bytes(first))
            for chunk in chunks:
                self._send(chunk)
            return
        self._send_file(cx_id, head, payload)

    def _send(self, data: bytes | memoryview) -> None:
        """``sendall``, with every socket error a WireError.

        Only ConnectionError used to be: a socket pynetdicom had already closed under us
        (it read the peer's A-ABORT just before we borrowed the socket) raised EBADF,
        which the sender took for a failed *file* read. TLS errors are OSErrors too.
        """
        try:
            self._sock.sendall(data)
        except TimeoutError as exc:
            raise WireError("timed out writing to the peer") from exc
        except OSError as exc:
            if self._sock.fileno() == -1:  # closed on our side: pynetdicom read an abort
                raise WireError(
                    "the association was closed under us (the peer aborted it)",
                    unsent=not self._sent_any,
                ) from exc
            raise WireError(
                f"connection lost while sending: {exc.strerror or exc}",
                unsent=not self._sent_any,
            ) from exc
        self._sent_any = True

    def _fragments(self, cx_id: int, data: bytes) -> Iterator[bytes]:
        if len(data) % 2:
            data += b"\x00"  # see _send_file
        frag = self._fragment
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

    def _send_file(self, cx_id: int, head: bytearray, payload: tuple[Path, int]) -> None:
        path, offset = payload
        frag = self._fragment
        buf = self._buf
        view = memoryview(buf)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:  # nothing is on the wire yet: the association is fine
            raise SourceUnreadable(exc) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # replaced by a folder (open() would have failed)
                raise SourceUnreadable(IsADirectoryError(21, "not a regular file", str(path)))
            # positional reads: no seeks (every system call lets another thread take the GIL)
            pos = offset
            remaining = st.st_size - offset
            pending: bytes | None = bytes(head)  # the command rides with the first fragment
            while True:
                n = min(frag, remaining)
                got = _read_at(fd, view[_HEADERS : _HEADERS + n], pos) if n else 0
                if got != n:
                    raise OSError(5, "file shrank while it was being sent")
                pos += n
                remaining -= n
                if n % 2:  # only ever the last fragment: `frag` is even
                    # An odd-length data set: a deflated one whose stream was not padded
                    # (image_dfl.dcm). PDVs must be even, so pad with a NUL as the
                    # deflate encoders do; DCMTK aborted the association otherwise.
                    buf[_HEADERS + n] = 0
                    n += 1
                self._pdu_header(buf, 0, cx_id, 0x00 if remaining else 0x02, n)
                if pending is not None:
                    self._send(pending + view[: _HEADERS + n])
                    pending = None
                else:
                    self._send(view[: _HEADERS + n])
                if not remaining:
                    return
        finally:
            os.close(fd)

    # -- receiving ------------------------------------------------------------------

    def _quickack(self) -> None:
        """Re-arm TCP_QUICKACK: the kernel drops out of quick-ACK mode on its own.

        A peer that leaves Nagle on (Debian's DCMTK) holds the second half of its response
        until our ACK of the first; a delayed ACK makes that 40 ms per store.
        """
        if _QUICKACK is not None:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)

    def _recv_at_least(self, n: int) -> None:
        """Receive until `n` bytes are buffered; a response usually comes in one `recv`.

        Whatever the peer sends is read in one go (a C-STORE-RSP PDU is ~100 bytes): exact
        reads took two ``recv`` (PDU header, then body) and two TCP_QUICKACK re-arms per
        store. Bytes past the response stay in the buffer for the next one; a peer sends
        nothing unasked on an association without asynchronous operations but an A-ABORT,
        and that ends the connection whether or not we parse it.
        """
        sock = self._sock
        data = self._inbuf
        try:
            while len(data) < n:
                self._quickack()
                chunk = sock.recv(max(n - len(data), _RECV_SIZE))
                if not chunk:
                    raise WireError("the peer closed the connection")
                data += chunk
        except TimeoutError as exc:
            raise WireError("DIMSE timeout: no response from the peer") from exc
        except OSError as exc:  # reset, or closed under us (EBADF): see _send
            if sock.fileno() == -1:
                msg = "the association was closed under us (the peer aborted it)"
                raise WireError(msg) from exc
            raise WireError(f"connection lost: {exc.strerror or exc}") from exc

    def _take(self, n: int) -> bytes:
        self._recv_at_least(n)
        out = bytes(self._inbuf[:n])
        del self._inbuf[:n]
        return out

    def read_response(self) -> Response:
        """Read PDUs until a complete command message arrives; decode the C-STORE-RSP.

        Raises
        ------
        WireError
            Timeout, abort, release request or anything but a C-STORE-RSP.
        """
        command = bytearray()
        while True:
            pdu_type, length = _PDU_HEADER.unpack(self._take(6))
            if length > _MAX_PDU_IN:
                raise WireError(f"PDU of {length} bytes from the peer")
            body = self._take(length)
            if pdu_type == _ABORT:
                raise WireError("the peer aborted the association (A-ABORT)")
            if pdu_type == _RELEASE_RQ:
                raise WireError("the peer asked to release the association mid-transfer")
            if pdu_type != _PDATA:
                raise WireError(f"unexpected PDU type 0x{pdu_type:02X} from the peer")
            pos = 0
            while pos + 6 <= len(body):
                item_len, _cx, mch = _PDV_HEADER.unpack_from(body, pos)
                fragment = body[pos + 6 : pos + 4 + item_len]
                pos += 4 + item_len
                if not mch & 0x01:
                    raise WireError("the peer sent a data set where a response was due")
                command += fragment
                if mch & 0x02:
                    return _response(bytes(command))


def _response(command: bytes) -> Response:
    elems = decode_command(command)
    field = elems.get(0x00000100)
    if field is None or struct.unpack("<H", field[:2])[0] != 0x8001:
        raise WireError("the peer answered with something other than a C-STORE-RSP")
    status = elems.get(0x00000900)
    msg_id = elems.get(0x00000120)
    if status is None or msg_id is None:
        raise WireError("C-STORE-RSP without a status or message ID")
    comment = elems.get(0x00000902)
    return Response(
        status=struct.unpack("<H", status[:2])[0],
        message_id=struct.unpack("<H", msg_id[:2])[0],
        error_comment=comment.rstrip(b"\x00 ").decode("latin-1") if comment else None,
    )
