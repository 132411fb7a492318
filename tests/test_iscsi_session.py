"""The sans-IO target state machine driven by an in-memory initiator:
login, discovery, writes with immediate + unsolicited + R2T data, reads with
multi-PDU Data-In and residuals, numbering, NOP, logout, task management,
digests (RFC 7143)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from edge import iscsi_events as events
from edge.iscsi_session import FastLane, SessionConfig, State, TargetConnection, TargetInfo
from edge.scsi.cdb import decode_lun, encode_lun
from steelfusion.iscsi import pdu
from steelfusion.iscsi.text import TargetLimits, decode_text, encode_text
from tests.iscsi_helpers import (
    INITIATOR,
    IQN,
    LIBISCSI_KEYS,
    PORTAL,
    Initiator,
    libiscsi_keys,
    make_config,
)


def logged_in(*, fast: FastLane | None = None, **cfg: Any) -> Initiator:
    ini = Initiator(fast=fast, **cfg)
    resp = ini.login()
    assert resp.status_class == 0 and resp.transit
    assert ini.conn.state is State.FULL_FEATURE
    return ini


NAMES = [("InitiatorName", INITIATOR), ("TargetName", IQN)]
READ10 = bytes((0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0))
WRITE10 = bytes((0x2A, 0, 0, 0, 0, 0, 0, 0, 8, 0))


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


# --------------------------------------------------------------------------- writes


def _ready(evs: list[events.Event]) -> list[events.ScsiCommandReady]:
    return [e for e in evs if isinstance(e, events.ScsiCommandReady)]


def test_write_immediate_data_only_is_zero_copy() -> None:
    ini = logged_in()
    payload = b"w" * 4096
    itt, ev = ini.command(WRITE10, edtl=4096, write=True, data=payload)
    (cmd,) = _ready(ev)
    assert cmd.task_tag == itt and bytes(cmd.data) == payload and cmd.lun == 0
    assert isinstance(cmd.data, memoryview)  # a slice of what we received
    assert ini.recv() == []
    ini.conn.complete(itt, 0, transfer_length=4096)
    (resp,) = ini.recv()
    assert isinstance(resp, pdu.ScsiResponse) and resp.status == 0 and resp.itt == itt
    assert not resp.overflow and not resp.underflow


def test_write_immediate_unsolicited_and_r2t() -> None:
    """8 KiB immediate + 8 KiB unsolicited Data-Out (FirstBurstLength 16 KiB),
    then R2Ts of MaxBurstLength 16 KiB for the remaining 48 KiB, two
    outstanding at a time."""
    keys = libiscsi_keys(FirstBurstLength="16384", MaxBurstLength="16384",
                         MaxOutstandingR2T="2")
    ini = Initiator()
    assert ini.login(keys).status_class == 0
    p = ini.conn.params
    assert (p.first_burst_length, p.max_burst_length, p.max_outstanding_r2t) == (16384, 16384, 2)
    total = 64 * 1024
    payload = bytes(i * 7 & 0xFF for i in range(total))
    itt, ev = ini.command(WRITE10, edtl=total, write=True, data=payload[:8192], final=False)
    assert ev == [] and ini.recv() == []
    ini.send(pdu.DataOut(itt=itt, datasn=0, buffer_offset=8192, data=payload[8192:12288]),
             pdu.DataOut(itt=itt, datasn=1, buffer_offset=12288, final=True,
                         data=payload[12288:16384]))
    r2ts = ini.recv()
    assert [type(r) for r in r2ts] == [pdu.R2T, pdu.R2T]
    assert [(r.buffer_offset, r.desired_length, r.r2tsn) for r in r2ts  # type: ignore[attr-defined]
            ] == [
        (16384, 16384, 0), (32768, 16384, 1)]
    assert all(isinstance(r, pdu.R2T) and r.ttt != pdu.RESERVED_TAG for r in r2ts)
    sent_r2ts = list(r2ts)
    ready: list[events.ScsiCommandReady] = []
    while sent_r2ts:
        r = sent_r2ts.pop(0)
        assert isinstance(r, pdu.R2T)
        for sn, off in enumerate(range(r.buffer_offset, r.buffer_offset + r.desired_length,
                                       8192)):
            end = min(off + 8192, r.buffer_offset + r.desired_length)
            ready += _ready(ini.send(pdu.DataOut(itt=itt, ttt=r.ttt, datasn=sn, buffer_offset=off,
                                                 final=end == r.buffer_offset + r.desired_length,
                                                 data=payload[off:end])))
        sent_r2ts += ini.recv()
    (cmd,) = ready
    assert bytes(cmd.data) == payload and cmd.expected_length == total
    ini.conn.complete(itt, 0, transfer_length=total)
    (resp,) = ini.recv()
    assert isinstance(resp, pdu.ScsiResponse) and resp.exp_datasn == 3  # three R2Ts


def test_write_initial_r2t_yes_no_immediate() -> None:
    ini = Initiator()
    ini.login(libiscsi_keys(InitialR2T="Yes", ImmediateData="No"))
    assert ini.conn.params.initial_r2t and not ini.conn.params.immediate_data
    itt, _ = ini.command(WRITE10, edtl=4096, write=True)
    (r2t,) = ini.recv()
    assert isinstance(r2t, pdu.R2T) and (r2t.buffer_offset, r2t.desired_length) == (0, 4096)
    (cmd,) = _ready(ini.send(pdu.DataOut(itt=itt, ttt=r2t.ttt, final=True, data=b"z" * 4096)))
    assert bytes(cmd.data) == b"z" * 4096
    # Immediate data when ImmediateData=No, unsolicited Data-Out when InitialR2T=Yes.
    ini.command(WRITE10, edtl=512, write=True, data=b"x" * 512)
    (bad,) = ini.recv()
    assert isinstance(bad, pdu.ScsiResponse) and bad.status == 2
    assert pdu.parse_sense_segment(bad.data)[12:14] == b"\x0c\x0c"


@pytest.mark.parametrize("case", ["datasn", "offset", "ttt", "short", "too_much"])
def test_bad_data_out_fails_the_command(case: str) -> None:
    ini = Initiator()
    ini.login(libiscsi_keys(InitialR2T="Yes"))
    itt, _ = ini.command(WRITE10, edtl=2048, write=True)
    (r2t,) = ini.recv()
    assert isinstance(r2t, pdu.R2T)
    good: dict[str, Any] = {"itt": itt, "ttt": r2t.ttt, "datasn": 0, "buffer_offset": 0,
                            "final": False, "data": b"a" * 1024}
    bad = dict(good)
    if case == "datasn":
        bad["datasn"] = 27
    elif case == "offset":
        bad["buffer_offset"] = 512
    elif case == "ttt":
        bad["ttt"] = r2t.ttt + 99
    elif case == "short":
        bad["final"] = True
    else:
        bad["data"] = b"a" * 4096
    ev = ini.send(pdu.DataOut(**bad))
    assert _ready(ev) == []
    (resp,) = ini.recv()
    assert isinstance(resp, pdu.ScsiResponse) and resp.status == 2
    assert pdu.parse_sense_segment(resp.data)[2] == 0x0B  # ABORTED COMMAND
    # Further Data-Out for the failed task is dropped quietly.
    ini.send(pdu.DataOut(**{**good, "datasn": 1, "buffer_offset": 1024, "final": True}))
    assert ini.recv() == []
    assert ini.conn.outstanding == 0


def test_data_out_for_unknown_task_is_rejected() -> None:
    ini = logged_in()
    ini.send(pdu.DataOut(itt=0xABC, ttt=5, data=b"x" * 512))
    (r,) = ini.recv()
    assert isinstance(r, pdu.Reject) and r.reason == 0x09 and len(r.data) == 48


def test_write_buffer_budget_queues_r2ts() -> None:
    ini = Initiator(max_write_buffer_bytes=8192)
    ini.login(libiscsi_keys(InitialR2T="Yes"))
    a, _ = ini.command(WRITE10, edtl=8192, write=True)
    b, _ = ini.command(WRITE10, edtl=8192, write=True)
    (r2t_a,) = ini.recv()  # the second write waits for budget
    assert isinstance(r2t_a, pdu.R2T) and r2t_a.itt == a
    ini.send(pdu.DataOut(itt=a, ttt=r2t_a.ttt, final=True, data=bytes(8192)))
    assert ini.recv() == []
    ini.conn.complete(a, 0, transfer_length=8192)
    pdus = ini.recv()
    assert sorted(type(p).__name__ for p in pdus) == ["R2T", "ScsiResponse"]
    assert [p.itt for p in pdus if isinstance(p, pdu.R2T)] == [b]


# --------------------------------------------------------------------------- reads


def test_read_multi_pdu_data_in_with_status() -> None:
    keys = libiscsi_keys(MaxRecvDataSegmentLength="4096", MaxBurstLength="8192",
                         FirstBurstLength="8192")
    ini = Initiator()
    ini.login(keys)
    data = bytes(range(256)) * 80  # 20480 bytes
    itt, ev = ini.command(READ10, edtl=len(data), read=True)
    (cmd,) = _ready(ev)
    assert cmd.read and not cmd.write and cmd.data == b""
    ini.conn.complete(itt, 0, data)
    pdus = ini.recv()
    assert all(isinstance(p, pdu.DataIn) for p in pdus)
    dins: list[pdu.DataIn] = pdus  # type: ignore[assignment]
    assert [len(p.data) for p in dins] == [4096, 4096, 4096, 4096, 4096]
    assert [p.datasn for p in dins] == [0, 1, 2, 3, 4]
    assert [p.buffer_offset for p in dins] == [0, 4096, 8192, 12288, 16384]
    assert [p.final for p in dins] == [False, True, False, True, True]  # 8 KiB bursts
    assert [p.status_present for p in dins] == [False] * 4 + [True]
    assert b"".join(bytes(p.data) for p in dins) == data
    last = dins[-1]
    assert last.status == 0 and not last.overflow and not last.underflow
    assert len({p.statsn for p in dins if p.status_present}) == 1


@pytest.mark.parametrize("edtl,produced,flag,residual,sent", [
    (0, 512, "overflow", 512, 0),
    (10000, 512, "underflow", 10000 - 512, 512),
    (200, 512, "overflow", 312, 200),
    (512, 512, None, 0, 512),
])
def test_read_residuals(edtl: int, produced: int, flag: str | None, residual: int,
                        sent: int) -> None:
    ini = logged_in()
    itt, _ = ini.command(READ10, edtl=edtl, read=True)
    ini.conn.complete(itt, 0, b"r" * produced)
    pdus = ini.recv()
    got = b"".join(bytes(p.data) for p in pdus if isinstance(p, pdu.DataIn))
    assert got == b"r" * sent
    last = pdus[-1]
    assert isinstance(last, (pdu.DataIn, pdu.ScsiResponse))
    assert last.overflow == (flag == "overflow")
    assert last.underflow == (flag == "underflow")
    assert last.residual_count == residual


@pytest.mark.parametrize("edtl,wanted,flag,residual", [
    (0, 512, "overflow", 512), (10000, 512, "underflow", 9488), (1024, 512, "underflow", 512),
    (512, 1024, "overflow", 512), (512, 512, None, 0),
])
def test_write_residuals(edtl: int, wanted: int, flag: str | None, residual: int) -> None:
    ini = logged_in()
    itt, ev = ini.command(WRITE10, edtl=edtl, write=True, data=b"w" * edtl)
    (cmd,) = _ready(ev)
    assert len(cmd.data) == edtl
    ini.conn.complete(itt, 0, transfer_length=wanted)
    (resp,) = ini.recv()
    assert isinstance(resp, pdu.ScsiResponse)
    assert (resp.overflow, resp.underflow) == (flag == "overflow", flag == "underflow")
    assert resp.residual_count == residual


def test_check_condition_response_carries_sense() -> None:
    ini = logged_in()
    itt, _ = ini.command(READ10, edtl=4096, read=True)
    sense = bytes((0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0, 0, 0, 0, 0))
    ini.conn.complete(itt, 2, b"", sense)
    (resp,) = ini.recv()
    assert isinstance(resp, pdu.ScsiResponse) and resp.status == 2
    assert pdu.parse_sense_segment(resp.data) == sense


def test_pipelined_commands_complete_out_of_order() -> None:
    ini = logged_in()
    tags = [ini.command(READ10, edtl=512, read=True)[0] for _ in range(5)]
    assert [e.task_tag for e in _ready(ini.events)] == tags
    assert ini.conn.outstanding == 5
    for t in reversed(tags):
        ini.conn.complete(t, 0, t.to_bytes(4, "big") * 128)
    pdus = ini.recv()
    assert [p.itt for p in pdus] == list(reversed(tags))  # type: ignore[attr-defined]
    statsns = [p.statsn for p in pdus]  # type: ignore[attr-defined]
    assert statsns == list(range(statsns[0], statsns[0] + 5))
    assert ini.conn.outstanding == 0
    # Completing twice, or an unknown tag, is harmless.
    assert ini.conn.complete(tags[0], 0) == [] and ini.recv() == []


def test_duplicate_itt_and_bidirectional() -> None:
    ini = logged_in()
    itt, _ = ini.command(READ10, edtl=512, read=True)
    ini.command(READ10, edtl=512, read=True, itt=itt)
    (rej,) = ini.recv()
    assert isinstance(rej, pdu.Reject) and rej.reason == 0x09
    ini.command(READ10, edtl=512, read=True, write=True)
    (resp,) = ini.recv()
    assert isinstance(resp, pdu.ScsiResponse) and resp.status == 2


# --------------------------------------------------------------------------- numbering


def test_cmdsn_window() -> None:
    ini = logged_in(cmd_window=4)
    assert ini.conn.get_timer() is None
    tags = [ini.command(READ10, edtl=512, read=True)[0] for _ in range(4)]
    # Window closed (MaxCmdSN = ExpCmdSN - 1): even CmdSN == ExpCmdSN is dropped.
    _, ev = ini.command(READ10, edtl=512, read=True)
    assert ev == [] and ini.conn.outstanding == 4
    ini.cmdsn = 5
    # A slot frees: MaxCmdSN = ExpCmdSN - 1 + free slots.
    ini.conn.complete(tags[0], 0, bytes(512))
    (r,) = ini.recv()
    assert isinstance(r, pdu.DataIn) and r.exp_cmdsn == 5 and r.max_cmdsn == 5
    # CmdSN 6 is beyond MaxCmdSN 5: silently ignored.
    ini.cmdsn = 6
    _, ev = ini.command(READ10, edtl=512, read=True)
    assert ev == [] and ini.recv() == []
    # Too low (already seen): ignored too.
    ini.cmdsn = 2
    _, ev = ini.command(READ10, edtl=512, read=True)
    assert ev == [] and ini.recv() == []
    # In window: accepted.
    ini.cmdsn = 5
    _, ev = ini.command(READ10, edtl=512, read=True)
    assert len(_ready(ev)) == 1
    # Immediate commands do not consume CmdSN and bypass the window.
    _, ev = ini.command(READ10, edtl=512, read=True, immediate=True)
    assert len(_ready(ev)) == 1
    for t in tags[1:]:
        ini.conn.complete(t, 0, bytes(512))
    maxes = [p.max_cmdsn for p in ini.recv()]  # type: ignore[attr-defined]
    assert maxes == sorted(maxes)  # never moves back


def test_cmdsn_gap_is_filled() -> None:
    ini = logged_in()
    ini.cmdsn = 2
    _, ev = ini.command(READ10, edtl=512, read=True)  # CmdSN 2 before 1
    assert len(_ready(ev)) == 1
    ini.conn.complete(ini.itt, 0, bytes(512))
    (r,) = ini.recv()
    assert r.exp_cmdsn == 1  # type: ignore[attr-defined]
    ini.cmdsn = 1
    ini.command(READ10, edtl=512, read=True)
    ini.conn.complete(ini.itt, 0, bytes(512))
    (r,) = ini.recv()
    assert r.exp_cmdsn == 3  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- NOP, logout


def test_nop() -> None:
    ini = logged_in()
    ini.send(pdu.NopOut(itt=77, cmdsn=ini.cmdsn, immediate=True, data=b"hello"))
    (r,) = ini.recv()
    assert isinstance(r, pdu.NopIn) and r.itt == 77 and r.ttt == pdu.RESERVED_TAG
    assert bytes(r.data) == b"hello"
    ini.send(pdu.NopOut(itt=pdu.RESERVED_TAG, cmdsn=ini.cmdsn, immediate=True))
    assert ini.recv() == []


def test_logout_waits_for_running_commands() -> None:
    ini = logged_in()
    itt, _ = ini.command(READ10, edtl=512, read=True)
    ev = ini.send(pdu.LogoutRequest(itt=99, reason=0, cmdsn=ini.cmdsn, immediate=True))
    assert ev == [] and ini.recv() == []
    done = ini.conn.complete(itt, 0, bytes(512))
    assert [type(e) for e in done] == [events.LogoutComplete]
    din, lo = ini.recv()
    assert isinstance(din, pdu.DataIn) and isinstance(lo, pdu.LogoutResponse) and lo.itt == 99
    assert ini.conn.state is State.CLOSED


def test_logout_reasons() -> None:
    ini = logged_in()
    ini.send(pdu.LogoutRequest(itt=1, reason=2, cmdsn=ini.cmdsn, immediate=True))
    (r,) = ini.recv()
    assert isinstance(r, pdu.LogoutResponse) and r.response == 2
    ini.send(pdu.LogoutRequest(itt=2, reason=1, cid=42, cmdsn=ini.cmdsn, immediate=True))
    (r,) = ini.recv()
    assert isinstance(r, pdu.LogoutResponse) and r.response == 1
    ev = ini.send(pdu.LogoutRequest(itt=3, reason=1, cid=0, cmdsn=ini.cmdsn, immediate=True))
    (r,) = ini.recv()
    assert isinstance(r, pdu.LogoutResponse) and r.response == 0
    assert isinstance(ev[0], events.LogoutComplete)


def test_snack_and_login_in_ffp() -> None:
    ini = logged_in()
    ini.send(pdu.SnackRequest(itt=1))
    (r,) = ini.recv()
    assert isinstance(r, pdu.Reject)
    with pytest.raises(pdu.IscsiProtocolError):
        ini.send(pdu.LoginRequest(itt=1))
    (r,) = ini.recv()
    assert isinstance(r, pdu.Reject) and r.reason == 0x04


# --------------------------------------------------------------------------- task management


def test_abort_running_task_defers_response_and_drops_its_status() -> None:
    ini = logged_in()
    itt, _ = ini.command(WRITE10, edtl=512, write=True, data=bytes(512))
    ev = ini.send(pdu.TaskMgmtRequest(itt=500, function=1, lun=0, ref_task_tag=itt,
                                      cmdsn=ini.cmdsn, ref_cmdsn=ini.cmdsn - 1))
    assert [type(e) for e in ev] == [events.TasksAborted]
    assert ini.recv() == []
    ini.conn.complete(itt, 0, transfer_length=512)
    (r,) = ini.recv()
    assert isinstance(r, pdu.TaskMgmtResponse) and r.response == 0 and r.itt == 500


def test_abort_of_a_running_task_answers_once_the_adapter_cancelled_it() -> None:
    """The adapter cancels an aborted command instead of waiting for it
    (TasksAborted, then task_cancelled): the TMF answer goes out then, the
    task never gets a status, a late complete() is ignored, and StatSN,
    ExpCmdSN and MaxCmdSN go on as if the task had ended normally."""
    ini = logged_in()
    itt, ev = ini.command(READ10, edtl=4096, read=True)
    assert [type(e) for e in ev] == [events.ScsiCommandReady]
    first, _ = ini.command(READ10, edtl=4096, read=True)
    ini.conn.complete(first, 0, bytes(4096))
    (din,) = ini.recv()
    assert isinstance(din, pdu.DataIn) and din.status_present
    ev = ini.send(pdu.TaskMgmtRequest(itt=500, function=1, lun=0, ref_task_tag=itt,
                                      cmdsn=ini.cmdsn, ref_cmdsn=ini.cmdsn - 2))
    (aborted,) = ev
    assert isinstance(aborted, events.TasksAborted) and aborted.task_tags == (itt,)
    assert ini.recv() == [] and ini.conn.outstanding == 1
    assert ini.conn.task_cancelled(itt) == []
    (r,) = ini.recv()
    assert isinstance(r, pdu.TaskMgmtResponse) and r.itt == 500 and r.response == 0
    assert r.statsn == din.statsn + 1
    assert r.exp_cmdsn == ini.cmdsn and r.max_cmdsn == ini.cmdsn + 127
    assert ini.conn.outstanding == 0
    assert ini.conn.complete(itt, 0, bytes(4096)) == [] and ini.recv() == []
    assert ini.conn.task_cancelled(itt) == [] and ini.recv() == []
    nxt, _ = ini.command(READ10, edtl=512, read=True, itt=itt)  # the tag is free again
    ini.conn.complete(nxt, 0, bytes(512))
    (d2,) = ini.recv()
    assert isinstance(d2, pdu.DataIn) and d2.itt == itt and d2.statsn == r.statsn + 1


def test_abort_task_set_waits_for_every_cancelled_task() -> None:
    ini = logged_in()
    tags = [ini.command(READ10, edtl=512, read=True)[0] for _ in range(3)]
    other, _ = ini.command(READ10, edtl=512, read=True, lun=1)
    ev = ini.send(pdu.TaskMgmtRequest(itt=501, function=2, lun=encode_lun(0), cmdsn=ini.cmdsn))
    (aborted,) = ev
    assert isinstance(aborted, events.TasksAborted) and aborted.task_tags == tuple(tags)
    for t in tags[:-1]:
        ini.conn.task_cancelled(t)
    assert ini.recv() == []
    ini.conn.task_cancelled(tags[-1])
    (r,) = ini.recv()
    assert isinstance(r, pdu.TaskMgmtResponse) and r.itt == 501 and r.response == 0
    ini.conn.complete(other, 0, bytes(512))  # another LUN's task was not touched
    (d,) = ini.recv()
    assert isinstance(d, pdu.DataIn) and d.itt == other and d.status == 0


def test_cancelled_tasks_let_a_deferred_lun_reset_go_on() -> None:
    ini = logged_in(defer_resets=True)
    tag, _ = ini.command(READ10, edtl=512, read=True)
    ini.send(pdu.TaskMgmtRequest(itt=611, function=5, lun=encode_lun(0), cmdsn=ini.cmdsn))
    ev = ini.conn.task_cancelled(tag)
    assert [type(e) for e in ev] == [events.ResetRequested]
    assert ini.recv() == []
    ini.conn.complete_tmf(611)
    (r,) = ini.recv()
    assert isinstance(r, pdu.TaskMgmtResponse) and r.itt == 611 and r.response == 0


def test_a_task_cancelled_without_an_abort_gets_aborted_command() -> None:
    ini = logged_in()
    tag, _ = ini.command(READ10, edtl=512, read=True)
    ini.conn.task_cancelled(tag)
    (r,) = ini.recv()
    assert isinstance(r, pdu.ScsiResponse) and r.itt == tag and r.status == 0x02
    sense = pdu.parse_sense_segment(r.data)
    assert sense[2] & 0x0F == 0x0B and ini.conn.outstanding == 0


def test_abort_unknown_task_and_collecting_task() -> None:
    ini = logged_in()
    ini.send(pdu.TaskMgmtRequest(itt=500, function=1, ref_task_tag=0x999, cmdsn=ini.cmdsn,
                                 ref_cmdsn=0))
    (r,) = ini.recv()
    assert isinstance(r, pdu.TaskMgmtResponse) and r.response == 1
    itt, _ = ini.command(WRITE10, edtl=1 << 20, write=True, data=bytes(4096), final=False)
    ini.send(pdu.TaskMgmtRequest(itt=501, function=1, ref_task_tag=itt, cmdsn=ini.cmdsn))
    (r,) = ini.recv()
    assert isinstance(r, pdu.TaskMgmtResponse) and r.response == 0
    assert ini.conn.outstanding == 0
    ini.send(pdu.DataOut(itt=itt, datasn=0, buffer_offset=4096, data=bytes(4096)))
    assert ini.recv() == []  # dropped quietly


def test_lun_reset_and_other_functions() -> None:
    ini = logged_in()
    tags = [ini.command(READ10, edtl=512, read=True)[0] for _ in range(3)]
    ini.send(pdu.TaskMgmtRequest(itt=600, function=5, lun=encode_lun(0), cmdsn=ini.cmdsn))
    assert ini.recv() == []
    for t in tags[:-1]:
        ini.conn.complete(t, 0, bytes(512))
    assert ini.recv() == []
    ini.conn.complete(tags[-1], 0, bytes(512))
    (r,) = ini.recv()
    assert isinstance(r, pdu.TaskMgmtResponse) and r.response == 0
    for fn, lun, expect in [(5, 9, 2), (3, 0, 0), (8, 0, 4), (14, 0, 5)]:
        ini.send(pdu.TaskMgmtRequest(itt=601, function=fn, lun=encode_lun(lun), cmdsn=ini.cmdsn))
        (r,) = ini.recv()
        assert isinstance(r, pdu.TaskMgmtResponse) and r.response == expect, fn
    ev = ini.send(pdu.TaskMgmtRequest(itt=602, function=7, cmdsn=ini.cmdsn))  # cold reset
    (r,) = ini.recv()
    assert isinstance(r, pdu.TaskMgmtResponse) and r.response == 0
    assert any(isinstance(e, events.CloseConnection) for e in ev)


def test_warm_reset_answers_then_closes() -> None:
    """A target reset ends every session of the target, as COLD RESET must
    (RFC 7143 §11.5.1): the initiator reconnects to a reset target."""
    ini = logged_in()
    ev = ini.send(pdu.TaskMgmtRequest(itt=603, function=6, cmdsn=ini.cmdsn))
    (r,) = ini.recv()
    assert isinstance(r, pdu.TaskMgmtResponse) and r.response == 0
    assert any(isinstance(e, events.CloseConnection) and "warm" in e.reason for e in ev)


def test_deferred_reset_waits_for_the_adapter() -> None:
    ini = logged_in(defer_resets=True)
    tag, _ = ini.command(READ10, edtl=512, read=True)
    ev = ini.send(pdu.TaskMgmtRequest(itt=610, function=5, lun=encode_lun(0), cmdsn=ini.cmdsn))
    assert [type(e) for e in ev] == [events.TasksAborted]
    ev = ini.conn.complete(tag, 0, bytes(512))
    (reset,) = ev
    assert isinstance(reset, events.ResetRequested) and reset.lun == 0
    assert ini.recv() == []  # no status for the aborted READ, no TMF answer yet
    assert ini.conn.complete_tmf(999) == []
    assert ini.conn.complete_tmf(610) == []
    (r,) = ini.recv()
    assert isinstance(r, pdu.TaskMgmtResponse) and r.itt == 610 and r.response == 0


def test_abort_tasks_from_another_session() -> None:
    ini = logged_in()
    running, _ = ini.command(READ10, edtl=512, read=True)
    collecting, _ = ini.command(WRITE10, edtl=1 << 20, write=True, data=bytes(4096),
                                final=False)
    other, _ = ini.command(READ10, edtl=512, read=True, lun=1)
    ev = ini.conn.abort_tasks({0})
    (aborted,) = ev
    assert isinstance(aborted, events.TasksAborted) and aborted.task_tags == (running,)
    assert ini.conn.is_aborted(running) and ini.conn.is_aborted(collecting)
    assert not ini.conn.is_aborted(other)
    ini.recv()
    ini.conn.complete(running, 0, bytes(512))
    assert ini.recv() == []  # TAS=0: aborted by someone else, no status
    ini.conn.complete(other, 0, bytes(512))
    assert ini.recv()


# --------------------------------------------------------------------------- digests


def test_digests_negotiated_and_checked() -> None:
    ini = Initiator()
    resp = ini.login(libiscsi_keys(HeaderDigest="CRC32C,None", DataDigest="CRC32C,None"))
    k = dict(decode_text(resp.data))
    assert k["HeaderDigest"] == "CRC32C" and k["DataDigest"] == "CRC32C"
    assert ini.hd and ini.dd
    itt, ev = ini.command(WRITE10, edtl=512, write=True, data=b"d" * 512)
    assert len(_ready(ev)) == 1
    ini.conn.complete(itt, 0, transfer_length=512)
    (r,) = ini.recv()  # decoder checks the target's digests
    assert isinstance(r, pdu.ScsiResponse)
    cmd = pdu.ScsiCommand(itt=5, cmdsn=ini.cmdsn, expected_length=512, write=True,
                          cdb=WRITE10.ljust(16, b"\0"), data=b"e" * 512)
    wire = bytearray(cmd.encode(True, True))
    wire[-1] ^= 0xFF  # corrupt the data digest
    with pytest.raises(pdu.IscsiProtocolError):
        ini.send_bytes(bytes(wire))
    (rej,) = ini.recv()
    assert isinstance(rej, pdu.Reject) and rej.reason == 0x02


def test_header_digest_corruption_drops_without_reject() -> None:
    ini = Initiator()
    ini.login(libiscsi_keys(HeaderDigest="CRC32C"))
    wire = bytearray(pdu.NopOut(itt=1, immediate=True).encode(True, False))
    wire[49] ^= 1
    with pytest.raises(pdu.IscsiProtocolError):
        ini.send_bytes(bytes(wire))
    assert ini.recv() == []


# --------------------------------------------------------------------------- misc


def test_lun_encoding() -> None:
    for lun in (0, 1, 255, 256, 16383):
        assert decode_lun(encode_lun(lun)) == lun
    assert decode_lun(0xC000 << 48) == -1
    assert decode_lun(1) == -1  # second-level address: unsupported


def test_command_to_missing_lun_is_dispatched_with_its_number() -> None:
    ini = logged_in()
    _, ev = ini.command(READ10, edtl=512, read=True, lun=5)
    (cmd,) = _ready(ev)
    assert cmd.lun == 5


def test_garbage_after_login_raises_protocol_error() -> None:
    ini = logged_in()
    with pytest.raises(pdu.IscsiProtocolError):
        ini.send_bytes(bytes([0x3E]) + bytes(47))
    assert ini.conn.state is State.CLOSED


def test_limits_are_configurable() -> None:
    lim = replace(TargetLimits(), max_recv_data_segment_length=8192)
    ini = Initiator(limits=lim)
    resp = ini.login()
    assert dict(decode_text(resp.data))["MaxRecvDataSegmentLength"] == "8192"
    with pytest.raises(pdu.IscsiProtocolError):  # 64 KiB immediate data > 8 KiB + slack
        ini.command(WRITE10, edtl=65536, write=True, data=bytes(65536))


def test_fast_lane_answers_inline_with_the_same_pdus_as_the_normal_path() -> None:
    """TargetConnection.fast: a command complete on arrival is answered while it is decoded
    (no event, no task), with exactly the PDUs complete() would have produced."""
    calls: list[tuple[int, bytes, bytes]] = []

    def fast(lun: int, cdb: bytes, data: Any) -> tuple[int, Any, Any, int | None] | None:
        calls.append((lun, bytes(cdb[:1]), bytes(data)))
        if cdb[0] == 0x28:
            return 0, b"r" * 4096, b"", None
        if cdb[0] == 0x2A:
            return 0, b"", b"", 4096
        return None

    fast_ini, slow_ini = logged_in(fast=fast), logged_in()
    for ini in (fast_ini, slow_ini):
        _, ev = ini.command(READ10, edtl=4096, read=True)
        if ini is slow_ini:
            ini.conn.complete(_ready(ev)[0].task_tag, 0, b"r" * 4096)
        else:
            assert ev == [] and ini.conn.outstanding == 0
        _, ev = ini.command(WRITE10, edtl=4096, write=True, data=b"w" * 4096)
        if ini is slow_ini:
            ini.conn.complete(_ready(ev)[0].task_tag, 0, transfer_length=4096)
        else:
            assert ev == []
        _, ev = ini.command(WRITE10, edtl=512, write=True, data=b"w" * 512)  # 4096 wanted
        if ini is slow_ini:
            ini.conn.complete(_ready(ev)[0].task_tag, 0, transfer_length=4096)
        else:
            assert ev == []
    assert [c[2] for c in calls] == [b"", b"w" * 4096, b"w" * 512]
    got_fast, got_slow = fast_ini.recv(), slow_ini.recv()
    assert got_fast == got_slow and len(got_fast) == 3  # same StatSN, MaxCmdSN, residuals
    assert isinstance(got_fast[2], pdu.ScsiResponse) and got_fast[2].overflow


def test_fast_lane_steps_aside() -> None:
    """Declined (None), waiting for Data-Out, bidirectional or unexpected data: the normal
    path runs as before."""
    seen: list[int] = []

    def fast(lun: int, cdb: bytes, data: Any) -> None:
        seen.append(cdb[0])
        return None

    ini = logged_in(fast=fast)
    _, ev = ini.command(READ10, edtl=4096, read=True)
    assert len(_ready(ev)) == 1 and seen == [0x28]  # declined: an event as usual
    _, ev = ini.command(WRITE10, edtl=8192, write=True, data=b"w" * 4096, final=False)
    assert ev == [] and seen == [0x28]  # unsolicited Data-Out still to come: not offered
    _, ev = ini.command(READ10, edtl=4096, read=True, write=True)
    assert seen == [0x28]  # bidirectional: failed by the session, never offered
    _, ev = ini.command(READ10, edtl=4096, read=True, data=b"x" * 4)
    assert seen == [0x28]  # unexpected immediate data on a read: failed, never offered
