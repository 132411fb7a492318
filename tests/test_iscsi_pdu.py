"""PDU codec: every opcode round-trips whole, byte by byte and with trailing
bytes; digests are produced and checked; malformed input raises only
IscsiProtocolError (RFC 7143 §11)."""

from __future__ import annotations

import struct

import crc32c
import pytest

from steelfusion.iscsi import pdu
from tests.iscsi_helpers import SAMPLES

DIGESTS = [(False, False), (True, False), (False, True), (True, True)]


def _ids(p: pdu.Pdu) -> str:
    return type(p).__name__


def test_every_opcode_has_a_sample() -> None:
    assert {p.opcode for p in SAMPLES} == set(pdu.Opcode)


def test_bhs_is_48_bytes_and_padded() -> None:
    for p in SAMPLES:
        wire = p.encode()
        assert len(wire) % 4 == 0
        dsl = int.from_bytes(wire[5:8], "big")
        assert dsl == len(p.payload())
        assert wire[0] & 0x3F == p.opcode


@pytest.mark.parametrize("hd,dd", DIGESTS)
@pytest.mark.parametrize("sample", SAMPLES, ids=_ids)
def test_round_trip_whole(sample: pdu.Pdu, hd: bool, dd: bool) -> None:
    dec = pdu.PduDecoder(header_digest=hd, data_digest=dd)
    assert dec.feed(sample.encode(hd, dd)) == [sample]
    assert dec.buffered == 0


@pytest.mark.parametrize("hd,dd", [(False, False), (True, True)])
@pytest.mark.parametrize("sample", SAMPLES, ids=_ids)
def test_round_trip_byte_by_byte(sample: pdu.Pdu, hd: bool, dd: bool) -> None:
    dec = pdu.PduDecoder(header_digest=hd, data_digest=dd)
    wire = sample.encode(hd, dd)
    got: list[pdu.Pdu] = []
    for i in range(len(wire)):
        got += dec.feed(wire[i:i + 1])
        if i < len(wire) - 1:
            assert got == []
    assert got == [sample]


@pytest.mark.parametrize("hd,dd", DIGESTS)
def test_many_pdus_in_one_chunk_with_trailing_bytes(hd: bool, dd: bool) -> None:
    dec = pdu.PduDecoder(header_digest=hd, data_digest=dd)
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
        dec = pdu.PduDecoder(header_digest=True, data_digest=True)
        assert dec.feed(stream[:cut]) + dec.feed(stream[cut:]) == SAMPLES[:6]


@pytest.mark.parametrize("hd,dd", DIGESTS)
@pytest.mark.parametrize("step", [7, 1000, 40000, 65536, 300000])
def test_large_pdus_split_across_reads(hd: bool, dd: bool, step: int) -> None:
    """PDUs above ASSEMBLY_MIN split across reads are gathered in their own
    buffer; order and content survive any split."""
    big = pdu.DataOut(itt=1, ttt=2, datasn=3, buffer_offset=4, final=True,
                      data=bytes(range(256)) * 400 + b"xyz")
    small = pdu.NopOut(itt=9, data=b"p")
    pdus: list[pdu.Pdu] = [small, big, big, small, big]
    stream = b"".join(p.encode(hd, dd) for p in pdus)
    dec = pdu.PduDecoder(header_digest=hd, data_digest=dd, max_data_segment_length=1 << 20)
    got: list[pdu.Pdu] = []
    for i in range(0, len(stream), step):
        got += dec.feed(stream[i:i + step])
    assert got == pdus
    assert dec.buffered == 0


def test_large_pdu_assembly_is_a_view() -> None:
    big = pdu.DataOut(itt=1, data=bytes(pdu.ASSEMBLY_MIN * 2))
    wire = big.encode()
    dec = pdu.PduDecoder()
    assert dec.feed(wire[:100]) == []
    assert dec.buffered == 100
    (got,) = dec.feed(wire[100:] + pdu.NopOut(itt=2).encode()[:10])
    assert isinstance(got, pdu.DataOut) and isinstance(got.data, memoryview)
    assert memoryview(got.data.obj).nbytes == len(wire)  # its own buffer, exactly the PDU
    assert dec.buffered == 10


