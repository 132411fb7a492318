"""What the adapter gives an iSCSI target connection: targets, limits, hooks.

:class:`SessionConfig` is shared by every connection of one portal and never
changes under them; the :class:`Authenticator` protocol is the security-stage
hook (RFC 7143 §6.3.2, §12) that ``edge.auth`` implements.  This module holds
no protocol logic: the connection is :mod:`edge.iscsi_session`, which
re-exports these names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from steelfusion.iscsi.pdu import Buffer
from steelfusion.iscsi.text import Pairs, TargetLimits


@dataclass(frozen=True, slots=True)
class TargetInfo:
    """What the protocol needs to know of one target node."""

    name: str
    luns: frozenset[int]
    alias: str | None = None


class AuthExchange(Protocol):
    """One login's authentication exchange (RFC 7143 §12): ``methods`` lists
    the AuthMethod values accepted, best first; ``step`` consumes one Login
    Request's security keys and returns (keys to answer, outcome): True =
    authenticated, False = refused (``reason`` says why, without secrets),
    None = more round trips needed.  ``edge.auth.ChapExchange`` is one."""

    reason: str

    def methods(self) -> Sequence[str]: ...

    def step(self, method: str, keys: Mapping[str, str]) -> tuple[Pairs, bool | None]: ...


class Authenticator(Protocol):
    """Security-stage hook (RFC 7143 §6.3.2, §12); ``edge.auth`` implements it.

    ``authorize`` is the access list: False ends the login with status
    0x0202 (authorization failure).  ``begin`` returns the exchange this
    initiator must complete for this target (None for a discovery session),
    or None when no authentication is required."""

    def authorize(self, initiator_name: str, target_name: str | None) -> bool: ...

    def begin(self, initiator_name: str, target_name: str | None) -> AuthExchange | None: ...


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Target-side settings shared by all connections of one portal."""

    targets: Mapping[str, TargetInfo]
    limits: TargetLimits = field(default_factory=TargetLimits)
    portal_group_tag: int = 1
    cmd_window: int = 128
    """Commands the initiator may have queued (MaxCmdSN - ExpCmdSN + 1)."""
    max_write_buffer_bytes: int = 64 * 1024 * 1024
    """Solicited write data we are willing to hold per connection; R2Ts for
    further commands wait until earlier writes finish."""
    max_command_bytes: int = 16 * 1024 * 1024
    """Largest Expected Data Transfer Length accepted for a write."""
    login_timeout_s: float = 15.0
    authenticator: Authenticator | None = None
    defer_resets: bool = False
    """LOGICAL UNIT RESET and TARGET WARM/COLD RESET reach other sessions and
    the LU's shared state, which only the adapter can touch: with this set
    the connection emits :class:`~edge.iscsi_events.ResetRequested` once its
    own tasks are done and answers when the adapter calls
    :meth:`~edge.iscsi_session.TargetConnection.complete_tmf`."""


FastLane = Callable[[int, bytes, Buffer], tuple[int, Buffer, Buffer, int | None] | None]
"""The adapter's fast lane, ``fast(lun, cdb, data)``: ``(status, data_in,
sense, transfer_length)`` for a command it finished at once, or None to take
the normal path (see :class:`~edge.iscsi_session.TargetConnection`)."""
