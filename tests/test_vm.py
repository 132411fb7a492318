"""Issue 11: a real Linux kernel as the branch host. A User-mode Linux guest (steelfusion/vm.py,
image from steelfusion/vmimage.py) logs in to a netns lab's Edge with open-iscsi and CHAP,
makes ext4 and xfs, and keeps a verifying workload running through an Edge SIGKILL + restart,
a Core<->Core cut and a primary Core failover.

The guest's tap device is in the lab's ``branch`` namespace: its address exists only there.
Needs root, /dev/net/tun and the Debian packages user-mode-linux and mmdebstrap (installed
here when root and missing); skipped with the reason otherwise. The image is built once
(about a minute) and cached in /var/cache/steelfusion/vm/.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from steelfusion import netns, vmimage
from steelfusion.initiator import qemu_read
from steelfusion.lab import Lab
from steelfusion.vm import Guest, Result, stale_vm_namespaces
from tests.conftest import tool
from tests.nodes import lab_at, procs_in, wait_for, why_no_netns

pytestmark = [pytest.mark.lab, pytest.mark.vm, pytest.mark.timeout(420)]
MiB = 1 << 20
LUN_SIZE = 320 * MiB  # mkfs.xfs refuses devices under 300 MB
CHAP = ("branch-host", "sixteen-chars-ok")
HOST_IQN = "iqn.2026-12.io.steelfusion:branch-host"
REPLACEMENT_TIMEOUT_S = 120  # open-iscsi queues I/O this long while the Edge is away
EDGE_OUTAGE_S = 8.0  # how long the Edge stays dead: several of open-iscsi's login retries
DEBS = ("user-mode-linux", "mmdebstrap")


def _why_not() -> str | None:
    why = why_no_netns()
    if why is not None:
        return why
    missing = vmimage.missing_tools()
    if missing is None:
        return None
    p = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *DEBS],
                       capture_output=True, text=True, check=False,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if p.returncode != 0:
        return f"{missing}; apt-get install failed: {(p.stderr or p.stdout).strip()[-300:]}"
    return vmimage.missing_tools()


@pytest.fixture(scope="module")
def image() -> vmimage.Image:
    why = _why_not()
    if why is not None:
        print(f"\ntests/test_vm.py skipped: {why}", file=sys.stderr)
        pytest.skip(f"no UML guests here: {why}")
    for name in stale_vm_namespaces():  # a killed run's
        netns.remove(name)
    t0 = time.monotonic()
    img = vmimage.build()
    took = time.monotonic() - t0
    how = f"built in {took:.1f} s" if took > 2 else "cached"
    print(f"\nguest image {img.path}: {how}; "
          f"kernel {img.meta.get('uml')}; {img.meta.get('versions')}", file=sys.stderr)
    return img


# -- guest scripts -------------------------------------------------------------------------
PRELUDE = r"""
set -euo pipefail
P={portal}; T={iqn}
login() {{
  iscsiadm -m discovery -t sendtargets -p $P >/dev/null
  for kv in node.session.auth.authmethod=CHAP node.session.auth.username={user} \
            node.session.auth.password={secret} \
            node.session.timeo.replacement_timeout={replacement}; do
    iscsiadm -m node -T $T -p $P -o update -n "${{kv%%=*}}" -v "${{kv#*=}}"
  done
  iscsiadm -m node -T $T -p $P --login >/dev/null
  dev=
  for i in $(seq 100); do
    dev=$(iscsiadm -m session -P3 2>/dev/null | awk '/Attached scsi disk/ {{print $4; exit}}')
    [ -n "$dev" ] && [ -b /dev/$dev ] && break
    sleep 0.1
  done
  [ -n "$dev" ] && [ -b /dev/$dev ] || {{ echo "no disk after login"; exit 1; }}
  echo "logged in: /dev/$dev $(cat /sys/block/$dev/size) sectors," \
       "max_sectors_kb $(cat /sys/block/$dev/queue/max_sectors_kb)," \
       "discard_max_bytes $(cat /sys/block/$dev/queue/discard_max_bytes)"
}}
logout() {{ iscsiadm -m node -T $T -p $P --logout >/dev/null; echo "logged out"; }}
"""

EXT4 = r"""
login
mkfs.ext4 -q -F -L sfhost /dev/$dev
mount /dev/$dev /mnt
mkdir /mnt/dir
# 512 KiB writes (the kernel's largest here), each file fsynced
dd if=/dev/urandom of=/mnt/blob bs=512K count=32 oflag=direct conv=fsync status=none
for i in $(seq 1 24); do
  head -c $((i * 4099)) /dev/urandom > /mnt/dir/f$i
  dd if=/mnt/dir/f$i of=/mnt/dir/f$i conv=notrunc,fsync status=none
