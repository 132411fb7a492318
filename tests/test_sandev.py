"""A Core's block devices (steelfusion/blockdev.py, steelfusion/sandev.py) against real
storage: a tgtd LUN over the Core's initiator, and a loop block device (issue 12)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from core.lunstore import LunStore
from journal.journal import Journal
from steelfusion.blockdev import FileDevice, open_device
from steelfusion.initiator import need
from steelfusion.iscsi.commands import Sense
from steelfusion.iscsi.errors import CheckCondition
from steelfusion.san import TgtAdm
from steelfusion.sandev import IscsiDevice, os_error, redact
from tests.nodes import wait_for
from tests.test_san import _config, _start

pytestmark = [pytest.mark.lab, pytest.mark.timeout(180)]
MiB = 1 << 20


def test_redact_hides_a_chap_secret() -> None:
    assert redact("iscsi://u%s3cret@h:3260/iqn.x/1") == "iscsi://u@h:3260/iqn.x/1"
    assert redact("iscsi://h:3260/iqn.x/1") == "iscsi://h:3260/iqn.x/1"


@pytest.mark.parametrize("key,asc,ascq,code,words", [
    (5, 0x25, 0x00, errno.EIO, "the LUN is gone from the array"),
    (5, 0x21, 0x00, errno.EIO, "the LUN is smaller than the Core expects (it shrank)"),
    (7, 0x27, 0x07, errno.ENOSPC, "the array's thin pool is out of space"),
    (7, 0x27, 0x00, errno.EIO, "the array made the LUN read-only"),
    (3, 0x0C, 0x00, errno.EIO, "the array could not write"),
    (5, 0x99, 0x42, errno.EIO, "ASC/ASCQ 99/42"),
])
def test_an_arrays_check_condition_becomes_an_errno_and_words(
        key: int, asc: int, ascq: int, code: int, words: str) -> None:
    """What the Core's alarm says (issue 12, item 4): a full thin pool is ENOSPC as a disk
    would say it, the rest EIO, each in words, the CHAP secret never in the text."""
    e = os_error(CheckCondition(Sense(key, asc, ascq, b""), "WRITE(16)"),
                 "iscsi://core-a%s3cret@10.99.1.1:3261/iqn.x:san-a/1", "write")
    assert e.errno == code and words in str(e) and "s3cret" not in str(e), str(e)


def test_san_lun_as_a_device_rides_out_an_outage(tmp_path: Path) -> None:
    path, cfg = _config(tmp_path)
    p = _start(path)
    try:
        wait_for(lambda: TgtAdm(cfg.control_port).ready(), 20, "tgtd up")
        wait_for(lambda: subprocess.run([need("qemu-img"), "info", cfg.url(1)],
                                        capture_output=True).returncode == 0, 20,
                 "the LUN to be exported")
        dev = open_device(cfg.url(1))
        assert isinstance(dev, IscsiDevice)
        try:
            assert dev.size() == 64 * MiB and dev.trouble() is None
            with pytest.raises(ValueError, match="not whole 512-byte blocks"):
                dev.pwrite(b"x" * 100, 0)
            a = os.urandom(MiB)
            dev.pwrite(a, 0)
            dev.pwritev([a[:4096], a[4096:8192]], 2 * MiB)
            dev.sync()
            assert dev.pread(MiB, 0) == a and dev.pread(8192, 2 * MiB) == a[:8192]
            assert (tmp_path / "lun-1.img").read_bytes()[:MiB] == a

            # a discard is an UNMAP on the array: its (thin, sparse) LUN file gets the
            # space back and reads zeros there (issue 18)
            lun_file = tmp_path / "lun-1.img"
            before = os.stat(lun_file).st_blocks * 512
            dev.discard(0, MiB)
            dev.sync()
            assert os.stat(lun_file).st_blocks * 512 <= before - MiB
            assert dev.pread(MiB, 0) == bytes(MiB) and dev._unmap_ok
            ext = dev.extents(0, 3 * MiB)  # from the array's GET LBA STATUS:
            # discarded, then never written, then the 8 KiB written at 2 MiB
            assert ext[0] == (0, 2 * MiB, False) and ext[1][:1] == (2 * MiB,) and ext[1][2], ext
            dev.pwrite(a, 0)
            dev.sync()

            p.send_signal(signal.SIGKILL)  # the array goes away (tgtd dies with it)
            p.wait(10)
            wait_for(lambda: dev.trouble() is not None, 30, "the session seen down")
            assert "reconnecting" in (dev.trouble() or "")
            t0 = time.monotonic()
            with pytest.raises(OSError, match="down"):
                dev.pread(4096, 0)  # at once: a caller on the Core's loop must not stall
            assert time.monotonic() - t0 < 1
            b = os.urandom(MiB)
            dev.pwrite(b, MiB)  # queued while the array is away
            assert dev.size() == 64 * MiB  # the last answer, not a stall

            p = _start(path)
            dev.sync()  # returns once the array is back and the write landed
            assert dev.trouble() is None
            assert (tmp_path / "lun-1.img").read_bytes()[MiB:2 * MiB] == b
        finally:
            dev.close()
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(20)


def test_lun_store_and_journal_on_loop_block_devices(tmp_path: Path) -> None:
    """A block device path keeps working (what a Core on a Linux host with open-iscsi uses)."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    devs = []
    try:
        for name, size in (("lun", 64 * MiB), ("journal", 3 << 30)):
            f = tmp_path / f"{name}.img"
            with open(f, "wb") as fh:
                fh.truncate(size)
            out = subprocess.run(["losetup", "--find", "--show", str(f)], capture_output=True,
                                 text=True)
            if out.returncode != 0:
                pytest.skip(f"no loop device: {out.stderr.strip()}")
            devs.append(out.stdout.strip())
        lun_dev, journal_dev = devs
        store = LunStore(1, lun_dev, 64 * MiB, create=False)
        assert isinstance(store.dev, FileDevice) and not store.dev.is_file
        data = os.urandom(MiB)
        store.pwrite(0, data)
        store.dev.sync()
        assert store.pread(0, MiB) == data
        store.close()
        j = Journal.open(journal_dev, {1: 64 * MiB})
        assert j.mark_dirty(1, 0, MiB)
        j.checkpoint("test")
        j.close(clean=True)
        j = Journal.open(journal_dev, {1: 64 * MiB})
        assert j.dirty_count(1) > 0
        j.close(clean=True)
    finally:
        for d in devs:
            subprocess.run(["losetup", "-d", d], check=False)
