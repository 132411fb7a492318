"""The Linux-hosts topology (issue 11): one description for Vagrant and the UML lab.

``vagrant/topology.json`` names the hosts (branch-host + edge, dc-a: san-a + core-a, dc-b:
san-b + core-b, witness), their sites, their addresses on a private network per site plus
a WAN network, and the LUNs. The Vagrantfile reads it (Ruby's JSON) to define the VMs and
networks; this module reads it to write what each host runs: a node's
``/etc/steelfusion/NAME.toml`` (through the config dataclasses, so a topology that makes a
bad config is refused here), an array's ``steelfusion san create --config`` file, and a
branch host's open-iscsi settings. The provisioning scripts (``vagrant/provision/``) call
it as ``steelfusion-topology``; what the UML guests run is what Vagrant users run.

Secrets are not in the topology: ``vagrant/.secrets.json`` (0600, git-ignored) holds the
node key and one CHAP secret per host, made on first use by the Vagrantfile or by
``steelfusion-topology secrets``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets as random_secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from steelfusion.config import (
    ConfigError,
    CoreConfig,
    EdgeConfig,
    EdgeLunConfig,
    InitiatorChapConfig,
    LunConfig,
    TargetConfig,
    WitnessConfig,
)
from steelfusion.san import JOURNAL_LUN
from steelfusion.units import format_addr, parse_size

VAGRANT_DIR = Path(__file__).resolve().parent.parent / "vagrant"
DEFAULT = VAGRANT_DIR / "topology.json"
ROLES = ("witness", "san", "core", "edge", "initiator")
ETC = "/etc/steelfusion"
STATE = "/var/lib/steelfusion"
LOGS = "/var/log/steelfusion"
KEY_FILE = f"{ETC}/node.key"
SAN_DIR = "/srv/steelfusion"
CORE_INITIATOR = "iqn.2026-11.io.steelfusion:core"
"""The initiator name a Core sends to its array (steelfusion.sandev.INITIATOR_NAME: one for
every Core today, so an array's ACL tells Cores apart by their CHAP user)."""


class TopologyError(Exception):
    """The topology or secrets file is unusable; the message names the file and the key."""


@dataclass(frozen=True)
class Host:
    name: str
    site: str
    role: str
    addresses: dict[str, str]
    memory: int
    raw: dict[str, Any]

    def addr(self, net: str) -> str:
        return self.addresses[net]


@dataclass(frozen=True)
class Topology:
    path: Path
    iqn_prefix: str
    networks: dict[str, ipaddress.IPv4Network]
    ports: dict[str, int]
    luns: tuple[tuple[int, int], ...]  # (id, size)
    journal_size: int
    pair: str
    hosts: dict[str, Host]

    @classmethod
    def load(cls, path: str | Path = DEFAULT) -> Topology:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise TopologyError(f"{p}: cannot read the topology: {e}") from None

        def bad(msg: str) -> TopologyError:
            return TopologyError(f"{p}: {msg}")

        try:
            nets = {k: ipaddress.IPv4Network(v) for k, v in data["networks"].items()}
            ports = {k: int(v) for k, v in data["ports"].items()}
            luns = tuple((int(lu["id"]), parse_size(lu["size"])) for lu in data["luns"])
            jsize = parse_size(data["journal_size"])
            hosts: dict[str, Host] = {}
            for h in data["hosts"]:
                host = Host(str(h["name"]), str(h["site"]), str(h["role"]),
                            {str(k): str(v) for k, v in h["addresses"].items()},
                            int(h.get("memory", 1024)), h)
                if host.name in hosts:
                    raise bad(f"host {host.name} appears twice")
                hosts[host.name] = host
            topo = cls(p, str(data["iqn_prefix"]), nets, ports, luns, jsize,
                       str(data.get("pair", "pair-1")), hosts)
        except KeyError as e:
            raise bad(f"missing key {e}") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise bad(str(e)) from None
        topo._check(bad)
        return topo

    def _check(self, bad: Any) -> None:
        seen: dict[str, str] = {}
        for h in self.hosts.values():
            if h.role not in ROLES:
                raise bad(f"host {h.name}: role {h.role!r} is not one of {', '.join(ROLES)}")
            if h.site not in self.networks:
                raise bad(f"host {h.name}: site {h.site!r} has no network")
            for net, a in h.addresses.items():
                if net not in self.networks:
                    raise bad(f"host {h.name}: no network {net!r}")
                if ipaddress.IPv4Address(a) not in self.networks[net]:
                    raise bad(f"host {h.name}: {a} is not in {net} ({self.networks[net]})")
                if a in seen:
                    raise bad(f"host {h.name}: {a} is also {seen[a]}'s address")
                seen[a] = h.name
            if h.role == "core":
                for key, role in (("peer", "core"), ("san", "san")):
                    other = self.hosts.get(str(h.raw.get(key)))
                    if other is None or other.role != role:
                        raise bad(f"host {h.name}: {key} must name a {role} host")
                if h.raw.get("replication") not in ("primary", "secondary"):
                    raise bad(f"host {h.name}: replication is primary or secondary")
                if h.site not in self.hosts[h.raw["san"]].addresses:
                    raise bad(f"host {h.name}: its array {h.raw['san']} is not on {h.site}")
            if h.role == "san" and self.hosts.get(str(h.raw.get("for")), None) is None:
                raise bad(f"host {h.name}: for must name the core it serves")
            if h.role == "initiator" and self.by_role("edge") == []:
                raise bad(f"host {h.name}: no edge to log in to")
        for role in ("witness", "edge"):
            if len(self.by_role(role)) != 1:
                raise bad(f"exactly one {role} host, got {len(self.by_role(role))}")
        if len(self.by_role("core")) != 2:
            raise bad("two core hosts (a replication pair)")
        for h in self.by_role("witness") + self.by_role("edge") + self.by_role("core"):
            if "wan" not in h.addresses:
                raise bad(f"host {h.name}: needs a wan address")

    # -- lookups
    def by_role(self, role: str) -> list[Host]:
        return [h for h in self.hosts.values() if h.role == role]

    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise TopologyError(f"{self.path}: no host {name!r} (hosts: "
                                f"{', '.join(self.hosts)})") from None

    def iqn(self, name: str) -> str:
        return f"{self.iqn_prefix}:{name}"

    def core_addr(self, name: str) -> tuple[str, int]:
        return self.host(name).addr("wan"), self.ports["core"]

    # -- what each host runs
    def node_config(self, name: str, sec: Secrets) -> dict[str, Any]:
        """The TOML document of ``/etc/steelfusion/NAME.toml`` (core, edge or witness)."""
        h = self.host(name)
        auth = {"auth": {"key_file": KEY_FILE, "key_id": self.pair}}
        witness = self.by_role("witness")[0]
        waddr = (witness.addr("wan"), self.ports["witness"])
        local = "127.0.0.1"
        if h.role == "witness":
            w = WitnessConfig(name=name, listen=waddr, state_dir=f"{STATE}/{name}",
                              control=(local, self.ports["witness_control"]),
                              log_file=f"{LOGS}/{name}.log")
            return {**w.to_dict(), **auth}
        if h.role == "core":
            san = self.host(h.raw["san"])
            base = (f"iscsi://{name}%{sec.chap(name)}@{san.addr(h.site)}:"
                    f"{self.ports['san_portal']}/{self.iqn(san.name)}")
            c = CoreConfig(
                name=name, role=h.raw["replication"], listen=self.core_addr(name),
                control=(local, self.ports["core_control"]), state_dir=f"{STATE}/{name}",
                luns=tuple(LunConfig(i, f"{base}/{i}", 0) for i, _ in self.luns),
                peer=self.core_addr(h.raw["peer"]), interfaces=(h.addr("wan"),),
                witness=waddr, journal_path=f"{base}/{JOURNAL_LUN}", journal_size=0,
                log_file=f"{LOGS}/{name}.log", pair=self.pair)
            return {**c.to_dict(), **auth}
        if h.role == "edge":
            inits = [i for i in self.by_role("initiator") if i.raw.get("edge") == name]
            t = TargetConfig(
                iqn=self.iqn(name),
                luns=tuple(EdgeLunConfig(n, i, size) for n, (i, size) in enumerate(self.luns)),
                initiators=tuple(self.iqn(i.name) for i in inits) or None,
                initiator_chap=tuple(InitiatorChapConfig(self.iqn(i.name), i.name,
                                                         sec.chap(i.name)) for i in inits))
            e = EdgeConfig(
                name=name, portal=(h.addr(h.site), self.ports["edge_portal"]),
                control=(local, self.ports["edge_control"]),
                blockstore=f"{STATE}/{name}/blockstore",
                cores=tuple(self.core_addr(c.name) for c in self.by_role("core")),
                targets=(t,), log_file=f"{LOGS}/{name}.log")
            return {**e.to_dict(), **auth}
        raise TopologyError(f"host {name} is a {h.role}, not a node (core, edge, witness)")

    def san_spec(self, name: str, sec: Secrets) -> dict[str, Any]:
        """The ``steelfusion san create --config`` file of an array host."""
        h = self.host(name)
        if h.role != "san":
            raise TopologyError(f"host {name} is a {h.role}, not a san")
        core = h.raw["for"]  # its CHAP user; the ACL names what every Core's initiator sends
        luns = [{"id": i, "path": f"{SAN_DIR}/{name}/lun-{i}.img", "size": size}
                for i, size in self.luns]
        luns.append({"id": JOURNAL_LUN, "path": f"{SAN_DIR}/{name}/journal.img",
                     "size": self.journal_size})
        return {"san": {"target": self.iqn(name),
                        "portal": format_addr((h.addr(h.site), self.ports["san_portal"]))},
                "lun": luns,
                "acl": [{"initiator": CORE_INITIATOR, "chap_user": core,
                         "chap_secret": sec.chap(core)}]}

    def initiator(self, name: str, sec: Secrets) -> dict[str, str]:
        """A branch host's open-iscsi settings (shell variables for initiator.sh)."""
        h = self.host(name)
        if h.role != "initiator":
            raise TopologyError(f"host {name} is a {h.role}, not an initiator")
        edge = self.host(h.raw["edge"])
        return {"INITIATOR": self.iqn(name), "TARGET": self.iqn(edge.name),
                "PORTAL": format_addr((edge.addr(h.site), self.ports["edge_portal"])),
                "CHAP_USER": name, "CHAP_SECRET": sec.chap(name)}


@dataclass(frozen=True)
class Secrets:
    """``vagrant/.secrets.json``: ``{"node_key": HEX, "chap": {HOST: SECRET}}``."""

    node_key: str
    chaps: dict[str, str]
    path: Path

    def chap(self, host: str) -> str:
        try:
            return self.chaps[host]
        except KeyError:
            raise TopologyError(f"{self.path}: no CHAP secret for {host} (delete the file "
                                "to make a new one)") from None

    @classmethod
    def load(cls, path: str | Path) -> Secrets:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
            key = str(d["node_key"])
            bytes.fromhex(key)
            return cls(key, {str(k): str(v) for k, v in d["chap"].items()}, p)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise TopologyError(f"{p}: cannot read the secrets: {e}") from None

    @classmethod
    def ensure(cls, path: str | Path, topo: Topology) -> Secrets:
        """The secrets file, made (0600) when missing; the same shape the Vagrantfile makes."""
        p = Path(path)
        if not p.exists():
            from steelfusion.atomic import atomic_write

            data = {"node_key": random_secrets.token_hex(32),
                    "chap": {n: random_secrets.token_hex(12) for n in topo.hosts}}
            atomic_write(p, json.dumps(data, indent=2).encode() + b"\n", mode=0o600)
        return cls.load(p)


# -- ``steelfusion-topology``: what the provisioning scripts call -----------------------------
def _topo(ctx: click.Context) -> Topology:
    obj: Topology = ctx.obj["topo"]
    return obj


@click.group()
@click.option("--topology", default=str(DEFAULT), show_default=True,
              type=click.Path(dir_okay=False), envvar="SF_TOPOLOGY")
@click.option("--secrets", "secrets_path", default=None, type=click.Path(dir_okay=False),
              envvar="SF_SECRETS", help="[default: .secrets.json beside the topology]")
@click.pass_context
def main(ctx: click.Context, topology: str, secrets_path: str | None) -> None:
    """Read the Linux-hosts topology; write what one host runs."""
    try:
        topo = Topology.load(topology)
    except TopologyError as e:
        raise click.ClickException(str(e)) from None
    ctx.obj = {"topo": topo,
               "secrets": Path(secrets_path or Path(topology).parent / ".secrets.json")}


def _secrets(ctx: click.Context) -> Secrets:
    return Secrets.ensure(ctx.obj["secrets"], _topo(ctx))


def _out(text: str, out: str | None, mode: int = 0o600) -> None:
    if out is None:
        click.echo(text, nl=False)
        return
    from steelfusion.atomic import atomic_write

    atomic_write(out, text.encode(), mode=mode)


@main.command("role")
@click.argument("name")
@click.pass_context
def role_cmd(ctx: click.Context, name: str) -> None:
    """The host's role: witness, san, core, edge or initiator."""
    try:
        click.echo(_topo(ctx).host(name).role)
    except TopologyError as e:
        raise click.ClickException(str(e)) from None


@main.command("hosts")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def hosts_cmd(ctx: click.Context, as_json: bool) -> None:
    """Every host: name, site, role, addresses (the order Vagrant brings them up)."""
    topo = _topo(ctx)
    if as_json:
        click.echo(json.dumps([h.raw for h in topo.hosts.values()], indent=2))
        return
    for h in topo.hosts.values():
        addrs = " ".join(f"{k}={v}" for k, v in h.addresses.items())
        click.echo(f"{h.name:12} {h.site:8} {h.role:10} {addrs}")


@main.command("addresses")
@click.argument("name")
@click.pass_context
def addresses_cmd(ctx: click.Context, name: str) -> None:
    """The host's addresses with prefix length, one a line (what Vagrant configures; the
    UML lab adds them to the guest's link)."""
    topo = _topo(ctx)
    try:
        h = topo.host(name)
    except TopologyError as e:
        raise click.ClickException(str(e)) from None
    for net, a in h.addresses.items():
        click.echo(f"{a}/{topo.networks[net].prefixlen}")


@main.command("secrets")
@click.pass_context
def secrets_cmd(ctx: click.Context) -> None:
    """Make the secrets file if it is missing; print its path."""
    try:
        click.echo(_secrets(ctx).path)
    except (TopologyError, OSError) as e:
        raise click.ClickException(str(e)) from None


@main.command("config")
@click.argument("name")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="[default: stdout]")
@click.option("--key-out", default=None, type=click.Path(dir_okay=False),
              help="Also write the node key file here (0600).")
