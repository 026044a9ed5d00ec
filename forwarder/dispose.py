"""The dispose stage: a file whose every delivery is final leaves the inbox, or waits to."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from forwarder import filing
from forwarder.config import Settings
from forwarder.dicomfile import InvalidDicom, inspect
from forwarder.events import Events
from forwarder.inodes import FileKey, InodeIndex
from forwarder.logs import fields
from forwarder.outbox import FINAL_STATES, Delivery, Outbox, State
from forwarder.sidecar import Sidecar
from forwarder.watcher import ReadyFile

__all__ = ["Disposer", "Layout"]

LOGGER = logging.getLogger("forwarder.daemon")

RETRY_SECONDS = 30.0
"""A file that could not leave the inbox is tried again after this long."""


@dataclass(frozen=True)
class Layout:
    """Where files go: the settings the dispose stage reads (replaced on reload)."""

    roots: tuple[Path, ...]
    on_success: str
    archive_dir: Path
    quarantine_dir: Path
    follow_symlinks: bool

    @classmethod
    def of(cls, settings: Settings) -> Layout:
        roots = list(settings.watch.paths)
        if settings.receive.enabled:  # received instances are disposed of as inbox files are
            roots.append(Path(os.path.abspath(settings.receive.dir)))
        return cls(
            roots=tuple(roots),
            on_success=settings.disposition.on_success,
            archive_dir=settings.disposition.archive_dir,
            quarantine_dir=settings.quarantine.dir,
            follow_symlinks=settings.watch.follow_symlinks,
        )


class Disposer:
    """Deletes, archives, keeps or quarantines files once the outbox says they are done.

    The outbox is the record: a file is disposed of when every one of its deliveries is in a
    final state, and its rows follow it when it moves. What this object keeps is a timer for
    files that could not be moved yet (`loop` tries them again); after a restart the watcher's
    first scan offers them again, and the enqueuer finds them delivered.
    """

    def __init__(
        self,
        outbox: Outbox,
        layout: Layout,
        events: Events,
        *,
        inodes: InodeIndex,
        forget: Callable[[Path], None],
        queued: Callable[[], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.outbox = outbox
        self.layout = layout
        self.events = events
        self.forget = forget  # the watcher offers this path again when it next sees it
        self.queued = queued  # rows are due again: wake the workers
        self._inodes = inodes  # shared with the enqueuer: which names are one file
        self.clock = clock
        self._lock = threading.Lock()
        self._later: dict[FileKey, float] = {}  # monotonic time of the next try

    def loop(self, now: float) -> None:
        """Try again the files whose disposal failed and is due at monotonic `now`."""
        for key, when in list(self._later.items()):
            if when <= now:
                self.dispose(Path(key[0]), key[1], key[2])

    def done(self, finished: Sequence[Delivery]) -> None:
        """Deliveries reached a final state: dispose of each file whose every delivery has
        (one outbox query for all of them)."""
        keys = list(dict.fromkeys((d.path, d.size, d.mtime_ns) for d in finished))
        if not keys:
            return
        states = self.outbox.files_states(keys)
        for key in keys:
            self.dispose(Path(key[0]), key[1], key[2], states.get(key, {}))

    def dispose(
        self, path: Path, size: int, mtime_ns: int, states: dict[str, State] | None = None
    ) -> None:
        """Dispose of a file whose every delivery is final (`states`: read if not given)."""
        key = (str(path), size, mtime_ns)
        with self._lock:
            if states is None:
                states = self.outbox.file_states(*key)
            if not states or any(s not in FINAL_STATES for s in states.values()):
                self._later.pop(key, None)  # not done (any more): nothing to dispose of
                return
            try:
                st = path.stat()
                if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                    self._later.pop(key, None)
                    return  # a new version: it has rows of its own
                if State.GONE in states.values():
                    self._later.pop(key, None)
                    self._send_again(path, key)
                    return
                if st.st_nlink > 1:
                    self._remember_name(path, st)
                if any(s is State.QUARANTINED for s in states.values()):
                    self._quarantine_delivered(path, key, states)
                else:
                    self._on_success(path)
            except FileNotFoundError:  # gone already: nothing left to dispose of, but the
                pass  # watcher is not told of deletions in place: forget it below
            except OSError as exc:
                if key not in self._later:
                    LOGGER.error(
                        f"{path}: delivered, but cannot be moved out of the inbox: {exc}; "
                        f"will try again",
                        extra=fields(path=str(path), outcome="dispose-failed"),
                    )
                self._later[key] = time.monotonic() + RETRY_SECONDS
                return
            self._later.pop(key, None)
        self.forget(path)

    def _send_again(self, path: Path, key: FileKey) -> None:
        """The file vanished before it reached some destinations (their rows are GONE) and is
        back with the same path, size and mtime (cp -p, rsync -t, a move back): it is queued
        again for them, once its header shows the same instance, never taken for delivered."""
        gone = [d for d in self.outbox.file_rows(*key) if d.state is State.GONE]
        try:
            info = inspect(path, follow_symlinks=self.layout.follow_symlinks)
        except InvalidDicom as exc:
            self.quarantine_invalid(path, f"back after it vanished unsent, but {exc.reason}")
            return
        except OSError as exc:  # replaced or gone meanwhile: offered again when seen again
            LOGGER.warning(
                f"{path}: back after it vanished unsent, but cannot be read: {exc}",
                extra=fields(path=str(path), outcome="unreadable"),
            )
            self.forget(path)
            return
        if any(d.sop_instance_uid != info.sop_instance_uid for d in gone):
            LOGGER.error(
                f"{path}: not queued: a file with this path, size and mtime was queued before "
                f"as another instance ({gone[0].sop_instance_uid}); rename it to send it",
                extra=fields(path=str(path), outcome="not-queued"),
            )
            return
        if self.outbox.requeue([d.id for d in gone], self.clock()):
            LOGGER.info(
                f"{path} is back after it vanished unsent; queued again for "
                f"{', '.join(sorted(d.destination for d in gone))}",
                extra=fields(path=str(path), outcome="queued-again"),
            )
            self.queued()

    def _remember_name(self, path: Path, st: os.stat_result) -> None:
        """`path`, delivered and about to leave the inbox, has other names (hard links): keep
        its inode, so that another name met later (with one link left by then) is known."""
        rows = self.outbox.file_rows(str(path), st.st_size, st.st_mtime_ns)
        uid = rows[0].sop_instance_uid if rows else None
        seen = ReadyFile(path, st.st_size, st.st_mtime_ns, path.parent, st.st_dev, st.st_ino, 2)
        self._inodes.register(seen, uid)

    def _on_success(self, path: Path) -> None:
        how = self.layout.on_success
        if how == "delete":
            filing.delete(path)
        elif how == "move":
            target = filing.archive(path, self.layout.roots, self.layout.archive_dir)
            self.outbox.set_path(str(path), str(target), now=self.clock())
        if LOGGER.isEnabledFor(logging.DEBUG):  # per file
            LOGGER.debug(f"{path}: every destination has it ({how})")

    def _quarantine_delivered(self, path: Path, key: FileKey, states: dict[str, State]) -> None:
        rows = self.outbox.file_rows(*key)
        sidecar = Sidecar.refused(rows, self.clock())
        target = filing.quarantine(path, self.layout.roots, self.layout.quarantine_dir, sidecar)
        self.outbox.set_path(str(path), str(target), now=self.clock())
        failed = [n for n, s in states.items() if s is State.QUARANTINED]
        LOGGER.error(
            f"quarantined: {path} -> {target} (failed for {', '.join(failed)})",
            extra=fields(path=str(path), outcome="quarantined"),
        )

    def dispose_unwanted(self, path: Path, reason: str) -> None:
        """An instance no destination wants (``routing.unmatched = "dispose"``): it leaves
        the inbox as a delivered file does (deleted, archived or kept), with one log line."""
        how = self.layout.on_success
        try:
            with self._lock:
                self._on_success(path)
        except FileNotFoundError:
            self.forget(path)
            return
        except OSError as exc:
            LOGGER.error(
                f"{path}: no destination wants it ({reason}), and it cannot be moved out of "
                f"the inbox: {exc}",
                extra=fields(path=str(path), outcome="dispose-failed"),
            )
            self.forget(path)  # offered again at the watcher's next rescan
            return
        LOGGER.info(
            f"not queued: {path}: no destination wants it ({reason}); disposition: {how}",
            extra=fields(path=str(path), outcome="unmatched"),
        )
        if how != "keep":
            self.forget(path)

    def quarantine_invalid(self, path: Path, reason: str) -> None:
        """A file that never became sendable DICOM, or that no destination wants: quarantine
        it with the reason."""
        sidecar = Sidecar.invalid(reason, self.clock())
        try:
            target = filing.quarantine(path, self.layout.roots, self.layout.quarantine_dir, sidecar)
        except FileNotFoundError:
            return
        except OSError as exc:
            LOGGER.error(
                f"{path}: {reason}; and it cannot be quarantined: {exc}",
                extra=fields(path=str(path), outcome="quarantine-failed"),
            )
            # forgotten, the unchanged file is offered again at the watcher's next rescan,
            # which retries once the quarantine is writable
            self.forget(path)
            return
        LOGGER.error(
            f"quarantined: {path} -> {target}: {reason}",
            extra=fields(path=str(path), outcome="quarantined"),
        )
        self.events.count("quarantined")
        self.forget(path)
