"""SCSI block-device emulation (SPC-4, SBC-3) over a :class:`BlockBackend`.

CDB parsing, range checks, INQUIRY/VPD/MODE SENSE pages and sense data are
pure functions and precomputed bytes; :meth:`LogicalUnit.execute` is the thin
async part that calls the backend.  Every error is a CHECK CONDITION with
fixed-format sense (SPC-4 §4.5.3): LBA out of range 5/21/00, invalid opcode
5/20/00, invalid field in CDB 5/24/00, LUN not supported 5/25/00, backend not
ready 2/04/xx, any other backend failure 4/44/00.  Unknown opcodes get
5/20/00 so libiscsi's iscsi-test-cu reports those tests as skipped.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum

from edge.backends import BackendNotReady, BlockBackend
from steelfusion import log

Buffer = bytes | bytearray | memoryview

# SAM-5 status codes.
GOOD = 0x00
CHECK_CONDITION = 0x02
BUSY = 0x08
TASK_SET_FULL = 0x28
TASK_ABORTED = 0x40


class SenseKey(IntEnum):
    """SPC-4 Table 27."""

    NO_SENSE = 0x0
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    ABORTED_COMMAND = 0xB
    MISCOMPARE = 0xE


class Op(IntEnum):
    """Operation codes handled here (SPC-4 / SBC-3)."""

    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SENSE_6 = 0x1A
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    VERIFY_10 = 0x2F
    SYNCHRONIZE_CACHE_10 = 0x35
    MODE_SENSE_10 = 0x5A
    READ_16 = 0x88
    WRITE_16 = 0x8A
    VERIFY_16 = 0x8F
    SYNCHRONIZE_CACHE_16 = 0x91
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    READ_12 = 0xA8
    WRITE_12 = 0xAA
    VERIFY_12 = 0xAF


SA_READ_CAPACITY_16 = 0x10


def fixed_sense(key: int, asc: int, ascq: int, *, information: int | None = None,
                field_pointer: int | None = None, in_cdb: bool = True,
                bit_pointer: int | None = None) -> bytes:
    """18 bytes of fixed-format sense data, response code 0x70 (SPC-4 §4.5.3).

    ``information`` sets the VALID bit and INFORMATION field (e.g. the
    miscompare offset); ``field_pointer`` fills the SENSE KEY SPECIFIC field
    (SKSV=1, C/D=``in_cdb``) naming the offending CDB byte.
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
                 information: int | None = None, transfer_length: int | None = None) -> None:
        super().__init__(f"sense {key:x}/{asc:02x}/{ascq:02x}")
        self.key, self.asc, self.ascq = key, asc, ascq
        self.field_pointer = field_pointer
        self.information = information
        self.transfer_length = transfer_length

    def sense(self) -> bytes:
        return fixed_sense(self.key, self.asc, self.ascq, information=self.information,
                           field_pointer=self.field_pointer)


def invalid_field(field_pointer: int | None = None) -> ScsiError:
    """ILLEGAL REQUEST / INVALID FIELD IN CDB (5/24/00)."""
    return ScsiError(SenseKey.ILLEGAL_REQUEST, 0x24, 0x00, field_pointer=field_pointer)


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
LUN_NOT_SUPPORTED = fixed_sense(SenseKey.ILLEGAL_REQUEST, 0x25, 0x00)
INVALID_OPCODE = fixed_sense(SenseKey.ILLEGAL_REQUEST, 0x20, 0x00, field_pointer=0)

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def _u16(cdb: bytes, i: int) -> int:
    return int(_U16.unpack_from(cdb, i)[0])


def _u32(cdb: bytes, i: int) -> int:
    return int(_U32.unpack_from(cdb, i)[0])


def _u64(cdb: bytes, i: int) -> int:
    return int(_U64.unpack_from(cdb, i)[0])


