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

Three modules: :mod:`steelfusion.simworld` is the world (clock, disks,
network), :mod:`steelfusion.simnodes` the nodes living in it (Witness,
Cores, Edge), and this one the driver: a seed's faults and drills, the
checker, and :func:`run_many` behind ``steelfusion sim``.  Imports run one
way (sim -> simnodes -> simworld): the other two see a :class:`Sim` only as
the Protocols :class:`~steelfusion.simworld.World` and
:class:`~steelfusion.simnodes.Driver`.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.replication import State
from journal.errors import JournalFull, JournalOffline
from journal.journal import Journal
from steelfusion import control, log
from steelfusion.simnodes import LEASE, Driver, SimCore, SimEdge, SimWitness
from steelfusion.simworld import BLOCK, LUN_BLOCKS, LUN_BYTES, Clock, Conn, End, SimDisk
from witness.logic import Decision

PLANTS = ("ack-before-fsync", "skip-gap", "lost-frames", "seal-late", "no-fence",
          "ack-unjournaled")


class SimFailure(AssertionError):
    """An invariant broke; the message names the seed and how to replay it."""


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


class SimJournal(Journal):
    """The real journal; its commits run on the virtual clock, and the faults
    "journal-full" and "journal-fail" are planted on it."""

    owner: SimCore
    sim: Sim
    _sim_full = False  # the fault "journal-full"
    _sim_broken = False  # the fault "journal-fail"
    _sim_pending = False  # a commit is on the clock

    def mark_dirty(self, lun: int, offset: int, length: int) -> bool:
        if self._sim_full:
            if self.sim.planted("ack-unjournaled"):
                return False  # planted: the region goes unrecorded, the write on
            raise JournalFull(f"Journal LUN {self.path}: simulated full")
        return super().mark_dirty(lun, offset, length)

    def request_commit(self) -> None:
        if self._sim_pending or self.durable >= self.ticket or self.failed is not None:
            return
        self._sim_pending = True

        def go() -> None:
            self._sim_pending = False
            if not self.owner.alive or self.owner.journal is not self:
                return
            if self._sim_broken:
                self._fail(JournalOffline(f"Journal LUN {self.path}: simulated EIO"))
                return
            self.flush()
        self.sim.clock.at(self.sim.rng.expovariate(1 / 0.002), go)


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

    def open_journal(self, core: SimCore, path: Path) -> Journal:
        j = SimJournal.open(path, {1: LUN_BYTES}, size=3 << 30)
        assert isinstance(j, SimJournal)
        j.owner = core
        j.sim = self
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
            if isinstance(j, SimJournal) and kind == "journal-fail":
                j._sim_broken = True
            elif isinstance(j, SimJournal):
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
            if isinstance(core.journal, SimJournal):
                core.journal._sim_broken = False
        self.clock.run_until(self.clock.now + 2.0)  # pending restarts happen
        for core in list(self.cores):
            j = core.journal
            broken = j is not None and (j.failed is not None
                                        or (isinstance(j, SimJournal) and j._sim_full))
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


_IS_A_DRIVER: type[Driver] = Sim
"""mypy checks here that a Sim is what the nodes and the world take
(:class:`steelfusion.simnodes.Driver`, :class:`steelfusion.simworld.World`)."""


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


__all__ = ["LEASE", "PLANTS", "Result", "Sim", "SimFailure", "run_many", "run_seed"]
