"""Journal LUN errors on a real failing disk (steelfusion/faultdisk.py, FUSE), issue 10.

Seed 002: "Journal LUN-error handling ... loss of connectivity and offlining ... out of
storage ... an alarm is raised on the Core". The Core must also lose nothing: while its
Journal LUN fails, writes it cannot record are held (the Edge keeps them uncommitted,
the host's writes still succeed); when the disk works again the Core reopens the journal
by itself, marks every region dirty, and resync makes the Cores identical.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from steelfusion import faultdisk
from steelfusion.initiator import qemu_io, qemu_read
from steelfusion.lab import Lab, LabError
from tests.nodes import SPAWNED, alarms, status, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.timeout(180)]
MiB = 1 << 20
WHY_NOT = faultdisk.available()
needs_fuse = pytest.mark.skipif(WHY_NOT is not None, reason=f"no FUSE disk here: {WHY_NOT}")


def _mounts() -> str:
    return Path("/proc/self/mounts").read_text()


@pytest.fixture
def disk(tmp_path: Path) -> Any:
    cfg = tmp_path / "d.json"
    mount = tmp_path / "mnt"
    cfg.write_text(json.dumps({"name": "jd", "backing": str(tmp_path / "back"),
                               "mount": str(mount), "log_file": str(tmp_path / "d.log")}))
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        p = subprocess.Popen([sys.executable, "-m", "steelfusion.cli", "disk", "run",
                              "--config", str(cfg)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        SPAWNED.append(p.pid)
        procs.append(p)
        wait_for(lambda: faultdisk.read_mode(mount), 15, "the disk to mount")
        return p

    yield mount, start
    for p in procs:
        if p.poll() is None:
            p.terminate()
            p.wait(10)
    faultdisk.unmount(mount)


@needs_fuse
def test_disk_modes_fail_the_calls_they_name(disk: Any) -> None:
    mount, start = disk
    proc = start()
    fd = os.open(mount / "j.img", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"a" * 4096, 0)
        os.fdatasync(fd)
        assert faultdisk.set_mode(mount, "full")["mode"] == "full"
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"b" * 4096, 4096)
        assert e.value.errno == errno.ENOSPC
        assert os.pread(fd, 4, 0) == b"aaaa"  # a thin LUN out of space still reads
        os.fdatasync(fd)
        assert faultdisk.set_mode(mount, "offline")["mode"] == "offline"
        for call in (lambda: os.pread(fd, 4, 0), lambda: os.fdatasync(fd),
                     lambda: os.pwrite(fd, b"c", 0)):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.EIO
        state = faultdisk.set_mode(mount, "ok")
        assert state["mode"] == "ok" and state["failed_calls"] == 0
        os.pwrite(fd, b"d" * 4096, 4096)
        assert os.pread(fd, 8, 4092) == b"aaaadddd"
        with pytest.raises(ValueError, match="unknown disk mode 'broken'"):
            faultdisk.set_mode(mount, "broken")
        ctl = os.open(mount / faultdisk.CONTROL, os.O_WRONLY)
        with pytest.raises(OSError) as e:  # the control file refuses it too
            os.write(ctl, b"broken")
        os.close(ctl)
        assert e.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    # SIGKILL leaves a dead mount (ENOTCONN); a new server replaces it
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    with pytest.raises(OSError) as e:
        os.stat(mount / "j.img")
    assert e.value.errno == errno.ENOTCONN
    proc = start()
    assert (mount / "j.img").read_bytes()[4092:4100] == b"aaaadddd"
    proc.terminate()  # SIGTERM unmounts
    proc.wait(10)
    assert str(mount) not in _mounts()


@needs_fuse
def test_core_holds_writes_while_its_journal_fails_and_loses_none(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "lab")
    data = lab.up(lun_size=32 * MiB, journal_faults=True, timeout=60)
    try:
        core_a, core_b = (c["control"] for c in data["cores"])
        edge = data["edges"][0]
        url = edge["targets"][0]["url"]
        assert [d["name"] for d in lab.status()["disks"]] == ["jdisk-core-a", "jdisk-core-b"]

        # suspended: every new region must be logged before the Core acknowledges
        subprocess.run([sys.executable, "-m", "steelfusion.coredr", "--core", core_a,
                        "suspend"], check=True, capture_output=True, timeout=30)
        qemu_io(url, ["write -P 0x11 0 1M"])
        lab.journal_fault("core-a", "full")
        qemu_io(url, ["write -P 0x22 8M 1M"])  # the host's write succeeds (the Edge has it)
        wait_for(lambda: "journal_full" in alarms(core_a), 15, "alarm journal_full")
        time.sleep(1.5)
        assert status(edge["control"])["uncommitted_bytes"] > 0  # held, not acknowledged
        lab.journal_fault("core-a", "ok")
        wait_for(lambda: status(edge["control"])["uncommitted_bytes"] == 0, 20,
                 "the held writes to commit after the journal is reopened")
        assert "journal_full" not in alarms(core_a)
        log = (tmp_path / "lab" / "core-a.log").read_text()
        assert '"event": "journal_reopened"' in log and '"resync": "every region"' in log

        # running: the activity log fails too; writes wait, the disk server may even die
        subprocess.run([sys.executable, "-m", "steelfusion.coredr", "--core", core_a,
                        "resume"], check=True, capture_output=True, timeout=30)
        wait_for(lambda: status(core_a)["replication"] == "running", 30, "running")
        lab.journal_fault("core-a", "offline")
        qemu_io(url, ["write -P 0x33 16M 2M"])
        wait_for(lambda: alarms(core_a) & {"journal_unreachable", "journal_offline"}, 15,
                 "a journal alarm")
        lab.kill("jdisk-core-a")
        qemu_io(url, ["write -P 0x44 20M 1M"])
        st = lab.status()
        assert not st["disks"][0]["running"]
        lab.start("jdisk-core-a")
        lab.wait_committed(timeout=30)
        wait_for(lambda: status(core_a)["replication"] == "running"
                 and not alarms(core_a), 60, "resync done and no alarm")
        wait_for(lambda: status(core_b)["replication"] == "replica", 30, "a replica")
        want = bytearray(32 * MiB)
        for val, off, n in ((0x11, 0, 1), (0x22, 8, 1), (0x33, 16, 2), (0x44, 20, 1)):
            want[off * MiB:(off + n) * MiB] = bytes([val]) * n * MiB
        qemu_read(url, tmp_path / "read.img")
        assert (tmp_path / "read.img").read_bytes() == want
        for core in ("core-a", "core-b"):
            assert (tmp_path / "lab" / core / "lun-1.img").read_bytes() == want, core
    finally:
        lab.down()
    assert str(tmp_path / "lab") not in _mounts()  # both disks unmounted


def test_journal_fault_needs_a_lab_started_with_it(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    (tmp_path / "lab.json").write_text(json.dumps({
        "version": 1, "witness": {"name": "witness", "pid": 1, "control": "127.0.0.1:9"},
        "cores": [{"name": "core-a", "pid": 1, "control": "127.0.0.1:9"}],
        "edges": [{"name": "edge-1", "pid": 1, "control": "127.0.0.1:9"}]}))
    with pytest.raises(LabError, match="plain files: start it with `steelfusion lab up "
                                        "--journal-faults`"):
        lab.journal_fault("core-a", "full")
    with pytest.raises(LabError, match="no Core 'core-z'"):
        lab.journal_fault("core-z", "full")


