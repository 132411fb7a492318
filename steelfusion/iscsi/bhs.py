"""Basic Header Segment layouts written once, as data (RFC 7143 §11.2.1), and
the framing every PDU shares (§11.2: digests, padding, the :class:`Pdu` base).

Every PDU starts with a 48-byte BHS: the opcode in byte 0, TotalAHSLength and
DataSegmentLength in bytes 4-7, and the rest opcode-specific.  A PDU class
says where each of its dataclass fields sits with :func:`at`: the byte offset,
the struct code of the bytes there, and, for fields that share bytes (the flag
bits of byte 1, ISID and TSIH in bytes 8-15), the mask of their bits.  Bits a
PDU always carries (the F bit of a NOP-Out, the reserved ITT of a Reject) are
listed as :class:`Fixed`.  :func:`pdu_class` makes the dataclass and compiles
its :class:`Layout`, one precompiled ``struct.Struct`` plus the steps that put
fields in and take them out, so the same list builds the encoder and the
decoder.  Byte 0 and the length word are the same for every PDU and filled
here; no layout repeats them.

A layout that overlaps itself, leaves a field without a place or puts bits
outside their bytes fails at import, not on the wire; a value too wide for
its bits is a ValueError naming the field, never masked into a neighbour.
The generic coder pays a loop per field (1.5-2.5 us a header against
0.25-1 us for one hand-written struct call), so what a target does per
command keeps hand-packed coders in :mod:`steelfusion.iscsi.pdu`, held to
these layouts by ``tests/test_iscsi_spec.py``.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any, ClassVar, TypeVar, dataclass_transform

import crc32c as _crc32c_mod

_crc32c = _crc32c_mod.crc32c

BHS_LEN = 48
PADDING = (b"", b"\0", b"\0\0", b"\0\0\0")
"""Zero bytes that bring a segment of length n to a 4-byte boundary: ``PADDING[-n & 3]``."""

Buffer = bytes | bytearray | memoryview

_WHOLE, _FLAG, _BITS = 0, 1, 2  # how a field fills its slot: all of it, one bit, a bit range


@dataclasses.dataclass(frozen=True, slots=True)
class Place:
    """Where one dataclass field sits in the BHS.

    ``code`` is the struct code of the bytes at ``offset`` (``B``, ``H``,
    ``I``, ``Q`` or ``16s``); ``mask`` the field's bits when it shares those
    bytes with others (0: it has them all); ``when`` names a bool field
    without which this one is reserved (sent as 0, read as 0).
    """

    offset: int
    code: str
    mask: int = 0
    when: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Fixed:
    """Bits a kind of PDU always carries, whatever its fields say."""

    offset: int
    code: str
    value: int


def at(offset: int, code: str, mask: int = 0, *, when: str = "",
       default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that sits at ``offset`` in the BHS (see :class:`Place`)."""
    return dataclasses.field(default=default,
                             metadata={"bhs": Place(offset, code, mask, when)})


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
            c = _crc32c(PADDING[pad], c)
        return [header, data, PADDING[pad] + c.to_bytes(4, "little")]
    if pad:
        return [header, data, PADDING[pad]]
    return [header, data]


