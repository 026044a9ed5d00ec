"""Tests for ``forwarder send`` and forwarder.sender against real SCPs on loopback."""

from __future__ import annotations

import csv
import json
import logging
import os
import pty
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import (
    SCP,
    UNCOMPRESSED,
    Received,
    StoreSCP,
    data_file,
    free_port,
    pynetdicom_file,
    wait_for,
)
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.uid import UID, generate_uid
from pynetdicom import sop_class as pynetdicom_sop_class
from pynetdicom.service_class import StorageServiceClass
from sopclasses import SEED_STORAGE_CLASSES

from forwarder.commands.send import main
from forwarder.dicomfile import (
    DEFLATED_LE,
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    DicomInfo,
    inspect,
)
from forwarder.sender import AssociationFailed, Peer, Sender
from forwarder.status import Action

REPO = Path(__file__).resolve().parents[1]
FORWARDER = REPO / ".venv" / "bin" / "forwarder"
CERTS = pynetdicom_file("x").parent.parent / "cert_files"
PRIVATE_CLASS = "1.2.826.0.1.3680043.9.9999.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SUMMARY = re.compile(r"^(\d+) sent, (\d+) warning, (\d+) failed, (\d+) skipped$", re.M)

# The mixed set: every encoding a forwarder meets, one file each (sorted by name = send order)
MIXED = {
    "CT_small.dcm": EXPLICIT_LE,
    "ExplVR_BigEndNoMeta.dcm": EXPLICIT_BE,  # no preamble, no meta
    "JPEG2000.dcm": "1.2.840.10008.1.2.4.91",
    "MR_small_bigendian.dcm": EXPLICIT_BE,
    "MR_small_implicit.dcm": IMPLICIT_LE,
    "image_dfl.dcm": DEFLATED_LE,
    "rtstruct.dcm": IMPLICIT_LE,  # no preamble, no meta
}
COMPRESSED = [
    "JPEG2000.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_RLE.dcm",
    "SC_rgb_rle.dcm",
]


# ------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """`forwarder send` sets up logging for the process; put it back after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    others = {n: logging.getLogger(n).level for n in ("pynetdicom", "pydicom")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in others.items():
        logging.getLogger(name).setLevel(lvl)


