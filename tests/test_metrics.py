"""Prometheus metrics of a real lab (issue 15): every node's endpoint, scraped while a host
writes 64 MiB through the Edge with qemu-img, and across a suspend.

Also the parts that start no process: alarm kinds as labels, and the latency bookkeeping
of the mirror queue (:mod:`core.pipeline`) and of the Edge's shipper (:mod:`edge.shipping`).
"""

from __future__ import annotations

import os
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from core.pipeline import LunPipe
from edge.node import RECORD_MAX
from edge.shipping import Shipper
from steelfusion import control
from steelfusion.initiator import qemu_write
from steelfusion.metrics import LATENCY_BUCKETS, WeightedHistogram, alarm_kind
from steelfusion.sim import Sim
from steelfusion.units import parse_addr
from steelfusion.wire import Write
from tests.conftest import tool
from tests.nodes import lab_at, wait_for

MiB = 1 << 20
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

CORE_NAMES = {
    "steelfusion_core_replication_state", "steelfusion_core_epoch", "steelfusion_core_role",
    "steelfusion_core_mirror_queue_bytes", "steelfusion_core_acknowledged_sequence",
    "steelfusion_core_applied_sequence", "steelfusion_core_durable_sequence",
    "steelfusion_core_resync_done_bytes", "steelfusion_core_resync_total_bytes",
    "steelfusion_core_resync_rate_bytes_per_second", "steelfusion_core_journal_size_bytes",
    "steelfusion_core_journal_log_used_bytes", "steelfusion_core_replication_connections",
    "steelfusion_core_replication_connections_expected", "steelfusion_core_alarms",
    "steelfusion_core_fdatasync_seconds", "steelfusion_core_mirror_seconds",
    "steelfusion_core_writes",
    "steelfusion_core_written_bytes"}
EDGE_NAMES = {
    "steelfusion_edge_uncommitted_bytes", "steelfusion_edge_uncommitted_writes",
    "steelfusion_edge_reserve_size_bytes", "steelfusion_edge_reserve_used_ratio",
    "steelfusion_edge_commit_lag_seconds", "steelfusion_edge_blockstore_read_hits",
    "steelfusion_edge_blockstore_read_misses", "steelfusion_edge_host_writes",
    "steelfusion_edge_host_written_bytes", "steelfusion_edge_host_reads",
    "steelfusion_edge_host_read_bytes", "steelfusion_edge_iscsi_sessions",
    "steelfusion_edge_alarms", "steelfusion_edge_commit_seconds"}
WITNESS_NAMES = {"steelfusion_witness_lease_valid", "steelfusion_witness_approvals",
                 "steelfusion_witness_refusals", "steelfusion_witness_connected_nodes"}


