"""Positioned file I/O that finishes the job: the one place that loops on short transfers.

``os.pwrite`` may write fewer bytes than asked (a signal, a full pipe of a
block device, a FUSE file system); ``os.pread`` returns fewer at end of file.
Every LUN, journal and cache file goes through these, so the loop is
written once; :func:`pwritev_all` is the gather form (many buffers, one
syscall), for the Edge's write log and cache.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (no copy: a memoryview walks the buffer)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def pread_full(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset``; past the end of a sparse file reads as zeros."""
    out = os.pread(fd, length, offset)
    if len(out) < length:
        parts = [out]
        got = len(out)
        while got < length:
            chunk = os.pread(fd, length - got, offset + got)
            if not chunk:
                parts.append(bytes(length - got))
                break
            parts.append(chunk)
            got += len(chunk)
        out = b"".join(parts)
    return out


def _iov_max() -> int:
    """Buffers per pwritev: the system's limit (-1 means none given), at most 1024."""
    try:
        n = os.sysconf("SC_IOV_MAX")
    except (AttributeError, ValueError, OSError):
        n = -1
    return min(n, 1024) if n > 0 else 1024


IOV_MAX = _iov_max()


def pwritev_all(fd: int, bufs: Sequence[bytes | memoryview], pos: int) -> None:
    """Write ``bufs`` back to back at ``pos``: IOV_MAX buffers a call, short writes resumed."""
    i = 0
    while i < len(bufs):
        chunk = bufs[i:i + IOV_MAX] if i or len(bufs) > IOV_MAX else bufs
        want = sum(map(len, chunk))
        n = os.pwritev(fd, chunk, pos)
        pos += n
        if n == want:
            i += len(chunk)
            continue
        if n <= 0:
            raise OSError(errno.EIO, f"pwritev wrote {n} of {want} bytes")
        for b in chunk:  # skip what was written whole; resume inside the partly written one
            if n < len(b):
                break
            n -= len(b)
            i += 1
        bufs = [memoryview(bufs[i])[n:], *bufs[i + 1:]]
        i = 0
