"""The embedded default: a whole FusionSync topology on loopback, one process per node.

``steelfusion lab up`` writes one TOML config per node into the lab folder,
starts a Witness, the primary Core, the secondary Core and the Edges (in that
order), waits until every Edge is connected to the primary and the Cores are
replicating, and records what it started in ``lab.json``. Every node's log is
a JSON-lines file in the same folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from journal import required_size
from steelfusion import control
from steelfusion.atomic import atomic_write
from steelfusion.authconfig import make_key_file
from steelfusion.config import (
    CoreConfig,
    EdgeConfig,
    EdgeLunConfig,
    LunConfig,
    TargetConfig,
    WitnessConfig,
    write_toml,
)
from steelfusion.units import format_addr, parse_addr

IQN_PREFIX = "iqn.2026-11.io.steelfusion"


class LabError(Exception):
    """The lab could not be started, found or changed; the message says what to do."""


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Ports the kernel hands out now (held together so they are distinct)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _python() -> str:
    return sys.executable


def spawn(role: str, config: Path, workdir: Path, name: str) -> int:
    """Start one node detached from this process (so ``lab up`` can return)."""
    out = open(workdir / f"{name}.out", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [_python(), "-m", "steelfusion.cli", role, "run", "--config", str(config), "--quiet"],
        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True, cwd=str(workdir), env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out.close()
    return proc.pid


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as dead
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


def wait_control(addr: tuple[str, int], pid: int, timeout: float, name: str,
                 workdir: Path) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            tail = ""
            with contextlib.suppress(OSError):
                tail = (workdir / f"{name}.out").read_text()[-2000:]
            raise LabError(f"{name} (pid {pid}) exited during start-up; its output:\n{tail}")
        try:
            reply = control.call(addr, "status", timeout=2)
            if reply.get("ok"):
                return reply
            last = str(reply.get("error"))
        except (OSError, ValueError, control.ControlError) as e:
            last = str(e)
        time.sleep(0.05)
    raise LabError(f"{name} did not answer on {format_addr(addr)} within {timeout:.0f}s ({last})")


def core_pair_configs(d: Path, luns: dict[int, int], *, names: tuple[str, str] = ("core-a", "core-b"),
                      host: str = "127.0.0.1", ports: Iterator[int] | None = None,
                      replica_luns: dict[int, int] | None = None, with_peer: bool = True,
                      journal: bool = True, journal_size: int | None = None,
                      per_core: tuple[dict[str, Any], dict[str, Any]] = ({}, {}),
                      **common: Any) -> tuple[CoreConfig, CoreConfig]:
    """A primary and a secondary Core peered on loopback, their files under ``d``.

    ``luns`` maps LUN id -> size (``replica_luns`` overrides it for the
    secondary); each Core gets a sparse journal of the seed's required size
    unless ``journal`` is off; ``common`` and ``per_core`` are CoreConfig fields.
    """
    it = ports if ports is not None else iter(free_ports(4, host))
    addrs = [((host, next(it)), (host, next(it))) for _ in names]
    out = []
    for i, name in enumerate(names):
        sizes = luns if i == 0 or replica_luns is None else replica_luns
        out.append(CoreConfig(
            name=name, role="primary" if i == 0 else "secondary", listen=addrs[i][0],
            control=addrs[i][1], state_dir=str(d / name),
            luns=tuple(LunConfig(k, str(d / name / f"lun-{k}.img"), v) for k, v in sizes.items()),
            peer=addrs[1 - i][0] if with_peer else None, interfaces=(host,),
            journal_path=str(d / name / "journal.img") if journal else None,
            journal_size=(journal_size or required_size(len(sizes))) if journal else 0,
            log_file=str(d / f"{name}.log"), **common, **per_core[i]))
    return out[0], out[1]


class Lab:
    """A lab folder: its ``lab.json`` and the nodes it describes."""

    def __init__(self, workdir: str | Path) -> None:
        self.dir = Path(workdir).resolve()
        self.file = self.dir / "lab.json"

    # -- description ----------------------------------------------------------
    def load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.file.read_text())
        except FileNotFoundError:
            raise LabError(f"no lab in {self.dir} (no lab.json); run `steelfusion lab up "
                           f"--workdir {self.dir}` first") from None
        assert isinstance(data, dict)
        return data

    def save(self, data: dict[str, Any]) -> None:
        atomic_write(self.file, json.dumps(data, indent=2).encode())

    def nodes(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        w = data.get("witness")
        standalone = [w] if w and not w.get("embedded_in") else []
        return [*standalone, *data.get("cores", []), *data.get("edges", [])]

    def node(self, data: dict[str, Any], name: str) -> dict[str, Any]:
        for n in self.nodes(data):
            if n["name"] == name:
                return n
        names = ", ".join(n["name"] for n in self.nodes(data))
        raise LabError(f"no node {name!r} in this lab (nodes: {names})")

    # -- up -----------------------------------------------------------------------
    def up(self, luns: int = 1, lun_size: int = 1 << 30, edges: int = 1,
           reserve: int = 256 << 20, host: str = "127.0.0.1",
           timeout: float = 60.0, witness_lease: float = 3.0,
           witness_in_edge: bool = False, *, chap: tuple[str, str] | None = None,
           mutual_chap: tuple[str, str] | None = None,
           initiators: Sequence[str] | None = None,
           discovery_chap: tuple[str, str] | None = None) -> dict[str, Any]:
        """Start the lab. ``witness_in_edge`` runs the Witness inside edge-1 (seed: "A role
        assigned to one of the Edges") instead of as its own process.

        iSCSI security (RFC 7143 §12): ``chap`` (user, secret) makes every Edge
        target require CHAP, ``mutual_chap`` gives the targets credentials for
        mutual CHAP, ``initiators`` is an IQN allow-list for every target and
        ``discovery_chap`` protects discovery sessions.  Secrets go only into
        the 0600 node configs, never into ``lab.json``."""
        if self.file.exists():
            prev = self.load()
            alive = [n["name"] for n in self.nodes(prev) if pid_alive(n["pid"])]
            if alive:
                raise LabError(f"a lab is already running in {self.dir} ({', '.join(alive)}); "
                               "run `steelfusion lab down` first")
        if luns < 1 or edges < 1:
            raise LabError("a lab needs at least one Edge and one LUN per Edge")
        if lun_size <= 0 or lun_size % 4096:
            raise LabError(f"LUN size must be a positive multiple of 4 KiB, got {lun_size}")
        self.dir.mkdir(parents=True, exist_ok=True)
        d = self.dir
        nports = 2 + 2 * 2 + 2 * edges
        ports = iter(free_ports(nports, host))
        witness = WitnessConfig(name="witness", listen=(host, next(ports)),
                                control=(host, next(ports)), state_dir=str(d / "witness"),
                                lease_seconds=witness_lease, log_file=str(d / "witness.log"))
        lun_ids = list(range(1, luns * edges + 1))
        cores = core_pair_configs(
            d, dict.fromkeys(lun_ids, lun_size), host=host, ports=ports,
            witness=witness.listen, pair="lab-pair",
            # both LUN files are created empty (all zeros) together: already in sync
            initial_sync=False)
        edge_cfgs = []
        for e in range(edges):
            name = f"edge-{e + 1}"
            ids = lun_ids[e * luns:(e + 1) * luns]
            target = TargetConfig(iqn=f"{IQN_PREFIX}:{name}",
                                  luns=tuple(EdgeLunConfig(k, lid, lun_size)
                                             for k, lid in enumerate(ids)), alias=name,
                                  chap_user=chap[0] if chap else None,
                                  chap_secret=chap[1] if chap else None,
                                  mutual_user=mutual_chap[0] if mutual_chap else None,
                                  mutual_secret=mutual_chap[1] if mutual_chap else None,
                                  initiators=tuple(initiators) if initiators is not None
                                  else None)
            embed = witness_in_edge and e == 0
            edge_cfgs.append(EdgeConfig(
                discovery_chap_user=discovery_chap[0] if discovery_chap else None,
                discovery_chap_secret=discovery_chap[1] if discovery_chap else None,
                name=name, portal=(host, next(ports)), control=(host, next(ports)),
                blockstore=str(d / name / "blockstore"),
                cores=tuple(c.listen for c in cores), targets=(target,), reserve_bytes=reserve,
                log_file=str(d / f"{name}.log"),
                witness=witness.listen if embed else None,
                witness_state_dir=str(d / "witness") if embed else None))

        data: dict[str, Any] = {"version": 1, "workdir": str(d), "created": time.time()}
        # every node proves one shared key to the others (steelfusion/nodeauth.py)
        auth = {"auth": {"key_file": make_key_file(d / "node.key"), "key_id": "lab"}}
        if not witness_in_edge:
            wpath = d / "witness.toml"
            write_toml(wpath, {**witness.to_dict(), **auth})
            wpid = spawn("witness", wpath, d, "witness")
            data["witness"] = {"name": "witness", "pid": wpid,
                               "address": format_addr(witness.listen),
                               "control": format_addr(witness.control or witness.listen),
                               "config": str(wpath), "role": "witness"}
            self.save(data)
            wait_control(witness.control or witness.listen, wpid, timeout, "witness", d)
        data["cores"] = []
        for c in cores:
            path = d / f"{c.name}.toml"
            write_toml(path, {**c.to_dict(), **auth})
            pid = spawn("core", path, d, c.name)
            data["cores"].append({"name": c.name, "pid": pid, "control": format_addr(c.control),
                                  "listen": format_addr(c.listen), "role": c.role,
                                  "config": str(path), "log": c.log_file,
                                  "luns": {str(lu.id): lu.path for lu in c.luns},
                                  "journal": c.journal_path})
            self.save(data)
            wait_control(c.control, pid, timeout, c.name, d)
        data["edges"] = []
        for ec in edge_cfgs:
            path = d / f"{ec.name}.toml"
            write_toml(path, {**ec.to_dict(), **auth})
            pid = spawn("edge", path, d, ec.name)
            data["edges"].append({
                "name": ec.name, "pid": pid, "portal": format_addr(ec.portal),
                "control": format_addr(ec.control), "config": str(path), "log": ec.log_file,
                "role": "edge",
                "targets": [{"iqn": t.iqn, "lun": lu.lun, "lun_id": lu.lun_id, "size": lu.size,
                             "url": f"iscsi://{format_addr(ec.portal)}/{t.iqn}/{lu.lun}"}
                            for t in ec.targets for lu in t.luns]})
            self.save(data)
            wait_control(ec.control, pid, timeout, ec.name, d)
            if ec.witness:
                data["witness"] = {"name": ec.name, "pid": pid,
                                   "address": format_addr(ec.witness),
                                   "control": format_addr(ec.control), "config": str(path),
                                   "role": "witness", "embedded_in": ec.name}
                self.save(data)
        self.wait_ready(data, timeout)
        return data

    def wait_ready(self, data: dict[str, Any], timeout: float = 60.0) -> None:
        """Until every Edge is connected to a Core and the primary is replicating."""
        deadline = time.monotonic() + timeout
        why = ""
        while time.monotonic() < deadline:
            st = self.status(data)
            prim = [c for c in st["cores"] if c.get("role") == "primary"]
            edges_ok = all(e.get("core_connected") for e in st["edges"])
            repl_ok = bool(prim) and prim[0].get("replication") == "running"
            if edges_ok and repl_ok:
                return
            why = f"edges connected: {edges_ok}, replication: {prim[0].get('replication') if prim else 'no primary'}"
            time.sleep(0.1)
        raise LabError(f"lab not ready after {timeout:.0f}s ({why}); see the logs in {self.dir}")

    # -- status -----------------------------------------------------------------
    def status(self, data: dict[str, Any] | None = None) -> dict[str, Any]:
        data = data or self.load()

        def ask(node: dict[str, Any]) -> dict[str, Any]:
            if not pid_alive(node["pid"]):
                return {"name": node["name"], "running": False, "pid": node["pid"]}
            try:
                reply = control.call(parse_addr(node["control"]), "status", timeout=3)
            except (OSError, ValueError, control.ControlError) as e:
                return {"name": node["name"], "running": True, "pid": node["pid"],
                        "error": str(e)}
            reply.pop("ok", None)
            return {"running": True, **reply}

        cores = []
        for c in data.get("cores", []):
            s = ask(c)
            cores.append({"name": c["name"], "pid": c["pid"], "running": s.get("running"),
                          "role": s.get("role", c.get("role")),
                          "replication": s.get("replication", "down"),
                          "epoch": s.get("epoch"), "connections": s.get("connections"),
                          "alarms": s.get("alarms", []), "luns": s.get("luns", {})})
        edges = []
        for e in data.get("edges", []):
            s = ask(e)
            core = s.get("core") or {}
            edges.append({"name": e["name"], "pid": e["pid"], "running": s.get("running"),
                          "uncommitted_bytes": s.get("uncommitted_bytes"),
                          "core_connected": bool(core.get("connected")),
                          "core": core.get("core"), "blockstore": s.get("blockstore"),
                          "portal": e["portal"]})
        w = data.get("witness")
        witness = ask(w) if w else {}
        return {"workdir": str(self.dir), "witness": witness, "cores": cores, "edges": edges}

    # -- kill / start / down -------------------------------------------------------
    def kill(self, name: str, sig: int = signal.SIGKILL) -> dict[str, Any]:
        data = self.load()
        node = self.node(data, name)
        if pid_alive(node["pid"]):
            os.kill(node["pid"], sig)
            deadline = time.monotonic() + 10
            while pid_alive(node["pid"]) and time.monotonic() < deadline:
                time.sleep(0.02)
        return node

    def start(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        data = self.load()
        node = self.node(data, name)
        if pid_alive(node["pid"]):
            raise LabError(f"{name} is already running (pid {node['pid']})")
        role = "core" if node in data["cores"] else "edge" if node in data["edges"] else "witness"
        node["pid"] = spawn(role, Path(node["config"]), self.dir, name)
        self.save(data)
        wait_control(parse_addr(node["control"]), node["pid"], timeout, name, self.dir)
        return node

    def down(self, timeout: float = 15.0) -> list[str]:
        data = self.load()
        stopped = []
        for node in reversed(self.nodes(data)):  # Edges first, so they flush to the Core
            if pid_alive(node["pid"]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node["pid"], signal.SIGTERM)
                stopped.append(node["name"])
        deadline = time.monotonic() + timeout
        for node in self.nodes(data):
            while pid_alive(node["pid"]) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(node["pid"]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node["pid"], signal.SIGKILL)
        return stopped

    def wait_committed(self, timeout: float = 120.0, edges: list[str] | None = None) -> float:
        """Wait until the Edges hold nothing uncommitted; returns the seconds it took."""
        t0 = time.monotonic()
        while True:
            st = self.status()
            pending = {e["name"]: e["uncommitted_bytes"] for e in st["edges"]
                       if (edges is None or e["name"] in edges)}
            if all(v == 0 for v in pending.values()):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise LabError(f"still uncommitted after {timeout:.0f}s: {pending}")
            time.sleep(0.05)
