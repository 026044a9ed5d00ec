"""The deliver stage: claim due deliveries, send them, record every outcome in the outbox."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from forwarder import commitment, verdict
from forwarder.commitmsg import decode_report, new_transaction_uid
from forwarder.config import Destination
from forwarder.crew import Crew, Rules
from forwarder.dicomfile import DicomInfo
from forwarder.errors import EX_CANTCREAT, EX_SOFTWARE
from forwarder.events import Events
from forwarder.logs import fields
from forwarder.metrics import Metrics
from forwarder.outbox import Delivery, Outbox, OutboxCorruptError, OutboxError
from forwarder.policy import IDLE_SECONDS, Next, decide
from forwarder.sender import AssociationFailed, Peer, Sender, StoreResult
from forwarder.senderapi import DeliverySender
from forwarder.status import Action, Classification
from forwarder.trouble import OutboxTrouble, damaged, pause_after
from forwarder.verdict import Pending, Verdict

__all__ = ["SenderFactory", "Worker", "dicom_sender"]

LOGGER = logging.getLogger("forwarder.daemon")

MAX_TROUBLE_PAUSE_SECONDS = 5.0
"""The longest a worker waits between tries while the outbox cannot be written."""
WAIT_FOR_FIRST_SECONDS = 1.0
"""An extra worker waits this long for the first association's contexts."""
CAPACITY_WAIT_SECONDS = 5.0
"""A worker whose association the peer would not take waits this long ..."""
CAPACITY_RETRY_SECONDS = 0.5
"""... unless it is within the level the peer takes."""
PEER_UP_SECONDS = 10.0
"""A peer that answered a store this recently is up, not down."""
QUIET_SECONDS = 60.0
"""A worker that has not looked for work for this long (outside a batch) is hung."""
DUE_MARGIN_SECONDS = 0.01
"""A worker wakes this long after the next retry is due, so that the claim finds it."""
REPORT_WAIT_SECONDS = 10.0
"""An association with Storage Commitment requests unanswered is held this much longer than
the linger time, for a peer that reports on it (one that reports on a new association
reports whenever it likes: to the receiver)."""
REPORT_POLL_SECONDS = 0.25
"""How long a worker waits on its association for a report before looking for work again."""
ASKS_PER_LOOP = 8
"""Storage Commitment transactions a worker asks (again) for at most per iteration."""

Fatal = Callable[[str, int], None]
"""Stops the daemon: (reason, exit status)."""
SenderFactory = Callable[[Destination, threading.Event], DeliverySender]
"""Makes a worker's sender for its destination; the event cancels what it waits for."""


def dicom_sender(dest: Destination, stop: threading.Event) -> DeliverySender:
    """The C-STORE sender (storescu's logic) of a DICOM destination; STOW-RS for a
    ``type = "dicomweb"`` one."""
    if dest.type == "dicomweb":
        from forwarder.stow import stow_sender  # httpx: only for DICOMweb destinations

        return stow_sender(dest, stop)
    return Sender(Peer.from_destination(dest), stop=stop)


