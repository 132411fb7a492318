"""A smoke run of the side-by-side benchmark: it runs and reports, nothing is timed here."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import tool

pytestmark = [pytest.mark.lab, pytest.mark.timeout(300)]


def test_bench_quick_prints_the_table() -> None:
    for t in ("qemu-img", "tgtd", "tgtadm"):
        tool(t)
    p = subprocess.run([sys.executable, "-m", "steelfusion.cli", "bench", "--quick", "--rounds",
                        "1", "--json"], capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, p.stderr[-3000:]
    import json

    res = json.loads(p.stdout)
    names = [w["workload"] for w in res["workloads"]]
    assert names == ["4K write QD32", "4K write QD1", "128K write QD8", "4K read QD32"]
    assert res["preconditioned"] is True
    for w in res["workloads"]:
        assert w["edge_iops"] > 0 and w["tgt_iops"] > 0 and w["ratio"] is not None
    assert res["core_replication_mb_s"] > 0 and res["resync_mb_s"] > 0
    assert set(res["rss_big_lun_bytes"]) == {"core-a", "core-b", "edge-1"}


def test_bench_path_quick_reports_each_workload() -> None:
    p = subprocess.run([sys.executable, "-m", "steelfusion.cli", "bench-path", "--quick",
                        "--json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    import json

    res = json.loads(p.stdout)
    assert [r["workload"] for r in res] == ["4K read QD32", "4K write QD32", "128K write QD8"]
    assert all(r["cpu_us_per_command"] > 0 and r["commands"] > 0 for r in res)
