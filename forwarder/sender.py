"""Send DICOM files to one peer over C-STORE: associations, contexts, streaming, outcomes."""

from __future__ import annotations

import array
import contextlib
import logging
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_dataset
from pydicom.uid import UID
from pynetdicom import AE, evt

from forwarder.contexts import (
    MAX_CONTEXTS,
    ContextSpec,
    candidates,
    split_by_contexts,
)
from forwarder.dicomfile import DEFLATED_LE, EXPLICIT_BE, DicomInfo
from forwarder.status import Action, Classification, classify_association, classify_status
from forwarder.wire import Channel, SourceUnreadable, WireError, encode_store_command

if TYPE_CHECKING:  # the settings (pydantic) stay unimported for `forwarder send ADDR PORT`
    from forwarder.config import Destination

__all__ = [
    "AssociationFailed",
    "Peer",
    "Sender",
    "StoreResult",
    "association_failure",
    "client_tls_context",
    "make_ae",
    "request_association",
]

LOGGER = logging.getLogger("forwarder.sender")

# DUL reactor poll delay while we hold the association: it only has to notice a peer's
# A-ABORT or A-RELEASE between batches (the stores themselves bypass it, see wire.py).
_IDLE_LOOP_DELAY = 0.02
# How many fresh associations in a row the peer may drop before a store went out on them
# (then the next file is sent anyway and fails with the reason).
_MAX_DROPPED = 3
# Largest PDU we ever send, whatever the peer allows (0 = unlimited would otherwise put a
# whole file in one PDV, read into memory at once).
_SEND_PDU_CAP = 1 << 20


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


@dataclass(frozen=True)
class StoreResult:
    """The outcome of sending one file once."""

    info: DicomInfo
    classification: Classification
    transfer_syntax: str | None = None  # what it went out as
    how: str = ""  # "as is", "convert", "decompress", or "" when not sent
    seconds: float = 0.0

    @property
    def delivered(self) -> bool:
        return self.classification.delivered


class AssociationFailed(Exception):
    """No association could be established; ``classification`` says why and what to do."""

    def __init__(self, classification: Classification) -> None:
        self.classification = classification
        super().__init__(classification.describe())


class _ConnectErrors(logging.Filter):
    """Catch pynetdicom's multi-line association failure logs; keep the reason for our line.

    pynetdicom logs a failed connect as two ERROR lines plus a traceback for TLS errors,
    and a rejection as three ERROR lines ("Association Rejected", "Result: ...",
    "Reason: ..."), from its own threads. The sender reports one line per failed
    association instead, naming the reason (refused, timed out, TLS verification failed,
    rejected: called AE title not recognised ...).
    """

    def __init__(self) -> None:
        super().__init__()
        self.last: str | None = None  # the detail for the next failed association

    def filter(self, record: logging.LogRecord) -> bool:
        if record.funcName == "connect" and record.pathname.endswith("transport.py"):
            msg = record.getMessage()
            if msg.startswith("TCP Initialisation Error: "):
                self.last = "cannot connect: " + msg.removeprefix("TCP Initialisation Error: ")
            return False
        if record.funcName == "_negotiate_as_requestor" and record.pathname.endswith("acse.py"):
            # our own association's negotiation: rejections are described from the
            # A-ASSOCIATE-RJ, the rest (ACSE timeout, abort) kept as the detail
            msg = record.getMessage()
            if record.levelno >= logging.ERROR and not msg.startswith(
                ("Association Rejected", "Result: ", "Reason: ", "No accepted presentation")
            ):
                self.last = msg
            return record.levelno < logging.ERROR
        return True


_CONNECT_ERRORS = _ConnectErrors()


def _install_connect_filter() -> None:
    for name in ("pynetdicom.transport", "pynetdicom.acse"):
        log = logging.getLogger(name)  # logger filters don't see children
        if _CONNECT_ERRORS not in log.filters:
            log.addFilter(_CONNECT_ERRORS)


@dataclass
class _Assoc:
    assoc: Any
    proposed: frozenset[ContextSpec]
    accepted: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # class -> ids
    msg_id: int = 0
    paused: bool = False


