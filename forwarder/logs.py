"""Logging set-up: text or JSON lines on stderr, or structured entries in journald."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import unicodedata
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = [
    "ISO_FORMAT",
    "JOURNAL_FIELDS",
    "EscapingFormatter",
    "JournalHandler",
    "JsonFormatter",
    "TextFormatter",
    "escape",
    "fields",
    "iso",
    "journal_fields",
    "journal_stream_matches",
    "one_line",
    "setup_logging",
    "syslog_priority",
]

FIELDS_ATTR = "fwd"
"""The ``extra=`` key that carries an event's structured fields (see `fields`)."""

SYSLOG_IDENTIFIER = "forwarder"

ISO_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
"""`iso`'s format, for `time.strptime` to read a time back."""

JOURNAL_FIELDS: Mapping[str, str] = {
    "path": "FORWARDER_PATH",
    "sop_instance_uid": "DICOM_SOP_INSTANCE_UID",
    "study_uid": "DICOM_STUDY_UID",
    "destination": "FORWARDER_DESTINATION",
    "outcome": "FORWARDER_OUTCOME",
    "status": "FORWARDER_STATUS",
}
"""Structured field -> journald field; any other field becomes ``FORWARDER_<NAME>``."""

CHATTY_LOGGERS = ("pynetdicom",)
"""Libraries capped at WARNING unless the level is debug (pynetdicom logs every PDU at info)."""

_OWNED = "_forwarder_owned"
_TEXT_FORMAT = "%(asctime)s %(levelname).1s: %(message)s"

JournalSender = Callable[..., object]
"""``systemd.journal.sendv``: takes ``"FIELD=value"`` strings."""


_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _escape_char(c: str) -> str:
    if c in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[c]
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, kept by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def iso(ts: float | None) -> str | None:
    """Unix time as ISO 8601 UTC to the second (``2026-11-25T21:41:16Z``); None stays None.

    The one spelling of a time in sidecars, ``--json`` output and log lines.
    """
    if ts is None:
        return None
    return time.strftime(ISO_FORMAT, time.gmtime(ts))


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (whitespace runs folded), or its type's name."""
    return " ".join(str(exc).split()) or type(exc).__name__


def escape(text: str) -> str:
    """`text` safe for one log line: control characters as escapes, everything else as is.

    A file name or a UID comes from whoever writes into the inbox: a newline in it would
    start a forged log line, a NUL or an ANSI escape would hide text, a bidi override would
    reorder it. Escaped: C0/C1 controls and DEL (``\\n``, ``\\r``, ``\\t``, else
    ``\\xNN``), format characters (bidi overrides, zero-width), line and paragraph
    separators (``\\uNNNN``), and lone surrogates: a path byte that is not UTF-8 (decoded
    with surrogateescape) shows as the ``\\xNN`` of that byte. Backslashes are left alone, so
    ordinary text reads as it is. Every log format uses this one function.
    """
    if text.isprintable():  # the common case: nothing to do
        return text
    return "".join(
        _escape_char(c) if unicodedata.category(c) in _ESCAPED_CATEGORIES else c for c in text
    )


def _escape_value(value: Any) -> Any:
    """A structured field's value escaped like a message (numbers stay numbers)."""
    if isinstance(value, bool | int | float) or value is None:
        return value
    return escape(str(value))


class EscapingFormatter(logging.Formatter):
    """A formatter whose message part is `escape`d; a traceback after it keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)


def fields(**kw: Any) -> dict[str, Any]:
    """Return ``extra=`` for a log call carrying structured fields; None values are dropped.

    >>> LOGGER.info(f"sent {path}", extra=fields(path=path, destination="pacs", outcome="sent"))
    """
    return {FIELDS_ATTR: {key: value for key, value in kw.items() if value is not None}}


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    value = getattr(record, FIELDS_ATTR, None)
    return dict(value) if isinstance(value, Mapping) else {}


def syslog_priority(levelno: int) -> int:
    """The syslog priority (0 emerg .. 7 debug) for a logging level; in-between levels round up
    to the next less severe standard level, as systemd-python's JournalHandler does."""
    if levelno <= logging.DEBUG:
        return 7
    if levelno <= logging.INFO:
        return 6
    if levelno <= logging.WARNING:
        return 4
    if levelno <= logging.ERROR:
        return 3
    if levelno <= logging.CRITICAL:
        return 2
    return 1


def _journal_name(key: str) -> str | None:
    """``FORWARDER_<KEY>`` for an unmapped field; None when no valid journal field name results."""
    name = "FORWARDER_" + "".join(c if c.isalnum() else "_" for c in key.upper())
    return name if name.isascii() and len(name) <= 64 else None


def journal_fields(
    record: logging.LogRecord, formatter: logging.Formatter | None = None
) -> dict[str, str]:
    """Map a log record to journald fields (a pure function; nothing is sent).

    MESSAGE is the formatted message, `escape`d (with the traceback, if any, also in
    EXCEPTION_TEXT); structured field values are escaped too;
    PRIORITY the syslog priority; SYSLOG_IDENTIFIER ``forwarder``; LOGGER, THREAD_NAME and
    CODE_FILE/LINE/FUNC from the record; the record's structured fields (see `fields`) under
    the names in `JOURNAL_FIELDS`, so that ``journalctl FORWARDER_OUTCOME=quarantined`` works.
    """
    fmt = formatter or EscapingFormatter("%(message)s")
    out = {
        "MESSAGE": fmt.format(record),
        "PRIORITY": str(syslog_priority(record.levelno)),
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
        "LOGGER": record.name,
        "THREAD_NAME": str(record.threadName),
        "CODE_FILE": record.pathname,
        "CODE_LINE": str(record.lineno),
        "CODE_FUNC": record.funcName,
    }
    if record.exc_text:  # set by fmt.format() when the record carries exc_info
        out["EXCEPTION_TEXT"] = record.exc_text
    for key, value in _record_fields(record).items():
        name = JOURNAL_FIELDS.get(key) or _journal_name(key)
        if name is not None and value is not None:
            out[name] = escape(str(value))
    return out


