"""The Core process: serves LUNs to Edges and mirrors every write to its peer.

Write path (seed 002, "SteelFusion replication design overview", steps 1-5):

1. an Edge's WRITE arrives on its link (``_on_edge_write``), in the Edge's
   write order for that LUN;
2. the primary applies it to the backend (:class:`core.lunstore.LunStore`)
   and queues a copy for the secondary (:meth:`Core._mirror`);
3. the backend write becomes durable with the next group commit;
4. the secondary applies the copy, makes it durable and ACKs;
5. the primary ACKs the Edge (cumulatively) only when both are durable
   (:meth:`Core._progress`).

When the secondary is unreachable the primary is *paused*: writes keep being
applied and queued up to the mirror window, none is acknowledged, and once the
window is full the Edges' connections stop being read, so the Edges buffer.
When the link returns, the queue is resent and acks flow again by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.lunstore import AppliedState, LunError, LunStore
from journal import JournalError, check_journal
from steelfusion import control, log
from steelfusion.atomic import atomic_write
from steelfusion.config import CoreConfig
from steelfusion.link import Link, dial, listen
from steelfusion.units import format_addr
from steelfusion.wire import (
    Ack,
    Control,
    Hello,
    Message,
    Read,
    ReadReply,
    ReadStatus,
    Refuse,
    Welcome,
    Write,
    WriteFlags,
)

_log = log.get("core")

GIB = 1 << 30


@dataclass(slots=True)
class LunPipe:
    """Ordering and acknowledgement state of one LUN on this Core."""

    store: LunStore
    stream: int = 0
    applied_seq: int = 0  # highest seq written to the backend (maybe not durable yet)
    durable_seq: int = 0  # highest seq durable on the backend
    issued: deque[tuple[int, int]] = field(default_factory=deque)  # (store counter, seq)
    upstream: Link | None = None  # the Edge (primary) or the primary's mirror link (secondary)
    waiting: deque[int] = field(default_factory=deque)  # upstream seqs not yet acked
    acked_seq: int = 0
    mirror_q: deque[Write] = field(default_factory=deque)  # copies the peer has not acked
    mirror_bytes: int = 0
    mirror_acked: int = 0  # peer's durable seq in ``stream``
    mirror_link: Link | None = None  # sticky, so one LUN's copies never race on two links
    writes: int = 0
    bytes_written: int = 0


class Core:
    def __init__(self, cfg: CoreConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.state_dir = Path(cfg.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_file = self.state_dir / "core-state.json"
        st = self._load_state()
        self.role: str = st.get("role", cfg.role)
        self.epoch: int = int(st.get("epoch", 1))
        self._save_state()
        self.applied = AppliedState(self.state_dir / "applied.state")
        self.pipes: dict[int, LunPipe] = {}
        self.alarms: dict[str, dict[str, Any]] = {}
        if self.applied.corrupt_slots:
            self.raise_alarm("applied_state_corrupt", f"{self.applied.corrupt_slots} slot(s) of "
                             "applied.state failed their CRC; resent writes will be re-applied")
        for lc in cfg.luns:
            store = LunStore(lc.id, lc.path, lc.size)
            stream, seq = self.applied.get(lc.id)
            self.pipes[lc.id] = LunPipe(store, stream=stream, applied_seq=seq, durable_seq=seq,
                                        acked_seq=seq)
            store.on_durable(lambda target, lun=lc.id: self._on_durable(lun, target))
        self.replication_enabled = cfg.peer is not None
        if cfg.journal_path:
            try:
                check_journal(cfg.journal_path, cfg.journal_size, len(cfg.luns))
            except JournalError as e:
                self.raise_alarm("journal", str(e))
                self.replication_enabled = False
                _log.error("replication_service_not_started", reason=str(e))
        self.edge_links: set[Link] = set()
        self.peer_out: dict[int, Link] = {}  # dialler index -> established link to peer
        self.peer_in: set[Link] = set()
        self.mirror_in: set[Link] = set()
        self.witness_link: Link | None = None
        self.peer_info: dict[str, Any] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._server: asyncio.AbstractServer | None = None
        self._control: asyncio.AbstractServer | None = None
        self._reading_paused = False
        self.started = time.time()
        self.stopping = asyncio.Event()

    # -- persistent role/epoch ----------------------------------------------------
    def _load_state(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_file.read_text())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except ValueError as e:
            raise LunError(f"{self.state_file}: unreadable state file: {e}") from None

    def _save_state(self) -> None:
        atomic_write(self.state_file, json.dumps({"role": self.role, "epoch": self.epoch,
                                                  "name": self.name}).encode())

    def raise_alarm(self, key: str, message: str) -> None:
        if key not in self.alarms:
            _log.error("alarm_raised", alarm=key, message=message)
        self.alarms[key] = {"alarm": key, "message": message, "since": time.time()}

    def clear_alarm(self, key: str) -> None:
        if self.alarms.pop(key, None) is not None:
            _log.info("alarm_cleared", alarm=key)

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        host, port = self.cfg.listen
        self._server = await listen(host, port, self._on_message, self._on_close,
                                    name="core-listen", ping_interval=self.cfg.ping_interval,
                                    dead_after=self.cfg.dead_after)
        self._control = await control.serve(*self.cfg.control, self._control_handlers())
        if self.cfg.peer and self.replication_enabled:
            for i, iface in enumerate(self.cfg.interfaces):
                for j in range(2):  # seed: two TCP replication connections per interface
                    idx = 2 * i + j
                    self._tasks.append(asyncio.create_task(self._peer_dialler(idx, iface)))
        if self.cfg.witness:
            self._tasks.append(asyncio.create_task(self._witness_dialler()))
        self._tasks.append(asyncio.create_task(self._housekeeping()))
        _log.info("core_started", role=self.role, epoch=self.epoch, listen=format_addr(self.cfg.listen),
                  control=format_addr(self.cfg.control), luns=sorted(self.pipes),
                  peer=format_addr(self.cfg.peer) if self.cfg.peer else None)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for srv in (self._server, self._control):
            if srv is not None:
                srv.close()
        for link in [*self.edge_links, *self.peer_out.values(), *self.peer_in, *self.mirror_in]:
            link.close("core stopping")
        for p in self.pipes.values():
            with contextlib.suppress(OSError):
                p.store.close()
        self.applied.close()
        _log.info("core_stopped")

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(OSError):
                await asyncio.get_running_loop().run_in_executor(None, self.applied.sync)

    # -- state ------------------------------------------------------------------
    @property
    def mirror_links(self) -> list[Link]:
        """Outbound links to a peer that accepted us as its primary."""
        return [lk for lk in self.peer_out.values()
                if lk.established and lk.welcome is not None and lk.welcome.role == "secondary"]

    @property
    def replication(self) -> str:
        if self.role == "primary":
            if not self.cfg.peer:
                return "standalone"
            if not self.replication_enabled:
                return "disabled"
            return "running" if self.mirror_links else "paused"
        return "running" if any(lk.established for lk in self.mirror_in) else "paused"

    def _mirroring(self) -> bool:
        return self.role == "primary" and self.cfg.peer is not None

    # -- link events --------------------------------------------------------------
    def _on_close(self, link: Link, exc: BaseException | None) -> None:
        kind = link.ctx
        if kind == "edge":
            self.edge_links.discard(link)
            for lun, p in self.pipes.items():
                if p.upstream is link:
                    p.upstream = None
                    p.waiting.clear()
                    _log.info("edge_lun_released", lun=lun, edge=link.hello.node if link.hello else "?")
            _log.info("edge_disconnected", peer=link.peer,
                      edge=link.hello.node if link.hello else None, reason=link.close_reason or
                      (str(exc) if exc else "closed"))
        elif kind == "mirror-in":
            self.mirror_in.discard(link)
            for p in self.pipes.values():
                if p.upstream is link:
                    p.upstream = None
                    p.waiting.clear()
            _log.warning("replication_link_down", direction="in", peer=link.peer,
                         reason=link.close_reason or (str(exc) if exc else "closed"))
        elif kind == "peer-in":
            self.peer_in.discard(link)
        elif kind == "peer-out":
            for p in self.pipes.values():
                if p.mirror_link is link:
                    p.mirror_link = None
        self._check_paused()

    def _on_message(self, link: Link, msg: Message) -> None:
        if isinstance(msg, Write):
            if link.ctx == "edge":
                self._on_edge_write(link, msg)
            elif link.ctx == "mirror-in":
                self._on_mirror_write(link, msg)
            else:
                link.refuse("unexpected-write", f"WRITE on a {link.ctx} connection")
        elif isinstance(msg, Ack):
            if link.ctx == "peer-out":
                self._on_mirror_ack(msg)
        elif isinstance(msg, Read):
            self._on_read(link, msg)
        elif isinstance(msg, Hello):
            self._on_hello(link, msg)
        elif isinstance(msg, Welcome):
            self._on_welcome(link, msg)
        elif isinstance(msg, Refuse):
            _log.error("refused_by_peer", peer=link.peer, link=link.name, code=msg.code,
                       reason=msg.reason)
            link.close(f"refused: {msg.reason}")
        elif isinstance(msg, Control):
            _log.info("control_notice", peer=link.peer, body=msg.body)

    def _on_hello(self, link: Link, h: Hello) -> None:
        if h.purpose == "edge":
            self._accept_edge(link, h)
        elif h.purpose == "replication":
            self._accept_peer(link, h)
        else:
            _log.warning("hello_refused", peer=link.peer, node=h.node, purpose=h.purpose)
            link.refuse("bad-purpose", f"unknown connection purpose {h.purpose!r}")

    def _welcome(self, link: Link, **info: Any) -> None:
        applied = {lun: (p.stream, p.durable_seq) for lun, p in self.pipes.items()}
        link.send(Welcome(self.name, self.role, self.epoch, applied, info))

    def _accept_edge(self, link: Link, h: Hello) -> None:
        def refuse(code: str, reason: str) -> None:
            _log.error("edge_refused", edge=h.node, peer=link.peer, code=code, reason=reason)
            link.refuse(code, reason)

        if self.role != "primary":
            return refuse("not-primary", f"Core {self.name} is the secondary: it serves no Edge "
                          "(seed: the secondary Core cannot have any active Edges); "
                          "connect to the primary Core")
        for lun, size in h.luns.items():
            pipe = self.pipes.get(lun)
            if pipe is None:
                return refuse("unknown-lun", f"Core {self.name} has no LUN id {lun} "
                              f"(it has {sorted(self.pipes)})")
            if pipe.store.size != size:
                return refuse("lun-size-mismatch",
                              f"Edge {h.node} exports LUN id {lun} as {size} bytes but Core "
                              f"{self.name}'s backend {pipe.store.path} is {pipe.store.size} bytes")
            up = pipe.upstream
            if up is not None and up.established and up is not link:
                return refuse("lun-busy", f"LUN id {lun} is already served to Edge "
                              f"{up.hello.node if up.hello else up.peer}")
        if h.epoch and h.epoch > self.epoch:
            return refuse("stale-primary", f"Edge {h.node} has seen epoch {h.epoch}; this Core is "
                          f"at epoch {self.epoch} and is no longer primary")
        link.ctx = "edge"
        self.edge_links.add(link)
        for lun in h.luns:
            p = self.pipes[lun]
            p.upstream = link
            p.waiting.clear()
        self._welcome(link)
        _log.info("edge_connected", edge=h.node, peer=link.peer, luns=sorted(h.luns))
        if self._reading_paused and link.transport is not None:
            link.transport.pause_reading()

    def _accept_peer(self, link: Link, h: Hello) -> None:
        def refuse(code: str, reason: str) -> None:
            _log.error("peer_refused", peer_node=h.node, peer=link.peer, code=code, reason=reason)
            link.refuse(code, reason)

        if h.role == self.role:
            return refuse("role-conflict", f"both Cores claim the {h.role} role ({h.node} and "
                          f"{self.name}); fix the configs or run failover")
        if h.role == "primary":  # we are the secondary: this is a mirror stream
            if h.epoch < self.epoch:
                return refuse("stale-primary", f"{h.node} is at epoch {h.epoch}, older than "
                              f"this Core's {self.epoch}")
            for lun, size in h.luns.items():
                pipe = self.pipes.get(lun)
                if pipe is None:
                    return refuse("unknown-lun", f"replica Core {self.name} has no LUN id {lun}")
                if pipe.store.size < size or pipe.store.size - size > GIB:
                    return refuse("replica-size", f"replica LUN id {lun} is {pipe.store.size} "
                                  f"bytes, primary's is {size}: it must be at least as large and "
                                  "within 1 GiB (seed: same size within 1 GiB)")
            if h.epoch > self.epoch:
                self.epoch = h.epoch
                self._save_state()
            link.ctx = "mirror-in"
            self.mirror_in.add(link)
            self.peer_info = {"name": h.node, "role": h.role, "epoch": h.epoch}
            self._welcome(link)
            _log.info("replication_link_up", direction="in", peer_node=h.node, peer=link.peer)
        else:
            link.ctx = "peer-in"
            self.peer_in.add(link)
            self.peer_info = {"name": h.node, "role": h.role, "epoch": h.epoch}
            self._welcome(link)

    def _on_welcome(self, link: Link, w: Welcome) -> None:
        if link.ctx == "peer-out":
            self.peer_info = {"name": w.node, "role": w.role, "epoch": w.epoch}
            _log.info("replication_link_up", direction="out", peer_node=w.node, peer=link.peer,
                      link=link.name)
            if self._mirroring() and w.role == "secondary":
                for lun, p in self.pipes.items():
                    stream, seq = w.applied.get(lun, (0, 0))
                    if stream == p.stream and seq > p.mirror_acked:
                        self._mirror_acked_to(lun, p, seq)
                    if p.mirror_link is None or not p.mirror_link.established:
                        p.mirror_link = None
                        self._resend_mirror(p)
                self._check_paused()

    # -- primary: Edge writes ------------------------------------------------------
    def _on_edge_write(self, link: Link, w: Write) -> None:
        p = self.pipes.get(w.lun)
        if p is None or p.upstream is not link:
            link.refuse("not-your-lun", f"LUN id {w.lun} was not opened on this connection")
            return
        if not p.store.check_range(w.offset, len(w.data)):
            link.refuse("out-of-range", f"write at {w.offset}+{len(w.data)} beyond LUN id "
                        f"{w.lun} of {p.store.size} bytes")
            return
        self._apply(w.lun, p, w)
        p.waiting.append(w.seq)
        if self._mirroring() and w.seq > p.mirror_acked and not (
                p.mirror_q and w.seq <= p.mirror_q[-1].seq):
            self._mirror(w.lun, p, w)
        self._progress(w.lun, p)

    def _apply(self, lun: int, p: LunPipe, w: Write) -> None:
        if w.stream != p.stream:
            if p.stream:
                _log.warning("lun_stream_changed", lun=lun, old=p.stream, new=w.stream)
            p.stream = w.stream
            p.applied_seq = p.durable_seq = p.acked_seq = p.mirror_acked = 0
            p.issued.clear()
            p.mirror_q.clear()
            p.mirror_bytes = 0
        if w.seq <= p.applied_seq:
            return  # a resend of a write this backend already has
        try:
            counter = p.store.pwrite(w.offset, w.data)
        except OSError as e:
            self.raise_alarm(f"lun_{lun}_io", f"LUN id {lun} backend write failed: {e}")
            raise
        p.applied_seq = w.seq
        p.issued.append((counter, w.seq))
        p.writes += 1
        p.bytes_written += len(w.data)
        p.store.request_sync()

    def _on_durable(self, lun: int, target: int) -> None:
        p = self.pipes[lun]
        seq = p.durable_seq
        while p.issued and p.issued[0][0] <= target:
            seq = p.issued.popleft()[1]
        if seq != p.durable_seq:
            p.durable_seq = seq
            self.applied.set(lun, p.stream, seq)
        self._progress(lun, p)

    def _progress(self, lun: int, p: LunPipe) -> None:
        """Acknowledge upstream everything durable here and, when mirroring, on the peer."""
        limit = p.durable_seq
        if self._mirroring():
            limit = min(limit, p.mirror_acked)
        last = None
        while p.waiting and p.waiting[0] <= limit:
            last = p.waiting.popleft()
        if last is not None:
            p.acked_seq = max(p.acked_seq, last)
            if p.upstream is not None:
                p.upstream.send(Ack(lun, p.stream, last))

    # -- primary: mirroring ---------------------------------------------------------
    def _mirror(self, lun: int, p: LunPipe, w: Write) -> None:
        copy = Write(lun, WriteFlags.MIRROR | (w.flags & WriteFlags.FUA), w.stream, w.seq,
                     w.offset, w.data)
        p.mirror_q.append(copy)
        p.mirror_bytes += len(w.data)
        link = self._mirror_link_for(lun, p)
        if link is not None:
            link.send(copy)
        self._check_paused()

    def _mirror_link_for(self, lun: int, p: LunPipe) -> Link | None:
        if p.mirror_link is not None and p.mirror_link.established:
            return p.mirror_link
        links = self.mirror_links
        if not links:
            p.mirror_link = None
            return None
        p.mirror_link = links[lun % len(links)]
        return p.mirror_link

    def _resend_mirror(self, p: LunPipe) -> None:
        link = self._mirror_link_for(next(k for k, v in self.pipes.items() if v is p), p)
        if link is not None and p.mirror_q:
            link.send_many(list(p.mirror_q))

    def _on_mirror_ack(self, a: Ack) -> None:
        p = self.pipes.get(a.lun)
        if p is None or a.stream != p.stream:
            return
        self._mirror_acked_to(a.lun, p, a.seq)
        self._check_paused()

    def _mirror_acked_to(self, lun: int, p: LunPipe, seq: int) -> None:
        p.mirror_acked = max(p.mirror_acked, seq)
        while p.mirror_q and p.mirror_q[0].seq <= p.mirror_acked:
            p.mirror_bytes -= len(p.mirror_q.popleft().data)
        self._progress(lun, p)

    def _check_paused(self) -> None:
        """Stop reading Edges while the mirror queue is over its window (they buffer)."""
        total = sum(p.mirror_bytes for p in self.pipes.values())
        want_pause = total > self.cfg.mirror_window_bytes
        if want_pause and not self._reading_paused:
            self._reading_paused = True
            _log.warning("edge_intake_paused", mirror_queue_bytes=total,
                         replication=self.replication)
            for lk in self.edge_links:
                if lk.transport is not None:
                    lk.transport.pause_reading()
        elif self._reading_paused and total <= self.cfg.mirror_window_bytes // 2:
            self._reading_paused = False
            _log.info("edge_intake_resumed", mirror_queue_bytes=total)
            for lk in self.edge_links:
                if lk.transport is not None:
                    lk.transport.resume_reading()

    # -- secondary: applying the primary's copies -----------------------------------
    def _on_mirror_write(self, link: Link, w: Write) -> None:
        p = self.pipes.get(w.lun)
        if p is None or not p.store.check_range(w.offset, len(w.data)):
            link.refuse("out-of-range", f"replicated write to LUN id {w.lun} at {w.offset} "
                        "is outside the replica")
            return
        p.upstream = link
        self._apply(w.lun, p, w)
        p.waiting.append(w.seq)
        self._progress(w.lun, p)

    # -- reads --------------------------------------------------------------------
    def _on_read(self, link: Link, r: Read) -> None:
        p = self.pipes.get(r.lun)
        if link.ctx != "edge" or self.role != "primary":
            link.send(ReadReply(r.req, ReadStatus.NOT_PRIMARY, b""))
            return
        if p is None:
            link.send(ReadReply(r.req, ReadStatus.NO_SUCH_LUN, b""))
            return
        if not p.store.check_range(r.offset, r.length):
            link.send(ReadReply(r.req, ReadStatus.OUT_OF_RANGE, b""))
            return
        try:
            data = p.store.pread(r.offset, r.length)
        except OSError as e:
            self.raise_alarm(f"lun_{r.lun}_io", f"LUN id {r.lun} backend read failed: {e}")
            link.send(ReadReply(r.req, ReadStatus.IO_ERROR, b""))
            return
        link.send(ReadReply(r.req, ReadStatus.OK, data))

    # -- outbound connections -------------------------------------------------------
    async def _peer_dialler(self, idx: int, iface: str) -> None:
        assert self.cfg.peer is not None
        host, port = self.cfg.peer
        backoff = 0.2
        while True:
            hello = Hello(self.name, self.role, "replication", self.epoch,
                          {lun: p.store.size for lun, p in self.pipes.items()},
                          {"interface": iface, "index": idx})
            try:
                link = await dial(host, port, hello, self._on_message, self._on_close,
                                  name=f"repl-{idx}", local_addr=(iface, 0),
                                  ping_interval=self.cfg.ping_interval,
                                  dead_after=self.cfg.dead_after)
            except (TimeoutError, OSError) as e:
                _log.debug("peer_dial_failed", peer=format_addr(self.cfg.peer), error=str(e))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            link.ctx = "peer-out"
            self.peer_out[idx] = link
            await link.closed.wait()
            self.peer_out.pop(idx, None)
            if link.close_reason.startswith("refused"):
                await asyncio.sleep(2.0)
            backoff = 0.2
            await asyncio.sleep(0.1)

    async def _witness_dialler(self) -> None:
        assert self.cfg.witness is not None
        host, port = self.cfg.witness
        while True:
            hello = Hello(self.name, self.role, "witness", self.epoch, {}, {})
            try:
                link = await dial(host, port, hello, self._on_message, self._on_close,
                                  name="witness", ping_interval=self.cfg.ping_interval,
                                  dead_after=self.cfg.dead_after)
            except (TimeoutError, OSError):
                await asyncio.sleep(1.0)
                continue
            link.ctx = "witness"
            self.witness_link = link
            await link.closed.wait()
            self.witness_link = None
            await asyncio.sleep(0.5)

    # -- control -----------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        def linfo(lk: Link, direction: str) -> dict[str, Any]:
            return {"direction": direction, "peer": lk.peer, "name": lk.name,
                    "node": (lk.hello.node if lk.hello else (lk.welcome.node if lk.welcome else None)),
                    "established": lk.established, "rtt_ms": (round(lk.machine.rtt * 1000, 3)
                                                              if lk.machine.rtt is not None else None),
                    "bytes_in": lk.bytes_in, "bytes_out": lk.bytes_out}

        repl = [linfo(lk, "out") for lk in self.peer_out.values()]
        repl += [linfo(lk, "in") for lk in [*self.mirror_in, *self.peer_in]]
        return {
            "name": self.name, "role": self.role, "epoch": self.epoch,
            "replication": self.replication, "pid": os.getpid(),
            "peer": {"address": format_addr(self.cfg.peer) if self.cfg.peer else None,
                     **self.peer_info},
            "connections": {
                "edges": [linfo(lk, "in") for lk in self.edge_links],
                "replication": repl,
                "replication_expected_out": (2 * len(self.cfg.interfaces)
                                             if self.cfg.peer and self.replication_enabled else 0),
                "witness": self.witness_link is not None and self.witness_link.established,
            },
            "luns": {str(lun): {"path": p.store.path, "size": p.store.size, "stream": p.stream,
                                "applied_seq": p.applied_seq, "durable_seq": p.durable_seq,
                                "acked_seq": p.acked_seq, "mirror_acked_seq": p.mirror_acked,
                                "mirror_queue_bytes": p.mirror_bytes, "writes": p.writes,
                                "bytes_written": p.bytes_written,
                                "edge": (p.upstream.hello.node if p.upstream is not None
                                         and p.upstream.hello is not None and p.upstream.ctx == "edge"
                                         else None)}
                     for lun, p in self.pipes.items()},
            "alarms": list(self.alarms.values()),
            "uptime_s": round(time.time() - self.started, 1),
        }

    def _control_handlers(self) -> dict[str, control.Handler]:
        async def status(_: dict[str, Any]) -> dict[str, Any]:
            return self.status()

        async def alarms(_: dict[str, Any]) -> dict[str, Any]:
            return {"alarms": list(self.alarms.values())}

        async def stop(_: dict[str, Any]) -> dict[str, Any]:
            asyncio.get_running_loop().call_later(0.05, self.stopping.set)
            return {"stopping": True}

        return {"status": status, "alarms": alarms, "stop": stop}


async def run(cfg: CoreConfig) -> None:
    core = Core(cfg)
    await core.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, core.stopping.set)
    await core.stopping.wait()
    await core.stop()
