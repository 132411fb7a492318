"""Edge blockstore: replay never serves data older than what survives, cache writes off the ack path."""

from __future__ import annotations

import asyncio
import errno
import os
import random
from pathlib import Path

import pytest

from edge.blockstore import FULL, Blockstore, BlockstoreError, store, wal

KiB, MiB = 1 << 10, 1 << 20


def _crash(bs: Blockstore) -> None:
    """What the process's death does: close every file, write nothing more."""
    for fd in [*bs.log.fds.values(), *(fd for _, fd in bs.log.spares),
               *(c.fd for c in bs.caches.values())]:
        os.close(fd)


def _fill_segment(bs: Blockstore, lun: int, base: int) -> None:
    """Append to ``lun`` above ``base`` until the active segment rolls."""
    seg, i = bs.log.active_seg, 0
    while bs.log.active_seg == seg:
        bs.append(lun, base + i * 8 * KiB, os.urandom(8 * KiB))
        i += 1


@pytest.mark.parametrize("clean", [False, True], ids=["crash", "clean-close"])
def test_older_committed_write_never_replays_over_a_retired_newer_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean: bool) -> None:
    """X then Y at offset 0, both committed; Y's segment is retired, X's is kept
    alive by an uncommitted write of another LUN. After a restart, offset 0 must
    read Y (from the cache or the Core), never X."""
    monkeypatch.setattr(wal, "SEG_BYTES", 64 * KiB)
    luns = {1: 4 * MiB, 2: 1 * MiB}
    bs = Blockstore(tmp_path, luns, 1 << 30, region_bytes=4096)
    x = bs.append(1, 0, b"X" * 4096)
    bs.append(2, 0, b"K" * 4096)  # never committed: keeps x's segment alive
    _fill_segment(bs, 1, MiB)
    y = bs.append(1, 0, b"Y" * 4096)
    _fill_segment(bs, 1, 2 * MiB)
    bs.drain()
    bs.commit(1, bs.next_seq[1] - 1)  # the Core has every write of LUN 1
    assert x.seg in bs.log.segments() and y.seg not in bs.log.segments()
    if clean:
        bs.close()
    else:
        _crash(bs)  # no cache map is saved
    bs2 = Blockstore(tmp_path, luns, 1 << 30, region_bytes=4096)
    cache = bs2.caches[1]
    if clean:  # the map kept region 0, which holds Y
        assert cache.missing(0, 4096) == [] and cache.read(0, 4096) == b"Y" * 4096
    else:  # nothing trusted: fetched from the Core, which has Y
        assert cache.missing(0, 4096) == [0]
        assert not cache.state.any()  # only committed records of LUN 1 survived
    assert [(r.lun, bytes(bs2.data_of(r))) for r in bs2.uncommitted()] == [(2, b"K" * 4096)]
    assert bs2.caches[2].read(0, 4096) == b"K" * 4096
    assert bs2.committed_seq[1] == bs.next_seq[1] - 1


def test_committed_seqs_persisted_per_retired_segment_not_per_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wal, "SEG_BYTES", 64 * KiB)
    saves: list[Path] = []
    real = store.atomic_write

    def counted(path: Path, data: bytes) -> None:
        saves.append(path)
        real(path, data)

    monkeypatch.setattr(store, "atomic_write", counted)
    bs = Blockstore(tmp_path, {1: 4 * MiB}, 1 << 30)
    saves.clear()
    for i in range(64):  # about eight segments' worth, each write committed at once
        rec = bs.append(1, i * 8 * KiB, os.urandom(8 * KiB))
        bs.drain()
        bs.commit(1, rec.seq)
    retired = bs.log.active_seg - 1
    assert 0 < len(saves) <= retired
    # a commit that retires nothing persists nothing
    n = len(saves)
    rec = bs.append(1, 0, b"a" * 512)
    bs.drain()
    bs.commit(1, rec.seq)
    assert len(saves) == n


def test_failed_persist_keeps_the_segment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wal, "SEG_BYTES", 64 * KiB)
    bs = Blockstore(tmp_path, {1: 4 * MiB}, 1 << 30)
    _fill_segment(bs, 1, 0)
    bs.drain()

    def broken(*_: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store, "atomic_write", broken)
    first = bs.log.segments()[0]
    bs.commit(1, bs.next_seq[1] - 1)
    assert first in bs.log.segments()  # kept: replaying it is safe
    monkeypatch.undo()
    bs2 = Blockstore(tmp_path, {1: 4 * MiB}, 1 << 30)  # crash: replays it, Core acks again
    assert bs2.log.corrupt == [] and bs2.uncommitted()


