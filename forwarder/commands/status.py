"""``forwarder status``: the queue per destination and whether the daemon is alive."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

from forwarder import health
from forwarder.commands import common
from forwarder.config import Settings
from forwarder.logs import iso
from forwarder.outbox import Delivery, Heartbeat, Outbox, State
from forwarder.status import status_hex

__all__ = ["DaemonStatus", "DestinationStatus", "add_arguments", "collect", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Per destination: pending, in flight, sent in the last hour and day, quarantined, "
        "age of the oldest pending delivery, last success, last error and pause, and what "
        "is stored and awaiting Storage Commitment since when; and whether "
        "the daemon is alive (its heartbeat in the outbox). Reads the outbox without ever "
        "blocking the daemon."
    )
    common.add_config(parser)
    common.add_json(parser)


@dataclass(frozen=True)
class DaemonStatus:
    """The daemon as its heartbeat shows it."""

    state: str
    """``running``, ``stopped``, ``not responding`` (stale heartbeat) or ``never started``."""
    beat: Heartbeat | None
    healthy: bool
    health: str
    """`forwarder.health.check`'s one line."""

    @property
    def alive(self) -> bool:
        return self.state == "running"

    def to_json(self, now: float) -> dict[str, Any]:
        beat = self.beat
        return {
            "state": self.state,
            "alive": self.alive,
            "healthy": self.healthy,
            "health": self.health,
            "pid": beat.pid if beat else None,
            "heartbeat_at": iso(beat.updated_at if beat else None),
            "heartbeat_age_seconds": round(now - beat.updated_at, 3) if beat else None,
            "started_at": iso(beat.started_at if beat else None),
            "version": beat.info.get("version") if beat else None,
            "stats": beat.info.get("stats") if beat else None,
            "receiver": beat.info.get("receiver") if beat else None,
        }


@dataclass(frozen=True)
class DestinationStatus:
    """One line of the table: a destination's queue and circuit breaker."""

    name: str
    address: str | None
    """``called_aet@host:port``; None for a destination no longer configured."""
    counts: dict[State, int]
    sent_last_hour: int
    sent_last_day: int
    oldest_pending_at: float | None
    last_success_at: float | None
    last_error: str | None
    """The last association failure (the destination could not be reached)."""
    last_error_at: float | None
    last_refusal: Delivery | None
    """The waiting or quarantined delivery that failed last (the peer refused an instance)."""
    consecutive_failures: int
    paused_until: float | None
    """Set only while paused."""
    paused_at: float | None
    pause_reason: str | None
    awaiting_since: float | None = None
    """When the oldest delivery stored and awaiting Storage Commitment was stored."""
    commitment_error: str | None = None
    """Why the peer did not take a Storage Commitment request still open (the latest)."""

    def to_json(self, now: float) -> dict[str, Any]:
        oldest = self.oldest_pending_at
        refusal = self.last_refusal
        return {
            "name": self.name,
            "configured": self.address is not None,
            "address": self.address,
            "pending": self.counts[State.PENDING],
            "inflight": self.counts[State.INFLIGHT],
            "sent": self.counts[State.SENT],
            "quarantined": self.counts[State.QUARANTINED],
            "gone": self.counts[State.GONE],
            "awaiting_commitment": self.counts[State.COMMITTING],
            "awaiting_commitment_since": iso(self.awaiting_since),
            "commitment_error": self.commitment_error,
            "sent_last_hour": self.sent_last_hour,
            "sent_last_day": self.sent_last_day,
            "oldest_pending_at": iso(oldest),
            "oldest_pending_age_seconds": None if oldest is None else round(now - oldest, 3),
            "last_success_at": iso(self.last_success_at),
            "last_error": self.last_error,
            "last_error_at": iso(self.last_error_at),
            "last_refusal": None if refusal is None else _refusal_json(refusal),
            "consecutive_failures": self.consecutive_failures,
            "paused": self.paused_until is not None,
            "paused_until": iso(self.paused_until),
            "paused_since": iso(self.paused_at),
            "pause_reason": self.pause_reason,
        }

    def latest_error(self) -> tuple[float | None, str] | None:
        """The more recent of the last association failure and the last refusal."""
        found: list[tuple[float | None, str]] = []
        if self.last_error:
            found.append((self.last_error_at, self.last_error))
        d = self.last_refusal
        if d is not None and d.last_error:
            status = status_hex(d.last_status)
            text = (
                f"{status} {d.last_error}"
                if status and status not in d.last_error
                else d.last_error
            )
            found.append((d.last_attempt_at, text))
        return max(found, key=lambda f: f[0] or 0.0) if found else None


def _refusal_json(d: Delivery) -> dict[str, Any]:
    return {
        "at": iso(d.last_attempt_at),
        "status": status_hex(d.last_status),
        "error": d.last_error,
        "state": d.state.name.lower(),
        "sop_instance_uid": d.sop_instance_uid,
        "delivery_id": d.id,
    }


def _daemon(beat: Heartbeat | None, settings: Settings, now: float) -> DaemonStatus:
    healthy, line = health.check(settings, now)
    if beat is None:
        return DaemonStatus("never started", None, healthy, line)
    if beat.info.get("stopped"):
        state = "stopped"
    elif now - beat.updated_at > settings.health.stale_seconds:
        state = "not responding"
    else:
        state = "running"
    return DaemonStatus(state, beat, healthy, line)


