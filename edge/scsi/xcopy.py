"""EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-3 §6.3, §6.18): the
target copies blocks between LUs it serves, named by NAA designator (LIO's
``target_core_xcopy.c``).  Only identification-descriptor targets (0xE4) and
block-to-block segments (0x02), copied in 1 MiB pieces under an exclusive
lock on the destination range.
"""

from __future__ import annotations

from edge.backends import BackendNotReady
from edge.scsi.cdb import SA_COPY_OPERATING_PARAMETERS, allocation, data_out, u16, u32, u64
from edge.scsi.pr import Access
from edge.scsi.sbc import IO_CHUNK_BYTES, check_writable, land
from edge.scsi.sense import (
    GOOD,
    RESULT_GOOD,
    Buffer,
    ReservationConflict,
    ScsiError,
    ScsiResult,
    SenseKey,
    invalid_field,
    invalid_param,
    param_list_length_error,
)
from edge.scsi.unit import ItNexus, Unit

# Limits reported by RECEIVE COPY RESULTS OPERATING PARAMETERS (SPC-3 §6.18.4).
XCOPY_MAX_TARGETS = 4
XCOPY_MAX_SEGMENTS = 8
XCOPY_MAX_DESCRIPTOR_LIST = 1024
XCOPY_MAX_SEGMENT_BYTES = 16 << 20
XCOPY_TARGET_IDENT = 0xE4
XCOPY_SEGMENT_BLOCK_TO_BLOCK = 0x02
COPY_RESULTS_HELD_MAX = 16
"""Copy statuses kept per I_T nexus; the oldest go first."""


async def receive_copy_results(lu: Unit, cdb: bytes, data: Buffer,
                               nexus: ItNexus) -> ScsiResult:
    """RECEIVE COPY RESULTS, SPC-3 §6.18: COPY STATUS of a held list
    identifier of this I_T nexus, or OPERATING PARAMETERS."""
    sa = cdb[1] & 0x1F
    alloc = u32(cdb, 10)
    if sa == SA_COPY_OPERATING_PARAMETERS:
        p = bytearray(44)
        p[4] = 0x01  # SNLID
        p[8:10] = XCOPY_MAX_TARGETS.to_bytes(2, "big")
        p[10:12] = XCOPY_MAX_SEGMENTS.to_bytes(2, "big")
        p[12:16] = XCOPY_MAX_DESCRIPTOR_LIST.to_bytes(4, "big")
        p[16:20] = XCOPY_MAX_SEGMENT_BYTES.to_bytes(4, "big")
        p[34:36] = (1).to_bytes(2, "big")  # TOTAL CONCURRENT COPIES
        p[36] = 1  # MAXIMUM CONCURRENT COPIES
        p[37] = lu.block_size.bit_length() - 1  # DATA SEGMENT GRANULARITY (log2)
        p[43] = 2
        p += bytes((XCOPY_SEGMENT_BLOCK_TO_BLOCK, XCOPY_TARGET_IDENT))
        p[0:4] = (len(p) - 4).to_bytes(4, "big")
        return ScsiResult(GOOD, allocation(bytes(p), alloc))
    copies = lu.copy_results(nexus)
    status = copies.get(cdb[2]) if copies is not None else None
    if status is None:
        raise invalid_field(2)  # no such held list identifier
    return ScsiResult(GOOD, allocation(status, alloc))


