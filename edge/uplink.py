"""The Edge's connection to its Cores: ships uncommitted writes in order, fetches reads.

DESIGN.md: an Edge keeps connections to both Cores and follows whichever is
primary. It dials each configured Core; the secondary refuses with
``not-primary`` and the primary welcomes it. On every (re)connection the
whole uncommitted backlog is resent in the hosts' acknowledgement order: the
Core recognises by (stream, seq) what it already has and acknowledges it at
once, so a resend never applies a write twice or out of order.

Shipping is pipelined: up to ``window_bytes`` of writes are in flight, sent
in batches with one ``writelines`` per batch, and the Core's cumulative ACKs
free the reserve.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import Any

from edge.backends import BackendNotReady
from edge.blockstore import Blockstore, Record
from edge.shipping import COALESCE_BYTES, Shipper
from steelfusion import authconfig, log
from steelfusion.config import EdgeConfig
from steelfusion.link import Link, dial
from steelfusion.tasks import Background
from steelfusion.units import format_addr
from steelfusion.wire import (
    Ack,
    Control,
    Hello,
    Message,
    ReadReply,
    ReadStatus,
    Refuse,
    Welcome,
    WriteFlags,
    discard_data,
    encode_write,
)
from steelfusion.wire import Read as ReadMsg

_log = log.get("uplink")

PROBE_AFTER = 3.0  # seconds without an acknowledgement before looking for a newer primary
PROBE_EVERY = 1.0  # first look; then every 2, 4 ... PROBE_MAX seconds while still stalled
PROBE_MAX = 8.0
CORE_ALARM_AFTER = 5.0  # seconds without a primary Core before alarm core_unreachable

SHIP_GATHER_S = 0.002  # seed: replication payloads are "as large as 512 KB"
SHIP_GATHER_STEPS = 5  # at most 10 ms from the first unshipped write to its shipping


MAP_TIMEOUT = 5.0
"""Seconds an Edge waits for the primary to say what a LUN has allocated."""

class CoreUplink:
    def __init__(self, cfg: EdgeConfig, bs: Blockstore) -> None:
        self.cfg = cfg
        self.bs = bs
        self.auth = authconfig.load(cfg.source)
        self.luns = {lu.lun_id: lu.size for t in cfg.targets for lu in t.luns}
        self.link: Link | None = None  # the primary's data connection
        self.primary_name: str | None = None
        self.primary_addr: tuple[str, int] | None = None
        self.connected = asyncio.Event()
        self.ship = Shipper(cfg.window_bytes)  # the shipping rules (sans-IO)
        self._kick = asyncio.Event()
        self._reads: dict[int, asyncio.Future[bytes]] = {}
        self._maps: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._req = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self.refusals: dict[str, dict[str, Any]] = {}  # core address -> last refusal
        self.down_since: float | None = time.monotonic()  # no primary since (None: connected)
        self.last_ack = time.monotonic()  # the primary's last acknowledgement (probe timing)
        self.task_failures: dict[str, str] = {}
        self._bg = Background(lambda name, e: self.task_failures.__setitem__(name, repr(e)))
        self.connects = 0
        self.writes_sent = 0
        self.bytes_sent = 0
        bs.on_append = self._on_append

    def start(self) -> None:
        self._tasks.append(self._bg.spawn(self._connector(), "connector"))
        self._tasks.append(self._bg.spawn(self._pump(), "pump"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.link is not None:
            self.link.close("edge stopping")

    # -- connection management ------------------------------------------------------
    async def _connector(self) -> None:
        delay = 0.2
        while True:
            if self.link is None:
                for addr in self.cfg.cores:
                    if await self._try_core(addr) is not None:
                        break
                else:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
            delay = 0.2
            link = self.link
            assert link is not None
            await self._hold(link)
            if link.closed.is_set():
                self._on_lost(link)

    async def _hold(self, link: Link) -> None:
        """Stay with ``link`` until it closes, or until another Core turns out to be primary
        at a newer epoch while this one has acknowledged nothing for a while.

        A primary cut off from its peer and the Witness stays reachable from its branch but
        acknowledges nothing, and the secondary may fail over meanwhile. Without a look at
        the other Cores the Edges learnt of the new primary only when the partition healed:
        RTO was the whole partition (issue 10, found by ``steelfusion drill``). A secondary
        refuses the probe (``not-primary``) and nothing changes; an Edge making progress
        never probes."""
        wait = PROBE_EVERY
        while not link.closed.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await link.closed.wait()
                return
            if not self._stalled():
                wait = PROBE_EVERY
                continue
            for addr in self.cfg.cores:
                if addr == self.primary_addr or link.closed.is_set():
                    continue
                if await self._try_core(addr, newer_than=self.bs.epoch) is not None:
                    _log.warning("moved_to_newer_primary", old=link.hello.node if link.hello
                                 else None, new=self.primary_name, epoch=self.bs.epoch)
                    link.close(f"Core {self.primary_name} is primary at a newer epoch")
                    self._fail_reads("moved to a newer primary")
                    return
            wait = min(wait * 2, PROBE_MAX)

    def _stalled(self) -> bool:
        """Writes wait for the Core and none was acknowledged for :data:`PROBE_AFTER` s."""
        return (self.bs.uncommitted_bytes > 0
                and time.monotonic() - self.last_ack >= PROBE_AFTER)

    async def _try_core(self, addr: tuple[str, int],
                        newer_than: int | None = None) -> Link | None:
        hello = Hello(self.cfg.name, "edge", "edge", self.bs.epoch, dict(self.luns),
                      {"stream": self.bs.stream,
                       "committed": {str(k): v for k, v in self.bs.committed_seq.items()}})
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()

        def on_message(link: Link, msg: Message) -> None:
            if not fut.done() and isinstance(msg, Welcome | Refuse):
                fut.set_result(msg)
                return
            self._on_message(link, msg)

        def on_close(link: Link, exc: BaseException | None) -> None:
            if not fut.done():
                fut.set_exception(ConnectionError(link.close_reason or "closed"))
            else:
                self._on_lost(link)  # at once: the connector may be busy probing

        link: Link | None = None
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that
            # lands as the answer arrives (CPython gh-86296), and the Edge then never stopped
            async with asyncio.timeout(5.0):
                link = await dial(*addr, hello, on_message, on_close, name="core",
                                  ping_interval=self.cfg.ping_interval,
                                  dead_after=self.cfg.dead_after,
                                  key=self.auth.key if self.auth else None)
                answer = await fut
        except (TimeoutError, OSError, ConnectionError) as e:
            _log.debug("core_dial_failed", core=format_addr(addr), error=str(e))
            if link is not None:
                link.close("no answer to HELLO")
            return None
        except asyncio.CancelledError:
            if link is not None:
                link.close("edge stopping")
            raise
        if isinstance(answer, Refuse):
            key = format_addr(addr)
            prev = self.refusals.get(key)
            if prev is None or prev["code"] != answer.code:
                level = _log.info if answer.code == "not-primary" else _log.error
                level("core_refused_edge", core=key, code=answer.code, reason=answer.reason)
            self.refusals[key] = {"code": answer.code, "reason": answer.reason}
            link.close("refused")
            return None
        assert isinstance(answer, Welcome)
        if answer.epoch < self.bs.epoch:
            # DESIGN invariant 2: a stale primary (older epoch) is refused by Edges.
            key = format_addr(addr)
            reason = (f"Core {answer.node} claims primary at epoch {answer.epoch}, but epoch "
                      f"{self.bs.epoch} was already seen")
            if self.refusals.get(key, {}).get("code") != "stale-primary":
                _log.error("stale_primary_refused", core=answer.node, address=key,
                           epoch=answer.epoch, seen_epoch=self.bs.epoch)
            self.refusals[key] = {"code": "stale-primary", "reason": reason}
            link.close("stale primary")
            return None
        if newer_than is not None and answer.epoch <= newer_than:
            link.close("not a newer primary")  # a probe: the current primary stays
            return None
        self.bs.see_epoch(answer.epoch)
        self.refusals.pop(format_addr(addr), None)
        self.last_ack = time.monotonic()
        self.link = link
        self.primary_name = answer.node
        self.primary_addr = addr
        self.connects += 1
        self.down_since = None
        # Resend everything uncommitted, in the hosts' acknowledgement order.
        self.ship.reset(self.bs.uncommitted(), self.bs.committed_seq)
        self.connected.set()
        self._kick.set()
        _log.info("core_connected", core=answer.node, address=format_addr(addr),
                  epoch=answer.epoch, resend_writes=len(self.ship.send_q),
                  resend_bytes=self.ship.unshipped_bytes)
        return link

    def _on_lost(self, link: Link) -> None:
        if self.link is link:
            self.link = None
            self.down_since = time.monotonic()
            self.connected.clear()
            _log.warning("core_disconnected", core=self.primary_name,
                         reason=link.close_reason or "connection closed",
                         uncommitted_bytes=self.bs.uncommitted_bytes)
            self._fail_reads("Core connection lost")

    def _fail_reads(self, why: str) -> None:
        """Reads in flight on a connection that is gone: their callers ask again."""
        for fut in self._reads.values():
            if not fut.done():
                fut.set_exception(ConnectionError(why))
        self._reads.clear()

    # -- messages -------------------------------------------------------------------
    def _on_message(self, link: Link, msg: Message) -> None:
        if isinstance(msg, Ack):
            if msg.stream == self.bs.stream:
                self.last_ack = now = time.monotonic()
                self.ship.on_ack(msg.lun, msg.seq, now)
                self.bs.commit(msg.lun, msg.seq)
                self._kick.set()
        elif isinstance(msg, ReadReply):
            fut = self._reads.pop(msg.req, None)
            if fut is not None and not fut.done():
                if msg.status == ReadStatus.OK:
                    fut.set_result(bytes(msg.data))
                else:
                    fut.set_exception(BackendNotReady(
                        f"Core read failed: {ReadStatus(msg.status).name}"))
        elif isinstance(msg, Refuse):
            _log.error("core_closed_connection", code=msg.code, reason=msg.reason)
            link.close(f"refused: {msg.reason}")
        elif isinstance(msg, Control) and msg.body.get("op") == "map-reply":
            got = self._maps.pop(msg.body.get("req"), None)  # type: ignore[arg-type]
            if got is not None and not got.done():
                got.set_result(msg.body)
        elif isinstance(msg, Control):
            _log.info("core_notice", body=msg.body)

    # -- shipping ---------------------------------------------------------------------
    def _on_append(self, rec: Record) -> None:
        if self.link is not None:
            self.ship.append(rec)
            self._kick.set()

    async def _pump(self) -> None:
        while True:
            await self._kick.wait()
            # Hosts were acknowledged already, so a short gather costs them nothing: it lets
            # contiguous writes coalesce into full frames and spares the Cores per-frame
            # work (and wakeups, which cost a busy 2-CPU host more than the bytes). Ship
            # once a frame's worth is queued, or after SHIP_GATHER_STEPS x SHIP_GATHER_S at the latest.
            for _ in range(SHIP_GATHER_STEPS):
                await asyncio.sleep(SHIP_GATHER_S)
                if self.ship.unshipped_bytes >= COALESCE_BYTES or self.link is None:
                    break
            self._kick.clear()
            try:
                await self._pump_once()
            except Exception as e:  # never let shipping die silently
                _log.exception("uplink_pump_failed", error=str(e))
                if self.link is not None:
                    self.link.abort(f"uplink error: {e}")
                await asyncio.sleep(0.5)

    async def _pump_once(self) -> None:
        link = self.link
        if link is None or not link.established:
            return
        frames = self.ship.next_frames(self.bs.committed_seq, time.monotonic())
        if not frames:
            return
        data_of = self.bs.data_of
        stream = self.bs.stream
        bufs: list[bytes | memoryview] = []  # encoded frames, data not copied
        for f in frames:
            first = f.recs[0]
            if first.discard:  # alone in its frame (Shipper)
                bufs.extend(encode_write(f.lun, WriteFlags.DISCARD, stream, f.seq, f.offset,
                                         [discard_data(first.discard)], f.prev))
                continue
            bufs.extend(encode_write(f.lun, 0, stream, f.seq, f.offset,
                                     [data_of(r) for r in f.recs], f.prev))  # type: ignore[arg-type]
        link.send_frames(bufs)
        self.writes_sent += len(frames)
        self.bytes_sent += sum(f.nbytes for f in frames)
        if not link.writable:
            await link.drain()
        if self.ship.more:
            self._kick.set()

    # -- reads ---------------------------------------------------------------------------
    async def read(self, lun: int, offset: int, length: int) -> bytes:
        """Fetch from the primary Core; retry across reconnections until read_timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.read_timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BackendNotReady(f"no primary Core reachable for {self.cfg.read_timeout:.0f}s "
                                      "to read uncached data")
            if self.link is None:
                try:
                    async with asyncio.timeout(remaining):
                        await self.connected.wait()
                except TimeoutError:
                    continue
            link = self.link
            if link is None:
                continue
            req = next(self._req)
            fut: asyncio.Future[bytes] = loop.create_future()
            self._reads[req] = fut
            link.send(ReadMsg(req, lun, offset, length))
            try:
                async with asyncio.timeout(max(0.1, deadline - loop.time())):
                    return await fut
            except ConnectionError:
                continue
            except TimeoutError:
                self._reads.pop(req, None)
                continue

    async def allocation(self, lun: int, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """The primary's allocation over a range (``(offset, length, mapped)``, issue 18):
        asked with a ``map`` control message. A Core that does not answer in MAP_TIMEOUT
        seconds (an older build) is taken as all mapped, which promises nothing wrong."""
        link = self.link
        if link is None:
            raise BackendNotReady("no primary Core connected to ask what is allocated")
        req = next(self._req)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._maps[req] = fut
        link.send(Control({"op": "map", "req": req, "lun": lun, "offset": offset,
                           "length": length}))
        # a timer, not asyncio.timeout: SCSI handlers may run outside a task (edge.aio)
        def give_up() -> None:
            if not fut.done():
                fut.set_result({})
        timer = loop.call_later(MAP_TIMEOUT, give_up)
        try:
            body = await fut
        finally:
            timer.cancel()
            self._maps.pop(req, None)
        if not body:
            _log.warning("core_map_unanswered", lun=lun, core=self.primary_name)
            return [(offset, length, True)]
        if "error" in body:
            raise BackendNotReady(f"the Core could not say what is allocated: {body['error']}")
        return [(int(o), int(n), bool(m)) for o, n, m in body["extents"]]

    def alarms(self) -> list[dict[str, Any]]:
        """What an operator must hear of: no primary for a while, a task that died,
        refusals (a secondary's ``not-primary`` is routine)."""
        out = []
        down = self.down_since
        if down is not None and time.monotonic() - down >= CORE_ALARM_AFTER:
            out.append({"alarm": "core_unreachable", "message": (
                f"no primary Core reachable for {time.monotonic() - down:.0f} s (tried "
                + ", ".join(format_addr(a) for a in self.cfg.cores)
                + f"); {self.bs.uncommitted_bytes} bytes uncommitted: host writes are "
                "acknowledged until the write reserve is full")})
        for name, err in sorted(self.task_failures.items()):
            out.append({"alarm": f"task_{name}_failed", "message": f"background task {name} "
                        f"stopped: {err}; restart the Edge (and report the bug with its log)"})
        for addr, r in sorted(self.refusals.items()):
            if r["code"] == "not-primary":
                continue
            key = "duplicate_node" if r["code"] == "duplicate-node" else "core_refused_edge"
            out.append({"alarm": key, "message": f"Core at {addr} refused this Edge: "
                        f"{r['code']}: {r['reason']}"})
        return out

    def status(self) -> dict[str, Any]:
        return {"connected": self.link is not None and self.link.established,
                "core": self.primary_name,
                "address": format_addr(self.primary_addr) if self.primary_addr else None,
                "epoch": self.bs.epoch, "inflight_bytes": self.ship.inflight_bytes,
                "queued_writes": len(self.ship.send_q),
                "unshipped_bytes": self.ship.unshipped_bytes,
                "connects": self.connects,
                "writes_sent": self.writes_sent, "bytes_sent": self.bytes_sent,
                "refusals": self.refusals,
                "rtt_ms": (round(self.link.machine.rtt * 1000, 3)
                           if self.link is not None and self.link.machine.rtt is not None
                           else None)}
