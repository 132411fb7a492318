"""What a Core uses to talk to its Witness.

Seed 002: "When FusionSync is suspended ... you must define one of the Edges
as a Witness ... When the request is approved, the Core can start logging the
writes to the Journal LUN", and failover "is only possible if the primary
Core is not reachable by the secondary Core and the Witness".

:class:`WitnessClient` keeps one connection to the Witness (redialling when it
drops), heartbeats it so the Witness keeps this Core's lease live, and asks
for decisions. Every call has a timeout, and no answer is never a grant:
a request that times out, or finds no connection, returns a refused
:class:`~witness.logic.Decision` (``witness-unreachable``, ``witness-timeout``,
``witness-disconnected``). The schema is in :mod:`witness.protocol`.

Lease fencing: :meth:`WitnessClient.lease_valid` is true until
``lease_seconds`` after the *sending* time of the last request the Witness
answered. The Witness counts this Core's lease from when it *received* that
request, which is later, so when ``lease_valid`` turns false the Witness may
already let the peer fail over. A Core that holds the suspension approval
should stop acknowledging Edge writes once its lease is no longer valid.

The reconnect loop cannot stop (issue 9: a Core never reconnected after its
Witness was killed and restarted three times): every attempt is wrapped, so
an unexpected exception is logged (``witness_client_error``) and the loop
dials again after a back-off; every wait is bounded; a link given up on is
aborted, not closed (a graceful close waits for a peer that may never read).
:attr:`WitnessClient.alive` says whether the loop is running and moving, so a
Core can raise an alarm when it is not.

No :func:`asyncio.wait_for` here: on Python 3.11 it swallows a cancellation
that arrives in the same loop iteration as its result (gh-86296, fixed in
3.12). That is what stopped the loop: the link dropped with a heartbeat in
flight, ``_on_close`` resolved the request while ``_run`` cancelled the
heartbeat task, the cancellation was lost, the heartbeat task went on
waiting for a WELCOME only ``_run`` could bring, and ``_run`` waited for it.
:func:`_wait_events` and :func:`_wait_future` use :func:`asyncio.wait`, which
never hides a cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from steelfusion import log
from steelfusion.link import Link, dial
from steelfusion.nodeauth import NodeKey
from steelfusion.units import format_addr
from steelfusion.wire import Control, Hello, Message, Refuse, Welcome
from witness.logic import Decision
from witness.protocol import ProtocolError, WireReply, WireRequest, parse_reply

_log = log.get("witness-client")

UNREACHABLE = "witness-unreachable"
TIMEOUT = "witness-timeout"
DISCONNECTED = "witness-disconnected"
CLIENT_STOPPED = "client-stopped"

__all__ = ["Decision", "WitnessClient"]

ERROR_BACKOFF = 5  # after a refusal or an unexpected error, wait this many reconnect periods


async def _wait_events(timeout: float, *events: asyncio.Event) -> bool:
    """Wait at most ``timeout`` seconds for one of ``events``; True if one is set.

    Unlike ``asyncio.wait_for``, a cancellation of the caller always reaches it.
    """
    if any(e.is_set() for e in events):
        return True
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=max(0.0, timeout),
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    return any(e.is_set() for e in events)


async def _wait_future(fut: asyncio.Future[WireReply | None], timeout: float) -> bool:
    """Wait at most ``timeout`` seconds for ``fut``; True if it is done."""
    if not fut.done():
        await asyncio.wait((fut,), timeout=max(0.0, timeout))
    return fut.done()


class WitnessClient:
    """One Core's connection to the Witness, for one replication pair."""

    def __init__(self, addr: tuple[str, int], node: str, role: str, pair: str,
                 epoch_fn: Callable[[], int], *, timeout: float = 2.0,
                 heartbeat_seconds: float | None = None, reconnect_seconds: float = 0.2,
                 ping_interval: float = 0.5, dead_after: float = 3.0,
                 key: NodeKey | None = None) -> None:
        self.addr = addr
        self.key = key  # shared node key (steelfusion/nodeauth.py), if the Witness wants one
        self.node = node
        self.role = role
        self.pair = pair
        self.epoch_fn = epoch_fn
        self.timeout = timeout
        self.heartbeat_seconds = heartbeat_seconds
        self.reconnect_seconds = reconnect_seconds
        self.ping_interval = ping_interval
        self.dead_after = dead_after
        self.lease_seconds: float | None = None  # told by the Witness in WELCOME
        self.pair_epoch = 0  # highest epoch of the pair the Witness told us
        self.holds: bool | None = None  # do we hold the approval, as last told
        self.holder: str | None = None
        self.last_refusal: Refuse | None = None
        self._lease_from: float | None = None  # send time of the last answered request
        self._link: Link | None = None
        self._welcomed = False
        self._up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[WireReply | None]] = {}
        self._next_req = 0
        self._stopped = False
        self._refused = asyncio.Event()  # the current link got a REFUSE
        # liveness of the reconnect loop (loop clock), for its owner to watch: ``alive``
        self.attempts = 0  # dials started
        self.errors = 0  # unexpected exceptions the loop survived
        self.last_error: str | None = None
        self.last_attempt: float | None = None  # when the last dial started
        self.last_progress: float | None = None  # when the loop last moved on

    # -- life cycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Start dialling; waits up to ``timeout`` for the first WELCOME (never raises)."""
        self._stopped = False
        if self._task is None or self._task.done():
            self._spawn_loop()
        await _wait_events(self.timeout, self._up)

    def _spawn_loop(self) -> None:
        self.last_progress = asyncio.get_running_loop().time()
        self._task = asyncio.create_task(self._run(), name=f"witness-client-{self.node}")
        self._task.add_done_callback(self._on_loop_done)

    def _on_loop_done(self, task: asyncio.Task[None]) -> None:
        """The loop ends only when stopped; if it ever ends otherwise, say so and restart it."""
        if task is not self._task or self._stopped:
            return
        exc = None if task.cancelled() else task.exception()
        _log.error("witness_client_loop_ended", node=self.node, witness=format_addr(self.addr),
                   cancelled=task.cancelled(), error=repr(exc) if exc else None)
        if exc is not None and isinstance(exc, Exception):
            with contextlib.suppress(RuntimeError):  # no running loop: shutting down
                self._spawn_loop()

    async def stop(self) -> None:
        """Close the connection; the Witness lets this Core's lease run out."""
        self._stopped = True
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait((task,), timeout=max(1.0, self.timeout))
            if not task.done():  # it ends when it wakes: it is no longer the client's loop
                _log.error("witness_client_stop_timeout", node=self.node)
        self._task = None
        if task is not None and task.done() and not task.cancelled():
            task.exception()  # retrieved: it was logged by _on_loop_done if it mattered
        lk = self._link
        if lk is not None:
            lk.close("witness client stopping")
            if not await _wait_events(1.0, lk.closed):
                lk.abort("witness client stopping")
        self._fail_pending()
        self._link = None
        self._welcomed = False
        self._up.clear()

    @property
    def stall_seconds(self) -> float:
        """Longest the loop goes without moving on while it works: dial, WELCOME, back-off."""
        return 2 * self.timeout + ERROR_BACKOFF * self.reconnect_seconds + 2.0

    def alive_at(self, now: float) -> bool:
        t = self._task
        if self._stopped or t is None or t.done():
            return False
        return self.last_progress is None or now - self.last_progress <= self.stall_seconds

    @property
    def alive(self) -> bool:
        """The reconnect loop runs and moved on recently (false once stopped).

        A Core can raise an alarm when it is false; when it is true the client
        is connected or will have dialled again within :attr:`stall_seconds`.
        """
        return self.alive_at(asyncio.get_running_loop().time())

    @property
    def connected(self) -> bool:
        lk = self._link
        return lk is not None and self._welcomed and lk.established

    def lease_valid(self, now: float | None = None) -> bool:
        """True while the Witness certainly still counts this Core as reachable."""
        if self._lease_from is None or self.lease_seconds is None:
            return False
        t = asyncio.get_running_loop().time() if now is None else now
        return t < self._lease_from + self.lease_seconds

    # -- requests ----------------------------------------------------------------------
    async def request_suspend(self) -> Decision:
        """Ask to suspend replication (seed 002: approved for one Core of a pair at most)."""
        return await self._decision("suspend", epoch=self.epoch_fn())

    async def release(self) -> Decision:
        """Give the approval back (resync done)."""
        return await self._decision("release", epoch=self.epoch_fn())

    async def request_failover(self, peer: str) -> Decision:
        """Ask to become primary; granted only if the Witness cannot reach ``peer``.

        A granted decision carries the new epoch the Core must adopt; it holds
        the suspension approval (a new primary starts suspended, DESIGN.md).
        """
        return await self._decision("failover", epoch=self.epoch_fn(), peer=peer)

    async def terminate(self) -> Decision:
        return await self._decision("terminate", epoch=self.epoch_fn())

    async def heartbeat(self) -> Decision:
        return await self._decision("heartbeat")

    async def can_reach(self, node: str) -> bool:
        """Whether the Witness holds a live lease for ``node``.

        False when the Witness does not answer (unknown). This is advice only:
        the Witness itself checks reachability when it decides a failover.
        """
        r = await self._request("reach", peer=node)
        return isinstance(r, WireReply) and r.reachable is True

    async def _decision(self, op: str, epoch: int | None = None,
                        peer: str | None = None) -> Decision:
        r = await self._request(op, epoch=epoch, peer=peer)
        if isinstance(r, str):
            return Decision(False, r, self.pair_epoch, self.holder)
        return Decision(r.granted, r.reason, r.epoch, r.holder, r.detail, r.retry_in)

    async def _request(self, op: str, epoch: int | None = None,
                       peer: str | None = None) -> WireReply | str:
        """The reply, or a reason string (never a grant) when there is none."""
        if self._stopped:
            return CLIENT_STOPPED
        if not self.connected:
            await _wait_events(self.timeout, self._up)
        lk = self._link
        if lk is None or not self.connected:
            return UNREACHABLE
        loop = asyncio.get_running_loop()
        self._next_req += 1
        rid = self._next_req
        fut: asyncio.Future[WireReply | None] = loop.create_future()
        self._pending[rid] = fut
        sent = loop.time()
        try:
            lk.send(Control(WireRequest(op, rid, self.pair, epoch, peer).body()))
            answered = await _wait_future(fut, self.timeout)
        finally:
            self._pending.pop(rid, None)
        if not answered:
            _log.warning("witness_request_timeout", node=self.node, op=op, req=rid)
            return TIMEOUT
        reply = fut.result()
        if reply is None:
            return DISCONNECTED
        self._learn(reply, sent)
        return reply

    def _learn(self, reply: WireReply, sent: float) -> None:
        # Any answer means the Witness received the request, and renewed our lease.
        self._lease_from = sent if self._lease_from is None else max(self._lease_from, sent)
        self.pair_epoch = max(self.pair_epoch, reply.epoch)
        self.holder = reply.holder
        self.holds = reply.holds

    def _fail_pending(self) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_result(None)
        self._pending.clear()

    # -- connection ----------------------------------------------------------------------
    def _on_message(self, link: Link, msg: Message) -> None:
        if link is not self._link:
            return
        if isinstance(msg, Welcome):
            info = msg.info
            ls = info.get("lease_seconds")
            if isinstance(ls, int | float) and ls > 0:
                self.lease_seconds = float(ls)
            self.pair_epoch = max(self.pair_epoch, msg.epoch)
            holder = info.get("holder")
            self.holder = holder if isinstance(holder, str) else None
            self.holds = info.get("holds") is True
            self._welcomed = True
            self.last_refusal = None
            self._up.set()
            _log.info("witness_client_connected", node=self.node, witness=msg.node,
                      pair=self.pair, pair_epoch=msg.epoch, holder=self.holder)
        elif isinstance(msg, Refuse):
            self.last_refusal = msg
            self._refused.set()
            _log.warning("witness_client_refused", node=self.node, code=msg.code,
                         reason=msg.reason)
        elif isinstance(msg, Control):
            try:
                reply = parse_reply(msg.body)
            except ProtocolError as e:
                _log.warning("witness_client_bad_reply", node=self.node, error=str(e))
                return
            fut = self._pending.get(reply.req)
            if fut is not None and not fut.done():
                fut.set_result(reply)

    def _on_close(self, link: Link, exc: BaseException | None) -> None:
        if link is self._link:
            self._welcomed = False
            self._up.clear()
            self._fail_pending()

    async def _run(self) -> None:
        """Dial, wait for WELCOME, heartbeat until the link ends; again, until stopped.

        Nothing but :meth:`stop` ends this loop: an unexpected exception (a
        stray ``CancelledError`` included) is logged and followed by a back-off.
        """
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        while not self._stopped and self._task is me:
            self.attempts += 1
            self.last_attempt = self.last_progress = loop.time()
            backoff = self.reconnect_seconds
            try:
                backoff = await self._attempt()
            except asyncio.CancelledError as e:
                if self._stopped or (me is not None and me.cancelling()):
                    raise  # stop(): a real cancellation
                backoff = self._loop_error(e)  # leaked from an inner future: nobody asked us to
            except Exception as e:
                backoff = self._loop_error(e)
            finally:
                if not self._stopped or self._task is not me:  # else stop() closes the link
                    self._abandon("the Witness client dials again")
            if self._stopped or self._task is not me:
                break
            self.last_progress = loop.time()
            await asyncio.sleep(backoff)

    def _loop_error(self, e: BaseException) -> float:
        self.errors += 1
        self.last_error = f"{type(e).__name__}: {e}"
        _log.error("witness_client_error", node=self.node, witness=format_addr(self.addr),
                   error=self.last_error, errors=self.errors, exc_info=e)
        return ERROR_BACKOFF * self.reconnect_seconds

    def _abandon(self, reason: str) -> None:
        """Forget the current link and abort it (close() would wait for a peer that may not read)."""
        lk, self._link = self._link, None
        self._welcomed = False
        self._up.clear()
        self._refused.clear()
        self._fail_pending()
        if lk is not None and not lk.closed.is_set():
            lk.abort(reason)

    async def _attempt(self) -> float:
        """One connection, from dial to its end; returns the back-off before the next."""
        loop = asyncio.get_running_loop()
        hello = Hello(self.node, self.role, "witness", self.epoch_fn(), {}, {"pair": self.pair})
        sent = loop.time()
        try:
            lk = await dial(*self.addr, hello, self._on_message, self._on_close,
                            name="witness-client", timeout=self.timeout,
                            ping_interval=self.ping_interval, dead_after=self.dead_after,
                            key=self.key)
        except (TimeoutError, OSError) as e:
            self.last_error = f"{type(e).__name__}: {e}"
            return self.reconnect_seconds
        self._abandon("replaced by a new connection")  # nothing left of an older link
        self._link = lk
        await _wait_events(self.timeout, self._up, self._refused, lk.closed)
        self.last_progress = loop.time()
        if self._refused.is_set():
            return ERROR_BACKOFF * self.reconnect_seconds
        if not (self._welcomed and self._link is lk and lk.established):
            if not lk.closed.is_set():
                _log.warning("witness_client_no_welcome", node=self.node,
                             witness=format_addr(self.addr), waited=self.timeout)
            return self.reconnect_seconds
        self._lease_from = sent if self._lease_from is None else max(self._lease_from, sent)
        beat = asyncio.create_task(self._heartbeats(lk), name=f"witness-heartbeat-{self.node}")
        try:
            await self._watch(lk, beat)
        finally:
            beat.cancel()
            # bounded: the heartbeat task also ends by itself once ``lk`` is not the link
            await asyncio.wait((beat,), timeout=1.0)
            if beat.done() and not beat.cancelled() and beat.exception() is not None:
                _log.error("witness_client_heartbeat_failed", node=self.node,
                           error=repr(beat.exception()))
        return ERROR_BACKOFF * self.reconnect_seconds if self._refused.is_set() \
            else self.reconnect_seconds

    async def _watch(self, lk: Link, beat: asyncio.Task[None]) -> None:
        """Wait for ``lk`` to end, looking at it every slice; give it up when it is no good.

        The link's own dead-peer timer stops once its state machine is CLOSED
        (a REFUSE does that) while the peer may keep the TCP connection open,
        so this does not rely on it.
        """
        loop = asyncio.get_running_loop()
        period = max(0.05, min(1.0, self.dead_after / 3))
        silent = self.dead_after + max(1.0, self.ping_interval)
        while not self._stopped:
            if await _wait_events(period, lk.closed):
                return
            now = self.last_progress = loop.time()
            if self._link is not lk:
                why = "the link was replaced"
            elif not lk.established:
                why = f"link {lk.machine.state.value}" + (
                    f" (refused: {self.last_refusal.code})" if self._refused.is_set()
                    and self.last_refusal is not None else "")
            elif now - lk.machine.last_rx > silent:
                why = f"no frame from the Witness for {now - lk.machine.last_rx:.1f}s"
            elif beat.done():
                why = "the heartbeat task ended"
            else:
                continue
            _log.warning("witness_client_link_abandoned", node=self.node,
                         witness=format_addr(self.addr), reason=why)
            return

    async def _heartbeats(self, lk: Link) -> None:
        """Explicit heartbeat requests at a third of the lease: renew, learn revocation.

        Ends by itself once ``lk`` is no longer the client's link.
        """
        while not self._stopped and self._link is lk and not lk.closed.is_set():
            period = self.heartbeat_seconds or max(0.05, (self.lease_seconds or 3.0) / 3)
            await asyncio.sleep(period)
            if self._stopped or self._link is not lk or not self.connected:
                return
            try:
                await self._request("heartbeat")  # a revoked holder learns ``holds`` is False
            except Exception as e:
                _log.error("witness_client_heartbeat_error", node=self.node, error=repr(e),
                           exc_info=e)
                await asyncio.sleep(period)
