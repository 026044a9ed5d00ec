"""Tests for forwarder.metrics: the Prometheus endpoint of a real daemon, and its edges."""

from __future__ import annotations

import logging
import socket
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import SCP, free_port, make_instance, start_daemon, stop_daemon, wait_for
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from forwarder import metrics
from forwarder.metrics import NO_METRICS, parse_listen, start_metrics, status_class
from forwarder.outbox import Outbox, OutboxError, State

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """Every sample of the endpoint, parsed by prometheus-client's own text parser."""
    with urllib.request.urlopen(url, timeout=5) as rsp:
        text = rsp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


# ------------------------------------------------------------------------------- pure


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9108", ("127.0.0.1", 9108)),
        ("[::1]:9108", ("::1", 9108)),
        ("0.0.0.0:9200", ("0.0.0.0", 9200)),
        ("9108", ("127.0.0.1", 9108)),
        (":9108", ("127.0.0.1", 9108)),
        ("localhost:9108", ("localhost", 9108)),
        (" 127.0.0.1:9108 ", ("127.0.0.1", 9108)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1:99999", "port must be a number from 1 to 65535"),
        ("127.0.0.1:0", "port must be a number"),
        ("127.0.0.1:http", "port must be a number"),
        ("::1:9108", "in brackets"),
        ("[::1:9108", "[::1]:9108"),
        ("[nonsense]:9108", "IPv6"),
    ],
)
def test_parse_listen_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_listen(text)


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (None, "none"),
        (0xA700, "0xA7xx"),
        (0xA900, "0xA9xx"),
        (0xC123, "0xC1xx"),
        (0x0122, "0x01xx"),
    ],
)
def test_status_class(status: int | None, cls: str) -> None:
    assert status_class(status) == cls


# ------------------------------------------------------------------------------- start


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "outbox.sqlite3") as ob:
        yield ob


def test_off_unless_listen_is_set(outbox: Outbox) -> None:
    off = start_metrics(None, outbox)
    assert off is NO_METRICS
    off.observe_store("pacs", "sent", 0, 0.01, 100)  # the no-op API takes every call
    off.association("pacs")
    off.close()


