"""Issue 11: ``steelfusion san create|status|delete`` against the real kernel target (LIO).

One User-mode Linux guest (steelfusion/vm.py; its tap link lives in a namespace of its own)
installs steelfusion with the provisioning script Vagrant users run
(vagrant/provision/install.sh; the source and the host's .venv come over hostfs, read-only),
then provisions LIO through rtslib-fb: a fileio LUN, a block LUN (a loop device) and the
Journal LUN, one target, two ACLs with their own CHAP. From the host, inside the guest's
namespace, libiscsi (``iscsi-ls``, ``qemu-img info``, ``qemu-io``) sees the sizes, the ACL
refuses another initiator name, CHAP refuses a wrong secret, ``san status`` shows the
session, the saved config brings everything back after LIO is cleared (what the boot-time
``targetctl restore`` does), and ``san delete`` leaves nothing of it. Then, in the same guest
(booted without systemd), provision.sh starts the topology's Witness and Edge by hand.

Needs root, /dev/net/tun and a cached guest image (``steelfusion vm build``); skipped with
the reason otherwise. One boot, about 30 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from steelfusion import vmimage
from steelfusion.san import JOURNAL_LUN
from steelfusion.topology import Secrets, Topology
from steelfusion.vm import Guest, GuestNet, Result
from tests.conftest import ROOT, tool
from tests.nodes import wait_for, why_no_netns

pytestmark = [pytest.mark.lab, pytest.mark.vm, pytest.mark.timeout(300)]
MiB = 1 << 20
IQN = "iqn.2026-11.io.steelfusion:san-a"
CORE_A = ("iqn.2026-11.io.steelfusion:core-a", "core-a", "core-a-secret-1")
QEMU = ("iqn.2008-11.org.linux-kvm", "qemu", "qemu-secret-123")  # qemu-img's own name
PORT = 3260
SAVE = "/etc/rtslib-fb-target/saveconfig.json"
GUEST = GuestNet().guest


SITE = sysconfig.get_paths()["purelib"]
"""The host's .venv site-packages: steelfusion's dependencies, shared with the guests."""


def install_script() -> str:
    """Guest bash: the host's source tree and .venv site-packages at the same paths
    (hostfs, read-only), then vagrant/provision/install.sh in its SF_SITE form."""
    mounts = [str(ROOT)] + ([SITE] if not Path(SITE).is_relative_to(ROOT) else [])
    lines = ["set -euo pipefail"]
    for d in mounts:
        lines.append(f"mkdir -p {d}; mountpoint -q {d} || mount -t hostfs -o ro,{d} none {d}")
    lines.append(f"SF_SRC={ROOT} SF_SITE={SITE} bash {ROOT}/vagrant/provision/install.sh")
    return "\n".join(lines) + "\n"


def why_no_guest() -> str | None:
    """Why no guest can boot here with steelfusion in it (None: one can)."""
    why = why_no_netns()
    if why is None and sys.version_info[:2] != (3, 11):
        why = "the guest's python3 is 3.11: the host's .venv must be 3.11 to be shared"
    if why is None and vmimage.cached() is None:
        why = "no cached guest image (build it with `steelfusion vm build`)"
    return why


def guest_image(test_file: str, why: str | None) -> vmimage.Image:
    """The cached guest image, or a skip that also prints ``why`` (a skip reason alone is
    easy to miss in a long run)."""
    if why is not None:
        print(f"\n{test_file} skipped: {why}", file=sys.stderr)
        pytest.skip(why)
    img = vmimage.cached()
    assert img is not None
    return img


@pytest.fixture(scope="module")
def guest() -> Iterator[Guest]:
    img = guest_image("tests/test_vm_san.py", why_no_guest())
    with Guest(img) as g:
        r = g.run(install_script(), timeout=120)
        assert r.rc == 0, r.output
        yield g


def ok(g: Guest, script: str, timeout: float = 120) -> Result:
    r = g.run("set -euo pipefail\n" + script, timeout)
    assert r.rc == 0, r.output
    return r


def on_host(g: Guest, *cmd: str) -> subprocess.CompletedProcess[str]:
    """A command in the guest's namespace (where its address is)."""
    assert g.ns is not None
    return subprocess.run(["ip", "netns", "exec", g.ns, *cmd], capture_output=True, text=True,
                          timeout=60, check=False)


def url(cred: tuple[str, str, str] | None, lun: int | None = None) -> str:
    who = f"{cred[1]}%{cred[2]}@" if cred else ""
    tail = f"/{IQN}/{lun}" if lun is not None else ""
    return f"iscsi://{who}{GUEST}:{PORT}{tail}"


