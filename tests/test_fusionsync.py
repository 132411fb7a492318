"""FusionSync drills with real processes: pause, suspend/resume, failover/failback.

Every check compares whole LUN files byte for byte against what the host
wrote through a real initiator (qemu-img, libiscsi).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from steelfusion import control
from steelfusion.initiator import qemu_read, qemu_write
from steelfusion.lab import Lab
from steelfusion.units import parse_addr
from tests.conftest import tool
from tests.nodes import lab_at, peer_linked, status, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.timeout(300)]
MiB = 1 << 20
LUN = 32 * MiB


def coredr(addr: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "steelfusion.coredr", "--core", addr, *args],
                       capture_output=True, text=True, timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(f"coredr {' '.join(args)} failed: {p.stdout}{p.stderr}")
    return p


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Lab, dict[str, Any]]]:
    tool("qemu-img")
    with lab_at(tmp_path / "lab") as lab:
        yield lab, lab.up(luns=1, lun_size=LUN, edges=1)


def image(tmp: Path, name: str) -> Path:
    p = tmp / name
    p.write_bytes(os.urandom(LUN))
    return p


def files(data: dict[str, Any]) -> dict[str, bytes]:
    return {c["name"]: Path(c["luns"]["1"]).read_bytes() for c in data["cores"]}


def write_while_paused(lab_: Lab, data: dict[str, Any], img: Path) -> str:
    """Kill core-b, wait until core-a pauses replication, then write ``img`` whole through the
    Edge (which keeps acknowledging the host); core-a's control address."""
    a, url = data["cores"][0]["control"], data["edges"][0]["targets"][0]["url"]
    lab_.kill("core-b")
    wait_for(lambda: status(a)["replication"] == "paused", what="paused")
    qemu_write(img, url)
    return a


def resume_once_linked(addr: str) -> None:
    """Once the Core at ``addr`` has its peer link back, resume replication and wait for the
    resync to end."""
    wait_for(lambda: peer_linked(addr), what="peer link")
    coredr(addr, "resume", "--no-wait")
    wait_for(lambda: status(addr)["replication"] == "running", timeout=60, what="resync done")


def test_secondary_down_pauses_and_resumes_by_itself(lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lab_, data = lab
    img = image(tmp_path, "one.raw")
    a = write_while_paused(lab_, data, img)
    time.sleep(0.5)
    st = lab_.status()
    assert st["edges"][0]["uncommitted_bytes"] > 0  # held uncommitted: not acknowledged
    lab_.start("core-b")
    lab_.wait_committed(timeout=60)
    assert status(a)["replication"] == "running"
    f = files(data)
    assert f["core-a"] == f["core-b"] == img.read_bytes()


def test_suspend_journal_resume_resync(lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lab_, data = lab
    img = image(tmp_path, "two.raw")
    a = write_while_paused(lab_, data, img)
    out = coredr(a, "suspend")
    assert "suspended" in out.stdout
    lab_.wait_committed(timeout=60)  # buffered writes now committed (journaled)
    j = json.loads(coredr(a, "journal", "status", "--json").stdout)
    assert j["luns"][0]["dirty_regions"] > 0
    # the Witness restarted keeps the approval
    lab_.kill("witness")
    lab_.start("witness")
    wait_for(lambda: status(a)["witness"]["connected"], what="witness reconnect")
    assert status(a)["witness"]["holds"] is not False
    lab_.start("core-b")
    resume_once_linked(a)
    f = files(data)
    assert f["core-a"] == f["core-b"] == img.read_bytes()
    v = json.loads(coredr(a, "verify", "--json").stdout)
    assert v["identical"] is True
    assert json.loads(coredr(a, "journal", "status", "--json").stdout)["luns"][0][
        "dirty_regions"] == 0
    assert status(data["cores"][1]["control"])["replication"] == "replica"


def test_failover_and_failback(lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lab_, data = lab
    a, b = data["cores"][0]["control"], data["cores"][1]["control"]
    url = data["edges"][0]["targets"][0]["url"]
    img1 = image(tmp_path, "before.raw")
    qemu_write(img1, url)
    lab_.wait_committed(timeout=60)
    refused = coredr(b, "failover", check=False)
    assert refused.returncode != 0 and "reachable" in (refused.stdout + refused.stderr)
    lab_.kill("core-a")
    # allowed once neither core-b nor the Witness reaches core-a (its lease runs out)
    wait_for(lambda: coredr(b, "failover", check=False).returncode == 0, timeout=40,
             what="failover granted")
    st = status(b)
    assert st["role"] == "primary" and st["replication"] == "suspended" and st["epoch"] == 2
    img2 = image(tmp_path, "after.raw")
    qemu_write(img2, url)  # the Edge moved to the new primary by itself
    lab_.wait_committed(timeout=60)
    assert Path(data["cores"][1]["luns"]["1"]).read_bytes() == img2.read_bytes()
    # the old primary comes back, learns the newer epoch and becomes secondary
    lab_.start("core-a")
    wait_for(lambda: status(a)["role"] == "secondary", timeout=30, what="demotion")
    assert status(a)["epoch"] == 2
    resume_once_linked(b)
    f = files(data)
    assert f["core-a"] == f["core-b"] == img2.read_bytes()
    back = tmp_path / "back.raw"
    qemu_read(url, back)  # the host sees exactly what it last wrote
    assert back.read_bytes() == img2.read_bytes()
    ev = [json.loads(line)["event"] for line in coredr(b, "events").stdout.splitlines()]
    assert "failed_over" in ev and "resync_done" in ev


def test_witness_inside_an_edge(tmp_path: Path) -> None:
    """Seed: the Witness is "a role assigned to one of the Edges" (`edge run --witness`)."""
    tool("qemu-img")
    lab_ = Lab(tmp_path / "lab")
    data = lab_.up(luns=1, lun_size=LUN, edges=1, witness_in_edge=True)
    try:
        assert data["witness"]["embedded_in"] == "edge-1"
        a = data["cores"][0]["control"]
        wait_for(lambda: status(a)["witness"]["connected"], what="witness connection")
        lab_.kill("core-b")
        wait_for(lambda: status(a)["replication"] == "paused", what="paused")
        assert "suspended" in coredr(a, "suspend").stdout
        edge = control.call(parse_addr(data["edges"][0]["control"]), "status")
        assert edge["witness"]["pairs"]
    finally:
        lab_.down()
