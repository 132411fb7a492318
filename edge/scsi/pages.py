"""What the LU says about itself: standard INQUIRY and VPD pages, READ
CAPACITY, REPORT LUNS, MODE SENSE/SELECT pages and REQUEST SENSE (LIO's
``target_core_spc.c`` and ``sbc_emulate_readcapacity``; tgt's ``spc.c``).

The page builders are pure functions over numbers; the LU precomputes what
does not change.  The command handlers below them take the LU first, like
every handler in the command table (``edge.scsi.commands``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from edge.backends import BlockBackend
from edge.scsi.cdb import Op, allocation, data_out, encode_lun, u16, u32
from edge.scsi.sanitize import sanitize_condition
from edge.scsi.sense import (
    CHECK_CONDITION,
    GOOD,
    RESULT_GOOD,
    UA_MODE_PARAMETERS_CHANGED,
    Buffer,
    ScsiError,
    ScsiResult,
    SenseKey,
    fixed_sense,
    invalid_field,
    invalid_param,
    param_list_length_error,
)
from edge.scsi.unit import ItNexus, Limits, Unit

VERSION_DESCRIPTORS = (0x00A0, 0x0960, 0x0300, 0x04C0)
"""SAM-5, iSCSI, SPC-3, SBC-3 (SPC-4 Table 143)."""


def _ascii(s: str, n: int) -> bytes:
    return s.encode("ascii", "replace")[:n].ljust(n, b" ")


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


ABSENT_INQUIRY = build_standard_inquiry("STEELFUS", "Edge LUN", "0001", present=False)
"""INQUIRY data for a LUN that does not exist (peripheral qualifier 011b)."""


def _vpd(page: int, payload: bytes) -> bytes:
    return bytes((0x00, page)) + len(payload).to_bytes(2, "big") + payload


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


def build_report_luns(luns: Sequence[int]) -> bytes:
    """REPORT LUNS parameter data (SPC-4 §6.33)."""
    body = b"".join(encode_lun(n).to_bytes(8, "big") for n in sorted(luns))
    return len(body).to_bytes(4, "big") + bytes(4) + body


# Mode pages (SPC-4 §7.5, SBC-3 §6.4): default current values and the
# changeable-bits mask.  Caching WCE and Control SWP may be changed.
MODE_DEFAULTS = {
    0x01: bytes((0x01, 0x0A, 0x80)) + bytes(9),  # R/W error recovery: AWRE
    0x08: bytes((0x08, 0x12, 0x04)) + bytes(17),  # caching: WCE=1
    # Control: QUEUE ALGORITHM MODIFIER=1 (unrestricted), D_SENSE=0 (fixed
    # sense), SWP=0, BUSY TIMEOUT PERIOD unlimited.
    0x0A: bytes((0x0A, 0x0A, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0x00, 0x00)),
}
_MODE_CHANGEABLE = {k: v[:2] + bytes(len(v) - 2) for k, v in MODE_DEFAULTS.items()}
_MODE_CHANGEABLE[0x08] = bytes((0x08, 0x12, 0x04)) + bytes(17)  # WCE
_MODE_CHANGEABLE[0x0A] = bytes((0x0A, 0x0A, 0x00, 0x00, 0x08)) + bytes(7)  # SWP


def build_mode_sense(cdb: bytes, blocks: int, block_size: int, read_only: bool,
                     pages: dict[int, bytes] | None = None) -> bytes:
    """MODE SENSE(6)/(10) parameter data (SPC-4 §6.11, §6.12, §7.5)."""
    current = pages if pages is not None else MODE_DEFAULTS
    ten = cdb[0] == Op.MODE_SENSE_10
    dbd = bool(cdb[1] & 0x08)
    llbaa = ten and bool(cdb[1] & 0x10)
    pc = cdb[2] >> 6
    page = cdb[2] & 0x3F
    subpage = cdb[3]
    if pc == 3:
        raise ScsiError(SenseKey.ILLEGAL_REQUEST, 0x39, 0x00)  # saving not supported
    table = _MODE_CHANGEABLE if pc == 1 else MODE_DEFAULTS if pc == 2 else current
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


def inquiry_data(cdb: bytes, standard: bytes, vpd: dict[int, bytes]) -> bytes:
    """INQUIRY (SPC-4 §6.6): standard data, or the VPD page asked for."""
    if cdb[1] & 0x02:
        raise invalid_field(1)  # CMDDT is obsolete
    alloc = u16(cdb, 3)
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
    alloc = u32(cdb, 6)
    if alloc < 16:
        return ScsiResult(CHECK_CONDITION, sense=invalid_field(6).sense())
    if cdb[2] not in (0x00, 0x01, 0x02):
        return ScsiResult(CHECK_CONDITION, sense=invalid_field(2).sense())
    return ScsiResult(GOOD, allocation(build_report_luns(lun_ids), alloc))


# ----------------------------------------------------------------------------- commands


async def test_unit_ready(lu: Unit, cdb: bytes, data: Buffer,
                          nexus: ItNexus) -> ScsiResult:
    return RESULT_GOOD


async def inquiry(lu: Unit, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
    return ScsiResult(GOOD, inquiry_data(cdb, lu.inquiry, lu.vpd))


async def report_luns_unreached(lu: Unit, cdb: bytes, data: Buffer,
                                nexus: ItNexus) -> ScsiResult:
    """The table row's handler; :meth:`edge.scsi.lu.LogicalUnit.execute` answers REPORT LUNS
    before dispatch, with the target's LUN list."""
    return report_luns(cdb, (0,))  # pragma: no cover - answered before dispatch


