"""Issue 10: partitions on real namespaces and links, with a real initiator.

(b) the primary isolated from its peer and the Witness while its Edges still reach it: it stops
    acknowledging, failover on the secondary succeeds, on heal the old primary learns the new
    epoch and rejoins as secondary, and it acknowledged nothing after the new epoch began;
(c) the branch cut from both data centers for longer than the Edge's reserve takes to fill:
    host writes stall, never fail, and all land after the heal.

Every check ends byte for byte: the Edge's read-back and both Cores' LUN files against what the
host wrote. (a), the cut between the data centers, is in tests/test_netlab.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from steelfusion import netns
from steelfusion.initiator import need, qemu_read
from steelfusion.lab import Lab, call_node
from tests.conftest import tool
from tests.nodes import wait_for, why_no_netns

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]
MiB = 1 << 20
BLOCK = 64 * 1024
WHY_NOT = why_no_netns()
needs_netns = pytest.mark.skipif(WHY_NOT is not None, reason=f"no netns lab here: {WHY_NOT}")


def pattern(i: int) -> int:
    return 1 + i % 250


def expected(nblocks: int, size: int) -> bytes:
    return b"".join(bytes([pattern(i)]) * BLOCK for i in range(nblocks)).ljust(size, b"\0")


class Writer(threading.Thread):
    """One qemu-io in the branch namespace writing block i with pattern(i), ``gap_ms`` apart."""

    def __init__(self, url: str, ns: str, nblocks: int, gap_ms: int) -> None:
        super().__init__(daemon=True)
        cmds: list[str] = []
        for i in range(nblocks):
            cmds += ["-c", f"write -P {pattern(i)} {i * BLOCK} {BLOCK}"]
            if gap_ms:
                cmds += ["-c", f"sleep {gap_ms}"]
        self.cmd = [need("qemu-io"), "-f", "raw", "-t", "none", *cmds, url]
        self.ns = ns
        self.result: subprocess.CompletedProcess[str] | None = None

    def run(self) -> None:
        self.result = subprocess.run(self.cmd, capture_output=True, text=True, timeout=200,
                                     preexec_fn=netns.preexec(self.ns))

    def check(self, nblocks: int) -> None:
        self.join(200)
        r = self.result
        assert r is not None and r.returncode == 0, r
        assert "failed" not in r.stdout.lower() + r.stderr.lower(), r.stdout[-2000:]
        assert r.stdout.count("wrote ") == nblocks


@pytest.fixture
def netlab(tmp_path: Path) -> Iterator[tuple[Lab, dict[str, Any]]]:
    if WHY_NOT is not None:
        pytest.skip(f"no netns lab here: {WHY_NOT}")
    tool("qemu-io")
    lab = Lab(tmp_path / "lab")
    yield lab, {}
    lab.down()


def _status(lab: Lab, name: str) -> dict[str, Any]:
    data = lab.load()
    return call_node(lab.node(data, name), "status", timeout=3)


def _coredr(node: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "steelfusion.coredr", "--netns", node["netns"],
                           "--core", node["control"], *args],
                          capture_output=True, text=True, timeout=120)


def _final_check(lab: Lab, data: dict[str, Any], nblocks: int, size: int, tmp: Path) -> None:
    lab.wait_committed(120)
    want = expected(nblocks, size)
    t = data["edges"][0]["targets"][0]
    back = tmp / "back.img"
    qemu_read(t["url"], back, netns=data["edges"][0]["netns"])
    assert back.read_bytes() == want, "the Edge's read-back differs from what the host wrote"
    for c in data["cores"]:
        path = Path(c["luns"][str(t["lun_id"])])
        wait_for(lambda p=path: p.read_bytes() == want, timeout=60,
                 what=f"{c['name']}'s LUN file to hold what the host wrote")


@needs_netns
def test_isolated_primary_stops_acking_and_rejoins_as_secondary(
        netlab: tuple[Lab, dict[str, Any]], tmp_path: Path) -> None:
    lab, _ = netlab
    size = 16 * MiB
    data = lab.up(luns=1, lun_size=size, edges=1, netns=True)
    b = data["cores"][1]
    edge = data["edges"][0]
    nblocks = 200
    w = Writer(edge["targets"][0]["url"], edge["netns"], nblocks, gap_ms=60)
    w.start()
    time.sleep(2)
    # isolate dc-a from its peer and the Witness; the branch still reaches it
    cut_at = time.time()
    lab.link("dc-a", "dc-b", cut=True)
    lab.link("dc-a", "witness", cut=True)
    samples: list[tuple[float, int]] = []  # (time, core-a's highest acknowledged seq)

    def sample() -> None:
        st = _status(lab, "core-a")
        samples.append((time.time(), max(lu["acked_seq"] for lu in st["luns"].values())))

    # the secondary may fail over once the Witness's lease on core-a has run out
    fo = None
    deadline = time.monotonic() + 60
    while fo is None or fo.returncode != 0:
        assert time.monotonic() < deadline, f"failover never succeeded: {fo}"
        sample()
        fo = _coredr(b, "failover", "--wait", "30")
    fo_st = _status(lab, "core-b")
    assert fo_st["role"] == "primary" and fo_st["epoch"] == 2, fo_st
    for _ in range(20):
        sample()
        time.sleep(0.1)
    # the Edge finds the new primary while the partition lasts (its old primary, still
    # reachable, acknowledges nothing): recovery does not wait for the heal
    wait_for(lambda: _status(lab, edge["name"])["core"]["core"] == "core-b", timeout=30,
             what="the Edge to move to core-b before the heal")
    assert not w.result, "the host's writes finished before the test could check"
    events = [json.loads(ln) for ln in _coredr(b, "events").stdout.splitlines()]
    fo_time = next(float(e["time"]) for e in events if e["event"] == "failed_over")
    before = [s for t, s in samples if t <= fo_time]
    after = [s for t, s in samples if t > fo_time]
    assert before and after
    assert max(after) <= max(before), "the isolated primary acknowledged writes after epoch 2"
    # it stopped acknowledging within its lease (3 s) of the cut, with sampling slack
    growth = [t for (t, s), (_, s0) in zip(samples[1:], samples, strict=False) if s > s0]
    assert max(growth, default=cut_at) - cut_at < 3.0 + 2.0, growth
    # heal: the old primary learns epoch 2 and rejoins as secondary; resume the new primary
    lab.link("dc-a", "dc-b", heal=True)
    lab.link("dc-a", "witness", heal=True)
    def rejoined() -> bool:
        st = _status(lab, "core-a")
        return bool(st["role"] == "secondary" and st["epoch"] == 2)

    wait_for(rejoined, timeout=60, what="core-a to rejoin as secondary at epoch 2")
    w.check(nblocks)
    wait_for(lambda: _coredr(b, "resume", "--no-wait").returncode == 0, timeout=60,
             what="resume on the new primary")
    wait_for(lambda: _status(lab, "core-b")["replication"] == "running", timeout=120,
             what="replication running after the resync")
    _final_check(lab, lab.load(), nblocks, size, tmp_path)


@needs_netns
def test_branch_cut_longer_than_the_reserve_stalls_writes_that_land_after_heal(
        netlab: tuple[Lab, dict[str, Any]], tmp_path: Path) -> None:
    lab, _ = netlab
    size = 16 * MiB
    data = lab.up(luns=1, lun_size=size, edges=1, reserve=4 * MiB, netns=True)
    edge = data["edges"][0]
    lab.link("branch", "dc-a", cut=True)
    lab.link("branch", "dc-b", cut=True)
    nblocks = 128  # 8 MiB: twice the reserve
    w = Writer(edge["targets"][0]["url"], edge["netns"], nblocks, gap_ms=0)
    w.start()

    def edge_status() -> dict[str, Any]:
        return _status(lab, edge["name"])

    wait_for(lambda: edge_status()["blockstore"]["reserve_used_pct"] >= 90, timeout=60,
             what="the reserve to fill")
    time.sleep(10)  # stalled well past the fill: nothing fails meanwhile
    assert w.is_alive(), f"the host's writes ended while the branch was cut: {w.result}"
    st = edge_status()
    assert {"core_unreachable", "reserve_high"} <= {x["alarm"] for x in st["alarms"]}
    lab.link("branch", "dc-a", heal=True)
    lab.link("branch", "dc-b", heal=True)
    w.check(nblocks)
    _final_check(lab, data, nblocks, size, tmp_path)
