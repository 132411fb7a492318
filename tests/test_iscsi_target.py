"""The asyncio target against real initiators (libiscsi tools, qemu-img's
libiscsi driver) and against hostile raw TCP clients.

The target runs on 127.0.0.1, port 0, in a background thread with its own
event loop, over a FileBackend in a temporary directory.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from edge.backends import FileBackend
from edge.target import IscsiTarget, TargetNode, portal_with_port
from steelfusion.iscsi import pdu
from steelfusion.iscsi.commands import PrIn, PrOut, pr_in, pr_out
from tests.iscsi_helpers import RawClient

pytestmark = pytest.mark.initiator

IQN = "iqn.2024-01.io.steelfusion:pytest"
LUN_BYTES = 32 * 1024 * 1024


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (Debian: libiscsi-bin, qemu-utils)")
    return path


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool(args[0]), *args[1:]], capture_output=True, text=True,
                          errors="replace", timeout=timeout, check=False)


class TargetThread:
    """An IscsiTarget on its own event loop in a daemon thread."""

    def __init__(self, path: Path, size: int, state_dir: Path | None = None) -> None:
        self.path = path
        self.size = size
        self.state_dir = state_dir
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.target: IscsiTarget | None = None
        self.backend: FileBackend | None = None

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self.thread.start()

        async def up() -> None:
            self.backend = FileBackend(self.path, self.size)
            state = None if self.state_dir is None else str(self.state_dir)
            self.target = IscsiTarget(TargetNode(IQN, {0: self.backend}, alias="pytest lun",
                                                 state_dir=state), "127.0.0.1", 0)
            await self.target.start()
        self.call(up())

    def stop(self) -> None:
        if self.target is not None:
            self.call(self.target.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if self.backend is not None:
            self.backend.close()

    @property
    def port(self) -> int:
        assert self.target is not None
        return self.target.port

    @property
    def url(self) -> str:
        return f"iscsi://127.0.0.1:{self.port}/{IQN}/0"

    def image_opts(self, **extra: str) -> str:
        opts = {"driver": "iscsi", "transport": "tcp", "portal": f"127.0.0.1:{self.port}",
                "target": IQN, "lun": "0", **extra}
        return ",".join(f"{k}={v}" for k, v in opts.items())


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TargetThread]:
    t = TargetThread(tmp_path_factory.mktemp("iscsi") / "lun0.img", LUN_BYTES)
    t.start()
    try:
        yield t
    finally:
        t.stop()


# --------------------------------------------------------------------------- real initiators


@pytest.mark.lab
def test_iscsi_ls_discovery(target: TargetThread) -> None:
    r = run("iscsi-ls", "-s", f"iscsi://127.0.0.1:{target.port}")
    assert r.returncode == 0, r.stderr
    assert f"Target:{IQN} Portal:127.0.0.1:{target.port},1" in r.stdout
    assert re.search(r"Lun:0\s+Type:DIRECT_ACCESS", r.stdout)


@pytest.mark.lab
def test_iscsi_inq(target: TargetThread) -> None:
    r = run("iscsi-inq", target.url)
    assert r.returncode == 0, r.stderr
    assert "Vendor:STEELFUS" in r.stdout and "SBC-3" in r.stdout
    for page, expect in [(0, "0x83 DEVICE_IDENTIFICATION"), (0x80, "Unit Serial Number:[SF"),
                         (0x83, "Designator Type:(3) NAA"),
                         (0xB0, "maximum transfer length:16384"),
                         (0xB1, "Medium Rotation Rate:1")]:
        r = run("iscsi-inq", "-e", "1", "-c", str(page), target.url)
        assert r.returncode == 0, (page, r.stderr)
        assert expect in r.stdout, (page, r.stdout)


@pytest.mark.lab
def test_iscsi_readcapacity16(target: TargetThread) -> None:
    r = run("iscsi-readcapacity16", target.url)
    assert r.returncode == 0, r.stderr
    assert f"RETURNED LOGICAL BLOCK ADDRESS:{LUN_BYTES // 512 - 1}" in r.stdout
    assert "LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT:0" in r.stdout
    assert "LBPME:1 LBPRZ:1" in r.stdout
    assert f"Total size:{LUN_BYTES}" in r.stdout


@pytest.mark.lab
def test_qemu_img_convert_in_and_out(target: TargetThread, tmp_path: Path) -> None:
    src = tmp_path / "in.raw"
    src.write_bytes(os.urandom(8 * 1024 * 1024))
    r = run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), target.url)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out.raw"
    r = run("qemu-img", "convert", "-f", "raw", "-O", "raw", target.url, str(out))
    assert r.returncode == 0, r.stderr
    got = out.read_bytes()
    assert len(got) == LUN_BYTES
    assert got[:8 * 1024 * 1024] == src.read_bytes()


@pytest.mark.lab
def test_qemu_img_info(target: TargetThread) -> None:
    r = run("qemu-img", "info", target.url)
    assert r.returncode == 0, r.stderr
    assert f"({LUN_BYTES} bytes)" in r.stdout


@pytest.mark.parametrize("args", [["-w"], []], ids=["write", "read"])
@pytest.mark.lab
def test_qemu_img_bench(target: TargetThread, args: list[str]) -> None:
    r = run("qemu-img", "bench", *args, "-t", "none", "-c", "3000", "-d", "32", "-s", "4k",
            "-f", "raw", target.url)
    assert r.returncode == 0, r.stderr
    assert "Run completed" in r.stdout


@pytest.mark.lab
def test_header_digest_with_qemu(target: TargetThread, tmp_path: Path) -> None:
    """libiscsi (via qemu's header-digest option) with CRC32C header digests."""
    src = tmp_path / "hd.raw"
    src.write_bytes(os.urandom(1024 * 1024))
    opts = target.image_opts(**{"header-digest": "crc32c"})
    with structlog.testing.capture_logs() as logs:
        r = run("qemu-img", "convert", "-n", "-f", "raw", "--target-image-opts", str(src), opts)
        assert r.returncode == 0, r.stderr
    assert any(e["event"] == "iscsi_login" and e["header_digest"] for e in logs)
    r = run("qemu-img", "bench", "-c", "500", "-d", "8", "-s", "64k", "--image-opts", opts)
    assert r.returncode == 0, r.stderr


@pytest.mark.lab
def test_login_logout_events_logged(target: TargetThread) -> None:
    with structlog.testing.capture_logs() as logs:
        assert run("iscsi-inq", target.url).returncode == 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(
                e["event"] == "iscsi_connection_closed" for e in logs):
            time.sleep(0.02)
    events = [e["event"] for e in logs]
    assert "iscsi_login" in events and "iscsi_logout" in events
    assert "iscsi_connection_closed" in events
    login = next(e for e in logs if e["event"] == "iscsi_login")
    assert login["target"] == IQN and login["session_type"] == "Normal"
    assert "peer" in login


# --------------------------------------------------------------------------- raw clients

MALFORMED = {
    "garbage": os.urandom(200),
    "bad_opcode": bytes([0x3E]) + bytes(47),
    "huge_data_segment": bytes([0x00, 0x80, 0, 0, 0, 0xFF, 0xFF, 0xFF]) + bytes(40),
}


@pytest.mark.parametrize("kind", [*MALFORMED, "after_login"])
@pytest.mark.lab
def test_malformed_pdu_drops_only_that_connection(target: TargetThread, tmp_path: Path,
                                                  kind: str) -> None:
    good = RawClient(target.port, IQN)
    good.login()
    payload = os.urandom(64 * 1024)
    Path(tmp_path / "p.raw").write_bytes(payload)
    reader = subprocess.Popen(  # a real initiator busy on its own session meanwhile
        [tool("qemu-img"), "bench", "-c", "20000", "-d", "16", "-s", "4k", "-f", "raw",
         target.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with structlog.testing.capture_logs() as logs:
            bad = RawClient(target.port, IQN)
            host, port = bad.sock.getsockname()
            bad_addr = f"{host}:{port}"
            if kind == "after_login":
                bad.login()
                bad.sock.sendall(os.urandom(64) + MALFORMED["bad_opcode"])
            else:
                bad.sock.sendall(MALFORMED[kind])
            assert bad.wait_closed(), "target kept the broken connection open"
            bad.close()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not any(
                    e["event"] == "iscsi_protocol_error" for e in logs):
                time.sleep(0.02)
        errors = [e for e in logs if e["event"] == "iscsi_protocol_error"]
        assert len(errors) == 1, logs
        assert errors[0]["peer"] == bad_addr and errors[0]["reason"]
        # The other sessions never noticed.
        assert good.read10(0, 8) is not None
        good.send(pdu.NopOut(itt=77, cmdsn=good.cmdsn, immediate=True, data=b"still here"))
        nop = good.recv()
        assert isinstance(nop, pdu.NopIn) and bytes(nop.data) == b"still here"
        _, err = reader.communicate(timeout=60)
        assert reader.returncode == 0, err
        good.send(pdu.LogoutRequest(itt=78, cmdsn=good.cmdsn, immediate=True))
        assert isinstance(good.recv(), pdu.LogoutResponse)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
        good.close()


def test_pipelined_reads_on_one_connection(target: TargetThread) -> None:
    c = RawClient(target.port, IQN)
    c.login()
    n = 64
    tags = set()
    for i in range(n):
        cdb = bytes((0x28, 0)) + (i * 8).to_bytes(4, "big") + bytes((0, 0, 8, 0))
        tags.add(c.submit(cdb, read_len=4096))
    done: set[int] = set()
    got = 0
    while len(done) < n:
        p = c.recv()
        assert isinstance(p, pdu.DataIn)
        got += len(p.data)
        if p.status_present:
            done.add(p.itt)
    assert got == n * 4096 and done == tags and len(tags) == n
    c.close()


def test_login_timeout_and_target_close(tmp_path: Path) -> None:
    async def go() -> None:
        with FileBackend(tmp_path / "t.img", 1 << 20) as be:
            t = IscsiTarget(TargetNode(IQN, {0: be}), "127.0.0.1", 0, login_timeout_s=0.2)
            await t.start()
            r, w = await asyncio.open_connection("127.0.0.1", t.port)
            assert await asyncio.wait_for(r.read(), 5) == b""  # dropped: never logged in
            w.close()
            r2, w2 = await asyncio.open_connection("127.0.0.1", t.port)
            await asyncio.sleep(0.05)
            assert t.connections == 1
            await t.close()
            assert await asyncio.wait_for(r2.read(), 5) == b""
            w2.close()
    asyncio.run(go())


@pytest.mark.lab
def test_standalone_entry_point(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge.target", "--file", str(tmp_path / "s.img"), "--size", "4M",
         "--port", "0", "--host", "127.0.0.1", "--iqn", IQN],
        stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        url = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if line.startswith("iscsi://"):
                url = line.strip()
                break
        assert url, "no URL printed"
        r = run("iscsi-readcapacity16", url)
        assert r.returncode == 0 and "Total size:4194304" in r.stdout, r.stderr
    finally:
        proc.terminate()
        proc.wait(10)
    assert (tmp_path / "s.img").stat().st_size == 4 * 1024 * 1024


@pytest.mark.parametrize(("option", "value"), [
    ("--size", "abc"), ("--size", "0.3K"), ("--size", "12Q"), ("--size", ""),
    ("--block-size", "0"), ("--block-size", "1000"), ("--block-size", "x"),
    ("--port", "99999"), ("--port", "abc")])
def test_standalone_bad_option_is_one_line(tmp_path: Path, option: str, value: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The standalone target's options are checked before anything starts: a bad
    one is one line naming the option and the value, exit 2, no traceback, no
    file (sizes read as the configs read them, ``steelfusion.units``)."""
    from edge.target import main

    args = {"--file": str(tmp_path / "s.img"), "--size": "1M", "--host": "127.0.0.1",
            "--port": "0", "--no-uvloop": None, option: value}
    with pytest.raises(SystemExit) as e:
        main([x for k, v in args.items() for x in (k, v) if x is not None])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert option in err.splitlines()[-1] and repr(value) in err.splitlines()[-1], err
    assert "Traceback" not in err and not (tmp_path / "s.img").exists()


def test_standalone_refusals_name_the_file_or_port(tmp_path: Path) -> None:
    """A --file that cannot be a LUN, or a port already taken: one line that names
    it and says what to do (``main`` prints it and exits 1), the file closed."""
    from edge.target import _main_async, _parser, _Refused

    def refusal(*argv: str) -> str:
        args = _parser().parse_args(["--host", "127.0.0.1", "--port", "0", *argv])
        with pytest.raises(_Refused) as e:
            asyncio.run(_main_async(args))
        return str(e.value)

    assert refusal("--file", str(tmp_path / "no" / "s.img"), "--size", "1M") == (
        f"cannot open --file {tmp_path / 'no' / 's.img'}: No such file or directory; "
        "give a regular file (in an existing folder) or a block device")
    assert "cannot open --file" in refusal("--file", str(tmp_path), "--size", "1M")
    assert refusal("--file", str(tmp_path / "empty.img")).startswith(
        f"--file {tmp_path / 'empty.img'} holds no whole 512-byte block: give --size")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        why = refusal("--file", str(tmp_path / "s.img"), "--size", "1M", "--port", str(port))
    assert why.startswith(f"cannot listen on 127.0.0.1:{port}: ") and "--port" in why


def test_session_reinstatement_replaces_old_connection(target: TargetThread) -> None:
    """A new login with the same InitiatorName and ISID ends the old
    session (RFC 7143 §6.3.5)."""
    old = RawClient(target.port, IQN)
    old.login()
    new = RawClient(target.port, IQN)
    new.isid = old.isid
    new.login()
    assert old.wait_closed()
    assert len(new.read10(0, 1)) == 512
    old.close()
    new.close()


def test_portal_with_port() -> None:
    assert portal_with_port("10.0.0.5", 3260) == "10.0.0.5:3260"
    assert portal_with_port("10.0.0.5:3261", 3260) == "10.0.0.5:3261"
    assert portal_with_port("10.0.0.5:0", 4000) == "10.0.0.5:4000"
    assert portal_with_port("fe80::1", 3260) == "[fe80::1]:3260"
    assert portal_with_port("[fe80::1]:99", 3260) == "[fe80::1]:99"
    assert portal_with_port("[fe80::1]", 3260) == "[fe80::1]:3260"
    assert portal_with_port("edge.example", 3260) == "edge.example:3260"


@pytest.mark.lab
def test_advertised_portal_in_send_targets(tmp_path: Path) -> None:
    """Listening on one address, advertising another (e.g. behind 0.0.0.0)."""
    async def go() -> tuple[int, str]:
        with FileBackend(tmp_path / "a.img", 1 << 20) as be:
            t = IscsiTarget(TargetNode(IQN, {0: be}), "127.0.0.1", 0,
                            portal_address="192.0.2.10")
            await t.start()
            try:
                assert t.portal_address == f"192.0.2.10:{t.port}"
                proc = await asyncio.create_subprocess_exec(
                    tool("iscsi-ls"), f"iscsi://127.0.0.1:{t.port}",
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                out, _ = await asyncio.wait_for(proc.communicate(), 30)
                return t.port, out.decode(errors="replace")
            finally:
                await t.close()
    port, out = asyncio.run(go())
    assert f"Target:{IQN} Portal:192.0.2.10:{port},1" in out


# --------------------------------------------------------------------------- shared LU state


def test_reservations_are_shared_and_survive_a_restart(tmp_path: Path) -> None:
    """Persistent reservations hold across sessions (two ISIDs = two I_T
    nexuses), a LUN reset from one session gives the other a unit attention,
    and after a target restart the registration and reservation are back."""
    from edge.scsi.pr import PrType

    state = tmp_path / "state"
    def prout(c: RawClient, sa: PrOut, key: int, sa_key: int = 0, t: int = 0) -> int:
        cdb, params = pr_out(sa, key, sa_key, t)
        return c.command(cdb, params)[0]

    write10 = bytes((0x2A, 0, 0, 0, 0, 1, 0, 0, 1, 0))
    read10 = bytes((0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0))
    t = TargetThread(tmp_path / "lun.img", 1 << 20, state)
    t.start()
    try:
        a, b = RawClient(t.port, IQN), RawClient(t.port, IQN)
        a.login()
        b.login()
        assert prout(a, PrOut.REGISTER, 0, 0xABC) == 0
        assert prout(a, PrOut.RESERVE, 0xABC, t=PrType.WRITE_EXCLUSIVE) == 0
        assert b.command(write10, bytes(512))[0] == 0x18  # RESERVATION CONFLICT
        assert b.command(read10, read_len=512)[0] == 0
        assert a.command(write10, bytes(512))[0] == 0
        b.tmf(5)  # LOGICAL UNIT RESET
        r = b.recv()
        assert isinstance(r, pdu.TaskMgmtResponse) and r.response == 0
        status, _, sense = a.command(bytes(6))
        assert status == 2 and sense[2] == 6 and sense[12:14] == bytes((0x29, 0x03))
        assert a.command(bytes(6))[0] == 0
        a.close()
        b.close()
    finally:
        t.stop()
    assert list(state.glob("pr-*.json"))
    t2 = TargetThread(tmp_path / "lun.img", 1 << 20, state)
    t2.start()
    try:
        c = RawClient(t2.port, IQN)
        c.login()
        status, keys, _ = c.command(pr_in(PrIn.READ_KEYS, 64), read_len=64)
        assert status == 0 and int.from_bytes(keys[8:16], "big") == 0xABC
        status, rr, _ = c.command(pr_in(PrIn.READ_RESERVATION, 64), read_len=64)
        assert rr[21] == PrType.WRITE_EXCLUSIVE
        assert c.command(write10, bytes(512))[0] == 0x18
        c.close()
    finally:
        t2.stop()
