"""Reading a Journal LUN: pick the superblock, load the checkpoint, replay the log.

Read-only, so the operator's ``inspect`` tool and :class:`journal.Journal`
share it. Every failure is one of the :mod:`journal.errors` classes; nothing
else may escape (tests/test_journal_fuzz.py feeds it garbage).

Torn or corrupt (STYLE.md, "Storage habits": check every record after reading
back): the log is written one block per commit, and a block is written only
after the previous one's fdatasync returned. So a bad block followed anywhere
later by a good block of the same generation cannot be a power cut: it is
damage, and replaying past it would silently drop acknowledged records ->
:class:`JournalCorrupt`. A bad block with nothing valid after it is the
commit that was cut off by the power failure: its writers were never told it
was durable, so it is ignored.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from journal import layout as L
from journal.errors import (
    JournalCorrupt,
    JournalError,
    JournalFull,
    JournalShrunk,
    JournalUnreachable,
    JournalUnsupported,
)
from steelfusion.blockdev import Device
from steelfusion.partdev import PartError, PartTableError


def io_error(e: OSError, path: str | Path, action: str) -> JournalError:
    """Map an OSError to the alarm the operator needs (translate at the layer boundary)."""
    if isinstance(e, PartTableError):
        return JournalCorrupt(f"Journal LUN {e.strerror}")
    why = e.strerror if isinstance(e, PartError) else os.strerror(e.errno) if e.errno else e
    what = f"Journal LUN {path}: {action} failed: {why}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return JournalFull(f"{what}; the backing store is out of space - free or grow the "
                           "storage under the Journal LUN")
    return JournalUnreachable(f"{what}; check that the LUN is mapped, online and readable "
                              "by the Core")


@dataclass
class Image:
    """What the journal says, after checkpoint + log replay (unpacked bool arrays)."""

    sb: L.Superblock
    actual_size: int
    dirty: list[np.ndarray]
    al: list[np.ndarray]
    log_used_bytes: int = 0
    log_blocks: int = 0
    log_records: int = 0
    log_markers: int = 0  # CHECKPOINT blocks (one per generation, first in its log)
    log_seq: int = 0
    torn_bytes: int = 0  # size of the ignored torn tail, 0 if none
    other_copy_ok: bool = True
    touched: set[int] = field(default_factory=set)  # slots the log replay changed
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """Closed cleanly: the last checkpoint says so and nothing was logged after it."""
        return bool(self.sb.flags & L.FLAG_CLEAN) and self.log_blocks == self.log_markers \
            and not self.torn_bytes


class Blank(Exception):
    """The superblock area is all zeros: a new LUN, ready to be formatted."""


class Version1(Exception):
    """The first build's superblock-only format; it never held region data."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def read_superblock(dev: Device, path: str | Path) -> tuple[L.Superblock, bool]:
    """The newest valid copy, and whether the other copy is valid too."""
    try:
        copies = [dev.pread(L.SB_COPY_BYTES, off) for off in L.SB_OFFSETS]
    except OSError as e:
        raise io_error(e, path, "reading the superblock") from None
    if not any(c[:L.SB_HEADER.size].strip(b"\0") for c in copies):
        raise Blank()
    versions = [L.peek_version(c) for c in copies]
    if versions[0] == L.VERSION_1 and versions[1] is None:
        try:
            raise Version1(L.pull_v1_size(copies[0]))
        except L.BadBlock as e:
            raise JournalCorrupt(f"Journal LUN {path}: {e}; the superblock is damaged - "
                                 "restore it or reformat the journal (a full resync follows)"
                                 ) from None
    newer = [v for v in versions if v is not None and v > L.VERSION]
    if newer:
        raise JournalUnsupported(f"Journal LUN {path} has format version {max(newer)}; this "
                                 f"build reads version {L.VERSION} - upgrade steelfusion")
    good: list[L.Superblock] = []
    reasons: list[str] = []
    for i, c in enumerate(copies):
        try:
            good.append(L.pull_superblock(c))
        except L.BadBlock as e:
            reasons.append(f"copy {i}: {e}")
    if not good:
        if all(v is None for v in versions):
            raise JournalCorrupt(f"Journal LUN {path} is not a steelfusion journal (no magic "
                                 "in either superblock copy); check the configured path - it "
                                 "is never formatted over automatically unless it is all zeros")
        raise JournalCorrupt(f"Journal LUN {path}: no valid superblock ({'; '.join(reasons)}); "
                             "restore the LUN or reformat it (a full resync follows)")
    return max(good, key=lambda s: s.generation), len(good) == 2


