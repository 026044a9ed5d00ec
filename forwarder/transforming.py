"""The sender of a destination with a transform: every instance changed in the pool, then sent.

A `TransformingSender` is a `Sender` (same association, contexts, fallbacks and outcomes)
whose `send` first hands the files of the batch to the `TransformPool` (a few at a time,
twice the pool's processes ahead: the pool is shared by every destination), and then
sends the transformed copies in the batch's order as they become ready: the pool encodes the
next instances while the first ones go out. What the peer sees is the copy: its transfer
syntax, its SOP Instance UID (new after de-identification). What the worker records is the
original file's delivery, with how it went out and the UID sent.

A `set`/`remove` on a file kept in its transfer syntax needs no process and no copy: the
sender splices the header itself (`splice_head`: the header's elements up to the last one
that changes, ~0.3 ms for a small file) and streams the rest of the source as the plain
sender does. Handing a 10 KB file to a process and back cost more than the transform.

An instance the transform cannot take (cannot decode, cannot encode, burned-in annotation)
is refused for this destination only: quarantined at once with the reason, as a C-STORE
rejection would be; the other destinations send it as usual.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, Future
from concurrent.futures import wait as wait_for
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from forwarder.config import ConfigError, Destination, Settings
from forwarder.contexts import ContextSpec, split_by_contexts
from forwarder.deliver import dicom_sender
from forwarder.dicomfile import DicomInfo
from forwarder.logs import one_line
from forwarder.sender import Peer, Sender, StoreResult
from forwarder.senderapi import DeliverySender
from forwarder.status import Action, Classification
from forwarder.transformpool import (
    Prepared,
    TransformPool,
    load_secret,
    remove_copies,
    spool_dir,
)
from forwarder.transformspec import SYNTAXES, TransformFailed, TransformSpec
from forwarder.wire import FileData

if TYPE_CHECKING:
    from forwarder.transform import Spliced

__all__ = ["TransformingSender", "Transforms"]

LOGGER = logging.getLogger("forwarder.transform")

_POLL_SECONDS = 0.25
"""How often a wait for the pool looks at the stop event."""
SLOWEST_BYTES_PER_SECOND = 1_000_000
"""The slowest a transform is expected to go (pylibjpeg-openjpeg encodes noisy 12-bit images
at ~5 MB/s here): a wait for one may take its file's size at this rate beyond the stall limit
before the worker counts as stuck (a hung codec)."""


class TransformingSender(Sender):
    """Send `spec`-transformed copies of the files; see the module's description."""

    def __init__(
        self,
        peer: Peer,
        spec: TransformSpec,
        pool: TransformPool,
        *,
        stop: threading.Event | None = None,
    ) -> None:
        super().__init__(peer, stop=stop)
        self.spec = spec
        self.pool = pool
        self._target = SYNTAXES[spec.transfer_syntax]
        self._spliced: dict[Path, Spliced] = {}  # copies being sent that are not files

    def send(self, items: Iterable[DicomInfo]) -> Iterator[StoreResult]:
        items = list(items)
        # the contexts of what the copies will be in (the fallbacks cover an instance
        # without pixel data, which goes out uncompressed)
        pairs = [(i.sop_class_uid, self._target or i.transfer_syntax) for i in items]
        groups = split_by_contexts(pairs, self.restrict, self.context_limit)
        plan = [[i for i in items if i.sop_class_uid in {s.sop_class for s in g}] for g in groups]
        jobs = _Jobs(self.pool, self.spec, [i for todo in plan for i in todo], splice=self._splice)
        try:
            for specs, todo in zip(groups, plan, strict=True):
                yield from self._send_group(specs, todo, jobs)
        finally:
            self.waiting = None
            jobs.discard()

    def _send_group(
        self, specs: Sequence[ContextSpec], todo: Sequence[DicomInfo], jobs: _Jobs
    ) -> Iterator[StoreResult]:
        """Send the copies of `todo` in order, each run of ready ones on the association."""
        k = 0
        while k < len(todo) and not self.stop.is_set():
            if not self._ready(jobs.future(todo[k]), todo[k].size):
                return  # stopped while waiting
            ready: list[tuple[DicomInfo, Prepared]] = []
            while k < len(todo) and (not ready or jobs.done(todo[k])):
                info = todo[k]
                k += 1
                outcome = self._outcome(info, jobs.take(info))
                if isinstance(outcome, StoreResult):
                    yield from self._send_copies(specs, ready)
                    ready = []
                    yield outcome
                else:
                    ready.append((info, outcome))
            yield from self._send_copies(specs, ready)

    def _splice(self, info: DicomInfo) -> tuple[Path, Future[Prepared]] | None:
        """The transform of `info` done here, when it is a splice (None: it is not)."""
        from forwarder.transform import splicable, splice_head

        if not splicable(self.spec):
            return None
        future: Future[Prepared] = Future()
        dst = self.pool.copy_path()  # never created unless the peer needs a conversion
        try:
            spliced = splice_head(info.path, self.spec, changes=False)
        except Exception as exc:  # this instance's outcome: `_outcome` classifies it
            future.set_exception(exc)
            return dst, future
        if spliced is None:
            return None  # the pool writes a copy
        copy = DicomInfo(
            dst,
            spliced.size,
            info.mtime_ns,
            spliced.sop_class_uid,
            spliced.sop_instance_uid,
            spliced.transfer_syntax,
            info.study_uid,
            0,
        )
        future.set_result(Prepared(copy, len(spliced.changes), spliced))
        return dst, future

    def _ready(self, future: Future[Prepared], size: int) -> bool:
        """Wait for `future` (False when stopped first), as `waiting` says: while it runs,
        since when and the allowance of its file; once done, its end (progress)."""
        if future.done():
            return True
        self.waiting = (time.monotonic(), size / SLOWEST_BYTES_PER_SECOND)
        try:
            while not future.done():
                if self.stop.is_set():
                    return False
                wait_for([future], timeout=_POLL_SECONDS)
            return True
        finally:
            self.waiting = (time.monotonic(), 0.0)

    def _send_copies(
        self, specs: Sequence[ContextSpec], ready: Sequence[tuple[DicomInfo, Prepared]]
    ) -> Iterator[StoreResult]:
        if not ready:
            return
        originals = {p.info.path: (info, p) for info, p in ready}
        self._spliced.update((p.info.path, p.spliced) for _, p in ready if p.spliced)
        try:
            for result in self.send_with(specs, [p.info for _, p in ready]):
                info, prepared = originals[result.info.path]
                self._spliced.pop(prepared.info.path, None)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(prepared.info.path)
                sent_uid = prepared.info.sop_instance_uid
                yield replace(
                    result,
                    info=info,
                    how=_transformed(result.how),
                    sent_uid=sent_uid if result.how and sent_uid != info.sop_instance_uid else None,
                )
        finally:
            self._spliced.clear()

    def _payload(self, info: DicomInfo, ts: str, how: str) -> FileData | bytes:
        """A spliced copy goes out as its head and the source's rest; converted (a peer that
        does not take its syntax), it is written out first, as a copy from the pool is."""
        spliced = self._spliced.get(info.path)
        if spliced is None:
            return super()._payload(info, ts, how)
        if how == "as is":
            return FileData(spliced.source, spliced.tail_at, spliced.head)
        from forwarder.transform import write_spliced

        write_spliced(spliced, info.path)  # removed with the other copies once answered
        return super()._payload(info, ts, how)

    def _outcome(self, info: DicomInfo, future: Future[Prepared]) -> Prepared | StoreResult:
        """The copy of `info`, or the result that says why there is none."""
        try:
            return future.result()
        except BrokenProcessPool as exc:
            self.pool.broken()
            cls = Classification(
                Action.RETRY_FEW, f"the transform process died ({one_line(exc) or 'killed'})"
            )
        except CancelledError:
            cls = Classification(Action.RETRY, "the transform was cancelled")
        except OSError as exc:
            if exc.filename is not None and Path(exc.filename).parent == self.pool.spool:
                cls = Classification(
                    Action.RETRY, f"cannot write the transformed copy: {exc.strerror or exc}"
                )
            else:  # the source: gone since the claim, or unreadable
                cls = Classification(
                    Action.UNREADABLE, f"cannot read the file: {exc.strerror or exc}"
                )
        except TransformFailed as exc:  # this instance: refused for this destination
            cls = Classification(Action.PERMANENT, str(exc))
        except Exception as exc:  # a bug in a codec or ours: retried, then quarantined
            cls = Classification(Action.RETRY_FEW, f"transform error: {one_line(exc)}")
        return StoreResult(info, cls)


