"""The sd_notify protocol: tell systemd (or any ``$NOTIFY_SOCKET`` listener) the daemon's state."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Literal

__all__ = ["Notifier"]

LOGGER = logging.getLogger("forwarder.notify")

Backend = Literal["auto", "plain"]

_SEND_TIMEOUT = 1.0
"""Seconds a plain send may block on a full listener queue before it is given up."""


def _libsystemd_notify() -> Callable[[str], object] | None:
    """Return ``systemd.daemon.notify`` when systemd-python is installed, else None."""
    try:
        from systemd import daemon
    except ImportError:
        return None
    notify: Callable[[str], object] = daemon.notify
    return notify


def _address(path: str) -> str | None:
    """The ``sendto`` address for a ``$NOTIFY_SOCKET`` value; None for kinds we cannot reach.

    A leading ``@`` names a Linux abstract socket (``\\0`` + rest). ``vsock:`` addresses
    (systemd >= 254, for VMs) are left to libsystemd.
    """
    if path.startswith("@"):
        return "\0" + path[1:]
    if path.startswith("/"):
        return path
    return None


class Notifier:
    """Send sd_notify(3) state changes: READY=1, STATUS=, WATCHDOG=1, RELOADING=1, STOPPING=1.

    Parameters
    ----------
    socket_path
        The listener's socket; default ``$NOTIFY_SOCKET`` from `env`. A path, or ``@name``
        for an abstract socket. Without one every call is a cheap no-op.
    env
        Where ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` are read;
        default ``os.environ``.
    backend
        ``"auto"`` uses libsystemd's ``sd_notify`` (systemd-python) when it is installed and
        the socket is the process environment's ``$NOTIFY_SOCKET`` (the only one libsystemd
        reads), and the plain ``AF_UNIX``/``SOCK_DGRAM`` protocol otherwise (containers, dev,
        tests). ``"plain"`` forces the plain protocol.

    Every method is thread-safe and never raises: a lost notification is logged at debug
    level and reported by `send` returning False.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        env: Mapping[str, str] | None = None,
        *,
        backend: Backend = "auto",
    ) -> None:
        self._env: Mapping[str, str] = os.environ if env is None else env
        path = socket_path if socket_path is not None else self._env.get("NOTIFY_SOCKET")
        self._path: str | None = path or None
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._closed = False
        self._libsystemd: Callable[[str], object] | None = None
        self._address: str | None = None
        if self._path is None:
            return
        if backend == "auto" and self._path == os.environ.get("NOTIFY_SOCKET"):
            self._libsystemd = _libsystemd_notify()
        if self._libsystemd is None:
            self._address = _address(self._path)
            if self._address is None:
                LOGGER.debug(f"NOTIFY_SOCKET={path} is not a socket path; notifications are off")
                self._path = None

    @property
    def enabled(self) -> bool:
        """True when there is a listener to notify (calls are not no-ops)."""
        return self._path is not None and not self._closed

    @property
    def backend(self) -> Literal["systemd", "plain"] | None:
        """Which implementation sends: libsystemd, the plain protocol, or None when disabled."""
        if not self.enabled:
            return None
        return "systemd" if self._libsystemd is not None else "plain"

    @property
    def socket_path(self) -> str | None:
        """The listener's socket as given (``@`` for abstract), or None."""
        return self._path

    def send(self, **fields: str | int) -> bool:
        """Send one ``KEY=value`` line per field in a single datagram.

        Newlines in values are replaced by spaces (the protocol is line-based). Returns True
        when the datagram left; False when disabled, closed or the send failed.
        """
        if not fields or not self.enabled:
            return False
        message = "".join(
            f"{key}={str(value).replace(chr(10), ' ')}\n" for key, value in fields.items()
        )
        with self._lock:
            if self._closed:
                return False
            try:
                if self._libsystemd is not None:
                    return bool(self._libsystemd(message))
                return self._send_plain(message.encode("utf-8"))
            except Exception as exc:  # never let a notification take the daemon down
                LOGGER.debug(f"sd_notify to {self._path} failed: {exc} ({message.strip()})")
                return False

    def _send_plain(self, data: bytes) -> bool:
        assert self._address is not None
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.settimeout(_SEND_TIMEOUT)
            self._sock = sock
        sent = self._sock.sendto(data, self._address)
        return sent == len(data)

    def ready(self, status: str | None = None) -> None:
        """READY=1: start-up (or a reload) is complete; optionally with a STATUS= line."""
        if status is None:
            self.send(READY=1)
        else:
            self.send(READY=1, STATUS=status)

    def status(self, text: str) -> None:
        """STATUS=: one line shown by ``systemctl status``."""
        self.send(STATUS=text)

    def watchdog(self) -> None:
        """WATCHDOG=1: the keep-alive ping; send it every `watchdog_interval` seconds."""
        self.send(WATCHDOG=1)

    def reloading(self) -> None:
        """RELOADING=1 with MONOTONIC_USEC=; send `ready` again once the reload is done.

        systemd >= 253 requires the timestamp for ``Type=notify-reload``; older ones ignore it.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send(RELOADING=1, MONOTONIC_USEC=usec)

    def stopping(self) -> None:
        """STOPPING=1: shutdown has begun."""
        self.send(STOPPING=1)

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings: half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3)
        recommends.

        None when notifications are off, ``WATCHDOG_USEC`` is unset or not a positive
        integer, or ``WATCHDOG_PID`` is set and is not this process.
        """
        if not self.enabled:
            return None
        pid = self._env.get("WATCHDOG_PID")
        if pid is not None and pid.strip() != str(os.getpid()):
            return None
        try:
            usec = int(self._env.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2_000_000

    def close(self) -> None:
        """Close the socket; later calls are no-ops. Safe to call twice."""
        with self._lock:
            self._closed = True
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Notifier(socket_path={self._path!r}, backend={self.backend!r})"
