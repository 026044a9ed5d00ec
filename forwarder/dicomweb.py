"""STOW-RS without I/O: the multipart body's framing, the response's per-instance outcomes.

PS3.18 10.5: a STOW-RS request is ``POST {base}/studies`` with a ``multipart/related;
type="application/dicom"`` body, one Part 10 file per part. The response (10.5.3) is a data
set, as DICOM JSON (``application/dicom+json``) or XML (``application/dicom+xml``), whose
ReferencedSOPSequence (0008,1199) lists the instances stored (with a WarningReason
(0008,1196) when coerced) and whose FailedSOPSequence (0008,1198) lists those refused with a
FailureReason (0008,1197). Both reasons are C-STORE status codes, classified as such
(`forwarder.status.classify_status`). An instance in neither sequence was not confirmed and
is not sent, whatever the HTTP status says.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree

from forwarder.status import Action, Classification, classify_status

__all__ = [
    "BodyPart",
    "InstanceOutcome",
    "StowResponse",
    "boundary",
    "classify_http",
    "content_type",
    "parse_response",
    "part_head",
    "plan_requests",
    "retry_after",
    "unconfirmed",
]

JSON_TYPES = ("application/dicom+json", "application/json")
XML_TYPES = ("application/dicom+xml", "application/xml", "text/xml")
ACCEPT = "application/dicom+json, application/dicom+xml;q=0.9"

_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_WARNING_REASON = "00081196"
_FAILURE_REASON = "00081197"
_PART_CLOSE = b"\r\n"


def boundary() -> str:
    """A fresh multipart boundary (never found in a DICOM file by chance)."""
    return f"forwarder-{uuid.uuid4().hex}"


def content_type(bound: str) -> str:
    """The request's Content-Type for `bound`."""
    return f'multipart/related; type="application/dicom"; boundary={bound}'


def part_head(bound: str) -> bytes:
    """What precedes each file in the body."""
    return f"--{bound}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")


def closing(bound: str) -> bytes:
    """What ends the body, after the last file's part."""
    return f"--{bound}--\r\n".encode("ascii")


@dataclass(frozen=True)
class BodyPart:
    """Where one instance's bytes come from: `head` (in memory, e.g. a file meta header the
    file lacks) and then `length` bytes of the file from `offset`."""

    head: bytes
    offset: int
    length: int

    @property
    def size(self) -> int:
        return len(self.head) + self.length


def body_length(bound: str, parts: Sequence[BodyPart]) -> int:
    """The exact Content-Length of the body framing `parts` with `bound`."""
    framing = len(part_head(bound)) + len(_PART_CLOSE)
    return sum(p.size + framing for p in parts) + len(closing(bound))


