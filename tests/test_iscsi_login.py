"""The sans-IO target's login and discovery, driven by an in-memory initiator: stages,
text continuation, failures and their status classes, timeouts, the authentication hook,
access lists, SendTargets and its size limits (RFC 7143 §6, §11.12-11.13, §12)."""

from __future__ import annotations

from typing import Any

import pytest

from edge import iscsi_events as events
from edge.iscsi_session import SessionConfig, State, TargetConnection, TargetInfo
from steelfusion.iscsi import pdu
from steelfusion.iscsi.text import decode_text, encode_text
from tests.iscsi_helpers import (
    INITIATOR,
    IQN,
    LIBISCSI_KEYS,
    PORTAL,
    READ10,
    Initiator,
    make_config,
)
from tests.iscsi_helpers import logged_in_target as logged_in

NAMES = [("InitiatorName", INITIATOR), ("TargetName", IQN)]


# --------------------------------------------------------------------------- login


def test_login_single_pdu_operational() -> None:
    ini = Initiator()
    resp = ini.login()
    assert (resp.status_class, resp.status_detail) == (0, 0)
    assert resp.transit and resp.csg == 1 and resp.nsg == 3
    assert resp.tsih == 7 and resp.isid == 0x80_0000_1234_56
    assert resp.exp_cmdsn == 1 and resp.max_cmdsn == 128
    keys = dict(decode_text(resp.data))
    assert keys["TargetPortalGroupTag"] == "1"
    assert keys["TargetAlias"] == "test disk"
    assert keys["MaxRecvDataSegmentLength"] == "262144"
    # Only keys the initiator offered, plus declaratives (open-iscsi pitfall).
    offered = {k for k, _ in LIBISCSI_KEYS}
    assert set(keys) - offered <= {"TargetPortalGroupTag", "TargetAlias",
                                   "MaxRecvDataSegmentLength"}
    (ev,) = ini.events
    assert isinstance(ev, events.LoginComplete)
    assert ev.initiator_name == INITIATOR and ev.target_name == IQN
    assert ev.session_type == "Normal" and ev.tsih == 7
    assert ev.params.first_burst_length == 262144 and not ev.params.initial_r2t


def test_login_security_then_operational() -> None:
    """open-iscsi style: CSG 0 → 1 with AuthMethod, then 1 → 3."""
    ini = Initiator()
    r1 = ini.login_step([*NAMES, ("AuthMethod", "CHAP,None")], cmdsn=9, exp_statsn=100)
    assert r1.status_class == 0
    assert r1.transit and (r1.csg, r1.nsg) == (0, 1) and r1.tsih == 0
    assert r1.statsn == 100
    assert dict(decode_text(r1.data))["AuthMethod"] == "None"
    r2 = ini.login_step(LIBISCSI_KEYS, cmdsn=9, exp_statsn=101, csg=1, nsg=3)
    assert r2.transit and r2.tsih == 7 and r2.statsn == 101
    assert "TargetPortalGroupTag" not in dict(decode_text(r2.data))
    assert ini.conn.state is State.FULL_FEATURE


def test_login_text_continuation() -> None:
    ini = Initiator()
    text = encode_text([*NAMES, *LIBISCSI_KEYS])
    ini.send(pdu.LoginRequest(itt=1, isid=5, cmdsn=1, csg=1, nsg=3, cont=True, data=text[:37]))
    (r1,) = ini.recv()
    assert isinstance(r1, pdu.LoginResponse) and not r1.transit and r1.data == b""
    ini.send(pdu.LoginRequest(itt=1, isid=5, cmdsn=1, csg=1, nsg=3, transit=True, data=text[37:]))
    (r2,) = ini.recv()
    assert isinstance(r2, pdu.LoginResponse) and r2.transit and r2.status_class == 0


def test_login_stays_operational_without_transit() -> None:
    ini = Initiator()
    r = ini.login_step(NAMES, csg=1, nsg=3, transit=False)
    assert not r.transit and r.status_class == 0
    assert ini.conn.state is State.LOGIN


