"""Node wire protocol (Edge <-> Core, Core <-> Core, Core/Edge -> Witness): sans-IO.

Every message travels in one frame::

    struct frame_header {          /* network byte order, 14 bytes */
        char     magic[2];         /* "SF" */
        uint8_t  version;          /* WIRE_VERSION */
        uint8_t  type;             /* MsgType */
        uint16_t reserved;         /* 0 */
        uint32_t length;           /* payload bytes that follow */
        uint32_t crc;              /* CRC32C of header bytes 0..9 then the payload */
    };

Hot messages (WRITE, ACK, READ, READ_REPLY, PING, PONG) have fixed binary
layouts given in :data:`LAYOUTS`; rare ones (HELLO, WELCOME, REFUSE, CONTROL)
carry a JSON object so they can grow without a version bump.

Payloads carry a host's write as issued, up to 512 KiB (seed 002, "SteelFusion
replication metrics"); :data:`MAX_PAYLOAD` leaves room for the fixed part.

The module is I/O free: :func:`encode` turns a message into buffers for
``transport.writelines`` (the data is never copied), :class:`FrameDecoder`
turns received bytes into messages, and every decode failure raises
:class:`WireError` and nothing else.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar

import crc32c as _crc32c

MAGIC = b"SF"
WIRE_VERSION = 1
HEADER = struct.Struct(">2sBBHII")
HEADER_SIZE = HEADER.size  # 14
MAX_DATA = 1024 * 1024  # a host write (<= 512 KiB) or a read reply, with margin
MAX_PAYLOAD = MAX_DATA + 64
MAX_JSON = 256 * 1024


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC32C (Castagnoli), the iSCSI digest polynomial (RFC 7143 §13.1)."""
    return int(_crc32c.crc32c(data, value))


class WireError(Exception):
    """The peer sent bytes that are not a valid frame or message.

    ``code`` is a short machine-readable reason, sent back in a REFUSE where
    the connection is still usable enough to say why.
    """

    def __init__(self, message: str, code: str = "protocol-error") -> None:
        super().__init__(message)
        self.code = code


class MsgType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    REFUSE = 3
    WRITE = 4
    ACK = 5
    READ = 6
    READ_REPLY = 7
    PING = 8
    PONG = 9
    CONTROL = 10


