"""Journal LUN: format, replay, crash recovery, damage, sizing (seed 002 "Journal LUN metrics").

Journals are sparse files: a "51 GiB" journal costs a few KiB of disk.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from journal import (
    GIB,
    Journal,
    check_journal,
    describe,
    errors,
    format_journal,
    layout,
    required_size,
)
from journal.__main__ import main as inspect_main
from steelfusion import blockdev
from steelfusion.wire import crc32c

MIB = 1 << 20
LUNS = {1: GIB, 2: 3 * GIB + 5}  # LUN 2's last region is 5 bytes long


@pytest.fixture
def jpath(tmp_path: Path) -> Path:
    return tmp_path / "journal.img"


def open_j(path: Path, luns: dict[int, int] | None = None, **kw: int) -> Journal:
    return Journal.open(path, LUNS if luns is None else luns,
                        size=required_size(len(LUNS if luns is None else luns)), **kw)


def flip(path: Path, offset: int, mask: int = 0x40) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def regions(*xs: int) -> list[int]:
    return list(xs)


# -- sizing (seed) ------------------------------------------------------------------------
def test_required_size_is_the_seed_rule() -> None:
    assert required_size(0) == GIB
    assert required_size(1) == 3 * GIB
    assert required_size(25) == 51 * GIB  # "25 LUNs needs a 51-GB Journal LUN"


def test_too_small_names_the_seed_numbers(jpath: Path) -> None:
    luns = {i: GIB for i in range(25)}
    with pytest.raises(errors.JournalTooSmall) as ei:
        Journal.open(jpath, luns, size=50 * GIB)
    e = ei.value
    assert e.alarm == "journal_too_small"
    assert "51 GiB" in str(e) and "25 protected LUN" in str(e) and "50.0 GiB" in str(e)
    assert (e.need, e.luns) == (51 * GIB, 25)
    assert not jpath.exists()  # nothing half-made
    # An existing journal that is too small for the LUNs configured now.
    format_journal(jpath, 50 * GIB)
    with pytest.raises(errors.JournalTooSmall, match="51 GiB"):
        check_journal(jpath, 0, 25)
    with pytest.raises(errors.JournalTooSmall, match="51 GiB"):
        Journal.open(jpath, luns)
    assert check_journal(jpath, 0, 24) == 50 * GIB
    Journal.open(jpath, {i: GIB for i in range(24)}).close()


def test_check_journal_creates_and_validates(jpath: Path) -> None:
    size = required_size(2)
    assert check_journal(jpath, size, 2) == size
    assert jpath.stat().st_blocks * 512 < 4 * MIB  # sparse
    assert check_journal(jpath, size, 2) == size
    with pytest.raises(errors.JournalUnreachable):
        check_journal(jpath.with_name("missing.img"), 0, 1)
    d = describe(jpath)
    assert d["version"] == layout.VERSION and d["luns"] == [] and d["clean_shutdown"]


# -- round trips --------------------------------------------------------------------------
def test_format_open_replay_round_trip(jpath: Path) -> None:
    j = open_j(jpath)
    assert j.mark_dirty(1, 0, 4096)
    assert j.mark_dirty(1, 5 * MIB - 10, 20)  # spans regions 4 and 5
    assert j.mark_dirty(2, 3 * GIB, 5)  # the short last region
    j.flush()
    u = j.usage()
    assert u["dirty_regions"] == {1: 3, 2: 1}
    assert u["used_log_bytes"] == 2 * layout.SECTOR  # CHECKPOINT block + one record block
    assert j.dirty_bytes(2) == 5
    assert j.dirty_bytes(1) == 3 * MIB
    j.close()
    d = describe(jpath)
    assert d["clean_shutdown"] and d["log"]["blocks"] == 1  # just the CHECKPOINT block
    assert [u["dirty_regions"] for u in d["luns"]] == [3, 1]
    j = open_j(jpath)
    assert j.clean_at_open
    assert j.dirty(1).tolist() == [0, 4, 5]
    assert j.dirty(2).tolist() == [3072]
    assert j.crashed_al_regions(1).size == 0
    j.close()


def test_records_replay_without_checkpoint(jpath: Path) -> None:
    j = open_j(jpath)
    for r in range(10):
        j.mark_dirty(1, r * MIB, 1)
        j.flush()
    j.clear_dirty(1, [2, 3, 4])
    j.flush()
    j.abandon()  # no checkpoint: everything comes from the log
    d = describe(jpath)
    assert d["log"]["blocks"] == 1 + 11 and not d["clean_shutdown"]
    j = open_j(jpath)
    assert j.dirty(1).tolist() == [0, 1, 5, 6, 7, 8, 9]
    j.close()


def test_durability_rule_return_values(jpath: Path) -> None:
    j = open_j(jpath)
    assert j.mark_dirty(1, 0, 1) is True  # new bit: a record must be made durable
    assert j.mark_dirty(1, 0, 1) is True  # still on its way: the second writer waits too
    j.flush()
    assert j.mark_dirty(1, 0, 1) is False  # durable: costs nothing
    assert j.mark_dirty(1, 0, 0) is False  # zero-length touches nothing
    assert j.note_inflight(1, 0, 1) is True
    assert j.note_inflight(1, 0, 1) is True
    j.flush()
    assert j.note_inflight(1, 0, 1) is False
    j.clear_dirty(1, [0])
    assert j.mark_dirty(1, 0, 1) is True  # cleared, then dirtied again: new record
    j.close()


def test_mark_all_dirty_and_bulk_clear(jpath: Path) -> None:
    j = Journal.open(jpath, {7: 1 << 40}, size=required_size(1))
    assert j.usage()["luns"][0]["regions"] == 1 << 20  # 1 TiB / 1 MiB; bitmap 128 KiB
    assert j.mark_all_dirty(7)
    assert j.mark_dirty(7, 12345, 1) is True  # the bulk record is not durable yet
    j.flush()
    assert j.mark_dirty(7, 12345, 1) is False
    assert j.dirty_bytes(7) == 1 << 40
    j.clear_dirty(7, np.arange(0, 1 << 19))
    j.clear_dirty(7, np.arange(600_000, 700_000, 2))  # 50k runs: folded into a checkpoint
    j.flush()
    j.abandon()
    j = Journal.open(jpath, {7: 1 << 40})
    d = j.dirty(7)
    assert d.size == (1 << 20) - (1 << 19) - 50_000
    assert d[0] == 1 << 19 and 600_000 not in d and 600_001 in d
    j.close()


# -- crash recovery and the activity log (DESIGN invariant 5) -------------------------------
def test_crash_then_reopen_keeps_dirty_and_al(jpath: Path) -> None:
    j = open_j(jpath)
    j.mark_dirty(1, 10 * MIB, 1)
    j.note_inflight(1, 20 * MIB, 4096)
    j.note_inflight(2, 0, 2 * MIB)  # regions 0 and 1
    j.flush()
    j.note_inflight(1, 30 * MIB, 1)  # never made durable: the write was never applied
    j.abandon()  # power cut
    d = describe(jpath)
    assert not d["clean_shutdown"] and d["luns"][1]["al_regions"] == 2
    j = open_j(jpath)
    assert not j.clean_at_open
    assert j.dirty(1).tolist() == [10, 20]
    assert j.crashed_al_regions(1).tolist() == [20]
    assert j.dirty(2).tolist() == [0, 1]
    assert j.crashed_al_regions(2).tolist() == [0, 1]
    assert j.al_regions() == 0
    j.abandon()  # crash again before any resync: still dirty (folded durably at open)
    j = open_j(jpath)
    assert j.dirty(1).tolist() == [10, 20] and j.crashed_al_regions(1).size == 0
    j.clear_dirty(1, j.dirty(1))
    j.close()
    j = open_j(jpath)
    assert j.dirty(1).size == 0
    j.close()


def test_acked_regions_leave_the_al_lazily(jpath: Path) -> None:
    j = open_j(jpath, al_regions_max=2)
    for r in range(3):
        j.note_inflight(1, r * MIB, 1)
    assert j.al_regions() == 3  # all busy: never evicted
    for r in range(3):
        j.peer_acked(1, r * MIB, 1)
    assert j.al_regions() == 3  # idle, but eviction is lazy
    j.note_inflight(1, 9 * MIB, 1)
    assert j.al_regions() == 2  # LRU idle regions 0 and 1 left
    assert j.al_regions(1).tolist() == [2, 9]
    j.flush()
    j.abandon()
    j = open_j(jpath)
    assert j.dirty(1).tolist() == [2, 9]  # only what was still in the AL
    j.close()


def test_clean_close_turns_unacked_writes_dirty(jpath: Path) -> None:
    j = open_j(jpath)
    j.note_inflight(1, 0, 1)
    j.note_inflight(1, MIB, 1)
    j.peer_acked(1, MIB, 1)
    j.flush()
    j.close()
    j = open_j(jpath)
    assert j.clean_at_open and j.dirty(1).tolist() == [0]
    j.close()


def test_peer_lost_makes_inflight_dirty(jpath: Path) -> None:
    j = open_j(jpath)
    j.note_inflight(2, 0, 1)
    j.note_inflight(2, 0, 1)
    j.flush()
    assert j.peer_lost() is True
    assert j.dirty(2).tolist() == [0]
    j.peer_acked(2, 0, 1)  # a late ack changes nothing
    j.flush()
    assert j.peer_lost() is False
    j.close()


# -- group commit -------------------------------------------------------------------------
def test_concurrent_commits_share_one_fdatasync(jpath: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    j = open_j(jpath)
    calls = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)

    async def writer(r: int) -> None:
        if j.mark_dirty(1, r * MIB, 1):
            await j.commit()

    async def main() -> None:
        await asyncio.gather(*(writer(r) for r in range(200)))
        await j.commit()  # nothing pending: returns at once

    asyncio.run(main())
    assert 1 <= len(calls) <= 2, calls  # 200 writers, one (or two) group commits
    assert j.usage()["stats"]["log_blocks"] == len(calls)
    j.abandon()
    j = open_j(jpath)
    assert j.dirty(1).tolist() == list(range(200))
    j.close()


def test_records_added_during_a_commit_wait_for_the_next(jpath: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    j = open_j(jpath)
    entered, gate = threading.Event(), threading.Event()
    real = os.fdatasync

    def slow(fd: int) -> None:
        entered.set()
        gate.wait(5)
        real(fd)

    async def main() -> None:
        assert j.mark_dirty(1, 0, 1)
        monkeypatch.setattr(os, "fdatasync", slow)
        first = asyncio.create_task(j.commit())
        await asyncio.to_thread(entered.wait, 5)  # block 1 is being written
        j.clear_dirty(1, [0])
        assert j.mark_dirty(1, 0, 1)  # a new SET that block 1 does not carry
        second = asyncio.create_task(j.commit())
        gate.set()
        await first
        assert j.mark_dirty(1, 0, 1) is True  # block 1 is durable, but not this record
        await second
        assert j.mark_dirty(1, 0, 1) is False

    asyncio.run(main())
    monkeypatch.undo()
    j.abandon()
    assert open_j(jpath).dirty(1).tolist() == [0]


def test_request_commit_calls_listeners(jpath: Path) -> None:
    j = open_j(jpath)
    seen: list[int] = []
    j.on_durable(seen.append)

    async def main() -> None:
        j.mark_dirty(1, 0, 1)
        ticket = j.ticket
        j.request_commit()
        j.request_commit()
        while j.durable < ticket:
            await asyncio.sleep(0.001)

    asyncio.run(main())
    assert seen and seen[-1] >= 1
    j.close()


# -- log full -> checkpoint -----------------------------------------------------------------
def test_log_full_checkpoints_automatically(jpath: Path) -> None:
    j = open_j(jpath, log_bytes=layout.LOG_BYTES_MIN)  # 4 KiB: 8 one-record blocks
    for r in range(100):
        j.mark_dirty(1, r * MIB, 1)
        j.note_inflight(2, r * MIB, 1)
        j.peer_acked(2, r * MIB, 1)
        j.flush()
        assert j.usage()["used_log_bytes"] <= layout.LOG_BYTES_MIN
    assert j.usage()["stats"]["checkpoints"] >= 10
    j.abandon()
    j = open_j(jpath)
    assert j.dirty(1).tolist() == list(range(100))
    assert set(j.crashed_al_regions(2).tolist()) <= set(range(100))
    j.close()


def test_one_commit_bigger_than_the_log_becomes_a_checkpoint(jpath: Path) -> None:
    j = open_j(jpath, log_bytes=layout.LOG_BYTES_MIN)
    for r in range(1000):  # 1000 records = 16 KiB > 4 KiB log
        j.mark_dirty(1, r * MIB, 1)
    j.flush()
    assert j.usage()["stats"]["checkpoints"] >= 2
    assert j.usage()["used_log_bytes"] == layout.SECTOR  # the CHECKPOINT block
    j.abandon()
    assert open_j(jpath).dirty(1).size == 1000


# -- torn and corrupt -----------------------------------------------------------------------
def three_blocks(jpath: Path) -> int:
    """CHECKPOINT block + three one-record blocks (regions 1, 2, 3 of LUN 1): log offset."""
    j = open_j(jpath)
    for r in (1, 2, 3):
        j.mark_dirty(1, r * MIB, 1)
        j.flush()
    j.abandon()
    return int(describe(jpath)["log"]["offset"])


@pytest.mark.parametrize("damage", ["payload", "header", "zeros"])
def test_torn_last_block_is_ignored(jpath: Path, damage: str) -> None:
    log = three_blocks(jpath)
    last = log + 3 * layout.SECTOR
    with open(jpath, "r+b") as f:
        if damage == "payload":  # the record sector half-written
            f.seek(last + layout.LOG_HEADER.size)
            f.write(b"\xff" * 8)
        elif damage == "header":
            f.seek(last + 20)
            f.write(b"\x00" * 8)
        else:  # the block never reached the disk
            f.seek(last)
            f.write(bytes(layout.SECTOR))
    d = describe(jpath)
    assert d["log"]["blocks"] == 3
    assert (d["log"]["torn_tail_bytes"] > 0) == (damage != "zeros")
    j = open_j(jpath)
    assert j.dirty(1).tolist() == [1, 2]
    j.close()


@pytest.mark.parametrize("where", [layout.LOG_HEADER.size + 12, 30, 3])  # record, seq, magic
def test_flipped_byte_in_a_middle_record_is_corrupt(jpath: Path, where: int) -> None:
    log = three_blocks(jpath)
    flip(jpath, log + 2 * layout.SECTOR + where)  # record block 2 of 3
    with pytest.raises(errors.JournalCorrupt) as ei:
        open_j(jpath)
    assert ei.value.alarm == "journal_corrupt" and "not a power cut" in str(ei.value)
    with pytest.raises(errors.JournalCorrupt):
        describe(jpath)
    with pytest.raises(errors.JournalCorrupt):
        check_journal(jpath, 0, 2)


@pytest.mark.parametrize("part", ["header", "dirty", "al"])
def test_flipped_byte_in_a_checkpoint_bitmap_is_corrupt(jpath: Path, part: str) -> None:
    j = open_j(jpath)
    j.mark_dirty(1, 0, 1)
    j.close()
    lun = describe(jpath)["luns"][0]
    base = layout.slot_offset(0, lun["half"])
    stride = layout.bitmap_stride(lun["regions"])
    off = {"header": base + 20, "dirty": base + layout.BLOCK + 50,
           "al": base + layout.BLOCK + stride + 3}[part]
    flip(jpath, off)
    with pytest.raises(errors.JournalCorrupt, match="LUN 1"):
        open_j(jpath)


def test_damaged_newest_superblock_is_corrupt(jpath: Path) -> None:
    j = open_j(jpath)
    j.mark_dirty(1, 0, 1)
    j.checkpoint()  # region 0 lives only in this checkpoint, never in a log block
    gen = j.usage()["generation"]
    j.abandon()
    flip(jpath, layout.SB_OFFSETS[gen % 2] + 40)
    # The older copy is valid, but the CHECKPOINT block of generation `gen` proves the
    # newer superblock was complete: falling back would silently lose region 0.
    with pytest.raises(errors.JournalCorrupt, match="newer superblock is damaged"):
        open_j(jpath)
    flip(jpath, layout.SB_OFFSETS[(gen + 1) % 2] + 40)
    with pytest.raises(errors.JournalCorrupt, match="no valid superblock"):
        open_j(jpath)


def test_torn_checkpoint_falls_back_to_the_older_one(jpath: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    j = open_j(jpath)
    j.mark_dirty(1, 0, 1)
    j.flush()  # region 0: durable in the log
    j.mark_dirty(1, 5 * MIB, 1)  # region 5: pending, goes into the checkpoint below
    real = blockdev.pwrite_all

    def torn(fd: int, data: bytes, offset: int) -> None:
        if offset in layout.SB_OFFSETS:  # power cut in the middle of the superblock
            real(fd, data[:100], offset)
            raise OSError(errno.EIO, "power cut")
        real(fd, data, offset)

    monkeypatch.setattr(blockdev, "pwrite_all", torn)
    with pytest.raises(errors.JournalUnreachable):
        j.checkpoint()
    monkeypatch.undo()
    j.abandon()
    d = describe(jpath)
    assert d["superblock_copies_valid"] == 1
    j = open_j(jpath)  # the older checkpoint + its log; region 5 was never acknowledged
    assert j.dirty(1).tolist() == [0]
    j.close()


def test_not_a_journal_is_never_formatted_over(jpath: Path) -> None:
    jpath.write_bytes(b"some filesystem superblock" * 100)
    os.truncate(jpath, 5 * GIB)
    with pytest.raises(errors.JournalCorrupt, match="not a steelfusion journal"):
        open_j(jpath)
    with open(jpath, "rb") as f:
        assert f.read(4) == b"some"


def test_newer_version_is_refused(jpath: Path) -> None:
    format_journal(jpath, required_size(1))
    with open(jpath, "r+b") as f:
        f.seek(layout.SB_OFFSETS[1] + 8)
        f.write(struct.pack(">I", 9))
    with pytest.raises(errors.JournalUnsupported) as ei:
        describe(jpath)
    assert ei.value.alarm == "journal_version"


def test_version_1_journal_is_upgraded(jpath: Path) -> None:
    body = layout.V1_SUPER.pack(layout.MAGIC, 1, 0, 0, 3 * GIB, b"", 0)[:-4]
    with open(jpath, "wb") as f:
        f.write(body + crc32c(body).to_bytes(4, "big"))
        f.truncate(3 * GIB)
    assert describe(jpath)["version"] == 1
    assert check_journal(jpath, 0, 1) == 3 * GIB
    assert describe(jpath)["version"] == 2
    Journal.open(jpath, {1: GIB}).close()


def test_all_zero_lun_is_formatted(jpath: Path) -> None:
    jpath.touch()
    os.truncate(jpath, 3 * GIB)  # a fresh thin LUN reads as zeros
    j = Journal.open(jpath, {1: GIB})
    assert j.usage()["size"] == 3 * GIB
    j.close()


# -- size changes and errors ------------------------------------------------------------------
def test_grow_while_open(jpath: Path) -> None:
    j = Journal.open(jpath, {1: GIB}, size=required_size(1))
    with pytest.raises(errors.JournalTooSmall, match="5 GiB"):
        j.add_lun(2, GIB)
    os.truncate(jpath, required_size(2))  # the operator grows the thin LUN
    assert j.refresh_size() == required_size(2)
    j.add_lun(2, GIB)
    j.mark_dirty(2, 0, 1)
    j.close()
    d = describe(jpath)
    assert d["recorded_size"] == required_size(2) and [u["lun"] for u in d["luns"]] == [1, 2]
    Journal.open(jpath, {1: GIB, 2: GIB}).close()


def test_shrunk_journal_is_refused(jpath: Path) -> None:
    open_j(jpath).close()
    os.truncate(jpath, required_size(1))
    with pytest.raises(errors.JournalShrunk, match="grow it back") as ei:
        open_j(jpath)
    assert ei.value.alarm == "journal_shrunk"


def test_shrunk_while_open_goes_offline(jpath: Path) -> None:
    j = open_j(jpath)
    os.truncate(jpath, required_size(1))
    with pytest.raises(errors.JournalShrunk):
        j.refresh_size()
    j.mark_dirty(1, 0, 1)  # in memory only
    with pytest.raises(errors.JournalShrunk):
        j.flush()
    assert j.usage()["offline"]["alarm"] == "journal_shrunk"
    j.close()
    assert os.path.getsize(jpath) == required_size(1)  # never silently re-extended


def test_unreachable(jpath: Path, tmp_path: Path) -> None:
    with pytest.raises(errors.JournalUnreachable, match="does not exist") as ei:
        Journal.open(jpath, {1: GIB})
    assert ei.value.alarm == "journal_unreachable"
    with pytest.raises(errors.JournalUnreachable):
        Journal.open(tmp_path, {1: GIB})  # a directory (EISDIR)
    with pytest.raises(errors.JournalUnreachable):
        describe(jpath)


def test_eio_takes_the_journal_offline(jpath: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    j = open_j(jpath)

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", eio)
    j.mark_dirty(1, 0, 1)

    async def main() -> None:
        with pytest.raises(errors.JournalUnreachable, match="Input/output error"):
            await j.commit()
        j.mark_dirty(1, MIB, 1)
        with pytest.raises(errors.JournalUnreachable):  # sticky: reopen once the LUN is back
            await j.commit()

    asyncio.run(main())
    monkeypatch.undo()
    j.close()
    # Nothing was acknowledged; the failed block may or may not have reached the disk.
    assert set(open_j(jpath).dirty(1).tolist()) <= {0, 1}


def test_enospc_is_journal_full(jpath: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    j = open_j(jpath)

    def enospc(fd: int, data: bytes, off: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", enospc)
    j.mark_dirty(1, 0, 1)
    with pytest.raises(errors.JournalFull) as ei:
        j.flush()
    assert ei.value.alarm == "journal_full"
    monkeypatch.undo()
    j.close()


def test_closed_journal_refuses_commits(jpath: Path) -> None:
    j = open_j(jpath)
    j.close()
    j.close()  # idempotent
    j.mark_dirty(1, 0, 1)
    with pytest.raises(errors.JournalOffline):
        j.flush()


def test_second_open_is_refused(jpath: Path) -> None:
    j = open_j(jpath)
    with pytest.raises(errors.JournalError) as ei:
        open_j(jpath)
    assert ei.value.alarm == "journal_busy"
    j.close()


def test_misuse_is_value_error(jpath: Path) -> None:
    j = open_j(jpath)
    with pytest.raises(ValueError, match="no slot"):
        j.mark_dirty(99, 0, 1)
    with pytest.raises(ValueError, match="outside"):
        j.note_inflight(1, GIB - 1, 2)
    with pytest.raises(ValueError):
        j.clear_dirty(1, [1 << 30])
    j.close()


def test_lun_growth_marks_new_regions_dirty(jpath: Path) -> None:
    Journal.open(jpath, {1: GIB}, size=required_size(1)).close()
    j = Journal.open(jpath, {1: GIB + 2 * MIB})
    assert j.dirty(1).tolist() == [1024, 1025]
    j.close()


def test_every_error_has_its_own_alarm() -> None:
    classes: list[type[errors.JournalError]] = [
        errors.JournalTooSmall, errors.JournalShrunk, errors.JournalUnreachable, errors.JournalFull,
        errors.JournalCorrupt, errors.JournalUnsupported, errors.JournalOffline]
    keys = {c.alarm for c in classes}
    assert len(keys) == len(classes) and all(k.startswith("journal_") for k in keys)
    assert all(issubclass(c, errors.JournalError) for c in classes)


# -- the operator's tool -----------------------------------------------------------------------
def test_inspect_cli(jpath: Path, capsys: pytest.CaptureFixture[str]) -> None:
    j = open_j(jpath)
    j.mark_dirty(2, 0, 3 * MIB)
    j.note_inflight(1, 0, 1)
    j.flush()
    j.abandon()
    assert inspect_main(["inspect", str(jpath)]) == 0
    out = capsys.readouterr().out
    assert "UNCLEAN" in out and "LUN" in out and "log" in out
    assert inspect_main(["inspect", "--json", str(jpath)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [(u["lun"], u["dirty_regions"], u["al_regions"]) for u in d["luns"]] == [(1, 0, 1),
                                                                                   (2, 3, 0)]
    assert inspect_main(["inspect", str(jpath.with_name("nope"))]) == 2
    assert "journal_unreachable" in capsys.readouterr().err


def test_hot_path_has_no_syscalls(jpath: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    j = open_j(jpath)
    j.mark_dirty(1, 0, 1)
    j.note_inflight(1, 0, 1)
    j.flush()

    def boom(*a: object) -> None:
        raise AssertionError("syscall on the hot path")

    monkeypatch.setattr(os, "pwrite", boom)
    monkeypatch.setattr(os, "fdatasync", boom)
    for _ in range(1000):
        assert not j.mark_dirty(1, 0, 4096)
        assert not j.note_inflight(1, 0, 4096)
        j.peer_acked(1, 0, 4096)
    monkeypatch.undo()
    j.close()
