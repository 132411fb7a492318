"""PDU codec: every opcode round-trips whole, byte by byte and with trailing
bytes; digests are produced and checked; malformed input raises only
IscsiProtocolError (RFC 7143 §11)."""

from __future__ import annotations

import struct

import crc32c
import pytest

from steelfusion.iscsi.pdu import (
    ASSEMBLY_MIN,
    INITIATOR_OPCODES,
    R2T,
    TARGET_OPCODES,
    AsyncMessage,
    DataIn,
    DataOut,
    IscsiProtocolError,
    LoginRequest,
    LoginResponse,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Opcode,
    Pdu,
    PduDecoder,
    Reject,
    RejectReason,
    ScsiCommand,
    ScsiResponse,
    SnackRequest,
    TaskMgmtRequest,
    TaskMgmtResponse,
    TextRequest,
    TextResponse,
    digest,
    parse_sense_segment,
    sense_segment,
)

SAMPLES: list[Pdu] = [
    NopOut(itt=1, ttt=0xFFFFFFFF, lun=1 << 48, cmdsn=7, exp_statsn=9, immediate=True,
           data=b"ping!"),
    NopOut(itt=0xFFFFFFFF, ttt=55, cmdsn=1, exp_statsn=2),
    ScsiCommand(itt=2, lun=3 << 48, cmdsn=100, exp_statsn=5, expected_length=4096,
                cdb=bytes([0x2A, 0, 0, 0, 0, 8, 0, 0, 8, 0]) + bytes(6), final=False,
                write=True, attr=1, data=b"x" * 1000),
    ScsiCommand(itt=3, cdb=bytes(range(32)), read=True, expected_length=512,
                bidi_read_length=77, immediate=True),
    ScsiCommand(itt=4, cdb=bytes(range(20)), read=True),
    TaskMgmtRequest(itt=5, function=1, lun=1 << 48, ref_task_tag=2, cmdsn=3, exp_statsn=4,
                    ref_cmdsn=5, exp_datasn=6),
    LoginRequest(itt=6, isid=0x80_1234_5678_9A, tsih=0, cid=3, cmdsn=1, exp_statsn=0,
                 transit=True, cont=False, csg=1, nsg=3, version_max=0, version_min=0,
                 data=b"InitiatorName=iqn.x\0TargetName=iqn.y\0"),
    LoginRequest(itt=7, isid=1, cont=True, csg=0, nsg=1, data=b"A=B\0"),
    TextRequest(itt=8, ttt=9, lun=0, cmdsn=10, exp_statsn=11, final=False, cont=True,
                immediate=True, data=b"SendTargets=All\0"),
    DataOut(itt=12, ttt=13, lun=1 << 48, exp_statsn=14, datasn=15, buffer_offset=8192,
            final=True, data=bytes(range(256)) * 3),
    LogoutRequest(itt=16, reason=1, cid=2, cmdsn=17, exp_statsn=18, immediate=True),
    SnackRequest(itt=19, snack_type=1, lun=0, ttt=20, exp_statsn=21, begrun=22, runlength=23),
    NopIn(itt=24, ttt=25, lun=0, statsn=26, exp_cmdsn=27, max_cmdsn=28, data=b"pong"),
    ScsiResponse(itt=29, status=2, response=0, statsn=30, exp_cmdsn=31, max_cmdsn=32,
                 exp_datasn=2, overflow=True, residual_count=512, bidi_underflow=True,
                 bidi_residual_count=3, data=sense_segment(bytes(18))),
    ScsiResponse(itt=33, underflow=True, residual_count=1),
    TaskMgmtResponse(itt=34, response=1, statsn=35, exp_cmdsn=36, max_cmdsn=37),
    LoginResponse(itt=38, isid=0x40_0000_0000_01, tsih=9, statsn=39, exp_cmdsn=40,
                  max_cmdsn=41, status_class=2, status_detail=7, transit=True, csg=1, nsg=3,
                  data=b"TargetPortalGroupTag=1\0"),
    TextResponse(itt=42, ttt=43, lun=0, statsn=44, exp_cmdsn=45, max_cmdsn=46, final=False,
                 cont=True, data=b"TargetName=iqn.z\0"),
    DataIn(itt=47, ttt=0xFFFFFFFF, lun=1 << 48, statsn=48, exp_cmdsn=49, max_cmdsn=50,
           datasn=51, buffer_offset=1024, residual_count=7, final=True, overflow=False,
           underflow=True, status_present=True, status=0, data=b"d" * 513),
    DataIn(itt=52, datasn=1, final=False, ack=True, data=b"e" * 4),
    LogoutResponse(itt=53, response=0, statsn=54, exp_cmdsn=55, max_cmdsn=56, time2wait=2,
                   time2retain=20),
    R2T(itt=57, ttt=58, lun=1 << 48, statsn=59, exp_cmdsn=60, max_cmdsn=61, r2tsn=62,
        buffer_offset=65536, desired_length=262144),
    AsyncMessage(lun=0, statsn=63, exp_cmdsn=64, max_cmdsn=65, event=1, vcode=2, parameter1=3,
                 parameter2=4, parameter3=5, data=b"\0\0"),
    Reject(reason=RejectReason.PROTOCOL_ERROR, statsn=66, exp_cmdsn=67, max_cmdsn=68,
           datasn_r2tsn=69, data=bytes(48)),
]

