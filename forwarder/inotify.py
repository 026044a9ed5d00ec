"""watchdog's inotify emitter, made cheap for bursts of files and quiet at its shutdown."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyEmitter, InotifyWatchGroup
from watchdog.observers.inotify_c import InotifyConstants
from watchdog.observers.inotify_move_event_grouper import (
    InotifyMoveEventGrouper,
    PathedInotifyEvent,
)

__all__ = ["quiet_shutdown_noise", "use_our_emitter"]


class _MoveGrouper(InotifyMoveEventGrouper):
    """watchdog's pairing of IN_MOVED_FROM with IN_MOVED_TO, without the scans it cannot need.

    For every IN_MOVED_TO watchdog searches its whole delay queue, twice, for the matching
    IN_MOVED_FROM: a burst of N files renamed into the tree from outside (none to match) costs
    N^2 comparisons while the queue is long (~60 us per file at 2,000). This one counts the
    IN_MOVED_FROM events queued and skips the searches when there are none; moves inside the
    tree are paired as watchdog pairs them. After a kernel queue overflow it searches always.
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
    per file sent) and each would cross three threads: 0.2 ms of CPU per file sent. Without them a
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


def use_our_emitter(observer: BaseObserver) -> None:
    """Make `observer` create `_Emitter` (only where it would make watchdog's plain inotify
    emitter: other observers are left alone). The daemon runs on Linux only (inotify,
    systemd); watchdog is pinned to 7.x, whose inotify layout these subclasses follow."""
    if getattr(observer, "_emitter_class", None) is InotifyEmitter:
        observer._emitter_class = _Emitter


class _ShutdownNoise(logging.Filter):
    """Drop watchdog 7.1's ERROR line from a race in its own shutdown.

    "InotifyEmitter.queue_events() called when the thread is inactive" is logged when an
    event arrives while the emitter stops (seen in 8 of ~115 daemon stops); nothing is lost,
    but an operator would read it as a failure of a clean stop.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


_SHUTDOWN_NOISE = _ShutdownNoise()


def quiet_shutdown_noise() -> None:
    """Filter `_ShutdownNoise` out of watchdog's inotify log (once, however often called)."""
    inotify_log = logging.getLogger("watchdog.observers.inotify")
    if _SHUTDOWN_NOISE not in inotify_log.filters:
        inotify_log.addFilter(_SHUTDOWN_NOISE)
