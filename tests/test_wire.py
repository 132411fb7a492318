"""The node wire codec and link state machine: round trips, splits, garbage, CRC."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steelfusion.linkstate import TRANSITIONS, LinkDead, LinkMachine, LinkState
from steelfusion.wire import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    Ack,
    Control,
    FrameDecoder,
    Hello,
    MsgType,
    Ping,
    Pong,
    Read,
    ReadReply,
    Refuse,
    Welcome,
    WireError,
    Write,
    encode_bytes,
)

SAMPLES = [
    Hello("edge-1", "edge", "edge", 3, {1: 1 << 30, 7: 4096}, {"stream": 99}),
    Welcome("core-a", "primary", 4, {1: (99, 12), 2: (0, 0)}, {"x": [1, 2]}),
    Refuse("lun-size-mismatch", "Edge says 1 GiB, Core has 2 GiB", {"lun": 1}),
    Control({"event": "role", "role": "primary", "epoch": 5}),
    Write(1, 1, 2**63 + 5, 2**64 - 1, 4096, b"\xab" * 4096),
    Write(2**32 - 1, 0, 0, 1, 0, b"x"),
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


def test_huge_length_does_not_allocate() -> None:
    d = FrameDecoder()
    head = b"SF\x01\x04\x00\x00" + (MAX_PAYLOAD).to_bytes(4, "big") + b"\0\0\0\0"
    assert d.feed(head) == []  # waits for the payload, allocates nothing big
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


@given(st.sampled_from(list(LinkState)), st.sampled_from(SAMPLES))
def test_state_product(state: LinkState, msg: object) -> None:
    """Every (state, message) pair either follows the table or raises WireError."""
    m = LinkMachine(dialler=False, now=0.0)
    m.state = state
    expected = TRANSITIONS.get((state, msg.TYPE))  # type: ignore[attr-defined]
    if expected is None:
        with pytest.raises(WireError):
            m.receive(msg, 1.0)  # type: ignore[arg-type]
    else:
        m.receive(msg, 1.0)  # type: ignore[arg-type]
        assert m.state is expected