def _bool(packed: bytes, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=n,
                         bitorder="little").astype(bool)


def load(dev: Device, path: str | Path) -> Image:
    """Read the newest checkpoint and replay the log over it; raises JournalError only."""
    sb, other_ok = read_superblock(dev, path)
    try:
        actual = dev.size()
    except OSError as e:
        raise io_error(e, path, "reading the size") from None
    if actual < sb.size_bytes:
        raise JournalShrunk(f"Journal LUN {path} shrank from {sb.size_bytes} to {actual} bytes "
                            f"({sb.size_bytes / L.GIB:.1f} -> {actual / L.GIB:.1f} GiB); grow it "
                            f"back to at least {sb.size_bytes} bytes - a journal may only grow")
    img = Image(sb, actual, [], [], other_copy_ok=other_ok)
    for i, slot in enumerate(sb.slots):
        n = slot.nregions
        try:
            raw = dev.pread(L.BLOCK + 2 * L.bitmap_stride(n), L.slot_offset(i, slot.half))
        except OSError as ex:
            raise io_error(ex, path, f"reading the bitmaps of LUN {slot.lun}") from None
        try:
            dirty, al = L.pull_bitmaps(raw, i, sb.journal_id, slot.bitmap_gen, slot.lun, n)
        except L.BadBlock as ex:
            raise JournalCorrupt(f"Journal LUN {path}: checkpoint bitmap of LUN {slot.lun} (slot {i},"
                                 f" half {slot.half}) is corrupt: {ex}; its dirty regions are "
                                 f"unknown - run a full resync of LUN {slot.lun} after reformatting"
                                 ) from None
        img.dirty.append(_bool(dirty, n))
        img.al.append(_bool(al, n))
    _replay(dev, path, img)
    return img


def _replay(dev: Device, path: str | Path, img: Image) -> None:
    sb = img.sb
    try:
        buf = dev.pread(sb.log_bytes, sb.log_offset)
    except OSError as e:
        raise io_error(e, path, "reading the log") from None
    pos = 0
    seq = 0
    while True:
        h = L.pull_log_header(buf, pos)
        if h is None or h.journal_id != sb.journal_id or h.generation != sb.generation:
            break
        end = pos + L.LOG_HEADER.size + h.nrecords * L.RECORD.size
        if h.seq != seq + 1 or end > len(buf) or h.nrecords == 0:
            break
        payload = buf[pos + L.LOG_HEADER.size:end]
        if L.crc32c(payload) != h.payload_crc:
            break
        _apply(path, img, payload, pos)
        seq = h.seq
        img.log_records += h.nrecords
        img.log_blocks += 1
        pos = L.round_up(end, L.SECTOR)
    img.log_used_bytes = pos
    img.log_seq = seq
    _check_tail(path, img, buf, pos, seq)


