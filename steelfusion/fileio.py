"""Positioned file I/O that finishes the job: the one place that loops on short transfers.

``os.pwrite`` may write fewer bytes than asked (a signal, a full pipe of a
block device, a FUSE file system); ``os.pread`` returns fewer at end of file.
Every LUN, journal and cache file goes through these two, so the loop is
written once.
"""

from __future__ import annotations

import os


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
