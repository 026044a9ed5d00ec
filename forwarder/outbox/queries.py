"""The outbox's read-only queries: what is known of files, destinations and deliveries."""

from __future__ import annotations

import builtins
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from forwarder.outbox.db import Database
from forwarder.outbox.records import Commitment, Delivery, DestinationInfo, Heartbeat, State
from forwarder.outbox.schema import (
    LIST_FILTERS,
    LIST_ORDER,
    MANY,
    SELECT,
    SQL_ACKLOG_MARKS,
    SQL_AWAITING,
    SQL_COMMITMENT,
    SQL_COMMITMENT_ROWS,
    SQL_COMMITMENTS,
    SQL_COUNTS,
    SQL_DEST_INFO,
    SQL_FILE_ROWS,
    SQL_FILE_STATES,
    SQL_FIND,
    SQL_FREE_PAGES,
    SQL_HORIZON,
    SQL_IS_KNOWN,
    SQL_LAST_FAILURES,
    SQL_NEXT_ASK,
    SQL_NEXT_DUE,
    SQL_OLDEST_PENDING,
    SQL_PAUSED_UNTIL,
    SQL_READ_HEARTBEAT,
    SQL_SENT_SINCE,
    commitment,
    compose,
    delivery,
    path_bytes,
    path_str,
)

__all__ = ["Queries"]


