"""Each PDU layout is written once and the per-command path's hand-packed
coders are held to it (issue 14 item 5).

steelfusion/iscsi/bhs.py builds both coders of a PDU from the fields of its
class in steelfusion/iscsi/pdu.py.  Here: the layouts give the exact bytes the
hand-written coders they replaced gave (GOLDEN); for random field values every
layout round-trips, the fast encoders (``data_in_header``,
``scsi_response_header``, ``R2T.header``) give the layout's bytes and the fast
decoders (``decode_scsi_command``, ``decode_data_out``) the layout's PDU, also
from arbitrary header bytes; a layout that contradicts itself fails at import;
a field value that does not fit is refused, not masked into its neighbours.
"""

from __future__ import annotations

import dataclasses
import re
import struct
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steelfusion.iscsi.bhs import Fixed, Place, at, pdu_class, pdu_fields
from steelfusion.iscsi.pdu import (
    PDU_CLASSES,
    R2T,
    DataIn,
    DataOut,
    LoginRequest,
    LoginResponse,
    LogoutResponse,
    NopOut,
    Opcode,
    Pdu,
    PduDecoder,
    ScsiCommand,
    ScsiResponse,
    TaskMgmtRequest,
    data_in_header,
    decode_data_out,
    decode_scsi_command,
    scsi_response_header,
)
from tests.iscsi_helpers import SAMPLES

PROPERTY = settings(max_examples=200, deadline=None)

# The BHS (and AHS) of each of tests/iscsi_helpers.py's SAMPLES as the
# hand-written header() methods packed them before the layouts replaced them.
GOLDEN: list[tuple[str, str]] = [
    ("NopOut",
     "40800000 00000005 00010000 00000000 00000001 ffffffff"
     " 00000007 00000009 00000000 00000000 00000000 00000000"),
    ("NopOut",
     "00800000 00000000 00000000 00000000 ffffffff 00000037"
     " 00000001 00000002 00000000 00000000 00000000 00000000"),
    ("ScsiCommand",
     "01210000 000003e8 00030000 00000000 00000002 00001000"
     " 00000064 00000005 2a000000 00080000 08000000 00000000"),
    ("ScsiCommand",
     "41c00000 07000000 00000000 00000000 00000003 00000200"
     " 00000000 00000000 00010203 04050607 08090a0b 0c0d0e0f"
     " 00110100 10111213 14151617 18191a1b 1c1d1e1f 00050200"
     " 0000004d"),
    ("ScsiCommand",
     "01c00000 02000000 00000000 00000000 00000004 00000000"
     " 00000000 00000000 00010203 04050607 08090a0b 0c0d0e0f"
     " 00050100 10111213"),
    ("TaskMgmtRequest",
     "42810000 00000000 00010000 00000000 00000005 00000002"
     " 00000003 00000004 00000005 00000006 00000000 00000000"),
    ("LoginRequest",
     "43870000 00000025 80123456 789a0000 00000006 00030000"
     " 00000001 00000000 00000000 00000000 00000000 00000000"),
    ("LoginRequest",
     "43410000 00000004 00000000 00010000 00000007 00000000"
     " 00000000 00000000 00000000 00000000 00000000 00000000"),
    ("TextRequest",
     "44400000 00000010 00000000 00000000 00000008 00000009"
     " 0000000a 0000000b 00000000 00000000 00000000 00000000"),
    ("DataOut",
     "05800000 00000300 00010000 00000000 0000000c 0000000d"
     " 00000000 0000000e 00000000 0000000f 00002000 00000000"),
    ("LogoutRequest",
     "46810000 00000000 00000000 00000000 00000010 00020000"
     " 00000011 00000012 00000000 00000000 00000000 00000000"),
    ("SnackRequest",
     "10810000 00000000 00000000 00000000 00000013 00000014"
     " 00000000 00000015 00000000 00000000 00000016 00000017"),
    ("NopIn",
     "20800000 00000004 00000000 00000000 00000018 00000019"
     " 0000001a 0000001b 0000001c 00000000 00000000 00000000"),
    ("ScsiResponse",
     "218c0002 00000014 00000000 00000000 0000001d 00000000"
     " 0000001e 0000001f 00000020 00000002 00000003 00000200"),
    ("ScsiResponse",
     "21820000 00000000 00000000 00000000 00000021 00000000"
     " 00000000 00000000 00000000 00000000 00000000 00000001"),
    ("TaskMgmtResponse",
     "22800100 00000000 00000000 00000000 00000022 00000000"
     " 00000023 00000024 00000025 00000000 00000000 00000000"),
    ("LoginResponse",
     "23870000 00000017 40000000 00010009 00000026 00000000"
     " 00000027 00000028 00000029 02070000 00000000 00000000"),
    ("TextResponse",
     "24400000 00000011 00000000 00000000 0000002a 0000002b"
     " 0000002c 0000002d 0000002e 00000000 00000000 00000000"),
    ("DataIn",
     "25830000 00000201 00010000 00000000 0000002f ffffffff"
     " 00000030 00000031 00000032 00000033 00000400 00000007"),
    ("DataIn",
     "25400000 00000004 00000000 00000000 00000034 ffffffff"
     " 00000000 00000000 00000000 00000001 00000000 00000000"),
    ("LogoutResponse",
     "26800000 00000000 00000000 00000000 00000035 00000000"
     " 00000036 00000037 00000038 00000000 00020014 00000000"),
    ("R2T",
     "31800000 00000000 00010000 00000000 00000039 0000003a"
     " 0000003b 0000003c 0000003d 0000003e 00010000 00040000"),
    ("AsyncMessage",
     "32800000 00000002 00000000 00000000 ffffffff 00000000"
     " 0000003f 00000040 00000041 01020003 00040005 00000000"),
    ("Reject",
     "3f800400 00000030 00000000 00000000 ffffffff 00000000"
     " 00000042 00000043 00000044 00000045 00000000 00000000"),
]


