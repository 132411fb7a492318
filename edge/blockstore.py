"""The Edge blockstore: a write reserve (log of uncommitted writes) and a read cache.

DESIGN.md, write path step 1: a host write is stored as *uncommitted*, then
acknowledged; it is shipped in order to the primary Core and freed when the
Core acknowledges it (step 6). The part holding uncommitted data is the
*write reserve*; when it is full, host writes wait — never fail, never drop.

On disk, under the blockstore directory:

``wal/seg-<n>.wal``
    Segments of the write log. Each starts with a segment header and holds
    records, each a header with a CRC32C over header and data::

        struct seg_header { char magic[8] /* "SFWALSEG" */; uint32 version; uint32 crc; };
        struct record { char magic[4] /* "SFWR" */; uint16 version; uint16 flags;
                        uint64 gseq; uint32 lun; uint64 seq; uint64 offset; uint32 length;
                        uint32 crc /* over the 40 bytes before it, then the data */; };

    A segment is deleted once every record in it is committed. After any
    restart, even SIGKILL, the remaining records are replayed: those the Core
    already has are recognised by (stream, seq) and acknowledged at once, the
    rest are resent in order. Nothing acknowledged to a host is lost.
``state.json``
    The blockstore's stream id and per-LUN sequence leases (atomic replace).
``cache-<lun>.img`` / ``cache-<lun>.map``
    Sparse cache file per LUN and, after a clean shutdown only, the map of
    which regions it holds. After a crash the map is absent, so every region
    not rebuilt from the log is fetched from the Core again.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steelfusion import log
from steelfusion.atomic import atomic_write
from steelfusion.wire import crc32c

_log = log.get("blockstore")

SECTOR = 512
SEG_MAGIC = b"SFWALSEG"
SEG_HEADER = struct.Struct(">8sII")
REC_MAGIC = b"SFWR"
REC = struct.Struct(">4sHHQIQQII")
REC_VERSION = 1
SEG_BYTES = 64 << 20
SEQ_LEASE = 1 << 20
MEM_DATA_MAX = 64 << 20  # uncommitted data also kept in memory (for shipping) up to this

ABSENT, PARTIAL, FULL = 0, 1, 2


class BlockstoreError(Exception):
    """The blockstore's files are unusable (bad magic, wrong version, I/O error)."""


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
    data: bytes | None
    sent: bool = False


