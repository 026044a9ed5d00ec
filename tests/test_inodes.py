"""Tests for forwarder.inodes: one file under several names is recognised (pure bookkeeping)."""

from __future__ import annotations

from pathlib import Path

import pytest

from forwarder.inodes import InodeIndex
from forwarder.watcher import ReadyFile

ROOT = Path("/in")


def ready(
    name: str, ino: int, *, links: int = 2, size: int = 10, mtime: int = 5, via: bool = False
) -> ReadyFile:
    return ReadyFile(ROOT / name, size, mtime, ROOT, dev=1, ino=ino, links=links, via_symlink=via)


@pytest.mark.parametrize(
    ("first", "second", "track_all", "twin"),
    [
        (ready("a", 7), ready("b", 7), False, True),  # two hard links
        (ready("a", 7), ready("a", 7), False, False),  # the same name again
        (ready("a", 7), ready("b", 8), False, False),  # another inode
        (ready("a", 7), ready("b", 7, mtime=6), False, False),  # inode number reused
        (ready("a", 7), ready("b", 7, size=11), False, False),
        (ready("a", 7, links=1), ready("b", 7, via=True), False, False),  # target not tracked
        (ready("a", 7, links=1), ready("b", 7, via=True), True, True),  # follow_symlinks
        (ready("a", 7, via=True), ready("b", 7, links=1), False, True),  # the link's target
        (ready("a", 7), ready("b", 7, links=1), False, True),  # a's other names left since
    ],
)
def test_first_name(first: ReadyFile, second: ReadyFile, track_all: bool, twin: bool) -> None:
    index = InodeIndex(track_all=track_all)
    index.register(first, "1.2.3")
    found = index.first_name(second)
    assert (found is not None) is twin
    if found is not None:
        assert found.key == (str(first.path), first.size, first.mtime_ns)
        assert found.sop_instance_uid == "1.2.3"


def test_first_registration_wins_and_memory_is_bounded() -> None:
    index = InodeIndex(limit=3)
    index.register(ready("a", 1))
    index.register(ready("b", 1))
    found = index.first_name(ready("c", 1))
    assert found is not None and found.key[0] == "/in/a"
    for ino in range(2, 6):
        index.register(ready(f"x{ino}", ino))
    assert len(index) == 3
    assert index.first_name(ready("c", 1)) is None  # the oldest was forgotten
    index.register(ReadyFile(ROOT / "plain", 1, 1, ROOT))  # no inode known: never tracked
    assert len(index) == 3
