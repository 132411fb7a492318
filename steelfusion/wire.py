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
turns received bytes into messages (as ``asyncio.BufferedProtocol`` buffers,
so large payloads are received in place), and every decode failure raises
:class:`WireError` and nothing else.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import crc32c as _crc32c

from steelfusion.membuf import uninitialized

MAGIC = b"SF"
WIRE_VERSION = 2  # 2: WRITE carries ``prev`` (issue 9: gaps must be seen)
HEADER = struct.Struct(">2sBBHII")
HEADER_SIZE = HEADER.size  # 14
MAX_DATA = 1024 * 1024  # a host write (<= 512 KiB) or a read reply, with margin
MAX_PAYLOAD = MAX_DATA + 64
MAX_JSON = 256 * 1024


crc32c: Callable[..., int] = _crc32c.crc32c
"""``crc32c(data, value=0)``: CRC32C (Castagnoli), the iSCSI digest polynomial
(RFC 7143 §13.1), hardware-accelerated. The C function itself, not a wrapper:
it runs several times per host write."""

_crc = crc32c


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
    # (mirror) the primary journaled writes before this one instead of mirroring them
    # (suspended): the hole in front of it is being filled by a resync, not by a resend
    HOLE_RESYNCED = 8
    # the host deallocated the range (UNMAP, WRITE SAME with UNMAP): the data is the range's
    # length (uint64); applied as a hole punch, reads zeros after (LBPRZ; issue 18)
    DISCARD = 16


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

    @property
    def instance(self) -> str | None:
        """The calling process's random id (``info.instance``), set by ``link.dial``."""
        v = self.info.get("instance")
        return v if isinstance(v, str) else None

    def impostor_of(self, held: Hello | None) -> bool:
        """True if ``held`` is the same node name from another process.

        Two processes with one config (a copy started by mistake, a node
        restarted on a second host) prove the same key, so authentication
        cannot tell them apart; the per-process instance id can. Issue 13:
        accepting both let them take each other's links every heartbeat.
        """
        return (held is not None and held.node == self.node and self.instance is not None
                and held.instance is not None and held.instance != self.instance)


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

    ``prev`` is the seq of the write that comes before this one in the
    stream, as the sender knows it (a coalesced frame: the one before its
    first write). A receiver that has not applied ``prev`` has a hole in
    front of this write and must refuse it, never skip over it (DESIGN
    invariant 6). Layout::

        struct write { uint32 lun; uint32 flags; uint64 stream; uint64 seq;
                       uint64 offset; uint64 prev; uint8 data[]; };
    """

    lun: int
    flags: int
    stream: int
    seq: int
    offset: int
    data: bytes | memoryview
    prev: int = 0
    TYPE: ClassVar[MsgType] = MsgType.WRITE
    FIXED: ClassVar[struct.Struct] = struct.Struct(">IIQQQQ")

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Write) and self.fixed() == other.fixed()
                and bytes(self.data) == bytes(other.data))

    def __hash__(self) -> int:
        return hash(self.fixed())

    def fixed(self) -> tuple[int, int, int, int, int, int]:
        return (self.lun, self.flags, self.stream, self.seq, self.offset, self.prev)

    @property
    def extent(self) -> int:
        """Bytes of the LUN this write covers: its data's length, or a discard's range."""
        if self.flags & WriteFlags.DISCARD:
            return int.from_bytes(self.data, "big")
        return len(self.data)


DISCARD_LEN = struct.Struct(">Q")


def discard_data(length: int) -> bytes:
    """A DISCARD write's data: the length of the range deallocated."""
    return DISCARD_LEN.pack(length)


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
class _Probe:
    """What PING and its PONG both carry, one layout: the pinger's ``nonce``
    and send time, which the PONG echoes so the pinger measures the round trip."""

    nonce: int
    sent: float
    FIXED: ClassVar[struct.Struct] = struct.Struct(">Qd")


@dataclass(frozen=True, slots=True)
class Ping(_Probe):
    TYPE: ClassVar[MsgType] = MsgType.PING


@dataclass(frozen=True, slots=True)
class Pong(_Probe):
    TYPE: ClassVar[MsgType] = MsgType.PONG


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
        return [Write.FIXED.pack(msg.lun, msg.flags, msg.stream, msg.seq, msg.offset, msg.prev),
                msg.data]
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
    return _frame(msg.TYPE, _payload(msg))


