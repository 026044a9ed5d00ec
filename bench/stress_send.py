"""Stress the send path under CPU load: many mixed sends and large sends to DCMTK storescp.

The race this hunts (pynetdicom's reactor reading a response from the sender's socket) showed
as a stall, "Received unexpected C-STORE service message" and rc 62 in ~2% of runs with two
CPU hogs beside the sender. The run fails when any send fails or logs such a line.

1. `--mixed N` sends of seven mixed files (pydicom's test data: explicit/implicit/big endian,
   JPEG 2000, deflated, no-meta) to `storescp +xa +uf` (TCP_NODELAY=1);
2. `--large N` sends of the `small` corpus' first 1500 files with `--associations 2`.
Two `nice -n 19` CPU hogs run beside it unless `--no-hogs`.

Usage: ``python bench/stress_send.py [--mixed 200] [--large 3] [--no-hogs]``
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import corpus  # noqa: E402

MIXED = [
    "CT_small.dcm",
    "ExplVR_BigEndNoMeta.dcm",
    "JPEG2000.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "image_dfl.dcm",
    "rtstruct.dcm",
]
BAD_WORDS = ("unexpected", "Traceback", "timed out", "DIMSE timeout")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_storescp(out: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["storescp", "+xa", "+uf", "--fork", "-od", str(out), str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("storescp did not start")


def send(args: Sequence[str], timeout: float) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "forwarder", "send", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mixed", type=int, default=200, help="mixed sends (200)")
    parser.add_argument("--large", type=int, default=3, help="sends of 1500 small files (3)")
    parser.add_argument("--no-hogs", action="store_true", help="no CPU hogs beside the sender")
    args = parser.parse_args(argv)
    if shutil.which("storescp") is None:
        print("needs DCMTK: apt-get install dcmtk", file=sys.stderr)
        return 2
    from pydicom.data import get_testdata_file

    hogs: list[subprocess.Popen[bytes]] = []
    work = Path(tempfile.mkdtemp(prefix="fwd-stress-", dir="/dev/shm"))
    port = free_port()
    (work / "rx").mkdir()
    scp = start_storescp(work / "rx", port)
    failures: list[str] = []
    try:
        if not args.no_hogs:
            for _ in range(2):
                hogs.append(
                    subprocess.Popen(
                        ["nice", "-n", "19", "sh", "-c", "while :; do :; done"],
                        start_new_session=True,
                    )
                )
        mixed = work / "mixed"
        mixed.mkdir()
        for name in MIXED:
            shutil.copy(str(get_testdata_file(name)), mixed / name)
        start = time.monotonic()
        for n in range(args.mixed):
            rc, out = send(["-aec", "STORESCP", "127.0.0.1", str(port), str(mixed)], 120)
            bad = [w for w in BAD_WORDS if w in out]
            if rc != 0 or bad:
                failures.append(f"mixed run {n}: rc {rc} {bad}\n{out}")
        print(
            f"{args.mixed} mixed sends in {time.monotonic() - start:.0f} s, {len(failures)} failed"
        )
        if args.large:
            small = corpus.generate(corpus.SPECS["small"], HERE / "corpus")
            part = corpus.subset(small, 1500)
            for n in range(args.large):
                t0 = time.monotonic()
                rc, out = send(
                    [
                        "-aec",
                        "STORESCP",
                        "--associations",
                        "2",
                        "-pdu",
                        "131072",
                        "127.0.0.1",
                        str(port),
                        str(part),
                        "-r",
                    ],
                    600,
                )
                bad = [w for w in BAD_WORDS if w in out]
                summary = out.strip().splitlines()[-1] if out.strip() else ""
                print(f"large run {n}: rc {rc} in {time.monotonic() - t0:.1f} s: {summary}")
                if rc != 0 or bad:
                    failures.append(f"large run {n}: rc {rc} {bad}\n{out[-2000:]}")
    finally:
        for hog in hogs:
            os.killpg(hog.pid, signal.SIGKILL)
            hog.wait()
        scp.terminate()
        scp.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    for f in failures:
        print(f, file=sys.stderr)
    print("FAILED" if failures else "OK: 0 failed runs, no unexpected/timeout lines")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
