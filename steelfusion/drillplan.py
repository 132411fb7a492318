"""The drill's options and its seeded fault schedule: plain data, no I/O (issue 10, item 3).

:func:`build_schedule` draws every fault from ``random.Random(seed)`` before anything runs,
so the same seed replays the same schedule (the system's timing varies, of course). Targets
are roles (the primary, the primary's site), resolved by the runner (steelfusion/drill.py)
when the fault starts: after a failover "the primary" is the other Core.

``drill --ha`` (issue 16) runs on the Core HA lab instead (steelfusion/drillha.py): four
Cores that never change places, so its targets are the Cores themselves (:data:`HA_CORES`),
and its kinds are :data:`HA_KINDS`.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence

FAULT_KINDS = ("kill", "stop", "partition", "isolate", "wan", "operator", "journal", "outage",
               "san")
"""What a drill can inject (``--faults``): SIGKILL then restart; SIGSTOP then SIGCONT; a cut
between two sites (or one way, or one Core interface down); the primary isolated from its
peer and the Witness while its Edges still reach it, with the runbook's failover; a slow,
lossy link; an operator's suspend then resume; a Core's Journal LUN out of space or offline
(on the lab's failing disk, :mod:`steelfusion.faultdisk`), on a suspended primary or not; the
branch cut from both data centers for a minute or more (the Edges' reserve fills and host
writes stall); a data center's storage array down (``--san tgt`` labs only)."""
DEFAULT_KINDS = FAULT_KINDS[:-1]
"""``--faults`` when not given, on a lab whose Cores keep their LUNs in files."""
SAN_KINDS = tuple(k for k in FAULT_KINDS if k != "journal")
"""``--faults`` when not given with ``--san``: the Journal LUN is on the array, so its faults
are the array's (``san``), not the lab's failing disk (``journal``)."""
HA_FAULT_KINDS = ("ha-kill", "ha-both", "ha-san")
"""The Core HA lab's own faults (``--ha`` only): SIGKILL one Core of an HA pair, wait for its
partner's takeover, restart it, wait for the handback; the same for Y and Y' (or X and X')
together; one primary Core cut from its array (its SAN path), then healed."""
HA_KINDS = ("kill", "stop", *HA_FAULT_KINDS)
"""What ``drill --ha`` injects (and ``--faults all`` means there): the HA faults, and a plain
SIGKILL or SIGSTOP of one of the four Cores (no wait for the takeover: a short one may heal
before the partner acts). The netns faults need sites and links the loopback HA lab does not
have; ``operator``, ``journal`` and ``san`` act on a single Core pair's runbook."""
HA_CORES = ("core-a1", "core-a2", "core-b1", "core-b2")
"""The HA lab's Cores in ``lab.json`` order (steelfusion/labha.py ``SEATS``): X, Y, X', Y'."""
HA_LETTERS = {"core-a1": "X", "core-a2": "Y", "core-b1": "X'", "core-b2": "Y'"}
HA_BOTH = ("core-a2+core-b2", "core-a1+core-b1")
"""``ha-both`` targets: Y and Y' (X serves Y's LUNs, X' Y''s), or X and X'."""
HA_SAN = ("core-a1", "core-a2")
"""``ha-san`` targets: a primary Core (the secondaries' arrays carry replicas only)."""
GAP = (4.0, 10.0)
"""Seconds from one fault's start to the next one's (when the previous one is over)."""
HOLD = (2.0, 8.0)
"""Seconds a fault lasts before it is healed."""
OUTAGE = (60.0, 100.0)
"""Seconds a branch outage lasts: long enough to fill the drill's reserve, short enough that
no stalled host write reaches STALL_LIMIT."""
OUTAGE_EVERY = 600.0
"""At most one branch outage in this many seconds of schedule (others become partitions)."""
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(s|sec|m|min|h)?\s*$", re.IGNORECASE)
_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
MIN_DURATION = 10.0
MAX_DURATION = 7 * 86400.0
#: site pairs a partition cuts: role-relative, resolved when the fault starts
PARTITION_PAIRS = (("primary-site", "secondary-site"), ("primary-site", "witness"),
                   ("secondary-site", "witness"), ("branch", "primary-site"))
#: links a WAN fault degrades
WAN_PAIRS = (("branch", "primary-site"), ("branch", "secondary-site"),
             ("primary-site", "secondary-site"), ("primary-site", "witness"),
             ("secondary-site", "witness"))
WAN_RATES = (0.0, 100e6 / 8, 50e6 / 8, 20e6 / 8)  # bytes/s; 0: unlimited


class DrillError(Exception):
    """The drill cannot start or went wrong; the message is one line saying what to do."""


# --- options -----------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """``5m``, ``90s``, ``120`` (seconds), ``1h`` -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise DrillError(f"--duration {text!r} is not a duration: give e.g. 5m, 90s or 1h")
    seconds = float(m.group(1)) * _UNITS[(m.group(2) or "s").lower()]
    if not MIN_DURATION <= seconds <= MAX_DURATION:
        raise DrillError(f"--duration {text!r}: give {MIN_DURATION:g}s to 7 days (a drill "
                         f"injects a fault every {GAP[0]:g}-{GAP[1]:g} s)")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds as ``--duration`` takes them back: 2m, 90s."""
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def parse_faults(text: str | None, san: str | None = None,
                 ha: bool = False) -> tuple[str, ...]:
    """``kill,partition`` -> the kinds, in :data:`FAULT_KINDS` order; ``all`` (or None) for
    every kind the lab can inject: ``san`` needs arrays (``--san``), ``journal`` needs the
    Journal LUN in a file (not with ``--san``); with ``ha`` the kinds are :data:`HA_KINDS`,
    and the HA kinds are refused without it."""
    usable = HA_KINDS if ha else SAN_KINDS if san else DEFAULT_KINDS
    words = [w.strip().lower() for w in (text or "all").split(",") if w.strip()]
    if words == ["all"]:
        return usable
    bad = [w for w in words if w not in (*FAULT_KINDS, *HA_FAULT_KINDS)]
    if bad or not words:
        what = f"{bad[0]!r} is not a fault kind" if bad else "no fault kind given"
        raise DrillError(f"--faults {text!r}: {what}; choose from {','.join(usable)} "
                         f"(comma-separated) or all")
    if ha:
        other = [w for w in words if w not in HA_KINDS]
        if other:
            raise DrillError(f"--faults {other[0]}: not a fault of the HA drill (loopback, four "
                             f"Cores, no sites or links); with --ha choose from "
                             f"{','.join(HA_KINDS)}")
        return tuple(k for k in HA_KINDS if k in words)
    ha_only = [w for w in words if w in HA_FAULT_KINDS]
    if ha_only:
        raise DrillError(f"--faults {ha_only[0]}: an HA fault needs the Core HA lab; add --ha "
                         f"(its kinds: {','.join(HA_KINDS)})")
    if "san" in words and not san:
        raise DrillError("--faults san: the array outage needs arrays in the lab; add --san tgt")
    if "journal" in words and san:
        raise DrillError("--faults journal: with --san the Journal LUN is on the array, whose "
                         "outage is --faults san; leave journal out")
    return tuple(k for k in FAULT_KINDS if k in words)


# --- the schedule --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fault:
    """One planned fault. ``target`` is a role or node (``primary``, ``secondary``,
    ``witness``, ``edge-2``) or, for partition and wan, ``SITE|SITE`` with role-relative sites
    (``primary-site``); ``iface`` marks a partition that takes the site's second interface
    down instead of cutting a link."""

    n: int
    at: float
    kind: str
    target: str
    hold: float
    one_way: bool = False
    iface: bool = False
    delay: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    rate: float = 0.0
    mode: str = ""  # journal: full or offline
    suspend: bool = False  # journal: coredr suspend first, so the journal is in use

    def describe(self) -> str:
        a, _, b = self.target.partition("|")
        if self.kind in HA_FAULT_KINDS:
            return self._describe_ha()
        if self.kind == "kill":
            return f"SIGKILL {self.target}, start it again after {self.hold:g} s"
        if self.kind == "stop":
            return f"SIGSTOP {self.target}, SIGCONT after {self.hold:g} s"
        if self.kind == "partition" and self.iface:
            return f"{a} interface 1 down for {self.hold:g} s"
        if self.kind == "partition":
            how = f"{a} -> {b} (one way)" if self.one_way else f"{a} <-> {b}"
            return f"cut {how} for {self.hold:g} s"
        if self.kind == "isolate":
            return (f"isolate the primary from its peer and the Witness (Edges still reach it), "
                    f"coredr failover on the secondary, heal {self.hold:g} s later, resume")
        if self.kind == "journal":
            how = "out of space" if self.mode == "full" else "offline"
            first = "coredr suspend on the primary, then " if self.suspend else ""
            return (f"{first}{self.target}'s Journal LUN {how} for {self.hold:g} s, then back"
                    + (", resume" if self.suspend else ""))
        if self.kind == "san":
            return (f"the {self.target}'s storage array down (SIGKILL its tgtd) for "
                    f"{self.hold:g} s, then back")
        if self.kind == "outage":
            return (f"cut the branch from both data centers for {self.hold:g} s (the Edges "
                    f"buffer, then host writes stall)")
        if self.kind == "wan":
            rate = "unlimited" if not self.rate else f"{self.rate * 8 / 1e6:g}mbit"
            return (f"degrade {a} <-> {b}: delay {self.delay * 1000:.0f}ms jitter "
                    f"{self.jitter * 1000:.0f}ms loss {self.loss * 100:.2f}% rate {rate} for "
                    f"{self.hold:g} s")
        return f"coredr suspend on the primary, resume after {self.hold:g} s"

    def _describe_ha(self) -> str:
        names = self.target.split("+")
        who = " and ".join(f"{n} ({HA_LETTERS.get(n, '?')})" for n in names)
        if self.kind == "ha-san":
            return (f"cut {who} from its array, wait for its partner's takeover, heal after "
                    f"{self.hold:g} s, wait for the handback")
        return (f"SIGKILL {who}, wait for the partner's takeover, start again after "
                f"{self.hold:g} s, wait for the handback")


def build_schedule(seed: int, duration: float, kinds: Sequence[str],
                   edges: int = 1, ha: bool = False) -> list[Fault]:
    """Every fault of a drill, drawn from ``random.Random(seed)`` alone: the same arguments give
    the same schedule. Faults are planned every U(4, 10) s from the start while before
    ``duration``; each draws the same number of values whatever its kind, so the kinds
    enabled change which faults come but not how the rest of the stream is consumed.
    ``ha``: the Core HA lab's schedule (:data:`HA_KINDS`; kill and stop hit one of
    :data:`HA_CORES`)."""
    if not kinds:
        raise ValueError("no fault kinds")
    allowed = HA_KINDS if ha else FAULT_KINDS
    wrong = [k for k in kinds if k not in allowed]
    if wrong:
        raise ValueError(f"fault kind {wrong[0]!r} is not one of {allowed}")
    rng = random.Random(seed)
    nodes = HA_CORES if ha else ("witness", "primary", "secondary",
                                 *(f"edge-{i + 1}" for i in range(edges)))
    out: list[Fault] = []
    last_outage = -OUTAGE_EVERY
    at = rng.uniform(*GAP)
    while at < duration:
        kind = kinds[rng.randrange(len(kinds))]
        hold = round(rng.uniform(*HOLD), 1)
        node = nodes[rng.randrange(len(nodes))]
        pair = PARTITION_PAIRS[rng.randrange(len(PARTITION_PAIRS))]
        wan = WAN_PAIRS[rng.randrange(len(WAN_PAIRS))]
        r_one_way, r_swap, r_iface = rng.random(), rng.random(), rng.random()
        delay = round(rng.uniform(0.010, 0.050), 3)
        jitter = round(rng.uniform(0.0, 0.010), 3)
        loss = round(rng.uniform(0.001, 0.02), 4)
        rate = WAN_RATES[rng.randrange(len(WAN_RATES))]
        f = Fault(len(out) + 1, round(at, 1), kind, node, hold)
        if kind == "partition":
            if r_iface < 0.15:
                site = ("primary-site", "secondary-site")[r_swap < 0.5]
                f = dataclasses.replace(f, target=f"{site}|", iface=True)
            else:
                a, b = pair if r_swap < 0.5 else pair[::-1]
                f = dataclasses.replace(f, target=f"{a}|{b}", one_way=r_one_way < 0.3)
        elif kind == "wan":
            f = dataclasses.replace(f, target="|".join(wan), delay=delay, jitter=jitter,
                                    loss=loss, rate=rate)
        elif kind in ("isolate", "operator"):
            f = dataclasses.replace(f, target="primary")
        elif kind == "journal":
            target = "primary" if r_swap < 0.7 else "secondary"
            f = dataclasses.replace(f, target=target, mode="full" if r_one_way < 0.5
                                    else "offline", suspend=target == "primary" and r_iface < 0.6)
        elif kind == "san":
            f = dataclasses.replace(f, target="primary" if r_swap < 0.7 else "secondary")
        elif kind == "ha-both":
            f = dataclasses.replace(f, target=HA_BOTH[r_swap >= 0.5])
        elif kind == "ha-san":
            f = dataclasses.replace(f, target=HA_SAN[r_swap >= 0.5])
        elif kind == "outage" and at - last_outage >= OUTAGE_EVERY:
            last_outage = at
            span = (hold - HOLD[0]) / (HOLD[1] - HOLD[0])
            f = dataclasses.replace(f, target="branch|data-centers",
                                    hold=round(OUTAGE[0] + span * (OUTAGE[1] - OUTAGE[0]), 1))
        elif kind == "outage":  # one long outage per OUTAGE_EVERY: a short cut instead
            f = dataclasses.replace(f, kind="partition", target="branch|primary-site")
        out.append(f)
        at += rng.uniform(*GAP)
    return out
