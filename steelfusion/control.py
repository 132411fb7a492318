"""Control channel: one JSON object a line over TCP, request then reply.

Used by ``coredr``, ``steelfusion lab status`` and tests to ask a node for
status or to run an operator command. Each request is
``{"cmd": NAME, ...args}``; each reply is ``{"ok": true, ...}`` or
``{"ok": false, "error": "reason"}``. Unknown commands and malformed lines
get an error reply; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from steelfusion import log

_log = log.get("control")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_LINE = 1 << 20


class ControlError(Exception):
    """A command was refused; the message is the reason, shown to the operator."""


async def serve(host: str, port: int, handlers: dict[str, Handler]) -> asyncio.Server:
    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ValueError("request is not a JSON object")
                    cmd = req.get("cmd")
                    h = handlers.get(cmd) if isinstance(cmd, str) else None
                    if h is None:
                        reply: dict[str, Any] = {
                            "ok": False, "error": f"unknown command {cmd!r}; known: "
                            + ", ".join(sorted(handlers))}
                    else:
                        reply = {"ok": True, **(await h(req))}
                except ControlError as e:
                    reply = {"ok": False, "error": str(e)}
                except ValueError as e:
                    reply = {"ok": False, "error": f"bad request: {e}"}
                except Exception as e:  # the channel must survive a handler bug
                    _log.exception("control_handler_failed", error=str(e))
                    reply = {"ok": False, "error": f"internal error: {e}"}
                writer.write(json.dumps(reply, default=str).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(on_client, host, port, limit=MAX_LINE, reuse_address=True)


async def call_async(addr: tuple[str, int], cmd: str, timeout: float = 10.0,
                     **args: Any) -> dict[str, Any]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*addr, limit=MAX_LINE),
                                            timeout)
    try:
        writer.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
    if not line:
        raise ControlError(f"{addr[0]}:{addr[1]} closed the control connection")
    reply = json.loads(line)
    assert isinstance(reply, dict)
    return reply


def call(addr: tuple[str, int], cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """Blocking client for CLIs and tests. Raises OSError if the node is down."""
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_LINE:
                raise ControlError("control reply too long")
    if not buf:
        raise ControlError(f"{addr[0]}:{addr[1]} closed the control connection")
    reply = json.loads(buf)
    assert isinstance(reply, dict)
    return reply
