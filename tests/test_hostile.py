"""Hostile and careless input end to end (issue 10): bad UIDs, control characters in names,
symlinks and hard links in the inbox, and a fuzz run of mutated headers against a real daemon.

Each test drops real files into a real daemon's inbox (or runs ``forwarder send``) against a
real SCP on loopback, and asserts what the peer received and where every file ended.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from conftest import SCP
from test_daemon import Corpus, Forwarder, dest, has_all, once, received

# the daemon fixtures, re-exported for pytest
from test_daemon import corpus as corpus
from test_daemon import fwd as fwd

from forwarder.cli import main as cli_main
from forwarder.outbox import Outbox
from forwarder.send_cli import main as send_main

EXPLICIT_LE = b"1.2.840.10008.1.2.1\x00"


def bad_ts(corpus: Corpus) -> bytes:
    """An instance whose Transfer Syntax UID has a non-ASCII byte (issue 10 item 2)."""
    _, data = corpus.encode()
    assert data.count(EXPLICIT_LE) == 1
    return data.replace(EXPLICIT_LE, b"1.2.840.10008.\xe9.2.1\x00")


def bad_instance(corpus: Corpus) -> bytes:
    """An instance whose SOP Instance UID (meta and data set) has a non-ASCII byte (item 3)."""
    uid, data = corpus.encode()
    bad = uid[:-3].encode() + b"\xe9" + uid[-2:].encode()
    return data.replace(uid.encode(), bad)


def assert_no_crash(text: str) -> None:
    assert "Traceback" not in text and "crashed" not in text, text[-3000:]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """`forwarder send` sets up logging for the process; put it back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


# -- items 2 and 3: a UID that cannot be sent makes the file invalid ------------------------


