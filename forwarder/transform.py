"""Apply a destination's transform to one DICOM file: de-identify, set, remove, transcode.

The engine behind ``[destinations.transform]``. It decodes with pydicom and runs in the
transform pool's processes and in ``forwarder route test``; nothing here touches the outbox or
the network. `transform_file` writes the result as a Part 10 file, `preview` says what it would
change without writing.

De-identification (``deidentify = "basic"``)
--------------------------------------------
PS3.15 E.1, the Basic Application Level Confidentiality Profile, done by dicognito 0.19 and
completed here from the standard's table (``forwarder.basicprofile``, 652 tags).

Why dicognito (measured on pydicom's CT_small.dcm carrying 494 populated attributes of Table
E.1-1, pydicom 3.0.2, one process):

* dicognito 0.19: works with pydicom 3; remaps every UID except class and transfer syntax UIDs
  with ``"2." + (10**39 + md5(seed + uid))``, so a fixed seed gives the same new UID for the
  same original in every process and after every restart; replaces names, IDs, institution
  and address with plausible dummies and shifts every date by one offset per seed; 277 of the
  494 E.1 attributes kept their original value (descriptions, comments, device serials,
  clinical trial, GPS, RT labels; private tags); PatientIdentityRemoved only set when
  BurnedInAnnotation is "NO". 14.8 ms per CT_small (read excluded).
* deid 0.4.13 (default recipe): removes every attribute whose keyword contains "UID", SOP Class
  and SOP Instance UID included (the result cannot be stored by any peer); consistent
  remapping needs a hand-written recipe; keeps InstitutionName, StationName and 253 more of the
  494; adds a matplotlib dependency; 54 ms per CT_small.

With what this module adds, none of the 494 keeps its original value (17.6 ms per CT_small,
read excluded; 9-14 ms per file for the 512x512 CT corpus file, read and write included).
The attribute list is Table E.1-1 as dicom-anonymizer 2.1.0 packages it; the check filled every
text attribute of the table with a value of its VR and compared after de-identification.

What this module adds to dicognito:

* the standard's own UIDs (under 1.2.840.10008: DCMR, context groups, coding schemes) put
  back where dicognito replaced them: they identify no one, and SR templates and codes are
  read by them;
* private attributes removed first (E.1: X unless the Retain Safe Private option; it also
  shortens dicognito's walk over vendor-heavy headers);
* every tag of Table E.1-1 dicognito left with its original value: X removed, Z (and X/Z,
  Z/D, X/Z/D) emptied, X/D removed, D given a dummy of its VR; X always removed, even when
  dicognito put a dummy in; curve data (50xx) and overlays (60xx: the table removes their data
  and comments, which leaves no valid overlay) removed; nested items too;
* sequences the table marks Z or X (alone or with /Z, /D) emptied (Z) or removed, whatever
  dicognito did inside their items (their code meanings and IDs name people and places);
* PatientBirthDate and PatientBirthTime emptied (dicognito only shifts them);
* the free text of SR content items (Text Value) replaced: the table marks Content Sequence
  D as a whole, which would leave a report without content; its items are kept instead, with
  names, dates, UIDs and text replaced;
* PatientIdentityRemoved "YES" ("NO" for burned-in pixels sent under allow_burned_in),
  DeidentificationMethod, and DeidentificationMethodCodeSequence
  with DCM 113100 (Basic Profile) and 113107 (Retain Longitudinal Temporal Information Modified
  Dates Option: dicognito shifts dates by one offset per secret rather than removing them).

Left as they are: bulk values the table marks D (Encapsulated Document, certificates, ...),
sequences marked D or U* (walked: their items are de-identified element by element), and pixel data
(burned-in text is refused through BurnedInAnnotation, not removed).
"""

from __future__ import annotations

import functools
import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forwarder.association import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from forwarder.basicprofile import ACTIONS, REMOVED_GROUP_MASKS
from forwarder.byteorder import swap_other_words
from forwarder.dicomfile import uid_problem
from forwarder.logs import one_line
from forwarder.lossy import mark_lossy
from forwarder.transformspec import (
    SYNTAXES,
    TransformFailed,
    TransformSpec,
    key_tag,
    template_fields,
)

if TYPE_CHECKING:
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset, FileMetaDataset

__all__ = [
    "SPLICE_HEAD_LIMIT",
    "Change",
    "Spliced",
    "TransformFailed",
    "Transformed",
    "preview",
    "splicable",
    "splice_head",
    "transform_file",
    "write_spliced",
]

