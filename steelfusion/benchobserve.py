"""``steelfusion bench --observe-cost``: what metrics and consoles cost the write path.

Issue 15 asks that the consoles and metrics add no measurable cost to writes. Two
loopback labs run side by side: one with everything on (``Lab.up()``: every node's
``/metrics`` and each Core's and Edge's console), one with nothing
(``Lab.up(observe=False)``). While the run lasts, the "on" lab is watched as an
operator would watch it: every metrics endpoint is fetched once a second (as
Prometheus does), and each console's live event stream (``GET /api/events``,
server-sent events, after a login with the lab's ``console.password``) is held open
and read. The scraper runs in this process, in its own thread, from before the first
round to after the last: its client CPU is spent during both labs' rounds alike, the
nodes' side of it only in the "on" lab.

Both labs get the loopback benchmark's own workloads (:data:`steelfusion.bench.WORKLOADS`)
in rounds, on and off alternately, and the side that goes first alternates each round,
so drift on a shared machine hits both alike. Each round gives one on/off ratio per
workload; the verdict looks at their spread: if it includes 1.0, no cost could be told
from noise; if every round was slower with observation on, that is the measured cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steelfusion.bench import (
    WORKLOADS,
    BenchError,
    Workload,
    precondition_luns,
    quick_scale,
    scaled_workloads,
    select,
    stopped_cleanly,
)
from steelfusion.initiator import need, qemu_bench
from steelfusion.lab import Lab
from steelfusion.units import format_size

SIDES = ("on", "off")
SCRAPE_PERIOD_S = 1.0
READY_TIMEOUT_S = 20.0


@dataclass
class Endpoint:
    """One address of the observed lab the scraper reads, and what it got there."""

    node: str
    kind: str  # "metrics" (GET /metrics) or "events" (the console's SSE stream)
    address: str
    fetches: int = 0  # metrics: answered GETs; events: streams opened
    bytes: int = 0
    events: int = 0  # events: server-sent events read
    errors: int = 0
    last_error: str | None = None

    def summary(self) -> dict[str, Any]:
        return {"node": self.node, "kind": self.kind, "address": self.address,
                "fetches": self.fetches, "bytes": self.bytes, "events": self.events,
                "errors": self.errors, "last_error": self.last_error}


def lab_endpoints(data: dict[str, Any]) -> list[Endpoint]:
    """Every node's metrics endpoint and each Core's and Edge's console, from ``lab.json``."""
    out = []
    w = data.get("witness") or {}
    nodes = [*([w] if w and not w.get("embedded_in") else []), *data.get("cores", []),
             *data.get("edges", [])]
    for n in nodes:
        if n.get("metrics"):
            out.append(Endpoint(n["name"], "metrics", n["metrics"]))
    for n in [*data.get("cores", []), *data.get("edges", [])]:
        if n.get("console"):
            out.append(Endpoint(n["name"], "events", n["console"]))
    return out


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


