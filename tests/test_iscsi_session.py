"""The sans-IO target state machine in full feature phase, driven by an in-memory initiator:
writes with immediate + unsolicited + R2T data, reads with multi-PDU Data-In and residuals,
numbering, NOP, logout, digests, the fast lane (RFC 7143). Login and discovery are in
test_iscsi_login.py, task management in test_iscsi_tmf.py."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from edge import iscsi_events as events
from edge.iscsi_session import State
from edge.scsi.cdb import decode_lun, encode_lun
from steelfusion.iscsi import pdu
from steelfusion.iscsi.text import TargetLimits, decode_text
from tests.iscsi_helpers import (
    READ10,
    WRITE10,
    Initiator,
    libiscsi_keys,
)
from tests.iscsi_helpers import logged_in_target as logged_in

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


def _data_in_run(dins: list[pdu.Pdu], size: int, mrdsl: int, mbl: int) -> bytes:
    """Check one read's Data-In PDUs against RFC 7143 §11.7: every data segment within the
    initiator's MaxRecvDataSegmentLength, sequences (F bit) of at most MaxBurstLength,
    offsets contiguous, DataSN counting from 0, status only on the last; returns the data."""
    assert dins and all(isinstance(p, pdu.DataIn) for p in dins), dins
    ds: list[pdu.DataIn] = dins  # type: ignore[assignment]
    assert max(len(p.data) for p in ds) <= mrdsl
    assert [p.datasn for p in ds] == list(range(len(ds)))
    off, burst = 0, 0
    for p in ds:
        assert p.buffer_offset == off
        off += len(p.data)
        burst += len(p.data)
        assert burst <= mbl
        if p.final:
            burst = 0
    assert off == size and ds[-1].final and ds[-1].status_present
    assert not any(p.status_present for p in ds[:-1])
    return b"".join(bytes(p.data) for p in ds)


@pytest.mark.parametrize("mrdsl,mbl", [(262144, 262144), (262144, 1048576), (8192, 262144),
                                       (65536, 98304), (4096, 16777215)])
@pytest.mark.parametrize("fast", [False, True])
def test_large_read_data_in_honours_the_initiators_limits(mrdsl: int, mbl: int,
                                                          fast: bool) -> None:
    """Issue 18: the Linux initiator's 512 KiB reads (and odd sizes around them) are cut to
    the MaxRecvDataSegmentLength it declared, per PDU, on the normal path and the fast lane
    alike; the first row is open-iscsi's defaults (the ones the guest measurement ran)."""
    def lane(lun: int, cdb: bytes, data: Any) -> tuple[int, Any, Any, int | None] | None:
        n = int.from_bytes(cdb[7:9], "big") * 512
        return 0, payload[:n], b"", None

    keys = libiscsi_keys(MaxRecvDataSegmentLength=str(mrdsl), MaxBurstLength=str(mbl))
    ini = Initiator(fast=lane if fast else None)
    assert ini.login(keys).status_class == 0
    p = ini.conn.params
    assert (p.max_recv_data_segment_length, p.max_burst_length) == (mrdsl, min(mbl, 1 << 20))
    payload = bytes(i * 31 & 0xFF for i in range(1 << 20))
    for size in (512, mrdsl, mrdsl + 512, 512 << 10, (1 << 20) - 512):
        cdb = READ10[:7] + (size // 512).to_bytes(2, "big") + READ10[9:]
        itt, ev = ini.command(cdb, edtl=size, read=True)
        if not fast:
            ini.conn.complete(_ready(ev)[0].task_tag, 0, payload[:size])
        got = _data_in_run(ini.recv(), size, mrdsl, p.max_burst_length)
        assert got == payload[:size], (size, itt)


def test_data_in_follows_a_max_recv_data_segment_length_declared_in_a_text_request() -> None:
    """MaxRecvDataSegmentLength may be declared again in full feature phase (RFC 7143
    §13.12): the next Data-In already keeps to the new value."""
    ini = logged_in()
    ini.send(pdu.TextRequest(itt=90, cmdsn=ini.cmdsn, immediate=True,
                             data=b"MaxRecvDataSegmentLength=16384\0"))
    (answer,) = ini.recv()
    assert isinstance(answer, pdu.TextResponse) and answer.final
    assert ini.conn.params.max_recv_data_segment_length == 16384
    data = bytes(range(256)) * 256  # 64 KiB
    _, ev = ini.command(READ10, edtl=len(data), read=True)
    ini.conn.complete(_ready(ev)[0].task_tag, 0, data)
    assert _data_in_run(ini.recv(), len(data), 16384,
                        ini.conn.params.max_burst_length) == data


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