@click.pass_context
def config_cmd(ctx: click.Context, name: str, out: str | None, key_out: str | None) -> None:
    """A node's TOML config (core, edge, witness)."""
    import tomli_w

    try:
        sec = _secrets(ctx)
        doc = _topo(ctx).node_config(name, sec)
        _out(tomli_w.dumps(doc), out, 0o640)
        if key_out:
            _out(sec.node_key + "\n", key_out, 0o600)
    except (TopologyError, ConfigError, OSError, ValueError) as e:
        raise click.ClickException(str(e)) from None


@main.command("san")
@click.argument("name")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="[default: stdout]")
@click.pass_context
def san_cmd(ctx: click.Context, name: str, out: str | None) -> None:
    """An array host's `steelfusion san create --config` file."""
    import tomli_w

    try:
        _out(tomli_w.dumps(_topo(ctx).san_spec(name, _secrets(ctx))), out)
    except (TopologyError, OSError) as e:
        raise click.ClickException(str(e)) from None


@main.command("initiator")
@click.argument("name")
@click.pass_context
def initiator_cmd(ctx: click.Context, name: str) -> None:
    """A branch host's open-iscsi settings, as shell variables."""
    import shlex

    try:
        for k, v in _topo(ctx).initiator(name, _secrets(ctx)).items():
            click.echo(f"{k}={shlex.quote(v)}")
    except TopologyError as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    main(prog_name=os.path.basename(sys.argv[0]) or "steelfusion-topology")