async def extended_copy(lu: Unit, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
    """EXTENDED COPY (LID1), SPC-3 §6.3: identification-descriptor targets
    (0xE4) naming our LUs by NAA, block-to-block segments (0x02), copied
    by the target in 1 MiB pieces under an exclusive lock on the
    destination.  Errors while copying are COPY ABORTED (SPC-3 §6.3.3)."""
    plen = u32(cdb, 10)
    if plen == 0:
        return RESULT_GOOD
    if plen < 16:
        raise param_list_length_error()
    d = bytes(data_out(data, plen))
    list_id, usage = d[0], (d[1] >> 3) & 0x03
    tdl, sdl, inline = u16(d, 2), u32(d, 8), u32(d, 12)
    if tdl + sdl > XCOPY_MAX_DESCRIPTOR_LIST:
        raise param_list_length_error()
    if 16 + tdl + sdl + inline > plen:
        raise param_list_length_error()
    if inline:
        raise invalid_param(12)
    if tdl % 32:
        raise invalid_param(2)
    ntgt = tdl // 32
    if ntgt > XCOPY_MAX_TARGETS:
        raise invalid_param(2, ascq=0x06)  # TOO MANY TARGET DESCRIPTORS
    targets: list[Unit | None] = []
    for i in range(ntgt):
        targets.append(_copy_target(lu, d, 16 + 32 * i))
    segments: list[tuple[int, int, int, int, int]] = []
    pos = 16 + tdl
    end = pos + sdl
    while pos < end:
        if pos + 4 > end:
            raise param_list_length_error()
        dtype, dlen = d[pos], u16(d, pos + 2) + 4
        if len(segments) >= XCOPY_MAX_SEGMENTS:
            raise invalid_param(pos, ascq=0x08)  # TOO MANY SEGMENT DESCRIPTORS
        if dtype != XCOPY_SEGMENT_BLOCK_TO_BLOCK:
            raise invalid_param(pos, ascq=0x09)  # UNSUPPORTED SEGMENT DESCRIPTOR TYPE
        if dlen != 28:
            raise invalid_param(pos + 2)
        if pos + dlen > end:
            raise param_list_length_error()
        if d[pos + 1] & 0x02:
            raise invalid_param(pos + 1)  # DC=1: counts in destination blocks
        segments.append((u16(d, pos + 4), u16(d, pos + 6), u16(d, pos + 10),
                         u64(d, pos + 12), u64(d, pos + 20)))
        pos += dlen
    done = 0
    moved = 0
    try:
        for src_i, dst_i, nblocks, src_lba, dst_lba in segments:
            if src_i >= ntgt or dst_i >= ntgt:
                raise ScsiError(SenseKey.COPY_ABORTED, 0x08, 0x04)  # unreachable target
            src, dst = targets[src_i], targets[dst_i]
            if src is None or dst is None:
                raise ScsiError(SenseKey.COPY_ABORTED, 0x0D, 0x02)  # NUL target
            moved += await _copy_segment(lu, src, dst, nblocks, src_lba, dst_lba, nexus)
            done += 1
    except (ScsiError, ReservationConflict):
        _hold_copy(lu, nexus, list_id, usage, 0x02, done, moved)
        raise
    except BackendNotReady:
        _hold_copy(lu, nexus, list_id, usage, 0x02, done, moved)
        raise ScsiError(SenseKey.COPY_ABORTED, 0x0D, 0x02) from None
    _hold_copy(lu, nexus, list_id, usage, 0x01, done, moved)
    return ScsiResult(GOOD, transfer_length=plen)


def _copy_target(lu: Unit, d: bytes, pos: int) -> Unit | None:
    """Resolve one target descriptor; None for a NUL descriptor."""
    dtype = d[pos]
    if dtype != XCOPY_TARGET_IDENT:
        raise invalid_param(pos, ascq=0x07)  # UNSUPPORTED TARGET DESCRIPTOR TYPE
    lu_id_type = d[pos + 1] >> 6
    if lu_id_type > 1:
        raise invalid_param(pos + 1)  # reserved in SPC-3
    if d[pos + 1] & 0x1F:
        raise invalid_param(pos + 1)  # only direct-access block devices
    if d[pos + 1] & 0x20:
        return None  # NUL
    dlen = d[pos + 7]
    if dlen > 20:
        raise invalid_param(pos + 7)
    designator = bytes(d[pos + 8:pos + 8 + dlen])
    if int.from_bytes(d[pos + 29:pos + 32], "big") != lu.block_size:
        raise invalid_param(pos + 29)
    found = lu.copy_resolver(designator) if lu.copy_resolver is not None else (
        lu if designator == bytes(lu.backend.naa_id) else None)
    if found is None:
        raise ScsiError(SenseKey.COPY_ABORTED, 0x08, 0x04)  # UNREACHABLE COPY TARGET
    if found.block_size != lu.block_size:
        raise invalid_param(pos + 29)
    return found


async def _copy_segment(lu: Unit, src: Unit, dst: Unit, blocks: int,
                        src_lba: int, dst_lba: int, nexus: ItNexus) -> int:
    bs = lu.block_size
    if blocks * bs > XCOPY_MAX_SEGMENT_BYTES:
        raise invalid_param(10)
    if blocks > src.blocks or src_lba > src.blocks - blocks or blocks > dst.blocks \
            or dst_lba > dst.blocks - blocks:
        raise ScsiError(SenseKey.COPY_ABORTED, 0x00, 0x00)
    for x, access in ((src, Access.READ), (dst, Access.WRITE)):
        if x.conflicts(nexus, access):
            raise ReservationConflict()
    check_writable(dst)
    if not blocks:
        return 0
    per = max(1, IO_CHUNK_BYTES // bs)
    starts = list(range(0, blocks, per))
    if src is dst and src_lba < dst_lba < src_lba + blocks:
        starts.reverse()  # overlapping forward copy: go from the end
    async with dst.locks.exclusive(dst_lba, dst_lba + blocks):
        for off in starts:
            n = min(per, blocks - off)
            chunk = await src.backend.read((src_lba + off) * bs, n * bs)
            await land(dst, dst.backend.write((dst_lba + off) * bs, memoryview(chunk),
                                              not dst.write_cache))
    return blocks * bs


def _hold_copy(lu: Unit, nexus: ItNexus, list_id: int, usage: int, status: int,
               segments: int, moved: int) -> None:
    """Keep COPY STATUS for LIST ID USAGE 00b/10b (SPC-3 §6.3.1)."""
    if usage == 0x03:
        return
    copies = lu.copy_results(nexus)
    if copies is None:
        return
    kib = moved >> 10
    copies[list_id] = (8).to_bytes(4, "big") + bytes((status,)) \
        + segments.to_bytes(2, "big") + bytes((1,)) + min(kib, 0xFFFFFFFF).to_bytes(4, "big")
    while len(copies) > COPY_RESULTS_HELD_MAX:
        del copies[next(iter(copies))]

