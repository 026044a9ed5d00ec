"""Benchmark routing rules and per-destination transforms in the daemon (issue 12), side by side.

Every figure is a ratio against a baseline measured in the same run, in rotating order:

1. **rules** (ct and small corpus): ``forwarder run`` with one destination without rules
   against the same destination with match/exclude rules that every file matches.
   Target >= 0.95x.
2. **setremove** (small corpus, in the same rotation as 1.): ``[destinations.transform]`` with
   ``set`` and ``remove`` only, against the streaming path (no rules, no transform).
   Target >= 0.5x.
3. **compress** (the first ``--ct-files`` files of ``corpus.py``'s ct and ``phantom.py``'s
   ctphantom): the encoder's single-process rate (``forwarder.transform.transform_file`` in a
   loop in one process, the forwarder venv's python, output on the daemon's filesystem,
   ``durable=False`` as the pool calls it) and the daemon with ``[transform] workers = W``
   sending ``transfer_syntax`` copies, for jpeg-ls-lossless and jpeg2000-lossless; the daemon
   sending the files as they are is shown beside them. Target: daemon >= 0.8 x (W x single).
4. **wan** (as root): a network namespace whose loopback is capped by HTB (``--wan-rate``,
   100 Mbit/s) and delayed by the NFQUEUE delayer of ``bench_wan.py`` (``--wan-rtt``, 20 ms),
   CUBIC on the route; the daemon sends the same CT files as they are and as
   jpeg-ls-lossless. Target: >= 1.8x faster.

A daemon run (as ``bench_daemon.py``'s, whose ``DaemonProc`` it extends): a fresh daemon with
its own config, inbox and outbox is started; one warm-up instance (a corpus file with another
SOP Instance UID) is dropped in and must reach the receiver (so the association is open and a
transform pool is started, as in a daemon that has been running); the receiver is emptied and
the daemon left idle; then every corpus file, hard-linked beforehand into a staging folder, is
renamed into the inbox in one loop (files written earlier: ready at once). Timed: first rename
-> the receiver holds all N files. Afterwards every received file's transfer syntax is read
(all must be the target one), the stored bytes are summed (compression ratio), the ``set``
values are checked in every received file of a set/remove run, and three received images per
compressed run are decoded and compared with their sources pixel for pixel.

Also measured: the CPU each part used per file during a daemon burst (the daemon's main
process, its transform pool, storescp, the rest of the machine; from ``/proc``); ``W`` encoder
processes side by side (no daemon) as the machine's own ceiling for W CPU-bound processes; and
what the rules add per file in one process (header walk with the rules' attributes and
``Router.route``), since wall-clock ratios near 1 drift by more than that on a shared VM.

Receiver: DCMTK ``storescp --fork +xa -pdu 131072 +B`` into tmpfs with TCP_NODELAY=1 (``+xa``:
every transfer syntax it knows, JPEG-LS and JPEG 2000 included).

Usage: ``.venv/bin/python bench/bench_transform.py [--phases rules,setremove,compress,wan]
[--rounds 3] [--rules-rounds 5] [--ct-files 300] [--workers 2] [--forwarder-venv DIR]``
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import inspect
import json
import os
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
import bench_daemon as bd
import bench_send as bs
import bench_wan as bw
import corpus as corpus_mod
import phantom

PHASES = ("rules", "setremove", "compress", "wan")
SYNTAX_UIDS = {
    "keep": None,
    "explicit-le": "1.2.840.10008.1.2.1",
    "rle": "1.2.840.10008.1.2.5",
    "jpeg-ls-lossless": "1.2.840.10008.1.2.4.80",
    "jpeg2000-lossless": "1.2.840.10008.1.2.4.90",
}
EXPLICIT_LE = "1.2.840.10008.1.2.1"
# issue 12's targets
RULES_RATIO = 0.95
SETREMOVE_RATIO = 0.5
POOL_RATIO = 0.8
WAN_RATIO = 1.8

RULE_MATCH: dict[str, str | list[str]] = {
    "Modality": ["CT", "MR"],
    "Manufacturer": "BENCH*",
    "0008,0080": "*Hospital",  # InstitutionName, by tag
    "path": "series*/*.dcm",
}
RULE_EXCLUDE: dict[str, str | list[str]] = {"SeriesDescription": ["*SCOUT*", "*LOCALIZER*"]}
RULE_LINES = [
    # every corpus file matches each of these; the exclusion matches none
    "[destinations.match]",
    'Modality = ["CT", "MR"]',
    'Manufacturer = "BENCH*"',
    '"0008,0080" = "*Hospital"',  # InstitutionName, by tag
    'path = "series*/*.dcm"',
    "[destinations.exclude]",
    'SeriesDescription = ["*SCOUT*", "*LOCALIZER*"]',
]
SET_PATIENT_ID = "X-{PatientID}"
SET_INSTITUTION = "Gateway"
SETREMOVE_LINES = [
    "[destinations.transform]",
    f'set = {{ PatientID = "{SET_PATIENT_ID}", InstitutionName = "{SET_INSTITUTION}" }}',
    'remove = ["OtherPatientIDs", "0009,1001"]',
]


@dataclass(frozen=True)
class Setup:
    """One way of configuring the daemon's single destination."""

    key: str
    name: str
    dest_lines: tuple[str, ...] = ()  # TOML after the destination's own keys
    workers: int | None = None  # [transform] workers (None: not written)
    syntax: str = "keep"  # what the receiver must hold (keep: the source's own)
    set_checked: bool = False  # check PatientID/InstitutionName in every received file


def plain() -> Setup:
    return Setup("plain", "forwarder run, no rules (streaming)")


def rules() -> Setup:
    return Setup("rules", "forwarder run, rules every file matches", tuple(RULE_LINES))


def setremove() -> Setup:
    return Setup(
        "setremove",
        "forwarder run, transform set/remove",
        tuple(SETREMOVE_LINES),
        set_checked=True,
    )


def compressing(syntax: str, workers: int) -> Setup:
    return Setup(
        f"daemon-{syntax}",
        f"forwarder run, transfer_syntax {syntax}, workers {workers}",
        ("[destinations.transform]", f'transfer_syntax = "{syntax}"'),
        workers=workers,
        syntax=syntax,
    )


# --------------------------------------------------------------------------------------------
# the daemon and the receiver


