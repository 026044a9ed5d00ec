"""Storage Commitment messages (PS3.4 J): the N-ACTION data set out, the report in (pure).

The Push Model: the SCU sends an N-ACTION-RQ (action type 1) to the well-known instance
1.2.840.10008.1.20.1.1 with a Transaction UID and the Referenced SOP Sequence of the instances
it asks the peer to commit to; the peer answers it at once, and later reports the outcome in an
N-EVENT-REPORT-RQ (event type 1: all committed; 2: some failed, listed with a Failure Reason in
the Failed SOP Sequence), on the same association or on one it opens to the SCU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Final

from forwarder.dicomfile import EXPLICIT_LE, IMPLICIT_LE
from forwarder.status import Action, Classification, classify_status

if TYPE_CHECKING:  # pydicom loads when a message is built or read
    from pydicom.dataset import Dataset

__all__ = [
    "COMMIT_SYNTAXES",
    "STORAGE_COMMITMENT",
    "STORAGE_COMMITMENT_INSTANCE",
    "Report",
    "classify_action",
    "decode_report",
    "encode_report",
    "encode_request",
    "failure_reason",
    "new_transaction_uid",
    "report_of",
]

STORAGE_COMMITMENT: Final = "1.2.840.10008.1.20.1"
"""Storage Commitment Push Model SOP Class."""
STORAGE_COMMITMENT_INSTANCE: Final = "1.2.840.10008.1.20.1.1"
"""Its well-known SOP Instance, the target of every N-ACTION and N-EVENT-REPORT."""
COMMIT_SYNTAXES: Final = (EXPLICIT_LE, IMPLICIT_LE)
"""The transfer syntaxes proposed for it (its data sets are small: no compression)."""
ACTION_REQUEST_COMMIT: Final = 1
EVENT_ALL_COMMITTED: Final = 1
EVENT_SOME_FAILED: Final = 2

# PS3.3 C.14.1.1 (Failure Reason) and PS3.4 J.3.3.1.1
_FAILURE_REASONS: Final[dict[int, str]] = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class/instance conflict",
    0x0122: "referenced SOP class not supported",
    0x0131: "duplicate transaction UID",
    0x0213: "resource limitation",
}

# N-ACTION-RSP statuses (PS3.7 10.1.4.1.10) that mean something else than for a C-STORE
_ACTION_STATUSES: Final[dict[int, tuple[Action, str]]] = {
    0x0112: (Action.RETRY_FEW, "no such SOP instance (the commitment instance)"),
    0x0114: (Action.RETRY_FEW, "no such argument"),
    0x0115: (Action.RETRY_FEW, "invalid argument value"),
    0x0117: (Action.RETRY_FEW, "invalid object instance"),
    0x0118: (Action.DESTINATION, "no such SOP class (Storage Commitment not supported)"),
    0x0119: (Action.RETRY_FEW, "class-instance conflict"),
    # not an N-ACTION status of PS3.4 J.3.2.1.1, but what a peer that takes every context and
    # has no Storage Commitment answers; as a C-STORE status it is permanent for the instance
    0x0122: (Action.DESTINATION, "SOP class not supported (Storage Commitment not supported)"),
    0x0123: (Action.DESTINATION, "no such action (Storage Commitment not supported)"),
}


@dataclass(frozen=True)
class Report:
    """What an N-EVENT-REPORT said of one transaction."""

    transaction_uid: str
    event_type: int
    committed: tuple[tuple[str, str], ...]
    """(SOP Class UID, SOP Instance UID) the peer committed to."""
    failed: tuple[tuple[str, str, int | None], ...]
    """(SOP Class UID, SOP Instance UID, Failure Reason) it will not keep."""


def new_transaction_uid() -> str:
    """A fresh Transaction UID (a 2.25 UUID-derived UID: unique without registration)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=None))


def failure_reason(reason: int | None) -> str:
    """``0x0110 processing failure`` for a Failure Reason; "no reason given" for None."""
    if reason is None:
        return "no reason given"
    meaning = _FAILURE_REASONS.get(reason, "unknown reason")
    return f"0x{reason:04X} {meaning}"


def classify_action(status: int | None) -> Classification:
    """Classify an N-ACTION-RSP status as the C-STORE ones are (`classify_status`).

    The codes whose meaning differs for an N-ACTION are looked up first: a peer that knows no
    Storage Commitment (no such SOP class, no such action) is a destination configuration
    error; argument errors are refusals worth a few more tries.
    """
    if status is not None and status in _ACTION_STATUSES:
        action, meaning = _ACTION_STATUSES[status]
        return Classification(action, meaning, status)
    return classify_status(status)


def encode_request(
    transaction_uid: str, references: Sequence[tuple[str, str]], transfer_syntax: str
) -> bytes:
    """The N-ACTION-RQ data set: the Transaction UID and the Referenced SOP Sequence of
    `references` ((SOP Class UID, SOP Instance UID) pairs), encoded in `transfer_syntax`."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return _encode(ds, transfer_syntax)


def decode_report(event_type: int, data: bytes, transfer_syntax: str) -> Report:
    """An N-EVENT-REPORT-RQ's data set as a `Report`.

    Raises
    ------
    ValueError
        The data set cannot be read, has no Transaction UID, or the event type is not 1 or 2.
    """
    from pydicom.filereader import read_dataset

    try:
        ds = read_dataset(
            BytesIO(data),
            is_implicit_VR=transfer_syntax == IMPLICIT_LE,
            is_little_endian=True,
        )
    except Exception as exc:  # pydicom raises many kinds on a damaged data set
        raise ValueError(f"cannot read the report's data set: {exc}") from exc
    return report_of(event_type, ds)


def report_of(event_type: int, ds: Dataset) -> Report:
    """A decoded N-EVENT-REPORT data set (what pynetdicom hands an SCP) as a `Report`.

    Raises
    ------
    ValueError
        No Transaction UID, a reference without its UIDs, or an event type other than 1, 2.
    """
    if event_type not in (EVENT_ALL_COMMITTED, EVENT_SOME_FAILED):
        raise ValueError(f"event type {event_type} is not a Storage Commitment result")
    try:
        uid = str(ds.get("TransactionUID", "") or "")
        committed = tuple(
            (str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
            for i in ds.get("ReferencedSOPSequence", None) or []
        )
        failed = tuple(
            (
                str(i.ReferencedSOPClassUID),
                str(i.ReferencedSOPInstanceUID),
                int(i.FailureReason) if "FailureReason" in i else None,
            )
            for i in ds.get("FailedSOPSequence", None) or []
        )
    except Exception as exc:  # a missing attribute, a value that is not a number
        raise ValueError(f"cannot read the report: {exc}") from exc
    if not uid:
        raise ValueError("the report has no Transaction UID")
    return Report(uid, event_type, committed, failed)


def encode_report(report: Report, transfer_syntax: str) -> bytes:
    """A report's data set (what a Storage Commitment SCP sends; for tests and tools)."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.TransactionUID = report.transaction_uid
    if report.committed:
        ds.ReferencedSOPSequence = [_ref(c, i) for c, i in report.committed]
    if report.failed:
        items = []
        for c, i, reason in report.failed:
            item = _ref(c, i)
            if reason is not None:
                item.FailureReason = reason
            items.append(item)
        ds.FailedSOPSequence = items
    return _encode(ds, transfer_syntax)


def _ref(sop_class: str, sop_instance: str) -> Dataset:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def _encode(ds: Dataset, transfer_syntax: str) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = transfer_syntax == IMPLICIT_LE, True
    write_dataset(fp, ds)
    return fp.getvalue()
