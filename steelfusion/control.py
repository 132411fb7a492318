"""Control channel: one JSON object a line over TCP, request then reply.

Used by ``coredr``, ``steelfusion lab status`` and tests to ask a node for
status or to run an operator command. Each request is
``{"cmd": NAME, ...args}``; each reply is ``{"ok": true, ...}`` or
``{"ok": false, "error": "reason", "code": CODE}`` where ``CODE`` is a short
stable word scripts can test (``coredr``'s README section lists them). Unknown
commands and malformed lines get an error reply; the server keeps serving.

The client side tells an operator who typed the wrong port what is there
instead: a node protocol port answers with a binary frame (``SF`` magic), an
iSCSI portal drops a request that is not a Login PDU, a closed port refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from steelfusion import log

_log = log.get("control")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_LINE = 1 << 20

#: The ``code`` of a refused command: a small fixed set scripts can test (``coredr
#: --json`` prints ``{"refused": CODE, "reason": ...}``; the README lists them).
CODES: dict[str, str] = {
    "wrong-role": "the command runs on the other Core (suspend, resume, verify: the primary; "
                  "failover: the secondary)",
    "terminated": "replication was terminated on this Core",
    "no-peer": "this Core has no peer configured",
    "no-journal": "no usable Journal LUN (suspend, journal status)",
    "no-witness": "no Witness configured (suspend; failover without --force)",
    "witness-unreachable": "the Witness did not answer",
    "witness-lease-live": "failover: the Witness still holds the primary's lease; `retry_in` "
                          "says for how long, `coredr failover --wait` retries",
    "witness-refused": "the Witness said no; the reason says why",
    "peer-reachable": "failover: this Core still reaches the primary",
    "peer-unreachable": "resume, verify: the secondary is not connected",
    "peer-error": "verify: the secondary could not hash a LUN",
    "paused": "resume: replication is paused, not suspended; it resumes by itself",
    "inconsistent": "failover: this replica is inconsistent; --force promotes it anyway",
    "busy": "a failover or a verify is already under way",
    "bad-state": "the replication state does not allow it now",
    "unknown-command": "the node has no such command (an old Core?)",
    "bad-request": "the request was malformed",
    "internal-error": "the node failed to run the command; see its log",
    "not-leader": "Core HA: suspend, resume, failover and terminate run on the HA leader "
                  "(``leader`` names it)",
    "standby": "Core HA: this Core stands by; its partner serves its LUNs",
    "refused": "any other refusal (the reason says why)",
}


class ControlError(Exception):
    """A command was refused; the message is the reason, shown to the operator.

    ``code`` is a stable machine word for scripts (``coredr --json`` shows it);
    ``extra`` fields go into the reply as they are (``retry_in`` seconds).
    """

    def __init__(self, message: str, code: str = "refused", **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.extra = extra


class NotControlPort(ControlError):
    """HOST:PORT answers, but not as a control port; the message says what it is."""

    def __init__(self, message: str, code: str = "not-a-control-port") -> None:
        super().__init__(message, code)


class ControlClosed(ControlError):
    """The node closed the control connection before it answered."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "closed")


async def dispatch(handlers: dict[str, Handler], req: dict[str, Any]) -> dict[str, Any]:
    """Run one request (``{"cmd": NAME, ...}``) and return its reply, refused or not.

    The one place a command becomes a reply: the control port and the web
    console (:mod:`steelfusion.console`) both call it, so an operator gets the
    same refusal, with the same code and words, whichever way they asked.
    """
    try:
        cmd = req.get("cmd")
        h = handlers.get(cmd) if isinstance(cmd, str) else None
        if h is None:
            return {"ok": False, "code": "unknown-command",
                    "error": f"unknown command {cmd!r}; known: " + ", ".join(sorted(handlers))}
        return {"ok": True, **(await h(req))}
    except ControlError as e:
        return {**e.extra, "ok": False, "error": str(e), "code": e.code}
    except ValueError as e:
        return {"ok": False, "error": f"bad request: {e}", "code": "bad-request"}
    except Exception as e:  # the channel must survive a handler bug
        _log.exception("control_handler_failed", error=str(e))
        return {"ok": False, "error": f"internal error: {e}", "code": "internal-error"}


