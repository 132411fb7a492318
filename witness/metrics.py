"""A Witness's Prometheus metrics (issue 15): its leases and decisions, read at scrape time.

Here, not in :mod:`steelfusion.metrics`, because they read a Witness's status;
the shared module serves them and knows no role.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from steelfusion.metrics import alarm_gauge

if TYPE_CHECKING:
    from witness.node import Witness


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
        yield alarm_gauge(p, st["alarms"])


__all__ = ["WitnessCollector"]