def encode_write(lun: int, flags: int, stream: int, seq: int, offset: int,
                 data: list[bytes | memoryview], prev: int = 0) -> list[bytes | memoryview]:
    """One WRITE frame whose data is ``data`` concatenated, without joining it.

    The Edge coalesces contiguous host writes into one frame; the receiver
    sees an ordinary WRITE. Saves a copy of every shipped byte.
    """
    return _frame(MsgType.WRITE, [Write.FIXED.pack(lun, flags, stream, seq, offset, prev), *data])


def _frame(mtype: int, parts: list[bytes | memoryview]) -> list[bytes | memoryview]:
    length = sum(len(p) for p in parts)
    if length > MAX_PAYLOAD:
        raise ValueError(f"payload of {length} bytes exceeds {MAX_PAYLOAD}")
    head = HEADER.pack(MAGIC, WIRE_VERSION, mtype, 0, length, 0)
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


_MSG_TYPES: dict[int, MsgType] = {int(t): t for t in MsgType}


def decode_payload(mtype: int, payload: memoryview) -> Message:
    """Decode one frame's payload; raises :class:`WireError` only."""
    t = _MSG_TYPES.get(mtype)  # MsgType(mtype) alone took 1/8 of a small frame's decode
    if t is None:
        raise WireError(f"unknown message type {mtype}")
    layout = LAYOUTS.get(t)
    if layout is not None:
        if len(payload) < layout.size:
            raise WireError(f"{t.name} payload too short ({len(payload)} < {layout.size})")
        fixed = layout.unpack_from(payload)
        rest = payload[layout.size:]
        if t is MsgType.WRITE:
            if not rest:
                raise WireError("WRITE with no data")
            lun, flags, stream, seq, offset, prev = fixed
            if flags & WriteFlags.DISCARD and (len(rest) != DISCARD_LEN.size
                                               or not int.from_bytes(rest, "big")):
                raise WireError(f"DISCARD write with {len(rest)} data bytes (want a nonzero "
                                f"uint64 length)")
            return Write(lun, flags, stream, seq, offset, rest, prev)
        if t is MsgType.READ_REPLY:
            req, status = fixed
            return ReadReply(req, status, rest)
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


#: Receive buffer for headers and small frames: allocated once, reused, never resized.
RECV_BUFFER_BYTES = 256 * 1024
#: A payload larger than this that is not yet all here is received into its own buffer.
DIRECT_MIN_BYTES = 64 * 1024
#: Move the partial tail to the front rather than offer the kernel less room than this;
#: at least DIRECT_MIN_BYTES, so any small frame still pending fits without compacting again.
RECV_MIN_BYTES = DIRECT_MIN_BYTES
assert RECV_BUFFER_BYTES >= RECV_MIN_BYTES + HEADER_SIZE + DIRECT_MIN_BYTES


