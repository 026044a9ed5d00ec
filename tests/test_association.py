"""Tests for forwarder.association: the A-ASSOCIATE PDUs (pynetdicom as the reference
encoder/decoder) and the association's life against real peers on loopback."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import SCP, StoreSCP, data_file, free_port, make_instance, wait_for
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from forwarder.association import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    AssociationFailed,
    Peer,
    decode_associate_ac,
    encode_associate_rq,
    open_association,
)
from forwarder.dicomfile import inspect
from forwarder.sender import Sender
from forwarder.status import Action

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG2000 = "1.2.840.10008.1.2.4.91"


def test_associate_rq_decodes_with_pynetdicom() -> None:
    contexts = [(1, CT, (JPEG2000,)), (3, CT, (EXPLICIT_LE, IMPLICIT_LE)), (5, MR, (IMPLICIT_LE,))]
    body = encode_associate_rq("ARCHIVE", "GATEWAY", contexts, 65536)
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(struct.pack(">BxL", 0x01, len(body)) + body)
    prim = pdu.to_primitive()
    assert prim.called_ae_title == "ARCHIVE"
    assert prim.calling_ae_title == "GATEWAY"
    assert prim.application_context_name == "1.2.840.10008.3.1.1.1"
    got = [
        (cx.context_id, str(cx.abstract_syntax), tuple(str(t) for t in cx.transfer_syntax))
        for cx in prim.presentation_context_definition_list
    ]
    assert got == contexts
    items = {type(i).__name__: i for i in prim.user_information}
    assert items["MaximumLengthNotification"].maximum_length_received == 65536
    assert items["ImplementationClassUIDNotification"].implementation_class_uid == (
        IMPLEMENTATION_CLASS_UID
    )
    assert items["ImplementationVersionNameNotification"].implementation_version_name == (
        IMPLEMENTATION_VERSION_NAME
    )
    assert len(IMPLEMENTATION_VERSION_NAME) <= 16


@pytest.mark.parametrize("title", ["", "   ", "SEVENTEEN-LETTERS", "ÄRCHIV"])
def test_associate_rq_refuses_titles_that_cannot_be_encoded(title: str) -> None:
    with pytest.raises(ValueError):
        encode_associate_rq(title, "GATEWAY", [(1, CT, (IMPLICIT_LE,))], 0)


def _ac(results: list[tuple[int, int, str]], max_pdu: int) -> bytes:
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = "GATEWAY"
    prim.called_ae_title = "ARCHIVE"
    prim.result = 0
    for cx_id, result, ts in results:
        cx = PresentationContext()
        cx.context_id = cx_id
        cx.result = result
        cx.transfer_syntax = [ts]
        prim.presentation_context_definition_results_list.append(cx)
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.3.4"
    prim.user_information = [length, impl]
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())[6:]


def test_associate_ac_from_pynetdicom_decodes() -> None:
    body = _ac([(1, 0, JPEG2000), (3, 4, IMPLICIT_LE), (5, 0, IMPLICIT_LE)], 32768)
    ac = decode_associate_ac(body)
    assert ac.max_pdu == 32768
    assert ac.results[1] == (0, JPEG2000)
    assert ac.results[3][0] == 4  # transfer syntaxes not supported
    assert ac.results[5] == (0, IMPLICIT_LE)


def test_associate_ac_cut_short_is_a_wire_error() -> None:
    from forwarder.wire import WireError

    body = _ac([(1, 0, IMPLICIT_LE)], 16384)
    for cut in (10, len(body) - 3):
        with pytest.raises(WireError):
            decode_associate_ac(body[:cut])


def test_negotiates_with_pynetdicom(make_scp: Callable[..., SCP]) -> None:
    scp = make_scp(transfer_syntaxes=[IMPLICIT_LE, EXPLICIT_LE], maximum_pdu_size=8192)
    assoc = open_association(
        Peer("127.0.0.1", scp.port),
        [(CT, [JPEG2000]), (CT, [EXPLICIT_LE]), (MR, [IMPLICIT_LE]), ("1.2.3.4.5", [IMPLICIT_LE])],
    )
    try:
        assert assoc.accepted == {CT: [(3, EXPLICIT_LE)], MR: [(5, IMPLICIT_LE)]}
        assert assoc.send_pdu == 8192
        assert scp.proposed == [4]
    finally:
        assoc.release()
    assert assoc.closed
    wait_for(lambda: not scp.server.active_associations, 5)


def test_rejected_called_ae_pauses_the_destination(make_scp: Callable[..., SCP]) -> None:
    scp = make_scp(ae_title="ARCHIVE", require_called=True)
    with pytest.raises(AssociationFailed) as caught:
        open_association(Peer("127.0.0.1", scp.port, called_aet="WRONG"), [(CT, [IMPLICIT_LE])])
    cls = caught.value.classification
    assert cls.action is Action.DESTINATION
    assert "called AE title not recognised" in cls.meaning


def test_refused_connection_is_transient() -> None:
    with pytest.raises(AssociationFailed) as caught:
        open_association(Peer("127.0.0.1", free_port()), [(CT, [IMPLICIT_LE])])
    cls = caught.value.classification
    assert cls.action is Action.RETRY
    assert cls.meaning.startswith("cannot connect: ") and "refused" in cls.meaning


def test_no_answer_to_the_request_is_an_acse_timeout(silent_listener: int) -> None:
    with pytest.raises(AssociationFailed) as caught:
        open_association(
            Peer("127.0.0.1", silent_listener, acse_timeout=0.3), [(CT, [IMPLICIT_LE])]
        )
    cls = caught.value.classification
    assert cls.action is Action.RETRY
    assert "no answer from the peer within 0.3 s" in cls.meaning


def test_nothing_accepted_gives_an_aborted_association(make_scp: Callable[..., SCP]) -> None:
    scp = make_scp(sop_classes=[MR])
    assoc = open_association(Peer("127.0.0.1", scp.port), [(CT, [IMPLICIT_LE])])
    assert assoc.accepted == {}
    assert assoc.closed


def test_a_peer_that_releases_an_idle_association_costs_nothing(
    make_scp: Callable[..., SCP], tmp_path: Path
) -> None:
    """The peer ends an idle association (its network timeout): the next send notices
    before writing, associates again and delivers every file without a failure."""
    scp = make_scp()
    scp.server.ae.network_timeout = 0.3  # pynetdicom then ends the idle association itself
    released = threading.Event()
    scp.server.bind(evt.EVT_ABORTED, lambda event: released.set())
    scp.server.bind(evt.EVT_RELEASED, lambda event: released.set())
    info = inspect(data_file("CT_small.dcm"))
    with Sender(Peer("127.0.0.1", scp.port)) as sender:
        first = list(sender.send([info]))
        assert released.wait(10), "the SCP did not end the idle association"
        wait_for(lambda: not scp.server.active_associations, 5)
        second = list(sender.send([info]))
    assert [r.classification.action for r in first + second] == [Action.SENT, Action.SENT]
    assert scp.associations == 2
    assert len(scp.received) == 2


def test_the_send_runs_on_the_callers_thread_alone(storescp: StoreSCP, tmp_path: Path) -> None:
    """One owner per socket: sending starts no thread (pynetdicom's reactor used to read
    the same socket beside the sender)."""
    for n in range(5):
        make_instance(tmp_path / f"{n}.dcm", f"1.2.826.0.1.3680043.9.9999.7.{n}")
    infos = [inspect(tmp_path / f"{n}.dcm") for n in range(5)]
    before = set(threading.enumerate())
    seen: list[set[threading.Thread]] = []
    with Sender(Peer("127.0.0.1", storescp.port, called_aet="STORESCP")) as sender:
        for result in sender.send(infos):
            assert result.delivered
            seen.append(set(threading.enumerate()))
    assert all(s == before for s in seen)
    wait_for(lambda: len(storescp.files()) == 5, 10)


def test_peer_abort_in_answer_to_the_request(tmp_path: Path) -> None:
    """A peer that answers the A-ASSOCIATE-RQ with an A-ABORT: transient, one line."""
    srv = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 2, 0)))

    thread = threading.Thread(target=answer, name="aborting-peer")
    thread.start()
    try:
        with pytest.raises(AssociationFailed) as caught:
            open_association(Peer("127.0.0.1", srv.getsockname()[1]), [(CT, [IMPLICIT_LE])])
    finally:
        thread.join(5)
        srv.close()
    assert caught.value.classification.action is Action.RETRY
    assert "aborted" in caught.value.classification.meaning


def test_release_is_acknowledged_by_pynetdicom(make_scp: Callable[..., SCP]) -> None:
    scp = make_scp()
    events: list[str] = []
    scp.server.bind(evt.EVT_RELEASED, lambda event: events.append("released"))
    assoc = open_association(Peer("127.0.0.1", scp.port), [(CT, [IMPLICIT_LE])])
    assoc.release()
    wait_for(lambda: events == ["released"], 5)


def test_pynetdicom_as_requestor_would_negotiate_the_same(make_scp: Callable[..., SCP]) -> None:
    """Reference check: pynetdicom's own requestor gets the same accepted contexts."""
    scp = make_scp(transfer_syntaxes=[EXPLICIT_LE])
    ae = AE()
    ae.add_requested_context(CT, [IMPLICIT_LE])
    ae.add_requested_context(CT, [EXPLICIT_LE])
    ref: Any = ae.associate("127.0.0.1", scp.port)
    try:
        theirs = {(cx.context_id, str(cx.transfer_syntax[0])) for cx in ref.accepted_contexts}
    finally:
        ref.release()
    ours = open_association(Peer("127.0.0.1", scp.port), [(CT, [IMPLICIT_LE]), (CT, [EXPLICIT_LE])])
    ours.release()
    assert set(ours.accepted[CT]) == theirs == {(3, EXPLICIT_LE)}
