"""End-to-end tests of ``forwarder run``: the daemon as a real subprocess, real SCPs, real files.

Every test writes a config into its own tmp_path, starts ``python -m forwarder run`` with its
output in a log file, drops files into the inbox and asserts what the peer received and what
is left on disk. Nothing sleeps blindly: every wait is a condition with a deadline.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from conftest import SCP, StoreSCP, data_file, free_port, stores_per_association, wait_for
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from forwarder import outbox as outbox_module
from forwarder.dicomfile import inspect
from forwarder.outbox import Delivery, Outbox, State

ROOT = Path(__file__).resolve().parents[1]
EX_CONFIG = 78

# -- DICOM files --------------------------------------------------------------------------

_UID_ROOT = "1.2.826.0.1.3680043.10.999"


class Corpus:
    """Makes small DICOM files fast: one encoded template, a fixed-length UID patched in."""

    def __init__(self, pixel_bytes: int = 256) -> None:
        self._run = 10**8 + secrets.randbelow(9 * 10**8)  # 9 digits, no leading zero
        self._count = 0
        placeholder = self._uid(self._run, 0)
        ds = Dataset()
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = placeholder
        ds.StudyInstanceUID = f"{_UID_ROOT}.1.{self._run}"
        ds.SeriesInstanceUID = f"{_UID_ROOT}.2.{self._run}"
        ds.PatientName = "Forwarder^Test"
        ds.PatientID = "FWD-TEST"
        ds.Modality = "OT"
        rows = max(1, -(-pixel_bytes // 256))
        ds.Rows = rows
        ds.Columns = 256
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = bytes(range(256)) * rows
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = placeholder
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        self._template = buf.getvalue()
        self._placeholder = placeholder.encode("ascii")
        assert self._template.count(self._placeholder) == 2

    def _uid(self, run: int, n: int) -> str:
        return f"{_UID_ROOT}.{run}.{10**7 + n}"  # fixed length while n < 9 * 10**7

    def encode(self) -> tuple[str, bytes]:
        """A new instance: (SOP Instance UID, file bytes)."""
        self._count += 1
        uid = self._uid(self._run, self._count)
        return uid, self._template.replace(self._placeholder, uid.encode("ascii"))

    def write(self, path: Path) -> str:
        """Write a new instance to `path` in one go; return its SOP Instance UID."""
        uid, data = self.encode()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return uid

    def many(self, folder: Path, n: int, prefix: str = "img") -> dict[str, Path]:
        """Write `n` instances under `folder`; return SOP Instance UID -> path."""
        folder.mkdir(parents=True, exist_ok=True)
        out = {}
        for i in range(n):
            path = folder / f"{prefix}{i:05d}.dcm"
            out[self.write(path)] = path
        return out


def dataset_offset(data: bytes) -> int:
    """Where the data set starts in a Part 10 file: after the preamble, DICM and group 0002."""
    assert data[128:132] == b"DICM"
    assert data[132:136] == b"\x02\x00\x00\x00" and data[136:138] == b"UL"
    return 144 + int.from_bytes(data[140:144], "little")


@pytest.fixture
def corpus() -> Corpus:
    return Corpus()


# -- the daemon as a subprocess -------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table; keys quoted ("0008,0060" needs it)
        return (
            "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(data: Mapping[str, Any]) -> str:
    """Enough TOML for our configs: scalars, lists, tables and arrays of tables (one level)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict | list)]
    lines += [
        f"{k} = {_toml_value(v)}"
        for k, v in data.items()
        if isinstance(v, list) and k != "destinations"
    ]
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"\n[{key}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in value.items()]
    for dest in data.get("destinations", []):
        lines.append("\n[[destinations]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in dest.items()]
    return "\n".join(lines) + "\n"


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def dest(name: str, port: int, **kw: Any) -> dict[str, Any]:
    """A destination on loopback with short timeouts and one association ("auto", which the
    tests that want it ask for, may open more when a loaded machine slows the peer)."""
    return {
        "name": name,
        "host": "127.0.0.1",
        "port": port,
        "associations": 1,
        "connect_timeout": 2,
        "acse_timeout": 5,
        "dimse_timeout": 10,
        "network_timeout": 10,
        **kw,
    }


def _clean_env() -> dict[str, str]:
    """The test's environment without anything that would configure the daemon behind our back.

    Any FORWARDER_... variable of the caller would be read as a setting.
    """
    drop = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "LISTEN_FDS")
    return {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_") and k not in drop}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


class Forwarder:
    """One daemon's config, folders and log; started and stopped as a real subprocess."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.inbox = tmp / "inbox"
        self.quarantine = tmp / "quarantine"
        self.archive = tmp / "sent"
        self.outbox_path = tmp / "state" / "outbox.sqlite3"
        self.cfg = tmp / "forwarder.toml"
        self.log = tmp / "forwarder.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self._mark = 0
        self.config: dict[str, Any] = {}

    def configure(self, destinations: list[dict[str, Any]], **over: Any) -> Forwarder:
        """Write the config: test defaults (short settle, retry and heartbeat) plus `over`."""
        base: dict[str, Any] = {
            "shutdown_timeout": 10,
            "watch": {
                "paths": [str(self.inbox)],
                "settle_seconds": 0.2,
                "rescan_seconds": 30,
                "invalid_grace_seconds": 1,
            },
            "outbox": {"path": str(self.outbox_path), "lease_seconds": 60},
            "retry": {"initial_seconds": 0.2, "max_seconds": 1, "max_attempts": 20},
            "disposition": {"on_success": "delete", "archive_dir": str(self.archive)},
            "quarantine": {"dir": str(self.quarantine)},
            "sender": {"linger_seconds": 0.3, "batch_size": 64},
            "log": {"level": "info", "format": "text", "target": "stderr"},
            "health": {"heartbeat_seconds": 0.5},
            "destinations": destinations,
        }
        self.config = _merge(base, over)
        self.cfg.write_text(to_toml(self.config))
        return self

    # -- process control ------------------------------------------------------------------

    def start(
        self,
        env: Mapping[str, str] | None = None,
        *,
        wait: bool = True,
        config_from_env: bool = False,
    ) -> Forwarder:
        """Start the daemon (config by --config, or by $FORWARDER_CONFIG); wait until it watches."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self._mark = self.log.stat().st_size if self.log.exists() else 0
        argv = [sys.executable, "-m", "forwarder", "run"]
        extra_env = dict(env or {})
        if config_from_env:
            extra_env["FORWARDER_CONFIG"] = str(self.cfg)
        else:
            argv += ["--config", str(self.cfg)]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env={**_clean_env(), **extra_env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(self.proc)
        if wait:
            self.wait_log("watching", timeout=20)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait for the exit status (kill and fail at the deadline)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"the daemon ignored SIGTERM for {timeout} s\n{self.tail()}"
            ) from None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    # -- observing --------------------------------------------------------------------------

    def text(self, *, since_start: bool = False) -> str:
        data = self.log.read_bytes() if self.log.exists() else b""
        return data[self._mark if since_start else 0 :].decode("utf-8", "replace")

    def tail(self, n: int = 40) -> str:
        return "--- daemon log (tail) ---\n" + "\n".join(self.text().splitlines()[-n:])

    def wait(self, predicate: Callable[[], Any], timeout: float = 15, what: str = "") -> Any:
        """`wait_for` that fails early when the daemon died, and shows the log on failure."""

        def check() -> Any:
            value = predicate()
            if not value and self.proc is not None and self.proc.poll() is not None:
                rc = self.proc.returncode
                raise AssertionError(
                    f"daemon exited ({rc}) while waiting for {what}\n{self.tail()}"
                )
            return value

        try:
            return wait_for(check, timeout)
        except AssertionError as exc:
            if "daemon exited" in str(exc):
                raise
            raise AssertionError(
                f"{what or predicate} not within {timeout} s\n{self.tail()}"
            ) from None

    def wait_log(self, text: str, count: int = 1, timeout: float = 15) -> str:
        self.wait(lambda: self.text(since_start=True).count(text) >= count, timeout, repr(text))
        return self.text(since_start=True)

    def inbox_files(self) -> list[Path]:
        """Files in the inbox, but the daemon's lock file."""
        return sorted(
            p for p in self.inbox.rglob("*") if p.is_file() and p.name != ".forwarder.lock"
        )

    def quarantined(self) -> list[Path]:
        """Quarantined files (not their sidecars)."""
        if not self.quarantine.exists():
            return []
        return sorted(
            p for p in self.quarantine.rglob("*") if p.is_file() and not p.name.endswith(".json")
        )

    def deliveries(self) -> list[Delivery]:
        with Outbox(self.outbox_path, readonly=True) as ob:
            return ob.list(limit=100_000)

    def health(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "forwarder", "health", "--config", str(self.cfg)],
            cwd=ROOT,
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )


