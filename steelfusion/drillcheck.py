"""The checker of `steelfusion drill` (issue 10, item 3): sans-IO, fed by the drill runner.

The runner drives hosts (qemu-io through real iSCSI), injects faults and samples the nodes;
it records what it saw in a :class:`History` and, once everything is healed and drained,
hands :func:`check` the images it read back (the Edge's read-back, each Core's LUN files).
Nothing here does I/O beyond reading those images, so every check is tested with
hand-built histories (tests/test_drillcheck.py) — a checker that cannot fail proves nothing.

**Workload model.** Every block a host writes is self-describing
(:mod:`steelfusion.drillpayload`): any block read back from any copy is attributed to the one
write that produced it, or found to be a value no write produced (torn, corrupt, another
run's data), or never-written zeros.

**Which value may a block hold** (the rule of Jepsen's register checkers, per block). A write
*w* takes effect at some instant between its start and its end; an acknowledged write ends at
its acknowledgement, a failed one at its error (SCSI leaves the blocks of a failed WRITE
undefined, so it may have landed), and an indeterminate one never ends (its answer never came:
it may land at any time after it started). A block may hold *w*'s value if *w* covers the block
and is not superseded: no acknowledged write to the block STARTED after *w* ENDED. Writes that
overlap in time may land in either order, so either value is fine. Zeros are fine only where no
acknowledged write covers the block. Where a block holds a value it may not, the acknowledged
writes that should be visible there (the ones not superseded themselves that started after the
found value's write ended) are *lost* on that copy; RPO counts lost acknowledged writes over all
copies and must be 0.

**Other checks.** Values no write produced (corrupt/torn, a valid block of another LUN or
block, a write id the history does not know or that never covered the block); Core images that
differ once healed and running; split brain — an interval in which two Cores both acknowledged
Edge writes (from the runner's node samples); a node's epoch going backwards, or two nodes
primary at the same epoch; failovers after which writes never resumed. RTO per failover (and
failback): from the failure that caused it and from the operator's command to the first write
committed on the new primary.

**Core HA** (``drill --ha``, issue 16): both primaries acknowledge at once by design (each
its own LUNs), so split brain and shared epochs are looked for within a sample's ``group``
(its replication pair). Node ``P@H`` is Core P's LUNs served by its partner H after a
takeover: P and P@H acknowledging at once is split brain (the fence failed), sharing P's
epoch is not. A Core copy names the LUNs it must hold (``expect``). Takeovers and handbacks
are timed from the runner's ``takeover``/``handback`` events and their ``cause``
(:class:`HaStep`).

The runner's side, in short::

    h = History()
    h.write_started(wid, lun, first, n, time.time())    # data: payloads(seed, wid, lun, first, n)
    h.write_ended(wid, time.time(), "ok")               # or "failed", "indeterminate"
    h.write_committed(wid, t)                           # if it tracks the Edge's commits
    h.node_state(t, "core-a", "primary", 3, "running", acking=True)
    kill = h.event(t, "kill", "SIGKILL core-a", node="core-a")
    h.event(t, "failover", "coredr failover", node="core-b", cause=kill)
    result = check(h, [Copy("edge", "edge", {0: "readback0.img"}),
                       Copy("core-a", "core", {0: "core-a/lun0.img"}), ...], seed, replay=cmd)
    print(drillreport.render_text(result))
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from steelfusion.drillpayload import (
    BAD,
    BLOCK,
    CHUNK_BYTES,
    GARBAGE,
    TORN,
    VALID,
    WHY,
    WRITE_ID_MAX,
    ZERO,
    Image,
    Scan,
    as_array,
    check_size,
    scan,
)
from steelfusion.drillpayload import payloads as payloads  # re-exported: drill.py writes them

OUTCOMES = ("ok", "failed", "indeterminate")
FAULT_KINDS = frozenset({"kill", "stop", "cont", "partition", "wan", "journal", "restart"})
"""Event kinds that are injected faults (the timeline paints them red)."""
OPERATOR_KINDS = frozenset({"suspend", "resume", "failover", "failback"})
"""Event kinds that are operator actions from the runbook."""
HA_KINDS = ("takeover", "handback")
"""Event kinds that are Core HA's own moves (``drill --ha``), each naming its ``cause``."""
CAUSE_KINDS = ("kill", "stop", "partition")
"""Faults that can make a failover necessary (the start of its RTO when none is named)."""

