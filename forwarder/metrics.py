"""Prometheus endpoint of the daemon: store counters it reports, queue gauges read at scrape time.

Off unless ``metrics.listen`` is set (``"127.0.0.1:9108"``, ``"[::1]:9108"``; a bare port binds
to 127.0.0.1). It needs the ``metrics`` extra (prometheus-client), imported only when the
endpoint is on; without it the daemon logs one error and runs without metrics.

The daemon calls `Metrics.observe_store` after every C-STORE and `Metrics.association` for
every association it sets up; with metrics off these are the no-op methods of `Metrics`
itself. Queue depth, oldest pending age and paused destinations come from the outbox when
Prometheus scrapes (a custom collector, no polling thread), so they are never stale and cost
nothing between scrapes. Exposed:

=========================================  =========  =========================================
``forwarder_queue_depth``                  gauge      deliveries by destination and state
``forwarder_oldest_pending_age_seconds``   gauge      age of the oldest pending/in-flight one
``forwarder_destination_paused``           gauge      1 while the circuit breaker holds it
``forwarder_instances_sent_total``         counter    instances the peer stored (incl. warnings)
``forwarder_bytes_sent_total``             counter    their file sizes
``forwarder_store_failures_total``         counter    by destination, status class and outcome
``forwarder_quarantined_total``            counter    deliveries and files quarantined
``forwarder_store_duration_seconds``       histogram  one C-STORE, request to response
``forwarder_associations_total``           counter    associations established
``forwarder_instances_received_total``     counter    C-STORE requests received, by answer
``forwarder_associations_rejected_total``  counter    associations the receiver rejected
``forwarder_outbox_up``                    gauge      0 when the outbox could not be read
=========================================  =========================================

Counters count since the daemon started (Prometheus handles the reset at a restart); the
queue gauges are the outbox's, so they survive restarts.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from forwarder.outbox import Outbox, OutboxError, State

__all__ = [
    "NO_METRICS",
    "Metrics",
    "PrometheusMetrics",
    "parse_listen",
    "start_metrics",
    "status_class",
]

LOGGER = logging.getLogger("forwarder.metrics")

DEFAULT_HOST = "127.0.0.1"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds: a small CT image on a LAN is a few ms, a large multi-frame over a WAN is seconds."""

THREAD_NAME = "forwarder-metrics"
_SCRAPE_TIMEOUT = 10.0  # a client that connects and says nothing does not hold the server