def replication_said(reply: dict[str, Any]) -> str:
    """The words for a replication command's reply (suspend, resume, terminate): the state,
    and each Core's answer when an HA leader ran it on the pair. Here, beside the replies,
    so ``coredr`` and the console (which knows no CLI) say the same."""
    said = f"replication {'already ' if reply.get('already') else ''}{reply['state']}"
    cores = reply.get("cores")
    if cores and len(cores) > 1:  # an HA leader ran it on every Core of the pair
        said += "".join(f"\n  {name}: " + (f"refused ({r['refused']}): {r['reason']}"
                                           if "refused" in r else
                                           f"{'already ' if r.get('already') else ''}"
                                           f"{r.get('state')}")
                        for name, r in cores.items())
    return said


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
                except ValueError as e:
                    reply: dict[str, Any] = {"ok": False, "error": f"bad request: {e}",
                                             "code": "bad-request"}
                else:
                    reply = await dispatch(handlers, req)
                writer.write(json.dumps(reply, default=str).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(on_client, host, port, limit=MAX_LINE, reuse_address=True)


def _request(cmd: str, args: dict[str, Any]) -> bytes:
    """One request line, padded to 64 bytes with JSON whitespace.

    An iSCSI portal reads a 48-byte header first: a padded request gets the
    connection dropped at once instead of a portal waiting for the rest.
    """
    line = json.dumps({"cmd": cmd, **args}).encode()
    return line + b" " * max(0, 63 - len(line)) + b"\n"


def _where(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


def _frame_needs(buf: bytes | bytearray) -> int | None:
    """Bytes a node protocol frame at the start of ``buf`` needs, if it is one."""
    from steelfusion import wire

    if buf[:2] != wire.MAGIC:
        return None
    if len(buf) < wire.HEADER_SIZE:
        return wire.HEADER_SIZE
    length = wire.HEADER.unpack_from(buf)[4]
    return wire.HEADER_SIZE + min(length, MAX_LINE)


def describe_reply(addr: tuple[str, int], buf: bytes) -> str:
    """What answered at ``addr``, said for an operator who expected a control port."""
    from steelfusion import wire

    where = _where(addr)
    hint = "; `steelfusion lab status` lists the control addresses"
    if buf[:2] == wire.MAGIC:
        listener = None
        try:
            msg = wire.FrameDecoder().feed(buf)
            if msg and isinstance(msg[0], wire.Refuse):
                listener = (msg[0].info or {}).get("listener")
        except (wire.WireError, ValueError, AttributeError):
            pass
        what = {"witness": "a Witness port (Cores and Edges connect there)",
                "core-listen": "a Core's node port (Edges and the peer Core connect there)",
                }.get(str(listener),
                      "a node protocol port (a Core's node port or a Witness port)")
        return f"{where} is not a Core control port: it is {what}{hint}"
    return (f"{where} is not a Core control port: it answered something other than the "
            f"control protocol ({bytes(buf[:16])!r}...){hint}")


def _decode(addr: tuple[str, int], buf: bytes) -> dict[str, Any]:
    try:
        reply = json.loads(buf)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise NotControlPort(describe_reply(addr, buf)) from None
    if not isinstance(reply, dict):
        raise NotControlPort(describe_reply(addr, buf))
    return reply


def call(addr: tuple[str, int], cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """Blocking client for CLIs and tests.

    Raises OSError if nothing listens or the node does not answer within
    ``timeout`` (TimeoutError), :class:`NotControlPort` if something else
    answers, :class:`ControlClosed` if the connection ends before a reply.
    """
    with socket.create_connection(addr, timeout=timeout) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(_request(cmd, args))  # a port that talks first may hang up early
        buf = bytearray()
        while True:
            need = _frame_needs(buf)
            if (need is None and buf.endswith(b"\n")) or (need is not None and len(buf) >= need):
                break
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                chunk = b""  # said what it had to say, or nothing: judged below
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_LINE:
                raise NotControlPort(f"{_where(addr)} sent more than {MAX_LINE} bytes without "
                                     "a line end: not a control reply")
    if not buf:
        raise ControlClosed(f"{_where(addr)} closed the connection without answering")
    if buf[:1] == b"{" and not buf.endswith(b"\n"):
        raise ControlClosed(f"{_where(addr)} closed the connection in the middle of its reply")
    return _decode(addr, bytes(buf))