def _tune_socket(event: Any) -> None:
    """EVT_CONN_OPEN: TCP_NODELAY, and TCP_QUICKACK re-armed around every receive.

    pynetdicom never sets TCP_NODELAY, so small stores wait on Nagle + delayed ACK; peers
    that leave Nagle on (Debian's DCMTK) stall on every response unless we ACK at once.
    """
    asock = event.assoc.dul.socket
    raw = asock.socket
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if quickack is None:
        return

    def _arm() -> None:
        with contextlib.suppress(OSError):
            raw.setsockopt(socket.IPPROTO_TCP, quickack, 1)

    original = asock.recv

    def recv(nr_bytes: int) -> bytearray:
        _arm()
        data: bytearray = original(nr_bytes)
        _arm()
        return data

    _arm()
    asock.recv = recv


def make_ae(peer: Peer) -> AE:
    """A pynetdicom AE with the peer's calling AE title, timeouts and receive PDU limit."""
    ae = AE(ae_title=peer.calling_aet)
    ae.acse_timeout = peer.acse_timeout
    ae.dimse_timeout = peer.dimse_timeout
    ae.network_timeout = peer.network_timeout
    ae.connection_timeout = peer.connect_timeout
    ae.maximum_pdu_size = peer.max_pdu
    return ae


def request_association(ae: AE, peer: Peer, contexts: Iterable[tuple[str, Sequence[str]]]) -> Any:
    """Request an association with `peer` proposing `contexts` (abstract syntax, syntaxes).

    Returns pynetdicom's Association, established or not: `association_failure` says why
    one was not, in one line. The socket is tuned (TCP_NODELAY, TCP_QUICKACK).
    """
    ae.requested_contexts = []
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, list(syntaxes))
    kwargs: dict[str, Any] = {
        "ae_title": peer.called_aet,
        "max_pdu": peer.max_pdu,
        "evt_handlers": [(evt.EVT_CONN_OPEN, _tune_socket)],
    }
    if peer.tls is not None:
        kwargs["tls_args"] = (peer.tls, peer.tls_server_name or peer.host)
    _install_connect_filter()
    _CONNECT_ERRORS.last = None
    return ae.associate(peer.host, peer.port, **kwargs)


