"""The interface a delivery worker drives: what a C-STORE `Sender` and a `StowSender` offer."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

from forwarder.contexts import ContextSpec
from forwarder.dicomfile import DicomInfo
from forwarder.sender import ReportHandler, StoreResult
from forwarder.status import Classification

__all__ = ["DeliverySender"]


class DeliverySender(Protocol):
    """One worker's connection to its destination (`forwarder.deliver.Worker`).

    `send` yields one `StoreResult` per item as soon as it is known and raises
    `AssociationFailed` when the destination cannot be reached or refuses us (items not yet
    yielded are given back, no attempt counted). `waiting` is (monotonic since, extra seconds)
    while it waits for something slower than a store, for the stall check.
    """

    associations: int
    waiting: tuple[float, float] | None
    commitment: bool  # Storage Commitment on its associations (DIMSE only)
    on_report: ReportHandler | None

    @property
    def is_open(self) -> bool: ...

    @property
    def round_trip(self) -> float: ...

    def send(self, items: Iterable[DicomInfo]) -> Iterator[StoreResult]: ...

    def open(self, specs: Sequence[ContextSpec]) -> float: ...

    def recent_contexts(self) -> list[ContextSpec]: ...

    def request_commitment(
        self, transaction_uid: str, references: Sequence[tuple[str, str]]
    ) -> Classification: ...

    def serve(self, seconds: float) -> None: ...

    def release(self) -> None: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...
