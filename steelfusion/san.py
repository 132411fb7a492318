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
  whose kernel has configfs and target_core: ``steelfusion san create|status|delete``
  (steelfusion/sancli.py), tested in User-mode Linux guests (tests/test_vm_san.py);
  this container's kernel has neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from steelfusion import log
from steelfusion.config import ConfigError, load_json
from steelfusion.tasks import die_with_parent
from steelfusion.units import format_addr, parse_addr

IQN_PREFIX = "iqn.2026-11.io.steelfusion"
JOURNAL_LUN = 200
"""The SCSI LUN of a data center's Journal LUN on its array (replicated LUN id k is LUN k)."""

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
@dataclass(frozen=True)
class Acl:
    """One initiator allowed to log in, with its own CHAP credentials (or none)."""

    initiator: str
    chap_user: str | None = None
    chap_secret: str | None = field(default=None, repr=False)


class Provisioner(Protocol):
    """What the lab (and an operator's ``steelfusion san``) asks of an array."""

    def create_target(self, iqn: str) -> None: ...

    def add_lun(self, iqn: str, lun: int, path: str, size: int | None = None) -> None:
        """Export ``path`` (a file of ``size`` bytes, or a block device) as ``lun``."""

    def allow(self, iqn: str, acls: Sequence[Acl] | None) -> None:
        """Only these initiators may log in, each with its CHAP credentials (None: any)."""

    def remove_target(self, iqn: str) -> None: ...


class TgtAdm:
    """tgtd through ``tgtadm``; targets get tids 1, 2, ... in the order they are made.

    tgtd's CHAP accounts belong to a target, not to an initiator: every account of
    :meth:`allow` is accepted from every allowed initiator (LIO checks the pair)."""

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
            shown = ["***" if i and args[i - 1] == "--password" else a
                     for i, a in enumerate(args)]  # a CHAP secret never reaches a message
            raise SanError(f"tgtadm {' '.join(shown)}: {(p.stderr or p.stdout).strip()}")
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

    def add_lun(self, iqn: str, lun: int, path: str, size: int | None = None) -> None:
        tid = str(self._tid(iqn))
        self._adm("--mode", "logicalunit", "--op", "new", "--tid", tid, "--lun", str(lun),
                  "-b", path)
        # thin: a sparse file, and UNMAP punches holes in it (a Core's discards free space
        # on the array too, issue 18)
        self._adm("--mode", "logicalunit", "--op", "update", "--tid", tid, "--lun", str(lun),
                  "--params", "thin_provisioning=1")

    def allow(self, iqn: str, acls: Sequence[Acl] | None) -> None:
        tid = str(self._tid(iqn))
        if acls is None:
            self._adm("--mode", "target", "--op", "bind", "--tid", tid, "-I", "ALL")
            return
        for a in acls:
            self._adm("--mode", "target", "--op", "bind", "--tid", tid,
                      "--initiator-name", a.initiator)
            if a.chap_user is not None and a.chap_secret is not None:
                self._adm("--mode", "account", "--op", "new", "--user", a.chap_user,
                          "--password", a.chap_secret)
                self._adm("--mode", "account", "--op", "bind", "--tid", tid, "--user",
                          a.chap_user)

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


LIO_PREFIX = "sf-"
"""Backstores this project made start with it: ``delete`` removes only those."""
LIO_TPG = 1


def lio_backstore_name(iqn: str, lun: int) -> str:
    """``sf-<target's last name part>-<lun>``: readable in ``targetcli ls``, one per LUN."""
    tail = iqn.rsplit(":", 1)[-1] if ":" in iqn else iqn.rsplit(".", 1)[-1]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in tail)[:40] or "t"
    return f"{LIO_PREFIX}{safe}-{lun}"


