"""Issue #12's acceptance against independent peers: DCMTK storescp and Orthanc.

The daemon routes CT and MR to two destinations by rule, excludes scouts, quarantines what no
destination wants, changes attributes, de-identifies and compresses; the tests read what the
peers stored (storescp's files, Orthanc's REST API) and compare pixels decoded by pydicom.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from conftest import SCP, StoreSCP, wait_for
from orthanc import Orthanc
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from test_daemon import ROOT, Forwarder, _clean_env, dest, fwd, routed_file

from forwarder.outbox import Outbox, State

__all__ = ["fwd"]  # fixtures, imported for pytest

JPEG_LS = "1.2.840.10008.1.2.4.80"
JPEG_2000 = "1.2.840.10008.1.2.4.90"
PATIENT = "PAT-0042"
IDENTIFYING = {
    "PatientName": "DOE^JANE",
    "PatientID": PATIENT,
    "PatientBirthDate": "19610203",
    "AccessionNumber": "ACC778899",
    "InstitutionName": "St Elsewhere Hospital",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "StudyID": "STUDY-77",
    "OperatorsName": "TECH^TOM",
}
"""The attributes issue #12 names, with values the de-identified copies must not hold."""


def instance(
    path: Path,
    source: str,
    *,
    modality: str,
    series: str = "AX 5mm",
    study: str | None = None,
    **values: str,
) -> Dataset:
    """Write a copy of pydicom's test file `source` as a new instance; returns it."""
    from pydicom.data import get_testdata_file

    ds = dcmread(str(get_testdata_file(source)))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.SeriesDescription = series
    for keyword, value in {**IDENTIFYING, **values}.items():
        setattr(ds, keyword, value)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(tmp, enforce_file_format=True)
    tmp.rename(path)  # whole, at once: never seen half-written
    return ds


def pixels(ds: Dataset) -> np.ndarray:
    return np.asarray(ds.pixel_array)


def storescp_files(peer: StoreSCP) -> dict[str, Dataset]:
    """What storescp wrote, by SOP Instance UID."""
    out = {}
    for path in peer.files():
        ds = dcmread(path)
        out[str(ds.SOPInstanceUID)] = ds
    return out


