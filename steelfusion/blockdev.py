"""What a Core stores LUNs and its Journal LUN on: a file, a block device, or a SAN LUN.

SteelFusion's Core owns no disks. It projects LUNs that live on the data center's array,
and the Journal LUN is one more LUN there (seed 002). So a Core's LUN ``path`` and its
journal ``path`` may be:

* a file (the lab's default) or a block device, for example one that the host's open-iscsi
  made: :class:`FileDevice`;
* ``iscsi://[user%secret@]host:port/iqn/lun``, reached by the Core's own initiator
  (:mod:`steelfusion.iscsi.client`): :class:`steelfusion.sandev.IscsiDevice`;
* any of those with a ``#part=K/N`` suffix: the K-th of N fixed parts of it
  (:class:`steelfusion.partdev.PartDevice`). The two Cores of an HA pair share one Journal
  LUN per data center (seed 002, "FusionSync and Core HA"), each Core in its own part.

Both have the same small, blocking interface, which is what the LUN store and the journal
always did with a file descriptor. ``pwrite`` may only queue the write: an error shows up
at the next ``sync``, which returns once every earlier write is durable (fdatasync, or
SYNCHRONIZE CACHE after the writes completed). This is how the group commits already use
a file. Reads return the bytes, and a sparse file reads as zeros past its end.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from steelfusion.fileio import allocation, deallocate, pread_full, pwrite_all, pwritev_all

ISCSI_SCHEME = "iscsi://"
PART_SUFFIX = "#part="
PARTS_MAX = 16


class DeviceBusy(OSError):
    """Another process (or another open in this one) holds the device exclusively."""


class Device(Protocol):
    """A LUN's bytes: positioned reads and writes, durability on ``sync``."""

    path: str

    def size(self) -> int: ...

    def pread(self, length: int, offset: int) -> bytes: ...

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Whole 512-byte sectors at a sector offset (a SAN LUN takes nothing else)."""

    def pwritev(self, bufs: Sequence[bytes | memoryview], offset: int) -> None: ...

    def discard(self, offset: int, length: int) -> None:
        """The range reads zeros from now on, its space freed where the device can."""

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """``(offset, length, mapped)`` over the range: what is allocated (GET LBA STATUS)."""

    def allocated(self) -> int | None:
        """Bytes the LUN takes on its storage (a thin LUN's real use), None if unknown."""

    def sync(self) -> None: ...

    def lock(self) -> None:
        """Exclusive use by this process, or DeviceBusy."""

    def trouble(self) -> str | None:
        """Why the device cannot be reached right now (its I/O waits), or None.

        A SAN LUN whose session is down says so here: the Core raises an alarm
        while it lasts and acknowledges nothing that needs the LUN.
        """

    def close(self) -> None: ...


class FileDevice:
    """A file or block device through its descriptor."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd

    def size(self) -> int:
        st = os.fstat(self.fd)
        return os.lseek(self.fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size

    def pread(self, length: int, offset: int) -> bytes:
        return pread_full(self.fd, length, offset)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        pwrite_all(self.fd, data, offset)

    def pwritev(self, bufs: Sequence[bytes | memoryview], offset: int) -> None:
        pwritev_all(self.fd, bufs, offset)

    def discard(self, offset: int, length: int) -> None:
        deallocate(self.fd, offset, length)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return allocation(self.fd, offset, length)

    def allocated(self) -> int | None:
        st = os.fstat(self.fd)
        return st.st_blocks * 512 if stat.S_ISREG(st.st_mode) else None

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def fsync(self) -> None:
        """Data and metadata (a size just set by ``truncate``)."""
        os.fsync(self.fd)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def lock(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DeviceBusy(errno.EBUSY, f"{self.path} is in use") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise  # a file system without locks: nothing to hold, nothing to refuse

    def trouble(self) -> str | None:
        return None  # a local disk's errors come back from the call that met them

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(os.fstat(self.fd).st_mode)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def is_san(path: str | Path) -> bool:
    """An ``iscsi://`` URL, with or without a ``#part=K/N`` suffix."""
    return str(path).startswith(ISCSI_SCHEME)


def parse_part(path: str | Path) -> tuple[str, tuple[int, int] | None]:
    """``(base path, (k, n))`` for ``base#part=K/N``, ``(path, None)`` without a suffix.

    A ``#`` may be part of a file's name, so only a fragment that starts with ``part``
    is a suffix (and must then be well formed); an ``iscsi://`` URL has no other use for
    ``#``. Raises ValueError, saying what is wrong, for a bad suffix.
    """
    p = str(path)
    base, sep, frag = p.rpartition("#")
    if not sep or not (is_san(p) or frag.lower().startswith("part")):
        return p, None
    want = f"want {PART_SUFFIX}K/N with whole numbers 1 <= K <= N <= {PARTS_MAX}"
    if not frag.startswith(PART_SUFFIX[1:]):
        raise ValueError(f"bad suffix '#{frag}' on a device path: {want}")
    k_s, slash, n_s = frag[len(PART_SUFFIX) - 1:].partition("/")
    if not (slash and k_s.isascii() and k_s.isdigit() and n_s.isascii() and n_s.isdigit()):
        raise ValueError(f"bad part suffix '#{frag}': {want}")
    k, n = int(k_s), int(n_s)
    if not 1 <= n <= PARTS_MAX:
        raise ValueError(f"bad part suffix '#{frag}': N must be 1 to {PARTS_MAX} (got {n})")
    if not 1 <= k <= n:
        raise ValueError(f"bad part suffix '#{frag}': K must be 1 to N={n} (got {k})")
    if not base or base == ISCSI_SCHEME or (is_san(base) and "#" in base):
        raise ValueError(f"bad device path before '#{frag}': {want} after one device path")
    return base, (k, n)


def open_device(path: str | Path, *, readonly: bool = False) -> Device:
    """Open an existing file, block device or SAN LUN (FileNotFoundError if there is none),
    or a ``#part=K/N`` of one (:class:`steelfusion.partdev.PartDevice`)."""
    p, part = parse_part(path)
    if is_san(p):
        from steelfusion.sandev import IscsiDevice

        dev: Device = IscsiDevice.open(p)
    else:
        fd = os.open(p, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        dev = FileDevice(p, fd)
    if part is None:
        return dev
    from steelfusion.partdev import PartDevice

    try:
        return PartDevice.open(str(path), dev, *part)
    except BaseException:
        dev.close()
        raise


def create_file(path: str | Path, size: int, mode: int = 0o600) -> FileDevice:
    """A new sparse file of ``size`` bytes (FileExistsError if one is there). Never for a
    ``#part=K/N`` path: a part of a LUN that is not there cannot be made by creating one."""
    if parse_part(path)[1] is not None:
        raise ValueError(f"{path}: a part of a LUN is never created; the LUN "
                         f"{parse_part(path)[0]} must exist")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    dev = FileDevice(str(p), fd)
    try:
        dev.truncate(size)
    except OSError:
        dev.close()
        raise
    return dev
