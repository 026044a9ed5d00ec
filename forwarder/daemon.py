"""``forwarder run``: wire the watcher, the outbox and the sender workers into a daemon."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import queue
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from forwarder import __version__, filing
from forwarder.concurrency import Autoscale
from forwarder.config import (
    EX_CONFIG,
    ConfigError,
    Destination,
    Settings,
    add_config_argument,
    check_tls,
    load_settings,
)
from forwarder.contexts import ContextSpec
from forwarder.dicomfile import DicomInfo, InvalidDicom, escape_bytes, inspect, locate, uid_problem
from forwarder.health import disk_full
from forwarder.inodes import FileKey, FirstName, InodeIndex
from forwarder.lockfile import Held, LockedError, LockError, hold
from forwarder.logs import fields, setup_logging
from forwarder.metrics import NO_METRICS, Metrics, start_metrics
from forwarder.notify import Notifier
from forwarder.outbox import (
    FINAL_STATES,
    Delivery,
    Mark,
    Outbox,
    OutboxCorruptError,
    OutboxError,
    OutboxFullError,
    State,
)
from forwarder.policy import Next, decide, pause_for
from forwarder.sender import AssociationFailed, Peer, Sender, StoreResult
from forwarder.status import Action, Classification
from forwarder.watcher import ReadyFile, Watcher, WatchRootError

__all__ = ["Daemon", "add_arguments", "run"]

LOGGER = logging.getLogger("forwarder.daemon")

EX_CANTCREAT = 73  # sysexits.h: a directory or the outbox cannot be created, or is damaged
EX_SOFTWARE = 70  # a pipeline stage died: exit so that the supervisor restarts us
EX_TEMPFAIL = 75  # another daemon holds the outbox or the inbox
INBOX_LOCK = ".forwarder.lock"
"""The lock file in each watched folder; the watcher always ignores it."""
_DICOMDIR = "1.2.840.10008.1.3.10"
_ENQUEUE_BATCH = 256
_MAX_HELD = 10_000  # files the enqueuer keeps while the outbox cannot be written
_FULL_DISK_POLL = 2.0  # seconds between tries to open the outbox on a full disk
_GATHER_SECONDS = 0.005  # after the first file of a burst, let the watcher hand over more
_DISPOSE_RETRY_SECONDS = 30.0
_MIN_HOLD_SECONDS = 60.0  # a destination that refuses us (AE titles, not authorised)
_SWITCH_INTERVAL = 0.0005  # GIL switch interval while running (see `run`)
_IDLE_SECONDS = 30.0  # the longest a worker sleeps without looking at the outbox again
_WAIT_FOR_FIRST_SECONDS = 1.0  # an extra worker waits this long for the first one's contexts
_CAPACITY_WAIT_SECONDS = 5.0  # a worker whose association the peer would not take waits this long
_CAPACITY_RETRY_SECONDS = 0.5  # ... unless it is within the level the peer takes
_PEER_UP_SECONDS = 10.0  # a peer that answered a store this recently is up, not down


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument(
        "--log-target", choices=["auto", "stderr", "journal"], help="override log.target"
    )
    parser.add_argument("--log-format", choices=["text", "json"], help="override log.format")
    parser.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        help="override log.level",
    )


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def check_layout(settings: Settings) -> list[str]:
    """Config errors no schema can see: folders that would feed the daemon its own output."""
    errors = []
    for root in settings.watch.paths:
        if _overlaps(root, settings.quarantine.dir):
            errors.append(
                f"quarantine.dir: {settings.quarantine.dir} overlaps the watched folder {root}"
            )
        if settings.disposition.on_success == "move" and _overlaps(
            root, settings.disposition.archive_dir
        ):
            errors.append(
                f"disposition.archive_dir: {settings.disposition.archive_dir} overlaps the "
                f"watched folder {root}"
            )
    if not settings.watch.paths:
        errors.append("watch.paths: at least one folder to watch is required")
    return errors


def load(path: Path | None) -> Settings:
    """Settings for the daemon: schema, layout and TLS files; raises ConfigError listing all."""
    settings = load_settings(path, require_destinations=True)
    errors = check_layout(settings) + check_tls(settings)
    if errors:
        raise ConfigError(str(path) if path else "environment", errors)
    return settings


# -- outbox trouble -----------------------------------------------------------------------


class OutboxTrouble:
    """The outbox cannot be written (full disk, read-only, locked too long) since when, and why.

    Every stage reports its failed writes here and carries on: the trouble is logged once a
    minute, not once per thread and try; `unhealthy` names it; the first write that works
    again ends it (logged). Thread-safe.
    """

    LOG_EVERY = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.since: float | None = None  # wall clock
        self.reason = ""
        self._logged = 0.0  # monotonic

    def report(self, what: str, exc: OutboxError) -> None:
        now = time.monotonic()
        with self._lock:
            first = self.since is None
            if first:
                self.since = time.time()
            self.reason = str(exc)
            due = first or now - self._logged >= self.LOG_EVERY
            if due:
                self._logged = now
        if due:
            LOGGER.error(
                f"outbox {what}: {exc}; new files stay in the inbox, sending resumes by "
                "itself once the outbox can be written (repeated once a minute while it lasts)",
                extra=fields(outcome="outbox-error"),
            )

    def clear(self) -> None:
        with self._lock:
            since, self.since = self.since, None
        if since is not None:
            LOGGER.warning(
                f"the outbox can be written again after {time.time() - since:.0f} s; resuming",
                extra=fields(outcome="outbox-ok"),
            )

    def problem(self) -> str | None:
        """One line for `health`, or None."""
        with self._lock:
            if self.since is None:
                return None
            return f"the outbox cannot be written since {_iso(self.since)}: {self.reason}"


def _pause_after(failures: int) -> float:
    """Seconds a stage waits after `failures` unexpected errors in a row (0.5 s .. 30 s)."""
    return float(min(30.0, 0.5 * 2 ** min(failures - 1, 6)))


# -- circuit breaker --------------------------------------------------------------------


@dataclass
class _Breaker:
    """Per destination: paused until when, after how many association failures in a row."""

    paused_until: float = 0.0
    failures: int = 0
    reason: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Pending:
    """Outcomes recorded but not yet committed, and the files they may let go."""

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


class Worker(threading.Thread):
    """Drains one destination's deliveries over one association at a time."""

    def __init__(self, daemon: Daemon, dest: Destination, index: int, scale: Autoscale) -> None:
        super().__init__(name=f"send-{dest.name}-{index}", daemon=True)
        self.d = daemon
        self.dest = dest
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.last_beat = time.monotonic()
        self.busy_since: float | None = None  # monotonic start of the current batch
        self._last_activity = time.monotonic()
        self._sender = Sender(Peer.from_destination(dest), stop=self.stop)
        self._fresh = False
        self._associations_counted = 0
        self.scale = scale  # its destination's: a retired worker keeps reporting to its own
        self.level = index + 1  # this worker's association is the level-th of its destination
        self.opening = False  # requesting its association before claiming (`_open_first`)
        self._ran_dry = False  # the last claim found nothing (the scale's measurement paused)
        # outcomes and releases not yet committed (the outbox could not be written): kept
        # and committed first once it can, so a full disk costs no resends
        self._pending = _Pending()
        self._to_release: list[int] = []

    def run(self) -> None:
        failures = 0
        try:
            while not self.stop.is_set():
                try:
                    self.loop(time.time())
                except OutboxCorruptError as exc:
                    self.d.damaged(f"worker {self.name}", exc)
                    return
                except OutboxError as exc:  # full disk, read-only, busy: wait and try again
                    self.d.trouble.report(f"worker {self.name}", exc)
                    failures += 1
                    self._idle(min(_pause_after(failures), 5.0))
                except Exception:  # one row or association must not end the thread
                    failures += 1
                    LOGGER.exception(f"worker {self.name}: unexpected error; carrying on")
                    with contextlib.suppress(Exception):  # whatever state it was left in
                        self._sender.abort()
                    self._fresh = False
                    self._idle(_pause_after(failures))
                else:
                    failures = 0
        except BaseException:
            self.d.die(f"worker {self.name} died", EX_SOFTWARE)
            raise
        finally:
            try:
                if self.stop.is_set() and self.d.hard_stop.is_set():
                    self._sender.abort()
                else:
                    self._sender.release()
            except Exception:
                LOGGER.exception("worker %s: releasing the association failed", self.name)

    # one iteration; `now` is wall-clock seconds (the outbox's clock)
    def loop(self, now: float) -> None:
        self.last_beat = time.monotonic()
        self._settle()
        settings = self.d.settings
        name = self.dest.name
        breaker = self.d.breakers[name]
        if breaker.paused_until > now:
            self._idle(breaker.paused_until - now)
            return
        scale = self.scale
        if self.level > scale.allowed:  # not wanted now ("auto" has not grown this far)
            if self._sender.is_open:
                self._sender.release()
            self._idle(_IDLE_SECONDS)
            return
        if not self._sender.is_open and not self._open_first():
            return
        batch = self.d.outbox.claim(
            name,
            settings.sender.batch_size,
            now,
            settings.outbox.lease_seconds,
            share=2 * scale.allowed if scale.allowed > 1 else 1,
        )
        if not batch:
            if not self._ran_dry:
                self._ran_dry = True
                scale.interrupted()
            self._idle_no_work(now)
            return
        if self._ran_dry:
            self._ran_dry = False
            scale.resumed(time.monotonic())
        self.d.trouble.clear()  # a claim that took rows wrote to the outbox
        self.busy_since = time.monotonic()
        try:
            self._send_batch(batch)
        finally:
            self.busy_since = None
            self._last_activity = time.monotonic()
            self._count_associations()
        if self._fresh:
            self._sender.release()
            self._fresh = False

    def _open_first(self) -> bool:
        """Open the association before taking any work; True when the worker may claim.

        While it waits for the peer, no claimed file waits with it: a single-process peer
        queues a second connection until the first association is released, and an extra
        association must not hold files back meanwhile. Without the contexts of earlier
        batches (the destination's first one) the worker claims first and associates for it.
        A refusal while another association of the destination is open is the peer's limit
        (`_at_capacity`); any other failure pauses the destination as a failed batch would.
        """
        specs = self.d.recent_contexts.get(self.dest.name)
        if not specs:
            if self.level == 1 or not self.scale.auto:
                return True
            self._idle(_WAIT_FOR_FIRST_SECONDS)  # the first association has sent nothing yet
            return False
        self.busy_since = time.monotonic()  # an ACSE wait is work, not a wedged worker
        self.opening = True
        try:
            self._sender.open(specs)
        except AssociationFailed as exc:
            self.opening = False
            if not self.stop.is_set() and not self._at_capacity(exc):
                self._trip(exc)
            return False
        finally:
            self.busy_since = None
            self.opening = False
        self._count_associations()
        return True

    @property
    def holds_association(self) -> bool:
        return self._sender.is_open

    def _scale_stored(self) -> None:
        """Tell the scale a store was answered; wake the next worker when it may start."""
        scale = self.scale
        before = (scale.allowed, scale.settled)
        scale.stored(time.monotonic())
        if (scale.allowed, scale.settled) == before:
            return
        if scale.allowed > before[0]:
            for worker in self.d.workers_of(self.dest.name):
                worker.wake.set()
        if scale.settled:
            LOGGER.info(
                f"destination {self.dest.name}: associations: {scale.describe()}",
                extra=fields(destination=self.dest.name, outcome="associations"),
            )

    def _idle(self, seconds: float) -> None:
        self.wake.wait(max(0.0, min(seconds, _IDLE_SECONDS)))
        self.wake.clear()

    def _idle_no_work(self, now: float) -> None:
        linger = self.d.settings.sender.linger_seconds
        waits = [_IDLE_SECONDS]
        if self._sender.is_open:
            idle = time.monotonic() - self._last_activity
            if idle >= linger:
                self._sender.release()
            else:
                waits.append(linger - idle)
        due = self.d.outbox.next_due(self.dest.name, now)
        if due is not None:
            waits.append(due - now + 0.01)
        self._idle(min(waits))

    def _send_batch(self, batch: list[Delivery]) -> None:
        now = time.time()
        by_path: dict[Path, Delivery] = {}
        infos: list[DicomInfo] = []
        for d in batch:
            info = self._check_file(d, now)
            if info is not None:
                by_path[info.path] = d
                infos.append(info)
        handled: set[int] = set()
        pending = self._pending
        tripped: AssociationFailed | None = None
        try:
            for result in self._sender.send(infos):
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
            self._trip(tripped)  # (a stop cancels an association request: not a failure)

    def _at_capacity(self, exc: AssociationFailed) -> bool:
        """True when the association failed while the peer is plainly up: another association
        of the destination is open or being opened, or the peer rejected it as busy having
        answered a store moments ago (two requests at once can both exceed its limit). The
        peer takes no more now (a limit, a single-process peer); nothing is paused and no
        attempt counted. "auto" settles at the associations open, and this worker waits
        before it tries again."""
        others = [w for w in self.d.workers_of(self.dest.name) if w is not self]
        holding = sum(w.holds_association for w in others)
        now = time.monotonic()
        up = holding or any(w.opening for w in others)
        if not up and not (exc.busy and now - self.scale.answered_at <= _PEER_UP_SECONDS):
            return False  # nobody else has the peer: it is down or refuses us
        self.scale.limit(max(1, holding), now)
        LOGGER.info(
            f"destination {self.dest.name}: association {self.level} not opened "
            f"({exc.classification.meaning}); associations: {self.scale.describe()}",
            extra=fields(destination=self.dest.name, outcome="associations"),
        )
        # the one that should carry on tries again soon; one above the level waits longer
        within = self.level <= self.scale.allowed
        self._idle(_CAPACITY_RETRY_SECONDS if within else _CAPACITY_WAIT_SECONDS)
        return True

    def _suspect(self, d: Delivery, exc: Exception, pending: _Pending) -> None:
        """The sender raised while `d` was next: a refusal of `d` (quarantined after a few),
        so that one poison file can neither stop the worker nor come back forever."""
        cls = Classification(Action.RETRY_FEW, f"internal error while sending: {exc!r}")
        now = time.time()
        decision = decide(
            cls, d.attempts, d.first_attempt_at, now, self.d.settings.retry, random.random(),
            d.refusals,
        )  # fmt: skip
        if decision.next is Next.QUARANTINE:
            pending.add(Mark(d.id, State.QUARANTINED, None, decision.reason, refusal=True), d)
            self.d.event(logging.ERROR, "quarantined", d, decision.reason)
        else:
            assert decision.next_attempt_at is not None
            mark = Mark(
                d.id, State.PENDING, None, decision.reason, decision.next_attempt_at, refusal=True
            )
            pending.add(mark)
            self.d.event(logging.ERROR, "retry", d, decision.reason)
        self._fresh = True

    def _settle(self) -> None:
        """Commit what earlier tries could not: recorded outcomes, then rows to give back.

        Raises `OutboxError` while the outbox still cannot be written (they stay kept).
        """
        self._flush(self._pending)
        if self._to_release:
            self.d.outbox.release(self._to_release, time.time())
            self._to_release = []

    def _flush(self, pending: _Pending) -> None:
        """Commit the recorded outcomes (one transaction), then dispose of finished files.

        A file leaves the inbox only after its outcome is committed; a crash before the
        commit means the instance is sent again, never that it is lost. When the commit
        fails the outcomes stay in `pending` for the next try.
        """
        if not pending.marks:
            return
        marks, done = pending.take()
        try:
            self.d.outbox.mark_many(marks, time.time())
        except BaseException:
            pending.marks[:0], pending.done[:0] = marks, done
            raise
        self.d.files_done(done)

    def _check_file(self, d: Delivery, now: float) -> DicomInfo | None:
        """The file as it was queued, or None after recording why it cannot be sent.

        The enqueuer checked it completely; an unchanged size and mtime say it is still that
        file, so only a stat is needed here (rows queued by an older version, without the data
        set offset, have their file meta read again).
        """
        bad = _bad_uid(d)
        if bad is not None:  # queued before UIDs were checked: never let it reach a peer
            self.d.outbox.mark_quarantined(d.id, None, bad, now)
            self.d.event(logging.ERROR, "quarantined", d, bad)
            self.d.file_done(d)
            return None
        try:
            if d.dataset_offset is not None:
                return self._stat_file(d, now)
            info = locate(
                d.path,
                sop_class_uid=d.sop_class_uid,
                sop_instance_uid=d.sop_instance_uid,
                transfer_syntax=d.transfer_syntax,
                study_uid=d.study_uid,
            )
        except FileNotFoundError:
            self.d.outbox.mark_gone(d.id, "the file disappeared before it was sent", now)
            self.d.event(logging.WARNING, "gone", d, "the file disappeared before it was sent")
            self.d.file_done(d)
            return None
        except (InvalidDicom, OSError) as exc:
            reason = exc.reason if isinstance(exc, InvalidDicom) else f"unreadable: {exc}"
            self.d.outbox.mark_quarantined(d.id, None, reason, now, refusal=True)
            self.d.event(logging.ERROR, "quarantined", d, reason)
            self.d.file_done(d)
            return None
        if (info.size, info.mtime_ns) != (d.size, d.mtime_ns):
            self._changed(d, now)
            return None
        return info

    def _stat_file(self, d: Delivery, now: float) -> DicomInfo | None:
        """`_check_file` for a row that knows its data set offset; raises like `locate`."""
        assert d.dataset_offset is not None
        # not through a symlink that replaced the file since (unless symlinks are followed)
        st = os.stat(d.path, follow_symlinks=self.d.settings.watch.follow_symlinks)
        if (st.st_size, st.st_mtime_ns) != (d.size, d.mtime_ns):
            self._changed(d, now)
            return None
        return d.file

    def _changed(self, d: Delivery, now: float) -> None:
        reason = "the file changed after it was queued; the new version is queued on its own"
        self.d.outbox.mark_gone(d.id, reason, now)
        self.d.event(logging.WARNING, "gone", d, reason)

    def _count_associations(self) -> None:
        """Report associations established since the last report (metrics, the scale)."""
        new = self._sender.associations - self._associations_counted
        if new > 0:
            self._associations_counted += new
            self.d.metrics.association(self.dest.name, new)
            # what an extra association proposes, known as soon as the first one is up
            self.d.recent_contexts[self.dest.name] = self._sender.recent_contexts()
            if self.level == 1:
                before = self.scale.allowed
                self.scale.round_trip(self._sender.round_trip)
                if self.scale.allowed > before:  # a far peer: more associations from the start
                    for worker in self.d.workers_of(self.dest.name):
                        worker.wake.set()
            self.scale.established(self.level, time.monotonic())

    def _record(self, d: Delivery, result: StoreResult, pending: _Pending) -> None:
        self._count_associations()  # as soon as a store shows it, not at the batch's end
        now = time.time()
        cls = result.classification
        if cls.status is not None:
            self._scale_stored()
        if cls.action is Action.UNREADABLE and not os.path.lexists(d.path):
            # deleted between the claim and the send: nothing went out, nothing to retry
            pending.add(Mark(d.id, State.GONE, None, "the file disappeared before it was sent"), d)
            self.d.event(logging.WARNING, "gone", d, "the file disappeared before it was sent")
            return
        decision = decide(
            cls,
            d.attempts,
            d.first_attempt_at,
            now,
            self.d.settings.retry,
            random.random(),
            d.refusals,
        )
        self.d.metrics.observe_store(
            d.destination, decision.next.value, cls.status, result.seconds, result.info.size
        )
        if decision.next is Next.SENT:
            warning = cls.describe() if cls.action is Action.WARNING else None
            how = result.sent_as or None
            pending.add(Mark(d.id, State.SENT, cls.status or 0, warning, sent_as=how), d)
            self._succeeded()
            level = logging.WARNING if warning else logging.INFO
            detail = f"{cls.describe()}; {how}" if how else cls.describe()
            self.d.event(level, "warning" if warning else "sent", d, detail, cls.status)
        elif decision.next is Next.RETRY:
            assert decision.next_attempt_at is not None
            mark = Mark(
                d.id,
                State.PENDING,
                cls.status,
                decision.reason,
                decision.next_attempt_at,
                refusal=decision.refusal,
            )
            pending.add(mark)
            wait = decision.next_attempt_at - now
            detail = f"{decision.reason}; retry in {wait:.0f} s"
            self.d.event(logging.WARNING, "retry", d, detail, cls.status)
            self._fresh = self._fresh or decision.fresh_association
        elif decision.next is Next.QUARANTINE:
            mark = Mark(
                d.id, State.QUARANTINED, cls.status, decision.reason, refusal=decision.refusal
            )
            pending.add(mark, d)
            self.d.event(logging.ERROR, "quarantined", d, decision.reason, cls.status)
        else:  # HOLD: the destination refuses us; keep the instance, pause the destination
            until = self._pause(decision.reason, hold=True)
            pending.add(
                Mark(d.id, State.PENDING, cls.status, decision.reason, until, count_attempt=False)
            )
            self.d.event(logging.ERROR, "held", d, decision.reason, cls.status)

    def _succeeded(self) -> None:
        breaker = self.d.breakers[self.dest.name]
        if breaker.failures:
            with breaker.lock:
                breaker.failures = 0
                breaker.paused_until = 0.0
            self.d.outbox.resume_destination(self.dest.name)
            LOGGER.info(
                f"destination {self.dest.name} is back",
                extra=fields(destination=self.dest.name, outcome="resumed"),
            )

    def _pause(self, reason: str, *, hold: bool) -> float:
        breaker = self.d.breakers[self.dest.name]
        retry = self.d.settings.retry
        now = time.time()
        with breaker.lock:
            breaker.failures += 1
            wait = pause_for(
                breaker.failures, retry.initial_seconds, retry.max_seconds, random.random()
            )
            if hold:
                wait = max(wait, min(_MIN_HOLD_SECONDS, retry.max_seconds))
            breaker.paused_until = max(breaker.paused_until, now + wait)
            breaker.reason = reason
            until = breaker.paused_until
            failures = breaker.failures
        self.d.outbox.record_destination_error(self.dest.name, reason, now)
        self.d.outbox.pause_destination(self.dest.name, until, reason, now)
        level = logging.ERROR if failures == 1 or hold else logging.WARNING
        LOGGER.log(
            level,
            f"destination {self.dest.name} paused for {until - now:.0f} s "
            f"(failure {failures} in a row): {reason}",
            extra=fields(destination=self.dest.name, outcome="paused"),
        )
        for worker in self.d.workers_of(self.dest.name):
            worker.wake.set()
        return until

    def _trip(self, exc: AssociationFailed) -> None:
        hold = exc.classification.action is Action.DESTINATION
        reason = exc.classification.meaning
        if hold:
            reason += " (check called_aet/calling_aet and the peer's configuration)"
        self._pause(reason, hold=hold)


