"""asyncio helpers of the Edge's command path that are not SCSI.

:class:`RangeLock` orders writes to overlapping block ranges;
:class:`StartedCoroutine` and :func:`to_the_end` run a command without an
asyncio Task when it never waits, and keep it running to the end once it does.

Why not asyncio's own: Python 3.12's ``asyncio.eager_task_factory`` (and
``Task(..., eager_start=True)``) starts a coroutine the way
:class:`StartedCoroutine` does, but we run 3.11, which has neither; on 3.12
it could replace the hand start in ``edge.target`` (it still builds a Task
for a command that finishes at once).  ``asyncio.shield`` lets the caller's
cancellation through at once and wraps even an I/O that never waits in a
Task: on the Edge's loop (uvloop), ``await asyncio.shield(io())`` costs 6.5 µs
where ``await to_the_end(io())`` costs 0.5 µs (a plain ``await`` 0.1 µs), so
:func:`to_the_end` uses a shield only once the I/O has really waited.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Generator
from typing import Any


class RangeLock:
    """Shared/exclusive locks on block ranges ``[start, end)``.

    Plain writes take shared locks (they may run together); COMPARE AND
    WRITE, ORWRITE, WRITE SAME, UNMAP, WRITE ATOMIC and EXTENDED COPY take
    exclusive ones, so nothing else writes their range between their read and
    their write.  Waiters are served in arrival order when their ranges
    overlap, so a stream of plain writes cannot starve a COMPARE AND WRITE.
    """

    __slots__ = ("_held", "_next", "_waiters", "_xheld")

    def __init__(self) -> None:
        self._held: dict[int, tuple[int, int, bool]] = {}
        self._waiters: deque[tuple[int, int, bool, asyncio.Future[int]]] = deque()
        self._next = 0
        self._xheld = 0

    def _conflicts(self, start: int, end: int, exclusive: bool) -> bool:
        return any(start < e and s < end and (exclusive or x) for s, e, x in self._held.values())

    def _grant(self, start: int, end: int, exclusive: bool) -> int:
        self._next += 1
        self._held[self._next] = (start, end, exclusive)
        if exclusive:
            self._xheld += 1
        return self._next

    def _grantable(self, start: int, end: int, exclusive: bool) -> bool:
        """Nothing held or waiting in the way (waiters ahead keep their turn)."""
        if not self._waiters:
            return (not exclusive and not self._xheld) or not self._conflicts(start, end, exclusive)
        return not any(s < end and start < e and (x or exclusive) for s, e, x, _ in self._waiters) \
            and not self._conflicts(start, end, exclusive)

    def shared_free(self, start: int, end: int) -> bool:
        """A shared lock on the range would be granted now (:meth:`try_acquire`
        would succeed), for a write that finishes without yielding."""
        return self._grantable(start, end, False)

    def try_acquire(self, start: int, end: int, exclusive: bool = False) -> int | None:
        """The range now if nothing is in the way (the plain-write fast path),
        else None."""
        return self._grant(start, end, exclusive) if self._grantable(start, end, exclusive) \
            else None

    async def acquire(self, start: int, end: int, exclusive: bool = False) -> int:
        """Wait for the range; returns a token for :meth:`release`."""
        tok = self.try_acquire(start, end, exclusive)
        if tok is not None:
            return tok
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        entry = (start, end, exclusive, fut)
        self._waiters.append(entry)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(fut.result())
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._wake()
            raise

    @contextlib.asynccontextmanager
    async def exclusive(self, start: int, end: int) -> AsyncIterator[None]:
        """Hold ``[start, end)`` exclusively for the body of an ``async with``
        (the read-modify-write commands; plain writes use :meth:`try_acquire`
        inline, which costs no context manager)."""
        tok = await self.acquire(start, end, True)
        try:
            yield
        finally:
            self.release(tok)

    def release(self, token: int) -> None:
        held = self._held.pop(token, None)
        if held is not None and held[2]:
            self._xheld -= 1
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        blocked: list[tuple[int, int, bool]] = []
        keep: deque[tuple[int, int, bool, asyncio.Future[int]]] = deque()
        for s, e, x, fut in self._waiters:
            if fut.done():
                continue
            ahead = any(s < be and bs < e and (x or bx) for bs, be, bx in blocked)
            if not ahead and not self._conflicts(s, e, x):
                fut.set_result(self._grant(s, e, x))
            else:
                blocked.append((s, e, x))
                keep.append((s, e, x, fut))
        self._waiters = keep

    @property
    def held(self) -> int:
        return len(self._held)


class StartedCoroutine(Coroutine[Any, Any, Any]):
    """A coroutine started by hand (``coro.send(None)``, to finish it without
    a Task when it never waits) and now suspended on ``yielded``, in a form
    an asyncio Task can run (Python 3.12's eager task start, on 3.11).

    The Task's first step gets ``yielded`` back, still flagged as blocking as
    the coroutine's ``await`` left it, so the Task waits on it exactly as if
    it had run the coroutine from the start; every later step goes straight
    to the coroutine.  A cancellation that arrives before that first step
    (a command aborted in the same batch of PDUs that brought it) cancels
    ``yielded`` and is thrown into the coroutine, so its ``finally`` blocks
    and waiter clean-ups run, as they would in a Task.
    """

    __slots__ = ("_coro", "_first", "_started")

    def __init__(self, coro: Coroutine[Any, Any, Any], yielded: Any) -> None:
        self._coro = coro
        self._first = yielded
        self._started = False

    def send(self, value: Any) -> Any:
        if self._started:
            return self._coro.send(value)
        self._started = True
        first, self._first = self._first, None
        return first

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if not self._started:
            self._started = True
            first, self._first = self._first, None
            if first is not None:
                first.cancel()  # what Task.cancel does to the future it waits on
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)  # pragma: no cover - old calling style

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, Any]:
        raise TypeError("StartedCoroutine is run by a Task, not awaited")


async def to_the_end(coro: Coroutine[Any, Any, Any]) -> Any:
    """``await coro``, except that cancelling the caller does not cut it short.

    For I/O that changes the medium under a range lock: a backend may hand a
    write to a thread that no cancellation can stop, so a command cancelled by
    ABORT TASK or a reset must keep its lock (and keep the TMF answer back)
    until the data has landed, or a later write to the same blocks could land
    first (SAM-5 §7.2: once the abort is answered the task has no more
    effect).  The cancellation is raised once the I/O is over.  Costs nothing
    when the I/O finishes without waiting (the backend's fast case)."""
    try:
        yielded = coro.send(None)
    except StopIteration as e:
        return e.value
    return await finish(coro, yielded)


async def finish(coro: Coroutine[Any, Any, Any], yielded: Any) -> Any:
    """The rest of :func:`to_the_end` for ``coro``, started by hand and now
    waiting on ``yielded``: a Task runs it under a shield until it is done,
    and a cancellation of ours is raised after that."""
    task = asyncio.get_running_loop().create_task(StartedCoroutine(coro, yielded))
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError as e:
            if not task.cancelled():
                cancelled = e  # ours, not the I/O's: wait for the I/O all the same
        except Exception:
            pass  # the I/O failed: task.result() below raises it
    if cancelled is not None:
        if not task.cancelled():
            task.exception()  # the command is gone: nobody else will look at it
        raise cancelled
    return task.result()