MAX_FINDINGS_PER_KIND = 200
"""Findings kept per kind; the rest are counted (a whole lost LUN must not make a 1 GB report)."""


# --- history -------------------------------------------------------------------------------

@dataclass
class Write:
    """One host write: blocks [first, first + nblocks) of ``lun``."""

    id: int
    lun: int
    first: int
    nblocks: int
    start: float
    end: float | None = None
    outcome: str | None = None
    """ok, failed, indeterminate; None while (or if ever) no answer came: indeterminate."""
    committed: float | None = None
    """When the Edge learned the Core acknowledged it, if the runner tracks commits."""

    @property
    def acked(self) -> bool:
        return self.outcome == "ok"

    def may_land_until(self) -> float:
        """The latest instant this write may take effect: its answer, or never for a write
        whose answer never came."""
        if self.outcome in ("ok", "failed") and self.end is not None:
            return self.end
        return math.inf


@dataclass
class NodeSample:
    """What the runner saw of one node. ``acking``: the node acknowledged Edge writes during
    (since, t] (e.g. its applied sequence number moved); ``since`` defaults to the time of the
    node's previous sample, and a node's first sample without it is an instant."""

    t: float
    node: str
    role: str | None
    epoch: int | None
    state: str | None
    acking: bool
    since: float | None = None
    group: str | None = None
    """The LUNs the node speaks for (an HA lab's replication pair); None: every node's."""

    @property
    def persona(self) -> str:
        """The Core whose LUNs these are: ``P`` for ``P@H`` (P's LUNs served by H)."""
        return self.node.partition("@")[0]


@dataclass
class Event:
    """A fault the runner injected or an operator action: ``kind`` (kill, stop, cont,
    partition, heal, wan, journal, suspend, resume, failover, failback, ...), free ``detail``,
    the ``node`` it concerns (for failover/failback: the Core promoted) and, for a failover,
    ``cause``: the index of the fault that made it necessary (its RTO starts there)."""

    t: float
    kind: str
    detail: str = ""
    node: str | None = None
    cause: int | None = None


@dataclass
class Latency:
    t: float
    seconds: float
    lun: int | None = None


def _time(t: float, what: str) -> float:
    """Times must be finite numbers: a NaN would make every comparison quietly false."""
    try:
        f = float(t)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: time {t!r} is not a number") from None
    if not math.isfinite(f):
        raise ValueError(f"{what}: time {t!r} is not finite")
    return f