@pytest.mark.parametrize("pairs,status", [
    ([("TargetName", IQN)], 0x0207),  # no InitiatorName
    ([("InitiatorName", INITIATOR)], 0x0207),  # normal session without TargetName
    ([("InitiatorName", INITIATOR), ("TargetName", "iqn.nope")], 0x0203),
    ([("InitiatorName", INITIATOR), ("SessionType", "Weird")], 0x0209),
])
def test_login_failures(pairs: list[tuple[str, str]], status: int) -> None:
    ini = Initiator()
    r = ini.login_step(pairs, csg=1, nsg=3)
    assert (r.status_class << 8 | r.status_detail) == status
    assert any(isinstance(e, events.CloseConnection) for e in ini.events)
    assert ini.conn.state is State.CLOSED
    assert ini.send_bytes(b"anything") == []  # closed connections ignore input


@pytest.mark.parametrize("fields,status", [
    ({"version_min": 1, "version_max": 1}, 0x0205),
    ({"tsih": 3}, 0x020A),
    ({"csg": 3, "nsg": 3}, 0x020B),
    ({"csg": 1, "nsg": 1}, 0x020B),
])
def test_login_version_tsih_and_stage_errors(fields: dict[str, Any], status: int) -> None:
    r = Initiator().login_step(NAMES, **{"csg": 1, "nsg": 3, **fields})
    assert (r.status_class << 8 | r.status_detail) == status


def test_first_pdu_must_be_login() -> None:
    ini = Initiator()
    with pytest.raises(pdu.IscsiProtocolError):
        ini.send(pdu.NopOut(itt=1, immediate=True))
    assert ini.conn.state is State.CLOSED


def test_login_timeout() -> None:
    conn = TargetConnection(make_config(login_timeout_s=5), portal=PORTAL, tsih=1, now=100.0)
    assert conn.get_timer() == 105.0
    assert conn.handle_timer(104.0) == []
    (ev,) = conn.handle_timer(105.0)
    assert isinstance(ev, events.CloseConnection) and conn.state is State.CLOSED
    ini = logged_in()
    assert ini.conn.get_timer() is None


class _ToyExchange:
    reason = ""

    def __init__(self, seen: list[dict[str, str]]) -> None:
        self.seen = seen

    def methods(self) -> list[str]:
        return ["CHAP"]

    def step(self, method: str, keys: Any) -> tuple[list[tuple[str, str]], bool | None]:
        self.seen.append(dict(keys))
        if "CHAP_A" in keys:
            return [("CHAP_A", "5"), ("CHAP_I", "1"), ("CHAP_C", "0x00")], None
        ok = keys.get("CHAP_R") == "0xgood"
        self.reason = "" if ok else "bad response"
        return [], ok


class _RequireChap:
    """A toy authenticator to exercise the security-stage hook."""

    def __init__(self, allow: bool = True) -> None:
        self.seen: list[dict[str, str]] = []
        self.allow = allow

    def authorize(self, initiator_name: str, target_name: str | None) -> bool:
        return self.allow

    def begin(self, initiator_name: str, target_name: str | None) -> _ToyExchange:
        return _ToyExchange(self.seen)


@pytest.mark.parametrize("response,ok", [("0xgood", True), ("0xbad", False)])
def test_authenticator_hook(response: str, ok: bool) -> None:
    auth = _RequireChap()
    ini = Initiator(authenticator=auth)
    r = ini.login_step([*NAMES, ("AuthMethod", "None,CHAP")])
    assert not r.transit
    assert dict(decode_text(r.data))["AuthMethod"] == "CHAP"
    r = ini.login_step([("CHAP_A", "5")])
    assert not r.transit
    assert dict(decode_text(r.data))["CHAP_C"] == "0x00"
    r = ini.login_step([("CHAP_N", "user"), ("CHAP_R", response)])
    if ok:
        assert r.status_class == 0 and r.transit and r.nsg == 1
    else:
        assert (r.status_class, r.status_detail) == (2, 1)


