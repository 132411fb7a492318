"""Test helpers: start real Core and Witness processes (and labs) and speak the wire protocol
as an Edge would; wait for a condition; check a CLI's one-line refusal and that nothing a test
started is left."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steelfusion import control
from steelfusion.config import CoreConfig, WitnessConfig, write_toml
from steelfusion.lab import Lab, core_pair_configs, free_ports, pid_alive, spawn, wait_control
from steelfusion.link import Link, dial
from steelfusion.units import parse_addr
from steelfusion.wire import Ack, Hello, Message, Refuse, Welcome, Write

MiB = 1 << 20
SPAWNED: list[int] = []  # every node process a test started; conftest kills leftovers at the end


@contextlib.contextmanager
def lab_at(d: Path) -> Iterator[Lab]:
    """A Lab in ``d`` (the test brings it up), brought down afterwards if it came up."""
    lab = Lab(d)
    try:
        yield lab
    finally:
        if lab.file.exists():
            lab.down()


def status(addr: str | tuple[str, int]) -> dict[str, Any]:
    """A node's status over its control port (HOST:PORT or a tuple)."""
    return control.call(parse_addr(addr) if isinstance(addr, str) else addr, "status")


def alarms(addr: str | tuple[str, int]) -> set[str]:
    return {a["alarm"] for a in status(addr).get("alarms") or []}


def peer_linked(addr: str | tuple[str, int]) -> bool:
    """The Core at ``addr`` has an established outbound replication connection (to its peer)."""
    return any(c["established"] and c["direction"] == "out"
               for c in status(addr)["connections"]["replication"])


def pairing_refused(a: CoreProc, b: CoreProc, because: str) -> bool:
    """Both Cores of a pair raise the pairing_refused alarm, each naming ``because``."""
    alarms = status(a.cfg.control)["alarms"] + status(b.cfg.control)["alarms"]
    why = [x["message"] for x in alarms if x["alarm"] == "pairing_refused"]
    return len(why) == 2 and all(because in m for m in why)


def wait_for(pred: Any, timeout: float = 30, what: str = "", every: float = 0.1) -> Any:
    """Poll ``pred`` until it is truthy; a node that does not answer yet counts as not yet."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = pred()
        except (OSError, control.ControlError) as e:
            last = e
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {last!r})")
        time.sleep(every)


def why_no_netns() -> str | None:
    """Why the netns lab cannot run here (not root, no namespaces or /dev/net/tun), or None."""
    if os.geteuid() != 0:
        return "needs root"
    from steelfusion import netns

    return netns.available()


def refused(p: subprocess.CompletedProcess[str], *want: str) -> str:
    """Exit != 0, exactly one line on stderr (no traceback), naming what was wanted."""
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode != 0, (p.args, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    assert len(lines) == 1, p.stderr
    for w in want:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def procs_in(d: Path) -> list[str]:
    """Live processes whose command line names ``d`` (a lab's nodes and emulator), as
    ``"PID: command line"``."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (p / "stat").read_text().split(") ", 1)[1][:1]
        except OSError:
            continue
        if str(d) in cmd and state != "Z":
            out.append(f"{p.name}: {cmd}")
    return out


def kill_and_wait(pid: int, sig: int = signal.SIGKILL, timeout: float = 10) -> None:
    """Signal ``pid`` (if it is alive) and wait up to ``timeout`` seconds for it to end."""
    if pid and pid_alive(pid):
        os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)


@dataclass
class CoreProc:
    name: str
    cfg: CoreConfig
    path: Path
    workdir: Path
    pid: int = 0

    def start(self) -> None:
        self.pid = spawn("core", self.path, self.workdir, self.name)
        SPAWNED.append(self.pid)
        wait_control(self.cfg.control, self.pid, 30, self.name, self.workdir)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        kill_and_wait(self.pid, sig)

    def lun_bytes(self, lun: int) -> bytes:
        return Path(next(lu.path for lu in self.cfg.luns if lu.id == lun)).read_bytes()

    def log_events(self) -> str:
        return Path(self.cfg.log_file or "").read_text()


