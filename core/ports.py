"""What the Core's engine sees of its surroundings, and what its topic modules see of it.

The engine (:mod:`core.engine`) is sans-IO: it is handed links and a Witness
client and only calls what :class:`Port` and :class:`WitnessView` name, so the
asyncio adapter (:mod:`core.node`: :class:`steelfusion.link.Link`,
:class:`witness.client.WitnessClient`) and the seeded simulation
(:mod:`steelfusion.sim`) can hand it their own.

The engine's topic modules (:mod:`core.peering`, :mod:`core.resync`,
:mod:`core.operator`, :mod:`core.housekeeping`) are functions over the
engine; each takes it as a Protocol of its own, built on :class:`Engine`,
that names only what that topic reads, changes and calls. So the engine
imports them and none imports the engine back.
"""

from __future__ import annotations

import enum
from typing import Any, Protocol

from core.pipeline import LunPipe
from core.replication import Role
from journal.journal import Journal
from steelfusion.wire import Hello, Message, Welcome


class LinkKind(enum.StrEnum):
    """What a connection is to this Core (``link.ctx``), set when it is accepted or dialled."""

    EDGE = "edge"  # an Edge's write stream (primary)
    MIRROR_IN = "mirror-in"  # the primary's copies arriving here (secondary)
    PEER_IN = "peer-in"  # the peer dialled us and is not our primary
    PEER_OUT = "peer-out"  # we dialled the peer


class Port(Protocol):
    """What the engine needs of a connection (:class:`steelfusion.link.Link`)."""

    ctx: Any
    name: str
    hello: Hello | None
    welcome: Welcome | None
    peer: str
    close_reason: str

    @property
    def established(self) -> bool: ...
    @property
    def writable(self) -> bool: ...
    def send(self, msg: Message) -> None: ...
    def send_many(self, msgs: list[Message]) -> None: ...
    def refuse(self, code: str, reason: str) -> None: ...
    def close(self, reason: str = "") -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class WitnessView(Protocol):
    """What the engine reads of its Witness client (:class:`witness.client.WitnessClient`).

    The client's ``alive``, ``last_error``, ``last_refusal`` and ``addr`` are
    read with ``getattr`` where present (the simulation's client has none).
    """

    role: str  # the role this Core registers with, kept equal to its own

    @property
    def connected(self) -> bool: ...
    @property
    def pair_epoch(self) -> int: ...
    @property
    def holder(self) -> str | None: ...
    @property
    def holds(self) -> bool | None: ...
    @property
    def lease_seconds(self) -> float | None: ...
    def lease_valid(self, now: float | None = None) -> bool: ...


class Engine(Protocol):
    """What every topic module reads of :class:`core.engine.CoreEngine`.

    Read-only here (properties): a topic changes the engine's role, state
    and epoch only by the engine's own ``_fire`` / ``_adopt_epoch``, which
    its Protocol names where it needs them.
    """

    @property
    def role(self) -> Role: ...
    @property
    def epoch(self) -> int: ...
    @property
    def pipes(self) -> dict[int, LunPipe]: ...
    @property
    def journal(self) -> Journal | None: ...
    def mono(self) -> float: ...
    def event(self, name: str, **kv: Any) -> None: ...
