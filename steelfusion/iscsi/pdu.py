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

Each opcode is a slotted dataclass whose fields are its layout: each says
where it sits in the BHS (:func:`~steelfusion.iscsi.bhs.at`), and that one
list builds both ``header()`` and the decoder (:mod:`steelfusion.iscsi.bhs`).
Fields several opcodes share (the sequence numbers of every target PDU, the
LUN and tags of the NOP, Text, Data, SNACK and R2T PDUs, what Login, Text and
Data PDUs have in common in each direction) are placed once, in a field group
the classes inherit.
``encode()`` gives one ``bytes``, ``encode_parts()`` a list of buffers for
``writelines``, so large Data-In payloads go out as memoryview slices without
a copy.  What a target does per command (decode a SCSI Command or Data-Out,
send Data-In, SCSI Response, R2T) has hand-packed coders, one struct call
each, held to the layouts by a property test.  :class:`PduDecoder` turns a
byte stream into PDUs and raises only :class:`IscsiProtocolError`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Collection, Mapping
from enum import IntEnum
from typing import Any, ClassVar

import crc32c as _crc32c_mod

from steelfusion.iscsi.bhs import BHS_LEN, PADDING, Buffer, Fixed, Pdu, at, pdu_class, pdu_fields
from steelfusion.iscsi.bhs import digest as digest  # re-exported: users of PDUs import from here
from steelfusion.iscsi.bhs import frame as frame
from steelfusion.membuf import uninitialized

_crc32c = _crc32c_mod.crc32c

RESERVED_TAG = 0xFFFFFFFF
"""ITT/TTT value meaning "none" (RFC 7143 §11.18, §11.19)."""


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


_U32 = struct.Struct(">I")
_AHS_HDR = struct.Struct(">HBB")

AHS_EXTENDED_CDB = 1
AHS_BIDI_READ_LENGTH = 2


# Fields common to most layouts, named once.  Offsets are the BHS byte
# numbers of RFC 7143 §11; the F bit of byte 1 is 0x80, the I bit of byte 0 0x40.
_F = Fixed(1, "B", 0x80)
"""F (final) bit set: for the PDUs where it is always 1."""
_NO_ITT = Fixed(16, "I", RESERVED_TAG)
"""ITT 0xffffffff: PDUs that answer no task (Async Message, Reject)."""


# Field groups several opcodes share, each placed once (RFC 7143 §11).


@pdu_fields
class InitiatorPdu(Pdu):
    """An initiator PDU that takes a command number: CmdSN and ExpStatSN at
    bytes 24-31 (RFC 7143 §4.2.2.1, §4.2.2.2).  Data-Out and SNACK carry only
    ExpStatSN, so they are plain :class:`Pdu`."""

    __slots__ = ()
    cmdsn: int = at(24, "I", default=0)
    exp_statsn: int = at(28, "I", default=0)


@pdu_fields
class TargetPdu(Pdu):
    """Every target PDU: StatSN, ExpCmdSN and MaxCmdSN at bytes 24-35
    (RFC 7143 §4.2.2.1, §4.2.2.2)."""

    __slots__ = ()
    statsn: int = at(24, "I", default=0)
    exp_cmdsn: int = at(28, "I", default=0)
    max_cmdsn: int = at(32, "I", default=0)


@pdu_fields
class LoginFields:
    """What Login Request and Login Response share (RFC 7143 §11.12, §11.13):
    the stage bits T, C, CSG, NSG, Version-max, ISID, TSIH and ITT."""

    __slots__ = ()
    transit: bool = at(1, "B", 0x80, default=False)
    cont: bool = at(1, "B", 0x40, default=False)
    csg: int = at(1, "B", 0x0C, default=0)
    nsg: int = at(1, "B", 0x03, default=0)
    version_max: int = at(2, "B", default=0)
    isid: int = at(8, "Q", 0xFFFF_FFFF_FFFF_0000, default=0)
    tsih: int = at(8, "Q", 0xFFFF, default=0)
    itt: int = at(16, "I")
    data: Buffer = b""


@pdu_fields
class TagFields:
    """LUN, Initiator Task Tag and Target Transfer Tag at bytes 8-23, where
    the NOP, Text, Data, SNACK and R2T PDUs carry them (RFC 7143 §11.7,
    §11.8, §11.10, §11.11, §11.16, §11.18, §11.19).  A class whose ITT or TTT
    has another default (or none) says so again."""

    __slots__ = ()
    lun: int = at(8, "Q", default=0)
    itt: int = at(16, "I")
    ttt: int = at(20, "I", default=RESERVED_TAG)


