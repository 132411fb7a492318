"""Task management of an iSCSI target session, sans-IO (RFC 7143 §11.5-6, SAM-5 §7.2).

:class:`TaskManagement` decides which tasks a TMF Request aborts and when it
may be answered.  Tasks still collecting write data go at once; running ones
are marked aborted (their status will be dropped) and the answer waits until
each has ended, so no write lands after the initiator was told it was
aborted.  Resets reach other sessions and the LU's shared state, so with
``SessionConfig.defer_resets`` they go to the adapter first
(:class:`~edge.iscsi_events.ResetRequested`).

It reads the connection's task table and acts only through the four calls
the connection gives it (drop a task, send a TMF Response, emit an event,
close); the CmdSN window and the PDUs stay with
:class:`~edge.iscsi_session.TargetConnection`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from edge.iscsi_events import Event, ResetRequested, TasksAborted
from edge.iscsi_tasks import Task, TaskState
from edge.scsi.cdb import decode_lun
from steelfusion.iscsi.pdu import TaskMgmtRequest


class TmfFunction(enum.IntEnum):
    """Task management function codes (RFC 7143 §11.5.1)."""

    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponse(enum.IntEnum):
    """Task management response codes (RFC 7143 §11.6.1)."""

    FUNCTION_COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGNMENT_NOT_SUPPORTED = 4
    NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    FUNCTION_REJECTED = 255


RESETS = frozenset({TmfFunction.LOGICAL_UNIT_RESET, TmfFunction.TARGET_WARM_RESET,
                    TmfFunction.TARGET_COLD_RESET})
"""The TMFs that reach beyond this session (``SessionConfig.defer_resets``)."""


@dataclass(slots=True)
class PendingTmf:
    """A TMF answered once the running tasks it aborted (``waiting``) end."""

    pdu: TaskMgmtRequest
    waiting: set[int]
    close_after: bool = False


class TaskManagement:
    """One session's TMFs: those waiting for aborted tasks, resets waiting
    for the adapter.

    ``tasks`` is the connection's task table (read only here).  ``drop(task)``
    forgets a task still collecting data (its late Data-Out is discarded),
    ``respond(pdu, response)`` sends the TMF Response, ``emit(event)`` hands
    an event to the adapter and ``close(reason)`` ends the connection (after
    a TARGET COLD RESET).
    """

    def __init__(self, tasks: Mapping[int, Task], *, defer_resets: bool,
                 drop: Callable[[Task], None],
                 respond: Callable[[TaskMgmtRequest, int], None],
                 emit: Callable[[Event], None], close: Callable[[str], None]) -> None:
        self._tasks = tasks
        self._defer_resets = defer_resets
        self._drop = drop
        self._respond = respond
        self._emit = emit
        self._close = close
        self._waiting: list[PendingTmf] = []
        self._resets: dict[int, PendingTmf] = {}

    @property
    def busy(self) -> bool:
        """TMFs not answered yet (a Logout Response waits for them)."""
        return bool(self._waiting or self._resets)

    def request(self, pdu: TaskMgmtRequest, luns: Collection[int]) -> None:
        """A TMF Request the connection accepted (in the CmdSN window), except
        ABORT TASK for a task it does not hold, which the connection answers
        from its CmdSN window.  ``luns`` are the target's LUNs."""
        fn = pdu.function
        tasks = self._tasks
        if fn == TmfFunction.ABORT_TASK:
            self._abort([tasks[pdu.ref_task_tag]], pdu)
        elif fn in (TmfFunction.ABORT_TASK_SET, TmfFunction.CLEAR_TASK_SET,
                    TmfFunction.LOGICAL_UNIT_RESET):
            lun = decode_lun(pdu.lun)
            if lun not in luns:
                self._respond(pdu, TmfResponse.LUN_DOES_NOT_EXIST)
                return
            self._abort([t for t in tasks.values() if t.lun == lun], pdu)
        elif fn == TmfFunction.CLEAR_ACA:
            self._respond(pdu, TmfResponse.FUNCTION_COMPLETE)
        elif fn in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
            # RFC 7143 §11.5.1: both cancel every pending task; only a COLD reset then
            # closes the connections (Linux's error handler sends WARM and keeps using
            # the session: closing it cost a session recovery)
            self._abort(list(tasks.values()), pdu,
                        close_after=fn == TmfFunction.TARGET_COLD_RESET)
        elif fn == TmfFunction.TASK_REASSIGN:
            self._respond(pdu, TmfResponse.REASSIGNMENT_NOT_SUPPORTED)
        else:
            self._respond(pdu, TmfResponse.NOT_SUPPORTED)

    def abort(self, tasks: Iterable[Task]) -> list[int]:
        """Abort ``tasks`` now: those still collecting data are dropped,
        running ones marked aborted; returns the running ones' tags (their
        work must be stopped: :class:`~edge.iscsi_events.TasksAborted`)."""
        running = []
        for task in tasks:
            if task.state is TaskState.RUNNING:
                task.aborted = True
                running.append(task.itt)
            else:
                self._drop(task)
        return running

    def _abort(self, tasks: list[Task], pdu: TaskMgmtRequest, close_after: bool = False) -> None:
        """Abort for a TMF, answered once every running task has ended,
        through ``TargetConnection.complete`` or, once the adapter has
        cancelled it, ``TargetConnection.task_cancelled`` (SAM-5 §7.2)."""
        running = set(self.abort(tasks))
        pending = PendingTmf(pdu, running, close_after)
        if running:
            self._waiting.append(pending)
            self._emit(TasksAborted(tuple(sorted(running))))
        else:
            self._done(pending)

    def task_ended(self, itt: int) -> None:
        """An aborted task has ended: answer the TMFs that waited only for it."""
        for pending in list(self._waiting):
            pending.waiting.discard(itt)
            if not pending.waiting:
                self._waiting.remove(pending)
                self._done(pending)

    def _done(self, pending: PendingTmf) -> None:
        fn = pending.pdu.function
        if self._defer_resets and fn in RESETS:
            self._resets[pending.pdu.itt] = pending
            self._emit(ResetRequested(pending.pdu.itt, fn, decode_lun(pending.pdu.lun)))
            return
        self.finish(pending, TmfResponse.FUNCTION_COMPLETE)

    def take_reset(self, task_tag: int) -> PendingTmf | None:
        """The reset the adapter is answering (``ResetRequested.task_tag``)."""
        return self._resets.pop(task_tag, None)

    def finish(self, pending: PendingTmf, response: int) -> None:
        """Answer a TMF; after a TARGET COLD RESET, close."""
        self._respond(pending.pdu, response)
        if pending.close_after:
            self._close("target cold reset")
