"""The sans-IO initiator against the project's own target, wired in memory:
login (none, CHAP one-way and mutual, refusals), writes with immediate,
unsolicited and R2T data at several burst sizes, reads, both directions cut
whole, byte by byte and at random, the CmdSN window, NOP, sense, Reject,
Async Message, logout, and garbage from the target (RFC 7143)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steelfusion.iscsi import commands as cdbs
from steelfusion.iscsi import initiator
from steelfusion.iscsi.chap import ChapCredentials
from steelfusion.iscsi.initiator import InitiatorConfig, InitiatorConnection
from steelfusion.iscsi.pdu import (
    INITIATOR_OPCODES,
    RESERVED_TAG,
    AsyncMessage,
    DataIn,
    DataOut,
    LoginResponse,
    NopIn,
    NopOut,
    PduDecoder,
    Reject,
    ScsiCommand,
    ScsiResponse,
    data_out_header,
    sense_segment,
)
from steelfusion.iscsi.text import (
    InitiatorLimits,
    TargetLimits,
    encode_text,
)
from tests.initiator_pair import (
    BS,
    INITIATOR,
    IQN,
    SECRET,
    TSECRET,
    Chunker,
    Pair,
    bytewise,
    initiator_pdus,
    logged_in,
    pattern,
    random_cuts,
)

# --------------------------------------------------------------------------- data


def data_outs(p: Pair, fn: Callable[[], Any]) -> tuple[Any, list[Any]]:
    """Run ``fn`` and return what it returned and the PDUs the initiator sent."""
    taps: list[bytes] = []
    original = p.ini.data_to_send

    def tap() -> list[Any]:
        parts = original()
        taps.append(b"".join(bytes(b) for b in parts))
        return parts
    p.ini.data_to_send = tap  # type: ignore[method-assign]
    try:
        result = fn()
    finally:
        p.ini.data_to_send = original  # type: ignore[method-assign]
    return result, PduDecoder(accept=INITIATOR_OPCODES, max_data_segment_length=1 << 24).feed(
        b"".join(taps))


BURSTS = [
    # (initiator InitialR2T, ImmediateData, FirstBurstLength), (target MRDSL, MaxBurstLength)
    ((False, True, 65536), (8192, 262144)),  # immediate + unsolicited + R2T
    ((False, False, 16384), (4096, 16384)),  # unsolicited Data-Out only, small bursts
    ((True, True, 262144), (65536, 65536)),  # immediate, then R2T
    ((True, False, 65536), (512, 1024)),  # R2T only, tiny segments
    ((False, True, 512), (262144, 1048576)),  # one-segment immediate burst
]


@pytest.mark.parametrize("offer,target", BURSTS)
@pytest.mark.parametrize("size", [BS, 8 * BS, 600 * BS])
def test_write_read_round_trip_at_burst_sizes(offer: tuple[bool, bool, int],
                                              target: tuple[int, int], size: int) -> None:
    initial_r2t, immediate, fbl = offer
    mrdsl, mbl = target
    p = Pair(limits=InitiatorLimits(initial_r2t=initial_r2t, immediate_data=immediate,
                                    first_burst_length=fbl, max_burst_length=max(fbl, 1 << 20),
                                    max_recv_data_segment_length=16384),
             target_limits=TargetLimits(max_recv_data_segment_length=mrdsl,
                                        max_burst_length=mbl, first_burst_length=fbl,
                                        max_outstanding_r2t=2))
    params = logged_in(p).params
    data = pattern(size, size)
    done, pdus = data_outs(p, lambda: p.write(8, data))
    assert done.status == 0 and not done.underflow and not done.overflow
    assert p.backend.buf[8 * BS:8 * BS + size] == data
    (cmd,) = [x for x in pdus if isinstance(x, ScsiCommand)]
    outs = [x for x in pdus if type(x).__name__ == "DataOut"]
    unsolicited = [x for x in outs if x.ttt == RESERVED_TAG]
    imm = len(cmd.data)
    assert imm == (min(size, fbl, mrdsl) if params.immediate_data else 0)
    first = imm + sum(len(x.data) for x in unsolicited)
    assert first == (imm if params.initial_r2t else min(size, params.first_burst_length))
    assert cmd.final == (not unsolicited)
    assert all(len(x.data) <= mrdsl for x in outs)
    assert imm + sum(len(x.data) for x in outs) == size
    got = p.read(8, size // BS)
    assert got.status == 0 and bytes(got.data) == data


@pytest.mark.parametrize("chunks", [bytewise, random_cuts(7), random_cuts(8)],
                         ids=["bytewise", "random7", "random8"])
def test_chunking_both_directions(chunks: Chunker) -> None:
    p = Pair(chunks=chunks, limits=InitiatorLimits(first_burst_length=1024,
                                                   max_recv_data_segment_length=1024),
             target_limits=TargetLimits(max_recv_data_segment_length=512,
                                        max_burst_length=2048))
    logged_in(p)
    data = pattern(12 * BS, 5)
    tags = [p.ini.submit(cdbs.write16(i * 4, 4), data=data[i * 2048:(i + 1) * 2048])
            for i in range(3)]
    done = {e.tag: e for e in p.pump() if isinstance(e, initiator.CommandComplete)}
    assert sorted(done) == sorted(tags) and all(e.status == 0 for e in done.values())
    got = p.read(0, 12)
    assert bytes(got.data) == data


def test_read_into_callers_buffer_and_residuals() -> None:
    p = Pair()
    p.write(0, pattern(4 * BS, 2))
    buf = bytearray(4 * BS)
    tag = p.ini.submit(cdbs.read16(0, 4), read_length=4 * BS, into=memoryview(buf))
    (done,) = [e for e in p.pump() if isinstance(e, initiator.CommandComplete)]
    assert done.tag == tag and bytes(buf) == pattern(4 * BS, 2)
    assert isinstance(done.data, memoryview) and done.data.obj is buf
    # The CDB asks for one block, the command expects two: underflow of one block.
    short = p.run(cdbs.read16(0, 1), read_length=2 * BS)
    assert short.status == 0 and short.underflow and short.residual == BS
    assert bytes(short.data) == pattern(4 * BS, 2)[:BS]
    # The CDB asks for two, the command expects one: overflow; only one arrives.
    over = p.run(cdbs.read16(0, 2), read_length=BS)
    assert over.overflow and over.residual == BS and len(over.data) == BS


def test_multi_pdu_data_in_is_reassembled() -> None:
    p = Pair(limits=InitiatorLimits(max_recv_data_segment_length=1024, max_burst_length=4096,
                                    first_burst_length=4096))
    data = pattern(64 * BS, 9)
    p.write(0, data)
    got = p.read(0, 64)
    assert bytes(got.data) == data


def test_check_condition_sense_is_decoded() -> None:
    p = Pair(blocks=64)
    done = p.read(63, 2)
    assert done.status == 0x02 and done.sense is not None
    assert (done.sense.key, done.sense.asc, done.sense.ascq) == (5, 0x21, 0)
    assert str(done.sense) == "5/21/00"
    assert cdbs.parse_sense(bytes((0x72, 0x06, 0x29, 0x01))) == cdbs.Sense(6, 0x29, 1, bytes(
        (0x72, 0x06, 0x29, 0x01)))
    assert cdbs.parse_sense(b"\x00\x00\x00\x00") is None
    assert cdbs.parse_sense(b"") is None


def test_commands_wait_while_the_window_is_closed() -> None:
    p = Pair(window=2)
    p.hold = True
    tags = [p.ini.submit(cdbs.write16(i, 1), data=pattern(BS, i)) for i in range(5)]
    p.pump()
    assert len(p.held) == 2 and p.ini.queued == 3 and p.ini.window == 0
    events = p.release()
    while p.held:
        events += p.release()
    done = [e.tag for e in events if isinstance(e, initiator.CommandComplete)]
    assert sorted(done) == sorted(tags) and p.ini.queued == 0 and p.ini.outstanding == 0
    assert all(p.backend.buf[i * BS:(i + 1) * BS] == pattern(BS, i) for i in range(5))


def test_cancel_only_reaches_unsent_commands() -> None:
    p = Pair(window=1)
    p.hold = True
    sent = p.ini.submit(cdbs.tur())
    queued = p.ini.submit(cdbs.tur())
    p.pump()
    assert p.ini.cancel(queued) and not p.ini.cancel(sent) and not p.ini.cancel(12345)
    done = [e.tag for e in p.release() if isinstance(e, initiator.CommandComplete)]
    assert done == [sent] and p.ini.outstanding == 0


def test_many_commands_pipelined_across_itt_and_cmdsn_wrap() -> None:
    p = Pair(window=16)
    p.ini._next_itt = 0xFFFFFFF0  # ITTs wrap, skipping 0xffffffff and 0
    tags = [p.ini.submit(cdbs.write16(i, 1), data=pattern(BS, i)) for i in range(40)]
    assert RESERVED_TAG not in tags and 0 not in tags and len(set(tags)) == 40
    done = [e for e in p.pump() if isinstance(e, initiator.CommandComplete)]
    assert len(done) == 40 and all(e.status == 0 for e in done)


# --------------------------------------------------------------------------- CDBs through edge.scsi


def test_cdbs_agree_with_edge_scsi() -> None:
    p = Pair(blocks=4096)
    assert p.run(cdbs.tur()).status == 0
    cap = p.run(cdbs.read_capacity16(), read_length=32)
    assert cdbs.parse_capacity16(cap.data) == (BS, 4096)
    inq = p.run(cdbs.inquiry(), read_length=255)
    assert inq.status == 0 and bytes(inq.data[8:16]).startswith(b"STEELFUS")
    vpd = p.run(cdbs.inquiry(0x80), read_length=255)
    assert vpd.status == 0 and vpd.data[1] == 0x80
    luns = p.run(cdbs.report_luns(), read_length=4096)
    assert cdbs.parse_report_luns(luns.data) == [0]
    assert cdbs.parse_report_luns(bytes.fromhex("00000010 00000000 0000000000000000"
                                                "4123000000000000")) == [0, 0x123]
    data = pattern(8 * BS, 4)
    assert p.run(cdbs.write16(100, 8, fua=True), data=data).status == 0
    assert p.backend.writes[-1] == (100 * BS, 8 * BS, True)
    assert bytes(p.run(cdbs.read16(100, 8, fua=True), read_length=8 * BS).data) == data
    flushes = p.backend.flushes
    assert p.run(cdbs.sync_cache16()).status == 0 and p.backend.flushes == flushes + 1
    assert p.run(cdbs.sync_cache16(4090, 10)).sense.asc == 0x21  # type: ignore[union-attr]
    assert cdbs.lun_field(3) == 3 << 48 and cdbs.lun_field(300) == (0x4000 | 300) << 48
    with pytest.raises(ValueError):
        cdbs.lun_field(1 << 14)


def test_persistent_reservation_cdbs_agree_with_edge_scsi() -> None:
    p = Pair()

    def out(action: cdbs.PrOut, key: int, sa_key: int = 0, pr_type: int = 0) -> int:
        cdb, params = cdbs.pr_out(action, key, sa_key, pr_type)
        return p.run(cdb, data=params).status

    def keys() -> tuple[int, list[int]]:
        return cdbs.parse_read_keys(p.run(cdbs.pr_in(cdbs.PrIn.READ_KEYS),
                                          read_length=8192).data)

    def reservation() -> tuple[int, int | None, int | None]:
        return cdbs.parse_read_reservation(p.run(cdbs.pr_in(cdbs.PrIn.READ_RESERVATION),
                                                 read_length=8192).data)

    assert keys() == (0, []) and reservation() == (0, None, None)
    assert out(cdbs.PrOut.REGISTER, 0, 0xABC) == 0
    assert keys() == (1, [0xABC])
    assert out(cdbs.PrOut.REGISTER_AND_IGNORE, 0, 0xABC) == 0  # idempotent re-register
    assert out(cdbs.PrOut.RESERVE, 0xABC, pr_type=1) == 0
    assert reservation()[1:] == (0xABC, 1)
    assert out(cdbs.PrOut.RESERVE, 0xABC, pr_type=1) == 0  # the holder again: GOOD
    assert out(cdbs.PrOut.RESERVE, 0xDEF, pr_type=1) == 0x18  # not our key: conflict
    assert out(cdbs.PrOut.PREEMPT, 0xABC, 0xABC, 3) == 0
    assert reservation()[1:] == (0xABC, 3)
    assert out(cdbs.PrOut.RELEASE, 0xABC, pr_type=3) == 0
    assert reservation()[1:] == (None, None)
    assert out(cdbs.PrOut.CLEAR, 0xABC) == 0 and keys()[1] == []
    with pytest.raises(ValueError):
        cdbs.parse_read_keys(b"\0")
    with pytest.raises(ValueError):
        cdbs.parse_capacity16(b"\0" * 8)


# --------------------------------------------------------------------------- NOP, Reject, Async, Logout


def test_target_ping_is_answered_and_plain_nop_in_is_not() -> None:
    p = Pair()
    sn = p.tgt._statsn
    ping = NopIn(ttt=0x1234, lun=0, statsn=sn, exp_cmdsn=1, max_cmdsn=128, data=b"echo")
    assert p.ini.receive_data(ping.encode()) == []
    (answer,) = initiator_pdus(p.ini)
    assert isinstance(answer, NopOut) and answer.ttt == 0x1234 and answer.itt == RESERVED_TAG
    assert answer.immediate and bytes(answer.data) == b"echo"
    quiet = NopIn(statsn=sn, exp_cmdsn=1, max_cmdsn=128)
    assert p.ini.receive_data(quiet.encode()) == [] and initiator_pdus(p.ini) == []


def test_keepalive_pings_when_quiet_and_reports_a_dead_connection() -> None:
    p = Pair(nop_interval_s=5.0)
    ini = p.ini
    assert ini.get_timer() == 5.0
    assert ini.handle_timer(5.0) == [] and initiator_pdus(ini) == []  # login traffic counts
    assert ini.get_timer() == 10.0
    ini.handle_timer(10.0)  # quiet since: ping
    assert ini.get_timer() == 15.0  # ping deadline (nop_timeout_s 5)
    assert p.pump() == [] and ini._ping_itt is None  # the target answers
    assert ini.get_timer() == 15.0  # the next ping is due an interval after the last
    ini.handle_timer(15.0)
    (ping,) = initiator_pdus(ini)  # this one is lost
    assert isinstance(ping, NopOut) and ping.ttt == RESERVED_TAG and ping.immediate
    assert ini.get_timer() == 20.0
    (dead,) = ini.handle_timer(20.0)
    assert isinstance(dead, initiator.ConnectionDead) and ini.state is initiator.State.CLOSED


def test_keepalive_patience_while_data_flows() -> None:
    p = Pair(nop_interval_s=5.0)
    p.ini.handle_timer(5.0)
    p.ini.handle_timer(10.0)
    assert len(initiator_pdus(p.ini)) == 1  # the ping is lost...
    p.write(0, pattern(BS))  # ...but the target is talking
    assert p.ini.handle_timer(15.0) == [] and p.ini.get_timer() == 20.0
    (dead,) = p.ini.handle_timer(20.0)
    assert isinstance(dead, initiator.ConnectionDead)


def test_reject_of_a_command_ends_it_and_others_are_reported() -> None:
    p = Pair()
    p.hold = True
    tag = p.ini.submit(cdbs.tur())
    (cmd,) = initiator_pdus(p.ini)
    sn = p.tgt._statsn
    reject = Reject(reason=0x0C, statsn=sn, exp_cmdsn=cmd.cmdsn + 1, max_cmdsn=cmd.cmdsn + 64,
                    data=cmd.encode()[:48])
    (ev,) = p.ini.receive_data(reject.encode())
    assert ev == initiator.CommandRejected(tag, 0x0C) and p.ini.outstanding == 0
    other = Reject(reason=0x09, statsn=sn + 1, exp_cmdsn=cmd.cmdsn + 1,
                   max_cmdsn=cmd.cmdsn + 64, data=NopOut(itt=77).encode())
    assert p.ini.receive_data(other.encode()) == [initiator.Rejected(0x09, 0x00)]
    short = Reject(reason=0x04, statsn=sn + 2, exp_cmdsn=cmd.cmdsn + 1,
                   max_cmdsn=cmd.cmdsn + 64, data=b"\0" * 8)
    assert p.ini.receive_data(short.encode()) == [initiator.Rejected(0x04, None)]


def test_async_messages() -> None:
    p = Pair()
    sn = p.tgt._statsn

    def message(event: int, data: bytes = b"") -> list[Any]:
        return p.ini.receive_data(AsyncMessage(event=event, statsn=sn, exp_cmdsn=1,
                                               max_cmdsn=128, parameter1=1, parameter2=2,
                                               parameter3=3, data=data).encode())
    assert message(1) == [initiator.LogoutRequested(3)]
    assert message(2) == [initiator.TargetWillDrop(False, 2, 3)]
    assert message(3) == [initiator.TargetWillDrop(True, 2, 3)]
    sense = bytes((0x70, 0, 6, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x3F, 0x0E, 0, 0, 0, 0))
    (ev,) = message(0, sense_segment(sense))
    assert isinstance(ev, initiator.AsyncEvent) and ev.sense is not None and ev.sense.asc == 0x3F
    assert message(4) == [initiator.AsyncEvent(4, None, (1, 2, 3))]


def test_logout_after_running_commands() -> None:
    p = Pair()
    p.hold = True
    tag = p.ini.submit(cdbs.write16(0, 1), data=pattern(BS))
    p.pump()
    p.ini.logout()
    with pytest.raises(initiator.LocalProtocolError):
        p.ini.submit(cdbs.tur())
    events = p.release()
    done, logout = events
    assert isinstance(done, initiator.CommandComplete) and done.tag == tag
    assert logout == initiator.LogoutComplete(0, 0, 0)
    assert p.ini.state is initiator.State.CLOSED and p.ini.get_timer() is None


@pytest.mark.parametrize("digests", [(True, True), (True, False)])
def test_digests_when_both_sides_want_them(digests: tuple[bool, bool]) -> None:
    p = Pair(limits=InitiatorLimits(header_digest=digests[0], data_digest=digests[1]))
    params = logged_in(p).params
    assert (params.header_digest, params.data_digest) == digests
    data = pattern(40 * BS, 11)
    assert p.write(0, data).status == 0
    assert bytes(p.read(0, 40).data) == data


# --------------------------------------------------------------------------- garbage from the target


def test_protocol_errors_from_the_target() -> None:
    def fresh() -> Pair:
        p = Pair()
        p.hold = True
        return p

    def raises(p: Pair, pdu: Any) -> None:
        with pytest.raises(initiator.TargetProtocolError):
            p.ini.receive_data(pdu.encode())
        assert p.ini.state is initiator.State.CLOSED
        assert p.ini.receive_data(b"\0" * 48) == []

    raises(fresh(), ScsiResponse(itt=999, statsn=1, exp_cmdsn=1, max_cmdsn=1))
    raises(fresh(), DataIn(itt=999, statsn=1, exp_cmdsn=1, max_cmdsn=1, data=b"x" * 4))
    raises(fresh(), NopIn(itt=999, statsn=1, exp_cmdsn=1, max_cmdsn=1))
    raises(fresh(), LoginResponse(itt=1, statsn=1, exp_cmdsn=1, max_cmdsn=1))
    p = fresh()
    p.ini.submit(cdbs.read16(0, 1), read_length=BS)
    (cmd,) = initiator_pdus(p.ini)
    raises(p, DataIn(itt=cmd.itt, datasn=1, statsn=1, exp_cmdsn=1, max_cmdsn=1, data=b"x" * 4))
    p = fresh()
    p.ini.submit(cdbs.read16(0, 1), read_length=BS)
    (cmd,) = initiator_pdus(p.ini)
    raises(p, DataIn(itt=cmd.itt, datasn=0, statsn=1, exp_cmdsn=1, max_cmdsn=1,
                     data=b"x" * (BS + 4)))
    p = fresh()
    p.ini.submit(cdbs.write16(0, 1), data=pattern(BS))
    (cmd,) = initiator_pdus(p.ini)
    from steelfusion.iscsi.pdu import R2T
    raises(p, R2T(itt=cmd.itt, ttt=5, statsn=1, exp_cmdsn=1, max_cmdsn=1, buffer_offset=256,
                  desired_length=512))
    ini = InitiatorConnection(InitiatorConfig(INITIATOR, IQN))
    with pytest.raises(initiator.TargetProtocolError):
        ini.receive_data(NopIn(statsn=0, exp_cmdsn=1, max_cmdsn=1).encode())


TARGET_PDUS = st.one_of(
    st.builds(ScsiResponse, itt=st.integers(0, 3), status=st.integers(0, 255),
              statsn=st.integers(0, 2**32 - 1), exp_cmdsn=st.integers(0, 2**32 - 1),
              max_cmdsn=st.integers(0, 2**32 - 1), data=st.binary(max_size=40)),
    st.builds(DataIn, itt=st.integers(0, 3), datasn=st.integers(0, 2),
              buffer_offset=st.integers(0, 1024), status_present=st.booleans(),
              final=st.booleans(), statsn=st.integers(0, 9), exp_cmdsn=st.integers(0, 9),
              max_cmdsn=st.integers(0, 300), data=st.binary(max_size=600)),
    st.builds(NopIn, itt=st.sampled_from([RESERVED_TAG, 1, 2]),
              ttt=st.sampled_from([RESERVED_TAG, 7]), statsn=st.integers(0, 9),
              exp_cmdsn=st.integers(0, 9), max_cmdsn=st.integers(0, 9)),
    st.builds(Reject, reason=st.integers(0, 255), statsn=st.integers(0, 9),
              data=st.binary(max_size=60)),
    st.builds(AsyncMessage, event=st.integers(0, 255), statsn=st.integers(0, 9),
              data=st.binary(max_size=30)),
    st.builds(LoginResponse, itt=st.integers(0, 3), status_class=st.integers(0, 3),
              transit=st.booleans(), csg=st.integers(0, 3), nsg=st.integers(0, 3),
              data=st.binary(max_size=60)),
    st.binary(min_size=1, max_size=120),
)


def _feed_garbage(ini: InitiatorConnection, items: list[Any], cut: int) -> None:
    wire = b"".join(x if isinstance(x, bytes) else x.encode() for x in items)
    try:
        for i in range(0, len(wire), cut):
            ini.receive_data(wire[i:i + cut])
            ini.data_to_send()
    except initiator.TargetProtocolError:
        assert ini.state is initiator.State.CLOSED


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(TARGET_PDUS, max_size=6), cut=st.sampled_from([1, 7, 48, 10000]),
       mode=st.sampled_from(["ffp-read", "ffp-write", "login-chap", "login"]))
def test_garbage_from_the_target_only_raises_target_protocol_error(
        items: list[Any], cut: int, mode: str) -> None:
    if mode.startswith("ffp"):
        p = Pair()
        p.hold = True
        if mode == "ffp-read":
            p.ini.submit(cdbs.read16(0, 2), read_length=2 * BS)
        else:
            p.ini.submit(cdbs.write16(0, 2), data=pattern(2 * BS))
        p.ini.data_to_send()
        ini = p.ini
    else:
        chap = ChapCredentials("alice", SECRET) if mode == "login-chap" else None
        ini = InitiatorConnection(InitiatorConfig(INITIATOR, IQN, chap=chap,
                                                  mutual=ChapCredentials("t", TSECRET)
                                                  if chap else None))
        ini.data_to_send()
    _feed_garbage(ini, items, cut)


def test_garbage_during_a_chap_login() -> None:
    """Login Responses with the right ITT/ISID but junk CHAP keys."""
    for keys in ([("AuthMethod", "CHAP")], [("CHAP_A", "²"), ("CHAP_I", "1"), ("CHAP_C", "0x1")],
                 [("CHAP_A", "5"), ("CHAP_I", "300"), ("CHAP_C", "0x1")],
                 [("CHAP_A", "5"), ("CHAP_I", "1"), ("CHAP_C", "zz")]):
        ini = InitiatorConnection(InitiatorConfig(INITIATOR, IQN,
                                                  chap=ChapCredentials("alice", SECRET)))
        (req,) = initiator_pdus(ini)
        events = ini.receive_data(LoginResponse(itt=req.itt, isid=req.isid,
                                                data=encode_text([("AuthMethod", "CHAP")])
                                                ).encode())
        initiator_pdus(ini)
        events = ini.receive_data(LoginResponse(itt=req.itt, isid=req.isid, statsn=1,
                                                data=encode_text(keys)).encode())
        if keys[0] != ("AuthMethod", "CHAP"):
            (failed,) = events
            assert isinstance(failed, initiator.LoginFailed) and failed.reason.startswith("CHAP")


@given(final=st.booleans(), length=st.integers(0, 2**24 - 1), lun=st.integers(0, 2**64 - 1),
       itt=st.integers(0, 2**32 - 1), ttt=st.integers(0, 2**32 - 1),
       sn=st.integers(0, 2**32 - 1), datasn=st.integers(0, 2**32 - 1),
       offset=st.integers(0, 2**32 - 1))
def test_data_out_header_matches_the_layout(final: bool, length: int, lun: int, itt: int,
                                            ttt: int, sn: int, datasn: int,
                                            offset: int) -> None:
    head = data_out_header(final, length, lun, itt, ttt, sn, datasn, offset)
    spec = DataOut(final=final, lun=lun, itt=itt, ttt=ttt, exp_statsn=sn, datasn=datasn,
                   buffer_offset=offset).header()
    assert head[:4] == spec[:4] and head[5:8] == length.to_bytes(3, "big")
    assert head[8:] == spec[8:]
