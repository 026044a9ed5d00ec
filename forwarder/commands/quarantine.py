"""``forwarder quarantine list|show|requeue|purge``: the operator's hands on quarantined files.

A file lands in quarantine two ways. Once every destination is done with it and at least one
refused it for good, the daemon moves it under ``quarantine.dir`` (at its path relative to the
inbox) with a ``<file>.json`` sidecar, and points its outbox rows there: the rows of the
destinations that refused it are ``QUARANTINED``. A file that never became sendable DICOM is
quarantined with a sidecar only: the outbox never saw it.

Requeue
-------
``requeue`` puts a file back under the inbox at its original relative path (never over another
file) and its ``QUARANTINED`` rows back to pending, so only the destinations that refused it
get it again: the daemon's enqueuer finds the file's rows (same path, size and mtime) and does
not queue it anew. The steps are ordered so the daemon never sees a half-done requeue:

1. ``set_path``: every row of the file points at the inbox target (all rows are final, so no
   worker claims one, and the file is not there yet, so the enqueuer cannot see it);
2. the rows are requeued due a little later (`_lead`): a worker that claimed one before the
   file is in place would find no file and drop the row as gone;
3. the file is moved (a rename; a copy across file systems), then its sidecar removed;
4. any row a worker did drop meanwhile (a copy slower than the lead) is requeued again.

Once the file is in the inbox its rows are pending, so the enqueuer leaves it alone (it would
dispose of a known file whose rows are all final).
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forwarder import filing
from forwarder.commands import common
from forwarder.config import Settings
from forwarder.logs import escape, iso
from forwarder.outbox import Delivery, Outbox, PathConflictError, State
from forwarder.policy import IDLE_SECONDS
from forwarder.status import status_hex

__all__ = ["Entry", "QuarantinedFile", "add_arguments", "entries", "files", "run"]

_ALL_ROWS = 1_000_000
_REQUEUE_LEAD_SECONDS = 2.0
_COPY_BYTES_PER_SECOND = 20e6  # a slow disk, for the lead of a copy across file systems
EXIT_NOTHING = 1


@dataclass(frozen=True)
class QuarantinedFile:
    """A file under ``quarantine.dir`` and its sidecar (None when it has none)."""

    path: Path
    sidecar: dict[str, Any] | None

    @property
    def sidecar_path(self) -> Path:
        return Path(f"{self.path}{filing.SIDECAR_SUFFIX}")

    @property
    def quarantined_at(self) -> float | None:
        """When it was quarantined: the sidecar's time, else the sidecar's or file's ctime."""
        text = (self.sidecar or {}).get("quarantined_at")
        if isinstance(text, str):
            with contextlib.suppress(ValueError):
                return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
        for candidate in (self.sidecar_path, self.path):
            with contextlib.suppress(OSError):
                return candidate.stat().st_ctime
        return None

    @property
    def reason(self) -> str | None:
        value = (self.sidecar or {}).get("reason")
        return str(value) if value else None


@dataclass(frozen=True)
class Entry:
    """One line of ``quarantine list``: a refused (file, destination), or a file never queued."""

    path: str
    sop_instance_uid: str | None
    study_uid: str | None
    destination: str | None
    status: int | None
    reason: str | None
    when: float | None
    in_quarantine: bool
    """False: the file is still in the inbox, waiting for the other destinations."""
    delivery_id: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "sop_instance_uid": self.sop_instance_uid,
            "study_uid": self.study_uid,
            "destination": self.destination,
            "status": status_hex(self.status),
            "reason": self.reason,
            "quarantined_at": iso(self.when),
            "in_quarantine": self.in_quarantine,
            "delivery_id": self.delivery_id,
        }


def _is_sidecar(path: Path) -> bool:
    """A ``<file>.json`` beside its file, or an orphan one (its file is gone)."""
    if not path.name.endswith(filing.SIDECAR_SUFFIX):
        return False
    if path.with_name(path.name[: -len(filing.SIDECAR_SUFFIX)]).is_file():
        return True
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "quarantined_path" in data


def files(settings: Settings) -> list[QuarantinedFile]:
    """Every file under ``quarantine.dir`` (not sidecars, not hidden temporaries), by path."""
    root = settings.quarantine.dir
    found = []
    for top, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(top) / name
            if name.startswith(".") or path.is_symlink() or not path.is_file():
                continue  # a symlink is never a quarantined file: the daemon moves files
            if _is_sidecar(path):
                continue
            found.append(QuarantinedFile(path, filing.read_sidecar(path)))
    return found


