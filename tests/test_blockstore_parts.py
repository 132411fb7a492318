"""Edge blockstore, part by part: the write reserve, the log alone, the on-disk formats pinned.

The formats are written here again from their documented structs (not with
the code's own encoders), so a change to the code that changes a byte on
disk fails here, whatever the replay tests say.
"""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from edge.blockstore import Blockstore, BlockstoreError, RegionCache, WriteLog, WriteReserve
from steelfusion.wire import crc32c

KiB, MiB = 1 << 10, 1 << 20


# -- the write reserve -------------------------------------------------------------------
def test_reserve_is_first_come_first_served() -> None:
    async def main() -> None:
        r = WriteReserve(8 * KiB)
        await r.reserve(6 * KiB)
        r.add(6 * KiB)  # appended: used, no longer merely admitted
        big = asyncio.ensure_future(r.reserve(4 * KiB))
        await asyncio.sleep(0)
        assert r.waiting == 1
        assert not r.try_reserve(1 * KiB)  # it would fit, but the big one is ahead
        small = asyncio.ensure_future(r.reserve(1 * KiB))
        await asyncio.sleep(0)
        assert r.waiting == 2 and not big.done() and not small.done()
        r.free(6 * KiB)
        await asyncio.wait_for(asyncio.gather(big, small), 1)
        assert r.waiting == 0

    asyncio.run(main())


def test_cancelled_head_waiter_lets_the_next_one_in() -> None:
    async def main() -> None:
        r = WriteReserve(8 * KiB)
        assert r.try_reserve(4 * KiB)
        head = asyncio.ensure_future(r.reserve(8 * KiB))  # waits for an empty reserve
        nxt = asyncio.ensure_future(r.reserve(2 * KiB))  # fits, but queued behind the head
        await asyncio.sleep(0)
        assert not nxt.done()
        head.cancel()
        await asyncio.wait_for(nxt, 1)
        assert r.waiting == 0

    asyncio.run(main())


def test_bigger_than_the_reserve_goes_in_when_empty_and_unreserve_gives_back() -> None:
    async def main() -> None:
        r = WriteReserve(4 * KiB)
        assert r.try_reserve(64 * KiB)  # never waits forever
        assert not r.try_reserve(512)
        r.unreserve(64 * KiB)  # its write was never appended
        assert r.try_reserve(4 * KiB)

    asyncio.run(main())


# -- the log alone -----------------------------------------------------------------------
def test_write_log_stands_alone(tmp_path: Path) -> None:
    log = WriteLog(tmp_path)
    log.open_for_append()
    at = [log.append(g, 1, 10 + g, g * 4096, bytes([g]) * 4096) for g in range(1, 4)]
    for seg, _ in at:
        log.hold(seg)  # uncommitted: close keeps the segment
    assert log.read(*at[1], 4096) == bytes([2]) * 4096  # drains itself first
    log.close()
    again = WriteLog(tmp_path)
    got = [(r.gseq, r.seq, r.offset, data) for r, data in again.replay()]
    assert got == [(g, 10 + g, g * 4096, bytes([g]) * 4096) for g in range(1, 4)]
    assert again.corrupt == []


# -- the formats, from their structs ------------------------------------------------------
def _seg(seg: int, records: list[tuple[int, int, int, int, bytes, int]],
         version: int = 3) -> bytes:
    """A segment as the wal module's docstring describes it: records are (gseq, lun, seq,
    offset, data, flags)."""
    head = b"SFWALSEG" + struct.pack(">I", version)
    out = bytearray(head + struct.pack(">I", crc32c(head)))
    seed = crc32c(struct.pack(">Q", seg))
    for gseq, lun, seq, offset, data, flags in records:
        h = b"SFWR" + struct.pack(">HHQIQQI", version, flags, gseq, lun, seq, offset, len(data))
        out += h + struct.pack(">I", crc32c(data, crc32c(h, seed))) + data
    return bytes(out)


