"""SCSI-3 persistent reservations (SPC-4 §5.13): the sans-IO state machine in
``edge.pr`` and the LU around it (persistence, unit attentions, conflicts,
PREEMPT AND ABORT), shared by every I_T nexus."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.scsi import GOOD, RESERVATION_CONFLICT, ItNexus, LogicalUnit, ScsiResult
from edge.scsi.pr import (
    Access,
    PersistentReservations,
    PrError,
    ProutParams,
    PrType,
    Sa,
    iscsi_transport_id,
    load_state,
)
from tests.test_scsi import BS, MemBackend, rw10, sense_of

I1, I2, I3 = "iqn.a,i,0x1|iqn.t,t,0x0001", "iqn.b,i,0x2|iqn.t,t,0x0001", \
    "iqn.c,i,0x3|iqn.t,t,0x0001"


def p(key: int = 0, sa_key: int = 0, **kw: bool) -> ProutParams:
    return ProutParams(key, sa_key, **kw)


def registered(*pairs: tuple[str, int]) -> PersistentReservations:
    pr = PersistentReservations()
    for n, k in pairs:
        pr.out(Sa.REGISTER, n, p(0, k))
    return pr


# --------------------------------------------------------------------------- state machine


def test_register_unregister_and_generation() -> None:
    pr = PersistentReservations()
    assert pr.out(Sa.REGISTER, I1, p(0, 0)).changed is False  # nothing to do
    assert pr.out(Sa.REGISTER, I1, p(0, 0xA)).changed and pr.generation == 1
    with pytest.raises(PrError) as e:
        pr.out(Sa.REGISTER, I1, p(0, 0xB))  # re-register needs the current key
    assert e.value.conflict
    pr.out(Sa.REGISTER, I1, p(0xA, 0xB))
    assert pr.registrations == {I1: 0xB} and pr.generation == 2
    pr.out(Sa.REGISTER_AND_IGNORE, I1, p(0, 0xC))
    assert pr.registrations == {I1: 0xC}
    with pytest.raises(PrError) as e:
        pr.out(Sa.REGISTER, I2, p(0x5, 0x6))  # unregistered with a key
    assert e.value.conflict
    pr.out(Sa.REGISTER, I1, p(0xC, 0))
    assert pr.registrations == {} and pr.generation == 4
    assert pr.read_keys() == (4).to_bytes(4, "big") + bytes(4)


@pytest.mark.parametrize("t", list(PrType))
def test_reserve_release_each_type(t: PrType) -> None:
    pr = registered((I1, 1), (I2, 2))
    gen = pr.generation
    pr.out(Sa.RESERVE, I1, p(1), pr_type=t)
    assert pr.reserved and pr.generation == gen  # RESERVE does not bump it
    rr = pr.read_reservation()
    key = int.from_bytes(rr[8:16], "big")
    assert key == (0 if t in (7, 8) else 1) and rr[21] == t
    assert pr.out(Sa.RESERVE, I1, p(1), pr_type=t).changed is False  # again: no-op
    if t not in (7, 8):
        with pytest.raises(PrError) as e:
            pr.out(Sa.RESERVE, I2, p(2), pr_type=t)
        assert e.value.conflict
    other = PrType.WRITE_EXCLUSIVE if t != PrType.WRITE_EXCLUSIVE else PrType.EXCLUSIVE_ACCESS
    with pytest.raises(PrError) as e:
        pr.out(Sa.RELEASE, I1, p(1), pr_type=other)
    assert (e.value.asc, e.value.ascq) == (0x26, 0x04)
    out = pr.out(Sa.RELEASE, I1, p(1), pr_type=t)
    assert not pr.reserved
    released_ua = [(n, a, q) for n, a, q in out.unit_attentions]
    assert released_ua == ([(I2, 0x2A, 0x04)] if t in (5, 6, 7, 8) else [])


@pytest.mark.parametrize("t,reg_r,reg_w,unreg_r,unreg_w", [
    (PrType.EXCLUSIVE_ACCESS, 0, 0, 0, 0), (PrType.WRITE_EXCLUSIVE, 1, 0, 1, 0),
    (PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY, 1, 1, 0, 0),
    (PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, 1, 1, 1, 0),
    (PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS, 1, 1, 0, 0),
    (PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, 1, 1, 1, 0)])
def test_access_by_type(t: PrType, reg_r: int, reg_w: int, unreg_r: int, unreg_w: int) -> None:
    """libiscsi's ProutReserve.Access* table (SPC-4 Table 65)."""
    pr = registered((I1, 1), (I2, 2))
    pr.out(Sa.RESERVE, I1, p(1), pr_type=t)
    assert pr.allowed(I1, Access.READ) and pr.allowed(I1, Access.WRITE)
    assert pr.allowed(I2, Access.READ) == bool(reg_r)
    assert pr.allowed(I2, Access.WRITE) == bool(reg_w)
    assert pr.allowed(I3, Access.READ) == bool(unreg_r)
    assert pr.allowed(I3, Access.WRITE) == bool(unreg_w)
    assert pr.allowed(I3, Access.ALLOWED)


