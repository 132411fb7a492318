"""Seeded, deterministic simulation of the whole write path (issue 9).

An Edge, a primary and a secondary Core, a Witness and the Cores' Journal
LUNs run **in memory** on a virtual clock with one ``random.Random(seed)``:
the habit of FoundationDB's simulator and TigerBeetle's VOPR
(../shared/STYLE.md). What runs is the project's own code, not a model of it:

- each Core is a :class:`core.engine.CoreEngine` — admission, the per-LUN
  streams (:class:`core.pipeline.LunPipeline`), the replication state machine
  and its effects, mirror queue, resync pump, journal gating, fencing,
  demotion, operator commands — with the hooks (clock, persistence, tasks)
  given by this module instead of asyncio;
- the Journal LUN is the real :class:`journal.journal.Journal` on a real file,
  committed on the virtual clock, crashed by dropping what was not committed
  and reopened by its own recovery (crashed activity-log regions go dirty);
- the Witness is the real :class:`witness.logic.WitnessLogic` (leases,
  approvals, epochs, restart grace), reached with delays;
- the Edge ships with the real :class:`edge.shipping.Shipper`;
- every frame goes through the real codec (:mod:`steelfusion.wire`) and is
  decoded from random chunkings (split across reads, many per read).

The simulation supplies a network and disks that misbehave: delays,
resets, partitions of the Edge, of the inter-Core link and of the Witness,
crashes of any node at any point (a Core loses what it had not synced, and
each unsynced write may or may not have reached the disk), and operator
drills (suspend, resume, failover).

A checker asserts DESIGN.md's invariants over the recorded history:

1. no acknowledged write is lost: once healed, both Cores hold every write
   the Edge saw acknowledged (writes acknowledged by a *suspended* primary
   may be lost if a failover follows — the seed's documented cost — and
   nothing else may); while running, an acknowledged write is durable on
   both Cores when the Edge learns it;
2. at most one Core can acknowledge Edge writes at any time;
3. a running Core's durable image is a prefix of the Edge's write order;
4. after healing and resync, both Cores are byte-identical;
6. no Core applies past a hole (through 1-4, and the ``prev`` chains).

A failing seed prints the command that replays it. ``--plant`` plants a
known bug to show the checker finds it.
"""

from __future__ import annotations

import functools
import heapq
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.engine import CoreEngine, LinkKind
from core.pipeline import LunPipeline, Order
from core.replication import State
from edge.shipping import Shipper
from steelfusion import control, log
from steelfusion.config import CoreConfig, LunConfig
from steelfusion.wire import (
    Ack,
    FrameDecoder,
    Hello,
    Message,
    Refuse,
    Welcome,
    Write,
    WriteFlags,
    encode_bytes,
)
from witness.logic import Decision, WitnessLogic

BLOCK = 512
LUN_BLOCKS = 64
LUN_BYTES = BLOCK * LUN_BLOCKS
LEASE = 1.5
PAIR = "pair-1"

PLANTS = ("ack-before-fsync", "skip-gap", "lost-frames", "seal-late", "no-fence",
          "ack-unjournaled")


class SimFailure(AssertionError):
    """An invariant broke; the message names the seed and how to replay it."""


class Clock:
    """Virtual time and the one event queue; ties broken by insertion order."""

    def __init__(self) -> None:
        self.now = 0.0
        self._q: list[tuple[float, int, Callable[[], object]]] = []
        self._n = 0
        self.after: Callable[[], None] | None = None  # runs after every event (checks)

    def at(self, delay: float, fn: Callable[[], object]) -> None:
        self._n += 1
        heapq.heappush(self._q, (self.now + delay, self._n, fn))

    def run_until(self, t: float, stop: Callable[[], bool] | None = None) -> None:
        while self._q and self._q[0][0] <= t:
            when, _, fn = heapq.heappop(self._q)
            self.now = when
            fn()
            if self.after is not None:
                self.after()
            if stop is not None and stop():
                return
        self.now = max(self.now, t)


