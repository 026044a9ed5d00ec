"""Delivery events: one structured log line each, and the counts for the heartbeat."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from forwarder.dicomfile import DicomInfo
from forwarder.events import Events
from forwarder.logs import FIELDS_ATTR
from forwarder.outbox import Delivery, State


def delivery() -> Delivery:
    sc, ts = "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.1.2.1"
    file = DicomInfo(Path("/in/a.dcm"), 10, 1, sc, "1.2.3", ts, "9.8", 0)
    return Delivery(1, file, "pacs", State.SENT, 1, 0.0, 0.0, 0.0, 0, None, 0.0, 1.0)


def test_each_event_is_one_line_naming_file_instance_destination_outcome(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    Events().delivery(logging.WARNING, "retry", delivery(), "0xA700 out of resources", 0xA700)
    (record,) = caplog.records
    assert record.getMessage() == "retry: /in/a.dcm (1.2.3) -> pacs: 0xA700 out of resources"
    assert getattr(record, FIELDS_ATTR) == {
        "path": "/in/a.dcm",
        "sop_instance_uid": "1.2.3",
        "study_uid": "9.8",
        "destination": "pacs",
        "outcome": "retry",
        "status": "0xA700",
    }


def test_counts_take_a_warning_as_sent() -> None:
    events = Events()
    for outcome in ("sent", "warning", "retry", "quarantined", "gone", "held"):
        events.delivery(logging.DEBUG, outcome, delivery(), "")
    events.count("quarantined")  # a file that never became DICOM
    assert events.counts() == {"sent": 2, "retry": 1, "quarantined": 2}
