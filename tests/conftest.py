"""Shared fixtures: real SCPs on loopback (pynetdicom in-process, DCMTK storescp, Orthanc),
test data."""

from __future__ import annotations

import compileall
import functools
import os
import random
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from orthanc import Orthanc, OrthancUnavailable
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.presentation import build_context
from pynetdicom.transport import ThreadedAssociationServer

REPO = Path(__file__).resolve().parents[1]

ALL_TS = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
]
UNCOMPRESSED = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"]


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


SERVER_POLL_SECONDS = 0.05


class QuickServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server, but its accept loop looks for `shutdown()`
    every 0.05 s instead of socketserver's 0.5 s: each test's teardown waited out up to half a
    second per SCP (0.25 s on average, over some 250 tests)."""

    def serve_forever(self, poll_interval: float = SERVER_POLL_SECONDS) -> None:
        super().serve_forever(poll_interval)

    def shutdown(self) -> None:
        """Stop the accept loop and close the socket (this server is not in `ae._servers`)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def start_server(
    ae: AE, address: tuple[str, int] = ("127.0.0.1", 0), **kw: Any
) -> ThreadedAssociationServer:
    """`ae.start_server(address, block=False, **kw)` with a server that stops at once."""
    server = ae.make_server(address, server_class=QuickServer, **kw)
    thread = threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True)
    thread.start()
    return server


def data_file(name: str) -> Path:
    """A file from pydicom's test data (shipped in the wheel, never downloaded)."""
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(str(path))


def _encode_ct(uid: str, study: str | None) -> bytes:
    """CT_small with these UIDs, as pydicom writes it."""
    ds = dcmread(data_file("CT_small.dcm"))
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    if study is not None:
        ds.StudyInstanceUID = study
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@functools.cache
def _ct_template(uid_len: int, study_len: int | None) -> tuple[bytes, re.Pattern[bytes]] | None:
    """CT_small encoded once with placeholder UIDs of these lengths, and a pattern finding
    them; None when a placeholder is not found exactly where the UIDs go."""
    if uid_len < 3 or (study_len is not None and study_len < 3):
        return None
    uid = "1." + "8" * (uid_len - 2)
    study = None if study_len is None else "1." + "9" * (study_len - 2)
    data = _encode_ct(uid, study)
    if data.count(uid.encode()) != 2 or (study and data.count(study.encode()) != 1):
        return None
    found = [uid.encode()] + ([study.encode()] if study else [])
    return data, re.compile(b"|".join(re.escape(f) for f in found))


