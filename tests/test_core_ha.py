"""Core HA with FusionSync on real processes (issue 16; seed 002, "FusionSync and Core HA").

``lab up --ha``: X (core-a1, leader) and Y (core-a2, follower) in dc-a on array san-a, X'
(core-b1) and Y' (core-b2) in dc-b on san-b; edge-1 writes LUN 1 through X, edge-2 LUN 2
through Y. Each test drives the seed's pictures with kills and checks both arrays' LUN files
byte for byte against what the hosts wrote and had acknowledged.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from steelfusion.fence import reservation_key
from steelfusion.initiator import qemu_write
from steelfusion.lab import Lab
from steelfusion.sandev import IscsiDevice
from tests.conftest import tool
from tests.nodes import status, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.timeout(420)]
MiB = 1 << 20
LUN = 16 * MiB
X, Y, X2, Y2 = "core-a1", "core-a2", "core-b1", "core-b2"


def coredr(addr: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "steelfusion.coredr", "--core", addr, *args],
                       capture_output=True, text=True, timeout=120)
    if ok:
        assert p.returncode == 0, f"coredr {' '.join(args)}: {p.stdout}{p.stderr}"
    return p


@pytest.fixture
def ha_lab(tmp_path: Path):  # type: ignore[no-untyped-def]
    tool("qemu-img")
    tool("tgtd")
    lab = Lab(tmp_path / "lab")
    data = lab.up(luns=1, lun_size=LUN, edges=2, ha=True)
    try:
        yield lab, data
    finally:
        lab.down()


def ctl(data: dict[str, Any], name: str) -> str:
    return str(next(c["control"] for c in data["cores"] if c["name"] == name))


def takeover_ctl(data: dict[str, Any], name: str) -> str:
    return str(next(c["takeover_control"] for c in data["cores"] if c["name"] == name))


def url(data: dict[str, Any], edge: int) -> str:
    return str(data["edges"][edge]["targets"][0]["url"])


def on_array(data: dict[str, Any], san: str, lun: int) -> bytes:
    node = next(s for s in data["sans"] if s["name"] == san)
    return Path(node["luns"][str(lun)]).read_bytes()


def write(tmp: Path, data: dict[str, Any], edge: int, name: str) -> bytes:
    img = tmp / name
    img.write_bytes(os.urandom(LUN))
    qemu_write(img, url(data, edge))
    return img.read_bytes()


def events(addr: str) -> list[str]:
    out = coredr(addr, "events").stdout
    return [json.loads(line)["event"] for line in out.splitlines() if line.strip()]


def ha(addr: str) -> dict[str, Any]:
    return status(addr)["ha"]  # type: ignore[no-any-return]


def running_to_peer(addr: str, hosted: bool = False) -> bool:
    st = status(addr)
    if hosted:
        h = st["ha"]["hosted"]
        return bool(h) and h["replication"] == "running"
    return st["replication"] == "running"


def both_arrays_hold(data: dict[str, Any], lun: int, want: bytes) -> None:
    a, b = on_array(data, "san-a", lun), on_array(data, "san-b", lun)
    assert a == want, f"san-a LUN {lun} differs from what the host wrote"
    assert b == want, f"san-b LUN {lun} (the replica) differs from what the host wrote"


def connections(data: dict[str, Any]) -> tuple[int, int]:
    """Established and expected outbound replication connections over the four Cores."""
    est = exp = 0
    for c in data["cores"]:
        for n in status(c["control"])["connections"]["replication_interfaces"].values():
            est, exp = est + n["established"], exp + n["expected"]
    return est, exp


def test_normal_state_eight_connections_and_commands_on_the_leader_only(
        ha_lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lab, data = ha_lab
    assert [c["name"] for c in data["cores"]] == [X, Y, X2, Y2]
    wait_for(lambda: connections(data) == (8, 8), 60, "8 replication connections")
    assert ha(ctl(data, X))["leader"] == X and ha(ctl(data, Y))["leader"] == X
    one, two = write(tmp_path, data, 0, "one"), write(tmp_path, data, 1, "two")
    lab.wait_committed(timeout=120)
    both_arrays_hold(data, 1, one)
    both_arrays_hold(data, 2, two)
    for c in (X, Y):
        assert ha(ctl(data, c))["hosting_partner"] is False

    r = coredr(ctl(data, Y), "suspend", "--json", ok=False)
    out = json.loads(r.stdout)
    assert r.returncode == 1 and out["refused"] == "not-leader", r.stdout
    assert X in out["reason"] and ctl(data, X) in out["reason"]
    said = coredr(ctl(data, X), "suspend").stdout
    assert "suspended" in said and Y in said  # one command, both Cores of the pair
    wait_for(lambda: status(ctl(data, Y))["replication"] == "suspended", 30, "Y suspended")
    three = write(tmp_path, data, 1, "three")
    lab.wait_committed(timeout=120)
    assert on_array(data, "san-a", 2) == three  # journaled, not mirrored
    coredr(ctl(data, X), "resume", "--no-wait")
    wait_for(lambda: running_to_peer(ctl(data, X)) and running_to_peer(ctl(data, Y)), 120,
             "both pairs running again")
    both_arrays_hold(data, 2, three)


def test_y_fails_x_serves_and_replicates_its_luns_then_gives_them_back(
        ha_lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lab, data = ha_lab
    x = ctl(data, X)
    wait_for(lambda: connections(data) == (8, 8), 60, "8 replication connections")
    lab.kill(Y)
    wait_for(lambda: (ha(x)["hosted"] or {}).get("luns") == [2], 60, "X serving Y's LUN")
    wait_for(lambda: running_to_peer(x, hosted=True), 60, "Y's LUN replicating to Y'")
    one, two = write(tmp_path, data, 0, "one"), write(tmp_path, data, 1, "two")
    lab.wait_committed(timeout=120)
    both_arrays_hold(data, 1, one)
    both_arrays_hold(data, 2, two)
    assert status(takeover_ctl(data, X))["name"] == Y  # Y's own control, served by X

    lab.start(Y)  # comes back fenced, stands by, and gets its LUN back by itself
    y = ctl(data, Y)
    wait_for(lambda: ha(y)["mode"] == "active" and not ha(x)["hosting_partner"], 90,
             "the LUN handed back to Y")
    wait_for(lambda: running_to_peer(y), 60, "Y replicating to Y' again")
    three = write(tmp_path, data, 1, "three")
    lab.wait_committed(timeout=120)
    both_arrays_hold(data, 2, three)
    assert ha(x)["takeovers"] == 1 and ha(x)["handbacks"] == 1


def test_secondary_failures_x2_accepts_y_then_x_to_x2_for_everything(
        ha_lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lab, data = ha_lab
    x, y, x2 = ctl(data, X), ctl(data, Y), ctl(data, X2)
    wait_for(lambda: connections(data) == (8, 8), 60, "8 replication connections")
    lab.kill(Y2)  # picture 3: X' accepts Y's replication
    wait_for(lambda: (ha(x2)["hosted"] or {}).get("luns") == [2], 60, "X' serving Y'")
    wait_for(lambda: running_to_peer(y), 90, "Y replicating to X'")
    two = write(tmp_path, data, 1, "two")
    lab.wait_committed(timeout=120)
    both_arrays_hold(data, 2, two)

    lab.kill(Y)  # picture 4: Y and Y' down, X replicates everything to X'
    wait_for(lambda: (ha(x)["hosted"] or {}).get("luns") == [2], 60, "X serving Y's LUN")
    wait_for(lambda: running_to_peer(x, hosted=True) and running_to_peer(x), 90,
             "X replicating both LUNs to X'")
    one, three = write(tmp_path, data, 0, "one"), write(tmp_path, data, 1, "three")
    lab.wait_committed(timeout=120)
    both_arrays_hold(data, 1, one)
    both_arrays_hold(data, 2, three)


def test_a_partitioned_partner_is_fenced_and_the_follower_leads_when_the_leader_dies(
        ha_lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lab, data = ha_lab
    x, y = ctl(data, X), ctl(data, Y)
    wait_for(lambda: connections(data) == (8, 8), 60, "8 replication connections")
    ypid = next(c["pid"] for c in data["cores"] if c["name"] == Y)
    os.kill(ypid, signal.SIGSTOP)  # alive, holding its sessions, but cut off from everyone
    try:
        wait_for(lambda: (ha(x)["hosted"] or {}).get("luns") == [2], 60, "X took Y's LUN")
        two = write(tmp_path, data, 1, "two")
        lab.wait_committed(timeout=120)
    finally:
        os.kill(ypid, signal.SIGCONT)
    # Y wakes up still believing it serves LUN 2: the array refuses it, so it stands by
    # (and gets LUN 2 back a few seconds later, once it is healthy)
    wait_for(lambda: "ha_standby" in events(y), 60, "Y standing by")
    lun2 = next(s for s in data["sans"] if s["name"] == "san-a")
    dev = IscsiDevice.open(f"iscsi://{lun2['portal']}/{lun2['iqn']}/2")
    try:
        keys = dev.pr_read_keys()[1]
    finally:
        dev.close()
    assert reservation_key(Y) not in keys and reservation_key(X) in keys
    both_arrays_hold(data, 2, two)

    # Y is healthy again: its LUN goes back to it by itself
    wait_for(lambda: ha(y)["mode"] == "active" and not ha(x)["hosting_partner"], 60,
             "LUN 2 handed back to Y")
    # the leader dies: the follower takes its LUNs over and leads
    lab.kill(X)
    wait_for(lambda: ha(y)["leader"] == Y and (ha(y)["hosted"] or {}).get("luns") == [1], 90,
             "Y leading and serving X's LUN")
    assert "suspended" in coredr(y, "suspend").stdout


def test_terminate_on_the_ha_primary_ends_replication_on_all_four(ha_lab) -> None:  # type: ignore[no-untyped-def]
    _, data = ha_lab
    wait_for(lambda: connections(data) == (8, 8), 60, "8 replication connections")
    coredr(ctl(data, X), "terminate", "--yes")
    for c in data["cores"]:
        wait_for(lambda c=c: status(c["control"])["replication"] == "terminated", 30,
                 f"{c['name']} terminated")


def test_a_partner_cut_from_its_array_is_taken_over_and_gets_its_luns_back(
        ha_lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lab, data = ha_lab
    x, y = ctl(data, X), ctl(data, Y)
    wait_for(lambda: connections(data) == (8, 8), 60, "8 replication connections")
    assert lab.san_path(Y, "cut")["state"] == "cut"
    two = write(tmp_path, data, 1, "two")  # the Edge acknowledges; Y can commit nothing
    wait_for(lambda: (ha(x)["hosted"] or {}).get("luns") == [2], 60, "X took Y's LUN")
    assert "storage" in ha(x)["why"]
    lab.wait_committed(timeout=120)
    both_arrays_hold(data, 2, two)
    assert lab.san_path(Y, "ok")["state"] == "ok"
    # what Y had queued to the array before the cut arrives now, after the fence: refused
    log = Path(next(c["log"] for c in data["cores"] if c["name"] == Y))
    wait_for(lambda: '"san_lun_fenced"' in log.read_text(), 60,
             "the array refusing Y's writes (RESERVATION CONFLICT)")
    wait_for(lambda: ha(y)["mode"] == "active" and not ha(x)["hosting_partner"], 90,
             "LUN 2 handed back to Y")
    three = write(tmp_path, data, 1, "three")
    lab.wait_committed(timeout=120)
    both_arrays_hold(data, 2, three)
    assert status(y)["luns"]["2"]["edge"] == "edge-2"


def test_losing_dc_a_failover_on_the_secondary_leader_moves_both_pairs(
        ha_lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lab, data = ha_lab
    x2, y2 = ctl(data, X2), ctl(data, Y2)
    wait_for(lambda: connections(data) == (8, 8), 60, "8 replication connections")
    lab.kill(X)
    lab.kill(Y)
    r = coredr(y2, "failover", "--json", ok=False)
    assert json.loads(r.stdout)["refused"] == "not-leader", r.stdout  # the follower refuses
    said = coredr(x2, "failover", "--wait", "60").stdout
    assert Y2 in said, said  # one command: both Cores of dc-b
    for c in (x2, y2):
        wait_for(lambda c=c: status(c)["role"] == "primary", 30, f"{c} primary")
    one, two = write(tmp_path, data, 0, "one"), write(tmp_path, data, 1, "two")
    lab.wait_committed(timeout=120)
    assert on_array(data, "san-b", 1) == one and on_array(data, "san-b", 2) == two
