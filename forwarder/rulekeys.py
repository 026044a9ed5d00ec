"""What a routing rule may name: a DICOM keyword or tag with a text value, and its globs."""

from __future__ import annotations

import re

__all__ = ["PATH_KEY", "RECEIVED_KEYS", "RESERVED_KEYS", "check_glob", "rule_tag"]


# Value representations whose value is text: a rule compares it with globs as is. Numbers
# stored binary (US, UL, FL ...), sequences and bulk data are not routable in v1.
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
     "UR", "UT"}
)  # fmt: skip
_TAG = re.compile(r"^\(?([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)?$")
PATH_KEY = "path"
"""The reserved rule key: the file's path relative to its watched folder (or, for an instance
received over DICOM, to ``receive.dir``)."""
RECEIVED_KEYS = ("calling_aet", "called_aet", "peer")
"""Reserved rule keys of instances received over DICOM: the modality's AE title, the AE title
it called, and its host (IP address). A file dropped into a watched folder has none of them:
a match rule on one of them fails for it, an exclude rule never hits it."""
RESERVED_KEYS = frozenset({PATH_KEY, *RECEIVED_KEYS})


def rule_tag(key: str) -> int | None:
    """The tag a rule key names (a DICOM keyword or ``"GGGG,EEEE"``); None for the
    `RESERVED_KEYS` (``path``, ``calling_aet``, ``called_aet``, ``peer``).

    pydicom's data dictionary is read here, when the settings are validated, and never on
    the send path.

    Raises
    ------
    ValueError
        Naming the key: not a keyword or tag, or an attribute whose value is not text
        (binary numbers, sequences, bulk data) or that lives in the file meta.
    """
    if key in RESERVED_KEYS:
        return None
    from pydicom.datadict import dictionary_has_tag, dictionary_VR, tag_for_keyword

    found = _TAG.match(key)
    tag = int(found[1] + found[2], 16) if found else tag_for_keyword(key)
    if tag is None:
        raise ValueError(f'{key!r} is not a DICOM keyword or a tag "GGGG,EEEE"')
    group = tag >> 16
    if group in (0x0000, 0x0002, 0xFFFE):
        raise ValueError(f"{key!r}: command, file meta and item tags are not routable")
    if dictionary_has_tag(tag):
        vr = dictionary_VR(tag)
        if vr not in _TEXT_VRS:
            raise ValueError(
                f"{key!r} has VR {vr}: only text attributes are routable in v1 "
                f"({', '.join(sorted(_TEXT_VRS))})"
            )
    # a private or unknown tag: its value is read as text
    return tag


def check_glob(glob: str) -> str:
    """`glob` when it is usable in a rule; raises ValueError naming it."""
    start = glob.find("[")
    while start != -1:
        # fnmatch takes a '[' without its ']' literally, which is never what was meant
        end = glob.find("]", start + 2)
        if end == -1:
            raise ValueError(f"glob {glob!r} has a '[' without its ']'")
        start = glob.find("[", end + 1)
    return glob