class Queries(Database):
    """The reads of `Outbox`: each one statement, one consistent snapshot, never a write.

    They work on an outbox opened ``readonly=True`` as well (the operator commands).
    """

    # ---------------------------------------------------------------------------- files

    def is_known(self, path: str, size: int, mtime_ns: int) -> bool:
        """Return True when any row, in any state, exists for this exact file version."""
        return bool(self._query("is_known", SQL_IS_KNOWN, (path_bytes(path), size, mtime_ns)))

    def known_files(
        self, keys: Iterable[tuple[str, int, int]]
    ) -> builtins.set[tuple[str, int, int]]:
        """The ``(path, size, mtime_ns)`` of `keys` that have rows: `is_known` for a batch."""
        return set(self._rows_of_paths("known_files", set(keys)))

    def acklog_marks(self) -> dict[str, int]:
        """Ack log segment name -> the last of its records queued (see forwarder.acklog)."""
        return {str(name): int(seq) for name, seq in self._query("acklog", SQL_ACKLOG_MARKS)}

    def files_states(
        self, keys: Iterable[tuple[str, int, int]]
    ) -> dict[tuple[str, int, int], dict[str, State]]:
        """`file_states` for a batch: ``(path, size, mtime_ns) -> {destination: state}``.

        Keys without rows are left out.
        """
        out: dict[tuple[str, int, int], dict[str, State]] = {}
        for key, dest, state in self._rows_of_paths("files_states", set(keys), states=True):
            out.setdefault(key, {})[dest] = State(state)
        return out

    def _rows_of_paths(
        self, what: str, keys: builtins.set[tuple[str, int, int]], *, states: bool = False
    ) -> Iterator[Any]:
        """The rows of `keys` (each a file version), looked up by path through the
        ``deliveries_file`` index: their key, or (key, destination, state) with `states`."""
        paths = sorted({path_bytes(k[0]) for k in keys})
        cols = "path, size, mtime_ns" + (", destination, state" if states else "")
        for i in range(0, len(paths), MANY):
            chunk = paths[i : i + MANY]
            sql = f"SELECT {cols} FROM deliveries WHERE path IN ({', '.join('?' * len(chunk))})"
            for row in self._query(what, sql, chunk):
                key = (path_str(row[0]), row[1], row[2])
                if key in keys:  # other versions of the same path are not asked for
                    yield (key, row[3], row[4]) if states else key

    def file_rows(self, path: str, size: int, mtime_ns: int) -> builtins.list[Delivery]:
        """Return the rows of this exact file version (one per destination), by id."""
        params = (path_bytes(path), size, mtime_ns)
        return [delivery(row) for row in self._query("file_rows", SQL_FILE_ROWS, params)]

    def file_states(self, path: str, size: int, mtime_ns: int) -> dict[str, State]:
        """Return destination -> state of every row of this exact file version."""
        rows = self._query("file_states", SQL_FILE_STATES, (path_bytes(path), size, mtime_ns))
        return {dest: State(state) for dest, state in rows}

    # ---------------------------------------------------------------------------- workers

    def next_due(self, destination: str, now: float) -> float | None:
        """Return when `claim` will next find work for `destination`, or None if it never will.

        That is the earliest ``next_attempt_at`` of its `State.PENDING` rows, but not before
        the end of a pause (``paused_until > now``). It may be in the past: work is due now.
        """
        due = self._query("next_due", SQL_NEXT_DUE, (destination,))[0][0]
        if due is None:
            return None
        paused = self._query("next_due", SQL_PAUSED_UNTIL, (destination, now))
        return max(float(due), float(paused[0][0])) if paused else float(due)

    # ---------------------------------------------------------------------------- commitment

    def next_ask(self, destination: str) -> float | None:
        """When the next Storage Commitment request of `destination` is due (None: none)."""
        due = self._query("next_ask", SQL_NEXT_ASK, (destination,))[0][0]
        return None if due is None else float(due)

    def commitment(self, uid: str) -> Commitment | None:
        """The open transaction `uid`, or None (unknown, or settled and closed)."""
        rows = self._query("commitment", SQL_COMMITMENT, (uid,))
        return commitment(rows[0]) if rows else None

    def commitments(self) -> builtins.list[Commitment]:
        """Every open transaction, by destination and age."""
        return [commitment(r) for r in self._query("commitments", SQL_COMMITMENTS)]

    def commitment_rows(self, uid: str) -> builtins.list[Delivery]:
        """The rows still waiting on transaction `uid` (`State.COMMITTING`), by id."""
        return [delivery(r) for r in self._query("commitment_rows", SQL_COMMITMENT_ROWS, (uid,))]

    def awaiting_commitment(self) -> dict[str, tuple[int, float]]:
        """Destination -> (rows stored and awaiting commitment, since when the oldest was)."""
        rows = self._query("awaiting_commitment", SQL_AWAITING)
        return {dest: (count, float(since or 0)) for dest, count, since in rows}

    # ---------------------------------------------------------------------------- breaker

    def destination_info(self) -> dict[str, DestinationInfo]:
        """Return name -> circuit-breaker state of every destination that has one."""
        rows = self._query("destination_info", SQL_DEST_INFO)
        return {row[0]: DestinationInfo(*row) for row in rows}

    # ---------------------------------------------------------------------------- health

    def read_heartbeat(self) -> Heartbeat | None:
        """Return the last heartbeat, or None when no daemon ever wrote one."""
        rows = self._query("read_heartbeat", SQL_READ_HEARTBEAT)
        if not rows:
            return None
        pid, updated_at, started_at, info = rows[0]
        return Heartbeat(
            pid=pid, updated_at=updated_at, started_at=started_at, info=json.loads(info)
        )

    # ---------------------------------------------------------------------------- operator

    def counts(self) -> dict[str, dict[State, int]]:
        """Return destination -> state -> rows, with every `State` present (0 when none)."""
        result: dict[str, dict[State, int]] = {}
        for dest, state, count in self._query("counts", SQL_COUNTS):
            result.setdefault(dest, dict.fromkeys(State, 0))[State(state)] = count
        return result

    def sent_since(self, since: float) -> dict[str, int]:
        """Return destination -> rows that became `State.SENT` at or after `since`."""
        return dict(self._query("sent_since", SQL_SENT_SINCE, (since,)))

    def oldest_pending(self) -> dict[str, float]:
        """Return destination -> ``created_at`` of its oldest PENDING or INFLIGHT row."""
        return dict(self._query("oldest_pending", SQL_OLDEST_PENDING))

    def last_failures(self) -> dict[str, Delivery]:
        """Return destination -> its row that failed last (by ``last_attempt_at``).

        Among rows still waiting (PENDING, INFLIGHT) or QUARANTINED that carry a
        ``last_error``: the most recent refusal or error of each destination, for
        ``forwarder status``. Association failures are in `destination_info`.
        """
        rows = self._query("last_failures", SQL_LAST_FAILURES)
        return {row[2]: delivery(row) for row in rows}

    def list(
        self,
        *,
        destination: str | None = None,
        states: Sequence[State] | None = None,
        study_uid: str | None = None,
        path: str | None = None,
        limit: int = 100,
    ) -> builtins.list[Delivery]:
        """Return up to `limit` rows matching every filter given, oldest (lowest id) first."""
        params: dict[str, Any] = {
            "destination": destination,
            "states": None if states is None else json.dumps([int(s) for s in states]),
            "study_uid": study_uid,
            "path": None if path is None else path_bytes(path),
            "limit": limit,
        }
        sql = compose(SELECT + " WHERE 1", LIST_FILTERS, params) + LIST_ORDER
        return [delivery(row) for row in self._query("list", sql, params)]

    def find(self, uid: str) -> builtins.list[Delivery]:
        """Return every row whose SOP Instance UID or Study Instance UID is `uid`, by id."""
        return [delivery(row) for row in self._query("find", SQL_FIND, {"uid": uid})]

    # ---------------------------------------------------------------------------- retention

    def retention_horizon(self) -> float | None:
        """Return the time before which delivered rows were pruned, or None if none ever were.

        Every SENT or GONE row done before it is deleted, but for those `prune_delivered`
        was told to spare and those of a file with a row still waiting or quarantined.
        """
        rows = self._query("retention_horizon", SQL_HORIZON)
        return float(rows[0][0]) if rows else None

    def free_pages(self) -> int:
        """Return the free pages `vacuum_step` can give back to the file system.

        0 for a file not yet in incremental auto_vacuum mode (see
        `forwarder.outbox.db.VACUUM_AT_OPEN_MAX_BYTES`): its free pages are only reused by
        new rows.
        """
        return int(self._query("free_pages", SQL_FREE_PAGES)[0][0])