@pdu_fields
class DataFields(TagFields):
    """What Data-Out and Data-In share (RFC 7143 §11.7, §11.8): the F bit,
    LUN, ITT, TTT, DataSN and Buffer Offset."""

    __slots__ = ()
    final: bool = at(1, "B", 0x80, default=False)
    datasn: int = at(36, "I", default=0)
    buffer_offset: int = at(40, "I", default=0)
    data: Buffer = b""


@pdu_fields
class TextFields(TagFields):
    """What Text Request and Text Response share (RFC 7143 §11.10, §11.11)."""

    __slots__ = ()
    final: bool = at(1, "B", 0x80, default=True)
    cont: bool = at(1, "B", 0x40, default=False)
    data: Buffer = b""


# --------------------------------------------------------------------------- initiator PDUs


@pdu_class
class NopOut(InitiatorPdu, TagFields):
    """NOP-Out (RFC 7143 §11.18): ping, or answer to a target NOP-In."""

    opcode: ClassVar[int] = Opcode.NOP_OUT
    fixed = (_F,)
    immediate: bool = at(0, "B", 0x40, default=False)
    data: Buffer = b""


@pdu_class
class ScsiCommand(InitiatorPdu):
    """SCSI Command (RFC 7143 §11.3).  CDBs longer than 16 bytes travel in an
    Extended CDB AHS (§11.3.5); bidirectional commands carry a Bidirectional
    Read Expected Data Transfer Length AHS (§11.3.6)."""

    opcode: ClassVar[int] = Opcode.SCSI_COMMAND
    ahs_fields = ("bidi_read_length",)
    immediate: bool = at(0, "B", 0x40, default=False)
    final: bool = at(1, "B", 0x80, default=True)
    read: bool = at(1, "B", 0x40, default=False)
    write: bool = at(1, "B", 0x20, default=False)
    attr: int = at(1, "B", 0x07, default=0)
    lun: int = at(8, "Q", default=0)
    itt: int = at(16, "I")
    expected_length: int = at(20, "I", default=0)
    cdb: bytes = at(32, "16s", default=bytes(16))
    """The whole CDB: its first 16 bytes in the BHS, the rest in an AHS."""
    bidi_read_length: int | None = None
    data: Buffer = b""

    def ahs_bytes(self) -> bytes:
        out = b""
        if len(self.cdb) > 16:
            ext = self.cdb[16:]
            body = _AHS_HDR.pack(len(ext) + 1, AHS_EXTENDED_CDB, 0) + ext
            out += body + PADDING[(-len(body)) & 3]
        if self.bidi_read_length is not None:
            if not 0 <= self.bidi_read_length <= 0xFFFFFFFF:
                raise ValueError(f"ScsiCommand.bidi_read_length = {self.bidi_read_length} "
                                 "does not fit in 32 bits")
            out += _AHS_HDR.pack(5, AHS_BIDI_READ_LENGTH, 0) + _U32.pack(self.bidi_read_length)
        return out

    @classmethod
    def take_ahs(cls, ahs: bytes, fields: dict[str, Any]) -> None:
        if ahs:
            fields["cdb"], fields["bidi_read_length"] = _command_ahs(fields["cdb"], ahs)


def _command_ahs(cdb: bytes, ahs: bytes) -> tuple[bytes, int | None]:
    """The CDB extended by an Extended CDB AHS and the Bidirectional Read
    Expected Data Transfer Length, from a SCSI Command's AHS (§11.2.2)."""
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
    return cdb, bidi


@pdu_class
class TaskMgmtRequest(InitiatorPdu):
    """Task Management Function Request (RFC 7143 §11.5)."""

    opcode: ClassVar[int] = Opcode.TASK_MGMT_REQUEST
    fixed = (_F,)
    immediate: bool = at(0, "B", 0x40, default=True)
    function: int = at(1, "B", 0x7F)
    lun: int = at(8, "Q", default=0)
    itt: int = at(16, "I")
    ref_task_tag: int = at(20, "I", default=RESERVED_TAG)
    ref_cmdsn: int = at(32, "I", default=0)
    exp_datasn: int = at(36, "I", default=0)


