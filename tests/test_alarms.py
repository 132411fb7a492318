"""Issue 13: no silent failures. A second process with a node's name is refused (and
alarmed) by every role; a Core that cannot reach its Witness, and an Edge with no primary
or a filling write reserve, raise alarms that clear when the cause is gone.

Real processes over loopback: the lab, plus a copy of one node's config started beside it
(other ports, other files: the mistake of starting one config twice).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from steelfusion import control
from steelfusion.config import write_toml
from steelfusion.lab import Lab, free_ports
from steelfusion.units import format_addr, parse_addr
from steelfusion.wire import Hello
from tests.nodes import alarms, status, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.timeout(120)]
MiB = 1 << 20


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Lab, dict[str, Any]]]:
    lab = Lab(tmp_path / "lab")
    data = lab.up(luns=1, lun_size=8 * MiB, edges=1)
    yield lab, data
    lab.down()


def start_copy(lab: Lab, node: dict[str, Any], role: str, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start a second process from a copy of ``node``'s config: new ports and files, same name."""
    cfg = tomllib.loads(Path(node["config"]).read_text())
    p1, p2 = free_ports(2)
    tmp.mkdir()
    node_t = cfg[role]
    if role == "core":
        node_t["listen"], node_t["control"] = f"127.0.0.1:{p1}", f"127.0.0.1:{p2}"
        node_t["state_dir"] = str(tmp / "state")
        for lu in cfg["lun"]:
            lu["path"] = str(tmp / Path(lu["path"]).name)
        cfg["journal"]["path"] = str(tmp / "journal.img")
    else:
        node_t["portal"], node_t["control"] = f"127.0.0.1:{p1}", f"127.0.0.1:{p2}"
        node_t["blockstore"] = str(tmp / "blockstore")
    node_t.pop("log_file", None)
    for web in ("metrics", "console"):  # the original's ports: the copy would not start
        cfg.pop(web, None)
    path = tmp / "copy.toml"
    write_toml(path, cfg)
    os.chmod(path, 0o600)
    proc = subprocess.Popen([sys.executable, "-m", "steelfusion.cli", role, "run", "--config",
                             str(path), "--quiet"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return proc, f"127.0.0.1:{p2}"


def test_hello_impostor_rule() -> None:
    a = Hello("core-a", "primary", "replication", info={"instance": "1"})
    assert Hello("core-a", "primary", "replication", info={"instance": "2"}).impostor_of(a)
    assert not Hello("core-a", "primary", "replication", info={"instance": "1"}).impostor_of(a)
    assert not Hello("core-b", "primary", "replication", info={"instance": "2"}).impostor_of(a)
    assert not Hello("core-a", "primary", "replication").impostor_of(a)  # an old peer: no id
    assert not Hello("core-a", "primary", "replication", info={"instance": "2"}).impostor_of(None)


def test_a_copy_of_the_primary_is_refused_by_peer_and_witness(lab: tuple[Lab, dict[str, Any]],
                                                               tmp_path: Path) -> None:
    lab_, data = lab
    a, b = data["cores"]
    w = data["witness"]["control"]
    proc, copy_ctl = start_copy(lab_, a, "core", tmp_path / "copy")
    try:
        wait_for(lambda: "duplicate_node_core-a" in alarms(b["control"]), what="core-b's alarm")
        wait_for(lambda: "duplicate_node_core-a" in alarms(w), what="the Witness's alarm")
        wait_for(lambda: "duplicate_node" in alarms(copy_ctl), what="the copy's own alarm")
        # the real core-a keeps its links for good: no flip-flop
        seen = set()
        for _ in range(20):
            sa, sw = status(a["control"]), status(w)
            assert sa["replication"] == "running", sa["replication"]
            assert "duplicate_node" not in {x["alarm"] for x in sa["alarms"]}
            assert sw["nodes"]["core-a"]["connected"]
            seen.add(status(b["control"])["peer"]["name"])
            time.sleep(0.1)
        assert seen == {"core-a"}
        assert status(copy_ctl)["replication"] != "running"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_a_copy_of_an_edge_is_refused(lab: tuple[Lab, dict[str, Any]], tmp_path: Path) -> None:
    lab_, data = lab
    a = data["cores"][0]
    e = data["edges"][0]
    proc, copy_ctl = start_copy(lab_, e, "edge", tmp_path / "copy")
    try:
        wait_for(lambda: "duplicate_node_edge-1" in alarms(a["control"]), what="core-a's alarm")
        wait_for(lambda: "duplicate_node" in alarms(copy_ctl), what="the copy's own alarm")
        assert status(e["control"])["core"]["connected"]
        assert not status(copy_ctl)["core"]["connected"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_witness_down_is_an_alarm_until_it_returns(lab: tuple[Lab, dict[str, Any]]) -> None:
    lab_, data = lab
    cores = [c["control"] for c in data["cores"]]
    assert not any("witness_unreachable" in alarms(c) for c in cores)
    a = cores[0]
    assert control.call(parse_addr(a), "suspend")["state"] == "suspended"
    lab_.kill("witness")
    for c in cores:
        wait_for(lambda c=c: "witness_unreachable" in alarms(c), what=f"{c} witness alarm")
    wait_for(lambda: "witness_lease" in alarms(a), what="suspended without a lease")
    msg = next(x["message"] for x in status(a)["alarms"] if x["alarm"] == "witness_unreachable")
    assert format_addr(parse_addr(data["witness"]["address"])) in msg
    # resuming needs no Witness; the lease alarm concerned the suspension only
    control.call(parse_addr(a), "resume")
    wait_for(lambda: status(a)["replication"] == "running", what="running again")
    lab_.start("witness")
    for c in cores:
        wait_for(lambda c=c: not {"witness_unreachable", "witness_lease"} & alarms(c),
                 what=f"{c} alarms cleared")


def test_edge_alarms_when_no_core_and_reserve_fills(tmp_path: Path) -> None:
    """An Edge says when it has no primary and when its write reserve fills (issue 13: no
    silent failures), and clears both once the Cores are back and the data is committed."""
    from steelfusion.initiator import qemu_write
    from tests.conftest import tool

    tool("qemu-img")
    lab_ = Lab(tmp_path / "lab")
    data = lab_.up(luns=1, lun_size=8 * MiB, edges=1, reserve=4 * MiB)
    try:
        e = data["edges"][0]
        assert not alarms(e["control"])
        lab_.kill("core-a")
        lab_.kill("core-b")
        wait_for(lambda: "core_unreachable" in alarms(e["control"]), what="core_unreachable")
        src = tmp_path / "data.img"
        src.write_bytes(os.urandom(3840 * 1024))  # 94% of the reserve, acknowledged at once
        qemu_write(src, e["targets"][0]["url"], timeout=60)
        wait_for(lambda: "reserve_high" in alarms(e["control"]), what="reserve_high")
        lab_.start("core-a")
        lab_.start("core-b")
        lab_.wait_committed(60)
        wait_for(lambda: not alarms(e["control"]), what="Edge alarms cleared")
    finally:
        lab_.down()
