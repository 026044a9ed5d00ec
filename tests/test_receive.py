"""The receiver (``[receive]``): modalities push over DICOM to a real ``forwarder run``.

The modality is an in-process pynetdicom SCU or DCMTK's dcmsend; the destinations are
pynetdicom SCPs (port 0) or storescp. Every test asserts what the modality was answered and
what the destinations received.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from conftest import SCP, StoreSCP, free_port, require_tool
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from test_daemon import ROOT, Corpus, Forwarder, _clean_env, dest, to_toml

from forwarder.outbox import Outbox, State
from forwarder.receiver import folder_name

EX_CONFIG = 78
PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.10.999.77.1"  # no one's storage class


# -- helpers ----------------------------------------------------------------------------------


class Modality:
    """An in-process pynetdicom SCU pushing to the receiver, recording every answer.

    A store left without a response is sent again on a fresh association, as a modality does
    (`retries` times): pynetdicom 3.0's SCU now and then loses a response that comes fast
    (its reactor thread takes it: "Received unexpected C-STORE service message", see
    shared/notes/dicom-networking.md), and then waits out its DIMSE timeout.
    """

    def __init__(
        self, port: int, aet: str = "CT01", called: str = "FORWARDER", dimse_timeout: float = 3
    ) -> None:
        self.port = port
        self.aet = aet
        self.called = called
        self.dimse_timeout = dimse_timeout
        self.answers: dict[str, int | None] = {}  # SOP Instance UID -> status (None: none)
        self.comments: dict[str, str] = {}
        self.lost = 0  # stores without a response

    def associate(self, classes: list[str], syntaxes: list[str] | None = None) -> Any:
        ae = AE(ae_title=self.aet)
        ae.acse_timeout = ae.network_timeout = 15
        ae.dimse_timeout = self.dimse_timeout
        for uid in dict.fromkeys(classes):
            ae.add_requested_context(uid, syntaxes or [ExplicitVRLittleEndian])
        return ae.associate("127.0.0.1", self.port, ae_title=self.called)

    def push(
        self, datasets: list[Dataset], syntaxes: list[str] | None = None, retries: int = 2
    ) -> None:
        """Store every data set (one association per try); record each answer."""
        todo = list(datasets)
        for _ in range(retries + 1):
            if not todo:
                return
            assoc = self.associate([str(ds.SOPClassUID) for ds in todo], syntaxes)
            if not assoc.is_established:
                return
            left = []
            try:
                for n, ds in enumerate(todo):
                    rsp = assoc.send_c_store(ds)
                    uid = str(ds.SOPInstanceUID)
                    status = rsp.get("Status") if rsp else None
                    self.answers[uid] = None if status is None else int(status)
                    if rsp and "ErrorComment" in rsp:
                        self.comments[uid] = str(rsp.ErrorComment)
                    if status is None:
                        self.lost += 1
                        left.append(ds)
                    if not assoc.is_established:
                        left += todo[n + 1 :]
                        break
            finally:
                if assoc.is_established:
                    assoc.release()
            todo = left

    def acked(self) -> set[str]:
        return {uid for uid, status in self.answers.items() if status == 0x0000}


@pytest.fixture
def corpus() -> Corpus:
    return Corpus()


def instances(corpus: Corpus, n: int) -> list[Dataset]:
    """`n` small Secondary Capture instances with fresh UIDs, as a modality holds them."""
    out = []
    for _ in range(n):
        _, data = corpus.encode()
        out.append(dcmread(BytesIO(data)))
    return out


def ct(uid: str | None = None) -> Dataset:
    from conftest import data_file

    ds = dcmread(data_file("CT_small.dcm"))
    ds.SOPInstanceUID = uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


class Receiving(Forwarder):
    """A daemon that receives on a free port into ``tmp/received``."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.received_dir = tmp / "received"
        self.port = free_port()

    def configure_receiving(
        self, destinations: list[dict[str, Any]], receive: dict[str, Any] | None = None, **over: Any
    ) -> Receiving:
        rcv = {
            "listen": f"127.0.0.1:{self.port}",
            "ae_title": "FORWARDER",
            "allowed_calling_aets": ["CT01", "MR02", "DCMSEND"],
            "dir": str(self.received_dir),
            **(receive or {}),
        }
        self.configure(destinations, receive=rcv, **over)
        return self

    def start(self, *args: Any, **kw: Any) -> Receiving:
        super().start(*args, **kw)
        self.wait_log("receiving as", timeout=20)
        return self

    def received_files(self) -> list[Path]:
        if not self.received_dir.exists():
            return []
        hidden = {".incoming", ".acklog"}  # spool files and ack log segments
        return sorted(
            p for p in self.received_dir.rglob("*") if p.is_file() and not hidden & set(p.parts)
        )

    def landed(self, n: int, timeout: float = 15) -> list[Path]:
        """The received files once there are `n`, each with its outbox rows (an acknowledged
        instance gets its file from the ack log a moment after its answer, and its rows a
        moment after its file)."""

        def queued() -> bool:
            files = self.received_files()
            if len(files) < n or not self.outbox_path.exists():
                return False
            with Outbox(self.outbox_path, readonly=True) as ob:
                return all(ob.list(path=str(p), limit=1) for p in files)

        self.wait(queued, timeout, f"{n} received and queued file(s)")
        return self.received_files()

    def spooled(self) -> list[Path]:
        incoming = self.received_dir / ".incoming"
        return sorted(incoming.iterdir()) if incoming.exists() else []


