"""A smoke run of the side-by-side benchmark: it runs and reports, nothing is timed here."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import tool
from tests.nodes import refused, why_no_netns

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


# -- the WAN benchmark (issue 10 item 4) ------------------------------------------------------

WAN_NAMES = ["4K write QD1", "4K write QD32", "128K write QD8", "4K read QD1 cold",
             "4K read QD1 warm", "128K read QD8 cold", "128K read QD8 warm"]


def _bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "steelfusion.cli", "bench", *args],
                          capture_output=True, text=True, timeout=timeout)


def _tgtd_pids_naming(text: str) -> list[int]:
    """Live tgtd processes whose command line contains ``text``."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "tgtd" in cmd and text in cmd:
            out.append(int(p.name))
    return out


@pytest.mark.skipif(why_no_netns() is not None, reason=f"no netns lab: {why_no_netns()}")
@pytest.mark.timeout(150)
def test_wan_bench_quick_measures_both_targets_across_the_wan(tmp_path: Path) -> None:
    """Both targets measured from the branch; the WAN delay really on the path (lower
    bounds only: a QD1 write to tgt and a cold read at the Edge each cross it); everything
    stopped and the namespaces removed afterwards."""
    import json

    from steelfusion import netns
    from steelfusion.lab import Lab, pid_alive

    for t in ("qemu-img", "tgtd", "tgtadm", "ss"):
        tool(t)
    wd = tmp_path / "wb"
    p = _bench("--wan", "30ms", "--quick", "--rounds", "1", "--json", "--workdir", str(wd),
               timeout=140)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout)
    assert res["mode"] == "wan" and res["rounds"] == 1 and res["quick"] is True
    assert res["wan"]["delay_s"] == 0.03 and res["wan"]["dc_delay_s"] == 0.001
    # a TCP connect across the WAN: one round trip (the emulator stamps a packet when its
    # batch is read, so a delay can come out some microseconds short; undelayed it is ~0.1 ms)
    assert res["wan"]["measured_rtt_s"] >= 0.95 * 0.06, res["wan"]
    for pair in ("branch<->dc-a", "branch<->dc-b"):
        assert res["wan"]["links"][pair]["delay"] == 0.03, res["wan"]["links"]
    assert res["wan"]["links"]["dc-a<->dc-b"]["delay"] == 0.001
    assert res["tgt"]["portal"].startswith("10.99.1.1:") and res["tgt"]["netns"].endswith("-dc-a")
    assert res["edge"]["portal"].startswith("10.99.0.1:")
    assert res["edge"]["netns"].endswith("-branch")
    rows = {w["workload"]: w for w in res["workloads"]}
    assert list(rows) == WAN_NAMES
    for w in rows.values():
        for side in ("edge", "tgt"):
            s = w[side]
            assert s["iops"] > 0 and s["mb_s"] > 0 and s["latency_ms"] > 0, (w, side)
            assert len(s["runs_iops"]) == 1 and s["ops"][0] >= 8
        if w["write"]:
            assert w["commit_lag_s"] is not None and w["commit_lag_s"] >= 0
        else:
            assert w["commit_lag_s"] is None
    # a QD1 write to tgt in the data center waits for the WAN: at least one round trip
    assert rows["4K write QD1"]["tgt"]["latency_ms"] >= 2 * 30, rows["4K write QD1"]
    # a cold read at the Edge is fetched from the Core across the WAN: at least one too
    assert rows["4K read QD1 cold"]["edge"]["latency_ms"] >= 2 * 30, rows["4K read QD1 cold"]
    assert res["replication"] == {"core-a": "running", "core-b": "replica"}  # synchronous
    # nothing left: no node, no tgtd, no namespace of this lab
    lab = Lab(wd / "lab")
    data = json.loads(lab.file.read_text())
    assert [n["name"] for n in lab.processes(data) if pid_alive(n["pid"])] == []
    assert _tgtd_pids_naming(res["tgt"]["portal"]) == []
    assert netns.listing(netns.lab_prefix(data["labid"])) == []