@pytest.mark.parametrize("t", list(PrType))
def test_holder_unregistering_releases_unless_all_registrants(t: PrType) -> None:
    pr = registered((I1, 1), (I2, 2))
    pr.out(Sa.RESERVE, I1, p(1), pr_type=t)
    out = pr.out(Sa.REGISTER, I1, p(1, 0))
    if t in (7, 8):
        assert pr.reserved and pr.is_holder(I2)
        pr.out(Sa.RELEASE, I2, p(2), pr_type=t)
    else:
        assert not pr.reserved
        assert out.unit_attentions == ([(I2, 0x2A, 0x04)] if t in (5, 6) else [])


def test_clear_preempt_and_abort() -> None:
    pr = registered((I1, 1), (I2, 2), (I3, 3))
    pr.out(Sa.RESERVE, I2, p(2), pr_type=PrType.EXCLUSIVE_ACCESS)
    gen = pr.generation
    out = pr.out(Sa.PREEMPT_AND_ABORT, I1, p(1, 2), pr_type=PrType.WRITE_EXCLUSIVE)
    assert pr.is_holder(I1) and pr.type == PrType.WRITE_EXCLUSIVE and I2 not in pr.registrations
    assert out.abort == {I2} and out.unit_attentions == [(I2, 0x2A, 0x05)]
    assert pr.generation == gen + 1
    out = pr.out(Sa.PREEMPT, I1, p(1, 3))  # a registration only; reservation kept
    assert pr.registrations == {I1: 1} and out.abort == set() and pr.is_holder(I1)
    with pytest.raises(PrError) as e:
        pr.out(Sa.PREEMPT, I1, p(1, 0x99))
    assert e.value.conflict
    pr.out(Sa.REGISTER, I2, p(0, 2))
    out = pr.out(Sa.CLEAR, I2, p(2))
    assert not pr.registrations and not pr.reserved
    assert out.unit_attentions == [(I1, 0x2A, 0x03)]


def test_preempt_without_reservation_and_all_registrants() -> None:
    pr = registered((I1, 1), (I2, 2))
    with pytest.raises(PrError) as e:
        pr.out(Sa.PREEMPT, I2, p(2, 0))
    assert (e.value.asc, e.value.conflict) == (0x26, False)
    out = pr.out(Sa.PREEMPT, I2, p(2, 1), pr_type=PrType.EXCLUSIVE_ACCESS)
    assert pr.registrations == {I2: 2} and not pr.reserved and out.unit_attentions
    pr = registered((I1, 1), (I2, 2), (I3, 3))
    pr.out(Sa.RESERVE, I1, p(1), pr_type=PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS)
    pr.out(Sa.PREEMPT, I2, p(2, 0), pr_type=PrType.EXCLUSIVE_ACCESS)
    assert pr.registrations == {I2: 2} and pr.holder == I2 and pr.type == 3


def test_errors_are_checked_before_any_change() -> None:
    pr = registered((I1, 1))
    for sa, params, kw, want in [
        (Sa.RESERVE, p(1), {"pr_type": 2}, (False, 0x24)),
        (Sa.RESERVE, p(1), {"pr_type": 1, "scope": 1}, (False, 0x24)),
        (Sa.RESERVE, p(9), {"pr_type": 1}, (True, 0x24)),
        (Sa.RESERVE, p(1, spec_i_pt=True), {"pr_type": 1}, (False, 0x26)),
        (Sa.RESERVE, p(1, all_tg_pt=True), {"pr_type": 1}, (False, 0x26)),
        (Sa.REGISTER_AND_MOVE, p(1), {}, (False, 0x24)),
        (Sa.CLEAR, p(0), {}, (True, 0x24)),
    ]:
        with pytest.raises(PrError) as e:
            pr.out(sa, I1, params, **kw)
        assert (e.value.conflict, e.value.asc) == want, sa
    assert pr.registrations == {I1: 1} and not pr.reserved and pr.generation == 1
    assert pr.out(Sa.RELEASE, I1, p(1), pr_type=1).changed is False  # nothing reserved