def parse_listen(text: str) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"`` or ``"port"`` -> (host, port); host defaults to loopback.

    Raises
    ------
    ValueError
        With a message naming what is wrong.
    """
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = DEFAULT_HOST, text
    elif host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"{text!r}: an IPv6 address is written [::1]:9108")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:9108")
    if not host:
        host = DEFAULT_HOST
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def status_class(status: int | None) -> str:
    """A C-STORE status as its class for a label: ``0xA7xx``; ``none`` without a response."""
    return "none" if status is None else f"0x{status >> 8:02X}xx"


class Metrics:
    """What the daemon reports to; this base class does nothing (metrics off)."""

    def observe_store(
        self, destination: str, outcome: str, status: int | None, seconds: float, nbytes: int
    ) -> None:
        """One C-STORE attempt ended.

        `outcome` is the policy's decision (``sent`` -- warnings included -- ``retry``,
        ``quarantine`` or ``hold``); `status` the peer's C-STORE status (None: no response);
        `seconds` the time from request to response (0 when nothing went out); `nbytes` the
        file size.
        """

    def association(self, destination: str, count: int = 1) -> None:
        """`count` associations with `destination` were established."""

    def received(self, status: str) -> None:
        """The receiver answered a C-STORE with `status` (``0x0000``, ``0xA700``, ...)."""

    def rejected(self, reason: str) -> None:
        """The receiver rejected an association (``calling-aet``, ``called-aet``, ``busy``)."""

    def close(self) -> None:
        """Stop serving (idempotent)."""


NO_METRICS = Metrics()
"""The no-op instance: metrics off."""


class _QueueCollector:
    """Reads the outbox at scrape time: queue depth, oldest pending age, paused destinations."""

    def __init__(
        self,
        outbox: Outbox,
        destinations: Callable[[], Sequence[str]],
        stats: Callable[[], Mapping[str, int]],
    ) -> None:
        self._outbox = outbox
        self._destinations = destinations
        self._stats = stats

    def describe(self) -> list[Any]:
        return []  # no scrape at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        quarantined = CounterMetricFamily(
            "forwarder_quarantined",
            "Deliveries and never-queued files quarantined since the daemon started.",
        )
        quarantined.add_metric([], float(self._stats().get("quarantined", 0)))
        yield quarantined
        up = GaugeMetricFamily("forwarder_outbox_up", "1 when the outbox could be read.")
        now = time.time()
        try:
            counts = self._outbox.counts()
            oldest = self._outbox.oldest_pending()
            infos = self._outbox.destination_info()
            awaiting = self._outbox.awaiting_commitment()
        except OutboxError as exc:
            LOGGER.warning(f"metrics: cannot read the outbox: {exc}")
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        names = sorted(set(self._destinations()) | set(counts))
        depth = GaugeMetricFamily(
            "forwarder_queue_depth",
            "Deliveries in the outbox by destination and state.",
            labels=["destination", "state"],
        )
        age = GaugeMetricFamily(
            "forwarder_oldest_pending_age_seconds",
            "Age of the oldest pending or in-flight delivery (0 when none).",
            labels=["destination"],
        )
        committing = GaugeMetricFamily(
            "forwarder_oldest_awaiting_commitment_age_seconds",
            "Age of the oldest delivery stored and awaiting the peer's Storage Commitment "
            "(its file is kept; 0 when none).",
            labels=["destination"],
        )
        paused = GaugeMetricFamily(
            "forwarder_destination_paused",
            "1 while the destination is paused by its circuit breaker.",
            labels=["destination"],
        )
        for name in names:
            by_state = counts.get(name, {})
            for state in State:
                depth.add_metric([name, state.name.lower()], float(by_state.get(state, 0)))
            created = oldest.get(name)
            age.add_metric([name], 0.0 if created is None else max(0.0, now - created))
            stored = awaiting.get(name)
            committing.add_metric([name], 0.0 if stored is None else max(0.0, now - stored[1]))
            info = infos.get(name)
            paused.add_metric([name], 1.0 if info is not None and info.paused(now) else 0.0)
        yield depth
        yield age
        yield committing
        yield paused


class PrometheusMetrics(Metrics):
    """Counters in a registry of its own, served over HTTP by one thread."""

    def __init__(
        self,
        host: str,
        port: int,
        outbox: Outbox,
        destinations: Callable[[], Sequence[str]],
        stats: Callable[[], Mapping[str, int]],
    ) -> None:
        """Bind and start serving. Raises OSError when the address cannot be bound."""
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=False)
        labels = ["destination"]
        self._sent = Counter(
            "forwarder_instances_sent",
            "Instances the peer stored (success or warning).",
            labels,
            registry=self.registry,
        )
        self._bytes = Counter(
            "forwarder_bytes_sent",
            "Bytes of the files the peer stored.",
            labels,
            registry=self.registry,
        )
        self._failures = Counter(
            "forwarder_store_failures",
            "C-STORE attempts that did not store, by status class (none: no response) and "
            "what followed (retry, quarantine, hold).",
            ["destination", "status_class", "outcome"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "forwarder_store_duration_seconds",
            "One C-STORE, from request to response.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._associations = Counter(
            "forwarder_associations",
            "Associations established.",
            labels,
            registry=self.registry,
        )
        self._received = Counter(
            "forwarder_instances_received",
            "C-STORE requests the receiver answered, by the status it answered (0x0000: "
            "stored and queued).",
            ["status"],
            registry=self.registry,
        )
        self._rejected = Counter(
            "forwarder_associations_rejected",
            "Associations the receiver rejected, by reason (calling-aet, called-aet, busy).",
            ["reason"],
            registry=self.registry,
        )
        for name in destinations():
            for counter in (self._sent, self._bytes, self._associations):
                counter.labels(name)
            self._latency.labels(name)
        self.registry.register(_QueueCollector(outbox, destinations, stats))
        self._server = _make_server(host, port, self.registry)
        self.address = self._server.server_address
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=THREAD_NAME, daemon=True
        )
        self._thread.start()
        self._closed = False

    def observe_store(
        self, destination: str, outcome: str, status: int | None, seconds: float, nbytes: int
    ) -> None:
        if outcome == "sent":
            self._sent.labels(destination).inc()
            self._bytes.labels(destination).inc(nbytes)
        else:
            self._failures.labels(destination, status_class(status), outcome).inc()
        if seconds > 0:
            self._latency.labels(destination).observe(seconds)

    def association(self, destination: str, count: int = 1) -> None:
        if count > 0:
            self._associations.labels(destination).inc(count)

    def received(self, status: str) -> None:
        self._received.labels(status).inc()

    def rejected(self, reason: str) -> None:
        self._rejected.labels(reason).inc()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)


def _make_server(host: str, port: int, registry: Any) -> Any:
    """A one-thread WSGI server for the registry (scrapes are rare and quick)."""
    import socket
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import make_wsgi_app

    class Handler(WSGIRequestHandler):
        timeout = _SCRAPE_TIMEOUT

        def log_message(self, format: str, *args: Any) -> None:  # no access log
            pass

    class Server(WSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    return make_server(host, port, make_wsgi_app(registry), Server, handler_class=Handler)


def start_metrics(
    listen: str | None,
    outbox: Outbox,
    *,
    destinations: Callable[[], Sequence[str]] = list,
    stats: Callable[[], Mapping[str, int]] = dict,
) -> Metrics:
    """Serve the metrics on `listen`, or return `NO_METRICS` when it is None.

    `destinations` returns the configured destination names (their series exist from the
    start, at 0); `stats` returns the daemon's running totals (``quarantined``). Never
    raises: when prometheus-client is missing or the address cannot be bound, one error is
    logged and the daemon runs without metrics.
    """
    if listen is None:
        return NO_METRICS
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        LOGGER.error(f"metrics.listen: {exc}; running without metrics")
        return NO_METRICS
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        LOGGER.error(
            "metrics.listen is set but prometheus-client is not installed "
            "(pip install 'dicom-forwarder[metrics]'); running without metrics"
        )
        return NO_METRICS
    try:
        metrics = PrometheusMetrics(host, port, outbox, destinations, stats)
    except OSError as exc:
        LOGGER.error(f"metrics.listen: cannot listen on {listen}: {exc}; running without metrics")
        return NO_METRICS
    shown = f"[{host}]" if ":" in host else host
    LOGGER.info(f"metrics on http://{shown}:{metrics.address[1]}/metrics")
    return metrics
