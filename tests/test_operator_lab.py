"""Issue 13 (operator experience): ``steelfusion lab``/``demo`` with wrong input or in a
wrong state answer one line, change nothing they refuse to change, and leave nothing
running after a failure.

Real ``python -m steelfusion.cli`` processes against real labs on loopback.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from steelfusion.config import ConfigError, EdgeConfig, write_toml
from steelfusion.lab import Lab, pid_alive
from tests.nodes import procs_in, refused, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]
MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([sys.executable, "-m", "steelfusion.cli", *args],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"steelfusion {' '.join(args)} hung: {e.stderr!r}")


def wait_none_in(d: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while procs_in(d) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not procs_in(d), procs_in(d)


def snapshot(d: Path) -> dict[str, bytes]:
    """The lab's description: lab.json, node configs and key."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())
            if p.suffix in (".json", ".toml", ".key")}


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path / "lab")
    yield lab
    if lab.file.exists():
        lab.down()
    wait_none_in(lab.dir)


# -- item 1 ------------------------------------------------------------------------------------
def test_demo_refusing_a_running_lab_leaves_it_running(lab: Lab) -> None:
    data = lab.up(luns=1, lun_size=8 * MiB, edges=1)
    pids = [n["pid"] for n in lab.nodes(data)]
    p = cli("demo", "--workdir", str(lab.dir), "--size", "1M", "--lun-size", "8M")
    refused(p, "already running", str(lab.dir))
    assert all(pid_alive(pid) for pid in pids)
    st = lab.status()
    assert all(n["running"] for n in [*st["cores"], *st["edges"]]) and st["witness"]["running"]
    # a second `lab up` there is refused the same way, nothing changed
    before = snapshot(lab.dir)
    refused(cli("lab", "up", "--workdir", str(lab.dir)), "already running")
    assert snapshot(lab.dir) == before and all(pid_alive(pid) for pid in pids)
    # other wrong requests against a running lab: one line each, nothing changed
    refused(cli("lab", "start", "core-b", "--workdir", str(lab.dir)), "already running")
    refused(cli("lab", "kill", "nosuchnode", "--workdir", str(lab.dir)), "nosuchnode",
            "core-a")
    assert all(pid_alive(pid) for pid in pids)
    # item 10: the .out files hold readable lines (not empty, not JSON)
    out = (lab.dir / "core-a.out").read_text()
    assert "core_started" in out and not out.lstrip().startswith("{"), out


# -- item 2 ------------------------------------------------------------------------------------
def test_lun_too_large_for_the_file_system_is_refused_before_any_node_starts(
        tmp_path: Path) -> None:
    wd = tmp_path / "lab"
    line = refused(cli("lab", "up", "--workdir", str(wd), "--lun-size", "100T"), "--lun-size")
    assert "100.0 TiB" in line, line
    assert not procs_in(wd)
    assert not wd.exists()  # a refusal leaves no trace


def test_failed_up_stops_every_node_it_started(lab: Lab) -> None:
    lab.dir.mkdir(parents=True)
    (lab.dir / "edge-1").mkdir()
    (lab.dir / "edge-1" / "blockstore").write_text("in the way\n")  # the last node fails
    p = cli("lab", "up", "--workdir", str(lab.dir), "--lun-size", "8M")
    line = refused(p, "edge-1", "blockstore", "stopped")
    assert "witness" in line and "core-a" in line, line
    wait_none_in(lab.dir)
    assert not lab.file.exists()


