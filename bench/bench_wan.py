"""Benchmark senders over an emulated WAN: a network namespace whose loopback delays every packet.

The kernel here has no ``sch_netem``, so the delay is our own NFQUEUE program (``nfqdelay.c``,
compiled at run time into ``bench/results/``): inside a fresh network namespace
``fwdwan-<pid>``, ``iptables-legacy -A INPUT -p tcp -j NFQUEUE --queue-num 7`` hands every TCP
packet to ``nfqdelay 7 D``, which accepts it D later. On loopback each packet crosses INPUT
once, so the round trip is 2D: D = RTT / 2. The congestion control of the namespace's
127.0.0.1 route is set (default CUBIC: the kernel's default BBR makes large transfers at long
RTT bimodal for every sender) and read back with ``getsockopt(TCP_CONGESTION)``; the RTT is
measured with a TCP echo round trip before the runs. Both go into the report.

Per RTT (``--rtt 20,80``; ``0`` = the namespace's loopback without delay) one child of this
script runs inside the namespace (``ip netns exec``) and does what ``bench_send.py`` and
``bench_daemon.py`` do there (it imports their machinery): one DCMTK ``storescp --fork +B -pdu
131072`` (TCP_NODELAY=1) into tmpfs, and per corpus ``--rounds`` rounds of every sender in a
rotating order: ``dcmsend``, ``forwarder send`` with its default associations and with
``--associations 1/2/4/8``, ``pynetdicom_chunked.py`` (pynetdicom's public API at its best), and
the daemon (``forwarder run``, default associations and 4) timed from the first file renamed
into its inbox to the receiver holding every file. One-shot senders are timed from spawn to
exit. A run counts only when the receiver got all N files (and the sender exited 0).

Report: median inst/s per cell and its ratio to dcmsend's in the same cell, as a markdown table,
to stdout and ``bench/results/wan-<stamp>.md`` (``.json``: every run, the measured RTTs, the
congestion control, the commands; ``wan-<stamp>-logs/``: every process's output).

Everything set up is torn down (nfqdelay stopped, every process in the namespace killed, the
namespace deleted), also on Ctrl-C, SIGTERM or an exception. Without root, network namespaces,
NFQUEUE or libnetfilter_queue it prints ``SKIPPED: <why>`` and exits 0. Exit status otherwise:
0 every run delivered every file, 1 some run did not, 2 a setup error, 130 interrupted.

Usage: ``sudo .venv/bin/python bench/bench_wan.py [--rtt 20,80] [--rounds 2]
[--corpus ct,small] [--ct-files 300] [--small-files 1000] [--senders KEY,...] [--cc cubic]
[--forwarder-venv DIR]``
"""

from __future__ import annotations

import argparse
import atexit
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_daemon as bd
import bench_send as bs
import corpus as corpus_mod

QUEUE = 7
NFQDELAY_SRC = bs.BENCH_DIR / "nfqdelay.c"
INSTALL_HINT = "apt-get install -y libnetfilter-queue-dev iptables"
CORPORA = ("ct", "small")
DCMSEND = "dcmsend"
CHUNKED = "pynetdicom chunked +NODELAY"
SETUP_TIMEOUT_S = 15.0

# key -> (report name, what it is); the report lists the senders in this order
SENDERS: dict[str, tuple[str, str]] = {
    "forwarder": ("forwarder send (default associations)", "forwarder send, no --associations"),
    "forwarder-a1": ("forwarder send a1", "forwarder send --associations 1"),
    "forwarder-a2": ("forwarder send a2", "forwarder send --associations 2"),
    "forwarder-a4": ("forwarder send a4", "forwarder send --associations 4"),
    "forwarder-a8": ("forwarder send a8", "forwarder send --associations 8"),
    "dcmsend": (DCMSEND, "DCMTK dcmsend (the reference of every ratio)"),
    "pynetdicom-chunked": (CHUNKED, "bench/pynetdicom_chunked.py: pynetdicom's public API"),
    "daemon": ("forwarder run (default associations)", "the daemon, destination default"),
    "daemon-a4": ("forwarder run, 4 associations", "the daemon, associations = 4"),
}
DAEMON_ASSOCIATIONS = {"daemon": None, "daemon-a4": 4}