def collect(
    settings: Settings, outbox: Outbox, now: float
) -> tuple[DaemonStatus, list[DestinationStatus]]:
    """The daemon and every destination (configured first, then any left in the outbox)."""
    counts = outbox.counts()
    last_hour = outbox.sent_since(now - common.HOUR)
    last_day = outbox.sent_since(now - common.DAY)
    oldest = outbox.oldest_pending()
    infos = outbox.destination_info()
    refusals = outbox.last_failures()
    awaiting = outbox.awaiting_commitment()
    refused: dict[str, str] = {}  # the newest open transaction's error, by destination
    for tx in outbox.commitments():
        if tx.last_error:
            refused[tx.destination] = tx.last_error
    configured = {d.name: d for d in settings.destinations}
    others = sorted((set(counts) | set(infos)) - set(configured))
    result = []
    for name in [*configured, *others]:
        info = infos.get(name)
        dest = configured.get(name)
        paused = info is not None and info.paused(now)
        result.append(
            DestinationStatus(
                name=name,
                address=dest.address if dest else None,
                counts=counts.get(name, dict.fromkeys(State, 0)),
                sent_last_hour=last_hour.get(name, 0),
                sent_last_day=last_day.get(name, 0),
                oldest_pending_at=oldest.get(name),
                last_success_at=info.last_success_at if info else None,
                last_error=info.last_error if info else None,
                last_error_at=info.last_error_at if info else None,
                last_refusal=refusals.get(name),
                consecutive_failures=info.consecutive_failures if info else 0,
                paused_until=info.paused_until if info and paused else None,
                paused_at=info.paused_at if info and paused else None,
                pause_reason=info.pause_reason if info and paused else None,
                awaiting_since=awaiting[name][1] if name in awaiting else None,
                commitment_error=refused.get(name),
            )
        )
    return _daemon(outbox.read_heartbeat(), settings, now), result


def _head(daemon: DaemonStatus, now: float) -> str:
    beat = daemon.beat
    if beat is None:
        return "daemon: never started (no heartbeat in the outbox)"
    line = f"daemon: {daemon.state}, pid {beat.pid}, heartbeat {common.ago(beat.updated_at, now)}"
    if daemon.alive:
        line += f", up {common.age(now - beat.started_at)}"
        if not daemon.healthy:
            line += f"; UNHEALTHY: {daemon.health}"
    return line


def _receiver(daemon: DaemonStatus, settings: Settings | None) -> str | None:
    """The receiver's line (from the heartbeat), or None when it is not configured."""
    beat = daemon.beat
    info = beat.info.get("receiver") if beat is not None and daemon.alive else None
    if not isinstance(info, dict):
        if settings is not None and settings.receive.enabled and daemon.alive:
            return f"receiver: NOT LISTENING on {settings.receive.listen} (see the daemon's log)"
        return None
    return (
        f"receiver: {info.get('ae_title')} listening on {info.get('listen')}, "
        f"{info.get('associations', 0)} association(s) now, received "
        f"{info.get('received_last_hour', 0)} in the last hour, "
        f"{info.get('received_last_day', 0)} in the last day; "
        f"{info.get('rejected_associations', 0)} association(s) rejected since start"
        + (f"; {info['queueing']} acknowledged, being queued" if info.get("queueing") else "")
        + (f"; QUEUEING FAILS: {info['queue_error']}" if info.get("queue_error") else "")
    )


def render(
    daemon: DaemonStatus,
    dests: list[DestinationStatus],
    now: float,
    settings: Settings | None = None,
) -> str:
    """The human form: a line about the daemon (and the receiver), then one table row per
    destination."""
    headers = [
        "DESTINATION",
        "PENDING",
        "IN FLIGHT",
        "SENT 1H",
        "SENT 24H",
        "QUARANTINED",
        "OLDEST PENDING",
        "LAST SUCCESS",
        "PAUSED",
        "LAST ERROR",
    ]
    rows = []
    for d in dests:
        oldest = d.oldest_pending_at
        error = "-"
        latest = d.latest_error()
        if latest is not None:
            error = f"{common.ago(latest[0], now)}: {common.short(latest[1], 50)}"
        rows.append(
            [
                d.name if d.address else f"{d.name} (not configured)",
                d.counts[State.PENDING],
                d.counts[State.INFLIGHT],
                d.sent_last_hour,
                d.sent_last_day,
                d.counts[State.QUARANTINED],
                "-" if oldest is None else common.age(now - oldest),
                common.ago(d.last_success_at, now),
                "no"
                if d.paused_until is None
                else f"until {common.local_time(d.paused_until, now)}",
                error,
            ]
        )
    body = common.table(headers, rows, right=(1, 2, 3, 4, 5, 6)) if rows else "no destinations"
    for d in dests:  # Storage Commitment: stored, not yet "sent" (their files are kept)
        n = d.counts[State.COMMITTING]
        if n:
            since = d.awaiting_since
            body += (
                f"\n{d.name}: {n} stored, awaiting commitment since "
                f"{common.local_time(since, now)} ({common.ago(since, now)})"
            )
            if d.commitment_error:  # the peer does not take the requests: say why
                body += f"; request not taken: {common.short(d.commitment_error, 80)}"
    receiver = _receiver(daemon, settings)
    head = _head(daemon, now) if receiver is None else f"{_head(daemon, now)}\n{receiver}"
    return f"{head}\n{body}"


@common.command("forwarder status")
def run(args: argparse.Namespace) -> int:
    settings = common.load(args)
    now = time.time()
    with common.open_outbox(settings) as outbox:
        daemon, dests = collect(settings, outbox, now)
    if args.json:
        common.print_json(
            {
                "now": iso(now),
                "outbox": str(settings.outbox.path),
                "daemon": daemon.to_json(now),
                "destinations": [d.to_json(now) for d in dests],
            }
        )
    else:
        print(render(daemon, dests, now, settings))
    return 0