def test_bad_uids_are_quarantined_and_never_block_the_good_files(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    fwd.configure([dest("pacs", scp.port)]).start()
    (fwd.inbox / "bad-ts.dcm").write_bytes(bad_ts(corpus))
    (fwd.inbox / "bad-uid.dcm").write_bytes(bad_instance(corpus))
    good = corpus.many(fwd.inbox, 5)
    fwd.wait(has_all(scp, good), timeout=20, what="the good files")
    fwd.wait(lambda: len(fwd.quarantined()) == 2, timeout=15, what="2 quarantined files")
    later = corpus.many(fwd.inbox, 3, prefix="later")
    fwd.wait(has_all(scp, later), timeout=15, what="files dropped after the bad ones")
    assert fwd.stop() == 0
    assert received(scp) == once([*good, *later])
    reasons = {
        name: json.loads((fwd.quarantine / f"{name}.json").read_text())["reason"]
        for name in ("bad-ts.dcm", "bad-uid.dcm")
    }
    assert "Transfer Syntax UID (0002,0010) '1.2.840.10008.\\xe9.2.1'" in reasons["bad-ts.dcm"]
    assert "SOP Instance UID" in reasons["bad-uid.dcm"] and "\\xe9" in reasons["bad-uid.dcm"]
    assert not fwd.inbox_files()
    assert_no_crash(fwd.text())


def test_send_skips_a_file_with_a_bad_uid_and_sends_the_rest(
    scp: SCP,
    tmp_path: Path,
    corpus: Corpus,
    restore_logging: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a-bad-ts.dcm").write_bytes(bad_ts(corpus))
    (folder / "b-bad-uid.dcm").write_bytes(bad_instance(corpus))
    good = corpus.write(folder / "c-good.dcm")
    rc = send_main(["127.0.0.1", str(scp.port), str(folder)])
    err = capsys.readouterr().err
    assert rc != 0
    assert scp.uids() == [good]
    skipped = [line for line in err.splitlines() if "skipped" in line]
    assert any("a-bad-ts.dcm" in s and "Transfer Syntax UID" in s for s in skipped), err
    assert any("b-bad-uid.dcm" in s and "SOP Instance UID" in s for s in skipped), err
    assert "Traceback" not in err


# -- item 12: control characters in names and UIDs never reach the log raw ------------------


def test_newlines_and_nul_in_names_and_uids_cannot_forge_log_lines(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    fwd.configure([dest("pacs", scp.port)], log={"level": "debug"}).start()
    forged = "2026-01-01T00:00:00.000+00:00 I: sent: forged.dcm (1.2.3) -> pacs: Success"
    (fwd.inbox / f"x\n{forged}").write_text("not DICOM\n")
    uid, data = corpus.encode()
    nul_uid = uid[:-2].encode() + b"\x00\n"  # NULs inside a UID were seen; padding is stripped
    (fwd.inbox / f"y\r\x1b[2K{forged}.dcm").write_bytes(data.replace(uid.encode(), nul_uid))
    fwd.wait(lambda: len(fwd.quarantined()) == 2, timeout=15, what="2 quarantined files")
    good = corpus.many(fwd.inbox, 2)
    fwd.wait(has_all(scp, good), timeout=15, what="good files")
    assert fwd.stop() == 0
    lines = fwd.text().splitlines()
    assert not [line for line in lines if "forged.dcm" in line and line.startswith("2026-01-01")]
    assert any("x\\n2026-01-01T00:00:00.000+00:00 I: sent: forged.dcm" in li for li in lines)
    assert any("y\\r\\x1b[2K2026" in li for li in lines), fwd.tail()
    raw = fwd.log.read_bytes()
    assert b"\x00" not in raw and b"\x1b" not in raw and b"\r" not in raw
    assert_no_crash(fwd.text())


# -- items 9 and 10: requeue never moves a file from or to outside its folders ---------------


def quarantine_cli(*argv: str) -> tuple[int, str, str]:
    """``forwarder quarantine ARGV`` in this process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            status = cli_main(["quarantine", *argv])
        except SystemExit as exc:
            status = int(exc.code or 0)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def configured(fwd: Forwarder, corpus: Corpus) -> Forwarder:
    """A config and an outbox (no daemon running) with one quarantined file, ``q.dcm``."""
    fwd.configure([dest("pacs", 9)])
    Outbox(fwd.outbox_path).close()
    fwd.quarantine.mkdir()
    corpus.write(fwd.quarantine / "q.dcm")
    return fwd


def test_requeue_refuses_a_path_that_leads_out_of_the_quarantine(
    configured: Forwarder, corpus: Corpus
) -> None:
    fwd = configured
    victim = fwd.tmp / "victim" / "file.dcm"
    corpus.write(victim)
    before = victim.read_bytes()
    (fwd.quarantine / "link.dcm").symlink_to(victim)
    (fwd.quarantine / "dirlink").symlink_to(victim.parent, target_is_directory=True)
    for given in (
        "../victim/file.dcm",
        str(fwd.quarantine / ".." / "victim" / "file.dcm"),
        "link.dcm",
        "dirlink/file.dcm",
    ):
        status, out, err = quarantine_cli("requeue", given, "--config", str(fwd.cfg))
        assert status != 0, (given, out)
        assert "not under quarantine.dir" in err and len(err.strip().splitlines()) == 1, err
        assert victim.read_bytes() == before
        assert not fwd.inbox_files()
    # --all does not take a symlink for a quarantined file either
    status, out, err = quarantine_cli("requeue", "--all", "--config", str(fwd.cfg))
    assert status == 0, err
    assert [p.name for p in fwd.inbox_files()] == ["q.dcm"]
    assert victim.read_bytes() == before and (fwd.quarantine / "link.dcm").is_symlink()


@pytest.mark.parametrize(
    "original",
    [
        "{inbox}/../victim/file.dcm",  # lexically under the inbox, really outside
        "{inbox}/sub/../../victim/file.dcm",
        "{inbox}/escape/file.dcm",  # a symlinked folder in the inbox leading out
        "../victim/file.dcm",  # not absolute
    ],
)
def test_requeue_refuses_a_forged_sidecar_original_path(
    configured: Forwarder, original: str
) -> None:
    fwd = configured
    outside = fwd.tmp / "victim"
    outside.mkdir()
    (fwd.inbox / "escape").symlink_to(outside, target_is_directory=True)
    sidecar = {"reason": "test", "original_path": original.format(inbox=fwd.inbox)}
    (fwd.quarantine / "q.dcm.json").write_text(json.dumps(sidecar))
    status, out, err = quarantine_cli("requeue", "q.dcm", "--config", str(fwd.cfg))
    assert status != 0, out
    assert "cannot requeue" in err and len(err.strip().splitlines()) == 1, err
    assert not list(outside.iterdir())
    assert (fwd.quarantine / "q.dcm").is_file()


def test_requeue_goes_back_to_the_inbox_relative_path(configured: Forwarder) -> None:
    fwd = configured
    sidecar = {"reason": "test", "original_path": str(fwd.inbox / "a" / "b.dcm")}
    (fwd.quarantine / "q.dcm.json").write_text(json.dumps(sidecar))
    status, _out, err = quarantine_cli("requeue", "q.dcm", "--config", str(fwd.cfg))
    assert status == 0, err
    assert fwd.inbox_files() == [fwd.inbox / "a" / "b.dcm"]
    # a sidecar naming a folder that is no longer watched: back at its quarantine path
    (fwd.quarantine / "c").mkdir()
    Path(fwd.inbox / "a" / "b.dcm").rename(fwd.quarantine / "c" / "d.dcm")
    sidecar = {"reason": "test", "original_path": str(fwd.tmp / "old-inbox" / "x.dcm")}
    (fwd.quarantine / "c" / "d.dcm.json").write_text(json.dumps(sidecar))
    status, _out, err = quarantine_cli("requeue", "c/d.dcm", "--config", str(fwd.cfg))
    assert status == 0, err
    assert fwd.inbox_files() == [fwd.inbox / "c" / "d.dcm"]
