"""``lab up --san tgt``: each data center gets a storage array, and its Core uses it (issue 12).

The array is ``steelfusion san run`` (steelfusion/san.py), one tgtd per data center.
``san-a`` sits beside core-a (in dc-a in a netns lab) and exports core-a's LUN files
and its Journal LUN; ``san-b`` does the same for core-b. The Cores' configs then name
``iscsi://`` URLs instead of files, so every write crosses iSCSI twice: host to Edge,
and Core to array. ``lab kill san-a`` is an outage of the primary's array. In an HA lab
(``lab up --ha``, steelfusion/labha.py) each array serves both Cores of its data center.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import time
from pathlib import Path
from typing import Any

from journal import required_size
from steelfusion import netns as ns_mod
from steelfusion.atomic import atomic_write
from steelfusion.config import CoreConfig
from steelfusion.labnet import CORE_SITES, site_address
from steelfusion.labproc import LabError, free_ports, last_error, pid_alive, spawn
from steelfusion.san import IQN_PREFIX, JOURNAL_LUN, SanConfig, SanLun, free_tgt_control_port
from steelfusion.units import format_addr, parse_addr

SAN_OF = {"core-a": "san-a", "core-b": "san-b"}
NS_SAN_PORT = 3261  # the array's portal on its data center's first address (netns lab)
KINDS = ("tgt",)


def san_configs(d: Path, cores: tuple[CoreConfig, CoreConfig], *, host: str, netns: bool
                ) -> tuple[list[SanConfig], tuple[CoreConfig, CoreConfig]]:
    """One array per Core holding its LUN files and Journal LUN, and the Cores' configs
    pointing at them."""
    sans: list[SanConfig] = []
    out: list[CoreConfig] = []
    for c in cores:
        name = SAN_OF[c.name]
        portal = ((site_address(CORE_SITES[c.name]), NS_SAN_PORT) if netns
                  else (host, free_ports(1, host)[0]))
        luns = [SanLun(lu.id, str(d / name / f"lun-{lu.id}.img"), lu.size) for lu in c.luns]
        luns.append(SanLun(JOURNAL_LUN, str(d / name / "journal.img"),
                           c.journal_size or required_size(len(c.luns))))
        san = SanConfig(name=name, portal=portal, control_port=free_tgt_control_port(),
                        iqn=f"{IQN_PREFIX}:{name}", luns=tuple(luns),
                        log_file=str(d / f"{name}.log"))
        sans.append(san)
        out.append(dataclasses.replace(
            c, luns=tuple(dataclasses.replace(lu, path=san.url(lu.id)) for lu in c.luns),
            journal_path=san.url(JOURNAL_LUN) if c.journal_path else None, journal_size=0))
    return sans, (out[0], out[1])


def start_sans(d: Path, sans: list[SanConfig], data: dict[str, Any], ns_of: dict[str, str | None],
               timeout: float, started: list[tuple[str, int]],
               cores_of: dict[str, tuple[str, ...]] | None = None) -> list[dict[str, Any]]:
    """Start each array (in its Core's namespace) and wait until its portal accepts.
    ``cores_of`` names the Cores each array serves (default: :data:`SAN_OF`'s one)."""
    nodes = []
    for san in sans:
        cores = (cores_of[san.name] if cores_of is not None
                 else tuple(k for k, v in SAN_OF.items() if v == san.name))
        core = cores[0]
        path = d / f"{san.name}.json"
        atomic_write(path, json.dumps(san.to_dict(), indent=2).encode(), mode=0o644)
        netns = ns_of.get(core)
        pid = spawn("san", path, d, san.name, netns)
        started.append((san.name, pid))
        node = {"name": san.name, "pid": pid, "role": "san", "core": core,
                "cores": list(cores), "config": str(path),
                "portal": format_addr(san.portal), "iqn": san.iqn,
                "luns": {str(lu.lun): lu.path for lu in san.luns}, "log": san.log_file,
                "netns": netns, **({"site": CORE_SITES[core]} if netns else {})}
        nodes.append(node)
        data.setdefault("sans", []).append(node)
        wait_portal(node, timeout, d)
    return nodes


def served(san: dict[str, Any]) -> list[str]:
    """The Cores an array node of ``lab.json`` serves (both of an HA pair's data center)."""
    cores = san.get("cores")
    return [str(c) for c in cores] if isinstance(cores, list) else [str(san.get("core"))]


def lun_files(data: dict[str, Any], core: dict[str, Any]) -> dict[int, str]:
    """The files that hold a Core's LUNs: its own paths, or its array's files for its own
    LUN ids (the Journal LUN, and an HA partner's LUNs, left out) when the lab has arrays."""
    san = next((s for s in data.get("sans", []) if core["name"] in served(s)), None)
    if san is None:
        return {int(k): v for k, v in core["luns"].items()}
    return {int(k): v for k, v in san["luns"].items()
            if int(k) != JOURNAL_LUN and k in core["luns"]}


def portal_open(node: dict[str, Any]) -> bool:
    """The array's portal accepts a TCP connection (asked from inside its namespace)."""
    host, port = parse_addr(node["portal"])
    ctx = ns_mod.in_netns(node["netns"]) if node.get("netns") else contextlib.nullcontext()
    with ctx:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            return False


def wait_portal(node: dict[str, Any], timeout: float, workdir: Path) -> None:
    deadline = time.monotonic() + timeout
    while not portal_open(node):
        if not pid_alive(node["pid"]):
            raise LabError(f"{node['name']} exited: {last_error(workdir, node['name'])}")
        if time.monotonic() > deadline:
            raise LabError(f"{node['name']} did not open its portal {node['portal']} within "
                           f"{timeout:.0f}s (see {workdir / (node['name'] + '.out')})")
        time.sleep(0.05)


def san_status(node: dict[str, Any]) -> dict[str, Any]:
    from steelfusion.labproc import node_alive

    running = node_alive(node)
    return {"name": node["name"], "core": node.get("core"), "cores": served(node),
            "pid": node["pid"],
            "portal": node["portal"], "running": running,
            "accepting": running and portal_open(node), "luns": node.get("luns", {})}