def lun_file_size(path: str, size: int | None) -> tuple[str, int]:
    """What backs a LUN: ``("block", bytes)`` for a block device, ``("file", bytes)`` for a
    file (made sparse when missing). A file or device of another size than asked is
    refused: an array never resizes a LUN behind a Core's back."""
    p = Path(path)
    if not p.exists():
        if size is None:
            raise SanError(f"{path}: no such file; give its size to create it "
                           f"(e.g. {path}:1G)")
        if size <= 0 or size % 512:
            raise SanError(f"{path}: size {size} is not a positive multiple of 512 bytes")
        return "file", size
    st = p.stat()
    if stat.S_ISBLK(st.st_mode):
        with open(p, "rb") as f:
            have = f.seek(0, os.SEEK_END)
        kind = "block"
    elif stat.S_ISREG(st.st_mode):
        have, kind = st.st_size, "file"
    else:
        raise SanError(f"{path}: neither a regular file nor a block device")
    if size is not None and have != size:
        raise SanError(f"{path}: the {kind} holds {have} bytes, not the {size} asked for "
                       f"(steelfusion never resizes a LUN: give its size, or another path)")
    if have == 0 or have % 512:
        raise SanError(f"{path}: {have} bytes is not a positive multiple of 512")
    return kind, have


class Lio:
    """The Linux kernel target (LIO) through rtslib-fb: fileio (files) or block (devices)
    backstores, one iSCSI target with one TPG, ACLs with per-initiator CHAP.

    Needs root, configfs and the target_core_mod / iscsi_target_mod modules; rtslib-fb
    loads them and mounts configfs when it can. Objects are found by name in configfs, so
    ``status`` and ``delete`` work in another process than ``create``.
    """

    def __init__(self, portal: tuple[str, int] | None = None) -> None:
        try:
            import rtslib_fb  # type: ignore[import-not-found]
        except ImportError:
            raise SanError("the LIO driver needs rtslib-fb (Debian: apt-get install "
                           "python3-rtslib-fb; pip: steelfusion[lio])") from None
        self.rtslib: Any = rtslib_fb
        try:
            self.root = rtslib_fb.RTSRoot()
        except Exception as e:  # RTSLibError, OSError: no configfs or no target_core_mod
            raise SanError(f"LIO is not available on this kernel (needs root, configfs, "
                           f"target_core_mod and iscsi_target_mod): {e}") from None
        self.portal = portal

    # -- lookup
    def target(self, iqn: str) -> Any | None:
        for t in self.root.targets:
            if t.wwn == iqn and t.fabric_module.name == "iscsi":
                return t
        return None

    def _tpg(self, iqn: str) -> Any:
        t = self.target(iqn)
        if t is None:
            raise SanError(f"no target {iqn} on this host (steelfusion san status lists them)")
        for tpg in t.tpgs:
            if tpg.tag == LIO_TPG:
                return tpg
        raise SanError(f"target {iqn} has no TPG {LIO_TPG}: it was not made by steelfusion")

    def _errors(self, what: str) -> contextlib.AbstractContextManager[None]:
        return _lio_errors(self.rtslib, what)

    # -- Provisioner
    def create_target(self, iqn: str) -> None:
        if self.portal is None:
            raise SanError("a portal (address:port) is needed to create a target")
        if self.target(iqn) is not None:
            raise SanError(f"target {iqn} exists already (steelfusion san delete --target "
                           f"{iqn} removes it)")
        r = self.rtslib
        with self._errors(f"target {iqn}"):
            tpg = r.TPG(r.Target(r.FabricModule("iscsi"), iqn, mode="create"), LIO_TPG,
                        mode="create")
            r.NetworkPortal(tpg, self.portal[0], self.portal[1], mode="create")

    def add_lun(self, iqn: str, lun: int, path: str, size: int | None = None) -> None:
        r = self.rtslib
        tpg = self._tpg(iqn)
        kind, have = lun_file_size(path, size)
        name = lio_backstore_name(iqn, lun)
        if any(so.name == name for so in self.root.storage_objects):
            raise SanError(f"backstore {name} exists already (another target named like "
                           f"{iqn}?); delete it with targetcli first")
        with self._errors(f"LUN {lun} ({path})"):
            if kind == "block":
                so = r.BlockStorageObject(name, dev=path)
            else:
                _make_sparse(Path(path), have)
                so = r.FileIOStorageObject(name, dev=path, size=have, write_back=False)
            try:
                r.LUN(tpg, lun, so)
            except BaseException:
                so.delete()  # no backstore left behind that no LUN uses
                raise

    def allow(self, iqn: str, acls: Sequence[Acl] | None) -> None:
        r = self.rtslib
        tpg = self._tpg(iqn)
        with self._errors(f"ACLs of {iqn}"):
            chap = bool(acls) and any(a.chap_user is not None for a in acls or ())
            if chap and not all(a.chap_user is not None for a in acls or ()):
                raise SanError("CHAP for every ACL or for none: LIO turns authentication on "
                               "per target portal group")
            tpg.set_attribute("authentication", "1" if chap else "0")
            if acls is None:
                for k, v in (("generate_node_acls", "1"), ("cache_dynamic_acls", "1"),
                             ("demo_mode_write_protect", "0")):
                    tpg.set_attribute(k, v)
            else:
                tpg.set_attribute("generate_node_acls", "0")
                for a in acls:
                    acl = r.NodeACL(tpg, a.initiator, mode="create")
                    if a.chap_user is not None:
                        acl.chap_userid = a.chap_user
                        acl.chap_password = a.chap_secret
                    for lun in tpg.luns:
                        r.MappedLUN(acl, lun.lun, lun)
            tpg.enable = True

    def remove_target(self, iqn: str) -> None:
        self.remove(iqn)

    # -- beyond the interface: what `steelfusion san status|delete` need
    def remove(self, iqn: str) -> list[str]:
        """Delete the target (its TPG, portal, LUNs, ACLs and sessions) and the backstores
        this project made for it; files and devices stay. Returns what was removed."""
        tpg = self._tpg(iqn)
        stores = [lun.storage_object for lun in tpg.luns]
        gone = [f"target {iqn}"]
        with self._errors(f"target {iqn}"):
            tpg.parent_target.delete()
            for so in stores:
                if so.name.startswith(LIO_PREFIX) and not list(so.attached_luns):
                    gone.append(f"backstore {so.plugin}/{so.name} ({so.udev_path})")
                    so.delete()
        return gone

    def describe(self, iqn: str | None = None) -> list[dict[str, Any]]:
        """Every iSCSI target (or just ``iqn``): portals, LUNs with their sizes, ACLs (CHAP
        user, never the secret) and sessions."""
        if iqn is not None:
            self._tpg(iqn)  # unknown target: one line
        out = []
        for t in self.root.targets:
            if t.fabric_module.name != "iscsi" or (iqn is not None and t.wwn != iqn):
                continue
            for tpg in t.tpgs:
                out.append(_describe_tpg(t, tpg))
        return out

    def save(self, path: str | None = None) -> str:
        """Save LIO's whole configuration where the boot-time restore reads it
        (rtslib-fb-targetctl.service, targetcli's ``saveconfig``)."""
        dest = path or str(self.rtslib.root.default_save_file)
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        with self._errors(f"saving to {dest}"):
            self.root.save_to_file(dest)
        return dest


