"""``steelfusion bench --wan``: the Edge at the branch beside tgt in the data center (issue 10
item 4), both reached across the same emulated WAN.

The branch and the data centers are network namespaces of a netns lab (root); the host's
``qemu-img bench`` runs in the branch, the Edge serves it there (acknowledging at once and
shipping to the Cores behind the WAN), and tgtd serves the same workloads from dc-a, so each
of its I/Os crosses the WAN. Cold reads fetch data the Edge never held, warm reads the same
data again. The loopback benchmark and what both share (tgtd, :class:`BenchError`, the
``--workload`` choice) are in :mod:`steelfusion.bench`.

Speed is measured here, never asserted in tests (a ``--quick`` smoke run is).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steelfusion.bench import BenchError, TgtServer, select, stopped_cleanly
from steelfusion.initiator import BenchResult, need, qemu_bench
from steelfusion.lab import Lab, free_ports
from steelfusion.units import format_size


@dataclass(frozen=True)
class WanWorkload:
    """One ``qemu-img bench`` shape of the WAN benchmark.

    ``cache`` is "" for writes, "cold" for reads of data the Edge never held
    (each read fetched from the Core over the WAN) and "warm" for the same
    reads again (served from the Edge's cache). ``step`` is the distance
    between reads (0: contiguous): a cold 4K read every 64 KiB touches a new
    cache region each time, like random reads over a LUN the branch never read.
    ``local`` is how many I/Os the Edge does when nothing crosses the WAN.
    """

    name: str
    write: bool
    block: int
    depth: int
    cache: str
    local: int
    step: int = 0


WAN_WORKLOADS = [
    WanWorkload("4K write QD1", True, 4096, 1, "", 2000),
    WanWorkload("4K write QD32", True, 4096, 32, "", 20000),
    WanWorkload("128K write QD8", True, 128 * 1024, 8, "", 800),
    WanWorkload("4K read QD1 cold", False, 4096, 1, "cold", 2000, step=64 * 1024),
    WanWorkload("4K read QD1 warm", False, 4096, 1, "warm", 2000, step=64 * 1024),
    WanWorkload("128K read QD8 cold", False, 128 * 1024, 8, "cold", 800),
    WanWorkload("128K read QD8 warm", False, 128 * 1024, 8, "warm", 800),
]
MIN_OPS = 8  # fewer I/Os than this say nothing about a mean
WAN_BUDGET = 2.0  # seconds per run across the WAN (the I/O count is sized for it)
QUICK_BUDGET = 0.5
BBR_WINDOW = 10.5  # s: BBR keeps its min-RTT sample 10 s (the kernel's bbr_min_rtt_win_sec)
SETTLE_TIMEOUT = 40.0


@dataclass(frozen=True)
class WanSpec:
    """The WAN the benchmark runs over: branch <-> each data center, and dc-a <-> dc-b."""

    delay: float
    rate: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    dc_delay: float = 0.001

    def per_op(self, block: int, depth: int) -> float:
        """A guess of seconds per I/O across the WAN, to size a run to the budget."""
        t = 2 * self.delay / depth
        if self.rate:
            t = max(t, block / self.rate)
        return t

    def count(self, w: WanWorkload, budget: float, cap: int) -> int:
        t = self.per_op(w.block, w.depth)
        n = cap if t <= 0 else round(budget / t)
        return max(MIN_OPS, min(cap, n))

    def as_dict(self) -> dict[str, Any]:
        return {"delay_s": self.delay, "rtt_s": 2 * self.delay, "rate_bytes_s": self.rate,
                "jitter_s": self.jitter, "loss": self.loss, "dc_delay_s": self.dc_delay}


def parse_wan_options(wan: str, rate: str | None, jitter: str | None, loss: str | None,
                      dc_delay: str | None) -> WanSpec:
    """The ``--wan``/``--rate``/``--jitter``/``--loss``/``--dc-delay`` options, checked."""
    from steelfusion.lab import LabError, parse_duration, parse_loss, parse_rate

    try:
        spec = WanSpec(delay=parse_duration(wan, "--wan"),
                       rate=parse_rate(rate, "--rate") if rate is not None else 0.0,
                       jitter=parse_duration(jitter, "--jitter") if jitter is not None else 0.0,
                       loss=parse_loss(loss, "--loss") if loss is not None else 0.0,
                       dc_delay=(parse_duration(dc_delay, "--dc-delay")
                                 if dc_delay is not None else 0.001))
    except LabError as e:  # the lab's words, less its advice about `lab link --cut`
        raise BenchError(re.sub(r";[^;]*--cut[^;]*$", "", str(e))) from None
    if spec.jitter > spec.delay:
        raise BenchError(f"--jitter {jitter} is more than --wan {wan}: a packet's delay is "
                         f"--wan plus or minus --jitter, so give a jitter up to the delay")
    if spec.loss >= 0.5:
        raise BenchError(f"--loss {loss} loses every other packet or more: no iSCSI session "
                         f"gets through that; give less than 50%")
    return spec


def _check_root() -> None:
    """The WAN benchmark builds network namespaces: refuse at once where it cannot."""
    if os.geteuid() != 0:
        raise BenchError("steelfusion bench --wan needs root (it puts the branch and the data "
                         "centers in network namespaces): run it as root, or leave out --wan "
                         "for the loopback benchmark")
    from steelfusion import netns as ns_mod

    why = ns_mod.available()
    if why is not None:
        raise BenchError(f"steelfusion bench --wan needs network namespaces and /dev/net/tun: "
                         f"{why}; leave out --wan for the loopback benchmark")


def bench_at(url: str, *, write: bool, block: int, depth: int, count: int, offset: int = 0,
             step: int = 0, netns: str | None = None, timeout: float = 600) -> BenchResult:
    """``qemu-img bench`` at ``offset``, a read or write every ``step`` bytes (0: contiguous)."""
    return qemu_bench(url, write=write, block=block, depth=depth, count=count, offset=offset,
                      step=step, netns=netns, timeout=timeout)


_ADDR = re.compile(r"(\d+\.\d+\.\d+\.\d+):(\d+)")
_BBR_MRTT = re.compile(r"bbr:\([^)]*\bmrtt:([\d.]+)")


def tcp_min_rtts(ns: str) -> list[tuple[str, str, float]]:
    """(local, peer, BBR's min-RTT in ms) of the established TCP connections in ``ns``.

    Only BBR connections are listed (``ss`` shows BBR's own min-RTT sample,
    ``mrtt``); other congestion controls do not size their window from it.
    """
    from steelfusion import netns as ns_mod

    ss = shutil.which("ss")
    if ss is None:
        raise BenchError("ss not found: install the Debian package iproute2")
    p = subprocess.run([ss, "-tin", "state", "established"], capture_output=True, text=True,
                       timeout=10, check=False, preexec_fn=ns_mod.preexec(ns))
    out: list[tuple[str, str, float]] = []
    local = peer = ""
    for line in p.stdout.splitlines():
        if not line[:1].isspace():
            addrs = _ADDR.findall(line)
            local, peer = (addrs[0][0], addrs[1][0]) if len(addrs) >= 2 else ("", "")
            continue
        m = _BBR_MRTT.search(line)
        if m and peer:
            out.append((local, peer, float(m.group(1))))
    return out


def settle(data: dict[str, Any], spec: WanSpec, changed: float | None, log: Any,
           timeout: float = SETTLE_TIMEOUT) -> dict[str, Any]:
    """Check (or wait until) TCP across the WAN sizes its windows for the link's delay.

    BBR (this machine's congestion control) sizes its window from the
    smallest RTT it saw in the last 10 seconds. Had the nodes connected
    before the links got their delay, that would be the 0.1 ms of an
    undelayed link, capping the Edge's shipping at a few MB/s, an artefact
    no real WAN has. The bench sets the links at ``lab up`` (``changed`` is
    None), so this only proves it: both ends of the Edge's connections to the
    data centers report the real RTT. After a later change (``changed``,
    monotonic) it also waits out BBR's window. Every connection's BBR min-RTT
    is reported. Nothing to wait for without BBR.
    """
    from steelfusion.lab import SITES

    by_index = {str(i): site for site, i in SITES.items()}
    one_way = {frozenset(("branch", "dc-a")): spec.delay - spec.jitter,
               frozenset(("branch", "dc-b")): spec.delay - spec.jitter,
               frozenset(("dc-a", "dc-b")): spec.dc_delay}
    start = time.monotonic()
    while True:
        stale: list[str] = []
        seen: dict[str, float] = {}
        for site in ("branch", "dc-a", "dc-b"):
            for local, peer, mrtt in tcp_min_rtts(data["sites"][site]["netns"]):
                other = by_index.get(peer.split(".")[2]) if peer.startswith("10.99.") else None
                key = frozenset((site, other or ""))
                if other is None or key not in one_way:
                    continue
                name = f"{site} {local} -> {other} {peer}"
                seen[name] = mrtt
                want = 2 * one_way[key] * 1000
                if "branch" in key and want >= 1.0 and mrtt < 0.5 * want:
                    stale.append(f"{name}: {mrtt:g}ms")
        waited = time.monotonic() - (start if changed is None else changed)
        if not seen or (not stale and (changed is None or waited >= BBR_WINDOW)):
            return {"settled": True, "waited_s": round(waited, 1), "bbr_min_rtt_ms": seen}
        if waited > timeout:
            log(f"warning: {timeout:.0f}s after the links changed, the Edge's connections "
                f"still size their windows for the old RTT ({'; '.join(stale[:2])}); "
                f"measuring anyway")
            return {"settled": False, "waited_s": round(waited, 1), "bbr_min_rtt_ms": seen,
                    "stale": stale}
        time.sleep(0.5)


def connect_rtt(ns: str, host: str, port: int, tries: int = 5) -> float:
    """Seconds of the quickest of ``tries`` TCP connects from ``ns`` to ``host:port``:
    one round trip (SYN, SYN-ACK) across the WAN, the delay as the hosts see it."""
    import socket

    from steelfusion import netns as ns_mod

    best = float("inf")
    for _ in range(tries):
        with ns_mod.in_netns(ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(10)
            t0 = time.perf_counter()
            sock.connect((host, port))
            best = min(best, time.perf_counter() - t0)
        except OSError as e:
            raise BenchError(f"cannot reach {host}:{port} from network namespace {ns}: "
                             f"{e.strerror or e}") from None
        finally:
            sock.close()
    return best


@dataclass
class Side:
    """One target's runs of one workload."""

    iops: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)

    def summary(self, w: WanWorkload) -> dict[str, Any]:
        iops = statistics.median(self.iops) if self.iops else 0.0
        return {"iops": round(iops, 1), "mb_s": round(iops * w.block / 1e6, 2),
                # a closed loop of depth I/Os: mean latency = depth / IOPS (Little's law)
                "latency_ms": round(w.depth / iops * 1000, 3) if iops else None,
                "runs_iops": [round(x, 1) for x in self.iops], "ops": self.counts,
                "bytes": [n * w.block for n in self.counts]}


@dataclass
class WanRow:
    workload: WanWorkload
    edge: Side = field(default_factory=Side)
    tgt: Side = field(default_factory=Side)
    lag: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        w = self.workload
        e, t = self.edge.summary(w), self.tgt.summary(w)
        return {"workload": w.name, "write": w.write, "block": w.block, "depth": w.depth,
                "cache": w.cache or None, "edge": e, "tgt": t,
                "latency_ratio": (round(t["latency_ms"] / e["latency_ms"], 1)
                                  if e["latency_ms"] and t["latency_ms"] else None),
                "commit_lag_s": round(statistics.median(self.lag), 3) if self.lag else None,
                "commit_lag_runs_s": [round(x, 3) for x in self.lag]}


class _Ranges:
    """Where each read goes: cold reads take LUN space nothing read or wrote before
    (the upper half; writes stay in the lower half), warm reads re-read it."""

    def __init__(self, lun_size: int) -> None:
        self.size = lun_size
        self.next = lun_size // 2
        self.last: dict[tuple[int, int, int], tuple[int, int]] = {}

    def cold(self, w: WanWorkload, count: int) -> int:
        span = count * (w.step or w.block)
        if self.next + span > self.size:
            raise BenchError(f"--lun-size {format_size(self.size)} is too small for this many "
                             f"cold reads (the upper half of the LUN is read once, never "
                             f"again); give a larger --lun-size or fewer --rounds")
        off, self.next = self.next, self.next + span
        self.last[(w.block, w.depth, w.step)] = (off, count)
        return off

    def warm(self, w: WanWorkload) -> tuple[int, int] | None:
        return self.last.get((w.block, w.depth, w.step))


def run_wan_bench(workdir: str | None, spec: WanSpec, rounds: int, quick: bool, lun_size: int,
                  only: list[str] | None = None, log: Any = print) -> dict[str, Any]:
    """The Edge at the branch beside tgt in the data center, both over the same WAN."""
    from steelfusion import netns as ns_mod

    names = select([w.name for w in WAN_WORKLOADS], only)
    loads = [w for w in WAN_WORKLOADS if w.name in names]
    if rounds < 1:
        raise BenchError(f"--rounds must be at least 1, got {rounds}")
    budget = QUICK_BUDGET if quick else WAN_BUDGET
    scale = 10 if quick else 1
    # writes stay in the lower half of the LUN; cold reads (and the untimed read before a
    # warm run whose cold run is not selected) take fresh space in the upper half each time
    written = max((max(MIN_OPS * 10, w.local // scale) * w.block for w in loads if w.write),
                  default=0)
    cold = rounds * sum(spec.count(w, budget, max(MIN_OPS * 10, w.local // scale))
                        * (w.step or w.block) for w in loads if not w.write)
    need = 2 * max(written, cold)
    if need > lun_size:
        raise BenchError(f"--lun-size {format_size(lun_size)} is too small for this run (writes "
                         f"use up to {format_size(written)} of the lower half, {rounds} rounds "
                         f"of cold reads {format_size(cold)} of the upper half, never the same "
                         f"place twice); give --lun-size {_size_hint(need)} or more"
                         + (", or fewer --rounds" if cold > written else ""))
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="steelfusion-wanbench-")
        workdir = tmp
    wd = Path(workdir).resolve()
    try:
        wd.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"cannot create --workdir {wd}: {e.strerror or e} (choose another "
                         f"folder)") from None
    lab = Lab(wd / "lab")
    rows = [WanRow(w) for w in loads]
    ranges = {"edge": _Ranges(lun_size), "tgt": _Ranges(lun_size)}
    tgt: TgtServer | None = None
    result: dict[str, Any] = {}
    started = False
    try:
        log(f"starting a netns lab (branch, dc-a, dc-b, witness; LUN {format_size(lun_size)})")
        # the links have their delay before any node connects: TCP never sees a 0.1 ms RTT
        branch_link = {"delay": spec.delay, "jitter": spec.jitter, "rate": spec.rate,
                       "loss": spec.loss}
        data = lab.up(luns=1, lun_size=lun_size, edges=1, netns=True, links=[
            {"a": "branch", "b": "dc-a", **branch_link},
            {"a": "branch", "b": "dc-b", **branch_link},
            {"a": "dc-a", "b": "dc-b", "delay": spec.dc_delay}])
        started = True
        sites = data["sites"]
        branch, dca = sites["branch"]["netns"], sites["dc-a"]["netns"]
        host = sites["dc-a"]["addresses"][0]
        with ns_mod.in_netns(dca):
            port = free_ports(1, host)[0]
        tgt = TgtServer(wd, lun_size, host=host, port=port, netns=dca, name="tgt-dc-a")
        tgt.start()
        log(f"tgt in dc-a at {tgt.portal}; links set: branch <-> dc-a/dc-b "
            f"{_ms(spec.delay)} one way, dc-a <-> dc-b {_ms(spec.dc_delay)}")
        log("waiting until every connection across the WAN sees the new RTT")
        settled = settle(data, spec, None, log)
        rtt = connect_rtt(branch, tgt.host, tgt.port)
        log(f"settled after {settled['waited_s']}s; TCP connect branch -> dc-a takes "
            f"{rtt * 1000:.1f}ms (one round trip)")
        edge_url = data["edges"][0]["targets"][0]["url"]
        for r in range(rounds):
            for row in rows:
                w = row.workload
                for side, url in (("edge", edge_url), ("tgt", tgt.url)):
                    res = _wan_run(w, side, url, spec, budget, scale, ranges[side], branch)
                    if res.seconds <= 0:  # qemu-img reports milliseconds: too fast to time
                        log(f"round {r + 1}/{rounds} {w.name:<18} {side:<4} {res.ops:>6} ops "
                            f"in under 1 ms: not counted")
                        continue
                    s = getattr(row, side)
                    s.iops.append(res.iops)
                    s.counts.append(res.ops)
                    lag = ""
                    if side == "edge" and w.write:
                        row.lag.append(lab.wait_committed(timeout=600))
                        lag = f"  commit lag {row.lag[-1]:.2f}s"
                    lat = _lat(w.depth / res.iops * 1000 if res.iops else None)
                    log(f"round {r + 1}/{rounds} {w.name:<18} {side:<4} {res.ops:>6} ops "
                        f"{res.iops:>9.0f} IOPS {lat:>9}{lag}")
        st = lab.status()
        result = {
            "mode": "wan", "rounds": rounds, "quick": quick, "lun_size": lun_size,
            "wan": {**spec.as_dict(), "measured_rtt_s": round(rtt, 5),
                    "links": {f"{a}<->{b}": lab.links(a, b)[0]
                              for a, b in (("branch", "dc-a"), ("branch", "dc-b"),
                                           ("dc-a", "dc-b"))}},
            "settle": settled,
            "edge": {"portal": data["edges"][0]["portal"], "netns": branch},
            "tgt": {"portal": tgt.portal, "netns": dca, "lun": str(tgt.lun)},
            "workloads": [row.summary() for row in rows],
            "replication": {c["name"]: c["replication"] for c in st["cores"]},
            "cpu_count": os.cpu_count(),
        }
    finally:
        try:
            if tgt is not None:
                tgt.stop()
        finally:
            if started:  # only a lab this run started
                lab.down()
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    return result


def _wan_run(w: WanWorkload, side: str, url: str, spec: WanSpec, budget: float, scale: int,
             ranges: _Ranges, netns: str) -> BenchResult:
    """One timed run of ``w`` on one side, from the branch namespace.

    A warm run reads, block after block, everything its cold run brought
    into the Edge's cache (whole cache regions), so it has enough I/Os to
    time even when the cold run, paced by the WAN, had few; tgt (no cache
    at the branch) reads the start of the same range, as many I/Os as the
    WAN budget allows.
    """
    local = max(MIN_OPS * 10, w.local // scale)
    wan_count = spec.count(w, budget, local)
    if w.write:
        return bench_at(url, write=True, block=w.block, depth=w.depth,
                        count=local if side == "edge" else wan_count, netns=netns)
    if w.cache != "warm":
        off = ranges.cold(w, wan_count)
        return bench_at(url, write=False, block=w.block, depth=w.depth, count=wan_count,
                        offset=off, step=w.step, netns=netns)
    prev = ranges.warm(w)
    if prev is None:  # its cold run was not selected: read the range once, untimed
        off = ranges.cold(w, wan_count)
        bench_at(url, write=False, block=w.block, depth=w.depth, count=wan_count, offset=off,
                 step=w.step, netns=netns)
        prev = (off, wan_count)
    off, cold_count = prev
    cached = cold_count * (w.step or w.block) // w.block
    return bench_at(url, write=False, block=w.block, depth=w.depth, offset=off,
                    count=cached if side == "edge" else min(cached, wan_count), netns=netns)


def _size_hint(n: int) -> str:
    """``n`` rounded up to 64 MiB, as ``--lun-size`` takes it (``192M``, ``2G``)."""
    from steelfusion.lab import size_arg

    step = 64 << 20
    return size_arg(-(-n // step) * step)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:g}ms"


def _lat(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms >= 1000:
        return f"{ms / 1000:.2f}s"
    return f"{ms:.2f}ms" if ms < 10 else f"{ms:.1f}ms"


def render_wan(result: dict[str, Any]) -> str:
    from steelfusion.lab import format_rate

    wan = result["wan"]
    extra = "".join([f", jitter {_ms(wan['jitter_s'])}" if wan["jitter_s"] else "",
                     f", loss {wan['loss'] * 100:g}%" if wan["loss"] else ""])
    seen = f", measured {wan['measured_rtt_s'] * 1000:.1f}ms"
    lines = [f"WAN: branch <-> data centers {_ms(wan['delay_s'])} one way (RTT "
             f"{_ms(wan['rtt_s'])}{seen}), rate {format_rate(wan['rate_bytes_s'])}{extra}; "
             f"dc-a <-> dc-b {_ms(wan['dc_delay_s'])}",
             f"{'workload':<19} {'Edge lat':>9} {'tgt lat':>9} {'Edge IOPS':>10} "
             f"{'tgt IOPS':>9} {'Edge MB/s':>10} {'tgt MB/s':>9} {'commit lag':>11}"]
    for w in result["workloads"]:
        e, t = w["edge"], w["tgt"]
        lag = f"{w['commit_lag_s']:.2f}s" if w["commit_lag_s"] is not None else "-"
        lines.append(f"{w['workload']:<19} {_lat(e['latency_ms']):>9} "
                     f"{_lat(t['latency_ms']):>9} {e['iops']:>10.0f} {t['iops']:>9.0f} "
                     f"{e['mb_s']:>10.1f} {t['mb_s']:>9.1f} {lag:>11}")
    lines += [f"medians of {result['rounds']} alternating rounds; the host (qemu-img) is in the "
              "branch; latency = mean (queue depth / IOPS)",
              "Edge = iSCSI at the branch: acknowledged at once, committed when durable on "
              "both Cores (commit lag: seconds after the workload until nothing is uncommitted)",
              "tgt = tgtd in dc-a reached over the WAN (file LUN, no fsync); cold = data the "
              "Edge never held (fetched from the Core), warm = the same data again"]
    return "\n".join(lines)


def main_wan(workdir: str | None, spec: WanSpec, rounds: int, quick: bool, lun_size: int,
             as_json: bool, only: list[str] | None) -> int:
    _check_root()
    select([w.name for w in WAN_WORKLOADS], only)
    for t in ("qemu-img", "tgtd", "tgtadm", "ss"):
        if t == "ss":
            if shutil.which("ss") is None:
                raise BenchError("ss not found: install the Debian package iproute2")
            continue
        need(t)
    with stopped_cleanly():
        res = run_wan_bench(workdir, spec, rounds, quick, lun_size, only,
                            log=(lambda *_: None) if as_json else print)
    print(json.dumps(res, indent=2) if as_json else render_wan(res))
    return 0


__all__ = ["WAN_WORKLOADS", "WanSpec", "main_wan", "parse_wan_options", "render_wan",
           "run_wan_bench"]
