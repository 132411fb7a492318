"""Who may connect to a Core: the refusal rules for Edges and for the peer Core.

Pure functions over a HELLO and what they need of the Core's state: each
returns the :class:`Refusal` (a code scripts and the peer test, and a text
an operator can act on) or None. The engine (:mod:`core.engine`) sends the
REFUSE and raises the alarms; these rules only decide. They follow seed
002 (a secondary Core has no active Edges or LUNs of its own; the HA
configuration must be the same on both Cores of a pair) and DESIGN.md
invariant 2 (a Core that has seen a newer epoch never takes orders from an
older primary).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from core.pipeline import LunPipe
from core.ports import Port
from core.replication import Rep, Role, State
from steelfusion.wire import Hello

GIB = 1 << 30
# refusals of a pairing that only an operator can fix (configs differ): alarm pairing_refused
PAIRING_CODES = frozenset({"ha-mismatch", "pair-mismatch", "secondary-has-luns", "unknown-lun",
                           "replica-size", "role-conflict", "terminated"})


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a HELLO is refused: ``code`` (wire REFUSE code), ``reason`` (for an operator)."""

    code: str
    reason: str
    info: dict[str, Any] = field(default_factory=dict)
    #: the caller is primary at this newer epoch: step down to it before refusing
    step_down_to: int | None = None


def impostor_holder(link: Port, h: Hello, links: Iterable[Port]) -> Port | None:
    """A live link from another process that already holds ``h.node`` (issue 13), if any.

    First come, first served: replacing the holder let two copies of one
    node take each other's links every heartbeat. A holder that died is
    dropped by its link's dead-peer timer, and then the newcomer's next try
    is accepted.
    """
    for lk in links:
        if lk is not link and lk.established and h.impostor_of(lk.hello):
            return lk
    return None


def _same_edge_process(h: Hello, up: Port) -> bool:
    """``up`` came from the Edge process saying ``h`` again (it reconnected)."""
    return (h.instance is not None and up.hello is not None and up.hello.node == h.node
            and up.hello.instance == h.instance)


def _held_elsewhere(link: Port, up: Port | None) -> bool:
    return up is not None and up.established and up is not link


def edge_refusal(h: Hello, link: Port, name: str, rep: Rep,
                 pipes: Mapping[int, LunPipe]) -> Refusal | None:
    """May this Edge open its LUNs on Core ``name``? (its impostor check comes first)"""
    if not rep.accepts_edges:
        return Refusal("not-primary", f"Core {name} is the secondary: it serves no Edge "
                       "(a secondary Core has no active Edges); connect to the primary Core",
                       {"epoch": rep.epoch})
    for lun, size in h.luns.items():
        pipe = pipes.get(lun)
        if pipe is None:
            return Refusal("unknown-lun", f"Core {name} has no LUN id {lun} "
                           f"(it has {sorted(pipes)})")
        if pipe.store.size != size:
            return Refusal("lun-size-mismatch",
                           f"Edge {h.node} exports LUN id {lun} as {size} bytes but Core "
                           f"{name}'s backend {pipe.store.path} is {pipe.store.size} bytes")
        up = pipe.upstream
        if _held_elsewhere(link, up) and not _same_edge_process(h, up):
            return Refusal("lun-busy", f"LUN id {lun} is already served to Edge "
                           f"{up.hello.node if up.hello else up.peer}")
    if h.epoch > rep.epoch:
        return Refusal("stale-primary", f"Edge {h.node} has seen epoch {h.epoch}; this Core "
                       f"is at epoch {rep.epoch} and is no longer primary", {"epoch": h.epoch})
    return None


def stale_edge_links(h: Hello, link: Port, pipes: Mapping[int, LunPipe]) -> list[Port]:
    """The accepted Edge's old links (it reconnected before they timed out here), to close.

    Refusing it until the old one timed out only delayed its writes (a race
    seen as a refused reconnect in tests/test_core.py under load).
    """
    stale = []
    for lun in h.luns:
        up = pipes[lun].upstream
        if _held_elsewhere(link, up) and _same_edge_process(h, up):
            stale.append(up)
    return stale


def peer_refusal(h: Hello, name: str, rep: Rep, *, failover_pending: bool, ha: str,
                 pair: str) -> Refusal | None:
    """May the peer Core ``h.node`` pair with Core ``name``? (its impostor check comes first)"""
    if rep.state is State.TERMINATED:
        return Refusal("terminated", f"replication on {name} was terminated")
    if failover_pending:
        return Refusal("failover-pending", f"{name} is waiting for the Witness's answer to a "
                       "failover request; reconnect shortly")
    if h.role == rep.role == Role.PRIMARY:
        if h.epoch < rep.epoch:
            return Refusal("stale-primary", f"{h.node} claims primary at epoch {h.epoch}; "
                           f"{name} has been primary since epoch {rep.epoch}")
        if h.epoch > rep.epoch:
            return Refusal("role-changed", f"{name} stepped down; reconnect",
                           step_down_to=h.epoch)
        return Refusal("role-conflict", f"both Cores claim the primary role at epoch "
                       f"{h.epoch} ({h.node} and {name}); run failover on one")
    if h.role == rep.role:
        return Refusal("role-conflict", f"both Cores claim the {h.role} role ({h.node} and "
                       f"{name}); fix the configs or run failover")
    # seed: "If you have HA configured on the primary Cores ... you must also configure it
    # on the secondary Cores. The HA configuration must be the same in each case."
    peer_ha = h.info.get("ha", "none")
    if peer_ha != ha:
        return Refusal("ha-mismatch", f"HA configuration differs: {h.node} has ha={peer_ha}, "
                       f"{name} has ha={ha}; configure HA the same on both sides")
    peer_pair = h.info.get("pair")
    if isinstance(peer_pair, str) and peer_pair != pair:
        return Refusal("pair-mismatch", f"{h.node} is configured for pair {peer_pair!r}, "
                       f"{name} for {pair!r}")
    return None


def mirror_refusal(h: Hello, name: str, epoch: int,
                   pipes: Mapping[int, LunPipe]) -> Refusal | None:
    """May this secondary take the primary ``h.node``'s mirror stream?"""
    if h.epoch < epoch:
        return Refusal("stale-primary", f"{h.node} is at epoch {h.epoch}, older than "
                       f"this Core's {epoch}")
    own = sorted(set(pipes) - set(h.luns))
    if own:
        return Refusal("secondary-has-luns", f"secondary Core {name} has LUN ids {own} that "
                       f"{h.node} does not replicate (a secondary Core has no active Edges "
                       "or LUNs of its own)")
    for lun, size in h.luns.items():
        pipe = pipes.get(lun)
        if pipe is None:
            return Refusal("unknown-lun", f"replica Core {name} has no LUN id {lun}")
        if pipe.store.size < size or pipe.store.size - size > GIB:
            return Refusal("replica-size", f"replica LUN id {lun} is {pipe.store.size} bytes, "
                           f"primary's is {size}: it must be at least as large and within "
                           "1 GiB of it")
    return None
