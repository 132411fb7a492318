"""SBC-3/SPC-4 commands beyond read/write: REPORT SUPPORTED OPERATION CODES,
WRITE SAME, UNMAP, GET LBA STATUS, COMPARE AND WRITE, ORWRITE, WRITE AND
VERIFY, WRITE ATOMIC, PRE-FETCH, MODE SELECT, RESERVE/RELEASE, unit
attentions, EXTENDED COPY and the LBA range locks."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge import scsi
from edge.aio import RangeLock
from edge.backends import FileBackend
from edge.scsi import (
    CHECK_CONDITION,
    GOOD,
    RESERVATION_CONFLICT,
    ItNexus,
    LogicalUnit,
    ScsiResult,
)
from edge.scsi.commands import COMMANDS
from edge.scsi.xcopy import XCOPY_MAX_TARGETS
from tests.test_scsi import BLOCKS, BS, MemBackend, rw10, rw16, sense_of

A = ItNexus("iqn.2024-01.test:a", 0x1, "iqn.2024-01.test:t", 1, session_id=1)
B = ItNexus("iqn.2024-01.test:b", 0x2, "iqn.2024-01.test:t", 1, session_id=2)


def run(lu: LogicalUnit, cdb: bytes, data: bytes = b"", nexus: ItNexus = A) -> ScsiResult:
    return asyncio.run(lu.execute(cdb.ljust(16, b"\0") if len(cdb) < 6 else cdb, data,
                                  (0,), nexus))


@pytest.fixture
def mem() -> MemBackend:
    return MemBackend()


@pytest.fixture
def lu(mem: MemBackend) -> LogicalUnit:
    u = LogicalUnit(mem, atomic_write_max_bytes=64 * 1024)
    u.attach(A)
    u.attach(B)
    return u


def ws(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    if op == 0x41:
        return struct.pack(">BBIBHB", op, flags, lba, 0, n, 0)
    return struct.pack(">BBQIBB", op, flags, lba, n, 0, 0)


def caw(lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQ3xBBB", 0x89, flags, lba, n, 0, 0)


def unmap_list(*ranges: tuple[int, int]) -> bytes:
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", len(body) + 6, len(body)) + body


def unmap_cdb(plen: int, anchor: bool = False) -> bytes:
    return struct.pack(">BB4xBHB", 0x42, 1 if anchor else 0, 0, plen, 0)


# --------------------------------------------------------------------------- RSOC


def rsoc(lu: LogicalUnit, options: int, op: int = 0, sa: int = 0, rctd: bool = False,
         alloc: int = 65535) -> ScsiResult:
    cdb = struct.pack(">BBBBHIBB", 0xA3, 0x0C, options | (0x80 if rctd else 0), op, sa,
                      alloc, 0, 0)
    return run(lu, cdb)


def test_report_supported_opcodes_all_and_one(lu: LogicalUnit) -> None:
    r = rsoc(lu, 0)
    d = bytes(r.data)
    n = int.from_bytes(d[:4], "big")
    assert len(d) == n + 4 and n % 8 == 0
    seen = set()
    for i in range(4, len(d), 8):
        op, sa, flags, cdb_len = d[i], int.from_bytes(d[i + 2:i + 4], "big"), d[i + 5], \
            int.from_bytes(d[i + 6:i + 8], "big")
        servactv = bool(flags & 1)
        assert servactv or sa == 0
        seen.add((op, sa if servactv else None))
        one = bytes(rsoc(lu, 2 if servactv else 1, op, sa).data)
        assert one[1] & 0x07 == 0x03 and int.from_bytes(one[2:4], "big") == cdb_len
        assert one[4] == op and len(one) == 4 + cdb_len
        assert sense_of(rsoc(lu, 1 if servactv else 2, op, sa)) == (5, 0x24, 0)
    assert (0x89, None) in seen and (0x9E, 0x12) in seen and (0x5F, 0) in seen
    assert (0x9C, None) in seen  # atomic writes offered: the backend said so
    # every READ/WRITE-type command advertises DPO+FUA, as MODE SENSE's DPOFUA says
    for op in (0x28, 0x2A, 0x88, 0x8A, 0x89, 0x8B, 0x9C):
        assert bytes(rsoc(lu, 1, op).data)[5] & 0x18 == 0x18
    for op in (0x2E, 0x2F, 0x8E, 0x8F):
        assert bytes(rsoc(lu, 1, op).data)[5] & 0x10
    assert bytes(rsoc(lu, 1, 0xC0).data)[:4] == bytes((0, 1, 0, 0))  # not supported
    assert sense_of(rsoc(lu, 5)) == (5, 0x24, 0)
    assert len(bytes(rsoc(lu, 0, alloc=16).data)) == 16


def test_report_supported_opcodes_timeouts(lu: LogicalUnit) -> None:
    d = bytes(rsoc(lu, 0, rctd=True).data)
    i = 4
    while i < len(d):
        assert d[i + 5] & 0x02
        assert int.from_bytes(d[i + 8:i + 10], "big") == 0x0A
        i += 20
    assert i == len(d)
    one = bytes(rsoc(lu, 1, 0x28, rctd=True).data)
    assert one[1] & 0x80 and int.from_bytes(one[4 + 10:4 + 12], "big") == 0x0A


def test_command_table_is_consistent() -> None:
    keys = [(c.opcode, c.sa) for c in COMMANDS]
    assert len(keys) == len(set(keys))
    for c in COMMANDS:
        assert c.usage[0] == c.opcode
        assert len(c.usage) == {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}[c.opcode >> 5]
        if c.sa is not None:
            assert c.usage[1] & 0x1F == c.sa


def test_report_supported_tmf(lu: LogicalUnit) -> None:
    d = bytes(run(lu, struct.pack(">BBBxxxIBB", 0xA3, 0x0D, 0, 16, 0, 0)).data)
    assert d[0] & 0x80 and d[0] & 0x08  # ABORT TASK, LOGICAL UNIT RESET


# --------------------------------------------------------------------------- WRITE SAME


def test_write_same_writes_pattern_and_zero_means_to_the_end(lu: LogicalUnit,
                                                             mem: MemBackend) -> None:
    block = bytes(range(256)) * 2
    assert run(lu, ws(0x41, 10, 5), block).status == GOOD
    assert mem.buf[10 * BS:15 * BS] == block * 5
    assert mem.buf[15 * BS:16 * BS] == bytes(BS)
    small = LogicalUnit(MemBackend(blocks=64))
    assert run(small, ws(0x93, 60, 0), b"\x07" * BS).status == GOOD  # to the end
    assert small.backend.buf[60 * BS:] == b"\x07" * (4 * BS)  # type: ignore[attr-defined]
    assert sense_of(run(small, ws(0x93, 65, 0), b"\x07" * BS)) == (5, 0x21, 0)


def test_write_same_limits_and_fields(lu: LogicalUnit) -> None:
    blk = bytes(BS)
    assert sense_of(run(lu, ws(0x41, BLOCKS, 1), blk)) == (5, 0x21, 0)
    assert sense_of(run(lu, ws(0x93, 2**64 - 1, 1), blk)) == (5, 0x21, 0)
    assert sense_of(run(lu, ws(0x41, 0, 1, 0x20), blk)) == (5, 0x24, 0)  # WRPROTECT
    assert sense_of(run(lu, ws(0x41, 0, 1, 0x10), blk)) == (5, 0x24, 0)  # ANCHOR
    assert sense_of(run(lu, ws(0x41, 0, 1, 0x18), blk)) == (5, 0x24, 0)  # ANC_SUP=0
    assert run(lu, ws(0x41, 0, 1), blk * 2).status == CHECK_CONDITION  # wrong Data-Out
    assert sense_of(run(lu, ws(0x41, 0, 1), blk[:100])) == (5, 0x0E, 0x03)
    big = LogicalUnit(MemBackend(blocks=40000))
    assert sense_of(run(big, ws(0x93, 0, 0), blk)) == (5, 0x24, 0)  # > MAX WRITE SAME


def test_write_same_unmap_and_ndob(lu: LogicalUnit, mem: MemBackend) -> None:
    mem.buf[:8 * BS] = b"\xff" * (8 * BS)
    assert run(lu, ws(0x41, 0, 4, 0x08), b"\xff" * BS).status == GOOD  # UNMAP: zeros
    assert mem.buf[:4 * BS] == bytes(4 * BS) and mem.buf[4 * BS:5 * BS] == b"\xff" * BS
    assert run(lu, ws(0x93, 4, 4, 0x09)).status == GOOD  # NDOB + UNMAP
    assert mem.buf[:8 * BS] == bytes(8 * BS)
    assert sense_of(run(lu, ws(0x93, 0, 1, 0x01), bytes(BS))) == (5, 0x24, 0)  # NDOB + data


# --------------------------------------------------------------------------- UNMAP / GET LBA STATUS


def gls(lu: LogicalUnit, lba: int, alloc: int = 24) -> ScsiResult:
    return run(lu, struct.pack(">BBQIBB", 0x9E, 0x12, lba, alloc, 0, 0))


def descriptors(r: ScsiResult) -> list[tuple[int, int, int]]:
    d = bytes(r.data)
    n = int.from_bytes(d[:4], "big")
    return [struct.unpack(">QIB3x", d[i:i + 16]) for i in range(8, min(len(d), 4 + n), 16)]


def test_unmap_zeroes_and_get_lba_status_sees_it(lu: LogicalUnit, mem: MemBackend) -> None:
    mem.buf[:] = b"A" * len(mem.buf)
    plist = unmap_list((10, 5), (100, 0), (20, 1))
    assert run(lu, unmap_cdb(len(plist)), plist).status == GOOD
    assert mem.buf[10 * BS:15 * BS] == bytes(5 * BS) and mem.buf[15 * BS] == ord("A")
    assert mem.buf[20 * BS:21 * BS] == bytes(BS)
    assert descriptors(gls(lu, 0)) == [(0, 10, 0)]
    assert descriptors(gls(lu, 0, alloc=8 + 16 * 4)) == [(0, 10, 0), (10, 5, 1), (15, 5, 0),
                                                        (20, 1, 1)]
    assert descriptors(gls(lu, 12)) == [(12, 3, 1)]
    assert sense_of(gls(lu, BLOCKS)) == (5, 0x21, 0)
    assert sense_of(gls(lu, 2**64 - 1)) == (5, 0x21, 0)
    assert gls(lu, BLOCKS - 1).status == GOOD


def test_unmap_errors(lu: LogicalUnit, mem: MemBackend) -> None:
    mem.buf[:] = b"A" * len(mem.buf)
    assert run(lu, unmap_cdb(0)).status == GOOD
    assert sense_of(run(lu, unmap_cdb(4), bytes(4))) == (5, 0x1A, 0)
    assert sense_of(run(lu, unmap_cdb(24, anchor=True), unmap_list((0, 1)))) == (5, 0x24, 0)
    bad = unmap_list((5, 1), (BLOCKS, 1))
    assert sense_of(run(lu, unmap_cdb(len(bad)), bad)) == (5, 0x21, 0)
    assert mem.buf[5 * BS] == ord("A")  # nothing done when any descriptor is bad
    many = unmap_list(*[(i, 1) for i in range(257)])
    assert sense_of(run(lu, unmap_cdb(len(many)), many)) == (5, 0x26, 0)
    big = LogicalUnit(MemBackend(blocks=40000))
    huge = unmap_list((0, 20000), (20000, 20000))
    assert sense_of(run(big, unmap_cdb(len(huge)), huge)) == (5, 0x26, 0)


def test_file_backend_native_unmap_and_status(tmp_path: Any) -> None:
    with FileBackend(tmp_path / "thin.img", 1 << 20) as fb:
        lu = LogicalUnit(fb)
        assert run(lu, rw10(0x2A, 0, 2048), b"z" * (1 << 20)).status == GOOD
        plist = unmap_list((64, 64))
        assert run(lu, unmap_cdb(len(plist)), plist).status == GOOD
        assert bytes(run(lu, rw10(0x28, 64, 64)).data) == bytes(64 * BS)
        assert descriptors(gls(lu, 64)) == [(64, 64, 1)]
        assert descriptors(gls(lu, 0)) == [(0, 64, 0)]


# --------------------------------------------------------------------------- COMPARE AND WRITE / ORWRITE


def test_compare_and_write(lu: LogicalUnit, mem: MemBackend) -> None:
    mem.buf[5 * BS:7 * BS] = b"o" * (2 * BS)
    assert run(lu, caw(5, 2), b"o" * (2 * BS) + b"n" * (2 * BS)).status == GOOD
    assert mem.buf[5 * BS:7 * BS] == b"n" * (2 * BS)
    cmp = bytearray(b"n" * (2 * BS))
    cmp[BS + 3] = 0
    r = run(lu, caw(5, 2), bytes(cmp) + b"x" * (2 * BS))
    assert sense_of(r) == (0xE, 0x1D, 0) and int.from_bytes(r.sense[3:7], "big") == BS + 3
    assert mem.buf[5 * BS:7 * BS] == b"n" * (2 * BS)  # nothing written
    assert sense_of(run(lu, caw(5, 1), b"n" * (4 * BS))) == (5, 0x24, 0)  # Data-Out size
    assert sense_of(run(lu, caw(5, 3), b"n" * (4 * BS))) == (5, 0x24, 0)
    assert sense_of(run(lu, caw(BLOCKS, 1), bytes(2 * BS))) == (5, 0x21, 0)
    assert run(lu, caw(0, 0)).status == GOOD
    assert sense_of(run(lu, caw(0, 1, 0x20), bytes(2 * BS))) == (5, 0x24, 0)  # WRPROTECT


def test_compare_and_write_is_atomic_between_sessions(mem: MemBackend) -> None:
    """Two sessions swap a block 0->1 / 1->0 with COMPARE AND WRITE, many at
    once; with the range lock every success is consistent (libiscsi's
    MultipathIO.CompareAndWriteAsync)."""
    lu = LogicalUnit(mem)

    async def go() -> tuple[int, int]:
        async def one(i: int) -> int:
            a, b = (b"\0", b"\1") if i % 2 == 0 else (b"\1", b"\0")
            r = await lu.execute(caw(0, 1), a * BS + b * BS, (0,), A if i % 2 else B)
            return r.status
        statuses = await asyncio.gather(*(one(i) for i in range(200)))
        return statuses.count(GOOD), statuses.count(CHECK_CONDITION)
    good, miscompare = asyncio.run(go())
    assert good + miscompare == 200 and good >= 1
    assert mem.buf[0:BS] in (b"\0" * BS, b"\1" * BS)


def test_orwrite(lu: LogicalUnit, mem: MemBackend) -> None:
    mem.buf[0:BS] = b"\x0f" * BS
    assert run(lu, rw16(0x8B, 0, 1), b"\xa0" * BS).status == GOOD
    assert mem.buf[0:BS] == b"\xaf" * BS
    assert run(lu, rw16(0x8B, 0, 0)).status == GOOD
    assert sense_of(run(lu, rw16(0x8B, BLOCKS, 1), bytes(BS))) == (5, 0x21, 0)
    assert sense_of(run(lu, rw16(0x8B, 0, 1, 0x20), bytes(BS))) == (5, 0x24, 0)


# --------------------------------------------------------------------------- WRITE AND VERIFY / ATOMIC


def test_write_and_verify(lu: LogicalUnit, mem: MemBackend) -> None:
    for op, cdb in ((0x2E, rw10(0x2E, 3, 2, 0x02)), (0x8E, rw16(0x8E, 3, 2, 0x02))):
        r = run(lu, cdb, bytes([op]) * (2 * BS))
        assert r.status == GOOD and mem.buf[3 * BS:5 * BS] == bytes([op]) * (2 * BS)
        assert mem.writes[-1][2]  # written through before the check
    assert sense_of(run(lu, rw10(0x2E, 0, 1, 0x04), bytes(BS))) == (5, 0x24, 0)  # BYTCHK 10b
    r = run(lu, rw10(0x2E, 0, 2, 0x02), bytes(BS))  # one block of two arrived
    assert r.status == GOOD and r.transfer_length == 2 * BS


def test_write_and_verify_detects_a_bad_medium(mem: MemBackend) -> None:
    class Lossy(MemBackend):
        async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
            await super().write(offset, data, fua)
            self.buf[offset + 7] ^= 0xFF

    lu = LogicalUnit(Lossy())
    r = run(lu, rw10(0x2E, 1, 1, 0x02), b"q" * BS)
    assert sense_of(r) == (0xE, 0x1D, 0) and int.from_bytes(r.sense[3:7], "big") == 7
    assert run(lu, rw10(0x2E, 1, 1), b"q" * BS).status == GOOD  # BYTCHK=0: no compare


def test_write_atomic(lu: LogicalUnit, mem: MemBackend) -> None:
    def wa(lba: int, n: int, flags: int = 0, boundary: int = 0) -> bytes:
        return struct.pack(">BBQHHBB", 0x9C, flags, lba, boundary, n, 0, 0)
    assert run(lu, wa(4, 2, 0x18), b"w" * (2 * BS)).status == GOOD
    assert mem.buf[4 * BS:6 * BS] == b"w" * (2 * BS)
    assert run(lu, wa(0, 0)).status == GOOD
    assert sense_of(run(lu, wa(0, 129), bytes(129 * BS))) == (5, 0x24, 0)  # > 64 KiB
    assert sense_of(run(lu, wa(BLOCKS, 1), bytes(BS))) == (5, 0x21, 0)
    assert sense_of(run(lu, wa(0, 1, boundary=1), bytes(BS))) == (5, 0x24, 0)
    assert int.from_bytes(lu.vpd[0xB0][44:48], "big") == 128


# --------------------------------------------------------------------------- misc commands


def test_prefetch_start_stop_prevent_defects(lu: LogicalUnit, mem: MemBackend) -> None:
    assert run(lu, rw10(0x34, 0, 8)).status == GOOD
    assert run(lu, rw16(0x90, 0, 8, 0x02)).status == GOOD
    assert sense_of(run(lu, rw10(0x34, BLOCKS, 1))) == (5, 0x21, 0)
    mem.fail = RuntimeError("read failed")
    assert run(lu, rw10(0x34, 0, 8)).status == GOOD  # advisory
    mem.fail = None
    flushes = mem.flushes
    assert run(lu, bytes((0x1B, 0, 0, 0, 0x00, 0))).status == GOOD  # stop: flush
    assert mem.flushes == flushes + 1
    assert run(lu, bytes((0x1B, 0, 0, 0, 0x01, 0))).status == GOOD
    assert sense_of(run(lu, bytes((0x1B, 0, 0, 0, 0x40, 0)))) == (5, 0x24, 0)
    assert run(lu, bytes((0x1E, 0, 0, 0, 1, 0))).status == GOOD
    assert sense_of(run(lu, bytes((0x1E, 0, 0, 0, 2, 0)))) == (5, 0x24, 0)
    d = bytes(run(lu, struct.pack(">BBBxxxxHB", 0x37, 0, 0x18, 32, 0)).data)
    assert d == bytes((0, 0x18, 0, 0))
    d12 = bytes(run(lu, struct.pack(">BBIIBB", 0xB7, 0x08, 0, 32, 0, 0)).data)
    assert len(d12) == 8 and d12[1] == 0x08


def mode_select6(page: bytes) -> tuple[bytes, bytes]:
    plist = bytes(4) + page
    return bytes((0x15, 0x10, 0, 0, len(plist), 0)), plist


def test_mode_select_changes_wce_and_swp(lu: LogicalUnit, mem: MemBackend) -> None:
    caching = bytearray(lu.pages[0x08])
    caching[2] &= ~0x04  # WCE off: every write goes through
    cdb, plist = mode_select6(bytes(caching))
    assert run(lu, cdb, plist).status == GOOD and not lu.write_cache
    assert run(lu, rw10(0x2A, 0, 1), bytes(BS)).status == GOOD and mem.writes[-1][2]
    # B sees MODE PARAMETERS CHANGED once, A (who changed it) does not
    assert sense_of(run(lu, bytes(6), nexus=B)) == (6, 0x2A, 0x01)
    assert run(lu, bytes(6), nexus=B).status == GOOD
    control = bytearray(lu.pages[0x0A])
    control[4] |= 0x08  # SWP
    cdb, plist = mode_select6(bytes(control))
    assert run(lu, cdb, plist).status == GOOD
    assert bytes(run(lu, bytes((0x1A, 0, 0x3F, 0, 255))).data)[2] & 0x80  # WP
    assert sense_of(run(lu, rw10(0x2A, 0, 1), bytes(BS))) == (7, 0x27, 0x02)
    control[4] &= ~0x08
    cdb, plist = mode_select6(bytes(control))
    assert run(lu, cdb, plist).status == GOOD
    assert run(lu, rw10(0x2A, 0, 1), bytes(BS)).status == GOOD


def test_mode_select_refuses_what_cannot_change(lu: LogicalUnit) -> None:
    control = bytearray(lu.pages[0x0A])
    control[2] |= 0x04  # D_SENSE is not changeable
    cdb, plist = mode_select6(bytes(control))
    assert sense_of(run(lu, cdb, plist)) == (5, 0x26, 0)
    cdb, plist = mode_select6(bytes((0x1C, 0x0A)) + bytes(10))  # a page we do not have
    assert sense_of(run(lu, cdb, plist)) == (5, 0x26, 0)
    cdb, plist = mode_select6(bytes(lu.pages[0x08][:6]))  # truncated page
    assert run(lu, cdb, plist).status == CHECK_CONDITION
    assert sense_of(run(lu, bytes((0x15, 0x11, 0, 0, 4, 0)), bytes(4))) == (5, 0x24, 0)  # SP
    bd = bytes((0, 0, 0, 8)) + bytes(5) + (4096).to_bytes(3, "big")  # wrong block length
    assert sense_of(run(lu, bytes((0x15, 0x10, 0, 0, len(bd), 0)), bd)) == (5, 0x26, 0)
    assert run(lu, bytes((0x15, 0x10, 0, 0, 0, 0))).status == GOOD


# --------------------------------------------------------------------------- RESERVE / UA / reset


def test_reserve_release_between_two_nexuses(lu: LogicalUnit) -> None:
    assert run(lu, bytes(6).replace(b"\0", b"\x16", 1)).status == GOOD
    assert run(lu, bytes((0x16, 0, 0, 0, 0, 0))).status == GOOD  # again: fine
    assert run(lu, bytes((0x16, 0, 0, 0, 0, 0)), nexus=B).status == RESERVATION_CONFLICT
    assert run(lu, bytes((0x1A, 0, 0x3F, 0, 255)), nexus=B).status == RESERVATION_CONFLICT
    assert run(lu, bytes((0x12, 0, 0, 0, 96, 0)), nexus=B).status == GOOD  # INQUIRY passes
    assert run(lu, bytes((0x17, 0, 0, 0, 0, 0)), nexus=B).status == GOOD  # not holder: no-op
    assert run(lu, rw10(0x28, 0, 1), nexus=B).status == RESERVATION_CONFLICT
    lu.detach(A)  # I_T nexus loss releases it
    assert run(lu, bytes((0x16, 0, 0, 0, 0, 0)), nexus=B).status == GOOD
    assert run(lu, bytes((0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0)), nexus=B).status == GOOD
    assert sense_of(run(lu, bytes((0x56, 0x10, 0, 0, 0, 0, 0, 0, 0, 0)), nexus=B)) \
        == (5, 0x24, 0)  # third-party


def test_lun_reset_unit_attention_for_everyone(lu: LogicalUnit) -> None:
    assert run(lu, bytes((0x16, 0, 0, 0, 0, 0))).status == GOOD
    lu.reset()
    for n in (A, B):
        # INQUIRY and REPORT LUNS do not see it; REQUEST SENSE reports and clears it
        assert run(lu, bytes((0x12, 0, 0, 0, 96, 0)), nexus=n).status == GOOD
    assert sense_of(run(lu, bytes(6), nexus=A)) == (6, 0x29, 0x03)
    assert run(lu, bytes(6), nexus=A).status == GOOD
    d = bytes(run(lu, bytes((0x03, 0, 0, 0, 18, 0)), nexus=B).data)
    assert d[2] == 6 and d[12] == 0x29 and d[13] == 0x03
    assert run(lu, bytes(6), nexus=B).status == GOOD
    assert run(lu, bytes((0x16, 0, 0, 0, 0, 0)), nexus=B).status == GOOD  # reservation gone


def test_unit_attention_queue_is_bounded_and_deduplicated(lu: LogicalUnit) -> None:
    for i in range(40):
        lu.establish_ua(0x2A, i)
        lu.establish_ua(0x2A, i)
    assert len(lu.pending_ua(A)) == scsi.UA_QUEUE_MAX
    assert lu.pending_ua(A)[-1] == (0x2A, 39)


# --------------------------------------------------------------------------- EXTENDED COPY


def ident_target(naa: bytes, block: int = BS, nul: bool = False, lu_id_type: int = 0,
                 dtype: int = 0xE4) -> bytes:
    d = bytearray(32)
    d[0] = dtype
    d[1] = (lu_id_type << 6) | (0x20 if nul else 0)
    d[4], d[5], d[7] = 0x01, 0x03, len(naa)
    d[8:8 + len(naa)] = naa
    d[29:32] = block.to_bytes(3, "big")
    return bytes(d)


def b2b(src: int, dst: int, n: int, src_lba: int, dst_lba: int) -> bytes:
    return struct.pack(">BBHHHxxHQQ", 0x02, 0, 0x18, src, dst, n, src_lba, dst_lba)


def xcopy(targets: list[bytes], segments: list[bytes], list_id: int = 1,
          usage: int = 0) -> tuple[bytes, bytes]:
    t, sg = b"".join(targets), b"".join(segments)
    hdr = struct.pack(">BBHIII", list_id, usage << 3, len(t), 0, len(sg), 0)
    plist = hdr + t + sg
    return struct.pack(">B9xIBB", 0x83, len(plist), 0, 0), plist


def rcr(sa: int, list_id: int = 1) -> bytes:
    return struct.pack(">BBB7xIBB", 0x84, sa, list_id, 1024, 0, 0)


def test_extended_copy_and_copy_status(lu: LogicalUnit, mem: MemBackend) -> None:
    mem.buf[0:64 * BS] = b"C" * (64 * BS)
    assert sense_of(run(lu, rcr(0, 1))) == (5, 0x24, 0)  # nothing held yet
    cdb, plist = xcopy([ident_target(mem.naa_id)], [b2b(0, 0, 64, 0, 1000)])
    assert run(lu, cdb, plist).status == GOOD
    assert mem.buf[1000 * BS:1064 * BS] == b"C" * (64 * BS)
    st = bytes(run(lu, rcr(0, 1)).data)
    assert st[4] == 0x01 and int.from_bytes(st[5:7], "big") == 1
    assert run(lu, rcr(0, 1), nexus=B).status == CHECK_CONDITION  # held per I_T nexus
    op = bytes(run(lu, rcr(3)).data)
    assert int.from_bytes(op[8:10], "big") == XCOPY_MAX_TARGETS and op[43] == 2
    # overlapping copy within one LU comes out right
    mem.buf[0:16 * BS] = b"".join(bytes([i]) * BS for i in range(16))
    cdb, plist = xcopy([ident_target(mem.naa_id)], [b2b(0, 0, 12, 0, 4)], usage=3)
    assert run(lu, cdb, plist).status == GOOD
    assert mem.buf[4 * BS:16 * BS] == b"".join(bytes([i]) * BS for i in range(12))


def test_extended_copy_errors(lu: LogicalUnit, mem: MemBackend) -> None:
    t = ident_target(mem.naa_id)
    seg = b2b(0, 0, 8, 0, 100)
    cases: list[tuple[list[bytes], list[bytes], tuple[int, int, int]]] = [
        ([t] * 5, [seg], (5, 0x26, 0x06)),
        ([t], [seg] * 9, (5, 0x26, 0x08)),
        ([ident_target(mem.naa_id, dtype=0xE0)], [seg], (5, 0x26, 0x07)),
        ([t], [bytes((0x03, 0, 0, 0x10)) + bytes(16)], (5, 0x26, 0x09)),
        ([t], [b2b(0, 1, 8, 0, 100)], (0xA, 0x08, 0x04)),
        ([t], [b2b(0, 0, 8, 0, BLOCKS - 1)], (0xA, 0x00, 0x00)),
        ([ident_target(mem.naa_id, lu_id_type=3)], [seg], (5, 0x26, 0)),
        ([ident_target(mem.naa_id, nul=True)], [seg], (0xA, 0x0D, 0x02)),
        ([ident_target(b"\x60" + bytes(15))], [seg], (0xA, 0x08, 0x04)),
        ([ident_target(mem.naa_id, block=4096)], [seg], (5, 0x26, 0)),
    ]
    for targets, segs, want in cases:
        cdb, plist = xcopy(targets, segs)
        assert sense_of(run(lu, cdb, plist)) == want, want
    cdb, plist = xcopy([t], [seg])
    assert sense_of(run(lu, cdb[:10] + (len(plist) - 1).to_bytes(4, "big") + cdb[14:],
                        plist[:-1])) == (5, 0x1A, 0)
    assert run(lu, struct.pack(">B15x", 0x83)).status == GOOD  # empty parameter list
    assert bytes(run(lu, rcr(0, 1)).data)[4] == 0x02  # the last held copy failed


# --------------------------------------------------------------------------- range locks


def test_range_lock_orders_overlapping_exclusive_work() -> None:
    async def go() -> list[str]:
        lock = RangeLock()
        log: list[str] = []
        t1 = await lock.acquire(0, 10)  # shared
        t2 = await lock.acquire(5, 8)  # shared overlaps shared: fine
        waiter = asyncio.ensure_future(lock.acquire(0, 4, True))
        await asyncio.sleep(0)
        assert not waiter.done()
        late = asyncio.ensure_future(lock.acquire(2, 3))  # shared, queued behind it
        elsewhere = await lock.acquire(20, 30, True)  # disjoint: no wait
        await asyncio.sleep(0)
        assert not late.done()
        lock.release(t2)
        lock.release(t1)
        tok = await waiter
        log.append("exclusive")
        await asyncio.sleep(0)
        assert not late.done()
        lock.release(tok)
        lock.release(await late)
        log.append("shared")
        lock.release(elsewhere)
        assert lock.held == 0
        cancelled = asyncio.ensure_future(lock.acquire(0, 1, True))
        blocker = await lock.acquire(0, 1)
        cancelled.cancel()
        lock.release(blocker)
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        return log
    assert asyncio.run(go()) == ["exclusive", "shared"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(1, 6), st.booleans()), max_size=25))
def test_range_lock_never_grants_conflicts(reqs: list[tuple[int, int, bool]]) -> None:
    async def go() -> None:
        lock = RangeLock()
        active: dict[int, tuple[int, int, bool]] = {}

        async def worker(i: int, s: int, n: int, x: bool) -> None:
            tok = await lock.acquire(s, s + n, x)
            for j, (s2, e2, x2) in active.items():
                assert not (s < e2 and s2 < s + n and (x or x2)), (i, j)
            active[i] = (s, s + n, x)
            await asyncio.sleep(0)
            del active[i]
            lock.release(tok)
        await asyncio.gather(*(worker(i, *r) for i, r in enumerate(reqs)))
        assert lock.held == 0
    asyncio.run(go())


# --------------------------------------------------------------------------- fuzz


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=16, max_size=16), st.binary(max_size=2048))
def test_random_cdbs_always_get_an_answer(cdb: bytes, data: bytes) -> None:
    """Any CDB with any Data-Out ends in a SCSI status with well-formed sense;
    nothing escapes and no range check overflows (SPC-4 §4.5)."""
    mem = MemBackend(blocks=64)
    lu = LogicalUnit(mem, atomic_write_max_bytes=4096)
    lu.attach(A)
    r = asyncio.run(lu.execute(cdb, data, (0,), A))
    assert r.status in (GOOD, CHECK_CONDITION, RESERVATION_CONFLICT)
    if r.status == CHECK_CONDITION:
        assert len(r.sense) == 18 and r.sense[0] & 0x7F == 0x70
    assert len(mem.buf) == 64 * BS


def test_emulated_unmap_writes_only_what_is_not_zero(lu: LogicalUnit, mem: MemBackend) -> None:
    """A discard over blocks that already read as zeros (a fresh LUN: mkfs
    discards it all) adds nothing to the backend's writes."""
    mem.buf[3 * BS:5 * BS] = b"x" * (2 * BS)
    mem.writes.clear()
    plist = unmap_list((0, 64))
    assert run(lu, unmap_cdb(len(plist)), plist).status == GOOD
    assert mem.writes == [(3 * BS, 2 * BS, False)]
    assert mem.buf[:64 * BS] == bytes(64 * BS)
    mem.writes.clear()
    assert run(lu, ws(0x93, 0, 64, 0x08), bytes(BS)).status == GOOD  # WRITE SAME + UNMAP
    assert mem.writes == []
