"""A disk that fails on command: a FUSE file system over a folder, for the lab's Journal LUNs.

Arrays fail in ways a plain file never does: a thin pool runs out of space
(writes fail ENOSPC: seed 002, "out of storage"), or the paths to a LUN go
away (every I/O fails EIO: "loss of connectivity and offlining"). Storage
engineers rehearse that with the kernel's dm-error and dm-flakey targets.
This machine's kernel has no device mapper and no NBD, but it has FUSE. So
``lab up --journal-faults`` serves each Core's Journal LUN through this file
system. The Core opens a real file and does real pread, pwrite and
fdatasync. The errors it sees are the kernel's replies to this process, as
they would be from a failing device.

The mode is written to, and read back from, the control file
``<mount>/.faultdisk``:

``ok``
    Every call passes through to the folder.
``full``
    Writes fail ENOSPC, like a thin LUN out of space. Reads and syncs still work.
``offline``
    Reads, writes and syncs fail EIO, like a LUN whose paths are gone.

Reading the control file gives a JSON line: the mode, how long it has been
in that mode, and how many calls have failed. Pages are never cached
(``direct_io``): an error reaches the caller at the call that causes it,
never later at writeback.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steelfusion import log
from steelfusion.config import ConfigError, load_json

CONTROL = ".faultdisk"
MODES = ("ok", "full", "offline")
MNT_DETACH = 2

_log = log.get("faultdisk")


@dataclass(frozen=True)
class DiskConfig:
    """``backing``: the folder holding the files; ``mount``: where they appear."""

    name: str
    backing: str
    mount: str
    log_file: str | None = None
    source: str = ""

    @classmethod
    def load(cls, path: str | Path) -> DiskConfig:
        data = load_json(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the config must be a JSON object")
        known = {"name", "backing", "mount", "log_file"}
        extra = sorted(set(data) - known)
        if extra:
            raise ConfigError(f"{path}: unknown key '{extra[0]}' (keys: {', '.join(sorted(known))})")
        for key in ("name", "backing", "mount"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise ConfigError(f"{path}: {key}: required, a non-empty string")
        if data["backing"] == data["mount"]:
            raise ConfigError(f"{path}: backing and mount must be different folders")
        return cls(data["name"], data["backing"], data["mount"], data.get("log_file"), str(path))


def available() -> str | None:
    """None if this process can serve a FUSE disk, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not ctypes.util.find_library("fuse3") and not ctypes.util.find_library("fuse"):
        return "no libfuse (apt-get install libfuse3-3)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:
        return f"mfusepy does not load: {e}"
    return None


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def unmount(mount: str | Path) -> bool:
    """Detach a mount (a stale one a killed server left: ENOTCONN); False if none was there."""
    rc = _libc().umount2(os.fsencode(str(mount)), MNT_DETACH)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):  # not a mount point, or gone
        return False
    raise OSError(err, f"cannot unmount {mount}: {os.strerror(err)}")


def is_mounted(mount: str | Path) -> bool:
    """Whether ``mount`` is a mount point (a dead server's counts: stat says ENOTCONN)."""
    target = os.path.realpath(mount)
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            return any(line.split()[1] == target for line in f if len(line.split()) > 1)
    except OSError:
        return os.path.ismount(target)


def read_mode(mount: str | Path) -> dict[str, Any]:
    """The disk's state, read from its control file."""
    with open(Path(mount) / CONTROL, "rb") as f:
        state = json.loads(f.read() or b"{}")
    if not isinstance(state, dict):
        raise ValueError(f"{mount}/{CONTROL}: not a JSON object")
    return state


def set_mode(mount: str | Path, mode: str) -> dict[str, Any]:
    """Put the disk in ``mode`` (one of MODES); returns its new state."""
    if mode not in MODES:
        raise ValueError(f"unknown disk mode {mode!r} (modes: {', '.join(MODES)})")
    fd = os.open(Path(mount) / CONTROL, os.O_WRONLY)
    try:
        os.write(fd, mode.encode())
    finally:
        os.close(fd)
    return read_mode(mount)


