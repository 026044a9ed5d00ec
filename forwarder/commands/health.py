"""``forwarder health``: is the daemon behind this config alive and healthy? (exit 0 or 1)."""

from __future__ import annotations

import argparse
import sys

from forwarder.config import load_settings
from forwarder.errors import EX_CONFIG, ConfigError, add_config_argument
from forwarder.health import check

__all__ = ["EXIT_HEALTHY", "EXIT_UNHEALTHY", "add_arguments", "run"]

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Exit 0 when the daemon behind the config is alive and healthy (fresh heartbeat in "
        "the outbox, workers alive, no destination paused too long); otherwise exit 1 with a "
        "one-line reason. For Docker's HEALTHCHECK and monitoring."
    )
    add_config_argument(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing when healthy")


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        exc.report("forwarder health")
        return EX_CONFIG
    healthy, line = check(settings)
    if not healthy:
        print(f"unhealthy: {line}", file=sys.stderr)
        return EXIT_UNHEALTHY
    if not args.quiet:
        print(line)
    return EXIT_HEALTHY
