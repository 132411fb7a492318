"""iSCSI PDU codec, sans-IO (RFC 7143 §11).

Every PDU is a 48-byte Basic Header Segment (BHS, §11.2.1), optional
Additional Header Segments (AHS, §11.2.2), an optional CRC32C header digest,
a data segment padded to a 4-byte boundary and an optional CRC32C data digest
(§11.2.3, §13.1).  The BHS common to all opcodes is::

    byte 0      .|I| opcode (6 bits)
    byte 1      F| opcode-specific
    bytes 2-3   opcode-specific
    byte 4      TotalAHSLength (4-byte words)
    bytes 5-7   DataSegmentLength (bytes, excluding padding)
    bytes 8-15  LUN or opcode-specific
    bytes 16-19 Initiator Task Tag
    bytes 20-47 opcode-specific

It is parsed with one ``struct.unpack_from`` per PDU.  Each opcode family is
a slotted dataclass (not frozen: a frozen one pays an ``object.__setattr__``
per field in ``__init__``, which shows up on the per-command path) with ``encode()`` (one ``bytes``) and ``encode_parts()``
(a list of buffers for ``writelines``, so large Data-In payloads go out as
memoryview slices without a copy).  :class:`PduDecoder` turns a byte stream
into PDUs and raises only :class:`IscsiProtocolError`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

import crc32c as _crc32c_mod

from steelfusion.membuf import uninitialized

_crc32c = _crc32c_mod.crc32c

BHS_LEN = 48
RESERVED_TAG = 0xFFFFFFFF
"""ITT/TTT value meaning "none" (RFC 7143 §11.18, §11.19)."""

Buffer = bytes | bytearray | memoryview


class Opcode(IntEnum):
    """PDU opcodes (RFC 7143 §11.2.1.2)."""

    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK_REQUEST = 0x10
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


INITIATOR_OPCODES = frozenset(
    {Opcode.NOP_OUT, Opcode.SCSI_COMMAND, Opcode.TASK_MGMT_REQUEST, Opcode.LOGIN_REQUEST,
     Opcode.TEXT_REQUEST, Opcode.DATA_OUT, Opcode.LOGOUT_REQUEST, Opcode.SNACK_REQUEST})
TARGET_OPCODES = frozenset(
    {Opcode.NOP_IN, Opcode.SCSI_RESPONSE, Opcode.TASK_MGMT_RESPONSE, Opcode.LOGIN_RESPONSE,
     Opcode.TEXT_RESPONSE, Opcode.DATA_IN, Opcode.LOGOUT_RESPONSE, Opcode.R2T,
     Opcode.ASYNC_MESSAGE, Opcode.REJECT})


class RejectReason(IntEnum):
    """Reject PDU reason codes (RFC 7143 §11.17.1)."""

    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OP_REJECT = 0x0A
    WAITING_FOR_LOGOUT = 0x0C


class IscsiProtocolError(Exception):
    """The peer broke the iSCSI protocol; at ErrorRecoveryLevel 0 the
    connection is dropped (RFC 7143 §7.1.3, §7.8).

    ``reason`` is the Reject reason code to send first, if one applies and the
    PDU could be framed; ``header`` is the offending BHS for that Reject.
    """

    def __init__(self, message: str, reason: int | None = RejectReason.PROTOCOL_ERROR,
                 header: bytes | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.header = header


# One generic layout for the BHS and one for the SCSI Command (CDB at 32..47).
_BHS = struct.Struct(">BBBBIQI7I")
_CMD = struct.Struct(">BBBBIQIIII16s")
_PADS = (b"", b"\0", b"\0\0", b"\0\0\0")
_U32 = struct.Struct(">I")
_AHS_HDR = struct.Struct(">HBB")

AHS_EXTENDED_CDB = 1
AHS_BIDI_READ_LENGTH = 2


def _u32(v: int, name: str) -> int:
    if not 0 <= v <= 0xFFFFFFFF:
        raise ValueError(f"{name} out of range: {v}")
    return v


def digest(data: Buffer, value: int = 0) -> int:
    """CRC32C as iSCSI uses it (RFC 7143 §13.1, generator 0x11EDC6F41)."""
    return _crc32c(data, value)


def frame(header: bytes, data: Buffer, header_digest: bool, data_digest: bool) -> list[Buffer]:
    """BHS+AHS [+HD], data, pad [+DD] as a buffer list (RFC 7143 §11.2)."""
    if header_digest:
        header = header + _crc32c(header).to_bytes(4, "little")
    n = len(data)
    if not n:
        return [header]
    pad = (-n) & 3
    if data_digest:
        c = _crc32c(data)
        if pad:
            c = _crc32c(_PADS[pad], c)
        return [header, data, _PADS[pad] + c.to_bytes(4, "little")]
    if pad:
        return [header, data, _PADS[pad]]
    return [header, data]


class Pdu:
    """Base of all PDU classes: framing shared by every opcode."""

    __slots__ = ()
    opcode: ClassVar[int]

    def header(self) -> bytes:  # pragma: no cover - overridden
        raise NotImplementedError

    def payload(self) -> Buffer:
        return getattr(self, "data", b"")

    def encode_parts(self, header_digest: bool = False, data_digest: bool = False) -> list[Buffer]:
        """Buffers to hand to ``transport.writelines`` (data is not copied)."""
        return frame(self.header(), self.payload(), header_digest, data_digest)

    def encode(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        return b"".join(self.encode_parts(header_digest, data_digest))


def _len_word(ahs_len: int, data: Buffer) -> int:
    n = len(data)
    if n > 0xFFFFFF:
        raise ValueError("data segment longer than 2**24-1")
    return (ahs_len // 4) << 24 | n


# --------------------------------------------------------------------------- initiator PDUs


@dataclass(slots=True, kw_only=True)
class NopOut(Pdu):
    """NOP-Out (RFC 7143 §11.18): ping, or answer to a target NOP-In."""

    opcode: ClassVar[int] = Opcode.NOP_OUT
    itt: int
    ttt: int = RESERVED_TAG
    lun: int = 0
    cmdsn: int = 0
    exp_statsn: int = 0
    immediate: bool = False
    data: Buffer = b""

    def header(self) -> bytes:
        return _BHS.pack(self.opcode | (0x40 if self.immediate else 0), 0x80, 0, 0,
                         _len_word(0, self.data), self.lun, self.itt, self.ttt, self.cmdsn,
                         self.exp_statsn, 0, 0, 0, 0)


@dataclass(slots=True, kw_only=True)
class ScsiCommand(Pdu):
    """SCSI Command (RFC 7143 §11.3).  CDBs longer than 16 bytes travel in an
    Extended CDB AHS (§11.3.5); bidirectional commands carry a Bidirectional
    Read Expected Data Transfer Length AHS (§11.3.6)."""

    opcode: ClassVar[int] = Opcode.SCSI_COMMAND
    itt: int
    lun: int = 0
    cmdsn: int = 0
    exp_statsn: int = 0
    expected_length: int = 0
    cdb: bytes = bytes(16)
    final: bool = True
    read: bool = False
    write: bool = False
    attr: int = 0
    immediate: bool = False
    bidi_read_length: int | None = None
    data: Buffer = b""

    def _ahs(self) -> bytes:
        out = b""
        if len(self.cdb) > 16:
            ext = self.cdb[16:]
            body = _AHS_HDR.pack(len(ext) + 1, AHS_EXTENDED_CDB, 0) + ext
            out += body + _PADS[(-len(body)) & 3]
        if self.bidi_read_length is not None:
            out += _AHS_HDR.pack(5, AHS_BIDI_READ_LENGTH, 0) + _U32.pack(self.bidi_read_length)
        return out

    def header(self) -> bytes:
        ahs = self._ahs()
        cdb = self.cdb[:16].ljust(16, b"\0")
        b1 = ((0x80 if self.final else 0) | (0x40 if self.read else 0)
              | (0x20 if self.write else 0) | (self.attr & 7))
        return _CMD.pack(self.opcode | (0x40 if self.immediate else 0), b1, 0, 0,
                         _len_word(len(ahs), self.data), self.lun, self.itt,
                         self.expected_length, self.cmdsn, self.exp_statsn, cdb) + ahs


@dataclass(slots=True, kw_only=True)
class TaskMgmtRequest(Pdu):
    """Task Management Function Request (RFC 7143 §11.5)."""

    opcode: ClassVar[int] = Opcode.TASK_MGMT_REQUEST
    itt: int
    function: int
    lun: int = 0
    ref_task_tag: int = RESERVED_TAG
    cmdsn: int = 0
    exp_statsn: int = 0
    ref_cmdsn: int = 0
    exp_datasn: int = 0
    immediate: bool = True

    def header(self) -> bytes:
        return _BHS.pack(self.opcode | (0x40 if self.immediate else 0), 0x80 | (self.function & 0x7F),
                         0, 0, 0, self.lun, self.itt, self.ref_task_tag, self.cmdsn,
                         self.exp_statsn, self.ref_cmdsn, self.exp_datasn, 0, 0)


@dataclass(slots=True, kw_only=True)
class LoginRequest(Pdu):
    """Login Request (RFC 7143 §11.12); always immediate."""

    opcode: ClassVar[int] = Opcode.LOGIN_REQUEST
    itt: int
    isid: int = 0
    tsih: int = 0
    cid: int = 0
    cmdsn: int = 0
    exp_statsn: int = 0
    transit: bool = False
    cont: bool = False
    csg: int = 0
    nsg: int = 0
    version_max: int = 0
    version_min: int = 0
    data: Buffer = b""

    def header(self) -> bytes:
        b1 = ((0x80 if self.transit else 0) | (0x40 if self.cont else 0)
              | (self.csg & 3) << 2 | (self.nsg & 3))
        return _BHS.pack(self.opcode | 0x40, b1, self.version_max, self.version_min,
                         _len_word(0, self.data), (self.isid & 0xFFFFFFFFFFFF) << 16 | self.tsih,
                         self.itt, self.cid << 16, self.cmdsn, self.exp_statsn, 0, 0, 0, 0)


@dataclass(slots=True, kw_only=True)
class TextRequest(Pdu):
    """Text Request (RFC 7143 §11.10)."""

    opcode: ClassVar[int] = Opcode.TEXT_REQUEST
    itt: int
    ttt: int = RESERVED_TAG
    lun: int = 0
    cmdsn: int = 0
    exp_statsn: int = 0
    final: bool = True
    cont: bool = False
    immediate: bool = False
    data: Buffer = b""

    def header(self) -> bytes:
        b1 = (0x80 if self.final else 0) | (0x40 if self.cont else 0)
        return _BHS.pack(self.opcode | (0x40 if self.immediate else 0), b1, 0, 0,
                         _len_word(0, self.data), self.lun, self.itt, self.ttt, self.cmdsn,
                         self.exp_statsn, 0, 0, 0, 0)


@dataclass(slots=True, kw_only=True)
class DataOut(Pdu):
    """SCSI Data-Out (RFC 7143 §11.7)."""

    opcode: ClassVar[int] = Opcode.DATA_OUT
    itt: int
    ttt: int = RESERVED_TAG
    lun: int = 0
    exp_statsn: int = 0
    datasn: int = 0
    buffer_offset: int = 0
    final: bool = False
    data: Buffer = b""

    def header(self) -> bytes:
        return _BHS.pack(self.opcode, 0x80 if self.final else 0, 0, 0, _len_word(0, self.data),
                         self.lun, self.itt, self.ttt, 0, self.exp_statsn, 0, self.datasn,
                         self.buffer_offset, 0)


@dataclass(slots=True, kw_only=True)
class LogoutRequest(Pdu):
    """Logout Request (RFC 7143 §11.14)."""

    opcode: ClassVar[int] = Opcode.LOGOUT_REQUEST
    itt: int
    reason: int = 0
    cid: int = 0
    cmdsn: int = 0
    exp_statsn: int = 0
    immediate: bool = False

    def header(self) -> bytes:
        return _BHS.pack(self.opcode | (0x40 if self.immediate else 0), 0x80 | (self.reason & 0x7F),
                         0, 0, 0, 0, self.itt, self.cid << 16, self.cmdsn, self.exp_statsn,
                         0, 0, 0, 0)


@dataclass(slots=True, kw_only=True)
class SnackRequest(Pdu):
    """SNACK Request (RFC 7143 §11.16); needs ErrorRecoveryLevel > 0."""

    opcode: ClassVar[int] = Opcode.SNACK_REQUEST
    itt: int
    snack_type: int = 0
    lun: int = 0
    ttt: int = RESERVED_TAG
    exp_statsn: int = 0
    begrun: int = 0
    runlength: int = 0

    def header(self) -> bytes:
        return _BHS.pack(self.opcode, 0x80 | (self.snack_type & 0x0F), 0, 0, 0, self.lun,
                         self.itt, self.ttt, 0, self.exp_statsn, 0, 0, self.begrun,
                         self.runlength)


# --------------------------------------------------------------------------- target PDUs


@dataclass(slots=True, kw_only=True)
class NopIn(Pdu):
    """NOP-In (RFC 7143 §11.19): answer to a NOP-Out, or a target ping
    (TTT != 0xffffffff)."""

    opcode: ClassVar[int] = Opcode.NOP_IN
    itt: int = RESERVED_TAG
    ttt: int = RESERVED_TAG
    lun: int = 0
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    data: Buffer = b""

    def header(self) -> bytes:
        return _BHS.pack(self.opcode, 0x80, 0, 0, _len_word(0, self.data), self.lun, self.itt,
                         self.ttt, self.statsn, self.exp_cmdsn, self.max_cmdsn, 0, 0, 0)


@dataclass(slots=True, kw_only=True)
class ScsiResponse(Pdu):
    """SCSI Response (RFC 7143 §11.4).  ``data`` is SenseLength (2 bytes) +
    sense data, see :func:`sense_segment`."""

    opcode: ClassVar[int] = Opcode.SCSI_RESPONSE
    itt: int
    status: int = 0
    response: int = 0
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    exp_datasn: int = 0
    overflow: bool = False
    underflow: bool = False
    bidi_overflow: bool = False
    bidi_underflow: bool = False
    residual_count: int = 0
    bidi_residual_count: int = 0
    snack_tag: int = 0
    data: Buffer = b""

    def header(self) -> bytes:
        b1 = (0x80 | (0x10 if self.bidi_overflow else 0) | (0x08 if self.bidi_underflow else 0)
              | (0x04 if self.overflow else 0) | (0x02 if self.underflow else 0))
        return scsi_response_header(b1, self.response, self.status, _len_word(0, self.data),
                                    self.itt, self.snack_tag, self.statsn, self.exp_cmdsn,
                                    self.max_cmdsn, self.exp_datasn, self.bidi_residual_count,
                                    self.residual_count)


def scsi_response_header(b1: int, response: int, status: int, length: int, itt: int,
                         snack_tag: int, statsn: int, exp_cmdsn: int, max_cmdsn: int,
                         exp_datasn: int, bidi_residual: int, residual: int) -> bytes:
    """A SCSI Response BHS from its fields (``b1``: 1 0 0 o u O U 0 bits),
    without building a :class:`ScsiResponse`: a target sends one per WRITE."""
    return _BHS.pack(Opcode.SCSI_RESPONSE, b1, response, status, length, 0, itt, snack_tag,
                     statsn, exp_cmdsn, max_cmdsn, exp_datasn, bidi_residual, residual)


@dataclass(slots=True, kw_only=True)
class TaskMgmtResponse(Pdu):
    """Task Management Function Response (RFC 7143 §11.6)."""

    opcode: ClassVar[int] = Opcode.TASK_MGMT_RESPONSE
    itt: int
    response: int = 0
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0

    def header(self) -> bytes:
        return _BHS.pack(self.opcode, 0x80, self.response, 0, 0, 0, self.itt, 0, self.statsn,
                         self.exp_cmdsn, self.max_cmdsn, 0, 0, 0)


@dataclass(slots=True, kw_only=True)
class LoginResponse(Pdu):
    """Login Response (RFC 7143 §11.13)."""

    opcode: ClassVar[int] = Opcode.LOGIN_RESPONSE
    itt: int
    isid: int = 0
    tsih: int = 0
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    status_class: int = 0
    status_detail: int = 0
    transit: bool = False
    cont: bool = False
    csg: int = 0
    nsg: int = 0
    version_max: int = 0
    version_active: int = 0
    data: Buffer = b""

    def header(self) -> bytes:
        b1 = ((0x80 if self.transit else 0) | (0x40 if self.cont else 0)
              | (self.csg & 3) << 2 | (self.nsg & 3))
        return _BHS.pack(self.opcode, b1, self.version_max, self.version_active,
                         _len_word(0, self.data), (self.isid & 0xFFFFFFFFFFFF) << 16 | self.tsih,
                         self.itt, 0, self.statsn, self.exp_cmdsn, self.max_cmdsn,
                         (self.status_class << 24) | (self.status_detail << 16), 0, 0)


@dataclass(slots=True, kw_only=True)
class TextResponse(Pdu):
    """Text Response (RFC 7143 §11.11)."""

    opcode: ClassVar[int] = Opcode.TEXT_RESPONSE
    itt: int
    ttt: int = RESERVED_TAG
    lun: int = 0
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    final: bool = True
    cont: bool = False
    data: Buffer = b""

    def header(self) -> bytes:
        b1 = (0x80 if self.final else 0) | (0x40 if self.cont else 0)
        return _BHS.pack(self.opcode, b1, 0, 0, _len_word(0, self.data), self.lun, self.itt,
                         self.ttt, self.statsn, self.exp_cmdsn, self.max_cmdsn, 0, 0, 0)


@dataclass(slots=True, kw_only=True)
class DataIn(Pdu):
    """SCSI Data-In (RFC 7143 §11.8).  With ``status_present`` (S bit) it also
    carries the command status and residuals, saving a SCSI Response."""

    opcode: ClassVar[int] = Opcode.DATA_IN
    itt: int
    ttt: int = RESERVED_TAG
    lun: int = 0
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    datasn: int = 0
    buffer_offset: int = 0
    residual_count: int = 0
    final: bool = False
    ack: bool = False
    overflow: bool = False
    underflow: bool = False
    status_present: bool = False
    status: int = 0
    data: Buffer = b""

    def header(self) -> bytes:
        b1 = ((0x80 if self.final else 0) | (0x40 if self.ack else 0)
              | (0x04 if self.overflow else 0) | (0x02 if self.underflow else 0)
              | (0x01 if self.status_present else 0))
        return data_in_header(b1, self.status if self.status_present else 0,
                              _len_word(0, self.data), self.lun, self.itt, self.ttt,
                              self.statsn, self.exp_cmdsn, self.max_cmdsn, self.datasn,
                              self.buffer_offset, self.residual_count)


def data_in_header(b1: int, status: int, length: int, lun: int, itt: int, ttt: int,
                   statsn: int, exp_cmdsn: int, max_cmdsn: int, datasn: int, offset: int,
                   residual: int) -> bytes:
    """A Data-In BHS from its fields (``b1``: F A 0 0 0 O U S bits, ``length``
    the data segment length), without building a :class:`DataIn`: a target
    sends one or more per READ, so its per-command path calls this directly."""
    return _BHS.pack(Opcode.DATA_IN, b1, 0, status, length, lun, itt, ttt, statsn,
                     exp_cmdsn, max_cmdsn, datasn, offset, residual)


@dataclass(slots=True, kw_only=True)
class LogoutResponse(Pdu):
    """Logout Response (RFC 7143 §11.15)."""

    opcode: ClassVar[int] = Opcode.LOGOUT_RESPONSE
    itt: int
    response: int = 0
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    time2wait: int = 0
    time2retain: int = 0

    def header(self) -> bytes:
        return _BHS.pack(self.opcode, 0x80, self.response, 0, 0, 0, self.itt, 0, self.statsn,
                         self.exp_cmdsn, self.max_cmdsn, 0,
                         (self.time2wait & 0xFFFF) << 16 | (self.time2retain & 0xFFFF), 0)


@dataclass(slots=True, kw_only=True)
class R2T(Pdu):
    """Ready To Transfer (RFC 7143 §11.9): solicits one Data-Out sequence."""

    opcode: ClassVar[int] = Opcode.R2T
    itt: int
    ttt: int
    lun: int = 0
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    r2tsn: int = 0
    buffer_offset: int = 0
    desired_length: int = 0

    def header(self) -> bytes:
        return _BHS.pack(self.opcode, 0x80, 0, 0, 0, self.lun, self.itt, self.ttt, self.statsn,
                         self.exp_cmdsn, self.max_cmdsn, self.r2tsn, self.buffer_offset,
                         self.desired_length)


@dataclass(slots=True, kw_only=True)
class AsyncMessage(Pdu):
    """Asynchronous Message (RFC 7143 §11.9.1)."""

    opcode: ClassVar[int] = Opcode.ASYNC_MESSAGE
    lun: int = 0
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    event: int = 0
    vcode: int = 0
    parameter1: int = 0
    parameter2: int = 0
    parameter3: int = 0
    data: Buffer = b""

    def header(self) -> bytes:
        return _BHS.pack(self.opcode, 0x80, 0, 0, _len_word(0, self.data), self.lun,
                         RESERVED_TAG, 0, self.statsn, self.exp_cmdsn, self.max_cmdsn,
                         (self.event & 0xFF) << 24 | (self.vcode & 0xFF) << 16
                         | (self.parameter1 & 0xFFFF),
                         (self.parameter2 & 0xFFFF) << 16 | (self.parameter3 & 0xFFFF), 0)


@dataclass(slots=True, kw_only=True)
class Reject(Pdu):
    """Reject (RFC 7143 §11.17); ``data`` is the rejected PDU's header."""

    opcode: ClassVar[int] = Opcode.REJECT
    reason: int
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    datasn_r2tsn: int = 0
    data: Buffer = b""

    def header(self) -> bytes:
        return _BHS.pack(self.opcode, 0x80, self.reason, 0, _len_word(0, self.data), 0,
                         RESERVED_TAG, 0, self.statsn, self.exp_cmdsn, self.max_cmdsn,
                         self.datasn_r2tsn, 0, 0)