# -- disk ---------------------------------------------------------------------------
class SimDisk:
    """A LUN with a page cache (:class:`core.pipeline.Backend`).

    A write is volatile until a sync that started after it completes; the
    applied seq is sealed in the same sync (as :class:`core.lunstore.LunStore`
    with the Core's seal). A crash keeps what was synced plus, for each
    unsynced write, whatever the disk had written (a coin toss).
    """

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.owner: SimCore | None = None
        self.size = LUN_BYTES
        self.image = bytearray(LUN_BYTES)  # what reads see
        self.durable = bytearray(LUN_BYTES)
        self.pending: list[tuple[int, int, bytes]] = []  # (counter, offset, data)
        self.written = 0
        self.synced = 0
        self.syncing = False
        self.force = False
        self.fail_next = False  # planted by the fault "fsync-fail"
        self.failed = False
        self.sealed = (0, 0)  # durable (stream, seq) of the applied state
        self.future = 0  # a crash left writes up to this seq on disk, past the sealed seq

    def check_range(self, offset: int, length: int) -> bool:
        return offset >= 0 and offset + length <= self.size

    def pwrite(self, offset: int, data: bytes | memoryview) -> int:
        b = bytes(data)
        self.image[offset:offset + len(b)] = b
        self.written += 1
        self.pending.append((self.written, offset, b))
        return self.written

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.image[offset:offset + length])

    def request_sync(self, force: bool = False) -> None:
        owner = self.owner
        self.force = self.force or force
        if self.syncing or (self.synced >= self.written and not self.force) or owner is None \
                or self.failed:
            return
        self.force = False
        self.syncing = True
        target = self.written
        seal = owner.seal()
        self.sim.clock.at(self.sim.rng.expovariate(1 / 0.002),
                          lambda: self._synced(owner, target, seal))

    def _synced(self, owner: SimCore, target: int, seal: tuple[int, int] | None) -> None:
        if owner is not self.owner:
            return  # the Core crashed meanwhile
        if self.fail_next:
            # fdatasync says EIO; the kernel may drop those dirty pages (they stay readable
            # until evicted, but never reach the disk): a later sync would "succeed" without
            self.fail_next = False
            self.failed = True
            self.syncing = False
            self.pending = [x for x in self.pending if x[0] > target]
            self.sim.note(f"{owner.name}: fdatasync EIO, unsynced writes dropped")
            owner._on_store_failed(1, OSError(5, "simulated fdatasync EIO"))
            return
        keep = []
        for counter, off, b in self.pending:
            if counter <= target:
                self.durable[off:off + len(b)] = b
            else:
                keep.append((counter, off, b))
        self.pending = keep
        self.synced = target
        if seal is not None:
            self.sealed = seal
        self.syncing = False
        if self.future and self.sealed[1] >= self.future:
            self.future = 0
        owner.durable_to(target)
        self.request_sync()

    def crash(self, seq_of: dict[int, int]) -> None:
        rng = self.sim.rng
        for counter, off, b in self.pending:  # the disk may have written any of them
            if rng.random() < 0.5:
                self.durable[off:off + len(b)] = b
                self.future = max(self.future, seq_of.get(counter, 1 << 62))
        self.pending = []
        self.image = bytearray(self.durable)
        self.written = self.synced = 0
        self.syncing = False
        self.failed = self.fail_next = False  # the operator fixed the storage
        self.owner = None


# -- network ------------------------------------------------------------------------
class End:
    """One side of a simulated TCP connection, shaped like :class:`steelfusion.link.Link`."""

    def __init__(self, sim: Sim, conn: Conn, name: str) -> None:
        self.sim = sim
        self.conn = conn
        self.name = name
        self.on_message: Callable[[End, Message], None] = lambda e, m: None
        self.on_close: Callable[[End, BaseException | None], None] = lambda e, x: None
        self.other: End | None = None
        self.decoder = FrameDecoder()
        self.ctx: Any = None
        self.hello: Hello | None = None
        self.welcome: Welcome | None = None
        self.peer = name
        self.close_reason = ""
        self.handshaken = False
        self.paused = False
        self.closed_here = False
        self.core: SimCore | None = None  # the Core this end belongs to, if any
        self._held: list[bytes] = []

    @property
    def established(self) -> bool:
        return self.handshaken and self.conn.open and not self.conn.closing

    @property
    def writable(self) -> bool:
        return True

    def send(self, msg: Message) -> None:
        if not self.conn.open or self.conn.closing or self.other is None:
            return
        if self.core is not None and isinstance(msg, Ack) and self.ctx == LinkKind.EDGE:
            self.sim.acked_by(self.core, msg.seq)  # history: who acknowledged, in which state
        raw = encode_bytes(msg)
        rng = self.sim.rng
        pos = 0
        while pos < len(raw):  # random chunks, delivered in order after the link's latency
            n = len(raw) - pos if rng.random() < 0.5 else rng.randint(1, len(raw) - pos)
            self.conn.deliver(self.other, raw[pos:pos + n])
            pos += n

    def send_many(self, msgs: list[Message]) -> None:
        for m in msgs:
            self.send(m)

    def receive(self, chunk: bytes) -> None:
        if self.closed_here:
            return  # like a closed transport: nothing more is read
        if self.paused:
            self._held.append(chunk)
            return
        for m in self.decoder.feed(chunk):
            if not self.conn.open:
                return
            if isinstance(m, Write) and m.flags & WriteFlags.MIRROR and self.conn.lose_next > 0:
                self.conn.lose_next -= 1  # planted: a receiver that drops WRITEs (issue 9)
                continue
            if isinstance(m, Hello):
                self.hello = m
                self.handshaken = True
            elif isinstance(m, Welcome):
                self.welcome = m
                self.handshaken = True
            self.on_message(self, m)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        if self.paused:
            self.paused = False
            held, self._held = self._held, []
            for c in held:
                self.receive(c)

    def refuse(self, code: str, reason: str) -> None:
        self.send(Refuse(code, reason))
        self.close(reason)

    def close(self, reason: str = "") -> None:
        self.close_reason = self.close_reason or reason
        self.closed_here = True
        self.conn.close()


