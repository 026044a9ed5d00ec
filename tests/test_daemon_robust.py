"""End-to-end tests of ``forwarder run`` against what stopped the pipeline in the attack run:
names that are not UTF-8, a full disk, a damaged outbox, a second daemon, a read-only outbox,
transient failures taken for refusals. Real daemon processes, real SCPs, real files."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import SCP, free_port
from test_daemon import (  # the daemon fixtures and helpers
    ROOT,
    Corpus,
    Forwarder,
    _clean_env,
    corpus,
    dest,
    fwd,
    has_all,
    to_toml,
)

from forwarder.config import Settings
from forwarder.daemon import Daemon
from forwarder.dicomfile import DicomInfo, inspect
from forwarder.errors import EX_CANTCREAT, EX_SOFTWARE, EX_TEMPFAIL
from forwarder.outbox import Outbox, State

__all__ = ["corpus", "fwd"]  # fixtures, imported for pytest


def cli(fwd: Forwarder, *argv: str) -> subprocess.CompletedProcess[str]:
    """``forwarder ARGV --config CFG`` as a subprocess; its exit status and output."""
    return subprocess.run(
        [sys.executable, "-m", "forwarder", *argv, "--config", str(fwd.cfg)],
        cwd=ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- transient failures are not refusals (item 20) ------------------------------------------


def test_transient_failures_do_not_use_up_the_refusals_and_the_sidecar_tells_them_apart(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    calls: list[int | None] = []
    answers: list[int | None] = [0xA700, None, 0xC000, 0xC000, 0xC000]
    released = threading.Event()

    def on_store(event: Any) -> int | None:
        status = answers[len(calls)] if len(calls) < len(answers) else 0xC000
        calls.append(status)
        if status is None:  # no answer within the sender's DIMSE timeout; stored anyway
            released.wait(4)
        return status

    scp.on_store = on_store
    fwd.configure([dest("pacs", scp.port, dimse_timeout=1)]).start()
    corpus.write(fwd.inbox / "odd.dcm")
    sidecar = fwd.quarantine / "odd.dcm.json"
    try:
        fwd.wait(sidecar.exists, timeout=30, what="the quarantine sidecar")
    finally:
        released.set()
    assert fwd.stop() == 0
    # the old count gave up at the third attempt (A700, timeout, C000): one refusal only
    assert len(calls) == 5
    info = json.loads(sidecar.read_text())["destinations"]["pacs"]
    assert (info["attempts"], info["refusals"], info["transient_failures"]) == (5, 3, 2)
    assert "3 refused, 2 transient" in info["meaning"]


# -- a file name that is not UTF-8 (item 1) -------------------------------------------------


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_latin1_file_name_is_delivered_and_logged_escaped(
    fwd: Forwarder, scp: SCP, corpus: Corpus, log_format: str
) -> None:
    fwd.configure(
        [dest("pacs", scp.port)],
        log={"level": "debug", "format": log_format},
        disposition={"on_success": "move"},
    ).start()
    name = os.fsdecode(b"caf\xe9.dcm")  # Latin-1: not valid UTF-8
    odd = corpus.write(fwd.inbox / name)
    good = corpus.write(fwd.inbox / "good.dcm")
    fwd.wait(has_all(scp, [odd, good]), what="both files delivered")
    archived = fwd.archive / name
    fwd.wait(archived.exists, what="the odd file archived under its own name")
    assert os.fsencode(archived.name) == b"caf\xe9.dcm"
    # the rows point at the archived file, byte for byte
    fwd.wait(
        lambda: [d.path for d in fwd.deliveries() if d.sop_instance_uid == odd] == [str(archived)],
        what="the odd file's row pointing at its archived name",
    )
    for argv in (["find", odd], ["queue", "list", "--state", "all"], ["find", odd, "--json"]):
        shown = cli(fwd, *argv)
        assert shown.returncode == 0, shown.stderr
        assert "Traceback" not in shown.stderr
        assert "caf\\udce9.dcm" in shown.stdout or "caf\\xe9.dcm" in shown.stdout, argv
    # a restart (the old enqueuer crashed again on every start) finds nothing wrong
    assert fwd.stop() == 0
    fwd.start()
    late = corpus.write(fwd.inbox / os.fsdecode(b"late-\xff.dcm"))
    fwd.wait(has_all(scp, [late]), what="a later odd name delivered")
    assert fwd.stop() == 0
    log = fwd.log.read_bytes()
    assert b"Traceback" not in log and b"crashed" not in log
    # escaped, never raw (in JSON the escape's backslash is itself escaped)
    assert any(form in log for form in (b"caf\\xe9.dcm", b"caf\\\\xe9.dcm", b"caf\\udce9.dcm"))
    assert b"caf\xe9" not in log


# -- a second daemon (items 7 and 8) ----------------------------------------------------------


def run_once(cfg: Path, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """``forwarder run`` that is expected to refuse to start: its status and output."""
    return subprocess.run(
        [sys.executable, "-m", "forwarder", "run", "--config", str(cfg)],
        cwd=ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_second_daemon_on_the_same_outbox_exits_75_naming_the_first(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    fwd.configure([dest("pacs", scp.port)]).start()
    uids = corpus.many(fwd.inbox, 30)
    second = run_once(fwd.cfg)
    assert second.returncode == EX_TEMPFAIL, second.stderr
    lines = [line for line in second.stderr.splitlines() if " E: " in line]
    assert len(lines) == 1, second.stderr
    assert f"outbox {fwd.outbox_path} is in use by pid {fwd.pid}" in lines[0]
    assert "Traceback" not in second.stderr
    fwd.wait(has_all(scp, uids), what="the first daemon sends everything")
    assert fwd.alive()
    # operator commands still read the outbox while the daemon holds it
    status = cli(fwd, "status")
    assert status.returncode == 0, status.stderr
    assert fwd.stop() == 0
    assert sorted(scp.uids()) == sorted(uids)  # nothing twice
    # the lock goes with the daemon: the next start takes it
    fwd.start()
    assert fwd.stop() == 0


def test_a_second_daemon_on_the_same_inbox_exits_75_naming_the_first(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    fwd.configure([dest("pacs", scp.port)]).start()
    other = fwd.tmp / "other.toml"
    config = {**fwd.config, "outbox": {"path": str(fwd.tmp / "other" / "outbox.sqlite3")}}
    other.write_text(to_toml(config))
    second = run_once(other)
    assert second.returncode == EX_TEMPFAIL, second.stderr
    assert f"inbox {fwd.inbox} is in use by pid {fwd.pid}" in second.stderr
    # the lock file is not taken for a file to send
    uids = corpus.many(fwd.inbox, 5)
    fwd.wait(has_all(scp, uids))
    assert (fwd.inbox / ".forwarder.lock").exists()
    assert fwd.stop() == 0
    assert sorted(scp.uids()) == sorted(uids)
    assert fwd.quarantined() == []


def test_the_inbox_lock_is_ignored_even_when_dotfiles_are_not(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    fwd.configure([dest("pacs", scp.port)], watch={"ignore": ["*.part"]}).start()
    uid = corpus.write(fwd.inbox / "x.dcm")
    fwd.wait(has_all(scp, [uid]))
    assert fwd.stop() == 0
    assert fwd.quarantined() == []
    assert "forwarder.lock" not in fwd.text()


# -- an outbox that cannot be written or is damaged (items 16 and 5) --------------------------


@contextmanager
def immutable(path: Path) -> Iterator[None]:
    """``chattr +i``: not even root may write the file (our tests run as root)."""
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        if os.environ.get("REQUIRE_TEST_TOOLS"):
            pytest.fail(f"chattr +i {path} failed: {done.stderr}")
        pytest.skip(f"chattr +i not possible here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_outbox_file_exits_73_with_one_line(fwd: Forwarder, scp: SCP) -> None:
    fwd.configure([dest("pacs", scp.port)]).start()
    assert fwd.stop() == 0
    with immutable(fwd.outbox_path):
        refused = run_once(fwd.cfg)
    assert refused.returncode == EX_CANTCREAT, refused.stderr
    assert "Traceback" not in refused.stderr
    lines = [line for line in refused.stderr.splitlines() if " E: " in line]
    assert len(lines) == 1, refused.stderr
    assert "outbox.path" in lines[0] and str(fwd.outbox_path) in lines[0]
    assert "readonly" in lines[0] or "read-only" in lines[0]


def _fill_and_damage(outbox_path: Path) -> None:
    """An outbox with 3000 rows whose middle pages are then overwritten with garbage."""
    with Outbox(outbox_path) as ob:
        recs = [
            DicomInfo(Path(f"/old/{i}.dcm"), 1000, i, "1.2.840.10008.5.1.4.1.1.7", f"1.2.3.{i}",
                      "1.2.840.10008.1.2.1", "1.2.9", 0)
            for i in range(3000)
        ]  # fmt: skip
        ob.enqueue_many(recs, ["retired"], 1.0)
    with closing(sqlite3.connect(outbox_path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = outbox_path.stat().st_size
    with open(outbox_path, "r+b") as fp:
        for offset in range(4 * 4096, size - 4096, 4096):
            fp.seek(offset + 100)
            fp.write(b"\xde\xad\xbe\xef" * 200)


def test_a_damaged_outbox_refuses_to_start_with_73_and_outbox_check_fails(
    fwd: Forwarder, scp: SCP
) -> None:
    fwd.configure([dest("pacs", scp.port)])
    with Outbox(fwd.outbox_path):
        pass
    ok = cli(fwd, "outbox", "check")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("ok: ")
    _fill_and_damage(fwd.outbox_path)
    refused = run_once(fwd.cfg)
    assert refused.returncode == EX_CANTCREAT, refused.stderr
    assert "Traceback" not in refused.stderr
    (line,) = [x for x in refused.stderr.splitlines() if " E: " in x]
    assert str(fwd.outbox_path) in line and "damaged" in line
    assert "forwarder outbox check" in line and "backup" in line
    for argv in (["outbox", "check"], ["outbox", "check", "--quick"]):
        check = cli(fwd, *argv)
        assert check.returncode == 1, check.stdout + check.stderr
        assert check.stdout.startswith(f"damaged: {fwd.outbox_path}")
        assert "Traceback" not in check.stderr


# -- a full disk under the outbox (item 4) ----------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of its own (root only), unmounted at the end."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        if os.environ.get("REQUIRE_TEST_TOOLS"):
            pytest.fail(f"mounting a small tmpfs failed (run as root): {done.stderr}")
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder: Path) -> Path:
    """Write a file until the file system refuses another byte; return it."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as fp:
        try:
            while True:
                fp.write(b"\0" * 65536)
        except OSError:
            pass
    return filler


