"""Errors of the Journal LUN, one class per alarm.

Seed 002, "Journal LUN metrics": "Journal LUN-error handling ... includes
checks for loss of connectivity and offlining, but it can include events such
as out of storage, corruption, and shrinking size. In these cases, an alarm is
raised on the Core". Each class below is one of those conditions; its
``alarm`` is the short key the Core raises (``Core.raise_alarm(e.alarm, str(e))``)
and its message says what the operator can do about it.

Misuse by our own code (an unknown LUN, an offset past the LUN's end) is a
``ValueError``, not a journal alarm: the journal is fine, the caller is wrong
(STYLE.md, "Errors").
"""

from __future__ import annotations


class JournalError(Exception):
    """The Journal LUN cannot be used; ``alarm`` names the condition."""

    alarm = "journal_error"

    def __init__(self, message: str, *, alarm: str | None = None) -> None:
        super().__init__(message)
        if alarm is not None:
            self.alarm = alarm


class JournalTooSmall(JournalError):
    """Seed: size < 1 GiB + 2 GiB x protected LUNs -> replication does not start."""

    alarm = "journal_too_small"

    def __init__(self, message: str, *, size: int = 0, need: int = 0, luns: int = 0) -> None:
        super().__init__(message)
        self.size = size
        self.need = need
        self.luns = luns


class JournalShrunk(JournalError):
    """The file or device is now smaller than the size recorded in the superblock."""

    alarm = "journal_shrunk"


class JournalUnreachable(JournalError):
    """The path is missing or an I/O failed (ENOENT, EIO, EACCES, ...): offline."""

    alarm = "journal_unreachable"


class JournalFull(JournalError):
    """Out of storage: no room for a slot or a bitmap, or ENOSPC from a thin LUN."""

    alarm = "journal_full"


class JournalCorrupt(JournalError):
    """A checksum or a structural check failed on data that should be valid."""

    alarm = "journal_corrupt"


class JournalUnsupported(JournalError):
    """The journal was written by a newer format version than this build reads."""

    alarm = "journal_version"


class JournalOffline(JournalError):
    """The journal was closed, or failed earlier; the first failure is ``cause``."""

    alarm = "journal_offline"