class Daemon(bd.DaemonProc):
    """``bench_daemon``'s daemon with the setup's destination lines and ``[transform]``."""

    def __init__(self, *args: Any, setup: Setup, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.setup = setup

    def start(self, timeout: float = 600.0) -> float:
        """Spawn it from its own folder: the transform pool's forkserver is a ``python -c``,
        whose ``sys.path[0]`` is the working directory (Python 3.11's forkserver does not apply
        the parent's ``sys_path``), so started from a source checkout it would import that
        checkout's ``forwarder`` instead of the venv's."""
        previous = os.getcwd()
        self.root.mkdir(parents=True, exist_ok=True)
        os.chdir(self.root)
        try:
            return super().start(timeout)
        finally:
            os.chdir(previous)

    def write_config(self) -> None:
        super().write_config()  # ends with the [[destinations]] table: sub-tables may follow
        extra = list(self.setup.dest_lines)
        if self.setup.workers is not None:
            extra += ["[transform]", f"workers = {self.setup.workers}"]
        if extra:
            with self.config.open("a") as f:
                f.write("\n".join(extra) + "\n")


class Receiver(bs.Receiver):
    """``bench_send``'s storescp, accepting every transfer syntax it knows (``+xa``)."""

    def argv(self) -> list[str]:
        argv = super().argv()
        return [argv[0], "+xa", *argv[1:]]


CLK_TCK = os.sysconf("SC_CLK_TCK")


def group_ticks(pgid: int) -> dict[int, int]:
    """pid -> utime + stime + cutime + cstime (clock ticks) of every process in group ``pgid``
    (a process's reaped children are in its cutime/cstime: storescp's forks, for one)."""
    out: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        f = text[text.rindex(")") + 2 :].split()
        if int(f[2]) == pgid:
            out[int(entry.name)] = int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return out


def machine_ticks() -> int:
    """Busy clock ticks of all CPUs together, from /proc/stat."""
    return bs._cpu_times()[0]


@dataclass
class CpuSnap:
    daemon: dict[int, int]
    receiver: dict[int, int]
    machine: int

    @classmethod
    def take(cls, daemon_pid: int, receiver_pid: int) -> CpuSnap:
        return cls(group_ticks(daemon_pid), group_ticks(receiver_pid), machine_ticks())


def cpu_between(a: CpuSnap, b: CpuSnap, daemon_pid: int) -> dict[str, float]:
    """CPU seconds between two snapshots: the daemon's main process, the rest of its process
    group (the transform pool: forkserver and workers), the receiver, and everything else."""

    def delta(x: dict[int, int], y: dict[int, int], pids: Callable[[int], bool]) -> float:
        return sum(t - x.get(pid, 0) for pid, t in y.items() if pids(pid)) / CLK_TCK

    main = delta(a.daemon, b.daemon, lambda pid: pid == daemon_pid)
    pool = delta(a.daemon, b.daemon, lambda pid: pid != daemon_pid)
    rx = delta(a.receiver, b.receiver, lambda pid: True)
    total = (b.machine - a.machine) / CLK_TCK
    return {
        "daemon": round(main, 2),
        "pool": round(pool, 2),
        "receiver": round(rx, 2),
        "other": round(max(0.0, total - main - pool - rx), 2),
        "machine": round(total, 2),
    }


def received_files(out_dir: Path) -> list[Path]:
    return sorted(Path(e.path) for e in os.scandir(out_dir) if e.is_file())


@dataclass
class Check:
    """What the receiver holds after a run."""

    count: int = 0
    bytes: int = 0
    syntaxes: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    pixels_compared: int = 0


def check_received(
    out_dir: Path, setup: Setup, sources: dict[str, Path], pixel_samples: int = 3
) -> Check:
    """Read every received file's meta (and header for set checks); compare some pixels."""
    from pydicom import dcmread
    from pydicom.filereader import read_file_meta_info

    files = received_files(out_dir)
    out = Check(count=len(files))
    want = SYNTAX_UIDS.get(setup.syntax)
    for path in files:
        out.bytes += path.stat().st_size
        try:
            meta = read_file_meta_info(path)
        except Exception as exc:
            out.problems.append(f"{path.name}: unreadable meta ({exc})")
            continue
        ts = str(meta.get("TransferSyntaxUID", "?"))
        out.syntaxes[ts] = out.syntaxes.get(ts, 0) + 1
        if setup.set_checked:
            ds = dcmread(path, stop_before_pixels=True)
            uid = str(ds.SOPInstanceUID)
            src = sources.get(uid)
            if src is None:
                out.problems.append(f"{path.name}: SOP Instance UID not in the corpus")
                continue
            orig = dcmread(src, stop_before_pixels=True)
            expect = SET_PATIENT_ID.format(PatientID=orig.PatientID)
            if ds.PatientID != expect or ds.InstitutionName != SET_INSTITUTION:
                out.problems.append(
                    f"{path.name}: PatientID {ds.PatientID!r} InstitutionName "
                    f"{ds.InstitutionName!r}, expected {expect!r} / {SET_INSTITUTION!r}"
                )
    wrong = {ts: n for ts, n in out.syntaxes.items() if want is not None and ts != want}
    if wrong:
        out.problems.append(f"expected every file in {want}, got {wrong}")
    if want is not None and files:
        step = max(1, len(files) // pixel_samples)
        for path in files[::step][:pixel_samples]:
            ds = dcmread(path)
            src = sources.get(str(ds.SOPInstanceUID))
            if src is None:
                out.problems.append(f"{path.name}: SOP Instance UID not in the corpus")
                continue
            try:
                same = bool((ds.pixel_array == dcmread(src).pixel_array).all())
            except Exception as exc:
                out.problems.append(f"{path.name}: cannot decode ({exc})")
                continue
            out.pixels_compared += 1
            if not same:
                out.problems.append(f"{path.name}: pixels differ from {src.name}")
    return out


def uid_index(directory: Path) -> dict[str, Path]:
    """SOP Instance UID -> corpus file."""
    from pydicom.filereader import read_file_meta_info

    return {
        str(read_file_meta_info(p).MediaStorageSOPInstanceUID): p
        for p in corpus_mod.dicom_files(directory)
    }


def make_warmup(template: Path, dst: Path) -> str:
    """A copy of ``template`` with another SOP Instance UID of the same length (meta and data
    set); returns the new UID."""
    from pydicom.filereader import read_file_meta_info

    data = template.read_bytes()
    uid = str(read_file_meta_info(template).MediaStorageSOPInstanceUID).encode()
    new = uid[:-6] + b"999999" if not uid.endswith(b"999999") else uid[:-6] + b"888888"
    if data.count(uid) != 2:
        raise bs.BenchError(f"{template}: SOP Instance UID not found exactly twice")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data.replace(uid, new))
    return new.decode()


# --------------------------------------------------------------------------------------------
# one run


@dataclass
class XRun(bs.Run):
    """A timed run: a daemon burst (first rename -> receiver holds N) or an encoder loop."""

    setup: str = ""
    kind: str = "daemon"  # daemon | encoder
    first_file_s: float | None = None
    inbox_empty_s: float | None = None
    warmup_s: float | None = None
    out_bytes: int = 0  # bytes the receiver stored (daemon) or the encoder wrote
    syntaxes: dict[str, int] = field(default_factory=dict)
    pixels_compared: int = 0
    loadavg: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)  # see cpu_between; encoder: "encoder"
    log_lines: list[str] = field(default_factory=list)


@dataclass
class Env:
    """What every run needs."""

    ctx: bd.Ctx
    receiver: Receiver
    fwd_python: Path
    work_root: Path
    micro: dict[str, dict[str, float]] = field(default_factory=dict)  # rules in-process


