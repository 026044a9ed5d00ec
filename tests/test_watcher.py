"""Tests for forwarder.watcher: real files, real inotify/polling events, real threads.

Leaked threads fail a test through conftest's autouse ``no_leaked_threads``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent
from watchdog.observers.inotify_move_event_grouper import PathedInotifyEvent

from forwarder.inotify import _MoveGrouper
from forwarder.watcher import THREAD_NAME, ReadyFile, Watcher, WatchRootError

SETTLE = 0.2
"""Short settle time to keep the tests fast."""

# watchdog 7.1 warns when a brand-new nested folder is watched twice (seen; harmless).
pytestmark = pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.01) -> bool:
    """Poll `predicate` until it is true or `timeout` passes; return whether it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        threading.Event().wait(interval)


def write(path: Path, data: bytes = b"x" * 1000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


class Collector:
    """The `on_ready` callback: records every ReadyFile; can be told to fail for some names."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[ReadyFile] = []
        self.fail_names: set[str] = set()

    def __call__(self, ready: ReadyFile) -> None:
        if ready.path.name in self.fail_names:
            self.fail_names.discard(ready.path.name)
            raise RuntimeError("outbox full")
        with self.lock:
            self.items.append(ready)

    def names(self) -> Counter[str]:
        with self.lock:
            return Counter(r.path.name for r in self.items)

    def get(self, name: str) -> list[ReadyFile]:
        with self.lock:
            return [r for r in self.items if r.path.name == name]

    def has(self, name: str) -> Callable[[], bool]:
        return lambda: bool(self.get(name))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


MakeWatcher = Callable[..., tuple[Watcher, Collector]]


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return Path(os.path.realpath(path))


@pytest.fixture
def make_watcher(inbox: Path) -> Iterator[MakeWatcher]:
    made: list[Watcher] = []

    def make(*roots: Path, start: bool = True, **kwargs: Any) -> tuple[Watcher, Collector]:
        collector = Collector()
        kwargs.setdefault("settle_seconds", SETTLE)
        kwargs.setdefault("rescan_seconds", 3600.0)
        clock = kwargs.get("clock")
        if isinstance(clock, FakeClock):  # mtimes are compared with a wall clock that follows it
            started = time.time()
            kwargs.setdefault("wall_clock", lambda: started + clock())
        watcher = Watcher(list(roots) or [inbox], collector, **kwargs)
        made.append(watcher)
        if start:
            watcher.start()
        return watcher, collector

    yield make
    for watcher in made:
        watcher.stop()


def flush(inbox: Path, collector: Collector, name: str = "zz-sentinel.dcm") -> None:
    """Drop a file and wait until it is reported: every earlier event has been handled."""
    write(inbox / name)
    assert wait_for(collector.has(name), 5), "sentinel file never reported"


# -- inotify, threaded ---------------------------------------------------------------------------


def test_write_and_close_in_existing_folder(make_watcher: MakeWatcher, inbox: Path) -> None:
    (inbox / "study").mkdir()
    watcher, got = make_watcher()
    path = write(inbox / "study" / "a.dcm", b"d" * 4321)
    assert wait_for(got.has("a.dcm"), 5)
    flush(inbox, got)
    (ready,) = got.get("a.dcm")
    st = path.stat()
    assert ready == ReadyFile(
        path, 4321, st.st_mtime_ns, inbox, dev=st.st_dev, ino=st.st_ino, links=1
    )
    assert ready.relative == Path("study/a.dcm")
    assert watcher.pending == 0
    # Read, chmod-ed, touched to the same mtime: unchanged, so not reported again.
    path.read_bytes()
    path.chmod(0o600)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    flush(inbox, got, "zz-sentinel2.dcm")
    assert got.names()["a.dcm"] == 1


def test_write_then_rename_from_part(make_watcher: MakeWatcher, inbox: Path) -> None:
    _, got = make_watcher()
    part = inbox / "b.dcm.part"
    with open(part, "wb") as f:
        f.write(b"p" * 1000)
        f.flush()
        assert not wait_for(lambda: got.items, 2 * SETTLE)
        f.write(b"p" * 1000)
    assert not wait_for(lambda: got.items, 2 * SETTLE)  # closed, but still under .part
    part.rename(inbox / "b.dcm")
    assert wait_for(got.has("b.dcm"), 5)
    flush(inbox, got)
    assert got.names() == Counter({"b.dcm": 1, "zz-sentinel.dcm": 1})
    assert got.get("b.dcm")[0].size == 2000


def test_slow_writer_is_reported_once_after_close(make_watcher: MakeWatcher, inbox: Path) -> None:
    watcher, got = make_watcher(unclosed_grace_seconds=30.0)
    path = inbox / "slow.dcm"
    with open(path, "wb") as f:
        for _ in range(5):  # ~1.5 s in pieces, each pause longer than the settle time
            f.write(b"s" * 10_000)
            f.flush()
            assert not wait_for(got.has("slow.dcm"), 1.5 * SETTLE), "reported while open"
        f.write(b"end")
    assert wait_for(got.has("slow.dcm"), 5)
    flush(inbox, got)
    (ready,) = got.get("slow.dcm")
    assert ready.size == 50_003 == path.stat().st_size
    assert watcher.pending == 0


def test_unclosed_file_is_reported_after_the_grace(make_watcher: MakeWatcher, inbox: Path) -> None:
    _, got = make_watcher(unclosed_grace_seconds=1.0)
    with open(inbox / "stuck.dcm", "wb") as f:  # a writer that never closes (hung, or lost close)
        f.write(b"x" * 100)
        f.flush()
        start = time.monotonic()
        assert wait_for(got.has("stuck.dcm"), 5)
        assert time.monotonic() - start >= 0.9
        assert got.get("stuck.dcm")[0].size == 100


def _aged(path: Path, seconds: float = 3600.0) -> Path:
    """Give `path` an mtime `seconds` in the past (as `cp -p` or `rsync -t` would)."""
    old = time.time() - seconds
    os.utime(path, (old, old))
    return path


def test_file_older_than_the_settle_time_is_ready_at_once(
    make_watcher: MakeWatcher, inbox: Path, tmp_path: Path
) -> None:
    _aged(write(inbox / "there-at-start.dcm"))
    _, got = make_watcher(settle_seconds=60.0)
    assert wait_for(got.has("there-at-start.dcm"), 5), "start-up scan held an old file back"
    _aged(write(tmp_path / "old.dcm"))
    write(tmp_path / "fresh.dcm")
    (tmp_path / "fresh.dcm").rename(inbox / "fresh.dcm")
    (tmp_path / "old.dcm").rename(inbox / "old.dcm")  # written an hour ago, then moved in
    assert wait_for(got.has("old.dcm"), 5)
    assert "fresh.dcm" not in got.names(), "a file written just now must wait out the settle"
    copied = _aged(write(inbox / "copied.dcm"))  # cp -p: written, closed, mtime set back
    assert wait_for(got.has("copied.dcm"), 5)
    assert got.get("copied.dcm")[0].mtime_ns == copied.stat().st_mtime_ns


def test_old_mtime_is_not_trusted_while_being_written(
    make_watcher: MakeWatcher, inbox: Path
) -> None:
    _, got = make_watcher(unclosed_grace_seconds=30.0)
    path = inbox / "sticky.dcm"
    with open(path, "wb") as f:  # a writer that set an old mtime first (SMB "sticky" times)
        f.write(b"a" * 1000)
        f.flush()
        _aged(path)
        f.write(b"b" * 1000)
        f.flush()
        _aged(path)
        assert not wait_for(got.has("sticky.dcm"), 5 * SETTLE), "reported while open"
    assert wait_for(got.has("sticky.dcm"), 5)
    assert got.get("sticky.dcm")[0].size == 2000


def test_old_mtime_is_not_trusted_for_a_file_seen_changing(
    make_watcher: MakeWatcher, inbox: Path
) -> None:
    # Found by a scan (its events lost, as in a brand-new folder), growing, and its mtime set
    # back after every write: it must look the same twice before its mtime counts.
    watcher, got = make_watcher(start=False, clock=FakeClock())
    path = _aged(write(inbox / "growing.dcm", b"1"))
    delay = watcher.loop(0.0)  # the start-up scan: a second look soon
    assert 0 < delay <= SETTLE
    now = delay
    for i in range(5):
        with open(path, "ab") as f:
            f.write(b"1")
        _aged(path, 3600.0 + i)
        now += watcher.loop(now)
        assert not got.items, f"reported while growing (look {i + 1})"
    now += watcher.loop(now)  # unchanged since the last look: now its old mtime counts
    assert got.get("growing.dcm")[0].size == 6


def test_whole_second_mtimes_are_not_trusted(
    make_watcher: MakeWatcher, inbox: Path, tmp_path: Path
) -> None:
    # A coarse clock (vfat, some network file systems) cannot tell a file written just now
    # from one a second old: such a file waits the settle time like a new one.
    _, got = make_watcher(settle_seconds=1.0)
    path = write(tmp_path / "coarse.dcm")
    whole = (int(time.time()) - 3600) * 1_000_000_000
    os.utime(path, ns=(whole, whole))
    start = time.monotonic()
    path.rename(inbox / "coarse.dcm")
    assert wait_for(got.has("coarse.dcm"), 5)
    assert time.monotonic() - start >= 0.9


@pytest.mark.parametrize("how", ["poll", "setting off"])
def test_mtime_age_is_not_used(
    make_watcher: MakeWatcher, inbox: Path, tmp_path: Path, how: str
) -> None:
    # poll: a network mount's mtimes come from the server's clock, so only what the poller
    # saw stay unchanged counts; settle_from_mtime = false: the operator asked for that.
    kwargs: dict[str, Any] = (
        {"poll": True, "poll_interval": 0.1} if how == "poll" else {"settle_from_mtime": False}
    )
    _, got = make_watcher(settle_seconds=1.0, **kwargs)
    _aged(write(tmp_path / "old.dcm")).rename(inbox / "old.dcm")
    start = time.monotonic()
    assert wait_for(got.has("old.dcm"), 5)
    assert time.monotonic() - start >= 0.9


def test_brand_new_nested_folders(make_watcher: MakeWatcher, inbox: Path) -> None:
    # Files written right after their folder is made lose their close events (seen: 5-32 of
    # these 250 in each run); some get no event at all but watchdog's synthetic Created.
    _, got = make_watcher()
    sizes = {}
    for k in range(10):
        folder = inbox / "new" / f"s{k}" / "1"
        folder.mkdir(parents=True)
        for i in range(25):
            name = f"f{k}-{i:02}.dcm"
            sizes[name] = 1000 + 25 * k + i
            write(folder / name, b"z" * sizes[name])
    assert wait_for(lambda: len(got.names()) >= 250, 20), f"only {len(got.names())} reported"
    flush(inbox, got)
    names = got.names()
    assert names.pop("zz-sentinel.dcm") == 1
    assert names == Counter(dict.fromkeys(sizes, 1))
    assert all(r.size == sizes[r.path.name] for r in got.items if r.path.name in sizes)


def test_files_present_before_start(make_watcher: MakeWatcher, inbox: Path) -> None:
    write(inbox / "old1.dcm")
    write(inbox / "a" / "b" / "old2.dcm")
    watcher, got = make_watcher()
    assert watcher.pending == 2  # the start-up scan ran inside start()
    assert wait_for(lambda: len(got.items) == 2, 5)
    flush(inbox, got)
    assert got.names() == Counter({"old1.dcm": 1, "old2.dcm": 1, "zz-sentinel.dcm": 1})


def test_ignored_names_are_never_tracked(make_watcher: MakeWatcher, inbox: Path) -> None:
    watcher, got = make_watcher()
    for rel in (".hidden", "x.part", "y.tmp", "z.partial", ".dot/inside.dcm", "s/.dot2/d/f.dcm"):
        write(inbox / rel)
    flush(inbox, got)
    assert got.names() == Counter({"zz-sentinel.dcm": 1})
    assert watcher.pending == 0


def test_ignored_names_at_scan(make_watcher: MakeWatcher, inbox: Path) -> None:
    for rel in (".hidden", "x.part", "y.tmp", "z.partial", ".dot/inside.dcm", "s/.dot2/d/f.dcm"):
        write(inbox / rel)
    write(inbox / "s" / "keep.dcm")
    watcher, got = make_watcher(start=False, ignore=(".*", "*.part", "*.tmp", "*.partial"))
    watcher.loop(0.0)
    assert watcher.pending == 1
    watcher.loop(SETTLE)
    assert got.names() == Counter({"keep.dcm": 1})


def test_file_and_folder_moved_in_from_outside(
    make_watcher: MakeWatcher, inbox: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    write(outside / "moved.dcm", b"m" * 777)
    write(outside / "study" / "s1.dcm")
    write(outside / "study" / "s2.dcm")
    _, got = make_watcher()
    (outside / "moved.dcm").rename(inbox / "moved.dcm")  # inotify: only Created
    (outside / "study").rename(inbox / "study")
    assert wait_for(lambda: {"moved.dcm", "s1.dcm", "s2.dcm"} <= set(got.names()), 5)
    flush(inbox, got)
    assert got.names() == Counter({"moved.dcm": 1, "s1.dcm": 1, "s2.dcm": 1, "zz-sentinel.dcm": 1})
    assert got.get("moved.dcm")[0].size == 777


def test_changed_file_is_reported_again(make_watcher: MakeWatcher, inbox: Path) -> None:
    _, got = make_watcher()
    path = write(inbox / "c.dcm", b"1" * 100)
    assert wait_for(got.has("c.dcm"), 5)
    with open(path, "ab") as f:
        f.write(b"2" * 100)
    assert wait_for(lambda: len(got.get("c.dcm")) == 2, 5)
    assert [r.size for r in got.get("c.dcm")] == [100, 200]


def test_deleted_file_is_dropped(make_watcher: MakeWatcher, inbox: Path) -> None:
    # Deletions in place are not asked of the kernel (the daemon's own are a third of all
    # events): a deleted file being tracked is dropped when the tracker next looks at it.
    watcher, got = make_watcher(unclosed_grace_seconds=1.0)
    path = inbox / "d.dcm"
    with open(path, "wb") as f:  # held open: tracked, not ready
        f.write(b"x" * 100)
        f.flush()
        assert wait_for(lambda: watcher.pending == 1, 5)
        path.unlink()
        assert wait_for(lambda: watcher.pending == 0, 5)
    assert not got.items
    # A reported file deleted in place is forgotten by the next full rescan (the daemon
    # calls `forget` itself): the same file dropped again is then reported again.
    write(path, b"y" * 100)
    assert wait_for(got.has("d.dcm"), 5)
    mtime_ns = path.stat().st_mtime_ns
    path.unlink()
    watcher.rescan()
    flush(inbox, got)
    write(path, b"y" * 100)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    assert wait_for(lambda: len(got.get("d.dcm")) == 2, 5)


def test_deletions_in_place_are_left_out_of_the_inotify_mask(
    make_watcher: MakeWatcher, inbox: Path
) -> None:
    watcher, _ = make_watcher()
    emitters = list(watcher._observer.emitters) if watcher._observer else []
    assert emitters, "no inotify emitter"
    for emitter in emitters:  # guards the optimisations against a watchdog that changed shape
        mask = emitter.get_event_mask_from_filter()
        assert not mask & InotifyConstants.IN_DELETE
        assert mask & InotifyConstants.IN_MOVED_FROM and mask & InotifyConstants.IN_CLOSE_WRITE
        assert type(emitter._inotify._move_event_grouper).__name__ == "_MoveGrouper"


def test_move_grouper_pairs_moves_and_skips_the_search_for_moves_from_outside() -> None:
    def ev(mask: int, cookie: int, name: bytes) -> PathedInotifyEvent:
        return PathedInotifyEvent(InotifyEvent(1, mask, cookie, name), b"/in/" + name)

    g = _MoveGrouper()
    g.put_event(ev(InotifyConstants.IN_MOVED_TO, 7, b"from-outside"))  # no search: none queued
    g.put_event(ev(InotifyConstants.IN_MOVED_FROM, 8, b"old"))
    assert g.get_queued_moved_from_event(8) is not None
    g.put_event(ev(InotifyConstants.IN_MOVED_TO, 8, b"new"))  # paired with "old"
    g.put_event(ev(InotifyConstants.IN_CLOSE_WRITE, 0, b"written"))
    first, second, third = g.read_event(), g.read_event(), g.read_event()
    assert isinstance(first, PathedInotifyEvent) and first.path == b"/in/from-outside"
    assert isinstance(second, tuple) and [e.path for e in second] == [b"/in/old", b"/in/new"]
    assert isinstance(third, PathedInotifyEvent) and third.path == b"/in/written"
    assert g._froms == 0 and g.get_queued_moved_from_event(8) is None
    g.close()


def test_moves_inside_the_tree_are_paired_amid_a_burst_from_outside(
    make_watcher: MakeWatcher, inbox: Path, tmp_path: Path
) -> None:
    # Renames from outside have no IN_MOVED_FROM to pair with (the grouper skips its search
    # for them); renames inside the tree still come out as moves: the file is reported at its
    # new name, once, and not at the old one.
    _, got = make_watcher()
    for i in range(20):
        write(inbox / "a" / f"in-{i}.dcm")
    assert wait_for(lambda: len(got.items) == 20, 5)
    outside = tmp_path / "outside"
    for i in range(200):
        write(outside / f"out-{i}.dcm")
    (inbox / "b").mkdir()
    for i in range(200):
        (outside / f"out-{i}.dcm").rename(inbox / f"out-{i}.dcm")
        if i % 10 == 0:
            (inbox / "a" / f"in-{i // 10}.dcm").rename(inbox / "b" / f"moved-{i // 10}.dcm")
    assert wait_for(lambda: len(got.items) == 240, 10), f"{len(got.items)} reported"
    flush(inbox, got)
    names = got.names()
    assert names.pop("zz-sentinel.dcm") == 1
    assert set(names.values()) == {1}
    moved = [r for r in got.items if r.path.name.startswith("moved-")]
    assert sorted(r.relative.parent.name for r in moved) == ["b"] * 20


def test_folder_moved_out_is_dropped(
    make_watcher: MakeWatcher, inbox: Path, tmp_path: Path
) -> None:
    watcher, _ = make_watcher()
    with open(write(inbox / "study" / "x.dcm").parent / "open.dcm", "wb") as f:
        f.write(b"x")
        f.flush()
        assert wait_for(lambda: watcher.pending == 2, 5)
        (inbox / "study").rename(tmp_path / "study")  # inotify: only the folder's move-from
        assert wait_for(lambda: watcher.pending == 0, 5)


def test_forget_lets_a_redropped_file_be_reported_again(
    make_watcher: MakeWatcher, inbox: Path, tmp_path: Path
) -> None:
    watcher, got = make_watcher()
    path = write(inbox / "f.dcm")
    assert wait_for(got.has("f.dcm"), 5)
    # The daemon archives the file outside the tree and forgets it; the same file comes back.
    archived = tmp_path / "f.dcm"
    path.rename(archived)
    watcher.forget(path)
    archived.rename(path)
    assert wait_for(lambda: len(got.get("f.dcm")) == 2, 5)
    assert got.get("f.dcm")[0] == got.get("f.dcm")[1]


def test_a_file_deleted_in_place_and_dropped_again_is_reported_again(
    make_watcher: MakeWatcher, inbox: Path, tmp_path: Path
) -> None:
    # Deletions in place are not seen; the new name is. No forget: nobody told the watcher.
    _, got = make_watcher()
    path = write(inbox / "f.dcm")
    assert wait_for(got.has("f.dcm"), 5)
    st = path.stat()
    spare = tmp_path / "spare.dcm"
    spare.write_bytes(path.read_bytes())
    os.utime(spare, ns=(st.st_atime_ns, st.st_mtime_ns))
    path.unlink()
    write(path, spare.read_bytes())  # copied back in place, times kept (cp -p)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    spare.rename(inbox / "g.dcm")  # and renamed into place over a reported name (rsync -t)
    assert wait_for(got.has("g.dcm"), 5)
    (inbox / "g.dcm").rename(path)
    assert wait_for(lambda: len(got.get("f.dcm")) == 3, 5), got.get("f.dcm")
    assert len({(r.size, r.mtime_ns) for r in got.get("f.dcm")}) == 1  # the same size and mtime
    flush(inbox, got)
    assert got.names()["f.dcm"] == 3


def test_on_ready_errors_are_logged_and_the_tracker_lives_on(
    make_watcher: MakeWatcher, inbox: Path, caplog: pytest.LogCaptureFixture
) -> None:
    watcher, got = make_watcher()
    got.fail_names.add("bad.dcm")
    with caplog.at_level(logging.ERROR, logger="forwarder.watcher"):
        write(inbox / "bad.dcm")
        assert wait_for(lambda: any("bad.dcm" in r.getMessage() for r in caplog.records), 5)
        flush(inbox, got)
    assert "bad.dcm" not in got.names()
    watcher.rescan()  # not remembered as reported: the next rescan offers it again
    assert wait_for(got.has("bad.dcm"), 5)


def test_polling_mode(make_watcher: MakeWatcher, inbox: Path) -> None:
    watcher, got = make_watcher(poll=True, poll_interval=0.1)
    (inbox / "sub").mkdir()
    path = write(inbox / "sub" / "p.dcm", b"p" * 500)
    part = write(inbox / "q.dcm.part", b"q" * 600)
    part.rename(inbox / "q.dcm")
    assert wait_for(lambda: {"p.dcm", "q.dcm"} <= set(got.names()), 5)
    flush(inbox, got)
    assert got.names() == Counter({"p.dcm": 1, "q.dcm": 1, "zz-sentinel.dcm": 1})
    assert got.get("p.dcm")[0].mtime_ns == path.stat().st_mtime_ns
    names = {t.name for t in threading.enumerate()}
    assert f"{THREAD_NAME}-inotify" not in names
    watcher.stop()


def test_watchdogs_shutdown_race_is_not_reported_as_an_error(
    make_watcher: MakeWatcher, caplog: pytest.LogCaptureFixture
) -> None:
    make_watcher()  # started: installs the filter on watchdog's logger
    inotify_log = logging.getLogger("watchdog.observers.inotify")
    with caplog.at_level(logging.ERROR, logger="watchdog.observers.inotify"):
        inotify_log.error("InotifyEmitter.queue_events() called when the thread is inactive")
        inotify_log.error("a real inotify problem")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["a real inotify problem"]


def test_stop_joins_every_thread(make_watcher: MakeWatcher) -> None:
    before = set(threading.enumerate())
    watcher, _ = make_watcher()
    ours = {t.name for t in set(threading.enumerate()) - before}
    assert ours == {
        THREAD_NAME,
        f"{THREAD_NAME}-observer",
        f"{THREAD_NAME}-emitter",
        f"{THREAD_NAME}-inotify",
    }
    watcher.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith(THREAD_NAME)]
    assert set(threading.enumerate()) <= before
    watcher.stop()  # idempotent


def test_idle_watcher_uses_no_cpu(make_watcher: MakeWatcher, inbox: Path) -> None:
    watcher, got = make_watcher()
    flush(inbox, got)
    loops = 0
    real_loop = watcher.loop

    def counting_loop(now: float) -> float:
        nonlocal loops
        loops += 1
        return real_loop(now)

    watcher.loop = counting_loop  # type: ignore[method-assign]
    watcher.rescan()  # the tracker wakes once, then picks up the wrapper
    assert wait_for(lambda: loops == 1, 5)
    cpu = time.process_time()
    assert not wait_for(lambda: loops > 1, 1.0)
    assert time.process_time() - cpu < 0.05
    assert watcher.pending == 0


def test_missing_root_is_created(make_watcher: MakeWatcher, tmp_path: Path) -> None:
    root = tmp_path / "not" / "yet"
    _, got = make_watcher(root)
    assert root.is_dir()
    write(root / "n.dcm")
    assert wait_for(got.has("n.dcm"), 5)
    assert got.get("n.dcm")[0].root == root


def test_symlinked_root_reports_paths_under_the_root_as_given(
    make_watcher: MakeWatcher, tmp_path: Path
) -> None:
    real = tmp_path / "real-inbox"
    write(real / "before.dcm")
    link = tmp_path / "inbox-link"
    link.symlink_to(real)
    watcher, got = make_watcher(link)
    assert watcher.roots == [link]
    write(real / "sub" / "after.dcm")
    assert wait_for(lambda: len(got.items) == 2, 5)
    assert {r.path for r in got.items} == {link / "before.dcm", link / "sub" / "after.dcm"}
    assert {r.root for r in got.items} == {link}
    (link / "sub" / "after.dcm").unlink()
    watcher.forget(link / "before.dcm")
    write(link / "sub" / "after.dcm")
    assert wait_for(lambda: len(got.items) == 3, 5)


def test_uncreatable_root_raises_naming_it(make_watcher: MakeWatcher, tmp_path: Path) -> None:
    blocker = write(tmp_path / "file")
    with pytest.raises(WatchRootError, match=str(blocker / "sub")):
        make_watcher(blocker / "sub")
    with pytest.raises(WatchRootError, match=f"{blocker} exists and is not a folder"):
        make_watcher(blocker)


# -- the tracker driven by hand: `loop(now)` with a fake clock, no threads -----------------------


def test_rescan_catches_a_missed_file(make_watcher: MakeWatcher, inbox: Path) -> None:
    clock = FakeClock()
    watcher, got = make_watcher(start=False, clock=clock, rescan_seconds=60.0)
    write(inbox / "early.dcm")
    assert watcher.loop(0.0) == pytest.approx(SETTLE)  # first call: start-up scan
    write(inbox / "missed.dcm")  # no observer: its events are lost
    assert watcher.loop(SETTLE) == pytest.approx(60.0 - SETTLE)  # idle until the rescan
    assert got.names() == Counter({"early.dcm": 1})

    watcher.rescan()
    assert watcher.loop(1.0) == pytest.approx(SETTLE)
    assert watcher.pending == 1
    watcher.loop(1.0 + SETTLE / 2)
    assert "missed.dcm" not in got.names()
    # Reported; nothing to do until the next periodic rescan, 60 s after the last one.
    assert watcher.loop(1.0 + SETTLE) == pytest.approx(60.0 - SETTLE)
    assert got.names() == Counter({"early.dcm": 1, "missed.dcm": 1})

    # The periodic rescan finds a file dropped later without being asked to.
    write(inbox / "later.dcm")
    watcher.loop(60.0)
    assert watcher.pending == 0
    watcher.loop(61.0)
    watcher.loop(61.0 + SETTLE)
    assert got.names() == Counter({"early.dcm": 1, "missed.dcm": 1, "later.dcm": 1})


def test_rescan_forgets_vanished_files_and_forget_resets_memory(
    make_watcher: MakeWatcher, inbox: Path
) -> None:
    watcher, got = make_watcher(start=False, clock=FakeClock())
    path = write(inbox / "r.dcm")
    watcher.loop(0.0)
    watcher.loop(SETTLE)
    assert got.names() == Counter({"r.dcm": 1})
    watcher.rescan()
    watcher.loop(1.0)
    watcher.loop(2.0)
    assert got.names() == Counter({"r.dcm": 1}), "unchanged: not reported twice"

    watcher.forget(path)  # the file is still there: the next scan reports it again
    watcher.rescan()
    watcher.loop(3.0)
    watcher.loop(3.0 + SETTLE)
    assert got.names() == Counter({"r.dcm": 2})

    # Gone at a rescan: memory dropped, so the same file (same size and mtime) comes back.
    st = path.stat()
    data = path.read_bytes()
    path.unlink()
    watcher.rescan()
    watcher.loop(4.0)
    write(path, data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    watcher.rescan()
    watcher.loop(5.0)
    watcher.loop(5.0 + SETTLE)
    assert got.names() == Counter({"r.dcm": 3})


def test_a_file_that_keeps_changing_is_not_ready(make_watcher: MakeWatcher, inbox: Path) -> None:
    # the mtimes are made up (1970): judged by what the tracker sees change, not by their age
    watcher, got = make_watcher(start=False, clock=FakeClock(), settle_from_mtime=False)
    path = write(inbox / "grow.dcm", b"1")
    watcher.loop(0.0)
    for i in range(1, 6):
        with open(path, "ab") as f:
            f.write(b"1")
        os.utime(path, ns=(i, i))  # mtime changes on every look
        watcher.loop(i * SETTLE)
        assert not got.items
    watcher.loop(6 * SETTLE)
    assert got.get("grow.dcm")[0].size == 6


def test_symlinks_are_skipped_with_one_warning(
    make_watcher: MakeWatcher, inbox: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = write(tmp_path / "elsewhere" / "t.dcm", b"t" * 300)
    write(tmp_path / "elsewhere" / "via-dir.dcm")
    write(inbox / ".hidden" / "h.dcm")
    (inbox / "link.dcm").symlink_to(target)
    (inbox / "inside.dcm").symlink_to(inbox / ".hidden" / "h.dcm")
    (inbox / "loop").symlink_to(inbox)  # would loop forever if followed
    (inbox / "dirlink").symlink_to(tmp_path / "elsewhere")
    (inbox / "broken.dcm").symlink_to(tmp_path / "nothing")
    write(inbox / "plain.dcm")
    watcher, got = make_watcher(start=False, clock=FakeClock())
    with caplog.at_level(logging.WARNING, logger="forwarder.watcher"):
        watcher.loop(0.0)
        watcher.loop(SETTLE)
        watcher.rescan()
        watcher.loop(SETTLE * 2)
    assert got.names() == Counter({"plain.dcm": 1})
    warned = [r.getMessage() for r in caplog.records if "skipped symlink" in r.getMessage()]
    names = ("link.dcm", "inside.dcm", "loop", "dirlink", "broken.dcm")
    assert sorted(m.split()[2].rsplit("/", 1)[1] for m in warned) == sorted(names)  # once each
    assert all("watch.follow_symlinks is false" in m for m in warned)


def test_follow_symlinks_only_to_files_inside_the_watched_folders(
    make_watcher: MakeWatcher, inbox: Path, tmp_path: Path
) -> None:
    target = write(tmp_path / "elsewhere" / "t.dcm", b"t" * 300)
    inside = write(inbox / ".hidden" / "h.dcm", b"h" * 200)
    (inbox / "link.dcm").symlink_to(target)
    (inbox / "inside.dcm").symlink_to(inside)
    (inbox / "relative.dcm").symlink_to(Path(".hidden") / "h.dcm")
    (inbox / "loop").symlink_to(inbox)
    (inbox / "sub").mkdir()
    watcher, got = make_watcher(start=False, clock=FakeClock(), follow_symlinks=True)
    watcher.loop(0.0)
    watcher.loop(SETTLE)
    assert got.names() == Counter({"inside.dcm": 1, "relative.dcm": 1})
    for ready in got.items:
        assert ready.via_symlink and ready.size == 200
        assert (ready.dev, ready.ino) == (inside.stat().st_dev, inside.stat().st_ino)


def test_unreadable_folder_warns_once(
    make_watcher: MakeWatcher,
    inbox: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    locked = inbox / "locked"
    write(locked / "l.dcm")
    write(inbox / "ok.dcm")
    real_scandir = os.scandir

    def scandir(path: str) -> Any:  # chmod 0 does not stop root, so refuse it here
        if path == str(locked):
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    watcher, got = make_watcher(start=False, clock=FakeClock())
    with caplog.at_level(logging.WARNING, logger="forwarder.watcher"):
        watcher.loop(0.0)
        watcher.loop(SETTLE)
        watcher.rescan()
        watcher.loop(1.0)
    warnings = [r for r in caplog.records if "cannot read folder" in r.getMessage()]
    assert len(warnings) == 1
    assert str(locked) in warnings[0].getMessage()
    assert got.names() == Counter({"ok.dcm": 1})


def test_non_recursive_watches_the_top_level_only(make_watcher: MakeWatcher, inbox: Path) -> None:
    write(inbox / "top.dcm")
    write(inbox / "sub" / "deep.dcm")
    watcher, got = make_watcher(start=False, clock=FakeClock(), recursive=False)
    watcher.loop(0.0)
    watcher.loop(SETTLE)
    assert got.names() == Counter({"top.dcm": 1})


def test_started_once(make_watcher: MakeWatcher) -> None:
    watcher, _ = make_watcher()
    with pytest.raises(RuntimeError):
        watcher.start()
    watcher.stop()
    with pytest.raises(RuntimeError):
        watcher.start()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Watcher([], lambda r: None)
    with pytest.raises(ValueError):
        Watcher([Path("/tmp")], lambda r: None, rescan_seconds=0)
