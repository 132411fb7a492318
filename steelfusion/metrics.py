"""Prometheus metrics of every node (issue 15), read when scraped, never on the write path.

Each node already keeps what an operator graphs: a Core its per-LUN sequences,
mirror queue, resync progress and journal use; an Edge its blockstore and host
counters; a Witness its leases and decisions. Each role's collectors read those
at scrape time (prometheus-client "custom collectors"), so a host write costs
the same with metrics on or off. The histograms are observed where the time
passes, and only while metrics are on: ``fdatasync`` time on a Core once per
group commit (one sync covers many writes), in the worker thread that already
runs it; the mirror round trip on a primary Core and the Edge->ack latency on
an Edge once per acknowledged frame, from times the sans-IO pipelines keep
(:mod:`core.pipeline`, :mod:`edge.shipping`) while a hook asks them to.

This module knows no role (shared code never imports one): it holds what every
node uses (:func:`start_http`, :func:`registry`, :class:`WeightedHistogram`,
the buckets, the alarm gauge); the collectors and hooks that read a role live
in that role's package (:mod:`core.metrics`, :mod:`edge.metrics`,
:mod:`witness.metrics`), and each node hands its own to :func:`start_http`.

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
import itertools
import re
import socket
import time
from bisect import bisect_left
from collections.abc import Callable, Hashable, Iterator
from typing import Any

from steelfusion import log
from steelfusion.startup import listening

_log = log.get("metrics")

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


def alarm_gauge(prefix: str, alarms: list[dict[str, Any]]) -> Any:
    """``PREFIX_alarms{kind}``: a node's active alarms counted by :func:`alarm_kind`."""
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


def _import_web() -> Any:
    """``aiohttp.web``, imported by name (a plain import: the module's imports stay readable)."""
    from aiohttp import web

    return web


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
        web = await asyncio.to_thread(_import_web)
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


__all__ = ["LATENCY_BUCKETS", "SYNC_BUCKETS", "WebServer", "WeightedHistogram", "alarm_gauge",
           "alarm_kind", "metrics_app", "registry", "start_http", "timed_sync"]


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
