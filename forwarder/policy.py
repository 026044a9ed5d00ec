"""Decide what happens after an attempt: done, retry when, quarantine, or hold the destination."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from forwarder.status import Action, Classification

__all__ = [
    "IDLE_SECONDS",
    "REFUSALS",
    "Decision",
    "Next",
    "RetryLimits",
    "backoff",
    "decide",
    "pause_for",
]

RETRY_FEW_LIMIT = 3  # refusals for "probably transient" statuses (0x0110, 0xCxxx)
RETRY_FRESH_LIMIT = 2  # one retry on a fresh association (0x0210-0x0212)

REFUSALS = frozenset({Action.RETRY_FEW, Action.RETRY_FRESH, Action.UNREADABLE, Action.PERMANENT})
"""Outcomes that say something about the instance itself (the peer refused it, or our file
could not be read), as opposed to a passing condition (out of resources, no response)."""
FRESH_RETRY_SECONDS = 1.0
IDLE_SECONDS = 30.0
"""The longest a worker waits before looking at the outbox again: a retry made due by hand
(``forwarder queue retry``) is picked up within this, even when the daemon was not woken."""
_HOUR = 3600.0
_MAX_DOUBLINGS = 60  # 2.0 ** 1024 raises OverflowError; 2 ** 60 times any wait is forever


class RetryLimits(Protocol):
    """The retry settings `decide` reads (``[retry]``; `forwarder.config.RetrySettings`).

    A protocol, so that deciding needs no pydantic: the policy is a pure function of these
    four numbers.
    """

    @property
    def initial_seconds(self) -> float: ...
    @property
    def max_seconds(self) -> float: ...
    @property
    def max_attempts(self) -> int: ...
    @property
    def max_age_seconds(self) -> float: ...


class Next(enum.Enum):
    SENT = "sent"
    RETRY = "retry"
    QUARANTINE = "quarantine"
    HOLD = "hold"  # the destination refuses us: keep the instance, pause the destination


@dataclass(frozen=True)
class Decision:
    next: Next
    reason: str
    next_attempt_at: float | None = None
    fresh_association: bool = False
    refusal: bool = False
    """This attempt counts as a refusal of the instance (see `REFUSALS`), not a transient
    failure: the outbox counts the two apart and `decide` limits each on its own."""


def backoff(attempt: int, initial: float, maximum: float, rand: float) -> float:
    """Seconds to wait after the `attempt`-th failure: exponential, capped, with jitter.

    `rand` in [0, 1) spreads the wait over 50-100% of the exponential value, so that
    instances failing together do not come back together.
    """
    # The exponent is capped: a destination down for days reaches over 1024 failures in a
    # row, and 2.0 ** 1024 raises OverflowError.
    base = min(maximum, initial * 2.0 ** min(max(attempt - 1, 0), _MAX_DOUBLINGS))
    return base * (0.5 + rand / 2)


def pause_for(failures: int, initial: float, maximum: float, rand: float) -> float:
    """How long to pause a destination after `failures` association failures in a row."""
    return backoff(failures, initial, maximum, rand)


def decide(
    cls: Classification,
    attempts_before: int,
    first_attempt_at: float | None,
    now: float,
    retry: RetryLimits,
    rand: float,
    refusals_before: int = 0,
) -> Decision:
    """What to do with one delivery after an attempt classified as `cls`.

    `attempts_before` counts every earlier attempt, `refusals_before` those of them that were
    refusals (`REFUSALS`); neither counts this attempt. Transient failures and refusals are
    limited apart: a transient failure gives up once the transient ones reach
    ``retry.max_attempts``; a refusal once the refusals reach the lower limit of its status
    class (`RETRY_FEW_LIMIT`, `RETRY_FRESH_LIMIT`, never above ``retry.max_attempts``). So a
    peer out of resources, then timing out, then answering 0xC000 once has refused the
    instance once, not three times. Either way a retry is refused once the first attempt is
    older than ``retry.max_age_seconds``.
    """
    refusal = cls.action in REFUSALS
    if cls.delivered:
        return Decision(Next.SENT, cls.describe())
    if cls.action is Action.PERMANENT:
        return Decision(Next.QUARANTINE, f"rejected: {cls.describe()}", refusal=True)
    if cls.action is Action.DESTINATION:
        return Decision(Next.HOLD, f"destination refuses us: {cls.describe()}")
    attempts = attempts_before + 1
    refusals = refusals_before + refusal
    transient = attempts - refusals
    if refusal:
        count, limit = refusals, retry.max_attempts
        if cls.action is Action.RETRY_FRESH:
            limit = min(limit, RETRY_FRESH_LIMIT)
        else:
            limit = min(limit, RETRY_FEW_LIMIT)
    else:
        count, limit = transient, retry.max_attempts
    started = first_attempt_at if first_attempt_at is not None else now
    if count >= limit:
        tally = (
            f"{attempts} attempts"
            if refusals in (0, attempts)
            else (f"{attempts} attempts: {refusals} refused, {transient} transient")
        )
        return Decision(
            Next.QUARANTINE, f"gave up after {tally}: {cls.describe()}", refusal=refusal
        )
    if now - started >= retry.max_age_seconds:
        hours = (now - started) / _HOUR
        return Decision(
            Next.QUARANTINE,
            f"gave up after {hours:.1f} h ({attempts} attempts): {cls.describe()}",
            refusal=refusal,
        )
    if cls.action is Action.RETRY_FRESH:
        return Decision(
            Next.RETRY,
            cls.describe(),
            now + FRESH_RETRY_SECONDS,
            fresh_association=True,
            refusal=True,
        )
    wait = backoff(attempts, retry.initial_seconds, retry.max_seconds, rand)
    return Decision(
        Next.RETRY,
        cls.describe(),
        now + wait,
        fresh_association=cls.status is None,
        refusal=refusal,
    )
