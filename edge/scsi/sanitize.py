"""SANITIZE (SBC-3 §5.30, §4.11): OVERWRITE, BLOCK ERASE, CRYPTO ERASE and
EXIT FAILURE MODE, run by a task the LU owns so that aborts, resets and
dropped connections do not stop it, and the NOT READY / SANITIZE IN PROGRESS
answers every other command gets meanwhile.
"""

from __future__ import annotations

import asyncio

from edge.scsi.cdb import SA_SANITIZE_EXIT_FAILURE_MODE, SA_SANITIZE_OVERWRITE, data_out, u16
from edge.scsi.sbc import IO_CHUNK_BYTES, check_writable, deallocate, write_pattern
from edge.scsi.sense import (
    GOOD,
    Buffer,
    ScsiResult,
    SenseKey,
    check_condition,
    fixed_sense,
    invalid_field,
    invalid_param,
    param_list_length_error,
    progress_sense,
)
from edge.scsi.unit import ItNexus, Unit
from steelfusion import log

SANITIZE_IN_PROGRESS = (0x04, 0x1B)
SANITIZE_FAILED = (0x31, 0x03)
SANITIZE_ALLOWED = frozenset((0x03, 0x12, 0xA0))
"""INQUIRY, REPORT LUNS and REQUEST SENSE still run while a sanitize is in
progress (SBC-3 §4.11.1); everything else gets NOT READY, SANITIZE IN
PROGRESS."""

_log = log.get("scsi")


def in_progress_sense(lu: Unit) -> bytes:
    """NOT READY, SANITIZE IN PROGRESS with the PROGRESS INDICATION in the
    sense-key specific bytes (SPC-4 §4.5.2.4.4)."""
    return progress_sense(SenseKey.NOT_READY, *SANITIZE_IN_PROGRESS, lu.sanitize_progress)


def sanitize_condition(lu: Unit) -> bytes | None:
    """The sense REQUEST SENSE reports for the sanitize state: the progress
    while one runs, SANITIZE COMMAND FAILED after a failed one, else None."""
    if lu.sanitizing:
        return in_progress_sense(lu)
    if lu.sanitize_failed:
        return fixed_sense(SenseKey.MEDIUM_ERROR, *SANITIZE_FAILED)
    return None


def parse_sanitize(cdb: bytes, data: Buffer, block_size: int) -> tuple[int, bytes, int, bool]:
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
    plen = u16(cdb, 7)
    bs = block_size
    if sa != SA_SANITIZE_OVERWRITE:
        if plen:
            raise invalid_field(7)
        return sa, b"", 0, False
    if not 4 < plen <= bs + 4:
        raise invalid_field(7)
    d = bytes(data_out(data, plen))
    count = d[0] & 0x1F
    ipl = u16(d, 2)
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


async def sanitize(lu: Unit, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
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
    sa, block, count, invert = parse_sanitize(cdb, data, lu.block_size)
    plen = u16(cdb, 7)
    if sa == SA_SANITIZE_EXIT_FAILURE_MODE:
        lu.sanitize_failed = False
        return ScsiResult(GOOD, transfer_length=plen)
    check_writable(lu, plen or None)
    lu.sanitize_progress = 0
    task = asyncio.get_running_loop().create_task(_run(lu, sa, block, count, invert))
    lu.sanitize_task = task
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
    if lu.sanitize_failed:
        return check_condition(SenseKey.MEDIUM_ERROR, *SANITIZE_FAILED)
    return ScsiResult(GOOD, transfer_length=plen)


async def _run(lu: Unit, sa: int, block: bytes, count: int, invert: bool) -> None:
    total = lu.blocks
    per = max(1, IO_CHUNK_BYTES // lu.block_size)
    passes = count if sa == SA_SANITIZE_OVERWRITE else 1
    inverted = bytes(b ^ 0xFF for b in block)
    async with lu.locks.exclusive(0, total):
        try:
            for p in range(passes):
                pattern = inverted if invert and p % 2 else block
                for lba in range(0, total, per):
                    n = min(per, total - lba)
                    if sa == SA_SANITIZE_OVERWRITE:
                        await write_pattern(lu, lba, n, pattern)
                    else:
                        await deallocate(lu, lba, n)
                    done = p * total + lba + n
                    lu.sanitize_progress = done * 0x10000 // (passes * total)
            await lu.backend.flush()
            lu.sanitize_failed = False
        except Exception as e:
            lu.sanitize_failed = True
            _log.warning("scsi_sanitize_failed", service_action=sa, error=repr(e))
        except asyncio.CancelledError:
            # Stopped part way (the loop is shutting down): the medium is
            # neither what it was nor sanitized, so media access gets
            # 3/31/03 until a SANITIZE completes or EXIT FAILURE MODE.
            lu.sanitize_failed = True
            _log.warning("scsi_sanitize_failed", service_action=sa, error="cancelled")
            raise
