"""The simulated nodes of :mod:`steelfusion.sim`: Witness, Cores and the Edge.

What runs is the project's own code with the simulation's hooks, not a model
of it (issue 9): :class:`SimCore` is the real :class:`core.engine.CoreEngine`
on the virtual clock, a :class:`~steelfusion.simworld.SimDisk` and simulated
links; :class:`SimWitness` wraps the real :class:`witness.logic.WitnessLogic`,
reached through :class:`SimWitnessClient` with delays; :class:`SimEdge` ships
host writes with the real :class:`edge.shipping.Shipper`.  The planted bugs
(``Sim.planted``) live here, beside the rule each one breaks.

What the nodes use of the driver (:class:`steelfusion.sim.Sim`) is
:class:`Driver`, so the imports run one way: sim -> simnodes -> simworld.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from core.engine import CoreEngine, LinkKind
from core.pipeline import LunPipeline, Order
from core.replication import State
from edge.shipping import Shipper
from steelfusion.config import CoreConfig, LunConfig
from steelfusion.simworld import BLOCK, LUN_BLOCKS, LUN_BYTES, End, SimDisk, World, connect
from steelfusion.wire import Ack, Hello, Message, Refuse, Welcome, Write, WriteFlags, discard_data
from witness.logic import Decision, WitnessLogic

if TYPE_CHECKING:
    from journal.journal import Journal

LEASE = 1.5
PAIR = "pair-1"


class Driver(World, Protocol):
    """What the nodes use of the driver (:class:`steelfusion.sim.Sim`) besides
    the world: the other nodes, the links it cuts, the Journal LUNs it opens
    and the history it checks."""

    @property
    def stream(self) -> int: ...  # the Edge's write stream
    @property
    def witness(self) -> SimWitness: ...
    @property
    def cores(self) -> Sequence[SimCore]: ...
    @property
    def ends(self) -> dict[str, list[End]]: ...  # by Core: the ends it accepted
    @property
    def edge_link_up(self) -> bool: ...
    @property
    def core_link_up(self) -> bool: ...
    @property
    def witness_link(self) -> dict[str, bool]: ...  # a Core's name -> False: cut
    @property
    def failover_times(self) -> list[float]: ...

    def other(self, core: SimCore) -> SimCore: ...

    def open_journal(self, core: SimCore, path: Path) -> Journal: ...

    def check_commit(self, seq: int) -> None: ...

    def acked_by(self, core: SimCore, seq: int) -> None: ...


# -- Witness ------------------------------------------------------------------------
class SimWitness:
    """The real :class:`WitnessLogic`, durable across its own restarts, reached with delays."""

    def __init__(self, sim: Driver) -> None:
        self.sim = sim
        self.logic = WitnessLogic(LEASE, 0.0)
        self.alive = True

    def reachable(self, node: str) -> bool:
        return self.alive and self.sim.witness_link.get(node, True)

    def crash_restart(self) -> None:
        self.logic = WitnessLogic.from_json(self.logic.to_json(), LEASE, self.sim.clock.now)


class SimWitnessClient:
    """What a Core sees of the Witness (:class:`witness.client.WitnessClient`'s surface)."""

    def __init__(self, sim: Driver, core: SimCore) -> None:
        self.sim = sim
        self.core = core
        self.node = core.name
        self.role: str = core.role
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

    witness: SimWitnessClient | None  # the engine's core.ports.WitnessView

    def __init__(self, sim: Driver, name: str, role: str, disk: SimDisk, saved: dict[str, Any],
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
            assert j is not None  # a resync commits the journal (core.resync.pump)
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

    def store_failed(self, err: OSError) -> None:
        self._on_store_failed(1, err)

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
        end.on_ack = functools.partial(self.sim.acked_by, self)
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
DISCARD_EVERY = 11
"""Every this-many-th host write is an UNMAP of its blocks instead (a DISCARD write, issue
18); chosen by seq, so the seeds' random streams are the same as without discards."""


@dataclass(slots=True)
class Rec:
    lun: int
    seq: int
    offset: int
    length: int
    data: bytes  # a discard's: zeros, what the blocks read after it
    discard: int = 0


class SimEdge:
    """Host writes, acknowledged at once and kept (the blockstore's log is durable);
    shipped with the real :class:`Shipper`; follows whichever Core is primary."""

    def __init__(self, sim: Driver) -> None:
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
        if seq % DISCARD_EVERY == 0:  # the host deallocates instead (UNMAP): reads zeros after
            rec = Rec(1, seq, blk * BLOCK, n * BLOCK, bytes(n * BLOCK), discard=n * BLOCK)
        else:
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
            if recs[0].discard:  # alone in its frame
                end.send(Write(1, WriteFlags.DISCARD, self.sim.stream, f.seq, f.offset,
                               discard_data(recs[0].discard), f.prev))
                continue
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

