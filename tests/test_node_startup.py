"""Issue 13 item 3: a node that cannot start says so in one line and exits.

Every listening socket of every role (portal, control, replication listen,
Witness listen, embedded Witness) and every path a node opens (state dir,
blockstore, log file, LUN backends) is made unusable in turn (an unusable Journal LUN is an
alarm, not a start-up failure: the Core runs without replication until it is fixed); the
real ``steelfusion ... run --config`` process must print one line naming the
port or path and its config key, exit non-zero, and not hang (the Edge used to
start its uplink before the portal bind failed and then never exit).
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from steelfusion.config import (
    EdgeConfig,
    EdgeLunConfig,
    TargetConfig,
    WitnessConfig,
    write_toml,
)
from steelfusion.lab import core_pair_configs, free_ports

pytestmark = [pytest.mark.lab, pytest.mark.timeout(120)]  # real node processes
TIMEOUT = 30  # a node that hangs instead of exiting fails the test here


def run_node(role: str, config: Path | str, *extra: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([sys.executable, "-m", "steelfusion.cli", role, "run", "--config",
                               str(config), "--quiet", *extra], capture_output=True, text=True,
                              timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"`{role} run` hung for {TIMEOUT}s instead of exiting: {e.stderr!r}")


def one_line(p: subprocess.CompletedProcess[str]) -> str:
    """The process failed with exactly one line on stderr (no traceback) and nothing else."""
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode != 0, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("Error: "), lines[0]
    return lines[0]


@pytest.fixture
def held() -> Iterator[Callable[[tuple[str, int]], None]]:
    """Occupy a loopback port (listening, as another server would)."""
    socks: list[socket.socket] = []

    def hold(addr: tuple[str, int]) -> None:
        s = socket.socket()
        s.bind(addr)
        s.listen()
        socks.append(s)

    yield hold
    for s in socks:
        s.close()


def core_cfg(d: Path, **kw: Any) -> Any:
    a, _ = core_pair_configs(d, {1: 1 << 20})
    return dataclasses.replace(a, **kw)


def edge_cfg(d: Path, **kw: Any) -> EdgeConfig:
    p1, p2, core = free_ports(3)
    cfg = EdgeConfig(name="edge-1", portal=("127.0.0.1", p1), control=("127.0.0.1", p2),
                     blockstore=str(d / "edge-1" / "blockstore"), cores=(("127.0.0.1", core),),
                     targets=(TargetConfig(iqn="iqn.2026-11.io.steelfusion:t",
                                           luns=(EdgeLunConfig(0, 1, 1 << 20),)),),
                     log_file=str(d / "edge-1.log"), dead_after=1.0, ping_interval=0.2)
    return dataclasses.replace(cfg, **kw)


def witness_cfg(d: Path, **kw: Any) -> WitnessConfig:
    p1, p2 = free_ports(2)
    cfg = WitnessConfig(name="witness", listen=("127.0.0.1", p1), control=("127.0.0.1", p2),
                        state_dir=str(d / "witness"), log_file=str(d / "witness.log"))
    return dataclasses.replace(cfg, **kw)


def write(d: Path, cfg: Any, name: str = "node.toml") -> Path:
    path = d / name
    write_toml(path, cfg.to_dict())
    return path


# -- ports ---------------------------------------------------------------------------------
CONFIGS: dict[str, Callable[[Path], Any]] = {"core": core_cfg, "edge": edge_cfg,
                                             "witness": witness_cfg}


@pytest.mark.parametrize("role,field,key", [
    ("core", "control", "[core] control"),
    ("core", "listen", "[core] listen"),
    ("edge", "portal", "[edge] portal"),
    ("edge", "control", "[edge] control"),
    ("witness", "listen", "[witness] listen"),
    ("witness", "control", "[witness] control"),
])
def test_port_in_use(tmp_path: Path, held: Any, role: str, field: str, key: str) -> None:
    cfg = CONFIGS[role](tmp_path)
    addr = getattr(cfg, field)
    held(addr)
    path = write(tmp_path, cfg)
    for _ in range(3 if role == "edge" else 1):  # the Edge hung about every other time
        line = one_line(run_node(role, path))
        assert f"127.0.0.1:{addr[1]}" in line and key in line and "in use" in line, line
    assert f"{role}_start_failed" in Path(cfg.log_file).read_text()  # and in its log


def test_edge_embedded_witness_port_in_use(tmp_path: Path, held: Any) -> None:
    (port,) = free_ports(1)
    held(("127.0.0.1", port))
    cfg = edge_cfg(tmp_path, witness=("127.0.0.1", port))
    line = one_line(run_node("edge", write(tmp_path, cfg)))
    assert f"127.0.0.1:{port}" in line and "[witness] listen" in line, line
    # and given on the command line instead of the config
    cfg = edge_cfg(tmp_path)
    line = one_line(run_node("edge", write(tmp_path, cfg), "--witness", f"127.0.0.1:{port}"))
    assert f"127.0.0.1:{port}" in line and "--witness" in line, line


# -- paths ------------------------------------------------------------------------------------
def _a_file(d: Path) -> Path:
    f = d / "a-file"
    f.write_text("not a directory\n")
    return f


def test_core_unusable_paths(tmp_path: Path) -> None:
    f = _a_file(tmp_path)
    d = tmp_path / "a-dir"
    d.mkdir()
    base = core_cfg(tmp_path)
    lun = base.luns[0]
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"state_dir": str(f)}, str(f), "[core] state_dir"),
        ({"state_dir": str(f / "sub")}, str(f / "sub"), "[core] state_dir"),
        ({"log_file": str(f / "core.log")}, str(f / "core.log"), "[core] log_file"),
        ({"log_file": str(d)}, str(d), "[core] log_file"),
        ({"luns": (dataclasses.replace(lun, path=str(d)),)}, str(d), "[[lun]] id 1"),
        ({"luns": (dataclasses.replace(lun, path=str(f / "lun.img")),)}, str(f / "lun.img"),
         "[[lun]] id 1"),
    ]
    for i, (change, path, key) in enumerate(cases):
        fresh = core_cfg(tmp_path / f"case-{i}")  # a state dir of its own
        cfg = dataclasses.replace(base, **{"state_dir": fresh.state_dir,
                                           "journal_path": fresh.journal_path, **change})
        line = one_line(run_node("core", write(tmp_path, cfg)))
        assert path in line and key in line, (change, line)


def test_edge_unusable_paths(tmp_path: Path) -> None:
    f = _a_file(tmp_path)
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"blockstore": str(f)}, str(f), "[edge] blockstore"),
        ({"blockstore": str(f / "bs")}, str(f / "bs"), "[edge] blockstore"),
        ({"log_file": str(f / "edge.log")}, str(f / "edge.log"), "[edge] log_file"),
        ({"witness": ("127.0.0.1", free_ports(1)[0]), "witness_state_dir": str(f)}, str(f),
         "[witness] state_dir"),
    ]
    for change, path, key in cases:
        cfg = edge_cfg(tmp_path, **change)
        line = one_line(run_node("edge", write(tmp_path, cfg)))
        assert path in line and key in line, (change, line)


def test_witness_unusable_paths(tmp_path: Path) -> None:
    f = _a_file(tmp_path)
    for change, path, key in [({"state_dir": str(f)}, str(f), "[witness] state_dir"),
                              ({"state_dir": str(f / "w")}, str(f / "w"), "[witness] state_dir"),
                              ({"log_file": str(f / "w.log")}, str(f / "w.log"),
                               "[witness] log_file")]:
        cfg = witness_cfg(tmp_path, **change)
        line = one_line(run_node("witness", write(tmp_path, cfg)))
        assert path in line and key in line, (change, line)


# -- the config file itself --------------------------------------------------------------------
@pytest.mark.parametrize("role", ["core", "edge", "witness"])
def test_bad_config_files(tmp_path: Path, role: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[core\nname = \n")
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    cases = [(tmp_path / "missing.toml", "no such config file"),
             (tmp_path, "is a directory"),
             (bad, "not valid TOML"),
             (binary, "not valid TOML"),
             (empty, "missing table")]
    for path, want in cases:
        p = subprocess.run([sys.executable, "-m", "steelfusion.cli", role, "run", "--config",
                            str(path)], capture_output=True, text=True, timeout=TIMEOUT)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
        assert want in lines[-1] and str(path) in lines[-1], (path, p.stderr)