def scrape(addr: str) -> tuple[set[str], Samples]:
    """Family names (with help text: checked) and every sample of ``addr``'s /metrics."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
        text = r.read().decode()
    names, out = set(), {}
    for fam in text_string_to_metric_families(text):
        assert fam.documentation, fam.name  # every metric says what it is
        names.add(fam.name)
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return names, out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def copy(seq: int) -> Write:
    return Write(1, 0, 7, seq, (seq - 1) * 4096, b"x" * 4096, seq - 1)


def test_mirror_round_trip_is_observed_once_per_copy() -> None:
    p = LunPipe(None)  # the mirror queue never touches the backend
    seen: list[float] = []
    p.queue_copy(1, copy(1), now=0.5)
    assert not p.mirror_sent  # metrics off: nothing is kept
    p.mirror_acked_to(1, now=0.7)
    assert not seen

    p.on_mirror_rtt = seen.append
    for t in (1, 2, 3):
        p.queue_copy(1, copy(t + 1), now=float(t))  # seqs 2, 3, 4 sent at t=1, 2, 3
    p.mirror_acked_to(3, now=5.0)  # covers the first two
    assert seen == [4.0, 3.0]
    p.mirror_acked_to(3, now=6.0)  # a duplicate ACK
    p.mirror_acked_to(2, now=6.0)  # an older one, late
    assert seen == [4.0, 3.0]
    # a reconnection: the engine resends the queue (seq 4) and the peer's HELLO says it has
    # it; its ACK of the resent copy then comes too. Seq 4 counts once, from its first send.
    p.queue_copy(1, copy(5), now=8.0)
    p.mirror_acked_to(4, now=9.0)
    p.mirror_acked_to(4, now=9.5)
    assert seen == [4.0, 3.0, 6.0]
    # a jump over several (the secondary acknowledges the next group commit at once)
    p.queue_copy(1, copy(6), now=10.0)
    p.mirror_acked_to(6, now=10.25)
    assert seen == [4.0, 3.0, 6.0, 2.25, 0.25]
    assert not p.mirror_sent and not p.mirror_q


def test_mirror_times_of_dropped_copies_are_never_observed() -> None:
    p = LunPipe(None)
    seen: list[float] = []
    p.on_mirror_rtt = seen.append
    p.queue_copy(1, copy(1), now=1.0)
    p.drop_copies()  # a suspension: the peer gets seq 1 by resync
    p.mirror_acked_to(1, now=50.0)
    p.queue_copy(1, copy(2), now=2.0)
    p.mirror_q.clear()  # a demotion (core.peering.demote) clears the queue by hand
    p.mirror_acked_to(2, now=60.0)
    assert seen == []
    p.queue_copy(1, copy(3), now=70.0)  # promoted again: fresh times only
    p.mirror_acked_to(3, now=70.5)
    assert seen == [0.5]
    p.queue_copy(1, copy(4), now=71.0)
    p.switch_stream(8)  # a new Edge blockstore: seq numbers start again
    p.queue_copy(1, Write(1, 0, 8, 1, 0, b"y", 0), now=72.0)
    p.mirror_acked_to(1, now=72.5)
    assert seen == [0.5, 0.5]


def timed_sim(seed: int, **kw: Any) -> tuple[Sim, list[float]]:
    """A seed of the simulation (the real engine, resets and crashes, a virtual clock) with
    the mirror round trip timed on both Cores' first lives."""
    sim = Sim(seed, **kw)
    seen: list[float] = []
    for c in sim.cores:
        c.pipes[1].on_mirror_rtt = seen.append
    sim.run()
    return sim, seen


def test_mirror_round_trip_in_the_simulation() -> None:
    sim, seen = timed_sim(13, writes=40)  # a seed with no fault: every copy acknowledged once
    p = sim.cores[0].pipes[1]
    assert sim.faults == [] and sim.cores[0].role == "primary"
    assert len(seen) == p.writes + p.discards == 40
    assert all(0 < s < 0.1 for s in seen)
    # with link resets, cuts, crashes (resends of the queue), and with suspensions,
    # failovers and demotions (copies dropped): never a negative or stale time
    reset = 0
    for seed in range(12):
        for full in (False, True):
            sim, seen = timed_sim(seed, full=full)
            assert all(0 <= s <= sim.clock.now for s in seen), (seed, full)
            reset += bool({"reset-peer", "cut-peer"} & set(sim.faults)) and bool(seen)
    assert reset >= 5


@dataclass(frozen=True)
class Rec:
    lun: int
    seq: int
    offset: int
    length: int
    discard: int = 0


