"""The outbox's writes: queue, claim, record outcomes, pause destinations, operator changes."""

from __future__ import annotations

import builtins
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from forwarder.dicomfile import DicomInfo
from forwarder.outbox.db import is_unique_violation
from forwarder.outbox.pruning import Pruning
from forwarder.outbox.records import (
    Commitment,
    Delivery,
    Mark,
    OutboxError,
    PathConflictError,
    State,
)
from forwarder.outbox.schema import (
    RETRY_NOW_BASE,
    RETRY_NOW_FILTERS,
    SQL_ACKLOG_MARK,
    SQL_ASKED,
    SQL_CLAIM,
    SQL_CLAIM_ASKS,
    SQL_CLOSE_COMMITMENT,
    SQL_COMMIT_QUARANTINED,
    SQL_COMMIT_RETRY,
    SQL_COMMITMENT_DUE,
    SQL_COUNT_DUE,
    SQL_DEST_ERROR,
    SQL_DEST_SUCCESS,
    SQL_DISCARD,
    SQL_ENQUEUE,
    SQL_HEARTBEAT,
    SQL_MARK_COMMITTED,
    SQL_MARK_GONE,
    SQL_MARK_QUARANTINED,
    SQL_MARK_RETRY,
    SQL_MARK_SENT,
    SQL_MARK_STORED,
    SQL_OPEN_COMMITMENT,
    SQL_PAUSE,
    SQL_PAUSED_UNTIL,
    SQL_RECOVER_ALL,
    SQL_RECOVER_ASKS,
    SQL_RECOVER_EXPIRED,
    SQL_RELEASE,
    SQL_RENAME_COMMITMENT,
    SQL_RENAME_COMMITTING,
    SQL_RENEW_HELD_COMMITMENT,
    SQL_RENEW_LEASE,
    SQL_REQUEUE,
    SQL_RESUME,
    SQL_SET_PATH,
    check_absolute,
    commitment,
    compose,
    delivery,
    path_bytes,
)

__all__ = ["Outbox"]

LOGGER = logging.getLogger("forwarder.outbox")