class Conn:
    """A connection between two Ends; per-direction order, graceful or abrupt close."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.open = True
        self.closing = False  # closed by one side: what it sent still arrives, then EOF
        self.ends: list[End] = []
        self._last: dict[int, float] = {}
        self.lose_next = 0
        if sim.planted("lost-frames") and not sim.healing and sim.rng.random() < 0.3:
            self.lose_next = sim.rng.randint(1, 4)

    def deliver(self, to: End, chunk: bytes) -> None:
        key = id(to)
        t = max(self.sim.clock.now + self.sim.rng.uniform(0.0002, 0.003), self._last.get(key, 0))
        self._last[key] = t

        def go() -> None:
            if self.open:
                to.receive(chunk)
        self.sim.clock.at(t - self.sim.clock.now, go)

    def close(self) -> None:
        """Graceful (what was sent is delivered first), like closing a flushed socket."""
        if self.open and not self.closing:
            self.closing = True
            t = max([self.sim.clock.now, *self._last.values()])
            self.sim.clock.at(t - self.sim.clock.now + 1e-6, self.reset)

    def reset(self) -> None:
        """Gone at once (a crash, a cut cable): what is in flight is lost."""
        if self.open:
            self.open = False
            for e in self.ends:
                self.sim.clock.at(0.0, functools.partial(e.on_close, e, None))


def connect(sim: Sim, a_name: str, b_name: str) -> tuple[End, End]:
    conn = Conn(sim)
    a, b = End(sim, conn, b_name), End(sim, conn, a_name)
    a.other, b.other = b, a
    conn.ends = [a, b]
    sim.conns.append(conn)
    return a, b


# -- Witness ------------------------------------------------------------------------
class SimWitness:
    """The real :class:`WitnessLogic`, durable across its own restarts, reached with delays."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.logic = WitnessLogic(LEASE, 0.0)
        self.alive = True

    def reachable(self, node: str) -> bool:
        return self.alive and self.sim.witness_link.get(node, True)

    def crash_restart(self) -> None:
        self.logic = WitnessLogic.from_json(self.logic.to_json(), LEASE, self.sim.clock.now)


class SimWitnessClient:
    """What a Core sees of the Witness (:class:`witness.client.WitnessClient`'s surface)."""

    def __init__(self, sim: Sim, core: SimCore) -> None:
        self.sim = sim
        self.core = core
        self.node = core.name
        self.role = core.role
        self.lease_seconds = LEASE
        self.pair_epoch = 0
        self.holds: bool | None = None
        self.holder: str | None = None
        self._lease_from: float | None = None
        self.registered = False

    @property
    def connected(self) -> bool:
        return self.sim.witness.reachable(self.node)

    def lease_valid(self, now: float | None = None) -> bool:
        t = self.sim.clock.now if now is None else now
        return self._lease_from is not None and t < self._lease_from + self.lease_seconds

    def request(self, op: str, answer: Callable[[Decision | None], None], **kw: Any) -> None:
        """Send ``op``; ``answer`` gets the Decision, or None if nothing came back."""
        sim = self.sim
        sent = sim.clock.now
        life = self.core
        d1, d2 = sim.rng.uniform(0.001, 0.02), sim.rng.uniform(0.001, 0.02)

        def at_witness() -> None:
            w = sim.witness
            if not w.reachable(self.node):
                sim.clock.at(0.5, lambda: answer(None) if life.alive else None)
                return
            now = sim.clock.now
            lg = w.logic
            if not self.registered:
                lg.register(self.node, PAIR, self.role, self.core.epoch, now)
                self.registered = True
            lg.heartbeat(self.node, now)
            epoch = self.core.epoch
            if op == "heartbeat":
                d = Decision(True, "ok", lg.epoch(PAIR), lg.holder(PAIR))
            elif op == "suspend":
                d = lg.request_suspend(self.node, PAIR, epoch, now)
            elif op == "release":
                d = lg.release_suspend(self.node, PAIR, now)
            elif op == "failover":
                d = lg.request_failover(self.node, PAIR, epoch, now, peer=kw.get("peer"))
            else:
                raise AssertionError(op)
            holds = lg.holds(self.node, PAIR)

            def back() -> None:
                if not life.alive or not sim.witness.reachable(self.node):
                    answer(None)
                    return
                self._lease_from = sent if self._lease_from is None else max(self._lease_from,
                                                                              sent)
                self.pair_epoch = max(self.pair_epoch, d.epoch)
                self.holder = d.holder
                self.holds = holds
                answer(d)
            sim.clock.at(d2, back)
        sim.clock.at(d1, at_witness)

    def heartbeat_loop(self) -> None:
        if not self.core.alive:
            return
        self.request("heartbeat", lambda d: None)
        self.sim.clock.at(LEASE / 3, self.heartbeat_loop)


