"""A Journal's in-memory region state: dirty bitmaps, the activity log, pending records.

The hot half of :class:`journal.journal.Journal` (see its module docstring
for the write-path contract): ``mark_dirty``, ``note_inflight``,
``peer_acked``, ``peer_lost``, ``mark_all_dirty`` and ``clear_dirty`` change
the bitmaps and the AL in memory and append the log records that say so
(:data:`journal.layout.RECORD`), each under a ticket of the journal's group
commit (:class:`steelfusion.groupcommit.Tickets`). They are O(regions
touched) Python work with no syscall, called from the event loop thread only;
writing the records is the other half's job (:mod:`journal.journal`).

Keys: a dirty region is ``((region << 11) | slot) << 1``, its AL entry the
same key ``| 1`` (slot indexes are below :data:`journal.layout.MAX_SLOTS`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import overload

import numpy as np

from journal import layout as L
from steelfusion.groupcommit import Tickets

REC = L.RECORD
_SLOT_BITS = 11  # slot index < MAX_SLOTS (2044) < 2**11
_SLOT_MASK = (1 << _SLOT_BITS) - 1
_EVICT_SCAN = 32
AL_REGIONS_MAX_DEFAULT = 1024


def dirty_key(slot: int, region: int) -> int:
    return ((region << _SLOT_BITS) | slot) << 1


def unpack_key(key: int) -> tuple[int, int]:
    """(slot, region) of a dirty or AL key."""
    return (key >> 1) & _SLOT_MASK, key >> (_SLOT_BITS + 1)


class Slot:
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


class Regions:
    """Dirty bitmaps and the AL of every slot, and the records not yet cut into a commit.

    ``tickets`` are the journal's group-commit counters: each record appended
    takes one, and a region whose record's ticket is not durable yet still
    needs a commit before the caller acts on its write.
    """

    def __init__(self, path: str, log_bytes: int, al_regions_max: int,
                 tickets: Tickets) -> None:
        self.path = path
        self._log_bytes = log_bytes
        self._al_max = al_regions_max
        self._tickets = tickets
        self._slots: list[Slot] = []
        self._by_lun: dict[int, Slot] = {}
        self._al: OrderedDict[int, int] = OrderedDict()  # AL key -> writes in flight
        self._pending: list[bytes] = []
        self._pending_keys: list[int] = []
        self._pending_n = 0
        self._unsynced: dict[int, int] = {}  # key -> ticket of the record not yet durable
        self._want_ckpt: str | None = None

    # -- hot path (event loop thread) ------------------------------------------------------
    def _slot(self, lun: int) -> Slot:
        s = self._by_lun.get(lun)
        if s is None:
            raise ValueError(f"LUN {lun} has no slot in Journal LUN {self.path} (protected: "
                             f"{sorted(self._by_lun)}); open the journal with it or add_lun()")
        return s

    def _append(self, rec: bytes, key: int) -> None:
        ticket = self._tickets.issue()
        self._pending.append(rec)
        self._pending_n += 1
        if key >= 0:
            self._unsynced[key] = ticket
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
                if s.barrier > self._tickets.durable or (unsynced and dirty_key(s.index, r) in unsynced):
                    must = True
                continue
            dirty[r >> 3] |= m
            self._append(REC.pack(L.OP_SET, 0, s.index, 1, r), dirty_key(s.index, r))
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
            key = dirty_key(s.index, r) | 1
            c = al.get(key)
            if c is None:
                al[key] = 1
                self._append(REC.pack(L.OP_AL_ADD, 0, s.index, 1, r), key)
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
            key = dirty_key(s.index, r) | 1
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
            slot, region = unpack_key(key)
            self._append(REC.pack(L.OP_AL_REMOVE, 0, slot, 1, region), -1)
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
            slot, region = unpack_key(key)
            s = self._slots[slot]
            m = 1 << (region & 7)
            if s.dirty[region >> 3] & m:
                must = must or (key ^ 1) in self._unsynced or s.barrier > self._tickets.durable
                continue
            s.dirty[region >> 3] |= m
            self._append(REC.pack(L.OP_SET, 0, slot, 1, region), key ^ 1)
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
        self._append(REC.pack(L.OP_SET, 0, s.index, s.nregions, 0), -1)
        s.barrier = self._tickets.issued
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
        self._tickets.issue()
        self._pending.append(data)
        self._pending_n += starts.size

    # -- queries -------------------------------------------------------------------------
    @property
    def luns(self) -> list[int]:
        return [s.lun for s in self._slots]

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
        out = [unpack_key(k)[1] for k in self._al if unpack_key(k)[0] == s.index]
        return np.array(sorted(out), dtype=np.int64)

