"""Fuzzing: garbage and hostile PDU sequences into the decoder and the target
state machine.  The one invariant (h11 fuzz/ style): parse, or raise
IscsiProtocolError; nothing else escapes."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.iscsi_session import ScsiCommandReady, State, TargetConnection, encode_lun
from steelfusion.iscsi.pdu import (
    INITIATOR_OPCODES,
    RESERVED_TAG,
    DataOut,
    IscsiProtocolError,
    LoginRequest,
    LogoutRequest,
    NopOut,
    Pdu,
    PduDecoder,
    ScsiCommand,
    SnackRequest,
    TaskMgmtRequest,
    TextRequest,
)
from steelfusion.iscsi.text import encode_text
from tests.test_iscsi_pdu import SAMPLES
from tests.test_iscsi_session import INITIATOR, IQN, LIBISCSI_KEYS, PORTAL, Initiator, make_config

FUZZ = settings(max_examples=int(__import__("os").environ.get("FUZZ_N", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _feed_decoder(dec: PduDecoder, chunks: list[bytes]) -> None:
    try:
        for c in chunks:
            dec.feed(c)
    except IscsiProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=4096), st.booleans(), st.booleans())
def test_decoder_garbage(blob: bytes, hd: bool, dd: bool) -> None:
    _feed_decoder(PduDecoder(header_digest=hd, data_digest=dd, max_data_segment_length=65536),
                  [blob])


@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_decoder_garbage_chunked(chunks: list[bytes]) -> None:
    _feed_decoder(PduDecoder(accept=INITIATOR_OPCODES), chunks)


@FUZZ
@given(st.sampled_from(SAMPLES), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)),
                                          min_size=1, max_size=6), st.booleans())
def test_decoder_mutated_valid_pdus(pdu: Pdu, flips: list[tuple[int, int]], dig: bool) -> None:
    wire = bytearray(pdu.encode(dig, dig) * 2)
    for pos, val in flips:
        wire[pos % len(wire)] = val
    _feed_decoder(PduDecoder(header_digest=dig, data_digest=dig), [bytes(wire)])


@FUZZ
@given(st.lists(st.integers(1, 300000), max_size=8), st.one_of(st.none(), st.integers(0, 10**6)),
       st.integers(0, 255), st.booleans())
def test_decoder_large_pdus_random_splits(cuts: list[int], flip: int | None, val: int,
                                          dig: bool) -> None:
    """The exact-size assembly path for big PDUs, split anywhere, possibly
    corrupted: same PDUs out, or IscsiProtocolError."""
    pdus = [DataOut(itt=1, data=bytes(range(256)) * 300), NopOut(itt=2, data=b"x"),
            DataOut(itt=3, data=b"y" * 70001)]
    stream = bytearray(b"".join(p.encode(dig, dig) for p in pdus))
    if flip is not None:
        stream[flip % len(stream)] ^= val or 1
    points = sorted({c % len(stream) for c in cuts} | {0, len(stream)})
    dec = PduDecoder(header_digest=dig, data_digest=dig)
    got: list[Pdu] = []
    try:
        for a, b in itertools.pairwise(points):
            got += dec.feed(bytes(stream[a:b]))
    except IscsiProtocolError:
        assert flip is not None
        return
    if flip is None:
        assert got == pdus


# --------------------------------------------------------------------------- session

u32 = st.integers(0, 2**32 - 1)
near = st.one_of(st.integers(0, 12), u32)
tags = st.one_of(st.integers(0x100, 0x10C), st.just(RESERVED_TAG), u32)
luns = st.sampled_from([0, encode_lun(1), encode_lun(9), 1, 2**64 - 1])
payload = st.binary(max_size=700)
cdbs = st.one_of(
    st.sampled_from([bytes((0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0)), bytes((0x2A, 0, 0, 0, 0, 0, 0, 0, 2, 0)),
                     bytes((0x12, 0, 0, 0, 36)), bytes(16)]),
    st.binary(min_size=16, max_size=40))

pdus: st.SearchStrategy[Pdu] = st.one_of(
    st.builds(NopOut, itt=tags, ttt=tags, lun=luns, cmdsn=near, exp_statsn=u32,
              immediate=st.booleans(), data=payload),
    st.builds(ScsiCommand, itt=tags, lun=luns, cmdsn=near, exp_statsn=u32,
              expected_length=st.one_of(st.integers(0, 70000), u32), cdb=cdbs,
              final=st.booleans(), read=st.booleans(), write=st.booleans(),
              attr=st.integers(0, 7), immediate=st.booleans(),
              bidi_read_length=st.one_of(st.none(), u32), data=payload),
    st.builds(DataOut, itt=tags, ttt=st.one_of(st.integers(0, 8), st.just(RESERVED_TAG), u32),
              lun=luns, exp_statsn=u32, datasn=st.one_of(st.integers(0, 4), u32),
              buffer_offset=st.one_of(st.sampled_from([0, 512, 1024, 65536]), u32),
              final=st.booleans(), data=payload),
    st.builds(TaskMgmtRequest, itt=tags, function=st.integers(0, 127), lun=luns,
              ref_task_tag=tags, cmdsn=near, exp_statsn=u32, ref_cmdsn=near,
              exp_datasn=u32, immediate=st.booleans()),
    st.builds(TextRequest, itt=tags, ttt=tags, lun=luns, cmdsn=near, exp_statsn=u32,
              final=st.booleans(), cont=st.booleans(), immediate=st.booleans(),
              data=st.one_of(payload, st.sampled_from([b"SendTargets=All\0", b"SendTargets=\0",
                                                       b"MaxRecvDataSegmentLength=512\0",
                                                       b"Foo\0", b"A=\xff\0"]))),
    st.builds(LogoutRequest, itt=tags, reason=st.integers(0, 127), cid=st.integers(0, 3),
              cmdsn=near, exp_statsn=u32, immediate=st.booleans()),
    st.builds(SnackRequest, itt=tags, snack_type=st.integers(0, 15), lun=luns, ttt=tags),
    st.builds(LoginRequest, itt=tags, isid=st.integers(0, 2**48 - 1),
              tsih=st.integers(0, 3), cmdsn=near, transit=st.booleans(), cont=st.booleans(),
              csg=st.integers(0, 3), nsg=st.integers(0, 3), version_max=st.integers(0, 2),
              version_min=st.integers(0, 2), data=payload),
)

READ10 = bytes((0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0)).ljust(16, b"\0")
WRITE10 = bytes((0x2A, 0, 0, 0, 0, 0, 0, 0, 2, 0)).ljust(16, b"\0")
my_tags = st.integers(0x100, 0x10C)


def _write(itt: int, cmdsn: int, edtl: int, imm: int, final: bool, immediate: bool) -> Pdu:
    return ScsiCommand(itt=itt, cmdsn=cmdsn, expected_length=edtl, cdb=WRITE10, write=True,
                       final=final, immediate=immediate, data=bytes(min(imm, edtl)))


# Well-formed traffic, so commands get far enough to be dispatched and
# completed while the hostile PDUs above hit them.
coherent: st.SearchStrategy[Pdu] = st.one_of(
    st.builds(ScsiCommand, itt=my_tags, cmdsn=st.integers(0, 12),
              expected_length=st.sampled_from([0, 200, 512, 4096]), cdb=st.just(READ10),
              read=st.just(True), immediate=st.booleans()),
    st.builds(_write, my_tags, st.integers(0, 12), st.sampled_from([0, 512, 1024, 70000]),
              st.sampled_from([0, 512, 1024, 8192]), st.booleans(), st.booleans()),
    st.builds(DataOut, itt=my_tags, ttt=st.one_of(st.integers(1, 6), st.just(RESERVED_TAG)),
              datasn=st.integers(0, 3), buffer_offset=st.sampled_from([0, 512, 1024, 8192]),
              final=st.booleans(), data=st.sampled_from([bytes(512), bytes(1024)])),
    st.builds(TaskMgmtRequest, itt=my_tags, function=st.sampled_from([1, 2, 5, 6]),
              ref_task_tag=my_tags, cmdsn=st.integers(0, 12), immediate=st.just(True)),
    st.builds(NopOut, itt=my_tags, cmdsn=st.integers(0, 12), immediate=st.just(True)),
)
ffp_pdus = st.one_of(coherent, coherent, coherent, pdus)

login_texts = st.lists(st.sampled_from([
    ("InitiatorName", INITIATOR), ("TargetName", IQN), ("TargetName", "iqn.none"),
    ("SessionType", "Discovery"), ("SessionType", "Normal"), ("SessionType", "x"),
    ("AuthMethod", "None"), ("AuthMethod", "CHAP"), ("HeaderDigest", "CRC32C"),
    ("DataDigest", "CRC32C,None"), ("MaxBurstLength", "512"), ("FirstBurstLength", "99999999"),
    ("MaxRecvDataSegmentLength", "512"), ("InitialR2T", "Maybe"), ("X-foo", "bar"),
    *LIBISCSI_KEYS]), max_size=12)
login_pdus = st.builds(LoginRequest, itt=tags, isid=st.just(5), tsih=st.integers(0, 1),
                       cmdsn=st.just(1), transit=st.booleans(), cont=st.booleans(),
                       csg=st.integers(0, 3), nsg=st.integers(0, 3),
                       version_max=st.just(0), version_min=st.integers(0, 1),
                       data=login_texts.map(encode_text))


def _drive(ini: Initiator, data: Any, steps: list[Pdu]) -> None:
    """Send PDUs; complete whatever commands become ready with random
    results, sometimes late, sometimes twice; only protocol errors escape."""
    conn = ini.conn
    ready: list[ScsiCommandReady] = []
    try:
        for pdu in steps:
            hd, dd = conn.params.header_digest, conn.params.data_digest
            if conn.state is not State.FULL_FEATURE:
                hd = dd = False
            for ev in conn.receive_data(pdu.encode(hd, dd)):
                if isinstance(ev, ScsiCommandReady):
                    ready.append(ev)
            while ready and data.draw(st.booleans(), label="complete now"):
                ev = ready.pop(data.draw(st.integers(0, len(ready) - 1), label="which"))
                conn.complete(ev.task_tag, data.draw(st.sampled_from([0, 2, 8]), label="status"),
                              data.draw(st.binary(max_size=3000), label="data"),
                              data.draw(st.sampled_from([b"", bytes(18)]), label="sense"),
                              data.draw(st.one_of(st.none(), st.integers(0, 9000)),
                                        label="transfer_length"))
            conn.data_to_send()
        for ev in ready:
            conn.complete(ev.task_tag, 0, b"x" * 100)
            conn.complete(ev.task_tag, 0)
        conn.data_to_send()
    except IscsiProtocolError:
        assert conn.state is State.CLOSED


@FUZZ
@given(st.data(), st.lists(ffp_pdus, max_size=30))
def test_session_full_feature_fuzz(data: Any, steps: list[Pdu]) -> None:
    ini = Initiator(max_write_buffer_bytes=16384)
    assert ini.login().status_class == 0
    _drive(ini, data, steps)


@FUZZ
@given(st.data(), st.lists(pdus, max_size=15))
def test_session_discovery_fuzz(data: Any, steps: list[Pdu]) -> None:
    ini = Initiator()
    assert ini.login(discovery=True).status_class == 0
    _drive(ini, data, steps)


@FUZZ
@given(st.data(), st.lists(st.one_of(login_pdus, pdus), max_size=8))
def test_session_login_phase_fuzz(data: Any, steps: list[Pdu]) -> None:
    ini = Initiator(TargetConnection(make_config(), portal=PORTAL, tsih=3))
    _drive(ini, data, steps)


@FUZZ
@given(st.binary(max_size=3000))
def test_session_raw_garbage_after_login(blob: bytes) -> None:
    ini = Initiator()
    ini.login()
    try:
        ini.conn.receive_data(blob)
    except IscsiProtocolError:
        assert ini.conn.state is State.CLOSED


STATES = ["login", "normal", "discovery", "logout_pending"]


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("sample", range(len(SAMPLES)))
def test_state_by_input_product(state: str, sample: int) -> None:
    """Every (state, PDU type) pair either works or raises IscsiProtocolError."""
    ini = Initiator()
    if state == "normal":
        ini.login()
    elif state == "discovery":
        ini.login(discovery=True)
    elif state == "logout_pending":
        ini.login()
        ini.command(bytes((0x28,)) + bytes(15), edtl=512, read=True)
        ini.send(LogoutRequest(itt=9, cmdsn=ini.cmdsn, immediate=True))
    try:
        ini.conn.receive_data(SAMPLES[sample].encode())
    except IscsiProtocolError:
        assert ini.conn.state is State.CLOSED
    ini.conn.data_to_send()
