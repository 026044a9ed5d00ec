"""Watch folders and report each new file once it is completely written."""

from __future__ import annotations

import fnmatch
import heapq
import logging
import math
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyEmitter, InotifyWatchGroup
from watchdog.observers.inotify_c import InotifyConstants
from watchdog.observers.inotify_move_event_grouper import (
    InotifyMoveEventGrouper,
    PathedInotifyEvent,
)
from watchdog.observers.polling import PollingObserver

__all__ = ["ReadyFile", "WatchRootError", "Watcher"]

log = logging.getLogger("forwarder.watcher")

THREAD_NAME = "forwarder-watcher"
"""Name of the tracker thread; watchdog's observer and emitter threads get this prefix too."""

_JOIN_SECONDS = 10.0
"""How long `Watcher.stop` waits for each thread before it logs a warning and returns."""

_GATHER_SECONDS = 0.01
"""After an event wakes the tracker, how long it lets more events gather before one pass.

A burst of N files is then a pass per 10 ms instead of a wake-up (a thread switch, the
costliest part of an event) per event; 10 ms is nothing next to the settle time."""

_MAX_WARNED_LINKS = 10_000
"""Symlinks remembered as warned about; past this the memory starts afresh (warned again)."""

_SECOND_LOOK = 0.1
"""A file found by a scan is looked at again this soon (at most the settle time) before its
mtime is trusted: it must be unchanged between the two looks."""

_Sig = int
"""A file's (size, mtime_ns) packed exactly into one int: a third of a tuple's memory, which
counts with one per file of a 100,000-file inbox."""


def _sig(st: os.stat_result) -> _Sig:
    return (st.st_size << 64) + (st.st_mtime_ns & 0xFFFF_FFFF_FFFF_FFFF)


"""What "unchanged" compares: (st_size, st_mtime_ns)."""


class WatchRootError(OSError):
    """A watched folder cannot be created or watched; the message names the folder."""


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


class _Kind(Enum):
    """What one file event says, reduced to what the tracker needs."""

    CREATED = "created"  # a new name appeared (Created; also a file moved in from outside)
    MOVED_IN = "moved_in"  # renamed into place inside the tree: the write-then-rename pattern
    MODIFIED = "modified"  # data written (or truncated)
    ATTRIB = "attrib"  # metadata changed (mtime set after close by `cp -p`, chmod)
    CLOSED = "closed"  # closed after writing
    GONE = "gone"  # deleted or moved away
    FORGOTTEN = "forgotten"  # the daemon disposed of it: forget that it was reported


@dataclass(slots=True)
class _Mark:
    """The events seen for one path since the tracker last looked, folded in order."""

    dropped: bool = False
    """The file went away at some point: drop all state first."""
    forgotten: bool = False
    """`Watcher.forget` was called: drop the memory of having reported it."""
    changed_at: float | None = None
    """Time of the last event after the drop that says the file is there and may have changed."""
    written: bool | None = None
    """True after a write not yet followed by a close-write; None when nothing was seen."""

    def fold(self, kind: _Kind, now: float) -> None:
        if kind is _Kind.FORGOTTEN:
            self.forgotten = True
        elif kind is _Kind.GONE:
            self.dropped = True
            self.changed_at = self.written = None
        elif kind is _Kind.CREATED or kind is _Kind.ATTRIB:
            self.changed_at = now
        elif kind is _Kind.MOVED_IN:  # a new inode took the name: what we knew of the old is void
            self.changed_at, self.written = now, False
        elif kind is _Kind.MODIFIED:
            self.changed_at, self.written = now, True
        elif kind is _Kind.CLOSED:
            self.changed_at, self.written = now, False


@dataclass(slots=True)
class _Candidate:
    """A file being watched until it is complete."""

    root: str
    last_change: float
    """Last time an event or a stat showed a change; readiness counts from here."""
    due: float = math.inf
    """When the tracker looks at it next (inf: not scheduled)."""
    sig: _Sig | None = None
    """(size, mtime_ns) at the last look; None before the first."""
    written: bool | None = None
    """True: seen written and not closed-after-writing since. False: seen closed after writing,
    or moved in, and not written since. None: neither seen (found by a scan)."""


