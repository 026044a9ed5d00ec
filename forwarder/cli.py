"""Command line: ``forwarder <command>``; each command lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import io
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

# command -> (module, one-line help). Each module offers `add_arguments(parser)` and
# `run(args) -> int`; modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "send": (
        "forwarder.commands.send",
        "send files to a peer now, like storescu (no daemon, no outbox)",
    ),
    "run": ("forwarder.commands.run", "run the forwarding daemon"),
    "health": (
        "forwarder.commands.health",
        "exit 0 when the daemon behind the config is alive and healthy",
    ),
    "status": ("forwarder.commands.status", "the queue per destination; is the daemon alive"),
    "queue": (
        "forwarder.commands.queue",
        "list deliveries in the outbox; make waiting ones due now",
    ),
    "quarantine": (
        "forwarder.commands.quarantine",
        "list, show, requeue or purge quarantined files",
    ),
    "find": ("forwarder.commands.find", "where is this SOP Instance or Study UID"),
    "outbox": ("forwarder.commands.outbox", "check the outbox file for damage"),
    "echo": (
        "forwarder.commands.echo",
        "C-ECHO the destinations with their AE titles and TLS (DICOMweb: QIDO-RS)",
    ),
    "config": ("forwarder.commands.config", "validate the config, or show the effective settings"),
    "route": (
        "forwarder.commands.route",
        "try the routing rules on files: which destinations would get each, and why not",
    ),
}


EXIT_BROKEN_PIPE = 128 + 13
"""As a process killed by SIGPIPE: the reader of its output went away (``| head``)."""


class _Parser(argparse.ArgumentParser):
    """argparse with the command's own exit status for usage errors (argparse's is 2)."""

    def __init__(self, *args: Any, usage_status: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.usage_status = usage_status

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(self.usage_status, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forwarder",
        description="Forward DICOM files dropped into folders to DICOM peers with C-STORE.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _version() -> str:
    from forwarder import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``forwarder`` command line; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    # File names are bytes and need not be UTF-8 (a Latin-1 name arrives as a surrogate
    # escape): show such a byte as \udcxx, never write it raw or fail on it.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    if not args or args[0] not in COMMANDS:
        _parser().parse_args(args)  # prints usage or --help/--version and exits
        return 2
    name, rest = args[0], args[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    # a command may have its own status for a bad command line (`send`: 1, as dcmsend)
    usage_status = int(getattr(module, "USAGE_ERROR_STATUS", 2))
    parser = _Parser(prog=f"forwarder {name}", description=help_text, usage_status=usage_status)
    module.add_arguments(parser)
    if not rest and getattr(module, "HELP_WITHOUT_ARGUMENTS", False):
        parser.print_help()
        return 0
    # storescu-style commands take options after the files too (`ADDR PORT FILE -xe`)
    intermixed = getattr(module, "INTERMIXED_ARGS", False)
    ns = parser.parse_intermixed_args(rest) if intermixed else parser.parse_args(rest)
    try:
        status = int(module.run(ns))
        sys.stdout.flush()  # a reader gone (`| head`) shows here, not as a traceback at exit
        return status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader of our output went away: stop quietly, as coreutils do on SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