def test_zero_copy_data_when_chunk_holds_whole_pdus() -> None:
    wire = SAMPLES[9].encode()
    (got,) = pdu.PduDecoder().feed(wire)
    assert isinstance(got, pdu.DataOut) and isinstance(got.data, memoryview)
    assert got.data.obj is wire


def test_encode_parts_does_not_copy_payload() -> None:
    payload = memoryview(bytearray(b"z" * 4096))
    parts = pdu.DataIn(itt=1, data=payload).encode_parts(True, True)
    assert parts[1] is payload
    assert len(parts[0]) == 52 and len(parts[2]) == 4


def test_digest_is_crc32c_little_endian_over_padded_data() -> None:
    wire = pdu.NopOut(itt=1, data=b"abc").encode(True, True)
    header = wire[:48]
    assert wire[48:52] == crc32c.crc32c(header).to_bytes(4, "little")
    assert wire[52:56] == b"abc\0"
    assert wire[56:60] == crc32c.crc32c(b"abc\0").to_bytes(4, "little")
    assert pdu.digest(b"123456789") == 0xE3069283  # CRC-32C check value


def test_header_digest_mismatch() -> None:
    wire = bytearray(pdu.NopOut(itt=1).encode(True, False))
    wire[50] ^= 1
    with pytest.raises(pdu.IscsiProtocolError) as ei:
        pdu.PduDecoder(header_digest=True).feed(bytes(wire))
    assert ei.value.reason is None  # header untrusted: nothing to Reject


def test_data_digest_mismatch_carries_reject_reason() -> None:
    wire = bytearray(pdu.DataOut(itt=1, data=b"12345678").encode(False, True))
    wire[50] ^= 0x80
    with pytest.raises(pdu.IscsiProtocolError) as ei:
        pdu.PduDecoder(data_digest=True).feed(bytes(wire))
    assert ei.value.reason == pdu.RejectReason.DATA_DIGEST_ERROR
    assert ei.value.header is not None and len(ei.value.header) == 48


def test_huge_data_segment_refused_before_buffering() -> None:
    hdr = bytearray(pdu.NopOut(itt=1).encode())
    hdr[5:8] = (0xFFFFFF).to_bytes(3, "big")
    dec = pdu.PduDecoder(max_data_segment_length=8192)
    with pytest.raises(pdu.IscsiProtocolError, match="DataSegmentLength"):
        dec.feed(bytes(hdr))


@pytest.mark.parametrize("opcode", [0x07, 0x11, 0x1C, 0x3E])
def test_unknown_opcode(opcode: int) -> None:
    hdr = bytearray(48)
    hdr[0] = opcode
    with pytest.raises(pdu.IscsiProtocolError) as ei:
        pdu.PduDecoder().feed(bytes(hdr))
    assert ei.value.reason == pdu.RejectReason.PROTOCOL_ERROR


def test_role_filters_opcodes() -> None:
    target_side = pdu.PduDecoder(accept=pdu.INITIATOR_OPCODES)
    with pytest.raises(pdu.IscsiProtocolError):
        target_side.feed(pdu.NopIn(itt=1).encode())
    initiator_side = pdu.PduDecoder(accept=pdu.TARGET_OPCODES)
    with pytest.raises(pdu.IscsiProtocolError):
        initiator_side.feed(pdu.NopOut(itt=1).encode())