def make_instance(path: Path, uid: str, study: str | None = None) -> int:
    """A real CT image (CT_small) with our UIDs, written beside and renamed into place.

    Returns its size. The rename is the atomic drop a modality's export would do. The bytes
    are pydicom's encoding with these UIDs; made by patching a template encoded once per UID
    length (equal lengths leave every element length and padding as they were): 0.1 ms
    instead of 10 ms a file.
    """
    template = _ct_template(len(uid), None if study is None else len(study))
    if template is None:
        data = _encode_ct(uid, study)
    else:
        encoded, pattern = template
        data = pattern.sub(
            lambda m: (uid if m.group().startswith(b"1.8") else str(study)).encode(), encoded
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(data)
    os.rename(tmp, path)
    return path.stat().st_size


def start_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """`forwarder run --config CONFIG` as a real process, its stderr into `log`."""
    with open(log, "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "forwarder", "run", "--config", str(config)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def stop_daemon(proc: subprocess.Popen[bytes], timeout: float = 20) -> int:
    """SIGTERM, wait `timeout`, then SIGKILL: nothing is left running. Returns the status."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def pynetdicom_file(name: str) -> Path:
    import pynetdicom

    return Path(pynetdicom.__file__).parent / "tests" / "dicom_files" / name


@dataclass
class Received:
    """One instance as the SCP received it."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    calling_aet: str
    encoded: bytes  # the data set exactly as it came over the wire
    message_id: int = 0  # the C-STORE-RQ's Message ID


@dataclass
class SCP:
    """A pynetdicom Storage SCP running in this process on 127.0.0.1."""

    port: int
    received: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)  # answered in turn; then 0x0000
    associations: int = 0
    proposed: list[int] = field(default_factory=list)  # contexts proposed, per association
    server: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    on_store: Callable[[Any], int | None] | None = None  # may return a status or None

    def uids(self) -> list[str]:
        with self.lock:
            return [r.sop_instance_uid for r in self.received]


def stores_per_association(scp: SCP, seconds: float) -> Counter[Any]:
    """Make each store take `seconds` at `scp` (a peer a round trip away); returns the count
    of stores per association, keyed by the association object (an id() is reused)."""
    counts: Counter[Any] = Counter()
    lock = threading.Lock()

    def store(event: Any) -> None:
        time.sleep(seconds)
        with lock:
            counts[event.assoc] += 1

    scp.on_store = store
    return counts


@pytest.fixture
def make_scp() -> Iterator[Callable[..., SCP]]:
    """Start SCPs: `make_scp(transfer_syntaxes=..., ae_title=..., tls=..., require_calling=...)`."""
    servers: list[Any] = []

    def start(
        transfer_syntaxes: list[str] | None = None,
        ae_title: str = "ANY-SCP",
        sop_classes: list[str] | None = None,
        ssl_context: Any = None,
        require_called: bool = False,
        maximum_pdu_size: int = 16382,
        port: int = 0,
    ) -> SCP:
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = require_called
        ae.maximum_pdu_size = maximum_pdu_size
        syntaxes = transfer_syntaxes or ALL_TS
        classes = sop_classes or [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
        ae.supported_contexts = [build_context(uid, syntaxes) for uid in classes]
        scp = SCP(port=0)

        def on_c_store(event: Any) -> int:
            if scp.on_store is not None:
                override = scp.on_store(event)
                if override is not None:
                    return override
            with scp.lock:
                status = scp.statuses.pop(0) if scp.statuses else 0x0000
                if status in (0x0000, 0x0001, 0x0111) or 0xB000 <= status <= 0xBFFF:
                    scp.received.append(
                        Received(
                            sop_class_uid=str(event.request.AffectedSOPClassUID),
                            sop_instance_uid=str(event.request.AffectedSOPInstanceUID),
                            transfer_syntax=str(event.context.transfer_syntax),
                            calling_aet=str(event.assoc.requestor.ae_title),
                            encoded=bytes(event.request.DataSet.getvalue()),
                            message_id=int(event.request.MessageID),
                        )
                    )
            return status

        def on_established(event: Any) -> None:
            with scp.lock:
                scp.associations += 1
                scp.proposed.append(len(event.assoc.requestor.requested_contexts))

        server = start_server(
            ae,
            ("127.0.0.1", port),
            evt_handlers=[(evt.EVT_C_STORE, on_c_store), (evt.EVT_ESTABLISHED, on_established)],
            ssl_context=ssl_context,
        )
        servers.append(server)
        scp.server = server
        scp.port = server.server_address[1]
        return scp

    yield start
    for server in servers:
        server.shutdown()


@pytest.fixture
def scp(make_scp: Callable[..., SCP]) -> SCP:
    """A Storage SCP accepting every storage class in every transfer syntax."""
    return make_scp()


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for port 0 and outgoing connections (ip_local_port_range)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2]
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_PORTS_GIVEN: set[int] = set()
_PORT_PICKER = random.Random()


def free_port() -> int:
    """A port nobody listens on now, for a server a test starts later (a daemon, storescp).

    Below the kernel's ephemeral range: a port from there (a bind to port 0, closed again)
    could be handed to an SCP started on port 0, or to an outgoing connection, before the
    server binds it. Under load that happened: the daemon's receiver got "Address already in
    use" from the test's own SCP. Never the same port twice in one run."""
    low, _ = ephemeral_ports()
    first = max(1024, low - 12000)
    for _ in range(1000):
        port = _PORT_PICKER.randrange(first, low)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port in {first}-{low - 1}")


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A TCP listener that accepts and never answers (a peer whose DICOM side hangs)."""
    srv = socket.create_server(("127.0.0.1", 0))
    conns: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not done.is_set():
            try:
                conns.append(srv.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, name="silent-listener")
    thread.start()
    yield srv.getsockname()[1]
    done.set()
    thread.join()
    for c in conns:
        c.close()
    srv.close()


@dataclass
class StoreSCP:
    """DCMTK's storescp as an independent peer."""

    port: int
    out: Path
    proc: subprocess.Popen[bytes]

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.rglob("*") if p.is_file())


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("REQUIRE_TEST_TOOLS"):
            pytest.fail(f"{name} is required (REQUIRE_TEST_TOOLS is set) but not installed")
        pytest.skip(f"{name} not installed (apt-get install dcmtk)")
    return path


