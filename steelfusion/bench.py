"""``steelfusion bench``: the Edge (with the whole synchronous chain behind it) beside tgt.

Both targets run on this machine in the same run and get the same
``qemu-img bench`` workloads (libiscsi initiator) alternately, A B A B…, so
drift on a shared machine hits both alike; we report per workload each
side's median, the ratio, and for the Edge the commit lag (time until it
holds nothing uncommitted, i.e. everything is durable on both Cores).

Speed is measured here, never asserted in tests (a ``--quick`` smoke run is).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steelfusion.initiator import InitiatorError, need, qemu_bench
from steelfusion.lab import Lab, free_ports, pid_alive
from steelfusion.units import format_size


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
    """tgtd serving one file LUN on a loopback port, with its own management port."""

    IQN = "iqn.2026-11.io.steelfusion:bench-tgt"

    def __init__(self, workdir: Path, size: int) -> None:
        self.dir = workdir
        self.size = size
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = free_ports(1)[0]
        self.ctl = 20000 + os.getpid() % 10000

    @property
    def url(self) -> str:
        return f"iscsi://127.0.0.1:{self.port}/{self.IQN}/1"

    def _adm(self, *args: str) -> None:
        subprocess.run([need("tgtadm"), "-C", str(self.ctl), "--lld", "iscsi", *args],
                       check=True, capture_output=True, timeout=30)

    def start(self) -> None:
        lun = self.dir / "tgt-lun.img"
        with open(lun, "wb") as f:
            f.truncate(self.size)
        log = open(self.dir / "tgtd.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [need("tgtd"), "-f", "-C", str(self.ctl), "--iscsi",
             f"portal=127.0.0.1:{self.port}"], stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        log.close()
        deadline = time.monotonic() + 15
        while True:
            try:
                self._adm("--op", "new", "--mode", "target", "--tid", "1", "-T", self.IQN)
                break
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise InitiatorError(f"tgtd did not start; see {self.dir / 'tgtd.log'}") \
                        from None
                time.sleep(0.1)
        self._adm("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1",
                  "-b", str(lun))
        self._adm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                self._adm("--op", "delete", "--mode", "target", "--tid", "1", "--force")
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


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


def run_bench(workdir: str | None, rounds: int, quick: bool, lun_size: int,
              only: list[str] | None = None, log: Any = print) -> dict[str, Any]:
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="steelfusion-bench-")
        workdir = tmp
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    lab = Lab(wd / "lab")
    tgt = TgtServer(wd, lun_size)
    scale = 20 if quick else 1
    loads = [w for w in WORKLOADS if not only or w.name in only]
    rows = [Row(Workload(w.name, w.write, w.block, w.depth, max(200, w.count // scale)))
            for w in loads]
    result: dict[str, Any] = {}
    try:
        log(f"starting lab (Witness, 2 Cores, 1 Edge, LUN {format_size(lun_size)}) and tgt")
        data = lab.up(luns=1, lun_size=lun_size, edges=1)
        tgt.start()
        edge_url = data["edges"][0]["targets"][0]["url"]
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
            "workloads": [row.summary() for row in rows],
            "rss_bytes": {name: rss_bytes(pid) for name, pid in pids.items()},
            "replication": {c["name"]: c["replication"] for c in st["cores"]},
            "cpu_count": os.cpu_count(),
        }
    finally:
        tgt.stop()
        if lab.file.exists():
            lab.down()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


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
    lines.append(f"medians of {result['rounds']} alternating rounds; edge = Edge with synchronous "
                 "replication to two Cores; tgt = tgtd with a file LUN")
    return "\n".join(lines)


def main(workdir: str | None, rounds: int, quick: bool, lun_size: int, as_json: bool,
         only: list[str] | None) -> int:
    for t in ("qemu-img", "tgtd", "tgtadm"):
        need(t)
    res = run_bench(workdir, rounds, quick, lun_size, only,
                    log=(lambda *_: None) if as_json else print)
    print(json.dumps(res, indent=2) if as_json else render(res))
    return 0


__all__ = ["WORKLOADS", "TgtServer", "main", "pid_alive", "render", "run_bench"]
