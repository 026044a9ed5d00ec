"""Tests for forwarder.policy: what happens after an attempt, as tables of cases."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from forwarder.config import RetrySettings
from forwarder.policy import (
    FRESH_RETRY_SECONDS,
    REFUSALS,
    RETRY_FEW_LIMIT,
    RETRY_FRESH_LIMIT,
    Next,
    backoff,
    decide,
    pause_for,
)
from forwarder.status import classify_association, classify_status

NOW = 1_000_000.0
RETRY = RetrySettings(initial_seconds=5, max_seconds=600, max_attempts=20, max_age_seconds=86400)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (0x0000, Next.SENT),
        (0x0001, Next.SENT),
        (0xB000, Next.SENT),
        (0xB006, Next.SENT),
        (0xB007, Next.SENT),
        (0xB123, Next.SENT),
        (0x0111, Next.SENT),  # duplicate: the peer has it
        (0xA700, Next.RETRY),
        (0xA7FF, Next.RETRY),
        (0x0213, Next.RETRY),
        (None, Next.RETRY),  # no response: outcome unknown, resend
        (0x0110, Next.RETRY),  # a few retries first
        (0xC000, Next.RETRY),
        (0xCFFF, Next.RETRY),
        (0x0210, Next.RETRY),
        (0x0211, Next.RETRY),
        (0x0212, Next.RETRY),
        (0xA900, Next.QUARANTINE),
        (0xA9FF, Next.QUARANTINE),
        (0x0117, Next.QUARANTINE),
        (0x0122, Next.QUARANTINE),
        (0x0112, Next.QUARANTINE),
        (0xA801, Next.QUARANTINE),
        (0xFE00, Next.QUARANTINE),
        (0x0124, Next.HOLD),  # not authorised: the destination, not the instance
        (0x0214, Next.HOLD),
        (0x1234, Next.RETRY),  # unknown: a few retries, never silently "sent"
    ],
)
def test_first_attempt(status: int | None, expected: Next) -> None:
    d = decide(classify_status(status), 0, None, NOW, RETRY, 0.5)
    assert d.next is expected
    if expected is Next.RETRY:
        assert d.next_attempt_at is not None and d.next_attempt_at > NOW
    else:
        assert d.next_attempt_at is None
    if expected is Next.QUARANTINE:
        assert d.reason.startswith("rejected: ")
        assert f"0x{status:04X}" in d.reason


@pytest.mark.parametrize(
    ("status", "limit"),
    [
        (0xA700, RETRY.max_attempts),
        (None, RETRY.max_attempts),
        (0x0110, RETRY_FEW_LIMIT),
        (0xC000, RETRY_FEW_LIMIT),
        (0x1234, RETRY_FEW_LIMIT),
        (0x0210, RETRY_FRESH_LIMIT),
    ],
)
def test_transient_failures_give_up_at_their_limit(status: int | None, limit: int) -> None:
    cls = classify_status(status)
    refused = cls.action in REFUSALS  # then every earlier attempt was a refusal too
    for before in range(limit - 1):
        d = decide(cls, before, NOW - 10, NOW, RETRY, 0.5, before if refused else 0)
        assert d.next is Next.RETRY, before
        assert d.refusal is refused
    last = decide(cls, limit - 1, NOW - 10, NOW, RETRY, 0.5, limit - 1 if refused else 0)
    assert last.next is Next.QUARANTINE
    assert last.reason.startswith(f"gave up after {limit} attempts")


def test_max_attempts_lower_than_the_status_limit_wins() -> None:
    retry = RETRY.model_copy(update={"max_attempts": 2})
    cls = classify_status(0xC000)
    assert decide(cls, 0, None, NOW, retry, 0.5).next is Next.RETRY
    assert decide(cls, 1, NOW, NOW, retry, 0.5, 1).next is Next.QUARANTINE


def test_one_attempt_allowed_quarantines_the_first_transient_failure() -> None:
    retry = RETRY.model_copy(update={"max_attempts": 1})
    assert decide(classify_status(0xA700), 0, None, NOW, retry, 0.5).next is Next.QUARANTINE


def test_max_age_gives_up_even_with_attempts_left() -> None:
    cls = classify_status(0xA700)
    young = decide(cls, 3, NOW - 86399, NOW, RETRY, 0.5)
    assert young.next is Next.RETRY
    old = decide(cls, 3, NOW - 90000, NOW, RETRY, 0.5)
    assert old.next is Next.QUARANTINE
    assert "25.0 h" in old.reason and "4 attempts" in old.reason


def test_first_attempt_starts_the_age_clock_now() -> None:
    retry = RETRY.model_copy(update={"max_age_seconds": 1})
    assert decide(classify_status(0xA700), 0, None, NOW, retry, 0.5).next is Next.RETRY


def test_retry_waits_follow_the_backoff() -> None:
    cls = classify_status(0xA700)
    for before, rand in [(0, 0.0), (1, 0.5), (4, 0.99), (30, 0.25)]:
        d = decide(cls, before, NOW, NOW, RETRY.model_copy(update={"max_attempts": 100}), rand)
        assert d.next is Next.RETRY
        assert d.next_attempt_at == pytest.approx(NOW + backoff(before + 1, 5, 600, rand))


def test_only_a_lost_response_asks_for_a_fresh_association() -> None:
    assert decide(classify_status(None), 0, None, NOW, RETRY, 0.5).fresh_association
    assert not decide(classify_status(0xA700), 0, None, NOW, RETRY, 0.5).fresh_association
    fresh = decide(classify_status(0x0210), 0, None, NOW, RETRY, 0.5)
    assert fresh.fresh_association
    assert fresh.next_attempt_at == NOW + FRESH_RETRY_SECONDS


def test_warning_reason_names_the_status() -> None:
    d = decide(classify_status(0xB000), 0, None, NOW, RETRY, 0.5)
    assert d.next is Next.SENT
    assert d.reason == "0xB000 warning: coercion of data elements"


def test_association_outcomes() -> None:
    rejected = classify_association(rejected=True, result=1, source=1, diagnostic=7)
    assert decide(rejected, 0, None, NOW, RETRY, 0.5).next is Next.HOLD
    transient = classify_association(rejected=True, result=2, source=3, diagnostic=1)
    assert decide(transient, 0, None, NOW, RETRY, 0.5).next is Next.RETRY
    refused = classify_association(rejected=False, detail="cannot connect: refused")
    assert decide(refused, 0, None, NOW, RETRY, 0.5).next is Next.RETRY


@pytest.mark.parametrize(
    ("attempt", "rand", "expected"),
    [
        (1, 0.0, 2.5),  # 50% of the initial wait
        (1, 0.999999, 5.0),  # up to 100%
        (0, 0.0, 2.5),  # attempt 0 is treated as the first
        (2, 0.0, 5.0),
        (3, 0.0, 10.0),
        (8, 0.0, 300.0),  # 5 * 2**7 = 640, capped at 600
        (1000, 0.0, 300.0),  # no overflow for huge attempt counts
        (1000, 0.999999, 600.0),
        (1025, 0.0, 300.0),  # 2.0 ** 1024 overflows a float
        (10**6, 0.5, 450.0),  # a destination down for a very long time
    ],
)
def test_backoff(attempt: int, rand: float, expected: float) -> None:
    assert backoff(attempt, 5, 600, rand) == pytest.approx(expected, rel=1e-5)


def test_backoff_never_exceeds_the_maximum_and_grows() -> None:
    waits = [backoff(n, 0.2, 1.0, 0.999) for n in range(1, 40)]
    assert max(waits) <= 1.0
    assert waits == sorted(waits)


def test_pause_for_backs_off_like_retries() -> None:
    assert pause_for(1, 5, 600, 0.0) == backoff(1, 5, 600, 0.0)
    assert pause_for(20, 5, 600, 0.5) == pytest.approx(450.0)


def test_pause_for_a_destination_down_for_days_does_not_overflow() -> None:
    # 1 s pauses, ~20 minutes of failures in a row: the breaker count passes 1024
    assert pause_for(1100, 0.2, 1.0, 0.5) == pytest.approx(0.75)


def _run(statuses: list[int | None], retry: RetrySettings = RETRY) -> list[Next]:
    """Decide a sequence of outcomes for one instance, counting as the daemon and outbox do."""
    refusals = 0
    out = []
    for attempts, status in enumerate(statuses):
        d = decide(classify_status(status), attempts, NOW, NOW, retry, 0.5, refusals)
        out.append(d.next)
        refusals += d.refusal
    return out


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        # the attack: out of resources, a timeout, then one 0xC000 quarantined the instance
        ([0xA700, None, 0xC000], [Next.RETRY, Next.RETRY, Next.RETRY]),
        ([0xA700, None, 0xC000, 0xC000, 0xC000], [Next.RETRY] * 4 + [Next.QUARANTINE]),
        ([None] * 10 + [0x0210, 0x0210], [Next.RETRY] * 11 + [Next.QUARANTINE]),
        ([0xC000, 0xC000] + [0xA700] * 17, [Next.RETRY] * 19),
        ([0xC000, 0xC000] + [0xA700] * 20, [Next.RETRY] * 21 + [Next.QUARANTINE]),
        ([0xA700] * 5 + [0xA900], [Next.RETRY] * 5 + [Next.QUARANTINE]),
    ],
)
def test_transient_failures_and_refusals_are_limited_apart(
    statuses: list[int | None], expected: list[Next]
) -> None:
    assert _run(statuses) == expected


def test_the_reason_for_giving_up_tells_refusals_from_transient_failures() -> None:
    d = decide(classify_status(0xC000), 4, NOW, NOW, RETRY, 0.5, 2)
    assert d.next is Next.QUARANTINE
    assert d.reason == "gave up after 5 attempts: 3 refused, 2 transient: 0xC000 cannot understand"
    assert d.refusal


def test_a_low_max_attempts_still_bounds_refusals() -> None:
    retry = RETRY.model_copy(update={"max_attempts": 2})
    assert _run([0xA700, 0xC000, 0xC000], retry) == [Next.RETRY, Next.RETRY, Next.QUARANTINE]


def test_policy_needs_no_pydantic() -> None:
    """The policy is pure: deciding takes the retry limits through a protocol, so importing
    it loads no settings machinery."""
    import subprocess
    import sys

    code = "import forwarder.policy, sys; assert 'pydantic' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_decide_takes_any_retry_limits() -> None:
    @dataclass(frozen=True)
    class Limits:
        initial_seconds: float = 5
        max_seconds: float = 600
        max_attempts: int = 1
        max_age_seconds: float = 86400

    d = decide(classify_status(0xA700), 0, None, NOW, Limits(), 0.5)
    assert d.next is Next.QUARANTINE and "1 attempts" in d.reason
