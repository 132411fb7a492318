"""GroupCommit: tickets, one sync in flight covering every write issued before it, fail-stop."""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import Callable

import pytest

from steelfusion.groupcommit import GroupCommit


class Disk:
    """A fake store: ``write`` runs in the worker thread and may be held or made to fail."""

    def __init__(self) -> None:
        self.cuts: list[int] = []
        self.writes: list[int] = []
        self.done: list[int] = []
        self.threads: set[int] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.error: BaseException | None = None

    def cut(self, target: int) -> int:
        self.cuts.append(target)
        return target

    def write(self, target: int) -> None:
        self.threads.add(threading.get_ident())
        self.entered.set()
        assert self.gate.wait(5)
        if self.error is not None:
            raise self.error
        self.writes.append(target)

    def finish(self, target: int) -> None:
        self.done.append(target)


def make(eager: bool = True) -> tuple[Disk, GroupCommit[int, OSError], list[int]]:
    """A fake disk, its group commit (OSError is fatal), and what its listeners heard."""
    disk = Disk()
    gc: GroupCommit[int, OSError] = GroupCommit(disk.cut, disk.write, done=disk.finish,
                                                fatal=OSError, eager=eager)
    seen: list[int] = []
    gc.on_durable(seen.append)
    return disk, gc, seen


async def until(cond: Callable[[], bool], timeout: float = 5) -> None:
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.001)
    await asyncio.wait_for(poll(), timeout)


def test_one_sync_covers_every_write_issued_before_it() -> None:
    disk, gc, seen = make()

    async def main() -> None:
        tickets = [gc.issue() for _ in range(500)]
        await asyncio.gather(*(gc.wait(t) for t in tickets))

    asyncio.run(main())
    assert disk.cuts == [500] and disk.writes == [500] and disk.done == [500]
    assert seen == [500] and gc.durable == gc.issued == 500
    assert threading.get_ident() not in disk.threads  # the sync ran in a worker thread


def test_writes_during_a_sync_share_the_next_and_counters_only_grow() -> None:
    disk, gc, seen = make()

    async def main() -> None:
        disk.gate.clear()
        first = asyncio.ensure_future(gc.wait(gc.issue()))
        await asyncio.to_thread(disk.entered.wait, 5)  # sync 1 (ticket 1) is in the worker
        late = [asyncio.ensure_future(gc.wait(gc.issue())) for _ in range(50)]
        await asyncio.sleep(0.01)
        assert not first.done() and gc.durable == 0 and gc.running
        disk.gate.set()
        await first
        await asyncio.gather(*late)

    asyncio.run(main())
    assert disk.cuts == [1, 51] and disk.writes == [1, 51]
    assert seen == [1, 51]  # the listeners hear each durable counter once, in order


def test_eager_loops_while_writes_keep_coming() -> None:
    _, gc, seen = make()  # eager: every issued ticket is committed, asked for or not

    def more(durable: int) -> None:
        if durable < 5:
            gc.issue()  # a write issued while the commit finishes: the loop goes on

    gc.on_durable(more)

    async def main() -> None:
        gc.issue()
        gc.request()
        await until(lambda: not gc.running)

    asyncio.run(main())
    assert seen == [1, 2, 3, 4, 5] and gc.durable == 5


def test_lazy_commits_only_what_was_asked_for() -> None:
    disk, gc, _ = make(eager=False)

    async def main() -> None:
        t = gc.issue()
        disk.gate.clear()
        waiter = asyncio.ensure_future(gc.wait(t))
        await asyncio.to_thread(disk.entered.wait, 5)
        gc.issue()  # nobody asks for it: it rides along with a later commit
        disk.gate.set()
        await waiter
        await until(lambda: not gc.running)
        assert gc.durable == 1 and gc.issued == 2
        gc.request()  # now asked for
        await until(lambda: gc.durable == 2)

    asyncio.run(main())
    assert disk.writes == [1, 2]


def test_force_commits_with_no_new_ticket() -> None:
    disk, gc, seen = make()

    async def main() -> None:
        gc.request()  # nothing issued: nothing to do
        assert not gc.running
        gc.request(force=True)
        await until(lambda: bool(seen))

    asyncio.run(main())
    assert disk.cuts == [0] and seen == [0]


