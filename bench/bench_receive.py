"""Benchmark the receiver (``[receive]``) against DCMTK ``storescp -od`` on the same disk.

Two phases, both with DCMTK ``dcmsend`` as the modality (``TCP_NODELAY=1`` in its environment,
as ``bench_send.py``'s tuned mode; PDU 131072):

* **throughput**: dcmsend pushes a whole corpus (``ct``: 1000 x 0.5 MB; ``small``: 2000 x 9.5 KB,
  see ``corpus.py``) on one association to (a) ``storescp -od DIR`` (writes each file, no fsync)
  and (b) ``forwarder run`` receiving into DIR (the ack log: the instance, its record and
  their header with a CRC-32C of the bytes written into a preallocated segment, one fdatasync,
  before every 0x0000; the file, its fsyncs and the outbox commit follow behind the answer,
  see forwarder/acklog.py).
  Both write under ``bench/results/`` on the real disk of /work, never tmpfs. The figure is
  files / dcmsend's wall time (it exits after the last response); for the forwarder the time
  until every file is queued is reported too ("all queued"), and its CPU seconds include it.
  The forwarder's one destination is a closed port, so what is timed is the receiving alone
  (the workers back off; nothing is sent). Each round runs both receivers in rotating order,
  each after a wait for a quiet machine (no pytest, < 30 % CPU busy, as ``bench_daemon.py``
  does); the receiver's own CPU seconds are read from /proc.
* **latency** (end to end): dcmsend -> forwarder -> storescp, one dcmsend per instance (a
  modality sending each image as it is made) at a trickle (5 inst/s by default). Per
  instance: ``ack`` = dcmsend's exit (the receiver's 0x0000: durable) minus its
  launch; ``e2e`` = the instance's file appearing in storescp's folder (polled every 2 ms)
  minus the launch. p50 / p99 / max.

Usage: ``.venv/bin/python bench/bench_receive.py [--rounds 3] [--corpus ct,small]
[--latency-files 150] [--latency-rate 5] [--no-latency]``. The report is printed and written to
``bench/results/receive-<stamp>.md`` (raw figures in ``.json``). Exit status 0 when every run
delivered every file, 1 otherwise, 2 on a setup error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_daemon as bd
import bench_send as bs
import corpus as corpus_mod

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
AE = bs.AE_SCP  # both receivers answer to this called AE title
TARGETS = {"ct": 0.6, "small": 0.4}
LATENCY_P99_S = 0.5
QUIET_WAIT_S = 60.0
"""The most a run waits for other people's pytest to end (then it runs, flagged)."""
ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")},
    "TCP_NODELAY": "1",
}


@dataclass
class Run:
    corpus: str
    receiver: str
    round: int
    files: int
    wall_s: float
    rc: int | None
    stored: int
    receiver_cpu_s: float | None
    busy_before: float
    pytest_seen: bool
    loadavg: float
    queued_s: float | None = None  # the forwarder: launch until every file is queued

    @property
    def rate(self) -> float:
        return self.files / self.wall_s if self.wall_s > 0 else 0.0


def _ticks_s(ticks: int | None) -> float | None:
    return None if ticks is None else ticks / os.sysconf("SC_CLK_TCK")


