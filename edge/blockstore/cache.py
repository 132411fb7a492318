"""The Edge's read cache: one sparse file per LUN, valid region by region.

On disk, under the blockstore directory:

``cache-<lun>.img``
    The cached data, at the LUN's own offsets (sparse: regions never read
    or written take no space).
``cache-<lun>.map``
    After a clean shutdown only: which regions the file holds, one bit per
    region (FULL or not), then a CRC32C (uint32, big-endian) of those bytes.
    It is removed when loaded, so after a crash it is absent and every
    region not rebuilt from the write log is fetched from the Core again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from steelfusion import log
from steelfusion.atomic import atomic_write
from steelfusion.fileio import deallocate, pread_full, pwrite_all, pwritev_all
from steelfusion.wire import crc32c

_log = log.get("blockstore")

SECTOR = 512
ABSENT, PARTIAL, FULL = 0, 1, 2


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
    once either way. The Blockstore passes its ``write_caches`` as the hook
    (the log first, then every cache); alone, the cache writes its own queue.
    """

    def __init__(self, path: Path, size: int, region: int, *,
                 drain_hook: Callable[[], None] | None = None) -> None:
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
        self._q: list[tuple[int, bytes | memoryview]] = []
        self.drain_hook: Callable[[], None] = drain_hook or self.flush_queue
        self.map_path = path.with_suffix(".map")
        self._load_map()

    # -- the map file ----------------------------------------------------------------
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

    # -- writes ------------------------------------------------------------------------
    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write now (replay, tests); after whatever is queued, so order holds."""
        if self._q:
            self.drain_hook()
        pwrite_all(self.fd, data, offset)
        self.mark(offset, len(data))

    def discard(self, offset: int, length: int) -> None:
        """The host deallocated the range: it reads zeros here from now on (a hole punched
        in the cache file, after whatever is queued), and no fill from the Core, which may
        not have the discard yet, goes over it."""
        if self._q:
            self.drain_hook()
        deallocate(self.fd, offset, length)
        self.mark(offset, length)

    def queue_write(self, offset: int, data: bytes | memoryview) -> None:
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
        bufs: list[bytes | memoryview] = []
        try:
            for i, (off, data) in enumerate(q):
                if off != end:
                    if bufs:
                        pwritev_all(self.fd, bufs, start)
                    bufs = []
                    first, start, end = i, off, off
                bufs.append(data)
                end += len(data)
            pwritev_all(self.fd, bufs, start)
        except BaseException:
            self._q = q[first:] + self._q
            raise

    # -- region state ----------------------------------------------------------------
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

    @property
    def full_regions(self) -> int:
        return self._st.count(FULL)

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

    def fill(self, r: int, data: bytes | memoryview) -> None:
        """Apply a region fetched from the Core, leaving locally written sectors alone."""
        if self._st[r] == FULL:
            return
        if self._q:
            self.drain_hook()
        base = r * self.region
        mask = self.masks.pop(r, None)
        view = memoryview(data)
        if mask is None:
            pwrite_all(self.fd, view, base)
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
                pwrite_all(self.fd, view[s * SECTOR:e * SECTOR], base + s * SECTOR)
                s = e
        self._st[r] = FULL

    def read(self, offset: int, length: int) -> bytes:
        if self._q:
            self.drain_hook()
        return pread_full(self.fd, length, offset)

    def close(self, save: bool) -> None:
        """Save the map (clean shutdown) or drop what is queued (a failed blockstore)."""
        if save:
            self.save_map()
        self._q = []
        os.close(self.fd)
