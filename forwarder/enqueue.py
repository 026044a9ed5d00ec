"""The enqueue stage: files the watcher judged complete become outbox rows, in short batches."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from forwarder.config import Settings
from forwarder.dicomfile import DICOMDIR_SOP_CLASS, DicomInfo, InvalidDicom, inspect
from forwarder.dispose import Disposer
from forwarder.errors import EX_CANTCREAT, EX_SOFTWARE
from forwarder.inodes import FileKey, FirstName, InodeIndex
from forwarder.logs import fields
from forwarder.outbox import FINAL_STATES, Outbox, OutboxCorruptError, OutboxError, State
from forwarder.policy import IDLE_SECONDS
from forwarder.routing import Router
from forwarder.trouble import OutboxTrouble, damaged, pause_after
from forwarder.watcher import ReadyFile

__all__ = ["Enqueuer", "Intake"]

LOGGER = logging.getLogger("forwarder.daemon")

BATCH = 256
"""Files examined and queued in one outbox transaction."""
QUEUE_SIZE = 1000
"""Files handed over by the watcher and not yet examined: a 100,000-file backlog waits in
the watcher, not here as `ReadyFile` objects."""
MAX_HELD = 10_000
"""Examined files kept while the outbox cannot be written; beyond that the watcher offers
them again at its next rescan."""
GATHER_SECONDS = 0.005
"""After the first file of a burst, the watcher gets this long to hand over more."""
RECHECK_SECONDS = 1.0
"""How often a file that is not valid DICOM yet (or waits for its first name) is looked at."""
MAX_SUSPECTS = 1000
"""Files not valid DICOM yet that are looked at again before their second is up."""

Fatal = Callable[[str, int], None]
Routed = tuple[DicomInfo, tuple[str, ...]]
"""An examined file and the destinations that want it."""


@dataclass(frozen=True)
class Intake:
    """The settings the enqueue stage reads (replaced on reload)."""

    destinations: tuple[str, ...]
    follow_symlinks: bool
    invalid_grace_seconds: float
    keeps_delivered: bool  # disposition.on_success = keep: delivered files stay in the inbox
    router: Router | None = None  # None: every instance to every destination

    @classmethod
    def of(cls, settings: Settings) -> Intake:
        router = Router.of(settings)
        return cls(
            destinations=tuple(d.name for d in settings.destinations),
            follow_symlinks=settings.watch.follow_symlinks,
            invalid_grace_seconds=settings.watch.invalid_grace_seconds,
            keeps_delivered=settings.disposition.on_success == "keep",
            router=router if router.has_rules else None,
        )


def _relative(ready: ReadyFile) -> str:
    """The file's path relative to its watched folder, ``/``-separated (what ``path`` rules
    match)."""
    try:
        return ready.path.relative_to(ready.root).as_posix()
    except ValueError:  # not under its root (cannot happen from the watcher): its name
        return ready.path.name


class Enqueuer(threading.Thread):
    """Turns files the watcher judged complete into outbox rows, one short batch at a time.

    A file that is not (yet) valid DICOM is looked at again until it is, or until
    ``watch.invalid_grace_seconds`` have passed: then it goes to quarantine. `loop(now)`
    examines what was handed over (`offer`); `run` waits for files and repeats it.
    """

    def __init__(
        self,
        outbox: Outbox,
        intake: Intake,
        disposer: Disposer,
        inodes: InodeIndex,
        trouble: OutboxTrouble,
        *,
        forget: Callable[[Path], None],
        queued: Callable[[], None],
        fatal: Fatal,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(name="enqueuer", daemon=True)
        self.outbox = outbox
        self.intake = intake
        self.disposer = disposer
        self.trouble = trouble
        self.forget = forget  # the watcher offers this path again at its next rescan
        self.queued = queued  # new rows are due: wake the workers
        self.fatal = fatal
        self.clock = clock  # wall clock: the outbox's times
        self.inbox: queue.Queue[ReadyFile | None] = queue.Queue(maxsize=QUEUE_SIZE)
        self.stop = threading.Event()
        self.last_beat = time.monotonic()
        self._first: ReadyFile | None = None  # taken from `inbox` by `_wait`
        self._suspects: dict[Path, tuple[float, ReadyFile, str]] = {}
        # examined but not queued: the outbox could not be written; tried again every second
        self._held: list[Routed] = []
        self._inodes = inodes
        self._twins: dict[Path, tuple[ReadyFile, FirstName]] = {}  # waiting for their first name
        self._batch: set[FileKey] = set()  # files of the batch being examined, not yet queued

    def halt(self) -> None:
        """Stop, waking a `run` blocked on the empty queue (it would sleep out its wait)."""
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
                    self._wait()
                    self.loop(time.monotonic())
                except OutboxCorruptError as exc:
                    self.fatal(damaged("enqueuer", exc, self.outbox.path), EX_CANTCREAT)
                    return
                except Exception:  # one file or batch must not end the thread
                    failures += 1
                    LOGGER.exception("enqueuer: unexpected error; carrying on")
                    self.stop.wait(pause_after(failures))
                else:
                    failures = 0
        except BaseException:
            self.fatal("the enqueuer died", EX_SOFTWARE)
            raise

    def _wait(self) -> None:
        """Block until a file is handed over, or until own work (files to look at again) is
        due. A burst arrives one file at a time: the watcher gets `GATHER_SECONDS` to hand
        over more, so that a burst costs one thread switch and one outbox transaction per
        batch, not per file."""
        busy = self._suspects or self._held or self._twins
        try:
            self._first = self.inbox.get(timeout=RECHECK_SECONDS if busy else IDLE_SECONDS)
        except queue.Empty:
            return
        if self._first is not None and self.inbox.qsize() < BATCH:
            self.stop.wait(GATHER_SECONDS)

    def loop(self, now: float) -> None:
        """Examine the files handed over (up to `BATCH`) and those due a second look, at
        monotonic `now`, and queue what is new."""
        self.last_beat = time.monotonic()
        batch = [self._first] if self._first is not None else []
        self._first = None
        while len(batch) < BATCH:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                batch.append(item)
        try:
            self._take(batch, now)
        except OutboxCorruptError:
            raise
        except Exception:  # the watcher offers these files again at its next rescan
            self._drop(r.path for r in batch)
            raise

    def _take(self, batch: list[ReadyFile], now: float) -> None:
        """Examine `batch` and queue what is new (with any files held back before)."""
        records: list[Routed] = []
        try:
            known = self.outbox.known_files(
                (str(r.path), r.size, r.mtime_ns) for r in batch
            )  # one query for the batch
        except OutboxCorruptError:
            raise
        except OutboxError as exc:
            self.trouble.report("enqueuer", exc)
            self._drop(r.path for r in batch)
            return
        for ready in batch:
            self._suspects.pop(ready.path, None)
            self._twins.pop(ready.path, None)
            try:
                rec = self._examine(ready, now, known=known)
            except OutboxCorruptError:
                raise
            except OutboxError as exc:
                self.trouble.report("enqueuer", exc)
                self._drop([ready.path])
                continue
            except Exception:  # this file only; the watcher offers it again at a rescan
                LOGGER.exception(f"{ready.path}: unexpected error looking at it; carrying on")
                self._drop([ready.path])
                continue
            if rec is not None:
                records.append(rec)
        self._recheck(records, now)
        self._recheck_twins(records, now)
        records = self._held + records
        if records:
            try:
                added = self._enqueue(records)
            except OutboxCorruptError:
                raise
            except OutboxError as exc:
                self.trouble.report("enqueuer", exc)
                self._held = records[:MAX_HELD]
                self._drop(r.path for r, _ in records[MAX_HELD:])
                self._batch.clear()
                return
            self._held = []
            if added:
                self.trouble.clear()
                self.queued()
        self._batch.clear()

    def _enqueue(self, records: Sequence[Routed]) -> int:
        added = self.outbox.enqueue_routed(records, self.clock())
        if LOGGER.isEnabledFor(logging.DEBUG):  # per file
            for rec, names in records:
                LOGGER.debug(f"queued {rec.path} ({rec.sop_instance_uid}) for {', '.join(names)}")
        if added:
            groups: dict[tuple[str, ...], int] = {}
            for _, names in records:
                groups[names] = groups.get(names, 0) + 1
            for names, count in groups.items():
                LOGGER.info(f"queued {count} file(s) for {', '.join(names)}")
        return added

    def _drop(self, paths: Iterable[str | Path]) -> None:
        """Let files go without queuing them: they stay in the inbox, and the watcher offers
        them again at its next rescan."""
        for path in paths:
            self.forget(Path(path))

    def _recheck(self, records: list[Routed], now: float) -> None:
        for path, (first_seen, ready, _reason) in list(self._suspects.items()):
            if now - first_seen < RECHECK_SECONDS and len(self._suspects) < MAX_SUSPECTS:
                continue
            try:
                st = path.stat()
            except FileNotFoundError:  # the watcher is not told of deletions in place
                self._suspects.pop(path, None)
                self.forget(path)
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
    ) -> Routed | None:
        path = ready.path
        outbox = self.outbox
        key = (str(path), ready.size, ready.mtime_ns)
        if key in known if known is not None else outbox.is_known(*key):
            self._inodes.register(ready)
            states = outbox.file_states(*key)
            if states and all(s in FINAL_STATES for s in states.values()):
                # Left over from a crash, or dropped again with the same path, size and mtime
                # (cp -p, rsync -t) after it was delivered: it is not sent again. Say so, or
                # an operator re-sending a file sees it vanish without a word. (Back after it
                # vanished unsent, GONE somewhere, it is queued again: see the disposer.)
                if State.GONE not in states.values() and not self.intake.keeps_delivered:
                    LOGGER.warning(
                        f"{path}: this file (same size and mtime) was already delivered to every "
                        "destination; disposing of it without sending it again",
                        extra=fields(path=str(path), outcome="already-delivered"),
                    )
                self.disposer.dispose(path, ready.size, ready.mtime_ns, states)
            return None
        first = self._inodes.first_name(ready)
        if first is not None and self._twin(ready, first):
            return None
        follow = self.intake.follow_symlinks
        router = self.intake.router  # one reload's rules for the whole file
        try:
            info = inspect(
                path, follow_symlinks=follow, attributes=router.tags if router else frozenset()
            )
        except FileNotFoundError:  # deleted meanwhile (the watcher is not told of that)
            self.forget(path)
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
        if info.sop_class_uid == DICOMDIR_SOP_CLASS:
            self.disposer.quarantine_invalid(path, "a DICOMDIR is not a storage instance")
            return None
        if self._inodes.tracks(ready):
            first = self._queued_elsewhere(ready, info.sop_instance_uid)
            if first is not None and self._twin(ready, first):
                return None
        names = self.intake.destinations
        if router is not None:
            decision = router.route(info.attributes, _relative(ready))
            if not decision.destinations:
                self._unmatched(ready, router, decision.why_not)
                return None
            names = decision.destinations
        self._inodes.register(ready, info.sop_instance_uid)
        self._batch.add(key)
        return info, names

    def _unmatched(self, ready: ReadyFile, router: Router, why_not: Mapping[str, str]) -> None:
        """No destination wants the instance: ``routing.unmatched`` says where it goes."""
        reason = "no destination matched: " + "; ".join(f"{d}: {w}" for d, w in why_not.items())
        if router.unmatched == "dispose":
            self.disposer.dispose_unwanted(ready.path, reason)
        else:
            self.disposer.quarantine_invalid(ready.path, reason)

    def _invalid(self, ready: ReadyFile, now: float, first_seen: float | None, reason: str) -> None:
        """Not valid DICOM (yet): look again, or quarantine once the grace is over."""
        path = ready.path
        first = first_seen if first_seen is not None else now
        if now - first >= self.intake.invalid_grace_seconds:
            self.disposer.quarantine_invalid(path, reason)
        else:
            self._suspects[path] = (first, ready, reason)
            if first_seen is None:
                LOGGER.debug(f"{path}: not valid DICOM yet ({reason}); looking again")

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
            self.disposer.quarantine_invalid(
                ready.path, f"another name (hard link) of {first.key[0]}, which was refused"
            )
        else:
            self.disposer.dispose(ready.path, ready.size, ready.mtime_ns, states)
        return True

    def _queued_elsewhere(self, ready: ReadyFile, uid: str) -> FirstName | None:
        """Another name of `ready`'s file that the outbox has rows for (queued before a
        restart, when the index was empty): same instance, size and mtime at a path that
        is the same inode. A name gone since cannot be proved the same file: None."""
        for d in self.outbox.find(uid):
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
        states = self.outbox.file_states(*first.key)
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
            for d in self.outbox.find(first.sop_instance_uid)
            if (d.size, d.mtime_ns) == (size, mtime_ns)
        }

    def _recheck_twins(self, records: list[Routed], now: float) -> None:
        for path, (ready, first) in list(self._twins.items()):
            if not self._twin(ready, first):
                self._twins.pop(path, None)
                rec = self._examine(ready, now)
                if rec is not None:
                    records.append(rec)