@pytest.fixture
def fwd(tmp_path: Path) -> Iterator[Forwarder]:
    """A daemon in tmp_path; whatever it started is killed at the end, whatever happened."""
    f = Forwarder(tmp_path)
    f.inbox.mkdir()
    try:
        yield f
    finally:
        f.cleanup()


def received(scp: SCP) -> Counter[str]:
    return Counter(scp.uids())


def once(uids: Any) -> Counter[str]:
    """Each UID exactly once (`uids`: an iterable of UIDs, or a dict keyed by them)."""
    return Counter(list(uids))


def has_all(scp: SCP, uids: Any) -> Callable[[], bool]:
    wanted = set(uids)
    return lambda: wanted <= set(scp.uids())


class Gate:
    """An SCP `on_store` hook that blocks stores until opened, or lets them through one by one.

    Bounded by `limit` seconds, so an SCP thread is never blocked forever.
    """

    def __init__(self, limit: float = 30) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()
        self.limit = limit
        self.count = 0  # stores that reached the gate
        self._lock = threading.Lock()
        self._passes = threading.Semaphore(0)

    def __call__(self, event: Any) -> int | None:
        with self._lock:
            self.count += 1
        self.entered.set()
        deadline = time.monotonic() + self.limit
        while not self.open.is_set() and time.monotonic() < deadline:
            if self._passes.acquire(timeout=0.02):
                break
        return None

    def let_one(self) -> None:
        """Let one blocked (or the next) store through."""
        self._passes.release()


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    try:
        yield g
    finally:
        g.open.set()  # never leave an SCP thread blocked behind a test


# -- delivery and disposition ---------------------------------------------------------------