AnyPdu = (NopOut | ScsiCommand | TaskMgmtRequest | LoginRequest | TextRequest | DataOut
          | LogoutRequest | SnackRequest | NopIn | ScsiResponse | TaskMgmtResponse
          | LoginResponse | TextResponse | DataIn | LogoutResponse | R2T | AsyncMessage | Reject)


def sense_segment(sense: Buffer) -> bytes:
    """SCSI Response data segment: SenseLength then the sense bytes
    (RFC 7143 §11.4.7.2)."""
    return len(sense).to_bytes(2, "big") + bytes(sense) if sense else b""


def parse_sense_segment(data: Buffer) -> bytes:
    """Inverse of :func:`sense_segment` (for initiators and tests)."""
    if len(data) < 2:
        return b""
    n = int.from_bytes(data[:2], "big")
    return bytes(data[2:2 + n])


# --------------------------------------------------------------------------- decoding

_Fields = tuple[int, int, int, int, int, int, int, int, int, int, int, int, int, int]


def _dec_nop_out(f: _Fields, ahs: bytes, data: Buffer) -> Pdu:
    return NopOut(itt=f[6], ttt=f[7], lun=f[5], cmdsn=f[8], exp_statsn=f[9],
                  immediate=bool(f[0] & 0x40), data=data)


