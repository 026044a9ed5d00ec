"""Which paths under the watched folders are watched (depth, ignore patterns, symlinks)."""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

__all__ = ["WatchRootError", "WatchedFolders", "is_under", "outermost", "watch_error"]

# The watcher's lines: an operator filters on one logger for everything about watching.
LOGGER = logging.getLogger("forwarder.watcher")

_MAX_WARNED_LINKS = 10_000
"""Symlinks remembered as warned about; past this the memory starts afresh (warned again)."""


class WatchRootError(OSError):
    """A watched folder cannot be created or watched; the message names the folder."""


class WatchedFolders:
    """The folders to watch, and the rules saying which paths under them are watched.

    Paths are strings under the roots as given (made absolute), even when a root is a symlink
    to the real folder: `real` maps each root to the folder an observer must watch, and
    `unresolve` turns the observer's paths back. Names matching an `ignore` pattern (the file
    name or any folder name below the root) are not watched; without `recursive`, nothing
    below the top level is. Symlinks: see `followed`.
    """

    def __init__(
        self,
        roots: Sequence[Path],
        *,
        recursive: bool,
        follow_symlinks: bool,
        ignore: Sequence[str],
    ) -> None:
        # inotify would watch a symlinked root itself, not the folder: the observer gets the
        # real paths, and reported paths stay under the roots as given.
        real: dict[str, str] = {}
        for r in roots:
            given = os.path.abspath(os.fspath(r))
            real.setdefault(os.path.realpath(given), given)
        self.roots: list[str] = list(real.values())
        """The roots as given (absolute), duplicates of one real folder left out."""
        self.real: dict[str, str] = {given: rp for rp, given in real.items()}
        """Each root -> its real path (what the observer watches)."""
        self.recursive = recursive
        self.unreadable: set[str] = set()
        """Folders a walk could not read and already warned about (reset by a full scan)."""
        self._unresolve_map = sorted(
            ((rp, given) for rp, given in real.items() if rp != given),
            key=lambda pair: len(pair[0]),
            reverse=True,
        )
        # The deepest root wins when roots are nested.
        self._roots_by_depth = sorted(self.roots, key=len, reverse=True)
        self._follow = follow_symlinks
        self._real_root_list = sorted(set(self.real.values()), key=len, reverse=True)
        self._warned_links: set[str] = set()  # symlinks already warned about (once per path)
        self._ignore = _compile_ignore(ignore)

    def make(self) -> None:
        """Create the missing roots.

        Raises
        ------
        WatchRootError
            When a root cannot be created or exists and is not a folder.
        """
        for root in self.roots:
            _make_root(root)

    def unresolve(self, path: str) -> str:
        """`path` as seen by the observer (under a real root) -> under the root as given."""
        for real, given in self._unresolve_map:
            if path.startswith(real) and path[len(real) : len(real) + 1] in ("", os.sep):
                return given + path[len(real) :]
        return path

    def root_of(self, path: str, *, is_dir: bool) -> str | None:
        """The root `path` belongs to, or None when it is outside every root or ignored."""
        for root in self._roots_by_depth:
            if path.startswith(root) and path[len(root) : len(root) + 1] == os.sep:
                parts = path[len(root) + 1 :].split(os.sep)
                if not self.recursive and (is_dir or len(parts) > 1):
                    return None
                if self._ignore is not None and any(
                    self._ignore.match(os.path.normcase(part)) for part in parts
                ):
                    return None
                return root
        return None

    def walk(self, top: str, failed: set[str]) -> Iterator[tuple[str, os.stat_result]]:
        """Yield (path, stat) of the files under `top`, skipping ignored names and dir symlinks.

        Folders that cannot be read are added to `failed`, with a warning unless they are in
        `unreadable` already.
        """
        stack = [top]
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = list(it)
            except FileNotFoundError:
                if folder in self.roots:
                    LOGGER.warning(f"watched folder {folder} does not exist")
                continue
            except OSError as exc:
                failed.add(folder)
                if folder not in self.unreadable:
                    LOGGER.warning(f"cannot read folder {folder}: {exc.strerror}; skipped")
                continue
            for entry in entries:
                if self._ignore is not None and self._ignore.match(os.path.normcase(entry.name)):
                    continue
                try:
                    if entry.is_symlink() and not self.followed(entry.path):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        if self.recursive:
                            stack.append(entry.path)
                        continue
                    if not entry.is_file():  # a followed link: its target; broken: not a file
                        continue
                    st = entry.stat()
                except OSError:
                    continue
                yield entry.path, st

    def followed(self, path: str) -> bool:
        """Whether the symlink at `path` is followed; warns once per path when it is not.

        Without ``follow_symlinks`` no symlink is followed. With it, a symlink to a file is
        followed when its target resolves inside a watched folder. A symlinked folder is never
        followed (no loops, nothing outside the tree).
        """
        target = os.path.realpath(path)
        if not self._follow:
            why = "watch.follow_symlinks is false"
        elif os.path.isdir(target):
            why = "symlinked folders are never entered"
        elif not any(target.startswith(r + os.sep) for r in self._real_root_list):
            why = "its target is outside the watched folders"
        else:
            return True
        if path not in self._warned_links:
            if len(self._warned_links) >= _MAX_WARNED_LINKS:
                self._warned_links.clear()  # bounded memory against a flood of links
            self._warned_links.add(path)
            LOGGER.warning(
                "skipped symlink %s -> %s: %s; it is not read, sent or moved",
                path,
                target,
                why,
            )
        return False


def is_under(path: str, dirs: set[str]) -> bool:
    """Whether `path` lies inside one of the folders in `dirs`, at any depth."""
    parent = os.path.dirname(path)
    while True:
        if parent in dirs:
            return True
        up = os.path.dirname(parent)
        if up == parent:
            return False
        parent = up


def outermost(dirs: set[str]) -> list[str]:
    """`dirs` without the folders that lie under another one of them."""
    result: list[str] = []
    for d in sorted(dirs):
        if not result or not d.startswith(result[-1] + os.sep):
            result.append(d)
    return result


def watch_error(root: str, exc: OSError) -> WatchRootError:
    """`exc` from starting to watch `root`, as a `WatchRootError` naming the folder (and the
    kernel limit to raise, when one was reached)."""
    reason = exc.strerror or str(exc)
    if "watch limit" in reason:
        reason += " (raise fs.inotify.max_user_watches, or set poll = true)"
    elif "instance limit" in reason:
        reason += " (raise fs.inotify.max_user_instances, or set poll = true)"
    return WatchRootError(exc.errno, f"cannot watch folder {root}: {reason}")


def _compile_ignore(patterns: Iterable[str]) -> re.Pattern[str] | None:
    parts = [fnmatch.translate(p) for p in patterns]
    return re.compile("|".join(f"(?:{p})" for p in parts)) if parts else None


def _make_root(root: str) -> None:
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:  # exists, but not as a folder
        raise WatchRootError(exc.errno, f"watch folder {root} exists and is not a folder") from exc
    except OSError as exc:
        raise WatchRootError(
            exc.errno, f"cannot create watch folder {root}: {exc.strerror}"
        ) from exc