def plan_requests(sizes: Sequence[int], batch_size: int, max_bytes: int) -> list[range]:
    """Split items of `sizes` bytes, in order, into requests of at most `batch_size` items and
    `max_bytes` bytes (an item larger than `max_bytes` goes alone)."""
    plan: list[range] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= batch_size or total + size > max_bytes):
            plan.append(range(start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        plan.append(range(start, len(sizes)))
    return plan


# -- the response ----------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceOutcome:
    """What the server said of one instance: stored (with a warning reason or not) or failed."""

    sop_instance_uid: str
    stored: bool
    reason: int | None  # WarningReason or FailureReason; None when absent

    def classification(self, http_status: int) -> Classification:
        """The outcome as a C-STORE status would be classified."""
        if self.stored:
            if self.reason is None:
                return Classification(Action.SENT, f"stored (HTTP {http_status})", 0x0000)
            cls = classify_status(self.reason)
            if not cls.delivered:  # a "warning" that is no warning code: stored all the same
                return Classification(Action.WARNING, f"warning: {cls.meaning}", self.reason)
            return Classification(cls.action, f"{cls.meaning} (HTTP {http_status})", self.reason)
        if self.reason is None:
            return Classification(
                Action.RETRY_FEW, f"failed without a FailureReason (HTTP {http_status})"
            )
        cls = classify_status(self.reason)
        return Classification(cls.action, f"{cls.meaning} (HTTP {http_status})", cls.status)


@dataclass(frozen=True)
class StowResponse:
    """The per-instance outcomes of one STOW-RS response, by SOP Instance UID."""

    outcomes: Mapping[str, InstanceOutcome]


class UnreadableResponse(ValueError):
    """The body is not a STOW-RS response data set in a format read here."""


def parse_response(body: bytes, media_type: str) -> StowResponse:
    """The instances referenced and failed in a STOW-RS response body.

    Parameters
    ----------
    body : bytes
        The response body.
    media_type : str
        Its Content-Type (parameters allowed); JSON and XML are read.

    Raises
    ------
    UnreadableResponse
        Empty, another media type, or malformed: no instance is confirmed by it.
    """
    kind = media_type.split(";", 1)[0].strip().lower()
    if not body.strip():
        raise UnreadableResponse("empty response body")
    if kind in JSON_TYPES or (not kind and body.lstrip()[:1] in (b"{", b"[")):
        return _parse_json(body)
    if kind in XML_TYPES or (not kind and body.lstrip()[:1] == b"<"):
        return _parse_xml(body)
    raise UnreadableResponse(f"response in {kind or 'no media type'}, not DICOM JSON or XML")


_SEQUENCES = (
    (_REFERENCED_SOP_SEQUENCE, _WARNING_REASON, True),
    (_FAILED_SOP_SEQUENCE, _FAILURE_REASON, False),  # last: listed in both is failed
)


def _json_items(ds: Mapping[str, Any], tag: str) -> list[Mapping[str, Any]]:
    element = ds.get(tag)
    if not isinstance(element, Mapping):
        return []
    items = element.get("Value") or []
    return [i for i in items if isinstance(i, Mapping)] if isinstance(items, list) else []


def _json_first(ds: Mapping[str, Any], tag: str) -> Any:
    element = ds.get(tag)
    if not isinstance(element, Mapping):
        return None
    values = element.get("Value")
    return values[0] if isinstance(values, list) and values else None


def _parse_json(body: bytes) -> StowResponse:
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise UnreadableResponse(f"malformed JSON: {exc}") from None
    if isinstance(data, list):  # some servers wrap the data set in an array
        data = data[0] if data else {}
    if not isinstance(data, Mapping):
        raise UnreadableResponse("the JSON is not a data set")
    outcomes: dict[str, InstanceOutcome] = {}
    for tag, reason_tag, stored in _SEQUENCES:
        for item in _json_items(data, tag):
            uid = _json_first(item, _REFERENCED_SOP_INSTANCE_UID)
            if not isinstance(uid, str) or not uid:
                continue
            outcomes[uid.strip()] = InstanceOutcome(
                uid.strip(), stored, _reason(_json_first(item, reason_tag))
            )
    return StowResponse(outcomes)


def _reason(value: Any) -> int | None:
    """A reason code as a number (JSON US values are numbers; some servers send text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text, 16) if text.lower().startswith("0x") else int(text)
        except ValueError:
            return None
    return None


def _xml_attribute(parent: ElementTree.Element, tag: str) -> ElementTree.Element | None:
    for attr in parent.findall("DicomAttribute"):
        if attr.get("tag", "").upper() == tag:
            return attr
    return None


def _xml_first(parent: ElementTree.Element, tag: str) -> str | None:
    attr = _xml_attribute(parent, tag)
    if attr is None:
        return None
    value = attr.find("Value")
    return None if value is None or value.text is None else value.text.strip()


def _parse_xml(body: bytes) -> StowResponse:
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise UnreadableResponse(f"malformed XML: {exc}") from None
    for element in root.iter():  # PS3.19's namespace (dcm4chee sends it) or none
        if element.tag.startswith("{"):
            element.tag = element.tag.split("}", 1)[1]
    if root.tag != "NativeDicomModel":
        raise UnreadableResponse(f"XML root <{root.tag}>, not <NativeDicomModel>")
    outcomes: dict[str, InstanceOutcome] = {}
    for tag, reason_tag, stored in _SEQUENCES:
        seq = _xml_attribute(root, tag)
        if seq is None:
            continue
        for item in seq.findall("Item"):
            uid = _xml_first(item, _REFERENCED_SOP_INSTANCE_UID)
            if uid:
                outcomes[uid] = InstanceOutcome(uid, stored, _reason(_xml_first(item, reason_tag)))
    return StowResponse(outcomes)


def unconfirmed(http_status: int, detail: str = "") -> Classification:
    """An instance the response did not mention: not stored as far as we know."""
    more = f": {detail}" if detail else ""
    return Classification(
        Action.RETRY_FEW, f"the server did not confirm the instance (HTTP {http_status}){more}"
    )


# -- HTTP statuses ---------------------------------------------------------------------------

SPLIT_STATUSES = frozenset({400, 413})
"""The request as a whole was refused: smaller requests, down to one instance, may pass."""
AUTH_STATUSES = frozenset({401, 403})
"""The server refuses our credentials: the destination is paused, the token read again."""
BUSY_STATUSES = frozenset({408, 429, 502, 503, 504})
"""The server is there but cannot take the request now: retried after a while."""
MISCONFIGURED_STATUSES = frozenset({404, 405, 406, 415, 501})
"""The URL is not a STOW-RS service that takes what we send: the destination's settings."""
PER_INSTANCE_STATUSES = frozenset({200, 202, 409})
"""The body has per-instance outcomes (PS3.18 10.5.3)."""


def classify_http(status: int, reason: str = "") -> Classification:
    """What to do with every instance of a request answered `status` without per-instance
    outcomes (a single instance's request, for 400 and 413)."""
    text = f"HTTP {status}{' ' + reason if reason else ''}"
    if status == 413:
        return Classification(Action.PERMANENT, f"{text}: the instance alone is too large")
    if status in AUTH_STATUSES or status in MISCONFIGURED_STATUSES:
        return Classification(Action.DESTINATION, text)
    if status in BUSY_STATUSES or status >= 500:
        return Classification(Action.RETRY, text)
    return Classification(Action.RETRY_FEW, text)  # 400 and other refusals: a few tries


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None when
    absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


def describe(outcomes: Iterable[InstanceOutcome]) -> str:
    """Counts of stored and failed instances, for a log line."""
    items = list(outcomes)
    stored = sum(o.stored for o in items)
    return f"{stored} stored, {len(items) - stored} failed"
