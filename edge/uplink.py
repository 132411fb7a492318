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
import itertools
from collections import deque
from typing import Any

from edge.backends import BackendNotReady
from edge.blockstore import Blockstore, Record
from steelfusion import authconfig, log
from steelfusion.config import EdgeConfig
from steelfusion.link import Link, dial
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
    encode_write,
)
from steelfusion.wire import Read as ReadMsg

_log = log.get("uplink")

BATCH_BYTES = 4 << 20
COALESCE_BYTES = 512 * 1024
SHIP_GATHER_S = 0.002  # seed: replication payloads are "as large as 512 KB"
SHIP_GATHER_STEPS = 5  # at most 10 ms from the first unshipped write to its shipping


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
        self.send_q: deque[Record] = deque()
        self.inflight_bytes = 0
        self.unshipped_bytes = 0  # appended, not yet handed to the link
        self._frames: dict[int, deque[tuple[int, int]]] = {}  # lun -> (last seq, bytes) sent
        # lun -> seq of the last write shipped on this connection: the next frame's ``prev``,
        # so the Core can tell a resend from a hole (DESIGN invariant 6)
        self._prev: dict[int, int] = {}
        self._kick = asyncio.Event()
        self._reads: dict[int, asyncio.Future[bytes]] = {}
        self._req = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self.refusals: dict[str, dict[str, Any]] = {}  # core address -> last refusal
        self.connects = 0
        self.writes_sent = 0
        self.bytes_sent = 0
        bs.on_append = self._on_append

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._connector()))
        self._tasks.append(asyncio.create_task(self._pump()))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.link is not None:
            self.link.close("edge stopping")

    # -- connection management ------------------------------------------------------
    async def _connector(self) -> None:
        delay = 0.2
        while True:
            for addr in self.cfg.cores:
                link = await self._try_core(addr)
                if link is None:
                    continue
                delay = 0.2
                await link.closed.wait()
                self._on_lost(link)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _try_core(self, addr: tuple[str, int]) -> Link | None:
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

        try:
            link = await dial(*addr, hello, on_message, on_close, name="core",
                              ping_interval=self.cfg.ping_interval, dead_after=self.cfg.dead_after,
                              key=self.auth.key if self.auth else None)
            answer = await asyncio.wait_for(fut, 5.0)
        except (TimeoutError, OSError, ConnectionError) as e:
            _log.debug("core_dial_failed", core=format_addr(addr), error=str(e))
            return None
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
        self.bs.see_epoch(answer.epoch)
        self.refusals.pop(format_addr(addr), None)
        self.link = link
        self.primary_name = answer.node
        self.primary_addr = addr
        self.connects += 1
        # Resend everything uncommitted, in the hosts' acknowledgement order.
        self.send_q = deque(self.bs.uncommitted())
        self.unshipped_bytes = sum(r.length for r in self.send_q)
        self._frames.clear()
        self._prev = dict(self.bs.committed_seq)  # the Core has everything up to these
        self.inflight_bytes = 0
        self.connected.set()
        self._kick.set()
        _log.info("core_connected", core=answer.node, address=format_addr(addr),
                  epoch=answer.epoch, resend_writes=len(self.send_q),
                  resend_bytes=sum(r.length for r in self.send_q))
        return link

    def _on_lost(self, link: Link) -> None:
        if self.link is link:
            self.link = None
            self.connected.clear()
            _log.warning("core_disconnected", core=self.primary_name,
                         reason=link.close_reason or "connection closed",
                         uncommitted_bytes=self.bs.uncommitted_bytes)
            for fut in self._reads.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("Core connection lost"))
            self._reads.clear()

    # -- messages -------------------------------------------------------------------
    def _on_message(self, link: Link, msg: Message) -> None:
        if isinstance(msg, Ack):
            if msg.stream == self.bs.stream:
                # In-flight accounting per frame, not per record: a frame's bytes
                # leave the window when its last seq is acknowledged.
                frames = self._frames.get(msg.lun)
                if frames:
                    freed = 0
                    while frames and frames[0][0] <= msg.seq:
                        freed += frames.popleft()[1]
                    self.inflight_bytes = max(0, self.inflight_bytes - freed)
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
        elif isinstance(msg, Control):
            _log.info("core_notice", body=msg.body)

    # -- shipping ---------------------------------------------------------------------
    def _on_append(self, rec: Record) -> None:
        if self.link is not None:
            self.send_q.append(rec)
            self.unshipped_bytes += rec.length
            self._kick.set()

    async def _pump(self) -> None:
        while True:
            await self._kick.wait()
            # Hosts were acknowledged already, so a short gather costs them nothing: it lets
            # contiguous writes coalesce into full frames and spares the Cores per-frame
            # work (and wakeups, which cost a busy 2-CPU host more than the bytes). Ship
            # once a frame's worth is queued, or after SHIP_GATHER_MAX_S at the latest.
            for _ in range(SHIP_GATHER_STEPS):
                await asyncio.sleep(SHIP_GATHER_S)
                if self.unshipped_bytes >= COALESCE_BYTES or self.link is None:
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
        bufs: list[bytes | memoryview] = []  # encoded frames, data not copied
        frames_out = 0
        size = 0
        q = self.send_q
        committed = self.bs.committed_seq
        while q and self.inflight_bytes < self.cfg.window_bytes and size < BATCH_BYTES:
            rec = q.popleft()
            self.unshipped_bytes -= rec.length
            if rec.seq <= committed.get(rec.lun, 0):
                continue  # committed meanwhile
            # Coalesce a run of contiguous writes to one LUN, in order, into one frame
            # (issue: "coalescing writes to the Core where order allows"). The frame
            # carries the run's last seq: a Core that already applied part of the run
            # re-applies those same bytes, and nothing newer can have touched them.
            data_of = self.bs.data_of
            parts = [data_of(rec)]
            n = rec.length
            last = rec
            lun = rec.lun
            floor = committed.get(lun, 0)
            while q:
                nxt = q[0]
                if (nxt.lun != lun or nxt.offset != last.offset + last.length
                        or n + nxt.length > COALESCE_BYTES or nxt.seq <= floor):
                    break
                last = q.popleft()
                parts.append(data_of(last))
                n += last.length
                self.unshipped_bytes -= last.length
            # The write before this frame: the last one shipped here, or one the Core has
            # acknowledged since (it has everything up to ``committed``).
            prev = max(self._prev.get(lun, 0), floor)
            self._prev[lun] = last.seq
            bufs.extend(encode_write(lun, 0, self.bs.stream, last.seq, rec.offset, parts, prev))
            frames_out += 1
            frames = self._frames.get(lun)
            if frames is None:
                frames = self._frames[lun] = deque()
            frames.append((last.seq, n))
            self.inflight_bytes += n
            size += n
        if bufs:
            link.send_frames(bufs)
            self.writes_sent += frames_out
            self.bytes_sent += size
            if not link.writable:
                await link.drain()
            if self.send_q and self.inflight_bytes < self.cfg.window_bytes:
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
                    await asyncio.wait_for(self.connected.wait(), remaining)
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
                return await asyncio.wait_for(fut, max(0.1, deadline - loop.time()))
            except ConnectionError:
                continue
            except TimeoutError:
                self._reads.pop(req, None)
                continue

    def status(self) -> dict[str, Any]:
        return {"connected": self.link is not None and self.link.established,
                "core": self.primary_name,
                "address": format_addr(self.primary_addr) if self.primary_addr else None,
                "epoch": self.bs.epoch, "inflight_bytes": self.inflight_bytes,
                "queued_writes": len(self.send_q), "unshipped_bytes": self.unshipped_bytes,
                "connects": self.connects,
                "writes_sent": self.writes_sent, "bytes_sent": self.bytes_sent,
                "refusals": self.refusals,
                "rtt_ms": (round(self.link.machine.rtt * 1000, 3)
                           if self.link is not None and self.link.machine.rtt is not None
                           else None)}