def _bad_uid(d: Delivery) -> str | None:
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


# -- enqueuer -------------------------------------------------------------------------


class Enqueuer(threading.Thread):
    """Turns files the watcher judged complete into outbox rows, one short batch at a time.

    A file that is not (yet) valid DICOM is looked at again until it is, or until
    ``watch.invalid_grace_seconds`` have passed: then it goes to quarantine.
    """

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(name="enqueuer", daemon=True)
        self.d = daemon
        # bounded: a 100,000-file backlog waits in the watcher, not here as ReadyFile objects
        self.inbox: queue.Queue[ReadyFile | None] = queue.Queue(maxsize=1000)
        self.stop = threading.Event()
        self.last_beat = time.monotonic()
        self._suspects: dict[Path, tuple[float, ReadyFile, str]] = {}
        # examined but not queued: the outbox could not be written; tried again every second
        # (beyond _MAX_HELD the watcher is asked to offer them again at its next rescan)
        self._held: list[DicomInfo] = []
        self._inodes = InodeIndex(track_all=daemon.settings.watch.follow_symlinks)
        self._twins: dict[Path, tuple[ReadyFile, FirstName]] = {}  # waiting for their first name
        self._batch: set[FileKey] = set()  # files of the batch being examined, not yet queued

    def halt(self) -> None:
        """Stop, waking a `loop` blocked on the empty queue (it would sleep out its 30 s)."""
        self.stop.set()
        with contextlib.suppress(queue.Full):  # a full queue does not block `get` anyway
            self.inbox.put_nowait(None)

    def offer(self, ready: ReadyFile) -> None:
        """Called from the watcher's tracker thread: hand over, waiting while we are full."""
        while not self.stop.is_set():
            try:
                self.inbox.put(ready, timeout=0.5)
                return
            except queue.Full:
                continue

    def run(self) -> None:
        failures = 0
        try:
            while not self.stop.is_set():
                try:
                    self.loop()
                except OutboxCorruptError as exc:
                    self.d.damaged("enqueuer", exc)
                    return
                except Exception:  # one file or batch must not end the thread
                    failures += 1
                    LOGGER.exception("enqueuer: unexpected error; carrying on")
                    self.stop.wait(_pause_after(failures))
                else:
                    failures = 0
        except BaseException:
            self.d.die("the enqueuer died", EX_SOFTWARE)
            raise

    def loop(self) -> None:
        self.last_beat = time.monotonic()
        timeout = 1.0 if self._suspects or self._held or self._twins else 30.0
        try:
            first = self.inbox.get(timeout=timeout)
        except queue.Empty:
            first = None
        if first is not None and self.inbox.qsize() < _ENQUEUE_BATCH:
            # A burst arrives one file at a time: taking each as it comes was a thread
            # switch per file, and as many outbox transactions.
            self.stop.wait(_GATHER_SECONDS)
        batch = [first] if first is not None else []
        while len(batch) < _ENQUEUE_BATCH:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                batch.append(item)
        try:
            self._take(batch)
        except OutboxCorruptError:
            raise
        except Exception:  # the watcher offers these files again at its next rescan
            self._drop(r.path for r in batch)
            raise

    def _take(self, batch: list[ReadyFile]) -> None:
        """Examine `batch` and queue what is new (with any files held back before)."""
        records: list[DicomInfo] = []
        try:
            known = self.d.outbox.known_files(
                (str(r.path), r.size, r.mtime_ns) for r in batch
            )  # one query for the batch
        except OutboxCorruptError:
            raise
        except OutboxError as exc:
            self.d.trouble.report("enqueuer", exc)
            self._drop(r.path for r in batch)
            return
        for ready in batch:
            self._suspects.pop(ready.path, None)
            self._twins.pop(ready.path, None)
            try:
                rec = self._examine(ready, time.monotonic(), known=known)
            except OutboxCorruptError:
                raise
            except OutboxError as exc:
                self.d.trouble.report("enqueuer", exc)
                self._drop([ready.path])
                continue
            except Exception:  # this file only; the watcher offers it again at a rescan
                LOGGER.exception(f"{ready.path}: unexpected error looking at it; carrying on")
                self._drop([ready.path])
                continue
            if rec is not None:
                records.append(rec)
        self._recheck(records)
        self._recheck_twins(records)
        records = self._held + records
        if records:
            try:
                added = self.d.enqueue(records)
            except OutboxCorruptError:
                raise
            except OutboxError as exc:
                self.d.trouble.report("enqueuer", exc)
                self._held = records[:_MAX_HELD]
                self._drop(r.path for r in records[_MAX_HELD:])
                self._batch.clear()
                return
            self._held = []
            if added:
                self.d.trouble.clear()
                self.d.wake_workers()
        self._batch.clear()

    def _drop(self, paths: Iterable[str | Path]) -> None:
        """Let files go without queuing them: they stay in the inbox, and the watcher offers
        them again at its next rescan."""
        if self.d.watcher is not None:
            for path in paths:
                self.d.watcher.forget(Path(path))

    def _recheck(self, records: list[DicomInfo]) -> None:
        now = time.monotonic()
        for path, (first_seen, ready, _reason) in list(self._suspects.items()):
            if now - first_seen < 1.0 and len(self._suspects) < 1000:
                continue
            try:
                st = path.stat()
            except FileNotFoundError:  # the watcher is not told of deletions in place
                self._suspects.pop(path, None)
                if self.d.watcher is not None:
                    self.d.watcher.forget(path)
                continue
            except OSError:
                st = None
            if st is not None:
                ready = ReadyFile(path, st.st_size, st.st_mtime_ns, ready.root)
            self._suspects.pop(path, None)
            rec = self._examine(ready, now, first_seen)
            if rec is not None:
                records.append(rec)

    def _examine(
        self,
        ready: ReadyFile,
        now: float,
        first_seen: float | None = None,
        known: set[tuple[str, int, int]] | None = None,
    ) -> DicomInfo | None:
        path = ready.path
        outbox = self.d.outbox
        key = (str(path), ready.size, ready.mtime_ns)
        if key in known if known is not None else outbox.is_known(*key):
            self._inodes.register(ready)
            states = outbox.file_states(*key)
            if states and all(s in FINAL_STATES for s in states.values()):
                # Left over from a crash, or dropped again with the same path, size and mtime
                # (cp -p, rsync -t) after it was delivered: it is not sent again. Say so, or
                # an operator re-sending a file sees it vanish without a word.
                if self.d.settings.disposition.on_success != "keep":
                    LOGGER.warning(
                        f"{path}: this file (same size and mtime) was already delivered to every "
                        "destination; disposing of it without sending it again",
                        extra=fields(path=str(path), outcome="already-delivered"),
                    )
                self.d.dispose(path, ready.size, ready.mtime_ns)
            return None
        first = self._inodes.first_name(ready)
        if first is not None and self._twin(ready, first):
            return None
        follow = self.d.settings.watch.follow_symlinks
        try:
            info = inspect(path, follow_symlinks=follow)
        except FileNotFoundError:  # deleted meanwhile (the watcher is not told of that)
            if self.d.watcher is not None:
                self.d.watcher.forget(path)
            return None
        except OSError as exc:
            if exc.errno != errno.ELOOP or follow:
                self._invalid(ready, now, first_seen, f"unreadable: {exc}")
                return None
            # replaced by a symlink after the watcher looked: never read, sent or moved
            LOGGER.warning(
                f"skipped symlink {path}: watch.follow_symlinks is false",
                extra=fields(path=str(path), outcome="skipped"),
            )
            return None
        except InvalidDicom as exc:
            self._invalid(ready, now, first_seen, exc.reason)
            return None
        if info.sop_class_uid == _DICOMDIR:
            self.d.quarantine_invalid(path, "a DICOMDIR is not a storage instance")
            return None
        if self._inodes.tracks(ready):
            first = self._queued_elsewhere(ready, info.sop_instance_uid)
            if first is not None and self._twin(ready, first):
                return None
        self._inodes.register(ready, info.sop_instance_uid)
        self._batch.add(key)
        return info

    def _invalid(self, ready: ReadyFile, now: float, first_seen: float | None, reason: str) -> None:
        """Not valid DICOM (yet): look again, or quarantine once the grace is over."""
        path = ready.path
        first = first_seen if first_seen is not None else now
        grace = self.d.settings.watch.invalid_grace_seconds
        if now - first >= grace:
            self.d.quarantine_invalid(path, reason)
        else:
            self._suspects[path] = (first, ready, reason)
            if first_seen is None:
                LOGGER.debug("%s: not valid DICOM yet (%s); looking again", path, reason)

    def _twin(self, ready: ReadyFile, first: FirstName) -> bool:
        """`ready` is another name of the file queued as `first` (a hard link): the instance
        is sent once, under `first`; this name leaves the inbox as `first` does (deleted,
        archived or kept once delivered; quarantined beside it when refused). False when
        `first` has no deliveries (any more), or lost some (it vanished or changed before it
        was sent): `ready` is then examined as a file of its own, and sent.
        """
        states = self._first_states(first)
        if not states or State.GONE in states.values():
            return False
        if ready.path not in self._twins:
            LOGGER.info(
                f"{ready.path} is another name (hard link) of {first.key[0]}: sent once, under "
                "that name; this one leaves the inbox with it",
                extra=fields(path=str(ready.path), outcome="same-file"),
            )
        if any(s not in FINAL_STATES for s in states.values()):
            self._twins[ready.path] = (ready, first)
            return True
        self._twins.pop(ready.path, None)
        if any(s is State.QUARANTINED for s in states.values()):
            self.d.quarantine_invalid(
                ready.path, f"another name (hard link) of {first.key[0]}, which was refused"
            )
        else:
            self.d.dispose(ready.path, ready.size, ready.mtime_ns, states)
        return True

    def remember_name(self, path: Path, st: os.stat_result) -> None:
        """`path`, delivered and about to leave the inbox, has other names (hard links): keep
        its inode, so that another name met later (with one link left by then) is known."""
        rows = self.d.outbox.list(path=str(path), limit=1)
        uid = rows[0].sop_instance_uid if rows else None
        seen = ReadyFile(path, st.st_size, st.st_mtime_ns, path.parent, st.st_dev, st.st_ino, 2)
        self._inodes.register(seen, uid)

    def _queued_elsewhere(self, ready: ReadyFile, uid: str) -> FirstName | None:
        """Another name of `ready`'s file that the outbox has rows for (queued before a
        restart, when the index was empty): same instance, size and mtime at a path that
        is the same inode. A name gone since cannot be proved the same file: None."""
        for d in self.d.outbox.find(uid):
            if d.path == str(ready.path) or (d.size, d.mtime_ns) != (ready.size, ready.mtime_ns):
                continue
            try:
                st = os.stat(d.path)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (ready.dev, ready.ino):
                return FirstName((d.path, d.size, d.mtime_ns), uid)
        return None

    def _first_states(self, first: FirstName) -> dict[str, State]:
        """The delivery states of the file queued as `first`, wherever it moved since."""
        states = self.d.outbox.file_states(*first.key)
        if states:
            return states
        if first.key in self._batch:  # queued with this very batch
            return {"": State.PENDING}
        if first.sop_instance_uid is None:
            return {}
        # archived or quarantined: its rows followed it to another path
        size, mtime_ns = first.key[1:]
        return {
            d.destination: d.state
            for d in self.d.outbox.find(first.sop_instance_uid)
            if (d.size, d.mtime_ns) == (size, mtime_ns)
        }

    def _recheck_twins(self, records: list[DicomInfo]) -> None:
        for path, (ready, first) in list(self._twins.items()):
            if not self._twin(ready, first):
                self._twins.pop(path, None)
                rec = self._examine(ready, time.monotonic())
                if rec is not None:
                    records.append(rec)