done
echo "hello from $(uname -r)" > /mnt/hello.txt; sync -f /mnt/hello.txt
# LOGICAL UNIT RESET and TARGET WARM RESET, what the kernel's error handler sends when a
# command times out: answered, and the session goes on (no connection error, no re-login)
sg_reset --device /dev/$dev && echo "lun reset: ok"
sg_reset --target /dev/$dev && echo "target reset: ok"
dd if=/dev/$dev of=/dev/null bs=4k count=1 iflag=direct status=none
echo "connection errors after the resets: $(dmesg | grep -c 'detected conn error' || true)"
(cd /mnt && find . -path ./lost+found -prune -o -type f -print | sort | xargs sha256sum) \
  > /lab/ext4.sha256
fstrim -v /mnt
umount /mnt
logout
"""

XFS_WORKLOAD = r"""
login
mkfs.xfs -q -f /dev/$dev
mount /dev/$dev /mnt
echo "xfs on /dev/$dev"
# Rounds of write-then-verify (crc32c in every block, direct I/O, up to 512 KiB writes),
# until the host says stop; any I/O or verify error ends the script with fio's exit code.
n=0
while [ ! -e /lab/stop ]; do
  fio --name=sf --filename=/mnt/fio.dat --size=24M --rw=randwrite --bsrange=4k-512k \
      --ioengine=libaio --iodepth=8 --direct=1 --verify=crc32c --do_verify=1 \
      --verify_fatal=1 --end_fsync=1 --randrepeat=0 --output=/lab/fio.last > /dev/null
  n=$((n + 1))
  echo $n > /lab/rounds.tmp && mv /lab/rounds.tmp /lab/rounds
done
echo "fio rounds: $n"
grep -E 'err=|WRITE:|READ:' /lab/fio.last || true
umount /mnt
logout
echo "kernel: $(dmesg | grep -ciE 'i/o error|xfs.*shut' || true) I/O errors," \
     "$(dmesg | grep -ci 'detected conn error' || true) connection errors"
dmesg | grep -iE 'i/o error|conn error|session recovery|xfs.*shut' | tail -20 || true
"""


def script(body: str, data: dict[str, Any]) -> str:
    edge = data["edges"][0]
    return PRELUDE.format(portal=edge["portal"], iqn=edge["targets"][0]["iqn"], user=CHAP[0],
                          secret=CHAP[1], replacement=REPLACEMENT_TIMEOUT_S) + body


def ok(r: Result, what: str) -> str:
    assert r.rc == 0, f"{what} failed in the guest (rc {r.rc}):\n{r.output}"
    return r.output


def rdump(img: Path, out: Path) -> dict[str, str]:
    """Every file of the ext4 image ``img`` (debugfs, no mount): relative path -> sha256."""
    out.mkdir()
    fsck = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True)
    assert fsck.returncode == 0, f"{img}: e2fsck -fn: {fsck.stdout}{fsck.stderr}"
    subprocess.run(["debugfs", "-R", f"rdump / {out}", str(img)], capture_output=True,
                   check=True)
    return {"./" + str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in out.rglob("*") if p.is_file() and "lost+found" not in p.parts}


def rounds(g: Guest) -> int:
    try:
        return int((g.share / "rounds").read_text())
    except (OSError, ValueError):
        return 0


def more_rounds(g: Guest, n: int, job: int, what: str, timeout: float = 90) -> int:
    """Wait until the guest's workload finished ``n`` more rounds (it is still running)."""
    start = rounds(g)

    def done() -> bool:
        if (g.share / "cmd" / f"{job:05d}.rc").exists():
            raise AssertionError(f"the workload ended early ({what}):\n{g.output(job)}")
        return rounds(g) >= start + n
    wait_for(done, timeout, what=f"{n} workload rounds {what}")
    return rounds(g)


