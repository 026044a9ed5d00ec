"""Storage Commitment before disposal: real outbox, real files, real SCPs (pynetdicom, Orthanc).

The worker is driven one `Worker.loop(now)` at a time on a clock the test moves; the peer is a
pynetdicom SCP of Storage and Storage Commitment that reports on the same association, as
told (committed, failed for some references, or not at all); Orthanc reports on a new
association, to the AE title declared in its ``DicomModalities``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, make_instance, start_server, wait_for
from orthanc import Orthanc
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, build_context, build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel
from stages import Calls, destination, disposer, queue_files

from forwarder import commitment
from forwarder.breaker import Breaker
from forwarder.commitmsg import (
    STORAGE_COMMITMENT_INSTANCE,
    Report,
    classify_action,
    decode_report,
    encode_report,
    encode_request,
    failure_reason,
)
from forwarder.config import Destination, RetrySettings, Settings
from forwarder.crew import Crew, Rules
from forwarder.deliver import Worker
from forwarder.dicomfile import EXPLICIT_LE, IMPLICIT_LE
from forwarder.dispose import Disposer
from forwarder.events import Events
from forwarder.metrics import NO_METRICS
from forwarder.outbox import Mark, Outbox, State
from forwarder.status import Action
from forwarder.trouble import OutboxTrouble

UIDS = [f"1.2.826.0.1.3680043.2.1125.77.{i}" for i in range(3)]
CT = "1.2.840.10008.5.1.4.1.1.2"
T0 = 1_000_000.0


# ------------------------------------------------------------------ the peer


@dataclass
class CommitSCP:
    """A pynetdicom Storage + Storage Commitment SCP that reports on the same association.

    ``fail`` maps SOP Instance UIDs to the Failure Reason reported for them (every time);
    ``gate`` is set to let reports go (cleared: reports wait); ``report`` False: never reports.
    """

    port: int = 0
    stored: list[str] = field(default_factory=list)
    requests: list[tuple[str, list[str]]] = field(default_factory=list)  # (tx, instances)
    reported: list[int] = field(default_factory=list)  # statuses of our N-EVENT-REPORT-RSPs
    fail: dict[str, int] = field(default_factory=dict)
    report: bool = True
    early: bool = False  # report before answering the N-ACTION (inside its handler)
    # stores of these SOP Instance UIDs are answered only once their event is set (10 s at most)
    hold: dict[str, threading.Event] = field(default_factory=dict)
    # statuses to answer the next N-ACTIONs with, in turn (then success); no report on a failure
    refuse: list[int] = field(default_factory=list)
    # set: N-ACTIONs are answered; cleared: the peer sits on them (10 s at most)
    answer: threading.Event = field(default_factory=threading.Event)
    gate: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # one report at a time: pynetdicom's threads sending on one association would race for
    # each other's responses
    sending: threading.Lock = field(default_factory=threading.Lock)
    server: Any = None


@pytest.fixture
def commit_scp() -> Iterator[CommitSCP]:
    peer = CommitSCP()
    peer.gate.set()
    peer.answer.set()
    ae = AE(ae_title="ARCHIVE")
    ae.supported_contexts = [
        build_context(cx.abstract_syntax) for cx in AllStoragePresentationContexts
    ]
    ae.add_supported_context(StorageCommitmentPushModel)

    def on_store(event: Any) -> int:
        held = peer.hold.get(str(event.request.AffectedSOPInstanceUID))
        if held is not None:
            held.wait(10)
        with peer.lock:
            peer.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def on_action(event: Any) -> tuple[int, None]:
        info = event.action_information
        refs = [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                for i in info.ReferencedSOPSequence]  # fmt: skip
        uid = str(info.TransactionUID)
        with peer.lock:
            peer.requests.append((uid, [r[1] for r in refs]))
        peer.answer.wait(10)
        with peer.lock:
            status = peer.refuse.pop(0) if peer.refuse else 0x0000
        if status != 0x0000:
            return status, None
        if peer.report:
            assoc = event.assoc

            def send() -> None:  # after the N-ACTION-RSP, on the same association
                if not peer.gate.wait(10) or not assoc.is_established:
                    return
                ds = Dataset()
                ds.TransactionUID = uid
                ok = [r for r in refs if r[1] not in peer.fail]
                bad = [r for r in refs if r[1] in peer.fail]
                if ok:
                    ds.ReferencedSOPSequence = [_item(c, i) for c, i in ok]
                if bad:
                    ds.FailedSOPSequence = [_item(c, i, peer.fail[i]) for c, i in bad]
                with peer.sending:
                    try:
                        rsp, _ = assoc.send_n_event_report(
                            ds,
                            2 if bad else 1,
                            StorageCommitmentPushModel,
                            STORAGE_COMMITMENT_INSTANCE,
                        )
                    except RuntimeError:  # the forwarder aborted it meanwhile (a timeout)
                        return
                with peer.lock:
                    peer.reported.append(int(rsp.Status) if "Status" in rsp else -1)

            if peer.early:
                send()
            else:
                thread = threading.Thread(target=send, name="commit-scp-report")
                peer.threads.append(thread)
                thread.start()
        return 0x0000, None

    peer.server = start_server(
        ae,
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_N_ACTION, on_action)],
    )
    peer.port = peer.server.server_address[1]
    yield peer
    peer.gate.set()
    peer.answer.set()
    for held in peer.hold.values():
        held.set()
    for t in peer.threads:
        t.join(15)
    peer.server.shutdown()


def _item(sop_class: str, sop_instance: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    if reason is not None:
        item.FailureReason = reason
    return item


# ------------------------------------------------------------------ the stages


@dataclass
class Rig:
    """A worker of one commitment destination and the disposer it hands finished rows to."""

    outbox: Outbox
    dest: Destination
    disposer: Disposer
    retry: RetrySettings
    clock: list[float] = field(default_factory=lambda: [T0])
    workers: list[Worker] = field(default_factory=list)

    def worker(self) -> Worker:
        rules = Rules(
            batch_size=64, lease_seconds=300, linger_seconds=0, follow_symlinks=False,
            retry=self.retry,
        )  # fmt: skip
        crew = Crew.of(self.dest, rules, Breaker(self.dest.name, self.outbox, self.clock[0]))
        w = Worker(
            crew,
            0,
            outbox=self.outbox,
            events=Events(),
            metrics=NO_METRICS,
            trouble=OutboxTrouble(),
            done=self.disposer.done,
            fatal=lambda reason, status: pytest.fail(f"fatal: {reason} ({status})"),
            hard_stop=threading.Event(),
            clock=lambda: self.clock[0],
        )
        crew.workers.append(w)
        self.workers.append(w)
        return w

    def until(self, w: Worker, done: Callable[[], Any], timeout: float = 15.0) -> Any:
        """Run `w.loop` at the current clock until `done()` (a deadline, not a blind sleep).

        Its idle waits are cut short (the clock the test moves says when work is due); a
        wait on its association for a report is not."""

        def step() -> Any:
            w.wake.set()
            w.loop(self.clock[0])
            return done()

        return wait_for(step, timeout=timeout, interval=0)


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / "in" / f"{i}.dcm" for i in range(len(UIDS))]
    for path, uid in zip(paths, UIDS, strict=True):
        make_instance(path, uid)
    return paths


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    """`make_rig(port, called_aet)`: a rig for a commitment destination at `port`."""
    rigs: list[Rig] = []

    def make(port: int, called_aet: str) -> Rig:
        box = Outbox(tmp_path / "outbox.sqlite3")
        commit = {"enabled": True, "timeout_seconds": 60}
        dest = destination(port, called_aet=called_aet, commitment=commit)
        retry = RetrySettings(initial_seconds=1, max_seconds=5, max_attempts=4)
        r = Rig(box, dest, disposer(box, tmp_path, Calls()), retry)
        rigs.append(r)
        return r

    yield make
    for r in rigs:
        for w in r.workers:
            w.close()
        r.outbox.close()


@pytest.fixture
def rig(make_rig: Callable[..., Rig], commit_scp: CommitSCP) -> Rig:
    return make_rig(commit_scp.port, "ARCHIVE")


def by_uid(outbox: Outbox) -> dict[str, Any]:
    return {d.sop_instance_uid: d for d in outbox.list(limit=100)}


# ------------------------------------------------------------------ tests: with the worker


def test_sources_are_deleted_only_after_the_success_report(
    rig: Rig, commit_scp: CommitSCP, files: list[Path]
) -> None:
    queue_files(rig.outbox, files, ["pacs"])
    commit_scp.gate.clear()  # the peer holds its report back
    w = rig.worker()
    w.loop(rig.clock[0])
    assert sorted(commit_scp.stored) == sorted(UIDS)  # stored on our association ...
    (tx,) = rig.outbox.commitments()
    assert commit_scp.requests == [(tx.uid, UIDS)]  # ... then asked, one N-ACTION for all
    assert tx.asked_at == T0 and tx.attempts == 1 and tx.next_ask_at == T0 + 60
    rows = by_uid(rig.outbox)
    assert {d.state for d in rows.values()} == {State.COMMITTING}
    assert {d.commit_uid for d in rows.values()} == {tx.uid}
    for _ in range(3):  # waiting for the report: nothing leaves the inbox
        w.loop(rig.clock[0])
    assert all(p.exists() for p in files)
    assert rig.outbox.awaiting_commitment() == {"pacs": (3, T0)}

    commit_scp.gate.set()
    rig.until(w, lambda: not any(p.exists() for p in files))
    assert {d.state for d in by_uid(rig.outbox).values()} == {State.SENT}
    assert rig.outbox.commitments() == []  # the transaction is closed
    wait_for(lambda: commit_scp.reported == [0x0000])  # the peer got our answer
    assert sorted(commit_scp.stored) == sorted(UIDS)  # nothing was sent twice
    assert len(commit_scp.requests) == 1


def test_a_report_that_comes_before_the_n_action_response_is_taken(
    rig: Rig, commit_scp: CommitSCP, files: list[Path]
) -> None:
    """A peer may report while we wait for its N-ACTION-RSP: it is answered on the spot."""
    queue_files(rig.outbox, files, ["pacs"])
    commit_scp.early = True
    w = rig.worker()
    rig.until(w, lambda: not any(p.exists() for p in files))
    assert {d.state for d in by_uid(rig.outbox).values()} == {State.SENT}
    assert commit_scp.reported == [0x0000] and len(commit_scp.requests) == 1
    w.wake.set()
    w.loop(rig.clock[0])  # nothing awaited any more: released at once (linger 0), not held
    assert not w.holds_association


def test_failed_references_are_stored_again_then_quarantined_with_the_reason(
    rig: Rig, commit_scp: CommitSCP, files: list[Path], tmp_path: Path
) -> None:
    queue_files(rig.outbox, files, ["pacs"])
    bad = UIDS[1]
    commit_scp.fail = {bad: 0x0110}  # the peer never keeps this one
    w = rig.worker()
    rig.until(w, lambda: not files[0].exists() and not files[2].exists())
    row = by_uid(rig.outbox)[bad]
    assert row.state is State.PENDING and row.last_status == 0x0110
    assert "not committed by the peer: 0x0110 processing failure" in (row.last_error or "")
    assert files[1].exists()
    # each resend is a real store of exactly that instance; refusals reach the limit (3)
    for _ in range(10):
        if by_uid(rig.outbox)[bad].state is State.QUARANTINED:
            break
        rig.clock[0] += 10  # past the backoff
        rig.until(w, lambda: by_uid(rig.outbox)[bad].state in (State.PENDING, State.QUARANTINED)
                  and not rig.outbox.commitments())  # fmt: skip
    row = by_uid(rig.outbox)[bad]
    assert row.state is State.QUARANTINED, row
    assert row.refusals == 3 and row.attempts == 3
    assert "gave up after 3 attempts" in (row.last_error or "")
    assert "0x0110 processing failure" in (row.last_error or "")
    assert sorted(commit_scp.stored) == sorted([UIDS[0], UIDS[2]] + [bad] * 3)
    assert {d.state for u, d in by_uid(rig.outbox).items() if u != bad} == {State.SENT}
    assert not files[1].exists()  # it left the inbox for the quarantine, with its reason
    (moved,) = (tmp_path / "quarantine").rglob("1.dcm")
    assert moved.is_file()


def test_a_pending_transaction_survives_a_restart_and_completes(
    rig: Rig, commit_scp: CommitSCP, files: list[Path], tmp_path: Path
) -> None:
    queue_files(rig.outbox, files, ["pacs"])
    commit_scp.report = False  # this peer does not report the first request
    w = rig.worker()
    w.loop(rig.clock[0])
    w.close()
    rig.outbox.close()  # the daemon stops (or dies) before any report

    rig.outbox = Outbox(tmp_path / "outbox.sqlite3")
    rig.disposer.outbox = rig.outbox
    (tx,) = rig.outbox.commitments()
    assert tx.attempts == 1 and tx.asked_at == T0
    assert [d.sop_instance_uid for d in rig.outbox.commitment_rows(tx.uid)] == UIDS
    commit_scp.report = True
    w = rig.worker()
    w.wake.set()  # it would otherwise wait (for real) until the request is due again
    w.loop(rig.clock[0])
    assert len(commit_scp.requests) == 1  # not asked again before the timeout
    rig.clock[0] += 61  # no report within timeout_seconds: asked again, not resent
    rig.until(w, lambda: not any(p.exists() for p in files))
    assert [r[0] for r in commit_scp.requests] == [tx.uid, tx.uid]
    assert [r[1] for r in commit_scp.requests] == [UIDS, UIDS]
    assert sorted(commit_scp.stored) == sorted(UIDS)  # stored once
    assert {d.state for d in by_uid(rig.outbox).values()} == {State.SENT}
    assert rig.outbox.commitments() == []


def test_no_report_after_the_retry_limit_quarantines(
    rig: Rig, commit_scp: CommitSCP, files: list[Path]
) -> None:
    queue_files(rig.outbox, files[:1], ["pacs"])
    commit_scp.report = False
    w = rig.worker()
    w.loop(rig.clock[0])
    for n in range(2, 5):  # asked again at each timeout, up to max_attempts (4) requests
        rig.clock[0] += 61
        rig.until(w, lambda n=n: len(commit_scp.requests) == n)
    rig.clock[0] += 61
    rig.until(w, lambda: not files[0].exists())
    (row,) = rig.outbox.list()
    assert row.state is State.QUARANTINED
    assert "no Storage Commitment report after 4 request(s)" in (row.last_error or "")
    assert commit_scp.stored == [UIDS[0]] and len(commit_scp.requests) == 4
    assert rig.outbox.commitments() == []


def _loop_until(
    workers: list[Worker], done: Callable[[], Any], now: float, timeout: float = 5.0
) -> Any:
    """Run each worker's `loop(now)` in turn (their idle waits cut short) until `done()`."""

    def step() -> Any:
        for w in workers:
            w.wake.set()  # no real idle wait between iterations: the clock does not move
            w.loop(now)
        return done()

    return wait_for(step, timeout=timeout, interval=0)


