"""Move files out of the inbox durably: archive, delete, or quarantine with a JSON sidecar."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # forwarder.sidecar builds on this module: no import cycle at run time
    from forwarder.sidecar import Sidecar

__all__ = [
    "SIDECAR_SUFFIX",
    "archive",
    "delete",
    "fsync_dir",
    "move_durably",
    "quarantine",
    "relative_path",
    "unique_target",
    "write_json_durably",
]

SIDECAR_SUFFIX = ".json"


def relative_path(path: Path, roots: Sequence[Path]) -> Path:
    """`path` relative to the watched root it lies under (its name alone if under none)."""
    for root in sorted(roots, key=lambda r: len(r.parts), reverse=True):
        with contextlib.suppress(ValueError):
            return path.relative_to(root)
    return Path(path.name)


def unique_target(directory: Path, rel: Path) -> Path:
    """``directory/rel``, or ``name.1.ext``, ``name.2.ext`` ... when taken: never overwrite."""
    target = directory / rel
    if not target.exists() and not Path(f"{target}{SIDECAR_SUFFIX}").exists():
        return target
    stem, suffix = target.stem, target.suffix
    for n in range(1, 100000):
        candidate = target.with_name(f"{stem}.{n}{suffix}")
        if not candidate.exists() and not Path(f"{candidate}{SIDECAR_SUFFIX}").exists():
            return candidate
    raise OSError(errno.EEXIST, "no free name for the file", str(target))


def fsync_dir(directory: Path) -> None:
    """Make the names created in `directory` durable (a rename is not, until this)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_durably(src: Path, dst: Path) -> None:
    """Move `src` to `dst` (which must not exist) so that a crash leaves at least one copy.

    Same file system: ``rename``. Across file systems: copy to a temporary name beside
    `dst`, fsync, rename into place, fsync the directory, then remove `src`. A symlink is
    moved as the link itself: what it points to is never read or copied.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst, follow_symlinks=False)  # fails rather than overwrite, unlike rename
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK):
            raise
    else:
        os.unlink(src)
        fsync_dir(dst.parent)
        return
    tmp = dst.with_name(f".{dst.name}.forwarder-tmp")
    try:
        if src.is_symlink():  # the link itself, never what it points to
            os.symlink(os.readlink(src), tmp)
        else:
            _copy_new(src, tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if os.path.lexists(dst):
            raise OSError(errno.EEXIST, "target appeared while copying", str(dst))
        os.rename(tmp, dst)
        fsync_dir(dst.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.unlink(src)


def _copy_new(src: Path, dst: Path) -> None:
    """Copy the bytes and times of `src` to a new file `dst`, never following a symlink.

    The copy is created by us, so the process umask applies (on top of the source's own
    mode); ``shutil.copy2`` would copy the mode as it is, and a world-readable file in the
    inbox would stay world-readable in quarantine whatever the daemon's umask.
    """
    fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fin)
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IMODE(st.st_mode) & 0o666)
        try:
            while chunk := os.read(fin, 1 << 20):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fout, view) :]
        finally:
            os.close(fout)
    finally:
        os.close(fin)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def write_json_durably(path: Path, data: Mapping[str, Any]) -> None:
    """Write `data` as JSON to `path` through a temporary file, fsync and rename."""
    tmp = path.with_name(f".{path.name}.forwarder-tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fp:
            json.dump(data, fp, indent=2, sort_keys=True)
            fp.write("\n")
            fp.flush()
            os.fsync(fp.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def archive(path: Path, roots: Sequence[Path], archive_dir: Path) -> Path:
    """Move a delivered file under `archive_dir`, keeping its path relative to the inbox."""
    target = unique_target(archive_dir, relative_path(path, roots))
    move_durably(path, target)
    return target


def delete(path: Path) -> None:
    """Delete a delivered file (a file already gone is fine)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def quarantine(path: Path, roots: Sequence[Path], quarantine_dir: Path, sidecar: Sidecar) -> Path:
    """Move `path` into quarantine with a sidecar ``<file>.json`` saying why.

    The sidecar is written first (beside the target name, with the file's original and
    quarantined paths), then the file is moved; a crash in between leaves the file in the
    inbox, where it is found again. Never overwrites an earlier quarantined file.

    Returns
    -------
    Path
        Where the file now is.

    Raises
    ------
    OSError
        The quarantine is not writable or full; the file stays where it was.
    """
    target = unique_target(quarantine_dir, relative_path(path, roots))
    target.parent.mkdir(parents=True, exist_ok=True)
    sidecar_path = Path(f"{target}{SIDECAR_SUFFIX}")
    sidecar.placed(path, target).write(sidecar_path)
    try:
        move_durably(path, target)
    except BaseException:
        with contextlib.suppress(OSError):
            sidecar_path.unlink()
        raise
    return target
