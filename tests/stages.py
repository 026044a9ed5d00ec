"""Helpers for the stage tests: stages wired to a real outbox, driven without threads."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from test_daemon import dest

from forwarder.breaker import Breaker
from forwarder.config import Destination, RetrySettings
from forwarder.crew import Crew, Rules
from forwarder.deliver import Worker
from forwarder.dicomfile import inspect
from forwarder.dispose import Disposer, Layout
from forwarder.events import Events
from forwarder.inodes import InodeIndex
from forwarder.metrics import NO_METRICS
from forwarder.outbox import Delivery, Mark, Outbox, State
from forwarder.trouble import OutboxTrouble


@dataclass
class Calls:
    """What a stage told the rest of the daemon through its callbacks."""

    done: list[Delivery] = field(default_factory=list)
    forgotten: list[Path] = field(default_factory=list)
    fatal: list[tuple[str, int]] = field(default_factory=list)
    queued: int = 0

    def on_done(self, finished: Sequence[Delivery]) -> None:
        self.done.extend(finished)

    def forget(self, path: Path) -> None:
        self.forgotten.append(path)

    def on_fatal(self, reason: str, status: int) -> None:
        self.fatal.append((reason, status))

    def on_queued(self) -> None:
        self.queued += 1


def queue_files(outbox: Outbox, paths: Sequence[Path], destinations: Sequence[str]) -> None:
    """Queue `paths` as the enqueuer would (inspected), for `destinations`, at time 0."""
    outbox.enqueue_many([inspect(p) for p in paths], list(destinations), 0.0)


def destination(port: int, **kw: Any) -> Destination:
    """A destination "pacs" on loopback, as the daemon tests configure one (`test_daemon.dest`)."""
    return Destination(**dest(kw.pop("name", "pacs"), port, **kw))


def worker(
    outbox: Outbox,
    dest: Destination,
    calls: Calls,
    *,
    now: float = 0.0,
    retry: RetrySettings | None = None,
    index: int = 0,
    crew: Crew | None = None,
) -> Worker:
    """A worker of `dest` (not started: the test calls `loop(now)`), with its crew."""
    rules = Rules(
        batch_size=64,
        lease_seconds=300,
        linger_seconds=0,
        follow_symlinks=False,
        retry=retry or RetrySettings(),
    )
    if crew is None:
        crew = Crew.of(dest, rules, Breaker(dest.name, outbox, now))
    w = Worker(
        crew,
        index,
        outbox=outbox,
        events=Events(),
        metrics=NO_METRICS,
        trouble=OutboxTrouble(),
        done=calls.on_done,
        fatal=calls.on_fatal,
        hard_stop=threading.Event(),
        clock=lambda: now,
    )
    crew.workers.append(w)
    return w


def disposer(outbox: Outbox, tmp: Path, calls: Calls, on_success: str = "delete") -> Disposer:
    layout = Layout(
        roots=(tmp / "in",),
        on_success=on_success,
        archive_dir=tmp / "sent",
        quarantine_dir=tmp / "quarantine",
        follow_symlinks=False,
    )
    return Disposer(
        outbox,
        layout,
        Events(),
        inodes=InodeIndex(),
        forget=calls.forget,
        queued=calls.on_queued,
        clock=lambda: 0.0,
    )


def finish(outbox: Outbox, now: float = 1.0, **states: State) -> list[Delivery]:
    """Claim each named destination's one due row at `now` and record it: SENT (0x0000),
    QUARANTINED (0xA900, refused) or GONE (the file disappeared). Returns the rows claimed."""
    marks = {
        State.SENT: lambda i: Mark(i, State.SENT, 0x0000),
        State.QUARANTINED: lambda i: Mark(i, State.QUARANTINED, 0xA900, "refused"),
        State.GONE: lambda i: Mark(i, State.GONE, None, "disappeared"),
    }
    claimed = []
    for name, state in states.items():
        (d,) = outbox.claim(name, 10, now, 300)
        outbox.mark_many([marks[state](d.id)], now + 1)
        claimed.append(d)
    return claimed