def cli(fwd: Forwarder, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forwarder", *argv, "--config", str(fwd.cfg)],
        cwd=ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_rules_and_transforms_to_storescp_and_orthanc(
    fwd: Forwarder, make_storescp: Callable[..., StoreSCP], orthanc: Orthanc
) -> None:
    archive = make_storescp("+xa", env={"TCP_NODELAY": "1"})  # accepts every syntax
    fwd.configure(
        [
            dest(
                "ct-archive",
                archive.port,
                match={"Modality": ["CT", "PT"]},
                exclude={"SeriesDescription": ["*SCOUT*", "*LOCALIZER*"]},
                transform={
                    "set": {"InstitutionName": "Gateway A"},
                    "transfer_syntax": "jpeg-ls-lossless",
                },
            ),
            {
                **dest(
                    "mr-station",
                    orthanc.dicom_port,
                    match={"Modality": "MR"},
                    transform={
                        "set": {"PatientID": "SITE1-{PatientID}"},
                        "remove": ["SeriesDescription", "OtherPatientIDs"],
                        "transfer_syntax": "jpeg2000-lossless",
                    },
                ),
                "called_aet": "ORTHANC",
            },
        ],
        transform={"workers": 2},
    ).start()
    cts = [instance(fwd.inbox / f"ct{i}.dcm", "CT_small.dcm", modality="CT") for i in range(3)]
    mrs = [
        instance(fwd.inbox / f"mr{i}.dcm", "MR_small.dcm", modality="MR", OtherPatientIDs="OLD-1")
        for i in range(2)
    ]
    scout = instance(fwd.inbox / "scout.dcm", "CT_small.dcm", modality="CT", series="CHEST SCOUT")
    us = routed_file(fwd.inbox / "us.dcm", "US")
    ct_uids = {str(ds.SOPInstanceUID) for ds in cts}
    mr_uids = {str(ds.SOPInstanceUID) for ds in mrs}
    orthanc.wait_for(mr_uids, timeout=30)
    wait_for(lambda: set(storescp_files(archive)) == ct_uids, timeout=30)
    fwd.wait(lambda: len(fwd.quarantined()) == 2, what="the scout and the US quarantined")
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0

    # CT: JPEG-LS at storescp, the pixels bit-identical, the institution set
    stored = storescp_files(archive)
    for ds in cts:
        got = stored[str(ds.SOPInstanceUID)]
        assert got.file_meta.TransferSyntaxUID == JPEG_LS
        assert np.array_equal(pixels(got), pixels(ds))
        assert got.InstitutionName == "Gateway A" and got.PatientID == PATIENT
    # MR: JPEG 2000 at Orthanc, Patient ID prefixed, the removed attributes gone
    assert sorted(orthanc.instances()) == sorted(mr_uids)
    for ds in mrs:
        uid = str(ds.SOPInstanceUID)
        assert orthanc.transfer_syntax(uid) == JPEG_2000
        got = orthanc.dataset(uid)
        assert got.PatientID == f"SITE1-{PATIENT}"
        assert "SeriesDescription" not in got and "OtherPatientIDs" not in got
        assert np.array_equal(pixels(got), pixels(ds))
    # the scout and the US went nowhere: quarantined with the first rule that failed
    reasons = {
        p.name: json.loads(Path(f"{p}.json").read_text())["reason"] for p in fwd.quarantined()
    }
    assert "SeriesDescription 'CHEST SCOUT' is excluded" in reasons["scout.dcm"]
    assert "Modality 'US' does not match" in reasons["us.dcm"]
    assert str(scout.SOPInstanceUID) not in stored and us not in orthanc.instances()
    sent_as = {(d.destination, d.sent_as) for d in fwd.deliveries()}
    assert sent_as == {
        ("ct-archive", "transformed to JPEG-LS Lossless Image Compression"),
        ("mr-station", "transformed to JPEG 2000 Image Compression (Lossless Only)"),
    }


def test_basic_deidentification_at_orthanc_keeps_one_new_study_uid_per_study(
    fwd: Forwarder, make_orthanc: Callable[..., Orthanc], tmp_path: Path
) -> None:
    research = make_orthanc(aet="RESEARCH")
    fwd.configure(
        [
            {
                **dest("research", research.dicom_port, transform={"deidentify": "basic"}),
                "called_aet": "RESEARCH",
            }
        ],
        transform={"workers": 2},
    ).start()
    studies = [generate_uid(), generate_uid()]
    originals = [
        instance(fwd.inbox / f"s{s}-{i}.dcm", "CT_small.dcm", modality="CT", study=study)
        for s, study in enumerate(studies)
        for i in range(3)
    ]
    sent = research.wait_for(len(originals), timeout=30)
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0

    original_uids = {str(ds.SOPInstanceUID) for ds in originals}
    assert not original_uids & set(sent)  # every instance under a new UID
    new_studies: dict[str, set[str]] = {}
    for uid in sent:
        got = research.dataset(uid)
        for keyword, value in IDENTIFYING.items():
            assert str(got.get(keyword, "")) != value, (keyword, got.get(keyword))
        raw = research.file(uid)
        for value in IDENTIFYING.values():
            assert value.encode() not in raw, value
        assert got.PatientIdentityRemoved == "YES"
        assert got.StudyInstanceUID not in studies
        new_studies.setdefault(str(got.StudyInstanceUID), set()).add(uid)
    assert sorted(len(v) for v in new_studies.values()) == [3, 3]  # one new UID per study

    # the outbox keeps the UID that went out: `find` answers for either
    with Outbox(fwd.outbox_path, readonly=True) as ob:
        rows = [d for ds in originals for d in ob.find(str(ds.SOPInstanceUID))]
    assert {d.state for d in rows} == {State.SENT}
    assert {d.sent_uid for d in rows} == set(sent)
    one = rows[0]
    res = cli(fwd, "find", str(one.sent_uid))
    assert res.returncode == 0, res.stderr
    assert f"original UID {one.sop_instance_uid}" in res.stdout.splitlines()[0]

    # after a restart, a new instance of the first study gets the same new Study UID
    fwd.start()
    late = instance(fwd.inbox / "late.dcm", "CT_small.dcm", modality="CT", study=studies[0])
    research.wait_for(len(originals) + 1, timeout=30)
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0
    (new,) = set(research.instances()) - set(sent)
    got = research.dataset(new)
    first_study = {
        str(research.dataset(str(d.sent_uid)).StudyInstanceUID)
        for d in rows
        if d.study_uid == studies[0]
    }
    assert {str(got.StudyInstanceUID)} == first_study
    assert str(late.SOPInstanceUID) != new


def test_a_peer_refusing_the_target_syntax_gets_explicit_little_endian(
    fwd: Forwarder, make_scp: Callable[..., SCP]
) -> None:
    plain = make_scp(transfer_syntaxes=[ExplicitVRLittleEndian])
    fwd.configure(
        [dest("plain", plain.port, transform={"transfer_syntax": "jpeg-ls-lossless"})]
    ).start()
    ds = instance(fwd.inbox / "ct.dcm", "CT_small.dcm", modality="CT")
    uid = str(ds.SOPInstanceUID)
    fwd.wait(lambda: uid in plain.uids(), what="the instance")
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0
    (got,) = plain.received
    assert got.transfer_syntax == ExplicitVRLittleEndian
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset

    fp = DicomBytesIO(got.encoded)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    arrived = read_dataset(fp, False, True)
    arrived.file_meta = Dataset()
    arrived.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assert np.array_equal(pixels(arrived), pixels(ds))
    assert "LossyImageCompression" not in arrived or arrived.LossyImageCompression == "00"
    (row,) = fwd.deliveries()
    assert row.sent_as == "transformed and decompressed to Explicit VR Little Endian"
