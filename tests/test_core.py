"""Core processes over real TCP: synchronous mirroring, pause, resend, refusals."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from steelfusion import control
from steelfusion.wire import Message
from tests.nodes import (
    CoreProc,
    FakeEdge,
    MiB,
    alarms,
    make_cores,
    pairing_refused,
    running,
    status,
    wait_for,
)

pytestmark = [pytest.mark.lab, pytest.mark.timeout(120)]  # real node processes


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[CoreProc, CoreProc]]:
    a, b = make_cores(tmp_path, {1: 8 * MiB, 2: 4 * MiB})
    with running(a, b):
        yield a, b


async def edge_on(core: CoreProc, stream: int, name: str = "edge-x") -> FakeEdge:
    """A FakeEdge of the pair's two LUNs (8 and 4 MiB), welcomed by ``core``."""
    e = FakeEdge(name, stream, {1: 8 * MiB, 2: 4 * MiB})
    assert await e.connect(core.cfg.listen), e.refused
    return e


def _wait_repl(addr: tuple[str, int], want: str, timeout: float = 15) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while True:
        st = control.call(addr, "status")
        if st["replication"] == want:
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"replication {st['replication']}, wanted {want}")
        time.sleep(0.05)


def test_write_acked_only_when_on_both_cores(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    st = _wait_repl(a.cfg.control, "running")
    # seed: 2 TCP replication connections per interface from each Core
    assert st["connections"]["replication_expected_out"] == 2
    assert sum(1 for c in st["connections"]["replication"]
               if c["direction"] == "out" and c["established"]) == 2
    rng = random.Random(3)
    model = {1: bytearray(8 * MiB), 2: bytearray(4 * MiB)}

    async def main() -> None:
        e = await edge_on(a, 42)
        seqs = {1: 0, 2: 0}
        for _ in range(500):
            lun = rng.choice([1, 2])
            size = len(model[lun])
            n = rng.choice([512, 4096, 65536, 512 * 1024])
            off = rng.randrange(0, (size - n) // 512) * 512
            data = rng.randbytes(n)
            seqs[lun] += 1
            model[lun][off:off + n] = data
            e.write(lun, seqs[lun], off, data)
        await e.wait_acked(1, seqs[1])
        await e.wait_acked(2, seqs[2])
        e.close()

    asyncio.run(main())
    for lun in (1, 2):
        assert a.lun_bytes(lun) == bytes(model[lun])
        assert b.lun_bytes(lun) == bytes(model[lun])


def test_secondary_down_pauses_then_resumes(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    _wait_repl(a.cfg.control, "running")

    async def main() -> None:
        e = await edge_on(a, 7)
        e.write(1, 1, 0, b"1" * 4096)
        await e.wait_acked(1, 1)
        b.kill()
        await asyncio.to_thread(_wait_repl, a.cfg.control, "paused")
        e.write(1, 2, 4096, b"2" * 4096)
        with pytest.raises(asyncio.TimeoutError):
            await e.wait_acked(1, 2, timeout=1.0)  # paused: not acknowledged
        await asyncio.to_thread(b.start)
        await e.wait_acked(1, 2, timeout=15)  # resumes by itself
        e.close()

    asyncio.run(main())
    assert a.lun_bytes(1)[:8192] == b"1" * 4096 + b"2" * 4096
    assert b.lun_bytes(1)[:8192] == b"1" * 4096 + b"2" * 4096


def test_a_reconnecting_edge_replaces_its_own_stale_link(pair) -> None:  # type: ignore[no-untyped-def]
    """The same Edge process (same instance id) dialling again while its old connection still
    looks alive here: the new one is taken and the old one closed, not refused ``lun-busy``
    until a dead-peer timer runs out (a race that refused reconnects under load). Another
    process with the same name stays refused (tests/test_alarms.py)."""
    a, _ = pair
    _wait_repl(a.cfg.control, "running")

    async def main() -> None:
        e = await edge_on(a, 9)
        e2 = await edge_on(a, 9)  # e still connected
        assert e.link is not None
        await asyncio.wait_for(e.link.closed.wait(), 5)
        e2.write(1, 1, 0, b"A" * 4096)
        await e2.wait_acked(1, 1)
        e2.close()

    asyncio.run(main())


def test_resend_is_not_applied_twice(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    _wait_repl(a.cfg.control, "running")

    async def main() -> None:
        e = await edge_on(a, 9)
        e.write(1, 1, 0, b"A" * 4096)          # seq 1: A over [0, 4K)
        e.write(1, 2, 0, b"B" * 8192)          # seq 2: B over [0, 8K)
        await e.wait_acked(1, 2)
        e.close()
        # the Edge crashed before it saw the ack and resends both, then a new write
        e2 = await edge_on(a, 9)
        assert e2.welcome is not None and e2.welcome.applied[1] == (9, 2)
        e2.write(1, 1, 0, b"A" * 4096)
        e2.write(1, 2, 0, b"B" * 8192)
        e2.write(1, 3, 8192, b"C" * 512)
        await e2.wait_acked(1, 3)
        e2.close()

    asyncio.run(main())
    want = b"B" * 8192 + b"C" * 512
    assert a.lun_bytes(1)[:len(want)] == want
    assert b.lun_bytes(1)[:len(want)] == want


def test_sequence_gap_is_refused_never_skipped(pair) -> None:  # type: ignore[no-untyped-def]
    """DESIGN invariant 6 / issue 9: a write whose predecessor never arrived is refused (with
    an alarm), not applied and acknowledged over the hole; the resend fills it."""
    a, b = pair
    _wait_repl(a.cfg.control, "running")

    async def main() -> None:
        e = await edge_on(a, 11, "edge-g")
        e.write(1, 1, 0, b"1" * 4096, prev=0)
        await e.wait_acked(1, 1)
        e.write(1, 5, 4 * 4096, b"5" * 4096, prev=3)  # 2 and 3 were lost on the way
        deadline = asyncio.get_running_loop().time() + 10
        while e.refused is None:
            e.event.clear()
            await asyncio.wait_for(e.event.wait(), deadline - asyncio.get_running_loop().time())
        assert e.refused.code == "sequence-gap" and e.refused.info["have"] == 1
        assert e.acked[1] == 1
        st = control.call(a.cfg.control, "status")
        assert any(al["alarm"] == "lun_1_sequence_gap" for al in st["alarms"]), st["alarms"]
        # the Edge reconnects and resends from what was acknowledged: the hole is filled
        e2 = await edge_on(a, 11, "edge-g")
        e2.write(1, 2, 1 * 4096, b"2" * 4096, prev=1)
        e2.write(1, 3, 2 * 4096, b"3" * 4096, prev=2)
        e2.write(1, 5, 4 * 4096, b"5" * 4096, prev=3)
        await e2.wait_acked(1, 5)
        e2.close()
        st = control.call(a.cfg.control, "status")
        assert not any(al["alarm"] == "lun_1_sequence_gap" for al in st["alarms"])

    asyncio.run(main())
    want = b"1" * 4096 + b"2" * 4096 + b"3" * 4096 + bytes(4096) + b"5" * 4096
    assert a.lun_bytes(1)[:len(want)] == want
    assert b.lun_bytes(1)[:len(want)] == want
    assert '"sequence_gap"' in a.log_events() and '"sequence_gap_filled"' in a.log_events()


@pytest.mark.parametrize("to,luns,epoch,code,reason,logged", [
    ("primary", {1: 16 * MiB}, 0, "lun-size-mismatch", ["16777216", "8388608"],
     ['"edge_refused"', "lun-size-mismatch"]),
    # DESIGN invariant 2: a stale primary (older epoch than the Edge saw) is refused by Edges.
    ("primary", {1: 8 * MiB}, 5, "stale-primary", [], []),
    ("secondary", {1: 8 * MiB}, 0, "not-primary", ["secondary"], ["not-primary"]),
])
def test_core_refuses_edges(pair: tuple[CoreProc, CoreProc], to: str, luns: dict[int, int],
                            epoch: int, code: str, reason: list[str], logged: list[str]) -> None:
    a, b = pair
    core = a if to == "primary" else b

    async def main() -> FakeEdge:
        e = FakeEdge("edge-x", 1, luns, epoch=epoch)
        assert not await e.connect(core.cfg.listen)
        return e

    refused = asyncio.run(main()).refused
    assert refused is not None and refused.code == code
    assert all(w in refused.reason for w in reason), refused.reason
    assert all(w in core.log_events() for w in logged)
    asyncio.run(_one_good_write(a.cfg.listen))  # and the primary keeps serving a good Edge


async def _one_good_write(addr: tuple[str, int]) -> None:
    e = FakeEdge("edge-good", 5, {1: 8 * MiB})
    assert await e.connect(addr)
    e.write(1, 1, 0, b"g" * 512)
    await e.wait_acked(1, 1)
    e.close()


def test_replica_smaller_than_primary_is_refused(tmp_path: Path) -> None:
    a, b = make_cores(tmp_path, {1: 8 * MiB}, replica_luns={1: 4 * MiB})
    with running(a, b):
        # Both sides say why, as an alarm an operator sees (not only a log line), and
        # replication does not start.
        wait_for(lambda: pairing_refused(a, b, "replica-size"), 20,
                 "a pairing_refused alarm (replica-size) on both Cores")
        assert status(a.cfg.control)["replication"] != "running"
        assert "replica-size" in b.log_events()


def test_garbage_on_core_port_drops_only_that_connection(pair) -> None:  # type: ignore[no-untyped-def]
    a, _ = pair
    _wait_repl(a.cfg.control, "running")

    async def main() -> None:
        r, w = await asyncio.open_connection(*a.cfg.listen)
        w.write(b"GET / HTTP/1.0\r\n\r\n" * 3)
        await w.drain()
        assert await asyncio.wait_for(r.read(), 5) is not None  # closed by the Core
        w.close()
        await _one_good_write(a.cfg.listen)

    asyncio.run(main())
    assert "wire_protocol_error" in a.log_events()
    assert control.call(a.cfg.control, "status")["replication"] == "running"


def test_core_refuses_nodes_that_cannot_authenticate(tmp_path: Path) -> None:
    """Issue 4: a Core refuses a node that cannot prove the shared key; clear log events."""
    from steelfusion.authconfig import make_key_file
    from steelfusion.config import write_toml
    from steelfusion.nodeauth import NodeKey, read_key_file
    from steelfusion.wire import Hello, Refuse, Welcome

    a, b = make_cores(tmp_path, {1: 8 * MiB})
    key = make_key_file(tmp_path / "node.key")
    for c in (a, b):  # both Cores share the key: their replication links authenticate
        d = c.cfg.to_dict()
        d["auth"] = {"key_file": key, "key_id": "lab"}
        write_toml(c.path, d)
    with running(a, b):
        _wait_repl(a.cfg.control, "running")

        async def attempt(k: NodeKey | None) -> Message | None:
            from steelfusion.link import dial

            got: asyncio.Future[Message] = asyncio.get_running_loop().create_future()

            def on_msg(_: object, m: Message) -> None:
                if not got.done() and isinstance(m, Welcome | Refuse):
                    got.set_result(m)

            def on_close(*_: object) -> None:
                if not got.done():
                    got.set_result(None)  # type: ignore[arg-type]

            lk = await dial(*a.cfg.listen, Hello("edge-x", "edge", "edge", 0, {1: 8 * MiB}, {}),
                            on_msg, on_close, key=k)
            try:
                return await asyncio.wait_for(got, 5)
            finally:
                lk.close()

        none = asyncio.run(attempt(None))
        assert isinstance(none, Refuse) and none.code == "auth_required"
        wrong = asyncio.run(attempt(NodeKey("lab", b"x" * 32)))
        assert wrong is None or isinstance(wrong, Refuse)  # our side saw a bad server proof
        good = asyncio.run(attempt(NodeKey("lab", read_key_file(key))))
        assert isinstance(good, Welcome)
        assert "node_auth_failed" in a.log_events()
        assert read_key_file(key).hex() not in a.log_events()  # secrets never logged


@pytest.mark.timeout(120)
def test_online_verify_alarms_on_a_replica_that_differs(tmp_path: Path) -> None:
    """Issue 9, defence in depth: a periodic online verify (here every second) finds a
    replica that silently differs, raises an alarm, and clears it once repaired."""
    import time

    a, b = make_cores(tmp_path, {1: 8 * MiB}, journal_size=3 << 30, initial_sync=False,
                      verify_interval_s=1.0)
    with running(a, b):
        _wait_repl(a.cfg.control, "running")

        async def write() -> None:
            e = FakeEdge("edge-v", 5, {1: 8 * MiB})
            assert await e.connect(a.cfg.listen)
            for seq in range(1, 9):
                e.write(1, seq, (seq - 1) * 4096, bytes([seq]) * 4096, prev=seq - 1)
            await e.wait_acked(1, 8)
            e.close()

        asyncio.run(write())

        time.sleep(2.5)  # verified identical at least once
        assert "lun_1_replica_mismatch" not in alarms(a.cfg.control)
        # silent corruption on the replica, behind the Cores' backs
        path = next(lu.path for lu in b.cfg.luns if lu.id == 1)
        with open(path, "r+b") as f:
            f.seek(5 * MiB)
            f.write(b"\xee" * 4096)
        wait_for(lambda: "lun_1_replica_mismatch" in alarms(a.cfg.control), 30,
                 "an alarm for a replica that differs", every=0.2)
        assert '"verify_done"' in a.log_events()
        for _ in range(50):  # the background verify may be running right now
            r = control.call(a.cfg.control, "verify", timeout=60, repair=True)
            if "already running" not in str(r.get("error", "")):
                break
            time.sleep(0.2)
        wait_for(lambda: "lun_1_replica_mismatch" not in alarms(a.cfg.control), 30,
                 "the alarm cleared after the repair", every=0.2)
        assert a.lun_bytes(1) == b.lun_bytes(1)


def test_status_counts_replication_connections_per_interface(pair) -> None:  # type: ignore[no-untyped-def]
    """Seed: two TCP replication connections per interface; status says how many each holds."""
    a, _ = pair
    _wait_repl(a.cfg.control, "running")
    def per_iface() -> dict:
        return control.call(a.cfg.control, "status")["connections"]["replication_interfaces"]

    wait_for(lambda: per_iface()["127.0.0.1"]["established"] == 2, what="2 on 127.0.0.1")
    assert per_iface() == {"127.0.0.1": {"established": 2, "expected": 2}}
    out = [c for c in control.call(a.cfg.control, "status")["connections"]["replication"]
           if c["direction"] == "out"]
    assert len(out) == 2 and all(c["local"].startswith("127.0.0.1:") for c in out)


def test_a_thin_lun_out_of_space_is_an_alarm_and_no_ack(tmp_path: Path) -> None:
    """Issue 18: core-a's LUN is a sparse 64 MiB file on a 12 MiB file system. The writes
    that fit are acknowledged; the first that cannot get its blocks raises lun_1_io saying
    the LUN is out of space, and neither it nor any later write is acknowledged."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    small = tmp_path / "core-a"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(small)], check=True)
    try:
        a, b = make_cores(tmp_path, {1: 64 * MiB})
        with running(a, b):
            _wait_repl(a.cfg.control, "running")

            async def main() -> tuple[int, int]:
                e = await edge_on_one(a, 7)
                chunk = os.urandom(MiB)
                for seq in range(1, 41):
                    e.write(1, seq, (seq - 1) * MiB, chunk)
                await asyncio.sleep(0)
                wait = asyncio.get_running_loop().run_in_executor(None, lambda: wait_for(
                    lambda: "out of space" in " ".join(
                        x["message"] for x in status(a.cfg.control)["alarms"]),
                    timeout=30, what="core-a's out-of-space alarm"))
                await wait
                await asyncio.sleep(1.0)
                e.close()
                return e.acked.get(1, 0), 40
            acked, sent = asyncio.run(main())
        print(f"\nacknowledged {acked} of {sent} 1 MiB writes on a 12 MiB file system")
        assert 0 < acked < 12 < sent, acked  # what fit was acknowledged, nothing past it
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


async def edge_on_one(core: CoreProc, stream: int) -> FakeEdge:
    e = FakeEdge("edge-x", stream, {1: 64 * MiB})
    assert await e.connect(core.cfg.listen), e.refused
    return e
