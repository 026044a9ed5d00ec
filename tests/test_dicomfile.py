"""Tests for forwarder.dicomfile: header-only inspection and the completeness check."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from conftest import data_file, pynetdicom_file
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import data_element_generator
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from forwarder.dicomfile import (
    DEFLATED_LE,
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    InvalidDicom,
    MissingUID,
    NotDicom,
    Truncated,
    inspect,
    uid_problem,
)

JPEG2000 = "1.2.840.10008.1.2.4.91"
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
RLE = "1.2.840.10008.1.2.5"

# name -> expected transfer syntax, or the InvalidDicom subclass it must raise
PYDICOM_FILES: dict[str, str | type[InvalidDicom]] = {
    "CT_small.dcm": EXPLICIT_LE,
    "MR_small.dcm": EXPLICIT_LE,
    "MR_small_implicit.dcm": IMPLICIT_LE,
    "MR_small_bigendian.dcm": EXPLICIT_BE,
    "MR_small_RLE.dcm": RLE,
    "MR_small_jp2klossless.dcm": JPEG2000_LOSSLESS,
    "MR_small_jpeg_ls_lossless.dcm": JPEG_LS_LOSSLESS,
    "JPEG2000.dcm": JPEG2000,
    "JPEG-lossy.dcm": JPEG_EXTENDED,
    "image_dfl.dcm": DEFLATED_LE,
    "rtplan.dcm": IMPLICIT_LE,
    "rtdose.dcm": IMPLICIT_LE,
    "rtstruct.dcm": IMPLICIT_LE,  # no preamble, no file meta
    "ExplVR_BigEndNoMeta.dcm": EXPLICIT_BE,
    "ExplVR_LitEndNoMeta.dcm": EXPLICIT_LE,
    "waveform_ecg.dcm": EXPLICIT_LE,
    "test-SR.dcm": EXPLICIT_LE,
    "MR_truncated.dcm": Truncated,
    "rtplan_truncated.dcm": Truncated,
    "README.txt": NotDicom,
    "rtplan.dump": NotDicom,
    "test1.json": NotDicom,
    "zipMR.gz": NotDicom,
    "crayons.icc": NotDicom,  # regression: was Truncated ("still being written")
    "no_meta.dcm": NotDicom,  # a raw data set shifted by one byte
    "meta_missing_tsyntax.dcm": NotDicom,
    # meta says JPEG Baseline (explicit VR) but the data set is implicit VR: sending it as
    # is would hand the peer garbage, so it is invalid (pydicom only warns)
    "SC_rgb_jpeg.dcm": NotDicom,
    # fragments whose data sets have no SOP UIDs (only the file meta has them)
    "priv_SQ.dcm": MissingUID,
    "no_meta_group_length.dcm": MissingUID,
    "UN_sequence.dcm": MissingUID,
    "empty_charset_LEI.dcm": MissingUID,
    "nested_priv_SQ.dcm": MissingUID,
}

PYNETDICOM_FILES: dict[str, str] = {
    "CTImageStorage.dcm": EXPLICIT_LE,
    "CTImageStorage_bad_meta.dcm": EXPLICIT_LE,
    "MRImageStorage_ExplicitVRBigEndian.dcm": EXPLICIT_BE,
    "MRImageStorage_JPG2000_Lossless.dcm": JPEG2000_LOSSLESS,
    "RTImageStorage.dcm": IMPLICIT_LE,
    "SCImageStorage_Deflated.dcm": DEFLATED_LE,
}


def _check(path: Path, expected: str | type[InvalidDicom]) -> None:
    if isinstance(expected, str):
        info = inspect(path)
        assert info.transfer_syntax == expected
        ds = dcmread(path, force=True, stop_before_pixels=True)
        assert info.sop_class_uid == ds.SOPClassUID
        assert info.sop_instance_uid == ds.SOPInstanceUID
        assert info.study_uid == ds.get("StudyInstanceUID")
        assert info.size == path.stat().st_size
    else:
        with pytest.raises(expected) as exc:
            inspect(path)
        assert type(exc.value) is expected
        assert exc.value.path == path
        assert exc.value.reason and "\n" not in exc.value.reason


@pytest.mark.parametrize("name", sorted(PYDICOM_FILES))
def test_pydicom_test_files(name: str) -> None:
    _check(data_file(name), PYDICOM_FILES[name])


@pytest.mark.parametrize("name", sorted(PYNETDICOM_FILES))
def test_pynetdicom_test_files(name: str) -> None:
    _check(pynetdicom_file(name), PYNETDICOM_FILES[name])


def test_every_pydicom_test_file_classifies_without_crashing() -> None:
    folder = data_file("CT_small.dcm").parent
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            info = inspect(path)
        except InvalidDicom as exc:
            assert exc.reason and "\n" not in exc.reason, path
        else:
            assert info.sop_class_uid.startswith(("1.2.840.10008.", "1.2.")), path
            assert info.dataset_offset < info.size, path


def _meta_end(path: Path) -> int:
    """Where pydicom says the data set starts (after preamble and file meta)."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with open(path, "rb") as fp:
        read_preamble(fp, False)
        _read_file_meta_info(fp)
        return fp.tell()


