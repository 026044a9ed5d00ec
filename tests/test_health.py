"""Tests for forwarder.health: `check` against a real outbox written as the daemon writes it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from forwarder.config import Settings
from forwarder.dicomfile import DicomInfo
from forwarder.health import check
from forwarder.outbox import Outbox

NOW = 2_000_000_000.0


def settings(tmp_path: Path, **health: Any) -> Settings:
    return Settings(
        outbox={"path": tmp_path / "outbox.sqlite3"},
        destinations=[{"name": "pacs", "host": "127.0.0.1", "port": 104}],
        health={"stale_seconds": 60, "max_paused_seconds": 3600, **health},
    )


@pytest.fixture
def outbox(tmp_path: Path) -> Any:
    with Outbox(tmp_path / "outbox.sqlite3") as ob:
        yield ob


def test_no_outbox(tmp_path: Path) -> None:
    healthy, line = check(settings(tmp_path), NOW)
    assert not healthy
    assert "never run" in line


def test_outbox_without_heartbeat(tmp_path: Path, outbox: Outbox) -> None:
    healthy, line = check(settings(tmp_path), NOW)
    assert not healthy
    assert "no heartbeat" in line


def test_fresh_heartbeat_is_healthy(tmp_path: Path, outbox: Outbox) -> None:
    outbox.heartbeat(NOW - 3, {"workers": 1, "workers_alive": 1, "unhealthy": None})
    healthy, line = check(settings(tmp_path), NOW)
    assert healthy, line
    assert line.startswith("ok: pid ") and "3 s ago" in line


def test_stale_heartbeat(tmp_path: Path, outbox: Outbox) -> None:
    outbox.heartbeat(NOW - 61, {"unhealthy": None})
    healthy, line = check(settings(tmp_path), NOW)
    assert not healthy
    assert "61 s ago" in line and "hung or gone" in line


def test_stopped_daemon(tmp_path: Path, outbox: Outbox) -> None:
    outbox.heartbeat(NOW - 1, {"stopped": True})
    healthy, line = check(settings(tmp_path), NOW)
    assert not healthy
    assert "stopped" in line


def test_the_daemons_own_verdict_is_passed_on(tmp_path: Path, outbox: Outbox) -> None:
    outbox.heartbeat(NOW - 1, {"unhealthy": "worker send-pacs-0 stuck in one batch for 90 s"})
    healthy, line = check(settings(tmp_path), NOW)
    assert not healthy
    assert line == "worker send-pacs-0 stuck in one batch for 90 s"


def test_destination_paused_too_long(tmp_path: Path, outbox: Outbox) -> None:
    outbox.heartbeat(NOW - 1, {"unhealthy": None})
    outbox.pause_destination("pacs", NOW + 60, "cannot connect: refused", NOW - 7200)
    # extending a pause keeps its start
    outbox.pause_destination("pacs", NOW + 600, "cannot connect: refused", NOW - 10)
    healthy, line = check(settings(tmp_path), NOW)
    assert not healthy
    assert "destination pacs paused for 120 min" in line
    assert "refused" in line


def test_a_destination_down_through_many_short_pauses_is_unhealthy(
    tmp_path: Path, outbox: Outbox
) -> None:
    # Each retry pauses it anew after the last pause ran out (retry.max_seconds caps them
    # below max_paused_seconds): the outage is measured from its first pause, not the last.
    outbox.heartbeat(NOW - 1, {"unhealthy": None})
    for start in range(-7200, 0, 600):
        outbox.pause_destination("pacs", NOW + start + 590, "refused", NOW + start, failure=True)
    outbox.pause_destination("pacs", NOW + 300, "refused", NOW - 5, failure=True)
    healthy, line = check(settings(tmp_path), NOW)
    assert not healthy and "destination pacs paused for 120 min" in line


def test_an_outage_ends_with_a_store(tmp_path: Path, outbox: Outbox) -> None:
    outbox.heartbeat(NOW - 1, {"unhealthy": None})
    outbox.pause_destination("pacs", NOW - 7000, "refused", NOW - 7200, failure=True)
    path = tmp_path / "a.dcm"
    info = DicomInfo(path, 1, 1, "1.2.840.10008.5.1.4.1.1.7", "1.2.3", "1.2.840.10008.1.2", None, 0)
    outbox.enqueue_many([info], ["pacs"], NOW - 100)
    (d,) = outbox.claim("pacs", 1, NOW - 90, 60)
    outbox.mark_sent(d.id, 0x0000, NOW - 60)  # the peer answered: the outage is over
    outbox.pause_destination("pacs", NOW + 60, "refused", NOW - 30, failure=True)
    assert check(settings(tmp_path), NOW)[0]  # paused 30 s, not two hours


def test_short_pause_is_healthy(tmp_path: Path, outbox: Outbox) -> None:
    outbox.heartbeat(NOW - 1, {"unhealthy": None})
    outbox.pause_destination("pacs", NOW + 60, "cannot connect: refused", NOW - 30)
    assert check(settings(tmp_path), NOW)[0]


def test_ended_pause_is_healthy(tmp_path: Path, outbox: Outbox) -> None:
    outbox.heartbeat(NOW - 1, {"unhealthy": None})
    outbox.pause_destination("pacs", NOW - 5, "cannot connect: refused", NOW - 7200)
    assert check(settings(tmp_path), NOW)[0]


def test_pause_of_an_unconfigured_destination_is_ignored(tmp_path: Path, outbox: Outbox) -> None:
    outbox.heartbeat(NOW - 1, {"unhealthy": None})
    outbox.pause_destination("old-pacs", NOW + 600, "refused", NOW - 7200)
    assert check(settings(tmp_path), NOW)[0]


def test_thresholds_come_from_the_settings(tmp_path: Path, outbox: Outbox) -> None:
    outbox.heartbeat(NOW - 20, {"unhealthy": None})
    assert check(settings(tmp_path), NOW)[0]
    assert not check(settings(tmp_path, stale_seconds=10), NOW)[0]


def test_health_does_not_write_to_the_outbox(tmp_path: Path, outbox: Outbox) -> None:
    outbox.heartbeat(NOW - 1, {"unhealthy": None})
    before = (tmp_path / "outbox.sqlite3").stat().st_mtime_ns
    check(settings(tmp_path), NOW)
    assert (tmp_path / "outbox.sqlite3").stat().st_mtime_ns == before


def test_health_command_exit_status(tmp_path: Path, outbox: Outbox) -> None:
    import time

    cfg = tmp_path / "forwarder.toml"
    cfg.write_text(
        f'[outbox]\npath = "{tmp_path / "outbox.sqlite3"}"\n\n'
        '[[destinations]]\nname = "pacs"\nhost = "127.0.0.1"\nport = 104\n'
    )

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "forwarder", "health", "--config", str(cfg), *extra],
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": "/usr/bin:/bin"},
            cwd=Path(__file__).resolve().parents[1],
        )

    outbox.heartbeat(time.time(), {"unhealthy": None})
    ok = run()
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: ")
    assert run("-q").stdout == ""
    outbox.heartbeat(time.time(), {"unhealthy": "the enqueuer thread died"})
    bad = run()
    assert bad.returncode == 1
    assert bad.stderr.strip() == "unhealthy: the enqueuer thread died"
    cfg.write_text("[[destinations]]\nname = 'x'\nport = 0\nhost = 'h'\n")
    assert run().returncode == 78
