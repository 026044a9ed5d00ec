"""OutboxTrouble: a failing outbox is reported once a minute and named for `health`."""

from __future__ import annotations

import pytest

from forwarder.outbox import OutboxFullError
from forwarder.trouble import MAX_PAUSE_SECONDS, OutboxTrouble, pause_after


def test_trouble_is_logged_once_named_and_ended(caplog: pytest.LogCaptureFixture) -> None:
    trouble = OutboxTrouble()
    assert trouble.problem() is None
    for _ in range(5):  # every stage, every try
        trouble.report("worker send-pacs-0", OutboxFullError("database or disk is full"))
    problem = trouble.problem()
    assert problem is not None and "database or disk is full" in problem
    assert sum("outbox worker" in r.getMessage() for r in caplog.records) == 1
    trouble.clear()
    assert trouble.problem() is None
    assert "can be written again" in caplog.records[-1].getMessage()


@pytest.mark.parametrize(("failures", "seconds"), [(1, 0.5), (2, 1.0), (4, 4.0), (100, 30.0)])
def test_a_stage_backs_off_after_errors_in_a_row(failures: int, seconds: float) -> None:
    assert pause_after(failures) == seconds <= MAX_PAUSE_SECONDS
