"""Tests for forwarder.wire: the command set encoding and the data phase on a real association."""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterator

import pytest
from conftest import SCP, data_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pynetdicom.dsutils import encode

from forwarder.association import Association, Peer, open_association
from forwarder.dicomfile import inspect
from forwarder.wire import (
    C_ECHO_RSP,
    VERIFICATION,
    FileData,
    Link,
    Request,
    WireError,
    decode_command,
    encode_echo_command,
    encode_event_report_response,
    encode_store_command,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


def _read_command(data: bytes) -> Dataset:
    fp = DicomBytesIO(data)
    fp.is_little_endian, fp.is_implicit_VR = True, True
    return read_dataset(fp, is_implicit_VR=True, is_little_endian=True)


@pytest.mark.parametrize("message_id", [1, 2, 65535])
def test_store_command_decodes_with_pydicom(message_id: int) -> None:
    uid = "1.2.3.4.5.6.7.8.9"  # odd length: padded with a NUL
    data = encode_store_command(CT, uid, message_id, priority=0)
    ds = _read_command(data)
    assert ds.AffectedSOPClassUID == CT
    assert ds.AffectedSOPInstanceUID == uid
    assert ds.CommandField == 0x0001  # C-STORE-RQ
    assert ds.MessageID == message_id
    assert ds.Priority == 0
    assert ds.CommandDataSetType != 0x0101  # a data set follows
    assert ds.CommandGroupLength == len(data) - 12
    assert len(data) % 2 == 0
    assert [int(e.tag) for e in ds] == sorted(int(e.tag) for e in ds)


def test_store_command_equals_pynetdicoms_encoding() -> None:
    """Byte for byte what pynetdicom would send for the same request."""
    uid = "1.2.826.0.1.3680043.9.9999.12"
    ds = Dataset()
    ds.CommandGroupLength = 0
    ds.AffectedSOPClassUID = CT
    ds.CommandField = 1
    ds.MessageID = 7
    ds.Priority = 2
    ds.CommandDataSetType = 0
    ds.AffectedSOPInstanceUID = uid
    body = encode(ds, True, True)
    assert body is not None
    ds.CommandGroupLength = len(body) - 12
    expected = encode(ds, True, True)
    assert encode_store_command(CT, uid, 7) == expected


def test_decode_command_round_trip() -> None:
    ds = Dataset()
    ds.CommandGroupLength = 0
    ds.AffectedSOPClassUID = CT
    ds.CommandField = 0x8001
    ds.MessageIDBeingRespondedTo = 513
    ds.CommandDataSetType = 0x0101
    ds.Status = 0xB000
    ds.ErrorComment = "coerced"
    data = encode(ds, True, True)
    assert data is not None
    elems = decode_command(bytes(data))
    assert struct.unpack("<H", elems[0x00000100])[0] == 0x8001
    assert struct.unpack("<H", elems[0x00000120])[0] == 513
    assert struct.unpack("<H", elems[0x00000900])[0] == 0xB000
    assert elems[0x00000002].rstrip(b"\x00") == CT.encode()
    assert elems[0x00000902].rstrip(b" ") == b"coerced"


def test_decode_command_rejects_a_length_past_the_end() -> None:
    data = encode_store_command(CT, "1.2.3", 1)
    with pytest.raises(WireError):
        decode_command(data[:-3])
    assert decode_command(b"") == {}


@pytest.fixture
def assoc(make_scp: Callable[..., SCP]) -> Iterator[tuple[Association, SCP]]:
    """An established association to a pynetdicom SCP with a small PDU (many fragments)."""
    scp = make_scp(maximum_pdu_size=4096)
    peer = Peer("127.0.0.1", scp.port, calling_aet="WIRE-TEST", dimse_timeout=5)
    association = open_association(peer, [(CT, [EXPLICIT_LE])])
    assert association.accepted
    yield association, scp
    association.abort()


def _cx(association: Association) -> int:
    return association.accepted[CT][0][0]


def test_link_streams_a_file_and_reads_the_response(assoc: tuple[Association, SCP]) -> None:
    association, scp = assoc
    info = inspect(data_file("CT_small.dcm"))
    assert association.send_pdu == 4096
    for msg_id in (1, 2):
        association.link.send_message(
            _cx(association),
            encode_store_command(CT, info.sop_instance_uid, msg_id),
            (info.path, info.dataset_offset),
            association.send_pdu,
        )
        rsp = association.link.read_response()
        assert (rsp.status, rsp.message_id) == (0x0000, msg_id)
    got = scp.received
    assert [r.message_id for r in got] == [1, 2]
    expected = info.path.read_bytes()[info.dataset_offset :]
    assert all(r.encoded == expected for r in got)  # reassembled from ~10 fragments
    assert all(r.transfer_syntax == EXPLICIT_LE for r in got)
    association.release()
    assert association.closed


@pytest.mark.parametrize("head_size", [0, 1, 4083, 4084, 4085, 9000])
def test_link_sends_a_head_from_memory_then_the_file(
    assoc: tuple[Association, SCP], head_size: int
) -> None:
    """A spliced `set`/`remove`: the changed head, then the source from an offset; the
    fragments are cut across the seam (4084 bytes of data per PDU here)."""
    association, scp = assoc
    info = inspect(data_file("CT_small.dcm"))
    data = info.path.read_bytes()[info.dataset_offset :]
    head = bytes(range(256)) * (head_size // 256) + bytes(head_size % 256)
    tail_at = info.dataset_offset + 2000  # any offset: the bytes are not looked at
    association.link.send_message(
        _cx(association),
        encode_store_command(CT, info.sop_instance_uid, 1),
        FileData(info.path, tail_at, head),
        association.send_pdu,
    )
    rsp = association.link.read_response()
    assert rsp.message_id == 1
    (got,) = scp.received
    assert got.encoded == head + data[2000:] + b"\x00" * ((len(head) + len(data) - 2000) % 2)


def test_link_sends_bytes_and_reports_the_status(assoc: tuple[Association, SCP]) -> None:
    association, scp = assoc
    scp.statuses = [0xA700]
    info = inspect(data_file("CT_small.dcm"))
    payload = info.path.read_bytes()[info.dataset_offset :]
    association.link.send_message(
        _cx(association), encode_store_command(CT, info.sop_instance_uid, 9), payload, 4096
    )
    rsp = association.link.read_response()
    assert (rsp.status, rsp.message_id) == (0xA700, 9)
    assert scp.received == []  # the fixture records only what it stored


def test_link_times_out_without_a_response(assoc: tuple[Association, SCP]) -> None:
    association, scp = assoc

    release = threading.Event()
    scp.on_store = lambda event: release.wait(5) and None
    info = inspect(data_file("CT_small.dcm"))
    try:
        association.link.settimeout(0.5)
        association.link.send_message(
            _cx(association),
            encode_store_command(CT, info.sop_instance_uid, 1),
            (info.path, info.dataset_offset),
            4096,
        )
        with pytest.raises(WireError, match="DIMSE timeout"):
            association.link.read_response()
    finally:
        release.set()
        association.abort()


def test_echo_command_answered_by_pynetdicom(make_scp: Callable[..., SCP]) -> None:
    scp = make_scp(sop_classes=[VERIFICATION])
    association = open_association(Peer("127.0.0.1", scp.port), [(VERIFICATION, [IMPLICIT_LE])])
    try:
        cx = association.accepted[VERIFICATION][0][0]
        association.link.send_message(cx, encode_echo_command(3), None, association.send_pdu)
        rsp = association.link.read_response(C_ECHO_RSP)
        assert (rsp.status, rsp.message_id) == (0x0000, 3)
    finally:
        association.release()


# ------------------------------------------------------------------ requests of the peer


def _pdv(cx: int, mch: int, data: bytes) -> bytes:
    return struct.pack(">LBB", len(data) + 2, cx, mch) + data


def _pdu(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BxL", 0x04, len(body)) + body


def _command(**elements: int | bytes) -> bytes:
    from forwarder.wire import _element, _group, _us

    tags = {
        "cls": 0x00000002,
        "field": 0x00000100,
        "rq_id": 0x00000110,
        "rsp_id": 0x00000120,
        "dstype": 0x00000800,
        "status": 0x00000900,
        "inst": 0x00001000,
        "event": 0x00001002,
    }
    parts = [
        _element(tags[k], v) if isinstance(v, bytes) else _us(tags[k], v)
        for k, v in sorted(elements.items(), key=lambda kv: tags[kv[0]])
    ]
    return _group(*parts)


def _answering(link: Link) -> list[Request]:
    """The peer's requests, as `link` takes them, each answered 0x0000 (an N-EVENT-REPORT)."""
    seen: list[Request] = []

    def answer(request: Request) -> bytes:
        seen.append(request)
        return encode_event_report_response(request, 0x0000)

    link.on_request = answer
    return seen


def test_a_request_of_the_peer_is_answered_while_a_response_is_awaited() -> None:
    """An N-EVENT-REPORT-RQ (its command and data set in one P-DATA-TF) arriving before the
    response we wait for is handed to `on_request`, answered, and the wait goes on."""
    import socket

    from forwarder.wire import N_EVENT_REPORT_RQ

    report = _command(cls=b"1.2.840.10008.1.20.1", field=N_EVENT_REPORT_RQ, rq_id=7, dstype=0,
                      inst=b"1.2.840.10008.1.20.1.1", event=1)  # fmt: skip
    data_set = b"\x08\x00\x95\x11\x04\x00\x31\x2e\x32\x00"  # (0008,1195) "1.2" implicit
    store_rsp = _command(cls=CT.encode(), field=0x8001, rsp_id=3, dstype=0x0101, status=0,
                         inst=b"1.2.3")  # fmt: skip
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(
            _pdu(_pdv(5, 0x03, report), _pdv(5, 0x02, data_set)) + _pdu(_pdv(1, 0x03, store_rsp))
        )
        link = Link(ours)
        seen = _answering(link)
        rsp = link.read_response()
        assert (rsp.status, rsp.message_id) == (0, 3)
        (req,) = seen
        assert (req.context_id, req.field, req.message_id) == (5, N_EVENT_REPORT_RQ, 7)
        assert req.data_set == data_set
        theirs.settimeout(2)
        answered = theirs.recv(1000)
        assert answered[0] == 0x04 and answered[10] == 5  # a P-DATA on the report's context
        sent = _read_command(answered[12:])
        assert (sent.CommandField, sent.MessageIDBeingRespondedTo, sent.Status) == (0x8100, 7, 0)
        assert sent.EventTypeID == 1 and sent.AffectedSOPInstanceUID == "1.2.840.10008.1.20.1.1"
        # without a taker, a request is a protocol error: the association is unusable
        theirs.sendall(_pdu(_pdv(5, 0x03, report), _pdv(5, 0x02, data_set)))
        link.on_request = None
        with pytest.raises(WireError, match="unexpected request 0x0100"):
            link.read_response()
    finally:
        ours.close()
        theirs.close()


def test_a_request_fragmented_over_several_pdus_is_answered_and_the_response_read() -> None:
    """The peer's N-EVENT-REPORT-RQ cut into PDUs of a few bytes (its command in two
    fragments, its data set in three), then the C-STORE-RSP awaited: both read whole."""
    import socket

    from forwarder.wire import N_EVENT_REPORT_RQ

    report = _command(cls=b"1.2.840.10008.1.20.1", field=N_EVENT_REPORT_RQ, rq_id=9, dstype=0,
                      inst=b"1.2.840.10008.1.20.1.1", event=2)  # fmt: skip
    data_set = b"\x08\x00\x95\x11\x08\x00\x31\x2e\x32\x2e\x33\x2e\x34\x00"  # "1.2.3.4"
    store_rsp = _command(cls=CT.encode(), field=0x8001, rsp_id=4, dstype=0x0101, status=0,
                         inst=b"1.2.3")  # fmt: skip
    cut = len(report) // 2
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(
            _pdu(_pdv(5, 0x01, report[:cut]))
            + _pdu(_pdv(5, 0x03, report[cut:]))
            + _pdu(_pdv(5, 0x00, data_set[:4]))
            + _pdu(_pdv(5, 0x00, data_set[4:8]))
            + _pdu(_pdv(5, 0x02, data_set[8:]), _pdv(1, 0x03, store_rsp))
        )
        link = Link(ours)
        link.settimeout(2)
        seen = _answering(link)
        rsp = link.read_response()
        assert (rsp.status, rsp.message_id) == (0, 4)
        (req,) = seen
        assert (req.message_id, req.data_set) == (9, data_set)
        assert not link.pending()  # nothing left over in the buffers
    finally:
        ours.close()
        theirs.close()
