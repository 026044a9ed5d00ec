"""Watch folders and report each new file once it is completely written."""

from __future__ import annotations

import heapq
import logging
import math
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from forwarder.folders import WatchedFolders, WatchRootError, is_under, outermost, watch_error
from forwarder.fsevents import EVENT_FILTER, EventInbox
from forwarder.inotify import quiet_shutdown_noise, use_our_emitter
from forwarder.stability import Candidate, Kind, Mark, SettleRules, Sig, sig

__all__ = ["THREAD_NAME", "ReadyFile", "WatchRootError", "Watcher"]

LOGGER = logging.getLogger("forwarder.watcher")

THREAD_NAME = "forwarder-watcher"
"""Name of the tracker thread; watchdog's observer and emitter threads get this prefix too."""

_JOIN_SECONDS = 10.0
"""How long `Watcher.stop` waits for each thread before it logs a warning and returns."""

_GATHER_SECONDS = 0.01
"""After an event wakes the tracker, how long it lets more events gather before one pass.

A burst of N files is then a pass per 10 ms instead of a wake-up (a thread switch, the
costliest part of an event) per event; 10 ms is nothing next to the settle time."""


@dataclass(frozen=True)
class ReadyFile:
    """A file the watcher judged completely written."""

    path: Path
    """Absolute path of the file (under `root`)."""
    size: int
    """Size in bytes when it was judged complete."""
    mtime_ns: int
    """Modification time (ns) when it was judged complete."""
    root: Path
    """The watched folder the file is under."""
    dev: int = 0
    """``st_dev`` of the file (of a followed symlink's target)."""
    ino: int = 0
    """``st_ino`` of the file: with `dev`, the same file under another name (a hard link)."""
    links: int = 1
    """``st_nlink``: more than 1 when the file has other names (hard links)."""
    via_symlink: bool = False
    """Reached through a symlink (``follow_symlinks``): `path` is the link's path."""

    @property
    def relative(self) -> Path:
        """The path relative to `root`."""
        return self.path.relative_to(self.root)