_FILE_KINDS: dict[type[FileSystemEvent], _Kind] = {
    FileCreatedEvent: _Kind.CREATED,
    FileModifiedEvent: _Kind.MODIFIED,
    FileAttribEvent: _Kind.ATTRIB,
    FileClosedEvent: _Kind.CLOSED,
    FileDeletedEvent: _Kind.GONE,
}

_EVENT_FILTER: list[type[FileSystemEvent]] = [
    *_FILE_KINDS,
    FileMovedEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
]
"""The events the tracker uses; watchdog turns this list into the inotify mask.

Left out on purpose: open and close-without-writing (IN_OPEN, IN_CLOSE_NOWRITE). Every reader
causes them, the daemon most of all (it opens each file three times: inspection, the check
before sending, the send), and each one crossed watchdog's three threads and the tracker's lock
for nothing: a writer is seen by its writes (IN_MODIFY) and its close (IN_CLOSE_WRITE)."""


class _MoveGrouper(InotifyMoveEventGrouper):
    """watchdog's pairing of IN_MOVED_FROM with IN_MOVED_TO, without the scans it cannot need.

    For every IN_MOVED_TO watchdog searches its whole delay queue, twice, for the matching
    IN_MOVED_FROM: a burst of N files renamed into the tree from outside (none to match) cost
    N^2 comparisons while the queue was long (~60 us per file at 2,000). This one counts the
    IN_MOVED_FROM events queued and skips the searches when there are none; moves inside the
    tree are paired exactly as before. After a kernel queue overflow it searches always.
    """

    def __init__(self) -> None:
        super().__init__()
        self._froms = 0
        self._froms_lock = threading.Lock()
        self._exact = True  # the count is exact (until a kernel queue overflow: see below)

    def _count(self, delta: int) -> None:
        with self._froms_lock:
            self._froms = max(0, self._froms + delta)

    def put_event(self, event: Any) -> None:
        if event.ev.is_moved_from:
            self._count(+1)
        elif event.ev.is_moved_to and self._exact and not self._froms:
            self._queue.put(event, delay=False)  # what the search ends with when it finds none
            return
        super().put_event(event)

    def _group_moved_to_event(self, to_event: Any) -> Any:
        grouped = super()._group_moved_to_event(to_event)
        if isinstance(grouped, tuple):  # its IN_MOVED_FROM left the queue with it
            self._count(-1)
        return grouped

    def get_queued_moved_from_event(self, cookie: int) -> Any:
        if self._exact and not self._froms:
            return None
        return super().get_queued_moved_from_event(cookie)

    def read_event(self) -> Any:
        event = super().read_event()
        if isinstance(event, PathedInotifyEvent) and event.ev.is_moved_from:
            self._count(-1)
        return event

    def discard_pending_events(self) -> None:
        # After a kernel queue overflow: an event being read meanwhile could leave the count
        # one short, so search as watchdog does from now on (overflows are rare).
        super().discard_pending_events()
        self._exact = False


class _WatchGroup(InotifyWatchGroup):
    """watchdog's watch group with `_MoveGrouper` in place before its watches exist."""

    def __post_init__(self) -> None:
        self._move_event_grouper = _MoveGrouper()
        super().__post_init__()


