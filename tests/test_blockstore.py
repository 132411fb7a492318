"""Edge blockstore: write log replay after a crash, commit, reserve, region cache."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.blockstore import FULL, SEG_HEADER, Blockstore, BlockstoreError, RegionCache, wal

MiB = 1 << 20


def _bs(tmp: Path, reserve: int = 64 * MiB, luns: dict[int, int] | None = None) -> Blockstore:
    return Blockstore(tmp / "bs", luns or {1: 16 * MiB, 2: 8 * MiB}, reserve)


def test_append_commit_frees(tmp_path: Path) -> None:
    bs = _bs(tmp_path)
    r1 = bs.append(1, 0, b"a" * 4096)
    r2 = bs.append(1, 4096, b"b" * 4096)
    r3 = bs.append(2, 0, b"c" * 512)
    assert bs.uncommitted_bytes == 4096 * 2 + 512
    assert [r.gseq for r in bs.uncommitted()] == [r1.gseq, r2.gseq, r3.gseq]
    assert r2.seq == r1.seq + 1
    assert bs.commit(1, r1.seq) == 4096
    assert bs.uncommitted_bytes == 4096 + 512
    assert bs.commit(1, r2.seq) == 4096
    assert bs.commit(2, r3.seq) == 512
    assert bs.uncommitted_bytes == 0 and bs.uncommitted() == []


def test_crash_replay_resends_in_order(tmp_path: Path) -> None:
    bs = _bs(tmp_path)
    rng = random.Random(1)
    written = []
    for _ in range(300):
        lun = rng.choice([1, 2])
        off = rng.randrange(0, (8 * MiB) // 512 - 16) * 512
        data = rng.randbytes(rng.choice([512, 4096, 8192]))
        rec = bs.append(lun, off, data)
        written.append((rec.lun, rec.seq, off, data))
    bs.drain()  # what the target does before acknowledging
    bs.commit(1, written[10][1] if written[10][0] == 1 else 0)
    # crash: no close(), the object is simply abandoned
    bs2 = _bs(tmp_path)
    got = [(r.lun, r.seq, r.offset, bs2.data_of(r)) for r in bs2.uncommitted()]
    # everything not yet committed is there, in acknowledgement order, byte for byte
    committed_1 = written[10][1] if written[10][0] == 1 else 0
    must = [w for w in written if not (w[0] == 1 and w[1] <= committed_1)]
    assert [g for g in got if g in must] == must
    # the cache shows the newest data after replay
    model = {1: bytearray(16 * MiB), 2: bytearray(8 * MiB)}
    for lun, _, off, data in written:
        model[lun][off:off + len(data)] = data
    for lun, _, off, data in written[-20:]:
        assert bs2.caches[lun].read(off, len(data)) == bytes(model[lun][off:off + len(data)])
    # sequence numbers keep increasing after the restart
    assert all(bs2.next_seq[lun] > max(w[1] for w in written if w[0] == lun) for lun in (1, 2))


def test_seq_never_reused_after_everything_committed(tmp_path: Path) -> None:
    bs = _bs(tmp_path)
    rec = bs.append(1, 0, b"x" * 512)
    bs.commit(1, rec.seq)
    bs.close()
    bs2 = _bs(tmp_path)
    assert bs2.uncommitted() == []
    assert bs2.append(1, 0, b"y" * 512).seq > rec.seq
    assert bs2.stream == bs.stream


def _two_records(tmp: Path) -> tuple[Blockstore, Path]:
    """A blockstore with writes "a" and "b" in the log, and the path of their segment."""
    bs = _bs(tmp)
    bs.append(1, 0, b"a" * 4096)
    bs.append(1, 4096, b"b" * 4096)
    bs.drain()
    return bs, bs.log._path(bs.log.active_seg)


def test_torn_tail_is_ignored(tmp_path: Path) -> None:
    bs, seg = _two_records(tmp_path)
    with open(seg, "r+b") as f:  # the segment is preallocated: write after the last record
        f.seek(bs.log.active_pos)
        f.write(b"SFWR" + b"\x00" * 20)  # a record header cut short by a crash
    bs2 = _bs(tmp_path)
    assert [bs2.data_of(r)[:1] for r in bs2.uncommitted()] == [b"a", b"b"]


def test_corrupt_record_detected(tmp_path: Path) -> None:
    _, seg = _two_records(tmp_path)
    raw = bytearray(seg.read_bytes())
    raw[SEG_HEADER.size + 44 + 10] ^= 0xFF  # flip a data byte of the first record
    seg.write_bytes(bytes(raw))
    bs2 = _bs(tmp_path)
    # the bad record and everything after it in that segment are not used
    assert bs2.uncommitted() == []


def test_segments_deleted_when_committed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wal, "SEG_BYTES", 64 * 1024)
    bs = _bs(tmp_path)
    recs = [bs.append(1, i * 8192, os.urandom(8192)) for i in range(40)]
    bs.drain()
    assert len(bs.log.segments()) > 3
    bs.commit(1, recs[-1].seq)
    assert bs.log.segments() == [bs.log.active_seg]


def test_reserve_full_waits_never_fails(tmp_path: Path) -> None:
    async def main() -> None:
        bs = _bs(tmp_path, reserve=16384)
        await bs.reserve(16384)
        rec = bs.append(1, 0, b"z" * 16384)
        t = asyncio.ensure_future(bs.reserve(4096))
        await asyncio.sleep(0.05)
        assert not t.done() and bs.writers_waiting == 1
        bs.commit(1, rec.seq)
        await asyncio.wait_for(t, 1)
        # one write bigger than the whole reserve still goes through when it is empty
        bs.append(1, 0, b"q" * 4096)
        bs.commit(1, bs.next_seq[1] - 1)
        await asyncio.wait_for(bs.reserve(1 << 20), 1)

    asyncio.run(main())


def test_flush_group_commit(tmp_path: Path) -> None:
    async def main() -> None:
        bs = _bs(tmp_path)
        for i in range(50):
            bs.append(1, i * 512, b"x" * 512)
        await asyncio.gather(*(bs.flush() for _ in range(20)))
        assert bs.log.unsynced == set()

    asyncio.run(main())


def test_a_failed_sync_is_never_reported_durable_later(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """fsyncgate: after EIO from fdatasync the pages may be gone and the next fdatasync
    succeed. The blockstore must stay failed, not answer GOOD to the next SYNCHRONIZE CACHE."""
    calls = {"n": 0}
    real = os.fdatasync

    def flaky(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(5, "Input/output error")
        real(fd)

    async def main() -> None:
        bs = _bs(tmp_path)
        bs.append(1, 0, b"x" * 4096)
        monkeypatch.setattr(wal.os, "fdatasync", flaky)
        with pytest.raises(BlockstoreError, match="Input/output error"):
            await bs.flush()
        assert bs.failed is not None
        with pytest.raises(BlockstoreError, match="restart needed"):
            await bs.flush()  # the disk "works" again: still failed
        with pytest.raises(OSError, match="Input/output error"):
            await bs.log.sync()  # the log itself is fail-stop too: the first error again
        with pytest.raises(BlockstoreError):
            bs.append(1, 4096, b"y" * 4096)

    asyncio.run(main())


# -- region cache against a model ---------------------------------------------------------
OPS = st.lists(st.tuples(st.sampled_from(["write", "fill", "read"]),
                         st.integers(0, 255), st.integers(1, 40)), max_size=40)


@given(OPS)
@settings(max_examples=120, deadline=None)
def test_region_cache_never_hides_local_writes(tmp_path_factory: pytest.TempPathFactory,
                                               ops: list[tuple[str, int, int]]) -> None:
    tmp = tmp_path_factory.mktemp("cache")
    size = 256 * 512 - 3 * 512  # last region is short
    cache = RegionCache(tmp / "c.img", size, 4096)
    core = np.frombuffer(random.Random(7).randbytes(size), dtype=np.uint8).copy()
    truth = core.copy()  # what a host must read: Core data overlaid by local writes
    counter = 0
    for op, sector, count in ops:
        off = min(sector * 512, size - 512)
        length = min(count * 512, size - off)
        if op == "write":
            counter += 1
            data = bytes([counter % 251]) * length
            cache.write(off, data)
            truth[off:off + length] = counter % 251
        elif op == "fill":
            r = off // cache.region
            base = r * cache.region
            cache.fill(r, core[base:min(base + cache.region, size)].tobytes())
        else:
            for r in cache.missing(off, length):
                base = r * cache.region
                cache.fill(r, core[base:min(base + cache.region, size)].tobytes())
            assert cache.missing(off, length) == []
            assert cache.read(off, length) == truth[off:off + length].tobytes()


def test_cache_map_survives_clean_shutdown_only(tmp_path: Path) -> None:
    c = RegionCache(tmp_path / "c.img", 1 << 20, 65536)
    c.write(0, b"a" * 65536)
    c.close(save=True)
    c2 = RegionCache(tmp_path / "c.img", 1 << 20, 65536)
    assert c2.state[0] == FULL
    # no save (a crash): the map is gone, so nothing is trusted
    c2.close(save=False)
    c3 = RegionCache(tmp_path / "c.img", 1 << 20, 65536)
    assert c3.state[0] != FULL
