"""A Core's backend LUNs (sparse files or block devices) and their applied-sequence state.

Writes land with ``os.pwrite`` straight from the received frame (no copy) and
become durable in groups: one ``fdatasync`` in a worker thread covers every
write issued before it started (group commit), while the event loop goes on
issuing the next writes.

:class:`AppliedState` records, per LUN, the write stream and the highest
sequence number durably applied, so a write resent after a restart (by an
Edge, or by the primary to its replica) is recognised and not applied twice
out of order. Its file has fixed 32-byte slots, each with a CRC32C::

    struct slot { uint32 lun; uint32 flags; uint64 stream; uint64 seq; uint32 crc; uint32 pad; };

A slot is written, and made durable, after the data it covers is durable and
before any of that data is acknowledged (the group commit's worker does both,
see :attr:`LunStore.seal`): it never leads the data, and it never lags an
acknowledgement. The second half matters since the write stream carries
``prev`` (:mod:`core.pipeline`): a Core that forgot a write it acknowledged
would take the sender's next frame for a gap (the sender freed that write).
"""

from __future__ import annotations

import errno
import functools
import os
import struct
from collections.abc import Callable
from pathlib import Path

from steelfusion.blockdev import Device, create_file, is_san, open_device
from steelfusion.groupcommit import GroupCommit
from steelfusion.wire import crc32c

BLOCK = 512


class LunError(Exception):
    """A backend LUN cannot be opened, has the wrong size, or failed an I/O."""


def open_backend(path: str, size: int, create: bool = True) -> tuple[Device, int]:
    """Open (creating a sparse file if allowed) and return (device, size in bytes).

    ``path`` is a file, a block device or a SAN LUN (``iscsi://...``,
    :mod:`steelfusion.blockdev`). A device's size is its own; a file smaller
    than ``size`` is grown sparse only when it is new, otherwise it is an
    error (never silently resize someone's LUN).
    """
    if not is_san(path) and not Path(path).exists():
        if not create or size <= 0:
            raise LunError(f"backend {path} does not exist")
        p = Path(path)
        # Made whole beside it, then renamed: a failed grow (a LUN larger than the file
        # system allows) or a crash must not leave a 0-byte LUN that the next start
        # reports as the wrong size (issue 13).
        p.parent.mkdir(parents=True, exist_ok=True)  # its OSError names the configured path
        tmp = p.with_name(f".{p.name}.creating")
        tmp.unlink(missing_ok=True)
        try:
            new = create_file(tmp, size)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise LunError(f"cannot create backend {path} of {size} bytes: "
                           f"{e.strerror or e} (choose a smaller LUN or another file "
                           "system)") from None
        os.rename(tmp, p)
        new.path = str(p)
        return new, size
    dev = open_device(path)  # an OSError names the path: start-up matches it to its key
    try:
        actual = dev.size()
    except OSError:
        dev.close()
        raise
    if size and actual != size:
        dev.close()
        raise LunError(f"backend {path} is {actual} bytes, config says {size}")
    if actual <= 0 or actual % BLOCK:
        dev.close()
        raise LunError(f"backend {path} size {actual} is not a positive multiple of {BLOCK}")
    return dev, actual


