"""A data center's storage array for the lab: LUN files exported over iSCSI (issue 12).

In SteelFusion the Core owns no disks. It projects LUNs that live on the data center's
array, and its Journal LUN is one more LUN there (seed 002). ``lab up --san tgt`` gives
each data center such an array: ``steelfusion san run`` supervises one tgtd, exports the
data center's LUN files and its Journal LUN, and takes tgtd down with it. Killing the
supervisor (``lab kill san-a``) is a SAN outage. The kernel kills tgtd too
(PR_SET_PDEATHSIG), so every session to it drops.

Provisioning is one small interface, :class:`Provisioner`, with two drivers:

* :class:`TgtAdm` drives tgtd with ``tgtadm``. This is the lab's array, and it runs
  anywhere tgt is installed.
* :class:`Lio` drives the Linux kernel target (LIO) through rtslib-fb, on a Linux host
  whose kernel has configfs and target_core (the Linux hosts issue runs it in
  User-mode Linux guests; this container's kernel has neither).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from steelfusion import log
from steelfusion.config import ConfigError, load_json
from steelfusion.units import format_addr, parse_addr

IQN_PREFIX = "iqn.2026-11.io.steelfusion"
JOURNAL_LUN = 200
"""The SCSI LUN of a data center's Journal LUN on its array (replicated LUN id k is LUN k)."""
PR_SET_PDEATHSIG = 1

_log = log.get("san")


class SanError(Exception):
    """The array cannot be started or provisioned; the message says what to do."""


TGT_IPC_DIR = Path("/var/run/tgtd")
_tgt_ctls: set[int] = set()  # management ports this process handed out and still uses


def free_tgt_control_port() -> int:
    """A tgtd management port no running tgtd holds (in any namespace).

    tgtd refuses to start when another one holds the lock on
    ``/var/run/tgtd/socket.N.lock`` (a POSIX lock): probe that lock.
    """
    base = 20000 + os.getpid() % 10000
    for i in range(200):
        ctl = 20000 + (base - 20000 + i) % 10000
        if ctl in _tgt_ctls:
            continue
        lock = TGT_IPC_DIR / f"socket.{ctl}.lock"
        try:
            fd = os.open(lock, os.O_WRONLY)
        except FileNotFoundError:
            _tgt_ctls.add(ctl)
            return ctl
        except OSError:
            continue
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a running tgtd holds it
        finally:
            os.close(fd)  # closing drops our probe lock
        _tgt_ctls.add(ctl)
        return ctl
    raise SanError(f"no free tgtd control port: every lock {TGT_IPC_DIR}/socket.N.lock "
                   f"tried is held; stop stray tgtd processes")


def release_tgt_control_port(ctl: int) -> None:
    """This process no longer uses ``ctl`` (its tgtd stopped)."""
    _tgt_ctls.discard(ctl)


# -- provisioning: one interface, two drivers ---------------------------------------------
class Provisioner(Protocol):
    """What the lab (and an operator's ``steelfusion san``) asks of an array."""

    def create_target(self, iqn: str) -> None: ...

    def add_lun(self, iqn: str, lun: int, path: str) -> None: ...

    def allow(self, iqn: str, initiators: Sequence[str] | None) -> None:
        """Only these initiator names may log in (None: any)."""

    def remove_target(self, iqn: str) -> None: ...


