"""``forwarder queue list|retry``: look at the outbox's deliveries; make waiting ones due now."""

from __future__ import annotations

import argparse
import sys
import time

from forwarder.commands import common
from forwarder.outbox import State
from forwarder.policy import IDLE_SECONDS
from forwarder.status import status_hex

__all__ = ["BACKLOG", "add_arguments", "parse_states", "run"]

BACKLOG = (State.PENDING, State.INFLIGHT, State.COMMITTING)
"""What ``queue list`` shows without ``--state``: what is not done yet, including what is
stored and awaits the peer's Storage Commitment."""

_STATE_NAMES = {s.name.lower(): s for s in State} | {"in-flight": State.INFLIGHT}


def parse_states(values: list[str] | None) -> tuple[State, ...] | None:
    """``--state`` values (repeatable, comma-separated, ``all``) -> states; None means all.

    Raises
    ------
    common.CommandError
        For a name that is not a state.
    """
    if not values:
        return BACKLOG
    names = [n.strip().lower() for v in values for n in v.split(",") if n.strip()]
    if "all" in names:
        return None
    unknown = [n for n in names if n not in _STATE_NAMES]
    if unknown:
        known = ", ".join([*(s.name.lower() for s in State), "all"])
        raise common.CommandError(f"unknown state {unknown[0]!r} (states: {known})", 2)
    return tuple(dict.fromkeys(_STATE_NAMES[n] for n in names))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Look at the deliveries in the outbox, or make waiting ones due now."
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    ls = sub.add_parser(
        "list",
        help="list deliveries (default: pending and in flight), oldest first",
        description=(
            "List deliveries, one per file and destination, oldest first. Without --state "
            "only the backlog (pending, in flight, stored and awaiting commitment) is shown."
        ),
    )
    common.add_config(ls)
    ls.add_argument("--destination", metavar="D", help="only deliveries to D")
    ls.add_argument(
        "--state",
        metavar="S",
        action="append",
        help="pending, inflight, committing, sent, quarantined, gone or all (repeatable, or a,b)",
    )
    ls.add_argument("--study", metavar="UID", help="only this Study Instance UID")
    ls.add_argument("--limit", metavar="N", type=int, default=100, help="at most N (default 100)")
    common.add_json(ls)

    retry = sub.add_parser(
        "retry",
        help="make deliveries waiting for a retry due now",
        description=(
            "Make pending deliveries that wait for their next attempt (after a transient "
            "failure) due now. Attempts are not reset. The daemon's workers pick them up at "
            f"their next look at the outbox (within {IDLE_SECONDS:g} s). A paused destination "
            "stays paused until its pause ends."
        ),
    )
    common.add_config(retry)
    retry.add_argument("--destination", metavar="D", help="only deliveries to D")
    retry.add_argument("--study", metavar="UID", help="only this Study Instance UID")
    common.add_json(retry)


def _list(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise common.CommandError("--limit must be at least 1", 2)
    states = parse_states(args.state)
    settings = common.load(args)
    now = time.time()
    with common.open_outbox(settings) as outbox:
        rows = outbox.list(
            destination=args.destination, states=states, study_uid=args.study, limit=args.limit
        )
        breakers = outbox.destination_info()
    if args.json:
        common.print_json(
            {
                "deliveries": [common.delivery_json(d, now) for d in rows],
                "limit": args.limit,
                "truncated": len(rows) == args.limit,
            }
        )
        return 0
    if not rows:
        print("no deliveries match")
        return 0
    table = []
    for d in rows:
        error = d.last_error
        pause = common.pause_of(d, breakers, now)
        if pause is not None:  # as `forwarder find` says it: not "due now"
            until = pause.paused_until or now
            when = f"paused until {common.local_time(until, now)} ({common.ago(until, now)})"
            error = error or pause.pause_reason
        elif d.state is State.PENDING:
            when = "due now" if d.next_attempt_at <= now else common.ago(d.next_attempt_at, now)
        elif d.state is State.INFLIGHT:
            when = "sending"
        elif d.state is State.COMMITTING:
            when = f"stored, awaiting commitment since {common.local_time(d.last_attempt_at, now)}"
        else:
            when = common.local_time(d.done_at, now)
        table.append(
            [
                d.id,
                d.destination,
                d.state.name.lower(),
                d.attempts,
                when,
                status_hex(d.last_status),
                d.sop_instance_uid,
                d.path,
                common.short(error, 50),
            ]
        )
    headers = [
        "ID",
        "DESTINATION",
        "STATE",
        "ATTEMPTS",
        "NEXT/DONE",
        "STATUS",
        "SOP INSTANCE UID",
        "PATH",
        "LAST ERROR",
    ]
    print(common.table(headers, table, right=(0, 3)))
    if len(rows) == args.limit:
        print(f"(first {args.limit} shown; --limit N for more)", file=sys.stderr)
    return 0


def _retry(args: argparse.Namespace) -> int:
    settings = common.load(args)
    now = time.time()
    with common.open_outbox(settings, write=True) as outbox:
        changed = outbox.retry_now(now, destination=args.destination, study_uid=args.study)
        nudged = changed > 0 and common.nudge_daemon(outbox, settings)
        paused = [
            name
            for name, info in outbox.destination_info().items()
            if info.paused(now) and args.destination in (None, name)
        ]
    if args.json:
        common.print_json(
            {"retried": changed, "paused_destinations": sorted(paused), "daemon_woken": nudged}
        )
        return 0
    print(
        f"{changed} deliveries made due now"
        + ("" if nudged or not changed else f"; the daemon picks them up within {IDLE_SECONDS:g} s")
    )
    for name in sorted(paused):
        print(f"note: destination {name} is paused; its deliveries wait for the pause to end")
    return 0


@common.command("forwarder queue")
def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        return _list(args)
    return _retry(args)