def daemon_run(
    env: Env,
    work: bs.Workload,
    setup: Setup,
    rnd: int,
    warm_src: Path,
    sources: dict[str, Path],
) -> XRun:
    ctx, receiver = env.ctx, env.receiver
    receiver.ensure_alive()
    if receiver.count():
        receiver.clean()
    log = ctx.plan.logs / f"{work.mode}-{work.corpus}-r{rnd}-{setup.key}.log"
    root = Path(tempfile.mkdtemp(prefix=f"{setup.key}-", dir=env.work_root))
    daemon = Daemon(ctx.exe, root, receiver.port, bd.DEFAULT_SETTLE, work.env, log, setup=setup)
    files = corpus_mod.dicom_files(work.directory)
    staging = root / "staging"
    moves = [
        (staging / f.relative_to(work.directory), daemon.inbox / f.relative_to(work.directory))
        for f in files
    ]
    reasons: list[str] = []
    wall = 0.0
    first_s = empty_s = warm_s = None
    hwm: float | None = None
    busy = float("nan")
    load = os.getloadavg()[0]
    check = Check()
    cpu: dict[str, float] = {}
    try:
        bd._stage(list(zip(files, (s for s, _ in moves), strict=True)), ctx.link)
        for _, dst in moves:
            dst.parent.mkdir(parents=True, exist_ok=True)
        daemon.start(timeout=60)
        # warm-up: one instance through the whole path (association open, pool started)
        t_w = time.perf_counter()
        shutil.copyfile(warm_src, staging / "warmup.dcm")
        os.rename(staging / "warmup.dcm", moves[0][1].parent / "WARMUP.dcm")
        ok, t_got = bd.wait_for(
            lambda: bd.count_files(daemon.inbox) == 0 or not daemon.alive(), 120.0, 0.005
        )
        if not ok or not daemon.alive() or receiver.settled_count(1, 5.0) < 1:
            raise bs.BenchError(
                f"the warm-up instance did not arrive (quarantined or stuck); see {log}"
            )
        warm_s = t_got - t_w
        receiver.clean()
        daemon.wait_idle()
        busy = bs.background_busy()
        n = work.files
        out_dir = receiver.out_dir
        assert receiver.proc is not None
        rx_pid = receiver.proc.pid
        snap0 = CpuSnap.take(daemon.pid, rx_pid)
        t0 = time.perf_counter()
        for src, dst in moves:
            os.rename(src, dst)
        first: list[float] = []
        polls = [0]
        quarantine = root / "quarantine"

        def arrived() -> bool:
            got = bd.count_entries(out_dir)
            if got and not first:
                first.append(time.perf_counter())
            polls[0] += 1
            if polls[0] % 50 == 0 and quarantine.exists() and bd.count_files(quarantine):
                reasons.append(f"{bd.count_files(quarantine)} files quarantined; see {log}")
                return True
            return got >= n or not daemon.alive()

        ok, t_all = bd.wait_for(arrived, ctx.plan.timeout)
        wall = t_all - t0
        if daemon.alive():
            cpu = cpu_between(snap0, CpuSnap.take(daemon.pid, rx_pid), daemon.pid)
        first_s = first[0] - t0 if first else None
        if not daemon.alive():
            reasons.append("daemon exited")
        elif not ok:
            reasons.append(f"timed out after {ctx.plan.timeout:.0f} s")
        if reasons:
            raise bs.BenchError("; ".join(reasons))
        ok_e, t_e = bd.wait_for(lambda: bd.count_files(daemon.inbox) == 0, 30.0, 0.02)
        empty_s = t_e - t0 if ok_e else None
        if not ok_e:
            reasons.append(f"inbox still holds {bd.count_files(daemon.inbox)} files after 30 s")
        hwm = daemon.hwm_mb()
        receiver.settled_count(n)
        check = check_received(out_dir, setup, sources)
        if check.count != n:
            reasons.append(f"receiver got {check.count} of {n} files")
        reasons += check.problems[:5]
    except bs.BenchError as exc:
        reasons = [str(exc)]
    finally:
        rc = daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
        receiver.clean()
    if rc != 0:
        reasons.append(f"daemon exit status {rc} at SIGTERM")
    lines = daemon.log_lines()
    return XRun(
        mode=work.mode,
        corpus=work.corpus,
        round=rnd,
        sender=setup.name,
        files=work.files,
        bytes=work.bytes,
        ok=not reasons,
        wall_s=wall,
        rc=rc,
        peak_rss_mb=hwm,
        received=check.count,
        background_busy=round(busy, 3),
        reason="; ".join(reasons),
        output_tail="\n".join(lines[-40:]) if reasons else "",
        setup=setup.key,
        kind="daemon",
        first_file_s=None if first_s is None else round(first_s, 4),
        inbox_empty_s=None if empty_s is None else round(empty_s, 4),
        warmup_s=None if warm_s is None else round(warm_s, 3),
        out_bytes=check.bytes,
        syntaxes=check.syntaxes,
        pixels_compared=check.pixels_compared,
        loadavg=round(load, 2),
        cpu_s=cpu,
        log_lines=lines[:100],
    )


def encoder_run(env: Env, work: bs.Workload, syntax: str, rnd: int, parallel: int = 1) -> XRun:
    """``transform_file`` over the workload's files in ``parallel`` processes of the forwarder's
    venv (each on its share of the files, started together); timed inside the processes: the
    sum of the calls' times for one process, first start -> last end for several."""
    ctx = env.ctx
    load = os.getloadavg()[0]
    busy = bs.background_busy()
    out_dir = Path(tempfile.mkdtemp(prefix=f"encode-{syntax}-", dir=env.work_root))
    go = out_dir / "go"
    tag = f"encoder-{syntax}" + (f"-x{parallel}" if parallel > 1 else "")
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    reasons: list[str] = []
    results: list[dict[str, Any]] = []
    rc: int | None = 0
    try:
        for i in range(parallel):
            result = out_dir / f"result{i}.json"
            log = ctx.plan.logs / f"{work.mode}-{work.corpus}-r{rnd}-{tag}-{i}.log"
            argv = [
                str(env.fwd_python), str(Path(__file__).resolve()), "--inner-encode", syntax,
                "--inner-src", str(work.directory), "--inner-dst", str(out_dir),
                "--inner-out", str(result), "--inner-shard", f"{i}/{parallel}",
                *(["--inner-go", str(go)] if parallel > 1 else []),
            ]  # fmt: skip
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    argv,
                    env=work.env,
                    cwd=out_dir,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            procs.append((proc, result))
        if parallel > 1:
            ready = [Path(f"{r}.ready") for _, r in procs]
            bd.wait_for(
                lambda: (
                    all(p.exists() for p in ready) or any(p.poll() is not None for p, _ in procs)
                ),
                120.0,
                0.005,
            )
            go.touch()
        for proc, result in procs:
            try:
                code = proc.wait(timeout=ctx.plan.timeout)
            except subprocess.TimeoutExpired:
                bs.kill_group(proc.pid)
                proc.wait(10)
                reasons.append(f"timed out after {ctx.plan.timeout:.0f} s")
                continue
            if code != 0:
                rc = code
                reasons.append(f"exit status {code}; see {ctx.plan.logs}/*{tag}*")
                continue
            results.append(json.loads(result.read_text()))
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                bs.kill_group(proc.pid)
                proc.wait(10)
        shutil.rmtree(out_dir, ignore_errors=True)
    files = sum(int(r["files"]) for r in results)
    syntaxes: dict[str, int] = {}
    for r in results:
        for k, v in r["syntaxes"].items():
            syntaxes[k] = syntaxes.get(k, 0) + v
    if not reasons:
        if files != work.files:
            reasons.append(f"encoded {files} of {work.files}")
        wrong = {k: v for k, v in syntaxes.items() if k != SYNTAX_UIDS[syntax]}
        if wrong:
            reasons.append(f"wrote {wrong}, expected {SYNTAX_UIDS[syntax]}")
    if parallel == 1:
        wall = float(results[0]["transform_s"]) if results else 0.0
    else:
        wall = (
            max(r["ended"] for r in results) - min(r["started"] for r in results) if results else 0
        )
    what = "one process" if parallel == 1 else f"{parallel} processes side by side"
    return XRun(
        mode=work.mode,
        corpus=work.corpus,
        round=rnd,
        sender=f"encoder {syntax}, {what}",
        files=work.files,
        bytes=work.bytes,
        ok=not reasons,
        wall_s=wall,
        rc=rc,
        peak_rss_mb=None,
        received=files,
        background_busy=round(busy, 3),
        reason="; ".join(reasons),
        setup=tag,
        kind="encoder",
        out_bytes=sum(int(r["out_bytes"]) for r in results),
        syntaxes=syntaxes,
        loadavg=round(load, 2),
        cpu_s={"encoder": round(sum(float(r.get("cpu_s", 0.0)) for r in results), 2)},
    )


