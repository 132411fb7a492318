"""The node wire codec and link state machine: round trips, splits, garbage, CRC."""

from __future__ import annotations

import random
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steelfusion.linkstate import TRANSITIONS, LinkDead, LinkMachine, LinkState
from steelfusion.wire import (
    DIRECT_MIN_BYTES,
    HEADER_SIZE,
    MAX_PAYLOAD,
    Ack,
    Control,
    FrameDecoder,
    Hello,
    Message,
    MsgType,
    Ping,
    Pong,
    Read,
    ReadReply,
    Refuse,
    Welcome,
    WireError,
    Write,
    WriteFlags,
    decode_payload,
    discard_data,
    encode_bytes,
)

SAMPLES = [
    Hello("edge-1", "edge", "edge", 3, {1: 1 << 30, 7: 4096}, {"stream": 99}),
    Welcome("core-a", "primary", 4, {1: (99, 12), 2: (0, 0)}, {"x": [1, 2]}),
    Refuse("lun-size-mismatch", "Edge says 1 GiB, Core has 2 GiB", {"lun": 1}),
    Control({"event": "role", "role": "primary", "epoch": 5}),
    Write(1, 1, 2**63 + 5, 2**64 - 1, 4096, b"\xab" * 4096, 2**64 - 2),
    Write(2**32 - 1, 0, 0, 1, 0, b"x"),
    Write(1, WriteFlags.DISCARD | WriteFlags.MIRROR, 7, 9, 1 << 20, discard_data(1 << 40), 8),
    Ack(3, 77, 2**64 - 1),
    Read(2**64 - 1, 5, 1 << 40, 65536),
    ReadReply(9, 0, b"data" * 100),
    ReadReply(10, 3, b""),
    Ping(1, 12.5),
    Pong(2, 0.0),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_roundtrip_whole(msg: object) -> None:
    raw = encode_bytes(msg)  # type: ignore[arg-type]
    assert FrameDecoder().feed(raw) == [msg]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_roundtrip_byte_by_byte(msg: object) -> None:
    raw = encode_bytes(msg)  # type: ignore[arg-type]
    d = FrameDecoder()
    out = []
    for i in range(len(raw)):
        got = d.feed(raw[i:i + 1])
        if i < len(raw) - 1:
            assert got == []
        out += got
    assert out == [msg]
    assert d.buffered == 0


def test_every_type_is_sampled() -> None:
    assert {m.TYPE for m in SAMPLES} == set(MsgType)


def test_all_frames_in_one_chunk_with_trailing_bytes() -> None:
    raw = b"".join(encode_bytes(m) for m in SAMPLES)  # type: ignore[arg-type]
    tail = encode_bytes(Ping(5, 1.0))[:7]
    d = FrameDecoder()
    assert d.feed(raw + tail) == SAMPLES
    assert d.buffered == 7
    assert d.feed(encode_bytes(Ping(5, 1.0))[7:]) == [Ping(5, 1.0)]


def test_bad_crc_rejected() -> None:
    raw = bytearray(encode_bytes(Write(1, 0, 1, 1, 0, b"abcd")))
    raw[-1] ^= 0x01
    with pytest.raises(WireError) as e:
        FrameDecoder().feed(bytes(raw))
    assert e.value.code == "bad-crc"


def test_header_crc_covers_type() -> None:
    raw = bytearray(encode_bytes(Ping(1, 1.0)))
    raw[3] = MsgType.PONG
    with pytest.raises(WireError):
        FrameDecoder().feed(bytes(raw))


@pytest.mark.parametrize("mutate,code", [
    (lambda b: b"XX" + b[2:], "bad-magic"),
    (lambda b: b[:2] + b"\x09" + b[3:], "version-mismatch"),
    (lambda b: b[:6] + (MAX_PAYLOAD + 1).to_bytes(4, "big") + b[10:], "too-large"),
])
def test_bad_headers(mutate: object, code: str) -> None:
    raw = mutate(encode_bytes(Ping(1, 1.0)))  # type: ignore[operator]
    with pytest.raises(WireError) as e:
        FrameDecoder().feed(raw)
    assert e.value.code == code


def test_largest_length_waits_for_its_payload() -> None:
    d = FrameDecoder()
    head = b"SF\x02\x04\x00\x00" + (MAX_PAYLOAD).to_bytes(4, "big") + b"\0\0\0\0"
    assert d.feed(head) == []  # a valid length: its own buffer, <= MAX_PAYLOAD, is all we take
    assert d.buffered == HEADER_SIZE


@given(st.binary(max_size=400))
@settings(max_examples=400, deadline=None)
def test_garbage_only_raises_wire_error(data: bytes) -> None:
    d = FrameDecoder()
    try:
        d.feed(data)
    except WireError:
        pass


@given(st.sampled_from(list(MsgType)), st.binary(max_size=300))
@settings(max_examples=400, deadline=None)
def test_garbage_payload_with_valid_crc(mtype: MsgType, payload: bytes) -> None:
    from steelfusion.wire import HEADER, MAGIC, WIRE_VERSION, crc32c

    head = HEADER.pack(MAGIC, WIRE_VERSION, mtype, 0, len(payload), 0)[:10]
    raw = head + crc32c(payload, crc32c(head)).to_bytes(4, "big") + payload
    try:
        FrameDecoder().feed(raw)
    except WireError:
        pass


@given(st.lists(st.sampled_from(SAMPLES), max_size=8), st.lists(st.integers(1, 64), max_size=30))
@settings(max_examples=150, deadline=None)
def test_any_split(msgs: list[object], cuts: list[int]) -> None:
    raw = b"".join(encode_bytes(m) for m in msgs)  # type: ignore[arg-type]
    d = FrameDecoder()
    out: list[object] = []
    pos = 0
    for c in cuts:
        out += d.feed(raw[pos:pos + c])
        pos += c
    out += d.feed(raw[pos:])
    assert out == msgs


# -- link state machine ----------------------------------------------------------------
def test_listener_needs_hello_first() -> None:
    m = LinkMachine(dialler=False, now=0.0)
    with pytest.raises(WireError):
        m.receive(Write(1, 0, 1, 1, 0, b"x"), 0.1)


def test_dialler_needs_welcome_first() -> None:
    m = LinkMachine(dialler=True, now=0.0)
    with pytest.raises(WireError):
        m.receive(Ack(1, 1, 1), 0.1)
    m2 = LinkMachine(dialler=True, now=0.0)
    m2.receive(Welcome("c", "primary"), 0.1)
    assert m2.state is LinkState.ESTABLISHED
    m2.receive(Ack(1, 1, 1), 0.2)


def test_refuse_closes() -> None:
    m = LinkMachine(dialler=True, now=0.0)
    m.receive(Refuse("x", "y"), 0.1)
    assert m.state is LinkState.CLOSED
    with pytest.raises(WireError):
        m.receive(Ping(1, 0), 0.2)


def test_ping_pong_and_dead_peer() -> None:
    m = LinkMachine(dialler=False, now=0.0, ping_interval=1.0, dead_after=3.0)
    m.receive(Hello("e", "edge", "edge"), 0.0)
    assert m.on_timer(0.5) == []
    pings = m.on_timer(1.0)
    assert len(pings) == 1 and isinstance(pings[0], Ping)
    assert m.receive(Ping(7, 1.0), 1.5) == [Pong(7, 1.0)]
    m.receive(Pong(pings[0].nonce, 1.0), 1.2)
    assert m.rtt == pytest.approx(0.2)
    with pytest.raises(LinkDead):
        m.on_timer(1.5 + 3.0)
    assert m.state is LinkState.CLOSED


# The link's rules, written out here rather than read from the table under test
# (issue 13: a test that takes its expected values from the code cannot fail).
_H, _W, _E, _C = (LinkState.AWAIT_HELLO, LinkState.AWAIT_WELCOME, LinkState.ESTABLISHED,
                  LinkState.CLOSED)
EXPECTED_LINK_RULES: dict[tuple[LinkState, str], LinkState] = {
    (_H, "HELLO"): _E,
    (_W, "WELCOME"): _E, (_W, "REFUSE"): _C, (_W, "PING"): _W, (_W, "PONG"): _W,
    (_E, "WRITE"): _E, (_E, "ACK"): _E, (_E, "READ"): _E, (_E, "READ_REPLY"): _E,
    (_E, "PING"): _E, (_E, "PONG"): _E, (_E, "CONTROL"): _E, (_E, "REFUSE"): _C,
}


def test_link_table_is_the_written_rules() -> None:
    assert {(s, t.name): n for (s, t), n in TRANSITIONS.items()} == EXPECTED_LINK_RULES


@given(st.sampled_from(list(LinkState)), st.sampled_from(SAMPLES))
def test_state_product(state: LinkState, msg: object) -> None:
    """Every (state, message) pair follows the written rules or raises WireError."""
    m = LinkMachine(dialler=False, now=0.0)
    m.state = state
    expected = EXPECTED_LINK_RULES.get((state, msg.TYPE.name))  # type: ignore[attr-defined]
    if expected is None:
        with pytest.raises(WireError):
            m.receive(msg, 1.0)  # type: ignore[arg-type]
    else:
        m.receive(msg, 1.0)  # type: ignore[arg-type]
        assert m.state is expected


# -- buffered interface (asyncio.BufferedProtocol) ----------------------------------------
def _recv(d: FrameDecoder, raw: bytes, cuts: list[int] | None = None) -> list[Message]:
    """Play a transport: each recv copies what is ready (a cut) into get_buffer's view."""
    out: list[Message] = []
    src = memoryview(raw)
    pos = 0
    for ready in [*(cuts or []), len(raw)]:
        ready = min(ready, len(raw) - pos)
        while ready:
            view = d.get_buffer(-1)
            assert len(view) > 0
            n = min(len(view), ready)
            view[:n] = src[pos:pos + n]
            pos += n
            ready -= n
            out += d.buffer_updated(n)
    return out


def _payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


# data sizes around the direct-receive threshold (on the payload, 28 bytes more than data)
_SIZES = [1, 512, 4096, DIRECT_MIN_BYTES - 28, DIRECT_MIN_BYTES - 27, DIRECT_MIN_BYTES,
          128 * 1024, 300_000, 512 * 1024]
_messages = st.one_of(
    st.sampled_from(SAMPLES),
    st.builds(lambda seq, n, seed: Write(1, 0, 7, seq, seq % 2**40 * 4096, _payload(seed, n)),
              st.integers(0, 2**64 - 1), st.sampled_from(_SIZES), st.integers(0, 2**16)),
    st.builds(lambda req, n, seed: ReadReply(req, 0, _payload(seed, n)),
              st.integers(0, 2**64 - 1), st.sampled_from(_SIZES), st.integers(0, 2**16)),
)


@given(st.lists(_messages, max_size=8),
       st.lists(st.one_of(st.integers(1, 64), st.integers(1, 300_000)), max_size=30))
@settings(max_examples=150, deadline=None)
def test_buffered_any_split(msgs: list[Message], cuts: list[int]) -> None:
    raw = b"".join(encode_bytes(m) for m in msgs)
    d = FrameDecoder()
    assert _recv(d, raw, cuts) == msgs
    assert d.buffered == 0


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_buffered_byte_by_byte(msg: Message) -> None:
    raw = encode_bytes(msg)
    d = FrameDecoder()
    assert _recv(d, raw, [1] * len(raw)) == [msg]


def test_large_write_byte_by_byte() -> None:
    msg = Write(1, 0, 7, 1, 0, _payload(1, DIRECT_MIN_BYTES + 1))
    raw = encode_bytes(msg)
    d = FrameDecoder()
    for i in range(len(raw) - 1):
        assert d.feed(raw[i:i + 1]) == []
        assert d.buffered == i + 1
    assert d.feed(raw[-1:]) == [msg]


BIG = Write(3, 1, 9, 42, 1 << 30, _payload(7, 512 * 1024))
BIG_RAW = encode_bytes(BIG)


@pytest.mark.parametrize("cuts", [
    [len(BIG_RAW)], [HEADER_SIZE], [HEADER_SIZE - 1], [HEADER_SIZE + 1], [HEADER_SIZE + 28],
    [1] * 100, [7] * 2000, [4096] * 200, [65536] * 10, [65535] * 10, [204800] * 3,
    [262144, 262144], [len(BIG_RAW) - 1], [HEADER_SIZE, len(BIG_RAW) - HEADER_SIZE - 1],
    [100, 200_000, 3, 300_000],
], ids=lambda c: f"{c[0]}x{len(c)}")
def test_512k_write_split(cuts: list[int]) -> None:
    d = FrameDecoder()
    assert _recv(d, BIG_RAW * 3, cuts) == [BIG] * 3
    rnd = random.Random(len(cuts))
    assert FrameDecoder().feed(BIG_RAW) == [BIG]
    d2, out, pos = FrameDecoder(), [], 0
    while pos < len(BIG_RAW):
        n = rnd.randint(1, 100_000)
        out += d2.feed(BIG_RAW[pos:pos + n])
        pos += n
    assert out == [BIG]


@pytest.mark.parametrize("size", [4096, DIRECT_MIN_BYTES + 1, 512 * 1024])
def test_decoded_data_does_not_alias_the_receive_buffer(size: int) -> None:
    first = Write(1, 0, 1, 1, 0, b"\x11" * size)
    later = [Write(1, 0, 1, seq, 0, bytes([seq]) * (seq * 997)) for seq in range(2, 250)]
    raw = b"".join(encode_bytes(m) for m in [first, *later]) + encode_bytes(BIG)[:5000]
    d = FrameDecoder()
    got = _recv(d, raw[:len(encode_bytes(first))], [size // 2])
    assert got == [first] and isinstance(got[0], Write)
    data = got[0].data
    assert _recv(d, raw[len(encode_bytes(first)):], [3000, 70_000] * 100) == later
    assert bytes(data) == b"\x11" * size  # the shared buffer wrapped many times meanwhile
    assert isinstance(data, memoryview) and data.readonly
    with pytest.raises(TypeError):
        data[0] = 0


def _outcome(chunks: list[bytes], buffered: bool) -> tuple[list[Message], str | None]:
    """Messages delivered until the first error, and that error's code."""
    d = FrameDecoder()
    out: list[Message] = []
    try:
        for c in chunks:
            out += _recv(d, c) if buffered else d.feed(c)
    except WireError as e:
        return out, e.code
    return out, None


_STREAM: list[Message] = [
    SAMPLES[4], Write(1, 0, 1, 2, 0, _payload(3, 100_000)), SAMPLES[6], BIG, SAMPLES[10],  # type: ignore[list-item]
]
_STREAM_RAW = b"".join(encode_bytes(m) for m in _STREAM)


@given(st.integers(0, len(_STREAM_RAW) - 1), st.integers(1, 255), st.binary(max_size=40),
       st.lists(st.integers(1, 200_000), max_size=12))
@settings(max_examples=200, deadline=None)
def test_corruption_fails_at_the_same_point_in_any_split(at: int, xor: int, tail: bytes,
                                                         cuts: list[int]) -> None:
    raw = bytearray(_STREAM_RAW + tail)
    raw[at] ^= xor
    try:
        ref, code = FrameDecoder().feed(bytes(raw)), None
    except WireError as e:
        code = e.code
        bounds = [len(encode_bytes(m)) for m in _STREAM]
        hit = next((k for k in range(len(bounds)) if at < sum(bounds[:k + 1])), len(bounds))
        ref = _STREAM[:hit]  # every frame before the damaged one, at most
    chunks, pos = [], 0
    for c in cuts:
        chunks.append(bytes(raw[pos:pos + c]))
        pos += c
    chunks.append(bytes(raw[pos:]))
    for buffered in (True, False):
        got, got_code = _outcome(chunks, buffered)
        assert got_code == code
        assert got == ref[:len(got)] if code else got == ref


@given(st.binary(max_size=400), st.lists(st.integers(1, 50), max_size=10))
@settings(max_examples=300, deadline=None)
def test_buffered_garbage_only_raises_wire_error(data: bytes, cuts: list[int]) -> None:
    try:
        _recv(FrameDecoder(), data, cuts)
    except WireError:
        pass


@pytest.mark.parametrize("length", [MAX_PAYLOAD + 1, 2**32 - 1])
def test_too_large_is_refused_before_allocating(length: int) -> None:
    head = b"SF\x02\x04\x00\x00" + length.to_bytes(4, "big") + b"\0\0\0\0"
    d = FrameDecoder()
    tracemalloc.start()
    try:
        with pytest.raises(WireError) as e:
            _recv(d, head + b"x" * 100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.code == "too-large"
    assert peak < 64 * 1024
    with pytest.raises(WireError) as e:  # the stream has no frame boundaries any more
        d.feed(encode_bytes(Ping(1, 1.0)))
    assert e.value.code == "too-large"


def test_large_frame_bad_crc_after_the_last_byte() -> None:
    raw = bytearray(BIG_RAW)
    raw[HEADER_SIZE + 300_000] ^= 0x40
    d = FrameDecoder()
    assert _recv(d, bytes(raw[:-1]), [HEADER_SIZE + 10, 65536]) == []
    with pytest.raises(WireError) as e:
        _recv(d, bytes(raw[-1:]))
    assert e.value.code == "bad-crc"


@given(st.lists(st.binary(min_size=1, max_size=5000), min_size=1, max_size=20),
       st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))
def test_encode_write_of_parts_is_the_joined_write(parts: list[bytes], lun: int, seq: int) -> None:
    from steelfusion.wire import encode_write

    raw = b"".join(bytes(b) for b in encode_write(lun, 0, 7, seq, 4096, [*parts]))
    assert raw == encode_bytes(Write(lun, 0, 7, seq, 4096, b"".join(parts)))
    (msg,) = FrameDecoder().feed(raw)
    assert isinstance(msg, Write) and bytes(msg.data) == b"".join(parts)


def test_write_prev_is_part_of_the_frame() -> None:
    from steelfusion.wire import encode_write
    """Issue 9: ``prev`` tells a resend from a hole; it must survive the wire exactly."""
    (w,) = FrameDecoder().feed(encode_bytes(Write(1, 0, 7, 12, 0, b"x", 9)))
    assert isinstance(w, Write) and (w.seq, w.prev) == (12, 9)
    assert Write(1, 0, 7, 12, 0, b"x", 9) != Write(1, 0, 7, 12, 0, b"x", 8)
    raw = b"".join(bytes(b) for b in encode_write(1, 0, 7, 12, 0, [b"x"], 9))
    assert raw == encode_bytes(Write(1, 0, 7, 12, 0, b"x", 9))


def test_a_discard_is_a_write_whose_data_is_the_range_length() -> None:
    """Issue 18: a DISCARD covers ``extent`` bytes of the LUN with 8 bytes on the wire; any
    other data length, or a zero length, is malformed (one error, the link's to answer)."""
    w = Write(1, WriteFlags.DISCARD, 7, 9, 4096, discard_data(32 << 20), 8)
    assert w.extent == 32 << 20 and len(w.data) == 8
    assert Write(1, 0, 7, 9, 4096, b"x" * 4096).extent == 4096
    fixed = Write.FIXED.pack(1, WriteFlags.DISCARD, 7, 9, 4096, 8)
    for bad in (b"\0" * 4, b"\0" * 8, b"\1" * 9):
        with pytest.raises(WireError, match="DISCARD"):
            decode_payload(int(MsgType.WRITE), memoryview(fixed + bad))
