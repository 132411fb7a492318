"""Prometheus metrics of a real lab (issue 15): every node's endpoint, scraped while a host
writes 64 MiB through the Edge with qemu-img, and across a suspend.

Also the parts that start no process: alarm kinds as labels, and the commit-lag arithmetic.
"""

from __future__ import annotations

import os
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from steelfusion import control
from steelfusion.initiator import qemu_write
from steelfusion.metrics import alarm_kind
from steelfusion.units import parse_addr
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
    "steelfusion_core_fdatasync_seconds", "steelfusion_core_writes",
    "steelfusion_core_written_bytes"}
EDGE_NAMES = {
    "steelfusion_edge_uncommitted_bytes", "steelfusion_edge_uncommitted_writes",
    "steelfusion_edge_reserve_size_bytes", "steelfusion_edge_reserve_used_ratio",
    "steelfusion_edge_commit_lag_seconds", "steelfusion_edge_blockstore_read_hits",
    "steelfusion_edge_blockstore_read_misses", "steelfusion_edge_host_writes",
    "steelfusion_edge_host_written_bytes", "steelfusion_edge_host_reads",
    "steelfusion_edge_host_read_bytes", "steelfusion_edge_iscsi_sessions",
    "steelfusion_edge_alarms"}
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