# -- randomized: appends, drains, commits, reads, crashes and clean restarts ----------------
LUNS = {1: 64 * KiB, 2: 32 * KiB}
REGION = 4 * KiB


@pytest.mark.parametrize("mark_every", [store.MARK_BYTES, 1], ids=["marks", "mark-each-commit"])
@pytest.mark.parametrize("seed", range(12))
def test_random_crashes_never_expose_stale_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                seed: int, mark_every: int) -> None:
    """Whatever the cache holds or marks after any restart is the newest data.

    The model: the Core holds exactly the committed prefix of each LUN; a host
    must read that overlaid by every acknowledged (drained) uncommitted write,
    and by appended, undrained writes until a crash drops them.
    """
    monkeypatch.setattr(wal, "SEG_BYTES", 16 * KiB)  # rolls and recycles every few writes
    monkeypatch.setattr(store, "MARK_BYTES", mark_every)  # COMMIT marks: replay skips more
    marks: list[int] = []
    real_mark = wal.WriteLog.mark
    monkeypatch.setattr(wal.WriteLog, "mark", lambda self, g, lun, seq: (
        marks.append(seq), real_mark(self, g, lun, seq))[-1])
    rng = random.Random(seed)
    core = {lun: bytearray(size) for lun, size in LUNS.items()}
    drained: dict[int, list[tuple[int, int, bytes]]] = {lun: [] for lun in LUNS}
    undrained: dict[int, list[tuple[int, int, bytes]]] = {lun: [] for lun in LUNS}
    committed = dict.fromkeys(LUNS, 0)

    def reopen() -> Blockstore:
        bs = Blockstore(tmp_path, LUNS, 1 << 30, region_bytes=REGION)
        for lun, seq in committed.items():  # the Core acks the resent writes it has
            bs.commit(lun, seq)
        return bs

    def check(bs: Blockstore, restarted: bool) -> None:
        for lun, size in LUNS.items():
            want = bytearray(core[lun])
            for _, off, data in drained[lun] + undrained[lun]:
                want[off:off + len(data)] = data
            cache = bs.caches[lun]
            if restarted:  # before any fill: every region marked FULL is the newest
                for r in map(int, (cache.state == FULL).nonzero()[0]):
                    base = r * REGION
                    assert cache.read(base, REGION) == want[base:base + REGION], \
                        f"seed {seed}: stale region {r} of LUN {lun}"
            for r in cache.missing(0, size):  # what a host read fetches from the Core
                cache.fill(r, bytes(core[lun][r * REGION:(r + 1) * REGION]))
            assert cache.read(0, size) == want, f"seed {seed}: LUN {lun}"

    bs = reopen()
    for _ in range(250):
        op = rng.random()
        lun = rng.choice(list(LUNS))
        if op < 0.55:
            n = rng.choice([1, 2, 8, 16]) * 512
            off = rng.randrange(0, (LUNS[lun] - n) // 512 + 1) * 512
            data = rng.randbytes(n)
            undrained[lun].append((bs.append(lun, off, data).seq, off, data))
        elif op < 0.72:
            bs.drain()
            for q in LUNS:
                drained[q] += undrained[q]
                undrained[q].clear()
        elif op < 0.87 and drained[lun]:
            upto = rng.randrange(len(drained[lun])) + 1
            for seq, off, data in drained[lun][:upto]:
                core[lun][off:off + len(data)] = data
                committed[lun] = seq
            del drained[lun][:upto]
            bs.commit(lun, committed[lun])
        elif op < 0.92:
            check(bs, restarted=False)
            for q in LUNS:  # a cache read drains the log first
                drained[q] += undrained[q]
                undrained[q].clear()
        elif op < 0.97:  # crash: undrained writes were never acknowledged, they are gone
            for q in LUNS:
                undrained[q].clear()
            _crash(bs)
            bs = reopen()
            check(bs, restarted=True)
        else:
            bs.close()
            for q in LUNS:
                drained[q] += undrained[q]
                undrained[q].clear()
            bs = reopen()
            check(bs, restarted=True)
    assert bs.log.corrupt == []
    assert len(marks) > 10 or mark_every > 1
    bs.close()


# -- cache writes off the acknowledgement path ---------------------------------------------
def test_drain_writes_the_log_only_and_reads_see_the_data(tmp_path: Path) -> None:
    bs = Blockstore(tmp_path, {1: 4 * MiB}, 1 << 30)
    cache = bs.caches[1]
    bs.append(1, 4096, b"a" * 4096)
    bs.drain()
    assert bs.pending_writes == 0 and cache.queued == 1  # in the log; the cache write waits
    assert cache.read(4096, 4096) == b"a" * 4096  # a read writes the queued cache writes first
    assert cache.queued == 0
    bs.append(1, 4096, b"b" * 4096)
    assert cache.read(4096, 4096) == b"b" * 4096  # also before the drain (which it does)
    assert bs.pending_writes == 0


def test_cache_writes_go_out_at_the_next_loop_turn(tmp_path: Path) -> None:
    async def main() -> None:
        bs = Blockstore(tmp_path, {1: 4 * MiB}, 1 << 30)
        cache = bs.caches[1]
        for i in range(32):
            bs.append(1, i * 4096, bytes([i]) * 4096)
        bs.drain()
        assert cache.queued == 32
        assert os.pread(cache.fd, 4096, 0) == bytes(4096)
        await asyncio.sleep(0)
        assert cache.queued == 0 and os.pread(cache.fd, 4096, 31 * 4096) == bytes([31]) * 4096
        bs.close()

    asyncio.run(main())


def test_cache_writes_follow_a_barrier_scheduled_after_the_append(tmp_path: Path) -> None:
    """A task appends, then schedules its response (the target's call_soon'd
    flush, whose barrier drains): the cache write still comes after it."""
    async def main() -> None:
        bs = Blockstore(tmp_path, {1: 4 * MiB}, 1 << 30)
        seen = []

        def respond() -> None:
            bs.drain()
            seen.append((bs.pending_writes, bs.caches[1].queued))

        bs.append(1, 0, b"t" * 4096)
        asyncio.get_running_loop().call_soon(respond)
        for _ in range(3):
            await asyncio.sleep(0)
        assert seen == [(0, 1)] and bs.caches[1].queued == 0
        bs.close()

    asyncio.run(main())


def test_cache_write_error_fails_the_blockstore(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    bs = Blockstore(tmp_path, {1: 4 * MiB, 2: 4 * MiB}, 1 << 30)
    bs.append(1, 0, b"o" * 4096)
    bs.write_caches()
    real = os.pwritev
    cache_fd = bs.caches[1].fd

    def eio(fd: int, bufs: list[bytes], pos: int) -> int:
        if fd == cache_fd:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, bufs, pos)

    monkeypatch.setattr(os, "pwritev", eio)

    async def main() -> None:
        bs.append(1, 0, b"n" * 4096)
        bs.append(2, 0, b"m" * 4096)
        bs.drain()  # the log is fine: these writes are acknowledged
        await asyncio.sleep(0)  # the cache write fails here, after the acknowledgement

    asyncio.run(main())
    assert bs.failed is not None
    with pytest.raises(BlockstoreError, match="Input/output"):
        bs.caches[1].read(0, 4096)  # never the old "o" data
    with pytest.raises(BlockstoreError):
        bs.append(1, 0, b"x" * 512)
    monkeypatch.undo()
    bs.close()
    assert not (tmp_path / "cache-1.map").exists()
    bs2 = Blockstore(tmp_path, {1: 4 * MiB, 2: 4 * MiB}, 1 << 30)  # the restart replays the log
    assert bs2.caches[1].read(0, 4096) == b"n" * 4096
    assert bs2.caches[2].read(0, 4096) == b"m" * 4096


def test_queued_cache_writes_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "QUEUE_BYTES_MAX", 64 * KiB)
    bs = Blockstore(tmp_path, {1: 4 * MiB}, 1 << 30)
    for i in range(40):
        bs.append(1, i * 4096, b"q" * 4096)
        bs.drain()
        assert bs.caches[1].queued * 4096 <= 64 * KiB + 4096