class WriteFlags(enum.IntFlag):
    NONE = 0
    FUA = 1  # the host asked for forced unit access
    RESYNC = 2  # resync / initial sync payload: applied without sequence dedupe
    MIRROR = 4  # primary -> secondary copy of an Edge write


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame of every connection: who is calling, in what role, for what.

    ``purpose`` is ``edge`` (an Edge's data connection), ``replication``
    (Core to peer Core) or ``witness`` (a Core heartbeating its Witness).
    """

    node: str
    role: str
    purpose: str
    epoch: int = 0
    luns: dict[int, int] = field(default_factory=dict)  # lun id -> size in bytes
    info: dict[str, Any] = field(default_factory=dict)
    TYPE: ClassVar[MsgType] = MsgType.HELLO


@dataclass(frozen=True, slots=True)
class Welcome:
    """Accepts a HELLO; ``applied`` maps lun id -> (stream, highest applied seq)."""

    node: str
    role: str
    epoch: int = 0
    applied: dict[int, tuple[int, int]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    TYPE: ClassVar[MsgType] = MsgType.WELCOME


@dataclass(frozen=True, slots=True)
class Refuse:
    """Refuses a HELLO or ends a connection, with a reason a person can act on."""

    code: str
    reason: str
    info: dict[str, Any] = field(default_factory=dict)
    TYPE: ClassVar[MsgType] = MsgType.REFUSE


@dataclass(frozen=True, slots=True)
class Control:
    """Rare out-of-band notice (role change, epoch, alarm) as a JSON object."""

    body: dict[str, Any]
    TYPE: ClassVar[MsgType] = MsgType.CONTROL


@dataclass(frozen=True, slots=True)
class Write:
    """One write to one LUN.

    ``stream`` names the sequence space (an Edge blockstore's id, or a
    primary's resync stream); ``seq`` increases strictly within it, with gaps
    allowed, so a receiver can drop a resent write it already applied.
    """

    lun: int
    flags: int
    stream: int
    seq: int
    offset: int
    data: bytes | memoryview
    TYPE: ClassVar[MsgType] = MsgType.WRITE
    FIXED: ClassVar[struct.Struct] = struct.Struct(">IIQQQ")

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Write) and self.fixed() == other.fixed()
                and bytes(self.data) == bytes(other.data))

    def __hash__(self) -> int:
        return hash(self.fixed())

    def fixed(self) -> tuple[int, int, int, int, int]:
        return (self.lun, self.flags, self.stream, self.seq, self.offset)


@dataclass(frozen=True, slots=True)
class Ack:
    """Cumulative: every write of ``stream`` to ``lun`` with seq <= ``seq`` is durable."""

    lun: int
    stream: int
    seq: int
    TYPE: ClassVar[MsgType] = MsgType.ACK
    FIXED: ClassVar[struct.Struct] = struct.Struct(">IQQ")


@dataclass(frozen=True, slots=True)
class Read:
    req: int
    lun: int
    offset: int
    length: int
    TYPE: ClassVar[MsgType] = MsgType.READ
    FIXED: ClassVar[struct.Struct] = struct.Struct(">QIQI")


class ReadStatus(enum.IntEnum):
    OK = 0
    OUT_OF_RANGE = 1
    NO_SUCH_LUN = 2
    IO_ERROR = 3
    NOT_PRIMARY = 4


@dataclass(frozen=True, slots=True)
class ReadReply:
    req: int
    status: int
    data: bytes | memoryview
    TYPE: ClassVar[MsgType] = MsgType.READ_REPLY
    FIXED: ClassVar[struct.Struct] = struct.Struct(">QI")

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ReadReply) and (self.req, self.status) == (other.req, other.status)
                and bytes(self.data) == bytes(other.data))

    def __hash__(self) -> int:
        return hash((self.req, self.status))


@dataclass(frozen=True, slots=True)
class Ping:
    nonce: int
    sent: float
    TYPE: ClassVar[MsgType] = MsgType.PING
    FIXED: ClassVar[struct.Struct] = struct.Struct(">Qd")


@dataclass(frozen=True, slots=True)
class Pong:
    nonce: int
    sent: float
    TYPE: ClassVar[MsgType] = MsgType.PONG
    FIXED: ClassVar[struct.Struct] = struct.Struct(">Qd")


Message = Hello | Welcome | Refuse | Control | Write | Ack | Read | ReadReply | Ping | Pong

#: The fixed binary part of each hot message, written once as data.
LAYOUTS: dict[MsgType, struct.Struct] = {
    MsgType.WRITE: Write.FIXED,
    MsgType.ACK: Ack.FIXED,
    MsgType.READ: Read.FIXED,
    MsgType.READ_REPLY: ReadReply.FIXED,
    MsgType.PING: Ping.FIXED,
    MsgType.PONG: Pong.FIXED,
}


def _json_bytes(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _payload(msg: Message) -> list[bytes | memoryview]:
    if isinstance(msg, Write):
        return [Write.FIXED.pack(msg.lun, msg.flags, msg.stream, msg.seq, msg.offset), msg.data]
    if isinstance(msg, Ack):
        return [Ack.FIXED.pack(msg.lun, msg.stream, msg.seq)]
    if isinstance(msg, Read):
        return [Read.FIXED.pack(msg.req, msg.lun, msg.offset, msg.length)]
    if isinstance(msg, ReadReply):
        return [ReadReply.FIXED.pack(msg.req, msg.status), msg.data]
    if isinstance(msg, Ping | Pong):
        return [msg.FIXED.pack(msg.nonce, msg.sent)]
    if isinstance(msg, Hello):
        return [_json_bytes({"node": msg.node, "role": msg.role, "purpose": msg.purpose,
                             "epoch": msg.epoch, "luns": {str(k): v for k, v in msg.luns.items()},
                             "info": msg.info})]
    if isinstance(msg, Welcome):
        return [_json_bytes({"node": msg.node, "role": msg.role, "epoch": msg.epoch,
                             "applied": {str(k): list(v) for k, v in msg.applied.items()},
                             "info": msg.info})]
    if isinstance(msg, Refuse):
        return [_json_bytes({"code": msg.code, "reason": msg.reason, "info": msg.info})]
    if isinstance(msg, Control):
        return [_json_bytes(msg.body)]
    raise TypeError(f"not a wire message: {msg!r}")


def encode(msg: Message) -> list[bytes | memoryview]:
    """Buffers making up one frame; pass them to ``transport.writelines``.

    Large data is referenced, not copied; the CRC covers it in place.
    """
    parts = _payload(msg)
    length = sum(len(p) for p in parts)
    if length > MAX_PAYLOAD:
        raise ValueError(f"payload of {length} bytes exceeds {MAX_PAYLOAD}")
    head = HEADER.pack(MAGIC, WIRE_VERSION, msg.TYPE, 0, length, 0)
    crc = crc32c(memoryview(head)[:10])
    for p in parts:
        crc = crc32c(p, crc)
    return [head[:10] + crc.to_bytes(4, "big"), *parts]


def encode_bytes(msg: Message) -> bytes:
    """One frame as a single bytes object (tests, small control messages)."""
    return b"".join(bytes(p) for p in encode(msg))


def _u64(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**64:
        raise WireError(f"{what} must be an unsigned 64-bit integer")
    return v


def _decode_json(payload: memoryview) -> dict[str, Any]:
    if len(payload) > MAX_JSON:
        raise WireError("JSON body too large")
    try:
        obj = json.loads(bytes(payload))
    except (ValueError, UnicodeDecodeError) as e:
        raise WireError(f"bad JSON body: {e}") from None
    if not isinstance(obj, dict):
        raise WireError("JSON body is not an object")
    return obj


def _str(obj: dict[str, Any], key: str, default: str | None = None) -> str:
    v = obj.get(key, default)
    if not isinstance(v, str):
        raise WireError(f"field {key!r} must be a string")
    return v


def _dict(obj: dict[str, Any], key: str) -> dict[str, Any]:
    v = obj.get(key, {})
    if not isinstance(v, dict):
        raise WireError(f"field {key!r} must be an object")
    return v


def _lun_key(k: str) -> int:
    try:
        n = int(k)
    except ValueError:
        raise WireError(f"LUN id {k!r} is not an integer") from None
    if not 0 <= n < 2**32:
        raise WireError(f"LUN id {n} out of range")
    return n


def decode_payload(mtype: int, payload: memoryview) -> Message:
    """Decode one frame's payload; raises :class:`WireError` only."""
    try:
        t = MsgType(mtype)
    except ValueError:
        raise WireError(f"unknown message type {mtype}") from None
    layout = LAYOUTS.get(t)
    if layout is not None:
        if len(payload) < layout.size:
            raise WireError(f"{t.name} payload too short ({len(payload)} < {layout.size})")
        fixed = layout.unpack_from(payload)
        rest = payload[layout.size:]
        if t is MsgType.WRITE:
            if not rest:
                raise WireError("WRITE with no data")
            return Write(*fixed, data=rest)
        if t is MsgType.READ_REPLY:
            return ReadReply(*fixed, data=rest)
        if rest:
            raise WireError(f"{t.name} has {len(rest)} trailing bytes")
        if t is MsgType.ACK:
            return Ack(*fixed)
        if t is MsgType.READ:
            if fixed[3] > MAX_DATA:
                raise WireError(f"READ of {fixed[3]} bytes exceeds {MAX_DATA}")
            return Read(*fixed)
        if t is MsgType.PING:
            return Ping(*fixed)
        return Pong(*fixed)
    obj = _decode_json(payload)
    if t is MsgType.HELLO:
        luns = {_lun_key(k): _u64(v, "LUN size") for k, v in _dict(obj, "luns").items()}
        return Hello(node=_str(obj, "node"), role=_str(obj, "role"), purpose=_str(obj, "purpose"),
                     epoch=_u64(obj.get("epoch", 0), "epoch"), luns=luns, info=_dict(obj, "info"))
    if t is MsgType.WELCOME:
        applied: dict[int, tuple[int, int]] = {}
        for k, v in _dict(obj, "applied").items():
            if not isinstance(v, list) or len(v) != 2:
                raise WireError("applied entries must be [stream, seq]")
            applied[_lun_key(k)] = (_u64(v[0], "stream"), _u64(v[1], "seq"))
        return Welcome(node=_str(obj, "node"), role=_str(obj, "role"),
                       epoch=_u64(obj.get("epoch", 0), "epoch"), applied=applied,
                       info=_dict(obj, "info"))
    if t is MsgType.REFUSE:
        return Refuse(code=_str(obj, "code"), reason=_str(obj, "reason", ""), info=_dict(obj, "info"))
    return Control(body=obj)


class FrameDecoder:
    """Streaming frame parser: feed bytes in any split, get whole messages.

    Each complete payload is copied once out of the receive buffer into its
    own ``bytes``; message data fields are memoryviews into that copy.
    """

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        buf = self._buf
        buf += data
        out: list[Message] = []
        pos = self._pos
        end = len(buf)
        try:
            while end - pos >= HEADER_SIZE:
                magic, version, mtype, reserved, length, crc = HEADER.unpack_from(buf, pos)
                if magic != MAGIC:
                    raise WireError(f"bad magic {bytes(magic)!r}", "bad-magic")
                if version != WIRE_VERSION:
                    raise WireError(f"wire version {version}, we speak {WIRE_VERSION}",
                                    "version-mismatch")
                if reserved != 0:
                    raise WireError("reserved header field is not zero")
                if length > MAX_PAYLOAD:
                    raise WireError(f"frame of {length} bytes exceeds {MAX_PAYLOAD}", "too-large")
                if end - pos - HEADER_SIZE < length:
                    break
                start = pos + HEADER_SIZE
                payload = bytes(buf[start:start + length])
                got = crc32c(payload, crc32c(memoryview(buf)[pos:pos + 10]))
                if got != crc:
                    raise WireError(f"frame CRC32C mismatch (got {got:08x}, header {crc:08x})",
                                    "bad-crc")
                pos = start + length
                out.append(decode_payload(mtype, memoryview(payload)))
        finally:
            if pos:
                del buf[:pos]
                pos = 0
            self._pos = pos
        return out