def _dec_task_mgmt_req(f: _Fields, ahs: bytes, data: Buffer) -> Pdu:
    return TaskMgmtRequest(itt=f[6], function=f[1] & 0x7F, lun=f[5], ref_task_tag=f[7],
                           cmdsn=f[8], exp_statsn=f[9], ref_cmdsn=f[10], exp_datasn=f[11],
                           immediate=bool(f[0] & 0x40))


def _dec_login_req(f: _Fields, ahs: bytes, data: Buffer) -> Pdu:
    b1 = f[1]
    return LoginRequest(itt=f[6], isid=f[5] >> 16, tsih=f[5] & 0xFFFF, cid=f[7] >> 16,
                        cmdsn=f[8], exp_statsn=f[9], transit=bool(b1 & 0x80),
                        cont=bool(b1 & 0x40), csg=(b1 >> 2) & 3, nsg=b1 & 3,
                        version_max=f[2], version_min=f[3], data=data)


def _dec_text_req(f: _Fields, ahs: bytes, data: Buffer) -> Pdu:
    return TextRequest(itt=f[6], ttt=f[7], lun=f[5], cmdsn=f[8], exp_statsn=f[9],
                       final=bool(f[1] & 0x80), cont=bool(f[1] & 0x40),
                       immediate=bool(f[0] & 0x40), data=data)


