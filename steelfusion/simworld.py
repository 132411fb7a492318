"""The simulated world of :mod:`steelfusion.sim`: time, disks and the network.

Nothing here knows what a Core or an Edge is for: a virtual :class:`Clock`
with one event queue, a LUN with a page cache that loses unsynced writes in
a crash (:class:`SimDisk`), and connections that chunk, delay, close and
reset (:class:`End`, :class:`Conn`, :func:`connect`).  Every random choice
draws from the seed's one ``random.Random`` (``sim.rng``), so a seed replays
exactly (issue 9, ../shared/STYLE.md: FoundationDB's simulator, TigerBeetle's
VOPR).

What this module needs of the driver (:class:`steelfusion.sim.Sim`) and of a
disk's owner (:class:`steelfusion.simnodes.SimCore`) is written here as
:class:`World` and :class:`DiskOwner`, so the imports run one way: sim ->
simnodes -> simworld.
"""

from __future__ import annotations

import functools
import heapq
import random
from collections.abc import Callable
from typing import Any, Protocol

from core.engine import LinkKind
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


class World(Protocol):
    """What the world uses of the driver (:class:`steelfusion.sim.Sim`): the
    clock, the seed's one random source, the history, the planted bugs."""

    @property
    def clock(self) -> Clock: ...
    @property
    def rng(self) -> random.Random: ...
    @property
    def healing(self) -> bool: ...  # the liveness phase: no more faults
    @property
    def conns(self) -> list[Conn]: ...

    def note(self, what: str) -> None: ...

    def planted(self, bug: str) -> bool: ...


# -- disk ---------------------------------------------------------------------------
class DiskOwner(Protocol):
    """The Core a :class:`SimDisk` belongs to (:class:`steelfusion.simnodes.SimCore`):
    it seals the applied seq into a sync and hears how the sync ended."""

    @property
    def name(self) -> str: ...

    def seal(self) -> tuple[int, int] | None: ...

    def durable_to(self, target: int) -> None: ...

    def store_failed(self, err: OSError) -> None: ...


class SimDisk:
    """A LUN with a page cache (:class:`core.pipeline.Backend`).

    A write is volatile until a sync that started after it completes; the
    applied seq is sealed in the same sync (as :class:`core.lunstore.LunStore`
    with the Core's seal). A crash keeps what was synced plus, for each
    unsynced write, whatever the disk had written (a coin toss).
    """

    remote = False  # reads answer at once

    def __init__(self, sim: World) -> None:
        self.sim = sim
        self.owner: DiskOwner | None = None
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

    def discard(self, offset: int, length: int) -> int:
        """Deallocated: reads zeros (as a hole punched in a LUN file)."""
        return self.pwrite(offset, bytes(length))

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.image[offset:offset + length])

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return [(offset, length, True)]

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

    def _synced(self, owner: DiskOwner, target: int, seal: tuple[int, int] | None) -> None:
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
            owner.store_failed(OSError(5, "simulated fdatasync EIO"))
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

    def __init__(self, sim: World, conn: Conn, name: str) -> None:
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
        self.on_ack: Callable[[int], None] | None = None
        """Set on a Core's end: records each ACK it sends to the Edge (the history)."""
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
        if self.on_ack is not None and isinstance(msg, Ack) and self.ctx == LinkKind.EDGE:
            self.on_ack(msg.seq)  # history: who acknowledged, in which state
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

    def __init__(self, sim: World) -> None:
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


def connect(sim: World, a_name: str, b_name: str) -> tuple[End, End]:
    conn = Conn(sim)
    a, b = End(sim, conn, b_name), End(sim, conn, a_name)
    a.other, b.other = b, a
    conn.ends = [a, b]
    sim.conns.append(conn)
    return a, b

