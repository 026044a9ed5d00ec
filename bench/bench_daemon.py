"""Benchmark the ``forwarder run`` daemon: drop-to-ack throughput, trickle latency, a big backlog.

One DCMTK ``storescp`` per receiver mode (as in ``bench_send.py``: ``--fork -pdu 131072 +B``
into tmpfs) receives everything. Three phases, each preceded by a check that the machine is
quiet (no ``pytest`` running, little CPU in use):

1. **throughput**: per corpus, ``--rounds`` rounds; each round runs, in rotating order,
   ``forwarder send`` and ``dcmsend`` over the corpus (one-shot, as in ``bench_send.py``) and
   the daemon: once with the corpus files as they are (written earlier: their mtime is older
   than the settle time, so they are ready at once) and settle 1.0 (the default), and once per
   ``--settle`` value with files "just written" (each file's mtime set to now right before its
   rename, so the daemon must wait out the settle time). A daemon run: a fresh ``forwarder
   run`` (own config, outbox, inbox) is started and left idle; the corpus is hard-linked into a
   staging folder beside the inbox (same filesystem); the timer starts at the first ``rename``
   into the inbox (all files are renamed in one loop) and stops when the receiver's folder
   holds all N files (polled every 10 ms). Files just written are also reported without the
   settle delay; the inbox must be empty afterwards (every file acknowledged, committed and
   deleted).
2. **latency**: one daemon per corpus and settle value; ``--latency-files`` files are written
   one at a time as ``NAME.part`` into the inbox, closed, and renamed to ``NAME`` at
   ``--latency-rate`` files/s. Latency = the received file's mtime minus the rename time.
3. **backlog**: ``--backlog`` distinct small instances (copies of small-corpus files with new
   SOP Instance UIDs) are written into an inbox whose destination port is closed; the daemon
   is started and timed until the outbox holds them all as pending: start-up scan, enqueue rate,
   peak RSS (VmHWM), ``forwarder status`` time; then a storescp is started on that port and the
   drain of the first ``--drain`` instances is timed.

Usage: ``python bench/bench_daemon.py [--rounds N] [--corpus ct,small] [--mode tuned[,stock]]
[--phases throughput,latency,backlog] [--settle 1.0,0.2]``
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_send as bs
import corpus as corpus_mod
from pydicom import dcmread

PHASES = ("throughput", "latency", "backlog")
DAEMON = "forwarder run"
POLL_S = 0.01  # receiver poll while timing throughput
AE_DEST = "bench"
# Issue targets
THROUGHPUT_RATIO = 0.8  # daemon inst/s >= 0.8x forwarder send
LATENCY_MARGIN_S = 0.5  # p99 < settle + 0.5 s
RSS_LIMIT_MB = 150.0  # with the whole backlog queued


# --------------------------------------------------------------------------------------------
# machine state


def pytest_running() -> list[int]:
    """Pids whose command line mentions pytest (what ``pgrep -f pytest`` finds), from /proc."""
    me = os.getpid()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        with contextlib.suppress(OSError):
            if b"pytest" in Path(entry.path, "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


class Monitor(threading.Thread):
    """Looks for pytest every second for the whole benchmark: when it was last seen, and when.

    Someone's test suite on a 2-core machine halves every figure; a run that overlapped one
    is flagged in the report.
    """

    def __init__(self, interval: float = 1.0) -> None:
        super().__init__(name="pytest-monitor", daemon=True)
        self.interval = interval
        self.started = time.monotonic()
        self.last_seen: float | None = None
        self.sightings: list[float] = []  # monotonic times pytest was seen
        self.halt = threading.Event()

    def look(self) -> bool:
        seen = bool(pytest_running())
        if seen:
            now = time.monotonic()
            self.last_seen = now
            self.sightings.append(now)
        return seen

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            self.look()

    def seen_between(self, t0: float, t1: float) -> bool:
        return any(t0 - self.interval <= t <= t1 + self.interval for t in self.sightings)


@dataclass
class Quiet:
    """What `wait_quiet` saw before a timed run."""

    waited_s: float
    busy: float
    pytest_seen: bool
    gave_up: bool


def wait_quiet(
    monitor: Monitor,
    pytest_wait_s: float,
    gap_s: float,
    busy_wait_s: float,
    busy_limit: float = 0.3,
    label: str = "",
) -> Quiet:
    """Wait until pytest has not been seen for ``gap_s`` (at most ``pytest_wait_s``: a test
    suite is several pytest processes with short gaps), then, for at most ``busy_wait_s``, until
    under ``busy_limit`` of all CPUs is busy; then go on either way."""
    started = time.monotonic()
    seen = False
    announced = False
    busy_since: float | None = None
    while True:
        tests = monitor.look()
        seen = seen or tests
        now = time.monotonic()
        quiet_since = monitor.last_seen if monitor.last_seen is not None else monitor.started
        gap_ok = not tests and now - quiet_since >= gap_s
        busy = bs.background_busy(0.5) if gap_ok else float("nan")
        now = time.monotonic()
        if gap_ok and busy < busy_limit:
            return Quiet(round(now - started, 1), round(busy, 3), seen, False)
        if not gap_ok:
            busy_since = None
            late = now - started >= pytest_wait_s
        else:
            busy_since = busy_since if busy_since is not None else now
            late = now - busy_since >= busy_wait_s
        what = "pytest running" if tests else f"pytest gone {now - quiet_since:.0f} s"
        if late:
            print(
                f"  [{label}] machine still busy after {now - started:.0f} s "
                f"({what}, {busy:.0%} CPU): going on",
                file=sys.stderr,
            )
            return Quiet(round(now - started, 1), round(busy, 3), seen, True)
        if not announced:
            print(f"  [{label}] waiting for a quiet machine ({what})", file=sys.stderr)
            announced = True
        time.sleep(1.0 if not gap_ok else 0.5)


def proc_status_mb(pid: int, key: str) -> float | None:
    """``VmHWM``/``VmRSS`` of ``pid`` in MiB from /proc, None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def proc_cpu_ticks(pid: int) -> int | None:
    """utime + stime of ``pid`` in clock ticks."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        fields = text[text.rindex(")") + 2 :].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


def count_entries(directory: Path) -> int:
    """Entries in a flat folder (the receiver's): ``os.listdir`` is the cheapest poll."""
    try:
        return len(os.listdir(directory))
    except FileNotFoundError:
        return 0


INBOX_LOCK = ".forwarder.lock"
"""The daemon's lock file in each watched folder (one daemon per inbox): not a file to send."""


def count_files(top: Path) -> int:
    """Regular files anywhere under ``top``, but the daemon's inbox lock file."""
    n = 0
    for dirpath, _dirs, files in os.walk(top):
        n += len(files) - (dirpath == str(top) and INBOX_LOCK in files)
    return n


def wait_for(
    check: Callable[[], bool], timeout: float, interval: float = POLL_S
) -> tuple[bool, float]:
    """Poll ``check`` until true or ``timeout``; return (ok, perf_counter when it became true)."""
    deadline = time.perf_counter() + timeout
    while True:
        if check():
            return True, time.perf_counter()
        if time.perf_counter() >= deadline:
            return False, time.perf_counter()
        time.sleep(interval)


def quantile(values: Sequence[float], q: float) -> float:
    """Inclusive quantile (q in 0..1), linear between the order statistics."""
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# --------------------------------------------------------------------------------------------
# the daemon under test


def outbox_connect(path: Path) -> sqlite3.Connection:
    """A read-only connection to the daemon's outbox (WAL: never blocks the daemon)."""
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=5.0)
    conn.execute("PRAGMA query_only = ON")
    return conn


