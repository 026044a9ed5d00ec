"""``forwarder send``: storescu's interface over the forwarder's sending engine."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import ssl
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from forwarder.association import ae_title_problem
from forwarder.concurrency import DEFAULT_MAX_ASSOCIATIONS, MAX_ASSOCIATIONS, Autoscale
from forwarder.dicomfile import EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE, DicomInfo, InvalidDicom
from forwarder.dicomfile import inspect as inspect_file
from forwarder.errors import ConfigError, add_config_argument
from forwarder.logs import EscapingFormatter
from forwarder.pool import Outcome, send_all
from forwarder.sender import AssociationFailed, Peer, StoreResult, client_tls_context
from forwarder.status import Action

__all__ = ["add_arguments", "collect_files", "main", "run"]

LOGGER = logging.getLogger("forwarder.send")

# Exit codes: DCMTK 3.6.7 dcmsend's (its man page, EXIT CODES), checked side by side on the
# same inputs (tests/test_send.py::test_exit_codes_match_dcmsend). Where dcmsend has none, ours
# (78). dcmsend halts at the first invalid file with 22 (its default, without --no-halt); we
# send the valid files anyway, as its --no-halt would, and still exit 22.
EXIT_OK = 0
EXIT_COMMANDLINE = 1  # EXITCODE_COMMANDLINE_SYNTAX_ERROR (argparse's own would be 2)
EXIT_NO_INPUT_FILES = 21  # EXITCODE_NO_INPUT_FILES
EXIT_INVALID_INPUT_FILE = 22  # EXITCODE_INVALID_INPUT_FILE: missing, not DICOM, truncated ...
EXIT_NO_VALID_INPUT_FILES = 22  # dcmsend's 23 comes only with --no-halt: by default it is 22
EXIT_CANNOT_WRITE_REPORT = 43  # EXITCODE_CANNOT_WRITE_REPORT_FILE
EXIT_ASSOCIATION_FAILED = 61  # EXITCODE_CANNOT_NEGOTIATE_ASSOCIATION: some files got none
EXIT_STORE_FAILED = 62  # EXITCODE_CANNOT_SEND_REQUEST; also a refused store (dcmsend says 0)
EXIT_CONFIG = 78
USAGE_ERROR_STATUS = EXIT_COMMANDLINE  # read by forwarder.cli for argparse's usage errors
HELP_WITHOUT_ARGUMENTS = True  # `forwarder send` alone prints the help and exits 0, as dcmsend

_DICOMDIR = "1.2.840.10008.1.3.10"
INTERMIXED_ARGS = True  # options may follow ADDR PORT PATH, as with DCMTK's storescu


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """storescu's options, same spelling and defaults, plus the forwarder's own."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Send DICOM files to a Storage SCP with C-STORE, like pynetdicom's storescu, "
        "but checking every response status."
    )
    parser.epilog = (
        "exit status (DCMTK dcmsend's codes): 0 all sent (warnings included); 1 bad command\n"
        "line; 21 no input files; 22 some input files missing or invalid (the valid ones are\n"
        "still sent); 43 cannot write the report; 61 association failed for some files;\n"
        "62 some stores failed (refused by the peer or no response; dcmsend exits 0 there);\n"
        "78 bad config. 61 and 62 come before 22."
    )
    parser.add_argument(
        "args",
        nargs="+",
        metavar="ADDR PORT PATH",
        help="peer address and port (unless --destination), then files/folders",
    )
    gen = parser.add_argument_group("General Options")
    gen.add_argument(
        "-q", "--quiet", action="store_true", help="quiet mode, prints no warnings or errors"
    )
    gen.add_argument(
        "-v", "--verbose", action="store_true", help="verbose mode, prints processing details"
    )
    gen.add_argument(
        "-d", "--debug", action="store_true", help="debug mode, prints debugging information"
    )
    gen.add_argument(
        "-ll",
        "--log-level",
        metavar="[l]evel",
        choices=["critical", "error", "warning", "info", "debug"],
        help="use level l for the logger (critical, error, warning, info, debug)",
    )
    inp = parser.add_argument_group("Input Options")
    inp.add_argument(
        "-r", "--recurse", action="store_true", help="recursively search the given directory"
    )
    net = parser.add_argument_group("Network Options")
    net.add_argument(
        "-aet",
        "--calling-aet",
        metavar="[a]etitle",
        default=None,
        help="set my calling AE title (default: STORESCU)",
    )
    net.add_argument(
        "-aec",
        "--called-aet",
        metavar="[a]etitle",
        default=None,
        help="set called AE title of peer (default: ANY-SCP)",
    )
    net.add_argument(
        "-ta",
        "--acse-timeout",
        metavar="[s]econds",
        type=float,
        default=None,
        help="timeout for ACSE messages (default: 30)",
    )
    net.add_argument(
        "-td",
        "--dimse-timeout",
        metavar="[s]econds",
        type=float,
        default=None,
        help="timeout for DIMSE messages (default: 30)",
    )
    net.add_argument(
        "-tn",
        "--network-timeout",
        metavar="[s]econds",
        type=float,
        default=None,
        help="timeout for the network (default: 30)",
    )
    net.add_argument(
        "--connect-timeout",
        metavar="[s]econds",
        type=float,
        default=None,
        help="timeout for the TCP connection (default: 10)",
    )
    net.add_argument(
        "-pdu",
        "--max-pdu",
        metavar="[n]umber of bytes",
        type=int,
        default=None,
        help="set max receive pdu to n bytes (default: 16382; 0 = unlimited)",
    )
    net.add_argument(
        "--associations",
        metavar="N|auto",
        type=_associations,
        default=None,
        help="send over N associations in parallel, or 'auto' (default): start with one and "
        "add one while throughput keeps rising, up to --max-associations",
    )
    net.add_argument(
        "--max-associations",
        metavar="N",
        type=int,
        default=None,
        choices=range(1, MAX_ASSOCIATIONS + 1),
        help=f"the most associations 'auto' opens (default: {DEFAULT_MAX_ASSOCIATIONS})",
    )
    ts = parser.add_argument_group("Transfer Syntax Options")
    grp = ts.add_mutually_exclusive_group()
    grp.add_argument(
        "-xe",
        "--request-little",
        dest="restrict",
        action="store_const",
        const=EXPLICIT_LE,
        help="request explicit VR little endian TS only",
    )
    grp.add_argument(
        "-xb",
        "--request-big",
        dest="restrict",
        action="store_const",
        const=EXPLICIT_BE,
        help="request explicit VR big endian TS only",
    )
    grp.add_argument(
        "-xi",
        "--request-implicit",
        dest="restrict",
        action="store_const",
        const=IMPLICIT_LE,
        help="request implicit VR little endian TS only",
    )
    misc = parser.add_argument_group("Miscellaneous Options")
    misc.add_argument(
        "-cx",
        "--required-contexts",
        "--single-context",
        action="store_true",
        help="only request the presentation contexts required for the input "
        "files (always the case here; accepted for compatibility)",
    )
    misc.add_argument(
        "--report",
        metavar="FILE",
        type=Path,
        help="write one row per file (path, SOP Instance UID, status, outcome, reason, "
        "sent_as: as is / converted to X / decompressed to X); .json for JSON, otherwise CSV",
    )
    misc.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    tls = parser.add_argument_group("TLS Options")
    tls.add_argument("--tls", action="store_true", help="use TLS")
    tls.add_argument("--tls-ca", metavar="FILE", help="CA certificates to verify the peer with")
    tls.add_argument("--tls-cert", metavar="FILE", help="our certificate (PEM)")
    tls.add_argument("--tls-key", metavar="FILE", help="our private key (PEM)")
    tls.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="the name to verify in the peer's certificate (default: ADDR)",
    )
    tls.add_argument(
        "--tls-no-verify",
        action="store_true",
        help="do not verify the peer's certificate chain or name (testing only)",
    )
    cfg = parser.add_argument_group("Config Options")
    add_config_argument(cfg, help="forwarder config file (with --destination)")
    cfg.add_argument(
        "--destination",
        metavar="NAME",
        help="take the peer from this configured destination instead of ADDR PORT",
    )


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING
    if args.verbose:
        level = logging.INFO
    if args.debug:
        level = logging.DEBUG
    if args.log_level:
        level = getattr(logging, args.log_level.upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter("%(levelname).1s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.CRITICAL + 1 if args.quiet else level)
    # pynetdicom's own logging is very chatty at INFO; show it only with -d
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if args.debug else logging.WARNING)
    # pydicom logs codec tracebacks itself; the forwarder reports one line per file instead
    logging.getLogger("pydicom").setLevel(logging.DEBUG if args.debug else logging.CRITICAL)


def collect_files(paths: Iterable[str], recurse: bool) -> tuple[list[Path], list[str]]:
    """The files to send, sorted and de-duplicated, and the paths that do not exist."""
    found: set[Path] = set()
    missing: list[str] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            found.add(p.resolve())
        elif p.is_dir():
            if recurse:
                for root, dirs, names in os.walk(p):
                    dirs.sort()
                    found.update(Path(root, n).resolve() for n in names)
            else:
                found.update(c.resolve() for c in p.iterdir() if c.is_file())
        else:
            missing.append(raw)
    return sorted(found), missing


@dataclass
class _Row:
    path: Path
    sop_instance_uid: str = ""
    status: int | None = None
    outcome: str = ""
    reason: str = ""
    sent_as: str = ""  # "as is", "converted to ...", "decompressed to ..."; "" if nothing went


def _peer(args: argparse.Namespace) -> tuple[Peer, list[str]]:
    """Build the peer from ADDR PORT or --destination; returns it and the file arguments."""
    if args.destination:
        from forwarder.config import check_tls, load_settings  # pydantic: only with a config

        settings = load_settings(args.config, require_destinations=True)
        source = str(args.config) if args.config else "environment"
        try:
            dest = settings.destination(args.destination)
        except KeyError as exc:
            raise ConfigError(source, [f"--destination: {exc.args[0]}"]) from exc
        index = settings.destinations.index(dest)
        errors = [e for e in check_tls(settings) if e.startswith(f"destinations.{index}.")]
        if errors:
            raise ConfigError(source, errors)
        base = Peer.from_destination(dest)
        files = list(args.args)
        if args.associations is None:  # the command line wins over the destination's
            args.associations = dest.associations
        if args.max_associations is None:
            args.max_associations = dest.max_associations
    else:
        if len(args.args) < 3:
            raise SystemExit("forwarder send: error: ADDR PORT PATH... required (or --destination)")
        addr, port_text, *files = args.args
        try:
            port = int(port_text)
        except ValueError:
            raise SystemExit(
                f"forwarder send: error: PORT must be a number, got {port_text!r}"
            ) from None
        base = Peer(host=addr, port=port)
    tls = base.tls
    server_name = base.tls_server_name
    if args.tls or args.tls_ca or args.tls_cert:
        for option, value in (
            ("--tls-ca", args.tls_ca),
            ("--tls-cert", args.tls_cert),
            ("--tls-key", args.tls_key),
        ):
            if value and not os.path.isfile(value):
                raise SystemExit(f"forwarder send: error: {option}: file not found: {value}")
        try:
            tls = client_tls_context(
                ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, verify=not args.tls_no_verify
            )
        except (OSError, ssl.SSLError) as exc:
            raise SystemExit(f"forwarder send: error: cannot load the TLS files: {exc}") from None
        server_name = args.tls_server_name or base.host
    for option, title in (("-aet", args.calling_aet), ("-aec", args.called_aet)):
        problem = None if title is None else ae_title_problem(title)
        if problem is not None:
            raise SystemExit(f"forwarder send: error: {option} {title!r}: {problem}")
    peer = Peer(
        host=base.host,
        port=base.port,
        called_aet=args.called_aet or base.called_aet,
        calling_aet=args.calling_aet or base.calling_aet,
        max_pdu=base.max_pdu if args.max_pdu is None else args.max_pdu,
        connect_timeout=args.connect_timeout or base.connect_timeout,
        acse_timeout=args.acse_timeout or base.acse_timeout,
        dimse_timeout=args.dimse_timeout or base.dimse_timeout,
        network_timeout=args.network_timeout or base.network_timeout,
        tls=tls,
        tls_server_name=server_name,
        name=base.name,
    )
    return peer, files


class _Progress:
    """A one-line progress bar on a terminal: files, MB, rate, ETA."""

    def __init__(self, total: int, total_bytes: int, stream: TextIO | None) -> None:
        self.total, self.total_bytes, self.stream = total, total_bytes, stream
        self.done = self.bytes = 0
        self.start = self.last = time.monotonic()
        self.lock = threading.Lock()

    def update(self, size: int) -> None:
        with self.lock:
            self.done += 1
            self.bytes += size
            now = time.monotonic()
            if self.stream is None or (now - self.last < 0.1 and self.done < self.total):
                return
            self.last = now
            elapsed = max(now - self.start, 1e-6)
            rate = self.done / elapsed
            eta = (self.total - self.done) / rate if rate else 0
            width = 30
            fill = int(width * self.done / max(self.total, 1))
            self.stream.write(
                f"\r[{'#' * fill}{' ' * (width - fill)}] {self.done}/{self.total} files "
                f"{self.bytes / 1e6:.1f}/{self.total_bytes / 1e6:.1f} MB "
                f"{rate:.0f} inst/s ETA {eta:.0f}s "
            )
            self.stream.flush()

    def finish(self) -> None:
        if self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()


def _associations(text: str) -> int | str:
    """`--associations`: "auto" or a number from 1 to 16."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'auto' or a number, not {text!r}") from None
    if not 1 <= n <= MAX_ASSOCIATIONS:
        raise argparse.ArgumentTypeError(f"from 1 to {MAX_ASSOCIATIONS}, not {n}")
    return n


def _send_all(
    peer: Peer,
    infos: Sequence[DicomInfo],
    restrict: str | None,
    scale: Autoscale,
    progress: _Progress,
) -> dict[Path, Outcome]:
    """Send over up to ``scale.allowed`` associations; one outcome per file's path."""
    results: dict[Path, Outcome] = {}
    lock = threading.Lock()

    def done(info: DicomInfo, outcome: Outcome) -> None:
        if isinstance(outcome, StoreResult):
            _log_result(outcome)
        with lock:
            results[info.path] = outcome
        progress.update(info.size)

    send_all(peer, infos, restrict, scale, done)
    if scale.auto:
        LOGGER.info(f"Associations: {scale.describe()}")
    return results


def _log_result(result: StoreResult) -> None:
    cls = result.classification
    info = result.info
    if cls.status is not None:
        LOGGER.info(f"Sending file: {info.path} ({result.sent_as})")
        LOGGER.info(f"Received Store Response (Status: 0x{cls.status:04X} - {cls.meaning})")
    if cls.action is Action.WARNING:
        LOGGER.warning(f"{info.path}: {cls.describe()}")
    elif not cls.delivered:
        LOGGER.error(f"{info.path}: not stored: {cls.describe()}")


def _write_report(path: Path, rows: Sequence[_Row]) -> None:
    data = [
        {
            "path": str(r.path),
            "sop_instance_uid": r.sop_instance_uid,
            "status": "" if r.status is None else f"0x{r.status:04X}",
            "outcome": r.outcome,
            "reason": r.reason,
            "sent_as": r.sent_as,
        }
        for r in rows
    ]
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        return
    with open(path, "w", newline="", encoding="utf-8") as fp:
        writer = csv.DictWriter(fp, fieldnames=list(data[0]) if data else ["path"])
        writer.writeheader()
        writer.writerows(data)


def run(args: argparse.Namespace) -> int:
    """Run ``forwarder send``; returns the exit status."""
    _setup_logging(args)
    try:
        peer, paths = _peer(args)
    except ConfigError as exc:
        for line in exc.lines():
            LOGGER.error(line)
        return EXIT_CONFIG
    files, missing = collect_files(paths, args.recurse)
    if not files and not missing:
        LOGGER.error("No input files")
        return EXIT_NO_INPUT_FILES

    rows: dict[Path, _Row] = {}
    for raw in missing:  # a path that does not exist is an invalid input file (dcmsend: 22)
        LOGGER.error(f"{raw}: skipped: no such file or directory")
        rows[Path(raw)] = _Row(Path(raw), outcome="skipped", reason="no such file or directory")
    infos: list[DicomInfo] = []
    for path in files:
        row = rows[path] = _Row(path)
        try:
            info = inspect_file(path)
        except InvalidDicom as exc:
            row.outcome, row.reason = "skipped", exc.reason
            LOGGER.error(f"{path}: skipped: {exc.reason}")
            continue
        except OSError as exc:
            row.outcome, row.reason = "skipped", f"cannot read: {exc.strerror}"
            LOGGER.error(f"{path}: skipped: cannot read: {exc.strerror}")
            continue
        row.sop_instance_uid = info.sop_instance_uid
        if info.sop_class_uid == _DICOMDIR:
            row.outcome, row.reason = "skipped", "a DICOMDIR is not a storage instance"
            LOGGER.warning(f"{path}: skipped: a DICOMDIR is not a storage instance")
            continue
        infos.append(info)

    show = sys.stderr.isatty() and not args.quiet and not args.no_progress
    progress = _Progress(len(infos), sum(i.size for i in infos), sys.stderr if show else None)
    if args.associations in (None, "auto"):
        most = args.max_associations or DEFAULT_MAX_ASSOCIATIONS
        scale = Autoscale(min(most, max(len(infos), 1)), auto=True)
    else:
        scale = Autoscale(min(args.associations, max(len(infos), 1)), auto=False)
    results = _send_all(peer, infos, args.restrict, scale, progress) if infos else {}
    progress.finish()

    assoc_failed = store_failed = False
    for path, res in results.items():
        row = rows[path]
        if isinstance(res, AssociationFailed):
            row.outcome, row.reason = "failed", f"association failed: {res.classification.meaning}"
            assoc_failed = True
            continue
        cls = res.classification
        row.status = cls.status
        row.sent_as = res.sent_as
        if cls.action is Action.SENT:
            row.outcome = "sent"
        elif cls.action is Action.WARNING:
            row.outcome, row.reason = "warning", cls.meaning
        else:
            row.outcome, row.reason = "failed", cls.meaning
            store_failed = True

    counts = {k: 0 for k in ("sent", "warning", "failed", "skipped")}
    for row in rows.values():
        counts[row.outcome or "failed"] += 1
    if not args.quiet:
        print(", ".join(f"{n} {k}" for k, n in counts.items()))
    if args.report is not None:
        try:
            _write_report(args.report, list(rows.values()))
        except OSError as exc:
            LOGGER.error(f"{args.report}: cannot write the report: {exc.strerror}")
            return EXIT_CANNOT_WRITE_REPORT
    if not infos:
        return EXIT_NO_VALID_INPUT_FILES
    if assoc_failed:
        return EXIT_ASSOCIATION_FAILED
    if store_failed:
        return EXIT_STORE_FAILED
    if counts["skipped"]:
        return EXIT_INVALID_INPUT_FILE
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m forwarder.send_cli``: the same as ``forwarder send``."""
    from forwarder.cli import main as cli_main

    return cli_main(["send", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
