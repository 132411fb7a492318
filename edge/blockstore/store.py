"""The Blockstore: the write log, the caches and the write reserve of one Edge, kept in step.

It owns what ties them together: sequence numbers and their leases, the
per-LUN committed seqs, which replayed records still count, the zero-copy
rule for a write's data, and when the cache writes go out. On disk, beside
``wal/`` (:mod:`edge.blockstore.wal`) and the cache files
(:mod:`edge.blockstore.cache`):

``state.json``
    The blockstore's stream id, per-LUN sequence leases, newest Core epoch
    seen and per-LUN committed seqs (atomic replace; magic, format and CRC32C
    by :mod:`steelfusion.statefile`: a damaged file refuses the start).
    Before a log segment is retired, the committed seqs are persisted here;
    after any restart, even SIGKILL, the remaining records are replayed,
    except those up to the persisted committed seq of their LUN (the Core
    has them; a newer write of the same sectors may have gone with a retired
    segment, so their data must not reach the cache). Replayed records the
    Core already has are recognised by (stream, seq) and acknowledged at
    once, the rest are resent in order. Nothing acknowledged to a host is lost.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge.blockstore.cache import SECTOR, RegionCache
from edge.blockstore.reserve import WriteReserve
from edge.blockstore.wal import FLAG_DISCARD, BlockstoreError, Data, Record, WriteLog
from steelfusion import log, statefile
from steelfusion.atomic import atomic_write

_log = log.get("blockstore")

SEQ_LEASE = 1 << 20
MARK_BYTES = 1 << 20
"""A COMMIT mark goes in the log once this many bytes of a LUN are committed since its last
one, and whenever the LUN has nothing uncommitted left: what an Edge killed now would resend
beyond its uncommitted writes (issue 18)."""
MEM_DATA_MAX = 64 << 20  # uncommitted data also kept in memory (for shipping) up to this
QUEUE_BYTES_MAX = 16 << 20  # append drains by itself past this (a caller that forgot)

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

    ``on_append`` (each appended :class:`Record`, for shipping) is the one
    collaborator set after construction, by :class:`edge.uplink.CoreUplink`:
    the uplink is built from this blockstore (it reads its stream, committed
    seqs and data), so the blockstore cannot be handed the uplink first. It
    is set before any append: the iSCSI target starts after both exist.
    """

    def __init__(self, directory: str | Path, luns: dict[int, int], reserve_bytes: int,
                 region_bytes: int = 64 << 10) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        if region_bytes % SECTOR or region_bytes <= 0:
            raise BlockstoreError(f"cache region {region_bytes} is not a multiple of {SECTOR}")
        self.luns = dict(luns)
        self.state_path = self.dir / "state.json"
        st = self._load_state()
        self.stream: int = st["stream"]
        self.epoch: int = int(st.get("epoch", 0))  # newest Core epoch seen (stale primaries refused)
        self.lease: dict[int, int] = {int(k): v for k, v in st.get("lease", {}).items()}
        self.next_seq: dict[int, int] = {lun: self.lease.get(lun, 0) + 1 for lun in self.luns}
        # Per LUN, the newest seq the Core has. The persisted copy is written
        # before any segment is retired; replay skips records up to it.
        saved = st.get("committed", {})
        self._committed_saved: dict[int, int] = {lun: int(saved.get(str(lun), 0))
                                                 for lun in self.luns}
        self.committed_seq: dict[int, int] = dict(self._committed_saved)
        # every LUN's, configured or not: replay must tell a removed LUN's committed records
        # (safe to drop) from its uncommitted ones (acknowledged to a host: never dropped)
        self._committed_any: dict[int, int] = {int(k): int(v) for k, v in saved.items()}
        self.log = WriteLog(self.dir / "wal", drain_hook=self.drain,
                            may_retire=self._persist_committed)
        self.caches = {lun: RegionCache(self.dir / f"cache-{lun}.img", size, region_bytes,
                                        drain_hook=self.write_caches)
                       for lun, size in self.luns.items()}
        self.room = WriteReserve(reserve_bytes)
        self.pending: dict[int, deque[Record]] = {lun: deque() for lun in self.luns}
        self.mem_bytes = 0
        self.gseq = 0
        self.writes = 0
        self.bytes_written = 0
        self.discards = 0
        self.bytes_discarded = 0
        self.on_append: Callable[[Record], None] | None = None
        self._queued_writes = 0
        self._queued_bytes = 0
        self._drain_scheduled = False
        self._drain_deferred = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failed: BaseException | None = None
        self._unmarked: dict[int, int] = dict.fromkeys(self.luns, 0)  # bytes since a mark
        self.marks_written = 0
        self._replay()
        self.log.open_for_append()
        self._renew_leases(force=True)

    # -- state --------------------------------------------------------------------
    def _load_state(self) -> dict:
        """``state.json`` (steelfusion/statefile.py); a damaged one refuses the start.

        Without its committed seqs, replay could put old data in the cache;
        without its leases, sequence numbers could go backwards. A file from
        before the envelope (``"version": 1``, no magic) is migrated once.
        """
        try:
            st = statefile.load(self.state_path, BLOCKSTORE_STATE_KIND, BLOCKSTORE_STATE_FORMAT,
                                remedy="restore it from a backup" + self._or_start_empty(),
                                check=_check_state, legacy=_legacy_state)
        except statefile.StateFileError as e:
            raise BlockstoreError(str(e)) from None
        if st is None:
            return {"stream": random.SystemRandom().getrandbits(63) | 1, "lease": {}}
        return st

    def _or_start_empty(self) -> str:
        """The last remedy for a file the blockstore cannot trust (state or log)."""
        return (f", or, accepting that writes the Core has not committed are lost, move "
                f"{self.dir} away and start with an empty blockstore (the Edge fetches every "
                "region from the Core again)")

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
        try:
            records = self.log.replay()
        except BlockstoreError as e:
            raise BlockstoreError(f"{e}{self._or_start_empty()}") from None
        # the newest of what state.json and the log's COMMIT marks say the Core has
        for lun, seq in self.log.marks.items():
            if seq > self._committed_any.get(lun, 0):
                self._committed_any[lun] = seq
            if lun in self.committed_seq and seq > self.committed_seq[lun]:
                self.committed_seq[lun] = seq
        committed = self.committed_seq
        skipped = 0
        stranded: dict[int, int] = {}  # LUN id -> uncommitted records the config cannot hold
        for rec, data in records:
            if rec.lun not in self.luns or rec.offset + rec.length > self.caches[rec.lun].size:
                if rec.seq > self._committed_any.get(rec.lun, 0):
                    stranded[rec.lun] = stranded.get(rec.lun, 0) + 1
                continue  # a removed or shrunk LUN's committed record: the Core has it
            cache = self.caches[rec.lun]
            self.next_seq[rec.lun] = max(self.next_seq[rec.lun], rec.seq + 1)
            self.gseq = max(self.gseq, rec.gseq)
            if rec.seq <= committed[rec.lun]:
                skipped += 1
                continue
            if rec.discard:
                cache.discard(rec.offset, rec.discard)
            else:
                cache.write(rec.offset, data)
            self._track(rec, data)
        if stranded:
            # Acknowledged to a host and not yet on the Core: dropping them would lose data
            # without a word (the segment would then be recycled).
            _log.error("write_log_stranded", luns=stranded)
            raise BlockstoreError(
                f"{self.dir}: the write log holds uncommitted writes of LUN id(s) "
                + ", ".join(f"{lun} ({n} writes)" for lun, n in sorted(stranded.items()))
                + " that the config no longer has (removed, or made smaller): put the LUN "
                "back as it was so they reach the Core, then change it" + self._or_start_empty())
        if records:
            _log.info("write_log_replayed", records=len(records) - skipped,
                      committed_skipped=skipped, uncommitted_bytes=self.uncommitted_bytes)

    def _track(self, rec: Record, data: Data) -> None:
        if self.mem_bytes + rec.length <= MEM_DATA_MAX:
            rec.data = data
            self.mem_bytes += rec.length
        self.pending[rec.lun].append(rec)
        self.room.add(rec.length)
        self.log.hold(rec.seg)

    # -- the write reserve (edge.blockstore.reserve) -------------------------------
    async def reserve(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more fit in the write reserve (FIFO, never fails)."""
        await self.room.reserve(nbytes)

    def try_reserve(self, nbytes: int) -> bool:
        """:meth:`reserve` without waiting: True (admitted) only if it fits now."""
        return self.room.try_reserve(nbytes)

    def unreserve(self, nbytes: int) -> None:
        """Give back an admission whose write was never appended."""
        self.room.unreserve(nbytes)

    @property
    def writers_waiting(self) -> int:
        return self.room.waiting

    @property
    def uncommitted_bytes(self) -> int:
        return self.room.used_bytes

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
        seq = self._next(lun)
        seg, pos = self.log.append(self.gseq, lun, seq, offset, kept)
        self.caches[lun].queue_write(offset, kept)
        rec = Record(self.gseq, lun, seq, offset, n, seg, pos, None)
        self._track(rec, kept)
        self.writes += 1
        self.bytes_written += n
        self._appended(rec, n)
        return rec

    def discard(self, lun: int, offset: int, length: int) -> Record:
        """Queue a host's deallocation (UNMAP) for the log; the cache reads zeros there now.

        One record with no data however long the range (a mkfs discards a whole LUN): it
        takes no room in the reserve and ships as a DISCARD write, which the Cores apply as
        a hole punch (issue 18). Acknowledgeable after :meth:`drain`, as a write.
        """
        if self.failed is not None:
            raise self._failed_error()
        seq = self._next(lun)
        seg, pos = self.log.append(self.gseq, lun, seq, offset, length.to_bytes(8, "big"),
                                   FLAG_DISCARD)
        rec = Record(self.gseq, lun, seq, offset, 0, seg, pos, None, length)
        self._track(rec, b"")
        self.discards += 1
        self.bytes_discarded += length
        self._appended(rec, 0)
        try:
            self.caches[lun].discard(offset, length)  # drains the log and the caches first
        except OSError as e:
            self._fail(e, "cache")
            raise self._failed_error() from e
        return rec

    def _next(self, lun: int) -> int:
        """The next seq of ``lun`` (leases renewed ahead) and the next gseq."""
        seq = self.next_seq[lun]
        self.next_seq[lun] = seq + 1
        if seq + 1 >= self.lease.get(lun, 0):
            self._renew_leases()
        self.gseq += 1
        return seq

    def _appended(self, rec: Record, n: int) -> None:
        if not self._queued_writes and not self._drain_scheduled:
            self._schedule_drain()
        self._queued_writes += 1
        self._queued_bytes += n
        if self.on_append is not None:
            self.on_append(rec)

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
                if c.queued:
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
        freed = popped = 0
        while q and q[0].seq <= seq:
            rec = q.popleft()
            popped += 1
            freed += rec.length
            if rec.data is not None:
                self.mem_bytes -= rec.length
                rec.data = None
            self.log.release(rec.seg)
        if freed:
            self.room.free(freed)
        if popped:
            self._unmarked[lun] += freed
            if (not q or self._unmarked[lun] >= MARK_BYTES) and self.failed is None:
                self._mark(lun)
        return freed

    def _mark(self, lun: int) -> None:
        """Queue a COMMIT mark for ``lun`` (wal.py); written with the next appends, or at
        the next loop turn when none come."""
        self._unmarked[lun] = 0
        self.log.mark(self.gseq, lun, self.committed_seq[lun])
        self.marks_written += 1
        if not self._drain_scheduled:
            self._schedule_drain()

    def uncommitted(self) -> list[Record]:
        """Every uncommitted record, in the order the hosts' writes were acknowledged."""
        out = [r for q in self.pending.values() for r in q]
        out.sort(key=lambda r: r.gseq)
        return out

    async def flush(self) -> None:
        """Make every acknowledged write durable on this Edge (SYNCHRONIZE CACHE, FUA).

        Drains first, so it also covers writes appended and not yet drained.
        A failed sync fails the blockstore (fail-stop, see :class:`WriteLog`):
        this and every later flush, append and drain raise BlockstoreError.
        """
        self.drain()
        try:
            await self.log.sync()
        except OSError as e:
            if self.failed is None:
                self._fail(e, "log sync")
            raise self._failed_error() from e

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
        used, limit = self.room.used_bytes, self.room.limit_bytes
        return {
            "stream": f"{self.stream:016x}", "uncommitted_bytes": used,
            "reserve_bytes": limit,
            "reserve_used_pct": round(100 * used / limit, 2) if limit else 0.0,
            "uncommitted_writes": sum(len(q) for q in self.pending.values()),
            "pending_writes": self._queued_writes,
            "writers_waiting": self.room.waiting, "writes": self.writes,
            "bytes_written": self.bytes_written, "discards": self.discards,
            "bytes_discarded": self.bytes_discarded,
            "segments": len(self.log.fds), "spare_segments": len(self.log.spares),
            "corrupt": list(self.log.corrupt),
            "failed": str(self.failed) if self.failed is not None else None,
            "luns": {str(lun): {"next_seq": self.next_seq[lun],
                                "committed_seq": self.committed_seq.get(lun, 0),
                                "uncommitted_writes": len(self.pending[lun]),
                                "cached_regions": c.full_regions,
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