class Storescp:
    def __init__(self, out: Path, log: Path) -> None:
        self.out = out
        self.port = bs.free_port()
        out.mkdir(parents=True, exist_ok=True)
        exe = shutil.which("storescp")
        if exe is None:
            raise SystemExit("storescp not found (apt-get install dcmtk)")
        self.proc = subprocess.Popen(
            [exe, "-aet", AE, "-od", str(out), "-pdu", str(bs.PDU), str(self.port)],
            env=ENV,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        bd.wait_for(lambda: bs._listening(self.port), 10, 0.01)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stored(self) -> int:
        return bd.count_entries(self.out)

    def stop(self) -> None:
        bs.kill_group(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        bs.kill_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


class Receiving:
    """``forwarder run`` with ``[receive]`` on a free port, its state under ``root``."""

    def __init__(
        self, exe: Path, root: Path, dest_port: int, log: Path, retry: float = 600
    ) -> None:
        self.root = root
        self.retry = retry  # a closed destination port is tried once, then left alone
        self.port = bs.free_port()
        self.dir = root / "received"
        self.log = log
        root.mkdir(parents=True, exist_ok=True)
        (root / "inbox").mkdir(exist_ok=True)
        cfg = root / "forwarder.toml"
        cfg.write_text(
            "\n".join(
                [
                    "shutdown_timeout = 10",
                    "[watch]",
                    f"paths = [{json.dumps(str(root / 'inbox'))}]",
                    "[outbox]",
                    f"path = {json.dumps(str(root / 'outbox.sqlite3'))}",
                    "[quarantine]",
                    f"dir = {json.dumps(str(root / 'quarantine'))}",
                    "[retry]",
                    f"initial_seconds = {self.retry}",
                    f"max_seconds = {self.retry}",
                    "[log]",
                    'level = "info"',
                    'target = "stderr"',
                    "[receive]",
                    f'listen = "{bs.HOST}:{self.port}"',
                    f'ae_title = "{AE}"',
                    f"dir = {json.dumps(str(self.dir))}",
                    "[[destinations]]",
                    'name = "dest"',
                    f'host = "{bs.HOST}"',
                    f"port = {dest_port}",
                    f'called_aet = "{AE}"',
                    f"max_pdu = {bs.PDU}",
                    "connect_timeout = 2",
                ]
            )
            + "\n"
        )
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(exe), "run", "--config", str(cfg)],
                env=ENV,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        ok, _ = bd.wait_for(self._listening, 60, 0.02)
        if not ok:
            self.stop()
            raise SystemExit(f"forwarder run did not start receiving; see {log}")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise SystemExit(f"forwarder run exited {self.proc.returncode}; see {self.log}")
        return "receiving as" in self.log.read_text(errors="replace")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stored(self) -> int:
        """Files in the calling AE folders (acknowledged instances land there from the ack
        log a moment after their answer; spool files and ack log segments are not counted)."""
        if not self.dir.exists():
            return 0
        return sum(
            bd.count_files(p)
            for p in self.dir.iterdir()
            if p.is_dir() and not p.name.startswith(".")
        )

    def stop(self) -> None:
        bs.kill_group(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            bs.kill_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def dcmsend(port: int, source: Path, log: Path, timeout: float = 600) -> tuple[float, int | None]:
    exe = shutil.which("dcmsend")
    if exe is None:
        raise SystemExit("dcmsend not found (apt-get install dcmtk)")
    argv = [exe, bs.HOST, str(port), str(source), "--scan-directories", "--recurse",
            "-aet", "DCMSEND", *bs.DCMTK_OPTS]  # fmt: skip
    wall, rc, _, _ = bs.run_process(argv, ENV, timeout, log)
    return wall, rc


def dcmsend_parallel(port: int, sources: list[Path], logs: Path) -> tuple[float, int | None]:
    """One dcmsend per source folder, all at once; wall time until the last exits."""
    results: list[tuple[float, int | None]] = []
    lock = threading.Lock()

    def one(i: int, src: Path) -> None:
        got = dcmsend(port, src, logs.with_suffix(f".{i}.log"))
        with lock:
            results.append(got)

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i, s)) for i, s in enumerate(sources)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    rc = max((r for _, r in results if r is not None), default=None)
    return wall, None if any(r is None for _, r in results) else rc


def _all_in(receiver: Receiving, n: int) -> bool:
    return receiver.stored() >= n


def throughput(
    exe: Path,
    work: Path,
    corpus_dir: Path,
    name: str,
    rounds: int,
    monitor: bd.Monitor,
    parallel: bool = False,
) -> list[Run]:
    """Each round: storescp and the forwarder, rotating order. `parallel`: one dcmsend per
    series folder of the corpus at once (storescp, which does not fork, serves them one
    after the other; the forwarder at once)."""
    files = corpus_mod.dicom_files(corpus_dir)
    series = sorted(p for p in corpus_dir.iterdir() if p.is_dir())
    label = f"{name} x{len(series)}" if parallel else name
    bs.warm_page_cache(files)
    closed = bs.free_port()  # the forwarder's destination: nothing listens there
    runs: list[Run] = []
    order = ["storescp", "forwarder"]
    for rnd in range(rounds):
        for key in order[rnd % 2 :] + order[: rnd % 2]:
            quiet = bd.wait_quiet(monitor, QUIET_WAIT_S, 5, 30, label=f"{label} {key} r{rnd}")
            root = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=work))
            log = root.with_suffix(".log")
            receiver: Storescp | Receiving
            if key == "storescp":
                receiver = Storescp(root / "out", log)
            else:
                receiver = Receiving(exe, root, closed, log)
            try:
                ticks0 = bd.proc_cpu_ticks(receiver.pid)
                t0 = time.monotonic()
                log_to = root.with_suffix(".dcmsend.log")
                if parallel:
                    wall, rc = dcmsend_parallel(receiver.port, series, log_to)
                else:
                    wall, rc = dcmsend(receiver.port, corpus_dir, log_to)
                queued_s = None
                if isinstance(receiver, Receiving):  # until every acknowledged one has its file
                    ok, _ = bd.wait_for(partial(_all_in, receiver, len(files)), 120, 0.02)
                    queued_s = round(time.monotonic() - t0, 3) if ok else None
                ticks1 = bd.proc_cpu_ticks(receiver.pid)
                seen = monitor.seen_between(t0, time.monotonic())
                stored = receiver.stored()
            finally:
                receiver.stop()
            cpu = None if ticks0 is None or ticks1 is None else _ticks_s(ticks1 - ticks0)
            run = Run(label, key, rnd, len(files), round(wall, 3), rc, stored,
                      None if cpu is None else round(cpu, 2), quiet.busy, seen,
                      round(os.getloadavg()[0], 2), queued_s)  # fmt: skip
            runs.append(run)
            print(
                f"  {label:8} {key:9} r{rnd}: {run.rate:7.1f} inst/s ({wall:.2f} s, rc {rc}, "
                f"stored {stored}{'' if queued_s is None else f' (all queued at {queued_s} s)'}, "
                f"receiver CPU {cpu if cpu is None else round(cpu, 2)} s, "
                f"busy before {quiet.busy:.0%}{', PYTEST SEEN' if seen else ''})",
                file=sys.stderr,
            )
            shutil.rmtree(root, ignore_errors=True)
    return runs