def outbox_full_lines(fwd: Forwarder) -> list[str]:
    return [x for x in fwd.text(since_start=True).splitlines() if "disk holding the outbox" in x]


def test_a_full_disk_holds_new_files_in_the_inbox_and_sending_resumes_by_itself(
    fwd: Forwarder, scp: SCP, corpus: Corpus, small_fs: Path
) -> None:
    fwd.outbox_path = small_fs / "outbox.sqlite3"
    fwd.configure([dest("pacs", scp.port)], watch={"rescan_seconds": 1}).start()
    first = corpus.write(fwd.inbox / "first.dcm")
    fwd.wait(has_all(scp, [first]))
    filler = fill(small_fs)
    uids = corpus.many(fwd.inbox, 20)
    fwd.wait(lambda: outbox_full_lines(fwd), timeout=20, what="the full disk reported")
    fwd.wait(lambda: fwd.health().returncode == 1, what="health failing")
    assert "full" in fwd.health().stderr
    fwd.wait(lambda: fwd.text(since_start=True).count("outbox") > 0)
    assert fwd.alive()
    assert set(uids).isdisjoint(scp.uids())
    assert len(fwd.inbox_files()) == 20  # nothing lost, nothing taken
    assert len([x for x in outbox_full_lines(fwd) if " E: " in x]) == 1  # once a minute
    filler.unlink()
    fwd.wait(has_all(scp, uids), timeout=30, what="sending resumed by itself")
    fwd.wait(lambda: not fwd.inbox_files(), what="the inbox emptied")
    fwd.wait(lambda: fwd.health().returncode == 0, what="healthy again")
    assert "can be written again" in fwd.text(since_start=True)
    # a start on a full disk does not crash either (SQLite cannot even create its WAL
    # files): it waits for room, and then starts by itself
    assert fwd.stop() == 0
    filler = fill(small_fs)
    fwd.start(wait=False)
    late = corpus.write(fwd.inbox / "late.dcm")
    fwd.wait(lambda: outbox_full_lines(fwd), timeout=20, what="the full disk reported at start")
    assert fwd.alive() and fwd.inbox_files() == [fwd.inbox / "late.dcm"]
    assert fwd.health().returncode == 1
    filler.unlink()
    fwd.wait_log("watching", timeout=20)
    fwd.wait(has_all(scp, [late]), timeout=30, what="sending after a start on a full disk")
    assert fwd.stop() == 0
    assert "Traceback" not in fwd.text()
    assert sorted(scp.uids()) == sorted([first, *uids, late])


