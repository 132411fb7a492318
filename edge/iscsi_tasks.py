"""One SCSI command's life inside an iSCSI target connection, and the write-data rules.

A :class:`Task` is one SCSI command between its arrival and its answer: first
collecting write data, then running in SCSI.  Collecting follows RFC 7143
§4.2.5 and §11.7-8: immediate data in the command, one unsolicited burst of
Data-Out up to FirstBurstLength when InitialR2T=No, then Data-Out answering
our R2Ts, each sequence checked for its DataSN, buffer offset and length.
:meth:`Task.start` and :meth:`Task.data_out` are those rules, pure: they say
what happens next (a :class:`Step`, or the sense of the CHECK CONDITION that
ends the task) and :class:`~edge.iscsi_session.TargetConnection` does it
(sends R2Ts under its write budget, hands the command to SCSI, answers).
"""

from __future__ import annotations

import enum

from edge.scsi.sense import SenseKey
from steelfusion.iscsi.pdu import RESERVED_TAG, Buffer, DataOut, ScsiCommand
from steelfusion.iscsi.text import SessionParams

Sense = tuple[int, int, int]
"""(sense key, ASC, ASCQ) of the CHECK CONDITION that ends a task (RFC 7143 §11.4.7.2)."""

INVALID_FIELD_IN_CDB: Sense = (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)
UNEXPECTED_UNSOLICITED_DATA: Sense = (SenseKey.ABORTED_COMMAND, 0x0C, 0x0C)
DATA_PHASE_ERROR: Sense = (SenseKey.ABORTED_COMMAND, 0x4B, 0x00)
"""A DataSN out of order, or a burst that ended short."""
INVALID_TARGET_TRANSFER_TAG: Sense = (SenseKey.ABORTED_COMMAND, 0x4B, 0x01)
TOO_MUCH_WRITE_DATA: Sense = (SenseKey.ABORTED_COMMAND, 0x4B, 0x02)
DATA_OFFSET_ERROR: Sense = (SenseKey.ABORTED_COMMAND, 0x4B, 0x05)


class Step(enum.Enum):
    """What the connection does for a task after a PDU of its data."""

    WAIT = 0  # more Data-Out is on its way
    WANT_R2T = 1  # the unsolicited part is over: solicit the rest (under the write budget)
    MORE_R2TS = 2  # an R2T's burst is complete and bytes remain: issue the next R2Ts
    DISPATCH = 3  # every byte is here (or none was due): hand the command to SCSI


class TaskState(enum.Enum):
    COLLECTING = 1  # waiting for Data-Out
    RUNNING = 2  # handed to SCSI


class R2TState:
    """One outstanding R2T of a task: the burst it asked for, what arrived."""

    __slots__ = ("length", "next_datasn", "offset", "received")

    def __init__(self, offset: int, length: int) -> None:
        self.offset = offset
        self.length = length
        self.received = 0
        self.next_datasn = 0


