"""Edge blockstore: batched appends and drain(), segment recycling and seals, format v1/v2."""

from __future__ import annotations

import asyncio
import errno
import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.blockstore import (
    ABSENT,
    FULL,
    PARTIAL,
    REC,
    REC_HEAD,
    SECTOR,
    SEG_HEADER,
    Blockstore,
    BlockstoreError,
    Record,
    RegionCache,
    store,
    wal,
)
from steelfusion import fileio
from steelfusion.wire import crc32c

KiB, MiB = 1 << 10, 1 << 20
LUNS = {1: 4 * MiB, 2: 2 * MiB}


def _bs(d: Path, luns: dict[int, int] | None = None) -> Blockstore:
    return Blockstore(d, luns or LUNS, 1 << 30)


def _workload(seed: int, n: int) -> list[tuple[int, int, bytes]]:
    """Overlapping writes of mixed sizes, often contiguous (so cache runs merge)."""
    rng = random.Random(seed)
    out = []
    off = 0
    for _ in range(n):
        lun = rng.choice([1, 2])
        size = rng.choice([512, 4096, 4096, 8192, 65536])
        if rng.random() < 0.5:
            off = rng.randrange(0, (LUNS[lun] - size) // 512) * 512
        off = min(off, LUNS[lun] - size)
        out.append((lun, off, rng.randbytes(size)))
        off += size
    return out


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()
            and (p.suffix == ".img" or p.parent.name == "wal")}


@pytest.fixture
def small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wal, "SEG_BYTES", 256 * KiB)


def test_batched_drain_matches_one_drain_per_write(tmp_path: Path, small_segments: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fileio, "IOV_MAX", 7)  # several pwritev calls per run
    work = _workload(3, 400)
    one = _bs(tmp_path / "one")
    for lun, off, data in work:
        one.append(lun, off, data)
        one.drain()
    batched = _bs(tmp_path / "batched")
    rng = random.Random(4)
    for lun, off, data in work:
        batched.append(lun, off, data)
        if rng.random() < 0.05:
            batched.drain()
    batched.drain()
    assert batched.pending_writes == 0
    assert len(batched.log.segments()) > 3  # the batches crossed segment boundaries
    # byte-identical log segments and cache files
    assert _files(tmp_path / "one") == _files(tmp_path / "batched")
    model = {lun: bytearray(size) for lun, size in LUNS.items()}
    for lun, off, data in work:
        model[lun][off:off + len(data)] = data
    for lun, size in LUNS.items():
        assert batched.caches[lun].read(0, size) == bytes(model[lun])
    # a fresh blockstore over the directory (a crash) replays the same records and data
    got = _bs(tmp_path / "batched")
    assert [(r.lun, r.seq, r.offset, bytes(got.data_of(r))) for r in got.uncommitted()] == \
        [(r.lun, r.seq, r.offset, bytes(batched.data_of(r))) for r in batched.uncommitted()]
    assert got.log.corrupt == []


def test_reads_see_queued_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "MEM_DATA_MAX", 0)  # data_of must read the log
    bs = _bs(tmp_path)
    cache = bs.caches[1]
    rec = bs.append(1, 8192, b"n" * 4096)
    assert bs.pending_writes == 1
    assert cache.missing(8192, 4096) == []  # marked at once
    assert cache.read(8192, 4096) == b"n" * 4096
    assert bs.pending_writes == 0
    rec2 = bs.append(1, 0, b"m" * 512)
    assert rec.data is None and bs.data_of(rec2) == b"m" * 512
    bs.append(1, 512, b"o" * 512)
    cache.fill(0, b"c" * cache.region)  # a fill drains first, then keeps local sectors
    assert cache.read(0, 2048) == b"m" * 512 + b"o" * 512 + b"c" * 1024


def test_crash_loses_only_undrained(tmp_path: Path) -> None:
    bs = _bs(tmp_path)
    bs.append(1, 0, b"a" * 4096)
    bs.append(2, 0, b"b" * 4096)
    bs.drain()
    bs.append(1, 4096, b"c" * 4096)  # never drained: never acknowledged
    bs2 = _bs(tmp_path)  # crash: bs simply abandoned
    assert [(r.lun, bytes(bs2.data_of(r))) for r in bs2.uncommitted()] == \
        [(1, b"a" * 4096), (2, b"b" * 4096)]
    assert bs2.log.corrupt == []