def test_values_of_a_file_with_meta() -> None:
    path = data_file("CT_small.dcm")
    info = inspect(path)
    ds = dcmread(path)
    assert info.path == path
    assert path.read_bytes()[128:132] == b"DICM"
    assert info.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert info.sop_instance_uid == ds.SOPInstanceUID
    assert info.study_uid == ds.StudyInstanceUID
    assert info.dataset_offset == _meta_end(path) == 336
    assert info.mtime_ns == path.stat().st_mtime_ns
    # the bytes from the offset are the data set pydicom reads
    raw = path.read_bytes()[info.dataset_offset :]
    first = next(data_element_generator(io.BytesIO(raw), False, True))
    assert first.tag == 0x00080005


def test_values_of_files_without_meta() -> None:
    info = inspect(data_file("rtstruct.dcm"))
    assert (info.dataset_offset, info.transfer_syntax) == (0, IMPLICIT_LE)  # no preamble, no meta
    info = inspect(data_file("ExplVR_BigEndNoMeta.dcm"))
    assert (info.dataset_offset, info.transfer_syntax) == (0, EXPLICIT_BE)


def test_deflated_and_encapsulated_values() -> None:
    info = inspect(data_file("image_dfl.dcm"))
    assert info.dataset_offset == _meta_end(data_file("image_dfl.dcm")) > 132
    assert info.sop_instance_uid == dcmread(data_file("image_dfl.dcm")).SOPInstanceUID
    info = inspect(data_file("JPEG2000.dcm"))
    assert info.transfer_syntax == JPEG2000
    assert info.dataset_offset == _meta_end(data_file("JPEG2000.dcm")) > 132


def _cut(src: Path, size: int, tmp_path: Path) -> Path:
    out = tmp_path / f"{src.stem}-{size}.dcm"
    with open(src, "rb") as fp:
        out.write_bytes(fp.read(size))
    return out


@pytest.mark.parametrize("size", [1000, 20000])
def test_cut_file_is_truncated_although_pydicom_reads_it(size: int, tmp_path: Path) -> None:
    cut = _cut(data_file("CT_small.dcm"), size, tmp_path)
    dcmread(cut)  # the trap: pydicom reads the half-written file without an error
    with pytest.raises(Truncated):
        inspect(cut)


def _element_ends(path: Path, offset: int, implicit: bool, little: bool) -> set[int]:
    """The offsets where pydicom's parser finds a top-level element ending."""
    data = path.read_bytes()
    fp = io.BytesIO(data)
    fp.seek(offset)
    ends = set()
    for _ in data_element_generator(fp, implicit, little, defer_size=None):
        ends.add(fp.tell())
    return ends


