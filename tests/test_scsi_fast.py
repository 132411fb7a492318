"""LogicalUnit.try_fast: the inline READ/WRITE path must answer exactly as execute() does,
and must step aside (None) whenever anything special applies."""

from __future__ import annotations

import asyncio
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from edge import scsi
from edge.aio import RangeLock
from edge.scsi import GOOD, ItNexus, LogicalUnit, ScsiResult
from tests.test_scsi import BLOCKS, BS, MemBackend

NEXUS = ItNexus("iqn.x:a", 0x1, "iqn.t", 1, 7)
OTHER = ItNexus("iqn.x:b", 0x2, "iqn.t", 1, 8)


class FastMem(MemBackend):
    """MemBackend with the synchronous calls try_fast uses."""

    def __init__(self) -> None:
        super().__init__()
        self.now_calls = 0
        self.refuse = False

    def read_now(self, offset: int, length: int) -> bytes | None:
        self.now_calls += 1
        return None if self.refuse else bytes(self.buf[offset:offset + length])

    def write_now(self, offset: int, data: bytes | memoryview) -> bool:
        self.now_calls += 1
        if self.refuse:
            return False
        self.buf[offset:offset + len(data)] = data
        return True


def rw(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    if op in (0x28, 0x2A):
        return struct.pack(">BBIBHB", op, flags, lba, 0, blocks, 0).ljust(16, b"\0")
    return struct.pack(">BBQIBB", op, flags, lba, blocks, 0, 0)


def both(cmds: list[tuple[bytes, bytes]]) -> tuple[list[ScsiResult], list[ScsiResult],
                                                  FastMem, MemBackend, int]:
    fast_be, slow_be = FastMem(), MemBackend()
    fast, slow = LogicalUnit(fast_be), LogicalUnit(slow_be)
    for lu in (fast, slow):
        lu.attach(NEXUS)
        lu._sessions[NEXUS.session_id].ua.clear()
    a: list[ScsiResult] = []
    b: list[ScsiResult] = []
    inline = 0

    async def go() -> None:
        nonlocal inline
        for cdb, data in cmds:
            r = fast.try_fast(cdb, data, NEXUS)
            if r is None:
                r = await fast.execute(cdb, data, (0,), NEXUS)
            else:
                inline += 1
            a.append(r)
            b.append(await slow.execute(cdb, data, (0,), NEXUS))

    asyncio.run(go())
    return a, b, fast_be, slow_be, inline


cmd = st.tuples(
    st.sampled_from([0x28, 0x2A, 0x88, 0x8A]),
    st.one_of(st.integers(0, BLOCKS + 4), st.just(2**32 - 1)),
    st.integers(0, 20),
    st.sampled_from([0, 0x08, 0x20, 0x10]),  # plain, FUA, RDPROTECT/WRPROTECT, DPO
    st.sampled_from(["exact", "short", "odd"]),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(cmd, min_size=1, max_size=30))
def test_fast_path_answers_exactly_like_execute(spec: list[tuple[int, int, int, int, str]]
                                                ) -> None:
    cmds = []
    for i, (op, lba, blocks, flags, size) in enumerate(spec):
        data = b""
        if op & 0x02:
            n = blocks * BS
            n = n if size == "exact" else max(0, n - BS) if size == "short" else n + 7
            data = bytes([i % 251 + 1]) * n
        cmds.append((rw(op, lba, blocks, flags), data))
    a, b, fast_be, slow_be, _ = both(cmds)
    for x, y in zip(a, b, strict=True):
        assert (x.status, bytes(x.data), bytes(x.sense), x.transfer_length) == \
               (y.status, bytes(y.data), bytes(y.sense), y.transfer_length)
    assert fast_be.buf == slow_be.buf


def test_plain_io_goes_inline_and_backend_refusal_falls_back() -> None:
    cmds = [(rw(0x2A, 0, 8), b"\x11" * 8 * BS), (rw(0x28, 0, 8), b""),
            (rw(0x8A, 8, 1), b"\x22" * BS), (rw(0x88, 8, 1), b"")]
    a, _, be, _, inline = both(cmds)
    assert inline == 4 and all(r.status == GOOD for r in a)
    assert bytes(a[1].data) == b"\x11" * 8 * BS and bytes(a[3].data) == b"\x22" * BS
    lu = LogicalUnit(be)
    be.refuse = True
    assert lu.try_fast(rw(0x2A, 0, 1), b"\x33" * BS, scsi.LOCAL_NEXUS) is None
    assert be.buf[:BS] == b"\x11" * BS  # nothing written when the backend said no
    assert lu.try_fast(rw(0x28, 0, 1), b"", scsi.LOCAL_NEXUS) is None
    assert not lu.locks._held  # the range lock was given back


def test_fast_path_steps_aside_for_special_state() -> None:
    be = FastMem()
    lu = LogicalUnit(be)
    lu.attach(NEXUS)
    lu.attach(OTHER)
    w = rw(0x2A, 0, 1)
    data = b"\x44" * BS
    # a unit attention pending for this nexus: the slow path reports it
    lu._sessions[NEXUS.session_id].ua.append((0x29, 0x00))
    assert lu.try_fast(w, data, NEXUS) is None
    assert lu.try_fast(w, data, OTHER) is not None
    lu._sessions[NEXUS.session_id].ua.clear()
    assert lu.try_fast(w, data, NEXUS) is not None
    # FUA and write cache off need a flush: slow path
    assert lu.try_fast(rw(0x2A, 0, 1, 0x08), data, NEXUS) is None
    # an SPC-2 reservation held by another nexus
    lu.spc2_holder = OTHER.session_id
    assert lu.try_fast(w, data, NEXUS) is None
    lu.spc2_holder = NEXUS.session_id
    assert lu.try_fast(w, data, NEXUS) is not None
    lu.spc2_holder = None
    # any persistent reservation
    lu.pr.type = 1
    assert lu.try_fast(w, data, NEXUS) is None
    lu.pr.type = 0
    # an exclusive range lock (COMPARE AND WRITE in progress) on the range
    tok = lu.locks.try_acquire(0, 1, True)
    assert tok is not None
    assert lu.try_fast(w, data, NEXUS) is None
    lu.locks.release(tok)
    # other opcodes never go inline
    assert lu.try_fast(bytes(16), b"", NEXUS) is None  # TEST UNIT READY
    assert lu.try_fast(rw(0x28, 0, 0), b"", NEXUS) is None  # zero blocks: execute answers


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 10), st.booleans()), max_size=6),
       st.lists(st.tuples(st.integers(0, 40), st.integers(1, 10), st.booleans()), max_size=4),
       st.integers(0, 40), st.integers(1, 10))
def test_shared_free_agrees_with_try_acquire(held: list[tuple[int, int, bool]],
                                             waiting: list[tuple[int, int, bool]],
                                             start: int, n: int) -> None:
    """try_fast skips taking the shared lock; RangeLock.shared_free must say exactly
    when try_acquire would have granted it."""
    async def go() -> None:
        locks = RangeLock()
        for s, k, x in held:
            locks._grant(s, s + k, x)
        loop = asyncio.get_running_loop()
        for s, k, x in waiting:
            locks._waiters.append((s, s + k, x, loop.create_future()))
        free = locks.shared_free(start, start + n)
        tok = locks.try_acquire(start, start + n)
        assert free == (tok is not None)

    asyncio.run(go())
