"""Verdicts: what each outcome of a claimed delivery commits and logs (table-driven)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from conftest import make_instance

from forwarder.config import RetrySettings
from forwarder.dicomfile import DicomInfo, inspect
from forwarder.outbox import Delivery, Outbox, State
from forwarder.policy import decide
from forwarder.sender import StoreResult
from forwarder.status import classify_status
from forwarder.verdict import Verdict, checked, judged

UID = "1.2.826.0.1.3680043.2.1125.6.1"


@pytest.fixture
def delivery(tmp_path: Path) -> Delivery:
    path = tmp_path / "a.dcm"
    make_instance(path, UID)
    with Outbox(tmp_path / "outbox.sqlite3") as outbox:
        outbox.enqueue_many([inspect(path)], ["pacs"], 0.0)
        (d,) = outbox.claim("pacs", 1, 0.0, 300)
    return d


def test_an_unchanged_file_is_sent_as_queued(delivery: Delivery) -> None:
    info = checked(delivery, follow_symlinks=False)
    assert isinstance(info, DicomInfo) and info.sop_instance_uid == UID
    assert info.dataset_offset == delivery.dataset_offset


def test_a_changed_file_is_gone_but_stays(delivery: Delivery) -> None:
    st = os.stat(delivery.path)
    os.utime(delivery.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    v = checked(delivery, follow_symlinks=False)
    assert isinstance(v, Verdict)
    assert (v.mark.state, v.outcome, v.finished) == (State.GONE, "gone", False)


def test_a_deleted_file_is_gone_and_let_go(delivery: Delivery) -> None:
    os.unlink(delivery.path)
    v = checked(delivery, follow_symlinks=False)
    assert isinstance(v, Verdict) and (v.mark.state, v.finished) == (State.GONE, True)


@pytest.mark.parametrize(
    ("status", "state", "outcome", "level", "finished"),
    [
        (0x0000, State.SENT, "sent", logging.INFO, True),
        (0xB000, State.SENT, "warning", logging.WARNING, True),
        (0xA700, State.PENDING, "retry", logging.WARNING, False),
        (0xA900, State.QUARANTINED, "quarantined", logging.ERROR, True),
        (None, State.PENDING, "retry", logging.WARNING, False),  # no response
    ],
)
def test_a_store_result_becomes_one_mark_and_one_event(
    delivery: Delivery, status: int | None, state: State, outcome: str, level: int, finished: bool
) -> None:
    cls = classify_status(status)
    info = checked(delivery, follow_symlinks=False)
    assert isinstance(info, DicomInfo)
    decision = decide(cls, 0, None, 10.0, RetrySettings(), 0.5, 0)
    v = judged(delivery, StoreResult(info, cls), decision, 10.0)
    assert (v.mark.state, v.outcome, v.level, v.finished) == (state, outcome, level, finished)
    assert v.mark.status == (status if status is not None else None)
