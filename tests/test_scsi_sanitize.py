"""SANITIZE (SBC-3 §5.30): CDB and parameter-list checks, the three erase
kinds, what REPORT SUPPORTED OPERATION CODES and the Block Device
Characteristics VPD page advertise, and NOT READY / SANITIZE IN PROGRESS
while an IMMED sanitize runs."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from edge import scsi
from edge.backends import FileBackend
from edge.scsi import GOOD, LogicalUnit, ScsiResult
from tests.test_scsi import BS, MemBackend, sense_of
from tests.test_scsi_commands import A, B, run

OVERWRITE, BLOCK_ERASE, CRYPTO_ERASE, EXIT_FAILURE = 0x01, 0x02, 0x03, 0x1F


def san(sa: int, plen: int = 0, *, immed: bool = False, ause: bool = False) -> bytes:
    return struct.pack(">BB5xHB", 0x48, sa | (0x80 if immed else 0) | (0x20 if ause else 0),
                       plen, 0)


def plist(pattern: bytes, count: int = 1, invert: bool = False, ipl: int | None = None
          ) -> bytes:
    n = len(pattern) if ipl is None else ipl
    return bytes(((0x80 if invert else 0) | count, 0)) + n.to_bytes(2, "big") + pattern


@pytest.fixture
def mem() -> MemBackend:
    return MemBackend()


@pytest.fixture
def lu(mem: MemBackend) -> LogicalUnit:
    u = LogicalUnit(mem)
    u.attach(A)
    u.attach(B)
    return u


def test_overwrite_repeats_the_pattern(lu: LogicalUnit, mem: MemBackend) -> None:
    mem.buf[:] = b"a" * len(mem.buf)
    p = plist(b"\xaa" * BS)
    assert run(lu, san(OVERWRITE, len(p)), p).status == GOOD
    assert mem.buf == b"\xaa" * len(mem.buf)
    p = plist(b"1234")
    assert run(lu, san(OVERWRITE, len(p)), p).status == GOOD
    assert mem.buf == b"1234" * (len(mem.buf) // 4)
    p = plist(b"abc")  # a pattern that does not divide the block is cut at its end
    assert run(lu, san(OVERWRITE, len(p)), p).status == GOOD
    assert mem.buf[:BS] == (b"abc" * BS)[:BS] and mem.buf[BS:2 * BS] == mem.buf[:BS]
    assert mem.flushes >= 3


def test_overwrite_invert_alternates_passes(lu: LogicalUnit, mem: MemBackend) -> None:
    p = plist(b"\x0f", count=2, invert=True)
    assert run(lu, san(OVERWRITE, len(p)), p).status == GOOD
    assert mem.buf == b"\xf0" * len(mem.buf)  # pass 1: 0f, pass 2: inverted
    p = plist(b"\x0f", count=3, invert=True)
    assert run(lu, san(OVERWRITE, len(p)), p).status == GOOD
    assert mem.buf == b"\x0f" * len(mem.buf)


@pytest.mark.parametrize("sa", [BLOCK_ERASE, CRYPTO_ERASE])
def test_block_and_crypto_erase_deallocate(lu: LogicalUnit, mem: MemBackend, sa: int) -> None:
    mem.buf[:] = b"a" * len(mem.buf)
    assert run(lu, san(sa)).status == GOOD
    assert mem.buf == bytes(len(mem.buf))


def test_block_erase_on_a_file_reads_back_deallocated(tmp_path: Path) -> None:
    with FileBackend(tmp_path / "lun.img", 4 << 20) as fb:
        lu = LogicalUnit(fb)
        lu.attach(A)
        blocks = fb.size_bytes // BS
        assert run(lu, struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 8, 0), b"a" * 8 * BS).status == GOOD
        assert run(lu, san(BLOCK_ERASE)).status == GOOD
        gls = run(lu, struct.pack(">BBQIBB", 0x9E, 0x12, 0, 256, 0, 0))
        assert gls.status == GOOD
        # one deallocated descriptor for the whole LUN (libiscsi checks this)
        assert bytes(gls.data)[8:21] == struct.pack(">QIB", 0, blocks, 1)


def test_exit_failure_mode_is_a_no_op_when_nothing_failed(lu: LogicalUnit) -> None:
    assert run(lu, san(EXIT_FAILURE)).status == GOOD


@pytest.mark.parametrize(("cdb", "data", "sense"), [
    # parameter list length: 0 for the erases and EXIT FAILURE MODE ...
    (san(BLOCK_ERASE, 8), bytes(8), (5, 0x24, 0)),
    (san(CRYPTO_ERASE, 8), bytes(8), (5, 0x24, 0)),
    (san(EXIT_FAILURE, 8), bytes(8), (5, 0x24, 0)),
    # ... 5..block length + 4 for OVERWRITE
    *((san(OVERWRITE, n), plist(b"x")[:n], (5, 0x24, 0)) for n in range(5)),
    (san(OVERWRITE, BS + 5), plist(b"x" * (BS + 1)), (5, 0x24, 0)),
    # OVERWRITE COUNT 0, INITIALIZATION PATTERN LENGTH 0 or above the block
    (san(OVERWRITE, BS + 4), plist(b"x" * BS, count=0), (5, 0x24, 0)),
    (san(OVERWRITE, BS + 4), plist(b"x" * BS, ipl=0), (5, 0x24, 0)),
    (san(OVERWRITE, BS + 4), plist(b"x" * BS, ipl=BS + 4), (5, 0x24, 0)),
    # a pattern longer than the list that carries it
    (san(OVERWRITE, 8), plist(b"x" * 4, ipl=5), (5, 0x1A, 0)),
    # reserved parameter bits: TEST, byte 1
    (san(OVERWRITE, 8), bytes((0x21, 0, 0, 4)) + b"abcd", (5, 0x26, 0)),
    (san(OVERWRITE, 8), bytes((0x01, 1, 0, 4)) + b"abcd", (5, 0x26, 0)),
    # less Data-Out than the parameter list length
    (san(OVERWRITE, 8), plist(b"ab", ipl=4), (5, 0x0E, 0x03)),
    # unsupported service actions
    (san(0x00), b"", (5, 0x24, 0)),
    (san(0x04), b"", (5, 0x24, 0)),
    (san(0x1E), b"", (5, 0x24, 0)),
])
def test_sanitize_errors(lu: LogicalUnit, mem: MemBackend, cdb: bytes, data: bytes,
                         sense: tuple[int, int, int]) -> None:
    mem.buf[:] = b"a" * len(mem.buf)
    assert sense_of(run(lu, cdb, data)) == sense
    assert mem.buf == b"a" * len(mem.buf)


@pytest.mark.parametrize("byte", [2, 3, 4, 5, 6])
def test_reserved_cdb_bytes_and_bit(lu: LogicalUnit, byte: int) -> None:
    p = plist(b"\xaa" * BS)
    cdb = bytearray(san(OVERWRITE, len(p)))
    cdb[byte] = byte
    r = run(lu, bytes(cdb), p)
    assert sense_of(r) == (5, 0x24, 0) and r.sense[16:18] == byte.to_bytes(2, "big")
    cdb = bytearray(san(BLOCK_ERASE))
    cdb[1] |= 0x40
    assert sense_of(run(lu, bytes(cdb))) == (5, 0x24, 0)


def test_write_protect_and_reservation_conflict(lu: LogicalUnit, mem: MemBackend) -> None:
    ro = LogicalUnit(mem, read_only=True)
    ro.attach(A)
    p = plist(b"\xaa" * BS)
    assert sense_of(run(ro, san(OVERWRITE, len(p)), p)) == (7, 0x27, 0)
    assert sense_of(run(ro, san(BLOCK_ERASE))) == (7, 0x27, 0)
    assert run(lu, bytes((0x16, 0, 0, 0, 0, 0)), nexus=B).status == GOOD  # RESERVE(6)
    assert run(lu, san(CRYPTO_ERASE)).status == scsi.RESERVATION_CONFLICT


def test_advertised_in_rsoc_and_vpd(lu: LogicalUnit) -> None:
    for sa in (OVERWRITE, BLOCK_ERASE, CRYPTO_ERASE, EXIT_FAILURE):
        cdb = struct.pack(">BBBBHIBB", 0xA3, 0x0C, 3, 0x48, sa, 64, 0, 0)
        r = run(lu, cdb)
        assert bytes(r.data)[1] & 0x07 == 0x03, sa
        assert bytes(r.data)[4:6] == bytes((0x48, 0xA0 | sa))
    r = run(lu, struct.pack(">BBBHB", 0x12, 1, 0xB1, 64, 0))
    assert bytes(r.data)[7] & 0xF0 == 0x50  # WABEREQ = WACEREQ = 01b
    thick = LogicalUnit(MemBackend(), thin_provisioning=False)
    assert set(thick.commands[0x48]) == {OVERWRITE, EXIT_FAILURE}  # type: ignore[arg-type]
    r = run(thick, struct.pack(">BBBHB", 0x12, 1, 0xB1, 64, 0))
    assert bytes(r.data)[7] & 0xF0 == 0


class SlowBackend(MemBackend):
    """Writes wait for ``gate`` so a sanitize can be watched in progress."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        await self.gate.wait()
        await super().write(offset, data, fua)


