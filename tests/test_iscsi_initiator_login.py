"""The sans-IO initiator's login against the project's own target, in memory: none, CHAP
one-way and mutual, refusals, redirects, timeouts, and its negotiation rules (RFC 7143
§6, §12; RFC 1994)."""

from __future__ import annotations

from typing import Any

import pytest

from edge.auth import Access
from steelfusion.iscsi import commands as cdbs
from steelfusion.iscsi import initiator
from steelfusion.iscsi.chap import AuthConfigError, ChapClient, ChapCredentials
from steelfusion.iscsi.initiator import InitiatorConfig, InitiatorConnection
from steelfusion.iscsi.pdu import (
    INITIATOR_OPCODES,
    LoginResponse,
    PduDecoder,
)
from steelfusion.iscsi.text import (
    InitiatorLimits,
    InitiatorNegotiator,
    NegotiationError,
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
    whole,
)

# --------------------------------------------------------------------------- login


def test_login_without_auth_negotiates_both_ways() -> None:
    p = Pair(limits=InitiatorLimits(max_recv_data_segment_length=65536,
                                    max_burst_length=524288, first_burst_length=131072),
             target_limits=TargetLimits(max_recv_data_segment_length=32768,
                                        max_burst_length=262144))
    params = logged_in(p).params
    assert params.target_max_recv_data_segment_length == 32768
    assert params.max_recv_data_segment_length == 65536
    assert p.tgt.params.max_recv_data_segment_length == 65536
    assert params.max_burst_length == 262144 == p.tgt.params.max_burst_length
    assert params.first_burst_length == 131072 == p.tgt.params.first_burst_length
    assert not params.initial_r2t and params.immediate_data
    assert params.error_recovery_level == 0 and not params.header_digest
    assert logged_in(p).tsih == 5 and logged_in(p).portal_group_tag == 1


@pytest.mark.parametrize("chunks", [whole, bytewise, random_cuts(3)])
def test_login_chap_one_way(chunks: Chunker) -> None:
    p = Pair(chap=ChapCredentials("alice", SECRET),
             access=Access(chap=ChapCredentials("alice", SECRET)), chunks=chunks)
    logged_in(p)
    assert p.write(0, pattern(BS)).status == 0


def test_login_chap_mutual() -> None:
    p = Pair(chap=ChapCredentials("alice", SECRET), mutual=ChapCredentials("tgt", TSECRET),
             access=Access(chap=ChapCredentials("alice", SECRET),
                           mutual=ChapCredentials("tgt", TSECRET)))
    logged_in(p)


@pytest.mark.parametrize("case", ["wrong-secret", "wrong-user", "no-credentials",
                                  "mutual-wrong-target-secret", "mutual-not-offered",
                                  "target-needs-none"])
def test_login_chap_failures(case: str) -> None:
    alice = ChapCredentials("alice", SECRET)
    tgt = ChapCredentials("tgt", TSECRET)
    chap: ChapCredentials | None = alice
    mutual: ChapCredentials | None = None
    access: Access | None = Access(chap=alice)
    if case == "wrong-secret":
        chap = ChapCredentials("alice", b"not-the-secret-at-all")
    elif case == "wrong-user":
        chap = ChapCredentials("bob", SECRET)
    elif case == "no-credentials":
        chap = None  # the target requires CHAP, we skip the security stage
    elif case == "mutual-wrong-target-secret":
        mutual = ChapCredentials("tgt", b"other-target-secret")
        access = Access(chap=alice, mutual=tgt)
    elif case == "mutual-not-offered":
        mutual = tgt  # the target has no mutual credentials: it refuses
    elif case == "target-needs-none":
        mutual, access = tgt, None  # we offer only CHAP, the target only None
    p = Pair(chap=chap, mutual=mutual, access=access)
    (failed,) = [e for e in p.events if isinstance(e, initiator.LoginFailed)]
    assert p.ini.state is initiator.State.CLOSED
    if case == "mutual-wrong-target-secret":
        assert failed.status is None and "mutual" in failed.reason
    else:
        assert failed.status == 0x0201 and failed.reason == "authentication failed"
    assert not failed.redirect


def test_one_way_chap_accepts_a_target_without_auth() -> None:
    logged_in(Pair(chap=ChapCredentials("alice", SECRET)))


def test_chap_client_rules() -> None:
    alice = ChapCredentials("alice", SECRET)
    with pytest.raises(AuthConfigError):
        ChapClient(alice, ChapCredentials("tgt", SECRET))
    with pytest.raises(AuthConfigError):
        ChapClient(alice, algorithms=(99,))
    with pytest.raises(ValueError):
        InitiatorConfig(INITIATOR, IQN, mutual=alice)


def test_login_refused_unknown_target_and_redirect() -> None:
    p = Pair(login=False)
    p.ini = InitiatorConnection(InitiatorConfig(INITIATOR, IQN + ":nope", nop_interval_s=None))
    p.pump()
    (failed,) = [e for e in p.events if isinstance(e, initiator.LoginFailed)]
    assert failed.status == 0x0203 and "not found" in failed.reason
    # A redirect, answered by hand: status 0x0101 and TargetAddress.
    ini = InitiatorConnection(InitiatorConfig(INITIATOR, IQN, nop_interval_s=None))
    (req,) = PduDecoder(accept=INITIATOR_OPCODES).feed(b"".join(ini.data_to_send()))
    resp = LoginResponse(itt=req.itt, isid=req.isid, status_class=1, status_detail=1,  # type: ignore[attr-defined]
                         data=encode_text([("TargetAddress", "127.0.0.2:3261,1")]))
    (ev,) = ini.receive_data(resp.encode())
    assert isinstance(ev, initiator.LoginFailed) and ev.redirect
    assert ev.target_address == "127.0.0.2:3261,1"