def inner_rules(src_dir: Path, out: Path, reps: int = 5) -> int:
    """In the forwarder's venv: what the rules add per file where the enqueuer pays it: the
    header walk reading the rules' attributes, and ``Router.route``; best of ``reps``."""
    from forwarder.dicomfile import inspect as read_header
    from forwarder.routing import Router

    router = Router.build([("bench", RULE_MATCH, RULE_EXCLUDE)])
    files = corpus_mod.dicom_files(src_dir)
    rels = [f.relative_to(src_dir).as_posix() for f in files]
    plain_s, rules_s = [], []
    for _ in range(reps):
        t = time.perf_counter()
        for f in files:
            read_header(f)
        plain_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        for f, rel in zip(files, rels, strict=True):
            info = read_header(f, attributes=router.tags)
            if not router.route(info.attributes, rel).destinations:
                raise SystemExit(f"{f}: the rules do not match it")
        rules_s.append(time.perf_counter() - t)
    n = len(files)
    out.write_text(
        json.dumps(
            {
                "files": n,
                "inspect_us": 1e6 * min(plain_s) / n,
                "inspect_and_route_us": 1e6 * min(rules_s) / n,
            }
        )
    )
    return 0


def rules_micro(env: Env, directory: Path) -> dict[str, float]:
    """``inner_rules`` in the forwarder's venv on ``directory`` (page-cached)."""
    out = env.work_root / "rules-micro.json"
    proc = subprocess.run(
        [str(env.fwd_python), str(Path(__file__).resolve()), "--inner-rules",
         "--inner-src", str(directory), "--inner-out", str(out)],
        capture_output=True, text=True, timeout=300, check=False, cwd=env.work_root,
    )  # fmt: skip
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-300:]}  # type: ignore[dict-item]
    data: dict[str, float] = json.loads(out.read_text())
    data["added_us"] = data["inspect_and_route_us"] - data["inspect_us"]
    return data


def inner_encode(
    syntax: str, src_dir: Path, dst_dir: Path, out: Path, shard: str = "0/1", go: Path | None = None
) -> int:
    """In the forwarder's venv: time ``transform_file`` on every file (after one warm-up); with
    ``shard`` ``i/n`` on files i, i+n, ...; with ``go``, the loop starts when that file exists
    (after writing ``out`` + ".ready"), so that n shards run at the same time."""
    from forwarder.transform import transform_file
    from forwarder.transformspec import TransformSpec

    spec = TransformSpec(transfer_syntax=syntax)
    secret = bytes(32)
    files = corpus_mod.dicom_files(src_dir)
    # as the pool calls it (transformpool._prepare: no fsync, a lost copy is made again)
    kwargs = {"durable": False} if "durable" in inspect.signature(transform_file).parameters else {}
    index, count = (int(v) for v in shard.split("/"))
    warm = dst_dir / f"warmup{index}.dcm"
    transform_file(files[-1], warm, spec, secret, **kwargs)  # imports, codecs
    warm.unlink()
    files = files[index::count]
    if go is not None:
        Path(f"{out}.ready").touch()
        deadline = time.monotonic() + 120
        while not go.exists():
            if time.monotonic() > deadline:
                raise SystemExit("no go signal within 120 s")
            time.sleep(0.001)
    started = time.time()
    syntaxes: dict[str, int] = {}
    out_bytes = 0
    spent = 0.0
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    for i, src in enumerate(files):
        dst = dst_dir / f"{index}-{i}.dcm"
        t = time.perf_counter()
        done = transform_file(src, dst, spec, secret, **kwargs)
        spent += time.perf_counter() - t
        syntaxes[str(done.transfer_syntax)] = syntaxes.get(str(done.transfer_syntax), 0) + 1
        out_bytes += dst.stat().st_size
        dst.unlink()
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    out.write_text(
        json.dumps(
            {
                "files": len(files),
                "transform_s": spent,
                "loop_s": wall,
                "started": started,
                "ended": time.time(),
                "cpu_s": cpu,
                "kwargs": kwargs,
                "out_bytes": out_bytes,
                "syntaxes": syntaxes,
            }
        )
    )
    return 0


# --------------------------------------------------------------------------------------------
# phases


def ct_corpus(name: str, corpus_dir: Path) -> Path:
    """``ct`` from corpus.py, or ``ctphantom`` from phantom.py."""
    if name == "ctphantom":
        return phantom.generate(corpus_dir)
    return corpus_mod.generate(corpus_mod.SPECS[name], corpus_dir)


def workload(mode: str, label: str, directory: Path, env: dict[str, str]) -> bs.Workload:
    paths = corpus_mod.dicom_files(directory)
    bs.warm_page_cache(paths)
    return bs.Workload(
        mode, label, directory, len(paths), sum(p.stat().st_size for p in paths), env
    )


Entry = tuple[str, Callable[[int], XRun]]


def rotate(
    env: Env, label: str, entries: Sequence[Entry], rounds: int, runs: list[XRun], check: bool
) -> None:
    """``rounds`` rounds of every entry, the first one rotating each round."""
    for rnd in range(1, rounds + 1):
        shift = (rnd - 1) % len(entries)
        for name, run in [*entries[shift:], *entries[:shift]]:
            if check:
                env.ctx.check_quiet(f"{label} round {rnd}")
            t_run = time.monotonic()
            r = run(rnd)
            runs.append(r)
            env.ctx.note_overlap(f"{label} round {rnd} {name}", t_run)
            status = "ok" if r.ok else f"FAILED ({r.reason})"
            ratio = f" {r.bytes / r.out_bytes:5.2f}:1" if r.out_bytes and r.syntaxes else ""
            if r.cpu_s and r.files:
                ratio += " cpu ms/file " + _cpu({k: 1000 * v / r.files for k, v in r.cpu_s.items()})
            print(
                f"  [{label} round {rnd}] {r.sender:<52} {r.wall_s:7.2f} s "
                f"{r.inst_per_s:8.1f} inst/s{ratio} load {r.loadavg:.2f}  {status}",
                file=sys.stderr,
            )


