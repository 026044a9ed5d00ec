"""The receiver: a C-STORE SCP that answers success only once an instance is durable and queued.

An instance arrives through pynetdicom's chunked receive (``STORE_RECV_CHUNKED_DATASET``):
its data set is written as it comes, never decoded, behind a file meta made from the
negotiated transfer syntax, into a spool file in ``<dir>/.incoming`` (a `SpoolFile`, the same
file system as `dir`, written in 1 MiB pieces: memory stays flat whatever the instance's size).
Then, in the association's thread:

1. the spool file is fsynced; its header is inspected (`forwarder.dicomfile.inspect`, with the
   attributes the routing rules name) and routed (`forwarder.routing.Router.route`, with the
   reserved keys ``calling_aet``, ``called_aet`` and ``peer``);
2. it is linked under its final name ``<dir>/<calling AE>/<SOP Instance UID>.dcm`` (never over
   another file) and its spool name removed;
3. its folder is fsynced and its outbox rows committed, both by a `GroupCommit` shared by the
   associations (one fsync and one transaction for every instance that arrived meanwhile);
4. only then is 0x0000 answered, and the workers woken.

A spool or folder that cannot be written (disk full), or an outbox that cannot be: 0xA700,
and nothing is left behind. A data set that is not DICOM, is cut short or has no SOP Instance
UID: 0xC000 with an error comment. An instance that no destination wants follows
``routing.unmatched``, and is answered success.

At start (`sweep`) spool files left by a crash are removed, and so is every file in `dir` that
has no outbox row: it was renamed into place but its rows were never committed, so it was
never acknowledged, and the modality, which saw no success, sends it again. A file whose rows
are all final is handed to the disposer.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import ssl
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from forwarder import filing
from forwarder.config import ReceiveSettings, ReceiveTLSSettings
from forwarder.dicomfile import DicomInfo, InvalidDicom, inspect
from forwarder.dispose import Disposer
from forwarder.enqueue import Intake
from forwarder.groupcommit import GroupCommit, fsync_dir
from forwarder.logs import fields
from forwarder.metrics import NO_METRICS, Metrics, parse_listen
from forwarder.outbox import FINAL_STATES, Outbox, OutboxCorruptError, OutboxError
from forwarder.sidecar import Sidecar

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
SPOOL_CHUNK = 1 << 20
"""A spool file is written in pieces of this size (pynetdicom hands over one PDV at a time)."""
MAX_PDU = 1 << 20
"""The largest PDU we accept: fewer, larger PDUs cost less Python per byte."""
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
NOT_THIS_SOP_CLASS = 0xA900
VERIFICATION = "1.2.840.10008.1.1"
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
    """What pynetdicom writes a received data set into: a file in ``<dir>/.incoming``.

    It stands in for the ``NamedTemporaryFile`` pynetdicom opens (``write``, ``file.flush``,
    ``close``, ``name``). A write error (a full disk) is kept, not raised: raised, it would
    abort the association from pynetdicom's reading thread; kept, the store is answered
    0xA700 once the data set is complete (`finish` raises it then).
    """

    def __init__(self, directory: Path) -> None:
        fd, name = tempfile.mkstemp(suffix=".dcm", dir=directory)
        self.name = name
        self.file = self  # pynetdicom calls ``.file.flush()`` after every fragment
        self.error: OSError | None = None
        self.size = 0
        self._fd: int | None = fd
        self._buf = bytearray()

    def write(self, data: bytes) -> int:
        if self.error is None:
            self._buf += data
            if len(self._buf) >= SPOOL_CHUNK:
                self._drain()
        return len(data)

    def flush(self) -> None:
        """Nothing: the buffer goes to disk a MiB at a time, and whole in `finish`."""

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

    def finish(self) -> None:
        """Write what is buffered and fsync; raises the first write error (OSError)."""
        self._drain()
        if self.error is None and self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self.error = exc
        if self.error is not None:
            raise self.error

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


class _Hook:
    """pynetdicom's ``NamedTemporaryFile`` in `pynetdicom.dimse_messages`, replaced while a
    receiver runs: a data set of one of the receiver's associations goes to its `SpoolFile`;
    any other (an SCP of the same process) to a temporary file as before."""

    def __init__(self) -> None:
        from pynetdicom import dimse_messages

        self.original: Any = getattr(dimse_messages, "NamedTemporaryFile")  # noqa: B009
        self.receiver: Receiver | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        receiver = self.receiver
        assoc = getattr(threading.current_thread(), "assoc", None)
        if receiver is not None and assoc is not None and receiver.owns(assoc):
            return receiver.spool(assoc)
        return self.original(*args, **kwargs)


_HOOK: _Hook | None = None
_HOOK_LOCK = threading.Lock()


def _install(receiver: Receiver | None) -> None:
    """Point pynetdicom's chunked receive at `receiver` (None: back to temporary files).

    pynetdicom's ``_config`` is process-global: once a receiver started, every SCP of the
    process receives data sets chunked (``event.dataset`` still works; ``encoded_dataset``
    does not).
    """
    global _HOOK
    from pynetdicom import _config, dimse_messages

    with _HOOK_LOCK:
        if _HOOK is None:
            _HOOK = _Hook()
            setattr(dimse_messages, "NamedTemporaryFile", _HOOK)  # noqa: B010
        _HOOK.receiver = receiver
        if receiver is not None:
            _config.STORE_RECV_CHUNKED_DATASET = True
            _config.UNRESTRICTED_STORAGE_SERVICE = True


def sweep(directory: Path, outbox: Outbox, disposer: Disposer) -> tuple[int, int]:
    """Clean `directory` at start: spool files left by a crash, and received files that have
    no outbox row (never acknowledged), are removed; a file whose rows are all final is
    disposed of. Returns (spool files removed, unacknowledged files removed).

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
    removed = 0
    for key in keys:
        found = states.get(key)
        path = Path(key[0])
        if not found:
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
    if spooled or removed:
        LOGGER.info(
            f"{directory}: removed {spooled} partly received and {removed} unacknowledged "
            "instance(s) left by the last run"
        )
    return spooled, removed