class Worker(threading.Thread):
    """Drains one destination's deliveries over one association at a time.

    `loop(now)` is one iteration (claim, send, record); `run` repeats it until `stop`.
    Finished files go to `done` once their outcomes are committed.
    """

    def __init__(
        self,
        crew: Crew,
        index: int,
        *,
        outbox: Outbox,
        events: Events,
        metrics: Metrics,
        trouble: OutboxTrouble,
        done: Callable[[Sequence[Delivery]], None],
        fatal: Fatal,
        hard_stop: threading.Event,
        clock: Callable[[], float] = time.time,
        sender: SenderFactory | None = None,
    ) -> None:
        super().__init__(name=f"send-{crew.dest.name}-{index}", daemon=True)
        self.crew = crew
        self.dest = crew.dest
        self.scale = crew.scale  # its destination's: a retired worker keeps reporting to its own
        self.level = index + 1  # this worker's association is the level-th of its destination
        self.outbox = outbox
        self.events = events
        self.metrics = metrics
        self.trouble = trouble
        self.done = done
        self.fatal = fatal
        self.hard_stop = hard_stop
        self.clock = clock  # wall clock: the outbox's times
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.last_beat = time.monotonic()
        self.busy_since: float | None = None  # monotonic start of the current batch
        self.held: tuple[int, ...] = ()  # the rows of the batch being sent (leases renewed)
        self.opening = False  # requesting its association before claiming (`_open_first`)
        self._last_activity = time.monotonic()
        self._sender = (sender or dicom_sender)(crew.dest, self.stop)
        self._commitment = crew.dest.commitment
        if self._commitment.enabled:  # propose it, take the reports on the association
            self._sender.commitment = True
            self._sender.on_report = self._on_report
        self._tx_uid: str | None = None  # the transaction the batch being sent opens
        self._tx_hold = 0.0  # ... not asked (by any worker) before then, unless the batch ends
        self._awaiting: set[str] = set()  # transactions asked on the open association
        self._awaiting_on = 0  # ... whose number (`Sender.associations`) is this
        self._reported: set[str] = set()  # reported while `_ask_due` asks (before the RSP)
        self._fresh = False
        self._associations_counted = 0
        self._ran_dry = False  # the last claim found nothing (the scale's measurement paused)
        # outcomes and releases not yet committed (the outbox could not be written): kept
        # and committed first once it can, so a full disk costs no resends
        self._pending = Pending()
        self._to_release: list[int] = []

    def problem(self, stall_limit: float, now: float) -> str | None:
        """Why this worker is dead or hung at monotonic `now`, or None (it is fine, or was
        stopped on purpose)."""
        if not self.is_alive():
            return None if self.stop.is_set() else f"worker {self.name} died"
        since = self.busy_since
        if since is not None and now - since > stall_limit:
            waiting = self._sender.waiting  # a transform: its file's allowance on top
            start, allowance = (max(since, waiting[0]), waiting[1]) if waiting else (since, 0)
            if now - start > stall_limit + allowance:
                what = "waiting for a transform" if allowance else "stuck in one batch"
                return f"worker {self.name} {what} for {now - start:.0f} s"
        if since is None and now - self.last_beat > QUIET_SECONDS:
            return f"worker {self.name} has not looked for work for {now - self.last_beat:.0f} s"
        return None

    @property
    def rules(self) -> Rules:
        return self.crew.rules

    @property
    def holds_association(self) -> bool:
        return self._sender.is_open

    def run(self) -> None:
        failures = 0
        try:
            while not self.stop.is_set():
                try:
                    self.loop(self.clock())
                except OutboxCorruptError as exc:
                    self.fatal(damaged(f"worker {self.name}", exc, self.outbox.path), EX_CANTCREAT)
                    return
                except OutboxError as exc:  # full disk, read-only, busy: wait and try again
                    self.trouble.report(f"worker {self.name}", exc)
                    failures += 1
                    self._idle(min(pause_after(failures), MAX_TROUBLE_PAUSE_SECONDS))
                except Exception:  # one row or association must not end the thread
                    failures += 1
                    LOGGER.exception(f"worker {self.name}: unexpected error; carrying on")
                    with contextlib.suppress(Exception):  # whatever state it was left in
                        self._sender.abort()
                    self._fresh = False
                    self._idle(pause_after(failures))
                else:
                    failures = 0
        except BaseException:
            self.fatal(f"worker {self.name} died", EX_SOFTWARE)
            raise
        finally:
            self.close()

    def close(self) -> None:
        """End the association: released, or aborted when the daemon stops hard."""
        try:
            if self.stop.is_set() and self.hard_stop.is_set():
                self._sender.abort()
            else:
                self._sender.release()
        except Exception:
            LOGGER.exception(f"worker {self.name}: releasing the association failed")

    def loop(self, now: float) -> None:
        """One iteration at wall-clock `now` (the outbox's clock): claim, send, record."""
        self.last_beat = time.monotonic()
        self._settle()
        paused = self.crew.breaker.remaining(now)
        if paused:
            self._idle(paused)
            return
        scale = self.scale
        if self.level > scale.allowed:  # not wanted now ("auto" has not grown this far)
            if self._sender.is_open:
                self._sender.release()
            self._idle(IDLE_SECONDS)
            return
        if self._asks_commitment() and not self._sender.is_open:
            # with stores due, the requests wait for the association the batch opens (with
            # the storage contexts): one opened for them alone would be released for the
            # batch at once, before a peer could report on it
            due = self.outbox.next_due(self.dest.name, now)
            if (due is None or due > now) and not self._ask_due(now):
                return
        if not self._sender.is_open:
            due = self._next_work(now)
            if due is None or due > now:  # nothing to send: no association knocks on the peer
                self._ran_out(now, due)
                return
            if not self._open_first(now):
                return
        batch = self.outbox.claim(
            self.dest.name,
            self.rules.batch_size,
            now,
            self.rules.lease_seconds,
            share=2 * scale.allowed if scale.allowed > 1 else 1,
        )
        if not batch:
            if self._sender.commitment and not self._ask_due(now):  # on the open association
                return
            self._ran_out(now, self._next_work(now))
            return
        if self._ran_dry:
            self._ran_dry = False
            scale.resumed(time.monotonic())
        self.trouble.clear()  # a claim that took rows wrote to the outbox
        self.busy_since = time.monotonic()
        tx_uid = self._tx_uid = new_transaction_uid() if self._commitment.enabled else None
        # held back while the batch goes on (its outcomes are committed as they come, which
        # opens it): another worker of the destination asking meanwhile would name only the
        # instances stored so far. A crash mid-batch: asked once the batch's lease is over.
        self._tx_hold = now + self.rules.lease_seconds
        self.held = tuple(d.id for d in batch)
        try:
            self._send_batch(batch, now)
        finally:
            self.held = ()
            self.busy_since = None
            self._last_activity = time.monotonic()
            self._count_associations()
            self._tx_uid = None
        if tx_uid is not None:
            self.outbox.commitment_due(tx_uid, self.clock())
        if self._sender.commitment and self._sender.is_open:
            self._ask_due(self.clock())  # the batch's transaction, and any due, on its association
        if self._fresh:
            self._sender.release()
            self._fresh = False

    def _ran_out(self, now: float, due: float | None) -> None:
        """Nothing to send before `due` (None: nothing queued): pause the scale's measurement,
        release an association idle for the linger time, wait for work."""
        if not self._ran_dry:
            self._ran_dry = True
            self.scale.interrupted()
        waits = [IDLE_SECONDS]
        awaiting = self._reports_awaited()
        if self._sender.is_open:
            idle = time.monotonic() - self._last_activity
            linger = self.rules.linger_seconds + (REPORT_WAIT_SECONDS if awaiting else 0.0)
            if idle >= linger:
                self._sender.release()
                awaiting = False
            else:
                waits.append(linger - idle)
        if due is not None:
            waits.append(due - now + DUE_MARGIN_SECONDS)
        if awaiting:  # the peer may report on this association: answer it as it comes
            self._sender.serve(min([*waits, REPORT_POLL_SECONDS]))
        else:
            self._idle(min(waits))

    # -- storage commitment ---------------------------------------------------------

    def _next_work(self, now: float) -> float | None:
        """When there is next something to send or to ask (None: nothing queued)."""
        due = self.outbox.next_due(self.dest.name, now)
        if not self._sender.commitment:
            return due
        ask = self.outbox.next_ask(self.dest.name)
        if ask is not None:
            paused = self.crew.breaker.remaining(now)
            ask = max(ask, now + paused) if paused else ask
        return min((t for t in (due, ask) if t is not None), default=None)

    def _asks_commitment(self) -> bool:
        """True when this worker asks for Storage Commitment: its destination wants it, or
        it did before (a reload or restart turned it off) and transactions are still open:
        those are asked for and settled as promised, new stores are not."""
        if self._sender.commitment:
            return True
        if self.outbox.next_ask(self.dest.name) is None:
            return False
        LOGGER.warning(
            f"destination {self.dest.name}: commitment is off, but transactions asked for "
            "before are open: they are asked for until the peer reports",
            extra=fields(destination=self.dest.name, outcome="commitment-leftover"),
        )
        self._sender.commitment = True
        self._sender.on_report = self._on_report
        return True

    def _reports_awaited(self) -> bool:
        """True while transactions asked on the open association have not been reported."""
        if not self._sender.is_open or self._sender.associations != self._awaiting_on:
            self._awaiting.clear()
        return bool(self._awaiting)

    def _ask_due(self, now: float) -> bool:
        """Ask the peer to commit to the transactions of the destination that are due (new
        ones, and those with no report in time); False when the association failed (the
        destination is paused, as a failed batch would pause it)."""
        due = self.outbox.next_ask(self.dest.name)
        if due is None or due > now:
            return True
        asks = self.outbox.claim_asks(self.dest.name, ASKS_PER_LOOP, now, self.rules.lease_seconds)
        self._reported.clear()
        try:
            for tx in asks:
                if self.stop.is_set():
                    break  # the lease brings it back
                # a request waits for its response: work, its own stall limit as a store's
                self.busy_since = time.monotonic()
                try:
                    asked = commitment.ask(
                        self.outbox,
                        self._sender.request_commitment,
                        tx,
                        timeout=self._commitment.timeout_seconds,
                        retry=self.rules.retry,
                        now=self.clock(),
                        rand=random.random(),
                        events=self.events,
                    )
                except AssociationFailed as exc:
                    # asked again once the destination's pause is over (`ask` recorded
                    # this one, perhaps under a new Transaction UID)
                    for t in asks[asks.index(tx) + 1 :]:
                        self.outbox.asked(t.uid, now, now, accepted=False, counted=False)
                    if not self.stop.is_set() and not self._at_capacity(exc):
                        self._trip(exc, self.clock())
                    return False
                finally:
                    self._count_associations()
                uid = asked.uid or tx.uid
                delivered = asked.classification is not None and asked.classification.delivered
                if delivered and uid not in self._reported:  # a report may beat the response
                    if self._sender.associations != self._awaiting_on:
                        self._awaiting = set()
                        self._awaiting_on = self._sender.associations
                    self._awaiting.add(uid)
                if asked.finished:
                    self.done(list(asked.finished))
        finally:
            self.busy_since = None
            self._last_activity = time.monotonic()
        return True

    def _on_report(self, event_type: int, data: bytes, transfer_syntax: str) -> int:
        """A Storage Commitment report on our association: record it; the status to answer."""
        try:
            report = decode_report(event_type, data, transfer_syntax)
        except ValueError as exc:
            LOGGER.warning(
                f"destination {self.dest.name}: commitment report answered 0x0110: {exc}",
                extra=fields(destination=self.dest.name, outcome="commitment-report"),
            )
            return commitment.PROCESSING_FAILURE
        settled = commitment.record_report(
            self.outbox,
            report,
            retry=self.rules.retry,
            events=self.events,
            now=self.clock(),
            source=f"from {self.dest.name} on our association",
        )
        self._awaiting.discard(report.transaction_uid)
        self._reported.add(report.transaction_uid)
        if settled.finished:
            self.done(list(settled.finished))
        if settled.resent:
            self.crew.wake()  # the instances to store again are due (after their backoff)
        return settled.status

    def _open_first(self, now: float) -> bool:
        """Open the association before taking any work; True when the worker may claim.

        While it waits for the peer, no claimed file waits with it: a single-process peer
        queues a second connection until the first association is released, and an extra
        association must not hold files back meanwhile. Without the contexts of earlier
        batches (the destination's first one) the worker claims first and associates for it.
        A refusal while another association of the destination is open is the peer's limit
        (`_at_capacity`); any other failure pauses the destination as a failed batch would.
        """
        specs = self.crew.contexts
        if not specs:
            if self.level == 1 or not self.scale.auto:
                return True
            self._idle(WAIT_FOR_FIRST_SECONDS)  # the first association has sent nothing yet
            return False
        self.busy_since = time.monotonic()  # an ACSE wait is work, not a wedged worker
        self.opening = True
        try:
            self._sender.open(specs)
        except AssociationFailed as exc:
            self.opening = False
            if not self.stop.is_set() and not self._at_capacity(exc):
                self._trip(exc, now)
            return False
        finally:
            self.busy_since = None
            self.opening = False
        self._count_associations()
        return True

    def _scale_stored(self) -> None:
        """Tell the scale a store was answered; wake the next worker when it may start."""
        scale = self.scale
        before = (scale.allowed, scale.settled)
        scale.stored(time.monotonic())
        if (scale.allowed, scale.settled) == before:
            return
        if scale.allowed > before[0]:
            self.crew.wake()
        if scale.settled:
            LOGGER.info(
                f"destination {self.dest.name}: associations: {scale.describe()}",
                extra=fields(destination=self.dest.name, outcome="associations"),
            )

    def _idle(self, seconds: float) -> None:
        self.wake.wait(max(0.0, min(seconds, IDLE_SECONDS)))
        self.wake.clear()

    def _send_batch(self, batch: list[Delivery], now: float) -> None:
        by_path: dict[Path, Delivery] = {}
        infos: list[DicomInfo] = []
        for d in batch:
            info = verdict.checked(d, follow_symlinks=self.rules.follow_symlinks)
            if isinstance(info, Verdict):
                self._commit(d, info)
            else:
                by_path[info.path] = d
                infos.append(info)
        handled: set[int] = set()
        pending = self._pending
        tripped: AssociationFailed | None = None
        try:
            for result in self._sender.send(infos):
                self.busy_since = time.monotonic()  # progress: the stall limit is per store
                d = by_path[result.info.path]
                handled.add(d.id)
                self._record(d, result, pending)
                if pending.due():
                    self._flush(pending)
        except AssociationFailed as exc:
            tripped = exc
        except OutboxError:
            raise
        except Exception as exc:  # one file broke the sender: count it against that file only
            rest = [d for d in by_path.values() if d.id not in handled]
            if rest:
                handled.add(rest[0].id)
                self._suspect(rest[0], exc, pending)
            raise
        finally:
            self._to_release += [d.id for d in by_path.values() if d.id not in handled]
            self._settle()
        if tripped is not None and not self.stop.is_set() and not self._at_capacity(tripped):
            self._trip(tripped, self.clock())  # (a stop cancels a request: not a failure)

    def _at_capacity(self, exc: AssociationFailed) -> bool:
        """True when the association failed while the peer is plainly up: another association
        of the destination is open or being opened, or the peer rejected it as busy having
        answered a store moments ago (two requests at once can both exceed its limit). The
        peer takes no more now (a limit, a single-process peer); nothing is paused and no
        attempt counted. "auto" settles at the associations open, and this worker waits
        before it tries again."""
        others = [w for w in self.crew.workers if w is not self]
        holding = sum(w.holds_association for w in others)
        now = time.monotonic()
        up = holding or any(w.opening for w in others)
        if not up and not (exc.busy and now - self.scale.answered_at <= PEER_UP_SECONDS):
            return False  # nobody else has the peer: it is down or refuses us
        self.scale.limit(max(1, holding), now)
        LOGGER.info(
            f"destination {self.dest.name}: association {self.level} not opened "
            f"({exc.classification.meaning}); associations: {self.scale.describe()}",
            extra=fields(destination=self.dest.name, outcome="associations"),
        )
        # the one that should carry on tries again soon; one above the level waits longer
        within = self.level <= self.scale.allowed
        self._idle(CAPACITY_RETRY_SECONDS if within else CAPACITY_WAIT_SECONDS)
        return True

    def _suspect(self, d: Delivery, exc: Exception, pending: Pending) -> None:
        """The sender raised while `d` was next: a refusal of `d` (quarantined after a few),
        so that one poison file can neither stop the worker nor come back forever."""
        cls = Classification(Action.RETRY_FEW, f"internal error while sending: {exc!r}")
        decision = decide(
            cls, d.attempts, d.first_attempt_at, self.clock(), self.rules.retry, random.random(),
            d.refusals,
        )  # fmt: skip
        self._keep(d, verdict.suspect(d, decision), pending)
        self._fresh = True

    def _settle(self) -> None:
        """Commit what earlier tries could not: recorded outcomes, then rows to give back.

        Raises `OutboxError` while the outbox still cannot be written (they stay kept).
        """
        self._flush(self._pending)
        if self._to_release:
            self.outbox.release(self._to_release, self.clock())
            self._to_release = []

    def _flush(self, pending: Pending) -> None:
        """Commit the recorded outcomes (one transaction), then let finished files go.

        A file leaves the inbox only after its outcome is committed; a crash before the
        commit means the instance is sent again, never that it is lost. When the commit
        fails the outcomes stay in `pending` for the next try.
        """
        if not pending.marks:
            return
        marks, done = pending.take()
        try:
            self.outbox.mark_many(marks, self.clock())
        except BaseException:
            pending.marks[:0], pending.done[:0] = marks, done
            raise
        self.done(done)

    def _commit(self, d: Delivery, verdict: Verdict) -> None:
        """Commit a verdict reached before sending (one row), and let its file go."""
        self.outbox.mark_many([verdict.mark], self.clock())
        self._log(d, verdict)
        if verdict.finished:
            self.done([d])

    def _keep(self, d: Delivery, verdict: Verdict, pending: Pending) -> None:
        """Keep a verdict to be committed with the batch's next flush."""
        pending.add(verdict.mark, d if verdict.finished else None)
        self._log(d, verdict)

    def _log(self, d: Delivery, v: Verdict) -> None:
        self.events.delivery(v.level, v.outcome, d, v.detail, v.status)

    def _count_associations(self) -> None:
        """Report associations established since the last report (metrics, the scale)."""
        new = self._sender.associations - self._associations_counted
        if new > 0:
            self._associations_counted += new
            self.metrics.association(self.dest.name, new)
            # what an extra association proposes, known as soon as the first one is up
            self.crew.contexts = self._sender.recent_contexts()
            if self.level == 1:
                before = self.scale.allowed
                self.scale.round_trip(self._sender.round_trip)
                if self.scale.allowed > before:  # a far peer: more associations from the start
                    self.crew.wake()
            self.scale.established(self.level, time.monotonic())

    def _record(self, d: Delivery, result: StoreResult, pending: Pending) -> None:
        self._count_associations()  # as soon as a store shows it, not at the batch's end
        now = self.clock()
        cls = result.classification
        if cls.status is not None:
            self._scale_stored()
        if cls.action is Action.UNREADABLE and not os.path.lexists(d.path):
            self._keep(d, verdict.disappeared(d), pending)  # deleted since the claim
            return
        decision = decide(
            cls, d.attempts, d.first_attempt_at, now, self.rules.retry, random.random(),
            d.refusals,
        )  # fmt: skip
        self.metrics.observe_store(
            d.destination, decision.next.value, cls.status, result.seconds, result.info.size
        )
        if decision.next is Next.HOLD:  # the destination refuses us: pause it, keep the file
            until = self._pause(decision.reason, hold=True, now=now)
            self._keep(d, verdict.held(d, cls, decision.reason, until), pending)
            return
        if decision.next is Next.SENT:
            self.crew.breaker.succeeded()  # "is back" before the line of the store that shows it
        judged = verdict.judged(d, result, decision, now)
        if decision.next is Next.SENT and self._tx_uid is not None:
            judged = verdict.awaiting_commitment(judged, self._tx_uid, self._tx_hold)
        self._keep(d, judged, pending)
        self._fresh = self._fresh or decision.fresh_association

    def _pause(self, reason: str, *, hold: bool, now: float) -> float:
        until = self.crew.breaker.trip(reason, self.rules.retry, hold=hold, now=now)
        self.crew.wake()  # to sleep out the pause
        return until

    def _trip(self, exc: AssociationFailed, now: float) -> None:
        hold = exc.classification.action is Action.DESTINATION
        reason = exc.classification.meaning
        if hold and self.dest.type == "dimse":  # (a dicomweb refusal names its settings)
            reason += " (check called_aet/calling_aet and the peer's configuration)"
        self._pause(reason, hold=hold, now=now)