class LunStore:
    """One backend LUN with group-committed durability (:class:`~steelfusion.groupcommit.GroupCommit`)."""

    def __init__(self, lun_id: int, path: str, size: int, create: bool = True) -> None:
        self.lun_id = lun_id
        self.path = path
        self.dev, self.size = open_backend(path, size, create)
        self.remote = is_san(path)  # reads wait on the array: the Core makes them off its loop
        # Every write issued is committed (eager); any exception is fail-stop, since a
        # bug in the seal or a listener must not end the group commit silently either,
        # with acknowledgements stopped and no alarm (issue 13).
        self._group: GroupCommit[Callable[[], object] | None, Exception] = GroupCommit(
            self._cut, self._write, fatal=Exception)
        self._group.on_failure(self._on_failed)
        self._failure_listeners: list[Callable[[OSError], None]] = []
        self.failed: OSError | None = None  # a sync failed: fail-stop (see CoreEngine)
        self.io_errors = 0
        # Called on the event loop as a group commit starts, with its target counter; what
        # it returns runs in the worker right after the data's fdatasync (the Core persists
        # the applied seq there, so it is durable before the listeners acknowledge anything).
        self.seal: Callable[[int], Callable[[], object] | None] | None = None

    @property
    def written(self) -> int:
        """Writes issued (a counter); the listeners hear which ones are durable."""
        return self._group.issued

    def on_durable(self, fn: Callable[[int], None]) -> None:
        self._group.on_durable(fn)

    def on_failure(self, fn: Callable[[OSError], None]) -> None:
        """``fn(error)`` once, when a sync fails; no durability is reported after it."""
        self._failure_listeners.append(fn)

    def check_range(self, offset: int, length: int) -> bool:
        return offset >= 0 and length >= 0 and offset + length <= self.size

    def pwrite(self, offset: int, data: bytes | memoryview) -> int:
        """Write now (page cache); return the write's counter for :meth:`sync`."""
        self.dev.pwrite(data, offset)
        return self._group.issue()

    def discard(self, offset: int, length: int) -> int:
        """Deallocate (a hole in a file, BLKZEROOUT, zeros on an array): the range reads
        zeros and frees its space where the device can (issue 18); a counter as pwrite."""
        self.dev.discard(offset, length)
        return self._group.issue()

    def pread(self, offset: int, length: int) -> bytes:
        return self.dev.pread(length, offset)

    def allocated(self) -> int | None:
        """Bytes the LUN takes on its storage (``coredr status``), None if the device cannot
        say (a block device, an array)."""
        return self.dev.allocated()

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """What is allocated over the range (an Edge's GET LBA STATUS, issue 18)."""
        return self.dev.extents(offset, length)

    def request_sync(self, force: bool = False) -> None:
        """Start a group commit unless one is running; it loops while writes keep coming.

        ``force``: one more commit even with no new write, so that the seal
        (the applied seq) is persisted and the listeners hear of it — the Core
        moves its applied seq without writing when a resync covers a stream.
        """
        self._group.request(force=force)

    def _cut(self, target: int) -> Callable[[], object] | None:
        return self.seal(target) if self.seal is not None else None

    def _write(self, after: Callable[[], object] | None) -> None:
        self._sync_job(after)  # looked up per commit: tests replace it to fail a sync

    def _sync_job(self, after: Callable[[], object] | None) -> None:
        self.dev.sync()
        if after is not None:
            after()

    def _on_failed(self, e: Exception) -> None:
        err = e if isinstance(e, OSError) else OSError(errno.EIO, f"group commit failed: {e!r}")
        self.io_errors += 1
        self.failed = err
        for fail in self._failure_listeners:
            fail(err)

    def close(self) -> None:
        try:
            self.dev.sync()
        finally:
            self.dev.close()


SLOT = struct.Struct(">IIQQII")
STATE_MAGIC = b"SFAPPLY1"
MAX_SLOTS = 4096


class AppliedState:
    """Per-LUN (stream, seq) high-water marks, one checksummed slot per LUN."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self.corrupt_slots = 0
        head = os.pread(self.fd, len(STATE_MAGIC), 0)
        if len(head) < len(STATE_MAGIC):
            if not STATE_MAGIC.startswith(head):
                # not a torn creation (a prefix of the magic): something else was here.
                # Starting over only lags (writes get re-applied in order), but say so.
                self.corrupt_slots = 1
            os.pwrite(self.fd, STATE_MAGIC.ljust(SLOT.size, b"\0"), 0)
            os.fsync(self.fd)
        elif head != STATE_MAGIC:
            raise LunError(f"{self.path}: not an applied-state file (bad magic); restore it, "
                           "or move it away (the Core then re-applies the writes it is sent)")
        self.slots: dict[int, int] = {}  # lun -> slot index
        self.values: dict[int, tuple[int, int]] = {}
        size = os.fstat(self.fd).st_size
        for i in range(1, min(size // SLOT.size, MAX_SLOTS + 1)):
            raw = os.pread(self.fd, SLOT.size, i * SLOT.size)
            lun, flags, stream, seq, crc, _ = SLOT.unpack(raw)
            if flags == 0:
                continue
            if crc32c(raw[:24]) != crc:
                self.corrupt_slots += 1  # lags at worst: the writes get re-applied in order
                continue
            self.slots[lun] = i
            self.values[lun] = (stream, seq)

    def get(self, lun: int) -> tuple[int, int]:
        return self.values.get(lun, (0, 0))

    def set(self, lun: int, stream: int, seq: int) -> None:
        """Write and sync the slot now (tests, tools); the Core runs :meth:`sealer` jobs."""
        job = self.sealer(lun, stream, seq)
        if job is not None:
            job()

    def sealer(self, lun: int, stream: int, seq: int) -> functools.partial[None] | None:
        """A job for a worker thread that makes (stream, seq) the durable slot of ``lun``.

        Slot bookkeeping happens here, on the caller's thread; the job only
        writes and syncs, so jobs of different LUNs may run at once.
        """
        if self.values.get(lun) == (stream, seq):
            return None
        idx = self.slots.get(lun)
        if idx is None:
            idx = len(self.slots) + 1
            if idx > MAX_SLOTS:
                raise LunError("too many LUNs for the applied-state file")
            self.slots[lun] = idx
        head = struct.pack(">IIQQ", lun, 1, stream, seq)
        self.values[lun] = (stream, seq)
        return functools.partial(self._write_sync, raw=head + struct.pack(">II", crc32c(head), 0),
                                 pos=idx * SLOT.size)

    def _write_sync(self, *, raw: bytes, pos: int) -> None:
        os.pwrite(self.fd, raw, pos)
        os.fdatasync(self.fd)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
