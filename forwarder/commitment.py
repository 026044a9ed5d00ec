"""Storage Commitment bookkeeping: the peer's reports and our requests, recorded in the outbox.

A delivery to a destination with ``[destinations.commitment] enabled`` is COMMITTING once
stored, waiting on a transaction (`forwarder.outbox.Commitment`). This module decides what a
report does to those rows (`record_report`; for a report that comes on an association the peer
opens to our receiver: `answer_report` with the request as read off the wire, `handle_report`
with a decoded data set) and what asking (again) does (`ask`); the worker (`forwarder.deliver`)
sends the requests and takes the reports on its own association.

* A success reference: the row is SENT (committed); its file may leave the inbox once every
  destination has it.
* A failed reference: the peer has the instance but will not keep it. The row goes back to
  PENDING and the instance is stored again, a refusal counted under ``[retry]``; once the
  refusals reach the limit it is QUARANTINED with the failure reason.
* No report within ``timeout_seconds`` of an accepted request: the same transaction is asked
  again (an N-ACTION for the same instances, not a resend), each request counted as an
  attempt; after ``retry.max_attempts`` requests, or ``retry.max_age_seconds``, its rows are
  QUARANTINED ("no Storage Commitment report").
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final

from forwarder.association import AssociationFailed
from forwarder.commitmsg import (
    STORAGE_COMMITMENT,
    Report,
    classify_action,
    decode_report,
    failure_reason,
    new_transaction_uid,
    report_of,
)
from forwarder.events import Events
from forwarder.logs import fields
from forwarder.outbox import Commitment, Delivery, Mark, Outbox, OutboxError, State
from forwarder.policy import Next, RetryLimits, backoff, decide
from forwarder.status import Action, Classification
from forwarder.wire import N_EVENT_REPORT_RQ, Request, encode_event_report_response

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "PROCESSING_FAILURE",
    "SUCCESS",
    "Asked",
    "Settled",
    "answer_report",
    "ask",
    "handle_report",
    "record_report",
]

LOGGER = logging.getLogger("forwarder.commitment")

SUCCESS: Final = 0x0000
PROCESSING_FAILURE: Final = 0x0110
"""The N-EVENT-REPORT-RSP status when the report could not be recorded (the outbox could not
be written, the data set could not be read): the peer may report again."""
_RESOURCE_LIMITATION: Final = 0x0213

Ask = Callable[[str, Sequence[tuple[str, str]]], Classification]
"""Sends one N-ACTION-RQ: (transaction UID, references) -> its response classified
(`forwarder.sender.Sender.request_commitment`)."""


@dataclass(frozen=True)
class Settled:
    """What one report did."""

    status: int
    """The N-EVENT-REPORT-RSP status to answer the peer with."""
    committed: int = 0
    resent: int = 0
    quarantined: int = 0
    unknown: int = 0
    """References that match no row awaiting commitment under that transaction."""
    finished: tuple[Delivery, ...] = ()
    """Rows the report made final (committed or quarantined): hand them to the disposer."""


@dataclass(frozen=True)
class Asked:
    """What one `ask` did."""

    classification: Classification | None
    """The N-ACTION-RSP classified; None when no request was sent (nothing left to ask, or
    given up)."""
    finished: tuple[Delivery, ...] = ()
    """Rows given up on (quarantined): hand them to the disposer."""
    uid: str = ""
    """The Transaction UID asked under: a new one when the last request was refused."""


def handle_report(
    outbox: Outbox,
    calling_aet: str,
    dataset: Dataset,
    event_type: int,
    *,
    retry: RetryLimits,
    events: Events | None = None,
    now: float | None = None,
) -> Settled:
    """Record an N-EVENT-REPORT a peer sent on an association it opened to us (the receiver's
    EVT_N_EVENT_REPORT): `dataset` as decoded, `event_type` 1 or 2.

    Returns the `Settled`; its ``status`` is what the N-EVENT-REPORT-RSP answers (0x0000, or
    0x0110 when the report cannot be read or recorded: the peer may send it again). Hand its
    ``finished`` to the disposer. Never raises.
    """
    try:
        report = report_of(event_type, dataset)
    except ValueError as exc:
        LOGGER.warning(f"commitment report from {calling_aet} answered 0x0110: {exc}")
        return Settled(PROCESSING_FAILURE)
    return record_report(
        outbox, report, retry=retry, events=events, now=now, source=f"from {calling_aet}"
    )


def answer_report(
    outbox: Outbox,
    calling_aet: str,
    request: Request,
    transfer_syntax: str,
    *,
    retry: RetryLimits,
    events: Events | None = None,
    now: float | None = None,
) -> tuple[bytes, Settled]:
    """Record an N-EVENT-REPORT-RQ as it came over the wire on an association a peer opened
    to our receiver (`forwarder.wire.Request`: its command and data set, the data set in the
    context's `transfer_syntax`); returns the command set of the N-EVENT-REPORT-RSP to send
    on the same presentation context, and the `Settled` (hand its ``finished`` to the
    disposer). Never raises.
    """
    settled = Settled(PROCESSING_FAILURE)
    if request.field != N_EVENT_REPORT_RQ or request.uid(0x00000002) != STORAGE_COMMITMENT:
        LOGGER.warning(
            f"request 0x{request.field:04X} for {request.uid(0x00000002)!r} from {calling_aet} "
            "answered 0x0110: not a Storage Commitment report"
        )
    elif request.data_set is None:
        LOGGER.warning(f"commitment report from {calling_aet} answered 0x0110: no data set")
    else:
        raw = request.command.get(0x00001002, b"")
        event_type = int.from_bytes(raw[:2], "little") if len(raw) >= 2 else 0
        try:
            report = decode_report(event_type, request.data_set, transfer_syntax)
        except ValueError as exc:
            LOGGER.warning(f"commitment report from {calling_aet} answered 0x0110: {exc}")
        else:
            settled = record_report(
                outbox, report, retry=retry, events=events, now=now, source=f"from {calling_aet}"
            )
    return encode_event_report_response(request, settled.status), settled


def record_report(
    outbox: Outbox,
    report: Report,
    *,
    retry: RetryLimits,
    events: Events | None = None,
    now: float | None = None,
    source: str = "",
    rand: Callable[[], float] = random.random,
) -> Settled:
    """Apply `report` to the rows awaiting its transaction, in one outbox transaction.

    References are matched by SOP Instance UID (the one sent, for a transform that changed
    it) among the rows still COMMITTING under the report's Transaction UID; a report for a
    transaction already settled, or references it does not hold, change nothing (logged).
    Never raises: an outbox that cannot be written gives ``status`` 0x0110.
    """
    events = events or Events()
    now = time.time() if now is None else now
    uid = report.transaction_uid
    where = f" {source}" if source else ""
    try:
        rows = outbox.commitment_rows(uid)
        waiting: dict[str, list[Delivery]] = {}
        for d in rows:
            waiting.setdefault(d.stored_uid, []).append(d)
        marks: list[Mark] = []
        lines: list[tuple[Delivery, Mark, str]] = []
        unknown = 0
        for _cls, inst in report.committed:
            found = waiting.pop(inst, [])
            unknown += not found
            for d in found:
                mark = Mark(d.id, State.SENT)
                marks.append(mark)
                lines.append((d, mark, "committed by the peer"))
        for _cls, inst, reason in report.failed:
            found = waiting.pop(inst, [])
            unknown += not found
            for d in found:
                mark = _refused(d, reason, retry, now, rand())
                marks.append(mark)
                lines.append((d, mark, mark.error or ""))
        changed = set(outbox.settle_commitment(uid, marks, now)) if marks else set()
    except OutboxError as exc:
        LOGGER.error(f"commitment report{where} for {uid} answered 0x0110: {exc}")
        return Settled(PROCESSING_FAILURE)
    finished: list[Delivery] = []
    counts = {State.SENT: 0, State.PENDING: 0, State.QUARANTINED: 0}
    for d, mark, detail in lines:
        if mark.delivery_id not in changed:
            continue
        counts[mark.state] += 1
        if mark.state is State.SENT:
            events.delivery(logging.INFO, "committed", d, detail, 0)
        elif mark.state is State.PENDING:
            events.delivery(logging.WARNING, "retry", d, f"{detail}; stored again", mark.status)
        else:
            events.delivery(logging.ERROR, "quarantined", d, detail, mark.status)
        if mark.state is not State.PENDING:
            finished.append(d)
    if not rows:
        LOGGER.warning(
            f"commitment report{where} for transaction {uid}: no instance awaits it "
            "(settled already, or not ours); answered 0x0000",
            extra=fields(outcome="commitment-unknown"),
        )
    elif unknown:
        LOGGER.warning(
            f"commitment report{where} for transaction {uid}: {unknown} reference(s) to "
            "instances it does not await; ignored",
            extra=fields(outcome="commitment-unknown"),
        )
    left = len(rows) - sum(counts.values())
    if rows:
        LOGGER.info(
            f"commitment report{where} for transaction {uid} ({rows[0].destination}): "
            f"{counts[State.SENT]} committed, {counts[State.PENDING]} to store again, "
            f"{counts[State.QUARANTINED]} quarantined"
            + (f", {left} still awaited" if left else ""),
            extra=fields(destination=rows[0].destination, outcome="commitment-report"),
        )
    return Settled(
        SUCCESS,
        committed=counts[State.SENT],
        resent=counts[State.PENDING],
        quarantined=counts[State.QUARANTINED],
        unknown=unknown,
        finished=tuple(finished),
    )


def _refused(d: Delivery, reason: int | None, retry: RetryLimits, now: float, rand: float) -> Mark:
    """The mark for a failed reference: store again, or quarantine, under the retry rules.

    The store was counted as an attempt already; the failure counts as a refusal of it (a
    resource limitation as a transient failure). The failure reason is kept as the status.
    """
    action = Action.RETRY if reason == _RESOURCE_LIMITATION else Action.RETRY_FEW
    meaning = f"not committed by the peer: {failure_reason(reason)}"
    cls = Classification(action, meaning)
    decision = decide(cls, d.attempts - 1, d.first_attempt_at, now, retry, rand, d.refusals)
    if decision.next is Next.RETRY:
        assert decision.next_attempt_at is not None
        return Mark(
            d.id,
            State.PENDING,
            reason,
            decision.reason,
            decision.next_attempt_at,
            refusal=decision.refusal,
        )
    return Mark(d.id, State.QUARANTINED, reason, decision.reason, refusal=decision.refusal)


def ask(
    outbox: Outbox,
    request: Ask,
    tx: Commitment,
    *,
    timeout: float,
    retry: RetryLimits,
    now: float,
    rand: float,
    events: Events | None = None,
) -> Asked:
    """Ask the peer to commit to what still awaits transaction `tx` (claimed with
    `Outbox.claim_asks`), and record when to ask next.

    First time: the request. Due again after an accepted request: no report came within
    `timeout`, so it is asked again, or given up (its rows QUARANTINED) once ``max_attempts``
    requests were sent or the transaction is older than ``max_age_seconds``. The response:
    accepted, next ask in `timeout`; refused for good (permanent), rows quarantined; a peer
    that knows no Storage Commitment, asked again after ``retry.max_seconds`` without
    counting (logged as an error), and no age limit while it never took one; otherwise asked
    again after a backoff, counted.

    Raises
    ------
    AssociationFailed
        From `request`: no association. The transaction is due again at `now`, not counted
        (the caller pauses the destination).
    """
    events = events or Events()
    rows = outbox.commitment_rows(tx.uid)
    if not rows:  # every row settled (or requeued by an operator): nothing to ask
        outbox.settle_commitment(tx.uid, [], now)
        return Asked(None)
    # the peer refuses the service itself (no Storage Commitment context, no such SOP class
    # or action: not counted, see below): a configuration error holds the instances, as a
    # store's HOLD does, rather than letting their age quarantine them
    held = tx.attempts == 0 and tx.asked_at is None and tx.last_error is not None
    late = now - tx.created_at >= retry.max_age_seconds and not held
    if tx.attempts >= retry.max_attempts or late:
        last = f"; last: {tx.last_error}" if tx.last_error else ""
        why = (
            f"no Storage Commitment report after {tx.attempts} request(s) over "
            f"{(now - tx.created_at) / 3600:.1f} h{last}"
        )
        return Asked(None, _give_up(outbox, tx, rows, why, now, events))
    dest = rows[0].destination
    if tx.last_status is not None and not classify_action(tx.last_status).delivered:
        # the last request was answered with a failure status: that UID is no longer active
        # and shall not be reused (PS3.4 J.3.2.1.2)
        new_uid = new_transaction_uid()
        outbox.renew_commitment(tx.uid, new_uid, now)
        LOGGER.info(
            f"commitment: transaction {tx.uid} of {dest} was refused (0x{tx.last_status:04X}): "
            f"asked again as {new_uid}",
            extra=fields(destination=dest, outcome="commitment-renewed"),
        )
        tx = replace(tx, uid=new_uid)
    refs = [(d.sop_class_uid, d.stored_uid) for d in rows]
    try:
        cls = request(tx.uid, refs)
    except AssociationFailed:  # not asked: due again when the destination's pause ends
        outbox.asked(tx.uid, now, now, accepted=False, counted=False)
        raise
    again = " again" if tx.asked_at is not None else ""
    if cls.delivered:
        outbox.asked(tx.uid, now, now + timeout, accepted=True, status=cls.status)
        LOGGER.info(
            f"commitment: asked {dest}{again} to commit to {len(refs)} instance(s) "
            f"(transaction {tx.uid}): {cls.describe()}",
            extra=fields(destination=dest, outcome="commitment-asked"),
        )
        return Asked(cls, uid=tx.uid)
    if cls.action is Action.PERMANENT:
        why = f"Storage Commitment request refused: {cls.describe()}"
        return Asked(cls, _give_up(outbox, tx, rows, why, now, events), tx.uid)
    counted = cls.action is not Action.DESTINATION
    wait = (
        backoff(tx.attempts + 1, retry.initial_seconds, retry.max_seconds, rand)
        if counted
        else retry.max_seconds
    )
    outbox.asked(
        tx.uid,
        now,
        now + wait,
        accepted=False,
        status=cls.status,
        error=cls.describe(),
        counted=counted,
    )
    level = logging.WARNING if counted else logging.ERROR
    LOGGER.log(
        level,
        f"commitment: {dest} did not take the request for transaction {tx.uid} "
        f"({len(refs)} instance(s)): {cls.describe()}; asking again in {wait:.0f} s",
        extra=fields(destination=dest, outcome="commitment-not-asked"),
    )
    return Asked(cls, uid=tx.uid)


def _give_up(
    outbox: Outbox,
    tx: Commitment,
    rows: Sequence[Delivery],
    why: str,
    now: float,
    events: Events,
) -> tuple[Delivery, ...]:
    status = tx.last_status or None  # a success of the last request is no reason
    marks = [Mark(d.id, State.QUARANTINED, status, why) for d in rows]
    changed = set(outbox.settle_commitment(tx.uid, marks, now))
    finished = tuple(d for d in rows if d.id in changed)
    for d in finished:
        events.delivery(logging.ERROR, "quarantined", d, why, status)
    return finished
