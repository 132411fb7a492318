"""The whole write path with real processes and a real initiator (qemu-img / libiscsi)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steelfusion.initiator import qemu_io, qemu_read, qemu_write
from steelfusion.lab import Lab
from tests.conftest import tool
from tests.nodes import wait_for

pytestmark = [pytest.mark.lab, pytest.mark.timeout(300)]
MiB = 1 << 20


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "steelfusion.cli", *args], capture_output=True,
                          text=True, timeout=120, check=check)


@pytest.fixture
def lab(tmp_path: Path):  # type: ignore[no-untyped-def]
    tool("qemu-img")
    lab = Lab(tmp_path / "lab")
    yield lab
    if lab.file.exists():
        lab.down()


def _prefix(path: str | Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def test_qemu_image_reaches_both_cores(lab: Lab, tmp_path: Path) -> None:
    data = lab.up(luns=1, lun_size=128 * MiB, edges=1)
    url = data["edges"][0]["targets"][0]["url"]
    src = tmp_path / "image.raw"
    src.write_bytes(os.urandom(64 * MiB))
    qemu_write(src, url)
    back = tmp_path / "back.raw"
    qemu_read(url, back)
    assert _prefix(back, 64 * MiB) == src.read_bytes()
    lab.wait_committed(timeout=120)
    st = lab.status()
    assert st["edges"][0]["uncommitted_bytes"] == 0
    for core in data["cores"]:
        assert _prefix(core["luns"]["1"], 64 * MiB) == src.read_bytes(), core["name"]
    assert {c["name"]: c["replication"] for c in st["cores"]} == {
        "core-a": "running", "core-b": "replica"}


def test_primary_down_then_edge_killed_nothing_lost(lab: Lab, tmp_path: Path) -> None:
    wd = str(lab.dir)
    up = cli("lab", "up", "--workdir", wd, "--lun-size", "64M", "--json")
    data = json.loads(up.stdout)
    assert {"name", "pid", "address"} <= set(data["witness"])
    assert {"name", "pid", "control", "role", "luns"} <= set(data["cores"][0])
    assert {"iqn", "lun", "lun_id"} <= set(data["edges"][0]["targets"][0])
    url = data["edges"][0]["targets"][0]["url"]

    cli("lab", "kill", "core-a", "--workdir", wd)
    src = tmp_path / "while-down.raw"
    src.write_bytes(os.urandom(8 * MiB))
    qemu_write(src, url)  # disconnected operation: the Edge acknowledges anyway
    st = json.loads(cli("lab", "status", "--workdir", wd, "--json").stdout)
    assert st["edges"][0]["uncommitted_bytes"] >= 8 * MiB
    cores = {c["name"]: c for c in st["cores"]}
    assert cores["core-a"]["running"] is False and cores["core-b"]["role"] == "secondary"

    cli("lab", "kill", "edge-1", "--workdir", wd)  # crash with everything uncommitted
    cli("lab", "start", "core-a", "--workdir", wd)
    cli("lab", "start", "edge-1", "--workdir", wd)
    cli("lab", "wait-committed", "--workdir", wd, "--timeout", "120")
    for core in data["cores"]:
        assert _prefix(core["luns"]["1"], 8 * MiB) == src.read_bytes(), core["name"]
    back = tmp_path / "back.raw"
    qemu_read(url, back)
    assert _prefix(back, 8 * MiB) == src.read_bytes()
    out = cli("lab", "status", "--workdir", wd).stdout
    assert "replication=running" in out
    cli("lab", "down", "--workdir", wd)
    assert not any(Lab(wd).status()["edges"][0]["running"] for _ in [0])


def test_a_killed_edge_resends_only_what_was_uncommitted(lab: Lab) -> None:
    """Issue 18: 100 MiB committed, then 12 MiB held (the primary stopped), then the Edge
    SIGKILLed. Back up, it resends about the 12 MiB (the write log's COMMIT marks), not
    the ~48-100 MiB since its last retired log segment; every byte reads back."""
    data = lab.up(luns=1, lun_size=128 * MiB)
    url = data["edges"][0]["targets"][0]["url"]
    qemu_io(url, ["write -P 0x11 0 100M"], timeout=300)
    lab.wait_committed(timeout=120)
    core_a = next(c for c in data["cores"] if c["name"] == "core-a")
    os.kill(core_a["pid"], signal.SIGSTOP)  # acknowledges nothing now
    try:
        qemu_io(url, ["write -P 0x22 100M 12M"], timeout=120)
        edge = lab.status()["edges"][0]
        assert edge["uncommitted_bytes"] == 12 * MiB, edge
        lab.kill("edge-1")
    finally:
        os.kill(core_a["pid"], signal.SIGCONT)
    t0 = time.monotonic()
    lab.start("edge-1")
    lab.wait_committed(timeout=120)
    took = time.monotonic() - t0
    log = Path(data["edges"][0]["log"]).read_text().splitlines()
    resent = [json.loads(x)["resend_bytes"] for x in log if '"core_connected"' in x][-1]
    print(f"\nresent after the kill: {resent / MiB:.1f} MiB (12 MiB were uncommitted); "
          f"start to committed {took:.2f} s")
    assert 12 * MiB <= resent <= 13 * MiB, resent
    qemu_io(url, ["read -P 0x11 0 100M", "read -P 0x22 100M 12M"], timeout=300)


def test_malformed_pdu_costs_only_its_connection(lab: Lab, tmp_path: Path) -> None:
    data = lab.up(luns=1, lun_size=16 * MiB, edges=1)
    edge = data["edges"][0]
    url = edge["targets"][0]["url"]
    host, port = edge["portal"].rsplit(":", 1)
    src = tmp_path / "a.raw"
    src.write_bytes(os.urandom(4 * MiB))
    qemu_write(src, url)
    # a BHS with an undefined opcode, then garbage
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(bytes([0x3F]) + b"\xff" * 47 + os.urandom(100))
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except (ConnectionResetError, TimeoutError):
            pass
    back = tmp_path / "b.raw"
    qemu_read(url, back)
    assert _prefix(back, 4 * MiB) == src.read_bytes()
    wait_for(lambda: "iscsi_protocol_error" in Path(edge["log"]).read_text(), 10,
             what="iscsi_protocol_error in the Edge's log")


def test_full_reserve_stalls_host_writes_never_fails_them(lab: Lab, tmp_path: Path) -> None:
    """DESIGN: when the write reserve fills, host writes wait — never fail, never drop."""
    data = lab.up(luns=1, lun_size=64 * MiB, edges=1, reserve=4 * MiB)
    url = data["edges"][0]["targets"][0]["url"]
    lab.kill("core-a")
    src = tmp_path / "big.raw"
    src.write_bytes(os.urandom(16 * MiB))
    proc = subprocess.Popen(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "-t", "none",
                             str(src), url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(3)
    assert proc.poll() is None  # stalled, not failed
    st = lab.status()
    assert st["edges"][0]["blockstore"]["writers_waiting"] >= 1
    assert st["edges"][0]["uncommitted_bytes"] <= 4 * MiB + 512 * 1024
    lab.start("core-a")
    assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    lab.wait_committed(timeout=60)
    for core in data["cores"]:
        assert _prefix(core["luns"]["1"], 16 * MiB) == src.read_bytes(), core["name"]


def test_overlapping_and_contiguous_writes_land_in_order(lab: Lab, tmp_path: Path) -> None:
    """Random overlapping, contiguous and repeated writes via qemu-io: both Cores equal the model.

    The Edge coalesces contiguous writes into larger frames; later writes to
    the same bytes must still win on both Cores.
    """
    import random

    tool("qemu-io")
    size = 8 * MiB
    data = lab.up(luns=1, lun_size=size, edges=1)
    url = data["edges"][0]["targets"][0]["url"]
    rng = random.Random(5)
    model = bytearray(size)
    cmds: list[str] = []
    pos = 0
    for i in range(300):
        pattern = (i % 250) + 1
        if rng.random() < 0.5:  # a contiguous run, as sequential I/O gives
            n = rng.choice([512, 4096, 65536])
            off = pos if pos + n <= size else 0
        else:  # anywhere, overlapping earlier writes
            n = rng.choice([512, 4096, 8192, 131072])
            off = rng.randrange(0, (size - n) // 512) * 512
        pos = off + n
        model[off:off + n] = bytes([pattern]) * n
        cmds += ["-c", f"write -P {pattern} {off} {n}"]
    p = subprocess.run(["qemu-io", "-f", "raw", *cmds, url], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    lab.wait_committed(timeout=60)
    for core in data["cores"]:
        assert Path(core["luns"]["1"]).read_bytes() == bytes(model), core["name"]
