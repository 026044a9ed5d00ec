"""``forwarder echo``: C-ECHO every destination with its AE titles and TLS; time the round trip."""

from __future__ import annotations

import argparse
import ssl
import time
from dataclasses import dataclass
from typing import Any

from forwarder.association import AssociationFailed, Peer, open_association
from forwarder.commands import common
from forwarder.config import Destination
from forwarder.dicomfile import IMPLICIT_LE
from forwarder.status import status_hex
from forwarder.wire import C_ECHO_RSP, VERIFICATION, WireError, encode_echo_command

__all__ = ["EchoResult", "add_arguments", "echo", "run"]


@dataclass(frozen=True)
class EchoResult:
    """One destination's answer: ok, with the association and C-ECHO times, or why not."""

    destination: str
    address: str
    tls: bool
    ok: bool
    associate_ms: float | None = None
    echo_ms: float | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "address": self.address,
            "tls": self.tls,
            "ok": self.ok,
            "associate_ms": self.associate_ms,
            "echo_ms": self.echo_ms,
            "error": self.error,
        }


def echo(dest: Destination) -> EchoResult:
    """Associate with `dest` as the daemon would (AE titles, timeouts, TLS) and send a C-ECHO;
    for a dicomweb destination, a QIDO-RS request with its credentials (`web_echo`)."""
    if dest.type == "dicomweb":
        return web_echo(dest)
    address = dest.address
    result = EchoResult(dest.name, address, dest.tls is not None, ok=False)
    try:
        peer = Peer.from_destination(dest)
    except (OSError, ssl.SSLError) as exc:
        return _failed(result, f"cannot load the TLS files: {exc}")
    start = time.perf_counter()
    try:
        assoc = open_association(peer, [(VERIFICATION, [IMPLICIT_LE])])
    except AssociationFailed as exc:
        return _failed(result, exc.classification.meaning)
    associated = time.perf_counter()
    if not assoc.accepted:
        return _failed(result, "the peer accepted no Verification presentation context")
    try:
        cx_id = assoc.accepted[VERIFICATION][0][0]
        assoc.link.send_message(cx_id, encode_echo_command(1), None, assoc.send_pdu)
        code: int | None = assoc.link.read_response(C_ECHO_RSP).status
        echoed = time.perf_counter()
    except WireError as exc:
        assoc.abort()
        return _failed(result, f"no C-ECHO response: {exc}")
    assoc.release()
    if code != 0:
        return _failed(result, f"C-ECHO answered {status_hex(code)}")
    return EchoResult(
        dest.name,
        address,
        result.tls,
        ok=True,
        associate_ms=round((associated - start) * 1000, 1),
        echo_ms=round((echoed - associated) * 1000, 1),
    )


def web_echo(dest: Destination) -> EchoResult:
    """``GET {url}/studies?limit=1`` with the destination's credentials and TLS (``ECHO``
    is its round trip; there is no association)."""
    from forwarder.stow import StowSender

    result = EchoResult(dest.name, dest.address, dest.address.startswith("https:"), ok=False)
    try:
        sender = StowSender.from_destination(dest)
    except (OSError, ssl.SSLError) as exc:
        return _failed(result, f"cannot load the TLS files: {exc}")
    with sender:
        try:
            seconds = sender.probe()
        except AssociationFailed as exc:
            return _failed(result, exc.classification.meaning)
    return EchoResult(
        dest.name, dest.address, result.tls, ok=True, echo_ms=round(seconds * 1000, 1)
    )


def _failed(result: EchoResult, error: str) -> EchoResult:
    return EchoResult(result.destination, result.address, result.tls, ok=False, error=error)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "C-ECHO each destination with its configured AE titles, timeouts and TLS, as the "
        "daemon associates (a dicomweb destination: QIDO-RS GET {url}/studies?limit=1 with its "
        "credentials). Prints the association set-up and C-ECHO round-trip times. "
        "Exit 1 when any destination fails."
    )
    common.add_config(parser)
    parser.add_argument("--destination", metavar="D", help="only destination D")
    common.add_json(parser)


@common.command("forwarder echo")
def run(args: argparse.Namespace) -> int:
    settings = common.load(args)
    if args.destination:
        try:
            dests = [settings.destination(args.destination)]
        except KeyError as exc:
            raise common.CommandError(str(exc.args[0])) from None
    else:
        dests = list(settings.destinations)
    if not dests:
        raise common.CommandError("no destinations configured")
    results = [echo(d) for d in dests]
    if args.json:
        common.print_json({"results": [r.to_json() for r in results]})
    else:
        rows = [
            [
                r.destination,
                r.address + (" (TLS)" if r.tls else ""),
                "ok" if r.ok else "FAILED",
                "-" if r.associate_ms is None else f"{r.associate_ms:.1f} ms",
                "-" if r.echo_ms is None else f"{r.echo_ms:.1f} ms",
                r.error or "",
            ]
            for r in results
        ]
        headers = ["DESTINATION", "ADDRESS", "RESULT", "ASSOCIATE", "ECHO", "ERROR"]
        print(common.table(headers, rows, right=(3, 4)))
    return 0 if all(r.ok for r in results) else common.EXIT_FAILED
