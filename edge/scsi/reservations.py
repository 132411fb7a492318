"""The reservation commands applied to a LU: SPC-2 RESERVE/RELEASE and
PERSISTENT RESERVE IN/OUT (LIO's ``target_scsi2_reservation_*`` and
``target_scsi3_emulate_pr_*`` in ``target_core_pr.c``).

The rules are ``edge.scsi.pr`` (sans-IO); this module runs them for one
command, writes the state file (atomic replace) before answering GOOD, and
turns the outcome into unit attentions and PREEMPT AND ABORT.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from edge.scsi.cdb import Op, allocation, u16, u32
from edge.scsi.pr import PersistentReservations, PrError, ProutParams
from edge.scsi.sense import (
    GOOD,
    RESULT_GOOD,
    Buffer,
    ReservationConflict,
    ScsiError,
    ScsiResult,
    SenseKey,
    invalid_field,
    param_list_length_error,
    short_data_out,
)
from edge.scsi.unit import ItNexus, Unit
from steelfusion import log
from steelfusion.atomic import atomic_write

_log = log.get("scsi")


def _pr_sense(e: PrError) -> ScsiError:
    return ScsiError(SenseKey.ILLEGAL_REQUEST, e.asc, e.ascq, field_pointer=e.field_pointer,
                     in_cdb=e.in_cdb)


async def reserve(lu: Unit, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
    """RESERVE(6)/(10), SPC-2 §7.21-§7.22: the whole LU for this I_T
    nexus; third-party and extent reservations are not supported; any
    persistent registration makes it a conflict (SPC-4 §5.13.3)."""
    if cdb[0] == Op.RESERVE_10 and cdb[1] & 0x12:
        raise invalid_field(1)
    if cdb[0] == Op.RESERVE_6 and cdb[1] & 0x01:
        raise invalid_field(1)
    if lu.pr.registrations or lu.pr.type:
        raise ReservationConflict()
    holder = lu.spc2_holder
    if holder is not None and holder != nexus.session_id:
        raise ReservationConflict()
    lu.spc2_holder = nexus.session_id
    return RESULT_GOOD


async def release(lu: Unit, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
    """RELEASE(6)/(10), SPC-2 §7.16-§7.17: a no-op unless we hold it."""
    if cdb[0] == Op.RELEASE_10 and cdb[1] & 0x12:
        raise invalid_field(1)
    if lu.pr.registrations or lu.pr.type:
        raise ReservationConflict()
    if lu.spc2_holder == nexus.session_id:
        lu.spc2_holder = None
    return RESULT_GOOD


async def persistent_reserve_in(lu: Unit, cdb: bytes, data: Buffer,
                                nexus: ItNexus) -> ScsiResult:
    """PERSISTENT RESERVE IN, SPC-4 §6.15: READ KEYS, READ RESERVATION,
    REPORT CAPABILITIES, READ FULL STATUS."""
    sa = cdb[1] & 0x1F
    alloc = u16(cdb, 7)
    pr = lu.pr
    out = (pr.read_keys, pr.read_reservation, pr.report_capabilities,
           pr.read_full_status)[sa]()
    return ScsiResult(GOOD, allocation(out, alloc))


async def persistent_reserve_out(lu: Unit, cdb: bytes, data: Buffer,
                                 nexus: ItNexus) -> ScsiResult:
    """PERSISTENT RESERVE OUT, SPC-4 §6.16: the change is written to the
    state file (atomic replace) before GOOD; unit attentions follow
    SPC-4 §5.13.11; PREEMPT AND ABORT aborts the preempted nexuses' tasks."""
    sa = cdb[1] & 0x1F
    plen = u32(cdb, 5)
    if plen != 24:
        raise param_list_length_error()
    if len(data) < plen:
        raise short_data_out(plen)
    try:
        params = ProutParams.decode(memoryview(data)[:plen])
    except PrError as e:
        raise _pr_sense(e) from None
    async with lu.pr_lock:
        before = lu.pr.to_bytes()
        try:
            outcome = lu.pr.out(sa, nexus.pr_id, params, scope=cdb[2] >> 4,
                                pr_type=cdb[2] & 0x0F)
        except PrError as e:
            if e.conflict:
                raise ReservationConflict() from None
            raise _pr_sense(e) from None
        if outcome.changed and lu.pr_path is not None:
            try:
                await asyncio.to_thread(save_pr, lu.pr_path, lu.pr.to_bytes())
            except Exception as e:
                lu.pr = PersistentReservations.from_bytes(before)
                _log.error("scsi_pr_persist_failed", path=str(lu.pr_path), error=repr(e))
                raise ScsiError(SenseKey.HARDWARE_ERROR, 0x44, 0x00) from None
    for pr_id, asc, ascq in outcome.unit_attentions:
        lu.establish_ua(asc, ascq, pr_ids=(pr_id,))
    if outcome.abort and lu.on_abort is not None:
        lu.on_abort(lu, outcome.abort)
    return ScsiResult(GOOD, transfer_length=plen)


def save_pr(path: Path, blob: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, blob, mode=0o600)


def load_pr(path: Path) -> PersistentReservations:
    """The reservations saved at ``path``; none when there is no file yet."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return PersistentReservations()
    try:
        return PersistentReservations.from_bytes(blob)
    except (ValueError, KeyError, TypeError) as e:
        # Refuse to guess: an unreadable PR file must not silently drop
        # a cluster's reservations.
        from steelfusion.statefile import StateFileError

        raise StateFileError(path, f"unreadable persistent-reservation state: {e}",
                             "restore it from a backup, or move it away: the LU then "
                             "starts with no reservations and the hosts must register "
                             "again") from e
