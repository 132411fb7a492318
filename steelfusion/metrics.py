"""Prometheus metrics of every node (issue 15), read when scraped, never on the write path.

Each node already keeps what an operator graphs: a Core its per-LUN sequences,
mirror queue, resync progress and journal use; an Edge its blockstore and host
counters; a Witness its leases and decisions. The collectors here read those
at scrape time (prometheus-client "custom collectors"), so a host write costs
the same with metrics on or off. The histograms are observed where the time
passes, and only while metrics are on: ``fdatasync`` time on a Core once per
group commit (one sync covers many writes), in the worker thread that already
runs it; the mirror round trip on a primary Core and the Edge->ack latency on
an Edge once per acknowledged frame, from times the sans-IO pipelines keep
(:mod:`core.pipeline`, :mod:`edge.shipping`) while a hook set here asks them to.

Names follow Prometheus conventions: ``steelfusion_<node>_<what>_<unit>``,
counters end in ``_total``, sizes in ``_bytes``, times in ``_seconds``.

:class:`WebServer` serves an aiohttp application on a node's loop (the
metrics endpoint and :mod:`steelfusion.console`): the socket is bound during
the node's start, so a port in use fails the start with one line naming the
config key; aiohttp itself (a third of a second to import) is imported in a
worker thread afterwards, so a node answers its control port as fast as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import itertools
import re
import socket
import time
from bisect import bisect_left
from collections.abc import Callable, Hashable, Iterator
from typing import TYPE_CHECKING, Any

from steelfusion import log
from steelfusion.startup import listening

if TYPE_CHECKING:
    from core.node import Core
    from edge.node import Edge
    from witness.node import Witness

_log = log.get("metrics")

#: every replication state a Core can report (``CoreEngine.replication``)
REPLICATION_STATES = ("running", "paused", "suspended", "resyncing", "terminated", "replica",
                      "inconsistent", "disconnected", "standalone", "disabled")
ROLES = ("primary", "secondary")
#: fdatasync of a LUN backend: a page-cache file syncs in well under a millisecond, an
#: array over iSCSI in tens of milliseconds
SYNC_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: a write's trip to a Core and back: a loopback lab answers in milliseconds, a WAN in tens
#: to hundreds of them, and a Core that lost its peer or its disk holds writes for seconds
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)
_NUMBERED = re.compile(r"_\d+_")


def alarm_kind(name: str) -> str:
    """``lun_3_io`` -> ``lun_io``, ``duplicate_node_core-b`` -> ``duplicate_node``: a label
    with few values (Prometheus label values should not grow with LUNs or node names)."""
    name = _NUMBERED.sub("_", name)
    return "duplicate_node" if name.startswith("duplicate_node") else name


def _alarms(prefix: str, alarms: list[dict[str, Any]]) -> Any:
    from prometheus_client.core import GaugeMetricFamily

    g = GaugeMetricFamily(f"{prefix}_alarms", "Active alarms, by kind (the alarm name with "
                          "LUN numbers and node names taken out)", labels=["kind"])
    kinds: dict[str, int] = {}
    for a in alarms:
        k = alarm_kind(str(a.get("alarm", "?")))
        kinds[k] = kinds.get(k, 0) + 1
    for k, n in sorted(kinds.items()):
        g.add_metric([k], n)
    return g


class CoreCollector:
    """A Core's replication, read from its status (the numbers ``coredr status`` shows)."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c = self.core
        st = c.status()
        p = "steelfusion_core"

        def gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{p}_{name}", doc, labels=labels)

        g = gauge("epoch", "The replication epoch this Core is at")
        g.add_metric([], st["epoch"])
        yield g
        g = gauge("role", "1 for this Core's role (primary or secondary)", ["role"])
        for r in ROLES:
            g.add_metric([r], int(st["role"] == r))
        yield g
        state = gauge("replication_state", "1 for the replication state each LUN is in "
                      "(the pair's state: running, paused, suspended, resyncing, ...)",
                      ["lun", "state"])
        seqs = {k: gauge(f"{k}_sequence", doc, ["lun"]) for k, doc in (
            ("acknowledged", "Highest write sequence acknowledged upstream (to the Edge on a "
                             "primary, to the primary on a secondary)"),
            ("applied", "Highest write sequence applied to this Core's LUN"),
            ("durable", "Highest write sequence made durable (fdatasync) on this Core"),
            ("mirror_acknowledged", "Highest write sequence the secondary acknowledged"))}
        mq = gauge("mirror_queue_bytes", "Bytes applied here and not yet acknowledged by the "
                   "secondary", ["lun"])
        writes = CounterMetricFamily(f"{p}_writes", "Writes applied to the LUN", labels=["lun"])
        wbytes = CounterMetricFamily(f"{p}_written_bytes", "Bytes applied to the LUN",
                                     labels=["lun"])
        size = gauge("lun_size_bytes", "Size of the LUN", ["lun"])
        for lun, info in st["luns"].items():
            for s in REPLICATION_STATES:
                state.add_metric([lun, s], int(st["replication"] == s))
            for k, field in (("acknowledged", "acked_seq"), ("applied", "applied_seq"),
                             ("durable", "durable_seq"),
                             ("mirror_acknowledged", "mirror_acked_seq")):
                seqs[k].add_metric([lun], info[field])
            mq.add_metric([lun], info["mirror_queue_bytes"])
            writes.add_metric([lun], info["writes"])
            wbytes.add_metric([lun], info["bytes_written"])
            size.add_metric([lun], info["size"])
        yield from (state, *seqs.values(), mq, writes, wbytes, size)
        rs = st.get("resync") or {}
        for name, key, doc in (
                ("resync_done_bytes", "bytes_done", "Bytes copied by the resync under way"),
                ("resync_total_bytes", "bytes_total", "Bytes the resync under way copies"),
                ("resync_rate_bytes_per_second", "rate_bytes_s",
                 "Average copy rate of the resync under way")):
            g = gauge(name, doc)
            g.add_metric([], rs.get(key) or 0)
            yield g
        g = gauge("resync_active", "1 while a resync runs")
        g.add_metric([], int(bool(rs)))
        yield g
        j = st.get("journal")
        if j is not None:
            g = gauge("journal_size_bytes", "Size of the Journal LUN")
            g.add_metric([], j["size"])
            yield g
            g = gauge("journal_log_used_bytes", "Bytes of the Journal LUN's log in use")
            g.add_metric([], j["used_log_bytes"])
            yield g
            g = gauge("journal_dirty_bytes", "Bytes of the LUN marked changed in the journal "
                      "(what the next resync copies)", ["lun"])
            for lun, n in j["dirty_bytes"].items():
                g.add_metric([lun], n)
            yield g
        conns = st["connections"]
        est = gauge("replication_connections", "Outbound replication connections established, "
                    "per replication interface", ["interface"])
        exp = gauge("replication_connections_expected", "Outbound replication connections "
                    "expected (two per interface)", ["interface"])
        for iface, n in conns["replication_interfaces"].items():
            est.add_metric([iface], n["established"])
            exp.add_metric([iface], n["expected"])
        yield est
        yield exp
        rtt = gauge("replication_rtt_seconds", "Round trip time of each established "
                    "replication connection (its PING/PONG)", ["direction", "link"])
        for lk in conns["replication"]:
            if lk["established"] and lk["rtt_ms"] is not None:
                # an outbound link by its dialler's name, an inbound one by the peer's port
                which = lk["name"] if lk["direction"] == "out" else lk["peer"]
                rtt.add_metric([lk["direction"], str(which)], lk["rtt_ms"] / 1000)
        yield rtt
        g = gauge("edge_connections", "Edges connected to this Core")
        g.add_metric([], len(conns["edges"]))
        yield g
        g = gauge("witness_connected", "1 while this Core is connected to its Witness")
        g.add_metric([], int(bool(conns["witness"])))
        yield g
        yield _alarms(p, st["alarms"])