@dataclass
class WitnessProc:
    """A Witness process on loopback: its config written by :meth:`configure`, started,
    signalled and killed by the test."""

    cfg: WitnessConfig
    path: Path
    workdir: Path
    pid: int = 0

    @classmethod
    def configure(cls, tmp: Path, lease: float = 1.5) -> WitnessProc:
        """A Witness on two free ports, its state in ``tmp/witness`` (not started)."""
        p1, p2 = free_ports(2)
        cfg = WitnessConfig(name="witness", listen=("127.0.0.1", p1), control=("127.0.0.1", p2),
                            state_dir=str(tmp / "witness"), lease_seconds=lease,
                            log_file=str(tmp / "witness.log"))
        path = tmp / "witness.toml"
        write_toml(path, cfg.to_dict())
        return cls(cfg, path, tmp)

    @property
    def control(self) -> tuple[str, int]:
        assert self.cfg.control is not None
        return self.cfg.control

    def start(self, wait: bool = True) -> None:
        """Spawn it; with ``wait``, until it answers on its control port."""
        self.pid = spawn("witness", self.path, self.workdir, self.cfg.name)
        SPAWNED.append(self.pid)
        if wait:
            wait_control(self.control, self.pid, 30, self.cfg.name, self.workdir)

    def send_signal(self, sig: int) -> None:
        if self.pid and pid_alive(self.pid):
            os.kill(self.pid, sig)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        kill_and_wait(self.pid, sig)

    def status(self) -> dict[str, Any]:
        return status(self.control)

    def listening(self) -> bool:
        """It answers ``status`` now (no waiting)."""
        try:
            return bool(control.call(self.control, "status", timeout=0.5).get("ok"))
        except (OSError, ValueError, control.ControlError):
            return False


@contextlib.contextmanager
def running(*procs: CoreProc | WitnessProc) -> Iterator[None]:
    """Start ``procs`` in order; kill every one afterwards, whatever happened."""
    try:
        for p in procs:
            p.start()
        yield
    finally:
        for p in procs:
            p.kill()


def make_cores(tmp: Path, luns: dict[int, int], replica_luns: dict[int, int] | None = None,
               with_peer: bool = True, witness: tuple[str, int] | None = None,
               journal_size: int | None = None, initial_sync: bool = False,
               ha: tuple[str, str] = ("none", "none"), **common: Any) -> tuple[CoreProc, CoreProc]:
    """A Core pair with fast heartbeats; a journal only when ``journal_size`` is given."""
    cfgs = core_pair_configs(tmp, luns, replica_luns=replica_luns, with_peer=with_peer,
                             journal=journal_size is not None, journal_size=journal_size,
                             per_core=({"ha": ha[0]}, {"ha": ha[1]}), ping_interval=0.3,
                             dead_after=2.0, initial_sync=initial_sync, witness=witness,
                             **common)
    out = []
    for cfg in cfgs:
        path = tmp / f"{cfg.name}.toml"
        write_toml(path, cfg.to_dict())
        out.append(CoreProc(cfg.name, cfg, path, tmp))
    return out[0], out[1]


@dataclass
class FakeEdge:
    """Speaks the Edge side of the wire protocol; records ACKs and refusals."""

    name: str
    stream: int
    luns: dict[int, int]
    link: Link | None = None
    acked: dict[int, int] = field(default_factory=dict)
    refused: Refuse | None = None
    welcome: Welcome | None = None
    event: asyncio.Event = field(default_factory=asyncio.Event)
    epoch: int = 0

    async def connect(self, addr: tuple[str, int], timeout: float = 5.0) -> bool:
        def on_message(link: Link, msg: Message) -> None:
            if isinstance(msg, Ack):
                self.acked[msg.lun] = max(self.acked.get(msg.lun, 0), msg.seq)
            elif isinstance(msg, Refuse):
                self.refused = msg
            elif isinstance(msg, Welcome):
                self.welcome = msg
            self.event.set()

        self.link = await dial(*addr, Hello(self.name, "edge", "edge", self.epoch, self.luns,
                                            {"stream": self.stream}),
                               on_message, lambda lk, e: self.event.set(), name="fake-edge")
        deadline = asyncio.get_running_loop().time() + timeout
        while self.welcome is None and self.refused is None:
            self.event.clear()
            await asyncio.wait_for(self.event.wait(), deadline - asyncio.get_running_loop().time())
        return self.welcome is not None

    def write(self, lun: int, seq: int, offset: int, data: bytes, prev: int = 0) -> None:
        assert self.link is not None
        self.link.send(Write(lun, 0, self.stream, seq, offset, data, prev))

    async def wait_acked(self, lun: int, seq: int, timeout: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while self.acked.get(lun, 0) < seq:
            self.event.clear()
            await asyncio.wait_for(self.event.wait(), deadline - asyncio.get_running_loop().time())

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