def parse_rw(cdb: bytes) -> tuple[int, int]:
    """(LBA, transfer length in blocks) of a READ/WRITE/VERIFY/SYNC CACHE
    CDB (SBC-3 §5.8-§5.11, §5.16-§5.22, §5.26-§5.30)."""
    op = cdb[0]
    if op in (Op.READ_6, Op.WRITE_6):
        return ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3], cdb[4] or 256
    if op < 0x60:  # 10-byte CDBs: LBA 2..5, length 7..8
        return _u32(cdb, 2), _u16(cdb, 7)
    if op >= 0xA0:  # 12-byte: LBA 2..5, length 6..9
        return _u32(cdb, 2), _u32(cdb, 6)
    return _u64(cdb, 2), _u32(cdb, 10)  # 16-byte: LBA 2..9, length 10..13


def check_range(lba: int, blocks: int, capacity_blocks: int) -> None:
    """LBA OUT OF RANGE (5/21/00) unless [lba, lba+blocks) fits (SBC-3 §4.5).

    Written as two comparisons that never add, so the check also holds in
    a fixed-width port (LBA up to 2**64-1 plus a 32-bit count)."""
    if blocks > capacity_blocks or lba > capacity_blocks - blocks:
        raise ScsiError(SenseKey.ILLEGAL_REQUEST, 0x21, 0x00)


def _ascii(s: str, n: int) -> bytes:
    return s.encode("ascii", "replace")[:n].ljust(n, b" ")


def allocation(data: bytes, alloc: int) -> bytes:
    """Truncate to the ALLOCATION LENGTH (SPC-4 §4.2.5.6)."""
    return data if len(data) <= alloc else data[:alloc]


# ----------------------------------------------------------------------------- page builders

VERSION_DESCRIPTORS = (0x00A0, 0x0960, 0x0300, 0x04C0)
"""SAM-5, iSCSI, SPC-3, SBC-3 (SPC-4 Table 143)."""


def build_standard_inquiry(vendor: str, product: str, revision: str, *,
                           present: bool = True) -> bytes:
    """Standard INQUIRY data, 96 bytes (SPC-4 §6.6.2): version 5 (SPC-3),
    response format 2, CMDQUE, SBC-3 version descriptor.  With
    ``present=False`` the peripheral qualifier says "no LU here" (0x7F)."""
    b = bytearray(96)
    b[0] = 0x00 if present else 0x7F
    b[2] = 0x05
    b[3] = 0x02
    b[4] = len(b) - 5
    b[7] = 0x02  # CMDQUE
    b[8:16] = _ascii(vendor, 8)
    b[16:32] = _ascii(product, 16)
    b[32:36] = _ascii(revision, 4)
    for i, d in enumerate(VERSION_DESCRIPTORS):
        b[58 + 2 * i:60 + 2 * i] = d.to_bytes(2, "big")
    return bytes(b)


def _vpd(page: int, payload: bytes) -> bytes:
    return bytes((0x00, page)) + len(payload).to_bytes(2, "big") + payload