@pytest.fixture
def make_orthanc(tmp_path: Path) -> Iterator[Callable[..., Orthanc]]:
    """Start private Orthanc processes: `make_orthanc(aet=..., modalities=..., plugins=...,
    tcp_nodelay=..., config=...)` (see tests/orthanc.py); each is stopped at teardown.
    Skips when Orthanc (or a plugin asked for) is not installed; fails under REQUIRE_TEST_TOOLS."""
    started: list[Orthanc] = []

    def start(**options: Any) -> Orthanc:
        try:
            peer = Orthanc(tmp_path / f"orthanc-{len(started)}", **options)
        except OrthancUnavailable as exc:
            if os.environ.get("REQUIRE_TEST_TOOLS"):
                pytest.fail(f"{exc} (REQUIRE_TEST_TOOLS is set)")
            pytest.skip(str(exc))
        started.append(peer)
        return peer.start()

    try:
        yield start
    finally:
        for peer in started:
            peer.stop()


@pytest.fixture
def orthanc(make_orthanc: Callable[..., Orthanc]) -> Orthanc:
    """An Orthanc accepting every storage class in every transfer syntax (AE title ORTHANC)."""
    return make_orthanc()


@pytest.fixture
def make_storescp(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    """Start DCMTK storescp processes: `make_storescp(*extra_args, env=...)`."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> StoreSCP:
        exe = require_tool("storescp")
        out = tmp_path / f"storescp-{len(procs)}"
        out.mkdir()
        port = free_port()
        proc = subprocess.Popen(
            [exe, "-od", str(out), *args, str(port)],
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)

        def listening() -> bool:
            assert proc.poll() is None, "storescp exited"
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, 10)
        return StoreSCP(port, out, proc)

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def storescp(make_storescp: Callable[..., StoreSCP]) -> StoreSCP:
    """DCMTK storescp with Nagle off, accepting all transfer syntaxes (+xa)."""
    return make_storescp("+xa", env={"TCP_NODELAY": "1"})


@pytest.fixture(autouse=True, scope="session")
def compiled_forwarder() -> None:
    """Byte-compile the package once: with PYTHONDONTWRITEBYTECODE=1 in the environment (as
    here) no process writes its .pyc, and every daemon and CLI process the tests start compiled
    the package's modules again (0.23 s of its 0.85 s start-up). Stale files are recompiled;
    Python checks each .pyc against its source's mtime anyway."""
    assert compileall.compile_dir(REPO / "forwarder", quiet=1), "forwarder does not compile"


@pytest.fixture(autouse=True, scope="session")
def no_forwarder_environment() -> Iterator[None]:
    """Tests configure the forwarder themselves: the caller's FORWARDER_... variables
    (settings overrides, FORWARDER_CONFIG) must not leak into them, module fixtures included."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("FORWARDER_")}
    for name in saved:
        del os.environ[name]
    yield
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads of its own running."""
    before = set(threading.enumerate())
    yield

    def leaked() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t not in before and t.is_alive()]

    deadline = time.monotonic() + 10
    while leaked() and time.monotonic() < deadline:
        time.sleep(0.02)
    names = [t.name for t in leaked()]
    assert not names, f"threads left running: {names}"