def test_backstop_drains_on_next_loop_turn(tmp_path: Path) -> None:
    async def main() -> None:
        bs = _bs(tmp_path)
        bs.append(1, 0, b"x" * 4096)
        assert bs.pending_writes == 1
        await asyncio.sleep(0)  # a turn left for the caller's own barrier
        await asyncio.sleep(0)
        assert bs.pending_writes == 0 and bs.caches[1].queued == 0

    asyncio.run(main())


def _live(bs: Blockstore, appended: list[tuple[Record, bytes]]) -> list[tuple[int, bytes]]:
    """What a replay must return: every record still in a segment file, nothing else,
    except those up to the committed seq persisted when a segment was last retired.

    (Committed records after it that share a segment with uncommitted ones
    are replayed too; the Core recognises them by seq.)
    """
    return [(r.seq, d) for r, d in appended
            if r.seg in bs.log.fds and r.seq > bs._committed_saved[r.lun]]


def test_recycled_segment_never_replays_its_previous_life(tmp_path: Path,
                                                          small_segments: None) -> None:
    bs = _bs(tmp_path)
    inodes: dict[int, int] = {}
    appended = []
    for i in range(200):  # one size only: stale records line up with the current ones
        data = os.urandom(8192)
        appended.append((bs.append(1, (i % 64) * 8192, data), data))
        bs.drain()
        for seg in bs.log.segments():
            inodes.setdefault(seg, os.stat(bs.log._path(seg)).st_ino)
        if i % 10 == 9:
            bs.commit(1, appended[-4][0].seq)  # keep a few uncommitted
    # files were reused: a few files served many segments
    assert len(inodes) > 6 and len(set(inodes.values())) <= 2 + wal.SPARES_MAX
    bs2 = _bs(tmp_path)  # crash
    assert [(r.seq, bytes(bs2.data_of(r))) for r in bs2.uncommitted()] == _live(bs, appended)
    assert bs2.log.corrupt == []


def test_stale_tail_behind_current_records(tmp_path: Path, small_segments: None) -> None:
    """The last segment is a recycled file: its old records follow the new ones exactly."""
    bs = _bs(tmp_path)
    appended = [(bs.append(1, i * 8192, b"o" * 8192), b"o" * 8192) for i in range(60)]
    bs.drain()
    bs.commit(1, appended[-1][0].seq)
    assert bs.log.spares  # the sealed segments became spares
    spare_inodes = {os.fstat(fd).st_ino for _, fd in bs.log.spares}
    while os.stat(bs.log._path(bs.log.active_seg)).st_ino not in spare_inodes:
        appended.append((bs.append(1, 0, b"n" * 8192), b"n" * 8192))
        bs.drain()
    for _ in range(3):  # a few more in the recycled file, then its previous life
        appended.append((bs.append(1, 8192, b"m" * 8192), b"m" * 8192))
    bs.drain()
    bs2 = _bs(tmp_path)
    got = [(r.seq, bytes(bs2.data_of(r))) for r in bs2.uncommitted()]
    assert got == _live(bs, appended)
    assert got[-4:] == [(r.seq, d) for r, d in appended[-4:]]
    assert bs2.log.corrupt == []


def test_sealed_segments_replay_without_corruption(tmp_path: Path, small_segments: None) -> None:
    bs = _bs(tmp_path)
    recs = [bs.append(2, (i % 100) * 4096, os.urandom(4096)) for i in range(300)]
    bs.drain()
    segs = bs.log.segments()
    assert len(segs) > 3
    raw = bs.log._path(segs[0]).read_bytes()
    pos = SEG_HEADER.size
    while True:  # walk to the seal
        flags, length = REC.unpack_from(raw, pos)[2], REC.unpack_from(raw, pos)[7]
        if flags & wal.FLAG_SEAL:
            break
        pos += REC.size + length
    for _ in range(3):  # crash, restart (which seals the last segment), and again
        bs = _bs(tmp_path)
        assert bs.log.corrupt == []
        assert [r.seq for r in bs.uncommitted()] == [r.seq for r in recs]
        bs.append(2, 0, b"z" * 512)
        bs.drain()
        recs.append(bs.uncommitted()[-1])