class _Emitter(InotifyEmitter):
    """watchdog's inotify emitter, with two departures measured on bursts of files.

    IN_DELETE is left out of the kernel's mask. The deletions are mostly the daemon's own (one
    per file sent) and each crossed three threads: 0.2 ms of CPU per file sent. Without them a
    file deleted in place is dropped at the tracker's next look at it, and the memory of a
    reported one by `Watcher.forget` or the next full rescan. Moves out of the tree
    (IN_MOVED_FROM) and the removal of a watched root folder (IN_DELETE_SELF) are still
    reported: the filter still lists the deleted events, so those two still reach the tracker.
    A subfolder deleted in place is not: its files are dropped at their next look.

    Moves are paired by `_MoveGrouper` (watchdog 7's `on_thread_start`, with our group), and
    reported as watchdog's "full" emitter does: a file moved in from outside the tree is a
    move with no source, not a creation, so the tracker knows it arrived complete.
    """

    def get_event_mask_from_filter(self) -> Any:
        return super().get_event_mask_from_filter() & ~InotifyConstants.IN_DELETE

    def build_and_queue_event(self, event: Any, *, full_events: bool = True) -> None:
        super().build_and_queue_event(event, full_events=True)

    def on_thread_start(self) -> None:
        self._inotify = _WatchGroup(
            self._inotify_fd,
            os.fsencode(self.watch.path),
            is_recursive=self.watch.is_recursive,
            event_mask=self.get_event_mask_from_filter(),
            follow_symlink=self.watch.follow_symlink,
        )


def _use_our_emitter(observer: BaseObserver) -> None:
    """Make `observer` create `_Emitter` (only where it would make watchdog's plain inotify
    emitter: other observers are left alone). The daemon runs on Linux only (inotify,
    systemd); watchdog is pinned to 7.x, whose inotify layout these subclasses follow."""
    if getattr(observer, "_emitter_class", None) is InotifyEmitter:
        observer._emitter_class = _Emitter


class _Handler(FileSystemEventHandler):
    """Hands every watchdog event to a recording function (runs on the observer thread)."""

    def __init__(self, record: Callable[[FileSystemEvent], None]) -> None:
        super().__init__()
        self._record = record

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._record(event)


