"""Sans-IO state of one node-protocol connection: handshake order and liveness.

The table :data:`TRANSITIONS` says which message types each side may receive
in each state; anything else is a protocol error that closes the connection
(as h2's connection state machine does). Time is always an argument.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from steelfusion.wire import Message, MsgType, Ping, Pong, WireError


class LinkState(enum.Enum):
    AWAIT_HELLO = "await-hello"  # we accepted the TCP connection
    AWAIT_WELCOME = "await-welcome"  # we dialled and sent HELLO
    ESTABLISHED = "established"
    CLOSED = "closed"


_DATA = frozenset({MsgType.WRITE, MsgType.ACK, MsgType.READ, MsgType.READ_REPLY,
                   MsgType.PING, MsgType.PONG, MsgType.CONTROL, MsgType.REFUSE})

#: (state, received type) -> next state. Missing pairs are protocol errors.
TRANSITIONS: dict[tuple[LinkState, MsgType], LinkState] = {
    (LinkState.AWAIT_HELLO, MsgType.HELLO): LinkState.ESTABLISHED,
    (LinkState.AWAIT_WELCOME, MsgType.WELCOME): LinkState.ESTABLISHED,
    (LinkState.AWAIT_WELCOME, MsgType.REFUSE): LinkState.CLOSED,
    (LinkState.AWAIT_WELCOME, MsgType.PING): LinkState.AWAIT_WELCOME,
    (LinkState.AWAIT_WELCOME, MsgType.PONG): LinkState.AWAIT_WELCOME,
    **{(LinkState.ESTABLISHED, t): LinkState.ESTABLISHED for t in _DATA},
}
TRANSITIONS[(LinkState.ESTABLISHED, MsgType.REFUSE)] = LinkState.CLOSED


class LinkDead(Exception):
    """The peer sent nothing for longer than the dead interval."""


@dataclass(slots=True)
class LinkMachine:
    """Handshake order, heartbeats and dead-peer detection for one connection.

    ``receive`` returns the frames to send in answer (a PONG for a PING);
    ``on_timer`` returns PINGs to send and raises :class:`LinkDead`.
    """

    dialler: bool
    now: float
    ping_interval: float = 1.0
    dead_after: float = 6.0
    state: LinkState = LinkState.AWAIT_HELLO
    last_rx: float = 0.0
    last_ping: float = 0.0
    rtt: float | None = None
    nonce: int = 0

    def __post_init__(self) -> None:
        self.state = LinkState.AWAIT_WELCOME if self.dialler else LinkState.AWAIT_HELLO
        self.last_rx = self.now
        self.last_ping = self.now

    def receive(self, msg: Message, now: float) -> list[Message]:
        nxt = TRANSITIONS.get((self.state, msg.TYPE))
        if nxt is None:
            raise WireError(f"{msg.TYPE.name} not allowed in state {self.state.value}",
                            "unexpected-message")
        self.state = nxt
        self.last_rx = now
        if isinstance(msg, Ping):
            return [Pong(msg.nonce, msg.sent)]
        if isinstance(msg, Pong):
            self.rtt = max(0.0, now - msg.sent)
        return []

    def close(self) -> None:
        self.state = LinkState.CLOSED

    def next_deadline(self) -> float:
        return min(self.last_ping + self.ping_interval, self.last_rx + self.dead_after)

    def on_timer(self, now: float) -> list[Message]:
        if self.state is LinkState.CLOSED:
            return []
        if now - self.last_rx >= self.dead_after:
            self.state = LinkState.CLOSED
            raise LinkDead(f"no frame from peer for {now - self.last_rx:.1f}s")
        if now - self.last_ping >= self.ping_interval:
            self.last_ping = now
            self.nonce += 1
            return [Ping(self.nonce, now)]
        return []
