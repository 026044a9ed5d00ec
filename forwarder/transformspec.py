"""What a destination's transform may say: the spec, and the checks of its keys and templates.

Light on purpose: the settings import it, so pydicom's data dictionary is only read inside the
check functions (when the settings are validated), never at import. The engine that applies a
spec is ``forwarder.transform``.
"""

from __future__ import annotations

import functools
import re
import string
from dataclasses import dataclass

__all__ = [
    "DEIDENTIFY",
    "SYNTAXES",
    "TransformSpec",
    "check_constant",
    "check_remove_key",
    "check_set_key",
    "check_template",
    "key_tag",
    "template_fields",
]

SYNTAXES: dict[str, str | None] = {
    "keep": None,
    "explicit-le": "1.2.840.10008.1.2.1",
    "implicit-le": "1.2.840.10008.1.2",
    "rle": "1.2.840.10008.1.2.5",
    "jpeg-ls-lossless": "1.2.840.10008.1.2.4.80",
    "jpeg2000-lossless": "1.2.840.10008.1.2.4.90",
}
"""`transfer_syntax` names and the UID each writes (None: the source's own syntax)."""

DEIDENTIFY = ("none", "basic")
"""`deidentify` values: nothing, or PS3.15 E.1 Basic Application Level Confidentiality."""

