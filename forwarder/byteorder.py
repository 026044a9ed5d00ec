"""Byte order: what pydicom leaves to its caller when a data set changes endianness."""

from __future__ import annotations

import array
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["swap_other_words"]

# Values pydicom writes back as the bytes it read, whatever the target byte order
# (filewriter.write_OWvalue: "does not currently do the byte swapping"), by item size.
_WORD_VRS = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_ARRAY_TYPES = {array.array(t).itemsize: t for t in "QLIH"}


def swap_other_words(ds: Dataset, source_little: bool) -> None:
    """Byte-swap the OW/OF/OL/OD/OV values of `ds`, nested ones too, in place.

    Converting between big and little endian without this sent pixel data (OW) with each
    16-bit value byte-swapped: MR_small_bigendian arrived as noise. Ambiguous VRs
    ("OB or OW", "US or OW", "US or SS") are resolved first, with the source byte order
    (their raw values are still in it), so that only real word values are swapped.
    """
    from pydicom.filewriter import correct_ambiguous_vr

    correct_ambiguous_vr(ds, source_little)
    for elem in ds.iterall():
        size = _WORD_VRS.get(str(elem.VR))
        value = elem.value
        if size is None or not isinstance(value, bytes) or len(value) % size:
            continue
        words = array.array(_ARRAY_TYPES[size], value)
        words.byteswap()
        elem.value = words.tobytes()
