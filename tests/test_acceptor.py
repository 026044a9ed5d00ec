"""The acceptor's encoders and decoders, checked against pydicom and pynetdicom's own."""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.filereader import read_file_meta_info

from forwarder.acceptor import (
    ABSTRACT_SYNTAX_NOT_SUPPORTED,
    ACCEPTANCE,
    TRANSFER_SYNTAXES_NOT_SUPPORTED,
    Proposal,
    accept,
    decode_associate_rq,
    encode_associate_ac,
    encode_response,
    file_meta,
    is_storage,
)
from forwarder.association import IMPLEMENTATION_CLASS_UID

CT = "1.2.840.10008.5.1.4.1.1.2"
FIND = "1.2.840.10008.5.1.4.1.2.1.1"  # Patient Root Q/R FIND: not storage
PRIVATE = "1.2.826.0.1.3680043.10.999.77.1"


def test_file_meta_reads_back_in_pydicom(tmp_path: Path) -> None:
    for uid in ("1.2.3", "1.2.34"):  # odd and even lengths (NUL padding)
        data = file_meta(CT, uid, "1.2.840.10008.1.2.4.70")
        (tmp_path / "m.dcm").write_bytes(data)
        meta = read_file_meta_info(tmp_path / "m.dcm")
        assert meta.MediaStorageSOPClassUID == CT
        assert meta.MediaStorageSOPInstanceUID == uid
        assert meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
        assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
        assert meta.FileMetaInformationVersion == b"\x00\x01"
        assert data[128:132] == b"DICM"


def test_associate_rq_from_pynetdicom_is_decoded() -> None:
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context
    from pynetdicom.transport import AddressInformation

    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = "CT01"
    prim.called_ae_title = "FORWARDER"
    prim.calling_presentation_address = AddressInformation("127.0.0.1", 1)
    prim.called_presentation_address = AddressInformation("127.0.0.1", 2)
    cxs = [build_context(CT, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]),
           build_context(FIND), build_context(PRIVATE, ["1.2.840.10008.1.2.4.50"])]  # fmt: skip
    for i, cx in enumerate(cxs):
        cx.context_id = 2 * i + 1
    prim.presentation_context_definition_list = cxs
    limit = MaximumLengthNotification()
    limit.maximum_length_received = 32768
    prim.user_information = [limit]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    body = pdu.encode()[6:]
    got = decode_associate_rq(body)
    assert (got.called_aet, got.calling_aet, got.max_pdu) == ("FORWARDER", "CT01", 32768)
    assert got.contexts[0] == (1, CT, ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2"))
    results = accept(got)
    assert results == {
        1: (ACCEPTANCE, "1.2.840.10008.1.2.1"),
        3: (ABSTRACT_SYNTAX_NOT_SUPPORTED, "1.2.840.10008.1.2"),
        5: (ACCEPTANCE, "1.2.840.10008.1.2.4.50"),
    }


def test_associate_ac_is_what_pynetdicom_decodes() -> None:
    from pynetdicom.pdu import A_ASSOCIATE_AC

    proposal = Proposal("FORWARDER", "CT01", ((1, CT, ("1.2.840.10008.1.2.1",)),), 0)
    body = encode_associate_ac(proposal, {1: (0, "1.2.840.10008.1.2.1"), 3: (3, "")}, 1 << 20)
    pdu = A_ASSOCIATE_AC()
    pdu.decode(struct.pack(">BxL", 2, len(body)) + body)
    prim = pdu.to_primitive()
    assert prim.called_ae_title == "FORWARDER"
    assert prim.maximum_length_received == 1 << 20
    results = {cx.context_id: (cx.result, cx.transfer_syntax) for cx in
               prim.presentation_context_definition_results_list}  # fmt: skip
    assert results[1] == (0, ["1.2.840.10008.1.2.1"])
    assert results[3][0] == 3


@pytest.mark.parametrize("comment", [None, "odd", "even"])
def test_responses_decode_in_pydicom(comment: str | None) -> None:
    from pydicom.filereader import read_dataset

    raw = encode_response(0x8001, CT, 7, 0xA700, "1.2.345", comment)
    ds = read_dataset(BytesIO(raw), is_implicit_VR=True, is_little_endian=True)
    assert ds.CommandField == 0x8001
    assert ds.MessageIDBeingRespondedTo == 7
    assert ds.Status == 0xA700
    assert ds.AffectedSOPInstanceUID == "1.2.345"
    assert ds.CommandGroupLength == len(raw) - 12
    if comment:
        assert ds.ErrorComment == comment


def test_storage_classes() -> None:
    assert is_storage(CT) and is_storage(PRIVATE)
    assert is_storage("1.2.840.10008.5.1.4.1.1.999")  # a class newer than pynetdicom's list
    assert not is_storage(FIND)
    assert accept(Proposal("A", "B", ((1, CT, ()),), 0)) == {
        1: (TRANSFER_SYNTAXES_NOT_SUPPORTED, "")
    }
