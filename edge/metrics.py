"""An Edge's Prometheus metrics (issue 15): its blockstore, host I/O and uplink read at
scrape time (and its Witness's, when one runs inside it), and the Edge->ack histogram.

Here, not in :mod:`steelfusion.metrics`, because they read an Edge's status and
shipper; the shared module serves them and knows no role.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from steelfusion.metrics import LATENCY_BUCKETS, WeightedHistogram, alarm_gauge
from witness.metrics import WitnessCollector

if TYPE_CHECKING:
    from edge.node import Edge


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
        yield alarm_gauge(p, st["alarms"])
        if e.witness is not None:
            yield from WitnessCollector(e.witness).collect()


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


__all__ = ["EdgeCollector", "commit_histogram"]
