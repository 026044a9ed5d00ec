"""forwarder.transform and forwarder.transformspec: real files in, real Part 10 files out.

Pixel data is checked decoded (numpy array_equal against the source's decoded pixels), by
pydicom and, where DCMTK has the decoder, by DCMTK itself (dcmdrle, dcmdjpls); by GDCM's
gdcmconv too when it is installed (libgdcm-tools: the only JPEG 2000 decoder besides
pydicom's here).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import data_file, make_instance, require_tool
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset

from forwarder.association import IMPLEMENTATION_CLASS_UID
from forwarder.transform import Change, preview, transform_file
from forwarder.transformpool import SECRET_FILE, load_secret
from forwarder.transformspec import (
    SYNTAXES,
    TransformFailed,
    TransformSpec,
    check_remove_key,
    check_set_key,
    check_template,
)

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
LISTED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "InstitutionName",
    "ReferringPhysicianName",
    "StudyID",
    "OperatorsName",
)
"""The attributes issue #12 names: de-identification must leave none of their values."""


@pytest.fixture
def secret(tmp_path: Path) -> bytes:
    key = load_secret(tmp_path)
    assert key is not None
    return key


def _copy(tmp_path: Path, name: str, **values: str) -> Path:
    """A pydicom test file with `values` set, written in its own transfer syntax."""
    ds = dcmread(data_file(name))
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    out = tmp_path / f"src-{name}"
    ds.save_as(out, enforce_file_format=True)
    return out