def _operations() -> type:
    import mfusepy as fuse

    class FaultFS(fuse.Operations):  # type: ignore[misc, name-defined]
        """Pass-through to ``root``, failing calls as the mode says."""

        use_ns = True

        def __init__(self, root: str) -> None:
            self.root = root
            self.mode = "ok"
            self.since = time.time()
            self.failed = 0
            self._lock = threading.Lock()

        def _p(self, path: str) -> str:
            return os.path.join(self.root, path.lstrip("/"))

        def _fail(self, code: int, op: str, path: str) -> None:
            with self._lock:
                self.failed += 1
                first = self.failed == 1
            if first:
                _log.warning("disk_call_failed", op=op, path=path, error=os.strerror(code),
                             mode=self.mode)
            raise fuse.FuseOSError(code)

        def _check(self, op: str, path: str, write: bool) -> None:
            mode = self.mode
            if mode == "offline":
                self._fail(errno.EIO, op, path)
            if mode == "full" and write:
                self._fail(errno.ENOSPC, op, path)

        def _state(self) -> bytes:
            return (json.dumps({"mode": self.mode, "since": self.since,
                                "seconds": round(time.time() - self.since, 1),
                                "failed_calls": self.failed}) + "\n").encode()

        # -- the control file ---------------------------------------------------------
        def _set(self, text: str) -> None:
            mode = text.strip().lower()
            if mode not in MODES:
                _log.warning("disk_mode_refused", asked=mode[:40])
                raise fuse.FuseOSError(errno.EINVAL)
            with self._lock:
                old, self.mode = self.mode, mode
                self.since = time.time()
                self.failed = 0
            _log.warning("disk_mode", mode=mode, was=old)

        # -- metadata -----------------------------------------------------------------
        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            if path == "/" + CONTROL:
                now = time.time_ns()
                return {"st_mode": 0o100600, "st_nlink": 1, "st_size": 4096,
                        "st_uid": os.getuid(), "st_gid": os.getgid(),
                        "st_atime_ns": now, "st_mtime_ns": now, "st_ctime_ns": now}
            st = os.fstat(fh) if fh is not None else os.lstat(self._p(path))
            return {k: getattr(st, k) for k in (
                "st_mode", "st_nlink", "st_size", "st_uid", "st_gid", "st_blocks",
                "st_atime_ns", "st_mtime_ns", "st_ctime_ns")}

        def readdir(self, path: str, fh: int) -> list[str]:
            names = [".", "..", *os.listdir(self._p(path))]
            return [*names, CONTROL] if path == "/" else names

        def statfs(self, path: str) -> dict[str, int]:
            st = os.statvfs(self.root)
            return {k: getattr(st, k) for k in (
                "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
                "f_files", "f_flag", "f_frsize", "f_namemax")}

        def mkdir(self, path: str, mode: int) -> None:
            os.mkdir(self._p(path), mode)

        def rmdir(self, path: str) -> None:
            os.rmdir(self._p(path))

        def unlink(self, path: str) -> None:
            os.unlink(self._p(path))

        def rename(self, old: str, new: str) -> None:
            os.rename(self._p(old), self._p(new))

        def chmod(self, path: str, mode: int) -> None:
            os.chmod(self._p(path), mode)

        def chown(self, path: str, uid: int, gid: int) -> None:
            os.chown(self._p(path), uid, gid)

        def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
            if path == "/" + CONTROL:
                return
            if times is None:
                os.utime(self._p(path))
            else:
                os.utime(self._p(path), ns=times)

        # -- data ---------------------------------------------------------------------
        def open(self, path: str, flags: int) -> int:
            if path == "/" + CONTROL:
                return 0
            self._check("open", path, write=False)
            return os.open(self._p(path), flags & ~(os.O_CREAT | os.O_EXCL))

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            self._check("create", path, write=True)
            return os.open(self._p(path), os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            if path == "/" + CONTROL:
                return self._state()[offset:offset + size]
            self._check("read", path, write=False)
            return os.pread(fh, size, offset)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            if path == "/" + CONTROL:
                self._set(bytes(data).decode(errors="replace"))
                return len(data)
            self._check("write", path, write=True)
            return os.pwrite(fh, data, offset)

        def truncate(self, path: str, length: int, fh: int | None = None) -> None:
            if path == "/" + CONTROL:
                return
            self._check("truncate", path, write=length > 0)
            if fh is not None:
                os.ftruncate(fh, length)
            else:
                os.truncate(self._p(path), length)

        def fallocate(self, path: str, mode: int, offset: int, length: int, fh: int) -> None:
            self._check("fallocate", path, write=True)
            os.posix_fallocate(fh, offset, length)

        def fsync(self, path: str, datasync: int, fh: int) -> None:
            if path == "/" + CONTROL:
                return
            self._check("fsync", path, write=False)
            if datasync:
                os.fdatasync(fh)
            else:
                os.fsync(fh)

        def flush(self, path: str, fh: int) -> None:
            return None

        def release(self, path: str, fh: int) -> None:
            if path != "/" + CONTROL:
                os.close(fh)

    return FaultFS


def serve(cfg: DiskConfig) -> None:
    """Mount and serve until SIGTERM/SIGINT or an unmount; a stale mount is replaced."""
    import mfusepy as fuse

    backing, mount = Path(cfg.backing), Path(cfg.mount)
    backing.mkdir(parents=True, exist_ok=True)
    if is_mounted(mount):
        unmount(mount)  # left by a killed server: every call on it fails ENOTCONN
    mount.mkdir(parents=True, exist_ok=True)
    ops = _operations()(str(backing))
    _log.info("disk_started", backing=str(backing), mount=str(mount))

    # SIGTERM is left at its default so that libfuse installs its own handler (it only
    # replaces SIG_DFL): the main thread sits in fuse_main's C loop, where a Python
    # handler would never run. libfuse's ends the loop and unmounts.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        fuse.FUSE(ops, str(mount), foreground=True, direct_io=True, default_permissions=True,
                  fsname=f"faultdisk-{cfg.name}")
    except RuntimeError as e:  # fuse_main's status: non-zero after a signal too
        if is_mounted(mount):
            raise RuntimeError(f"FUSE on {mount} failed (status {e})") from None
    _log.info("disk_stopped")
