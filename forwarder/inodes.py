"""Recognise one file under several names in the inbox (hard links, followed symlinks)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from forwarder.watcher import ReadyFile

__all__ = ["FileKey", "FirstName", "InodeIndex"]

FileKey = tuple[str, int, int]
"""(path, size, mtime_ns): how the outbox knows a file."""


@dataclass(frozen=True)
class FirstName:
    """The name a multi-named file was queued under."""

    key: FileKey
    sop_instance_uid: str | None
    """Its instance, to find its deliveries after they moved with it (archive, quarantine);
    None when not known (found queued already at start-up)."""


class InodeIndex:
    """The first name under which each multi-named file was queued, by (st_dev, st_ino).

    Two names of one inode (``ln a b``, or a followed symlink and its target) are one
    instance: the daemon sends it once, under the name it met first, and the other names
    leave the inbox with it. Only files that may have another name are remembered (more
    than one hard link, or reached through a symlink), unless `track_all` (symlinks are
    followed, so a plain file may be a link's target); at most `limit` entries, oldest
    forgotten first. A match also needs the same size and mtime: an inode number reused
    by a new file after the old one was deleted is not taken for the old file. Any file is
    looked up (a name whose siblings were disposed of has one link left). Thread-safe.
    """

    def __init__(self, *, track_all: bool = False, limit: int = 100_000) -> None:
        self.track_all = track_all
        self._limit = limit
        self._first: OrderedDict[tuple[int, int], FirstName] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._first)

    def tracks(self, ready: ReadyFile) -> bool:
        """Whether `ready` may be one of several names of its file."""
        if ready.dev == 0 and ready.ino == 0:  # not known (a ReadyFile made by hand)
            return False
        return self.track_all or ready.links > 1 or ready.via_symlink

    def register(self, ready: ReadyFile, sop_instance_uid: str | None = None) -> None:
        """Remember `ready` as the name its file is queued under (the first one wins)."""
        if not self.tracks(ready):
            return
        inode = (ready.dev, ready.ino)
        key = (str(ready.path), ready.size, ready.mtime_ns)
        with self._lock:
            known = self._first.get(inode)
            if known is not None and known.key[1:] == key[1:]:
                return
            self._first[inode] = FirstName(key, sop_instance_uid)
            while len(self._first) > self._limit:
                self._first.popitem(last=False)

    def first_name(self, ready: ReadyFile) -> FirstName | None:
        """The other name `ready`'s file was queued under, or None."""
        if ready.dev == 0 and ready.ino == 0:
            return None
        with self._lock:
            first = self._first.get((ready.dev, ready.ino))
        if first is None or first.key[0] == str(ready.path):
            return None
        if first.key[1:] != (ready.size, ready.mtime_ns):
            return None
        return first