class History:
    """Everything the drill runner saw, fed as things happen.

    Times are seconds on one clock for everything; wall-clock time (``time.time()``) lets
    findings be matched with the nodes' JSON logs. Writes and events may be recorded in any
    order of times; one node's samples come in time order (or each with ``since``). Input
    that cannot be right (a write ending twice or before it started, an unknown outcome) is
    refused with ValueError at once, so a runner bug is not mistaken for a finding."""

    def __init__(self) -> None:
        self.writes: dict[int, Write] = {}
        self.samples: list[NodeSample] = []
        self.events: list[Event] = []
        self.latencies: list[Latency] = []
        self._last_sample: dict[str, float] = {}

    def write_started(self, id: int, lun: int, first_block: int, nblocks: int,
                      t: float) -> None:
        if id in self.writes:
            raise ValueError(f"write id {id} started twice; write ids must be unique")
        if (nblocks <= 0 or first_block < 0 or not 0 <= lun <= 0xFFFFFFFF
                or not 0 <= id <= WRITE_ID_MAX):
            raise ValueError(f"write {id}: LUN {lun}, first block {first_block}, "
                             f"{nblocks} blocks: all must be >= 0 (id and LUN fit the block "
                             f"header: 64 and 32 bits) and the count > 0")
        self.writes[id] = Write(id, lun, first_block, nblocks, _time(t, f"write {id}"))

    def write_ended(self, id: int, t: float, outcome: str) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"write {id}: outcome {outcome!r} is not one of {OUTCOMES}")
        w = self._write(id)
        if w.outcome is not None:
            raise ValueError(f"write {id} ended twice ({w.outcome}, then {outcome})")
        end = _time(t, f"write {id}")
        if end < w.start:
            raise ValueError(f"write {id} ended at {end} before it started at {w.start}")
        w.end, w.outcome = end, outcome

    def write_committed(self, id: int, t: float) -> None:
        """The Edge learned a Core acknowledged write ``id`` (the RTO ends at the first one
        after a failover, as the host's acknowledgement comes from the Edge's cache)."""
        w = self._write(id)
        c = _time(t, f"write {id} commit")
        if c < w.start:
            raise ValueError(f"write {id} committed at {c} before it started at {w.start}")
        w.committed = c if w.committed is None else min(w.committed, c)

    def node_state(self, t: float, node: str, role: str | None, epoch: int | None,
                   state: str | None, acking: bool, since: float | None = None,
                   group: str | None = None) -> None:
        t = _time(t, f"sample of {node}")
        last = self._last_sample.get(node)
        if since is None:
            if last is not None and t < last:
                raise ValueError(f"sample of {node} at {t} is older than its previous one "
                                 f"({last}): give since= or record samples in time order")
            since = t if last is None else last
        elif (since := _time(since, f"sample of {node}")) > t:
            raise ValueError(f"sample of {node}: since={since} is after t={t}")
        self._last_sample[node] = t if last is None else max(t, last)
        self.samples.append(NodeSample(t, node, role, epoch, state, bool(acking), since,
                                       group))

    def event(self, t: float, kind: str, detail: str = "", node: str | None = None,
              cause: int | None = None) -> int:
        """Record an event; returns its index (pass it as ``cause`` of a failover)."""
        if cause is not None and not 0 <= cause < len(self.events):
            raise ValueError(f"event cause {cause} is not the index of an earlier event")
        self.events.append(Event(_time(t, f"event {kind}"), kind, detail, node, cause))
        return len(self.events) - 1

    def write_latency(self, t: float, seconds: float, lun: int | None = None) -> None:
        self.latencies.append(Latency(_time(t, "latency"), _time(seconds, "latency value"),
                                      lun))

    def _write(self, id: int) -> Write:
        try:
            return self.writes[id]
        except KeyError:
            raise ValueError(f"write {id} was never started") from None

    def latency_points(self) -> list[tuple[float, float]]:
        """(time, seconds) of each write's latency: the runner's samples, else each
        acknowledged write's start to acknowledgement."""
        if self.latencies:
            return sorted((x.t, x.seconds) for x in self.latencies)
        return sorted((w.end, w.end - w.start) for w in self.writes.values()
                      if w.acked and w.end is not None)

    def span(self) -> tuple[float, float]:
        """First and last time anything happened (0, 0 for an empty history)."""
        ts: list[float] = [e.t for e in self.events]
        ts += [s.t for s in self.samples] + [s.since for s in self.samples if s.since is not None]
        ts += [x.t for x in self.latencies]
        for w in self.writes.values():
            ts.append(w.start)
            ts += [x for x in (w.end, w.committed) if x is not None]
        return (min(ts), max(ts)) if ts else (0.0, 0.0)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for saving beside the report and re-checking offline."""
        return {"writes": [asdict(w) for w in self.writes.values()],
                "samples": [asdict(s) for s in self.samples],
                "events": [asdict(e) for e in self.events],
                "latencies": [asdict(x) for x in self.latencies]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> History:
        h = cls()
        for w in d.get("writes", []):
            h.writes[int(w["id"])] = Write(**w)
        h.samples = [NodeSample(**s) for s in d.get("samples", [])]
        h.events = [Event(**e) for e in d.get("events", [])]
        h.latencies = [Latency(**x) for x in d.get("latencies", [])]
        for s in h.samples:
            h._last_sample[s.node] = max(s.t, h._last_sample.get(s.node, s.t))
        return h


# --- result --------------------------------------------------------------------------------

@dataclass
class Finding:
    """One thing wrong, with what it takes to debug it. ``blocks``: inclusive ranges."""

    kind: str
    message: str
    copy: str | None = None
    lun: int | None = None
    blocks: list[list[int]] = field(default_factory=list)
    write_id: int | None = None
    t: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rto:
    """Recovery time of one failover (or failback)."""

    kind: str
    command_t: float
    new_primary: str | None
    cause_kind: str | None = None
    cause_t: float | None = None
    takeover_t: float | None = None
    recovered_t: float | None = None
    basis: str | None = None
    """What marks recovery: ``commit`` (first write committed after the takeover),
    ``acking`` (the new primary sampled acknowledging) or ``host_ack`` (a host write
    acknowledged: weak, the Edge acknowledges from its cache)."""
    from_failure: float | None = None
    from_command: float | None = None


@dataclass
class HaStep:
    """One Core HA move: a ``takeover`` (``node`` serves ``core``'s LUNs) or a ``handback``
    (``core`` serves its own again), timed from its cause: the fault (SIGKILL, the SAN path
    cut) for a takeover, the restart or heal for a handback."""

    kind: str
    t: float
    node: str | None
    core: str | None
    cause_kind: str | None = None
    cause_t: float | None = None
    seconds: float | None = None
    detail: str = ""


FINDING_KINDS = ("lost_write", "corrupt", "misplaced", "phantom", "image_size", "missing_image",
                 "cores_differ", "split_brain", "epoch_backward", "epoch_shared",
                 "no_recovery")
"""Every kind of finding, in the order reports list them."""


@dataclass
class Result:
    passed: bool
    rpo: int
    lost_write_ids: list[int]
    findings: dict[str, list[Finding]]
    finding_counts: dict[str, int]
    """Findings per kind, including those beyond :data:`MAX_FINDINGS_PER_KIND`."""
    counts: dict[str, int]
    per_copy: dict[str, dict[str, int]]
    rto: list[Rto]
    faults: dict[str, int]
    """Events injected or run, by kind."""
    replay: str
    seed: int
    t0: float = 0.0
    """When the history began (reports show times relative to it)."""
    t1: float = 0.0
    ha: list[HaStep] = field(default_factory=list)
    """Takeovers and handbacks (``drill --ha``), in time order."""


def ranges(blocks: Iterable[int]) -> list[list[int]]:
    """Sorted block numbers as inclusive ranges: [1, 2, 3, 7] -> [[1, 3], [7, 7]]."""
    out: list[list[int]] = []
    for b in sorted(set(blocks)):
        if out and b == out[-1][1] + 1:
            out[-1][1] = b
        else:
            out.append([b, b])
    return out


def _runs(mask: npt.NDArray[np.bool_]) -> Iterator[tuple[int, int]]:
    """Inclusive [first, last] of each run of True in ``mask``."""
    if not len(mask):
        return
    m = np.concatenate(([False], mask, [False])).astype(np.int8)
    d = np.diff(m)
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        yield s, e - 1


def _fmt_ranges(rs: Sequence[Sequence[int]], limit: int = 8) -> str:
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in rs[:limit]]
    if len(rs) > limit:
        parts.append(f"... ({len(rs) - limit} more ranges)")
    return ",".join(parts)


@dataclass
class Copy:
    """One copy of the data to check: the Edge's read-back or a Core's LUN images, by LUN."""

    name: str
    kind: Literal["edge", "core"]
    images: Mapping[int, Image]
    expect: frozenset[int] | None = None
    """The LUNs a Core copy must hold; None: every LUN the history wrote."""


class _Findings:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept: dict[str, list[Finding]] = defaultdict(list)
        self.count: Counter[str] = Counter()

    def add(self, f: Finding) -> None:
        self.count[f.kind] += 1
        if len(self.kept[f.kind]) < self.limit:
            self.kept[f.kind].append(f)


class _LunWrites:
    """A LUN's writes as arrays (by write id, sorted) and the latest start of an acknowledged
    write per block (a value from a write that ended before it is superseded)."""

    def __init__(self, writes: list[Write]) -> None:
        self.writes = sorted(writes, key=lambda w: w.id)
        self.ids = np.array([w.id for w in self.writes], dtype=np.uint64)
        self.first = np.array([w.first for w in self.writes], dtype=np.int64)
        self.n = np.array([w.nblocks for w in self.writes], dtype=np.int64)
        self.until = np.array([w.may_land_until() for w in self.writes], dtype=np.float64)
        self.acked = [w for w in self.writes if w.acked]
        self.nblocks = max((w.first + w.nblocks for w in self.writes), default=0)
        self.max_acked_start = np.full(self.nblocks, -np.inf)
        for w in sorted(self.acked, key=lambda w: w.start):
            self.max_acked_start[w.first:w.first + w.nblocks] = w.start


def _describe(sc: Scan, b: int, lw: _LunWrites, total: int) -> dict[str, Any]:
    """What copy block ``b`` holds, for a finding."""
    if b >= total:
        return {"found": "missing (beyond the end of the image)"}
    st = int(sc.status[b])
    if st == ZERO:
        return {"found": "zeros"}
    if st == BAD:
        why = int(sc.why[b]) if sc.why is not None else GARBAGE
        out_bad: dict[str, Any] = {"found": WHY.get(why, "a value no write produced")}
        if why == TORN:
            out_bad.update(header_write=int(sc.wid[b]), header_lun=int(sc.lun[b]),
                           header_block=int(sc.block[b]))
            out_bad["found"] += (f" (its header names write {out_bad['header_write']}, LUN "
                                 f"{out_bad['header_lun']} block {out_bad['header_block']})")
        return out_bad
    wid = int(sc.wid[b])
    out: dict[str, Any] = {"found": f"write {wid}", "found_write": wid,
                           "found_lun": int(sc.lun[b]), "found_block": int(sc.block[b])}
    i = int(np.searchsorted(lw.ids, wid))
    if i < len(lw.ids) and int(lw.ids[i]) == wid:
        w = lw.writes[i]
        out.update(found_start=w.start, found_end=w.end, found_outcome=w.outcome)
    return out


def _check_lun(copy: Copy, lun: int, image: Image, lw: _LunWrites, seed: int, size: int,
               fs: _Findings, lost: dict[int, set[str]], stats: Counter[str]) -> None:
    try:
        sc = scan(seed, image, size)
    except ValueError as e:
        raise ValueError(f"copy {copy.name} LUN {lun}: {e}") from None
    total = len(sc)
    nb = max(total, lw.nblocks)
    if sc.tail or total < lw.nblocks:
        fs.add(Finding("image_size", f"{copy.name} LUN {lun}: image is {total} blocks"
                       + (f" + {sc.tail} bytes" if sc.tail else "")
                       + f"; writes reached block {lw.nblocks - 1}",
                       copy=copy.name, lun=lun,
                       detail={"image_blocks": total, "tail_bytes": sc.tail,
                               "written_blocks": lw.nblocks}))
    status = np.full(nb, ZERO, np.uint8)
    status[:total] = sc.status
    hl = np.zeros(nb, np.uint64)
    hb = np.zeros(nb, np.uint64)
    wid = np.zeros(nb, np.uint64)
    hl[:total], hb[:total], wid[:total] = sc.lun, sc.block, sc.wid
    mas = np.full(nb, -np.inf)
    mas[:lw.nblocks] = lw.max_acked_start
    here = np.arange(nb, dtype=np.uint64)
    stats["blocks_checked"] += total

    valid = status == VALID
    placed = valid & (hl == np.uint64(lun)) & (hb == here)
    misplaced = valid & ~placed
    # the write a placed block names, if the history has it and it covered the block
    idx = np.searchsorted(lw.ids, wid) if len(lw.ids) else np.zeros(nb, np.int64)
    idx = np.minimum(idx, max(len(lw.ids) - 1, 0))
    known = placed & (lw.ids[idx] == wid) if len(lw.ids) else np.zeros(nb, bool)
    bi = here.astype(np.int64)
    covers = np.zeros(nb, bool)
    until = np.full(nb, -np.inf)
    if len(lw.ids):
        covers = known & (lw.first[idx] <= bi) & (bi < lw.first[idx] + lw.n[idx])
        until = np.where(covers, lw.until[idx], -np.inf)
    phantom = placed & ~covers
    bad = status == BAD
    fine = np.where(covers, mas <= until, (status == ZERO) & (mas == -np.inf))
    wrong = ~fine
    # a value the found write could not leave there: zeros, garbage or an unknown value
    # hide every acknowledged write frontier; a stale write hides those started after it
    hidden_after = np.where(covers, until, -np.inf)

    for kind, mask, what in (("corrupt", bad, "hold a value no write produced"),
                             ("misplaced", misplaced, "hold a valid block of another LUN or "
                              "block"),
                             ("phantom", phantom, "hold a write the history does not have "
                              "there")):
        for a, b in _runs(mask):
            d = _describe(sc, a, lw, total)
            first = (f"{d['found']} for LUN {d['found_lun']} block {d['found_block']}"
                     if "found_lun" in d else d["found"])
            fs.add(Finding(kind, f"{copy.name} LUN {lun} blocks {_fmt_ranges([[a, b]])} {what} "
                           f"(block {a}: {first})",
                           copy=copy.name, lun=lun, blocks=[[a, b]],
                           write_id=d.get("found_write"), detail=d))

    if not wrong.any():
        return
    csum = np.concatenate(([0], np.cumsum(wrong)))
    explained = bad | misplaced | phantom
    for w in lw.acked:
        lo, hi = w.first, w.first + w.nblocks
        if csum[hi] == csum[lo]:
            continue
        assert w.end is not None
        sl = slice(lo, hi)
        hit = wrong[sl] & (w.end >= mas[sl]) & (w.start > hidden_after[sl])
        if not hit.any():
            continue
        explained[sl] |= hit
        blocks = (np.flatnonzero(hit) + lo).tolist()
        rs = ranges(blocks)
        d = _describe(sc, blocks[0], lw, total)
        lost[w.id].add(copy.name)
        stats["lost_blocks"] += len(blocks)
        fs.add(Finding("lost_write",
                       f"{copy.name} LUN {lun}: acknowledged write {w.id} "
                       f"(started {w.start:.3f}, acked {w.end:.3f}) is lost on blocks "
                       f"{_fmt_ranges(rs)}; block {blocks[0]} holds {d['found']}",
                       copy=copy.name, lun=lun, blocks=rs, write_id=w.id, t=w.end,
                       detail={"start": w.start, "acked": w.end, "committed": w.committed,
                               **d}))
    # every block that may not hold what it holds is a finding: a value no write produced or
    # an acknowledged write that should be there (the frontier argument in the module doc)
    unexplained = np.flatnonzero(wrong & ~explained)
    if len(unexplained):
        raise AssertionError(f"checker bug: {copy.name} LUN {lun} blocks "
                             f"{_fmt_ranges(ranges(unexplained.tolist()))} are wrong but no "
                             f"finding explains them")


def _compare(a: Copy, b: Copy, lun: int, size: int, fs: _Findings) -> None:
    ia, ib = as_array(a.images[lun]), as_array(b.images[lun])
    n = min(len(ia), len(ib)) // size
    differ: list[int] = []
    step = max(1, CHUNK_BYTES // size)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        ra = np.asarray(ia[lo * size:hi * size]).reshape(hi - lo, size)
        rb = np.asarray(ib[lo * size:hi * size]).reshape(hi - lo, size)
        differ += (np.flatnonzero((ra != rb).any(axis=1)) + lo).tolist()
    if len(ia) == len(ib) and not differ:
        return
    rs = ranges(differ)
    sizes = "" if len(ia) == len(ib) else f"; sizes differ ({len(ia)} vs {len(ib)} bytes)"
    fs.add(Finding("cores_differ",
                   f"{a.name} and {b.name} differ on LUN {lun}: {len(differ)} blocks "
                   f"({_fmt_ranges(rs)}){sizes}",
                   copy=f"{a.name}|{b.name}", lun=lun, blocks=rs[:64],
                   detail={"blocks_differing": len(differ), "ranges": len(rs),
                           "bytes": [len(ia), len(ib)]}))


def _acking_intervals(samples: Sequence[NodeSample]) -> dict[str, list[list[Any]]]:
    """Per node, merged [start, end, first sample] intervals in which it acknowledged."""
    out: dict[str, list[list[Any]]] = defaultdict(list)
    for s in sorted((s for s in samples if s.acking), key=lambda s: (s.node, s.t if s.since is None else s.since)):
        lo = s.t if s.since is None else min(s.since, s.t)
        iv = out[s.node]
        if iv and lo <= iv[-1][1]:
            iv[-1][1] = max(iv[-1][1], s.t)
        else:
            iv.append([lo, s.t, s])
    return out


def _split_brain(samples: Sequence[NodeSample], fs: _Findings) -> None:
    iv = _acking_intervals(samples)
    for na, nb in itertools.combinations(sorted(iv), 2):
        ga, gb = iv[na][0][2].group, iv[nb][0][2].group
        if ga is not None and gb is not None and ga != gb:  # another pair's LUNs
            continue
        for a0, a1, sa in iv[na]:
            for b0, b1, sb in iv[nb]:
                lo, hi = max(a0, b0), min(a1, b1)
                if hi > lo:
                    fs.add(Finding("split_brain",
                                   f"split brain: {na} (role {sa.role}, epoch {sa.epoch}) and "
                                   f"{nb} (role {sb.role}, epoch {sb.epoch}) both acknowledged "
                                   f"Edge writes during {lo:.3f}..{hi:.3f}",
                                   t=lo, detail={"nodes": [na, nb], "from": lo, "to": hi,
                                                 "epochs": [sa.epoch, sb.epoch],
                                                 "roles": [sa.role, sb.role]}))


def _epochs(samples: Sequence[NodeSample], fs: _Findings) -> None:
    last: dict[str, NodeSample] = {}
    # per group and epoch, the Cores (personas) seen primary there and when first
    primaries: dict[tuple[str | None, int], dict[str, float]] = defaultdict(dict)
    for s in sorted(samples, key=lambda s: s.t):
        if s.epoch is None:
            continue
        p = last.get(s.node)
        if p is not None and p.epoch is not None and s.epoch < p.epoch:
            fs.add(Finding("epoch_backward",
                           f"{s.node}: epoch went backwards from {p.epoch} (at {p.t:.3f}) to "
                           f"{s.epoch} (at {s.t:.3f})", t=s.t,
                           detail={"node": s.node, "from": p.epoch, "to": s.epoch,
                                   "from_t": p.t, "to_t": s.t}))
        last[s.node] = s
        if (s.role or "").lower() == "primary":
            primaries[s.group, s.epoch].setdefault(s.persona, s.t)
    for (_, epoch), nodes in sorted(primaries.items(), key=lambda kv: (kv[0][0] or "",
                                                                        kv[0][1])):
        if len(nodes) > 1:
            names = sorted(nodes, key=lambda n: nodes[n])
            fs.add(Finding("epoch_shared",
                           f"{' and '.join(names)} were both primary at epoch {epoch} "
                           f"(first seen at " + ", ".join(f"{nodes[n]:.3f}" for n in names)
                           + ")", t=min(nodes.values()),
                           detail={"epoch": epoch, "nodes": names,
                                   "first_seen": [nodes[n] for n in names]}))


def _rtos(h: History, fs: _Findings) -> list[Rto]:
    """RTO of each failover and failback, in command order."""
    evs = sorted(enumerate(h.events), key=lambda ie: ie[1].t)
    cmds = [(i, e) for i, e in evs if e.kind in ("failover", "failback")]
    samples = sorted(h.samples, key=lambda s: s.t)
    commits = sorted(w.committed for w in h.writes.values() if w.committed is not None)
    acks = sorted(w.end for w in h.writes.values() if w.acked and w.end is not None)
    out: list[Rto] = []
    for k, (_, cmd) in enumerate(cmds):
        prev_t = cmds[k - 1][1].t if k else -math.inf
        next_t = cmds[k + 1][1].t if k + 1 < len(cmds) else math.inf
        cause: Event | None = None
        if cmd.cause is not None:
            cause = h.events[cmd.cause]
        else:
            for _, e in evs:
                if prev_t <= e.t <= cmd.t and e.kind in CAUSE_KINDS:
                    cause = e
        before = [s.epoch for s in samples if s.t < cmd.t and s.epoch is not None]
        epoch_before = max(before, default=None)
        node = cmd.node
        takeover: float | None = None
        for s in samples:
            if s.t < cmd.t or s.t >= next_t or (s.role or "").lower() != "primary":
                continue
            if node is not None and s.node != node:
                continue
            if node is None and epoch_before is not None and (s.epoch or 0) <= epoch_before:
                continue
            takeover, node = s.t, s.node
            break
        r = Rto(cmd.kind, cmd.t, node, cause.kind if cause else None,
                cause.t if cause else None, takeover)
        start = cmd.t if takeover is None else takeover
        if commits:
            r.basis = "commit"
            r.recovered_t = next((c for c in commits if start <= c < next_t), None)
        else:
            acking = next((s.t for s in samples if s.acking and s.node == node
                           and start <= s.t < next_t), None)
            if acking is not None:
                r.basis, r.recovered_t = "acking", acking
            else:
                r.basis = "host_ack"
                r.recovered_t = next((a for a in acks if start <= a < next_t), None)
        if r.recovered_t is not None:
            r.from_command = r.recovered_t - cmd.t
            if cause is not None:
                r.from_failure = r.recovered_t - cause.t
        elif any(cmd.t <= w.start < next_t for w in h.writes.values()):
            fs.add(Finding("no_recovery",
                           f"{cmd.kind} at {cmd.t:.3f} to {node or 'a new primary'}: writes "
                           f"were sent after it but none was "
                           f"{'committed' if commits else 'acknowledged'} "
                           f"before the next failover or the end", t=cmd.t,
                           detail={"command_t": cmd.t, "new_primary": node,
                                   "takeover_t": takeover}))
        out.append(r)
    return out


def _ha_steps(h: History) -> list[HaStep]:
    """Each takeover and handback the runner recorded, timed from the event it names as its
    cause."""
    out = []
    for e in sorted(h.events, key=lambda e: e.t):
        if e.kind not in HA_KINDS:
            continue
        cause = h.events[e.cause] if e.cause is not None else None
        core = cause.node if cause is not None else None
        out.append(HaStep(e.kind, e.t, e.node, core, cause.kind if cause else None,
                          cause.t if cause else None,
                          e.t - cause.t if cause is not None else None, e.detail))
    return out


def check(history: History, copies: Sequence[Copy], seed: int, replay: str = "",
          size: int = BLOCK, max_findings: int = MAX_FINDINGS_PER_KIND) -> Result:
    """Check the drill: ``copies`` are read once every fault is healed, the Edges have drained
    their write reserve and replication is running again (a Core still missing writes the Edge
    holds would show them as lost). Every Core copy must hold every LUN the history wrote."""
    check_size(size)
    names = [c.name for c in copies]
    if len(set(names)) != len(names):
        raise ValueError(f"copy names must be unique: {names}")
    for c in copies:
        if c.kind not in ("edge", "core"):
            raise ValueError(f"copy {c.name}: kind {c.kind!r} is not 'edge' or 'core'")
    fs = _Findings(max_findings)
    stats: Counter[str] = Counter()
    by_lun: dict[int, list[Write]] = defaultdict(list)
    for w in history.writes.values():
        by_lun[w.lun].append(w)
    luns = {lun: _LunWrites(ws) for lun, ws in by_lun.items()}
    lost: dict[int, set[str]] = defaultdict(set)
    per_copy: dict[str, dict[str, int]] = {}
    checked_luns: set[int] = set()
    for c in copies:
        cstats: Counter[str] = Counter()
        must = (set(luns) if c.expect is None else set(c.expect)) if c.kind == "core" else set()
        for lun in sorted(set(c.images) | must):
            if lun not in c.images:
                fs.add(Finding("missing_image", f"{c.name} has no image of LUN {lun}, which "
                               f"the drill wrote", copy=c.name, lun=lun))
                continue
            checked_luns.add(lun)
            lw = luns.get(lun) or _LunWrites([])
            _check_lun(c, lun, c.images[lun], lw, seed, size, fs, lost, cstats)
        cstats["lost_writes"] = sum(1 for names_ in lost.values() if c.name in names_)
        per_copy[c.name] = {"blocks_checked": cstats["blocks_checked"],
                            "lost_blocks": cstats["lost_blocks"],
                            "lost_writes": cstats["lost_writes"]}
        stats["blocks_checked"] += cstats["blocks_checked"]
    for lun in sorted(set(luns) - checked_luns):
        if any(w.acked for w in luns[lun].writes):
            fs.add(Finding("missing_image", f"no copy has an image of LUN {lun}, which the "
                           f"drill wrote", lun=lun))
    cores = [c for c in copies if c.kind == "core"]
    for a, b in itertools.combinations(cores, 2):
        for lun in sorted(set(a.images) & set(b.images)):
            _compare(a, b, lun, size, fs)
    _split_brain(history.samples, fs)
    _epochs(history.samples, fs)
    rto = _rtos(history, fs)

    ws = history.writes.values()
    counts = {"writes": len(ws),
              "writes_ok": sum(1 for w in ws if w.outcome == "ok"),
              "writes_failed": sum(1 for w in ws if w.outcome == "failed"),
              "writes_indeterminate": sum(1 for w in ws if w.outcome in ("indeterminate", None)),
              "writes_committed": sum(1 for w in ws if w.committed is not None),
              "blocks_written": sum(w.nblocks for w in ws),
              "blocks_checked": stats["blocks_checked"],
              "copies": len(copies), "node_samples": len(history.samples),
              "events": len(history.events)}
    order = [*FINDING_KINDS, *sorted(set(fs.kept) - set(FINDING_KINDS))]
    findings = {k: fs.kept[k] for k in order if fs.kept.get(k)}
    rpo = len(lost)
    t0, t1 = history.span()
    return Result(passed=not fs.count and rpo == 0, rpo=rpo, lost_write_ids=sorted(lost),
                  findings=findings, finding_counts=dict(fs.count), counts=counts,
                  per_copy=per_copy, rto=rto,
                  faults=dict(sorted(Counter(e.kind for e in history.events).items())),
                  replay=replay, seed=seed, t0=t0, t1=t1, ha=_ha_steps(history))
