"""The Linux-hosts topology (vagrant/topology.json, steelfusion/topology.py): one description
that the Vagrantfile and the provisioning scripts share, and the systemd units they install.

Configs made from the topology load through the same loaders the nodes use; the Vagrantfile
passes ``vagrant validate`` (when Debian's vagrant is installed) and lists the same hosts;
the units pass ``systemd-analyze verify`` (when systemd is installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from click.testing import CliRunner

from steelfusion.config import CoreConfig, EdgeConfig, WitnessConfig
from steelfusion.nodeauth import write_key_file
from steelfusion.san import JOURNAL_LUN
from steelfusion.sancli import LioSpec
from steelfusion.sandev import INITIATOR_NAME
from steelfusion.topology import (
    CORE_INITIATOR,
    DEFAULT,
    Secrets,
    Topology,
    TopologyError,
    main,
)
from tests.conftest import ROOT

VAGRANT = ROOT / "vagrant"
UNITS = VAGRANT / "systemd"
LOADERS: dict[str, Any] = {"core": CoreConfig, "edge": EdgeConfig, "witness": WitnessConfig}


@pytest.fixture
def sec(tmp_path: Path) -> Secrets:
    return Secrets.ensure(tmp_path / "secrets.json", Topology.load())


def test_the_topology_the_issue_asks_for() -> None:
    t = Topology.load()
    assert {h.name: (h.site, h.role) for h in t.hosts.values()} == {
        "branch-host": ("branch", "initiator"), "edge": ("branch", "edge"),
        "san-a": ("dc-a", "san"), "core-a": ("dc-a", "core"),
        "san-b": ("dc-b", "san"), "core-b": ("dc-b", "core"),
        "witness": ("witness", "witness")}
    # every host is on its own site's network; only Cores, Edge and Witness reach the WAN
    for h in t.hosts.values():
        assert h.site in h.addresses
        assert ("wan" in h.addresses) == (h.role in ("core", "edge", "witness"))
    assert CORE_INITIATOR == INITIATOR_NAME  # what the arrays' ACLs name is what Cores send


def test_every_node_config_loads(tmp_path: Path, sec: Secrets) -> None:
    t = Topology.load()
    key = tmp_path / "node.key"
    write_key_file(key, bytes.fromhex(sec.node_key))
    for h in t.hosts.values():
        if h.role not in LOADERS:
            with pytest.raises(TopologyError, match="not a node"):
                t.node_config(h.name, sec)
            continue
        doc = t.node_config(h.name, sec)
        doc["auth"]["key_file"] = str(key)
        path = tmp_path / f"{h.name}.toml"
        path.write_text(tomli_w.dumps(doc))
        cfg = LOADERS[h.role].load(path)
        assert cfg.name == h.name
    core_a = CoreConfig.load(tmp_path / "core-a.toml")
    assert core_a.role == "primary" and core_a.peer == t.core_addr("core-b")
    assert core_a.interfaces == (t.host("core-a").addr("wan"),)
    assert core_a.witness == (t.host("witness").addr("wan"), t.ports["witness"])
    # the Core's LUNs and Journal LUN are its array's, over iSCSI with its CHAP secret
    base = (f"iscsi://core-a%{sec.chap('core-a')}@{t.host('san-a').addr('dc-a')}:3260/"
            f"{t.iqn('san-a')}")
    assert [lu.path for lu in core_a.luns] == [f"{base}/1"]
    assert core_a.journal_path == f"{base}/{JOURNAL_LUN}"
    edge = EdgeConfig.load(tmp_path / "edge.toml")
    assert set(edge.cores) == {t.core_addr("core-a"), t.core_addr("core-b")}
    assert edge.portal == (t.host("edge").addr("branch"), 3260)
    (target,) = edge.targets
    branch = t.initiator("branch-host", sec)
    assert target.iqn == branch["TARGET"] and target.initiators == (branch["INITIATOR"],)
    (chap,) = target.initiator_chap
    assert (chap.chap_user, chap.chap_secret) == (branch["CHAP_USER"], branch["CHAP_SECRET"])
    assert branch["PORTAL"] == f"{t.host('edge').addr('branch')}:3260"


def test_array_specs_load(tmp_path: Path, sec: Secrets) -> None:
    t = Topology.load()
    for san, core in (("san-a", "core-a"), ("san-b", "core-b")):
        path = tmp_path / f"{san}.toml"
        path.write_text(tomli_w.dumps(t.san_spec(san, sec)))
        spec = LioSpec.load(path)
        assert spec.target == t.iqn(san)
        site = t.host(san).site
        assert spec.portal == (t.host(san).addr(site), 3260)
        assert t.host(core).site == site  # an array serves its own data center's Core
        assert [(lu.id, lu.size) for lu in spec.luns] == [*t.luns, (JOURNAL_LUN, t.journal_size)]
        assert spec.acl_list() is not None
        (acl,) = spec.acls
        assert (acl.initiator, acl.chap_user, acl.chap_secret) == (
            CORE_INITIATOR, core, sec.chap(core))
    # the seed's rule: the Journal LUN holds at least 1 GiB + 2 GiB per protected LUN
    assert t.journal_size >= (1 << 30) + len(t.luns) * (2 << 30)


def test_bad_topologies_are_refused(tmp_path: Path) -> None:
    good = json.loads(DEFAULT.read_text())

    def load(change: object) -> None:
        data = json.loads(json.dumps(good))
        change(data)  # type: ignore[operator]
        p = tmp_path / "t.json"
        p.write_text(json.dumps(data))
        Topology.load(p)

    def host(data: dict, name: str) -> dict:  # type: ignore[type-arg]
        return next(h for h in data["hosts"] if h["name"] == name)

    cases = [
        (lambda d: host(d, "core-a")["addresses"].update({"wan": "10.1.1.1"}),
         "core-a: 10.1.1.1 is not in wan"),
        (lambda d: host(d, "edge").update({"role": "router"}), "role 'router'"),
        (lambda d: host(d, "core-a").update({"san": "core-b"}), "san must name a san host"),
        (lambda d: host(d, "core-b").update({"san": "san-a"}), "san-a is not on dc-b"),
        (lambda d: host(d, "san-b").update({"site": "dc-a", "addresses": {"dc-a": "10.99.1.10"}}),
         "also san-a's address"),
        (lambda d: d["hosts"].append(dict(host(d, "edge"))), "appears twice"),
        (lambda d: d.pop("luns"), "missing key 'luns'"),
    ]
    for change, msg in cases:
        with pytest.raises(TopologyError, match=msg):
            load(change)


def test_secrets_file(tmp_path: Path) -> None:
    t = Topology.load()
    s = Secrets.ensure(tmp_path / "s.json", t)
    assert (tmp_path / "s.json").stat().st_mode & 0o777 == 0o600
    assert Secrets.ensure(tmp_path / "s.json", t) == s  # made once
    assert set(s.chaps) == set(t.hosts) and len(bytes.fromhex(s.node_key)) == 32
    assert all(12 <= len(v) <= 255 for v in s.chaps.values())
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(TopologyError, match="cannot read the secrets"):
        Secrets.load(tmp_path / "bad.json")


def test_command_line(tmp_path: Path) -> None:
    env = {"SF_SECRETS": str(tmp_path / "s.json")}
    r = CliRunner().invoke(main, ["role", "san-a"], env=env)
    assert r.exit_code == 0 and r.output == "san\n"
    r = CliRunner().invoke(main, ["addresses", "core-a"], env=env)
    assert r.output.split() == ["10.99.1.11/24", "10.99.100.11/24"]
    r = CliRunner().invoke(main, ["config", "core-a", "--out", str(tmp_path / "c.toml"),
                                  "--key-out", str(tmp_path / "k")], env=env)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "c.toml").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    r = CliRunner().invoke(main, ["config", "nowhere"], env=env)
    assert r.exit_code == 1 and "no host 'nowhere'" in r.output
    r = CliRunner().invoke(main, ["initiator", "edge"], env=env)
    assert r.exit_code == 1 and "not an initiator" in r.output


# -- the Vagrantfile ---------------------------------------------------------------------------
@pytest.mark.lab
def test_vagrant_validate(tmp_path: Path) -> None:
    """Both providers' settings (libvirt's checked by vagrant-libvirt; VirtualBox's only
    with --ignore-provider, as VirtualBox is not installable from Debian), a planted typo
    caught, and the hosts Vagrant defines are the topology's, in its order."""
    if shutil.which("vagrant") is None:
        pytest.skip("vagrant is not installed (Debian: apt-get install vagrant)")
    work = tmp_path / "vagrant"
    work.mkdir()
    for name in ("Vagrantfile", "topology.json", "provision"):
        src = VAGRANT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    env = {"VAGRANT_HOME": str(tmp_path / "vhome"), "PATH": "/usr/bin:/bin",
           "VAGRANT_CHECKPOINT_DISABLE": "1"}

    def vagrant(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["vagrant", *args], cwd=work, env={**env, **extra},
                              capture_output=True, text=True, timeout=120, check=False)

    p = vagrant("validate")
    assert p.returncode == 0 and "validated successfully" in p.stdout, p.stdout + p.stderr
    p = vagrant("validate", "--ignore-provider", VAGRANT_DEFAULT_PROVIDER="virtualbox")
    assert p.returncode == 0, p.stdout + p.stderr
    p = vagrant("status", "--machine-readable")
    names = [ln.split(",")[1] for ln in p.stdout.splitlines() if ",state," in ln]
    assert names == list(Topology.load().hosts), p.stdout
    # the secrets the Vagrantfile made are the ones the Python side reads
    s = Secrets.load(work / ".secrets.json")
    assert set(s.chaps) == set(Topology.load().hosts) and len(s.node_key) == 64
    assert (work / ".secrets.json").stat().st_mode & 0o777 == 0o600
    text = (work / "Vagrantfile").read_text()
    (work / "Vagrantfile").write_text(text.replace("lv.memory =", "lv.memroy =", 1))
    p = vagrant("validate")
    assert p.returncode != 0 and "memroy" in p.stdout + p.stderr