class Skip(Exception):
    """The WAN cannot be emulated here (not root, no namespaces, no NFQUEUE)."""


# --------------------------------------------------------------------------------------------
# set-up and tear-down (host side)


def run_cmd(
    argv: Sequence[str], timeout: float = SETUP_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run a set-up command (bounded); raise BenchError naming it when it fails."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise bs.BenchError(f"`{' '.join(argv)}` timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        why = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise bs.BenchError(f"`{' '.join(argv)}` failed (rc {proc.returncode}): {why}")
    return proc


def skip_reason() -> str | None:
    """Why the WAN cannot be emulated on this machine, or None."""
    if os.geteuid() != 0:
        return "not root (a network namespace, iptables and NFQUEUE need root)"
    for tool, package in (("ip", "iproute2"), ("iptables-legacy", "iptables"), ("cc", "gcc")):
        if not shutil.which(tool):
            return (
                f"`{tool}` not found (apt-get install -y {package}; the delay needs {INSTALL_HINT})"
            )
    header = Path("/usr/include/libnetfilter_queue/libnetfilter_queue.h")
    if not header.exists():
        return f"libnetfilter_queue headers not found ({header}): {INSTALL_HINT}"
    return None


def compile_nfqdelay(out_dir: Path) -> Path:
    """Build nfqdelay.c into ``out_dir`` (git-ignored); return the binary."""
    exe = out_dir / "nfqdelay"
    libs = ["-lnetfilter_queue", "-lnfnetlink"]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        found = subprocess.run(
            ["pkg-config", "--cflags", "--libs", "libnetfilter_queue"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if found.returncode == 0 and found.stdout.strip():
            libs = found.stdout.split()
    cmd = ["cc", "-O2", "-Wall", "-o", str(exe), str(NFQDELAY_SRC), *libs]
    try:
        run_cmd(cmd, timeout=60)
    except bs.BenchError as exc:
        raise Skip(f"cannot build nfqdelay ({exc}); {INSTALL_HINT}") from exc
    return exe


class Namespace:
    """A network namespace with loopback up, and the NFQUEUE delay on its INPUT chain.

    ``teardown`` is idempotent and safe at any stage: it removes the rule, stops nfqdelay,
    kills every process still in the namespace and deletes it.
    """

    def __init__(self, name: str, logs: Path) -> None:
        self.name = name
        self.logs = logs
        self.created = False
        self.rule = False
        self.delay: subprocess.Popen[bytes] | None = None
        self.delay_us = 0

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return run_cmd(self.exec_argv(argv))

    def create(self) -> None:
        try:
            run_cmd(["ip", "netns", "add", self.name])
        except bs.BenchError as exc:
            raise Skip(f"network namespaces not available: {exc}") from exc
        self.created = True
        self.run(["ip", "link", "set", "lo", "up"])

    def set_congestion_control(self, cc: str) -> None:
        """CUBIC (or ``cc``) on the /32 local route, which wins over 127.0.0.0/8 (sysctl is not
        permitted in a namespace here)."""
        self.run(
            [
                "ip", "route", "replace", "local", "127.0.0.1", "dev", "lo", "table", "local",
                "proto", "kernel", "scope", "host", "src", "127.0.0.1", "congctl", cc,
            ]
        )  # fmt: skip

    def _iptables(self, action: str) -> None:
        self.run(
            ["iptables-legacy", action, "INPUT", "-p", "tcp", "-j", "NFQUEUE",
             "--queue-num", str(QUEUE)]
        )  # fmt: skip

    def probe_nfqueue(self) -> None:
        """Add and remove the rule once: an error here means no NFQUEUE in this kernel."""
        try:
            self._iptables("-A")
            self._iptables("-D")
        except bs.BenchError as exc:
            raise Skip(f"iptables NFQUEUE not available: {exc}") from exc

    def start_delay(self, exe: Path, delay_us: int) -> None:
        """Start nfqdelay (bound to the queue before the rule exists, so no packet is lost)."""
        log = self.logs / f"nfqdelay-{delay_us}us.log"
        with log.open("ab") as out:
            self.delay = subprocess.Popen(
                self.exec_argv([str(exe), str(QUEUE), str(delay_us)]),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.delay_us = delay_us
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        while b"nfqdelay: ready" not in log.read_bytes():
            if self.delay.poll() is not None or time.monotonic() > deadline:
                self.stop_delay()
                raise bs.BenchError(f"nfqdelay did not start; see {log}")
            time.sleep(0.02)
        self._iptables("-A")
        self.rule = True

    def delay_alive(self) -> bool:
        return self.delay is not None and self.delay.poll() is None

    def stop_delay(self) -> None:
        if self.rule:
            with contextlib.suppress(bs.BenchError):
                self._iptables("-D")
            self.rule = False
        if self.delay is not None:
            bs.kill_group(self.delay.pid, signal.SIGTERM)
            try:
                self.delay.wait(timeout=5)
            except subprocess.TimeoutExpired:
                bs.kill_group(self.delay.pid, signal.SIGKILL)
                self.delay.wait(timeout=5)
            self.delay = None

    def pids(self) -> list[int]:
        try:
            proc = subprocess.run(
                ["ip", "netns", "pids", self.name],
                capture_output=True,
                text=True,
                timeout=SETUP_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return []
        return [int(p) for p in proc.stdout.split() if p.isdigit()]

    def teardown(self) -> None:
        self.stop_delay()
        if not self.created:
            return
        for _ in range(3):  # anything left inside (a sender, storescp's forks, a daemon)
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        with contextlib.suppress(bs.BenchError):
            run_cmd(["ip", "netns", "del", self.name])
        self.created = False


_CLEANUPS: list[Callable[[], None]] = []


def _run_cleanups() -> None:
    while _CLEANUPS:
        with contextlib.suppress(Exception):
            _CLEANUPS.pop()()


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------------------------
# inside the namespace


def echo_probe(rounds: int = 20) -> dict[str, Any]:
    """Congestion control of both ends of a loopback TCP connection, and its round trip.

    A thread echoes one byte at a time; the client (TCP_NODELAY on both ends) times ``rounds``
    one-byte round trips after two warm-up ones, and the connect (SYN -> SYN-ACK, also 2D).
    """
    with socket.socket() as srv:
        srv.bind((bs.HOST, 0))
        srv.listen(1)
        srv.settimeout(10)
        seen: dict[str, str] = {}

        def serve() -> None:
            with contextlib.suppress(OSError):
                conn, _ = srv.accept()
                with conn:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    seen["server"] = _congestion(conn)
                    while data := conn.recv(64):
                        conn.sendall(data)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        t0 = time.perf_counter()
        with socket.create_connection(srv.getsockname(), timeout=10) as cli:
            connect_ms = (time.perf_counter() - t0) * 1000
            cli.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client_cc = _congestion(cli)
            samples = []
            for i in range(rounds + 2):
                t = time.perf_counter()
                cli.sendall(b"x")
                if cli.recv(1) != b"x":
                    raise bs.BenchError("TCP echo probe: wrong echo")
                if i >= 2:
                    samples.append((time.perf_counter() - t) * 1000)
        thread.join(10)
    return {
        "cc_client": client_cc,
        "cc_server": seen.get("server", "?"),
        "connect_ms": round(connect_ms, 2),
        "rtt_ms_median": round(statistics.median(samples), 2),
        "rtt_ms_min": round(min(samples), 2),
        "rtt_ms_max": round(max(samples), 2),
    }


def _congestion(sock: socket.socket) -> str:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
    return raw.split(b"\0", 1)[0].decode()


def wan_senders(venv: Path, keys: Sequence[str]) -> tuple[list[bs.Sender], list[str]]:
    """The one-shot senders chosen in ``keys`` (daemon keys are handled apart); notes on gaps."""
    notes: list[str] = []
    out: list[bs.Sender] = []
    fwd, why = bs.forwarder_senders(venv)
    if why:
        notes.append(f"forwarder send pending: {why}")
    base = next((s for s in fwd if s.key == "forwarder"), None)
    has_assoc = any(s.key == "forwarder-a2" for s in fwd)
    competitors, missing = bs.competitor_senders(venv)
    notes += [m for m in missing if "storescu" not in m]
    by_key = {s.key: s for s in competitors}
    for key in keys:
        name = SENDERS[key][0]
        if key == "forwarder" and base is not None:
            out.append(bs.Sender(key, name, base.template, is_forwarder=True))
        elif key.startswith("forwarder-a") and base is not None:
            if not has_assoc:
                notes.append(f"{name} skipped: forwarder send has no --associations")
                continue
            cut = base.template.index(bs.HOST)
            n = key.removeprefix("forwarder-a")
            template = (*base.template[:cut], "--associations", n, *base.template[cut:])
            out.append(bs.Sender(key, name, template, is_forwarder=True))
        elif key in by_key:
            s = by_key[key]
            out.append(bs.Sender(key, name, s.template, s.env))
    return out, notes


@dataclass(frozen=True)
class Cell:
    """One corpus at one RTT: what the runs of a cell share."""

    rtt_ms: int
    corpus: str
    files: int

    @property
    def label(self) -> str:
        return f"{self.corpus}{self.files}"


def run_inner(args: argparse.Namespace) -> int:
    """Inside the namespace: probe the network, run every corpus x round x sender, write JSON."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    rtt = args.inner_rtt
    out: dict[str, Any] = {"rtt_ms": rtt, "runs": [], "notes": [], "disturbed": []}
    out["net"] = echo_probe()
    print(
        f"[rtt {rtt}] measured RTT {out['net']['rtt_ms_median']} ms "
        f"(min {out['net']['rtt_ms_min']}, max {out['net']['rtt_ms_max']}), connect "
        f"{out['net']['connect_ms']} ms, congestion control {out['net']['cc_client']}",
        file=sys.stderr,
    )
    if rtt and out["net"]["rtt_ms_median"] < 0.8 * rtt:
        raise bs.BenchError(f"measured RTT {out['net']['rtt_ms_median']} ms: delay not in effect")
    one_shot = [k for k in args.senders if k not in DAEMON_ASSOCIATIONS]
    senders, notes = wan_senders(args.forwarder_venv, one_shot)
    out["notes"] = notes
    out["commands"] = {s.name: " ".join(s.argv(0, Path("DIR"))) for s in senders}
    entries: list[bs.Sender | str] = []
    for key in args.senders:  # keep the order of --senders
        if key in DAEMON_ASSOCIATIONS:
            entries.append(key)
        else:
            entries += [s for s in senders if s.key == key]
    exe: Path | None = None
    if any(isinstance(e, str) for e in entries):
        try:
            exe = bd.forwarder_exe(args.forwarder_venv)
        except bs.BenchError as exc:
            notes.append(f"forwarder run pending: {exc}")
            entries = [e for e in entries if not isinstance(e, str)]
    logs: Path = args.inner_logs
    plan = bs.Plan(
        rounds=args.rounds,
        corpora=args.corpus,
        modes=["tuned"],
        stock_limit={},
        timeout=args.timeout,
        warmup=False,
        senders=[e for e in entries if isinstance(e, bs.Sender)],
        logs=logs,
    )
    env = bs.mode_env("tuned")
    out_dir = Path(tempfile.mkdtemp(prefix=f"bench-wan-rtt{rtt}-", dir="/dev/shm"))
    receiver = bs.Receiver(f"rtt{rtt}", env, out_dir, logs / f"storescp-rtt{rtt}.log")
    work_root = Path(tempfile.mkdtemp(prefix="bench-wan-", dir=args.work_dir))
    monitor = bd.Monitor()
    monitor.start()
    try:
        receiver.start()
        for corpus in args.corpus:
            full = corpus_mod.generate(corpus_mod.SPECS[corpus], args.corpus_dir)
            n = args.ct_files if corpus == "ct" else args.small_files
            directory = full if n == corpus_mod.SPECS[corpus].count else corpus_mod.subset(full, n)
            paths = corpus_mod.dicom_files(directory)
            bs.warm_page_cache(paths)
            cell = Cell(rtt, corpus, len(paths))
            work = bs.Workload(
                f"rtt{rtt}",
                cell.label,
                directory,
                len(paths),
                sum(p.stat().st_size for p in paths),
                env,
            )
            ctx = bd.Ctx(
                plan,
                exe or Path("forwarder"),
                work_root,
                bd._same_fs(directory, work_root),
                0.0,
                0.0,
                0.0,
                monitor,
            )
            for rnd in range(1, args.rounds + 1):
                shift = (rnd - 1) % len(entries)
                for entry in entries[shift:] + entries[:shift]:
                    t_run = time.monotonic()
                    if isinstance(entry, str):
                        variant = bd.Variant(bd.DEFAULT_SETTLE, False, DAEMON_ASSOCIATIONS[entry])
                        r: bs.Run = bd.daemon_run(ctx, receiver, work, variant, rnd)
                        r.sender = SENDERS[entry][0]
                    else:
                        r = bs.one_run(plan, receiver, entry, work, rnd)
                    ctx.note_overlap(f"rtt {rtt} {cell.label} round {rnd} {r.sender}", t_run)
                    row = asdict(r) | {"rtt_ms": rtt, "corpus": corpus, "inst_per_s": r.inst_per_s}
                    row.pop("log_lines", None)
                    out["runs"].append(row)
                    status = "ok" if r.ok else f"FAILED ({r.reason})"
                    print(
                        f"  [rtt {rtt} {cell.label} round {rnd}] {r.sender:<38} "
                        f"{r.wall_s:7.2f} s {r.inst_per_s:8.1f} inst/s  {status}",
                        file=sys.stderr,
                    )
                    if rtt and not _pid_alive(args.inner_nfq_pid):
                        raise bs.BenchError("nfqdelay died: later figures would have no delay")
            out["disturbed"] += ctx.disturbed
    finally:
        monitor.halt.set()
        receiver.stop()
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.rmtree(work_root, ignore_errors=True)
        args.inner_out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------
# report


@dataclass
class CellSummary:
    rtt_ms: int
    corpus: str
    files: int
    sender: str
    ok_runs: int
    runs: int
    median_wall_s: float | None
    inst_per_s: float | None
    ratio_to_dcmsend: float | None
    failures: list[str]


def summarise(runs: list[dict[str, Any]]) -> list[CellSummary]:
    """Median per (RTT, corpus, sender) over the runs that delivered every file."""
    keys = list(dict.fromkeys((r["rtt_ms"], r["corpus"], r["sender"]) for r in runs))
    out: list[CellSummary] = []
    for rtt, corpus, sender in keys:
        group = [
            r for r in runs if (r["rtt_ms"], r["corpus"], r["sender"]) == (rtt, corpus, sender)
        ]
        good = [r for r in group if r["ok"]]
        wall = statistics.median(r["wall_s"] for r in good) if good else None
        files = int(group[0]["files"])
        out.append(
            CellSummary(
                rtt_ms=rtt,
                corpus=corpus,
                files=files,
                sender=sender,
                ok_runs=len(good),
                runs=len(group),
                median_wall_s=None if wall is None else round(wall, 3),
                inst_per_s=files / wall if wall else None,
                ratio_to_dcmsend=None,
                failures=[f"round {r['round']}: {r['reason']}" for r in group if not r["ok"]],
            )
        )
    for s in out:
        ref = next(
            (c for c in out if (c.rtt_ms, c.corpus, c.sender) == (s.rtt_ms, s.corpus, DCMSEND)),
            None,
        )
        if ref is not None and ref.inst_per_s and s.inst_per_s:
            s.ratio_to_dcmsend = s.inst_per_s / ref.inst_per_s
    return out


def _num(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def markdown(summaries: list[CellSummary], meta: dict[str, Any]) -> str:
    cc = meta["congestion_control"]
    cells = list(dict.fromkeys((s.corpus, s.files, s.rtt_ms) for s in summaries))
    cells.sort(key=lambda c: (CORPORA.index(c[0]), c[2]))

    def head(corpus: str, files: int, rtt: int) -> str:
        where = f"RTT {rtt}" if rtt else "loopback"
        return f"{'CT' if corpus == 'ct' else corpus} {files}, {where}, {cc.upper()}"

    names = [SENDERS[k][0] for k in SENDERS if SENDERS[k][0] in {s.sender for s in summaries}]
    by = {(s.corpus, s.files, s.rtt_ms, s.sender): s for s in summaries}
    lines = [
        f"# WAN benchmark, {meta['started']}",
        "",
        f"forwarder measured: {meta['forwarder']}; {meta['cpus']} CPUs; median of "
        f"{meta['rounds']} rounds; receiver `{meta['receiver']}` (TCP_NODELAY=1); took "
        f"{meta['duration_s']} s.",
        f"Delay: {meta['delay_method']}. Congestion control: {cc} "
        f"(read back with getsockopt TCP_CONGESTION: {meta['cc_seen']}).",
        "Measured RTT (TCP echo, median of 20): "
        + (
            "; ".join(
                f"{k} ms set -> {v['rtt_ms_median']} ms "
                f"(min {v['rtt_ms_min']}, max {v['rtt_ms_max']})"
                for k, v in meta["net"].items()
            )
            or "not measured"
        )
        + ".",
        f"Load on the machine before the runs (all CPUs busy): median "
        f"{meta['busy_median']:.0%}, max {meta['busy_max']:.0%}; load average at start "
        f"{meta['loadavg_start'][0]:.2f}, at end {meta['loadavg_end'][0]:.2f}"
        + (f"; pytest ran during {len(meta['disturbed'])} runs" if meta["disturbed"] else "")
        + ".",
        "",
        "inst/s (ratio to dcmsend in the same cell); one-shot senders timed spawn -> exit, the "
        "daemon first rename into its inbox -> receiver holds all files:",
        "",
        "| sender | " + " | ".join(head(*c) for c in cells) + " |",
        "|---|" + "---|" * len(cells),
    ]
    if not cells:
        lines[-3:] = ["No run finished."]
    for name in names:
        row = [name]
        for corpus, files, rtt in cells:
            s = by.get((corpus, files, rtt, name))
            if s is None:
                row.append("")
            elif s.inst_per_s is None:
                row.append(f"FAILED (0/{s.runs})")
            else:
                text = _num(s.inst_per_s)
                if s.sender != DCMSEND:
                    text += f" ({s.ratio_to_dcmsend:.2f}x)" if s.ratio_to_dcmsend else " (n/a)"
                if s.ok_runs != s.runs:
                    text += f" [{s.ok_runs}/{s.runs} ok]"
                row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    failures = [
        f"- {s.sender}, {s.corpus} {s.files}, RTT {s.rtt_ms}: FAILED {f}"
        for s in summaries
        for f in s.failures
    ]
    if failures:
        lines += ["", "Failed runs (not timed):", "", *failures]
    if meta["notes"]:
        lines += ["", "Notes:", "", *(f"- {n}" for n in meta["notes"])]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# command line


def _rtts(text: str) -> list[int]:
    try:
        values = list(dict.fromkeys(int(v) for v in text.split(",") if v))
    except ValueError as exc:
        raise argparse.ArgumentTypeError("a comma list of whole milliseconds") from exc
    if not values or any(v < 0 or v > 2000 for v in values):
        raise argparse.ArgumentTypeError("RTTs between 0 (no delay) and 2000 ms")
    return values


def _parser() -> argparse.ArgumentParser:
    keys = "; ".join(f"{k}: {what}" for k, (_, what) in SENDERS.items())
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--rtt", type=_rtts, default=[20, 80], help="ms, comma list; 0 = no delay")
    p.add_argument("--rounds", type=int, default=2, help="rounds per cell (default 2)")
    p.add_argument("--corpus", type=bs.parse_list(list(CORPORA)), default=list(CORPORA))
    p.add_argument("--ct-files", type=int, default=300, help="first N of the ct corpus (300)")
    p.add_argument("--small-files", type=int, default=1000, help="first N of small (1000)")
    p.add_argument(
        "--senders",
        type=bs.parse_list(list(SENDERS)),
        default=list(SENDERS),
        help=f"comma list (default all). {keys}",
    )
    p.add_argument("--cc", default="cubic", help="congestion control of the route (cubic)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-run timeout, s (300)")
    p.add_argument(
        "--forwarder-venv",
        type=Path,
        default=bs.REPO / ".venv",
        help="venv whose forwarder and pynetdicom are measured (default: the repo's .venv)",
    )
    p.add_argument("--corpus-dir", type=Path, default=bs.BENCH_DIR / "corpus")
    p.add_argument("--results", type=Path, default=bs.BENCH_DIR / "results")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where the daemon's inboxes and outboxes go (default $TMPDIR)",
    )
    # set by the parent for its child inside the namespace
    p.add_argument("--inner-rtt", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--inner-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--inner-logs", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--inner-nfq-pid", type=int, default=0, help=argparse.SUPPRESS)
    return p


def forwarder_identity(venv: Path) -> str:
    """Where the measured forwarder's code lives, its commit, and whether that tree is dirty."""
    python = venv / "bin" / "python"
    where = bs.version_of(
        [str(python), "-c", "import forwarder, os; print(os.path.dirname(forwarder.__file__))"]
    )
    if where == "unavailable":
        return f"unavailable ({python})"
    commit = bs.version_of(["git", "-C", where, "rev-parse", "--short", "HEAD"])
    dirty = bs.version_of(["sh", "-c", f"git -C '{where}' status --porcelain -- . | wc -l"])
    state = "clean" if dirty == "0" else f"{dirty} changed files under forwarder/"
    return f"{where} at {commit} ({state})"


def main(argv: Sequence[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(raw_argv)
    if args.rounds < 1 or args.ct_files < 1 or args.small_files < 1:
        parser.error("--rounds, --ct-files and --small-files must be positive")
    for name, n in (("ct", args.ct_files), ("small", args.small_files)):
        if n > corpus_mod.SPECS[name].count:
            parser.error(f"--{name}-files: the {name} corpus has {corpus_mod.SPECS[name].count}")
    if args.inner_rtt is not None:
        try:
            return run_inner(args)
        except bs.BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
    reason = skip_reason()
    if reason:
        print(f"SKIPPED: {reason}")
        return 0
    for tool in ("storescp", "dcmsend"):
        if not shutil.which(tool):
            print(f"error: {tool} not found on PATH (apt-get install dcmtk)", file=sys.stderr)
            return 2
    try:
        return run_outer(args, raw_argv)
    except Skip as exc:
        print(f"SKIPPED: {exc}")
        return 0


def run_outer(args: argparse.Namespace, raw_argv: list[str]) -> int:
    """Set up the namespace, run one child per RTT inside it, tear down, report."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.results.mkdir(parents=True, exist_ok=True)
    logs = args.results / f"wan-{stamp}-logs"
    logs.mkdir()
    for name in args.corpus:
        corpus_mod.generate(corpus_mod.SPECS[name], args.corpus_dir)
    exe = compile_nfqdelay(args.results)
    ns = Namespace(f"fwdwan-{os.getpid()}", logs)
    _CLEANUPS.append(ns.teardown)
    atexit.register(_run_cleanups)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    meta: dict[str, Any] = {
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "rounds": args.rounds,
        "rtts_ms": args.rtt,
        "receiver": f"storescp --fork +B -pdu {bs.PDU} -od <tmpfs>",
        "storescp": bs.version_of(["storescp", "--version"]),
        "forwarder": forwarder_identity(args.forwarder_venv),
        "bench_git": bs.version_of(["git", "-C", str(bs.REPO), "rev-parse", "--short", "HEAD"]),
        "namespace": ns.name,
        "delay_method": (
            f"NFQUEUE delayer (bench/nfqdelay.c, queue {QUEUE}, D = RTT/2 on every TCP packet "
            "entering the namespace's loopback); netem is not in this kernel"
        ),
        "congestion_control": args.cc,
        "net": {},
        "notes": [],
        "commands": {},
        "disturbed": [],
    }
    runs: list[dict[str, Any]] = []
    status = 0
    started = time.monotonic()
    child: subprocess.Popen[bytes] | None = None
    try:
        ns.create()
        try:
            ns.set_congestion_control(args.cc)
        except bs.BenchError as exc:
            meta["notes"].append(f"could not set congestion control {args.cc}: {exc}")
            meta["congestion_control"] = "kernel default"
        ns.probe_nfqueue()
        per_run = len(args.senders) * len(args.corpus) * args.rounds
        for rtt in args.rtt:
            if rtt:
                ns.start_delay(exe, rtt * 500)
            out = logs / f"inner-rtt{rtt}.json"
            cmd = ns.exec_argv(
                [sys.executable, str(Path(__file__).resolve()), *raw_argv, "--inner-rtt", str(rtt),
                 "--inner-out", str(out), "--inner-logs", str(logs),
                 "--inner-nfq-pid", str(ns.delay.pid if ns.delay else 0)]
            )  # fmt: skip
            child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
            rc: int | None = None
            try:
                rc = child.wait(timeout=per_run * (args.timeout + 60) + 120)
            except subprocess.TimeoutExpired:
                meta["notes"].append(f"RTT {rtt}: the run inside the namespace timed out")
            finally:  # also on Ctrl-C: the child writes what it measured when it stops
                _stop_child(child)
                child = None
                if rtt:
                    ns.stop_delay()
                _absorb(out, rtt, runs, meta)
            if rc != 0:
                status = 2
                meta["notes"].append(f"RTT {rtt}: the run inside the namespace exited {rc}")
                break
    except KeyboardInterrupt:
        print("interrupted: tearing down, reporting the runs so far", file=sys.stderr)
        status = 130
    except bs.BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = 2
    finally:
        if child is not None:
            _stop_child(child)
        _run_cleanups()
    seen = sorted({v.get("cc_client", "?") for v in meta["net"].values()})
    meta["cc_seen"] = ", ".join(seen) or "not measured"
    meta["duration_s"] = round(time.monotonic() - started, 1)
    meta["loadavg_end"] = os.getloadavg()
    busy = [r["background_busy"] for r in runs if r["background_busy"] == r["background_busy"]]
    meta["busy_median"] = statistics.median(busy) if busy else 0.0
    meta["busy_max"] = max(busy) if busy else 0.0
    summaries = summarise(runs)
    report = markdown(summaries, meta)
    raw = {"meta": meta, "summary": [asdict(s) for s in summaries], "runs": runs}
    (args.results / f"wan-{stamp}.json").write_text(json.dumps(raw, indent=2) + "\n")
    (args.results / f"wan-{stamp}.md").write_text(report)
    print(report)
    print(f"raw results: {args.results / f'wan-{stamp}.json'}", file=sys.stderr)
    if status:
        return status
    return 0 if runs and all(r["ok"] for r in runs) else 1


def _absorb(out: Path, rtt: int, runs: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Add what the child for ``rtt`` wrote (its runs, the probe, notes) to ``runs``/``meta``."""
    try:
        inner = json.loads(out.read_text())
    except (OSError, ValueError):
        return
    runs += inner.get("runs", [])
    if "net" in inner:
        meta["net"][str(rtt)] = inner["net"]
    meta["notes"] += [n for n in inner.get("notes", []) if n not in meta["notes"]]
    meta["commands"] |= inner.get("commands", {})
    meta["disturbed"] += inner.get("disturbed", [])


def _stop_child(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's group (it stops its receiver and daemons), then SIGKILL."""
    if child.poll() is None:
        bs.kill_group(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            bs.kill_group(child.pid, signal.SIGKILL)
            child.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
