"""ABORT TASK, ABORT TASK SET and LOGICAL UNIT RESET of commands that are
still running (SAM-5 §7.2, §7.6; RFC 7143 §11.5): the target cancels them
instead of waiting, answers the TMF at once, never sends a status for an
aborted task, and cancelled commands leave no range lock behind and no write
landing after the answer.

The SCSI-level checks drive :class:`edge.scsi.LogicalUnit` directly; the
target-level ones run :class:`edge.target.IscsiTarget` on 127.0.0.1 in a
background event loop and talk to it with raw PDUs over a real socket.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from edge.aio import StartedCoroutine, to_the_end
from edge.scsi import CHECK_CONDITION, GOOD, LogicalUnit
from edge.target import IscsiTarget, TargetNode
from steelfusion.iscsi.pdu import (
    DataIn,
    NopIn,
    NopOut,
    Pdu,
    ScsiResponse,
    TaskMgmtResponse,
    parse_sense_segment,
)
from tests.iscsi_helpers import IQN, RawClient
from tests.nodes import wait_for
from tests.test_scsi import BS, MemBackend, sense_of
from tests.test_scsi_commands import A

HANG_LBA = 1000
"""Reads at or past this block wait for an event that is never set."""


class StuckBackend(MemBackend):
    """Reads from :data:`HANG_LBA` on never return (a Core that does not
    answer); writes wait for ``gate`` while ``hold_writes`` is set (I/O in
    flight in a thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.never: asyncio.Event | None = None
        self.gate: asyncio.Event | None = None
        self.hold_writes = False
        self.reads_stuck = 0

    async def read(self, offset: int, length: int) -> bytes:
        if offset >= HANG_LBA * BS:
            self.reads_stuck += 1
            if self.never is None:
                self.never = asyncio.Event()
            await self.never.wait()
        return await super().read(offset, length)

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        if self.hold_writes:
            if self.gate is None:
                self.gate = asyncio.Event()
            await self.gate.wait()
        await super().write(offset, data, fua)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


# --------------------------------------------------------------------------- SCSI layer


def test_a_cancelled_write_keeps_its_range_lock_until_the_data_has_landed() -> None:
    """The backend write was in flight (think: a thread doing pwrite): the
    cancelled command waits for it before it releases the range, so a later
    write to the same blocks cannot land first."""
    async def go() -> None:
        mem = StuckBackend()
        mem.hold_writes = True
        lu = LogicalUnit(mem)
        lu.attach(A)
        first = asyncio.create_task(lu.execute(write10(0, 1), b"\x01" * BS, (0,), A))
        await asyncio.sleep(0.01)
        assert lu.locks.held == 1
        first.cancel()
        await asyncio.sleep(0.01)
        assert not first.done() and lu.locks.held == 1  # the I/O is still running
        second = asyncio.create_task(lu.execute(write10(0, 1), b"\x02" * BS, (0,), A))
        await asyncio.sleep(0.01)
        assert not second.done()  # queued behind the range lock
        mem.hold_writes = False
        assert mem.gate is not None
        mem.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert (await second).status == GOOD
        assert mem.buf[:BS] == b"\x02" * BS and lu.locks.held == 0

    asyncio.run(go())


def test_an_edge_write_waiting_for_reserve_room_is_cancelled_at_once(tmp_path: Any) -> None:
    """The Edge's LUN is cancel_safe: a write waiting for room in a full write reserve
    (Cores unreachable) ends as soon as it is cancelled, holds no range lock and leaves
    nothing in the log, so ABORT TASK and resets do not hang until a Core returns."""
    from edge.blockstore import Blockstore
    from edge.node import EdgeLun

    async def go() -> None:
        bs = Blockstore(tmp_path / "bs", {1: 1 << 20}, reserve_bytes=2 * BS)
        lun = EdgeLun(1, 1 << 20, bs, None)  # type: ignore[arg-type]  # no uplink needed
        lu = LogicalUnit(lun)
        lu.attach(A)
        lu._sessions[A.session_id].ua.clear()
        assert (await lu.execute(write10(0, 2), b"\x01" * 2 * BS, (0,), A)).status == GOOD
        stuck = asyncio.create_task(lu.execute(write10(8, 1), b"\x02" * BS, (0,), A))
        await asyncio.sleep(0.05)
        assert not stuck.done() and bs.writers_waiting == 1  # the reserve is full
        stuck.cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert stuck.done() and stuck.cancelled()
        assert bs.writers_waiting == 0 and lu.locks.held == 0
        assert bs.status()["uncommitted_writes"] == 1  # only the first write

    asyncio.run(go())


def test_a_command_cancelled_before_its_task_ran_cleans_up() -> None:
    """A command started by hand and wrapped in StartedCoroutine, cancelled
    before the Task's first step (aborted in the same batch of PDUs): its
    range-lock wait is withdrawn, nothing stays held."""
    async def go() -> None:
        lu = LogicalUnit(MemBackend())
        lu.attach(A)
        holder = lu.locks.try_acquire(0, 8, True)
        assert holder is not None
        coro = lu.execute(write10(0, 1), bytes(BS), (0,), A)
        yielded = coro.send(None)
        task = asyncio.get_running_loop().create_task(StartedCoroutine(coro, yielded))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert yielded.cancelled()
        lu.locks.release(holder)
        assert lu.locks.held == 0 and not lu.locks._waiters
        assert (await lu.execute(write10(0, 1), bytes(BS), (0,), A)).status == GOOD

    asyncio.run(go())


def test_started_coroutine_runs_like_a_task() -> None:
    async def work() -> int:
        await asyncio.sleep(0)
        await asyncio.sleep(0.001)
        return 7

    async def go() -> None:
        coro = work()
        yielded = coro.send(None)
        assert yielded is None  # sleep(0) yields bare
        assert await asyncio.get_running_loop().create_task(
            StartedCoroutine(coro, yielded)) == 7

    asyncio.run(go())


def test_to_the_end_costs_nothing_when_the_io_does_not_wait() -> None:
    async def go() -> None:
        mem = MemBackend()
        before = len(asyncio.all_tasks())
        await to_the_end(mem.write(0, b"x" * BS))
        assert len(asyncio.all_tasks()) == before and mem.buf[:BS] == b"x" * BS

    asyncio.run(go())


# --------------------------------------------------------------------------- the target


class StuckTarget:
    """An IscsiTarget over a :class:`StuckBackend`, on its own event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.backend = StuckBackend()
        self.target = IscsiTarget(TargetNode(IQN, {0: self.backend}), "127.0.0.1", 0)

    def call(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self.thread.start()
        self.call(self.target.start())

    def stop(self) -> None:
        async def release() -> None:
            for ev in (self.backend.never, self.backend.gate):
                if ev is not None:
                    ev.set()
            await self.target.close()
        self.call(release())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def lu(self) -> LogicalUnit:
        return self.target.targets[0].logical_units[0]


@pytest.fixture
def stuck() -> Iterator[StuckTarget]:
    t = StuckTarget()
    t.start()
    try:
        yield t
    finally:
        t.stop()


def client(t: StuckTarget) -> RawClient:
    c = RawClient(t.target.port, IQN)
    c.login()
    return c


def soon(pred: Callable[[], object]) -> None:
    """Wait for ``pred`` polling every 5 ms: the states these tests wait for can be brief."""
    wait_for(pred, 5, "the stuck target's state", every=0.005)


def until(c: RawClient, itt: int, seen: list[Pdu], timeout: float = 1.0) -> Pdu:
    """PDUs up to the one answering ``itt``, which must come within ``timeout``."""
    c.sock.settimeout(timeout)
    start = time.monotonic()
    try:
        while True:
            p = c.recv()
            seen.append(p)
            if getattr(p, "itt", None) == itt and (
                    not isinstance(p, DataIn) or p.status_present):
                assert time.monotonic() - start < timeout
                return p
    finally:
        c.sock.settimeout(5)


def answers(seen: list[Pdu]) -> set[int]:
    return {p.itt for p in seen if isinstance(p, ScsiResponse)
            or (isinstance(p, DataIn) and p.status_present)}


def nop(c: RawClient, seen: list[Pdu]) -> None:
    """A NOP round trip: everything the target queued before it has arrived."""
    c.itt += 1
    c.send(NopOut(itt=c.itt, cmdsn=c.cmdsn, immediate=True))
    assert isinstance(until(c, c.itt, seen), NopIn)


def test_abort_task_of_a_stuck_read_answers_at_once(stuck: StuckTarget) -> None:
    c = client(stuck)
    seen: list[Pdu] = []
    itt = c.submit(read10(HANG_LBA, 1), read_len=BS)
    soon(lambda: stuck.backend.reads_stuck == 1)
    t0 = time.monotonic()
    r = until(c, c.tmf(1, ref=itt, ref_cmdsn=c.cmdsn - 1), seen)
    assert isinstance(r, TaskMgmtResponse) and r.response == 0
    assert time.monotonic() - t0 < 1.0
    # The connection goes on serving, with StatSN in step and no status for
    # the aborted READ, ever.
    ok = until(c, c.submit(read10(0, 1), read_len=BS), seen)
    assert isinstance(ok, DataIn) and ok.status == GOOD and ok.statsn == r.statsn + 1
    w = until(c, c.submit(write10(5, 1), data=b"w" * BS), seen)
    assert isinstance(w, ScsiResponse) and w.status == GOOD
    nop(c, seen)
    assert itt not in answers(seen)
    assert stuck.call(_running(stuck)) == 0
    c.close()


async def _running(t: StuckTarget) -> int:
    await asyncio.sleep(0.01)
    return sum(len(c.running) for c in t.target._connections)


def test_abort_task_set_and_lun_reset_cancel_stuck_commands(stuck: StuckTarget) -> None:
    c = client(stuck)
    seen: list[Pdu] = []
    tags = [c.submit(read10(HANG_LBA + i, 1), read_len=BS) for i in range(3)]
    soon(lambda: stuck.backend.reads_stuck == 3)
    r = until(c, c.tmf(2), seen)  # ABORT TASK SET
    assert isinstance(r, TaskMgmtResponse) and r.response == 0
    more = c.submit(read10(HANG_LBA, 1), read_len=BS)
    soon(lambda: stuck.backend.reads_stuck == 4)
    r = until(c, c.tmf(5), seen)  # LOGICAL UNIT RESET
    assert isinstance(r, TaskMgmtResponse) and r.response == 0
    nop(c, seen)
    assert not answers(seen) & {*tags, more}
    ua = until(c, c.submit(bytes(6)), seen)  # the reset's unit attention
    assert isinstance(ua, ScsiResponse) and ua.status == CHECK_CONDITION
    assert parse_sense_segment(ua.data)[12:14] == b"\x29\x03"
    c.close()


def test_lun_reset_cancels_another_sessions_stuck_command(stuck: StuckTarget) -> None:
    a, b = client(stuck), client(stuck)
    seen_a: list[Pdu] = []
    seen_b: list[Pdu] = []
    itt = b.submit(read10(HANG_LBA, 1), read_len=BS)
    soon(lambda: stuck.backend.reads_stuck == 1)
    r = until(a, a.tmf(5), seen_a)
    assert isinstance(r, TaskMgmtResponse) and r.response == 0
    nop(b, seen_b)
    assert itt not in answers(seen_b)  # TAS=0: no status, a unit attention instead
    ua = until(b, b.submit(bytes(6)), seen_b)
    assert isinstance(ua, ScsiResponse) and ua.status == CHECK_CONDITION
    assert parse_sense_segment(ua.data)[12:14] == b"\x29\x03"
    ok = until(b, b.submit(read10(0, 1), read_len=BS), seen_b)
    assert isinstance(ok, DataIn) and ok.status == GOOD
    a.close()
    b.close()


def test_warm_reset_cancels_other_sessions_commands_and_keeps_them(stuck: StuckTarget) -> None:
    """TARGET WARM RESET cancels every session's tasks and gives each a unit attention,
    but only a COLD reset ends the sessions (RFC 7143 §11.5.1): Linux's error handler
    sends WARM and goes on with the session (issue 11)."""
    a, b = client(stuck), client(stuck)
    seen_a: list[Pdu] = []
    seen_b: list[Pdu] = []
    itt = b.submit(read10(HANG_LBA, 1), read_len=BS)
    soon(lambda: stuck.backend.reads_stuck == 1)
    r = until(a, a.tmf(6), seen_a)  # TARGET WARM RESET
    assert isinstance(r, TaskMgmtResponse) and r.response == 0
    for c, seen in ((a, seen_a), (b, seen_b)):
        nop(c, seen)  # both connections still serve
        ua = until(c, c.submit(bytes(6)), seen)
        assert isinstance(ua, ScsiResponse) and ua.status == CHECK_CONDITION
        assert parse_sense_segment(ua.data)[12:14] == b"\x29\x02"  # BUS RESET
        ok = until(c, c.submit(read10(0, 1), read_len=BS), seen)
        assert isinstance(ok, DataIn) and ok.status == GOOD
    assert itt not in answers(seen_b)
    a.close()
    b.close()


def test_abort_of_a_sanitize_command_leaves_the_sanitize_running(stuck: StuckTarget) -> None:
    """libiscsi Sanitize.Reset: ABORT TASK of an IMMED=0 SANITIZE is answered
    at once, the operation goes on (SBC-3 §4.11.1) and reports its progress,
    and it ends normally."""
    c = client(stuck)
    seen: list[Pdu] = []
    stuck.backend.hold_writes = True
    plist = bytes((0x01, 0, 0, 4)) + b"\xa5" * 4
    itt = c.submit(struct.pack(">BB5xHB", 0x48, 0x01, len(plist), 0), data=plist)
    soon(lambda: stuck.lu.sanitizing)
    r = until(c, c.tmf(1, ref=itt, ref_cmdsn=c.cmdsn - 1), seen)
    assert isinstance(r, TaskMgmtResponse) and r.response == 0
    tur = until(c, c.submit(bytes(6)), seen)
    assert isinstance(tur, ScsiResponse) and tur.status == CHECK_CONDITION
    assert parse_sense_segment(tur.data)[12:14] == b"\x04\x1b"  # SANITIZE IN PROGRESS
    stuck.backend.hold_writes = False
    stuck.loop.call_soon_threadsafe(lambda: stuck.backend.gate and stuck.backend.gate.set())
    soon(lambda: not stuck.lu.sanitizing)
    nop(c, seen)
    assert itt not in answers(seen)
    ok = until(c, c.submit(read10(0, 1), read_len=BS), seen)
    assert isinstance(ok, DataIn) and ok.status == GOOD and bytes(ok.data) == b"\xa5" * BS
    c.close()


def test_a_stopped_sanitize_operation_leaves_failure_mode() -> None:
    """If the operation itself is stopped part way (not just the command
    waiting for it), the medium is in an undefined state: SANITIZE COMMAND
    FAILED (3/31/03) for media access until EXIT FAILURE MODE."""
    async def go() -> None:
        mem = StuckBackend()
        mem.hold_writes = True
        lu = LogicalUnit(mem)
        lu.attach(A)
        plist = bytes((0x01, 0, 0, 4)) + b"\xa5" * 4
        cmd = asyncio.create_task(lu.execute(
            struct.pack(">BB5xHB", 0x48, 0x01, len(plist), 0), plist, (0,), A))
        await asyncio.sleep(0.01)
        assert lu.sanitizing and lu.sanitize_task is not None
        lu.sanitize_task.cancel()
        await asyncio.sleep(0.01)
        assert not cmd.done()  # the write in flight finishes first
        mem.hold_writes = False
        assert mem.gate is not None
        mem.gate.set()
        assert sense_of(await cmd) == (3, 0x31, 0x03)
        assert lu.locks.held == 0
        assert sense_of(await lu.execute(read10(0, 1), b"", (0,), A)) == (3, 0x31, 0x03)
        exit_failure = struct.pack(">BB5xHB", 0x48, 0x1F, 0, 0)
        assert (await lu.execute(exit_failure, b"", (0,), A)).status == GOOD
        assert (await lu.execute(read10(0, 1), b"", (0,), A)).status == GOOD

    asyncio.run(go())
