"""Shared plumbing of the operator commands: options, settings, outbox access, output."""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from forwarder.config import Settings, load_settings
from forwarder.errors import EX_CONFIG, ConfigError, add_config_argument
from forwarder.logs import escape, iso
from forwarder.outbox import Delivery, DestinationInfo, Outbox, OutboxError, State
from forwarder.status import status_hex

__all__ = [
    "DAY",
    "EXIT_FAILED",
    "HOUR",
    "MINUTE",
    "CommandError",
    "add_config",
    "add_json",
    "age",
    "ago",
    "command",
    "delivery_json",
    "load",
    "local_time",
    "location",
    "open_outbox",
    "print_json",
    "short",
    "table",
]

EXIT_FAILED = 1
"""The command ran but could not do (all of) what was asked."""

# seconds in each unit of the durations operators read and type (``3m12s``, ``--older-than DAYS``)
MINUTE = 60
HOUR = 3600
DAY = 86400
_FUTURE_SLACK = 0.5  # seconds: a time this close to now is "ago", not "in" (clock jitter)


class CommandError(Exception):
    """Stop a command with a one-line message on stderr and an exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


# -- options ----------------------------------------------------------------------------


def add_config(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``, defaulting to ``$FORWARDER_CONFIG``."""
    add_config_argument(parser)


def add_json(parser: argparse.ArgumentParser) -> None:
    """``--json``: one JSON document on stdout instead of a table."""
    parser.add_argument(
        "--json", action="store_true", help="print JSON (complete, stable keys) instead of a table"
    )


# -- running a command ----------------------------------------------------------------