class Outbox(Pruning):
    """The durable queue of deliveries in one SQLite file.

    Parameters
    ----------
    path
        The database file. Unless `readonly`, its parent directory is created, and so is the
        schema, and an older schema is migrated to `SCHEMA_VERSION`.
    readonly
        Open with ``mode=ro`` for queries (the CLI): nothing is ever written, writing methods
        raise `OutboxError`, and queries read a WAL snapshot without blocking the daemon.
    busy_timeout
        Seconds to wait for another process's write transaction before `OutboxBusyError`.

    Raises
    ------
    OutboxError
        When the file or its directory cannot be opened or created, the file is not an
        outbox, its schema is newer than this code, a read-only open finds no database or an
        older schema, or the SQLite library is too old.

    Notes
    -----
    Every method takes the time as ``now`` (unix seconds) and never reads the clock, so tests
    drive time. Methods are safe to call from any thread; see the package docstring. The
    read-only queries are those of `Queries`, the pruning that of `Pruning`.
    """

    _started_at: float | None = None
    """Time of this outbox's first `heartbeat`."""

    # ---------------------------------------------------------------------------- enqueuer

    def enqueue(self, rec: DicomInfo, destinations: Sequence[str], now: float) -> int:
        """Queue one file for each destination that has no row yet for this file version.

        New rows are `State.PENDING`, due at `now`. The same unchanged file enqueued twice adds
        nothing; a changed file (same path, other size or mtime) gets new rows.

        Returns
        -------
        int
            The number of rows added.

        Raises
        ------
        ValueError
            When ``rec.path`` is not absolute.
        """
        return self.enqueue_many((rec,), destinations, now)

    def enqueue_many(
        self, recs: Sequence[DicomInfo], destinations: Sequence[str], now: float
    ) -> int:
        """`enqueue` for many files in one transaction (all or none); returns rows added."""
        return self.enqueue_routed([(rec, destinations) for rec in recs], now)

    def enqueue_routed(
        self,
        routed: Sequence[tuple[DicomInfo, Sequence[str]]],
        now: float,
        marks: Mapping[str, int] | None = None,
    ) -> int:
        """Queue each file for its own destinations, all in one transaction (all or none);
        returns rows added. A file with no destination gets no row. `marks` (ack log segment
        name -> the last record these rows come from, see forwarder.acklog) are recorded in
        the same transaction."""
        for rec, _ in routed:
            check_absolute(rec.path)
        params = (
            {
                "path": path_bytes(rec.path),
                "size": rec.size,
                "mtime_ns": rec.mtime_ns,
                "sop_class_uid": rec.sop_class_uid,
                "sop_instance_uid": rec.sop_instance_uid,
                "transfer_syntax": rec.transfer_syntax,
                "study_uid": rec.study_uid,
                "destination": dest,
                "now": now,
                "dataset_offset": rec.dataset_offset,
            }
            for rec, destinations in routed
            for dest in destinations
        )
        if not marks and not any(destinations for _, destinations in routed):
            return 0
        with self._write("enqueue") as conn:
            before = conn.total_changes
            conn.executemany(SQL_ENQUEUE, params)
            added = conn.total_changes - before
            if marks:
                conn.executemany(SQL_ACKLOG_MARK, marks.items())
            return added

    # ---------------------------------------------------------------------------- workers

    def claim(
        self,
        destination: str,
        limit: int,
        now: float,
        lease_seconds: float,
        share: int = 1,
    ) -> builtins.list[Delivery]:
        """Lease up to `limit` due rows of `destination` to the caller.

        With `share` > 1 (that many callers drain the destination together), a caller takes
        at most 1/`share` of the due rows (at least one), so that near the end of a backlog
        every caller gets some and they finish together. Counting is bounded by
        `limit` x `share` rows: it costs the same whatever the backlog.

        In one ``BEGIN IMMEDIATE`` transaction, the `State.PENDING` rows of `destination` with
        ``next_attempt_at <= now`` become `State.INFLIGHT` with ``lease_until = now +
        lease_seconds``, oldest first by ``(next_attempt_at, id)``. No two callers, in any
        thread or process, ever get the same row until its lease is released or recovered.

        Returns
        -------
        list of Delivery
            In ``(next_attempt_at, id)`` order; empty when nothing is due or the destination is
            paused (``paused_until > now``).
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds}")
        with self._write("claim") as conn:
            if conn.execute(SQL_PAUSED_UNTIL, (destination, now)).fetchone() is not None:
                return []
            if share > 1:
                cap = limit * share
                due = conn.execute(
                    SQL_COUNT_DUE, {"destination": destination, "now": now, "cap": cap}
                ).fetchone()[0]
                limit = min(limit, max(1, -(-due // share)))
            rows = conn.execute(
                SQL_CLAIM,
                {
                    "destination": destination,
                    "now": now,
                    "limit": limit,
                    "lease_until": now + lease_seconds,
                },
            ).fetchall()
        claimed = [delivery(row) for row in rows]
        claimed.sort(key=lambda d: (d.next_attempt_at, d.id))  # RETURNING has no order
        return claimed

    def mark_many(self, marks: Sequence[Mark], now: float) -> None:
        """Record several outcomes in one transaction: one fsync for a whole batch.

        Each `Mark` follows the rules of the single-row method for its state (`mark_sent`,
        `mark_retry`, `mark_quarantined`, `mark_gone`); rows those would leave alone are
        left alone here too (logged).
        """
        ignored: builtins.list[tuple[Mark, str]] = []
        with self._write("mark_many") as conn:
            for m in marks:
                params: dict[str, Any] = {"id": m.delivery_id, "now": now, "status": m.status}
                if m.state in (State.SENT, State.COMMITTING):
                    sent = {
                        **params,
                        "warning": m.error,
                        "sent_as": m.sent_as,
                        "sent_uid": m.sent_uid,
                    }
                    if m.state is State.SENT:
                        row = conn.execute(SQL_MARK_SENT, sent).fetchone()
                    else:
                        if m.commit_uid is None:
                            raise ValueError("a stored delivery needs its commit_uid")
                        sent["commit_uid"] = m.commit_uid
                        row = conn.execute(SQL_MARK_STORED, sent).fetchone()
                        if row is not None:
                            ask_at = now if m.next_attempt_at is None else m.next_attempt_at
                            conn.execute(
                                SQL_OPEN_COMMITMENT,
                                {
                                    "uid": m.commit_uid,
                                    "destination": row[0],
                                    "now": now,
                                    "ask_at": ask_at,
                                },
                            )
                    if row is None:
                        ignored.append((m, "unknown, not in flight or already sent"))
                    else:
                        conn.execute(SQL_DEST_SUCCESS, {"name": row[0], "now": now})
                    continue
                if m.state is State.PENDING:
                    if m.next_attempt_at is None:
                        raise ValueError("a retry needs next_attempt_at")
                    sql = SQL_MARK_RETRY
                    params.update(
                        error=m.error or "",
                        next_attempt_at=m.next_attempt_at,
                        counted=1 if m.count_attempt else 0,
                        refusal=1 if m.refusal and m.count_attempt else 0,
                    )
                elif m.state is State.QUARANTINED:
                    sql = SQL_MARK_QUARANTINED
                    params.update(error=m.error or "", refusal=1 if m.refusal else 0)
                elif m.state is State.GONE:
                    sql = SQL_MARK_GONE
                    params = {"id": m.delivery_id, "now": now, "error": m.error or ""}
                else:
                    raise ValueError(f"cannot mark a delivery {m.state.name}")
                if not conn.execute(sql, params).rowcount:
                    ignored.append((m, "it is not in flight"))
        for m, why in ignored:
            LOGGER.warning(
                "outbox: marking delivery %d %s ignored: %s", m.delivery_id, m.state.name, why
            )

    # ---------------------------------------------------------------------------- commitment

    def claim_asks(
        self, destination: str, limit: int, now: float, lease_seconds: float
    ) -> builtins.list[Commitment]:
        """Lease up to `limit` Storage Commitment transactions of `destination` due to be
        asked (``next_ask_at <= now``): their ``next_ask_at`` becomes ``now + lease_seconds``,
        so no other caller takes them meanwhile, and a crash has them asked again then.
        Record each request's outcome with `asked`.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        params = {
            "destination": destination,
            "now": now,
            "limit": limit,
            "lease_until": now + lease_seconds,
        }
        with self._write("claim_asks") as conn:
            rows = conn.execute(SQL_CLAIM_ASKS, params).fetchall()
        return sorted((commitment(r) for r in rows), key=lambda c: (c.next_ask_at, c.uid))

    def commitment_due(self, uid: str, now: float) -> None:
        """The batch that opened transaction `uid` is over: it is due to be asked at `now`.

        A batch opens its transaction held back (its marks' ``next_attempt_at``, the end of
        its lease) as soon as its first outcome is committed, so that no other worker of the
        destination asks for a part of the batch meanwhile. A transaction asked already, or
        unknown, is left alone.
        """
        with self._write("commitment_due") as conn:
            conn.execute(SQL_COMMITMENT_DUE, {"uid": uid, "now": now})

    def renew_commitment(self, uid: str, new_uid: str, now: float) -> None:
        """Give transaction `uid` a new Transaction UID, with the rows waiting on it, in one
        transaction (a request answered with a failure status ends a UID: PS3.4 J.3.2.1.2).
        Its attempts and times are kept. An unknown `uid` is left alone."""
        params = {"old": uid, "new": new_uid, "now": now}
        with self._write("renew_commitment") as conn:
            if conn.execute(SQL_RENAME_COMMITMENT, params).rowcount:
                conn.execute(SQL_RENAME_COMMITTING, params)

    def asked(
        self,
        uid: str,
        now: float,
        next_ask_at: float,
        *,
        accepted: bool,
        status: int | None = None,
        error: str | None = None,
        counted: bool = True,
    ) -> None:
        """Record a request (N-ACTION-RQ) for transaction `uid`: the peer `accepted` it (its
        ``asked_at`` becomes `now`) or not (`status`, `error`), one more attempt when
        `counted`, and when to ask next. An unknown (settled) transaction is left alone."""
        params = {
            "uid": uid,
            "asked_at": now if accepted else None,
            "counted": 1 if counted else 0,
            "next_ask_at": next_ask_at,
            "status": status,
            "error": error,
        }
        with self._write("asked") as conn:
            conn.execute(SQL_ASKED, params)

    def settle_commitment(self, uid: str, marks: Sequence[Mark], now: float) -> builtins.list[int]:
        """Record what became of rows waiting on transaction `uid`, in one transaction.

        Each `Mark` takes a `State.COMMITTING` row of `uid` to SENT (committed; ``done_at``
        now), PENDING (stored again at ``next_attempt_at``) or QUARANTINED; with ``refusal``
        one more refusal is counted (the store itself was counted as an attempt already).
        Rows no longer waiting on `uid` are left alone. The transaction is closed once no row
        waits on it. Returns the ids changed.
        """
        changed: builtins.list[int] = []
        with self._write("settle_commitment") as conn:
            for m in marks:
                params: dict[str, Any] = {"id": m.delivery_id, "uid": uid, "now": now}
                if m.state is State.SENT:
                    sql = SQL_MARK_COMMITTED
                else:
                    params.update(
                        status=m.status, error=m.error or "", refusal=1 if m.refusal else 0
                    )
                    if m.state is State.PENDING:
                        if m.next_attempt_at is None:
                            raise ValueError("a retry needs next_attempt_at")
                        sql = SQL_COMMIT_RETRY
                        params["next_attempt_at"] = m.next_attempt_at
                    elif m.state is State.QUARANTINED:
                        sql = SQL_COMMIT_QUARANTINED
                    else:
                        raise ValueError(f"cannot settle a commitment as {m.state.name}")
                if conn.execute(sql, params).rowcount:
                    changed.append(m.delivery_id)
            conn.execute(SQL_CLOSE_COMMITMENT, {"uid": uid})
        return changed

    # ---------------------------------------------------------------------------- workers

    def mark_sent(
        self, delivery_id: int, status: int, now: float, warning: str | None = None
    ) -> None:
        """Record that the peer stored the instance (success or warning `status`).

        The row becomes `State.SENT` (from any other state: the peer has it, whatever else
        happened meanwhile), ``done_at = now``, one more attempt, ``last_status = status``,
        ``last_error = warning``. The destination's ``last_success_at`` becomes `now` and its
        ``consecutive_failures`` 0. A row already SENT, or an unknown id, is left alone (logged).
        """
        self.mark_many([Mark(delivery_id, State.SENT, status, warning)], now)

    def mark_retry(
        self,
        delivery_id: int,
        status: int | None,
        error: str,
        now: float,
        next_attempt_at: float,
        *,
        count_attempt: bool = True,
        refusal: bool = False,
    ) -> None:
        """Put an in-flight row back to `State.PENDING`, due at `next_attempt_at`.

        With `count_attempt` (a transient failure of this instance) ``attempts`` grows by one
        and ``first_attempt_at`` is set if unset; without (a destination outage: no
        association) neither changes, so an outage burns no attempts and starts no age clock.
        ``last_attempt_at``, ``last_status`` and ``last_error`` are recorded either way. A row
        that is not `State.INFLIGHT` (its lease was recovered, an operator acted) is left alone.
        """
        mark = Mark(
            delivery_id, State.PENDING, status, error, next_attempt_at, count_attempt, refusal
        )
        self.mark_many([mark], now)

    def mark_quarantined(
        self,
        delivery_id: int,
        status: int | None,
        error: str,
        now: float,
        *,
        refusal: bool = False,
    ) -> None:
        """An in-flight row becomes `State.QUARANTINED` (counts an attempt; sets ``done_at``).

        With `refusal` the attempt is counted in ``refusals`` too. A row that is not
        `State.INFLIGHT` is left alone (logged).
        """
        mark = Mark(delivery_id, State.QUARANTINED, status, error, refusal=refusal)
        self.mark_many([mark], now)

    def mark_gone(self, delivery_id: int, error: str, now: float) -> None:
        """An in-flight row becomes `State.GONE`: its file vanished (no attempt counted).

        A row that is not `State.INFLIGHT` is left alone (logged).
        """
        self.mark_many([Mark(delivery_id, State.GONE, None, error)], now)

    def release(self, delivery_ids: Sequence[int], now: float) -> None:
        """Return in-flight rows to `State.PENDING` without counting an attempt.

        For shutdown, or a destination paused in the middle of a batch. Their
        ``next_attempt_at`` is unchanged, so they are first in line again. Rows not in flight
        are left alone.
        """
        if not delivery_ids:
            return
        with self._write("release") as conn:
            conn.executemany(SQL_RELEASE, ({"id": i, "now": now} for i in delivery_ids))

    def renew_leases(self, delivery_ids: Sequence[int], until: float) -> int:
        """Extend to `until` the lease of those `delivery_ids` still in flight: a worker that
        holds them is alive and still sending (a slow peer, a long transform); and hold the
        Storage Commitment transaction its stored ones opened as long. Returns the rows
        renewed."""
        if not delivery_ids:
            return 0
        params = [{"id": i, "until": until} for i in delivery_ids]
        with self._write("renew_leases") as conn:
            renewed = conn.executemany(SQL_RENEW_LEASE, params).rowcount
            # the batch's transaction, held back until the batch ends (`commitment_due`)
            conn.executemany(SQL_RENEW_HELD_COMMITMENT, params)
            return renewed

    def recover_leases(self, now: float, *, all_inflight: bool = False) -> int:
        """Return rows whose lease expired (``lease_until <= now``) to `State.PENDING`.

        With `all_inflight` every in-flight row is returned, expired or not: for daemon
        start-up, when no worker of ours can still hold one; so are Storage Commitment
        transactions never asked yet (held back by a batch, or leased by a request the stop
        cut short): due at `now`. Returns the rows recovered.
        """
        sql = SQL_RECOVER_ALL if all_inflight else SQL_RECOVER_EXPIRED
        with self._write("recover_leases") as conn:
            if all_inflight:
                conn.execute(SQL_RECOVER_ASKS, {"now": now})
            return conn.execute(sql, {"now": now}).rowcount

    def set_path(self, old_path: str, new_path: str, *, now: float | None = None) -> int:
        """Point every row of `old_path` at `new_path` (the file was moved); returns rows changed.

        ``updated_at`` becomes `now` when given.

        Raises
        ------
        PathConflictError
            When `new_path` already has rows for the same (size, mtime_ns, destination).
        ValueError
            When `new_path` is not absolute.
        """
        check_absolute(new_path)
        params = {
            "old_path": path_bytes(old_path),
            "new_path": path_bytes(new_path),
            "now": now,
        }
        try:
            with self._write("set_path") as conn:
                return conn.execute(SQL_SET_PATH, params).rowcount
        except OutboxError as exc:
            if is_unique_violation(exc.__cause__):
                raise PathConflictError(
                    f"cannot move rows of {old_path} to {new_path}: rows for that file exist"
                ) from exc.__cause__
            raise

    # ---------------------------------------------------------------------------- breaker

    def pause_destination(
        self, name: str, until: float, reason: str, now: float, *, failure: bool = False
    ) -> None:
        """Make `claim` return nothing for `name` until `until`.

        ``paused_at`` keeps the start of a pause that is extended before it ran out. With
        `failure` the same transaction records `reason` as a failure to reach it (as
        `record_destination_error`): the breaker's state is written in one piece.
        """
        params = {"name": name, "until": until, "reason": reason, "now": now}
        with self._write("pause_destination") as conn:
            if failure:
                conn.execute(SQL_DEST_ERROR, {"name": name, "error": reason, "now": now})
            conn.execute(SQL_PAUSE, params)

    def resume_destination(self, name: str) -> None:
        """End a pause of `name` now (no-op when not paused)."""
        with self._write("resume_destination") as conn:
            conn.execute(SQL_RESUME, (name,))

    def record_destination_error(self, name: str, error: str, now: float) -> None:
        """Record a failure to reach `name`: last error, its time, one more consecutive failure.

        `mark_sent` resets ``consecutive_failures`` to 0.
        """
        with self._write("record_destination_error") as conn:
            conn.execute(SQL_DEST_ERROR, {"name": name, "error": error, "now": now})

    # ---------------------------------------------------------------------------- health

    def heartbeat(self, now: float, info: Mapping[str, Any]) -> None:
        """Record that this process is alive at `now`, with a summary `info` for `read_heartbeat`.

        `info` is stored as JSON; values JSON cannot hold are stored as their ``str``.
        ``started_at`` is the time of this `Outbox`'s first heartbeat, not kept across
        restarts (the pid is no proof of the same process: in a container it is always 1).
        """
        if self._started_at is None:
            self._started_at = now
        payload = json.dumps(dict(info), sort_keys=True, default=str)
        params = {"pid": os.getpid(), "now": now, "started_at": self._started_at, "info": payload}
        with self._write("heartbeat") as conn:
            conn.execute(SQL_HEARTBEAT, params)

    # ---------------------------------------------------------------------------- operator

    def retry_now(
        self, now: float, *, destination: str | None = None, study_uid: str | None = None
    ) -> int:
        """Make `State.PENDING` rows waiting for a retry due at `now`; returns rows changed.

        Limited to `destination` and/or `study_uid` when given. Attempts are not reset.
        """
        params = {"now": now, "destination": destination, "study_uid": study_uid}
        sql = compose(RETRY_NOW_BASE, RETRY_NOW_FILTERS, params)
        with self._write("retry_now") as conn:
            return conn.execute(sql, params).rowcount

    def requeue(self, delivery_ids: Sequence[int], now: float, new_path: str | None = None) -> int:
        """Send QUARANTINED or GONE rows again: back to `State.PENDING`, due at `now`.

        ``attempts`` is reset to 0 and ``first_attempt_at`` and ``done_at`` cleared; the last
        status and error are kept for reference. The path becomes `new_path` when given (the
        operator moved the file back). Rows in other states are left alone.

        Returns
        -------
        int
            The rows requeued.

        Raises
        ------
        PathConflictError
            When `new_path` already has rows for the same file version and destination.
        """
        if new_path is not None:
            check_absolute(new_path)
        stored = None if new_path is None else path_bytes(new_path)
        params = ({"id": i, "now": now, "new_path": stored} for i in delivery_ids)
        try:
            with self._write("requeue") as conn:
                before = conn.total_changes
                conn.executemany(SQL_REQUEUE, params)
                return conn.total_changes - before
        except OutboxError as exc:
            if is_unique_violation(exc.__cause__):
                raise PathConflictError(
                    f"cannot requeue at {new_path}: rows for that file exist"
                ) from exc.__cause__
            raise

    def discard(self, delivery_ids: Sequence[int], reason: str, now: float) -> int:
        """Close QUARANTINED rows as `State.GONE` with `reason`; returns rows changed.

        For an operator deleting quarantined files: those destinations will never get them.
        ``done_at`` and ``last_status`` are kept; `reason` replaces ``last_error``. Rows in
        other states are left alone.
        """
        if not delivery_ids:
            return 0
        params = ({"id": i, "reason": reason, "now": now} for i in delivery_ids)
        with self._write("discard") as conn:
            before = conn.total_changes
            conn.executemany(SQL_DISCARD, params)
            return conn.total_changes - before