DIGESTS = [(False, False), (True, False), (False, True), (True, True)]


def _ids(p: Pdu) -> str:
    return type(p).__name__


def test_every_opcode_has_a_sample() -> None:
    assert {p.opcode for p in SAMPLES} == set(Opcode)


def test_bhs_is_48_bytes_and_padded() -> None:
    for p in SAMPLES:
        wire = p.encode()
        assert len(wire) % 4 == 0
        dsl = int.from_bytes(wire[5:8], "big")
        assert dsl == len(p.payload())
        assert wire[0] & 0x3F == p.opcode


@pytest.mark.parametrize("hd,dd", DIGESTS)
@pytest.mark.parametrize("pdu", SAMPLES, ids=_ids)
def test_round_trip_whole(pdu: Pdu, hd: bool, dd: bool) -> None:
    dec = PduDecoder(header_digest=hd, data_digest=dd)
    assert dec.feed(pdu.encode(hd, dd)) == [pdu]
    assert dec.buffered == 0


@pytest.mark.parametrize("hd,dd", [(False, False), (True, True)])
@pytest.mark.parametrize("pdu", SAMPLES, ids=_ids)
def test_round_trip_byte_by_byte(pdu: Pdu, hd: bool, dd: bool) -> None:
    dec = PduDecoder(header_digest=hd, data_digest=dd)
    wire = pdu.encode(hd, dd)
    got: list[Pdu] = []
    for i in range(len(wire)):
        got += dec.feed(wire[i:i + 1])
        if i < len(wire) - 1:
            assert got == []
    assert got == [pdu]


@pytest.mark.parametrize("hd,dd", DIGESTS)
def test_many_pdus_in_one_chunk_with_trailing_bytes(hd: bool, dd: bool) -> None:
    dec = PduDecoder(header_digest=hd, data_digest=dd)
    stream = b"".join(p.encode(hd, dd) for p in SAMPLES)
    trailing = SAMPLES[2].encode(hd, dd)
    got = dec.feed(stream + trailing[:30])
    assert got == SAMPLES
    assert dec.buffered == 30
    assert dec.feed(trailing[30:]) == [SAMPLES[2]]


def test_split_points_everywhere() -> None:
    """Cut a multi-PDU stream at every position into two chunks."""
    stream = b"".join(p.encode(True, True) for p in SAMPLES[:6])
    for cut in range(0, len(stream), 7):
        dec = PduDecoder(header_digest=True, data_digest=True)
        assert dec.feed(stream[:cut]) + dec.feed(stream[cut:]) == SAMPLES[:6]


