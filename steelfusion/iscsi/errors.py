"""What a call of :class:`steelfusion.iscsi.client.IscsiClient` raises: one
base, :class:`IscsiError`, and a class per way a call fails, so a caller
catches as broadly as it needs (a failed login, a SCSI error with its sense,
a connection that stayed down).  Importable from the client too.
"""

from __future__ import annotations

from steelfusion.iscsi.commands import Sense


class IscsiError(Exception):
    """Anything that failed a call of the client."""


class LoginError(IscsiError):
    """The target refused the login; ``status`` is its status class/detail
    (RFC 7143 §11.13.5), or None when we ended it (e.g. mutual CHAP failed)."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason if status is None else f"{reason} (status 0x{status:04x})")
        self.status = status


class CheckCondition(IscsiError):
    """CHECK CONDITION with sense key/ASC/ASCQ (SPC-4 §4.5)."""

    def __init__(self, sense: Sense | None, what: str = "command") -> None:
        self.sense = sense
        self.key, self.asc, self.ascq = (sense.key, sense.asc, sense.ascq) if sense else (0, 0, 0)
        super().__init__(f"{what}: CHECK CONDITION {sense if sense else '(no sense data)'}")


class CommandFailed(IscsiError):
    """Any other failed command: a SAM status (``status``), an iSCSI
    response, a Reject, a short read."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ReservationConflict(CommandFailed):
    """Status RESERVATION CONFLICT (SAM-5 §5.3.1)."""


class ConnectionLost(IscsiError):
    """The target could not be reached (or the command's outcome is unknown
    after the connection dropped)."""


class Timeout(IscsiError):
    """The command did not finish within the give-up time while connected."""
