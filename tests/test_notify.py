"""Tests for forwarder.notify: datagrams on a real NOTIFY_SOCKET, both send paths."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from forwarder.notify import Notifier

try:
    import systemd.daemon  # noqa: F401

    HAVE_SYSTEMD_PYTHON = True
except ImportError:
    HAVE_SYSTEMD_PYTHON = False


class Listener:
    """A bound AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str, name: str) -> None:
        self.name = name  # what goes into NOTIFY_SOCKET
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(2.0)

    def recv(self) -> dict[str, str]:
        data = self.sock.recv(65536).decode()
        assert data.endswith("\n")
        return dict(line.split("=", 1) for line in data.splitlines())

    def empty(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(65536)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(2.0)
        return False


@pytest.fixture
def path_listener(tmp_path: Path) -> Iterator[Listener]:
    path = str(tmp_path / "notify.sock")
    listener = Listener(path, path)
    yield listener
    listener.sock.close()


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    name = f"forwarder-test-{uuid.uuid4().hex}"
    listener = Listener("\0" + name, "@" + name)
    yield listener
    listener.sock.close()


@pytest.fixture(params=["path", "abstract"])
def listener(
    request: pytest.FixtureRequest, path_listener: Listener, abstract_listener: Listener
) -> Listener:
    return path_listener if request.param == "path" else abstract_listener


BACKENDS = [
    "plain",
    pytest.param(
        "systemd",
        marks=pytest.mark.skipif(not HAVE_SYSTEMD_PYTHON, reason="systemd-python not installed"),
    ),
]


def make_notifier(listener: Listener, backend: str, monkeypatch: pytest.MonkeyPatch) -> Notifier:
    """A Notifier on `listener` through the given path; systemd needs the process environment."""
    if backend == "systemd":
        monkeypatch.setenv("NOTIFY_SOCKET", listener.name)
        notifier = Notifier()
    else:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
        notifier = Notifier(env={"NOTIFY_SOCKET": listener.name})
    assert notifier.backend == backend
    return notifier


@pytest.mark.parametrize("backend", BACKENDS)
def test_messages_arrive(listener: Listener, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with make_notifier(listener, backend, monkeypatch) as notifier:
        assert notifier.enabled
        notifier.ready()
        assert listener.recv() == {"READY": "1"}
        notifier.ready(status="watching 1 folder")
        assert listener.recv() == {"READY": "1", "STATUS": "watching 1 folder"}
        notifier.status("3 queued\n2 sending")
        assert listener.recv() == {"STATUS": "3 queued 2 sending"}
        notifier.watchdog()
        assert listener.recv() == {"WATCHDOG": "1"}
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notifier.reloading()
        msg = listener.recv()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert msg["RELOADING"] == "1"
        assert before <= int(msg["MONOTONIC_USEC"]) <= after
        notifier.stopping()
        assert listener.recv() == {"STOPPING": "1"}
        assert notifier.send(EXTEND_TIMEOUT_USEC=5_000_000, STATUS="draining")
        assert listener.recv() == {"EXTEND_TIMEOUT_USEC": "5000000", "STATUS": "draining"}


def test_explicit_socket_path_uses_plain_protocol(
    path_listener: Listener, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # libsystemd only reads the process environment, so another socket must go the plain way.
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "elsewhere.sock"))
    notifier = Notifier(socket_path=path_listener.name)
    assert notifier.backend == "plain"
    notifier.ready()
    assert path_listener.recv() == {"READY": "1"}
    notifier.close()


def test_plain_keeps_one_socket(path_listener: Listener) -> None:
    notifier = Notifier(env={"NOTIFY_SOCKET": path_listener.name})
    notifier.watchdog()
    sock = notifier._sock
    assert sock is not None
    notifier.watchdog()
    assert notifier._sock is sock
    assert [path_listener.recv(), path_listener.recv()] == [{"WATCHDOG": "1"}] * 2
    notifier.close()
    assert sock.fileno() == -1
    assert not notifier.enabled
    assert notifier.send(READY=1) is False
    notifier.close()  # twice is fine
    assert path_listener.empty()


def test_no_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    for notifier in (Notifier(), Notifier(env={}), Notifier(env={"NOTIFY_SOCKET": ""})):
        assert not notifier.enabled
        assert notifier.backend is None
        assert notifier.send(READY=1) is False
        notifier.ready("x")
        notifier.status("x")
        notifier.watchdog()
        notifier.reloading()
        notifier.stopping()
        assert notifier.watchdog_interval() is None
        assert notifier._sock is None
        notifier.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_unreachable_socket_never_raises(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    missing = str(tmp_path / "gone.sock")
    if backend == "systemd":
        monkeypatch.setenv("NOTIFY_SOCKET", missing)
        notifier = Notifier()
    else:
        notifier = Notifier(env={"NOTIFY_SOCKET": missing})
    assert notifier.backend == backend
    with caplog.at_level("DEBUG", logger="forwarder.notify"):
        assert notifier.send(READY=1) is False
        notifier.ready()
        notifier.watchdog()
    assert "sd_notify" in caplog.text
    notifier.close()


def test_unsupported_address_disables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier(env={"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert notifier.send(READY=1) is False


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "1000000"}, 0.5),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    notifier = Notifier(env={"NOTIFY_SOCKET": "@forwarder-unused", **env})
    assert notifier.watchdog_interval() == expected


def test_watchdog_interval_needs_a_socket() -> None:
    assert Notifier(env={"WATCHDOG_USEC": "30000000"}).watchdog_interval() is None
