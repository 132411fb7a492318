"""One logical unit: the state every session and path to it shares, and the
dispatch of each command through the table (LIO's ``se_device`` with
``target_core_ua.c`` and the reservation checks of ``target_core_pr.c``;
tgt's ``target.c`` command path).

Shared state: SPC-2 RESERVE/RELEASE, SCSI-3 persistent reservations
(``edge.scsi.pr``, persisted by ``edge.scsi.reservations``), unit attentions
per I_T nexus (SAM-5 §5.14), mode pages MODE SELECT may change, the sanitize
state, and the LBA range locks that make COMPARE AND WRITE, ORWRITE, WRITE
SAME, WRITE ATOMIC and EXTENDED COPY atomic with respect to other writes.

:meth:`LogicalUnit.execute` checks what applies to every command (sanitize,
unit attention, reservations) and awaits the row's handler;
:meth:`LogicalUnit.try_fast` answers a plain READ/WRITE without a coroutine
when nothing special applies.  The handlers take a LU as
:class:`edge.scsi.unit.Unit`, which :class:`LogicalUnit` satisfies (checked
by mypy below the class).
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from edge.aio import RangeLock
from edge.backends import BackendNotReady, BlockBackend, LbaStatusBackend, ThinBackend
from edge.scsi.cdb import FAST10, FAST16, Op, allocation, u16
from edge.scsi.commands import build_table, supported
from edge.scsi.pages import (
    ABSENT_INQUIRY,
    MODE_DEFAULTS,
    build_standard_inquiry,
    build_vpd_pages,
    report_luns,
)
from edge.scsi.pr import Access, PersistentReservations
from edge.scsi.reservations import load_pr
from edge.scsi.sanitize import SANITIZE_ALLOWED, SANITIZE_FAILED, in_progress_sense
from edge.scsi.sense import (
    CHECK_CONDITION,
    GOOD,
    INVALID_OPCODE,
    LUN_NOT_SUPPORTED,
    RESULT_CONFLICT,
    UA_BUS_DEVICE_RESET,
    Buffer,
    ReservationConflict,
    ScsiError,
    ScsiResult,
    SenseKey,
    check_condition,
    invalid_field,
)
from edge.scsi.unit import Command, ItNexus, Limits, Table, Unit
from steelfusion import log

_log = log.get("scsi")

UA_QUEUE_MAX = 16
"""Pending unit attentions kept per I_T nexus; the oldest go first when full."""


LOCAL_NEXUS = ItNexus()


@dataclass(slots=True)
class _Session:
    nexus: ItNexus
    ua: deque[tuple[int, int]] = field(default_factory=deque)
    copies: dict[int, bytes] = field(default_factory=dict)


@runtime_checkable
class DirectBackend(Protocol):
    """A backend that can finish some I/O without waiting, for
    :meth:`LogicalUnit.try_fast` (``edge.node.EdgeLun``): ``read_now``
    returns None and ``write_now`` False (nothing done) when it cannot."""

    def read_now(self, offset: int, length: int) -> Buffer | None: ...

    def write_now(self, offset: int, data: Buffer) -> bool: ...


@runtime_checkable
class CancelSafeBackend(Protocol):
    """A backend whose operations are done at once or not at all at every
    await (``edge.node.EdgeLun``), so a cancelled write leaves nothing to
    land later and needs no :func:`edge.aio.to_the_end`."""

    cancel_safe: bool


OnAbort = Callable[["LogicalUnit", set[str]], None]
"""Called by PREEMPT AND ABORT with the PR ids whose tasks must go."""
CopyResolver = Callable[[bytes], "LogicalUnit | None"]
"""Finds a LU by NAA designator for EXTENDED COPY."""


class LogicalUnit:
    """One LUN: SPC/SBC commands over a backend, shared by every session.

    ``max_transfer_bytes`` is advertised in the Block Limits VPD page and
    enforced (5/24/00 above it), which also bounds how much a single command
    can make us allocate.  ``pr_state_path`` makes persistent reservations
    survive restarts (None keeps them in memory).  The physical block size
    defaults to the logical one: libiscsi's GET LBA STATUS tests assume one
    logical block per physical block.  WRITE ATOMIC is offered only when
    ``atomic_write_max_bytes`` says how much the backend can make
    crash-atomic.  ``on_abort`` serves PREEMPT AND ABORT; ``copy_resolver``
    lets EXTENDED COPY reach other LUs (default: this one only).
    """

    def __init__(self, backend: BlockBackend, *, vendor: str = "STEELFUS",
                 product: str = "Edge LUN", revision: str = "0001",
                 max_transfer_bytes: int = 8 * 1024 * 1024, read_only: bool = False,
                 physical_block_size: int | None = None, thin_provisioning: bool = True,
                 atomic_write_max_bytes: int | None = None,
                 pr_state_path: str | os.PathLike[str] | None = None,
                 on_abort: OnAbort | None = None,
                 copy_resolver: CopyResolver | None = None) -> None:
        self.backend = backend
        direct = backend if isinstance(backend, DirectBackend) else None
        self._read_now = direct.read_now if direct is not None else None
        self._write_now = direct.write_now if direct is not None else None
        self.cancel_safe = isinstance(backend, CancelSafeBackend) and bool(backend.cancel_safe)
        self.thin_io: ThinBackend | None = backend if isinstance(backend, ThinBackend) else None
        self.lba_io: LbaStatusBackend | None = (backend if isinstance(backend, LbaStatusBackend)
                                                else None)
        """Native unmap / lba_status, when the backend has them (else emulated)."""
        self.block_size = bs = backend.block_size
        self.blocks = backend.size_bytes // bs
        self.read_only = read_only
        self.thin = thin_provisioning
        self.max_transfer_blocks = max(1, max_transfer_bytes // bs)
        self.physical_exponent = max(0, ((physical_block_size or bs) // bs).bit_length() - 1)
        self.max_atomic_blocks = min((atomic_write_max_bytes or 0) // bs,
                                     self.max_transfer_blocks)
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
        self.commands: Table = build_table(thin=self.thin, atomic=bool(self.max_atomic_blocks))
        # shared state
        self.pages = dict(MODE_DEFAULTS)
        self.pr_path = Path(pr_state_path) if pr_state_path is not None else None
        self.pr = load_pr(self.pr_path) if self.pr_path is not None \
            else PersistentReservations()
        self.pr_lock = asyncio.Lock()
        self.spc2_holder: int | None = None
        """The session holding an SPC-2 reservation (RESERVE(6)/(10))."""
        self._sessions: dict[int, _Session] = {}
        self.locks = RangeLock()
        self.on_abort = on_abort
        self.copy_resolver = copy_resolver
        self.sanitize_task: asyncio.Task[None] | None = None
        self.sanitize_progress = 0  # of 65536 (SPC-4 §4.5.2.4.4)
        self.sanitize_failed = False

    # ------------------------------------------------------------------ state

    @property
    def pages(self) -> dict[int, bytes]:
        """Current mode pages (SPC-4 §7.5); setting them refreshes
        :attr:`write_cache` (WCE) and :attr:`software_write_protect` (SWP),
        which the write path reads."""
        return self._pages

    @pages.setter
    def pages(self, value: dict[int, bytes]) -> None:
        self._pages = value
        self.write_cache = bool(value[0x08][2] & 0x04)
        self.software_write_protect = bool(value[0x0A][4] & 0x08)

    @property
    def sanitizing(self) -> bool:
        """A sanitize operation is in progress (SBC-3 §4.11)."""
        return self.sanitize_task is not None and not self.sanitize_task.done()

    def conflicts(self, nexus: ItNexus, access: Access) -> bool:
        """A reservation held by someone else forbids ``access`` to ``nexus``
        (SPC-2 §5.5.1, SPC-4 §5.13.1)."""
        holder = self.spc2_holder
        if holder is not None and holder != nexus.session_id:
            return True
        return bool(self.pr.type) and not self.pr.allowed(nexus.pr_id, access)

    # ------------------------------------------------------------------ sessions

    def attach(self, nexus: ItNexus) -> None:
        """A session logged in with access to this LU (its I_T nexus exists)."""
        self._sessions[nexus.session_id] = _Session(nexus)

    def detach(self, nexus: ItNexus) -> None:
        """I_T nexus loss (logout, connection drop, reinstatement): its SPC-2
        reservation is released (SPC-2 §5.5.1); PR registrations stay."""
        st = self._sessions.get(nexus.session_id)
        if st is not None and st.nexus == nexus:
            del self._sessions[nexus.session_id]
        if self.spc2_holder == nexus.session_id:
            self.spc2_holder = None

    def copy_results(self, nexus: ItNexus) -> dict[int, bytes] | None:
        """The EXTENDED COPY statuses held for ``nexus`` (None: not attached)."""
        st = self._sessions.get(nexus.session_id)
        return st.copies if st is not None else None

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

    def next_ua(self, nexus: ItNexus) -> tuple[int, int] | None:
        """Report (and clear) the oldest unit attention of ``nexus``."""
        st = self._sessions.get(nexus.session_id)
        return st.ua.popleft() if st is not None and st.ua else None

    def reset(self, ua: tuple[int, int] = UA_BUS_DEVICE_RESET) -> None:
        """LOGICAL UNIT RESET / target reset (SAM-5 §6.6): SPC-2 reservation
        released, mode parameters back to defaults (nothing is saved), copy
        results dropped, a unit attention for every I_T nexus.  Persistent
        reservations are unaffected (SPC-4 §5.13.1)."""
        self.spc2_holder = None
        self.pages = dict(MODE_DEFAULTS)
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
        cmd: Command | None
        if isinstance(entry, dict):
            cmd = entry.get(cdb[1] & 0x1F)
            if cmd is None:
                # field pointer 1: libiscsi reads it as "not supported"
                return ScsiResult(CHECK_CONDITION, sense=invalid_field(1).sense())
        else:
            cmd = entry
        if op not in SANITIZE_ALLOWED:
            if self.sanitizing:
                return ScsiResult(CHECK_CONDITION, sense=in_progress_sense(self))
            if self.sanitize_failed and op != Op.SANITIZE:
                return check_condition(SenseKey.MEDIUM_ERROR, *SANITIZE_FAILED)
        if not cmd.ua_exempt:
            st = self._sessions.get(nexus.session_id)
            if st is not None and st.ua:
                asc, ascq = st.ua.popleft()
                return check_condition(SenseKey.UNIT_ATTENTION, asc, ascq)
        holder = self.spc2_holder
        if holder is not None and holder != nexus.session_id and not cmd.spc2_ok:
            return RESULT_CONFLICT
        if self.pr.type and not self.pr.allowed(nexus.pr_id, cmd.access):
            return RESULT_CONFLICT
        try:
            return await cmd.handler(self, cdb, data, nexus)
        except ScsiError as e:
            return ScsiResult(CHECK_CONDITION, sense=e.sense(), transfer_length=e.transfer_length)
        except ReservationConflict:
            return RESULT_CONFLICT
        except BackendNotReady as e:
            return check_condition(SenseKey.NOT_READY, 0x04, e.ascq)
        except Exception as e:
            _log.warning("scsi_backend_error", opcode=op, error=repr(e))
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
            lba, blocks = FAST10.unpack_from(cdb, 2)
        elif op == 0x88 or op == 0x8A:  # READ(16), WRITE(16)
            lba, blocks = FAST16.unpack_from(cdb, 2)
        else:
            return None
        if (cdb[1] & 0xE0 or not blocks or self.sanitize_task is not None
                or self.sanitize_failed or self.pr.type
                or blocks > self.max_transfer_blocks or lba > self.blocks - blocks):
            return None
        holder = self.spc2_holder
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
        if (writer is None or len(data) != n or cdb[1] & 0x08 or not self.write_cache
                or self.read_only or self.software_write_protect):
            return None
        # The write is done before this returns (no await), so nothing can take a
        # lock meanwhile: it only has to find no exclusive holder or waiter in the way.
        if not self.locks.shared_free(lba, lba + blocks) or not writer(lba * bs, data):
            return None
        return ScsiResult(GOOD, transfer_length=n)



_IS_A_UNIT: type[Unit] = LogicalUnit
"""mypy checks here that a LogicalUnit is what the command handlers take."""


def execute_no_lun(cdb: bytes, lun_ids: Sequence[int]) -> ScsiResult:
    """A command addressed to a LUN that does not exist (SPC-4 §4.6.4):
    INQUIRY answers with peripheral qualifier 011b, REPORT LUNS works,
    REQUEST SENSE returns the LUN-not-supported sense, the rest fail with
    5/25/00."""
    op = cdb[0]
    if op == Op.REPORT_LUNS:
        return report_luns(cdb, lun_ids)
    if op == Op.INQUIRY and not cdb[1] & 0x03 and not cdb[2]:
        return ScsiResult(GOOD, allocation(ABSENT_INQUIRY, u16(cdb, 3)))
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
                                for c in supported(lu.commands)})}
