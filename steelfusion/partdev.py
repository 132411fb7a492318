"""One fixed part of a LUN: how the two Cores of an HA pair share one Journal LUN (issue 16).

Seed 002, "FusionSync and Core HA": "both data centers use one Journal LUN per data center
shared by the HA pair". Each Core keeps its own journal in its own part of that LUN:
``<device path>#part=K/N`` (:func:`steelfusion.blockdev.parse_part`) is the K-th of N equal
parts of a file, a block device or an ``iscsi://`` SAN LUN.

The parts never move, because where they lie is recorded on the LUN itself:

* its first MiB (``TABLE_BYTES``) is a part table, one 4 KiB block that says N and the part
  length (CRC32C); part K starts at ``TABLE_BYTES + (K-1) * part_len``;
* until the table is written, ``part_len`` is ``(size - 1 MiB) // N`` rounded down to a MiB,
  from the LUN's size at open; the table is written and synced before the first write
  through any part, and every later open uses the recorded length. So growing the LUN never
  grows a part (a journal on a part keeps its size) and never moves one. Computed afresh at
  each open, part 2 of a grown LUN would start elsewhere: its journal would find zeros
  there, be formatted as new and forget which regions need a resync;
* a LUN whose first block is neither zeros nor a part table (a journal of the whole LUN, a
  file system) is refused, and so is a table for another N: Cores configured with
  ``#part=1/2`` and ``#part=2/3`` would overlap.

Every call is range-checked: an access outside the part is ``OSError(EINVAL)`` naming the
part, so no bug can write into the partner Core's journal.

``lock`` on a file or block device is an open-file-description lock (``F_OFD_SETLK``) over
the part's own bytes only: the pair's two parts of one file do not refuse each other, the
same part opened twice does. A POSIX ``lockf`` would not refuse a second open in the same
process, and closing any descriptor of the file would drop it. On a SAN LUN ``lock`` does
nothing, as :meth:`steelfusion.sandev.IscsiDevice.lock`: fencing uses persistent
reservations, which cover the whole LUN (``pr_*`` and ``fenced`` go to the LUN's device).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
from collections.abc import Sequence
from typing import Any

from crc32c import crc32c

from steelfusion import log
from steelfusion.blockdev import Device, DeviceBusy, FileDevice, is_san

MIB = 1 << 20
TABLE_BYTES = MIB  # the part table's room at the start of the LUN (keeps parts MiB-aligned)
TABLE_BLOCK = 4096  # what is read and written of it: whole blocks for any array
TABLE_MAGIC = b"SFPARTS1"
TABLE_VERSION = 1
# magic, version, parts (N), part_len, first part's offset, LUN size when split, CRC32C
TABLE = struct.Struct(">8sIIQQQI")
# struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid (+ padding to 32)
_FLOCK = struct.Struct("@hhqqi4x")

# What the Core and core.hahost use of a SAN LUN's device beyond the Device protocol.
FORWARDED = frozenset({"fenced", "pr_read_keys", "pr_read_reservation", "pr_register",
                       "pr_reserve", "pr_preempt", "remote"})

_log = log.get("partdev")


class PartError(OSError):
    """EINVAL that names the part: an access outside it."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EINVAL, message)


class PartTableError(PartError):
    """The LUN's first block says the parts lie otherwise (or it is not a part table)."""


def shown(path: str) -> str:
    """A path for messages: an iSCSI URL without its CHAP secret."""
    if is_san(path):
        from steelfusion.sandev import redact

        return redact(path)
    return path


def pack_table(n: int, part_len: int, lun_bytes: int) -> bytes:
    head = TABLE.pack(TABLE_MAGIC, TABLE_VERSION, n, part_len, TABLE_BYTES, lun_bytes, 0)
    return head[:-4] + struct.pack(">I", crc32c(head[:-4])) + bytes(TABLE_BLOCK - TABLE.size)


def unpack_table(block: bytes, where: str) -> tuple[int, int] | None:
    """``(n, part_len)`` from the LUN's first block; None if it is all zeros (not split yet)."""
    if not block.strip(b"\0"):
        return None
    magic, version, n, part_len, first, _lun_bytes, crc = TABLE.unpack_from(block)
    if magic != TABLE_MAGIC:
        raise PartTableError(f"{where}: the LUN does not start with a part table (it holds "
                             "other data, such as a journal of the whole LUN); it is not "
                             "split into parts - use it whole, or give the HA pair a blank LUN")
    if crc != crc32c(block[:TABLE.size - 4]):
        raise PartTableError(f"{where}: the LUN's part table is damaged (CRC mismatch)")
    if version != TABLE_VERSION or first != TABLE_BYTES or part_len % MIB:
        raise PartTableError(f"{where}: the LUN's part table is version {version} (first part "
                             f"at {first}); this build reads version {TABLE_VERSION}")
    return n, part_len


def _ofd_lock(fd: int, kind: int, start: int, length: int, *, wait: bool) -> None:
    cmd = fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK
    fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0))


