"""``forwarder send``'s command line: storescu's options and defaults, plus the forwarder's own."""

from __future__ import annotations

import argparse
from pathlib import Path

from forwarder.concurrency import DEFAULT_MAX_ASSOCIATIONS, MAX_ASSOCIATIONS
from forwarder.dicomfile import EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE
from forwarder.errors import add_config_argument

__all__ = ["add_arguments"]


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
        help="peer address and port (unless --destination or --url), then files/folders",
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
    web = parser.add_argument_group("DICOMweb Options")
    web.add_argument(
        "--url",
        metavar="URL",
        help="send with STOW-RS to this DICOMweb base (POST URL/studies) instead of ADDR PORT; "
        "the --tls-* options apply to an https URL",
    )
    web.add_argument(
        "--token-file", metavar="FILE", type=Path, help="with --url: a bearer token in FILE"
    )
    web.add_argument(
        "--batch-size",
        metavar="N",
        type=int,
        default=50,
        help="with --url: instances per request (default: 50)",
    )
    cfg = parser.add_argument_group("Config Options")
    add_config_argument(cfg, help="forwarder config file (with --destination)")
    cfg.add_argument(
        "--destination",
        metavar="NAME",
        help="take the peer from this configured destination instead of ADDR PORT",
    )


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
