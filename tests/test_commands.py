"""Tests for the operator commands (forwarder/commands/) against a real daemon's outbox.

One daemon (``forwarder run`` in a subprocess) forwards real DICOM files to two in-process
SCPs: ``pacs`` stores everything, ``archive`` refuses some instances for good (0xA900),
answers "out of resources" (0xA700) for others and stores the rest. The commands are then
checked against what the SCPs received. The tests of this module share that one run and go
in order: the read-only commands first, then ``queue retry``, ``quarantine requeue`` and
``quarantine purge``, which change it.
"""

from __future__ import annotations

import io
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    free_port,
    make_instance,
    pynetdicom_file,
    start_daemon,
    start_server,
    stop_daemon,
    wait_for,
)
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from forwarder.cli import main as cli_main
from forwarder.commands.config import MASK, masked
from forwarder.dicomfile import inspect
from forwarder.outbox import Mark, Outbox, OutboxError, State
from forwarder.transformpool import SECRET_FILE

REPO = Path(__file__).resolve().parents[1]
N_FILES = 8
REFUSED = {1, 3, 5}  # archive answers 0xA900: quarantined at once
BUSY = {2, 6}  # archive answers 0xA700: retried, in an hour (retry.initial_seconds)
SUBDIR = Path("ct") / "b"  # files 4..7 are dropped here: requeue must restore it
WORKER_IDLE = 45.0  # a worker with nothing due looks at the outbox again within 30 s


# ------------------------------------------------------------------------------- fixtures


