"""Orthanc as a real peer (tests/orthanc.py): what `forwarder send` and the daemon deliver to it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ALL_TS, SCP, data_file, make_instance
from orthanc import Orthanc
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from test_daemon import Forwarder, dest
from test_daemon import fwd as fwd  # the daemon fixture

REPO = Path(__file__).resolve().parents[1]
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def data_set(part10: bytes) -> bytes:
    """The data set of a Part 10 file: after the preamble, DICM and group 0002."""
    assert part10[128:132] == b"DICM"
    return part10[144 + int.from_bytes(part10[140:144], "little") :]


def forwarder_send(orthanc: Orthanc, *files: Path) -> subprocess.CompletedProcess[str]:
    """`forwarder send` as a real process, to Orthanc's DICOM port and AE title."""
    argv = ["127.0.0.1", str(orthanc.dicom_port), *map(str, files)]
    return subprocess.run(
        [sys.executable, "-m", "forwarder", "send", "-aec", orthanc.aet, "-aet", "SENDER", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_orthanc_accepts_every_transfer_syntax_we_may_send(orthanc: Orthanc) -> None:
    """One context per syntax (as the sender proposes them), compressed, deflated and big
    endian included: Orthanc accepts each one."""
    ae = AE(ae_title="SENDER")
    for ts in ALL_TS:
        ae.add_requested_context(CT_IMAGE, ts)
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet)
    assert assoc.is_established
    try:
        accepted = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    finally:
        assoc.release()
    assert accepted == set(ALL_TS)


def test_send_stores_files_in_their_own_syntax_with_their_data_set(orthanc: Orthanc) -> None:
    """`forwarder send` CT_small (explicit LE) and a JPEG-LS lossless MR: Orthanc has both, in
    their own transfer syntax, with their tags; CT_small's data set is stored byte for byte.

    Orthanc (DCMTK) rewrites the VR of encapsulated Pixel Data to OB: MR_small_jpeg_ls_lossless
    has OW there, so its stored data set differs from the file in exactly that one byte.
    """
    ct, jls = data_file("CT_small.dcm"), data_file("MR_small_jpeg_ls_lossless.dcm")
    proc = forwarder_send(orthanc, ct, jls)
    assert proc.returncode == 0, proc.stderr
    assert "2 sent" in proc.stdout + proc.stderr

    sent = {dcmread(p).SOPInstanceUID: p for p in (ct, jls)}
    assert orthanc.wait_for(sent) == sorted(sent)
    for uid, path in sent.items():
        original = dcmread(path)
        assert orthanc.transfer_syntax(uid) == original.file_meta.TransferSyntaxUID
        tags = orthanc.tags(uid)
        assert tags["PatientID"] == original.PatientID
        assert tags["SOPInstanceUID"] == uid
        assert orthanc.metadata(uid)["RemoteAET"] == "SENDER"

    ct_uid = dcmread(ct).SOPInstanceUID
    assert data_set(orthanc.file(ct_uid)) == data_set(ct.read_bytes())

    jls_uid = dcmread(jls).SOPInstanceUID
    stored, original_bytes = data_set(orthanc.file(jls_uid)), data_set(jls.read_bytes())
    assert len(stored) == len(original_bytes)
    differ = [i for i, (a, b) in enumerate(zip(stored, original_bytes, strict=True)) if a != b]
    pixel_vr = original_bytes.index(b"\xe0\x7f\x10\x00OW") + 4
    assert differ == [pixel_vr + 1]
    assert stored[pixel_vr : pixel_vr + 2] == b"OB"
    assert orthanc.dataset(jls_uid).PixelData == dcmread(jls).PixelData


def test_daemon_delivers_a_dropped_file_to_orthanc(fwd: Forwarder, orthanc: Orthanc) -> None:
    """`forwarder run` with a destination at Orthanc: a file dropped in the inbox is stored
    there (calling AE FORWARDER, called AE Orthanc's) and leaves the inbox."""
    fwd.configure([dest("orthanc", orthanc.dicom_port, called_aet=orthanc.aet)]).start()
    uid = generate_uid()
    staged = fwd.tmp / "staging" / "ct.dcm"
    make_instance(staged, uid)
    sent = data_set(staged.read_bytes())
    os.rename(staged, fwd.inbox / "ct.dcm")

    assert orthanc.wait_for([uid]) == [uid]
    fwd.wait(lambda: not fwd.inbox_files(), what="the inbox emptied")
    assert fwd.stop() == 0
    assert orthanc.tags(uid)["PatientID"] == dcmread(data_file("CT_small.dcm")).PatientID
    meta = orthanc.metadata(uid)
    assert (meta["RemoteAET"], meta["CalledAET"]) == ("FORWARDER", orthanc.aet)
    assert data_set(orthanc.file(uid)) == sent


def test_orthanc_calls_back_the_modality_it_was_given(
    make_orthanc: Callable[..., Orthanc], scp: SCP
) -> None:
    """`modalities`: Orthanc C-STOREs to a peer named in its DicomModalities (the path issue
    #13's Storage Commitment reports take); its own AE title is the one we chose."""
    orthanc = make_orthanc(aet="PACS1", modalities={"us": ["ANY-SCP", "127.0.0.1", scp.port]})
    assert orthanc.get("/system")["DicomAet"] == "PACS1"
    assert orthanc.get("/modalities") == ["us"]
    ct = data_file("CT_small.dcm")
    assert forwarder_send(orthanc, ct).returncode == 0
    uid = dcmread(ct).SOPInstanceUID
    orthanc.wait_for([uid])

    job = {"Resources": [orthanc.orthanc_id(uid)], "Synchronous": True}
    answer = json.loads(orthanc.request("POST", "/modalities/us/store", job))
    assert (answer["InstancesCount"], answer["FailedInstancesCount"]) == (1, 0)
    assert scp.uids() == [uid]
    assert scp.received[0].calling_aet == "PACS1"
    orthanc.clear()
    assert orthanc.instances() == []


def test_stop_leaves_nothing_running(make_orthanc: Callable[..., Orthanc]) -> None:
    """stop() ends Orthanc cleanly (SIGTERM, exit 0) in well under its 3.5 s idle shutdown."""
    orthanc = make_orthanc()
    ports = orthanc.dicom_port, orthanc.http_port
    started = time.monotonic()
    assert orthanc.stop() == 0
    assert time.monotonic() - started < 3
    assert not orthanc.running()
    for port in ports:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
