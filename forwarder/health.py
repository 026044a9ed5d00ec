"""The daemon's health as its outbox shows it: heartbeat, paused destinations, a full disk."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from forwarder.config import Settings
from forwarder.logs import iso
from forwarder.outbox import Outbox, OutboxError, State

__all__ = ["MIN_FREE_BYTES", "check", "disk_full", "stall_limit", "status_line"]

STALL_MARGIN_SECONDS = 60.0
"""Added to twice the longest timeouts: a batch stuck longer than that is hung."""
DEFAULT_STALL_SECONDS = 60.0
"""The timeouts assumed without any destination."""


def stall_limit(settings: Settings) -> float:
    """Seconds a worker in a batch may go without a store answered before the daemon counts
    as hung (a wait for a transform gets its file's allowance on top, `forwarder.transforming`)."""
    worst = max(
        (d.dimse_timeout + d.network_timeout for d in settings.destinations),
        default=DEFAULT_STALL_SECONDS,
    )
    return settings.health.stall_seconds or (worst * 2 + STALL_MARGIN_SECONDS)


def status_line(outbox: Outbox, paused: Sequence[str]) -> str:
    """The daemon's one-line status (systemd's STATUS=, the summary line) from its outbox."""
    counts = outbox.counts()
    pending = sum(c.get(State.PENDING, 0) for c in counts.values())
    inflight = sum(c.get(State.INFLIGHT, 0) for c in counts.values())
    quarantined = sum(c.get(State.QUARANTINED, 0) for c in counts.values())
    committing = sum(c.get(State.COMMITTING, 0) for c in counts.values())
    infos = outbox.destination_info()
    last = max((i.last_success_at or 0 for i in infos.values()), default=0)
    line = f"{pending} queued, {inflight} in flight, "
    if committing:  # stored, their files kept until the peer commits (Storage Commitment)
        line += f"{committing} awaiting commitment, "
    line += f"{quarantined} quarantined, last success {iso(last) if last else 'never'}"
    if paused:
        line += f", paused: {', '.join(paused)}"
    return line


def check(settings: Settings, now: float | None = None) -> tuple[bool, str]:
    """(healthy, one line) for the daemon whose outbox the settings name."""
    now = time.time() if now is None else now
    path = settings.outbox.path
    if not path.exists():
        return False, f"no outbox at {path}: the daemon has never run with this config"
    try:
        with Outbox(path, readonly=True) as outbox:
            beat = outbox.read_heartbeat()
            dests = outbox.destination_info()
    except OutboxError as exc:
        return False, f"cannot read the outbox {path}: {exc}"
    if beat is None:
        return False, "no heartbeat yet: the daemon has not started"
    age = now - beat.updated_at
    if beat.info.get("stopped"):
        return False, f"the daemon stopped {age:.0f} s ago"
    full = disk_full(path)
    if full is not None:
        return False, full
    if age > settings.health.stale_seconds:
        return False, f"last heartbeat {age:.0f} s ago (pid {beat.pid}): the daemon is hung or gone"
    problem = beat.info.get("unhealthy")
    if problem:
        return False, str(problem)
    limit = settings.health.max_paused_seconds
    configured = {d.name for d in settings.destinations}
    for name, info in sorted(dests.items()):
        if name in configured and info.paused(now) and info.paused_at is not None:
            paused = now - info.paused_at
            if paused > limit:
                return False, (
                    f"destination {name} paused for {paused / 60:.0f} min: {info.pause_reason}"
                )
    return True, f"ok: pid {beat.pid}, heartbeat {age:.0f} s ago"


MIN_FREE_BYTES = 256 * 1024
"""Less free space than this where the outbox lives: the daemon cannot queue new files (its
heartbeat may not get written either, so this is checked here, not only by the daemon)."""


def disk_full(path: Path) -> str | None:
    """One line when the file system holding the outbox `path` is (nearly) full, else None."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    if free >= MIN_FREE_BYTES:
        return None
    return (
        f"the disk holding the outbox {path} is full ({free // 1024} KiB free): "
        "the daemon takes no new files until space is freed"
    )
