"""Routing rules: the matcher table-driven, and the rule keys and globs config check refuses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from forwarder.config import ConfigError, load_settings
from forwarder.routing import Router, path_pattern

MODALITY = 0x00080060
SERIES = 0x0008103E
STATION = 0x00081010
IMAGE_TYPE = 0x00080008
PRIVATE = 0x00091001

CT = {"Modality": ["CT", "PT"]}

# (match, exclude, attributes, relpath, wanted?, first failing rule)
CASES: list[tuple[dict[str, Any], dict[str, Any], dict[int, tuple[str, ...]], str, str | None]] = [
    # no rules: every instance
    ({}, {}, {}, "a.dcm", None),
    # one glob, a list of globs
    ({"Modality": "CT"}, {}, {MODALITY: ("CT",)}, "a.dcm", None),
    (CT, {}, {MODALITY: ("PT",)}, "a.dcm", None),
    (CT, {}, {MODALITY: ("MR",)}, "a.dcm", "Modality 'MR' does not match ['CT', 'PT']"),
    ({"Modality": "CT"}, {}, {MODALITY: ("MR",)}, "a.dcm", "Modality 'MR' does not match 'CT'"),
    # case-sensitive, as DICOM values are
    ({"Modality": "ct"}, {}, {MODALITY: ("CT",)}, "a.dcm", "Modality 'CT' does not match 'ct'"),
    # a rule on an attribute the file lacks does not match
    (CT, {}, {}, "a.dcm", "Modality is absent (match ['CT', 'PT'])"),
    # an exclude rule on an absent attribute excludes nothing
    ({}, {"SeriesDescription": "*SCOUT*"}, {}, "a.dcm", None),
    # every match key must match: the first that fails is named
    (
        {"Modality": "CT", "StationName": "CT-*"},
        {},
        {MODALITY: ("CT",), STATION: ("MR-2",)},
        "a.dcm",
        "StationName 'MR-2' does not match 'CT-*'",
    ),
    (
        {"Modality": "CT", "StationName": "CT-*"},
        {},
        {MODALITY: ("CT",), STATION: ("CT-1",)},
        "a",
        None,
    ),
    # any exclude key excludes
    (
        CT,
        {"SeriesDescription": ["*SCOUT*", "*LOCALIZER*"]},
        {MODALITY: ("CT",), SERIES: ("AX LOCALIZER",)},
        "a.dcm",
        "SeriesDescription 'AX LOCALIZER' is excluded by ['*SCOUT*', '*LOCALIZER*']",
    ),
    (CT, {"SeriesDescription": "*SCOUT*"}, {MODALITY: ("CT",), SERIES: ("AX 5mm",)}, "a", None),
    # multi-valued: any value matches
    ({"ImageType": "LOCALIZER"}, {}, {IMAGE_TYPE: ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "a", None),
    (
        {"ImageType": "AXIAL"},
        {},
        {IMAGE_TYPE: ("ORIGINAL", "PRIMARY")},
        "a",
        "ImageType 'ORIGINAL\\\\PRIMARY' does not match 'AXIAL'",
    ),
    ({}, {"ImageType": "LOCALIZER"}, {IMAGE_TYPE: ("DERIVED", "LOCALIZER")}, "a", "excluded"),
    # a tag instead of a keyword, a private tag
    ({"0008,0060": "CT"}, {}, {MODALITY: ("CT",)}, "a.dcm", None),
    ({"(0009,1001)": "X*"}, {}, {PRIVATE: ("XYZ",)}, "a.dcm", None),
    # the path relative to the watched folder: * stays in a folder, ** spans folders
    ({"path": "siteA/**"}, {}, {}, "siteA/x/y/a.dcm", None),
    ({"path": "siteA/**"}, {}, {}, "siteB/a.dcm", "path 'siteB/a.dcm' does not match 'siteA/**'"),
    ({"path": "siteA/*.dcm"}, {}, {}, "siteA/a.dcm", None),
    ({"path": "siteA/*.dcm"}, {}, {}, "siteA/x/a.dcm", "does not match"),
    ({"path": "**/ct/*"}, {}, {}, "ct/a.dcm", None),
    ({"path": "**/ct/*"}, {}, {}, "x/y/ct/a.dcm", None),
    ({}, {"path": "**/.trash/**"}, {}, "a/.trash/b.dcm", "excluded"),
    # an empty value is a value: "" matches it, a pattern does not
    ({"StationName": ""}, {}, {STATION: ("",)}, "a", None),
    ({"StationName": "?*"}, {}, {STATION: ("",)}, "a", "StationName '' does not match '?*'"),
]


@pytest.mark.parametrize(("match", "exclude", "attributes", "relpath", "why"), CASES)
def test_route(
    match: dict[str, Any],
    exclude: dict[str, Any],
    attributes: dict[int, tuple[str, ...]],
    relpath: str,
    why: str | None,
) -> None:
    router = Router.build([("dest", match, exclude), ("all", {}, {})])
    decision = router.route(attributes, relpath)
    if why is None:
        assert decision.destinations == ("dest", "all")
        assert decision.why_not == {}
    else:
        assert decision.destinations == ("all",)
        assert why in decision.why_not["dest"]


def test_tags_are_what_the_rules_name_and_nothing_without_rules() -> None:
    router = Router.build(
        [("a", {"Modality": "CT", "path": "x/**"}, {"SeriesDescription": "*"}), ("b", {}, {})]
    )
    assert router.tags == {MODALITY, SERIES}
    assert router.has_rules
    plain = Router.build([("a", {}, {}), ("b", {}, {})])
    assert plain.tags == frozenset() and not plain.has_rules
    assert plain.route({}, "x").destinations == ("a", "b")


def test_no_destination_wants_it_names_every_first_failure() -> None:
    router = Router.build([("ct", CT, {}), ("mr", {"Modality": "MR"}, {})], "dispose")
    decision = router.route({MODALITY: ("US",)}, "a.dcm")
    assert decision.destinations == ()
    assert decision.why_not == {
        "ct": "Modality 'US' does not match ['CT', 'PT']",
        "mr": "Modality 'US' does not match 'MR'",
    }
    assert router.unmatched == "dispose"


@pytest.mark.parametrize(
    ("glob", "path", "hit"),
    [
        ("a/**", "a/b", True),
        ("a/**", "a", False),
        ("a/**/b", "a/b", True),
        ("a/**/b", "a/x/y/b", True),
        ("*.dcm", "x/a.dcm", False),
        ("**.dcm", "x/a.dcm", True),
        ("a/?.dcm", "a/1.dcm", True),
        ("a/[0-9].dcm", "a/7.dcm", True),
        ("a/[!0-9].dcm", "a/7.dcm", False),
    ],
)
def test_path_globs(glob: str, path: str, hit: bool) -> None:
    import re

    assert bool(re.match(path_pattern(glob), path)) is hit


# -- the settings --------------------------------------------------------------------------


def _config(tmp_path: Path, rules: str, top: str = "") -> Path:
    cfg = tmp_path / "forwarder.toml"
    cfg.write_text(
        f"""{top}