# -- Cores ------------------------------------------------------------------------------
class SimCore(CoreEngine):
    """The real :class:`CoreEngine` with the simulation's clock, disk, journal and links."""

    def __init__(self, sim: Sim, name: str, role: str, disk: SimDisk, saved: dict[str, Any],
                 journal_path: Path | None) -> None:
        cfg = CoreConfig(name=name, role=role, listen=("sim", 0), control=("sim", 0),
                         state_dir="", luns=(LunConfig(1, name, LUN_BYTES),), peer=("sim", 1),
                         witness=("sim", 2) if journal_path else None,
                         journal_path=str(journal_path) if journal_path else None,
                         mirror_window_bytes=64 * BLOCK, initial_sync=False)
        self.sim = sim
        self.saved = saved
        self.alive = True
        super().__init__(cfg, saved)
        self.disk = disk
        disk.owner = self
        stream, seq = disk.sealed
        self.pipes[1] = LunPipeline.restarted(disk, stream, seq)
        self.rgen = 0  # resync driver generation (a halt bumps it)
        self.rwaiting = False
        if journal_path is not None:
            self.journal = sim.open_journal(self, journal_path)
            self.journal.on_durable(self._on_journal_durable)
            self.witness = SimWitnessClient(sim, self)
            sim.clock.at(0.0, self.witness.heartbeat_loop)
        self._save_state()
        for idx in range(2):  # two replication connections, as with one interface
            sim.clock.at(0.0, functools.partial(self.dial_peer, idx))
        sim.clock.at(0.5, self.tick_loop)

    # engine hooks
    def now(self) -> float:
        return self.sim.clock.now

    def mono(self) -> float:
        return self.sim.clock.now

    def _persist(self, state: dict[str, Any]) -> None:
        self.saved.clear()
        self.saved.update(state)  # atomic replace, durable at once

    def _release_witness(self) -> None:
        if self.witness is not None:
            self.witness.request("release", lambda d: None)

    def _later(self, fn: Callable[[], None]) -> None:
        me = self
        self.sim.clock.at(0.0, lambda: fn() if me.alive else None)

    def _resync_run(self) -> None:
        self.rgen += 1
        gen = self.rgen
        self.sim.clock.at(0.0, lambda: self._drive(gen))

    def _resync_halt(self) -> None:
        self.rgen += 1

    def _resync_wakeup(self) -> None:
        if self.rwaiting:
            self.rwaiting = False
            gen = self.rgen
            self.sim.clock.at(0.0, lambda: self._drive(gen))

    def _drive(self, gen: int) -> None:
        if gen != self.rgen or not self.alive:
            return
        what = self.resync_pump()
        if what in ("sent", "drain"):
            self.sim.clock.at(0.0005, lambda: self._drive(gen))
        elif what == "wait":
            self.rwaiting = True
            self.sim.clock.at(1.0, lambda: self._drive(gen) if self.rwaiting else None)
        else:
            j = self.journal
            ticket = j.ticket
            j.request_commit()

            def committed() -> None:
                if gen != self.rgen or not self.alive:
                    return
                if j.durable < ticket:
                    self.sim.clock.at(0.002, committed)
                    return
                self.rgen += 1
                self.resync_committed()
            self.sim.clock.at(0.002, committed)

    # the sim's own plumbing
    def event(self, name: str, **kv: Any) -> None:
        super().event(name, **kv)
        if name == "failed_over":  # however it came about (an answer, or a grant learned)
            self.sim.failover_times.append(self.sim.clock.now)

    def seal(self) -> tuple[int, int] | None:
        seq = self.pipes[1].sealed_seq()
        if seq is None or self.sim.planted("seal-late"):
            return None
        return (self.pipes[1].stream, seq)

    def durable_to(self, target: int) -> None:
        self._on_durable(1, target)

    def tick_loop(self) -> None:
        if self.alive:
            self.tick()
            self.sim.clock.at(0.5, self.tick_loop)

    def _ack_limit(self, p: Any) -> int:
        if self.sim.planted("ack-before-fsync"):
            return p.applied_seq if self.role != "primary" else min(p.applied_seq,
                                                                    p.mirror_acked)
        if self.sim.planted("no-fence") and self.rep.journals:
            return min(p.durable_seq, p.jlimit)  # the bug: acks without a live Witness lease
        return super()._ack_limit(p)

    def _on_edge_write(self, link: Any, w: Write) -> None:
        if self.sim.planted("skip-gap"):
            p = self.pipes.get(w.lun)
            if p is not None and p.upstream is link and p.admit(w) is Order.GAP:
                p.received_seq = w.seq  # the bug: a gap taken for a resend
        super()._on_edge_write(link, w)

    def _on_mirror_write(self, link: Any, w: Write) -> None:
        if self.sim.planted("skip-gap") and not w.flags & WriteFlags.RESYNC:
            p = self.pipes.get(w.lun)
            if p is not None and w.stream == p.stream and p.admit(w) is Order.GAP:
                p.received_seq = w.seq
        super()._on_mirror_write(link, w)

    def dial_peer(self, idx: int) -> None:
        if not self.alive or self.rep.state is State.TERMINATED or idx in self.peer_out:
            return
        sim = self.sim
        other = sim.other(self)
        if not other.alive or not sim.core_link_up:
            sim.clock.at(0.05, lambda: self.dial_peer(idx))
            return
        a, b = connect(sim, self.name, other.name)
        a.ctx = LinkKind.PEER_OUT
        self.peer_out[idx] = a
        a.on_message = self._on_message

        def closed(end: End, exc: BaseException | None) -> None:
            if self.alive:
                self._on_close(end, exc)
                if self.peer_out.get(idx) is end:
                    del self.peer_out[idx]
                sim.clock.at(0.02, lambda: self.dial_peer(idx))
        a.on_close = closed
        other.accept(b)
        a.send(Hello(self.name, self.role, "replication", self.epoch, {1: LUN_BYTES},
                     {"interface": "sim", "index": idx, "state": self.rep.state.value,
                      "ha": self.cfg.ha, "pair": self.cfg.pair}))

    def accept(self, end: End) -> None:
        me = self
        end.core = self
        end.on_message = lambda e, m: me._on_message(e, m) if me.alive else None
        end.on_close = lambda e, x: me._on_close(e, x) if me.alive else None
        self.sim.ends[self.name].append(end)

    def can_ack(self) -> bool:
        """Could this Core acknowledge an Edge write right now, from any Edge? (invariant 2)"""
        if not self.alive or self.role != "primary":
            return False
        if self.rep.journals:
            return not self.fenced() or self.sim.planted("no-fence")
        if self.rep.acks_need_peer:
            return bool(self.mirror_links) and self.rep.state is not State.PAUSED
        return True