def _compile_ignore(patterns: Iterable[str]) -> re.Pattern[str] | None:
    parts = [fnmatch.translate(p) for p in patterns]
    return re.compile("|".join(f"(?:{p})" for p in parts)) if parts else None


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
        # Reported paths stay under the roots as given (made absolute); the observer watches
        # their real paths (inotify would watch a symlinked root itself, not the folder).
        real: dict[str, str] = {}
        for r in roots:
            given = os.path.abspath(os.fspath(r))
            real.setdefault(os.path.realpath(given), given)
        self._roots: list[str] = list(real.values())
        self._real_roots: dict[str, str] = {given: rp for rp, given in real.items()}
        self._unresolve_map = sorted(
            ((rp, given) for rp, given in real.items() if rp != given),
            key=lambda pair: len(pair[0]),
            reverse=True,
        )
        # The deepest root wins when roots are nested.
        self._roots_by_depth = sorted(self._roots, key=len, reverse=True)
        self._on_ready = on_ready
        self._recursive = recursive
        self._follow = follow_symlinks
        self._real_root_list = sorted(set(self._real_roots.values()), key=len, reverse=True)
        self._warned_links: set[str] = set()  # symlinks already warned about (once per path)
        self._poll = poll
        self._poll_interval = poll_interval
        self._settle = float(settle_seconds)
        self._from_mtime = settle_from_mtime and not poll
        self._grace = max(float(unclosed_grace_seconds), self._settle)
        self._rescan_seconds = float(rescan_seconds)
        self._ignore = _compile_ignore(ignore)
        self._clock = clock
        self._wall_clock = wall_clock

        # Shared with the observer thread and the daemon's threads, under _lock.
        self._lock = threading.Lock()
        self._inbox: dict[str, _Mark] = {}
        self._dirs_gone: set[str] = set()
        self._dirs_new: set[str] = set()
        self._rescan_requested = False
        self._wake = threading.Event()
        self._stop = threading.Event()

        # Owned by the tracker (the thread running `loop`).
        self._candidates: dict[str, _Candidate] = {}
        self._due: list[tuple[float, str]] = []  # heap; an entry is live when it matches .due
        self._emitted: dict[str, _Sig] = {}
        self._unreadable: set[str] = set()  # folders already warned about
        self._next_rescan: float | None = None

        self._observer: BaseObserver | None = None
        self._thread: threading.Thread | None = None
        self._started = False

    # -- public interface ---------------------------------------------------------------------

    @property
    def roots(self) -> list[Path]:
        """The watched folders, as given but absolute."""
        return [Path(r) for r in self._roots]

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
        _quiet_watchdog_shutdown()
        for root in self._roots:
            _make_root(root)
        try:
            observer: BaseObserver = (
                PollingObserver(timeout=self._poll_interval) if self._poll else Observer()
            )
        except OSError as exc:  # inotify_init(): too many inotify instances
            raise _watch_error(", ".join(self._roots), exc) from exc
        self._observer = observer
        try:
            self._start_observer(observer)
            self._start_tracker()
        except BaseException:
            self.stop()
            raise

    def _start_observer(self, observer: BaseObserver) -> None:
        _use_our_emitter(observer)
        observer.name = f"{THREAD_NAME}-observer"
        inotify_thread = getattr(observer, "_inotify_fd", None)  # started by InotifyObserver()
        if isinstance(inotify_thread, threading.Thread):
            inotify_thread.name = f"{THREAD_NAME}-inotify"
        observer.start()
        handler = _Handler(self._record)
        for root in self._roots:
            # With the observer running, schedule() adds the watch now and raises here.
            try:
                real = self._real_roots[root]
                watch = observer.schedule(
                    handler, real, recursive=self._recursive, event_filter=_EVENT_FILTER
                )
            except OSError as exc:
                raise _watch_error(root, exc) from exc
            for emitter in observer.emitters:
                if emitter.watch == watch:
                    emitter.name = f"{THREAD_NAME}-emitter"

    def _start_tracker(self) -> None:
        log.info(
            "watching %s (%s, %s, settle %.3g s)",
            ", ".join(self._roots),
            f"polling every {self._poll_interval:g} s" if self._poll else "inotify",
            "recursive" if self._recursive else "top level only",
            self._settle,
        )
        now = self._clock()
        self._scan(self._roots, now, full=True)
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
                log.warning("watcher tracker did not stop within %.0f s", _JOIN_SECONDS)

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
        with self._lock:
            self._rescan_requested = True
        self._wake.set()

    def forget(self, path: Path) -> None:
        """Forget that `path` was reported (thread-safe): the daemon disposed of or moved it.

        A file appearing at that path later is reported again, even with the same size and
        mtime; one already being tracked there (dropped again before this call) stays tracked.
        If the file is still there, the next rescan reports it again. A move away is seen
        as an event and drops any tracking; a deletion in place is not reported (see
        `_Emitter`): the tracker drops it at its next look.
        """
        # No wake-up: forgetting is never urgent, and the daemon calls this per file sent.
        self._note(os.path.abspath(os.fspath(path)), _Kind.FORGOTTEN, wake=False)

    def loop(self, now: float) -> float:
        """Run one tracker iteration at time `now`; return seconds until it must run again.

        Applies the events recorded since the last call, runs a full rescan when one is due
        or was asked for (the first call scans when `start` did not), stats the candidates
        whose time has come and passes the ready ones to `on_ready`. Tests call it with a
        fake clock; it must not be called while the tracker thread runs.
        """
        with self._lock:
            inbox, self._inbox = self._inbox, {}
            dirs_gone, self._dirs_gone = self._dirs_gone, set()
            dirs_new, self._dirs_new = self._dirs_new, set()
            rescan, self._rescan_requested = self._rescan_requested, False
        if dirs_gone:
            self._drop_under(dirs_gone)
        for path, mark in inbox.items():
            self._apply(path, mark, now)
        if rescan or self._next_rescan is None or now >= self._next_rescan:
            self._scan(self._roots, now, full=True)
            self._next_rescan = now + self._rescan_seconds
        elif dirs_new:
            self._scan(_outermost(dirs_new), now, full=False)
        self._check_due(now)
        return self._delay(now)

    # -- observer thread: record only ---------------------------------------------------------

    def _record(self, event: FileSystemEvent) -> None:
        """Turn a watchdog event into marks (no stat, no I/O: this runs on the observer)."""
        src = self._unresolve(os.fsdecode(event.src_path))
        dest = self._unresolve(os.fsdecode(event.dest_path)) if event.dest_path else ""
        if event.is_directory:
            if isinstance(event, DirCreatedEvent):
                self._note_dir(src, created=True)
            elif isinstance(event, DirDeletedEvent):
                self._note_dir(src, created=False)
            elif isinstance(event, DirMovedEvent):
                self._note_dir(src, created=False)
                if dest:
                    self._note_dir(dest, created=True)
            return
        if isinstance(event, FileMovedEvent):
            if src:
                self._note(src, _Kind.GONE)
            if dest:
                self._note(dest, _Kind.MOVED_IN)
            return
        kind = _FILE_KINDS.get(type(event))
        if kind is not None:
            self._note(src, kind)

    def _unresolve(self, path: str) -> str:
        """`path` as seen by the observer (under a real root) -> under the root as given."""
        for real, given in self._unresolve_map:
            if path.startswith(real) and path[len(real) : len(real) + 1] in ("", os.sep):
                return given + path[len(real) :]
        return path

    def _note(self, path: str, kind: _Kind, *, wake: bool = True) -> None:
        if self._root_of(path, is_dir=False) is None:
            return
        now = self._clock()
        with self._lock:
            mark = self._inbox.get(path)
            if mark is None:
                mark = self._inbox[path] = _Mark()
            mark.fold(kind, now)
        if wake:
            self._wake.set()

    def _note_dir(self, path: str, *, created: bool) -> None:
        if path in self._roots:
            if not created:
                log.warning("watched folder %s was removed; it is no longer watched", path)
                with self._lock:
                    self._dirs_gone.add(path)
                self._wake.set()
            return
        if self._root_of(path, is_dir=True) is None:
            return
        with self._lock:
            (self._dirs_new if created else self._dirs_gone).add(path)
        self._wake.set()

    def _root_of(self, path: str, *, is_dir: bool) -> str | None:
        """The root `path` belongs to, or None when it is outside every root or ignored."""
        for root in self._roots_by_depth:
            if path.startswith(root) and path[len(root) : len(root) + 1] == os.sep:
                parts = path[len(root) + 1 :].split(os.sep)
                if not self._recursive and (is_dir or len(parts) > 1):
                    return None
                if self._ignore is not None and any(
                    self._ignore.match(os.path.normcase(part)) for part in parts
                ):
                    return None
                return root
        return None

    # -- tracker ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                delay = self.loop(self._clock())
            except Exception:
                log.exception("watcher iteration failed; retrying in 1 s")
                delay = 1.0
            if self._wake.wait(delay) and not self._stop.is_set():
                self._stop.wait(_GATHER_SECONDS)  # woken by an event: let a burst gather

    def _wait(self, cand: _Candidate) -> float:
        """How long `cand` must stay unchanged: the grace when seen written and not closed."""
        if not self._poll and cand.written:
            return self._grace
        return self._settle

    def _aged(self, st: os.stat_result, cand: _Candidate, *, steady: bool) -> bool:
        """True when the file's mtime says it has been unchanged for the settle time.

        Every write sets the mtime, so an mtime `settle_seconds` in the past means no write
        since; a future mtime (another clock) says nothing. Trusted only for a file seen
        closed after writing or moved in (`cand.written is False`), or found unchanged between two
        looks (`steady`: a scan found it, or its events were lost); never for a file seen
        written and not closed since (a writer may set an old mtime first: SMB's sticky write
        time), nor for an mtime in whole seconds (a coarse clock, as on vfat or some network
        file systems, cannot tell a file written just now from one a second old).
        """
        if not self._from_mtime or cand.written or not (cand.written is False or steady):
            return False
        if st.st_mtime_ns % 1_000_000_000 == 0:
            return False
        age = self._wall_clock() - st.st_mtime_ns / 1e9
        return age >= self._settle

    def _schedule(self, path: str, cand: _Candidate, at: float) -> None:
        """Look at `cand` at `at` unless it is already due earlier (it then reschedules)."""
        if at < cand.due:
            cand.due = at
            heapq.heappush(self._due, (at, path))

    def _apply(self, path: str, mark: _Mark, now: float) -> None:
        if mark.dropped:
            self._candidates.pop(path, None)
        if mark.dropped or mark.forgotten:
            self._emitted.pop(path, None)
        cand = self._candidates.get(path)
        if cand is None:
            if mark.changed_at is None:  # only forgotten, or gone
                return
            root = self._root_of(path, is_dir=False)
            if root is None:
                return
            cand = self._candidates[path] = _Candidate(root=root, last_change=mark.changed_at)
        if mark.written is not None:
            cand.written = mark.written
        if mark.changed_at is not None:
            cand.last_change = max(cand.last_change, mark.changed_at)
        # A first look right away; later ones when the file may be ready.
        self._schedule(path, cand, now if cand.sig is None else cand.last_change + self._wait(cand))

    def _check_due(self, now: float) -> None:
        while self._due and self._due[0][0] <= now and not self._stop.is_set():
            due, path = heapq.heappop(self._due)
            cand = self._candidates.get(path)
            if cand is None or cand.due != due:
                continue  # stale entry: dropped or rescheduled
            cand.due = math.inf
            self._check(path, cand, now)

    def _check(self, path: str, cand: _Candidate, now: float) -> None:
        try:
            st = os.lstat(path)
            via_symlink = stat.S_ISLNK(st.st_mode)
            if via_symlink:
                if not self._followed(path):
                    self._candidates.pop(path, None)
                    self._emitted.pop(path, None)
                    return
                st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            self._candidates.pop(path, None)
            self._emitted.pop(path, None)
            return
        except OSError as exc:
            log.warning("cannot stat %s: %s; dropped until the next rescan", path, exc.strerror)
            self._candidates.pop(path, None)
            return
        if not stat.S_ISREG(st.st_mode):  # a symlink to a folder, a fifo, ...
            self._candidates.pop(path, None)
            return
        sig = _sig(st)
        steady = sig == cand.sig
        if not steady:
            cand.sig = sig
            cand.last_change = max(cand.last_change, now)
        ready_at = cand.last_change + self._wait(cand)
        if now < ready_at and not self._aged(st, cand, steady=steady):
            self._schedule(path, cand, ready_at)
            return
        del self._candidates[path]
        if self._emitted.get(path) == sig:
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
        log.debug("ready: %s (%d bytes)", path, st.st_size)
        try:
            self._on_ready(ready)
        except Exception:
            log.exception("on_ready failed for %s; it is offered again at the next rescan", path)
            return
        self._emitted[path] = sig

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

        def under(path: str) -> bool:
            parent = os.path.dirname(path)
            while True:
                if parent in dirs:
                    return True
                up = os.path.dirname(parent)
                if up == parent:
                    return False
                parent = up

        for table in (self._candidates, self._emitted):
            for path in [p for p in table if under(p)]:
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
            root = top if top in self._roots else self._root_of(top, is_dir=True)
            if root is None:
                continue
            for path, st in self._walk(top, failed):
                if self._stop.is_set():
                    return
                count += 1
                if full:
                    found.add(path)
                if path in self._candidates or not stat.S_ISREG(st.st_mode):
                    continue
                sig = _sig(st)
                if self._emitted.get(path) == sig:
                    continue
                cand = self._candidates[path] = _Candidate(root=root, last_change=now, sig=sig)
                soon = self._aged(st, cand, steady=True)  # then a second look confirms it
                self._schedule(
                    path, cand, now + (min(_SECOND_LOOK, self._settle) if soon else self._settle)
                )
        if full:
            failed_dirs = failed

            def under_failed(path: str) -> bool:
                return any(path.startswith(d + os.sep) for d in failed_dirs)

            for path in [p for p in self._emitted if p not in found and not under_failed(p)]:
                del self._emitted[path]
            self._unreadable = failed
        else:
            self._unreadable |= failed
        log.debug("scanned %s: %d files, %d pending", ", ".join(tops), count, self.pending)

    def _walk(self, top: str, failed: set[str]) -> Iterator[tuple[str, os.stat_result]]:
        """Yield (path, stat) of the files under `top`, skipping ignored names and dir symlinks."""
        stack = [top]
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = list(it)
            except FileNotFoundError:
                if folder in self._roots:
                    log.warning("watched folder %s does not exist", folder)
                continue
            except OSError as exc:
                failed.add(folder)
                if folder not in self._unreadable:
                    log.warning("cannot read folder %s: %s; skipped", folder, exc.strerror)
                continue
            for entry in entries:
                if self._ignore is not None and self._ignore.match(os.path.normcase(entry.name)):
                    continue
                try:
                    if entry.is_symlink() and not self._followed(entry.path):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        if self._recursive:
                            stack.append(entry.path)
                        continue
                    if not entry.is_file():  # a followed link: its target; broken: not a file
                        continue
                    st = entry.stat()
                except OSError:
                    continue
                yield entry.path, st

    def _followed(self, path: str) -> bool:
        """Whether the symlink at `path` is followed (see ``follow_symlinks``); warns once per
        path when it is not. A symlinked folder is never followed (no loops)."""
        target = os.path.realpath(path)
        if not self._follow:
            why = "watch.follow_symlinks is false"
        elif os.path.isdir(target):
            why = "symlinked folders are never entered"
        elif not any(target.startswith(r + os.sep) for r in self._real_root_list):
            why = "its target is outside the watched folders"
        else:
            return True
        if path not in self._warned_links:
            if len(self._warned_links) >= _MAX_WARNED_LINKS:
                self._warned_links.clear()  # bounded memory against a flood of links
            self._warned_links.add(path)
            log.warning(
                "skipped symlink %s -> %s: %s; it is not read, sent or moved",
                path,
                target,
                why,
            )
        return False

    def _stop_observer(self) -> None:
        observer = self._observer
        if observer is None:
            return
        self._observer = None
        observer.stop()
        if observer.is_alive():
            observer.join(_JOIN_SECONDS)
            if observer.is_alive():
                log.warning("watchdog observer did not stop within %.0f s", _JOIN_SECONDS)


