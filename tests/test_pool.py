"""Tests for forwarder.pool: parallel associations that share one set and finish together,
and "auto" against peers that gain from more associations, refuse them or make them wait."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import SCP, StoreSCP, make_instance, stores_per_association
from pynetdicom import evt

from forwarder.association import Peer
from forwarder.concurrency import Autoscale
from forwarder.dicomfile import DicomInfo, inspect
from forwarder.pool import Outcome, send_all
from forwarder.sender import StoreResult


def instances(folder: Path, n: int) -> list[DicomInfo]:
    for i in range(n):
        make_instance(folder / f"{i:04}.dcm", f"1.2.826.0.1.3680043.9.9999.31.{i}")
    return [inspect(folder / f"{i:04}.dcm") for i in range(n)]


def run(peer: Peer, infos: list[DicomInfo], scale: Autoscale) -> dict[Path, Outcome]:
    out: dict[Path, Outcome] = {}
    lock = threading.Lock()

    def done(info: DicomInfo, outcome: Outcome) -> None:
        with lock:
            assert info.path not in out, f"{info.path} reported twice"
            out[info.path] = outcome

    send_all(peer, infos, None, scale, done)
    return out


def all_sent(results: dict[Path, Outcome], infos: list[DicomInfo]) -> bool:
    return sorted(results) == sorted(i.path for i in infos) and all(
        isinstance(r, StoreResult) and r.delivered for r in results.values()
    )


def test_associations_share_the_work_evenly(scp: SCP, tmp_path: Path) -> None:
    """Per-file hand-out: 4 associations on 300 files each carry about a quarter. Chunks of
    min(64, N/4) left one association with 108 of them; the first association's head start
    (the others open once it sends) is worth a few files at most."""
    per_assoc = stores_per_association(scp, 0.005)
    infos = instances(tmp_path, 300)
    results = run(Peer("127.0.0.1", scp.port), infos, Autoscale(4, auto=False))
    assert all_sent(results, infos)
    assert sorted(scp.uids()) == sorted(i.sop_instance_uid for i in infos)
    assert len(per_assoc) == 4
    assert max(per_assoc.values()) - min(per_assoc.values()) <= 15, per_assoc


def test_auto_opens_more_associations_for_a_slow_peer(scp: SCP, tmp_path: Path) -> None:
    per_assoc = stores_per_association(scp, 0.03)  # ~33 stores/s per association: a WAN peer
    infos = instances(tmp_path, 240)
    scale = Autoscale(3)
    results = run(Peer("127.0.0.1", scp.port), infos, scale)
    assert all_sent(results, infos)
    assert len(set(scp.uids())) == 240
    assert len(per_assoc) == 3 and scale.allowed == 3, scale.describe()


def test_auto_settles_where_the_peer_refuses_more(scp: SCP, tmp_path: Path) -> None:
    """A peer that rejects a second association ("local limit exceeded"): everything is sent
    over the one it accepted, nothing fails, and auto settles at 1."""
    stores_per_association(scp, 0.02)
    scp.server.ae.maximum_associations = 1
    infos = instances(tmp_path, 120)
    scale = Autoscale(4)
    results = run(Peer("127.0.0.1", scp.port), infos, scale)
    assert all_sent(results, infos)
    assert len(set(scp.uids())) == 120
    assert scale.settled and scale.allowed == 1 and scale.reason == "the peer accepts 1"


def test_auto_never_waits_for_a_single_process_peer(
    make_storescp: Callable[..., StoreSCP], tmp_path: Path
) -> None:
    """DCMTK storescp without --fork serves one association at a time and leaves a second
    connection in its listen queue: the extra association is tried beside the first, which
    carries the whole set, and the send ends without waiting out the ACSE timeout."""
    storescp = make_storescp("--sleep-after", "1", env={"TCP_NODELAY": "1"})
    infos = instances(tmp_path / "in", 4)
    peer = Peer("127.0.0.1", storescp.port, called_aet="STORESCP", acse_timeout=30)
    scale = Autoscale(4, window_seconds=0.5, window_stores=2)  # try the extra after 2 stores
    start = time.monotonic()
    results = run(peer, infos, scale)
    elapsed = time.monotonic() - start
    assert all_sent(results, infos)
    assert len(storescp.files()) == 4
    assert scale.peak >= 2, f"no extra association was tried: {scale.describe()}"
    assert elapsed < 15, f"the send waited {elapsed:.1f} s for the extra association"


def test_a_peer_that_is_down_fails_every_file_once(tmp_path: Path) -> None:
    from conftest import free_port

    infos = instances(tmp_path, 5)
    for scale in (Autoscale(4), Autoscale(3, auto=False)):
        results = run(Peer("127.0.0.1", free_port()), infos, scale)
        assert sorted(results) == sorted(i.path for i in infos)
        assert all(not isinstance(r, StoreResult) for r in results.values())


@pytest.mark.parametrize("auto", [True, False])
def test_more_associations_than_files(scp: SCP, tmp_path: Path, auto: bool) -> None:
    infos = instances(tmp_path, 2)
    results = run(Peer("127.0.0.1", scp.port), infos, Autoscale(8, auto=auto))
    assert all_sent(results, infos)


def test_a_fixed_number_beyond_the_peers_limit_still_sends_everything(
    scp: SCP, tmp_path: Path
) -> None:
    """--associations 4 to a peer that takes 2: the refused ones give their files back to the
    two that were accepted (one refusal used to fail the whole set: rc 61, 0 sent)."""
    stores_per_association(scp, 0.005)
    scp.server.ae.maximum_associations = 2
    infos = instances(tmp_path, 40)
    for _ in range(3):
        scp.received.clear()
        results = run(Peer("127.0.0.1", scp.port), infos, Autoscale(4, auto=False))
        assert all_sent(results, infos)
        assert sorted(scp.uids()) == sorted(i.sop_instance_uid for i in infos)


def test_a_peer_accepting_none_of_the_classes_costs_one_association(
    make_scp: Callable[..., SCP], tmp_path: Path
) -> None:
    """Every file fails at once as not accepted; not one association per file."""
    scp = make_scp(sop_classes=["1.2.840.10008.5.1.4.1.1.4"])  # MR only; the files are CT
    connections: list[int] = []
    scp.server.bind(evt.EVT_CONN_OPEN, lambda event: connections.append(1))
    infos = instances(tmp_path, 20)
    for scale in (Autoscale(1, auto=False), Autoscale(4)):
        connections.clear()
        results = run(Peer("127.0.0.1", scp.port), infos, scale)
        assert sorted(results) == sorted(i.path for i in infos)
        assert all(
            isinstance(r, StoreResult) and "no presentation context" in r.classification.meaning
            for r in results.values()
        )
        assert len(connections) <= 2, len(connections)


class DelayProxy:
    """A TCP proxy on loopback that holds every chunk `delay` seconds in each direction:
    a peer one round trip of 2 x `delay` away (what a C-STORE's response waits for)."""

    def __init__(self, target: int, delay: float) -> None:
        self.target, self.delay = target, delay
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.socks: list[socket.socket] = []
        self.done = threading.Event()
        self._start(self._accept)

    def _start(self, target: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name="delay-proxy", daemon=True)
        self.threads.append(t)
        t.start()

    def _accept(self) -> None:
        self.server.settimeout(0.1)
        while not self.done.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()
                self._start(self._read, a, chunks)
                self._start(self._write, b, chunks)

    def _read(self, src: socket.socket, chunks: queue.Queue[tuple[float, bytes]]) -> None:
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                data = b""
            chunks.put((time.monotonic() + self.delay, data))
            if not data:
                return

    def _write(self, dst: socket.socket, chunks: queue.Queue[tuple[float, bytes]]) -> None:
        while True:
            due, data = chunks.get()
            time.sleep(max(0.0, due - time.monotonic()))
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.done.set()
        self.server.close()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()


def test_auto_starts_with_more_associations_for_a_far_peer(scp: SCP, tmp_path: Path) -> None:
    """A peer ~30 ms away: auto opens four associations from the start (one per 5 ms of the
    association's round trip) instead of climbing one measured level at a time."""
    per_assoc = stores_per_association(scp, 0.0)
    proxy = DelayProxy(scp.port, 0.015)
    try:
        infos = instances(tmp_path, 40)
        scale = Autoscale(4)
        results = run(Peer("127.0.0.1", proxy.port), infos, scale)
    finally:
        proxy.close()
    assert all_sent(results, infos)
    assert scale.peak == 4 and len(per_assoc) == 4, scale.describe()
