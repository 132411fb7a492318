"""The Edge process: iSCSI target in front, blockstore in the middle, Core uplink behind.

Follow a host write: :mod:`edge.target` (iSCSI) -> :mod:`edge.scsi` (WRITE CDB)
-> :meth:`EdgeLun.write` (reserve, log, cache, acknowledge) -> :mod:`edge.uplink`
(ship to the primary Core) -> :mod:`core.node`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from typing import Any

from edge.backends import BackendNotReady, make_naa
from edge.blockstore import Blockstore
from edge.metrics import EdgeCollector, commit_histogram
from edge.uplink import CoreUplink
from steelfusion import control, log, metrics
from steelfusion.config import EdgeConfig
from steelfusion.startup import listening, serve_until_stopped
from steelfusion.units import format_addr

_log = log.get("edge")

RECORD_MAX = 512 * 1024
LAG_SAMPLE_S = 0.25  # commit lag is known to this; sampled only with metrics or the console
LAG_HISTORY_S = 900.0  # an uncommitted write older than this shows at least this old


class EdgeLun:
    """One exported LUN: the :class:`edge.backends.BlockBackend` the SCSI layer drives."""

    block_size = 512
    cancel_safe = True
    """A cancelled write leaves nothing to land later: it either waits for reserve
    room with nothing done, or its append is already queued for the log, which the
    target drains before any answer (the TMF's included) leaves. So ABORT TASK and
    resets answer at once even when writes wait for a full reserve."""

    def __init__(self, lun_id: int, size: int, bs: Blockstore,
                 uplink: CoreUplink) -> None:
        self.lun_id = lun_id
        self.size_bytes = size
        self.bs = bs
        self.cache = bs.caches[lun_id]
        self.uplink = uplink
        self.serial = f"SF{lun_id:08d}"
        self.naa_id = make_naa(f"steelfusion-lun-{lun_id}")
        self._fills: dict[int, asyncio.Future[None]] = {}
        # host I/O counters, read by status and metrics (plain ints: no cost worth naming)
        self.reads = 0
        self.read_misses = 0
        self.bytes_read = 0
        self.writes = 0
        self.bytes_written = 0

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        """Stored in the write reserve as uncommitted, then acknowledged (DESIGN step 1).

        A host write larger than :data:`RECORD_MAX` becomes several records (the
        seed's replication payloads are "as large as 512 KB").
        """
        n = len(data)
        await self.bs.reserve(n)
        self.writes += 1
        self.bytes_written += n
        try:
            view = memoryview(data)
            for pos in range(0, n, RECORD_MAX):
                self.bs.append(self.lun_id, offset + pos, view[pos:pos + RECORD_MAX])
        except BaseException:
            self.bs.unreserve(n)
            raise
        if fua:
            await self.bs.flush()

    def write_now(self, offset: int, data: bytes | memoryview) -> bool:
        """:meth:`write` without waiting, for ``LogicalUnit.try_fast``: False
        (nothing done) when the reserve has no room now or the write needs
        several records."""
        n = len(data)
        if n > RECORD_MAX or not self.bs.try_reserve(n):
            return False
        try:
            self.bs.append(self.lun_id, offset, data)
        except BaseException:
            self.bs.unreserve(n)
            raise
        self.writes += 1
        self.bytes_written += n
        return True  # acknowledged only after the target's barrier (Blockstore.drain)

    def read_now(self, offset: int, length: int) -> bytes | None:
        """:meth:`read` when the cache holds every byte, else None."""
        cache = self.cache
        if cache.missing(offset, length):
            return None
        self.reads += 1
        self.bytes_read += length
        return cache.read(offset, length)

    async def unmap(self, offset: int, length: int) -> None:
        """UNMAP / WRITE SAME with UNMAP (edge.backends.ThinBackend): one log record, shipped
        to the Cores as a discard they punch out of their LUNs (issue 18); reads zeros now."""
        self.bs.discard(self.lun_id, offset, length)

    async def lba_status(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """GET LBA STATUS from the real allocation (edge.backends.LbaStatusBackend): the
        primary's (SEEK_DATA/SEEK_HOLE on its LUN), then this Edge's uncommitted writes
        (mapped) and discards (deallocated) over it in order. Records pending when asked or
        when answered both count, so a write committed meanwhile is never reported
        deallocated (that would promise zeros, LBPRZ)."""
        before = list(self.bs.pending[self.lun_id])
        got = await self.uplink.allocation(self.lun_id, offset, length)
        recs = {r.seq: r for r in (*before, *self.bs.pending[self.lun_id])}
        spans = [(o, o + n, m) for o, n, m in got]
        for r in sorted(recs.values(), key=lambda r: r.seq):
            spans = paint(spans, r.offset, r.offset + (r.discard or r.length), not r.discard)
        return [(a, b - a, m) for a, b, m in spans if b > a]

    async def flush(self) -> None:
        await self.bs.flush()

    async def read(self, offset: int, length: int) -> bytes:
        """From the cache; regions it lacks are fetched from the primary Core first."""
        self.reads += 1
        self.bytes_read += length
        if length == 0:
            return b""
        missing = self.cache.missing(offset, length)
        if missing:
            self.read_misses += 1
            await asyncio.gather(*(self._fill(r) for r in missing))
        return self.cache.read(offset, length)

    async def _fill(self, r: int) -> None:
        fut = self._fills.get(r)
        if fut is not None:
            await asyncio.shield(fut)
            return
        fut = asyncio.get_running_loop().create_future()
        self._fills[r] = fut
        try:
            base = r * self.cache.region
            data = await self.uplink.read(self.lun_id, base,
                                          min(self.cache.region, self.size_bytes - base))
            self.cache.fill(r, data)
            fut.set_result(None)
        except BaseException as e:
            fut.set_exception(e if isinstance(e, Exception) else BackendNotReady(str(e)))
            fut.exception()
            raise
        finally:
            del self._fills[r]


def paint(spans: list[tuple[int, int, bool]], start: int, end: int,
          mapped: bool) -> list[tuple[int, int, bool]]:
    """``(start, end, mapped)`` spans with [start, end) clipped to their range and set to
    ``mapped``; neighbours with the same state merged."""
    lo = spans[0][0] if spans else start
    hi = spans[-1][1] if spans else end
    start, end = max(start, lo), min(end, hi)
    if start >= end:
        return spans
    out: list[tuple[int, int, bool]] = []
    for a, b, m in spans:
        for x, y, mm in ((a, min(b, start), m), (max(a, end), b, m)):
            if y > x:
                out.append((x, y, mm))
    out.append((start, end, mapped))
    out.sort()
    merged: list[tuple[int, int, bool]] = []
    for a, b, m in out:
        if merged and merged[-1][1] == a and merged[-1][2] == m:
            merged[-1] = (merged[-1][0], b, m)
        else:
            merged.append((a, b, m))
    return merged


class Edge:
    def __init__(self, cfg: EdgeConfig) -> None:
        self.cfg = cfg
        luns = {lu.lun_id: lu.size for t in cfg.targets for lu in t.luns}
        self.bs = Blockstore(cfg.blockstore, luns, cfg.reserve_bytes, cfg.cache_region_bytes)
        self.uplink = CoreUplink(cfg, self.bs)
        self.luns = {lid: EdgeLun(lid, size, self.bs, self.uplink)
                     for lid, size in luns.items()}
        self.target: Any = None
        self.witness: Any = None
        self._control: asyncio.AbstractServer | None = None
        self._http: list[Any] = []  # metrics and console listeners (steelfusion.metrics)
        self._sampler: asyncio.Task[None] | None = None
        # (monotonic time, next seq of every LUN then): when each uncommitted write was made,
        # to LAG_SAMPLE_S, without a clock read per write
        self._seq_samples: deque[tuple[float, dict[int, int]]] = deque(
            maxlen=int(LAG_HISTORY_S / LAG_SAMPLE_S))
        self.stopping = asyncio.Event()
        self.started = time.time()
        self.witness_key = "[witness] listen"  # where the embedded Witness's address came from

    async def start(self) -> None:
        from edge.target import IscsiTarget, TargetNode

        # Persistent reservations live beside the blockstore; a host write of
        # up to RECORD_MAX is one CRC-checked log record, hence crash-atomic
        # (what WRITE ATOMIC promises).
        targets = [TargetNode(iqn=t.iqn, luns={lu.lun: self.luns[lu.lun_id] for lu in t.luns},
                              alias=t.alias, state_dir=os.path.join(self.cfg.blockstore, "scsi"),
                              atomic_write_max_bytes=RECORD_MAX)
                   for t in self.cfg.targets]
        host, port = self.cfg.portal
        from edge.auth import from_edge_config

        # Appends are queued; the target drains them before any response leaves,
        # so a write is in the log before the host hears it is done.
        self.target = IscsiTarget(targets, host, port, portal_address=self.cfg.advertise,
                                  authenticator=from_edge_config(self.cfg),
                                  barrier=self.bs.drain)
        src = self.cfg.source
        await listening(self.target.start(), self.cfg.portal, "[edge] portal", src)
        self._control = await listening(control.serve(*self.cfg.control, self._handlers()),
                                        self.cfg.control, "[edge] control", src)
        if self.cfg.witness:
            from witness.node import Witness

            auth = self.uplink.auth
            self.witness = Witness(self.cfg.name + "-witness", self.cfg.witness,
                                   self.cfg.witness_state_dir or
                                   os.path.join(self.cfg.blockstore, "witness"),
                                   keyring=auth.keyring if auth else None,
                                   listen_key=self.witness_key, source=src)
            await self.witness.start()
        if await metrics.start_http(self.cfg, self._http, lambda: [EdgeCollector(self)],
                                    self._console_view,
                                    lambda reg: commit_histogram(self, reg)) is not None:
            self._sampler = asyncio.get_running_loop().create_task(self._sample_seqs(),
                                                                   name="commit-lag")
        # Last: every port is ours by now, so a failed bind leaves no uplink task running
        # (one dialling a Core could swallow the cancel and keep the process alive).
        self.uplink.start()
        _log.info("edge_started", portal=format_addr(self.cfg.portal),
                  control=format_addr(self.cfg.control),
                  targets=[t.iqn for t in self.cfg.targets],
                  uncommitted_bytes=self.bs.uncommitted_bytes)

    async def stop(self) -> None:
        if self.target is not None:
            await self.target.close()
        if self._control is not None:
            self._control.close()
        if self._sampler is not None:
            self._sampler.cancel()
        for web in self._http:
            await web.stop()
        if self.witness is not None:
            await self.witness.stop()
        await self.uplink.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.bs.flush(), 10)
        self.bs.close()
        _log.info("edge_stopped", uncommitted_bytes=self.bs.uncommitted_bytes)

    def status(self) -> dict[str, Any]:
        bs = self.bs.status()
        return {
            "kind": "edge",  # which node's control port this is (coredr checks it)
            "name": self.cfg.name, "pid": os.getpid(), "portal": format_addr(self.cfg.portal),
            "uncommitted_bytes": bs["uncommitted_bytes"], "blockstore": bs,
            "core": self.uplink.status(),
            "targets": [{"iqn": t.iqn, "luns": [{"lun": lu.lun, "lun_id": lu.lun_id,
                                                "size": lu.size} for lu in t.luns]}
                        for t in self.cfg.targets],
            "luns": {str(lid): {"size": lu.size_bytes, "reads": lu.reads,
                                "read_misses": lu.read_misses, "bytes_read": lu.bytes_read,
                                "writes": lu.writes, "bytes_written": lu.bytes_written}
                     for lid, lu in self.luns.items()},
            "commit_lag_s": self.commit_lag() if self._sampler is not None else None,
            "iscsi": {"connections": self.target.connections if self.target is not None else 0},
            "witness": self.witness.status() if self.witness is not None else None,
            "uptime_s": round(time.time() - self.started, 1),
            "alarms": [*self.uplink.alarms(), *_blockstore_alarms(bs),
                       *(self.witness.status().get("alarms", []) if self.witness else [])],
        }

    async def _sample_seqs(self) -> None:
        while True:
            self._seq_samples.append((time.monotonic(), dict(self.bs.next_seq)))
            await asyncio.sleep(LAG_SAMPLE_S)

    def commit_lag(self) -> float:
        """Seconds since the oldest uncommitted write was made (0: nothing uncommitted).

        The write is younger than the last sample that had not yet seen its
        seq; that sample's age is the answer (an upper bound, to LAG_SAMPLE_S).
        """
        now = time.monotonic()
        lag = 0.0
        for lun, q in self.bs.pending.items():
            if not q:
                continue
            seq = q[0].seq
            before = None
            for t, seen in reversed(self._seq_samples):
                if seen.get(lun, 0) <= seq:
                    before = t
                    break
            if before is None:  # older than the history (or replayed from the log)
                before = self._seq_samples[0][0] if self._seq_samples else now
            lag = max(lag, now - before)
        return round(lag, 3)

    def _console_view(self) -> Any:
        from steelfusion.console import NodeView

        return NodeView("edge", self.cfg.name, self.status)

    def _handlers(self) -> dict[str, control.Handler]:
        async def status(_: dict[str, Any]) -> dict[str, Any]:
            return self.status()

        async def flush(_: dict[str, Any]) -> dict[str, Any]:
            await self.bs.flush()
            return {"uncommitted_bytes": self.bs.uncommitted_bytes}

        async def stop(_: dict[str, Any]) -> dict[str, Any]:
            asyncio.get_running_loop().call_later(0.05, self.stopping.set)
            return {"stopping": True}

        return {"status": status, "flush": flush, "stop": stop}


RESERVE_ALARM_PCT = 90.0  # alarm reserve_high above this much of the write reserve in use


def _blockstore_alarms(bs: dict[str, Any]) -> list[dict[str, Any]]:
    """The blockstore's state as alarms: a full reserve stalls hosts, a failure stops them."""
    out = []
    if bs["reserve_used_pct"] >= RESERVE_ALARM_PCT:
        out.append({"alarm": "reserve_high", "message": (
            f"write reserve {bs['reserve_used_pct']:.0f}% full ({bs['uncommitted_bytes']} of "
            f"{bs['reserve_bytes']} bytes uncommitted): host writes wait once it is full; "
            "check the Core connection (core_unreachable) or enlarge [edge] reserve")})
    if bs.get("failed"):
        out.append({"alarm": "blockstore_failed", "message": f"blockstore failed: {bs['failed']}; "
                    "host writes are refused until the Edge is restarted on working storage"})
    if bs.get("corrupt"):
        out.append({"alarm": "blockstore_corrupt", "message": f"write-log segments failed their "
                    f"CRC at start: {bs['corrupt']} (see the log)"})
    return out


async def run(cfg: EdgeConfig, witness_key: str = "[witness] listen") -> None:
    """``steelfusion edge run``; a failed start stops whatever it had started, then raises."""
    edge = Edge(cfg)
    edge.witness_key = witness_key
    await serve_until_stopped(edge)
