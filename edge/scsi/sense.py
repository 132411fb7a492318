"""How a SCSI command ends: status codes, sense keys, fixed-format sense data
and :class:`ScsiError`, the exception that carries its wire answer (LIO's
``sense_info_table`` in ``target_core_transport.c``, tgt's ``sense_data_build``).

Errors are CHECK CONDITION with fixed-format sense (SPC-4 §4.5.3): LBA out of
range 5/21/00, invalid opcode 5/20/00, invalid field in CDB 5/24/00 (in the
parameter list 5/26/xx), parameter list length 5/1A/00, write protected
7/27/0x, miscompare E/1D/00 with INFORMATION = offset, LUN not supported
5/25/00, backend not ready 2/04/xx, any other backend failure 4/44/00.
Reservation conflicts are status RESERVATION CONFLICT (SAM-5 §5.3.1), with no
sense data.  The iSCSI session uses the same builder for the failures it
answers itself (RFC 7143 §11.4.7.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

Buffer = bytes | bytearray | memoryview

# SAM-5 status codes.
GOOD = 0x00
CHECK_CONDITION = 0x02
CONDITION_MET = 0x04
BUSY = 0x08
RESERVATION_CONFLICT = 0x18
TASK_SET_FULL = 0x28
TASK_ABORTED = 0x40


class SenseKey(IntEnum):
    """SPC-4 Table 27."""

    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    MISCOMPARE = 0xE


# Unit attention conditions (SPC-4 Table 28): (ASC, ASCQ).
UA_POWER_ON_RESET = (0x29, 0x00)
UA_BUS_RESET = (0x29, 0x02)
UA_BUS_DEVICE_RESET = (0x29, 0x03)
UA_MODE_PARAMETERS_CHANGED = (0x2A, 0x01)


def fixed_sense(key: int, asc: int, ascq: int, *, information: int | None = None,
                field_pointer: int | None = None, in_cdb: bool = True,
                bit_pointer: int | None = None) -> bytes:
    """18 bytes of fixed-format sense data, response code 0x70 (SPC-4 §4.5.3).

    ``information`` sets the VALID bit and INFORMATION field (e.g. the
    miscompare offset); ``field_pointer`` fills the SENSE KEY SPECIFIC field
    (SKSV=1, C/D=``in_cdb``) naming the offending CDB or parameter byte.
    """
    b = bytearray(18)
    b[0] = 0x70
    b[2] = key & 0x0F
    b[7] = 10
    b[12] = asc
    b[13] = ascq
    if information is not None:
        b[0] |= 0x80
        b[3:7] = (information & 0xFFFFFFFF).to_bytes(4, "big")
    if field_pointer is not None:
        b[15] = 0x80 | (0x40 if in_cdb else 0)
        if bit_pointer is not None:
            b[15] |= 0x08 | (bit_pointer & 7)
        b[16:18] = (field_pointer & 0xFFFF).to_bytes(2, "big")
    return bytes(b)


def progress_sense(key: int, asc: int, ascq: int, progress: int) -> bytes:
    """Fixed sense with a PROGRESS INDICATION (SKSV=1, SPC-4 §4.5.2.4.4),
    ``progress`` counting to 65536."""
    b = bytearray(fixed_sense(key, asc, ascq))
    b[15] = 0x80
    b[16:18] = min(progress, 0xFFFF).to_bytes(2, "big")
    return bytes(b)


class ScsiError(Exception):
    """A command failed; carries its sense key/ASC/ASCQ (its wire answer)."""

    def __init__(self, key: int, asc: int, ascq: int = 0, *, field_pointer: int | None = None,
                 information: int | None = None, transfer_length: int | None = None,
                 in_cdb: bool = True) -> None:
        super().__init__(f"sense {key:x}/{asc:02x}/{ascq:02x}")
        self.key, self.asc, self.ascq = key, asc, ascq
        self.field_pointer = field_pointer
        self.information = information
        self.transfer_length = transfer_length
        self.in_cdb = in_cdb

    def sense(self) -> bytes:
        return fixed_sense(self.key, self.asc, self.ascq, information=self.information,
                           field_pointer=self.field_pointer, in_cdb=self.in_cdb)


class ReservationConflict(Exception):
    """End the command with status RESERVATION CONFLICT (no sense data)."""


def invalid_field(field_pointer: int | None = None) -> ScsiError:
    """ILLEGAL REQUEST / INVALID FIELD IN CDB (5/24/00)."""
    return ScsiError(SenseKey.ILLEGAL_REQUEST, 0x24, 0x00, field_pointer=field_pointer)


def invalid_param(field_pointer: int | None = None, ascq: int = 0x00) -> ScsiError:
    """ILLEGAL REQUEST / INVALID FIELD IN PARAMETER LIST (5/26/xx)."""
    return ScsiError(SenseKey.ILLEGAL_REQUEST, 0x26, ascq, field_pointer=field_pointer,
                     in_cdb=False)


def param_list_length_error() -> ScsiError:
    """ILLEGAL REQUEST / PARAMETER LIST LENGTH ERROR (5/1A/00)."""
    return ScsiError(SenseKey.ILLEGAL_REQUEST, 0x1A, 0x00)


def lba_out_of_range() -> ScsiError:
    return ScsiError(SenseKey.ILLEGAL_REQUEST, 0x21, 0x00)


def short_data_out(needed: int) -> ScsiError:
    """Fewer Data-Out bytes than the command needs: 5/0E/03 (INVALID FIELD IN
    COMMAND INFORMATION UNIT, as FCP-4 and libiscsi's residual tests expect)."""
    return ScsiError(SenseKey.ILLEGAL_REQUEST, 0x0E, 0x03, transfer_length=needed)


@dataclass(slots=True)
class ScsiResult:
    """Outcome of one command.

    ``data`` is the Data-In payload; ``transfer_length`` is how many bytes
    the command itself wanted to move (SPDTL), when that differs from what
    the transport can infer, so the transport can report residuals (iSCSI
    RFC 7143 §11.4.5) for Data-Out commands.
    """

    status: int
    data: Buffer = b""
    sense: bytes = b""
    transfer_length: int | None = None


def check_condition(key: int, asc: int, ascq: int = 0, **kw: int) -> ScsiResult:
    return ScsiResult(CHECK_CONDITION, sense=fixed_sense(key, asc, ascq, **kw))  # type: ignore[arg-type]


RESULT_GOOD = ScsiResult(GOOD)
RESULT_CONFLICT = ScsiResult(RESERVATION_CONFLICT)
LUN_NOT_SUPPORTED = fixed_sense(SenseKey.ILLEGAL_REQUEST, 0x25, 0x00)
INVALID_OPCODE = fixed_sense(SenseKey.ILLEGAL_REQUEST, 0x20, 0x00, field_pointer=0)