def iscsi_ls(g: Guest, initiator: str, cred: tuple[str, str, str]) -> subprocess.CompletedProcess[str]:
    return on_host(g, tool("iscsi-ls"), "-s", "-i", initiator, url(cred))


def listing(g: Guest) -> subprocess.CompletedProcess[str]:
    """``iscsi-ls -s`` as core-a until it gets through. LIO raises REPORTED LUNS DATA HAS
    CHANGED (SPC-4, ASC/ASCQ 3F/0E) on an ACL's LUNs when more LUNs are mapped to it;
    Linux, qemu and the Core's initiator retry the command, iscsi-ls stops at the first
    one. Each run consumes one; any other failure fails the test."""
    for _ in range(4):
        p = iscsi_ls(g, CORE_A[0], CORE_A)
        if p.returncode == 0:
            return p
        assert "UNIT_ATTENTION" in p.stderr and "0x3f0e" in p.stderr, p.stdout + p.stderr
    raise AssertionError(f"iscsi-ls kept failing: {p.stdout}{p.stderr}")


def virtual_size(g: Guest, cred: tuple[str, str, str], lun: int) -> int:
    p = on_host(g, tool("qemu-img"), "info", "--output=json", url(cred, lun))
    assert p.returncode == 0, p.stderr
    return int(json.loads(p.stdout)["virtual-size"])


def status(g: Guest, *args: str) -> Result:
    return g.run(f"steelfusion san status {' '.join(args)}", 60)


