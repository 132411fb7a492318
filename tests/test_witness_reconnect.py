"""The WitnessClient's reconnect loop never stops (issue 9).

After the Witness was SIGKILLed and restarted three times in ~10 s, a primary
Core never reconnected to it: ``WitnessClient._run`` sat in ``await beat``
forever. On Python 3.11, :func:`asyncio.wait_for` swallows a cancellation
that arrives in the same loop iteration as its result (gh-86296): when the
link dropped with a heartbeat request in flight, ``_on_close`` resolved the
request and ``_run`` cancelled the heartbeat task in the same iteration, the
heartbeat task carried on, and ``_run`` awaited it without a timeout.

These tests use real TCP on 127.0.0.1 only: fake Witnesses in this process
that misbehave in one precise way, and a real Witness process killed and
restarted several times quickly. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import witness.client as wc
from steelfusion.lab import free_ports
from steelfusion.link import Link, listen
from steelfusion.wire import Control, Hello, Message, Refuse, Welcome
from tests.conftest import Runner
from tests.nodes import WitnessProc
from witness.client import WitnessClient
from witness.protocol import WireReply, parse_request

PAIR = "pair-1"


async def _until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait until ``cond()``; returns how long it took, fails the test after ``timeout``."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def _stop(c: WitnessClient) -> None:
    """``stop`` must itself return promptly, whatever state the loop is in."""
    await asyncio.wait_for(c.stop(), 5.0)


class _Events:
    """Stands in for the client's structlog logger: records (level, event, fields)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, Any]]] = []

    def _rec(self, level: str) -> Callable[..., None]:
        def log(event: str, **kw: Any) -> None:
            self.seen.append((level, event, kw))
        return log

    def __getattr__(self, level: str) -> Callable[..., None]:
        return self._rec(level)

    def names(self) -> list[str]:
        return [e for _, e, _ in self.seen]


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> _Events:
    ev = _Events()
    monkeypatch.setattr(wc, "_log", ev)
    return ev


# -- a fake Witness that misbehaves in one precise way per connection --------------------------
NORMAL = "normal"  # WELCOME, answer every heartbeat
DROP_ON_HEARTBEAT = "drop-on-heartbeat"  # WELCOME, then reset the connection when a request comes
FREEZE = "freeze"  # WELCOME, then read nothing and send nothing (a SIGSTOPped process)
REFUSE_OPEN = "refuse-open"  # WELCOME, then REFUSE and keep the TCP connection open, silent
MUTE = "mute"  # accept TCP, never answer the HELLO


@dataclass
class FakeWitness:
    """``modes[i]`` is how the i-th connection is treated (the last one repeats)."""

    modes: list[str]
    port: int = 0
    hellos: int = 0
    welcomed: int = 0
    links: list[Link] = field(default_factory=list)
    server: asyncio.AbstractServer | None = None

    async def start(self) -> FakeWitness:
        if not self.port:
            (self.port,) = free_ports(1)
        # a passive server: it never pings, so only what ``modes`` says reaches the client
        self.server = await listen("127.0.0.1", self.port, self._on_message,
                                   lambda _lk, _e: None, name="fake-witness",
                                   ping_interval=3600.0, dead_after=7200.0)
        return self

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for lk in self.links:
            lk.abort("fake witness closing")

    def _on_message(self, link: Link, msg: Message) -> None:
        if isinstance(msg, Hello):
            mode = self.modes[min(self.hellos, len(self.modes) - 1)]
            self.hellos += 1
            link.ctx = mode
            self.links.append(link)
            if mode == MUTE:
                assert link.transport is not None
                link.transport.pause_reading()
                return
            self.welcomed += 1
            link.send(Welcome("fake-witness", "witness", 1, {}, {"lease_seconds": 1.0,
                                                                 "pair": PAIR}))
            return
        if not isinstance(msg, Control):
            return
        mode = link.ctx
        if mode == DROP_ON_HEARTBEAT:
            link.abort("reset with the request unanswered")
        elif mode == FREEZE:
            assert link.transport is not None
            link.transport.pause_reading()  # no more PONGs either: the client's link goes dead
        elif mode == REFUSE_OPEN:
            assert link.transport is not None
            link.send(Refuse("fake", "refused, and the connection stays open"))
            link.flush()
            link.transport.pause_reading()
        else:
            req = parse_request(msg.body)
            link.send(Control(WireReply(req.req, True, "alive", 1, holds=False).body()))


