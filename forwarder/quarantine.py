"""Quarantined files, and the requeue protocol that puts one back into the inbox.

A file lands in quarantine two ways. Once every destination is done with it and at least one
refused it for good, the daemon moves it under ``quarantine.dir`` (at its path relative to the
inbox) with a ``<file>.json`` sidecar (`Sidecar.refused`), and points its outbox rows there:
the rows of the destinations that refused it are ``QUARANTINED``. A file that never became
sendable DICOM is quarantined with a sidecar only (`Sidecar.invalid`): the outbox never saw it.

Requeue
-------
`requeue_file` puts a file back under the inbox at its original relative path (never over
another file) and its ``QUARANTINED`` rows back to pending, so only the destinations that
refused it get it again: the daemon's enqueuer finds the file's rows (same path, size and
mtime) and does not queue it anew. The steps are ordered so the daemon never sees a half-done
requeue:

1. ``set_path``: every row of the file points at the inbox target (all rows are final, so no
   worker claims one, and the file is not there yet, so the enqueuer cannot see it);
2. the rows are requeued due a little later (`lead`): a worker that claimed one before the
   file is in place would find no file and drop the row as gone;
3. the file is moved (a rename; a copy across file systems), then its sidecar removed;
4. any row a worker did drop meanwhile (a copy slower than the lead) is requeued again.

Once the file is in the inbox its rows are pending, so the enqueuer leaves it alone (it would
dispose of a known file whose rows are all final).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forwarder import filing
from forwarder.logs import iso
from forwarder.outbox import Delivery, Outbox, State
from forwarder.sidecar import Sidecar, SidecarError, sidecar_path
from forwarder.status import status_hex

if TYPE_CHECKING:  # only the type: listing the quarantine loads no pydantic
    from forwarder.config import Settings

__all__ = [
    "ALL_ROWS",
    "Entry",
    "QuarantinedFile",
    "Requeued",
    "Sidecar",
    "SidecarError",
    "UnsafeTarget",
    "entries",
    "files",
    "lead",
    "requeue_file",
    "requeue_in_inbox",
    "target",
    "within",
]

ALL_ROWS = 1_000_000
"""`Outbox.list`'s limit when every row of a file, or of the quarantine, is wanted."""
REQUEUE_LEAD_SECONDS = 2.0
COPY_BYTES_PER_SECOND = 20e6  # a slow disk, for the lead of a copy across file systems


# -- quarantined files --------------------------------------------------------------------


@dataclass(frozen=True)
class QuarantinedFile:
    """A file under ``quarantine.dir`` and its sidecar (None when it has none, or a bad one)."""

    path: Path
    sidecar: Sidecar | None

    @classmethod
    def at(cls, path: Path) -> QuarantinedFile:
        """The file `path` with the sidecar beside it, if that one is readable."""
        try:
            return cls(path, Sidecar.read(sidecar_path(path)))
        except SidecarError:
            return cls(path, None)

    @property
    def sidecar_path(self) -> Path:
        return sidecar_path(self.path)

    @property
    def quarantined_at(self) -> float | None:
        """When it was quarantined: the sidecar's time, else the sidecar's or file's ctime."""
        if self.sidecar is not None and self.sidecar.quarantined_at is not None:
            return self.sidecar.quarantined_at
        for candidate in (self.sidecar_path, self.path):
            with contextlib.suppress(OSError):
                return candidate.stat().st_ctime
        return None

    @property
    def reason(self) -> str | None:
        return (self.sidecar.reason or None) if self.sidecar is not None else None


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
    """A ``<file>.json`` beside its file, or an orphan sidecar (its file is gone)."""
    if not path.name.endswith(filing.SIDECAR_SUFFIX):
        return False
    if path.with_name(path.name[: -len(filing.SIDECAR_SUFFIX)]).is_file():
        return True
    try:
        return Sidecar.read(path).quarantined_path is not None
    except SidecarError:
        return False


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
            found.append(QuarantinedFile.at(path))
    return found