def entries(settings: Settings, outbox: Outbox) -> list[Entry]:
    """The outbox's QUARANTINED rows, plus quarantined files that have none, oldest first."""
    qdir = settings.quarantine.dir
    rows = outbox.list(states=[State.QUARANTINED], limit=_ALL_ROWS)
    result = [
        Entry(
            path=d.path,
            sop_instance_uid=d.sop_instance_uid,
            study_uid=d.study_uid,
            destination=d.destination,
            status=d.last_status,
            reason=d.last_error,
            when=d.done_at,
            in_quarantine=Path(d.path).is_relative_to(qdir),
            delivery_id=d.id,
        )
        for d in rows
    ]
    with_rows = {d.path for d in rows}
    for f in files(settings):
        if str(f.path) in with_rows:
            continue
        side = f.sidecar or {}
        result.append(
            Entry(
                path=str(f.path),
                sop_instance_uid=side.get("sop_instance_uid"),
                study_uid=side.get("study_uid"),
                destination=None,
                status=None,
                reason=f.reason or ("no sidecar" if f.sidecar is None else None),
                when=f.quarantined_at,
                in_quarantine=True,
                delivery_id=None,
            )
        )
    result.sort(key=lambda e: (e.when or 0.0, e.path, e.destination or ""))
    return result


def _shown(path: str, settings: Settings) -> str:
    p = Path(path)
    if p.is_relative_to(settings.quarantine.dir):
        return str(p.relative_to(settings.quarantine.dir))
    return f"(inbox) {path}"


def _within(path: Path, root: Path) -> Path | None:
    """`path` relative to `root` once both are resolved for real (symlinks and ``..``
    followed, as the kernel would), or None when it lies outside."""
    real = Path(os.path.realpath(path))
    real_root = Path(os.path.realpath(root))
    if real == real_root or not real.is_relative_to(real_root):
        return None
    return real.relative_to(real_root)


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
        rel = _within(c, qdir)
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
    f = QuarantinedFile(path, filing.read_sidecar(path))
    with common.open_outbox(settings) as outbox:
        rows = outbox.list(path=str(path), limit=_ALL_ROWS)
    header, problem = dicom_summary(path)
    if args.json:
        common.print_json(
            {
                "path": str(path),
                "size": path.stat().st_size,
                "sidecar": f.sidecar,
                "quarantined_at": iso(f.quarantined_at),
                "deliveries": [common.delivery_json(d, now) for d in rows],
                "dicom": header,
                "dicom_error": problem,
            }
        )
        return 0
    side = f.sidecar or {}
    print(f"file:         {escape(str(path))} ({path.stat().st_size} bytes)")
    when = f.quarantined_at
    print(f"quarantined:  {common.local_time(when, now)} ({common.ago(when, now)})")
    print(f"original:     {escape(str(side.get('original_path') or '-'))}")
    reason = side.get("reason") or ("(no sidecar)" if f.sidecar is None else "-")
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


class UnsafeTarget(ValueError):
    """The place a quarantined file would go back to is not under the inbox."""


def _target(f: QuarantinedFile, settings: Settings) -> Path:
    """Where the file goes back: its original path under the watched folder it came from.

    The sidecar's ``original_path`` is only a hint (anyone who can write the quarantine can
    edit it). An absolute path under a watched folder, without ``..``, is used; one under no
    watched folder (the inbox moved since) or no sidecar at all: the file's path relative to
    ``quarantine.dir`` (the quarantine keeps the inbox's relative paths) under the first
    watched folder. Either way the target must resolve inside its watched folder (no
    symlinked folder leading out).

    Raises
    ------
    UnsafeTarget
        ``original_path`` has ``..`` or is not absolute, or the target resolves outside the
        watched folder; nothing is moved.
    """
    roots = sorted(settings.watch.paths, key=lambda r: len(r.parts), reverse=True)
    original = (f.sidecar or {}).get("original_path")
    given = Path(str(original)) if original is not None else None
    if given is not None and (
        not isinstance(original, str) or not given.is_absolute() or ".." in given.parts
    ):
        raise UnsafeTarget(
            f"its sidecar's original_path {str(original)!r} is not a plain path under "
            "watch.paths; fix or remove the sidecar"
        )
    root = next((r for r in roots if given is not None and given.is_relative_to(r)), None)
    if given is not None and root is not None and given != root:
        target = filing.unique_target(root, given.relative_to(root))
    else:
        root = settings.watch.paths[0]
        target = filing.unique_target(root, f.path.relative_to(settings.quarantine.dir))
    if _within(target, root) is None:
        raise UnsafeTarget(
            f"{target} resolves to {os.path.realpath(target)}, outside the watched folder {root}"
        )
    return target


