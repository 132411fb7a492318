"""Start-up failures of a node, told in one line (issue 13).

A node that cannot bind a port or use a path must say which port or path,
which config key holds it and what to do, then exit with nothing left
running. :func:`listening` wraps each server start so the port is named where
it is known; :func:`explain` turns any other ``OSError`` into the same kind of
line by matching its file name against the paths of the node's config.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import socket
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

from steelfusion.units import format_addr

T = TypeVar("T")


class StartupError(Exception):
    """A node cannot start; the message names the port or path, its key and what to do."""


_BIND = {
    errno.EADDRINUSE: "address already in use (another process listens there: stop it or "
                      "choose another port)",
    errno.EADDRNOTAVAIL: "no interface of this host has that address (choose a local one)",
    errno.EACCES: "permission denied (ports below 1024 need root)",
}


async def listening(aw: Awaitable[T], addr: tuple[str, int], key: str, source: str = "") -> T:
    """Await a server start; a failed bind becomes a :class:`StartupError` naming the port."""
    try:
        return await aw
    except OSError as e:
        if isinstance(e, socket.gaierror):
            why = f"unknown host {addr[0]!r} ({e.strerror})"
        else:
            why = _BIND.get(e.errno or 0) or e.strerror or str(e)
        where = f"{key} in {source}" if source else key
        raise StartupError(f"cannot listen on {format_addr(addr)} ({where}): {why}") from None


_PATH = {
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "is a directory",
    errno.EEXIST: "exists and is not a directory",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EFBIG: "larger than the file system allows",
    errno.ENOENT: "no such file or directory",
}

_TODO = {errno.EFBIG: "choose a smaller size or another file system",
         errno.ENOSPC: "free some space or change the key"}


def paths_of(cfg: Any) -> list[tuple[str, str]]:
    """(path, config key) for every file or directory a node's config names."""
    out: list[tuple[str, str]] = []
    kind = type(cfg).__name__

    def add(path: str | None, key: str) -> None:
        if path:
            out.append((str(path).rstrip("/") or "/", key))

    if kind == "CoreConfig":
        add(cfg.state_dir, "[core] state_dir")
        add(cfg.log_file, "[core] log_file")
        add(cfg.journal_path, "[journal] path")
        for lu in cfg.luns:
            add(lu.path, f"[[lun]] id {lu.id} path")
    elif kind == "EdgeConfig":
        add(cfg.blockstore, "[edge] blockstore")
        add(cfg.log_file, "[edge] log_file")
        add(cfg.witness_state_dir, "[witness] state_dir")
    elif kind == "WitnessConfig":
        add(cfg.state_dir, "[witness] state_dir")
        add(cfg.log_file, "[witness] log_file")
    elif kind == "WanConfig":
        add(cfg.log_file, "log_file")
    return out


def explain(e: BaseException, cfg: Any) -> str:
    """One line for an error that stopped a node's start-up."""
    if not isinstance(e, OSError) or isinstance(e, socket.gaierror):
        return str(e)
    why = _PATH.get(e.errno or 0) or e.strerror or str(e)
    name = e.filename
    source = getattr(cfg, "source", "") or ""
    if name is None:
        return f"{why}{f' (config {source})' if source else ''}"
    name = str(name).rstrip("/") or "/"
    # the path itself, else something under it (the nearest), else one of its parents
    ranked = sorted(
        ((0 if name == path else 1 if name.startswith(path + "/") else 2, -len(path), path, key)
         for path, key in paths_of(cfg)
         if name == path or name.startswith(path + "/") or path.startswith(name + "/")))
    if not ranked:
        return f"{name}: {why}"
    _, _, path, key = ranked[0]
    what = path if name == path else f"{path}: {name}"
    where = f"{key} in {source}" if source else key
    todo = _TODO.get(e.errno or 0, "fix the path or change the key")
    return f"{what}: {why} ({where}; {todo})"


class Node(Protocol):
    """A node process's main object: :func:`serve_until_stopped` drives it."""

    stopping: asyncio.Event

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def serve_until_stopped(node: Node) -> None:
    """Start ``node`` (a failed start stops whatever it had started, then raises), serve
    until SIGTERM, SIGINT or its ``stop`` command sets ``stopping``, then stop it."""
    try:
        await node.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await node.stop()
        raise
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, node.stopping.set)
    await node.stopping.wait()
    await node.stop()
