"""``forwarder config check|show``: validate the settings; print them with where each came from."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from forwarder.commands import common
from forwarder.config import (
    NO_CONFIG,
    Settings,
    flatten,
    load_raw,
    load_settings,
)
from forwarder.errors import EX_CONFIG, ConfigError
from forwarder.preflight import check_auth, check_layout, check_receive, check_tls

__all__ = ["MASK", "add_arguments", "check", "effective", "masked", "notes", "run"]

MASK = "********"
_SECRET = re.compile(r"password|passphrase|secret|token", re.IGNORECASE)


def check(path: Path | None) -> tuple[Settings | None, list[str]]:
    """Every problem the daemon would refuse to start with, one line each naming the setting.

    The schema, the folder layout (a quarantine or archive inside the inbox), the metrics
    address, and the TLS files of every destination (loaded as the sender would).
    """
    from forwarder.metrics import parse_listen

    try:
        settings = load_settings(path, require_destinations=True)
    except ConfigError as exc:
        return None, exc.errors
    errors = check_layout(settings)
    if settings.metrics.listen is not None:
        try:
            parse_listen(settings.metrics.listen)
        except ValueError as exc:
            errors.append(f"metrics.listen: {exc}")
    errors += check_tls(settings) + check_auth(settings)
    errors += check_receive(settings)
    return settings, errors


def notes(settings: Settings) -> list[str]:
    """What is worth knowing about valid settings, one line each naming the setting.

    A destination asking for Storage Commitment gets its report on the association that
    stored the instances, or on a new one it opens to us: that one needs ``[receive]``
    listening (with ``allowed_calling_aets`` letting the peer in).
    """
    lines = []
    receive = getattr(settings, "receive", None)
    listen = getattr(receive, "listen", None) if receive is not None else None
    for i, dest in enumerate(settings.destinations):
        if not dest.commitment.enabled:
            continue
        key = f"destinations.{i}.commitment ({dest.name})"
        if listen:
            allowed = getattr(receive, "allowed_calling_aets", None) or []
            lines.append(
                f"{key}: reports on a new association come to [receive] at {listen}"
                + (
                    f"; receive.allowed_calling_aets must include {dest.called_aet}"
                    if allowed and dest.called_aet not in allowed
                    else ""
                )
            )
        else:
            lines.append(
                f"{key}: warning: [receive] is not listening: only reports sent on the "
                "association that stored the instances are taken; a peer that reports on a "
                "new association (Orthanc, most PACS) needs receive.listen, and until then "
                f"is asked again every {dest.commitment.timeout_seconds:g} s"
            )
    return lines


def masked(key: str, value: Any) -> Any:
    """`value`, or `MASK` when the setting is named like a secret (a TLS key path is not)."""
    if value is not None and _SECRET.search(key.rsplit(".", 1)[-1]):
        return MASK
    return value


def _origin(key: str, origin: dict[str, str]) -> tuple[str, str | None]:
    """(default | file | environment, the file or variable) of a dotted setting."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        found = origin.get(".".join(parts[:n]))
        if found is not None:
            kind, _, detail = found.partition(" (")
            return kind, detail.rstrip(")") or None
    return "default", None


def effective(path: Path | None) -> dict[str, dict[str, Any]]:
    """Dotted setting -> {value, source, from}; values named like secrets are masked.

    Raises
    ------
    ConfigError
        When the settings are invalid.
    """
    settings = load_settings(path)
    _, origin = load_raw(path)
    flat = flatten(settings.model_dump(mode="json"))
    result = {}
    for key in sorted(flat, key=_sort_key):
        source, detail = _origin(key, origin)
        result[key] = {"value": masked(key, flat[key]), "source": source, "from": detail}
    return result


def _sort_key(key: str) -> list[tuple[int, int | str]]:
    # destinations.10 after destinations.9
    return [(0, int(p)) if p.isdigit() else (1, p) for p in key.split(".")]


def _text(value: Any) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Validate the configuration, or show the effective settings."
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    chk = sub.add_parser(
        "check",
        help="validate: exit 0, or 78 with one line per bad setting",
        description=(
            "Validate the config file and the FORWARDER_... environment as the daemon would "
            "(schema, folder layout, metrics address, TLS files). Exit 0 when the daemon "
            "would start with it, 78 with one line per bad setting otherwise."
        ),
    )
    common.add_config(chk)
    show = sub.add_parser(
        "show",
        help="the effective settings and where each came from",
        description=(
            "Print every effective setting and where it came from: default, file or "
            "environment (the variable). Values of settings named like a password, secret "
            "or token are masked."
        ),
    )
    common.add_config(show)
    common.add_json(show)


def _check(args: argparse.Namespace) -> int:
    settings, errors = check(args.config)
    source = str(args.config) if args.config else "environment"
    if errors or settings is None:
        for line in errors:
            print(line if line == NO_CONFIG else f"{source}: {line}", file=sys.stderr)
        return EX_CONFIG
    names = ", ".join(d.name for d in settings.destinations)
    print(f"ok: {source}: {len(settings.destinations)} destination(s): {names}")
    for line in notes(settings):
        print(f"{source}: {line}")
    return 0


def _show(args: argparse.Namespace) -> int:
    settings = effective(args.config)
    if args.json:
        common.print_json(
            {"config": str(args.config) if args.config else None, "settings": settings}
        )
        return 0
    rows = [
        [key, _text(s["value"]), s["source"] + (f" ({s['from']})" if s["from"] else "")]
        for key, s in settings.items()
    ]
    print(common.table(["SETTING", "VALUE", "SOURCE"], rows))
    return 0


@common.command("forwarder config")
def run(args: argparse.Namespace) -> int:
    if args.action == "check":
        return _check(args)
    return _show(args)