LOGGER = logging.getLogger("forwarder.transform")

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
_PIXEL_DATA = 0x7FE00010
_FLOAT_PIXELS = (0x7FE00008, 0x7FE00009)  # Float / Double Float Pixel Data
DEIDENTIFICATION_METHOD = "PS3.15 E.1 Basic Profile, dates shifted (dicognito)"
_METHOD_CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
)
_EXTRA_ACTIONS = {0x0040A160: "D"}
"""Beyond Table E.1-1: Text Value (0040,A160), the free text of SR content items (the table
marks the whole Content Sequence D; its items are kept and this text replaced instead)."""
_DUMMIES = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "DS": "0",
    "IS": "0",
    "PN": "ANONYMOUS",
    "UR": "",
}
_DUMMY_TEXT = "ANONYMIZED"
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR",
     "UT"}
)  # fmt: skip


@dataclass(frozen=True)
class Change:
    """One top-level attribute changed by a transform."""

    key: str  # keyword, or "GGGG,EEEE" for a private or unknown tag
    old: str | None  # None: was absent
    new: str | None  # None: removed


@dataclass(frozen=True)
class Transformed:
    """The file a transform wrote and what it changed."""

    path: Path  # the Part 10 file written
    sop_instance_uid: str  # in the written file (new after de-identification)
    transfer_syntax: str  # the written file's transfer syntax UID
    changes: tuple[Change, ...]  # top-level attribute changes, UIDs included
    sop_class_uid: str = ""
    size: int = 0  # of the file written
    dataset_offset: int = 0  # where its data set starts (after preamble and file meta)


def transform_file(
    src: Path, dst: Path, spec: TransformSpec, secret: bytes, *, durable: bool = True
) -> Transformed:
    """Read `src`, apply `spec`, write the result as a Part 10 file at `dst`.

    Order: burned-in check, de-identification (keyed by `secret`), `set`, `remove`, then the
    transfer syntax. The file meta is rebuilt (SOP class and instance from the data set, the
    syntax written, this implementation's class UID). `dst` appears whole or not at all:
    the data goes to ``dst + ".part"``, is flushed to disk (`durable`; fsync costs ~0.5 ms
    on an SSD, more on a disk: pass False when a lost file is simply transformed again),
    then renamed.

    Raises
    ------
    TransformFailed
        Anything about the instance: unreadable data set, burned-in annotation, a value
        `set` cannot write, pixel data that cannot be decoded or encoded.
    OSError
        Reading `src` or writing `dst`.
    """
    out = _transformed(Path(src), spec, secret)
    dst = Path(dst)
    part = dst.with_name(dst.name + ".part")
    try:
        with open(part, "wb") as fp:
            fp.write(out.data)
            if durable:
                fp.flush()
                os.fsync(fp.fileno())
        os.replace(part, dst)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return Transformed(
        dst,
        out.sop_instance_uid,
        out.transfer_syntax,
        out.changes,
        out.sop_class_uid,
        len(out.data),
        _dataset_offset(out.data),
    )


def _dataset_offset(data: bytes) -> int:
    """Where the data set of a Part 10 file written here starts: after the file meta, whose
    group length (0002,0000) both writers put first."""
    import struct

    if data[132:140] != b"\x02\x00\x00\x00UL\x04\x00":
        raise ValueError("no file meta group length")  # cannot happen: both writers put it
    return 144 + int(struct.unpack_from("<L", data, 140)[0])


def preview(src: Path, spec: TransformSpec, secret: bytes) -> tuple[tuple[Change, ...], str]:
    """What `transform_file` would change in `src` and the transfer syntax it would write.

    Does the same work in memory (encoding included, so an encoder failure shows) and writes
    nothing. Raises TransformFailed and OSError as `transform_file` does.
    """
    out = _transformed(Path(src), spec, secret)
    return out.changes, out.transfer_syntax


# --- the pipeline ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Result:
    data: bytes  # the Part 10 file
    changes: tuple[Change, ...]
    transfer_syntax: str
    sop_instance_uid: str
    sop_class_uid: str


def _transformed(src: Path, spec: TransformSpec, secret: bytes) -> _Result:
    """The transformed file's bytes (encoded here, so that `preview` fails where
    `transform_file` would), its top-level changes, transfer syntax and SOP Instance UID.

    `set`/`remove` alone on a file kept in its transfer syntax splice the encoded file
    (`_splice`); everything else goes through pydicom (`_with_pydicom`).
    """
    if splicable(spec):
        out = io.BytesIO()
        try:
            spliced = _splice(src, spec, SYNTAXES[spec.transfer_syntax], meta=out)
        except (TransformFailed, OSError):
            raise
        except Exception as exc:  # the same one line pydicom's path gives
            LOGGER.debug(f"{src}: transform failed", exc_info=True)
            raise TransformFailed(f"cannot transform: {one_line(exc)}") from exc
        if spliced is not None:
            return _Result(
                out.getvalue(),
                spliced.changes,
                spliced.transfer_syntax,
                spliced.sop_instance_uid,
                spliced.sop_class_uid,
            )
    return _with_pydicom(src, spec, secret)


