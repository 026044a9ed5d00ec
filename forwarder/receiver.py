"""The receiver: a C-STORE SCP that answers success only once an instance is durable.

Associations are accepted on a listening socket, one thread each, and served by
``forwarder.acceptor`` (our own acceptor on ``forwarder.wire``: pynetdicom's took four to six
times longer per instance). An instance's data set is written as it arrives, never decoded,
behind a file meta made from the negotiated transfer syntax (memory stays flat whatever its
size). Where it is written, and what happens before the answer:

- **The ack log** (`forwarder.acklog`; the usual way): into the segment the association
  holds. Once complete it is inspected in place (`forwarder.dicomfile.inspect_stream`, with
  the attributes the routing rules name) and routed (`forwarder.routing.Router.route`, with
  the reserved keys ``calling_aet``, ``called_aet`` and ``peer``); its record (folder, UIDs,
  destinations) and header are written and synced; 0x0000 is answered. The lander thread then
  gives it its file ``<dir>/<calling AE>/<SOP Instance UID>.dcm`` and its outbox rows, and
  wakes the workers.
- **The direct way** (an instance larger than its segment's room, no segment free, or the
  lander failing): into a spool file in ``<dir>/.incoming`` (a `SpoolFile`, written in 1 MiB
  pieces); inspected and routed as above; linked under its final name (never over another
  file), its spool name removed, its data fsynced; its folder fsynced and its outbox rows
  committed by a `GroupCommit` shared by the associations; then 0x0000.

A spool or segment that cannot be written (disk full), or an outbox that cannot be: 0xA700,
and nothing is left behind. A data set that is not DICOM, is cut short or has no SOP Instance
UID: 0xC000 with an error comment. An instance that no destination wants follows
``routing.unmatched`` (the direct way), and is answered success.

At start the ack log's records not yet queued are found (`AckLog.open`), then (`sweep`) spool
files left by a crash are removed, and so is every file in `dir` that has no outbox row: its
record makes it again, or it came the direct way and was never acknowledged (the modality,
which saw no success, sends it again). A file whose rows are all final is handed to the
disposer. Then the lander queues the records found, and the receiver listens.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from forwarder import filing
from forwarder.acceptor import (
    CALLED_AET_NOT_RECOGNISED,
    CALLING_AET_NOT_RECOGNISED,
    LOCAL_LIMIT_EXCEEDED,
    Proposal,
    Rejection,
    accept,
    decode_associate_rq,
    encode_associate_ac,
    encode_associate_rj,
    file_meta,
    is_storage,
    serve,
)
from forwarder.acklog import FOLDER, ROOM, AckLog, AckSink, Lander, Record, Segment
from forwarder.config import ReceiveSettings, ReceiveTLSSettings, RetrySettings
from forwarder.dicomfile import DicomInfo, InvalidDicom, inspect, inspect_stream
from forwarder.dispose import Disposer
from forwarder.enqueue import Intake
from forwarder.filing import fsync_dir
from forwarder.groupcommit import GroupCommit
from forwarder.logs import fields
from forwarder.metrics import NO_METRICS, Metrics, parse_listen
from forwarder.outbox import FINAL_STATES, Outbox, OutboxCorruptError, OutboxError
from forwarder.policy import RetryLimits
from forwarder.sidecar import Sidecar
from forwarder.wire import (
    ABORT,
    ASSOCIATE_AC,
    ASSOCIATE_RJ,
    ASSOCIATE_RQ,
    VERIFICATION,
    Link,
    Request,
    WireError,
)

__all__ = [
    "INCOMING",
    "Receiver",
    "SpoolFile",
    "folder_name",
    "server_context",
    "sweep",
]

LOGGER = logging.getLogger("forwarder.receiver")

INCOMING = ".incoming"
"""The folder of `receive.dir` where instances are written while they arrive."""
ACKLOG_WAIT = 5.0
"""Seconds a start waits for the ack log while a receiver stopped just before (a reload) ends
(with `stop`'s 5 s, within half of the unit's WatchdogSec=30)."""
SPOOL_CHUNK = 1 << 20
"""A spool file is written in pieces of this size (the data set arrives one PDV at a time)."""
MAX_PDU = 1 << 20
"""The largest PDU we accept: fewer, larger PDUs cost less Python per byte."""
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
NOT_THIS_SOP_CLASS = 0xA900
LISTEN_BACKLOG = 64
ACCEPT_POLL_SECONDS = 0.5
"""How often the listening thread looks whether it is told to stop."""
ACSE_TIMEOUT = 30.0
"""Seconds for the TLS handshake and the A-ASSOCIATE-RQ after a connection opens."""
NETWORK_TIMEOUT = 60.0
"""An association silent for this long is aborted."""
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def folder_name(aet: str) -> str:
    """A calling AE title as a folder name: letters, digits, ``-`` and ``_`` as they are,
    anything else (``/``, ``.``, blanks) as ``%XX``; reversible, never ``.`` or ``..``."""
    text = aet.strip() or "-"
    return "".join(ch if ch in _SAFE else f"%{ord(ch):02X}" for ch in text)


def server_context(tls: ReceiveTLSSettings) -> ssl.SSLContext:
    """The TLS context of the receiver; raises ssl.SSLError or OSError for bad files."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.ca is not None:
        ctx.load_verify_locations(cafile=str(tls.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    if tls.ca is None:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class SpoolFile:
    """Where a received data set is written while it arrives: a file in ``<dir>/.incoming``.

    A write error (a full disk) is kept, not raised: raised, it would end the association;
    kept, the store is answered 0xA700 once the data set is complete (`finish` raises it
    then), and the modality sends it again later.
    """

    def __init__(self, directory: Path) -> None:
        fd, name = tempfile.mkstemp(suffix=".dcm", dir=directory)
        self.name = name
        self.error: OSError | None = None
        self.invalid: str | None = None  # the C-STORE itself is unusable (answered 0xC000)
        self.size = 0
        self._fd: int | None = fd
        self._buf = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.error is None:
            self._buf += data
            if len(self._buf) >= SPOOL_CHUNK:
                self._drain()
        return len(data)

    def _drain(self) -> None:
        if self._fd is None or self.error is not None:
            return
        view = memoryview(self._buf)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            self.error = exc
        finally:
            view.release()
            self.size += len(self._buf)
            self._buf.clear()

    def complete(self) -> None:
        """Write what is buffered; raises the first write error (OSError)."""
        self._drain()
        if self.error is not None:
            raise self.error

    def sync(self) -> None:
        """fsync the data written (after `complete`); raises OSError."""
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            self._buf.clear()
            os.close(fd)

    def discard(self) -> None:
        """Close and remove the spool file (a file already gone is fine)."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.name)


class _Refused(Exception):
    """A store answered with an error status (and the comment that goes with it)."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


@dataclass(frozen=True)
class _Facts:
    calling_aet: str
    called_aet: str
    peer: str

    def mapping(self) -> dict[str, str]:
        return {"calling_aet": self.calling_aet, "called_aet": self.called_aet, "peer": self.peer}


class _Rate:
    """Instances received per minute, for the last day (status: last hour and day)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._minutes: deque[tuple[int, int]] = deque()

    def add(self, now: float) -> None:
        minute = int(now // 60)
        with self._lock:
            if self._minutes and self._minutes[-1][0] == minute:
                self._minutes[-1] = (minute, self._minutes[-1][1] + 1)
            else:
                self._minutes.append((minute, 1))
            while self._minutes and self._minutes[0][0] <= minute - 1440:
                self._minutes.popleft()

    def since(self, now: float, seconds: float) -> int:
        first = int((now - seconds) // 60) + 1
        with self._lock:
            return sum(n for m, n in self._minutes if m >= first)


def sweep(
    directory: Path,
    outbox: Outbox,
    disposer: Disposer,
    records: Iterable[Record] = (),
) -> tuple[int, int]:
    """Clean `directory` at start: spool files left by a crash, and received files that have
    no outbox row, are removed; a file whose rows are all final is disposed of. A file with no
    row whose ack log record is among `records` was being landed (the record makes it again);
    any other was never acknowledged. Returns (spool files removed, unacknowledged files
    removed).

    Raises OutboxError when the outbox cannot be read: then nothing is removed.
    """
    spooled = 0
    incoming = directory / INCOMING
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(incoming):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                spooled += 1
    keys = list(_received_files(directory))
    states = outbox.files_states(keys) if keys else {}
    landing = {(str(r.meta["folder"]), str(r.meta["uid"])) for r in records}
    removed = remade = 0
    for key in keys:
        found = states.get(key)
        path = Path(key[0])
        if not found and _landing(path, landing):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            remade += 1
        elif not found:
            LOGGER.warning(
                f"{path}: received but never acknowledged (no outbox row: the daemon stopped "
                "between writing it and queuing it); removed, the sender sends it again",
                extra=fields(path=str(path), outcome="unacknowledged"),
            )
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            removed += 1
        elif all(s in FINAL_STATES for s in found.values()):
            disposer.dispose(path, key[1], key[2], found)
    if spooled or removed or remade:
        LOGGER.info(
            f"{directory}: removed {spooled} partly received and {removed} unacknowledged "
            f"instance(s) left by the last run"
            + (f", and {remade} partly queued (made again from the ack log)" if remade else "")
        )
    return spooled, removed


def _landing(path: Path, landing: set[tuple[str, str]]) -> bool:
    """Is `path` (``<folder>/<uid>.dcm`` or ``<uid>.<n>.dcm``) the file of a record in
    `landing` ((folder, uid) pairs)?"""
    stem = path.name.removesuffix(".dcm")
    folder = path.parent.name
    return (folder, stem) in landing or (folder, stem.rpartition(".")[0]) in landing


def _received_files(directory: Path) -> Iterator[tuple[str, int, int]]:
    """(path, size, mtime_ns) of the files under `directory` but its spool and ack log."""
    for top, dirs, files in os.walk(directory):
        if top == str(directory):
            dirs[:] = [d for d in dirs if d not in (INCOMING, FOLDER)]
        for name in files:
            path = os.path.join(top, name)
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(path)
                if not os.path.islink(path):
                    yield path, st.st_size, st.st_mtime_ns


class Receiver:
    """The C-STORE SCP of the daemon (see the module docstring); `start`, `stop`, `snapshot`."""

    def __init__(
        self,
        settings: ReceiveSettings,
        outbox: Outbox,
        disposer: Disposer,
        intake: Intake,
        *,
        queued: Callable[[], None],
        damaged: Callable[[str, OutboxCorruptError], None],
        metrics: Metrics = NO_METRICS,
        retry: RetryLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.retry: RetryLimits = retry or RetrySettings()  # commitment reports; reload sets it
        self.dir = Path(os.path.abspath(settings.dir))
        self.incoming = self.dir / INCOMING
        self.outbox = outbox
        self.disposer = disposer
        self.intake = intake  # replaced on reload
        self.queued = queued
        self.damaged = damaged
        self.metrics = metrics
        self.clock = clock
        self.commits = GroupCommit(outbox.enqueue_routed, clock)
        self.acklog = AckLog(self.dir / FOLDER, wanted=lambda: self.lander.wake())
        self.lander = Lander(
            self.acklog,
            enqueue=outbox.enqueue_routed,
            folder=lambda name: self._folder(self.dir / name),
            queued=queued,
            damaged=damaged,
            clock=clock,
        )
        self.rate = _Rate()
        self.rejected = 0
        self.address: tuple[str, int] | None = None
        self._sock: socket.socket | None = None
        self._tls: ssl.SSLContext | None = None
        self._stop = threading.Event()
        self._acceptor: threading.Thread | None = None
        self._lock = threading.Lock()
        self._active: dict[threading.Thread, socket.socket] = {}  # established or negotiating
        self._established = 0
        self._folders: set[Path] = set()  # created (and fsynced into `dir`) by this run

    # -- life -----------------------------------------------------------------------------

    def start(self) -> None:
        """Sweep `dir`, then listen.

        Raises
        ------
        OSError
            `dir` cannot be created, or the address cannot be bound.
        OutboxError
            The outbox cannot be read for the sweep.
        """
        rcv = self.settings
        self.incoming.mkdir(parents=True, exist_ok=True)
        # the segments are ours before their marks are read (a receiver stopped by a reload
        # may still be landing them); records first: the sweep then removes the files their
        # landing had begun
        self.acklog.claim(ACKLOG_WAIT)
        records = self.acklog.open(self.outbox.acklog_marks())
        sweep(self.dir, self.outbox, self.disposer, records)
        # queued whether or not the address can be bound (a failed start's `stop` lands them)
        self.lander.start(records)
        if records:
            LOGGER.info(f"{len(records)} instance(s) acknowledged by the last run are being queued")
        host, port = parse_listen(rcv.listen or "")
        is_storage(VERIFICATION)  # loads pynetdicom's SOP class list now, not in the first store
        self._tls = server_context(rcv.tls) if rcv.tls is not None else None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # "[::]" takes IPv4 too where the system can (modalities are mostly IPv4)
        dual = host == "::" and socket.has_dualstack_ipv6()
        sock = socket.create_server(
            (host, port), family=family, backlog=LISTEN_BACKLOG, dualstack_ipv6=dual
        )
        sock.settimeout(ACCEPT_POLL_SECONDS)
        self._sock = sock
        bound = sock.getsockname()
        self.address = (str(bound[0]), int(bound[1]))
        self._stop.clear()
        self._acceptor = threading.Thread(target=self._accept_loop, name="receiver", daemon=True)
        self._acceptor.start()
        if not rcv.allowed_calling_aets:
            LOGGER.warning(
                "receive.allowed_calling_aets is empty: any calling AE title may store instances"
            )
        LOGGER.info(
            f"receiving as {rcv.ae_title} on {_shown(self.address)}"
            f"{' (TLS)' if self._tls else ''} into {self.dir}"
        )

    def stop(self, timeout: float = 5.0) -> int:
        """Stop listening and abort the associations still open (an instance not yet answered
        is not acknowledged: the modality sends it again). Returns how many acknowledged
        instances are left in the ack log, not queued (queued at the next start on it)."""
        self._stop.set()
        if self._sock is not None:  # wakes the accept at once (not at its next poll)
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        if self._acceptor is not None:
            self._acceptor.join(timeout)
            self._acceptor = None
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        with self._lock:
            active = dict(self._active)
        for conn in active.values():  # wakes a blocked read: the thread aborts and ends
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread in active:
            thread.join(max(0.0, deadline - time.monotonic()))
        # what was acknowledged is queued now, or at the next start
        landed = self.lander.stop(max(1.0, deadline - time.monotonic()))
        left = self.lander.pending()
        if landed and left:
            LOGGER.error(
                f"receive: {left} acknowledged instance(s) are still only in {self.acklog.dir} "
                f"({self.lander.failing or 'stopped before they were queued'}); they are queued "
                "at the next start: keep receive.dir as it is until then"
            )
        alive = [t for t in active if t.is_alive()]
        if landed and not alive:
            self.acklog.close()
            return left
        # a thread still running may use the segments' fds: they are closed, and the ack log
        # let go for the next start (a reload's), once every one has ended
        running = ([f"{len(alive)} association(s)"] if alive else []) + (
            [] if landed else ["the lander"]
        )
        LOGGER.warning(
            f"receive: {' and '.join(running)} still running {timeout:g} s after the stop; "
            f"the ack log in {self.acklog.dir} is let go once they end"
        )
        threading.Thread(
            target=self._close_after, args=(alive,), name="receiver-closer", daemon=True
        ).start()
        return left

    def _close_after(self, threads: list[threading.Thread]) -> None:
        for thread in threads:
            thread.join()
        self.lander.join()
        self.acklog.close()

    def associations(self) -> int:
        return self._established

    def snapshot(self, now: float) -> dict[str, Any]:
        """What `forwarder status` shows (through the heartbeat)."""
        return {
            "listen": _shown(self.address) if self.address else self.settings.listen,
            "ae_title": self.settings.ae_title,
            "dir": str(self.dir),
            "associations": self.associations(),
            "received_last_hour": self.rate.since(now, 3600),
            "received_last_day": self.rate.since(now, 86400),
            "rejected_associations": self.rejected,
            "queueing": self.lander.pending(),
            "queue_error": self.lander.failing,
        }

    # -- associations ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stop.is_set():
            try:
                conn, addr = sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                LOGGER.error(f"receive: accept failed: {exc}; going on")
                self._stop.wait(ACCEPT_POLL_SECONDS)
                continue
            thread = threading.Thread(
                target=self._association, args=(conn, addr), name="receiver-assoc", daemon=True
            )
            with self._lock:
                self._active[thread] = conn
            thread.start()

    def _association(self, conn: socket.socket, addr: Any) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        established = False
        link: Link | None = None
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(ACSE_TIMEOUT)
            if self._tls is not None:
                try:
                    conn = self._tls.wrap_socket(conn, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    LOGGER.warning(f"receive: TLS handshake with {peer} failed: {exc}")
                    return
                with self._lock:
                    self._active[threading.current_thread()] = conn
            link = Link(conn)
            pdu_type, body = link.read_pdu("ACSE timeout")
            if pdu_type != ASSOCIATE_RQ:
                LOGGER.warning(
                    f"receive: {peer} sent PDU type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ"
                )
                return
            proposal = decode_associate_rq(body)
            rejection = self._judge(proposal, peer)
            if rejection is not None:
                link.send_pdu(ASSOCIATE_RJ, encode_associate_rj(rejection))
                return
            results = accept(proposal)
            link.send_pdu(ASSOCIATE_AC, encode_associate_ac(proposal, results, MAX_PDU))
            accepted = {cx: ts for cx, (result, ts) in results.items() if result == 0}
            with self._lock:
                self._established += 1
            established = True
            link.settimeout(NETWORK_TIMEOUT)
            host = str(addr[0]).removeprefix("::ffff:")  # an IPv4 modality on a dual socket
            facts = _Facts(proposal.calling_aet, proposal.called_aet, host)
            store = _AssociationStore(self, facts)
            try:
                serve(link, accepted, store, proposal.max_pdu)
            finally:
                self.release(store)
        except WireError as exc:
            if not self._stop.is_set():
                LOGGER.info(f"receive: association with {peer} ended: {exc}")
            if link is not None and established:
                with contextlib.suppress(WireError):
                    link.send_pdu(ABORT, bytes((0, 0, 0, 0)))
        except Exception:  # one association must not end the receiver: log it, close it
            LOGGER.exception(f"receive: association with {peer} failed; closing it")
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            with self._lock:
                self._active.pop(threading.current_thread(), None)
                if established:
                    self._established -= 1

    def _judge(self, proposal: Proposal, peer: str) -> Rejection | None:
        """Why the association is rejected (logged, counted), or None to accept it."""
        rcv = self.settings
        calling, called = proposal.calling_aet, proposal.called_aet
        allowed = rcv.allowed_calling_aets
        if allowed and calling not in allowed:
            rejection, why, reason = (
                CALLING_AET_NOT_RECOGNISED,
                "calling AE title not recognised",
                "calling-aet",
            )
        elif called != rcv.ae_title:
            rejection, why, reason = (
                CALLED_AET_NOT_RECOGNISED,
                f"called AE title {called!r} not recognised (we are {rcv.ae_title})",
                "called-aet",
            )
        elif self._established >= rcv.max_associations:
            rejection, why, reason = (
                LOCAL_LIMIT_EXCEEDED,
                "too many associations (receive.max_associations)",
                "busy",
            )
        else:
            return None
        self.rejected += 1
        self.metrics.rejected(reason)
        LOGGER.warning(
            f"association from {calling!r} at {peer} rejected: {why}",
            extra=fields(outcome="rejected"),
        )
        return rejection

    # -- one C-STORE ---------------------------------------------------------------------------

    def begin(
        self, sop_class: str, sop_instance: str, transfer_syntax: str, lane: _Lane | None = None
    ) -> SpoolFile | AckSink:
        """Where a data set about to arrive is written, its file meta first: the ack log
        segment the association (`lane`) holds, or a spool file. A spool folder that cannot
        be written gives a stand-in that keeps the error: the store is answered 0xA700 once
        its data set has arrived."""
        sink = self._ack_sink(lane) if lane is not None else None
        spool = sink if sink is not None else self._spool()
        try:
            meta = file_meta(sop_class, sop_instance, transfer_syntax)
        except (UnicodeEncodeError, struct.error) as exc:
            spool.invalid = f"unusable UIDs in the C-STORE: {exc}"
        else:
            spool.write(meta)
            if isinstance(spool, AckSink):
                spool.dataset_at = (len(meta), transfer_syntax)
        return spool

    def _ack_sink(self, lane: _Lane) -> AckSink | None:
        """An `AckSink` in the segment `lane` holds (taken, or changed for one with room),
        or None: no segment free, or landing fails (then the direct way answers as it can)."""
        seg = lane.segment
        if seg is not None and (seg.broken or seg.room() < ROOM or self.lander.failing):
            self.acklog.give_back(seg)
            lane.segment = seg = None
        if seg is None and self.lander.failing is None:
            seg = lane.segment = self.acklog.take()
        return AckSink(self.acklog, seg, self._spool) if seg is not None else None

    def _spool(self) -> SpoolFile:
        try:
            return SpoolFile(self.incoming)
        except OSError as exc:
            return _FailedSpool(exc)

    def release(self, lane: _Lane) -> None:
        """The association of `lane` ended: its segment goes back."""
        if lane.segment is not None:
            self.acklog.give_back(lane.segment)
            lane.segment = None

    def store(
        self, spool: SpoolFile | AckSink, sop_class: str, uid: str, facts: _Facts
    ) -> tuple[int, str | None]:
        """Keep the data set in `spool` (see the module docstring); the status to answer."""
        try:
            status = self._take(spool, sop_class, uid, facts)
        except _Refused as exc:
            spool.discard()
            self.metrics.received(f"0x{exc.status:04X}")
            return exc.status, exc.comment
        except Exception:  # one instance must not end the association: answer it, say so
            spool.discard()
            LOGGER.exception(f"receiving {uid} failed; answered 0xA700")
            self.metrics.received(f"0x{OUT_OF_RESOURCES:04X}")
            return OUT_OF_RESOURCES, "internal error"
        finally:
            spool.close()  # kept under its final name, or removed: never left open
        self.metrics.received("0x0000")
        return status, None

    def report(self, request: Request, transfer_syntax: str, facts: _Facts) -> bytes:
        """A Storage Commitment N-EVENT-REPORT-RQ from a peer that reports on an association
        of its own: `forwarder.commitment.answer_report` records it; the rows it made final
        go to the disposer, rows to store again wake the workers. Returns the response."""
        from forwarder.commitment import answer_report

        response, settled = answer_report(
            self.outbox, facts.calling_aet, request, transfer_syntax, retry=self.retry
        )
        if settled.finished:
            try:
                self.disposer.done(settled.finished)
            except OutboxError as exc:  # disposed of at the next start, or by the next report
                LOGGER.error(f"commitment report from {facts.calling_aet}: disposing: {exc}")
        if settled.resent:
            self.queued()
        return response

    # -- one instance ------------------------------------------------------------------------

    def _take(self, sink: SpoolFile | AckSink, sop_class: str, uid: str, facts: _Facts) -> int:
        if sink.invalid is not None:
            LOGGER.error(f"a C-STORE from {facts.calling_aet}: {sink.invalid}; answered 0xC000")
            raise _Refused(CANNOT_UNDERSTAND, sink.invalid)
        try:
            sink.complete()
        except OSError as exc:
            raise _unwritable(uid, facts, self.incoming, exc) from exc
        intake = self.intake
        router = intake.router
        tags = router.tags if router else frozenset()
        # the instance is in its association's segment: acknowledged through the ack log
        logged = sink if isinstance(sink, AckSink) and sink.spilled is None else None
        try:
            if logged is not None:
                info = inspect_stream(
                    logged.stream(),
                    Path(logged.name),
                    logged.size,
                    0,
                    attributes=tags,
                    dataset_at=logged.dataset_at,  # its file meta is ours
                )
            else:
                info = inspect(sink.name, attributes=tags)
        except InvalidDicom as exc:
            LOGGER.error(
                f"{uid} from {facts.calling_aet} at {facts.peer}: {exc.reason}; answered 0xC000",
                extra=fields(outcome="refused"),
            )
            raise _Refused(CANNOT_UNDERSTAND, exc.reason) from exc
        except OSError as exc:
            raise _Refused(OUT_OF_RESOURCES, _comment("cannot read back", exc)) from exc
        if info.sop_instance_uid != uid:
            why = f"SOP Instance UID {info.sop_instance_uid} differs from the C-STORE's {uid}"
            LOGGER.error(f"{uid} from {facts.calling_aet}: {why}; answered 0xC000")
            raise _Refused(CANNOT_UNDERSTAND, why)
        if info.sop_class_uid != sop_class:
            why = f"SOP Class UID {info.sop_class_uid} differs from the C-STORE's"
            LOGGER.error(f"{uid} from {facts.calling_aet}: {why}; answered 0xA900")
            raise _Refused(NOT_THIS_SOP_CLASS, why)
        folder = self.dir / folder_name(facts.calling_aet)
        relpath = f"{folder.name}/{uid}.dcm"
        names = intake.destinations
        if router is not None:
            decision = router.route(info.attributes, relpath, facts.mapping())
            if not decision.destinations:
                return self._unmatched(self._direct(sink), info, folder, facts, decision.why_not)
            names = decision.destinations
        if logged is not None:
            status = self._acknowledge(logged, info, folder, names, facts)
            if status is not None:
                return status
        spool = self._direct(sink)
        final = self._place(spool, folder, uid)
        info = replace(info, path=final)
        try:
            # the data after the link: on ext4 and XFS the journal commit this fsync forces
            # carries the new name too, and the group's folder fsync then finds little to do
            spool.sync()
            self.commits.commit([(info, names)], [final.parent])
        except (OutboxError, OSError) as exc:
            with contextlib.suppress(OSError):
                final.unlink()
            if isinstance(exc, OutboxCorruptError):
                self.damaged("receiver", exc)
            LOGGER.error(
                f"{final} from {facts.calling_aet}: cannot be queued: {exc}; answered 0xA700",
                extra=fields(path=str(final), outcome="out-of-resources"),
            )
            what = "outbox unavailable" if isinstance(exc, OutboxError) else "cannot write to disk"
            raise _Refused(OUT_OF_RESOURCES, _comment(what, exc)) from exc
        self.rate.add(self.clock())
        self.queued()
        if LOGGER.isEnabledFor(logging.DEBUG):
            LOGGER.debug(
                f"received {final} ({uid}) from {facts.calling_aet} at {facts.peer} for "
                f"{', '.join(names)}",
                extra=fields(path=str(final), sop_instance_uid=uid, outcome="received"),
            )
        return 0x0000

    def _acknowledge(
        self, sink: AckSink, info: DicomInfo, folder: Path, names: Sequence[str], facts: _Facts
    ) -> int | None:
        """Commit the instance in `sink` to the ack log and hand it to the lander: 0x0000.
        None when its record does not fit (then it goes the direct way)."""
        uid = info.sop_instance_uid
        meta = {
            "folder": folder.name,
            "uid": uid,
            "sop_class": info.sop_class_uid,
            "ts": info.transfer_syntax,
            "study": info.study_uid,
            "offset": info.dataset_offset,
            "to": list(names),
            "calling_aet": facts.calling_aet,
            "peer": facts.peer,
        }
        try:
            record = sink.commit(meta)
        except OSError as exc:
            raise _unwritable(uid, facts, self.acklog.dir, exc) from exc
        if record is None:
            return None
        self.lander.add(record)
        self.rate.add(self.clock())
        if LOGGER.isEnabledFor(logging.DEBUG):
            LOGGER.debug(
                f"received {uid} from {facts.calling_aet} at {facts.peer} for "
                f"{', '.join(names)} (ack log record {record.seq})",
                extra=fields(sop_instance_uid=uid, outcome="received"),
            )
        return 0x0000

    def _direct(self, sink: SpoolFile | AckSink) -> SpoolFile:
        """The spool file of an instance that goes the direct way (moved out of its segment
        when it was there); raises _Refused when it cannot be written."""
        if not isinstance(sink, AckSink):
            return sink
        spool = sink.spill()
        try:
            spool.complete()
        except OSError as exc:
            LOGGER.error(f"cannot write to {self.incoming}: {exc}; answered 0xA700")
            raise _Refused(OUT_OF_RESOURCES, _comment("cannot write to disk", exc)) from exc
        assert isinstance(spool, SpoolFile)
        return spool

    def _folder(self, folder: Path) -> Path:
        """Create `folder` (a calling AE's) durably, once per run; returns it."""
        if folder in self._folders:
            return folder
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            fsync_dir(folder.parent)
        self._folders.add(folder)
        return folder

    def _place(self, spool: SpoolFile, folder: Path, uid: str) -> Path:
        """Give the spool file its final name in `folder`, never replacing a file there (the
        same instance sent again while the first is still queued gets ``<uid>.1.dcm``)."""
        try:
            self._folder(folder)
            for n in range(100000):
                final = folder / (f"{uid}.dcm" if n == 0 else f"{uid}.{n}.dcm")
                try:
                    os.link(spool.name, final)
                except FileExistsError:
                    continue
                break
            else:
                raise OSError(errno.EEXIST, "no free name", str(folder / uid))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spool.name)
        except OSError as exc:
            LOGGER.error(f"{uid}: cannot be put in {folder}: {exc}; answered 0xA700")
            raise _Refused(OUT_OF_RESOURCES, _comment("cannot write to disk", exc)) from exc
        return final

    def _unmatched(
        self,
        spool: SpoolFile,
        info: DicomInfo,
        folder: Path,
        facts: _Facts,
        why_not: dict[str, str] | Any,
    ) -> int:
        """No destination wants it: ``routing.unmatched`` says what happens; answered success
        once that is done (quarantined durably, archived durably, or deleted)."""
        uid = info.sop_instance_uid
        reason = "no destination matched: " + "; ".join(f"{d}: {w}" for d, w in why_not.items())
        layout = self.disposer.layout
        router = self.intake.router
        how = "quarantine" if router is None else router.unmatched
        if how == "dispose" and layout.on_success == "delete":
            spool.discard()
            LOGGER.info(
                f"not queued: {uid} from {facts.calling_aet}: no destination wants it "
                f"({reason}); disposition: delete",
                extra=fields(sop_instance_uid=uid, outcome="unmatched"),
            )
            return 0x0000
        final = self._place(spool, folder, uid)
        try:
            spool.sync()
            fsync_dir(final.parent)
            if how == "dispose":
                if layout.on_success == "move":
                    filing.archive(final, [self.dir], layout.archive_dir)
                where = layout.on_success
            else:
                sidecar = Sidecar.invalid(reason, self.clock())
                target = filing.quarantine(final, [self.dir], layout.quarantine_dir, sidecar)
                where = f"quarantined as {target}"
        except OSError as exc:
            with contextlib.suppress(OSError):
                final.unlink()
            LOGGER.error(
                f"{uid} from {facts.calling_aet}: no destination wants it and it cannot be "
                f"put away: {exc}; answered 0xA700",
                extra=fields(sop_instance_uid=uid, outcome="out-of-resources"),
            )
            raise _Refused(OUT_OF_RESOURCES, _comment("cannot write to disk", exc)) from exc
        LOGGER.info(
            f"not queued: {uid} from {facts.calling_aet}: no destination wants it ({reason}); "
            f"{where}",
            extra=fields(sop_instance_uid=uid, outcome="unmatched"),
        )
        return 0x0000


class _Lane:
    """What one association holds: the ack log segment it writes into."""

    segment: Segment | None = None


class _AssociationStore(_Lane):
    """`forwarder.acceptor.Store` for one association: its facts go with every instance."""

    def __init__(self, receiver: Receiver, facts: _Facts) -> None:
        self.receiver = receiver
        self.facts = facts

    def begin(self, sop_class: str, sop_instance: str, transfer_syntax: str) -> SpoolFile | AckSink:
        return self.receiver.begin(sop_class, sop_instance, transfer_syntax, self)

    def store(self, sink: Any, sop_class: str, sop_instance: str) -> tuple[int, str | None]:
        return self.receiver.store(sink, sop_class, sop_instance, self.facts)

    def request(self, request: Request, transfer_syntax: str) -> bytes:
        return self.receiver.report(request, transfer_syntax, self.facts)


class _FailedSpool(SpoolFile):
    """A spool file that could not be created: it swallows the data set, keeps the error."""

    def __init__(self, error: OSError) -> None:  # no super().__init__: there is no file
        # no path at all: a spool name is linked and unlinked, and /dev/null must never be
        # (the daemon runs as root in a container); "" fails every file operation
        self.name = ""
        self.error = error
        self.invalid = None
        self.size = 0
        self._fd = None
        self._buf = bytearray()

    def discard(self) -> None:
        """Nothing to remove."""


def _unwritable(uid: str, facts: _Facts, where: Path, exc: OSError) -> _Refused:
    """Logged: `uid` cannot be written to `where`; the 0xA700 to answer."""
    LOGGER.error(
        f"{uid} from {facts.calling_aet}: cannot write it to {where}: "
        f"{exc.strerror or exc}; answered 0xA700",
        extra=fields(outcome="out-of-resources"),
    )
    return _Refused(OUT_OF_RESOURCES, _comment("cannot write to disk", exc))


def _comment(what: str, exc: BaseException) -> str:
    detail = getattr(exc, "strerror", None) or str(exc)
    return f"{what}: {detail}"[:64]


def _shown(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
