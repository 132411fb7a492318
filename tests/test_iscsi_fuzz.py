"""Fuzzing: garbage and hostile PDU sequences into the decoder and the target
state machine.  The one invariant (h11 fuzz/ style): parse, or raise
IscsiProtocolError; nothing else escapes."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.iscsi_session import ScsiCommandReady, State, TargetConnection
from edge.scsi.cdb import encode_lun
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
from tests.iscsi_helpers import (
    INITIATOR,
    IQN,
    LIBISCSI_KEYS,
    PORTAL,
    SAMPLES,
    Initiator,
    make_config,
)

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


# --------------------------------------------------------------------------- negotiation

_KEYS = ["HeaderDigest", "DataDigest", "MaxConnections", "InitialR2T", "ImmediateData",
         "MaxRecvDataSegmentLength", "MaxBurstLength", "FirstBurstLength", "DefaultTime2Wait",
         "DefaultTime2Retain", "MaxOutstandingR2T", "DataPDUInOrder", "DataSequenceInOrder",
         "ErrorRecoveryLevel", "IFMarker", "OFMarker", "iSCSIProtocolLevel", "TaskReporting",
         "SendTargets", "TargetAlias", "X-vendor", "InitiatorName", "SessionType"]
_VALUES = st.one_of(st.sampled_from(["Yes", "No", "None", "CRC32C", "CRC32C,None", "0", "1",
                                     "511", "512", "65536", "262144", "16777215", "16777216",
                                     "0x200", "0x", "-1", "NotUnderstood", "Reject",
                                     "Irrelevant", ""]),
                    st.integers(0, 2**40).map(str), st.text(max_size=12))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(_KEYS), _VALUES), max_size=30), st.booleans())
def test_negotiation_answers_only_offers_within_range(offers: list[tuple[str, str]],
                                                      discovery: bool) -> None:
    """RFC 7143 §6.2, §13: any offer list gets an answer for offered keys only
    (open-iscsi fails on anything else), and the outcome stays within the
    ranges of §13 with FirstBurstLength <= MaxBurstLength."""
    from steelfusion.iscsi.text import Negotiator

    neg = Negotiator(discovery=discovery)
    answer = neg.respond(offers)
    offered = {k for k, _ in offers}
    assert {k for k, _ in answer} <= offered
    p = neg.params
    assert 512 <= p.max_burst_length < 2**24 and 512 <= p.first_burst_length < 2**24
    assert p.first_burst_length <= p.max_burst_length
    assert 1 <= p.max_outstanding_r2t <= 65535 and p.error_recovery_level == 0
    assert p.max_connections == 1 and 512 <= p.max_recv_data_segment_length < 2**24
    for k, v in answer:
        if k in ("MaxBurstLength", "FirstBurstLength") and v.isdigit():
            assert int(v) <= neg.limits.max_burst_length


# --------------------------------------------------------------------------- CHAP login

_CHAP_SECRET = b"fuzz-secret-0123"
_chap_keys = st.lists(st.one_of(
    st.sampled_from([("AuthMethod", "CHAP"), ("AuthMethod", "None"), ("AuthMethod", "CHAP,None"),
                     ("CHAP_A", "5"), ("CHAP_A", "5,6,7,8"), ("CHAP_A", "56"), ("CHAP_A", ""),
                     ("CHAP_N", "alice"), ("CHAP_N", ""), ("CHAP_I", "1"), ("CHAP_I", "999"),
                     ("InitiatorName", INITIATOR), ("TargetName", IQN),
                     ("SessionType", "Discovery")]),
    st.tuples(st.sampled_from(["CHAP_R", "CHAP_C"]),
              st.one_of(st.binary(max_size=40).map(lambda b: "0x" + b.hex()),
                        st.text(max_size=20))),
    st.sampled_from(LIBISCSI_KEYS)), max_size=10)
chap_login_pdus = st.builds(LoginRequest, itt=st.just(1), isid=st.just(5), tsih=st.just(0),
                            cmdsn=st.just(1), transit=st.booleans(), cont=st.just(False),
                            csg=st.sampled_from([0, 0, 1, 3]), nsg=st.sampled_from([1, 3, 0]),
                            data=_chap_keys.map(encode_text))


def _chap_config() -> Any:
    from edge.auth import Access, ChapAuthenticator, ChapCredentials
    creds = ChapCredentials("alice", _CHAP_SECRET)
    auth = ChapAuthenticator({IQN: Access(chap=creds)}, discovery=Access(chap=creds))
    return make_config(authenticator=auth)


@FUZZ
@given(st.lists(chap_login_pdus, min_size=1, max_size=8))
def test_chap_cannot_be_bypassed(steps: list[Pdu]) -> None:
    """No sequence of login PDUs (skipped stages, AuthMethod=None, bad or
    missing CHAP keys, stage jumps) reaches Full Feature Phase without the
    secret; only protocol errors escape (RFC 7143 §6.3, §12)."""
    conn = TargetConnection(_chap_config(), portal=PORTAL, tsih=4)
    try:
        for pdu in steps:
            conn.receive_data(pdu.encode())
            conn.data_to_send()
    except IscsiProtocolError:
        assert conn.state is State.CLOSED
    assert conn.state is not State.FULL_FEATURE


# --------------------------------------------------------------------------- resets across sessions


@FUZZ
@given(st.data(), st.lists(ffp_pdus, max_size=25))
def test_deferred_resets_and_foreign_aborts(data: Any, steps: list[Pdu]) -> None:
    """With resets deferred to the adapter and tasks aborted from other
    sessions at random moments: no task is answered after it was aborted,
    every ResetRequested gets exactly one answer, nothing but protocol errors
    escape."""
    from edge.iscsi_session import ResetRequested, TasksAborted
    from steelfusion.iscsi.pdu import ScsiResponse, TaskMgmtResponse

    ini = Initiator(max_write_buffer_bytes=16384, defer_resets=True)
    assert ini.login().status_class == 0
    conn = ini.conn
    dec = PduDecoder(accept=None, max_data_segment_length=1 << 24)
    ready: dict[int, ScsiCommandReady] = {}
    aborted: set[int] = set()
    resets: list[int] = []

    def take(events: list[Any]) -> None:
        for ev in events:
            if isinstance(ev, ScsiCommandReady):
                ready[ev.task_tag] = ev
                aborted.discard(ev.task_tag)
            elif isinstance(ev, TasksAborted):
                aborted.update(ev.task_tags)
            elif isinstance(ev, ResetRequested):
                resets.append(ev.task_tag)

    def drain() -> None:
        for pdu in dec.feed(b"".join(bytes(b) for b in conn.data_to_send())):
            if isinstance(pdu, ScsiResponse):
                assert pdu.itt not in aborted, "status for an aborted task"
            if isinstance(pdu, TaskMgmtResponse) and pdu.itt in resets:
                resets.remove(pdu.itt)
    try:
        for pdu in steps:
            take(conn.receive_data(pdu.encode()))
            drain()
            if data.draw(st.booleans(), label="foreign abort"):
                take(conn.abort_tasks(data.draw(st.one_of(st.none(), st.just({0})))))
            if ready and data.draw(st.booleans(), label="complete"):
                tag = data.draw(st.sampled_from(sorted(ready)))
                ev = ready.pop(tag)
                take(conn.complete(ev.task_tag, 0, bytes(min(ev.expected_length, 600))))
                drain()
                aborted.discard(tag)  # the ITT may be reused from now on
            if resets and data.draw(st.booleans(), label="answer reset"):
                take(conn.complete_tmf(resets[0]))
            drain()
    except IscsiProtocolError:
        assert conn.state is State.CLOSED


# --------------------------------------------------------------------------- atheris

_ATHERIS_INITIATOR = Initiator


def fuzz_one_input(data: bytes) -> None:
    """One input for a coverage-guided fuzzer (atheris): the first byte picks
    the scenario (raw decoder, login with CHAP, full feature after a good
    login, discovery), the second the chunk size, the rest is the byte stream
    from a hostile initiator.  Invariant: only IscsiProtocolError escapes."""
    if len(data) < 2:
        return
    mode, step, stream = data[0] % 4, data[1] % 97 + 1, data[2:]
    chunks = [stream[i:i + step] for i in range(0, len(stream), step)]
    if mode == 0:
        _feed_decoder(PduDecoder(accept=INITIATOR_OPCODES, max_data_segment_length=65536),
                      chunks)
        return
    if mode == 1:
        conn = TargetConnection(_chap_config(), portal=PORTAL, tsih=5)
    else:
        ini = _ATHERIS_INITIATOR(max_write_buffer_bytes=16384, defer_resets=bool(data[1] & 1))
        if ini.login(discovery=mode == 3).status_class:
            return
        conn = ini.conn
    try:
        for c in chunks:
            for ev in conn.receive_data(c):
                if isinstance(ev, ScsiCommandReady):
                    conn.complete(ev.task_tag, c[0] % 3 if c else 0,
                                  bytes(min(ev.expected_length, 1024)))
            conn.data_to_send()
    except IscsiProtocolError:
        assert conn.state is State.CLOSED
    if mode == 1:
        assert conn.state is not State.FULL_FEATURE


@FUZZ
@given(st.binary(min_size=2, max_size=2000))
def test_fuzz_one_input(data: bytes) -> None:
    fuzz_one_input(data)


if __name__ == "__main__":  # pragma: no cover - coverage-guided fuzzing, run by hand
    # python -m tests.test_iscsi_fuzz [corpus_dir] [-atheris_runs=N]  (pip install atheris)
    import sys

    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, fuzz_one_input)
    atheris.Fuzz()