def coredr(data: dict[str, Any], core: str, *args: str) -> subprocess.CompletedProcess[str]:
    c = next(c for c in data["cores"] if c["name"] == core)
    return subprocess.run([sys.executable, "-m", "steelfusion.coredr", "--netns", c["netns"],
                           "--core", c["control"], *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    tool("qemu-img")
    tool("debugfs")
    with lab_at(tmp_path / "lab") as lab:
        yield lab
    netns.remove_all(netns.lab_prefix(netns.labid_for(lab.dir)))  # whatever happened


def test_vm_run_cli_boots_runs_and_removes_everything(image: vmimage.Image,
                                                      tmp_path: Path) -> None:
    """`steelfusion vm run`: the guest's address exists only in its own namespace; the
    script's output and exit code come back; nothing is left afterwards."""
    body = tmp_path / "probe.sh"
    body.write_text("ip -4 -o addr show vec0 | awk '{print $4}'\nping -c1 -W5 10.98.0.1 "
                    ">/dev/null && echo reached-host-side\nuname -r\nexit 3\n")
    p = subprocess.run([sys.executable, "-m", "steelfusion.cli", "vm", "run", str(body),
                        "--workdir", str(tmp_path / "g")],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 3, (p.stdout, p.stderr)
    lines = p.stdout.splitlines()
    assert lines[:2] == ["10.98.0.2/24", "reached-host-side"] and len(lines) == 3, p.stdout
    assert lines[2] in (image.meta.get("uml") or ""), (lines, image.meta)  # the UML kernel
    m = re.search(r"guest up in [\d.]+ s \(.*; netns (sfvm-\S+)\)", p.stderr)
    assert m, p.stderr
    # no guest address in this (the root) namespace, no namespace, process or COW left
    assert "10.98.0." not in subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True,
                                            text=True).stdout
    assert not netns.exists(m.group(1))
    assert not procs_in(tmp_path / "g")
    assert not (tmp_path / "g" / "rootfs.cow").exists()


def test_vm_run_interrupted_removes_everything(image: vmimage.Image, tmp_path: Path) -> None:
    """Ctrl-C while the guest runs a script: the guest is killed, its namespace, tap,
    processes and COW file are gone."""
    body = tmp_path / "long.sh"
    body.write_text("echo started\nsleep 120\n")
    wd = tmp_path / "g"
    # output to files, not pipes: waiting for the CLI must not also wait for whatever
    # inherited its pipes (a UML helper left alive is caught below, by procs_in)
    errf = tmp_path / "vm-run.err"
    with open(tmp_path / "vm-run.out", "wb") as o, open(errf, "wb") as e:
        p = subprocess.Popen([sys.executable, "-m", "steelfusion.cli", "vm", "run", str(body),
                              "--workdir", str(wd)], stdout=o, stderr=e)
    try:
        out = wd / "share" / "cmd" / "00001.out"
        wait_for(lambda: out.exists() and "started" in out.read_text(), 90,
                 what="the guest running the script")
        ns = next(n for n in netns.listing("sfvm-") if n.startswith(f"sfvm-{p.pid}-"))
        assert procs_in(wd)
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
        err = errf.read_text()
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0 and "Traceback" not in err, err
    assert not netns.exists(ns)
    assert not procs_in(wd)
    assert not (wd / "rootfs.cow").exists()


def test_kernel_initiator_through_edge_restart_and_failover(image: vmimage.Image, lab: Lab,
                                                            tmp_path: Path) -> None:
    t_start = time.monotonic()
    data = lab.up(luns=1, lun_size=LUN_SIZE, netns=True, chap=CHAP, timeout=60)
    branch = data["sites"]["branch"]["netns"]
    times: dict[str, float] = {"lab up": time.monotonic() - t_start}
    with Guest(image, netns_name=branch, workdir=tmp_path / "guest", iqn=HOST_IQN) as g:
        times["boot"] = g.boot_seconds
        # 1. ext4: discovery, CHAP login, files written with fsync, fstrim, logout
        ext4 = ok(g.run(script(EXT4, data), timeout=180), "ext4 round trip")
        assert "logged in: /dev/sd" in ext4 and "lun reset: ok" in ext4, ext4
        assert "target reset: ok" in ext4, ext4
        assert "connection errors after the resets: 0" in ext4, ext4
        assert "logged out" in ext4, ext4
        assert re.search(r"/mnt: [^(]+\((?!0 )\d+ bytes\) trimmed", ext4), ext4  # UNMAP
        times["ext4 in guest"] = time.monotonic() - t_start - sum(times.values())
        want = dict(ln.split()[::-1] for ln in (g.share / "ext4.sha256").read_text()
                    .splitlines())
        assert len(want) == 26, want
        # ... identical through the Edge (libiscsi, CHAP) and on both Cores once committed
        lab.wait_committed(timeout=60)
        edge = data["edges"][0]
        url = edge["targets"][0]["url"].replace("iscsi://", f"iscsi://{CHAP[0]}%{CHAP[1]}@")
        through = tmp_path / "through-edge.raw"
        qemu_read(url, through, timeout=120, netns=branch)
        assert rdump(through, tmp_path / "edge-files") == want
        for c in data["cores"]:
            assert rdump(Path(c["luns"]["1"]), tmp_path / f"{c['name']}-files") == want, c["name"]
        through.unlink()
        times["host checks"] = time.monotonic() - t_start - sum(times.values())

        # 2. xfs + a verifying workload across an Edge SIGKILL + restart and a failover
        job = g.submit(script(XFS_WORKLOAD, data))
        more_rounds(g, 2, job, "before the Edge restart")
        lab.kill("edge-1")
        time.sleep(EDGE_OUTAGE_S)  # the fault: open-iscsi retries its login meanwhile
        lab.start("edge-1")
        more_rounds(g, 2, job, "after the Edge restart")
        lab.link("dc-a", "dc-b", cut=True)  # the primary pauses; the Edge buffers
        wait_for(lambda: coredr(data, "core-a", "status", "--json").stdout.count(
            '"replication": "paused"'), 30, what="core-a paused by the cut")
        more_rounds(g, 2, job, "while the Cores are cut apart")
        lab.link("dc-a", "dc-b", heal=True)
        lab.wait_committed(timeout=60)
        lab.kill("core-a")
        wait_for(lambda: coredr(data, "core-b", "failover").returncode == 0, 60,
                 what="coredr failover on core-b granted (core-a gone, Witness lease out)")
        st = coredr(data, "core-b", "status", "--json").stdout
        assert '"role": "primary"' in st, st
        more_rounds(g, 2, job, "after the failover")
        (g.share / "stop").touch()
        r = g.result(job, timeout=120)
        out = ok(r, "the xfs workload")
        assert "logged out" in out and "kernel: 0 I/O errors" in out, out
        assert "err= 0" in out, out
        times["workload"] = time.monotonic() - t_start - sum(times.values())
    lab.wait_committed(timeout=60)
    shutil.rmtree(tmp_path / "guest", ignore_errors=True)
    print("\nVM test times: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
          + f"\nguest output:\n{ext4}{out}", file=sys.stderr)
