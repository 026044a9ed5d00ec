"""Tests for forwarder/lossy.py: what a data set decompressed from a lossy syntax must say."""

from __future__ import annotations

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from forwarder.lossy import LossyMarks, lossy_marks, mark_lossy

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LS_LOSSY = "1.2.840.10008.1.2.4.81"
J2K = "1.2.840.10008.1.2.4.91"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
RLE = "1.2.840.10008.1.2.5"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@pytest.mark.parametrize(
    ("syntax", "lossy", "ratio", "method", "computed", "expected"),
    [
        # lossless or uncompressed sources: nothing to say
        (J2K_LOSSLESS, None, (), (), 3.0, None),
        (JPEG_LS_LOSSLESS, None, (), (), 3.0, None),
        (RLE, None, (), (), 2.0, None),
        (EXPLICIT_LE, None, (), (), None, None),
        # nothing in the file: "01", the computed ratio and the syntax's method
        (JPEG_BASELINE, None, (), (), 17.36111, LossyMarks("01", ("17.361",), ("ISO_10918_1",))),
        (JPEG_EXTENDED, None, (), (), None, LossyMarks("01", (), ("ISO_10918_1",))),
        (JPEG_LS_LOSSY, None, (), (), 4.0, LossyMarks("01", ("4",), ("ISO_14495_1",))),
        (J2K, None, (), (), 2097.2, LossyMarks("01", ("2097.2",), ("ISO_15444_1",))),
        # what the file says is kept
        (
            JPEG_BASELINE,
            "01",
            ("17.401",),
            ("ISO_10918_1",),
            17.36,
            LossyMarks("01", ("17.401",), ("ISO_10918_1",)),
        ),
        (J2K, "01", ("2097",), (), 9.0, LossyMarks("01", ("2097",), ("ISO_15444_1",))),
        # a method missing behind two ratios is padded to two values, as DCMTK does
        (
            JPEG_BASELINE,
            "01",
            ("10", "20"),
            (),
            5.0,
            LossyMarks("01", ("10", "20"), ("", "ISO_10918_1")),
        ),
        # JPEG processes 1/2/4 are lossy whatever the file claims
        (JPEG_BASELINE, "00", (), (), None, LossyMarks("01", (), ("ISO_10918_1",))),
        # JPEG-LS and JPEG 2000 may be reversible: an encoder's explicit "00" is trusted
        (J2K, "00", (), (), 2.0, None),
        (JPEG_LS_LOSSY, "00", (), (), 2.0, None),
        # a ratio that cannot be known is not invented
        (J2K, None, (), (), 0.0, LossyMarks("01", (), ("ISO_15444_1",))),
    ],
)
def test_lossy_marks(
    syntax: str,
    lossy: str | None,
    ratio: tuple[str, ...],
    method: tuple[str, ...],
    computed: float | None,
    expected: LossyMarks | None,
) -> None:
    assert lossy_marks(syntax, lossy, ratio, method, computed) == expected


def test_mark_lossy_on_a_decompressed_jpeg_ls_file() -> None:
    path = get_testdata_file("JPEGLSNearLossless_08.dcm")
    assert path is not None
    ds = dcmread(path)
    assert "LossyImageCompression" not in ds
    compressed = len(ds.PixelData)
    ds.decompress(generate_instance_uid=False)
    marks = mark_lossy(ds, JPEG_LS_LOSSY, compressed)
    assert marks is not None
    assert ds.LossyImageCompression == "01"
    assert ds.LossyImageCompressionMethod == "ISO_14495_1"
    assert float(ds.LossyImageCompressionRatio) == pytest.approx(
        len(ds.PixelData) / compressed, rel=1e-4
    )