def test_reusing_a_lab_folder_with_other_options_changes_nothing(lab: Lab) -> None:
    lab.up(luns=1, lun_size=8 * MiB, edges=1)
    lab.down()
    before = snapshot(lab.dir)
    for args, want in [(["--lun-size", "16M"], "--lun-size 8M"),
                       (["--lun-size", "8M", "--luns", "2"], "--luns 1"),
                       (["--lun-size", "8M", "--edges", "2"], "--edges 1")]:
        refused(cli("lab", "up", "--workdir", str(lab.dir), *args), want, str(lab.dir))
        assert snapshot(lab.dir) == before
        assert not procs_in(lab.dir)
    # a start that fails half-way (edge-1 cannot open its blockstore) puts the old files back
    bs = lab.dir / "edge-1" / "blockstore"
    bs.rename(lab.dir / "edge-1" / "moved")
    bs.write_text("in the way\n")
    refused(cli("lab", "up", "--workdir", str(lab.dir), "--lun-size", "8M"), "edge-1",
            "stopped")
    wait_none_in(lab.dir)
    assert snapshot(lab.dir) == before
    bs.unlink()
    (lab.dir / "edge-1" / "moved").rename(bs)
    # the same options start it again
    data = lab.up(luns=1, lun_size=8 * MiB, edges=1)
    assert all(pid_alive(n["pid"]) for n in lab.nodes(data))


# -- item 4 and 10: status ----------------------------------------------------------------------
def test_status_shows_control_addresses_and_aligns_columns(lab: Lab) -> None:
    data = lab.up(luns=1, lun_size=8 * MiB, edges=1)
    wd = str(lab.dir)
    out = cli("lab", "status", "--workdir", wd).stdout
    for n in [data["witness"], *data["cores"], *data["edges"]]:
        assert n["control"] in out, (n["name"], out)
    lab.kill("core-a")
    wait_for(lambda: lab.status()["cores"][1]["replication"] == "disconnected",
             what="core-b disconnected")
    out = cli("lab", "status", "--workdir", wd).stdout
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip() and not ln[0].isspace()}
    assert "epoch=-" in lines["core-a"] and "None" not in out, out
    cols = {ln.index("epoch=") for name, ln in lines.items() if name.startswith("core-")}
    assert len(cols) == 1, out  # `disconnected` no longer pushes its line's columns right


def test_witness_inside_an_edge(lab: Lab) -> None:
    data = lab.up(luns=1, lun_size=8 * MiB, edges=1, witness_in_edge=True)
    wd = str(lab.dir)
    out = cli("lab", "status", "--workdir", wd).stdout
    wline = next(ln for ln in out.splitlines() if ln.startswith("witness"))
    assert "edge-1" in wline and data["witness"]["address"] in wline, out
    for cmd in ("kill", "start"):
        refused(cli("lab", cmd, "witness", "--workdir", wd), "inside edge-1", "edge-1")
    assert all(pid_alive(n["pid"]) for n in lab.nodes(data))


# -- item 9 ------------------------------------------------------------------------------------
def test_lun_size_and_reserve_checks(tmp_path: Path) -> None:
    wd = str(tmp_path / "lab")
    help_ = cli("lab", "up", "--help").stdout
    assert "4K" in help_ and "512" not in help_.split("--lun-size", 1)[1].split("--", 1)[0]
    refused(cli("lab", "up", "--workdir", wd, "--lun-size", "512"), "--lun-size", "4 KiB")
    refused(cli("lab", "up", "--workdir", wd, "--lun-size", "6K"), "--lun-size", "4 KiB")
    refused(cli("lab", "up", "--workdir", wd, "--lun-size", "0"), "--lun-size")
    line = refused(cli("lab", "up", "--workdir", wd, "--reserve", "0"), "--reserve")
    assert re.search(r"at least \d", line), line
    refused(cli("demo", "--workdir", wd, "--lun-size", "512"), "--lun-size", "4 KiB")
    assert not procs_in(tmp_path) and not (tmp_path / "lab" / "lab.json").exists()
    # the Edge's own config refuses such a reserve too
    from steelfusion.lab import Lab as _Lab  # noqa: F401 - the lab writes a valid config

    cfg = tmp_path / "edge.toml"
    write_toml(cfg, {"edge": {"name": "e", "portal": "127.0.0.1:1", "control": "127.0.0.1:2",
                              "blockstore": str(tmp_path / "bs"), "cores": ["127.0.0.1:3"],
                              "reserve": 0},
                     "target": [{"iqn": "iqn.2026-11.io.steelfusion:e",
                                 "lun": [{"lun": 0, "lun_id": 1, "size": 1 << 20}]}]})
    with pytest.raises(ConfigError, match="reserve"):
        EdgeConfig.load(cfg)