def _dec_data_out(f: _Fields, ahs: bytes, data: Buffer) -> Pdu:
    return DataOut(itt=f[6], ttt=f[7], lun=f[5], exp_statsn=f[9], datasn=f[11],
                   buffer_offset=f[12], final=bool(f[1] & 0x80), data=data)


def _dec_logout_req(f: _Fields, ahs: bytes, data: Buffer) -> Pdu:
    return LogoutRequest(itt=f[6], reason=f[1] & 0x7F, cid=f[7] >> 16, cmdsn=f[8],
                         exp_statsn=f[9], immediate=bool(f[0] & 0x40))


def _dec_snack(f: _Fields, ahs: bytes, data: Buffer) -> Pdu:
    return SnackRequest(itt=f[6], snack_type=f[1] & 0x0F, lun=f[5], ttt=f[7], exp_statsn=f[9],
                        begrun=f[12], runlength=f[13])


def _dec_nop_in(f: _Fields, ahs: bytes, data: Buffer) -> Pdu:
    return NopIn(itt=f[6], ttt=f[7], lun=f[5], statsn=f[8], exp_cmdsn=f[9], max_cmdsn=f[10],
                 data=data)


def _dec_scsi_resp(f: _Fields, ahs: bytes, data: Buffer) -> Pdu:
    b1 = f[1]
    return ScsiResponse(itt=f[6], status=f[3], response=f[2], statsn=f[8], exp_cmdsn=f[9],
                        max_cmdsn=f[10], exp_datasn=f[11], overflow=bool(b1 & 0x04),
                        underflow=bool(b1 & 0x02), bidi_overflow=bool(b1 & 0x10),
                        bidi_underflow=bool(b1 & 0x08), residual_count=f[13],
                        bidi_residual_count=f[12], snack_tag=f[7], data=data)


