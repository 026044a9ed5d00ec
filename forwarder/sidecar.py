"""The quarantine sidecar: why a file is in quarantine, as a versioned JSON type.

The sidecar is the ``<file>.json`` beside a quarantined file, a JSON object. Version 2
(`SIDECAR_VERSION`) writes every key, ``"version": 2`` included; version 1 (no
``"version"`` key) has the same keys, any of them possibly missing, and is still read.
"""

from __future__ import annotations

import calendar
import contextlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from forwarder import filing
from forwarder.logs import ISO_FORMAT, iso
from forwarder.outbox import Delivery, State
from forwarder.status import status_hex

__all__ = [
    "SIDECAR_VERSION",
    "DestinationRecord",
    "Sidecar",
    "SidecarError",
    "sidecar_path",
]

SIDECAR_VERSION = 2
"""The sidecar format written; 1 (a dict without ``"version"``) is still read."""


class SidecarError(ValueError):
    """A sidecar that cannot be used: unreadable, not JSON, not a sidecar's shape, or newer."""


def _parse_time(value: object, key: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise SidecarError(f"{key}: not a time: {value!r}")
    try:
        return float(calendar.timegm(time.strptime(value, ISO_FORMAT)))
    except ValueError:
        raise SidecarError(f"{key}: not an ISO 8601 UTC time: {value!r}") from None


def _parse_status(value: object, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value[:2].lower() == "0x":
        with contextlib.suppress(ValueError):
            return int(value, 16)
    raise SidecarError(f"{key}: not a status such as 0xA900: {value!r}")


def _text(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise SidecarError(f"{key}: expected text, got {value!r}")
    return value


def _whole(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    # bool is an int to Python, never a count or an id in a sidecar
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise SidecarError(f"{key}: expected a whole number, got {value!r}")
    return value


_STATES = {s.name.lower(): s for s in State}


@dataclass(frozen=True, kw_only=True)
class DestinationRecord:
    """A destination that does not have the file: its outbox row when it was quarantined."""

    state: State
    status: int | None
    """The last C-STORE status (None: no response, or never attempted)."""
    meaning: str | None
    """The last error, as the outbox recorded it."""
    attempts: int
    refusals: int
    """Of `attempts`, those the peer refused the instance itself (see `Delivery.refusals`)."""
    transient_failures: int
    """Of `attempts`, those that failed for a passing reason (out of resources, no response)."""
    first_attempt_at: float | None
    last_attempt_at: float | None
    delivery_id: int | None

    @classmethod
    def of(cls, row: Delivery) -> DestinationRecord:
        return cls(
            state=row.state,
            status=row.last_status,
            meaning=row.last_error,
            attempts=row.attempts,
            refusals=row.refusals,
            transient_failures=row.transient_failures,
            first_attempt_at=row.first_attempt_at,
            last_attempt_at=row.last_attempt_at,
            delivery_id=row.id,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state.name.lower(),
            "status": status_hex(self.status),
            "meaning": self.meaning,
            "attempts": self.attempts,
            # which attempts were which: the peer refusing the instance, or passing trouble
            # (out of resources, no response) that says nothing about it
            "refusals": self.refusals,
            "transient_failures": self.transient_failures,
            "first_attempt": iso(self.first_attempt_at),
            "last_attempt": iso(self.last_attempt_at),
            "delivery_id": self.delivery_id,
        }

    @classmethod
    def from_json(cls, name: str, data: object) -> DestinationRecord:
        """Read one entry of a sidecar's ``destinations``; raises `SidecarError`."""
        if not isinstance(data, dict):
            raise SidecarError(f"destinations.{name}: not an object")
        state = _STATES.get(str(data.get("state", "quarantined")))
        if state is None:
            raise SidecarError(f"destinations.{name}.state: unknown {data.get('state')!r}")
        try:
            return cls(
                state=state,
                status=_parse_status(data.get("status"), "status"),
                meaning=_text(data, "meaning"),
                attempts=_whole(data, "attempts") or 0,
                refusals=_whole(data, "refusals") or 0,
                transient_failures=_whole(data, "transient_failures") or 0,
                first_attempt_at=_parse_time(data.get("first_attempt"), "first_attempt"),
                last_attempt_at=_parse_time(data.get("last_attempt"), "last_attempt"),
                delivery_id=_whole(data, "delivery_id"),
            )
        except SidecarError as exc:
            raise SidecarError(f"destinations.{name}.{exc}") from None


@dataclass(frozen=True, kw_only=True)
class Sidecar:
    """Why a file is in quarantine: the ``<file>.json`` beside it.

    Build one with `invalid` or `refused`; `filing.quarantine` adds where the file came from
    and went (`placed`) and writes it.
    """

    version: int = SIDECAR_VERSION
    reason: str | None
    """One line; for a refused file ``destination: last error`` per refusing destination."""
    quarantined_at: float | None
    sop_instance_uid: str | None = None
    study_uid: str | None = None
    sop_class_uid: str | None = None
    destinations: Mapping[str, DestinationRecord] = field(default_factory=dict)
    """Only the destinations that do not have the file: a reader (or a requeue) must not take
    the ones that have it for failures; those are in `delivered_to`."""
    delivered_to: tuple[str, ...] = ()
    original_path: str | None = None
    """Where the file was in the inbox: a hint only (anyone who can write the quarantine can
    edit it; see `target`)."""
    quarantined_path: str | None = None

    @classmethod
    def invalid(cls, reason: str, now: float) -> Sidecar:
        """A file that never became sendable DICOM (not DICOM, truncated, a DICOMDIR ...)."""
        return cls(reason=reason, quarantined_at=now)

    @classmethod
    def refused(cls, rows: Sequence[Delivery], now: float) -> Sidecar:
        """A file every destination is done with, some refusing it (`rows`: all of its rows)."""
        first = rows[0] if rows else None
        return cls(
            reason="; ".join(
                f"{r.destination}: {r.last_error}" for r in rows if r.state is State.QUARANTINED
            ),
            quarantined_at=now,
            sop_instance_uid=first.sop_instance_uid if first else None,
            study_uid=first.study_uid if first else None,
            sop_class_uid=first.sop_class_uid if first else None,
            destinations={
                r.destination: DestinationRecord.of(r) for r in rows if r.state is not State.SENT
            },
            delivered_to=tuple(sorted(r.destination for r in rows if r.state is State.SENT)),
        )

    def placed(self, original: Path, quarantined: Path) -> Sidecar:
        """This sidecar for a file moved from `original` to `quarantined`."""
        return replace(self, original_path=str(original), quarantined_path=str(quarantined))

    def to_json(self) -> dict[str, Any]:
        """The JSON object written, every key present (null for nothing)."""
        return {
            "version": self.version,
            "reason": self.reason,
            "quarantined_at": iso(self.quarantined_at),
            "sop_instance_uid": self.sop_instance_uid,
            "study_uid": self.study_uid,
            "sop_class_uid": self.sop_class_uid,
            "destinations": {name: d.to_json() for name, d in self.destinations.items()},
            "delivered_to": list(self.delivered_to),
            "original_path": self.original_path,
            "quarantined_path": self.quarantined_path,
        }

    @classmethod
    def from_json(cls, data: object) -> Sidecar:
        """A sidecar from its JSON object, version 1 or 2.

        Raises
        ------
        SidecarError
            Not an object, a key of the wrong type, or a version newer than this forwarder.
        """
        if not isinstance(data, dict):
            raise SidecarError("not a JSON object")
        given = _whole(data, "version")
        version = 1 if given is None else given  # version 1 has no "version"
        if not 1 <= version <= SIDECAR_VERSION:
            raise SidecarError(f"version {version}: this forwarder reads 1 to {SIDECAR_VERSION}")
        dests = {} if data.get("destinations") is None else data["destinations"]
        if not isinstance(dests, dict):
            raise SidecarError(f"destinations: expected an object, got {dests!r}")
        delivered = [] if data.get("delivered_to") is None else data["delivered_to"]
        if not isinstance(delivered, list) or not all(isinstance(n, str) for n in delivered):
            raise SidecarError(f"delivered_to: expected a list of names, got {delivered!r}")
        return cls(
            version=version,
            reason=_text(data, "reason"),
            quarantined_at=_parse_time(data.get("quarantined_at"), "quarantined_at"),
            sop_instance_uid=_text(data, "sop_instance_uid"),
            study_uid=_text(data, "study_uid"),
            sop_class_uid=_text(data, "sop_class_uid"),
            destinations={
                str(name): DestinationRecord.from_json(str(name), d) for name, d in dests.items()
            },
            delivered_to=tuple(delivered),
            original_path=_text(data, "original_path"),
            quarantined_path=_text(data, "quarantined_path"),
        )

    def write(self, path: Path) -> None:
        """Write to `path` durably (a temporary file, fsync, rename): never half a sidecar."""
        filing.write_json_durably(path, self.to_json())

    @classmethod
    def read(cls, path: Path) -> Sidecar:
        """The sidecar in the file `path` (the ``.json`` itself).

        Raises
        ------
        SidecarError
            It cannot be read, is not JSON, or is not a sidecar (see `from_json`).
        """
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SidecarError(f"{path}: cannot read: {exc.strerror}") from exc
        except ValueError as exc:  # not UTF-8, or not JSON
            raise SidecarError(f"{path}: not JSON: {exc}") from exc
        try:
            return cls.from_json(data)
        except SidecarError as exc:
            raise SidecarError(f"{path}: {exc}") from None


def sidecar_path(path: Path) -> Path:
    """Where the sidecar of the quarantined file `path` is: ``<path>.json``."""
    return Path(f"{path}{filing.SIDECAR_SUFFIX}")