def test_a_batch_transaction_is_not_asked_by_another_worker_before_the_batch_ends(
    rig: Rig, commit_scp: CommitSCP, files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outcomes are committed every 50 ms while a batch goes on, which opens its transaction
    in the outbox mid-batch. A second association's worker of the destination ("auto") must
    not ask for it then: its N-ACTION would name only the instances stored so far, be
    accepted, and the rest of the batch would wait out timeout_seconds (an hour by default)
    before anyone asks for them."""
    from forwarder.verdict import Pending

    monkeypatch.setattr(Pending, "MAX_AGE", 0.0)  # each outcome committed as it comes
    queue_files(rig.outbox, files, ["pacs"])
    commit_scp.hold = {UIDS[2]: threading.Event()}  # the batch's last store is slow
    commit_scp.gate.clear()  # and the peer reports once the batch is over
    first, second = rig.worker(), rig.worker()
    batch = threading.Thread(target=first.loop, args=(rig.clock[0],), name="first-batch")
    batch.start()
    try:
        tx = wait_for(lambda: rig.outbox.commitments())[0]
        wait_for(lambda: len(rig.outbox.commitment_rows(tx.uid)) == 2)  # two stored so far
        second.wake.set()
        second.loop(rig.clock[0])  # nothing to send: only the transaction could be asked
    finally:
        commit_scp.hold[UIDS[2]].set()
        batch.join(15)
    assert not batch.is_alive()
    commit_scp.gate.set()
    _loop_until([first, second], lambda: not any(p.exists() for p in files), rig.clock[0])
    assert {d.state for d in by_uid(rig.outbox).values()} == {State.SENT}
    assert commit_scp.requests == [(tx.uid, UIDS)]  # one request, for the whole batch


def test_a_peer_that_never_answers_the_n_action_is_not_a_hung_worker(
    rig: Rig, commit_scp: CommitSCP, files: list[Path]
) -> None:
    """Each request waits its own DIMSE timeout, as each store does: a peer sitting on its
    N-ACTIONs while several transactions are due must not make the worker look hung to the
    watchdog (the stall limit is about one request, not ASKS_PER_LOOP of them)."""
    rig.dest = destination(
        commit_scp.port, called_aet="ARCHIVE", dimse_timeout=1,
        commitment={"enabled": True, "timeout_seconds": 60},
    )  # fmt: skip
    queue_files(rig.outbox, files[:2], ["pacs"])
    for i in range(2):  # two batches stored earlier, each its own transaction
        (d,) = rig.outbox.claim("pacs", 1, T0, 300)
        rig.outbox.mark_many([Mark(d.id, State.COMMITTING, 0, commit_uid=f"1.2.{i}")], T0)
    commit_scp.answer.clear()  # the peer takes the requests and never answers
    w = rig.worker()
    asking = threading.Thread(target=w.loop, args=(rig.clock[0],), name="asking")
    asking.start()
    busy = 0.0  # the longest the worker went without progress (the watchdog's measure)
    while asking.is_alive():
        since = w.busy_since
        if since is not None:
            busy = max(busy, time.monotonic() - since)
        asking.join(0.05)
    assert len(commit_scp.requests) == 2
    assert 0.9 < busy < 1.6  # one request's DIMSE timeout (1 s), not two (2 s)
    for tx in rig.outbox.commitments():  # each asked once, without an answer: counted
        assert tx.attempts == 1 and tx.asked_at is None
        assert "no response" in (tx.last_error or "")


def test_a_batch_needing_128_contexts_leaves_room_for_storage_commitment(
    rig: Rig, commit_scp: CommitSCP, tmp_path: Path
) -> None:
    """64 SOP classes need 128 contexts (each its own syntax and the implicit VR fallback):
    the most one association may propose, before Storage Commitment is added to it. The
    batch must be split so that it fits, not fail with "129 presentation contexts"."""
    from test_send import make_file

    classes = [cx.abstract_syntax for cx in AllStoragePresentationContexts][:64]
    paths = [make_file(tmp_path / "in" / f"{i}.dcm", sop_class=c) for i, c in enumerate(classes)]
    queue_files(rig.outbox, paths, ["pacs"])
    w = rig.worker()
    rig.until(w, lambda: not any(p.exists() for p in paths))
    assert len(commit_scp.stored) == 64
    assert {d.state for d in rig.outbox.list(limit=100)} == {State.SENT}
    assert len(w.crew.contexts) < 128  # what the next association proposes, with room for it


def test_a_request_refused_is_asked_again_under_a_new_transaction_uid(
    rig: Rig, commit_scp: CommitSCP, files: list[Path]
) -> None:
    """PS3.4 J.3.2.1.2: once the N-ACTION is answered with a failure status, its Transaction
    UID "is no longer active and shall not be reused": the next request names a new one (the
    rows move to it), and the report on that one commits them."""
    queue_files(rig.outbox, files, ["pacs"])
    commit_scp.refuse = [0x0213]  # resource limitation: asked again after a backoff
    w = rig.worker()
    w.loop(rig.clock[0])
    (first,) = rig.outbox.commitments()
    assert first.attempts == 1 and first.last_status == 0x0213 and first.asked_at is None
    rig.clock[0] += 10  # past the backoff
    rig.until(w, lambda: not any(p.exists() for p in files))
    (refused, uids), (asked, again) = commit_scp.requests
    assert refused == first.uid and asked != first.uid and uids == again == UIDS
    assert {d.state for d in by_uid(rig.outbox).values()} == {State.SENT}
    assert rig.outbox.commitments() == []
    assert sorted(commit_scp.stored) == sorted(UIDS)  # asked again, not stored again


def test_a_destination_without_commitment_is_unchanged(
    tmp_path: Path, commit_scp: CommitSCP, files: list[Path]
) -> None:
    with Outbox(tmp_path / "plain.sqlite3") as box:
        queue_files(box, files, ["pacs"])
        r = Rig(box, destination(commit_scp.port), disposer(box, tmp_path, Calls()),
                RetrySettings())  # fmt: skip
        w = r.worker()
        try:
            w.loop(T0)
        finally:
            w.close()
        assert {d.state for d in box.list()} == {State.SENT}
        assert not any(p.exists() for p in files)
        assert commit_scp.requests == [] and box.commitments() == []


# ------------------------------------------------------------------ a report on a new association


@dataclass
class ReportSCP:
    """The receiver's part for reports, in miniature: a pynetdicom SCP whose
    EVT_N_EVENT_REPORT calls `commitment.handle_report`."""

    port: int
    settled: list[commitment.Settled]


@pytest.fixture
def report_scp(tmp_path: Path) -> Iterator[Callable[[Rig], ReportSCP]]:
    servers: list[Any] = []

    def start(rig: Rig) -> ReportSCP:
        ae = AE(ae_title="FORWARDER")
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        settled: list[commitment.Settled] = []

        def on_report(event: Any) -> tuple[int, None]:
            result = commitment.handle_report(
                rig.outbox,
                str(event.assoc.requestor.ae_title),
                event.event_information,
                int(event.event_type),
                retry=rig.retry,
                now=rig.clock[0],
            )
            rig.disposer.done(result.finished)
            settled.append(result)
            return result.status, None

        server = start_server(ae, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
        servers.append(server)
        return ReportSCP(server.server_address[1], settled)

    yield start
    for s in servers:
        s.shutdown()


def _report_as_a_pacs(port: int, report: Report) -> int:
    """Open an association as the archive would (SCP role for Storage Commitment) and send
    the N-EVENT-REPORT; returns the status we answered."""
    ae = AE(ae_title="ARCHIVE")
    ae.add_requested_context(StorageCommitmentPushModel)
    role = build_role(StorageCommitmentPushModel, scp_role=True)
    assoc = ae.associate("127.0.0.1", port, ae_title="FORWARDER", ext_neg=[role])
    assert assoc.is_established
    try:
        ds = Dataset()
        ds.TransactionUID = report.transaction_uid
        if report.committed:
            ds.ReferencedSOPSequence = [_item(c, i) for c, i in report.committed]
        if report.failed:
            ds.FailedSOPSequence = [_item(c, i, r) for c, i, r in report.failed]
        rsp, _ = assoc.send_n_event_report(
            ds, report.event_type, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
        )
        return int(rsp.Status)
    finally:
        assoc.release()


def test_a_report_on_a_new_association_goes_through_handle_report(
    rig: Rig,
    commit_scp: CommitSCP,
    files: list[Path],
    report_scp: Callable[[Rig], ReportSCP],
) -> None:
    queue_files(rig.outbox, files, ["pacs"])
    commit_scp.report = False  # this peer reports on a new association, to our receiver
    w = rig.worker()
    w.loop(rig.clock[0])
    (tx,) = rig.outbox.commitments()
    receiver = report_scp(rig)
    report = Report(tx.uid, 2, ((CT, UIDS[0]), (CT, UIDS[2])), ((CT, UIDS[1], 0x0112),))
    assert _report_as_a_pacs(receiver.port, report) == 0x0000
    (settled,) = receiver.settled
    assert (settled.committed, settled.resent, settled.quarantined) == (2, 1, 0)
    rows = by_uid(rig.outbox)
    assert rows[UIDS[0]].state is State.SENT and rows[UIDS[2]].state is State.SENT
    assert rows[UIDS[1]].state is State.PENDING
    assert "0x0112 no such object instance" in (rows[UIDS[1]].last_error or "")
    assert not files[0].exists() and files[1].exists() and not files[2].exists()
    # the same report again: nothing awaits that transaction any more, answered success
    assert _report_as_a_pacs(receiver.port, report) == 0x0000
    again = receiver.settled[1]
    assert (again.committed, again.resent, again.unknown) == (0, 0, 3)
    assert by_uid(rig.outbox)[UIDS[1]].state is State.PENDING


def test_handle_report_answers_processing_failure_for_a_report_it_cannot_read(
    tmp_path: Path,
) -> None:
    with Outbox(tmp_path / "o.sqlite3") as box:
        ds = Dataset()  # no Transaction UID
        result = commitment.handle_report(box, "ARCHIVE", ds, 1, retry=RetrySettings())
        assert result.status == commitment.PROCESSING_FAILURE
        ds.TransactionUID = "1.2.3"
        result = commitment.handle_report(box, "ARCHIVE", ds, 3, retry=RetrySettings())
        assert result.status == commitment.PROCESSING_FAILURE  # event type 3 is not a result


# ------------------------------------------------------------------ Orthanc


def test_orthanc_commits_and_reports_on_a_new_association(
    make_rig: Callable[..., Rig],
    make_orthanc: Callable[..., Orthanc],
    report_scp: Callable[[Rig], ReportSCP],
    files: list[Path],
    tmp_path: Path,
) -> None:
    """Debian's Orthanc 1.10 as the archive: it accepts our N-ACTION and reports on an
    association it opens to the AE title of ours it knows (``DicomModalities``), here a
    small SCP calling `commitment.handle_report` (the receiver's part). An instance it does
    not have is reported failed (0x0112) and stored again; the sources go only after the
    report that commits them."""
    # our report SCP first: Orthanc is told where to report when it starts; then the rig's
    # destination is Orthanc
    rig = make_rig(1, "ORTHANC")
    receiver = report_scp(rig)
    peer = make_orthanc(modalities={"forwarder": ["FORWARDER", "127.0.0.1", receiver.port]})
    rig.dest = destination(
        peer.dicom_port, called_aet=peer.aet,
        commitment={"enabled": True, "timeout_seconds": 60},
    )  # fmt: skip
    # file 1 "was stored" and awaits a transaction, but Orthanc never got it
    queue_files(rig.outbox, files[1:2], ["pacs"])
    _stored(rig.outbox, "2.25.1234567", rig.clock[0])
    queue_files(rig.outbox, [files[0], files[2]], ["pacs"])
    w = rig.worker()
    rig.until(
        w,
        lambda: not files[0].exists() and not files[2].exists()
        and by_uid(rig.outbox)[UIDS[1]].state is State.PENDING,
        timeout=30,
    )  # fmt: skip
    assert peer.instances() and sorted(peer.wait_for([UIDS[0], UIDS[2]])) == sorted(
        [UIDS[0], UIDS[2]]
    )
    row = by_uid(rig.outbox)[UIDS[1]]
    assert row.last_status == 0x0112 and files[1].exists()
    rig.clock[0] += 10  # past its backoff: stored again, for real this time, then committed
    rig.until(w, lambda: not files[1].exists(), timeout=30)
    assert {d.state for d in by_uid(rig.outbox).values()} == {State.SENT}
    assert rig.outbox.commitments() == []
    assert {s.status for s in receiver.settled} == {0x0000}
    assert sum(s.committed for s in receiver.settled) == 3
    w.close()  # before Orthanc stops: it would wait for our association to end


def test_daemon_with_receiver_deletes_sources_only_after_orthancs_report(
    make_orthanc: Callable[..., Orthanc], tmp_path: Path
) -> None:
    """The whole path, once the C-STORE receiver (issue 13, part 1) is in: `forwarder run`
    stores to Orthanc with commitment on, Orthanc reports on a new association to
    ``[receive]``, and the receiver hands the report to `commitment.handle_report`."""
    if "receive" not in Settings.model_fields:
        pytest.skip(
            "needs the C-STORE receiver ([receive], forwarder/receiver.py, issue 13 part 1) "
            "to take Orthanc's report on a new association: enable once it lands, accepts "
            "the Storage Commitment context and hands N-EVENT-REPORT-RQs to "
            "commitment.answer_report"
        )
    from test_daemon import Forwarder, dest

    fwd = Forwarder(tmp_path)
    fwd.inbox.mkdir()
    listen = free_port()
    peer = make_orthanc(modalities={"forwarder": ["FORWARDER", "127.0.0.1", listen]})
    try:
        fwd.configure(
            [dest("orthanc", peer.dicom_port, called_aet=peer.aet,
                  commitment={"enabled": True, "timeout_seconds": 60})],
            receive={
                "listen": f"127.0.0.1:{listen}",
                "ae_title": "FORWARDER",
                "dir": str(tmp_path / "received"),
            },
        ).start()  # fmt: skip
        for i, uid in enumerate(UIDS):
            staged = tmp_path / "staging" / f"{i}.dcm"
            make_instance(staged, uid)
            staged.rename(fwd.inbox / f"{i}.dcm")
        fwd.wait(lambda: not fwd.inbox_files(), timeout=30, what="the inbox emptied")
        assert sorted(peer.wait_for(UIDS)) == sorted(UIDS)
        assert {d.state for d in fwd.deliveries()} == {State.SENT}
        log = fwd.text()
        for uid in UIDS:  # each was stored, awaited its commitment, then was committed
            stored = log.index(f"stored: {fwd.inbox}")
            assert log.index(f"({uid}) -> orthanc: 0x0000 success") > stored
            assert re.search(rf"committed: \S+ \({re.escape(uid)}\) -> orthanc", log)
        assert "commitment report from" in log
        assert fwd.stop() == 0
    finally:
        fwd.cleanup()


# ------------------------------------------------------------------ the outbox's part


def _stored(box: Outbox, uid: str, now: float = T0) -> None:
    """Claim every due row of "pacs" and record it stored, awaiting transaction `uid`."""
    marks = [
        Mark(d.id, State.COMMITTING, 0, commit_uid=uid) for d in box.claim("pacs", 100, now, 300)
    ]
    box.mark_many(marks, now)


def test_the_outbox_keeps_transactions_and_leases_their_requests(
    tmp_path: Path, files: list[Path]
) -> None:
    path = tmp_path / "o.sqlite3"
    with Outbox(path) as box:
        queue_files(box, files, ["pacs"])
        _stored(box, "1.2.3")
        assert box.next_ask("pacs") == T0 and box.next_ask("other") is None
        (tx,) = box.claim_asks("pacs", 10, T0, 300)
        assert tx.uid == "1.2.3" and tx.asked_at is None and tx.attempts == 0
        assert box.claim_asks("pacs", 10, T0, 300) == []  # leased: nobody else asks it
        box.asked("1.2.3", T0, T0 + 5, accepted=False, status=0xA700, error="0xA700 busy")
        box.asked("1.2.3", T0, T0 + 5, accepted=False, counted=False)  # no association
        tx = box.commitment("1.2.3")
        assert tx is not None and (tx.attempts, tx.last_status, tx.last_error) == (
            1, 0xA700, "0xA700 busy"
        )  # fmt: skip
        box.asked("1.2.3", T0, T0 + 60, accepted=True, status=0)
    with Outbox(path) as box:  # a restart
        (tx,) = box.commitments()
        assert (tx.asked_at, tx.attempts, tx.next_ask_at) == (T0, 2, T0 + 60)
        assert (tx.last_status, tx.last_error) == (0, None)
        assert box.counts()["pacs"][State.COMMITTING] == 3
        # a file with a row awaiting commitment is not "delivered": its rows are kept
        pruned = box.prune_delivered(T0 + 10**9)
        assert pruned.deleted == 0 and len(box.list()) == 3
        rows = box.commitment_rows("1.2.3")
        changed = box.settle_commitment(
            "1.2.3", [Mark(rows[0].id, State.SENT), Mark(rows[1].id, State.SENT)], T0 + 1
        )
        assert changed == [rows[0].id, rows[1].id]
        assert box.commitment("1.2.3") is not None  # one row still awaits it
        box.settle_commitment("1.2.3", [Mark(rows[2].id, State.QUARANTINED, 0x0110, "no")], T0 + 2)
        assert box.commitment("1.2.3") is None and box.commitments() == []
        states = {d.id: d.state for d in box.list()}
        assert states == {
            rows[0].id: State.SENT, rows[1].id: State.SENT, rows[2].id: State.QUARANTINED
        }  # fmt: skip
        assert all(d.commit_uid is None for d in box.list())


def test_a_transaction_held_by_a_batch_cut_short_is_asked_at_start_up(
    tmp_path: Path, files: list[Path]
) -> None:
    """kill -9 mid-batch: the stored rows' transaction was held back until the batch's lease
    end; the next start-up makes it due at once, as it queues the in-flight rows again."""
    path = tmp_path / "o.sqlite3"
    with Outbox(path) as box:
        queue_files(box, files, ["pacs"])
        (asked,) = box.claim("pacs", 1, T0, 300)  # a batch stored, asked and answered
        box.mark_many([Mark(asked.id, State.COMMITTING, 0, commit_uid="1.3")], T0)
        box.claim_asks("pacs", 10, T0, 300)
        box.asked("1.3", T0, T0 + 3600, accepted=True, status=0)
        first, _cut = box.claim("pacs", 2, T0, 300)  # a batch the stop cuts short
        box.mark_many([Mark(first.id, State.COMMITTING, 0, None, T0 + 300, commit_uid="1.2")], T0)
        assert box.next_ask("pacs") == T0 + 300  # held: the batch goes on
    with Outbox(path) as box:  # the next start-up
        assert box.recover_leases(T0 + 10, all_inflight=True) == 1  # `_cut` is queued again
        assert box.next_ask("pacs") == T0 + 10
        held, done = box.commitment("1.2"), box.commitment("1.3")
        assert held is not None and held.next_ask_at == T0 + 10
        assert done is not None and done.next_ask_at == T0 + 3600  # its timeout: not touched


def test_a_batch_longer_than_its_lease_keeps_its_transaction_held(
    tmp_path: Path, files: list[Path]
) -> None:
    """The upkeep renews the leases of a batch a live worker is still sending (a slow peer):
    the transaction its stored rows opened stays held back with them, so that no other
    worker asks for a part of the batch when the first lease would have ended."""
    path = tmp_path / "o.sqlite3"
    with Outbox(path) as box:
        queue_files(box, files, ["pacs"])
        first, rest = box.claim("pacs", 2, T0, 300)
        box.mark_many([Mark(first.id, State.COMMITTING, 0, None, T0 + 300, commit_uid="1.2")], T0)
        assert box.next_ask("pacs") == T0 + 300
        assert box.renew_leases([first.id, rest.id], T0 + 550) == 1  # `rest` is in flight
        assert box.next_ask("pacs") == T0 + 550
        box.commitment_due("1.2", T0 + 400)  # the batch ends: asked at once
        assert box.next_ask("pacs") == T0 + 400
        box.claim_asks("pacs", 10, T0 + 400, 300)
        box.asked("1.2", T0 + 400, T0 + 4000, accepted=True, status=0)
        box.renew_leases([first.id], T0 + 900)  # asked already: its timeout stands
        assert box.next_ask("pacs") == T0 + 4000


# ------------------------------------------------------------------ the messages (pure)


@pytest.mark.parametrize("ts", [EXPLICIT_LE, IMPLICIT_LE])
def test_a_report_round_trips(ts: str) -> None:
    report = Report(
        "1.2.3.4", 2, ((CT, "1.1"), (CT, "1.2")), ((CT, "1.3", 0x0110), (CT, "1.4", None))
    )
    assert decode_report(2, encode_report(report, ts), ts) == report


def test_the_request_data_set_names_the_transaction_and_the_instances() -> None:
    from io import BytesIO

    from pydicom.filereader import read_dataset

    data = encode_request("1.2.3.4", [(CT, "1.1"), (CT, "1.2")], IMPLICIT_LE)
    ds = read_dataset(BytesIO(data), is_implicit_VR=True, is_little_endian=True)
    assert ds.TransactionUID == "1.2.3.4"
    assert [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID)
            for i in ds.ReferencedSOPSequence] == [(CT, "1.1"), (CT, "1.2")]  # fmt: skip


@pytest.mark.parametrize(
    ("status", "action"),
    [
        (0x0000, Action.SENT),
        (0xA700, Action.RETRY),
        (0x0213, Action.RETRY),
        (0x0110, Action.RETRY_FEW),
        (0x0112, Action.RETRY_FEW),  # no such SOP instance: not "SOP class not supported"
        (0x0118, Action.DESTINATION),  # no such SOP class: Storage Commitment not supported
        (0x0123, Action.DESTINATION),  # no such action
        (0x0122, Action.DESTINATION),  # SOP class not supported: the service, not the instances
        (0x0124, Action.DESTINATION),  # not authorised
        (0x0210, Action.RETRY_FRESH),
        (None, Action.RETRY),  # no response
    ],
)
def test_n_action_statuses_are_classified_like_other_dimse_statuses(
    status: int | None, action: Action
) -> None:
    assert classify_action(status).action is action


def test_failure_reasons_are_named() -> None:
    assert failure_reason(0x0110) == "0x0110 processing failure"
    assert failure_reason(0x0112) == "0x0112 no such object instance"
    assert failure_reason(0x0213) == "0x0213 resource limitation"
    assert failure_reason(None) == "no reason given"


def test_config_check_says_reports_on_a_new_association_need_the_receiver() -> None:
    from forwarder.commands.config import notes

    settings = Settings.model_validate(
        {
            "destinations": [
                {"name": "pacs", "host": "h", "port": 104, "commitment": {"enabled": True}},
                {"name": "plain", "host": "h", "port": 104},
            ]
        }
    )
    (line,) = notes(settings)
    assert line.startswith("destinations.0.commitment (pacs): warning: [receive] is not listening")
    assert settings.destinations[0].commitment.timeout_seconds == 3600
    assert not settings.destinations[1].commitment.enabled


def test_status_find_and_queue_show_stored_awaiting_commitment(
    tmp_path: Path, files: list[Path]
) -> None:
    from test_commands import cli

    box_path = tmp_path / "cli.sqlite3"
    now = time.time()
    with Outbox(box_path) as box:
        queue_files(box, files, ["pacs"])
        _stored(box, "2.25.42", now - 120)
    config = tmp_path / "f.toml"
    config.write_text(
        f'[outbox]\npath = "{box_path}"\n\n[[destinations]]\nname = "pacs"\nhost = "h"\n'
        "port = 104\n[destinations.commitment]\nenabled = true\n",
        encoding="utf-8",
    )
    status = cli("status", "--config", str(config))
    assert status.status == 0, status.err
    assert "pacs: 3 stored, awaiting commitment since " in status.out and "2m" in status.out
    from forwarder.health import status_line

    with Outbox(box_path, readonly=True) as box:  # systemd's STATUS= line counts them too
        assert status_line(box, []).startswith("0 queued, 0 in flight, 3 awaiting commitment, ")
    (pacs,) = cli("status", "--config", str(config), "--json").json()["destinations"]
    assert pacs["awaiting_commitment"] == 3 and pacs["awaiting_commitment_since"]
    with Outbox(box_path) as box:  # the peer does not take the request: status says why
        box.asked("2.25.42", now, now + 600, accepted=False, counted=False,
                  error="the peer did not accept the Storage Commitment Push Model")  # fmt: skip
    status = cli("status", "--config", str(config))
    assert "request not taken: the peer did not accept the Storage Commitment" in status.out
    (pacs,) = cli("status", "--config", str(config), "--json").json()["destinations"]
    assert pacs["commitment_error"] == "the peer did not accept the Storage Commitment Push Model"
    found = cli("find", UIDS[0], "--config", str(config))
    assert found.status == 0, found.err
    assert "stored, awaiting commitment" in found.out and "transaction 2.25.42" in found.out
    listed = cli("queue", "list", "--state", "committing", "--config", str(config), "--json")
    rows = listed.json()["deliveries"]
    assert {(d["state"], d["commit_uid"]) for d in rows} == {("committing", "2.25.42")}
    text = cli("queue", "list", "--state", "committing", "--config", str(config)).out
    assert "stored, awaiting commitment since" in text


def test_metrics_show_how_long_deliveries_have_awaited_commitment(
    tmp_path: Path, files: list[Path]
) -> None:
    """An alert on the backlog's age must see a pile-up awaiting commitment too (a peer
    reporting to a receiver that is not listening): its own gauge, by destination."""
    from conftest import free_port
    from test_metrics import scrape, value

    from forwarder.metrics import start_metrics

    with Outbox(tmp_path / "m.sqlite3") as box:
        queue_files(box, files, ["pacs"])
        _stored(box, "2.25.7", time.time() - 600)
        port = free_port()
        m = start_metrics(
            f"127.0.0.1:{port}", box, destinations=lambda: ["pacs", "plain"], stats=lambda: {}
        )
        try:
            s = scrape(f"http://127.0.0.1:{port}/metrics")
        finally:
            m.close()
    age = value(s, "forwarder_oldest_awaiting_commitment_age_seconds", destination="pacs")
    assert 600 <= age < 700
    assert value(s, "forwarder_oldest_awaiting_commitment_age_seconds", destination="plain") == 0
    assert value(s, "forwarder_queue_depth", destination="pacs", state="committing") == 3
    assert value(s, "forwarder_oldest_pending_age_seconds", destination="pacs") == 0


def test_daemon_keeps_the_sources_until_the_peer_commits(
    tmp_path: Path, commit_scp: CommitSCP
) -> None:
    """`forwarder run` with a commitment destination: the files stay in the inbox while the
    peer holds its report back, and go once it reports on the same association."""
    from test_daemon import Forwarder, dest

    fwd = Forwarder(tmp_path)
    fwd.inbox.mkdir()
    commit_scp.gate.clear()
    try:
        fwd.configure(
            [dest("archive", commit_scp.port, called_aet="ARCHIVE",
                  commitment={"enabled": True, "timeout_seconds": 60})]
        ).start()  # fmt: skip
        for i, uid in enumerate(UIDS):
            staged = tmp_path / "staging" / f"{i}.dcm"
            make_instance(staged, uid)
            staged.rename(fwd.inbox / f"{i}.dcm")

        def asked() -> list[str]:
            return sorted(u for _tx, uids in list(commit_scp.requests) for u in uids)

        fwd.wait(lambda: asked() == sorted(UIDS), what="every instance asked (N-ACTION)")
        assert len(fwd.inbox_files()) == 3  # stored, but not committed yet: kept
        assert {d.state for d in fwd.deliveries()} == {State.COMMITTING}
        commit_scp.gate.set()
        fwd.wait(lambda: not fwd.inbox_files(), what="the inbox emptied")
        assert {d.state for d in fwd.deliveries()} == {State.SENT}
        assert sorted(commit_scp.stored) == sorted(UIDS)
        log = fwd.text()
        assert "commitment report from archive on our association" in log
        assert log.count("committed: ") == 3
        assert fwd.stop() == 0
    finally:
        fwd.cleanup()


def test_a_peer_without_storage_commitment_keeps_the_files_and_says_why(
    make_rig: Callable[..., Rig], scp: Any, files: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A Storage SCP that does not accept the Storage Commitment context: the stores go on,
    the request is a configuration error (not counted), the files stay."""
    rig = make_rig(scp.port, "ANY-SCP")
    queue_files(rig.outbox, files, ["pacs"])
    w = rig.worker()
    w.loop(rig.clock[0])
    assert sorted(scp.uids()) == sorted(UIDS)
    (tx,) = rig.outbox.commitments()
    assert tx.asked_at is None and tx.attempts == 0
    assert tx.next_ask_at == rig.clock[0] + rig.retry.max_seconds
    assert "did not accept the Storage Commitment Push Model" in (tx.last_error or "")
    assert "did not accept the Storage Commitment Push Model" in caplog.text
    assert all(p.exists() for p in files)
    assert {d.state for d in rig.outbox.list()} == {State.COMMITTING}


def test_a_peer_without_storage_commitment_never_gets_the_files_quarantined_by_age(
    make_rig: Callable[..., Rig], scp: Any, files: list[Path]
) -> None:
    """A configuration error, as a store's HOLD: the request is asked again every
    retry.max_seconds and never counted, and retry.max_age_seconds does not quarantine the
    instances meanwhile (they were stored; nothing says the peer refuses them)."""
    rig = make_rig(scp.port, "ANY-SCP")
    rig.retry = RetrySettings(initial_seconds=1, max_seconds=5, max_attempts=4,
                              max_age_seconds=60)  # fmt: skip
    queue_files(rig.outbox, files, ["pacs"])
    w = rig.worker()
    w.loop(rig.clock[0])
    for _ in range(3):  # well past max_age_seconds, asked again at each max_seconds
        rig.clock[0] += 61
        w.wake.set()
        w.loop(rig.clock[0])
    assert all(p.exists() for p in files)
    assert {d.state for d in rig.outbox.list()} == {State.COMMITTING}
    (tx,) = rig.outbox.commitments()
    assert tx.attempts == 0 and tx.next_ask_at == rig.clock[0] + 5
    assert "did not accept the Storage Commitment Push Model" in (tx.last_error or "")


def test_transactions_open_when_commitment_is_turned_off_are_still_settled(
    rig: Rig, commit_scp: CommitSCP, files: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    queue_files(rig.outbox, files[:2], ["pacs"])
    commit_scp.report = False
    first = rig.worker()
    first.loop(rig.clock[0])
    first.close()
    rig.dest = destination(commit_scp.port, called_aet="ARCHIVE")  # a reload turned it off
    commit_scp.report = True
    queue_files(rig.outbox, files[2:], ["pacs"])
    w = rig.worker()
    rig.clock[0] += 61  # the open transaction is due again
    rig.until(w, lambda: not any(p.exists() for p in files))
    assert "commitment is off, but transactions asked for before are open" in caplog.text
    assert {d.state for d in by_uid(rig.outbox).values()} == {State.SENT}
    assert [sorted(uids) for _tx, uids in commit_scp.requests] == [UIDS[:2], UIDS[:2]]
    assert rig.outbox.commitments() == []


def test_a_file_goes_only_when_the_commitment_destination_committed_and_the_others_acked(
    rig: Rig, commit_scp: CommitSCP, scp: Any, files: list[Path]
) -> None:
    queue_files(rig.outbox, files, ["pacs", "plain"])
    commit_scp.gate.clear()
    committing = rig.worker()
    committing.loop(rig.clock[0])
    plain_rig = Rig(rig.outbox, destination(scp.port, name="plain"), rig.disposer, rig.retry)
    plain = plain_rig.worker()
    try:
        plain.loop(rig.clock[0])
        assert sorted(scp.uids()) == sorted(UIDS)
        states = {(d.destination, d.state) for d in rig.outbox.list()}
        assert states == {("pacs", State.COMMITTING), ("plain", State.SENT)}
        assert all(p.exists() for p in files)  # acked by one, not committed by the other
        commit_scp.gate.set()
        rig.until(committing, lambda: not any(p.exists() for p in files))
        assert {d.state for d in rig.outbox.list()} == {State.SENT}
    finally:
        plain.close()


def test_answer_report_takes_a_request_as_read_off_the_wire(
    rig: Rig, commit_scp: CommitSCP, files: list[Path]
) -> None:
    """What the receiver's acceptor (on forwarder.wire) hands over: the N-EVENT-REPORT-RQ's
    command and data set; it gets the N-EVENT-REPORT-RSP to send back."""
    from io import BytesIO

    from pydicom.filereader import read_dataset

    from forwarder.wire import Request, _element, _group, _us, decode_command

    queue_files(rig.outbox, files[:2], ["pacs"])
    commit_scp.report = False
    w = rig.worker()
    w.loop(rig.clock[0])
    (tx,) = rig.outbox.commitments()
    command = _group(
        _element(0x00000002, b"1.2.840.10008.1.20.1"),
        _us(0x00000100, 0x0100),  # N-EVENT-REPORT-RQ
        _us(0x00000110, 9),
        _us(0x00000800, 0x0000),
        _element(0x00001000, STORAGE_COMMITMENT_INSTANCE.encode()),
        _us(0x00001002, 1),
    )
    data = encode_report(Report(tx.uid, 1, ((CT, UIDS[0]), (CT, UIDS[1])), ()), EXPLICIT_LE)
    request = Request(3, decode_command(command), data)
    answer, settled = commitment.answer_report(
        rig.outbox, "ARCHIVE", request, EXPLICIT_LE, retry=rig.retry, now=rig.clock[0]
    )
    rsp = read_dataset(BytesIO(answer), is_implicit_VR=True, is_little_endian=True)
    assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status) == (0x8100, 9, 0)
    assert rsp.EventTypeID == 1
    assert settled.committed == 2 and len(settled.finished) == 2
    rig.disposer.done(settled.finished)
    assert not files[0].exists() and not files[1].exists()
    # a damaged data set: 0x0110, nothing changes
    bad = Request(3, decode_command(command), b"\x08\x00\x95")
    answer, settled = commitment.answer_report(
        rig.outbox, "ARCHIVE", bad, EXPLICIT_LE, retry=rig.retry, now=rig.clock[0]
    )
    assert read_dataset(BytesIO(answer), True, True).Status == 0x0110