@dataclass
class Peer:
    """An in-process Storage SCP (CT, with Verification) that answers per SOP Instance UID."""

    name: str
    refuse: dict[str, int] = field(default_factory=dict)  # uid -> status to answer
    received: Counter[str] = field(default_factory=Counter)  # uid -> stores answered 0x0000
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: Any = None
    port: int = 0

    def start(self) -> Peer:
        ae = AE(ae_title="ANY-SCP")
        ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        ae.add_supported_context(Verification)
        self.server = start_server(ae, evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = self.server.server_address[1]
        return self

    def _on_store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self.lock:
            status = self.refuse.get(uid, 0x0000)
            if status == 0x0000:
                self.received[uid] += 1
        return status

    def counts(self) -> Counter[str]:
        with self.lock:
            return Counter(self.received)

    def fix(self) -> None:
        with self.lock:
            self.refuse.clear()


@dataclass
class Run:
    """The shared daemon run: its folders, config, peers and the instances it was given."""

    root: Path
    config: Path
    inbox: Path
    quarantine: Path
    archive: Path
    outbox: Path
    pacs: Peer
    archive_peer: Peer
    uids: list[str]  # SOP Instance UID of file i
    studies: list[str]  # study A (files 0..3), study B (files 4..7)
    rel: list[Path]  # path of file i relative to the inbox
    proc: subprocess.Popen[bytes]
    log: Path

    def rows(self) -> dict[tuple[str, str], State]:
        """(SOP Instance UID, destination) -> state, straight from the outbox."""
        with Outbox(self.outbox, readonly=True) as ob:
            return {
                (d.sop_instance_uid, d.destination): d.state
                for d in ob.list(states=list(State), limit=10_000)
            }


def write_config(root: Path, pacs: Peer, archive: Peer) -> Path:
    config = root / "forwarder.toml"
    config.write_text(
        f"""
shutdown_timeout = 10

[watch]
paths = ["{root / "inbox"}"]
settle_seconds = 0.2
invalid_grace_seconds = 0.3

[outbox]
path = "{root / "state" / "outbox.sqlite3"}"

[retry]
initial_seconds = 3600
max_seconds = 3600

[disposition]
on_success = "move"
archive_dir = "{root / "sent"}"

[quarantine]
dir = "{root / "quarantine"}"

[sender]
linger_seconds = 0.2

[log]
target = "stderr"

[health]
heartbeat_seconds = 0.5

[[destinations]]
name = "pacs"
host = "127.0.0.1"
port = {pacs.port}

[[destinations]]
name = "archive"
host = "127.0.0.1"
port = {archive.port}
""",
        encoding="utf-8",
    )
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    root = tmp_path_factory.mktemp("ops")
    pacs = Peer("pacs").start()
    archive = Peer("archive").start()
    studies = [generate_uid(), generate_uid()]
    uids = [generate_uid() for _ in range(N_FILES)]
    rel = [Path(f"img{i}.dcm") if i < 4 else SUBDIR / f"img{i}.dcm" for i in range(N_FILES)]
    archive.refuse = {uids[i]: 0xA900 for i in REFUSED} | {uids[i]: 0xA700 for i in BUSY}
    config = write_config(root, pacs, archive)
    inbox = root / "inbox"
    for i in range(N_FILES):
        make_instance(inbox / rel[i], uids[i], studies[0 if i < 4 else 1])
    (inbox / "notes.txt").write_text("not DICOM at all, " * 20, encoding="utf-8")
    log = root / "daemon.log"
    proc = start_daemon(config, log)
    r = Run(
        root=root,
        config=config,
        inbox=inbox,
        quarantine=root / "quarantine",
        archive=root / "sent",
        outbox=root / "state" / "outbox.sqlite3",
        pacs=pacs,
        archive_peer=archive,
        uids=uids,
        studies=studies,
        rel=rel,
        proc=proc,
        log=log,
    )

    def settled() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            rows = r.rows()
        except OutboxError:  # not there yet, or being created
            return False
        want = {(u, "pacs"): State.SENT for u in uids} | {
            (u, "archive"): State.QUARANTINED
            if i in REFUSED
            else State.PENDING
            if i in BUSY
            else State.SENT
            for i, u in enumerate(uids)
        }
        quarantined = [r.quarantine / r.rel[i] for i in REFUSED] + [r.quarantine / "notes.txt"]
        return rows == want and all(p.exists() for p in quarantined)

    try:
        wait_for(settled, 30)
        yield r
    finally:
        stop_daemon(proc)
        pacs.server.shutdown()
        archive.server.shutdown()


@dataclass
class Result:
    status: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def cli(*argv: str) -> Result:
    """Run ``forwarder ARGV`` in this process, capturing its output."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            status = cli_main(list(argv))
        except SystemExit as exc:  # argparse
            status = int(exc.code or 0)
    return Result(status, out.getvalue(), err.getvalue())


def by_name(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in status["destinations"]}


# ------------------------------------------------------------------------------- status


def test_status_json_counts_match_what_the_peers_received(run: Run) -> None:
    res = cli("status", "--config", str(run.config), "--json")
    assert res.status == 0, res.err
    data = res.json()
    assert data["daemon"]["alive"] is True
    assert data["daemon"]["state"] == "running"
    dests = by_name(data)
    assert list(dests) == ["pacs", "archive"]
    pacs, archive = dests["pacs"], dests["archive"]
    assert pacs["sent"] == pacs["sent_last_hour"] == pacs["sent_last_day"] == N_FILES
    assert pacs["sent"] == sum(run.pacs.counts().values())
    assert archive["sent"] == sum(run.archive_peer.counts().values()) == N_FILES - 5
    assert archive["quarantined"] == len(REFUSED)
    assert archive["pending"] == len(BUSY)
    assert pacs["pending"] == pacs["quarantined"] == 0
    assert pacs["oldest_pending_age_seconds"] is None
    assert archive["oldest_pending_age_seconds"] > 0
    assert archive["last_success_at"] is not None and pacs["last_success_at"] is not None
    assert archive["last_refusal"]["status"] in ("0xA900", "0xA700")
    assert archive["paused"] is False and archive["paused_until"] is None
    assert archive["address"] == f"ANY-SCP@127.0.0.1:{run.archive_peer.port}"


def test_status_table_is_readable_at_a_glance(run: Run) -> None:
    res = cli("status", "--config", str(run.config))
    assert res.status == 0, res.err
    lines = res.out.splitlines()
    assert lines[0].startswith("daemon: running, pid ")
    header = lines[1]
    for column in ("DESTINATION", "PENDING", "IN FLIGHT", "SENT 1H", "QUARANTINED", "LAST ERROR"):
        assert column in header
    pacs = next(line for line in lines if line.startswith("pacs "))
    archive = next(line for line in lines if line.startswith("archive "))
    # numbers are right-aligned under their headers
    col = header.index("QUARANTINED") + len("QUARANTINED")
    assert archive[:col].endswith(" 3") and pacs[:col].endswith(" 0")
    assert "0xA" in archive  # the last refusal, with its status


def test_status_without_outbox_says_so(tmp_path: Path) -> None:
    config = tmp_path / "f.toml"
    config.write_text(f'[outbox]\npath = "{tmp_path / "none.sqlite3"}"\n', encoding="utf-8")
    res = cli("status", "--config", str(config))
    assert res.status == 1
    assert "no outbox at" in res.err and "never run" in res.err


# ------------------------------------------------------------------------------- queue


def test_queue_list_shows_the_backlog_by_default(run: Run) -> None:
    res = cli("queue", "list", "--config", str(run.config), "--json")
    assert res.status == 0, res.err
    rows = res.json()["deliveries"]
    assert {(d["sop_instance_uid"], d["destination"], d["state"]) for d in rows} == {
        (run.uids[i], "archive", "pending") for i in BUSY
    }
    assert all(d["attempts"] == 1 and d["last_status"] == "0xA700" for d in rows)
    assert all(d["next_attempt_at"] is not None for d in rows)


def test_queue_list_filters(run: Run) -> None:
    config = ["--config", str(run.config), "--json"]
    quarantined = cli("queue", "list", "--state", "quarantined", *config).json()["deliveries"]
    assert {d["sop_instance_uid"] for d in quarantined} == {run.uids[i] for i in REFUSED}
    study_b = cli("queue", "list", "--state", "all", "--study", run.studies[1], *config)
    assert len(study_b.json()["deliveries"]) == 2 * 4
    pacs_sent = cli("queue", "list", "--state", "sent", "--destination", "pacs", *config)
    assert len(pacs_sent.json()["deliveries"]) == N_FILES
    limited = cli("queue", "list", "--state", "sent,quarantined", "--limit", "2", *config)
    assert len(limited.json()["deliveries"]) == 2 and limited.json()["truncated"] is True
    bad = cli("queue", "list", "--state", "lost", "--config", str(run.config))
    assert bad.status == 2 and "unknown state 'lost'" in bad.err


def test_queue_list_table(run: Run) -> None:
    res = cli("queue", "list", "--config", str(run.config))
    assert res.status == 0
    lines = res.out.splitlines()
    assert lines[0].split()[:4] == ["ID", "DESTINATION", "STATE", "ATTEMPTS"]
    assert len(lines) == 1 + len(BUSY)
    assert all("archive" in line and "pending" in line and "0xA700" in line for line in lines[1:])


def test_queue_list_says_a_paused_destination_is_paused_not_due(tmp_path: Path) -> None:
    # as `forwarder find` does: a waiting row of a paused destination is not "due now"
    db = tmp_path / "outbox.sqlite3"
    path = tmp_path / "a.dcm"
    make_instance(path, "1.2.826.0.1.3680043.2.1125.5.1")
    now = time.time()
    with Outbox(db) as outbox:
        outbox.enqueue_many([inspect(path)], ["pacs"], now - 60)
        outbox.pause_destination("pacs", now + 600, "cannot connect: refused", now, failure=True)
    config = tmp_path / "f.toml"
    config.write_text(
        f'[outbox]\npath = "{db}"\n[[destinations]]\nname = "pacs"\nhost = "127.0.0.1"\n'
        "port = 104\n",
        encoding="utf-8",
    )
    res = cli("queue", "list", "--config", str(config))
    assert res.status == 0, res.err
    (row,) = res.out.splitlines()[1:]
    assert "paused until" in row and "due now" not in row
    assert "cannot connect: refused" in row


# ------------------------------------------------------------------------------- find


def test_find_a_sent_instance(run: Run) -> None:
    res = cli("find", run.uids[0], "--config", str(run.config), "--json")
    assert res.status == 0
    rows = {d["destination"]: d for d in res.json()["deliveries"]}
    assert {k: v["state"] for k, v in rows.items()} == {"pacs": "sent", "archive": "sent"}
    assert all(v["done_at"] and v["last_status"] == "0x0000" for v in rows.values())
    assert rows["pacs"]["file"] == "archive"  # disposition.on_success = move
    assert rows["pacs"]["path"] == str(run.archive / run.rel[0])


def test_find_answers_for_the_uid_a_transform_sent(tmp_path: Path) -> None:
    # a de-identifying destination sent the instance under a new SOP Instance UID: the row
    # keeps it, and `find` answers for either UID
    db = tmp_path / "outbox.sqlite3"
    path = tmp_path / "a.dcm"
    original, sent = "1.2.826.0.1.3680043.2.1125.5.1", "2.25.1234567890123456789"
    make_instance(path, original)
    now = time.time()
    with Outbox(db) as outbox:
        outbox.enqueue_many([inspect(path)], ["research", "pacs"], now - 60)
        (r,) = outbox.claim("research", 10, now, 300)
        (p,) = outbox.claim("pacs", 10, now, 300)
        outbox.mark_many(
            [
                Mark(r.id, State.SENT, 0, sent_as="transformed", sent_uid=sent),
                Mark(p.id, State.SENT, 0),
            ],
            now,
        )
    config = tmp_path / "f.toml"
    config.write_text(f'[outbox]\npath = "{db}"\n', encoding="utf-8")
    for uid in (original, sent):
        res = cli("find", uid, "--config", str(config), "--json")
        assert res.status == 0, res.err
        rows = {d["destination"]: d for d in res.json()["deliveries"]}
        assert rows["research"]["sent_uid"] == sent and rows["pacs"]["sent_uid"] is None
        assert {d["sop_instance_uid"] for d in rows.values()} == {original}
    table = cli("find", sent, "--config", str(config)).out.splitlines()
    assert table[0] == f"{sent}: SOP Instance as sent (original UID {original})"
    research = next(line for line in table if " research " in line)
    assert f"sent as {sent}" in research


def test_find_a_pending_instance(run: Run) -> None:
    res = cli("find", run.uids[2], "--config", str(run.config))
    assert res.status == 0
    assert res.out.splitlines()[0] == f"{run.uids[2]}: SOP Instance"
    pacs = next(line for line in res.out.splitlines() if " pacs " in line)
    archive = next(line for line in res.out.splitlines() if " archive " in line)
    assert " sent " in pacs
    assert " pending " in archive and "next in " in archive and "0xA700" in archive
    assert f"inbox: {run.inbox / run.rel[2]}" in archive


def test_find_a_quarantined_instance(run: Run) -> None:
    res = cli("find", run.uids[1], "--config", str(run.config), "--json")
    rows = {d["destination"]: d for d in res.json()["deliveries"]}
    assert rows["archive"]["state"] == "quarantined"
    assert rows["archive"]["last_status"] == "0xA900"
    assert rows["archive"]["file"] == rows["pacs"]["file"] == "quarantine"
    assert rows["pacs"]["state"] == "sent"


def test_find_a_study_and_an_unknown_uid(run: Run) -> None:
    res = cli("find", run.studies[0], "--config", str(run.config), "--json")
    assert len(res.json()["deliveries"]) == 4 * 2
    table = cli("find", run.studies[0], "--config", str(run.config))
    assert table.out.splitlines()[0] == f"{run.studies[0]}: Study (4 instances)"
    missing = cli("find", "1.2.3.4.5.6.7", "--config", str(run.config))
    assert missing.status == 1 and "not in the outbox" in missing.out


# ------------------------------------------------------------------------------- quarantine


def test_quarantine_list(run: Run) -> None:
    res = cli("quarantine", "list", "--config", str(run.config), "--json")
    assert res.status == 0
    entries = res.json()["entries"]
    refused = [e for e in entries if e["destination"] is not None]
    assert {(e["sop_instance_uid"], e["destination"], e["status"]) for e in refused} == {
        (run.uids[i], "archive", "0xA900") for i in REFUSED
    }
    assert {e["path"] for e in refused} == {str(run.quarantine / run.rel[i]) for i in REFUSED}
    assert all(e["in_quarantine"] and e["quarantined_at"] and e["reason"] for e in refused)
    (never,) = [e for e in entries if e["destination"] is None]
    assert never["path"] == str(run.quarantine / "notes.txt")
    assert never["sop_instance_uid"] is None and "DICOM" in never["reason"]

    table = cli("quarantine", "list", "--config", str(run.config)).out.splitlines()
    assert table[0] == f"quarantine: {run.quarantine}"
    assert table[1].split()[:2] == ["PATH", "SOP"]
    assert any(line.startswith(str(SUBDIR / "img5.dcm")) for line in table)  # relative paths


def test_quarantine_show(run: Run) -> None:
    res = cli("quarantine", "show", str(run.rel[1]), "--config", str(run.config))
    assert res.status == 0, res.err
    out = res.out
    assert f"original:     {run.inbox / run.rel[1]}" in out
    assert "0xA900" in out and "data set does not match SOP class" in out
    assert run.uids[1] in out and run.studies[0] in out
    assert "CT Image Storage" in out
    data = cli(
        "quarantine",
        "show",
        str(run.quarantine / run.rel[1]),
        "--json",
        "--config",
        str(run.config),
    ).json()
    assert data["dicom"]["SOPInstanceUID"] == run.uids[1]
    assert data["sidecar"]["original_path"] == str(run.inbox / run.rel[1])
    assert {d["destination"]: d["state"] for d in data["deliveries"]} == {
        "pacs": "sent",
        "archive": "quarantined",
    }
    notes = cli("quarantine", "show", "notes.txt", "--config", str(run.config))
    assert "destinations: none (never queued)" in notes.out
    assert "DICOM header: " in notes.out
    missing = cli("quarantine", "show", "nope.dcm", "--config", str(run.config))
    assert missing.status == 1 and "no such file" in missing.err


# ------------------------------------------------------------------------------- config


def test_config_check_ok(run: Run) -> None:
    res = cli("config", "check", "--config", str(run.config))
    assert res.status == 0, res.err
    assert res.out.strip() == f"ok: {run.config}: 2 destination(s): pacs, archive"


def test_config_check_names_every_bad_setting(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        f"""
[watch]
paths = ["{tmp_path / "in"}"]
settle_seconds = -1
[metrics]
listen = "127.0.0.1:99999"
[[destinations]]
name = "pacs"
host = "127.0.0.1"
port = 0
called_aet = "THIS-AE-TITLE-IS-TOO-LONG"
""",
        encoding="utf-8",
    )
    res = cli("config", "check", "--config", str(config))
    assert res.status == 78
    lines = res.err.splitlines()
    named = {line.split(": ")[1] for line in lines}
    assert {"watch.settle_seconds", "destinations.0.port", "destinations.0.called_aet"} <= named
    assert all(line.startswith(f"{config}: ") for line in lines)
    # the schema is fine, the layout and the metrics address are not
    config.write_text(
        f"""
[watch]
paths = ["{tmp_path / "in"}"]
[quarantine]
dir = "{tmp_path / "in" / "q"}"
[metrics]
listen = "::1:9108"
[[destinations]]
name = "pacs"
host = "127.0.0.1"
port = 104
[destinations.tls]
ca = "{tmp_path / "missing-ca.pem"}"
""",
        encoding="utf-8",
    )
    res = cli("config", "check", "--config", str(config))
    assert res.status == 78
    named = [line.split(": ")[1].split(" ")[0] for line in res.err.splitlines()]
    assert named == ["quarantine.dir", "metrics.listen", "destinations.0.tls.ca"]


def test_config_show_marks_sources(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORWARDER_DESTINATIONS__1__CALLED_AET", "ARCHIVE-SCP")
    monkeypatch.setenv("FORWARDER_LOG__LEVEL", "debug")
    monkeypatch.setenv("FORWARDER_DESTINATIONS__0__TLS__CA", "/etc/ca.pem")
    res = cli("config", "show", "--config", str(run.config), "--json")
    assert res.status == 0, res.err
    s = res.json()["settings"]
    assert s["destinations.1.called_aet"] == {
        "value": "ARCHIVE-SCP",
        "source": "environment",
        "from": "FORWARDER_DESTINATIONS__1__CALLED_AET",
    }
    assert s["log.level"]["source"] == "environment"
    assert s["destinations.0.tls.ca"]["value"] == "/etc/ca.pem"  # a path is not a secret
    assert s["destinations.0.port"] == {
        "value": run.pacs.port,
        "source": "file",
        "from": str(run.config),
    }
    assert s["watch.recursive"] == {"value": True, "source": "default", "from": None}
    assert s["metrics.listen"]["value"] is None
    table = cli("config", "show", "--config", str(run.config)).out
    line = next(x for x in table.splitlines() if x.startswith("log.level "))
    assert line.split()[1:] == ["debug", "environment", "(FORWARDER_LOG__LEVEL)"]


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        ("destinations.0.tls.key", "value"),
        ("destinations.0.tls.cert", "value"),
        ("destinations.0.host", "value"),
        ("destinations.0.password", MASK),
        ("metrics.api_token", MASK),
        ("x.client_secret", MASK),
        ("x.tls_passphrase", MASK),
    ],
)
def test_config_show_masks_what_is_named_like_a_secret(key: str, shown: str) -> None:
    assert masked(key, "value") == shown
    assert masked(key, None) is None


# ------------------------------------------------------------------------------- echo


def test_echo_live_destinations(run: Run) -> None:
    res = cli("echo", "--config", str(run.config))
    assert res.status == 0, res.out
    lines = res.out.splitlines()
    assert lines[0].split()[:3] == ["DESTINATION", "ADDRESS", "RESULT"]
    for line in lines[1:]:
        assert " ok " in line and line.count(" ms") == 2
    data = cli("echo", "--config", str(run.config), "--destination", "pacs", "--json").json()
    (result,) = data["results"]
    assert result["ok"] is True and result["echo_ms"] > 0 and result["error"] is None


def test_echo_closed_port_fails_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "f.toml"
    config.write_text(
        f'[[destinations]]\nname = "gone"\nhost = "127.0.0.1"\nport = {free_port()}\n'
        "connect_timeout = 2\n",
        encoding="utf-8",
    )
    res = cli("echo", "--config", str(config))
    assert res.status == 1
    (line,) = res.out.splitlines()[1:]
    assert "FAILED" in line and "cannot connect" in line
    data = cli("echo", "--config", str(config), "--json").json()
    error = data["results"][0]["error"]
    assert "\n" not in error and "refused" in error.lower()
    unknown = cli("echo", "--config", str(config), "--destination", "pacs")
    assert unknown.status == 1 and "no destination named 'pacs'" in unknown.err


CERTS = pynetdicom_file("x").parent.parent / "cert_files"


@pytest.fixture
def tls_echo_scp() -> Iterator[int]:
    """A Verification SCP behind TLS with pynetdicom's test certificates (client cert required)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(CERTS / "client.crt"))
    ctx.load_cert_chain(str(CERTS / "server.crt"), str(CERTS / "server.key"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ae = AE(ae_title="TLS-SCP")
    ae.add_supported_context(Verification)
    server = start_server(ae, ssl_context=ctx)
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


def test_echo_uses_the_destination_tls(tls_echo_scp: int, tmp_path: Path) -> None:
    config = tmp_path / "f.toml"
    tls = (
        f'ca = "{CERTS / "server.crt"}"\ncert = "{CERTS / "client.crt"}"\n'
        f'key = "{CERTS / "client.key"}"\n'
    )
    config.write_text(
        f'[[destinations]]\nname = "secure"\nhost = "127.0.0.1"\nport = {tls_echo_scp}\n'
        f'called_aet = "TLS-SCP"\n[destinations.tls]\n{tls}server_name = "pynetdicom.test"\n'
        f'[[destinations]]\nname = "wrong-name"\nhost = "127.0.0.1"\nport = {tls_echo_scp}\n'
        f"[destinations.tls]\n{tls}",
        encoding="utf-8",
    )
    res = cli("echo", "--config", str(config), "--json")
    assert res.status == 1
    secure, wrong = res.json()["results"]
    assert secure["ok"] is True and secure["tls"] is True, secure
    assert secure["address"] == f"TLS-SCP@127.0.0.1:{tls_echo_scp}"
    assert wrong["ok"] is False
    assert "certificate verify failed" in wrong["error"] and "\n" not in wrong["error"]
    only = cli("echo", "--config", str(config), "--destination", "secure")
    assert only.status == 0 and "(TLS)" in only.out


# ------------------------------------------------------------------------------- changes


def test_queue_retry_sends_waiting_deliveries_now(run: Run) -> None:
    busy = {run.uids[i] for i in BUSY}
    run.archive_peer.fix()
    res = cli("queue", "retry", "--config", str(run.config), "--destination", "archive")
    assert res.status == 0, res.err
    assert res.out.startswith(f"{len(BUSY)} deliveries made due now")
    wait_for(lambda: all(run.archive_peer.counts()[u] == 1 for u in busy), WORKER_IDLE)
    wait_for(lambda: all(run.rows()[(u, "archive")] is State.SENT for u in busy), 10)
    wait_for(lambda: all((run.archive / run.rel[i]).exists() for i in BUSY), 10)
    again = cli("queue", "retry", "--config", str(run.config))
    assert again.out.startswith("0 deliveries made due now")


def test_quarantine_requeue_sends_once_more_to_the_refusing_destination_only(run: Run) -> None:
    refused = {run.uids[i] for i in REFUSED}
    before_pacs = run.pacs.counts()
    assert all(before_pacs[u] == 1 for u in refused)
    assert all(run.archive_peer.counts()[u] == 0 for u in refused)
    # file 1 by path (relative to the quarantine), file 5 by its study; file 3 stays
    config = ["--config", str(run.config)]
    res = cli("quarantine", "requeue", str(run.rel[1]), *config)
    assert res.status == 0, res.err
    assert f"-> {run.inbox / run.rel[1]} for archive" in res.out
    res = cli("quarantine", "requeue", "--study", run.studies[1], *config)
    assert res.status == 0, res.err
    assert f"-> {run.inbox / run.rel[5]} for archive" in res.out  # its sub-folder restored
    for i in (1, 5):
        assert not (run.quarantine / run.rel[i]).exists()
        assert not Path(f"{run.quarantine / run.rel[i]}.json").exists()
    requeued = {run.uids[1], run.uids[5]}
    wait_for(lambda: all(run.archive_peer.counts()[u] == 1 for u in requeued), WORKER_IDLE)
    # delivered, then moved out of the inbox like any delivered file
    wait_for(lambda: all((run.archive / run.rel[i]).exists() for i in (1, 5)), 10)
    rows = run.rows()
    assert all(rows[(u, d)] is State.SENT for u in requeued for d in ("pacs", "archive"))
    assert run.pacs.counts() == before_pacs  # pacs had them: never sent again
    archive = run.archive_peer.counts()
    assert all(archive[u] == 1 for u in run.uids if u != run.uids[3])  # exactly once each
    assert archive[run.uids[3]] == 0 and rows[(run.uids[3], "archive")] is State.QUARANTINED
    status = by_name(cli("status", "--json", *config).json())
    assert status["archive"]["quarantined"] == 1 and status["archive"]["pending"] == 0
    nothing = cli("quarantine", "requeue", "--destination", "pacs", *config)
    assert nothing.status == 1 and "nothing to requeue" in nothing.out


def test_quarantine_requeue_needs_a_selection(run: Run) -> None:
    res = cli("quarantine", "requeue", "--config", str(run.config))
    assert res.status == 2 and "one of the arguments" in res.err
    outside = cli("quarantine", "requeue", str(run.config), "--config", str(run.config))
    assert outside.status == 1 and "not under quarantine.dir" in outside.err


def test_quarantine_purge(run: Run) -> None:
    config = ["--config", str(run.config)]
    left = [run.quarantine / run.rel[3], run.quarantine / "notes.txt"]
    assert all(p.exists() for p in left)
    refused = cli("quarantine", "purge", "--older-than", "0", *config)  # stdin is no terminal
    assert refused.status == 1 and "pass --yes" in refused.err
    young = cli("quarantine", "purge", "--older-than", "1", "--yes", *config)
    assert young.status == 0 and "nothing in" in young.out
    assert all(p.exists() for p in left)
    res = cli("quarantine", "purge", "--older-than", "0", "--yes", *config)
    assert res.status == 0, res.err
    assert "deleted 2 of 2" in res.out
    assert not any(p.exists() or Path(f"{p}.json").exists() for p in left)
    assert run.rows()[(run.uids[3], "archive")] is State.GONE  # closed, not left quarantined
    assert cli("quarantine", "list", "--json", *config).json()["entries"] == []
    status = by_name(cli("status", "--json", *config).json())
    assert status["archive"]["quarantined"] == 0


def test_commands_run_as_subprocesses(run: Run) -> None:
    """The installed entry point, with $FORWARDER_CONFIG instead of --config."""
    env = {**os.environ, "FORWARDER_CONFIG": str(run.config)}
    proc = subprocess.run(
        [sys.executable, "-m", "forwarder", "status"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("daemon: running")
    helped = subprocess.run(
        [sys.executable, "-m", "forwarder", "--help"], capture_output=True, text=True, timeout=60
    )
    for name in ("status", "queue", "quarantine", "find", "echo", "config"):
        assert f"    {name}" in helped.stdout


def test_a_reader_that_goes_away_ends_a_command_quietly(tmp_path: Path) -> None:
    # `forwarder config show | head -1`: the pipe closes before the output is written
    cfg = tmp_path / "forwarder.toml"
    cfg.write_text('[[destinations]]\nname = "pacs"\nhost = "127.0.0.1"\nport = 104\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "forwarder", "config", "show", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")},
        cwd=tmp_path,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(30) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err


# -------------------------------------------------------------------------------- route


def _route_config(tmp_path: Path) -> Path:
    config = tmp_path / "routes.toml"
    config.write_text(
        f"""
[watch]
paths = ["{tmp_path / "in"}"]
[routing]
unmatched = "dispose"
[[destinations]]
name = "ct-archive"
host = "127.0.0.1"
port = 104
[destinations.match]
Modality = ["CT", "PT"]
path = "siteA/**"
[destinations.exclude]
SeriesDescription = ["*SCOUT*", "*LOCALIZER*"]
[[destinations]]
name = "mr-station"
host = "127.0.0.1"
port = 105
match = {{ Modality = "MR" }}
""",
        encoding="utf-8",
    )
    return config


def _instance(path: Path, modality: str, series: str = "AX 5mm") -> Path:
    from pydicom import dcmread

    make_instance(path, generate_uid())
    ds = dcmread(path)
    ds.Modality = modality
    ds.SeriesDescription = series
    ds.save_as(path, enforce_file_format=True)
    return path


def test_route_test_explains_each_decision(tmp_path: Path) -> None:
    config = _route_config(tmp_path)
    ct = _instance(tmp_path / "in" / "siteA" / "ct.dcm", "CT")
    mr = _instance(tmp_path / "in" / "siteB" / "mr.dcm", "MR")
    res = cli("route", "test", "--config", str(config), str(ct), str(mr))
    assert res.status == 0, res.err
    assert res.out.splitlines() == [
        f"{ct}:",
        "  ct-archive: yes, as is (Explicit VR Little Endian)",
        "  mr-station: no: Modality 'CT' does not match 'MR'",
        f"{mr}:",
        "  ct-archive: no: Modality 'MR' does not match ['CT', 'PT']",
        "  mr-station: yes, as is (Explicit VR Little Endian)",
    ]


def test_route_test_json_and_status_when_a_file_goes_nowhere(tmp_path: Path) -> None:
    config = _route_config(tmp_path)
    scout = _instance(tmp_path / "in" / "siteA" / "scout.dcm", "CT", "CHEST SCOUT")
    ct_b = _instance(tmp_path / "in" / "siteB" / "ct.dcm", "CT")
    junk = tmp_path / "in" / "junk.dcm"
    junk.write_bytes(b"not dicom")
    res = cli("route", "test", "--config", str(config), str(scout), "--json")
    assert res.status == 1
    (report,) = res.json()["files"]
    assert report["destinations"] == [] and report["unmatched"] == "dispose"
    assert report["path"] == "siteA/scout.dcm"
    assert report["not"] == {
        "ct-archive": "SeriesDescription 'CHEST SCOUT' is excluded by ['*SCOUT*', '*LOCALIZER*']",
        "mr-station": "Modality 'CT' does not match 'MR'",
    }
    res = cli("route", "test", "--config", str(config), str(ct_b), str(junk))
    assert res.status == 1
    assert "  ct-archive: no: path 'siteB/ct.dcm' does not match 'siteA/**'" in res.out
    assert "  no destination wants it: routing.unmatched = dispose" in res.out
    assert f"{junk}:\n  not valid DICOM: " in res.out


def test_route_test_shows_what_each_transform_would_change(tmp_path: Path) -> None:
    from pydicom import dcmread

    config = _route_config(tmp_path)
    config.write_text(
        config.read_text()
        + f"""
[outbox]
path = "{tmp_path / "state" / "outbox.sqlite3"}"
[[destinations]]
name = "research"
host = "127.0.0.1"
port = 106
[destinations.transform]
set = {{ PatientID = "R-{{PatientID}}" }}
remove = ["SeriesDescription"]
transfer_syntax = "jpeg-ls-lossless"
[[destinations]]
name = "anon"
host = "127.0.0.1"
port = 107
[destinations.transform]
deidentify = "basic"
""",
        encoding="utf-8",
    )
    ct = _instance(tmp_path / "in" / "siteA" / "ct.dcm", "CT")
    ds = dcmread(ct)
    patient, uid = str(ds.PatientID), str(ds.SOPInstanceUID)
    res = cli("route", "test", "--config", str(config), str(ct))
    assert res.status == 0, res.err
    lines = res.out.splitlines()
    at = lines.index("  research: yes, transformed:")
    assert lines[at + 1 : at + 4] == [  # in tag order
        "    SeriesDescription: 'AX 5mm' -> (removed)",
        f"    PatientID: {patient!r} -> 'R-{patient}'",
        "    sent as JPEG-LS Lossless Image Compression",
    ]
    assert "  anon: yes, transformed:" in lines
    assert any(line.startswith("    SOPInstanceUID: ") for line in lines)
    # no key yet (the daemon makes it at its first start): the UIDs shown are not the ones
    assert "no de-identification key yet" in res.err
    assert not (tmp_path / "state").exists()  # route test writes nothing
    report = cli("route", "test", "--config", str(config), str(ct), "--json").json()
    (one,) = report["files"]
    anon = {c["attribute"]: c for c in one["transforms"]["anon"]["changes"]}
    assert anon["SOPInstanceUID"]["old"] == uid and anon["SOPInstanceUID"]["new"] != uid
    assert anon["PatientID"]["old"] == patient and anon["PatientID"]["new"] != patient
    assert one["transforms"]["research"]["transfer_syntax"] == "1.2.840.10008.1.2.4.80"
    assert "ct-archive" not in one["transforms"]  # no transform: sent as is
    # a burned-in instance: the de-identifying destination would refuse it
    ds.BurnedInAnnotation = "YES"
    ds.save_as(ct, enforce_file_format=True)
    res = cli("route", "test", "--config", str(config), str(ct))
    assert "  anon: yes, but its transform refuses it: burned-in annotation" in res.out


@pytest.mark.parametrize("damage", ["text", "folder"])
def test_route_test_with_an_unreadable_key_still_answers(tmp_path: Path, damage: str) -> None:
    """The key kept by the daemon's user (mode 0600) read by an admin, or damaged: route
    test answers (the new UIDs shown are not the ones sent, and says why), no traceback."""
    config = _route_config(tmp_path)
    state = tmp_path / "state"
    config.write_text(
        config.read_text()
        + f"""
[outbox]
path = "{state / "outbox.sqlite3"}"
[[destinations]]
name = "anon"
host = "127.0.0.1"
port = 107
[destinations.transform]
deidentify = "basic"
""",
        encoding="utf-8",
    )
    key = state / SECRET_FILE
    if damage == "text":
        state.mkdir()
        key.write_text("not a key\n")
    else:
        key.mkdir(parents=True)  # reading it fails with an OSError, as EACCES would
    ct = _instance(tmp_path / "in" / "siteA" / "ct.dcm", "CT")
    res = cli("route", "test", "--config", str(config), str(ct))
    assert res.status == 0, res.err
    assert "  anon: yes, transformed:" in res.out.splitlines()
    assert "Traceback" not in res.err
    (note,) = [line for line in res.err.splitlines() if SECRET_FILE in line]
    assert "cannot read" in note and "not the ones it will send" in note


def test_route_test_with_a_bad_rule_exits_78_naming_it(tmp_path: Path) -> None:
    config = _route_config(tmp_path)
    config.write_text(config.read_text().replace('Modality = "MR"', 'Modalty = "MR"'))
    ct = _instance(tmp_path / "in" / "siteA" / "ct.dcm", "CT")
    for argv in (["route", "test", str(ct)], ["config", "check"]):
        res = cli(*argv, "--config", str(config))
        assert res.status == 78
        assert "destinations.1.match.Modalty" in res.err and "not a DICOM keyword" in res.err
