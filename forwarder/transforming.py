"""The sender of a destination with a transform: every instance changed in the pool, then sent.

A `TransformingSender` is a `Sender` (same association, contexts, fallbacks and outcomes)
whose `send` first hands each file of the batch to the `TransformPool`, all at once, and then
sends the transformed copies in the batch's order as they become ready: the pool encodes the
next instances while the first ones go out. What the peer sees is the copy: its transfer
syntax, its SOP Instance UID (new after de-identification). What the worker records is the
original file's delivery, with how it went out and the UID sent.

An instance the transform cannot take (cannot decode, cannot encode, burned-in annotation)
is refused for this destination only: quarantined at once with the reason, as a C-STORE
rejection would be; the other destinations send it as usual.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, Future
from concurrent.futures import wait as wait_for
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path

from forwarder.config import ConfigError, Destination, Settings
from forwarder.contexts import ContextSpec, split_by_contexts
from forwarder.dicomfile import DicomInfo
from forwarder.logs import one_line
from forwarder.sender import Peer, Sender, StoreResult
from forwarder.status import Action, Classification
from forwarder.transformpool import Prepared, TransformPool, load_secret, spool_dir
from forwarder.transformspec import SYNTAXES, TransformFailed, TransformSpec

__all__ = ["TransformingSender", "Transforms"]

LOGGER = logging.getLogger("forwarder.transform")

_POLL_SECONDS = 0.25
"""How often a wait for the pool looks at the stop event."""

Job = tuple[DicomInfo, Path, "Future[Prepared]"]


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

    def send(self, items: Iterable[DicomInfo]) -> Iterator[StoreResult]:
        items = list(items)
        # the contexts of what the copies will be in (the fallbacks cover an instance
        # without pixel data, which goes out uncompressed)
        pairs = [(i.sop_class_uid, self._target or i.transfer_syntax) for i in items]
        jobs = {i.path: (i, *self.pool.submit(i.path, self.spec)) for i in items}
        try:
            for specs in split_by_contexts(pairs, self.restrict):
                classes = {s.sop_class for s in specs}
                todo = [jobs[i.path] for i in items if i.sop_class_uid in classes]
                yield from self._send_group(specs, todo)
        finally:
            for _, dst, future in jobs.values():
                _discard(dst, future)

    def _send_group(
        self, specs: Sequence[ContextSpec], todo: Sequence[Job]
    ) -> Iterator[StoreResult]:
        """Send the copies of `todo` in order, each run of ready ones on the association."""
        k = 0
        while k < len(todo) and not self.stop.is_set():
            if not self._ready(todo[k][2]):
                return  # stopped while waiting
            ready: list[tuple[DicomInfo, Prepared]] = []
            while k < len(todo) and (not ready or todo[k][2].done()):
                info, _, future = todo[k]
                k += 1
                outcome = self._outcome(info, future)
                if isinstance(outcome, StoreResult):
                    yield from self._send_copies(specs, ready)
                    ready = []
                    yield outcome
                else:
                    ready.append((info, outcome))
            yield from self._send_copies(specs, ready)

    def _ready(self, future: Future[Prepared]) -> bool:
        while not future.done():
            if self.stop.is_set():
                return False
            wait_for([future], timeout=_POLL_SECONDS)
        return True

    def _send_copies(
        self, specs: Sequence[ContextSpec], ready: Sequence[tuple[DicomInfo, Prepared]]
    ) -> Iterator[StoreResult]:
        if not ready:
            return
        originals = {p.info.path: (info, p) for info, p in ready}
        for result in self.send_with(specs, [p.info for _, p in ready]):
            info, prepared = originals[result.info.path]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(prepared.info.path)
            sent_uid = prepared.info.sop_instance_uid
            yield replace(
                result,
                info=info,
                how=_transformed(result.how),
                sent_uid=sent_uid if result.how and sent_uid != info.sop_instance_uid else None,
            )

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


class Transforms:
    """The daemon's side of transforms: the de-identification key, the pool (started with
    the first destination that transforms), and each destination's sender."""

    def __init__(self) -> None:
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

    def sender(self, dest: Destination, stop: threading.Event) -> Sender:
        """The sender of `dest`: its transform's, or the plain C-STORE sender."""
        spec = dest.transform_spec
        if spec is None:
            return Sender(Peer.from_destination(dest), stop=stop)
        if self.pool is None:
            self.pool = TransformPool(self._workers, self._spool, self._secret)
            try:
                removed = self.pool.clear_spool()
            except OSError as exc:  # each copy then fails to be written: retried
                LOGGER.error(f"transform: cannot prepare {self._spool}: {exc}")
            else:
                if removed:
                    LOGGER.info(f"transform: removed {removed} copies left in {self._spool}")
        return TransformingSender(Peer.from_destination(dest), spec, self.pool, stop=stop)

    def shutdown(self, *, wait: bool) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=wait)