[[destinations]]
name = "ct-archive"
host = "127.0.0.1"
port = 104
{rules}
""",
        encoding="utf-8",
    )
    return cfg


def _errors(cfg: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env={})
    return info.value.errors


def test_the_issues_example_loads(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        """
[destinations.match]
Modality = ["CT", "PT"]
StationName = "CT-*"
path = "siteA/**"
"0009,1001" = "X*"
[destinations.exclude]
SeriesDescription = ["*SCOUT*", "*LOCALIZER*"]
""",
        top='[routing]\nunmatched = "dispose"\n',
    )
    settings = load_settings(cfg, env={})
    dest = settings.destinations[0]
    assert dest.match["StationName"] == ["CT-*"]
    assert settings.routing.unmatched == "dispose"
    router = Router.of(settings)
    assert router.tags == {MODALITY, STATION, PRIVATE, SERIES}


def test_routing_defaults_to_quarantine_and_every_instance(tmp_path: Path) -> None:
    settings = load_settings(_config(tmp_path, ""), env={})
    assert settings.routing.unmatched == "quarantine"
    assert not Router.of(settings).has_rules


@pytest.mark.parametrize(
    ("rules", "named", "says"),
    [
        ('match = { Modalty = "CT" }', "destinations.0.match.Modalty", "not a DICOM keyword"),
        ('match = { "0008,006" = "CT" }', "destinations.0.match.0008,006", "not a DICOM keyword"),
        ('match = { Rows = "512" }', "destinations.0.match.Rows", "VR US"),
        ('exclude = { ReferencedImageSequence = "x" }', "destinations.0.exclude.Refer", "VR SQ"),
        ('match = { PixelData = "x" }', "destinations.0.match.PixelData", "VR OB or OW"),
        ('match = { TransferSyntaxUID = "1.2*" }', "destinations.0.match.Transfer", "file meta"),
        ('match = { Modality = "C[T" }', "destinations.0.match.Modality.0", "'C[T'"),
        ("match = { Modality = [] }", "destinations.0.match.Modality", "at least 1"),
        ("match = { Modality = 1 }", "destinations.0.match.Modality", ""),
    ],
)
def test_bad_rules_are_refused_by_name(tmp_path: Path, rules: str, named: str, says: str) -> None:
    errors = _errors(_config(tmp_path, rules))
    assert any(e.startswith(named) and says in e for e in errors), errors


def test_every_bad_rule_gets_its_own_line(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        'match = { Modalty = "CT", Rows = "1", Modality = "C[T" }',
        top='[routing]\nunmatched = "drop"\n',
    )
    errors = _errors(cfg)
    assert len(errors) == 4, errors
    assert errors[-1].startswith("routing.unmatched:")


# -- [destinations.transform] in the config --------------------------------------------------


def test_the_issues_transform_example_loads(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        """
[destinations.transform]
set = { InstitutionName = "Gateway A", PatientID = "SITE1-{PatientID}" }
remove = ["OtherPatientIDs", "0009,1001"]
deidentify = "basic"
transfer_syntax = "jpeg-ls-lossless"
""",
        top="[transform]\nworkers = 3\n",
    )
    settings = load_settings(cfg, env={})
    spec = settings.destinations[0].transform_spec
    assert spec is not None
    assert spec.set == (("InstitutionName", "Gateway A"), ("PatientID", "SITE1-{PatientID}"))
    assert spec.remove == ("OtherPatientIDs", "0009,1001")
    assert (spec.deidentify, spec.transfer_syntax, spec.allow_burned_in) == (
        "basic",
        "jpeg-ls-lossless",
        False,
    )
    assert settings.transform.pool_size == 3


def test_a_transform_that_changes_nothing_keeps_the_streaming_path(tmp_path: Path) -> None:
    cfg = _config(tmp_path, '[destinations.transform]\ntransfer_syntax = "keep"\n')
    settings = load_settings(cfg, env={})
    assert settings.destinations[0].transform is not None
    assert settings.destinations[0].transform_spec is None
    assert settings.transform.pool_size == (os.cpu_count() or 1)


@pytest.mark.parametrize(
    ("table", "named", "says"),
    [
        ('set = { PatientNme = "x" }', "destinations.0.transform.set.PatientNme", "keyword"),
        ('set = { Rows = "1" }', "destinations.0.transform.set.Rows", "VR US"),
        ('set = { SOPInstanceUID = "1.2" }', "destinations.0.transform.set.SOPInstance", "what"),
        ('set = { PatientID = "X-{PatientNme}" }', "destinations.0.transform.set.PatientID", "{"),
        ('set = { PatientID = "X-{PatientID" }', "destinations.0.transform.set.PatientID", ""),
        ('remove = ["SOPClassUID"]', "destinations.0.transform.remove.0", "cannot be removed"),
        ('remove = ["0002,0010"]', "destinations.0.transform.remove.0", "file meta"),
        ('deidentify = "full"', "destinations.0.transform.deidentify", "'none' or 'basic'"),
        ('transfer_syntax = "jpeg"', "destinations.0.transform.transfer_syntax", "jpeg-ls"),
        ("allow_burned_in = 2", "destinations.0.transform.allow_burned_in", ""),
        ('sett = { PatientID = "x" }', "destinations.0.transform.sett", "not permitted"),
    ],
)
def test_bad_transforms_are_refused_by_name(
    tmp_path: Path, table: str, named: str, says: str
) -> None:
    errors = _errors(_config(tmp_path, f"[destinations.transform]\n{table}\n"))
    assert any(e.startswith(named) and says in e for e in errors), errors


def test_transform_workers_must_be_a_positive_number(tmp_path: Path) -> None:
    errors = _errors(_config(tmp_path, "", top="[transform]\nworkers = 0\n"))
    assert any(e.startswith("transform.workers") for e in errors), errors


def test_config_check_names_a_bad_transform_and_exits_78(tmp_path: Path) -> None:
    cfg = _config(tmp_path, '[destinations.transform]\nremove = ["Modalty"]\n')
    res = subprocess.run(
        [sys.executable, "-m", "forwarder", "config", "check", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 78
    assert "destinations.0.transform.remove.0" in res.stderr and "Modalty" in res.stderr
