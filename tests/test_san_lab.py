"""Cores on SAN LUNs (``lab up --san tgt``): each data center's tgtd holds its Core's LUN
and Journal LUN, reached over the Core's own iSCSI initiator (issue 12).

Every check compares the arrays' LUN files byte for byte with what the host wrote.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from steelfusion import labsan
from steelfusion.initiator import qemu_read, qemu_write
from steelfusion.iscsi.client import IscsiClient
from steelfusion.lab import Lab
from tests.conftest import tool
from tests.nodes import alarms, status, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.timeout(300)]
MiB = 1 << 20
LUN = 64 * MiB


def coredr(addr: str, *args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "steelfusion.coredr", "--core", addr, *args],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"coredr {' '.join(args)}: {p.stdout}{p.stderr}"
    return p.stdout


@pytest.fixture
def lab(tmp_path: Path):  # type: ignore[no-untyped-def]
    tool("qemu-img")
    tool("tgtd")
    lab = Lab(tmp_path / "lab")
    data = lab.up(luns=1, lun_size=LUN, edges=1, san="tgt")
    yield lab, data
    lab.down()


def array_files(data: dict[str, Any]) -> dict[str, bytes]:
    """LUN 1 as each array's backing file holds it."""
    return {labsan.SAN_OF[c["name"]]: Path(labsan.lun_files(data, c)[1]).read_bytes()
            for c in data["cores"]}


def resync_until_arrays_hold(primary: str, data: dict[str, Any], want: bytes) -> None:
    """Once the primary's peer link is up: resume, wait for the resync, and both arrays'
    LUN files hold ``want``."""
    wait_for(lambda: any(c["established"] and c["direction"] == "out"
                         for c in status(primary)["connections"]["replication"]),
             what="peer link")
    coredr(primary, "resume", "--no-wait")
    wait_for(lambda: status(primary)["replication"] == "running", timeout=120,
             what="resync done")
    f = array_files(data)
    assert f["san-a"] == f["san-b"] == want


def image(tmp: Path, name: str, size: int = LUN) -> Path:
    p = tmp / name
    p.write_bytes(os.urandom(size))
    return p