class EdgeCollector:
    """An Edge's blockstore, host I/O, uplink and iSCSI sessions (and its Witness, if any)."""

    def __init__(self, edge: Edge) -> None:
        self.edge = edge

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        e = self.edge
        st = e.status()
        bs = st["blockstore"]
        p = "steelfusion_edge"
        for name, value, doc in (
                ("uncommitted_bytes", bs["uncommitted_bytes"],
                 "Bytes acknowledged to hosts and not yet durable on both Cores"),
                ("uncommitted_writes", bs["uncommitted_writes"], "Writes not yet committed"),
                ("reserve_size_bytes", bs["reserve_bytes"], "Size of the write reserve"),
                ("reserve_used_ratio", bs["reserve_used_pct"] / 100,
                 "Share of the write reserve holding uncommitted data"),
                ("commit_lag_seconds", st.get("commit_lag_s") or 0.0,
                 "Age of the oldest uncommitted write (to the sampling period, 0.25 s)"),
                ("iscsi_sessions", st["iscsi"]["connections"], "iSCSI connections of hosts"),
                ("core_connected", int(bool(st["core"].get("connected"))),
                 "1 while connected to the primary Core"),
                ("shipping_inflight_bytes", st["core"].get("inflight_bytes") or 0,
                 "Bytes sent to the primary Core and not yet acknowledged")):
            g = GaugeMetricFamily(f"{p}_{name}", doc)
            g.add_metric([], value)
            yield g
        c = CounterMetricFamily(f"{p}_shipped_bytes", "Bytes of writes sent to the Cores")
        c.add_metric([], st["core"].get("bytes_sent") or 0)
        yield c
        fams = {k: CounterMetricFamily(f"{p}_{k}", doc, labels=["lun"]) for k, doc in (
            ("host_reads", "Host READ commands"), ("host_read_bytes", "Bytes hosts read"),
            ("host_writes", "Host WRITE commands"), ("host_written_bytes", "Bytes hosts wrote"),
            ("blockstore_read_hits", "Reads served from the blockstore's cache"),
            ("blockstore_read_misses", "Reads that fetched a region from the Core"))}
        committed = GaugeMetricFamily(f"{p}_committed_sequence", "Highest write sequence the "
                                      "primary Core acknowledged", labels=["lun"])
        cached = GaugeMetricFamily(f"{p}_cached_regions", "Cache regions held in the "
                                   "blockstore", labels=["lun"])
        for lun, lu in sorted(e.luns.items()):
            lab = [str(lun)]
            fams["host_reads"].add_metric(lab, lu.reads)
            fams["host_read_bytes"].add_metric(lab, lu.bytes_read)
            fams["host_writes"].add_metric(lab, lu.writes)
            fams["host_written_bytes"].add_metric(lab, lu.bytes_written)
            fams["blockstore_read_hits"].add_metric(lab, lu.reads - lu.read_misses)
            fams["blockstore_read_misses"].add_metric(lab, lu.read_misses)
            info = bs["luns"].get(str(lun), {})
            committed.add_metric(lab, info.get("committed_seq", 0))
            cached.add_metric(lab, info.get("cached_regions", 0))
        yield from (*fams.values(), committed, cached)
        yield _alarms(p, st["alarms"])
        if e.witness is not None:
            yield from WitnessCollector(e.witness).collect()