def _with_pydicom(src: Path, spec: TransformSpec, secret: bytes) -> _Result:
    """Decode `src` with pydicom, apply `spec`, encode the result."""
    from pydicom import dcmread

    try:
        ds = dcmread(src, force=True)
    except OSError:
        raise
    except Exception as exc:
        raise TransformFailed(f"cannot read the data set: {one_line(exc)}") from exc
    try:
        return _apply(ds, spec, secret)
    except (TransformFailed, OSError):
        raise
    except Exception as exc:  # anything else about this instance: one line, not a traceback
        LOGGER.debug(f"{src}: transform failed", exc_info=True)
        raise TransformFailed(f"cannot transform: {one_line(exc)}") from exc


def _apply(ds: Dataset, spec: TransformSpec, secret: bytes) -> _Result:
    source = _source_syntax(ds)
    try:
        before = _Snapshot(ds)
    except Exception as exc:  # a character set pydicom cannot read
        raise TransformFailed(f"cannot read the data set: {one_line(exc)}") from exc
    if spec.deidentify != "none":
        if not spec.allow_burned_in and _text(ds.get("BurnedInAnnotation")) == "YES":
            raise TransformFailed("burned-in annotation")
        try:
            _deidentify(ds, secret)
        except Exception as exc:
            raise TransformFailed(f"cannot de-identify: {one_line(exc)}") from exc
    for key, template in spec.set:
        _set(ds, key, template, before)
    for key in spec.remove:
        tag = key_tag(key)
        if tag in ds:
            del ds[tag]
    for name in ("SOPClassUID", "SOPInstanceUID"):
        if not _text(ds.get(name)):
            raise TransformFailed(f"the transformed data set has no {name}")
    syntax = _transcode(ds, source, spec.transfer_syntax)
    changes = before.changes(ds)  # before the encoder's own tweaks (ambiguous VRs)
    data = _encode(ds, syntax)
    return _Result(data, changes, syntax, str(ds.SOPInstanceUID), str(ds.SOPClassUID))


