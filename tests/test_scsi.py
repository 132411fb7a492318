"""SCSI command emulation (SPC-4 / SBC-3) over an in-memory backend."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest

from edge import scsi
from edge.backends import BackendNotReady, BlockBackend, FileBackend, make_naa, make_serial
from edge.scsi import CHECK_CONDITION, GOOD, LogicalUnit, ScsiError, ScsiResult
from edge.scsi.cdb import check_range

BS = 512
BLOCKS = 2048  # 1 MiB


class MemBackend:
    def __init__(self, blocks: int = BLOCKS, block_size: int = BS) -> None:
        self.block_size = block_size
        self.size_bytes = blocks * block_size
        self.buf = bytearray(self.size_bytes)
        self.serial = "SN0001"
        self.naa_id = make_naa("mem")
        self.writes: list[tuple[int, int, bool]] = []
        self.flushes = 0
        self.fail: BaseException | None = None

    async def read(self, offset: int, length: int) -> bytes:
        if self.fail:
            raise self.fail
        assert offset >= 0 and offset + length <= self.size_bytes
        return bytes(self.buf[offset:offset + length])

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        if self.fail:
            raise self.fail
        assert offset >= 0 and offset + len(data) <= self.size_bytes
        self.buf[offset:offset + len(data)] = data
        self.writes.append((offset, len(data), fua))

    async def flush(self) -> None:
        self.flushes += 1


def run(lu: LogicalUnit | None, cdb: bytes, data: bytes = b"", luns: tuple[int, ...] = (0,)
        ) -> ScsiResult:
    return asyncio.run(scsi.execute(lu, cdb.ljust(16, b"\0"), data, luns))


def sense_of(r: ScsiResult) -> tuple[int, int, int]:
    assert r.status == CHECK_CONDITION
    s = r.sense
    assert s[0] & 0x7F == 0x70 and s[7] == 10 and len(s) == 18
    return s[2] & 0x0F, s[12], s[13]


@pytest.fixture
def mem() -> MemBackend:
    return MemBackend()


@pytest.fixture
def lu(mem: MemBackend) -> LogicalUnit:
    return LogicalUnit(mem)


def rw10(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, n, 0)


def rw16(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, n, 0, 0)


def rw12(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIIBB", op, flags, lba, n, 0, 0)


def rw6(op: int, lba: int, n: int) -> bytes:
    return bytes((op, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, n & 0xFF, 0))


def test_protocol_conformance(mem: MemBackend, tmp_path: Any) -> None:
    assert isinstance(mem, BlockBackend)
    with FileBackend(tmp_path / "f.img", 4096) as fb:
        assert isinstance(fb, BlockBackend)


# --------------------------------------------------------------------------- INQUIRY


def test_standard_inquiry(lu: LogicalUnit) -> None:
    r = run(lu, bytes((0x12, 0, 0, 0, 255)))
    d = bytes(r.data)
    assert r.status == GOOD and len(d) >= 36
    assert d[0] == 0 and d[2] == 5 and d[3] & 0x0F == 2 and d[4] == len(d) - 5
    assert d[7] & 0x02  # CMDQUE
    assert all(0x20 <= c < 0x7F for c in d[8:36])
    descs = {int.from_bytes(d[58 + 2 * i:60 + 2 * i], "big") for i in range(8)}
    assert 0x04C0 in descs  # SBC-3


def test_inquiry_allocation_length(lu: LogicalUnit) -> None:
    assert len(run(lu, bytes((0x12, 0, 0, 0, 5))).data) == 5
    assert len(run(lu, bytes((0x12, 0, 0, 0, 0))).data) == 0


def test_inquiry_invalid_fields(lu: LogicalUnit) -> None:
    assert sense_of(run(lu, bytes((0x12, 0, 0x80, 0, 255)))) == (5, 0x24, 0)  # page w/o EVPD
    assert sense_of(run(lu, bytes((0x12, 2, 0, 0, 255)))) == (5, 0x24, 0)  # CMDDT
    assert sense_of(run(lu, bytes((0x12, 1, 0x99, 0, 255)))) == (5, 0x24, 0)


def vpd(lu: LogicalUnit, page: int) -> bytes:
    r = run(lu, bytes((0x12, 1, page, 0x10, 0)))
    assert r.status == GOOD
    d = bytes(r.data)
    assert d[1] == page and int.from_bytes(d[2:4], "big") == len(d) - 4
    return d


def test_vpd_pages(lu: LogicalUnit, mem: MemBackend) -> None:
    sup = vpd(lu, 0x00)
    assert list(sup[4:]) == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    for p in sup[4:]:
        vpd(lu, p)
    assert vpd(lu, 0x80)[4:] == b"SN0001"
    d83 = vpd(lu, 0x83)
    # First designator: NAA, binary, LU association, 16 bytes, NAA 6.
    assert d83[4] & 0x0F == 1 and d83[5] & 0x3F == 3 and d83[7] == 16
    assert d83[8:24] == mem.naa_id and d83[8] >> 4 == 6
    # Second: T10 vendor id, ASCII.
    assert d83[24] & 0x0F == 2 and d83[25] & 0x0F == 1
    assert d83[28:36] == b"STEELFUS"
    b0 = vpd(lu, 0xB0)
    assert len(b0) == 0x3C + 4
    assert int.from_bytes(b0[8:12], "big") == lu.max_transfer_blocks
    b1 = vpd(lu, 0xB1)
    assert len(b1) == 0x3C + 4 and int.from_bytes(b1[4:6], "big") == 1
    b2 = vpd(lu, 0xB2)
    assert b2[5] & 0xE4 == 0xE4 and not b2[5] & 0x02  # LBPU LBPWS LBPWS10 LBPRZ, no ANC_SUP
    assert int.from_bytes(b0[20:24], "big") == lu.max_transfer_blocks  # MAX UNMAP LBA COUNT
    assert int.from_bytes(b0[24:28], "big") == 256  # MAX UNMAP BLOCK DESCRIPTOR COUNT
    assert b0[5] == 255  # MAXIMUM COMPARE AND WRITE LENGTH
    thick = LogicalUnit(mem, thin_provisioning=False)
    assert 0xB2 not in thick.vpd and thick.vpd[0xB0][24:28] == bytes(4)


def test_make_naa_is_stable_and_distinct() -> None:
    a, b = make_naa("lun-a"), make_naa("lun-b")
    assert a == make_naa("lun-a") and a != b
    assert len(a) == 16 and a[0] >> 4 == 6
    assert make_serial("x").isprintable()


# --------------------------------------------------------------------------- capacity


def test_read_capacity(lu: LogicalUnit, mem: MemBackend) -> None:
    r = run(lu, bytes((0x25,)))
    assert struct.unpack(">II", bytes(r.data)) == (BLOCKS - 1, BS)
    assert sense_of(run(lu, bytes((0x25, 0, 0, 0, 0, 1)))) == (5, 0x24, 0)  # LBA w/o PMI
    r16 = run(lu, bytes((0x9E, 0x10)) + bytes(8) + (32).to_bytes(4, "big"))
    d = bytes(r16.data)
    assert len(d) == 32
    assert struct.unpack(">QI", d[:12]) == (BLOCKS - 1, BS)
    assert d[13] & 0x0F == 0  # one logical block per physical block (see LogicalUnit)
    assert d[14] & 0xC0 == 0xC0  # LBPME, LBPRZ
    d4k = bytes(run(LogicalUnit(mem, physical_block_size=4096),
                    bytes((0x9E, 0x10)) + bytes(8) + (32).to_bytes(4, "big")).data)
    assert d4k[13] & 0x0F == 3
    assert len(run(lu, bytes((0x9E, 0x10)) + bytes(8) + (12).to_bytes(4, "big")).data) == 12


def test_service_action_in_unknown_sa(lu: LogicalUnit) -> None:
    r = run(lu, bytes((0x9E, 0x1F)))
    assert sense_of(r) == (5, 0x24, 0)
    assert r.sense[15] & 0x80 and int.from_bytes(r.sense[16:18], "big") == 1


def test_read_capacity_10_saturates() -> None:
    big = MemBackend(blocks=4)
    big.size_bytes = (1 << 33) * BS  # pretend: 4 TiB of 512-byte blocks
    r = run(LogicalUnit(big), bytes((0x25,)))
    assert struct.unpack(">II", bytes(r.data)) == (0xFFFFFFFF, BS)


# --------------------------------------------------------------------------- READ / WRITE


@pytest.mark.parametrize("cdb_w,cdb_r", [
    (lambda lba, n: rw6(0x0A, lba, n), lambda lba, n: rw6(0x08, lba, n)),
    (lambda lba, n: rw10(0x2A, lba, n), lambda lba, n: rw10(0x28, lba, n)),
    (lambda lba, n: rw12(0xAA, lba, n), lambda lba, n: rw12(0xA8, lba, n)),
    (lambda lba, n: rw16(0x8A, lba, n), lambda lba, n: rw16(0x88, lba, n)),
])
def test_write_then_read(lu: LogicalUnit, mem: MemBackend, cdb_w: Any, cdb_r: Any) -> None:
    payload = bytes(range(256)) * 8  # 4 blocks
    r = run(lu, cdb_w(10, 4), payload)
    assert r.status == GOOD and r.transfer_length == len(payload)
    assert mem.buf[10 * BS:14 * BS] == payload
    assert bytes(run(lu, cdb_r(10, 4)).data) == payload


def test_read6_zero_means_256(lu: LogicalUnit) -> None:
    assert len(run(lu, rw6(0x08, 0, 0)).data) == 256 * BS


def test_fua_reaches_backend(lu: LogicalUnit, mem: MemBackend) -> None:
    run(lu, rw10(0x2A, 0, 1, flags=0x08), bytes(BS))
    run(lu, rw16(0x8A, 1, 1), bytes(BS))
    assert mem.writes == [(0, BS, True), (BS, BS, False)]


@pytest.mark.parametrize("lba,n", [
    (BLOCKS, 1), (BLOCKS - 1, 2), (BLOCKS + 1 - 3, 4), (2**31, 1), (2**32 - 1, 1),
    (2**64 - 1, 1), (2**64 - 1, 0), (0, BLOCKS + 1), (BLOCKS + 1, 0),
])
def test_lba_out_of_range_read16(lu: LogicalUnit, lba: int, n: int) -> None:
    assert sense_of(run(lu, rw16(0x88, lba, n))) == (5, 0x21, 0)
    assert sense_of(run(lu, rw16(0x8A, lba, n), bytes(n * BS))) == (5, 0x21, 0)


@pytest.mark.parametrize("lba", [BLOCKS + 1, 2**31, 2**32 - 1])
def test_lba_out_of_range_read10(lu: LogicalUnit, lba: int) -> None:
    assert sense_of(run(lu, rw10(0x28, lba, 1))) == (5, 0x21, 0)
    assert sense_of(run(lu, rw10(0x28, lba, 0))) == (5, 0x21, 0)


def test_range_check_never_overflows() -> None:
    check_range(0, 10, 10)
    check_range(9, 1, 10)
    check_range(10, 0, 10)
    for lba, n in [(10, 1), (2**64 - 1, 2**32 - 1), (2**63, 2**63), (0, 11), (1, 2**64 - 1)]:
        with pytest.raises(ScsiError) as ei:
            check_range(lba, n, 10)
        assert (ei.value.asc, ei.value.ascq) == (0x21, 0)


def test_end_of_lun_and_zero_blocks(lu: LogicalUnit) -> None:
    for n in (1, 2, 255):
        assert run(lu, rw16(0x88, BLOCKS - n, n)).status == GOOD
    r = run(lu, rw10(0x28, 0, 0))
    assert r.status == GOOD and len(r.data) == 0


def test_protect_fields_rejected(lu: LogicalUnit) -> None:
    assert sense_of(run(lu, rw10(0x28, 0, 1, flags=0x20))) == (5, 0x24, 0)
    assert sense_of(run(lu, rw16(0x8A, 0, 1, flags=0x40), bytes(BS))) == (5, 0x24, 0)


def test_transfer_length_limit(mem: MemBackend) -> None:
    lu = LogicalUnit(mem, max_transfer_bytes=64 * BS)
    assert run(lu, rw10(0x28, 0, 64)).status == GOOD
    assert sense_of(run(lu, rw10(0x28, 0, 65))) == (5, 0x24, 0)


def test_write_data_length_mismatch(lu: LogicalUnit, mem: MemBackend) -> None:
    # Fewer whole blocks than asked: write those, report the wanted length.
    r = run(lu, rw10(0x2A, 0, 2), b"b" * BS)
    assert r.status == GOOD and r.transfer_length == 2 * BS
    assert mem.writes == [(0, BS, False)]
    # A partial block: refuse, nothing written.
    r = run(lu, rw10(0x2A, 5, 1), b"c" * 200)
    assert sense_of(r) == (5, 0x0E, 0x03) and r.transfer_length == BS
    assert len(mem.writes) == 1
    # More than asked: use what the CDB says.
    r = run(lu, rw10(0x2A, 7, 1), b"d" * 3 * BS)
    assert r.status == GOOD and r.transfer_length == BS
    assert mem.writes[-1] == (7 * BS, BS, False)


def test_read_only(mem: MemBackend) -> None:
    lu = LogicalUnit(mem, read_only=True)
    assert sense_of(run(lu, rw10(0x2A, 0, 1), bytes(BS))) == (7, 0x27, 0)
    ms = bytes(run(lu, bytes((0x1A, 0, 0x3F, 0, 255))).data)
    assert ms[2] & 0x80


# --------------------------------------------------------------------------- errors


def test_invalid_opcode(lu: LogicalUnit) -> None:
    for op in (0x04, 0x3B, 0x9C, 0xC0, 0xFF):  # FORMAT, WRITE BUFFER, atomic w/o backend
        assert sense_of(run(lu, bytes((op,)))) == (5, 0x20, 0)


def test_backend_not_ready(lu: LogicalUnit, mem: MemBackend) -> None:
    mem.fail = BackendNotReady("core unreachable", ascq=0x0A)
    assert sense_of(run(lu, rw10(0x28, 0, 1))) == (2, 0x04, 0x0A)


def test_backend_failure_is_hardware_error(lu: LogicalUnit, mem: MemBackend) -> None:
    mem.fail = OSError("disk on fire")
    assert sense_of(run(lu, rw10(0x2A, 0, 1), bytes(BS))) == (4, 0x44, 0)


def test_missing_lun() -> None:
    r = run(None, bytes((0x12, 0, 0, 0, 96)))
    assert r.status == GOOD and r.data[0] == 0x7F
    assert sense_of(run(None, rw10(0x28, 0, 1))) == (5, 0x25, 0)
    assert sense_of(run(None, bytes((0x00,)))) == (5, 0x25, 0)
    rs = run(None, bytes((0x03, 0, 0, 0, 18)))
    assert rs.status == GOOD and rs.data[12] == 0x25
    assert run(None, bytes((0xA0,)) + bytes(5) + (256).to_bytes(4, "big"), luns=(0, 3)
               ).status == GOOD


# --------------------------------------------------------------------------- misc commands


def test_test_unit_ready_and_sync_cache(lu: LogicalUnit, mem: MemBackend) -> None:
    assert run(lu, bytes(6)).status == GOOD
    assert run(lu, rw10(0x35, 0, 0)).status == GOOD
    assert run(lu, rw16(0x91, 10, 10)).status == GOOD
    assert mem.flushes == 2
    assert sense_of(run(lu, rw16(0x91, 2**64 - 1, 1))) == (5, 0x21, 0)


def test_report_luns(lu: LogicalUnit) -> None:
    r = run(lu, bytes((0xA0,)) + bytes(5) + (256).to_bytes(4, "big"), luns=(0, 1, 300))
    d = bytes(r.data)
    assert int.from_bytes(d[:4], "big") == 24
    assert d[8:16] == bytes(8)
    assert d[16:18] == b"\x00\x01"
    assert d[24:26] == bytes((0x41, 0x2C))  # flat addressing for 300
    assert sense_of(run(lu, bytes((0xA0,)) + bytes(5) + (15).to_bytes(4, "big"))) == (
        5, 0x24, 0)


def test_mode_sense_6(lu: LogicalUnit) -> None:
    d = bytes(run(lu, bytes((0x1A, 0, 0x3F, 0, 255))).data)
    assert d[0] == len(d) - 1 and d[3] == 8
    blocks, bl = struct.unpack(">I", d[4:8])[0], int.from_bytes(d[9:12], "big")
    assert (blocks, bl) == (BLOCKS, BS)
    pages = d[12:]
    seen = {}
    i = 0
    while i < len(pages):
        seen[pages[i] & 0x3F] = pages[i:i + 2 + pages[i + 1]]
        i += 2 + pages[i + 1]
    assert sorted(seen) == [0x01, 0x08, 0x0A]
    assert seen[0x08][2] & 0x04  # WCE
    assert len(seen[0x08]) == 20 and len(seen[0x0A]) == 12 and len(seen[0x01]) == 12
    assert not seen[0x0A][2] & 0x04  # D_SENSE=0: we return fixed-format sense


def test_mode_sense_dbd_single_page_and_errors(lu: LogicalUnit) -> None:
    d = bytes(run(lu, bytes((0x1A, 0x08, 0x08, 0, 255))).data)
    assert d[3] == 0 and d[4] == 0x08 and len(d) == 4 + 20
    assert len(run(lu, bytes((0x1A, 0, 0x3F, 0, 4))).data) == 4
    assert sense_of(run(lu, bytes((0x1A, 0, 0x1C, 0, 255)))) == (5, 0x24, 0)
    assert sense_of(run(lu, bytes((0x1A, 0, 0xFF, 0, 255)))) == (5, 0x39, 0)  # saved values
    assert sense_of(run(lu, bytes((0x1A, 0, 0x3F, 0x05, 255)))) == (5, 0x24, 0)
    ch = bytes(run(lu, bytes((0x1A, 0x08, 0x48, 0, 255))).data)  # changeable: WCE only
    assert ch[4:6] == bytes((0x08, 0x12)) and ch[6] == 0x04 and not any(ch[7:])


def test_mode_sense_10_long_lba(lu: LogicalUnit) -> None:
    d = bytes(run(lu, bytes((0x5A, 0x10, 0x0A, 0, 0, 0, 0, 1, 0))).data)
    assert int.from_bytes(d[:2], "big") == len(d) - 2
    assert d[4] & 1 and int.from_bytes(d[6:8], "big") == 16
    assert struct.unpack(">QII", d[8:24]) == (BLOCKS, 0, BS)
    assert d[24] == 0x0A
    short = bytes(run(lu, bytes((0x5A, 0, 0x0A, 0, 0, 0, 0, 1, 0))).data)
    assert int.from_bytes(short[6:8], "big") == 8


def test_request_sense(lu: LogicalUnit) -> None:
    d = bytes(run(lu, bytes((0x03, 0, 0, 0, 252))).data)
    assert d[0] == 0x70 and d[2] == 0 and len(d) == 18
    dd = bytes(run(lu, bytes((0x03, 1, 0, 0, 252))).data)
    assert dd[0] == 0x72


def test_verify(lu: LogicalUnit, mem: MemBackend) -> None:
    mem.buf[0:4 * BS] = b"q" * (4 * BS)
    assert run(lu, rw10(0x2F, 0, 4)).status == GOOD  # BYTCHK=0
    assert run(lu, rw16(0x8F, 0, 4, flags=0x02), b"q" * 4 * BS).status == GOOD
    bad = bytearray(b"q" * 4 * BS)
    bad[BS + 7] = 0
    r = run(lu, rw10(0x2F, 0, 4, flags=0x02), bytes(bad))
    assert sense_of(r) == (0xE, 0x1D, 0)
    assert r.sense[0] & 0x80 and int.from_bytes(r.sense[3:7], "big") == BS + 7
    assert run(lu, rw12(0xAF, 0, 4, flags=0x06), b"q" * BS).status == GOOD  # BYTCHK=11b
    assert sense_of(run(lu, rw10(0x2F, 0, 1, flags=0x04))) == (5, 0x24, 0)  # BYTCHK=10b
    assert sense_of(run(lu, rw16(0x8F, 2**64 - 1, 1))) == (5, 0x21, 0)


def test_fixed_sense_layout() -> None:
    s = scsi.fixed_sense(5, 0x24, 0, field_pointer=300, information=0x01020304)
    assert s[0] == 0xF0 and s[2] == 5 and s[3:7] == bytes((1, 2, 3, 4))
    assert s[15] == 0xC0 and s[16:18] == (300).to_bytes(2, "big")


def test_file_backend(tmp_path: Any) -> None:
    path = tmp_path / "lun.img"

    async def go() -> None:
        with FileBackend(path, 1 << 20, inline_io_max=4096) as fb:
            assert fb.size_bytes == 1 << 20
            await fb.write(0, b"a" * 512)
            await fb.write(4096, b"b" * 8192, fua=True)  # thread path + fdatasync
            assert await fb.read(0, 512) == b"a" * 512
            assert await fb.read(4096, 8192) == b"b" * 8192
            await fb.flush()
    asyncio.run(go())
    assert path.stat().st_size == 1 << 20
    with FileBackend(path) as fb:  # existing file: size taken from it
        assert fb.size_bytes == 1 << 20