def test_lab_puts_each_cores_luns_on_its_array(lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lab_, data = lab
    assert [s["name"] for s in data["sans"]] == ["san-a", "san-b"]
    for c in data["cores"]:
        assert c["luns"]["1"].startswith("iscsi://")
    st = lab_.status()
    assert [(s["name"], s["running"], s["accepting"]) for s in st["sans"]] == [
        ("san-a", True, True), ("san-b", True, True)]
    # what the array holds (put there behind everyone's back) is what the host reads: the
    # Edge's cold reads go to the Core, whose reads go to the array off its event loop
    url = data["edges"][0]["targets"][0]["url"]
    old = os.urandom(LUN)
    Path(data["sans"][0]["luns"]["1"]).write_bytes(old)
    back = tmp_path / "cold.raw"
    qemu_read(url, back)
    assert back.read_bytes() == old
    img = image(tmp_path, "one.raw")
    qemu_write(img, url)
    lab_.wait_committed(timeout=120)
    wait_for(lambda: status(data["cores"][0]["control"])["replication"] == "running",
             what="replication running")
    f = array_files(data)
    assert f["san-a"] == f["san-b"] == img.read_bytes()
    v = json.loads(coredr(data["cores"][0]["control"], "verify", "--json"))
    assert v["identical"] is True  # region hashes read back from both arrays


async def _write_through(url: str, img: bytearray, chunk: int, stop: asyncio.Event) -> int:
    """Write ``img`` in ``chunk``-byte pieces, round after round, until ``stop``."""
    rounds = 0
    async with IscsiClient(url) as c:
        while not stop.is_set() or rounds == 0:
            for off in range(0, len(img), chunk):
                img[off:off + chunk] = os.urandom(chunk)
                await c.write(off, img[off:off + chunk])
            rounds += 1
    return rounds


def test_array_outage_under_load_holds_acks_and_loses_nothing(lab) -> None:  # type: ignore[no-untyped-def]
    lab_, data = lab
    a = data["cores"][0]["control"]
    url = data["edges"][0]["targets"][0]["url"]
    img = bytearray(16 * MiB)

    async def drive() -> int:
        stop = asyncio.Event()
        writer = asyncio.create_task(_write_through(url, img, 256 << 10, stop))
        await asyncio.sleep(1.0)
        lab_.kill("san-a")
        await asyncio.to_thread(wait_for, lambda: "lun_1_storage" in alarms(a), 30,
                                "the storage alarm")
        await asyncio.sleep(2.0)  # the host keeps writing; the Edge holds them uncommitted
        held = lab_.status()["edges"][0]["uncommitted_bytes"]
        assert held > 0, "the primary acknowledged writes its array never took"
        lab_.start("san-a")
        stop.set()
        return await writer

    rounds = asyncio.run(drive())
    assert rounds >= 1
    wait_for(lambda: "lun_1_storage" not in alarms(a), timeout=60, what="alarm cleared")
    lab_.wait_committed(timeout=120)
    wait_for(lambda: status(a)["replication"] == "running", timeout=60, what="running")
    f = array_files(data)
    want = bytes(img) + f["san-a"][len(img):]
    assert f["san-a"] == want
    assert f["san-b"] == want
    ev = [json.loads(line)["event"] for line in coredr(a, "events").splitlines()]
    assert "storage_unreachable" in ev and "storage_back" in ev


def test_fusionsync_cycle_on_arrays(lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Pause, suspend (the journal on the array), resync, failover, rejoin: data identical."""
    lab_, data = lab
    a, b = data["cores"][0]["control"], data["cores"][1]["control"]
    url = data["edges"][0]["targets"][0]["url"]
    lab_.kill("core-b")
    wait_for(lambda: status(a)["replication"] == "paused", what="paused")
    img1 = image(tmp_path, "one.raw")
    qemu_write(img1, url)
    assert "suspended" in coredr(a, "suspend")
    lab_.wait_committed(timeout=120)
    j = json.loads(coredr(a, "journal", "status", "--json"))
    assert j["luns"][0]["dirty_regions"] > 0  # logged on san-a's Journal LUN
    lab_.start("core-b")
    resync_until_arrays_hold(a, data, img1.read_bytes())

    lab_.kill("core-a")
    wait_for(lambda: subprocess.run(
        [sys.executable, "-m", "steelfusion.coredr", "--core", b, "failover"],
        capture_output=True, timeout=60).returncode == 0, timeout=60, what="failover granted")
    img2 = image(tmp_path, "two.raw")
    qemu_write(img2, url)  # the Edge follows the new primary
    lab_.wait_committed(timeout=120)
    lab_.start("core-a")
    wait_for(lambda: status(a)["role"] == "secondary", timeout=60, what="demotion")
    resync_until_arrays_hold(b, data, img2.read_bytes())
    back = tmp_path / "back.raw"
    qemu_read(url, back)
    assert back.read_bytes() == img2.read_bytes()


def test_lun_deleted_on_the_array_is_an_alarm_and_no_ack(lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lab_, data = lab
    a = data["cores"][0]["control"]
    ctl = json.loads(Path(data["sans"][0]["config"]).read_text())["control_port"]
    subprocess.run(["tgtadm", "-C", str(ctl), "--lld", "iscsi", "--mode", "logicalunit",
                    "--op", "delete", "--tid", "1", "--lun", "1"], check=True, timeout=30)
    qemu_write(image(tmp_path, "lost.raw", 4 * MiB), data["edges"][0]["targets"][0]["url"])
    wait_for(lambda: "lun_1_io" in alarms(a), timeout=60, what="the LUN's alarm")
    msg = next(x["message"] for x in status(a)["alarms"] if x["alarm"] == "lun_1_io")
    assert "the LUN is gone from the array" in msg, msg
    assert lab_.status()["edges"][0]["uncommitted_bytes"] == 4 * MiB  # none acknowledged