def test_edge_commit_latency_is_observed_once_per_host_write() -> None:
    ship = Shipper(window_bytes=1 << 20)
    seen: list[tuple[int, float, int]] = []
    ship.on_commit = lambda lun, s, n: seen.append((lun, s, n))
    recs = [Rec(1, i, (i - 1) * 4096, 4096) for i in (1, 2, 3)] + [Rec(2, 4, 0, 4096)]
    for r in recs[:2]:
        ship.append(r)
    assert [f.seq for f in ship.next_frames({}, now=1.0)] == [2]  # 1 and 2 coalesced
    for r in recs[2:]:
        ship.append(r)
    assert [f.seq for f in ship.next_frames({}, now=2.0)] == [3, 4]
    ship.on_ack(1, 2, now=5.0)
    assert seen == [(1, 4.0, 2)]
    ship.on_ack(1, 2, now=6.0)  # a duplicate
    ship.on_ack(1, 1, now=6.0)  # inside a frame already gone
    assert seen == [(1, 4.0, 2)]
    # a reconnection: what is uncommitted goes again as new frames, dated anew
    ship.reset(recs[2:], {1: 2})
    assert [f.seq for f in ship.next_frames({1: 2}, now=8.0)] == [3, 4]
    ship.on_ack(1, 3, now=8.5)
    ship.on_ack(2, 4, now=9.0)
    ship.on_ack(1, 3, now=9.5)
    assert seen == [(1, 4.0, 2), (1, 0.5, 1), (2, 1.0, 1)]
    assert ship.inflight_bytes == 0
    ship.append(Rec(1, 5, 3 * 4096, 4096))
    ship.next_frames({1: 3, 2: 4}, now=10.0)
    ship.on_ack(1, 5)  # an ACK with no time (the simulation): freed, not observed
    assert len(seen) == 3 and ship.inflight_bytes == 0


def test_a_weighted_observation_counts_as_n_in_the_exposition() -> None:
    h = WeightedHistogram("t_seconds", "test", LATENCY_BUCKETS)
    h.observe(1, 0.003, 5)
    h.observe(1, 0.001)  # on a bound: counted in it (Prometheus buckets are "le")
    h.observe(2, 40.0)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(h)
    got = parse(generate_latest(reg).decode())
    assert value(got, "t_seconds_count", lun="1") == 6
    assert value(got, "t_seconds_sum", lun="1") == pytest.approx(0.016)
    assert value(got, "t_seconds_bucket", lun="1", le="0.001") == 1
    assert value(got, "t_seconds_bucket", lun="1", le="0.002") == 1
    assert value(got, "t_seconds_bucket", lun="1", le="0.005") == 6
    assert value(got, "t_seconds_bucket", lun="1", le="+Inf") == 6
    assert value(got, "t_seconds_bucket", lun="2", le="30.0") == 0
    assert value(got, "t_seconds_bucket", lun="2", le="+Inf") == 1


def test_alarm_kinds_do_not_grow_with_luns_or_nodes() -> None:
    assert alarm_kind("lun_12_io") == "lun_io"
    assert alarm_kind("lun_3_replica_mismatch") == "lun_replica_mismatch"
    assert alarm_kind("duplicate_node_core-b") == "duplicate_node"
    assert alarm_kind("witness_unreachable") == "witness_unreachable"