def _dec_tmf_resp(f: _Fields, ahs: bytes, data: Buffer) -> Pdu:
    return TaskMgmtResponse(itt=f[6], response=f[2], statsn=f[8], exp_cmdsn=f[9],
                            max_cmdsn=f[10])


def _dec_login_resp(f: _Fields, ahs: bytes, data: Buffer) -> Pdu:
    b1 = f[1]
    return LoginResponse(itt=f[6], isid=f[5] >> 16, tsih=f[5] & 0xFFFF, statsn=f[8],
                         exp_cmdsn=f[9], max_cmdsn=f[10], status_class=f[11] >> 24,
                         status_detail=(f[11] >> 16) & 0xFF, transit=bool(b1 & 0x80),
                         cont=bool(b1 & 0x40), csg=(b1 >> 2) & 3, nsg=b1 & 3,
                         version_max=f[2], version_active=f[3], data=data)


def _dec_text_resp(f: _Fields, ahs: bytes, data: Buffer) -> Pdu:
    return TextResponse(itt=f[6], ttt=f[7], lun=f[5], statsn=f[8], exp_cmdsn=f[9],
                        max_cmdsn=f[10], final=bool(f[1] & 0x80), cont=bool(f[1] & 0x40),
                        data=data)


def _dec_data_in(f: _Fields, ahs: bytes, data: Buffer) -> Pdu:
    b1 = f[1]
    s = bool(b1 & 0x01)
    return DataIn(itt=f[6], ttt=f[7], lun=f[5], statsn=f[8], exp_cmdsn=f[9], max_cmdsn=f[10],
                  datasn=f[11], buffer_offset=f[12], residual_count=f[13],
                  final=bool(b1 & 0x80), ack=bool(b1 & 0x40), overflow=bool(b1 & 0x04),
                  underflow=bool(b1 & 0x02), status_present=s, status=f[3] if s else 0,
                  data=data)