class FrameDecoder:
    """Streaming frame parser over a receive buffer; whole messages come out.

    It speaks ``asyncio.BufferedProtocol``: :meth:`get_buffer` says where the
    next received bytes go, :meth:`buffer_updated` decodes them. Beyond the
    kernel's copy into those buffers, a small frame's payload is copied once
    out of the shared receive buffer into its own ``bytes``, and a large one
    (over :data:`DIRECT_MIN_BYTES`) not at all: once its header is in, the
    rest of its payload is received straight into a buffer of exactly its
    size that then belongs to the message. Either way a message never
    aliases memory the decoder reuses (``Write.data`` is a read-only view of
    a buffer only the message holds), so it can sit in a mirror queue.

    A framing error (magic, version, reserved, length, CRC) loses the frame
    boundaries, so it is raised again on every later call; a frame that is
    well framed but not a valid message is consumed before its error.
    """

    __slots__ = (
        "_buf",
        "_dcrc",
        "_direct",
        "_drun",
        "_dtype",
        "_end",
        "_failed",
        "_fill",
        "_mv",
        "_start",
    )

    def __init__(self) -> None:
        self._buf = bytearray(RECV_BUFFER_BYTES)
        self._mv = memoryview(self._buf)
        self._start = 0  # first byte in _buf not yet decoded
        self._end = 0  # end of the received bytes in _buf
        self._direct: memoryview | None = None  # payload of the large frame being received
        self._fill = 0  # bytes of it received so far
        self._dtype = 0  # its message type, header CRC, and running CRC32C
        self._dcrc = 0
        self._drun = 0
        self._failed: tuple[str, str] | None = None  # (message, code) of a framing error

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded (including a large frame's header)."""
        n = self._end - self._start
        if self._direct is not None:
            n += HEADER_SIZE + self._fill
        return n

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes go, valid until :meth:`buffer_updated`.

        ``sizehint`` is ignored (asyncio passes -1, uvloop libuv's 64 KiB): we
        offer all the room we have, so one ``recv`` takes as much as is ready.
        """
        d = self._direct
        if d is not None:
            return d[self._fill:]
        if self._failed is not None:
            return self._mv
        start, end = self._start, self._end
        if start == end:  # all decoded: start over for free
            self._start = self._end = 0
            return self._mv
        if len(self._buf) - end < RECV_MIN_BYTES:
            n = end - start  # a partial frame, <= HEADER_SIZE + DIRECT_MIN_BYTES
            self._mv[:n] = self._mv[start:end]  # memoryview assignment is a memmove
            self._start, self._end = 0, n
            return self._mv[n:]
        return self._mv[end:]

    def buffer_updated(self, nbytes: int) -> list[Message]:
        """``nbytes`` were written at the start of the last :meth:`get_buffer` view."""
        if self._failed is not None:
            raise WireError(*self._failed)
        if self._direct is not None:
            return self._direct_updated(nbytes)
        if not 0 <= nbytes <= len(self._buf) - self._end:
            raise ValueError(f"buffer_updated({nbytes}) past the buffer handed out")
        self._end += nbytes
        return self._decode()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Decode the next bytes of the stream, in any split (tests, non-buffered transports)."""
        src = memoryview(data).cast("B")
        n = len(src)
        if not n:
            return self.buffer_updated(0)
        out: list[Message] = []
        pos = 0
        while pos < n:
            view = self.get_buffer(n - pos)
            k = min(len(view), n - pos)
            view[:k] = src[pos:pos + k]
            pos += k
            out += self.buffer_updated(k)
        return out

    def _fail(self, message: str, code: str = "protocol-error") -> WireError:
        self._failed = (message, code)
        return WireError(message, code)

    def _decode(self) -> list[Message]:
        buf, mv, end = self._buf, self._mv, self._end
        pos = self._start
        out: list[Message] = []
        try:
            while end - pos >= HEADER_SIZE:
                magic, version, mtype, reserved, length, crc = HEADER.unpack_from(buf, pos)
                if magic != MAGIC:
                    raise self._fail(f"bad magic {bytes(magic)!r}", "bad-magic")
                if version != WIRE_VERSION:
                    raise self._fail(f"wire version {version}, we speak {WIRE_VERSION}",
                                     "version-mismatch")
                if reserved != 0:
                    raise self._fail("reserved header field is not zero")
                if length > MAX_PAYLOAD:
                    raise self._fail(f"frame of {length} bytes exceeds {MAX_PAYLOAD}", "too-large")
                start = pos + HEADER_SIZE
                stop = start + length
                if stop > end:
                    if length > DIRECT_MIN_BYTES:
                        self._begin_direct(pos, mtype, length, crc)
                        pos = end
                    break
                payload = bytes(mv[start:stop])  # the one copy; the message owns it
                got = _crc(payload, _crc(mv[pos:pos + 10]))
                if got != crc:
                    raise self._fail(f"frame CRC32C mismatch (got {got:08x}, header {crc:08x})",
                                     "bad-crc")
                pos = stop
                out.append(decode_payload(mtype, memoryview(payload)))
        finally:
            self._start = pos
        return out

    def _begin_direct(self, pos: int, mtype: int, length: int, crc: int) -> None:
        """Move a large frame's first bytes into its own buffer; the kernel fills the rest."""
        src = self._mv[pos + HEADER_SIZE:self._end]
        d = uninitialized(length)  # length was checked against MAX_PAYLOAD; filled before use
        d[:len(src)] = src
        self._direct, self._fill = d, len(src)
        self._dtype, self._dcrc = mtype, crc
        self._drun = _crc(src, _crc(self._mv[pos:pos + 10]))

    def _direct_updated(self, nbytes: int) -> list[Message]:
        d = self._direct
        assert d is not None
        fill = self._fill
        if not 0 <= nbytes <= len(d) - fill:
            raise ValueError(f"buffer_updated({nbytes}) past the buffer handed out")
        self._drun = _crc(d[fill:fill + nbytes], self._drun)
        self._fill = fill = fill + nbytes
        if fill < len(d):
            return []
        self._direct = None
        if self._drun != self._dcrc:
            raise self._fail(f"frame CRC32C mismatch (got {self._drun:08x}, "
                             f"header {self._dcrc:08x})", "bad-crc")
        return [decode_payload(self._dtype, d.toreadonly())]