def test_uncommitted_writes_of_a_removed_or_shrunk_lun_refuse_the_start(tmp_path: Path) -> None:
    """A LUN taken out of the config (or made smaller) while the Edge still holds writes of it
    the Core has not got: they were acknowledged to a host, so replay must not drop them (the
    segment would then be recycled and they were gone for good). The start is refused with
    what to do; put back, the LUN still has them."""
    luns = {1: 1 * MiB, 2: 1 * MiB}
    bs = Blockstore(tmp_path, luns, 1 << 30, region_bytes=4096)
    bs.append(1, 0, b"A" * 4096)
    bs.commit(1, 1)
    bs.append(2, 8192, b"B" * 4096)  # never committed
    bs.drain()
    bs.close()
    with pytest.raises(BlockstoreError, match=r"LUN id\(s\) 2 \(1 writes\).*put the LUN back"):
        Blockstore(tmp_path, {1: 1 * MiB}, 1 << 30, region_bytes=4096)
    with pytest.raises(BlockstoreError, match=r"LUN id\(s\) 2"):
        Blockstore(tmp_path, {1: 1 * MiB, 2: 8192}, 1 << 30, region_bytes=4096)
    back = Blockstore(tmp_path, luns, 1 << 30, region_bytes=4096)
    assert [r.seq for r in back.pending[2]] == [1]
    assert back.caches[2].read(8192, 4096) == b"B" * 4096
    back.commit(2, 1)
    back.drain()
    back.close()
    # once the Core has them, the LUN may go: its committed records are dropped quietly
    Blockstore(tmp_path, {1: 1 * MiB}, 1 << 30, region_bytes=4096).close()


