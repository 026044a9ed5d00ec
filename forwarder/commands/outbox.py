"""``forwarder outbox check``: is the outbox file sound? (SQLite's integrity check)."""

from __future__ import annotations

import argparse
import time

from forwarder.commands import common
from forwarder.outbox import Outbox, OutboxCorruptError

__all__ = ["EXIT_DAMAGED", "add_arguments", "run"]

EXIT_DAMAGED = 1
"""The outbox is damaged (or cannot be read as a database at all)."""

_SHOWN = 20  # problems printed; SQLite lists up to 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Check the outbox file; exit 0 when it is sound, 1 when it is damaged."
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = sub.add_parser(
        "check",
        help="run SQLite's integrity check on the outbox (read-only; safe while the daemon runs)",
        description=(
            "Run SQLite's integrity check on the outbox, read-only (safe while the daemon "
            "runs). Exit 0 when it is sound; exit 1 with the problems found when it is "
            "damaged: then stop the daemon and restore the outbox from a backup."
        ),
    )
    common.add_config(check)
    check.add_argument(
        "--quick",
        action="store_true",
        help="quick_check: every page, but indexes are not compared with their tables "
        "(what the daemon runs at start-up)",
    )


@common.command("forwarder outbox")
def run(args: argparse.Namespace) -> int:
    settings = common.load(args)
    path = settings.outbox.path
    started = time.monotonic()
    if not path.is_file():
        raise common.CommandError(f"no outbox at {path}: the daemon has never run with this config")
    try:
        with Outbox(path, readonly=True) as outbox:
            problems = outbox.integrity_check(quick=args.quick)
    except OutboxCorruptError as exc:
        problems = [str(exc)]
    what = "quick_check" if args.quick else "integrity_check"
    if not problems:
        print(f"ok: {path} passed {what} in {time.monotonic() - started:.1f} s")
        return 0
    print(f"damaged: {path} failed {what} ({len(problems)} problems):")
    for line in problems[:_SHOWN]:
        print(f"  {line}")
    if len(problems) > _SHOWN:
        print(f"  ... and {len(problems) - _SHOWN} more")
    print(
        "stop the daemon and restore the outbox from a backup; see 'The outbox is damaged' "
        "in the README"
    )
    return EXIT_DAMAGED
