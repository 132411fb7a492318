"""`steelfusion drill --ha`: the failover drill on the Core HA lab (issue 16, item 6).

The lab is ``lab up --ha`` on loopback (steelfusion/labha.py; no root, no namespaces): X
(core-a1, HA leader) and Y (core-a2, follower) in dc-a on array san-a, X' (core-b1) and Y'
(core-b2) in dc-b on san-b; edge-1 writes LUNs served by X, edge-2 by Y. The workload, the
recording and the final check are the netns drill's (steelfusion/drill.py): one qemu-io
writer per LUN, every write recorded, every LUN read back through its Edge and from both
arrays' files, RPO must be 0. What differs is what goes wrong and what "healthy" means:

* **Faults** (steelfusion/drillplan.py :data:`~steelfusion.drillplan.HA_KINDS`):
  ``ha-kill`` SIGKILLs one Core; the drill waits for its partner's takeover (the partner
  serves its LUNs), holds, starts it again with ``lab start`` and waits for the handback
  (the partner no longer hosts, the Core is active and serves its own LUNs). ``ha-both``
  does it to Y and Y' (or X and X') at once: X serves Y's LUNs and X' Y''s. ``ha-san`` cuts
  a primary Core's own path to its array (``Lab.san_path``): it raises its storage alarm,
  its partner fences it and takes its LUNs over; after the heal it stands by and gets them
  back. ``kill``/``stop`` SIGKILL or SIGSTOP one of the four Cores for the hold, without
  waiting for anything (a short one may heal before the partner acts).
* **Timings.** A takeover is timed from the fault to the partner's ``ha_took_over`` event,
  a handback from the restart (or heal) to the Core's ``ha_serving_own`` event (the Cores'
  own clocks: same machine), recorded as ``takeover``/``handback`` events whose ``cause``
  is the fault or the restart; the checker turns them into
  :class:`~steelfusion.drillcheck.HaStep` s and the report shows median and max.
* **Healthy** (before each fault, after each, and at the end): every Core answers with
  ``ha.mode`` active, none serves its partner's LUNs, no ``ha_storage`` alarm, both
  primaries ``running`` and both secondaries ``replica``. The runner acts as the operator
  as the netns drill does: a primary left ``suspended`` is resumed (``coredr resume`` on its
  HA leader) once its peer is back. That happens by design when a resync is cut short: a
  Core killed with writes in flight resyncs those regions when it returns, and if its peer
  goes away meanwhile (its own handback, as after ``ha-both``, moves it from its partner back
  to itself) the table's RESYNCING + PEER_DOWN is SUSPENDED, which only an operator lifts.
* **Checks.** X and Y acknowledge at once by design (each its own LUNs): samples carry
  their replication pair as ``group`` (steelfusion/drillwork.py :class:`HaSampler`), so
  split brain is two Cores acknowledging for the same LUNs at once, e.g. Y and X serving Y's
  after a takeover (``core-a2@core-a1``) when the fence failed.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

from steelfusion import control
from steelfusion.drill import DRILL_RESERVE, Drill, _Skip
from steelfusion.drillplan import HA_LETTERS, Fault
from steelfusion.drillwork import HaSampler, Sampler
from steelfusion.lab import LabError, call_node
from steelfusion.labha import lun_list

TAKEOVER_WAIT = 60.0
"""Seconds for a partner to serve a failed Core's LUNs (measured: 1-2 s after a kill, ~5 s
after a SAN cut)."""
HANDBACK_WAIT = 90.0
"""Seconds from a restart (or heal) to the handback (measured: ~4 s; 3 of them the settle)."""
HEALTHY_WAIT = 120.0
"""Seconds for the lab to return to its normal state after a fault."""
READY_WAIT = 30.0
"""Seconds a fault waits for the normal state before it is skipped."""
ALARM_WAIT = 30.0
"""Seconds for a Core cut from its array to raise ``ha_storage``."""
POLL = 0.2
RESUME_EVERY = 5.0
"""Seconds between two of the operator's resumes of one suspended Core."""
TOOK = "{p} did not take {n}'s LUNs over"
BACK = "{n} did not get its LUNs back from {p}"


def _letter(name: str) -> str:
    return f"{name} ({HA_LETTERS.get(name, '?')})"