def test_wan_bench_refuses_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not root: one line saying so, before anything starts (no process: this test is not
    marked lab, so starting one would fail it)."""
    import os

    from click.testing import CliRunner

    from steelfusion.cli import main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    r = CliRunner().invoke(main, ["bench", "--wan", "30ms", "--quick"])
    assert r.exit_code != 0
    out = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(out) == 1 and "needs root" in out[0] and "--wan" in out[0], r.output


@pytest.mark.parametrize(("args", "want"), [
    (["--rate", "100mbit"], ["--rate", "--wan"]),
    (["--dc-delay", "2ms"], ["--dc-delay", "--wan"]),
    (["--wan", "30"], ["--wan", "unit"]),
    (["--wan", "fast"], ["--wan", "duration"]),
    (["--wan", "90s"], ["--wan", "60s"]),
    (["--wan", "30ms", "--rate", "100"], ["--rate", "unit"]),
    (["--wan", "30ms", "--jitter", "40ms"], ["--jitter", "--wan"]),
    (["--wan", "30ms", "--loss", "60%"], ["--loss"]),
    (["--wan", "30ms", "--precondition"], ["--precondition", "--wan"]),
    (["--wan", "30ms", "--workload", "4K write QD64"], ["'4K write QD64'", "4K read QD1 cold"]),
    (["--workload", "4K write QD64"], ["'4K write QD64'", "4K write QD32"]),
    (["--rounds", "0"], ["--rounds"]),
    (["--wan", "30ms", "--rounds", "0"], ["--rounds"]),
    (["--observe-cost", "--wan", "30ms"], ["--observe-cost", "--wan"]),
    (["--observe-cost", "--san", "tgt"], ["--observe-cost", "--san"]),
    (["--observe-cost", "--rounds", "0"], ["--rounds"]),
    (["--observe-cost", "--workload", "4K write QD64"], ["'4K write QD64'", "4K write QD32"]),
])
def test_bench_refuses_bad_options_in_one_line(args: list[str], want: list[str]) -> None:
    """Each bad option: one line naming it, exit != 0, before any lab or tgt starts."""
    p = _bench(*args)
    refused(p, *want)


@pytest.mark.skipif(why_no_netns() is not None, reason=f"no netns lab: {why_no_netns()}")
def test_wan_bench_stopped_by_sigterm_leaves_nothing_running(tmp_path: Path) -> None:
    """SIGTERM mid-run (``timeout``, a CI job cancelled) ends it like ^C: one line, exit
    != 0, the lab's nodes, the emulator and tgtd stopped, the namespaces removed."""
    import json
    import re
    import signal

    from steelfusion import netns
    from steelfusion.lab import Lab, pid_alive

    wd = tmp_path / "wb"
    p = subprocess.Popen([sys.executable, "-m", "steelfusion.cli", "bench", "--wan", "30ms",
                          "--quick", "--workdir", str(wd)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        portal = None
        for line in p.stdout:  # progress lines; tgtd is the last thing started
            m = re.search(r"tgt in dc-a at (\S+);", line)
            if m:
                portal = m.group(1)
                break
        assert portal is not None, p.communicate(timeout=60)
        assert _tgtd_pids_naming(f"portal={portal}") != []
        data = json.loads((wd / "lab" / "lab.json").read_text())
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode != 0 and len(lines) == 1, err
    assert "interrupted (SIGTERM)" in lines[0] and "Traceback" not in err, err
    lab = Lab(wd / "lab")
    assert [n["name"] for n in lab.processes(data) if pid_alive(n["pid"])] == []
    assert _tgtd_pids_naming(f"portal={portal}") == []
    assert netns.listing(netns.lab_prefix(data["labid"])) == []


@pytest.mark.parametrize("wan", [[], ["--wan", "30ms"]], ids=["loopback", "wan"])
def test_bench_on_a_folder_with_a_running_lab_leaves_that_lab_alone(
        tmp_path: Path, wan: list[str]) -> None:
    """`bench --workdir DIR` where DIR/lab is a running lab: refused in one line, and that
    lab keeps running (the benchmark stops only a lab it started)."""
    from steelfusion.lab import Lab, pid_alive

    if wan and why_no_netns() is not None:
        pytest.skip(f"no netns lab: {why_no_netns()}")
    lab = Lab(tmp_path / "lab")
    data = lab.up(luns=1, lun_size=64 << 20, edges=1)
    try:
        p = _bench(*wan, "--quick", "--workdir", str(tmp_path))
        refused(p, str(tmp_path / "lab"))
        assert [n["name"] for n in lab.nodes(data) if not pid_alive(n["pid"])] == []
    finally:
        lab.down()


def test_a_signal_swallowed_inside_a_callback_still_stops_the_bench() -> None:
    """A SIGTERM whose KeyboardInterrupt is raised where Python only prints and drops it
    (here a ``__del__``; in the fresh-clone run, logging's at-fork hook while a subprocess
    started) is raised again just after, so the bench still stops, with no stray traceback."""
    import io
    import os
    import signal
    import time
    from contextlib import redirect_stderr

    from steelfusion.bench import BenchError, stopped_cleanly

    class Swallow:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)

    err = io.StringIO()
    t0 = time.monotonic()
    with redirect_stderr(err), pytest.raises(BenchError, match="SIGTERM"), stopped_cleanly():
        Swallow()
        time.sleep(5)
    assert time.monotonic() - t0 < 2 and err.getvalue() == "", err.getvalue()


# -- what metrics and consoles cost the write path (issue 15) ---------------------------------


def test_observe_cost_quick_watches_the_on_lab_and_leaves_nothing_running(
        tmp_path: Path) -> None:
    """`bench --observe-cost`: both labs measured with the same workload, the "on" lab
    really watched (every metrics endpoint fetched, every console's event stream read, the
    "off" lab has neither), and both labs stopped afterwards."""
    import json

    from steelfusion.lab import Lab, pid_alive

    tool("qemu-img")
    wd = tmp_path / "ob"
    p = _bench("--observe-cost", "--quick", "--rounds", "1", "--workload", "4K write QD1",
               "--json", "--workdir", str(wd), timeout=200)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout)
    assert res["mode"] == "observe-cost" and res["rounds"] == 1 and res["quick"] is True
    assert res["first"] == ["on"] and res["preconditioned"] is True
    [w] = res["workloads"]
    assert w["workload"] == "4K write QD1" and w["write"] is True
    for side in ("on", "off"):
        s = w[side]
        assert s["iops"] > 0 and s["mb_s"] > 0 and len(s["runs_iops"]) == 1, (side, s)
        assert s["commit_lag_s"] is not None and s["commit_lag_s"] >= 0
    r = w["ratio"]
    assert r["min"] == r["median"] == r["max"] and len(r["runs"]) == 1
    assert abs(r["median"] - w["on"]["runs_iops"][0] / w["off"]["runs_iops"][0]) < 0.01
    assert w["verdict"].startswith("one round") and res["verdict"].startswith("not judged")
    sc = res["scraper"]
    assert sc["failure"] is None
    assert sc["metrics_scrapes"] > 0 and sc["metrics_bytes"] > 0
    assert sc["sse_bytes"] > 0 and sc["sse_events"] > 0 and sc["sse_streams_opened"] >= 3
    eps = sc["endpoints"]
    assert {e["node"] for e in eps if e["kind"] == "metrics"} == {
        "witness", "core-a", "core-b", "edge-1"}
    assert {e["node"] for e in eps if e["kind"] == "events"} == {"core-a", "core-b", "edge-1"}
    assert all(e["fetches"] >= 1 and e["bytes"] > 0 for e in eps), eps
    assert res["observe"]["off"] == {"metrics": [], "console": []}
    assert sorted(res["observe"]["on"]["console"]) == ["core-a", "core-b", "edge-1"]
    # nothing left of either lab
    for side in ("on", "off"):
        lab = Lab(wd / f"lab-{side}")
        data = json.loads(lab.file.read_text())
        assert [n["name"] for n in lab.processes(data) if pid_alive(n["pid"])] == [], side


