"""What :class:`steelfusion.iscsi.initiator.InitiatorConnection` hands its
adapter (:mod:`steelfusion.iscsi.client`): one event per thing that happened
on the connection, a plain frozen dataclass each.  The Edge's target has its
own in :mod:`edge.iscsi_events`.  Importable from the initiator too.
"""

from __future__ import annotations

from dataclasses import dataclass

from steelfusion.iscsi.commands import Sense
from steelfusion.iscsi.pdu import Buffer
from steelfusion.iscsi.text import SessionParams


@dataclass(frozen=True, slots=True)
class LoginComplete:
    """Full Feature Phase: commands may be submitted."""

    params: SessionParams
    tsih: int
    target_alias: str | None
    portal_group_tag: int | None


@dataclass(frozen=True, slots=True)
class LoginFailed:
    """The login ended without a session.  ``status`` is the target's
    status class/detail (RFC 7143 §11.13.5: 0x01xx redirect, 0x02xx initiator
    error such as 0x0201 authentication failure, 0x03xx target error), or
    None when we ended it (a failed mutual CHAP check, a bad negotiation
    answer, the login timeout).  ``target_address`` is where a redirect
    points."""

    status: int | None
    reason: str
    target_address: str | None = None

    @property
    def redirect(self) -> bool:
        return self.status is not None and self.status >> 8 == 1


@dataclass(frozen=True, slots=True)
class CommandComplete:
    """A SCSI command ended.  ``data`` is what a read returned (a view of the
    buffer given to ``InitiatorConnection.submit``, else a bytearray);
    ``residual`` counts bytes short (``underflow``) or beyond
    (``overflow``) the expected length (RFC 7143 §11.4.5); ``response`` is
    the iSCSI service response (0: completed at target)."""

    tag: int
    status: int
    data: Buffer = b""
    sense: Sense | None = None
    response: int = 0
    residual: int = 0
    overflow: bool = False
    underflow: bool = False


@dataclass(frozen=True, slots=True)
class CommandRejected:
    """The target rejected the command (RFC 7143 §11.17); it will not run.
    Reason 0x0C (waiting for logout) means: retry in a new session."""

    tag: int
    reason: int


@dataclass(frozen=True, slots=True)
class Rejected:
    """A Reject of something that is not a command (a Data-Out, a NOP-Out)."""

    reason: int
    opcode: int | None


@dataclass(frozen=True, slots=True)
class ConnectionDead:
    """No sign of life within the NOP timeout: drop the connection."""

    reason: str


@dataclass(frozen=True, slots=True)
class LogoutRequested:
    """The target asks us to log out within ``within_s`` seconds (Async
    Message event 1): finish, log out, log in again."""

    within_s: int


@dataclass(frozen=True, slots=True)
class TargetWillDrop:
    """The target will drop this connection (or, with ``session``, all of
    them) (Async Message events 2, 3); reconnect after ``time2wait_s``."""

    session: bool
    time2wait_s: int
    time2retain_s: int


@dataclass(frozen=True, slots=True)
class AsyncEvent:
    """Any other Async Message (RFC 7143 §11.9.1): event 0 carries the SCSI
    asynchronous event's ``sense``; 4 asks for renegotiation, which we do
    not do (the negotiated values stay)."""

    event: int
    sense: Sense | None
    parameters: tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class LogoutComplete:
    """The Logout Response (RFC 7143 §11.15.1): 0 closed, 1 CID not found,
    2 recovery not supported, 3 cleanup failed.  The connection is done."""

    response: int
    time2wait_s: int
    time2retain_s: int


Event = (LoginComplete | LoginFailed | CommandComplete | CommandRejected | Rejected
         | ConnectionDead | LogoutRequested | TargetWillDrop | AsyncEvent | LogoutComplete)
