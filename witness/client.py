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
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from steelfusion import log
from steelfusion.link import Link, dial
from steelfusion.nodeauth import NodeKey
from steelfusion.wire import Control, Hello, Message, Refuse, Welcome
from witness.logic import Decision
from witness.protocol import ProtocolError, WireReply, WireRequest, parse_reply

_log = log.get("witness-client")

UNREACHABLE = "witness-unreachable"
TIMEOUT = "witness-timeout"
DISCONNECTED = "witness-disconnected"
CLIENT_STOPPED = "client-stopped"

__all__ = ["Decision", "WitnessClient"]


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

    # -- life cycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Start dialling; waits up to ``timeout`` for the first WELCOME (never raises)."""
        self._stopped = False
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"witness-client-{self.node}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), self.timeout)

    async def stop(self) -> None:
        """Close the connection; the Witness lets this Core's lease run out."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._link is not None:
            self._link.close("witness client stopping")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._link.closed.wait(), 1.0)
        self._fail_pending()
        self._link = None
        self._welcomed = False
        self._up.clear()

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
        return Decision(r.granted, r.reason, r.epoch, r.holder, r.detail)

    async def _request(self, op: str, epoch: int | None = None,
                       peer: str | None = None) -> WireReply | str:
        """The reply, or a reason string (never a grant) when there is none."""
        if self._stopped:
            return CLIENT_STOPPED
        if not self.connected:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._up.wait(), self.timeout)
        lk = self._link
        if lk is None or not self.connected:
            return UNREACHABLE
        loop = asyncio.get_running_loop()
        self._next_req += 1
        rid = self._next_req
        fut: asyncio.Future[WireReply | None] = loop.create_future()
        self._pending[rid] = fut
        sent = loop.time()
        lk.send(Control(WireRequest(op, rid, self.pair, epoch, peer).body()))
        try:
            reply = await asyncio.wait_for(fut, self.timeout)
        except TimeoutError:
            _log.warning("witness_request_timeout", node=self.node, op=op, req=rid)
            return TIMEOUT
        finally:
            self._pending.pop(rid, None)
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
        loop = asyncio.get_running_loop()
        while not self._stopped:
            hello = Hello(self.node, self.role, "witness", self.epoch_fn(), {},
                          {"pair": self.pair})
            sent = loop.time()
            try:
                lk = await dial(*self.addr, hello, self._on_message, self._on_close,
                                name="witness-client", timeout=self.timeout,
                                ping_interval=self.ping_interval, dead_after=self.dead_after,
                                key=self.key)
            except (TimeoutError, OSError):
                await asyncio.sleep(self.reconnect_seconds)
                continue
            self._link = lk
            waits = {asyncio.ensure_future(self._up.wait()), asyncio.ensure_future(lk.closed.wait())}
            try:
                await asyncio.wait(waits, timeout=self.timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in waits:
                    t.cancel()
            if not self._welcomed:
                lk.close("no WELCOME from the Witness")
            if self._welcomed:
                self._lease_from = sent if self._lease_from is None else max(self._lease_from,
                                                                              sent)
                beat = asyncio.create_task(self._heartbeats())
                try:
                    await lk.closed.wait()
                finally:
                    beat.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await beat
            else:
                await lk.closed.wait()
            self._welcomed = False
            self._up.clear()
            self._fail_pending()
            refused = self.last_refusal is not None
            await asyncio.sleep(self.reconnect_seconds * (5 if refused else 1))

    async def _heartbeats(self) -> None:
        """Explicit heartbeat requests at a third of the lease: renew, learn revocation."""
        while True:
            period = self.heartbeat_seconds or max(0.05, (self.lease_seconds or 3.0) / 3)
            await asyncio.sleep(period)
            await self._request("heartbeat")  # a revoked holder learns ``holds`` is False
