"""The sender of a DICOMweb destination with a transform: transformed copies sent over STOW-RS.

A `TransformingStowSender` is a `TransformingSender` (the same pool, look-ahead, waits,
per-instance refusals and records of what changed) whose copies go out through a
`StowSender` instead of an association: the pool's copies are Part 10 files in the spool; a
spliced copy (``set``/``remove`` kept in its syntax) is its changed head, after a file meta
header made in memory, and then the rest of the source, streamed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from forwarder.config import Destination
from forwarder.contexts import ContextSpec
from forwarder.dicomfile import DicomInfo
from forwarder.sender import Peer, StoreResult
from forwarder.status import Action, Classification
from forwarder.stow import Entry, StowSender, file_meta
from forwarder.transforming import TransformingSender
from forwarder.transformpool import TransformPool
from forwarder.transformspec import TransformSpec

if TYPE_CHECKING:
    from forwarder.transform import Spliced

__all__ = ["TransformingStowSender"]


class _SplicingStow(StowSender):
    """A StowSender that sends a spliced copy (no file) from its head and its source."""

    spliced: Mapping[Path, Spliced] = {}

    def _entry(self, info: DicomInfo) -> Entry | StoreResult:
        from forwarder import dicomweb

        spliced = self.spliced.get(info.path)
        if spliced is None:
            return super()._entry(info)
        try:
            fp = open(spliced.source, "rb")  # noqa: SIM115 (closed by `send`)
        except OSError as exc:
            cls = Classification(Action.UNREADABLE, f"cannot read the file: {exc.strerror}")
            return StoreResult(info, cls)
        head = file_meta(info) + spliced.head
        length = spliced.source_size - spliced.tail_at
        return Entry(info, fp, dicomweb.BodyPart(head, spliced.tail_at, length))


class TransformingStowSender(TransformingSender):
    """Send `spec`-transformed copies of the files to a DICOMweb destination."""

    def __init__(
        self,
        dest: Destination,
        spec: TransformSpec,
        pool: TransformPool,
        *,
        stop: threading.Event | None = None,
    ) -> None:
        self._own_waiting: tuple[float, float] | None = None
        stow = _SplicingStow.from_destination(dest, stop=stop)
        assert isinstance(stow, _SplicingStow)
        self._stow = stow
        super().__init__(Peer.from_destination(dest), spec, pool, stop=stop)
        stow.spliced = self._spliced  # the same dict: filled and emptied per run of copies

    # the copies go out over STOW-RS
    def send_with(
        self, specs: Sequence[ContextSpec], todo: Sequence[DicomInfo]
    ) -> Iterator[StoreResult]:
        yield from self._stow.send(todo)

    # the connection is the STOW-RS sender's
    @property
    def associations(self) -> int:
        return self._stow.associations

    @associations.setter
    def associations(self, value: int) -> None:
        pass  # (Sender's __init__ sets it; the count is the STOW-RS sender's)

    @property
    def waiting(self) -> tuple[float, float] | None:
        """The wait for a transform, or for a request in flight (the longer allowance)."""
        own, web = self._own_waiting, self._stow.waiting
        if own is None or (web is not None and web[1] > own[1]):
            return web
        return own

    @waiting.setter
    def waiting(self, value: tuple[float, float] | None) -> None:
        self._own_waiting = value

    @property
    def is_open(self) -> bool:
        return self._stow.is_open

    @property
    def round_trip(self) -> float:
        return self._stow.round_trip

    def open(self, specs: Sequence[ContextSpec]) -> float:
        return self._stow.open(specs)

    def recent_contexts(self) -> list[ContextSpec]:
        return self._stow.recent_contexts()

    def request_commitment(
        self, transaction_uid: str, references: Sequence[tuple[str, str]]
    ) -> Classification:
        return self._stow.request_commitment(transaction_uid, references)

    def serve(self, seconds: float) -> None:
        self._stow.serve(seconds)

    def release(self) -> None:
        self._stow.release()

    def abort(self) -> None:
        self._stow.abort()

    def close(self) -> None:
        self._stow.close()
