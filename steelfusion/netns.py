"""Named network namespaces for the netns lab (issue 10): create, enter, clean up.

Namespaces are created with pyroute2 (a bind mount under ``/run/netns``, like
``ip netns add``), never by shelling out. Entering one is a ``setns(2)`` on the
calling thread only: :func:`in_netns` for a block of code in this process (a
socket keeps the namespace it was created in), :func:`preexec` for a child
process. Names are ``sf{labid}-{site}`` where ``labid`` comes from the lab's
workdir, so parallel labs and tests never share a namespace and a crashed
lab's leftovers are found by prefix.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from pyroute2 import netns as _pr_netns

from steelfusion import log

_log = log.get("netns")

RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000


class NetnsError(OSError):
    """A namespace could not be created or entered; the message says which and why."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)  # str(e) is the message alone: one line for an operator
        self.errno = err


def ns_name(labid: str, site: str) -> str:
    """The namespace of ``site`` in the lab ``labid``."""
    return f"sf{labid}-{site}"


def lab_prefix(labid: str) -> str:
    """The prefix every namespace of the lab ``labid`` starts with."""
    return f"sf{labid}-"


def labid_for(workdir: Path) -> str:
    """Six hex characters naming a lab by its (resolved) workdir."""
    return hashlib.sha256(str(Path(workdir).resolve()).encode()).hexdigest()[:6]


def path(name: str) -> str:
    return os.path.join(RUN_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def create(name: str) -> None:
    """Create the namespace ``name``; an existing one (a crashed lab's) is replaced.

    Removing and re-creating gives a namespace with nothing stale in it
    (addresses, routes, devices); processes still inside the old one keep it
    alive but nothing can reach them by name any more.
    """
    if exists(name):
        _log.info("netns_replaced", netns=name)
        remove(name)
    try:
        _pr_netns.create(name)
    except OSError as e:
        why = e.strerror or str(e)
        if e.errno and os.strerror(e.errno) not in why:
            why = f"{why}: {os.strerror(e.errno)}"
        raise NetnsError(e.errno or errno.EPERM,
                         f"cannot create network namespace {name}: {why} "
                         f"(needs root: CAP_SYS_ADMIN)") from None


def remove(name: str) -> None:
    """Remove the namespace ``name``; a missing one is fine."""
    p = path(name)
    if not os.path.lexists(p):
        return
    with contextlib.suppress(OSError):
        _libc().umount2(p.encode(), 2)  # MNT_DETACH
    with contextlib.suppress(FileNotFoundError):
        os.unlink(p)


def listing(prefix: str = "sf") -> list[str]:
    """Names of the existing namespaces that start with ``prefix``."""
    try:
        names = os.listdir(RUN_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def remove_all(prefix: str) -> list[str]:
    """Remove every namespace whose name starts with ``prefix``; returns their names."""
    if not prefix:
        raise ValueError("remove_all needs a non-empty prefix")
    names = listing(prefix)
    for n in names:
        remove(n)
    return names


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _setns_fd(fd: int) -> None:
    """setns(2) to the network namespace open at ``fd``, for the calling thread."""
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _open(name: str) -> int:
    try:
        return os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(errno.ENOENT, f"network namespace {name} does not exist "
                                       f"(no {path(name)})") from None


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block with this thread in namespace ``name``, then return.

    Sockets created inside stay in ``name`` after the block. Only the
    calling thread moves (asyncio's loop thread too, if it is this one).
    """
    target = _open(name)
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _setns_fd(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns_fd(saved)
    finally:
        os.close(saved)


def preexec(name: str) -> Callable[[], None]:
    """A ``preexec_fn`` for ``subprocess.Popen`` that starts the child in ``name``.

    Everything it needs is resolved here, in the parent: the child only
    opens the namespace file and calls setns (nothing that forks or imports).
    """
    p = path(name)
    if not os.path.exists(p):
        raise NetnsError(errno.ENOENT, f"network namespace {name} does not exist (no {p})")
    libc = _libc()

    def enter() -> None:
        fd = os.open(p, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {p} failed")
        finally:
            os.close(fd)

    return enter


@functools.cache
def available() -> str | None:
    """None when this process can create namespaces and open /dev/net/tun, else why not."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except OSError as e:
        return f"cannot open /dev/net/tun: {e.strerror or e}"
    os.close(fd)
    probe = f"sfprobe-{os.getpid()}"
    try:
        create(probe)
        with in_netns(probe):
            pass
    except OSError as e:
        return f"cannot create a network namespace: {e.strerror or e}"
    finally:
        remove(probe)
    return None
