"""Send DICOM files with pynetdicom's public API at its best: the benchmark's reference sender.

What "at its best" means here (all public pynetdicom API, nothing of the forwarder):

* ``pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True``: ``send_c_store(path)`` streams the
  data set from the file in PDU-sized chunks instead of decoding and re-encoding it;
* TCP_NODELAY on the association's socket, set by an ``EVT_CONN_OPEN`` handler (without it
  every small C-STORE waits for a delayed ACK);
* requested presentation contexts built from the files' own (SOP Class, Transfer Syntax) pairs,
  read with ``pydicom.filereader.read_file_meta_info``, so no file needs converting;
* one association for all files, ``assoc.send_c_store(path)`` per file, and every response
  status checked (success and warning statuses count as stored).

Exit status: 0 when every file was stored; 1 when any store failed or got no response (files
are sent while the association lasts, and once it is lost the rest count as failed); 2 on a bad
command line or an unreadable file; 3 when the association is rejected or never connects, or
there are more than 128 (SOP Class, Transfer Syntax) pairs.

Usage: ``python bench/pynetdicom_chunked.py ADDR PORT PATH... [-r] [-aec AET] [-aet AET]
[-pdu N] [-t SECONDS]``
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, evt
from pynetdicom.events import Event

MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255
OK_STATUSES = {0x0000, 0x0001, 0xB000, 0xB006, 0xB007}  # success and the C-STORE warnings


def collect(paths: Sequence[str], recurse: bool) -> list[Path]:
    """Files named on the command line, and those in the named folders (sorted, as found)."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = path.rglob("*") if recurse else path.glob("*")
            files += sorted(p for p in found if p.is_file())
        else:
            files.append(path)
    return files


def contexts_of(files: Sequence[Path]) -> list[tuple[str, str]]:
    """The distinct (SOP Class UID, Transfer Syntax UID) pairs of the files' meta, in order."""
    pairs: dict[tuple[str, str], None] = {}
    for path in files:
        meta = read_file_meta_info(path)
        pairs[(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))] = None
    return list(pairs)


def set_nodelay(event: Event) -> None:
    """EVT_CONN_OPEN: turn Nagle off on the association's socket."""
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("addr")
    parser.add_argument("port", type=int)
    parser.add_argument("paths", nargs="+", metavar="PATH")
    parser.add_argument("-r", "--recurse", action="store_true")
    parser.add_argument("-aec", "--called-aet", default="ANY-SCP")
    parser.add_argument("-aet", "--calling-aet", default="PYNETDICOM")
    parser.add_argument("-pdu", "--max-pdu", type=int, default=131072)
    parser.add_argument("-t", "--timeout", type=float, default=60.0, help="every timeout, s")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # pynetdicom's own warnings and errors ("DIMSE timeout reached ...") explain a lost file
    logging.basicConfig(level=logging.WARNING, format="%(levelname).1s: %(name)s: %(message)s")
    files = collect(args.paths, args.recurse)
    if not files:
        print("error: no input files", file=sys.stderr)
        return 2
    try:
        pairs = contexts_of(files)
    except (OSError, ValueError, AttributeError) as exc:
        print(f"error: cannot read file meta: {exc}", file=sys.stderr)
        return 2
    if len(pairs) > MAX_CONTEXTS:
        print(f"error: {len(pairs)} context pairs, at most {MAX_CONTEXTS}", file=sys.stderr)
        return 3
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title=args.calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    ae.connection_timeout = args.timeout
    for sop_class, syntax in pairs:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(
        args.addr,
        args.port,
        ae_title=args.called_aet,
        max_pdu=args.max_pdu,
        evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)],
    )
    if not assoc.is_established:
        print("error: association rejected, aborted or never connected", file=sys.stderr)
        return 3
    failed = 0
    try:
        for done, path in enumerate(files):
            if not assoc.is_established:
                failed += len(files) - done
                print(f"error: association lost before {path}", file=sys.stderr)
                break
            status = assoc.send_c_store(path)
            code = int(status.Status) if "Status" in status else None
            if code not in OK_STATUSES:
                failed += 1
                shown = "no response" if code is None else f"0x{code:04X}"
                print(f"error: {path}: {shown}", file=sys.stderr)
    finally:
        if assoc.is_established:
            assoc.release()
    if failed:
        print(f"error: {failed} of {len(files)} files not stored", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
