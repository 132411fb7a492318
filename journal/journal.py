"""The Journal LUN as the Core's write path sees it: dirty regions, activity log, group commit.

Two region sets per protected LUN (layout in :mod:`journal.layout`):

* **dirty** — regions changed while replication is suspended or the peer is
  unreachable; resynced from the primary's current data later (seed 002,
  "Replication is suspended at the secondary site": "logs the write to
  Journal LUN ... Wait for the write to be journaled ... acknowledges");
* **activity log (AL)** — beyond the seed, after DRBD: regions that *may* have
  writes on the local backend that the peer has not acknowledged. After a
  crash every AL region counts as dirty, so a crashed primary never keeps
  blocks its peer never had (DESIGN.md, invariant 5).

Durability rule (write-ahead, so a crash never leaves a backend block the
journal does not cover)::

    must = j.note_inflight(lun, off, n)     # running: mirrored write
    must = j.mark_dirty(lun, off, n)        # suspended / peer unreachable
    if must:
        await j.commit()                    # one shared fdatasync for every waiter
    apply to the backend; ... ; acknowledge

``mark_dirty``/``note_inflight`` return False - and the write costs nothing
more - when every region it touches is already durably dirty / in the AL;
True when this call added a record or a record covering it is still on its
way to disk. ``commit`` cuts all pending records into one log block, writes
it and fdatasyncs it in a worker thread; callers arriving meanwhile share the
next one (group commit). ``peer_acked`` only lowers in-flight counts; an idle
region leaves the AL lazily, when the AL is over ``al_regions_max`` (an LRU of
hot extents, so a hot region is not re-logged on every write).

The hot-path methods are O(regions touched) Python work with no syscall, and
must be called from one thread (the event loop). When the log area fills,
the next commit writes a checkpoint instead (bitmaps + superblock) and the log
restarts: a commit never fails for lack of log space.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import fcntl
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, overload

import numpy as np

from journal import layout as L
from journal.errors import (
    JournalError,
    JournalFull,
    JournalOffline,
    JournalShrunk,
    JournalTooSmall,
    JournalUnreachable,
)
from journal.image import (
    Blank,
    Image,
    Version1,
    device_size,
    format_fd,
    io_error,
    load,
)
from steelfusion import log
from steelfusion.fileio import pwrite_all

_log = log.get("journal")

_REC = L.RECORD
_SLOT_BITS = 11  # slot index < MAX_SLOTS (2044) < 2**11
_SLOT_MASK = (1 << _SLOT_BITS) - 1
_EVICT_SCAN = 32
AL_REGIONS_MAX_DEFAULT = 1024


def _dirty_key(slot: int, region: int) -> int:
    return ((region << _SLOT_BITS) | slot) << 1


def _unpack_key(key: int) -> tuple[int, int]:
    """(slot, region) of a dirty or AL key."""
    return (key >> 1) & _SLOT_MASK, key >> (_SLOT_BITS + 1)


class _Slot:
    """One protected LUN in memory: the packed dirty bitmap and its checkpoint bookkeeping."""

    __slots__ = ("barrier", "bitmap_gen", "bits", "changed", "crashed_al", "dirty", "half",
                 "index", "lun", "lun_bytes", "nregions", "region_bytes")

    def __init__(self, index: int, lun: int, lun_bytes: int, region_bytes: int, half: int,
                 bitmap_gen: int, packed: bytes | None = None) -> None:
        self.index = index
        self.lun = lun
        self.lun_bytes = lun_bytes
        self.region_bytes = region_bytes
        self.nregions = L.regions_for(lun_bytes, region_bytes)
        self.dirty = bytearray(packed if packed is not None else L.bitmap_bytes(self.nregions))
        self.bits = np.frombuffer(self.dirty, dtype=np.uint8)  # numpy view for bulk work
        self.half = half
        self.bitmap_gen = bitmap_gen
        self.changed = packed is None
        self.barrier = 0  # lsn of a bulk SET (mark_all_dirty) that covers every region
        self.crashed_al = np.zeros(0, dtype=np.int64)

    def entry(self) -> L.SlotEntry:
        return L.SlotEntry(self.lun, self.lun_bytes, self.region_bytes, self.half,
                           self.bitmap_gen)

    def span(self, offset: int, length: int) -> range:
        if offset < 0 or length < 0 or offset + length > self.lun_bytes:
            raise ValueError(f"LUN {self.lun}: range {offset}+{length} is outside its "
                             f"{self.lun_bytes} bytes")
        if length == 0:
            return range(0)
        rb = self.region_bytes
        return range(offset // rb, (offset + length - 1) // rb + 1)

    def dirty_indices(self) -> np.ndarray:
        return np.flatnonzero(np.unpackbits(self.bits, count=self.nregions, bitorder="little"))

    def set_packed(self, arr: np.ndarray) -> None:
        self.dirty[:] = np.packbits(arr.astype(bool), bitorder="little").tobytes()


@dataclass
class _Batch:
    """What one commit writes: a log block, or a checkpoint (bitmaps, then a superblock)."""

    order: int
    last_lsn: int
    keys: list[int]
    writes: list[tuple[int, bytes]]
    min_size: int
    superblock: tuple[int, bytes] | None = None
    marker: tuple[int, bytes] | None = None  # CHECKPOINT log block, written last
    reason: str = ""
    generation: int = 0
    nrecords: int = 0
    started: float = field(default_factory=time.monotonic)


class Journal:
    """An open Journal LUN; see the module docstring for the write-path contract."""

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, luns: Mapping[int, int], size: int = 0,
             region_bytes: int = L.REGION_BYTES_DEFAULT, *,
             log_bytes: int = L.LOG_BYTES_DEFAULT,
             al_regions_max: int = AL_REGIONS_MAX_DEFAULT) -> Journal:
        """Open (formatting a new or all-zero LUN of ``size``), validate, replay, add slots.

        ``luns`` maps LUN id -> LUN size in bytes. ``region_bytes`` and
        ``log_bytes`` apply when formatting (and ``region_bytes`` to new slots);
        an existing journal keeps its own. Raises a :class:`JournalError`
        subclass (whose ``alarm`` the Core raises) or ``ValueError`` for bad
        arguments.
        """
        for lun, lun_bytes in luns.items():
            if not 0 <= lun <= L.U64_MAX or lun_bytes <= 0:
                raise ValueError(f"LUN {lun}: id must be >= 0 and size > 0 (got {lun_bytes})")
        if not L.valid_region_bytes(region_bytes):
            raise ValueError(f"region_bytes {region_bytes} must be a power of two in "
                             f"[{L.REGION_BYTES_MIN}, {L.REGION_BYTES_MAX}]")
        if not L.valid_log_bytes(log_bytes):
            raise ValueError(f"log_bytes {log_bytes} must be a multiple of {L.SECTOR} in "
                             f"[{L.LOG_BYTES_MIN}, {L.LOG_BYTES_MAX}]")
        if al_regions_max < 1:
            raise ValueError("al_regions_max must be >= 1")
        p = Path(path)
        fd = open_fd(p, size, L.required_size(len(luns)))
        try:
            lock_fd(fd, p)
            img = load_or_format(fd, p, size, region_bytes, log_bytes)
            j = cls(p, fd, img, al_regions_max)
            j._ensure_luns(luns)
            j._recover(img)
            if j._want_ckpt is not None:
                j._checkpoint_now(j._want_ckpt)
        except BaseException:
            os.close(fd)
            raise
        _log.info("journal_opened", path=str(p), generation=j._gen, luns=len(j._slots),
                  size=j._size, clean=img.clean, replayed_records=img.log_records,
                  torn_bytes=img.torn_bytes,
                  crashed_al_regions=sum(len(s.crashed_al) for s in j._slots))
        return j

    def __init__(self, path: Path, fd: int, img: Image, al_regions_max: int) -> None:
        """Use :meth:`open`; this adopts an already loaded image."""
        sb = img.sb
        self.path = path
        self._fd = fd
        self._jid = sb.journal_id
        self._gen = sb.generation
        self._created_ns = sb.created_ns
        self._region_bytes = sb.region_bytes
        self._log_offset = sb.log_offset
        self._log_bytes = sb.log_bytes
        self._size = img.actual_size
        self._recorded_size = sb.size_bytes
        self._al_max = al_regions_max
        self._slots: list[_Slot] = []
        self._by_lun: dict[int, _Slot] = {}
        for i, e in enumerate(sb.slots):
            packed = np.packbits(img.dirty[i], bitorder="little").tobytes()
            s = _Slot(i, e.lun, e.lun_bytes, e.region_bytes, e.half, e.bitmap_gen, packed)
            s.changed = i in img.touched  # its bitmaps on disk lag the replayed log
            self._slots.append(s)
            self._by_lun[e.lun] = s
        self._al: OrderedDict[int, int] = OrderedDict()  # AL key -> writes in flight
        self._pending: list[bytes] = []
        self._pending_keys: list[int] = []
        self._pending_n = 0
        self._lsn = 0  # records appended
        self._durable = 0  # every record <= this is on disk
        self._unsynced: dict[int, int] = {}  # key -> lsn of the record not yet durable
        self._want_ckpt: str | None = None
        self._log_tail = img.log_used_bytes
        self._seq = img.log_seq
        self._cond = threading.Condition()
        self._cut_order = 0
        self._written_order = 0
        self._sync_task: asyncio.Task[None] | None = None
        self._request_task: asyncio.Task[None] | None = None
        self._failed: JournalError | None = None
        self._closed = False
        self._listeners: list[Callable[[int], None]] = []
        self.clean_at_open = img.clean
        self.stats = {"commits": 0, "checkpoints": 0, "log_blocks": 0, "records": 0}
        self.last_checkpoint_ns = sb.checkpoint_ns

    def _ensure_luns(self, luns: Mapping[int, int]) -> None:
        for lun, lun_bytes in luns.items():
            s = self._by_lun.get(lun)
            if s is None:
                self._add_slot(lun, lun_bytes)
            elif s.lun_bytes != lun_bytes:
                self._resize_slot(s, lun_bytes)

    def _add_slot(self, lun: int, lun_bytes: int) -> None:
        index = len(self._slots)
        if index >= L.MAX_SLOTS:
            raise JournalFull(f"Journal LUN {self.path} holds at most {L.MAX_SLOTS} LUN slots; "
                              f"LUN {lun} cannot be protected - use a second Core")
        need = L.required_size(index + 1)
        if self._size < need:
            raise too_small(self.path, self._size, index + 1)
        n = L.regions_for(lun_bytes, self._region_bytes)
        if n > L.max_regions():
            raise JournalFull(f"Journal LUN {self.path}: LUN {lun} ({lun_bytes} bytes) needs "
                              f"{n} regions of {self._region_bytes} bytes, more than a slot "
                              f"holds ({L.max_regions()}); reformat with a larger region size")
        s = _Slot(index, lun, lun_bytes, self._region_bytes, half=1, bitmap_gen=0)
        self._slots.append(s)
        self._by_lun[lun] = s
        self._want_ckpt = self._want_ckpt or "slot_added"
        _log.info("journal_slot_added", lun=lun, slot=index, lun_bytes=lun_bytes,
                  region_bytes=self._region_bytes)

    def _resize_slot(self, s: _Slot, lun_bytes: int) -> None:
        """A LUN changed size: keep its bits; regions it gained are dirty (content unknown)."""
        n = L.regions_for(lun_bytes, s.region_bytes)
        if n > L.max_regions():
            raise JournalFull(f"Journal LUN {self.path}: LUN {s.lun} grew to {lun_bytes} bytes, "
                              "more regions than its slot holds; reformat with larger regions")
        old = np.unpackbits(s.bits, count=s.nregions, bitorder="little").astype(bool)
        new = np.ones(n, dtype=bool)
        keep = min(n, s.nregions)
        new[:keep] = old[:keep]
        _log.warning("journal_lun_resized", lun=s.lun, old_bytes=s.lun_bytes, new_bytes=lun_bytes,
                     regions_added_dirty=max(0, n - s.nregions))
        s.lun_bytes = lun_bytes
        s.nregions = n
        s.dirty = bytearray(np.packbits(new, bitorder="little").tobytes())
        s.bits = np.frombuffer(s.dirty, dtype=np.uint8)
        s.changed = True
        self._want_ckpt = self._want_ckpt or "lun_resized"

    def _recover(self, img: Image) -> None:
        """After an unclean shutdown every region in the AL becomes dirty (invariant 5)."""
        for s, al in zip(self._slots, img.al, strict=False):
            crashed = np.flatnonzero(al[:s.nregions])
            if crashed.size:
                cur = np.unpackbits(s.bits, count=s.nregions, bitorder="little").astype(bool)
                cur[crashed] = True
                s.set_packed(cur)
                s.crashed_al = crashed
                s.changed = True
        crashed_total = sum(len(s.crashed_al) for s in self._slots)
        if crashed_total:
            _log.warning("journal_crashed_al", regions=crashed_total,
                         luns={s.lun: len(s.crashed_al) for s in self._slots if len(s.crashed_al)})
        if crashed_total or img.log_blocks > img.log_markers or img.torn_bytes \
                or not img.other_copy_ok:
            # Fold the log into a checkpoint: the new session starts from a clean log.
            self._want_ckpt = self._want_ckpt or "recovery"
        for note in img.notes:
            _log.warning("journal_replay_note", note=note)

    # -- hot path (event loop thread) ------------------------------------------------------
    def _slot(self, lun: int) -> _Slot:
        s = self._by_lun.get(lun)
        if s is None:
            raise ValueError(f"LUN {lun} has no slot in Journal LUN {self.path} (protected: "
                             f"{sorted(self._by_lun)}); open the journal with it or add_lun()")
        return s

    def _append(self, rec: bytes, key: int) -> None:
        self._lsn += 1
        self._pending.append(rec)
        self._pending_n += 1
        if key >= 0:
            self._unsynced[key] = self._lsn
            self._pending_keys.append(key)

    def mark_dirty(self, lun: int, offset: int, length: int) -> bool:
        """Record that ``[offset, offset+length)`` of ``lun`` changed without the peer.

        Returns True if the caller must ``await commit()`` before acting on
        the write (applying it, acknowledging it); False if every region was
        already durably dirty.
        """
        s = self._slot(lun)
        dirty = s.dirty
        unsynced = self._unsynced
        must = False
        for r in s.span(offset, length):
            m = 1 << (r & 7)
            if dirty[r >> 3] & m:
                if s.barrier > self._durable or (unsynced and _dirty_key(s.index, r) in unsynced):
                    must = True
                continue
            dirty[r >> 3] |= m
            self._append(_REC.pack(L.OP_SET, 0, s.index, 1, r), _dirty_key(s.index, r))
            s.changed = True
            must = True
        return must

    def note_inflight(self, lun: int, offset: int, length: int) -> bool:
        """A write is about to go to the local backend and to the peer: keep its regions in the AL.

        Returns True if an AL record must be made durable (``await commit()``)
        before the backend write is issued.
        """
        s = self._slot(lun)
        al = self._al
        unsynced = self._unsynced
        must = False
        for r in s.span(offset, length):
            key = _dirty_key(s.index, r) | 1
            c = al.get(key)
            if c is None:
                al[key] = 1
                self._append(_REC.pack(L.OP_AL_ADD, 0, s.index, 1, r), key)
                s.changed = True
                must = True
                if len(al) > self._al_max:
                    self._evict()
            else:
                al[key] = c + 1
                al.move_to_end(key)
                if unsynced and key in unsynced:
                    must = True
        return must

    def peer_acked(self, lun: int, offset: int, length: int) -> None:
        """The peer has durably applied a write noted by :meth:`note_inflight`."""
        s = self._slot(lun)
        al = self._al
        for r in s.span(offset, length):
            key = _dirty_key(s.index, r) | 1
            c = al.get(key)
            if c:
                al[key] = c - 1

    def _evict(self) -> None:
        """Drop least-recently-used idle regions while the AL is over its bound.

        Busy regions (writes in flight) are never dropped, so the AL may
        exceed ``al_regions_max`` by the regions the Core's in-flight window
        actually covers; that window is the real bound. Only the oldest
        ``_EVICT_SCAN`` entries are looked at, so the cost stays O(1).
        """
        al = self._al
        excess = len(al) - self._al_max
        victims: list[int] = []
        for i, (key, c) in enumerate(al.items()):
            if i >= _EVICT_SCAN or len(victims) >= excess:
                break
            if not c:
                victims.append(key)
        for key in victims:
            del al[key]
            slot, region = _unpack_key(key)
            self._append(_REC.pack(L.OP_AL_REMOVE, 0, slot, 1, region), -1)
            self._slots[slot].changed = True

    def peer_lost(self) -> bool:
        """The peer will never acknowledge the writes in flight (pause turned suspend, failover).

        Their regions become dirty, so the resync after the link returns
        covers them, and their in-flight counts are reset. Returns True if
        the caller must ``await commit()``.
        """
        must = False
        for key, c in list(self._al.items()):
            if not c:
                continue
            self._al[key] = 0
            slot, region = _unpack_key(key)
            s = self._slots[slot]
            m = 1 << (region & 7)
            if s.dirty[region >> 3] & m:
                must = must or (key ^ 1) in self._unsynced or s.barrier > self._durable
                continue
            s.dirty[region >> 3] |= m
            self._append(_REC.pack(L.OP_SET, 0, slot, 1, region), key ^ 1)
            s.changed = True
            must = True
        return must

    def mark_all_dirty(self, lun: int) -> bool:
        """Initial sync of a new pair: the whole LUN is dirty (one run record)."""
        s = self._slot(lun)
        s.bits[:] = 0xFF
        tail = s.nregions % 8
        if tail:
            s.bits[-1] = (1 << tail) - 1
        self._append(_REC.pack(L.OP_SET, 0, s.index, s.nregions, 0), -1)
        s.barrier = self._lsn
        s.changed = True
        return True

    def clear_dirty(self, lun: int, regions: Iterable[int] | np.ndarray) -> None:
        """A resync finished these regions: they are clean again (numpy, run-length records).

        Clearing is never urgent - a clear lost in a crash only resyncs a
        region twice - so it rides along with the next commit; a very large
        clear is folded into a checkpoint instead of flooding the log.
        """
        s = self._slot(lun)
        r = np.unique(np.asarray(regions, dtype=np.int64).ravel())
        if not r.size:
            return
        if r[0] < 0 or r[-1] >= s.nregions:
            raise ValueError(f"LUN {lun}: regions must be in [0, {s.nregions})")
        idx = r >> 3
        mask = (np.ones(1, dtype=np.uint8) << (r & 7).astype(np.uint8)).astype(np.uint8)
        was = (s.bits[idx] & mask) != 0
        r, idx, mask = r[was], idx[was], mask[was]
        if not r.size:
            return
        np.bitwise_and.at(s.bits, idx, ~mask)
        s.changed = True
        breaks = np.flatnonzero(np.diff(r) != 1) + 1
        starts = r[np.concatenate(([0], breaks))]
        ends = r[np.concatenate((breaks - 1, [r.size - 1]))]
        if starts.size * L.RECORD.size > self._log_bytes // 4:
            self._want_ckpt = self._want_ckpt or "bulk_clear"
            return
        data = L.pack_records(L.OP_CLEAR, s.index, starts, ends - starts + 1)
        self._lsn += 1
        self._pending.append(data)
        self._pending_n += starts.size

    # -- durability ----------------------------------------------------------------------
    @property
    def ticket(self) -> int:
        """Sequence number of the last record appended (compare with :attr:`durable`)."""
        return self._lsn

    @property
    def durable(self) -> int:
        """Every record up to this sequence number is on disk."""
        return self._durable

    def on_durable(self, fn: Callable[[int], None]) -> None:
        """Call ``fn(durable)`` after each commit (callback style, like LunStore)."""
        self._listeners.append(fn)

    async def commit(self) -> None:
        """Make every record appended so far durable: one shared fdatasync per group.

        Concurrent callers wait on the same in-flight commit; those whose
        records arrived after it was cut share the next one.
        """
        target = self._lsn
        while self._durable < target:
            if self._failed is not None:
                raise self._offline()
            task = self._sync_task
            if task is None:
                task = self._sync_task = asyncio.get_running_loop().create_task(self._sync_one())
            try:
                await asyncio.shield(task)
            except JournalError:
                raise self._offline() from None

    def request_commit(self) -> None:
        """Start a background commit; listeners registered with :meth:`on_durable` hear of it."""
        if self._request_task is None and self._durable < self._lsn and self._failed is None:
            task = asyncio.get_running_loop().create_task(self.commit())
            self._request_task = task

            def done(t: asyncio.Task[None]) -> None:
                self._request_task = None
                if not t.cancelled():
                    t.exception()  # already logged as journal_offline; mark it retrieved

            task.add_done_callback(done)

    async def _sync_one(self) -> None:
        try:
            batch = self._cut()
            if batch is not None:
                await asyncio.to_thread(self._write, batch)
                self._done(batch)
        except JournalError as e:
            self._fail(e)
            raise
        finally:
            self._sync_task = None

    def flush(self) -> None:
        """Blocking commit, for callers outside the event loop (tools, tests, close)."""
        if self._failed is not None:
            raise self._offline()
        batch = self._cut()
        try:
            if batch is None:
                self._wait_written(self._cut_order)
                return
            self._write(batch)
        except JournalError as e:
            self._fail(e)
            raise
        self._done(batch)

    def checkpoint(self, reason: str = "requested") -> None:
        """Blocking checkpoint: rewrite changed bitmaps and the superblock, restart the log."""
        if self._failed is not None:
            raise self._offline()
        self._checkpoint_now(reason)

    def _checkpoint_now(self, reason: str, clean: bool = False) -> None:
        batch = self._cut(checkpoint=reason, clean=clean)
        assert batch is not None
        try:
            self._write(batch)
        except JournalError as e:
            self._fail(e)
            raise
        self._done(batch)

    def _cut(self, checkpoint: str | None = None, clean: bool = False) -> _Batch | None:
        """Take every pending record (on the loop thread) into one batch to write."""
        reason = checkpoint or self._want_ckpt
        if reason is None and not self._pending_n:
            return None
        recs, keys, n = self._pending, self._pending_keys, self._pending_n
        self._pending, self._pending_keys, self._pending_n = [], [], 0
        self._cut_order += 1
        if reason is None:
            size = L.log_block_bytes(n)
            if self._log_tail + size <= self._log_bytes:
                self._seq += 1
                data = L.push_log_block(self._jid, self._gen, self._seq, b"".join(recs))
                off = self._log_offset + self._log_tail
                self._log_tail += size
                return _Batch(self._cut_order, self._lsn, keys, [(off, data)],
                              self._recorded_size, nrecords=n)
            reason = "log_full"
        self._want_ckpt = None
        gen = self._gen + 1
        al_regions: dict[int, list[int]] = {}
        for key in self._al:
            slot, region = _unpack_key(key)
            al_regions.setdefault(slot, []).append(region)
        writes: list[tuple[int, bytes]] = []
        for s in self._slots:
            if not s.changed:
                continue
            al = np.zeros(s.nregions, dtype=bool)
            if s.index in al_regions:
                al[al_regions[s.index]] = True
            s.half ^= 1
            s.bitmap_gen = gen
            s.changed = False
            writes.append((L.slot_offset(s.index, s.half),
                           L.push_bitmaps(s.index, self._jid, gen, s.lun, s.nregions,
                                          bytes(s.dirty),
                                          np.packbits(al, bitorder="little").tobytes())))
        now = time.time_ns()
        sb = L.Superblock(gen, self._jid, self._created_ns, now, self._size, self._log_offset,
                          self._log_bytes, self._region_bytes, L.FLAG_CLEAN if clean else 0,
                          tuple(s.entry() for s in self._slots))
        marker = L.push_log_block(self._jid, gen, 1,
                                  _REC.pack(L.OP_CHECKPOINT, 0, 0, 0, gen))
        self._gen = gen
        self._log_tail = len(marker)
        self._seq = 1
        self._recorded_size = self._size
        self.last_checkpoint_ns = now
        return _Batch(self._cut_order, self._lsn, keys, writes, self._size,
                      superblock=(L.SB_OFFSETS[sb.copy], L.push_superblock(sb)),
                      marker=(self._log_offset, marker), reason=reason, generation=gen,
                      nrecords=n)

    def _wait_written(self, order: int) -> None:
        with self._cond:
            while self._written_order < order and self._failed is None:
                self._cond.wait()

    def _write(self, b: _Batch) -> None:
        """Write one batch, in cut order (any thread). Raises JournalError only."""
        with self._cond:
            while self._written_order < b.order - 1 and self._failed is None:
                self._cond.wait()
            try:
                if self._failed is not None:
                    raise self._offline()
                if self._fd < 0:
                    raise JournalOffline(f"Journal LUN {self.path} is closed")
                actual = device_size(self._fd)
                if actual < b.min_size:
                    raise shrunk(self.path, b.min_size, actual)
                for off, data in b.writes:
                    pwrite_all(self._fd, data, off)
                os.fdatasync(self._fd)
                for part in (b.superblock, b.marker):
                    if part is not None:
                        pwrite_all(self._fd, part[1], part[0])
                        os.fdatasync(self._fd)
            except OSError as e:
                raise io_error(e, self.path, "writing") from None
            finally:
                self._written_order = max(self._written_order, b.order)
                self._cond.notify_all()

    def _done(self, b: _Batch) -> None:
        if b.last_lsn > self._durable:
            self._durable = b.last_lsn
        unsynced = self._unsynced
        for key in b.keys:
            lsn = unsynced.get(key)
            if lsn is not None and lsn <= b.last_lsn:
                del unsynced[key]
        self.stats["commits"] += 1
        self.stats["records"] += b.nrecords
        if b.superblock is not None:
            self.stats["checkpoints"] += 1
            _log.info("journal_checkpoint", generation=b.generation, reason=b.reason,
                      slots_written=len(b.writes),
                      ms=round((time.monotonic() - b.started) * 1000, 2))
        else:
            self.stats["log_blocks"] += 1
        for fn in self._listeners:
            fn(self._durable)

    def _fail(self, e: JournalError) -> None:
        if self._failed is None:
            self._failed = e
            _log.error("journal_offline", alarm=e.alarm, error=str(e), path=str(self.path))
        with self._cond:
            self._cond.notify_all()

    def _offline(self) -> JournalError:
        """A fresh copy of the first failure (each waiter gets its own exception object)."""
        if self._failed is None:
            return JournalOffline(f"Journal LUN {self.path} is closed")
        return copy.copy(self._failed)

    # -- queries -------------------------------------------------------------------------
    @property
    def luns(self) -> list[int]:
        return [s.lun for s in self._slots]

    @property
    def failed(self) -> JournalError | None:
        """The first failure (the journal is offline) or None."""
        return self._failed

    def region_bytes(self, lun: int) -> int:
        return self._slot(lun).region_bytes

    def dirty(self, lun: int) -> np.ndarray:
        """Region indices to resync: dirty, including regions that were in the AL at a crash."""
        return self._slot(lun).dirty_indices()

    def dirty_count(self, lun: int) -> int:
        s = self._slot(lun)
        return int(np.unpackbits(s.bits, count=s.nregions, bitorder="little").sum())

    def dirty_bytes(self, lun: int) -> int:
        """Bytes a resync of ``lun`` would copy (the last region may be short)."""
        s = self._slot(lun)
        idx = s.dirty_indices()
        if not idx.size:
            return 0
        total = int(idx.size) * s.region_bytes
        if idx[-1] == s.nregions - 1:
            total -= s.nregions * s.region_bytes - s.lun_bytes
        return total

    def crashed_al_regions(self, lun: int) -> np.ndarray:
        """Regions that were in the AL when this journal was opened after an unclean shutdown."""
        return self._slot(lun).crashed_al.copy()

    @overload
    def al_regions(self) -> int: ...

    @overload
    def al_regions(self, lun: int) -> np.ndarray: ...

    def al_regions(self, lun: int | None = None) -> np.ndarray | int:
        """The AL's total size, or the regions of ``lun`` now in it (sorted indices)."""
        if lun is None:
            return len(self._al)
        s = self._slot(lun)
        out = [_unpack_key(k)[1] for k in self._al if _unpack_key(k)[0] == s.index]
        return np.array(sorted(out), dtype=np.int64)

    def usage(self) -> dict[str, Any]:
        """What ``coredr journal status`` shows: sizes, log use, per-LUN dirty and AL counts."""
        per_al: dict[int, int] = {}
        busy = 0
        for key, c in self._al.items():
            slot = _unpack_key(key)[0]
            per_al[slot] = per_al.get(slot, 0) + 1
            busy += c > 0
        luns = []
        for s in self._slots:
            luns.append({"lun": s.lun, "slot": s.index, "lun_bytes": s.lun_bytes,
                         "region_bytes": s.region_bytes, "regions": s.nregions,
                         "dirty_regions": self.dirty_count(s.lun),
                         "dirty_bytes": self.dirty_bytes(s.lun),
                         "al_regions": per_al.get(s.index, 0),
                         "crashed_al_regions": int(s.crashed_al.size)})
        return {
            "path": str(self.path),
            "size": self._size,
            "recorded_size": self._recorded_size,
            "required_size": L.required_size(len(self._slots)),
            "slot_capacity": L.slots_capacity(self._size),
            "generation": self._gen,
            "region_bytes": self._region_bytes,
            "log_bytes": self._log_bytes,
            "used_log_bytes": self._log_tail,
            "pending_records": self._pending_n,
            "dirty_regions": {d["lun"]: d["dirty_regions"] for d in luns},
            "al_regions": len(self._al),
            "al_busy_regions": busy,
            "al_regions_max": self._al_max,
            "clean_at_open": self.clean_at_open,
            "last_checkpoint_ns": self.last_checkpoint_ns,
            "offline": None if self._failed is None else
            {"alarm": self._failed.alarm, "message": str(self._failed)},
            "stats": dict(self.stats),
            "luns": luns,
        }

    # -- size and slots ------------------------------------------------------------------
    def refresh_size(self) -> int:
        """Re-read the LUN's size: growth is used (more slots), shrinking is an alarm.

        The grown size is recorded at the next checkpoint; a journal that
        shrank below its recorded size goes offline (reopen it once grown back).
        """
        if self._closed:
            raise JournalOffline(f"Journal LUN {self.path} is closed")
        try:
            actual = device_size(self._fd)
        except OSError as e:
            err = io_error(e, self.path, "reading the size")
            self._fail(err)
            raise err from None
        if actual < self._recorded_size:
            err = shrunk(self.path, self._recorded_size, actual)
            self._fail(err)
            raise err
        if actual > self._size:
            _log.info("journal_grown", path=str(self.path), old=self._size, new=actual,
                      slot_capacity=L.slots_capacity(actual))
        self._size = actual
        return actual

    def add_lun(self, lun: int, lun_bytes: int) -> None:
        """Protect one more LUN (blocking checkpoint). Raises JournalTooSmall if it needs a grow."""
        if self._failed is not None:
            raise self._offline()
        if lun_bytes <= 0 or lun < 0:
            raise ValueError(f"LUN {lun}: bad id or size {lun_bytes}")
        self.refresh_size()
        self._ensure_luns({lun: lun_bytes})
        if self._want_ckpt is not None:
            self._checkpoint_now(self._want_ckpt)

    # -- closing -------------------------------------------------------------------------
    def close(self, clean: bool = True) -> None:
        """Stop using the journal.

        ``clean=True`` checkpoints with an empty AL: regions with writes still
        unacknowledged by the peer become dirty first, so nothing is lost.
        ``clean=False`` only writes pending records; the AL stays, and the
        next open treats it as after a crash.
        """
        if self._closed:
            return
        try:
            if self._failed is None:
                if clean:
                    self.peer_lost()
                    for key in self._al:
                        self._slots[_unpack_key(key)[0]].changed = True
                    self._al.clear()
                    self._checkpoint_now("close", clean=True)
                else:
                    self.flush()
        finally:
            with self._cond:
                while self._written_order < self._cut_order and self._failed is None:
                    self._cond.wait()
                self._release()
            _log.info("journal_closed", path=str(self.path), clean=clean and self._failed is None)

    def abandon(self) -> None:
        """Close the descriptor without writing anything: what a power cut leaves (tests, drills)."""
        if self._closed:
            return
        with self._cond:
            self._release()
        if self._failed is None:
            self._failed = JournalOffline(f"Journal LUN {self.path} was abandoned")

    def _release(self) -> None:
        fd, self._fd = self._fd, -1
        self._closed = True
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# -- helpers shared with check_journal ------------------------------------------------------
def too_small(path: str | Path, size: int, luns: int) -> JournalTooSmall:
    need = L.required_size(luns)
    return JournalTooSmall(
        f"Journal LUN {path} is {size / L.GIB:.1f} GiB; {luns} protected LUN(s) need at least "
        f"{need / L.GIB:.0f} GiB (1 GiB + 2 GiB per LUN); grow "
        "the Journal LUN - the replication service does not start until it is large enough",
        size=size, need=need, luns=luns)


