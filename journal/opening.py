"""Opening a Journal LUN: create or open the file, lock it, load or format it.

Shared by :meth:`journal.journal.Journal.open` and the tools in :mod:`journal`
(``format_journal``, ``check_journal``). The size rules are the seed's (seed
002, "Journal LUN metrics": at least 1 GiB of metadata plus 2 GiB per
protected LUN; shrinking raises an alarm); every failure is a
:class:`~journal.errors.JournalError` carrying that alarm.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from journal import layout as L
from journal.errors import JournalError, JournalShrunk, JournalTooSmall, JournalUnreachable
from journal.image import Blank, Image, Version1, device_size, format_fd, io_error, load
from steelfusion import log

_log = log.get("journal")


def too_small(path: str | Path, size: int, luns: int) -> JournalTooSmall:
    need = L.required_size(luns)
    return JournalTooSmall(
        f"Journal LUN {path} is {size / L.GIB:.1f} GiB; {luns} protected LUN(s) need at least "
        f"{need / L.GIB:.0f} GiB (1 GiB + 2 GiB per LUN); grow "
        "the Journal LUN - the replication service does not start until it is large enough",
        size=size, need=need, luns=luns)


def shrunk(path: str | Path, recorded: int, actual: int) -> JournalShrunk:
    return JournalShrunk(f"Journal LUN {path} shrank from {recorded} to {actual} bytes "
                         f"({recorded / L.GIB:.1f} -> {actual / L.GIB:.1f} GiB); grow it back "
                         f"to at least {recorded} bytes and restart - a journal may only grow")


def open_fd(path: Path, size: int, need: int) -> int:
    """Open read-write, creating a sparse file of ``size`` when missing."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise io_error(e, path, "opening") from None
    if size <= 0 or str(path).startswith("/dev/"):
        raise JournalUnreachable(f"Journal LUN {path} does not exist; map the LUN or configure "
                                 f"[journal] size (at least {need / L.GIB:.0f} GiB) to create a "
                                 "sparse file")
    if size < need:
        raise too_small(path, size, (need - L.META_BYTES) // L.SLOT_AREA_BYTES)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise io_error(e, path, "creating") from None
    try:
        os.ftruncate(fd, size)
    except OSError as e:
        os.close(fd)
        raise io_error(e, path, "sizing") from None
    return fd


def lock_fd(fd: int, path: Path) -> None:
    """One writer per journal: a second open (another Core on the same file) is refused."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise JournalError(f"Journal LUN {path} is in use by another process (or opened twice); "
                           "each Core needs its own Journal LUN", alarm="journal_busy") from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise io_error(e, path, "locking") from None


def load_or_format(fd: int, path: Path, size: int, region_bytes: int, log_bytes: int) -> Image:
    """Load; an all-zero LUN is formatted, a version-1 journal (superblock only) is upgraded."""
    try:
        return load(fd, path)
    except Blank:
        try:
            actual = device_size(fd)
            if size > actual and os.path.isfile(path):
                os.ftruncate(fd, size)
                actual = size
        except OSError as e:
            raise io_error(e, path, "sizing") from None
        if actual < L.META_BYTES:
            raise too_small(path, actual, 0) from None
        reason = "new"
    except Version1 as v:
        try:
            actual = device_size(fd)
        except OSError as e:
            raise io_error(e, path, "reading the size") from None
        if actual < v.size:
            raise shrunk(path, v.size, actual) from None
        reason = "upgrade_from_v1"
    try:
        sb = format_fd(fd, actual, region_bytes, log_bytes)
    except OSError as e:
        raise io_error(e, path, "formatting") from None
    _log.info("journal_formatted", path=str(path), size=actual, reason=reason,
              region_bytes=region_bytes, log_bytes=log_bytes, journal_id=f"{sb.journal_id:016x}")
    return load(fd, path)