@pytest.mark.parametrize(
    ("name", "implicit", "little"),
    [
        ("CT_small.dcm", False, True),
        ("rtplan.dcm", True, True),  # sequences
        ("JPEG2000.dcm", False, True),  # encapsulated pixel data
        ("ExplVR_BigEndNoMeta.dcm", False, False),
    ],
)
def test_every_cut_is_truncated_unless_at_an_element_boundary(
    name: str, implicit: bool, little: bool, tmp_path: Path
) -> None:
    """A file cut anywhere is Truncated, except exactly between two top-level elements.

    (There the bytes are a complete shorter data set: only the file system can tell.)
    """
    src = data_file(name)
    info = inspect(src)
    ends = _element_ends(src, info.dataset_offset, implicit, little)
    data = src.read_bytes()
    target = tmp_path / "cut.dcm"
    step = max(1, len(data) // 1500)
    for size in [*range(0, len(data), step), len(data) - 1]:
        target.write_bytes(data[:size])
        try:
            inspect(target)
        except Truncated:
            continue
        except MissingUID:  # cut before its SOP UIDs, at an element boundary
            assert size in ends, size
            continue
        except NotDicom:  # CT_small's preamble is a TIFF header: no telling it apart
            assert size < 132 and data[:128].strip(b"\x00"), size
            continue
        assert size in ends, f"{name} cut at {size} of {len(data)} passed as complete"


def test_cut_deflated_file_is_truncated(tmp_path: Path) -> None:
    src = data_file("image_dfl.dcm")
    size = src.stat().st_size
    for cut_at in (400, 1000, size // 2, size - 40):
        with pytest.raises(Truncated):
            inspect(_cut(src, cut_at, tmp_path))


@pytest.mark.parametrize("size", [0, 1, 100, 130, 133, 160, 250])
def test_cut_in_preamble_or_meta_is_truncated(size: int, tmp_path: Path) -> None:
    """Regression: a file cut in its zero preamble or file meta read as "not DICOM"."""
    with pytest.raises(Truncated):
        inspect(_cut(data_file("rtplan.dcm"), size, tmp_path))


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.dcm"
    empty.touch()
    with pytest.raises(Truncated, match="empty file"):
        inspect(empty)


def test_meta_only_is_truncated(tmp_path: Path) -> None:
    src = data_file("CT_small.dcm")
    with pytest.raises(Truncated):
        inspect(_cut(src, inspect(src).dataset_offset, tmp_path))


def test_missing_file_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        inspect(tmp_path / "gone.dcm")


def _write(ds: Dataset, path: Path, *, meta_uid: str | None = None) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.7")
    ds.file_meta.MediaStorageSOPInstanceUID = meta_uid or ds.get("SOPInstanceUID", "1.2.3")
    ds.save_as(path, enforce_file_format=True)
    return path


def test_missing_sop_instance_uid(tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.PatientName = "Missing^UID"
    # the file meta has a Media Storage SOP Instance UID; the data set has none
    path = _write(ds, tmp_path / "nouid.dcm", meta_uid=generate_uid())
    with pytest.raises(MissingUID, match=r"SOP Instance UID"):
        inspect(path)


def test_missing_sop_class_uid(tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "Missing^Class"
    with pytest.raises(MissingUID, match=r"SOP Class UID"):
        inspect(_write(ds, tmp_path / "noclass.dcm"))


def _with_undefined_length_sequence(path: Path) -> tuple[Path, int]:
    """A file with an undefined-length sequence of undefined-length items.

    Returns the path and an offset inside the second item.
    """
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    items = []
    for n in range(3):
        item = Dataset()
        item.CodeValue = f"CODE{n}"
        item.CodeMeaning = "x" * 60
        item.is_undefined_length_sequence_item = True
        items.append(item)
    ds.ReferencedImageSequence = Sequence(items)
    ds["ReferencedImageSequence"].is_undefined_length = True
    ds.PatientName = "Seq^Test"
    _write(ds, path)
    raw = path.read_bytes()
    seq_at = raw.index(b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff")  # (0008,1140) undefined
    first = raw.index(b"\xfe\xff\x00\xe0\xff\xff\xff\xff", seq_at)
    second = raw.index(b"\xfe\xff\x00\xe0\xff\xff\xff\xff", first + 8)
    meaning = raw.index(b"xxxx", second)
    return path, meaning + 50


def test_cut_inside_an_undefined_length_item_is_truncated(tmp_path: Path) -> None:
    path, inside = _with_undefined_length_sequence(tmp_path / "seq.dcm")
    info = inspect(path)  # complete: fine
    assert info.sop_instance_uid == dcmread(path).SOPInstanceUID
    data = path.read_bytes()
    cut = tmp_path / "seq-cut.dcm"
    cut.write_bytes(data[:inside])
    with pytest.raises(Truncated):
        inspect(cut)
    # cut right at the end of an element inside the item: still inside the sequence
    end_of_value = data.index(b"x" * 60) + 60
    cut.write_bytes(data[:end_of_value])
    with pytest.raises(Truncated):
        inspect(cut)
    # cut just before the sequence delimiter
    delimiter = data.index(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    cut.write_bytes(data[:delimiter])
    with pytest.raises(Truncated):
        inspect(cut)


# -- UIDs that cannot be sent make the file invalid -----------------------------------------


def _placeholder(n: int, digit: str) -> str:
    """A valid UID of exactly `n` characters (n >= 3), unique per `digit`."""
    return "1." + digit * (n - 2)


def _file_with_uid(tmp_path: Path, where: str, value: bytes) -> Path:
    """CT-like file whose `where` UID (ts, meta_class, meta_instance, class, instance) is
    exactly `value`, patched in over a same-length placeholder (pydicom would not write it)."""
    n = len(value)
    names = ("ts", "meta_class", "meta_instance", "class", "instance")
    uids = {
        name: _placeholder(n, str(i + 1)) if name == where else None for i, name in enumerate(names)
    }
    ds = Dataset()
    ds.SOPClassUID = uids["class"] or uids["meta_class"] or "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = uids["instance"] or uids["meta_instance"] or "1.2.826.0.1.3680043.10.9"
    ds.PatientName = "Bad^UID"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uids["ts"] or ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = uids["meta_class"] or "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = uids["meta_instance"] or "1.2.826.0.1.3680043.10.9"
    path = tmp_path / f"{where}.dcm"
    with pytest.warns() if n > 64 else _no_warning():
        ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
    placeholder = next(u for u in uids.values() if u is not None).encode()
    data = path.read_bytes()
    # pydicom copies the data set's SOP UIDs into the file meta: patch only the one asked for
    at = data.index(placeholder) if where.startswith(("ts", "meta")) else data.rindex(placeholder)
    path.write_bytes(data[:at] + value + data[at + n :])
    return path


class _no_warning:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# (where, value as stored, what the reason must contain)
BAD_UIDS: list[tuple[str, bytes, str]] = [
    # issue 10 item 2: a non-ASCII byte in the transfer syntax blocked every association
    ("ts", b"1.2.840.10008.\xe9.2.1", r"Transfer Syntax UID (0002,0010) '1.2.840.10008.\xe9.2.1'"),
    # item 3: a non-ASCII SOP Instance UID crashed the worker in the C-STORE command
    ("instance", b"1.2.3.\xe9.5", r"SOP Instance UID (0008,0018) '1.2.3.\xe9.5'"),
    ("instance", b"1.2.3.4\n5", r"'1.2.3.4\x0a5'"),
    ("instance", b"1.2.abc.4", "not only digits and dots"),
    ("instance", b"1.2." + b"3" * 61, "65 characters"),
    ("instance", b"1.2..3", "an empty component"),
    ("instance", b"1.2.3.", "an empty component"),
    ("class", b"1.2.840.10008.5.1.4.1.1.7\x01", r"SOP Class UID (0008,0016) '1.2.840"),
    ("meta_instance", b"1.2.3\xff.4", "Media Storage SOP Instance UID (0002,0003)"),
    ("meta_class", b"1.2.3 4", "Media Storage SOP Class UID (0002,0002)"),
]


@pytest.mark.parametrize(("where", "value", "reason"), BAD_UIDS)
def test_a_uid_that_cannot_be_sent_makes_the_file_invalid(
    tmp_path: Path, where: str, value: bytes, reason: str
) -> None:
    path = _file_with_uid(tmp_path, where, value)
    with pytest.raises(InvalidDicom) as exc:
        inspect(path)
    assert reason in exc.value.reason, exc.value.reason
    assert exc.value.reason.isprintable(), exc.value.reason


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"1.2.826.0.1.3680043.10.999.7\x00", "1.2.826.0.1.3680043.10.999.7"),  # NUL padding
        (b"1.2.826.0.1.3680043.10.999.7 ", "1.2.826.0.1.3680043.10.999.7"),  # space padding
        (b"1.2.826.0.01.3680043.10.999.7", "1.2.826.0.01.3680043.10.999.7"),  # leading zero
        (b"1.2." + b"3" * 60, "1.2." + "3" * 60),  # exactly 64
    ],
)
def test_padded_and_leading_zero_uids_are_accepted(
    tmp_path: Path, value: bytes, expected: str
) -> None:
    assert inspect(_file_with_uid(tmp_path, "instance", value)).sop_instance_uid == expected


@pytest.mark.parametrize(
    ("uid", "problem"),
    [
        ("1.2.840.10008.1.2.1", None),
        ("0", None),
        ("1.2.03", None),  # PS3.5 forbids it; peers accept it (see uid_problem)
        ("", "empty"),
        ("1.2.x", "not only digits and dots"),
        ("1.2.\ufffd", "not only digits and dots"),
        (".1.2", "an empty component"),
        ("1.2" + ".3" * 31, "65 characters (at most 64)"),
    ],
)
def test_uid_problem(uid: str, problem: str | None) -> None:
    assert uid_problem(uid) == problem


# -- the attributes routing rules name, read by the same walk ------------------------------

MODALITY = 0x00080060
IMAGE_TYPE = 0x00080008
SERIES_DESCRIPTION = 0x0008103E
PATIENT_NAME = 0x00100010
CODE_MEANING = 0x00080104  # only inside a sequence in the files below
PRIVATE = 0x00091010


@pytest.mark.parametrize(
    "name",
    ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm"],
)
def test_attributes_are_the_values_pydicom_reads(name: str) -> None:
    path = data_file(name)
    ds = dcmread(path)
    tags = frozenset({MODALITY, IMAGE_TYPE, PATIENT_NAME})
    info = inspect(path, attributes=tags)
    for tag in tags:
        if tag in ds:
            value = ds[tag].value
            values = list(value) if ds[tag].VM > 1 else [value]
            assert info.attributes[tag] == tuple(str(v) for v in values), (name, hex(tag))
        else:
            assert tag not in info.attributes
    plain = inspect(path)
    assert plain.attributes == {}
    # the file facts are the same with and without attributes
    assert (plain.sop_instance_uid, plain.study_uid, plain.dataset_offset) == (
        info.sop_instance_uid,
        info.study_uid,
        info.dataset_offset,
    )


def test_attributes_are_top_level_only_latin1_and_multi_valued(tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SeriesDescription = "Thorax \xe9 SCOUT "
    ds.SpecificCharacterSet = "ISO_IR 100"
    item = Dataset()
    item.CodeMeaning = "nested"
    ds.ConceptNameCodeSequence = Sequence([item])
    ds.add_new(0x00090010, "LO", "ACME")
    ds.add_new(PRIVATE, "LO", "private value")
    path = _write(ds, tmp_path / "a.dcm")
    info = inspect(
        path, attributes=frozenset({IMAGE_TYPE, SERIES_DESCRIPTION, CODE_MEANING, PRIVATE})
    )
    assert info.attributes == {
        IMAGE_TYPE: ("ORIGINAL", "PRIMARY", "LOCALIZER"),
        SERIES_DESCRIPTION: ("Thorax \xe9 SCOUT",),
        PRIVATE: ("private value",),
    }  # CodeMeaning lives in a sequence: not read (v1)
