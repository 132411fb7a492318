"""One Journal LUN shared by the two Cores of an HA pair, each in its own ``#part=K/N``
(issue 16; seed 002, "FusionSync and Core HA": "one Journal LUN per data center shared by
the HA pair"): steelfusion/partdev.py under journal/opening.py.

Journals need 1 GiB + 2 GiB per LUN each, so the LUNs here are sparse files of two such
parts plus the 1 MiB part table: they cost a few KiB of disk.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from journal import GIB, Journal, describe, errors, required_size
from steelfusion.blockdev import DeviceBusy, create_file, is_san, open_device, parse_part
from steelfusion.fileio import allocation
from steelfusion.initiator import need
from steelfusion.partdev import TABLE_BYTES, TABLE_MAGIC, PartDevice, PartTableError
from steelfusion.san import SanConfig, TgtAdm
from steelfusion.sandev import IscsiDevice, redact
from tests.nodes import wait_for

MIB = 1 << 20
PART = 3 * GIB + 8 * MIB  # room for a journal of one LUN, with slack
LUN_BYTES = TABLE_BYTES + 2 * PART


def sparse(path: Path, size: int = LUN_BYTES) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def region_hash(path: Path, start: int, length: int) -> str:
    """SHA-256 of the bytes in ``[start, start+length)``: what is allocated there, with its
    offset (the rest of a sparse file reads as zeros, so nothing is skipped)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        for off, n, mapped in allocation(fd, start, length):
            if mapped:
                h.update(off.to_bytes(8, "big"))
                h.update(os.pread(fd, n, off))
    finally:
        os.close(fd)
    return h.hexdigest()


# -- the suffix ----------------------------------------------------------------------------
def test_parse_part_takes_the_suffix_off_any_path() -> None:
    assert parse_part("/j.img") == ("/j.img", None)
    assert parse_part("/j.img#part=2/2") == ("/j.img", (2, 2))
    assert parse_part("/dev/sdb#part=16/16") == ("/dev/sdb", (16, 16))
    assert parse_part("/a#b.img") == ("/a#b.img", None)  # a '#' in a file's name is not one
    assert parse_part("/a#b.img#part=1/3") == ("/a#b.img", (1, 3))
    url = "iscsi://127.0.0.1:3260/iqn.x:san-a/9"
    assert parse_part(f"{url}#part=2/2") == (url, (2, 2))
    assert is_san(f"{url}#part=2/2")
    secret = "iscsi://core-a%s3cret@127.0.0.1:3260/iqn.x:san-a/9#part=2/2"
    assert redact(secret) == "iscsi://core-a@127.0.0.1:3260/iqn.x:san-a/9#part=2/2"


