"""Classify C-STORE statuses and association outcomes into what a forwarder does next."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "Action",
    "Classification",
    "classify_association",
    "classify_status",
    "status_hex",
]


def status_hex(status: int | None) -> str | None:
    """A DIMSE status as DICOM writes it, ``0xA900``; None when there was no response."""
    return None if status is None else f"0x{status:04X}"


class Action(enum.Enum):
    """What to do with an instance after one attempt."""

    SENT = "sent"  # the peer has it (success)
    WARNING = "warning"  # the peer has it, with a warning worth recording
    RETRY = "retry"  # transient: try again later
    RETRY_FEW = "retry-few"  # probably transient, but give up after a few attempts
    RETRY_FRESH = "retry-fresh"  # retry once on a fresh association, then permanent
    PERMANENT = "permanent"  # the peer will never take it: quarantine
    DESTINATION = "destination"  # the destination is misconfigured: pause it, keep the instance
    UNREADABLE = "unreadable"  # our file could not be read: nothing was sent


@dataclass(frozen=True)
class Classification:
    """The outcome of one C-STORE attempt."""

    action: Action
    meaning: str
    status: int | None = None

    @property
    def delivered(self) -> bool:
        """True when the peer accepted the instance (success or warning)."""
        return self.action in (Action.SENT, Action.WARNING)

    def describe(self) -> str:
        """A short text such as ``0xA700 out of resources``."""
        if self.status is None:
            return self.meaning
        return f"{status_hex(self.status)} {self.meaning}"


# Exact codes first (PS3.4 B.2.3, PS3.7 C), then ranges.
_EXACT: dict[int, tuple[Action, str]] = {
    0x0000: (Action.SENT, "success"),
    0x0001: (Action.WARNING, "warning: requested optional attributes not supported"),
    0x0107: (Action.WARNING, "warning: attribute list error"),
    0x0116: (Action.WARNING, "warning: attribute value out of range"),
    0xB000: (Action.WARNING, "warning: coercion of data elements"),
    0xB006: (Action.WARNING, "warning: elements discarded"),
    0xB007: (Action.WARNING, "warning: data set does not match SOP class"),
    0x0111: (Action.WARNING, "duplicate SOP instance (peer already has it)"),
    0x0110: (Action.RETRY_FEW, "processing failure"),
    0x0213: (Action.RETRY, "resource limitation"),
    0x0117: (Action.PERMANENT, "invalid SOP instance"),
    0x0122: (Action.PERMANENT, "SOP class not supported"),
    0x0112: (Action.PERMANENT, "SOP class not supported"),
    0x0124: (Action.DESTINATION, "not authorised"),
    0x0214: (Action.DESTINATION, "not authorised"),
    0x0210: (Action.RETRY_FRESH, "duplicate invocation"),
    0x0211: (Action.RETRY_FRESH, "unrecognised operation"),
    0x0212: (Action.RETRY_FRESH, "mistyped argument"),
}

_RANGES: tuple[tuple[int, int, Action, str], ...] = (
    (0xA700, 0xA7FF, Action.RETRY, "out of resources"),
    (0xA900, 0xA9FF, Action.PERMANENT, "data set does not match SOP class"),
    (0xC000, 0xCFFF, Action.RETRY_FEW, "cannot understand"),
    (0xB000, 0xBFFF, Action.WARNING, "warning"),
    (0xA000, 0xAFFF, Action.PERMANENT, "refused"),
    (0xFE00, 0xFE00, Action.PERMANENT, "cancelled"),
)


def classify_status(status: int | None) -> Classification:
    """Classify a C-STORE response status.

    Parameters
    ----------
    status : int or None
        The (0000,0900) *Status* of the response, or ``None`` when no valid response came
        (DIMSE timeout, abort, invalid response): the outcome is then unknown and the
        instance must be sent again.

    Returns
    -------
    Classification
        Never raises; an unknown code is treated as a failure worth a few retries.
    """
    if status is None:
        return Classification(Action.RETRY, "no response (timeout, abort or invalid response)")
    if status in _EXACT:
        action, meaning = _EXACT[status]
        return Classification(action, meaning, status)
    for low, high, action, meaning in _RANGES:
        if low <= status <= high:
            return Classification(action, meaning, status)
    return Classification(Action.RETRY_FEW, "unknown status", status)


# A-ASSOCIATE-RJ (PS3.8 table 9-21): (result, source, reason) -> meaning
_RJ_REASONS: dict[tuple[int, int], str] = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given (ACSE)",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


def classify_association(
    *,
    rejected: bool,
    result: int | None = None,
    source: int | None = None,
    diagnostic: int | None = None,
    detail: str = "",
) -> Classification:
    """Classify an association that was not established.

    A permanent rejection (result 1: unknown AE titles, unsupported application context or
    protocol) is a destination configuration error: pause the destination, keep the
    instances. A transient rejection (result 2), a refused, reset or timed-out connection
    and an abort are transient.
    """
    if not rejected:
        return Classification(Action.RETRY, detail or "connection failed or aborted")
    reason = _RJ_REASONS.get((source or 0, diagnostic or 0), f"diagnostic {diagnostic}")
    if result == 1:
        return Classification(Action.DESTINATION, f"association rejected (permanent): {reason}")
    return Classification(Action.RETRY, f"association rejected (transient): {reason}")
