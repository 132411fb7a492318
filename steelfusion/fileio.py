"""Positioned file I/O that finishes the job: the one place that loops on short transfers.

``os.pwrite`` may write fewer bytes than asked (a signal, a full pipe of a
block device, a FUSE file system); ``os.pread`` returns fewer at end of file.
Every LUN, journal and cache file goes through these, so the loop is
written once; :func:`pwritev_all` is the gather form (many buffers, one
syscall), for the Edge's write log and cache.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Sequence
from typing import Any


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


_FALLOC_KEEP_SIZE = 0x01
_FALLOC_PUNCH_HOLE = 0x02
_BLKZEROOUT = 0x127F  # _IO(0x12, 127): zero a range of a block device (linux/fs.h)
_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTTY)
ZERO_CHUNK = 1 << 20


def _load_fallocate() -> Any:
    """libc's fallocate64 (Python's os.posix_fallocate cannot punch holes). The process's
    own symbols first: ``find_library`` would run ldconfig at import."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.fallocate64
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fn.restype = ctypes.c_int
    return fn


_fallocate: Any = _load_fallocate()


def deallocate(fd: int, offset: int, length: int) -> str:
    """Make ``length`` bytes at ``offset`` read as zeros, freeing their space where the file
    or device can (SBC-3 §4.7.3.4, LBPRZ). A file gets a hole (FALLOC_FL_PUNCH_HOLE, partial
    blocks zeroed); a block device BLKZEROOUT (the kernel unmaps where the device can);
    otherwise zeros are written. Returns how: ``punched``, ``zeroed-out`` or ``written``."""
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        try:
            fcntl.ioctl(fd, _BLKZEROOUT, struct.pack("=QQ", offset, length))
            return "zeroed-out"
        except OSError as e:
            if e.errno not in _NOT_SUPPORTED:
                raise
    elif _fallocate is not None:
        if _fallocate(fd, _FALLOC_PUNCH_HOLE | _FALLOC_KEEP_SIZE, offset, length) == 0:
            return "punched"
        err = ctypes.get_errno()
        if err not in _NOT_SUPPORTED:
            raise OSError(err, f"punching a hole at {offset}+{length}: {os.strerror(err)}")
    write_zeros(lambda data, off: pwrite_all(fd, data, off), offset, length)
    return "written"


def write_zeros(pwrite: Any, offset: int, length: int) -> None:
    """``pwrite(data, offset)`` zeros over the range, a MiB at a time."""
    zeros = memoryview(bytes(min(length, ZERO_CHUNK)))
    end = offset + length
    while offset < end:
        n = min(len(zeros), end - offset)
        pwrite(zeros[:n], offset)
        offset += n


def allocation(fd: int, offset: int, length: int) -> list[tuple[int, int, bool]]:
    """``(offset, length, mapped)`` extents covering the range, from SEEK_DATA/SEEK_HOLE
    (GET LBA STATUS, SBC-3 §5.6). A block device, or a file system that cannot say, is all
    mapped (never wrong: mapped only promises nothing about the contents)."""
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        return [(offset, length, True)]
    end = offset + length
    out: list[tuple[int, int, bool]] = []
    pos = offset
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: only a hole up to EOF
                return [(offset, length, True)]
            data = end
        if data > pos:
            out.append((pos, min(data, end) - pos, False))
            pos = min(data, end)
            continue
        hole = os.lseek(fd, pos, os.SEEK_HOLE)
        out.append((pos, min(hole, end) - pos, True))
        pos = min(hole, end)
    return out

