"""Block commands (SBC-3, SBC-4): READ, WRITE, WRITE AND VERIFY, VERIFY,
ORWRITE, COMPARE AND WRITE, WRITE ATOMIC, WRITE SAME, UNMAP, GET LBA STATUS,
SYNCHRONIZE CACHE, PRE-FETCH and the unit-state commands of a non-removable
disk (LIO's ``target_core_sbc.c``, tgt's ``sbc.c``).

Each handler takes the LU first and is one row's callable in
``edge.scsi.commands``.  Writes that must be atomic with respect to other
writes (COMPARE AND WRITE, ORWRITE, WRITE SAME, UNMAP, WRITE ATOMIC) hold an
exclusive :class:`edge.aio.RangeLock` on their range (SBC-3 §5.3, SBC-4
§4.29); plain writes a shared one.

Backends need only ``read``/``write``/``flush``.  ``unmap`` and
``lba_status`` (:class:`edge.backends.ThinBackend`, ``LbaStatusBackend``) are used when present
and emulated otherwise: zeros are written, which is what LBPRZ=1 promises,
and a block reads as deallocated when it is all zeros.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Coroutine
from typing import Any

import numpy as np

from edge.aio import finish, to_the_end
from edge.scsi.cdb import Op, allocation, check_range, data_out, parse_rw, u16, u32, u64
from edge.scsi.sense import (
    GOOD,
    RESULT_GOOD,
    Buffer,
    ScsiError,
    ScsiResult,
    SenseKey,
    invalid_field,
    invalid_param,
    lba_out_of_range,
    param_list_length_error,
    short_data_out,
)
from edge.scsi.unit import ItNexus, Unit

IO_CHUNK_BYTES = 1 << 20
"""WRITE SAME, UNMAP emulation, SANITIZE and EXTENDED COPY move data in pieces
this big."""

GET_LBA_STATUS_SCAN_BYTES = 256 << 10
"""How far one GET LBA STATUS looks before it answers (the initiator asks
again from where the last descriptor ends)."""

GET_LBA_STATUS_NATIVE_SCAN_BYTES = 1 << 30
"""The same for backends with a native ``lba_status`` (SEEK_DATA/SEEK_HOLE
costs per extent, not per byte): far enough that a freshly sanitized or
unmapped LUN is described in one answer, as libiscsi's SANITIZE BLOCK ERASE
test requires."""

# ----------------------------------------------------------------------------- helpers


def transfer(lu: Unit, cdb: bytes) -> tuple[int, int]:
    """(LBA, blocks) of a READ/WRITE-style CDB, checked against the medium
    and the Block Limits page."""
    lba, blocks = parse_rw(cdb)
    if cdb[0] not in (Op.READ_6, Op.WRITE_6) and cdb[1] & 0xE0:
        raise invalid_field(1)  # RD/WR/VR/ORPROTECT: no protection information
    check_range(lba, blocks, lu.blocks)
    if blocks > lu.max_transfer_blocks:
        raise invalid_field(7 if cdb[0] < 0x60 else 6 if cdb[0] >= 0xA0 else 10)
    return lba, blocks


def check_writable(lu: Unit, transfer_length: int | None = None) -> None:
    """DATA PROTECT (SBC-3 §4.11): 27/00 read-only LU, 27/02 SWP set."""
    if lu.read_only:
        raise ScsiError(SenseKey.DATA_PROTECT, 0x27, 0x00, transfer_length=transfer_length)
    if lu.software_write_protect:
        raise ScsiError(SenseKey.DATA_PROTECT, 0x27, 0x02, transfer_length=transfer_length)


async def land(lu: Unit, io: Coroutine[Any, Any, Any]) -> Any:
    """Backend I/O that changes the medium under a range lock: carried
    :func:`~edge.aio.to_the_end` unless the backend declares ``cancel_safe``
    (its operations are done at once or not at all at every await, so a
    cancelled command leaves nothing to land later — the Edge's write either
    waits for reserve room with nothing done, or is appended)."""
    if lu.cancel_safe:
        return await io
    return await to_the_end(io)


async def locked_write(lu: Unit, lba: int, payload: bytes | memoryview, fua: bool, *,
                       exclusive: bool = False) -> None:
    end = lba + len(payload) // lu.block_size
    locks = lu.locks
    tok = locks.try_acquire(lba, end, exclusive)
    if tok is None:
        tok = await locks.acquire(lba, end, exclusive)
    try:
        await land(lu, lu.backend.write(lba * lu.block_size, payload, fua or not lu.write_cache))
    finally:
        locks.release(tok)


async def write_pattern(lu: Unit, lba: int, blocks: int, block: bytes) -> None:
    """Write ``block`` to ``blocks`` consecutive blocks in chunks (caller
    holds the range lock)."""
    bs = lu.block_size
    per = max(1, min(blocks, IO_CHUNK_BYTES // bs))
    chunk = block * per
    done = 0
    while done < blocks:
        n = min(per, blocks - done)
        await land(lu, lu.backend.write((lba + done) * bs, memoryview(chunk)[:n * bs],
                                        not lu.write_cache))
        done += n


async def deallocate(lu: Unit, lba: int, blocks: int) -> None:
    """Unmap (caller holds the range lock): natively, or by writing zeros,
    which keeps the LBPRZ promise on any backend.  The emulation reads
    first and writes zeros only over blocks that are not zero already,
    so a discard of a fresh LUN (mkfs does one) adds nothing to the
    Edge's write log or the replication stream."""
    if not blocks:
        return
    bs = lu.block_size
    if lu.thin_io is not None:
        await land(lu, lu.thin_io.unmap(lba * bs, blocks * bs))
        return
    per = max(1, IO_CHUNK_BYTES // bs)
    zeros = bytes(min(blocks, per) * bs)
    for off in range(0, blocks, per):
        n = min(per, blocks - off)
        raw = await lu.backend.read((lba + off) * bs, n * bs)
        used = np.asarray(np.frombuffer(memoryview(raw), dtype=np.uint8).reshape(
            n, bs).any(axis=1))
        for start, count, dirty in _runs(used):
            if dirty:
                await land(lu, lu.backend.write(
                    (lba + off + start) * bs, memoryview(zeros)[:count * bs], not lu.write_cache))


def _arrived_blocks(lu: Unit, cdb: bytes, data: Buffer
                    ) -> tuple[int, int, int, bytes | memoryview]:
    """(lba, blocks to write, bytes the CDB asked for, payload).

    When the initiator sends fewer bytes than the CDB asks for (iSCSI
    EDTL < transfer length), FCP-4 §9.4.2 lets us either write only what
    arrived or refuse: we write the whole blocks that arrived and report
    the overflow (what libiscsi 1.19's residual tests require), and refuse
    with 5/0E/03 when a block would be partial."""
    lba, blocks = transfer(lu, cdb)
    bs = lu.block_size
    needed = blocks * bs
    if len(data) < needed:
        if len(data) % bs:
            raise short_data_out(needed)
        blocks = len(data) // bs
    n = blocks * bs
    payload = data if isinstance(data, bytes | memoryview) and len(data) == n \
        else memoryview(data)[:n]
    return lba, blocks, needed, payload


def _first_difference(a: Buffer, b: Buffer) -> int:
    x = np.frombuffer(memoryview(a), dtype=np.uint8)
    y = np.frombuffer(memoryview(b), dtype=np.uint8)
    n = min(len(x), len(y))
    diff = np.flatnonzero(x[:n] != y[:n])
    return int(diff[0]) if len(diff) else n


def _runs(flags: np.ndarray) -> list[tuple[int, int, bool]]:
    """(start, length, value) runs of a boolean array."""
    n = len(flags)
    if not n:
        return []
    edges = np.flatnonzero(np.diff(flags.astype(np.int8))) + 1
    out = []
    start = 0
    for e in [*edges.tolist(), n]:
        out.append((start, e - start, bool(flags[start])))
        start = e
    return out


def _merge(extents: list[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
    out: list[tuple[int, int, bool]] = []
    for s, n, m in extents:
        if out and out[-1][2] == m and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + n, m)
        else:
            out.append((s, n, m))
    return out


# ----------------------------------------------------------------------------- reads and writes


async def read(lu: Unit, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
    """READ(6/10/12/16), SBC-3 §5.8-§5.11."""
    lba, blocks = transfer(lu, cdb)
    if not blocks:
        return RESULT_GOOD
    bs = lu.block_size
    return ScsiResult(GOOD, await lu.backend.read(lba * bs, blocks * bs))


async def write(lu: Unit, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
    """WRITE(6/10/12/16), SBC-3 §5.32-§5.35; FUA makes it durable first."""
    lba, blocks, needed, payload = _arrived_blocks(lu, cdb, data)
    if lu.read_only or lu.software_write_protect:
        check_writable(lu, needed)
    if blocks:
        # The hot path: the shared range lock inline (no extra coroutine).
        fua = (cdb[0] != Op.WRITE_6 and bool(cdb[1] & 0x08)) or not lu.write_cache
        locks = lu.locks
        tok = locks.try_acquire(lba, lba + blocks)
        if tok is None:
            tok = await locks.acquire(lba, lba + blocks)
        try:
            io = lu.backend.write(lba * lu.block_size, payload, fua)
            if lu.cancel_safe:
                await io
            else:
                # to_the_end inline: a write that never waits costs no more.
                try:
                    yielded = io.send(None)
                except StopIteration:
                    pass
                else:
                    await finish(io, yielded)
        finally:
            locks.release(tok)
    return ScsiResult(GOOD, transfer_length=needed)


async def write_verify(lu: Unit, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
    """WRITE AND VERIFY(10/12/16), SBC-3 §5.37-§5.39: write, then with
    BYTCHK=1 read back and compare (MISCOMPARE E/1D/00 on a difference);
    with BYTCHK=0 the medium check is the read itself."""
    bytchk = (cdb[1] >> 1) & 3
    if bytchk > 1:
        raise invalid_field(1)
    lba, blocks, needed, payload = _arrived_blocks(lu, cdb, data)
    check_writable(lu, needed)
    if blocks:
        bs = lu.block_size
        async with lu.locks.exclusive(lba, lba + blocks):
            await land(lu, lu.backend.write(lba * bs, payload, True))
            back = await lu.backend.read(lba * bs, blocks * bs)
        if bytchk and bytes(back) != bytes(payload):
            off = _first_difference(back, payload)
            raise ScsiError(SenseKey.MISCOMPARE, 0x1D, 0x00, information=off,
                            transfer_length=needed)
    return ScsiResult(GOOD, transfer_length=needed)


async def verify(lu: Unit, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
    """VERIFY(10/12/16), SBC-3 §5.33: BYTCHK=0 checks the medium only
    (always fine here); 01b compares the Data-Out with the medium, 11b
    compares one block against every block; a mismatch is MISCOMPARE
    E/1D/00 with INFORMATION = offset of the first differing byte."""
    lba, blocks = transfer(lu, cdb)
    bytchk = (cdb[1] >> 1) & 3
    if bytchk == 0:
        return ScsiResult(GOOD, transfer_length=0)
    if bytchk == 2:
        raise invalid_field(1)
    bs = lu.block_size
    needed = blocks * bs if bytchk == 1 else (bs if blocks else 0)
    expect = data_out(data, needed)
    if not blocks:
        return ScsiResult(GOOD, transfer_length=needed)
    medium = memoryview(await lu.backend.read(lba * bs, blocks * bs))
    exp = memoryview(expect)
    for i in range(blocks):
        got = medium[i * bs:(i + 1) * bs]
        want = exp[i * bs:(i + 1) * bs] if bytchk == 1 else exp[:bs]
        if got != want:
            raise ScsiError(SenseKey.MISCOMPARE, 0x1D, 0x00,
                            information=i * bs + _first_difference(got, want),
                            transfer_length=needed)
    return ScsiResult(GOOD, transfer_length=needed)


async def orwrite(lu: Unit, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
    """ORWRITE(16), SBC-3 §5.10: medium := medium OR data, atomically."""
    lba, blocks, needed, payload = _arrived_blocks(lu, cdb, data)
    check_writable(lu, needed)
    if blocks:
        bs = lu.block_size
        async with lu.locks.exclusive(lba, lba + blocks):
            old = await lu.backend.read(lba * bs, blocks * bs)
            new = np.bitwise_or(np.frombuffer(memoryview(old), dtype=np.uint8),
                                np.frombuffer(memoryview(payload), dtype=np.uint8))
            await land(lu, lu.backend.write(
                lba * bs, new.tobytes(), bool(cdb[1] & 0x08) or not lu.write_cache))
    return ScsiResult(GOOD, transfer_length=needed)


async def compare_and_write(lu: Unit, cdb: bytes, data: Buffer,
                            nexus: ItNexus) -> ScsiResult:
    """COMPARE AND WRITE, SBC-3 §5.2: the Data-Out is n blocks to compare
    then n blocks to write; the compare and the write are atomic with
    respect to every other write (ESXi's ATS relies on it).  A mismatch
    is MISCOMPARE E/1D/00, INFORMATION = offset of the first difference,
    and nothing is written."""
    if cdb[1] & 0xE0:
        raise invalid_field(1)
    lba = u64(cdb, 2)
    n = cdb[13]
    bs = lu.block_size
    if n > lu.limits.max_compare_and_write:
        raise invalid_field(13)
    check_range(lba, n, lu.blocks)
    if len(data) != 2 * n * bs:
        raise ScsiError(SenseKey.ILLEGAL_REQUEST, 0x24, 0x00, field_pointer=13,
                        transfer_length=2 * n * bs)
    check_writable(lu, 2 * n * bs)
    if not n:
        return ScsiResult(GOOD, transfer_length=0)
    mv = memoryview(data)
    async with lu.locks.exclusive(lba, lba + n):
        medium = await lu.backend.read(lba * bs, n * bs)
        if bytes(medium) != bytes(mv[:n * bs]):
            raise ScsiError(SenseKey.MISCOMPARE, 0x1D, 0x00,
                            information=_first_difference(medium, mv[:n * bs]))
        await land(lu, lu.backend.write(
            lba * bs, mv[n * bs:], bool(cdb[1] & 0x08) or not lu.write_cache))
    return ScsiResult(GOOD, transfer_length=2 * n * bs)


async def write_atomic(lu: Unit, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
    """WRITE ATOMIC(16), SBC-4 §5.48: all or nothing, also across a crash,
    up to MAXIMUM ATOMIC TRANSFER LENGTH (the backend's atomic unit); no
    ATOMIC BOUNDARY support."""
    if u16(cdb, 10):
        raise invalid_field(10)  # ATOMIC BOUNDARY
    lba, blocks = parse_rw(cdb)
    if cdb[1] & 0xE0:
        raise invalid_field(1)
    check_range(lba, blocks, lu.blocks)
    if blocks > lu.max_atomic_blocks:
        raise invalid_field(12)
    needed = blocks * lu.block_size
    payload = data_out(data, needed)
    check_writable(lu, needed)
    if blocks:
        await locked_write(lu, lba, memoryview(payload), bool(cdb[1] & 0x08), exclusive=True)
    return ScsiResult(GOOD, transfer_length=needed)


async def write_same(lu: Unit, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
    """WRITE SAME(10/16), SBC-3 §5.41-§5.42: one block repeated; NUMBER OF
    LOGICAL BLOCKS 0 means "to the end" (WSNZ=0); with UNMAP the range is
    deallocated whatever the block holds (SBC-3 §4.7.3.4.3; it then reads
    as zeros, LBPRZ);
    NDOB (16 only) means a zero block without Data-Out; ANCHOR is not
    supported (ANC_SUP=0)."""
    flags = cdb[1]
    sixteen = cdb[0] == Op.WRITE_SAME_16
    if flags & 0xE0 or flags & 0x10 or (not sixteen and flags & 0x01):
        raise invalid_field(1)  # WRPROTECT, ANCHOR, bit 0 of (10)
    lba, blocks = parse_rw(cdb)
    unmap_ = bool(flags & 0x08)
    ndob = sixteen and bool(flags & 0x01)
    if unmap_ and not lu.thin:
        raise invalid_field(1)
    if blocks == 0:
        if lba > lu.blocks:
            raise lba_out_of_range()
        blocks = lu.blocks - lba
    check_range(lba, blocks, lu.blocks)
    if blocks > lu.limits.max_write_same:
        raise invalid_field(10 if sixteen else 7)
    bs = lu.block_size
    if ndob:
        if data:
            raise ScsiError(SenseKey.ILLEGAL_REQUEST, 0x24, 0x00, field_pointer=1)
        block = bytes(bs)
    else:
        if len(data) != bs:
            if len(data) < bs:
                raise short_data_out(bs)
            raise invalid_field(10 if sixteen else 7)
        block = bytes(data)
    check_writable(lu, len(data))
    if blocks:
        async with lu.locks.exclusive(lba, lba + blocks):
            if unmap_:
                await deallocate(lu, lba, blocks)
            else:
                await write_pattern(lu, lba, blocks, block)
    return ScsiResult(GOOD, transfer_length=len(data))


async def unmap(lu: Unit, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
    """UNMAP, SBC-3 §5.28: a list of (LBA, count) descriptors, checked in
    full before anything is deallocated."""
    if cdb[1] & 0x01:
        raise invalid_field(1)  # ANCHOR, ANC_SUP=0
    plen = u16(cdb, 7)
    if plen == 0:
        return RESULT_GOOD
    if plen < 8:
        raise param_list_length_error()
    d = data_out(data, plen)
    bdl = u16(d, 2)
    count = min(bdl, plen - 8) // 16
    if count > lu.limits.max_unmap_descriptors:
        raise invalid_param(2)
    ranges = []
    total = 0
    for i in range(count):
        off = 8 + 16 * i
        lba, n = u64(d, off), u32(d, off + 8)
        check_range(lba, n, lu.blocks)
        total += n
        if total > lu.limits.max_unmap:
            raise invalid_param(off + 8)
        if n:
            ranges.append((lba, n))
    check_writable(lu, plen)
    for lba, n in ranges:
        async with lu.locks.exclusive(lba, lba + n):
            await deallocate(lu, lba, n)
    return ScsiResult(GOOD, transfer_length=plen)


async def get_lba_status(lu: Unit, cdb: bytes, data: Buffer,
                         nexus: ItNexus) -> ScsiResult:
    """GET LBA STATUS, SBC-3 §5.8: descriptors from the starting LBA on,
    mapped (0) or deallocated (1); backends without ``lba_status`` are
    read and an all-zero block counts as deallocated (LBPRZ=1)."""
    lba = u64(cdb, 2)
    alloc = u32(cdb, 10)
    if lba >= lu.blocks:
        raise lba_out_of_range()
    bs = lu.block_size
    scan = GET_LBA_STATUS_NATIVE_SCAN_BYTES if lu.lba_io is not None \
        else GET_LBA_STATUS_SCAN_BYTES
    span = min(lu.blocks - lba, max(1, scan // bs))
    extents = await _lba_extents(lu, lba, span)
    room = max(1, (alloc - 8) // 16) if alloc >= 24 else 1
    desc = b"".join(struct.pack(">QIB3x", s, n, 0 if mapped else 1)
                    for s, n, mapped in extents[:room])
    out = (len(desc) + 4).to_bytes(4, "big") + bytes(4) + desc
    return ScsiResult(GOOD, allocation(out, alloc))


async def _lba_extents(lu: Unit, lba: int, blocks: int) -> list[tuple[int, int, bool]]:
    bs = lu.block_size
    if lu.lba_io is not None:
        got = await lu.lba_io.lba_status(lba * bs, blocks * bs)
        return _merge([(o // bs, max(1, n // bs), m) for o, n, m in got])
    raw = await lu.backend.read(lba * bs, blocks * bs)
    used = np.asarray(np.frombuffer(memoryview(raw), dtype=np.uint8).reshape(
        blocks, bs).any(axis=1))
    return [(lba + s, n, m) for s, n, m in _runs(used)]


async def sync_cache(lu: Unit, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
    """SYNCHRONIZE CACHE(10/16), SBC-3 §5.22-§5.23 (IMMED treated as 0)."""
    lba, blocks = parse_rw(cdb)
    check_range(lba, blocks, lu.blocks)
    await lu.backend.flush()
    return RESULT_GOOD


async def prefetch(lu: Unit, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
    """PRE-FETCH(10/16), SBC-3 §5.11-§5.12: advisory, so GOOD (not
    CONDITION MET: we promise nothing about the cache) even when the
    read-ahead fails; IMMED returns before reading.  The read-ahead is a
    read: it fills the Edge's cache like any other."""
    lba, blocks = parse_rw(cdb)
    check_range(lba, blocks, lu.blocks)
    if blocks > lu.limits.max_prefetch:
        raise invalid_field(7 if cdb[0] < 0x60 else 10)
    if blocks and not cdb[1] & 0x02:
        bs = lu.block_size
        with contextlib.suppress(Exception):
            await lu.backend.read(lba * bs, blocks * bs)
    return RESULT_GOOD


# ----------------------------------------------------------------------------- unit state


async def start_stop(lu: Unit, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
    """START STOP UNIT, SBC-3 §5.25: the medium is not removable and never
    spins down, so it only checks fields and, when stopping without
    NO_FLUSH, flushes the write cache."""
    pc = cdb[4] >> 4
    if pc not in (0x0, 0x1, 0x2, 0x3, 0x7, 0xA, 0xB):
        raise invalid_field(4)
    if pc == 0 and not cdb[4] & 0x01 and not cdb[4] & 0x04:
        await lu.backend.flush()
    return RESULT_GOOD


async def prevent_allow(lu: Unit, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
    """PREVENT ALLOW MEDIUM REMOVAL, SBC-3 §5.13: nothing to lock on a
    non-removable medium."""
    if cdb[4] & 0x03 > 1:
        raise invalid_field(4)
    return RESULT_GOOD


async def read_defect_data(lu: Unit, cdb: bytes, data: Buffer,
                           nexus: ItNexus) -> ScsiResult:
    """READ DEFECT DATA(10/12), SBC-3 §5.17-§5.18: empty lists."""
    twelve = cdb[0] == Op.READ_DEFECT_DATA_12
    flags = (cdb[1] if twelve else cdb[2]) & 0x1F
    alloc = u32(cdb, 6) if twelve else u16(cdb, 7)
    hdr = bytes((0, flags)) + bytes(6 if twelve else 2)
    return ScsiResult(GOOD, allocation(hdr, alloc))