# -- nothing from one row, and no damage found at run time, leaves a zombie (items 6, 5) ----


def _damage(path: Path, start_page: int = 2) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as fp:
        for offset in range(start_page * 4096, size, 4096):
            fp.seek(offset)
            fp.write(b"\xde\xad\xbe\xef" * 1024)


def test_damage_found_while_running_stops_the_daemon_with_73(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    fwd.configure([dest("pacs", scp.port)])
    with Outbox(fwd.outbox_path) as ob:
        recs = [
            DicomInfo(Path(f"/old/{i}.dcm"), 1000, i, "1.2.840.10008.5.1.4.1.1.7", f"1.2.3.{i}",
                      "1.2.840.10008.1.2.1", "1.2.9", 0)
            for i in range(3000)
        ]  # fmt: skip
        ob.enqueue_many(recs, ["retired"], 1.0)
    with closing(sqlite3.connect(fwd.outbox_path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    fwd.start()
    first = corpus.write(fwd.inbox / "first.dcm")
    fwd.wait(has_all(scp, [first]))
    _damage(fwd.outbox_path)
    corpus.write(fwd.inbox / "second.dcm")  # its look-up reads damaged pages
    assert fwd.proc is not None
    status = fwd.proc.wait(30)
    assert status == EX_CANTCREAT, fwd.tail()
    text = fwd.text()
    assert "forwarder outbox check" in text and "backup" in text
    assert fwd.health().returncode == 1


def test_a_row_that_breaks_the_sender_does_not_stop_its_worker(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    fwd.configure([dest("pacs", scp.port)])
    # a row as a buggy older version could have queued it: a UID that is not ASCII
    bad = fwd.inbox / "bad.dcm"
    corpus.write(bad)
    st = bad.stat()
    with Outbox(fwd.outbox_path) as ob:
        rec = DicomInfo(
            bad, st.st_size, st.st_mtime_ns, "1.2.840.10008.5.1.4.1.1.7",
            "1.2.826.0.1.3680043.10.999.\u00e9", "1.2.840.10008.1.2.1", "1.2.9",
            dataset_offset=inspect(bad).dataset_offset,
        )  # fmt: skip
        ob.enqueue(rec, ["pacs"], 1.0)
    fwd.start()
    good = corpus.many(fwd.inbox, 5)
    fwd.wait(has_all(scp, good), timeout=30, what="the good files past the bad row")
    fwd.wait(
        lambda: (
            [d.state for d in fwd.deliveries() if d.sop_instance_uid == rec.sop_instance_uid]
            == [State.QUARANTINED]
        ),
        timeout=30,
        what="the bad row quarantined after a few tries",
    )
    assert fwd.alive()
    assert fwd.health().returncode == 0, fwd.health().stderr
    later = corpus.write(fwd.inbox / "later.dcm")
    fwd.wait(has_all(scp, [later]))
    assert fwd.stop() == 0
    assert "died" not in fwd.text()
    assert (fwd.quarantine / "bad.dcm").exists()


# -- find on a destination that refuses connections (item 21) --------------------------------


def test_find_says_a_delivery_to_a_refusing_destination_is_paused_until_when_and_why(
    fwd: Forwarder, corpus: Corpus
) -> None:
    port = free_port()  # nothing listens: every connection is refused
    fwd.configure([dest("pacs", port)], retry={"initial_seconds": 30, "max_seconds": 60}).start()
    uid = corpus.write(fwd.inbox / "x.dcm")
    fwd.wait_log("paused", timeout=20)
    shown = cli(fwd, "find", uid)
    assert shown.returncode == 0, shown.stderr
    (row,) = [x for x in shown.stdout.splitlines() if x.startswith(uid) and " pacs " in x]
    assert "inflight" not in row and "sending now" not in row, row
    assert " paused " in row and " until " in row, row
    assert "refused" in row or "connect" in row, row
    as_json = json.loads(cli(fwd, "find", uid, "--json").stdout)
    (d,) = as_json["deliveries"]
    assert d["paused_until"] is not None
    assert "refused" in d["pause_reason"] or "connect" in d["pause_reason"]
    assert fwd.stop() == 0


def test_a_stage_thread_that_ended_stops_the_daemon_with_70(tmp_path: Path) -> None:
    settings = Settings(
        watch={"paths": [tmp_path / "inbox"]},
        outbox={"path": tmp_path / "outbox.sqlite3"},
        quarantine={"dir": tmp_path / "quarantine"},
        destinations=[{"name": "pacs", "host": "127.0.0.1", "port": 104}],
    )
    d = Daemon(settings, None)
    try:
        d._check_stages()  # the enqueuer never ran: as good as dead
        assert d.exit_status == EX_SOFTWARE and d.stopping.is_set()
        d.die("a later reason", EX_CANTCREAT)
        assert d.exit_status == EX_SOFTWARE  # the first reason wins
    finally:
        d.outbox.close()


# -- a bounded outbox (issue 11) --------------------------------------------------------------


def test_delivered_rows_leave_the_outbox_after_keep_sent_days_others_stay(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    keep_days = 0.00003  # 2.6 s
    scp.statuses = [0xA900, 0xA700]  # the first store refused for good, the second to retry
    fwd.configure(
        [dest("pacs", scp.port)],
        outbox={"keep_sent_days": keep_days},
        retry={"initial_seconds": 300, "max_seconds": 600},
    ).start()
    sent = corpus.many(fwd.inbox, 30)
    fwd.wait(lambda: len(scp.uids()) == 28, 30, "28 instances stored")

    def by_state() -> Counter[State]:
        return Counter(d.state for d in fwd.deliveries())

    fwd.wait(lambda: by_state()[State.SENT] == 28, 20, "28 deliveries recorded as sent")
    fwd.wait(lambda: State.SENT not in by_state(), 30, "the delivered rows pruned")
    assert by_state() == {State.QUARANTINED: 1, State.PENDING: 1}  # never pruned

    def pruned() -> int:  # one line per pass, logged once the pass is over
        return sum(map(int, re.findall(r"pruned (\d+) delivered row", fwd.text())))

    fwd.wait(lambda: pruned() == 28, 10, "the pruning logged")
    gone = next(uid for uid in sent if uid in scp.uids())
    found = cli(fwd, "find", gone)
    assert found.returncode == 1
    assert "past retention" in found.stdout + found.stderr
    assert fwd.stop() == 0


def test_a_reload_that_turns_retention_on_prunes_without_a_restart(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    fwd.configure([dest("pacs", scp.port)], outbox={"keep_sent_days": 0}).start()
    corpus.many(fwd.inbox, 5)
    fwd.wait(lambda: [d.state for d in fwd.deliveries()] == [State.SENT] * 5, 20, "5 rows sent")
    fwd.configure([dest("pacs", scp.port)], outbox={"keep_sent_days": 0.00003})  # 2.6 s
    fwd.signal(signal.SIGHUP)
    fwd.wait_log("reloaded")
    fwd.wait(lambda: not fwd.deliveries(), 30, "the delivered rows pruned after the reload")
    assert fwd.stop() == 0