class _Jobs:
    """The transforms of one batch, handed to the pool a few at a time in the order their
    copies are sent: at most twice the pool's processes ahead of the sender, so that another
    destination's next instance waits behind a few of these, not behind the whole batch (the
    pool is one queue for every destination)."""

    def __init__(
        self,
        pool: TransformPool,
        spec: TransformSpec,
        order: Sequence[DicomInfo],
        *,
        splice: Callable[[DicomInfo], tuple[Path, Future[Prepared]] | None] = lambda _: None,
    ):
        self._pool = pool
        self._spec = spec
        self._splice = splice  # done here rather than in the pool, when it can be
        unique = {i.path: i for i in reversed(order)}  # a path twice: one transform
        self._queue = list(unique.values())  # the next one to submit last
        self._window = 2 * pool.workers
        self._jobs: dict[Path, tuple[Path, Future[Prepared]]] = {}
        self._ahead = 0  # submitted, not yet taken

    def _submit(self) -> None:
        info = self._queue.pop()
        job = self._splice(info)
        self._jobs[info.path] = job or self._pool.submit(info.path, self._spec)
        self._ahead += 1

    def _fill(self) -> None:
        while self._queue and self._ahead < self._window:
            self._submit()

    def future(self, info: DicomInfo) -> Future[Prepared]:
        """The transform of `info` (submitted now with the next ones, when not yet)."""
        while info.path not in self._jobs:
            self._submit()
        self._fill()
        return self._jobs[info.path][1]

    def done(self, info: DicomInfo) -> bool:
        job = self._jobs.get(info.path)
        return job is not None and job[1].done()

    def take(self, info: DicomInfo) -> Future[Prepared]:
        """The transform of `info`, whose outcome the sender reads now: the next one in
        the order is handed to the pool."""
        future = self.future(info)
        self._ahead = max(0, self._ahead - 1)
        self._fill()
        return future

    def discard(self) -> None:
        """Remove the copies (now, or once their process is done); submit no more."""
        self._queue.clear()
        for dst, future in self._jobs.values():
            _discard(dst, future)