@dataclass
class Latency:
    files: int
    rate: float
    ack_p50: float
    ack_p99: float
    ack_max: float
    e2e_p50: float
    e2e_p99: float
    e2e_max: float
    missing: int
    busy_before: float
    pytest_seen: bool


def _q(values: Sequence[float], q: float) -> float:
    return round(bd.quantile(sorted(values), q), 4) if values else float("nan")


def latency(
    exe: Path, work: Path, corpus_dir: Path, count: int, rate: float, monitor: bd.Monitor
) -> Latency:
    files = corpus_mod.dicom_files(corpus_dir)[:count]
    bs.warm_page_cache(files)
    root = Path(tempfile.mkdtemp(prefix="latency-", dir=work))
    dest = Storescp(root / "dest", root / "storescp.log")
    fwd = Receiving(exe, root / "fwd", dest.port, root / "forwarder.log", retry=0.5)
    quiet = bd.wait_quiet(monitor, QUIET_WAIT_S, 5, 30, label="latency")
    seen: dict[str, float] = {}
    halt = threading.Event()

    def poll() -> None:
        while not halt.is_set():
            now = time.monotonic()
            for name in os.listdir(dest.out):
                seen.setdefault(name.split(".", 1)[1] if "." in name else name, now)
            halt.wait(0.002)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    launched: dict[str, float] = {}
    acked: dict[str, float] = {}
    threads = []
    exe_dcmsend = shutil.which("dcmsend") or "dcmsend"
    from pydicom import dcmread

    uids = [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    t_start = time.monotonic()
    t_mon = time.monotonic()
    try:
        for i, (path, uid) in enumerate(zip(files, uids, strict=True)):
            due = t_start + i / rate
            time.sleep(max(0.0, due - time.monotonic()))

            def one(path: Path = path, uid: str = uid) -> None:
                launched[uid] = time.monotonic()
                subprocess.run(
                    [exe_dcmsend, bs.HOST, str(fwd.port), str(path), "-aet", "DCMSEND",
                     *bs.DCMTK_OPTS],
                    env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
                )  # fmt: skip
                acked[uid] = time.monotonic()

            th = threading.Thread(target=one)
            th.start()
            threads.append(th)
        for th in threads:
            th.join(90)
        deadline = time.monotonic() + 30
        while len([u for u in uids if u in seen]) < len(uids) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        halt.set()
        poller.join()
        fwd.stop()
        dest.stop()
    pytest_seen = monitor.seen_between(t_mon, time.monotonic())
    acks = [acked[u] - launched[u] for u in uids if u in acked and u in launched]
    e2e = [seen[u] - launched[u] for u in uids if u in seen and u in launched]
    shutil.rmtree(root, ignore_errors=True)
    return Latency(len(files), rate, _q(acks, 0.5), _q(acks, 0.99), round(max(acks), 4),
                   _q(e2e, 0.5), _q(e2e, 0.99), round(max(e2e, default=float("nan")), 4),
                   len(uids) - len(e2e), quiet.busy, pytest_seen)  # fmt: skip


def markdown(runs: list[Run], lat: Latency | None, meta: dict[str, Any]) -> str:
    out = [f"# Receive benchmark {meta['stamp']}", "",
           f"Machine: {meta['cpus']} CPUs, load average {meta['loadavg_start']} at start, "
           f"{meta['loadavg_end']} at the end. Receivers write under {meta['work']} "
           f"(real disk: {meta['fs']}).", "",
           "| corpus | round | storescp inst/s | forwarder inst/s | ratio | storescp CPU s "
           "| forwarder CPU s | forwarder all queued s | busy before | pytest seen |",
           "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    ok = True
    for name in dict.fromkeys(r.corpus for r in runs):
        ratios = []
        for rnd in sorted({r.round for r in runs if r.corpus == name}):
            pair = {r.receiver: r for r in runs if r.corpus == name and r.round == rnd}
            s, f = pair.get("storescp"), pair.get("forwarder")
            if s is None or f is None:
                continue
            ratio = f.rate / s.rate if s.rate else 0.0
            ratios.append(ratio)
            ok &= f.rc == 0 and s.rc == 0 and f.stored == f.files and s.stored == s.files
            busy = max(s.busy_before, f.busy_before)
            shown = "n/a" if busy != busy else f"{busy:.0%}"  # NaN: pytest ran, not measured
            out.append(
                f"| {name} | {rnd} | {s.rate:.1f} | {f.rate:.1f} | {ratio:.2f}x | "
                f"{s.receiver_cpu_s} | {f.receiver_cpu_s} | {f.queued_s} | {shown} "
                f"| {'yes' if s.pytest_seen or f.pytest_seen else 'no'} |"
            )
        if ratios:
            med = statistics.median(ratios)
            target = TARGETS.get(name)
            verdict = (
                f" (target >= {target}x: {'met' if med >= target else 'NOT met'})"
                if target
                else " (no target: several modalities at once)"
            )
            out.append(f"| **{name}** | median | | | **{med:.2f}x**{verdict} | | | | | |")
    if lat is not None:
        ok &= lat.missing == 0
        out += ["", f"End to end at {lat.rate:g} inst/s, {lat.files} instances, one dcmsend "
                "each -> forwarder -> storescp:", "",
                "| | p50 s | p99 s | max s |", "|---|---|---|---|",
                f"| ack (dcmsend launch to exit) | {lat.ack_p50} | {lat.ack_p99} | {lat.ack_max} |",
                f"| drop to stored at the destination | {lat.e2e_p50} | {lat.e2e_p99} | "
                f"{lat.e2e_max} |", "",
                f"Target p99 < {LATENCY_P99_S} s: "
                f"{'met' if lat.e2e_p99 < LATENCY_P99_S else 'NOT met'}; missing {lat.missing}; "
                f"busy before {lat.busy_before:.0%}; pytest seen: {lat.pytest_seen}."]  # fmt: skip
    meta["ok"] = ok
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    global QUIET_WAIT_S
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--corpus", default="ct,small")
    p.add_argument("--latency-files", type=int, default=150)
    p.add_argument("--latency-rate", type=float, default=5.0)
    p.add_argument("--no-latency", action="store_true")
    p.add_argument(
        "--no-parallel", action="store_true", help="skip the one-dcmsend-per-series runs"
    )
    p.add_argument("--forwarder-venv", type=Path, default=REPO / ".venv")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=QUIET_WAIT_S,
        help="seconds a run waits for other pytest runs to end before it goes on (flagged)",
    )
    args = p.parse_args(argv)
    QUIET_WAIT_S = args.quiet_wait
    exe = args.forwarder_venv / "bin" / "forwarder"
    if not exe.exists():
        print(f"no forwarder in {args.forwarder_venv}", file=sys.stderr)
        return 2
    results = BENCH_DIR / "results"
    results.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    corpora = {n: corpus_mod.generate(corpus_mod.SPECS[n], BENCH_DIR / "corpus")
               for n in args.corpus.split(",")}  # fmt: skip
    fs = subprocess.run(["df", "--output=fstype,source", str(results)], capture_output=True,
                        text=True).stdout.split("\n")[1].strip()  # fmt: skip
    meta: dict[str, Any] = {"stamp": stamp, "cpus": os.cpu_count(), "work": str(results),
                            "fs": fs, "loadavg_start": os.getloadavg()}  # fmt: skip
    monitor = bd.Monitor()
    monitor.start()
    work = Path(tempfile.mkdtemp(prefix="receive-", dir=results))
    runs: list[Run] = []
    lat: Latency | None = None
    try:
        for name, corpus_dir in corpora.items():
            runs += throughput(exe, work, corpus_dir, name, args.rounds, monitor)
            if not args.no_parallel:
                runs += throughput(exe, work, corpus_dir, name, args.rounds, monitor, True)
        if not args.no_latency:
            small = corpora.get("small") or corpus_mod.generate(
                corpus_mod.SPECS["small"], BENCH_DIR / "corpus"
            )
            lat = latency(exe, work, small, args.latency_files, args.latency_rate, monitor)
    finally:
        monitor.halt.set()
        shutil.rmtree(work, ignore_errors=True)
    meta["loadavg_end"] = os.getloadavg()
    report = markdown(runs, lat, meta)
    print(report)
    (results / f"receive-{stamp}.md").write_text(report)
    raw = {"meta": meta, "runs": [asdict(r) | {"rate": r.rate} for r in runs],
           "latency": asdict(lat) if lat else None}  # fmt: skip
    (results / f"receive-{stamp}.json").write_text(json.dumps(raw, indent=2) + "\n")
    return 0 if meta["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
