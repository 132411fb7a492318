"""The command table: every command the LU serves is one row (operation code,
service action, CDB usage data for REPORT SUPPORTED OPERATION CODES, the
handler, how it meets reservations and unit attentions), so what we
advertise and what we do cannot drift apart (LIO's per-opcode ``switch`` in
``sbc_parse_cdb``/``spc_parse_cdb`` that sets ``cmd->execute_cmd``; tgt's
``sbc_ops`` table).  REPORT SUPPORTED OPERATION CODES and REPORT SUPPORTED
TASK MANAGEMENT FUNCTIONS answer from it.  The row type (:class:`Command`)
is in :mod:`edge.scsi.unit`, beside the LU shape its handlers take.
"""

from __future__ import annotations

from edge.scsi import pages, reservations, sbc, xcopy
from edge.scsi.cdb import (
    SA_COPY_OPERATING_PARAMETERS,
    SA_COPY_STATUS,
    SA_GET_LBA_STATUS,
    SA_READ_CAPACITY_16,
    SA_REPORT_SUPPORTED_OPCODES,
    SA_REPORT_SUPPORTED_TMF,
    SA_SANITIZE_BLOCK_ERASE,
    SA_SANITIZE_CRYPTO_ERASE,
    SA_SANITIZE_EXIT_FAILURE_MODE,
    SA_SANITIZE_OVERWRITE,
    SA_XCOPY_LID1,
    SANITIZE,
    Op,
    allocation,
    u16,
    u32,
)
from edge.scsi.pr import Access
from edge.scsi.sanitize import sanitize
from edge.scsi.sense import GOOD, Buffer, ScsiResult, invalid_field
from edge.scsi.unit import Command, Handler, ItNexus, Table, Unit


async def report_opcodes(lu: Unit, cdb: bytes, data: Buffer,
                         nexus: ItNexus) -> ScsiResult:
    """REPORT SUPPORTED OPERATION CODES, SPC-4 §6.35: all commands, or one
    (by opcode, or opcode and service action), optionally with command
    timeouts descriptors (RCTD)."""
    rctd = bool(cdb[2] & 0x80)
    options = cdb[2] & 0x07
    alloc = u32(cdb, 6)
    timeout = bytes((0x00, 0x0A, 0x00, 0x00)) + bytes(8) if rctd else b""
    if options == 0:
        body = b"".join(
            bytes((c.opcode, 0)) + (c.sa or 0).to_bytes(2, "big")
            + bytes((0, (0x02 if rctd else 0) | (0x01 if c.sa is not None else 0)))
            + len(c.usage).to_bytes(2, "big") + timeout
            for c in supported(lu.commands))
        return ScsiResult(GOOD, allocation(len(body).to_bytes(4, "big") + body, alloc))
    if options not in (1, 2, 3):
        raise invalid_field(2)
    entry = lu.commands.get(cdb[3])
    has_sa = isinstance(entry, dict)
    if (options == 1 and has_sa) or (options == 2 and entry is not None and not has_sa):
        raise invalid_field(2)
    cmd: Command | None
    if isinstance(entry, dict):
        cmd = entry.get(u16(cdb, 4)) if u16(cdb, 4) <= 0x1F else None
    else:
        cmd = entry
    if cmd is None:
        out = bytes((0, 0x01, 0, 0))  # SUPPORT 001b: not supported
    else:
        out = bytes((0, (0x80 if rctd else 0) | 0x03)) + len(cmd.usage).to_bytes(2, "big") \
            + cmd.usage + timeout
    return ScsiResult(GOOD, allocation(out, alloc))