# Value representations a `set` can write from text (a template's result). Binary numbers,
# sequences, bulk data and attribute tags cannot be written from text.
_SETTABLE_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
     "UR", "UT"}
)  # fmt: skip
# Value representations a template cannot read as text: sequences and bulk data.
_UNREADABLE_VRS = frozenset({"SQ", "OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_TAG = re.compile(r"^\(?([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)?$")
_RESERVED_GROUPS = (0x0000, 0x0002, 0xFFFE)


@dataclass(frozen=True)
class TransformSpec:
    """One destination's transform, as configured (keys and templates as written).

    The order it is applied in: burned-in check, de-identification, `set`, `remove`,
    then the transfer syntax.
    """

    set: tuple[tuple[str, str], ...] = ()  # (keyword or "GGGG,EEEE", template)
    remove: tuple[str, ...] = ()  # keywords or "GGGG,EEEE"
    deidentify: str = "none"  # one of DEIDENTIFY
    transfer_syntax: str = "keep"  # a SYNTAXES key
    allow_burned_in: bool = False

    def __post_init__(self) -> None:
        if self.deidentify not in DEIDENTIFY:
            raise ValueError(
                f"deidentify {self.deidentify!r} is not one of {', '.join(DEIDENTIFY)}"
            )
        if self.transfer_syntax not in SYNTAXES:
            raise ValueError(
                f"transfer_syntax {self.transfer_syntax!r} is not one of {', '.join(SYNTAXES)}"
            )

    @property
    def changes_nothing(self) -> bool:
        """True when the file's own bytes can be streamed: no set, remove or de-identification
        and the source's transfer syntax kept."""
        return (
            not self.set
            and not self.remove
            and self.deidentify == "none"
            and self.transfer_syntax == "keep"
        )


@functools.lru_cache(maxsize=1024)  # the sender looks up a spec's keys for every instance
def key_tag(key: str) -> int:
    """The tag `key` names: a DICOM keyword or ``"GGGG,EEEE"`` (brackets allowed).

    Raises ValueError naming the key when it is neither, or when it is in a group no
    transform may touch (0000 command, 0002 file meta, FFFE item delimiters).
    """
    from pydicom.datadict import tag_for_keyword

    found = _TAG.match(key.strip())
    # "" is the keyword of some retired dictionary entries: never a key
    tag = int(found[1] + found[2], 16) if found else (tag_for_keyword(key) if key else None)
    if tag is None:
        raise ValueError(f'{key!r} is not a DICOM keyword or a tag "GGGG,EEEE"')
    if tag >> 16 in _RESERVED_GROUPS:
        raise ValueError(f"{key!r}: command, file meta and item tags cannot be transformed")
    return tag


def _dictionary_vr(tag: int) -> str | None:
    """The data dictionary's VR for `tag` (repeating groups too); None when unknown."""
    from pydicom.datadict import dictionary_has_tag, dictionary_VR

    if (tag >> 16) % 2 or not dictionary_has_tag(tag):
        return None
    return str(dictionary_VR(tag))


_IDENTITY = {0x00080016: "SOPClassUID", 0x00080018: "SOPInstanceUID"}
"""What the instance is: neither set nor removed (de-identification gives new instance UIDs)."""


def _not_identity(key: str, tag: int, verb: str) -> None:
    if tag in _IDENTITY:
        raise ValueError(
            f"{key!r}: the {_IDENTITY[tag]} is what the instance is and cannot be {verb} "
            '(deidentify = "basic" gives new instance UIDs)'
        )


def check_set_key(key: str) -> str:
    """`key` when `set` may write it from text; ValueError naming it otherwise.

    A private or unknown tag is allowed (written as LO when the data set lacks it).
    """
    tag = key_tag(key)
    _not_identity(key, tag, "set")
    vr = _dictionary_vr(tag)
    if vr is not None and vr not in _SETTABLE_VRS:
        raise ValueError(
            f"{key!r} has VR {vr}: set writes only text attributes "
            f"({', '.join(sorted(_SETTABLE_VRS))})"
        )
    return key


def check_remove_key(key: str) -> str:
    """`key` when `remove` may delete it (any keyword or tag outside groups 0000, 0002,
    FFFE; private tags too) but the SOP Class and Instance UIDs; ValueError naming it
    otherwise."""
    _not_identity(key, key_tag(key), "removed")
    return key


def template_fields(template: str) -> tuple[str, ...]:
    """The keywords `template` reads (``{PatientID}``), in order; ValueError naming it."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:  # a lone "{" or "}"
        raise ValueError(f"template {template!r}: {exc} (write {{{{ and }}}} for braces)") from exc
    fields = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if spec or conversion:
            raise ValueError(
                f"template {template!r}: {{{name}}} may not have a format spec or conversion"
            )
        tag = tag_for_keyword(name) if name else None
        if tag is None:
            raise ValueError(f"template {template!r}: {{{name}}} is not a DICOM keyword")
        if tag >> 16 in _RESERVED_GROUPS:
            raise ValueError(f"template {template!r}: {{{name}}} is a file meta attribute")
        if set(str(dictionary_VR(tag)).split(" or ")) & _UNREADABLE_VRS:
            raise ValueError(
                f"template {template!r}: {{{name}}} has VR {dictionary_VR(tag)}, not text"
            )
        fields.append(name)
    return tuple(fields)


def check_template(template: str) -> str:
    """`template` when its ``{Keyword}`` placeholders are all DICOM keywords of text-readable
    attributes (``{{``/``}}`` for literal braces, as str.format); ValueError naming it."""
    template_fields(template)
    return template


def check_constant(key: str, template: str) -> None:
    """ValueError naming `key` when `template` has no placeholder and is a value the
    dictionary VR of `key` cannot hold (every instance would fail at run time).

    Placeholders and private or unknown tags are left to run time: their value, or the VR
    the data set gives them, is only known per instance.
    """
    from pydicom.valuerep import validate_value

    if template_fields(template):
        return
    text = template.replace("{{", "{").replace("}}", "}")
    vr = _dictionary_vr(key_tag(key))
    if vr is None or vr not in _SETTABLE_VRS:
        return
    values = text.split("\\") if vr not in ("LT", "ST", "UT", "UR") else [text]
    try:
        for value in values:
            validate_value(vr, value, 2)  # 2: config.RAISE
    except ValueError as exc:
        raise ValueError(f"{key} = {text!r}: not a valid {vr} value ({exc})") from exc


class TransformFailed(Exception):
    """The instance cannot be transformed; ``str(exc)`` is one line saying why (refused for
    that destination: quarantined)."""
