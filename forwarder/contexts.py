"""Plan presentation contexts from the files themselves, at most 128 per association."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from forwarder.dicomfile import DEFLATED_LE, EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE

__all__ = [
    "MAX_CONTEXTS",
    "UNCOMPRESSED",
    "ContextSpec",
    "candidates",
    "contexts_for",
    "split_by_contexts",
]

MAX_CONTEXTS = 128
UNCOMPRESSED = (EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE)
# Syntaxes we can convert between without a codec (pynetdicom/pydicom re-encode the data set)
CONVERTIBLE = frozenset({EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE, DEFLATED_LE})


@dataclass(frozen=True)
class ContextSpec:
    """One proposed presentation context: an abstract syntax and its transfer syntaxes."""

    sop_class: str
    transfer_syntaxes: tuple[str, ...]


def contexts_for(
    sop_class: str, file_syntaxes: Iterable[str], restrict: str | None = None
) -> list[ContextSpec]:
    """Return the contexts to propose for one SOP class.

    By default: one context per transfer syntax the files of that class are in (each
    alone, so the peer cannot pick a different one, e.g. Deflated, for them), plus one
    fallback context for each uncompressed little endian syntax not proposed yet. The
    fallbacks are separate contexts too: offered together, the peer picks one (pynetdicom
    by its own preference, often implicit VR, which loses the VRs of private elements);
    offered apart, it accepts what it can and `candidates` picks explicit VR first.
    With `restrict` (``-xe``/``-xi``/``-xb``), only that syntax is proposed.
    """
    if restrict is not None:
        return [ContextSpec(sop_class, (restrict,))]
    own = sorted(set(file_syntaxes))
    specs = [ContextSpec(sop_class, (ts,)) for ts in own]
    specs.extend(
        ContextSpec(sop_class, (ts,)) for ts in (EXPLICIT_LE, IMPLICIT_LE) if ts not in own
    )
    return specs


def candidates(file_syntax: str, accepted: Sequence[str]) -> list[tuple[str, str]]:
    """Order the accepted syntaxes to send a file in, with how to get there.

    Returns ``(syntax, how)`` pairs, best first; `how` is ``"as is"`` (stream the file),
    ``"convert"`` (re-encode an uncompressed data set) or ``"decompress"`` (needs a codec).
    """
    out: list[tuple[str, str]] = []
    if file_syntax in accepted:
        out.append((file_syntax, "as is"))
    for ts in (EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE):
        if ts in accepted and ts != file_syntax:
            how = "convert" if file_syntax in CONVERTIBLE else "decompress"
            out.append((ts, how))
    if DEFLATED_LE in accepted and file_syntax != DEFLATED_LE and file_syntax in CONVERTIBLE:
        out.append((DEFLATED_LE, "convert"))
    return out


def split_by_contexts(
    pairs: Sequence[tuple[str, str]], restrict: str | None = None, limit: int = MAX_CONTEXTS
) -> list[list[ContextSpec]]:
    """Group the (SOP class, transfer syntax) pairs of a set of files into associations.

    Every group needs at most `limit` contexts; the contexts of one SOP class never
    straddle two groups. Order follows the first appearance of each SOP class.
    """
    by_class: dict[str, list[str]] = {}
    for sop_class, ts in pairs:
        by_class.setdefault(sop_class, [])
        if ts not in by_class[sop_class]:
            by_class[sop_class].append(ts)
    groups: list[list[ContextSpec]] = []
    current: list[ContextSpec] = []
    for sop_class, syntaxes in by_class.items():
        specs = contexts_for(sop_class, syntaxes, restrict)
        if len(specs) > limit:  # absurd: more syntaxes than contexts for one class
            specs = specs[:limit]
        if len(current) + len(specs) > limit:
            groups.append(current)
            current = []
        current.extend(specs)
    if current:
        groups.append(current)
    return groups