# -- the daemon -------------------------------------------------------------------------


class Daemon:
    """Owns the outbox, the watcher, the enqueuer and one set of workers per destination."""

    def __init__(
        self, settings: Settings, config_path: Path | None, notifier: Notifier | None = None
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.outbox = Outbox(settings.outbox.path)
        self.breakers: dict[str, _Breaker] = {}
        self.recent_contexts: dict[str, list[ContextSpec]] = {}  # what extra ones propose
        self.workers: list[Worker] = []
        self._retired: list[Worker] = []  # stopped by a reload while still in a store
        self.enqueuer = Enqueuer(self)
        self.watcher: Watcher | None = None
        self.stopping = threading.Event()
        self.hard_stop = threading.Event()
        self.reload_requested = threading.Event()
        self.nudge_requested = threading.Event()
        self.wakeup = threading.Event()
        self._file_lock = threading.Lock()
        self._dispose_later: dict[tuple[str, int, int], float] = {}
        self.started_at = time.time()
        self.stats = {"sent": 0, "quarantined": 0, "retry": 0}
        self._stats_lock = threading.Lock()
        self.metrics: Metrics = NO_METRICS
        self.trouble = OutboxTrouble()
        self.exit_status = 0
        self._recovered_at_start = False

    def damaged(self, where: str, exc: OutboxCorruptError) -> None:
        """The outbox turned out damaged while running: stop (exit 73), saying what to do."""
        self.die(
            f"{where}: {exc}: run `forwarder outbox check` and restore {self.outbox.path} "
            "from a backup",
            EX_CANTCREAT,
        )

    def die(self, reason: str, status: int) -> None:
        """A stage cannot go on: stop the daemon with a non-zero exit `status`, so that the
        supervisor (systemd, Docker) notices and restarts it, instead of living on as a
        zombie whose health says ok. The first reason wins."""
        with self._stats_lock:
            first = self.exit_status == 0
            if first:
                self.exit_status = status
        if first:
            LOGGER.critical(f"stopping: {reason}", extra=fields(outcome="fatal"))
        self.stopping.set()
        self.wakeup.set()

    # -- wiring ---------------------------------------------------------------------

    def workers_of(self, name: str) -> list[Worker]:
        return [w for w in self.workers if w.dest.name == name]

    def wake_workers(self) -> None:
        for w in self.workers:
            w.wake.set()

    def enqueue(self, records: Sequence[DicomInfo]) -> int:
        names = [d.name for d in self.settings.destinations]
        added = self.outbox.enqueue_many(records, names, time.time())
        for rec in records:
            LOGGER.debug("queued %s (%s)", rec.path, rec.sop_instance_uid)
        if added:
            LOGGER.info(f"queued {len(records)} file(s) for {', '.join(names)}")
        return added

    def event(
        self, level: int, outcome: str, d: Delivery, detail: str, status: int | None = None
    ) -> None:
        """One log line per delivery event, naming file, instance, destination and outcome."""
        with self._stats_lock:
            if outcome in ("sent", "warning"):
                self.stats["sent"] += 1
            elif outcome in self.stats:
                self.stats[outcome] += 1
        if not LOGGER.isEnabledFor(level):  # per instance: skip building a line nobody reads
            return
        LOGGER.log(
            level,
            f"{outcome}: {d.path} ({d.sop_instance_uid}) -> {d.destination}: {detail}",
            extra=fields(
                path=d.path,
                sop_instance_uid=d.sop_instance_uid,
                study_uid=d.study_uid,
                destination=d.destination,
                outcome=outcome,
                status=None if status is None else f"0x{status:04X}",
            ),
        )

    def _start_workers(self, destinations: Sequence[Destination]) -> None:
        for dest in destinations:
            self.breakers.setdefault(dest.name, _Breaker())
            info = self.outbox.destination_info().get(dest.name)
            if info is not None and info.paused(time.time()):
                self.breakers[dest.name].paused_until = info.paused_until or 0.0
                self.breakers[dest.name].failures = info.consecutive_failures
            if dest.associations == "auto":
                scale = Autoscale(dest.max_associations)
            else:
                scale = Autoscale(dest.associations, auto=False)
            for n in range(scale.maximum):
                worker = Worker(self, dest, n, scale)
                self.workers.append(worker)
                worker.start()

    def _stop_workers(
        self, workers: Sequence[Worker], timeout: float, *, keepalive: bool = False
    ) -> bool:
        """Stop `workers`, waiting up to `timeout` for their in-flight stores; True if all ended.

        With `keepalive` (a reload, from the main loop) the heartbeat and the watchdog are
        kept going while waiting: a slow peer held the main loop for the whole timeout.
        """
        for w in workers:
            w.stop.set()
            w.wake.set()
        deadline = time.monotonic() + timeout
        step = min(self.notifier.watchdog_interval() or 1.0, 1.0)
        for w in workers:
            while w.is_alive() and (left := deadline - time.monotonic()) > 0:
                w.join(min(left, step) if keepalive else left)
                if keepalive:
                    self._keepalive()
        return not any(w.is_alive() for w in workers)

    def _keepalive(self) -> None:
        self._heartbeat()
        if self.notifier.watchdog_interval() is not None and self.stuck() is None:
            self.notifier.watchdog()

    def _make_watcher(self) -> Watcher:
        w = self.settings.watch
        return Watcher(
            w.paths,
            self.enqueuer.offer,
            recursive=w.recursive,
            follow_symlinks=w.follow_symlinks,
            poll=w.poll,
            poll_interval=w.poll_interval_seconds,
            settle_seconds=w.settle_seconds,
            settle_from_mtime=w.settle_from_mtime,
            rescan_seconds=w.rescan_seconds,
            ignore=[*w.ignore, INBOX_LOCK],
        )

    # -- files leaving the inbox ---------------------------------------------------------

    def file_done(self, d: Delivery) -> None:
        """A delivery reached a final state: dispose of the file once every destination has."""
        self.dispose(Path(d.path), d.size, d.mtime_ns)

    def files_done(self, done: Sequence[Delivery]) -> None:
        """`file_done` for a batch: one outbox query for all of their files."""
        keys = list(dict.fromkeys((d.path, d.size, d.mtime_ns) for d in done))
        if not keys:
            return
        states = self.outbox.files_states(keys)
        for key in keys:
            self.dispose(Path(key[0]), key[1], key[2], states.get(key, {}))

    def dispose(
        self, path: Path, size: int, mtime_ns: int, states: dict[str, State] | None = None
    ) -> None:
        """Dispose of a file whose every delivery is final (`states`: read if not given)."""
        key = (str(path), size, mtime_ns)
        with self._file_lock:
            if states is None:
                states = self.outbox.file_states(*key)
            if not states or any(s not in FINAL_STATES for s in states.values()):
                return
            try:
                st = path.stat()
                if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                    return  # a new version: it has rows of its own
                if st.st_nlink > 1:
                    self.enqueuer.remember_name(path, st)
                if any(s is State.QUARANTINED for s in states.values()):
                    self._quarantine_delivered(path, key, states)
                else:
                    self._on_success(path)
            except FileNotFoundError:  # gone already: nothing left to dispose of, but the
                pass  # watcher is not told of deletions in place: forget it below
            except OSError as exc:
                if key not in self._dispose_later:
                    LOGGER.error(
                        f"{path}: delivered, but cannot be moved out of the inbox: {exc}; "
                        f"will try again",
                        extra=fields(path=str(path), outcome="dispose-failed"),
                    )
                self._dispose_later[key] = time.monotonic() + _DISPOSE_RETRY_SECONDS
                return
            self._dispose_later.pop(key, None)
        if self.watcher is not None:
            self.watcher.forget(path)

    def _on_success(self, path: Path) -> None:
        how = self.settings.disposition.on_success
        if how == "delete":
            filing.delete(path)
        elif how == "move":
            target = filing.archive(
                path, self.settings.watch.paths, self.settings.disposition.archive_dir
            )
            self.outbox.set_path(str(path), str(target), now=time.time())
        LOGGER.debug("%s: every destination has it (%s)", path, how)

    def _quarantine_delivered(
        self, path: Path, key: tuple[str, int, int], states: dict[str, State]
    ) -> None:
        rows = [
            r
            for r in self.outbox.list(path=key[0], limit=1000)
            if (r.size, r.mtime_ns) == (key[1], key[2])
        ]
        sidecar: dict[str, object] = {
            "reason": "; ".join(
                f"{r.destination}: {r.last_error}" for r in rows if r.state is State.QUARANTINED
            ),
            "sop_instance_uid": rows[0].sop_instance_uid if rows else None,
            "study_uid": rows[0].study_uid if rows else None,
            "sop_class_uid": rows[0].sop_class_uid if rows else None,
            "quarantined_at": _iso(time.time()),
            # only the destinations that refused it: a reader (or a requeue) must not take
            # the ones that have it for failures; those are listed under delivered_to
            "destinations": {
                r.destination: {
                    "state": r.state.name.lower(),
                    "status": None if r.last_status is None else f"0x{r.last_status:04X}",
                    "meaning": r.last_error,
                    "attempts": r.attempts,
                    # which attempts were which: the peer refusing the instance, or passing
                    # trouble (out of resources, no response) that says nothing about it
                    "refusals": r.refusals,
                    "transient_failures": r.transient_failures,
                    "first_attempt": _iso(r.first_attempt_at),
                    "last_attempt": _iso(r.last_attempt_at),
                    "delivery_id": r.id,
                }
                for r in rows
                if r.state is not State.SENT
            },
            "delivered_to": sorted(r.destination for r in rows if r.state is State.SENT),
        }
        target = filing.quarantine(
            path, self.settings.watch.paths, self.settings.quarantine.dir, sidecar
        )
        self.outbox.set_path(str(path), str(target), now=time.time())
        failed = [n for n, s in states.items() if s is State.QUARANTINED]
        LOGGER.error(
            f"quarantined: {path} -> {target} (failed for {', '.join(failed)})",
            extra=fields(path=str(path), outcome="quarantined"),
        )

    def quarantine_invalid(self, path: Path, reason: str) -> None:
        """A file that never became sendable DICOM: quarantine it with the reason."""
        sidecar: dict[str, object] = {
            "reason": reason,
            "quarantined_at": _iso(time.time()),
            "destinations": {},
        }
        try:
            target = filing.quarantine(
                path, self.settings.watch.paths, self.settings.quarantine.dir, sidecar
            )
        except FileNotFoundError:
            return
        except OSError as exc:
            LOGGER.error(
                f"{path}: not valid DICOM ({reason}) and cannot be quarantined: {exc}",
                extra=fields(path=str(path), outcome="quarantine-failed"),
            )
            # Forget it, or the watcher never offers this unchanged file again and it waits
            # for a restart: the next rescan retries once the quarantine is writable.
            if self.watcher is not None:
                self.watcher.forget(path)
            return
        LOGGER.error(
            f"quarantined: {path} -> {target}: {reason}",
            extra=fields(path=str(path), outcome="quarantined"),
        )
        with self._stats_lock:
            self.stats["quarantined"] += 1
        if self.watcher is not None:
            self.watcher.forget(path)

    def _retry_dispositions(self) -> None:
        now = time.monotonic()
        for key, when in list(self._dispose_later.items()):
            if when <= now:
                self.dispose(Path(key[0]), key[1], key[2])

    # -- health -----------------------------------------------------------------------

    def stall_limit(self) -> float:
        dests = self.settings.destinations
        worst = max((d.dimse_timeout + d.network_timeout for d in dests), default=60.0)
        return self.settings.health.stall_seconds or (worst * 2 + 60.0)

    def unhealthy(self) -> str | None:
        """Why the daemon is not healthy (for `forwarder health`), or None."""
        return self.trouble.problem() or self.stuck()

    def stuck(self) -> str | None:
        """Why the daemon is hung or broken (for the watchdog), or None.

        An outbox that cannot be written is not among the reasons: the daemon waits for it
        as it should, and a restart by the watchdog would not bring the space back.
        """
        now = time.monotonic()
        if not self.enqueuer.is_alive():
            return "the enqueuer thread died"
        limit = self.stall_limit()
        for w in self.workers:
            if not w.is_alive():
                if w.stop.is_set():  # stopped on purpose (a reload retiring it)
                    continue
                return f"worker {w.name} died"
            since = w.busy_since
            if since is not None and now - since > limit:
                return f"worker {w.name} stuck in one batch for {now - since:.0f} s"
            if since is None and now - w.last_beat > 60.0:
                return f"worker {w.name} has not looked for work for {now - w.last_beat:.0f} s"
        return None

    def status_line(self) -> str:
        counts = self.outbox.counts()
        pending = sum(c.get(State.PENDING, 0) for c in counts.values())
        inflight = sum(c.get(State.INFLIGHT, 0) for c in counts.values())
        quarantined = sum(c.get(State.QUARANTINED, 0) for c in counts.values())
        paused = [n for n, b in self.breakers.items() if b.paused_until > time.time()]
        infos = self.outbox.destination_info()
        last = max((i.last_success_at or 0 for i in infos.values()), default=0)
        line = (
            f"{pending} queued, {inflight} in flight, {quarantined} quarantined, "
            f"last success {_iso(last) if last else 'never'}"
        )
        if paused:
            line += f", paused: {', '.join(paused)}"
        return line

    def _heartbeat(self) -> None:
        now = time.time()
        info = {
            "version": __version__,
            "workers": len(self.workers),
            "workers_alive": sum(w.is_alive() for w in self.workers),
            "unhealthy": self.unhealthy(),
            "config": str(self.config_path) if self.config_path else None,
            "destinations": [d.name for d in self.settings.destinations],
            "stats": dict(self.stats),
        }
        self.outbox.heartbeat(now, info)

    # -- reload -----------------------------------------------------------------------

    def reload(self) -> None:
        self.notifier.reloading()
        try:
            new = load(self.config_path)
        except ConfigError as exc:
            for line in exc.lines():
                LOGGER.error(f"reload refused, keeping the running config: {line}")
            self.notifier.ready(self.status_line())
            return
        old = self.settings
        os.umask(new.umask_bits)
        if new.outbox.path != old.outbox.path:
            LOGGER.warning("outbox.path changed: it takes effect at the next restart only")
            new = new.model_copy(update={"outbox": old.outbox})
        old_dests = {d.name: d for d in old.destinations}
        new_dests = {d.name: d for d in new.destinations}
        changed = [n for n in old_dests if old_dests[n] != new_dests.get(n)]
        retiring = [w for w in self.workers if w.dest.name in changed]
        if not self._stop_workers(retiring, new.shutdown_timeout, keepalive=True):
            # still in a store: it ends on its own; shutdown joins it (or exits forced)
            self._retired += [w for w in retiring if w.is_alive()]
        self.workers = [w for w in self.workers if w.dest.name not in changed]
        self.settings = new
        started = [d for n, d in new_dests.items() if n not in old_dests or n in changed]
        self._start_workers(started)
        for name in changed:
            if name not in new_dests:
                waiting = sum(
                    n
                    for s, n in self.outbox.counts().get(name, {}).items()
                    if s in (State.PENDING, State.INFLIGHT)
                )
                LOGGER.warning(
                    f"destination {name} removed; {waiting} deliveries to it stay queued "
                    "until it is configured again"
                )
        if new.watch != old.watch and self.watcher is not None:
            self.watcher.stop()
            self.watcher = self._make_watcher()
            self.watcher.start()
        touched = sorted({*changed, *(d.name for d in started)})
        LOGGER.info(
            f"reloaded {self.config_path}: destinations {', '.join(new_dests) or 'none'}"
            + (f"; restarted workers of {', '.join(touched)}" if touched else "")
        )
        self.notifier.ready(self.status_line())

    # -- main loop --------------------------------------------------------------------

    def _recover_at_start(self) -> None:
        """Queue again what was in flight at the last stop (no worker of ours holds any yet).

        On a full disk this waits for the main loop to try again: until then those rows come
        back when their leases run out, like after a crash.
        """
        try:
            recovered = self.outbox.recover_leases(time.time(), all_inflight=True)
        except OutboxCorruptError:
            raise
        except OutboxError as exc:
            self.trouble.report("start-up", exc)
            return
        self._recovered_at_start = True
        if recovered:
            LOGGER.info(f"{recovered} deliveries were in flight at the last stop; queued again")

    def start(self) -> None:
        self._recover_at_start()
        self.metrics = start_metrics(
            self.settings.metrics.listen,
            self.outbox,
            destinations=lambda: [d.name for d in self.settings.destinations],
            stats=lambda: dict(self.stats),
        )
        self.enqueuer.start()
        self._start_workers(self.settings.destinations)
        self.watcher = self._make_watcher()
        self.watcher.start()
        roots = ", ".join(str(p) for p in self.settings.watch.paths)
        dests = ", ".join(
            f"{d.name} ({d.called_aet}@{d.host}:{d.port})" for d in self.settings.destinations
        )
        LOGGER.info(f"forwarder {__version__} watching {roots}; sending to {dests}")
        self._tend(self._heartbeat)
        self.notifier.ready(self.status_line())

    def _tend(self, step: Callable[[], object]) -> bool:
        """Run one step of the main loop; an outbox error is reported, not raised. True if ok.

        A damaged outbox stops the daemon (`die`).
        """
        try:
            step()
        except OutboxCorruptError as exc:
            self.damaged("main loop", exc)
        except OutboxError as exc:
            self.trouble.report("main loop", exc)
        except Exception:
            LOGGER.exception("main loop: unexpected error; carrying on")
        else:
            return True
        return False

    def serve(self) -> None:
        """The main loop: heartbeat, status, watchdog, leases, summary, reload; until stop."""
        hb_every = self.settings.health.heartbeat_seconds
        wd_every = self.notifier.watchdog_interval()
        next_hb = next_status = next_summary = next_lease = next_wd = 0.0
        while not self.stopping.is_set():
            now = time.monotonic()
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
            if self.nudge_requested.is_set():
                self.nudge_requested.clear()
                self.wake_workers()
            self._check_stages()
            if not self._recovered_at_start:
                self._tend(self._recover_at_start)
            if now >= next_hb:
                if self._tend(self._heartbeat):
                    self.trouble.clear()
                next_hb = now + hb_every
            if now >= next_status:
                self._tend(lambda: self.notifier.status(self.status_line()))
                next_status = now + 5.0
            if wd_every is not None and now >= next_wd:
                problem = self.stuck()
                if problem is None:
                    self.notifier.watchdog()
                else:
                    LOGGER.error(f"not pinging the watchdog: {problem}")
                next_wd = now + wd_every
            if now >= next_lease:
                self._tend(self._recover_leases)
                next_lease = now + max(self.settings.outbox.lease_seconds / 4, 1.0)
            if now >= next_summary:
                if next_summary:
                    self._tend(lambda: LOGGER.info(f"summary: {self.status_line()}"))
                next_summary = now + self.settings.log.summary_seconds
            self._tend(self._retry_dispositions)
            deadlines = [next_hb, next_status, next_summary, next_lease]
            if wd_every is not None:
                deadlines.append(next_wd)
            self.wakeup.wait(max(0.01, min(deadlines) - time.monotonic()))
            self.wakeup.clear()

    def _recover_leases(self) -> None:
        n = self.outbox.recover_leases(time.time())
        if n:
            LOGGER.warning(f"{n} deliveries outlived their lease; queued again")
            self.wake_workers()

    def _check_stages(self) -> None:
        """A stage thread that ended while we are not stopping makes the daemon exit non-zero."""
        if self.stopping.is_set():
            return
        if not self.enqueuer.is_alive():
            self.die("the enqueuer thread died", EX_SOFTWARE)
        for w in self.workers:
            if not w.is_alive() and not w.stop.is_set():
                self.die(f"worker {w.name} died", EX_SOFTWARE)

    def shutdown(self) -> bool:
        """Stop watching, finish the in-flight stores, release, close. True if clean."""
        self.notifier.stopping()
        LOGGER.info("stopping: finishing in-flight stores")
        timeout = self.settings.shutdown_timeout
        deadline = time.monotonic() + timeout
        if self.watcher is not None:
            self.watcher.stop()
        self.enqueuer.halt()  # the sentinel wakes it; a bare stop.set() cost the whole timeout
        self.enqueuer.join(max(0.0, deadline - time.monotonic()))
        clean = self._stop_workers(
            [*self.workers, *self._retired], max(0.0, deadline - time.monotonic())
        )
        if not clean:
            LOGGER.warning("in-flight stores did not finish in time; they will be sent again")
            self.hard_stop.set()
        self.metrics.close()
        try:
            self._heartbeat_stopped()
        finally:
            if clean:
                self.outbox.close()
        LOGGER.info("stopped" if clean else "stopped (forced)")
        return clean

    def _heartbeat_stopped(self) -> None:
        with contextlib.suppress(OutboxError):
            self.outbox.heartbeat(time.time(), {"version": __version__, "stopped": True})


def _iso(ts: float | None) -> str | None:
    if not ts:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _install_signals(daemon: Daemon) -> None:
    """Handlers only set flags: first SIGTERM/SIGINT stops cleanly, a second exits at once."""

    def on_stop(signum: int, frame: FrameType | None) -> None:
        if daemon.stopping.is_set():
            os.write(2, b"second signal: exiting now (in-flight stores will be resent)\n")
            os._exit(128 + signum)
        daemon.stopping.set()
        daemon.wakeup.set()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        daemon.reload_requested.set()
        daemon.wakeup.set()

    def on_usr1(signum: int, frame: FrameType | None) -> None:
        # an operator command changed the outbox (queue retry, quarantine requeue)
        daemon.nudge_requested.set()
        daemon.wakeup.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGUSR1, on_usr1)


