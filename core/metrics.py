"""A Core's Prometheus metrics (issue 15): its replication read at scrape time, and the
histograms of its fdatasync and mirror round trip.

Here, not in :mod:`steelfusion.metrics`, because they read a Core's status and
pipelines; the shared module serves them and knows no role.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from steelfusion.metrics import (
    LATENCY_BUCKETS,
    SYNC_BUCKETS,
    WeightedHistogram,
    alarm_gauge,
    timed_sync,
)

if TYPE_CHECKING:
    from core.node import Core

#: every replication state a Core can report (``CoreEngine.replication``)
REPLICATION_STATES = ("running", "paused", "suspended", "resyncing", "terminated", "replica",
                      "inconsistent", "disconnected", "standalone", "disabled")
ROLES = ("primary", "secondary")


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
        yield alarm_gauge(p, st["alarms"])


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


__all__ = ["REPLICATION_STATES", "ROLES", "CoreCollector", "core_histograms",
           "fdatasync_histogram", "mirror_histogram"]
