"""Journal LUN: per-Core metadata log of the regions that must be resynced.

Seed 002, "Journal LUN metrics": one Journal LUN per data center (here: per
Core), metadata only, sized at least 1 GiB for metadata + 2 GiB per protected
LUN (25 LUNs -> 51 GiB); too small -> an alarm is raised and the replication
service does not start. It may be thin-provisioned (a sparse file here) and
grown while running; loss of connectivity, offlining, out of storage,
corruption and shrinking raise alarms (:mod:`journal.errors`).

* :mod:`journal.layout` — the versioned on-disk format (C-style structs);
* :mod:`journal.image` — read-only load and log replay (also the ``inspect`` tool);
* :mod:`journal.journal` — :class:`Journal`, the Core's write-path API:
  dirty regions while suspended, and the activity log that keeps DESIGN.md
  invariant 5 (no divergence after a primary crash);
* ``python -m journal inspect PATH`` — the operator's view (:func:`describe`).
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from journal import layout
from journal.errors import (
    JournalCorrupt,
    JournalError,
    JournalFull,
    JournalOffline,
    JournalShrunk,
    JournalTooSmall,
    JournalUnreachable,
    JournalUnsupported,
)
from journal.image import Blank, Version1, io_error, load
from journal.journal import (
    Journal,
    load_or_format,
    lock_dev,
    open_dev,
    too_small,
)
from journal.layout import GIB, MAGIC, VERSION, required_size
from steelfusion.blockdev import open_device

__all__ = [
    "GIB",
    "MAGIC",
    "VERSION",
    "Journal",
    "JournalCorrupt",
    "JournalError",
    "JournalFull",
    "JournalOffline",
    "JournalShrunk",
    "JournalTooSmall",
    "JournalUnreachable",
    "JournalUnsupported",
    "check_journal",
    "describe",
    "format_journal",
    "required_size",
]


def format_journal(path: str | Path, size: int, *,
                   region_bytes: int = layout.REGION_BYTES_DEFAULT,
                   log_bytes: int = layout.LOG_BYTES_DEFAULT) -> None:
    """Create a new sparse journal file of ``size`` bytes (never over an existing file)."""
    p = str(path)
    if size < layout.META_BYTES:
        raise too_small(p, size, 0)
    if Path(p).exists():
        raise JournalError(f"Journal LUN {p} already exists; refusing to format over it",
                           alarm="journal_exists")
    dev = open_dev(p, size, layout.META_BYTES)
    try:
        lock_dev(dev, p)
        load_or_format(dev, p, size, region_bytes, log_bytes)
    finally:
        dev.close()


def check_journal(path: str | Path, size: int, protected_luns: int) -> int:
    """Open (formatting a new sparse file of ``size`` if absent), validate and replay.

    The Core's start-up check: returns the journal's size, or raises the
    :class:`JournalError` subclass whose ``alarm`` says why replication must
    not start (too small for ``protected_luns``, shrunk, corrupt, unreachable).
    """
    p = str(path)
    need = required_size(protected_luns)
    dev = open_dev(p, size, need)
    try:
        try:
            img = load(dev, p)
        except (Blank, Version1):
            lock_dev(dev, p)
            img = load_or_format(dev, p, size, layout.REGION_BYTES_DEFAULT,
                                 layout.LOG_BYTES_DEFAULT)
        if img.actual_size < need:
            raise too_small(p, img.actual_size, protected_luns)
        return img.actual_size
    finally:
        dev.close()


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="seconds")


def describe(path: str | Path) -> dict[str, Any]:
    """Read-only summary of a journal for operators: superblock, slots, dirty counts, log use.

    Safe while a Core has the journal open (it only reads; it may then show a
    log block being written as a torn tail).
    """
    p = str(path)
    try:
        dev = open_device(p, readonly=True)
    except OSError as e:
        raise io_error(e, p, "opening") from None
    try:
        try:
            img = load(dev, p)
        except Blank:
            raise JournalError(f"Journal LUN {p} is not formatted (all zeros); the Core formats "
                               "it at start", alarm="journal_unformatted") from None
        except Version1 as v:
            return {"path": str(p), "version": layout.VERSION_1, "recorded_size": v.size,
                    "notes": ["version-1 journal (superblock only, no region data); upgraded "
                              "in place at the next open"]}
    finally:
        with contextlib.suppress(OSError):
            dev.close()
    sb = img.sb
    luns = []
    for i, slot in enumerate(sb.slots):
        d = img.dirty[i] | img.al[i]
        idx = d.nonzero()[0]
        dirty_bytes = int(idx.size) * slot.region_bytes
        if idx.size and idx[-1] == slot.nregions - 1:
            dirty_bytes -= slot.nregions * slot.region_bytes - slot.lun_bytes
        luns.append({"lun": slot.lun, "slot": i, "lun_bytes": slot.lun_bytes,
                     "region_bytes": slot.region_bytes, "regions": slot.nregions,
                     "dirty_regions": int(img.dirty[i].sum()), "al_regions": int(img.al[i].sum()),
                     "resync_regions": int(idx.size), "resync_bytes": dirty_bytes,
                     "half": slot.half, "bitmap_generation": slot.bitmap_gen})
    return {
        "path": str(p),
        "version": layout.VERSION,
        "generation": sb.generation,
        "journal_id": f"{sb.journal_id:016x}",
        "created": _iso(sb.created_ns),
        "last_checkpoint": _iso(sb.checkpoint_ns),
        "size": img.actual_size,
        "recorded_size": sb.size_bytes,
        "required_size": required_size(len(sb.slots)),
        "slot_capacity": layout.slots_capacity(img.actual_size),
        "region_bytes": sb.region_bytes,
        "clean_shutdown": img.clean,
        "superblock_copies_valid": 2 if img.other_copy_ok else 1,
        "log": {"offset": sb.log_offset, "bytes": sb.log_bytes, "used_bytes": img.log_used_bytes,
                "blocks": img.log_blocks, "records": img.log_records,
                "torn_tail_bytes": img.torn_bytes},
        "luns": luns,
        "notes": list(img.notes),
    }

