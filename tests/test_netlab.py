"""Issue 10: the netns lab. Sites in network namespaces, WAN links through the userspace
emulator, every Core with two replication interfaces; `lab link`, `lab port`, coredr --netns.

Real processes in real namespaces (root), a real initiator (qemu-img over libiscsi) run
inside the branch namespace. Skipped where namespaces or /dev/net/tun are not available.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from steelfusion.initiator import qemu_read, qemu_write
from steelfusion.lab import Lab, pid_alive, remove_stale_namespaces, stale_namespaces
from tests.conftest import tool
from tests.nodes import lab_at, procs_in, refused, wait_for, why_no_netns

pytestmark = [pytest.mark.lab, pytest.mark.timeout(180)]
MiB = 1 << 20
CORE_A_IFACES = ("10.99.1.1", "10.99.1.2")
WHY_NOT = why_no_netns()
needs_netns = pytest.mark.skipif(WHY_NOT is not None, reason=f"no netns lab here: {WHY_NOT}")


def cli(*args: str, env: dict[str, str] | None = None,
        prog: str = "steelfusion.cli") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", prog, *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def ok(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 0, (p.args, p.stdout, p.stderr)
    return p.stdout


def lab_namespaces(lab: Lab) -> list[str]:
    from steelfusion import netns

    return netns.listing(netns.lab_prefix(netns.labid_for(lab.dir)))


@pytest.fixture(scope="module", autouse=True)
def _no_stale_namespaces() -> None:
    """Namespaces a crashed run of these tests left (empty, unused, old) go first."""
    if WHY_NOT is None:
        remove_stale_namespaces()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    tool("qemu-img")
    with lab_at(tmp_path / "lab") as lab:
        yield lab
    from steelfusion import netns

    netns.remove_all(netns.lab_prefix(netns.labid_for(lab.dir)))  # whatever happened


def core(lab: Lab, name: str) -> dict[str, Any]:
    return next(c for c in lab.status()["cores"] if c["name"] == name)


def out_links(c: dict[str, Any]) -> dict[str, int]:
    """Established outbound replication connections per local (interface) address."""
    per: dict[str, int] = {}
    for ln in (c.get("connections") or {}).get("replication", []):
        if ln["direction"] == "out" and ln["established"]:
            ip = ln["local"].rsplit(":", 1)[0]
            per[ip] = per.get(ip, 0) + 1
    return per


def write_read_back(url: str, ns: str, tmp: Path, size: int, tag: str) -> bytes:
    """qemu-img writes random data through the Edge from the branch namespace; it reads
    back identical through the same Edge. Returns the data."""
    src = tmp / f"{tag}.raw"
    data = os.urandom(size)
    src.write_bytes(data)
    qemu_write(src, url, timeout=60, netns=ns)
    back = tmp / f"{tag}.back"
    qemu_read(url, back, timeout=60, netns=ns)
    with open(back, "rb") as f:
        assert f.read(size) == data, tag
    return data


def cores_identical(data: dict[str, Any], prefix: bytes) -> None:
    a, b = (Path(c["luns"]["1"]).read_bytes() for c in data["cores"])
    assert a == b, "the Cores' LUN files differ"
    assert a[:len(prefix)] == prefix


@needs_netns
def test_netns_lab_two_interfaces_and_a_port_down(lab: Lab, tmp_path: Path) -> None:
    wd = str(lab.dir)
    data = json.loads(ok(cli("lab", "up", "--workdir", wd, "--netns", "--lun-size", "32M",
                             "--json")))
    # lab.json: the lab, its sites and emulator, and where each node runs
    assert data["netns"] is True and set(data["sites"]) == {"branch", "dc-a", "dc-b", "witness"}
    assert data["sites"]["dc-a"]["addresses"] == list(CORE_A_IFACES)
    assert data["wan"]["control"].startswith("127.0.0.1:") and pid_alive(data["wan"]["pid"])
    ns = {n["name"]: n["netns"] for n in [data["witness"], *data["cores"], *data["edges"]]}
    assert ns == {"witness": data["sites"]["witness"]["netns"],
                  "core-a": data["sites"]["dc-a"]["netns"],
                  "core-b": data["sites"]["dc-b"]["netns"],
                  "edge-1": data["sites"]["branch"]["netns"]}
    assert sorted(lab_namespaces(lab)) == sorted(s["netns"] for s in data["sites"].values())
    assert data["cores"][0]["listen"].startswith("10.99.1.1:")
    assert data["witness"]["address"].startswith("10.99.3.1:")
    url = data["edges"][0]["targets"][0]["url"]
    assert url.startswith("iscsi://10.99.0.1:")
    branch = data["sites"]["branch"]["netns"]

    # the primary holds the seed's 2 connections per interface, each from its own address
    assert wait_for(lambda: out_links(core(lab, "core-a")) == dict.fromkeys(CORE_A_IFACES, 2),
                    what="2 replication connections on each of core-a's interfaces")
    first = write_read_back(url, branch, tmp_path, 8 * MiB, "first")
    ok(cli("lab", "wait-committed", "--workdir", wd, "--timeout", "60"))
    cores_identical(data, first)

    # `lab status`: the namespace of every node, the WAN links, the coredr command lines
    out = ok(cli("lab", "status", "--workdir", wd))
    for name, n in ns.items():
        line = next(ln for ln in out.splitlines() if ln.startswith(name))
        assert f"netns={n}" in line, (name, out)
    assert "link dc-a <-> dc-b" in out and "delay=0ms" in out, out
    a_ns = data["sites"]["dc-a"]["netns"]
    cmd = f"coredr --netns {a_ns} --core {data['cores'][0]['control']} status"
    assert cmd in out, out

    # ... which an operator runs as printed (and with $COREDR_NETNS)
    st = json.loads(ok(cli("--netns", a_ns, "--core", data["cores"][0]["control"], "status",
                           "--json", prog="steelfusion.coredr")))
    assert st["name"] == "core-a" and st["replication"] == "running"
    st = json.loads(ok(cli("--core", data["cores"][1]["control"], "status", "--json",
                           env={"COREDR_NETNS": data["sites"]["dc-b"]["netns"]},
                           prog="steelfusion.coredr")))
    assert st["name"] == "core-b"

    # core-a's second interface goes down: replication keeps running on the first
    assert ok(cli("lab", "port", "dc-a/1", "--down", "--workdir", wd)).strip() == \
        "port dc-a/1 down"
    assert wait_for(lambda: out_links(core(lab, "core-a")) == {CORE_A_IFACES[0]: 2},
                    what="core-a's links over dc-a/1 gone, those over dc-a/0 kept")
    assert core(lab, "core-a")["replication"] == "running"
    assert "port dc-a/1 (10.99.1.2) DOWN" in ok(cli("lab", "status", "--workdir", wd))
    second = write_read_back(url, branch, tmp_path, 8 * MiB, "second")
    ok(cli("lab", "wait-committed", "--workdir", wd, "--timeout", "60"))
    cores_identical(data, second)
    assert core(lab, "core-a")["replication"] == "running"
    # back up: the diallers of that interface connect again
    ok(cli("lab", "port", "dc-a/1", "--up", "--workdir", wd))
    assert wait_for(lambda: out_links(core(lab, "core-a")) == dict.fromkeys(CORE_A_IFACES, 2),
                    what="core-a's links over dc-a/1 back")


@needs_netns
def test_cut_between_data_centers_pauses_then_heals(lab: Lab, tmp_path: Path) -> None:
    data = lab.up(luns=1, lun_size=32 * MiB, netns=True, timeout=60)
    wd = str(lab.dir)
    url = data["edges"][0]["targets"][0]["url"]
    branch = data["sites"]["branch"]["netns"]
    out = ok(cli("lab", "link", "dc-a", "dc-b", "--cut", "--workdir", wd))
    assert out.splitlines() == ["link dc-a -> dc-b: cut", "link dc-b -> dc-a: cut"], out
    # both Cores alive: the primary pauses, the secondary is disconnected
    wait_for(lambda: core(lab, "core-a")["replication"] == "paused", what="core-a paused")
    assert all(c["running"] for c in lab.status()["cores"])
    # the Edge keeps acknowledging the host: the writes wait in its reserve
    data_cut = write_read_back(url, branch, tmp_path, 4 * MiB, "cut")
    st = lab.status()
    assert st["edges"][0]["uncommitted_bytes"] > 0, st["edges"]
    assert {c["name"]: c["replication"] for c in st["cores"]}["core-a"] == "paused"
    line = next(ln for ln in ok(cli("lab", "status", "--workdir", wd)).splitlines()
                if "link dc-a <-> dc-b" in ln)
    assert "CUT" in line, line
    # healed: running again by itself, every write committed on both Cores
    ok(cli("lab", "link", "dc-a", "dc-b", "--heal", "--workdir", wd))
    wait_for(lambda: core(lab, "core-a")["replication"] == "running", 60,
             what="core-a running")
    lab.wait_committed(timeout=60)
    cores_identical(data, data_cut)
    # a link's settings and traffic, shown when nothing is to change
    shown = ok(cli("lab", "link", "dc-a", "dc-b", "--workdir", wd)).splitlines()
    assert len(shown) == 2 and shown[0].startswith("link dc-a -> dc-b: delay 0ms"), shown


@needs_netns
def test_lab_down_and_a_failed_up_leave_no_namespace_and_no_process(lab: Lab) -> None:
    wd = str(lab.dir)
    # a start that fails half-way (edge-1 cannot open its blockstore) stops the emulator
    # and the nodes it started and removes the namespaces it created
    (lab.dir / "edge-1").mkdir(parents=True)
    (lab.dir / "edge-1" / "blockstore").write_text("in the way\n")
    refused(cli("lab", "up", "--workdir", wd, "--netns", "--lun-size", "8M"), "edge-1",
            "stopped", "namespaces")
    wait_for(lambda: not procs_in(lab.dir), 20, what="no process of the lab")
    assert lab_namespaces(lab) == []
    (lab.dir / "edge-1" / "blockstore").unlink()
    data = lab.up(luns=1, lun_size=8 * MiB, netns=True, timeout=60)
    pids = [n["pid"] for n in [data["wan"], *lab.nodes(data)]]
    assert len(lab_namespaces(lab)) == 4
    # kill and start work the same as on loopback, the emulator too; a restarted emulator
    # keeps the links that were set (a partition must not heal by itself)
    lab.link("witness", "dc-b", delay=0.02, one_way=True)
    assert ok(cli("lab", "kill", "wan", "--workdir", wd)).startswith("killed wan")
    refused(cli("lab", "link", "dc-a", "dc-b", "--cut", "--workdir", wd), "not running",
            "lab start wan")
    ok(cli("lab", "start", "wan", "--workdir", wd))
    kept = lab.links("witness", "dc-b")
    assert kept[0]["delay"] == 0.02 and kept[1]["delay"] == 0.0, kept
    lab.link("witness", "dc-b", heal=True, one_way=True)
    ok(cli("lab", "kill", "core-b", "--workdir", wd))
    ok(cli("lab", "start", "core-b", "--workdir", wd))
    lab.wait_ready(lab.load(), 30)
    out = ok(cli("lab", "down", "--workdir", wd))
    assert "wan" in out and "core-a" in out, out
    assert lab_namespaces(lab) == []
    assert not any(pid_alive(p) for p in pids) and not procs_in(lab.dir)
    # a lab that is down says so, and how to start it again
    refused(cli("lab", "start", "core-a", "--workdir", wd), "up --netns")
    refused(cli("lab", "link", "dc-a", "dc-b", "--cut", "--workdir", wd), "is down",
            "up --netns")


def test_link_and_port_refuse_bad_input_in_one_line(tmp_path: Path) -> None:
    wd = str(tmp_path / "nolab")
    for args, want in [
        (("--delay", "30"), ("--delay", "unit")),
        (("--delay", "-5ms"), ("--delay", "not a duration")),
        (("--delay", "2min"), ("--delay",)),
        (("--delay", "61s"), ("--delay", "--cut")),
        (("--jitter", "abc"), ("--jitter",)),
        (("--rate", "100"), ("--rate", "unit")),
        (("--rate", "100mb"), ("--rate", "mbit")),
        (("--rate", "1bit"), ("--rate", "8kbit")),
        (("--loss", "0.5"), ("--loss", "%")),
        (("--loss", "150%"), ("--loss", "100%")),
        (("--loss", "nan%"), ("--loss",)),
    ]:
        refused(cli("lab", "link", "dc-a", "dc-b", *args, "--workdir", wd), *want)
    refused(cli("lab", "link", "dc-a", "--workdir", wd), "SITE_B")
    refused(cli("lab", "link", "dc-a", "dc-b", "--speed", "1mbit", "--workdir", wd),
            "--speed")
    refused(cli("lab", "port", "dc-a/1", "--workdir", wd), "--down or --up")
    refused(cli("lab", "port", "dc-a/1", "--down", "--up", "--workdir", wd), "--down or --up")
    # good values, but no lab there
    refused(cli("lab", "link", "dc-a", "dc-b", "--delay", "30ms", "--workdir", wd), "no lab")
    p = cli("--netns", "../etc", "--core", "127.0.0.1:1", "status", prog="steelfusion.coredr")
    assert p.returncode == 2
    refused(p, "--netns", "not a namespace name")
    p = cli("--netns", "sf000000-nothere", "--core", "127.0.0.1:1", "status",
            prog="steelfusion.coredr")
    assert p.returncode == 2
    refused(p, "--netns sf000000-nothere", "no such network namespace")
    assert "Usage" in cli("--netns", "sf000000-nothere", "status", "--help",
                          prog="steelfusion.coredr").stdout


def test_links_exist_only_in_a_netns_lab(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "lab")
    try:
        lab.up(luns=1, lun_size=8 * MiB)
        wd = str(lab.dir)
        refused(cli("lab", "link", "dc-a", "dc-b", "--cut", "--workdir", wd), "loopback",
                "--netns")
        refused(cli("lab", "port", "dc-a/1", "--down", "--workdir", wd), "loopback", "--netns")
        out = ok(cli("lab", "status", "--workdir", wd))
        assert "netns=" not in out and "wan" not in out.split("coredr")[0], out
        assert f"coredr --core {lab.load()['cores'][0]['control']} status" in out, out
    finally:
        if lab.file.exists():
            lab.down()


@needs_netns
def test_stale_namespaces_are_only_unused_ones_of_this_project() -> None:
    from steelfusion import netns

    mine = netns.ns_name(secrets.token_hex(3), "dc-a")
    other = f"sfprobe-{secrets.token_hex(3)}"  # not "sf" + 6 hex + "-": never touched
    netns.create(mine)
    netns.create(other)
    sleeper = None
    try:
        assert mine in stale_namespaces(min_age=0)
        assert other not in stale_namespaces(min_age=0)
        assert mine not in stale_namespaces(min_age=3600)  # just made: a lab starting up
        sleeper = subprocess.Popen(["sleep", "60"], preexec_fn=netns.preexec(mine))
        wait_for(lambda: mine not in stale_namespaces(min_age=0), what="a process inside counts")
        sleeper.kill()
        sleeper.wait()
        sleeper = None
        assert mine in remove_stale_namespaces(min_age=0)
        assert not netns.exists(mine) and netns.exists(other)
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
        netns.remove(mine)
        netns.remove(other)