class Sender:
    """Send files to one peer, many per association; one Sender per thread.

    The association is kept open between calls to :meth:`send` (release it with
    :meth:`release` after an idle linger), re-established after an abort or a timeout,
    and re-negotiated when a batch needs presentation contexts it does not have.
    """

    def __init__(
        self,
        peer: Peer,
        *,
        restrict: str | None = None,
        stop: threading.Event | None = None,
        on_event: Callable[[str, str], None] | None = None,
    ) -> None:
        self.peer = peer
        self.restrict = restrict
        self.stop = stop or threading.Event()
        self._on_event = on_event
        self._current: _Assoc | None = None
        self._seen: dict[ContextSpec, None] = {}  # proposed before, most recent last
        self.associations = 0  # how many were established (for stats and tests)
        self._ae = make_ae(peer)

    # -- association handling -------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._current is not None and bool(self._current.assoc.is_established)

    def _log(self, level: int, msg: str) -> None:
        LOGGER.log(level, msg)
        if self._on_event is not None:
            self._on_event(logging.getLevelName(level), msg)

    def _associate(self, specs: Sequence[ContextSpec]) -> _Assoc:
        self._log(logging.INFO, f"Requesting Association with {self.peer.label}")
        assoc = request_association(
            self._ae, self.peer, ((spec.sop_class, spec.transfer_syntaxes) for spec in specs)
        )
        if not assoc.is_established:
            prim = assoc.acceptor.primitive
            if prim is not None and getattr(prim, "result", None) == 0:
                # accepted at ACSE level, but not one presentation context: pynetdicom aborts
                self._log(logging.ERROR, "No accepted presentation contexts")
                return _Assoc(assoc, frozenset(specs))
            raise AssociationFailed(association_failure(assoc))
        self.associations += 1
        current = _Assoc(assoc, frozenset(specs))
        for cx in assoc.accepted_contexts:
            current.accepted.setdefault(str(cx.abstract_syntax), []).append(
                (int(cx.context_id or 0), str(cx.transfer_syntax[0]))
            )
        self._log(logging.INFO, "Association Accepted")
        return current

    def release(self) -> None:
        """Release the current association, if any (abort it if release fails)."""
        current, self._current = self._current, None
        if current is None:
            return
        assoc = current.assoc
        self._resume(current)
        if assoc.is_established:
            self._log(logging.INFO, "Releasing Association")
            try:
                assoc.release()
            except Exception:  # pragma: no cover - pynetdicom internals
                assoc.abort()
        elif not assoc.is_aborted and not assoc.is_released:
            assoc.abort()

    def abort(self) -> None:
        """Abort the current association at once (shutdown with work in flight)."""
        current, self._current = self._current, None
        if current is not None:
            self._resume(current)
            current.assoc.abort()

    def close(self) -> None:
        self.release()

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pause(self, current: _Assoc) -> None:
        """Park the association reactor for as long as we hold the association.

        The stores run on the borrowed socket (see `forwarder.wire`), so the reactor has
        nothing to do but poll every millisecond; release() and abort() wake it again.
        """
        if not current.paused:
            current.assoc._reactor_checkpoint.clear()
            current.assoc.dul._run_loop_delay = _IDLE_LOOP_DELAY
            current.paused = True

    def _resume(self, current: _Assoc) -> None:
        if current.paused:
            current.assoc.dul._run_loop_delay = 0.001
            current.assoc._reactor_checkpoint.set()
            current.paused = False

    @staticmethod
    def _alive(current: _Assoc) -> bool:
        assoc = current.assoc
        return bool(assoc.is_established) and assoc.dul.state_machine.current_state == "Sta6"

    def _ensure(self, specs: Sequence[ContextSpec]) -> _Assoc:
        """An established association that proposed every context in `specs`."""
        current = self._current
        if current is not None and self._alive(current) and set(specs) <= current.proposed:
            return current
        self.release()
        for spec in specs:
            self._seen.pop(spec, None)
            self._seen[spec] = None
        # Propose what earlier batches needed too (room permitting), so that a daemon
        # sending a mix of classes keeps one association instead of renegotiating.
        wanted = list(specs)
        for spec in reversed(self._seen):
            if len(wanted) >= MAX_CONTEXTS:
                break
            if spec not in wanted:
                wanted.append(spec)
        self._current = self._associate(wanted)
        return self._current

    # -- sending --------------------------------------------------------------------

    def send(self, items: Iterable[DicomInfo]) -> Iterator[StoreResult]:
        """Send `items` in order, yielding one result per item as soon as it is known.

        Items not yet attempted when `stop` is set are not yielded.

        Raises
        ------
        AssociationFailed
            When no association can be established; items before it were yielded.
        """
        items = list(items)
        pairs = [(i.sop_class_uid, i.transfer_syntax) for i in items]
        groups = split_by_contexts(pairs, self.restrict)
        for specs in groups:
            classes = {s.sop_class for s in specs}
            todo = [i for i in items if i.sop_class_uid in classes]
            yield from self._send_group(specs, todo)

    def _send_group(
        self, specs: Sequence[ContextSpec], todo: list[DicomInfo]
    ) -> Iterator[StoreResult]:
        idx = 0
        dropped = 0  # associations in a row that died before a store went out on them
        while idx < len(todo) and not self.stop.is_set():
            current = self._ensure(specs)
            if not current.accepted:  # the peer took none of these SOP classes
                self._current = None
                for info in todo[idx:]:
                    yield self._store(current, None, info)
                return
            self._pause(current)
            broken = False
            with Channel(current.assoc, self._send_pdu(current), self.peer.dimse_timeout) as ch:
                while idx < len(todo) and not self.stop.is_set():
                    try:
                        if not self._alive(current) and dropped < _MAX_DROPPED:
                            raise _Dropped
                        result = self._store(current, ch, todo[idx], dropped < _MAX_DROPPED)
                    except _Dropped:
                        # The peer aborted or closed it before this file went out (the
                        # reactor read that before the socket was ours): nothing was
                        # sent, so the file gets a fresh association, not a failure.
                        dropped += 1
                        self.abort()
                        break
                    idx += 1
                    if result.classification.status is not None:
                        dropped = 0
                    if result.classification.status is None and result.how:
                        # no response: the association is unusable. Abort it while the
                        # socket is still borrowed: handed back first, pynetdicom's reactor
                        # reads the dead connection and logs a traceback to the operator.
                        broken = True
                        self.abort()
                    yield result
                    if broken:
                        break

    def _send_pdu(self, current: _Assoc) -> int:
        peer_max = int(current.assoc.acceptor.maximum_length or 0)
        if peer_max <= 0 or peer_max > _SEND_PDU_CAP:
            return _SEND_PDU_CAP
        return max(peer_max, 1024)

    def _store(
        self, current: _Assoc, ch: Channel | None, info: DicomInfo, may_resend: bool = False
    ) -> StoreResult:
        start = time.monotonic()
        accepted = current.accepted.get(info.sop_class_uid, [])
        ts_to_id = {ts: cx for cx, ts in accepted}
        options = candidates(info.transfer_syntax, list(ts_to_id))
        if not options:
            meaning = f"peer accepted no presentation context for {_name(info.sop_class_uid)}"
            if accepted:
                meaning = (
                    f"peer accepted {_name(info.sop_class_uid)} only in "
                    f"{', '.join(_name(ts) for ts in ts_to_id)}; the file is in "
                    f"{_name(info.transfer_syntax)} and cannot be converted"
                )
            return StoreResult(info, Classification(Action.PERMANENT, meaning))
        assert ch is not None
        last_error = ""
        for ts, how in options:
            try:
                payload = self._payload(info, ts, how)
            except _ConversionError as exc:
                last_error = str(exc)
                continue
            except OSError as exc:
                return StoreResult(info, _unreadable(exc))
            try:
                cls = self._c_store(current, ch, info, ts_to_id[ts], payload, may_resend)
            except SourceUnreadable as exc:
                return StoreResult(info, _unreadable(exc.error))
            return StoreResult(info, cls, ts, how, time.monotonic() - start)
        return StoreResult(info, Classification(Action.PERMANENT, last_error))

    def _payload(self, info: DicomInfo, ts: str, how: str) -> tuple[Path, int] | bytes:
        """What to send: the file itself from its data set offset, or re-encoded bytes."""
        if how == "as is":
            return (info.path, info.dataset_offset)
        try:
            ds = dcmread(info.path, force=True)
        except OSError:
            raise
        except Exception as exc:
            raise _ConversionError(
                f"cannot decode the file to convert it: {_one_line(exc)}"
            ) from exc
        if how == "decompress":
            try:
                # keep the instance: pydicom would otherwise give it a new SOP Instance UID
                ds.decompress(generate_instance_uid=False)
            except Exception as exc:
                raise _ConversionError(
                    f"the peer does not accept {_name(info.transfer_syntax)} and the file "
                    f"cannot be decompressed here ({_one_line(exc)}); install "
                    "dicom-forwarder[codecs] or enable that transfer syntax on the peer"
                ) from exc
        target = UID(ts)
        source_little = info.transfer_syntax != EXPLICIT_BE  # decompressed data is LE too
        try:
            if source_little != target.is_little_endian:
                _swap_other_words(ds, source_little)
            return _encode(ds, target.is_implicit_VR, target.is_little_endian, ts == DEFLATED_LE)
        except Exception as exc:  # pydicom cannot write it (bad values, VRs): one line
            raise _ConversionError(
                f"cannot encode the data set as {_name(ts)}: {_one_line(exc)}"
            ) from exc

    def _next_msg_id(self, current: _Assoc) -> int:
        current.msg_id = current.msg_id % 65535 + 1  # 1..65535, then wraps
        return current.msg_id

    def _c_store(
        self,
        current: _Assoc,
        ch: Channel,
        info: DicomInfo,
        cx_id: int,
        payload: tuple[Path, int] | bytes,
        may_resend: bool = False,
    ) -> Classification:
        """One C-STORE on the borrowed socket; classified by its response status.

        Raises `_Dropped` (with `may_resend`) when the association was gone before any
        of the store went out.
        """
        msg_id = self._next_msg_id(current)
        command = encode_store_command(info.sop_class_uid, info.sop_instance_uid, msg_id)
        try:
            ch.send_store(cx_id, command, payload)
            rsp = ch.read_response()
        except WireError as exc:
            if exc.unsent and may_resend:
                raise _Dropped from exc
            return _no_response(str(exc))
        except OSError as exc:  # the file went away or shrank mid-send: data set is cut
            return _no_response(f"read failed while sending: {exc.strerror}")
        if rsp.message_id != msg_id:
            return _no_response(f"response to message {rsp.message_id}, expected {msg_id}")
        cls = classify_status(rsp.status)
        if rsp.error_comment:
            cls = Classification(cls.action, f"{cls.meaning} ({rsp.error_comment})", cls.status)
        return cls