async def read_capacity_10(lu: Unit, cdb: bytes, data: Buffer,
                           nexus: ItNexus) -> ScsiResult:
    if not cdb[8] & 1 and u32(cdb, 2):
        raise invalid_field(2)  # LBA must be 0 when PMI=0 (SBC-3 §5.15.1)
    return ScsiResult(GOOD, build_read_capacity_10(lu.blocks, lu.block_size))


async def read_capacity_16(lu: Unit, cdb: bytes, data: Buffer,
                           nexus: ItNexus) -> ScsiResult:
    rc = build_read_capacity_16(lu.blocks, lu.block_size, lu.physical_exponent, lu.thin)
    return ScsiResult(GOOD, allocation(rc, u32(cdb, 10)))


async def request_sense(lu: Unit, cdb: bytes, data: Buffer,
                        nexus: ItNexus) -> ScsiResult:
    """REQUEST SENSE, SPC-4 §6.39: the sanitize progress while one runs,
    else reports (and clears) a pending unit attention, else NO SENSE."""
    sense = sanitize_condition(lu)
    if sense is None:
        ua = lu.next_ua(nexus)
        if ua is not None:
            sense = fixed_sense(SenseKey.UNIT_ATTENTION, *ua)
    return ScsiResult(GOOD, allocation(build_request_sense(bool(cdb[1] & 1), sense), cdb[4]))


async def mode_sense(lu: Unit, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
    alloc = cdb[4] if cdb[0] == Op.MODE_SENSE_6 else u16(cdb, 7)
    page = build_mode_sense(cdb, lu.blocks, lu.block_size,
                            lu.read_only or lu.software_write_protect, lu.pages)
    return ScsiResult(GOOD, allocation(page, alloc))


async def mode_select(lu: Unit, cdb: bytes, data: Buffer, nexus: ItNexus) -> ScsiResult:
    """MODE SELECT(6)/(10), SPC-4 §6.9-§6.10: pages we report, changing
    only changeable bits (caching WCE, control SWP); everything else must
    equal the current value.  Other nexuses get MODE PARAMETERS CHANGED."""
    ten = cdb[0] == Op.MODE_SELECT_10
    if cdb[1] & 0x01:
        raise invalid_field(1)  # SP: saving pages not supported
    plen = u16(cdb, 7) if ten else cdb[4]
    if plen == 0:
        return RESULT_GOOD
    d = bytes(data_out(data, plen))
    hlen = 8 if ten else 4
    if len(d) < hlen:
        raise param_list_length_error()
    bdl = u16(d, 6) if ten else d[3]
    long_lba = ten and bool(d[4] & 0x01)
    pos = hlen
    if bdl:
        want = 16 if long_lba else 8
        if bdl != want or pos + bdl > len(d):
            raise param_list_length_error() if pos + bdl > len(d) else invalid_param(
                6 if ten else 3)
        blen = u32(d, pos + 12) if long_lba else int.from_bytes(d[pos + 5:pos + 8], "big")
        if blen != lu.block_size:
            raise invalid_param(pos + (12 if long_lba else 5))
        pos += bdl
    new = dict(lu.pages)
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
    if new != lu.pages:
        lu.pages = new
        lu.establish_ua(*UA_MODE_PARAMETERS_CHANGED, except_session=nexus.session_id)
    return ScsiResult(GOOD, transfer_length=plen)
