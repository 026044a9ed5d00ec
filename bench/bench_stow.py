"""Issue 14's figures: STOW-RS into Orthanc's DICOMweb plugin against C-STORE into its DIMSE port.

One private Orthanc (tests/orthanc.py, DICOMweb plugin, storage on /dev/shm) takes the same
corpus (bench/corpus.py: 1000 CT of 0.5 MB, 2000 small of 10 KB) from each sender in turn,
emptied between runs; every run is checked by Orthanc's instance count.

Senders:
* ``cstore``: ``forwarder send -r`` to the DIMSE port (associations "auto").
* ``stow``: ``forwarder send --url ... -r`` (STOW-RS, batch 50, 64 MB per request, 2 parallel
  connections); ``stow-N``: N connections (``--associations N``); ``stow-big``: batch 10000,
  so that the 64 MB limit alone bounds a request (the peak RSS target).
* ``daemon-cstore``, ``daemon-stow``: ``forwarder run`` with one destination (DIMSE port, or
  the DICOMweb url with max_request_mb 64, batch 50, associations "auto"), the corpus
  hard-linked into its inbox at once: from the links to the last instance in Orthanc; peak RSS
  is the daemon's VmHWM.
* ``dwc``: dicomweb-client 0.61's ``store_instances`` in a loop, one file per call (its plain
  use), and ``dwc-50``: 50 data sets per call. Skipped when dicomweb-client is not installed.

Targets (issue 14): stow >= 0.8x cstore, stow >= 2x dwc, stow's peak RSS < 150 MB.
Peak RSS is the sender process's (``wait4``'s ru_maxrss).

Usage: ``python bench/bench_stow.py [--rounds N] [--corpus ct,small] [--senders ...]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "tests")]

import corpus  # noqa: E402  (bench/corpus.py)
from orthanc import Orthanc  # noqa: E402  (tests/orthanc.py)

SENDERS = ("cstore", "stow", "stow-1", "stow-big", "dwc", "dwc-50", "daemon-cstore", "daemon-stow")

DWC_SCRIPT = """
import sys
from pathlib import Path
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
url, folder, per = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
files = sorted(p for p in folder.rglob("*") if p.is_file())
client = DICOMwebClient(url)
for i in range(0, len(files), per):
    client.store_instances([dcmread(f) for f in files[i : i + per]])
"""


@dataclass(frozen=True)
class Run:
    sender: str
    corpus: str
    seconds: float
    count: int
    stored: int
    megabytes: float
    peak_rss_mb: float
    rc: int

    @property
    def inst_per_s(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0


def run_sender(argv: Sequence[str], env: dict[str, str]) -> tuple[float, int, float]:
    """Run `argv`; (seconds, exit status, peak RSS in MB) of that process alone."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT
    )
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 and proc.stderr is not None:
        tail = proc.stderr.read().decode(errors="replace").splitlines()[-5:]
        print(f"  exit {proc.returncode}: " + " | ".join(tail), file=sys.stderr)
    return seconds, proc.returncode, usage.ru_maxrss / 1024


def argv_for(sender: str, orthanc: Orthanc, folder: Path, python: str) -> list[str]:
    if sender == "cstore":
        return [python, "-m", "forwarder", "send", "-aec", orthanc.aet, "-r", "--no-progress",
                "127.0.0.1", str(orthanc.dicom_port), str(folder)]  # fmt: skip
    if sender.startswith("stow"):  # stow (auto), stow-N: N parallel connections
        n = sender.partition("-")[2]
        extra = ["--associations", n] if n.isdigit() else []
        if n == "big":  # requests bounded by the 64 MB limit alone
            extra = ["--batch-size", "10000"]
        return [python, "-m", "forwarder", "send", "--url", orthanc.dicomweb_url, "-r",
                "--no-progress", *extra, str(folder)]  # fmt: skip
    per = "50" if sender == "dwc-50" else "1"
    return [python, "-c", DWC_SCRIPT, orthanc.dicomweb_url, str(folder), per]


DAEMON_CONFIG = """
[watch]
paths = ["{inbox}"]
settle_seconds = 0.2
[outbox]
path = "{state}/outbox.sqlite3"
[disposition]
on_success = "delete"
[quarantine]
dir = "{state}/quarantine"
[log]
target = "stderr"
[[destinations]]
name = "orthanc"
{destination}
"""


