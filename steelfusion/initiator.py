"""Real iSCSI initiators driven as subprocesses: qemu-img (libiscsi driver) and libiscsi's tools.

The demo, the tests and the benchmark all go through these, so every byte
they check crossed a real initiator and our iSCSI target. ``netns`` runs the
tool inside a network namespace: a netns lab's hosts live in its ``branch``
namespace (``lab.json``: ``sites.branch.netns``), where the portals are.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from steelfusion.tasks import die_with_parent


class InitiatorError(Exception):
    """An initiator tool is missing or failed; the message carries its output."""


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pkg = {"qemu-img": "qemu-utils", "qemu-io": "qemu-utils", "iscsi-ls": "libiscsi-bin",
               "iscsi-inq": "libiscsi-bin",
               "iscsi-test-cu": "libiscsi-bin", "tgtd": "tgt", "tgtadm": "tgt"}.get(tool, tool)
        raise InitiatorError(f"{tool} not found: install the Debian package {pkg} "
                             "(`make install` does it as root)")
    return path


def _run(cmd: list[str], timeout: float,
         netns: str | None = None) -> subprocess.CompletedProcess[str]:
    enter: Callable[[], None] = die_with_parent
    if netns:
        from steelfusion import netns as ns_mod

        try:
            into = ns_mod.preexec(netns)
        except OSError as e:
            raise InitiatorError(f"cannot run {Path(cmd[0]).name} in network namespace "
                                 f"{netns}: {e}") from None

        def enter() -> None:
            die_with_parent()
            into()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                           preexec_fn=enter)
    except subprocess.TimeoutExpired as e:
        raise InitiatorError(f"{' '.join(cmd)} timed out after {timeout:.0f}s") from e
    except subprocess.SubprocessError as e:  # setns failed in the child
        raise InitiatorError(f"cannot run {Path(cmd[0]).name} in network namespace "
                             f"{netns}: {e}") from None
    if p.returncode != 0:
        raise InitiatorError(f"{' '.join(cmd)} failed ({p.returncode}): "
                             f"{(p.stderr or p.stdout).strip()[-2000:]}")
    return p


@dataclass(frozen=True)
class Transfer:
    nbytes: int
    seconds: float

    @property
    def mb_s(self) -> float:
        return self.nbytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


def qemu_write(src: str | Path, url: str, timeout: float = 600,
               netns: str | None = None) -> Transfer:
    """Copy a raw image file into the LUN at ``url`` (it must be large enough)."""
    size = Path(src).stat().st_size
    t0 = time.monotonic()
    _run([need("qemu-img"), "convert", "-n", "-f", "raw", "-O", "raw", "-t", "none", str(src), url],
         timeout, netns)
    return Transfer(size, time.monotonic() - t0)


def qemu_read(url: str, dst: str | Path, timeout: float = 600,
              netns: str | None = None) -> Transfer:
    """Copy the whole LUN at ``url`` into a raw file."""
    t0 = time.monotonic()
    _run([need("qemu-img"), "convert", "-f", "raw", "-O", "raw", url, str(dst)], timeout, netns)
    return Transfer(Path(dst).stat().st_size, time.monotonic() - t0)


@dataclass(frozen=True)
class BenchResult:
    workload: str
    ops: int
    seconds: float
    block: int

    @property
    def iops(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    @property
    def mb_s(self) -> float:
        return self.iops * self.block / 1e6


def qemu_bench(url: str, *, write: bool, block: int, depth: int, count: int,
               timeout: float = 600, netns: str | None = None, offset: int = 0,
               step: int = 0) -> BenchResult:
    """``qemu-img bench`` through libiscsi at ``offset``, one I/O every ``step`` bytes
    (0: contiguous); returns what it measured."""
    cmd = [need("qemu-img"), "bench", "-f", "raw", "-t", "none", "-n", "-c", str(count),
           "-d", str(depth), "-s", str(block)]
    if offset:
        cmd += ["-o", str(offset)]
    if step:
        cmd += ["-S", str(step)]
    if write:
        cmd += ["-w", "--pattern=0x5a"]
    cmd.append(url)
    out = _run(cmd, timeout, netns).stdout
    m = re.search(r"Run completed in ([\d.]+) seconds", out)
    if not m:
        raise InitiatorError(f"unexpected qemu-img bench output: {out[-500:]}")
    name = f"{'write' if write else 'read'} {block // 1024}K QD{depth}"
    return BenchResult(name, count, float(m.group(1)), block)


def qemu_io(url: str, commands: list[str], timeout: float = 120,
            netns: str | None = None) -> str:
    """Run ``qemu-io`` commands (``write -P 0x5a 0 64k``, ``read -P 0x5a 0 64k``,
    ``discard 0 1M``: sent as UNMAP) against the LUN at ``url``; returns its output. A
    pattern mismatch on read is an error."""
    cmd = [need("qemu-io"), "-f", "raw", "-t", "none", "-d", "unmap"]
    for c in commands:
        cmd += ["-c", c]
    cmd.append(url)
    out = _run(cmd, timeout, netns).stdout
    if "Pattern verification failed" in out or "failed" in out.lower():
        raise InitiatorError(f"{' '.join(cmd)}: {out.strip()[-2000:]}")
    return out
