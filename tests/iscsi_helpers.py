"""iSCSI test helpers: the names and login keys the tests use, one sample of every PDU type,
an in-memory initiator that drives the Edge's sans-IO target PDU by PDU, and a raw-socket
client for a target on loopback.

The PDU, session, CHAP, fuzz, spec, target and abort tests share these; they used to import
them from each other's modules (and copy them into their own)."""

from __future__ import annotations

import socket
from typing import Any

from edge.iscsi_session import (
    Event,
    FastLane,
    SessionConfig,
    State,
    TargetConnection,
    TargetInfo,
)
from edge.scsi.cdb import encode_lun
from steelfusion.iscsi import pdu
from steelfusion.iscsi.text import Pairs, encode_text

IQN = "iqn.2024-01.io.steelfusion:test"
OTHER_IQN = "iqn.2024-01.io.steelfusion:other"
INITIATOR = "iqn.2024-01.io.steelfusion:initiator"
PORTAL = "192.0.2.1:3260"
READ10 = bytes((0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0))
"""READ(10) of 8 blocks at LBA 0."""
WRITE10 = bytes((0x2A, 0, 0, 0, 0, 0, 0, 0, 8, 0))
"""WRITE(10) of 8 blocks at LBA 0."""

LIBISCSI_KEYS: Pairs = [
    ("HeaderDigest", "None,CRC32C"), ("DataDigest", "None"), ("InitialR2T", "No"),
    ("ImmediateData", "Yes"), ("MaxBurstLength", "262144"), ("FirstBurstLength", "262144"),
    ("DefaultTime2Wait", "2"), ("DefaultTime2Retain", "0"), ("MaxOutstandingR2T", "1"),
    ("ErrorRecoveryLevel", "0"), ("IFMarker", "No"), ("OFMarker", "No"),
    ("MaxConnections", "1"), ("MaxRecvDataSegmentLength", "262144"),
    ("DataPDUInOrder", "Yes"), ("DataSequenceInOrder", "Yes"),
]
"""The operational keys libiscsi offers at login, in its order: what a real initiator sends."""


def libiscsi_keys(**changed: str) -> Pairs:
    """:data:`LIBISCSI_KEYS` with some values changed (those keys move to the end)."""
    return [(k, v) for k, v in LIBISCSI_KEYS if k not in changed] + list(changed.items())


SAMPLES: list[pdu.Pdu] = [
    pdu.NopOut(itt=1, ttt=0xFFFFFFFF, lun=1 << 48, cmdsn=7, exp_statsn=9, immediate=True,
               data=b"ping!"),
    pdu.NopOut(itt=0xFFFFFFFF, ttt=55, cmdsn=1, exp_statsn=2),
    pdu.ScsiCommand(itt=2, lun=3 << 48, cmdsn=100, exp_statsn=5, expected_length=4096,
                    cdb=bytes([0x2A, 0, 0, 0, 0, 8, 0, 0, 8, 0]) + bytes(6), final=False,
                    write=True, attr=1, data=b"x" * 1000),
    pdu.ScsiCommand(itt=3, cdb=bytes(range(32)), read=True, expected_length=512,
                    bidi_read_length=77, immediate=True),
    pdu.ScsiCommand(itt=4, cdb=bytes(range(20)), read=True),
    pdu.TaskMgmtRequest(itt=5, function=1, lun=1 << 48, ref_task_tag=2, cmdsn=3, exp_statsn=4,
                        ref_cmdsn=5, exp_datasn=6),
    pdu.LoginRequest(itt=6, isid=0x80_1234_5678_9A, tsih=0, cid=3, cmdsn=1, exp_statsn=0,
                     transit=True, cont=False, csg=1, nsg=3, version_max=0, version_min=0,
                     data=b"InitiatorName=iqn.x\0TargetName=iqn.y\0"),
    pdu.LoginRequest(itt=7, isid=1, cont=True, csg=0, nsg=1, data=b"A=B\0"),
    pdu.TextRequest(itt=8, ttt=9, lun=0, cmdsn=10, exp_statsn=11, final=False, cont=True,
                    immediate=True, data=b"SendTargets=All\0"),
    pdu.DataOut(itt=12, ttt=13, lun=1 << 48, exp_statsn=14, datasn=15, buffer_offset=8192,
                final=True, data=bytes(range(256)) * 3),
    pdu.LogoutRequest(itt=16, reason=1, cid=2, cmdsn=17, exp_statsn=18, immediate=True),
    pdu.SnackRequest(itt=19, snack_type=1, lun=0, ttt=20, exp_statsn=21, begrun=22,
                     runlength=23),
    pdu.NopIn(itt=24, ttt=25, lun=0, statsn=26, exp_cmdsn=27, max_cmdsn=28, data=b"pong"),
    pdu.ScsiResponse(itt=29, status=2, response=0, statsn=30, exp_cmdsn=31, max_cmdsn=32,
                     exp_datasn=2, overflow=True, residual_count=512, bidi_underflow=True,
                     bidi_residual_count=3, data=pdu.sense_segment(bytes(18))),
    pdu.ScsiResponse(itt=33, underflow=True, residual_count=1),
    pdu.TaskMgmtResponse(itt=34, response=1, statsn=35, exp_cmdsn=36, max_cmdsn=37),
    pdu.LoginResponse(itt=38, isid=0x40_0000_0000_01, tsih=9, statsn=39, exp_cmdsn=40,
                      max_cmdsn=41, status_class=2, status_detail=7, transit=True, csg=1, nsg=3,
                      data=b"TargetPortalGroupTag=1\0"),
    pdu.TextResponse(itt=42, ttt=43, lun=0, statsn=44, exp_cmdsn=45, max_cmdsn=46, final=False,
                     cont=True, data=b"TargetName=iqn.z\0"),
    pdu.DataIn(itt=47, ttt=0xFFFFFFFF, lun=1 << 48, statsn=48, exp_cmdsn=49, max_cmdsn=50,
               datasn=51, buffer_offset=1024, residual_count=7, final=True, overflow=False,
               underflow=True, status_present=True, status=0, data=b"d" * 513),
    pdu.DataIn(itt=52, datasn=1, final=False, ack=True, data=b"e" * 4),
    pdu.LogoutResponse(itt=53, response=0, statsn=54, exp_cmdsn=55, max_cmdsn=56, time2wait=2,
                       time2retain=20),
    pdu.R2T(itt=57, ttt=58, lun=1 << 48, statsn=59, exp_cmdsn=60, max_cmdsn=61, r2tsn=62,
            buffer_offset=65536, desired_length=262144),
    pdu.AsyncMessage(lun=0, statsn=63, exp_cmdsn=64, max_cmdsn=65, event=1, vcode=2,
                     parameter1=3, parameter2=4, parameter3=5, data=b"\0\0"),
    pdu.Reject(reason=pdu.RejectReason.PROTOCOL_ERROR, statsn=66, exp_cmdsn=67, max_cmdsn=68,
               datasn_r2tsn=69, data=bytes(48)),
]
"""One PDU of every opcode, most fields set to distinct values: the codec's round-trip set
(tests/test_iscsi_spec.py holds their bytes as RFC 7143 lays them out)."""


