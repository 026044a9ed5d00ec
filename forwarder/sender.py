"""Send DICOM files to one peer over C-STORE: associations, contexts, streaming, outcomes."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from forwarder.association import (
    Association,
    AssociationFailed,
    Peer,
    client_tls_context,
    open_association,
)
from forwarder.byteorder import swap_other_words
from forwarder.commitmsg import (
    ACTION_REQUEST_COMMIT,
    COMMIT_SYNTAXES,
    STORAGE_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    classify_action,
    encode_request,
)
from forwarder.contexts import (
    MAX_CONTEXTS,
    ContextSpec,
    candidates,
    split_by_contexts,
)
from forwarder.dicomfile import DEFLATED_LE, EXPLICIT_BE, DicomInfo
from forwarder.logs import one_line
from forwarder.lossy import mark_lossy
from forwarder.status import Action, Classification, classify_status
from forwarder.wire import (
    N_ACTION_RSP,
    FileData,
    Request,
    SourceUnreadable,
    WireError,
    encode_action_command,
    encode_event_report_response,
    encode_store_command,
)

if TYPE_CHECKING:  # pydicom loads only when a file has to be converted
    from pydicom.dataset import Dataset

__all__ = [
    "AssociationFailed",
    "Peer",
    "Sender",
    "StoreResult",
    "client_tls_context",
    "sent_as",
]

LOGGER = logging.getLogger("forwarder.sender")

# How long the answer "none of these contexts accepted" stands for the same proposal: files
# handed over one at a time would otherwise cost one association each to learn it again.
_NO_CONTEXTS_MEMORY = 5.0
# How many fresh associations in a row the peer may drop before a store went out on them
# (then the next file is sent anyway and fails with the reason).
_MAX_DROPPED = 3
_COMMITMENT = ContextSpec(STORAGE_COMMITMENT, COMMIT_SYNTAXES)
_PROCESSING_FAILURE = 0x0110

ReportHandler = Callable[[int, bytes, str], int]
"""Takes a Storage Commitment report that came on the association: (event type, data set,
its transfer syntax); returns the N-EVENT-REPORT-RSP status."""


@dataclass(frozen=True)
class StoreResult:
    """The outcome of sending one file once."""

    info: DicomInfo
    classification: Classification
    transfer_syntax: str | None = None  # what it went out as
    how: str = ""  # "as is", "convert", "decompress", "transform..." or "" when not sent
    seconds: float = 0.0
    sent_uid: str | None = None  # the SOP Instance UID sent, when a transform changed it

    @property
    def delivered(self) -> bool:
        return self.classification.delivered

    @property
    def sent_as(self) -> str:
        """How it went out, for people: ``as is``, ``converted to Explicit VR Little Endian``,
        ``decompressed to ...``; "" when nothing went out."""
        return sent_as(self.how, self.transfer_syntax)


def sent_as(how: str, transfer_syntax: str | None) -> str:
    """``as is`` / ``converted to NAME`` / ``decompressed to NAME`` (the syntax's name), or ""."""
    if not how or transfer_syntax is None:
        return ""
    if how == "as is":
        return how
    verb = {
        "convert": "converted",
        "decompress": "decompressed",
        "transform": "transformed",
        "transform+convert": "transformed and converted",
        "transform+decompress": "transformed and decompressed",
    }.get(how, how)
    return f"{verb} to {_name(transfer_syntax)}"


class Sender:
    """Send files to one peer, many per association; one Sender per thread.

    The association is kept open between calls to :meth:`send` (release it with
    :meth:`release` after an idle linger), re-established after an abort or a timeout,
    and re-negotiated when a batch needs presentation contexts it does not have. Its
    socket is used by the calling thread alone (``forwarder.association``).
    """

    def __init__(
        self,
        peer: Peer,
        *,
        restrict: str | None = None,
        stop: threading.Event | None = None,
        on_event: Callable[[str, str], None] | None = None,
        commitment: bool = False,
    ) -> None:
        self.peer = peer
        self.restrict = restrict
        self.stop = stop or threading.Event()
        self._on_event = on_event
        # propose Storage Commitment in every association, and answer its reports with this
        self.commitment = commitment
        self.on_report: ReportHandler | None = None
        self._current: Association | None = None
        self._seen: dict[ContextSpec, None] = {}  # proposed before, most recent last
        self.associations = 0  # how many were established (for stats and tests)
        # for work `send` waits for outside the association (a transform): (monotonic time,
        # extra seconds) = since when it waits and how much longer than a store it may take,
        # or when the last wait ended (0 extra: progress); None otherwise
        self.waiting: tuple[float, float] | None = None

    # -- association handling -------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._current is not None and not self._current.closed

    def _log(self, level: int, msg: str) -> None:
        LOGGER.log(level, msg)
        if self._on_event is not None:
            self._on_event(logging.getLevelName(level), msg)

    def _associate(self, specs: Sequence[ContextSpec]) -> Association:
        self._log(logging.INFO, f"Requesting Association with {self.peer.label}")
        assoc = open_association(
            self.peer, ((spec.sop_class, spec.transfer_syntaxes) for spec in specs), self.stop
        )
        if not assoc.accepted:
            self._log(logging.ERROR, "No accepted presentation contexts")
            return assoc
        self.associations += 1
        self._log(logging.INFO, "Association Accepted")
        if self.commitment:
            assoc.link.on_request = functools.partial(self._report, assoc)
        return assoc

    def release(self) -> None:
        """Release the current association, if any (abort it if release fails)."""
        current, self._current = self._current, None
        if current is not None and not current.closed:
            self._log(logging.INFO, "Releasing Association")
            current.release()

    def abort(self) -> None:
        """Abort the current association at once (shutdown with work in flight)."""
        current, self._current = self._current, None
        if current is not None:
            current.abort()

    def close(self) -> None:
        self.release()

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ensure(self, specs: Sequence[ContextSpec]) -> Association:
        """An established association that proposed every context in `specs` (and
        Storage Commitment, with `commitment`)."""
        if self.commitment and _COMMITMENT not in specs:
            # room for it: what was proposed lately (`open`) may have filled every context
            specs = [*specs[: MAX_CONTEXTS - 1], _COMMITMENT]
        current = self._current
        wanted_set = {(s.sop_class, tuple(s.transfer_syntaxes)) for s in specs}
        if current is not None and wanted_set <= current.proposed:
            if current.alive():
                return current
            if not current.accepted and time.monotonic() - current.opened_at < _NO_CONTEXTS_MEMORY:
                return current  # the peer just accepted none of these: no new association

        self.release()
        for spec in specs:
            if spec == _COMMITMENT:
                continue
            self._seen.pop(spec, None)
            self._seen[spec] = None
        # Propose what earlier batches needed too (room permitting), so that a daemon
        # sending a mix of classes keeps one association instead of renegotiating.
        wanted = list(specs)
        room = MAX_CONTEXTS - (self.commitment and _COMMITMENT not in wanted)
        for spec in reversed(self._seen):
            if len(wanted) >= room:
                break
            if spec not in wanted:
                wanted.append(spec)
        if self.commitment and _COMMITMENT not in wanted:
            wanted.append(_COMMITMENT)
        self._current = self._associate(wanted)
        return self._current

    # -- storage commitment -----------------------------------------------------------

    def request_commitment(
        self, transaction_uid: str, references: Sequence[tuple[str, str]]
    ) -> Classification:
        """Ask the peer to commit to `references` ((SOP Class UID, SOP Instance UID) pairs)
        with one N-ACTION-RQ under `transaction_uid`; its response classified.

        On the open association when there is one (it proposes Storage Commitment when the
        sender was made with `commitment`), else on a new one. A report that arrives
        meanwhile goes to `on_report`. An empty status: no valid response (the association
        is then aborted).

        Raises
        ------
        AssociationFailed
            No association could be established.
        """
        current = self._ensure(self.recent_contexts())
        accepted = current.accepted.get(STORAGE_COMMITMENT, [])
        if not accepted:
            return Classification(
                Action.DESTINATION, "the peer did not accept the Storage Commitment Push Model"
            )
        cx_id, ts = accepted[0]
        msg_id = current.next_message_id()
        command = encode_action_command(
            STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, msg_id, ACTION_REQUEST_COMMIT
        )
        data = encode_request(transaction_uid, references, ts)
        link = current.link
        try:
            link.settimeout(self.peer.network_timeout)
            link.send_message(cx_id, command, data, current.send_pdu)
            link.settimeout(self.peer.dimse_timeout)
            rsp = link.read_response(N_ACTION_RSP)
        except WireError as exc:
            self.abort()
            return _no_response(str(exc))
        if rsp.message_id != msg_id:
            self.abort()
            return _no_response(f"response to message {rsp.message_id}, expected {msg_id}")
        cls = classify_action(rsp.status)
        if rsp.error_comment:
            cls = Classification(cls.action, f"{cls.meaning} ({rsp.error_comment})", cls.status)
        return cls

    def serve(self, seconds: float) -> None:
        """Wait up to `seconds` for the peer to send something on the open association, and
        answer it (a commitment report; an abort or release closes the association).

        Returns at once when no association is open; early when `stop` is set.
        """
        current = self._current
        if current is None or current.closed:
            return
        with contextlib.suppress(WireError):
            if current.link.wait_readable(max(seconds, 0.0), self.stop):
                current.alive()  # answers a request; notices an abort or a release
        if current.closed and self._current is current:
            self._current = None

    def _report(self, assoc: Association, request: Request) -> bytes:
        """Answer an N-EVENT-REPORT-RQ that came on `assoc` (see `on_report`)."""
        ts = next(
            (t for cx, t in assoc.accepted.get(STORAGE_COMMITMENT, []) if cx == request.context_id),
            None,
        )
        event = int.from_bytes(request.command.get(0x00001002, b"\x00\x00")[:2], "little")
        status = _PROCESSING_FAILURE
        if request.uid(0x00000002) != STORAGE_COMMITMENT or ts is None:
            LOGGER.warning(
                f"{self.peer.label}: N-EVENT-REPORT for {request.uid(0x00000002)!r} on context "
                f"{request.context_id} answered 0x0110: not a Storage Commitment report"
            )
        elif self.on_report is None or request.data_set is None:
            LOGGER.warning(f"{self.peer.label}: commitment report without a data set or taker")
        else:
            try:
                status = self.on_report(event, request.data_set, ts)
            except Exception as exc:  # the association must not die of one report
                LOGGER.exception(
                    f"{self.peer.label}: commitment report answered 0x0110: {one_line(exc)}"
                )
        return encode_event_report_response(request, status)

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
        groups = split_by_contexts(pairs, self.restrict, self.context_limit)
        for specs in groups:
            classes = {s.sop_class for s in specs}
            todo = [i for i in items if i.sop_class_uid in classes]
            yield from self.send_with(specs, todo)

    @property
    def context_limit(self) -> int:
        """How many storage contexts one association may propose: 128, but one with
        `commitment` (Storage Commitment takes the last one)."""
        return MAX_CONTEXTS - 1 if self.commitment else MAX_CONTEXTS

    def recent_contexts(self) -> list[ContextSpec]:
        """The contexts proposed lately, most recent first (at most `context_limit`)."""
        return list(reversed(self._seen))[: self.context_limit]

    def open(self, specs: Sequence[ContextSpec]) -> float:
        """Establish an association proposing `specs` now, before there is anything to send.

        Returns the A-ASSOCIATE exchange's round trip, in seconds.

        Raises
        ------
        AssociationFailed
            As :meth:`send` would.
        """
        return self._ensure(specs).rtt

    @property
    def round_trip(self) -> float:
        """The last association's A-ASSOCIATE round trip in seconds (0 before any)."""
        return self._current.rtt if self._current is not None else 0.0

    def send_with(
        self, specs: Sequence[ContextSpec], todo: Sequence[DicomInfo]
    ) -> Iterator[StoreResult]:
        """:meth:`send`, proposing `specs` (one group of ``split_by_contexts``) for `todo`.

        For callers that hand out the items of one large set a few at a time: every call
        proposes the whole set's contexts, so the association is kept between calls.
        """
        idx = 0
        dropped = 0  # associations in a row that died before a store went out on them
        while idx < len(todo) and not self.stop.is_set():
            current = self._ensure(specs)
            if not current.accepted:  # the peer took none of these SOP classes
                for info in todo[idx:]:
                    yield self._store(current, info)
                return
            while idx < len(todo) and not self.stop.is_set():
                may_resend = dropped < _MAX_DROPPED
                try:
                    if may_resend and not current.alive():
                        raise _Dropped
                    result = self._store(current, todo[idx], may_resend)
                except _Dropped:
                    # The peer aborted, closed or released it before this file went out:
                    # nothing was sent, so the file gets a fresh association, not a failure.
                    dropped += 1
                    self.abort()
                    break
                idx += 1
                if result.classification.status is not None:
                    dropped = 0
                broken = result.classification.status is None and bool(result.how)
                if broken:  # no valid response: the association is unusable
                    self.abort()
                yield result
                if broken:
                    break

    def _store(
        self, current: Association, info: DicomInfo, may_resend: bool = False
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
                cls = self._c_store(current, info, ts_to_id[ts], payload, may_resend)
            except SourceUnreadable as exc:
                return StoreResult(info, _unreadable(exc.error))
            return StoreResult(info, cls, ts, how, time.monotonic() - start)
        return StoreResult(info, Classification(Action.PERMANENT, last_error))

    def _payload(self, info: DicomInfo, ts: str, how: str) -> FileData | bytes:
        """What to send: the file itself from its data set offset, or re-encoded bytes."""
        if how == "as is":
            return FileData(info.path, info.dataset_offset)
        from pydicom import dcmread
        from pydicom.uid import UID

        try:
            ds = dcmread(info.path, force=True)
        except OSError:
            raise
        except Exception as exc:
            raise _ConversionError(
                f"cannot decode the file to convert it: {one_line(exc)}"
            ) from exc
        if how == "decompress":
            compressed = _encapsulated_size(ds)
            try:
                # keep the instance: pydicom would otherwise give it a new SOP Instance UID
                ds.decompress(generate_instance_uid=False)
                # the pixels going out are the lossy ones: the data set must say so
                mark_lossy(ds, info.transfer_syntax, compressed)
            except Exception as exc:
                raise _ConversionError(
                    f"the peer does not accept {_name(info.transfer_syntax)} and the file "
                    f"cannot be decompressed here ({one_line(exc)}); install "
                    "dicom-forwarder[codecs] or enable that transfer syntax on the peer"
                ) from exc
        target = UID(ts)
        source_little = info.transfer_syntax != EXPLICIT_BE  # decompressed data is LE too
        try:
            if source_little != target.is_little_endian:
                swap_other_words(ds, source_little)
            return _encode(ds, target.is_implicit_VR, target.is_little_endian, ts == DEFLATED_LE)
        except Exception as exc:  # pydicom cannot write it (bad values, VRs): one line
            raise _ConversionError(
                f"cannot encode the data set as {_name(ts)}: {one_line(exc)}"
            ) from exc

    def _c_store(
        self,
        current: Association,
        info: DicomInfo,
        cx_id: int,
        payload: FileData | bytes,
        may_resend: bool = False,
    ) -> Classification:
        """One C-STORE on the association's socket; classified by its response status.

        Raises `_Dropped` (with `may_resend`) when the association was gone before any
        of the store went out.
        """
        msg_id = current.next_message_id()
        command = encode_store_command(info.sop_class_uid, info.sop_instance_uid, msg_id)
        link = current.link
        try:
            # network timeout while the peer takes nothing; DIMSE timeout for its answer
            link.settimeout(self.peer.network_timeout)
            link.send_message(cx_id, command, payload, current.send_pdu)
            link.settimeout(self.peer.dimse_timeout)
            rsp = link.read_response()
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

    The detail rides in the classification, so the one line the caller logs for the file
    names the cause: the sender logs no separate error line.
    """
    cls = classify_status(None)
    return Classification(cls.action, f"{cls.meaning}: {detail}")


def _encapsulated_size(ds: Dataset) -> int | None:
    """Bytes of compressed pixel data in the fragments of `ds`; None when not encapsulated."""
    from pydicom.encaps import generate_fragments

    value = ds.get("PixelData")
    if not isinstance(value, bytes):
        return None
    try:
        return sum(len(fragment) for fragment in generate_fragments(value))
    except Exception:  # a malformed item: no ratio, the decoder will say what is wrong
        return None


def _encode(ds: Dataset, implicit: bool, little: bool, deflated: bool) -> bytes:
    """The data set encoded for the wire (pynetdicom's `encode`, but raising, not logging).

    pynetdicom's version logs a traceback on failure and returns None; the sender wants
    the reason as one line.
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, little
    write_dataset(fp, ds)
    data = fp.getvalue()
    if deflated:
        deflater = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = deflater.compress(data) + deflater.flush()
        data += b"\x00" if len(data) % 2 else b""
    return data


def _name(uid: str) -> str:
    """The UID's name for messages ("CT Image Storage"), or the UID itself."""
    from pydicom.uid import UID

    u = UID(uid)
    return str(u.name) if u.is_valid and u.name != uid else uid