class TgtAdm:
    """tgtd through ``tgtadm``; targets get tids 1, 2, ... in the order they are made."""

    def __init__(self, control_port: int) -> None:
        self.ctl = control_port
        self.tids: dict[str, int] = {}

    def _adm(self, *args: str) -> str:
        try:
            p = subprocess.run(["tgtadm", "-C", str(self.ctl), "--lld", "iscsi", *args],
                               capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            raise SanError("tgtadm is not installed (Debian package tgt; `make install` "
                           "installs it)") from None
        if p.returncode != 0:
            raise SanError(f"tgtadm {' '.join(args)}: {(p.stderr or p.stdout).strip()}")
        return p.stdout

    def _tid(self, iqn: str) -> int:
        try:
            return self.tids[iqn]
        except KeyError:
            raise SanError(f"no target {iqn} on this array") from None

    def create_target(self, iqn: str) -> None:
        tid = len(self.tids) + 1
        self._adm("--mode", "target", "--op", "new", "--tid", str(tid), "-T", iqn)
        self.tids[iqn] = tid

    def add_lun(self, iqn: str, lun: int, path: str) -> None:
        self._adm("--mode", "logicalunit", "--op", "new", "--tid", str(self._tid(iqn)),
                  "--lun", str(lun), "-b", path)

    def allow(self, iqn: str, initiators: Sequence[str] | None) -> None:
        tid = str(self._tid(iqn))
        if initiators is None:
            self._adm("--mode", "target", "--op", "bind", "--tid", tid, "-I", "ALL")
            return
        for name in initiators:
            self._adm("--mode", "target", "--op", "bind", "--tid", tid,
                      "--initiator-name", name)

    def remove_target(self, iqn: str) -> None:
        self._adm("--mode", "target", "--op", "delete", "--force", "--tid",
                  str(self._tid(iqn)))
        del self.tids[iqn]

    def ready(self) -> bool:
        """tgtd answers on its management port."""
        try:
            self._adm("--mode", "system", "--op", "show")
        except SanError:
            return False
        return True

    def shutdown(self) -> None:
        """tgtd ignores SIGTERM; this is how it stops (its targets first, sessions or not)."""
        with contextlib.suppress(SanError):
            for line in self._adm("--mode", "target", "--op", "show").splitlines():
                if line.startswith("Target ") and ":" in line:
                    tid = line.split()[1].rstrip(":")
                    with contextlib.suppress(SanError):
                        self._adm("--mode", "target", "--op", "delete", "--force", "--tid", tid)
        with contextlib.suppress(SanError):
            self._adm("--mode", "system", "--op", "delete")


class Lio:
    """The Linux kernel target (LIO) through rtslib-fb: fileio backstores, one TPG.

    Needs root, configfs and the target_core_mod / iscsi_target_mod modules.
    """

    def __init__(self, portal: tuple[str, int]) -> None:
        try:
            import rtslib_fb  # type: ignore[import-not-found]
        except ImportError:
            raise SanError("the LIO driver needs rtslib-fb (Debian: python3-rtslib-fb)"
                           ) from None
        self.rtslib: Any = rtslib_fb
        try:
            self.root = rtslib_fb.RTSRoot()
        except Exception as e:  # rtslib raises RTSLibError or OSError without configfs
            raise SanError(f"LIO is not available on this kernel (configfs, target_core_mod, "
                           f"iscsi_target_mod): {e}") from None
        self.portal = portal
        self.tpgs: dict[str, Any] = {}

    def create_target(self, iqn: str) -> None:
        r = self.rtslib
        fabric = r.FabricModule("iscsi")
        tpg = r.TPG(r.Target(fabric, iqn), 1)
        r.NetworkPortal(tpg, self.portal[0], self.portal[1])
        tpg.enable = True
        self.tpgs[iqn] = tpg

    def add_lun(self, iqn: str, lun: int, path: str) -> None:
        r = self.rtslib
        name = f"sf-{Path(path).stem}-{lun}"
        store = r.FileIOStorageObject(name, path, write_back=False)
        r.LUN(self.tpgs[iqn], lun, store)

    def allow(self, iqn: str, initiators: Sequence[str] | None) -> None:
        tpg = self.tpgs[iqn]
        if initiators is None:
            tpg.set_attribute("generate_node_acls", "1")
            tpg.set_attribute("demo_mode_write_protect", "0")
            return
        for name in initiators:
            acl = self.rtslib.NodeACL(tpg, name)
            for lun in tpg.luns:
                self.rtslib.MappedLUN(acl, lun.lun, lun)

    def remove_target(self, iqn: str) -> None:
        tpg = self.tpgs.pop(iqn)
        for lun in list(tpg.luns):
            so = lun.storage_object
            lun.delete()
            so.delete()
        tpg.parent_target.delete()


# -- the lab's array: config and supervisor -------------------------------------------------
@dataclass(frozen=True)
class SanLun:
    lun: int
    path: str
    size: int


@dataclass(frozen=True)
class SanConfig:
    """``steelfusion san run``'s JSON config: one tgtd, one target, its LUN files."""

    name: str
    portal: tuple[str, int]
    control_port: int
    iqn: str
    luns: tuple[SanLun, ...] = field(default_factory=tuple)
    initiators: tuple[str, ...] | None = None
    log_file: str | None = None
    source: str = ""

    @property
    def url_base(self) -> str:
        return f"iscsi://{format_addr(self.portal)}/{self.iqn}"

    def url(self, lun: int) -> str:
        return f"{self.url_base}/{lun}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "portal": format_addr(self.portal),
                "control_port": self.control_port, "iqn": self.iqn,
                "luns": [{"lun": lu.lun, "path": lu.path, "size": lu.size} for lu in self.luns],
                "initiators": list(self.initiators) if self.initiators is not None else None,
                "log_file": self.log_file}

    @classmethod
    def load(cls, path: str | Path) -> SanConfig:
        data = load_json(path)

        def err(msg: str) -> ConfigError:
            return ConfigError(f"{path}: {msg}")

        if not isinstance(data, dict):
            raise err("the config must be a JSON object")
        known = {"name", "portal", "control_port", "iqn", "luns", "initiators", "log_file"}
        extra = sorted(set(data) - known)
        if extra:
            raise err(f"unknown key '{extra[0]}' (keys: {', '.join(sorted(known))})")
        try:
            portal = parse_addr(str(data.get("portal", "")))
        except ValueError as e:
            raise err(f"portal: {e}") from None
        ctl = data.get("control_port")
        if not isinstance(ctl, int) or not 0 < ctl < 65536:
            raise err(f"control_port: a TCP port number, got {ctl!r}")
        luns = []
        for i, lu in enumerate(data.get("luns") or []):
            if not (isinstance(lu, dict) and isinstance(lu.get("lun"), int)
                    and 0 < lu["lun"] < 16384 and isinstance(lu.get("path"), str)
                    and isinstance(lu.get("size"), int) and lu["size"] > 0):
                raise err(f"luns[{i}]: want {{\"lun\": 1..16383, \"path\": FILE, \"size\": "
                          f"BYTES}}, got {lu!r}")
            luns.append(SanLun(lu["lun"], lu["path"], lu["size"]))
        inits = data.get("initiators")
        if inits is not None and not (isinstance(inits, list)
                                      and all(isinstance(x, str) for x in inits)):
            raise err("initiators: a list of initiator names, or null for any")
        for key in ("name", "iqn"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise err(f"{key}: required, a non-empty string")
        return cls(data["name"], portal, ctl, data["iqn"], tuple(luns),
                   tuple(inits) if inits is not None else None, data.get("log_file"),
                   str(path))


def _die_with_parent() -> None:
    """In tgtd's child, before exec: the kernel SIGKILLs it when its supervisor dies."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def serve(cfg: SanConfig, stop: threading.Event | None = None) -> None:
    """Start tgtd, create the LUN files (sparse, never shrunk), export them, run until
    SIGTERM/SIGINT, then take tgtd down."""
    for lu in cfg.luns:
        p = Path(lu.path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "ab") as f:
            if os.fstat(f.fileno()).st_size < lu.size:
                f.truncate(lu.size)
    adm = TgtAdm(cfg.control_port)
    if adm.ready():
        raise SanError(f"control port {cfg.control_port}: another tgtd already answers there "
                       "(stop it, or give this array another control_port)")
    out = Path(cfg.log_file).with_suffix(".tgtd.log") if cfg.log_file else None
    sink = open(out, "ab") if out else subprocess.DEVNULL  # noqa: SIM115 - handed to tgtd
    try:
        proc = subprocess.Popen(
            ["tgtd", "-f", "-C", str(cfg.control_port), "--iscsi",
             f"portal={format_addr(cfg.portal)}"], stdout=sink, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    except FileNotFoundError:
        raise SanError("tgtd is not installed (Debian package tgt; `make install` installs "
                       "it)") from None
    finally:
        if out:
            sink.close()  # type: ignore[union-attr]
    try:
        deadline = time.monotonic() + 15
        while not adm.ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SanError(f"tgtd did not start on portal {format_addr(cfg.portal)} "
                               f"(control port {cfg.control_port}; see {out})")
            time.sleep(0.05)
        adm.create_target(cfg.iqn)
        for lu in cfg.luns:
            adm.add_lun(cfg.iqn, lu.lun, lu.path)
        adm.allow(cfg.iqn, cfg.initiators)
        _log.info("san_ready", portal=format_addr(cfg.portal), iqn=cfg.iqn,
                  luns={lu.lun: lu.path for lu in cfg.luns})
        done = stop or threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: done.set())
        while not done.wait(0.5):
            if proc.poll() is not None:
                raise SanError(f"tgtd exited (status {proc.returncode}; see {out})")
    finally:
        adm.shutdown()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        _log.info("san_stopped")