def outbox_states(conn: sqlite3.Connection) -> dict[int, int]:
    """state (0 pending, 1 in flight, 2 sent, 3 quarantined, 4 gone) -> rows."""
    rows = conn.execute("SELECT state, count(*) FROM deliveries GROUP BY state").fetchall()
    return {int(s): int(n) for s, n in rows}


def _toml_str(value: object) -> str:
    return json.dumps(str(value))  # a JSON string of plain text is a TOML basic string


class DaemonProc:
    """A ``forwarder run`` with its own config, inbox, outbox and quarantine under ``root``."""

    def __init__(
        self,
        exe: Path,
        root: Path,
        port: int,
        settle: float,
        env: dict[str, str],
        log: Path,
        *,
        retry: tuple[float, float] | None = None,
        associations: int | None = None,
    ) -> None:
        self.exe = exe
        self.root = root
        self.inbox = root / "inbox"
        self.outbox = root / "outbox" / "outbox.sqlite3"
        self.config = root / "forwarder.toml"
        self.port = port
        self.settle = settle
        # a FORWARDER_* variable in our environment would override the config file
        self.env = {k: v for k, v in env.items() if not k.startswith("FORWARDER_")}
        self.log = log
        self.retry = retry
        self.associations = associations  # None: the destination's default
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned_at = 0.0
        self.startup_s: float | None = None
        self.rc: int | None = None
        self.stop_s: float | None = None

    def write_config(self) -> None:
        lines = [
            "shutdown_timeout = 10",
            "[watch]",
            f"paths = [{_toml_str(self.inbox)}]",
            f"settle_seconds = {self.settle}",
            "[outbox]",
            f"path = {_toml_str(self.outbox)}",
            "[disposition]",
            'on_success = "delete"',
            "[quarantine]",
            f"dir = {_toml_str(self.root / 'quarantine')}",
            "[log]",
            'level = "warning"',
            'target = "stderr"',
        ]
        if self.retry is not None:
            lines += [
                "[retry]",
                f"initial_seconds = {self.retry[0]}",
                f"max_seconds = {self.retry[1]}",
            ]
        lines += [
            "[[destinations]]",
            f'name = "{AE_DEST}"',
            f'host = "{bs.HOST}"',
            f"port = {self.port}",
            f'called_aet = "{bs.AE_SCP}"',
            f"max_pdu = {bs.PDU}",
        ]
        if self.associations is not None:
            lines.append(f"associations = {self.associations}")
        self.config.write_text("\n".join(lines) + "\n")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 600.0) -> float:
        """Spawn it; return seconds until its first heartbeat (start-up scan done)."""
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.write_config()
        argv = [str(self.exe), "run", "--config", str(self.config), "--log-target", "stderr"]
        with self.log.open("ab") as out:
            out.write(f"--- start {' '.join(argv)}\n".encode())
            out.flush()
            self.spawned_at = time.perf_counter()
            self.proc = subprocess.Popen(
                argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        ok, when = wait_for(self._has_heartbeat, timeout, 0.01)
        if not ok:
            self.stop()
            raise bs.BenchError(f"forwarder run gave no heartbeat within {timeout:.0f} s")
        self.startup_s = when - self.spawned_at
        return self.startup_s

    def _has_heartbeat(self) -> bool:
        if not self.alive():
            assert self.proc is not None
            raise bs.BenchError(f"forwarder run exited with {self.proc.returncode}; see {self.log}")
        if not self.outbox.exists():
            return False
        try:
            with contextlib.closing(outbox_connect(self.outbox)) as conn:
                return bool(conn.execute("SELECT count(*) FROM heartbeat").fetchone()[0])
        except sqlite3.Error:
            return False

    def wait_idle(self, timeout: float = 15.0, window: float = 0.3) -> bool:
        """Wait until the daemon burns under one clock tick per ``window`` (its idle state)."""
        deadline = time.monotonic() + timeout
        last = proc_cpu_ticks(self.pid)
        while time.monotonic() < deadline:
            time.sleep(window)
            now = proc_cpu_ticks(self.pid)
            if now is None or last is None:
                return False
            if now - last <= 1:
                return True
            last = now
        return False

    def hwm_mb(self) -> float | None:
        return proc_status_mb(self.pid, "VmHWM") if self.alive() else None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait (bounded), then SIGKILL its group; return its exit status."""
        if self.proc is None:
            return self.rc
        started = time.perf_counter()
        with contextlib.suppress(OSError), self.log.open("a") as out:
            out.write(f"--- SIGTERM {dt.datetime.now().isoformat(timespec='milliseconds')}\n")
        bs.kill_group(self.proc.pid, signal.SIGTERM)
        try:
            self.rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            bs.kill_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.rc = None
        bs.kill_group(self.proc.pid, signal.SIGKILL)  # anything left in its group
        self.stop_s = round(time.perf_counter() - started, 3)
        self.proc = None
        return self.rc

    def log_lines(self) -> list[str]:
        """Everything the daemon logged (level warning: every line is a warning or an error);
        lines logged after the benchmark's SIGTERM are marked so."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        out = []
        stopping = False
        for ln in text.splitlines():
            if ln.startswith("--- "):
                stopping = ln.startswith("--- SIGTERM")
            elif ln.strip():
                out.append(ln + (" [after SIGTERM]" if stopping else ""))
        return out


def forwarder_exe(venv: Path) -> Path:
    exe = venv / "bin" / "forwarder"
    if exe.exists():
        return exe
    found = shutil.which("forwarder")
    if not found:
        raise bs.BenchError(f"{exe} not found")
    return Path(found)


# --------------------------------------------------------------------------------------------
# phase 1: throughput


@dataclass
class DaemonRun(bs.Run):
    """A daemon throughput run: ``wall_s`` is first rename -> receiver holds all N files."""

    settle_s: float = 0.0
    fresh: bool = False  # files "just written" (mtime = rename time): they wait out the settle
    rename_s: float = 0.0  # the rename loop
    inbox_empty_s: float | None = None  # first rename -> inbox empty (acked, committed, deleted)
    first_file_s: float | None = None  # first rename -> the receiver's first file
    startup_s: float | None = None  # spawn -> first heartbeat (before the timer)
    stop_s: float | None = None
    log_lines: list[str] = field(default_factory=list)

    @property
    def excl_settle_per_s(self) -> float:
        busy = self.wall_s - self.settle_s
        return self.files / busy if busy > 0 else 0.0


@dataclass(frozen=True)
class Variant:
    """How the daemon is run: its settle time, whether the files were just written, and the
    destination's ``associations`` (None: left to the daemon's default)."""

    settle: float
    fresh: bool
    associations: int | None = None

    @property
    def name(self) -> str:
        files = "files just written" if self.fresh else "files written earlier"
        assocs = "" if self.associations is None else f", {self.associations} associations"
        return f"{DAEMON}, {files}, settle {self.settle:g}{assocs}"


DEFAULT_SETTLE = 1.0  # watch.settle_seconds' default: the files-written-earlier runs use it


@dataclass
class Ctx:
    """Everything a phase needs."""

    plan: bs.Plan
    exe: Path
    work_root: Path
    link: bool  # hard links possible between the corpus and work_root
    quiet_timeout: float
    quiet_gap: float
    busy_wait: float
    monitor: Monitor
    quiet: list[dict[str, Any]] = field(default_factory=list)
    disturbed: list[str] = field(default_factory=list)  # runs that overlapped a pytest

    def check_quiet(self, label: str) -> float:
        q = wait_quiet(
            self.monitor, self.quiet_timeout, self.quiet_gap, self.busy_wait, label=label
        )
        self.quiet.append({"label": label, **asdict(q)})
        return q.busy

    def note_overlap(self, label: str, t0: float) -> None:
        """Flag the run that started at monotonic ``t0`` if pytest ran meanwhile."""
        if self.monitor.seen_between(t0, time.monotonic()):
            self.disturbed.append(label)
            print(f"  [{label}] NOTE: pytest ran during this run", file=sys.stderr)


def _stage(files: Sequence[tuple[Path, Path]], link: bool) -> None:
    for src, dst in files:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if link:
            os.link(src, dst)
        else:
            shutil.copyfile(src, dst)


def daemon_run(
    ctx: Ctx, receiver: bs.Receiver, work: bs.Workload, variant: Variant, rnd: int
) -> DaemonRun:
    """One daemon throughput run (see the module docstring)."""
    receiver.ensure_alive()
    if receiver.count():
        receiver.clean()
    settle, fresh = variant.settle, variant.fresh
    name = variant.name
    assocs = "" if variant.associations is None else f"-a{variant.associations}"
    log = ctx.plan.logs / (
        f"{work.mode}-{work.corpus}-r{rnd}-daemon-{'fresh' if fresh else 'old'}"
        f"-settle{settle:g}{assocs}.log"
    )
    root = Path(tempfile.mkdtemp(prefix="daemon-", dir=ctx.work_root))
    daemon = DaemonProc(
        ctx.exe, root, receiver.port, settle, work.env, log, associations=variant.associations
    )
    files = corpus_mod.dicom_files(work.directory)
    staging = root / "staging"
    moves = [
        (staging / f.relative_to(work.directory), daemon.inbox / f.relative_to(work.directory))
        for f in files
    ]
    reasons: list[str] = []
    wall = rename_s = 0.0
    inbox_empty: float | None = None
    first_s: float | None = None
    received = 0
    hwm: float | None = None
    try:
        _stage(list(zip(files, (s for s, _ in moves), strict=True)), ctx.link)
        for _, dst in moves:  # the series folders exist before the daemon starts
            dst.parent.mkdir(parents=True, exist_ok=True)
        daemon.start(timeout=60)
        daemon.wait_idle()
        busy = bs.background_busy()
        n = work.files
        out_dir = receiver.out_dir
        t0 = time.perf_counter()
        if fresh:  # as if each file had just been written: its mtime is the rename time
            for src, dst in moves:
                os.utime(src)
                os.rename(src, dst)
        else:
            for src, dst in moves:
                os.rename(src, dst)
        rename_s = time.perf_counter() - t0
        first: list[float] = []

        def arrived() -> bool:
            got = count_entries(out_dir)
            if got and not first:
                first.append(time.perf_counter())
            return got >= n or not daemon.alive()

        ok, t_all = wait_for(arrived, ctx.plan.timeout)
        wall = t_all - t0
        first_s = first[0] - t0 if first else None
        if not daemon.alive():
            reasons.append(f"daemon exited with {daemon.proc.returncode if daemon.proc else '?'}")
        elif not ok:
            reasons.append(f"timed out after {ctx.plan.timeout:.0f} s")
        ok_empty, t_empty = wait_for(lambda: count_files(daemon.inbox) == 0, 30.0, 0.02)
        inbox_empty = t_empty - t0 if ok_empty else None
        if not ok_empty:
            reasons.append(f"inbox still holds {count_files(daemon.inbox)} files after 30 s")
        hwm = daemon.hwm_mb()
        received = receiver.settled_count(n)
        if received != n:
            reasons.append(f"receiver got {received} of {n} files")
    except bs.BenchError as exc:
        reasons.append(str(exc))
        busy = float("nan")
    finally:
        rc = daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
        receiver.clean()
    if rc != 0:
        reasons.append(f"daemon exit status {rc} at SIGTERM")
    lines = daemon.log_lines()
    return DaemonRun(
        mode=work.mode,
        corpus=work.corpus,
        round=rnd,
        sender=name,
        files=work.files,
        bytes=work.bytes,
        ok=not reasons,
        wall_s=wall,
        rc=rc,
        peak_rss_mb=hwm,
        received=received,
        background_busy=round(busy, 3),
        reason="; ".join(reasons),
        output_tail="\n".join(lines[-40:]) if reasons else "",
        settle_s=settle,
        fresh=fresh,
        rename_s=round(rename_s, 4),
        inbox_empty_s=None if inbox_empty is None else round(inbox_empty, 4),
        first_file_s=None if first_s is None else round(first_s, 4),
        startup_s=None if daemon.startup_s is None else round(daemon.startup_s, 3),
        stop_s=daemon.stop_s,
        log_lines=lines[:200],
    )


def send_log_problems(log: Path) -> list[str]:
    """Warning and error lines in a one-shot sender's log (``W:``/``E:`` and Python-style)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    marks = ("W: ", "E: ", "F: ", "WARNING", "ERROR", "Traceback")
    return [ln for ln in text.splitlines() if ln.startswith(marks)][:200]


def throughput_phase(
    ctx: Ctx,
    receiver: bs.Receiver,
    mode: str,
    dirs: dict[str, Path],
    settles: Sequence[float],
    runs: list[bs.Run],
    problems: list[dict[str, Any]],
) -> None:
    plan = ctx.plan
    variants = [Variant(DEFAULT_SETTLE, False), *(Variant(s, True) for s in settles)]
    for corpus in plan.corpora:
        directory = dirs[corpus]
        if mode == "stock" and corpus in plan.stock_limit:
            directory = corpus_mod.subset(directory, plan.stock_limit[corpus])
        paths = corpus_mod.dicom_files(directory)
        bs.warm_page_cache(paths)
        work = bs.Workload(
            mode,
            corpus,
            directory,
            len(paths),
            sum(p.stat().st_size for p in paths),
            bs.mode_env(mode),
        )
        ctx.check_quiet(f"{mode}/{corpus} throughput")
        if plan.warmup and mode == "tuned":
            warm = next((s for s in plan.senders if s.key == "dcmsend"), plan.senders[0])
            r = bs.one_run(plan, receiver, warm, work, 0)
            print(
                f"  [{mode}/{corpus}] warm-up {warm.name}: {r.wall_s:.2f} s "
                f"{'ok' if r.ok else 'FAILED (' + r.reason + ')'}",
                file=sys.stderr,
            )
        entries: list[bs.Sender | Variant] = [*plan.senders, *variants]
        for rnd in range(1, plan.rounds + 1):
            shift = (rnd - 1) % len(entries)
            for entry in entries[shift:] + entries[:shift]:
                ctx.check_quiet(f"{mode}/{corpus} round {rnd}")
                t_run = time.monotonic()
                if isinstance(entry, Variant):
                    r = daemon_run(ctx, receiver, work, entry, rnd)
                    extra = (
                        f" excl. settle {r.excl_settle_per_s:7.1f}/s" if r.fresh else ""
                    ) + f" empty {r.inbox_empty_s or float('nan'):.2f} s"
                    found = r.log_lines
                else:
                    r = bs.one_run(plan, receiver, entry, work, rnd)
                    label = entry.name.replace(" ", "_").replace("+", "")
                    found = send_log_problems(plan.logs / f"{mode}-{corpus}-r{rnd}-{label}.log")
                    extra = ""
                runs.append(r)
                ctx.note_overlap(f"{mode}/{corpus} round {rnd} {r.sender}", t_run)
                if found:
                    problems.append(
                        {"mode": mode, "corpus": corpus, "round": rnd, "run": r.sender}
                        | {"ok": r.ok, "lines": found}
                    )
                rss = "n/a" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.1f}"
                status = "ok" if r.ok else f"FAILED ({r.reason})"
                print(
                    f"  [{mode}/{corpus} round {rnd}] {r.sender:<28} {r.wall_s:7.2f} s "
                    f"{r.inst_per_s:8.1f} inst/s{extra} {rss:>6} MB  {status}",
                    file=sys.stderr,
                )


# --------------------------------------------------------------------------------------------
# phase 2: latency at a trickle


@dataclass
class Latency:
    mode: str
    corpus: str
    settle_s: float
    files: int
    rate_per_s: float
    received: int
    ok: bool
    reason: str
    p50_s: float | None
    p90_s: float | None
    p99_s: float | None
    max_s: float | None
    min_s: float | None
    poll_p50_s: float | None  # the same from the time the poller first saw the file
    poll_p99_s: float | None
    latencies_s: list[float]
    background_busy: float
    log_lines: list[str]


def _seen_poller(
    directory: Path, seen: dict[str, float], stop: threading.Event, interval: float = 0.005
) -> None:
    while not stop.is_set():
        now = time.time()
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(directory):
                if name not in seen:
                    seen[name] = now
        stop.wait(interval)


def latency_run(
    ctx: Ctx,
    receiver: bs.Receiver,
    mode: str,
    corpus: str,
    sources: Sequence[tuple[str, bytes, str]],  # (file name, bytes, SOP Instance UID)
    settle: float,
    rate: float,
) -> Latency:
    receiver.ensure_alive()
    if receiver.count():
        receiver.clean()
    log = ctx.plan.logs / f"{mode}-latency-{corpus}-settle{settle:g}.log"
    root = Path(tempfile.mkdtemp(prefix="latency-", dir=ctx.work_root))
    env = bs.mode_env(mode)
    daemon = DaemonProc(ctx.exe, root, receiver.port, settle, env, log)
    renamed: dict[str, float] = {}  # uid -> wall-clock time of the rename
    seen: dict[str, float] = {}
    stop = threading.Event()
    poller = threading.Thread(target=_seen_poller, args=(receiver.out_dir, seen, stop), daemon=True)
    reasons: list[str] = []
    received = 0
    try:
        daemon.start(timeout=60)
        daemon.wait_idle()
        label = f"{mode}/{corpus} latency settle {settle:g}"
        busy = ctx.check_quiet(label)
        t_run = time.monotonic()
        poller.start()
        t0 = time.perf_counter()
        for i, (name, data, uid) in enumerate(sources):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            part = daemon.inbox / f"{name}.part"
            with part.open("wb") as f:
                f.write(data)
            os.rename(part, daemon.inbox / name)
            renamed[uid] = time.time()
        n = len(sources)
        ok, _ = wait_for(lambda: count_entries(receiver.out_dir) >= n, settle + 60.0, 0.02)
        if not ok:
            reasons.append("timed out waiting for the receiver")
        wait_for(lambda: count_files(daemon.inbox) == 0, 10.0, 0.05)
        ctx.note_overlap(label, t_run)
    except bs.BenchError as exc:
        reasons.append(str(exc))
        busy = float("nan")
    finally:
        stop.set()
        if poller.is_alive():
            poller.join(5)
        rc = daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
    if rc != 0:
        reasons.append(f"daemon exit status {rc} at SIGTERM")
    lat: list[float] = []
    polled: list[float] = []
    for entry in os.scandir(receiver.out_dir):
        uid = entry.name.split(".", 1)[1] if "." in entry.name else entry.name
        if uid in renamed:
            received += 1
            lat.append(entry.stat().st_mtime - renamed[uid])
            if entry.name in seen:
                polled.append(seen[entry.name] - renamed[uid])
    receiver.clean()
    if received != len(sources):
        reasons.append(f"receiver got {received} of {len(sources)} files")

    def q(values: list[float], p: float) -> float | None:
        return round(quantile(values, p), 4) if values else None

    return Latency(
        mode=mode,
        corpus=corpus,
        settle_s=settle,
        files=len(sources),
        rate_per_s=rate,
        received=received,
        ok=not reasons,
        reason="; ".join(reasons),
        p50_s=q(lat, 0.5),
        p90_s=q(lat, 0.9),
        p99_s=q(lat, 0.99),
        max_s=round(max(lat), 4) if lat else None,
        min_s=round(min(lat), 4) if lat else None,
        poll_p50_s=q(polled, 0.5),
        poll_p99_s=q(polled, 0.99),
        latencies_s=[round(x, 4) for x in sorted(lat)],
        background_busy=round(busy, 3),
        log_lines=daemon.log_lines()[:200],
    )


def latency_phase(
    ctx: Ctx,
    receiver: bs.Receiver,
    mode: str,
    dirs: dict[str, Path],
    settles: Sequence[float],
    count: int,
    rate: float,
) -> list[Latency]:
    out: list[Latency] = []
    for corpus in ctx.plan.corpora:
        files = corpus_mod.dicom_files(dirs[corpus])[:count]
        sources = [
            (f.name, f.read_bytes(), str(dcmread(f, stop_before_pixels=True).SOPInstanceUID))
            for f in files
        ]
        for settle in settles:
            r = latency_run(ctx, receiver, mode, corpus, sources, settle, rate)
            out.append(r)
            status = "ok" if r.ok else f"FAILED ({r.reason})"
            print(
                f"  [{mode}/{corpus} latency settle {settle:g}] {r.received}/{r.files} "
                f"p50 {r.p50_s} s p99 {r.p99_s} s max {r.max_s} s  {status}",
                file=sys.stderr,
            )
    return out


# --------------------------------------------------------------------------------------------
# phase 3: backlog


def write_backlog(inbox: Path, templates: Sequence[Path], count: int) -> tuple[int, float]:
    """Write ``count`` distinct instances into ``inbox/sNNN/IMnnnnnn.dcm``; (bytes, seconds).

    Each is a template's bytes with its SOP Instance UID (file meta and dataset alike) replaced
    by one of the same length: the last 6 digits become the file's number, so every file is a
    distinct instance and the element lengths stay valid.
    """
    started = time.perf_counter()
    prepared: list[tuple[bytes, bytes, int]] = []
    for path in templates:
        data = path.read_bytes()
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID).encode()
        if data.count(uid) != 2 or len(uid) < 12:
            raise bs.BenchError(f"{path}: SOP Instance UID not found exactly twice")
        prepared.append((data, uid, len(uid)))
    uids: set[bytes] = set()
    total = 0
    for i in range(count):
        data, uid, n = prepared[i % len(prepared)]
        new = uid[: n - 6] + b"%06d" % i
        uids.add(new)
        folder = inbox / f"s{i // 1000:03d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        body = data.replace(uid, new)
        with open(folder / f"IM{i:06d}.dcm", "wb") as f:
            f.write(body)
        total += len(body)
    if len(uids) != count:
        raise bs.BenchError(f"backlog UIDs not distinct: {len(uids)} of {count}")
    return total, time.perf_counter() - started


def _timed(argv: list[str], env: dict[str, str], runs: int = 3) -> tuple[float, int, str]:
    """Median wall time of ``argv`` over ``runs``; (s, last rc, last output head)."""
    walls = []
    rc = 0
    head = ""
    for _ in range(runs):
        t = time.perf_counter()
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        walls.append(time.perf_counter() - t)
        rc = proc.returncode
        head = (proc.stdout or proc.stderr)[:2000]
    return statistics.median(walls), rc, head


def backlog_phase(ctx: Ctx, mode: str, small_dir: Path, count: int, drain: int) -> dict[str, Any]:
    """Start-up scan, enqueue, memory and ``forwarder status`` with ``count`` queued; a drain."""
    env = bs.mode_env(mode)
    logs = ctx.plan.logs
    result: dict[str, Any] = {"mode": mode, "files": count, "drain_target": drain}
    # baseline: the same daemon start with an empty inbox (Python start-up, imports, outbox)
    base_root = Path(tempfile.mkdtemp(prefix="empty-", dir=ctx.work_root))
    base = DaemonProc(ctx.exe, base_root, bs.free_port(), 1.0, env, logs / "backlog-empty.log")
    try:
        ctx.check_quiet(f"{mode} backlog baseline")
        starts = []
        for _ in range(3):
            starts.append(base.start(timeout=60))
            base.stop()
            shutil.rmtree(base.root / "outbox", ignore_errors=True)
        result["empty_startup_s"] = round(statistics.median(starts), 3)
        result["empty_startup_runs_s"] = [round(s, 3) for s in starts]
    finally:
        base.stop()
        shutil.rmtree(base_root, ignore_errors=True)

    root = Path(tempfile.mkdtemp(prefix="backlog-", dir=ctx.work_root))
    dead_port = bs.free_port()
    daemon = DaemonProc(
        ctx.exe, root, dead_port, 1.0, env, logs / "backlog-daemon.log", retry=(1.0, 5.0)
    )
    out_dir = Path(tempfile.mkdtemp(prefix="bench-daemon-drain-", dir="/dev/shm"))
    drain_rx = bs.Receiver(mode, env, out_dir, logs / "storescp-drain.log")
    try:
        templates = corpus_mod.dicom_files(small_dir)[:200]
        size, secs = write_backlog(daemon.inbox, templates, count)
        result["write_s"] = round(secs, 1)
        result["bytes"] = size
        print(
            f"  [{mode} backlog] wrote {count} files ({size / 1e6:.0f} MB) in {secs:.1f} s",
            file=sys.stderr,
        )
        os.sync()
        result["quiet_busy"] = ctx.check_quiet(f"{mode} backlog")
        t_run = time.monotonic()
        startup = daemon.start(timeout=900)
        result["startup_s"] = round(startup, 3)
        result["scan_s_est"] = round(startup - result["empty_startup_s"], 3)
        t_hb = daemon.spawned_at + startup
        conn = outbox_connect(daemon.outbox)
        samples: list[tuple[float, int, float | None]] = []
        t_first: float | None = None
        deadline = time.perf_counter() + 1800
        queued = 0
        while time.perf_counter() < deadline and daemon.alive():
            states = outbox_states(conn)
            queued = states.get(0, 0) + states.get(1, 0)
            now = time.perf_counter()
            samples.append((round(now - t_hb, 2), queued, proc_status_mb(daemon.pid, "VmRSS")))
            if queued and t_first is None:
                t_first = now
            if queued >= count:
                break
            time.sleep(0.25)
        t_all = time.perf_counter()
        result["queued"] = queued
        result["all_queued"] = queued >= count
        result["heartbeat_to_all_queued_s"] = round(t_all - t_hb, 2)
        result["spawn_to_all_queued_s"] = round(t_all - daemon.spawned_at, 2)
        if t_first is not None:
            result["heartbeat_to_first_row_s"] = round(t_first - t_hb, 2)
            span = t_all - t_first
            result["enqueue_rate_per_s"] = round(count / span, 1) if span > 0 else None
        result["enqueue_rate_incl_settle_per_s"] = round(count / (t_all - t_hb), 1)
        result["rss_samples"] = samples
        # settle: a few seconds with the whole backlog queued (workers retrying a closed port)
        time.sleep(3.0)
        result["hwm_queued_mb"] = daemon.hwm_mb()
        result["rss_queued_mb"] = proc_status_mb(daemon.pid, "VmRSS")
        result["outbox_mb"] = round(
            sum(p.stat().st_size for p in daemon.outbox.parent.iterdir()) / 1e6, 1
        )
        fwd = str(ctx.exe)
        cfg = str(daemon.config)
        wall, rc, head = _timed([fwd, "status", "--config", cfg], env)
        result["status_s"] = round(wall, 3)
        result["status_rc"] = rc
        result["status_output"] = head
        wall, rc, head = _timed([fwd, "status", "--config", cfg, "--json"], env)
        result["status_json_s"] = round(wall, 3)
        result["status_json_rc"] = rc
        result["hwm_after_status_mb"] = daemon.hwm_mb()
        ctx.note_overlap(f"{mode} backlog enqueue", t_run)
        t = time.perf_counter()
        states = outbox_states(conn)
        result["count_query_s"] = round(time.perf_counter() - t, 4)
        result["states_before_drain"] = states
        print(
            f"  [{mode} backlog] start-up {startup:.2f} s (empty inbox "
            f"{result['empty_startup_s']:.2f} s), all {queued} queued "
            f"{result['heartbeat_to_all_queued_s']} s after, "
            f"{result.get('enqueue_rate_per_s')} rows/s, VmHWM {result['hwm_queued_mb']:.1f} MB, "
            f"status {result['status_s']:.2f} s",
            file=sys.stderr,
        )
        if drain > 0:
            result["drain_quiet_busy"] = ctx.check_quiet(f"{mode} backlog drain")
            t_run = time.monotonic()
            drain_rx.start(port=dead_port)
            t_rx = time.perf_counter()
            ok1, t1 = wait_for(lambda: count_entries(out_dir) >= 1, 60.0, 0.01)
            okn, tn = wait_for(lambda: count_entries(out_dir) >= drain, 600.0, 0.05)
            got = count_entries(out_dir)
            result["drain_first_file_after_rx_start_s"] = round(t1 - t_rx, 2) if ok1 else None
            result["drain_ok"] = ok1 and okn
            result["drain_received"] = got
            if ok1 and okn and tn > t1:
                result["drain_s"] = round(tn - t1, 2)
                result["drain_rate_per_s"] = round((got - 1) / (tn - t1), 1)
            result["hwm_drain_mb"] = daemon.hwm_mb()
            ctx.note_overlap(f"{mode} backlog drain", t_run)
            print(
                f"  [{mode} backlog] drain: {got} files, {result.get('drain_rate_per_s')} inst/s",
                file=sys.stderr,
            )
        conn.close()
    finally:
        result["stop_rc"] = daemon.stop()
        result["stop_s"] = daemon.stop_s
        drain_rx.stop()
        shutil.rmtree(out_dir, ignore_errors=True)
        with (
            contextlib.suppress(sqlite3.Error, OSError),
            contextlib.closing(outbox_connect(daemon.outbox)) as c,
        ):
            result["states_after"] = outbox_states(c)
        result["log_lines"] = daemon.log_lines()[:200]
        t = time.perf_counter()
        shutil.rmtree(root, ignore_errors=True)
        result["cleanup_s"] = round(time.perf_counter() - t, 1)
    return result


# --------------------------------------------------------------------------------------------
# report


def _f(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


@dataclass
class Row:
    mode: str
    corpus: str
    name: str
    files: int
    ok_runs: int
    runs: int
    median_s: float | None
    inst_per_s: float | None
    mb_per_s: float | None
    excl_settle_per_s: float | None
    inbox_empty_s: float | None
    first_file_s: float | None
    after_first_per_s: float | None  # (N - 1) / (last file - first file): the sending itself
    peak_rss_mb: float | None
    failures: list[str]


def rows_of(runs: list[bs.Run]) -> list[Row]:
    out = []
    for s in bs.summarise(runs):
        group = [r for r in runs if (r.mode, r.corpus, r.sender) == (s.mode, s.corpus, s.sender)]
        good = [r for r in group if r.ok and isinstance(r, DaemonRun)]
        excl = empty = first = after = None
        if good:
            firsts = [r.first_file_s for r in good if r.first_file_s is not None]
            first = statistics.median(firsts) if firsts else None
            spans = [r.wall_s - r.first_file_s for r in good if r.first_file_s is not None]
            span = statistics.median(spans) if spans else 0.0
            after = (s.files - 1) / span if span > 0 else None
            if all(r.fresh for r in good):  # files written earlier do not wait the settle
                med = statistics.median(r.wall_s - r.settle_s for r in good)
                excl = s.files / med if med > 0 else None
            empties = [r.inbox_empty_s for r in good if r.inbox_empty_s is not None]
            empty = statistics.median(empties) if empties else None
        out.append(
            Row(
                s.mode,
                s.corpus,
                s.sender,
                s.files,
                s.ok_runs,
                s.runs,
                s.median_wall_s,
                s.inst_per_s,
                s.mb_per_s,
                excl,
                empty,
                first,
                after,
                s.peak_rss_mb,
                s.failures,
            )
        )
    return out


def markdown(
    rows: list[Row],
    lat: list[Latency],
    backlog: list[dict[str, Any]],
    problems: list[dict[str, Any]],
    meta: dict[str, Any],
) -> str:
    lines = [
        f"# forwarder run (daemon) benchmark, {meta['started']}",
        "",
        f"{meta['cpus']} CPUs, commit {meta['git']} (forwarder/ changes in the work tree: "
        f"{meta['git_forwarder_changes']}), {meta['rounds']} rounds; receiver "
        f"`{meta['receiver']}`; took {meta['duration_s']} s.",
        f"Quiet checks: waited {meta['quiet_waited_s']} s in all, pytest seen: "
        f"{meta['pytest_seen']}; CPU busy just before the runs: median "
        f"{meta['busy_median']:.0%}, max {meta['busy_max']:.0%}.",
        "Runs during which a pytest ran (figures disturbed): "
        + (", ".join(meta["disturbed_by_pytest"]) or "none")
        + ".",
    ]
    targets: list[str] = []
    for mode in dict.fromkeys(r.mode for r in rows):
        for corpus in dict.fromkeys(r.corpus for r in rows if r.mode == mode):
            group = [r for r in rows if r.mode == mode and r.corpus == corpus]
            ref = next((r for r in group if r.name == bs.FORWARDER), None)
            lines += [
                "",
                f"## Throughput, {mode} receiver, {corpus} ({group[0].files} files)",
                "",
                "| run | inst/s | MB/s | median s | ÷ forwarder send | inst/s excl. settle | "
                "÷ forwarder send excl. settle | first file s | inst/s after the first file | "
                "inbox empty s | peak RSS MB | ok runs |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in group:
                ratio = ratio_x = ""
                if ref and ref.inst_per_s and r.inst_per_s and r is not ref:
                    ratio = f"{r.inst_per_s / ref.inst_per_s:.2f}x"
                    if r.excl_settle_per_s:
                        ratio_x = f"{r.excl_settle_per_s / ref.inst_per_s:.2f}x"
                lines.append(
                    f"| {r.name} | {_f(r.inst_per_s)} | {_f(r.mb_per_s)} | {_f(r.median_s, 2)} "
                    f"| {ratio} | {_f(r.excl_settle_per_s) if r.name.startswith(DAEMON) else ''} "
                    f"| {ratio_x} | {_f(r.first_file_s, 2) if r.first_file_s else ''} "
                    f"| {_f(r.after_first_per_s) if r.after_first_per_s else ''} "
                    f"| {_f(r.inbox_empty_s, 2) if r.inbox_empty_s else ''} "
                    f"| {_f(r.peak_rss_mb)} | {r.ok_runs}/{r.runs} |"
                )
                if r.name.startswith(DAEMON) and ref and ref.inst_per_s:
                    # Judged: drop-to-ack of files written earlier, and the sending of files
                    # just written once their settle time is over. Files just written, drop to
                    # ack, are bounded by the settle time itself (1,000 files a forwarder
                    # send takes 1 s for, plus a 1 s settle: 0.5x at best): shown, not judged.
                    fresh = "just written" in r.name
                    checks = (
                        (
                            ("excl. settle", r.excl_settle_per_s, True),
                            ("incl. settle", r.inst_per_s, False),
                        )
                        if fresh
                        else (("drop to ack", r.inst_per_s, True),)
                    )
                    for label, value, judged in checks:
                        if not value:
                            targets.append(f"- FAIL {mode}/{corpus} {r.name}: no successful run")
                            continue
                        x = value / ref.inst_per_s
                        ok = x >= THROUGHPUT_RATIO and not r.failures
                        verdict = ("PASS" if ok else "FAIL") if judged else "INFO"
                        targets.append(
                            f"- {verdict} throughput {mode}/{corpus} {r.name} "
                            f"({label}): {x:.2f}x forwarder send (target >= "
                            f"{THROUGHPUT_RATIO}x){' with failed runs' if r.failures else ''}"
                        )
            lines += [f"- {r.name} FAILED {f}" for r in group for f in r.failures]
    if lat:
        lines += [
            "",
            "## Latency at a trickle (rename into the inbox -> received file's mtime)",
            "",
            "| mode | corpus | settle s | files | rate/s | p50 s | p90 s | p99 s | max s | "
            "p99 − settle s | ok |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for lr in lat:
            over = None if lr.p99_s is None else lr.p99_s - lr.settle_s
            lines.append(
                f"| {lr.mode} | {lr.corpus} | {lr.settle_s:g} | {lr.received}/{lr.files} | "
                f"{lr.rate_per_s:g} | {_f(lr.p50_s, 3)} | {_f(lr.p90_s, 3)} | {_f(lr.p99_s, 3)} | "
                f"{_f(lr.max_s, 3)} | {_f(over, 3)} | {'yes' if lr.ok else 'NO: ' + lr.reason} |"
            )
            if lr.p99_s is not None:
                ok = lr.p99_s < lr.settle_s + LATENCY_MARGIN_S and lr.ok
                targets.append(
                    f"- {'PASS' if ok else 'FAIL'} latency {lr.mode}/{lr.corpus} settle "
                    f"{lr.settle_s:g}: p99 {lr.p99_s:.3f} s (target < {lr.settle_s + 0.5:.1f} s)"
                )
    for b in backlog:
        lines += [
            "",
            f"## Backlog, {b['files']:,} instances queued for a closed port ({b['mode']})",
            "",
            "| measure | value |",
            "|---|---|",
            f"| writing the files (not the daemon) | {b.get('write_s')} s, "
            f"{b.get('bytes', 0) / 1e6:,.0f} MB |",
            f"| daemon start-up to first heartbeat, empty inbox (median of 3) | "
            f"{b.get('empty_startup_s')} s |",
            f"| daemon start-up to first heartbeat, {b['files']:,} files (scan included) | "
            f"{b.get('startup_s')} s |",
            f"| start-up scan (difference) | {b.get('scan_s_est')} s |",
            f"| heartbeat -> first outbox row | {b.get('heartbeat_to_first_row_s')} s |",
            f"| heartbeat -> all queued | {b.get('heartbeat_to_all_queued_s')} s |",
            f"| spawn -> all queued | {b.get('spawn_to_all_queued_s')} s |",
            f"| enqueue rate (first row -> all) | {_f(b.get('enqueue_rate_per_s'))} files/s |",
            f"| peak RSS (VmHWM) with all queued | {_f(b.get('hwm_queued_mb'))} MB |",
            f"| RSS with all queued | {_f(b.get('rss_queued_mb'))} MB |",
            f"| outbox size (db + wal + shm) | {b.get('outbox_mb')} MB |",
            f"| `forwarder status` (median of 3) | {b.get('status_s')} s |",
            f"| `forwarder status --json` (median of 3) | {b.get('status_json_s')} s |",
            f"| VmHWM after the status calls | {_f(b.get('hwm_after_status_mb'))} MB |",
        ]
        if "drain_rate_per_s" in b or "drain_ok" in b:
            lines += [
                f"| drain: first file after the receiver started | "
                f"{b.get('drain_first_file_after_rx_start_s')} s |",
                f"| drain rate, first {b['drain_target']:,} | "
                f"{_f(b.get('drain_rate_per_s'))} inst/s |",
                f"| VmHWM after the drain | {_f(b.get('hwm_drain_mb'))} MB |",
            ]
        lines.append(f"| SIGTERM -> exit | {b.get('stop_s')} s (rc {b.get('stop_rc')}) |")
        hwm = max(
            (v for v in (b.get("hwm_queued_mb"), b.get("hwm_after_status_mb")) if v), default=None
        )
        if hwm is not None:
            ok = hwm < RSS_LIMIT_MB and bool(b.get("all_queued"))
            targets.append(
                f"- {'PASS' if ok else 'FAIL'} RSS with {b['files']:,} queued: {hwm:.1f} MB "
                f"(target < {RSS_LIMIT_MB:.0f} MB)"
            )
    lines += ["", "## Targets", "", *targets]
    lines += ["", "## Warnings, errors and stalls in the logs", ""]
    if not problems:
        lines.append("None: no sender or daemon logged a warning or an error.")
    for p in problems:
        where = " ".join(f"{k}={p[k]}" for k in ("mode", "corpus", "round", "run") if k in p)
        lines.append(f"- {where} ({'run ok' if p.get('ok') else 'run FAILED'}):")
        lines += [f"    {ln}" for ln in p["lines"][:12]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# command line


def _parse_floats(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("give non-negative numbers, e.g. 1.0,0.2")
    return values


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="throughput rounds per corpus (3)")
    p.add_argument(
        "--corpus",
        type=bs.parse_list(list(corpus_mod.SPECS)),
        default=list(corpus_mod.SPECS),
        help="comma list of ct,small (default both)",
    )
    p.add_argument(
        "--mode",
        type=bs.parse_list(bs.MODES),
        default=["tuned"],
        help="comma list of tuned,stock (default tuned); latency and backlog run in the first",
    )
    p.add_argument(
        "--stock-limit",
        type=bs.parse_limits,
        default="ct=100,small=200",
        help="files per corpus against the stock receiver (default ct=100,small=200)",
    )
    p.add_argument(
        "--phases",
        type=bs.parse_list(PHASES),
        default=list(PHASES),
        help="comma list of throughput,latency,backlog (default all)",
    )
    p.add_argument(
        "--settle",
        type=_parse_floats,
        default=[1.0, 0.2],
        help="settle_seconds of the files-just-written runs and the latency runs (1.0,0.2)",
    )
    p.add_argument("--latency-files", type=int, default=100, help="files per latency run (100)")
    p.add_argument("--latency-rate", type=float, default=5.0, help="files/s (5)")
    p.add_argument("--backlog", type=int, default=100_000, help="backlog instances (100000)")
    p.add_argument("--drain", type=int, default=10_000, help="instances drained (10000; 0: none)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-run timeout, s")
    p.add_argument(
        "--quiet-timeout",
        type=float,
        default=1200.0,
        help="longest wait for a running pytest to finish before a timed run, s (1200)",
    )
    p.add_argument(
        "--quiet-gap",
        type=float,
        default=30.0,
        help="pytest must have been gone this long before a timed run, s (30)",
    )
    p.add_argument(
        "--busy-wait",
        type=float,
        default=60.0,
        help="then the longest wait for CPU use under 30%% before a timed run, s (60)",
    )
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--venv", type=Path, default=bs.REPO / ".venv")
    p.add_argument("--corpus-dir", type=Path, default=bs.BENCH_DIR / "corpus")
    p.add_argument("--results", type=Path, default=bs.BENCH_DIR / "results")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where inboxes and outboxes go (a disk, like a real spool; default $TMPDIR)",
    )
    return p


def _same_fs(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


@contextlib.contextmanager
def _work_root(parent: Path) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="bench-daemon-", dir=parent))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.latency_files < 1 or args.latency_rate <= 0 or args.backlog < 1:
        parser.error("--rounds, --latency-files, --latency-rate and --backlog must be positive")
    if not shutil.which("storescp") or not Path("/dev/shm").is_dir():
        print("error: needs storescp on PATH and /dev/shm", file=sys.stderr)
        return 2
    try:
        exe = forwarder_exe(args.venv)
    except bs.BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    fwd, note = bs.forwarder_senders(args.venv)
    competitors, missing = bs.competitor_senders(args.venv)
    senders = [s for s in fwd + competitors if s.key in ("forwarder", "dcmsend")]
    if note or len(senders) != 2:
        print(f"error: forwarder send or dcmsend unavailable: {note} {missing}", file=sys.stderr)
        return 2
    names = sorted(set(args.corpus) | ({"small"} if "backlog" in args.phases else set()))
    dirs = {n: corpus_mod.generate(corpus_mod.SPECS[n], args.corpus_dir) for n in names}
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.results.mkdir(parents=True, exist_ok=True)
    logs = args.results / f"daemon-{stamp}-logs"
    logs.mkdir()
    plan = bs.Plan(
        rounds=args.rounds,
        corpora=args.corpus,
        modes=args.mode,
        stock_limit=args.stock_limit,
        timeout=args.timeout,
        warmup=args.warmup,
        senders=senders,
        logs=logs,
    )
    git = ["git", "-C", str(bs.REPO)]
    meta: dict[str, Any] = {
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "rounds": args.rounds,
        "settle": args.settle,
        "phases": args.phases,
        "receiver": f"storescp --fork -pdu {bs.PDU} +B -od <tmpfs>",
        "storescp": bs.version_of(["storescp", "--version"]),
        "git": bs.version_of([*git, "rev-parse", "--short", "HEAD"]),
        "git_forwarder_changes": bs.version_of(
            ["sh", "-c", f"git -C '{bs.REPO}' status --porcelain -- forwarder | wc -l"]
        ),
        "commands": {s.name: " ".join(s.argv(0, Path("DIR"))) for s in senders},
        "daemon": f"{exe} run --config <per run> --log-target stderr",
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    runs: list[bs.Run] = []
    lat: list[Latency] = []
    backlog: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    status = 0
    started = time.monotonic()
    with _work_root(args.work_dir) as work_root:
        link = all(_same_fs(d, work_root) for d in dirs.values())
        meta["work_dir"] = str(work_root)
        meta["staging"] = "hard links" if link else "copies (corpus on another filesystem)"
        monitor = Monitor()
        monitor.start()
        ctx = Ctx(
            plan, exe, work_root, link, args.quiet_timeout, args.quiet_gap, args.busy_wait, monitor
        )
        try:
            for i, mode in enumerate(plan.modes):
                env = bs.mode_env(mode)
                out_dir = Path(tempfile.mkdtemp(prefix=f"bench-daemon-{mode}-", dir="/dev/shm"))
                receiver = bs.Receiver(mode, env, out_dir, logs / f"storescp-{mode}.log")
                try:
                    receiver.start()
                    print(
                        f"[{mode}] storescp on port {receiver.port} -> {out_dir}", file=sys.stderr
                    )
                    if "throughput" in args.phases:
                        throughput_phase(ctx, receiver, mode, dirs, args.settle, runs, problems)
                    if i == 0 and "latency" in args.phases:
                        lat += latency_phase(
                            ctx,
                            receiver,
                            mode,
                            dirs,
                            args.settle,
                            args.latency_files,
                            args.latency_rate,
                        )
                finally:
                    plan.restarts[mode] = max(0, receiver.starts - 1)
                    receiver.stop()
                    shutil.rmtree(out_dir, ignore_errors=True)
                if i == 0 and "backlog" in args.phases:
                    backlog.append(
                        backlog_phase(ctx, mode, dirs["small"], args.backlog, args.drain)
                    )
        except KeyboardInterrupt:
            print("interrupted: reporting what was measured", file=sys.stderr)
            status = 130
        except bs.BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 2
    for r in lat:
        if r.log_lines:
            problems.append(
                {"mode": r.mode, "corpus": r.corpus, "run": f"latency settle {r.settle_s:g}"}
                | {"ok": r.ok, "lines": r.log_lines}
            )
    for b in backlog:
        # a closed port is the point of the backlog: its connection refusals are expected
        other = [ln for ln in b.get("log_lines", []) if "paused" not in ln]
        if other:
            problems.append({"mode": b["mode"], "run": "backlog", "ok": True, "lines": other})
    meta["duration_s"] = round(time.monotonic() - started, 1)
    meta["loadavg_end"] = os.getloadavg()
    meta["storescp_restarts"] = {m: n for m, n in plan.restarts.items() if n}
    meta["quiet_waited_s"] = round(sum(q["waited_s"] for q in ctx.quiet), 1)
    meta["pytest_seen"] = any(q["pytest_seen"] for q in ctx.quiet)
    busy = [r.background_busy for r in runs if r.background_busy == r.background_busy] or [0.0]
    meta["busy_median"] = statistics.median(busy)
    meta["busy_max"] = max(busy)
    meta["quiet_checks"] = ctx.quiet
    meta["disturbed_by_pytest"] = ctx.disturbed
    monitor.halt.set()
    rows = rows_of(runs)
    report = markdown(rows, lat, backlog, problems, meta)
    raw = {
        "meta": meta,
        "throughput": [asdict(r) for r in rows],
        "runs": [asdict(r) | {"inst_per_s": r.inst_per_s} for r in runs],
        "latency": [asdict(r) for r in lat],
        "backlog": backlog,
        "problems": problems,
    }
    (args.results / f"daemon-{stamp}.json").write_text(json.dumps(raw, indent=2) + "\n")
    (args.results / f"daemon-{stamp}.md").write_text(report)
    print(report)
    print(f"raw results: {args.results / f'daemon-{stamp}.json'}", file=sys.stderr)
    if status:
        return status
    ok = all(r.ok for r in runs) and all(r.ok for r in lat)
    ok = ok and all(b.get("all_queued") for b in backlog)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
