"""Linux guests for the lab (issue 11): User-mode Linux booted from the cached image.

A :class:`Guest` boots ``linux.uml`` (Debian's ``user-mode-linux``) over the image of
:mod:`steelfusion.vmimage` with a COW file (the image is never written), a shared folder
(hostfs, ``/lab`` in the guest) and one tap link. The tap device is created **inside a
network namespace** (pyroute2) and the kernel runs there, so the guest's private address
and the tap's host-side address exist only in that namespace: either one the guest makes
for itself (and removes), or a lab's (``branch``: the guest then reaches the Edges'
portals as a branch host would).

The guest runs ``sf-agent`` (``vagrant/uml/rootfs``): the host drops scripts into the
shared folder and reads their output and exit code back (:meth:`Guest.run`). Everything a
guest makes (the UML processes, tap, namespace, COW file, folder) is removed when it
closes, also after an error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from steelfusion import log, netns
from steelfusion.vmimage import UML_KERNEL, Image, VmError

_log = log.get("vm")

POLL_S = 0.05
INIT = "/usr/local/sbin/sf-init"
VM_NS_PREFIX = "sfvm-"


@dataclasses.dataclass(frozen=True)
class GuestNet:
    """The tap link: the host side's address (in the namespace) and the guest's, one
    subnet; the guest's default route is the host side."""

    host: str = "10.98.0.1"
    guest: str = "10.98.0.2"
    prefixlen: int = 24
    tap: str = "sfvm0"

    def check(self) -> None:
        try:
            net = ipaddress.ip_network(f"{self.host}/{self.prefixlen}", strict=False)
            if ipaddress.ip_address(self.guest) not in net or self.host == self.guest:
                raise ValueError(f"{self.guest} is not another address in {net}")
        except ValueError as e:
            raise VmError(f"bad guest network: {e}") from None
        if not 0 < len(self.tap) < 16:
            raise VmError(f"tap name {self.tap!r}: 1 to 15 characters")


@dataclasses.dataclass(frozen=True)
class Result:
    """One script's run in the guest."""

    rc: int
    output: str
    seconds: float