def test_dropped_files_arrive_once_and_inbox_is_emptied(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    fwd.configure([dest("pacs", scp.port)]).start()
    sent = corpus.many(fwd.inbox, 10)
    sent |= corpus.many(fwd.inbox / "study1", 10)
    fwd.wait(has_all(scp, sent), what="all 20 instances at the peer")
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert received(scp) == once(sent)  # each exactly once
    assert fwd.stop() == 0
    assert not fwd.quarantined()
    assert {d.state for d in fwd.deliveries()} == {State.SENT}
    assert "sent: " in fwd.text()


def test_received_bytes_are_the_files_data_set(fwd: Forwarder, scp: SCP, corpus: Corpus) -> None:
    fwd.configure([dest("pacs", scp.port)]).start()
    path = fwd.inbox / "one.dcm"
    uid = corpus.write(path)
    data = path.read_bytes()
    fwd.wait(has_all(scp, [uid]))
    assert scp.received[0].encoded == data[dataset_offset(data) :]
    assert fwd.stop() == 0


def test_move_keeps_the_relative_path_under_archive_dir(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    fwd.configure([dest("pacs", scp.port)], disposition={"on_success": "move"}).start()
    sent = corpus.many(fwd.inbox / "p1" / "study", 5)
    originals = {uid: p.read_bytes() for uid, p in sent.items()}
    fwd.wait(has_all(scp, sent))
    moved = {p: fwd.archive / p.relative_to(fwd.inbox) for p in sent.values()}
    fwd.wait(lambda: all(t.exists() for t in moved.values()), what="files in the archive")
    assert not fwd.inbox_files()
    for uid, path in sent.items():
        assert moved[path].read_bytes() == originals[uid]
    assert fwd.stop() == 0
    # the outbox follows the file
    assert {d.path for d in fwd.deliveries()} == {str(t) for t in moved.values()}


def test_keep_leaves_files_and_does_not_resend_after_restart(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    fwd.configure([dest("pacs", scp.port)], disposition={"on_success": "keep"}).start()
    kept = corpus.many(fwd.inbox, 5)
    fwd.wait(has_all(scp, kept))
    assert fwd.stop() == 0
    assert sorted(kept.values()) == fwd.inbox_files()
    fwd.start()
    # a file dropped after the restart is examined after the ones found at start-up
    late = corpus.write(fwd.inbox / "late.dcm")
    fwd.wait(has_all(scp, [late]))
    assert fwd.stop() == 0
    assert received(scp) == Counter([*kept, late])
    assert len(fwd.inbox_files()) == 6


def test_two_watched_folders_move_under_their_own_relative_paths(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    second = fwd.tmp / "inbox2"
    fwd.configure(
        [dest("pacs", scp.port)],
        watch={"paths": [str(fwd.inbox), str(second)]},
        disposition={"on_success": "move"},
    ).start()
    one = corpus.many(fwd.inbox / "a", 3)
    two = corpus.many(second / "b", 3)
    fwd.wait(has_all(scp, [*one, *two]))
    fwd.wait(
        lambda: len([p for p in fwd.archive.rglob("*.dcm")]) == 6, what="6 files in the archive"
    )
    assert fwd.stop() == 0
    assert sorted(p.relative_to(fwd.archive) for p in fwd.archive.rglob("*.dcm")) == sorted(
        [*(Path("a") / p.name for p in one.values()), *(Path("b") / p.name for p in two.values())]
    )


def test_polling_mode_sends_dropped_files(fwd: Forwarder, scp: SCP, corpus: Corpus) -> None:
    fwd.configure(
        [dest("pacs", scp.port)], watch={"poll": True, "poll_interval_seconds": 0.2}
    ).start()
    assert "polling every 0.2 s" in fwd.text()
    sent = corpus.many(fwd.inbox / "nfs", 10)
    fwd.wait(has_all(scp, sent))
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0
    assert received(scp) == once(sent)


def test_two_associations_share_the_work_without_sending_twice(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    def slowish(event: Any) -> None:
        time.sleep(0.002)

    scp.on_store = slowish
    sent = corpus.many(fwd.inbox, 300)
    fwd.configure([dest("pacs", scp.port, associations=2)], sender={"batch_size": 16}).start()
    fwd.wait(has_all(scp, sent), timeout=30)
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0
    assert received(scp) == once(sent)
    assert scp.associations >= 2


def test_four_associations_finish_together(fwd: Forwarder, scp: SCP, corpus: Corpus) -> None:
    """Claims shrink as the backlog does: no association is left alone with a tail
    (batches of 64 left one association with most of a 300-file set)."""
    counts = stores_per_association(scp, 0.01)
    sent = corpus.many(fwd.inbox, 200)
    fwd.configure([dest("pacs", scp.port, associations=4)]).start()
    fwd.wait(has_all(scp, sent), timeout=60)
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0
    assert received(scp) == once(sent)
    assert len(counts) == 4
    assert max(counts.values()) <= 1.5 * min(counts.values()), counts


def test_auto_adds_associations_for_a_slow_peer(fwd: Forwarder, scp: SCP, corpus: Corpus) -> None:
    counts = stores_per_association(scp, 0.03)
    sent = corpus.many(fwd.inbox, 300)
    fwd.configure([dest("pacs", scp.port, associations="auto", max_associations=3)]).start()
    fwd.wait(has_all(scp, sent), timeout=60)
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0
    assert received(scp) == once(sent)
    assert len(counts) == 3, counts
    assert "associations: 3 (auto, settled: maximum reached)" in fwd.text()


def test_auto_settles_where_the_peer_refuses_more_without_pausing(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    """A peer rejecting a second association ("local limit exceeded") is not a failing
    destination: nothing is paused, no attempt is used, everything goes over one."""
    stores_per_association(scp, 0.02)
    scp.server.ae.maximum_associations = 1
    sent = corpus.many(fwd.inbox, 150)
    fwd.configure([dest("pacs", scp.port, associations="auto")]).start()
    fwd.wait(has_all(scp, sent), timeout=60)
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0
    assert received(scp) == once(sent)
    text = fwd.text()
    assert "association 2 not opened" in text and "local limit exceeded" in text
    assert "(auto, settled: the peer accepts 1)" in text
    assert "paused" not in text
    with Outbox(fwd.outbox_path, readonly=True) as ob:
        rows = ob.list(limit=1000)
    assert len(rows) == 150 and all(r.attempts == 1 for r in rows)


def test_a_peer_whose_limit_drops_after_auto_settled_is_not_paused(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    """Settled at 2 ("maximum reached"), the peer then takes only 1: whichever association
    it refuses, the destination is not paused (it was, 33 times in 6 s), auto settles at 1,
    and every file arrives once."""
    stores_per_association(scp, 0.03)
    first = corpus.many(fwd.inbox, 120, prefix="first")
    fwd.configure([dest("pacs", scp.port, associations="auto", max_associations=2)]).start()
    fwd.wait(has_all(scp, first), timeout=60)
    fwd.wait_log("associations: 2 (auto, settled: maximum reached)")
    scp.server.ae.maximum_associations = 1
    fwd.wait(lambda: not scp.server.active_associations, what="both associations released")
    later = corpus.many(fwd.inbox, 120, prefix="later")
    fwd.wait(has_all(scp, later), timeout=90)
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0
    assert received(scp) == once([*first, *later])
    text = fwd.text()
    assert "paused" not in text, text[-5000:]
    assert "(auto, settled: the peer accepts 1)" in text


def test_stopping_while_an_association_is_requested_pauses_nothing(
    fwd: Forwarder, silent_listener: int, corpus: Corpus
) -> None:
    """SIGTERM while the peer has not answered the A-ASSOCIATE-RQ: the cancelled request is
    not a failure of the destination (it was recorded as one, and read back at restart)."""
    fwd.configure([dest("pacs", silent_listener, acse_timeout=30)]).start()
    corpus.write(fwd.inbox / "a.dcm")
    fwd.wait_log("Requesting Association")
    assert fwd.stop() == 0
    assert "paused" not in fwd.text()
    with Outbox(fwd.outbox_path, readonly=True) as ob:
        info = ob.destination_info().get("pacs")
    assert info is None or (info.consecutive_failures == 0 and not info.paused_until)


def test_identical_file_dropped_again_is_not_resent_but_logged(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    fwd.configure([dest("pacs", scp.port)]).start()
    uid, data = corpus.encode()
    path = fwd.inbox / "a.dcm"
    stamp = (1_700_000_000_000_000_000, 1_700_000_000_000_000_000)
    path.write_bytes(data)
    os.utime(path, ns=stamp)
    fwd.wait(has_all(scp, [uid]))
    fwd.wait(lambda: not path.exists(), what="a.dcm deleted")
    path.write_bytes(data)  # the same bytes, size and mtime again (cp -p, rsync -t)
    os.utime(path, ns=stamp)
    fwd.wait_log("already delivered to every destination")
    fwd.wait(lambda: not path.exists(), what="a.dcm disposed of again")
    assert fwd.stop() == 0
    assert received(scp) == once([uid])


def test_storescp_peer_receives_every_file(
    fwd: Forwarder, storescp: StoreSCP, corpus: Corpus
) -> None:
    fwd.configure([dest("dcmtk", storescp.port)]).start()
    sent = corpus.many(fwd.inbox, 10)
    fwd.wait(lambda: len(storescp.files()) >= 10, what="10 files written by storescp")
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0
    assert len(storescp.files()) == 10
    got = set()
    for f in storescp.files():
        data = f.read_bytes()
        for uid in sent:
            if uid.encode() in data:
                got.add(uid)
    assert got == set(sent)


# Real files from pydicom's test data: every encoding the sender must cope with.
REAL_FILES = [
    "CT_small.dcm",  # explicit little endian
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "JPEG2000.dcm",
    "image_dfl.dcm",  # deflated
    "rtplan.dcm",
    "rtdose.dcm",
    "rtstruct.dcm",  # no preamble, no file meta
    "ExplVR_BigEndNoMeta.dcm",  # big endian, no file meta
]
# ... and files that are no storage instance
BAD_REAL_FILES = ["DICOMDIR", "MR_truncated.dcm", "README.txt"]


def drop_real_files(inbox: Path, names: list[str]) -> dict[str, tuple[str, str]]:
    """Copy test files into the inbox; return file name -> (SOP Instance UID, syntax)."""
    out = {}
    for name in names:
        src = data_file(name)
        target = inbox / "real" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(src.read_bytes())
        if name not in BAD_REAL_FILES:
            info = inspect(src)
            out[name] = (info.sop_instance_uid, info.transfer_syntax)
    return out


def test_real_files_arrive_in_their_own_syntax_and_bad_ones_are_quarantined(
    fwd: Forwarder, scp: SCP
) -> None:
    fwd.configure([dest("pacs", scp.port)]).start()
    good = drop_real_files(fwd.inbox, REAL_FILES)
    drop_real_files(fwd.inbox, BAD_REAL_FILES)
    fwd.wait(lambda: len(scp.received) >= len(good), timeout=20, what="every real file")
    fwd.wait(lambda: len(fwd.quarantined()) == 3, timeout=15, what="3 bad files quarantined")
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0
    with scp.lock:
        got = Counter((r.sop_instance_uid, r.transfer_syntax) for r in scp.received)
    assert got == Counter(good.values())
    assert sorted(p.name for p in fwd.quarantined()) == sorted(BAD_REAL_FILES)
    reasons = {
        n: json.loads((fwd.quarantine / "real" / f"{n}.json").read_text())["reason"]
        for n in BAD_REAL_FILES
    }
    assert "runs past the end" in reasons["MR_truncated.dcm"], reasons
    assert all(reasons.values()), reasons


def test_storescp_receives_real_files(fwd: Forwarder, storescp: StoreSCP) -> None:
    names = [
        "CT_small.dcm",
        "MR_small_bigendian.dcm",
        "JPEG2000.dcm",
        "image_dfl.dcm",
        "rtplan.dcm",
        "rtstruct.dcm",
        "ExplVR_BigEndNoMeta.dcm",
    ]  # distinct SOP Instance UIDs: storescp names its files by them
    fwd.configure([dest("dcmtk", storescp.port)]).start()
    good = drop_real_files(fwd.inbox, names)
    fwd.wait(lambda: not fwd.inbox_files(), timeout=20, what="an empty inbox")
    assert fwd.stop() == 0
    assert not fwd.quarantined()
    written = {inspect(f).sop_instance_uid for f in storescp.files()}
    assert written == {uid for uid, _ in good.values()}


# -- when is a file complete ------------------------------------------------------------------


def test_slow_writer_is_sent_once_and_complete(fwd: Forwarder, scp: SCP) -> None:
    corpus = Corpus(pixel_bytes=200_000)
    uid, data = corpus.encode()
    fwd.configure([dest("pacs", scp.port)]).start()
    path = fwd.inbox / "slow.dcm"
    pieces = 5
    step = len(data) // pieces + 1
    with open(path, "wb") as fp:  # kept open; pauses longer than settle_seconds
        for i in range(pieces):
            fp.write(data[i * step : (i + 1) * step])
            fp.flush()
            os.fsync(fp.fileno())
            time.sleep(0.45)  # the writer's pace, not a wait for the daemon
            assert not scp.received, "a partial file was sent"
    fwd.wait(has_all(scp, [uid]), what="the slow file at the peer")
    fwd.wait(lambda: not path.exists(), what="the slow file deleted")
    assert received(scp) == Counter([uid])
    assert scp.received[0].encoded == data[dataset_offset(data) :]
    assert fwd.stop() == 0
    assert not fwd.quarantined()


def test_write_then_rename_from_part(fwd: Forwarder, scp: SCP, corpus: Corpus) -> None:
    fwd.configure([dest("pacs", scp.port)]).start()
    uids = []
    for i in range(5):
        uid, data = corpus.encode()
        part = fwd.inbox / f"x{i}.dcm.part"
        part.write_bytes(data)
        part.rename(fwd.inbox / f"x{i}.dcm")
        uids.append(uid)
    # ignored names are never picked up, however long they stay
    ignored = [fwd.inbox / "never.dcm.part", fwd.inbox / ".hidden.dcm", fwd.inbox / "y.tmp"]
    ignored_uids = [corpus.write(p) for p in ignored]
    fwd.wait(has_all(scp, uids))
    late = corpus.write(fwd.inbox / "late.dcm")  # seen after the ignored ones were written
    fwd.wait(has_all(scp, [late]))
    fwd.wait(lambda: fwd.inbox_files() == sorted(ignored), what="only the ignored files left")
    assert fwd.stop() == 0
    assert received(scp) == once([*uids, late])
    assert not set(ignored_uids) & set(scp.uids())


def test_files_in_brand_new_nested_folders_all_arrive(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    fwd.configure([dest("pacs", scp.port)]).start()
    sent: dict[str, Path] = {}
    for a in range(4):
        for b in range(5):
            sent |= corpus.many(fwd.inbox / f"new{a}" / f"series{b}" / "deep", 10)
    assert len(sent) == 200
    fwd.wait(has_all(scp, sent), timeout=30, what="200 instances from new folders")
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert received(scp) == once(sent)
    assert fwd.stop() == 0


# -- statuses -----------------------------------------------------------------------------------


def test_out_of_resources_is_retried_then_sent(fwd: Forwarder, scp: SCP, corpus: Corpus) -> None:
    scp.statuses = [0xA700, 0xA700]
    fwd.configure([dest("pacs", scp.port)]).start()
    uid = corpus.write(fwd.inbox / "busy.dcm")
    fwd.wait(has_all(scp, [uid]))
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0
    assert received(scp) == Counter([uid])
    [row] = fwd.deliveries()
    assert row.state is State.SENT
    assert row.attempts == 3
    assert row.last_status == 0
    assert fwd.text().count("retry: ") == 2
    assert "0xA700" in fwd.text()


def test_json_log_lines_carry_each_attempts_own_status(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    scp.statuses = [0xA700]
    fwd.configure([dest("pacs", scp.port)], log={"format": "json"}).start()
    uid = corpus.write(fwd.inbox / "busy.dcm")
    fwd.wait(lambda: not fwd.inbox_files(), what="sent after one retry")
    assert fwd.stop() == 0
    events = [
        json.loads(line)
        for line in fwd.text().splitlines()
        if line.startswith("{") and '"outcome"' in line
    ]
    mine = [(e["outcome"], e.get("status")) for e in events if e.get("sop_instance_uid") == uid]
    assert mine == [("retry", "0xA700"), ("sent", "0x0000")], events
    assert all(e["destination"] == "pacs" and e["path"].endswith("busy.dcm") for e in events)


def _counting(status: int) -> tuple[Callable[[Any], int], Callable[[], int]]:
    calls = []

    def on_store(event: Any) -> int:
        calls.append(str(event.request.AffectedSOPInstanceUID))
        return status

    return on_store, lambda: len(calls)


def test_a900_is_quarantined_at_once_with_a_sidecar(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    scp.on_store, calls = _counting(0xA900)
    fwd.configure([dest("pacs", scp.port)]).start()
    good = corpus.write(fwd.inbox / "sub" / "bad.dcm")
    target = fwd.quarantine / "sub" / "bad.dcm"
    sidecar = Path(f"{target}.json")
    fwd.wait(sidecar.exists, what="the quarantine sidecar")
    fwd.wait(target.exists, what="the quarantined file")
    assert fwd.stop() == 0
    assert calls() == 1
    assert not fwd.inbox_files()
    side = json.loads(sidecar.read_text())
    assert side["sop_instance_uid"] == good
    info = side["destinations"]["pacs"]
    assert info["status"] == "0xA900"
    assert "does not match SOP class" in info["meaning"]
    assert info["attempts"] == 1
    assert info["state"] == "quarantined"
    assert "pacs" in side["reason"]
    # never resent: a restart finds nothing to send (a later file proves it has looked)
    scp.on_store = None
    fwd.start()
    late = corpus.write(fwd.inbox / "late.dcm")
    fwd.wait(has_all(scp, [late]))
    assert fwd.stop() == 0
    assert calls() == 1
    assert received(scp) == Counter([late])


def test_c000_is_retried_a_few_times_then_quarantined(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    scp.on_store, calls = _counting(0xC000)
    fwd.configure([dest("pacs", scp.port)]).start()
    corpus.write(fwd.inbox / "odd.dcm")
    sidecar = fwd.quarantine / "odd.dcm.json"
    fwd.wait(sidecar.exists, what="the quarantine sidecar")
    assert fwd.stop() == 0
    assert 2 <= calls() <= 5
    info = json.loads(sidecar.read_text())["destinations"]["pacs"]
    assert info["status"] == "0xC000"
    assert info["attempts"] == calls()
    assert (fwd.quarantine / "odd.dcm").exists()


def test_warnings_are_sent_and_recorded(fwd: Forwarder, scp: SCP, corpus: Corpus) -> None:
    scp.statuses = [0xB000, 0x0111]
    fwd.configure([dest("pacs", scp.port)]).start()
    sent = corpus.many(fwd.inbox, 3)
    fwd.wait(has_all(scp, sent))
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0
    rows = fwd.deliveries()
    assert {r.state for r in rows} == {State.SENT}
    assert {r.attempts for r in rows} == {1}
    warned = sorted((r.last_status, r.last_error) for r in rows if r.last_error)
    assert [w[0] for w in warned] == [0x0111, 0xB000], warned
    assert "coercion" in warned[1][1] and "duplicate" in warned[0][1]
    assert fwd.text().count("warning: ") >= 2


def test_duplicate_invocation_is_retried_on_a_fresh_association(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    scp.statuses = [0x0210]
    fwd.configure([dest("pacs", scp.port)]).start()
    uid = corpus.write(fwd.inbox / "dup.dcm")
    fwd.wait(has_all(scp, [uid]))
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0
    assert scp.associations >= 2
    [row] = fwd.deliveries()
    assert (row.state, row.attempts) == (State.SENT, 2)


def test_not_authorised_holds_the_destination_without_burning_attempts(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    scp.statuses = [0x0124]
    fwd.configure([dest("pacs", scp.port)]).start()
    uid = corpus.write(fwd.inbox / "held.dcm")
    text = fwd.wait_log("held: ")
    assert "not authorised" in text
    fwd.wait_log("destination pacs paused")
    fwd.wait(has_all(scp, [uid]), timeout=15, what="sent after the hold")
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0
    [row] = fwd.deliveries()
    assert row.state is State.SENT
    assert row.attempts == 1  # the refusal was the destination's fault, not the instance's
    assert not fwd.quarantined()


# -- destinations down or refusing ---------------------------------------------------------------


def test_peer_down_then_back_burns_no_attempts(
    fwd: Forwarder, make_scp: Callable[..., SCP], corpus: Corpus
) -> None:
    port = free_port()
    fwd.configure([dest("pacs", port)]).start()
    sent = corpus.many(fwd.inbox, 10)
    fwd.wait_log("destination pacs paused")
    fwd.wait_log("destination pacs paused", count=2, timeout=10)  # it keeps trying, backing off
    assert len(fwd.inbox_files()) == 10
    with Outbox(fwd.outbox_path, readonly=True) as ob:  # what `forwarder status` shows
        info = ob.destination_info()["pacs"]
    assert info.last_error is not None and "cannot connect" in info.last_error
    assert info.paused_until is not None
    scp = make_scp(port=port)
    fwd.wait(has_all(scp, sent), timeout=20, what="every instance once the peer is back")
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    fwd.wait_log("destination pacs is back")
    assert fwd.stop() == 0
    assert received(scp) == once(sent)
    assert not fwd.quarantined()
    rows = fwd.deliveries()
    assert {r.state for r in rows} == {State.SENT}
    assert {r.attempts for r in rows} == {1}  # the outage counted against no instance


def test_rejected_association_pauses_without_quarantine_until_fixed_by_sighup(
    fwd: Forwarder, make_scp: Callable[..., SCP], corpus: Corpus
) -> None:
    scp = make_scp(ae_title="REALPACS", require_called=True)
    fwd.configure([dest("pacs", scp.port, called_aet="WRONGAE")]).start()
    sent = corpus.many(fwd.inbox, 5)
    text = fwd.wait_log("destination pacs paused")
    assert "called AE title not recognised" in text
    assert "check called_aet" in text
    assert not scp.received
    assert not fwd.quarantined()
    assert len(fwd.inbox_files()) == 5
    rows = fwd.deliveries()
    assert {r.state for r in rows} <= {State.PENDING, State.INFLIGHT}
    assert {r.attempts for r in rows} == {0}
    # the fix: the right AE title and a reload
    fwd.configure([dest("pacs", scp.port, called_aet="REALPACS")])
    fwd.signal(signal.SIGHUP)
    fwd.wait_log("reloaded")
    fwd.wait(has_all(scp, sent), timeout=20, what="every instance after the fix")
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0
    assert received(scp) == once(sent)
    assert not fwd.quarantined()


def test_two_destinations_one_rejecting_permanently(
    fwd: Forwarder, make_scp: Callable[..., SCP], corpus: Corpus
) -> None:
    a = make_scp()
    b = make_scp()
    b.on_store, b_calls = _counting(0xA900)
    fwd.configure([dest("a", a.port), dest("b", b.port)]).start()
    sent = corpus.many(fwd.inbox, 5)
    fwd.wait(has_all(a, sent))
    fwd.wait(lambda: len(fwd.quarantined()) == 5, what="5 quarantined files")
    assert fwd.stop() == 0
    assert received(a) == once(sent)  # A got each exactly once
    assert b_calls() == 5
    assert not fwd.inbox_files()
    for path in fwd.quarantined():
        side = json.loads(Path(f"{path}.json").read_text())
        assert set(side["destinations"]) == {"b"}  # names the refusing destination only
        assert side["delivered_to"] == ["a"]
        assert side["destinations"]["b"]["state"] == "quarantined"
        assert side["destinations"]["b"]["status"] == "0xA900"
        assert side["reason"].startswith("b: ")
        assert "a: " not in side["reason"]
    states = Counter((d.destination, d.state) for d in fwd.deliveries())
    assert states == {("a", State.SENT): 5, ("b", State.QUARANTINED): 5}


# -- crashes and signals --------------------------------------------------------------------------


def test_kill_9_mid_backlog_loses_nothing(fwd: Forwarder, scp: SCP, corpus: Corpus) -> None:
    def slowish(event: Any) -> None:
        time.sleep(0.002)

    scp.on_store = slowish
    sent = corpus.many(fwd.inbox / "backlog", 1000)
    fwd.configure([dest("pacs", scp.port)]).start()
    fwd.wait(lambda: len(scp.uids()) >= 300, timeout=60, what="300 instances before the kill")
    fwd.kill()
    got = set(scp.uids())
    left = {p for p in fwd.inbox_files()}
    removed = {uid for uid, p in sent.items() if p not in left}
    assert len(got) < 1000, "the backlog drained before the kill: slow the SCP down"
    assert removed <= got, f"{len(removed - got)} files left the inbox without an ack"
    fwd.start()
    fwd.wait(has_all(scp, sent), timeout=90, what="all 1,000 instances after the restart")
    fwd.wait(lambda: not fwd.inbox_files(), timeout=30, what="an empty inbox")
    assert fwd.stop() == 0
    counts = received(scp)
    assert set(counts) == set(sent)
    dupes = sum(n - 1 for n in counts.values())
    print(f"\nkill -9 after {len(got)} of 1,000 acked; {dupes} sent twice after the restart")
    assert dupes <= 64, f"{dupes} duplicates: more than one batch resent"
    assert not fwd.quarantined()


def test_sigterm_with_work_in_flight_exits_0_and_the_rest_follows(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    def slow(event: Any) -> None:
        time.sleep(0.02)

    scp.on_store = slow
    fwd.configure([dest("pacs", scp.port)], shutdown_timeout=5).start()
    sent = corpus.many(fwd.inbox, 150)
    fwd.wait(lambda: len(scp.uids()) >= 10, what="the first stores")
    t0 = time.monotonic()
    assert fwd.stop(timeout=10) == 0
    assert time.monotonic() - t0 < 5 + 1
    assert "stopped" in fwd.text(since_start=True)
    first = set(scp.uids())
    assert len(first) < 150
    assert not fwd.quarantined()
    fwd.start()
    fwd.wait(has_all(scp, sent), timeout=30, what="the rest after the restart")
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0
    assert set(scp.uids()) == set(sent)


def test_sigint_stops_cleanly_with_the_config_from_the_environment(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    fwd.configure([dest("pacs", scp.port)]).start(config_from_env=True)
    uid = corpus.write(fwd.inbox / "x.dcm")
    fwd.wait(has_all(scp, [uid]))
    fwd.signal(signal.SIGINT)
    assert fwd.proc is not None
    assert fwd.proc.wait(15) == 0
    assert "stopped" in fwd.text()


def assert_sent_after_restart(fwd: Forwarder, scp: SCP, uid: str) -> None:
    """Nothing lost by a forced stop: the file is still in the inbox, and sent after a restart."""
    assert (fwd.inbox / "stuck.dcm").exists()
    scp.on_store = None
    fwd.start()
    fwd.wait(lambda: not fwd.inbox_files(), timeout=20, what="an empty inbox")
    assert fwd.stop() == 0
    assert uid in scp.uids()


def test_sighup_in_the_middle_of_a_stream_loses_and_repeats_nothing(
    fwd: Forwarder, make_scp: Callable[..., SCP], corpus: Corpus
) -> None:
    def slow(event: Any) -> None:
        time.sleep(0.01)

    old, new = make_scp(), make_scp()
    old.on_store = slow
    sent = corpus.many(fwd.inbox, 100)
    fwd.configure([dest("pacs", old.port)]).start()
    fwd.wait(lambda: len(old.uids()) >= 10, what="the first stores")
    fwd.configure([dest("pacs", new.port)])
    fwd.signal(signal.SIGHUP)
    fwd.wait_log("reloaded")
    fwd.wait(lambda: set(old.uids()) | set(new.uids()) >= set(sent), timeout=30)
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0
    assert received(old) + received(new) == once(sent)  # each once, at one peer or the other
    assert len(old.uids()) < 100 and new.uids()


def test_a_wedged_peer_does_not_hold_up_shutdown(
    fwd: Forwarder, scp: SCP, gate: Gate, corpus: Corpus
) -> None:
    scp.on_store = gate
    fwd.configure(
        [dest("pacs", scp.port, dimse_timeout=60, network_timeout=60)], shutdown_timeout=2
    ).start()
    uid = corpus.write(fwd.inbox / "stuck.dcm")
    fwd.wait(gate.entered.is_set, what="a store blocked at the peer")
    t0 = time.monotonic()
    rc = fwd.stop(timeout=10)
    took = time.monotonic() - t0
    assert took < 2 + 2, took
    assert rc == 1  # forced: the in-flight store is sent again
    assert "did not finish in time" in fwd.text()
    gate.open.set()
    assert_sent_after_restart(fwd, scp, uid)


def test_sighup_adding_a_watched_folder(fwd: Forwarder, scp: SCP, corpus: Corpus) -> None:
    fwd.configure([dest("pacs", scp.port)]).start()
    first = corpus.many(fwd.inbox, 3, prefix="one")
    fwd.wait(has_all(scp, first))
    second = fwd.tmp / "inbox2"
    second.mkdir()
    waiting = corpus.many(second, 3, prefix="early")  # there before the reload
    fwd.configure([dest("pacs", scp.port)], watch={"paths": [str(fwd.inbox), str(second)]})
    fwd.signal(signal.SIGHUP)
    fwd.wait_log("reloaded")
    late = corpus.many(second, 3, prefix="late") | corpus.many(fwd.inbox, 3, prefix="two")
    fwd.wait(has_all(scp, [*waiting, *late]), timeout=20)
    fwd.wait(lambda: not fwd.inbox_files() and not list(second.iterdir()), what="empty inboxes")
    assert fwd.stop() == 0
    assert received(scp) == once([*first, *waiting, *late])


def test_second_sigterm_exits_at_once(fwd: Forwarder, scp: SCP, gate: Gate, corpus: Corpus) -> None:
    scp.on_store = gate
    fwd.configure([dest("pacs", scp.port)], shutdown_timeout=30).start()
    uid = corpus.write(fwd.inbox / "stuck.dcm")
    fwd.wait(gate.entered.is_set, what="a store blocked at the peer")
    fwd.signal(signal.SIGTERM)
    fwd.wait_log("stopping")
    assert fwd.alive()  # waiting for the in-flight store
    t0 = time.monotonic()
    fwd.signal(signal.SIGTERM)
    assert fwd.proc is not None
    rc = fwd.proc.wait(5)
    assert time.monotonic() - t0 < 2
    assert rc == 128 + signal.SIGTERM
    assert "second signal" in fwd.text()
    gate.open.set()
    assert_sent_after_restart(fwd, scp, uid)


# -- bad input --------------------------------------------------------------------------------


def test_invalid_files_are_quarantined_after_the_grace_and_good_ones_sent(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    fwd.configure([dest("pacs", scp.port)]).start()
    (fwd.inbox / "notes.txt").write_text("this is not DICOM\n" * 20)
    _, data = corpus.encode()
    (fwd.inbox / "cut.dcm").write_bytes(data[: len(data) - 40])
    (fwd.inbox / "empty.dcm").touch()  # the 0-byte file other routers choke on
    good = corpus.many(fwd.inbox, 5)
    t0 = time.monotonic()
    fwd.wait(has_all(scp, good))
    fwd.wait(lambda: len(fwd.quarantined()) == 3, timeout=15, what="3 quarantined files")
    assert time.monotonic() - t0 >= 0.9  # not before invalid_grace_seconds
    assert fwd.alive()
    assert fwd.stop() == 0
    assert received(scp) == once(good)
    assert not fwd.inbox_files()
    for name in ("notes.txt", "cut.dcm", "empty.dcm"):
        side = json.loads((fwd.quarantine / f"{name}.json").read_text())
        assert side["reason"], side
        assert side["original_path"] == str(fwd.inbox / name)
    cut = json.loads((fwd.quarantine / "cut.dcm.json").read_text())["reason"]
    assert "trunc" in cut.lower() or "end" in cut.lower() or "short" in cut.lower(), cut


def test_file_rewritten_after_queuing_sends_only_the_new_version(
    fwd: Forwarder, scp: SCP, gate: Gate, corpus: Corpus
) -> None:
    scp.on_store = gate
    fwd.configure([dest("pacs", scp.port)], sender={"batch_size": 1}).start()
    first = corpus.write(fwd.inbox / "a.dcm")
    fwd.wait(gate.entered.is_set, what="the first store blocked at the peer")
    path = fwd.inbox / "b.dcm"
    old = corpus.write(path)
    fwd.wait(lambda: len(fwd.deliveries()) == 2, what="b.dcm queued")
    new, data = corpus.encode()
    with open(path, "wb") as fp:  # rewritten in place: same name, new instance
        fp.write(data)
    fwd.wait(lambda: len(fwd.deliveries()) == 3, what="the new version of b.dcm queued")
    gate.open.set()
    fwd.wait(has_all(scp, [first, new]))
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0
    assert received(scp) == once([first, new])
    assert old not in scp.uids()
    by_uid = {d.sop_instance_uid: d.state for d in fwd.deliveries()}
    assert by_uid == {first: State.SENT, old: State.GONE, new: State.SENT}


def test_file_deleted_before_sending_is_marked_gone(
    fwd: Forwarder, scp: SCP, gate: Gate, corpus: Corpus
) -> None:
    scp.on_store = gate
    fwd.configure([dest("pacs", scp.port)], sender={"batch_size": 1}).start()
    first = corpus.write(fwd.inbox / "a-first.dcm")
    fwd.wait(gate.entered.is_set, what="the first store blocked at the peer")
    doomed = corpus.many(fwd.inbox / "later", 5)
    fwd.wait(lambda: len(fwd.deliveries()) == 6, what="the 5 later files queued")
    for path in doomed.values():
        path.unlink()
    gate.open.set()
    fwd.wait_log("gone: ", count=5, timeout=15)
    assert fwd.alive()
    survivor = corpus.write(fwd.inbox / "z-after.dcm")
    fwd.wait(has_all(scp, [first, survivor]))
    assert fwd.stop() == 0
    assert set(scp.uids()) == {first, survivor}
    states = Counter(d.state for d in fwd.deliveries())
    assert states == {State.SENT: 2, State.GONE: 5}
    assert "Traceback" not in fwd.text()


def test_files_deleted_after_being_claimed_do_not_stop_the_batch(
    fwd: Forwarder, scp: SCP, gate: Gate, corpus: Corpus
) -> None:
    scp.on_store = gate
    fwd.configure([dest("pacs", scp.port)], sender={"batch_size": 64}).start()
    first = corpus.write(fwd.inbox / "a-first.dcm")
    fwd.wait(lambda: gate.count == 1, what="the first store blocked at the peer")
    batch = corpus.many(fwd.inbox / "later", 6)
    fwd.wait(lambda: len(fwd.deliveries()) == 7, what="6 more files queued")
    gate.let_one()  # the first batch ends; the next claims all six at once
    fwd.wait(lambda: gate.count == 2, what="the second batch's first store blocked")
    inflight = [d for d in fwd.deliveries() if d.state is State.INFLIGHT]
    assert len(inflight) == 6, inflight
    sending = min(inflight, key=lambda d: d.id)
    doomed = {u: p for u, p in batch.items() if str(p) != sending.path}
    for path in doomed.values():
        path.unlink()  # claimed and checked already, deleted before their turn
    associations = scp.associations
    gate.open.set()
    fwd.wait(lambda: outbox_idle(fwd), timeout=20, what="every delivery settled")
    assert fwd.alive()
    # nothing of a deleted file went out: the association stays up (no abort per file)
    assert scp.associations == associations
    survivor = corpus.write(fwd.inbox / "z-after.dcm")
    fwd.wait(has_all(scp, [survivor]))
    assert fwd.stop() == 0
    assert received(scp) == once([first, sending.sop_instance_uid, survivor])
    states = Counter(d.state for d in fwd.deliveries())
    assert states == {State.SENT: 3, State.GONE: 5}, states
    assert not fwd.quarantined()
    assert "Traceback" not in fwd.text()


def test_rows_queued_by_the_first_release_are_sent(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    # An outbox of schema 1 (no data set offsets) with a file still queued: the upgraded
    # daemon migrates it and sends that row, reading the file meta again for its offset.
    path = fwd.inbox / "queued-before.dcm"
    uid = corpus.write(path)
    info = inspect(path)
    fwd.outbox_path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(fwd.outbox_path)
    try:
        for statement in outbox_module.MIGRATIONS[0][1]:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO deliveries (path, size, mtime_ns, sop_class_uid, sop_instance_uid,"
            " transfer_syntax, study_uid, destination, next_attempt_at, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 'pacs', 0, 0, 0)",
            (
                str(path),
                info.size,
                info.mtime_ns,
                info.sop_class_uid,
                info.sop_instance_uid,
                info.transfer_syntax,
                info.study_uid,
            ),
        )
        conn.commit()
    finally:
        conn.close()
    fwd.configure([dest("pacs", scp.port)]).start()
    fwd.wait(has_all(scp, [uid]))
    fwd.wait(lambda: not path.exists(), what="the file disposed of")
    assert fwd.stop() == 0
    assert received(scp) == once([uid])
    (row,) = fwd.deliveries()
    assert (row.state, row.dataset_offset) == (State.SENT, None)


@pytest.mark.skipif(
    os.geteuid() == 0, reason="runs as root (as in CI): file permissions do not stop root"
)
def test_unreadable_file_is_quarantined_or_held_without_crash(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:  # pragma: no cover - only as a normal user
    fwd.configure([dest("pacs", scp.port)]).start()
    locked = fwd.inbox / "locked.dcm"
    corpus.write(locked)
    locked.chmod(0)
    good = corpus.write(fwd.inbox / "good.dcm")
    fwd.wait(has_all(scp, [good]))
    fwd.wait_log("unreadable", timeout=10)
    assert fwd.alive()
    assert fwd.stop() == 0


def test_quarantine_that_cannot_be_written_keeps_the_file_in_the_inbox(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    scp.on_store, _ = _counting(0xA900)
    fwd.configure([dest("pacs", scp.port)], watch={"rescan_seconds": 1}).start()
    # the quarantine folder is replaced by a regular file: every mkdir under it fails
    fwd.quarantine.rmdir()
    fwd.quarantine.write_text("not a folder\n")
    (fwd.inbox / "junk.txt").write_text("not DICOM\n")
    corpus.write(fwd.inbox / "sub" / "rejected.dcm")
    fwd.wait_log("cannot be quarantined", timeout=15)
    fwd.wait_log("cannot be moved out of the inbox", timeout=15)
    assert fwd.alive()
    assert (fwd.inbox / "junk.txt").exists()
    assert (fwd.inbox / "sub" / "rejected.dcm").exists()
    # ... and it keeps sending the files it can
    scp.on_store = None
    good = corpus.write(fwd.inbox / "good.dcm")
    fwd.wait(has_all(scp, [good]))
    fwd.wait(lambda: not (fwd.inbox / "good.dcm").exists(), what="the good file disposed of")
    # once the quarantine is writable again, a rescan retries the invalid file
    fwd.quarantine.unlink()
    fwd.quarantine.mkdir()
    fwd.wait(lambda: (fwd.quarantine / "junk.txt").exists(), timeout=15, what="junk quarantined")
    assert (fwd.quarantine / "junk.txt.json").exists()
    assert fwd.stop() == 0
    assert "Traceback" not in fwd.text()


def test_config_errors_exit_78_naming_every_bad_setting(fwd: Forwarder, scp: SCP) -> None:
    fwd.configure([dest("pacs", 70000)], watch={"settle_secs": 1})
    proc = subprocess.run(
        [sys.executable, "-m", "forwarder", "run", "--config", str(fwd.cfg)],
        cwd=ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == EX_CONFIG, proc.stderr
    assert "destinations.0.port" in proc.stderr
    assert "70000" in proc.stderr
    assert "watch.settle_secs" in proc.stderr
    assert not fwd.outbox_path.exists()  # nothing started


def test_config_error_from_the_environment_exits_78(fwd: Forwarder, scp: SCP) -> None:
    fwd.configure([dest("pacs", scp.port)])
    proc = subprocess.run(
        [sys.executable, "-m", "forwarder", "run", "--config", str(fwd.cfg)],
        cwd=ROOT,
        env={**_clean_env(), "FORWARDER_RETRY__MAX_ATTEMPTS": "0"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == EX_CONFIG
    assert "retry.max_attempts" in proc.stderr


# -- footprint ---------------------------------------------------------------------------------


def test_backlog_at_start_drains_with_flat_memory_and_idle_cpu(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    sent = corpus.many(fwd.inbox / "backlog", 2000)
    fwd.configure([dest("pacs", scp.port)])
    t0 = time.monotonic()
    fwd.start()
    fwd.wait(has_all(scp, sent), timeout=120, what="2,000 instances")
    drained = time.monotonic() - t0
    fwd.wait(lambda: not fwd.inbox_files(), timeout=30, what="an empty inbox")
    hwm_mb = proc_status_kb(fwd.pid, "VmHWM") / 1024
    # idle: nothing queued and every association released after its linger; then measure
    fwd.wait(lambda: outbox_idle(fwd), what="an idle outbox")
    fwd.wait(lambda: associations_released(fwd), what="the association released")
    cpu0, w0 = cpu_seconds(fwd.pid), time.monotonic()
    threading.Event().wait(3.0)  # the measurement window itself
    cpu1, w1 = cpu_seconds(fwd.pid), time.monotonic()
    idle = (cpu1 - cpu0) / (w1 - w0)
    print(
        f"\n2,000 files: drained in {drained:.1f} s ({2000 / drained:.0f} inst/s), "
        f"VmHWM {hwm_mb:.0f} MB, idle CPU {idle * 100:.2f} %"
    )
    assert fwd.stop() == 0
    assert received(scp) == once(sent)
    assert hwm_mb < 150
    assert idle < 0.02


def outbox_idle(fwd: Forwarder) -> bool:
    with Outbox(fwd.outbox_path, readonly=True) as ob:
        counts = ob.counts()
    return not any(c[State.PENDING] or c[State.INFLIGHT] for c in counts.values())


def associations_released(fwd: Forwarder) -> bool:
    text = fwd.text(since_start=True)
    return text.count("Requesting Association") == text.count("Releasing Association")


# -- health, sd_notify, reload ------------------------------------------------------------------


def test_health_command_exits_0_while_running_and_1_after_stop(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    fwd.configure([dest("pacs", scp.port)])
    before = fwd.health()
    assert before.returncode == 1
    assert "never run" in before.stderr
    fwd.start()
    fwd.wait(lambda: fwd.health().returncode == 0, what="healthy")
    ok = fwd.health()
    assert ok.stdout.startswith("ok: pid ")
    uid = corpus.write(fwd.inbox / "x.dcm")
    fwd.wait(has_all(scp, [uid]))
    assert fwd.health().returncode == 0
    assert fwd.stop() == 0
    after = fwd.health()
    assert after.returncode == 1
    assert "stopped" in after.stderr


class NotifyListener:
    """A real AF_UNIX datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            with self.lock:
                for line in data.decode("utf-8", "replace").splitlines():
                    self.messages.append((now, line))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def lines(self, prefix: str) -> list[tuple[float, str]]:
        with self.lock:
            return [(t, m) for t, m in self.messages if m.startswith(prefix)]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifyListener]:
    path = tmp_path / "notify.sock"
    assert len(str(path)) < 100, "AF_UNIX paths are limited to 108 bytes"
    listener = NotifyListener(path)
    try:
        yield listener
    finally:
        listener.close()


def test_notify_socket_ready_status_watchdog_and_stopping(
    fwd: Forwarder, scp: SCP, notify_socket: NotifyListener, corpus: Corpus
) -> None:
    env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "1000000"}
    fwd.configure([dest("pacs", scp.port)]).start(env)
    fwd.wait(lambda: notify_socket.lines("READY=1"), what="READY=1")
    fwd.wait(lambda: notify_socket.lines("STATUS="), what="STATUS=")
    uid = corpus.write(fwd.inbox / "x.dcm")
    fwd.wait(has_all(scp, [uid]))
    # WATCHDOG_USEC=1 s: a ping every 0.5 s
    fwd.wait(lambda: len(notify_socket.lines("WATCHDOG=1")) >= 7, timeout=10, what="7 pings")
    pings = [t for t, _ in notify_socket.lines("WATCHDOG=1")]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < 1.0, gaps  # never late enough for systemd to kill us
    rate = (len(pings) - 1) / (pings[-1] - pings[0])
    assert 1.4 < rate < 2.6, (rate, gaps)
    status = notify_socket.lines("STATUS=")[-1][1]
    assert "queued" in status and "last success" in status, status
    assert fwd.stop() == 0
    assert notify_socket.lines("STOPPING=1")
    stop_at = notify_socket.lines("STOPPING=1")[0][0]
    assert notify_socket.lines("READY=1")[0][0] < stop_at


def test_wedged_worker_stops_the_watchdog_and_fails_health(
    fwd: Forwarder, scp: SCP, notify_socket: NotifyListener, gate: Gate, corpus: Corpus
) -> None:
    scp.on_store = gate
    env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "1000000"}
    fwd.configure(
        [dest("pacs", scp.port, dimse_timeout=60, network_timeout=60)],
        health={"heartbeat_seconds": 0.5, "stall_seconds": 1},
        shutdown_timeout=10,
    ).start(env)
    corpus.write(fwd.inbox / "wedge.dcm")
    fwd.wait(gate.entered.is_set, what="the store blocked at the peer")
    wedged_at = time.monotonic()
    fwd.wait_log("not pinging the watchdog", timeout=10)
    health = fwd.wait(
        lambda: (h := fwd.health()).returncode == 1 and h, timeout=10, what="unhealthy"
    )
    assert "send-pacs-0" in health.stderr and "stuck" in health.stderr, health.stderr
    # no ping for a while: systemd would restart us
    fwd.wait(lambda: time.monotonic() - wedged_at > 2.5, what="time passing")
    late = [t for t, _ in notify_socket.lines("WATCHDOG=1") if t > wedged_at + 1.6]
    assert not late, f"{len(late)} pings while a worker was wedged"
    gate.open.set()  # unwedge: pings come back
    n = len(notify_socket.lines("WATCHDOG=1"))
    fwd.wait(lambda: len(notify_socket.lines("WATCHDOG=1")) > n + 1, what="pings again")
    fwd.wait(lambda: fwd.health().returncode == 0, what="healthy again")
    assert fwd.stop() == 0


def test_sighup_with_a_changed_destination_sends_later_files_to_the_new_peer(
    fwd: Forwarder, make_scp: Callable[..., SCP], notify_socket: NotifyListener, corpus: Corpus
) -> None:
    old, new = make_scp(), make_scp()
    fwd.configure([dest("pacs", old.port)]).start({"NOTIFY_SOCKET": str(notify_socket.path)})
    before = corpus.many(fwd.inbox, 10, prefix="before")
    fwd.wait(has_all(old, before))
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    fwd.configure([dest("pacs", new.port)])
    fwd.signal(signal.SIGHUP)
    fwd.wait_log("reloaded")
    fwd.wait(lambda: notify_socket.lines("RELOADING=1"), what="RELOADING=1")
    after = corpus.many(fwd.inbox, 10, prefix="after")
    fwd.wait(has_all(new, after))
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0
    assert received(old) == once(before)
    assert received(new) == once(after)
    assert len(notify_socket.lines("READY=1")) >= 2  # after start and after the reload


def test_sighup_while_the_changed_destination_is_wedged_keeps_the_watchdog_fed(
    fwd: Forwarder,
    make_scp: Callable[..., SCP],
    notify_socket: NotifyListener,
    gate: Gate,
    corpus: Corpus,
) -> None:
    old, new = make_scp(), make_scp()
    old.on_store = gate
    env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "1000000"}
    slow = dest("pacs", old.port, dimse_timeout=60, network_timeout=60)
    fwd.configure([slow], shutdown_timeout=3).start(env)
    stuck = corpus.write(fwd.inbox / "stuck.dcm")
    fwd.wait(gate.entered.is_set, what="a store blocked at the old peer")
    fwd.configure([dest("pacs", new.port)], shutdown_timeout=3)
    reload_at = time.monotonic()
    fwd.signal(signal.SIGHUP)
    fwd.wait_log("reloaded", timeout=10)
    assert time.monotonic() - reload_at >= 2.5  # it did wait for the in-flight store
    pings = [t for t, _ in notify_socket.lines("WATCHDOG=1") if t > reload_at - 0.5]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert gaps and max(gaps) < 1.0, gaps  # WATCHDOG_USEC=1 s was never missed
    after = corpus.many(fwd.inbox, 3, prefix="after")
    fwd.wait(has_all(new, after))
    gate.open.set()  # the old store completes late: recorded, not sent again
    fwd.wait(lambda: outbox_idle(fwd), what="every delivery settled")
    assert fwd.stop() == 0
    assert received(old) + received(new) == once([stuck, *after])


def test_sighup_with_a_broken_config_keeps_the_old_one(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    fwd.configure([dest("pacs", scp.port)]).start()
    good_cfg = fwd.cfg.read_text()
    fwd.cfg.write_text(good_cfg.replace(f"port = {scp.port}", "port = 70000") + "bogus = 1\n")
    fwd.signal(signal.SIGHUP)
    text = fwd.wait_log("reload refused")
    assert "destinations.0.port" in text
    assert "bogus" in text
    assert fwd.alive()
    sent = corpus.many(fwd.inbox, 5)
    fwd.wait(has_all(scp, sent))
    assert fwd.stop() == 0
    assert received(scp) == once(sent)


# -- file modes -------------------------------------------------------------------------------


@pytest.fixture
def shm_quarantine() -> Iterator[Path]:
    """A quarantine on another file system (tmpfs) than the inbox: files are copied there."""
    base = Path("/dev/shm")
    if not base.is_dir() or os.stat(base).st_dev == os.stat(ROOT).st_dev:
        pytest.skip("no tmpfs /dev/shm on another file system")
    path = base / f"forwarder-test-{secrets.token_hex(6)}" / "quarantine"
    try:
        yield path
    finally:
        import shutil

        shutil.rmtree(path.parent, ignore_errors=True)


def test_files_the_daemon_creates_have_no_world_bits_under_umask_022(
    fwd: Forwarder, scp: SCP, corpus: Corpus, shm_quarantine: Path
) -> None:
    # Run as an admin would outside systemd: with the shell's umask 022.
    fwd.configure([dest("pacs", scp.port)], watch={"invalid_grace_seconds": 0})
    fwd.config["quarantine"]["dir"] = str(shm_quarantine)
    fwd.cfg.write_text(to_toml(fwd.config))
    old = os.umask(0o022)
    try:
        fwd.start()
        junk = fwd.inbox / "sub" / "junk.dcm"
        junk.parent.mkdir()
        junk.write_bytes(b"not DICOM at all" * 64)
    finally:
        os.umask(old)
    assert junk.stat().st_mode & 0o777 == 0o644  # as the writer left it
    uid = corpus.write(fwd.inbox / "good.dcm")
    copied = shm_quarantine / "sub" / "junk.dcm"
    fwd.wait(lambda: copied.exists() and not junk.exists(), what="junk copied to quarantine")
    fwd.wait(has_all(scp, [uid]), what="the good file sent")
    created = [
        fwd.outbox_path,
        fwd.outbox_path.with_name(fwd.outbox_path.name + "-wal"),
        fwd.outbox_path.parent,
        copied,
        Path(f"{copied}.json"),
        shm_quarantine,
        shm_quarantine / "sub",
    ]
    modes = {str(p): oct(p.stat().st_mode & 0o777) for p in created}
    assert {p: m for p, m in modes.items() if int(m, 8) & 0o007} == {}, modes
    assert copied.stat().st_mode & 0o777 == 0o640  # the source's 0644 under umask 027
    assert fwd.stop() == 0


def test_umask_is_configurable(fwd: Forwarder, scp: SCP, corpus: Corpus) -> None:
    fwd.configure([dest("pacs", scp.port)], umask="0077")
    old = os.umask(0o022)
    try:
        fwd.start()
    finally:
        os.umask(old)
    uid = corpus.write(fwd.inbox / "a.dcm")
    fwd.wait(has_all(scp, [uid]), what="sent")
    assert fwd.outbox_path.stat().st_mode & 0o777 == 0o600
    assert fwd.stop() == 0


# -- how a file went out ---------------------------------------------------------------------


def test_a_decompressed_lossy_file_says_so_to_the_peer_the_log_and_the_outbox(
    fwd: Forwarder, make_scp: Callable[..., SCP]
) -> None:
    from conftest import UNCOMPRESSED
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset

    scp = make_scp(transfer_syntaxes=UNCOMPRESSED)  # refuses JPEG baseline
    fwd.configure([dest("pacs", scp.port)]).start()
    source = data_file("JPGExtended.dcm")  # JPEG extended: (0028,2110) "01", no method
    uid = inspect(source).sop_instance_uid
    path = fwd.inbox / "lossy.dcm"
    tmp = fwd.inbox / ".lossy.dcm.part"
    tmp.write_bytes(source.read_bytes())
    tmp.rename(path)
    fwd.wait(has_all(scp, [uid]), what="the lossy file sent")
    (got,) = scp.received
    assert got.transfer_syntax == "1.2.840.10008.1.2.1"
    fp = DicomBytesIO(got.encoded)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    ds = read_dataset(fp, False, True)
    assert ds.LossyImageCompression == "01"
    assert ds.LossyImageCompressionMethod == "ISO_10918_1"
    assert str(ds.LossyImageCompressionRatio) == "76"
    how = "decompressed to Explicit VR Little Endian"
    fwd.wait(lambda: f"sent: {path} ({uid}) -> pacs: " in fwd.text(), what="the sent line")
    line = next(x for x in fwd.text().splitlines() if f"sent: {path} " in x)
    assert line.endswith(how), line

    def row() -> Delivery | None:  # the line is logged as the store is answered; the
        with Outbox(fwd.outbox_path, readonly=True) as ob:  # commit follows within 50 ms
            (found,) = ob.find(uid)
        return found if found.state is State.SENT else None

    assert fwd.wait(row, what="the row committed as sent").sent_as == how
    assert fwd.stop() == 0


# -- routing ------------------------------------------------------------------------------------


def routed_file(path: Path, modality: str, series: str = "AX 5mm") -> str:
    """Write a small instance with this Modality and Series Description in one go; its UID."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = f"{_UID_ROOT}.3"
    ds.Modality = modality
    ds.SeriesDescription = series
    ds.PatientID = "FWD-ROUTE"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return str(ds.SOPInstanceUID)


CT_ONLY = {
    "match": {"Modality": "CT"},
    "exclude": {"SeriesDescription": ["*SCOUT*", "*LOCALIZER*"]},
}
MR_ONLY = {"match": {"Modality": "MR"}}


def test_rules_route_ct_and_mr_exclude_scouts_and_quarantine_the_unmatched(
    fwd: Forwarder, make_scp: Callable[..., SCP]
) -> None:
    archive, station = make_scp(), make_scp()
    fwd.configure(
        [dest("ct-archive", archive.port, **CT_ONLY), dest("mr", station.port, **MR_ONLY)]
    )
    fwd.start()
    ct = {routed_file(fwd.inbox / f"ct{i}.dcm", "CT") for i in range(3)}
    mr = {routed_file(fwd.inbox / f"mr{i}.dcm", "MR") for i in range(2)}
    scout = routed_file(fwd.inbox / "scout.dcm", "CT", "CHEST SCOUT")
    us = routed_file(fwd.inbox / "us.dcm", "US")
    fwd.wait(has_all(archive, ct), what="the CTs at the archive")
    fwd.wait(has_all(station, mr), what="the MRs at the MR station")
    fwd.wait(lambda: len(fwd.quarantined()) == 2, what="2 quarantined files")
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0
    assert received(archive) == once(ct)
    assert received(station) == once(mr)
    rows = {(d.sop_instance_uid, d.destination) for d in fwd.deliveries()}
    assert rows == {(u, "ct-archive") for u in ct} | {(u, "mr") for u in mr}
    reasons = {
        p.name: json.loads(Path(f"{p}.json").read_text())["reason"] for p in fwd.quarantined()
    }
    assert reasons == {
        "scout.dcm": "no destination matched: ct-archive: SeriesDescription 'CHEST SCOUT' is "
        "excluded by ['*SCOUT*', '*LOCALIZER*']; mr: Modality 'CT' does not match 'MR'",
        "us.dcm": "no destination matched: ct-archive: Modality 'US' does not match 'CT'; "
        "mr: Modality 'US' does not match 'MR'",
    }
    log = fwd.text()
    assert log.count("no destination matched") == 2, log  # logged once each
    assert scout not in archive.uids() + station.uids() and us not in station.uids()


def test_sighup_applies_new_rules_to_files_dropped_after_it(
    fwd: Forwarder, make_scp: Callable[..., SCP]
) -> None:
    a, b = make_scp(), make_scp()
    fwd.configure([dest("a", a.port, **CT_ONLY), dest("b", b.port, **MR_ONLY)]).start()
    before = routed_file(fwd.inbox / "before.dcm", "MR")
    fwd.wait(has_all(b, [before]), what="the first MR at b")
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    # now MR goes to a as well, and b takes only what comes from the "urgent" folder
    fwd.configure(
        [
            dest("a", a.port, match={"Modality": ["CT", "MR"]}),
            dest("b", b.port, match={"Modality": "MR", "path": "urgent/**"}),
        ]
    )
    fwd.signal(signal.SIGHUP)
    fwd.wait_log("reloaded")
    (line,) = [x for x in fwd.text().splitlines() if "reloaded" in x]
    assert "restarted workers" not in line  # new rules only: the enqueuer applies them
    after = routed_file(fwd.inbox / "after.dcm", "MR")
    urgent = routed_file(fwd.inbox / "urgent" / "x" / "urgent.dcm", "MR")
    fwd.wait(has_all(a, [after, urgent]), what="both MRs at a")
    fwd.wait(has_all(b, [urgent]), what="the urgent MR at b")
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0
    assert received(a) == once([after, urgent])
    assert received(b) == once([before, urgent])


def test_unmatched_dispose_moves_the_file_like_a_delivered_one(
    fwd: Forwarder, make_scp: Callable[..., SCP]
) -> None:
    a = make_scp()
    fwd.configure(
        [dest("a", a.port, **CT_ONLY)],
        routing={"unmatched": "dispose"},
        disposition={"on_success": "move"},
    ).start()
    ct = routed_file(fwd.inbox / "ct.dcm", "CT")
    mr = routed_file(fwd.inbox / "mr.dcm", "MR")
    fwd.wait(has_all(a, [ct]), what="the CT at a")
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0
    assert received(a) == once([ct])
    assert sorted(p.name for p in fwd.archive.rglob("*.dcm")) == ["ct.dcm", "mr.dcm"]
    assert not fwd.quarantined()
    assert {d.sop_instance_uid for d in fwd.deliveries()} == {ct}
    assert fwd.text().count("no destination wants it") == 1
    assert mr not in a.uids()


def test_a_batch_that_outlasts_its_lease_is_not_sent_twice(
    fwd: Forwarder, make_scp: Callable[..., SCP]
) -> None:
    """A slow peer (or slow transforms) make a batch take longer than outbox.lease_seconds:
    the rows a live worker still holds keep their lease, so the other association does not
    claim and send them a second time."""
    peer = make_scp()
    peer.on_store = lambda event: time.sleep(1.0) and None  # type: ignore[func-returns-value]
    uids = [routed_file(fwd.inbox / f"ct{i}.dcm", "CT") for i in range(12)]  # queued at start
    fwd.configure(
        [dest("slow", peer.port, associations=2)],
        outbox={"path": str(fwd.outbox_path), "lease_seconds": 2},
    ).start()
    fwd.wait(has_all(peer, uids), timeout=60, what="every file")
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0
    assert received(peer) == once(uids)
    assert "outlived their lease" not in fwd.text()
