"""GroupCommit: each caller waits for its own rows; callers that come together share a commit."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from forwarder.dicomfile import DicomInfo
from forwarder.groupcommit import GroupCommit
from forwarder.outbox import Outbox, OutboxError


def info(path: Path, n: int) -> DicomInfo:
    return DicomInfo(path, 10, n, "1.2.840.10008.5.1.4.1.1.7", f"1.2.3.{n}", "1.2.840.10008.1.2.1",
                     None, 0)  # fmt: skip


def test_concurrent_callers_share_transactions_and_all_rows_land(tmp_path: Path) -> None:
    release = threading.Event()
    with Outbox(tmp_path / "o.sqlite3") as ob:
        calls: list[int] = []

        def enqueue(rows: Sequence[tuple[DicomInfo, Sequence[str]]], now: float) -> int:
            calls.append(len(rows))
            release.wait(5)  # the first commit is slow: the others gather behind it
            return ob.enqueue_routed(rows, now)

        gc = GroupCommit(enqueue, lambda: 0.0)
        results: list[int] = []

        def one(n: int) -> None:
            results.append(gc.commit([(info(tmp_path / f"{n}.dcm", n), ("a",))], [tmp_path]))

        threads = [threading.Thread(target=one, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        while len(calls) < 1:
            threading.Event().wait(0.005)
        release.set()
        for t in threads:
            t.join(10)
        assert sum(calls) == 8 and len(calls) < 8  # grouped
        assert all(r >= 1 for r in results)
        assert len(ob.list(limit=100)) == 8
        assert gc.instances == 8 and gc.groups == len(calls)


def test_an_error_reaches_every_caller_of_the_group(tmp_path: Path) -> None:
    def enqueue(rows: Sequence[tuple[DicomInfo, Sequence[str]]], now: float) -> int:
        raise OutboxError("disk full")

    gc = GroupCommit(enqueue, lambda: 0.0)
    with pytest.raises(OutboxError):
        gc.commit([(info(tmp_path / "a.dcm", 1), ("a",))], [tmp_path])
    with pytest.raises(FileNotFoundError):  # the folder fsync comes first
        gc.commit([(info(tmp_path / "b.dcm", 2), ("a",))], [tmp_path / "missing"])
