"""Tests for forwarder.status: the status table of the networking notes, row by row."""

from __future__ import annotations

import pytest

from forwarder.status import (
    Action,
    Classification,
    classify_association,
    classify_status,
    status_hex,
)

# Every row of "C-STORE statuses" in notes/dicom-networking.md: (codes, action)
TABLE: list[tuple[tuple[int, ...], Action]] = [
    ((0x0000,), Action.SENT),
    ((0xB000, 0xB006, 0xB007, 0xB001, 0xBFFF, 0x0001, 0x0107, 0x0116), Action.WARNING),
    ((0xA700, 0xA701, 0xA7FF, 0x0213), Action.RETRY),
    ((0x0110,), Action.RETRY_FEW),
    ((0xA900, 0xA950, 0xA9FF), Action.PERMANENT),
    # "permanent (vendors misuse Cxxx: allow a few retries first)"
    ((0xC000, 0xC123, 0xCFFF), Action.RETRY_FEW),
    ((0x0117,), Action.PERMANENT),
    ((0x0122, 0x0112), Action.PERMANENT),
    ((0x0124, 0x0214), Action.DESTINATION),
    ((0x0111,), Action.WARNING),
    ((0x0210,), Action.RETRY_FRESH),
    ((0x0211, 0x0212), Action.RETRY_FRESH),
]


@pytest.mark.parametrize(
    ("status", "action"), [(code, action) for codes, action in TABLE for code in codes]
)
def test_status_table(status: int, action: Action) -> None:
    cls = classify_status(status)
    assert cls.action is action
    assert cls.status == status
    assert cls.delivered == (action in (Action.SENT, Action.WARNING))
    assert cls.describe().startswith(f"0x{status:04X} ")
    assert cls.meaning and "\n" not in cls.meaning


def test_no_status_is_transient_and_unknown() -> None:
    cls = classify_status(None)
    assert cls.action is Action.RETRY
    assert cls.status is None
    assert not cls.delivered
    assert cls.describe() == cls.meaning  # no "0x...." prefix


@pytest.mark.parametrize("status", [0x0002, 0x0300, 0x1234, 0xD000, 0xFF00, 0xFFFF])
def test_unknown_codes_fail_with_a_few_retries(status: int) -> None:
    cls = classify_status(status)
    assert cls.action is Action.RETRY_FEW
    assert not cls.delivered
    assert f"0x{status:04X}" in cls.describe()


def test_other_axxx_is_permanent_and_cancel() -> None:
    assert classify_status(0xA800).action is Action.PERMANENT
    assert classify_status(0xFE00).action is Action.PERMANENT


def test_describe() -> None:
    assert classify_status(0xA700).describe() == "0xA700 out of resources"
    assert Classification(Action.RETRY, "x").describe() == "x"


@pytest.mark.parametrize(
    ("source", "diagnostic", "words"),
    [
        (1, 1, "no reason given"),
        (1, 2, "application context name not supported"),
        (1, 3, "calling AE title not recognised"),
        (1, 7, "called AE title not recognised"),
        (2, 2, "protocol version not supported"),
    ],
)
def test_rejected_permanent_is_a_destination_problem(
    source: int, diagnostic: int, words: str
) -> None:
    cls = classify_association(rejected=True, result=1, source=source, diagnostic=diagnostic)
    assert cls.action is Action.DESTINATION
    assert "permanent" in cls.meaning and words in cls.meaning
    assert not cls.delivered


@pytest.mark.parametrize(
    ("source", "diagnostic", "words"),
    [(3, 1, "temporary congestion"), (3, 2, "local limit exceeded"), (1, 1, "no reason")],
)
def test_rejected_transient_is_retried(source: int, diagnostic: int, words: str) -> None:
    cls = classify_association(rejected=True, result=2, source=source, diagnostic=diagnostic)
    assert cls.action is Action.RETRY
    assert "transient" in cls.meaning and words in cls.meaning


def test_rejected_with_an_unknown_reason_names_the_diagnostic() -> None:
    cls = classify_association(rejected=True, result=1, source=1, diagnostic=9)
    assert cls.action is Action.DESTINATION
    assert "diagnostic 9" in cls.meaning


def test_refused_or_aborted_connection_is_transient() -> None:
    cls = classify_association(rejected=False, detail="cannot connect: [Errno 111] refused")
    assert cls.action is Action.RETRY
    assert cls.meaning == "cannot connect: [Errno 111] refused"
    assert classify_association(rejected=False).meaning == "connection failed or aborted"


@pytest.mark.parametrize(
    ("status", "text"), [(0x0000, "0x0000"), (0xA900, "0xA900"), (0xC0DE, "0xC0DE"), (None, None)]
)
def test_status_hex(status: int | None, text: str | None) -> None:
    assert status_hex(status) == text