def _lead(f: QuarantinedFile, target: Path) -> float:
    """Seconds the requeued rows wait for the file: a rename is instant, a copy is not."""
    with contextlib.suppress(OSError):
        st = f.path.stat()
        parent = next(p for p in [target.parent, *target.parents] if p.exists())
        if parent.stat().st_dev != st.st_dev:
            return _REQUEUE_LEAD_SECONDS + st.st_size / _COPY_BYTES_PER_SECOND
    return _REQUEUE_LEAD_SECONDS


@dataclass(frozen=True)
class Requeued:
    """What one requeue did."""

    source: str
    target: str | None
    """None when the file stayed where it was (still in the inbox)."""
    destinations: tuple[str, ...]
    """The destinations it is queued for again (none: the enqueuer examines it afresh)."""


def requeue_file(
    settings: Settings, outbox: Outbox, f: QuarantinedFile, want: Callable[[Delivery], bool]
) -> Requeued:
    """Move a quarantined file back into the inbox; queue it again where `want` (see above).

    Raises
    ------
    OSError
        The file cannot be moved; its rows then point at it where it still is (the
        requeued ones are sent from there).
    PathConflictError
        The outbox already has rows for this very file at the target path (nothing changed).
    UnsafeTarget
        The file would go back outside the inbox (see `_target`; nothing changed).
    """
    target = _target(f, settings)
    rows = outbox.list(path=str(f.path), limit=_ALL_ROWS)
    again = [d for d in rows if d.state in (State.QUARANTINED, State.GONE) and want(d)]
    target.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    outbox.set_path(str(f.path), str(target), now=now)
    ids = [d.id for d in again]
    outbox.requeue(ids, now + _lead(f, target))
    try:
        filing.move_durably(f.path, target)
    except OSError:
        outbox.set_path(str(target), str(f.path), now=time.time())
        raise
    with contextlib.suppress(FileNotFoundError):
        f.sidecar_path.unlink()
    dropped = [
        d.id
        for d in outbox.list(path=str(target), states=[State.GONE], limit=_ALL_ROWS)
        if d.id in ids
    ]
    if dropped:
        outbox.requeue(dropped, time.time())
    return Requeued(str(f.path), str(target), tuple(sorted({d.destination for d in again})))


def _requeue_in_inbox(outbox: Outbox, rows: list[Delivery]) -> list[Requeued]:
    """QUARANTINED rows whose file is still in the inbox (other destinations pending)."""
    done = []
    by_path: dict[str, list[Delivery]] = {}
    for d in rows:
        by_path.setdefault(d.path, []).append(d)
    for path, group in sorted(by_path.items()):
        if not Path(path).is_file():
            print(f"skipped {path}: the file is missing", file=sys.stderr)
            continue
        outbox.requeue([d.id for d in group], time.time())
        done.append(Requeued(path, None, tuple(sorted(d.destination for d in group))))
    return done


def _selected(
    args: argparse.Namespace, settings: Settings, outbox: Outbox
) -> Iterator[tuple[QuarantinedFile, Callable[[Delivery], bool]]]:
    """(file, which of its rows to requeue) for each file the arguments name."""
    if args.paths:
        for text in args.paths:
            path = _resolve(text, settings)
            yield QuarantinedFile(path, filing.read_sidecar(path)), lambda d: True
        return

    def want(d: Delivery) -> bool:
        return args.destination in (None, d.destination) and args.study in (None, d.study_uid)

    for f in files(settings):
        if args.all:
            yield f, want
            continue
        rows = outbox.list(path=str(f.path), states=[State.QUARANTINED], limit=_ALL_ROWS)
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
                    limit=_ALL_ROWS,
                )
                if not Path(d.path).is_relative_to(qdir)
            ]
            done += _requeue_in_inbox(outbox, waiting)
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
            rows = outbox.list(path=str(f.path), states=[State.QUARANTINED], limit=_ALL_ROWS)
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