# -- systemd units -----------------------------------------------------------------------------
def _unit(role: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (UNITS / f"steelfusion-{role}@.service").read_text().splitlines():
        m = re.match(r"^(\w+)=(.*)$", line)
        if m:
            out.setdefault(m[1], []).append(m[2])
    return out


def test_units_say_what_the_issue_asks() -> None:
    for role in ("core", "edge", "witness"):
        u = _unit(role)
        assert u["ExecStart"] == [f"/usr/local/bin/steelfusion {role} run --config "
                                  "/etc/steelfusion/%i.toml --quiet"]
        assert u["Restart"] == ["on-failure"] and u["User"] == ["steelfusion"]
        assert u["ProtectSystem"] == ["strict"] and u["NoNewPrivileges"] == ["yes"]
        assert u["StateDirectory"] == ["steelfusion/%i"]
    # the Edge binds the iSCSI port 3260 and keeps only that privilege
    assert _unit("edge")["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert _unit("edge")["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    # the Core reaches block devices (the host's open-iscsi disks): no PrivateDevices
    assert "PrivateDevices" not in _unit("core") and _unit("core")["SupplementaryGroups"] == [
        "disk"]


@pytest.mark.lab
def test_units_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` in a scratch root (this host's unit library copied in and a
    stand-in /usr/local/bin/steelfusion), silent for every unit; a planted error is
    reported; ``systemd-analyze security`` rates each unit."""
    if shutil.which("systemd-analyze") is None or not Path("/usr/lib/systemd/system").is_dir():
        pytest.skip("systemd-analyze is not installed (Debian: systemd)")
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/local/bin").mkdir(parents=True)
    exe = root / "usr/local/bin/steelfusion"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    units = sorted(UNITS.glob("steelfusion-*@.service"))
    assert [u.name for u in units] == [f"steelfusion-{r}@.service"
                                       for r in ("core", "edge", "witness")]
    for u in units:
        shutil.copy(u, etc)
    names = [u.name.replace("@.", "@t.") for u in units]

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root}",
                               *names], capture_output=True, text=True, timeout=60,
                              check=False)

    p = verify()
    assert p.returncode == 0 and not (p.stdout + p.stderr).strip(), p.stdout + p.stderr
    for name in names:
        p = subprocess.run(["systemd-analyze", "security", "--offline=yes", f"--root={root}",
                            name], capture_output=True, text=True, timeout=60, check=False)
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", p.stdout + p.stderr)
        assert m is not None, p.stdout + p.stderr
        assert float(m[1]) < 3.0, f"{name}: exposure {m[1]} (systemd says OK below 3.0)"
    core = etc / "steelfusion-core@.service"
    core.write_text(core.read_text().replace("Restart=on-failure", "Restart=sometimes"))
    p = verify()
    assert "Failed to parse service restart specifier" in p.stdout + p.stderr