def _dec_logout_resp(f: _Fields, ahs: bytes, data: Buffer) -> Pdu:
    return LogoutResponse(itt=f[6], response=f[2], statsn=f[8], exp_cmdsn=f[9],
                          max_cmdsn=f[10], time2wait=f[12] >> 16, time2retain=f[12] & 0xFFFF)


def _dec_r2t(f: _Fields, ahs: bytes, data: Buffer) -> Pdu:
    return R2T(itt=f[6], ttt=f[7], lun=f[5], statsn=f[8], exp_cmdsn=f[9], max_cmdsn=f[10],
               r2tsn=f[11], buffer_offset=f[12], desired_length=f[13])


def _dec_async(f: _Fields, ahs: bytes, data: Buffer) -> Pdu:
    return AsyncMessage(lun=f[5], statsn=f[8], exp_cmdsn=f[9], max_cmdsn=f[10],
                        event=f[11] >> 24, vcode=(f[11] >> 16) & 0xFF,
                        parameter1=f[11] & 0xFFFF, parameter2=f[12] >> 16,
                        parameter3=f[12] & 0xFFFF, data=data)


def _dec_reject(f: _Fields, ahs: bytes, data: Buffer) -> Pdu:
    return Reject(reason=f[2], statsn=f[8], exp_cmdsn=f[9], max_cmdsn=f[10],
                  datasn_r2tsn=f[11], data=data)


_DECODERS: dict[int, Callable[[_Fields, bytes, Buffer], Pdu]] = {
    Opcode.NOP_OUT: _dec_nop_out,
    Opcode.TASK_MGMT_REQUEST: _dec_task_mgmt_req,
    Opcode.LOGIN_REQUEST: _dec_login_req,
    Opcode.TEXT_REQUEST: _dec_text_req,
    Opcode.DATA_OUT: _dec_data_out,
    Opcode.LOGOUT_REQUEST: _dec_logout_req,
    Opcode.SNACK_REQUEST: _dec_snack,
    Opcode.NOP_IN: _dec_nop_in,
    Opcode.SCSI_RESPONSE: _dec_scsi_resp,
    Opcode.TASK_MGMT_RESPONSE: _dec_tmf_resp,
    Opcode.LOGIN_RESPONSE: _dec_login_resp,
    Opcode.TEXT_RESPONSE: _dec_text_resp,
    Opcode.DATA_IN: _dec_data_in,
    Opcode.LOGOUT_RESPONSE: _dec_logout_resp,
    Opcode.R2T: _dec_r2t,
    Opcode.ASYNC_MESSAGE: _dec_async,
    Opcode.REJECT: _dec_reject,
}