# --- the spec -----------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["PatientID", "InstitutionName", "0009,1001", "(0010,0010)"])
def test_settable_keys(key: str) -> None:
    assert check_set_key(key) == key


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("PatientIdent", "not a DICOM keyword"),
        ("0002,0010", "file meta"),
        ("TransferSyntaxUID", "file meta"),
        ("FFFE,E000", "item tags"),
        ("ReferencedImageSequence", "VR SQ"),
        ("Rows", "VR US"),
        ("PixelData", "VR OB or OW"),
    ],
)
def test_unsettable_keys_are_named(key: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as exc:
        check_set_key(key)
    assert repr(key) in str(exc.value)


def test_remove_keys() -> None:
    for key in ("OtherPatientIDs", "0009,1001", "ReferencedImageSequence", "PixelData"):
        assert check_remove_key(key) == key
    for key in ("0002,0003", "0000,0900", "FFFE,E0DD", "NoSuchKeyword", "12345"):
        with pytest.raises(ValueError, match=repr(key)):
            check_remove_key(key)


def test_templates() -> None:
    for ok in ("Gateway A", "SITE1-{PatientID}", "{{literal}} {StudyID}/{Modality}", ""):
        assert check_template(ok) == ok
    for bad, why in [
        ("{PatientIdent}", "not a DICOM keyword"),
        ("SITE-{PatientID", "braces"),
        ("x}", "braces"),
        ("{PatientID:>8}", "format spec"),
        ("{PatientID!r}", "format spec"),
        ("{}", "not a DICOM keyword"),
        ("{PixelData}", "not text"),
    ]:
        with pytest.raises(ValueError, match=why) as exc:
            check_template(bad)
        assert repr(bad) in str(exc.value)


def test_spec_values_and_fast_path() -> None:
    assert TransformSpec().changes_nothing
    assert not TransformSpec(transfer_syntax="rle").changes_nothing
    assert not TransformSpec(deidentify="basic").changes_nothing
    assert not TransformSpec(remove=("OtherPatientIDs",)).changes_nothing
    assert not TransformSpec(set=(("StationName", "x"),)).changes_nothing
    with pytest.raises(ValueError, match="'jpeg'"):
        TransformSpec(transfer_syntax="jpeg")
    with pytest.raises(ValueError, match="'full'"):
        TransformSpec(deidentify="full")


# --- set / remove ---------------------------------------------------------------------------


def test_set_remove_and_templates(tmp_path: Path, secret: bytes) -> None:
    src = data_file("CT_small.dcm")
    spec = TransformSpec(
        set=(
            ("PatientID", "SITE1-{PatientID}"),
            ("InstitutionName", "Gateway A"),
            ("InstitutionalDepartmentName", "{{{StudyID}}} {OperatorsName}."),  # absent: added
            ("ImageComments", "{ImageType}"),  # multi-valued original, into an LT
            ("OperatorsName", "{OperatorsName}"),  # absent, reads "": no change
            ("0029,1099", "priv-{Modality}"),  # private, absent: LO
            ("ImageType", "DERIVED\\SECONDARY"),  # backslash: two values
        ),
        remove=("OtherPatientIDs", "0009,1001", "OtherPatientIDsSequence"),
    )
    result = transform_file(src, tmp_path / "out.dcm", spec, secret)
    out = dcmread(result.path)
    assert out.PatientID == "SITE1-1CT1"
    assert out.InstitutionName == "Gateway A"
    assert out.InstitutionalDepartmentName == "{1CT1} ."
    assert out["InstitutionalDepartmentName"].VR == "LO"
    assert out.ImageComments == "ORIGINAL\\PRIMARY\\AXIAL"
    assert out.ImageType == ["DERIVED", "SECONDARY"]
    assert out[0x00291099].VR == "LO" and out[0x00291099].value == "priv-CT"
    assert 0x00091001 not in out and "OtherPatientIDsSequence" not in out
    assert out.OperatorsName == ""  # absent: added, with the absent original's ""
    changes = {c.key: c for c in result.changes}
    assert changes["PatientID"] == Change("PatientID", "1CT1", "SITE1-1CT1")
    assert changes["InstitutionalDepartmentName"] == Change(
        "InstitutionalDepartmentName", None, "{1CT1} ."
    )
    assert changes["0009,1001"] == Change("0009,1001", "GE_GENESIS_FF", None)
    assert changes["OtherPatientIDsSequence"] == Change(
        "OtherPatientIDsSequence", "<2 items>", None
    )
    assert "OtherPatientIDs" not in changes  # absent: removing it is no change
    assert changes["OperatorsName"] == Change("OperatorsName", None, "")
    # nothing else moved: same instance, same syntax, same pixels
    assert result.sop_instance_uid == out.SOPInstanceUID == dcmread(src).SOPInstanceUID
    assert result.transfer_syntax == out.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert np.array_equal(out.pixel_array, dcmread(src).pixel_array)
    assert set(changes) == {
        "PatientID",
        "InstitutionName",
        "InstitutionalDepartmentName",
        "ImageComments",
        "OperatorsName",
        "0029,1099",
        "ImageType",
        "0009,1001",
        "OtherPatientIDsSequence",
    }


def test_set_value_the_vr_cannot_hold_fails_in_one_line(tmp_path: Path, secret: bytes) -> None:
    spec = TransformSpec(set=(("PatientID", "X" * 60 + "-{PatientID}"),))
    with pytest.raises(TransformFailed) as exc:
        transform_file(data_file("CT_small.dcm"), tmp_path / "out.dcm", spec, secret)
    assert str(exc.value).startswith("cannot set PatientID to ")
    assert "\n" not in str(exc.value)
    assert list(tmp_path.glob("out.dcm*")) == []


# --- de-identification ----------------------------------------------------------------------

_IDENTITY = {
    "PatientName": "Doe^Jane",
    "PatientID": "MRN-7731",
    "PatientBirthDate": "19610412",
    "AccessionNumber": "ACC-99812",
    "InstitutionName": "St Elsewhere Hospital",
    "ReferringPhysicianName": "Welby^Marcus",
    "StudyID": "STUDY-5521",
    "OperatorsName": "Tech^Tina",
    "OtherPatientIDs": "OTHER-4411",
    "StudyDescription": "CHEST PAIN JANE",
    "DeviceSerialNumber": "SN-1234567",
}


def _study(tmp_path: Path, count: int = 3) -> list[Path]:
    """`count` instances of one study, two series, carrying `_IDENTITY`."""
    paths = []
    for i in range(count):
        path = tmp_path / "study" / f"{i}.dcm"
        make_instance(
            path, f"1.2.826.0.1.3680043.10.1175.7.{i}", study="1.2.826.0.1.3680043.10.1175.1"
        )
        ds = dcmread(path)
        for keyword, value in _IDENTITY.items():
            setattr(ds, keyword, value)
        ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.1175.2.{i % 2}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _uids(path: Path) -> tuple[str, str, str]:
    ds = dcmread(path)
    return (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


def test_basic_deidentification_leaves_no_listed_value(tmp_path: Path, secret: bytes) -> None:
    paths = _study(tmp_path)
    spec = TransformSpec(deidentify="basic")
    results = [
        transform_file(p, tmp_path / f"out{i}.dcm", spec, secret) for i, p in enumerate(paths)
    ]
    for result in results:
        raw = result.path.read_bytes()
        for value in _IDENTITY.values():  # anywhere in the file: nested items, private tags
            assert value.encode() not in raw, value
        for value in ("Doe", "Welby", "Tina", "19610412", "JFK IMAGING", "GE_GENESIS"):
            assert value.encode() not in raw, value
        out = dcmread(result.path)
        for keyword in LISTED:
            assert out.get(keyword, "") != _IDENTITY[keyword]
        assert out.PatientIdentityRemoved == "YES"
        assert "Basic" in out.DeidentificationMethod
        codes = [item.CodeValue for item in out.DeidentificationMethodCodeSequence]
        assert "113100" in codes
        assert "OtherPatientIDs" not in out  # E.1: X
        assert out.DeviceSerialNumber == ""  # E.1: X/Z/D
        assert not any(elem.tag.is_private for elem in out)
        assert (
            out.SOPInstanceUID
            == result.sop_instance_uid
            == out.file_meta.MediaStorageSOPInstanceUID
        )
        assert out.SOPInstanceUID != dcmread(paths[0]).SOPInstanceUID
        assert out.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # class UIDs stay
        assert np.array_equal(out.pixel_array, dcmread(paths[0]).pixel_array)
        changes = {c.key: c for c in result.changes}
        assert changes["PatientName"].old == "Doe^Jane"
        assert changes["StudyInstanceUID"].old == "1.2.826.0.1.3680043.10.1175.1"
        assert changes["StudyInstanceUID"].new == out.StudyInstanceUID
    uids = [_uids(r.path) for r in results]
    assert len({u[0] for u in uids}) == 1  # one new study
    assert uids[0][1] == uids[2][1] != uids[1][1]  # series kept apart, consistently
    assert len({u[2] for u in uids}) == 3


def test_uids_map_the_same_across_processes_and_differ_by_secret(
    tmp_path: Path, secret: bytes
) -> None:
    paths = _study(tmp_path, 2)
    spec = TransformSpec(deidentify="basic")
    here = [
        _uids(transform_file(p, tmp_path / f"a{i}.dcm", spec, secret).path)
        for i, p in enumerate(paths)
    ]
    # another process reads the secret from the same state directory
    code = (
        "import sys; from pathlib import Path\n"
        "from forwarder.transform import transform_file\n"
        "from forwarder.transformpool import load_secret\n"
        "from forwarder.transformspec import TransformSpec\n"
        "s = load_secret(Path(sys.argv[1]))\n"
        "for i, p in enumerate(sys.argv[2:]):\n"
        "    dst = Path(sys.argv[1]) / f'b{i}.dcm'\n"
        "    r = transform_file(Path(p), dst, TransformSpec(deidentify='basic'), s)\n"
        "    print(r.sop_instance_uid)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), *map(str, paths)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    there = [_uids(tmp_path / f"b{i}.dcm") for i in range(2)]
    assert run.stdout.split() == [u[2] for u in here]
    assert there == here
    (tmp_path / "elsewhere").mkdir()
    other = load_secret(tmp_path / "elsewhere")
    assert other != secret
    moved = _uids(transform_file(paths[0], tmp_path / "c.dcm", spec, other).path)
    assert not set(moved) & set(here[0])


def test_uid_mapping_is_pinned() -> None:
    """dicognito's hash is part of every UID sent: a library update that changed it would give
    the same study a second UID at the receiver. This pins it."""
    from forwarder.transform import _anonymizer

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.StudyInstanceUID = "1.2.3.4"
    _anonymizer(bytes(range(32))).anonymize(ds)
    assert ds.StudyInstanceUID == "2.1041120060294372682190291254355751329737"


def test_set_after_deidentification_reads_the_original(tmp_path: Path, secret: bytes) -> None:
    src = _study(tmp_path, 1)[0]
    spec = TransformSpec(deidentify="basic", set=(("PatientID", "RES-{PatientID}"),))
    result = transform_file(src, tmp_path / "out.dcm", spec, secret)
    assert dcmread(result.path).PatientID == "RES-MRN-7731"


def test_burned_in_annotation(tmp_path: Path, secret: bytes) -> None:
    src = _copy(tmp_path, "CT_small.dcm", BurnedInAnnotation="YES")
    with pytest.raises(TransformFailed, match=r"^burned-in annotation$"):
        transform_file(src, tmp_path / "out.dcm", TransformSpec(deidentify="basic"), secret)
    with pytest.raises(TransformFailed, match=r"^burned-in annotation$"):
        preview(src, TransformSpec(deidentify="basic"), secret)
    assert not (tmp_path / "out.dcm").exists()
    allowed = TransformSpec(deidentify="basic", allow_burned_in=True)
    assert transform_file(src, tmp_path / "out.dcm", allowed, secret).path.exists()
    # only de-identification cares
    transform_file(src, tmp_path / "out2.dcm", TransformSpec(transfer_syntax="rle"), secret)


# --- transfer syntaxes ----------------------------------------------------------------------

SOURCES = [
    "CT_small.dcm",  # 16-bit signed, explicit LE
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "examples_rgb_color.dcm",  # 8-bit RGB
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "SC_rgb_rle_16bit.dcm",
    "image_dfl.dcm",  # deflated
    "SC_rgb_jpeg_dcmtk.dcm",  # lossy JPEG baseline, YBR
    "JPEGLSNearLossless_16.dcm",  # lossy JPEG-LS
]
LOSSY_SOURCES = {"SC_rgb_jpeg_dcmtk.dcm", "JPEGLSNearLossless_16.dcm"}
DCMTK_DECODERS = {"rle": "dcmdrle", "jpeg-ls-lossless": "dcmdjpls"}


@pytest.mark.parametrize("target", [name for name in SYNTAXES if name != "keep"])
@pytest.mark.parametrize("source", SOURCES)
def test_transfer_syntax_is_lossless(
    tmp_path: Path, secret: bytes, source: str, target: str
) -> None:
    src = data_file(source)
    original = dcmread(src)
    if target == "jpeg2000-lossless" and min(original.Rows, original.Columns) < 32:
        with pytest.raises(TransformFailed, match="smaller than 32"):
            transform_file(src, tmp_path / "out.dcm", TransformSpec(transfer_syntax=target), secret)
        return
    result = transform_file(
        src, tmp_path / "out.dcm", TransformSpec(transfer_syntax=target), secret
    )
    assert result.transfer_syntax == SYNTAXES[target]
    out = dcmread(result.path)
    assert out.file_meta.TransferSyntaxUID == SYNTAXES[target]
    assert out.SOPInstanceUID == original.SOPInstanceUID == result.sop_instance_uid
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert np.array_equal(out.pixel_array, original.pixel_array)
    if source in LOSSY_SOURCES:
        assert out.LossyImageCompression == "01"
        assert out.LossyImageCompressionMethod
    dump = subprocess.run(
        [require_tool("dcmdump"), "-q", str(result.path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert dump.returncode == 0 and "E:" not in dump.stderr, dump.stderr
    if original.file_meta.TransferSyntaxUID == SYNTAXES[target]:
        return  # not re-encoded
    decoders = []
    if target in DCMTK_DECODERS:
        decoders.append([require_tool(DCMTK_DECODERS[target])])
    if target in ("rle", "jpeg-ls-lossless", "jpeg2000-lossless") and shutil.which("gdcmconv"):
        # GDCM (libgdcm-tools, optional): a second decoder, and the only one for JPEG 2000
        decoders.append(["gdcmconv", "--raw"])
    for n, decoder in enumerate(decoders):
        plain = tmp_path / f"decoded-{n}.dcm"
        run = subprocess.run(
            [*decoder, str(result.path), str(plain)], capture_output=True, text=True, timeout=30
        )
        assert run.returncode == 0, run.stderr
        assert np.array_equal(dcmread(plain).pixel_array, original.pixel_array), decoder


def test_keep_leaves_the_syntax_and_the_pixel_bytes(tmp_path: Path, secret: bytes) -> None:
    src = data_file("MR_small_jpeg_ls_lossless.dcm")
    spec = TransformSpec(set=(("StationName", "GW"),))
    result = transform_file(src, tmp_path / "out.dcm", spec, secret)
    out, original = dcmread(result.path), dcmread(src)
    assert result.transfer_syntax == original.file_meta.TransferSyntaxUID
    assert out.PixelData == original.PixelData


def test_same_syntax_is_not_reencoded(tmp_path: Path, secret: bytes) -> None:
    src = data_file("MR_small_RLE.dcm")
    result = transform_file(src, tmp_path / "out.dcm", TransformSpec(transfer_syntax="rle"), secret)
    assert dcmread(result.path).PixelData == dcmread(src).PixelData
    assert result.changes == ()


@pytest.mark.parametrize("name", ["test-SR.dcm", "rtplan.dcm"])
@pytest.mark.parametrize("target", ["rle", "jpeg-ls-lossless", "jpeg2000-lossless"])
def test_no_pixel_data_is_written_uncompressed(
    tmp_path: Path, secret: bytes, name: str, target: str
) -> None:
    src = data_file(name)
    result = transform_file(
        src, tmp_path / "out.dcm", TransformSpec(transfer_syntax=target), secret
    )
    kept = dcmread(src).file_meta.TransferSyntaxUID
    assert result.transfer_syntax == (kept if kept in (EXPLICIT_LE, IMPLICIT_LE) else EXPLICIT_LE)
    assert dcmread(result.path).SOPInstanceUID == dcmread(src).SOPInstanceUID


def test_big_endian_without_pixels_becomes_explicit_le(tmp_path: Path, secret: bytes) -> None:
    from pydicom.filewriter import dcmwrite

    ds = dcmread(data_file("test-SR.dcm"))  # no OW values: nothing to byte-swap
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.2"
    src = tmp_path / "sr-be.dcm"
    dcmwrite(src, ds, enforce_file_format=True)
    assert not dcmread(src).original_encoding[1]
    result = transform_file(src, tmp_path / "out.dcm", TransformSpec(transfer_syntax="rle"), secret)
    assert result.transfer_syntax == EXPLICIT_LE
    assert dcmread(result.path).ContentSequence == ds.ContentSequence


# --- failures -------------------------------------------------------------------------------


def _float_image(tmp_path: Path) -> Path:
    ds = dcmread(data_file("MR_small.dcm"))
    del ds.PixelData
    ds.BitsAllocated = 32
    del ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.FloatPixelData = np.linspace(0, 1, 64 * 64, dtype="<f4").tobytes()
    path = tmp_path / "float.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _broken_jpeg_ls(tmp_path: Path) -> Path:
    from pydicom.encaps import encapsulate

    ds = dcmread(data_file("MR_small_jpeg_ls_lossless.dcm"))
    # not a JPEG-LS stream at all (a cut one decodes without error: the decoders pad it)
    ds.PixelData = encapsulate([b"\x00" * 200])
    path = tmp_path / "broken.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize(
    ("make", "target", "reason"),
    [
        (
            lambda t: data_file("rtdose.dcm"),
            "jpeg-ls-lossless",
            "cannot encode as JPEG-LS Lossless",
        ),
        (_float_image, "jpeg-ls-lossless", "cannot encode as JPEG-LS Lossless.*: float pixel data"),
        (_float_image, "rle", "float pixel data"),
        (_broken_jpeg_ls, "explicit-le", "cannot decode the pixel data"),
        (lambda t: data_file("README.txt"), "explicit-le", "no SOPClassUID|cannot read"),
    ],
)
def test_failures_are_one_line_and_leave_nothing(
    tmp_path: Path, secret: bytes, make: object, target: str, reason: str
) -> None:
    src = make(tmp_path)  # type: ignore[operator]
    spec = TransformSpec(transfer_syntax=target)
    with pytest.raises(TransformFailed, match=reason) as exc:
        transform_file(src, tmp_path / "out.dcm", spec, secret)
    assert "\n" not in str(exc.value)
    assert list(tmp_path.glob("out.dcm*")) == []
    with pytest.raises(TransformFailed, match=reason):
        preview(src, spec, secret)


def test_io_errors_are_oserror(tmp_path: Path, secret: bytes) -> None:
    with pytest.raises(FileNotFoundError):
        transform_file(tmp_path / "absent.dcm", tmp_path / "out.dcm", TransformSpec(), secret)
    with pytest.raises(FileNotFoundError):
        transform_file(
            data_file("CT_small.dcm"), tmp_path / "no" / "out.dcm", TransformSpec(), secret
        )
    assert list(tmp_path.rglob("*.part")) == []


# --- preview --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        TransformSpec(deidentify="basic", transfer_syntax="jpeg-ls-lossless"),
        TransformSpec(
            set=(("PatientID", "S-{PatientID}"),), remove=("0009,1001",), transfer_syntax="rle"
        ),
        TransformSpec(transfer_syntax="jpeg2000-lossless"),
    ],
)
def test_preview_says_what_transform_file_does(
    tmp_path: Path, secret: bytes, spec: TransformSpec
) -> None:
    src = data_file("CT_small.dcm")
    before = set(tmp_path.iterdir())
    changes, syntax = preview(src, spec, secret)
    assert set(tmp_path.iterdir()) == before
    result = transform_file(src, tmp_path / "out.dcm", spec, secret)
    assert (changes, syntax) == (result.changes, result.transfer_syntax)


# --- the secret -----------------------------------------------------------------------------


def test_secret_is_created_once_private_and_read_back(tmp_path: Path) -> None:
    first = load_secret(tmp_path)
    path = tmp_path / SECRET_FILE
    assert len(first) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert bytes.fromhex(path.read_text().strip()) == first
    assert load_secret(tmp_path) == first
    assert [p.name for p in tmp_path.iterdir()] == [SECRET_FILE]  # no temporary left


def test_secret_created_by_racing_processes_is_one(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from forwarder.transformpool import load_secret; "
        "print(load_secret(Path(sys.argv[1])).hex())"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    keys = {proc.communicate(timeout=60)[0].strip() for proc in procs}
    assert keys == {(tmp_path / SECRET_FILE).read_text().strip()}


@pytest.mark.parametrize("content", ["", "abcd\n", "zz" * 32, "00" * 33])
def test_damaged_secret_is_named(tmp_path: Path, content: str) -> None:
    path = tmp_path / SECRET_FILE
    path.write_text(content)
    with pytest.raises(ValueError, match=str(path)):
        load_secret(tmp_path)
    assert path.read_text() == content  # never replaced: UIDs would change


def test_secret_in_unwritable_dir_is_oserror(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(PermissionError):
            load_secret(tmp_path)
    finally:
        tmp_path.chmod(0o700)


def test_deidentification_reaches_nested_items(tmp_path: Path, secret: bytes) -> None:
    """test-SR.dcm: names, organisations and free text inside ContentSequence items."""
    src = data_file("test-SR.dcm")
    spec = TransformSpec(deidentify="basic", transfer_syntax="jpeg-ls-lossless")
    result = transform_file(src, tmp_path / "sr.dcm", spec, secret, durable=False)
    raw = result.path.read_bytes()
    for value in ("Riesmeier", "Observer^Verifying", "OFFIS e.V.", "Organisation", "A mass of",
                  "Test^S R", "OFFIS Structured Reporting Test Document"):  # fmt: skip
        assert value.encode("utf-8") not in raw and value.encode("latin-1") not in raw, value
    out = dcmread(result.path)
    assert out.ContentSequence  # D: kept, its items de-identified
    assert result.transfer_syntax == EXPLICIT_LE  # no pixel data to compress


def test_removing_the_instance_uid_fails(tmp_path: Path, secret: bytes) -> None:
    spec = TransformSpec(remove=("SOPInstanceUID",))
    with pytest.raises(TransformFailed, match=r"^the transformed data set has no SOPInstanceUID$"):
        transform_file(data_file("CT_small.dcm"), tmp_path / "out.dcm", spec, secret)


def test_deidentification_removes_overlays(tmp_path: Path, secret: bytes) -> None:
    src = data_file("examples_overlay.dcm")
    assert any(elem.tag.group == 0x6000 for elem in dcmread(src))
    result = transform_file(src, tmp_path / "out.dcm", TransformSpec(deidentify="basic"), secret)
    out = dcmread(result.path)
    assert not any(0x6000 <= elem.tag.group <= 0x60FF for elem in out)
    assert np.array_equal(out.pixel_array, dcmread(src).pixel_array)


def test_set_non_ascii_text(tmp_path: Path, secret: bytes) -> None:
    # MR_small declares no character set: UTF-8 is declared for the new text
    spec = TransformSpec(set=(("InstitutionName", "Klinik Zürich – Süd"),))
    result = transform_file(data_file("MR_small.dcm"), tmp_path / "a.dcm", spec, secret)
    out = dcmread(result.path)
    assert out.SpecificCharacterSet == "ISO_IR 192"
    assert out.InstitutionName == "Klinik Zürich – Süd"
    assert out.PatientName == dcmread(data_file("MR_small.dcm")).PatientName
    # CT_small declares Latin-1: "ü" fits, the dash does not
    latin = TransformSpec(set=(("InstitutionName", "Klinik Zürich"),))
    result = transform_file(data_file("CT_small.dcm"), tmp_path / "b.dcm", latin, secret)
    out = dcmread(result.path)
    assert (out.SpecificCharacterSet, out.InstitutionName) == ("ISO_IR 100", "Klinik Zürich")
    with pytest.raises(TransformFailed, match=r"not representable in .* ISO_IR 100"):
        transform_file(data_file("CT_small.dcm"), tmp_path / "c.dcm", spec, secret)


# --- set/remove by splicing == set/remove through pydicom --------------------------------

SPLICE_SPECS = [
    TransformSpec(
        set=(
            ("PatientID", "SITE1-{PatientID}"),
            ("InstitutionName", "Klinik Zürich"),  # UTF-8 declared where no charset was
            ("ImageComments", "{ImageType} / {PatientName}"),
            ("0029,1099", "priv-{Modality}"),  # private, absent
            ("StudyDescription", "A\\B"),
            ("AccessionNumber", ""),
        ),
        remove=(
            "OtherPatientIDsSequence",
            "0009,1001",
            "ReferencedStudySequence",
            "OtherPatientIDs",
        ),
    ),
    TransformSpec(
        set=(("StationName", "GW"), ("StationName", "{StationName}-2")),
        remove=("SeriesDescription",),
    ),
    TransformSpec(
        set=(("SOPInstanceUID", "1.2.826.0.1.3680043.10.1175.99"),), transfer_syntax="keep"
    ),
]


SPLICED_SOURCES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "test-SR.dcm",
    "rtplan.dcm",
    "examples_overlay.dcm",
]
"""Files the splice takes (Part 10, not deflated, sorted, no group lengths)."""


@pytest.mark.parametrize("spec", SPLICE_SPECS)
@pytest.mark.parametrize(
    "source",
    [
        *SPLICED_SOURCES,
        "image_dfl.dcm",  # deflated: pydicom's path
        "rtstruct.dcm",  # no preamble, no file meta: pydicom's path
    ],
)
def test_splice_writes_what_pydicom_writes(
    tmp_path: Path, secret: bytes, source: str, spec: TransformSpec
) -> None:
    from forwarder.transform import _splice, _transformed, _with_pydicom

    src = data_file(source)
    slow = _with_pydicom(src, spec, secret)
    fast = _transformed(src, spec, secret)
    spliced = _splice(src, spec, SYNTAXES[spec.transfer_syntax])
    if source in ("image_dfl.dcm", "rtstruct.dcm"):
        assert spliced is None
    else:
        assert spliced is not None
    assert fast.changes == slow.changes
    assert (fast.transfer_syntax, fast.sop_instance_uid) == (
        slow.transfer_syntax,
        slow.sop_instance_uid,
    )
    a, b = tmp_path / "fast.dcm", tmp_path / "slow.dcm"
    a.write_bytes(fast.data)
    b.write_bytes(slow.data)
    fast_ds, slow_ds = dcmread(a), dcmread(b)
    assert fast_ds.file_meta == slow_ds.file_meta
    assert fast_ds == slow_ds
    if "PixelData" in slow_ds:
        assert np.array_equal(fast_ds.pixel_array, dcmread(src).pixel_array)
    dump = subprocess.run(
        [require_tool("dcmdump"), "-q", str(a)], capture_output=True, encoding="latin-1", timeout=30
    )
    assert dump.returncode == 0 and "E:" not in dump.stderr, dump.stderr


@pytest.mark.parametrize("spec", SPLICE_SPECS)
@pytest.mark.parametrize("source", SPLICED_SOURCES)
def test_the_spliced_head_and_the_rest_of_the_source_are_what_transform_file_writes(
    tmp_path: Path, secret: bytes, source: str, spec: TransformSpec
) -> None:
    """What the sender sends for a `set`/`remove` (the head from memory, the rest from the
    source) is byte for byte the data set of the copy the pool would write."""
    from forwarder.dicomfile import inspect
    from forwarder.transform import splice_head

    src = data_file(source)
    done = transform_file(src, tmp_path / "copy.dcm", spec, secret, durable=False)
    spliced = splice_head(src, spec)
    assert spliced is not None
    whole = done.path.read_bytes()
    copy = inspect(done.path)
    assert spliced.head + src.read_bytes()[spliced.tail_at :] == whole[copy.dataset_offset :]
    assert spliced.size == len(whole) - copy.dataset_offset
    assert (spliced.sop_instance_uid, spliced.transfer_syntax) == (
        done.sop_instance_uid,
        done.transfer_syntax,
    )
    assert spliced.changes == done.changes
    if "PixelData" in dcmread(src, stop_before_pixels=False):
        # only the header is read and held: the pixels go from the source
        assert spliced.tail_at < src.stat().st_size - len(dcmread(src).PixelData)


@pytest.mark.parametrize(
    "spec",
    [
        TransformSpec(set=(("StationName", "GW"),)),  # spliced
        TransformSpec(transfer_syntax="rle"),  # pydicom
        TransformSpec(deidentify="basic"),  # a new SOP Instance UID
    ],
)
def test_what_transform_file_says_of_its_copy_is_what_inspect_reads(
    tmp_path: Path, secret: bytes, spec: TransformSpec
) -> None:
    """The pool hands the sender what the engine wrote instead of reading the copy back."""
    from forwarder.dicomfile import inspect
    from forwarder.transformpool import _prepare

    prepared = _prepare(data_file("CT_small.dcm"), tmp_path / "copy.dcm", spec, secret)
    read = inspect(tmp_path / "copy.dcm")
    said = prepared.info
    assert (said.path, said.size, said.dataset_offset) == (
        read.path,
        read.size,
        read.dataset_offset,
    )
    assert (said.sop_class_uid, said.sop_instance_uid, said.transfer_syntax) == (
        read.sop_class_uid,
        read.sop_instance_uid,
        read.transfer_syntax,
    )


def test_a_change_after_a_large_pixel_data_is_not_spliced_in_memory(
    tmp_path: Path, secret: bytes
) -> None:
    from forwarder.transform import SPLICE_HEAD_LIMIT, splice_head

    ds = dcmread(data_file("CT_small.dcm"))
    ds.Rows, ds.Columns = 1024, 1024  # 2 MB of pixels
    ds.PixelData = bytes(2 * 1024 * 1024)
    ds.add_new(0x7FE10010, "LO", "ACME 1.0")  # a private block after the pixel data
    ds.add_new(0x7FE11001, "LO", "after the pixels")
    src = tmp_path / "big.dcm"
    ds.save_as(src, enforce_file_format=True)
    spec = TransformSpec(remove=("7FE1,1001",))
    assert len(ds.PixelData) > SPLICE_HEAD_LIMIT
    assert splice_head(src, spec) is None  # the pool writes a copy instead
    done = transform_file(src, tmp_path / "copy.dcm", spec, secret, durable=False)
    out = dcmread(done.path)
    assert 0x7FE11001 not in out and out.PixelData == ds.PixelData
    # the same change on a small file is spliced, pixels included in the head
    ds.Rows, ds.Columns = 16, 16
    ds.PixelData = bytes(512)
    ds.save_as(src, enforce_file_format=True)
    spliced = splice_head(src, spec)
    assert spliced is not None
    assert spliced.tail_at >= src.read_bytes().index(b"after the pixels") + 16


def test_deidentification_removes_private_attributes_in_items(
    tmp_path: Path, secret: bytes
) -> None:
    ds = dcmread(data_file("CT_small.dcm"))
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.10.1175.5"
    block = item.private_block(0x0029, "ACME 1.0", create=True)
    block.add_new(0x01, "LO", "NESTED-SECRET")
    ds.ReferencedImageSequence = [item]
    src = tmp_path / "src.dcm"
    ds.save_as(src, enforce_file_format=True)
    result = transform_file(src, tmp_path / "out.dcm", TransformSpec(deidentify="basic"), secret)
    assert b"NESTED-SECRET" not in result.path.read_bytes()
    out = dcmread(result.path)
    assert not [elem.tag for elem in out.iterall() if elem.tag.is_private]
    ref = out.ReferencedImageSequence[0]
    assert ref.ReferencedSOPClassUID == ds.SOPClassUID
    # U: remapped as that instance's own SOP Instance UID is, so the reference still holds
    other = tmp_path / "other.dcm"
    make_instance(other, "1.2.826.0.1.3680043.10.1175.5")
    spec = TransformSpec(deidentify="basic")
    referenced = transform_file(other, tmp_path / "other-out.dcm", spec, secret)
    assert ref.ReferencedSOPInstanceUID == referenced.sop_instance_uid


def _rgb_planar(tmp_path: Path, frames: int) -> tuple[Path, np.ndarray]:
    """An uncompressed RGB image stored colour-by-plane (Planar Configuration 1, as some
    ultrasound and secondary capture devices write it), odd width; and its pixels."""
    rng = np.random.default_rng(12)
    rows, columns = 40, 37
    pixels = rng.integers(0, 256, size=(frames, rows, columns, 3), dtype=np.uint8)
    ds = dcmread(data_file("examples_rgb_color.dcm"))  # explicit LE, 8-bit RGB
    ds.Rows, ds.Columns = rows, columns
    ds.PlanarConfiguration = 1
    if frames > 1:
        ds.NumberOfFrames = frames
    elif "NumberOfFrames" in ds:
        del ds.NumberOfFrames
    planes = pixels.transpose(0, 3, 1, 2).tobytes()  # R plane, G plane, B plane per frame
    ds.PixelData = planes + b"\x00" * (len(planes) % 2)
    path = tmp_path / "rgb-planar.dcm"
    ds.save_as(path, enforce_file_format=True)
    decoded = dcmread(path).pixel_array
    assert np.array_equal(decoded, pixels if frames > 1 else pixels[0])  # what it holds
    return path, decoded


@pytest.mark.parametrize("frames", [1, 3])
@pytest.mark.parametrize("target", ["rle", "jpeg-ls-lossless", "jpeg2000-lossless"])
def test_colour_by_plane_pixels_stay_the_same(
    tmp_path: Path, secret: bytes, target: str, frames: int
) -> None:
    """Planar Configuration 1 in the source: every decoder gets the source's pixels back
    (pydicom's encoders read the planes as interleaved pixels: RLE scrambled the image; the
    JPEG 2000 copy kept Planar Configuration 1, which GDCM applied to what it decoded)."""
    src, pixels = _rgb_planar(tmp_path, frames)
    result = transform_file(
        src, tmp_path / "out.dcm", TransformSpec(transfer_syntax=target), secret
    )
    out = dcmread(result.path)
    assert out.file_meta.TransferSyntaxUID == SYNTAXES[target]
    # PS3.5 8.2: 0 for JPEG-LS and JPEG 2000; G.2 (RLE): the segments are colour planes, 1
    assert out.PlanarConfiguration == (1 if target == "rle" else 0)
    assert np.array_equal(out.pixel_array, pixels)
    decoders = {"rle": ["dcmdrle"], "jpeg-ls-lossless": ["dcmdjpls"]}.get(target, [])
    tools = [[require_tool(decoders[0])]] if decoders else []
    if shutil.which("gdcmconv"):
        tools.append(["gdcmconv", "--raw"])
    for n, tool in enumerate(tools):
        plain = tmp_path / f"decoded-{n}.dcm"
        run = subprocess.run(
            [*tool, str(result.path), str(plain)], capture_output=True, text=True, timeout=30
        )
        assert run.returncode == 0, run.stderr
        assert np.array_equal(dcmread(plain).pixel_array, pixels), tool


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _code(value: str, meaning: str) -> list[Dataset]:
    return [_item(CodeValue=value, CodingSchemeDesignator="99LOCAL", CodeMeaning=meaning)]


def test_deidentification_empties_or_removes_the_sequences_e1_says(
    tmp_path: Path, secret: bytes
) -> None:
    """Sequences Table E.1-1 marks Z or X (with /Z, /D) are emptied or removed, not walked:
    their items hold identifying values no other row names (code meanings that are an
    institution's or a person's name, staff numbers, namespace IDs)."""
    ds = dcmread(data_file("CT_small.dcm"))
    ds.InstitutionCodeSequence = _code("SH123", "Hospital SECRETHOSP")  # X/Z/D
    ds.OperatorIdentificationSequence = [  # X/D
        _item(PersonIdentificationCodeSequence=_code("EMP12345", "Jane Operatorsmith"))
    ]
    ds.VerifyingObserverSequence = [  # D: walked, with its Z sequence inside emptied
        _item(
            VerifyingObserverName="Verifier^Jane",
            VerifyingOrganization="ORG SECRETHOSP",
            VerificationDateTime="20200101120000",
            VerifyingObserverIdentificationCodeSequence=_code("EMP67890", "Jane Verifier"),
        )
    ]
    ds.IssuerOfTheContainerIdentifierSequence = [_item(LocalNamespaceEntityID="NS SECRETHOSP")]
    ds.ReferencedStudySequence = [  # X/Z
        _item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1", ReferencedSOPInstanceUID="1.2.3.4")
    ]
    ds.SourceImageSequence = [  # X/Z/U*: kept, its UIDs replaced
        _item(ReferencedSOPClassUID="1.2.840.10008.5.1.4.1.1.2", ReferencedSOPInstanceUID="1.2.3.5")
    ]
    src = tmp_path / "coded.dcm"
    ds.save_as(src, enforce_file_format=True)
    result = transform_file(src, tmp_path / "out.dcm", TransformSpec(deidentify="basic"), secret)
    raw = result.path.read_bytes()
    for value in ("SECRETHOSP", "EMP12345", "EMP67890", "Operatorsmith", "Jane Verifier", "SH123"):
        assert value.encode() not in raw, value
    out = dcmread(result.path)
    assert out.get("InstitutionCodeSequence", []) == []
    assert "OperatorIdentificationSequence" not in out
    (observer,) = out.VerifyingObserverSequence
    assert observer.VerifyingObserverIdentificationCodeSequence == []
    assert observer.VerifyingObserverName != "Verifier^Jane"
    assert out.get("IssuerOfTheContainerIdentifierSequence", []) == []
    assert out.get("ReferencedStudySequence", []) == []
    (source,) = out.SourceImageSequence
    assert source.ReferencedSOPInstanceUID not in ("1.2.3.5", "")


def test_allowed_burned_in_annotation_does_not_claim_the_identity_removed(
    tmp_path: Path, secret: bytes
) -> None:
    """allow_burned_in sends pixels that still show the patient's name: Patient Identity
    Removed (PS3.3: removed from the attributes and the pixel data) must not say YES."""
    src = _copy(tmp_path, "CT_small.dcm", BurnedInAnnotation="YES")
    allowed = TransformSpec(deidentify="basic", allow_burned_in=True)
    out = dcmread(transform_file(src, tmp_path / "out.dcm", allowed, secret).path)
    assert out.PatientIdentityRemoved == "NO"
    assert "Basic" in out.DeidentificationMethod  # what was done to the attributes is said
    plain = _copy(tmp_path, "MR_small.dcm")  # no BurnedInAnnotation: the attributes are clean
    out = dcmread(transform_file(plain, tmp_path / "out2.dcm", allowed, secret).path)
    assert out.PatientIdentityRemoved == "YES"


def test_deidentification_keeps_the_standards_own_uids(tmp_path: Path, secret: bytes) -> None:
    """UIDs under the DICOM root 1.2.840.10008 name parts of the standard (the DCMR mapping
    resource, context groups, coding schemes), never a patient: an SR's template and codes
    must still say which they are; instance UIDs are still replaced."""
    ds = dcmread(data_file("test-SR.dcm"))
    ds.ContentTemplateSequence = [
        _item(
            MappingResource="DCMR",
            TemplateIdentifier="1500",
            MappingResourceUID="1.2.840.10008.8.1.1",
        )
    ]
    ds.ConceptNameCodeSequence = [
        _item(
            CodeValue="126000",
            CodingSchemeDesignator="DCM",
            CodeMeaning="Imaging Measurement Report",
            ContextUID="1.2.840.10008.6.1.1",
            CodingSchemeUID="1.2.840.10008.2.16.4",
        )
    ]
    src = tmp_path / "sr.dcm"
    ds.save_as(src, enforce_file_format=True)
    result = transform_file(src, tmp_path / "out.dcm", TransformSpec(deidentify="basic"), secret)
    out = dcmread(result.path)
    assert out.ContentTemplateSequence[0].MappingResourceUID == "1.2.840.10008.8.1.1"
    (code,) = out.ConceptNameCodeSequence
    assert (code.ContextUID, code.CodingSchemeUID) == (
        "1.2.840.10008.6.1.1",
        "1.2.840.10008.2.16.4",
    )
    assert out.SOPInstanceUID != ds.SOPInstanceUID
    assert out.StudyInstanceUID != ds.StudyInstanceUID