@pytest.mark.parametrize("marks", [True, False], ids=["commit-marks", "no-marks"])
def test_a_killed_edge_replays_what_was_uncommitted_not_every_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, marks: bool) -> None:
    """Issue 18: 100 MiB committed, then 12 MiB not, then SIGKILL. Replay tracks (and the
    uplink resends) the 12 MiB plus at most one mark's worth, not the 112 MiB the log
    holds since its last retired segment. Without the COMMIT marks it is 48 MiB: all of it
    since the first 64 MiB segment was retired."""
    if not marks:
        monkeypatch.setattr(store, "MARK_BYTES", 1 << 62)
        monkeypatch.setattr(Blockstore, "_mark", lambda self, lun: None)
    luns = {1: 256 * MiB}
    bs = Blockstore(tmp_path, luns, 1 << 30)
    chunk = b"d" * (256 * KiB)

    async def go() -> None:
        for i in range(400):  # 100 MiB, committed as the Core acknowledges
            rec = bs.append(1, i * len(chunk), chunk)
            bs.drain()
            if i % 8 == 7:
                bs.commit(1, rec.seq)
            await asyncio.sleep(0)
        for i in range(48):  # 12 MiB the Core has not acknowledged
            bs.append(1, (400 + i) * len(chunk), chunk)
            bs.drain()
        await asyncio.sleep(0)
    asyncio.run(go())
    assert bs.uncommitted_bytes == 12 * MiB
    _crash(bs)
    bs2 = Blockstore(tmp_path, luns, 1 << 30)
    resent = bs2.uncommitted_bytes
    if marks:
        assert 12 * MiB <= resent <= 12 * MiB + store.MARK_BYTES, resent / MiB
        assert bs2.committed_seq[1] >= 400 - 8
    else:
        assert resent == 112 * MiB - wal.SEG_BYTES
    bs2.close()


def test_a_discard_is_one_record_reads_zeros_and_replays(tmp_path: Path) -> None:
    """Issue 18: UNMAP of 8 MiB is one log record with no data: the reserve does not move,
    the cache reads zeros there at once (no fill from the Core may bring old data back),
    and after a crash the record replays (the cache punched again, the discard resent).
    It ships alone in its frame, never coalesced with the writes around it."""
    from edge.shipping import Shipper

    luns = {1: 16 * MiB}
    bs = Blockstore(tmp_path, luns, 1 << 30, region_bytes=64 * KiB)
    w1 = bs.append(1, 0, b"a" * (64 * KiB))
    d = bs.discard(1, 32 * KiB, 8 * MiB)
    w2 = bs.append(1, 8 * MiB + 32 * KiB, b"b" * 4096)  # right after the discarded range
    bs.drain()
    assert (d.length, d.discard, bs.uncommitted_bytes) == (0, 8 * MiB, 64 * KiB + 4096)
    cache = bs.caches[1]
    assert cache.read(0, 64 * KiB) == b"a" * (32 * KiB) + bytes(32 * KiB)
    assert cache.missing(64 * KiB, 8 * MiB - 32 * KiB) == []  # local: never fetched
    ship = Shipper(window_bytes=1 << 30)
    ship.reset(bs.uncommitted(), bs.committed_seq)
    frames = ship.next_frames(bs.committed_seq)
    assert [[r.seq for r in f.recs] for f in frames] == [[w1.seq], [d.seq], [w2.seq]]
    assert [f.nbytes for f in frames] == [64 * KiB, 0, 4096]
    _crash(bs)
    bs2 = Blockstore(tmp_path, luns, 1 << 30, region_bytes=64 * KiB)
    again = bs2.uncommitted()
    assert [(r.seq, r.offset, r.length, r.discard) for r in again] == [
        (w1.seq, 0, 64 * KiB, 0), (d.seq, 32 * KiB, 0, 8 * MiB), (w2.seq, 8 * MiB + 32 * KiB,
                                                                  4096, 0)]
    assert bs2.caches[1].read(0, 64 * KiB) == b"a" * (32 * KiB) + bytes(32 * KiB)
    bs2.commit(1, w2.seq)
    assert bs2.uncommitted() == [] and bs2.uncommitted_bytes == 0
    bs2.close()