@pdu_class
class LoginRequest(InitiatorPdu, LoginFields):
    """Login Request (RFC 7143 §11.12); always immediate."""

    opcode: ClassVar[int] = Opcode.LOGIN_REQUEST
    fixed = (Fixed(0, "B", 0x40),)
    version_min: int = at(3, "B", default=0)
    cid: int = at(20, "H", default=0)


@pdu_class
class TextRequest(InitiatorPdu, TextFields):
    """Text Request (RFC 7143 §11.10)."""

    opcode: ClassVar[int] = Opcode.TEXT_REQUEST
    immediate: bool = at(0, "B", 0x40, default=False)


@pdu_class
class DataOut(Pdu, DataFields):
    """SCSI Data-Out (RFC 7143 §11.7).  A target decodes one per solicited
    burst, with :func:`decode_data_out`."""

    opcode: ClassVar[int] = Opcode.DATA_OUT
    exp_statsn: int = at(28, "I", default=0)


@pdu_class
class LogoutRequest(InitiatorPdu):
    """Logout Request (RFC 7143 §11.14)."""

    opcode: ClassVar[int] = Opcode.LOGOUT_REQUEST
    fixed = (_F,)
    immediate: bool = at(0, "B", 0x40, default=False)
    reason: int = at(1, "B", 0x7F, default=0)
    itt: int = at(16, "I")
    cid: int = at(20, "H", default=0)


@pdu_class
class SnackRequest(Pdu, TagFields):
    """SNACK Request (RFC 7143 §11.16); needs ErrorRecoveryLevel > 0."""

    opcode: ClassVar[int] = Opcode.SNACK_REQUEST
    fixed = (_F,)
    snack_type: int = at(1, "B", 0x0F, default=0)
    exp_statsn: int = at(28, "I", default=0)
    begrun: int = at(40, "I", default=0)
    runlength: int = at(44, "I", default=0)


# --------------------------------------------------------------------------- target PDUs


@pdu_class
class NopIn(TargetPdu, TagFields):
    """NOP-In (RFC 7143 §11.19): answer to a NOP-Out, or a target ping
    (TTT != 0xffffffff, ITT 0xffffffff)."""

    opcode: ClassVar[int] = Opcode.NOP_IN
    fixed = (_F,)
    itt: int = at(16, "I", default=RESERVED_TAG)
    data: Buffer = b""


@pdu_class
class ScsiResponse(TargetPdu):
    """SCSI Response (RFC 7143 §11.4).  ``data`` is SenseLength (2 bytes) +
    sense data, see :func:`sense_segment`.  A target sends one per WRITE, with
    :func:`scsi_response_header`."""

    opcode: ClassVar[int] = Opcode.SCSI_RESPONSE
    fixed = (_F,)
    bidi_overflow: bool = at(1, "B", 0x10, default=False)
    bidi_underflow: bool = at(1, "B", 0x08, default=False)
    overflow: bool = at(1, "B", 0x04, default=False)
    underflow: bool = at(1, "B", 0x02, default=False)
    response: int = at(2, "B", default=0)
    status: int = at(3, "B", default=0)
    itt: int = at(16, "I")
    snack_tag: int = at(20, "I", default=0)
    exp_datasn: int = at(36, "I", default=0)
    bidi_residual_count: int = at(40, "I", default=0)
    residual_count: int = at(44, "I", default=0)
    data: Buffer = b""


@pdu_class
class TaskMgmtResponse(TargetPdu):
    """Task Management Function Response (RFC 7143 §11.6)."""

    opcode: ClassVar[int] = Opcode.TASK_MGMT_RESPONSE
    fixed = (_F,)
    response: int = at(2, "B", default=0)
    itt: int = at(16, "I")


@pdu_class
class LoginResponse(TargetPdu, LoginFields):
    """Login Response (RFC 7143 §11.13)."""

    opcode: ClassVar[int] = Opcode.LOGIN_RESPONSE
    version_active: int = at(3, "B", default=0)
    status_class: int = at(36, "B", default=0)
    status_detail: int = at(37, "B", default=0)


@pdu_class
class TextResponse(TargetPdu, TextFields):
    """Text Response (RFC 7143 §11.11)."""

    opcode: ClassVar[int] = Opcode.TEXT_RESPONSE