def test_authentication_required_blocks_operational_stage() -> None:
    ini = Initiator(authenticator=_RequireChap())
    assert ini.login().status_detail == 1 and ini.conn.state is State.CLOSED
    failed = [e for e in ini.events if isinstance(e, events.LoginFailed)]
    assert failed and failed[0].status == 0x0201


def test_access_list_refusal_is_authorization_failure() -> None:
    ini = Initiator(authenticator=_RequireChap(allow=False))
    r = ini.login()
    assert (r.status_class, r.status_detail) == (2, 2) and ini.conn.state is State.CLOSED
    (f,) = [e for e in ini.events if isinstance(e, events.LoginFailed)]
    assert f.status == 0x0202 and f.initiator_name == INITIATOR and f.target_name == IQN


# --------------------------------------------------------------------------- discovery


def test_discovery_send_targets() -> None:
    ini = Initiator()
    resp = ini.login(discovery=True)
    assert resp.status_class == 0 and "TargetPortalGroupTag" not in dict(decode_text(resp.data))
    first = ini.events[0]
    assert isinstance(first, events.LoginComplete) and first.session_type == "Discovery"
    ini.send(pdu.TextRequest(itt=5, cmdsn=1, immediate=True,
                             data=encode_text([("SendTargets", "All")])))
    (r,) = ini.recv()
    assert isinstance(r, pdu.TextResponse) and r.final and not r.cont and r.ttt == pdu.RESERVED_TAG
    assert decode_text(r.data) == [
        ("TargetName", "iqn.2024-01.io.steelfusion:other"), ("TargetAddress", f"{PORTAL},1"),
        ("TargetName", IQN), ("TargetAddress", f"{PORTAL},1")]
    # Only Text and Logout (and NOP) in a discovery session.
    ini.command(READ10, edtl=4096, read=True)
    (rej,) = ini.recv()
    assert isinstance(rej, pdu.Reject)
    ini.send(pdu.LogoutRequest(itt=9, cmdsn=ini.cmdsn))
    (lo,) = ini.recv()
    assert isinstance(lo, pdu.LogoutResponse) and lo.response == 0


def test_discovery_answer_fits_initiator_mrdsl() -> None:
    targets = {f"iqn.2024-01.io.steelfusion:t{i:03d}": TargetInfo(
        f"iqn.2024-01.io.steelfusion:t{i:03d}", frozenset({0})) for i in range(40)}
    conn = TargetConnection(SessionConfig(targets=targets), portal=PORTAL, tsih=1)
    ini = Initiator(conn)
    keys = [("MaxRecvDataSegmentLength", "512")]
    assert ini.login(keys, discovery=True).status_class == 0
    ini.send(pdu.TextRequest(itt=5, cmdsn=1, data=encode_text([("SendTargets", "All")])))
    text = b""
    for _ in range(100):
        (r,) = ini.recv()
        assert isinstance(r, pdu.TextResponse) and len(r.data) <= 512
        text += bytes(r.data)
        if r.final:
            assert not r.cont and r.ttt == pdu.RESERVED_TAG
            break
        assert r.cont and r.ttt != pdu.RESERVED_TAG
        ini.send(pdu.TextRequest(itt=5, ttt=r.ttt, cmdsn=2, immediate=True))
    names = [v for k, v in decode_text(text) if k == "TargetName"]
    assert names == sorted(targets)


def test_send_targets_in_normal_session_and_bad_requests() -> None:
    ini = logged_in()
    for body, ok in [("SendTargets=All", True), ("SendTargets=", True),
                     ("SendTargets=Alle", False), ("sENDtARGETS=aLL", False)]:
        ini.send(pdu.TextRequest(itt=ini.next_itt(), cmdsn=ini.cmdsn, immediate=True,
                                 data=body.encode() + b"\0"))
        (r,) = ini.recv()
        assert isinstance(r, pdu.TextResponse) and r.final
        keys = dict(decode_text(r.data))
        assert ("TargetName" in keys) == ok
        if not ok:
            assert set(keys.values()) <= {"Reject", "NotUnderstood"}