def _check_tail(path: str | Path, img: Image, buf: bytes, pos: int, seq: int) -> None:
    """Decide whether the block at ``pos`` ends the log, is a torn tail, or is damage."""
    sb = img.sb
    h = L.pull_log_header(buf, pos)
    if h is not None and h.journal_id == sb.journal_id and h.generation > sb.generation:
        raise JournalCorrupt(f"Journal LUN {path}: the log was written after checkpoint "
                             f"{h.generation} but the newest readable superblock is "
                             f"{sb.generation}; the newer superblock is damaged")
    # A block of this generation that failed its payload check, or a header that lost its
    # CRC, is the commit cut off by the power failure (if nothing valid follows). Zeros or a
    # stale block of an older generation are simply the end of the log.
    torn = (h is not None and h.journal_id == sb.journal_id and h.generation == sb.generation) \
        or (h is None and buf[pos:pos + 4] == L.LOG_MAGIC)
    # Anything valid of this generation (or newer) further on means damage, not a tear.
    words = np.frombuffer(buf, dtype=">u4")[::L.SECTOR // 4]
    magic = int.from_bytes(L.LOG_MAGIC, "big")
    for k in np.flatnonzero(words == magic):
        off = int(k) * L.SECTOR
        if off <= pos:
            continue
        later = L.pull_log_header(buf, off)
        if later is None or later.journal_id != sb.journal_id:
            continue
        if later.generation > sb.generation or (later.generation == sb.generation
                                                and later.seq > seq):
            raise JournalCorrupt(
                f"Journal LUN {path}: log block at offset {sb.log_offset + pos} is damaged but "
                f"block {later.seq} of generation {later.generation} follows at offset "
                f"{sb.log_offset + off}; records in between would be lost - not a power cut. "
                "Restore the journal LUN or reformat it and run a full resync")
    if torn:
        end = pos + L.SECTOR
        if h is not None and h.generation == sb.generation:
            end = min(len(buf), L.round_up(pos + L.LOG_HEADER.size + h.nrecords * L.RECORD.size,
                                           L.SECTOR))
        img.torn_bytes = max(L.SECTOR, end - pos)
        img.notes.append(f"torn log block at offset {sb.log_offset + pos} ignored (power cut "
                         "during its commit; its writers were never acknowledged)")


def _apply(path: str | Path, img: Image, payload: bytes, pos: int) -> None:
    recs = np.frombuffer(payload, dtype=L.RECORD_DTYPE)
    nslots = len(img.dirty)
    for op, _r, slot, count, region in recs.tolist():
        if op == L.OP_CHECKPOINT and (slot, count, region) == (0, 0, img.sb.generation) \
                and len(recs) == 1:
            img.log_markers += 1
            continue
        if op not in L.OPS or slot >= nslots or count == 0 \
                or region + count > len(img.dirty[slot]):
            raise JournalCorrupt(f"Journal LUN {path}: log block at offset "
                                 f"{img.sb.log_offset + pos} has a record its checksum covers "
                                 f"but that makes no sense (op {op}, slot {slot}, regions "
                                 f"{region}+{count}); written by a broken build? Reformat and "
                                 "run a full resync")
        img.touched.add(slot)
        arr = img.dirty[slot] if op <= L.OP_CLEAR else img.al[slot]
        value = op in (L.OP_SET, L.OP_AL_ADD)
        if count == 1:
            arr[region] = value
        else:
            arr[region:region + count] = value


def format_dev(dev: Device, size: int, region_bytes: int, log_bytes: int) -> L.Superblock:
    """Write a fresh superblock (generation 1) and zero the other copy."""
    now = time.time_ns()
    sb = L.Superblock(generation=1, journal_id=int.from_bytes(os.urandom(8), "big"),
                      created_ns=now, checkpoint_ns=now, size_bytes=size,
                      log_offset=L.LOG_OFFSET, log_bytes=log_bytes, region_bytes=region_bytes,
                      flags=L.FLAG_CLEAN, slots=())
    data = L.push_superblock(sb)
    other = L.SB_OFFSETS[1 - sb.copy]
    dev.pwrite(bytes(L.SB_COPY_BYTES), other)
    dev.pwrite(data, L.SB_OFFSETS[sb.copy])
    dev.sync()
    return sb


