"""Tests for forwarder.logs: text and JSON lines, journald fields, JOURNAL_STREAM detection."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import pytest

from forwarder import logs
from forwarder.logs import (
    JournalHandler,
    escape,
    fields,
    iso,
    journal_fields,
    journal_stream_matches,
    setup_logging,
    syslog_priority,
)

log = logging.getLogger("forwarder.test")

TEXT_LINE = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d) (?P<level>[DIWEC]): (?P<msg>.*)$"
)


def owned_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, "_forwarder_owned", False)]


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    level = root.level
    chatty = {name: logging.getLogger(name).level for name in logs.CHATTY_LOGGERS}
    yield
    for handler in owned_handlers():
        root.removeHandler(handler)
    root.setLevel(level)
    for name, value in chatty.items():
        logging.getLogger(name).setLevel(value)


class Sent:
    """A stand-in for systemd.journal.sendv that keeps what it was given."""

    def __init__(self) -> None:
        self.entries: list[dict[str, str]] = []

    def __call__(self, *lines: str) -> None:
        self.entries.append(dict(line.split("=", 1) for line in lines))


def make_record(msg: str = "sent %s", *args: Any, **extra: Any) -> logging.LogRecord:
    record = log.makeRecord(
        log.name, logging.WARNING, "/src/forwarder/sender.py", 42, msg, args, None, "send", extra
    )
    return record


# --- fields() ---------------------------------------------------------------------------------


def test_fields_drops_none() -> None:
    assert fields(path="/in/a.dcm", sop_instance_uid=None, outcome="sent") == {
        "fwd": {"path": "/in/a.dcm", "outcome": "sent"}
    }
    assert fields() == {"fwd": {}}


# --- text ---------------------------------------------------------------------------------------


def test_text_format() -> None:
    out = io.StringIO()
    setup_logging("info", "text", "stderr", stream=out)
    log.info("queued %s", "a.dcm", extra=fields(path="a.dcm"))
    log.debug("not shown")
    log.warning("paused %s", "pacs")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (TEXT_LINE.match(line) for line in lines)
    assert first and second
    assert (first["level"], first["msg"]) == ("I", "queued a.dcm")
    assert (second["level"], second["msg"]) == ("W", "paused pacs")
    stamp = datetime.fromisoformat(first["ts"])
    assert stamp.tzinfo is not None
    assert abs((datetime.now(stamp.tzinfo) - stamp).total_seconds()) < 60


def test_text_traceback_follows_the_line() -> None:
    out = io.StringIO()
    setup_logging("info", "text", "stderr", stream=out)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("worker died")
    lines = out.getvalue().splitlines()
    assert TEXT_LINE.match(lines[0]) and lines[0].endswith("E: worker died")
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "RuntimeError: boom"


# --- json ---------------------------------------------------------------------------------------


def test_json_lines_carry_fields() -> None:
    out = io.StringIO()
    setup_logging("debug", "json", "stderr", stream=out)
    log.info(
        "sent %s",
        "a.dcm",
        extra=fields(
            path=Path("/in/a.dcm"),
            sop_instance_uid="1.2.3",
            study_uid="1.2",
            destination="pacs",
            outcome="sent",
            status="0x0000",
            attempt=2,
        ),
    )
    log.debug("plain ünïcode")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first == {
        "ts": first["ts"],
        "level": "info",
        "logger": "forwarder.test",
        "msg": "sent a.dcm",
        "path": "/in/a.dcm",
        "sop_instance_uid": "1.2.3",
        "study_uid": "1.2",
        "destination": "pacs",
        "outcome": "sent",
        "status": "0x0000",
        "attempt": 2,
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert second["msg"] == "plain ünïcode" and second["level"] == "debug"
    assert "exc" not in second


def test_json_exception_and_reserved_keys() -> None:
    out = io.StringIO()
    setup_logging("info", "json", "stderr", stream=out)
    try:
        raise ValueError("bad file")
    except ValueError:
        log.exception("quarantined", extra=fields(outcome="quarantined", msg="not mine"))
    (line,) = out.getvalue().splitlines()  # the traceback stays inside the one line
    entry = json.loads(line)
    assert entry["msg"] == "quarantined"
    assert entry["level"] == "error"
    assert entry["outcome"] == "quarantined"
    assert entry["exc"].startswith("Traceback (most recent call last):")
    assert entry["exc"].endswith("ValueError: bad file")


# --- set-up behaviour ---------------------------------------------------------------------------


def test_idempotent_and_leaves_foreign_handlers() -> None:
    root = logging.getLogger()
    foreign = logging.NullHandler()
    root.addHandler(foreign)
    try:
        first, second = io.StringIO(), io.StringIO()
        setup_logging("info", "text", "stderr", stream=first)
        setup_logging("info", "json", "stderr", stream=second)
        assert len(owned_handlers()) == 1
        assert foreign in root.handlers
        log.info("once")
        assert first.getvalue() == ""
        assert len(second.getvalue().splitlines()) == 1
    finally:
        root.removeHandler(foreign)


def test_pynetdicom_capped_unless_debug() -> None:
    out = io.StringIO()
    setup_logging("info", "text", "stderr", stream=out)
    assert logging.getLogger().level == logging.INFO
    assert logging.getLogger("pynetdicom").level == logging.WARNING
    logging.getLogger("pynetdicom.assoc").info("Requesting Association")
    assert out.getvalue() == ""
    setup_logging("debug", "text", "stderr", stream=out)
    assert logging.getLogger("pynetdicom").getEffectiveLevel() == logging.DEBUG
    logging.getLogger("pynetdicom.assoc").info("Requesting Association")
    assert "Requesting Association" in out.getvalue()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("loud", "text", "auto"), "level"),
        (("info", "xml", "auto"), "format"),
        (("info", "text", "syslog"), "target"),
    ],
)
def test_rejects_unknown_values(args: tuple[str, str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        setup_logging(*args, stream=io.StringIO())
    assert owned_handlers() == []


def test_nothing_configured_at_import() -> None:
    import subprocess

    code = (
        "import logging, forwarder.logs, forwarder.notify; "
        "print(len(logging.getLogger().handlers), logging.getLogger().level)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["0", str(logging.WARNING)]


# --- journald -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("levelno", "priority"),
    [(5, 7), (10, 7), (15, 6), (20, 6), (25, 4), (30, 4), (40, 3), (50, 2), (60, 1)],
)
def test_syslog_priority(levelno: int, priority: int) -> None:
    assert syslog_priority(levelno) == priority


def test_journal_fields_mapping() -> None:
    record = make_record(
        "sent %s",
        "a.dcm",
        **fields(
            path=Path("/in/a.dcm"),
            sop_instance_uid="1.2.3",
            study_uid="1.2",
            destination="pacs",
            outcome="quarantined",
            status="0xA900",
            attempt=3,
            **{"peer aet": "X"},
        ),
    )
    entry = journal_fields(record)
    assert entry == {
        "MESSAGE": "sent a.dcm",
        "PRIORITY": "4",
        "SYSLOG_IDENTIFIER": "forwarder",
        "LOGGER": "forwarder.test",
        "THREAD_NAME": record.threadName,
        "CODE_FILE": "/src/forwarder/sender.py",
        "CODE_LINE": "42",
        "CODE_FUNC": "send",
        "FORWARDER_PATH": "/in/a.dcm",
        "DICOM_SOP_INSTANCE_UID": "1.2.3",
        "DICOM_STUDY_UID": "1.2",
        "FORWARDER_DESTINATION": "pacs",
        "FORWARDER_OUTCOME": "quarantined",
        "FORWARDER_STATUS": "0xA900",
        "FORWARDER_ATTEMPT": "3",
        "FORWARDER_PEER_AET": "X",
    }


def test_journal_fields_exception_and_no_fields() -> None:
    try:
        raise OSError("disk full")
    except OSError:
        record = log.makeRecord(
            log.name, logging.ERROR, __file__, 1, "move failed", (), sys.exc_info()
        )
    entry = journal_fields(record)
    assert entry["PRIORITY"] == "3"
    assert entry["MESSAGE"].startswith("move failed\nTraceback")
    assert entry["EXCEPTION_TEXT"].endswith("OSError: disk full")
    assert not [key for key in entry if key.startswith(("FORWARDER_", "DICOM_"))]


def test_journal_handler_sends_fields() -> None:
    sent = Sent()
    handler = JournalHandler(sender=sent)
    logger = logging.getLogger("forwarder.test.journal")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("paused %s", "pacs", extra=fields(destination="pacs", outcome="paused"))
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    (entry,) = sent.entries
    assert entry["MESSAGE"] == "paused pacs"
    assert entry["PRIORITY"] == "4"
    assert entry["FORWARDER_DESTINATION"] == "pacs"
    assert entry["FORWARDER_OUTCOME"] == "paused"
    assert entry["SYSLOG_IDENTIFIER"] == "forwarder"


def test_journal_handler_uses_systemd_python() -> None:
    journal = pytest.importorskip("systemd.journal", reason="systemd-python not installed")
    assert logs._load_journal() is journal.sendv
    assert JournalHandler()._sender is journal.sendv


# --- JOURNAL_STREAM detection -------------------------------------------------------------------


@pytest.fixture
def real_stream(tmp_path: Path) -> Iterator[TextIO]:
    with open(tmp_path / "stderr.log", "w+", encoding="utf-8") as stream:
        yield stream


def stream_id(stream: TextIO) -> str:
    st = os.fstat(stream.fileno())
    return f"{st.st_dev}:{st.st_ino}"


def read_back(stream: TextIO) -> list[str]:
    stream.flush()
    stream.seek(0)
    return stream.read().splitlines()


def test_journal_stream_matches(real_stream: TextIO, tmp_path: Path) -> None:
    ident = stream_id(real_stream)
    assert journal_stream_matches(real_stream, {"JOURNAL_STREAM": ident})
    assert not journal_stream_matches(real_stream, {})
    assert not journal_stream_matches(real_stream, {"JOURNAL_STREAM": "garbage"})
    assert not journal_stream_matches(real_stream, {"JOURNAL_STREAM": "1:x"})
    with open(tmp_path / "other", "w", encoding="utf-8") as other:
        assert not journal_stream_matches(other, {"JOURNAL_STREAM": ident})
    assert not journal_stream_matches(io.StringIO(), {"JOURNAL_STREAM": ident})


def test_auto_picks_journald_on_the_journal_stream(
    real_stream: TextIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = Sent()
    monkeypatch.setattr(logs, "_load_journal", lambda: sent)
    monkeypatch.setenv("JOURNAL_STREAM", stream_id(real_stream))
    setup_logging("info", "text", "auto", stream=real_stream)
    (handler,) = owned_handlers()
    assert isinstance(handler, JournalHandler)
    log.info("ready", extra=fields(outcome="ready"))
    assert [e["MESSAGE"] for e in sent.entries] == ["ready"]
    assert read_back(real_stream) == []


def test_auto_without_systemd_python_prefixes_priority(
    real_stream: TextIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "_load_journal", lambda: None)
    monkeypatch.setenv("JOURNAL_STREAM", stream_id(real_stream))
    setup_logging("info", "text", "auto", stream=real_stream)
    log.info("ready")
    try:
        raise KeyError("x")
    except KeyError:
        log.exception("failed")
    lines = read_back(real_stream)
    assert lines[0] == "<6>ready"
    assert lines[1] == "<3>failed"
    assert lines[2] == "<3>Traceback (most recent call last):"
    assert all(line.startswith("<3>") for line in lines[1:])


def test_json_on_the_journal_stream_is_prefixed(
    real_stream: TextIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", stream_id(real_stream))
    setup_logging("info", "json", "stderr", stream=real_stream)
    log.warning("slow peer")
    (line,) = read_back(real_stream)
    assert line.startswith("<4>{")
    assert json.loads(line[3:])["msg"] == "slow peer"


def test_auto_elsewhere_uses_the_stream(
    real_stream: TextIO, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sent = Sent()
    monkeypatch.setattr(logs, "_load_journal", lambda: sent)
    with open(tmp_path / "journal-elsewhere", "w", encoding="utf-8") as other:
        monkeypatch.setenv("JOURNAL_STREAM", stream_id(other))  # e.g. stderr redirected by hand
    setup_logging("info", "text", "auto", stream=real_stream)
    log.info("hello")
    (line,) = read_back(real_stream)
    assert TEXT_LINE.match(line)
    assert sent.entries == []


def test_target_journal_forces_journald(
    real_stream: TextIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = Sent()
    monkeypatch.setattr(logs, "_load_journal", lambda: sent)
    setup_logging("info", "json", "journal", stream=real_stream)
    log.info("hello")
    assert [e["MESSAGE"] for e in sent.entries] == ["hello"]


def test_target_journal_without_systemd_python_warns(
    real_stream: TextIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "_load_journal", lambda: None)
    setup_logging("info", "text", "journal", stream=real_stream)
    log.info("hello")
    lines = read_back(real_stream)
    assert len(lines) == 2
    warning, hello = (TEXT_LINE.match(line) for line in lines)
    assert warning and hello
    assert warning["level"] == "W" and "systemd-python" in warning["msg"]
    assert hello["msg"] == "hello"


def test_target_stderr_ignores_journald(
    real_stream: TextIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = Sent()
    monkeypatch.setattr(logs, "_load_journal", lambda: sent)
    setup_logging("info", "text", "stderr", stream=real_stream)
    log.info("hello")
    assert sent.entries == []
    assert len(read_back(real_stream)) == 1


def test_default_stream_is_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", "text", "stderr")
    log.info("to stderr")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.rstrip().endswith("I: to stderr")


# --- escaping (issue 10 item 12: forged log lines) ----------------------------------------------

FORGED = "evil.dcm\n2026-01-01T00:00:00.000+00:00 I: sent: /in/forged.dcm"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("/in/a.dcm", "/in/a.dcm"),
        ("plain ünïcode 1.2.3", "plain ünïcode 1.2.3"),
        ("a\nb\rc\td", "a\\nb\\rc\\td"),
        ("uid\x00\x00", "uid\\x00\\x00"),
        ("\x1b[2Jcleared", "\\x1b[2Jcleared"),
        ("del\x7f c1\x85", "del\\x7f c1\\x85"),
        ("line\u2028sep", "line\\u2028sep"),
        ("bidi\u202etxt.dcm", "bidi\\u202etxt.dcm"),
        ("latin1-\udce9.dcm", "latin1-\\xe9.dcm"),  # a non-UTF-8 byte via surrogateescape
        ("back\\slash", "back\\slash"),
    ],
)
def test_escape(text: str, shown: str) -> None:
    assert escape(text) == shown
    assert escape(shown) == shown


def test_text_format_escapes_message_but_keeps_the_traceback() -> None:
    out = io.StringIO()
    setup_logging("info", "text", "stderr", stream=out)
    log.error("quarantined: %s", FORGED, extra=fields(path=FORGED))
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed for %s", "a\x00b")
    lines = out.getvalue().splitlines()
    assert lines[0].endswith(
        "E: quarantined: evil.dcm\\n2026-01-01T00:00:00.000+00:00 I: sent: /in/forged.dcm"
    )
    assert lines[1].endswith("E: failed for a\\x00b")
    assert lines[2] == "Traceback (most recent call last):"
    assert sum(bool(TEXT_LINE.match(line)) for line in lines) == 2


def test_json_format_escapes_message_and_fields() -> None:
    out = io.StringIO()
    setup_logging("info", "json", "stderr", stream=out)
    log.error("quarantined: %s", FORGED, extra=fields(path=FORGED, sop_instance_uid="1.2\x85", n=3))
    (line,) = out.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["msg"] == "quarantined: " + escape(FORGED)
    assert entry["path"] == escape(FORGED) and "\n" not in entry["path"]
    assert entry["sop_instance_uid"] == "1.2\\x85"
    assert entry["n"] == 3
    assert "\x85" not in line


def test_journal_fields_are_escaped() -> None:
    record = make_record("sent %s", FORGED, **fields(path=FORGED, sop_instance_uid="1.2\x00"))
    entry = journal_fields(record)
    assert entry["MESSAGE"] == "sent " + escape(FORGED)
    assert entry["FORWARDER_PATH"] == escape(FORGED)
    assert entry["DICOM_SOP_INSTANCE_UID"] == "1.2\\x00"


def test_iso_is_utc_to_the_second() -> None:
    assert iso(1_795_000_000.9) == "2026-11-18T11:06:40Z"
    assert iso(None) is None