@pytest.fixture
def rcv(tmp_path: Path) -> Iterator[Receiving]:
    f = Receiving(tmp_path)
    f.inbox.mkdir()
    try:
        yield f
    finally:
        f.cleanup()


def _bytes_of(ds: Dataset) -> bytes:
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


# -- tests ------------------------------------------------------------------------------------


def test_pushed_instances_reach_two_destinations_and_leave_the_folder(
    rcv: Receiving, make_scp: Callable[..., SCP], corpus: Corpus
) -> None:
    a, b = make_scp(), make_scp()
    rcv.configure_receiving([dest("a", a.port), dest("b", b.port)]).start()
    modality = Modality(rcv.port)
    datasets = [*instances(corpus, 30), ct()]
    modality.push(datasets)
    uids = {str(ds.SOPInstanceUID) for ds in datasets}
    assert modality.acked() == uids, modality.answers
    rcv.wait(lambda: uids <= set(a.uids()) and uids <= set(b.uids()), 20, "both destinations")
    rcv.wait(lambda: not rcv.received_files(), 10, "received files disposed of")
    # the peer got the data set exactly as the modality sent it (never decoded)
    sent = {r.sop_instance_uid: r.encoded for r in a.received}
    original = _bytes_of(datasets[-1])
    assert original.endswith(sent[str(datasets[-1].SOPInstanceUID)])
    assert not rcv.spooled()
    assert rcv.stop() == 0


def test_received_file_is_the_data_set_as_sent_under_the_calling_aet(
    rcv: Receiving, make_scp: Callable[..., SCP]
) -> None:
    held = make_scp()
    held.statuses = [0xA700] * 1000  # the destination keeps refusing: the file stays queued
    rcv.configure_receiving(
        [dest("a", held.port)], retry={"initial_seconds": 60, "max_seconds": 60}
    ).start()
    ds = ct()
    Modality(rcv.port, aet="MR02").push([ds], syntaxes=["1.2.840.10008.1.2"])
    (path,) = rcv.landed(1)
    assert path == rcv.received_dir / "MR02" / f"{ds.SOPInstanceUID}.dcm"
    got = dcmread(path)
    assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"  # the negotiated syntax
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    with Outbox(rcv.outbox_path, readonly=True) as ob:
        (row,) = ob.find(str(ds.SOPInstanceUID))
    assert row.path == str(path)
    assert row.state in (State.PENDING, State.INFLIGHT)
    assert rcv.stop() == 0


