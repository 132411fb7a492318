"""Discards end to end (issue 18): a host's UNMAP at the Edge becomes one DISCARD write that
both Cores apply as a hole punched in their LUN files, so thin LUNs give space back on the
primary and on the replica; while suspended the journal marks the range and the resync
sends the punched chunks as discards too. Real processes, qemu-io (libiscsi) as the host."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.node import paint
from steelfusion.initiator import qemu_io
from steelfusion.iscsi.client import IscsiClient
from steelfusion.lab import Lab
from tests.conftest import tool
from tests.nodes import lab_at, status, wait_for

MiB = 1 << 20


def coredr(addr: str, *args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "steelfusion.coredr", "--core", addr, *args],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"coredr {' '.join(args)}: {p.stdout}{p.stderr}"
    return p.stdout


def lba_status(url: str, lba: int) -> list[tuple[int, int, int]]:
    async def ask() -> list[tuple[int, int, int]]:
        async with IscsiClient(url, "iqn.2026-11.io.steelfusion:test-host") as c:
            return await c.lba_status(lba)
    return asyncio.run(ask())


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Lab, dict[str, Any]]]:
    tool("qemu-io")
    with lab_at(tmp_path / "lab") as lab:
        yield lab, lab.up(luns=1, lun_size=96 * MiB, edges=1)


def test_allocation_spans_painted_in_order() -> None:
    """How an Edge lays its uncommitted writes (mapped) and discards over the primary's
    allocation for GET LBA STATUS: clipped to the range asked, later records win,
    neighbours merged."""
    core = [(0, 100, True), (100, 200, False)]
    assert paint(core, 50, 150, False) == [(0, 50, True), (50, 200, False)]
    assert paint(core, 150, 180, True) == [(0, 100, True), (100, 150, False),
                                           (150, 180, True), (180, 200, False)]
    assert paint(core, 180, 400, True) == [(0, 100, True), (100, 180, False), (180, 200, True)]
    assert paint(core, 300, 400, False) == core
    assert paint(paint(core, 0, 200, False), 0, 10, True) == [(0, 10, True), (10, 200, False)]


@pytest.mark.lab
@pytest.mark.timeout(300)
def test_unmap_frees_space_on_both_cores_and_reads_zeros(
        lab: tuple[Lab, dict[str, Any]]) -> None:
    lab_, data = lab
    url = data["edges"][0]["targets"][0]["url"]
    files = [c["luns"]["1"] for c in data["cores"]]
    a, b = (c["control"] for c in data["cores"])
    qemu_io(url, ["write -P 0x33 0 64M"], timeout=120)
    lab_.wait_committed(timeout=120)
    before = [allocated(f) for f in files]
    assert all(x >= 64 * MiB for x in before), before

    qemu_io(url, ["discard 16M 32M"], timeout=60)
    lab_.wait_committed(timeout=60)
    after = [allocated(f) for f in files]
    print(f"\nallocated before/after the discard: {[x // MiB for x in before]} -> "
          f"{[x // MiB for x in after]} MiB")
    assert all(x - y >= 32 * MiB for x, y in zip(before, after, strict=True)), (before, after)
    # what the operator sees: coredr status shows the LUN's real use next to its size
    assert status(a)["luns"]["1"]["allocated_bytes"] == after[0]
    table = coredr(a, "status")
    assert "allocated" in table and "32.0 MiB" in table, table
    qemu_io(url, ["read -P 0x33 0 16M", "read -P 0 16M 32M", "read -P 0x33 48M 16M"])
    # GET LBA STATUS from the primary's real allocation (not zero-detection): deallocated
    assert lba_status(url, 16 * MiB // 512)[0] == (16 * MiB // 512, 32 * MiB // 512, 1)
    assert lba_status(url, 0)[0] == (0, 16 * MiB // 512, 0)
    for f in files:
        with open(f, "rb") as fh:
            fh.seek(16 * MiB)
            assert fh.read(32 * MiB) == bytes(32 * MiB)
    assert coredr(a, "verify").splitlines()[-1] == "IDENTICAL"
    edge = json.loads(subprocess.run(
        [sys.executable, "-m", "steelfusion.cli", "lab", "status", "--workdir", str(lab_.dir),
         "--json"], capture_output=True, text=True, timeout=60, check=True).stdout)["edges"][0]
    assert edge["uncommitted_bytes"] == 0

    # suspended: the primary punches at once, the replica when the resync comes
    assert "suspended" in coredr(a, "suspend")
    qemu_io(url, ["discard 0 16M"], timeout=60)
    lab_.wait_committed(timeout=60)
    mid = [allocated(f) for f in files]
    assert after[0] - mid[0] >= 16 * MiB and mid[1] == after[1], (after, mid)
    j = json.loads(coredr(a, "journal", "status", "--json"))
    assert j["luns"][0]["dirty_regions"] > 0
    coredr(a, "resume", "--no-wait")
    wait_for(lambda: status(a)["replication"] == "running", timeout=120, what="resync done")
    end = [allocated(f) for f in files]
    print(f"after a discard while suspended and the resync: {[x // MiB for x in end]} MiB")
    assert after[1] - end[1] >= 16 * MiB, (after, end)
    qemu_io(url, ["read -P 0 0 48M", "read -P 0x33 48M 16M"])
    assert coredr(b if status(b)["role"] == "primary" else a, "verify").splitlines()[-1] \
        == "IDENTICAL"