class PartDevice:
    """Part ``k`` of ``n`` of an open :class:`~steelfusion.blockdev.Device` (see the module).

    Its size is fixed when the part table is recorded (at the first write through any part,
    from the LUN's size then): growing the LUN later does not grow the part.
    """

    def __init__(self, path: str, dev: Device, k: int, n: int, part_len: int,
                 recorded: bool, lun_bytes: int) -> None:
        self.path = path
        self._dev = dev
        self.k, self.n = k, n
        self.part_len = part_len
        self.offset = TABLE_BYTES + (k - 1) * part_len
        self.recorded = recorded  # the part table is on the LUN (else it is written first)
        self._lun_bytes = lun_bytes
        self._record_lock = threading.Lock()

    @classmethod
    def open(cls, path: str, dev: Device, k: int, n: int) -> PartDevice:
        """Wrap ``dev`` (already open on the base of ``path``); reads its part table."""
        where = f"part {k}/{n} of {shown(dev.path)}"
        lun_bytes = dev.size()
        table = unpack_table(dev.pread(TABLE_BLOCK, 0), where)
        if table is None:
            part_len = max(0, (lun_bytes - TABLE_BYTES) // n) // MIB * MIB
        elif table[0] != n:
            raise PartTableError(f"{where}: the LUN is split into {table[0]} parts (its part "
                                 f"table says so), not {n}; use #part=K/{table[0]}")
        else:
            part_len = table[1]
        part = cls(path, dev, k, n, part_len, table is not None, lun_bytes)
        _log.info("lun_part_opened", path=shown(path), offset=part.offset, part_len=part_len,
                  recorded=part.recorded)
        return part

    def where(self) -> str:
        return f"part {self.k}/{self.n} of {shown(self._dev.path)}"

    def _check(self, what: str, offset: int, length: int) -> int:
        """The LUN's offset for the part's ``offset``; EINVAL if it leaves the part."""
        if offset < 0 or length < 0 or offset + length > self.part_len:
            raise PartError(f"{self.where()}: a {what} at {offset} of {length} bytes is "
                            f"outside the part ({self.part_len} bytes)")
        return self.offset + offset

    def _record(self) -> None:
        """Write the part table before the first write (once per LUN: another part's Core
        may have done it already, and then it must say what this part assumed)."""
        if self.recorded:
            return
        with self._record_lock:
            if self.recorded:
                return
            fd = self._dev.fd if isinstance(self._dev, FileDevice) else None
            if fd is not None:  # the partner Core may be recording it right now
                _ofd_lock(fd, fcntl.F_WRLCK, 0, TABLE_BYTES, wait=True)
            try:
                table = unpack_table(self._dev.pread(TABLE_BLOCK, 0), self.where())
                if table is None:
                    self._dev.pwrite(pack_table(self.n, self.part_len, self._lun_bytes), 0)
                    self._dev.sync()
                    # read back: on a SAN LUN a partner's table may have landed meanwhile
                    table = unpack_table(self._dev.pread(TABLE_BLOCK, 0), self.where())
                    _log.info("lun_parts_recorded", path=shown(self._dev.path), parts=self.n,
                              part_len=self.part_len, lun_bytes=self._lun_bytes)
                if table != (self.n, self.part_len):
                    raise PartTableError(
                        f"{self.where()}: the LUN's part table (recorded meanwhile by the "
                        f"other Core) says {table}, not ({self.n}, {self.part_len}) as opened "
                        "(the LUN changed size in between); open it again")
            finally:
                if fd is not None:
                    _ofd_lock(fd, fcntl.F_UNLCK, 0, TABLE_BYTES, wait=False)
            self.recorded = True

    # -- Device ------------------------------------------------------------------------------
    def size(self) -> int:
        """The part's length, or less if the LUN has shrunk under it (the journal's alarm)."""
        return max(0, min(self.part_len, self._dev.size() - self.offset))

    def pread(self, length: int, offset: int) -> bytes:
        return self._dev.pread(length, self._check("read", offset, length))

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        at = self._check("write", offset, memoryview(data).nbytes)
        self._record()
        self._dev.pwrite(data, at)

    def pwritev(self, bufs: Sequence[bytes | memoryview], offset: int) -> None:
        at = self._check("write", offset, sum(memoryview(b).nbytes for b in bufs))
        self._record()
        self._dev.pwritev(bufs, at)

    def discard(self, offset: int, length: int) -> None:
        at = self._check("discard", offset, length)
        self._record()
        self._dev.discard(at, length)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        at = self._check("GET LBA STATUS", offset, length)
        return [(o - self.offset, ln, m) for o, ln, m in self._dev.extents(at, length)]

    def allocated(self) -> int | None:
        if self._dev.allocated() is None:
            return None
        return sum(ln for _o, ln, m in self.extents(0, self.size()) if m)

    def sync(self) -> None:
        self._dev.sync()

    def lock(self) -> None:
        """This part only, against every other open of it (see the module docstring)."""
        if not isinstance(self._dev, FileDevice) or self.part_len == 0:
            return  # a SAN LUN: as IscsiDevice.lock; an empty part: nothing to hold
        try:
            _ofd_lock(self._dev.fd, fcntl.F_WRLCK, self.offset, self.part_len, wait=False)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise DeviceBusy(errno.EBUSY, f"{self.where()} is in use") from None
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise  # a file system without locks: nothing to hold, nothing to refuse

    def trouble(self) -> str | None:
        return self._dev.trouble()

    def close(self) -> None:
        self._dev.close()

    def __getattr__(self, name: str) -> Any:
        """The SAN LUN's own attributes the Core uses (fencing covers the whole LUN)."""
        if name in FORWARDED:
            return getattr(self._dev, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