def loopback_phases(
    args: argparse.Namespace, env: Env, dirs: dict[str, Path], runs: list[XRun]
) -> None:
    mode_env = bs.mode_env("tuned")
    warm_dir = env.work_root / "warmup"
    if "rules" in args.phases or "setremove" in args.phases:
        for corpus in ("small", "ct"):
            if corpus == "ct" and "rules" not in args.phases:
                continue
            work = workload("tuned", corpus, dirs[corpus], mode_env)
            sources = uid_index(dirs[corpus])
            warm = warm_dir / f"{corpus}.dcm"
            make_warmup(corpus_mod.dicom_files(dirs[corpus])[0], warm)
            setups = [plain()]
            if "rules" in args.phases:
                setups.append(rules())
            if corpus == "small" and "setremove" in args.phases:
                setups.append(setremove())
            entries: list[Entry] = [
                (
                    s.key,
                    lambda rnd, s=s, work=work, warm=warm, sources=sources: daemon_run(
                        env, work, s, rnd, warm, sources
                    ),
                )
                for s in setups
            ]
            rotate(env, f"{corpus}", entries, args.rules_rounds, runs, True)
            if "rules" in args.phases:
                micro = rules_micro(env, dirs[corpus])
                env.micro[corpus] = micro
                print(f"  [{corpus}] rules in-process: {micro}", file=sys.stderr)
    if "compress" in args.phases:
        for name in args.ct_corpora:
            directory = corpus_mod.subset(dirs[name], args.ct_files)
            work = workload("tuned", f"{name}{args.ct_files}", directory, mode_env)
            sources = uid_index(directory)
            warm = warm_dir / f"{name}-compress.dcm"
            make_warmup(corpus_mod.dicom_files(dirs[name])[-1], warm)
            entries = [
                (
                    "plain",
                    lambda rnd, w=work, m=warm, u=sources: daemon_run(env, w, plain(), rnd, m, u),
                )
            ]
            for syntax in args.syntaxes:
                s = compressing(syntax, args.workers)
                entries.append(
                    (
                        f"encoder-{syntax}",
                        lambda rnd, syntax=syntax, w=work: encoder_run(env, w, syntax, rnd),
                    )
                )
                if args.workers > 1:
                    entries.append(
                        (
                            f"encoder-{syntax}-x{args.workers}",
                            lambda rnd, syntax=syntax, w=work: encoder_run(
                                env, w, syntax, rnd, args.workers
                            ),
                        )
                    )
                entries.append(
                    (
                        s.key,
                        lambda rnd, s=s, w=work, m=warm, u=sources: daemon_run(
                            env, w, s, rnd, m, u
                        ),
                    )
                )
            rotate(env, work.corpus, entries, args.rounds, runs, True)


# --------------------------------------------------------------------------------------------
# WAN: HTB cap + NFQUEUE delay in a network namespace


def set_htb(ns: bw.Namespace, rate: str) -> None:
    """Cap the namespace's loopback at ``rate`` (both directions share it: one device)."""
    ns.run(["tc", "qdisc", "replace", "dev", "lo", "root", "handle", "1:", "htb", "default", "1"])
    ns.run(
        ["tc", "class", "add", "dev", "lo", "parent", "1:", "classid", "1:1", "htb",
         "rate", rate, "ceil", rate]
    )  # fmt: skip


def bandwidth_probe(megabytes: int = 24) -> dict[str, float]:
    """One TCP bulk transfer over the namespace's loopback: Mbit/s the receiver saw."""
    payload = b"\0" * (1 << 20)
    with socket.socket() as srv:
        srv.bind((bs.HOST, 0))
        srv.listen(1)
        srv.settimeout(30)
        got: dict[str, float] = {}

        def serve() -> None:
            with contextlib.suppress(OSError):
                conn, _ = srv.accept()
                with conn:
                    n = 0
                    t_first = None
                    while data := conn.recv(1 << 20):
                        if t_first is None:
                            t_first = time.perf_counter()
                        n += len(data)
                    got["bytes"] = n
                    got["s"] = time.perf_counter() - (t_first or time.perf_counter())

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        t0 = time.perf_counter()
        with socket.create_connection(srv.getsockname(), timeout=30) as cli:
            for _ in range(megabytes):
                cli.sendall(payload)
        thread.join(60)
        total = time.perf_counter() - t0
    mbit = got.get("bytes", 0) * 8 / 1e6 / got["s"] if got.get("s") else 0.0
    return {"megabytes": megabytes, "seconds": round(total, 2), "mbit_s": round(mbit, 1)}


def run_inner_wan(args: argparse.Namespace) -> int:
    """Inside the namespace: probe RTT and bandwidth, rotate keep / compressed daemon runs."""
    signal.signal(signal.SIGTERM, bw._raise_interrupt)
    out: dict[str, Any] = {"runs": [], "disturbed": []}
    out["net"] = bw.echo_probe()
    out["bandwidth"] = bandwidth_probe()
    print(
        f"[wan] RTT {out['net']['rtt_ms_median']} ms, {out['bandwidth']['mbit_s']} Mbit/s "
        f"(bulk TCP), congestion control {out['net']['cc_client']}",
        file=sys.stderr,
    )
    if out["net"]["rtt_ms_median"] < 0.8 * args.wan_rtt:
        raise bs.BenchError(f"measured RTT {out['net']['rtt_ms_median']} ms: delay not in effect")
    logs: Path = args.inner_logs
    plan = bs.Plan(1, [], ["tuned"], {}, args.timeout, False, [], logs)
    mode_env = bs.mode_env("tuned")
    out_dir = Path(tempfile.mkdtemp(prefix="bench-transform-wan-", dir="/dev/shm"))
    receiver = Receiver("wan", mode_env, out_dir, logs / "storescp-wan.log")
    work_root = Path(tempfile.mkdtemp(prefix="bench-transform-wan-", dir=args.work_dir))
    monitor = bd.Monitor()
    monitor.start()
    runs: list[XRun] = []
    try:
        receiver.start()
        for name in args.ct_corpora:
            full = ct_corpus(name, args.corpus_dir)
            directory = corpus_mod.subset(full, args.ct_files)
            work = workload("wan", f"{name}{args.ct_files}", directory, mode_env)
            ctx = bd.Ctx(
                plan,
                bd.forwarder_exe(args.forwarder_venv),
                work_root,
                bd._same_fs(directory, work_root),
                0.0,
                0.0,
                0.0,
                monitor,
            )
            env = Env(ctx, receiver, args.forwarder_venv / "bin" / "python", work_root)
            sources = uid_index(directory)
            warm = work_root / f"warmup-{name}.dcm"
            make_warmup(corpus_mod.dicom_files(full)[-1], warm)
            setups = [plain(), *(compressing(s, args.workers) for s in args.wan_syntaxes)]
            entries: list[Entry] = [
                (
                    s.key,
                    lambda rnd, s=s, e=env, w=work, m=warm, u=sources: daemon_run(
                        e, w, s, rnd, m, u
                    ),
                )
                for s in setups
            ]
            rotate(env, f"wan {work.corpus}", entries, args.wan_rounds, runs, False)
            out["disturbed"] += ctx.disturbed
    finally:
        monitor.halt.set()
        receiver.stop()
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.rmtree(work_root, ignore_errors=True)
        out["runs"] = [asdict(r) | {"inst_per_s": r.inst_per_s} for r in runs]
        args.inner_out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