def _client(addr: tuple[str, int], **kw: Any) -> WitnessClient:
    args: dict[str, Any] = {"timeout": 1.0, "reconnect_seconds": 0.05, "ping_interval": 0.1,
                            "dead_after": 0.5, "heartbeat_seconds": 0.1}
    args.update(kw)
    return WitnessClient(addr, "core-a", "primary", PAIR, lambda: 1, **args)


@contextlib.asynccontextmanager
async def _dialling(modes: list[str],
                    **kw: Any) -> AsyncIterator[tuple[FakeWitness, WitnessClient]]:
    """A FakeWitness that treats its connections as ``modes`` says, and a started client
    (``_client(**kw)``) dialling it; the client stopped and the Witness closed after."""
    fake = await FakeWitness(modes).start()
    c = _client(fake.addr, **kw)
    try:
        await c.start()
        yield fake, c
    finally:
        await _stop(c)
        fake.close()


# -- the root cause: the link drops while a heartbeat request is in flight ---------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", [DROP_ON_HEARTBEAT, FREEZE])
def test_reconnects_after_the_link_drops_with_a_heartbeat_in_flight(aio_run: Runner,
                                                                    mode: str) -> None:
    """Three drops in a row, each with a heartbeat unanswered: a new WELCOME after each.

    Old code: the first drop left ``_run`` awaiting the heartbeat task forever
    (its cancellation was swallowed by ``asyncio.wait_for``): one WELCOME only.
    """

    async def main() -> None:
        async with _dialling([mode, mode, mode, NORMAL]) as (fake, c):
            assert fake.welcomed >= 1
            await _until(lambda: fake.welcomed >= 4 and c.connected, 10.0,
                         f"reconnect after three '{mode}' drops (welcomes: {fake.welcomed})")
            assert c.alive
            d = await c.heartbeat()
            assert d.granted and c.lease_valid()

    aio_run(main())


@pytest.mark.timeout(60)
def test_refusal_on_an_open_connection_is_abandoned(aio_run: Runner) -> None:
    """A REFUSE on an established link that the peer never closes.

    The link's dead-peer timer stops once its state machine is CLOSED (a
    REFUSE does that), so the old loop waited on ``lk.closed`` forever.
    """

    async def main() -> None:
        async with _dialling([REFUSE_OPEN, NORMAL]) as (fake, c):
            await _until(lambda: fake.welcomed >= 2 and c.connected, 10.0,
                         f"reconnect after a REFUSE on an open link (welcomes: {fake.welcomed})")
            assert c.last_refusal is None  # cleared by the new WELCOME

    aio_run(main())


@pytest.mark.timeout(60)
def test_witness_that_accepts_and_never_answers(aio_run: Runner) -> None:
    """Mid-handshake silence (TCP accepted, HELLO never answered), then a good Witness."""

    async def main() -> None:
        async with _dialling([MUTE, MUTE, NORMAL], timeout=0.4) as (fake, c):
            assert not c.connected
            assert c.alive
            await _until(lambda: fake.hellos >= 3 and c.connected, 10.0,
                         f"connect after two mute Witnesses (hellos: {fake.hellos})")

    aio_run(main())