def test_report_capabilities_and_full_status() -> None:
    pr = registered((I1, 1), (I2, 2))
    caps = pr.report_capabilities()
    assert len(caps) == 8 and caps[:2] == bytes((0, 8)) and caps[2] & 0x01  # PTPL_C
    assert int.from_bytes(caps[4:6], "big") == 0xEA01
    pr.out(Sa.RESERVE, I2, p(2), pr_type=PrType.WRITE_EXCLUSIVE)
    fs = pr.read_full_status()
    n = int.from_bytes(fs[4:8], "big")
    assert len(fs) == 8 + n
    d0 = fs[8:]
    assert int.from_bytes(d0[0:8], "big") == 1 and not d0[12] & 1
    tid_len = int.from_bytes(d0[20:24], "big")
    tid = d0[24:24 + tid_len]
    assert tid[0] == 0x45 and tid[4:].rstrip(b"\0") == b"iqn.a,i,0x1"
    d1 = d0[24 + tid_len:]
    assert d1[12] & 1 and d1[13] == 0x01
    assert len(iscsi_transport_id("x")) == 24 and len(iscsi_transport_id("y" * 30)) % 4 == 0


def test_state_round_trip_and_corruption() -> None:
    pr = registered((I1, 0xDEADBEEF), (I2, 2))
    pr.out(Sa.RESERVE, I1, p(0xDEADBEEF), pr_type=PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY)
    blob = pr.to_bytes()
    back = PersistentReservations.from_bytes(blob)
    assert back.to_dict() == pr.to_dict()
    doc = json.loads(blob)
    doc["state"]["generation"] += 1
    with pytest.raises(ValueError, match="checksum"):
        load_state(json.dumps(doc).encode())
    doc = json.loads(blob)
    doc["version"] = 99
    with pytest.raises(ValueError, match="version"):
        load_state(json.dumps(doc).encode())
    with pytest.raises(ValueError):
        load_state(b'{"format": "other"}')
    with pytest.raises(PrError):
        ProutParams.decode(bytes(23))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]),
                          st.sampled_from([I1, I2, I3]), st.integers(0, 3),
                          st.integers(0, 3), st.integers(0, 9)), max_size=30))
def test_invariants_under_any_sequence(ops: list[tuple[int, str, int, int, int]]) -> None:
    """Whatever the sequence: a reservation always has a registered holder (or
    registrants, for all-registrants types), errors change nothing, and the
    state survives a round trip through its file format."""
    pr = PersistentReservations()
    for sa, nexus, key, sa_key, t in ops:
        before = pr.to_bytes()
        try:
            pr.out(sa, nexus, p(key, sa_key), pr_type=t)
        except PrError:
            assert pr.to_bytes() == before
        if pr.reserved:
            assert pr.type in (1, 3, 5, 6, 7, 8)
            if pr.type in (7, 8):
                assert pr.registrations
            else:
                assert pr.holder in pr.registrations
        assert PersistentReservations.from_bytes(pr.to_bytes()).to_dict() == pr.to_dict()


# --------------------------------------------------------------------------- through the LU

N1 = ItNexus("iqn.2024-01.test:a", 0x23D000000001, "iqn.2024-01.test:t", 1, 11)
N2 = ItNexus("iqn.2024-01.test:b", 0x23D000000002, "iqn.2024-01.test:t", 1, 12)


def prout(lu: LogicalUnit, nexus: ItNexus, sa: int, key: int = 0, sa_key: int = 0,
          pr_type: int = 0, plen: int = 24) -> ScsiResult:
    cdb = struct.pack(">BBBxxIB", 0x5F, sa, pr_type, plen, 0)
    data = struct.pack(">QQ8x", key, sa_key)
    return asyncio.run(lu.execute(cdb, data[:plen], (0,), nexus))


def prin(lu: LogicalUnit, nexus: ItNexus, sa: int, alloc: int = 8192) -> bytes:
    r = asyncio.run(lu.execute(struct.pack(">BB5xHB", 0x5E, sa, alloc, 0), b"", (0,), nexus))
    assert r.status == GOOD
    return bytes(r.data)


def cmd(lu: LogicalUnit, nexus: ItNexus, cdb: bytes, data: bytes = b"") -> ScsiResult:
    return asyncio.run(lu.execute(cdb, data, (0,), nexus))