def test_unsealed_middle_segment_is_corrupt(tmp_path: Path, small_segments: None) -> None:
    bs = _bs(tmp_path)
    for i in range(200):
        bs.append(1, i * 4096, os.urandom(4096))
    bs.drain()
    first = bs.log._path(bs.log.segments()[0])
    raw = bytearray(first.read_bytes())
    raw[SEG_HEADER.size + 3 * (REC.size + 4096) + REC.size + 7] ^= 1  # a bad 4th record
    first.write_bytes(bytes(raw))
    bs2 = _bs(tmp_path)
    assert len(bs2.log.corrupt) == 1 and "segment" in bs2.log.corrupt[0]


def _v1_segment(records: list[tuple[int, int, int, int, bytes]]) -> bytes:
    """A segment as the previous build wrote it: version 1, CRC from 0, no seal."""
    head = b"SFWALSEG" + (1).to_bytes(4, "big")
    out = bytearray(head + crc32c(head).to_bytes(4, "big"))
    for gseq, lun, seq, offset, data in records:
        h = REC_HEAD.pack(b"SFWR", 1, 0, gseq, lun, seq, offset, len(data))
        out += h + crc32c(data, crc32c(h)).to_bytes(4, "big") + data
    return bytes(out)


def test_version_1_segment_replays_and_is_recycled_safely(tmp_path: Path,
                                                          small_segments: None) -> None:
    wal = tmp_path / "wal"
    wal.mkdir(parents=True)
    old = [(g, 1, 10 + g, g * 4096, bytes([g]) * 4096) for g in range(1, 9)]
    (wal / "seg-000000000007.wal").write_bytes(_v1_segment(old))
    bs = _bs(tmp_path)
    assert [(r.seq, r.offset, bytes(bs.data_of(r))) for r in bs.uncommitted()] == \
        [(s, o, d) for _, _, s, o, d in old]
    assert bs.caches[1].read(4096, 4096) == bytes([1]) * 4096
    assert bs.next_seq[1] > 18 and bs.log.active_seg == 8
    bs.append(1, 0, b"n" * 4096)
    bs.drain()
    bs = _bs(tmp_path)  # crash: the v1 segment is not last any more, and not corrupt
    assert bs.log.corrupt == [] and len(bs.uncommitted()) == 9
    bs.commit(1, bs.next_seq[1] - 1)
    assert any(n == 7 for n, _ in bs.log.spares)  # the v1 file is a spare now
    v1_inode = os.fstat(next(fd for n, fd in bs.log.spares if n == 7)).st_ino
    recs = []
    while True:  # roll until the v1 file is a segment again
        recs.append(bs.append(1, 0, b"w" * 4096))
        bs.drain()
        if os.stat(bs.log._path(bs.log.active_seg)).st_ino == v1_inode:
            break
    bs2 = _bs(tmp_path)
    assert [r.seq for r in bs2.uncommitted()] == [r.seq for r in recs]
    assert bs2.log.corrupt == []