# -- unexpected exceptions inside the loop ------------------------------------------------------
@pytest.mark.timeout(60)
def test_unexpected_exceptions_do_not_end_the_loop(aio_run: Runner, events: _Events,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A RuntimeError and a stray CancelledError from ``dial``, and a failing ``epoch_fn``.

    Old code: the first one escaped ``_run``, which ended silently for good.
    """
    real_dial = wc.dial
    calls = 0

    async def flaky_dial(*a: Any, **kw: Any) -> Link:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected: dial blew up")
        if calls == 2:
            raise asyncio.CancelledError()  # leaked from some inner future; nobody cancelled us
        return await real_dial(*a, **kw)

    monkeypatch.setattr(wc, "dial", flaky_dial)
    epoch_calls = 0

    def epoch() -> int:
        nonlocal epoch_calls
        epoch_calls += 1
        if epoch_calls == 3:
            raise ValueError("injected: epoch_fn failed")
        return 1

    async def main() -> None:
        fake = await FakeWitness([NORMAL]).start()
        c = WitnessClient(fake.addr, "core-a", "primary", PAIR, epoch, timeout=1.0,
                          reconnect_seconds=0.05)
        try:
            await c.start()
            await _until(lambda: c.connected, 10.0, "connect after injected exceptions")
            assert c.alive
            assert c.errors == 3
            assert c.last_attempt is not None
            errors = [kw for lvl, e, kw in events.seen if e == "witness_client_error"]
            assert len(errors) == 3, events.seen
            assert "dial blew up" in errors[0]["error"]
            assert "CancelledError" in errors[1]["error"]
            assert "epoch_fn failed" in errors[2]["error"]
            assert "witness_client_connected" in events.names()
        finally:
            await _stop(c)
            fake.close()
        assert not c.alive  # stopped on purpose

    aio_run(main())


@pytest.mark.timeout(30)
def test_stop_then_start_again() -> None:
    """``stop`` ends the loop for good (a real cancellation is obeyed); ``start`` restarts it."""

    async def main() -> None:
        async with _dialling([NORMAL]) as (_, c):
            assert c.connected and c.alive
            await _stop(c)
            assert not c.connected and not c.alive
            assert (await c.heartbeat()).reason == wc.CLIENT_STOPPED
            await c.start()
            assert c.connected and c.alive

    asyncio.run(main())


# -- a real Witness process, SIGKILLed and restarted several times quickly ---------------------
@pytest.fixture
def witness_process(tmp_path: Path) -> Iterator[WitnessProc]:
    w = WitnessProc.configure(tmp_path, lease=1.5)
    w.start()
    try:
        yield w
    finally:
        w.kill()


@pytest.mark.lab
@pytest.mark.timeout(120)
def test_real_witness_killed_and_restarted_three_times(aio_run: Runner,
                                                       witness_process: WitnessProc) -> None:
    """SIGKILL + restart three times within seconds; the client is back each time.

    Round 2 freezes the Witness first (SIGSTOP) until the client gave up on
    the link and dialled again, so the kill lands while the client is
    mid-handshake (TCP accepted by the kernel, HELLO unanswered) and with a
    heartbeat unanswered on the old link. Round 3 kills a Witness that has
    only just started, then starts it again.
    """
    w = witness_process
    reconnect_within = 5.0

    async def main() -> None:
        loop = asyncio.get_running_loop()
        c = WitnessClient(w.cfg.listen, "core-a", "primary", PAIR, lambda: 1, timeout=1.0,
                          ping_interval=0.2, dead_after=1.0)
        taken: list[float] = []
        try:
            await c.start()
            assert c.connected

            # 1: plain SIGKILL and restart
            await loop.run_in_executor(None, w.kill)
            await loop.run_in_executor(None, w.start)
            taken.append(await _until(lambda: c.connected, reconnect_within, "round 1"))

            # 2: frozen, the client redials into the frozen process, then SIGKILL
            await asyncio.sleep(0.3)  # heartbeats flowing again
            w.send_signal(signal.SIGSTOP)
            await _until(lambda: not c.connected, 5.0, "the client sees the frozen Witness")
            await asyncio.sleep(0.5)  # it dialled again: HELLO sent into the frozen process
            await loop.run_in_executor(None, w.kill)
            await loop.run_in_executor(None, w.start)
            taken.append(await _until(lambda: c.connected, reconnect_within, "round 2"))

            # 3: killed just after it started listening, then started again
            await loop.run_in_executor(None, w.kill)
            await loop.run_in_executor(None, lambda: w.start(wait=False))
            await _until(w.listening, 20.0, "the Witness listens")
            await loop.run_in_executor(None, w.kill)
            await loop.run_in_executor(None, w.start)
            taken.append(await _until(lambda: c.connected, reconnect_within, "round 3"))

            assert c.alive
            d = await c.heartbeat()
            assert d.granted and c.lease_valid()
        finally:
            await _stop(c)
        assert len(taken) == 3

    aio_run(main())