def test_layouts_give_the_bytes_the_hand_written_coders_gave() -> None:
    assert len(GOLDEN) == len(SAMPLES)
    for pdu, (name, want) in zip(SAMPLES, GOLDEN, strict=True):
        assert type(pdu).__name__ == name
        assert pdu.header() == bytes.fromhex(want), name
        assert type(pdu).layout.encode(pdu) == bytes.fromhex(want), name


def test_every_opcode_has_one_class() -> None:
    assert sorted(c.opcode for c in PDU_CLASSES) == sorted(Opcode)


# --------------------------------------------------------------------------- random PDUs


def _field_values(f: dataclasses.Field[Any]) -> st.SearchStrategy[Any]:
    """Every value ``f`` can carry on the wire, read off its place in the BHS."""
    if f.name == "data":
        return st.binary(max_size=64)
    if f.name == "bidi_read_length":
        return st.none() | st.integers(0, 2**32 - 1)
    place: Place = f.metadata["bhs"]
    if f.type == "bool":
        return st.booleans()
    if place.code == "16s":  # the CDB: 16 bytes in the BHS, the rest in an AHS
        return st.binary(min_size=16, max_size=40)
    mask = place.mask or (1 << struct.calcsize(">" + place.code) * 8) - 1
    return st.integers(0, mask >> ((mask & -mask).bit_length() - 1))


def _wire_form(pdu: Pdu) -> Pdu:
    """``pdu`` as a decoder sees it: a field reserved by a clear bit reads 0."""
    if isinstance(pdu, DataIn) and not pdu.status_present:
        pdu.status = 0
    return pdu