def test_routing_on_calling_aet(
    rcv: Receiving, make_scp: Callable[..., SCP], corpus: Corpus
) -> None:
    ct_pacs, mr_pacs = make_scp(), make_scp()
    rcv.configure_receiving(
        [
            dest("ct", ct_pacs.port, match={"calling_aet": "CT*"}),
            dest("mr", mr_pacs.port, match={"calling_aet": "MR*", "peer": "127.0.0.*"}),
        ]
    ).start()
    from_ct, from_mr = instances(corpus, 3), instances(corpus, 2)
    Modality(rcv.port, aet="CT01").push(from_ct)
    Modality(rcv.port, aet="MR02").push(from_mr)
    ct_uids = {str(d.SOPInstanceUID) for d in from_ct}
    mr_uids = {str(d.SOPInstanceUID) for d in from_mr}
    rcv.wait(lambda: set(ct_pacs.uids()) == ct_uids and set(mr_pacs.uids()) == mr_uids, 20)
    assert rcv.stop() == 0


def test_unmatched_received_instance_is_quarantined_and_answered_success(
    rcv: Receiving, make_scp: Callable[..., SCP], corpus: Corpus
) -> None:
    pacs = make_scp()
    rcv.configure_receiving([dest("ct", pacs.port, match={"calling_aet": "CT*"})]).start()
    modality = Modality(rcv.port, aet="MR02")
    (ds,) = instances(corpus, 1)
    modality.push([ds])
    assert modality.answers == {str(ds.SOPInstanceUID): 0x0000}
    (q,) = rcv.quarantined()
    assert q.name == f"{ds.SOPInstanceUID}.dcm"
    assert "no destination matched" in Path(f"{q}.json").read_text()
    assert not rcv.received_files()
    assert rcv.stop() == 0


def test_calling_aet_not_allowed_is_rejected_and_logged(
    rcv: Receiving, make_scp: Callable[..., SCP]
) -> None:
    rcv.configure_receiving([dest("a", make_scp().port)]).start()
    assoc = Modality(rcv.port, aet="INTRUDER").associate([str(ct().SOPClassUID)])
    assert assoc.is_rejected
    rq = assoc.acceptor.primitive
    assert (rq.result, rq.result_source, rq.diagnostic) == (0x01, 0x01, 0x03)
    assoc = Modality(rcv.port, aet="CT01", called="SOMEONE").associate([str(ct().SOPClassUID)])
    assert assoc.is_rejected
    rq = assoc.acceptor.primitive
    assert (rq.result, rq.result_source, rq.diagnostic) == (0x01, 0x01, 0x07)
    text = rcv.wait_log("rejected: calling AE title not recognised")
    assert "'INTRUDER' at 127.0.0.1:" in text
    rcv.wait_log("rejected: called AE title 'SOMEONE' not recognised")
    assert rcv.stop() == 0


def test_echo_private_sop_class_and_every_transfer_syntax(
    rcv: Receiving, make_storescp: Callable[..., StoreSCP]
) -> None:
    pacs = make_storescp("-pm", "+xa", env={"TCP_NODELAY": "1"})  # promiscuous: private classes
    rcv.configure_receiving([dest("a", pacs.port)]).start()
    ae = AE(ae_title="CT01")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.add_requested_context(PRIVATE_SOP_CLASS, ["1.2.840.10008.1.2.4.70"])
    assoc = ae.associate("127.0.0.1", rcv.port, ae_title="FORWARDER")
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        accepted = {
            str(cx.abstract_syntax): str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
        }
        assert accepted[PRIVATE_SOP_CLASS] == "1.2.840.10008.1.2.4.70"
        ds = Dataset()
        ds.SOPClassUID = PRIVATE_SOP_CLASS
        ds.SOPInstanceUID = generate_uid()
        ds.PatientID = "X"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.70"
        ds.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\xfe\xff\x00\xe0\x04\x00\x00\x00abcd"
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        rsp = assoc.send_c_store(ds)
        assert rsp.Status == 0x0000
    finally:
        assoc.release()
    rcv.wait(lambda: pacs.files(), 15, "private class forwarded")
    (path,) = pacs.files()
    got = dcmread(path)
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    assert rcv.stop() == 0