class Scraper:
    """Fetches each metrics endpoint every second and reads each console's event stream,
    in an asyncio loop of its own thread (the benchmark's thread waits on qemu-img)."""

    def __init__(self, endpoints: list[Endpoint], password: str,
                 period_s: float = SCRAPE_PERIOD_S) -> None:
        self.endpoints = endpoints
        self.password = password
        self.period_s = period_s
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._running = threading.Event()
        self.failure: str | None = None  # the loop itself died (not one endpoint's error)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="observe-scraper", daemon=True)
        self._thread.start()
        if not self._running.wait(10):
            raise BenchError(f"the scraper did not start: {self.failure or 'no answer'}")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Every metrics endpoint answered once and every event stream sent something:
        the run then measures a lab that really is being watched."""
        deadline = time.monotonic() + timeout
        while True:
            waiting = [e for e in self.endpoints if (e.fetches if e.kind == "metrics"
                                                     else e.bytes) == 0]
            if not waiting:
                return
            if time.monotonic() > deadline or self.failure:
                e = waiting[0]
                raise BenchError(f"the observed lab's {e.node} {e.kind} at {e.address} "
                                 f"gave nothing in {timeout:.0f}s "
                                 f"({self.failure or e.last_error or 'no answer'})")
            time.sleep(0.05)

    def totals(self) -> dict[str, int]:
        m = [e for e in self.endpoints if e.kind == "metrics"]
        ev = [e for e in self.endpoints if e.kind == "events"]
        return {"metrics_scrapes": sum(e.fetches for e in m),
                "metrics_bytes": sum(e.bytes for e in m),
                "metrics_errors": sum(e.errors for e in m),
                "sse_streams_opened": sum(e.fetches for e in ev),
                "sse_bytes": sum(e.bytes for e in ev), "sse_events": sum(e.events for e in ev),
                "sse_errors": sum(e.errors for e in ev)}

    def stop(self) -> None:
        """Close every connection and end the thread (safe to call twice)."""
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None and thread is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(stop.set)
            thread.join(10)
        self._thread = None

    # -- the loop's side ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as e:  # reported by wait_ready and in the result
            self.failure = _why(e)
            self._running.set()

    async def _main(self) -> None:
        import aiohttp

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._running.set()
        # one session per console: their cookies share a name and a host (not the port)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as shared:
            tasks = [asyncio.create_task(self._metrics(e, shared) if e.kind == "metrics"
                                         else self._events(e)) for e in self.endpoints]
            await self._stop.wait()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _metrics(self, ep: Endpoint, session: Any) -> None:
        """GET /metrics once a period, as Prometheus scrapes."""
        import aiohttp

        url = f"http://{ep.address}/metrics"
        while True:
            t0 = time.monotonic()
            try:
                async with session.get(url) as r:
                    body = await r.read()
                    if r.status == 200:
                        ep.fetches += 1
                        ep.bytes += len(body)
                    else:
                        ep.errors += 1
                        ep.last_error = f"HTTP {r.status}"
            except (aiohttp.ClientError, TimeoutError) as e:
                ep.errors += 1
                ep.last_error = _why(e)
            await asyncio.sleep(max(0.0, t0 + self.period_s - time.monotonic()))

    async def _events(self, ep: Endpoint) -> None:
        """Log in, then read ``/api/events`` for as long as the run lasts (again after a
        break, a period later)."""
        import aiohttp

        base = f"http://{ep.address}"
        jar = aiohttp.CookieJar(unsafe=True)  # the console's cookie on an IP address
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        async with aiohttp.ClientSession(cookie_jar=jar, timeout=timeout) as session:
            while True:
                try:
                    async with session.post(f"{base}/login", data={"password": self.password},
                                            allow_redirects=False) as r:
                        await r.read()
                        if r.status != 303:
                            raise BenchError(f"login refused: HTTP {r.status}")
                    async with session.get(f"{base}/api/events") as r:
                        if r.status != 200:
                            raise BenchError(f"events: HTTP {r.status}")
                        ep.fetches += 1
                        tail = b""
                        async for chunk in r.content.iter_any():
                            ep.bytes += len(chunk)
                            seen = tail + chunk
                            ep.events += seen.count(b"\n\n")  # a blank line ends an event
                            tail = seen[-1:]
                    raise BenchError("the event stream ended")
                except (aiohttp.ClientError, TimeoutError, BenchError) as e:
                    ep.errors += 1
                    ep.last_error = _why(e)
                await asyncio.sleep(self.period_s)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds these processes (all their threads) have used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (proc(5) fields 14, 15)
    return total / tick


@dataclass
class OnOff:
    """One workload's runs: IOPS per round on each side, and the Edge's commit lag after
    each write run."""

    workload: Workload
    iops: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SIDES})
    lag: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SIDES})

    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.iops["on"], self.iops["off"], strict=True) if b]

    def summary(self) -> dict[str, Any]:
        b = self.workload.block
        sides = {}
        for s in SIDES:
            med = statistics.median(self.iops[s]) if self.iops[s] else 0.0
            sides[s] = {"iops": round(med), "mb_s": round(med * b / 1e6, 1),
                        "runs_iops": [round(x) for x in self.iops[s]],
                        "commit_lag_s": (round(statistics.median(self.lag[s]), 3)
                                         if self.lag[s] else None)}
        r = self.ratios()
        ratio = ({"median": round(statistics.median(r), 3), "min": round(min(r), 3),
                  "max": round(max(r), 3), "runs": [round(x, 3) for x in r]} if r else None)
        return {"workload": self.workload.name, "write": self.workload.write, **sides,
                "ratio": ratio, "verdict": verdict(r)}


def verdict(ratios: list[float]) -> str:
    """What the on/off ratios of the rounds say (below 1.0: slower with observation on)."""
    if not ratios:
        return "no runs"
    if len(ratios) < 2:
        return "one round: no spread to tell cost from noise (use --rounds 3 or more)"
    lo, hi, med = min(ratios), max(ratios), statistics.median(ratios)
    if lo <= 1.0 <= hi:
        return "no cost told from noise"
    if hi < 1.0:
        return f"cost: {100 * (1 - med):.0f}% slower with observation on, in every round"
    return "no cost (faster with observation on in every round: noise)"


def overall(rows: list[dict[str, Any]]) -> str:
    """The one-line verdict of the run."""
    costs = [f"{w['workload']} on/off {w['ratio']['median']:.2f} "
             f"({w['ratio']['min']:.2f}-{w['ratio']['max']:.2f})"
             for w in rows if w["verdict"].startswith("cost")]
    if costs:
        return "measured cost: " + "; ".join(costs)
    if any(w["verdict"].startswith(("one round", "no runs")) for w in rows):
        return "not judged: " + rows[0]["verdict"]
    return ("no cost told from noise (no workload was slower with observation on in every "
            "round)")


def run_observe_cost(workdir: str | None, rounds: int, quick: bool, lun_size: int,
                     only: list[str] | None = None, log: Any = print,
                     precondition: bool = True) -> dict[str, Any]:
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="steelfusion-bench-observe-")
        workdir = tmp
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    labs = {s: Lab(wd / f"lab-{s}") for s in SIDES}
    rows = [OnOff(w) for w in scaled_workloads(only, quick)]
    data: dict[str, dict[str, Any]] = {}
    scraper: Scraper | None = None
    load_start = os.getloadavg()
    try:
        for s in SIDES:
            log(f"starting lab {s} (Witness, 2 Cores, 1 Edge, LUN {format_size(lun_size)}; "
                f"metrics and consoles {s})")
            data[s] = labs[s].up(luns=1, lun_size=lun_size, edges=1, observe=s == "on")
        urls = {s: data[s]["edges"][0]["targets"][0]["url"] for s in SIDES}
        if precondition:
            precondition_luns([(s, urls[s], labs[s]) for s in SIDES], lun_size,
                              quick_scale(quick), log)
        eps = lab_endpoints(data["on"])
        password = Path(data["on"]["console_password_file"]).read_text().strip()
        scraper = Scraper(eps, password)
        scraper.start()
        scraper.wait_ready()
        log(f"lab on watched: {sum(e.kind == 'metrics' for e in eps)} metrics endpoints "
            f"every {SCRAPE_PERIOD_S:g}s, {sum(e.kind == 'events' for e in eps)} console "
            "event streams open")
        pids = {s: [n["pid"] for n in labs[s].processes(data[s])] for s in SIDES}
        cpu0 = {s: cpu_seconds(pids[s]) for s in SIDES}
        t0 = time.monotonic()
        firsts = []
        during_on = 0
        for r in range(rounds):
            order = SIDES if r % 2 == 0 else SIDES[::-1]
            firsts.append(order[0])
            for row in rows:
                w = row.workload
                for s in order:
                    before = scraper.totals()["metrics_scrapes"]
                    res = qemu_bench(urls[s], write=w.write, block=w.block, depth=w.depth,
                                     count=w.count)
                    if s == "on":
                        during_on += scraper.totals()["metrics_scrapes"] - before
                    row.iops[s].append(res.iops)
                    if w.write:
                        row.lag[s].append(labs[s].wait_committed(timeout=600))
                    log(f"round {r + 1}/{rounds} {w.name:<15} {s:<3} {res.iops:>9.0f} IOPS "
                        f"{res.mb_s:>8.1f} MB/s")
        elapsed = time.monotonic() - t0
        cpu = {s: round(cpu_seconds(pids[s]) - cpu0[s], 2) for s in SIDES}
        scraper.stop()
        summaries = [row.summary() for row in rows]
        return {
            "mode": "observe-cost", "rounds": rounds, "quick": quick, "lun_size": lun_size,
            "preconditioned": precondition, "first": firsts, "workloads": summaries,
            "verdict": overall(summaries),
            "scraper": {**scraper.totals(), "scrapes_during_on_runs": during_on,
                        "period_s": SCRAPE_PERIOD_S, "failure": scraper.failure,
                        "endpoints": [e.summary() for e in eps]},
            "node_cpu_s": cpu, "measured_s": round(elapsed, 1),
            "observe": {s: {"metrics": [n["name"] for n in labs[s].nodes(data[s])
                                        if n.get("metrics")],
                            "console": [n["name"] for n in labs[s].nodes(data[s])
                                        if n.get("console")]} for s in SIDES},
            "cpu_count": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        }
    finally:
        if scraper is not None:
            scraper.stop()
        for s in data:  # only labs this run started: never one already in the folder
            labs[s].down()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def render(result: dict[str, Any]) -> str:
    lines = [f"{'workload':<16} {'on IOPS':>9} {'off IOPS':>9} {'on MB/s':>8} "
             f"{'off MB/s':>8} {'on/off median':>13} {'min':>5} {'max':>5}  verdict"]
    for w in result["workloads"]:
        r = w["ratio"] or {"median": 0.0, "min": 0.0, "max": 0.0}
        lines.append(f"{w['workload']:<16} {w['on']['iops']:>9} {w['off']['iops']:>9} "
                     f"{w['on']['mb_s']:>8} {w['off']['mb_s']:>8} {r['median']:>13.3f} "
                     f"{r['min']:>5.2f} {r['max']:>5.2f}  {w['verdict']}")
    lags = [f"{w['workload']} {w['on']['commit_lag_s']:.2f}s/{w['off']['commit_lag_s']:.2f}s"
            for w in result["workloads"] if w["write"]]
    if lags:
        lines.append("commit lag on/off (medians): " + ", ".join(lags))
    sc = result["scraper"]
    lines.append(f"lab on watched throughout: {sc['metrics_scrapes']} metrics GETs "
                 f"({format_size(sc['metrics_bytes'])}, {sc['metrics_errors']} errors; "
                 f"{sc['scrapes_during_on_runs']} during its own runs), "
                 f"{len([e for e in sc['endpoints'] if e['kind'] == 'events'])} console event "
                 f"streams ({sc['sse_events']} events, {format_size(sc['sse_bytes'])}, "
                 f"{sc['sse_errors']} errors)")
    cpu = result["node_cpu_s"]
    lines.append(f"node CPU during the {result['measured_s']}s of rounds: on {cpu['on']}s, "
                 f"off {cpu['off']}s (both labs' runs included)")
    pre = "both LUNs preconditioned (written once), " if result.get("preconditioned") else ""
    n = result["rounds"]
    lines.append(f"{pre}{n} round{'s' if n != 1 else ''}, on and off alternating, first side "
                 f"alternating ({'/'.join(result['first'])}); on = metrics on every node and "
                 "consoles, scraped every second with every event stream open; off = "
                 "Lab.up(observe=False)")
    lines.append(f"{result['cpu_count']} CPUs, load average {result['loadavg_start'][0]} at "
                 f"the start, {result['loadavg_end'][0]} at the end")
    lines.append(f"verdict: {result['verdict']}")
    return "\n".join(lines)


def main_observe(workdir: str | None, rounds: int, quick: bool, lun_size: int, as_json: bool,
                 only: list[str] | None, precondition: bool = True) -> int:
    if only:
        only = select([w.name for w in WORKLOADS], only)
    if rounds < 1:
        raise BenchError(f"--rounds must be at least 1, got {rounds}")
    need("qemu-img")
    with stopped_cleanly("two labs were"):
        res = run_observe_cost(workdir, rounds, quick, lun_size, only,
                               log=(lambda *_: None) if as_json else print,
                               precondition=precondition)
    print(json.dumps(res, indent=2) if as_json else render(res))
    return 0


__all__ = ["Endpoint", "Scraper", "lab_endpoints", "main_observe", "render",
           "run_observe_cost", "verdict"]