def test_any_number_of_concurrent_waiters() -> None:
    disk, gc, _ = make(eager=False)

    async def main() -> None:
        disk.gate.clear()
        waiters = []
        for i in range(2000):
            t = gc.issue()
            waiters.append(asyncio.ensure_future(gc.wait(t if i % 3 else None)))
            if i == 10:
                await asyncio.to_thread(disk.entered.wait, 5)
        again = [asyncio.ensure_future(gc.wait(7)) for _ in range(100)]  # old tickets
        await asyncio.sleep(0.01)
        cancelled = waiters[1500]
        cancelled.cancel()  # a waiter that gives up does not cancel the commit
        disk.gate.set()
        await asyncio.gather(*waiters[:1500], *waiters[1501:], *again)
        assert cancelled.cancelled()
        await gc.wait(1)  # long durable: returns at once
        assert gc.durable == 2000

    asyncio.run(main())
    assert len(disk.writes) == 2  # the one in flight, then one for everyone else


def test_a_failed_sync_is_fail_stop() -> None:
    disk, gc, seen = make(eager=False)
    failures: list[OSError] = []
    gc.on_failure(failures.append)

    async def main() -> None:
        await gc.wait(gc.issue())
        disk.error = OSError(errno.EIO, "Input/output error")
        tickets = [gc.issue() for _ in range(20)]
        results = await asyncio.gather(*(gc.wait(t) for t in tickets), return_exceptions=True)
        assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results)
        disk.error = None  # the device "recovers": a retry would now succeed...
        with pytest.raises(OSError, match="Input/output"):
            await gc.wait(gc.issue())
        gc.request(force=True)
        await asyncio.sleep(0.05)
        assert not gc.running
        await gc.wait(1)  # durable before the failure: still fine

    asyncio.run(main())
    assert seen == [1] and gc.durable == 1  # ...but nothing more is reported durable
    assert len(failures) == 1 and gc.failed is failures[0]
    assert disk.done == [1]


def test_a_bug_in_a_hook_is_fatal_when_asked() -> None:
    disk = Disk()
    failures: list[Exception] = []
    gc: GroupCommit[int, Exception] = GroupCommit(disk.cut, disk.write, fatal=Exception)
    gc.on_failure(failures.append)

    def broken(durable: int) -> None:
        raise RuntimeError("listener bug")

    gc.on_durable(broken)

    async def main() -> None:
        gc.issue()
        gc.request()
        await until(lambda: bool(failures))

    asyncio.run(main())
    assert "listener bug" in str(failures[0]) and gc.failed is failures[0]


def test_other_errors_reach_that_loops_waiters_only() -> None:
    disk, gc, _ = make(eager=False)  # fatal: OSError only
    failures: list[OSError] = []
    gc.on_failure(failures.append)

    async def main() -> None:
        disk.error = ValueError("not fatal")
        tickets = [gc.issue() for _ in range(5)]
        results = await asyncio.gather(*(gc.wait(t) for t in tickets), return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results)
        assert not gc.running and gc.failed is None
        disk.error = None
        await gc.wait(gc.issue())  # the next request starts afresh and covers them all

    asyncio.run(main())
    assert failures == [] and gc.durable == 6 and disk.writes == [6]


def test_not_fail_stop_without_a_fatal_type() -> None:
    disk = Disk()
    gc: GroupCommit[int, OSError] = GroupCommit(disk.cut, disk.write, eager=False)

    async def main() -> None:
        disk.error = OSError(errno.EIO, "Input/output error")
        with pytest.raises(OSError):
            await gc.wait(gc.issue())
        disk.error = None
        await gc.wait(gc.issue())

    asyncio.run(main())
    assert gc.failed is None and gc.durable == 2


def test_settle_and_fail_without_an_event_loop() -> None:
    """The owner's blocking writes (the Journal's flush) report progress the same way."""
    disk, gc, seen = make()
    failures: list[OSError] = []
    gc.on_failure(failures.append)
    for _ in range(3):
        gc.issue()
    gc.settle(2)
    gc.settle(1)  # never backwards
    assert gc.durable == 2 and seen == [2, 2]
    with pytest.raises(AssertionError):
        gc.settle(4)  # never past what was issued
    gc.fail(OSError(errno.EIO, "quiet"), report=False)
    gc.fail(OSError(errno.EIO, "second"))  # the first failure wins
    assert failures == [] and str(gc.failed) == "[Errno 5] quiet"
    assert disk.cuts == []


def test_wait_refuses_a_ticket_never_issued() -> None:
    _, gc, _ = make()

    async def main() -> None:
        with pytest.raises(ValueError, match="never issued"):
            await gc.wait(1)

    asyncio.run(main())
