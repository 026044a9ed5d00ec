"""``forwarder quarantine list|show|requeue|purge``: the operator's hands on quarantined files.

What is in quarantine, and how a file goes back to the inbox, is `forwarder.quarantine`; this
module is the command line: arguments, printing and confirmation.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from forwarder.commands import common
from forwarder.config import Settings
from forwarder.logs import escape, iso
from forwarder.outbox import Delivery, Outbox, PathConflictError, State
from forwarder.policy import IDLE_SECONDS
from forwarder.quarantine import (
    ALL_ROWS,
    QuarantinedFile,
    Requeued,
    UnsafeTarget,
    entries,
    files,
    requeue_file,
    requeue_in_inbox,
    within,
)
from forwarder.status import status_hex

__all__ = ["EXIT_NOTHING", "add_arguments", "dicom_summary", "run"]

EXIT_NOTHING = 1
"""``requeue`` found nothing to requeue."""


def _shown(path: str, settings: Settings) -> str:
    p = Path(path)
    if p.is_relative_to(settings.quarantine.dir):
        return str(p.relative_to(settings.quarantine.dir))
    return f"(inbox) {path}"


def _resolve(text: str, settings: Settings) -> Path:
    """A PATH argument: absolute, relative to ``quarantine.dir``, or relative to the cwd.

    Returns the file as ``quarantine.dir / <its real path relative to the quarantine>``, the
    form the daemon records. Anything that resolves outside ``quarantine.dir`` (``..``, a
    symlink to elsewhere) is refused: requeue moves the file it names.
    """
    given = Path(text)
    qdir = settings.quarantine.dir
    candidates = [given] if given.is_absolute() else [qdir / given, given]
    for c in candidates:
        if not c.is_file():
            continue
        rel = within(c, qdir)
        if rel is None:
            raise common.CommandError(
                f"{text}: not under quarantine.dir {qdir} (resolves to {os.path.realpath(c)})"
            )
        return qdir / rel
    raise common.CommandError(f"{text}: no such file in {qdir}")


# -- list ---------------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    settings = common.load(args)
    now = time.time()
    with common.open_outbox(settings) as outbox:
        found = entries(settings, outbox)
    if args.json:
        qdir = str(settings.quarantine.dir)
        common.print_json({"quarantine_dir": qdir, "entries": [e.to_json() for e in found]})
        return 0
    if not found:
        print(f"nothing in quarantine ({settings.quarantine.dir})")
        return 0
    print(f"quarantine: {settings.quarantine.dir}")
    rows = [
        [
            _shown(e.path, settings),
            e.sop_instance_uid,
            e.destination,
            status_hex(e.status),
            common.local_time(e.when, now),
            common.short(e.reason, 70),
        ]
        for e in found
    ]
    headers = ["PATH", "SOP INSTANCE UID", "DESTINATION", "STATUS", "WHEN", "REASON"]
    print(common.table(headers, rows))
    return 0


# -- show ---------------------------------------------------------------------------------

_HEADER_FIELDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "SeriesDescription",
    "SeriesNumber",
    "InstanceNumber",
    "AccessionNumber",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "InstitutionName",
    "StationName",
)


def dicom_summary(path: Path) -> tuple[dict[str, str | None], str | None]:
    """A few header elements read with pydicom (no pixel data), or why it cannot be read."""
    with warnings.catch_warnings():  # force=True guesses at anything; we judge the result
        warnings.simplefilter("ignore")
        return _summary(path)


def _summary(path: Path) -> tuple[dict[str, str | None], str | None]:
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        ds = dcmread(path, stop_before_pixels=True, force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        return {}, f"not readable as DICOM: {common.short(str(exc), 200)}"
    summary: dict[str, str | None] = {}
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    summary["TransferSyntaxUID"] = _uid_text(ts)
    for keyword in _HEADER_FIELDS:
        try:
            value = ds.get(keyword)
        except Exception:  # a malformed element: show that, not a traceback
            summary[keyword] = "(unreadable)"
            continue
        summary[keyword] = None if value is None or value == "" else _uid_text(value)
    if not any(summary.get(k) for k in ("SOPClassUID", "SOPInstanceUID")):
        return summary, "no SOP Class / SOP Instance UID: not a DICOM data set"
    return summary, None


def _uid_text(value: Any) -> str | None:
    if value is None:
        return None
    name = getattr(value, "name", None)
    text = str(value)
    return f"{name} ({text})" if name and name != text else text


def _show(args: argparse.Namespace) -> int:
    settings = common.load(args)
    now = time.time()
    path = _resolve(args.path, settings)
    f = QuarantinedFile.at(path)
    with common.open_outbox(settings) as outbox:
        rows = outbox.list(path=str(path), limit=ALL_ROWS)
    header, problem = dicom_summary(path)
    if args.json:
        common.print_json(
            {
                "path": str(path),
                "size": path.stat().st_size,
                "sidecar": None if f.sidecar is None else f.sidecar.to_json(),
                "quarantined_at": iso(f.quarantined_at),
                "deliveries": [common.delivery_json(d, now) for d in rows],
                "dicom": header,
                "dicom_error": problem,
            }
        )
        return 0
    side = f.sidecar
    print(f"file:         {escape(str(path))} ({path.stat().st_size} bytes)")
    when = f.quarantined_at
    print(f"quarantined:  {common.local_time(when, now)} ({common.ago(when, now)})")
    print(f"original:     {escape((side.original_path if side else None) or '-')}")
    reason = f.reason or ("(no sidecar)" if side is None else "-")
    print(f"reason:       {escape(str(reason))}")
    print(f"sidecar:      {escape(str(f.sidecar_path)) if f.sidecar is not None else '-'}")
    if rows:
        print("destinations:")
        table = [
            [
                d.destination,
                d.state.name.lower(),
                status_hex(d.last_status),
                d.attempts,
                common.local_time(d.done_at, now),
                common.short(d.last_error, 70),
            ]
            for d in rows
        ]
        print(
            _indent(common.table(["NAME", "STATE", "STATUS", "ATTEMPTS", "DONE", "DETAIL"], table))
        )
    else:
        print("destinations: none (never queued)")
    print("DICOM header:" + (f" {problem}" if problem else ""))
    shown = [[k, v] for k, v in header.items() if v is not None]
    if shown:
        print(_indent(common.table(["ELEMENT", "VALUE"], shown)))
    return 0


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


# -- requeue ------------------------------------------------------------------------------


def _selected(
    args: argparse.Namespace, settings: Settings, outbox: Outbox
) -> Iterator[tuple[QuarantinedFile, Callable[[Delivery], bool]]]:
    """(file, which of its rows to requeue) for each file the arguments name."""
    if args.paths:
        for text in args.paths:
            path = _resolve(text, settings)
            yield QuarantinedFile.at(path), lambda d: True
        return

    def want(d: Delivery) -> bool:
        return args.destination in (None, d.destination) and args.study in (None, d.study_uid)

    for f in files(settings):
        if args.all:
            yield f, want
            continue
        rows = outbox.list(path=str(f.path), states=[State.QUARANTINED], limit=ALL_ROWS)
        if any(want(d) for d in rows):
            yield f, want


def _requeue(args: argparse.Namespace) -> int:
    settings = common.load(args)
    if not settings.watch.paths:
        raise common.CommandError("watch.paths is empty: there is no inbox to requeue into")
    done: list[Requeued] = []
    failed = 0
    with common.open_outbox(settings, write=True) as outbox:
        for f, want in list(_selected(args, settings, outbox)):
            try:
                done.append(requeue_file(settings, outbox, f, want))
            except (OSError, PathConflictError, UnsafeTarget) as exc:
                failed += 1
                print(f"cannot requeue {escape(str(f.path))}: {escape(str(exc))}", file=sys.stderr)
        if not args.paths:
            qdir = settings.quarantine.dir
            waiting = [
                d
                for d in outbox.list(
                    destination=args.destination,
                    states=[State.QUARANTINED],
                    study_uid=args.study,
                    limit=ALL_ROWS,
                )
                if not Path(d.path).is_relative_to(qdir)
            ]
            in_inbox, missing = requeue_in_inbox(outbox, waiting)
            for path in missing:
                print(f"skipped {path}: the file is missing", file=sys.stderr)
            done += in_inbox
        nudged = bool(done) and common.nudge_daemon(outbox, settings)
    for r in done:
        dests = ", ".join(r.destinations) if r.destinations else "a fresh look by the daemon"
        if r.target is None:
            print(f"requeued {escape(r.source)} (still in the inbox) for {dests}")
        else:
            shown = escape(_shown(r.source, settings))
            print(f"requeued {shown} -> {escape(str(r.target))} for {dests}")
    if not done and not failed:
        print("nothing to requeue")
        return EXIT_NOTHING
    print(
        f"{len(done)} file(s) requeued, "
        f"{sum(len(r.destinations) for r in done)} deliveries queued again"
        + (f", {failed} failed" if failed else "")
        + (
            "; the daemon was told"
            if nudged
            else f"; the daemon sends them within about {IDLE_SECONDS:g} s"
        )
    )
    return common.EXIT_FAILED if failed else 0


# -- purge --------------------------------------------------------------------------------


def _confirm(question: str) -> bool:
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def _purge(args: argparse.Namespace) -> int:
    if args.older_than < 0:
        raise common.CommandError("--older-than must be 0 or more days", 2)
    settings = common.load(args)
    now = time.time()
    cutoff = now - args.older_than * common.DAY
    victims = [f for f in files(settings) if (f.quarantined_at or now) <= cutoff]
    if not victims:
        print(f"nothing in {settings.quarantine.dir} is older than {args.older_than:g} days")
        return 0
    size = sum(f.path.stat().st_size for f in victims if f.path.exists())
    what = (
        f"{len(victims)} quarantined file(s), {size / 1e6:.1f} MB, older than "
        f"{args.older_than:g} days in {settings.quarantine.dir}"
    )
    if not args.yes:
        if not sys.stdin.isatty():
            raise common.CommandError(f"would delete {what}; not a terminal: pass --yes to confirm")
        if not _confirm(f"Delete {what}?"):
            print("nothing deleted")
            return common.EXIT_FAILED
    deleted = 0
    with common.open_outbox(settings, write=True) as outbox:
        for f in victims:
            rows = outbox.list(path=str(f.path), states=[State.QUARANTINED], limit=ALL_ROWS)
            try:
                f.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                print(f"cannot delete {f.path}: {exc}", file=sys.stderr)
                continue
            with contextlib.suppress(FileNotFoundError):
                f.sidecar_path.unlink()
            outbox.discard([d.id for d in rows], "purged from quarantine by an operator", now)
            deleted += 1
    print(f"deleted {deleted} of {len(victims)} quarantined file(s) with their sidecars")
    return 0 if deleted == len(victims) else common.EXIT_FAILED


# -- command ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "List, inspect, requeue or purge quarantined files."
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    ls = sub.add_parser(
        "list",
        help="what is in quarantine and why",
        description=(
            "One line per refused (file, destination) -- path, SOP Instance UID, destination, "
            "status, reason, when -- and one per file quarantined before it was ever queued "
            "(not DICOM, a DICOMDIR). Paths are relative to quarantine.dir."
        ),
    )
    common.add_config(ls)
    common.add_json(ls)

    show = sub.add_parser(
        "show",
        help="one quarantined file: its sidecar, destinations and DICOM header",
        description="Show a quarantined file's sidecar, its deliveries and a DICOM header summary.",
    )
    common.add_config(show)
    show.add_argument("path", metavar="PATH", help="absolute, or relative to quarantine.dir")
    common.add_json(show)

    rq = sub.add_parser(
        "requeue",
        help="send quarantined files again, to the destinations that refused them",
        description=(
            "Move quarantined files back into the inbox (their original path, never over "
            "another file) and queue them again for the destinations that refused them only; "
            "files never queued are examined afresh. Fix the cause first (the peer's "
            "configuration, or the file)."
        ),
    )
    common.add_config(rq)
    which = rq.add_mutually_exclusive_group(required=True)
    which.add_argument("paths", metavar="PATH", nargs="*", default=[], help="files to requeue")
    which.add_argument("--destination", metavar="D", help="everything destination D refused")
    which.add_argument("--study", metavar="UID", help="everything of this Study Instance UID")
    which.add_argument("--all", action="store_true", help="everything in quarantine")

    purge = sub.add_parser(
        "purge",
        help="delete quarantined files older than DAYS",
        description=(
            "Delete quarantined files and their sidecars quarantined more than DAYS days ago; "
            "their deliveries are closed as gone. Asks first unless --yes."
        ),
    )
    common.add_config(purge)
    purge.add_argument(
        "--older-than", metavar="DAYS", type=float, required=True, help="age in days"
    )
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")


_ACTIONS: dict[str, Callable[[argparse.Namespace], int]] = {
    "list": _list,
    "show": _show,
    "requeue": _requeue,
    "purge": _purge,
}


@common.command("forwarder quarantine")
def run(args: argparse.Namespace) -> int:
    return _ACTIONS[args.action](args)
