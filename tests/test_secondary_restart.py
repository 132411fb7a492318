"""Issue 9: a secondary Core killed and restarted while a host streams writes loses nothing.

Real processes (Witness, two Cores, one Edge) and a real initiator (qemu-io over
libiscsi). The host writes 4 KiB blocks, one every ~2 ms, each block with its own
byte pattern; core-b is SIGKILLed mid-stream, restarted after ~1 s, and the host
keeps writing. Once the Edge has committed everything and the pair is running
again, both Cores' LUN files must equal what the host wrote, byte for byte, and
``coredr verify`` must say IDENTICAL.

Before the fix in steelfusion/link.py the primary's resent mirror writes, which
arrive in the same read as its authentication proof, were dropped by the
restarted secondary: the pair went back to running over a hole of blocks that
were zero on core-b.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from steelfusion.lab import Lab
from tests.conftest import tool
from tests.nodes import SPAWNED, lab_at

pytestmark = [pytest.mark.lab, pytest.mark.initiator, pytest.mark.timeout(60)]

MiB = 1 << 20
BLOCK = 4096
LUN_SIZE = 16 * MiB
NBLOCKS = LUN_SIZE // BLOCK
PACE = 0.002  # seconds between one write's acknowledgement and the next command


def pattern(i: int) -> int:
    """The byte the i-th write fills its block with: never 0, never its neighbours'."""
    return i % 255 + 1


def offset(i: int) -> int:
    return (i % NBLOCKS) * BLOCK


class Writer(threading.Thread):
    """Drives one qemu-io session over stdin: a 4 KiB ``write -P`` at a time, paced.

    Each command is sent only after the previous one was acknowledged (qemu-io
    prints ``wrote …`` when the target answered), so ``acked`` is exactly the
    number of writes the host has seen complete, in order.
    """

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True, name="qemu-io-writer")
        self.proc = subprocess.Popen(["qemu-io", "-f", "raw", url], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
        self.acked = 0
        self.ack_times: list[float] = []
        self.stop = threading.Event()
        self.error = ""

    def run(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            i = 0
            while not self.stop.is_set():
                self.proc.stdin.write(f"write -P {pattern(i)} {offset(i)} {BLOCK}\n")
                self.proc.stdin.flush()
                want = f"wrote {BLOCK}/{BLOCK} bytes at offset {offset(i)}"
                while True:
                    line = self.proc.stdout.readline()
                    if not line:
                        self.error = f"qemu-io exited before acknowledging write {i}"
                        return
                    if want in line:
                        break
                    if "fail" in line.lower() or "error" in line.lower():
                        self.error = f"write {i}: {line.strip()}"
                        return
                self.acked = i = i + 1
                self.ack_times.append(time.monotonic())
                time.sleep(PACE)
        except (OSError, ValueError) as e:
            self.error = f"writer: {e}"

    def wait_acked(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.acked < n:
            assert not self.error, self.error
            assert time.monotonic() < deadline, (
                f"only {self.acked} of {n} writes acknowledged after {timeout}s")
            time.sleep(0.005)

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=20)
        assert not self.is_alive(), "qemu-io writer is stuck"
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        rc = self.proc.wait(timeout=20)
        assert not self.error, self.error
        assert rc == 0, f"qemu-io exited with {rc}"

    def kill(self) -> None:
        self.stop.set()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def expected_image(writes: int) -> bytes:
    img = bytearray(LUN_SIZE)
    for i in range(writes):
        img[offset(i):offset(i) + BLOCK] = bytes([pattern(i)]) * BLOCK
    return bytes(img)


def bad_blocks(got: bytes, want: bytes) -> list[tuple[int, int]]:
    """Runs [first, last] of 4 KiB block indexes where ``got`` differs from ``want``."""
    runs: list[tuple[int, int]] = []
    for b in range(len(want) // BLOCK):
        s = slice(b * BLOCK, (b + 1) * BLOCK)
        if got[s] != want[s]:
            if runs and runs[-1][1] == b - 1:
                runs[-1] = (runs[-1][0], b)
            else:
                runs.append((b, b))
    return runs


def describe(name: str, got: bytes, want: bytes, acked_at_kill: int) -> str:
    runs = bad_blocks(got, want)
    parts = []
    for a, b in runs[:10]:
        zero = all(got[k * BLOCK] == 0 for k in range(a, b + 1))
        parts.append(f"blocks {a}-{b} ({b - a + 1}){' all zero' if zero else ''}")
    return (f"{name}: {sum(b - a + 1 for a, b in runs)} blocks differ from what the host "
            f"wrote: {', '.join(parts)}; {acked_at_kill} writes were acknowledged when "
            "core-b was killed")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    tool("qemu-io")
    with lab_at(tmp_path / "lab") as lab:
        yield lab


def wait_pair_running(lab: Lab, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        reps = {c["name"]: c["replication"] for c in lab.status()["cores"]}
        if reps == {"core-a": "running", "core-b": "replica"}:
            return reps
        assert time.monotonic() < deadline, f"pair not running after {timeout}s: {reps}"
        time.sleep(0.05)


def test_secondary_killed_mid_stream_loses_no_acknowledged_write(lab: Lab) -> None:
    data = lab.up(luns=1, lun_size=LUN_SIZE, edges=1)
    SPAWNED.extend(n["pid"] for n in lab.nodes(data))
    url = data["edges"][0]["targets"][0]["url"]
    files = {c["name"]: Path(c["luns"]["1"]) for c in data["cores"]}

    writer = Writer(url)
    try:
        writer.start()
        writer.wait_acked(200, timeout=15)  # the stream is flowing and mirrored
        acked_at_kill = writer.acked
        lab.kill("core-b")  # SIGKILL, with mirror writes in flight
        time.sleep(1.0)
        SPAWNED.append(lab.start("core-b")["pid"])
        acked_at_start = writer.acked
        t_start = time.monotonic()
        # keep writing across the reconnect (the primary resends its mirror queue) and after it
        wait_pair_running(lab, timeout=20)
        acked_at_running, t_running = writer.acked, time.monotonic()
        writer.wait_acked(writer.acked + 300, timeout=15)
        writer.finish()
    finally:
        writer.kill()
    total = writer.acked
    assert acked_at_start > acked_at_kill, "the host stalled while core-b was down"
    assert total > acked_at_start + 300

    lab.wait_committed(timeout=30)
    wait_pair_running(lab, timeout=20)
    st = lab.status()
    assert st["edges"][0]["uncommitted_bytes"] == 0

    # shown with -s / -rP: how the stream fell around the kill and the restart
    print(f"writes: {acked_at_kill} before kill, {acked_at_start} at restart, "
          f"{acked_at_running} when running again ({t_running - t_start:.2f}s after the "
          f"restart), {total} in all")
    ctl = next(c["control"] for c in data["cores"] if c["name"] == "core-a")
    v = subprocess.run([sys.executable, "-m", "steelfusion.coredr", "--core", ctl, "verify"],
                       capture_output=True, text=True, timeout=30)
    want = expected_image(total)
    images = {name: p.read_bytes() for name, p in files.items()}
    problems = [describe(name, got, want, acked_at_kill) for name, got in images.items()
                if got != want]
    if images["core-a"] != images["core-b"]:
        problems.append("the LUN files of core-a and core-b differ")
    lines = v.stdout.strip().splitlines()
    if v.returncode != 0 or not lines or lines[-1] != "IDENTICAL":
        problems.append(f"coredr verify exited {v.returncode}: {v.stdout.strip()} "
                        f"{v.stderr.strip()}")
    assert not problems, "\n".join(problems)