def shrunk(path: str | Path, recorded: int, actual: int) -> JournalShrunk:
    return JournalShrunk(f"Journal LUN {path} shrank from {recorded} to {actual} bytes "
                         f"({recorded / L.GIB:.1f} -> {actual / L.GIB:.1f} GiB); grow it back "
                         f"to at least {recorded} bytes and restart - a journal may only grow")


def open_fd(path: Path, size: int, need: int) -> int:
    """Open read-write, creating a sparse file of ``size`` when missing."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise io_error(e, path, "opening") from None
    if size <= 0 or str(path).startswith("/dev/"):
        raise JournalUnreachable(f"Journal LUN {path} does not exist; map the LUN or configure "
                                 f"[journal] size (at least {need / L.GIB:.0f} GiB) to create a "
                                 "sparse file")
    if size < need:
        raise too_small(path, size, (need - L.META_BYTES) // L.SLOT_AREA_BYTES)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise io_error(e, path, "creating") from None
    try:
        os.ftruncate(fd, size)
    except OSError as e:
        os.close(fd)
        raise io_error(e, path, "sizing") from None
    return fd


def lock_fd(fd: int, path: Path) -> None:
    """One writer per journal: a second open (another Core on the same file) is refused."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise JournalError(f"Journal LUN {path} is in use by another process (or opened twice); "
                           "each Core needs its own Journal LUN", alarm="journal_busy") from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise io_error(e, path, "locking") from None


def load_or_format(fd: int, path: Path, size: int, region_bytes: int, log_bytes: int) -> Image:
    """Load; an all-zero LUN is formatted, a version-1 journal (superblock only) is upgraded."""
    try:
        return load(fd, path)
    except Blank:
        try:
            actual = device_size(fd)
            if size > actual and os.path.isfile(path):
                os.ftruncate(fd, size)
                actual = size
        except OSError as e:
            raise io_error(e, path, "sizing") from None
        if actual < L.META_BYTES:
            raise too_small(path, actual, 0) from None
        reason = "new"
    except Version1 as v:
        try:
            actual = device_size(fd)
        except OSError as e:
            raise io_error(e, path, "reading the size") from None
        if actual < v.size:
            raise shrunk(path, v.size, actual) from None
        reason = "upgrade_from_v1"
    try:
        sb = format_fd(fd, actual, region_bytes, log_bytes)
    except OSError as e:
        raise io_error(e, path, "formatting") from None
    _log.info("journal_formatted", path=str(path), size=actual, reason=reason,
              region_bytes=region_bytes, log_bytes=log_bytes, journal_id=f"{sb.journal_id:016x}")
    return load(fd, path)