def _make_sparse(p: Path, size: int) -> None:
    """A missing LUN file, made sparse at its size (LIO would make it empty)."""
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "ab") as f:
            f.truncate(size)


def _describe_tpg(t: Any, tpg: Any) -> dict[str, Any]:
    def attr(name: str) -> str:
        with contextlib.suppress(Exception):
            return str(tpg.get_attribute(name))
        return ""

    luns = []
    for lun in sorted(tpg.luns, key=lambda x: x.lun):
        so = lun.storage_object
        luns.append({"lun": lun.lun, "backstore": f"{so.plugin}/{so.name}",
                     "path": so.udev_path, "size": int(so.size)})
    acls, sessions = [], []
    for acl in tpg.node_acls:
        acls.append({"initiator": acl.node_wwn, "chap_user": acl.chap_userid or None,
                     "luns": sorted(m.mapped_lun for m in acl.mapped_luns)})
        s = acl.session
        if s:
            sessions.append({"initiator": acl.node_wwn, "state": s.get("state", ""),
                             "type": s.get("type", ""),
                             "connections": [c.get("address", "") for c in
                                             s.get("connections", [])]})
    return {"target": t.wwn, "tpg": tpg.tag, "enabled": bool(tpg.enable),
            "portals": [format_addr((p.ip_address, int(p.port)))
                        for p in tpg.network_portals],
            "authentication": attr("authentication") == "1",
            "generate_node_acls": attr("generate_node_acls") == "1",
            "luns": luns, "acls": acls, "sessions": sessions}


