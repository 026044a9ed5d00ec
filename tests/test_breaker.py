"""The circuit breaker: its pause is the outbox's, backing off, ended by a store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from forwarder.breaker import MIN_HOLD_SECONDS, Breaker
from forwarder.config import RetrySettings
from forwarder.outbox import Outbox

RETRY = RetrySettings(initial_seconds=5, max_seconds=600)


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "outbox.sqlite3") as box:
        yield box


def breaker(outbox: Outbox, now: float = 1000.0) -> Breaker:
    return Breaker("pacs", outbox, now, rand=lambda: 0.999)


def test_failures_in_a_row_back_off_and_are_recorded_in_the_outbox(outbox: Outbox) -> None:
    b = breaker(outbox)
    ends = [b.trip("connection refused", RETRY, hold=False, now=1000.0) for _ in range(4)]
    waits = [end - 1000.0 for end in ends]
    assert waits == sorted(waits) and waits[0] < 10 < waits[-1] <= 600
    info = outbox.destination_info()["pacs"]
    assert info.paused_until == ends[-1] and info.consecutive_failures == 4
    assert info.pause_reason == info.last_error == "connection refused"
    assert b.remaining(1000.0) == pytest.approx(waits[-1])


def test_a_refusal_holds_the_destination_at_least_a_minute(outbox: Outbox) -> None:
    end = breaker(outbox).trip("called AE title not recognised", RETRY, hold=True, now=1000.0)
    assert end - 1000.0 >= MIN_HOLD_SECONDS


def test_a_store_ends_the_pause_in_memory_and_in_the_outbox(outbox: Outbox) -> None:
    b = breaker(outbox)
    b.trip("connection refused", RETRY, hold=False, now=1000.0)
    b.succeeded()
    assert b.remaining(1000.0) == 0 and b.failures == 0
    assert not outbox.destination_info()["pacs"].paused(1000.0)


def test_a_pause_outlives_a_restart(outbox: Outbox) -> None:
    end = breaker(outbox).trip("connection refused", RETRY, hold=False, now=1000.0)
    again = breaker(outbox, now=1001.0)  # a new daemon on the same outbox
    assert again.paused_until == end and again.failures == 1
    assert breaker(outbox, now=end + 1).remaining(end + 1) == 0  # one that ran out is over
