"""STOW-RS destinations (forwarder/stow.py, forwarder/dicomweb.py, forwarder/httpauth.py):
what a real HTTP server on loopback received and answered, Orthanc's DICOMweb plugin, and the
daemon sending to them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from conftest import SERVER_POLL_SECONDS, data_file, make_instance
from orthanc import Orthanc
from pydicom import dcmread
from test_daemon import Forwarder, dest
from test_daemon import fwd as fwd  # the daemon fixture

from forwarder import dicomweb
from forwarder.association import AssociationFailed
from forwarder.config import AuthSettings, ConfigError, load_settings
from forwarder.dicomfile import DicomInfo, inspect
from forwarder.httpauth import Credentials
from forwarder.status import Action
from forwarder.stow import StowSender

ROOT = Path(__file__).resolve().parents[1]
CT_UID = "1.2.826.0.1.3680043.8.498.7"  # prefix of our test instances


# -- an in-process STOW-RS server --------------------------------------------------------------


@dataclass
class Received:
    """One request as the server read it."""

    headers: dict[str, str]
    uids: list[str]
    client_port: int
    body_bytes: int
    path: str = ""
    patient_ids: list[str] = field(default_factory=list)
    syntaxes: list[str] = field(default_factory=list)


Answer = tuple[int, dict[str, str], bytes]
"""(HTTP status, headers, body)."""


@dataclass
class StowServer:
    """ThreadingHTTPServer on 127.0.0.1:0 whose answer is `respond(request)` (default: 200,
    every instance referenced). `requests` is what it received, in order."""

    respond: Callable[[Received], Answer | None] = field(default=lambda r: None)
    requests: list[Received] = field(default_factory=list)
    drop_after: int | None = None  # a longer body: read this much, then close the connection
    tokens: list[dict[str, list[str]]] = field(default_factory=list)  # POST /token forms
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def uids(self) -> list[str]:
        return [u for r in self.requests for u in r.uids]


def referenced(uids: list[str], failed: dict[str, int] | None = None,
               warnings: dict[str, int] | None = None) -> bytes:  # fmt: skip
    """A DICOM JSON STOW-RS response."""
    failed, warnings = failed or {}, warnings or {}
    ok = []
    for uid in uids:
        item: dict[str, Any] = {"00081155": {"vr": "UI", "Value": [uid]}}
        if uid in warnings:
            item["00081196"] = {"vr": "US", "Value": [warnings[uid]]}
        ok.append(item)
    bad = [
        {"00081155": {"vr": "UI", "Value": [u]}, "00081197": {"vr": "US", "Value": [code]}}
        for u, code in failed.items()
    ]
    data: dict[str, Any] = {}
    if ok:
        data["00081199"] = {"vr": "SQ", "Value": ok}
    if bad:
        data["00081198"] = {"vr": "SQ", "Value": bad}
    return json.dumps(data).encode()


def ok_answer(r: Received) -> Answer:
    return 200, {"Content-Type": "application/dicom+json"}, referenced(r.uids)


def _parse_multipart(content_type: str, body: bytes) -> list[Any]:
    bound = content_type.split("boundary=", 1)[1].split(";")[0].strip('"')
    datasets = []
    for chunk in body.split(b"--" + bound.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk.partition(b"\r\n\r\n")
        assert b"application/dicom" in head
        ds = dcmread(BytesIO(data.removesuffix(b"\r\n")))  # a Part 10 file, with its meta
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        datasets.append(ds)
    return datasets


@pytest.fixture
def stow_server() -> Iterator[StowServer]:
    state = StowServer()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:  # QIDO-RS for `forwarder echo`
            self._reply(200, {"Content-Type": "application/dicom+json"}, b"[]")

        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            if self.path == "/token":  # an OAuth2 token endpoint: tok1, tok2, ...
                form = parse_qs(self.rfile.read(length).decode())
                state.tokens.append(form)
                answer = {"access_token": f"tok{len(state.tokens)}", "expires_in": 3600}
                self._reply(200, {"Content-Type": "application/json"}, json.dumps(answer).encode())
                return
            if state.drop_after is not None and length > state.drop_after:
                self.rfile.read(state.drop_after)
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            body = self.rfile.read(length)
            datasets = _parse_multipart(self.headers["Content-Type"], body)
            r = Received(
                {k.lower(): v for k, v in self.headers.items()},
                [str(ds.SOPInstanceUID) for ds in datasets],
                self.client_address[1],
                len(body),
                self.path,
                [str(ds.PatientID) for ds in datasets],
                [str(ds.file_meta.TransferSyntaxUID) for ds in datasets],
            )
            state.requests.append(r)
            answer = state.respond(r) or ok_answer(r)
            self._reply(*answer)

        def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": SERVER_POLL_SECONDS},  # shutdown() at once, not within 0.5 s
        name="stow-server",
        daemon=True,
    )
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback is never sent through a proxy the environment may name."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def instances(folder: Path, n: int, prefix: str = "a") -> list[DicomInfo]:
    out = []
    for i in range(n):
        path = folder / f"{prefix}{i}.dcm"
        make_instance(path, f"{CT_UID}.{prefix.encode().hex()}.{i + 1}")
        out.append(inspect(path))
    return out


def sender(server: StowServer, **kw: Any) -> StowSender:
    return StowSender(server.url, timeout=kw.pop("timeout", 10), **kw)


# -- the pure parts ----------------------------------------------------------------------------


def test_requests_are_bounded_by_count_and_bytes() -> None:
    assert dicomweb.plan_requests([10] * 5, 2, 1000) == [range(0, 2), range(2, 4), range(4, 5)]
    assert dicomweb.plan_requests([60, 50, 10, 200, 5], 10, 100) == [
        range(0, 1), range(1, 3), range(3, 4), range(4, 5)
    ]  # fmt: skip
    assert dicomweb.plan_requests([], 5, 10) == []


def test_json_and_xml_responses_give_the_same_outcomes() -> None:
    body = referenced(["1.1", "1.2"], failed={"1.3": 0xA700}, warnings={"1.2": 0xB000})
    xml = b"""<?xml version="1.0" encoding="UTF-8"?>
