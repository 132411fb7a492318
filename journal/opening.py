"""Opening a Journal LUN: create or open the file (or open the device, or the SAN LUN),
lock it, load or format it.

Shared by :meth:`journal.journal.Journal.open` and the tools in :mod:`journal`
(``format_journal``, ``check_journal``). The size rules are the seed's (seed
002, "Journal LUN metrics": at least 1 GiB of metadata plus 2 GiB per
protected LUN; shrinking raises an alarm); every failure is a
:class:`~journal.errors.JournalError` carrying that alarm.

A path may end in ``#part=K/N``: the HA pair's shared Journal LUN (seed 002, "FusionSync
and Core HA"), each Core's journal in its own fixed part (:mod:`steelfusion.partdev`). A
part is never created, never grows, and each of its size rules names the part.
"""

from __future__ import annotations

from pathlib import Path

from journal import layout as L
from journal.errors import JournalError, JournalShrunk, JournalTooSmall, JournalUnreachable
from journal.image import Blank, Image, Version1, format_dev, io_error, load
from steelfusion import log
from steelfusion.blockdev import (
    Device,
    DeviceBusy,
    FileDevice,
    create_file,
    is_san,
    open_device,
    parse_part,
)
from steelfusion.partdev import PartDevice

_log = log.get("journal")


def too_small(path: str | Path, size: int, luns: int) -> JournalTooSmall:
    need = L.required_size(luns)
    part = parse_part(path)[1]
    if part is None:
        fix = "grow the Journal LUN"
    else:
        fix = (f"a part never grows once its Journal LUN is in use, so the {part[1]} parts "
               f"need a Journal LUN of at least {part[1]} x {need / L.GIB:.0f} GiB + 1 MiB: "
               "grow it before first use, or give the HA pair a new blank one")
    return JournalTooSmall(
        f"Journal LUN {path} is {size / L.GIB:.1f} GiB; {luns} protected LUN(s) need at least "
        f"{need / L.GIB:.0f} GiB (1 GiB + 2 GiB per LUN); {fix} - the replication service "
        "does not start until it is large enough",
        size=size, need=need, luns=luns)


def shrunk(path: str | Path, recorded: int, actual: int) -> JournalShrunk:
    return JournalShrunk(f"Journal LUN {path} shrank from {recorded} to {actual} bytes "
                         f"({recorded / L.GIB:.1f} -> {actual / L.GIB:.1f} GiB); grow it back "
                         f"to at least {recorded} bytes and restart - a journal may only grow")


def open_dev(path: str, size: int, need: int) -> Device:
    """Open read-write, creating a sparse file of ``size`` when missing (a file path only:
    a block device, a SAN LUN or a ``#part=K/N`` of any of them must exist). A part not
    yet in use that is too small is refused before anything is written to the LUN."""
    base, part = parse_part(path)
    try:
        dev = open_device(path)
    except FileNotFoundError:
        if part is not None:
            raise JournalUnreachable(f"Journal LUN {path}: {base} does not exist; a part of a "
                                     "shared Journal LUN is never created - map the LUN (or "
                                     "create the file) first") from None
    except OSError as e:
        raise io_error(e, path, "opening") from None
    else:
        if isinstance(dev, PartDevice) and not dev.recorded and dev.part_len < need:
            # refused before anything is written: the LUN can still be grown and split again
            dev.close()
            raise too_small(path, dev.part_len, (need - L.META_BYTES) // L.SLOT_AREA_BYTES)
        return dev
    if size <= 0 or path.startswith("/dev/") or is_san(path):
        raise JournalUnreachable(f"Journal LUN {path} does not exist; map the LUN or configure "
                                 f"[journal] size (at least {need / L.GIB:.0f} GiB) to create a "
                                 "sparse file")
    if size < need:
        raise too_small(path, size, (need - L.META_BYTES) // L.SLOT_AREA_BYTES)
    try:
        return create_file(path, size)
    except OSError as e:
        raise io_error(e, path, "creating") from None


def lock_dev(dev: Device, path: str) -> None:
    """One writer per journal: a second open (another Core on the same file) is refused."""
    try:
        dev.lock()
    except DeviceBusy:
        mine = "Journal LUN" if parse_part(path)[1] is None else "part of the shared Journal LUN"
        raise JournalError(f"Journal LUN {path} is in use by another process (or opened twice); "
                           f"each Core needs its own {mine}", alarm="journal_busy") from None
    except OSError as e:
        raise io_error(e, path, "locking") from None


def load_or_format(dev: Device, path: str, size: int, region_bytes: int,
                   log_bytes: int) -> Image:
    """Load; an all-zero LUN is formatted, a version-1 journal (superblock only) is upgraded."""
    try:
        return load(dev, path)
    except Blank:
        try:
            actual = dev.size()
            if size > actual and isinstance(dev, FileDevice) and dev.is_file:
                dev.truncate(size)
                actual = size
        except OSError as e:
            raise io_error(e, path, "sizing") from None
        if actual < L.META_BYTES:
            raise too_small(path, actual, 0) from None
        reason = "new"
    except Version1 as v:
        try:
            actual = dev.size()
        except OSError as e:
            raise io_error(e, path, "reading the size") from None
        if actual < v.size:
            raise shrunk(path, v.size, actual) from None
        reason = "upgrade_from_v1"
    try:
        sb = format_dev(dev, actual, region_bytes, log_bytes)
    except OSError as e:
        raise io_error(e, path, "formatting") from None
    _log.info("journal_formatted", path=str(path), size=actual, reason=reason,
              region_bytes=region_bytes, log_bytes=log_bytes, journal_id=f"{sb.journal_id:016x}")
    return load(dev, path)