def _dec_scsi_command(buf: Buffer, pos: int, ahs: bytes, data: Buffer) -> ScsiCommand:
    b0, b1, _b2, _b3, _lw, lun, itt, edtl, cmdsn, expstatsn, cdb = _CMD.unpack_from(buf, pos)
    bidi: int | None = None
    i = 0
    while i < len(ahs):
        if i + 3 > len(ahs):
            raise IscsiProtocolError("truncated AHS", RejectReason.INVALID_PDU_FIELD)
        alen, atype, _spec = _AHS_HDR.unpack_from(ahs, i)
        end = i + 3 + alen
        if alen == 0 or end > len(ahs):
            raise IscsiProtocolError("bad AHSLength", RejectReason.INVALID_PDU_FIELD)
        if atype == AHS_EXTENDED_CDB:
            cdb += ahs[i + 4:end]
        elif atype == AHS_BIDI_READ_LENGTH and alen == 5:
            bidi = _U32.unpack_from(ahs, i + 4)[0]
        else:
            raise IscsiProtocolError(f"unsupported AHS type {atype}",
                                     RejectReason.INVALID_PDU_FIELD)
        i = end + ((-(3 + alen)) & 3)
    return ScsiCommand(itt=itt, lun=lun, cmdsn=cmdsn, exp_statsn=expstatsn,
                       expected_length=edtl, cdb=cdb, final=bool(b1 & 0x80),
                       read=bool(b1 & 0x40), write=bool(b1 & 0x20), attr=b1 & 7,
                       immediate=bool(b0 & 0x40), bidi_read_length=bidi, data=data)


DEFAULT_MAX_DATA_SEGMENT = 262144 + 4096


RECV_BUFFER_BYTES = 256 * 1024
"""The reused receive buffer of :meth:`PduDecoder.get_buffer` (uvloop reads up
to 256 KiB at a time into its own)."""

ASSEMBLY_MIN = 32 * 1024
"""A PDU at least this long that arrives split across reads is assembled in
its own exactly-sized buffer (one copy) instead of the shared one."""