def _outermost(dirs: set[str]) -> list[str]:
    """`dirs` without the folders that lie under another one of them."""
    result: list[str] = []
    for d in sorted(dirs):
        if not result or not d.startswith(result[-1] + os.sep):
            result.append(d)
    return result


class _ShutdownNoise(logging.Filter):
    """Drop watchdog 7.1's ERROR line from a race in its own shutdown.

    "InotifyEmitter.queue_events() called when the thread is inactive" is logged when an
    event arrives while the emitter stops (seen in 8 of ~115 daemon stops); nothing is lost,
    but an operator would read it as a failure of a clean stop.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


_SHUTDOWN_NOISE = _ShutdownNoise()


def _quiet_watchdog_shutdown() -> None:
    inotify_log = logging.getLogger("watchdog.observers.inotify")
    if _SHUTDOWN_NOISE not in inotify_log.filters:
        inotify_log.addFilter(_SHUTDOWN_NOISE)


def _make_root(root: str) -> None:
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:  # exists, but not as a folder
        raise WatchRootError(exc.errno, f"watch folder {root} exists and is not a folder") from exc
    except OSError as exc:
        raise WatchRootError(
            exc.errno, f"cannot create watch folder {root}: {exc.strerror}"
        ) from exc


def _watch_error(root: str, exc: OSError) -> WatchRootError:
    reason = exc.strerror or str(exc)
    if "watch limit" in reason:
        reason += " (raise fs.inotify.max_user_watches, or set poll = true)"
    elif "instance limit" in reason:
        reason += " (raise fs.inotify.max_user_instances, or set poll = true)"
    return WatchRootError(exc.errno, f"cannot watch folder {root}: {reason}")