class WitnessCollector:
    """A Witness's leases and decisions."""

    def __init__(self, witness: Witness) -> None:
        self.witness = witness

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        w = self.witness
        st = w.status()
        p = "steelfusion_witness"
        valid = GaugeMetricFamily(f"{p}_lease_valid", "1 while the node's lease is live",
                                  labels=["node"])
        left = GaugeMetricFamily(f"{p}_lease_remaining_seconds", "Seconds until the node's "
                                 "lease ends (negative: ended that long ago)", labels=["node"])
        for node, lease in (st.get("leases") or {}).items():
            valid.add_metric([node], int(bool(lease["reachable"])))
            left.add_metric([node], lease["expires_in"])
        yield valid
        yield left
        g = GaugeMetricFamily(f"{p}_connected_nodes", "Cores connected to this Witness")
        g.add_metric([], sum(1 for n in st["nodes"].values() if n["connected"]))
        yield g
        g = GaugeMetricFamily(f"{p}_pair_epoch", "Epoch of each replication pair",
                              labels=["pair"])
        for pair, ep in (st.get("epochs") or {}).items():
            g.add_metric([pair], ep)
        yield g
        for name, counts, doc in (("approvals", w.granted, "Requests the Witness approved"),
                                  ("refusals", w.refused, "Requests the Witness refused")):
            c = CounterMetricFamily(f"{p}_{name}", doc, labels=["op"])
            for op, n in sorted(counts.items()):
                c.add_metric([op], n)
            yield c
        c = CounterMetricFamily(f"{p}_persist_failures", "Decisions dropped because the "
                                "state file could not be written")
        c.add_metric([], st["persist_failures"])
        yield c
        yield _alarms(p, st["alarms"])


