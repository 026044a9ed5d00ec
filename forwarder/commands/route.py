"""``forwarder route test FILE...``: which destinations would get each file, and why not."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from forwarder.commands import common
from forwarder.config import Settings
from forwarder.dicomfile import InvalidDicom, inspect
from forwarder.routing import Decision, Router

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
            "config."
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


def _one(path: Path, settings: Settings, router: Router) -> tuple[dict[str, Any], bool]:
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
        "destinations": list(decision.destinations),
        "not": dict(decision.why_not),
        "unmatched": None if decision.destinations else router.unmatched,
    }, bool(decision.destinations)


def _print(report: dict[str, Any], order: list[str]) -> None:
    print(f"{report['file']}:")
    if "error" in report:
        print(f"  {report['error']}")
        return
    for name in order:
        why = report["not"].get(name)
        print(f"  {name}: yes" if why is None else f"  {name}: no: {why}")
    if report["unmatched"]:
        print(f"  no destination wants it: routing.unmatched = {report['unmatched']}")


@common.command("forwarder route")
def run(args: argparse.Namespace) -> int:
    settings = common.load(args)
    router = Router.of(settings)
    order = [d.name for d in settings.destinations]
    results = [_one(path, settings, router) for path in args.files]
    if args.json:
        common.print_json({"files": [report for report, _ in results]})
    else:
        for report, _ in results:
            _print(report, order)
    return 0 if all(ok for _, ok in results) else EXIT_UNROUTED
