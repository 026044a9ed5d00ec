"""What became of one delivery: the outbox mark to commit and the line to log (pure)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace

from forwarder.dicomfile import DicomInfo, InvalidDicom, escape_bytes, locate, uid_problem
from forwarder.outbox import Delivery, Mark, State
from forwarder.policy import Decision, Next
from forwarder.sender import StoreResult
from forwarder.status import Action, Classification

__all__ = ["Pending", "Verdict", "awaiting_commitment", "checked", "disappeared", "held", "judged"]

DISAPPEARED = "the file disappeared before it was sent"
CHANGED = "the file changed after it was queued; the new version is queued on its own"


@dataclass(frozen=True)
class Verdict:
    """One delivery's outcome: the mark to commit and the event to log."""

    mark: Mark
    level: int
    outcome: str
    """The event's name in the log: sent, warning, retry, quarantined, held, gone."""
    detail: str
    status: int | None = None
    finished: bool = False
    """The delivery is final: its file may leave the inbox once the mark is committed."""


def _quarantined(d: Delivery, reason: str, *, refusal: bool = False) -> Verdict:
    mark = Mark(d.id, State.QUARANTINED, None, reason, refusal=refusal)
    return Verdict(mark, logging.ERROR, "quarantined", reason, finished=True)


def disappeared(d: Delivery) -> Verdict:
    """The file was deleted after it was queued: nothing went out, nothing to retry."""
    mark = Mark(d.id, State.GONE, None, DISAPPEARED)
    return Verdict(mark, logging.WARNING, "gone", DISAPPEARED, finished=True)


def _changed(d: Delivery) -> Verdict:
    """A new version replaced the file: it has rows of its own, this file stays."""
    return Verdict(Mark(d.id, State.GONE, None, CHANGED), logging.WARNING, "gone", CHANGED)


def bad_uid(d: Delivery) -> str | None:
    """Why a queued row's UIDs cannot be sent (see `dicomfile.uid_problem`), or None."""
    for name, uid in (
        ("Transfer Syntax UID", d.transfer_syntax),
        ("SOP Class UID", d.sop_class_uid),
        ("SOP Instance UID", d.sop_instance_uid),
    ):
        problem = uid_problem(uid)
        if problem is not None:
            shown = escape_bytes(uid.encode("utf-8", "surrogateescape"))
            return f"invalid {name} '{shown}': {problem}"
    return None


def checked(d: Delivery, *, follow_symlinks: bool) -> DicomInfo | Verdict:
    """The claimed file as it was queued, or the verdict on a delivery it cannot be.

    The enqueuer read the file completely; an unchanged size and mtime say it is still that
    file, so a stat is enough here (a row without the data set offset has its file meta
    read again).
    """
    bad = bad_uid(d)
    if bad is not None:  # never let an invalid UID reach a peer, whoever queued it
        return _quarantined(d, bad)
    try:
        if d.dataset_offset is not None:
            # not through a symlink that replaced the file since (unless symlinks are followed)
            st = os.stat(d.path, follow_symlinks=follow_symlinks)
            size, mtime_ns = st.st_size, st.st_mtime_ns
            info = d.file
        else:
            info = locate(
                d.path,
                sop_class_uid=d.sop_class_uid,
                sop_instance_uid=d.sop_instance_uid,
                transfer_syntax=d.transfer_syntax,
                study_uid=d.study_uid,
            )
            size, mtime_ns = info.size, info.mtime_ns
    except FileNotFoundError:
        return disappeared(d)
    except (InvalidDicom, OSError) as exc:
        reason = exc.reason if isinstance(exc, InvalidDicom) else f"unreadable: {exc}"
        return _quarantined(d, reason, refusal=True)
    if (size, mtime_ns) != (d.size, d.mtime_ns):
        return _changed(d)
    return info


