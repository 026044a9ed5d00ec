"""Tests for forwarder.contexts: contexts per SOP class, send candidates, the 128 split."""

from __future__ import annotations

import random

import pytest
from pydicom.uid import UID
from sopclasses import MISPRINTS, SEED_STORAGE_CLASSES

from forwarder.contexts import (
    MAX_CONTEXTS,
    ContextSpec,
    candidates,
    contexts_for,
    split_by_contexts,
)
from forwarder.dicomfile import DEFLATED_LE, EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
J2K = "1.2.840.10008.1.2.4.91"
JLS = "1.2.840.10008.1.2.4.80"
RLE = "1.2.840.10008.1.2.5"
ALL_UNCOMPRESSED = [EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE]
LE = (EXPLICIT_LE, IMPLICIT_LE)
AS_IS, CONVERT, DECOMPRESS = "as is", "convert", "decompress"


def test_contexts_for_one_syntax_each_plus_separate_fallbacks() -> None:
    specs = contexts_for(CT, [J2K, J2K])
    assert specs == [
        ContextSpec(CT, (J2K,)),
        ContextSpec(CT, (EXPLICIT_LE,)),
        ContextSpec(CT, (IMPLICIT_LE,)),
    ]


def test_contexts_for_own_uncompressed_syntaxes_leave_no_duplicate_fallback() -> None:
    specs = contexts_for(MR, [EXPLICIT_LE, IMPLICIT_LE])
    assert specs == [ContextSpec(MR, (IMPLICIT_LE,)), ContextSpec(MR, (EXPLICIT_LE,))]
    specs = contexts_for(MR, [EXPLICIT_LE])
    assert specs == [ContextSpec(MR, (EXPLICIT_LE,)), ContextSpec(MR, (IMPLICIT_LE,))]
    specs = contexts_for(MR, [EXPLICIT_BE, DEFLATED_LE])
    assert specs == [
        ContextSpec(MR, (DEFLATED_LE,)),
        ContextSpec(MR, (EXPLICIT_BE,)),
        ContextSpec(MR, (EXPLICIT_LE,)),
        ContextSpec(MR, (IMPLICIT_LE,)),
    ]


def test_every_syntax_is_alone_in_its_context() -> None:
    """The peer must not pick for us: not Deflated for a file, not implicit for a fallback."""
    specs = contexts_for(CT, [J2K, JLS, RLE, EXPLICIT_BE])
    assert all(len(s.transfer_syntaxes) == 1 for s in specs)
    assert {s.transfer_syntaxes[0] for s in specs} == {J2K, JLS, RLE, EXPLICIT_BE, *LE}


@pytest.mark.parametrize("restrict", [EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE])
def test_contexts_for_restricted(restrict: str) -> None:
    assert contexts_for(CT, [J2K, EXPLICIT_LE], restrict) == [ContextSpec(CT, (restrict,))]


@pytest.mark.parametrize(
    ("file_ts", "accepted", "expected"),
    [
        # as is first, then conversions in the order explicit LE, implicit LE, big endian
        (
            EXPLICIT_LE,
            [*ALL_UNCOMPRESSED, DEFLATED_LE],
            [
                (EXPLICIT_LE, "as is"),
                (IMPLICIT_LE, "convert"),
                (EXPLICIT_BE, "convert"),
                (DEFLATED_LE, "convert"),
            ],
        ),
        (IMPLICIT_LE, [EXPLICIT_LE], [(EXPLICIT_LE, "convert")]),
        (EXPLICIT_BE, [IMPLICIT_LE], [(IMPLICIT_LE, "convert")]),
        (
            EXPLICIT_BE,
            [EXPLICIT_BE, EXPLICIT_LE],
            [(EXPLICIT_BE, "as is"), (EXPLICIT_LE, "convert")],
        ),
        (
            DEFLATED_LE,
            [EXPLICIT_LE, IMPLICIT_LE],
            [(EXPLICIT_LE, "convert"), (IMPLICIT_LE, "convert")],
        ),
        (DEFLATED_LE, [DEFLATED_LE], [(DEFLATED_LE, "as is")]),
        (J2K, [J2K, EXPLICIT_LE], [(J2K, "as is"), (EXPLICIT_LE, "decompress")]),
        (
            J2K,
            [IMPLICIT_LE, EXPLICIT_LE],
            [(EXPLICIT_LE, "decompress"), (IMPLICIT_LE, "decompress")],
        ),
        (J2K, [DEFLATED_LE], []),  # never compress-then-deflate
        (J2K, [JLS], []),  # no transcoding between compressed syntaxes
        (EXPLICIT_LE, [], []),
    ],
)
def test_candidates(file_ts: str, accepted: list[str], expected: list[tuple[str, str]]) -> None:
    assert candidates(file_ts, accepted) == expected