def _transformed(how: str) -> str:
    """The sender's `how` for a copy, as the record of a transformed instance."""
    if not how:
        return how
    return "transform" if how == "as is" else f"transform+{how}"


def _discard(dst: Path, future: Future[Prepared]) -> None:
    """Remove the copy of a job that is over, or will be once its process is done."""

    def unlink(_: object) -> None:
        for path in (dst, dst.with_name(dst.name + ".part")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    if not future.cancel():
        future.add_done_callback(unlink)  # runs at once when it is done already


def _remove_leftovers(spool: Path) -> None:
    """Remove the copies an earlier run left (a kill while sending), with or without
    transforms in the config now; a failure is logged (each copy is made again anyway)."""
    try:
        removed = remove_copies(spool)
    except OSError as exc:
        LOGGER.error(f"transform: cannot remove the copies left in {spool}: {exc}")
        return
    if removed:
        LOGGER.info(f"transform: removed {removed} copies left in {spool}")


class Transforms:
    """The daemon's side of transforms: the de-identification key, the pool (started with
    the first destination that transforms), and each destination's sender."""

    def __init__(self) -> None:
        # The pool's forkserver runs `python -c`, which puts the working directory first on
        # its import path (multiprocessing ignores the sys_path it is given): a `forwarder/`,
        # `pydicom/` or `numpy/` in the daemon's folder (the image's WORKDIR is its state
        # folder) would be imported there. Safe path: set once, before any thread runs.
        os.environ.setdefault("PYTHONSAFEPATH", "1")
        self.pool: TransformPool | None = None
        self._workers = 1
        self._spool = Path()
        self._secret = b""

    def configure(self, settings: Settings) -> None:
        """Take `settings` (at start and at each reload): load the key when a destination
        de-identifies. The pool keeps its size until a restart.

        Raises
        ------
        ConfigError
            The key cannot be read or created (naming its file).
        """
        state = settings.outbox.path.parent
        if self.pool is None:
            self._workers = settings.transform.pool_size
            self._spool = spool_dir(settings.outbox.path)
            _remove_leftovers(self._spool)  # no pool yet: whatever is there is left over
        elif settings.transform.pool_size != self.pool.workers:
            LOGGER.warning("transform.workers changed: it takes effect at the next restart only")
        specs = [d.transform_spec for d in settings.destinations]
        if not self._secret and any(s is not None and s.deidentify != "none" for s in specs):
            try:
                self._secret = load_secret(state) or b""
            except (OSError, ValueError) as exc:
                raise ConfigError("", [f"de-identification key: {exc}"]) from exc
            if self.pool is not None:
                self.pool.secret = self._secret

    def sender(self, dest: Destination, stop: threading.Event) -> DeliverySender:
        """The sender of `dest`: its transform's, or the plain C-STORE (or STOW-RS) sender."""
        spec = dest.transform_spec
        if spec is None:
            return dicom_sender(dest, stop)
        if self.pool is None:
            self.pool = TransformPool(self._workers, self._spool, self._secret)
            try:
                self.pool.make_spool()
            except OSError as exc:  # each copy then fails to be written: retried
                LOGGER.error(f"transform: cannot prepare {self._spool}: {exc}")
        if dest.type == "dicomweb":
            from forwarder.stowtransform import TransformingStowSender

            return TransformingStowSender(dest, spec, self.pool, stop=stop)
        return TransformingSender(Peer.from_destination(dest), spec, self.pool, stop=stop)

    def shutdown(self, *, wait: bool) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=wait)
