"""Benchmark one-shot senders (forwarder send, pynetdicom, dcmsend, storescu) on loopback.

One DCMTK ``storescp`` per receiver mode listens on a free port and stores into a tmpfs
directory; every sender sends the same corpus to it over 127.0.0.1. Senders alternate
round-robin for ``--rounds`` rounds (the first sender rotates each round) and the median of the
runs that delivered every file is reported. After each run the receiver must hold exactly N new
files, otherwise the run is FAILED and not timed.

Receiver modes:

* ``tuned``: ``TCP_NODELAY=1`` in the environment of storescp and of every sender (DCMTK reads it).
* ``stock``: no ``TCP_NODELAY`` anywhere; Debian's DCMTK then leaves Nagle on and every response
  stalls, so only the first files of each corpus are sent (``--stock-limit``).

Per run: wall time from spawn to exit (process start-up included), instances/s, MB/s
(10^6 bytes of file size per second) and the peak RSS of the sender process, as GNU time's
``%M`` (its ``wait4`` on the sender; see ``run_process`` for why not our own ``wait4``).

Usage: ``python bench/bench_send.py [--rounds N] [--corpus ct,small] [--mode tuned,stock]
[--stock-limit ct=100,small=200] [--senders KEY,...]``
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus as corpus_mod

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
HOST = "127.0.0.1"
AE_SCP = "STORESCP"
# DCMTK accepts 4096..131072. storescp's value is the size of every P-DATA the senders send;
# the senders' own -pdu is only their receive limit (C-STORE responses), set alike for symmetry.
PDU = 131072
MODES = ("tuned", "stock")
GNU_TIME = "/usr/bin/time"
FORWARDER = "forwarder send"
DCMTK_OPTS = ("-aec", AE_SCP, "-pdu", str(PDU), "-q")


class BenchError(RuntimeError):
    """A setup problem that stops the benchmark (a receiver that will not start)."""


# --------------------------------------------------------------------------------------------
# senders


@dataclass(frozen=True)
class Sender:
    """One sender under test: ``{port}`` and ``{dir}`` in ``template`` are filled per run."""

    key: str
    name: str
    template: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    is_forwarder: bool = False

    def argv(self, port: int, directory: Path) -> list[str]:
        return [a.format(port=port, dir=directory) for a in self.template]


# key -> what it is; "default" marks the senders run when --senders is not given
SENDER_KEYS: dict[str, tuple[str, bool]] = {
    "forwarder": ("forwarder send, one association", True),
    "forwarder-a2": ("forwarder send --associations 2 (when the option exists)", True),
    "pynetdicom": ("pynetdicom's storescu app, as shipped", True),
    "pynetdicom-nodelay": (
        "pynetdicom's storescu app with TCP_NODELAY forced on its socket (bench/nodelay)",
        False,
    ),
    "pynetdicom-chunked": (
        "pynetdicom's public API at its best: bench/pynetdicom_chunked.py (chunked send_c_store, "
        "TCP_NODELAY, the files' own contexts, one association)",
        True,
    ),
    "dcmsend": ("DCMTK dcmsend", True),
    "storescu": ("DCMTK storescu", True),
}


def forwarder_senders(venv: Path) -> tuple[list[Sender], str]:
    """``forwarder send`` variants built from its --help, or ([], why) when it does not run."""
    exe = venv / "bin" / "forwarder"
    if not exe.exists():
        found = shutil.which("forwarder")
        if not found:
            return [], f"{exe} not found"
        exe = Path(found)
    try:
        proc = subprocess.run(
            [str(exe), "send", "--help"], capture_output=True, text=True, timeout=60, check=False
        )
    except subprocess.TimeoutExpired:
        return [], "`forwarder send --help` timed out"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return [], f"`forwarder send --help` failed (rc {proc.returncode}): {last}"
    text = proc.stdout
    opts = ["-q"] if "-q" in text else []
    opts += ["-aec", AE_SCP]
    if "-pdu" in text:
        opts += ["-pdu", str(PDU)]
    recurse = ["-r"] if "-r" in text else []
    base = (str(exe), "send", *opts)
    tail = (HOST, "{port}", "{dir}", *recurse)
    senders = [Sender("forwarder", FORWARDER, (*base, *tail), is_forwarder=True)]
    if "--associations" in text:
        senders.append(
            Sender(
                "forwarder-a2",
                f"{FORWARDER} --associations 2",
                (*base, "--associations", "2", *tail),
                is_forwarder=True,
            )
        )
    return senders, ""


def competitor_senders(venv: Path) -> tuple[list[Sender], list[str]]:
    """pynetdicom's storescu app (plain and +NODELAY), pynetdicom at its best
    (``pynetdicom_chunked.py``), dcmsend, storescu; notes for the missing ones."""
    notes: list[str] = []
    senders: list[Sender] = []
    python = venv / "bin" / "python"
    if not python.exists():
        python = Path(sys.executable)
    probe = subprocess.run(
        [str(python), "-c", "import pynetdicom"], capture_output=True, timeout=60, check=False
    )
    if probe.returncode == 0:
        app = (str(python), "-m", "pynetdicom", "storescu", HOST, "{port}", "{dir}", "-r")
        # no -q: its errors (lost responses, aborts) are the only clue when files go missing
        opts = ("-aec", AE_SCP, "-pdu", str(PDU))
        senders.append(Sender("pynetdicom", "pynetdicom storescu", (*app, *opts)))
        senders.append(
            Sender(
                "pynetdicom-nodelay",
                "pynetdicom storescu +NODELAY",
                (*app, *opts),
                env={"PYTHONPATH": str(BENCH_DIR / "nodelay")},
            )
        )
        chunked = (str(python), str(BENCH_DIR / "pynetdicom_chunked.py"), HOST, "{port}", "{dir}")
        senders.append(
            Sender("pynetdicom-chunked", "pynetdicom chunked +NODELAY", (*chunked, "-r", *opts))
        )
    else:
        notes.append(f"pynetdicom storescu skipped: `{python} -c 'import pynetdicom'` failed")
    dcmsend = shutil.which("dcmsend")
    if dcmsend:
        scan = ("--scan-directories", "--recurse")
        senders.append(
            Sender("dcmsend", "dcmsend", (dcmsend, HOST, "{port}", "{dir}", *scan, *DCMTK_OPTS))
        )
    else:
        notes.append("dcmsend skipped: not found on PATH (apt-get install dcmtk)")
    storescu = shutil.which("storescu")
    if storescu:
        scan = ("--scan-directories", "--recurse")
        senders.append(
            Sender(
                "storescu",
                "dcmtk storescu",
                (storescu, HOST, "{port}", *scan, "{dir}", *DCMTK_OPTS),
            )
        )
    else:
        notes.append("dcmtk storescu skipped: not found on PATH (apt-get install dcmtk)")
    return senders, notes


# --------------------------------------------------------------------------------------------
# one process


@dataclass
class Run:
    """One timed sender run and whether the receiver got every file."""

    mode: str
    corpus: str
    round: int
    sender: str
    files: int
    bytes: int
    ok: bool
    wall_s: float
    rc: int | None
    peak_rss_mb: float | None
    received: int
    background_busy: float = 0.0
    reason: str = ""
    output_tail: str = ""

    @property
    def inst_per_s(self) -> float:
        return self.files / self.wall_s if self.wall_s > 0 else 0.0


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def background_busy(window_s: float = 0.3) -> float:
    """Fraction of all CPUs busy during ``window_s`` (between runs: other people's load)."""
    try:
        busy0, total0 = _cpu_times()
        time.sleep(window_s)
        busy1, total1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return (busy1 - busy0) / max(1, total1 - total0)


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def run_process(
    argv: Sequence[str], env: dict[str, str], timeout: float, log: Path
) -> tuple[float, int | None, float | None, bool]:
    """Run ``argv`` in its own process group; return (wall s, rc, peak RSS MB, timed out).

    The wall time ends when ``os.wait4`` reaps the child (no polling delay). Peak RSS comes from
    GNU time wrapped around the command: our own ``wait4`` would report at least this benchmark
    process's RSS, because Linux keeps the pre-exec memory high-water mark of a forked (or
    vforked) child in ``ru_maxrss``; GNU time is small, so its child's figure is the sender's.
    Without GNU time the RSS is None. On timeout the whole process group is killed, rc is None.
    """
    rss_file = log.with_suffix(".rss")
    cmd = list(argv)
    if Path(GNU_TIME).exists():
        cmd = [GNU_TIME, "-f", "%M", "-o", str(rss_file), *cmd]
    timed_out = threading.Event()
    reaped = threading.Lock()
    with log.open("wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

        def on_timeout() -> None:
            with reaped:
                if proc.returncode is None:
                    timed_out.set()
                    kill_group(proc.pid)

        timer = threading.Timer(timeout, on_timeout)
        timer.daemon = True
        timer.start()
        try:
            _, status, _ = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - started
        except BaseException:
            kill_group(proc.pid)
            proc.wait()
            raise
        finally:
            timer.cancel()
        with reaped:
            proc.returncode = os.waitstatus_to_exitcode(status)
    rss: float | None = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        rss = int(rss_file.read_text().split()[-1]) / 1024.0  # KiB -> MiB
    rss_file.unlink(missing_ok=True)
    if timed_out.is_set():
        return wall, None, rss, True
    return wall, proc.returncode, rss, False


# --------------------------------------------------------------------------------------------
# receiver


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    """True when port is in LISTEN state on 127.0.0.1 or on every address (from /proc/net/tcp).

    storescp 3.6.7 has no bind-address option: it listens on 0.0.0.0; every connection the
    benchmark makes goes to 127.0.0.1. Reading /proc avoids a test connection.
    """
    wanted = {f"0100007F:{port:04X}", f"00000000:{port:04X}"}
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(parts[1] in wanted and parts[3] == "0A" for parts in (ln.split() for ln in lines))


class Receiver:
    """A DCMTK storescp on a free port, writing the received bytes into ``out_dir``."""

    def __init__(self, mode: str, env: dict[str, str], out_dir: Path, log: Path) -> None:
        exe = shutil.which("storescp")
        if not exe:
            raise BenchError("storescp not found on PATH (apt-get install dcmtk)")
        self.exe = exe
        self.mode = mode
        self.env = env
        self.out_dir = out_dir
        self.log = log
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def argv(self) -> list[str]:
        # --fork: one child per association, so concurrent associations are served concurrently
        # +B: write the received bytes as they arrive (no decode/re-encode): the cheapest store
        return [
            self.exe,
            "--fork",
            "-pdu",
            str(PDU),
            "-aet",
            AE_SCP,
            "+B",
            "-od",
            str(self.out_dir),
            str(self.port),
        ]

    def start(self, port: int | None = None) -> None:
        """Start storescp on ``port`` (default: a free one) and wait until it listens."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.clean()
        self.port = port or free_port()
        with self.log.open("ab") as out:
            out.write(f"--- start {' '.join(self.argv())}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv(),
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.starts += 1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"storescp exited with {self.proc.returncode}; see {self.log}")
            if _listening(self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise BenchError(f"storescp did not listen on port {self.port} within 10 s")

    def ensure_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            rc = None if self.proc is None else self.proc.returncode
            print(f"  [{self.mode}] storescp gone (rc {rc}): restarting", file=sys.stderr)
            self.stop()
            self.start()

    def stop(self) -> None:
        if self.proc is None:
            return
        kill_group(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            kill_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        kill_group(self.proc.pid, signal.SIGKILL)  # forked children left in its group
        self.proc = None

    def count(self) -> int:
        return sum(1 for e in os.scandir(self.out_dir) if e.is_file())

    def settled_count(self, expected: int, wait_s: float = 3.0) -> int:
        """Count received files, waiting (bounded) for a short count to grow."""
        deadline = time.monotonic() + wait_s
        n = self.count()
        while n < expected and time.monotonic() < deadline:
            time.sleep(0.05)
            n = self.count()
        return n

    def clean(self) -> None:
        for entry in os.scandir(self.out_dir):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


# --------------------------------------------------------------------------------------------
# benchmark


@dataclass
class Plan:
    rounds: int
    corpora: list[str]
    modes: list[str]
    stock_limit: dict[str, int]
    timeout: float
    warmup: bool
    senders: list[Sender]
    logs: Path
    restarts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Workload:
    mode: str
    corpus: str
    directory: Path
    files: int
    bytes: int
    env: dict[str, str]


def mode_env(mode: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if mode == "tuned":
        env["TCP_NODELAY"] = "1"
    return env


def warm_page_cache(files: Sequence[Path]) -> None:
    for path in files:
        with path.open("rb") as f:
            while f.read(1 << 20):
                pass


def one_run(plan: Plan, receiver: Receiver, sender: Sender, work: Workload, rnd: int) -> Run:
    receiver.ensure_alive()
    if receiver.count():
        receiver.clean()
    busy = background_busy()
    label = sender.name.replace(" ", "_").replace("+", "")
    log = plan.logs / f"{work.mode}-{work.corpus}-r{rnd}-{label}.log"
    wall, rc, rss, timed_out = run_process(
        sender.argv(receiver.port, work.directory), work.env | sender.env, plan.timeout, log
    )
    received = receiver.settled_count(work.files)
    reasons = []
    if timed_out:
        reasons.append(f"timed out after {plan.timeout:.0f} s")
    elif rc != 0:
        reasons.append(f"exit status {rc}")
    if received != work.files:
        reasons.append(f"receiver got {received} of {work.files} files")
    tail = log.read_text(errors="replace")[-2000:] if reasons else ""
    receiver.clean()
    return Run(
        mode=work.mode,
        corpus=work.corpus,
        round=rnd,
        sender=sender.name,
        files=work.files,
        bytes=work.bytes,
        ok=not reasons,
        wall_s=wall,
        rc=rc,
        peak_rss_mb=rss,
        received=received,
        background_busy=round(busy, 3),
        reason="; ".join(reasons),
        output_tail=tail,
    )


def run_mode(plan: Plan, mode: str, dirs: dict[str, Path], runs: list[Run]) -> None:
    """Start one storescp for ``mode``, run every corpus x round x sender, stop it."""
    env = mode_env(mode)
    out_dir = Path(tempfile.mkdtemp(prefix=f"bench-send-{mode}-", dir="/dev/shm"))
    receiver = Receiver(mode, env, out_dir, plan.logs / f"storescp-{mode}.log")
    try:
        receiver.start()
        print(f"[{mode}] storescp on port {receiver.port} -> {out_dir}", file=sys.stderr)
        for corpus in plan.corpora:
            directory = dirs[corpus]
            if mode == "stock" and corpus in plan.stock_limit:
                directory = corpus_mod.subset(directory, plan.stock_limit[corpus])
            paths = corpus_mod.dicom_files(directory)
            warm_page_cache(paths)
            work = Workload(
                mode, corpus, directory, len(paths), sum(p.stat().st_size for p in paths), env
            )
            # untimed first pass: tmpfs pages, page cache, a receiver that works. Not in stock
            # mode: there every run is dominated by Nagle stalls (a warm-up costs ~20 s)
            if plan.warmup and mode == "tuned":
                warm = next((s for s in plan.senders if s.key == "dcmsend"), plan.senders[0])
                r = one_run(plan, receiver, warm, work, 0)
                status = "ok" if r.ok else f"FAILED ({r.reason})"
                print(
                    f"  [{mode}/{corpus}] warm-up {warm.name}: {r.wall_s:.2f} s {status}",
                    file=sys.stderr,
                )
            for rnd in range(1, plan.rounds + 1):
                shift = (rnd - 1) % len(plan.senders)
                for sender in plan.senders[shift:] + plan.senders[:shift]:
                    r = one_run(plan, receiver, sender, work, rnd)
                    runs.append(r)
                    status = "ok" if r.ok else f"FAILED ({r.reason})"
                    rss = "n/a" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.1f}"
                    print(
                        f"  [{mode}/{corpus} round {rnd}] {sender.name:<34} "
                        f"{r.wall_s:7.2f} s {r.inst_per_s:8.1f} inst/s {rss:>6} MB  {status}",
                        file=sys.stderr,
                    )
    finally:
        plan.restarts[mode] = max(0, receiver.starts - 1)
        receiver.stop()
        shutil.rmtree(out_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# report


@dataclass
class Summary:
    mode: str
    corpus: str
    sender: str
    files: int
    ok_runs: int
    runs: int
    median_wall_s: float | None
    inst_per_s: float | None
    mb_per_s: float | None
    peak_rss_mb: float | None
    failures: list[str]


def summarise(runs: list[Run]) -> list[Summary]:
    """Medians over the runs that delivered every file; failed runs are listed, never timed."""
    keys = list(dict.fromkeys((r.mode, r.corpus, r.sender) for r in runs))
    out = []
    for mode, corpus, sender in keys:
        group = [r for r in runs if (r.mode, r.corpus, r.sender) == (mode, corpus, sender)]
        good = [r for r in group if r.ok]
        wall = statistics.median(r.wall_s for r in good) if good else None
        rss = [r.peak_rss_mb for r in good if r.peak_rss_mb is not None]
        out.append(
            Summary(
                mode=mode,
                corpus=corpus,
                sender=sender,
                files=group[0].files,
                ok_runs=len(good),
                runs=len(group),
                median_wall_s=wall,
                inst_per_s=group[0].files / wall if wall else None,
                mb_per_s=group[0].bytes / 1e6 / wall if wall else None,
                peak_rss_mb=max(rss) if rss else None,
                failures=[f"round {r.round}: {r.reason}" for r in group if not r.ok],
            )
        )
    return out


# (mode, corpus, competitor, minimum forwarder/competitor ratio in inst/s), from the issue
TARGETS: list[tuple[str, str, str, float]] = [
    ("tuned", "ct", "dcmsend", 0.5),
    ("tuned", "small", "dcmsend", 0.3),
    ("tuned", "ct", "pynetdicom storescu", 2.0),
    ("tuned", "small", "pynetdicom storescu", 2.0),
    ("stock", "ct", "dcmsend", 10.0),
    ("stock", "small", "dcmsend", 10.0),
]
RSS_LIMIT_MB = 150.0


def _fmt(value: float | None, digits: int = 1, missing: str = "FAILED") -> str:
    return missing if value is None else f"{value:,.{digits}f}"


def _targets(summaries: list[Summary], forwarders: list[str]) -> list[str]:
    lines = []
    by_key = {(s.mode, s.corpus, s.sender): s for s in summaries}
    for name in forwarders:
        for mode, corpus, rival, minimum in TARGETS:
            f, c = by_key.get((mode, corpus, name)), by_key.get((mode, corpus, rival))
            if f is None or c is None:
                continue
            if f.inst_per_s and c.inst_per_s:
                ratio = f.inst_per_s / c.inst_per_s
                verdict = "PASS" if ratio >= minimum and not f.failures else "FAIL"
                lost = f" ({len(f.failures)} failed runs)" if f.failures else ""
                lines.append(
                    f"- {verdict} {name} vs {rival}, {mode}/{corpus}: {ratio:.2f}x "
                    f"(target >= {minimum}x){lost}"
                )
            else:
                lines.append(f"- FAIL {name} vs {rival}, {mode}/{corpus}: no successful run")
        peaks = [s.peak_rss_mb for s in summaries if s.sender == name and s.peak_rss_mb]
        if peaks:
            verdict = "PASS" if max(peaks) < RSS_LIMIT_MB else "FAIL"
            lines.append(
                f"- {verdict} {name} peak RSS {max(peaks):.1f} MB (target < {RSS_LIMIT_MB:.0f} MB)"
            )
    return lines


def markdown(
    summaries: list[Summary], forwarders: list[str], forwarder_note: str, meta: dict[str, Any]
) -> str:
    lines = [
        f"# forwarder send benchmark, {meta['started']}",
        "",
        f"{meta['cpus']} CPUs, {meta['rounds']} rounds, median wall time of the successful runs; "
        f"receiver `{meta['receiver']}`; took {meta['duration_s']} s.",
        f"Other load on the machine just before the runs (all CPUs busy): "
        f"median {meta['background_busy_median']:.0%}, max {meta['background_busy_max']:.0%}; "
        f"storescp restarts: {meta['storescp_restarts'] or 'none'}.",
    ]
    if forwarder_note:
        lines += ["", f"forwarder send: pending ({forwarder_note})."]
    ratio_heads = [f"{name} ÷ this" for name in forwarders] or [f"{FORWARDER} ÷ this"]
    for mode in dict.fromkeys(s.mode for s in summaries):
        for corpus in dict.fromkeys(s.corpus for s in summaries if s.mode == mode):
            rows = [s for s in summaries if s.mode == mode and s.corpus == corpus]
            fwd = {s.sender: s for s in rows if s.sender in forwarders}
            head = ["sender", "inst/s", "MB/s", "median s", "peak RSS MB", "ok runs", *ratio_heads]
            lines += ["", f"## {mode} receiver, {corpus} ({rows[0].files} files)", ""]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for s in rows:
                cells = [
                    s.sender,
                    _fmt(s.inst_per_s),
                    _fmt(s.mb_per_s),
                    _fmt(s.median_wall_s, 2),
                    _fmt(s.peak_rss_mb, missing="n/a"),
                    f"{s.ok_runs}/{s.runs}",
                ]
                if not forwarders:
                    cells.append("pending")
                for name in forwarders:
                    f = fwd.get(name)
                    if s.sender in forwarders or f is None:
                        cells.append("")
                    elif f.inst_per_s and s.inst_per_s:
                        cells.append(f"{f.inst_per_s / s.inst_per_s:.2f}x")
                    else:
                        cells.append("n/a")
                lines.append("| " + " | ".join(cells) + " |")
            lines += ["", *(f"- {s.sender} FAILED {f}" for s in rows for f in s.failures)]
            if lines[-1] == "":
                lines.pop()
    if forwarders:
        lines += ["", "## Targets", "", *_targets(summaries, forwarders)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# command line


def version_of(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = proc.stdout.strip() or proc.stderr.strip()
    return text.splitlines()[0] if proc.returncode == 0 and text else "unavailable"


def parse_limits(text: str) -> dict[str, int]:
    """``200`` (every corpus) or ``ct=100,small=200``."""
    if text.isdigit() and int(text) > 0:
        return {name: int(text) for name in corpus_mod.SPECS}
    limits = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name not in corpus_mod.SPECS or not value.isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"bad --stock-limit item {part!r}")
        limits[name] = int(value)
    return limits


def parse_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = list(dict.fromkeys(t for t in text.split(",") if t))
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}")
        return items

    return parse


def _parser() -> argparse.ArgumentParser:
    keys = "; ".join(f"{k}: {what}" for k, (what, _) in SENDER_KEYS.items())
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per corpus (default 3)")
    parser.add_argument(
        "--corpus",
        type=parse_list(list(corpus_mod.SPECS)),
        default=list(corpus_mod.SPECS),
        help="comma list of ct,small (default both)",
    )
    parser.add_argument(
        "--mode",
        type=parse_list(MODES),
        default=list(MODES),
        help="comma list of tuned,stock (default both)",
    )
    parser.add_argument(
        "--stock-limit",
        type=parse_limits,
        default="ct=100,small=200",
        help="files sent per corpus to the stock receiver: N or ct=N,small=M "
        "(default ct=100,small=200)",
    )
    parser.add_argument(
        "--senders",
        type=parse_list(list(SENDER_KEYS)),
        default=[k for k, (_, default) in SENDER_KEYS.items() if default],
        help=f"comma list of sender keys (default: all but pynetdicom-nodelay). {keys}",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="per-run timeout, s")
    parser.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the untimed dcmsend run before each corpus (tuned mode only)",
    )
    parser.add_argument(
        "--venv",
        "--forwarder-venv",
        dest="venv",
        type=Path,
        default=REPO / ".venv",
        help="the venv whose forwarder and pynetdicom are measured (default: the repo's .venv)",
    )
    parser.add_argument("--corpus-dir", type=Path, default=BENCH_DIR / "corpus")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if not shutil.which("storescp"):
        print("error: storescp not found on PATH (apt-get install dcmtk)", file=sys.stderr)
        return 2
    if not Path("/dev/shm").is_dir():
        print("error: /dev/shm (tmpfs for the receiver) is missing", file=sys.stderr)
        return 2
    notes: list[str] = []
    if not Path(GNU_TIME).exists():
        notes.append(f"{GNU_TIME} missing (apt-get install time): peak RSS not measured")

    forwarder_note = ""
    forwarders: list[Sender] = []
    if {"forwarder", "forwarder-a2"} & set(args.senders):
        forwarders, forwarder_note = forwarder_senders(args.venv)
    competitors, missing = competitor_senders(args.venv)
    notes += missing
    senders = [s for s in forwarders + competitors if s.key in args.senders]
    if (
        "forwarder-a2" in args.senders
        and forwarders
        and not any(s.key == "forwarder-a2" for s in senders)
    ):
        notes.append("forwarder send has no --associations option: forwarder-a2 skipped")
    if forwarder_note:
        print(f"forwarder send: pending ({forwarder_note})", file=sys.stderr)
    for note in notes:
        print(note, file=sys.stderr)
    if not senders:
        print("error: none of the chosen senders is available", file=sys.stderr)
        return 2

    dirs = {
        name: corpus_mod.generate(corpus_mod.SPECS[name], args.corpus_dir) for name in args.corpus
    }
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.results.mkdir(parents=True, exist_ok=True)
    logs = args.results / f"send-{stamp}-logs"
    logs.mkdir()
    plan = Plan(
        rounds=args.rounds,
        corpora=args.corpus,
        modes=args.mode,
        stock_limit=args.stock_limit,
        timeout=args.timeout,
        warmup=args.warmup,
        senders=senders,
        logs=logs,
    )
    meta: dict[str, Any] = {
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "python": platform.python_version(),
        "rounds": plan.rounds,
        "pdu": PDU,
        "receiver": f"storescp --fork -pdu {PDU} +B -od <tmpfs>",
        "stock_limit": plan.stock_limit,
        "timeout_s": plan.timeout,
        "storescp": version_of(["storescp", "--version"]),
        "pynetdicom": version_of(
            [
                str(args.venv / "bin" / "python"),
                "-c",
                "import pynetdicom as p; print(p.__version__)",
            ]
        ),
        "git": version_of(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        # forwarder send runs from the work tree: say whether it differs from the commit
        "git_forwarder_changes": version_of(
            ["sh", "-c", f"git -C '{REPO}' status --porcelain -- forwarder | wc -l"]
        ),
        "forwarder_note": forwarder_note,
        "notes": notes,
        "commands": {s.name: " ".join(s.argv(0, Path("DIR"))) for s in senders},
        "sender_env": {s.name: s.env for s in senders if s.env},
    }
    runs: list[Run] = []
    started = time.monotonic()
    status = 0
    try:
        for mode in plan.modes:
            run_mode(plan, mode, dirs, runs)
    except KeyboardInterrupt:
        print("interrupted: reporting the runs so far", file=sys.stderr)
        status = 130
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = 2
    meta["duration_s"] = round(time.monotonic() - started, 1)
    meta["loadavg_end"] = os.getloadavg()
    meta["storescp_restarts"] = {m: n for m, n in plan.restarts.items() if n}
    busy = [r.background_busy for r in runs if r.background_busy == r.background_busy] or [0.0]
    meta["background_busy_median"] = statistics.median(busy)
    meta["background_busy_max"] = max(busy)
    summaries = summarise(runs)
    report = markdown(summaries, [s.name for s in senders if s.is_forwarder], forwarder_note, meta)
    raw = {
        "meta": meta,
        "summary": [asdict(s) for s in summaries],
        "runs": [asdict(r) | {"inst_per_s": r.inst_per_s} for r in runs],
    }
    (args.results / f"send-{stamp}.json").write_text(json.dumps(raw, indent=2) + "\n")
    (args.results / f"send-{stamp}.md").write_text(report)
    print(report)
    print(f"raw results: {args.results / f'send-{stamp}.json'}", file=sys.stderr)
    if status:
        return status
    return 0 if runs and all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