def test_drain_error_fails_the_blockstore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bs = _bs(tmp_path)
    bs.append(1, 0, b"a" * 4096)
    bs.drain()

    def full(*_: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwritev", full)
    bs.append(1, 4096, b"b" * 4096)
    with pytest.raises(BlockstoreError, match="No space"):
        bs.drain()
    assert bs.failed is not None
    with pytest.raises(BlockstoreError):
        bs.append(1, 8192, b"c" * 4096)
    with pytest.raises(BlockstoreError):
        bs.drain()
    with pytest.raises(BlockstoreError):
        asyncio.run(bs.flush())
    monkeypatch.undo()
    bs.close()  # no error a second time, no cache map trusted
    assert not (tmp_path / "cache-1.map").exists()
    bs2 = _bs(tmp_path)  # the restart: only the write drained before the failure
    assert [bytes(bs2.data_of(r)) for r in bs2.uncommitted()] == [b"a" * 4096]


def test_short_writes_are_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwritev

    def short(fd: int, bufs: list[bytes], pos: int) -> int:
        joined = b"".join(bytes(b) for b in bufs)
        return real(fd, [joined[:1000]], pos)

    work = _workload(5, 60)
    bs = _bs(tmp_path / "a")
    monkeypatch.setattr(os, "pwritev", short)
    for lun, off, data in work:
        bs.append(lun, off, data)
    bs.drain()
    monkeypatch.undo()
    ref = _bs(tmp_path / "b")
    for lun, off, data in work:
        ref.append(lun, off, data)
    ref.drain()
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_commit_before_drain_keeps_segment_until_written(tmp_path: Path,
                                                         small_segments: None) -> None:
    bs = _bs(tmp_path)
    recs = [bs.append(1, i * 8192, os.urandom(8192)) for i in range(100)]
    assert bs.log.segments() == [1]  # nothing written yet: the next segments open at drain
    bs.commit(1, recs[-1].seq)
    bs.drain()  # writes into the committed segments, then recycles them
    assert bs.log.segments() == [bs.log.active_seg]
    assert 0 < len(bs.log.spares) <= wal.SPARES_MAX
    bs.append(1, 0, b"k" * 512)
    bs.drain()
    bs2 = _bs(tmp_path)
    assert [bytes(bs2.data_of(r)) for r in bs2.uncommitted()][-1] == b"k" * 512


def test_zero_copy_rule(tmp_path: Path) -> None:
    bs = _bs(tmp_path)
    data = os.urandom(4096)
    assert bs.append(1, 0, data).data is data
    pdu = bytearray(48 + 4096)  # a per-PDU buffer: header, then the data
    view = memoryview(pdu)[48:]
    assert bs.append(1, 0, view).data is view
    big = memoryview(bytes(1 << 20))[:4096]  # would pin a whole MiB: copied
    rec = bs.append(1, 0, big)
    assert rec.data is not big and rec.data == bytes(4096)
    caller = bytearray(b"q" * 4096)  # the caller may reuse it: copied
    rec = bs.append(1, 0, caller)
    caller[:] = b"r" * 4096
    assert rec.data == b"q" * 4096
    bs.drain()
    assert bs.caches[1].read(0, 4096) == b"q" * 4096
    assert bs.mem_bytes == 4 * 4096


# -- region cache fast paths against a per-sector model -------------------------------------
SIZE = 40 * SECTOR - 3 * SECTOR  # regions of 8 sectors; the last one is short
CACHE_OPS = st.lists(st.tuples(st.sampled_from(["write", "fill", "missing"]),
                               st.integers(0, SIZE - 1), st.integers(1, 3 * 8 * SECTOR)),
                     max_size=60)


@given(CACHE_OPS)
@settings(max_examples=200, deadline=None)
def test_region_state_matches_sector_model(tmp_path_factory: pytest.TempPathFactory,
                                           ops: list[tuple[str, int, int]]) -> None:
    cache = RegionCache(tmp_path_factory.mktemp("m") / "c.img", SIZE, 8 * SECTOR)
    nsec = (SIZE + SECTOR - 1) // SECTOR
    written = [False] * nsec
    filled: set[int] = set()

    def sectors(r: int) -> range:
        return range(r * 8, min(r * 8 + 8, nsec))

    def state(r: int) -> int:
        if r in filled or all(written[s] for s in sectors(r)):
            return FULL
        return PARTIAL if any(written[s] for s in sectors(r)) else ABSENT

    for op, off, length in ops:
        length = min(length, SIZE - off)
        if op == "write":
            cache.queue_write(off, b"w" * length)
            for s in range(off // SECTOR, (off + length + SECTOR - 1) // SECTOR):
                written[s] = True
        elif op == "fill":
            r = off // cache.region
            cache.fill(r, b"f" * (min(SIZE, (r + 1) * cache.region) - r * cache.region))
            filled.add(r)
        else:
            want = [r for r in range(off // cache.region, (off + length - 1) // cache.region + 1)
                    if state(r) != FULL
                    and not all(written[s] for s in range(max(off, r * 8 * SECTOR) // SECTOR,
                                                          (min(off + length, (r + 1) * 8 * SECTOR)
                                                           + SECTOR - 1) // SECTOR))]
            assert cache.missing(off, length) == want
        assert cache.state.tolist() == [state(r) for r in range(cache.nregions)]
        assert all(cache.state[r] == PARTIAL for r in cache.masks)
