"""``forwarder find UID``: where an instance or study is, per destination, and its file now."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from forwarder.commands import common
from forwarder.logs import iso
from forwarder.outbox import Delivery, DestinationInfo, State
from forwarder.status import status_hex

__all__ = ["EXIT_NOT_FOUND", "add_arguments", "run"]

EXIT_NOT_FOUND = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Find a SOP Instance UID or a Study Instance UID in the outbox: which destinations "
        "have it (when, with which status), which are still waiting or quarantined, and where "
        "its file is now (inbox, quarantine, archive, or deleted after delivery). Exit 1 when "
        "the outbox has no row of it: never queued, or delivered longer ago than "
        "outbox.keep_sent_days."
    )
    common.add_config(parser)
    parser.add_argument("uid", metavar="UID", help="SOP Instance UID or Study Instance UID")
    common.add_json(parser)


def _not_found(keep_days: float, horizon: float | None) -> str:
    """Why a UID may be missing: never queued, or delivered before the retention horizon."""
    if keep_days <= 0:
        return "not in the outbox (never queued, or pruned long after delivery)"
    kept = f"delivered rows are kept {keep_days:g} days, outbox.keep_sent_days"
    if horizon is None:
        return f"not in the outbox: never queued ({kept}; none pruned yet)"
    return (
        f"not in the outbox: never queued, or delivered before {iso(horizon)} and past "
        f"retention ({kept})"
    )


@common.command("forwarder find")
def run(args: argparse.Namespace) -> int:
    settings = common.load(args)
    now = time.time()
    uid = args.uid.strip()
    with common.open_outbox(settings) as outbox:
        rows = outbox.find(uid)
        breakers = outbox.destination_info()
        horizon = outbox.retention_horizon()
    files = {d.path: common.location(Path(d.path), settings) for d in rows}

    def pause_of(d: Delivery) -> DestinationInfo | None:
        return common.pause_of(d, breakers, now)

    if args.json:
        common.print_json(
            {
                "uid": uid,
                "found": bool(rows),
                "deliveries": [
                    {
                        **common.delivery_json(d, now),
                        "file": files[d.path],
                        "paused_until": iso(p.paused_until) if (p := pause_of(d)) else None,
                        "pause_reason": p.pause_reason if p else None,
                    }
                    for d in rows
                ],
            }
        )
        return 0 if rows else EXIT_NOT_FOUND
    if not rows:
        print(f"{uid}: {_not_found(settings.outbox.keep_sent_days, horizon)}")
        return EXIT_NOT_FOUND
    instances = {d.sop_instance_uid for d in rows}
    if uid in instances:
        what = "SOP Instance"
    elif any(d.sent_uid == uid for d in rows):  # the UID a transform gave it
        what = f"SOP Instance as sent (original UID {rows[0].sop_instance_uid})"
    else:
        what = f"Study ({len(instances)} instances)"
    print(f"{uid}: {what}")
    table = []
    for d in rows:
        state, detail = d.state.name.lower(), d.last_error
        if d.sent_uid and d.state is State.SENT:
            detail = f"sent as {d.sent_uid}" + (f"; {detail}" if detail else "")
        pause = pause_of(d)
        if pause is not None:
            state, detail = "paused", pause.pause_reason
            until = pause.paused_until
            when = f"until {common.local_time(until, now)} ({common.ago(until, now)})"
        elif d.state is State.PENDING:
            due = "due now" if d.next_attempt_at <= now else common.ago(d.next_attempt_at, now)
            when = f"next {due}"
        elif d.state is State.INFLIGHT:
            when = "sending now"
        elif d.state is State.COMMITTING:
            state = "stored, awaiting commitment"
            when = f"since {common.local_time(d.last_attempt_at, now)}"
            detail = f"transaction {d.commit_uid}" + (f"; {detail}" if detail else "")
        else:
            when = common.local_time(d.done_at, now)
        file = files[d.path]
        if file == "missing" and d.state is State.SENT:
            file = "deleted after delivery"
        table.append(
            [
                d.sop_instance_uid,
                d.destination,
                state,
                when,
                d.attempts,
                status_hex(d.last_status),
                common.short(detail, 72),
                f"{file}: {d.path}" if file not in ("missing", "deleted after delivery") else file,
            ]
        )
    headers = [
        "SOP INSTANCE UID",
        "DESTINATION",
        "STATE",
        "WHEN",
        "ATTEMPTS",
        "STATUS",
        "DETAIL",
        "FILE",
    ]
    print(common.table(headers, table, right=(4,)))
    return 0