def _source_syntax(ds: Dataset) -> str:
    """The transfer syntax `ds` was read in (from its file meta, else from its encoding)."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return str(ts)
    implicit, little = ds.original_encoding
    if implicit:
        return IMPLICIT_LE
    return EXPLICIT_LE if little else EXPLICIT_BE


# --- changes --------------------------------------------------------------------------------


def _key(tag: int) -> str:
    from pydicom.datadict import keyword_for_tag

    return (not (tag >> 16) % 2 and keyword_for_tag(tag)) or f"{tag >> 16:04X},{tag & 0xFFFF:04X}"


def _text(elem: DataElement | Any | None) -> str | None:
    """An element (or value) as the text DICOM stores: multiple values joined with a
    backslash; a sequence as its item count, bulk data as its size; None when absent."""
    from pydicom.dataelem import DataElement
    from pydicom.multival import MultiValue
    from pydicom.sequence import Sequence

    if elem is None:
        return None
    value = elem.value if isinstance(elem, DataElement) else elem
    if value is None:
        return ""
    if isinstance(value, Sequence):
        return f"<{len(value)} items>"
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


class _Snapshot:
    """The top-level attributes of a data set as read, rendered as text only when asked.

    It keeps pydicom's raw elements (immutable, not yet decoded): an attribute whose raw
    element is still in place was never touched, so only what was converted or replaced is
    rendered and compared. Rendering every header element up front cost more than the rest
    of a set/remove transform (CT_small's ~250 elements: 8 of 20 ms).
    """

    def __init__(self, ds: Dataset) -> None:
        from pydicom.charset import convert_encodings
        from pydicom.dataelem import RawDataElement

        self._ds = ds
        self._encoding = convert_encodings(ds.get("SpecificCharacterSet") or "ISO_IR 6")
        self._items: dict[int, Any] = {}  # tag -> RawDataElement, or text when converted
        for tag in ds.keys():  # noqa: SIM118 (iterating a Dataset decodes every element)
            if tag != _PIXEL_DATA:
                item = ds.get_item(tag)
                self._items[int(tag)] = item if isinstance(item, RawDataElement) else _text(item)

    def text(self, tag: int) -> str | None:
        """The attribute's original value as text; None when it was absent."""
        from pydicom.dataelem import RawDataElement, convert_raw_data_element

        entry = self._items.get(tag)
        if not isinstance(entry, RawDataElement):
            return entry if entry is None else str(entry)
        try:
            elem = convert_raw_data_element(entry, encoding=self._encoding, ds=self._ds)
        except Exception as exc:  # shown, not fatal: the element is written back as read
            LOGGER.debug(f"{_key(tag)}: original value not readable ({one_line(exc)})")
            text = "<not readable>"
        else:
            text = _text(elem) or ""
        self._items[tag] = text
        return text

    def changes(self, ds: Dataset) -> tuple[Change, ...]:
        """The top-level attributes whose value differs in `ds` (the pixel data aside)."""
        tags = self._items.keys() | {int(tag) for tag in ds.keys()}  # noqa: SIM118
        tags.discard(_PIXEL_DATA)
        out = []
        for tag in sorted(tags):
            new = None
            if tag in ds:
                if ds.get_item(tag) is self._items.get(tag):
                    continue  # the raw element as read: untouched
                new = _text(ds[tag]) or ""
            old = self.text(tag)
            if old != new:
                out.append(Change(_key(tag), old, new))
        return tuple(out)


# --- set ------------------------------------------------------------------------------------


def _set(ds: Dataset, key: str, template: str, original: _Snapshot) -> None:
    """Set `key` in `ds` to `template` filled with the original values (``{Keyword}``)."""
    tag = key_tag(key)
    current = ds.get(tag)
    names = _charset_names(ds.get("SpecificCharacterSet"))
    elem, utf8 = _set_element(
        key, template, original.text, None if current is None else str(current.VR), names
    )
    if utf8:
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds[tag] = elem


def _set_element(
    key: str,
    template: str,
    original: Callable[[int], str | None],
    current_vr: str | None,
    charset: list[str],
) -> tuple[DataElement, bool]:
    """The element `set` writes for `key` (the VR the data set has it with, else the
    dictionary's, else LO), and whether the data set must now declare UTF-8.

    `original` gives an attribute's original value as text; `charset` is the data set's
    Specific Character Set, as a list of terms.
    """
    from pydicom.datadict import dictionary_has_tag, dictionary_VR, tag_for_keyword
    from pydicom.dataelem import DataElement
    from pydicom.valuerep import validate_value

    tag = key_tag(key)
    values = {
        name: original(tag_for_keyword(name) or 0) or "" for name in template_fields(template)
    }
    text = template.format_map(values)
    if current_vr is not None and current_vr not in ("UN", "OB"):
        vr = current_vr
    elif not (tag >> 16) % 2 and dictionary_has_tag(tag):
        vr = str(dictionary_VR(tag))
    else:
        vr = "LO"  # a private or unknown tag
    if vr not in _TEXT_VRS and vr != "UI":
        raise TransformFailed(f"cannot set {key}: the data set holds it with VR {vr}, not text")
    utf8 = _needs_utf8(key, text, charset)
    value: str | list[str] = (
        text.split("\\") if "\\" in text and vr not in ("LT", "ST", "UT", "UR") else text
    )
    try:
        for one in value if isinstance(value, list) else [value]:
            validate_value(vr, one, 2)  # 2: config.RAISE
    except ValueError as exc:
        raise TransformFailed(f"cannot set {key} to {text!r}: {one_line(exc)}") from exc
    return DataElement(tag, vr, value), utf8


def _charset_names(value: Any) -> list[str]:
    """A Specific Character Set value as its list of terms ([] when absent)."""
    if not value:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _needs_utf8(key: str, text: str, names: list[str]) -> bool:
    """Whether writing `text` needs the data set switched to UTF-8 (ISO_IR 192).

    ASCII fits everywhere. Non-ASCII text in a data set with the default repertoire needs
    UTF-8 (a superset of the default: its other values read the same); in a data set with a
    declared character set it must fit that set, or it is a TransformFailed naming both.
    """
    if text.isascii():
        return False
    from pydicom.charset import convert_encodings

    if not [name for name in names if name and name != "ISO_IR 6"]:
        return True
    for codec in convert_encodings(names):
        try:
            text.encode(codec)
            return False
        except (UnicodeError, LookupError):
            continue
    charset = "\\".join(names)
    raise TransformFailed(
        f"cannot set {key} to {text!r}: not representable in the data set's character set {charset}"
    )


# --- de-identification ----------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _anonymizer(secret: bytes) -> Any:
    from dicognito.anonymizer import Anonymizer

    return Anonymizer(seed=secret.hex())


def _deidentify(ds: Dataset, secret: bytes) -> None:
    """PS3.15 E.1 Basic profile in place (module docstring: what dicognito does, what we add)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    # private attributes first (by tag: pydicom's remove_private_tags decodes every element);
    # those inside sequence items go in `complete`
    for tag in [tag for tag in ds.keys() if tag >> 16 & 1]:  # noqa: SIM118 (no decoding)
        del ds[tag]
    # id(element) -> (element, value before dicognito); holding the element keeps its id unique
    originals: dict[int, tuple[DataElement, Any]] = {}

    def remember(_: Dataset, elem: DataElement) -> None:
        originals[id(elem)] = (elem, elem.value if elem.VR != "SQ" else None)

    ds.walk(remember)
    _anonymizer(secret).anonymize(ds)

    def complete(dataset: Dataset) -> None:
        for elem in list(dataset):
            tag = int(elem.tag)
            if tag >> 16 & 1:
                del dataset[tag]
                continue
            action = ACTIONS.get(tag) or _EXTRA_ACTIONS.get(tag)
            if elem.VR == "SQ" and action not in (None, "D") and "U" not in action:
                # Z, X (/Z, /D): its items are not walked but emptied or removed, as the
                # table says (code meanings naming a person or an institution, staff IDs)
                if "Z" in action:
                    elem.value = Sequence()
                else:
                    del dataset[tag]
                continue
            if elem.VR == "SQ":  # D or U*: kept, its items de-identified
                for item in elem.value:
                    complete(item)
            if elem.VR == "UI" and id(elem) in originals and "U" not in (action or ""):
                # (an instance's UIDs, U in the table, are replaced whatever their root)
                _keep_standard_uids(elem, originals[id(elem)][1])
            if action is None:
                if any(tag & mask == value for mask, value in REMOVED_GROUP_MASKS):
                    del dataset[tag]
                continue
            if action == "X":
                del dataset[tag]
                continue
            kept = id(elem) in originals and originals[id(elem)][1] == elem.value
            if action == "U" or not kept or elem.value in (None, "", b""):
                continue  # dicognito replaced it (UIDs always), or nothing to hide
            if "Z" in action:
                elem.value = (
                    Sequence() if elem.VR == "SQ" else ("" if _is_text(elem) else elem.value)
                )
            elif action == "X/D":
                del dataset[tag]
            elif _is_text(elem):  # D
                elem.value = _DUMMIES.get(str(elem.VR), _DUMMY_TEXT)

    complete(ds)
    for name in ("PatientBirthDate", "PatientBirthTime"):
        if name in ds:
            ds[name].value = ""
    # "removed from the attributes and the pixel data" (PS3.3): not true of pixels that carry
    # burned-in text (sent under allow_burned_in); the method below says what was done
    burned_in = _text(ds.get("BurnedInAnnotation")) == "YES"
    ds.PatientIdentityRemoved = "NO" if burned_in else "YES"
    ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
    codes = Sequence()
    for value, meaning in _METHOD_CODES:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = codes


_DICOM_ROOT = "1.2.840.10008."
"""The standard's own UIDs (mapping resources, context groups, coding schemes, ...)."""


def _keep_standard_uids(elem: DataElement, original: Any) -> None:
    """Put back the values under the DICOM root dicognito replaced in `elem` (it replaces
    every UI but class and transfer syntax UIDs): they name parts of the standard, never a
    patient, and an SR's template and codes are read by them."""
    from pydicom.multival import MultiValue

    if original is None:
        return
    before = list(original) if isinstance(original, MultiValue | list) else [original]
    after = list(elem.value) if isinstance(elem.value, MultiValue | list) else [elem.value]
    if len(before) != len(after) or not any(str(v).startswith(_DICOM_ROOT) for v in before):
        return
    values = [
        b if str(b).startswith(_DICOM_ROOT) else a for b, a in zip(before, after, strict=True)
    ]
    elem.value = values if len(values) > 1 else values[0]


def _is_text(elem: DataElement) -> bool:
    return str(elem.VR) in _TEXT_VRS


# --- set / remove by splicing ----------------------------------------------------------------


@dataclass(frozen=True)
class Spliced:
    """`set`/`remove` done on the head of an encoded file (`splice_head`): the data set is
    `head` followed by the source's bytes from `tail_at` to its end, unchanged."""

    head: bytes  # the changed data set up to `tail_at` (no preamble, no file meta)
    source: Path
    tail_at: int  # where the rest of the source, sent as it is, starts
    source_size: int  # the source's size when it was read
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    changes: tuple[Change, ...]

    @property
    def size(self) -> int:
        """The data set's size in bytes."""
        return len(self.head) + self.source_size - self.tail_at


SPLICE_HEAD_LIMIT = 1 << 20
"""The largest head `splice_head` keeps in memory (a header is a few KB; a `set` on an
attribute after the pixel data would put the pixels in the head)."""


def splicable(spec: TransformSpec) -> bool:
    """Whether `spec` is a `set`/`remove` that `splice_head` may do (it still declines files
    that do not qualify, see `_splice`)."""
    return spec.deidentify == "none" and SYNTAXES[spec.transfer_syntax] in (
        None,
        EXPLICIT_LE,
        IMPLICIT_LE,
        EXPLICIT_BE,
    )


def splice_head(src: Path, spec: TransformSpec, *, changes: bool = True) -> Spliced | None:
    """`set` and `remove` on `src`, reading only its head: the elements up to the last tag
    they touch; None when the file does not qualify (then `transform_file` does it).

    What `transform_file` writes, without a copy: the sender sends the head from memory and
    the rest (the pixel data) from the source, as it streams a file it does not change.
    Costs about what reading the header costs; no process, no spool file.

    Without `changes`, `Spliced.changes` is left empty (it costs a decode of every original
    value that changes; the sender does not show them).

    Raises TransformFailed (a value `set` cannot write, no SOP Instance UID) and OSError
    (reading `src`).
    """
    if not splicable(spec):
        return None
    stop = max([0x00080018, *(key_tag(k) for k, _ in spec.set), *map(key_tag, spec.remove)])
    try:
        return _splice(Path(src), spec, SYNTAXES[spec.transfer_syntax], stop=stop, changes=changes)
    except (TransformFailed, OSError):
        raise
    except Exception as exc:  # the same one line pydicom's path gives
        LOGGER.debug(f"{src}: transform failed", exc_info=True)
        raise TransformFailed(f"cannot transform: {one_line(exc)}") from exc


def write_spliced(spliced: Spliced, dst: Path) -> int:
    """Write what `spliced` stands for as a Part 10 file at `dst` (for a peer that needs it
    converted: the converter reads files); returns where its data set starts."""
    import shutil

    with open(dst, "wb") as out:
        _write_meta(out, spliced.sop_class_uid, spliced.sop_instance_uid, spliced.transfer_syntax)
        offset = out.tell()
        out.write(spliced.head)
        with open(spliced.source, "rb") as fp:
            fp.seek(spliced.tail_at)
            shutil.copyfileobj(fp, out)
    return offset


def _splice(
    src: Path,
    spec: TransformSpec,
    target: str | None,
    *,
    stop: int | None = None,
    meta: io.BytesIO | None = None,
    changes: bool = True,
) -> Spliced | None:
    """`set` and `remove` done on the encoded file: the elements they touch are encoded with
    pydicom, every other element is copied as it is; None when the file does not qualify.

    What pydicom's path writes, without decoding and re-encoding the whole data set (a
    64x64 CT: ~0.5 ms instead of ~4). Qualifies: a Part 10 file (preamble, DICM, file meta)
    in `target` (None: any) that is not deflated, whose top-level elements are in
    ascending tag order with no group lengths, and which walks to its end; with `stop` (a
    tag), only the elements up to the first one past `stop` are walked and changed, and
    the rest of the file is left as it is (`Spliced.tail_at`), and the head must stay under
    `SPLICE_HEAD_LIMIT`. With `meta`, the new preamble and file meta are written to it first
    and the head is written after them (the whole file, when `stop` is None).
    """
    from pydicom.charset import convert_encodings
    from pydicom.datadict import dictionary_has_tag, dictionary_VR
    from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
    from pydicom.tag import BaseTag

    from forwarder.dicomerrors import InvalidDicom
    from forwarder.elements import Reader, read_meta

    elements: dict[int, tuple[str | None, int, int, int, int]] = {}  # tag -> VR, offsets
    with open(src, "rb") as fp:
        size = os.fstat(fp.fileno()).st_size
        reader = Reader(fp, src, size)
        if size < 132 or reader.peek(132)[128:132] != b"DICM":
            return None
        reader.pos = 132
        try:
            header = read_meta(reader)
            syntax = header.get(0x00020010, b"").rstrip(b"\x00 ").decode("ascii")
            if not syntax or syntax == DEFLATED_LE or target not in (None, syntax):
                return None
            explicit, little = syntax != IMPLICIT_LE, syntax != EXPLICIT_BE
            body_at = reader.pos
            cut: int | None = None
            last = -1
            while reader.pos < size:
                start = reader.pos
                tag, vr, length = reader.header(explicit, little)
                if stop is not None and tag > stop:
                    cut = start  # this element and the rest go as they are
                    break
                value_at = reader.pos
                if tag <= last or not tag & 0xFFFF or tag >> 16 in (0x0002, 0xFFFE):
                    return None  # unsorted, group lengths, stray meta or items: pydicom's job
                if length == 0xFFFFFFFF:
                    reader.items(explicit and vr != b"UN", little or vr == b"UN", 1)
                else:
                    reader.skip(length)
                elements[tag] = (
                    vr.decode("ascii") if vr else None,
                    start,
                    value_at,
                    reader.pos,
                    length,
                )
                last = tag
                if stop is not None and reader.pos - body_at > SPLICE_HEAD_LIMIT:
                    return None  # the pixels before what changes: a copy does it
            if cut is None:
                cut = reader.pos
        except (InvalidDicom, UnicodeDecodeError):
            return None  # pydicom reads it, or says what is wrong in its words
        fp.seek(0)
        data = fp.read(cut)
    if len(data) != cut:
        return None  # shrank meanwhile: pydicom says what is wrong

    def raw(tag: int) -> RawDataElement:
        vr, _, value_at, end, length = elements[tag]
        return RawDataElement(
            BaseTag(tag), vr, length, data[value_at:end], value_at, not explicit, little
        )

    charset = _charset_names(
        convert_raw_data_element(raw(0x00080005)).value if 0x00080005 in elements else None
    )
    encodings = convert_encodings(charset or ["ISO_IR 6"])
    texts: dict[int, str | None] = {}

    def original(tag: int) -> str | None:
        if tag not in texts:
            try:
                texts[tag] = (
                    _text(convert_raw_data_element(raw(tag), encoding=encodings)) or ""
                    if tag in elements
                    else None
                )
            except Exception as exc:  # shown, not fatal: the element is copied as it is
                LOGGER.debug(f"{_key(tag)}: original value not readable ({one_line(exc)})")
                texts[tag] = "<not readable>"
        return texts[tag]

    mods: dict[int, DataElement | None] = {}  # tag -> its new element, None: removed
    for key, template in spec.set:
        tag = key_tag(key)
        current = mods.get(tag)
        current_vr: str | None = None
        if current is not None:
            current_vr = str(current.VR)
        elif tag in elements and explicit:
            current_vr = elements[tag][0]
        elif tag in elements and not (tag >> 16) % 2 and dictionary_has_tag(tag):
            current_vr = str(dictionary_VR(tag))  # as pydicom reads implicit VR
        elem, utf8 = _set_element(key, template, original, current_vr, charset)
        if utf8:
            charset = ["ISO_IR 192"]
            mods[0x00080005] = DataElement(0x00080005, "CS", "ISO_IR 192")
        mods[tag] = elem
    for key in spec.remove:
        tag = key_tag(key)
        if tag in elements:
            mods[tag] = None
        else:
            mods.pop(tag, None)

    uids = []
    for tag, name in ((0x00080016, "SOPClassUID"), (0x00080018, "SOPInstanceUID")):
        if tag in mods:
            uid = _text(mods[tag])
        elif tag in elements:  # UIDs are ASCII in every character set: no decoder needed
            _, _, value_at, end, _ = elements[tag]
            uid = data[value_at:end].rstrip(b"\x00 ").decode("ascii", "replace")
        else:
            uid = None
        if not uid:
            raise TransformFailed(f"the transformed data set has no {name}")
        uids.append(uid)

    changed = []
    for tag in sorted(mods) if changes else ():
        new = mods[tag]
        old, now = original(tag), None if new is None else _text(new) or ""
        if old != now and tag != _PIXEL_DATA:
            changed.append(Change(_key(tag), old, now))

    out = io.BytesIO() if meta is None else meta
    if meta is not None:
        _write_meta(out, uids[0], uids[1], syntax)
    head_at = out.tell()
    encoded = {
        tag: _encode_element(elem, explicit, little, convert_encodings(charset or ["ISO_IR 6"]))
        for tag, elem in mods.items()
        if elem is not None
    }
    added = sorted(tag for tag in encoded if tag not in elements)
    view = memoryview(data)
    for tag, (_, start, _, end, _) in elements.items():
        while added and added[0] < tag:
            out.write(encoded[added.pop(0)])
        if tag in encoded:
            out.write(encoded[tag])
        elif tag not in mods:
            out.write(view[start:end])
    for tag in added:
        out.write(encoded[tag])
    head = b"" if meta is not None else out.getvalue()[head_at:]
    return Spliced(head, src, cut, size, uids[0], uids[1], syntax, tuple(changed))


_SPACE_PADDED = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"}
)
_LONG_TEXT = frozenset({"UC", "UR", "UT"})  # explicit VR: 2 reserved bytes, 4-byte length


