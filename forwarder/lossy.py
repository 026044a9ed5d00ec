"""Lossy Image Compression attributes for a data set decompressed from a lossy syntax.

A peer that refuses a JPEG baseline file gets it decompressed; the pixels it then receives
are the lossy ones, so the data set must say so (PS3.3 C.7.6.1.1.5): Lossy Image Compression
(0028,2110) "01", with the Ratio (0028,2112) and the Method (0028,2114) kept, or added when
absent, the way DCMTK's codecs write them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["LOSSY_METHODS", "LossyMarks", "lossy_marks", "mark_lossy"]

LOSSY_METHODS: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",  # JPEG-LS Lossy (Near-Lossless)
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",  # JPEG 2000 (lossy or lossless)
}
"""Transfer syntaxes whose decoded pixels may differ from the original, and their method."""

# JPEG processes 1, 2 and 4 are DCT-based: never lossless, whatever the file says.
_ALWAYS_LOSSY = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})


@dataclass(frozen=True)
class LossyMarks:
    """The values of (0028,2110), (0028,2112) and (0028,2114) to write; () = leave absent."""

    lossy: str
    ratio: tuple[str, ...]
    method: tuple[str, ...]


def lossy_marks(
    syntax: str,
    lossy: str | None,
    ratio: tuple[str, ...],
    method: tuple[str, ...],
    computed_ratio: float | None,
) -> LossyMarks | None:
    """What the three attributes must say after decompressing from `syntax`; None: no change.

    `lossy`, `ratio`, `method` are the data set's values (None / () when absent);
    `computed_ratio` is uncompressed / compressed pixel bytes, when known.

    * Not a lossy syntax: None.
    * JPEG-LS near-lossless and JPEG 2000 may carry a reversible stream: a data set that
      states "00" itself is trusted (its encoder knew), and left alone.
    * Otherwise "01". An existing ratio and method are kept; a missing ratio is the computed
      one (5 significant digits, as DCMTK writes it); a missing method is this syntax's,
      padded with empty values to as many values as the ratio has, as DCMTK pads it.
    """
    method_name = LOSSY_METHODS.get(syntax)
    if method_name is None:
        return None
    if (lossy or "").strip() == "00" and syntax not in _ALWAYS_LOSSY:
        return None
    if not ratio and computed_ratio is not None and computed_ratio > 0:
        ratio = (f"{computed_ratio:.5G}",)
    if not method:
        method = ("",) * max(len(ratio) - 1, 0) + (method_name,)
    return LossyMarks("01", ratio, method)


def mark_lossy(ds: Any, syntax: str, compressed_bytes: int | None) -> LossyMarks | None:
    """Write `lossy_marks` into the decompressed pydicom data set `ds`; return what it wrote.

    `compressed_bytes` is the size of the encapsulated pixel data before decompression;
    with the size of the decompressed pixel data it gives the ratio when the file has none.
    """
    computed = None
    pixels = ds.get("PixelData")
    if compressed_bytes and pixels is not None:
        computed = len(pixels) / compressed_bytes
    ratio = _values(ds.get("LossyImageCompressionRatio"))
    method = _values(ds.get("LossyImageCompressionMethod"))
    marks = lossy_marks(syntax, ds.get("LossyImageCompression"), ratio, method, computed)
    if marks is None:
        return None
    ds.LossyImageCompression = marks.lossy
    if marks.ratio != ratio:  # values the file had are left exactly as written
        ds.LossyImageCompressionRatio = list(marks.ratio)
    if marks.method != method:
        ds.LossyImageCompressionMethod = list(marks.method)
    return marks


def _values(value: Any) -> tuple[str, ...]:
    """A pydicom element value (None, one value or a MultiValue) as a tuple of strings."""
    if value is None or value == "":
        return ()
    if isinstance(value, str | int | float):
        return (str(value),)
    return tuple(str(v) for v in value)