def _broken_file(path: Path, dataset: bytes, uid: str) -> Path:
    """A Part 10 file whose file meta is right and whose data set is `dataset` (raw bytes)."""
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SC
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with open(path, "wb") as fp:
        fp.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fp, meta)  # type: ignore[arg-type]
        fp.write(dataset)
    return path


SC = "1.2.840.10008.5.1.4.1.1.7"


def test_a_data_set_without_uid_or_not_dicom_gets_c000(
    rcv: Receiving, make_scp: Callable[..., SCP], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pynetdicom import _config

    # a modality sending what its files hold, whatever that is (the data set as bytes)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    rcv.configure_receiving([dest("a", make_scp().port)]).start()
    no_uid = Dataset()
    no_uid.SOPClassUID = SC
    no_uid.PatientID = "X"
    raw = BytesIO()
    dcmwrite(raw, no_uid, implicit_vr=False, little_endian=True)
    files = {
        "no-uid": _broken_file(tmp_path / "a.dcm", raw.getvalue(), generate_uid()),
        "garbage": _broken_file(tmp_path / "b.dcm", b"\x01\x02garbage" * 7, generate_uid()),
    }
    good = tmp_path / "good.dcm"
    dcmwrite(good, ct_sc(), enforce_file_format=True)
    assoc = Modality(rcv.port).associate([SC])
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(files["no-uid"])
        assert rsp.Status == 0xC000
        assert "SOP Instance UID" in rsp.ErrorComment
        rsp = assoc.send_c_store(files["garbage"])
        assert 0xC000 <= rsp.Status <= 0xCFFF
        assert rsp.ErrorComment
        assert assoc.send_c_store(good).Status == 0x0000  # the association goes on
    finally:
        assoc.release()
    assert len(rcv.received_files()) <= 1
    assert not rcv.spooled()
    assert rcv.stop() == 0


def ct_sc() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SC
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "X"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_kill_9_during_a_push_loses_nothing_acknowledged(
    rcv: Receiving, make_scp: Callable[..., SCP], corpus: Corpus
) -> None:
    a, b = make_scp(), make_scp()
    rcv.configure_receiving([dest("a", a.port), dest("b", b.port)]).start()
    modality = Modality(rcv.port)
    datasets = instances(corpus, 400)
    pusher = threading.Thread(target=modality.push, args=(datasets,), daemon=True)
    pusher.start()
    rcv.wait(lambda: len(modality.answers) >= 100, 30, "a hundred stores answered")
    rcv.kill()
    pusher.join(30)
    acked = modality.acked()
    assert 100 <= len(acked) < 400
    rcv.start()
    rcv.wait(lambda: acked <= set(a.uids()) and acked <= set(b.uids()), 30, "acked arrive")
    rcv.wait(lambda: not rcv.received_files(), 15, "received folder emptied")
    assert not rcv.spooled()
    # nothing unacknowledged is queued but what was committed as the kill came
    with Outbox(rcv.outbox_path, readonly=True) as ob:
        queued = {d.sop_instance_uid for d in ob.list(limit=100_000)}
    assert len(queued - acked) <= 2 * 16, len(queued - acked)  # at most the last group
    assert rcv.stop() == 0


def test_unacknowledged_leftovers_are_removed_at_start(
    rcv: Receiving, make_scp: Callable[..., SCP]
) -> None:
    pacs = make_scp()
    rcv.configure_receiving([dest("a", pacs.port)])
    # a crash left: a half-received spool file, and a renamed file whose rows never committed
    incoming = rcv.received_dir / ".incoming"
    incoming.mkdir(parents=True)
    (incoming / "tmpabc.dcm").write_bytes(b"\0" * 500)
    orphan = rcv.received_dir / "CT01" / "1.2.3.4.dcm"
    orphan.parent.mkdir()
    dcmwrite(orphan, ct("1.2.3.4"), enforce_file_format=True)
    rcv.start()
    text = rcv.wait_log("removed 1 partly received and 1 unacknowledged")
    assert "received but never acknowledged" in text
    assert not rcv.received_files() and not rcv.spooled()
    assert "1.2.3.4" not in pacs.uids()
    assert rcv.stop() == 0


def test_dcmsend_pushes_mixed_files(
    rcv: Receiving, make_scp: Callable[..., SCP], tmp_path: Path
) -> None:
    dcmsend = require_tool("dcmsend")
    a, b = make_scp(), make_scp()
    rcv.configure_receiving([dest("a", a.port), dest("b", b.port)]).start()
    src = tmp_path / "src"
    src.mkdir()
    from conftest import data_file, pynetdicom_file

    uids = set()
    for name in ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtplan.dcm", "image_dfl.dcm"]:
        ds = dcmread(data_file(name))
        uids.add(str(ds.SOPInstanceUID))
        shutil.copy(data_file(name), src / name)
    del pynetdicom_file
    run = subprocess.run(
        [dcmsend, "-aet", "DCMSEND", "-aec", "FORWARDER", "127.0.0.1", str(rcv.port),
         "--scan-directories", str(src)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "TCP_NODELAY": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    rcv.wait(lambda: uids <= set(a.uids()) and uids <= set(b.uids()), 20, "dcmsend's files")
    assert rcv.stop() == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs for `receive.dir` (root only), unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = tmp_path / "small"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_full_disk_answers_a700_and_recovers_by_itself(
    rcv: Receiving, make_scp: Callable[..., SCP], small_disk: Path
) -> None:
    pacs = make_scp()
    pacs.statuses = [0xA700] * 10_000  # held: received files pile up and fill the disk
    rcv.received_dir = small_disk / "received"
    rcv.configure_receiving(
        [dest("a", pacs.port)], retry={"initial_seconds": 0.2, "max_seconds": 0.5}
    ).start()
    modality = Modality(rcv.port)
    big = [ct() for _ in range(60)]  # 40 KB each: 2.4 MB > 2 MiB
    modality.push(big)
    full = {uid for uid, s in modality.answers.items() if s == 0xA700}
    assert full, modality.answers
    assert "disk" in next(modality.comments[u] for u in full)
    assert all(s in (0x0000, 0xA700) for s in modality.answers.values())
    assert not rcv.spooled()
    stored = modality.acked()
    assert len(rcv.landed(len(stored))) == len(stored)
    pacs.statuses.clear()  # the destination takes them: the disk empties
    rcv.wait(lambda: stored <= set(pacs.uids()), 30, "stored ones delivered")
    rcv.wait(lambda: not rcv.received_files(), 15, "disk emptied")
    retry = Modality(rcv.port)
    again = [ds for ds in big if str(ds.SOPInstanceUID) in full]
    retry.push(again)
    assert retry.acked() == full
    rcv.wait(lambda: full <= set(pacs.uids()), 30, "the refused ones, sent again, arrive")
    assert rcv.stop() == 0


# -- config check -------------------------------------------------------------------------------


def _check(
    tmp_path: Path, receive: dict[str, Any], **over: Any
) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "check.toml"
    data: dict[str, Any] = {
        "watch": {"paths": [str(tmp_path / "inbox")]},
        "outbox": {"path": str(tmp_path / "state" / "outbox.sqlite3")},
        "quarantine": {"dir": str(tmp_path / "quarantine")},
        "destinations": [dest("a", 104)],
        "receive": receive,
        **over,
    }
    cfg.write_text(to_toml(data))
    return subprocess.run(
        [sys.executable, "-m", "forwarder", "config", "check", "--config", str(cfg)],
        cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("receive", "expected"),
    [
        ({"listen": "0.0.0.0:99999"}, "receive.listen"),
        ({"listen": "::1:11112"}, "receive.listen"),
        ({"listen": "0.0.0.0:11112", "dir": "{inbox}/received"}, "receive.dir"),
        ({"listen": "0.0.0.0:11112", "dir": "{quarantine}"}, "receive.dir"),
        ({"listen": "0.0.0.0:11112", "dir": "{state}"}, "receive.dir"),
        ({"listen": "0.0.0.0:11112", "ae_title": "A\\\\B"}, "receive.ae_title"),
        ({"listen": "0.0.0.0:11112", "allowed_calling_aets": [""]}, "receive.allowed_calling_aets"),
        ({"listen": "0.0.0.0:11112", "max_associations": 0}, "receive.max_associations"),
        ({"listen": "0.0.0.0:11112", "tls": {"cert": "/nonexistent.pem", "key": "/x.key"}},
         "receive.tls.cert"),
        ({"listen": "0.0.0.0:11112", "tls": {"cert": "/a", "key": "/b", "require_client_cert":
          True}}, "receive.tls"),
        ({"listen": "0.0.0.0:11112", "bogus": 1}, "receive.bogus"),
    ],
)  # fmt: skip
def test_config_check_refuses_bad_receive_settings(
    tmp_path: Path, receive: dict[str, Any], expected: str
) -> None:
    places = {
        "inbox": tmp_path / "inbox",
        "quarantine": tmp_path / "quarantine",
        "state": tmp_path / "state",
    }
    receive = {
        k: v.format(**places) if isinstance(v, str) and "{" in v else v for k, v in receive.items()
    }
    done = _check(tmp_path, receive)
    assert done.returncode == EX_CONFIG, done.stdout + done.stderr
    assert expected in done.stdout + done.stderr


def test_config_check_accepts_receive_and_its_rule_keys(tmp_path: Path) -> None:
    import pynetdicom

    certs = Path(pynetdicom.__file__).parent / "tests" / "cert_files"
    receive = {
        "listen": "[::]:11112",
        "dir": str(tmp_path / "received"),
        "tls": {"cert": str(certs / "server.crt"), "key": str(certs / "server.key"),
                "ca": str(certs / "client.crt"), "require_client_cert": True},
    }  # fmt: skip
    done = _check(
        tmp_path,
        receive,
        destinations=[
            dest("a", 104, match={"calling_aet": "CT*", "called_aet": "FWD", "peer": "10.*"})
        ],
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_folder_names_of_calling_aets() -> None:
    assert folder_name("CT01") == "CT01"
    assert folder_name("A/B") == "A%2FB"
    assert folder_name("..") == "%2E%2E"
    assert folder_name("MY AE") == "MY%20AE"
    assert folder_name("  ") == "-"


def test_tls_receive(rcv: Receiving, make_scp: Callable[..., SCP], corpus: Corpus) -> None:
    import ssl

    import pynetdicom

    certs = Path(pynetdicom.__file__).parent / "tests" / "cert_files"
    pacs = make_scp()
    rcv.configure_receiving(
        [dest("a", pacs.port)],
        receive={"tls": {"cert": str(certs / "server.crt"), "key": str(certs / "server.key"),
                         "ca": str(certs / "client.crt"), "require_client_cert": True}},
    ).start()  # fmt: skip
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs / "server.crt"))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(certs / "client.crt"), str(certs / "client.key"))
    ae = AE(ae_title="CT01")
    (ds,) = instances(corpus, 1)
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", rcv.port, ae_title="FORWARDER", tls_args=(ctx, None))
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    rcv.wait(lambda: str(ds.SOPInstanceUID) in pacs.uids(), 15, "TLS-received instance sent")
    assert rcv.stop() == 0


def test_a_100_mb_instance_is_received_with_flat_memory(rcv: Receiving, corpus: Corpus) -> None:
    from test_daemon import proc_status_kb

    nobody = free_port()  # the destination is down: nothing is sent while we measure
    rcv.configure_receiving([dest("a", nobody)]).start()
    small = instances(corpus, 2)
    Modality(rcv.port).push(small[:1])  # the receive path warmed up
    before = proc_status_kb(rcv.pid, "VmHWM")
    ds = ct()
    ds.Rows, ds.Columns = 5120, 10240  # 16-bit: 100 MiB of pixel data
    ds.PixelData = bytes(5120 * 10240 * 2)
    modality = Modality(rcv.port, dimse_timeout=30)
    modality.push([ds])
    assert modality.acked() == {str(ds.SOPInstanceUID)}
    grown_mb = (proc_status_kb(rcv.pid, "VmHWM") - before) / 1024
    (path,) = [p for p in rcv.landed(2) if p.name.startswith(str(ds.SOPInstanceUID))]
    assert path.stat().st_size > 100 * 2**20
    assert grown_mb < 25, f"the daemon's peak memory grew by {grown_mb:.0f} MB"
    assert rcv.stop() == 0


def test_status_find_and_reload_with_a_receiver(
    rcv: Receiving, make_scp: Callable[..., SCP], corpus: Corpus
) -> None:
    import json

    held = make_scp()
    held.statuses = [0xA700] * 1000
    metrics_port = free_port()
    rcv.configure_receiving(
        [dest("a", held.port)],
        retry={"initial_seconds": 60, "max_seconds": 60},
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
    ).start()
    batch = instances(corpus, 3)
    Modality(rcv.port).push(batch)
    uid = str(batch[0].SOPInstanceUID)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "forwarder", *args, "--config", str(rcv.cfg)],
            cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    def status() -> dict[str, Any]:
        done = cli("status", "--json")
        assert done.returncode in (0, 1), done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    rcv.wait(
        lambda: (status()["daemon"]["receiver"] or {}).get("received_last_hour") == 3, 10,
        "the heartbeat counts 3 received",
    )  # fmt: skip
    info = status()["daemon"]["receiver"]
    assert info["listen"] == f"127.0.0.1:{rcv.port}"
    assert info["received_last_day"] == 3
    text = cli("status").stdout
    assert f"receiver: FORWARDER listening on 127.0.0.1:{rcv.port}" in text
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        scraped = r.read().decode()
    assert 'forwarder_instances_received_total{status="0x0000"} 3.0' in scraped
    found = cli("find", uid)
    assert found.returncode == 0, found.stderr
    assert str(rcv.received_dir / "CT01") in found.stdout
    # a reload that leaves [receive] alone keeps the receiver (and its counts)
    rcv.signal(signal.SIGHUP)
    rcv.wait_log("reloaded")
    assert rcv.text(since_start=True).count("receiving as") == 1
    # one that changes it restarts it: now MR02 only
    cfg = rcv.config
    cfg["receive"]["allowed_calling_aets"] = ["MR02"]
    rcv.cfg.write_text(to_toml(cfg))
    rcv.signal(signal.SIGHUP)
    rcv.wait_log("reloaded", count=2)
    rcv.wait_log("receiving as", count=2)
    assert Modality(rcv.port, aet="CT01").associate([SC]).is_rejected
    assert rcv.stop() == 0