def test_observe_cost_verdict_reads_the_spread_of_the_rounds() -> None:
    from steelfusion.benchobserve import verdict

    assert verdict([0.93, 1.04, 0.98]) == "no cost told from noise"
    assert verdict([1.0, 1.2]) == "no cost told from noise"
    assert verdict([0.8, 0.85, 0.9]) == "cost: 15% slower with observation on, in every round"
    assert verdict([1.1, 1.2]).startswith("no cost (faster")
    assert verdict([0.7]).startswith("one round")


def test_observe_cost_stopped_by_sigterm_stops_both_labs(tmp_path: Path) -> None:
    """SIGTERM while the watched rounds run: one line, exit != 0, both labs' nodes
    stopped (the scraper's connections do not hold the exit up)."""
    import json
    import signal

    from steelfusion.lab import Lab, pid_alive

    tool("qemu-img")
    wd = tmp_path / "ob"
    p = subprocess.Popen([sys.executable, "-m", "steelfusion.cli", "bench", "--observe-cost",
                          "--lun-size", "256M", "--rounds", "20", "--workdir", str(wd)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        for line in p.stdout:  # progress lines; the rounds start after this one
            if line.startswith("lab on watched:"):
                break
        else:
            raise AssertionError(p.communicate(timeout=60))
        datas = {s: json.loads((wd / f"lab-{s}" / "lab.json").read_text())
                 for s in ("on", "off")}
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode != 0 and len(lines) == 1, err
    assert "interrupted (SIGTERM)" in lines[0] and "two labs" in lines[0], err
    for side, data in datas.items():
        lab = Lab(wd / f"lab-{side}")
        assert [n["name"] for n in lab.processes(data) if pid_alive(n["pid"])] == [], side
    # nor a qemu-img bench it started (one forked as the SIGTERM came spun on a dead portal)
    portals = [e["portal"] for d in datas.values() for e in d["edges"]]

    def tools_left() -> list[str]:
        out = []
        for proc in Path("/proc").iterdir():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "qemu-img" in cmd and any(pt in cmd for pt in portals):
                out.append(cmd)
        return out

    deadline = time.monotonic() + 5
    while tools_left() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tools_left() == []


def test_observe_cost_overall_verdict_names_each_cost() -> None:
    from steelfusion.benchobserve import overall

    def row(name: str, runs: list[float], v: str) -> dict[str, object]:
        return {"workload": name, "verdict": v,
                "ratio": {"median": sorted(runs)[len(runs) // 2], "min": min(runs),
                          "max": max(runs)}}

    assert overall([row("a", [0.9, 1.1], "no cost told from noise"),
                    row("b", [1.1, 1.2], "no cost (faster ...)")]).startswith(
        "no cost told from noise")
    got = overall([row("a", [0.9, 1.1], "no cost told from noise"),
                   row("b", [0.8, 0.9, 0.85], "cost: 15% slower")])
    assert got == "measured cost: b on/off 0.85 (0.80-0.90)"