class _ConversionError(Exception):
    pass


class _Dropped(Exception):
    """The association died before a store went out on it: resend on a fresh one."""


def _unreadable(exc: OSError) -> Classification:
    """Our file could not be read: nothing went out, the association is still good."""
    return Classification(Action.UNREADABLE, f"cannot read the file: {exc.strerror or exc}")


def _no_response(detail: str) -> Classification:
    """A store without a valid response (outcome unknown); `detail` says why.

    The detail rides in the classification, so the caller's one line for the file names
    the cause (it used to be a second, separate error line from the sender).
    """
    cls = classify_status(None)
    return Classification(cls.action, f"{cls.meaning}: {detail}")


# Values pydicom writes back as the bytes it read, whatever the target byte order
# (filewriter.write_OWvalue: "does not currently do the byte swapping"), by item size.
_WORD_VRS = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_ARRAY_TYPES = {array.array(t).itemsize: t for t in "QLIH"}


def _swap_other_words(ds: Dataset, source_little: bool) -> None:
    """Byte-swap the OW/OF/OL/OD/OV values of `ds`, nested ones too, in place.

    Converting between big and little endian without this sent pixel data (OW) with each
    16-bit value byte-swapped: MR_small_bigendian arrived as noise. Ambiguous VRs
    ("OB or OW", "US or OW", "US or SS") are resolved first, with the source byte order
    (their raw values are still in it), so that only real word values are swapped.
    """
    correct_ambiguous_vr(ds, source_little)
    for elem in ds.iterall():
        size = _WORD_VRS.get(str(elem.VR))
        value = elem.value
        if size is None or not isinstance(value, bytes) or len(value) % size:
            continue
        words = array.array(_ARRAY_TYPES[size], value)
        words.byteswap()
        elem.value = words.tobytes()