# -- Edge -------------------------------------------------------------------------------
@dataclass(slots=True)
class Rec:
    lun: int
    seq: int
    offset: int
    length: int
    data: bytes


class SimEdge:
    """Host writes, acknowledged at once and kept (the blockstore's log is durable);
    shipped with the real :class:`Shipper`; follows whichever Core is primary."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.recs: list[Rec] = []  # every write acknowledged to the host, in order
        self.next_seq = 1
        self.committed = 0
        self.committed_saved = 0
        self.epoch = 0  # newest epoch seen (stale primaries are refused)
        self.ship = Shipper(window_bytes=8 * BLOCK * 4)
        self.end: End | None = None
        self.alive = True
        self.dialling = False
        self.target = 0  # which Core to try next

    def uncommitted(self) -> list[Rec]:
        return [r for r in self.recs if r.seq > self.committed]

    def host_write(self) -> None:
        if not self.alive:
            return
        rng = self.sim.rng
        n = rng.choice((1, 1, 1, 2, 4))
        blk = rng.randrange(0, LUN_BLOCKS - n + 1)
        seq = self.next_seq
        self.next_seq += 1
        rec = Rec(1, seq, blk * BLOCK, n * BLOCK, bytes([seq % 251 + 1]) * (n * BLOCK))
        self.recs.append(rec)
        if self.end is not None and self.end.ctx == "up":
            self.ship.append(rec)
            self.pump()

    def pump(self) -> None:
        end = self.end
        if end is None or end.ctx != "up" or not end.established:
            return
        for f in self.ship.next_frames({1: self.committed}):
            recs: list[Rec] = f.recs  # type: ignore[assignment]
            end.send(Write(1, 0, self.sim.stream, f.seq, f.offset,
                           b"".join(r.data for r in recs), f.prev))

    def dial(self) -> None:
        if not self.alive or self.dialling or self.end is not None:
            return
        sim = self.sim
        core = sim.cores[self.target % 2]
        self.target += 1
        if not core.alive or not sim.edge_link_up:
            self.dialling = True

            def again() -> None:
                self.dialling = False
                self.dial()
            sim.clock.at(0.05, again)
            return
        a, b = connect(sim, "edge", core.name)
        self.end = a
        a.on_message = self.on_message
        a.on_close = self.on_close
        core.accept(b)
        a.send(Hello("edge", "edge", "edge", self.epoch, {1: LUN_BYTES},
                     {"stream": sim.stream, "committed": {"1": self.committed}}))

    def on_message(self, end: End, m: Message) -> None:
        if end is not self.end:
            return
        if isinstance(m, Welcome):
            if m.epoch < self.epoch:
                end.close("stale primary")  # DESIGN invariant 2
                return
            self.epoch = m.epoch
            end.ctx = "up"
            self.ship.reset(self.uncommitted(), {1: self.committed})
            self.pump()
        elif isinstance(m, Ack):
            if m.seq > self.committed:
                self.sim.check_commit(m.seq)
                self.committed = m.seq
            self.ship.on_ack(1, m.seq)
            if self.sim.rng.random() < 0.1:
                self.committed_saved = self.committed
            self.pump()
        elif isinstance(m, Refuse):
            self.sim.note(f"edge refused: {m.code} {m.reason}")
            end.close()

    def on_close(self, end: End, exc: BaseException | None) -> None:
        if end is self.end:
            self.end = None
            self.sim.clock.at(0.02, self.dial)

    def crash(self) -> None:
        self.alive = False
        if self.end is not None:
            self.end.conn.reset()
        self.end = None
        self.committed = self.committed_saved  # replay: the log keeps every uncommitted record
        self.next_seq += self.sim.rng.randint(0, 50)  # sequence lease: numbers jump

    def restart(self) -> None:
        self.alive = True
        self.dial()


# -- the simulation ---------------------------------------------------------------------
@dataclass
class Result:
    seed: int
    writes: int
    committed: int
    faults: list[str] = field(default_factory=list)
    gaps: int = 0
    failovers: int = 0
    end_time: float = 0.0


_quiet = False


class Sim:
    """One seed. ``full``: Journal LUNs, the Witness and operator drills too."""

    def __init__(self, seed: int, *, plant: str | None = None, writes: int = 120,
                 full: bool = False) -> None:
        global _quiet
        if not _quiet:
            log.setup("sim", None, level="critical", tty=False)
            _quiet = True
        self.seed = seed
        self.rng = random.Random(seed)
        self.plant = plant
        self.plants = set(plant.split(",")) if plant else set()
        unknown = self.plants - set(PLANTS)
        if unknown:
            raise ValueError(f"unknown planted bug(s) {sorted(unknown)}; known: {PLANTS}")
        self.full = full
        self.clock = Clock()
        self.writes = writes
        self.stream = 0x5EED
        self.edge_link_up = True
        self.core_link_up = True
        self.witness_link: dict[str, bool] = {}
        self.healing = False  # the liveness phase: no more faults
        self.log: list[str] = []
        self.faults: list[str] = []
        self.conns: list[Conn] = []
        self.ends: dict[str, list[End]] = {"core-a": [], "core-b": []}
        self.acks: list[tuple[float, str, int, bool]] = []  # (time, core, seq, journaling)
        self.failover_times: list[float] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="sfsim-")) if full else None
        self.witness = SimWitness(self)
        self.disks = {"core-a": SimDisk(self), "core-b": SimDisk(self)}
        self.saved: dict[str, dict[str, Any]] = {"core-a": {}, "core-b": {}}
        self.cores: list[SimCore] = []
        self.cores = [self._core("core-a", "primary"), self._core("core-b", "secondary")]
        self.edge = SimEdge(self)
        if full:  # without failover there is one primary by construction
            self.clock.after = self.check_split_brain

    def _core(self, name: str, role: str) -> SimCore:
        jp = self.tmp / f"{name}.journal" if self.tmp is not None else None
        return SimCore(self, name, role, self.disks[name], self.saved[name], jp)

    def open_journal(self, core: SimCore, path: Path) -> Any:
        from journal.errors import JournalFull, JournalOffline
        from journal.journal import Journal

        sim = self

        class SimJournal(Journal):
            """The real journal; its commits run on the virtual clock."""

            owner: SimCore

            def mark_dirty(self, lun: int, offset: int, length: int) -> bool:
                if getattr(self, "_sim_full", False):  # the fault "journal-full"
                    if sim.planted("ack-unjournaled"):
                        return False  # planted: the region goes unrecorded, the write on
                    raise JournalFull(f"Journal LUN {self.path}: simulated full")
                return super().mark_dirty(lun, offset, length)

            def request_commit(self) -> None:
                if getattr(self, "_sim_pending", False) or self.durable >= self.ticket \
                        or self.failed is not None:
                    return
                self._sim_pending = True

                def go() -> None:
                    self._sim_pending = False
                    if not self.owner.alive or self.owner.journal is not self:
                        return
                    if getattr(self, "_sim_broken", False):  # the fault "journal-fail"
                        self._fail(JournalOffline(f"Journal LUN {self.path}: simulated EIO"))
                        return
                    self.flush()
                sim.clock.at(sim.rng.expovariate(1 / 0.002), go)

        j = SimJournal.open(path, {1: LUN_BYTES}, size=3 << 30)
        assert isinstance(j, SimJournal)
        j.owner = core
        crashed = int(j.crashed_al_regions(1).size)
        if crashed:
            core.event("journal_crash_regions", regions={1: crashed})
        return j

    def other(self, core: SimCore) -> SimCore:
        return self.cores[1] if core is self.cores[0] else self.cores[0]

    def planted(self, bug: str) -> bool:
        return bug in self.plants

    # history and checks
    def note(self, what: str) -> None:
        self.log.append(f"{self.clock.now:9.4f} {what}")

    def fail(self, why: str) -> None:
        tail = "\n".join(self.log[-20:])
        plant = f" --plant {self.plant}" if self.plant else ""
        full = " --full" if self.full else ""
        raise SimFailure(f"seed {self.seed}: {why}\n  replay: steelfusion sim --seed {self.seed}"
                         f"{full}{plant} -v\n  last events:\n{tail}")

    def acked_by(self, core: SimCore, seq: int) -> None:
        self.acks.append((self.clock.now, core.name, seq, core.rep.journals))

    def expected(self, upto: int) -> bytes:
        img = bytearray(LUN_BYTES)
        for r in self.edge.recs:
            if r.seq <= upto:
                img[r.offset:r.offset + r.length] = r.data
        return bytes(img)

    def check_split_brain(self) -> None:
        """Invariant 2: never two Cores that could acknowledge Edge writes."""
        a, b = self.cores
        if a.can_ack() and b.can_ack():
            self.fail(f"split brain: both Cores can acknowledge Edge writes ({a.name} "
                      f"{a.rep.state.value} epoch {a.epoch}, {b.name} {b.rep.state.value} "
                      f"epoch {b.epoch})")

    def check_commit(self, seq: int) -> None:
        """Invariant 1 (running): an ACK the Edge receives is durable on both Cores."""
        if self.full:
            return  # suspension acknowledges on one Core: checked at the end instead
        for core in self.cores:
            disk = core.disk
            stream, have = disk.sealed
            if stream != self.stream or have < seq:
                self.fail(f"Edge got ACK {seq} but {core.name}'s durable applied seq is {have}")
            if not disk.future and bytes(disk.durable) != self.expected(have):
                self.fail(f"Edge got ACK {seq}: {core.name}'s durable image is not the "
                          f"host's writes up to seq {have}")

    # faults and drills
    def fault(self) -> None:
        rng = self.rng
        kinds = ["crash-b", "crash-b", "crash-a", "crash-edge", "reset-edge", "reset-peer",
                 "cut-peer", "cut-edge", "fsync-fail", "none"]
        if self.full:
            kinds += ["suspend", "suspend", "resume", "resume", "failover", "failover",
                      "cut-witness", "crash-witness", "isolate-primary", "fsync-fail",
                      "journal-fail", "journal-full"]
        kind = rng.choice(kinds)
        self.note(f"fault {kind}")
        self.faults.append(kind)
        down = rng.uniform(0.05, 1.0)
        a, b = self.cores
        if kind in ("crash-a", "crash-b"):
            self.crash(a if kind == "crash-a" else b, down)
        elif kind == "crash-edge" and self.edge.alive:
            self.edge.crash()
            self.clock.at(down, self.edge.restart)
        elif kind == "reset-edge" and self.edge.end is not None:
            self.edge.end.conn.reset()
        elif kind == "reset-peer":
            for end in list(a.peer_out.values())[:1]:
                end.conn.reset()
        elif kind == "cut-peer":
            self.core_link_up = False
            for core in self.cores:
                for end in list(core.peer_out.values()):
                    end.conn.reset()
            self.clock.at(down, lambda: setattr(self, "core_link_up", True))
        elif kind == "cut-edge":
            self.edge_link_up = False
            if self.edge.end is not None:
                self.edge.end.conn.reset()
            self.clock.at(down, lambda: setattr(self, "edge_link_up", True))
        elif kind == "cut-witness":
            who = rng.choice([c.name for c in self.cores])
            self.witness_link[who] = False
            self.clock.at(down * 3, functools.partial(self.witness_link.pop, who, True))
        elif kind == "isolate-primary":
            # the split-brain drill: the primary still serves its Edge but reaches neither its
            # peer nor the Witness; the secondary may fail over meanwhile
            p = self.primary()
            if p is not None:
                self.drill_suspend()
                self.clock.at(0.1, functools.partial(self.isolate, p, down))
                self.clock.at(rng.uniform(LEASE, 3 * LEASE), self.drill_failover)
        elif kind == "crash-witness":
            self.witness.crash_restart()
        elif kind == "fsync-fail":
            victim = rng.choice(self.cores)
            victim.disk.fail_next = True
            self.note(f"  next sync of {victim.name} fails")
        elif kind in ("journal-fail", "journal-full"):
            j = rng.choice(self.cores).journal
            if j is not None and kind == "journal-fail":
                j._sim_broken = True
            elif j is not None:
                j._sim_full = True
        elif kind == "suspend":
            self.drill_suspend()
        elif kind == "resume":
            self.drill_resume()
        elif kind == "failover":
            self.drill_failover()

    def isolate(self, p: SimCore, down: float) -> None:
        """The primary still serves its Edge but reaches neither its peer nor the Witness."""
        self.note(f"isolate {p.name}")
        self.witness_link[p.name] = False
        self.core_link_up = False
        for core in self.cores:
            for end in list(core.peer_out.values()):
                end.conn.reset()

        def heal_isolation() -> None:
            self.witness_link.pop(p.name, None)
            self.core_link_up = True
        self.clock.at(down * 4, heal_isolation)

    def crash(self, core: SimCore, down: float) -> None:
        if not core.alive:
            return
        core.alive = False
        for end in list(self.ends[core.name]) + list(core.peer_out.values()):
            end.conn.reset()
        self.ends[core.name] = []
        if core.journal is not None:
            core.journal.abandon()  # what was not committed is gone
        core.disk.crash(dict(core.pipes[1].issued))
        idx = self.cores.index(core)

        def restart() -> None:
            if self.cores[idx] is core:
                role = self.saved[core.name].get("role", core.role)
                self.cores[idx] = self._core(core.name, role)
                self.note(f"{core.name} restarted as {self.cores[idx].role} "
                          f"{self.cores[idx].rep.state.value}")
        self.clock.at(down, restart)

    def primary(self) -> SimCore | None:
        for c in self.cores:
            if c.alive and c.role == "primary":
                return c
        return None

    def drill_suspend(self) -> None:
        c = self.primary()
        if c is None or c.witness is None:
            return
        try:
            if c.suspend_check() is not None:
                return
        except control.ControlError:
            return

        def answer(d: Decision | None) -> None:
            if not c.alive:
                return
            with_d = d if d is not None else Decision(False, "witness-unreachable", 0)
            try:
                c.suspend_decided(with_d)
                self.note(f"{c.name} suspended")
            except control.ControlError as e:
                self.note(f"{c.name} suspend refused: {e}")
        c.witness.request("suspend", answer)

    def drill_resume(self) -> None:
        c = self.primary()
        if c is None:
            return
        try:
            c.resume_check()
            c.resume_apply()
            self.note(f"{c.name} resumed: {c.rep.state.value}")
        except control.ControlError as e:
            self.note(f"{c.name} resume refused: {e}")

    def drill_failover(self) -> None:
        c = next((x for x in self.cores if x.alive and x.role == "secondary"), None)
        if c is None or c.witness is None:
            return
        try:
            c.failover_begin(False)
        except control.ControlError:
            return

        def answer(d: Decision | None) -> None:
            if not c.alive or c.role != "secondary":
                c.failover_pending = False
                return
            with_d = d if d is not None else Decision(False, "witness-unreachable", 0)
            try:  # as core.node.Core.cmd_failover: no second check once the Witness answered
                c.failover_decided(with_d, False)
            except control.ControlError as e:
                self.note(f"{c.name} failover refused: {e}")
                return
            self.note(f"{c.name} failed over: epoch {c.epoch}")
        c.witness.request("failover", answer, peer=self.other(c).name)

    # the run
    def run(self) -> Result:
        try:
            return self._run()
        finally:
            for core in self.cores:
                if core.journal is not None and not core.journal.closed:
                    core.journal.abandon()
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)

    def _run(self) -> Result:
        rng = self.rng
        self.clock.at(0.01, self.edge.dial)
        t = 0.05
        for _ in range(self.writes):  # safety phase: writes, faults and drills interleaved
            t += rng.expovariate(1 / (0.02 if self.full else 0.004))
            self.clock.at(t - self.clock.now, self.edge.host_write)
            if rng.random() < (0.1 if self.full else 0.06):
                self.clock.at(t - self.clock.now + rng.uniform(0, 0.01), self.fault)
        self.clock.run_until(t + 0.01)
        self.heal()
        last = self.edge.recs[-1].seq if self.edge.recs else 0

        def settled() -> bool:
            a, b = self.cores
            return (self.edge.committed >= last and a.alive and b.alive
                    and {a.replication, b.replication} <= {"running", "replica"}
                    and not any(c.pipes[1].mirror_q for c in self.cores))
        self.clock.run_until(self.clock.now + 120.0, stop=settled)
        if not settled():
            a, b = self.cores
            self.fail(f"not healed after 120 s: Edge committed {self.edge.committed} of {last}; "
                      f"{a.name} {a.role} {a.replication}, {b.name} {b.role} {b.replication}")
        self.clock.run_until(self.clock.now + 0.5)  # let the last syncs land
        self.check_end(last)
        return Result(self.seed, len(self.edge.recs), self.edge.committed, self.faults,
                      sum(1 for ln in self.log if "sequence-gap" in ln), len(self.failover_times),
                      self.clock.now)

    def heal(self) -> None:
        """Liveness phase: every link back, every node up, the operator resumes."""
        self.healing = True
        self.edge_link_up = self.core_link_up = True
        self.witness_link.clear()
        for disk in self.disks.values():
            disk.fail_next = False  # no more faults
        for core in self.cores:
            if core.journal is not None:
                core.journal._sim_broken = False
        self.clock.run_until(self.clock.now + 2.0)  # pending restarts happen
        for core in list(self.cores):
            j = core.journal
            broken = j is not None and (j.failed is not None or getattr(j, "_sim_full", False))
            if core.alive and (core.disk.failed or broken):
                self.note(f"operator restarts {core.name} (storage failed)")
                self.crash(core, 0.1)  # the documented recovery: fix the storage, restart
        self.clock.run_until(self.clock.now + 1.0)
        if not self.edge.alive:
            self.edge.restart()
        if self.planted("lost-frames"):
            # a frame lost at the tail of a stream has no successor to reveal the gap: the
            # heal flaps every connection once, and the resend fills it
            for conn in self.conns:
                conn.reset()
        for _ in range(20):
            self.clock.run_until(self.clock.now + 1.0)
            p = self.primary()
            if p is not None and p.rep.state is State.SUSPENDED:
                self.drill_resume()

    def check_end(self, last: int) -> None:
        """Invariants 1 and 4 once healed: both Cores hold what the host was promised."""
        a, b = self.cores
        if bytes(a.disk.image) != bytes(b.disk.image):
            self.fail("after healing and resync the Cores differ")
        # Writes a suspended primary acknowledged may be lost if a failover followed (the
        # seed's documented cost of failing over while suspended); nothing else may be.
        at_risk: set[int] = set()
        for when, _core, seq, journaling in self.acks:
            if journaling and any(f > when for f in self.failover_times):
                at_risk.update(r.seq for r in self.edge.recs if r.seq <= seq)
        img = bytes(a.disk.image)
        for blk in range(LUN_BLOCKS):
            lo, hi = blk * BLOCK, (blk + 1) * BLOCK
            writes = [r for r in self.edge.recs if r.offset < hi and r.offset + r.length > lo]
            if not writes:
                if img[lo:hi] != bytes(BLOCK):
                    self.fail(f"block {blk} holds data no host wrote")
                continue
            must = [i for i, r in enumerate(writes) if r.seq not in at_risk]
            k = must[-1] if must else -1
            allowed = {r.data[lo - r.offset:hi - r.offset] for r in writes[max(k, 0):]}
            if k < 0:
                allowed.add(bytes(BLOCK))
            if img[lo:hi] not in allowed:
                self.fail(f"block {blk}: an acknowledged write is lost (want seq "
                          f"{writes[k].seq if k >= 0 else 'none'} or later)")


def run_seed(seed: int, plant: str | None = None, writes: int = 120, full: bool = False
             ) -> Result:
    return Sim(seed, plant=plant, writes=writes, full=full).run()


def _one(args: tuple[int, str | None, int, bool]) -> tuple[int, str | None]:
    seed, plant, writes, full = args
    try:
        run_seed(seed, plant, writes, full)
    except SimFailure as e:
        return seed, str(e)
    except Exception:  # an exception out of the code under test is a finding too
        import traceback

        replay = f"steelfusion sim --seed {seed}{' --full' if full else ''}" + (
            f" --plant {plant}" if plant else "")
        return seed, f"seed {seed}: raised\n  replay: {replay} -v\n{traceback.format_exc()}"
    return seed, None


def run_many(seeds: range, plant: str | None = None, writes: int = 120, full: bool = False,
             jobs: int = 0, stop_after: int = 5) -> tuple[int, list[str]]:
    """Run ``seeds`` over ``jobs`` processes (0: one per CPU); (seeds run, failure texts)."""
    import multiprocessing

    jobs = jobs or os.cpu_count() or 1
    work = [(s, plant, writes, full) for s in seeds]
    failures: list[str] = []
    ran = 0
    if jobs == 1:
        results: Any = map(_one, work)
    else:
        pool = multiprocessing.get_context("fork").Pool(jobs)
        results = pool.imap(_one, work, chunksize=16)
    try:
        for _, err in results:
            ran += 1
            if err is not None:
                failures.append(err)
                if len(failures) >= stop_after:
                    break
    finally:
        if jobs != 1:
            pool.terminate()
    return ran, failures


__all__ = ["PLANTS", "Result", "Sim", "SimFailure", "run_many", "run_seed"]