def command(prog: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[..., int]]:
    """Decorate a ``run(args) -> int``: config, outbox and command errors become exit statuses.

    A `ConfigError` prints one line per bad setting and returns 78 (EX_CONFIG); an
    `OutboxError` or a `CommandError` prints its one line and returns 1 (or the
    `CommandError`'s status). Anything else is a bug and propagates.
    """

    def wrap(run: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
        @functools.wraps(run)
        def wrapped(args: argparse.Namespace) -> int:
            try:
                return run(args)
            except ConfigError as exc:
                exc.report(prog)
                return EX_CONFIG
            except OutboxError as exc:
                print(f"{prog}: {exc}", file=sys.stderr)
                return EXIT_FAILED
            except CommandError as exc:
                print(f"{prog}: {exc}", file=sys.stderr)
                return exc.status

        return wrapped

    return wrap


def load(args: argparse.Namespace) -> Settings:
    """The settings named by ``args.config`` (and the environment); raises `ConfigError`."""
    return load_settings(args.config)


@contextmanager
def open_outbox(settings: Settings, *, write: bool = False) -> Iterator[Outbox]:
    """The daemon's outbox: read-only (never blocks the daemon) unless `write`.

    A writer uses the outbox's short transactions. Neither creates an outbox that does
    not exist yet.

    Raises
    ------
    CommandError
        When there is no outbox at ``outbox.path``.
    OutboxError
        When it cannot be opened.
    """
    path = settings.outbox.path
    if not path.is_file():
        raise CommandError(f"no outbox at {path}: the daemon has never run with this config")
    with Outbox(path, readonly=not write) as outbox:
        yield outbox


def nudge_daemon(outbox: Outbox, settings: Settings) -> bool:
    """Ask the running daemon (SIGUSR1) to look at the outbox now; True if it was asked.

    Only a daemon on this host whose heartbeat is fresh, and whose process is still a
    forwarder, is signalled: a stale pid may belong to another program by now.
    """
    beat = outbox.read_heartbeat()
    if beat is None or beat.info.get("stopped"):
        return False
    if time.time() - beat.updated_at > settings.health.stale_seconds:
        return False
    try:
        cmdline = Path(f"/proc/{beat.pid}/cmdline").read_bytes()
    except OSError:
        return False
    if b"forwarder" not in cmdline:
        return False
    try:
        os.kill(beat.pid, signal.SIGUSR1)
    except OSError:  # another user's daemon: it looks again within IDLE_SECONDS anyway
        return False
    return True


# -- values -------------------------------------------------------------------------------


def local_time(ts: float | None, now: float) -> str:
    """Local time for a terminal: ``21:41:16`` today, ``2026-11-24 21:41`` otherwise."""
    if ts is None:
        return "-"
    if time.localtime(ts)[:3] == time.localtime(now)[:3]:
        return time.strftime("%H:%M:%S", time.localtime(ts))
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def age(seconds: float | None) -> str:
    """A duration in its two largest units: ``45s``, ``3m12s``, ``2h05m``, ``4d03h``."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < MINUTE:
        return f"{s}s"
    if s < HOUR:
        return f"{s // MINUTE}m{s % MINUTE:02d}s"
    if s < DAY:
        return f"{s // HOUR}h{s % HOUR // MINUTE:02d}m"
    return f"{s // DAY}d{s % DAY // HOUR:02d}h"


def ago(ts: float | None, now: float) -> str:
    """``3m12s ago``, ``in 2m05s`` for the future, ``never`` for None."""
    if ts is None:
        return "never"
    if ts > now + _FUTURE_SLACK:
        return f"in {age(ts - now)}"
    return f"{age(now - ts)} ago"


def short(text: str | None, width: int = 60) -> str:
    """One line of at most `width` characters for a table cell (``-`` for nothing)."""
    if not text:
        return "-"
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 3] + "..."


def location(path: Path, settings: Settings) -> str:
    """Where a file of the outbox is now: inbox, quarantine, archive, elsewhere or missing."""
    if not path.exists():
        return "missing"
    roots = [
        ("quarantine", settings.quarantine.dir),
        ("archive", settings.disposition.archive_dir),
        *(("inbox", p) for p in settings.watch.paths),
    ]
    for name, root in roots:
        if path.is_relative_to(root):
            return name
    return "elsewhere"


def delivery_json(d: Delivery, now: float) -> dict[str, Any]:
    """One outbox row for ``--json``: every column, times as ISO 8601 UTC."""
    return {
        "id": d.id,
        "path": d.path,
        "destination": d.destination,
        "state": d.state.name.lower(),
        "size": d.size,
        "sop_class_uid": d.sop_class_uid,
        "sop_instance_uid": d.sop_instance_uid,
        "study_uid": d.study_uid,
        "transfer_syntax": d.transfer_syntax,
        "attempts": d.attempts,
        "refusals": d.refusals,
        "transient_failures": d.transient_failures,
        "next_attempt_at": iso(d.next_attempt_at) if d.state is State.PENDING else None,
        "first_attempt_at": iso(d.first_attempt_at),
        "last_attempt_at": iso(d.last_attempt_at),
        "last_status": status_hex(d.last_status),
        "last_error": d.last_error,
        "sent_as": d.sent_as,
        "sent_uid": d.sent_uid,
        # stored, awaiting the peer's Storage Commitment under this transaction
        "commit_uid": d.commit_uid,
        "created_at": iso(d.created_at),
        "done_at": iso(d.done_at),
        "age_seconds": round(now - d.created_at, 3),
    }


# -- output -------------------------------------------------------------------------------


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    right: Sequence[int] = (),
) -> str:
    """Plain-text columns separated by two spaces; `right` lists right-aligned columns.

    None prints as ``-``. The last column is not padded, so long text does not push the
    line out further than it needs to.
    """
    cells = [[str(h) for h in headers]]
    # file names and UIDs come from whoever writes into the inbox: no control characters
    # reach the operator's terminal (see `logs.escape`)
    cells += [["-" if v is None else escape(str(v)) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = []
        for i, value in enumerate(row):
            last = i == len(row) - 1
            if i in right:
                parts.append(value.rjust(widths[i]))
            else:
                parts.append(value if last else value.ljust(widths[i]))
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def print_json(data: Any, out: TextIO | None = None) -> None:
    """Print `data` as indented JSON with sorted keys (stable for scripts and diffs)."""
    print(json.dumps(data, indent=2, sort_keys=True, default=str), file=out or sys.stdout)


def pause_of(
    d: Delivery, breakers: Mapping[str, DestinationInfo], now: float
) -> DestinationInfo | None:
    """The pause that holds `d` back now: a waiting delivery to a paused destination is not
    being sent, whatever its row says (it is in flight only while we try to connect)."""
    info = breakers.get(d.destination)
    if d.state in (State.PENDING, State.INFLIGHT) and info is not None and info.paused(now):
        return info
    return None
