"""``steelfusion san create|status|delete`` (steelfusion/sancli.py): options, files and
refusals that need no kernel target. The LIO round trip itself runs in a User-mode Linux
guest (tests/test_vm_san.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from steelfusion.cli import main
from steelfusion.config import ConfigError
from steelfusion.lab import free_ports
from steelfusion.san import (
    JOURNAL_LUN,
    Acl,
    Provisioner,
    SanError,
    TgtAdm,
    free_tgt_control_port,
    lio_backstore_name,
    lun_file_size,
)
from steelfusion.sancli import (
    LioSpec,
    format_tpg,
    parse_acl,
    parse_journal,
    parse_lun,
    spec_from_options,
)
from tests.conftest import tool
from tests.nodes import SPAWNED, wait_for

MiB = 1 << 20
IQN = "iqn.2026-11.io.steelfusion:san-a"
CORE_A = "iqn.2026-11.io.steelfusion:core-a"
SECRET = "secretsecret12"


def _san(*args: str) -> click.testing.Result:
    return CliRunner().invoke(main, ["san", *args])


def _opts(tmp: Path, **kw: object) -> LioSpec:
    args: dict[str, object] = dict(target=IQN, portal=None,
                                   luns=(f"1:{tmp}/lun-1.img:64M",), journal=None,
                                   acls=(f"{CORE_A}={'core-a'}:{SECRET}",),
                                   any_initiator=False, save_file=None)
    args.update(kw)
    return spec_from_options(**args)  # type: ignore[arg-type]


def test_lun_options() -> None:
    assert parse_lun("1:/srv/san/lun-1.img:1G") == parse_lun("1:/srv/san/lun-1.img:1073741824")
    lu = parse_lun("1:/srv/san/lun-1.img:1G")
    assert (lu.id, lu.path, lu.size) == (1, "/srv/san/lun-1.img", 1 << 30)
    lu = parse_lun("2:/dev/sdb")
    assert (lu.id, lu.path, lu.size) == (2, "/dev/sdb", 0)  # a device: its own size
    lu = parse_lun("3:/srv/a:b/lun.img")  # a ':' inside the path is not a size
    assert (lu.path, lu.size) == ("/srv/a:b/lun.img", 0)
    j = parse_journal("/srv/san/journal.img:3G")
    assert (j.id, j.path, j.size) == (JOURNAL_LUN, "/srv/san/journal.img", 3 << 30)
    for bad in ("/srv/x.img:1G", "x:/srv/x.img", "1:", "99999:/x", "1:/x:1000"):
        with pytest.raises(ValueError):
            parse_lun(bad)


def test_acl_options() -> None:
    a = parse_acl(CORE_A)
    assert (a.initiator, a.chap_user, a.chap_secret) == (CORE_A, None, None)
    a = parse_acl(f"{CORE_A}=core-a:sec:ret:with:colons")
    assert (a.chap_user, a.chap_secret) == ("core-a", "sec:ret:with:colons")
    assert SECRET not in repr(a)  # a secret never reaches a log
    with pytest.raises(ValueError, match="not an initiator name"):
        parse_acl("core-a=u:secretsecret12")
    with pytest.raises(ValueError, match="USER:SECRET"):
        parse_acl(f"{CORE_A}=core-a")
    with pytest.raises(ValueError, match=r"12\.\.255 bytes") as e:
        parse_acl(f"{CORE_A}=core-a:short")
    assert "short" not in str(e.value)


def test_spec_refusals(tmp_path: Path) -> None:
    spec = _opts(tmp_path, journal=f"{tmp_path}/journal.img:3G")
    assert [lu.id for lu in spec.luns] == [1, JOURNAL_LUN]
    assert spec.portal == ("0.0.0.0", 3260)
    assert spec.acl_list() == [Acl(CORE_A, "core-a", SECRET)]
    assert _opts(tmp_path, portal=":3261").portal == ("0.0.0.0", 3261)
    assert _opts(tmp_path, acls=(), any_initiator=True).acl_list() is None
    cases: list[tuple[dict[str, Any], str]] = [
        (dict(acls=()), "--acl: none given"),
        (dict(any_initiator=True), "--any-initiator: true, but --acl options"),
        (dict(luns=()), "--lun: none given"),
        (dict(luns=(f"1:{tmp_path}/a:1M", f"1:{tmp_path}/b:1M")), "LUN 1 appears twice"),
        (dict(luns=(f"1:{tmp_path}/a:1M", f"2:{tmp_path}/a:1M")), "backs two LUNs"),
        (dict(acls=(CORE_A, f"{CORE_A}=u:{SECRET}")), "listed twice"),
        (dict(acls=(f"{CORE_A}=u:{SECRET}", "iqn.2026-11.io.steelfusion:core-b")),
         "CHAP for every ACL or for none"),
        (dict(target="san-a"), "must start with iqn."),
        (dict(portal="nowhere"), "needs a port"),
    ]
    for kw, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            _opts(tmp_path, **kw)


def test_lun_sizes_are_checked_before_lio(tmp_path: Path) -> None:
    f = tmp_path / "lun-1.img"
    assert lun_file_size(str(f), 64 * MiB) == ("file", 64 * MiB)  # missing: made at that size
    with pytest.raises(SanError, match="no such file; give its size"):
        lun_file_size(str(f), None)
    f.write_bytes(b"\0" * MiB)
    assert lun_file_size(str(f), None) == ("file", MiB)
    with pytest.raises(SanError, match="holds 1048576 bytes, not the 67108864 asked for"):
        _opts(tmp_path).plan()
    with pytest.raises(SanError, match="neither a regular file nor a block device"):
        lun_file_size("/dev/null", None)
    assert lio_backstore_name(IQN, 200) == "sf-san-a-200"


def test_spec_file(tmp_path: Path) -> None:
    path = tmp_path / "san-a.toml"
    path.write_text(f"""