def _encode(ds: Dataset, implicit: bool, little: bool, deflated: bool) -> bytes:
    """The data set encoded for the wire (pynetdicom's `encode`, but raising, not logging).

    pynetdicom's version logs a traceback on failure and returns None; the sender wants
    the reason as one line.
    """
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, little
    write_dataset(fp, ds)
    data = fp.getvalue()
    if deflated:
        deflater = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = deflater.compress(data) + deflater.flush()
        data += b"\x00" if len(data) % 2 else b""
    return data


def association_failure(assoc: Any) -> Classification:
    """Why `assoc` was not established, classified (rejected, refused, timed out, ...)."""
    if assoc.is_rejected:
        prim = assoc.acceptor.primitive
        return classify_association(
            rejected=True,
            result=getattr(prim, "result", None),
            source=getattr(prim, "result_source", None),
            diagnostic=getattr(prim, "diagnostic", None),
        )
    if assoc.acceptor.primitive is None:
        detail = _CONNECT_ERRORS.last or "cannot connect: refused, reset or timed out"
        return classify_association(rejected=False, detail=detail)
    if assoc.is_aborted:
        return classify_association(
            rejected=False, detail="association aborted (no acceptable presentation context?)"
        )
    return classify_association(rejected=False, detail="association not established")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _name(uid: str) -> str:
    u = UID(uid)
    return str(u.name) if u.is_valid and u.name != uid else uid
