"""Property tests of the Journal LUN (STYLE.md "Tests": one invariant per fuzz target).

1. Against a set model: random mark / clear / in-flight / ack / peer-lost /
   commit / crash / clean-close sequences never lose a dirty region - a region
   dirtied (or with an unacknowledged write) and made durable is reported
   after any crash, and nothing is reported that was never written.
2. Garbage and damaged journals: only JournalError subclasses escape.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from journal import (
    Journal,
    JournalError,
    check_journal,
    describe,
    layout,
    required_size,
)

RB = 4096  # small regions keep the model small
LUNS = {1: 48 * RB, 2: 20 * RB + 100}  # LUN 2 ends with a 100-byte region
NREG = {lun: layout.regions_for(size, RB) for lun, size in LUNS.items()}
SIZE = required_size(len(LUNS))


@contextlib.contextmanager
def tmp_journal() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="sfj-") as d:
        yield Path(d) / "journal.img"


def span(lun: int, region: int, n: int) -> tuple[int, int, set[int]]:
    """A region-aligned byte range clipped to the LUN, and its regions."""
    region = min(region, NREG[lun] - 1)
    end = min(LUNS[lun], (region + n) * RB)
    start = region * RB
    return start, end - start, set(range(region, (end - 1) // RB + 1))


lun_st = st.sampled_from(sorted(LUNS))
region_st = st.one_of(st.integers(0, 3), st.integers(0, 47))  # hot regions collide often
# Weighted so that the interesting collisions (two writes to one region, a crash before
# the commit) happen in most examples; mark_all would mask everything, so it is rare.
KINDS = (["mark"] * 4 + ["inflight"] * 4 + ["ack"] * 3 + ["clear"] * 2 + ["commit"] * 2
         + ["acommit", "checkpoint", "crash", "crash", "close", "peer_lost", "mark_all"])
op_st = st.tuples(st.sampled_from(KINDS), lun_st, region_st, st.integers(1, 2),
                  st.lists(region_st, max_size=6))


class Model:
    """Set semantics of what the journal must (and may) report for each LUN."""

    def __init__(self) -> None:
        self.live: dict[int, set[int]] = {lun: set() for lun in LUNS}  # exact j.dirty()
        self.busy: Counter[tuple[int, int]] = Counter()  # writes the peer has not acked
        self.must: dict[int, set[int]] = {lun: set() for lun in LUNS}  # durable, not cleared
        self.must_al: set[tuple[int, int]] = set()  # durably in the AL and still busy
        self.may: dict[int, set[int]] = {lun: set() for lun in LUNS}  # upper bound after crash
        self.al_ever: set[tuple[int, int]] = set()  # noted in flight since the last open

    def committed(self) -> None:
        self.must = {lun: set(s) for lun, s in self.live.items()}
        self.must_al = {k for k, c in self.busy.items() if c}
        for lun in LUNS:  # uncommitted clears are now durable; the AL may still hold any
            self.may[lun] = set(self.live[lun]) | {r for (lu, r) in self.al_ever if lu == lun}

    def reopened(self, reported: dict[int, set[int]]) -> None:
        self.live = {lun: set(s) for lun, s in reported.items()}
        self.must = {lun: set(s) for lun, s in reported.items()}
        self.may = {lun: set(s) for lun, s in reported.items()}
        self.busy.clear()
        self.must_al.clear()
        self.al_ever = set()


def reported(j: Journal) -> dict[int, set[int]]:
    return {lun: set(j.dirty(lun).tolist()) for lun in LUNS}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op_st, min_size=20, max_size=60), log_small=st.booleans(), al_max=st.integers(1, 6))
def test_never_loses_a_dirty_region(ops: list[tuple[str, int, int, int, list[int]]], log_small: bool, al_max: int) -> None:
    log_bytes = layout.LOG_BYTES_MIN if log_small else 64 * 1024
    with tmp_journal() as path:
        def reopen() -> Journal:
            return Journal.open(path, LUNS, size=SIZE, region_bytes=RB, log_bytes=log_bytes,
                                al_regions_max=al_max)

        j = reopen()
        m = Model()
        for kind, lun, region, n, many in ops:
            if kind == "mark":
                off, length, rs = span(lun, region, n)
                must = j.mark_dirty(lun, off, length)
                m.live[lun] |= rs
                m.may[lun] |= rs
                if not must:  # "already durable": then it must survive a crash
                    assert rs <= m.must[lun], (rs, m.must[lun])
            elif kind == "inflight":
                off, length, rs = span(lun, region, n)
                must = j.note_inflight(lun, off, length)
                for r in rs:
                    m.busy[(lun, r)] += 1
                    m.al_ever.add((lun, r))
                    m.may[lun].add(r)
                    if not must:
                        m.must_al.add((lun, r))
            elif kind == "ack":
                off, length, rs = span(lun, region, n)
                j.peer_acked(lun, off, length)
                for r in rs:
                    if m.busy[(lun, r)] > 0:
                        m.busy[(lun, r)] -= 1
                    if m.busy[(lun, r)] == 0:
                        m.must_al.discard((lun, r))
            elif kind == "clear":
                rs = {r for r in many if r < NREG[lun]}
                j.clear_dirty(lun, np.array(sorted(rs), dtype=np.int64))
                m.live[lun] -= rs
                m.must[lun] -= rs
            elif kind == "mark_all":
                j.mark_all_dirty(lun)
                m.live[lun] = set(range(NREG[lun]))
                m.may[lun] |= m.live[lun]
            elif kind == "peer_lost":
                j.peer_lost()
                for (lu, r), c in list(m.busy.items()):
                    if c:
                        m.live[lu].add(r)
                        m.may[lu].add(r)
                        m.busy[(lu, r)] = 0
            elif kind in ("commit", "acommit", "checkpoint"):
                if kind == "commit":
                    j.flush()
                elif kind == "acommit":
                    asyncio.run(j.commit())
                else:
                    j.checkpoint()  # records go to the bitmaps, the log restarts
                m.committed()
            elif kind == "crash":
                j.abandon()
                j = reopen()
                got = reported(j)
                for lu in LUNS:
                    need = m.must[lu] | {r for (x, r) in m.must_al if x == lu}
                    assert need <= got[lu], ("lost", lu, need - got[lu])
                    assert got[lu] <= m.may[lu], ("invented", lu, got[lu] - m.may[lu])
                    assert set(j.crashed_al_regions(lu).tolist()) <= got[lu]
                m.reopened(got)
            elif kind == "close":
                j.close()
                j = reopen()
                got = reported(j)
                for lu in LUNS:
                    want = m.live[lu] | {r for (x, r), c in m.busy.items() if x == lu and c}
                    assert got[lu] == want, (lu, got[lu] ^ want)
                    assert j.crashed_al_regions(lu).size == 0
                assert j.clean_at_open
                m.reopened(got)
            for lu in LUNS:  # the live view is exact at every step
                assert set(j.dirty(lu).tolist()) == m.live[lu], (kind, lu)
        j.close()


# -- garbage in, JournalError out ---------------------------------------------------------------
def only_journal_errors(path: Path) -> None:
    """Every entry point either works or raises a JournalError subclass - nothing else."""
    for fn in (describe, lambda p: check_journal(p, 0, 1),
               lambda p: Journal.open(p, {1: 8 * RB, 2: RB}, region_bytes=RB).close()):
        try:
            fn(path)
        except JournalError as e:
            assert e.alarm.startswith("journal_") and str(e)


AREAS = [0, layout.SB_OFFSETS[1], layout.LOG_OFFSET, layout.LOG_OFFSET + 512,
         layout.slot_offset(0, 0), layout.slot_offset(0, 1), layout.slot_offset(1, 0)]


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=600), area=st.sampled_from(AREAS), skew=st.integers(0, 200),
       big=st.booleans())
def test_garbage_files(data: bytes, area: int, skew: int, big: bool) -> None:
    with tmp_journal() as path:
        with open(path, "wb") as f:
            if big:
                f.truncate(required_size(2))
            f.seek(area + skew if big else skew)
            f.write(data)
        only_journal_errors(path)


def valid_journal(path: Path) -> None:
    j = Journal.open(path, {1: 8 * RB, 2: RB}, size=required_size(2), region_bytes=RB,
                     log_bytes=layout.LOG_BYTES_MIN)
    j.mark_dirty(1, 0, 3 * RB)
    j.note_inflight(2, 0, 1)
    j.flush()
    j.clear_dirty(1, [1])
    j.mark_dirty(1, 7 * RB, 1)
    j.flush()
    j.abandon()


@settings(max_examples=150, deadline=None)
@given(area=st.sampled_from(AREAS), offset=st.integers(0, 1100),
       patch=st.binary(min_size=1, max_size=16))
def test_damaged_journals(area: int, offset: int, patch: bytes) -> None:
    with tmp_journal() as path:
        valid_journal(path)
        with open(path, "r+b") as f:
            f.seek(area + offset)
            old = f.read(len(patch))
            f.seek(area + offset)
            f.write(bytes(a ^ b for a, b in zip(old.ljust(len(patch), b"\0"), patch,
                                                  strict=True)))
        only_journal_errors(path)


@settings(max_examples=150, deadline=None)
@given(records=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 3),
                                  st.integers(0, 1 << 33), st.integers(0, 1 << 40)),
                        min_size=1, max_size=8),
       seq_skew=st.integers(0, 2))
def test_checksummed_nonsense_records(records: list[tuple[int, int, int, int]],
                                      seq_skew: int) -> None:
    """Records with a valid CRC but impossible contents (a broken writer): JournalCorrupt."""
    with tmp_journal() as path:
        valid_journal(path)
        d = describe(path)
        jid, gen = int(d["journal_id"], 16), d["generation"]
        used = d["log"]["used_bytes"]
        payload = b"".join(layout.RECORD.pack(op, 0, slot, min(count, layout.U32_MAX),
                                              min(region, layout.U64_MAX))
                           for op, slot, count, region in records)
        block = layout.push_log_block(jid, gen, d["log"]["blocks"] + 1 + seq_skew, payload)
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, block, d["log"]["offset"] + used)
        finally:
            os.close(fd)
        only_journal_errors(path)


@settings(max_examples=100, deadline=None)
@given(fields=st.tuples(st.integers(0, 7), st.integers(0, (1 << 64) - 1),
                        st.integers(0, 1 << 40), st.integers(0, 1 << 31), st.integers(0, 1 << 31),
                        st.integers(0, 3000)),
       slots=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 1 << 50), st.integers(0, 1 << 31),
                                st.integers(0, 3), st.integers(0, 9)), max_size=4))
def test_checksummed_nonsense_superblock(fields: tuple[int, ...],
                                         slots: list[tuple[int, int, int, int, int]]) -> None:
    """A superblock with a valid CRC but impossible fields is refused, never trusted."""
    flags, size, log_off, log_bytes, rb, nslots = fields
    with tmp_journal() as path:
        valid_journal(path)
        gen = describe(path)["generation"] + 1
        table = b"".join(layout.SB_SLOT.pack(lun, lb, srb, half, 0, 0, bgen)
                         for lun, lb, srb, half, bgen in slots)
        head = layout.SB_HEADER.pack(layout.MAGIC, layout.VERSION, flags, gen, 1, 0, 0, size,
                                     log_off, log_bytes, rb, min(nslots, len(slots)) if nslots
                                     < 3000 else nslots, b"", 0)[:-4]
        crc = layout.crc32c(table, layout.crc32c(head))
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, head + crc.to_bytes(4, "big") + table, layout.SB_OFFSETS[gen % 2])
        finally:
            os.close(fd)
        only_journal_errors(path)