def test_more_associations_than_max_are_rejected_busy(
    rcv: Receiving, make_scp: Callable[..., SCP]
) -> None:
    rcv.configure_receiving([dest("a", make_scp().port)], receive={"max_associations": 2}).start()
    held = [Modality(rcv.port).associate([SC]) for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        third = Modality(rcv.port).associate([SC])
        assert third.is_rejected
        rq = third.acceptor.primitive
        assert (rq.result, rq.result_source, rq.diagnostic) == (0x02, 0x03, 0x02)
    finally:
        for a in held:
            a.release()
    rcv.wait_log("rejected: too many associations")
    assert rcv.stop() == 0


def test_received_files_are_archived_or_quarantined_like_inbox_files(
    rcv: Receiving, make_scp: Callable[..., SCP], corpus: Corpus
) -> None:
    pacs = make_scp()
    pacs.statuses = [0xA900]  # the first instance is refused for good, the second stored
    rcv.configure_receiving(
        [dest("a", pacs.port)], disposition={"on_success": "move", "archive_dir": str(rcv.archive)}
    ).start()
    refused, stored = instances(corpus, 2)
    Modality(rcv.port).push([refused])
    rcv.wait(lambda: rcv.quarantined(), 15, "the refused one quarantined")
    Modality(rcv.port).push([stored])
    archived = rcv.archive / "CT01" / f"{stored.SOPInstanceUID}.dcm"
    rcv.wait(archived.exists, 15, "the stored one archived")
    (q,) = rcv.quarantined()
    assert q == rcv.quarantine / "CT01" / f"{refused.SOPInstanceUID}.dcm"
    assert "0xA900" in Path(f"{q}.json").read_text()
    assert not rcv.received_files()
    with Outbox(rcv.outbox_path, readonly=True) as ob:
        (row,) = ob.find(str(stored.SOPInstanceUID))
    assert row.path == str(archived) and row.state is State.SENT
    assert rcv.stop() == 0


def test_ipv6_listen_takes_ipv4_modalities_too(
    rcv: Receiving, make_scp: Callable[..., SCP], corpus: Corpus
) -> None:
    import socket

    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    pacs = make_scp()
    rcv.configure_receiving(
        [dest("a", pacs.port, match={"peer": "127.0.0.1"})], receive={"listen": f"[::]:{rcv.port}"}
    ).start()
    (ds,) = instances(corpus, 1)
    Modality(rcv.port).push([ds])  # to 127.0.0.1: the routing rule sees the IPv4 address
    rcv.wait(lambda: str(ds.SOPInstanceUID) in pacs.uids(), 15, "sent on")
    assert rcv.stop() == 0


def test_a_receiver_that_cannot_listen_makes_the_daemon_unhealthy(
    rcv: Receiving, make_scp: Callable[..., SCP]
) -> None:
    import socket

    with socket.create_server(("127.0.0.1", rcv.port)):  # someone else has the port
        rcv.configure_receiving([dest("a", make_scp().port)])
        Forwarder.start(rcv)
        rcv.wait_log("cannot start the receiver")
        rcv.wait(lambda: rcv.health().returncode != 0, 15, "health fails")
        assert "receiver is not listening" in rcv.health().stdout + rcv.health().stderr
    assert rcv.stop() == 0


def test_four_modalities_at_once_all_arrive(
    rcv: Receiving, make_scp: Callable[..., SCP], corpus: Corpus
) -> None:
    pacs = make_scp()
    rcv.configure_receiving([dest("a", pacs.port)]).start()
    batches = [instances(corpus, 40) for _ in range(4)]
    modalities = [Modality(rcv.port, aet=aet) for aet in ("CT01", "MR02", "DCMSEND", "CT01")]
    threads = [
        threading.Thread(target=m.push, args=(b,)) for m, b in zip(modalities, batches, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    uids = {str(ds.SOPInstanceUID) for b in batches for ds in b}
    assert set().union(*(m.acked() for m in modalities)) == uids
    rcv.wait(lambda: uids <= set(pacs.uids()), 30, "every instance of the four")
    rcv.wait(lambda: not rcv.received_files(), 15, "received folder emptied")
    assert rcv.stop() == 0