class JournalHandler(logging.Handler):
    """Send records to journald as structured entries (see `journal_fields`).

    `sender` defaults to ``systemd.journal.sendv`` (raises ImportError without systemd-python).
    """

    def __init__(self, sender: JournalSender | None = None, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        if sender is None:
            loaded = _load_journal()
            if loaded is None:
                raise ImportError(
                    "journald logging needs systemd-python (pip install systemd-python)"
                )
            sender = loaded
        self._sender = sender

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = journal_fields(record, self.formatter)
            self._sender(*(f"{key}={value}" for key, value in entry.items()))
        except Exception:
            self.handleError(record)


def _load_journal() -> JournalSender | None:
    """``systemd.journal.sendv`` when systemd-python (with its JournalHandler) imports."""
    try:
        from systemd.journal import JournalHandler as _SystemdJournalHandler  # noqa: F401
        from systemd.journal import sendv
    except ImportError:
        return None
    sender: JournalSender = sendv
    return sender


def journal_stream_matches(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
    """True when `stream` is the journal stream systemd connected (``$JOURNAL_STREAM`` is its
    ``device:inode``, as systemd.exec(5) says to check)."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (AttributeError, OSError, ValueError):  # no real file descriptor, or a bad value
        return False


class TextFormatter(EscapingFormatter):
    """``<ISO-8601 local time with ms> <L>: <message>``; or, with `journal_prefix`, no time and
    a ``<N>`` syslog priority before each line (sd-daemon(3)) so journald keeps the level."""

    def __init__(self, journal_prefix: bool = False) -> None:
        super().__init__("%(message)s" if journal_prefix else _TEXT_FORMAT)
        self.journal_prefix = journal_prefix

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = datetime.fromtimestamp(record.created).astimezone()
        return stamp.isoformat(timespec="milliseconds")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.journal_prefix:
            return text
        return _prefix_lines(text, record.levelno)


def _prefix_lines(text: str, levelno: int) -> str:
    prefix = f"<{syslog_priority(levelno)}>"
    return "\n".join(prefix + line for line in text.split("\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (ISO-8601 UTC, ms), level, logger, msg, the structured
    fields flattened, and exc (the formatted traceback) when there is one."""

    def __init__(self, journal_prefix: bool = False) -> None:
        super().__init__()
        self.journal_prefix = journal_prefix

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        out: dict[str, Any] = {k: _escape_value(v) for k, v in _record_fields(record).items()}
        out.update(
            ts=ts.replace("+00:00", "Z"),
            level=record.levelname.lower(),
            logger=record.name,
            msg=escape(record.getMessage()),
        )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        line = json.dumps(out, ensure_ascii=False, default=str)
        return _prefix_lines(line, record.levelno) if self.journal_prefix else line


def _level(level: str) -> int:
    value = logging.getLevelName(level.upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {level!r}")
    return value


def setup_logging(
    level: str = "info",
    fmt: str = "text",
    target: str = "auto",
    *,
    stream: TextIO | None = None,
) -> None:
    """Configure the root logger (the handlers it owns only; calling again replaces them).

    Parameters
    ----------
    level
        critical, error, warning, info or debug. pynetdicom is capped at warning unless debug.
    fmt
        ``text`` or ``json``: the format on `stream`. journald entries are structured already
        and ignore it.
    target
        ``auto``: journald when `stream` is the ``$JOURNAL_STREAM`` systemd connected and
        systemd-python is installed, else `stream`. ``journal``: journald (`stream`, with a
        warning, when systemd-python is missing). ``stderr``: `stream`.
    stream
        Default ``sys.stderr``. When it is the journal stream but journald logging is not used,
        lines carry a ``<N>`` priority prefix instead of a timestamp.

    Raises
    ------
    ValueError
        For an unknown level, format or target.
    """
    levelno = _level(level)
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r} (text or json)")
    if target not in ("auto", "journal", "stderr"):
        raise ValueError(f"unknown log target {target!r} (auto, journal or stderr)")
    out = sys.stderr if stream is None else stream
    on_journal_stream = journal_stream_matches(out)

    handler: logging.Handler | None = None
    warning: str | None = None
    if target == "journal" or (target == "auto" and on_journal_stream):
        sender = _load_journal()
        if sender is not None:
            handler = JournalHandler(sender)
        elif target == "journal":
            warning = "log.target is journal but systemd-python is not installed; logging to stderr"
    if handler is None:
        formatter: logging.Formatter
        if fmt == "json":
            formatter = JsonFormatter(journal_prefix=on_journal_stream)
        else:
            formatter = TextFormatter(journal_prefix=on_journal_stream)
        handler = logging.StreamHandler(out)
        handler.setFormatter(formatter)
    setattr(handler, _OWNED, True)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OWNED, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(levelno)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(
            logging.NOTSET if levelno <= logging.DEBUG else logging.WARNING
        )
    if warning is not None:
        logging.getLogger(__name__).warning(warning)