@contextlib.contextmanager
def _lio_errors(rtslib: Any, what: str) -> Iterator[None]:
    """rtslib's errors (RTSLibError, the kernel's OSError from configfs) as one SanError."""
    try:
        yield
    except SanError:
        raise
    except (rtslib.RTSLibError, OSError) as e:
        raise SanError(f"LIO refused {what}: {e}") from None


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
    # per-Core relays to the portal and their control port (steelfusion/sanpath.py)
    paths: dict[str, tuple[str, int]] = field(default_factory=dict)
    path_control: tuple[str, int] | None = None
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
                "log_file": self.log_file,
                "paths": {c: format_addr(a) for c, a in self.paths.items()},
                "path_control": format_addr(self.path_control) if self.path_control else None}

    @classmethod
    def load(cls, path: str | Path) -> SanConfig:
        data = load_json(path)

        def err(msg: str) -> ConfigError:
            return ConfigError(f"{path}: {msg}")

        if not isinstance(data, dict):
            raise err("the config must be a JSON object")
        known = {"name", "portal", "control_port", "iqn", "luns", "initiators", "log_file",
                 "paths", "path_control"}
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
        raw = data.get("paths") or {}
        if not isinstance(raw, dict):
            raise err("paths: an object of Core name -> HOST:PORT")
        try:
            paths = {str(c): parse_addr(str(a)) for c, a in raw.items()}
            pctl = (parse_addr(str(data["path_control"])) if data.get("path_control")
                    else None)
        except ValueError as e:
            raise err(f"paths: {e}") from None
        if paths and pctl is None:
            raise err("path_control: required with paths (the lab cuts a path through it)")
        return cls(data["name"], portal, ctl, data["iqn"], tuple(luns),
                   tuple(inits) if inits is not None else None, data.get("log_file"),
                   paths, pctl, str(path))


def _start_paths(cfg: SanConfig) -> asyncio.AbstractEventLoop | None:
    """The per-Core paths (steelfusion/sanpath.py) on an event loop of their own thread."""
    if not cfg.paths:
        return None
    from steelfusion.sanpath import Paths, serve_control

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="san-paths", daemon=True).start()

    async def start() -> None:
        paths = Paths(cfg.portal, cfg.paths)
        await paths.start()
        assert cfg.path_control is not None
        await serve_control(paths, cfg.path_control)

    asyncio.run_coroutine_threadsafe(start(), loop).result(15)
    return loop


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
            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
    except FileNotFoundError:
        raise SanError("tgtd is not installed (Debian package tgt; `make install` installs "
                       "it)") from None
    finally:
        if out:
            sink.close()  # type: ignore[union-attr]
    path_loop = None
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
        adm.allow(cfg.iqn, None if cfg.initiators is None
                  else [Acl(name) for name in cfg.initiators])
        _log.info("san_ready", portal=format_addr(cfg.portal), iqn=cfg.iqn,
                  luns={lu.lun: lu.path for lu in cfg.luns})
        path_loop = _start_paths(cfg)
        done = stop or threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: done.set())
        while not done.wait(0.5):
            if proc.poll() is not None:
                raise SanError(f"tgtd exited (status {proc.returncode}; see {out})")
    finally:
        if path_loop is not None:
            path_loop.call_soon_threadsafe(path_loop.stop)
        adm.shutdown()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        _log.info("san_stopped")