def timed_sync(sync: Callable[[], None], observe: Callable[[float], None]) -> Callable[[], None]:
    """``sync`` that reports how long it took: one observation per group commit."""

    def run() -> None:
        t0 = time.perf_counter()
        sync()
        observe(time.perf_counter() - t0)

    return run


def registry(*collectors: Any) -> Any:
    """A registry of its own per node (never the process-global one)."""
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    for c in collectors:
        reg.register(c)
    return reg


def fdatasync_histogram(core: Core, reg: Any) -> None:
    """``steelfusion_core_fdatasync_seconds{lun}``: each LUN backend's sync, timed as it runs."""
    from prometheus_client import Histogram

    h = Histogram("steelfusion_core_fdatasync_seconds", "Time of one group commit's "
                  "fdatasync of a LUN backend (one covers every write issued before it)",
                  ["lun"], buckets=SYNC_BUCKETS, registry=reg)
    for lun, p in core.pipes.items():
        dev = p.store.dev
        with contextlib.suppress(AttributeError):  # a device class with slots: untimed
            dev.sync = timed_sync(dev.sync, h.labels(str(lun)).observe)  # type: ignore[method-assign]


class WeightedHistogram:
    """A histogram labelled by LUN whose one observation may stand for ``n`` equal ones.

    One acknowledgement covers a frame of host writes that all waited the same
    time; prometheus-client's Histogram takes one value per call (1.2 us: a lock
    and a bucket search each), so a frame of 128 writes of 4 KiB would cost 128
    calls. Observed and scraped on the node's event loop, so it needs no lock.
    """

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.doc = doc
        self.bounds = buckets
        self.counts: dict[Hashable, list[int]] = {}  # LUN -> per bucket, the last one +Inf
        self.sums: dict[Hashable, float] = {}

    def observe(self, lun: Hashable, seconds: float, n: int = 1) -> None:
        c = self.counts.get(lun)
        if c is None:
            c = self.counts[lun] = [0] * (len(self.bounds) + 1)
            self.sums[lun] = 0.0
        c[bisect_left(self.bounds, seconds)] += n  # "le": a bound counts values equal to it
        self.sums[lun] += seconds * n

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        h = HistogramMetricFamily(self.name, self.doc, labels=["lun"])
        les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        for lun, c in sorted(self.counts.items(), key=lambda kv: str(kv[0])):
            h.add_metric([str(lun)], list(zip(les, itertools.accumulate(c), strict=True)),
                         self.sums[lun])
        yield h


def mirror_histogram(core: Core, reg: Any) -> None:
    """``steelfusion_core_mirror_seconds{lun}``: each copy's trip to the secondary and back,
    timed by the LUN's pipeline from now on (a secondary's stays empty)."""
    h = WeightedHistogram("steelfusion_core_mirror_seconds", "Time from queueing a write's "
                          "copy for the secondary (sent at once while a mirror link is up) "
                          "until the secondary's acknowledgement covers it, one observation "
                          "per copy (one Edge frame)", LATENCY_BUCKETS)
    reg.register(h)
    for lun, p in core.pipes.items():
        p.on_mirror_rtt = functools.partial(h.observe, lun)


def core_histograms(core: Core, reg: Any) -> None:
    """A Core's latency histograms: fdatasync, and the mirror round trip."""
    fdatasync_histogram(core, reg)
    mirror_histogram(core, reg)


