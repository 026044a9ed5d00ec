"""A private Orthanc (Debian's /usr/sbin/Orthanc) as a real DICOM peer for one test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

BINARY = "/usr/sbin/Orthanc"
# Debian links each plugin package's library here (libOrthancDicomWeb.so -> /usr/lib/orthanc/...).
PLUGINS_DIR = Path("/usr/share/orthanc/plugins")
# The plugins a test may ask for: name -> (file name glob in PLUGINS_DIR, Debian package).
PLUGINS = {"dicomweb": ("libOrthancDicomWeb.so*", "orthanc-dicomweb")}

# Every transfer syntax Orthanc 1.10 knows ("1.2.840.10008.1.*" is its own default, written
# out so that a changed default cannot narrow what our tests may send), and the groups on.
ACCEPT_ALL_SYNTAXES = {
    "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"],
    "DeflatedTransferSyntaxAccepted": True,
    "JpegTransferSyntaxAccepted": True,
    "Jpeg2000TransferSyntaxAccepted": True,
    "JpegLosslessTransferSyntaxAccepted": True,
    "JpipTransferSyntaxAccepted": True,
    "Mpeg2TransferSyntaxAccepted": True,
    "RleTransferSyntaxAccepted": True,
    "Mpeg4TransferSyntaxAccepted": True,
    "H265TransferSyntaxAccepted": True,
}

# REST calls go straight to loopback, never through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class OrthancUnavailable(RuntimeError):
    """Orthanc (or a plugin asked for) is not installed here."""


def find_binary() -> str | None:
    """Orthanc's executable: $ORTHANC_BINARY, else /usr/sbin/Orthanc, else on $PATH."""
    explicit = os.environ.get("ORTHANC_BINARY")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    if os.access(BINARY, os.X_OK):
        return BINARY
    return shutil.which("Orthanc")


def find_plugin(name: str) -> Path:
    """The shared object of plugin `name` (a PLUGINS key) in $ORTHANC_PLUGINS_DIR, else
    PLUGINS_DIR; OrthancUnavailable when absent."""
    pattern, package = PLUGINS[name]
    folder = Path(os.environ.get("ORTHANC_PLUGINS_DIR") or PLUGINS_DIR)
    found = sorted(folder.glob(pattern))
    if not found:
        raise OrthancUnavailable(
            f"Orthanc plugin {name!r} not in {folder} (apt-get install {package})"
        )
    return found[0]