def _received_files(directory: Path) -> Iterator[tuple[str, int, int]]:
    """(path, size, mtime_ns) of the files under `directory` but its spool folder."""
    for top, dirs, files in os.walk(directory):
        if top == str(directory):
            dirs[:] = [d for d in dirs if d != INCOMING]
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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
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
        self.rate = _Rate()
        self.rejected = 0
        self.address: tuple[str, int] | None = None
        self._ae: Any = None
        self._server: Any = None
        self._lock = threading.Lock()
        self._spools: dict[int, set[SpoolFile]] = {}  # id(association) -> its open spool files
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
        from pynetdicom import AE, evt

        rcv = self.settings
        self.incoming.mkdir(parents=True, exist_ok=True)
        sweep(self.dir, self.outbox, self.disposer)
        host, port = parse_listen(rcv.listen or "")
        ae = AE(ae_title=rcv.ae_title)
        ae.maximum_associations = rcv.max_associations
        ae.maximum_pdu_size = MAX_PDU
        ae.require_called_aet = True
        ae.require_calling_aet = list(rcv.allowed_calling_aets)
        ae.network_timeout = 60
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        # Storage needs no supported context: with pynetdicom's unrestricted storage service
        # every storage-like SOP class (standard, private, unknown) is accepted in the first
        # transfer syntax proposed for it
        ae.add_supported_context(VERIFICATION)
        self._ae = ae
        _install(self)
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]
        ssl_context = server_context(rcv.tls) if rcv.tls is not None else None
        try:
            self._server = ae.start_server(
                (host, port), block=False, evt_handlers=handlers, ssl_context=ssl_context
            )
        except BaseException:
            _install(None)
            raise
        bound = self._server.server_address
        self.address = (str(bound[0]), int(bound[1]))
        if not rcv.allowed_calling_aets:
            LOGGER.warning(
                "receive.allowed_calling_aets is empty: any calling AE title may store instances"
            )
        LOGGER.info(
            f"receiving as {rcv.ae_title} on {_shown(self.address)}"
            f"{' (TLS)' if ssl_context else ''} into {self.dir}"
        )

    def stop(self) -> None:
        """Stop listening and abort the associations still open (an instance not yet answered
        is not acknowledged: the modality sends it again)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._ae is not None:
            for assoc in self._ae.active_associations:
                assoc.abort()
            self._ae = None
        _install(None)
        with self._lock:
            left = [s for spools in self._spools.values() for s in spools]
            self._spools.clear()
        for spool in left:
            spool.discard()

    def owns(self, assoc: Any) -> bool:
        return self._ae is not None and assoc.ae is self._ae

    def associations(self) -> int:
        ae = self._ae
        return 0 if ae is None else sum(1 for a in ae.active_associations if a.is_acceptor)

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
        }

    # -- spool files ------------------------------------------------------------------------

    def spool(self, assoc: Any) -> SpoolFile:
        """A new spool file for a data set arriving on `assoc` (pynetdicom's reading thread).

        A spool folder that cannot be written makes a stand-in that keeps the error: the
        store is answered 0xA700 once its data set has arrived.
        """
        try:
            spool = SpoolFile(self.incoming)
        except OSError as exc:
            spool = _FailedSpool(exc)
        with self._lock:
            self._spools.setdefault(id(assoc), set()).add(spool)
        return spool

    def _release(self, assoc: Any, spool: SpoolFile) -> None:
        with self._lock:
            spools = self._spools.get(id(assoc))
            if spools is not None:
                spools.discard(spool)

    def _on_close(self, event: Any) -> None:
        """The connection closed: a data set cut off by an abort leaves nothing behind."""
        with self._lock:
            left = self._spools.pop(id(event.assoc), set())
        for spool in left:
            spool.discard()

    # -- events --------------------------------------------------------------------------

    def _on_echo(self, event: Any) -> int:
        return 0x0000

    def _on_rejected(self, event: Any) -> None:
        assoc = event.assoc
        calling = str(assoc.requestor.ae_title).strip()
        called = str(assoc.acceptor.ae_title).strip()
        rq = assoc.requestor.primitive
        asked = str(getattr(rq, "called_ae_title", "") or "").strip() if rq else ""
        allowed = self.settings.allowed_calling_aets
        if allowed and calling not in allowed:
            why, reason = "calling AE title not recognised", "calling-aet"
        elif asked and asked != called:
            why, reason = (
                f"called AE title {asked!r} not recognised (we are {called})",
                "called-aet",
            )
        else:
            why, reason = "too many associations (receive.max_associations)", "busy"
        self.rejected += 1
        self.metrics.rejected(reason)
        LOGGER.warning(
            f"association from {calling!r} at {_peer(assoc)} rejected: {why}",
            extra=fields(outcome="rejected"),
        )

    def _on_store(self, event: Any) -> Dataset | int:
        req = event.request
        assoc = event.assoc
        spool = getattr(req, "_dataset_file", None)
        if not isinstance(spool, SpoolFile):  # cannot happen while the hook is installed
            LOGGER.error("a C-STORE arrived without a spool file; answered 0xA700")
            return _status(OUT_OF_RESOURCES, "receiver not ready")
        facts = _Facts(
            str(assoc.requestor.ae_title).strip(),
            str(assoc.acceptor.ae_title).strip(),
            _host(assoc),
        )
        try:
            status = self._take(spool, req, facts)
        except _Refused as exc:
            spool.discard()
            self.metrics.received(f"0x{exc.status:04X}")
            return _status(exc.status, exc.comment)
        except Exception:  # one instance must not end the association: answer it, say so
            spool.discard()
            LOGGER.exception(f"receiving {req.AffectedSOPInstanceUID} failed; answered 0xA700")
            self.metrics.received(f"0x{OUT_OF_RESOURCES:04X}")
            return _status(OUT_OF_RESOURCES, "internal error")
        finally:
            self._release(assoc, spool)
        self.metrics.received("0x0000")
        return status

    # -- one instance ------------------------------------------------------------------------

    def _take(self, spool: SpoolFile, req: Any, facts: _Facts) -> int:
        uid = str(req.AffectedSOPInstanceUID)
        try:
            spool.finish()
        except OSError as exc:
            LOGGER.error(
                f"{uid} from {facts.calling_aet}: cannot write it to {self.incoming}: "
                f"{exc.strerror or exc}; answered 0xA700",
                extra=fields(outcome="out-of-resources"),
            )
            raise _Refused(OUT_OF_RESOURCES, _comment("cannot write to disk", exc)) from exc
        intake = self.intake
        router = intake.router
        try:
            info = inspect(spool.name, attributes=router.tags if router else frozenset())
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
        if info.sop_class_uid != str(req.AffectedSOPClassUID):
            why = f"SOP Class UID {info.sop_class_uid} differs from the C-STORE's"
            LOGGER.error(f"{uid} from {facts.calling_aet}: {why}; answered 0xA900")
            raise _Refused(NOT_THIS_SOP_CLASS, why)
        folder = self.dir / folder_name(facts.calling_aet)
        relpath = f"{folder.name}/{uid}.dcm"
        names = intake.destinations
        if router is not None:
            decision = router.route(info.attributes, relpath, facts.mapping())
            if not decision.destinations:
                return self._unmatched(spool, info, folder, facts, decision.why_not)
            names = decision.destinations
        final = self._place(spool, folder, uid)
        info = replace(info, path=final)
        try:
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

    def _folder(self, folder: Path) -> None:
        """Create `folder` (a calling AE's) durably, once per run."""
        if folder in self._folders:
            return
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            fsync_dir(folder.parent)
        self._folders.add(folder)

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


class _FailedSpool(SpoolFile):
    """A spool file that could not be created: it swallows the data set, keeps the error."""

    def __init__(self, error: OSError) -> None:  # no super().__init__: there is no file
        self.name = os.devnull
        self.file = self
        self.error = error
        self.size = 0
        self._fd = None
        self._buf = bytearray()

    def discard(self) -> None:
        """Nothing to remove."""


def _status(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


def _comment(what: str, exc: BaseException) -> str:
    detail = getattr(exc, "strerror", None) or str(exc)
    return f"{what}: {detail}"[:64]


def _host(assoc: Any) -> str:
    return str(assoc.requestor.address)


def _peer(assoc: Any) -> str:
    return f"{assoc.requestor.address}:{assoc.requestor.port}"


def _shown(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
