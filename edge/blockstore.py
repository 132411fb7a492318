"""The Edge blockstore: a write reserve (log of uncommitted writes) and a read cache.

DESIGN.md, write path step 1: a host write is stored as *uncommitted*, then
acknowledged; it is shipped in order to the primary Core and freed when the
Core acknowledges it (step 6). The part holding uncommitted data is the
*write reserve*; when it is full, host writes wait — never fail, never drop.

Writes are batched: :meth:`Blockstore.append` only queues a record for the
log and its data for the cache; :meth:`Blockstore.drain` writes the queued
log records with as few syscalls as it can. The iSCSI target calls
``drain()`` before it sends any response, so a write is in the log (the page
cache, which survives SIGKILL) before it is acknowledged. The cache writes
are off that path: they go out at the next event-loop turn, or first thing
when anything reads a cache file (:meth:`Blockstore.write_caches`).

On disk, under the blockstore directory:

``wal/seg-<n>.wal``
    Segments of the write log. Each starts with a segment header and holds
    records, each a header with a CRC32C over header and data::

        struct seg_header { char magic[8] /* "SFWALSEG" */; uint32 version; uint32 crc; };
        struct record { char magic[4] /* "SFWR" */; uint16 version; uint16 flags;
                        uint64 gseq; uint32 lun; uint64 seq; uint64 offset; uint32 length;
                        uint32 crc /* over the 40 bytes before it, then the data */; };

    Version 2 (this build writes it): the record CRC starts from
    ``crc32c(uint64_be(n))`` instead of 0, ``n`` being the segment's number,
    and a segment that is full ends with a SEAL record (``flags`` bit 0,
    length 0). Segment files are recycled (below), so bytes after the last
    valid record may be records of the file's previous life; their CRC was
    seeded with another number, so they never replay. Replay of a sealed
    segment stops at the seal; a segment neither sealed nor last whose tail
    is invalid is reported as corrupt. A new file is preallocated, so a
    zeroed tail is normal. Version 1 (previous builds: CRC from 0, no seal)
    is still read, so an upgrade keeps the uncommitted writes.

    Once every record of a sealed segment is committed the file is renamed
    ``spare-<n>.wal`` (never replayed); up to :data:`SPARES_MAX` spares are
    kept and become the next segments (new header, then renamed), so log
    writes overwrite allocated blocks instead of growing a file; more are
    unlinked off the event loop. Before a segment is retired, the per-LUN
    committed seqs are persisted (state.json). After any restart, even
    SIGKILL, the remaining records are replayed, except those up to the
    persisted committed seq of their LUN (the Core has them; a newer write
    of the same sectors may have gone with a retired segment, so their data
    must not reach the cache). Replayed records the Core already has are
    recognised by (stream, seq) and acknowledged at once, the rest are
    resent in order. Nothing acknowledged to a host is lost.
``state.json``
    The blockstore's stream id, per-LUN sequence leases, newest Core epoch
    seen and per-LUN committed seqs (atomic replace; magic, format and CRC32C
    by :mod:`steelfusion.statefile`: a damaged file refuses the start).
``cache-<lun>.img`` / ``cache-<lun>.map``
    Sparse cache file per LUN and, after a clean shutdown only, the map of
    which regions it holds. After a crash the map is absent, so every region
    not rebuilt from the log is fetched from the Core again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from steelfusion import log, statefile
from steelfusion.atomic import atomic_write, fsync_dir
from steelfusion.wire import crc32c

_log = log.get("blockstore")

SECTOR = 512
SEG_MAGIC = b"SFWALSEG"
SEG_HEADER = struct.Struct(">8sII")
REC_MAGIC = b"SFWR"
REC = struct.Struct(">4sHHQIQQII")
REC_HEAD = struct.Struct(">4sHHQIQQI")  # REC without its crc: what the crc covers first
REC_VERSION = 2
REC_VERSIONS_READ = (1, 2)
FLAG_SEAL = 1
SEG_BYTES = 64 << 20
SPARES_MAX = 2
SEQ_LEASE = 1 << 20
MEM_DATA_MAX = 64 << 20  # uncommitted data also kept in memory (for shipping) up to this
QUEUE_BYTES_MAX = 16 << 20  # append drains by itself past this (a caller that forgot)


def _iov_max() -> int:
    """Buffers per pwritev: the system's limit (-1 means none given), at most 1024."""
    try:
        n = os.sysconf("SC_IOV_MAX")
    except (AttributeError, ValueError, OSError):
        n = -1
    return min(n, 1024) if n > 0 else 1024


IOV_MAX = _iov_max()

ABSENT, PARTIAL, FULL = 0, 1, 2


class BlockstoreError(Exception):
    """The blockstore's files are unusable (bad magic, wrong version, I/O error)."""


Data = bytes | memoryview


@dataclass(slots=True)
class Record:
    """One uncommitted write: where its data lies in the log, and maybe in memory."""

    gseq: int
    lun: int
    seq: int
    offset: int
    length: int
    seg: int
    pos: int  # offset of the data in the segment file
    data: Data | None
    sent: bool = False


class _Replayed(NamedTuple):
    version: int
    end: int  # where replay stopped: after the last valid record (or the seal)
    sealed: bool


def _seg_seed(seg: int) -> int:
    """Initial CRC of a version-2 segment's records: ties a record to one life of a file."""
    return crc32c(seg.to_bytes(8, "big"))


def _seg_header(version: int) -> bytes:
    head = SEG_MAGIC + version.to_bytes(4, "big")
    return head + crc32c(head).to_bytes(4, "big")


