"""The lab's processes: start one detached in its namespace, ask it, wait for it, stop it.

Every ``lab`` command and test that runs real nodes goes through these, so a node is
started, found alive (its pid still runs *that* node, never a recycled pid) and stopped
the same way everywhere. The one-line error a node prints when it cannot start is what
:class:`LabError` carries up to the operator.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from steelfusion import control, faultdisk
from steelfusion.units import format_addr, parse_addr


class LabError(Exception):
    """The lab could not be started, found or changed; the message says what to do."""


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Ports free now (held together so they are distinct), taken below the kernel's
    ephemeral range when there is room: a lab allocates every node's ports first and starts
    the nodes one by one, and an outgoing connection of a node already running (an HA lab
    opens dozens of iSCSI sessions) could otherwise take a port from the ephemeral range
    before its own node binds it (seen: an HA Core's [ha] listen in use at start)."""
    low = _ephemeral_low()
    socks: list[socket.socket] = []
    try:
        pool = list(range(max(1024, low - 12000), low))
        random.shuffle(pool)
        for port in pool:
            if len(socks) == n:
                break
            s = socket.socket()
            try:
                s.bind((host, port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        while len(socks) < n:  # no room below: the kernel's choice, as before
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _python() -> str:
    return sys.executable


def spawn(role: str, config: Path, workdir: Path, name: str, netns: str | None = None) -> int:
    """Start one node detached from this process (so ``lab up`` can return).

    Its stdout/stderr go to ``<name>.out``: readable log lines (info and up) and,
    when it cannot start, its one-line error last. With ``netns`` the node runs
    inside that network namespace (it must exist)."""
    enter: Callable[[], None] | None = None
    if netns:
        from steelfusion import netns as ns_mod

        try:
            enter = ns_mod.preexec(netns)
        except OSError as e:
            raise LabError(f"cannot start {name}: {e}; the lab's namespaces are gone (`lab "
                           f"down` removes them): run `steelfusion lab up --netns --workdir "
                           f"{workdir}` again") from None
    out = open(workdir / f"{name}.out", "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            [_python(), "-m", "steelfusion.cli", role, "run", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=str(workdir), preexec_fn=enter,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.SubprocessError as e:  # the preexec (setns) failed in the child
        raise LabError(f"cannot start {name} in network namespace {netns}: {e}") from None
    finally:
        out.close()
    return proc.pid


@contextlib.contextmanager
def _entered(netns: str | None) -> Iterator[None]:
    """This thread inside ``netns`` for the block (nothing to do without one)."""
    if not netns:
        yield
        return
    from steelfusion import netns as ns_mod

    with ns_mod.in_netns(netns):
        yield


def call_node(node: dict[str, Any], cmd: str, timeout: float = 3.0,
              **args: Any) -> dict[str, Any]:
    """A control command to a lab node, from inside its namespace in a netns lab."""
    with _entered(node.get("netns")):
        return control.call(parse_addr(node["control"]), cmd, timeout=timeout, **args)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as dead
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


def last_error(workdir: Path, name: str) -> str:
    """The line a node that stopped left last in its ``.out`` (its one-line error)."""
    try:
        with open(workdir / f"{name}.out", "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return f"no output (see {workdir / (name + '.log')})"
    lines = [ln for ln in lines if ln]
    if not lines:
        return f"no output (see {workdir / (name + '.log')})"
    line = lines[-1]
    return line[len("Error: "):] if line.startswith("Error: ") else line


def node_alive(node: dict[str, Any]) -> bool:
    """The pid ``lab.json`` records still runs that node (after a reboot, or long after
    ``lab down``, the pid may belong to another process: never signal that one)."""
    pid = node["pid"]
    if not pid_alive(pid):
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc to ask: trust the pid
    want = str(node.get("config") or "").encode()
    return b"steelfusion.cli" in cmd and (not want or want in cmd)


def wait_control(addr: tuple[str, int], pid: int, timeout: float, name: str,
                 workdir: Path, netns: str | None = None) -> dict[str, Any]:
    """Until the node answers ``status`` on its control port (from inside ``netns``);
    its own error if it exits."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            raise LabError(f"{name} (pid {pid}) exited during start-up: "
                           f"{last_error(workdir, name)}")
        try:
            with _entered(netns):
                reply = control.call(addr, "status", timeout=2)
            if reply.get("ok"):
                return reply
            last = str(reply.get("error"))
        except (OSError, ValueError, control.ControlError) as e:
            last = str(e)
        time.sleep(0.05)
    raise LabError(f"{name} did not answer on {format_addr(addr)} within {timeout:.0f}s ({last})")


def wait_mounted(disk: dict[str, Any], timeout: float, workdir: Path) -> None:
    """Until the disk answers on its control file; its own error if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(disk["pid"]):
            raise LabError(f"{disk['name']} exited: {last_error(workdir, disk['name'])}")
        with contextlib.suppress(OSError, ValueError):
            faultdisk.read_mode(disk["mount"])
            return
        time.sleep(0.05)
    raise LabError(f"{disk['name']} did not mount {disk['mount']} within {timeout:.0f}s "
                   f"(see {workdir / (disk['name'] + '.out')})")


def disk_status(disk: dict[str, Any]) -> dict[str, Any]:
    out = {"name": disk["name"], "core": disk.get("core"), "pid": disk["pid"],
           "mount": disk["mount"], "running": node_alive(disk)}
    if out["running"]:
        try:
            out.update(faultdisk.read_mode(disk["mount"]))
        except (OSError, ValueError) as e:
            out["error"] = str(e)
    return out


def read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def stop_pids(nodes: list[tuple[str, int]], timeout: float = 15.0) -> list[str]:
    """SIGTERM, last started first (Edges flush to the Cores), then SIGKILL after
    ``timeout``; returns the names of those that were running."""
    stopped = []
    for name, pid in reversed(nodes):
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            stopped.append(name)
    deadline = time.monotonic() + timeout
    for _, pid in nodes:
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for _, pid in nodes:  # gone before we return (a SIGKILLed one too)
        end = time.monotonic() + 5
        while pid_alive(pid) and time.monotonic() < end:
            time.sleep(0.02)
    return stopped
