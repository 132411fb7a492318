"""The write reserve: how many bytes of uncommitted writes an Edge holds, and who waits.

DESIGN.md, write path step 1: a host write is stored as *uncommitted* and
freed when the Core acknowledges it (step 6); the bytes it holds meanwhile
are the *write reserve*. When it is full, host writes wait, first come first
served — never fail, never drop. A write is admitted (:meth:`WriteReserve.reserve`)
before it is appended, so the bytes counted are those in the log
(``used_bytes``) plus those admitted and not appended yet.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class WriteReserve:
    """Admission to the write reserve: FIFO waiters, never a refusal.

    A write bigger than the whole reserve is admitted once the reserve is
    empty, so no write waits forever. Single-threaded (the event loop's).
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = 0  # uncommitted bytes in the log
        self._admitted = 0  # bytes admitted and not yet appended
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def reserve(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more fit (FIFO, never fails)."""
        if not self._waiters and self._fits(nbytes):
            self._admitted += nbytes
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((nbytes, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._admitted = max(0, self._admitted - nbytes)
                self._wake()
            else:
                with contextlib.suppress(ValueError):  # no longer waiting (status counts it)
                    self._waiters.remove((nbytes, fut))
                self._wake()  # it may have been the head of the queue holding others back
            raise

    def try_reserve(self, nbytes: int) -> bool:
        """:meth:`reserve` without waiting: True (admitted) only if it fits now
        and nobody is queued ahead (FIFO)."""
        if self._waiters or not self._fits(nbytes):
            return False
        self._admitted += nbytes
        return True

    def unreserve(self, nbytes: int) -> None:
        """Give back an admission whose write was never appended."""
        self._admitted = max(0, self._admitted - nbytes)
        self._wake()

    def add(self, nbytes: int) -> None:
        """A record entered the log (appended or replayed): its admission, if any, is used."""
        self.used_bytes += nbytes
        if self._admitted:
            self._admitted = max(0, self._admitted - nbytes)

    def free(self, nbytes: int) -> None:
        """The Core committed ``nbytes``: room for the writers waiting."""
        self.used_bytes -= nbytes
        self._wake()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _fits(self, nbytes: int) -> bool:
        used = self.used_bytes + self._admitted
        return used + nbytes <= self.limit_bytes or used == 0

    def _wake(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.cancelled():
                self._waiters.popleft()
                continue
            if not self._fits(n):
                return
            self._waiters.popleft()
            self._admitted += n
            fut.set_result(None)