class PduDecoder:
    """Streaming PDU decoder: ``feed(bytes)`` → complete PDUs.

    Works fed whole, byte by byte, or with several PDUs in one chunk; a
    partial PDU stays buffered.  Digests are switched on by setting
    ``header_digest`` / ``data_digest`` between PDUs (they start after the
    Login Phase, RFC 7143 §13.1), which is why :meth:`next` hands out one PDU
    at a time.  Data segments longer than ``max_data_segment_length`` are
    refused before anything is allocated for them.

    Copies are kept to one per payload byte at most: when a received chunk
    holds whole PDUs their data segments are memoryview slices of it; a large
    PDU split across chunks is gathered into a bytearray of its exact size
    and handed out as a view of that; only small split PDUs are copied out of
    the shared reassembly buffer.
    """

    __slots__ = ("_accept", "_asm", "_asm_fill", "_buf", "_mv", "_pos", "_rbuf", "data_digest",
                 "header_digest", "max_data_segment_length")

    def __init__(self, *, max_data_segment_length: int = DEFAULT_MAX_DATA_SEGMENT,
                 accept: Collection[int] | None = None, header_digest: bool = False,
                 data_digest: bool = False) -> None:
        self.max_data_segment_length = max_data_segment_length
        self.header_digest = header_digest
        self.data_digest = data_digest
        self._accept = frozenset(_DECODERS) | {Opcode.SCSI_COMMAND} if accept is None \
            else frozenset(accept)
        self._buf: bytes | bytearray = b""
        self._mv: memoryview | None = None
        self._pos = 0
        self._asm: memoryview | None = None
        self._asm_fill = 0
        self._rbuf: memoryview | None = None  # receive buffer for get_buffer()

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a PDU."""
        return len(self._buf) - self._pos + (self._asm_fill if self._asm is not None else 0)

    def feed(self, data: Buffer) -> list[Pdu]:
        """Add ``data`` and return every PDU now complete."""
        self.add(data)
        out = []
        while (pdu := self.next()) is not None:
            out.append(pdu)
        return out

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes should go (asyncio ``BufferedProtocol``).

        While a large PDU is being gathered into its own buffer, that buffer's
        unfilled rest: the kernel then writes the data segment in place, with no
        copy in Python at all. Otherwise a reused receive buffer, which
        :meth:`buffer_updated` hands to :meth:`add` (one copy, as a plain
        protocol's ``bytes`` would cost).
        """
        asm = self._asm
        if asm is not None and self._asm_fill < len(asm):
            return asm[self._asm_fill:]
        if self._rbuf is None:
            self._rbuf = memoryview(bytearray(RECV_BUFFER_BYTES))
        return self._rbuf

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last :meth:`get_buffer` view."""
        asm = self._asm
        if asm is not None and self._asm_fill < len(asm):
            if not 0 <= nbytes <= len(asm) - self._asm_fill:
                raise ValueError(f"buffer_updated({nbytes}) past the buffer handed out")
            self._asm_fill += nbytes
            return
        assert self._rbuf is not None
        self.add(bytes(self._rbuf[:nbytes]))

    def add(self, data: Buffer) -> None:
        """Append received bytes without parsing them."""
        if not data:
            return
        asm = self._asm
        if asm is not None and self._asm_fill < len(asm):
            need = len(asm) - self._asm_fill
            view = memoryview(data)
            if len(view) <= need:
                asm[self._asm_fill:self._asm_fill + len(view)] = view
                self._asm_fill += len(view)
                return
            asm[self._asm_fill:] = view[:need]
            self._asm_fill = len(asm)
            data = view[need:]
        if self._pos >= len(self._buf):
            b = data if type(data) is bytes else bytes(data)
            self._buf, self._mv, self._pos = b, memoryview(b), 0
            return
        if type(self._buf) is bytes:
            assert self._mv is not None
            self._buf = bytearray(self._mv[self._pos:])
            self._mv, self._pos = None, 0
        self._buf += data  # type: ignore[operator]

    def next(self) -> Pdu | None:
        """Decode one PDU, or None if the buffer holds no complete PDU."""
        asm = self._asm
        if asm is not None:
            if self._asm_fill < len(asm):
                return None
            self._asm = None
            return self._decode(asm, memoryview(asm), 0, True)
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < BHS_LEN:
            self._compact()
            return None
        opcode = buf[pos] & 0x3F
        lw = _U32.unpack_from(buf, pos + 4)[0]
        dsl = lw & 0xFFFFFF
        if opcode not in self._accept:
            raise IscsiProtocolError(f"unexpected opcode 0x{opcode:02x}",
                                     RejectReason.PROTOCOL_ERROR, bytes(buf[pos:pos + 48]))
        if dsl > self.max_data_segment_length:
            raise IscsiProtocolError(
                f"DataSegmentLength {dsl} exceeds {self.max_data_segment_length}",
                RejectReason.PROTOCOL_ERROR, bytes(buf[pos:pos + 48]))
        end = pos + self._total_len(lw)
        if len(buf) < end:
            if end - pos >= ASSEMBLY_MIN:
                # Gather the rest of this PDU straight into its own buffer.
                asm = uninitialized(end - pos)  # filled before it is decoded
                have = len(buf) - pos
                asm[:have] = memoryview(buf)[pos:]
                self._asm, self._asm_fill = asm, have
                self._buf, self._mv, self._pos = b"", None, 0
            else:
                self._compact()
            return None
        zero_copy = type(buf) is bytes
        if opcode == Opcode.SCSI_COMMAND and not lw >> 24 and not self.header_digest \
                and not self.data_digest:
            # The per-command case (no AHS, no digests): straight to its decoder.
            self._pos = end
            at = pos + BHS_LEN
            if not dsl:
                return _dec_scsi_command(buf, pos, b"", b"")
            if zero_copy:
                assert self._mv is not None
                return _dec_scsi_command(buf, pos, b"", self._mv[at:at + dsl])
            return _dec_scsi_command(buf, pos, b"", bytes(buf[at:at + dsl]))
        mv = self._mv if zero_copy else memoryview(buf)
        assert mv is not None
        try:
            pdu = self._decode(buf, mv, pos, zero_copy)
        finally:
            if not zero_copy:
                mv.release()
        self._pos = end
        return pdu

    def _total_len(self, lw: int) -> int:
        dsl = lw & 0xFFFFFF
        return (BHS_LEN + (lw >> 24) * 4 + (4 if self.header_digest else 0)
                + ((dsl + 3) & ~3) + (4 if self.data_digest and dsl else 0))

    def _decode(self, buf: Buffer, mv: memoryview, pos: int, views: bool) -> Pdu:
        """Check digests and build the PDU starting at ``pos`` (complete).
        With ``views`` the data segment is a slice of ``mv``, else a copy."""
        lw = _U32.unpack_from(buf, pos + 4)[0]
        opcode = buf[pos] & 0x3F
        ahs_len = (lw >> 24) * 4
        dsl = lw & 0xFFFFFF
        hend = pos + BHS_LEN + ahs_len
        data_at = hend + (4 if self.header_digest else 0)
        padded = (dsl + 3) & ~3
        if self.header_digest:
            got = int.from_bytes(mv[hend:hend + 4], "little")
            if _crc32c(mv[pos:hend]) != got:
                # The header cannot be trusted, so there is nothing to
                # Reject: drop the connection (RFC 7143 §7.8).
                raise IscsiProtocolError("header digest mismatch", None)
        if dsl and self.data_digest:
            got = int.from_bytes(mv[data_at + padded:data_at + padded + 4], "little")
            if _crc32c(mv[data_at:data_at + padded]) != got:
                raise IscsiProtocolError("data digest mismatch", RejectReason.DATA_DIGEST_ERROR,
                                         bytes(mv[pos:pos + 48]))
        if dsl:
            data: Buffer = mv[data_at:data_at + dsl] if views else bytes(mv[data_at:data_at + dsl])
        else:
            data = b""
        ahs = bytes(mv[pos + BHS_LEN:hend]) if ahs_len else b""
        if opcode == Opcode.SCSI_COMMAND:
            return _dec_scsi_command(buf, pos, ahs, data)
        if ahs:
            raise IscsiProtocolError("AHS on a PDU that takes none",
                                     RejectReason.INVALID_PDU_FIELD, bytes(mv[pos:pos + 48]))
        return _DECODERS[opcode](_BHS.unpack_from(buf, pos), ahs, data)

    def _compact(self) -> None:
        """Drop consumed bytes; keep the partial PDU at the buffer start."""
        if self._pos == 0:
            return
        if self._pos >= len(self._buf):
            self._buf, self._mv, self._pos = b"", None, 0
        elif type(self._buf) is bytearray:
            del self._buf[:self._pos]
            self._pos = 0
