"""Seeded, deterministic simulation of the synchronous write path (issue 9).

An Edge, a primary Core and a secondary Core run **in memory** on a virtual
clock with one ``random.Random(seed)``: the habit of FoundationDB's simulator
and TigerBeetle's VOPR (../shared/STYLE.md). What runs is the project's own
code for the rules that decide what is applied and acknowledged:

- the Edge's shipping rules (:class:`edge.shipping.Shipper`: order,
  coalescing, ``prev`` chaining, window, resend on reconnection);
- each Core's per-LUN stream (:class:`core.pipeline.LunPipeline`: admission
  by ``prev``/``seq``, apply, group-committed durability with the applied
  seq sealed in the same job, contiguous acknowledgements, mirror queue);
- the wire codec (:mod:`steelfusion.wire`): every frame is encoded and
  decoded by :class:`~steelfusion.wire.FrameDecoder` from arbitrary chunkings
  (a frame split across reads, many frames in one read).

Around them the simulation supplies a network and disks that misbehave:
delays, connection resets, partitions of the Edge or the inter-Core link,
crashes of any node at any point (a Core loses what it had not fsynced,
and an unsynced write may or may not have reached the disk), and slow
fsyncs. The node glue (which event calls which rule) is the Core's running
state as in :mod:`core.node`; suspension, the journal and failover are not
simulated yet.

A checker records history and asserts DESIGN.md's invariants:

1. every write acknowledged by the primary (committed at the Edge) is durable
   on both Cores when the Edge learns it (running, synchronous);
3. a Core's durable image is always the image of a prefix of the Edge's
   write order (checked at sync points, once a crashed Core caught up);
4. after healing, both Cores hold exactly what the host wrote, byte for byte;
6. no Core applies past a hole (the ``prev`` chain) — checked through 1-4.

A failing seed prints the command that replays it.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.pipeline import LunPipeline, Order
from edge.shipping import Shipper
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

BLOCK = 512
LUN_BLOCKS = 64
LUN_BYTES = BLOCK * LUN_BLOCKS
STREAM = 0x5EED


class SimFailure(AssertionError):
    """An invariant broke; the message names the seed and how to replay it."""


class Clock:
    """Virtual time and the one event queue; ties broken by insertion order."""

    def __init__(self) -> None:
        self.now = 0.0
        self._q: list[tuple[float, int, Callable[[], None]]] = []
        self._n = 0

    def at(self, delay: float, fn: Callable[[], None]) -> None:
        self._n += 1
        heapq.heappush(self._q, (self.now + delay, self._n, fn))

    def run_until(self, t: float, stop: Callable[[], bool] | None = None) -> None:
        while self._q and self._q[0][0] <= t:
            when, _, fn = heapq.heappop(self._q)
            self.now = when
            fn()
            if stop is not None and stop():
                return
        self.now = max(self.now, t)


# -- disk ---------------------------------------------------------------------------
class SimDisk:
    """A LUN with a page cache: writes are volatile until a sync covers them.

    Implements :class:`core.pipeline.Backend`. A crash keeps what was synced
    plus, for each unsynced write, whatever the disk had written (random).
    The applied seq a sync seals is stored with the same durability.
    """

    def __init__(self, sim: Sim, owner: SimCore) -> None:
        self.sim = sim
        self.owner = owner
        self.size = LUN_BYTES
        self.image = bytearray(LUN_BYTES)  # what reads see
        self.durable = bytearray(LUN_BYTES)
        self.pending: list[tuple[int, int, bytes]] = []  # (counter, offset, data)
        self.written = 0
        self.synced = 0
        self.syncing = False
        self.sealed = (0, 0)  # durable (stream, seq) of the applied state

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

    def request_sync(self) -> None:
        if self.syncing or self.synced >= self.written:
            return
        self.syncing = True
        target = self.written
        seal = self.owner.seal()  # as core.node._seal: sealed with the data, before any ack
        life = self.owner.life
        self.sim.clock.at(self.sim.rng.expovariate(1 / 0.002), lambda: self._synced(target, seal,
                                                                                     life))

    def _synced(self, target: int, seal: tuple[int, int] | None, life: int) -> None:
        if life != self.owner.life:
            return  # the Core crashed meanwhile
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
        self.owner.on_durable(target)
        self.request_sync()

    def crash(self) -> None:
        rng = self.sim.rng
        seq_of = dict(self.owner.pipe.issued)
        for counter, off, b in self.pending:  # the disk may have written any of them
            if rng.random() < 0.5:
                self.durable[off:off + len(b)] = b
                self.owner.future = max(self.owner.future, seq_of.get(counter, 1 << 62))
        self.pending = []
        self.image = bytearray(self.durable)
        self.written = self.synced = 0
        self.syncing = False


# -- network ------------------------------------------------------------------------
class End:
    """One side of a simulated TCP connection: frames in order, reads in random chunks."""

    def __init__(self, sim: Sim, conn: Conn, name: str,
                 on_message: Callable[[End, Message], None]) -> None:
        self.sim = sim
        self.conn = conn
        self.name = name
        self.on_message = on_message
        self.peer: End | None = None
        self.decoder = FrameDecoder()
        self.ctx: Any = None

    @property
    def open(self) -> bool:
        return self.conn.open

    def send(self, msg: Message) -> None:
        if not self.conn.open or self.conn.closing or self.peer is None:
            return
        raw = encode_bytes(msg)
        peer = self.peer
        rng = self.sim.rng
        # split into random chunks, delivered in order after the link's latency
        pos = 0
        while pos < len(raw):
            n = len(raw) - pos if rng.random() < 0.5 else rng.randint(1, len(raw) - pos)
            chunk = raw[pos:pos + n]
            pos += n
            self.conn.deliver(peer, chunk)

    def receive(self, chunk: bytes) -> None:
        for m in self.decoder.feed(chunk):
            if not self.conn.open:
                return
            if isinstance(m, Write) and m.flags & WriteFlags.MIRROR and self.conn.lose_next > 0:
                self.conn.lose_next -= 1  # a receiver that drops WRITEs (the link.py bug)
                continue
            self.on_message(self, m)

    def refuse(self, code: str, reason: str, info: dict[str, Any] | None = None) -> None:
        self.send(Refuse(code, reason, info or {}))
        self.conn.close(f"refused: {reason}")

    def close(self, reason: str = "") -> None:
        self.conn.close(reason)


class Conn:
    """A connection: two Ends; ``deliver`` keeps per-direction order."""

    def __init__(self, sim: Sim, on_close: Callable[[Conn], None]) -> None:
        self.sim = sim
        self.open = True
        self.closing = False  # closed by one side: what it sent still arrives, then EOF
        self.on_close = on_close
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

    def close(self, reason: str = "") -> None:
        """Graceful (what was sent is delivered first), like closing a flushed socket."""
        if self.open and not self.closing:
            self.closing = True
            t = max([self.sim.clock.now, *self._last.values()])
            self.sim.clock.at(t - self.sim.clock.now + 1e-6, self.reset)

    def reset(self) -> None:
        """Gone at once (a crash, a cut cable): what is in flight is lost."""
        if self.open:
            self.open = False
            self.sim.clock.at(0.0, lambda: self.on_close(self))


def connect(sim: Sim, a_name: str, a_on: Callable[[End, Message], None], b_name: str,
            b_on: Callable[[End, Message], None], on_close: Callable[[Conn], None]
            ) -> tuple[End, End]:
    conn = Conn(sim, on_close)
    a = End(sim, conn, a_name, a_on)
    b = End(sim, conn, b_name, b_on)
    a.peer, b.peer = b, a
    return a, b


# -- Edge -------------------------------------------------------------------------------
@dataclass(slots=True)
class Rec:
    lun: int
    seq: int
    offset: int
    length: int
    data: bytes


class SimEdge:
    """Host writes, acknowledged at once and kept (the blockstore's log is durable)."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.recs: list[Rec] = []  # every write ever acknowledged to the host, in order
        self.next_seq = 1
        self.committed = 0
        self.committed_saved = 0
        self.ship = Shipper(window_bytes=8 * BLOCK * 4)
        self.end: End | None = None
        self.alive = True
        self.connecting = False

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
        data = bytes([seq % 251 + 1]) * (n * BLOCK)
        rec = Rec(1, seq, blk * BLOCK, n * BLOCK, data)
        self.recs.append(rec)
        if self.end is not None and self.end.open and self.end.ctx == "up":
            self.ship.append(rec)
            self.pump()

    def pump(self) -> None:
        end = self.end
        if end is None or not end.open or end.ctx != "up":
            return
        for f in self.ship.next_frames({1: self.committed}):
            recs: list[Rec] = f.recs  # type: ignore[assignment]
            end.send(Write(1, 0, STREAM, f.seq, f.offset, b"".join(r.data for r in recs), f.prev))

    def dial(self) -> None:
        if not self.alive or self.connecting or (self.end is not None and self.end.open):
            return
        core = self.sim.primary
        if not core.alive or not self.sim.edge_link_up:
            self.connecting = True
            self.sim.clock.at(0.05, self._redial)
            return
        a, b = connect(self.sim, "edge", self.on_message, core.name, core.on_message,
                       self.on_close)
        self.end = a
        core.accept(b)
        a.send(Hello("edge", "edge", "edge", 1, {1: LUN_BYTES},
                     {"stream": STREAM, "committed": {"1": self.committed}}))

    def _redial(self) -> None:
        self.connecting = False
        self.dial()

    def on_message(self, end: End, m: Message) -> None:
        if isinstance(m, Welcome):
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

    def on_close(self, conn: Conn) -> None:
        if self.end is not None and self.end.conn is conn:
            self.end = None
            self.sim.clock.at(0.02, self.dial)

    def crash(self) -> None:
        self.alive = False
        if self.end is not None:
            self.end.conn.reset()
        self.end = None
        self.committed = self.committed_saved  # replay: the log keeps every uncommitted record
        self.next_seq += self.sim.rng.randint(0, 50)  # sequence lease: numbers jump, never repeat

    def restart(self) -> None:
        self.alive = True
        self.dial()


# -- Cores ------------------------------------------------------------------------------
class SimCore:
    """A Core's running state around the real :class:`LunPipeline` (as :mod:`core.node`)."""

    def __init__(self, sim: Sim, name: str, primary: bool) -> None:
        self.sim = sim
        self.name = name
        self.primary = primary
        self.alive = True
        self.life = 0
        self.future = 0  # a crash left writes up to this seq on disk, past the sealed seq
        self.disk = SimDisk(sim, self)
        self.pipe: LunPipeline[SimDisk] = LunPipeline.restarted(self.disk, 0, 0)
        self.edge: End | None = None
        self.mirror: End | None = None  # primary: to the secondary; secondary: from primary
        self.dialling = False
        self.ends: list[End] = []  # every connection of this process (a crash closes them)
        self.dialled: End | None = None  # primary: the connection to the peer, welcomed or not

    # durability
    def seal(self) -> tuple[int, int] | None:
        seq = self.pipe.sealed_seq()
        if seq is None:
            return None
        if self.sim.planted("seal-late"):
            return None
        return (self.pipe.stream, seq)

    def on_durable(self, target: int) -> None:
        self.pipe.durable_to(target)
        if self.future and self.disk.sealed[1] >= self.future:
            self.future = 0
        self.sim.check_prefix(self)
        self.progress()

    def ack_limit(self) -> int:
        p = self.pipe
        limit = p.applied_seq if self.sim.planted("ack-before-fsync") else p.durable_seq
        if self.primary:
            return min(limit, p.mirror_acked)
        return limit

    def progress(self) -> None:
        last = self.pipe.take_acks(self.ack_limit())
        up = self.edge if self.primary else self.mirror
        if last is not None and up is not None:
            up.send(Ack(1, self.pipe.stream, last))

    # connections
    def accept(self, end: End) -> None:
        self.ends.append(end)
        end.conn.on_close = self.on_close_of(end.conn.on_close)

    def on_close_of(self, other: Callable[[Conn], None]) -> Callable[[Conn], None]:
        def both(conn: Conn) -> None:
            other(conn)
            self.on_close(conn)
        return both

    def on_close(self, conn: Conn) -> None:
        self.ends = [e for e in self.ends if e.conn is not conn]
        if self.dialled is not None and self.dialled.conn is conn:
            self.dialled = None
            self.mirror = None
            self.sim.clock.at(0.02, self.dial_peer)
        if self.edge is not None and self.edge.conn is conn:
            self.edge = None
            self.pipe.waiting.clear()
        if self.mirror is not None and self.mirror.conn is conn:
            self.mirror = None
            if not self.primary:
                self.pipe.waiting.clear()

    def dial_peer(self) -> None:
        if not self.primary or not self.alive or self.dialling or self.dialled is not None:
            return
        sec = self.sim.secondary
        if not sec.alive or not self.sim.core_link_up:
            self.dialling = True

            def again() -> None:
                self.dialling = False
                self.dial_peer()
            self.sim.clock.at(0.05, again)
            return
        a, b = connect(self.sim, self.name, self.on_message, sec.name, sec.on_message,
                       self.on_close)
        sec.accept(b)
        self.ends.append(a)
        self.dialled = a
        a.ctx = "peer-out"
        a.send(Hello(self.name, "primary", "replication", 1, {1: LUN_BYTES}))

    def on_message(self, end: End, m: Message) -> None:
        if not self.alive:
            return
        p = self.pipe
        if isinstance(m, Hello):
            if m.purpose == "edge":
                if self.edge is not None:
                    self.edge.close("replaced")
                self.edge = end
                end.ctx = "edge"
                stream = m.info.get("stream")
                if isinstance(stream, int) and stream != p.stream:
                    p.switch_stream(stream)
                p.waiting.clear()
                end.send(Welcome(self.name, "primary", 1, {1: (p.stream, p.durable_seq)}))
            else:
                if self.mirror is not None:
                    self.mirror.close("replaced")
                self.mirror = end
                end.ctx = "mirror-in"
                p.waiting.clear()
                end.send(Welcome(self.name, "secondary", 1, {1: (p.stream, p.durable_seq)}))
        elif isinstance(m, Welcome) and end.ctx == "peer-out":
            self.mirror = end
            stream, seq = m.applied.get(1, (0, 0))
            if stream == p.stream and seq > p.mirror_acked:
                p.mirror_acked_to(seq)
            for w in list(p.mirror_q):
                end.send(w)
            self.progress()
        elif isinstance(m, Write) and end.ctx == "edge":
            self.edge_write(end, m)
        elif isinstance(m, Write) and end.ctx == "mirror-in":
            self.mirror_write(end, m)
        elif isinstance(m, Ack) and end.ctx == "peer-out":
            if not p.ack_possible(m.seq):
                self.sim.fail(f"{self.name}: peer acknowledged seq {m.seq} never sent")
            p.mirror_acked_to(m.seq)
            self.progress()
        elif isinstance(m, Refuse):
            self.sim.note(f"{self.name} refused by peer: {m.code} {m.reason}")
            if m.code == "sequence-gap" and end.ctx == "peer-out":
                have = m.info.get("have")
                if isinstance(have, int) and not p.resend_reaches(have):
                    self.sim.fail(f"{self.name}: the secondary lacks seqs before {have} that "
                                  "no resend can give it")
            end.close()

    def _admit(self, end: End, w: Write, **kw: Any) -> bool:
        verdict = self.pipe.admit(w, **kw)
        if self.sim.planted("skip-gap") and verdict is Order.GAP:
            self.pipe.received_seq = w.seq  # the bug: a gap taken for a resend
            verdict = Order.NEXT
        if verdict is Order.GAP or verdict is Order.MALFORMED:
            self.sim.gaps += 1
            end.refuse("sequence-gap", f"seq {w.seq} after {w.prev}",
                       {"lun": 1, "have": self.pipe.received_seq, "source": end.ctx})
            return False
        return True

    def edge_write(self, end: End, w: Write) -> None:
        p = self.pipe
        if not self._admit(end, w):
            return
        p.waiting.append(w.seq)
        p.apply(w)
        if p.wants_copy(w):
            copy = p.queue_copy(1, w)
            if self.mirror is not None and self.mirror.ctx == "peer-out":
                self.mirror.send(copy)
        self.progress()

    def mirror_write(self, end: End, w: Write) -> None:
        p = self.pipe
        if w.stream != p.stream:
            p.switch_stream(w.stream)
        if not self._admit(end, w, resynced_hole_ok=True):
            return
        p.waiting.append(w.seq)
        p.apply(w)
        self.progress()

    def crash(self) -> None:
        self.alive = False
        self.life += 1
        for e in list(self.ends):
            e.conn.reset()
        self.ends = []
        self.edge = self.mirror = self.dialled = None
        self.disk.crash()
        stream, seq = self.disk.sealed
        self.pipe = LunPipeline.restarted(self.disk, stream, seq)

    def restart(self) -> None:
        self.alive = True
        self.dial_peer()


# -- the simulation ---------------------------------------------------------------------
@dataclass
class Result:
    seed: int
    writes: int
    committed: int
    faults: list[str] = field(default_factory=list)
    gaps: int = 0
    end_time: float = 0.0


class Sim:
    def __init__(self, seed: int, *, plant: str | None = None, writes: int = 120) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.plant = plant
        self.plants = set(plant.split(",")) if plant else set()
        unknown = self.plants - set(PLANTS)
        if unknown:
            raise ValueError(f"unknown planted bug(s) {sorted(unknown)}; known: {PLANTS}")
        self.clock = Clock()
        self.writes = writes
        self.edge_link_up = True
        self.core_link_up = True
        self.healing = False  # the liveness phase: no more faults
        self.gaps = 0
        self.log: list[str] = []
        self.primary = SimCore(self, "core-a", True)
        self.secondary = SimCore(self, "core-b", False)
        self.edge = SimEdge(self)

    def planted(self, bug: str) -> bool:
        """A bug planted on purpose, to show the checker finds it."""
        return bug in self.plants

    # history and checks
    def note(self, what: str) -> None:
        self.log.append(f"{self.clock.now:9.4f} {what}")

    def fail(self, why: str) -> None:
        tail = "\n".join(self.log[-15:])
        plant = f" --plant {self.plant}" if self.plant else ""
        raise SimFailure(f"seed {self.seed}: {why}\n  replay: steelfusion sim --seed {self.seed}"
                         f"{plant} -v\n  last events:\n{tail}")

    def expected(self, upto: int) -> bytes:
        img = bytearray(LUN_BYTES)
        for r in self.edge.recs:
            if r.seq <= upto:
                img[r.offset:r.offset + r.length] = r.data
        return bytes(img)

    def check_commit(self, seq: int) -> None:
        """Invariant 1 (running): the primary acknowledged ``seq``: both Cores have it durable."""
        for core in (self.primary, self.secondary):
            stream, have = core.disk.sealed
            if stream != STREAM or have < seq:
                self.fail(f"Edge got ACK {seq} but {core.name}'s durable applied seq is {have}")
            if not core.future:
                img = bytes(core.disk.durable)
                if img != self.expected(have):
                    self.fail(f"Edge got ACK {seq}: {core.name}'s durable image is not the "
                              f"host's writes up to seq {have}")

    def check_prefix(self, core: SimCore) -> None:
        """Invariant 3: a durable image is the Edge's writes up to some seq (after catching up)."""
        if core.future or self.rng.random() > 0.2:
            return
        stream, have = core.disk.sealed
        if stream == STREAM and bytes(core.disk.durable) != self.expected(have):
            self.fail(f"{core.name}'s durable image is not a prefix of the Edge's writes "
                      f"(sealed seq {have})")

    # faults
    def fault(self) -> None:
        rng = self.rng
        kind = rng.choice(["crash-b", "crash-b", "crash-a", "crash-edge", "reset-edge",
                           "reset-peer", "cut-peer", "cut-edge", "none"])
        self.note(f"fault {kind}")
        self.faults.append(kind)
        down = rng.uniform(0.05, 1.0)
        if kind == "crash-b" and self.secondary.alive:
            self.secondary.crash()
            self.clock.at(down, self.secondary.restart)
        elif kind == "crash-a" and self.primary.alive:
            self.primary.crash()
            self.clock.at(down, self.primary.restart)
        elif kind == "crash-edge" and self.edge.alive:
            self.edge.crash()
            self.clock.at(down, self.edge.restart)
        elif kind == "reset-edge" and self.edge.end is not None:
            self.edge.end.conn.reset()
        elif kind == "reset-peer" and self.primary.dialled is not None:
            self.primary.dialled.conn.reset()
        elif kind == "cut-peer":
            self.core_link_up = False
            if self.primary.dialled is not None:
                self.primary.dialled.conn.reset()

            def heal() -> None:
                self.core_link_up = True
            self.clock.at(down, heal)
        elif kind == "cut-edge":
            self.edge_link_up = False
            if self.edge.end is not None:
                self.edge.end.conn.reset()

            def heal_e() -> None:
                self.edge_link_up = True
            self.clock.at(down, heal_e)

    faults: list[str]

    def run(self) -> Result:
        self.faults = []
        rng = self.rng
        self.primary.dial_peer()
        self.edge.dial()
        t = 0.0
        for _ in range(self.writes):  # safety phase: writes and faults interleaved
            t += rng.expovariate(1 / 0.004)
            self.clock.at(t - self.clock.now, self.edge.host_write)
            if rng.random() < 0.06:
                self.clock.at(t - self.clock.now + rng.uniform(0, 0.01), self.fault)
        self.clock.run_until(t + 0.01)
        # liveness phase: heal everything, restart what is down, no more faults
        self.healing = True
        self.edge_link_up = self.core_link_up = True
        for node in (self.primary, self.secondary):
            if not node.alive:
                node.restart()
        if not self.edge.alive:
            self.edge.restart()
        if self.plants & {"lost-frames"}:
            # a frame lost at the tail of a stream has no successor to reveal the gap: the
            # heal flaps every connection once, and the resend fills it
            for end in (self.edge.end, self.primary.dialled):
                if end is not None:
                    end.conn.reset()
        last = self.edge.recs[-1].seq if self.edge.recs else 0
        self.clock.run_until(self.clock.now + 60.0, stop=lambda: self.edge.committed >= last
                             and not self.primary.pipe.mirror_q)
        if self.edge.committed < last:
            self.fail(f"not healed after 60 s: Edge committed {self.edge.committed} of {last}")
        self.clock.run_until(self.clock.now + 0.5)  # let the last syncs land
        want = self.expected(last)
        for core in (self.primary, self.secondary):
            if bytes(core.disk.image) != want:
                bad = [i for i in range(LUN_BLOCKS)
                       if core.disk.image[i * BLOCK:(i + 1) * BLOCK] != want[i * BLOCK:(i + 1) * BLOCK]]
                self.fail(f"after healing, {core.name} differs from what the host wrote in "
                          f"blocks {bad}")
        return Result(self.seed, len(self.edge.recs), self.edge.committed, self.faults,
                      self.gaps, self.clock.now)


def run_seed(seed: int, plant: str | None = None, writes: int = 120) -> Result:
    return Sim(seed, plant=plant, writes=writes).run()


PLANTS = ("ack-before-fsync", "skip-gap", "lost-frames", "seal-late")


__all__ = ["PLANTS", "Result", "Sim", "SimFailure", "run_seed"]
