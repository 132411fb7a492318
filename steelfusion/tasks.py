"""Background tasks that are kept and whose failure is heard.

asyncio keeps only a weak reference to a task: one nobody holds can be
collected mid-flight, and an exception in one nobody awaits is only printed
at garbage collection, if ever (see the ``asyncio.create_task`` docs: "Save a
reference to the result of this function"). Issue 13 found an fdatasync
failure raised in such a task: acknowledgements stopped and nothing said why.

:class:`Background` holds every task it starts and hands an unexpected
exception to its owner (a Core raises an alarm). ``asyncio.TaskGroup`` is the
standard tool for tasks that live and die together; here one failure must not
cancel the others: the node keeps serving and says what stopped.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from steelfusion import log

_log = log.get("tasks")

OnFailure = Callable[[str, BaseException], None]


class Background:
    """A set of named tasks; ``on_failure(name, exc)`` for each that raised."""

    def __init__(self, on_failure: OnFailure | None = None) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self.on_failure = on_failure
        self.failures = 0

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        self.failures += 1
        _log.error("background_task_failed", task=task.get_name(), error=repr(exc),
                   exc_info=exc)
        if self.on_failure is not None:
            self.on_failure(task.get_name(), exc)

    def __len__(self) -> int:
        return len(self._tasks)

    async def cancel_all(self) -> None:
        """Cancel every task and wait for them to end (at stop)."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with_parent() -> None:
    """In a child, before exec (``preexec_fn``): the kernel SIGKILLs it when the thread that
    started it ends. A tool started by ``subprocess.run`` (its thread waits for it) or a
    supervised daemon (tgtd) then never outlives the process that owns it, even when that
    one is SIGKILLed or interrupted between fork and the Popen object (an orphaned
    ``qemu-img bench`` spun on a dead lab's portal for the rest of a test run)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