def make_config(**kw: Any) -> SessionConfig:
    """Two targets: :data:`IQN` (LUNs 0 and 1, an alias) and :data:`OTHER_IQN` (LUN 0)."""
    targets = {IQN: TargetInfo(IQN, frozenset({0, 1}), alias="test disk"),
               OTHER_IQN: TargetInfo(OTHER_IQN, frozenset({0}))}
    return SessionConfig(targets=targets, **kw)


class Initiator:
    """Just enough of an initiator to drive TargetConnection in memory."""

    def __init__(self, conn: TargetConnection | None = None, *, fast: FastLane | None = None,
                 **cfg: Any) -> None:
        self.conn = conn or TargetConnection(make_config(**cfg), portal=PORTAL, tsih=7, fast=fast)
        self.dec = pdu.PduDecoder(accept=pdu.TARGET_OPCODES, max_data_segment_length=1 << 24)
        self.hd = self.dd = False
        self.itt = 0x100
        self.cmdsn = 1
        self.events: list[Event] = []

    def next_itt(self) -> int:
        self.itt += 1
        return self.itt

    def send(self, *pdus: pdu.Pdu) -> list[Event]:
        wire = b"".join(p.encode(self.hd, self.dd) for p in pdus)
        ev = self.conn.receive_data(wire)
        self.events += ev
        return ev

    def send_bytes(self, data: bytes) -> list[Event]:
        ev = self.conn.receive_data(data)
        self.events += ev
        return ev

    def recv(self) -> list[pdu.Pdu]:
        return self.dec.feed(b"".join(bytes(b) for b in self.conn.data_to_send()))

    def login_step(self, keys: Pairs, *, itt: int = 1, isid: int = 5, cmdsn: int = 1,
                   transit: bool = True, csg: int = 0, nsg: int = 1,
                   **fields: Any) -> pdu.LoginResponse:
        """One Login Request carrying ``keys`` and the one Login Response it gets."""
        self.send(pdu.LoginRequest(itt=itt, isid=isid, cmdsn=cmdsn, transit=transit, csg=csg,
                                   nsg=nsg, data=encode_text(keys), **fields))
        (resp,) = self.recv()
        assert isinstance(resp, pdu.LoginResponse)
        return resp

    def login(self, keys: Pairs | None = None, *, target: str | None = IQN,
              discovery: bool = False) -> pdu.LoginResponse:
        """A whole login in one PDU, straight to Full Feature Phase; digests follow what
        was negotiated."""
        pairs = [("InitiatorName", INITIATOR)]
        if discovery:
            pairs.append(("SessionType", "Discovery"))
        elif target:
            pairs += [("TargetName", target), ("SessionType", "Normal")]
        pairs += LIBISCSI_KEYS if keys is None else keys
        resp = self.login_step(pairs, csg=1, nsg=3, itt=self.next_itt(), isid=0x80_0000_1234_56,
                               cmdsn=self.cmdsn)
        if resp.status_class == 0 and resp.transit:
            p = self.conn.params
            self.hd = self.dec.header_digest = p.header_digest
            self.dd = self.dec.data_digest = p.data_digest
        return resp

    def command(self, cdb: bytes, *, edtl: int = 0, read: bool = False, write: bool = False,
                data: bytes = b"", final: bool = True, immediate: bool = False,
                lun: int = 0, itt: int | None = None) -> tuple[int, list[Event]]:
        itt = self.next_itt() if itt is None else itt
        cmd = pdu.ScsiCommand(itt=itt, lun=encode_lun(lun), cmdsn=self.cmdsn,
                              expected_length=edtl, cdb=cdb.ljust(16, b"\0"), read=read,
                              write=write, final=final, immediate=immediate, data=data)
        if not immediate:
            self.cmdsn += 1
        return itt, self.send(cmd)