def wan_phase(
    args: argparse.Namespace, raw_argv: list[str], logs: Path, meta: dict[str, Any]
) -> list[dict[str, Any]]:
    """Set up the namespace (HTB + delay + CUBIC), run the child in it, tear down."""
    reason = bw.skip_reason() or (None if shutil.which("tc") else "`tc` not found (iproute2)")
    if reason:
        meta["wan"] = {"skipped": reason}
        print(f"[wan] SKIPPED: {reason}", file=sys.stderr)
        return []
    try:
        exe = bw.compile_nfqdelay(args.results)
    except bw.Skip as exc:
        meta["wan"] = {"skipped": str(exc)}
        return []
    ns = bw.Namespace(f"fwdxf-{os.getpid()}", logs)
    bw._CLEANUPS.append(ns.teardown)
    atexit.register(bw._run_cleanups)
    info: dict[str, Any] = {
        "rate": args.wan_rate,
        "rtt_ms": args.wan_rtt,
        "delay": "NFQUEUE delayer (bench/nfqdelay.c), D = RTT/2 on every TCP packet",
        "cap": f"HTB {args.wan_rate} on the namespace's lo (one class, both directions)",
    }
    meta["wan"] = info
    inner_out = logs / "inner-wan.json"
    child: subprocess.Popen[bytes] | None = None
    try:
        ns.create()
        try:
            ns.set_congestion_control("cubic")
            info["cc"] = "cubic"
        except bs.BenchError as exc:
            info["cc"] = f"kernel default ({exc})"
        ns.probe_nfqueue()
        set_htb(ns, args.wan_rate)
        ns.start_delay(exe, args.wan_rtt * 500)
        cmd = ns.exec_argv(
            [sys.executable, str(Path(__file__).resolve()), *raw_argv, "--inner-wan",
             "--inner-out", str(inner_out), "--inner-logs", str(logs)]
        )  # fmt: skip
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
        per_run = (1 + len(args.wan_syntaxes)) * args.wan_rounds
        try:
            rc = child.wait(timeout=per_run * (args.timeout + 90) + 120)
        except subprocess.TimeoutExpired:
            rc = None
        info["child_rc"] = rc
        info["nfqdelay_alive_at_end"] = ns.delay_alive()
    finally:
        if child is not None:
            bw._stop_child(child)
        bw._run_cleanups()
    try:
        inner = json.loads(inner_out.read_text())
    except (OSError, ValueError):
        info["error"] = "the child wrote no results"
        return []
    info["net"] = inner.get("net")
    info["bandwidth"] = inner.get("bandwidth")
    info["disturbed"] = inner.get("disturbed")
    runs: list[dict[str, Any]] = inner.get("runs", [])
    return runs


# --------------------------------------------------------------------------------------------
# report


@dataclass
class Cell:
    corpus: str
    setup: str
    name: str
    kind: str
    files: int
    ok_runs: int
    runs: int
    median_s: float | None
    inst_per_s: float | None
    ratio: float | None  # source bytes / stored or written bytes
    syntaxes: dict[str, int]
    first_file_s: float | None
    peak_rss_mb: float | None
    failures: list[str]
    walls: list[float]
    cpu_ms: dict[str, float]  # median CPU ms per file, by part (see cpu_between)


def cells_of(runs: list[dict[str, Any]]) -> list[Cell]:
    keys = list(dict.fromkeys((r["corpus"], r["setup"]) for r in runs))
    out = []
    for corpus, setup in keys:
        group = [r for r in runs if (r["corpus"], r["setup"]) == (corpus, setup)]
        good = [r for r in group if r["ok"]]
        wall = statistics.median(r["wall_s"] for r in good) if good else None
        files = int(group[0]["files"])
        ratios = [r["bytes"] / r["out_bytes"] for r in good if r["out_bytes"]]
        firsts = [r["first_file_s"] for r in good if r.get("first_file_s") is not None]
        seen: dict[str, int] = {}
        for r in good:
            for k, v in r["syntaxes"].items():
                seen[k] = seen.get(k, 0) + v
        rss = [r["peak_rss_mb"] for r in good if r["peak_rss_mb"] is not None]
        parts = list(dict.fromkeys(k for r in good for k in r.get("cpu_s", {})))
        cpu_ms = {
            k: statistics.median(1000 * r["cpu_s"][k] / files for r in good if k in r["cpu_s"])
            for k in parts
        }
        out.append(
            Cell(
                corpus,
                setup,
                group[0]["sender"],
                group[0]["kind"],
                files,
                len(good),
                len(group),
                wall,
                files / wall if wall else None,
                statistics.median(ratios) if ratios else None,
                seen,
                statistics.median(firsts) if firsts else None,
                max(rss) if rss else None,
                [f"round {r['round']}: {r['reason']}" for r in group if not r["ok"]],
                [round(r["wall_s"], 3) for r in good],
                cpu_ms,
            )
        )
    return out


def paired_ratio(runs: list[dict[str, Any]], corpus: str, setup: str, base: str) -> float | None:
    """Median over rounds of (setup's inst/s / base's inst/s in the same round)."""
    by = {(r["setup"], r["round"]): r for r in runs if r["corpus"] == corpus and r["ok"]}
    ratios = [
        by[(base, rnd)]["wall_s"] / by[(setup, rnd)]["wall_s"]
        for (s, rnd) in by
        if s == setup and (base, rnd) in by and by[(setup, rnd)]["wall_s"] > 0
    ]
    return statistics.median(ratios) if ratios else None


