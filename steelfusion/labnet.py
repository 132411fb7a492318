"""The netns lab's network: the address plan, link settings, namespaces and the WAN emulator.

``lab up --netns`` (root) puts the sites in network namespaces: the Edges (and the hosts) in
``branch``, core-a in ``dc-a``, core-b in ``dc-b`` and the Witness in ``witness``, each with
private addresses 10.99.SITE.PORT, the Cores with two replication interfaces each. The sites
reach each other only through the userspace WAN emulator (``steelfusion wan run``, the lab
node ``wan``, steelfusion/wanemu.py); :class:`WanLinks` is the part of
:class:`steelfusion.lab.Lab` that starts it and changes its links (``lab link``, ``lab
port``). The option parsers here speak tc's words (``30ms``, ``100mbit``, ``0.5%``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steelfusion import control
from steelfusion.atomic import atomic_write
from steelfusion.config import ConfigError, CoreConfig, EdgeConfig, WitnessConfig
from steelfusion.labproc import LabError, call_node, free_ports, node_alive, spawn, wait_control
from steelfusion.units import format_addr, parse_addr

# -- the netns lab's address plan (/tmp/netns_contract.md): site s, port k -> 10.99.s.(k+1)
SITES: dict[str, int] = {"branch": 0, "dc-a": 1, "dc-b": 2, "witness": 3}


SITE_PORTS: dict[str, int] = {"branch": 1, "dc-a": 2, "dc-b": 2, "witness": 1}


CORE_SITES: dict[str, str] = {"core-a": "dc-a", "core-b": "dc-b"}


WAN_MTU = 9000


# Fixed ports: every namespace is new, so nothing else holds them. Distinct across the
# lab all the same, so an address alone names one node.
NS_LISTEN = {"witness": 7000, "core-a": 7001, "core-b": 7002}


NS_CONTROL = {"witness": 7100, "core-a": 7101, "core-b": 7102}


NS_EDGE_CONTROL = 7110  # + Edge index


NS_PORTAL = 3260  # + Edge index


#: a namespace of this project: "sf" + the labid (6 hex) + "-" + site
NS_PATTERN = re.compile(r"^sf[0-9a-f]{6}-")


MAX_DELAY = 60.0  # seconds: longer is a cut, not a slow link


MAX_RATE = 1e12 / 8  # bytes/s (1000gbit): faster is "unlimited"


MIN_RATE = 1000.0  # bytes/s (8kbit): below it one 9000-byte packet takes longer than 9 s


_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"


_DURATION = re.compile(rf"^\s*{_NUMBER}\s*(us|ms|s)?\s*$", re.IGNORECASE)


_RATE = re.compile(rf"^\s*{_NUMBER}\s*([a-z]+)?\s*$", re.IGNORECASE)


_LOSS = re.compile(rf"^\s*{_NUMBER}\s*(%)?\s*$")


_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


#: bits per second (tc's words, SI: 1 kbit = 1000 bit) and bytes per second
RATE_UNITS: dict[str, float] = {"bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8,
                                "gbit": 1e9 / 8, "bps": 1.0, "kbps": 1e3, "mbps": 1e6,
                                "gbps": 1e9, "bytes": 1.0}


def parse_duration(text: str, option: str = "--delay") -> float:
    """``30ms``, ``0.5s``, ``250us`` -> seconds; a unit is required (except for 0)."""
    m = _DURATION.match(text)
    if not m:
        raise LabError(f"{option} {text!r} is not a duration: give a number with a unit, "
                       f"e.g. 30ms, 0.5s (0 for none)")
    value = float(m.group(1))
    if m.group(2) is None and value != 0:
        raise LabError(f"{option} {text!r} needs a unit: {text}ms or {text}s?")
    seconds = value * _DURATION_UNITS[(m.group(2) or "s").lower()]
    if seconds > MAX_DELAY:
        raise LabError(f"{option} {text!r} is more than {MAX_DELAY:g}s; for a link that "
                       f"passes nothing use --cut")
    return seconds


def parse_rate(text: str, option: str = "--rate") -> float:
    """``100mbit``, ``2gbit``, ``500kbps`` (bytes/s, tc's word) -> bytes/s; ``0`` or
    ``unlimited`` -> 0 (no limit)."""
    if text.strip().lower() in ("0", "unlimited", "none"):
        return 0.0
    m = _RATE.match(text)
    unit = (m.group(2) or "").lower() if m else ""
    if not m or unit not in RATE_UNITS:
        if m and not unit:
            raise LabError(f"{option} {text!r} needs a unit: e.g. {m.group(1)}mbit "
                           f"(bits/s: bit, kbit, mbit, gbit; bytes/s: bps, kbps, mbps, gbps)")
        raise LabError(f"{option} {text!r} is not a rate: give a number with a unit: bit, "
                       f"kbit, mbit, gbit (bits/s) or bps, kbps, mbps, gbps (bytes/s), e.g. "
                       f"100mbit; 0 or unlimited for no limit")
    rate = float(m.group(1)) * RATE_UNITS[unit]
    if rate == 0:
        return 0.0
    if rate > MAX_RATE:
        raise LabError(f"{option} {text!r} is more than 1000gbit; 0 or unlimited for no limit")
    if rate < MIN_RATE:
        raise LabError(f"{option} {text!r} is below 8kbit (1000 bytes/s), slower than any "
                       f"link can carry a 9000-byte packet in time; use --cut for none")
    return rate


def parse_loss(text: str, option: str = "--loss") -> float:
    """``0.5%`` -> 0.005; a percentage from 0% to 100%."""
    m = _LOSS.match(text)
    if not m:
        raise LabError(f"{option} {text!r} is not a percentage: e.g. 0.5% (0% to 100%)")
    value = float(m.group(1))
    if m.group(2) is None and value != 0:
        raise LabError(f"{option} {text!r} needs a % sign: {text}% (0% to 100%)")
    if value > 100:
        raise LabError(f"{option} {text!r} is more than 100%")
    return value / 100


def format_rate(rate: float) -> str:
    """Bytes/s as the operator writes it: 100mbit; 0 -> unlimited."""
    if not rate:
        return "unlimited"
    bits = rate * 8
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g}{unit}"
    return f"{bits:g}bit"


def format_duration(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def site_address(site: str, port: int = 0) -> str:
    """The address of ``site``'s port ``port`` (``dc-a``, 1 -> 10.99.1.2)."""
    return f"10.99.{SITES[site]}.{port + 1}"


def site_addresses(site: str) -> list[str]:
    return [site_address(site, k) for k in range(SITE_PORTS[site])]


def netns_configs(witness: WitnessConfig, cores: tuple[CoreConfig, CoreConfig],
                   edge_cfgs: list[EdgeConfig], witness_in_edge: bool
                   ) -> tuple[WitnessConfig, tuple[CoreConfig, CoreConfig], list[EdgeConfig]]:
    """The loopback lab's configs moved onto the sites' addresses (the address plan).

    Node ports face the WAN on their site's address; control ports stay on the
    namespace's own 127.0.0.1. Each Core replicates over both its site's ports.
    """
    w_addr = ((site_address("branch"), NS_LISTEN["witness"]) if witness_in_edge
              else (site_address("witness"), NS_LISTEN["witness"]))
    witness = dataclasses.replace(witness, listen=w_addr,
                                  control=("127.0.0.1", NS_CONTROL["witness"]))
    listen = {c.name: (site_address(CORE_SITES[c.name]), NS_LISTEN[c.name]) for c in cores}
    a, b = (dataclasses.replace(
        c, listen=listen[c.name], control=("127.0.0.1", NS_CONTROL[c.name]),
        peer=listen[other.name] if c.peer is not None else None,
        interfaces=tuple(site_addresses(CORE_SITES[c.name])),
        witness=w_addr if c.witness is not None else None)
        for c, other in ((cores[0], cores[1]), (cores[1], cores[0])))
    edge_out = [dataclasses.replace(
        ec, portal=(site_address("branch"), NS_PORTAL + i),
        control=("127.0.0.1", NS_EDGE_CONTROL + i), cores=(a.listen, b.listen),
        witness=w_addr if ec.witness is not None else None)
        for i, ec in enumerate(edge_cfgs)]
    return witness, (a, b), edge_out


def remove_namespaces(labid: str) -> list[str]:
    """Remove the namespaces of the lab ``labid`` (only its own: ``sf{labid}-*``)."""
    from steelfusion import netns as ns_mod

    prefix = ns_mod.lab_prefix(labid)
    if not NS_PATTERN.match(prefix):
        return []
    return ns_mod.remove_all(prefix)


def stale_namespaces(min_age: float = 120.0) -> list[str]:
    """Namespaces of this project that nothing uses any more (a crashed lab's or test's).

    A namespace counts as stale when its name is ``sf`` + 6 hex + ``-``, it is
    older than ``min_age`` seconds (a lab being started has it empty for a
    moment), no process runs in it and it holds no device but ``lo`` (a live
    emulator keeps its TUN devices there).
    """
    from steelfusion import netns as ns_mod

    in_use: set[int] = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                in_use.add(os.stat(p / "ns" / "net").st_ino)
    out = []
    now = time.time()
    for name in ns_mod.listing("sf"):
        if not NS_PATTERN.match(name):
            continue
        try:
            st = os.stat(ns_mod.path(name))
        except OSError:
            continue
        if st.st_ino in in_use or now - st.st_ctime < min_age:
            continue
        try:
            with ns_mod.in_netns(name):
                devices = [n for _, n in socket.if_nameindex() if n != "lo"]
        except OSError:
            continue
        if not devices:
            out.append(name)
    return out


def remove_stale_namespaces(min_age: float = 120.0) -> list[str]:
    """Remove what :func:`stale_namespaces` finds; returns their names."""
    from steelfusion import netns as ns_mod

    names = stale_namespaces(min_age)
    for n in names:
        ns_mod.remove(n)
    return names


class WanLinks:
    """The WAN emulator of a netns lab: start it, ask it, change its links.

    A part of :class:`steelfusion.lab.Lab` (its ``dir``, ``load`` and ``save``).
    """

    dir: Path

    def load(self) -> dict[str, Any]:
        raise NotImplementedError

    def save(self, data: dict[str, Any]) -> None:
        raise NotImplementedError

    def _net_plan(self, links: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        """The namespaces, addresses and emulator config of this folder's netns lab."""
        from steelfusion import netns as ns_mod
        from steelfusion.wanemu import WanConfig

        labid = ns_mod.labid_for(self.dir)
        sites = {site: {"netns": ns_mod.ns_name(labid, site), "addresses": site_addresses(site),
                        "ports": {f"{site}/{k}": a for k, a in enumerate(site_addresses(site))}}
                 for site in SITES}
        control_addr = ("127.0.0.1", free_ports(1)[0])
        wan = {"name": "wan", "control": format_addr(control_addr), "mtu": WAN_MTU, "seed": 0,
               "log_file": str(self.dir / "wan.log"),
               "sites": {s: {"netns": v["netns"], "ports": v["addresses"]}
                         for s, v in sites.items()},
               "links": [dict(ln) for ln in links]}
        try:  # the emulator would refuse a bad link at start: refuse it before anything runs
            WanConfig.parse(wan, "the links given to lab up")
        except ConfigError as e:
            raise LabError(str(e)) from None
        return {"labid": labid, "sites": sites, "wan": wan}

    def _start_wan(self, d: Path, net: dict[str, Any], data: dict[str, Any], timeout: float,
                   started: list[tuple[str, int]]) -> None:
        """Create the site namespaces and start the emulator that joins them."""
        from steelfusion import netns as ns_mod

        for site in net["sites"].values():
            try:
                ns_mod.remove(site["netns"])  # a crashed lab's: replaced by a clean one
                ns_mod.create(site["netns"])
            except OSError as e:
                raise LabError(str(e)) from None
        data.update({"netns": True, "labid": net["labid"], "sites": net["sites"]})
        path = d / "wan.json"
        atomic_write(path, json.dumps(net["wan"], indent=2).encode(), mode=0o644)
        pid = spawn("wan", path, d, "wan")
        started.append(("wan", pid))
        data["wan"] = {"name": "wan", "pid": pid, "control": net["wan"]["control"],
                       "config": str(path), "role": "wan", "log": net["wan"]["log_file"],
                       "netns": None, "mtu": net["wan"]["mtu"]}
        self.save(data)
        wait_control(parse_addr(net["wan"]["control"]), pid, timeout, "wan", d)

    def _wan_status(self, data: dict[str, Any]) -> dict[str, Any]:
        """The emulator's own status (links, ports, counters), or why there is none."""
        wan = data.get("wan") or {}
        base = {"name": "wan", "pid": wan.get("pid"), "control": wan.get("control")}
        if not wan or not node_alive(wan):
            return {**base, "running": False}
        try:
            reply = call_node(wan, "status", timeout=3)
        except (OSError, ValueError, control.ControlError) as e:
            return {**base, "running": True, "error": str(e)}
        reply.pop("ok", None)
        return {**reply, **base, "running": True}

    # -- WAN links (netns lab) ---------------------------------------------------------
    def _wan(self, data: dict[str, Any], what: str) -> dict[str, Any]:
        if not data.get("netns"):
            raise LabError(f"{what}: the lab in {self.dir} runs on loopback, where there are no "
                           f"WAN links; links exist only in a lab started with `steelfusion lab "
                           f"up --netns`")
        wan = data.get("wan")
        if not isinstance(wan, dict) or not node_alive(wan):
            self._check_namespaces(data, what)
            raise LabError(f"{what}: the WAN emulator (wan) is not running; `steelfusion lab "
                           f"start wan --workdir {self.dir}` first")
        return wan

    def _check_namespaces(self, data: dict[str, Any], what: str) -> None:
        """A netns lab's namespaces exist (``lab down`` removes them)."""
        from steelfusion import netns as ns_mod

        missing = [s["netns"] for s in (data.get("sites") or {}).values()
                   if isinstance(s, dict) and not ns_mod.exists(str(s.get("netns")))]
        if missing:
            raise LabError(f"{what}: the lab in {self.dir} is down (its network namespace "
                           f"{missing[0]} is gone: `lab down` removes them); `steelfusion lab "
                           f"up --netns --workdir {self.dir}` starts it again")

    def _wan_call(self, wan: dict[str, Any], what: str, cmd: str,
                  **args: Any) -> dict[str, Any]:
        try:
            reply = call_node(wan, cmd, timeout=5, **args)
        except (OSError, ValueError, control.ControlError) as e:
            raise LabError(f"{what}: the WAN emulator at {wan.get('control')} did not answer: "
                           f"{e}") from None
        if not reply.get("ok"):
            raise LabError(f"{what}: refused by the WAN emulator: {reply.get('error')}")
        reply.pop("ok", None)
        return reply

    def link(self, a: str, b: str, *, delay: float | None = None, jitter: float | None = None,
             rate: float | None = None, loss: float | None = None, cut: bool = False,
             heal: bool = False, one_way: bool = False) -> dict[str, Any]:
        """Change the link between sites ``a`` and ``b`` (both directions unless
        ``one_way``: then only a -> b); returns the emulator's reply.

        Settings left out keep their value; ``heal`` puts every setting back to
        its default (no delay, no limit, no loss, not cut)."""
        what = f"lab link {a} {b}"
        wan = self._link_check(a, b, what)
        if heal and (cut or any(v is not None for v in (delay, jitter, rate, loss))):
            raise LabError(f"{what}: --heal puts every setting back to its default; give it "
                           f"alone (with --one-way at most)")
        args: dict[str, Any] = {"a": a, "b": b, "one_way": one_way}
        for k, v in (("delay", delay), ("jitter", jitter), ("rate", rate), ("loss", loss)):
            if v is not None:
                args[k] = v
        if cut:
            args["cut"] = True
        if heal:
            args["heal"] = True
        out = self._wan_call(wan, what, "link", **args)
        self._keep_links(wan, what)
        return out

    def _keep_links(self, wan: dict[str, Any], what: str) -> None:
        """Write the emulator's links into its config, so a restarted emulator (``lab start
        wan``, a crash) keeps the partitions and WAN settings an operator or drill set."""
        from steelfusion.wanemu import PARAM_KEYS

        st = self._wan_call(wan, what, "status")
        path = Path(wan["config"])
        cfg = json.loads(path.read_text())
        cfg["links"] = [{"a": ln["src"], "b": ln["dst"], "one_way": True,
                         **{k: ln[k] for k in PARAM_KEYS if k in ln}}
                        for ln in st.get("links", [])]
        atomic_write(path, json.dumps(cfg, indent=2).encode(), mode=0o644)

    def _link_check(self, a: str, b: str, what: str) -> dict[str, Any]:
        """The emulator of this netns lab, once ``a`` and ``b`` are two of its sites."""
        data = self.load()
        wan = self._wan(data, what)
        sites = list(data.get("sites") or SITES)
        for s in (a, b):
            if s not in sites:
                raise LabError(f"{what}: no site {s!r} in this lab (sites: {', '.join(sites)})")
        if a == b:
            raise LabError(f"{what}: a link joins two different sites (sites: "
                           f"{', '.join(sites)})")
        return wan

    def links(self, a: str, b: str) -> list[dict[str, Any]]:
        """Both directions of the link between ``a`` and ``b``: settings and traffic."""
        what = f"lab link {a} {b}"
        wan = self._link_check(a, b, what)
        st = self._wan_call(wan, what, "status")
        order = {(a, b): 0, (b, a): 1}
        out = [ln for ln in st.get("links", []) if (ln.get("src"), ln.get("dst")) in order]
        return sorted(out, key=lambda ln: order[(ln["src"], ln["dst"])])

    def port(self, port: str, up: bool) -> dict[str, Any]:
        """Take one site interface (``dc-a/1``) down or up again."""
        data = self.load()
        what = f"lab port {port}"
        wan = self._wan(data, what)
        ports = [p for s in (data.get("sites") or {}).values() for p in s.get("ports", {})]
        if port not in ports:
            raise LabError(f"{what}: no port {port!r} in this lab (ports: {', '.join(ports)})")
        return self._wan_call(wan, what, "port", port=port, up=up)