def judged(d: Delivery, result: StoreResult, decision: Decision, now: float) -> Verdict:
    """The verdict on a store the peer answered (or did not), as `decision` says; a HOLD
    needs the end of the destination's pause (`held`)."""
    cls = result.classification
    if decision.next is Next.SENT:
        warning = cls.describe() if cls.action is Action.WARNING else None
        how = result.sent_as or None
        mark = Mark(
            d.id, State.SENT, cls.status or 0, warning, sent_as=how, sent_uid=result.sent_uid
        )
        level = logging.WARNING if warning else logging.INFO
        detail = f"{cls.describe()}; {how}" if how else cls.describe()
        if result.sent_uid:
            detail += f"; sent as {result.sent_uid}"
        outcome = "warning" if warning else "sent"
        return Verdict(mark, level, outcome, detail, cls.status, finished=True)
    if decision.next is Next.RETRY:
        assert decision.next_attempt_at is not None
        mark = Mark(
            d.id,
            State.PENDING,
            cls.status,
            decision.reason,
            decision.next_attempt_at,
            refusal=decision.refusal,
        )
        detail = f"{decision.reason}; retry in {decision.next_attempt_at - now:.0f} s"
        return Verdict(mark, logging.WARNING, "retry", detail, cls.status)
    if decision.next is Next.QUARANTINE:
        mark = Mark(d.id, State.QUARANTINED, cls.status, decision.reason, refusal=decision.refusal)
        return Verdict(mark, logging.ERROR, "quarantined", decision.reason, cls.status, True)
    raise ValueError(f"a {decision.next.name} needs the end of the pause: see held()")


def awaiting_commitment(v: Verdict, commit_uid: str, ask_at: float | None = None) -> Verdict:
    """A SENT verdict for a destination that asks for Storage Commitment: the row waits on
    transaction `commit_uid` (COMMITTING) and its file stays until the peer commits.

    `ask_at`: when the transaction, if this mark opens it, is first due to be asked (the
    batch's lease end: the worker makes it due itself once the batch is over); None: at once.
    """
    mark = replace(v.mark, state=State.COMMITTING, commit_uid=commit_uid, next_attempt_at=ask_at)
    detail = f"{v.detail}; awaiting commitment"
    return replace(v, mark=mark, outcome="stored", detail=detail, finished=False)


def held(d: Delivery, cls: Classification, reason: str, until: float) -> Verdict:
    """The destination refuses us: keep the instance, due when the pause ends, no attempt."""
    mark = Mark(d.id, State.PENDING, cls.status, reason, until, count_attempt=False)
    return Verdict(mark, logging.ERROR, "held", reason, cls.status)


def suspect(d: Delivery, decision: Decision) -> Verdict:
    """The sender raised while `d` was next: a refusal of `d` (see `Worker._suspect`)."""
    if decision.next is Next.QUARANTINE:
        return _quarantined(d, decision.reason, refusal=True)
    assert decision.next_attempt_at is not None
    mark = Mark(d.id, State.PENDING, None, decision.reason, decision.next_attempt_at, refusal=True)
    return Verdict(mark, logging.ERROR, "retry", decision.reason)


class Pending:
    """Verdicts' marks not yet committed, and the deliveries they finish (their files may
    leave the inbox once the marks are committed)."""

    MAX_MARKS = 64
    MAX_AGE = 0.05  # seconds: a slow peer still sees its acks committed promptly

    def __init__(self) -> None:
        self.marks: list[Mark] = []
        self.done: list[Delivery] = []
        self.since = time.monotonic()

    def add(self, mark: Mark, finished: Delivery | None = None) -> None:
        if not self.marks:
            self.since = time.monotonic()
        self.marks.append(mark)
        if finished is not None:
            self.done.append(finished)

    def due(self) -> bool:
        return len(self.marks) >= self.MAX_MARKS or time.monotonic() - self.since >= self.MAX_AGE

    def take(self) -> tuple[list[Mark], list[Delivery]]:
        marks, done = self.marks, self.done
        self.marks, self.done = [], []
        return marks, done
