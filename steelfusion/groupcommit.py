"""Group commit: many writes issued, one sync in a worker thread covering all of them.

Three stores make their writes durable the same way: the Edge's write log
(:class:`edge.blockstore.wal.WriteLog`), a Core's backend LUNs
(:class:`core.lunstore.LunStore`) and the Journal LUN
(:class:`journal.journal.Journal`). Each write takes a *ticket* (a counter).
One commit at a time *cuts* what was issued (on the event loop), *writes*
and ``fdatasync``\\ s it in a worker thread while the loop goes on issuing
the next writes, then reports every ticket up to its cut durable. Writes
issued meanwhile share the next commit, so a burst of writes costs one or
two syncs instead of one each; the loop keeps going while there is more.

A failure of the ``fatal`` type stops the store for good (fail-stop): after
an ``fdatasync`` error the kernel may have dropped the dirty pages, and a
retried sync would "succeed" without them (PostgreSQL's fsync lesson), so no
ticket is ever reported durable by this object's loop again. Other errors go
to the waiters of that loop only; the next request starts afresh.

What a commit writes and in which order (data, then the applied seq; bitmaps,
superblock, marker; segment files, then their folder) stays with each store:
it gives ``cut`` (loop thread), ``write`` (worker thread) and ``done`` (loop
thread). The counters and the waiters are plain state; only :meth:`_run`
touches the event loop, so tests can drive :meth:`issue`, :meth:`settle` and
:meth:`fail` directly.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Generic, TypeVar

from steelfusion import log

_log = log.get("groupcommit")

W = TypeVar("W")  # what one commit carries from the event loop to its worker thread
E = TypeVar("E", bound=BaseException)  # the failures that stop the store for good


class Tickets:
    """The counters a write path reads on its hot path: plain attributes, no I/O.

    ``issued`` counts tickets handed out; every ticket up to ``durable`` is durable.
    """

    def __init__(self) -> None:
        self.issued = 0
        self.durable = 0

    def issue(self) -> int:
        """One more write: its ticket."""
        self.issued += 1
        return self.issued


class GroupCommit(Tickets, Generic[W, E]):
    """Tickets, one commit in flight, loop while more, listeners, first failure.

    ``cut(target)`` runs on the event loop as a commit starts (``target`` is
    the last ticket it covers) and returns the commit's work; ``write(work)``
    runs in a worker thread (the writes and syncs); ``done(work)``, if given,
    runs on the loop after it, before the durable listeners hear ``target``.

    ``eager``: every issued ticket is committed (the loop runs while
    ``durable < issued``). Otherwise only tickets someone asked for with
    :meth:`request` or :meth:`wait` are; later ones ride along with the next
    commit (the Journal's clears are never urgent).
    """

    def __init__(self, cut: Callable[[int], W], write: Callable[[W], None], *,
                 done: Callable[[W], None] | None = None, fatal: type[E] | None = None,
                 eager: bool = True) -> None:
        super().__init__()
        self._cut = cut
        self._write = write
        self._done = done
        self._fatal = fatal
        self._eager = eager
        self._wanted = 0  # the highest ticket asked for (eager: unused)
        self._force = False
        self._task: asyncio.Task[None] | None = None  # held: asyncio keeps weak refs only
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # heap by ticket
        self._arrival = itertools.count()  # ties in the heap: never compare futures
        self._listeners: list[Callable[[int], None]] = []
        self._failure_listeners: list[Callable[[E], None]] = []
        self.failed: E | None = None

    def on_durable(self, fn: Callable[[int], None]) -> None:
        """``fn(durable)`` after every commit (and every :meth:`settle`), on the loop thread."""
        self._listeners.append(fn)

    def on_failure(self, fn: Callable[[E], None]) -> None:
        """``fn(error)`` once, at the first fatal failure."""
        self._failure_listeners.append(fn)

    @property
    def running(self) -> bool:
        """A commit loop is in flight."""
        return self._task is not None

    # -- asking -------------------------------------------------------------------------
    def request(self, *, force: bool = False) -> None:
        """Commit every ticket issued so far in the background; the listeners hear of it.

        ``force``: one more commit even with no new ticket (its ``cut`` and
        ``write`` still run: LunStore persists a moved applied seq that way).
        """
        self._force = self._force or force
        if self.issued > self._wanted:
            self._wanted = self.issued
        self._start()

    async def wait(self, ticket: int | None = None) -> None:
        """Return once ``ticket`` (default: the last one issued) is durable.

        Raises the first fatal failure (the same object for every waiter:
        copy it before raising it on), or the error that ended the commit
        loop this waiter was waiting on. Any number of tasks may wait; a
        cancelled waiter does not cancel the commit.
        """
        if ticket is None:
            ticket = self.issued
        if ticket > self.issued:
            raise ValueError(f"ticket {ticket} was never issued (last: {self.issued})")
        if self.durable >= ticket:
            return
        if self.failed is not None:
            raise self.failed
        if ticket > self._wanted:
            self._wanted = ticket
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (ticket, next(self._arrival), fut))
        self._start()
        await fut

    # -- progress -----------------------------------------------------------------------
    def settle(self, upto: int) -> None:
        """Every ticket up to ``upto`` is durable: tell the listeners, wake the waiters.

        The commit loop calls it after each commit; an owner that also writes
        synchronously (the Journal's ``flush``) calls it after its own writes.
        """
        assert upto <= self.issued, (upto, self.issued)
        if upto > self.durable:
            self.durable = upto
        durable = self.durable
        for fn in self._listeners:
            fn(durable)
        waiters = self._waiters
        while waiters and waiters[0][0] <= durable:
            fut = heapq.heappop(waiters)[2]
            if not fut.done():
                fut.set_result(None)

    def fail(self, e: E, *, report: bool = True) -> None:
        """Stop for good with ``e`` (the first failure wins): waiters and later calls get it.

        ``report=False``: the owner stopped the store itself (the Journal's
        ``abandon``), so the failure listeners are not told.
        """
        if self.failed is not None:
            return
        self.failed = e
        self._reject(e)
        if report:
            for fn in self._failure_listeners:
                fn(e)

    # -- the loop -----------------------------------------------------------------------
    def _more(self) -> bool:
        return self._force or self.durable < (self.issued if self._eager else self._wanted)

    def _start(self) -> None:
        if self._task is None and self.failed is None and self._more():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while self.failed is None and self._more():
                self._force = False
                target = self.issued
                work = self._cut(target)
                await asyncio.to_thread(self._write, work)
                if self._done is not None:
                    self._done(work)
                self.settle(target)
        except BaseException as e:
            if self._fatal is not None and isinstance(e, self._fatal):
                self.fail(e)  # not only EIO: a bug in a hook must not end the loop silently
            elif isinstance(e, Exception):
                if not self._reject(e):
                    _log.error("group_commit_error", error=repr(e))
            else:  # cancelled (the event loop is closing): so are the waiters
                self._reject(e)
                raise
        finally:
            self._task = None

    def _reject(self, e: BaseException) -> bool:
        """Every waiter gets ``e``; False if none was waiting."""
        waiters, self._waiters = self._waiters, []
        told = False
        for _, _, fut in waiters:
            if fut.done():
                continue
            if isinstance(e, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(e)
            told = True
        return told