def _f(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"


def _cpu(ms: dict[str, float]) -> str:
    """``daemon 1.2 + pool 20.1 + receiver 0.4 (rest 3.0)`` or ``encoder 20.0``."""
    own = [f"{k} {v:.1f}" for k, v in ms.items() if k not in ("other", "machine")]
    return " + ".join(own) + (f" (rest {ms['other']:.1f})" if "other" in ms else "")


def _syntax_names(seen: dict[str, int]) -> str:
    names = {v: k for k, v in SYNTAX_UIDS.items() if v}
    return ", ".join(f"{names.get(k, k)} x{n}" for k, n in seen.items())


def markdown(
    cells: list[Cell], runs: list[dict[str, Any]], meta: dict[str, Any], workers: int
) -> str:
    lines = [
        f"# Routing and transforms benchmark, {meta['started']}",
        "",
        f"Forwarder measured: {meta['forwarder']}; bench at {meta['bench_git']}; "
        f"{meta['cpus']} CPUs; took {meta['duration_s']} s. Receiver `{meta['receiver']}` "
        "(TCP_NODELAY=1).",
        f"Load average: start {meta['loadavg_start'][0]:.2f}, end {meta['loadavg_end'][0]:.2f}; "
        f"before the runs: median {meta['load_median']:.2f}, max {meta['load_max']:.2f}. "
        f"CPU busy in the 0.3 s before a run: median {meta['busy_median']:.0%}, max "
        f"{meta['busy_max']:.0%}. Runs during which a pytest ran: "
        + (", ".join(meta["disturbed"]) or "none")
        + ".",
    ]
    targets: list[str] = []

    def cell(corpus: str, setup: str) -> Cell | None:
        return next((c for c in cells if (c.corpus, c.setup) == (corpus, setup)), None)

    def table(title: str, group: list[Cell], base: Cell | None, note: str = "") -> None:
        lines.extend(["", f"## {title}", ""])
        if note:
            lines.extend([note, ""])
        lines.extend([
            "| run | inst/s | median s | ÷ baseline (medians) | ÷ baseline (paired rounds) | "
            "stored bytes ratio | received syntax | CPU ms per file | first file s | "
            "peak RSS MB | ok runs |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ])  # fmt: skip
        for c in group:
            ratio = paired = ""
            if base and c is not base and base.inst_per_s and c.inst_per_s:
                ratio = f"{c.inst_per_s / base.inst_per_s:.2f}x"
                pr = paired_ratio(runs, c.corpus, c.setup, base.setup)
                paired = f"{pr:.2f}x" if pr else ""
            lines.append(
                f"| {c.name} | {_f(c.inst_per_s)} | {_f(c.median_s, 2)} | {ratio} | {paired} | "
                f"{_f(c.ratio, 2) + ':1' if c.ratio else ''} | {_syntax_names(c.syntaxes)} | "
                f"{_cpu(c.cpu_ms)} | {_f(c.first_file_s, 2)} | {_f(c.peak_rss_mb)} | "
                f"{c.ok_runs}/{c.runs} |"
            )
        lines.extend(f"- {c.name} FAILED {f}" for c in group for f in c.failures)

    def judge(label: str, value: float | None, target: float, failed: bool, what: str) -> None:
        if value is None:
            targets.append(f"- FAIL {label}: no successful run")
            return
        ok = value >= target and not failed
        targets.append(
            f"- {'PASS' if ok else 'FAIL'} {label}: {value:.2f}x {what} (target >= {target}x)"
            + (" with failed runs" if failed else "")
        )

    for corpus in ("small", "ct"):
        group = [c for c in cells if c.corpus == corpus]
        if not group:
            continue
        base = cell(corpus, "plain")
        table(f"Rules and set/remove, {corpus} corpus ({group[0].files} files)", group, base)
        micro = meta.get("rules_micro", {}).get(corpus)
        if micro and "added_us" in micro:
            own = base.cpu_ms.get("daemon") if base else None
            share = f" = {micro['added_us'] / 10 / own:.1f}% of" if own else ", against"
            lines.append(
                f"- Rules in-process (the enqueuer's part, forwarder venv, best of 5 over the "
                f"{micro['files']:.0f} files): header walk {micro['inspect_us']:.1f} us per file, "
                f"with the rules' attributes and `Router.route` {micro['inspect_and_route_us']:.1f}"
                f" us: +{micro['added_us']:.1f} us per file{share} the streaming daemon's "
                f"{_f(own, 2)} ms of CPU per file in this run."
            )
        for setup, target, label in (
            ("rules", RULES_RATIO, "rules cost"),
            ("setremove", SETREMOVE_RATIO, "set/remove"),
        ):
            c = cell(corpus, setup)
            if c and base:
                ratio = c.inst_per_s / base.inst_per_s if c.inst_per_s and base.inst_per_s else None
                judge(
                    f"{label}, {corpus}",
                    ratio,
                    target,
                    bool(c.failures or base.failures),
                    "the streaming path's inst/s (medians; paired: "
                    f"{_f(paired_ratio(runs, corpus, setup, 'plain'), 2)}x)",
                )
    for c0 in cells:
        if not c0.corpus.startswith("ct") or c0.corpus == "ct" or c0.setup != "plain":
            continue
        corpus = c0.corpus
        group = [c for c in cells if c.corpus == corpus]
        table(
            f"Compression, {group[0].files} files of {corpus}, [transform] workers = {workers}",
            group,
            c0,
            "Encoder rows: `transform_file` in a loop in one process (time inside the calls; "
            "output on the daemon's filesystem). Daemon rows: first rename -> receiver holds all. "
            "CPU ms per file: the daemon's main process, its transform pool (forkserver and "
            "workers), storescp with its forks, and the rest of the machine (other people's "
            "load, this benchmark's polling) during the timed burst.",
        )
        for syntax in SYNTAX_UIDS:
            enc, dae = cell(corpus, f"encoder-{syntax}"), cell(corpus, f"daemon-{syntax}")
            if not enc or not dae:
                continue
            if enc.inst_per_s and dae.inst_per_s:
                ideal = workers * enc.inst_per_s
                lines.append(
                    f"- {syntax}: single process {enc.inst_per_s:.1f} inst/s "
                    f"({1000 / enc.inst_per_s:.1f} ms per file), {workers} x that = {ideal:.1f}; "
                    f"daemon {dae.inst_per_s:.1f} inst/s = {dae.inst_per_s / ideal:.2f}x; "
                    f"compression {_f(enc.ratio, 2)}:1 (bytes in / bytes out)"
                )
                par = cell(corpus, f"encoder-{syntax}-x{workers}")
                if par and par.inst_per_s:
                    lines.append(
                        f"  - {workers} encoder processes side by side (no daemon): "
                        f"{par.inst_per_s:.1f} inst/s = {par.inst_per_s / ideal:.2f}x {workers} x "
                        f"the single rate: what this machine gives {workers} CPU-bound processes; "
                        f"the daemon makes {dae.inst_per_s / par.inst_per_s:.2f}x that"
                    )
                own = sum(v for k, v in dae.cpu_ms.items() if k in ("daemon", "pool", "receiver"))
                if own and "pool" in dae.cpu_ms and "encoder" in enc.cpu_ms:
                    cores = meta["cpus"] or 1
                    lines.append(
                        f"  - CPU per file: pool {dae.cpu_ms['pool']:.1f} ms against "
                        f"{enc.cpu_ms['encoder']:.1f} ms in one process "
                        f"({dae.cpu_ms['pool'] / enc.cpu_ms['encoder']:.2f}x); daemon + pool + "
                        f"receiver {own:.1f} ms, so {cores} idle CPUs could do at most "
                        f"{cores * 1000 / own:.0f} inst/s ({cores * 1000 / own / ideal:.2f}x the "
                        f"target's {ideal:.0f}); the rest of the machine took "
                        f"{dae.cpu_ms.get('other', 0):.1f} ms per file meanwhile"
                    )
            judge(
                f"compression {syntax} pool, {corpus}",
                dae.inst_per_s / (workers * enc.inst_per_s)
                if enc.inst_per_s and dae.inst_per_s
                else None,
                POOL_RATIO,
                bool(enc.failures or dae.failures),
                f"({workers} x the single-process encoder rate)",
            )
    w = meta.get("wan", {})
    net, bw_ = w.get("net") or {}, w.get("bandwidth") or {}
    for corpus in dict.fromkeys(c.corpus for c in cells if c.corpus.startswith("wan-")):
        wan = [c for c in cells if c.corpus == corpus]
        base = next((c for c in wan if c.setup == "plain"), None)
        table(
            f"WAN: {w.get('cap')}, RTT {w.get('rtt_ms')} ms, {wan[0].files} files of "
            f"{corpus.removeprefix('wan-')}",
            wan,
            base,
            f"Measured: RTT {net.get('rtt_ms_median')} ms (TCP echo, min {net.get('rtt_ms_min')}),"
            f" bulk TCP {bw_.get('mbit_s')} Mbit/s ({bw_.get('megabytes')} MB), congestion "
            f"control {net.get('cc_client')}/{net.get('cc_server')} ({w.get('delay')}).",
        )
        for c in wan:
            if c.setup.startswith("daemon-") and base:
                judge(
                    f"WAN {corpus.removeprefix('wan-')} {c.setup.removeprefix('daemon-')} vs keep",
                    c.inst_per_s / base.inst_per_s if c.inst_per_s and base.inst_per_s else None,
                    WAN_RATIO,
                    bool(c.failures or base.failures),
                    "as fast as sending the files as they are",
                )
    if meta.get("wan", {}).get("skipped"):
        lines += ["", f"WAN phase skipped: {meta['wan']['skipped']}"]
    lines += ["", "## Targets", "", *targets]
    problems = [
        f"- {r['corpus']} round {r['round']} {r['sender']}: {ln}"
        for r in runs
        for ln in r.get("log_lines", [])[:5]
    ]
    lines += ["", "## Warnings and errors the daemons logged", ""]
    lines += problems or ["None."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--phases", type=bs.parse_list(PHASES), default=list(PHASES))
    p.add_argument("--rounds", type=int, default=3, help="rounds of the compress phase (3)")
    p.add_argument(
        "--rules-rounds", type=int, default=5, help="rounds of the rules/setremove phase (5)"
    )
    p.add_argument("--wan-rounds", type=int, default=3, help="rounds of the WAN phase (3)")
    p.add_argument("--ct-files", type=int, default=300, help="CT files for compress and wan")
    p.add_argument(
        "--ct-corpora",
        type=bs.parse_list(["ct", "ctphantom"]),
        default=["ct", "ctphantom"],
        help="CT corpora of compress and wan: ct (corpus.py), ctphantom (phantom.py)",
    )
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="[transform] workers (CPUs)"
    )
    p.add_argument(
        "--syntaxes",
        type=bs.parse_list(["jpeg-ls-lossless", "jpeg2000-lossless", "rle", "explicit-le"]),
        default=["jpeg-ls-lossless", "jpeg2000-lossless"],
    )
    p.add_argument(
        "--wan-syntaxes",
        type=bs.parse_list(["jpeg-ls-lossless", "jpeg2000-lossless", "rle"]),
        default=["jpeg-ls-lossless"],
    )
    p.add_argument("--wan-rate", default="100mbit", help="HTB rate (100mbit)")
    p.add_argument("--wan-rtt", type=int, default=20, help="ms (20)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-run timeout, s")
    p.add_argument("--quiet-timeout", type=float, default=300.0)
    p.add_argument("--quiet-gap", type=float, default=10.0)
    p.add_argument("--busy-wait", type=float, default=30.0)
    p.add_argument("--forwarder-venv", type=Path, default=bs.REPO / ".venv")
    p.add_argument("--corpus-dir", type=Path, default=bs.BENCH_DIR / "corpus")
    p.add_argument("--results", type=Path, default=bs.BENCH_DIR / "results")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()))
    p.add_argument("--inner-wan", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--inner-encode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--inner-rules", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--inner-src", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--inner-dst", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--inner-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--inner-shard", default="0/1", help=argparse.SUPPRESS)
    p.add_argument("--inner-go", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--inner-logs", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(raw_argv)
    signal.signal(signal.SIGTERM, bw._raise_interrupt)  # stop receivers and daemons first
    if args.inner_rules:
        return inner_rules(args.inner_src, args.inner_out)
    if args.inner_encode:
        return inner_encode(
            args.inner_encode,
            args.inner_src,
            args.inner_dst,
            args.inner_out,
            args.inner_shard,
            args.inner_go,
        )
    if args.inner_wan:
        try:
            return run_inner_wan(args)
        except bs.BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
    if not shutil.which("storescp"):
        print("error: storescp not found (apt-get install dcmtk)", file=sys.stderr)
        return 2
    try:
        exe = bd.forwarder_exe(args.forwarder_venv)
    except bs.BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dirs = {n: ct_corpus(n, args.corpus_dir) for n in ("ct", "small", *args.ct_corpora)}
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.results.mkdir(parents=True, exist_ok=True)
    logs = args.results / f"transform-{stamp}-logs"
    logs.mkdir()
    meta: dict[str, Any] = {
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "forwarder": bw.forwarder_identity(args.forwarder_venv),
        "bench_git": bs.version_of(["git", "-C", str(bs.REPO), "rev-parse", "--short", "HEAD"]),
        "receiver": f"storescp --fork +xa -pdu {bs.PDU} +B -od <tmpfs>",
        "storescp": bs.version_of(["storescp", "--version"]),
        "workers": args.workers,
        "args": {k: str(v) for k, v in vars(args).items()},
        "rule_lines": RULE_LINES,
        "setremove_lines": SETREMOVE_LINES,
    }
    runs: list[dict[str, Any]] = []
    xruns: list[XRun] = []
    status = 0
    started = time.monotonic()
    plan = bs.Plan(1, [], ["tuned"], {}, args.timeout, False, [], logs)
    monitor = bd.Monitor()
    monitor.start()
    disturbed: list[str] = []
    loopback = [p for p in args.phases if p != "wan"]
    try:
        if loopback:
            with bd._work_root(args.work_dir) as work_root:
                ctx = bd.Ctx(
                    plan,
                    exe,
                    work_root,
                    all(bd._same_fs(d, work_root) for d in dirs.values()),
                    args.quiet_timeout,
                    args.quiet_gap,
                    args.busy_wait,
                    monitor,
                )
                out_dir = Path(tempfile.mkdtemp(prefix="bench-transform-", dir="/dev/shm"))
                receiver = Receiver("tuned", bs.mode_env("tuned"), out_dir, logs / "storescp.log")
                env = Env(ctx, receiver, args.forwarder_venv / "bin" / "python", work_root)
                try:
                    receiver.start()
                    loopback_phases(args, env, dirs, xruns)
                finally:
                    receiver.stop()
                    shutil.rmtree(out_dir, ignore_errors=True)
                    disturbed += ctx.disturbed
                    meta["quiet_checks"] = ctx.quiet
                    meta["rules_micro"] = env.micro
        runs += [asdict(r) | {"inst_per_s": r.inst_per_s} for r in xruns]
        xruns = []
        if "wan" in args.phases:
            wan_runs = wan_phase(args, raw_argv, logs, meta)
            for r in wan_runs:
                r["corpus"] = f"wan-{r['corpus']}"
            runs += wan_runs
            disturbed += meta.get("wan", {}).get("disturbed") or []
    except KeyboardInterrupt:
        print("interrupted: reporting what was measured", file=sys.stderr)
        status = 130
        runs += [asdict(r) | {"inst_per_s": r.inst_per_s} for r in xruns]
    except bs.BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = 2
    finally:
        monitor.halt.set()
    meta["duration_s"] = round(time.monotonic() - started, 1)
    meta["loadavg_end"] = os.getloadavg()
    loads = [r["loadavg"] for r in runs] or [0.0]
    busy = [r["background_busy"] for r in runs if r["background_busy"] == r["background_busy"]]
    meta["load_median"] = statistics.median(loads)
    meta["load_max"] = max(loads)
    meta["busy_median"] = statistics.median(busy) if busy else 0.0
    meta["busy_max"] = max(busy) if busy else 0.0
    meta["disturbed"] = disturbed
    cells = cells_of(runs)
    report = markdown(cells, runs, meta, args.workers)
    raw = {"meta": meta, "cells": [asdict(c) for c in cells], "runs": runs}
    (args.results / f"transform-{stamp}.json").write_text(json.dumps(raw, indent=2) + "\n")
    (args.results / f"transform-{stamp}.md").write_text(report)
    print(report)
    print(f"raw results: {args.results / f'transform-{stamp}.json'}", file=sys.stderr)
    if status:
        return status
    return 0 if runs and all(r["ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
