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
from typing import TYPE_CHECKING, TextIO

from forwarder.association import ae_title_problem
from forwarder.commands.send_options import add_arguments
from forwarder.concurrency import DEFAULT_MAX_ASSOCIATIONS, Autoscale
from forwarder.dicomfile import DICOMDIR_SOP_CLASS, DicomInfo, InvalidDicom
from forwarder.dicomfile import inspect as inspect_file
from forwarder.errors import EX_CONFIG, ConfigError
from forwarder.logs import EscapingFormatter
from forwarder.pool import Outcome, send_all
from forwarder.sender import AssociationFailed, Peer, StoreResult, client_tls_context
from forwarder.status import Action, Classification, status_hex

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
EXIT_CONFIG = EX_CONFIG
USAGE_ERROR_STATUS = EXIT_COMMANDLINE  # read by forwarder.cli for argparse's usage errors
HELP_WITHOUT_ARGUMENTS = True  # `forwarder send` alone prints the help and exits 0, as dcmsend

if TYPE_CHECKING:
    from forwarder.config import Destination
    from forwarder.stow import StowSender

WEB_AUTO = 2
"""Parallel STOW-RS connections of ``--url`` with ``--associations auto`` (the default): the
server parses and stores one request's instances in turn, and a second connection keeps it
busy while the first one's answer travels (measured: bench/bench_stow.py)."""

INTERMIXED_ARGS = True  # options may follow ADDR PORT PATH, as with DCMTK's storescu


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


def _destination(args: argparse.Namespace) -> Destination:
    """The configured destination --destination names (TLS files checked)."""
    from forwarder.config import load_settings  # pydantic: only with a config
    from forwarder.preflight import check_tls

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
    return dest


def _stow(args: argparse.Namespace) -> tuple[StowSender, list[str]] | None:
    """The STOW-RS sender of --url or of a dicomweb --destination, and the file arguments;
    None for a C-STORE peer."""
    from forwarder.stow import StowSender

    if args.destination and not args.url:
        dest = _destination(args)
        if dest.type != "dicomweb":
            return None
        return StowSender.from_destination(dest), list(args.args)
    if not args.url:
        return None
    from forwarder.config import AuthSettings
    from forwarder.httpauth import Credentials

    auth = AuthSettings()
    if args.token_file is not None:
        auth = AuthSettings(type="bearer", token_file=args.token_file)
    if args.batch_size < 1:
        raise SystemExit("forwarder send: error: --batch-size must be at least 1")
    try:
        verify = client_tls_context(
            ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, verify=not args.tls_no_verify
        )
    except (OSError, ssl.SSLError) as exc:
        raise SystemExit(f"forwarder send: error: cannot load the TLS files: {exc}") from None
    sender = StowSender(
        args.url,
        batch_size=args.batch_size,
        timeout=float(args.network_timeout or 120),
        credentials=Credentials(auth, "--token-file"),
        verify=verify,
    )
    return sender, list(args.args)


def _peer(args: argparse.Namespace) -> tuple[Peer, list[str]]:
    """Build the peer from ADDR PORT or --destination; returns it and the file arguments."""
    if args.destination:
        dest = _destination(args)
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


def _send_web(
    sender: StowSender, infos: Sequence[DicomInfo], progress: _Progress, connections: int
) -> dict[Path, Outcome]:
    """Send with STOW-RS over `connections` parallel connections, each taking the next
    request's worth of files; one outcome per file's path."""
    results: dict[Path, Outcome] = {}
    lock = threading.Lock()
    step = sender.batch_size
    chunks = [infos[i : i + step] for i in range(0, len(infos), step)]
    failed: list[AssociationFailed] = []

    def work(one: StowSender) -> None:
        with one:
            while not failed:
                with lock:
                    if not chunks:
                        return
                    chunk = chunks.pop(0)
                try:
                    for result in one.send(chunk):
                        _log_result(result)
                        with lock:
                            results[result.info.path] = result
                        progress.update(result.info.size)
                except AssociationFailed as exc:  # the rest never went out
                    with lock:
                        if not failed:
                            LOGGER.error(f"{one.url}: {exc.classification.meaning}")
                        failed.append(exc)

    n = max(1, min(connections, len(chunks)))
    threads = [
        threading.Thread(target=work, args=(sender if i == 0 else sender.twin(),), daemon=True)
        for i in range(n)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for info in infos:
        if info.path not in results:
            results[info.path] = (
                failed[0] if failed else AssociationFailed(Classification(Action.RETRY, "not sent"))
            )
    return results


def _log_result(result: StoreResult) -> None:
    cls = result.classification
    info = result.info
    if cls.status is not None:
        LOGGER.info(f"Sending file: {info.path} ({result.sent_as})")
        LOGGER.info(f"Received Store Response (Status: {status_hex(cls.status)} - {cls.meaning})")
    if cls.action is Action.WARNING:
        LOGGER.warning(f"{info.path}: {cls.describe()}")
    elif not cls.delivered:
        LOGGER.error(f"{info.path}: not stored: {cls.describe()}")


def _write_report(path: Path, rows: Sequence[_Row]) -> None:
    data = [
        {
            "path": str(r.path),
            "sop_instance_uid": r.sop_instance_uid,
            "status": status_hex(r.status) or "",
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
    stow: StowSender | None = None
    try:
        web = _stow(args)
        if web is not None:
            stow, paths = web
        else:
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
        if info.sop_class_uid == DICOMDIR_SOP_CLASS:
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
    if stow is not None:
        connections = args.associations if isinstance(args.associations, int) else WEB_AUTO
        results = _send_web(stow, infos, progress, connections) if infos else {}
    else:
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
    """``python -m forwarder.commands.send``: the same as ``forwarder send``."""
    from forwarder.cli import main as cli_main

    return cli_main(["send", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