def run_daemon(
    sender: str, orthanc: Orthanc, files: Sequence[Path], python: str, env: dict[str, str]
) -> tuple[float, int, float]:
    """The daemon drains `files` (hard-linked into its inbox) into `orthanc`: (seconds from
    the links to the last instance stored, exit status, VmHWM in MB)."""
    work = Path(tempfile.mkdtemp(dir=HERE / "corpus", prefix="daemon-"))
    inbox, state = work / "inbox", work / "state"
    inbox.mkdir()
    state.mkdir()
    if sender == "daemon-stow":
        dest = f'type = "dicomweb"\nurl = "{orthanc.dicomweb_url}"\nmax_request_mb = 64'
    else:
        dest = f'host = "127.0.0.1"\nport = {orthanc.dicom_port}\ncalled_aet = "{orthanc.aet}"'
    cfg = work / "forwarder.toml"
    cfg.write_text(DAEMON_CONFIG.format(inbox=inbox, state=state, destination=dest))
    log = (work / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [python, "-m", "forwarder", "run", "--config", str(cfg)],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while b"watching" not in (work / "daemon.log").read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start: {(work / 'daemon.log').read_text()}")
            time.sleep(0.05)
        start = time.perf_counter()
        for i, f in enumerate(files):
            os.link(f, inbox / f"{i:05d}.dcm")
        deadline = time.monotonic() + 900
        while orthanc.get("/statistics")["CountInstances"] < len(files):
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        hwm = 0.0
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
        proc.terminate()
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(work, ignore_errors=True)
    return seconds, rc, hwm


def has_dicomweb_client(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import dicomweb_client"], capture_output=True)
    return probe.returncode == 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--corpus", default="ct,small")
    parser.add_argument("--senders", default=",".join(SENDERS))
    parser.add_argument("--corpus-dir", type=Path, default=HERE / "corpus")
    parser.add_argument("--python", default=sys.executable, help="the venv's python to measure")
    args = parser.parse_args(argv)
    senders = [s for s in args.senders.split(",") if s]
    if any(s.startswith("dwc") for s in senders) and not has_dicomweb_client(args.python):
        print("dicomweb-client not installed: dwc skipped (pip install dicomweb-client)")
        senders = [s for s in senders if not s.startswith("dwc")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    env["NO_PROXY"] = "127.0.0.1,localhost"
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="bench-stow-") as tmp:
        orthanc = Orthanc(Path(tmp), plugins=("dicomweb",), config={"HttpThreadsCount": 4})
        orthanc.start()
        try:
            for name in args.corpus.split(","):
                folder = corpus.generate(corpus.SPECS[name], args.corpus_dir)
                files = corpus.dicom_files(folder)
                megabytes = sum(f.stat().st_size for f in files) / 1e6
                for f in files:  # page cache warm for every sender alike
                    f.read_bytes()
                for rnd in range(args.rounds):
                    for sender in senders:
                        orthanc.clear()
                        if sender.startswith("daemon"):
                            seconds, rc, rss = run_daemon(sender, orthanc, files, args.python, env)
                        else:
                            seconds, rc, rss = run_sender(
                                argv_for(sender, orthanc, folder, args.python), env
                            )
                        stored = len(orthanc.get("/instances"))
                        run = Run(sender, name, seconds, len(files), stored, megabytes, rss, rc)
                        runs.append(run)
                        print(
                            f"{name} round {rnd + 1} {sender:7} {run.inst_per_s:7.1f} inst/s "
                            f"{megabytes / seconds:6.1f} MB/s rss {rss:5.0f} MB "
                            f"stored {stored}/{len(files)} rc {rc}",
                            flush=True,
                        )
        finally:
            orthanc.stop()
    print()
    print(report(runs))
    return 0 if all(r.rc == 0 and r.stored == r.count for r in runs) else 1


def report(runs: Sequence[Run]) -> str:
    """Median inst/s per (corpus, sender), peak RSS, and the issue's ratios."""
    lines = ["| corpus | sender | inst/s (median) | MB/s | peak RSS MB | vs cstore | stow vs it |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    by: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        by.setdefault((r.corpus, r.sender), []).append(r)

    def median(key: tuple[str, str]) -> float:
        rates = sorted(r.inst_per_s for r in by.get(key, []))
        return rates[len(rates) // 2] if rates else 0.0

    for (name, sender), group in by.items():
        rate = median((name, sender))
        kind = "daemon-" if sender.startswith("daemon") else ""  # daemon against daemon
        cstore, stow = median((name, f"{kind}cstore")), median((name, f"{kind}stow"))
        mbs = rate * group[0].megabytes / group[0].count
        rss = max(r.peak_rss_mb for r in group)
        vs = f"{rate / cstore:.2f}x" if cstore else "-"
        stow_vs = f"{stow / rate:.2f}x" if rate and stow and not sender.endswith("stow") else "-"
        lines.append(
            f"| {name} | {sender} | {rate:.1f} | {mbs:.1f} | {rss:.0f} | {vs} | {stow_vs} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
