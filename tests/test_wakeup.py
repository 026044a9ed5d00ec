"""Wakeup: a signal handler wakes the main loop without taking any lock."""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType

from forwarder.wakeup import Wakeup


def test_a_signal_wakes_a_wait_and_is_recorded() -> None:
    wakeup = Wakeup()

    def handler(signum: int, frame: FrameType | None) -> None:
        wakeup.signal(signum)

    old = signal.signal(signal.SIGUSR2, handler)
    try:
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR2))
        timer.start()
        start = time.monotonic()
        wakeup.wait(30)
        timer.join()
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert time.monotonic() - start < 10
    assert list(wakeup.signals) == [signal.SIGUSR2]


def test_wake_ups_never_block_and_are_consumed_by_one_wait() -> None:
    wakeup = Wakeup()
    for _ in range(200_000):  # far beyond a pipe's capacity
        wakeup.set()
    wakeup.wait(0)
    start = time.monotonic()
    wakeup.wait(0.2)  # nothing pending any more: waits out its time
    assert time.monotonic() - start >= 0.15