def _encode_element(elem: DataElement, explicit: bool, little: bool, encodings: Any) -> bytes:
    """`elem` encoded as pydicom's writer encodes it; an ASCII text value directly (the
    same bytes in every character set the standard allows: ~5x faster)."""
    import struct

    value, vr = elem.value, str(elem.VR)
    if isinstance(value, str) and vr in _SPACE_PADDED and value.isascii():
        raw = value.encode("ascii")
        raw += b" " * (len(raw) % 2)
        e = "<" if little else ">"
        tag = int(elem.tag)
        if not explicit:
            return struct.pack(e + "HHL", tag >> 16, tag & 0xFFFF, len(raw)) + raw
        if vr in _LONG_TEXT:
            return (
                struct.pack(e + "HH2sHL", tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(raw)) + raw
            )
        if len(raw) <= 0xFFFF:
            return struct.pack(e + "HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(raw)) + raw
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = not explicit, little
    try:
        write_data_element(fp, elem, encodings)
    except Exception as exc:
        raise TransformFailed(f"cannot encode {_key(int(elem.tag))}: {one_line(exc)}") from exc
    return fp.getvalue()


# --- transfer syntax ------------------------------------------------------------------------


def _name(uid: str) -> str:
    from pydicom.uid import UID

    u = UID(uid)
    return str(u.name) if u.is_valid and u.name != uid else uid


def _transcode(ds: Dataset, source: str, target_name: str) -> str:
    """Bring the pixel data of `ds` into `target_name`'s syntax; the syntax to write.

    Lossless only: a compressed source is decoded first (its lossy marks kept when its
    syntax is lossy), then encoded. An instance without pixel data is written in explicit VR
    little endian when a compressed syntax was asked for (or kept when already uncompressed
    little endian).
    """
    from pydicom.uid import UID

    target = SYNTAXES[target_name]
    if target is None or target == source:
        return source
    target_uid = UID(target)
    has_pixels = _PIXEL_DATA in ds
    floats = any(tag in ds for tag in _FLOAT_PIXELS)
    if target_uid.is_encapsulated and not has_pixels:
        if floats:
            raise TransformFailed(f"cannot encode as {_name(target)}: float pixel data")
        target = source if source in (IMPLICIT_LE, EXPLICIT_LE) else EXPLICIT_LE
        if target == source:
            return source
    if UID(source).is_encapsulated:
        _decompress(ds, source)
        source = EXPLICIT_LE
    elif source == EXPLICIT_BE:
        swap_other_words(ds, False)
    ds.file_meta.TransferSyntaxUID = UID(source if source != EXPLICIT_BE else EXPLICIT_LE)
    if target == SYNTAXES["jpeg2000-lossless"] and min(ds.Rows, ds.Columns) < 32:
        # pylibjpeg-openjpeg always uses 6 wavelet resolution levels: 2**5 pixels at least
        raise TransformFailed(
            f"cannot encode as {_name(target)}: {ds.Columns}x{ds.Rows} image is smaller than 32 "
            "pixels on a side (the encoder's minimum)"
        )
    if UID(target).is_encapsulated:
        _interleave_planes(ds)
        try:
            ds.compress(target, generate_instance_uid=False)
        except Exception as exc:
            raise TransformFailed(f"cannot encode as {_name(target)}: {one_line(exc)}") from exc
        if int(ds.get("SamplesPerPixel") or 1) > 1:
            # PS3.5 8.2: 0 for JPEG-LS and JPEG 2000; G.2: RLE segments are colour planes (1)
            ds.PlanarConfiguration = 1 if target == SYNTAXES["rle"] else 0
    else:
        ds.file_meta.TransferSyntaxUID = UID(target)
    return target


def _interleave_planes(ds: Dataset) -> None:
    """Reorder native pixel data stored colour-by-plane (Planar Configuration 1) to
    colour-by-pixel, the order pydicom's encoders read (they would take each plane for
    interleaved pixels: a scrambled image). Whole samples are moved, values untouched."""
    import numpy as np

    samples = int(ds.get("SamplesPerPixel") or 1)
    if samples < 2 or ds.get("PlanarConfiguration") != 1 or _PIXEL_DATA not in ds:
        return
    size = int(ds.BitsAllocated) // 8  # 8 or 16: colour data is never 1-bit
    frames = int(ds.get("NumberOfFrames") or 1)
    rows, columns = int(ds.Rows), int(ds.Columns)
    length = frames * samples * rows * columns * size
    data = bytes(ds.PixelData)
    if size < 1 or len(data) < length:
        return  # the encoder says what is wrong with it
    planes = np.frombuffer(data, np.uint8, length).reshape(frames, samples, rows, columns, size)
    pixels = planes.transpose(0, 2, 3, 1, 4).tobytes()
    ds.PixelData = pixels + b"\x00" * (len(pixels) % 2)
    ds.PlanarConfiguration = 0


def _decompress(ds: Dataset, source: str) -> None:
    from pydicom.encaps import generate_fragments

    try:
        compressed = sum(len(f) for f in generate_fragments(ds.PixelData))
    except Exception as exc:  # a malformed item: no ratio; decompress says what is wrong
        LOGGER.debug(f"no compression ratio for the lossy marks: {one_line(exc)}")
        compressed = None
    try:
        ds.decompress(generate_instance_uid=False)
    except Exception as exc:
        raise TransformFailed(
            f"cannot decode the pixel data ({_name(source)}): {one_line(exc)}"
        ) from exc
    mark_lossy(ds, source, compressed)


# --- writing --------------------------------------------------------------------------------


def _encode(ds: Dataset, syntax: str) -> bytes:
    """`ds` as a Part 10 file in `syntax`, with a new file meta (`_file_meta`). Raises
    TransformFailed when pydicom cannot encode a value."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import dcmwrite

    ds.file_meta = _file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax)
    ds.preamble = b"\x00" * 128
    buffer = DicomBytesIO()
    try:
        dcmwrite(buffer, ds, enforce_file_format=True)
    except Exception as exc:
        raise TransformFailed(f"cannot encode the data set: {one_line(exc)}") from exc
    return buffer.getvalue()


def _file_meta(sop_class: str, sop_instance: str, syntax: str) -> FileMetaDataset:
    """A new file meta: the SOP class and instance, `syntax`, and this implementation."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _write_meta(fp: Any, sop_class: str, sop_instance: str, syntax: str) -> None:
    """Write the preamble, DICM and the file meta `_file_meta` describes to `fp` (encoded by
    `forwarder.filemeta`; tests/test_transform.py compares it with pydicom's writer)."""
    from forwarder.filemeta import file_meta

    for value in (sop_class, sop_instance, syntax):
        if problem := uid_problem(value):
            raise TransformFailed(f"cannot write the file meta: UID {value!r}: {problem}")
    fp.write(file_meta(sop_class, sop_instance, syntax))