def _prepare_dirs(settings: Settings) -> list[str]:
    errors = []
    wanted = [(p, "watch.paths") for p in settings.watch.paths]
    wanted.append((settings.quarantine.dir, "quarantine.dir"))
    wanted.append((settings.outbox.path.parent, "outbox.path"))
    if settings.disposition.on_success == "move":
        wanted.append((settings.disposition.archive_dir, "disposition.archive_dir"))
    for path, name in wanted:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            errors.append(f"{name}: cannot create {path}: {exc.strerror}")
    return errors


def _outbox_lock_path(settings: Settings) -> Path:
    path = settings.outbox.path
    return path.with_name(path.name + ".lock")


def _take_locks(settings: Settings) -> list[Held] | int:
    """Lock the outbox and every watched folder for this daemon's life.

    Two daemons on one outbox took each other's in-flight deliveries back at start-up, and two
    on one inbox sent every file twice. Returns the locks held, or the exit status after
    logging who holds one. Operator commands take no lock: they read the outbox as before.
    """
    held: list[Held] = []
    wanted = [("outbox", settings.outbox.path, _outbox_lock_path(settings))]
    wanted += [("inbox", root, root / INBOX_LOCK) for root in settings.watch.paths]
    for what, path, lock in wanted:
        status = None
        try:
            held.append(hold(lock))
        except LockedError as exc:
            holder = f"pid {exc.pid}" if exc.pid is not None else "another process"
            LOGGER.error(
                f"{what} {path} is in use by {holder} (lock {lock}): another forwarder runs "
                "on it; stop that one first"
            )
            status = EX_TEMPFAIL
        except LockError as exc:
            if what == "outbox":
                LOGGER.error(f"outbox.path: {exc}")
                status = EX_CANTCREAT
            else:  # a read-only inbox (disposition keep) still works, just unguarded
                LOGGER.warning(f"watch.paths: {exc}; a second daemon on {path} would go unseen")
        if status is not None:
            for h in held:
                h.release()
            return status
    return held


