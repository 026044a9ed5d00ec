"""Tests for forwarder.filing: files leave the inbox durably and never overwrite anything."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from forwarder import filing
from forwarder.sidecar import Sidecar

NOW = 1_795_000_000.0  # a whole second: a sidecar keeps times to the second
INVALID = Sidecar.invalid("not DICOM", NOW)


def write(path: Path, data: bytes = b"data") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("path", "roots", "expected"),
    [
        ("/in/a/b.dcm", ["/in"], "a/b.dcm"),
        ("/in/b.dcm", ["/in"], "b.dcm"),
        ("/in/deep/x/c.dcm", ["/in", "/in/deep"], "x/c.dcm"),  # the deepest root wins
        ("/in/deep/x/c.dcm", ["/in/deep", "/in"], "x/c.dcm"),
        ("/other/d.dcm", ["/in"], "d.dcm"),  # under no root: its name
        ("/in2/e.dcm", ["/in"], "e.dcm"),  # a prefix of the name is not a parent
    ],
)
def test_relative_path(path: str, roots: list[str], expected: str) -> None:
    assert filing.relative_path(Path(path), [Path(r) for r in roots]) == Path(expected)


def test_unique_target_never_reuses_a_name(tmp_path: Path) -> None:
    rel = Path("s/x.dcm")
    assert filing.unique_target(tmp_path, rel) == tmp_path / "s/x.dcm"
    write(tmp_path / "s/x.dcm")
    assert filing.unique_target(tmp_path, rel) == tmp_path / "s/x.1.dcm"
    write(tmp_path / "s/x.1.dcm.json")  # an orphan sidecar holds its name too
    assert filing.unique_target(tmp_path, rel) == tmp_path / "s/x.2.dcm"


def test_unique_target_without_suffix(tmp_path: Path) -> None:
    write(tmp_path / "IM0001")
    assert filing.unique_target(tmp_path, Path("IM0001")) == tmp_path / "IM0001.1"


def test_move_durably_same_file_system(tmp_path: Path) -> None:
    src = write(tmp_path / "in/a.dcm", b"payload")
    dst = tmp_path / "out/deep/a.dcm"
    filing.move_durably(src, dst)
    assert not src.exists()
    assert dst.read_bytes() == b"payload"


def test_move_durably_never_overwrites(tmp_path: Path) -> None:
    src = write(tmp_path / "a.dcm", b"new")
    dst = write(tmp_path / "b.dcm", b"old")
    with pytest.raises(FileExistsError):
        filing.move_durably(src, dst)
    assert src.read_bytes() == b"new"
    assert dst.read_bytes() == b"old"


def test_move_durably_copies_across_file_systems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_link(src: object, dst: object, **kw: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(filing.os, "link", no_link)
    src = write(tmp_path / "a.dcm", b"x" * 100_000)
    dst = tmp_path / "other/a.dcm"
    filing.move_durably(src, dst)
    assert not src.exists()
    assert dst.read_bytes() == b"x" * 100_000
    assert sorted(p.name for p in dst.parent.iterdir()) == ["a.dcm"]  # no temporary left


def test_a_symlink_is_moved_as_a_link_never_copied_across_file_systems(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system (/dev/shm) here")
    link = tmp_path / "passwd.dcm"
    link.symlink_to("/etc/passwd")  # os.link refuses (EXDEV); a copy must not follow it
    dst = shm / f"forwarder-test-{os.getpid()}" / "passwd.dcm"
    try:
        filing.move_durably(link, dst)
        assert not os.path.lexists(link)
        assert dst.is_symlink() and os.readlink(dst) == "/etc/passwd"
    finally:
        shutil.rmtree(dst.parent, ignore_errors=True)


def test_move_durably_to_a_real_other_file_system(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system (/dev/shm) here")
    src = write(tmp_path / "a.dcm", b"cross")
    dst = shm / f"forwarder-test-{os.getpid()}" / "a.dcm"
    try:
        filing.move_durably(src, dst)
        assert not src.exists()
        assert dst.read_bytes() == b"cross"
    finally:
        if dst.exists():
            dst.unlink()
        if dst.parent.exists():
            dst.parent.rmdir()


def test_failed_copy_leaves_the_source_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_link(src: object, dst: object, **kw: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def full(src: object, dst: object, **kw: object) -> None:
        Path(str(dst)).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filing.os, "link", no_link)
    monkeypatch.setattr(filing, "_copy_new", full)
    src = write(tmp_path / "a.dcm", b"whole")
    dst = tmp_path / "out/a.dcm"
    with pytest.raises(OSError) as info:
        filing.move_durably(src, dst)
    assert info.value.errno == errno.ENOSPC
    assert src.read_bytes() == b"whole"
    assert list(dst.parent.iterdir()) == []


def test_archive_keeps_the_relative_path(tmp_path: Path) -> None:
    inbox, archive = tmp_path / "in", tmp_path / "sent"
    first = write(inbox / "p/s/a.dcm", b"1")
    target = filing.archive(first, [inbox], archive)
    assert target == archive / "p/s/a.dcm"
    second = write(inbox / "p/s/a.dcm", b"2")  # the same name again
    target2 = filing.archive(second, [inbox], archive)
    assert target2 == archive / "p/s/a.1.dcm"
    assert (target.read_bytes(), target2.read_bytes()) == (b"1", b"2")


def test_delete_tolerates_a_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path / "a.dcm")
    filing.delete(path)
    assert not path.exists()
    filing.delete(path)


def test_quarantine_writes_a_sidecar_and_never_overwrites(tmp_path: Path) -> None:
    inbox, qdir = tmp_path / "in", tmp_path / "q"
    src = write(inbox / "sub/a.dcm", b"bad")
    target = filing.quarantine(src, [inbox], qdir, Sidecar.invalid("rejected", NOW))
    assert target == qdir / "sub/a.dcm"
    assert not src.exists()
    side = Sidecar.read(Path(f"{target}.json"))
    assert side == Sidecar.invalid("rejected", NOW).placed(src, target)
    assert side.original_path == str(src) and side.quarantined_path == str(target)
    again = write(inbox / "sub/a.dcm", b"bad again")
    target2 = filing.quarantine(again, [inbox], qdir, Sidecar.invalid("twice", NOW))
    assert target2 == qdir / "sub/a.1.dcm"
    assert target.read_bytes() == b"bad"
    assert Sidecar.read(Path(f"{target2}.json")).reason == "twice"
    leftovers = [p.name for p in (qdir / "sub").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_quarantine_of_a_vanished_file_leaves_no_sidecar(tmp_path: Path) -> None:
    qdir = tmp_path / "q"
    with pytest.raises(FileNotFoundError):
        filing.quarantine(tmp_path / "in/gone.dcm", [tmp_path / "in"], qdir, INVALID)
    assert not any(p.is_file() for p in qdir.rglob("*"))


def test_unwritable_quarantine_raises_and_keeps_the_file(tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    qdir = tmp_path / "q"
    qdir.write_text("a file where the folder should be")
    src = write(inbox / "sub/a.dcm", b"keep me")
    with pytest.raises(OSError):
        filing.quarantine(src, [inbox], qdir, INVALID)
    assert src.read_bytes() == b"keep me"
    top = write(inbox / "b.dcm", b"me too")
    with pytest.raises(OSError):
        filing.quarantine(top, [inbox], qdir, INVALID)
    assert top.exists()


def test_write_json_durably_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    filing.write_json_durably(path, {"b": 1, "a": [None]})
    assert path.read_text() == '{\n  "a": [\n    null\n  ],\n  "b": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