def length_word(ahs_len: int, data: Buffer) -> int:
    """Bytes 4-7: TotalAHSLength (4-byte words) and DataSegmentLength."""
    n = len(data)
    if n > 0xFFFFFF:
        raise ValueError("data segment longer than 2**24-1")
    if ahs_len > 255 * 4:
        raise ValueError(f"AHS of {ahs_len} bytes: TotalAHSLength counts 255 words at most")
    return (ahs_len // 4) << 24 | n


class Pdu:
    """Base of all PDU classes: the framing every opcode shares.

    A subclass is a :func:`pdu_class` whose fields say where they sit in the
    BHS; its ``header()`` and its decoder both come from that one list.
    """

    __slots__ = ()
    opcode: ClassVar[int]
    layout: ClassVar[Layout]
    fixed: ClassVar[tuple[Fixed, ...]] = ()
    """Bits every PDU of the kind carries (an F bit that is always 1)."""
    ahs_fields: ClassVar[tuple[str, ...]] = ()
    """Fields carried in Additional Header Segments, not in the BHS."""

    def header(self) -> bytes:
        """BHS and AHS, packed as the class's layout says."""
        return self.layout.encode(self)

    def ahs_bytes(self) -> bytes:
        """The Additional Header Segments (RFC 7143 §11.2.2); most PDUs have none."""
        return b""

    @classmethod
    def take_ahs(cls, ahs: bytes, fields: dict[str, Any]) -> None:
        """Fill ``fields`` from received AHS (the stream decoder refuses AHS on
        PDUs that take none before it gets here)."""

    def payload(self) -> Buffer:
        return getattr(self, "data", b"")

    def encode_parts(self, header_digest: bool = False, data_digest: bool = False) -> list[Buffer]:
        """Buffers to hand to ``transport.writelines`` (data is not copied)."""
        return frame(self.header(), self.payload(), header_digest, data_digest)

    def encode(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        return b"".join(self.encode_parts(header_digest, data_digest))


_Part = tuple[str, int, int, int, str]  # field, how it fills its slot, shift, largest value, when
_Slot = tuple[str, Any, tuple[_Part, ...] | None]  # code, fixed bits, parts (None: length word)


class Layout:
    """One PDU class's BHS compiled: a ``struct.Struct`` over the slots its
    fields use (bytes no field uses are pad: sent as zero, never read) and,
    per slot, the fields packed into it."""

    __slots__ = ("_data", "_gated", "_slots", "cls", "struct")

    def __init__(self, cls: type[Pdu]) -> None:
        name = cls.__name__
        # offset -> (struct code, fixed bits, [(field, mask, is_bool, when)])
        slots: dict[int, tuple[str, Any, list[tuple[str, int, bool, str]]]] = {
            0: ("B", cls.opcode, []), 4: ("I", 0, [])}
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        gated: list[tuple[str, str, Any]] = []
        for f in fields.values():
            place = f.metadata.get("bhs")
            if place is None:
                if f.name != "data" and f.name not in cls.ahs_fields:
                    raise TypeError(f"{name}.{f.name} has no place in the BHS")
                continue
            if place.offset == 4:
                raise TypeError(f"{name}.{f.name}: bytes 4-7 are the length word")
            is_bool = f.type in ("bool", bool)
            if is_bool and (place.mask & (place.mask - 1) or not place.mask):
                raise TypeError(f"{name}.{f.name}: a bool takes one bit")
            if place.when:
                if place.when not in fields:
                    raise TypeError(f"{name}.{f.name}: no field {place.when!r}")
                gated.append((f.name, place.when, False if is_bool else 0))
            slot = slots.setdefault(place.offset, (place.code, 0, []))
            if slot[0] != place.code:
                raise TypeError(f"{name}.{f.name}: byte {place.offset} is {slot[0]} already")
            slot[2].append((f.name, place.mask, is_bool, place.when))
        for fx in cls.fixed:
            code, bits, members = slots.setdefault(fx.offset, (fx.code, 0, []))
            if code != fx.code or bits & fx.value:
                raise TypeError(f"{name}: fixed bits at byte {fx.offset} clash")
            slots[fx.offset] = (code, bits | fx.value, members)
        fmt, end = ">", 0
        compiled: list[_Slot] = []
        for offset in sorted(slots):
            code, bits, members = slots[offset]
            if offset < end:
                raise TypeError(f"{name}: byte {offset} overlaps the slot before it")
            if offset > end:
                fmt += f"{offset - end}x"
            fmt += code
            end = offset + struct.calcsize(">" + code)
            parts = None if offset == 4 else _parts(name, code, offset, bits, members)
            compiled.append((code, bits, parts))
        if end > BHS_LEN:
            raise TypeError(f"{name}: layout runs past byte {BHS_LEN}")
        self.cls = cls
        self.struct = struct.Struct(fmt + (f"{BHS_LEN - end}x" if end < BHS_LEN else ""))
        self._slots = tuple(compiled)
        self._gated = tuple(gated)
        self._data = "data" in fields

    def encode(self, pdu: Pdu) -> bytes:
        """The BHS (and AHS) of ``pdu``; ValueError names a field that does not fit."""
        ahs = pdu.ahs_bytes()
        values: list[Any] = []
        for _code, value, parts in self._slots:
            if parts is None:
                values.append(length_word(len(ahs), pdu.payload()))
                continue
            for field, how, shift, top, when in parts:
                x = getattr(pdu, field)
                if when and not getattr(pdu, when):
                    continue
                if how == _WHOLE:
                    value = x
                elif how == _FLAG:
                    if x:
                        value |= 1 << shift
                elif 0 <= x <= top:
                    value |= x << shift
                else:
                    raise ValueError(f"{self.cls.__name__}.{field} = {x!r} does not fit in "
                                     f"{top.bit_length()} bits")
            values.append(value)
        try:
            return self.struct.pack(*values) + ahs
        except struct.error:
            raise ValueError(self._misfit(values)) from None

    def decode(self, buf: Buffer, pos: int, ahs: bytes, data: Buffer) -> Any:
        """The PDU whose BHS starts at ``buf[pos]``, given its AHS and data segment."""
        kw: dict[str, Any] = {}
        for value, (_code, _bits, parts) in zip(self.struct.unpack_from(buf, pos), self._slots,
                                                strict=True):
            if parts is None:
                continue
            for field, how, shift, top, _when in parts:
                if how == _WHOLE:
                    kw[field] = value
                elif how == _FLAG:
                    kw[field] = bool(value >> shift & 1)
                else:
                    kw[field] = value >> shift & top
        for field, when, zero in self._gated:
            if not kw[when]:
                kw[field] = zero
        if self._data:
            kw["data"] = data
        self.cls.take_ahs(ahs, kw)
        return self.cls(**kw)

    def _misfit(self, values: list[Any]) -> str:
        """Which whole-slot field did not fit its bytes (a struct.error's cause)."""
        for value, (code, _bits, parts) in zip(values, self._slots, strict=True):
            try:
                struct.pack(">" + code, value)
            except struct.error:
                field = parts[0][0] if parts else "?"
                return (f"{self.cls.__name__}.{field} = {value!r} does not fit in "
                        f"{struct.calcsize('>' + code) * 8} bits")
        return f"{self.cls.__name__}: fields do not fit the BHS"  # pragma: no cover


def _parts(name: str, code: str, offset: int, bits: Any,
           members: list[tuple[str, int, bool, str]]) -> tuple[_Part, ...]:
    """How each field of one slot fills it, checked: masks inside the slot,
    one run of bits each, none shared with another field or the fixed bits."""
    width = struct.calcsize(">" + code) * 8
    taken = bits | (0x3F if offset == 0 else 0)  # byte 0 holds the opcode
    parts: list[_Part] = []
    for field, mask, is_bool, when in members:
        if not mask:
            if len(members) > 1 or bits:
                raise TypeError(f"{name}.{field}: byte {offset} is shared, give a mask")
            parts.append((field, _WHOLE, 0, 0, when))
            continue
        if mask >> width or taken & mask:
            raise TypeError(f"{name}.{field}: mask {mask:#x} clashes at byte {offset}")
        taken |= mask
        shift = (mask & -mask).bit_length() - 1
        top = mask >> shift
        if top & (top + 1):
            raise TypeError(f"{name}.{field}: mask {mask:#x} is not one run of bits")
        parts.append((field, _FLAG if is_bool else _BITS, shift, top, when))
    return tuple(parts)


T = TypeVar("T")


@dataclass_transform(kw_only_default=True, field_specifiers=(at, dataclasses.field))
def pdu_fields(cls: type[T]) -> type[T]:
    """Make ``cls`` a group of fields that several PDU classes share, placed
    once, for them to inherit.  It declares ``__slots__ = ()``: only the PDU
    classes hold slots, so they can mix several groups in."""
    if cls.__dict__.get("__slots__") != ():
        raise TypeError(f"{cls.__name__} must declare __slots__ = ()")
    return dataclasses.dataclass(kw_only=True)(cls)


@dataclass_transform(kw_only_default=True, field_specifiers=(at, dataclasses.field))
def pdu_class(cls: type[T]) -> type[T]:
    """Make ``cls`` a slotted keyword-only dataclass and compile its layout.

    Not frozen: a frozen dataclass pays an ``object.__setattr__`` per field in
    ``__init__``, which shows up on the per-command path.
    """
    made: Any = dataclasses.dataclass(slots=True, kw_only=True)(cls)
    made.layout = Layout(made)
    return made