# -- everything else an operator can get wrong ----------------------------------------------
def test_bad_lab_inputs_get_one_line(tmp_path: Path) -> None:
    afile = tmp_path / "a-file"
    afile.write_text("x")
    none = tmp_path / "nolab"
    for cmd in (["status"], ["down"], ["kill", "core-a"], ["start", "core-a"],
                ["wait-committed"]):
        refused(cli("lab", *cmd, "--workdir", str(none)), "no lab", str(none))
    assert not none.exists()  # asking about a lab creates nothing
    refused(cli("lab", "up", "--workdir", str(afile)), str(afile), "not a directory")
    refused(cli("lab", "up", "--workdir", str(afile / "sub")), str(afile))
    refused(cli("lab", "status", "--workdir", str(afile)), str(afile))
    for args, want in [(["--luns", "0"], "--luns"), (["--luns", "-3"], "--luns"),
                       (["--edges", "0"], "--edges"), (["--luns", "300"], "--luns")]:
        refused(cli("lab", "up", "--workdir", str(tmp_path / "x"), *args), want)
    assert not (tmp_path / "x").exists()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "lab.json").write_text("{not json")
    for cmd in (["status"], ["down"], ["up"], ["kill", "core-a"]):
        refused(cli("lab", *cmd, "--workdir", str(corrupt)), "lab.json")
    (corrupt / "lab.json").write_text("[1, 2]")
    refused(cli("lab", "status", "--workdir", str(corrupt)), "lab.json")
    # a stale lab.json (a reboot later) whose pid now belongs to another process
    other = subprocess.Popen(["sleep", "60"])
    try:
        stale = tmp_path / "stale"
        stale.mkdir()
        (stale / "lab.json").write_text(json.dumps({
            "version": 1, "workdir": str(stale), "cores": [], "edges": [],
            "witness": {"name": "witness", "pid": other.pid, "address": "127.0.0.1:1",
                        "control": "127.0.0.1:2", "config": str(stale / "witness.toml"),
                        "role": "witness"}}))
        assert "stopped nothing" in cli("lab", "down", "--workdir", str(stale)).stdout
        cli("lab", "kill", "witness", "--workdir", str(stale))
        assert other.poll() is None  # not signalled
        assert "DOWN" in cli("lab", "status", "--workdir", str(stale)).stdout
    finally:
        other.kill()
        other.wait()


def test_pyproject_license_is_an_spdx_string() -> None:
    """setuptools deprecates the ``license = {text = ...}`` table (warning at every install)."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert isinstance(meta["license"], str), meta["license"]


def test_lab_json_stays_compatible(lab: Lab) -> None:
    """Other tests and tools read lab.json: the fields they use are still there."""
    data = lab.up(luns=1, lun_size=8 * MiB, edges=1)
    on_disk = json.loads(lab.file.read_text())
    assert on_disk["version"] == 1 and on_disk["workdir"] == str(lab.dir)
    assert {"name", "pid", "address", "control", "config", "role"} <= set(on_disk["witness"])
    for c in on_disk["cores"]:
        assert {"name", "pid", "control", "listen", "role", "config", "log", "luns",
                "journal"} <= set(c)
        assert Path(c["config"]).parent == lab.dir and Path(c["config"]).exists()
    for e in on_disk["edges"]:
        assert {"name", "pid", "portal", "control", "config", "log", "role", "targets"} <= set(e)
        assert Path(e["config"]).exists()
    assert data["cores"][0]["pid"] == on_disk["cores"][0]["pid"]
    assert not [p for p in lab.dir.iterdir() if p.name.startswith(".lab-up")]
    lab.kill("core-a")
    lab.start("core-a")  # restarts from the config lab.json names