<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">
 <DicomAttribute tag="00081199" vr="SQ" keyword="ReferencedSOPSequence">
  <Item number="1"><DicomAttribute tag="00081155" vr="UI"><Value number="1">1.1</Value>
  </DicomAttribute></Item>
  <Item number="2"><DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2</Value>
  </DicomAttribute><DicomAttribute tag="00081196" vr="US"><Value number="1">45056</Value>
  </DicomAttribute></Item>
 </DicomAttribute>
 <DicomAttribute tag="00081198" vr="SQ" keyword="FailedSOPSequence">
  <Item number="1"><DicomAttribute tag="00081155" vr="UI"><Value number="1">1.3</Value>
  </DicomAttribute><DicomAttribute tag="00081197" vr="US"><Value number="1">42752</Value>
  </DicomAttribute></Item>
 </DicomAttribute>
</NativeDicomModel>"""
    bare = xml.replace(b' xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM"', b"")
    for parsed in (
        dicomweb.parse_response(body, "application/dicom+json"),
        dicomweb.parse_response(xml, "application/dicom+xml; charset=utf-8"),  # PS3.19 ns
        dicomweb.parse_response(bare, "application/dicom+xml"),
    ):
        got = {u: o.classification(202) for u, o in parsed.outcomes.items()}
        assert {u: c.action for u, c in got.items()} == {
            "1.1": Action.SENT, "1.2": Action.WARNING, "1.3": Action.RETRY
        }  # fmt: skip
        assert got["1.3"].status == 0xA700 and got["1.2"].status == 0xB000
    with pytest.raises(dicomweb.UnreadableResponse):
        dicomweb.parse_response(b"<html>busy</html>", "text/html")


@pytest.mark.parametrize(
    ("code", "action"),
    [(0xA700, Action.RETRY), (0xA900, Action.PERMANENT), (0xC000, Action.RETRY_FEW),
     (0x0111, Action.WARNING), (0x0122, Action.PERMANENT)],
)  # fmt: skip
def test_failure_reasons_are_classified_as_cstore_statuses(code: int, action: Action) -> None:
    outcome = dicomweb.InstanceOutcome("1.2.3", stored=False, reason=code)
    assert outcome.classification(409).action is action


def test_retry_after_takes_seconds_and_dates() -> None:
    assert dicomweb.retry_after("7") == 7.0
    assert dicomweb.retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert dicomweb.retry_after("soon") is None and dicomweb.retry_after(None) is None


# -- config ------------------------------------------------------------------------------------


def _load(tmp_path: Path, text: str) -> Any:
    cfg = tmp_path / "f.toml"
    cfg.write_text(text)
    return load_settings(cfg)


def test_dicomweb_destination_takes_host_and_port_from_its_url(tmp_path: Path) -> None:
    s = _load(
        tmp_path,
        '[[destinations]]\nname = "cloud"\ntype = "dicomweb"\n'
        'url = "https://pacs.example.org/dicom-web/"\n'
        '[destinations.auth]\ntype = "bearer"\ntoken_file = "/etc/t"\n',
    )
    d = s.destinations[0]
    assert (d.url, d.host, d.port, d.batch_size, d.max_request_mb, d.timeout_seconds) == (
        "https://pacs.example.org/dicom-web", "pacs.example.org", 443, 50, 64, 120
    )  # fmt: skip
    assert d.auth is not None and d.auth.token_file == Path("/etc/t")


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ('type = "dicomweb"', "url: required"),
        ('type = "dicomweb"\nurl = "ftp://x/y"', "http:// or https://"),
        ('type = "dicomweb"\nurl = "http://x"\nhost = "x"', "host: not used"),
        ('type = "dicomweb"\nurl = "http://x"\nauth = { type = "bearer" }', "token_file"),
        ('type = "dicomweb"\nurl = "http://x"\nauth = { type = "basic", user = "u" }',
         "password_file"),
        ('host = "x"\nport = 104\nurl = "http://x"', "only for a dicomweb"),
        ('type = "dicomweb"\nurl = "http://x"\ncommitment = { enabled = true }',
         "commitment: Storage Commitment is DICOM's"),
    ],
)  # fmt: skip
def test_config_check_names_the_bad_dicomweb_setting(tmp_path: Path, entry: str, says: str) -> None:
    text = f'[[destinations]]\nname = "cloud"\n{entry}\n'
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text)
    assert says in "\n".join(err.value.errors)
    cfg = tmp_path / "f.toml"
    proc = subprocess.run(
        [sys.executable, "-m", "forwarder", "config", "check", "--config", str(cfg)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 78, proc.stderr
    assert "destinations.0" in proc.stdout + proc.stderr


# -- the sender against the in-process server ------------------------------------------------


def test_200_stores_every_instance_streamed_over_one_connection(
    stow_server: StowServer, tmp_path: Path
) -> None:
    infos = instances(tmp_path, 5)
    with sender(stow_server, batch_size=2) as s:
        results = list(s.send(infos))
        results += list(s.send(instances(tmp_path, 1, "b")))
    assert [r.classification.action for r in results] == [Action.SENT] * 6
    assert all(r.classification.status == 0 and r.how == "as is" for r in results)
    assert stow_server.uids() == [i.sop_instance_uid for i in infos] + [
        results[-1].info.sop_instance_uid
    ]
    assert [len(r.uids) for r in stow_server.requests] == [2, 2, 1, 1]
    assert len({r.client_port for r in stow_server.requests}) == 1  # keep-alive
    first = stow_server.requests[0]
    assert first.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    assert "transfer-encoding" not in first.headers  # an exact Content-Length
    assert s.associations == 1


def test_max_request_mb_bounds_the_body(stow_server: StowServer, tmp_path: Path) -> None:
    infos = instances(tmp_path, 4)
    size = infos[0].size
    with sender(stow_server, max_request_bytes=int(size * 2.5)) as s:
        assert all(r.delivered for r in s.send(infos))
    assert [len(r.uids) for r in stow_server.requests] == [2, 2]
    assert max(r.body_bytes for r in stow_server.requests) < size * 2.5 + 1000


def test_202_gives_each_instance_its_own_outcome(stow_server: StowServer, tmp_path: Path) -> None:
    infos = instances(tmp_path, 5)
    u = [i.sop_instance_uid for i in infos]

    def partial(r: Received) -> Answer:  # u[4] is in neither sequence
        body = referenced([u[0], u[1]], failed={u[2]: 0xA700, u[3]: 0xA900},
                          warnings={u[1]: 0xB000})  # fmt: skip
        return 202, {"Content-Type": "application/dicom+json"}, body

    stow_server.respond = partial
    with sender(stow_server) as s:
        got = {r.info.sop_instance_uid: r.classification for r in s.send(infos)}
    assert [got[x].action for x in u] == [
        Action.SENT, Action.WARNING, Action.RETRY, Action.PERMANENT, Action.RETRY_FEW
    ]  # fmt: skip
    assert [got[x].status for x in u] == [0, 0xB000, 0xA700, 0xA900, None]
    assert "did not confirm" in got[u[4]].meaning


def test_an_xml_answer_is_read_as_the_json_one(stow_server: StowServer, tmp_path: Path) -> None:
    infos = instances(tmp_path, 2)
    u = [i.sop_instance_uid for i in infos]
    xml = (
        '<?xml version="1.0"?><NativeDicomModel '
        'xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">'
        '<DicomAttribute tag="00081199" vr="SQ"><Item number="1">'
        f'<DicomAttribute tag="00081155" vr="UI"><Value number="1">{u[0]}</Value>'
        "</DicomAttribute></Item></DicomAttribute>"
        '<DicomAttribute tag="00081198" vr="SQ"><Item number="1">'
        f'<DicomAttribute tag="00081155" vr="UI"><Value number="1">{u[1]}</Value>'
        '</DicomAttribute><DicomAttribute tag="00081197" vr="US"><Value number="1">43264'
        "</Value></DicomAttribute></Item></DicomAttribute></NativeDicomModel>"
    )
    stow_server.respond = lambda r: (202, {"Content-Type": "application/dicom+xml"}, xml.encode())
    with sender(stow_server) as s:
        got = [(r.classification.action, r.classification.status) for r in s.send(infos)]
    assert got == [(Action.SENT, 0), (Action.PERMANENT, 0xA900)]


def test_409_fails_by_reason_and_200_without_a_body_confirms_nothing(
    stow_server: StowServer, tmp_path: Path
) -> None:
    infos = instances(tmp_path, 2)
    stow_server.respond = lambda r: (
        409, {"Content-Type": "application/dicom+json"}, referenced([], failed={r.uids[0]: 0xC000})
    )  # fmt: skip
    with sender(stow_server) as s:
        actions = [r.classification.action for r in s.send(infos)]
        assert actions == [Action.RETRY_FEW, Action.RETRY_FEW]  # 0xC000; the other: unconfirmed
        stow_server.respond = lambda r: (200, {"Content-Type": "text/plain"}, b"")
        assert not any(r.delivered for r in s.send(infos))


def test_413_splits_the_request_down_to_single_instances(
    stow_server: StowServer, tmp_path: Path
) -> None:
    infos = instances(tmp_path, 5)
    big = infos[4].sop_instance_uid
    stow_server.respond = lambda r: (413, {}, b"") if len(r.uids) > 2 or big in r.uids else None
    with sender(stow_server) as s:
        got = {r.info.sop_instance_uid: r.classification for r in s.send(infos)}
    assert [len(r.uids) for r in stow_server.requests] == [5, 2, 3, 1, 2, 1, 1]
    assert [got[i.sop_instance_uid].action for i in infos[:4]] == [Action.SENT] * 4
    assert got[big].action is Action.PERMANENT and "413" in got[big].meaning


def test_429_waits_as_retry_after_says(stow_server: StowServer, tmp_path: Path) -> None:
    infos = instances(tmp_path, 2)
    answers = iter([(429, {"Retry-After": "1"}, b"")])
    stow_server.respond = lambda r: next(answers, None)
    start = time.monotonic()
    with sender(stow_server) as s:
        assert all(r.delivered for r in s.send(infos))
    assert time.monotonic() - start >= 1.0
    assert len(stow_server.requests) == 2


def test_busy_beyond_the_tries_pauses_the_destination(
    stow_server: StowServer, tmp_path: Path
) -> None:
    stow_server.respond = lambda r: (503, {"Retry-After": "0"}, b"")
    with sender(stow_server) as s, pytest.raises(AssociationFailed) as err:
        list(s.send(instances(tmp_path, 1)))
    assert err.value.classification.action is Action.RETRY and not err.value.busy
    assert len(stow_server.requests) == 3
    stow_server.respond = lambda r: (503, {"Retry-After": "3600"}, b"")  # longer than a request
    with sender(stow_server) as s, pytest.raises(AssociationFailed):
        list(s.send(instances(tmp_path, 1, "b")))
    assert len(stow_server.requests) == 4


def test_500_isolates_a_poison_instance_or_pauses_a_broken_server(
    stow_server: StowServer, tmp_path: Path
) -> None:
    infos = instances(tmp_path, 4)
    poison = infos[0].sop_instance_uid
    stow_server.respond = lambda r: (500, {}, b"") if poison in r.uids else None
    with sender(stow_server) as s:
        got = {r.info.sop_instance_uid: r.classification for r in s.send(infos)}
    assert [len(r.uids) for r in stow_server.requests] == [4, 2, 1, 1, 2]
    assert got[poison].action is Action.RETRY_FEW and "500" in got[poison].meaning
    assert all(got[i.sop_instance_uid].delivered for i in infos[1:])
    stow_server.respond = lambda r: (500, {}, b"")
    with sender(stow_server) as s, pytest.raises(AssociationFailed) as err:
        list(s.send(infos))
    assert err.value.classification.action is Action.RETRY
    assert "every instance" in err.value.classification.meaning


def test_401_pauses_then_a_rotated_token_is_used(stow_server: StowServer, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("old\n")
    stow_server.respond = lambda r: (
        None if r.headers.get("authorization") == "Bearer new" else (401, {}, b"")
    )
    creds = Credentials(AuthSettings(type="bearer", token_file=token))
    infos = instances(tmp_path, 2)
    with sender(stow_server, credentials=creds) as s:
        with pytest.raises(AssociationFailed) as err:
            list(s.send(infos))
        assert err.value.classification.action is Action.DESTINATION
        assert "credentials" in err.value.classification.meaning
        token.write_text("new\n")  # rotated on disk: no reload
        assert all(r.delivered for r in s.send(infos))
    assert [r.headers["authorization"] for r in stow_server.requests] == [
        "Bearer old", "Bearer new"
    ]  # fmt: skip


def test_oauth2_token_is_fetched_kept_and_replaced_when_refused(
    stow_server: StowServer, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("shh\n")
    auth = AuthSettings(
        type="oauth2-client-credentials",
        token_url=f"http://127.0.0.1:{stow_server.port}/token",
        client_id="fwd",
        client_secret_file=secret,
        scope="dicom",
    )
    refused = {"Bearer tok1"}
    stow_server.respond = lambda r: (
        (401, {}, b"") if r.headers["authorization"] in refused else None
    )
    with sender(stow_server, credentials=Credentials(auth)) as s:
        assert all(r.delivered for r in s.send(instances(tmp_path, 1)))  # tok1 refused: tok2
        assert all(r.delivered for r in s.send(instances(tmp_path, 1, "b")))  # tok2 kept
    assert [r.headers["authorization"] for r in stow_server.requests] == [
        "Bearer tok1", "Bearer tok2", "Bearer tok2"
    ]  # fmt: skip
    assert stow_server.tokens[0] == {
        "grant_type": ["client_credentials"], "client_id": ["fwd"],
        "client_secret": ["shh"], "scope": ["dicom"],
    }  # fmt: skip
    assert len(stow_server.tokens) == 2


def test_config_check_names_a_missing_secret_file(tmp_path: Path) -> None:
    cfg = tmp_path / "f.toml"
    cfg.write_text(
        '[[destinations]]\nname = "web"\ntype = "dicomweb"\nurl = "https://x/dw"\n'
        f'auth = {{ type = "bearer", token_file = "{tmp_path}/nope" }}\n'
    )
    proc = forwarder("config", "check", "--config", str(cfg))
    assert proc.returncode == 78
    assert f"destinations.0.auth.token_file: file not found: {tmp_path}/nope" in (
        proc.stdout + proc.stderr
    )


def test_basic_auth_reads_the_password_file(stow_server: StowServer, tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret")
    creds = Credentials(AuthSettings(type="basic", user="u", password_file=pw))
    with sender(stow_server, credentials=creds) as s:
        assert all(r.delivered for r in s.send(instances(tmp_path, 1)))
    assert stow_server.requests[0].headers["authorization"] == "Basic dTpzM2NyZXQ="


def test_a_connection_dropped_mid_body_is_an_unknown_outcome(
    stow_server: StowServer, tmp_path: Path
) -> None:
    stow_server.drop_after = 1000
    infos = instances(tmp_path, 2)
    with sender(stow_server) as s:
        results = list(s.send(infos))
    assert [r.classification.action for r in results] == [Action.RETRY, Action.RETRY]
    assert all(r.classification.status is None for r in results)
    assert "outcome unknown" in results[0].classification.meaning


def test_a_body_cut_at_a_size_limit_is_sent_in_smaller_requests(
    stow_server: StowServer, tmp_path: Path
) -> None:
    infos = instances(tmp_path, 4)
    stow_server.drop_after = int(infos[0].size * 1.5)  # a proxy's body limit: 1 file passes
    with sender(stow_server) as s:
        results = list(s.send(infos))
    assert all(r.delivered for r in results)
    assert sorted(stow_server.uids()) == sorted(i.sop_instance_uid for i in infos)


@pytest.mark.parametrize(
    ("answer", "says"),
    [((404, {}, b""), "check url"), ((307, {"Location": "https://x/dw/studies"}, b""),
      "redirected to https://x/dw/studies")],
)  # fmt: skip
def test_a_wrong_url_pauses_the_destination(
    stow_server: StowServer, tmp_path: Path, answer: Answer, says: str
) -> None:
    stow_server.respond = lambda r: answer
    with sender(stow_server) as s, pytest.raises(AssociationFailed) as err:
        list(s.send(instances(tmp_path, 1)))
    assert err.value.classification.action is Action.DESTINATION
    assert says in err.value.classification.meaning
    assert len(stow_server.requests) == 1


def test_nobody_listening_pauses_the_destination(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = StowSender(f"http://127.0.0.1:{port}", timeout=2)
    with s, pytest.raises(AssociationFailed) as err:
        list(s.send(instances(tmp_path, 1)))
    assert err.value.classification.action is Action.RETRY
    assert "ConnectError" in err.value.classification.meaning


def test_a_file_without_a_preamble_gets_a_file_meta_header(
    stow_server: StowServer, tmp_path: Path
) -> None:
    info = inspect(data_file("rtstruct.dcm"))  # no preamble, no file meta
    with sender(stow_server) as s:
        results = list(s.send([info]))
    assert results[0].delivered
    assert stow_server.uids() == [info.sop_instance_uid]


# -- the commands ----------------------------------------------------------------------------


def forwarder(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    env["NO_PROXY"] = "127.0.0.1"
    return subprocess.run(
        [sys.executable, "-m", "forwarder", *argv],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout,
    )  # fmt: skip


def test_send_url_sends_one_shot_and_reports_refusals(
    stow_server: StowServer, tmp_path: Path
) -> None:
    infos = instances(tmp_path / "in", 3)
    refused = infos[1].sop_instance_uid
    stow_server.respond = lambda r: (
        409, {"Content-Type": "application/dicom+json"},
        referenced([u for u in r.uids if u != refused], failed={refused: 0xA900}),
    )  # fmt: skip
    token = tmp_path / "token"
    token.write_text("abc")
    report = tmp_path / "report.json"
    proc = forwarder("send", "--url", stow_server.url, "--token-file", str(token),
                     "--report", str(report), str(tmp_path / "in"))  # fmt: skip
    assert proc.returncode == 62, proc.stderr  # some refused (dcmsend's "cannot send")
    assert proc.stdout.strip() == "2 sent, 0 warning, 1 failed, 0 skipped"
    rows = {r["sop_instance_uid"]: r for r in json.loads(report.read_text())}
    assert rows[refused]["status"] == "0xA900" and rows[refused]["outcome"] == "failed"
    assert stow_server.requests[0].headers["authorization"] == "Bearer abc"
    stow_server.respond = lambda r: None
    proc = forwarder("send", "--url", stow_server.url, str(tmp_path / "in"))
    assert proc.returncode == 0, proc.stderr


def test_echo_a_dicomweb_destination_with_its_credentials(
    stow_server: StowServer, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("abc")
    cfg = tmp_path / "f.toml"
    cfg.write_text(
        f'[[destinations]]\nname = "web"\ntype = "dicomweb"\nurl = "{stow_server.url}"\n'
        f'auth = {{ type = "bearer", token_file = "{token}" }}\n'
        '[[destinations]]\nname = "gone"\ntype = "dicomweb"\nurl = "http://127.0.0.1:9"\n'
    )
    proc = forwarder("echo", "--config", str(cfg), "--json")
    results = {r["destination"]: r for r in json.loads(proc.stdout)["results"]}
    assert proc.returncode == 1  # "gone" failed
    assert results["web"]["ok"] and results["web"]["address"] == stow_server.url
    assert not results["gone"]["ok"] and "ConnectError" in results["gone"]["error"]


# -- a real daemon ---------------------------------------------------------------------------


def web_dest(name: str, url: str, **kw: Any) -> dict[str, Any]:
    d = dest(name, 1, type="dicomweb", url=url, timeout_seconds=10, **kw)
    for key in ("host", "port", "connect_timeout", "acse_timeout"):
        d.pop(key)
    return d


def test_daemon_delivers_to_a_stow_server_and_quarantines_refusals(
    fwd: Forwarder, stow_server: StowServer
) -> None:
    refused = f"{CT_UID}.99"
    stow_server.respond = lambda r: (
        202, {"Content-Type": "application/dicom+json"},
        referenced([u for u in r.uids if u != refused], failed={refused: 0xA900}),
    )  # fmt: skip
    token = fwd.tmp / "token"
    token.write_text("t0k3n")
    auth = {"type": "bearer", "token_file": str(token)}
    fwd.configure([web_dest("web", stow_server.url, auth=auth)]).start({"NO_PROXY": "127.0.0.1"})
    uids = [f"{CT_UID}.{i}" for i in range(1, 6)] + [refused]
    for uid in uids:
        make_instance(fwd.inbox / f"{uid}.dcm", uid)
    fwd.wait(lambda: not fwd.inbox_files(), what="the inbox emptied")
    assert sorted(set(stow_server.uids())) == sorted(uids)
    assert [p.name for p in fwd.quarantined()] == [f"{refused}.dcm"]
    assert {r.headers["authorization"] for r in stow_server.requests} == {"Bearer t0k3n"}
    assert fwd.stop() == 0


def test_daemon_pauses_on_401_and_resumes_with_the_rotated_token(
    fwd: Forwarder, stow_server: StowServer
) -> None:
    token = fwd.tmp / "token"
    token.write_text("old")
    stow_server.respond = lambda r: (
        None if r.headers["authorization"] == "Bearer new" else (401, {}, b"")
    )
    auth = {"type": "bearer", "token_file": str(token)}
    fwd.configure([web_dest("web", stow_server.url, auth=auth)]).start({"NO_PROXY": "127.0.0.1"})
    uids = [f"{CT_UID}.{i}" for i in range(1, 3)]
    for uid in uids:
        make_instance(fwd.inbox / f"{uid}.dcm", uid)
    log = fwd.wait_log("destination web paused")
    assert "refuses our credentials" in log
    assert all(d.attempts == 0 for d in fwd.deliveries())  # no attempt used
    token.write_text("new")
    fwd.wait(lambda: not fwd.inbox_files(), what="the inbox emptied")
    taken = [r for r in stow_server.requests if r.headers["authorization"] == "Bearer new"]
    assert sorted(u for r in taken for u in r.uids) == uids
    assert fwd.quarantined() == []
    assert fwd.stop() == 0


def test_daemon_sends_transformed_copies_over_stow_rs(
    fwd: Forwarder, stow_server: StowServer
) -> None:
    spliced = {"set": {"PatientID": "SPLICED"}}  # kept in its syntax: the head changed only
    copied = {"set": {"PatientID": "COPIED"}, "transfer_syntax": "implicit-le"}  # the pool
    fwd.configure(
        [
            web_dest("splice", stow_server.url + "/a", transform=spliced),
            web_dest("copy", stow_server.url + "/b", transform=copied),
        ],
        transform={"workers": 1},
    ).start({"NO_PROXY": "127.0.0.1"})
    uids = [f"{CT_UID}.{i}" for i in range(1, 4)]
    for uid in uids:
        make_instance(fwd.inbox / f"{uid}.dcm", uid)
    fwd.wait(lambda: not fwd.inbox_files(), what="the inbox emptied")
    by_path: dict[str, set[tuple[str, str, str]]] = {}
    for r in stow_server.requests:
        got = zip(r.uids, r.patient_ids, r.syntaxes, strict=True)
        by_path.setdefault(r.path, set()).update(got)
    explicit, implicit = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
    assert by_path["/dicom-web/a/studies"] == {(u, "SPLICED", explicit) for u in uids}
    assert by_path["/dicom-web/b/studies"] == {(u, "COPIED", implicit) for u in uids}
    assert fwd.quarantined() == []
    assert not list((fwd.outbox_path.parent / "transform-spool").glob("*"))
    assert fwd.stop() == 0


# -- Orthanc's DICOMweb plugin -------------------------------------------------------------


def test_orthanc_stores_what_stow_rs_sends(
    make_orthanc: Callable[..., Orthanc], tmp_path: Path
) -> None:
    orthanc = make_orthanc(plugins=("dicomweb",))
    infos = [*instances(tmp_path, 3), inspect(data_file("MR_small.dcm"))]
    with StowSender(orthanc.dicomweb_url, batch_size=2, timeout=30) as s:
        results = list(s.send(infos))
    assert [r.classification.action for r in results] == [Action.SENT] * 4, results
    uids = [i.sop_instance_uid for i in infos]
    assert orthanc.wait_for(uids) == sorted(uids)
    assert orthanc.tags(uids[0])["PatientID"] == dcmread(infos[0].path).PatientID


def test_daemon_delivers_to_orthanc_over_dicomweb(
    fwd: Forwarder, make_orthanc: Callable[..., Orthanc]
) -> None:
    orthanc = make_orthanc(plugins=("dicomweb",))
    fwd.configure([web_dest("orthanc", orthanc.dicomweb_url)]).start({"NO_PROXY": "127.0.0.1"})
    uids = [f"{CT_UID}.{i}" for i in range(1, 4)]
    for uid in uids:
        make_instance(fwd.inbox / f"{uid}.dcm", uid)
    assert orthanc.wait_for(uids, timeout=30) == sorted(uids)
    fwd.wait(lambda: not fwd.inbox_files(), what="the inbox emptied")
    assert fwd.quarantined() == []
    assert fwd.stop() == 0