def test_san_create_status_delete_on_lio(guest: Guest) -> None:
    g = guest
    t0 = time.monotonic()
    acls = " ".join(f"--acl {n}={u}:{s}" for n, u, s in (CORE_A, QEMU))
    # the LUN file exists at another size: refused before anything is made
    r = g.run("mkdir -p /srv/san && truncate -s 32M /srv/san/lun-1.img && "
              f"steelfusion san create --target {IQN} --lun 1:/srv/san/lun-1.img:64M "
              f"--any-initiator", 60)
    assert r.rc == 1 and "holds 33554432 bytes, not the 67108864 asked for" in r.output, \
        r.output
    assert "Traceback" not in r.output
    ok(g, "rm /srv/san/lun-1.img")
    # a block device for LUN 2: a loop device over a file
    out = ok(g, "modprobe loop; truncate -s 48M /srv/san/block.img; "
                "losetup -f --show /srv/san/block.img").output
    dev = out.strip().splitlines()[-1]
    assert dev.startswith("/dev/loop"), out
    r = ok(g, f"steelfusion san create --target {IQN} --portal 0.0.0.0:{PORT} "
              f"--lun 1:/srv/san/lun-1.img:64M --lun 2:{dev} "
              f"--journal /srv/san/journal.img:3G {acls}")
    assert f"Journal LUN {JOURNAL_LUN}: /srv/san/journal.img (file, 3.0 GiB)" in r.output
    assert f"LUN 2: {dev} (block, 48.0 MiB)" in r.output and f"saved to {SAVE}" in r.output
    made = time.monotonic() - t0
    # again: the target exists, one line
    r = g.run(f"steelfusion san create --target {IQN} --lun 3:/srv/san/x.img:1M {acls}", 60)
    assert r.rc == 1 and "exists already" in r.output and "Traceback" not in r.output

    # the host sees the LUNs with their sizes, with the ACL's name and CHAP secret
    assert virtual_size(g, QEMU, 1) == 64 * MiB
    assert virtual_size(g, QEMU, 2) == 48 * MiB
    assert virtual_size(g, QEMU, JOURNAL_LUN) == 3 << 30
    p = listing(g)
    # iscsi-ls prints the last LBA's offset, rounded down: one block short of the size
    for lun, size in ((1, "63M"), (2, "47M"), (JOURNAL_LUN, "2G")):
        assert any(f"Lun:{lun} " in ln and f"Size:{size}" in ln for ln in p.stdout.splitlines()
                   ), p.stdout
    # refused: an initiator name not in the ACLs (right secret), a wrong secret
    p = iscsi_ls(g, "iqn.2026-11.io.steelfusion:intruder", CORE_A)
    assert p.returncode != 0 and "Lun:" not in p.stdout, p.stdout
    p = iscsi_ls(g, CORE_A[0], (CORE_A[0], CORE_A[1], "wrong-secret-12"))
    assert p.returncode != 0 and "Lun:" not in p.stdout, p.stdout
    p = on_host(g, tool("qemu-img"), "info", url((QEMU[0], QEMU[1], "wrong-secret-12"), 1))
    assert p.returncode != 0, p.stdout

    # status: target, LUNs with sizes, ACLs (never a secret), and a live session
    holder = subprocess.Popen(["ip", "netns", "exec", str(g.ns), tool("qemu-io"), "-f", "raw",
                               "-c", "sleep 60000", url(QEMU, 1)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def session() -> str | None:
            r = status(g, "--target", IQN)
            return r.output if f"session {QEMU[0]} LOGGED_IN" in r.output else None

        text = wait_for(session, 60, "qemu-io's session in `san status`", every=0.5)
    finally:
        holder.kill()
        holder.wait(10)
    assert f"target {IQN} tpg 1 (enabled; auth CHAP; 2 ACLs)" in text, text
    assert f"portals: 0.0.0.0:{PORT}" in text
    assert "LUN 1: 64.0 MiB (67108864 bytes) fileio/sf-san-a-1 /srv/san/lun-1.img" in text
    assert f"LUN 2: 48.0 MiB (50331648 bytes) block/sf-san-a-2 {dev}" in text
    assert f"LUN {JOURNAL_LUN}: 3.0 GiB" in text
    assert f"ACL {CORE_A[0]} CHAP user {CORE_A[1]} LUNs [1, 2, {JOURNAL_LUN}]" in text
    assert CORE_A[2] not in text and QEMU[2] not in text
    r = status(g, "--target", "iqn.2026-11.io.steelfusion:nope")
    assert r.rc == 1 and "no target iqn.2026-11.io.steelfusion:nope" in r.output, r.output

    # the saved config: LIO cleared (as by a reboot), `targetctl restore` (what the boot-time
    # rtslib-fb-targetctl.service runs) brings the target back, CHAP secrets and all
    ok(g, "python3 -c 'from rtslib_fb import RTSRoot; RTSRoot().clear_existing(confirm=True)'"
          " && test -z \"$(ls /sys/kernel/config/target/iscsi | grep iqn || true)\" "
          "&& targetctl restore")
    assert virtual_size(g, QEMU, 1) == 64 * MiB
    assert f"Target:{IQN}" in listing(g).stdout

    # delete: the target and its three backstores go, the files and the device stay
    r = ok(g, f"steelfusion san delete --target {IQN}")
    assert f"removed target {IQN}" in r.output
    for name in ("fileio/sf-san-a-1", "block/sf-san-a-2", f"fileio/sf-san-a-{JOURNAL_LUN}"):
        assert f"removed backstore {name}" in r.output, r.output
    r = ok(g, "ls /sys/kernel/config/target/iscsi; ls /sys/kernel/config/target/core/*/; "
              f"python3 -c 'import json; print(json.load(open(\"{SAVE}\")))'; "
              "ls -l /srv/san; steelfusion san status")
    assert IQN not in r.output and "sf-san-a" not in r.output, r.output
    assert "lun-1.img" in r.output and "no iSCSI targets" in r.output
    p = on_host(g, tool("iscsi-ls"), url(None))
    assert p.returncode != 0 and IQN not in p.stdout, p.stdout
    r = g.run(f"steelfusion san delete --target {IQN}", 60)
    assert r.rc == 1 and f"no target {IQN}" in r.output, r.output
    # this guest booted without systemd: provisioning starts nodes by hand, as the units
    # would (user steelfusion; the Edge with only CAP_NET_BIND_SERVICE, for port 3260)
    Secrets.ensure(g.share / "secrets.json", Topology.load())
    r = ok(g, "for a in $(steelfusion-topology addresses witness) "
              "$(steelfusion-topology addresses edge); do ip addr add $a dev vec0; done; "
              f"SF_SRC={ROOT} SF_SITE={SITE} SF_SECRETS=/lab/secrets.json "
              f"bash {ROOT}/vagrant/provision/provision.sh witness edge; "
              "for i in $(seq 300); do ss -ltn | grep -q 10.99.0.10:3260 && "
              "ss -ltn | grep -q 10.99.100.13:7300 && break; sleep 0.1; done; "
              "ss -ltnp; ps -o user:16=,args= -C python3")
    assert "witness (witness): started by hand" in r.output, r.output
    assert "10.99.0.10:3260" in r.output and "10.99.100.13:7300" in r.output, r.output
    users = {ln.split()[0] for ln in r.output.splitlines() if " run --config " in ln}
    assert users == {"steelfusion"}, r.output
    print(f"\nLIO in a UML guest: boot {g.boot_seconds:.1f} s, san create (3 LUNs, 2 ACLs) "
          f"done {made:.1f} s after the first command, whole test "
          f"{time.monotonic() - t0:.1f} s", file=sys.stderr)