def copy_files(names: list[str], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        src = data_file(name)
        dst = folder / name
        shutil.copyfile(src, dst)
        out.append(dst)
    return out


def make_file(
    path: Path,
    *,
    sop_class: str = SECONDARY_CAPTURE,
    ts: str = EXPLICIT_LE,
    pixels: np.ndarray | None = None,
) -> Path:
    """A small valid DICOM file (optionally with 16-bit pixel data)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.9.9999.2.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.9.9999.2.2"
    ds.PatientName = "Forwarder^Test"
    ds.PatientID = "FWD"
    ds.Modality = "OT"
    if pixels is not None:
        frames = pixels.shape[0] if pixels.ndim == 3 else 1
        ds.NumberOfFrames = frames
        ds.Rows, ds.Columns = pixels.shape[-2:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.astype("<u2").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ts
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_files(folder: Path, n: int, **kwargs: Any) -> list[Path]:
    return [make_file(folder / f"f{i:04d}.dcm", **kwargs) for i in range(n)]


def decode(received: Received) -> Dataset:
    """The data set as the peer got it, parsed in the negotiated transfer syntax."""
    ts = UID(received.transfer_syntax)
    raw = received.encoded
    if ts == DEFLATED_LE:
        raw = zlib.decompress(raw, -zlib.MAX_WBITS)
    fp = DicomBytesIO(raw)
    fp.is_little_endian, fp.is_implicit_VR = ts.is_little_endian, ts.is_implicit_VR
    ds = read_dataset(fp, ts.is_implicit_VR, ts.is_little_endian)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    return ds


def file_bytes(info: DicomInfo) -> bytes:
    """The data set as it must go over the wire: the file from its offset, padded to even."""
    data = info.path.read_bytes()[info.dataset_offset :]
    return data + b"\x00" if len(data) % 2 else data  # image_dfl.dcm: odd deflate stream


def summary(out: str) -> tuple[int, int, int, int]:
    match = SUMMARY.search(out)
    assert match, out
    sent, warning, failed, skipped = (int(g) for g in match.groups())
    return sent, warning, failed, skipped


def send(*args: str | Path) -> int:
    """`forwarder send ARGS`, over one association unless ARGS say otherwise: these tests
    count associations and check arrival order ("auto" is tested in test_pool.py)."""
    argv = [str(a) for a in args]
    if "--associations" not in argv:
        argv = ["--associations", "1", *argv]
    return main(argv)


def addr(scp: SCP | StoreSCP) -> list[str]:
    return ["127.0.0.1", str(scp.port)]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("E: ")]


def assert_no_traceback(err: str) -> None:
    assert "Traceback" not in err and 'File "' not in err, err


# ------------------------------------------------------------------- transfer syntaxes


def test_mixed_set_arrives_each_in_its_own_syntax(
    scp: SCP, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = copy_files(list(MIXED), tmp_path / "in")
    rc = send(*addr(scp), tmp_path / "in")
    out = capsys.readouterr().out
    assert rc == 0
    assert summary(out) == (len(MIXED), 0, 0, 0)
    infos = [inspect(p) for p in sorted(files)]
    assert [r.sop_instance_uid for r in scp.received] == [i.sop_instance_uid for i in infos]
    for info, got in zip(infos, scp.received, strict=True):
        assert got.transfer_syntax == MIXED[info.path.name] == info.transfer_syntax
        assert got.encoded == file_bytes(info), info.path.name  # streamed as is
        assert got.calling_aet == "STORESCU"
    assert scp.associations == 1


def _pixels_equal(original: Path, received: Received) -> None:
    expected = dcmread(original, force=True)
    got = decode(received)
    assert got.SOPInstanceUID == expected.SOPInstanceUID
    np.testing.assert_array_equal(got.pixel_array, expected.pixel_array)


def test_uncompressed_only_peer_gets_decompressed_files_with_the_same_uid(
    make_scp: Callable[..., SCP], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: pydicom's decompress() mints a new SOP Instance UID unless told not to."""
    scp = make_scp(transfer_syntaxes=UNCOMPRESSED)
    files = copy_files([*COMPRESSED, "image_dfl.dcm"], tmp_path / "in")
    rc = send(*addr(scp), *files)
    assert rc == 0, capsys.readouterr().err
    assert len(scp.received) == len(files)
    for path, got in zip(sorted(files), scp.received, strict=True):
        info = inspect(path)
        assert got.sop_instance_uid == info.sop_instance_uid  # the same instance, not a new one
        assert got.transfer_syntax == EXPLICIT_LE, path.name
        ds = decode(got)
        assert ds.SOPInstanceUID == info.sop_instance_uid
        if path.name == "image_dfl.dcm":  # inflated: the same elements, plain explicit LE
            assert ds == dcmread(path)
        else:
            _pixels_equal(path, got)
            assert "PixelData" in ds and not ds["PixelData"].is_undefined_length


def test_implicit_only_peer_gets_converted_files(
    make_scp: Callable[..., SCP], tmp_path: Path
) -> None:
    """Explicit, big endian and deflated files are re-encoded; the pixels must survive.

    Regression: big endian to little endian left every 16-bit pixel byte-swapped.
    """
    peer_ts = IMPLICIT_LE
    scp = make_scp(transfer_syntaxes=[peer_ts])
    names = ["CT_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
             "ExplVR_BigEndNoMeta.dcm", "rtstruct.dcm", "image_dfl.dcm"]  # fmt: skip
    files = copy_files(names, tmp_path / "in")
    assert send(*addr(scp), tmp_path / "in") == 0
    assert len(scp.received) == len(files)
    for path, got in zip(sorted(files), scp.received, strict=True):
        info = inspect(path)
        assert got.transfer_syntax == peer_ts
        assert got.sop_instance_uid == info.sop_instance_uid
        if info.transfer_syntax == peer_ts:
            assert got.encoded == file_bytes(info)  # its own syntax: as is
        ds = decode(got)
        original = dcmread(path, force=True)
        if "PixelData" in original:
            np.testing.assert_array_equal(ds.pixel_array, original.pixel_array)
        assert ds.SOPInstanceUID == original.SOPInstanceUID
        assert ds.get("PatientName") == original.get("PatientName")


@pytest.mark.parametrize(
    ("option", "ts"), [("-xe", EXPLICIT_LE), ("-xi", IMPLICIT_LE), ("-xb", EXPLICIT_BE)]
)
def test_restrict_options_propose_one_syntax(
    option: str, ts: str, scp: SCP, tmp_path: Path
) -> None:
    names = ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm"]
    files = copy_files(names, tmp_path / "in")
    assert send(option, *addr(scp), *files) == 0
    assert scp.proposed == [3]  # CT, MR, SC: one context each, one syntax each
    assert [r.transfer_syntax for r in scp.received] == [ts] * len(files)
    for path, got in zip(sorted(files), scp.received, strict=True):
        _pixels_equal(path, got)


def test_options_may_follow_the_files(scp: SCP, tmp_path: Path) -> None:
    """As with DCMTK's storescu: `forwarder send ADDR PORT FILE -xi -aet ME`."""
    files = copy_files(["CT_small.dcm"], tmp_path / "in")
    proc = subprocess.run(
        [sys.executable, "-m", "forwarder", "send", *addr(scp), *files, "-xi", "-aet", "ME", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert [r.transfer_syntax for r in scp.received] == ["1.2.840.10008.1.2"]
    assert [r.calling_aet for r in scp.received] == ["ME"]


def test_failing_decoder_gives_a_one_line_reason(
    make_scp: Callable[..., SCP], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scp = make_scp(transfer_syntaxes=UNCOMPRESSED)
    bad, good = copy_files(["JPEG-lossy.dcm", "CT_small.dcm"], tmp_path / "in")
    report = tmp_path / "report.json"
    rc = send(*addr(scp), bad, good, "--report", report)
    err = capsys.readouterr().err
    assert rc == 62
    assert scp.uids() == [inspect(good).sop_instance_uid]
    errors = error_lines(err)
    assert len(errors) == 1 and "JPEG-lossy.dcm" in errors[0], err
    assert "cannot be decompressed" in errors[0]
    assert_no_traceback(err)
    rows = {Path(r["path"]).name: r for r in json.loads(report.read_text())}
    assert rows["JPEG-lossy.dcm"]["outcome"] == "failed"
    assert "\n" not in rows["JPEG-lossy.dcm"]["reason"]


# ------------------------------------------------------------------------- input files


def test_invalid_files_are_skipped_and_the_rest_sent(
    scp: SCP, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "in"
    good = copy_files(["CT_small.dcm", "MR_small.dcm"], folder)
    copy_files(["README.txt"], folder)
    (folder / "cut.dcm").write_bytes(data_file("CT_small.dcm").read_bytes()[:20000])
    nouid = Dataset()
    nouid.SOPClassUID = SECONDARY_CAPTURE
    nouid.PatientName = "No^UID"
    nouid.file_meta = FileMetaDataset()
    nouid.file_meta.TransferSyntaxUID = EXPLICIT_LE
    nouid.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    nouid.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # only the meta has one
    nouid.save_as(folder / "nouid.dcm", enforce_file_format=True)
    rc = send(*addr(scp), folder)
    captured = capsys.readouterr()
    assert rc == 22
    assert summary(captured.out) == (2, 0, 0, 3)
    assert scp.uids() == [inspect(p).sop_instance_uid for p in good]
    errors = error_lines(captured.err)
    assert len(errors) == 3, captured.err
    for name, words in [
        ("README.txt", "no DICM marker"),
        ("cut.dcm", "past the end of the file"),
        ("nouid.dcm", "no SOP Instance UID"),
    ]:
        assert any(name in e and "skipped" in e and words in e for e in errors), (name, errors)
    assert_no_traceback(captured.err)


def test_dicomdir_is_skipped(scp: SCP, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    copy_files(["CT_small.dcm"], folder)
    shutil.copyfile(data_file("dicomdirtests") / "DICOMDIR", folder / "DICOMDIR")
    assert send(*addr(scp), folder) == 22
    assert summary(capsys.readouterr().out) == (1, 0, 0, 1)
    assert len(scp.received) == 1


def test_peer_accepting_none_of_the_classes(
    make_scp: Callable[..., SCP], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scp = make_scp(sop_classes=["1.2.840.10008.5.1.4.1.1.4"])  # MR only
    files = copy_files(["CT_small.dcm", "rtplan.dcm"], tmp_path / "in")
    assert send(*addr(scp), *files) == 62
    captured = capsys.readouterr()
    assert summary(captured.out) == (0, 0, 2, 0)
    for path in files:
        lines = [e for e in error_lines(captured.err) if path.name in e]
        assert len(lines) == 1 and "accepted no presentation context" in lines[0], captured.err
    assert_no_traceback(captured.err)


def test_no_input_files(scp: SCP, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert send(*addr(scp), tmp_path / "empty") == 21
    assert send(*addr(scp), tmp_path / "missing") == 22  # an invalid input file, as dcmsend
    err = capsys.readouterr().err
    assert "no such file or directory" in err and "No input files" in err
    assert scp.associations == 0


def test_only_invalid_files(scp: SCP, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = copy_files(["README.txt", "MR_truncated.dcm"], tmp_path / "in")
    assert send(*addr(scp), *files) == 22
    assert summary(capsys.readouterr().out) == (0, 0, 0, 2)
    assert scp.associations == 0


def test_recurse(scp: SCP, tmp_path: Path) -> None:
    top = copy_files(["CT_small.dcm"], tmp_path / "in")
    deep = copy_files(["MR_small.dcm"], tmp_path / "in" / "a" / "b")
    assert send(*addr(scp), tmp_path / "in") == 0
    assert scp.uids() == [inspect(top[0]).sop_instance_uid]
    assert send("-r", *addr(scp), tmp_path / "in") == 0
    assert inspect(deep[0]).sop_instance_uid in scp.uids()


# -------------------------------------------------------------------------- statuses


@pytest.mark.parametrize(
    ("status", "rc", "counts"),
    [
        (0xA700, 62, (1, 0, 1, 0)),  # out of resources
        (0xA900, 62, (1, 0, 1, 0)),  # does not match SOP class
        (0xC000, 62, (1, 0, 1, 0)),  # cannot understand
        (0x0122, 62, (1, 0, 1, 0)),  # SOP class not supported
        (0xB000, 0, (1, 1, 0, 0)),  # coercion: stored, with a warning
        (0x0111, 0, (1, 1, 0, 0)),  # duplicate: the peer has it
    ],
)
def test_peer_status_decides_the_outcome(
    status: int,
    rc: int,
    counts: tuple[int, int, int, int],
    scp: SCP,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    first, second = make_files(tmp_path / "in", 2)
    scp.statuses = [status]  # the first file gets it, the second success
    assert send(*addr(scp), first, second) == rc
    captured = capsys.readouterr()
    assert summary(captured.out) == counts
    assert inspect(second).sop_instance_uid in scp.uids()
    assert f"0x{status:04X}" in captured.err
    lines = [line for line in captured.err.splitlines() if first.name in line]
    assert len(lines) == 1, captured.err  # one line per file and outcome


# ------------------------------------------------------------- associations and timeouts


def test_reassociates_after_the_peer_aborts(
    scp: SCP, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = make_files(tmp_path / "in", 6)
    victim = inspect(files[2]).sop_instance_uid

    def abort_once(event: Any) -> int | None:
        if str(event.request.AffectedSOPInstanceUID) == victim:
            event.assoc.abort()
            return 0xC000  # never sent: the association is gone
        return None

    scp.on_store = abort_once
    rc = send(*addr(scp), *files)
    captured = capsys.readouterr()
    assert rc == 62
    assert summary(captured.out) == (5, 0, 1, 0)
    expected = [inspect(p).sop_instance_uid for p in files]
    expected.remove(victim)
    assert scp.uids() == expected  # the files after the abort still arrive
    assert scp.associations == 2
    errors = error_lines(captured.err)  # one line, naming the file and the cause
    assert len(errors) == 1 and files[2].name in errors[0] and "A-ABORT" in errors[0], errors
    assert_no_traceback(captured.err)


def test_dimse_timeout_fails_one_file_and_the_rest_arrive(
    scp: SCP, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = make_files(tmp_path / "in", 4)
    slow = inspect(files[1]).sop_instance_uid
    release = threading.Event()

    def stall(event: Any) -> int | None:
        if str(event.request.AffectedSOPInstanceUID) == slow:
            release.wait(10)  # longer than -td 1; released when the send is over
            return 0xC000
        return None

    scp.on_store = stall
    start = time.monotonic()
    try:
        rc = send("-td", "1", *addr(scp), *files)
    finally:
        release.set()
    assert time.monotonic() - start < 8
    captured = capsys.readouterr()
    assert rc == 62
    assert summary(captured.out) == (3, 0, 1, 0)
    errors = error_lines(captured.err)
    assert len(errors) == 1 and files[1].name in errors[0], errors
    assert "DIMSE timeout" in errors[0]
    assert_no_traceback(captured.err)
    assert scp.uids() == [inspect(p).sop_instance_uid for p in files if p != files[1]]
    assert scp.associations == 2


def test_message_id_wraps_after_65535(scp: SCP, tmp_path: Path) -> None:
    infos = [inspect(p) for p in make_files(tmp_path / "in", 5)]
    with Sender(Peer("127.0.0.1", scp.port)) as sender:
        assert [r.classification.action for r in sender.send(infos[:1])] == [Action.SENT]
        current = sender._current
        assert current is not None and current.msg_id == 1
        current.msg_id = 65533  # as if 65532 more had been sent on this association
        results = list(sender.send(infos[1:]))
    assert all(r.classification.action is Action.SENT for r in results)
    assert [r.message_id for r in scp.received] == [1, 65534, 65535, 1, 2]
    assert scp.associations == 1


def test_sender_api_for_the_daemon(scp: SCP, make_scp: Callable[..., SCP], tmp_path: Path) -> None:
    """What forwarder.daemon relies on: results as they come, stop, release, failures."""
    infos = [inspect(p) for p in make_files(tmp_path / "in", 4)]
    stop = threading.Event()
    sender = Sender(Peer("127.0.0.1", scp.port), stop=stop)
    results = sender.send(infos)
    first = next(results)
    assert first.delivered and (first.transfer_syntax, first.how) == (EXPLICIT_LE, "as is")
    assert first.info == infos[0] and first.classification.status == 0x0000
    stop.set()
    assert list(results) == []  # not attempted after stop: not yielded
    assert sender.is_open
    sender.release()
    assert not sender.is_open
    stop.clear()
    assert [r.info for r in sender.send(infos[1:])] == infos[1:]  # a fresh association
    sender.abort()
    assert scp.uids() == [i.sop_instance_uid for i in infos]
    assert scp.associations == 2 and sender.associations == 2

    with pytest.raises(AssociationFailed) as refused:
        list(Sender(Peer("127.0.0.1", free_port())).send(infos))
    assert refused.value.classification.action is Action.RETRY
    strict = make_scp(ae_title="STRICT", require_called=True)
    with pytest.raises(AssociationFailed) as rejected:
        list(Sender(Peer("127.0.0.1", strict.port, called_aet="WRONG")).send(infos))
    assert rejected.value.classification.action is Action.DESTINATION


def test_more_than_128_contexts_split_over_associations(
    make_scp: Callable[..., SCP], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """157 storage classes + a private one, each in two syntaxes: 316 contexts."""
    classes = [*SEED_STORAGE_CLASSES, PRIVATE_CLASS]
    if PRIVATE_CLASS not in pynetdicom_sop_class._STORAGE_CLASSES.values():  # for the SCP
        pynetdicom_sop_class.register_uid(
            PRIVATE_CLASS, "ForwarderTestStorage", StorageServiceClass
        )
    scp = make_scp(sop_classes=classes)
    files = []
    for n, uid in enumerate(classes):
        for ts in (EXPLICIT_LE, IMPLICIT_LE):
            path = tmp_path / "in" / f"{n:03d}-{ts[-1]}.dcm"
            files.append(make_file(path, sop_class=uid, ts=ts))
    rc = send(*addr(scp), tmp_path / "in")
    assert rc == 0, capsys.readouterr().err
    assert summary(capsys.readouterr().out) == (len(files), 0, 0, 0)
    sent = {inspect(p).sop_instance_uid: inspect(p) for p in files}
    assert sorted(scp.uids()) == sorted(sent)
    for got in scp.received:
        info = sent[got.sop_instance_uid]
        assert (got.sop_class_uid, got.transfer_syntax) == (
            info.sop_class_uid,
            info.transfer_syntax,
        )
    assert scp.associations >= 2
    assert len(scp.proposed) == scp.associations
    assert all(n <= 128 for n in scp.proposed), scp.proposed
    assert PRIVATE_CLASS in {r.sop_class_uid for r in scp.received}


def test_association_rejected_is_one_line_and_exit_61(
    make_scp: Callable[..., SCP], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scp = make_scp(ae_title="RIGHT-SCP", require_called=True)
    files = make_files(tmp_path / "in", 3)
    rc = send("-aec", "WRONG-SCP", *addr(scp), *files)
    captured = capsys.readouterr()
    assert rc == 61
    assert scp.received == []
    errors = error_lines(captured.err)
    assert len(errors) == 1, captured.err
    assert "rejected (permanent)" in errors[0] and "called AE title" in errors[0]
    assert_no_traceback(captured.err)
    assert summary(captured.out) == (0, 0, 3, 0)


def test_connection_refused_is_one_line_and_exit_61(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()  # bound and closed again: nothing listens there
    files = make_files(tmp_path / "in", 2)
    rc = send("127.0.0.1", str(port), *files)
    captured = capsys.readouterr()
    assert rc == 61
    errors = error_lines(captured.err)
    assert len(errors) == 1 and "refused" in errors[0].lower(), captured.err
    assert_no_traceback(captured.err)


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A loopback port whose accept queue is full, so the kernel drops new SYNs.

    Skips when the kernel answers anyway (then no connect can time out on loopback).
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(8):  # listen(0) queues one or two connections; fill them
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        probe = socket.socket()
        probe.settimeout(0.5)
        try:
            probe.connect(("127.0.0.1", port))
        except TimeoutError:
            pass
        else:
            pytest.skip("the kernel completes connections past a full backlog here")
        finally:
            probe.close()
        yield port
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_connect_timeout_on_loopback(
    full_backlog: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = make_files(tmp_path / "in", 1)
    start = time.monotonic()
    rc = send("--connect-timeout", "1", "127.0.0.1", str(full_backlog), *files)
    elapsed = time.monotonic() - start
    captured = capsys.readouterr()
    assert rc == 61
    assert elapsed < 5, elapsed
    errors = error_lines(captured.err)
    assert len(errors) == 1 and "timed out" in errors[0].lower(), captured.err


# ------------------------------------------------------------------------------- TLS


@pytest.fixture
def tls_storescp(make_storescp: Callable[..., StoreSCP]) -> StoreSCP:
    """DCMTK storescp with TLS, trusting pynetdicom's test client certificate."""
    return make_storescp(
        "+tls",
        str(CERTS / "server.key"),
        str(CERTS / "server.crt"),
        "+cf",
        str(CERTS / "client.crt"),
        env={"TCP_NODELAY": "1"},
    )


TLS_CLIENT = [
    "--tls",
    "--tls-ca", str(CERTS / "server.crt"),
    "--tls-cert", str(CERTS / "client.crt"),
    "--tls-key", str(CERTS / "client.key"),
]  # fmt: skip


def test_tls_to_storescp(tls_storescp: StoreSCP, tmp_path: Path) -> None:
    files = make_files(tmp_path / "in", 3)
    rc = send(*TLS_CLIENT, "--tls-server-name", "pynetdicom.test", *addr(tls_storescp), *files)
    assert rc == 0
    stored = wait_for(lambda: len(tls_storescp.files()) == 3 and tls_storescp.files())
    assert {dcmread(p).SOPInstanceUID for p in stored} == {
        inspect(p).sop_instance_uid for p in files
    }


def test_tls_verifies_the_server_name(
    tls_storescp: StoreSCP, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The certificate is for pynetdicom.test, not 127.0.0.1: verification must fail."""
    files = make_files(tmp_path / "in", 2)
    rc = send(*TLS_CLIENT, *addr(tls_storescp), *files)
    captured = capsys.readouterr()
    assert rc == 61
    errors = error_lines(captured.err)
    assert len(errors) == 1 and "certificate verify failed" in errors[0], captured.err
    assert_no_traceback(captured.err)
    assert tls_storescp.files() == []


def test_tls_no_verify(tls_storescp: StoreSCP, tmp_path: Path) -> None:
    files = make_files(tmp_path / "in", 1)
    args = ["--tls", "--tls-no-verify", "--tls-cert", str(CERTS / "client.crt"),
            "--tls-key", str(CERTS / "client.key")]  # fmt: skip
    assert send(*args, *addr(tls_storescp), *files) == 0
    stored = wait_for(lambda: tls_storescp.files())
    assert dcmread(stored[0]).SOPInstanceUID == inspect(files[0]).sop_instance_uid


# ----------------------------------------------------------------- report and config


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_report_rows(suffix: str, scp: SCP, tmp_path: Path) -> None:
    ok, refused = make_files(tmp_path / "in", 2)
    junk = copy_files(["README.txt"], tmp_path / "in")[0]
    scp.statuses = [0x0000, 0xA700]
    report = tmp_path / f"out{suffix}"
    assert send("--report", report, *addr(scp), tmp_path / "in") == 62
    if suffix == ".json":
        rows = json.loads(report.read_text())
    else:
        with open(report, newline="") as fp:
            rows = list(csv.DictReader(fp))
    assert [list(r) for r in rows] == [
        ["path", "sop_instance_uid", "status", "outcome", "reason", "sent_as"]
    ] * 3
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name[ok.name] == {
        "path": str(ok.resolve()),
        "sop_instance_uid": inspect(ok).sop_instance_uid,
        "status": "0x0000",
        "outcome": "sent",
        "reason": "",
        "sent_as": "as is",
    }
    assert by_name[refused.name]["outcome"] == "failed"
    assert by_name[refused.name]["sent_as"] == "as is"  # how the refused store went out
    assert by_name[junk.name]["sent_as"] == ""
    assert by_name[refused.name]["status"] == "0xA700"
    assert by_name[refused.name]["reason"] == "out of resources"
    assert by_name[refused.name]["sop_instance_uid"] == inspect(refused).sop_instance_uid
    assert by_name[junk.name]["outcome"] == "skipped"
    assert by_name[junk.name]["status"] == ""
    assert "no DICM marker" in by_name[junk.name]["reason"]


def test_report_that_cannot_be_written(scp: SCP, tmp_path: Path) -> None:
    files = make_files(tmp_path / "in", 1)
    assert send("--report", tmp_path / "no" / "such" / "dir.csv", *addr(scp), *files) == 43
    assert len(scp.received) == 1  # the files were sent all the same


def test_config_destination(make_scp: Callable[..., SCP], tmp_path: Path) -> None:
    scp = make_scp(ae_title="CFG-SCP", require_called=True)
    config = tmp_path / "forwarder.toml"
    config.write_text(
        "[[destinations]]\n"
        'name = "other"\nhost = "127.0.0.1"\nport = 1\n\n'
        "[[destinations]]\n"
        f'name = "pacs"\nhost = "127.0.0.1"\nport = {scp.port}\n'
        'called_aet = "CFG-SCP"\ncalling_aet = "CFG-SCU"\n'
    )
    files = make_files(tmp_path / "in", 2)
    assert send("--config", config, "--destination", "pacs", *files) == 0
    assert scp.uids() == [inspect(p).sop_instance_uid for p in files]
    assert {r.calling_aet for r in scp.received} == {"CFG-SCU"}
    # the command line overrides the config's AE title
    assert send("--config", config, "--destination", "pacs", "-aet", "CLI-SCU", files[0]) == 0
    assert scp.received[-1].calling_aet == "CLI-SCU"


def test_config_unknown_destination(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "forwarder.toml"
    config.write_text('[[destinations]]\nname = "pacs"\nhost = "127.0.0.1"\nport = 104\n')
    files = make_files(tmp_path / "in", 1)
    assert send("--config", config, "--destination", "nope", *files) == 78
    assert "no destination named 'nope'" in capsys.readouterr().err


def test_missing_tls_files_are_named_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "ca.pem"
    config = tmp_path / "forwarder.toml"
    config.write_text(
        '[[destinations]]\nname = "pacs"\nhost = "127.0.0.1"\nport = 104\n'
        f'[destinations.tls]\nca = "{missing}"\n'
    )
    files = make_files(tmp_path / "in", 1)
    assert send("--config", config, "--destination", "pacs", *files) == 78
    err = capsys.readouterr().err
    assert f"destinations.0.tls.ca: file not found: {missing}" in err
    assert_no_traceback(err)
    with pytest.raises(SystemExit) as info:  # a command line error, as dcmsend's: 1
        send("--tls-ca", missing, "127.0.0.1", "104", *files)
    assert info.value.code == f"forwarder send: error: --tls-ca: file not found: {missing}"


# ------------------------------------------------------------------------ parallelism


@pytest.mark.parametrize("n_files", [10, 150])
def test_two_associations_send_everything_once(
    n_files: int, scp: SCP, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = make_files(tmp_path / "in", n_files)
    per_assoc: Counter[int] = Counter()
    lock = threading.Lock()

    def count(event: Any) -> None:
        with lock:
            per_assoc[id(event.assoc)] += 1

    scp.on_store = count
    assert send("--associations", "2", *addr(scp), tmp_path / "in") == 0
    assert summary(capsys.readouterr().out) == (n_files, 0, 0, 0)
    uids = scp.uids()
    assert sorted(uids) == sorted(inspect(p).sop_instance_uid for p in files)
    assert len(set(uids)) == len(uids)  # no duplicates
    assert scp.associations == 2
    assert len(per_assoc) == 2 and all(per_assoc.values()), per_assoc


# --------------------------------------------------------------- DCMTK as the peer


def test_mixed_set_to_dcmtk_storescp(
    make_storescp: Callable[..., StoreSCP], tmp_path: Path
) -> None:
    # +uf: MR_small_implicit and MR_small_bigendian share a SOP Instance UID
    peer = make_storescp("+xa", "+uf", env={"TCP_NODELAY": "1"})
    files = copy_files(list(MIXED), tmp_path / "in")
    assert send(*addr(peer), tmp_path / "in") == 0
    stored = wait_for(lambda: len(peer.files()) == len(files) and peer.files())
    got = Counter(str(dcmread(p).SOPInstanceUID) for p in stored)
    assert got == Counter(inspect(p).sop_instance_uid for p in files)
    syntaxes = Counter(str(dcmread(p).file_meta.TransferSyntaxUID) for p in stored)
    assert syntaxes == Counter(MIXED.values())  # each kept its own syntax


def test_dcmtk_abort_is_one_line_per_file(
    make_storescp: Callable[..., StoreSCP], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """storescp --abort-after: A-ABORT then a reset, for every file, on a fresh association.

    Regression: the dead socket went back to pynetdicom's reactor before the abort, which
    logged "Connection reset by peer" with a traceback.
    """
    peer = make_storescp("--abort-after")
    files = make_files(tmp_path / "in", 3)
    assert send(*addr(peer), *files) == 62
    captured = capsys.readouterr()
    assert summary(captured.out) == (0, 0, 3, 0)
    errors = error_lines(captured.err)
    assert [Path(e.split(": ")[1]).name for e in errors] == [p.name for p in files], errors
    # the A-ABORT, or the reset right behind it when that wins the race
    assert all(re.search(r"A-ABORT|closed|connection lost", e) for e in errors), [
        e[-70:] for e in errors
    ]
    assert_no_traceback(captured.err)
    assert len(captured.err.splitlines()) == 3


def test_many_files_to_stock_storescp(
    make_storescp: Callable[..., StoreSCP], tmp_path: Path
) -> None:
    """DCMTK with Nagle on (no TCP_NODELAY in its environment), 300 small files."""
    peer = make_storescp("+xa")
    files = make_files(tmp_path / "in", 300, pixels=np.arange(64 * 64).reshape(64, 64))
    assert send(*addr(peer), tmp_path / "in") == 0
    stored = wait_for(lambda: len(peer.files()) >= len(files) and peer.files())
    assert {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in stored} == {
        inspect(p).sop_instance_uid for p in files
    }


def test_storescp_through_the_cli_subprocess(storescp: StoreSCP, tmp_path: Path) -> None:
    files = copy_files(["CT_small.dcm", "JPEG2000.dcm"], tmp_path / "in")
    proc = subprocess.run(
        [FORWARDER, "send", *addr(storescp), tmp_path / "in"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "2 sent, 0 warning, 0 failed, 0 skipped"
    stored = wait_for(lambda: len(storescp.files()) == 2 and storescp.files())
    assert {str(dcmread(p).SOPInstanceUID) for p in stored} == {
        inspect(p).sop_instance_uid for p in files
    }


# ------------------------------------------------------------- the process as a whole


# Runs the command and reports its exit status and peak RSS from os.wait4. Not measured
# from pytest itself: a child forked from a big process inherits that process's peak RSS
# at exec (Linux keeps the larger of the two), so the 60 MB of test pixels would count.
_MEASURE = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(proc.pid, 0)
sys.stderr.write(proc.stderr.read().decode())
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def _peak_rss_mb(*args: str | Path) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, FORWARDER, *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    rc, max_rss_kb = (int(v) for v in proc.stdout.split())
    assert rc == 0, proc.stderr
    return max_rss_kb / 1024


def test_peak_memory_of_a_60_mb_file(storescp: StoreSCP, tmp_path: Path) -> None:
    """The file is streamed from disk: the sender's peak RSS stays well under 150 MB."""
    pixels = np.random.default_rng(0).integers(0, 4096, size=(4, 2800, 2800), dtype=np.uint16)
    big = make_file(tmp_path / "in" / "big.dcm", pixels=pixels)
    del pixels
    size_mb = big.stat().st_size / 2**20
    assert size_mb > 57  # 62.7 MB
    small = make_file(tmp_path / "small" / "small.dcm")
    baseline = _peak_rss_mb("send", *addr(storescp), small)  # the interpreter and imports
    peak = _peak_rss_mb("send", *addr(storescp), big)
    assert peak < 150, f"peak RSS {peak:.0f} MB"
    # and not even one copy of the file in memory (150 MB alone would allow that)
    assert peak - baseline < size_mb / 2, f"{peak:.0f} MB for a file, {baseline:.0f} MB idle"
    stored = wait_for(lambda: len(storescp.files()) == 2 and storescp.files(), timeout=30)
    assert max(p.stat().st_size for p in stored) >= big.stat().st_size - 400  # all pixels


def test_exit_codes_of_the_command(scp: SCP, tmp_path: Path) -> None:
    files = make_files(tmp_path / "in", 2)
    (tmp_path / "empty").mkdir()
    scp.statuses = [0xA700]
    run = [FORWARDER, "send", *addr(scp)]
    assert subprocess.run([*run, *files], capture_output=True, timeout=60).returncode == 62
    assert (
        subprocess.run([*run, tmp_path / "empty"], capture_output=True, timeout=60).returncode == 21
    )
    bad = subprocess.run([*run, data_file("README.txt")], capture_output=True, timeout=60)
    assert bad.returncode == 22
    usage = subprocess.run([FORWARDER, "send", "-xe", "-xi", *addr(scp), *files],
                           capture_output=True, timeout=60)  # fmt: skip
    assert usage.returncode == 1
    assert len(scp.received) == 1


def test_python_dash_m_forwarder(scp: SCP, tmp_path: Path) -> None:
    files = make_files(tmp_path / "in", 2)
    proc = subprocess.run(
        [sys.executable, "-m", "forwarder", "send", *addr(scp), *files],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "2 sent, 0 warning, 0 failed, 0 skipped"
    assert scp.uids() == [inspect(p).sop_instance_uid for p in files]


def _read_all(fd: int, proc: subprocess.Popen[bytes]) -> bytes:
    """Everything written to a pty master until the child exits and the pty drains."""
    data = b""
    while True:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the slave side is closed
                break
            if not chunk:
                break
            data += chunk
        elif proc.poll() is not None:
            break
    return data


def test_progress_bar_on_a_terminal_only(scp: SCP, tmp_path: Path) -> None:
    files = make_files(tmp_path / "in", 20)
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [FORWARDER, "send", *addr(scp), tmp_path / "in"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
        )  # fmt: skip
        os.close(slave)
        on_tty = _read_all(master, proc).decode()
        proc.wait(60)
        assert proc.stdout is not None
        out = proc.stdout.read().decode()
        proc.stdout.close()
    finally:
        os.close(master)
    assert proc.returncode == 0
    assert "\r[" in on_tty and "20/20 files" in on_tty, on_tty
    assert "\r" not in out  # the summary on stdout stays clean
    piped = subprocess.run(
        [FORWARDER, "send", *addr(scp), *files], capture_output=True, text=True, timeout=60
    )
    assert piped.returncode == 0
    assert "\r" not in piped.stderr and "files" not in piped.stderr
    quiet_master, quiet_slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [FORWARDER, "send", "--no-progress", *addr(scp), *files],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=quiet_slave,
        )  # fmt: skip
        os.close(quiet_slave)
        assert "\r[" not in _read_all(quiet_master, proc).decode()
        proc.wait(60)
    finally:
        os.close(quiet_master)


# ------------------------------------------------------------------- exit codes vs dcmsend


def _exit_case(case: str, tmp_path: Path, port: int) -> list[str]:
    """The command line (after the program) of one exit-code case, its inputs made here."""
    good = tmp_path / "good.dcm"
    shutil.copyfile(data_file("CT_small.dcm"), good)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not DICOM\n")
    dicomdir = tmp_path / "DICOMDIR"
    shutil.copyfile(data_file("dicomdirtests") / "DICOMDIR", dicomdir)
    empty = tmp_path / "empty"
    empty.mkdir()
    peer = ["127.0.0.1", str(port)]
    dead = ["127.0.0.1", str(free_port())]
    cases = {
        "all valid": [*peer, str(good)],
        "no input files": [*peer, str(empty)],
        "a missing file": [*peer, str(tmp_path / "missing.dcm")],
        "a valid and a missing file": [*peer, str(good), str(tmp_path / "missing.dcm")],
        "a valid and an invalid file": [*peer, str(good), str(bad)],
        "an invalid and a valid file": [*peer, str(bad), str(good)],
        "only invalid files": [*peer, str(bad)],
        "a DICOMDIR and a valid file": [*peer, str(dicomdir), str(good)],
        "an empty folder and a valid file": [*peer, str(empty), str(good)],
        "a bad option": [*peer, str(good), "--no-such-option"],
        "a bad option value": [*peer, "-ta", "x", str(good)],
        "a bad PORT": ["127.0.0.1", "x", str(good)],
        "no files": peer,
        "no arguments": [],
        "nobody listening": [*dead, str(good)],
    }
    return cases[case]


EXIT_CASES = {
    "all valid": 0,
    "no input files": 21,
    "a missing file": 22,
    "a valid and a missing file": 22,
    "a valid and an invalid file": 22,
    "an invalid and a valid file": 22,
    "only invalid files": 22,
    "a DICOMDIR and a valid file": 22,
    "an empty folder and a valid file": 0,
    "a bad option": 1,
    "a bad option value": 1,
    "a bad PORT": 1,
    "no files": 1,
    "no arguments": 0,
    "nobody listening": 61,
}


@pytest.mark.parametrize("case", list(EXIT_CASES))
def test_exit_codes_match_dcmsend(storescp: StoreSCP, tmp_path: Path, case: str) -> None:
    """Both tools on the same inputs against the same storescp: the same exit status."""
    from conftest import require_tool

    dcmsend = require_tool("dcmsend")
    argv = _exit_case(case, tmp_path, storescp.port)
    theirs = subprocess.run([dcmsend, *argv], capture_output=True, timeout=60, check=False)
    ours = subprocess.run(
        [str(FORWARDER), "send", *argv], capture_output=True, text=True, timeout=60, check=False
    )
    assert (theirs.returncode, ours.returncode) == (EXIT_CASES[case],) * 2, ours.stderr
    assert "Traceback" not in ours.stderr


def test_help_states_the_dcmsend_exit_codes() -> None:
    done = subprocess.run(
        [str(FORWARDER), "send", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for words in ("dcmsend", "1 bad command line", "21 no input files", "22 some input files"):
        assert words in text, words


# ---------------------------------------------------------- lossy sources, decompressed


LOSSY_SOURCES = {
    # file: (its syntax, (0028,2112) and (0028,2114) the peer must get; None = computed)
    "SC_rgb_jpeg_dcmtk.dcm": ("1.2.840.10008.1.2.4.50", "17.401", "ISO_10918_1"),
    "JPGExtended.dcm": ("1.2.840.10008.1.2.4.51", "76", "ISO_10918_1"),
    "JPEGLSNearLossless_08.dcm": ("1.2.840.10008.1.2.4.81", None, "ISO_14495_1"),
    "JPEG2000.dcm": ("1.2.840.10008.1.2.4.91", "2097", "ISO_15444_1"),
}


def test_decompressed_lossy_files_say_they_were_lossy_and_how_they_were_sent(
    make_scp: Callable[..., SCP], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scp = make_scp(transfer_syntaxes=UNCOMPRESSED)  # refuses every compressed syntax
    names = [*LOSSY_SOURCES, "MR_small_jp2klossless.dcm", "CT_small.dcm"]
    files = copy_files(names, tmp_path / "in")
    report = tmp_path / "report.csv"
    rc = send("-v", "--report", report, *addr(scp), *files)
    err = capsys.readouterr().err
    assert rc == 0, err
    got = {p.name: decode(r) for p, r in zip(sorted(files), scp.received, strict=True)}
    for name, (syntax, ratio, method) in LOSSY_SOURCES.items():
        assert inspect(tmp_path / "in" / name).transfer_syntax == syntax
        ds = got[name]
        assert ds.LossyImageCompression == "01", name
        assert ds.LossyImageCompressionMethod == method, name
        if ratio is not None:
            assert str(ds.LossyImageCompressionRatio) == ratio, name
        else:  # uncompressed / compressed pixel bytes
            assert float(ds.LossyImageCompressionRatio) > 1, name
        assert "PixelData" in ds and not ds["PixelData"].is_undefined_length
    # a lossless source says nothing new; a file sent in its own syntax is untouched
    assert "LossyImageCompression" not in got["MR_small_jp2klossless.dcm"]
    assert "LossyImageCompressionMethod" not in got["MR_small_jp2klossless.dcm"]
    rows = {Path(r["path"]).name: r for r in csv.DictReader(report.open(encoding="utf-8"))}
    decompressed = "decompressed to Explicit VR Little Endian"
    for name in [*LOSSY_SOURCES, "MR_small_jp2klossless.dcm"]:
        assert rows[name]["sent_as"] == decompressed, rows[name]
        assert f"Sending file: {tmp_path / 'in' / name} ({decompressed})" in err
    assert rows["CT_small.dcm"]["sent_as"] == "as is"
    assert f"Sending file: {tmp_path / 'in' / 'CT_small.dcm'} (as is)" in err


def test_converted_files_are_reported_as_converted(
    make_scp: Callable[..., SCP], tmp_path: Path
) -> None:
    scp = make_scp(transfer_syntaxes=[IMPLICIT_LE])
    files = copy_files(["CT_small.dcm", "MR_small_implicit.dcm"], tmp_path / "in")
    report = tmp_path / "report.json"
    assert send("--report", report, *addr(scp), *files) == 0
    rows = {Path(r["path"]).name: r["sent_as"] for r in json.loads(report.read_text())}
    assert rows == {
        "CT_small.dcm": "converted to Implicit VR Little Endian",
        "MR_small_implicit.dcm": "as is",
    }
    assert len(scp.received) == 2


@pytest.mark.parametrize(
    ("option", "title"), [("-aet", "SEVENTEEN-LETTERS"), ("-aec", "A\\B"), ("-aec", "ÄRCHIV")]
)
def test_a_bad_ae_title_is_one_line_and_exit_1(
    scp: SCP, tmp_path: Path, option: str, title: str
) -> None:
    """Was: a traceback from the sending thread, then another from the main one, rc 1."""
    make_files(tmp_path / "in", 1)
    proc = subprocess.run(
        [sys.executable, "-m", "forwarder", "send", option, title, *addr(scp), tmp_path / "in"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and option in proc.stderr, proc.stderr
    assert scp.received == []
