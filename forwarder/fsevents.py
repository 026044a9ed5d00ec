"""Record watchdog's events per path for the watcher's tracker (no stat, no I/O)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

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

from forwarder.folders import WatchedFolders
from forwarder.stability import Kind, Mark

__all__ = ["EVENT_FILTER", "EventInbox", "Taken"]

# The watcher's lines: an operator filters on one logger for everything about watching.
LOGGER = logging.getLogger("forwarder.watcher")

_FILE_KINDS: dict[type[FileSystemEvent], Kind] = {
    FileCreatedEvent: Kind.CREATED,
    FileModifiedEvent: Kind.MODIFIED,
    FileAttribEvent: Kind.ATTRIB,
    FileClosedEvent: Kind.CLOSED,
    FileDeletedEvent: Kind.GONE,
}

EVENT_FILTER: list[type[FileSystemEvent]] = [
    *_FILE_KINDS,
    FileMovedEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
]
"""The events the tracker uses; watchdog turns this list into the inotify mask.

Left out on purpose: open and close-without-writing (IN_OPEN, IN_CLOSE_NOWRITE). Every reader
causes them, the daemon most of all (it opens each file three times: inspection, the check
before sending, the send), and each one would cross watchdog's three threads and the tracker's
lock for nothing: a writer is seen by its writes (IN_MODIFY) and its close (IN_CLOSE_WRITE)."""


@dataclass
class Taken:
    """What `EventInbox.take` hands the tracker: everything recorded since the last take."""

    marks: dict[str, Mark] = field(default_factory=dict)
    """One `Mark` per file path, its events folded in order."""
    dirs_gone: set[str] = field(default_factory=set)
    """Folders deleted or moved away (watched roots among them)."""
    dirs_new: set[str] = field(default_factory=set)
    """Folders created or moved in: their files have no events of their own yet."""
    rescan: bool = False
    """A full rescan was asked for."""


class EventInbox(FileSystemEventHandler):
    """watchdog's events for the watched folders, kept per path until the tracker takes them.

    The observer thread calls `dispatch` (watchdog's handler interface); `note` and
    `request_rescan` may be called from any thread; the tracker calls `take`. Each call that
    records something sets `wake` (except a `note` with ``wake=False``). Paths outside the
    watched folders, or ignored there, are not recorded.
    """

    def __init__(
        self,
        folders: WatchedFolders,
        wake: threading.Event,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._folders = folders
        self._wake = wake
        self._clock = clock
        self._lock = threading.Lock()
        self._taken = Taken()

    def take(self) -> Taken:
        """Everything recorded since the last call; the inbox starts empty again."""
        with self._lock:
            taken, self._taken = self._taken, Taken()
        return taken

    def request_rescan(self) -> None:
        """Ask the tracker for a full rescan."""
        with self._lock:
            self._taken.rescan = True
        self._wake.set()

    def on_any_event(self, event: FileSystemEvent) -> None:
        """Turn a watchdog event into marks (this runs on the observer thread)."""
        unresolve = self._folders.unresolve
        src = unresolve(os.fsdecode(event.src_path))
        dest = unresolve(os.fsdecode(event.dest_path)) if event.dest_path else ""
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
                self.note(src, Kind.GONE)
            if dest:
                self.note(dest, Kind.MOVED_IN)
            return
        kind = _FILE_KINDS.get(type(event))
        if kind is not None:
            self.note(src, kind)

    def note(self, path: str, kind: Kind, *, wake: bool = True) -> None:
        """Fold `kind` into the mark of the file at `path` (a path under a watched folder)."""
        if self._folders.root_of(path, is_dir=False) is None:
            return
        now = self._clock()
        with self._lock:
            marks = self._taken.marks
            mark = marks.get(path)
            if mark is None:
                mark = marks[path] = Mark()
            mark.fold(kind, now)
        if wake:
            self._wake.set()

    def _note_dir(self, path: str, *, created: bool) -> None:
        if path in self._folders.roots:
            if not created:
                LOGGER.warning(f"watched folder {path} was removed; it is no longer watched")
                with self._lock:
                    self._taken.dirs_gone.add(path)
                self._wake.set()
            return
        if self._folders.root_of(path, is_dir=True) is None:
            return
        with self._lock:
            taken = self._taken
            (taken.dirs_new if created else taken.dirs_gone).add(path)
        self._wake.set()
