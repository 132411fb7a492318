"""``lab up --ha``: two Core HA pairs on loopback (issue 16; seed 002, "FusionSync and Core
HA"). X=core-a1 and Y=core-a2 share san-a, X'=core-b1 and Y'=core-b2 share san-b; X->X' and
Y->Y' replicate; edge-1 is served by X, edge-2 by Y.

The lab test writes through each Edge with the repo's own initiator and checks each array's
LUN files byte for byte, and the seed's connection count (4 Cores x 2 = 8).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from steelfusion import labha, labsan
from steelfusion.iscsi.client import IscsiClient
from steelfusion.lab import Lab, LabError, free_ports
from steelfusion.labview import status_lines
from steelfusion.san import JOURNAL_LUN
from tests.conftest import tool
from tests.nodes import procs_in, wait_for

MiB = 1 << 20
LUN = 16 * MiB
WRITE = 4 * MiB
NAMES = ["core-a1", "core-a2", "core-b1", "core-b2"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "steelfusion.cli", *args], capture_output=True,
                          text=True, timeout=120)


def coredr_status(addr: str) -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-m", "steelfusion.coredr", "--core", addr, "status",
                        "--json"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    out: dict[str, Any] = json.loads(p.stdout)
    return out


# -- the plan, without processes ------------------------------------------------------------
def test_plan_pairs_edges_and_alternates(tmp_path: Path) -> None:
    hp = labha.plan(tmp_path, luns=2, lun_size=LUN, edges=3, host="127.0.0.1",
                    ports=iter(free_ports(labha.PORTS_PER_LAB)), witness=("127.0.0.1", 1),
                    observed=dict)
    c = {x.name: x for x in hp.cores}
    assert list(c) == NAMES
    x, y, x2, y2 = (c[n] for n in NAMES)
    # X serves edge-1 and edge-3 (ids 1..4), Y edge-2 (ids 5, 6); replicas keep id and size
    assert [lu.id for lu in x.luns] == [lu.id for lu in x2.luns] == [1, 2, 3, 4]
    assert [lu.id for lu in y.luns] == [lu.id for lu in y2.luns] == [5, 6]
    assert [ids for ids, _ in hp.edges] == [[1, 2], [5, 6], [3, 4]]
    assert hp.edges[0][1] == (x.listen, y.ha_takeover_listen, x2.listen, y2.ha_takeover_listen)
    assert hp.edges[1][1] == (y.listen, x.ha_takeover_listen, y2.listen, x2.ha_takeover_listen)
    assert (x.peer, y.peer, x2.peer, y2.peer) == (x2.listen, y2.listen, x.listen, y.listen)
    assert x.peer_alternates == (y2.ha_takeover_listen,)
    assert y.peer_alternates == (x2.ha_takeover_listen,)
    assert x2.peer_alternates == (y.ha_takeover_listen,)
    assert y2.peer_alternates == (x.ha_takeover_listen,)
    assert (x.ha, y.ha, x2.ha, y2.ha) == ("leader", "follower", "leader", "follower")
    assert x.ha_partner_config == str(tmp_path / "core-a2.toml")
    assert x.ha_partner_address == y.ha_listen and y.ha_partner_address == x.ha_listen
    assert x.pair == x2.pair == "lab-pair-1" and y.pair == y2.pair == "lab-pair-2"
    assert x.state_dir == str(tmp_path / "core-a1")
    san_a = hp.sans[0]
    assert x.journal_path == f"{san_a.url(JOURNAL_LUN)}#part=1/2"
    assert y.journal_path == f"{san_a.url(JOURNAL_LUN)}#part=2/2"
    assert all(lu.path.startswith(san_a.url_base) for lu in (*x.luns, *y.luns))
    journal = next(lu for lu in san_a.luns if lu.lun == JOURNAL_LUN)
    assert journal.size == labha.journal_size(2, 3)  # 1 MiB part table + 2 x (1 + 2 x 4) GiB
    assert journal.size == MiB + 2 * (9 << 30)
    ports = [a for cc in hp.cores for a in (cc.listen, cc.control, cc.ha_listen,
                                           cc.ha_takeover_listen, cc.ha_takeover_control,
                                           cc.san_via)]
    ports += [a for s in hp.sans for a in (s.portal, s.path_control)]
    # each Core reaches its array through its own path (steelfusion/sanpath.py)
    assert {c: san_a.paths[c] for c in ("core-a1", "core-a2")} == {
        "core-a1": x.san_via, "core-a2": y.san_via}
    assert len(set(ports)) == len(ports) == labha.PORTS_PER_LAB


@pytest.mark.parametrize("kw, words", [
    ({"netns": True}, "loopback only"),
    ({"journal_faults": True}, "choose one"),
    ({"edges": 1}, "at least 2 Edges"),
])
def test_ha_refusals_change_nothing(tmp_path: Path, kw: dict[str, Any], words: str) -> None:
    lab = Lab(tmp_path / "lab")
    with pytest.raises(LabError) as e:
        lab.up(ha=True, lun_size=LUN, **kw)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert not lab.dir.exists()


def test_status_words_tolerate_a_missing_ha_section() -> None:
    st = {"witness": {}, "cores": [
        {"name": "core-a1", "running": True, "role": "primary", "replication": "running",
         "epoch": 1, "ha_role": "leader", "partner": "core-a2", "ha": None, "luns": {}},
        {"name": "core-a2", "running": True, "role": "primary", "replication": "running",
         "epoch": 1, "ha_role": "follower", "partner": "core-a1", "luns": {"3": {}},
         "ha": {"mode": "active", "leader": "core-a2", "partner": "core-a1",
                "partner_up": False, "hosted": {"name": "core-a1", "luns": [1, 2],
                                                "replication": "running"}}}],
        "edges": [], "ha": True}
    lines = status_lines(st)
    assert "ha=leader partner=core-a2" in lines[0]
    assert ("ha=follower(acting-leader) partner=core-a1:down luns=3 +core-a1:1-2(running)"
            in lines[1]), lines[1]


# -- the lab ------------------------------------------------------------------------------
async def _write(url: str, data: bytes) -> None:
    async with IscsiClient(url) as c:
        for off in range(0, len(data), 256 << 10):
            await c.write(off, data[off:off + (256 << 10)])
        await c.sync()


@pytest.mark.lab
@pytest.mark.timeout(180)
def test_ha_lab_replicates_both_pairs_byte_for_byte(tmp_path: Path) -> None:
    tool("tgtd")
    lab = Lab(tmp_path / "lab")
    wd = str(lab.dir)
    t0 = time.monotonic()
    up = cli("lab", "up", "--ha", "--workdir", wd, "--lun-size", "16M", "--json")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        took = time.monotonic() - t0
        data = json.loads(up.stdout)
        assert data["ha"] is True
        cores = {c["name"]: c for c in data["cores"]}
        assert [c["name"] for c in data["cores"]] == NAMES
        for name, (role, ha, partner, dc, pair) in {
                "core-a1": ("primary", "leader", "core-a2", "dc-a", "lab-pair-1"),
                "core-a2": ("primary", "follower", "core-a1", "dc-a", "lab-pair-2"),
                "core-b1": ("secondary", "leader", "core-b2", "dc-b", "lab-pair-1"),
                "core-b2": ("secondary", "follower", "core-b1", "dc-b", "lab-pair-2")}.items():
            c = cores[name]
            assert (c["role"], c["ha"], c["partner"], c["datacenter"], c["pair"]) == (
                role, ha, partner, dc, pair), name
            assert {"ha_listen", "takeover_listen", "takeover_control"} <= set(c), name
        assert [(s["name"], s["cores"]) for s in data["sans"]] == [
            ("san-a", ["core-a1", "core-a2"]), ("san-b", ["core-b1", "core-b2"])]
        assert cores["core-a1"]["journal"].endswith("/200#part=1/2")
        assert cores["core-a2"]["journal"].endswith("/200#part=2/2")
        assert [e["name"] for e in data["edges"]] == ["edge-1", "edge-2"]

        # a few MiB through each Edge with the repo's own initiator
        want = {}
        for e in data["edges"]:
            t = e["targets"][0]
            want[t["lun_id"]] = os.urandom(WRITE)
            asyncio.run(_write(t["url"], want[t["lun_id"]]))
        lab.wait_committed(timeout=60)
        # edge-1's LUN is X's (id 1), edge-2's is Y's (id 2); each array holds both
        assert sorted(want) == [1, 2]
        assert list(cores["core-a1"]["luns"]) == ["1"] and list(cores["core-a2"]["luns"]) == ["2"]
        for name in NAMES:
            files = labsan.lun_files(data, cores[name])
            assert list(files) == [int(k) for k in cores[name]["luns"]], name
            for lun, path in files.items():
                with open(path, "rb") as f:
                    assert f.read(WRITE) == want[lun], f"{name} LUN {lun} ({path})"

        # the seed's formula: 4 Cores x (2 x 1 interface) = 8 replication connections
        st = {n: coredr_status(cores[n]["control"]) for n in NAMES}
        for n in ("core-a1", "core-a2"):
            assert st[n]["replication"] == "running", n
            assert st[n]["connections"]["replication_interfaces"]["127.0.0.1"] == {
                "established": 2, "expected": 2}, n
        out = {n: sum(1 for c in s["connections"]["replication"]
                      if c["direction"] == "out" and c["established"]) for n, s in st.items()}
        assert sum(out.values()) == 8, out

        text = cli("lab", "status", "--workdir", wd)
        assert text.returncode == 0, text.stderr
        for n in NAMES:
            line = next(ln for ln in text.stdout.splitlines() if ln.startswith(n + " "))
            assert "ha=" in line and "partner=" in line, line
        print(f"lab up --ha took {took:.1f}s")
    finally:
        down = cli("lab", "down", "--workdir", wd)
    assert down.returncode == 0, down.stderr
    assert all(n in down.stdout for n in [*NAMES, "san-a", "san-b", "edge-1", "edge-2"])
    wait_for(lambda: not procs_in(lab.dir), 20, what="no process of the lab")