def test_segment_bytes_are_format_3(tmp_path: Path) -> None:
    bs = Blockstore(tmp_path, {3: 4 * MiB}, 1 << 30)
    writes = [(3, 0, b"a" * 4096), (3, 8192, b"b" * 512), (3, 4096, b"c" * 1024)]
    recs = [bs.append(lun, off, data) for lun, off, data in writes]
    bs.drain()
    bs.commit(3, recs[1].seq)  # one write left uncommitted: no mark yet (under MARK_BYTES)
    bs.commit(3, recs[2].seq)  # nothing left: a COMMIT mark (flags 2, length 0)
    bs.drain()
    seg = recs[0].seg
    want = _seg(seg, [(r.gseq, r.lun, r.seq, r.offset, d, 0)
                      for r, (_, _, d) in zip(recs, writes, strict=True)]
                + [(recs[2].gseq, 3, recs[2].seq, 0, b"", 2)])
    raw = (tmp_path / "wal" / f"seg-{seg:012d}.wal").read_bytes()
    assert raw[:len(want)] == want and bs.marks_written == 1
    bs.close()


def test_a_version_2_log_replays_and_is_sealed_as_version_2(tmp_path: Path) -> None:
    """An upgrade: the previous build's segment (format 2) replays, and sealing it when the
    new build starts writes a version-2 seal (a version-3 one would make it corrupt)."""
    wal = tmp_path / "wal"
    wal.mkdir()
    old = [(g, 1, 10 + g, g * 4096, bytes([g]) * 4096, 0) for g in range(1, 6)]
    (wal / "seg-000000000004.wal").write_bytes(_seg(4, old, version=2))
    bs = Blockstore(tmp_path, {1: 4 * MiB}, 1 << 30)
    assert [r.seq for r in bs.uncommitted()] == [11, 12, 13, 14, 15]
    bs.append(1, 0, b"n" * 4096)
    bs.drain()
    for fd in [*bs.log.fds.values(), *(fd for _, fd in bs.log.spares),
               *(c.fd for c in bs.caches.values())]:
        os.close(fd)  # killed
    bs2 = Blockstore(tmp_path, {1: 4 * MiB}, 1 << 30)
    assert bs2.log.corrupt == [] and bs2.log.replayed[4].sealed
    assert [r.seq for r in bs2.uncommitted()] == [11, 12, 13, 14, 15, 16]
    bs2.close()


def test_cache_map_bytes(tmp_path: Path) -> None:
    path = tmp_path / "cache-1.img"
    cache = RegionCache(path, 20 * 4096, 4096)
    for r in (0, 2, 9, 19):
        cache.fill(r, bytes([r]) * 4096)
    cache.write(5 * 4096, b"p" * 512)  # partial: not in the map
    cache.close(save=True)
    bits = np.zeros(20, dtype=bool)
    bits[[0, 2, 9, 19]] = True
    body = np.packbits(bits).tobytes()
    assert (tmp_path / "cache-1.map").read_bytes() == body + struct.pack(">I", crc32c(body))
    again = RegionCache(path, 20 * 4096, 4096)
    assert again.missing(0, 20 * 4096) == [r for r in range(20) if r not in (0, 2, 9, 19)]
    assert again.read(9 * 4096, 4096) == bytes([9]) * 4096
    again.close(save=False)


@pytest.mark.parametrize("save", [True, False])
def test_cache_alone_writes_its_own_queue(tmp_path: Path, save: bool) -> None:
    cache = RegionCache(tmp_path / "c.img", 64 * KiB, 4096)
    cache.queue_write(4096, b"q" * 4096)
    assert cache.queued == 1 and cache.read(4096, 4096) == b"q" * 4096 and cache.queued == 0
    cache.close(save=save)
    assert (tmp_path / "c.map").exists() == save


# -- a segment this build cannot read: one line, with what to do --------------------------
@pytest.mark.parametrize("header, problem", [
    (b"NOTASEGMxxxxxxxx", "not a write-log segment (bad header); restore it from a backup"),
    (b"SFWALSEG" + struct.pack(">II", 4, crc32c(b"SFWALSEG" + struct.pack(">I", 4))),
     "version 4, this build reads 1, 2, 3; run the newer build that wrote it"),
], ids=["bad-header", "newer-version"])
def test_unreadable_segment_says_what_to_do(tmp_path: Path, header: bytes, problem: str) -> None:
    seg = tmp_path / "wal" / "seg-000000000009.wal"
    seg.parent.mkdir()
    seg.write_bytes(header)
    with pytest.raises(BlockstoreError) as err:
        Blockstore(tmp_path, {1: MiB}, 1 << 30)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{seg}: {problem}, or, accepting that writes the Core has not "
                          f"committed are lost, move {tmp_path} away and start with an empty "
                          "blockstore")
