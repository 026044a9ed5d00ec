"""Benchmark ``forwarder send``'s start-up: exec -> its A-ASSOCIATE-RQ at the peer, and why.

A tiny TCP listener on 127.0.0.1 stands in for the peer: it timestamps the first bytes of each
connection (``time.monotonic``, the same clock in every process), checks that they start an
A-ASSOCIATE-RQ (PDU type 0x01), answers nothing and closes. ``forwarder send`` is spawned
``--runs`` times to send one small file to it, the timer starting just before the spawn; the
figure is the median of exec -> first byte (the sender then fails the association: expected).
Beside it, for scale: the same interpreter doing nothing (``python -c pass``) and importing
pydicom and pynetdicom.

Then one more run under ``python -X importtime -m forwarder send ...``: a reader thread stamps
each line of the import log as it arrives, so the imports are split into those finished before
the first byte (on the critical path) and after it; the report lists the 15 largest cumulative
imports before the first byte and the top-level imports of each part (``-X importtime`` itself
slows imports down, so its figures are larger than the plain runs').

Output: stdout, ``bench/results/startup-<stamp>.md`` and ``.json`` (every sample, every import
line). Exit status 0, 2 on a setup error (no forwarder, the listener got nothing).

Usage: ``python bench/bench_startup.py [--runs 10] [--forwarder-venv DIR]``
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_send as bs
import corpus as corpus_mod
from bench_wan import forwarder_identity

FIRST_BYTE_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 60.0
A_ASSOCIATE_RQ = 0x01
TOP = 15


class FirstBytes:
    """Accepts connections on 127.0.0.1; for each, puts (monotonic time of the first bytes,
    the first byte) on ``arrivals`` and closes without answering."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((bs.HOST, 0))
        self.sock.listen(8)
        self.port = int(self.sock.getsockname()[1])
        self.arrivals: queue.Queue[tuple[float, int]] = queue.Queue()
        self.thread = threading.Thread(target=self._serve, name="first-bytes", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(FIRST_BYTE_TIMEOUT_S)
                with contextlib.suppress(OSError):
                    data = conn.recv(6)
                    if data:
                        self.arrivals.put((time.monotonic(), data[0]))

    def next_arrival(self, timeout: float = FIRST_BYTE_TIMEOUT_S) -> tuple[float, int] | None:
        try:
            return self.arrivals.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def _env() -> dict[str, str]:
    # a FORWARDER_* variable would change what the command does
    return {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}


@dataclass
class Sample:
    first_byte_s: float | None
    exit_s: float | None
    rc: int | None
    first_byte: int | None


def spawn_and_time(argv: Sequence[str], listener: FirstBytes, log: Path) -> Sample:
    """Spawn ``argv``; time exec -> first bytes at ``listener`` and exec -> exit (bounded)."""
    with log.open("ab") as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            list(argv),
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            got = listener.next_arrival()
            rc = proc.wait(timeout=EXIT_TIMEOUT_S)
            exit_s: float | None = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            bs.kill_group(proc.pid)
            proc.wait()
            rc, exit_s = None, None
    return Sample(
        first_byte_s=None if got is None else got[0] - t0,
        exit_s=exit_s,
        rc=rc,
        first_byte=None if got is None else got[1],
    )


def wall_of(argv: Sequence[str], runs: int) -> list[float]:
    """Spawn -> exit of ``argv``, ``runs`` times (for the interpreter baselines)."""
    out = []
    for _ in range(runs):
        t0 = time.monotonic()
        subprocess.run(list(argv), env=_env(), capture_output=True, timeout=60, check=True)
        out.append(time.monotonic() - t0)
    return out


@dataclass(frozen=True)
class Import:
    """One line of ``-X importtime``: times in microseconds; ``level`` 0 = top level."""

    name: str
    self_us: int
    cumulative_us: int
    level: int
    before_first_byte: bool


def parse_importtime(lines: Sequence[tuple[float, str]], first_byte_at: float) -> list[Import]:
    """Parse ``import time: self | cumulative | name`` lines (stamped when read)."""
    out = []
    for stamp, line in lines:
        if not line.startswith("import time:"):
            continue
        parts = line[len("import time:") :].split("|")
        if len(parts) != 3 or not parts[0].strip().isdigit():
            continue  # the header line
        raw = parts[2].rstrip("\n")
        indent = len(raw) - len(raw.lstrip(" "))
        out.append(
            Import(
                name=raw.strip(),
                self_us=int(parts[0]),
                cumulative_us=int(parts[1]),
                level=max(0, (indent - 1) // 2),
                before_first_byte=stamp <= first_byte_at,
            )
        )
    return out


def importtime_run(
    python: Path, target: list[str], listener: FirstBytes
) -> tuple[list[Import], float | None]:
    """``python -X importtime -m forwarder send ...`` against the listener; its imports, split
    by the time the first byte arrived, and that time (exec -> first byte, s)."""
    lines: list[tuple[float, str]] = []
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [str(python), "-X", "importtime", "-m", "forwarder", "send", *target],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append((time.monotonic(), line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    got = listener.next_arrival()
    try:
        proc.wait(timeout=EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        bs.kill_group(proc.pid)
        proc.wait()
    reader.join(10)
    at = got[0] if got else float("inf")
    return parse_importtime(lines, at), None if got is None else got[0] - t0


def outermost_by_package(imports: Sequence[Import]) -> list[Import]:
    """Per top-level package name, its import with the largest cumulative time (the outermost
    one), largest first; the ``forwarder`` modules and the interpreter's own are left out."""
    best: dict[str, Import] = {}
    for i in imports:
        root = i.name.split(".")[0]
        if root in ("forwarder", "site", "encodings", "_frozen_importlib_external"):
            continue
        if root not in best or i.cumulative_us > best[root].cumulative_us:
            best[root] = i
    return sorted(best.values(), key=lambda i: -i.cumulative_us)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.0f}"


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {
        "median_s": round(statistics.median(values), 4),
        "min_s": round(min(values), 4),
        "max_s": round(max(values), 4),
    }


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    fb = result["first_byte"]
    lines = [
        f"# forwarder send start-up, {meta['started']}",
        "",
        f"forwarder measured: {meta['forwarder']}; Python {meta['python']}; {meta['cpus']} CPUs; "
        f"load average at start {meta['loadavg_start'][0]:.2f}; took {meta['duration_s']} s.",
        f"Command: `{meta['command']}` (the listener closes after the first bytes; rc "
        f"{', '.join(map(str, meta['rcs']))} expected for a failed association).",
        "",
        f"| measure (median of {meta['runs']}, min-max) | ms |",
        "|---|---|",
        f"| forwarder send: exec -> A-ASSOCIATE-RQ at the peer | **{_ms(fb['median_s'])}** "
        f"({_ms(fb['min_s'])}-{_ms(fb['max_s'])}) |",
    ]
    for label, key in (
        ("forwarder send: exec -> exit (association refused by a close)", "exit"),
        ("python -c pass", "python"),
        ("python -c 'import pydicom'", "pydicom"),
        ("python -c 'import pynetdicom'", "pynetdicom"),
    ):
        s = result[key]
        lines.append(f"| {label} | {_ms(s['median_s'])} ({_ms(s['min_s'])}-{_ms(s['max_s'])}) |")
    imports = [Import(**i) for i in result["imports"]]
    before = [i for i in imports if i.before_first_byte]
    after = [i for i in imports if not i.before_first_byte]
    top_before = sum(i.cumulative_us for i in before if i.level == 0)
    top_after = sum(i.cumulative_us for i in after if i.level == 0)
    lines += [
        "",
        f"`-X importtime` run: first byte after {_ms(result['importtime_first_byte_s'])} ms; "
        f"{len(before)} modules imported before it ({top_before / 1000:.0f} ms cumulative at "
        f"top level), {len(after)} after it ({top_after / 1000:.0f} ms).",
        "",
        f"Largest {TOP} cumulative imports before the first byte:",
        "",
        "| module | level | cumulative ms | self ms |",
        "|---|---|---|---|",
    ]
    for i in sorted(before, key=lambda i: -i.cumulative_us)[:TOP]:
        lines.append(
            f"| {i.name} | {i.level} | {i.cumulative_us / 1000:.1f} | {i.self_us / 1000:.1f} |"
        )
    lines += [
        "",
        "By package (its outermost import, i.e. the package with everything it pulled in "
        "first; nested ones overlap: numpy inside pydicom):",
        "",
        "| package | imported by level | cumulative ms |",
        "|---|---|---|",
    ]
    for i in outermost_by_package(before)[:TOP]:
        lines.append(f"| {i.name.split('.')[0]} | {i.level} | {i.cumulative_us / 1000:.1f} |")
    tops = sorted((i for i in before if i.level == 0), key=lambda i: -i.cumulative_us)
    lines += [
        "",
        "Top-level imports before the first byte (cumulative ms): "
        + ", ".join(f"{i.name} {i.cumulative_us / 1000:.1f}" for i in tops[:TOP]),
    ]
    if after:
        late = sorted((i for i in after if i.level == 0), key=lambda i: -i.cumulative_us)
        lines.append(
            "Top-level imports after it: "
            + ", ".join(f"{i.name} {i.cumulative_us / 1000:.1f}" for i in late[:TOP])
        )
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--runs", type=int, default=10, help="timed runs of each command (10)")
    p.add_argument(
        "--forwarder-venv",
        type=Path,
        default=bs.REPO / ".venv",
        help="venv whose forwarder is measured (default: the repo's .venv)",
    )
    p.add_argument("--corpus-dir", type=Path, default=bs.BENCH_DIR / "corpus")
    p.add_argument("--results", type=Path, default=bs.BENCH_DIR / "results")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.runs < 1:
        print("error: --runs must be >= 1", file=sys.stderr)
        return 2
    python = args.forwarder_venv / "bin" / "python"
    exe = args.forwarder_venv / "bin" / "forwarder"
    if not exe.exists() or not python.exists():
        print(f"error: {exe} or {python} not found", file=sys.stderr)
        return 2
    small = corpus_mod.generate(corpus_mod.SPECS["small"], args.corpus_dir)
    one_file = corpus_mod.dicom_files(small)[0]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.results.mkdir(parents=True, exist_ok=True)
    log = args.results / f"startup-{stamp}.log"
    started_at = dt.datetime.now().isoformat(timespec="seconds")
    load = os.getloadavg()
    started = time.monotonic()
    listener = FirstBytes()
    target = ["-aec", bs.AE_SCP, bs.HOST, str(listener.port), str(one_file)]
    command = [str(exe), "send", *target]
    try:
        spawn_and_time(command, listener, log)  # untimed: page cache, .pyc files
        samples = [spawn_and_time(command, listener, log) for _ in range(args.runs)]
        bad = [s for s in samples if s.first_byte_s is None or s.first_byte != A_ASSOCIATE_RQ]
        if bad:
            print(f"error: {len(bad)} runs sent no A-ASSOCIATE-RQ; see {log}", file=sys.stderr)
            return 2
        baselines = {
            "python": wall_of([str(python), "-c", "pass"], args.runs),
            "pydicom": wall_of([str(python), "-c", "import pydicom"], args.runs),
            "pynetdicom": wall_of([str(python), "-c", "import pynetdicom"], args.runs),
        }
        imports, it_first = importtime_run(python, target, listener)
    finally:
        listener.close()
    exits = [s.exit_s for s in samples if s.exit_s is not None]
    result: dict[str, Any] = {
        "meta": {
            "started": started_at,
            "cpus": os.cpu_count(),
            "loadavg_start": load,
            "python": platform.python_version(),
            "forwarder": forwarder_identity(args.forwarder_venv),
            "runs": args.runs,
            "command": " ".join([exe.name, "send", "-aec", bs.AE_SCP, bs.HOST, "PORT", "FILE"]),
            "rcs": sorted({s.rc for s in samples}, key=str),
            "duration_s": round(time.monotonic() - started, 1),
        },
        "first_byte": _stats([s.first_byte_s for s in samples if s.first_byte_s is not None]),
        "exit": _stats(exits) if exits else {"median_s": None, "min_s": None, "max_s": None},
        **{k: _stats(v) for k, v in baselines.items()},
        "importtime_first_byte_s": it_first,
        "samples": [asdict(s) for s in samples],
        "imports": [asdict(i) for i in imports],
    }
    report = markdown(result)
    (args.results / f"startup-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / f"startup-{stamp}.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