def test_missing_prometheus_client_logs_one_error_and_carries_on(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import raises ImportError
    with caplog.at_level(logging.ERROR, logger="forwarder.metrics"):
        result = start_metrics("127.0.0.1:9108", outbox)
    assert result is NO_METRICS
    (record,) = caplog.records
    assert "prometheus-client is not installed" in record.getMessage()
    assert "dicom-forwarder[metrics]" in record.getMessage()


def test_address_in_use_logs_one_error_and_carries_on(
    outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with caplog.at_level(logging.ERROR, logger="forwarder.metrics"):
            result = start_metrics(f"127.0.0.1:{port}", outbox)
    assert result is NO_METRICS
    (record,) = caplog.records
    assert f"cannot listen on 127.0.0.1:{port}" in record.getMessage()


def test_bad_listen_logs_one_error(outbox: Outbox, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="forwarder.metrics"):
        assert start_metrics("localhost:nope", outbox) is NO_METRICS
    assert "metrics.listen" in caplog.records[0].getMessage()


def test_serves_and_stops_in_process(outbox: Outbox) -> None:
    port = free_port()
    m = start_metrics(
        f"127.0.0.1:{port}",
        outbox,
        destinations=lambda: ["pacs"],
        stats=lambda: {"quarantined": 2},
    )
    assert isinstance(m, metrics.PrometheusMetrics)
    try:
        m.observe_store("pacs", "sent", 0x0000, 0.02, 1000)
        m.observe_store("pacs", "sent", 0xB000, 0.03, 500)  # a warning is stored too
        m.observe_store("pacs", "retry", None, 0.0, 700)  # no response, nothing timed
        m.association("pacs", 2)
        m.association("pacs", 0)
        s = scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        m.close()
        m.close()  # idempotent
    assert value(s, "forwarder_instances_sent_total", destination="pacs") == 2
    assert value(s, "forwarder_bytes_sent_total", destination="pacs") == 1500
    failures = value(
        s,
        "forwarder_store_failures_total",
        destination="pacs",
        status_class="none",
        outcome="retry",
    )
    assert failures == 1
    assert value(s, "forwarder_store_duration_seconds_count", destination="pacs") == 2
    assert value(s, "forwarder_associations_total", destination="pacs") == 2
    assert value(s, "forwarder_quarantined_total") == 2
    assert value(s, "forwarder_outbox_up") == 1
    # a configured destination has its series before the outbox has a row for it
    assert value(s, "forwarder_queue_depth", destination="pacs", state="pending") == 0
    assert value(s, "forwarder_destination_paused", destination="pacs") == 0
    with pytest.raises(OSError):  # the port is free again: nothing listens
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_serves_on_ipv6_loopback(outbox: Outbox) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            port = probe.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback here")
    m = start_metrics(f"[::1]:{port}", outbox)
    try:
        assert isinstance(m, metrics.PrometheusMetrics)
        assert value(scrape(f"http://[::1]:{port}/metrics"), "forwarder_outbox_up") == 1
    finally:
        m.close()


def test_unreadable_outbox_is_reported_not_raised(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "outbox.sqlite3")
    port = free_port()
    m = start_metrics(f"127.0.0.1:{port}", ob)
    try:
        ob.close()  # every query now raises OutboxError
        with pytest.raises(OutboxError):
            ob.counts()
        s = scrape(f"http://127.0.0.1:{port}/metrics")
        assert value(s, "forwarder_outbox_up") == 0
    finally:
        m.close()


# ------------------------------------------------------------------------------- daemon


def test_daemon_endpoint_matches_the_outbox_and_the_peer(
    tmp_path: Path, make_scp: Callable[..., SCP]
) -> None:
    scp = make_scp()
    uids = [generate_uid() for _ in range(5)]
    refused, busy = uids[3], uids[4]

    def answer(event: object) -> int | None:
        uid = str(event.request.AffectedSOPInstanceUID)  # type: ignore[attr-defined]
        return {refused: 0xA900, busy: 0xA700}.get(uid)

    scp.on_store = answer
    port = free_port()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    db = tmp_path / "outbox.sqlite3"
    config = tmp_path / "forwarder.toml"
    config.write_text(
        f"""
[watch]
paths = ["{inbox}"]
settle_seconds = 0.2
[outbox]
path = "{db}"
[retry]
initial_seconds = 3600
[disposition]
on_success = "keep"
[quarantine]
dir = "{tmp_path / "quarantine"}"
[sender]
linger_seconds = 0.2
[log]
target = "stderr"
[metrics]
listen = "127.0.0.1:{port}"
[[destinations]]
name = "pacs"
host = "127.0.0.1"
port = {scp.port}
""",
        encoding="utf-8",
    )
    sizes = {uid: make_instance(inbox / f"img{i}.dcm", uid) for i, uid in enumerate(uids)}
    log = tmp_path / "daemon.log"
    proc = start_daemon(config, log)
    try:

        def states() -> dict[str, State]:
            assert proc.poll() is None, log.read_text()
            try:
                with Outbox(db, readonly=True) as ob:
                    return {d.sop_instance_uid: d.state for d in ob.list(states=list(State))}
            except OutboxError:
                return {}

        want = {u: State.SENT for u in uids[:3]} | {refused: State.QUARANTINED, busy: State.PENDING}
        wait_for(lambda: states() == want, 30)
        s = scrape(f"http://127.0.0.1:{port}/metrics")
        with Outbox(db, readonly=True) as ob:
            counts = ob.counts()["pacs"]
        received = scp.uids()
        assert sorted(received) == sorted(uids[:3])
        sent = value(s, "forwarder_instances_sent_total", destination="pacs")
        assert sent == len(received) == counts[State.SENT] == 3
        assert value(s, "forwarder_bytes_sent_total", destination="pacs") == sum(
            sizes[u] for u in uids[:3]
        )
        for state in State:
            depth = value(s, "forwarder_queue_depth", destination="pacs", state=state.name.lower())
            assert depth == counts[state]
        labels = {"destination": "pacs"}
        assert (
            value(
                s,
                "forwarder_store_failures_total",
                status_class="0xA9xx",
                outcome="quarantine",
                **labels,
            )
            == 1
        )
        assert (
            value(
                s,
                "forwarder_store_failures_total",
                status_class="0xA7xx",
                outcome="retry",
                **labels,
            )
            == 1
        )
        assert value(s, "forwarder_store_duration_seconds_count", **labels) == 5
        assert value(s, "forwarder_associations_total", **labels) == scp.associations >= 1
        assert value(s, "forwarder_quarantined_total") == 1
        assert value(s, "forwarder_destination_paused", **labels) == 0
        assert value(s, "forwarder_oldest_pending_age_seconds", **labels) > 0
        assert value(s, "forwarder_outbox_up") == 1
        assert f"metrics on http://127.0.0.1:{port}/metrics" in log.read_text()
    finally:
        stop_daemon(proc)
    assert proc.returncode == 0, log.read_text()
    with pytest.raises(OSError):  # stopped with the daemon
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