def entries(settings: Settings, outbox: Outbox) -> list[Entry]:
    """The outbox's QUARANTINED rows, plus quarantined files that have none, oldest first."""
    qdir = settings.quarantine.dir
    rows = outbox.list(states=[State.QUARANTINED], limit=ALL_ROWS)
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
        side = f.sidecar
        result.append(
            Entry(
                path=str(f.path),
                sop_instance_uid=side.sop_instance_uid if side else None,
                study_uid=side.study_uid if side else None,
                destination=None,
                status=None,
                reason=f.reason or ("no sidecar" if side is None else None),
                when=f.quarantined_at,
                in_quarantine=True,
                delivery_id=None,
            )
        )
    result.sort(key=lambda e: (e.when or 0.0, e.path, e.destination or ""))
    return result


def within(path: Path, root: Path) -> Path | None:
    """`path` relative to `root` once both are resolved for real (symlinks and ``..``
    followed, as the kernel would), or None when it lies outside."""
    real = Path(os.path.realpath(path))
    real_root = Path(os.path.realpath(root))
    if real == real_root or not real.is_relative_to(real_root):
        return None
    return real.relative_to(real_root)


# -- requeue ------------------------------------------------------------------------------


class UnsafeTarget(ValueError):
    """The place a quarantined file would go back to is not under the inbox."""


def target(f: QuarantinedFile, settings: Settings) -> Path:
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
    original = f.sidecar.original_path if f.sidecar is not None else None
    given = Path(original) if original is not None else None
    if given is not None and (not given.is_absolute() or ".." in given.parts):
        raise UnsafeTarget(
            f"its sidecar's original_path {original!r} is not a plain path under "
            "watch.paths; fix or remove the sidecar"
        )
    root = next((r for r in roots if given is not None and given.is_relative_to(r)), None)
    if given is not None and root is not None and given != root:
        place = filing.unique_target(root, given.relative_to(root))
    else:
        root = settings.watch.paths[0]
        place = filing.unique_target(root, f.path.relative_to(settings.quarantine.dir))
    if within(place, root) is None:
        raise UnsafeTarget(
            f"{place} resolves to {os.path.realpath(place)}, outside the watched folder {root}"
        )
    return place


def lead(f: QuarantinedFile, place: Path) -> float:
    """Seconds the requeued rows wait for the file: a rename is instant, a copy is not."""
    with contextlib.suppress(OSError):
        st = f.path.stat()
        parent = next(p for p in [place.parent, *place.parents] if p.exists())
        if parent.stat().st_dev != st.st_dev:
            return REQUEUE_LEAD_SECONDS + st.st_size / COPY_BYTES_PER_SECOND
    return REQUEUE_LEAD_SECONDS


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
        The file would go back outside the inbox (see `target`; nothing changed).
    """
    place = target(f, settings)
    rows = outbox.list(path=str(f.path), limit=ALL_ROWS)
    again = [d for d in rows if d.state in (State.QUARANTINED, State.GONE) and want(d)]
    place.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    outbox.set_path(str(f.path), str(place), now=now)
    ids = [d.id for d in again]
    outbox.requeue(ids, now + lead(f, place))
    try:
        filing.move_durably(f.path, place)
    except OSError:
        outbox.set_path(str(place), str(f.path), now=time.time())
        raise
    with contextlib.suppress(FileNotFoundError):
        f.sidecar_path.unlink()
    dropped = [
        d.id
        for d in outbox.list(path=str(place), states=[State.GONE], limit=ALL_ROWS)
        if d.id in ids
    ]
    if dropped:
        outbox.requeue(dropped, time.time())
    return Requeued(str(f.path), str(place), tuple(sorted({d.destination for d in again})))


def requeue_in_inbox(outbox: Outbox, rows: Sequence[Delivery]) -> tuple[list[Requeued], list[str]]:
    """Requeue QUARANTINED rows whose file is still in the inbox (other destinations pending).

    Returns what was requeued, and the paths skipped because their file is missing.
    """
    done: list[Requeued] = []
    missing: list[str] = []
    by_path: dict[str, list[Delivery]] = {}
    for d in rows:
        by_path.setdefault(d.path, []).append(d)
    for path, group in sorted(by_path.items()):
        if not Path(path).is_file():
            missing.append(path)
            continue
        outbox.requeue([d.id for d in group], time.time())
        done.append(Requeued(path, None, tuple(sorted(d.destination for d in group))))
    return done, missing
