"""SCSI block-device emulation (SPC-4, SBC-3) over a :class:`BlockBackend`.

CDB parsing, range checks, INQUIRY/VPD/MODE pages and sense data are pure
functions and precomputed bytes; :meth:`LogicalUnit.execute` is the thin async
part that calls the backend.  Every command the LU serves is one row of
:data:`COMMANDS` (operation code, service action, CDB usage data for REPORT
SUPPORTED OPERATION CODES, how it interacts with reservations), so what we
advertise and what we do cannot drift apart.

Errors are CHECK CONDITION with fixed-format sense (SPC-4 §4.5.3): LBA out of
range 5/21/00, invalid opcode 5/20/00, invalid field in CDB 5/24/00 (in the
parameter list 5/26/xx), parameter list length 5/1A/00, write protected
7/27/0x, miscompare E/1D/00 with INFORMATION = offset, LUN not supported
5/25/00, backend not ready 2/04/xx, any other backend failure 4/44/00.
Reservation conflicts are status RESERVATION CONFLICT (SAM-5 §5.3.1).  Range
checks never add LBA and length, so they cannot overflow in a fixed-width
port either.

State shared by every session and path to one LU lives here: SPC-2
RESERVE/RELEASE, SCSI-3 persistent reservations (``edge.pr``, persisted with
an atomic replace), unit attentions per I_T nexus (SAM-5 §5.14), mode pages
that MODE SELECT may change, and the LBA range locks that make COMPARE AND
WRITE, ORWRITE, WRITE SAME, WRITE ATOMIC and EXTENDED COPY atomic with respect
to other writes (SBC-3 §5.3, SBC-4 §4.29).

Backends need only ``read``/``write``/``flush``.  Optional methods are used
when present and emulated otherwise: ``unmap(offset, length)`` (else zeros
are written, which is what LBPRZ=1 promises), ``lba_status(offset, length)``
(else a block reads as deallocated when it is all zeros), ``prefetch`` (else
a read), and the attribute ``atomic_write_max_bytes`` (WRITE ATOMIC is only
offered when the backend can make that many bytes crash-atomic).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from edge.backends import BackendNotReady, BlockBackend
from edge.pr import Access, PersistentReservations, PrError, ProutParams
from steelfusion import log
from steelfusion.atomic import atomic_write

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


class Op(IntEnum):
    """Operation codes handled here (SPC-4 / SBC-3 / SBC-4)."""

    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SELECT_6 = 0x15
    RESERVE_6 = 0x16
    RELEASE_6 = 0x17
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    PREVENT_ALLOW = 0x1E
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    WRITE_VERIFY_10 = 0x2E
    VERIFY_10 = 0x2F
    PREFETCH_10 = 0x34
    SYNCHRONIZE_CACHE_10 = 0x35
    READ_DEFECT_DATA_10 = 0x37
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    MODE_SELECT_10 = 0x55
    RESERVE_10 = 0x56
    RELEASE_10 = 0x57
    MODE_SENSE_10 = 0x5A
    PERSISTENT_RESERVE_IN = 0x5E
    PERSISTENT_RESERVE_OUT = 0x5F
    EXTENDED_COPY = 0x83
    RECEIVE_COPY_RESULTS = 0x84
    READ_16 = 0x88
    COMPARE_AND_WRITE = 0x89
    WRITE_16 = 0x8A
    ORWRITE_16 = 0x8B
    WRITE_VERIFY_16 = 0x8E
    VERIFY_16 = 0x8F
    PREFETCH_16 = 0x90
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    WRITE_ATOMIC_16 = 0x9C
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    MAINTENANCE_IN = 0xA3
    READ_12 = 0xA8
    WRITE_12 = 0xAA
    WRITE_VERIFY_12 = 0xAE
    VERIFY_12 = 0xAF
    READ_DEFECT_DATA_12 = 0xB7


SA_READ_CAPACITY_16 = 0x10
SA_GET_LBA_STATUS = 0x12
SA_REPORT_SUPPORTED_OPCODES = 0x0C
SA_REPORT_SUPPORTED_TMF = 0x0D
SA_XCOPY_LID1 = 0x00
SA_COPY_STATUS = 0x00
SA_COPY_OPERATING_PARAMETERS = 0x03
SANITIZE = 0x48
SA_SANITIZE_OVERWRITE = 0x01
SA_SANITIZE_BLOCK_ERASE = 0x02
SA_SANITIZE_CRYPTO_ERASE = 0x03
SA_SANITIZE_EXIT_FAILURE_MODE = 0x1F
SANITIZE_IN_PROGRESS = (0x04, 0x1B)
SANITIZE_FAILED = (0x31, 0x03)
SANITIZE_ALLOWED = frozenset((0x03, 0x12, 0xA0))
"""INQUIRY, REPORT LUNS and REQUEST SENSE still run while a sanitize is in
progress (SBC-3 §4.11.1); everything else gets NOT READY, SANITIZE IN
PROGRESS."""

# Unit attention conditions (SPC-4 Table 28): (ASC, ASCQ).
UA_POWER_ON_RESET = (0x29, 0x00)
UA_BUS_RESET = (0x29, 0x02)
UA_BUS_DEVICE_RESET = (0x29, 0x03)
UA_MODE_PARAMETERS_CHANGED = (0x2A, 0x01)

UA_QUEUE_MAX = 16
"""Pending unit attentions kept per I_T nexus; the oldest go first when full."""


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

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_FAST10 = struct.Struct(">IxH")  # LBA and transfer length of a 10-byte READ/WRITE
_FAST16 = struct.Struct(">QI")  # LBA and transfer length of a 16-byte READ/WRITE


def _u16(cdb: Buffer, i: int) -> int:
    return int(_U16.unpack_from(cdb, i)[0])


def _u32(cdb: Buffer, i: int) -> int:
    return int(_U32.unpack_from(cdb, i)[0])


def _u64(cdb: Buffer, i: int) -> int:
    return int(_U64.unpack_from(cdb, i)[0])


def parse_rw(cdb: bytes) -> tuple[int, int]:
    """(LBA, transfer length in blocks) of a READ/WRITE/VERIFY/SYNC CACHE/
    PREFETCH/WRITE SAME/ORWRITE CDB (SBC-3 §5): 6-byte, then 10-byte (LBA
    2..5, length 7..8), 12-byte (2..5, 6..9) and 16-byte (2..9, 10..13)."""
    op = cdb[0]
    if op in (Op.READ_6, Op.WRITE_6):
        return ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3], cdb[4] or 256
    if op < 0x60:
        return _u32(cdb, 2), _u16(cdb, 7)
    if op >= 0xA0:
        return _u32(cdb, 2), _u32(cdb, 6)
    if op == Op.WRITE_ATOMIC_16:
        return _u64(cdb, 2), _u16(cdb, 12)
    return _u64(cdb, 2), _u32(cdb, 10)


def check_range(lba: int, blocks: int, capacity_blocks: int) -> None:
    """LBA OUT OF RANGE (5/21/00) unless [lba, lba+blocks) fits (SBC-3 §4.5).

    Written as two comparisons that never add, so the check also holds in
    a fixed-width port (LBA up to 2**64-1 plus a 32-bit count)."""
    if blocks > capacity_blocks or lba > capacity_blocks - blocks:
        raise lba_out_of_range()


def _ascii(s: str, n: int) -> bytes:
    return s.encode("ascii", "replace")[:n].ljust(n, b" ")


def allocation(data: bytes, alloc: int) -> bytes:
    """Truncate to the ALLOCATION LENGTH (SPC-4 §4.2.5.6)."""
    return data if len(data) <= alloc else data[:alloc]


# ----------------------------------------------------------------------------- I_T nexus


@dataclass(frozen=True, slots=True)
class ItNexus:
    """Who sent a command: initiator port and target port (SAM-5 §4.6.2).

    ``session_id`` tells two sessions of the same initiator port apart (the
    old and the new one during reinstatement); unit attentions, SPC-2
    reservations and copy results belong to it.  ``pr_id`` is the stable
    identity persistent reservations are registered under.
    """

    initiator_name: str = "local"
    isid: int = 0
    target_name: str = ""
    tpgt: int = 1
    session_id: int = 0

    @property
    def initiator_port(self) -> str:
        """RFC 7143 §4.2.7.2: iSCSI initiator port name."""
        return f"{self.initiator_name},i,0x{self.isid:012x}"

    @property
    def target_port(self) -> str:
        return f"{self.target_name},t,0x{self.tpgt:04x}"

    @property
    def pr_id(self) -> str:
        return f"{self.initiator_port}|{self.target_port}"


LOCAL_NEXUS = ItNexus()


@dataclass(slots=True)
class _Session:
    nexus: ItNexus
    ua: deque[tuple[int, int]] = field(default_factory=deque)
    copies: dict[int, bytes] = field(default_factory=dict)


# ----------------------------------------------------------------------------- range locks


class RangeLock:
    """Shared/exclusive locks on block ranges ``[start, end)``.

    Plain writes take shared locks (they may run together); COMPARE AND
    WRITE, ORWRITE, WRITE SAME, UNMAP, WRITE ATOMIC and EXTENDED COPY take
    exclusive ones, so nothing else writes their range between their read and
    their write.  Waiters are served in arrival order when their ranges
    overlap, so a stream of plain writes cannot starve a COMPARE AND WRITE.
    """

    __slots__ = ("_held", "_next", "_waiters", "_xheld")

    def __init__(self) -> None:
        self._held: dict[int, tuple[int, int, bool]] = {}
        self._waiters: deque[tuple[int, int, bool, asyncio.Future[int]]] = deque()
        self._next = 0
        self._xheld = 0

    def _conflicts(self, start: int, end: int, exclusive: bool) -> bool:
        return any(start < e and s < end and (exclusive or x) for s, e, x in self._held.values())

    def _grant(self, start: int, end: int, exclusive: bool) -> int:
        self._next += 1
        self._held[self._next] = (start, end, exclusive)
        if exclusive:
            self._xheld += 1
        return self._next

    def _grantable(self, start: int, end: int, exclusive: bool) -> bool:
        """Nothing held or waiting in the way (waiters ahead keep their turn)."""
        if not self._waiters:
            return (not exclusive and not self._xheld) or not self._conflicts(start, end, exclusive)
        return not any(s < end and start < e and (x or exclusive) for s, e, x, _ in self._waiters) \
            and not self._conflicts(start, end, exclusive)

    def shared_free(self, start: int, end: int) -> bool:
        """A shared lock on the range would be granted now (:meth:`try_acquire`
        would succeed), for a write that finishes without yielding."""
        return self._grantable(start, end, False)

    def try_acquire(self, start: int, end: int, exclusive: bool = False) -> int | None:
        """The range now if nothing is in the way (the plain-write fast path),
        else None."""
        return self._grant(start, end, exclusive) if self._grantable(start, end, exclusive) \
            else None

    async def acquire(self, start: int, end: int, exclusive: bool = False) -> int:
        """Wait for the range; returns a token for :meth:`release`."""
        tok = self.try_acquire(start, end, exclusive)
        if tok is not None:
            return tok
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        entry = (start, end, exclusive, fut)
        self._waiters.append(entry)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(fut.result())
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._wake()
            raise

    def release(self, token: int) -> None:
        held = self._held.pop(token, None)
        if held is not None and held[2]:
            self._xheld -= 1
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        blocked: list[tuple[int, int, bool]] = []
        keep: deque[tuple[int, int, bool, asyncio.Future[int]]] = deque()
        for s, e, x, fut in self._waiters:
            if fut.done():
                continue
            ahead = any(s < be and bs < e and (x or bx) for bs, be, bx in blocked)
            if not ahead and not self._conflicts(s, e, x):
                fut.set_result(self._grant(s, e, x))
            else:
                blocked.append((s, e, x))
                keep.append((s, e, x, fut))
        self._waiters = keep

    @property
    def held(self) -> int:
        return len(self._held)


# ----------------------------------------------------------------------------- cancellation


class StartedCoroutine(Coroutine[Any, Any, Any]):
    """A coroutine started by hand (``coro.send(None)``, to finish it without
    a Task when it never waits) and now suspended on ``yielded``, in a form
    an asyncio Task can run.

    The Task's first step gets ``yielded`` back, still flagged as blocking as
    the coroutine's ``await`` left it, so the Task waits on it exactly as if
    it had run the coroutine from the start; every later step goes straight
    to the coroutine.  A cancellation that arrives before that first step
    (a command aborted in the same batch of PDUs that brought it) cancels
    ``yielded`` and is thrown into the coroutine, so its ``finally`` blocks
    and waiter clean-ups run, as they would in a Task.
    """

    __slots__ = ("_coro", "_first", "_started")

    def __init__(self, coro: Coroutine[Any, Any, Any], yielded: Any) -> None:
        self._coro = coro
        self._first = yielded
        self._started = False

    def send(self, value: Any) -> Any:
        if self._started:
            return self._coro.send(value)
        self._started = True
        first, self._first = self._first, None
        return first

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if not self._started:
            self._started = True
            first, self._first = self._first, None
            if first is not None:
                first.cancel()  # what Task.cancel does to the future it waits on
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)  # pragma: no cover - old calling style

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, Any]:
        raise TypeError("StartedCoroutine is run by a Task, not awaited")


async def to_the_end(coro: Coroutine[Any, Any, Any]) -> Any:
    """``await coro``, except that cancelling the caller does not cut it short.

    For I/O that changes the medium under a range lock: a backend may hand a
    write to a thread that no cancellation can stop, so a command cancelled by
    ABORT TASK or a reset must keep its lock (and keep the TMF answer back)
    until the data has landed, or a later write to the same blocks could land
    first (SAM-5 §7.2: once the abort is answered the task has no more
    effect).  The cancellation is raised once the I/O is over.  Costs nothing
    when the I/O finishes without waiting (the backend's fast case)."""
    try:
        yielded = coro.send(None)
    except StopIteration as e:
        return e.value
    return await _finish(coro, yielded)


async def _finish(coro: Coroutine[Any, Any, Any], yielded: Any) -> Any:
    task = asyncio.get_running_loop().create_task(StartedCoroutine(coro, yielded))
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait((task,))
        except asyncio.CancelledError as e:
            cancelled = e
    if cancelled is not None:
        if not task.cancelled():
            task.exception()  # the command is gone: nobody else will look at it
        raise cancelled
    return task.result()


# ----------------------------------------------------------------------------- page builders

VERSION_DESCRIPTORS = (0x00A0, 0x0960, 0x0300, 0x04C0)
"""SAM-5, iSCSI, SPC-3, SBC-3 (SPC-4 Table 143)."""


def build_standard_inquiry(vendor: str, product: str, revision: str, *,
                           present: bool = True, third_party_copy: bool = False) -> bytes:
    """Standard INQUIRY data, 96 bytes (SPC-4 §6.6.2): version 5 (SPC-3),
    response format 2, CMDQUE, 3PC when EXTENDED COPY is served, SBC-3
    version descriptor.  With ``present=False`` the peripheral qualifier says
    "no LU here" (0x7F)."""
    b = bytearray(96)
    b[0] = 0x00 if present else 0x7F
    b[2] = 0x05
    b[3] = 0x02
    b[4] = len(b) - 5
    b[5] = 0x08 if third_party_copy else 0x00
    b[7] = 0x02  # CMDQUE
    b[8:16] = _ascii(vendor, 8)
    b[16:32] = _ascii(product, 16)
    b[32:36] = _ascii(revision, 4)
    for i, d in enumerate(VERSION_DESCRIPTORS):
        b[58 + 2 * i:60 + 2 * i] = d.to_bytes(2, "big")
    return bytes(b)


def _vpd(page: int, payload: bytes) -> bytes:
    return bytes((0x00, page)) + len(payload).to_bytes(2, "big") + payload


@dataclass(frozen=True, slots=True)
class Limits:
    """What the Block Limits VPD page (SBC-3 §6.5.3, SBC-4 §6.6.4) promises;
    every value is in logical blocks and is enforced by the commands."""

    max_transfer: int
    optimal_transfer: int
    max_compare_and_write: int = 255
    max_unmap: int = 0
    max_unmap_descriptors: int = 0
    max_write_same: int = 0
    max_prefetch: int = 0
    max_atomic: int = 0
    optimal_granularity: int = 1


def build_vpd_pages(backend: BlockBackend, vendor: str, max_transfer_blocks: int,
                    optimal_transfer_blocks: int, *, limits: Limits | None = None,
                    thin: bool = False) -> dict[int, bytes]:
    """VPD pages 0x00, 0x80, 0x83, 0xB0, 0xB1 and, when thin provisioned,
    0xB2 (SPC-4 §7.8, SBC-3 §6.5)."""
    lim = limits or Limits(max_transfer_blocks, optimal_transfer_blocks)
    pages: dict[int, bytes] = {}
    pages[0x80] = _vpd(0x80, backend.serial.encode("ascii", "replace"))
    naa = bytes(backend.naa_id)
    if len(naa) != 16 or naa[0] >> 4 != 6:
        raise ValueError("naa_id must be a 16-byte NAA-6 identifier")
    # Designation descriptors (SPC-4 §7.8.6): NAA (binary, LU, type 3) and
    # T10 vendor id (ASCII, LU, type 1) = vendor + serial.
    t10 = _ascii(vendor, 8) + backend.serial.encode("ascii", "replace")
    t10 += b" " * ((-len(t10)) & 3)
    desc = bytes((0x01, 0x03, 0x00, 16)) + naa
    desc += bytes((0x02, 0x01, 0x00, len(t10))) + t10
    pages[0x83] = _vpd(0x83, desc)
    bl = bytearray(0x3C)  # Block Limits
    bl[1] = min(lim.max_compare_and_write, 255)
    bl[2:4] = lim.optimal_granularity.to_bytes(2, "big")
    bl[4:8] = lim.max_transfer.to_bytes(4, "big")
    bl[8:12] = lim.optimal_transfer.to_bytes(4, "big")
    bl[12:16] = lim.max_prefetch.to_bytes(4, "big")
    bl[16:20] = lim.max_unmap.to_bytes(4, "big")
    bl[20:24] = lim.max_unmap_descriptors.to_bytes(4, "big")
    if lim.max_unmap:
        bl[24:28] = (1).to_bytes(4, "big")  # OPTIMAL UNMAP GRANULARITY
        bl[28:32] = (0x80000000).to_bytes(4, "big")  # UGAVALID, alignment 0
    bl[32:40] = lim.max_write_same.to_bytes(8, "big")
    bl[40:44] = lim.max_atomic.to_bytes(4, "big")  # SBC-4: MAXIMUM ATOMIC TRANSFER LENGTH
    pages[0xB0] = _vpd(0xB0, bytes(bl))
    bdc = bytearray(0x3C)  # Block Device Characteristics, SBC-3 §6.5.2
    bdc[0:2] = (1).to_bytes(2, "big")  # MEDIUM ROTATION RATE: non-rotating
    if thin:
        # WABEREQ=01b, WACEREQ=01b (SBC-4 §6.6.2): after a SANITIZE BLOCK or
        # CRYPTO ERASE reads succeed (the blocks are deallocated: zeros).
        bdc[3] = 0x40 | 0x10
    pages[0xB1] = _vpd(0xB1, bytes(bdc))
    if thin:
        # Logical Block Provisioning (SBC-3 §6.5.4): LBPU, LBPWS, LBPWS10,
        # LBPRZ (unmapped blocks read as zeros); thin provisioned.
        pages[0xB2] = _vpd(0xB2, bytes((0x00, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0x00)))
    pages[0x00] = _vpd(0x00, bytes([0x00, *sorted(pages)]))
    return pages


def build_read_capacity_10(blocks: int, block_size: int) -> bytes:
    """SBC-3 §5.15: last LBA (0xFFFFFFFF if it does not fit) and block size."""
    return struct.pack(">II", min(blocks - 1, 0xFFFFFFFF), block_size)


def build_read_capacity_16(blocks: int, block_size: int, physical_exponent: int,
                           thin: bool = False) -> bytes:
    """SBC-3 §5.16: 32 bytes; LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT, and
    LBPME/LBPRZ when thin provisioned."""
    b14 = 0xC0 if thin else 0x00
    return struct.pack(">QIBBB", blocks - 1, block_size, 0, physical_exponent & 0x0F, b14) \
        + bytes(17)


def encode_lun(lun: int) -> bytes:
    """8-byte LUN (SAM-5 §4.7): peripheral addressing below 256, flat above."""
    if lun < 256:
        return bytes((0, lun)) + bytes(6)
    return bytes((0x40 | (lun >> 8), lun & 0xFF)) + bytes(6)


def build_report_luns(luns: Sequence[int]) -> bytes:
    """REPORT LUNS parameter data (SPC-4 §6.33)."""
    body = b"".join(encode_lun(n) for n in sorted(luns))
    return len(body).to_bytes(4, "big") + bytes(4) + body


# Mode pages (SPC-4 §7.5, SBC-3 §6.4): default current values and the
# changeable-bits mask.  Caching WCE and Control SWP may be changed.
_MODE_DEFAULTS = {
    0x01: bytes((0x01, 0x0A, 0x80)) + bytes(9),  # R/W error recovery: AWRE
    0x08: bytes((0x08, 0x12, 0x04)) + bytes(17),  # caching: WCE=1
    # Control: QUEUE ALGORITHM MODIFIER=1 (unrestricted), D_SENSE=0 (fixed
    # sense), SWP=0, BUSY TIMEOUT PERIOD unlimited.
    0x0A: bytes((0x0A, 0x0A, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0x00, 0x00)),
}
_MODE_CHANGEABLE = {k: v[:2] + bytes(len(v) - 2) for k, v in _MODE_DEFAULTS.items()}
_MODE_CHANGEABLE[0x08] = bytes((0x08, 0x12, 0x04)) + bytes(17)  # WCE
_MODE_CHANGEABLE[0x0A] = bytes((0x0A, 0x0A, 0x00, 0x00, 0x08)) + bytes(7)  # SWP


def build_mode_sense(cdb: bytes, blocks: int, block_size: int, read_only: bool,
                     pages: dict[int, bytes] | None = None) -> bytes:
    """MODE SENSE(6)/(10) parameter data (SPC-4 §6.11, §6.12, §7.5)."""
    current = pages if pages is not None else _MODE_DEFAULTS
    ten = cdb[0] == Op.MODE_SENSE_10
    dbd = bool(cdb[1] & 0x08)
    llbaa = ten and bool(cdb[1] & 0x10)
    pc = cdb[2] >> 6
    page = cdb[2] & 0x3F
    subpage = cdb[3]
    if pc == 3:
        raise ScsiError(SenseKey.ILLEGAL_REQUEST, 0x39, 0x00)  # saving not supported
    table = _MODE_CHANGEABLE if pc == 1 else _MODE_DEFAULTS if pc == 2 else current
    if page == 0x3F:
        if subpage not in (0x00, 0xFF):
            raise invalid_field(3)
        body = b"".join(table[k] for k in sorted(table))
    elif page in table and subpage == 0:
        body = table[page]
    else:
        raise invalid_field(2 if subpage == 0 else 3)
    if dbd:
        bd = b""
    elif llbaa:
        bd = struct.pack(">QII", blocks, 0, block_size)
    else:
        bd = struct.pack(">IB", min(blocks, 0xFFFFFFFF), 0) + block_size.to_bytes(3, "big")
    dsp = (0x80 if read_only else 0) | 0x10  # WP, DPOFUA
    if ten:
        total = 8 + len(bd) + len(body)
        hdr = struct.pack(">HBBBBH", total - 2, 0, dsp, 1 if llbaa and bd else 0, 0, len(bd))
    else:
        total = 4 + len(bd) + len(body)
        hdr = bytes((min(total - 1, 255), 0, dsp, len(bd)))
    return hdr + bd + body


def build_request_sense(descriptor: bool, sense: bytes | None = None) -> bytes:
    """REQUEST SENSE data (SPC-4 §6.39): no pending condition unless given."""
    if sense is not None:
        return sense
    if descriptor:
        return bytes((0x72, 0, 0, 0, 0, 0, 0, 0))
    return fixed_sense(SenseKey.NO_SENSE, 0, 0)


# ----------------------------------------------------------------------------- command table


@dataclass(frozen=True, slots=True)
class Command:
    """One operation code (and service action) the LU serves.

    ``usage`` is the CDB USAGE DATA of REPORT SUPPORTED OPERATION CODES (SPC-4
    §6.35.3): byte 0 the opcode, then a mask of the bits we evaluate.
    ``access`` drives persistent-reservation conflicts; ``spc2_ok`` lets the
    command through an SPC-2 reservation held by another nexus (SPC-2
    §5.5.1); ``ua_exempt`` commands neither report nor clear a unit attention
    (SAM-5 §5.14)."""

    opcode: int
    sa: int | None
    usage: bytes
    handler: str
    access: Access = Access.WRITE
    spc2_ok: bool = False
    ua_exempt: bool = False


def _cmd(opcode: int, sa: int | None, usage: str, handler: str, access: Access = Access.WRITE,
         *, spc2_ok: bool = False, ua_exempt: bool = False) -> Command:
    data = bytes.fromhex(usage.replace(" ", ""))
    if data[0] != opcode:
        raise ValueError(f"usage data for {opcode:#x} starts with {data[0]:#x}")
    return Command(opcode, sa, data, handler, access, spc2_ok, ua_exempt)


_R, _W, _A = Access.READ, Access.WRITE, Access.ALLOWED
COMMANDS: tuple[Command, ...] = (
    _cmd(0x00, None, "00 00 00 00 00 04", "_tur", _A),
    _cmd(0x03, None, "03 01 00 00 ff 04", "_request_sense", _A, spc2_ok=True, ua_exempt=True),
    _cmd(0x08, None, "08 1f ff ff ff 04", "_read", _R),
    _cmd(0x0A, None, "0a 1f ff ff ff 04", "_write", _W),
    _cmd(0x12, None, "12 03 ff ff ff 04", "_inquiry", _A, spc2_ok=True, ua_exempt=True),
    _cmd(0x15, None, "15 11 00 00 ff 04", "_mode_select", _W),
    _cmd(0x16, None, "16 00 00 00 00 04", "_reserve", _A),
    _cmd(0x17, None, "17 00 00 00 00 04", "_release", _A, spc2_ok=True),
    _cmd(0x1A, None, "1a 08 ff ff ff 04", "_mode_sense", _R),
    _cmd(0x1B, None, "1b 01 00 0f f7 04", "_start_stop", _A),
    _cmd(0x1E, None, "1e 00 00 00 03 04", "_prevent_allow", _A),
    _cmd(0x25, None, "25 00 ff ff ff ff 00 00 01 04", "_read_capacity_10", _A),
    _cmd(0x28, None, "28 f8 ff ff ff ff 00 ff ff 04", "_read", _R),
    _cmd(0x2A, None, "2a f8 ff ff ff ff 00 ff ff 04", "_write", _W),
    _cmd(0x2E, None, "2e f6 ff ff ff ff 00 ff ff 04", "_write_verify", _W),
    _cmd(0x2F, None, "2f f6 ff ff ff ff 00 ff ff 04", "_verify", _R),
    _cmd(0x34, None, "34 02 ff ff ff ff 00 ff ff 04", "_prefetch", _R),
    _cmd(0x35, None, "35 02 ff ff ff ff 00 ff ff 04", "_sync_cache", _W),
    _cmd(0x37, None, "37 00 1f 00 00 00 00 ff ff 04", "_read_defect_data", _R),
    _cmd(0x41, None, "41 f8 ff ff ff ff 00 ff ff 04", "_write_same", _W),
    _cmd(0x42, None, "42 01 00 00 00 00 00 ff ff 04", "_unmap", _W),
    *(_cmd(SANITIZE, sa, f"48 {0xA0 | sa:02x} 00 00 00 00 00 ff ff 04", "_sanitize", _W)
      for sa in (SA_SANITIZE_OVERWRITE, SA_SANITIZE_BLOCK_ERASE, SA_SANITIZE_CRYPTO_ERASE,
                 SA_SANITIZE_EXIT_FAILURE_MODE)),
    _cmd(0x55, None, "55 11 00 00 00 00 00 ff ff 04", "_mode_select", _W),
    _cmd(0x56, None, "56 12 00 00 00 00 00 00 00 04", "_reserve", _A),
    _cmd(0x57, None, "57 12 00 00 00 00 00 00 00 04", "_release", _A, spc2_ok=True),
    _cmd(0x5A, None, "5a 18 ff ff 00 00 00 ff ff 04", "_mode_sense", _R),
    *(_cmd(0x5E, sa, f"5e {sa:02x} 00 00 00 00 00 ff ff 04", "_persistent_reserve_in", _A)
      for sa in range(4)),
    *(_cmd(0x5F, sa, f"5f {sa:02x} ff 00 00 ff ff ff ff 04", "_persistent_reserve_out", _A)
      for sa in range(7)),
    _cmd(0x83, SA_XCOPY_LID1, "83 00 00 00 00 00 00 00 00 00 ff ff ff ff 00 04",
         "_extended_copy", _W),
    *(_cmd(0x84, sa, f"84 {sa:02x} ff 00 00 00 00 00 00 00 ff ff ff ff 00 04",
           "_receive_copy_results", _A)
      for sa in (SA_COPY_STATUS, SA_COPY_OPERATING_PARAMETERS)),
    _cmd(0x88, None, "88 f8 ff ff ff ff ff ff ff ff ff ff ff ff 00 04", "_read", _R),
    _cmd(0x89, None, "89 f8 ff ff ff ff ff ff ff ff 00 00 00 ff 00 04", "_compare_and_write",
         _W),
    _cmd(0x8A, None, "8a f8 ff ff ff ff ff ff ff ff ff ff ff ff 00 04", "_write", _W),
    _cmd(0x8B, None, "8b f8 ff ff ff ff ff ff ff ff ff ff ff ff 00 04", "_orwrite", _W),
    _cmd(0x8E, None, "8e f6 ff ff ff ff ff ff ff ff ff ff ff ff 00 04", "_write_verify", _W),
    _cmd(0x8F, None, "8f f6 ff ff ff ff ff ff ff ff ff ff ff ff 00 04", "_verify", _R),
    _cmd(0x90, None, "90 02 ff ff ff ff ff ff ff ff ff ff ff ff 00 04", "_prefetch", _R),
    _cmd(0x91, None, "91 02 ff ff ff ff ff ff ff ff ff ff ff ff 00 04", "_sync_cache", _W),
    _cmd(0x93, None, "93 f9 ff ff ff ff ff ff ff ff ff ff ff ff 00 04", "_write_same", _W),
    _cmd(0x9C, None, "9c f8 ff ff ff ff ff ff ff ff ff ff ff ff 00 04", "_write_atomic", _W),
    _cmd(0x9E, SA_READ_CAPACITY_16, "9e 10 ff ff ff ff ff ff ff ff ff ff ff ff 00 04",
         "_read_capacity_16", _A),
    _cmd(0x9E, SA_GET_LBA_STATUS, "9e 12 ff ff ff ff ff ff ff ff ff ff ff ff 00 04",
         "_get_lba_status", _R),
    _cmd(0xA0, None, "a0 00 ff 00 00 00 ff ff ff ff 00 04", "_report_luns", _A, spc2_ok=True,
         ua_exempt=True),
    _cmd(0xA3, SA_REPORT_SUPPORTED_OPCODES, "a3 0c 87 ff ff ff ff ff ff ff 00 04",
         "_report_opcodes", _A, spc2_ok=True),
    _cmd(0xA3, SA_REPORT_SUPPORTED_TMF, "a3 0d 80 00 00 00 ff ff ff ff 00 04",
         "_report_tmf", _A, spc2_ok=True),
    _cmd(0xA8, None, "a8 f8 ff ff ff ff ff ff ff ff 00 04", "_read", _R),
    _cmd(0xAA, None, "aa f8 ff ff ff ff ff ff ff ff 00 04", "_write", _W),
    _cmd(0xAE, None, "ae f6 ff ff ff ff ff ff ff ff 00 04", "_write_verify", _W),
    _cmd(0xAF, None, "af f6 ff ff ff ff ff ff ff ff 00 04", "_verify", _R),
    _cmd(0xB7, None, "b7 1f ff ff ff ff ff ff ff ff 00 04", "_read_defect_data", _R),
)
_WRITE_ATOMIC = Op.WRITE_ATOMIC_16

# EXTENDED COPY (LID1) limits reported by RECEIVE COPY RESULTS (SPC-3 §6.18.4).
XCOPY_MAX_TARGETS = 4
XCOPY_MAX_SEGMENTS = 8
XCOPY_MAX_DESCRIPTOR_LIST = 1024
XCOPY_MAX_SEGMENT_BYTES = 16 << 20
XCOPY_TARGET_IDENT = 0xE4
XCOPY_SEGMENT_BLOCK_TO_BLOCK = 0x02

IO_CHUNK_BYTES = 1 << 20
"""WRITE SAME, UNMAP emulation and EXTENDED COPY move data in pieces this big."""

GET_LBA_STATUS_SCAN_BYTES = 256 << 10
"""How far one GET LBA STATUS looks before it answers (the initiator asks
again from where the last descriptor ends)."""

GET_LBA_STATUS_NATIVE_SCAN_BYTES = 1 << 30
"""The same for backends with a native ``lba_status`` (SEEK_DATA/SEEK_HOLE
costs per extent, not per byte): far enough that a freshly sanitized or
unmapped LUN is described in one answer, as libiscsi's SANITIZE BLOCK ERASE
test requires."""


# ----------------------------------------------------------------------------- the LU

Handler = Callable[[bytes, Buffer, ItNexus], Awaitable[ScsiResult]]


class LogicalUnit:
    """One LUN: SPC/SBC commands over a backend, shared by every session.

    ``max_transfer_bytes`` is advertised in the Block Limits VPD page and
    enforced (5/24/00 above it), which also bounds how much a single command
    can make us allocate.  ``pr_state_path`` makes persistent reservations
    survive restarts (None keeps them in memory).  The physical block size
    defaults to the logical one: libiscsi's GET LBA STATUS tests assume one
    logical block per physical block.
    """

    def __init__(self, backend: BlockBackend, *, vendor: str = "STEELFUS",
                 product: str = "Edge LUN", revision: str = "0001",
                 max_transfer_bytes: int = 8 * 1024 * 1024, read_only: bool = False,
                 physical_block_size: int | None = None, thin_provisioning: bool = True,
                 atomic_write_max_bytes: int | None = None,
                 pr_state_path: str | os.PathLike[str] | None = None) -> None:
        self.backend = backend
        # Optional synchronous I/O for try_fast (edge.node.EdgeLun has them).
        self._read_now: Callable[[int, int], Buffer | None] | None = getattr(
            backend, "read_now", None)
        self._write_now: Callable[[int, Buffer], bool] | None = getattr(
            backend, "write_now", None)
        self._cancel_safe = bool(getattr(backend, "cancel_safe", False))
        self.block_size = bs = backend.block_size
        self.blocks = backend.size_bytes // bs
        self.read_only = read_only
        self.thin = thin_provisioning
        self.max_transfer_blocks = max(1, max_transfer_bytes // bs)
        self.physical_exponent = max(0, ((physical_block_size or bs) // bs).bit_length() - 1)
        atomic = atomic_write_max_bytes if atomic_write_max_bytes is not None \
            else int(getattr(backend, "atomic_write_max_bytes", 0) or 0)
        self.max_atomic_blocks = min(atomic // bs, self.max_transfer_blocks)
        self.limits = Limits(
            max_transfer=self.max_transfer_blocks,
            optimal_transfer=min(self.max_transfer_blocks, max(1, (1 << 20) // bs)),
            max_compare_and_write=max(1, min(255, (128 << 10) // bs)),
            max_unmap=self.max_transfer_blocks if self.thin else 0,
            max_unmap_descriptors=256 if self.thin else 0,
            max_write_same=self.max_transfer_blocks, max_prefetch=self.max_transfer_blocks,
            max_atomic=self.max_atomic_blocks,
            optimal_granularity=max(1, 4096 // bs))
        self.inquiry = build_standard_inquiry(vendor, product, revision, third_party_copy=True)
        self.vpd = build_vpd_pages(backend, vendor, self.max_transfer_blocks,
                                   self.limits.optimal_transfer, limits=self.limits,
                                   thin=self.thin)
        self.vendor = vendor
        self._log = log.get("scsi")
        table: dict[int, Command | dict[int, Command]] = {}
        for c in COMMANDS:
            if c.opcode == _WRITE_ATOMIC and not self.max_atomic_blocks:
                continue
            if c.opcode in (Op.UNMAP, Op.SERVICE_ACTION_IN_16) and not self.thin \
                    and c.sa != SA_READ_CAPACITY_16:
                continue
            if c.opcode == SANITIZE and not self.thin \
                    and c.sa in (SA_SANITIZE_BLOCK_ERASE, SA_SANITIZE_CRYPTO_ERASE):
                continue  # both deallocate: they need LBPME=1
            if c.sa is None:
                table[c.opcode] = c
            else:
                sub = table.setdefault(c.opcode, {})
                assert isinstance(sub, dict)
                sub[c.sa] = c
        self.commands = table
        self._handlers: dict[str, Handler] = {c.handler: getattr(self, c.handler)
                                              for c in COMMANDS}
        # shared state
        self.pages = dict(_MODE_DEFAULTS)
        self.pr = PersistentReservations()
        self.pr_path = Path(pr_state_path) if pr_state_path is not None else None
        self._pr_lock = asyncio.Lock()
        self._spc2_holder: int | None = None
        self._sessions: dict[int, _Session] = {}
        self.locks = RangeLock()
        self.on_abort: Callable[[LogicalUnit, set[str]], None] | None = None
        """Called by PREEMPT AND ABORT with the PR ids whose tasks must go."""
        self.copy_resolver: Callable[[bytes], LogicalUnit | None] | None = None
        """Finds a LU by NAA designator for EXTENDED COPY (default: this one)."""
        self._sanitize_task: asyncio.Task[None] | None = None
        self._sanitize_progress = 0  # of 65536 (SPC-4 §4.5.2.4.4)
        self._sanitize_failed = False
        if self.pr_path is not None:
            self._load_pr()

    # ------------------------------------------------------------------ sessions

    @property
    def pages(self) -> dict[int, bytes]:
        """Current mode pages (SPC-4 §7.5); setting them refreshes the cached
        WCE and SWP bits the write path reads."""
        return self._pages

    @pages.setter
    def pages(self, value: dict[int, bytes]) -> None:
        self._pages = value
        self._wce = bool(value[0x08][2] & 0x04)
        self._swp = bool(value[0x0A][4] & 0x08)

    @property
    def write_cache(self) -> bool:
        return self._wce

    @property
    def software_write_protect(self) -> bool:
        return self._swp

    def attach(self, nexus: ItNexus) -> None:
        """A session logged in with access to this LU (its I_T nexus exists)."""
        self._sessions[nexus.session_id] = _Session(nexus)

    def detach(self, nexus: ItNexus) -> None:
        """I_T nexus loss (logout, connection drop, reinstatement): its SPC-2
        reservation is released (SPC-2 §5.5.1); PR registrations stay."""
        st = self._sessions.get(nexus.session_id)
        if st is not None and st.nexus == nexus:
            del self._sessions[nexus.session_id]
        if self._spc2_holder == nexus.session_id:
            self._spc2_holder = None

    def establish_ua(self, asc: int, ascq: int, *, pr_ids: Iterable[str] | None = None,
                     except_session: int | None = None) -> None:
        """Queue a unit attention for every attached nexus (or those with the
        given PR ids), deduplicated and bounded (SAM-5 §5.14)."""
        wanted = set(pr_ids) if pr_ids is not None else None
        for sid, st in self._sessions.items():
            if sid == except_session:
                continue
            if wanted is not None and st.nexus.pr_id not in wanted:
                continue
            if (asc, ascq) in st.ua:
                continue
            if len(st.ua) >= UA_QUEUE_MAX:
                st.ua.popleft()
            st.ua.append((asc, ascq))

    def pending_ua(self, nexus: ItNexus) -> list[tuple[int, int]]:
        st = self._sessions.get(nexus.session_id)
        return list(st.ua) if st else []

    def reset(self, ua: tuple[int, int] = UA_BUS_DEVICE_RESET) -> None:
        """LOGICAL UNIT RESET / target reset (SAM-5 §6.6): SPC-2 reservation
        released, mode parameters back to defaults (nothing is saved), copy
        results dropped, a unit attention for every I_T nexus.  Persistent
        reservations are unaffected (SPC-4 §5.13.1)."""
        self._spc2_holder = None
        self.pages = dict(_MODE_DEFAULTS)
        for st in self._sessions.values():
            st.copies.clear()
        self.establish_ua(*ua)

    # ------------------------------------------------------------------ dispatch

    async def execute(self, cdb: bytes, data: Buffer = b"", lun_ids: Sequence[int] = (0,),
                      nexus: ItNexus = LOCAL_NEXUS) -> ScsiResult:
        """Run one command.  ``data`` is the Data-Out buffer, as received."""
        op = cdb[0]
        if op == Op.REPORT_LUNS:
            return report_luns(cdb, lun_ids)
        entry = self.commands.get(op)
        if entry is None:
            return ScsiResult(CHECK_CONDITION, sense=INVALID_OPCODE)
        if isinstance(entry, dict):
            cmd = entry.get(cdb[1] & 0x1F)
            if cmd is None:
                # field pointer 1: libiscsi reads it as "not supported"
                return ScsiResult(CHECK_CONDITION, sense=invalid_field(1).sense())
        else:
            cmd = entry
        if op not in SANITIZE_ALLOWED:
            if self.sanitizing:
                return ScsiResult(CHECK_CONDITION, sense=self._sanitize_sense())
            if self._sanitize_failed and op != SANITIZE:
                return check_condition(SenseKey.MEDIUM_ERROR, *SANITIZE_FAILED)
        if not cmd.ua_exempt:
            st = self._sessions.get(nexus.session_id)
            if st is not None and st.ua:
                asc, ascq = st.ua.popleft()
                return check_condition(SenseKey.UNIT_ATTENTION, asc, ascq)
        holder = self._spc2_holder
        if holder is not None and holder != nexus.session_id and not cmd.spc2_ok:
            return RESULT_CONFLICT
        if self.pr.type and not self.pr.allowed(nexus.pr_id, cmd.access):
            return RESULT_CONFLICT
        try:
            return await self._handlers[cmd.handler](cdb, data, nexus)
        except ScsiError as e:
            return ScsiResult(CHECK_CONDITION, sense=e.sense(), transfer_length=e.transfer_length)
        except ReservationConflict:
            return RESULT_CONFLICT
        except BackendNotReady as e:
            return check_condition(SenseKey.NOT_READY, 0x04, e.ascq)
        except Exception as e:
            self._log.warning("scsi_backend_error", opcode=op, error=repr(e))
            return check_condition(SenseKey.HARDWARE_ERROR, 0x44, 0x00)

    def try_fast(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult | None:
        """READ(10/16) or WRITE(10/16) finished without waiting, or None.

        The per-command path of a busy target: no coroutine, no generic
        checks.  It answers only when nothing special applies — no sanitize
        state, no unit attention for this nexus, no SPC-2 or persistent
        reservation, no protection bits, the range in bounds, a whole-block
        write without FUA, the range lock free — and the backend can do the
        I/O at once (``read_now``/``write_now``: a cache hit, room in the write
        reserve).  Everything else returns None and takes :meth:`execute`,
        which gives the same answer the long way.
        """
        op = cdb[0]
        if op == 0x28 or op == 0x2A:  # READ(10), WRITE(10)
            lba, blocks = _FAST10.unpack_from(cdb, 2)
        elif op == 0x88 or op == 0x8A:  # READ(16), WRITE(16)
            lba, blocks = _FAST16.unpack_from(cdb, 2)
        else:
            return None
        if (cdb[1] & 0xE0 or not blocks or self._sanitize_task is not None
                or self._sanitize_failed or self.pr.type
                or blocks > self.max_transfer_blocks or lba > self.blocks - blocks):
            return None
        holder = self._spc2_holder
        if holder is not None and holder != nexus.session_id:
            return None
        st = self._sessions.get(nexus.session_id)
        if st is not None and st.ua:
            return None
        bs = self.block_size
        if op & 0x02 == 0:  # a READ
            reader = self._read_now
            if reader is None:
                return None
            got = reader(lba * bs, blocks * bs)
            return None if got is None else ScsiResult(GOOD, got)
        n = blocks * bs
        writer = self._write_now
        if (writer is None or len(data) != n or cdb[1] & 0x08 or not self._wce
                or self.read_only or self._swp):
            return None
        # The write is done before this returns (no await), so nothing can take a
        # lock meanwhile: it only has to find no exclusive holder or waiter in the way.
        if not self.locks.shared_free(lba, lba + blocks) or not writer(lba * bs, data):
            return None
        return ScsiResult(GOOD, transfer_length=n)

    # ------------------------------------------------------------------ helpers

    def _transfer(self, cdb: bytes) -> tuple[int, int]:
        lba, blocks = parse_rw(cdb)
        if cdb[0] not in (Op.READ_6, Op.WRITE_6) and cdb[1] & 0xE0:
            raise invalid_field(1)  # RD/WR/VR/ORPROTECT: no protection information
        check_range(lba, blocks, self.blocks)
        if blocks > self.max_transfer_blocks:
            raise invalid_field(7 if cdb[0] < 0x60 else 6 if cdb[0] >= 0xA0 else 10)
        return lba, blocks

    def _check_writable(self, transfer_length: int | None = None) -> None:
        """DATA PROTECT (SBC-3 §4.11): 27/00 read-only LU, 27/02 SWP set."""
        if self.read_only:
            raise ScsiError(SenseKey.DATA_PROTECT, 0x27, 0x00, transfer_length=transfer_length)
        if self._swp:
            raise ScsiError(SenseKey.DATA_PROTECT, 0x27, 0x02, transfer_length=transfer_length)

    async def _land(self, io: Coroutine[Any, Any, Any]) -> Any:
        """Backend I/O that changes the medium under a range lock: carried
        :func:`to_the_end` unless the backend declares ``cancel_safe`` (its
        operations are done at once or not at all at every await, so a
        cancelled command leaves nothing to land later — the Edge's write
        either waits for reserve room with nothing done, or is appended)."""
        if self._cancel_safe:
            return await io
        return await to_the_end(io)

    async def _locked_write(self, lba: int, payload: bytes | memoryview, fua: bool, *,
                            exclusive: bool = False) -> None:
        end = lba + len(payload) // self.block_size
        locks = self.locks
        tok = locks.try_acquire(lba, end, exclusive)
        if tok is None:
            tok = await locks.acquire(lba, end, exclusive)
        try:
            await self._land(self.backend.write(lba * self.block_size, payload,
                                                fua or not self._wce))
        finally:
            locks.release(tok)

    async def _write_pattern(self, lba: int, blocks: int, block: bytes) -> None:
        """Write ``block`` to ``blocks`` consecutive blocks in chunks (caller
        holds the range lock)."""
        bs = self.block_size
        per = max(1, min(blocks, IO_CHUNK_BYTES // bs))
        chunk = block * per
        done = 0
        while done < blocks:
            n = min(per, blocks - done)
            await self._land(self.backend.write((lba + done) * bs, memoryview(chunk)[:n * bs],
                                                not self.write_cache))
            done += n

    async def _deallocate(self, lba: int, blocks: int) -> None:
        """Unmap (caller holds the range lock): natively, or by writing zeros,
        which keeps the LBPRZ promise on any backend.  The emulation reads
        first and writes zeros only over blocks that are not zero already,
        so a discard of a fresh LUN (mkfs does one) adds nothing to the
        Edge's write log or the replication stream."""
        if not blocks:
            return
        bs = self.block_size
        unmap = getattr(self.backend, "unmap", None)
        if unmap is not None:
            await self._land(unmap(lba * bs, blocks * bs))
            return
        per = max(1, IO_CHUNK_BYTES // bs)
        zeros = bytes(min(blocks, per) * bs)
        for off in range(0, blocks, per):
            n = min(per, blocks - off)
            raw = await self.backend.read((lba + off) * bs, n * bs)
            used = np.asarray(np.frombuffer(memoryview(raw), dtype=np.uint8).reshape(
                n, bs).any(axis=1))
            for start, count, dirty in _runs(used):
                if dirty:
                    await self._land(self.backend.write(
                        (lba + off + start) * bs, memoryview(zeros)[:count * bs], not self._wce))

    def _data_out(self, data: Buffer, needed: int) -> Buffer:
        """The Data-Out bytes the command uses.  Less than the CDB asks for:
        5/0E/03 (INVALID FIELD IN COMMAND INFORMATION UNIT, as FCP-4 and
        libiscsi's residual tests expect); more: the surplus is ignored and
        reported as underflow by the transport."""
        if len(data) < needed:
            raise ScsiError(SenseKey.ILLEGAL_REQUEST, 0x0E, 0x03, transfer_length=needed)
        return data if len(data) == needed else memoryview(data)[:needed]

    # ------------------------------------------------------------------ reads and writes

    async def _read(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        lba, blocks = self._transfer(cdb)
        if not blocks:
            return RESULT_GOOD
        bs = self.block_size
        return ScsiResult(GOOD, await self.backend.read(lba * bs, blocks * bs))

    def _arrived_blocks(self, cdb: bytes, data: Buffer
                        ) -> tuple[int, int, int, bytes | memoryview]:
        """(lba, blocks to write, bytes the CDB asked for, payload).

        When the initiator sends fewer bytes than the CDB asks for (iSCSI
        EDTL < transfer length), FCP-4 §9.4.2 lets us either write only what
        arrived or refuse: we write the whole blocks that arrived and report
        the overflow (what libiscsi 1.19's residual tests require), and refuse
        with 5/0E/03 when a block would be partial."""
        lba, blocks = self._transfer(cdb)
        bs = self.block_size
        needed = blocks * bs
        if len(data) < needed:
            if len(data) % bs:
                raise ScsiError(SenseKey.ILLEGAL_REQUEST, 0x0E, 0x03, transfer_length=needed)
            blocks = len(data) // bs
        n = blocks * bs
        payload = data if isinstance(data, bytes | memoryview) and len(data) == n \
            else memoryview(data)[:n]
        return lba, blocks, needed, payload

    async def _write(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        """WRITE(6/10/12/16), SBC-3 §5.32-§5.35; FUA makes it durable first."""
        lba, blocks, needed, payload = self._arrived_blocks(cdb, data)
        if self.read_only or self._swp:
            self._check_writable(needed)
        if blocks:
            # The hot path: the shared range lock inline (no extra coroutine).
            fua = (cdb[0] != Op.WRITE_6 and bool(cdb[1] & 0x08)) or not self._wce
            locks = self.locks
            tok = locks.try_acquire(lba, lba + blocks)
            if tok is None:
                tok = await locks.acquire(lba, lba + blocks)
            try:
                io = self.backend.write(lba * self.block_size, payload, fua)
                if self._cancel_safe:
                    await io
                else:
                    # to_the_end inline: a write that never waits costs no more.
                    try:
                        yielded = io.send(None)
                    except StopIteration:
                        pass
                    else:
                        await _finish(io, yielded)
            finally:
                locks.release(tok)
        return ScsiResult(GOOD, transfer_length=needed)

    async def _write_verify(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        """WRITE AND VERIFY(10/12/16), SBC-3 §5.37-§5.39: write, then with
        BYTCHK=1 read back and compare (MISCOMPARE E/1D/00 on a difference);
        with BYTCHK=0 the medium check is the read itself."""
        bytchk = (cdb[1] >> 1) & 3
        if bytchk > 1:
            raise invalid_field(1)
        lba, blocks, needed, payload = self._arrived_blocks(cdb, data)
        self._check_writable(needed)
        if blocks:
            bs = self.block_size
            tok = await self.locks.acquire(lba, lba + blocks, True)
            try:
                await self._land(self.backend.write(lba * bs, payload, True))
                back = await self.backend.read(lba * bs, blocks * bs)
            finally:
                self.locks.release(tok)
            if bytchk and bytes(back) != bytes(payload):
                off = _first_difference(back, payload)
                raise ScsiError(SenseKey.MISCOMPARE, 0x1D, 0x00, information=off,
                                transfer_length=needed)
        return ScsiResult(GOOD, transfer_length=needed)

    async def _verify(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        """VERIFY(10/12/16), SBC-3 §5.33: BYTCHK=0 checks the medium only
        (always fine here); 01b compares the Data-Out with the medium, 11b
        compares one block against every block; a mismatch is MISCOMPARE
        E/1D/00 with INFORMATION = offset of the first differing byte."""
        lba, blocks = self._transfer(cdb)
        bytchk = (cdb[1] >> 1) & 3
        if bytchk == 0:
            return ScsiResult(GOOD, transfer_length=0)
        if bytchk == 2:
            raise invalid_field(1)
        bs = self.block_size
        needed = blocks * bs if bytchk == 1 else (bs if blocks else 0)
        expect = self._data_out(data, needed)
        if not blocks:
            return ScsiResult(GOOD, transfer_length=needed)
        medium = memoryview(await self.backend.read(lba * bs, blocks * bs))
        exp = memoryview(expect)
        for i in range(blocks):
            got = medium[i * bs:(i + 1) * bs]
            want = exp[i * bs:(i + 1) * bs] if bytchk == 1 else exp[:bs]
            if got != want:
                raise ScsiError(SenseKey.MISCOMPARE, 0x1D, 0x00,
                                information=i * bs + _first_difference(got, want),
                                transfer_length=needed)
        return ScsiResult(GOOD, transfer_length=needed)

    async def _orwrite(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        """ORWRITE(16), SBC-3 §5.10: medium := medium OR data, atomically."""
        lba, blocks, needed, payload = self._arrived_blocks(cdb, data)
        self._check_writable(needed)
        if blocks:
            bs = self.block_size
            tok = await self.locks.acquire(lba, lba + blocks, True)
            try:
                old = await self.backend.read(lba * bs, blocks * bs)
                new = np.bitwise_or(np.frombuffer(memoryview(old), dtype=np.uint8),
                                    np.frombuffer(memoryview(payload), dtype=np.uint8))
                await self._land(self.backend.write(
                    lba * bs, new.tobytes(), bool(cdb[1] & 0x08) or not self.write_cache))
            finally:
                self.locks.release(tok)
        return ScsiResult(GOOD, transfer_length=needed)

    async def _compare_and_write(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        """COMPARE AND WRITE, SBC-3 §5.2: the Data-Out is n blocks to compare
        then n blocks to write; the compare and the write are atomic with
        respect to every other write (ESXi's ATS relies on it).  A mismatch
        is MISCOMPARE E/1D/00, INFORMATION = offset of the first difference,
        and nothing is written."""
        if cdb[1] & 0xE0:
            raise invalid_field(1)
        lba = _u64(cdb, 2)
        n = cdb[13]
        bs = self.block_size
        if n > self.limits.max_compare_and_write:
            raise invalid_field(13)
        check_range(lba, n, self.blocks)
        if len(data) != 2 * n * bs:
            raise ScsiError(SenseKey.ILLEGAL_REQUEST, 0x24, 0x00, field_pointer=13,
                            transfer_length=2 * n * bs)
        self._check_writable(2 * n * bs)
        if not n:
            return ScsiResult(GOOD, transfer_length=0)
        mv = memoryview(data)
        tok = await self.locks.acquire(lba, lba + n, True)
        try:
            medium = await self.backend.read(lba * bs, n * bs)
            if bytes(medium) != bytes(mv[:n * bs]):
                raise ScsiError(SenseKey.MISCOMPARE, 0x1D, 0x00,
                                information=_first_difference(medium, mv[:n * bs]))
            await self._land(self.backend.write(
                lba * bs, mv[n * bs:], bool(cdb[1] & 0x08) or not self.write_cache))
        finally:
            self.locks.release(tok)
        return ScsiResult(GOOD, transfer_length=2 * n * bs)

    async def _write_atomic(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        """WRITE ATOMIC(16), SBC-4 §5.48: all or nothing, also across a crash,
        up to MAXIMUM ATOMIC TRANSFER LENGTH (the backend's atomic unit); no
        ATOMIC BOUNDARY support."""
        if _u16(cdb, 10):
            raise invalid_field(10)  # ATOMIC BOUNDARY
        lba, blocks = parse_rw(cdb)
        if cdb[1] & 0xE0:
            raise invalid_field(1)
        check_range(lba, blocks, self.blocks)
        if blocks > self.max_atomic_blocks:
            raise invalid_field(12)
        bs = self.block_size
        needed = blocks * bs
        payload = self._data_out(data, needed)
        self._check_writable(needed)
        if blocks:
            await self._locked_write(lba, memoryview(payload), bool(cdb[1] & 0x08),
                                     exclusive=True)
        return ScsiResult(GOOD, transfer_length=needed)

    async def _write_same(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        """WRITE SAME(10/16), SBC-3 §5.41-§5.42: one block repeated; NUMBER OF
        LOGICAL BLOCKS 0 means "to the end" (WSNZ=0); with UNMAP the range is
        deallocated whatever the block holds (SBC-3 §4.7.3.4.3; it then reads
        as zeros, LBPRZ);
        NDOB (16 only) means a zero block without Data-Out; ANCHOR is not
        supported (ANC_SUP=0)."""
        flags = cdb[1]
        sixteen = cdb[0] == Op.WRITE_SAME_16
        if flags & 0xE0 or flags & 0x10 or (not sixteen and flags & 0x01):
            raise invalid_field(1)  # WRPROTECT, ANCHOR, bit 0 of (10)
        lba, blocks = parse_rw(cdb)
        unmap = bool(flags & 0x08)
        ndob = sixteen and bool(flags & 0x01)
        if unmap and not self.thin:
            raise invalid_field(1)
        if blocks == 0:
            if lba > self.blocks:
                raise lba_out_of_range()
            blocks = self.blocks - lba
        check_range(lba, blocks, self.blocks)
        if blocks > self.limits.max_write_same:
            raise invalid_field(10 if sixteen else 7)
        bs = self.block_size
        if ndob:
            if data:
                raise ScsiError(SenseKey.ILLEGAL_REQUEST, 0x24, 0x00, field_pointer=1)
            block = bytes(bs)
        else:
            if len(data) != bs:
                if len(data) < bs:
                    raise ScsiError(SenseKey.ILLEGAL_REQUEST, 0x0E, 0x03, transfer_length=bs)
                raise invalid_field(10 if sixteen else 7)
            block = bytes(data)
        self._check_writable(len(data))
        if blocks:
            tok = await self.locks.acquire(lba, lba + blocks, True)
            try:
                if unmap:
                    await self._deallocate(lba, blocks)
                else:
                    await self._write_pattern(lba, blocks, block)
            finally:
                self.locks.release(tok)
        return ScsiResult(GOOD, transfer_length=len(data))

    async def _unmap(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        """UNMAP, SBC-3 §5.28: a list of (LBA, count) descriptors, checked in
        full before anything is deallocated."""
        if cdb[1] & 0x01:
            raise invalid_field(1)  # ANCHOR, ANC_SUP=0
        plen = _u16(cdb, 7)
        if plen == 0:
            return RESULT_GOOD
        if plen < 8:
            raise param_list_length_error()
        d = self._data_out(data, plen)
        bdl = _u16(d, 2)
        count = min(bdl, plen - 8) // 16
        if count > self.limits.max_unmap_descriptors:
            raise invalid_param(2)
        ranges = []
        total = 0
        for i in range(count):
            off = 8 + 16 * i
            lba, n = _u64(d, off), _u32(d, off + 8)
            check_range(lba, n, self.blocks)
            total += n
            if total > self.limits.max_unmap:
                raise invalid_param(off + 8)
            if n:
                ranges.append((lba, n))
        self._check_writable(plen)
        for lba, n in ranges:
            tok = await self.locks.acquire(lba, lba + n, True)
            try:
                await self._deallocate(lba, n)
            finally:
                self.locks.release(tok)
        return ScsiResult(GOOD, transfer_length=plen)

    async def _get_lba_status(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        """GET LBA STATUS, SBC-3 §5.8: descriptors from the starting LBA on,
        mapped (0) or deallocated (1); backends without ``lba_status`` are
        read and an all-zero block counts as deallocated (LBPRZ=1)."""
        lba = _u64(cdb, 2)
        alloc = _u32(cdb, 10)
        if lba >= self.blocks:
            raise lba_out_of_range()
        bs = self.block_size
        scan = GET_LBA_STATUS_NATIVE_SCAN_BYTES if hasattr(self.backend, "lba_status") \
            else GET_LBA_STATUS_SCAN_BYTES
        span = min(self.blocks - lba, max(1, scan // bs))
        extents = await self._lba_extents(lba, span)
        room = max(1, (alloc - 8) // 16) if alloc >= 24 else 1
        desc = b"".join(struct.pack(">QIB3x", s, n, 0 if mapped else 1)
                        for s, n, mapped in extents[:room])
        out = (len(desc) + 4).to_bytes(4, "big") + bytes(4) + desc
        return ScsiResult(GOOD, allocation(out, alloc))

    async def _lba_extents(self, lba: int, blocks: int) -> list[tuple[int, int, bool]]:
        bs = self.block_size
        native = getattr(self.backend, "lba_status", None)
        if native is not None:
            got = await native(lba * bs, blocks * bs)
            return _merge([(o // bs, max(1, n // bs), m) for o, n, m in got])
        raw = await self.backend.read(lba * bs, blocks * bs)
        used = np.asarray(np.frombuffer(memoryview(raw), dtype=np.uint8).reshape(
            blocks, bs).any(axis=1))
        return [(lba + s, n, m) for s, n, m in _runs(used)]

    async def _sync_cache(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        """SYNCHRONIZE CACHE(10/16), SBC-3 §5.22-§5.23 (IMMED treated as 0)."""
        lba, blocks = parse_rw(cdb)
        check_range(lba, blocks, self.blocks)
        await self.backend.flush()
        return RESULT_GOOD

    async def _prefetch(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        """PRE-FETCH(10/16), SBC-3 §5.11-§5.12: advisory, so GOOD (not
        CONDITION MET: we promise nothing about the cache) even when the
        read-ahead fails; IMMED returns before reading."""
        lba, blocks = parse_rw(cdb)
        check_range(lba, blocks, self.blocks)
        if blocks > self.limits.max_prefetch:
            raise invalid_field(7 if cdb[0] < 0x60 else 10)
        if blocks and not cdb[1] & 0x02:
            bs = self.block_size
            hook = getattr(self.backend, "prefetch", None)
            with contextlib.suppress(Exception):
                if hook is not None:
                    await hook(lba * bs, blocks * bs)
                else:
                    await self.backend.read(lba * bs, blocks * bs)
        return RESULT_GOOD

    # ------------------------------------------------------------------ SANITIZE

    @property
    def sanitizing(self) -> bool:
        """A sanitize operation is in progress (SBC-3 §4.11)."""
        return self._sanitize_task is not None and not self._sanitize_task.done()

    def _sanitize_sense(self) -> bytes:
        """NOT READY, SANITIZE IN PROGRESS with the PROGRESS INDICATION in
        the sense-key specific bytes (SKSV=1, SPC-4 §4.5.2.4.4)."""
        b = bytearray(fixed_sense(SenseKey.NOT_READY, *SANITIZE_IN_PROGRESS))
        b[15] = 0x80
        b[16:18] = min(self._sanitize_progress, 0xFFFF).to_bytes(2, "big")
        return bytes(b)

    def parse_sanitize(self, cdb: bytes, data: Buffer) -> tuple[int, bytes, int, bool]:
        """Check a SANITIZE CDB and parameter list (SBC-3 §5.30); returns
        (service action, pattern block, overwrite count, invert).

        Every field error is 5/24/00, as SBC-3 §5.30.2 and libiscsi want:
        reserved CDB bits or bytes, a PARAMETER LIST LENGTH other than 0
        (BLOCK ERASE, CRYPTO ERASE, EXIT FAILURE MODE) or outside 5..block
        length + 4 (OVERWRITE), OVERWRITE COUNT 0, INITIALIZATION PATTERN
        LENGTH 0 or above the block length.  A pattern longer than the list
        that should hold it is 5/1A/00, a reserved parameter byte or TEST
        value 5/26/00, fewer Data-Out bytes than the list length 5/0E/03."""
        if cdb[1] & 0x40:
            raise invalid_field(1)
        for i in range(2, 7):
            if cdb[i]:
                raise invalid_field(i)
        sa = cdb[1] & 0x1F
        plen = _u16(cdb, 7)
        bs = self.block_size
        if sa != SA_SANITIZE_OVERWRITE:
            if plen:
                raise invalid_field(7)
            return sa, b"", 0, False
        if not 4 < plen <= bs + 4:
            raise invalid_field(7)
        d = bytes(self._data_out(data, plen))
        count = d[0] & 0x1F
        ipl = _u16(d, 2)
        if not count or not 0 < ipl <= bs:
            raise invalid_field()
        if d[0] & 0x60:
            raise invalid_param(0)  # TEST: only 00b (normal) is defined for us
        if d[1]:
            raise invalid_param(1)
        if ipl > plen - 4:
            raise param_list_length_error()
        pattern = d[4:4 + ipl]
        block = (pattern * -(-bs // ipl))[:bs]
        return sa, block, count, bool(d[0] & 0x80)

    async def _sanitize(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        """SANITIZE, SBC-3 §5.30.  OVERWRITE writes the pattern to every
        block COUNT times (inverted between passes with INVERT); BLOCK and
        CRYPTO ERASE deallocate every block (we keep no media key, so a
        crypto erase is a deallocation too; reads then return zeros:
        WABEREQ = WACEREQ = 01b); EXIT FAILURE MODE leaves the failed state
        a failed sanitize leaves behind (SANITIZE COMMAND FAILED, 3/31/03).

        The operation runs in a task the LU owns, so ABORT TASK, resets and
        a dropped connection do not stop it (SBC-3 §4.11.1; libiscsi's
        Sanitize.Reset checks it is still in progress after all of them):
        cancelling an IMMED=0 SANITIZE command only ends the command.  If
        the operation itself is stopped part way, the LU is left in the
        sanitize-failed state (3/31/03).  Meanwhile other
        commands but INQUIRY, REPORT LUNS and REQUEST SENSE get 2/04/1B with
        the progress.  IMMED=0 waits for the end, IMMED=1 returns at once."""
        sa, block, count, invert = self.parse_sanitize(cdb, data)
        plen = _u16(cdb, 7)
        if sa == SA_SANITIZE_EXIT_FAILURE_MODE:
            self._sanitize_failed = False
            return ScsiResult(GOOD, transfer_length=plen)
        self._check_writable(plen or None)
        self._sanitize_progress = 0
        task = asyncio.get_running_loop().create_task(
            self._run_sanitize(sa, block, count, invert))
        self._sanitize_task = task
        if cdb[1] & 0x80:
            return ScsiResult(GOOD, transfer_length=plen)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # This command was aborted (ABORT TASK, a reset): the operation
            # goes on and other commands keep seeing its progress.  Only an
            # operation that was itself stopped is reported, as failed.
            me = asyncio.current_task()
            if not task.cancelled() or (me is not None and me.cancelling()):
                raise
        if self._sanitize_failed:
            return check_condition(SenseKey.MEDIUM_ERROR, *SANITIZE_FAILED)
        return ScsiResult(GOOD, transfer_length=plen)

    async def _run_sanitize(self, sa: int, block: bytes, count: int, invert: bool) -> None:
        total = self.blocks
        per = max(1, IO_CHUNK_BYTES // self.block_size)
        passes = count if sa == SA_SANITIZE_OVERWRITE else 1
        inverted = bytes(b ^ 0xFF for b in block)
        tok = await self.locks.acquire(0, total, True)
        try:
            for p in range(passes):
                pattern = inverted if invert and p % 2 else block
                for lba in range(0, total, per):
                    n = min(per, total - lba)
                    if sa == SA_SANITIZE_OVERWRITE:
                        await self._write_pattern(lba, n, pattern)
                    else:
                        await self._deallocate(lba, n)
                    done = p * total + lba + n
                    self._sanitize_progress = done * 0x10000 // (passes * total)
            await self.backend.flush()
            self._sanitize_failed = False
        except Exception as e:
            self._sanitize_failed = True
            self._log.warning("scsi_sanitize_failed", service_action=sa, error=repr(e))
        except asyncio.CancelledError:
            # Stopped part way (the loop is shutting down): the medium is
            # neither what it was nor sanitized, so media access gets
            # 3/31/03 until a SANITIZE completes or EXIT FAILURE MODE.
            self._sanitize_failed = True
            self._log.warning("scsi_sanitize_failed", service_action=sa, error="cancelled")
            raise
        finally:
            self.locks.release(tok)

    # ------------------------------------------------------------------ unit state

    async def _tur(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        return RESULT_GOOD

    async def _start_stop(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        """START STOP UNIT, SBC-3 §5.25: the medium is not removable and never
        spins down, so it only checks fields and, when stopping without
        NO_FLUSH, flushes the write cache."""
        pc = cdb[4] >> 4
        if pc not in (0x0, 0x1, 0x2, 0x3, 0x7, 0xA, 0xB):
            raise invalid_field(4)
        if pc == 0 and not cdb[4] & 0x01 and not cdb[4] & 0x04:
            await self.backend.flush()
        return RESULT_GOOD

    async def _prevent_allow(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        """PREVENT ALLOW MEDIUM REMOVAL, SBC-3 §5.13: nothing to lock on a
        non-removable medium."""
        if cdb[4] & 0x03 > 1:
            raise invalid_field(4)
        return RESULT_GOOD

    async def _read_defect_data(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        """READ DEFECT DATA(10/12), SBC-3 §5.17-§5.18: empty lists."""
        twelve = cdb[0] == Op.READ_DEFECT_DATA_12
        flags = (cdb[1] if twelve else cdb[2]) & 0x1F
        alloc = _u32(cdb, 6) if twelve else _u16(cdb, 7)
        hdr = bytes((0, flags)) + bytes(6 if twelve else 2)
        return ScsiResult(GOOD, allocation(hdr, alloc))

    async def _inquiry(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        return ScsiResult(GOOD, inquiry(cdb, self.inquiry, self.vpd))

    async def _read_capacity_10(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        if not cdb[8] & 1 and _u32(cdb, 2):
            raise invalid_field(2)  # LBA must be 0 when PMI=0 (SBC-3 §5.15.1)
        return ScsiResult(GOOD, build_read_capacity_10(self.blocks, self.block_size))

    async def _read_capacity_16(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        rc = build_read_capacity_16(self.blocks, self.block_size, self.physical_exponent,
                                    self.thin)
        return ScsiResult(GOOD, allocation(rc, _u32(cdb, 10)))

    async def _request_sense(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        """REQUEST SENSE, SPC-4 §6.39: the sanitize progress while one runs,
        else reports (and clears) a pending unit attention, else NO SENSE."""
        st = self._sessions.get(nexus.session_id)
        sense = None
        if self.sanitizing:
            sense = self._sanitize_sense()
        elif self._sanitize_failed:
            sense = fixed_sense(SenseKey.MEDIUM_ERROR, *SANITIZE_FAILED)
        elif st is not None and st.ua:
            asc, ascq = st.ua.popleft()
            sense = fixed_sense(SenseKey.UNIT_ATTENTION, asc, ascq)
        return ScsiResult(GOOD, allocation(build_request_sense(bool(cdb[1] & 1), sense), cdb[4]))

    async def _report_luns(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        return report_luns(cdb, (0,))  # pragma: no cover - answered before dispatch

    # ------------------------------------------------------------------ mode pages

    def _read_only_now(self) -> bool:
        return self.read_only or self.software_write_protect

    async def _mode_sense(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        alloc = cdb[4] if cdb[0] == Op.MODE_SENSE_6 else _u16(cdb, 7)
        page = build_mode_sense(cdb, self.blocks, self.block_size, self._read_only_now(),
                                self.pages)
        return ScsiResult(GOOD, allocation(page, alloc))

    async def _mode_select(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        """MODE SELECT(6)/(10), SPC-4 §6.9-§6.10: pages we report, changing
        only changeable bits (caching WCE, control SWP); everything else must
        equal the current value.  Other nexuses get MODE PARAMETERS CHANGED."""
        ten = cdb[0] == Op.MODE_SELECT_10
        if cdb[1] & 0x01:
            raise invalid_field(1)  # SP: saving pages not supported
        plen = _u16(cdb, 7) if ten else cdb[4]
        if plen == 0:
            return RESULT_GOOD
        d = bytes(self._data_out(data, plen))
        hlen = 8 if ten else 4
        if len(d) < hlen:
            raise param_list_length_error()
        bdl = _u16(d, 6) if ten else d[3]
        long_lba = ten and bool(d[4] & 0x01)
        pos = hlen
        if bdl:
            want = 16 if long_lba else 8
            if bdl != want or pos + bdl > len(d):
                raise param_list_length_error() if pos + bdl > len(d) else invalid_param(
                    6 if ten else 3)
            blen = _u32(d, pos + 12) if long_lba else int.from_bytes(d[pos + 5:pos + 8], "big")
            if blen != self.block_size:
                raise invalid_param(pos + (12 if long_lba else 5))
            pos += bdl
        new = dict(self.pages)
        while pos < len(d):
            if pos + 2 > len(d):
                raise param_list_length_error()
            code = d[pos] & 0x3F
            if d[pos] & 0x40 or code not in new:
                raise invalid_param(pos)
            length = d[pos + 1] + 2
            cur = new[code]
            if length != len(cur):
                raise invalid_param(pos + 1)
            if pos + length > len(d):
                raise param_list_length_error()
            page = d[pos:pos + length]
            mask = _MODE_CHANGEABLE[code]
            for i in range(2, length):
                if (page[i] ^ cur[i]) & ~mask[i] & 0xFF:
                    raise invalid_param(pos + i)
            new[code] = bytes((cur[0], cur[1])) + page[2:]
            pos += length
        if new != self.pages:
            self.pages = new
            self.establish_ua(*UA_MODE_PARAMETERS_CHANGED, except_session=nexus.session_id)
        return ScsiResult(GOOD, transfer_length=plen)

    # ------------------------------------------------------------------ reservations

    async def _reserve(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        """RESERVE(6)/(10), SPC-2 §7.21-§7.22: the whole LU for this I_T
        nexus; third-party and extent reservations are not supported; any
        persistent registration makes it a conflict (SPC-4 §5.13.3)."""
        if cdb[0] == Op.RESERVE_10 and cdb[1] & 0x12:
            raise invalid_field(1)
        if cdb[0] == Op.RESERVE_6 and cdb[1] & 0x01:
            raise invalid_field(1)
        if self.pr.registrations or self.pr.type:
            raise ReservationConflict()
        holder = self._spc2_holder
        if holder is not None and holder != nexus.session_id:
            raise ReservationConflict()
        self._spc2_holder = nexus.session_id
        return RESULT_GOOD

    async def _release(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        """RELEASE(6)/(10), SPC-2 §7.16-§7.17: a no-op unless we hold it."""
        if cdb[0] == Op.RELEASE_10 and cdb[1] & 0x12:
            raise invalid_field(1)
        if self.pr.registrations or self.pr.type:
            raise ReservationConflict()
        if self._spc2_holder == nexus.session_id:
            self._spc2_holder = None
        return RESULT_GOOD

    async def _persistent_reserve_in(self, cdb: bytes, data: Buffer,
                                     nexus: ItNexus) -> ScsiResult:
        """PERSISTENT RESERVE IN, SPC-4 §6.15: READ KEYS, READ RESERVATION,
        REPORT CAPABILITIES, READ FULL STATUS."""
        sa = cdb[1] & 0x1F
        alloc = _u16(cdb, 7)
        pr = self.pr
        out = (pr.read_keys, pr.read_reservation, pr.report_capabilities,
               pr.read_full_status)[sa]()
        return ScsiResult(GOOD, allocation(out, alloc))

    async def _persistent_reserve_out(self, cdb: bytes, data: Buffer,
                                      nexus: ItNexus) -> ScsiResult:
        """PERSISTENT RESERVE OUT, SPC-4 §6.16: the change is written to the
        state file (atomic replace) before GOOD; unit attentions follow
        SPC-4 §5.13.11; PREEMPT AND ABORT aborts the preempted nexuses' tasks."""
        sa = cdb[1] & 0x1F
        plen = _u32(cdb, 5)
        if plen != 24:
            raise param_list_length_error()
        if len(data) < plen:
            raise ScsiError(SenseKey.ILLEGAL_REQUEST, 0x0E, 0x03, transfer_length=plen)
        try:
            params = ProutParams.decode(memoryview(data)[:plen])
        except PrError as e:
            raise _pr_sense(e) from None
        async with self._pr_lock:
            before = self.pr.to_bytes()
            try:
                outcome = self.pr.out(sa, nexus.pr_id, params, scope=cdb[2] >> 4,
                                      pr_type=cdb[2] & 0x0F)
            except PrError as e:
                if e.conflict:
                    raise ReservationConflict() from None
                raise _pr_sense(e) from None
            if outcome.changed and self.pr_path is not None:
                try:
                    await asyncio.to_thread(self._save_pr, self.pr.to_bytes())
                except Exception as e:
                    self.pr = PersistentReservations.from_bytes(before)
                    self._log.error("scsi_pr_persist_failed", path=str(self.pr_path),
                                    error=repr(e))
                    raise ScsiError(SenseKey.HARDWARE_ERROR, 0x44, 0x00) from None
        for pr_id, asc, ascq in outcome.unit_attentions:
            self.establish_ua(asc, ascq, pr_ids=(pr_id,))
        if outcome.abort and self.on_abort is not None:
            self.on_abort(self, outcome.abort)
        return ScsiResult(GOOD, transfer_length=plen)

    def _save_pr(self, blob: bytes) -> None:
        assert self.pr_path is not None
        self.pr_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.pr_path, blob, mode=0o600)

    def _load_pr(self) -> None:
        assert self.pr_path is not None
        try:
            blob = self.pr_path.read_bytes()
        except FileNotFoundError:
            return
        try:
            self.pr = PersistentReservations.from_bytes(blob)
        except (ValueError, KeyError, TypeError) as e:
            # Refuse to guess: an unreadable PR file must not silently drop
            # a cluster's reservations.
            from steelfusion.statefile import StateFileError

            raise StateFileError(self.pr_path, f"unreadable persistent-reservation state: {e}",
                                 "restore it from a backup, or move it away: the LU then "
                                 "starts with no reservations and the hosts must register "
                                 "again") from e

    # ------------------------------------------------------------------ REPORT SUPPORTED ...

    def _supported(self) -> list[Command]:
        out: list[Command] = []
        for entry in self.commands.values():
            if isinstance(entry, dict):
                out.extend(entry.values())
            else:
                out.append(entry)
        return sorted(out, key=lambda c: (c.opcode, c.sa or 0))

    async def _report_opcodes(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        """REPORT SUPPORTED OPERATION CODES, SPC-4 §6.35: all commands, or one
        (by opcode, or opcode and service action), optionally with command
        timeouts descriptors (RCTD)."""
        rctd = bool(cdb[2] & 0x80)
        options = cdb[2] & 0x07
        alloc = _u32(cdb, 6)
        timeout = bytes((0x00, 0x0A, 0x00, 0x00)) + bytes(8) if rctd else b""
        if options == 0:
            body = b"".join(
                bytes((c.opcode, 0)) + (c.sa or 0).to_bytes(2, "big")
                + bytes((0, (0x02 if rctd else 0) | (0x01 if c.sa is not None else 0)))
                + len(c.usage).to_bytes(2, "big") + timeout
                for c in self._supported())
            return ScsiResult(GOOD, allocation(len(body).to_bytes(4, "big") + body, alloc))
        if options not in (1, 2, 3):
            raise invalid_field(2)
        entry = self.commands.get(cdb[3])
        has_sa = isinstance(entry, dict)
        if (options == 1 and has_sa) or (options == 2 and entry is not None and not has_sa):
            raise invalid_field(2)
        cmd: Command | None
        if isinstance(entry, dict):
            cmd = entry.get(_u16(cdb, 4)) if _u16(cdb, 4) <= 0x1F else None
        else:
            cmd = entry
        if cmd is None:
            out = bytes((0, 0x01, 0, 0))  # SUPPORT 001b: not supported
        else:
            out = bytes((0, (0x80 if rctd else 0) | 0x03)) + len(cmd.usage).to_bytes(2, "big") \
                + cmd.usage + timeout
        return ScsiResult(GOOD, allocation(out, alloc))

    async def _report_tmf(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        """REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS, SPC-4 §6.36: ABORT TASK,
        ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET, TARGET RESET."""
        alloc = _u32(cdb, 6)
        if alloc < 4:
            raise invalid_field(6)
        out = bytes((0xDA, 0, 0, 0))
        if cdb[2] & 0x80:  # REPD: extended format
            out = bytes((0xDA, 0, 0, 0x0C)) + bytes(12)
        return ScsiResult(GOOD, allocation(out, alloc))

    # ------------------------------------------------------------------ EXTENDED COPY

    async def _receive_copy_results(self, cdb: bytes, data: Buffer,
                                    nexus: ItNexus) -> ScsiResult:
        """RECEIVE COPY RESULTS, SPC-3 §6.18: COPY STATUS of a held list
        identifier of this I_T nexus, or OPERATING PARAMETERS."""
        sa = cdb[1] & 0x1F
        alloc = _u32(cdb, 10)
        if sa == SA_COPY_OPERATING_PARAMETERS:
            bs = self.block_size
            p = bytearray(44)
            p[4] = 0x01  # SNLID
            p[8:10] = XCOPY_MAX_TARGETS.to_bytes(2, "big")
            p[10:12] = XCOPY_MAX_SEGMENTS.to_bytes(2, "big")
            p[12:16] = XCOPY_MAX_DESCRIPTOR_LIST.to_bytes(4, "big")
            p[16:20] = XCOPY_MAX_SEGMENT_BYTES.to_bytes(4, "big")
            p[34:36] = (1).to_bytes(2, "big")  # TOTAL CONCURRENT COPIES
            p[36] = 1  # MAXIMUM CONCURRENT COPIES
            p[37] = bs.bit_length() - 1  # DATA SEGMENT GRANULARITY (log2)
            p[43] = 2
            p += bytes((XCOPY_SEGMENT_BLOCK_TO_BLOCK, XCOPY_TARGET_IDENT))
            p[0:4] = (len(p) - 4).to_bytes(4, "big")
            return ScsiResult(GOOD, allocation(bytes(p), alloc))
        st = self._sessions.get(nexus.session_id)
        status = st.copies.get(cdb[2]) if st is not None else None
        if status is None:
            raise invalid_field(2)  # no such held list identifier
        return ScsiResult(GOOD, allocation(status, alloc))

    async def _extended_copy(self, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
        """EXTENDED COPY (LID1), SPC-3 §6.3: identification-descriptor targets
        (0xE4) naming our LUs by NAA, block-to-block segments (0x02), copied
        by the target in 1 MiB pieces under an exclusive lock on the
        destination.  Errors while copying are COPY ABORTED (SPC-3 §6.3.3)."""
        plen = _u32(cdb, 10)
        if plen == 0:
            return RESULT_GOOD
        if plen < 16:
            raise param_list_length_error()
        d = bytes(self._data_out(data, plen))
        list_id, usage = d[0], (d[1] >> 3) & 0x03
        tdl, sdl, inline = _u16(d, 2), _u32(d, 8), _u32(d, 12)
        if tdl + sdl > XCOPY_MAX_DESCRIPTOR_LIST:
            raise param_list_length_error()
        if 16 + tdl + sdl + inline > plen:
            raise param_list_length_error()
        if inline:
            raise invalid_param(12)
        if tdl % 32:
            raise invalid_param(2)
        ntgt = tdl // 32
        if ntgt > XCOPY_MAX_TARGETS:
            raise invalid_param(2, ascq=0x06)  # TOO MANY TARGET DESCRIPTORS
        targets: list[LogicalUnit | None] = []
        for i in range(ntgt):
            targets.append(self._copy_target(d, 16 + 32 * i))
        segments: list[tuple[int, int, int, int, int]] = []
        pos = 16 + tdl
        end = pos + sdl
        while pos < end:
            if pos + 4 > end:
                raise param_list_length_error()
            dtype, dlen = d[pos], _u16(d, pos + 2) + 4
            if len(segments) >= XCOPY_MAX_SEGMENTS:
                raise invalid_param(pos, ascq=0x08)  # TOO MANY SEGMENT DESCRIPTORS
            if dtype != XCOPY_SEGMENT_BLOCK_TO_BLOCK:
                raise invalid_param(pos, ascq=0x09)  # UNSUPPORTED SEGMENT DESCRIPTOR TYPE
            if dlen != 28:
                raise invalid_param(pos + 2)
            if pos + dlen > end:
                raise param_list_length_error()
            if d[pos + 1] & 0x02:
                raise invalid_param(pos + 1)  # DC=1: counts in destination blocks
            segments.append((_u16(d, pos + 4), _u16(d, pos + 6), _u16(d, pos + 10),
                             _u64(d, pos + 12), _u64(d, pos + 20)))
            pos += dlen
        done = 0
        moved = 0
        try:
            for src_i, dst_i, nblocks, src_lba, dst_lba in segments:
                if src_i >= ntgt or dst_i >= ntgt:
                    raise ScsiError(SenseKey.COPY_ABORTED, 0x08, 0x04)  # unreachable target
                src, dst = targets[src_i], targets[dst_i]
                if src is None or dst is None:
                    raise ScsiError(SenseKey.COPY_ABORTED, 0x0D, 0x02)  # NUL target
                moved += await self._copy_segment(src, dst, nblocks, src_lba, dst_lba, nexus)
                done += 1
        except (ScsiError, ReservationConflict):
            self._hold_copy(nexus, list_id, usage, 0x02, done, moved)
            raise
        except BackendNotReady:
            self._hold_copy(nexus, list_id, usage, 0x02, done, moved)
            raise ScsiError(SenseKey.COPY_ABORTED, 0x0D, 0x02) from None
        self._hold_copy(nexus, list_id, usage, 0x01, done, moved)
        return ScsiResult(GOOD, transfer_length=plen)

    def _copy_target(self, d: bytes, pos: int) -> LogicalUnit | None:
        """Resolve one target descriptor; None for a NUL descriptor."""
        dtype = d[pos]
        if dtype != XCOPY_TARGET_IDENT:
            raise invalid_param(pos, ascq=0x07)  # UNSUPPORTED TARGET DESCRIPTOR TYPE
        lu_id_type = d[pos + 1] >> 6
        if lu_id_type > 1:
            raise invalid_param(pos + 1)  # reserved in SPC-3
        if d[pos + 1] & 0x1F:
            raise invalid_param(pos + 1)  # only direct-access block devices
        if d[pos + 1] & 0x20:
            return None  # NUL
        dlen = d[pos + 7]
        if dlen > 20:
            raise invalid_param(pos + 7)
        designator = bytes(d[pos + 8:pos + 8 + dlen])
        if int.from_bytes(d[pos + 29:pos + 32], "big") != self.block_size:
            raise invalid_param(pos + 29)
        lu = self.copy_resolver(designator) if self.copy_resolver is not None else (
            self if designator == bytes(self.backend.naa_id) else None)
        if lu is None:
            raise ScsiError(SenseKey.COPY_ABORTED, 0x08, 0x04)  # UNREACHABLE COPY TARGET
        if lu.block_size != self.block_size:
            raise invalid_param(pos + 29)
        return lu

    async def _copy_segment(self, src: LogicalUnit, dst: LogicalUnit, blocks: int, src_lba: int,
                            dst_lba: int, nexus: ItNexus) -> int:
        bs = self.block_size
        if blocks * bs > XCOPY_MAX_SEGMENT_BYTES:
            raise invalid_param(10)
        if blocks > src.blocks or src_lba > src.blocks - blocks or blocks > dst.blocks \
                or dst_lba > dst.blocks - blocks:
            raise ScsiError(SenseKey.COPY_ABORTED, 0x00, 0x00)
        for lu, access in ((src, Access.READ), (dst, Access.WRITE)):
            held = lu._spc2_holder
            if held is not None and held != nexus.session_id:
                raise ReservationConflict()
            if lu.pr.type and not lu.pr.allowed(nexus.pr_id, access):
                raise ReservationConflict()
        dst._check_writable()
        if not blocks:
            return 0
        per = max(1, IO_CHUNK_BYTES // bs)
        starts = list(range(0, blocks, per))
        if src is dst and src_lba < dst_lba < src_lba + blocks:
            starts.reverse()  # overlapping forward copy: go from the end
        tok = await dst.locks.acquire(dst_lba, dst_lba + blocks, True)
        try:
            for off in starts:
                n = min(per, blocks - off)
                chunk = await src.backend.read((src_lba + off) * bs, n * bs)
                await dst._land(dst.backend.write((dst_lba + off) * bs, memoryview(chunk),
                                                   not dst.write_cache))
        finally:
            dst.locks.release(tok)
        return blocks * bs

    def _hold_copy(self, nexus: ItNexus, list_id: int, usage: int, status: int,
                   segments: int, moved: int) -> None:
        """Keep COPY STATUS for LIST ID USAGE 00b/10b (SPC-3 §6.3.1)."""
        if usage == 0x03:
            return
        st = self._sessions.get(nexus.session_id)
        if st is None:
            return
        kib = moved >> 10
        st.copies[list_id] = (8).to_bytes(4, "big") + bytes((status,)) \
            + segments.to_bytes(2, "big") + bytes((1,)) + min(kib, 0xFFFFFFFF).to_bytes(4, "big")
        while len(st.copies) > 16:
            del st.copies[next(iter(st.copies))]


def _pr_sense(e: PrError) -> ScsiError:
    return ScsiError(SenseKey.ILLEGAL_REQUEST, e.asc, e.ascq, field_pointer=e.field_pointer,
                     in_cdb=e.in_cdb)


def _first_difference(a: Buffer, b: Buffer) -> int:
    x = np.frombuffer(memoryview(a), dtype=np.uint8)
    y = np.frombuffer(memoryview(b), dtype=np.uint8)
    n = min(len(x), len(y))
    diff = np.flatnonzero(x[:n] != y[:n])
    return int(diff[0]) if len(diff) else n


def _runs(flags: np.ndarray) -> list[tuple[int, int, bool]]:
    """(start, length, value) runs of a boolean array."""
    n = len(flags)
    if not n:
        return []
    edges = np.flatnonzero(np.diff(flags.astype(np.int8))) + 1
    out = []
    start = 0
    for e in [*edges.tolist(), n]:
        out.append((start, e - start, bool(flags[start])))
        start = e
    return out


def _merge(extents: list[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
    out: list[tuple[int, int, bool]] = []
    for s, n, m in extents:
        if out and out[-1][2] == m and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + n, m)
        else:
            out.append((s, n, m))
    return out


def inquiry(cdb: bytes, standard: bytes, vpd: dict[int, bytes]) -> bytes:
    """INQUIRY (SPC-4 §6.6): standard data, or the VPD page asked for."""
    if cdb[1] & 0x02:
        raise invalid_field(1)  # CMDDT is obsolete
    alloc = _u16(cdb, 3)
    if not cdb[1] & 0x01:
        if cdb[2]:
            raise invalid_field(2)  # PAGE CODE without EVPD
        return allocation(standard, alloc)
    page = vpd.get(cdb[2])
    if page is None:
        raise invalid_field(2)
    return allocation(page, alloc)


def report_luns(cdb: bytes, lun_ids: Sequence[int]) -> ScsiResult:
    """REPORT LUNS (SPC-4 §6.33), served by every LUN, present or not."""
    alloc = _u32(cdb, 6)
    if alloc < 16:
        return ScsiResult(CHECK_CONDITION, sense=invalid_field(6).sense())
    if cdb[2] not in (0x00, 0x01, 0x02):
        return ScsiResult(CHECK_CONDITION, sense=invalid_field(2).sense())
    return ScsiResult(GOOD, allocation(build_report_luns(lun_ids), alloc))


_ABSENT_INQUIRY = build_standard_inquiry("STEELFUS", "Edge LUN", "0001", present=False)


def execute_no_lun(cdb: bytes, lun_ids: Sequence[int]) -> ScsiResult:
    """A command addressed to a LUN that does not exist (SPC-4 §4.6.4):
    INQUIRY answers with peripheral qualifier 011b, REPORT LUNS works,
    REQUEST SENSE returns the LUN-not-supported sense, the rest fail with
    5/25/00."""
    op = cdb[0]
    if op == Op.REPORT_LUNS:
        return report_luns(cdb, lun_ids)
    if op == Op.INQUIRY and not cdb[1] & 0x03 and not cdb[2]:
        return ScsiResult(GOOD, allocation(_ABSENT_INQUIRY, _u16(cdb, 3)))
    if op == Op.REQUEST_SENSE:
        return ScsiResult(GOOD, allocation(LUN_NOT_SUPPORTED, cdb[4]))
    return ScsiResult(CHECK_CONDITION, sense=LUN_NOT_SUPPORTED)


async def execute(lu: LogicalUnit | None, cdb: bytes, data: Buffer = b"",
                  lun_ids: Sequence[int] = (0,), nexus: ItNexus = LOCAL_NEXUS) -> ScsiResult:
    """Run ``cdb`` on ``lu``, or answer for a missing LUN when ``lu`` is None."""
    if lu is None:
        return execute_no_lun(cdb, lun_ids)
    return await lu.execute(cdb, data, lun_ids, nexus)


def describe(lu: LogicalUnit) -> dict[str, Any]:
    """What a LU offers, for logs and status pages."""
    return {"blocks": lu.blocks, "block_size": lu.block_size, "thin": lu.thin,
            "atomic_blocks": lu.max_atomic_blocks,
            "commands": sorted({f"{c.opcode:02x}" + (f"/{c.sa:02x}" if c.sa is not None else "")
                                for c in lu._supported()})}