def pdus(cls: type[Pdu]) -> st.SearchStrategy[Pdu]:
    fields = {f.name: _field_values(f) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return st.builds(cls, **fields).map(_wire_form)


any_pdu = st.sampled_from(PDU_CLASSES).flatmap(pdus)


@PROPERTY
@given(any_pdu, st.booleans())
def test_every_layout_round_trips(pdu: Pdu, digests: bool) -> None:
    wire = pdu.encode(digests, digests)
    head = pdu.header()
    assert type(pdu).layout.decode(head, 0, head[48:], pdu.payload()) == pdu
    assert PduDecoder(header_digest=digests, data_digest=digests,
                      max_data_segment_length=1 << 16).feed(wire) == [pdu]


@PROPERTY
@given(pdus(DataIn))
def test_fast_data_in_header_is_the_layout(pdu: Any) -> None:
    b1 = ((0x80 if pdu.final else 0) | (0x40 if pdu.ack else 0) | (0x04 if pdu.overflow else 0)
          | (0x02 if pdu.underflow else 0) | (0x01 if pdu.status_present else 0))
    fast = data_in_header(b1, pdu.status, len(pdu.data), pdu.lun, pdu.itt, pdu.ttt, pdu.statsn,
                          pdu.exp_cmdsn, pdu.max_cmdsn, pdu.datasn, pdu.buffer_offset,
                          pdu.residual_count)
    assert fast == DataIn.layout.encode(pdu)
    assert DataIn.layout.decode(fast, 0, b"", pdu.data) == pdu


@PROPERTY
@given(pdus(ScsiResponse))
def test_fast_scsi_response_header_is_the_layout(pdu: Any) -> None:
    b1 = (0x80 | (0x10 if pdu.bidi_overflow else 0) | (0x08 if pdu.bidi_underflow else 0)
          | (0x04 if pdu.overflow else 0) | (0x02 if pdu.underflow else 0))
    fast = scsi_response_header(b1, pdu.response, pdu.status, len(pdu.data), pdu.itt,
                                pdu.snack_tag, pdu.statsn, pdu.exp_cmdsn, pdu.max_cmdsn,
                                pdu.exp_datasn, pdu.bidi_residual_count, pdu.residual_count)
    assert fast == ScsiResponse.layout.encode(pdu)
    assert ScsiResponse.layout.decode(fast, 0, b"", pdu.data) == pdu


@PROPERTY
@given(pdus(R2T))
def test_fast_r2t_header_is_the_layout(pdu: Pdu) -> None:
    assert pdu.header() == R2T.layout.encode(pdu)
    assert R2T.layout.decode(pdu.header(), 0, b"", b"") == pdu


@PROPERTY
@given(pdus(ScsiCommand))
def test_fast_scsi_command_decoder_is_the_layout(pdu: Pdu) -> None:
    head = pdu.header()
    ahs, data = head[48:], pdu.payload()
    assert decode_scsi_command(head, 0, ahs, data) == pdu
    assert ScsiCommand.layout.decode(head, 0, ahs, data) == pdu


@PROPERTY
@given(pdus(DataOut))
def test_fast_data_out_decoder_is_the_layout(pdu: Pdu) -> None:
    head = pdu.header()
    assert decode_data_out(head, 0, b"", pdu.payload()) == pdu
    assert DataOut.layout.decode(head, 0, b"", pdu.payload()) == pdu


@PROPERTY
@given(st.binary(min_size=48, max_size=48), st.binary(max_size=8))
def test_fast_decoders_read_any_header_as_the_layout_does(bhs: bytes, data: bytes) -> None:
    """Reserved bits, whatever they hold, are ignored by both."""
    assert decode_scsi_command(bhs, 0, b"", data) == ScsiCommand.layout.decode(bhs, 0, b"", data)
    assert decode_data_out(bhs, 0, b"", data) == DataOut.layout.decode(bhs, 0, b"", data)


# --------------------------------------------------------------------------- misuse


@pytest.mark.parametrize("pdu,field", [
    (LoginRequest(itt=1, isid=0, tsih=0x10000), "LoginRequest.tsih"),  # was: ISID 1, TSIH 0
    (LoginResponse(itt=1, status_class=2, status_detail=0x100), "LoginResponse.status_detail"),
    (LoginRequest(itt=1, csg=4), "LoginRequest.csg"),  # was: CSG 0
    (TaskMgmtRequest(itt=1, function=0x81), "TaskMgmtRequest.function"),
    (LogoutResponse(itt=1, time2wait=0x10000), "LogoutResponse.time2wait"),
    (NopOut(itt=1 << 32), "NopOut.itt"),
    (ScsiCommand(itt=1, lun=-1), "ScsiCommand.lun"),
    (ScsiCommand(itt=1, bidi_read_length=1 << 32), "ScsiCommand.bidi_read_length"),
    (ScsiCommand(itt=1, cdb=bytes(1100)), "TotalAHSLength"),  # was: struct.error
])
def test_a_value_that_does_not_fit_is_refused_not_masked(pdu: Pdu, field: str) -> None:
    """A field too wide for its bits used to be masked (a TMF function 0x81
    went out as 0x01) or to spill into its neighbour (status detail 0x100 made
    status class 2 a 3, TSIH 0x10000 went out as TSIH 0 with an ISID bit set);
    now it is a ValueError that names the field."""
    with pytest.raises(ValueError, match=re.escape(field)):
        pdu.header()


def _make(*fields: tuple[str, Any], fixed: tuple[Fixed, ...] = ()) -> type:
    ns: dict[str, Any] = {"__annotations__": {"opcode": "ClassVar[int]"}, "opcode": 0x00,
                          "fixed": fixed}
    for name, spec in fields:
        ns["__annotations__"][name] = "bool" if name.startswith("flag") else "int"
        ns[name] = spec
    return pdu_class(type("Bad", (Pdu,), ns))


@pytest.mark.parametrize("fields,fixed,problem", [
    ((("a", at(8, "Q")), ("b", at(12, "I"))), (), "overlaps"),
    ((("a", at(1, "B", 0x80)), ("b", at(1, "B", 0xC0))), (), "clashes"),
    ((("a", at(1, "B", 0x05)),), (), "one run of bits"),
    ((("a", at(0, "B", 0x01)),), (), "clashes"),  # the opcode's bits
    ((("a", at(4, "I")),), (), "length word"),
    ((("a", at(1, "B")), ("b", at(1, "B", 0x01))), (), "shared"),
    ((("flag", at(1, "B", 0x03)),), (), "one bit"),
    ((("a", at(1, "B", 0x80)),), (Fixed(1, "B", 0x80),), "clash"),
    ((("a", at(44, "Q")),), (), "past byte 48"),
    ((("a", 0),), (), "no place"),
])
def test_a_layout_that_contradicts_itself_fails_when_defined(
        fields: tuple[tuple[str, Any], ...], fixed: tuple[Fixed, ...], problem: str) -> None:
    with pytest.raises(TypeError, match=problem):
        _make(*fields, fixed=fixed)


def test_a_field_group_must_leave_slots_to_the_pdu_classes() -> None:
    with pytest.raises(TypeError, match="__slots__"):
        @pdu_fields
        class Group:
            a: int = at(8, "Q", default=0)


def test_a_group_mixes_into_a_slotted_pdu() -> None:
    @pdu_fields
    class Group:
        __slots__ = ()
        a: int = at(8, "Q", default=0)

    @pdu_class
    class Good(Pdu, Group):
        opcode: ClassVar[int] = 0x00
        b: int = at(16, "I", default=0)

    pdu = Good(a=1, b=2)
    assert not hasattr(pdu, "__dict__")
    assert Good.layout.decode(pdu.header(), 0, b"", b"") == pdu