class Task:
    """One SCSI command, from its SCSI Command PDU to its answer."""

    __slots__ = (
        "aborted",
        "admitted",
        "cdb",
        "chunks",
        "cmdsn",
        "edtl",
        "immediate",
        "itt",
        "lun",
        "lun_raw",
        "next_offset",
        "queued",
        "r2ts",
        "r2tsn",
        "read",
        "received",
        "state",
        "unsol_datasn",
        "unsol_limit",
        "unsol_open",
        "write",
    )

    def __init__(self, pdu: ScsiCommand, lun: int) -> None:
        self.itt = pdu.itt
        self.lun = lun
        self.lun_raw = pdu.lun
        self.cdb = pdu.cdb
        self.edtl = pdu.expected_length
        self.read = pdu.read
        self.write = pdu.write
        self.immediate = pdu.immediate
        self.cmdsn = pdu.cmdsn
        self.state = TaskState.COLLECTING
        self.chunks: list[tuple[int, Buffer]] = []
        self.received = 0
        self.unsol_open = False
        self.unsol_limit = 0
        self.unsol_datasn = 0
        self.next_offset = 0
        self.r2tsn = 0
        self.r2ts: dict[int, R2TState] = {}
        self.aborted = False
        self.admitted = False
        self.queued = False

    def start(self, pdu: ScsiCommand, p: SessionParams, max_command_bytes: int) -> Step | Sense:
        """The command has arrived, perhaps with immediate data."""
        data = pdu.data
        edtl = self.edtl
        write = pdu.write and edtl > 0
        if pdu.read and pdu.write:
            return INVALID_FIELD_IN_CDB  # bidirectional: not supported
        if not write:
            return UNEXPECTED_UNSOLICITED_DATA if data else Step.DISPATCH
        if edtl > max_command_bytes:
            return INVALID_FIELD_IN_CDB
        unsol_limit = min(p.first_burst_length, edtl)
        if data:
            if not p.immediate_data or len(data) > unsol_limit:
                return UNEXPECTED_UNSOLICITED_DATA
            self.add(0, data)
        if self.received == edtl:
            return Step.DISPATCH
        if not p.initial_r2t and not pdu.final and self.received < unsol_limit:
            self.unsol_open = True
            self.unsol_limit = unsol_limit
            return Step.WAIT
        return Step.WANT_R2T

    def data_out(self, pdu: DataOut) -> Step | Sense:
        """A Data-Out PDU for this task: unsolicited (TTT 0xffffffff) or
        answering one of our R2Ts."""
        data = pdu.data
        n = len(data)
        if pdu.ttt == RESERVED_TAG:
            if not self.unsol_open:
                return UNEXPECTED_UNSOLICITED_DATA
            if pdu.datasn != self.unsol_datasn:
                return DATA_PHASE_ERROR
            if pdu.buffer_offset != self.received:
                return DATA_OFFSET_ERROR
            if self.received + n > self.unsol_limit:
                return UNEXPECTED_UNSOLICITED_DATA
            self.add(pdu.buffer_offset, data)
            self.unsol_datasn += 1
            if pdu.final or self.received >= self.unsol_limit:
                self.unsol_open = False
                return Step.DISPATCH if self.received == self.edtl else Step.WANT_R2T
            return Step.WAIT
        r2t = self.r2ts.get(pdu.ttt)
        if r2t is None:
            return INVALID_TARGET_TRANSFER_TAG
        if pdu.datasn != r2t.next_datasn:
            return DATA_PHASE_ERROR
        if pdu.buffer_offset != r2t.offset + r2t.received:
            return DATA_OFFSET_ERROR
        if r2t.received + n > r2t.length:
            return TOO_MUCH_WRITE_DATA
        self.add(pdu.buffer_offset, data)
        r2t.received += n
        r2t.next_datasn += 1
        if r2t.received == r2t.length:
            del self.r2ts[pdu.ttt]
            if self.next_offset < self.edtl:
                return Step.MORE_R2TS
            return Step.DISPATCH if not self.r2ts else Step.WAIT
        return DATA_PHASE_ERROR if pdu.final else Step.WAIT  # a sequence ended short

    def add(self, offset: int, data: Buffer) -> None:
        self.chunks.append((offset, data))
        self.received += len(data)

    def take_data(self) -> Buffer:
        """The Data-Out buffer: the single chunk as received when there is
        one (no copy), else the chunks assembled by offset."""
        chunks = self.chunks
        self.chunks = []
        if not chunks:
            return b""
        if len(chunks) == 1 and chunks[0][0] == 0:
            return chunks[0][1]
        # Offsets were checked on arrival (no gaps, no overlaps), so the
        # chunks in offset order are the buffer: one join, no zero-fill.
        chunks.sort(key=_offset)
        return b"".join([c for _, c in chunks])


def _offset(chunk: tuple[int, Buffer]) -> int:
    return chunk[0]
