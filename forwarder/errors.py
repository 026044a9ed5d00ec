"""Exit statuses, config errors and --config: what every command needs before pydantic loads."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TextIO

__all__ = [
    "EX_CANTCREAT",
    "EX_CONFIG",
    "EX_SOFTWARE",
    "EX_TEMPFAIL",
    "ConfigError",
    "add_config_argument",
]

EX_CONFIG = 78
"""Exit status for a bad configuration (sysexits.h EX_CONFIG)."""
EX_CANTCREAT = 73
"""sysexits.h: a directory or the outbox cannot be created, or is damaged."""
EX_SOFTWARE = 70
"""sysexits.h: a pipeline stage died; exiting lets the supervisor restart the daemon."""
EX_TEMPFAIL = 75
"""sysexits.h: another daemon holds the outbox or the inbox."""


class ConfigError(Exception):
    """The configuration is unusable; ``errors`` holds one line per bad setting."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: " * bool(source) + "; ".join(errors))

    def lines(self) -> list[str]:
        """``SOURCE: line`` per bad setting (just the line when there is no source)."""
        return [f"{self.source}: {line}" if self.source else line for line in self.errors]

    def report(self, prog: str, stream: TextIO | None = None) -> None:
        """Print one ``PROG: config error: SOURCE: line`` per bad setting (to stderr)."""
        out = sys.stderr if stream is None else stream
        for line in self.lines():
            print(f"{prog}: config error: {line}", file=out)


def add_config_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, help: str | None = None
) -> None:
    """The ``--config FILE`` option every command takes, defaulting to ``$FORWARDER_CONFIG``."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        default=os.environ.get("FORWARDER_CONFIG") or None,
        help=help or "config file (TOML); default $FORWARDER_CONFIG",
    )