@pdu_class
class DataIn(TargetPdu, DataFields):
    """SCSI Data-In (RFC 7143 §11.8).  With ``status_present`` (S bit) it also
    carries the command status and residuals, saving a SCSI Response.  A
    target sends one or more per READ, with :func:`data_in_header`."""

    opcode: ClassVar[int] = Opcode.DATA_IN
    ack: bool = at(1, "B", 0x40, default=False)
    overflow: bool = at(1, "B", 0x04, default=False)
    underflow: bool = at(1, "B", 0x02, default=False)
    status_present: bool = at(1, "B", 0x01, default=False)
    status: int = at(3, "B", when="status_present", default=0)
    residual_count: int = at(44, "I", default=0)


@pdu_class
class LogoutResponse(TargetPdu):
    """Logout Response (RFC 7143 §11.15)."""

    opcode: ClassVar[int] = Opcode.LOGOUT_RESPONSE
    fixed = (_F,)
    response: int = at(2, "B", default=0)
    itt: int = at(16, "I")
    time2wait: int = at(40, "H", default=0)
    time2retain: int = at(42, "H", default=0)


@pdu_class
class R2T(TargetPdu, TagFields):
    """Ready To Transfer (RFC 7143 §11.9): solicits one Data-Out sequence.

    ``header()`` is hand-packed, a target sends one per solicited burst; it is
    held to the layout like the other hot-path coders (below)."""

    opcode: ClassVar[int] = Opcode.R2T
    fixed = (_F,)
    ttt: int = at(20, "I")
    r2tsn: int = at(36, "I", default=0)
    buffer_offset: int = at(40, "I", default=0)
    desired_length: int = at(44, "I", default=0)

    def header(self) -> bytes:
        return _BHS.pack(Opcode.R2T, 0x80, 0, 0, 0, self.lun, self.itt, self.ttt, self.statsn,
                         self.exp_cmdsn, self.max_cmdsn, self.r2tsn, self.buffer_offset,
                         self.desired_length)


@pdu_class
class AsyncMessage(TargetPdu):
    """Asynchronous Message (RFC 7143 §11.9.1)."""

    opcode: ClassVar[int] = Opcode.ASYNC_MESSAGE
    fixed = (_F, _NO_ITT)
    lun: int = at(8, "Q", default=0)
    event: int = at(36, "B", default=0)
    vcode: int = at(37, "B", default=0)
    parameter1: int = at(38, "H", default=0)
    parameter2: int = at(40, "H", default=0)
    parameter3: int = at(42, "H", default=0)
    data: Buffer = b""


@pdu_class
class Reject(TargetPdu):
    """Reject (RFC 7143 §11.17); ``data`` is the rejected PDU's header."""

    opcode: ClassVar[int] = Opcode.REJECT
    fixed = (_F, _NO_ITT)
    reason: int = at(2, "B")
    datasn_r2tsn: int = at(36, "I", default=0)
    data: Buffer = b""


AnyPdu = (NopOut | ScsiCommand | TaskMgmtRequest | LoginRequest | TextRequest | DataOut
          | LogoutRequest | SnackRequest | NopIn | ScsiResponse | TaskMgmtResponse
          | LoginResponse | TextResponse | DataIn | LogoutResponse | R2T | AsyncMessage | Reject)

PDU_CLASSES: tuple[type[Pdu], ...] = (
    NopOut, ScsiCommand, TaskMgmtRequest, LoginRequest, TextRequest, DataOut, LogoutRequest,
    SnackRequest, NopIn, ScsiResponse, TaskMgmtResponse, LoginResponse, TextResponse, DataIn,
    LogoutResponse, R2T, AsyncMessage, Reject)
"""One class per opcode of :class:`Opcode`."""


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


# --------------------------------------------------------------------------- the hot path
# Hand-packed coders for what a target does per command: decode a SCSI Command
# or a Data-Out, answer with Data-In, SCSI Response or R2T (above); and for
# what an initiator does per write: send Data-Out.  Each does
# in one struct call what its class's layout does in a loop, and each is held
# to that layout by tests/test_iscsi_spec.py: same bytes out, same PDU in.

_BHS = struct.Struct(">BBBBIQI7I")
_CMD = struct.Struct(">BBBBIQIIII16s")