def build_vpd_pages(backend: BlockBackend, vendor: str, max_transfer_blocks: int,
                    optimal_transfer_blocks: int) -> dict[int, bytes]:
    """VPD pages 0x00, 0x80, 0x83, 0xB0, 0xB1 (SPC-4 §7.8, SBC-3 §6.5)."""
    bs = backend.block_size
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
    bl = bytearray(0x3C)  # Block Limits, SBC-3 §6.5.3
    bl[2:4] = max(1, 4096 // bs).to_bytes(2, "big")  # OPTIMAL TRANSFER LENGTH GRANULARITY
    bl[4:8] = max_transfer_blocks.to_bytes(4, "big")
    bl[8:12] = optimal_transfer_blocks.to_bytes(4, "big")
    pages[0xB0] = _vpd(0xB0, bytes(bl))
    bdc = bytearray(0x3C)  # Block Device Characteristics, SBC-3 §6.5.2
    bdc[0:2] = (1).to_bytes(2, "big")  # MEDIUM ROTATION RATE: non-rotating
    pages[0xB1] = _vpd(0xB1, bytes(bdc))
    pages[0x00] = _vpd(0x00, bytes([0x00, *sorted(pages)]))
    return pages


def build_read_capacity_10(blocks: int, block_size: int) -> bytes:
    """SBC-3 §5.15: last LBA (0xFFFFFFFF if it does not fit) and block size."""
    return struct.pack(">II", min(blocks - 1, 0xFFFFFFFF), block_size)


def build_read_capacity_16(blocks: int, block_size: int, physical_exponent: int) -> bytes:
    """SBC-3 §5.16: 32 bytes; LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT says
    how many logical blocks make one physical block (3 → 4096-byte)."""
    return struct.pack(">QIBB", blocks - 1, block_size, 0, physical_exponent & 0x0F) + bytes(18)


def encode_lun(lun: int) -> bytes:
    """8-byte LUN (SAM-5 §4.7): peripheral addressing below 256, flat above."""
    if lun < 256:
        return bytes((0, lun)) + bytes(6)
    return bytes((0x40 | (lun >> 8), lun & 0xFF)) + bytes(6)


def build_report_luns(luns: Sequence[int]) -> bytes:
    """REPORT LUNS parameter data (SPC-4 §6.33)."""
    body = b"".join(encode_lun(n) for n in sorted(luns))
    return len(body).to_bytes(4, "big") + bytes(4) + body


_MODE_PAGES_CURRENT = {
    0x01: bytes((0x01, 0x0A, 0x80)) + bytes(9),  # R/W error recovery: AWRE
    0x08: bytes((0x08, 0x12, 0x04)) + bytes(17),  # caching: WCE=1
    # Control: QUEUE ALGORITHM MODIFIER=1 (unrestricted), D_SENSE=0 (fixed
    # sense), BUSY TIMEOUT PERIOD unlimited (SPC-4 §7.5.8).
    0x0A: bytes((0x0A, 0x0A, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0x00, 0x00)),
}
# PC=1 (changeable values): nothing is changeable; same length, zero mask.
_MODE_PAGES_CHANGEABLE = {k: v[:2] + bytes(len(v) - 2) for k, v in _MODE_PAGES_CURRENT.items()}


def build_mode_sense(cdb: bytes, blocks: int, block_size: int, read_only: bool) -> bytes:
    """MODE SENSE(6)/(10) parameter data (SPC-4 §6.11, §6.12, §7.5)."""
    ten = cdb[0] == Op.MODE_SENSE_10
    dbd = bool(cdb[1] & 0x08)
    llbaa = ten and bool(cdb[1] & 0x10)
    pc = cdb[2] >> 6
    page = cdb[2] & 0x3F
    subpage = cdb[3]
    if pc == 3:
        raise ScsiError(SenseKey.ILLEGAL_REQUEST, 0x39, 0x00)  # saving not supported
    table = _MODE_PAGES_CHANGEABLE if pc == 1 else _MODE_PAGES_CURRENT
    if page == 0x3F:
        if subpage not in (0x00, 0xFF):
            raise invalid_field(3)
        pages = b"".join(table[k] for k in sorted(table))
    elif page in table and subpage == 0:
        pages = table[page]
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
        total = 8 + len(bd) + len(pages)
        hdr = struct.pack(">HBBBBH", total - 2, 0, dsp, 1 if llbaa and bd else 0, 0, len(bd))
    else:
        total = 4 + len(bd) + len(pages)
        hdr = bytes((min(total - 1, 255), 0, dsp, len(bd)))
    return hdr + bd + pages


def build_request_sense(descriptor: bool, sense: bytes | None = None) -> bytes:
    """REQUEST SENSE data (SPC-4 §6.39): no pending condition unless given."""
    if sense is not None:
        return sense
    if descriptor:
        return bytes((0x72, 0, 0, 0, 0, 0, 0, 0))
    return fixed_sense(SenseKey.NO_SENSE, 0, 0)


# ----------------------------------------------------------------------------- execution

Handler = Callable[[bytes, Buffer], Awaitable[ScsiResult]]


class LogicalUnit:
    """One LUN: SPC/SBC commands over a backend.

    ``max_transfer_blocks`` is advertised in the Block Limits VPD page and
    enforced (5/24/00 above it), which also bounds how much a single command
    can make us allocate.
    """

    def __init__(self, backend: BlockBackend, *, vendor: str = "STEELFUS",
                 product: str = "Edge LUN", revision: str = "0001",
                 max_transfer_bytes: int = 8 * 1024 * 1024, read_only: bool = False,
                 physical_block_size: int = 4096) -> None:
        self.backend = backend
        self.block_size = bs = backend.block_size
        self.blocks = backend.size_bytes // bs
        self.read_only = read_only
        self.max_transfer_blocks = max(1, max_transfer_bytes // bs)
        self.physical_exponent = max(0, (physical_block_size // bs).bit_length() - 1)
        self.inquiry = build_standard_inquiry(vendor, product, revision)
        self.vpd = build_vpd_pages(backend, vendor, self.max_transfer_blocks,
                                   min(self.max_transfer_blocks, (1 << 20) // bs))
        self.vendor = vendor
        self._log = log.get("scsi")
        self._handlers: dict[int, Handler] = {
            Op.READ_10: self._read, Op.READ_16: self._read, Op.READ_6: self._read,
            Op.READ_12: self._read,
            Op.WRITE_10: self._write, Op.WRITE_16: self._write, Op.WRITE_6: self._write,
            Op.WRITE_12: self._write,
            Op.TEST_UNIT_READY: self._tur, Op.INQUIRY: self._inquiry,
            Op.READ_CAPACITY_10: self._read_capacity_10,
            Op.SERVICE_ACTION_IN_16: self._service_action_in,
            Op.MODE_SENSE_6: self._mode_sense, Op.MODE_SENSE_10: self._mode_sense,
            Op.REQUEST_SENSE: self._request_sense,
            Op.SYNCHRONIZE_CACHE_10: self._sync_cache, Op.SYNCHRONIZE_CACHE_16: self._sync_cache,
            Op.VERIFY_10: self._verify, Op.VERIFY_12: self._verify, Op.VERIFY_16: self._verify,
        }

    async def execute(self, cdb: bytes, data: Buffer = b"",
                      lun_ids: Sequence[int] = (0,)) -> ScsiResult:
        """Run one command.  ``data`` is the Data-Out buffer, as received."""
        op = cdb[0]
        if op == Op.REPORT_LUNS:
            return report_luns(cdb, lun_ids)
        handler = self._handlers.get(op)
        if handler is None:
            return ScsiResult(CHECK_CONDITION, sense=INVALID_OPCODE)
        try:
            return await handler(cdb, data)
        except ScsiError as e:
            return ScsiResult(CHECK_CONDITION, sense=e.sense(), transfer_length=e.transfer_length)
        except BackendNotReady as e:
            return check_condition(SenseKey.NOT_READY, 0x04, e.ascq)
        except Exception as e:
            self._log.warning("scsi_backend_error", opcode=op, error=repr(e))
            return check_condition(SenseKey.HARDWARE_ERROR, 0x44, 0x00)

    # -- data commands

    def _transfer(self, cdb: bytes) -> tuple[int, int]:
        lba, blocks = parse_rw(cdb)
        if cdb[0] not in (Op.READ_6, Op.WRITE_6) and cdb[1] & 0xE0:
            raise invalid_field(1)  # RDPROTECT/WRPROTECT/VRPROTECT: no protection info
        check_range(lba, blocks, self.blocks)
        if blocks > self.max_transfer_blocks:
            raise invalid_field(7)
        return lba, blocks

    async def _read(self, cdb: bytes, data: Buffer) -> ScsiResult:
        lba, blocks = self._transfer(cdb)
        if not blocks:
            return RESULT_GOOD
        bs = self.block_size
        return ScsiResult(GOOD, await self.backend.read(lba * bs, blocks * bs))

    def _data_out(self, data: Buffer, needed: int) -> Buffer:
        """The Data-Out bytes the command uses.  Less than the CDB asks for:
        5/0E/03 (INVALID FIELD IN COMMAND INFORMATION UNIT, as FCP-4 and
        libiscsi's residual tests expect); more: the surplus is ignored and
        reported as underflow by the transport."""
        if len(data) < needed:
            raise ScsiError(SenseKey.ILLEGAL_REQUEST, 0x0E, 0x03, transfer_length=needed)
        return data if len(data) == needed else memoryview(data)[:needed]

    async def _write(self, cdb: bytes, data: Buffer) -> ScsiResult:
        """WRITE(6/10/12/16), SBC-3 §5.32-§5.35.

        When the initiator sends fewer bytes than the CDB asks for (iSCSI
        EDTL < transfer length), FCP-4 §9.4.2 lets us either write only what
        arrived or refuse: we write the whole blocks that arrived and report
        the overflow (what libiscsi 1.19's residual tests require), and
        refuse with 5/0E/03 when a block would be partial."""
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
        if self.read_only:
            raise ScsiError(SenseKey.DATA_PROTECT, 0x27, 0x00, transfer_length=needed)
        if blocks:
            fua = cdb[0] != Op.WRITE_6 and bool(cdb[1] & 0x08)
            await self.backend.write(lba * bs, payload, fua)
        return ScsiResult(GOOD, transfer_length=needed)

    async def _verify(self, cdb: bytes, data: Buffer) -> ScsiResult:
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
                g, w = bytes(got), bytes(want)
                off = next(j for j in range(bs) if g[j] != w[j])
                raise ScsiError(SenseKey.MISCOMPARE, 0x1D, 0x00, information=i * bs + off,
                                transfer_length=needed)
        return ScsiResult(GOOD, transfer_length=needed)

    async def _sync_cache(self, cdb: bytes, data: Buffer) -> ScsiResult:
        lba, blocks = parse_rw(cdb)
        check_range(lba, blocks, self.blocks)
        await self.backend.flush()
        return RESULT_GOOD

    # -- non-data commands

    async def _tur(self, cdb: bytes, data: Buffer) -> ScsiResult:
        return RESULT_GOOD

    async def _inquiry(self, cdb: bytes, data: Buffer) -> ScsiResult:
        return ScsiResult(GOOD, inquiry(cdb, self.inquiry, self.vpd))

    async def _read_capacity_10(self, cdb: bytes, data: Buffer) -> ScsiResult:
        if not cdb[8] & 1 and _u32(cdb, 2):
            raise invalid_field(2)  # LBA must be 0 when PMI=0 (SBC-3 §5.15.1)
        return ScsiResult(GOOD, build_read_capacity_10(self.blocks, self.block_size))

    async def _service_action_in(self, cdb: bytes, data: Buffer) -> ScsiResult:
        if cdb[1] & 0x1F != SA_READ_CAPACITY_16:
            raise invalid_field(1)  # field pointer 1: libiscsi reads it as "not supported"
        rc = build_read_capacity_16(self.blocks, self.block_size, self.physical_exponent)
        return ScsiResult(GOOD, allocation(rc, _u32(cdb, 10)))

    async def _mode_sense(self, cdb: bytes, data: Buffer) -> ScsiResult:
        alloc = cdb[4] if cdb[0] == Op.MODE_SENSE_6 else _u16(cdb, 7)
        page = build_mode_sense(cdb, self.blocks, self.block_size, self.read_only)
        return ScsiResult(GOOD, allocation(page, alloc))

    async def _request_sense(self, cdb: bytes, data: Buffer) -> ScsiResult:
        return ScsiResult(GOOD, allocation(build_request_sense(bool(cdb[1] & 1)), cdb[4]))


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
                  lun_ids: Sequence[int] = (0,)) -> ScsiResult:
    """Run ``cdb`` on ``lu``, or answer for a missing LUN when ``lu`` is None."""
    if lu is None:
        return execute_no_lun(cdb, lun_ids)
    return await lu.execute(cdb, data, lun_ids)