def _seal_record(seg: int) -> bytes:
    head = REC_HEAD.pack(REC_MAGIC, REC_VERSION, FLAG_SEAL, 0, 0, 0, 0, 0)
    return head + crc32c(head, _seg_seed(seg)).to_bytes(4, "big")


def _pwritev_all(fd: int, bufs: Sequence[Data], pos: int) -> None:
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


def _preallocate(fd: int, nbytes: int) -> None:
    """Allocate a segment's blocks up front, so log writes never grow the file."""
    if not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
            raise


def _close_unlink(fd: int, path: Path) -> None:
    try:
        os.close(fd)
        path.unlink(missing_ok=True)
    except OSError as e:
        _log.warning("write_log_unlink_failed", path=str(path), error=str(e))


class WriteLog:
    """Segmented log with CRC32C records, queued appends and group-committed fdatasync.

    :meth:`append` only queues; :meth:`drain` writes. Whatever reads the
    files or syncs them first calls ``drain_hook`` (the Blockstore's drain,
    which records a failure) while anything is queued.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.seg_bytes = SEG_BYTES
        self.active_seg = 0
        self.active_pos = 0
        self._seed = 0
        self.fds: dict[int, int] = {}
        self.refs: dict[int, int] = {}  # segment -> uncommitted records in it
        self.spares: list[tuple[int, int]] = []  # (old segment number, fd) of spare files
        self.unsynced: set[int] = set()
        self._dir_dirty = False  # a segment file was created or renamed since the last sync
        self._sync_running: asyncio.Future[None] | None = None
        self._sync_again = False
        self.corrupt: list[str] = []
        self.replayed: dict[int, _Replayed] = {}
        # the queue: buffers back to back, and runs (segment, file position, first buffer)
        self._iov: list[Data] = []
        self._runs: list[tuple[int, int, int]] = []
        self._release_after_drain: set[int] = set()
        self.drain_hook: Callable[[], None] = self.drain
        # Asked before a segment stops being replayed; False keeps it (see
        # Blockstore._persist_committed: its committed records must stay skipped).
        self.may_retire: Callable[[], bool] = lambda: True

    def _path(self, seg: int) -> Path:
        return self.dir / f"seg-{seg:012d}.wal"

    def _spare_path(self, seg: int) -> Path:
        return self.dir / f"spare-{seg:012d}.wal"

    def _numbers(self, prefix: str) -> list[int]:
        out = []
        for p in self.dir.glob(f"{prefix}-*.wal"):
            try:
                out.append(int(p.stem[len(prefix) + 1:]))
            except ValueError:
                continue
        return sorted(out)

    def segments(self) -> list[int]:
        return self._numbers("seg")

    def replay(self) -> list[tuple[Record, bytes]]:
        """Read every valid record of every segment, oldest first."""
        out: list[tuple[Record, bytes]] = []
        segs = self.segments()
        for i, seg in enumerate(segs):
            last = i == len(segs) - 1
            with open(self._path(seg), "rb") as f:
                raw = f.read()
            if len(raw) < SEG_HEADER.size:
                if not last:
                    self.corrupt.append(f"segment {seg}: truncated header")
                continue
            magic, version, crc = SEG_HEADER.unpack_from(raw)
            if magic != SEG_MAGIC or crc32c(raw[:12]) != crc:
                raise BlockstoreError(f"{self._path(seg)}: not a write-log segment (bad header)")
            if version not in REC_VERSIONS_READ:
                raise BlockstoreError(f"{self._path(seg)}: version {version}, this build reads "
                                      f"{', '.join(map(str, REC_VERSIONS_READ))}")
            seed = _seg_seed(seg) if version >= 2 else 0
            pos = SEG_HEADER.size
            sealed = False
            prev_gseq = out[-1][0].gseq if out else 0
            while pos + REC.size <= len(raw):
                magic, ver, flags, gseq, lun, seq, offset, length, crc = REC.unpack_from(raw, pos)
                end = pos + REC.size + length
                if magic != REC_MAGIC or ver != version or end > len(raw):
                    break
                data = raw[pos + REC.size:end]
                if crc32c(data, crc32c(raw[pos:pos + 40], seed)) != crc:
                    break
                pos = end
                if version >= 2 and flags & FLAG_SEAL:
                    sealed = True
                    break
                out.append((Record(gseq, lun, seq, offset, length, seg, pos - length, None),
                            data))
                prev_gseq = gseq
            self.replayed[seg] = _Replayed(version, pos, sealed)
            if sealed or pos == len(raw):
                continue
            what = f"segment {seg}: {len(raw) - pos} bytes after the last valid record"
            if not last:
                self.corrupt.append(what)
                _log.error("write_log_corrupt", detail=what)
            elif version < 2 or self._looks_torn(raw, pos, prev_gseq):
                _log.warning("write_log_torn_tail", detail=what)
            elif any(raw[pos:pos + REC.size]):
                # a recycled file: what follows is its previous life (or a torn record
                # that was never acknowledged, since its writer drained it first)
                _log.info("write_log_tail_ignored", segment=seg, bytes=len(raw) - pos)
        return out

    @staticmethod
    def _looks_torn(raw: bytes, pos: int, prev_gseq: int) -> bool:
        """A record header of this life (the next gseq) whose record is incomplete or bad."""
        if pos + REC.size > len(raw):
            return raw[pos:pos + 4] == REC_MAGIC
        magic, ver, _f, gseq, *_ = REC.unpack_from(raw, pos)
        return magic == REC_MAGIC and ver == REC_VERSION and gseq == prev_gseq + 1

    def open_for_append(self) -> None:
        """Keep segments with uncommitted records, recycle the rest, start a new segment."""
        segs = self.segments()
        spare_nums = self._numbers("spare")
        self.active_seg = max(segs + spare_nums, default=0) + 1
        for n in spare_nums:
            if len(self.spares) < SPARES_MAX:
                self.spares.append((n, os.open(self._spare_path(n), os.O_RDWR)))
            else:
                self._spare_path(n).unlink(missing_ok=True)
        for seg in segs:
            self.fds[seg] = os.open(self._path(seg), os.O_RDWR)
            if self.refs.get(seg, 0) == 0:  # nothing uncommitted left in it
                self._retire(seg, background=False)
        # Seal the previous last segment where its replay stopped, so that once
        # it is no longer last its tail is not mistaken for corruption.
        info = self.replayed.get(segs[-1]) if segs else None
        if info is not None and segs[-1] in self.fds and info.version >= 2 and not info.sealed:
            os.pwrite(self.fds[segs[-1]], _seal_record(segs[-1]), info.end)
            self.unsynced.add(segs[-1])
        self.refs.setdefault(self.active_seg, 0)
        self._seed = _seg_seed(self.active_seg)
        self.active_pos = SEG_HEADER.size
        self._create(self.active_seg)

    def _create(self, seg: int) -> int:
        """Open segment ``seg``'s file: a spare with a fresh header, else a preallocated file."""
        path = self._path(seg)
        if self.spares:
            old, fd = self.spares.pop(0)
            os.pwrite(fd, _seg_header(REC_VERSION), 0)
            os.rename(self._spare_path(old), path)
            if os.fstat(fd).st_size < self.seg_bytes:
                _preallocate(fd, self.seg_bytes)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.pwrite(fd, _seg_header(REC_VERSION), 0)
                _preallocate(fd, self.seg_bytes)
            except BaseException:
                os.close(fd)
                raise
        self.fds[seg] = fd
        self.unsynced.add(seg)
        self._dir_dirty = True
        return fd

    def _retire(self, seg: int, background: bool) -> None:
        """A segment with nothing uncommitted: becomes a spare, or goes (off the event loop)."""
        if not self.may_retire():
            return  # kept: replaying it is safe, only its disk space is not reused yet
        fd = self.fds.pop(seg, None)
        self.refs.pop(seg, None)
        self.unsynced.discard(seg)
        spare = self._spare_path(seg)
        try:
            os.rename(self._path(seg), spare)  # from now on never replayed
        except FileNotFoundError:
            if fd is not None:
                os.close(fd)
            return
        self._dir_dirty = True
        if fd is None:
            fd = os.open(spare, os.O_RDWR)
        if len(self.spares) < SPARES_MAX:
            self.spares.append((seg, fd))
            return
        loop = None
        if background:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        if loop is None:
            _close_unlink(fd, spare)
        else:
            loop.run_in_executor(None, _close_unlink, fd, spare)

    def append(self, gseq: int, lun: int, seq: int, offset: int, data: Data) -> tuple[int, int]:
        """Queue one record (no syscall); returns (segment, data position).

        A record never spans segments: one that would not fit with the seal
        after it starts the next segment (unless the segment is empty).
        """
        n = len(data)
        pos = self.active_pos
        if pos + n + 2 * REC.size > self.seg_bytes and pos > SEG_HEADER.size:
            self._roll()
            pos = self.active_pos
        head = REC_HEAD.pack(REC_MAGIC, REC_VERSION, 0, gseq, lun, seq, offset, n)
        crc = crc32c(data, crc32c(head, self._seed))
        iov = self._iov
        if not iov:
            self._runs.append((self.active_seg, pos, 0))
        iov.append(head + crc.to_bytes(4, "big"))
        iov.append(data)
        self.active_pos = pos + REC.size + n
        return self.active_seg, pos + REC.size

    def _roll(self) -> None:
        """Queue the active segment's seal and start the next one (its file opens at drain)."""
        old = self.active_seg
        if not self._iov:
            self._runs.append((old, self.active_pos, 0))
        self._iov.append(_seal_record(old))
        if self.refs.get(old, 0) == 0:
            self._release_after_drain.add(old)
        new = old + 1
        self.refs.setdefault(new, 0)
        self.active_seg, self.active_pos, self._seed = new, SEG_HEADER.size, _seg_seed(new)
        self._runs.append((new, SEG_HEADER.size, len(self._iov)))

    @property
    def queued(self) -> bool:
        return bool(self._iov)

    def drain(self) -> None:
        """Write every queued record: one pwritev per run of IOV_MAX buffers in one segment.

        Raises OSError; the queue is gone either way (the Blockstore then
        refuses all further work, see :meth:`Blockstore.drain`).
        """
        iov, runs = self._iov, self._runs
        if not iov:
            return
        self._iov, self._runs = [], []
        for i, (seg, pos, start) in enumerate(runs):
            end = runs[i + 1][2] if i + 1 < len(runs) else len(iov)
            fd = self.fds.get(seg)
            if fd is None:
                fd = self._create(seg)
            _pwritev_all(fd, iov if len(runs) == 1 else iov[start:end], pos)
            self.unsynced.add(seg)
        if self._release_after_drain:
            segs, self._release_after_drain = self._release_after_drain, set()
            for seg in sorted(segs):
                if self.refs.get(seg, 0) == 0 and seg != self.active_seg:
                    self._retire(seg, background=True)

    def read(self, seg: int, pos: int, length: int) -> bytes:
        if self._iov:
            self.drain_hook()
        return os.pread(self.fds[seg], length, pos)

    def release(self, seg: int) -> None:
        left = self.refs[seg] - 1
        self.refs[seg] = left
        if left == 0 and seg != self.active_seg:
            if any(run[0] == seg for run in self._runs):  # still has queued writes
                self._release_after_drain.add(seg)
            else:
                self._retire(seg, background=True)

    async def sync(self) -> None:
        """Drain, then fdatasync every segment written since the last sync; callers share it.

        A caller arriving while a sync runs asks for one more pass and waits
        for it, so its writes are covered (group commit).
        """
        if self._iov:
            self.drain_hook()
        if self._sync_running is not None:
            self._sync_again = True
            await asyncio.shield(self._sync_running)
            return
        loop = asyncio.get_running_loop()
        fut = self._sync_running = loop.create_future()
        try:
            while True:
                self._sync_again = False
                fds = [self.fds[s] for s in self.unsynced if s in self.fds]
                self.unsynced = set()
                directory = self.dir if self._dir_dirty else None
                self._dir_dirty = False
                await loop.run_in_executor(None, _fdatasync_all, fds, directory)
                if not self._sync_again:
                    break
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: the waiters see it through the shield
            raise
        finally:
            self._sync_running = None
            if not fut.done():
                fut.set_result(None)

    def close(self) -> None:
        """Sync and close (the caller drained); segments with nothing uncommitted become spares."""
        try:
            for seg in list(self.fds):
                os.fdatasync(self.fds[seg])
                if self.refs.get(seg, 0) == 0:
                    self._retire(seg, background=False)
        finally:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()
            for _, fd in self.spares:
                os.close(fd)
            self.spares.clear()


