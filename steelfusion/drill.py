"""`steelfusion drill`: a failover drill on a netns lab (issue 10, item 3), the runner.

A drill is what an operator rehearses before the day a data center goes away: a real
workload, a seeded schedule of faults, the runbook's operator actions, then proof that no
acknowledged write was lost. The runner here does the I/O and the timing; what is checked
and reported lives in steelfusion/drillcheck.py and steelfusion/drillreport.py (sans-IO, fed
the :class:`~steelfusion.drillcheck.History` this module records).

1. **Lab.** ``Lab.up(netns=True)`` in the drill's own folder (root): the sites branch, dc-a,
   dc-b and witness in network namespaces, joined by the userspace WAN emulator.
2. **Workload.** One qemu-io writer per LUN in the branch namespace, and a status sampler per
   node (steelfusion/drillwork.py), all recording into one history.
3. **Faults.** The schedule, drawn from the seed before anything runs
   (steelfusion/drillplan.py), one fault at a time; each is healed, then the runner acts as
   the operator would (resume a suspended primary once its peer is back).
4. **End.** Heal everything, start what is down, resume, wait until replication runs and the
   Edges hold nothing uncommitted, stop the writers, read every LUN back through its Edge,
   check the Edge's read-back and both Cores' LUN files, write the reports, print the replay
   command.

The runbook's rules the schedule keeps (documented behaviour, not bugs): a suspended primary
is never killed or isolated (writes it acknowledged are only in its journal: a failover then
loses them by design), and a failover is only run on a consistent replica.

``drill --ha`` (issue 16) runs the same workload, recording and check on the loopback Core HA
lab instead (four Cores, no root needed); its faults and health rules are in
steelfusion/drillha.py (:class:`~steelfusion.drillha.HaDrill`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from steelfusion import control, drillcheck, drillreport, labsan, log
from steelfusion.drillcheck import Copy
from steelfusion.drillpayload import BLOCK
from steelfusion.drillplan import (
    FAULT_KINDS,
    GAP,
    HA_KINDS,
    HOLD,
    DrillError,
    Fault,
    build_schedule,
    format_duration,
    parse_duration,
    parse_faults,
)
from steelfusion.drillsetup import prepare_workdir, refusal
from steelfusion.drillwork import (
    MAX_WRITE_BLOCKS,
    SAMPLE_EVERY,
    STALL_LIMIT,
    WRITE_RATE,
    QemuIo,
    Recorder,
    Sampler,
    Writer,
)
from steelfusion.lab import CORE_SITES, Lab, LabError, call_node, node_alive, size_arg
from steelfusion.units import format_size

__all__ = [
    "FAULT_KINDS",
    "GAP",
    "HA_KINDS",
    "HOLD",
    "Drill",
    "DrillError",
    "Fault",
    "Options",
    "build_schedule",
    "format_duration",
    "parse_duration",
    "parse_faults",
    "prepare_workdir",
    "refusal",
    "run",
]

_log = log.get("drill")

DRILL_RESERVE = 64 << 20
"""Each Edge's write reserve in a drill: small, so that an outage fills it."""
JOURNAL_REOPEN_WAIT = 30.0
"""Seconds for a Core to reopen its Journal LUN once the disk works again (it retries every 5);
also how long a storage alarm may outlast the array's return."""
SAN_ALARM_WAIT = 15.0
"""Seconds an array stays down past its hold waiting for its Core's storage alarm."""
MIN_GAP = 1.0
"""At least this long between a fault's recovery and the next fault."""
FAILOVER_WAIT = 30
SETTLE_TIMEOUT = 60.0
END_TIMEOUT = 240.0
COREDR_TIMEOUT = 300.0


# --- the drill -----------------------------------------------------------------------------


@dataclasses.dataclass
class Options:
    workdir: Path
    seed: int
    duration: float
    faults: tuple[str, ...]
    luns: int = 2
    edges: int = 1
    lun_size: int = 64 << 20
    report: Path | None = None
    json_path: Path | None = None
    keep: bool = False
    san: str | None = None  # "tgt": each data center's Core keeps its LUNs on an array
    ha: bool = False  # the loopback Core HA lab (steelfusion/drillha.py)

    def replay(self) -> str:
        return (f"steelfusion drill {'--ha ' if self.ha else ''}--workdir {self.workdir} "
                f"--seed {self.seed} --duration "
                f"{format_duration(self.duration)} --faults {','.join(self.faults)} --luns "
                f"{self.luns} --edges {self.edges} --lun-size {size_arg(self.lun_size)}"
                + (f" --san {self.san}" if self.san else ""))