def logged_in_target(*, fast: FastLane | None = None, **cfg: Any) -> Initiator:
    """An in-memory initiator already in full feature phase with a fresh target."""
    ini = Initiator(fast=fast, **cfg)
    resp = ini.login()
    assert resp.status_class == 0 and resp.transit
    assert ini.conn.state is State.FULL_FEATURE
    return ini


class RawClient:
    """A blocking socket speaking raw PDUs to a target on loopback, for protocol-level
    checks; each client is its own I_T nexus (a new ISID)."""

    count = 0

    def __init__(self, port: int, target: str) -> None:
        RawClient.count += 1
        self.isid = 0x80_0000_0000_00 | RawClient.count
        self.target = target
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.dec = pdu.PduDecoder(accept=pdu.TARGET_OPCODES, max_data_segment_length=1 << 24)
        self.pending: list[pdu.Pdu] = []
        self.itt = 0
        self.cmdsn = 1

    def send(self, *pdus: pdu.Pdu) -> None:
        self.sock.sendall(b"".join(p.encode() for p in pdus))

    def recv(self) -> pdu.Pdu:
        while not self.pending:
            data = self.sock.recv(1 << 16)
            if not data:
                raise EOFError
            self.pending += self.dec.feed(data)
        return self.pending.pop(0)

    def login(self) -> pdu.LoginResponse:
        self.send(pdu.LoginRequest(itt=0, isid=self.isid, cmdsn=self.cmdsn, transit=True, csg=1,
                                   nsg=3, data=encode_text([
                                       ("InitiatorName", "iqn.2024-01.test:raw"),
                                       ("TargetName", self.target),
                                       ("MaxRecvDataSegmentLength", "65536")])))
        r = self.recv()
        assert isinstance(r, pdu.LoginResponse) and r.status_class == 0 and r.transit
        return r

    def submit(self, cdb: bytes, *, data: bytes = b"", read_len: int = 0) -> int:
        """Send a command to LUN 0 (its write data immediate); its ITT."""
        self.itt += 1
        self.send(pdu.ScsiCommand(itt=self.itt, lun=encode_lun(0), cmdsn=self.cmdsn,
                                  expected_length=read_len or len(data), read=bool(read_len),
                                  write=bool(data), cdb=cdb.ljust(16, b"\0"), data=data))
        self.cmdsn += 1
        return self.itt

    def command(self, cdb: bytes, data: bytes = b"", read_len: int = 0
                ) -> tuple[int, bytes, bytes]:
        """One command, waited for: (status, Data-In, sense)."""
        self.submit(cdb, data=data, read_len=read_len)
        got = b""
        while True:
            p = self.recv()
            if isinstance(p, pdu.DataIn):
                got += bytes(p.data)
                if p.status_present:
                    return p.status, got, b""
            else:
                assert isinstance(p, pdu.ScsiResponse), p
                return p.status, got, pdu.parse_sense_segment(p.data)

    def read10(self, lba: int, blocks: int) -> bytes:
        cdb = bytes((0x28, 0)) + lba.to_bytes(4, "big") + bytes((0,)) + blocks.to_bytes(2, "big")
        status, data, _ = self.command(cdb, read_len=blocks * 512)
        assert status == 0
        return data

    def tmf(self, function: int, ref: int = pdu.RESERVED_TAG, ref_cmdsn: int = 0) -> int:
        """Send a task management request for LUN 0; its ITT."""
        self.itt += 1
        self.send(pdu.TaskMgmtRequest(itt=self.itt, function=function, lun=encode_lun(0),
                                      ref_task_tag=ref, cmdsn=self.cmdsn, ref_cmdsn=ref_cmdsn))
        return self.itt

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """True once the target has closed the connection."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(1 << 16):
                pass
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()
