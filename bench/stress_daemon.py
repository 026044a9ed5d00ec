"""Stress the daemon under CPU load: drain thousands of files to DCMTK storescp, count stalls
and duplicates.

Writes N distinct small instances (CT_small with fresh UIDs) into a folder, starts
DCMTK `storescp --fork +B` (TCP_NODELAY=1, so responses come back at once and any race in
the sender shows), starts `forwarder run` on a config pointing at it (default settings:
associations "auto"), renames the files into the inbox in one burst and waits until the
inbox is empty. Two `nice -n 19` CPU hogs run beside it unless `--no-hogs`.

Fails when a file is missing at the receiver, when storescp overwrote a file (an instance
received twice), when the daemon logged a timeout, an unexpected message, a traceback or a
retry, or when it did not exit 0 on SIGTERM.

Usage: ``python bench/stress_daemon.py [--files 5000] [--no-hogs]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BAD_WORDS = ("unexpected", "Traceback", "timed out", "timeout", "retry:", "crashed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_instances(folder: Path, n: int) -> list[str]:
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True)
    ds = dcmread(str(get_testdata_file("CT_small.dcm")))
    uids = []
    for i in range(n):
        uid = f"1.2.826.0.1.3680043.9.9999.77.{i}"
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.save_as(folder / f"{i:06}.dcm", enforce_file_format=True)
        uids.append(uid)
    return uids


def wait_until(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"FAILED: {what} not within {timeout:.0f} s")
        time.sleep(0.1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=5000, help="instances to drain (5000)")
    parser.add_argument("--no-hogs", action="store_true", help="no CPU hogs beside the daemon")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for the drain")
    args = parser.parse_args(argv)
    if shutil.which("storescp") is None:
        print("needs DCMTK: apt-get install dcmtk", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="fwd-dstress-", dir="/dev/shm"))
    hogs: list[subprocess.Popen[bytes]] = []
    procs: list[subprocess.Popen[bytes]] = []
    failures: list[str] = []
    try:
        staged = work / "staged"
        uids = write_instances(staged, args.files)
        rx, inbox = work / "rx", work / "inbox"
        rx.mkdir()
        inbox.mkdir()
        port = free_port()
        scp_log = open(work / "storescp.log", "wb")  # noqa: SIM115 - closed in finally
        scp = subprocess.Popen(
            ["storescp", "--fork", "+B", "-aet", "STORESCP", "-od", str(rx), str(port)],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=scp_log,
            stderr=subprocess.STDOUT,
        )
        procs.append(scp)
        cfg = work / "forwarder.toml"
        cfg.write_text(
            f'[watch]\npaths = ["{inbox}"]\n[outbox]\npath = "{work / "outbox.sqlite3"}"\n'
            f'[quarantine]\ndir = "{work / "quarantine"}"\n'
            '[log]\ntarget = "stderr"\nlevel = "info"\n'
            f'[[destinations]]\nname = "scp"\nhost = "127.0.0.1"\nport = {port}\n'
            'called_aet = "STORESCP"\n'
        )
        log = work / "forwarder.log"
        daemon = subprocess.Popen(
            [sys.executable, "-m", "forwarder", "run", "--config", str(cfg)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=open(log, "wb"),  # noqa: SIM115 - the child holds it
        )
        procs.append(daemon)
        wait_until(lambda: b"watching" in log.read_bytes(), 30, "the daemon watching")
        if not args.no_hogs:
            for _ in range(2):
                hogs.append(
                    subprocess.Popen(
                        ["nice", "-n", "19", "sh", "-c", "while :; do :; done"],
                        start_new_session=True,
                    )
                )
        start = time.monotonic()
        for name in sorted(os.listdir(staged)):
            os.rename(staged / name, inbox / name)
        wait_until(  # but the daemon's own lock file (one daemon per inbox)
            lambda: not [p for p in inbox.iterdir() if p.name != ".forwarder.lock"],
            args.timeout,
            "an empty inbox",
        )
        drained = time.monotonic() - start
        daemon.send_signal(signal.SIGTERM)
        rc = daemon.wait(30)
        got = {p.name.split(".", 1)[1] for p in rx.iterdir() if p.is_file()}
        missing = [u for u in uids if u not in got]
        scp_text = (work / "storescp.log").read_text(errors="replace")
        duplicates = scp_text.count("already exists")
        text = log.read_text(errors="replace")
        bad = [line for line in text.splitlines() if any(w in line for w in BAD_WORDS)]
        settled = [line for line in text.splitlines() if "associations:" in line]
        print(
            f"{args.files} files drained in {drained:.1f} s ({args.files / drained:.0f} inst/s), "
            f"exit {rc}; missing {len(missing)}, duplicates {duplicates}, "
            f"bad log lines {len(bad)}"
        )
        for line in settled:
            print("  " + line)
        if missing:
            failures.append(f"{len(missing)} missing, e.g. {missing[:3]}")
        if duplicates:
            failures.append(f"{duplicates} instances received twice")
        if bad:
            failures.append("log lines:\n" + "\n".join(bad[:20]))
        if rc != 0:
            failures.append(f"daemon exit {rc}")
    finally:
        for hog in hogs:
            os.killpg(hog.pid, signal.SIGKILL)
            hog.wait()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(work, ignore_errors=True)
    for f in failures:
        print(f, file=sys.stderr)
    print("FAILED" if failures else "OK: every file once, no stall, no retry")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
