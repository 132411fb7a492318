"""Thin asyncio adapter over :mod:`steelfusion.wire` and :mod:`steelfusion.linkstate`.

One :class:`Link` per TCP connection. It lends the decoder's buffers to the
transport, feeds messages to the state machine (handshake order, heartbeats,
dead peers: :mod:`steelfusion.linkstate`), runs the node-authentication
handshake (:mod:`steelfusion.nodeauth`) before the role sees a frame, and
hands everything else to the role's handler (``on_message``), which runs in
the event loop. The replication rules live in the roles.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections.abc import Callable
from typing import Any, cast

from steelfusion import log
from steelfusion.linkstate import LinkDead, LinkMachine, LinkState
from steelfusion.nodeauth import ClientHandshake, Keyring, NodeAuthError, NodeKey, ServerHandshake
from steelfusion.wire import (
    Control,
    FrameDecoder,
    Hello,
    Message,
    Ping,
    Pong,
    Refuse,
    Welcome,
    WireError,
    encode,
)

_log = log.get("link")

Handler = Callable[["Link", Message], None]

CORK_BYTES = 1 << 20  # flush at once past this much queued output

# This process's id in every HELLO it sends: a node name held by a live link from another
# instance is a duplicate node, refused (see Hello.impostor_of).
INSTANCE = secrets.token_hex(8)

# what _auth_gate did with a frame
_PASS = object()  # hand it to the role
_CONSUMED = object()  # an authentication frame: handled here, go on with the next one
_DROPPED = object()  # authentication failed and the link is closing: deliver nothing more


class Link(asyncio.BufferedProtocol):
    """A framed, heartbeated node connection.

    A ``BufferedProtocol`` (asyncio and uvloop alike; uvloop only treats a
    protocol as buffered if it is not an ``asyncio.Protocol``), so the kernel
    writes received bytes straight into :class:`FrameDecoder`'s buffers.
    """

    def __init__(self, on_message: Handler, on_close: Callable[[Link, BaseException | None], None],
                 *, dialler: bool, name: str = "", ping_interval: float = 1.0,
                 dead_after: float = 6.0) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.on_message = on_message
        self.on_close = on_close
        self.name = name
        self.decoder = FrameDecoder()
        self.machine = LinkMachine(dialler=dialler, now=loop.time(),
                                   ping_interval=ping_interval, dead_after=dead_after)
        self.transport: asyncio.Transport | None = None
        self.peer: str = "?"
        self.local: str = "?"  # our end's address: which interface carries this link
        self.hello: Hello | None = None  # what the peer said about itself
        self.welcome: Welcome | None = None
        self.closed = asyncio.Event()
        self.close_reason: str = ""
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._timer: asyncio.TimerHandle | None = None
        self.ctx: Any = None  # the role's per-connection state
        self.bytes_in = 0
        self.bytes_out = 0
        # node authentication (steelfusion/nodeauth.py): a listener with a keyring
        # answers with proof in WELCOME and delivers nothing until the client's proof;
        # a dialler with a key checks the server's proof before the role sees WELCOME.
        self.keyring: Keyring | None = None
        self.local_name = ""
        self.auth_server: ServerHandshake | None = None
        self.auth_client: ClientHandshake | None = None
        self._auth_welcome: dict[str, Any] | None = None
        self._out: list[bytes | memoryview] = []
        self._out_bytes = 0
        self._flush_scheduled = False

    # -- asyncio.BufferedProtocol ---------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport; uvloop's is not a subclass of asyncio.Transport, so no isinstance
        tr = cast(asyncio.Transport, transport)
        self.transport = tr
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pn = transport.get_extra_info("peername")
        self.peer = f"{pn[0]}:{pn[1]}" if pn else "?"
        sn = transport.get_extra_info("sockname")
        self.local = f"{sn[0]}:{sn[1]}" if sn else "?"
        tr.set_write_buffer_limits(high=8 * 1024 * 1024)
        self._arm()

    def get_buffer(self, sizehint: int) -> memoryview:
        """The decoder's buffer: large payloads are received into their message."""
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.bytes_in += nbytes
        try:
            self._deliver(self.decoder.buffer_updated(nbytes))
        except WireError as e:
            self._protocol_error(e)

    def _deliver(self, msgs: list[Message]) -> None:
        now = self.loop.time()
        for m in msgs:
            replies = self.machine.receive(m, now)
            if replies:
                self.send_many(replies)
            if isinstance(m, Ping | Pong):
                continue
            gate = self._auth_gate(m)
            if gate is _DROPPED:
                return
            if gate is _CONSUMED:
                # The proof was the handshake's last frame; what the peer sent after it in
                # the same read (a primary's resent mirror writes, say) is ordinary traffic
                # and must reach the role. Dropping it left a hole in a replication stream
                # (issue 9: a restarted secondary skipped seqs 508-522).
                continue
            if isinstance(m, Hello):
                self.hello = m
            elif isinstance(m, Welcome):
                self.welcome = m
            self.on_message(self, m)
            if self.transport is None or self.transport.is_closing():
                return

    def _protocol_error(self, e: WireError) -> None:
        _log.warning("wire_protocol_error", peer=self.peer, link=self.name,
                     code=e.code, error=str(e))
        with contextlib.suppress(Exception):
            # a listener names itself, so `coredr` pointed here can say whose port this is
            self.send(Refuse(e.code, str(e),
                             {} if self.machine.dialler else {"listener": self.name}))
            self.flush()  # abort() drops what is still queued: the REFUSE would never leave
        self.abort(f"protocol error: {e}")

    def _auth_gate(self, m: Message) -> object:
        """Run node authentication: ``_PASS`` the frame on, ``_CONSUMED`` it, or ``_DROPPED``."""
        try:
            if self.keyring is not None:
                if isinstance(m, Hello):
                    self.auth_server = ServerHandshake(self.keyring, self.local_name)
                    self._auth_welcome = self.auth_server.on_hello(m.info, m.node, m.purpose)
                    return _PASS
                srv = self.auth_server
                if srv is not None and not srv.authenticated:
                    if isinstance(m, Control) and "auth" in m.body:
                        srv.on_control(m.body)
                        _log.info("node_authenticated", peer=self.peer, node=srv.peer,
                                  key_id=srv.key_id, link=self.name)
                        return _CONSUMED
                    raise NodeAuthError("auth_required", f"{m.TYPE.name} before the "
                                        "authentication proof")
            cli = self.auth_client
            if cli is not None and isinstance(m, Welcome) and not cli.authenticated:
                self.send(Control(cli.on_welcome(m.info, m.node)))
        except NodeAuthError as e:
            _log.warning("node_auth_failed", peer=self.peer, link=self.name, code=e.code,
                         reason=e.reason, node=self.hello.node if self.hello else None)
            self.send(Refuse(e.code, e.reason))
            self.close(f"authentication failed: {e.reason}")
            return _DROPPED
        return _PASS

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.machine.close()
        self.transport = None
        self._can_write.set()
        if not self.closed.is_set():
            self.closed.set()
            self.on_close(self, exc)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- sending --------------------------------------------------------------
    @property
    def established(self) -> bool:
        return self.machine.state is LinkState.ESTABLISHED and self.transport is not None

    def send(self, msg: Message) -> None:
        """Queue one frame; frames queued in one loop iteration leave in one syscall (cork)."""
        t = self.transport
        if t is None or t.is_closing():
            return
        if self._auth_welcome is not None and isinstance(msg, Welcome):
            msg = Welcome(msg.node, msg.role, msg.epoch, msg.applied,
                          {**msg.info, **self._auth_welcome})
            self._auth_welcome = None
        bufs = encode(msg)
        self._queue(bufs, sum(len(b) for b in bufs))

    def send_many(self, msgs: list[Message]) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        bufs: list[bytes | memoryview] = []
        for m in msgs:
            bufs.extend(encode(m))
        self._queue(bufs, sum(len(b) for b in bufs))

    def send_frames(self, bufs: list[bytes | memoryview]) -> None:
        """Queue frames already encoded (e.g. :func:`steelfusion.wire.encode_write`)."""
        t = self.transport
        if t is None or t.is_closing():
            return
        self._queue(bufs, sum(len(b) for b in bufs))

    def _queue(self, bufs: list[bytes | memoryview], n: int) -> None:
        self.bytes_out += n
        self._out.extend(bufs)
        self._out_bytes += n
        if self._out_bytes >= CORK_BYTES:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Hand everything queued to the transport now."""
        self._flush_scheduled = False
        if not self._out:
            return
        out, self._out, self._out_bytes = self._out, [], 0
        t = self.transport
        if t is not None and not t.is_closing():
            t.writelines(out)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        await self._can_write.wait()

    @property
    def writable(self) -> bool:
        return self._can_write.is_set()

    def pause_reading(self) -> None:
        """Stop reading from the peer (flow control: the Core's mirror window is full)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def refuse(self, code: str, reason: str) -> None:
        """Tell the peer why, then close once the refusal is flushed."""
        self.send(Refuse(code, reason))
        self.close(reason)

    def close(self, reason: str = "") -> None:
        self.close_reason = self.close_reason or reason
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def abort(self, reason: str = "") -> None:
        self.close_reason = self.close_reason or reason
        if self.transport is not None:
            self.transport.abort()

    # -- timers ----------------------------------------------------------------
    def _arm(self) -> None:
        delay = max(0.05, self.machine.next_deadline() - self.loop.time())
        self._timer = self.loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        if self.transport is None:
            return
        try:
            pings = self.machine.on_timer(self.loop.time())
        except LinkDead as e:
            _log.warning("link_dead", peer=self.peer, link=self.name, error=str(e))
            self.abort(str(e))
            return
        if pings:
            self.send_many(pings)
        self._arm()


async def dial(host: str, port: int, hello: Hello, on_message: Handler,
               on_close: Callable[[Link, BaseException | None], None], *, name: str = "",
               timeout: float = 5.0, local_addr: tuple[str, int] | None = None,
               ping_interval: float = 1.0, dead_after: float = 6.0,
               key: NodeKey | None = None) -> Link:
    """Connect, send HELLO and return the link; WELCOME/REFUSE arrive via ``on_message``.

    With ``key``, the HELLO carries an authentication challenge and WELCOME
    reaches ``on_message`` only after the server proved it knows the key.
    """
    loop = asyncio.get_running_loop()
    auth = ClientHandshake(key, hello.node, hello.purpose) if key is not None else None
    hello = Hello(hello.node, hello.role, hello.purpose, hello.epoch, hello.luns,
                  {"instance": INSTANCE, **hello.info,
                   **(auth.hello_info() if auth is not None else {})})
    async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancel on 3.11
        _, proto = await loop.create_connection(
            lambda: Link(on_message, on_close, dialler=True, name=name,
                         ping_interval=ping_interval, dead_after=dead_after),
            host, port, local_addr=local_addr)
    assert isinstance(proto, Link)
    proto.auth_client = auth
    proto.send(hello)
    return proto


async def listen(host: str, port: int, on_message: Handler,
                 on_close: Callable[[Link, BaseException | None], None], *, name: str = "",
                 ping_interval: float = 1.0, dead_after: float = 6.0,
                 keyring: Keyring | None = None, local_name: str = "") -> asyncio.Server:
    """Accept node connections; with ``keyring`` every peer must authenticate first."""
    loop = asyncio.get_running_loop()

    def make() -> Link:
        lk = Link(on_message, on_close, dialler=False, name=name, ping_interval=ping_interval,
                  dead_after=dead_after)
        lk.keyring = keyring
        lk.local_name = local_name
        return lk

    return await loop.create_server(make, host, port, reuse_address=True)
