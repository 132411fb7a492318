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

This module writes: it cuts the pending records into log blocks and
checkpoints and writes them in order. The in-memory bitmaps and AL that the
hot path changes are :mod:`journal.regions`; creating, locking and
formatting the LUN is :mod:`journal.opening`; the tickets, the one commit in
flight and the first failure are :class:`steelfusion.groupcommit.GroupCommit`.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from journal import layout as L
from journal.errors import JournalError, JournalFull, JournalOffline
from journal.image import Image, io_error
from journal.opening import load_or_format, lock_dev, open_dev, shrunk, too_small
from journal.regions import AL_REGIONS_MAX_DEFAULT, REC, Regions, Slot, unpack_key
from steelfusion import log
from steelfusion.blockdev import Device
from steelfusion.groupcommit import GroupCommit

__all__ = [
    "AL_REGIONS_MAX_DEFAULT",
    "Journal",
    "load_or_format",
    "lock_dev",
    "open_dev",
    "shrunk",
    "too_small",
]

_log = log.get("journal")


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


class Journal(Regions):
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
        p = str(path)  # a file, a block device or an iscsi:// URL (Path would fold its //)
        dev = open_dev(p, size, L.required_size(len(luns)))
        try:
            lock_dev(dev, p)
            img = load_or_format(dev, p, size, region_bytes, log_bytes)
            j = cls(p, dev, img, al_regions_max)
            j._ensure_luns(luns)
            j._recover(img)
            if j._want_ckpt is not None:
                j._checkpoint_now(j._want_ckpt)
        except BaseException:
            dev.close()
            raise
        _log.info("journal_opened", path=str(p), generation=j._gen, luns=len(j._slots),
                  size=j._size, clean=img.clean, replayed_records=img.log_records,
                  torn_bytes=img.torn_bytes,
                  crashed_al_regions=sum(len(s.crashed_al) for s in j._slots))
        return j

    def __init__(self, path: str, dev: Device, img: Image, al_regions_max: int) -> None:
        """Use :meth:`open`; this adopts an already loaded image."""
        sb = img.sb
        # Tickets are log records; only commits someone waits for (or requested) run:
        # clears ride along with the next one. A JournalError is fail-stop (offline).
        self._group: GroupCommit[_Batch | None, JournalError] = GroupCommit(
            self._cut_pass, self._write_pass, done=self._done_pass, fatal=JournalError,
            eager=False)
        self._group.on_failure(self._on_failed)
        super().__init__(path, sb.log_bytes, al_regions_max, self._group)
        self._dev: Device | None = dev
        self._jid = sb.journal_id
        self._gen = sb.generation
        self._created_ns = sb.created_ns
        self._region_bytes = sb.region_bytes
        self._log_offset = sb.log_offset
        self._size = img.actual_size
        self._recorded_size = sb.size_bytes
        for i, e in enumerate(sb.slots):
            packed = np.packbits(img.dirty[i], bitorder="little").tobytes()
            s = Slot(i, e.lun, e.lun_bytes, e.region_bytes, e.half, e.bitmap_gen, packed)
            s.changed = i in img.touched  # its bitmaps on disk lag the replayed log
            self._slots.append(s)
            self._by_lun[e.lun] = s
        self._log_tail = img.log_used_bytes
        self._seq = img.log_seq
        self._cond = threading.Condition()
        self._cut_order = 0
        self._written_order = 0
        self._closed = False
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
        s = Slot(index, lun, lun_bytes, self._region_bytes, half=1, bitmap_gen=0)
        self._slots.append(s)
        self._by_lun[lun] = s
        self._want_ckpt = self._want_ckpt or "slot_added"
        _log.info("journal_slot_added", lun=lun, slot=index, lun_bytes=lun_bytes,
                  region_bytes=self._region_bytes)

    def _resize_slot(self, s: Slot, lun_bytes: int) -> None:
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

    # -- durability ----------------------------------------------------------------------
    @property
    def ticket(self) -> int:
        """Sequence number of the last record appended (compare with :attr:`durable`)."""
        return self._group.issued

    @property
    def durable(self) -> int:
        """Every record up to this sequence number is on disk."""
        return self._group.durable

    def on_durable(self, fn: Callable[[int], None]) -> None:
        """Call ``fn(durable)`` after each commit (callback style, like LunStore)."""
        self._group.on_durable(fn)

    async def commit(self) -> None:
        """Make every record appended so far durable: one shared fdatasync per group.

        Concurrent callers wait on the same in-flight commit; those whose
        records arrived after it was cut share the next one.
        """
        try:
            await self._group.wait()
        except JournalError:
            raise self._offline() from None

    def request_commit(self) -> None:
        """Start a background commit; listeners registered with :meth:`on_durable` hear of it."""
        self._group.request()

    # The group commit's three steps (steelfusion.groupcommit): cut on the loop, write in a
    # worker thread, then the bookkeeping before the listeners hear of the new durable ticket.
    def _cut_pass(self, target: int) -> _Batch | None:
        return self._cut()

    def _write_pass(self, b: _Batch | None) -> None:
        if b is None:  # nothing pending: what was cut is being written by a blocking flush
            self._wait_written(self._cut_order)
        else:
            self._write(b)

    def _done_pass(self, b: _Batch | None) -> None:
        if b is not None:
            self._done(b)

    def flush(self) -> None:
        """Blocking commit, for callers outside the event loop (tools, tests, close)."""
        if self.failed is not None:
            raise self._offline()
        batch = self._cut()
        if batch is None:
            self._wait_written(self._cut_order)
            return
        self._write_now(batch)

    def checkpoint(self, reason: str = "requested") -> None:
        """Blocking checkpoint: rewrite changed bitmaps and the superblock, restart the log."""
        if self.failed is not None:
            raise self._offline()
        self._checkpoint_now(reason)

    def _checkpoint_now(self, reason: str, clean: bool = False) -> None:
        batch = self._cut(checkpoint=reason, clean=clean)
        assert batch is not None
        self._write_now(batch)

    def _write_now(self, b: _Batch) -> None:
        """Write one batch on this thread (blocking), then report its records durable."""
        try:
            self._write(b)
        except JournalError as e:
            self._fail(e)
            raise
        self._done(b)
        self._group.settle(b.last_lsn)

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
                return _Batch(self._cut_order, self._group.issued, keys, [(off, data)],
                              self._recorded_size, nrecords=n)
            reason = "log_full"
        self._want_ckpt = None
        gen = self._gen + 1
        al_regions: dict[int, list[int]] = {}
        for key in self._al:
            slot, region = unpack_key(key)
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
                                  REC.pack(L.OP_CHECKPOINT, 0, 0, 0, gen))
        self._gen = gen
        self._log_tail = len(marker)
        self._seq = 1
        self._recorded_size = self._size
        self.last_checkpoint_ns = now
        return _Batch(self._cut_order, self._group.issued, keys, writes, self._size,
                      superblock=(L.SB_OFFSETS[sb.copy], L.push_superblock(sb)),
                      marker=(self._log_offset, marker), reason=reason, generation=gen,
                      nrecords=n)

    def _wait_written(self, order: int) -> None:
        with self._cond:
            while self._written_order < order and self.failed is None:
                self._cond.wait()

    def _write(self, b: _Batch) -> None:
        """Write one batch, in cut order (any thread). Raises JournalError only."""
        with self._cond:
            while self._written_order < b.order - 1 and self.failed is None:
                self._cond.wait()
            try:
                if self.failed is not None:
                    raise self._offline()
                dev = self._dev
                if dev is None:
                    raise JournalOffline(f"Journal LUN {self.path} is closed")
                actual = dev.size()
                if actual < b.min_size:
                    raise shrunk(self.path, b.min_size, actual)
                for off, data in b.writes:
                    dev.pwrite(data, off)
                dev.sync()
                for part in (b.superblock, b.marker):
                    if part is not None:
                        dev.pwrite(part[1], part[0])
                        dev.sync()
            except OSError as e:
                raise io_error(e, self.path, "writing") from None
            finally:
                self._written_order = max(self._written_order, b.order)
                self._cond.notify_all()

    def _done(self, b: _Batch) -> None:
        """Bookkeeping of a written batch (the group commit then settles ``b.last_lsn``)."""
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

    def _fail(self, e: JournalError) -> None:
        """Take the journal offline with ``e`` (the first failure wins)."""
        self._group.fail(e)

    def _on_failed(self, e: JournalError) -> None:
        """The group commit's first failure: say so, and wake writers waiting for their turn."""
        _log.error("journal_offline", alarm=e.alarm, error=str(e), path=str(self.path))
        with self._cond:
            self._cond.notify_all()

    def _offline(self) -> JournalError:
        """A fresh copy of the first failure (each waiter gets its own exception object)."""
        if self.failed is None:
            return JournalOffline(f"Journal LUN {self.path} is closed")
        return copy.copy(self.failed)

    # -- queries -------------------------------------------------------------------------
    @property
    def failed(self) -> JournalError | None:
        """The first failure (the journal is offline) or None."""
        return self._group.failed

    def usage(self) -> dict[str, Any]:
        """What ``coredr journal status`` shows: sizes, log use, per-LUN dirty and AL counts."""
        per_al: dict[int, int] = {}
        busy = 0
        failed = self.failed
        for key, c in self._al.items():
            slot = unpack_key(key)[0]
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
            "offline": None if failed is None else
            {"alarm": failed.alarm, "message": str(failed)},
            "stats": dict(self.stats),
            "luns": luns,
        }

    @property
    def device(self) -> Device | None:
        """The Journal LUN's device while open (a SAN LUN's :meth:`Device.trouble` is watched)."""
        return self._dev

    # -- size and slots ------------------------------------------------------------------
    def refresh_size(self) -> int:
        """Re-read the LUN's size: growth is used (more slots), shrinking is an alarm.

        The grown size is recorded at the next checkpoint; a journal that
        shrank below its recorded size goes offline (reopen it once grown back).
        """
        if self._closed or self._dev is None:
            raise JournalOffline(f"Journal LUN {self.path} is closed")
        try:
            actual = self._dev.size()
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
        if self.failed is not None:
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
            if self.failed is None:
                if clean:
                    self.peer_lost()
                    for key in self._al:
                        self._slots[unpack_key(key)[0]].changed = True
                    self._al.clear()
                    self._checkpoint_now("close", clean=True)
                else:
                    self.flush()
        finally:
            with self._cond:
                while self._written_order < self._cut_order and self.failed is None:
                    self._cond.wait()
                self._release()
            _log.info("journal_closed", path=str(self.path), clean=clean and self.failed is None)

    def abandon(self) -> None:
        """Close the descriptor without writing anything: what a power cut leaves (tests, drills)."""
        if self._closed:
            return
        with self._cond:
            self._release()
        # not a failure to report (no journal_offline alarm): only nothing may commit now
        self._group.fail(JournalOffline(f"Journal LUN {self.path} was abandoned"), report=False)

    def _release(self) -> None:
        dev, self._dev = self._dev, None
        self._closed = True
        if dev is not None:
            with contextlib.suppress(OSError):
                dev.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