@pytest.mark.parametrize("path,words", [
    ("/j.img#part=0/2", "K must be 1 to N=2 (got 0)"),
    ("/j.img#part=3/2", "K must be 1 to N=2 (got 3)"),
    ("/j.img#part=1/17", "N must be 1 to 16 (got 17)"),
    ("/j.img#part=1/0", "N must be 1 to 16 (got 0)"),
    ("/j.img#part=a/2", "want #part=K/N with whole numbers"),
    ("/j.img#part=+1/2", "want #part=K/N with whole numbers"),
    ("/j.img#part= 1/2", "want #part=K/N with whole numbers"),
    ("/j.img#part=1", "want #part=K/N with whole numbers"),
    ("/j.img#part=1/2/3", "want #part=K/N with whole numbers"),
    ("/j.img#part=", "want #part=K/N with whole numbers"),
    ("/j.img#parts=1/2", "bad suffix '#parts=1/2'"),
    ("/j.img#Part=1/2", "bad suffix '#Part=1/2'"),
    ("iscsi://h:3260/iqn.x:a/9#p1", "bad suffix '#p1'"),
    ("iscsi://h:3260/iqn.x:a/9#x#part=1/2", "bad device path before"),
    ("#part=1/2", "bad device path before"),
])
def test_a_bad_suffix_says_what_is_wrong(path: str, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        parse_part(path)
    with pytest.raises(ValueError, match=re.escape(words)):
        open_device(path)


def test_a_part_is_never_created(tmp_path: Path) -> None:
    """A part of a LUN must exist (the LUN is shared: making a file would hide a missing one)."""
    with pytest.raises(errors.JournalUnreachable, match="never created") as ei:
        Journal.open(f"{tmp_path / 'nope.img'}#part=1/2", {1: GIB}, size=10 * GIB)
    assert f"{tmp_path / 'nope.img'} does not exist" in str(ei.value)
    with pytest.raises(ValueError, match="never created"):
        create_file(f"{tmp_path / 'nope.img'}#part=1/2", GIB)
    assert list(tmp_path.iterdir()) == []


# -- the device ----------------------------------------------------------------------------
def test_parts_are_fixed_and_checked(tmp_path: Path) -> None:
    f = sparse(tmp_path / "lun.img", TABLE_BYTES + 2 * 4 * MIB + 123 * 512)
    one = open_device(f"{f}#part=1/2")
    two = open_device(f"{f}#part=2/2")
    assert isinstance(one, PartDevice) and isinstance(two, PartDevice)
    try:
        assert one.size() == two.size() == 4 * MIB  # rounded down to whole MiB
        assert not one.recorded and f.read_bytes()[:TABLE_BYTES] == bytes(TABLE_BYTES)

        a, b = os.urandom(4096), os.urandom(4096)
        one.pwrite(a, 4 * MIB - 4096)  # the last block of part 1 ...
        two.pwritev([b[:512], b[512:]], 0)  # ... and the first of part 2, back to back
        one.sync()
        raw = f.read_bytes()
        assert raw[:8] == TABLE_MAGIC  # recorded before the first write
        assert raw[TABLE_BYTES + 4 * MIB - 4096:TABLE_BYTES + 4 * MIB + 4096] == a + b
        assert one.pread(4096, 4 * MIB - 4096) == a and two.pread(4096, 0) == b

        before = f.read_bytes()
        for which, call in (("1/2", lambda: one.pwrite(a + b, 4 * MIB - 4096)),
                            ("1/2", lambda: one.pwritev([a, b], 4 * MIB - 4096)),
                            ("1/2", lambda: one.pread(1, 4 * MIB)),
                            ("1/2", lambda: one.pread(4096, -4096)),
                            ("2/2", lambda: two.pwrite(a, -4096)),
                            ("2/2", lambda: two.discard(0, 4 * MIB + 4096)),
                            ("2/2", lambda: two.extents(4 * MIB - 512, 1024))):
            with pytest.raises(OSError) as ei:
                call()
            assert ei.value.errno == errno.EINVAL
            assert f"part {which} of {f}: a " in str(ei.value)
            assert "outside the part (4194304 bytes)" in str(ei.value)
        assert f.read_bytes() == before

        exts = two.extents(0, 2 * MIB)  # in the part's own offsets
        assert exts[0][0] == 0 and exts[0][2] and exts[-1][0] + exts[-1][1] == 2 * MIB
        assert not hasattr(one, "fenced") and not hasattr(one, "pr_register")  # a file has none
    finally:
        one.close()
        two.close()

    # growing the LUN moves nothing and grows nothing: the table says where the parts lie
    os.truncate(f, 10 * TABLE_BYTES + 64 * MIB)
    two = open_device(f"{f}#part=2/2")
    try:
        assert isinstance(two, PartDevice) and two.recorded
        assert two.size() == 4 * MIB and two.pread(4096, 0) == b
    finally:
        two.close()
    with pytest.raises(PartTableError, match=r"split into 2 parts .*not 3; use #part=K/2"):
        open_device(f"{f}#part=1/3")


def test_the_same_part_twice_is_refused_the_other_part_is_not(tmp_path: Path) -> None:
    f = sparse(tmp_path / "lun.img", TABLE_BYTES + 2 * 4 * MIB)
    one = open_device(f"{f}#part=1/2")
    one.lock()
    again = open_device(f"{f}#part=1/2")
    two = open_device(f"{f}#part=2/2")
    try:
        with pytest.raises(DeviceBusy, match=f"part 1/2 of {f} is in use"):
            again.lock()  # in this same process too (an open-file-description lock)
        two.lock()
    finally:
        for d in (one, again, two):
            d.close()
    again = open_device(f"{f}#part=1/2")
    again.lock()  # closing the holder let it go
    again.close()


# -- journals on parts ---------------------------------------------------------------------
def test_two_journals_share_one_file_each_in_its_half(tmp_path: Path) -> None:
    """The HA pair's two journals: formatted, written, committed, crashed or closed,
    reopened; each sees only its own slots and dirty regions, and nothing one writes changes
    a byte of the other's half."""
    f = sparse(tmp_path / "journal.img")
    p1, p2 = f"{f}#part=1/2", f"{f}#part=2/2"
    half1, half2 = (TABLE_BYTES, PART), (TABLE_BYTES + PART, PART)

    j1 = Journal.open(p1, {1: GIB})
    assert j1.usage()["size"] == PART
    empty2 = region_hash(f, *half2)
    j2 = Journal.open(p2, {7: 2 * GIB})
    assert region_hash(f, *half2) != empty2  # it did write its own half
    h1 = region_hash(f, *half1)
    for r in (3, 4, 900):
        j2.mark_dirty(7, r * MIB, 10)
    j2.flush()
    j2.checkpoint("test")
    j2.mark_dirty(7, 1500 * MIB, 1)
    j2.flush()
    j2.abandon()  # a crash: region 1500 comes back from the log
    assert region_hash(f, *half1) == h1

    h2 = region_hash(f, *half2)
    j1.mark_dirty(1, 0, 4096)
    j1.mark_dirty(1, 5 * MIB - 10, 20)
    j1.flush()
    j1.close()
    assert region_hash(f, *half2) == h2

    j1, j2 = Journal.open(p1, {1: GIB}), Journal.open(p2, {7: 2 * GIB})
    try:
        assert j1.luns == [1] and j1.dirty(1).tolist() == [0, 4, 5] and j1.clean_at_open
        assert j2.luns == [7] and j2.dirty(7).tolist() == [3, 4, 900, 1500]
        assert not j2.clean_at_open
        # a part never grows: its size is what it was, and so is what status shows
        os.truncate(f, LUN_BYTES + 8 * GIB)
        assert j1.refresh_size() == PART and j1.usage()["size"] == PART
        with pytest.raises(errors.JournalTooSmall, match=r"#part=1/2 is 3\.0 GiB.*a part never "
                                                          r"grows once its Journal LUN is in use"):
            j1.add_lun(2, GIB)
    finally:
        j1.close()
        j2.close()
    assert [u["lun"] for u in describe(p2)["luns"]] == [7]  # read-only, on the part too

    # neither a whole-LUN journal on the split LUN nor parts of a whole-LUN journal
    with pytest.raises(errors.JournalCorrupt, match="not a steelfusion journal"):
        Journal.open(f, {1: GIB})
    whole = sparse(tmp_path / "whole.img")
    Journal.open(whole, {1: GIB}).close()
    with pytest.raises(errors.JournalCorrupt, match="does not start with a part table"):
        Journal.open(f"{whole}#part=2/2", {1: GIB})


def test_the_same_journal_part_twice_is_busy(tmp_path: Path) -> None:
    f = sparse(tmp_path / "journal.img")
    j = Journal.open(f"{f}#part=2/2", {1: GIB})
    try:
        with pytest.raises(errors.JournalError, match="each Core needs its own part of the "
                                                      "shared Journal LUN") as ei:
            Journal.open(f"{f}#part=2/2", {1: GIB})
        assert ei.value.alarm == "journal_busy"
    finally:
        j.close()


def test_a_part_too_small_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """The seed's rule, per part; nothing is written, so growing the LUN then still works."""
    f = sparse(tmp_path / "journal.img")
    luns = {1: GIB, 2: GIB}  # 5 GiB each
    with pytest.raises(errors.JournalTooSmall,
                       match=r"#part=2/2 is 3\.0 GiB; 2 protected LUN\(s\) need at least 5 GiB "
                             r"\(1 GiB \+ 2 GiB per LUN\).*2 x 5 GiB \+ 1 MiB") as ei:
        Journal.open(f"{f}#part=2/2", luns, size=100 * GIB)
    assert ei.value.size == PART and ei.value.need == required_size(2)
    assert os.stat(f).st_blocks == 0 and f.stat().st_size == LUN_BYTES  # not touched at all
    os.truncate(f, TABLE_BYTES + 2 * required_size(2))
    Journal.open(f"{f}#part=2/2", luns).close()


# -- a part of a SAN LUN -------------------------------------------------------------------
@pytest.mark.lab
@pytest.mark.timeout(180)
def test_two_journals_on_halves_of_one_san_lun(tmp_path: Path) -> None:
    """The lab array (tgtd) exports one LUN; each Core's journal is a part of its URL."""
    from steelfusion.lab import free_ports
    from tests.test_san import _start

    port, = free_ports(1)
    lun_file = tmp_path / "shared-journal.img"
    cfg_path = tmp_path / "san-p.json"
    cfg_path.write_text(json.dumps({
        "name": "san-p", "portal": f"127.0.0.1:{port}", "control_port": 20000 + port % 9000,
        "iqn": "iqn.2026-11.io.steelfusion:san-p",
        "luns": [{"lun": 9, "path": str(lun_file), "size": LUN_BYTES}],
        "initiators": None, "log_file": str(tmp_path / "san-p.log")}))
    cfg = SanConfig.load(cfg_path)
    proc = _start(cfg_path)
    try:
        wait_for(lambda: TgtAdm(cfg.control_port).ready(), 20, "tgtd up")
        url = cfg.url(9)
        wait_for(lambda: subprocess.run([need("qemu-img"), "info", url],
                                        capture_output=True).returncode == 0, 20,
                 "the LUN to be exported")
        p1, p2 = f"{url}#part=1/2", f"{url}#part=2/2"
        half1, half2 = (TABLE_BYTES, PART), (TABLE_BYTES + PART, PART)

        j1 = Journal.open(p1, {1: GIB})
        j2 = Journal.open(p2, {2: GIB})
        dev = j2.device
        assert isinstance(dev, PartDevice) and dev.size() == PART
        assert dev.fenced is None  # the SAN LUN's own attributes come through
        assert isinstance(dev._dev, IscsiDevice)
        j1.mark_dirty(1, 7 * MIB, 1)
        j1.flush()
        j1.close()
        h1 = region_hash(lun_file, *half1)
        j2.mark_dirty(2, 11 * MIB, 1)
        j2.mark_dirty(2, 12 * MIB, 1)
        j2.flush()
        j2.abandon()
        assert region_hash(lun_file, *half1) == h1
        with open(lun_file, "rb") as fh:
            assert fh.read(8) == TABLE_MAGIC

        h2 = region_hash(lun_file, *half2)
        j1, j2 = Journal.open(p1, {1: GIB}), Journal.open(p2, {2: GIB})
        try:
            assert j1.luns == [1] and j1.dirty(1).tolist() == [7]
            assert j2.luns == [2] and j2.dirty(2).tolist() == [11, 12]
            j1.mark_dirty(1, 100 * MIB, 1)
            j1.checkpoint("test")
        finally:
            j1.close()
            j2.close()
        assert region_hash(lun_file, *half2) != h2  # j2's reopen recovered and checkpointed
        h2 = region_hash(lun_file, *half2)
        j1 = Journal.open(p1, {1: GIB})
        try:
            assert j1.dirty(1).tolist() == [7, 100]
        finally:
            j1.close()
        assert region_hash(lun_file, *half2) == h2
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
