"""``steelfusion bench``: the Edge (with the whole synchronous chain behind it) beside tgt.

Both targets run on this machine in the same run and get the same
``qemu-img bench`` workloads (libiscsi initiator) alternately, A B A B…, so
drift on a shared machine hits both alike; we report per workload each
side's median, the ratio, and for the Edge the commit lag (time until it
holds nothing uncommitted, i.e. everything is durable on both Cores).

Speed is measured here, never asserted in tests (a ``--quick`` smoke run is).

This module is the loopback benchmark and what the WAN benchmark
(:mod:`steelfusion.benchwan`, ``bench --wan``) shares with it: tgtd
(:class:`TgtServer`), :class:`BenchError`, the ``--workload`` choice and the
clean stop on SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steelfusion.initiator import InitiatorError, need, qemu_bench
from steelfusion.lab import Lab, free_ports, pid_alive
from steelfusion.san import TgtAdm, free_tgt_control_port, release_tgt_control_port
from steelfusion.units import format_size

if TYPE_CHECKING:
    from steelfusion.config import CoreConfig


class BenchError(Exception):
    """A benchmark option or precondition is wrong; the message says which and what to do."""


@dataclass(frozen=True)
class Workload:
    name: str
    write: bool
    block: int
    depth: int
    count: int


WORKLOADS = [
    Workload("4K write QD32", True, 4096, 32, 60000),
    Workload("4K write QD1", True, 4096, 1, 10000),
    Workload("128K write QD8", True, 128 * 1024, 8, 6000),
    Workload("4K read QD32", False, 4096, 32, 60000),
]


class TgtServer:
    """tgtd serving one file LUN on its own port, with its own management port.

    ``netns`` starts tgtd inside that network namespace, listening on
    ``host`` there (the WAN benchmark's tgt in the data center). tgtadm
    still works from here: tgtd's management socket is a file,
    ``/var/run/tgtd/socket.CTL``, which every namespace shares, so each
    tgtd gets a management port no other tgtd holds (:func:`free_tgt_control_port`).
    """

    IQN = "iqn.2026-11.io.steelfusion:bench-tgt"

    def __init__(self, workdir: Path, size: int, *, host: str = "127.0.0.1",
                 port: int | None = None, netns: str | None = None, name: str = "tgt") -> None:
        self.dir = workdir
        self.size = size
        self.host = host
        self.netns = netns
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = port if port is not None else free_ports(1, host)[0]
        self.ctl = free_tgt_control_port()
        self.lun = workdir / f"{name}-lun.img"
        self.log = workdir / f"{name}d.log"

    @property
    def portal(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"iscsi://{self.portal}/{self.IQN}/1"


    def start(self) -> None:
        with open(self.lun, "wb") as f:
            f.truncate(self.size)
        enter = None
        if self.netns:
            from steelfusion import netns as ns_mod

            try:
                enter = ns_mod.preexec(self.netns)
            except OSError as e:
                raise InitiatorError(f"cannot start tgtd in network namespace {self.netns}: "
                                     f"{e}") from None
        log = open(self.log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [need("tgtd"), "-f", "-C", str(self.ctl), "--iscsi", f"portal={self.portal}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=enter)
        log.close()
        adm = TgtAdm(self.ctl)
        deadline = time.monotonic() + 15
        while not adm.ready():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise InitiatorError(f"tgtd (portal {self.portal}, control port "
                                     f"{self.ctl}) did not start; see {self.log}")
            time.sleep(0.1)
        adm.create_target(self.IQN)
        adm.add_lun(self.IQN, 1, str(self.lun))
        adm.allow(self.IQN, None)

    def stop(self) -> None:
        """Shut tgtd down the way it listens to (``--mode system --op delete``: it ignores
        SIGTERM), SIGKILL if that does not end it."""
        if self.proc is not None and self.proc.poll() is None:
            TgtAdm(self.ctl).shutdown()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        release_tgt_control_port(self.ctl)


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Row:
    workload: Workload
    edge: list[float] = field(default_factory=list)  # IOPS per round
    tgt: list[float] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        e = statistics.median(self.edge) if self.edge else 0.0
        t = statistics.median(self.tgt) if self.tgt else 0.0
        b = self.workload.block
        return {"workload": self.workload.name, "edge_iops": round(e), "tgt_iops": round(t),
                "edge_mb_s": round(e * b / 1e6, 1), "tgt_mb_s": round(t * b / 1e6, 1),
                "ratio": round(e / t, 3) if t else None,
                "commit_lag_s": round(statistics.median(self.lag), 3) if self.lag else None,
                "edge_runs": [round(x) for x in self.edge], "tgt_runs": [round(x) for x in self.tgt]}


def quick_scale(quick: bool) -> int:
    """How much less I/O a ``--quick`` run does."""
    return 20 if quick else 1


def scaled_workloads(only: list[str] | None, quick: bool) -> list[Workload]:
    """The workloads to run (all, or those named), with ``--quick``'s smaller counts."""
    scale = quick_scale(quick)
    return [Workload(w.name, w.write, w.block, w.depth, max(200, w.count // scale))
            for w in WORKLOADS if not only or w.name in only]


def precondition_luns(targets: list[tuple[str, str, Lab | None]], lun_size: int, scale: int,
                      log: Any) -> None:
    """SNIA-style preconditioning: write every block of each ``(side, url, lab)`` once, so
    no round pays for first-touch allocation (fresh sparse files, fresh page-cache pages)
    that the other side already paid for in an earlier round; a lab's Edge is then waited
    for until it holds nothing uncommitted."""
    chunk = 1 << 20
    count = max(1, lun_size // chunk // scale)
    for side, url, lab in targets:
        t0 = time.monotonic()
        qemu_bench(url, write=True, block=chunk, depth=8, count=count)
        if lab is not None:
            lab.wait_committed(timeout=600)
        log(f"preconditioned {side}: {format_size(count * chunk)} written in "
            f"{time.monotonic() - t0:.1f}s")


def _core_pair(wd: Path, lun_size: int,
               initial_sync: bool) -> tuple[list[CoreConfig], list[int]]:
    """Two Cores (no Edge, no Witness) for the replication measurements."""
    from steelfusion.config import write_toml
    from steelfusion.lab import core_pair_configs, spawn, wait_control

    wd.mkdir(parents=True, exist_ok=True)
    cfgs = list(core_pair_configs(wd, {1: lun_size}, names=("bench-core-a", "bench-core-b"),
                                  initial_sync=initial_sync, pair="bench"))
    pids = []
    for cfg in cfgs:
        path = wd / f"{cfg.name}.toml"
        write_toml(path, cfg.to_dict())
        pid = spawn("core", path, wd, cfg.name)
        wait_control(cfg.control, pid, 30, cfg.name, wd)
        pids.append(pid)
    return cfgs, pids


def _stop(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for pid in pids:
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _wait(pred: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise InitiatorError("timed out during a replication measurement")
        time.sleep(0.02)


def replication_throughput(wd: Path, total: int, write: int = 512 * 1024,
                           window: int = 32 << 20) -> float:
    """MB/s of writes through primary -> secondary, both durable, seen as an Edge sees it.

    A wire-level writer streams ``write``-byte WRITEs (the seed's largest payload)
    to the primary with ``window`` bytes in flight and counts cumulative ACKs.
    """
    import asyncio

    from steelfusion import control
    from steelfusion.link import dial
    from steelfusion.wire import Ack, Hello, Write

    size = max(total, 64 << 20)
    cfgs, pids = _core_pair(wd / "repl", size, initial_sync=False)
    try:
        _wait(lambda: control.call(cfgs[0].control, "status")["replication"] == "running", 30)

        async def run() -> float:
            acked = 0
            done = asyncio.Event()
            wake = asyncio.Event()
            n = total // write

            def on_msg(_: Any, m: Any) -> None:
                nonlocal acked
                if isinstance(m, Ack):
                    acked = m.seq
                    wake.set()
                    if acked >= n:
                        done.set()

            link = await dial(*cfgs[0].listen, Hello("bench-writer", "edge", "edge", 0,
                                                     {1: size}, {}), on_msg, lambda *_: None)
            data = os.urandom(write)
            t0 = time.monotonic()
            for seq in range(1, n + 1):
                while (seq - acked) * write > window:
                    wake.clear()
                    await wake.wait()
                link.send(Write(1, 0, 77, seq, ((seq - 1) * write) % size, data))
                if seq % 16 == 0:
                    await asyncio.sleep(0)
            await asyncio.wait_for(done.wait(), 300)
            el = time.monotonic() - t0
            link.close()
            return n * write / el / 1e6

        return asyncio.run(run())
    finally:
        _stop(pids)


def resync_throughput(wd: Path, size: int) -> float:
    """MB/s of a resync (the initial sync of a new pair), 128 KiB payloads, the seed's path."""
    from steelfusion import control

    a = wd / "resync" / "bench-core-a"
    a.mkdir(parents=True, exist_ok=True)
    with open(a / "lun-1.img", "wb") as f:
        chunk = os.urandom(4 << 20)
        for _ in range(size // len(chunk)):
            f.write(chunk)
    cfgs, pids = _core_pair(wd / "resync", size, initial_sync=True)
    try:
        t0 = time.monotonic()

        def synced() -> bool:
            st = control.call(cfgs[0].control, "status")
            return bool(st["peer"].get("synced")) and st["replication"] == "running"

        _wait(synced, 600)
        return size / (time.monotonic() - t0) / 1e6
    finally:
        _stop(pids)


def rss_big_lun(wd: Path, lun_size: int = 1 << 40) -> dict[str, int]:
    """RSS of every node of a lab whose LUN is ``lun_size`` (sparse), after some I/O."""
    from steelfusion.initiator import qemu_write

    lab = Lab(wd / "biglab")
    started = False
    try:
        data = lab.up(luns=1, lun_size=lun_size, edges=1)
        started = True
        src = wd / "big-src.raw"
        src.write_bytes(os.urandom(16 << 20))
        qemu_write(src, data["edges"][0]["targets"][0]["url"])
        lab.wait_committed(timeout=120)
        return {n["name"]: rss_bytes(n["pid"]) for n in [*data["cores"], *data["edges"]]}
    finally:
        if started:  # only a lab this run started: never one already in the folder
            lab.down()


def run_bench(workdir: str | None, rounds: int, quick: bool, lun_size: int,
              only: list[str] | None = None, log: Any = print,
              extras: bool = True, precondition: bool = True,
              san: str | None = None) -> dict[str, Any]:
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="steelfusion-bench-")
        workdir = tmp
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    lab = Lab(wd / "lab")
    tgt = TgtServer(wd, lun_size)
    scale = quick_scale(quick)
    rows = [Row(w) for w in scaled_workloads(only, quick)]
    result: dict[str, Any] = {}
    started = False
    try:
        arrays = f", the Cores' LUNs on {san} arrays" if san else ""
        log(f"starting lab (Witness, 2 Cores, 1 Edge, LUN {format_size(lun_size)}{arrays}) "
            "and tgt")
        data = lab.up(luns=1, lun_size=lun_size, edges=1, san=san)
        started = True
        tgt.start()
        edge_url = data["edges"][0]["targets"][0]["url"]
        if precondition:
            precondition_luns([("edge", edge_url, lab), ("tgt", tgt.url, None)], lun_size,
                              scale, log)
        for r in range(rounds):
            for row in rows:
                w = row.workload
                for side in ("edge", "tgt"):
                    url = edge_url if side == "edge" else tgt.url
                    res = qemu_bench(url, write=w.write, block=w.block, depth=w.depth,
                                     count=w.count)
                    getattr(row, side).append(res.iops)
                    if side == "edge" and w.write:
                        row.lag.append(lab.wait_committed(timeout=600))
                    log(f"round {r + 1}/{rounds} {w.name:<15} {side:<4} {res.iops:>9.0f} IOPS "
                        f"{res.mb_s:>8.1f} MB/s")
        st = lab.status()
        pids = {n["name"]: n["pid"] for n in [*data["cores"], *data["edges"]]}
        result = {
            "rounds": rounds, "quick": quick, "lun_size": lun_size,
            "preconditioned": precondition, "san": san,
            "workloads": [row.summary() for row in rows],
            "rss_bytes": {name: rss_bytes(pid) for name, pid in pids.items()},
            "replication": {c["name"]: c["replication"] for c in st["cores"]},
            "cpu_count": os.cpu_count(),
        }
    finally:
        tgt.stop()
        if started:  # only a lab this run started: never one already in the folder
            lab.down()
    try:
        if extras:
            _extras(result, wd, quick, log)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def _extras(result: dict[str, Any], wd: Path, quick: bool, log: Any) -> None:
    """Core->Core replication and resync throughput, and RSS with a huge sparse LUN."""
    mb = 64 if quick else 1024
    log(f"Core->Core replication: {mb} MiB of 512 KiB writes")
    result["core_replication_mb_s"] = round(replication_throughput(wd, mb << 20), 1)
    log(f"resync: initial sync of a {mb} MiB LUN")
    result["resync_mb_s"] = round(resync_throughput(wd, mb << 20), 1)
    result["resync_vs_replication"] = round(
        result["resync_mb_s"] / result["core_replication_mb_s"], 3)
    big = (1 << 30) if quick else (1 << 40)
    log(f"RSS with a {format_size(big)} sparse LUN")
    result["rss_big_lun_bytes"] = rss_big_lun(wd, big)
    result["big_lun_size"] = big


def render(result: dict[str, Any]) -> str:
    lines = [f"{'workload':<16} {'edge IOPS':>10} {'tgt IOPS':>10} {'edge MB/s':>10} "
             f"{'tgt MB/s':>9} {'ratio':>6} {'commit lag':>11}"]
    for w in result["workloads"]:
        lag = f"{w['commit_lag_s']:.2f}s" if w["commit_lag_s"] is not None else "-"
        ratio = f"{w['ratio']:.2f}" if w["ratio"] is not None else "-"
        lines.append(f"{w['workload']:<16} {w['edge_iops']:>10} {w['tgt_iops']:>10} "
                     f"{w['edge_mb_s']:>10} {w['tgt_mb_s']:>9} {ratio:>6} {lag:>11}")
    rss = ", ".join(f"{k} {format_size(v)}" for k, v in result["rss_bytes"].items())
    lines.append(f"RSS after the run: {rss}")
    if "core_replication_mb_s" in result:
        lines.append(f"Core->Core replication {result['core_replication_mb_s']} MB/s "
                     f"(512 KiB writes, durable on both); resync {result['resync_mb_s']} MB/s "
                     f"= {100 * result['resync_vs_replication']:.0f}% of it")
        big = ", ".join(f"{k} {format_size(v)}" for k, v in result["rss_big_lun_bytes"].items())
        lines.append(f"RSS with a {format_size(result['big_lun_size'])} sparse LUN: {big}")
    pre = "both LUNs preconditioned (written once), " if result.get("preconditioned") else ""
    cores = (f"two Cores on {result['san']} arrays over iSCSI" if result.get("san")
             else "two Cores")
    lines.append(f"{pre}medians of {result['rounds']} alternating rounds; edge = Edge with "
                 f"synchronous replication to {cores}; tgt = tgtd with a file LUN")
    return "\n".join(lines)


# -- shared with the WAN benchmark (steelfusion.benchwan) ------------------------------------


def select(names: list[str], only: list[str] | None) -> list[str]:
    """The workloads to run, in table order; an unknown name is refused with the list."""
    if not only:
        return names
    unknown = [n for n in only if n not in names]
    if unknown:
        raise BenchError(f"--workload {unknown[0]!r} is not a workload of this benchmark; "
                         f"choose from: {', '.join(repr(n) for n in names)}")
    return [n for n in names if n in only]


@contextlib.contextmanager
def stopped_cleanly(what: str = "lab and tgtd were") -> Iterator[None]:
    """SIGTERM and SIGHUP (``timeout``, a closed terminal) end the run like ^C: through
    every ``finally``, so the lab and tgtd (``what``) are stopped; then one line, not a
    traceback."""
    got: list[str] = []

    def interrupt(signum: int, _frame: Any) -> None:
        got.append(signal.Signals(signum).name)
        raise KeyboardInterrupt(got[0])

    def again(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(got[0])

    def swallowed(u: Any) -> None:
        # A signal that lands inside a callback Python cannot raise from (logging's at-fork
        # hook while a subprocess starts) is printed and dropped: raise it again just after.
        if isinstance(u.exc_value, KeyboardInterrupt) and got:
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            return
        hook(u)

    hook = sys.unraisablehook
    old = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    old[signal.SIGALRM] = signal.signal(signal.SIGALRM, again)
    sys.unraisablehook = swallowed
    try:
        yield
    except KeyboardInterrupt as e:
        why = str(e) or "SIGINT"
        raise BenchError(f"interrupted ({why}); the benchmark's {what} stopped") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        sys.unraisablehook = hook
        for sig, handler in old.items():
            signal.signal(sig, handler)


def main(workdir: str | None, rounds: int, quick: bool, lun_size: int, as_json: bool,
         only: list[str] | None, precondition: bool = True, san: str | None = None) -> int:
    if only:
        only = select([w.name for w in WORKLOADS], only)
    if rounds < 1:
        raise BenchError(f"--rounds must be at least 1, got {rounds}")
    for t in ("qemu-img", "tgtd", "tgtadm"):
        need(t)
    with stopped_cleanly():
        res = run_bench(workdir, rounds, quick, lun_size, only,
                        log=(lambda *_: None) if as_json else print, precondition=precondition,
                        extras=san is None, san=san)
    print(json.dumps(res, indent=2) if as_json else render(res))
    return 0


__all__ = ["WORKLOADS", "BenchError", "TgtServer", "Workload", "main", "precondition_luns",
           "quick_scale", "render", "run_bench", "scaled_workloads", "select", "stopped_cleanly"]
