"""Core-level FusionSync checks over real processes, driven by a wire-level Edge.

These need control over exactly which writes reach which Core, so the Edge
here is :class:`tests.nodes.FakeEdge`, speaking the node protocol directly.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from journal import required_size
from steelfusion import control
from tests.nodes import (
    CoreProc,
    FakeEdge,
    MiB,
    WitnessProc,
    make_cores,
    pairing_refused,
    peer_linked,
    running,
    wait_for,
)

pytestmark = [pytest.mark.lab, pytest.mark.timeout(120)]  # real node processes


def st(c: CoreProc) -> dict[str, Any]:
    return control.call(c.cfg.control, "status")


def test_regions_in_flight_at_a_primary_crash_are_resynced(tmp_path: Path) -> None:
    """DESIGN invariant 5: the old primary cannot keep blocks the new primary never had."""
    w = WitnessProc.configure(tmp_path, lease=1.0)
    a, b = make_cores(tmp_path, {1: 16 * MiB}, witness=w.cfg.listen,
                      journal_size=required_size(1))
    with running(w, a, b):
        wait_for(lambda: st(a)["replication"] == "running", what="running")
        x = os.urandom(64 * 1024)

        async def phase1() -> None:
            e = FakeEdge("edge-x", 11, {1: 16 * MiB})
            assert await e.connect(a.cfg.listen)
            e.write(1, 1, 0, b"a" * 4096)
            await e.wait_acked(1, 1)
            b.kill()
            await asyncio.to_thread(wait_for, lambda: st(a)["replication"] == "paused", 15,
                                    "paused")
            e.write(1, 2, 4 * MiB, x)  # applied on the primary only: in flight
            await asyncio.to_thread(wait_for, lambda: st(a)["luns"]["1"]["applied_seq"] == 2,
                                    10, "applied")
            e.close()

        asyncio.run(phase1())
        assert a.lun_bytes(1)[4 * MiB:4 * MiB + len(x)] == x
        a.kill()
        b.start()
        wait_for(lambda: control.call(b.cfg.control, "failover").get("ok") is True, 20,
                 "failover")
        assert st(b)["role"] == "primary"

        async def phase2() -> None:
            # this Edge never resends seq 2: only the journal's activity log knows about it
            e = FakeEdge("edge-x", 11, {1: 16 * MiB})
            assert await e.connect(b.cfg.listen)
            e.write(1, 3, 8 * MiB, b"y" * 8192)
            await e.wait_acked(1, 3)
            e.close()

        asyncio.run(phase2())
        a.start()
        wait_for(lambda: st(a)["role"] == "secondary", 20, "demotion")
        wait_for(lambda: peer_linked(b.cfg.control), 20, "peer link")
        assert control.call(b.cfg.control, "resume")["ok"]
        wait_for(lambda: st(b)["replication"] == "running", 30, "resync")
        assert a.lun_bytes(1) == b.lun_bytes(1)
        assert a.lun_bytes(1)[4 * MiB:4 * MiB + len(x)] == bytes(len(x))  # the diverged write is gone
        assert "diverged_regions_received" in b.log_events()


def test_journal_too_small_raises_alarm_and_replication_does_not_start(tmp_path: Path) -> None:
    a, _ = make_cores(tmp_path, {1: 8 * MiB, 2: 8 * MiB}, journal_size=2 << 30)  # needs 5 GiB
    with running(a):
        s = st(a)
        assert s["replication"] == "disabled"
        alarm = {x["alarm"]: x["message"] for x in s["alarms"]}
        assert "journal_too_small" in alarm and "5" in alarm["journal_too_small"]
        assert s["connections"]["replication_expected_out"] == 0
        assert "replication_service_not_started" in a.log_events()


def test_corrupt_journal_record_detected_never_used(tmp_path: Path) -> None:
    w = WitnessProc.configure(tmp_path)
    a, b = make_cores(tmp_path, {1: 8 * MiB}, witness=w.cfg.listen, journal_size=required_size(1))
    with running(w, a, b):
        wait_for(lambda: st(a)["replication"] == "running", what="running")

        async def writes() -> None:
            e = FakeEdge("edge-x", 3, {1: 8 * MiB})
            assert await e.connect(a.cfg.listen)
            for i in range(1, 20):
                e.write(1, i, i * 256 * 1024, b"q" * 4096)
            await e.wait_acked(1, 19)
            e.close()

        asyncio.run(writes())
        a.kill()  # no clean close: the log holds AL records
        jpath = Path(a.cfg.journal_path or "")
        with open(jpath, "rb") as f:
            f.seek(1 << 20)  # the append log (journal/layout.py)
            log = f.read(8 << 20)
        blocks = [i for i in range(0, len(log), 512) if log[i:i + 4] == b"SFJL"]
        assert len(blocks) >= 2, "expected several committed log blocks"
        with open(jpath, "r+b") as f:  # flip a byte inside the first (not the last) block
            f.seek((1 << 20) + blocks[0] + 40)
            f.write(bytes([log[blocks[0] + 40] ^ 0x5A]))
        a.start()
        s = st(a)
        alarms = {x["alarm"] for x in s["alarms"]}
        assert alarms & {"journal_corrupt", "journal_error"}, s["alarms"]
        assert s["replication"] == "disabled"


def test_initial_sync_copies_the_whole_lun(tmp_path: Path) -> None:
    """A new pair: the replica is filled through the resync path, 128 KiB at a time."""
    a, b = make_cores(tmp_path, {1: 8 * MiB}, journal_size=required_size(1), initial_sync=True)
    data = os.urandom(8 * MiB)
    Path(a.cfg.luns[0].path).parent.mkdir(parents=True, exist_ok=True)
    Path(a.cfg.luns[0].path).write_bytes(data)
    with running(a, b):
        wait_for(lambda: st(a)["replication"] == "running" and st(a)["peer"]["synced"], 30,
                 "initial sync")
        assert b.lun_bytes(1) == data
        assert st(b)["replication"] == "replica"
        assert '"resync_done"' in a.log_events()


@pytest.mark.parametrize("case", ["own-lun"])  # ha-mismatch: tests/test_ha_logic.py
def test_pairing_checks_refuse_with_reason(tmp_path: Path, case: str) -> None:
    a, b = make_cores(tmp_path, {1: 8 * MiB}, replica_luns={1: 8 * MiB, 9: 8 * MiB})
    code = "secondary-has-luns"
    with running(a, b):
        wait_for(lambda: pairing_refused(a, b, code), 20, f"a pairing_refused alarm with {code}")
        assert st(a)["replication"] != "running"
        assert code in b.log_events()
