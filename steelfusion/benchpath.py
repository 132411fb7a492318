"""``steelfusion bench-path``: CPU per iSCSI command of the Edge's own code path.

The side-by-side benchmark (:mod:`steelfusion.bench`) measures the whole
machine; this one isolates what the Edge's Python costs per command, so a
change to the per-command path can be judged without network, Cores or
another process in the way: a real :class:`edge.target.IscsiTarget`
connection, logged in, fed pre-encoded SCSI Command PDUs in batches of the
queue depth (in reads of at most 256 KiB, like a busy socket), after a warm-up
pass of the same commands (the log recycles its segments then), over a
real :class:`edge.node.EdgeLun` and blockstore in a temporary folder. The
transport only counts what it is given. Figures are CPU microseconds per
command (``time.process_time``), so they hold on a busy machine better than
wall-clock rates do.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from edge.blockstore import FULL, Blockstore
from edge.node import EdgeLun
from edge.target import IscsiTarget, TargetNode, _Connection
from steelfusion.iscsi.pdu import LoginRequest, ScsiCommand
from steelfusion.iscsi.text import encode_text

IQN = "iqn.2026-11.io.steelfusion:bench-path"
_KEYS = [
    ("InitiatorName", "iqn.2026-11.io.steelfusion:bench-path-initiator"), ("TargetName", IQN),
    ("SessionType", "Normal"), ("HeaderDigest", "None"), ("DataDigest", "None"),
    ("InitialR2T", "No"), ("ImmediateData", "Yes"), ("MaxBurstLength", "262144"),
    ("FirstBurstLength", "262144"), ("MaxRecvDataSegmentLength", "262144"),
]
LUN_BYTES = 1 << 30
SPAN_BYTES = 64 << 20  # commands cycle over this much of the LUN (kept in the page cache)
RECV_BYTES = 256 * 1024  # what one socket read hands the target at most (uvloop's buffer)


class _CountingTransport:
    """Stands in for the socket: counts what the target hands it."""

    def __init__(self) -> None:
        self.writes = 0
        self.bytes = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def writelines(self, parts: Iterable[Any]) -> None:
        self.writes += 1
        self.bytes += sum(len(p) for p in parts)

    def write(self, data: Any) -> None:
        self.writes += 1
        self.bytes += len(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@dataclass
class PathResult:
    workload: str
    commands: int
    cpu_us_per_command: float
    commands_per_s_wall: float


def _cdb(write: bool, lba: int, blocks: int) -> bytes:
    return (bytes((0x2A if write else 0x28, 0)) + lba.to_bytes(4, "big") + b"\0"
            + blocks.to_bytes(2, "big") + bytes(7))


async def _run(write: bool, count: int, depth: int, block: int, folder: str) -> PathResult:
    bs = Blockstore(folder, {0: LUN_BYTES}, 1 << 40)
    cache = bs.caches[0]
    os.pwrite(cache.fd, bytes(SPAN_BYTES), 0)  # reads hit cached pages, as in a warm Edge
    cache.state[: SPAN_BYTES // cache.region] = FULL
    lun = EdgeLun(0, LUN_BYTES, bs, None)  # type: ignore[arg-type]  # no uplink
    target = IscsiTarget(TargetNode(IQN, {0: lun}), "127.0.0.1", 0, barrier=bs.drain)
    conn = _Connection(target)
    transport = _CountingTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(LoginRequest(itt=1, isid=0x80_0000_0000_01, cmdsn=1, transit=True,
                                    csg=1, nsg=3, data=encode_text(_KEYS)).encode())
    await asyncio.sleep(0)
    blocks = block // 512
    payload = b"\x5a" * block if write else b""
    sn = {"cmdsn": 1, "lba": 0}

    def commands() -> list[bytes]:
        """``count`` commands in batches of ``depth``, numbered on from the last ones."""
        out = []
        for start in range(0, count, depth):
            pdus = []
            for _ in range(start, min(count, start + depth)):
                cmdsn, lba = sn["cmdsn"], sn["lba"]
                pdus.append(ScsiCommand(itt=cmdsn, cmdsn=cmdsn, expected_length=block,
                                        cdb=_cdb(write, lba, blocks), read=not write,
                                        write=write, data=payload).encode())
                sn["cmdsn"] = cmdsn + 1
                sn["lba"] = (lba + blocks) % (SPAN_BYTES // 512 - blocks)
            out.append(b"".join(pdus))
        return out

    async def feed(batches: list[bytes]) -> None:
        for batch in batches:
            # as a socket delivers it: up to RECV_BYTES per read
            for at in range(0, len(batch), RECV_BYTES):
                conn.data_received(batch[at:at + RECV_BYTES])
            await asyncio.sleep(0)
            if bs.uncommitted_bytes > 256 << 20:  # the Cores' acknowledgements, in effect
                bs.commit(0, bs.next_seq[0] - 1)
        await asyncio.sleep(0)
        bs.commit(0, bs.next_seq[0] - 1)

    # A warm-up pass first, not measured: the write log then recycles its segments
    # and the cache's pages are in memory, as in an Edge that has been running.
    await feed(commands())
    batches = commands()
    answered = transport.bytes
    wall, cpu = time.perf_counter(), time.process_time()
    await feed(batches)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    # every command answered (a 48-byte header at least), none dropped as a duplicate
    if transport.bytes - answered < 48 * count:
        raise RuntimeError("bench-path: commands went unanswered")
    conn.abort("done")
    bs.close()
    name = f"{block // 1024}K {'write' if write else 'read'} QD{depth}"
    return PathResult(name, count, round(1e6 * cpu / count, 2), round(count / wall))


def run(count: int = 100_000, quick: bool = False) -> list[PathResult]:
    """The standard set: 4K reads and writes at QD32, 128K writes at QD8."""
    loads = [(False, 4096, 32, count), (True, 4096, 32, count),
             (True, 128 * 1024, 8, max(100, count // 10))]
    out = []
    for write, block, depth, n in loads:
        folder = tempfile.mkdtemp(prefix="steelfusion-bench-path-")
        try:
            n = max(64, n // 50) if quick else n
            out.append(asyncio.run(_run(write, n, depth, block, folder)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return out


def render(results: list[PathResult]) -> str:
    lines = [f"{'workload':<16} {'commands':>9} {'CPU us/cmd':>11} {'cmd/s (wall)':>13}"]
    lines += [f"{r.workload:<16} {r.commands:>9} {r.cpu_us_per_command:>11.2f} "
              f"{r.commands_per_s_wall:>13,}" for r in results]
    lines.append("the Edge's iSCSI + SCSI + blockstore path in one process, no network, "
                 "no Cores (see steelfusion/benchpath.py)")
    return "\n".join(lines)


__all__ = ["PathResult", "render", "run"]