class WriteLog:
    """Append-only segmented log with CRC32C records and group-committed fdatasync."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.active_seg = 0
        self.active_fd = -1
        self.active_pos = 0
        self.fds: dict[int, int] = {}
        self.refs: dict[int, int] = {}  # segment -> uncommitted records in it
        self.unsynced: set[int] = set()
        self._sync_running: asyncio.Future[None] | None = None
        self._sync_again = False
        self.corrupt: list[str] = []

    def _path(self, seg: int) -> Path:
        return self.dir / f"seg-{seg:012d}.wal"

    def segments(self) -> list[int]:
        out = []
        for p in self.dir.glob("seg-*.wal"):
            try:
                out.append(int(p.stem[4:]))
            except ValueError:
                continue
        return sorted(out)

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
            if version != REC_VERSION:
                raise BlockstoreError(f"{self._path(seg)}: version {version}, this build reads "
                                      f"{REC_VERSION}")
            pos = SEG_HEADER.size
            while pos + REC.size <= len(raw):
                magic, ver, _flags, gseq, lun, seq, offset, length, crc = REC.unpack_from(raw, pos)
                end = pos + REC.size + length
                if magic != REC_MAGIC or ver != REC_VERSION or end > len(raw):
                    break
                data = raw[pos + REC.size:end]
                if crc32c(data, crc32c(raw[pos:pos + 40])) != crc:
                    break
                out.append((Record(gseq, lun, seq, offset, length, seg, pos + REC.size, None),
                            data))
                pos = end
            if pos != len(raw):
                what = f"segment {seg}: {len(raw) - pos} bytes after the last valid record"
                if last:
                    _log.warning("write_log_torn_tail", detail=what)
                else:
                    self.corrupt.append(what)
                    _log.error("write_log_corrupt", detail=what)
        return out

    def open_for_append(self) -> None:
        segs = self.segments()
        self.active_seg = (segs[-1] + 1) if segs else 1
        for seg in segs:
            if self.refs.get(seg, 0) == 0:  # nothing uncommitted left in it
                self._path(seg).unlink(missing_ok=True)
                self.refs.pop(seg, None)
                continue
            self.fds[seg] = os.open(self._path(seg), os.O_RDWR)
        self._new_segment(self.active_seg)

    def _new_segment(self, seg: int) -> None:
        fd = os.open(self._path(seg), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        head = SEG_MAGIC + REC_VERSION.to_bytes(4, "big")
        os.pwrite(fd, head + crc32c(head).to_bytes(4, "big"), 0)
        self.fds[seg] = fd
        self.refs.setdefault(seg, 0)
        self.active_seg, self.active_fd, self.active_pos = seg, fd, SEG_HEADER.size
        self.unsynced.add(seg)

    def append(self, gseq: int, lun: int, seq: int, offset: int,
               data: bytes | memoryview) -> tuple[int, int]:
        """Write one record with one syscall; returns (segment, data position)."""
        if self.active_pos >= SEG_BYTES:
            self._new_segment(self.active_seg + 1)
        head = REC.pack(REC_MAGIC, REC_VERSION, 0, gseq, lun, seq, offset, len(data), 0)[:40]
        crc = crc32c(data, crc32c(head))
        hdr = head + crc.to_bytes(4, "big")
        total = len(hdr) + len(data)
        n = os.pwritev(self.active_fd, [hdr, data], self.active_pos)
        if n != total:  # a short write on a regular file means the disk is full
            raise OSError(f"short write to the write log ({n} of {total} bytes)")
        pos = self.active_pos + len(hdr)
        self.active_pos += total
        self.unsynced.add(self.active_seg)
        return self.active_seg, pos

    def read(self, seg: int, pos: int, length: int) -> bytes:
        return os.pread(self.fds[seg], length, pos)

    def release(self, seg: int) -> None:
        left = self.refs[seg] - 1
        self.refs[seg] = left
        if left == 0 and seg != self.active_seg:
            fd = self.fds.pop(seg, None)
            if fd is not None:
                os.close(fd)
            self._path(seg).unlink(missing_ok=True)
            self.refs.pop(seg, None)
            self.unsynced.discard(seg)

    async def sync(self) -> None:
        """fdatasync every segment written since the last sync; concurrent callers share it.

        A caller arriving while a sync runs asks for one more pass and waits
        for it, so its writes are covered (group commit).
        """
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
                await loop.run_in_executor(None, _fdatasync_all, fds)
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
        """Sync and close; segments with nothing uncommitted (even the active one) go."""
        for seg, fd in self.fds.items():
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            if self.refs.get(seg, 0) == 0:
                self._path(seg).unlink(missing_ok=True)
        self.fds.clear()


def _fdatasync_all(fds: list[int]) -> None:
    for fd in fds:
        os.fdatasync(fd)


class RegionCache:
    """Sparse cache file of one LUN, valid region by region.

    Regions (``region`` bytes, 64 KiB by default) are ABSENT, FULL, or
    PARTIAL with a per-sector mask of what local writes put there. A read of
    a region not FULL fetches it from the Core and fills only the sectors no
    local write covers, so a cache fill never hides a newer local write.
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
        self.state = np.zeros(self.nregions, dtype=np.uint8)
        self.masks: dict[int, np.ndarray] = {}
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
        os.fdatasync(self.fd)
        body = np.packbits(self.state == FULL).tobytes()
        atomic_write(self.map_path, body + crc32c(body).to_bytes(4, "big"))

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        pos = offset
        while view:
            n = os.pwrite(self.fd, view, pos)
            view = view[n:]
            pos += n
        self.mark(offset, len(data))

    def mark(self, offset: int, length: int) -> None:
        """Record that local writes put valid data at [offset, offset+length)."""
        if length <= 0:
            return
        r0, r1 = offset // self.region, (offset + length - 1) // self.region
        first_full = r0 if offset % self.region == 0 else r0 + 1
        end = offset + length
        last_full = r1 if (end % self.region == 0 or end == self.size) else r1 - 1
        if first_full <= last_full:
            self.state[first_full:last_full + 1] = FULL
            for r in range(first_full, last_full + 1):
                self.masks.pop(r, None)
        for r in {r0, r1}:
            if first_full <= r <= last_full or self.state[r] == FULL:
                continue
            base = r * self.region
            s0 = max(offset, base) - base
            s1 = min(end, base + self.region, self.size) - base
            mask = self.masks.get(r)
            if mask is None:
                mask = self.masks[r] = np.zeros(self.sectors_per_region, dtype=bool)
            mask[s0 // SECTOR:(s1 + SECTOR - 1) // SECTOR] = True
            valid = (min(self.size - base, self.region) + SECTOR - 1) // SECTOR
            if mask[:valid].all():
                self.state[r] = FULL
                del self.masks[r]
            else:
                self.state[r] = PARTIAL

    def missing(self, offset: int, length: int) -> list[int]:
        """Regions a read of [offset, offset+length) must fetch first."""
        r0, r1 = offset // self.region, (offset + length - 1) // self.region
        idx = np.flatnonzero(self.state[r0:r1 + 1] != FULL)
        out = []
        end = offset + length
        for i in idx.tolist():
            r = r0 + i
            mask = self.masks.get(r)
            if mask is not None:
                base = r * self.region
                s0 = max(offset, base) - base
                s1 = min(end, base + self.region) - base
                if mask[s0 // SECTOR:(s1 + SECTOR - 1) // SECTOR].all():
                    continue
            out.append(r)
        return out

    def fill(self, r: int, data: bytes | memoryview) -> None:
        """Apply a region fetched from the Core, leaving locally written sectors alone."""
        if self.state[r] == FULL:
            return
        base = r * self.region
        mask = self.masks.pop(r, None)
        view = memoryview(data)
        if mask is None:
            os.pwrite(self.fd, view, base)
        else:
            n = len(view) // SECTOR
            hole = ~mask[:n]
            # runs of sectors not written locally: start/stop indices of True runs in `hole`
            edges = np.flatnonzero(np.diff(np.concatenate(([False], hole, [False])).astype(np.int8)))
            for s, e in zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True):
                os.pwrite(self.fd, view[s * SECTOR:e * SECTOR], base + s * SECTOR)
        self.state[r] = FULL

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def invalidate(self) -> None:
        self.state[:] = ABSENT
        self.masks.clear()

    def close(self, save: bool) -> None:
        if save:
            self.save_map()
        os.close(self.fd)


class Blockstore:
    """Write reserve + caches of one Edge; single-threaded, owned by the event loop."""

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
        self.committed_seq: dict[int, int] = dict.fromkeys(self.luns, 0)
        self.writes = 0
        self.bytes_written = 0
        self.commits = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._admitted = 0  # bytes admitted by reserve() and not yet appended
        self.on_append: Callable[[Record], None] | None = None
        self._replay()
        self.log.open_for_append()
        self._renew_leases(force=True)

    # -- state --------------------------------------------------------------------
    def _load_state(self) -> dict:
        try:
            st = json.loads(self.state_path.read_text())
            if not isinstance(st, dict) or not isinstance(st.get("stream"), int):
                raise BlockstoreError(f"{self.state_path}: malformed")
            return st
        except FileNotFoundError:
            return {"stream": random.SystemRandom().getrandbits(63) | 1, "lease": {}}
        except ValueError as e:
            raise BlockstoreError(f"{self.state_path}: unreadable: {e}") from None

    def _renew_leases(self, force: bool = False) -> None:
        """Persist sequence leases so numbers never go backwards after a restart."""
        changed = force
        for lun, nxt in self.next_seq.items():
            if nxt + 1 >= self.lease.get(lun, 0):
                self.lease[lun] = nxt + SEQ_LEASE
                changed = True
        if changed:
            self._save_state()

    def _save_state(self) -> None:
        atomic_write(self.state_path, json.dumps(
            {"version": 1, "stream": self.stream, "epoch": self.epoch,
             "lease": {str(k): v for k, v in self.lease.items()}}).encode())

    def see_epoch(self, epoch: int) -> None:
        """Remember the newest replication epoch seen, durably, before trusting that Core."""
        if epoch > self.epoch:
            self.epoch = epoch
            self._save_state()

    def _replay(self) -> None:
        records = self.log.replay()
        for rec, data in records:
            if rec.lun not in self.luns:
                _log.error("write_log_unknown_lun", lun=rec.lun, seq=rec.seq)
                continue
            cache = self.caches[rec.lun]
            if rec.offset + rec.length > cache.size:
                _log.error("write_log_out_of_range", lun=rec.lun, seq=rec.seq)
                continue
            cache.write(rec.offset, data)
            self._track(rec, data)
            self.next_seq[rec.lun] = max(self.next_seq[rec.lun], rec.seq + 1)
            self.gseq = max(self.gseq, rec.gseq)
        if records:
            _log.info("write_log_replayed", records=len(records),
                      uncommitted_bytes=self.uncommitted_bytes)

    def _track(self, rec: Record, data: bytes) -> None:
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
            raise

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

    def append(self, lun: int, offset: int, data: bytes | memoryview) -> Record:
        """Log a host write and put it in the cache; the caller then acknowledges it."""
        seq = self.next_seq[lun]
        self.next_seq[lun] = seq + 1
        if seq + 1 >= self.lease.get(lun, 0):
            self._renew_leases()
        self.gseq += 1
        seg, pos = self.log.append(self.gseq, lun, seq, offset, data)
        self._admitted = max(0, self._admitted - len(data))
        rec = Record(self.gseq, lun, seq, offset, len(data), seg, pos, None)
        self.caches[lun].write(offset, data)
        self._track(rec, bytes(data))
        self.writes += 1
        self.bytes_written += len(data)
        if self.on_append is not None:
            self.on_append(rec)
        return rec

    def data_of(self, rec: Record) -> bytes:
        return rec.data if rec.data is not None else self.log.read(rec.seg, rec.pos, rec.length)

    def commit(self, lun: int, seq: int) -> int:
        """The Core has every write of ``lun`` up to ``seq``: free them. Returns bytes freed."""
        q = self.pending.get(lun)
        if q is None:
            return 0
        freed = 0
        while q and q[0].seq <= seq:
            rec = q.popleft()
            freed += rec.length
            if rec.data is not None:
                self.mem_bytes -= rec.length
                rec.data = None
            self.log.release(rec.seg)
        if seq > self.committed_seq.get(lun, 0):
            self.committed_seq[lun] = seq
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
        """Make every acknowledged write durable on this Edge (SYNCHRONIZE CACHE, FUA)."""
        await self.log.sync()

    def close(self) -> None:
        self.log.close()
        for c in self.caches.values():
            c.close(save=True)
        self._renew_leases(force=True)

    def status(self) -> dict:
        return {
            "stream": f"{self.stream:016x}", "uncommitted_bytes": self.uncommitted_bytes,
            "reserve_bytes": self.reserve_bytes,
            "reserve_used_pct": round(100 * self.uncommitted_bytes / self.reserve_bytes, 2)
            if self.reserve_bytes else 0.0,
            "uncommitted_writes": sum(len(q) for q in self.pending.values()),
            "writers_waiting": len(self._waiters), "writes": self.writes,
            "bytes_written": self.bytes_written,
            "segments": len(self.log.fds), "corrupt": list(self.log.corrupt),
            "luns": {str(lun): {"next_seq": self.next_seq[lun],
                                "committed_seq": self.committed_seq.get(lun, 0),
                                "uncommitted_writes": len(self.pending[lun]),
                                "cached_regions": int((c.state == FULL).sum()),
                                "regions": c.nregions}
                     for lun, c in self.caches.items()},
        }
