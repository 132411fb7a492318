"""SCSI commands for an initiator: CDB builders, sense data and the parsers
of what the commands return (SPC-4, SBC-3).

:mod:`steelfusion.iscsi.initiator` carries these CDBs over iSCSI and decodes
the sense of every CHECK CONDITION with :func:`parse_sense`.  The layouts
are the ones ``edge.scsi`` reads (``edge.scsi.cdb.parse_rw``: LBA in bytes
2-9 and the length in 10-13 of a 16-byte CDB; PR OUT's parameter list length
in bytes 5-8; PR IN's allocation length in 7-8), and the tests run each one
through ``edge.scsi`` to keep it so.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from steelfusion.iscsi.pdu import Buffer

# --------------------------------------------------------------------------- sense data


@dataclass(frozen=True, slots=True)
class Sense:
    """Decoded sense data (SPC-4 §4.5): fixed (0x70/0x71) or descriptor
    (0x72/0x73) format; ``raw`` keeps the bytes for anything else."""

    key: int
    asc: int
    ascq: int
    raw: bytes

    def __str__(self) -> str:
        return f"{self.key:X}/{self.asc:02X}/{self.ascq:02X}"


def parse_sense(raw: Buffer) -> Sense | None:
    """Sense key/ASC/ASCQ of ``raw``; None when it is empty or in neither format."""
    b = bytes(raw)
    if len(b) < 4:
        return None
    code = b[0] & 0x7F
    if code in (0x70, 0x71):
        return Sense(b[2] & 0x0F, b[12] if len(b) > 12 else 0, b[13] if len(b) > 13 else 0, b)
    if code in (0x72, 0x73):
        return Sense(b[1] & 0x0F, b[2], b[3], b)
    return None


# --------------------------------------------------------------------------- CDBs


def lun_field(lun: int) -> int:
    """The 8-byte LUN field (SAM-5 §4.7) as an integer: peripheral device
    addressing below 256, flat space addressing up to 16383."""
    if not 0 <= lun < 0x4000:
        raise ValueError(f"LUN {lun} is outside 0..16383")
    return lun << 48 if lun < 256 else (0x4000 | lun) << 48



_RW16 = struct.Struct(">BBQIBB")
_PR = struct.Struct(">BBBxxIB")  # PERSISTENT RESERVE OUT: op, SA, scope/type, length, control


def read16(lba: int, blocks: int, *, fua: bool = False) -> bytes:
    """READ(16), SBC-3 §5.16."""
    return _RW16.pack(0x88, 0x08 if fua else 0, lba, blocks, 0, 0)


def write16(lba: int, blocks: int, *, fua: bool = False) -> bytes:
    """WRITE(16), SBC-3 §5.40."""
    return _RW16.pack(0x8A, 0x08 if fua else 0, lba, blocks, 0, 0)


def sync_cache16(lba: int = 0, blocks: int = 0, *, immed: bool = False) -> bytes:
    """SYNCHRONIZE CACHE(16), SBC-3 §5.23; blocks 0 means to the end."""
    return _RW16.pack(0x91, 0x02 if immed else 0, lba, blocks, 0, 0)


def read_capacity16(alloc: int = 32) -> bytes:
    """READ CAPACITY(16): SERVICE ACTION IN(16) 0x10, SBC-3 §5.16."""
    return struct.pack(">BBQIBB", 0x9E, 0x10, 0, alloc, 0, 0)


def parse_capacity16(data: Buffer) -> tuple[int, int]:
    """(block size, blocks) from READ CAPACITY(16) data."""
    if len(data) < 12:
        raise ValueError(f"READ CAPACITY(16) returned {len(data)} bytes")
    last, size = struct.unpack_from(">QI", data)
    return size, last + 1


def get_lba_status(lba: int, alloc: int = 4096) -> bytes:
    """GET LBA STATUS: SERVICE ACTION IN(16) 0x12, SBC-3 §5.6."""
    return struct.pack(">BBQIBB", 0x9E, 0x12, lba, alloc, 0, 0)


def parse_lba_status(data: Buffer) -> list[tuple[int, int, int]]:
    """(LBA, blocks, provisioning status: 0 mapped, 1 deallocated, 2 anchored) descriptors
    of GET LBA STATUS data (SBC-3 §5.6.2), as many as the data holds whole."""
    b = bytes(data)
    if len(b) < 8:
        raise ValueError(f"GET LBA STATUS returned {len(b)} bytes")
    end = min(len(b), 4 + struct.unpack_from(">I", b)[0])
    return [(lba, n, st & 0x0F) for lba, n, st in
            (struct.unpack_from(">QIB", b, off) for off in range(8, end - 15, 16))]


def unmap(ranges: list[tuple[int, int]]) -> tuple[bytes, bytes]:
    """UNMAP (SBC-3 §5.28): (CDB, parameter list) deallocating (LBA, blocks) ranges."""
    descs = b"".join(struct.pack(">QIxxxx", lba, n) for lba, n in ranges)
    params = struct.pack(">HHxxxx", 6 + len(descs), len(descs)) + descs
    return struct.pack(">BBxxxxBHB", 0x42, 0, 0, len(params), 0), params


def tur() -> bytes:
    """TEST UNIT READY, SPC-4 §6.47."""
    return bytes(6)


def inquiry(page: int | None = None, alloc: int = 255) -> bytes:
    """INQUIRY, SPC-4 §6.6: standard data, or the VPD ``page``."""
    return struct.pack(">BBBHB", 0x12, 0 if page is None else 1, page or 0, alloc, 0)


def report_luns(alloc: int = 4096) -> bytes:
    """REPORT LUNS, SPC-4 §6.33 (SELECT REPORT 0)."""
    return struct.pack(">BBBxxxIBB", 0xA0, 0, 0, alloc, 0, 0)


def parse_report_luns(data: Buffer) -> list[int]:
    """LUN numbers of REPORT LUNS data (peripheral and flat addressing)."""
    b = bytes(data)
    n = int.from_bytes(b[:4], "big") if len(b) >= 4 else 0
    out = []
    for i in range(8, min(len(b), 8 + n) - 7, 8):
        head = int.from_bytes(b[i:i + 2], "big")
        out.append(head & 0x3FFF if head >> 14 == 1 else head & 0xFF)
    return out


class PrIn(enum.IntEnum):
    """PERSISTENT RESERVE IN service actions (SPC-4 §6.15)."""

    READ_KEYS = 0
    READ_RESERVATION = 1


class PrOut(enum.IntEnum):
    """PERSISTENT RESERVE OUT service actions (SPC-4 Table 176)."""

    REGISTER = 0
    RESERVE = 1
    RELEASE = 2
    CLEAR = 3
    PREEMPT = 4
    PREEMPT_AND_ABORT = 5
    REGISTER_AND_IGNORE = 6
    REGISTER_AND_MOVE = 7


class PrType(enum.IntEnum):
    """PERSISTENT RESERVATION TYPE codes (SPC-4 Table 169): the initiator's and the target's
    (edge/scsi/pr.py) one list."""

    WRITE_EXCLUSIVE = 1
    EXCLUSIVE_ACCESS = 3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 8


def pr_in(action: PrIn, alloc: int = 8192) -> bytes:
    """PERSISTENT RESERVE IN, SPC-4 §6.15."""
    return struct.pack(">BBxxxxxHB", 0x5E, action, alloc, 0)


def pr_out(action: PrOut, key: int, sa_key: int = 0, pr_type: int = 0, *,
           aptpl: bool = False) -> tuple[bytes, bytes]:
    """PERSISTENT RESERVE OUT (SPC-4 §6.16): (CDB, 24-byte parameter list);
    ``pr_type`` is the reservation type (1 write exclusive, 3 exclusive
    access, 5/6 registrants only, 7/8 all registrants), scope LU."""
    params = struct.pack(">QQ4sBxH", key, sa_key, b"", 0x01 if aptpl else 0, 0)
    return _PR.pack(0x5F, action, pr_type & 0x0F, len(params), 0), params


def parse_read_keys(data: Buffer) -> tuple[int, list[int]]:
    """(PRgeneration, registered keys) of READ KEYS data (SPC-4 §6.15.2).

    The ADDITIONAL LENGTH counts every key even when the allocation length cut the list
    short (SPC-4 §4.2.5.6), so a short answer gives the keys that arrived; a length that is
    not whole 8-byte keys is a malformed answer (ValueError)."""
    b = bytes(data)
    if len(b) < 8:
        raise ValueError(f"READ KEYS returned {len(b)} bytes (the header alone is 8)")
    n = int.from_bytes(b[4:8], "big")
    if n % 8:
        raise ValueError(f"READ KEYS ADDITIONAL LENGTH {n} is not whole 8-byte keys")
    n = min(n, len(b) - 8) // 8 * 8
    return (int.from_bytes(b[:4], "big"),
            [int.from_bytes(b[i:i + 8], "big") for i in range(8, 8 + n, 8)])


def parse_read_reservation(data: Buffer) -> tuple[int, int | None, int | None]:
    """(PRgeneration, holder's key, type) of READ RESERVATION data (SPC-4 §6.15.3); key
    and type are None when nothing is reserved (ADDITIONAL LENGTH 0).

    A reservation descriptor is 16 bytes; an answer that announces one and does not carry it
    whole is a ValueError, never "unreserved": reading a cut answer as free would let a Core
    believe nobody holds the LUN."""
    b = bytes(data)
    if len(b) < 8:
        raise ValueError(f"READ RESERVATION returned {len(b)} bytes (the header alone is 8)")
    gen = int.from_bytes(b[:4], "big")
    n = int.from_bytes(b[4:8], "big")
    if n == 0:
        return gen, None, None
    if n != 16:
        raise ValueError(f"READ RESERVATION ADDITIONAL LENGTH {n} (SPC-4: 0 or 16)")
    if len(b) < 24:
        raise ValueError(f"READ RESERVATION announces a reservation but returned {len(b)} of "
                         "24 bytes")
    return gen, int.from_bytes(b[8:16], "big"), b[21] & 0x0F