def free_port() -> int:
    """A TCP port free on every interface (Orthanc 1.10 cannot bind to loopback only)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _deadline_loop(
    what: str, timeout: float, check: Callable[[], Any], interval: float = 0.02
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout} s")
        time.sleep(interval)


class Orthanc:
    """One Orthanc process with its own storage, index, config, ports and AE title.

    Parameters
    ----------
    workdir : Path
        A fresh folder: config.json, storage/, index/ and orthanc.log go there.
    aet : str
        Orthanc's AE title (``DicomAet``). The called AE title is not checked unless
        `check_called_aet`.
    modalities : mapping, optional
        ``DicomModalities``: name -> ``[aet, host, port]`` or Orthanc's object form (e.g.
        ``{"AET": ..., "Host": ..., "Port": ...}``): the peers Orthanc may call (C-STORE SCU,
        Storage Commitment reports).
    plugins : sequence of str
        Plugins to load, by PLUGINS key (``"dicomweb"``); none by default.
    check_called_aet : bool
        ``DicomCheckCalledAet``: refuse associations not addressed to `aet`.
    tcp_nodelay : bool
        Start Orthanc with ``TCP_NODELAY=1`` in its environment: the DCMTK it links then turns
        Nagle off on its DICOM sockets. False gives the stock peer, as a PACS built on DCMTK
        behaves (a sender that does not re-arm TCP_QUICKACK then waits ~40 ms per store; ours
        does, and Orthanc's own ingest, ~15 ms per CT_small here, dominates either way).
    verbose : bool
        Orthanc's ``--verbose`` logging into orthanc.log.
    config : mapping, optional
        Further options merged over ours (top-level keys replace ours), e.g.
        ``{"OverwriteInstances": True}``.

    Notes
    -----
    What Orthanc 1.10.1 (with DCMTK 3.6.7) stores is not always the data set it received, byte
    for byte (seen): encapsulated Pixel Data with VR OW is written as OB; sequences of undefined
    length get explicit lengths; a deflated data set is followed by zero bytes up to its inflated
    length. Uncompressed files without sequences of undefined length come back byte for byte.
    A SOP Instance UID already stored is answered with success and not replaced
    (``OverwriteInstances`` false, Orthanc's default).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, Any] | None = None,
        plugins: Sequence[str] = (),
        check_called_aet: bool = False,
        tcp_nodelay: bool = True,
        verbose: bool = False,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        binary = find_binary()
        if binary is None:
            raise OrthancUnavailable("Orthanc not installed (apt-get install orthanc)")
        self.binary = binary
        self.workdir = workdir
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.plugins = tuple(plugins)
        self.plugin_paths = [find_plugin(name) for name in self.plugins]
        self.check_called_aet = check_called_aet
        self.tcp_nodelay = tcp_nodelay
        self.verbose = verbose
        self.overrides = dict(config or {})
        self.config_path = workdir / "config.json"
        self.log_path = workdir / "orthanc.log"
        self.dicom_port = 0
        self.http_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0  # how long the last start took, until it answered
        self.stop_seconds = 0.0

    # -- configuration ------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """The JSON configuration this Orthanc runs with."""
        settings: dict[str, Any] = {
            "Name": f"forwarder-tests-{self.aet}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,  # file() returns what is on disk, as stored
            "Plugins": [str(p) for p in self.plugin_paths],
            "LuaScripts": [],
            # HTTP: REST for the tests; no listen-address option in 1.10, so Orthanc listens
            # on every interface: RemoteAccessAllowed false refuses any client but loopback.
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "HttpThreadsCount": 4,
            "WebDavEnabled": False,
            "OrthancExplorerEnabled": False,
            # DICOM: store anything from anyone, in any syntax, as received (no transcoding).
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": self.check_called_aet,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "UnknownSopClassAccepted": True,
            **ACCEPT_ALL_SYNTAXES,
            "DicomModalities": self.modalities,
            "DicomModalitiesInDatabase": False,
            "DicomThreadsCount": 4,
            # Nothing kept between runs, nothing extra on disk.
            "SaveJobs": False,
            "MaximumStorageSize": 0,
            "MaximumPatientCount": 0,
        }
        if "dicomweb" in self.plugins:
            settings["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "Ssl": False}
        settings.update(self.overrides)
        return settings

    @property
    def url(self) -> str:
        """The REST base, http://127.0.0.1:PORT (no trailing slash)."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (STOW-RS: POST {dicomweb_url}/studies); needs plugins=["dicomweb"]."""
        return f"{self.url}/dicom-web"

    # -- process ------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0, attempts: int = 3) -> Orthanc:
        """Start Orthanc and wait until REST /system answers and the DICOM port accepts.

        A port taken between picking and binding makes Orthanc exit: then new ports are picked,
        up to `attempts` times. Raises AssertionError (with the log's tail) when it never answers.
        """
        assert self.proc is None or self.proc.poll() is not None, "Orthanc already running"
        (self.workdir / "storage").mkdir(parents=True, exist_ok=True)
        (self.workdir / "index").mkdir(parents=True, exist_ok=True)
        for attempt in range(1, attempts + 1):
            self.dicom_port, self.http_port = free_port(), free_port()
            while self.http_port == self.dicom_port:
                self.http_port = free_port()
            self.config_path.write_text(json.dumps(self.settings(), indent=2))
            started = time.monotonic()
            self.proc = self._spawn()
            try:
                _deadline_loop("Orthanc answering on REST /system", timeout, self._answers)
            except _Exited:
                if attempt < attempts:
                    continue
                raise AssertionError(
                    f"Orthanc exited ({self.proc.returncode}) at start-up {attempts} times\n"
                    f"{self.log_tail()}"
                ) from None
            except AssertionError:
                self.stop()
                raise AssertionError(f"Orthanc did not answer\n{self.log_tail()}") from None
            self.start_seconds = time.monotonic() - started
            return self
        raise AssertionError("unreachable")

    def _spawn(self) -> subprocess.Popen[bytes]:
        argv = [self.binary, *(["--verbose"] if self.verbose else []), str(self.config_path)]
        # setpriv --pdeathsig: Orthanc dies with the test process even if it is killed outright
        # (setpriv execs Orthanc, so the pid stays Orthanc's).
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            argv = [setpriv, "--pdeathsig", "KILL", *argv]
        env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
        if self.tcp_nodelay:
            env["TCP_NODELAY"] = "1"
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(
                argv,
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise _Exited
        try:
            system = self.get("/system", timeout=1)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
        if system.get("DicomAet") != self.aet:
            return False
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.dicom_port)) == 0

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait `timeout`, then SIGKILL; returns the exit status (None: never started)."""
        if self.proc is None:
            return None
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = started + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                # Orthanc stops its HTTP server, then its DICOM server; each notices only when
                # its accept loop wakes (civetweb polls every 2 s, DCMTK every 1 s). A connection
                # wakes it: 0.5 s to stop instead of 3.5 s.
                _poke(self.http_port)
                _poke(self.dicom_port)
                try:
                    self.proc.wait(0.03)
                except subprocess.TimeoutExpired:
                    continue
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.stop_seconds = time.monotonic() - started
        return self.proc.returncode

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        return self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 30) -> str:
        return "--- orthanc log (tail) ---\n" + "\n".join(self.log_text().splitlines()[-n:])

    # -- REST ---------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | Mapping[str, Any] | list[Any] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> bytes:
        """One REST call; the response body. Raises urllib.error.HTTPError on 4xx/5xx."""
        data: bytes | None
        if body is None or isinstance(body, bytes):
            data = body
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers=dict(headers or {})
        )
        with _OPENER.open(req, timeout=timeout) as resp:
            return bytes(resp.read())

    def get(self, path: str, timeout: float = 10.0) -> Any:
        """GET `path`, parsed as JSON."""
        return json.loads(self.request("GET", path, timeout=timeout))

    def orthanc_id(self, sop_uid: str) -> str:
        """Orthanc's own id of the instance with this SOP Instance UID; KeyError if not stored."""
        found = json.loads(self.request("POST", "/tools/lookup", sop_uid))
        ids = [item["ID"] for item in found if item.get("Type") == "Instance"]
        if not ids:
            raise KeyError(f"no instance {sop_uid} in Orthanc {self.aet}")
        return str(ids[0])

    # -- what Orthanc stored ------------------------------------------------------------------

    def instances(self) -> list[str]:
        """The SOP Instance UIDs stored, sorted."""
        expanded = self.get("/instances?expand")
        return sorted(str(i["MainDicomTags"]["SOPInstanceUID"]) for i in expanded)

    def tags(self, sop_uid: str) -> dict[str, Any]:
        """Keyword -> value of the stored instance (REST simplified-tags): text as Orthanc shows
        it (numbers as strings, multiple values joined by a backslash), sequences as lists of
        dicts, binary and long elements (PixelData) as None."""
        result: dict[str, Any] = self.get(f"/instances/{self.orthanc_id(sop_uid)}/simplified-tags")
        return result

    def file(self, sop_uid: str) -> bytes:
        """The stored Part 10 file, as Orthanc keeps it (its own file meta information)."""
        return self.request("GET", f"/instances/{self.orthanc_id(sop_uid)}/file")

    def dataset(self, sop_uid: str) -> Dataset:
        """The stored file parsed by pydicom (pixels decodable with the codecs extra)."""
        return dcmread(BytesIO(self.file(sop_uid)))

    def transfer_syntax(self, sop_uid: str) -> str:
        """The transfer syntax the instance was stored in (Orthanc's metadata)."""
        oid = self.orthanc_id(sop_uid)
        return self.request("GET", f"/instances/{oid}/metadata/TransferSyntax").decode().strip()

    def metadata(self, sop_uid: str) -> dict[str, str]:
        """Orthanc's metadata of the instance (RemoteAET, CalledAET, TransferSyntax, ...)."""
        oid = self.orthanc_id(sop_uid)
        result: dict[str, str] = self.get(f"/instances/{oid}/metadata?expand")
        return result

    def wait_for(self, expected: int | Iterable[str], timeout: float = 15.0) -> list[str]:
        """Wait until at least `expected` instances (a count, or these SOP Instance UIDs) are
        stored; returns instances(). AssertionError at the deadline, naming what is missing."""
        wanted = None if isinstance(expected, int) else set(expected)
        count = expected if isinstance(expected, int) else len(wanted or ())
        seen: list[str] = []

        def done() -> bool:
            nonlocal seen
            seen = self.instances()
            return set(seen) >= wanted if wanted is not None else len(seen) >= count

        try:
            _deadline_loop("instances in Orthanc", timeout, done, interval=0.05)
        except AssertionError:
            missing = sorted(wanted - set(seen)) if wanted is not None else []
            raise AssertionError(
                f"Orthanc has {len(seen)} instances, wanted {count} within {timeout} s"
                + (f"; missing {missing[:5]}" if missing else "")
            ) from None
        return seen

    def clear(self) -> None:
        """Delete every stored instance (to reuse one Orthanc across tests)."""
        for patient in self.get("/patients"):
            self.request("DELETE", f"/patients/{patient}")


def _poke(port: int) -> None:
    """Open and close a TCP connection to `port` on loopback (refused is fine)."""
    with socket.socket() as s:
        s.settimeout(0.2)
        s.connect_ex(("127.0.0.1", port))


class _Exited(Exception):
    """Orthanc exited while we waited for it to answer."""
