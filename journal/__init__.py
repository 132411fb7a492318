"""Journal LUN: metadata-only log of the regions changed while replication is suspended.

Seed 002, "Journal LUN metrics": one Journal LUN per data center, sized at
least 1 GiB for metadata + 2 GiB per protected LUN (25 LUNs -> 51 GiB); too
small -> an alarm is raised and the replication service does not start. It
may be thin-provisioned (a sparse file here) and grown while running.

This module holds the sizing rule and the superblock; the region maps and
the record log arrive with the FusionSync issue.

Superblock (offset 0, 64 bytes, network byte order)::

    struct superblock { char magic[8] /* "SFJRNL01" */; uint32 version; uint32 flags;
                        uint64 created_ns; uint64 size_at_format; uint8 pad[28]; uint32 crc; };
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

from steelfusion.wire import crc32c

GIB = 1 << 30
MAGIC = b"SFJRNL01"
VERSION = 1
SUPER = struct.Struct(">8sIIQQ28sI")


class JournalError(Exception):
    """The Journal LUN is missing, too small, shrunk or corrupt."""


def required_size(protected_luns: int) -> int:
    """Seed: 1 GiB for metadata + 2 GiB for each protected LUN."""
    return GIB + 2 * GIB * protected_luns


def _superblock(size: int) -> bytes:
    body = SUPER.pack(MAGIC, VERSION, 0, time.time_ns(), size, b"", 0)[:-4]
    return body + crc32c(body).to_bytes(4, "big")


def format_journal(path: str | Path, size: int) -> None:
    """Create a sparse journal file of ``size`` bytes with a fresh superblock."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, _superblock(size), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def check_journal(path: str | Path, size: int, protected_luns: int) -> int:
    """Open (formatting a new sparse file of ``size`` if absent) and validate.

    Returns the journal's size; raises :class:`JournalError` with the reason
    and the size needed.
    """
    p = Path(path)
    need = required_size(protected_luns)
    if not p.exists():
        if size <= 0:
            raise JournalError(f"Journal LUN {p} does not exist and no size is configured")
        format_journal(p, size)
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError as e:
        raise JournalError(f"Journal LUN {p} is unreachable: {e}") from None
    try:
        actual = os.lseek(fd, 0, os.SEEK_END)
        raw = os.pread(fd, SUPER.size, 0)
    finally:
        os.close(fd)
    if len(raw) < SUPER.size:
        raise JournalError(f"Journal LUN {p} has no superblock")
    magic, version, _flags, _created, fmt_size, _pad, crc = SUPER.unpack(raw)
    if magic != MAGIC:
        raise JournalError(f"Journal LUN {p}: bad magic {magic!r}; not a steelfusion journal")
    if crc32c(raw[:-4]) != crc:
        raise JournalError(f"Journal LUN {p}: superblock CRC mismatch (corrupt)")
    if version != VERSION:
        raise JournalError(f"Journal LUN {p}: version {version}, this build reads {VERSION}")
    if actual < fmt_size:
        raise JournalError(f"Journal LUN {p} shrank from {fmt_size} to {actual} bytes")
    if actual < need:
        raise JournalError(
            f"Journal LUN {p} is {actual / GIB:.1f} GiB; {protected_luns} protected LUN(s) need "
            f"at least {need / GIB:.0f} GiB (1 GiB + 2 GiB per LUN)")
    return actual