def test_login_timeout() -> None:
    ini = InitiatorConnection(InitiatorConfig(INITIATOR, IQN, login_timeout_s=3.0), now=10.0)
    assert ini.get_timer() == 13.0
    assert ini.handle_timer(12.0) == []
    (ev,) = ini.handle_timer(13.0)
    assert isinstance(ev, initiator.LoginFailed) and ev.status is None and "timed out" in ev.reason
    assert ini.get_timer() is None


def test_submit_before_login_is_local_error() -> None:
    ini = InitiatorConnection(InitiatorConfig(INITIATOR, IQN))
    with pytest.raises(initiator.LocalProtocolError):
        ini.submit(cdbs.tur())
    with pytest.raises(initiator.LocalProtocolError):
        ini.logout()



# --------------------------------------------------------------------------- negotiation and codec details


def test_initiator_negotiation_rules() -> None:
    def taken(*pairs: tuple[str, str]) -> tuple[Any, Any]:
        n = InitiatorNegotiator(InitiatorLimits(max_burst_length=65536, first_burst_length=8192,
                                                initial_r2t=True, header_digest=True))
        n.offers()
        return n.take(list(pairs)), n

    answers, n = taken(("MaxBurstLength", "16384"), ("FirstBurstLength", "4096"),
                       ("InitialR2T", "Yes"), ("HeaderDigest", "CRC32C"),
                       ("DataDigest", "NotUnderstood"), ("TargetAlias", "disk"),
                       ("TargetPortalGroupTag", "3"), ("MaxRecvDataSegmentLength", "4096"),
                       ("DefaultTime2Wait", "5"), ("X-vendor-key", "1"))
    assert answers == [("DefaultTime2Wait", "5"), ("X-vendor-key", "NotUnderstood")]
    p = n.params
    assert (p.max_burst_length, p.first_burst_length, p.initial_r2t, p.header_digest,
            p.data_digest, p.target_max_recv_data_segment_length, p.default_time2wait) == \
        (16384, 4096, True, True, False, 4096, 5)
    assert n.declared == {"TargetAlias": "disk", "TargetPortalGroupTag": "3"}
    for bad in [("MaxBurstLength", "131072"), ("ErrorRecoveryLevel", "1"),
                ("DataDigest", "CRC32C"), ("InitialR2T", "No"), ("MaxBurstLength", "x"),
                ("MaxRecvDataSegmentLength", "100"), ("FirstBurstLength", "9000"),
                ("ImmediateData", "Maybe"), ("MaxOutstandingR2T", "0")]:
        with pytest.raises(NegotiationError):
            taken(bad)
    with pytest.raises(NegotiationError):
        taken(("MaxBurstLength", "1024"), ("FirstBurstLength", "4096"))
    with pytest.raises(ValueError):
        InitiatorNegotiator(InitiatorLimits(first_burst_length=2 << 20, max_burst_length=1 << 20))


def test_a_bad_negotiation_answer_fails_the_login() -> None:
    ini = InitiatorConnection(InitiatorConfig(INITIATOR, IQN))
    (req,) = initiator_pdus(ini)
    (ev,) = ini.receive_data(LoginResponse(
        itt=req.itt, isid=req.isid, csg=1, nsg=3, transit=True, tsih=9,
        data=encode_text([("ErrorRecoveryLevel", "2")])).encode())
    assert isinstance(ev, initiator.LoginFailed) and ev.status is None
    assert "ErrorRecoveryLevel" in ev.reason


def test_login_response_continuation_and_extra_rounds() -> None:
    """A target that splits its answer (C bit) and first answers without T."""
    ini = InitiatorConnection(InitiatorConfig(INITIATOR, IQN))
    (req,) = initiator_pdus(ini)
    text = encode_text([("TargetAlias", "a" * 100), ("MaxRecvDataSegmentLength", "65536")])
    assert ini.receive_data(LoginResponse(itt=req.itt, isid=req.isid, csg=1, cont=True,
                                          data=text[:50]).encode()) == []
    (more,) = initiator_pdus(ini)
    assert isinstance(more, type(req)) and not more.transit and not more.data  # type: ignore[attr-defined]
    assert ini.receive_data(LoginResponse(itt=req.itt, isid=req.isid, csg=1,
                                          data=text[50:]).encode()) == []
    (again,) = initiator_pdus(ini)
    assert again.transit and again.nsg == 3  # type: ignore[attr-defined]
    (done,) = ini.receive_data(LoginResponse(itt=req.itt, isid=req.isid, csg=1, nsg=3,
                                             transit=True, tsih=4, exp_cmdsn=1,
                                             max_cmdsn=8).encode())
    assert isinstance(done, initiator.LoginComplete) and done.target_alias == "a" * 100
    assert done.params.target_max_recv_data_segment_length == 65536 and ini.window == 8