class HaDrill(Drill):
    """One ``drill --ha`` run (see the module docstring); :meth:`run` is the netns drill's."""

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.cut: set[str] = set()  # Cores whose SAN path is cut now
        self._resumed_at: dict[str, float] = {}  # the operator's last resume of a Core

    # -- the lab ---------------------------------------------------------------------------
    def lab_up(self) -> None:
        o = self.o
        self.say(f"lab up --ha in {o.workdir}")
        self.data = self.lab.up(luns=o.luns, lun_size=o.lun_size, edges=o.edges, ha=True,
                                timeout=90, reserve=DRILL_RESERVE)
        self.branch_ns = ""  # loopback: the hosts' qemu-io run here

    def make_samplers(self) -> list[Sampler]:
        pair = {c["name"]: c.get("pair") for c in self.data["cores"]}
        return [HaSampler(self, c, pair.get(c.get("partner"))) for c in self.data["cores"]]

    def partner(self, name: str) -> str:
        return str(next(c["partner"] for c in self.data["cores"] if c["name"] == name))

    def ha(self, name: str) -> dict[str, Any] | None:
        st = self.core_status(name)
        ha = (st or {}).get("ha")
        return ha if isinstance(ha, dict) else None

    def events_since(self, core: str, name: str, since: float, **match: Any) -> float | None:
        """When ``core`` first said ``name`` (an event of its ``coredr events``) at or after
        ``since`` with these fields; None if it did not (or does not answer)."""
        try:
            evs = call_node(self.node(core), "events", timeout=3.0).get("events") or []
        except (OSError, ValueError, control.ControlError, LabError):
            return None
        ts = [float(e["time"]) for e in evs if e.get("event") == name
              and float(e.get("time") or 0) >= since
              and all(e.get(k) == v for k, v in match.items())]
        return min(ts) if ts else None

    # -- health ----------------------------------------------------------------------------
    def health(self) -> str | None:
        """None in the normal state; else the first thing that is not normal."""
        for c in self.data["cores"]:
            name = c["name"]
            st = self.core_status(name)
            if st is None:
                return f"{name} does not answer"
            ha = st.get("ha") or {}
            if ha.get("mode") != "active":
                return f"{name} is {ha.get('mode')} ({ha.get('why')})"
            if ha.get("hosting_partner") or ha.get("hosted"):
                return f"{name} serves {c.get('partner')}'s LUNs"
            if any(a.get("alarm") == "ha_storage" for a in st.get("alarms") or []):
                return f"{name} cannot reach its array (ha_storage)"
            want = "running" if c.get("role") == "primary" else "replica"
            if st.get("replication") != want:
                return f"{name} replication {st.get('replication')} (not {want})"
        return None

    def wait_healthy(self, timeout: float) -> bool:
        def healthy() -> bool:
            if self.health() is None:
                return True
            self._resume_suspended()
            return False
        return bool(self.wait_for(healthy, timeout, every=0.5))

    def _resume_suspended(self) -> None:
        """The runbook's operator: ``coredr resume`` on the HA leader of a suspended primary
        (it retries for a few seconds while the peer is not back yet)."""
        for c in self.data["cores"]:
            if time.monotonic() - self._resumed_at.get(c["name"], -RESUME_EVERY) < RESUME_EVERY:
                continue
            st = self.core_status(c["name"]) if c.get("role") == "primary" else None
            if st is not None and st.get("replication") == "suspended":
                self._resumed_at[c["name"]] = time.monotonic()
                leader = str((st.get("ha") or {}).get("leader") or c["name"])
                self.say(f"{c['name']} is suspended: the operator resumes it on its HA "
                         f"leader {leader}")
                self.resume(leader, deadline=10)

    def _states(self) -> str:
        out = []
        for name, st in self.cores().items():
            if st is None:
                out.append(f"{name} no answer")
                continue
            ha = st.get("ha") or {}
            hosted = ha.get("hosted") or {}
            out.append(f"{name} {st.get('role')} {st.get('replication')} ha {ha.get('mode')}"
                       + (f" serving {hosted.get('name')}" if hosted else ""))
        return ", ".join(out)

    def operator_after_heal(self) -> None:
        """After each fault: back to the normal state before the next one."""
        t = time.monotonic()
        if self.wait_healthy(HEALTHY_WAIT):
            self.say(f"healthy again ({time.monotonic() - t:.1f} s): four Cores active, "
                     f"nothing hosted, both pairs replicating")
        else:
            self.problem(f"the HA lab did not return to its normal state within "
                         f"{HEALTHY_WAIT:.0f} s: {self.health()} ({self._states()})")

    def _ready(self) -> None:
        if not self.wait_healthy(READY_WAIT):
            raise _Skip(f"the HA lab is not in its normal state: {self.health()}")

    def _resolve(self, f: Fault) -> tuple[str, str, str]:
        """``kill`` and ``stop`` name their Core (one of the four)."""
        self._ready()
        return f.target, "", ""

    def heal_all(self) -> None:
        for name in sorted(self.cut):
            self._heal_path(name)
        super().heal_all()

    # -- faults ----------------------------------------------------------------------------
    def _fault_ha_kill(self, f: Fault) -> str:
        return self._kill_and_back(f, f.target.split("+"))

    _fault_ha_both = _fault_ha_kill

    def _kill_and_back(self, f: Fault, names: list[str]) -> str:
        self._ready()
        causes = {}
        for n in names:
            causes[n] = self.rec.event(time.time(), "kill", f"SIGKILL {_letter(n)}", node=n)
            self.lab.kill(n, signal.SIGKILL)
        self.say(f"fault {f.n}: SIGKILL {' and '.join(map(_letter, names))}")
        self._await(f, causes, self._took_over, TAKEOVER_WAIT, TOOK)
        self.sleep(f.hold)
        heals = {n: self._start(n) for n in names}
        self._await(f, heals, self._handed_back, HANDBACK_WAIT, BACK)
        return "+".join(names)

    def _fault_ha_san(self, f: Fault) -> str:
        self._ready()
        n = f.target
        san = next(s["name"] for s in self.data["sans"] if n in (s.get("cores") or []))
        cause = self.rec.event(time.time(), "partition", f"cut {_letter(n)}'s path to {san}",
                               node=n)
        self.lab.san_path(n, "cut")
        self.cut.add(n)
        self.say(f"fault {f.n}: cut {_letter(n)}'s path to its array {san}")
        if self.wait_for(lambda: "ha_storage" in (self.core_alarms(n) or []), ALARM_WAIT,
                         every=POLL):
            self.say(f"{n} raised ha_storage")
        else:
            self.problem(f"fault {f.n}: {n} raised no ha_storage alarm within "
                         f"{ALARM_WAIT:.0f} s of the cut (alarms: {self.core_alarms(n)})")
        self._await(f, {n: cause}, self._took_over, TAKEOVER_WAIT, TOOK)
        self.sleep(f.hold)
        heal = self._heal_path(n)
        self._await(f, {n: heal}, self._handed_back, HANDBACK_WAIT, BACK)
        t_cut = self.rec.h.events[cause].t
        if self.events_since(n, "ha_standby", t_cut) is None:
            self.problem(f"fault {f.n}: {n} got its LUNs back but never said it stood by")
        return n

    def _heal_path(self, n: str) -> int:
        self.lab.san_path(n, "ok")
        self.cut.discard(n)
        ev = self.rec.event(time.time(), "heal", f"heal {n}'s path to its array", node=n)
        self.say(f"heal: {n}'s path to its array")
        return int(ev)

    # -- waiting for Core HA ----------------------------------------------------------------
    def _await(self, f: Fault, causes: dict[str, int],
               done: Callable[[str, int], bool], timeout: float, what: str) -> None:
        """Until ``done(core, cause)`` for every Core of ``causes`` (it records the move);
        a Core that does not get there is a problem."""
        pending = dict(causes)

        def step() -> bool:
            for n, cause in list(pending.items()):
                if done(n, cause):
                    pending.pop(n)
            return not pending
        if not self.wait_for(step, timeout, every=POLL):
            for n in pending:
                said = what.format(n=n, p=self.partner(n))
                self.problem(f"fault {f.n}: {said} within {timeout:.0f} s: {self._states()}")

    def _took_over(self, n: str, cause: int) -> bool:
        """Does ``n``'s partner serve its LUNs? Then record the takeover, timed by the
        partner's ``ha_took_over`` event."""
        p = self.partner(n)
        hosted = (self.ha(p) or {}).get("hosted")
        if not isinstance(hosted, dict) or hosted.get("name") != n:
            return False
        t0 = self.rec.h.events[cause].t
        t = self.events_since(p, "ha_took_over", t0, partner=n) or time.time()
        luns = lun_list([int(x) for x in hosted.get("luns") or []])
        self.rec.event(t, "takeover", f"{p} serves {n}'s LUNs {luns}", node=p, cause=cause)
        self.say(f"takeover: {_letter(p)} serves {n}'s LUNs {luns} "
                 f"({hosted.get('replication')}), {t - t0:.1f} s after the fault")
        return True

    def _handed_back(self, n: str, cause: int) -> bool:
        """Does ``n`` serve its own LUNs again, its partner none of them? Then record the
        handback, timed by ``n``'s ``ha_serving_own`` event."""
        p = self.partner(n)
        st, pha = self.core_status(n), self.ha(p)
        ha = (st or {}).get("ha") or {}
        if (st is None or pha is None or ha.get("mode") != "active" or not st.get("luns")
                or pha.get("hosting_partner") or pha.get("hosted")):
            return False
        t0 = self.rec.h.events[cause].t
        t = self.events_since(n, "ha_serving_own", t0) or time.time()
        self.rec.event(t, "handback", f"{p} handed {n}'s LUNs back", node=n, cause=cause)
        self.say(f"handback: {_letter(n)} serves its LUNs again, {t - t0:.1f} s after the "
                 f"restart or heal")
        return True


__all__ = ["HaDrill"]
