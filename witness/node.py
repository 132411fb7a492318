"""The Witness process: Cores heartbeat it; it knows which Cores it can reach.

Seed 002: "A Witness registers requests to suspend replication from the
Cores ... makes sure that only one Core at a time suspends its replication."
This module is the network side; the approval rules (lease based, durable
before answering) come with the FusionSync issue.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

from steelfusion import control, log
from steelfusion.config import WitnessConfig
from steelfusion.link import Link, listen
from steelfusion.units import format_addr
from steelfusion.wire import Hello, Message, Welcome

_log = log.get("witness")


class Witness:
    def __init__(self, name: str, addr: tuple[str, int], state_dir: str,
                 lease_seconds: float = 5.0) -> None:
        self.name = name
        self.addr = addr
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.lease_seconds = lease_seconds
        self.links: dict[str, Link] = {}
        self.last_seen: dict[str, float] = {}
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await listen(*self.addr, self._on_message, self._on_close, name="witness")
        _log.info("witness_started", listen=format_addr(self.addr))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for lk in list(self.links.values()):
            lk.close("witness stopping")

    def _on_message(self, link: Link, msg: Message) -> None:
        if isinstance(msg, Hello):
            if msg.purpose != "witness":
                link.refuse("bad-purpose", f"this is a Witness; {msg.purpose!r} connections "
                            "are not served here")
                return
            link.ctx = msg.node
            self.links[msg.node] = link
            self.last_seen[msg.node] = time.time()
            link.send(Welcome(self.name, "witness", 0, {}, {}))
            _log.info("witness_node_connected", node=msg.node, role=msg.role, epoch=msg.epoch)

    def _on_close(self, link: Link, exc: BaseException | None) -> None:
        if isinstance(link.ctx, str) and self.links.get(link.ctx) is link:
            del self.links[link.ctx]
            self.last_seen[link.ctx] = time.time()
            _log.warning("witness_node_lost", node=link.ctx)

    def reachable(self, node: str) -> bool:
        lk = self.links.get(node)
        return lk is not None and lk.established

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "pid": os.getpid(), "address": format_addr(self.addr),
                "nodes": {n: {"connected": self.reachable(n),
                              "last_seen": self.last_seen.get(n)} for n in self.last_seen}}


async def run(cfg: WitnessConfig) -> None:
    w = Witness(cfg.name, cfg.listen, cfg.state_dir, cfg.lease_seconds)
    await w.start()
    stopping = asyncio.Event()

    async def status(_: dict[str, Any]) -> dict[str, Any]:
        return w.status()

    async def stop(_: dict[str, Any]) -> dict[str, Any]:
        asyncio.get_running_loop().call_later(0.05, stopping.set)
        return {"stopping": True}

    ctl_addr = cfg.control or (cfg.listen[0], cfg.listen[1] + 1)
    ctl = await control.serve(*ctl_addr, {"status": status, "stop": stop})
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    ctl.close()
    await w.stop()
