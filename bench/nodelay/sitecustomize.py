"""Set TCP_NODELAY on every TCP socket before it connects (bench only, via PYTHONPATH).

bench_send.py puts this directory on PYTHONPATH for its ``pynetdicom storescu +NODELAY`` sender,
to show pynetdicom's storescu app without Nagle stalls, i.e. what a sender gains from that
one socket option alone. Python imports ``sitecustomize`` at start-up when it is on sys.path.
"""

from __future__ import annotations

import socket
from typing import Any

_connect = socket.socket.connect


def _connect_nodelay(self: socket.socket, address: Any) -> None:
    if self.family in (socket.AF_INET, socket.AF_INET6) and self.type == socket.SOCK_STREAM:
        self.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _connect(self, address)


socket.socket.connect = _connect_nodelay  # type: ignore[method-assign, assignment]