@pytest.mark.lab
@pytest.mark.timeout(300)
def test_metrics_move_with_a_64_mib_write_and_a_suspend(tmp_path: Path) -> None:
    tool("qemu-img")
    with lab_at(tmp_path / "lab") as lab:
        data = lab.up(luns=1, lun_size=128 * MiB, edges=1)
        edge = data["edges"][0]
        core_a, core_b = data["cores"]
        at = {"witness": data["witness"]["metrics"], "core-a": core_a["metrics"],
              "core-b": core_b["metrics"], "edge-1": edge["metrics"]}
        got = {n: wait_for(lambda a=a: scrape(a), what=f"{n} metrics") for n, a in at.items()}
        for n, want in (("core-a", CORE_NAMES), ("core-b", CORE_NAMES), ("edge-1", EDGE_NAMES),
                        ("witness", WITNESS_NAMES)):
            assert want <= got[n][0], (n, want - got[n][0])
        assert value(got["core-a"][1], "steelfusion_core_replication_state", lun="1",
                     state="running") == 1

        src = tmp_path / "image.raw"
        src.write_bytes(os.urandom(64 * MiB))
        done = threading.Event()
        failed: list[BaseException] = []

        def write() -> None:
            try:
                qemu_write(src, edge["targets"][0]["url"])
            except BaseException as e:
                failed.append(e)
            finally:
                done.set()

        t = threading.Thread(target=write)
        t.start()
        uncommitted, acked = [], []
        while not done.is_set():
            e = scrape(at["edge-1"])[1]
            a = scrape(at["core-a"])[1]
            uncommitted.append(value(e, "steelfusion_edge_uncommitted_bytes"))
            acked.append(value(a, "steelfusion_core_acknowledged_sequence", lun="1"))
        t.join()
        assert not failed, failed
        # falls back to 0 once both Cores hold everything
        wait_for(lambda: value(scrape(at["edge-1"])[1],
                               "steelfusion_edge_uncommitted_bytes") == 0, timeout=60,
                 what="nothing uncommitted")
        e = scrape(at["edge-1"])[1]
        a = scrape(at["core-a"])[1]
        b = scrape(at["core-b"])[1]
        print(f"{len(uncommitted)} scrapes during the write; uncommitted max "
              f"{max(uncommitted) / MiB:.1f} MiB; acked seq {acked[0]:.0f} -> "
              f"{value(a, 'steelfusion_core_acknowledged_sequence', lun='1'):.0f}")
        assert max(uncommitted) > 0
        assert acked == sorted(acked) and acked[-1] > acked[0]  # rises, never back
        final = value(a, "steelfusion_core_acknowledged_sequence", lun="1")
        assert final >= acked[-1] > 0
        assert value(b, "steelfusion_core_durable_sequence", lun="1") == final
        assert value(e, "steelfusion_edge_host_written_bytes_total", lun="1") >= 64 * MiB
        assert value(e, "steelfusion_edge_commit_lag_seconds") == 0
        assert value(a, "steelfusion_core_fdatasync_seconds_count", lun="1") > 0
        assert value(b, "steelfusion_core_fdatasync_seconds_count", lun="1") > 0
        # Edge->ack latency: one observation per blockstore write, each shipped once here (a
        # host write is one, or one per RECORD_MAX of it: twice as many would be too many)
        host_writes = value(e, "steelfusion_edge_host_writes_total", lun="1")
        records_max = host_writes + value(e, "steelfusion_edge_host_written_bytes_total",
                                          lun="1") // RECORD_MAX
        n = value(e, "steelfusion_edge_commit_seconds_count", lun="1")
        total = value(e, "steelfusion_edge_commit_seconds_sum", lun="1")
        print(f"Edge->ack: {n:.0f} writes ({host_writes:.0f} host writes), mean "
              f"{total / n * 1000:.1f} ms")
        assert host_writes <= n <= records_max
        assert 0 < total < 5 * n
        # mirror round trip: one per copy, that is per write the primary applied
        n = value(a, "steelfusion_core_mirror_seconds_count", lun="1")
        total = value(a, "steelfusion_core_mirror_seconds_sum", lun="1")
        print(f"mirror: {n:.0f} copies (applied {value(a, 'steelfusion_core_writes_total', lun='1'):.0f}), "
              f"mean {total / n * 1000:.1f} ms")
        assert n == value(a, "steelfusion_core_writes_total", lun="1")
        assert 0 < total < 5 * n
        assert ("steelfusion_core_mirror_seconds_count", (("lun", "1"),)) not in b  # secondary

        # a suspend flips the state gauge; the Witness counts its approval
        ctl = parse_addr(core_a["control"])
        assert control.call(ctl, "suspend")["ok"]
        a = scrape(at["core-a"])[1]
        assert value(a, "steelfusion_core_replication_state", lun="1", state="suspended") == 1
        assert value(a, "steelfusion_core_replication_state", lun="1", state="running") == 0
        assert value(scrape(at["witness"])[1], "steelfusion_witness_approvals_total",
                     op="suspend") >= 1
        assert control.call(ctl, "resume")["ok"]

        def running_again() -> Any:
            return value(scrape(at["core-a"])[1], "steelfusion_core_replication_state",
                         lun="1", state="running") == 1

        wait_for(running_again, timeout=60, what="running again")