def test_immed_sanitize_reports_progress_and_blocks_other_commands() -> None:
    async def go() -> None:
        mem = SlowBackend()
        lu = LogicalUnit(mem)
        lu.attach(A)

        async def ex(cdb: bytes, data: bytes = b"") -> ScsiResult:
            return await lu.execute(cdb, data, (0,), A)

        p = plist(b"\x55" * BS)
        assert (await ex(san(OVERWRITE, len(p), immed=True), p)).status == GOOD
        await asyncio.sleep(0)
        assert lu.sanitizing
        tur = await ex(bytes(6))
        assert sense_of(tur) == (2, 0x04, 0x1B) and tur.sense[15] == 0x80
        assert sense_of(await ex(struct.pack(">BBQIBB", 0x88, 0, 0, 1, 0, 0))) == (2, 4, 0x1B)
        assert sense_of(await ex(san(BLOCK_ERASE))) == (2, 4, 0x1B)
        assert (await ex(bytes((0x12, 0, 0, 0, 96, 0)))).status == GOOD  # INQUIRY
        rs = await ex(bytes((0x03, 0, 0, 0, 18, 0)))
        assert rs.status == GOOD and bytes(rs.data)[2] == 2 and bytes(rs.data)[12:14] == b"\x04\x1b"
        lu.reset()  # a LUN reset does not stop it
        mem.gate.set()
        while lu.sanitizing:
            await asyncio.sleep(0.001)
        assert mem.buf == b"\x55" * len(mem.buf)
        assert sense_of(await ex(bytes(6))) == (6, 0x29, 0x03)  # the reset's UA, now
        assert (await ex(bytes(6))).status == GOOD

    asyncio.run(go())