@pytest.mark.parametrize("hd,dd", DIGESTS)
@pytest.mark.parametrize("step", [7, 1000, 40000, 65536, 300000])
def test_large_pdus_split_across_reads(hd: bool, dd: bool, step: int) -> None:
    """PDUs above ASSEMBLY_MIN split across reads are gathered in their own
    buffer; order and content survive any split."""
    big = DataOut(itt=1, ttt=2, datasn=3, buffer_offset=4, final=True,
                  data=bytes(range(256)) * 400 + b"xyz")
    small = NopOut(itt=9, data=b"p")
    pdus: list[Pdu] = [small, big, big, small, big]
    stream = b"".join(p.encode(hd, dd) for p in pdus)
    dec = PduDecoder(header_digest=hd, data_digest=dd, max_data_segment_length=1 << 20)
    got: list[Pdu] = []
    for i in range(0, len(stream), step):
        got += dec.feed(stream[i:i + step])
    assert got == pdus
    assert dec.buffered == 0


def test_large_pdu_assembly_is_a_view() -> None:
    big = DataOut(itt=1, data=bytes(ASSEMBLY_MIN * 2))
    wire = big.encode()
    dec = PduDecoder()
    assert dec.feed(wire[:100]) == []
    assert dec.buffered == 100
    (pdu,) = dec.feed(wire[100:] + NopOut(itt=2).encode()[:10])
    assert isinstance(pdu, DataOut) and isinstance(pdu.data, memoryview)
    assert memoryview(pdu.data.obj).nbytes == len(wire)  # its own buffer, exactly the PDU
    assert dec.buffered == 10


def test_zero_copy_data_when_chunk_holds_whole_pdus() -> None:
    wire = SAMPLES[9].encode()
    (pdu,) = PduDecoder().feed(wire)
    assert isinstance(pdu, DataOut) and isinstance(pdu.data, memoryview)
    assert pdu.data.obj is wire


def test_encode_parts_does_not_copy_payload() -> None:
    payload = memoryview(bytearray(b"z" * 4096))
    parts = DataIn(itt=1, data=payload).encode_parts(True, True)
    assert parts[1] is payload
    assert len(parts[0]) == 52 and len(parts[2]) == 4


def test_digest_is_crc32c_little_endian_over_padded_data() -> None:
    pdu = NopOut(itt=1, data=b"abc")
    wire = pdu.encode(True, True)
    header = wire[:48]
    assert wire[48:52] == crc32c.crc32c(header).to_bytes(4, "little")
    assert wire[52:56] == b"abc\0"
    assert wire[56:60] == crc32c.crc32c(b"abc\0").to_bytes(4, "little")
    assert digest(b"123456789") == 0xE3069283  # CRC-32C check value


def test_header_digest_mismatch() -> None:
    wire = bytearray(NopOut(itt=1).encode(True, False))
    wire[50] ^= 1
    with pytest.raises(IscsiProtocolError) as ei:
        PduDecoder(header_digest=True).feed(bytes(wire))
    assert ei.value.reason is None  # header untrusted: nothing to Reject


def test_data_digest_mismatch_carries_reject_reason() -> None:
    wire = bytearray(DataOut(itt=1, data=b"12345678").encode(False, True))
    wire[50] ^= 0x80
    with pytest.raises(IscsiProtocolError) as ei:
        PduDecoder(data_digest=True).feed(bytes(wire))
    assert ei.value.reason == RejectReason.DATA_DIGEST_ERROR
    assert ei.value.header is not None and len(ei.value.header) == 48


def test_huge_data_segment_refused_before_buffering() -> None:
    hdr = bytearray(NopOut(itt=1).encode())
    hdr[5:8] = (0xFFFFFF).to_bytes(3, "big")
    dec = PduDecoder(max_data_segment_length=8192)
    with pytest.raises(IscsiProtocolError, match="DataSegmentLength"):
        dec.feed(bytes(hdr))


@pytest.mark.parametrize("opcode", [0x07, 0x11, 0x1C, 0x3E])
def test_unknown_opcode(opcode: int) -> None:
    hdr = bytearray(48)
    hdr[0] = opcode
    with pytest.raises(IscsiProtocolError) as ei:
        PduDecoder().feed(bytes(hdr))
    assert ei.value.reason == RejectReason.PROTOCOL_ERROR