class _Skip(Exception):
    """A planned fault the runbook's rules forbid now (the message says why)."""


class Drill:
    """One drill run: :meth:`run` returns the exit code (0 PASS, 1 FAIL)."""

    def __init__(self, opts: Options, echo: Callable[[str], None] = print) -> None:
        self.o = opts
        self.seed = opts.seed
        self.echo = echo
        self.lab = Lab(opts.workdir)
        self.rec = Recorder()
        self.abort = threading.Event()
        self.stop_writes = threading.Event()
        self.stop_sampling = threading.Event()
        self._ids = itertools.count(1)
        self._id_lock = threading.Lock()
        self.t0 = time.time()
        self.writers: list[Writer] = []
        self.samplers: list[Sampler] = []
        self.stopped: dict[str, int] = {}  # SIGSTOPped node -> pid
        self.done: list[tuple[Fault, str]] = []  # (fault, what it hit)
        self.skipped: list[tuple[Fault, str]] = []
        self.problems: list[str] = []
        self.data: dict[str, Any] = {}
        self.branch_ns = ""
        self.log_path = opts.workdir / "drill.log"

    # -- output ------------------------------------------------------------------------
    def say(self, text: str, quiet: bool = False) -> None:
        line = f"[{time.time() - self.t0:7.1f}s] {text}"
        _log.info("drill", message=text)
        if not quiet:
            self.echo(line)

    def next_id(self) -> int:
        with self._id_lock:
            return next(self._ids)

    # -- nodes -------------------------------------------------------------------------
    def node(self, name: str) -> dict[str, Any]:
        data = self.lab.load()
        return self.lab.node(data, name)

    def core_status(self, name: str, timeout: float = 3.0) -> dict[str, Any] | None:
        try:
            st = call_node(self.node(name), "status", timeout=timeout)
        except (OSError, ValueError, control.ControlError, LabError):
            return None
        return st if st.get("ok") else None

    def core_alarms(self, name: str) -> list[str] | None:
        """The names of a Core's raised alarms; None when it does not answer."""
        st = self.core_status(name)
        return None if st is None else [str(a.get("alarm", "")) for a in st.get("alarms") or []]

    def cores(self) -> dict[str, dict[str, Any] | None]:
        return {c["name"]: self.core_status(c["name"]) for c in self.data["cores"]}

    def roles(self) -> tuple[str, str, dict[str, dict[str, Any] | None]]:
        """(primary, secondary, statuses): the primary is the highest-epoch Core claiming the
        role (an isolated old primary still claims it at its old epoch)."""
        st = self.cores()
        prims = sorted((s["epoch"] or 0, n) for n, s in st.items()
                       if s is not None and s.get("role") == "primary")
        names = [c["name"] for c in self.data["cores"]]
        # none answers as primary (killed, stopped): the last one known
        last = self.last_primary if self.last_primary in names and self.last_primary else names[0]
        p: str = prims[-1][1] if prims else last
        self.last_primary = p
        other = next(n for n in names if n != p)
        return p, other, st

    last_primary: str | None = None

    def site_of(self, role_site: str, p: str, s: str) -> str:
        if role_site == "primary-site":
            return CORE_SITES[p]
        if role_site == "secondary-site":
            return CORE_SITES[s]
        return role_site

    def coredr(self, core: str, *args: str, timeout: float = COREDR_TIMEOUT
               ) -> tuple[int, str]:
        """Run ``coredr --netns NS --core CONTROL ARGS`` as an operator would (no
        ``--netns`` on a loopback lab)."""
        n = self.node(core)
        ns = ["--netns", n["netns"]] if n.get("netns") else []
        cmd = [sys.executable, "-m", "steelfusion.coredr", *ns, "--core", n["control"], *args]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                               check=False)
        except subprocess.TimeoutExpired:
            return 124, f"no answer within {timeout:.0f} s"
        text = " | ".join(ln.strip() for ln in (p.stdout + p.stderr).splitlines() if ln.strip())
        _log.info("coredr", core=core, args=list(args), rc=p.returncode, output=text)
        return p.returncode, text

    def sleep(self, seconds: float) -> None:
        if self.abort.wait(max(0.0, seconds)):
            raise DrillError(self._abort_reason())

    def _abort_reason(self) -> str:
        errs = [w.error for w in self.writers if w.error]
        return (errs[0] if errs else "a sampler failed") + f" (see {self.log_path})"

    def wait_for(self, pred: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            got = pred()
            if got or time.monotonic() > deadline:
                return got
            self.sleep(every)

    # -- the run -----------------------------------------------------------------------
    def run(self) -> int:
        o = self.o
        schedule = build_schedule(o.seed, o.duration, o.faults, o.edges, ha=o.ha)
        self.echo(f"drill seed {o.seed}: {len(schedule)} faults planned over "
                  f"{format_duration(o.duration)} ({', '.join(o.faults)}); {o.edges} Edge(s) x "
                  f"{o.luns} LUN(s) of {format_size(o.lun_size)}")
        for f in schedule:
            self.echo(f"  {f.n:3d}  +{f.at:6.1f}s  {f.kind:<9} {f.describe()}")
        self.echo(f"replay: {o.replay()}")
        self._save_marker(schedule)  # first: a lab that fails to start leaves a drill's folder
        self.lab_up()
        self.t0 = time.time()
        self.samplers += self.make_samplers()
        for e in self.data["edges"]:
            self.samplers.append(Sampler(self, e, "edge"))
        for s in self.samplers:
            s.start()
        for e in self.data["edges"]:
            for t in e["targets"]:
                self.writers.append(Writer(self, int(t["lun_id"]), t["url"], int(t["size"])))
        for w in self.writers:
            w.start()
        self.say(f"workload: {len(self.writers)} writers (qemu-io in "
                 f"{self.branch_ns or 'this namespace'}), at most {WRITE_RATE:g} writes/s each")
        deadline = self.t0 + o.duration
        for f in schedule:
            start = max(self.t0 + f.at, time.time() + MIN_GAP)
            if start >= deadline:
                left = len(schedule) - f.n + 1
                self.say(f"--duration reached: {left} planned fault(s) not run")
                break
            if f.kind == "outage" and start + f.hold > deadline:
                self.skipped.append((f, "it would outlast --duration"))
                self.say(f"fault {f.n} (outage of {f.hold:g} s) skipped: it would outlast "
                         f"--duration")
                continue
            self.sleep(start - time.time())
            self.inject(f)
            self.operator_after_heal()
        self.sleep(deadline - time.time())
        return self.finish()

    def lab_up(self) -> None:
        o = self.o
        self.say(f"lab up --netns in {o.workdir}")
        self.data = self.lab.up(luns=o.luns, lun_size=o.lun_size, edges=o.edges, netns=True,
                                timeout=90, reserve=DRILL_RESERVE,
                                journal_faults="journal" in o.faults, san=o.san)
        self.branch_ns = self.data["sites"]["branch"]["netns"]

    def make_samplers(self) -> list[Sampler]:
        """The Cores' samplers (the Edges' are the same in every lab)."""
        return [Sampler(self, c, "core") for c in self.data["cores"]]

    def _save_marker(self, schedule: list[Fault]) -> None:
        """``drill.json``: marks the folder as a drill's (a later drill may reuse it) and keeps
        what the runner planned."""
        info = {"seed": self.o.seed, "duration": self.o.duration, "faults": list(self.o.faults),
                "replay": self.o.replay(), "schedule": [dataclasses.asdict(f) for f in schedule]}
        (self.o.workdir / "drill.json").write_text(json.dumps(info, indent=2))

    # -- faults ------------------------------------------------------------------------
    def inject(self, f: Fault) -> None:
        try:
            hit = getattr(self, f"_fault_{f.kind.replace('-', '_')}")(f)
        except _Skip as e:
            self.skipped.append((f, str(e)))
            self.say(f"fault {f.n} ({f.kind}) skipped: {e}")
            return
        self.done.append((f, hit))

    def _primary_ok(self, target: str) -> tuple[str, str]:
        """The Cores now; refuse a fault on a suspended primary (the runbook's rule)."""
        p, s, st = self.roles()
        if target == "primary":
            ps = st.get(p)
            if ps is not None and ps.get("replication") == "suspended":
                self.operator_after_heal()
                p, s, st = self.roles()
                ps = st.get(p)
                if ps is not None and ps.get("replication") == "suspended":
                    raise _Skip(f"the primary {p} is suspended (a suspended primary is not "
                                f"killed or isolated: its journaled writes are only there)")
        return p, s

    def _resolve(self, f: Fault) -> tuple[str, str, str]:
        p, s = self._primary_ok(f.target if f.kind in ("kill", "isolate") else "")
        name = {"primary": p, "secondary": s}.get(f.target, f.target)
        return name, p, s

    def _fault_kill(self, f: Fault) -> str:
        name, _, _ = self._resolve(f)
        self.rec.event(time.time(), "kill", f"SIGKILL {name} ({f.target})", node=name)
        self.say(f"fault {f.n}: SIGKILL {name} ({f.target})")
        self.lab.kill(name, signal.SIGKILL)
        self.sleep(f.hold)
        self._start(name)
        return name

    def _start(self, name: str) -> int:
        """``lab start NAME``; returns its heal event's index (a handback's cause)."""
        n = self.lab.start(name, timeout=90)
        ev = self.rec.event(time.time(), "heal", f"lab start {name} (pid {n['pid']})", node=name)
        self.say(f"heal: started {name} again (pid {n['pid']})")
        return int(ev)

    def _fault_stop(self, f: Fault) -> str:
        name, _, _ = self._resolve(f)
        node = self.node(name)
        if not node_alive(node):
            raise _Skip(f"{name} is not running")
        pid = int(node["pid"])
        self.rec.event(time.time(), "stop", f"SIGSTOP {name} ({f.target})", node=name)
        self.say(f"fault {f.n}: SIGSTOP {name} ({f.target}, pid {pid})")
        self.stopped[name] = pid
        os.kill(pid, signal.SIGSTOP)
        self.sleep(f.hold)
        self._cont(name)
        return name

    def _cont(self, name: str) -> None:
        pid = self.stopped.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        self.rec.event(time.time(), "heal", f"SIGCONT {name}", node=name)
        self.say(f"heal: SIGCONT {name}")

    def _fault_partition(self, f: Fault) -> str:
        _, p, s = self._resolve(f)
        ra, _, rb = f.target.partition("|")
        a = self.site_of(ra, p, s)
        if f.iface:
            port = f"{a}/1"
            self.rec.event(time.time(), "partition", f"port {port} down ({ra})", node=None)
            self.say(f"fault {f.n}: port {port} down ({ra})")
            self.lab.port(port, False)
            self.sleep(f.hold)
            self.lab.port(port, True)
            self.rec.event(time.time(), "heal", f"port {port} up")
            self.say(f"heal: port {port} up")
            return port
        b = self.site_of(rb, p, s)
        arrow = "->" if f.one_way else "<->"
        what = f"{a} {arrow} {b} ({ra} {arrow} {rb})"
        self.rec.event(time.time(), "partition", f"cut {what}")
        self.say(f"fault {f.n}: cut {what}")
        self.lab.link(a, b, cut=True, one_way=f.one_way)
        self.sleep(f.hold)
        self.lab.link(a, b, heal=True, one_way=f.one_way)
        self.rec.event(time.time(), "heal", f"heal {a} {arrow} {b}")
        self.say(f"heal: {a} {arrow} {b}")
        return f"{a}|{b}"

    def _fault_wan(self, f: Fault) -> str:
        _, p, s = self._resolve(f)
        ra, _, rb = f.target.partition("|")
        a, b = self.site_of(ra, p, s), self.site_of(rb, p, s)
        what = f.describe().split(": ", 1)[1].rsplit(" for ", 1)[0]
        self.rec.event(time.time(), "wan", f"{a} <-> {b}: {what}")
        self.say(f"fault {f.n}: {a} <-> {b}: {what}")
        self.lab.link(a, b, delay=f.delay, jitter=f.jitter, loss=f.loss, rate=f.rate)
        self.sleep(f.hold)
        self.lab.link(a, b, heal=True)
        self.rec.event(time.time(), "heal", f"heal {a} <-> {b}")
        self.say(f"heal: {a} <-> {b}")
        return f"{a}|{b}"

    def _fault_operator(self, f: Fault) -> str:
        p, _, _ = self.roles()
        t = time.time()
        rc, out = self.coredr(p, "suspend")
        if rc != 0:
            raise _Skip(f"coredr suspend on {p} refused: {out}")
        self.rec.event(t, "suspend", f"coredr suspend on {p}", node=p)
        self.say(f"fault {f.n}: coredr suspend on {p}: {out}")
        self.sleep(f.hold)
        self.resume(p, deadline=SETTLE_TIMEOUT)
        return p

    def _fault_journal(self, f: Fault) -> str:
        p, s, _ = self.roles()
        core = p if f.target == "primary" else s
        suspended = False
        if f.suspend:
            t = time.time()
            rc, out = self.coredr(core, "suspend")
            if rc == 0:
                suspended = True
                self.rec.event(t, "suspend", f"coredr suspend on {core}", node=core)
                self.say(f"fault {f.n}: coredr suspend on {core}: {out}")
            else:
                self.say(f"fault {f.n}: coredr suspend on {core} refused ({out}); the journal "
                         f"fails anyway")
        how = "out of space" if f.mode == "full" else "offline"
        self.rec.event(time.time(), "journal", f"{core}'s Journal LUN {how}", node=core)
        self.say(f"fault {f.n}: {core}'s Journal LUN {how}")
        self.lab.journal_fault(core, f.mode)
        self.sleep(f.hold)
        self.lab.journal_fault(core, "ok")
        self.rec.event(time.time(), "heal", f"{core}'s Journal LUN works again", node=core)
        self.say(f"heal: {core}'s Journal LUN works again")

        def reopened() -> bool:
            names = self.core_alarms(core)
            return names is not None and not any(a.startswith("journal_") for a in names)
        if not self.wait_for(reopened, JOURNAL_REOPEN_WAIT):
            self.problem(f"fault {f.n}: {core} still has a journal alarm "
                         f"{JOURNAL_REOPEN_WAIT:.0f} s after its Journal LUN works again: "
                         f"{self.core_alarms(core) or []}")
        if suspended:
            self.resume(core, deadline=SETTLE_TIMEOUT)
        return core

    def _fault_san(self, f: Fault) -> str:
        """A data center's array goes away (its tgtd SIGKILLed): the Core raises a storage
        alarm and holds the writes it cannot land; when the array is back they land and the
        alarm clears (issue 12). The array stays down until the alarm is seen."""
        p, s, _ = self.roles()
        core = p if f.target == "primary" else s
        san = labsan.SAN_OF[core]
        self.rec.event(time.time(), "kill", f"SIGKILL {san} ({core}'s array)", node=san)
        self.say(f"fault {f.n}: {san}, {core}'s storage array, down for {f.hold:g} s")
        self.lab.kill(san, signal.SIGKILL)
        self.sleep(f.hold)

        def alarms() -> list[str]:
            return self.core_alarms(core) or []
        if not self.wait_for(lambda: any(a.endswith("_storage") for a in alarms()),
                             SAN_ALARM_WAIT):
            self.problem(f"fault {f.n}: {core} raised no storage alarm while {san} was down "
                         f"(alarms: {alarms()})")
        self._start(san)
        if not self.wait_for(lambda: not any(a.endswith("_storage") for a in alarms()),
                             JOURNAL_REOPEN_WAIT):
            self.problem(f"fault {f.n}: {core} still has a storage alarm "
                         f"{JOURNAL_REOPEN_WAIT:.0f} s after {san} is back: {alarms()}")
        return san

    def _fault_outage(self, f: Fault) -> str:
        dcs = [CORE_SITES[c["name"]] for c in self.data["cores"]]
        what = f"branch <-> {' and '.join(dcs)}"
        self.rec.event(time.time(), "partition", f"cut {what} (branch outage)")
        self.say(f"fault {f.n}: cut {what} for {f.hold:g} s (branch outage)")
        for dc in dcs:
            self.lab.link("branch", dc, cut=True)
        self.sleep(f.hold)
        for dc in dcs:
            self.lab.link("branch", dc, heal=True)
        self.rec.event(time.time(), "heal", f"heal {what}")
        self.say(f"heal: {what}")
        return "branch"

    def resume(self, core: str, deadline: float) -> bool:
        """``coredr resume`` on ``core`` until it runs (retrying while its peer is still
        away); False if it never did."""
        end = time.monotonic() + deadline
        while True:
            t = time.time()
            rc, out = self.coredr(core, "resume")
            if rc == 0:
                self.rec.event(t, "resume", f"coredr resume on {core}", node=core)
                self.say(f"operator: coredr resume on {core}: {out}")
                return True
            if time.monotonic() > end:
                self.say(f"operator: coredr resume on {core} still refused after "
                         f"{deadline:.0f} s: {out}")
                return False
            self.sleep(1.0)

    def _fault_isolate(self, f: Fault) -> str:
        p, s = self._primary_ok("primary")
        # a failover promotes a consistent replica only: wait for running (resync done)
        def running() -> bool:
            st = self.cores()
            return bool(st.get(p) and st[p].get("replication") == "running"  # type: ignore[union-attr]
                        and st.get(s) and st[s].get("replication") == "replica")  # type: ignore[union-attr]
        if not self.wait_for(running, SETTLE_TIMEOUT):
            raise _Skip(f"replication is not running between {p} and {s} after "
                        f"{SETTLE_TIMEOUT:.0f} s: the replica is not consistent for a failover")
        before = self.core_status(p) or {}
        epoch = int(before.get("epoch") or 0)
        psite, ssite = CORE_SITES[p], CORE_SITES[s]
        t_cut = time.time()
        self.lab.link(psite, ssite, cut=True)
        self.lab.link(psite, "witness", cut=True)
        cause = self.rec.event(t_cut, "partition", f"isolate {p}: cut {psite} <-> {ssite} and "
                               f"{psite} <-> witness (branch still reaches it)", node=p)
        self.say(f"fault {f.n}: isolate primary {p}: cut {psite} <-> {ssite}, {psite} <-> "
                 f"witness")
        kind = "failback" if s == self.data["cores"][0]["name"] else "failover"
        t_cmd = time.time()
        rc, out = self.coredr(s, "failover", "--wait", str(FAILOVER_WAIT),
                              timeout=FAILOVER_WAIT + 60)
        if rc == 0:
            self.rec.event(t_cmd, kind, f"coredr failover --wait {FAILOVER_WAIT} on {s}",
                           node=s, cause=cause)
            self.say(f"operator: coredr failover on {s} ({kind}): {out}")
        else:
            self.problem(f"fault {f.n}: coredr failover on {s} failed while {p} was isolated "
                         f"from it and the Witness: {out}")
        self.sleep(f.hold)
        self.lab.link(psite, ssite, heal=True)
        self.lab.link(psite, "witness", heal=True)
        self.rec.event(time.time(), "heal", f"heal {psite} <-> {ssite} and {psite} <-> witness")
        self.say(f"heal: {psite} <-> {ssite}, {psite} <-> witness")
        if rc != 0:
            return p
        # the old primary learns the newer epoch and rejoins as secondary
        def rejoined() -> bool:
            st = self.core_status(p)
            return bool(st and st.get("role") == "secondary" and int(st.get("epoch") or 0) > epoch)
        if not self.wait_for(rejoined, SETTLE_TIMEOUT):
            st = self.core_status(p) or {}
            self.problem(f"fault {f.n}: {p} did not rejoin as secondary within "
                         f"{SETTLE_TIMEOUT:.0f} s of the heal (role {st.get('role')}, epoch "
                         f"{st.get('epoch')}, replication {st.get('replication')})")
        else:
            self.say(f"{p} rejoined as secondary")
        if not self.resume(s, deadline=SETTLE_TIMEOUT):
            self.problem(f"fault {f.n}: coredr resume on the new primary {s} did not succeed")
        self.last_primary = s
        return p

    def problem(self, text: str) -> None:
        """Something the runbook says must work did not (makes the drill FAIL)."""
        self.problems.append(text)
        self.say(f"PROBLEM: {text}")
        _log.error("drill_problem", problem=text)

    def operator_after_heal(self) -> None:
        """What the operator does after a fault: resume a suspended primary once its peer is
        back (a new primary starts suspended)."""
        p, _, st = self.roles()
        ps = st.get(p)
        if ps is not None and ps.get("replication") == "suspended":
            self.resume(p, deadline=SETTLE_TIMEOUT)

    # -- the end -----------------------------------------------------------------------
    def heal_all(self) -> None:
        data = self.lab.load()
        for name in list(self.stopped):
            self._cont(name)
        sites = list(data.get("sites") or {})
        for a, b in itertools.combinations(sites, 2):
            self.lab.link(a, b, heal=True)
        for site in (data.get("sites") or {}).values():
            for port in site.get("ports", {}):
                self.lab.port(port, True)
        for n in self.lab.processes(data):
            if not node_alive(n):
                self._start(n["name"])
        for k in data.get("disks", []):
            self.lab.journal_fault(k["core"], "ok")

    def wait_healthy(self, timeout: float) -> bool:
        def healthy() -> bool:
            p, s, st = self.roles()
            ps, ss = st.get(p), st.get(s)
            if ps is not None and ps.get("replication") == "suspended":
                self.resume(p, deadline=10)
                return False
            return bool(ps and ss and ps.get("replication") == "running"
                        and ss.get("replication") == "replica")
        return bool(self.wait_for(healthy, timeout, every=1.0))

    def finish(self) -> int:
        o = self.o
        self.say("end: healing everything")
        self.heal_all()
        if not self.wait_healthy(END_TIMEOUT):
            self.problem(f"replication did not return to running within {END_TIMEOUT:.0f} s "
                         f"after healing: {self._states()}")
        self.say("end: stopping the writers (in-flight writes finish)")
        self.stop_writes.set()
        for w in self.writers:
            w.join(STALL_LIMIT + 30)
        try:
            took = self.lab.wait_committed(timeout=END_TIMEOUT)
            self.say(f"end: every Edge holds nothing uncommitted ({took:.1f} s)")
        except LabError as e:
            self.problem(f"the Edges did not drain: {e}")
        if not self.wait_healthy(END_TIMEOUT):
            self.problem(f"replication is not running at the end: {self._states()}")
        time.sleep(SAMPLE_EVERY * 4)  # a few more samples of the healed state
        self.stop_sampling.set()
        for s in self.samplers:
            s.join(10)
        copies = self.read_back()
        self.say("end: checking every copy")
        result = drillcheck.check(self.rec.h, copies, o.seed, replay=o.replay())
        return self.report(result, copies)

    def _states(self) -> str:
        st = self.cores()
        return ", ".join(f"{n} {s.get('role')} {s.get('replication')} epoch {s.get('epoch')}"
                         if s else f"{n} no answer" for n, s in st.items())

    def read_back(self) -> list[Copy]:
        from steelfusion.initiator import qemu_read

        copies = []
        data = self.lab.load()
        for e in data["edges"]:
            images: dict[int, str] = {}
            for t in e["targets"]:
                dst = self.o.workdir / f"readback-{e['name']}-lun{t['lun_id']}.img"
                self.say(f"end: reading LUN {t['lun_id']} back through {e['name']}")
                qemu_read(t["url"], dst, timeout=600, netns=self.branch_ns or None)
                images[int(t["lun_id"])] = str(dst)
            copies.append(Copy(e["name"], "edge", images))
        for c in data["cores"]:  # each must hold the LUNs lab.json gives it (an HA Core: its own)
            copies.append(Copy(c["name"], "core", labsan.lun_files(data, c),
                               expect=frozenset(int(k) for k in c["luns"])))
        return copies

    def report(self, result: drillcheck.Result, copies: list[Copy]) -> int:
        o = self.o
        wd = o.workdir
        html_path = o.report or wd.parent / f"{wd.name}-report.html"
        json_path = o.json_path or wd.parent / f"{wd.name}-report.json"
        if not result.counts.get("writes_ok"):
            self.problem("no write was acknowledged: the workload never ran (see the Edges' "
                         "logs and drill.log)")
        html_path.write_text(drillreport.render_html(
            result, self.rec.h, title=f"steelfusion drill {'--ha ' if o.ha else ''}seed {o.seed}",
            problems=self.problems))
        json_path.write_text(drillreport.to_json(result))
        (wd / "history.json").write_text(json.dumps(self.rec.h.to_dict()))
        info = json.loads((wd / "drill.json").read_text())
        info.update({"injected": [dict(dataclasses.asdict(f), hit=hit) for f, hit in self.done],
                     "skipped": [dict(dataclasses.asdict(f), why=why)
                                 for f, why in self.skipped],
                     "problems": self.problems, "passed": result.passed and not self.problems,
                     "elapsed": time.time() - self.t0})
        (wd / "drill.json").write_text(json.dumps(info, indent=2))
        self.echo(drillreport.render_text(result))
        self.echo("  writers: " + "; ".join(
            f"LUN {w.lun} " + ", ".join(f"{k} {v}" for k, v in sorted(w.stats.items()))
            for w in self.writers))
        for text in self.problems:
            self.echo(f"  PROBLEM: {text}")
        self.echo(drillreport.summary_line(result, o.seed, Counter(f.kind for f, _ in self.done),
                                           len(self.skipped), self.problems,
                                           time.time() - self.t0))
        passed = result.passed and not self.problems
        if passed:  # the read-back images are only worth their space for a failure
            for c in copies:
                if c.kind == "edge":
                    for img in c.images.values():
                        Path(str(img)).unlink(missing_ok=True)
        self.echo(f"report: {html_path} (HTML), {json_path} (JSON); history and logs in {wd}")
        self.echo(f"replay: {o.replay()}")
        return 0 if passed else 1

    # -- cleanup -----------------------------------------------------------------------
    def cleanup(self) -> None:
        """Nothing left running: writers, samplers, stopped nodes; the lab unless --keep."""
        self.abort.set()
        self.stop_writes.set()
        self.stop_sampling.set()
        QemuIo.kill_all()
        for w in self.writers:
            w.join(10)
        QemuIo.kill_all()  # one a writer opened meanwhile
        for w in self.writers:  # a writer still stuck (daemon) does not get to its finally
            w.file.unlink(missing_ok=True)
        for name, pid in list(self.stopped.items()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            self.stopped.pop(name, None)
        if not self.lab.file.exists():
            return
        if self.o.keep:
            self.echo(f"lab left running in {self.o.workdir}; stop it with: steelfusion lab "
                      f"down --workdir {self.o.workdir}")
            return
        with contextlib.suppress(LabError):
            self.lab.down()


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run(opts: Options, echo: Callable[[str], None] = print) -> int:
    """``steelfusion drill``: 0 PASS, 1 FAIL; :class:`DrillError` for a refusal."""
    try:
        Lab.check_options(luns=opts.luns, lun_size=opts.lun_size, edges=opts.edges)
    except LabError as e:
        raise DrillError(str(e)) from None
    if opts.lun_size < MAX_WRITE_BLOCKS * BLOCK:
        raise DrillError(f"--lun-size {format_size(opts.lun_size)} is too small for the drill's "
                         f"writes (up to {MAX_WRITE_BLOCKS} blocks of 4K): give at least "
                         f"{size_arg(MAX_WRITE_BLOCKS * BLOCK)}")
    if opts.ha:
        from steelfusion import labha

        try:
            labha.check(edges=opts.edges, luns=opts.luns, netns=False, journal_faults=False)
        except LabError as e:
            raise DrillError(str(e)) from None
        wrong = [k for k in opts.faults if k not in HA_KINDS]
        if wrong:
            raise DrillError(f"--faults {wrong[0]}: not a fault of the HA drill; with --ha "
                             f"choose from {','.join(HA_KINDS)}")
    why = refusal(ha=opts.ha)
    if why is not None:
        raise DrillError(why)
    opts = dataclasses.replace(opts, workdir=opts.workdir.resolve())
    prepare_workdir(opts.workdir)
    log.setup("drill", opts.workdir / "drill.log", tty=False)
    if opts.ha:
        from steelfusion.drillha import HaDrill

        d: Drill = HaDrill(opts, echo)
    else:
        d = Drill(opts, echo)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (a CI job cancelled, `kill`) cleans up like ^C: nothing left running
        signal.signal(signal.SIGTERM, _interrupted)
    try:
        return d.run()
    except LabError as e:
        raise DrillError(f"{e} (logs: {opts.workdir}/*.log)") from None
    except DrillError:
        raise
    except KeyboardInterrupt:
        raise DrillError(f"interrupted: no report; the lab is taken down unless --keep (logs: "
                         f"{opts.workdir})") from None
    except Exception as e:
        _log.error("drill_failed", error=repr(e), traceback=traceback.format_exc())
        raise DrillError(f"the drill runner failed: {type(e).__name__}: {e} (traceback in "
                         f"{d.log_path})") from None
    finally:
        d.cleanup()

