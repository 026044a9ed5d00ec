"""Placeholder engine (set only, keep syntax); the helper's version replaces this file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from forwarder.transformspec import TransformFailed, TransformSpec

__all__ = ["Change", "TransformFailed", "Transformed", "transform_file"]


@dataclass(frozen=True)
class Change:
    key: str
    old: str | None
    new: str | None


@dataclass(frozen=True)
class Transformed:
    path: Path
    sop_instance_uid: str
    transfer_syntax: str
    changes: tuple[Change, ...]


def transform_file(src: Path, dst: Path, spec: TransformSpec, secret: bytes) -> Transformed:
    from pydicom import dcmread

    ds = dcmread(src)
    if spec.allow_burned_in is False and ds.get("BurnedInAnnotation") == "YES":
        raise TransformFailed("burned-in annotation")
    changes = []
    for key, template in spec.set:
        old = str(ds.get(key, ""))
        new = template.format(**{key: old})
        setattr(ds, key, new)
        changes.append(Change(key, old, new))
    part = dst.with_name(dst.name + ".part")
    ds.save_as(part, enforce_file_format=True)
    os.replace(part, dst)
    return Transformed(dst, ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID, tuple(changes))


def preview(src: Path, spec: TransformSpec, secret: bytes) -> tuple[tuple[Change, ...], str]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        done = transform_file(src, Path(tmp) / "x.dcm", spec, secret)
    return done.changes, done.transfer_syntax