class Guest:
    """One booted guest; a context manager (``with Guest(image) as g: g.run("uname -a")``).

    ``netns``: run in this existing namespace (a lab's); None makes one for the guest.
    ``workdir``: where the COW file, console log and shared folder go (a temporary
    folder, removed at the end, when None). ``iqn``: open-iscsi's initiator name.
    ``systemd``: boot with systemd instead of the fast ``sf-init`` (slower: udev and
    systemd under ptrace)."""

    def __init__(self, image: Image, *, netns_name: str | None = None,
                 workdir: Path | None = None, net: GuestNet = GuestNet(), mem: str = "512M",
                 iqn: str | None = None, boot_timeout: float = 90.0,
                 systemd: bool = False) -> None:
        net.check()
        self.image = image
        self.net = net
        self.mem = mem
        self.iqn = iqn
        self.boot_timeout = boot_timeout
        self.systemd = systemd
        self.ns = netns_name
        self.own_ns = netns_name is None
        self.own_dir = workdir is None
        self.dir = Path(workdir) if workdir is not None else Path()  # made by start()
        self.proc: subprocess.Popen[bytes] | None = None
        self.tap_made = False
        self.seq = 0
        self.boot_seconds = 0.0
        self.ready = ""

    @property
    def share(self) -> Path:
        """The shared folder: ``/lab`` in the guest."""
        return self.dir / "share"

    @property
    def cow(self) -> Path:
        return self.dir / "rootfs.cow"

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    # -- life --------------------------------------------------------------------------
    def __enter__(self) -> Guest:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        # after an error or Ctrl-C the guest may be busy or stuck: no clean poweroff
        self.close(timeout=10.0 if e is None else 0.0)

    def start(self) -> None:
        """Namespace, tap, COW, then boot until the agent says it is ready."""
        if not Path(UML_KERNEL).exists():
            raise VmError(f"no {UML_KERNEL}: install the Debian package user-mode-linux")
        if self.ns is None:
            self.ns = f"{VM_NS_PREFIX}{os.getpid()}-{id(self) & 0xffff:x}"
            netns.create(self.ns)
        self._make_tap()
        if self.own_dir:
            self.dir = Path(tempfile.mkdtemp(prefix="sfvm-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.share, ignore_errors=True)
        (self.share / "cmd").mkdir(parents=True)
        self.cow.unlink(missing_ok=True)
        n = self.net
        args = [UML_KERNEL, f"mem={self.mem}", f"ubd0={self.cow},{self.image.path}",
                "root=/dev/ubda", "rw", "con=null", "ssl=null", "con0=null,fd:1",
                f"vec0:transport=tap,ifname={n.tap},depth=128,gro=1",
                f"sf.share={self.share}", f"sf.addr={n.guest}/{n.prefixlen}", f"sf.gw={n.host}",
                "quiet", "systemd.show_status=0"]
        if self.iqn:
            args.append(f"sf.iqn={self.iqn}")
        if not self.systemd:
            args.append(f"init={INIT}")
        env = {**os.environ, "TMPDIR": "/dev/shm" if os.path.isdir("/dev/shm") else str(self.dir)}
        t0 = time.monotonic()
        with open(self.console, "wb") as out:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env=env,
                                         preexec_fn=netns.preexec(self.ns),
                                         start_new_session=True)
        _log.info("vm_boot", pid=self.proc.pid, netns=self.ns, dir=str(self.dir),
                  guest=n.guest)
        ready = self.share / "ready"
        deadline = t0 + self.boot_timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise VmError(f"the guest stopped while booting (exit {self.proc.returncode}); "
                              f"console: {self.console_tail()}")
            if time.monotonic() > deadline:
                raise VmError(f"the guest was not ready within {self.boot_timeout:.0f} s; "
                              f"console: {self.console_tail()}")
            time.sleep(POLL_S)
        self.boot_seconds = time.monotonic() - t0
        self.ready = ready.read_text().strip()
        _log.info("vm_ready", seconds=round(self.boot_seconds, 2), guest=self.ready)

    def _make_tap(self) -> None:
        from pyroute2 import IPRoute

        assert self.ns is not None
        n = self.net
        with netns.in_netns(self.ns), IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")
            if lo:
                ipr.link("set", index=lo[0], state="up")
            old = ipr.link_lookup(ifname=n.tap)
            if old:  # a crashed guest's: replaced
                ipr.link("del", index=old[0])
            ipr.link("add", ifname=n.tap, kind="tuntap", mode="tap")
            self.tap_made = True
            idx = ipr.link_lookup(ifname=n.tap)[0]
            ipr.addr("add", index=idx, address=n.host, prefixlen=n.prefixlen)
            ipr.link("set", index=idx, state="up")

    def _del_tap(self) -> None:
        from pyroute2 import IPRoute

        if not self.tap_made or self.ns is None or not netns.exists(self.ns):
            return
        with contextlib.suppress(OSError), netns.in_netns(self.ns), IPRoute() as ipr:
            for idx in ipr.link_lookup(ifname=self.net.tap):
                ipr.link("del", index=idx)
        self.tap_made = False

    def close(self, timeout: float = 10.0) -> None:
        """Power the guest off (kill it if it does not go), then remove what it made."""
        p = self.proc
        if p is not None and p.poll() is None and timeout > 0:
            with contextlib.suppress(OSError):
                (self.share / "cmd" / "poweroff").touch()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout)
        if p is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)  # UML's helper processes are in its group
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        self.proc = None
        self._del_tap()
        if self.own_ns and self.ns is not None:
            netns.remove(self.ns)
            self.ns = None
        if self.dir != Path():
            self.cow.unlink(missing_ok=True)
            if self.own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = Path()

    # -- scripts -----------------------------------------------------------------------
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def submit(self, script: str) -> int:
        """Queue ``script`` (bash) in the guest; returns its number for :meth:`result`.
        The agent runs scripts one after the other."""
        if not self.alive():
            raise VmError("the guest is not running")
        self.seq += 1
        cmd = self.share / "cmd"
        tmp = cmd / f"{self.seq:05d}.tmp"
        tmp.write_text(script)
        tmp.rename(cmd / f"{self.seq:05d}.sh")
        return self.seq

    def result(self, n: int, timeout: float = 120.0) -> Result:
        """Wait for script ``n`` to finish: its exit code and output."""
        cmd = self.share / "cmd"
        rc_file = cmd / f"{n:05d}.rc"
        t0 = time.monotonic()
        while not rc_file.exists():
            if not self.alive():
                raise VmError(f"the guest stopped while running script {n}; console: "
                              f"{self.console_tail()}")
            if time.monotonic() - t0 > timeout:
                out = self.output(n)
                raise VmError(f"script {n} did not finish within {timeout:.0f} s; its output "
                              f"so far: {out[-1500:]}")
            time.sleep(POLL_S)
        rc = int(rc_file.read_text().strip() or "255")
        return Result(rc, self.output(n), time.monotonic() - t0)

    def output(self, n: int) -> str:
        with contextlib.suppress(OSError):
            return (self.share / "cmd" / f"{n:05d}.out").read_text(errors="replace")
        return ""

    def run(self, script: str, timeout: float = 120.0) -> Result:
        """Run ``script`` (bash) in the guest and wait for it."""
        return self.result(self.submit(script), timeout)

    def console_tail(self, n: int = 1500) -> str:
        with contextlib.suppress(OSError):
            return self.console.read_text(errors="replace")[-n:].strip() or "(empty)"
        return "(none)"


def stale_vm_namespaces() -> list[str]:
    """Namespaces of guests whose runner is gone (``sfvm-PID-…`` with PID not running)."""
    out = []
    for name in netns.listing(VM_NS_PREFIX):
        pid = name[len(VM_NS_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            out.append(name)
    return out