def _fdatasync_all(fds: list[int], directory: Path | None) -> None:
    for fd in fds:
        os.fdatasync(fd)
    if directory is not None:
        fsync_dir(directory)


class RegionCache:
    """Sparse cache file of one LUN, valid region by region.

    Regions (``region`` bytes, 64 KiB by default) are ABSENT, FULL, or
    PARTIAL with a per-sector mask of what local writes put there (an int,
    bit i = sector i). A read of a region not FULL fetches it from the Core
    and fills only the sectors no local write covers, so a cache fill never
    hides a newer local write.

    ``state`` is a numpy view of the bytearray ``_st``: one region is
    checked by indexing the bytearray (a plain int, no numpy call), many
    regions at once with numpy. :meth:`queue_write` defers the file write
    until ``drain_hook`` runs, which :meth:`read`, :meth:`fill`,
    :meth:`write` and :meth:`save_map` call first; the state is updated at
    once either way.
    """

    def __init__(self, path: Path, size: int, region: int) -> None:
        self.path = path
        self.size = size
        self.region = region
        self.sectors_per_region = region // SECTOR
        self.nregions = (size + region - 1) // region
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self.fd).st_size != size:
            os.ftruncate(self.fd, size)
        self._st = bytearray(self.nregions)
        self.state = np.frombuffer(self._st, dtype=np.uint8)
        self.masks: dict[int, int] = {}
        self._all_sectors = (1 << self.sectors_per_region) - 1
        self._q: list[tuple[int, Data]] = []
        self.drain_hook: Callable[[], None] = self.flush_queue
        self.map_path = path.with_suffix(".map")
        self._load_map()

    def _load_map(self) -> None:
        """Load the map saved by a clean shutdown, then remove it (a crash must not reuse it)."""
        try:
            raw = self.map_path.read_bytes()
        except FileNotFoundError:
            return
        self.map_path.unlink()
        body, crc = raw[:-4], int.from_bytes(raw[-4:], "big")
        if crc32c(body) != crc:
            _log.warning("cache_map_corrupt", path=str(self.map_path))
            return
        bits = np.unpackbits(np.frombuffer(body, dtype=np.uint8))[: self.nregions]
        if len(bits) == self.nregions:
            self.state[bits.astype(bool)] = FULL

    def save_map(self) -> None:
        if self._q:
            self.drain_hook()
        os.fdatasync(self.fd)
        body = np.packbits(self.state == FULL).tobytes()
        atomic_write(self.map_path, body + crc32c(body).to_bytes(4, "big"))

    def write(self, offset: int, data: Data) -> None:
        """Write now (replay, tests); after whatever is queued, so order holds."""
        if self._q:
            self.drain_hook()
        _pwritev_all(self.fd, [data], offset)
        self.mark(offset, len(data))

    def queue_write(self, offset: int, data: Data) -> None:
        """Mark now, write at the next drain; ``data`` must not change until then."""
        self._q.append((offset, data))
        self.mark(offset, len(data))

    @property
    def queued(self) -> int:
        return len(self._q)

    def flush_queue(self) -> None:
        """Write the queued writes in order; each contiguous run with one pwritev.

        If a write fails, the writes not known to be written stay queued, so
        every later read of this cache calls ``drain_hook`` (which then raises:
        the blockstore is failed) instead of returning older data.
        """
        q = self._q
        if not q:
            return
        self._q = []
        first = 0  # the queued write that starts the current run
        start = end = -1
        bufs: list[Data] = []
        try:
            for i, (off, data) in enumerate(q):
                if off != end:
                    if bufs:
                        _pwritev_all(self.fd, bufs, start)
                    bufs = []
                    first, start, end = i, off, off
                bufs.append(data)
                end += len(data)
            _pwritev_all(self.fd, bufs, start)
        except BaseException:
            self._q = q[first:] + self._q
            raise

    def mark(self, offset: int, length: int) -> None:
        """Record that local writes put valid data at [offset, offset+length)."""
        if length <= 0:
            return
        region = self.region
        r = offset // region
        base = r * region
        end = offset + length
        if end <= base + region and end <= self.size:  # fast path: inside one region
            st = self._st
            if st[r] == FULL:
                return
            if offset == base and (end == base + region or end == self.size):
                st[r] = FULL
                if self.masks:
                    self.masks.pop(r, None)
                return
            if base + region <= self.size:  # not the short last region
                s0 = (offset - base) // SECTOR
                bits = ((1 << ((end - base + SECTOR - 1) // SECTOR - s0)) - 1) << s0
                mask = self.masks.get(r, 0) | bits
                if mask == self._all_sectors:
                    st[r] = FULL
                    self.masks.pop(r, None)
                else:
                    st[r] = PARTIAL
                    self.masks[r] = mask
                return
        self._mark_span(offset, end)

    def _mark_span(self, offset: int, end: int) -> None:
        """mark() for any range: whole regions, then the partial first and last ones."""
        region = self.region
        st = self._st
        r0, r1 = offset // region, (end - 1) // region
        first_full = r0 if offset % region == 0 else r0 + 1
        last_full = r1 if (end % region == 0 or end == self.size) else r1 - 1
        if first_full <= last_full:
            st[first_full:last_full + 1] = bytes((FULL,)) * (last_full - first_full + 1)
            if self.masks:
                for r in range(first_full, last_full + 1):
                    self.masks.pop(r, None)
        for r in (r0,) if r0 == r1 else (r0, r1):
            if first_full <= r <= last_full or st[r] == FULL:
                continue
            base = r * region
            s0 = (max(offset, base) - base) // SECTOR
            s1 = (min(end, base + region, self.size) - base + SECTOR - 1) // SECTOR
            mask = self.masks.get(r, 0) | (((1 << (s1 - s0)) - 1) << s0)
            valid = (min(self.size - base, region) + SECTOR - 1) // SECTOR
            if mask == (1 << valid) - 1:
                st[r] = FULL
                self.masks.pop(r, None)
            else:
                st[r] = PARTIAL
                self.masks[r] = mask

    def _covered(self, r: int, offset: int, end: int) -> bool:
        """Local writes cover every sector of [offset, end) inside region ``r``."""
        mask = self.masks.get(r)
        if mask is None:
            return False
        base = r * self.region
        s0 = (max(offset, base) - base) // SECTOR
        s1 = (min(end, base + self.region) - base + SECTOR - 1) // SECTOR
        want = ((1 << (s1 - s0)) - 1) << s0
        return mask & want == want

    def missing(self, offset: int, length: int) -> list[int]:
        """Regions a read of [offset, offset+length) must fetch first."""
        if length <= 0:
            return []
        end = offset + length
        r0, r1 = offset // self.region, (end - 1) // self.region
        st = self._st
        if r0 == r1:
            s = st[r0]
            if s == FULL or (s == PARTIAL and self._covered(r0, offset, end)):
                return []
            return [r0]
        if st.count(FULL, r0, r1 + 1) == r1 - r0 + 1:
            return []
        idx = np.flatnonzero(self.state[r0:r1 + 1] != FULL)
        return [r0 + i for i in idx.tolist() if not self._covered(r0 + i, offset, end)]

    def fill(self, r: int, data: Data) -> None:
        """Apply a region fetched from the Core, leaving locally written sectors alone."""
        if self._st[r] == FULL:
            return
        if self._q:
            self.drain_hook()
        base = r * self.region
        mask = self.masks.pop(r, None)
        view = memoryview(data)
        if mask is None:
            _pwritev_all(self.fd, [view], base)
        else:
            n = len(view) // SECTOR
            s = 0
            while s < n:  # runs of sectors not written locally
                if mask >> s & 1:
                    s += 1
                    continue
                e = s + 1
                while e < n and not mask >> e & 1:
                    e += 1
                _pwritev_all(self.fd, [view[s * SECTOR:e * SECTOR]], base + s * SECTOR)
                s = e
        self._st[r] = FULL

    def read(self, offset: int, length: int) -> bytes:
        if self._q:
            self.drain_hook()
        return os.pread(self.fd, length, offset)

    def close(self, save: bool) -> None:
        """Save the map (clean shutdown) or drop what is queued (a failed blockstore)."""
        if save:
            self.save_map()
        self._q = []
        os.close(self.fd)


BLOCKSTORE_STATE_KIND = "blockstore-state"
BLOCKSTORE_STATE_FORMAT = 2  # format 1: a bare object with "version": 1 (migrated on load)


def _check_state(st: dict) -> None:
    """A ``state.json`` body that passed its CRC but cannot be right (a bug, a hand edit)."""
    stream = st.get("stream")
    if not isinstance(stream, int) or isinstance(stream, bool) or not 0 < stream < 1 << 63:
        raise ValueError(f"stream {stream!r} is not a stream id")
    epoch = st.get("epoch", 0)
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise ValueError(f"epoch {epoch!r} is not a whole number")
    for key in ("lease", "committed"):
        m = st.get(key, {})
        if not isinstance(m, dict) or not all(
                k.isdigit() and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                for k, v in m.items()):
            raise ValueError(f"{key} {m!r} is not a map of LUN -> sequence number")


def _legacy_state(st: dict) -> dict:
    """Format 1 (``{"version": 1, "stream": ...}``, no magic, no CRC) -> format 2."""
    if st.get("version", 1) != 1:
        raise ValueError(f"version {st.get('version')!r} without a magic (corrupt)")
    return {k: v for k, v in st.items() if k != "version"}


class Blockstore:
    """Write reserve + caches of one Edge; single-threaded, owned by the event loop.

    Contract of the write path: :meth:`append` queues; the caller (the iSCSI
    target) calls :meth:`drain` before it sends any response, so a write is
    in the log before it is acknowledged. The cache writes are not on that
    path: they go out at the next event-loop turn (:meth:`write_caches`),
    or earlier when anything reads a cache file. Everything that reads the
    log or a cache file, or syncs, writes what it depends on first, so
    nothing observes stale data.
    """

    def __init__(self, directory: str | Path, luns: dict[int, int], reserve_bytes: int,
                 region_bytes: int = 64 << 10) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        if region_bytes % SECTOR or region_bytes <= 0:
            raise BlockstoreError(f"cache region {region_bytes} is not a multiple of {SECTOR}")
        self.reserve_bytes = reserve_bytes
        self.luns = dict(luns)
        self.state_path = self.dir / "state.json"
        st = self._load_state()
        self.stream: int = st["stream"]
        self.epoch: int = int(st.get("epoch", 0))  # newest Core epoch seen (stale primaries refused)
        self.lease: dict[int, int] = {int(k): v for k, v in st.get("lease", {}).items()}
        self.next_seq: dict[int, int] = {lun: self.lease.get(lun, 0) + 1 for lun in self.luns}
        self.log = WriteLog(self.dir / "wal")
        self.caches = {lun: RegionCache(self.dir / f"cache-{lun}.img", size, region_bytes)
                       for lun, size in self.luns.items()}
        self.pending: dict[int, deque[Record]] = {lun: deque() for lun in self.luns}
        self.uncommitted_bytes = 0
        self.mem_bytes = 0
        self.gseq = 0
        # Per LUN, the newest seq the Core has. The persisted copy is written
        # before any segment is retired; replay skips records up to it.
        saved = st.get("committed", {})
        self._committed_saved: dict[int, int] = {lun: int(saved.get(str(lun), 0))
                                                 for lun in self.luns}
        self.committed_seq: dict[int, int] = dict(self._committed_saved)
        self.writes = 0
        self.bytes_written = 0
        self.commits = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._admitted = 0  # bytes admitted by reserve() and not yet appended
        self.on_append: Callable[[Record], None] | None = None
        self._queued_writes = 0
        self._queued_bytes = 0
        self._drain_scheduled = False
        self._drain_deferred = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failed: BaseException | None = None
        self._replay()
        self.log.may_retire = self._persist_committed
        self.log.open_for_append()
        self.log.drain_hook = self.drain
        for c in self.caches.values():
            c.drain_hook = self.write_caches
        self._renew_leases(force=True)

    # -- state --------------------------------------------------------------------
    def _load_state(self) -> dict:
        """``state.json`` (steelfusion/statefile.py); a damaged one refuses the start.

        Without its committed seqs, replay could put old data in the cache;
        without its leases, sequence numbers could go backwards. A file from
        before the envelope (``"version": 1``, no magic) is migrated once.
        """
        remedy = (f"restore it from a backup, or, accepting that writes the Core has not "
                  f"committed are lost, move {self.dir} away and start with an empty "
                  "blockstore (the Edge fetches every region from the Core again)")
        try:
            st = statefile.load(self.state_path, BLOCKSTORE_STATE_KIND, BLOCKSTORE_STATE_FORMAT,
                                remedy=remedy, check=_check_state, legacy=_legacy_state)
        except statefile.StateFileError as e:
            raise BlockstoreError(str(e)) from None
        if st is None:
            return {"stream": random.SystemRandom().getrandbits(63) | 1, "lease": {}}
        return st

    def _renew_leases(self, force: bool = False) -> None:
        """Persist sequence leases so numbers never go backwards after a restart."""
        changed = force
        for lun, nxt in self.next_seq.items():
            if nxt + 1 >= self.lease.get(lun, 0):
                self.lease[lun] = nxt + SEQ_LEASE
                changed = True
        if changed:
            self._save_state()

    def _save_state(self, committed: dict[int, int] | None = None) -> None:
        committed = self._committed_saved if committed is None else committed
        atomic_write(self.state_path, statefile.encode(
            BLOCKSTORE_STATE_KIND, BLOCKSTORE_STATE_FORMAT,
            {"stream": self.stream, "epoch": self.epoch,
             "lease": {str(k): v for k, v in self.lease.items()},
             "committed": {str(k): v for k, v in committed.items()}}))

    def _persist_committed(self) -> bool:
        """Persist committed seqs before a segment is retired (``WriteLog.may_retire``).

        A retired segment's records never replay, but older committed
        records of the same sectors may survive in a segment kept alive by
        another uncommitted record; replaying those would put old data in
        the cache. With the seqs on disk first, replay skips every record
        the Core has, so the sectors it alone wrote are fetched from the
        Core. One atomic write per retired segment at most, none per write.
        False (logged) keeps the segment: replaying it all is safe.
        """
        now = {lun: min(c, self.next_seq[lun] - 1) for lun, c in self.committed_seq.items()
               if lun in self.next_seq}  # never past what was appended
        if now == self._committed_saved:
            return True
        try:
            self._save_state(now)
        except OSError as e:
            _log.error("committed_seq_save_failed", error=str(e))
            return False
        self._committed_saved = now
        return True

    def see_epoch(self, epoch: int) -> None:
        """Remember the newest replication epoch seen, durably, before trusting that Core."""
        if epoch > self.epoch:
            self.epoch = epoch
            self._save_state()

    def _replay(self) -> None:
        """Track the records the Core may lack and put their data in the cache.

        Records up to the persisted committed seq of their LUN are skipped:
        the Core has them, and a newer write of theirs may be gone with a
        retired segment. Every record replayed is newer than every retired
        one of its LUN, and every newer record of its LUN survives, so the
        cache ends up with the newest data of every sector it marks.
        """
        records = self.log.replay()
        committed = self._committed_saved
        skipped = 0
        for rec, data in records:
            if rec.lun not in self.luns:
                _log.error("write_log_unknown_lun", lun=rec.lun, seq=rec.seq)
                continue
            cache = self.caches[rec.lun]
            if rec.offset + rec.length > cache.size:
                _log.error("write_log_out_of_range", lun=rec.lun, seq=rec.seq)
                continue
            self.next_seq[rec.lun] = max(self.next_seq[rec.lun], rec.seq + 1)
            self.gseq = max(self.gseq, rec.gseq)
            if rec.seq <= committed[rec.lun]:
                skipped += 1
                continue
            cache.write(rec.offset, data)
            self._track(rec, data)
        if records:
            _log.info("write_log_replayed", records=len(records) - skipped,
                      committed_skipped=skipped, uncommitted_bytes=self.uncommitted_bytes)

    def _track(self, rec: Record, data: Data) -> None:
        if self.mem_bytes + rec.length <= MEM_DATA_MAX:
            rec.data = data
            self.mem_bytes += rec.length
        self.pending[rec.lun].append(rec)
        self.uncommitted_bytes += rec.length
        self.log.refs[rec.seg] = self.log.refs.get(rec.seg, 0) + 1

    # -- the write reserve ---------------------------------------------------------
    async def reserve(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more fit in the write reserve (FIFO, never fails)."""
        if not self._waiters and self._fits(nbytes):
            self._admitted += nbytes
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((nbytes, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._admitted = max(0, self._admitted - nbytes)
                self._wake()
            else:
                with contextlib.suppress(ValueError):  # no longer waiting (status counts it)
                    self._waiters.remove((nbytes, fut))
                self._wake()  # it may have been the head of the queue holding others back
            raise

    def try_reserve(self, nbytes: int) -> bool:
        """:meth:`reserve` without waiting: True (admitted) only if it fits now
        and nobody is queued ahead (FIFO)."""
        if self._waiters or not self._fits(nbytes):
            return False
        self._admitted += nbytes
        return True

    def _fits(self, nbytes: int) -> bool:
        used = self.uncommitted_bytes + self._admitted
        return used + nbytes <= self.reserve_bytes or used == 0

    def unreserve(self, nbytes: int) -> None:
        """Give back an admission whose write was never appended."""
        self._admitted = max(0, self._admitted - nbytes)
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.cancelled():
                self._waiters.popleft()
                continue
            if not self._fits(n):
                return
            self._waiters.popleft()
            self._admitted += n
            fut.set_result(None)

    @property
    def writers_waiting(self) -> int:
        return len(self._waiters)

    # -- the write path --------------------------------------------------------------
    def append(self, lun: int, offset: int, data: bytes | bytearray | memoryview) -> Record:
        """Queue a host write for the log and the cache; no syscall here.

        The Record (seq, gseq), the reserve accounting, ``on_append`` and the
        cache state (``missing()``) are all current on return, but the write
        is acknowledgeable only after :meth:`drain` returns. ``data`` is kept
        without a copy when it cannot change (see :func:`_keep`).
        """
        if self.failed is not None:
            raise self._failed_error()
        if self._queued_bytes >= QUEUE_BYTES_MAX:
            self.write_caches()
        n = len(data)
        kept = data if isinstance(data, bytes) else _keep(data)
        cache = self.caches[lun]
        seq = self.next_seq[lun]
        self.next_seq[lun] = seq + 1
        if seq + 1 >= self.lease.get(lun, 0):
            self._renew_leases()
        self.gseq += 1
        seg, pos = self.log.append(self.gseq, lun, seq, offset, kept)
        cache.queue_write(offset, kept)
        if self._admitted:
            self._admitted = max(0, self._admitted - n)
        rec = Record(self.gseq, lun, seq, offset, n, seg, pos, None)
        self._track(rec, kept)
        self.writes += 1
        self.bytes_written += n
        if not self._queued_writes and not self._drain_scheduled:
            self._schedule_drain()
        self._queued_writes += 1
        self._queued_bytes += n
        if self.on_append is not None:
            self.on_append(rec)
        return rec

    @property
    def pending_writes(self) -> int:
        """Writes appended and not yet drained (not acknowledgeable yet)."""
        return self._queued_writes

    def drain(self) -> None:
        """Write the queued log records: all an acknowledgement needs.

        Call it before acknowledging any appended write. The cache writes
        stay queued (see :meth:`write_caches`): after a crash the cache is
        rebuilt from the log anyway. If it raises (BlockstoreError wrapping
        the OSError, e.g. ENOSPC or EIO), none of the writes appended since
        the last successful drain may be acknowledged (some may be on disk,
        which a failed write allows), and the blockstore is failed: every
        later append(), drain() and read of a cache with queued writes
        raises BlockstoreError until the Edge restarts and replays its log.
        """
        if self.failed is not None:
            raise self._failed_error()
        if not self._queued_writes and not self.log.queued:
            return
        try:
            self.log.drain()
        except OSError as e:
            self._fail(e, "log")
            raise self._failed_error() from e
        finally:
            self._queued_writes = 0

    def write_caches(self) -> None:
        """Drain, then write the queued cache writes (next loop turn, or before a cache read).

        Draining first keeps the cache files from holding data the log lacks.
        An OSError here comes after the hosts were acknowledged: the data is
        safe in the log, but this cache file is not, so the blockstore fails
        as in :meth:`drain`, and the cache keeps what it could not write
        queued, so its reads raise instead of returning older data.
        """
        self.drain()
        try:
            for c in self.caches.values():
                if c._q:
                    c.flush_queue()
        except OSError as e:
            self._fail(e, "cache")
            raise self._failed_error() from e
        self._queued_bytes = 0

    def _fail(self, e: OSError, what: str) -> None:
        self.failed = e
        _log.error("blockstore_failed", error=str(e), file=what,
                   writes_lost=self._queued_writes if what == "log" else 0)

    def _failed_error(self) -> BlockstoreError:
        return BlockstoreError(f"blockstore failed, restart needed: {self.failed}")

    def _schedule_drain(self) -> None:
        """Write the cache writes at the next loop turn, once per batch; also a drain backstop.

        The contract is still that the caller drains before acknowledging;
        this puts the cache writes after the responses and bounds how long
        queued writes stay in memory.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._drain_scheduled = True
        self._loop = loop
        loop.call_soon(self._drain_soon)

    def _drain_soon(self) -> None:
        if self._queued_writes and not self._drain_deferred and self._loop is not None:
            # Not drained yet: the caller's barrier, scheduled after this callback
            # in the same turn (a task's response), goes first; we run one turn later.
            self._drain_deferred = True
            self._loop.call_soon(self._drain_soon)
            return
        self._drain_scheduled = self._drain_deferred = False
        if self.failed is None:
            try:
                self.write_caches()
            except BlockstoreError:
                pass  # logged by _fail(); every later call reports it

    def data_of(self, rec: Record) -> Data:
        return rec.data if rec.data is not None else self.log.read(rec.seg, rec.pos, rec.length)

    def commit(self, lun: int, seq: int) -> int:
        """The Core has every write of ``lun`` up to ``seq``: free them. Returns bytes freed.

        A segment still holding queued records is recycled only after the
        drain that writes them (so no write ever lands in a reused file).
        ``committed_seq`` moves first: a segment retired below persists it.
        """
        q = self.pending.get(lun)
        if q is None:
            return 0
        if seq > self.committed_seq.get(lun, 0):
            self.committed_seq[lun] = seq
        freed = 0
        while q and q[0].seq <= seq:
            rec = q.popleft()
            freed += rec.length
            if rec.data is not None:
                self.mem_bytes -= rec.length
                rec.data = None
            self.log.release(rec.seg)
        if freed:
            self.uncommitted_bytes -= freed
            self.commits += 1
            self._wake()
        return freed

    def uncommitted(self) -> list[Record]:
        """Every uncommitted record, in the order the hosts' writes were acknowledged."""
        out = [r for q in self.pending.values() for r in q]
        out.sort(key=lambda r: r.gseq)
        return out

    async def flush(self) -> None:
        """Make every acknowledged write durable on this Edge (SYNCHRONIZE CACHE, FUA).

        Drains first, so it also covers writes appended and not yet drained.
        """
        self.drain()
        await self.log.sync()

    def close(self) -> None:
        """Write all, sync and close; a failed blockstore saves no cache map (it is not trusted)."""
        err: BlockstoreError | None = None
        if self.failed is None:
            try:
                self.write_caches()
            except BlockstoreError as e:
                err = e
        try:
            self.log.close()
        finally:
            for c in self.caches.values():
                c.close(save=self.failed is None)
        self._renew_leases(force=True)
        if err is not None:
            raise err

    def status(self) -> dict:
        return {
            "stream": f"{self.stream:016x}", "uncommitted_bytes": self.uncommitted_bytes,
            "reserve_bytes": self.reserve_bytes,
            "reserve_used_pct": round(100 * self.uncommitted_bytes / self.reserve_bytes, 2)
            if self.reserve_bytes else 0.0,
            "uncommitted_writes": sum(len(q) for q in self.pending.values()),
            "pending_writes": self._queued_writes,
            "writers_waiting": len(self._waiters), "writes": self.writes,
            "bytes_written": self.bytes_written,
            "segments": len(self.log.fds), "spare_segments": len(self.log.spares),
            "corrupt": list(self.log.corrupt),
            "failed": str(self.failed) if self.failed is not None else None,
            "luns": {str(lun): {"next_seq": self.next_seq[lun],
                                "committed_seq": self.committed_seq.get(lun, 0),
                                "uncommitted_writes": len(self.pending[lun]),
                                "cached_regions": c._st.count(FULL),
                                "regions": c.nregions}
                     for lun, c in self.caches.items()},
        }


def _keep(data: bytearray | memoryview) -> Data:
    """``data`` itself if it cannot change and pins little memory, else a copy.

    The iSCSI decoder hands out views into per-PDU buffers it never reuses
    (numpy-backed, see :mod:`steelfusion.membuf`);
    keeping such a view (its buffer at most about twice the record) saves a
    copy per host write. Anything else (a bytearray, a view of a big or
    shared buffer) is copied as before.
    """
    if type(data) is memoryview and data.c_contiguous and data.itemsize == 1:
        obj = data.obj
        if isinstance(obj, _KEEPABLE) and len(obj) <= 2 * len(data) + 4096:
            return data
    return bytes(data)


_KEEPABLE = (bytes, bytearray, np.ndarray)
