"""On-disk format of the Journal LUN, version 2: pure ``push_*``/``pull_*`` codecs, no I/O.

The journal holds metadata only, never data blocks (seed 002, "Journal LUN
metrics": "no actual data blocks are stored on the Journal LUN"). Its size
rule, 1 GiB for metadata + 2 GiB per protected LUN, is also its layout: the
first GiB holds the superblock pair and the append log, and LUN slot ``i``
owns the 2 GiB area at ``1 GiB + i * 2 GiB``. A journal grown while running
therefore gains slots simply by being longer; one shrunk below a slot in use
has lost that slot's bitmaps. All integers are big-endian (network order,
like the rest of steelfusion); every block carries a CRC32C (RFC 3720
polynomial, :func:`steelfusion.wire.crc32c`)::

    offset 0 / 64 KiB   superblock copy generation % 2      (<= 64 KiB each)
    offset 1 MiB        append log, log_bytes long (default 8 MiB)
    1 GiB + i * 2 GiB   LUN slot i: half 0 at +0, half 1 at +1 GiB

    struct superblock {            /* 128-byte header + slot table, one CRC over both */
        char     magic[8];         /* "SFJRNL01" */
        uint32   version;          /* 2 (1 = the superblock-only format of the first build) */
        uint32   flags;            /* bit 0 CLEAN: written by a clean close, AL empty */
        uint64   generation;       /* checkpoint number; the newest valid copy wins */
        uint64   journal_id;       /* random at format; stale log blocks of an old format never match */
        uint64   created_ns;
        uint64   checkpoint_ns;
        uint64   size_bytes;       /* size at format or at the last checkpoint after a grow */
        uint64   log_offset;       /* 1 MiB */
        uint64   log_bytes;
        uint32   region_bytes;     /* default region size for new slots, power of two */
        uint32   nslots;           /* LUN slots in use, <= MAX_SLOTS */
        uint8    pad[44];
        uint32   crc;              /* CRC32C of bytes 0..123 then of slots[] */
        struct slot {              /* 32 bytes */
            uint64 lun_id;
            uint64 lun_bytes;
            uint32 region_bytes;
            uint8  half;           /* which half of the slot area holds the current bitmaps */
            uint8  flags;
            uint16 pad;
            uint64 bitmap_gen;     /* generation that wrote that half; must match its header */
        } slots[nslots];
    };

    struct bitmap_half {           /* at 1 GiB + i*2 GiB + half*1 GiB */
        char     magic[4];         /* "SFJB" */
        uint32   slot;
        uint64   journal_id;
        uint64   generation;       /* == slot.bitmap_gen */
        uint64   lun_id;
        uint64   nregions;
        uint32   flags;
        uint32   dirty_crc;        /* CRC32C of dirty[] */
        uint32   al_crc;           /* CRC32C of al[] */
        uint32   crc;              /* CRC32C of the 52 bytes above */
        /* zero pad to 4 KiB */
        uint8    dirty[ceil(nregions / 8)];  /* bit r = byte r/8, bit r%8 (LSB first); padded to 4 KiB */
        uint8    al[ceil(nregions / 8)];     /* activity log at checkpoint time, same layout */
    };

    struct log_block {             /* at a 512-byte boundary of the log; one per commit */
        char     magic[4];         /* "SFJL" */
        uint32   nrecords;
        uint64   journal_id;
        uint64   generation;       /* the checkpoint this log continues */
        uint64   seq;              /* 1, 2, ... within a generation */
        uint32   payload_crc;      /* CRC32C of records[] */
        uint32   header_crc;       /* CRC32C of the 36 bytes above */
        struct record {            /* 16 bytes: op on regions [region, region + count) */
            uint8  op;             /* 1 SET dirty, 2 CLEAR dirty, 3 AL_ADD, 4 AL_REMOVE,
                                      5 CHECKPOINT (slot 0, count 0, region = generation) */
            uint8  reserved;
            uint16 slot;
            uint32 count;
            uint64 region;
        } records[nrecords];       /* zero pad to a multiple of 512 */
    };

A checkpoint writes each changed slot's bitmaps into the half it is *not*
using, fdatasyncs, writes superblock copy ``(generation + 1) % 2``,
fdatasyncs, and finally writes log block 1 of the new generation holding one
CHECKPOINT record, and fdatasyncs: the log restarts at offset 0, so older
blocks left further on are stale by their generation. A power cut at any
point leaves either the old checkpoint and its log, or the new one. The
CHECKPOINT block is what tells a torn superblock write (the checkpoint never
completed, nobody was told its records were durable: fall back to the older
copy) from a damaged one (the block exists: falling back would drop
acknowledged records, so the journal is corrupt).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from steelfusion.wire import crc32c

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30

MAGIC = b"SFJRNL01"
VERSION = 2
VERSION_1 = 1

FLAG_CLEAN = 1

SECTOR = 512
BLOCK = 4 * KIB

META_BYTES = GIB  # seed: "1 GB for metadata"
SLOT_AREA_BYTES = 2 * GIB  # seed: "2 GB minimum for each LUN"
HALF_BYTES = SLOT_AREA_BYTES // 2

SB_COPY_BYTES = 64 * KIB
SB_OFFSETS = (0, SB_COPY_BYTES)
SB_HEADER = struct.Struct(">8sIIQQQQQQQII44sI")
SB_SLOT = struct.Struct(">QQIBBHQ")
MAX_SLOTS = (SB_COPY_BYTES - SB_HEADER.size) // SB_SLOT.size  # 2044

V1_SUPER = struct.Struct(">8sIIQQ28sI")  # the first build's 64-byte superblock

LOG_OFFSET = MIB
LOG_BYTES_DEFAULT = 8 * MIB
LOG_BYTES_MIN = 4 * KIB
LOG_BYTES_MAX = 64 * MIB

REGION_BYTES_DEFAULT = MIB
REGION_BYTES_MIN = SECTOR
REGION_BYTES_MAX = GIB

BITMAP_MAGIC = b"SFJB"
BITMAP_HEADER = struct.Struct(">4sIQQQQIIII")

LOG_MAGIC = b"SFJL"
LOG_HEADER = struct.Struct(">4sIQQQII")
RECORD = struct.Struct(">BBHIQ")
RECORD_DTYPE = np.dtype([("op", "u1"), ("reserved", "u1"), ("slot", ">u2"),
                         ("count", ">u4"), ("region", ">u8")])

OP_SET = 1
OP_CLEAR = 2
OP_AL_ADD = 3
OP_AL_REMOVE = 4
OP_CHECKPOINT = 5
OPS = (OP_SET, OP_CLEAR, OP_AL_ADD, OP_AL_REMOVE)

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1


class BadBlock(Exception):
    """One block failed its checks; the reader decides whether that is a tear or corruption."""


def round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def bitmap_bytes(nregions: int) -> int:
    """Bytes of one packed bitmap: 1 TiB at 1 MiB regions -> 128 KiB."""
    return (nregions + 7) // 8


def bitmap_stride(nregions: int) -> int:
    """Bytes a bitmap occupies in a half (padded to 4 KiB so the AL starts on a block)."""
    return round_up(max(bitmap_bytes(nregions), 1), BLOCK)


def max_regions() -> int:
    """Largest region count whose header + two bitmaps fit in one 1 GiB half."""
    return ((HALF_BYTES - BLOCK) // 2 // BLOCK) * BLOCK * 8


def regions_for(lun_bytes: int, region_bytes: int) -> int:
    return -(-lun_bytes // region_bytes)


def slot_offset(index: int, half: int) -> int:
    return META_BYTES + index * SLOT_AREA_BYTES + half * HALF_BYTES


def required_size(protected_luns: int) -> int:
    """Seed 002, "Journal LUN metrics": 1 GiB for metadata + 2 GiB for each protected LUN."""
    return META_BYTES + SLOT_AREA_BYTES * protected_luns


def slots_capacity(size: int) -> int:
    """LUN slots a journal of ``size`` bytes can hold (the seed's sizing rule, inverted)."""
    return max(0, (size - META_BYTES) // SLOT_AREA_BYTES)


def valid_region_bytes(rb: int) -> bool:
    return REGION_BYTES_MIN <= rb <= REGION_BYTES_MAX and rb & (rb - 1) == 0


def valid_log_bytes(lb: int) -> bool:
    return LOG_BYTES_MIN <= lb <= LOG_BYTES_MAX and lb % SECTOR == 0


@dataclass(frozen=True, slots=True)
class SlotEntry:
    """One protected LUN's slot in the superblock table."""

    lun: int
    lun_bytes: int
    region_bytes: int
    half: int
    bitmap_gen: int
    flags: int = 0

    @property
    def nregions(self) -> int:
        return regions_for(self.lun_bytes, self.region_bytes)


@dataclass(frozen=True, slots=True)
class Superblock:
    generation: int
    journal_id: int
    created_ns: int
    checkpoint_ns: int
    size_bytes: int
    log_offset: int
    log_bytes: int
    region_bytes: int
    flags: int
    slots: tuple[SlotEntry, ...]

    @property
    def copy(self) -> int:
        """Which of the two superblock copies this generation lives in."""
        return self.generation % 2


def push_superblock(sb: Superblock) -> bytes:
    """The superblock, zero-padded to whole 4 KiB blocks: every write the journal makes is
    whole blocks, which a SAN LUN (and O_DIRECT) requires (issue 12)."""
    table = b"".join(SB_SLOT.pack(s.lun, s.lun_bytes, s.region_bytes, s.half, s.flags, 0,
                                  s.bitmap_gen) for s in sb.slots)
    head = SB_HEADER.pack(MAGIC, VERSION, sb.flags, sb.generation, sb.journal_id, sb.created_ns,
                          sb.checkpoint_ns, sb.size_bytes, sb.log_offset, sb.log_bytes,
                          sb.region_bytes, len(sb.slots), b"", 0)[:-4]
    crc = crc32c(table, crc32c(head))
    raw = head + crc.to_bytes(4, "big") + table
    return raw + bytes(round_up(len(raw), BLOCK) - len(raw))


def peek_version(buf: bytes) -> int | None:
    """The version field if ``buf`` starts with our magic, else None."""
    if len(buf) < 12 or buf[:8] != MAGIC:
        return None
    return int.from_bytes(buf[8:12], "big")


def pull_superblock(buf: bytes) -> Superblock:
    """Decode and check one copy; :class:`BadBlock` says why it cannot be used."""
    if len(buf) < SB_HEADER.size:
        raise BadBlock("short read")
    (magic, version, flags, gen, jid, created, ckpt_ns, size, log_off, log_bytes, rb, nslots,
     _pad, crc) = SB_HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise BadBlock("no magic")
    if version != VERSION:
        raise BadBlock(f"version {version}")
    if nslots > MAX_SLOTS:
        raise BadBlock(f"slot count {nslots} > {MAX_SLOTS}")
    end = SB_HEADER.size + nslots * SB_SLOT.size
    if len(buf) < end:
        raise BadBlock("short read")
    if crc32c(buf[SB_HEADER.size:end], crc32c(buf[:SB_HEADER.size - 4])) != crc:
        raise BadBlock("CRC mismatch")
    if not valid_region_bytes(rb):
        raise BadBlock(f"region size {rb}")
    if log_off < 2 * SB_COPY_BYTES or log_off % SECTOR or not valid_log_bytes(log_bytes) \
            or log_off + log_bytes > META_BYTES:
        raise BadBlock(f"log area {log_off}+{log_bytes}")
    if size < META_BYTES + nslots * SLOT_AREA_BYTES:
        raise BadBlock(f"recorded size {size} cannot hold {nslots} slot(s)")
    slots: list[SlotEntry] = []
    seen: set[int] = set()
    for i in range(nslots):
        lun, lun_bytes, srb, half, sflags, _p, bgen = SB_SLOT.unpack_from(
            buf, SB_HEADER.size + i * SB_SLOT.size)
        e = SlotEntry(lun, lun_bytes, srb, half, bgen, sflags)
        if lun in seen or half > 1 or not valid_region_bytes(srb) or lun_bytes <= 0 \
                or bgen > gen or e.nregions > max_regions():
            raise BadBlock(f"slot {i} (LUN {lun}) is inconsistent")
        seen.add(lun)
        slots.append(e)
    return Superblock(gen, jid, created, ckpt_ns, size, log_off, log_bytes, rb, flags,
                      tuple(slots))


def pull_v1_size(buf: bytes) -> int:
    """Size at format of a version-1 superblock (which held no region data)."""
    if len(buf) < V1_SUPER.size:
        raise BadBlock("short read")
    magic, version, _f, _c, size, _pad, crc = V1_SUPER.unpack_from(buf)
    if magic != MAGIC or version != VERSION_1 or crc32c(buf[:V1_SUPER.size - 4]) != crc:
        raise BadBlock("version-1 superblock CRC mismatch")
    return int(size)


def push_bitmaps(slot: int, journal_id: int, gen: int, lun: int, nregions: int,
                 dirty: bytes, al: bytes) -> bytes:
    """A whole half: header block, dirty bitmap and AL bitmap, each padded to 4 KiB."""
    stride = bitmap_stride(nregions)
    head = BITMAP_HEADER.pack(BITMAP_MAGIC, slot, journal_id, gen, lun, nregions, 0,
                              crc32c(dirty), crc32c(al), 0)[:-4]
    head += crc32c(head).to_bytes(4, "big")
    return b"".join((head, bytes(BLOCK - len(head)), dirty, bytes(stride - len(dirty)),
                     al, bytes(stride - len(al))))


def pull_bitmaps(buf: bytes, slot: int, journal_id: int, gen: int, lun: int,
                 nregions: int) -> tuple[bytes, bytes]:
    """Check a half read back and return (dirty, al) packed bitmaps."""
    nb = bitmap_bytes(nregions)
    stride = bitmap_stride(nregions)
    if len(buf) < BLOCK + 2 * stride:
        raise BadBlock("short read")
    (magic, s, jid, g, lun_id, n, _flags, dcrc, acrc, crc) = BITMAP_HEADER.unpack_from(buf)
    if magic != BITMAP_MAGIC:
        raise BadBlock("no bitmap magic")
    if crc32c(buf[:BITMAP_HEADER.size - 4]) != crc:
        raise BadBlock("header CRC mismatch")
    if (s, jid, g, lun_id, n) != (slot, journal_id, gen, lun, nregions):
        raise BadBlock(f"header names slot {s} LUN {lun_id} generation {g}, "
                       f"expected slot {slot} LUN {lun} generation {gen}")
    dirty = buf[BLOCK:BLOCK + nb]
    al = buf[BLOCK + stride:BLOCK + stride + nb]
    if crc32c(dirty) != dcrc:
        raise BadBlock("dirty bitmap CRC mismatch")
    if crc32c(al) != acrc:
        raise BadBlock("activity-log bitmap CRC mismatch")
    return dirty, al


def log_block_bytes(nrecords: int) -> int:
    return round_up(LOG_HEADER.size + nrecords * RECORD.size, SECTOR)


def push_log_block(journal_id: int, gen: int, seq: int, records: bytes) -> bytes:
    n = len(records) // RECORD.size
    head = LOG_HEADER.pack(LOG_MAGIC, n, journal_id, gen, seq, crc32c(records), 0)[:-4]
    head += crc32c(head).to_bytes(4, "big")
    pad = log_block_bytes(n) - len(head) - len(records)
    return b"".join((head, records, bytes(pad)))


@dataclass(frozen=True, slots=True)
class LogHeader:
    nrecords: int
    journal_id: int
    generation: int
    seq: int
    payload_crc: int


def pull_log_header(buf: bytes | memoryview, offset: int) -> LogHeader | None:
    """The header at ``offset`` if its magic and CRC hold, else None (end, tear or damage)."""
    if offset + LOG_HEADER.size > len(buf):
        return None
    raw = bytes(buf[offset:offset + LOG_HEADER.size])
    magic, n, jid, gen, seq, pcrc, hcrc = LOG_HEADER.unpack(raw)
    if magic != LOG_MAGIC or crc32c(raw[:-4]) != hcrc:
        return None
    return LogHeader(n, jid, gen, seq, pcrc)


def pack_records(op: int, slot: int, starts: np.ndarray, counts: np.ndarray) -> bytes:
    """Many run records at once (bulk clear / set), numpy instead of a Python loop."""
    rec = np.zeros(len(starts), dtype=RECORD_DTYPE)
    rec["op"] = op
    rec["slot"] = slot
    rec["count"] = counts
    rec["region"] = starts
    return rec.tobytes()