def test_role_filters_opcodes() -> None:
    target_side = PduDecoder(accept=INITIATOR_OPCODES)
    with pytest.raises(IscsiProtocolError):
        target_side.feed(NopIn(itt=1).encode())
    initiator_side = PduDecoder(accept=TARGET_OPCODES)
    with pytest.raises(IscsiProtocolError):
        initiator_side.feed(NopOut(itt=1).encode())


def test_ahs_on_non_command_and_bad_ahs() -> None:
    wire = bytearray(NopOut(itt=1).encode())
    wire[4] = 1
    with pytest.raises(IscsiProtocolError):
        PduDecoder().feed(bytes(wire) + bytes(4))
    cmd = bytearray(ScsiCommand(itt=1).encode())
    cmd[4] = 1
    bad_ahs = struct.pack(">HBB", 9, 1, 0)  # claims 9 bytes, only 1 follows
    with pytest.raises(IscsiProtocolError):
        PduDecoder().feed(bytes(cmd) + bad_ahs)
    unknown = struct.pack(">HBB", 1, 0x3F, 0)
    with pytest.raises(IscsiProtocolError):
        PduDecoder().feed(bytes(cmd) + unknown)


def test_sense_segment_round_trip() -> None:
    sense = bytes(range(18))
    assert parse_sense_segment(sense_segment(sense)) == sense
    assert sense_segment(b"") == b""
    assert parse_sense_segment(b"") == b""


def test_field_ranges_checked_on_encode() -> None:
    with pytest.raises(ValueError, match=r"NopOut\.itt"):
        NopOut(itt=1 << 32).encode()
    with pytest.raises(ValueError):
        DataIn(itt=1, data=memoryview(bytes(1 << 24))).encode()


def _recv_buffered(dec: PduDecoder, stream: bytes, reads: list[int]) -> list[Pdu]:
    """What a BufferedProtocol does: recv_into(get_buffer()), then buffer_updated()."""
    out: list[Pdu] = []
    pos, i = 0, 0
    while pos < len(stream):
        view = dec.get_buffer(-1)
        want = reads[i % len(reads)] if reads else len(view)
        i += 1
        k = min(len(view), want, len(stream) - pos)
        view[:k] = stream[pos:pos + k]
        pos += k
        dec.buffer_updated(k)
        while (pdu := dec.next()) is not None:
            out.append(pdu)
    return out


@pytest.mark.parametrize("hd,dd", DIGESTS)
@pytest.mark.parametrize("reads", [[], [1], [7, 300000], [40000], [65536, 3], [1000, 250000]])
def test_buffered_receive_matches_feed(hd: bool, dd: bool, reads: list[int]) -> None:
    """get_buffer/buffer_updated decode the same PDUs as feed() in any split, and a large
    PDU's data segment is received straight into its own buffer."""
    big = DataOut(itt=1, ttt=2, datasn=3, buffer_offset=4, final=True,
                  data=bytes(range(256)) * 400 + b"xyz")
    pdus: list[Pdu] = [*SAMPLES[:6], big, NopOut(itt=9, data=b"p"), big, *SAMPLES[6:]]
    stream = b"".join(p.encode(hd, dd) for p in pdus)
    dec = PduDecoder(header_digest=hd, data_digest=dd, max_data_segment_length=1 << 20)
    assert _recv_buffered(dec, stream, reads) == pdus
    assert dec.buffered == 0


def test_buffered_receive_lands_large_data_in_place() -> None:
    big = DataOut(itt=1, data=bytes(range(256)) * 512)
    wire = big.encode()
    dec = PduDecoder(max_data_segment_length=1 << 20)
    view = dec.get_buffer(-1)
    view[:1000] = wire[:1000]
    dec.buffer_updated(1000)
    assert dec.next() is None  # now gathering into the PDU's own buffer
    rest = dec.get_buffer(-1)
    assert len(rest) == len(wire) - 1000  # exactly what is missing: no overrun, no copy
    rest[:] = wire[1000:]
    dec.buffer_updated(len(rest))
    (pdu,) = [dec.next()]
    assert isinstance(pdu, DataOut) and isinstance(pdu.data, memoryview)
    assert bytes(pdu.data) == bytes(big.data)
    assert pdu.data.obj is rest.obj  # the very buffer the "kernel" wrote into