def test_ahs_on_non_command_and_bad_ahs() -> None:
    wire = bytearray(pdu.NopOut(itt=1).encode())
    wire[4] = 1
    with pytest.raises(pdu.IscsiProtocolError):
        pdu.PduDecoder().feed(bytes(wire) + bytes(4))
    cmd = bytearray(pdu.ScsiCommand(itt=1).encode())
    cmd[4] = 1
    bad_ahs = struct.pack(">HBB", 9, 1, 0)  # claims 9 bytes, only 1 follows
    with pytest.raises(pdu.IscsiProtocolError):
        pdu.PduDecoder().feed(bytes(cmd) + bad_ahs)
    unknown = struct.pack(">HBB", 1, 0x3F, 0)
    with pytest.raises(pdu.IscsiProtocolError):
        pdu.PduDecoder().feed(bytes(cmd) + unknown)


def test_sense_segment_round_trip() -> None:
    sense = bytes(range(18))
    assert pdu.parse_sense_segment(pdu.sense_segment(sense)) == sense
    assert pdu.sense_segment(b"") == b""
    assert pdu.parse_sense_segment(b"") == b""


def test_field_ranges_checked_on_encode() -> None:
    with pytest.raises(ValueError, match=r"NopOut\.itt"):
        pdu.NopOut(itt=1 << 32).encode()
    with pytest.raises(ValueError):
        pdu.DataIn(itt=1, data=memoryview(bytes(1 << 24))).encode()


def _recv_buffered(dec: pdu.PduDecoder, stream: bytes, reads: list[int]) -> list[pdu.Pdu]:
    """What a BufferedProtocol does: recv_into(get_buffer()), then buffer_updated()."""
    out: list[pdu.Pdu] = []
    pos, i = 0, 0
    while pos < len(stream):
        view = dec.get_buffer(-1)
        want = reads[i % len(reads)] if reads else len(view)
        i += 1
        k = min(len(view), want, len(stream) - pos)
        view[:k] = stream[pos:pos + k]
        pos += k
        dec.buffer_updated(k)
        while (p := dec.next()) is not None:
            out.append(p)
    return out


@pytest.mark.parametrize("hd,dd", DIGESTS)
@pytest.mark.parametrize("reads", [[], [1], [7, 300000], [40000], [65536, 3], [1000, 250000]])
def test_buffered_receive_matches_feed(hd: bool, dd: bool, reads: list[int]) -> None:
    """get_buffer/buffer_updated decode the same PDUs as feed() in any split, and a large
    PDU's data segment is received straight into its own buffer."""
    big = pdu.DataOut(itt=1, ttt=2, datasn=3, buffer_offset=4, final=True,
                      data=bytes(range(256)) * 400 + b"xyz")
    pdus: list[pdu.Pdu] = [*SAMPLES[:6], big, pdu.NopOut(itt=9, data=b"p"), big, *SAMPLES[6:]]
    stream = b"".join(p.encode(hd, dd) for p in pdus)
    dec = pdu.PduDecoder(header_digest=hd, data_digest=dd, max_data_segment_length=1 << 20)
    assert _recv_buffered(dec, stream, reads) == pdus
    assert dec.buffered == 0


def test_buffered_receive_lands_large_data_in_place() -> None:
    big = pdu.DataOut(itt=1, data=bytes(range(256)) * 512)
    wire = big.encode()
    dec = pdu.PduDecoder(max_data_segment_length=1 << 20)
    view = dec.get_buffer(-1)
    view[:1000] = wire[:1000]
    dec.buffer_updated(1000)
    assert dec.next() is None  # now gathering into the PDU's own buffer
    rest = dec.get_buffer(-1)
    assert len(rest) == len(wire) - 1000  # exactly what is missing: no overrun, no copy
    rest[:] = wire[1000:]
    dec.buffer_updated(len(rest))
    (got,) = [dec.next()]
    assert isinstance(got, pdu.DataOut) and isinstance(got.data, memoryview)
    assert bytes(got.data) == bytes(big.data)
    assert got.data.obj is rest.obj  # the very buffer the "kernel" wrote into