[san]
target = "{IQN}"
portal = "10.99.1.10:3260"
save_file = "{tmp_path}/saveconfig.json"

[[lun]]
id = 1
path = "{tmp_path}/lun-1.img"
size = "64M"

[[lun]]
id = {JOURNAL_LUN}
path = "{tmp_path}/journal.img"
size = "3G"

[[acl]]
initiator = "{CORE_A}"
chap_user = "core-a"
chap_secret = "{SECRET}"
""")
    spec = LioSpec.load(path)
    assert spec.portal == ("10.99.1.10", 3260)
    assert [(lu.id, lu.size) for lu in spec.luns] == [(1, 64 * MiB), (JOURNAL_LUN, 3 << 30)]
    assert spec.acl_list() == [Acl(CORE_A, "core-a", SECRET)]
    for old, new, msg in [
        ('portal = "10.99.1.10:3260"', 'portl = "x"', "unknown key 'portl' in \\[san\\]"),
        ('chap_user = "core-a"\n', "", "set both chap_user and chap_secret"),
        (f'chap_secret = "{SECRET}"', 'chap_secret = "short"', r"12\.\.255 bytes"),
        ('size = "64M"', 'size = "1000"', "multiple of 512"),
        (f'initiator = "{CORE_A}"', 'initiator = "core-a"', "must start with iqn."),
    ]:
        bad = tmp_path / "bad.toml"
        bad.write_text(path.read_text().replace(old, new, 1))
        with pytest.raises(ConfigError, match=msg):
            LioSpec.load(bad)


def test_cli_refusals_in_one_line(tmp_path: Path) -> None:
    wrong = tmp_path / "lun-1.img"
    wrong.write_bytes(b"\0" * MiB)
    for args, code, msg in [
        (["create", "--lun", "1:/x:1M", "--any-initiator"], 2, "--target IQN"),
        (["create", "--config", str(tmp_path / "x.toml"), "--target", IQN], 2,
         "--config replaces"),
        (["create", "--config", str(tmp_path / "x.toml")], 1, "no such config file"),
        (["create", "--target", IQN, "--lun", f"1:{wrong}:64M", "--any-initiator"], 1,
         "holds 1048576 bytes, not the 67108864"),
        (["create", "--target", IQN, "--lun", "1:/x:1M"], 1, "--acl: none given"),
        (["create", "--target", IQN, "--lun", "one:/x:1M", "--any-initiator"], 1,
         "want ID:PATH"),
        (["delete"], 2, "give --target IQN or --config FILE"),
    ]:
        r = _san(*args)
        assert r.exit_code == code, (args, r.output)
        assert msg in r.output, (args, r.output)
        lines = [ln for ln in r.output.splitlines() if ln.startswith("Error")]
        assert len(lines) == 1, r.output
    assert wrong.stat().st_size == MiB  # never resized


@pytest.mark.lab  # rtslib-fb, where installed, may run modprobe
def test_without_lio_one_line() -> None:
    """This container has no configfs (and .venv may lack rtslib-fb): each says so."""
    if Path("/sys/kernel/config/target").is_dir():
        pytest.skip("this host has LIO: the refusal cannot be seen here")
    for args in (["status"], ["delete", "--target", IQN]):
        r = _san(*args)
        assert r.exit_code == 1, r.output
        assert ("needs rtslib-fb" in r.output or "LIO is not available" in r.output), r.output
        assert r.output.count("\n") == 1, r.output


def test_status_text() -> None:
    t = {"target": IQN, "tpg": 1, "enabled": True, "portals": ["0.0.0.0:3260"],
         "authentication": True, "generate_node_acls": False,
         "luns": [{"lun": 1, "backstore": "fileio/sf-san-a-1", "path": "/srv/lun-1.img",
                   "size": 64 * MiB}],
         "acls": [{"initiator": CORE_A, "chap_user": "core-a", "luns": [1]}],
         "sessions": [{"initiator": CORE_A, "state": "LOGGED_IN", "type": "Normal",
                       "connections": ["10.98.0.1"]}]}
    text = format_tpg(t)
    assert "auth CHAP" in text and "64.0 MiB (67108864 bytes)" in text
    assert f"ACL {CORE_A} CHAP user core-a LUNs [1]" in text
    assert f"session {CORE_A} LOGGED_IN Normal from 10.98.0.1" in text
    assert "sessions: none" in format_tpg({**t, "sessions": []})


def test_san_run_is_still_there() -> None:
    r = _san("run", "--help")
    assert r.exit_code == 0 and "--config" in r.output
    r = _san("--help")
    assert all(c in r.output for c in ("create", "delete", "run", "status"))


@pytest.mark.lab
def test_tgtadm_driver_acls_and_chap(tmp_path: Path) -> None:
    """The same Provisioner calls on the other driver (tgtd, what the lab's arrays run): the
    ACL and the CHAP account hold, remove_target takes the target away."""
    port, = free_ports(1)
    ctl = free_tgt_control_port()
    p = subprocess.Popen([tool("tgtd"), "-f", "-C", str(ctl), "--iscsi",
                          f"portal=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    SPAWNED.append(p.pid)
    adm = TgtAdm(ctl)
    try:
        wait_for(adm.ready, 20, "tgtd")
        lun = tmp_path / "lun-1.img"
        lun.write_bytes(b"")
        os.truncate(lun, 16 * MiB)
        prov: Provisioner = adm
        prov.create_target(IQN)
        prov.add_lun(IQN, 1, str(lun), 16 * MiB)
        prov.allow(IQN, [Acl(CORE_A, "core-a", SECRET)])

        def ls(initiator: str, secret: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([tool("iscsi-ls"), "-s", "-i", initiator,
                                   f"iscsi://core-a%{secret}@127.0.0.1:{port}"],
                                  capture_output=True, text=True, timeout=30, check=False)

        r = ls(CORE_A, SECRET)
        assert r.returncode == 0 and "Lun:1" in r.stdout, r.stdout + r.stderr
        assert "Lun:1" not in ls(CORE_A, "wrong-secret-12").stdout
        assert "Lun:1" not in ls("iqn.2026-11.io.steelfusion:intruder", SECRET).stdout
        with pytest.raises(SanError, match="tgtadm --mode account --op new") as e:
            prov.allow(IQN, [Acl("iqn.2026-11.io.steelfusion:core-b", "core-a", SECRET)])
        assert SECRET not in str(e.value) and "***" in str(e.value)  # the account exists
        prov.remove_target(IQN)
        assert IQN not in ls(CORE_A, SECRET).stdout
    finally:
        adm.shutdown()
        p.wait(10)