def test_registrations_survive_a_restart(tmp_path: Path, ) -> None:
    path = tmp_path / "pr" / "lun.json"
    mem = MemBackend()
    lu = LogicalUnit(mem, pr_state_path=path)
    assert prout(lu, N1, Sa.REGISTER, 0, 0x1111).status == GOOD
    assert prout(lu, N1, Sa.RESERVE, 0x1111, pr_type=PrType.WRITE_EXCLUSIVE).status == GOOD
    assert path.stat().st_mode & 0o777 == 0o600
    again = LogicalUnit(mem, pr_state_path=path)  # "restart"
    keys = prin(again, N2, 0)
    assert int.from_bytes(keys[8:16], "big") == 0x1111
    assert prin(again, N2, 1)[21] == PrType.WRITE_EXCLUSIVE
    assert cmd(again, N2, rw10(0x2A, 0, 1), bytes(BS)).status == RESERVATION_CONFLICT
    assert cmd(again, N2, rw10(0x28, 0, 1)).status == GOOD
    path.write_bytes(b"garbage")
    from steelfusion.statefile import StateFileError

    # one line naming the file and what to do (the CLI prints it; issue 13)
    with pytest.raises(StateFileError, match=r"unreadable persistent-reservation.*move it away"):
        LogicalUnit(mem, pr_state_path=path)


def test_failed_persist_rolls_back(tmp_path: Path) -> None:
    lu = LogicalUnit(MemBackend(), pr_state_path=tmp_path / "state" / "pr.json")
    (tmp_path / "state").write_bytes(b"")  # a file where the state folder should be
    assert sense_of(prout(lu, N1, Sa.REGISTER, 0, 5)) == (4, 0x44, 0)
    assert lu.pr.registrations == {}


def test_prout_checks_and_unit_attentions() -> None:
    aborted: list[set[str]] = []
    lu = LogicalUnit(MemBackend(), on_abort=lambda unit, ids: aborted.append(ids))
    lu.attach(N1)
    lu.attach(N2)
    assert sense_of(prout(lu, N1, Sa.REGISTER, 0, 1, plen=20)) == (5, 0x1A, 0)
    assert prout(lu, N2, Sa.REGISTER, 5, 6).status == RESERVATION_CONFLICT
    assert prout(lu, N1, Sa.REGISTER, 0, 1).status == GOOD
    assert prout(lu, N2, Sa.REGISTER, 0, 2).status == GOOD
    # SPC-2 RESERVE is refused while persistent registrations exist
    assert cmd(lu, N1, bytes((0x16, 0, 0, 0, 0, 0))).status == RESERVATION_CONFLICT
    assert prout(lu, N2, Sa.RESERVE, 2, pr_type=PrType.EXCLUSIVE_ACCESS).status == GOOD
    assert cmd(lu, N1, rw10(0x28, 0, 1)).status == RESERVATION_CONFLICT
    assert prout(lu, N1, Sa.PREEMPT_AND_ABORT, 1, 2, PrType.EXCLUSIVE_ACCESS).status == GOOD
    assert aborted == [{N2.pr_id}]
    assert sense_of(cmd(lu, N2, bytes(6))) == (6, 0x2A, 0x05)  # REGISTRATIONS PREEMPTED
    assert cmd(lu, N2, bytes(6)).status == GOOD  # TUR is allowed under any reservation
    assert cmd(lu, N2, rw10(0x28, 0, 1)).status == RESERVATION_CONFLICT
    assert prin(lu, N2, 2)[:2] == bytes((0, 8))  # PRIN is always allowed
    rsv = asyncio.run(lu.execute(struct.pack(">BB5xHB", 0x5E, 9, 100, 0), b"", (0,), N1))
    assert sense_of(rsv) == (5, 0x24, 0)  # no such PRIN service action
    assert prout(lu, N1, Sa.CLEAR, 1).status == GOOD
    assert cmd(lu, N2, rw10(0x28, 0, 1)).status == GOOD


def test_spc2_reservation_blocks_persistent_reserve_out() -> None:
    lu = LogicalUnit(MemBackend())
    assert cmd(lu, N1, bytes((0x16, 0, 0, 0, 0, 0))).status == GOOD
    assert prout(lu, N2, Sa.REGISTER, 0, 1).status == RESERVATION_CONFLICT
    assert prout(lu, N1, Sa.REGISTER, 0, 1).status == GOOD
    assert cmd(lu, N1, bytes((0x17, 0, 0, 0, 0, 0))).status == RESERVATION_CONFLICT