async def report_tmf(lu: Unit, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
    """REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS, SPC-4 §6.36: ABORT TASK,
    ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET, TARGET RESET."""
    alloc = u32(cdb, 6)
    if alloc < 4:
        raise invalid_field(6)
    out = bytes((0xDA, 0, 0, 0))
    if cdb[2] & 0x80:  # REPD: extended format
        out = bytes((0xDA, 0, 0, 0x0C)) + bytes(12)
    return ScsiResult(GOOD, allocation(out, alloc))


def _cmd(opcode: int, sa: int | None, usage: str, handler: Handler, access: Access = Access.WRITE,
         *, spc2_ok: bool = False, ua_exempt: bool = False) -> Command:
    data = bytes.fromhex(usage.replace(" ", ""))
    if data[0] != opcode:
        raise ValueError(f"usage data for {opcode:#x} starts with {data[0]:#x}")
    return Command(opcode, sa, data, handler, access, spc2_ok, ua_exempt)


_R, _W, _A = Access.READ, Access.WRITE, Access.ALLOWED
COMMANDS: tuple[Command, ...] = (
    _cmd(0x00, None, "00 00 00 00 00 04", pages.test_unit_ready, _A),
    _cmd(0x03, None, "03 01 00 00 ff 04", pages.request_sense, _A, spc2_ok=True,
         ua_exempt=True),
    _cmd(0x08, None, "08 1f ff ff ff 04", sbc.read, _R),
    _cmd(0x0A, None, "0a 1f ff ff ff 04", sbc.write, _W),
    _cmd(0x12, None, "12 03 ff ff ff 04", pages.inquiry, _A, spc2_ok=True, ua_exempt=True),
    _cmd(0x15, None, "15 11 00 00 ff 04", pages.mode_select, _W),
    _cmd(0x16, None, "16 00 00 00 00 04", reservations.reserve, _A),
    _cmd(0x17, None, "17 00 00 00 00 04", reservations.release, _A, spc2_ok=True),
    _cmd(0x1A, None, "1a 08 ff ff ff 04", pages.mode_sense, _R),
    _cmd(0x1B, None, "1b 01 00 0f f7 04", sbc.start_stop, _A),
    _cmd(0x1E, None, "1e 00 00 00 03 04", sbc.prevent_allow, _A),
    _cmd(0x25, None, "25 00 ff ff ff ff 00 00 01 04", pages.read_capacity_10, _A),
    _cmd(0x28, None, "28 f8 ff ff ff ff 00 ff ff 04", sbc.read, _R),
    _cmd(0x2A, None, "2a f8 ff ff ff ff 00 ff ff 04", sbc.write, _W),
    _cmd(0x2E, None, "2e f6 ff ff ff ff 00 ff ff 04", sbc.write_verify, _W),
    _cmd(0x2F, None, "2f f6 ff ff ff ff 00 ff ff 04", sbc.verify, _R),
    _cmd(0x34, None, "34 02 ff ff ff ff 00 ff ff 04", sbc.prefetch, _R),
    _cmd(0x35, None, "35 02 ff ff ff ff 00 ff ff 04", sbc.sync_cache, _W),
    _cmd(0x37, None, "37 00 1f 00 00 00 00 ff ff 04", sbc.read_defect_data, _R),
    _cmd(0x41, None, "41 f8 ff ff ff ff 00 ff ff 04", sbc.write_same, _W),
    _cmd(0x42, None, "42 01 00 00 00 00 00 ff ff 04", sbc.unmap, _W),
    *(_cmd(SANITIZE, sa, f"48 {0xA0 | sa:02x} 00 00 00 00 00 ff ff 04", sanitize, _W)
      for sa in (SA_SANITIZE_OVERWRITE, SA_SANITIZE_BLOCK_ERASE, SA_SANITIZE_CRYPTO_ERASE,
                 SA_SANITIZE_EXIT_FAILURE_MODE)),
    _cmd(0x55, None, "55 11 00 00 00 00 00 ff ff 04", pages.mode_select, _W),
    _cmd(0x56, None, "56 12 00 00 00 00 00 00 00 04", reservations.reserve, _A),
    _cmd(0x57, None, "57 12 00 00 00 00 00 00 00 04", reservations.release, _A, spc2_ok=True),
    _cmd(0x5A, None, "5a 18 ff ff 00 00 00 ff ff 04", pages.mode_sense, _R),
    *(_cmd(0x5E, sa, f"5e {sa:02x} 00 00 00 00 00 ff ff 04",
           reservations.persistent_reserve_in, _A)
      for sa in range(4)),
    *(_cmd(0x5F, sa, f"5f {sa:02x} ff 00 00 ff ff ff ff 04",
           reservations.persistent_reserve_out, _A)
      for sa in range(7)),
    _cmd(0x83, SA_XCOPY_LID1, "83 00 00 00 00 00 00 00 00 00 ff ff ff ff 00 04",
         xcopy.extended_copy, _W),
    *(_cmd(0x84, sa, f"84 {sa:02x} ff 00 00 00 00 00 00 00 ff ff ff ff 00 04",
           xcopy.receive_copy_results, _A)
      for sa in (SA_COPY_STATUS, SA_COPY_OPERATING_PARAMETERS)),
    _cmd(0x88, None, "88 f8 ff ff ff ff ff ff ff ff ff ff ff ff 00 04", sbc.read, _R),
    _cmd(0x89, None, "89 f8 ff ff ff ff ff ff ff ff 00 00 00 ff 00 04", sbc.compare_and_write,
         _W),
    _cmd(0x8A, None, "8a f8 ff ff ff ff ff ff ff ff ff ff ff ff 00 04", sbc.write, _W),
    _cmd(0x8B, None, "8b f8 ff ff ff ff ff ff ff ff ff ff ff ff 00 04", sbc.orwrite, _W),
    _cmd(0x8E, None, "8e f6 ff ff ff ff ff ff ff ff ff ff ff ff 00 04", sbc.write_verify, _W),
    _cmd(0x8F, None, "8f f6 ff ff ff ff ff ff ff ff ff ff ff ff 00 04", sbc.verify, _R),
    _cmd(0x90, None, "90 02 ff ff ff ff ff ff ff ff ff ff ff ff 00 04", sbc.prefetch, _R),
    _cmd(0x91, None, "91 02 ff ff ff ff ff ff ff ff ff ff ff ff 00 04", sbc.sync_cache, _W),
    _cmd(0x93, None, "93 f9 ff ff ff ff ff ff ff ff ff ff ff ff 00 04", sbc.write_same, _W),
    _cmd(0x9C, None, "9c f8 ff ff ff ff ff ff ff ff ff ff ff ff 00 04", sbc.write_atomic, _W),
    _cmd(0x9E, SA_READ_CAPACITY_16, "9e 10 ff ff ff ff ff ff ff ff ff ff ff ff 00 04",
         pages.read_capacity_16, _A),
    _cmd(0x9E, SA_GET_LBA_STATUS, "9e 12 ff ff ff ff ff ff ff ff ff ff ff ff 00 04",
         sbc.get_lba_status, _R),
    _cmd(0xA0, None, "a0 00 ff 00 00 00 ff ff ff ff 00 04", pages.report_luns_unreached, _A,
         spc2_ok=True, ua_exempt=True),
    _cmd(0xA3, SA_REPORT_SUPPORTED_OPCODES, "a3 0c 87 ff ff ff ff ff ff ff 00 04",
         report_opcodes, _A, spc2_ok=True),
    _cmd(0xA3, SA_REPORT_SUPPORTED_TMF, "a3 0d 80 00 00 00 ff ff ff ff 00 04",
         report_tmf, _A, spc2_ok=True),
    _cmd(0xA8, None, "a8 f8 ff ff ff ff ff ff ff ff 00 04", sbc.read, _R),
    _cmd(0xAA, None, "aa f8 ff ff ff ff ff ff ff ff 00 04", sbc.write, _W),
    _cmd(0xAE, None, "ae f6 ff ff ff ff ff ff ff ff 00 04", sbc.write_verify, _W),
    _cmd(0xAF, None, "af f6 ff ff ff ff ff ff ff ff 00 04", sbc.verify, _R),
    _cmd(0xB7, None, "b7 1f ff ff ff ff ff ff ff ff 00 04", sbc.read_defect_data, _R),
)


def build_table(*, thin: bool, atomic: bool) -> Table:
    """The rows one LU serves: WRITE ATOMIC only with an atomic backend; UNMAP,
    GET LBA STATUS and the two deallocating SANITIZE actions only when thin
    provisioned (they need LBPME=1)."""
    table: Table = {}
    for c in COMMANDS:
        if c.opcode == Op.WRITE_ATOMIC_16 and not atomic:
            continue
        if c.opcode in (Op.UNMAP, Op.SERVICE_ACTION_IN_16) and not thin \
                and c.sa != SA_READ_CAPACITY_16:
            continue
        if c.opcode == SANITIZE and not thin \
                and c.sa in (SA_SANITIZE_BLOCK_ERASE, SA_SANITIZE_CRYPTO_ERASE):
            continue  # both deallocate: they need LBPME=1
        if c.sa is None:
            table[c.opcode] = c
        else:
            sub = table.setdefault(c.opcode, {})
            assert isinstance(sub, dict)
            sub[c.sa] = c
    return table


def supported(table: Table) -> list[Command]:
    """Every row of ``table``, by opcode and service action."""
    out: list[Command] = []
    for entry in table.values():
        if isinstance(entry, dict):
            out.extend(entry.values())
        else:
            out.append(entry)
    return sorted(out, key=lambda c: (c.opcode, c.sa or 0))
