"""A real Witness process and real WitnessClients (witness/node.py, witness/client.py).

Seed 002: the Witness "makes sure that both primary and secondary Cores do not
get approval for suspension at the same time", and failover "is only possible
if the primary Core is not reachable by the secondary Core and the Witness".
DESIGN.md: the Witness "keeps that decision across its own restarts".
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from steelfusion.lab import LabError, free_ports
from steelfusion.link import Link, dial, listen
from steelfusion.wire import Control, Hello, Message, Refuse, Welcome
from tests.nodes import WitnessProc
from witness.client import WitnessClient
from witness.logic import (
    ALREADY_HELD,
    FAILED_OVER,
    GRANTED,
    PEER_HOLDS,
    PEER_REACHABLE,
    PEER_UNKNOWN,
    RELEASED,
    STALE_EPOCH,
    DurableState,
)
from witness.node import STATE_FILE, Witness

PAIR = "pair-1"
LEASE = 1.0

pytestmark = pytest.mark.lab


def _state(w: WitnessProc) -> DurableState:
    """What the Witness keeps on disk."""
    return DurableState.from_json((Path(w.cfg.state_dir) / STATE_FILE).read_bytes())


@pytest.fixture
def witness_proc(tmp_path: Path) -> Iterator[WitnessProc]:
    w = WitnessProc.configure(tmp_path, LEASE)
    w.start()
    try:
        yield w
    finally:
        w.kill()


async def _until_connected(*clients: WitnessClient, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(c.connected for c in clients):
        assert time.monotonic() < deadline, "clients did not reconnect to the Witness"
        await asyncio.sleep(0.05)


def test_one_approval_across_kill_restart_and_failover(witness_proc: WitnessProc) -> None:
    w = witness_proc
    epochs = {"core-a": 1, "core-b": 1}

    def client(name: str, role: str) -> WitnessClient:
        return WitnessClient(w.cfg.listen, name, role, PAIR, lambda: epochs[name], timeout=2.0)

    async def main() -> None:
        a, b = client("core-a", "primary"), client("core-b", "secondary")
        await a.start()
        await b.start()
        try:
            assert a.connected and b.connected
            assert a.lease_seconds == LEASE

            # A granted, B refused: never both (seed 002).
            d = await a.request_suspend()
            assert (d.granted, d.reason, d.epoch) == (True, GRANTED, 1), d
            d = await b.request_suspend()
            assert (d.granted, d.reason, d.holder) == (False, PEER_HOLDS, "core-a"), d
            assert _state(w).pairs[PAIR].holder == "core-a"  # on disk before the answer
            st = w.status()
            assert st["holders"] == {PAIR: "core-a"} and st["epochs"] == {PAIR: 1}

            # SIGKILL the Witness and start it again: the approval survived.
            await asyncio.to_thread(w.kill)
            d = await b.request_suspend()  # nobody to ask: refused, never granted
            assert not d.granted
            await asyncio.to_thread(w.start)
            await _until_connected(a, b)
            d = await b.request_suspend()
            assert (d.granted, d.reason) == (False, PEER_HOLDS), d
            d = await a.request_suspend()
            assert (d.granted, d.reason) == (True, ALREADY_HELD), d

            # Failover refused while A heartbeats (during and after the restart grace).
            d = await b.request_failover("core-a")
            assert not d.granted and d.reason in (PEER_REACHABLE, PEER_UNKNOWN), d
            await asyncio.sleep(LEASE * 1.3)
            d = await b.request_failover("core-a")
            assert (d.granted, d.reason) == (False, PEER_REACHABLE), d
            assert await b.can_reach("core-a")
            assert a.lease_valid()

            # A stops; once its lease is over, B may fail over and gets epoch + 1.
            await a.stop()
            t_stop = time.monotonic()
            d = await b.request_failover("core-a")
            assert (d.granted, d.reason) == (False, PEER_REACHABLE), d
            while True:
                await asyncio.sleep(0.1)
                d = await b.request_failover("core-a")
                if d.granted or time.monotonic() - t_stop > 5:
                    break
            assert (d.granted, d.reason, d.epoch, d.holder) == (True, FAILED_OVER, 2,
                                                               "core-b"), d
            # Lease fencing: by the time the peer may fail over, A's own view of its
            # lease has run out too (it counts from when it *sent* its last request).
            assert not a.lease_valid()
            assert time.monotonic() - t_stop >= LEASE / 2
            epochs["core-b"] = d.epoch
            assert not await b.can_reach("core-a")
            st = w.status()
            assert st["holders"] == {PAIR: "core-b"} and st["epochs"] == {PAIR: 2}

            # The old primary comes back with its old epoch: refused as stale,
            # and it learns the newer epoch (DESIGN.md invariant 2).
            a2 = client("core-a", "primary")
            await a2.start()
            try:
                assert a2.pair_epoch == 2 and a2.holds is False
                d = await a2.request_suspend()
                assert (d.granted, d.reason, d.epoch) == (False, STALE_EPOCH, 2), d
            finally:
                await a2.stop()

            # The new primary releases after resync.
            d = await b.release()
            assert (d.granted, d.reason, d.holder) == (True, RELEASED, None), d
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())
    events = [json.loads(line)["event"] for line in
              Path(w.cfg.log_file or "").read_text().splitlines() if line.startswith("{")]
    for ev in ("witness_suspend_granted", "witness_suspend_refused", "witness_failover_refused",
               "witness_failover_granted", "witness_release_granted", "witness_started"):
        assert ev in events, ev
    decisions = w.status()["decisions"]
    assert isinstance(decisions, list) and decisions[-1]["op"] == "release"


def test_corrupt_state_file_stops_the_witness_from_starting(tmp_path: Path) -> None:
    proc = WitnessProc.configure(tmp_path, LEASE)
    state = Path(proc.cfg.state_dir)
    state.mkdir()
    (state / STATE_FILE).write_text('{"magic": "steelfusion-witness-state"}')
    try:
        with pytest.raises(LabError, match="exited during start-up") as info:
            proc.start()
        assert "cannot start" in str(info.value) and "format" in str(info.value)
    finally:
        proc.kill()


def test_embedded_witness_and_hello_checks(tmp_path: Path) -> None:
    """The Edge embeds a Witness: Witness(name, addr, state_dir), start, status, stop."""

    async def hello(addr: tuple[str, int], h: Hello) -> Message:
        got: asyncio.Queue[Message] = asyncio.Queue()
        lk = await dial(*addr, h, lambda _l, m: got.put_nowait(m), lambda _l, _e: None)
        try:
            return await asyncio.wait_for(got.get(), 3)
        finally:
            lk.close()

    async def main() -> None:
        (port,) = free_ports(1)
        addr = ("127.0.0.1", port)
        w = Witness("edge-1-witness", addr, str(tmp_path / "witness"), lease_seconds=LEASE)
        await w.start()
        try:
            m = await hello(addr, Hello("core-a", "primary", "edge", 0, {}, {}))
            assert isinstance(m, Refuse) and m.code == "bad-purpose"
            m = await hello(addr, Hello("core-a", "primary", "witness", 3, {}, {"pair": PAIR}))
            assert isinstance(m, Welcome) and m.epoch == 3 and m.info["lease_seconds"] == LEASE
            m = await hello(addr, Hello("core-b", "secondary", "witness", 3, {}, {"pair": PAIR}))
            assert isinstance(m, Welcome)
            m = await hello(addr, Hello("core-c", "secondary", "witness", 3, {}, {"pair": PAIR}))
            assert isinstance(m, Refuse) and m.code == "pair-full"
            # A Core that does not name its pair (as core/node.py dials today) is
            # still heartbeated; it just cannot ask for decisions without a pair.
            m = await hello(addr, Hello("core-x", "primary", "witness", 0, {}, {}))
            assert isinstance(m, Welcome)
            st = w.status()
            assert st["pairs"][PAIR]["members"].keys() == {"core-a", "core-b"}
            assert st["leases"]["core-x"]["reachable"] is True
            assert w.reachable("core-a")
            # Malformed requests get an answer, not a dropped connection.
            c = WitnessClient(addr, "core-a", "primary", PAIR, lambda: 3)
            await c.start()
            try:
                lk = c._link
                assert lk is not None
                replies: list[dict[str, object]] = []
                orig = lk.on_message

                def spy(link: Link, msg: Message) -> None:
                    if isinstance(msg, Control):
                        replies.append(msg.body)
                    orig(link, msg)

                lk.on_message = spy
                lk.send(Control({"op": "explode", "req": 99}))
                lk.send(Control({"op": "suspend", "req": 100}))
                await asyncio.sleep(0.2)
                got = {r["req"]: r["reason"] for r in replies if r.get("req") in (99, 100)}
                assert got == {99: "unknown-op", 100: "bad-request"}
                assert (await c.request_suspend()).granted
            finally:
                await c.stop()
        finally:
            await w.stop()

    asyncio.run(main())


def test_client_never_grants_without_an_answer() -> None:
    """No Witness, or a Witness that never answers: refused, never granted."""

    async def main() -> None:
        (dead_port, mute_port) = free_ports(2)
        c = WitnessClient(("127.0.0.1", dead_port), "core-a", "primary", PAIR, lambda: 1,
                          timeout=0.3)
        await c.start()
        try:
            assert not c.connected
            d = await c.request_suspend()
            assert (d.granted, d.reason) == (False, "witness-unreachable")
            assert not await c.can_reach("core-b")
            assert not c.lease_valid()
        finally:
            await c.stop()

        def on_message(link: Link, msg: Message) -> None:  # welcomes, then says nothing
            if isinstance(msg, Hello):
                link.send(Welcome("mute", "witness", 0, {}, {"lease_seconds": 1.0}))

        server = await listen("127.0.0.1", mute_port, on_message, lambda _l, _e: None)
        c = WitnessClient(("127.0.0.1", mute_port), "core-a", "primary", PAIR, lambda: 1,
                          timeout=0.3)
        await c.start()
        try:
            assert c.connected
            d = await c.request_failover("core-b")
            assert (d.granted, d.reason) == (False, "witness-timeout")
        finally:
            await c.stop()
            server.close()

    asyncio.run(main())
