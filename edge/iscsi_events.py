"""What an iSCSI target connection tells its adapter: events.

:class:`~edge.iscsi_session.TargetConnection` returns these from
``receive_data``, ``complete``, ``handle_timer`` and the other calls; the
adapter (``edge.target``) acts on them (start a SCSI command, stop aborted
ones, reset a LU, close the socket).  Kept apart from the state machine as
h11 keeps ``_events.py``: the vocabulary between the protocol and its I/O.
:mod:`edge.iscsi_session` re-exports every name.
"""

from __future__ import annotations

from dataclasses import dataclass

from steelfusion.iscsi.pdu import Buffer
from steelfusion.iscsi.text import SessionParams


@dataclass(frozen=True, slots=True)
class LoginComplete:
    """The connection entered Full Feature Phase."""

    initiator_name: str
    initiator_alias: str | None
    target_name: str | None
    session_type: str
    isid: int
    tsih: int
    cid: int
    params: SessionParams


@dataclass(frozen=True, slots=True)
class LoginFailed:
    """The login was refused with ``status`` (RFC 7143 §11.13.5); ``reason``
    is for the log and holds no secret.  A CloseConnection follows."""

    status: int
    reason: str
    initiator_name: str | None
    target_name: str | None


@dataclass(slots=True)
class ScsiCommandReady:
    """A SCSI command whose Data-Out (if any) has fully arrived.  Answer with
    :meth:`~edge.iscsi_session.TargetConnection.complete` (exactly once, any order)."""

    task_tag: int
    lun: int
    cdb: bytes
    data: Buffer
    expected_length: int
    read: bool
    write: bool
    immediate: bool
    cmdsn: int


@dataclass(frozen=True, slots=True)
class TasksAborted:
    """Task management aborted these running tasks; their responses will be
    dropped.  The adapter should stop the work and report each with
    :meth:`~edge.iscsi_session.TargetConnection.task_cancelled` (or let it finish and call
    :meth:`~edge.iscsi_session.TargetConnection.complete`): a TMF that aborted a task is
    answered only once the task has ended, so a long command must be
    cancelled for the answer to go out promptly."""

    task_tags: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ResetRequested:
    """A reset TMF (RFC 7143 §11.5.1) whose local tasks are finished: reset
    the LU(s) across every session, then call
    :meth:`~edge.iscsi_session.TargetConnection.complete_tmf` with ``task_tag``."""

    task_tag: int
    function: int
    lun: int


@dataclass(frozen=True, slots=True)
class LogoutComplete:
    """Logout Response queued; flush output, then close."""

    reason: int


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """The protocol is done with this connection (login failure, timeout,
    reset); flush output, then close."""

    reason: str


Event = (LoginComplete | LoginFailed | ScsiCommandReady | TasksAborted | ResetRequested
         | LogoutComplete | CloseConnection)
