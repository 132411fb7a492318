"""Block backends behind the Edge's iSCSI target.

:class:`BlockBackend` is the one interface the SCSI layer (``edge.scsi``)
uses to reach storage; the Edge blockstore implements it, and
:class:`FileBackend` (a plain file or block device) serves tests and the
standalone target (``python -m edge.target``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from pathlib import Path
from typing import Protocol, runtime_checkable

from steelfusion.fileio import allocation, deallocate, pread_full, pwrite_all

NAA_COMPANY_ID = 0x0A5F1D
"""24-bit IEEE company id placed in our NAA-6 designators (SPC-4 §7.8.6.6.4).
An emulator value, not a registered one; only uniqueness per LUN matters."""


@runtime_checkable
class BlockBackend(Protocol):
    """A LUN's storage, as the SCSI layer sees it.

    Offsets and lengths are bytes, always multiples of ``block_size`` and
    inside ``size_bytes`` (``edge.scsi`` checks ranges before calling).
    ``write(..., fua=True)`` must not return before the data is durable
    (SBC-3 §5.28 FUA); ``flush`` makes all earlier writes durable
    (SYNCHRONIZE CACHE).  Raise :class:`BackendNotReady` when the data cannot
    be served now (sense NOT READY); any other exception becomes HARDWARE
    ERROR / INTERNAL TARGET FAILURE.
    """

    block_size: int
    size_bytes: int
    serial: str
    naa_id: bytes

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview: ...

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None: ...

    async def flush(self) -> None: ...


@runtime_checkable
class ThinBackend(Protocol):
    """Optional thin-provisioning hook (SBC-3 §4.7): ``edge.scsi`` uses it when a backend
    has it and emulates it otherwise (zeros written over what is not zero), so a plain
    :class:`BlockBackend` works too. ``unmap`` deallocates; afterwards the range must read
    as zeros (LBPRZ). The Edge's LUNs ship it to the Cores as a discard (issue 18)."""

    async def unmap(self, offset: int, length: int) -> None: ...


@runtime_checkable
class LbaStatusBackend(Protocol):
    """Optional: what is allocated, for GET LBA STATUS (emulated by zero-detection when a
    backend lacks it). ``lba_status`` returns ``(offset, length, mapped)`` extents covering
    at least the first byte asked for, in order."""

    async def lba_status(self, offset: int, length: int) -> list[tuple[int, int, bool]]: ...


class BackendNotReady(Exception):
    """The backend cannot serve this I/O now, e.g. its Core is unreachable for
    an uncached read.  Reported as sense 2/04/``ascq`` (LOGICAL UNIT NOT
    READY, SPC-4 Table 28; 0x00 = cause not reportable) so the initiator
    retries instead of failing the I/O."""

    def __init__(self, message: str = "backend not ready", ascq: int = 0x00) -> None:
        super().__init__(message)
        self.ascq = ascq


def make_naa(name: str) -> bytes:
    """A stable 16-byte NAA-6 (IEEE Registered Extended) identifier for
    ``name``: NAA=6, 24-bit company id, 100 bits from SHA-256 of the name
    (SPC-4 §7.8.6.6.4).  Windows clustering wants one in VPD 0x83."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:13], "big") & ((1 << 100) - 1)
    value = (6 << 124) | (NAA_COMPANY_ID << 100) | h
    return value.to_bytes(16, "big")


def make_serial(name: str) -> str:
    """A printable unit serial number (VPD 0x80) derived from ``name``."""
    return "SF" + hashlib.sha256(name.encode()).hexdigest()[:16].upper()


class FileBackend:
    """A LUN stored in a regular file or a block device.

    Small I/O (up to ``inline_io_max`` bytes) uses ``os.pread``/``os.pwrite``
    directly on the event loop: page-cache copies of a few pages are cheaper
    than a thread hop.  Larger I/O, and every ``fdatasync`` (flush, FUA), runs
    in a worker thread so the loop never stalls.
    """

    def __init__(self, path: str | os.PathLike[str], size_bytes: int | None = None, *,
                 block_size: int = 512, serial: str | None = None,
                 naa_id: bytes | None = None, create: bool = True,
                 inline_io_max: int = 128 * 1024) -> None:
        self.path = Path(path)
        self.block_size = block_size
        flags = os.O_RDWR | (os.O_CREAT if create else 0) | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(self.path, flags, 0o644)
        try:
            st = os.fstat(self._fd)
            if stat.S_ISBLK(st.st_mode):
                current = os.lseek(self._fd, 0, os.SEEK_END)
            else:
                current = st.st_size
                if size_bytes is not None and current < size_bytes:
                    os.ftruncate(self._fd, size_bytes)
                    current = size_bytes
            size = current if size_bytes is None else min(size_bytes, current)
        except BaseException:
            os.close(self._fd)
            raise
        self.size_bytes = size - size % block_size
        self._is_blk = stat.S_ISBLK(st.st_mode)
        name = str(self.path.resolve())
        self.serial = serial or make_serial(name)
        self.naa_id = naa_id or make_naa(name)
        self.inline_io_max = inline_io_max

    def _pread(self, offset: int, length: int) -> bytes:
        return pread_full(self._fd, length, offset)  # past EOF of a shrunken file: zeros

    def _pwrite(self, offset: int, data: bytes | memoryview) -> None:
        pwrite_all(self._fd, data, offset)

    async def read(self, offset: int, length: int) -> bytes:
        if length <= self.inline_io_max:
            return self._pread(offset, length)
        return await asyncio.to_thread(self._pread, offset, length)

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        if len(data) <= self.inline_io_max:
            self._pwrite(offset, data)
        else:
            await asyncio.to_thread(self._pwrite, offset, data)
        if fua:
            await asyncio.to_thread(os.fdatasync, self._fd)

    async def flush(self) -> None:
        await asyncio.to_thread(os.fdatasync, self._fd)

    def _punch(self, offset: int, length: int) -> None:
        """Deallocate (a hole in a file, BLKZEROOUT on a block device, else zeros)."""
        deallocate(self._fd, offset, length)

    async def unmap(self, offset: int, length: int) -> None:
        """UNMAP / WRITE SAME with UNMAP: punch a hole (SBC-3 §4.7.3.4)."""
        await asyncio.to_thread(self._punch, offset, length)

    def _extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return allocation(self._fd, offset, length)

    async def lba_status(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Mapped and deallocated extents from SEEK_DATA/SEEK_HOLE (at the
        filesystem's block granularity)."""
        return self._extents(offset, length)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