def _damaged(settings: Settings, config: Path | None, problem: str) -> None:
    cfg = f" --config {config}" if config else ""
    LOGGER.error(
        f"outbox.path: {settings.outbox.path} is damaged ({problem}); not starting. "
        f"Run `forwarder outbox check{cfg}` and restore the outbox from a backup"
    )


def _open_daemon(settings: Settings, config: Path | None) -> Daemon | int:
    """The daemon on a sound, writable outbox, or the exit status after logging why not.

    On a full disk SQLite cannot even create the outbox's WAL files: wait for space (logged
    once a minute) instead of exiting, as a running daemon would.
    """
    trouble = OutboxTrouble()
    # under systemd: say why, and keep the start from timing out
    with Notifier() as waiting:
        while True:
            try:
                daemon = Daemon(settings, config)
            except OutboxCorruptError as exc:
                _damaged(settings, config, str(exc))
                return EX_CANTCREAT
            except OutboxError as exc:
                if disk_full(settings.outbox.path) is None:
                    LOGGER.error(f"outbox.path: cannot open {settings.outbox.path}: {exc}")
                    return EX_CANTCREAT
                full = disk_full(settings.outbox.path)
                trouble.report("start-up", OutboxFullError(f"{exc}; {full}"))
                waiting.send(
                    STATUS=f"waiting for space: {full}",
                    EXTEND_TIMEOUT_USEC=int((_FULL_DISK_POLL + 30) * 1e6),
                )
                time.sleep(_FULL_DISK_POLL)
                continue
            break
    trouble.clear()
    try:
        problems = daemon.outbox.integrity_check(quick=True)
    except OutboxError as exc:
        problems = [str(exc)]
    if problems:
        _damaged(settings, config, " ".join("; ".join(problems[:3]).split()))
        daemon.outbox.close()
        return EX_CANTCREAT
    return daemon


