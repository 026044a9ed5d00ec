"""What the forwarder borrows from its libraries beyond their public API, checked by name.

pyproject.toml pins each library to the minor versions tested. When a new release is let in,
these tests say which borrowed piece moved, instead of a daemon that silently stops seeing
files or a send path that stalls.
"""

from __future__ import annotations

import inspect
import logging
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _dependencies() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out: dict[str, str] = {}
    for dep in project["dependencies"]:
        name = dep.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip()
        out[name] = dep
    return out


@pytest.mark.parametrize(
    ("name", "upper"),
    [
        ("pynetdicom", "<3.1"),
        ("watchdog", "<8"),
        ("pydicom", "<3.1"),
        ("httpx", "<0.29"),
        ("crc32c", "<3"),
    ],
)
def test_dependencies_have_an_upper_bound(name: str, upper: str) -> None:
    deps = _dependencies()
    assert upper in deps[name], f"pyproject.toml: {deps[name]!r} needs the bound {upper}"


def _major_minor(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


@pytest.mark.parametrize(
    ("name", "tested"),
    [
        ("pynetdicom", (3, 0)),
        ("watchdog", (7, 1)),
        ("pydicom", (3, 0)),
        ("httpx", (0, 28)),
        ("crc32c", (2, 9)),
    ],
)
def test_installed_versions_are_the_tested_ones(name: str, tested: tuple[int, int]) -> None:
    got = _major_minor(version(name))
    assert got[0] == tested[0] and got >= tested, (
        f"{name} {version(name)} is installed; the code was tested with {tested[0]}.{tested[1]}"
    )


def _has(obj: Any, attr: str, what: str) -> Any:
    assert hasattr(obj, attr), f"{what}: {getattr(obj, '__name__', obj)}.{attr} is gone"
    return getattr(obj, attr)


def _params(func: Any) -> list[str]:
    return list(inspect.signature(func).parameters)


# forwarder/inotify.py subclasses watchdog's inotify emitter, watch group and move grouper.
def test_watchdog_inotify_emitter_shape() -> None:
    from watchdog.observers import Observer
    from watchdog.observers.api import BaseObserver
    from watchdog.observers.inotify import InotifyEmitter

    what = "forwarder.inotify._Emitter overrides it"
    _has(InotifyEmitter, "get_event_mask_from_filter", what)
    queue = _has(InotifyEmitter, "build_and_queue_event", what)
    assert "full_events" in _params(queue), "InotifyEmitter.build_and_queue_event(full_events=)"
    _has(InotifyEmitter, "on_thread_start", what)
    src = inspect.getsource(InotifyEmitter.on_thread_start)
    for piece in ("self._inotify", "self._inotify_fd", "InotifyWatchGroup"):
        assert piece in src, f"InotifyEmitter.on_thread_start no longer uses {piece}"
    assert "InotifyEmitter" in inspect.getsource(Observer.__init__)
    assert "self._emitter_class" in inspect.getsource(BaseObserver.__init__), (
        "watchdog's observers no longer keep their emitter class in _emitter_class"
    )


def test_watchdog_watch_group_and_move_grouper_shape() -> None:
    from watchdog.observers.inotify import InotifyWatchGroup
    from watchdog.observers.inotify_move_event_grouper import (
        InotifyMoveEventGrouper,
        PathedInotifyEvent,
    )

    what = "forwarder.inotify._WatchGroup sets _move_event_grouper before its __post_init__"
    _has(InotifyWatchGroup, "__post_init__", what)
    fields = InotifyWatchGroup.__dataclass_fields__
    assert "_move_event_grouper" in fields and not fields["_move_event_grouper"].init, what
    params = _params(InotifyWatchGroup)
    assert params[0] == "_inotify_fd", "InotifyWatchGroup(fd, ...): the fd is no longer first"
    for name in ("path", "is_recursive", "event_mask", "follow_symlink"):
        assert name in params, f"InotifyWatchGroup({name}=) is gone"
    for method in (
        "put_event",
        "_group_moved_to_event",
        "get_queued_moved_from_event",
        "read_event",
        "discard_pending_events",
    ):
        _has(InotifyMoveEventGrouper, method, "forwarder.inotify._MoveGrouper overrides it")
    grouper = InotifyMoveEventGrouper()
    queue = _has(grouper, "_queue", "forwarder.inotify._MoveGrouper puts into it")
    assert "delay" in _params(queue.put), "the grouper's queue lost put(event, delay=)"
    assert "ev" in PathedInotifyEvent._fields, "PathedInotifyEvent.ev is gone"


def test_watchdog_shutdown_message_still_filtered() -> None:
    """forwarder.inotify._ShutdownNoise drops one ERROR line by its text and logger name."""
    from watchdog.observers import inotify

    src = inspect.getsource(inotify)
    assert "called when the thread is inactive" in src or "thread is inactive" in src, (
        "watchdog changed the shutdown-race message that forwarder.inotify._ShutdownNoise filters"
    )
    assert logging.getLogger(inotify.__name__).name == "watchdog.observers.inotify"


# forwarder/sender.py converts files with pydicom (only when a peer refuses the file's syntax).
def test_pydicom_conversion_api_shape() -> None:
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import correct_ambiguous_vr, write_dataset

    assert "generate_instance_uid" in _params(Dataset.decompress), (
        "Dataset.decompress(generate_instance_uid=) is gone: decompressed files would get a "
        "new SOP Instance UID"
    )
    assert _params(correct_ambiguous_vr)[:2] == ["ds", "is_little_endian"]
    assert _params(write_dataset)[:2] == ["fp", "dataset"]
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = True, True


def test_the_send_path_imports_no_pynetdicom() -> None:
    """The association is ours (forwarder.association): no pynetdicom internals to pin, and
    `forwarder send` starts without importing pynetdicom or pydicom."""
    import subprocess
    import sys

    code = (
        "import sys, forwarder.commands.send, forwarder.sender, forwarder.association;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pynetdicom', 'pydicom')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_crc32c_is_the_castagnoli_crc_and_goes_on_from_a_value() -> None:
    """Ack log records written by one version are checked by the next: the same CRC, and the
    same CRC when the bytes come in pieces (`forwarder.acklog.AckSink.write`)."""
    import crc32c

    assert crc32c.crc32c(b"123456789") == 0xE3069283  # the check value of CRC-32C
    data = bytes(range(256)) * 700
    first = crc32c.crc32c(data[:1000])
    assert crc32c.crc32c(memoryview(bytearray(data))[1000:], first) == crc32c.crc32c(data)