def commit_histogram(edge: Edge, reg: Any) -> None:
    """``steelfusion_edge_commit_seconds{lun}``: Edge->ack latency of each write record,
    timed by the uplink's shipper from now on."""
    h = WeightedHistogram("steelfusion_edge_commit_seconds", "Time from shipping a write to "
                          "the primary Core until the Core's acknowledgement covers it "
                          "(durable on the Core, and mirrored or journaled), per write in "
                          "the blockstore (a host write, or each 512 KiB of a larger one)",
                          LATENCY_BUCKETS)
    reg.register(h)
    edge.uplink.ship.on_commit = h.observe


def metrics_app(web: Any, reg: Any) -> Any:
    """GET /metrics: the registry in Prometheus text format."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def scrape(_: Any) -> Any:
        body = generate_latest(reg)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def root(_: Any) -> Any:
        return web.Response(text="steelfusion metrics: GET /metrics\n")

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/", root)
    return app


def _bind(addr: tuple[str, int]) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
        s.listen(128)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


async def _bound(addr: tuple[str, int]) -> socket.socket:
    return _bind(addr)


class WebServer:
    """One HTTP listener of a node: bound by :meth:`bind`, serving after :meth:`serve`."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.sock: socket.socket | None = None
        self.runner: Any = None
        self.closing = asyncio.Event()  # long-lived responses (event streams) end on it

    async def bind(self, addr: tuple[str, int], key: str, source: str) -> None:
        """Take the port now: a port in use fails the node's start naming ``key``."""
        self.sock = await listening(_bound(addr), addr, key, source)

    async def serve(self, make_app: Callable[[Any], Any]) -> None:
        """Import aiohttp off the loop, build the app with ``make_app(aiohttp.web)``, serve."""
        assert self.sock is not None
        web = await asyncio.to_thread(importlib.import_module, "aiohttp.web")
        app = await asyncio.to_thread(make_app, web)
        if self.closing.is_set():  # stopped while starting (an HA Core standing by at once)
            return
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self.runner = runner
        await web.SockSite(runner, self.sock, shutdown_timeout=1.0).start()
        host, port = self.sock.getsockname()[:2]
        _log.info("http_serving", what=self.what, address=f"{host}:{port}")

    async def stop(self) -> None:
        self.closing.set()
        if self.runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.runner.cleanup(), 3)
        elif self.sock is not None:
            self.sock.close()


__all__ = ["CoreCollector", "EdgeCollector", "WebServer", "WeightedHistogram",
           "WitnessCollector", "alarm_kind", "commit_histogram", "core_histograms",
           "fdatasync_histogram", "metrics_app", "mirror_histogram", "registry", "timed_sync"]


async def start_http(cfg: Any, servers: list[WebServer], collectors: Callable[[], list[Any]],
                     view: Callable[[], Any] | None = None,
                     on_registry: Callable[[Any], None] | None = None) -> asyncio.Task[None] | None:
    """Bind a node's ``[metrics] listen`` and ``[console] listen`` (each appended to
    ``servers`` as soon as it is bound, for the node's stop), then serve both from a
    background task (returned; None when neither is configured)."""
    metrics_at = getattr(cfg, "metrics", None)
    console_at = getattr(cfg, "console", None) if view is not None else None
    m = c = None
    if metrics_at is not None:
        m = WebServer("metrics")
        await m.bind(metrics_at, "[metrics] listen", cfg.source)
        servers.append(m)
    if console_at is not None:
        c = WebServer("console")
        await c.bind(console_at, "[console] listen", cfg.source)
        servers.append(c)
    if m is None and c is None:
        return None

    def make_metrics(web: Any) -> Any:
        reg = registry(*collectors())
        if on_registry is not None:
            on_registry(reg)
        return metrics_app(web, reg)

    async def serve() -> None:
        if m is not None:
            await m.serve(make_metrics)
        if c is not None:
            assert view is not None
            from steelfusion.console.server import console_app

            password = cfg.console_password
            closing = c.closing
            await c.serve(lambda web: console_app(web, view(), password, closing))

    task = asyncio.get_running_loop().create_task(serve(), name="http")
    task.add_done_callback(_said_if_failed)
    return task


def _said_if_failed(t: asyncio.Task[None]) -> None:
    if not t.cancelled() and t.exception() is not None:
        _log.error("http_failed", error=repr(t.exception()))