def run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit status."""
    # A worker waiting for a C-STORE response gets the GIL back only when the running
    # thread yields it: every switch interval (5 ms by default) while the enqueuer or the
    # watcher is busy. At hundreds of stores a second that wait is the bottleneck.
    sys.setswitchinterval(_SWITCH_INTERVAL)
    try:
        settings = load(args.config)
    except ConfigError as exc:
        exc.report("forwarder")
        return EX_CONFIG
    # Before anything is created: outside systemd (UMask=) the caller's umask, often 022,
    # would leave the outbox, the sidecars and copied files readable by every local user.
    os.umask(settings.umask_bits)
    log = settings.log
    setup_logging(
        args.log_level or log.level, args.log_format or log.format, args.log_target or log.target
    )
    errors = _prepare_dirs(settings)
    for line in errors:
        LOGGER.error(line)
    if errors:
        return EX_CANTCREAT
    locks = _take_locks(settings)
    if isinstance(locks, int):
        return locks
    try:
        return _run_locked(args, settings)
    finally:
        for lock in locks:
            lock.release()


def _run_locked(args: argparse.Namespace, settings: Settings) -> int:
    daemon = _open_daemon(settings, args.config)
    if isinstance(daemon, int):
        return daemon
    _install_signals(daemon)
    try:
        daemon.start()
    except WatchRootError as exc:
        LOGGER.error(f"watch.paths: {exc}")
        daemon.stopping.set()
        daemon.shutdown()
        return EX_CANTCREAT
    try:
        daemon.serve()
    finally:
        clean = daemon.shutdown()
    if not clean:
        # pynetdicom's association threads are not daemon threads: one waiting on a wedged
        # peer kept the interpreter from exiting at all (until SIGKILL). Leave now; the
        # outbox is as safe as after kill -9 and the in-flight deliveries are sent again.
        logging.shutdown()
        os._exit(daemon.exit_status or 1)
    return daemon.exit_status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forwarder run")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
