"""The lab's storage array (steelfusion/san.py): tgtd supervised, provisioned, outaged (issue 12)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steelfusion.config import ConfigError
from steelfusion.initiator import need
from steelfusion.lab import free_ports
from steelfusion.san import JOURNAL_LUN, SanConfig, TgtAdm
from tests.nodes import SPAWNED, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.timeout(120)]
MiB = 1 << 20


def _config(tmp: Path) -> tuple[Path, SanConfig]:
    port, = free_ports(1)
    ctl = 20000 + port % 9000
    cfg = {"name": "san-t", "portal": f"127.0.0.1:{port}", "control_port": ctl,
           "iqn": "iqn.2026-11.io.steelfusion:san-t",
           "luns": [{"lun": 1, "path": str(tmp / "lun-1.img"), "size": 64 * MiB},
                    {"lun": JOURNAL_LUN, "path": str(tmp / "journal.img"), "size": 3 << 30}],
           "initiators": None, "log_file": str(tmp / "san-t.log")}
    path = tmp / "san-t.json"
    path.write_text(json.dumps(cfg))
    return path, SanConfig.load(path)


def _start(path: Path) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([sys.executable, "-m", "steelfusion.cli", "san", "run", "--config",
                          str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    SPAWNED.append(p.pid)
    return p


def _tgtd_of(p: subprocess.Popen[bytes]) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(p.pid), "tgtd"], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] == "Z"
    except OSError:
        return True


def test_array_exports_its_luns_and_goes_down_with_its_supervisor(tmp_path: Path) -> None:
    path, cfg = _config(tmp_path)
    p = _start(path)
    try:
        wait_for(lambda: TgtAdm(cfg.control_port).ready() and _tgtd_of(p), 20, "tgtd up")
        url = cfg.url(1)
        wait_for(lambda: subprocess.run([need("qemu-img"), "info", url], capture_output=True
                                        ).returncode == 0, 20, "the LUN to be exported")
        (tmp_path / "img").write_bytes(os.urandom(4 * MiB))
        subprocess.run([need("qemu-img"), "convert", "-n", "-O", "raw", str(tmp_path / "img"),
                        url], check=True, capture_output=True, timeout=60)
        assert (tmp_path / "lun-1.img").read_bytes()[:4 * MiB] == (tmp_path / "img").read_bytes()
        info = subprocess.run([need("qemu-img"), "info", cfg.url(JOURNAL_LUN)],
                              capture_output=True, text=True, check=True).stdout
        assert "3 GiB" in info
        # a SAN outage: SIGKILL the supervisor, and tgtd dies with it (PR_SET_PDEATHSIG)
        tgtd = _tgtd_of(p)
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        wait_for(lambda: all(_gone(t) for t in tgtd), 10, "tgtd to die with its supervisor")
        # started again on the same files: the data is there
        p = _start(path)
        wait_for(lambda: subprocess.run([need("qemu-img"), "info", url], capture_output=True
                                        ).returncode == 0, 20, "the array back")
        subprocess.run([need("qemu-img"), "convert", "-O", "raw", url, str(tmp_path / "back")],
                       check=True, capture_output=True, timeout=60)
        assert (tmp_path / "back").read_bytes()[:4 * MiB] == (tmp_path / "img").read_bytes()
        tgtd = _tgtd_of(p)
    finally:
        p.send_signal(signal.SIGTERM)  # the supervisor stops tgtd through tgtadm
        p.wait(20)
    assert p.returncode == 0, p.stderr.read() if p.stderr else ""
    time.sleep(0.2)
    assert all(_gone(t) for t in tgtd)


def test_a_busy_control_port_and_bad_configs_are_one_line(tmp_path: Path) -> None:
    path, cfg = _config(tmp_path)
    p = _start(path)
    try:
        wait_for(lambda: TgtAdm(cfg.control_port).ready(), 20, "tgtd up")
        second = subprocess.run([sys.executable, "-m", "steelfusion.cli", "san", "run",
                                 "--config", str(path)], capture_output=True, text=True,
                                timeout=60)
        assert second.returncode != 0
        lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "another tgtd already answers there" in lines[0], lines
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(20)
    bad = tmp_path / "bad.json"
    for body, want in (({"name": "x"}, "portal"),
                       ({"name": "x", "portal": "127.0.0.1:1", "control_port": 5, "iqn": "i",
                         "luns": [{"lun": 0, "path": "p", "size": 1}]}, "luns[0]"),
                       ({"name": "x", "portal": "127.0.0.1:1", "control_port": 5, "iqn": "i",
                         "bogus": 1}, "unknown key 'bogus'")):
        bad.write_text(json.dumps(body))
        with pytest.raises(ConfigError, match=want.replace("[", r"\[")):
            SanConfig.load(bad)
