"""One destination's crew of workers: what they share, the settings they read, stopping them."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from forwarder.breaker import Breaker
from forwarder.concurrency import Autoscale
from forwarder.config import Destination, Settings
from forwarder.contexts import ContextSpec
from forwarder.policy import RetryLimits

if TYPE_CHECKING:
    from forwarder.deliver import Worker

__all__ = ["Crew", "Rules", "stop_workers"]


@dataclass(frozen=True)
class Rules:
    """The settings the deliver stage reads (from `Settings`; a reload replaces the crew's)."""

    batch_size: int
    lease_seconds: float
    linger_seconds: float
    follow_symlinks: bool
    retry: RetryLimits

    @classmethod
    def of(cls, settings: Settings) -> Rules:
        return cls(
            batch_size=settings.sender.batch_size,
            lease_seconds=settings.outbox.lease_seconds,
            linger_seconds=settings.sender.linger_seconds,
            follow_symlinks=settings.watch.follow_symlinks,
            retry=settings.retry,
        )


@dataclass
class Crew:
    """One destination's workers and what they share: the scale of its associations, its
    breaker, and the presentation contexts an extra association proposes."""

    dest: Destination
    rules: Rules  # replaced on reload: running workers follow it
    scale: Autoscale
    breaker: Breaker
    contexts: list[ContextSpec] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)

    @classmethod
    def of(cls, dest: Destination, rules: Rules, breaker: Breaker) -> Crew:
        if dest.associations == "auto":
            scale = Autoscale(dest.max_associations)
        else:
            scale = Autoscale(dest.associations, auto=False)
        return cls(dest, rules, scale, breaker)

    def wake(self) -> None:
        for worker in self.workers:
            worker.wake.set()


def stop_workers(
    workers: Sequence[Worker],
    timeout: float,
    tick: Callable[[], None] | None = None,
    tick_every: float = 1.0,
) -> bool:
    """Stop `workers`, waiting up to `timeout` for their in-flight stores; True if all ended.

    `tick` runs every `tick_every` seconds while waiting (a reload keeps the heartbeat and
    the watchdog going: a slow peer would otherwise hold the main loop for the whole timeout).
    """
    for w in workers:
        w.stop.set()
        w.wake.set()
    deadline = time.monotonic() + timeout
    for w in workers:
        while w.is_alive() and (left := deadline - time.monotonic()) > 0:
            w.join(left if tick is None else min(left, tick_every))
            if tick is not None:
                tick()
    return not any(w.is_alive() for w in workers)
