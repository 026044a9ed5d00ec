"""Send DICOM files to one DICOMweb server over STOW-RS: requests, retries, per-instance outcomes.

A `StowSender` offers what a delivery worker drives (`forwarder.senderapi.DeliverySender`),
so a ``type = "dicomweb"`` destination has the same outbox, retry, quarantine and pause as a
C-STORE one. Each request is ``POST {url}/studies`` with at most ``batch_size`` instances and
``max_request_mb`` of files, streamed from disk (the Part 10 files as they are; a file
without a file meta header gets one made in memory). What each instance's outcome is comes
from the response's sequences only (`forwarder.dicomweb`): an instance the server did not
mention is not sent.

HTTP client: httpx (one `httpx.Client` per sender, i.e. per worker thread): keep-alive
connections, TLS verified against the system's CAs (or ``[destinations.tls]``), proxies
from the environment (HTTPS_PROXY, NO_PROXY), a request body read from a generator with an
exact Content-Length, and typed for mypy. `dicomweb-client` 0.61 was not used: its
`store_instances` takes decoded pydicom data sets, re-encodes them and joins the whole
multipart body in memory, raises on 409 before reading the per-instance outcomes, and retries
on its own schedule without Retry-After.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO

import httpx

from forwarder import dicomweb
from forwarder.association import AssociationFailed, client_tls_context
from forwarder.config import AuthSettings, Destination
from forwarder.contexts import ContextSpec
from forwarder.dicomfile import DicomInfo
from forwarder.httpauth import Credentials, CredentialsError
from forwarder.sender import ReportHandler, StoreResult
from forwarder.status import Action, Classification

__all__ = ["Entry", "StowSender", "file_meta", "stow_sender"]

LOGGER = logging.getLogger("forwarder.stow")

CHUNK_BYTES = 1 << 20
"""How much of a file is read at a time into the request body."""
TRIES = 3
"""How many times one request is sent when the server is busy or the connection fails,
before the destination is paused (or, when the outcome is unknown, the instances retried
later)."""
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 30.0
STOW_CONTEXT = ContextSpec("STOW-RS", ())
"""What `recent_contexts` gives once the server answered: an extra worker may then start."""
USER_AGENT = "dicom-forwarder"


def stow_sender(dest: Destination, stop: threading.Event) -> StowSender:
    """The STOW-RS sender of a DICOMweb destination."""
    return StowSender.from_destination(dest, stop=stop)


class _SourceFailed(Exception):
    """A file could not be read to its end while its request was being sent."""

    def __init__(self, info: DicomInfo, error: OSError | str) -> None:
        self.info = info
        text = error if isinstance(error, str) else (error.strerror or str(error))
        super().__init__(f"{info.path}: {text}")


@dataclass
class Entry:
    """One instance of a request: its file, open, and the bytes that go out."""

    info: DicomInfo
    fp: IO[bytes]
    part: dicomweb.BodyPart


@dataclass
class _Attempt:
    """What one request came back with: a response, or why none."""

    response: httpx.Response | None = None
    error: str = ""
    unsent: bool = False  # nothing reached the server (no connection): the peer is down
    seconds: float = 0.0
    auth: str | None = None  # the Authorization value it carried
    failed_source: _SourceFailed | None = field(default=None)


class StowSender:
    """Send files to one DICOMweb server with STOW-RS; one StowSender per thread.

    Parameters
    ----------
    url : str
        The DICOMweb base; requests go to ``{url}/studies``.
    batch_size, max_request_bytes : int
        The most instances, and bytes of files, in one request (a larger file goes alone).
    timeout : float
        Seconds for each of connecting, sending a chunk and waiting for the answer.
    credentials : Credentials
        The Authorization header (re-read when its files change).
    verify : ssl.SSLContext
        TLS for https URLs (system CAs unless the destination names its own).
    stop : threading.Event
        Cancels waits between tries; a request in flight ends at its timeout.
    """

    def __init__(
        self,
        url: str,
        *,
        batch_size: int = 50,
        max_request_bytes: int = 64 << 20,
        timeout: float = 120.0,
        credentials: Credentials | None = None,
        verify: ssl.SSLContext | None = None,
        stop: threading.Event | None = None,
        name: str = "",
    ) -> None:
        self.url = url.rstrip("/")
        self.batch_size = batch_size
        self.max_request_bytes = max_request_bytes
        self.timeout = timeout
        self.credentials = credentials or Credentials(None)
        self.verify = verify or client_tls_context()
        self.stop = stop or threading.Event()
        self.name = name or self.url
        self.associations = 0  # clients that got a first answer (the worker's "associations")
        self.waiting: tuple[float, float] | None = None
        self.requests = 0  # requests sent (for tests and logs)
        self.commitment = False  # Storage Commitment is DIMSE's: never asked over STOW-RS
        self.on_report: ReportHandler | None = None
        self._client: httpx.Client | None = None
        self._answered = False  # the current client got an answer
        self._ever_answered = False
        self._span_ok = False  # the server stored something of the current span
        self._server_errors: list[tuple[Entry, Classification, float]] = []

    @classmethod
    def from_destination(
        cls, dest: Destination, *, stop: threading.Event | None = None
    ) -> StowSender:
        """The sender of a ``type = "dicomweb"`` destination (TLS context loaded here)."""
        assert dest.url is not None, "a dicomweb destination has a url"
        tls = dest.tls
        verify = client_tls_context(
            ca=tls.ca if tls else None,
            cert=tls.cert if tls else None,
            key=tls.key if tls else None,
            verify=tls.verify if tls else True,
        )
        return cls(
            dest.url,
            batch_size=dest.batch_size,
            max_request_bytes=int(dest.max_request_mb * (1 << 20)),
            timeout=dest.timeout_seconds,
            credentials=Credentials(dest.auth or AuthSettings(), f"destinations.{dest.name}.auth"),
            verify=verify,
            stop=stop,
            name=dest.name,
        )

    def twin(self) -> StowSender:
        """Another sender with the same settings and credentials (for another thread)."""
        return StowSender(
            self.url,
            batch_size=self.batch_size,
            max_request_bytes=self.max_request_bytes,
            timeout=self.timeout,
            credentials=self.credentials,
            verify=self.verify,
            stop=self.stop,
            name=self.name,
        )

    # -- the connection ------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._client is not None

    @property
    def round_trip(self) -> float:
        return 0.0  # no handshake of its own is measured: the scale starts from one worker

    def _http(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(
                verify=self.verify,
                timeout=httpx.Timeout(self.timeout),
                trust_env=True,  # HTTP(S)_PROXY, NO_PROXY, SSL_CERT_FILE from the environment
                follow_redirects=False,  # a redirected POST would lose its body
                headers={"User-Agent": USER_AGENT},
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            )
            self._answered = False
        return self._client

    def open(self, specs: Sequence[ContextSpec]) -> float:
        """Make the client ready (no request is sent); returns `round_trip`."""
        self._http()
        return self.round_trip

    def recent_contexts(self) -> list[ContextSpec]:
        """A placeholder context once the server answered (extra workers wait for it)."""
        return [STOW_CONTEXT] if self._ever_answered else []

    def request_commitment(
        self, transaction_uid: str, references: Sequence[tuple[str, str]]
    ) -> Classification:
        """Storage Commitment is not part of STOW-RS: a destination configuration error
        (the config refuses it; transactions left from when it was a DIMSE destination)."""
        raise AssociationFailed(
            Classification(
                Action.DESTINATION,
                f"Storage Commitment cannot be asked over STOW-RS ({self.url}): transaction "
                f"{transaction_uid} stays open",
            )
        )

    def serve(self, seconds: float) -> None:
        """Nothing comes unasked over HTTP: wait `seconds` (or until stopped)."""
        self.stop.wait(seconds)

    def release(self) -> None:
        """Close the client and its keep-alive connection."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def abort(self) -> None:
        self.release()

    def close(self) -> None:
        self.release()

    def __enter__(self) -> StowSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def probe(self) -> float:
        """A QIDO-RS ``GET {url}/studies?limit=1`` with the credentials, as `forwarder echo`
        does; returns its round trip in seconds.

        Raises
        ------
        AssociationFailed
            No answer, or an answer other than 200/204 (classified as a request's would be).
        """
        client = self._http()
        try:
            auth = self.credentials.header(client)
        except CredentialsError as exc:
            raise AssociationFailed(Classification(Action.DESTINATION, str(exc))) from None
        headers = {"Accept": "application/dicom+json"}
        if auth is not None:
            headers["Authorization"] = auth
        start = time.monotonic()
        try:
            rsp = client.get(f"{self.url}/studies", params={"limit": "1"}, headers=headers)
        except httpx.HTTPError as exc:
            self.release()
            raise AssociationFailed(Classification(Action.RETRY, _what(exc))) from None
        seconds = time.monotonic() - start
        if rsp.status_code not in (200, 204):
            cls = dicomweb.classify_http(rsp.status_code, rsp.reason_phrase)
            raise AssociationFailed(Classification(cls.action, f"QIDO-RS: {cls.meaning}"))
        return seconds

    # -- sending -------------------------------------------------------------------------

    def send(self, items: Iterable[DicomInfo]) -> Iterator[StoreResult]:
        """Send `items`, yielding one result per item once its request is answered.

        Items not yet sent when `stop` is set are not yielded.

        Raises
        ------
        AssociationFailed
            The server cannot be reached after a few tries, is busy beyond them, refuses
            our credentials (DESTINATION: paused, the credentials read again next time) or
            is not a STOW-RS service at that URL; items before it were yielded.
        """
        todo = list(items)
        # as many requests as batch_size needs, evenly filled (64 claimed: 32 + 32, not 50 + 14)
        per = -(-len(todo) // max(1, -(-len(todo) // self.batch_size))) if todo else 1
        plan = dicomweb.plan_requests([i.size for i in todo], per, self.max_request_bytes)
        for span in plan:
            if self.stop.is_set():
                return
            entries: list[Entry] = []
            try:
                for info in (todo[k] for k in span):
                    entry = self._entry(info)
                    if isinstance(entry, StoreResult):
                        yield entry
                    else:
                        entries.append(entry)
                if entries:
                    self._span_ok, self._server_errors = False, []
                    yield from self._request(entries)
                    yield from self._after_server_errors()
            finally:
                for e in entries:
                    e.fp.close()

    def _after_server_errors(self) -> Iterator[StoreResult]:
        """The instances that alone got a server error (500): refused, when the server took
        others of the request (a poison instance); when it took none, it is the server that
        fails: the destination is paused, nothing counted against the instances."""
        errors, self._server_errors = self._server_errors, []
        if not errors:
            return
        if not self._span_ok:
            meaning = errors[0][1].meaning
            raise AssociationFailed(
                Classification(Action.RETRY, f"STOW-RS {self.url}: {meaning} for every instance")
            )
        for entry, cls, seconds in errors:
            yield StoreResult(entry.info, cls, entry.info.transfer_syntax, "as is", seconds)

    def _entry(self, info: DicomInfo) -> Entry | StoreResult:
        """`info`'s file opened for its request, or the result that says why it cannot be."""
        return _open_entry(info)

    def _request(self, entries: Sequence[Entry], most: int = TRIES) -> Iterator[StoreResult]:
        """One request for `entries` (tried again, split, or paused as its answer says)."""
        tries = 0
        auth_retried = False
        while not self.stop.is_set():
            attempt = self._post(entries)
            tries += 1
            rsp = attempt.response
            if attempt.failed_source is not None:  # our file: nothing is known of the rest
                yield from self._source_failed(entries, attempt.failed_source, attempt.seconds)
                return
            if rsp is None:
                if tries < most and self._pause(tries, None):
                    continue
                if self.stop.is_set():
                    return  # not attempted as far as the outbox knows: given back
                if not attempt.unsent and len(entries) > 1:
                    # cut every time: a proxy may reset a body over its size limit (nginx
                    # closes on client_max_body_size before we read its 413): smaller ones
                    yield from self._split(entries, attempt.error, most=1)
                    return
                if attempt.unsent:
                    raise AssociationFailed(
                        Classification(Action.RETRY, f"STOW-RS {self.url}: {attempt.error}")
                    )
                yield from self._all(entries, _no_response(attempt.error), attempt.seconds)
                return
            status = rsp.status_code
            parsed = self._outcomes(rsp)
            if status in dicomweb.PER_INSTANCE_STATUSES or (status == 400 and parsed):
                self._span_ok = self._span_ok or any(o.stored for o in parsed.values())
                yield from self._per_instance(entries, status, parsed, rsp, attempt.seconds)
                return
            if status in dicomweb.SPLIT_STATUSES and len(entries) > 1:
                yield from self._split(entries, status)
                return
            if status in dicomweb.AUTH_STATUSES:
                self.credentials.refused()
                if not auth_retried and self._credentials_changed(attempt.auth):
                    auth_retried = True  # a token rotated since: try it at once
                    continue
                raise AssociationFailed(
                    Classification(
                        Action.DESTINATION,
                        f"HTTP {status} {rsp.reason_phrase} from {self.url}: the server refuses "
                        f"our credentials (auth type {self.credentials.kind}; check "
                        "[destinations.auth] and its files)",
                    )
                )
            if 300 <= status < 400:  # a redirected POST would lose its body: not followed
                where = rsp.headers.get("Location", "?")
                raise AssociationFailed(
                    Classification(
                        Action.DESTINATION,
                        f"HTTP {status} from {self.url}/studies: redirected to {where} "
                        "(set url to the DICOMweb base there)",
                    )
                )
            if status in dicomweb.MISCONFIGURED_STATUSES:
                raise AssociationFailed(
                    Classification(
                        Action.DESTINATION,
                        f"HTTP {status} {rsp.reason_phrase} from {self.url}/studies: not a "
                        "STOW-RS service taking application/dicom there (check url)",
                    )
                )
            if status >= 500 and status not in dicomweb.BUSY_STATUSES:
                # a poison instance, or a broken server: smaller requests tell which
                if len(entries) > 1:
                    yield from self._split(entries, status)
                    return
                cls = dicomweb.classify_http(status, rsp.reason_phrase)
                cls = Classification(Action.RETRY_FEW, f"{cls.meaning} (this instance alone)")
                self._server_errors.append((entries[0], cls, attempt.seconds))
                return
            if status in dicomweb.BUSY_STATUSES:
                wait = dicomweb.retry_after(rsp.headers.get("Retry-After"))
                if tries < most and self._pause(tries, wait):
                    continue
                if self.stop.is_set():
                    return
                cls = dicomweb.classify_http(status, rsp.reason_phrase)
                # up, but takes nothing: paused with the breaker's back-off (not `busy`,
                # which would have a lone worker knock again within a second); with other
                # workers connected the worker treats it as the server's limit instead
                raise AssociationFailed(
                    Classification(Action.RETRY, f"STOW-RS {self.url}: {cls.meaning}")
                )
            yield from self._all(
                entries, dicomweb.classify_http(status, rsp.reason_phrase), attempt.seconds
            )
            return

    def _split(
        self, entries: Sequence[Entry], why: int | str, most: int = TRIES
    ) -> Iterator[StoreResult]:
        """`entries` in two requests (each tried at most `most` times)."""
        half = len(entries) // 2
        what = f"HTTP {why}" if isinstance(why, int) else why
        LOGGER.info(
            f"destination {self.name}: {what} for {len(entries)} instances: "
            f"sending them as {half} and {len(entries) - half}"
        )
        yield from self._request(entries[:half], most)
        yield from self._request(entries[half:], most)

    def _post(self, entries: Sequence[Entry]) -> _Attempt:
        """Send one request; its response (read whole) or what went wrong."""
        client = self._http()
        try:
            auth = self.credentials.header(client)
        except CredentialsError as exc:
            raise AssociationFailed(Classification(Action.DESTINATION, str(exc))) from None
        bound = dicomweb.boundary()
        parts = [e.part for e in entries]
        headers = {
            "Content-Type": dicomweb.content_type(bound),
            "Content-Length": str(dicomweb.body_length(bound, parts)),
            "Accept": dicomweb.ACCEPT,
        }
        if auth is not None:
            headers["Authorization"] = auth
        size = sum(p.size for p in parts)
        start = time.monotonic()
        # a request may take the timeout per chunk: it is not a wedged worker
        self.waiting = (start, self.timeout + size / 1_000_000)
        self.requests += 1
        try:
            rsp = client.post(f"{self.url}/studies", content=_body(bound, entries), headers=headers)
        except _SourceFailed as exc:
            self.release()  # the request was cut short: the connection is unusable
            return _Attempt(failed_source=exc, seconds=time.monotonic() - start, auth=auth)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            self.release()
            return _Attempt(error=_what(exc), unsent=True, auth=auth)
        except httpx.RequestError as exc:  # sent (some or all), no answer: outcome unknown
            self.release()
            return _Attempt(error=_what(exc), seconds=time.monotonic() - start, auth=auth)
        finally:
            self.waiting = (time.monotonic(), 0.0)
        seconds = time.monotonic() - start
        if not self._answered:
            self._answered = self._ever_answered = True
            self.associations += 1
        LOGGER.debug(
            f"destination {self.name}: STOW-RS {len(entries)} instances, {size / 1e6:.1f} MB: "
            f"HTTP {rsp.status_code} in {seconds:.2f} s"
        )
        return _Attempt(response=rsp, seconds=seconds, auth=auth)

    def _pause(self, tries: int, retry_after: float | None) -> bool:
        """Wait before the next try (Retry-After when given, else backing off); False when
        stopped, or when the server asks for longer than a request may take (the
        destination is paused instead)."""
        wait = retry_after
        if wait is None:
            wait = min(FIRST_BACKOFF_SECONDS * 2 ** (tries - 1), MAX_BACKOFF_SECONDS)
        if wait > self.timeout:
            return False
        self.waiting = (time.monotonic(), wait + self.timeout)
        try:
            return not self.stop.wait(wait)
        finally:
            self.waiting = (time.monotonic(), 0.0)

    def _credentials_changed(self, used: str | None) -> bool:
        try:
            return self.credentials.header(self._http()) != used
        except CredentialsError:
            return False

    def _outcomes(self, rsp: httpx.Response) -> dict[str, dicomweb.InstanceOutcome]:
        """The per-instance outcomes in `rsp` ({} when it has none that can be read)."""
        if not rsp.content:
            return {}
        try:
            parsed = dicomweb.parse_response(rsp.content, rsp.headers.get("Content-Type", ""))
        except dicomweb.UnreadableResponse as exc:
            if rsp.status_code in dicomweb.PER_INSTANCE_STATUSES:
                LOGGER.warning(
                    f"destination {self.name}: HTTP {rsp.status_code} answer unreadable "
                    f"({exc}): no instance of the request counts as sent"
                )
            return {}
        return dict(parsed.outcomes)

    def _per_instance(
        self,
        entries: Sequence[Entry],
        status: int,
        outcomes: dict[str, dicomweb.InstanceOutcome],
        rsp: httpx.Response,
        seconds: float,
    ) -> Iterator[StoreResult]:
        each = seconds / max(len(entries), 1)
        detail = "" if outcomes else "no readable ReferencedSOPSequence in the answer"
        for e in entries:
            outcome = outcomes.get(e.info.sop_instance_uid)
            if outcome is None:
                cls = dicomweb.unconfirmed(status, detail)
            else:
                cls = outcome.classification(status)
            yield StoreResult(e.info, cls, e.info.transfer_syntax, "as is", each)

    def _all(
        self, entries: Sequence[Entry], cls: Classification, seconds: float
    ) -> Iterator[StoreResult]:
        each = seconds / max(len(entries), 1)
        for e in entries:
            yield StoreResult(e.info, cls, e.info.transfer_syntax, "as is", each)

    def _source_failed(
        self, entries: Sequence[Entry], failed: _SourceFailed, seconds: float
    ) -> Iterator[StoreResult]:
        """A file could not be read mid-request: the request was cut, nothing is known."""
        for e in entries:
            if e.info is failed.info:
                cls = Classification(Action.UNREADABLE, f"cannot read the file: {failed}")
            else:
                cls = _no_response(f"request cut: {failed}")
            yield StoreResult(e.info, cls, e.info.transfer_syntax, "as is", seconds)


def _no_response(detail: str) -> Classification:
    """Sent, without an answer that says what became of it: sent again later."""
    return Classification(Action.RETRY, f"no response (outcome unknown): {detail}")


def _what(exc: httpx.HTTPError) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _open_entry(info: DicomInfo) -> Entry | StoreResult:
    """`info`'s file, open, with what goes out of it; or the result that says why not."""
    try:
        fp = open(info.path, "rb")  # noqa: SIM115 (closed by `send`)
    except OSError as exc:
        return StoreResult(
            info,
            Classification(Action.UNREADABLE, f"cannot read the file: {exc.strerror or exc}"),
        )
    try:
        head = fp.read(132)
        size = fp.seek(0, 2)
        if len(head) == 132 and head[128:] == b"DICM":
            part = dicomweb.BodyPart(b"", 0, size)
        else:  # no preamble: a Part 10 header made from what the file says of itself
            meta = file_meta(info)
            part = dicomweb.BodyPart(meta, info.dataset_offset, size - info.dataset_offset)
    except (OSError, ValueError) as exc:
        fp.close()
        what = exc.strerror if isinstance(exc, OSError) else str(exc)
        return StoreResult(info, Classification(Action.UNREADABLE, f"cannot read the file: {what}"))
    return Entry(info, fp, part)


def file_meta(info: DicomInfo) -> bytes:
    """Preamble, ``DICM`` and a file meta group for a file that has none."""
    from forwarder import filemeta

    return filemeta.file_meta(info.sop_class_uid, info.sop_instance_uid, info.transfer_syntax)


def _body(bound: str, entries: Sequence[Entry]) -> Iterator[bytes]:
    """The multipart body, read from the files as it goes (one chunk in memory at a time)."""
    for e in entries:
        yield dicomweb.part_head(bound) + e.part.head
        try:
            e.fp.seek(e.part.offset)
            left = e.part.length
            while left > 0:
                chunk = e.fp.read(min(CHUNK_BYTES, left))
                if not chunk:
                    raise _SourceFailed(e.info, "the file shrank while it was being sent")
                left -= len(chunk)
                yield chunk
        except OSError as exc:
            raise _SourceFailed(e.info, exc) from exc
        yield b"\r\n"
    yield dicomweb.closing(bound)


def send_files(sender: StowSender, infos: Sequence[DicomInfo]) -> list[StoreResult]:
    """Every result of sending `infos` (for one-shot use: ``forwarder send --url``)."""
    return list(sender.send(infos))
