"""``forwarder route test FILE...``: which destinations would get each file, and why not."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from forwarder.commands import common
from forwarder.config import Settings
from forwarder.dicomfile import InvalidDicom, inspect
from forwarder.routing import Decision, Router
from forwarder.transformpool import SECRET_FILE, load_secret
from forwarder.transformspec import TransformFailed

__all__ = ["EXIT_UNROUTED", "add_arguments", "run"]

EXIT_UNROUTED = 1
"""Some file would go to no destination, or is not valid DICOM (unreadable)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Try the routing rules of the configuration on files, without sending."
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    test = sub.add_parser(
        "test",
        help="which destinations would get each file, and the first rule that fails for others",
        description=(
            "Read each FILE's header as the daemon would when queuing it and print which "
            "destinations would get it and, for every other one, the first rule that failed. "
            "A path rule sees the file's path relative to the watched folder it is under "
            "(else its name). Exit 0 when every file goes to some destination, 1 when one "
            "goes nowhere (routing.unmatched applies) or is not valid DICOM, 78 for a bad "
            "config. For a destination with a transform: each attribute it would change "
            "(old -> new) and the transfer syntax it would send, or why it would refuse the "
            "instance (quarantined for that destination). Nothing is written."
        ),
    )
    common.add_config(test)
    test.add_argument("files", metavar="FILE", nargs="+", type=Path)
    common.add_json(test)


def relative(path: Path, settings: Settings) -> str:
    """`path` relative to the watched folder it is under, ``/``-separated; else its name."""
    full = path.absolute()
    for root in settings.watch.paths:
        if full.is_relative_to(root.absolute()):
            return full.relative_to(root.absolute()).as_posix()
    return path.name


def _key(settings: Settings) -> tuple[bytes, str | None]:
    """The installation's de-identification key, read only; a throw-away one and why when
    it cannot be had (not made yet, not readable by this user, damaged): the UIDs shown are
    then not the ones the daemon will send."""
    if not any(
        (spec := d.transform_spec) is not None and spec.deidentify != "none"
        for d in settings.destinations
    ):
        return b"", None
    state = settings.outbox.path.parent
    try:
        key = load_secret(state, create=False)
    except (OSError, ValueError) as exc:  # e.g. 0600 and owned by the daemon's user
        detail = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) else str(exc)
        return os.urandom(32), f"cannot read the de-identification key ({detail})"
    if key is None:
        why = f"no de-identification key yet ({SECRET_FILE} is made at the daemon's first start)"
        return os.urandom(32), why
    return key, None


def _transforms(
    path: Path, settings: Settings, wanted: tuple[str, ...], key: bytes
) -> dict[str, Any]:
    """What each transform of a destination in `wanted` would do to the file."""
    from forwarder.transform import preview

    out: dict[str, Any] = {}
    for dest in settings.destinations:
        spec = dest.transform_spec
        if spec is None or dest.name not in wanted:
            continue
        try:
            changes, syntax = preview(path, spec, key)
        except TransformFailed as exc:
            out[dest.name] = {"refused": str(exc)}
            continue
        except OSError as exc:
            out[dest.name] = {"refused": f"cannot read the file: {exc.strerror or exc}"}
            continue
        out[dest.name] = {
            "changes": [{"attribute": c.key, "old": c.old, "new": c.new} for c in changes],
            "transfer_syntax": syntax,
        }
    return out


def _one(path: Path, settings: Settings, router: Router, key: bytes) -> tuple[dict[str, Any], bool]:
    """The JSON report of one file, and whether some destination would get it."""
    rel = relative(path, settings)
    try:
        info = inspect(path, attributes=router.tags)
    except OSError as exc:
        return {"file": str(path), "path": rel, "error": f"unreadable: {exc.strerror}"}, False
    except InvalidDicom as exc:
        return {"file": str(path), "path": rel, "error": f"not valid DICOM: {exc.reason}"}, False
    decision: Decision = router.route(info.attributes, rel)
    return {
        "file": str(path),
        "path": rel,
        "sop_instance_uid": info.sop_instance_uid,
        "transfer_syntax": info.transfer_syntax,
        "destinations": list(decision.destinations),
        "not": dict(decision.why_not),
        "unmatched": None if decision.destinations else router.unmatched,
        "transforms": _transforms(path, settings, decision.destinations, key),
    }, bool(decision.destinations)


def _syntax(uid: str) -> str:
    """A transfer syntax's name ("JPEG-LS Lossless Image Compression"), or its UID."""
    from pydicom.uid import UID

    return str(UID(uid).name)


def _print(report: dict[str, Any], order: list[str]) -> None:
    print(f"{report['file']}:")
    if "error" in report:
        print(f"  {report['error']}")
        return
    for name in order:
        why = report["not"].get(name)
        if why is not None:
            print(f"  {name}: no: {why}")
            continue
        change = report["transforms"].get(name)
        if change is None:
            print(f"  {name}: yes, as is ({_syntax(report['transfer_syntax'])})")
        elif "refused" in change:
            print(f"  {name}: yes, but its transform refuses it: {change['refused']}")
            print("    (quarantined for this destination)")
        else:
            print(f"  {name}: yes, transformed:")
            for c in change["changes"]:
                old = "(absent)" if c["old"] is None else repr(c["old"])
                new = "(removed)" if c["new"] is None else repr(c["new"])
                print(f"    {c['attribute']}: {old} -> {new}")
            print(f"    sent as {_syntax(change['transfer_syntax'])}")
    if report["unmatched"]:
        print(f"  no destination wants it: routing.unmatched = {report['unmatched']}")


@common.command("forwarder route")
def run(args: argparse.Namespace) -> int:
    settings = common.load(args)
    router = Router.of(settings)
    order = [d.name for d in settings.destinations]
    key, why = _key(settings)
    results = [_one(path, settings, router, key) for path in args.files]
    if why is not None and any(r.get("transforms") for r, _ in results):
        print(f"note: {why}: the new UIDs shown are not the ones it will send", file=sys.stderr)
    if args.json:
        common.print_json({"files": [report for report, _ in results]})
    else:
        for report, _ in results:
            _print(report, order)
    return 0 if all(ok for _, ok in results) else EXIT_UNROUTED
