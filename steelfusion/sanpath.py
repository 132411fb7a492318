"""Each Core's own path to the lab's array, that the lab can cut (issue 16: "partition a
partner from the SAN").

On one machine every Core reaches the array on loopback, so there is no cable to pull
between one Core and the array while its HA partner keeps its own. Here the array's process
(``steelfusion san run``) also runs one TCP relay per Core, a stand-in for the Core's
switch port into the storage fabric: the Core's LUN URLs name its path's port, the relay
forwards to tgtd's portal. ``cut`` stalls the path as a partition does: nothing more is
read from either side, so the kernels' buffers fill and TCP's window closes (no RST, no
FIN: the Core's initiator finds out by its own timeouts, as it would); new connections are
accepted and held. ``ok`` lets the bytes held on both sides flow again and connects what was
held. A control port (``steelfusion.control``) answers ``status`` and ``path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any

from steelfusion import control, log
from steelfusion.units import format_addr

_log = log.get("sanpath")
CHUNK = 256 << 10


@dataclass
class Path:
    """One Core's path: its listening port, its state, its connections."""

    core: str
    listen: tuple[str, int]
    open: asyncio.Event = field(default_factory=asyncio.Event)
    conns: int = 0
    bytes: int = 0
    cuts: int = 0

    def __post_init__(self) -> None:
        self.open.set()

    @property
    def state(self) -> str:
        return "ok" if self.open.is_set() else "cut"


class Paths:
    """The relays of one array (``paths``: Core name -> listen address) to ``portal``."""

    def __init__(self, portal: tuple[str, int], paths: dict[str, tuple[str, int]]) -> None:
        self.portal = portal
        self.paths = {core: Path(core, addr) for core, addr in paths.items()}
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for p in self.paths.values():
            srv = await asyncio.start_server(functools.partial(self._accept, p), *p.listen,
                                             reuse_address=True)
            self._servers.append(srv)
        _log.info("san_paths_ready", portal=format_addr(self.portal),
                  paths={c: format_addr(p.listen) for c, p in self.paths.items()})

    async def stop(self) -> None:
        for srv in self._servers:
            srv.close()
        for t in list(self._tasks):
            t.cancel()

    def set(self, core: str, state: str) -> dict[str, Any]:
        p = self.paths.get(core)
        if p is None:
            raise control.ControlError(f"no path for Core {core!r} on this array (paths: "
                                       f"{', '.join(sorted(self.paths)) or 'none'})",
                                       "bad-request")
        if state == "cut":
            if p.open.is_set():
                p.cuts += 1
            p.open.clear()
        elif state == "ok":
            p.open.set()
        else:
            raise control.ControlError(f"path state {state!r}: give cut or ok", "bad-request")
        _log.warning("san_path", core=core, state=p.state)
        return self.status()

    def status(self) -> dict[str, Any]:
        return {"paths": {c: {"listen": format_addr(p.listen), "state": p.state,
                              "connections": p.conns, "bytes": p.bytes, "cuts": p.cuts}
                          for c, p in self.paths.items()}}

    def _accept(self, p: Path, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        t = asyncio.get_running_loop().create_task(self._relay(p, r, w))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _relay(self, p: Path, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await p.open.wait()  # a connection made while cut waits for the heal
        try:
            ur, uw = await asyncio.open_connection(*self.portal)
        except OSError:
            w.close()
            return
        p.conns += 1
        try:
            await asyncio.gather(self._pump(p, r, uw), self._pump(p, ur, w))
        finally:
            p.conns -= 1
            for x in (w, uw):
                x.close()

    @staticmethod
    async def _pump(p: Path, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                await p.open.wait()  # cut: read no more; the sender's window closes
                data = await r.read(CHUNK)
                if not data:
                    break
                await p.open.wait()  # what was read before the cut waits with it
                w.write(data)
                p.bytes += len(data)
                await w.drain()
        with contextlib.suppress(OSError):
            w.write_eof()


async def serve_control(paths: Paths, addr: tuple[str, int]) -> asyncio.AbstractServer:
    async def status(_: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "san", **paths.status()}

    async def path(req: dict[str, Any]) -> dict[str, Any]:
        return paths.set(str(req.get("core")), str(req.get("state")))

    return await control.serve(*addr, {"status": status, "path": path})


__all__ = ["Paths", "serve_control"]