def scsi_response_header(b1: int, response: int, status: int, length: int, itt: int,
                         snack_tag: int, statsn: int, exp_cmdsn: int, max_cmdsn: int,
                         exp_datasn: int, bidi_residual: int, residual: int) -> bytes:
    """A SCSI Response BHS from its fields (``b1``: 1 0 0 o u O U 0 bits),
    without building a :class:`ScsiResponse`: a target sends one per WRITE."""
    return _BHS.pack(Opcode.SCSI_RESPONSE, b1, response, status, length, 0, itt, snack_tag,
                     statsn, exp_cmdsn, max_cmdsn, exp_datasn, bidi_residual, residual)


def data_in_header(b1: int, status: int, length: int, lun: int, itt: int, ttt: int,
                   statsn: int, exp_cmdsn: int, max_cmdsn: int, datasn: int, offset: int,
                   residual: int) -> bytes:
    """A Data-In BHS from its fields (``b1``: F A 0 0 0 O U S bits, ``length``
    the data segment length), without building a :class:`DataIn`: a target
    sends one or more per READ, so its per-command path calls this directly."""
    return _BHS.pack(Opcode.DATA_IN, b1, 0, status, length, lun, itt, ttt, statsn,
                     exp_cmdsn, max_cmdsn, datasn, offset, residual)


def data_out_header(final: bool, length: int, lun: int, itt: int, ttt: int, exp_statsn: int,
                    datasn: int, offset: int) -> bytes:
    """A Data-Out BHS from its fields, without building a :class:`DataOut`:
    an initiator sends one per MaxRecvDataSegmentLength of every write."""
    return _BHS.pack(Opcode.DATA_OUT, 0x80 if final else 0, 0, 0, length, lun, itt, ttt, 0,
                     exp_statsn, 0, datasn, offset, 0)


def decode_scsi_command(buf: Buffer, pos: int, ahs: bytes, data: Buffer) -> ScsiCommand:
    """The SCSI Command whose BHS starts at ``buf[pos]``: one per host I/O."""
    b0, b1, _b2, _b3, _lw, lun, itt, edtl, cmdsn, expstatsn, cdb = _CMD.unpack_from(buf, pos)
    bidi = None
    if ahs:
        cdb, bidi = _command_ahs(cdb, ahs)
    return ScsiCommand(itt=itt, lun=lun, cmdsn=cmdsn, exp_statsn=expstatsn,
                       expected_length=edtl, cdb=cdb, final=bool(b1 & 0x80),
                       read=bool(b1 & 0x40), write=bool(b1 & 0x20), attr=b1 & 7,
                       immediate=bool(b0 & 0x40), bidi_read_length=bidi, data=data)


def decode_data_out(buf: Buffer, pos: int, ahs: bytes, data: Buffer) -> DataOut:
    """The Data-Out whose BHS starts at ``buf[pos]``: one per solicited burst."""
    f = _BHS.unpack_from(buf, pos)
    return DataOut(itt=f[6], ttt=f[7], lun=f[5], exp_statsn=f[9], datasn=f[11],
                   buffer_offset=f[12], final=bool(f[1] & 0x80), data=data)


# Opcode -> decoder: the layout's, or the hot path's for what a target decodes per command.
_DECODERS: Mapping[int, Callable[[Buffer, int, bytes, Buffer], Pdu]] = {
    cls.opcode: cls.layout.decode for cls in PDU_CLASSES} | {
    Opcode.SCSI_COMMAND: decode_scsi_command, Opcode.DATA_OUT: decode_data_out}


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
        self._accept = frozenset(_DECODERS) if accept is None else frozenset(accept)
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
            start = pos + BHS_LEN
            if not dsl:
                return decode_scsi_command(buf, pos, b"", b"")
            if zero_copy:
                assert self._mv is not None
                return decode_scsi_command(buf, pos, b"", self._mv[start:start + dsl])
            return decode_scsi_command(buf, pos, b"", bytes(buf[start:start + dsl]))
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
        if ahs and opcode != Opcode.SCSI_COMMAND:
            raise IscsiProtocolError("AHS on a PDU that takes none",
                                     RejectReason.INVALID_PDU_FIELD, bytes(mv[pos:pos + 48]))
        return _DECODERS[opcode](buf, pos, ahs, data)

    def _compact(self) -> None:
        """Drop consumed bytes; keep the partial PDU at the buffer start."""
        if self._pos == 0:
            return
        if self._pos >= len(self._buf):
            self._buf, self._mv, self._pos = b"", None, 0
        elif type(self._buf) is bytearray:
            del self._buf[:self._pos]
            self._pos = 0
