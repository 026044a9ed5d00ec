"""The processes that transform instances for destinations with ``[destinations.transform]``.

Decoding, de-identifying and encoding cost CPU: they run in a pool of processes
(``[transform] workers``, default the CPU count), so that the send loops and the other
destinations never wait behind an encoder. A transformed instance is written as a Part 10
file under the spool folder beside the outbox and streamed from there like any file; the
sender deletes it once the store is answered. The pool is started at the first transform
and lives until the daemon stops; a process that dies (a codec crash, the OOM killer) fails
the instances it held (retried, then quarantined) and the pool is started again.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import select
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from forwarder.dicomfile import DicomInfo
from forwarder.filing import fsync_dir
from forwarder.transformspec import TransformSpec

if TYPE_CHECKING:
    from forwarder.transform import Spliced

__all__ = [
    "SECRET_FILE",
    "SPOOL_DIR",
    "Prepared",
    "TransformPool",
    "load_secret",
    "remove_copies",
    "spool_dir",
]

LOGGER = logging.getLogger("forwarder.transform")

SPOOL_DIR = "transform"
"""The folder beside the outbox that holds transformed copies while they are sent."""
SECRET_FILE = "deidentify.key"
"""The per-installation de-identification key, beside the outbox."""
_PARENT_POLL_SECONDS = 5.0
_SECRET_BYTES = 32


@dataclass(frozen=True)
class Prepared:
    """An instance transformed for one destination: the copy to send, and what changed."""

    info: DicomInfo  # the copy in the spool folder, inspected
    changed: int  # how many attributes the transform changed
    spliced: Spliced | None = None  # no copy: the changed head and the source's rest


def spool_dir(outbox_path: Path) -> Path:
    """Where transformed copies wait to be sent: beside the outbox (the state folder)."""
    return outbox_path.parent / SPOOL_DIR


def load_secret(state_dir: Path, *, create: bool = True) -> bytes | None:
    """The installation's de-identification secret: 32 bytes kept as hex in
    ``state_dir / "deidentify.key"``, created (mode 0600) when absent and `create` (None
    when absent and not `create`).

    It keys the new UIDs: the same original UID gives the same new one for every instance,
    across restarts and reloads, and another installation's are unrelated. Losing it means new
    UIDs for the same studies from then on.

    Creation is atomic and race-free: the key is written to an O_EXCL temporary file, flushed,
    then hard-linked to its name; when another process got there first, its key is read.

    Raises ValueError naming the file when it is damaged (not 64 hex digits), OSError when it
    cannot be read or created.
    """
    path = Path(state_dir) / SECRET_FILE
    try:
        return _read_secret(path)
    except FileNotFoundError:
        if not create:
            return None
    tmp = path.with_name(f".{SECRET_FILE}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fp:
            fp.write(os.urandom(_SECRET_BYTES).hex() + "\n")
            fp.flush()
            os.fsync(fp.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created it first: both use its key
        else:
            fsync_dir(path.parent)  # losing the key would change every de-identified UID
            LOGGER.info(f"created the de-identification secret {path}")
    finally:
        tmp.unlink()
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) != _SECRET_BYTES:
        raise ValueError(
            f"{path}: damaged de-identification secret (want {2 * _SECRET_BYTES} hex digits); "
            "restore it from a backup (deleting it changes every de-identified UID from now on)"
        )
    return secret


def remove_copies(spool: Path) -> int:
    """Remove the transformed copies (``*.dcm``, ``*.part``) in `spool`, if it exists;
    returns how many. Only when no pool is running: they are its work in progress."""
    removed = 0
    try:
        entries = list(os.scandir(spool))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.is_file(follow_symlinks=False) and entry.name.endswith((".dcm", ".part")):
            os.unlink(entry.path)
            removed += 1
    return removed


def _child_init(daemon: int) -> None:
    """Each pool process: leaves SIGINT/SIGTERM to the daemon (which stops the pool), and
    exits when the daemon is gone, however it went (kill -9 included).

    The pool's processes are the forkserver's children, and each holds the pool's queues
    open: neither the parent-death signal nor an end-of-file would tell them. A thread
    blocked on a pidfd of the daemon wakes only when it exits (no polling: ~0 CPU idle).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        fd = os.pidfd_open(daemon)
    except ProcessLookupError:  # gone already
        os._exit(0)
    except (OSError, AttributeError):  # no pidfd (old kernel): look every few seconds
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])
        else:
            while os.getppid() != 1 and _alive(daemon):
                time.sleep(_PARENT_POLL_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, name="daemon-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prepare(src: Path, dst: Path, spec: TransformSpec, secret: bytes) -> Prepared:
    """In a pool process: transform `src` into `dst`; what the sender needs to know of the
    copy is what the engine wrote (reading it back cost ~3% of a JPEG-LS encode)."""
    from forwarder.transform import transform_file

    done = transform_file(src, dst, spec, secret, durable=False)  # lost: made again
    copy = DicomInfo(
        done.path,
        done.size,
        0,
        done.sop_class_uid,
        done.sop_instance_uid,
        done.transfer_syntax,
        None,
        done.dataset_offset,
    )
    return Prepared(copy, len(done.changes))


class TransformPool:
    """The daemon's transform processes and spool folder; shared by every destination."""

    def __init__(self, workers: int, spool: Path, secret: bytes = b"") -> None:
        self.workers = workers
        self.spool = spool
        self.secret = secret
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None
        self._names = itertools.count()
        self._closed = False

    def make_spool(self) -> None:
        """Create the folder of the copies (what an earlier run left there is removed at
        start: `Transforms.configure`)."""
        self.spool.mkdir(mode=0o750, exist_ok=True)

    def _pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise RuntimeError("the transform pool is shut down")
            if self._executor is None:
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(["forwarder.transform", "forwarder.dicomfile"])
                self._executor = ProcessPoolExecutor(
                    self.workers,
                    mp_context=context,
                    initializer=_child_init,
                    initargs=(os.getpid(),),
                )
                LOGGER.info(f"transform: started {self.workers} process(es)")
            return self._executor

    def copy_path(self) -> Path:
        """A new name for a copy in the spool folder."""
        return self.spool / f"{next(self._names)}.dcm"

    def submit(self, src: Path, spec: TransformSpec) -> tuple[Path, Future[Prepared]]:
        """Start transforming `src`; returns the copy's path and the future result."""
        dst = self.copy_path()
        try:
            return dst, self._pool().submit(_prepare, src, dst, spec, self.secret)
        except BrokenProcessPool:  # a process died while the pool was idle: start anew
            self.broken()
            return dst, self._pool().submit(_prepare, src, dst, spec, self.secret)

    def broken(self) -> None:
        """A process of the pool died: start a new pool for what comes next (once, however
        many futures report it)."""
        with self._lock:
            executor = self._executor
            if executor is None or not getattr(executor, "_broken", False):
                return
            self._executor = None
        LOGGER.error("transform: a transform process died; starting new ones")
        executor.shutdown(wait=False, cancel_futures=True)

    def shutdown(self, *, wait: bool = True) -> None:
        """Stop the processes now: queued transforms are cancelled and those under way
        abandoned (killed: nobody waits for them any more, their copies are made again at the
        next start, which clears the spool). With `wait`, return once they are gone.

        Waiting for them instead kept a stopping daemon for as long as its biggest encode
        (minutes for a tomosynthesis or cine file), past shutdown_timeout and systemd's
        TimeoutStopSec.
        """
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is None:
            return
        # the pool's own processes (they ignore SIGTERM: the daemon stops them)
        processes = list((getattr(executor, "_processes", None) or {}).values())
        for process in processes:
            try:
                process.kill()
            except (OSError, ValueError) as exc:  # gone already, or closed
                LOGGER.debug(f"transform: process {process.pid} not killed: {exc}")
        executor.shutdown(wait=wait, cancel_futures=True)