def _pairs(n_classes: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    syntaxes = [EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE, DEFLATED_LE, J2K, JLS, RLE]
    classes = [*SEED_STORAGE_CLASSES, *(f"1.2.826.0.1.3680043.9.9999.{i}" for i in range(60))]
    pairs = []
    for cls in classes[:n_classes]:
        for ts in rng.sample(syntaxes, rng.randint(1, 4)):
            pairs.extend([(cls, ts)] * rng.randint(1, 3))
    rng.shuffle(pairs)
    return pairs


@pytest.mark.parametrize("restrict", [None, EXPLICIT_LE])
@pytest.mark.parametrize(("n_classes", "seed"), [(1, 0), (40, 1), (157, 2), (217, 3)])
def test_split_never_exceeds_128_and_never_straddles_a_class(
    n_classes: int, seed: int, restrict: str | None
) -> None:
    pairs = _pairs(n_classes, seed)
    groups = split_by_contexts(pairs, restrict)
    assert groups and all(0 < len(g) <= MAX_CONTEXTS for g in groups)
    owner: dict[str, int] = {}
    for n, group in enumerate(groups):
        for spec in group:
            assert owner.setdefault(spec.sop_class, n) == n, f"{spec.sop_class} straddles"
    # every class present, every (class, syntax) proposed in a context of its own class
    assert set(owner) == {cls for cls, _ in pairs}
    for cls, ts in pairs:
        proposed = {
            t for s in groups[owner[cls]] if s.sop_class == cls for t in s.transfer_syntaxes
        }
        assert (restrict or ts) in proposed
    # no context proposed twice
    flat = [spec for group in groups for spec in group]
    assert len(flat) == len(set(flat))
    # order follows the first appearance of each class
    first_seen = list(dict.fromkeys(cls for cls, _ in pairs))
    assert list(dict.fromkeys(spec.sop_class for spec in flat)) == first_seen


def test_split_fills_groups_up_to_the_limit() -> None:
    pairs = [(cls, EXPLICIT_LE) for cls in SEED_STORAGE_CLASSES]  # 2 contexts per class
    groups = split_by_contexts(pairs)
    assert [len(g) for g in groups] == [128, 128, 2 * 157 - 256]
    groups = split_by_contexts(pairs, limit=5)  # odd limit: 2 + 2, never half a class
    assert all(len(g) == 4 for g in groups[:-1])


def test_split_of_nothing() -> None:
    assert split_by_contexts([]) == []


def test_seed_storage_classes_are_all_known_to_pydicom() -> None:
    assert len(SEED_STORAGE_CLASSES) == len(set(SEED_STORAGE_CLASSES)) == 157
    for uid in SEED_STORAGE_CLASSES:
        assert UID(uid).is_valid and UID(uid).name != uid, uid
        assert "Storage" in UID(uid).name, uid
    for wrong, right in MISPRINTS.items():
        assert UID(wrong).name == wrong  # unknown: not a real class
        assert right in SEED_STORAGE_CLASSES and wrong not in SEED_STORAGE_CLASSES
    assert UID(MISPRINTS["1.2.840.10008.5.1.4.1.1.1.1.1.1"]).name == (
        "Digital X-Ray Image Storage - For Processing"
    )
    assert UID(MISPRINTS["1.2.840.10008.5.1.1.4.1.1.3.1"]).name == (
        "Digital Intra-Oral X-Ray Image Storage - For Processing"
    )