class Watcher:
    """Report files under watched folders once they are completely written.

    A file is ready when its size and mtime stayed unchanged for `settle_seconds` and no event
    touched it meanwhile. A file whose own mtime is already `settle_seconds` old when it is
    looked at (moved in after it was written, copied with its times kept, found at start-up)
    has been unchanged that long and is ready at once, as Apache Camel's ``readLockMinAge``
    does, once it was seen closed after writing or moved in, or unchanged between two looks;
    not while it is seen written and not closed, not for mtimes in whole seconds (a coarse
    clock), and never with ``poll=True`` (a network mount's mtimes come from another clock) or
    ``settle_from_mtime=False``. When it was seen written and not closed since (a slow writer
    keeps the file open between pieces), it must instead stay unchanged for
    `unclosed_grace_seconds`; a close-after-writing or a rename into place (write-then-rename)
    brings it back to `settle_seconds`. Close events are only a hint: files whose events were
    lost (new subfolders, missed events found by a rescan) become ready on stability alone.
    With ``poll=True`` there are no close events and `settle_seconds` always applies.

    Every file present at `start` is a candidate, and a full rescan runs every
    `rescan_seconds` (or on `rescan`). Each ready file is passed once to `on_ready` on the
    tracker thread; it is passed again only when its size or mtime changed, or after it
    disappeared or was `forget`-ten and came back.

    Parameters
    ----------
    roots
        Folders to watch; reported paths are under them as given (made absolute), even when
        a root is a symlink to the real folder. Missing folders are created by `start`.
    on_ready
        Called with a `ReadyFile` on the tracker thread. It may block (the tracker waits;
        events keep being recorded, one entry per path). Exceptions are logged; the file is
        then not remembered as reported, so the next rescan offers it again.
    recursive
        Watch subfolders too. Symlinked subfolders are never entered (no loops, nothing
        outside the tree).
    follow_symlinks
        False (the default): a symlink under a root is skipped with one warning per path:
        never followed, so nothing it points to is read, copied or moved. True: a symlink to
        a file is reported (under the link's path) only when its target resolves inside a
        watched folder; others are skipped with a warning.
    poll, poll_interval
        Use watchdog's PollingObserver every `poll_interval` seconds instead of inotify:
        for NFS/SMB/container mounts, where inotify sees no remote writes.
    settle_seconds
        How long a file must stay unchanged to be ready.
    settle_from_mtime
        Count the settle time from the file's mtime when that is older than the first look
        (see above); False: always watch it for `settle_seconds` from the first look.
    rescan_seconds
        Interval of the full rescan that catches missed events.
    ignore
        fnmatch patterns matched against the file name and against every folder name below
        the root; a match on either ignores the file (so ``.*`` ignores dot-folders too).
    unclosed_grace_seconds
        How long a file seen written but not closed since must stay unchanged.
    clock
        Monotonic time source, for tests.
    wall_clock
        Wall-clock time source (compared with mtimes), for tests.

    Raises
    ------
    ValueError
        For no roots, negative times, or a zero rescan or poll interval.

    The observer thread only records events (path, kind, time) and wakes the tracker; all
    stat() calls happen on the tracker, which sleeps until the next event, deadline or rescan.
    """

    def __init__(
        self,
        roots: Sequence[Path],
        on_ready: Callable[[ReadyFile], None],
        *,
        recursive: bool = True,
        follow_symlinks: bool = False,
        poll: bool = False,
        poll_interval: float = 2.0,
        settle_seconds: float = 1.0,
        settle_from_mtime: bool = True,
        rescan_seconds: float = 300.0,
        ignore: Sequence[str] = (".*", "*.part", "*.tmp", "*.partial"),
        unclosed_grace_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not roots:
            raise ValueError("at least one folder to watch is required")
        if settle_seconds < 0 or unclosed_grace_seconds < 0:
            raise ValueError("settle_seconds and unclosed_grace_seconds must be >= 0")
        if rescan_seconds <= 0 or poll_interval <= 0:
            raise ValueError("rescan_seconds and poll_interval must be > 0")
        self._folders = WatchedFolders(
            roots, recursive=recursive, follow_symlinks=follow_symlinks, ignore=ignore
        )
        self._on_ready = on_ready
        self._poll = poll
        self._poll_interval = poll_interval
        self._rules = SettleRules(
            settle=float(settle_seconds),
            grace=max(float(unclosed_grace_seconds), float(settle_seconds)),
            poll=poll,
            from_mtime=settle_from_mtime and not poll,
            wall_clock=wall_clock,
        )
        self._rescan_seconds = float(rescan_seconds)
        self._clock = clock

        # Shared with the observer thread and the daemon's threads (thread-safe).
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._events = EventInbox(self._folders, self._wake, clock)

        # Owned by the tracker (the thread running `loop`).
        self._candidates: dict[str, Candidate] = {}
        self._due: list[tuple[float, str]] = []  # heap; an entry is live when it matches .due
        self._emitted: dict[str, Sig] = {}
        self._next_rescan: float | None = None

        self._observer: BaseObserver | None = None
        self._thread: threading.Thread | None = None
        self._started = False

    # -- public interface ---------------------------------------------------------------------

    @property
    def roots(self) -> list[Path]:
        """The watched folders, as given but absolute."""
        return [Path(r) for r in self._folders.roots]

    @property
    def pending(self) -> int:
        """Number of files being tracked until they are complete."""
        return len(self._candidates)

    def start(self) -> None:
        """Create missing folders, start watching, scan what is there, start the tracker.

        The observer gets its watches before the start-up scan, so a file written meanwhile
        is seen by one or the other. The scan runs in the calling thread: every file present
        is a candidate when this returns. A Watcher is started once.

        Raises
        ------
        WatchRootError
            When a folder cannot be created, is not a folder, or cannot be watched (the
            message names it).
        RuntimeError
            When called twice, or after `stop`.
        """
        if self._started or self._stop.is_set():
            raise RuntimeError("a Watcher can be started only once")
        self._started = True
        quiet_shutdown_noise()
        self._folders.make()
        try:
            observer: BaseObserver = (
                PollingObserver(timeout=self._poll_interval) if self._poll else Observer()
            )
        except OSError as exc:  # inotify_init(): too many inotify instances
            raise watch_error(", ".join(self._folders.roots), exc) from exc
        self._observer = observer
        try:
            self._start_observer(observer)
            self._start_tracker()
        except BaseException:
            self.stop()
            raise

    def _start_observer(self, observer: BaseObserver) -> None:
        use_our_emitter(observer)
        observer.name = f"{THREAD_NAME}-observer"
        inotify_thread = getattr(observer, "_inotify_fd", None)  # started by InotifyObserver()
        if isinstance(inotify_thread, threading.Thread):
            inotify_thread.name = f"{THREAD_NAME}-inotify"
        observer.start()
        for root in self._folders.roots:
            # With the observer running, schedule() adds the watch now and raises here.
            try:
                watch = observer.schedule(
                    self._events,
                    self._folders.real[root],
                    recursive=self._folders.recursive,
                    event_filter=EVENT_FILTER,
                )
            except OSError as exc:
                raise watch_error(root, exc) from exc
            for emitter in observer.emitters:
                if emitter.watch == watch:
                    emitter.name = f"{THREAD_NAME}-emitter"

    def _start_tracker(self) -> None:
        LOGGER.info(
            "watching %s (%s, %s, settle %.3g s)",
            ", ".join(self._folders.roots),
            f"polling every {self._poll_interval:g} s" if self._poll else "inotify",
            "recursive" if self._folders.recursive else "top level only",
            self._rules.settle,
        )
        now = self._clock()
        self._scan(self._folders.roots, now, full=True)
        self._next_rescan = now + self._rescan_seconds
        thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread = thread
        thread.start()

    def stop(self) -> None:
        """Stop watching and join the observer and tracker threads (bounded; idempotent).

        Files not yet ready are dropped; a new Watcher finds them again at its start-up scan.
        """
        self._stop.set()
        self._wake.set()
        self._stop_observer()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_SECONDS)
            if thread.is_alive():
                LOGGER.warning("watcher tracker did not stop within %.0f s", _JOIN_SECONDS)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def rescan(self) -> None:
        """Ask for a full rescan at the tracker's next iteration (thread-safe)."""
        self._events.request_rescan()

    def forget(self, path: Path) -> None:
        """Forget that `path` was reported (thread-safe): the daemon disposed of or moved it.

        A file appearing at that path later is reported again, even with the same size and
        mtime; one already being tracked there (dropped again before this call) stays tracked.
        If the file is still there, the next rescan reports it again. A move away is seen
        as an event and drops any tracking; a deletion in place is not reported (see
        `forwarder.inotify`): the tracker drops it at its next look.
        """
        # No wake-up: forgetting is never urgent, and the daemon calls this per file sent.
        self._events.note(os.path.abspath(os.fspath(path)), Kind.FORGOTTEN, wake=False)

    def loop(self, now: float) -> float:
        """Run one tracker iteration at time `now`; return seconds until it must run again.

        Applies the events recorded since the last call, runs a full rescan when one is due
        or was asked for (the first call scans when `start` did not), stats the candidates
        whose time has come and passes the ready ones to `on_ready`. Tests call it with a
        fake clock; it must not be called while the tracker thread runs.
        """
        taken = self._events.take()
        if taken.dirs_gone:
            self._drop_under(taken.dirs_gone)
        for path, mark in taken.marks.items():
            self._apply(path, mark, now)
        if taken.rescan or self._next_rescan is None or now >= self._next_rescan:
            self._scan(self._folders.roots, now, full=True)
            self._next_rescan = now + self._rescan_seconds
        elif taken.dirs_new:
            self._scan(outermost(taken.dirs_new), now, full=False)
        self._check_due(now)
        return self._delay(now)

    # -- tracker ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                delay = self.loop(self._clock())
            except Exception:
                LOGGER.exception("watcher iteration failed; retrying in 1 s")
                delay = 1.0
            if self._wake.wait(delay) and not self._stop.is_set():
                self._stop.wait(_GATHER_SECONDS)  # woken by an event: let a burst gather

    def _schedule(self, path: str, cand: Candidate, at: float) -> None:
        """Look at `cand` at `at` unless it is already due earlier (it then reschedules)."""
        if at < cand.due:
            cand.due = at
            heapq.heappush(self._due, (at, path))

    def _apply(self, path: str, mark: Mark, now: float) -> None:
        if mark.dropped:
            self._candidates.pop(path, None)
        if mark.dropped or mark.forgotten:
            self._emitted.pop(path, None)
        cand = self._candidates.get(path)
        if cand is None:
            if mark.changed_at is None:  # only forgotten, or gone
                return
            root = self._folders.root_of(path, is_dir=False)
            if root is None:
                return
            cand = self._candidates[path] = Candidate(root=root, last_change=mark.changed_at)
        if mark.written is not None:
            cand.written = mark.written
        if mark.changed_at is not None:
            cand.last_change = max(cand.last_change, mark.changed_at)
        # A first look right away; later ones when the file may be ready.
        at = now if cand.sig is None else cand.last_change + self._rules.wait(cand)
        self._schedule(path, cand, at)

    def _check_due(self, now: float) -> None:
        while self._due and self._due[0][0] <= now and not self._stop.is_set():
            due, path = heapq.heappop(self._due)
            cand = self._candidates.get(path)
            if cand is None or cand.due != due:
                continue  # stale entry: dropped or rescheduled
            cand.due = math.inf
            self._check(path, cand, now)

    def _check(self, path: str, cand: Candidate, now: float) -> None:
        try:
            st = os.lstat(path)
            via_symlink = stat.S_ISLNK(st.st_mode)
            if via_symlink:
                if not self._folders.followed(path):
                    self._candidates.pop(path, None)
                    self._emitted.pop(path, None)
                    return
                st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            self._candidates.pop(path, None)
            self._emitted.pop(path, None)
            return
        except OSError as exc:
            LOGGER.warning(f"cannot stat {path}: {exc.strerror}; dropped until the next rescan")
            self._candidates.pop(path, None)
            return
        if not stat.S_ISREG(st.st_mode):  # a symlink to a folder, a fifo, ...
            self._candidates.pop(path, None)
            return
        now_sig = sig(st)
        steady = now_sig == cand.sig
        if not steady:
            cand.sig = now_sig
            cand.last_change = max(cand.last_change, now)
        ready_at = cand.last_change + self._rules.wait(cand)
        if now < ready_at and not self._rules.aged(st, cand, steady=steady):
            self._schedule(path, cand, ready_at)
            return
        del self._candidates[path]
        if self._emitted.get(path) == now_sig:
            return
        ready = ReadyFile(
            Path(path),
            st.st_size,
            st.st_mtime_ns,
            Path(cand.root),
            dev=st.st_dev,
            ino=st.st_ino,
            links=st.st_nlink,
            via_symlink=via_symlink,
        )
        if LOGGER.isEnabledFor(logging.DEBUG):  # per file
            LOGGER.debug(f"ready: {path} ({st.st_size} bytes)")
        try:
            self._on_ready(ready)
        except Exception:
            LOGGER.exception(f"on_ready failed for {path}; it is offered again at the next rescan")
            return
        self._emitted[path] = now_sig

    def _delay(self, now: float) -> float:
        while self._due:
            due, path = self._due[0]
            cand = self._candidates.get(path)
            if cand is not None and cand.due == due:
                break
            heapq.heappop(self._due)
        nxt = self._due[0][0] if self._due else math.inf
        if self._next_rescan is not None:
            nxt = min(nxt, self._next_rescan)
        return max(0.0, nxt - now)

    def _drop_under(self, dirs: set[str]) -> None:
        """Forget every file under the folders in `dirs` (deleted or moved away)."""
        for table in (self._candidates, self._emitted):
            for path in [p for p in table if is_under(p, dirs)]:
                del table[path]

    # -- scanning -----------------------------------------------------------------------------

    def _scan(self, tops: Sequence[str], now: float, *, full: bool) -> None:
        """Make a candidate of every file under `tops` not yet tracked, or changed since reported.

        A full scan also forgets reported files that are gone, and re-arms the warnings about
        unreadable folders that became readable.
        """
        found: set[str] = set()
        failed: set[str] = set()
        count = 0
        for top in tops:
            root = top if top in self._folders.roots else self._folders.root_of(top, is_dir=True)
            if root is None:
                continue
            for path, st in self._folders.walk(top, failed):
                if self._stop.is_set():
                    return
                count += 1
                if full:
                    found.add(path)
                if path in self._candidates or not stat.S_ISREG(st.st_mode):
                    continue
                found_sig = sig(st)
                if self._emitted.get(path) == found_sig:
                    continue
                cand = self._candidates[path] = Candidate(root=root, last_change=now, sig=found_sig)
                self._schedule(path, cand, now + self._rules.first_look(st, cand))
        if full:
            gone = [p for p in self._emitted if p not in found and not is_under(p, failed)]
            for path in gone:
                del self._emitted[path]
            self._folders.unreadable = failed
        else:
            self._folders.unreadable |= failed
        LOGGER.debug(f"scanned {', '.join(tops)}: {count} files, {self.pending} pending")

    def _stop_observer(self) -> None:
        observer = self._observer
        if observer is None:
            return
        self._observer = None
        observer.stop()
        if observer.is_alive():
            observer.join(_JOIN_SECONDS)
            if observer.is_alive():
                LOGGER.warning("watchdog observer did not stop within %.0f s", _JOIN_SECONDS)
