"""Reading a CDB: operation codes, field accessors, transfer ranges and their
checks, and the 8-byte LUN (LIO's ``include/scsi/scsi_proto.h`` and the CDB
helpers of ``target_core_sbc.c``; tgt's ``scsi.h``).

Range checks never add LBA and length, so they cannot overflow in a
fixed-width port either.
"""

from __future__ import annotations

import struct
from enum import IntEnum

from edge.scsi.sense import Buffer, lba_out_of_range, short_data_out


class Op(IntEnum):
    """Operation codes handled here (SPC-4 / SBC-3 / SBC-4)."""

    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SELECT_6 = 0x15
    RESERVE_6 = 0x16
    RELEASE_6 = 0x17
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    PREVENT_ALLOW = 0x1E
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    WRITE_VERIFY_10 = 0x2E
    VERIFY_10 = 0x2F
    PREFETCH_10 = 0x34
    SYNCHRONIZE_CACHE_10 = 0x35
    READ_DEFECT_DATA_10 = 0x37
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    SANITIZE = 0x48
    MODE_SELECT_10 = 0x55
    RESERVE_10 = 0x56
    RELEASE_10 = 0x57
    MODE_SENSE_10 = 0x5A
    PERSISTENT_RESERVE_IN = 0x5E
    PERSISTENT_RESERVE_OUT = 0x5F
    EXTENDED_COPY = 0x83
    RECEIVE_COPY_RESULTS = 0x84
    READ_16 = 0x88
    COMPARE_AND_WRITE = 0x89
    WRITE_16 = 0x8A
    ORWRITE_16 = 0x8B
    WRITE_VERIFY_16 = 0x8E
    VERIFY_16 = 0x8F
    PREFETCH_16 = 0x90
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    WRITE_ATOMIC_16 = 0x9C
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    MAINTENANCE_IN = 0xA3
    READ_12 = 0xA8
    WRITE_12 = 0xAA
    WRITE_VERIFY_12 = 0xAE
    VERIFY_12 = 0xAF
    READ_DEFECT_DATA_12 = 0xB7


SANITIZE = Op.SANITIZE
SA_READ_CAPACITY_16 = 0x10
SA_GET_LBA_STATUS = 0x12
SA_REPORT_SUPPORTED_OPCODES = 0x0C
SA_REPORT_SUPPORTED_TMF = 0x0D
SA_XCOPY_LID1 = 0x00
SA_COPY_STATUS = 0x00
SA_COPY_OPERATING_PARAMETERS = 0x03
SA_SANITIZE_OVERWRITE = 0x01
SA_SANITIZE_BLOCK_ERASE = 0x02
SA_SANITIZE_CRYPTO_ERASE = 0x03
SA_SANITIZE_EXIT_FAILURE_MODE = 0x1F

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
FAST10 = struct.Struct(">IxH")
"""LBA and transfer length of a 10-byte READ/WRITE, from byte 2."""
FAST16 = struct.Struct(">QI")
"""LBA and transfer length of a 16-byte READ/WRITE, from byte 2."""


def u16(cdb: Buffer, i: int) -> int:
    return int(_U16.unpack_from(cdb, i)[0])


def u32(cdb: Buffer, i: int) -> int:
    return int(_U32.unpack_from(cdb, i)[0])


def u64(cdb: Buffer, i: int) -> int:
    return int(_U64.unpack_from(cdb, i)[0])


def parse_rw(cdb: bytes) -> tuple[int, int]:
    """(LBA, transfer length in blocks) of a READ/WRITE/VERIFY/SYNC CACHE/
    PREFETCH/WRITE SAME/ORWRITE CDB (SBC-3 §5): 6-byte, then 10-byte (LBA
    2..5, length 7..8), 12-byte (2..5, 6..9) and 16-byte (2..9, 10..13)."""
    op = cdb[0]
    if op in (Op.READ_6, Op.WRITE_6):
        return ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3], cdb[4] or 256
    if op < 0x60:
        return u32(cdb, 2), u16(cdb, 7)
    if op >= 0xA0:
        return u32(cdb, 2), u32(cdb, 6)
    if op == Op.WRITE_ATOMIC_16:
        return u64(cdb, 2), u16(cdb, 12)
    return u64(cdb, 2), u32(cdb, 10)


def check_range(lba: int, blocks: int, capacity_blocks: int) -> None:
    """LBA OUT OF RANGE (5/21/00) unless [lba, lba+blocks) fits (SBC-3 §4.5).

    Written as two comparisons that never add, so the check also holds in
    a fixed-width port (LBA up to 2**64-1 plus a 32-bit count)."""
    if blocks > capacity_blocks or lba > capacity_blocks - blocks:
        raise lba_out_of_range()


def allocation(data: bytes, alloc: int) -> bytes:
    """Truncate to the ALLOCATION LENGTH (SPC-4 §4.2.5.6)."""
    return data if len(data) <= alloc else data[:alloc]


def data_out(data: Buffer, needed: int) -> Buffer:
    """The Data-Out bytes the command uses.  Less than the CDB asks for:
    5/0E/03; more: the surplus is ignored and reported as underflow by the
    transport."""
    if len(data) < needed:
        raise short_data_out(needed)
    return data if len(data) == needed else memoryview(data)[:needed]


def decode_lun(raw: int) -> int:
    """LUN number from the 8-byte LUN field as a 64-bit integer (SAM-5 §4.7):
    single-level peripheral (00b) or flat (01b) addressing; -1 for anything
    else."""
    method = raw >> 62
    rest = raw & 0x0000FFFFFFFFFFFF
    if rest:
        return -1
    if method == 0:
        return -1 if (raw >> 56) & 0x3F else (raw >> 48) & 0xFF
    if method == 1:
        return (raw >> 48) & 0x3FFF
    return -1


def encode_lun(lun: int) -> int:
    """Inverse of :func:`decode_lun`: peripheral addressing below 256, flat
    above (SAM-5 §4.7); ``.to_bytes(8, "big")`` gives the wire bytes."""
    if lun < 256:
        return lun << 48
    return (0x4000 | lun) << 48