def test_aborting_the_waiter_leaves_the_sanitize_running() -> None:
    async def go() -> None:
        mem = SlowBackend()
        mem.buf[:] = b"a" * len(mem.buf)
        lu = LogicalUnit(mem)
        lu.attach(A)
        t = asyncio.create_task(lu.execute(san(BLOCK_ERASE), b"", (0,), A))
        await asyncio.sleep(0.01)
        assert lu.sanitizing
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert lu.sanitizing
        mem.gate.set()
        while lu.sanitizing:
            await asyncio.sleep(0.001)
        assert mem.buf == bytes(len(mem.buf))

    asyncio.run(go())


def test_a_failed_sanitize_leaves_failure_mode_until_exit(mem: MemBackend) -> None:
    lu = LogicalUnit(mem)
    lu.attach(A)
    mem.fail = OSError("disk gone")
    p = plist(b"\xaa" * BS)
    assert sense_of(run(lu, san(OVERWRITE, len(p)), p)) == (3, 0x31, 0x03)
    mem.fail = None
    assert sense_of(run(lu, struct.pack(">BBQIBB", 0x88, 0, 0, 1, 0, 0))) == (3, 0x31, 0x03)
    assert run(lu, bytes((0x12, 0, 0, 0, 96, 0))).status == GOOD
    assert run(lu, san(EXIT_FAILURE)).status == GOOD
    assert run(lu, bytes(6)).status == GOOD
