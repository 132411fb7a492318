"""FusionSync replication state of one Core: a sans-IO, table-driven state machine.

States and rules follow DESIGN.md ("States of replication") and seed 002:

=============  ==============================================================
running        writes applied, mirrored, acknowledged after both copies
paused         the primary lost the secondary: nothing acknowledged, Edges
               buffer; back to running by itself when the link returns
suspended      the Witness approved: writes applied, regions journaled,
               acknowledged after the journal write
resyncing      link back after suspension: journaled regions copied to the
               peer while new writes are mirrored; the peer is inconsistent
terminated     the pairing is over: the primary runs alone
=============  ==============================================================

A secondary is ``replica`` (consistent, receiving the mirror), ``inconsistent``
(being resynced: must not be promoted unless forced), or ``disconnected``.

Role changes: failover turns a secondary into a primary that starts
*suspended* with epoch + 1; a primary that learns a newer epoch from its peer
or the Witness becomes a secondary (and will be resynced).

:func:`step` is pure: ``(state, event) -> (next_state, effects)``. A pair
missing from :data:`TABLE` is refused with :class:`Refused` carrying a reason
an operator can read (h2's connection state machine habit).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any


class Role(enum.StrEnum):
    """What a Core is to its pair. A ``StrEnum``: it equals the configs' and the wire's
    strings (``"primary"``, ``"secondary"``), so those stay plain text."""

    PRIMARY = "primary"
    SECONDARY = "secondary"


class State(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    SUSPENDED = "suspended"
    RESYNCING = "resyncing"
    TERMINATED = "terminated"
    # secondary side
    REPLICA = "replica"
    INCONSISTENT = "inconsistent"
    DISCONNECTED = "disconnected"
    STANDALONE = "standalone"  # a primary configured without a peer


class Event(enum.Enum):
    PEER_UP = "peer_up"  # an established replication link with the peer
    PEER_DOWN = "peer_down"  # the last link to the peer is gone
    SUSPEND_GRANTED = "suspend_granted"  # operator asked, the Witness approved
    RESUME = "resume"  # operator resume (peer reachable)
    RESYNC_DONE = "resync_done"  # every journaled region copied and acknowledged
    RESYNC_START = "resync_start"  # (secondary) the primary starts resyncing us
    FAILOVER_GRANTED = "failover_granted"  # (secondary) Witness and we cannot reach the primary
    DEMOTE = "demote"  # (primary) a newer epoch exists elsewhere
    RESYNC_NEEDED = "resync_needed"  # (primary) regions to copy found while running
    TERMINATE = "terminate"


class Effect(enum.Enum):
    MIRROR = "mirror"  # start/keep sending every write to the peer
    JOURNAL_QUEUE = "journal_queue"  # turn the unacknowledged mirror queue into dirty regions
    START_RESYNC = "start_resync"
    STOP_RESYNC = "stop_resync"
    RELEASE_WITNESS = "release_witness"  # give back the Witness's approval
    BUMP_EPOCH = "bump_epoch"
    BECOME_PRIMARY = "become_primary"
    BECOME_SECONDARY = "become_secondary"
    REFUSE_EDGES = "refuse_edges"  # drop Edge connections
    SAVE = "save"  # persist role/state/epoch before anything else


class Refused(Exception):
    """The event is not allowed in this state; ``str()`` is the operator's reason."""


@dataclass(frozen=True, slots=True)
class Rep:
    role: Role
    state: State
    epoch: int

    @property
    def acks_need_peer(self) -> bool:
        """Edge writes are acknowledged only once the peer has them (running, resyncing)."""
        return self.role == Role.PRIMARY and self.state in (State.RUNNING, State.RESYNCING,
                                                            State.PAUSED)

    @property
    def journals(self) -> bool:
        """Writes are journaled and acknowledged after the journal (suspended)."""
        return self.role == Role.PRIMARY and self.state is State.SUSPENDED

    @property
    def accepts_edges(self) -> bool:
        return self.role == Role.PRIMARY

    @property
    def mirrors(self) -> bool:
        return self.role == Role.PRIMARY and self.state in (State.RUNNING, State.RESYNCING,
                                                            State.PAUSED)


S, E, F = State, Event, Effect
P, SEC = Role.PRIMARY, Role.SECONDARY
_T = tuple[State, tuple[Effect, ...]]

#: (role, state, event) -> (next state, effects). Anything else is refused.
TABLE: dict[tuple[Role, State, Event], _T] = {
    # primary
    (P, S.PAUSED, E.PEER_UP): (S.RUNNING, (F.MIRROR,)),
    (P, S.RUNNING, E.PEER_DOWN): (S.PAUSED, ()),
    (P, S.RUNNING, E.PEER_UP): (S.RUNNING, ()),
    (P, S.PAUSED, E.PEER_DOWN): (S.PAUSED, ()),
    (P, S.RUNNING, E.SUSPEND_GRANTED): (S.SUSPENDED, (F.SAVE, F.JOURNAL_QUEUE)),
    (P, S.PAUSED, E.SUSPEND_GRANTED): (S.SUSPENDED, (F.SAVE, F.JOURNAL_QUEUE)),
    (P, S.SUSPENDED, E.SUSPEND_GRANTED): (S.SUSPENDED, ()),
    (P, S.SUSPENDED, E.PEER_UP): (S.SUSPENDED, ()),
    (P, S.SUSPENDED, E.PEER_DOWN): (S.SUSPENDED, ()),
    (P, S.SUSPENDED, E.RESUME): (S.RESYNCING, (F.SAVE, F.MIRROR, F.START_RESYNC)),
    (P, S.RESYNCING, E.PEER_UP): (S.RESYNCING, ()),
    (P, S.RESYNCING, E.PEER_DOWN): (S.SUSPENDED, (F.SAVE, F.STOP_RESYNC, F.JOURNAL_QUEUE)),
    (P, S.RESYNCING, E.RESYNC_DONE): (S.RUNNING, (F.SAVE, F.RELEASE_WITNESS)),
    (P, S.RESYNCING, E.SUSPEND_GRANTED): (S.SUSPENDED, (F.SAVE, F.STOP_RESYNC,
                                                        F.JOURNAL_QUEUE)),
    (P, S.RUNNING, E.RESUME): (S.RUNNING, ()),
    (P, S.RUNNING, E.RESYNC_NEEDED): (S.RESYNCING, (F.SAVE, F.START_RESYNC)),
    (P, S.RESYNCING, E.RESYNC_NEEDED): (S.RESYNCING, ()),
    (P, S.RESYNCING, E.RESUME): (S.RESYNCING, ()),
    **{(P, st, E.DEMOTE): (S.INCONSISTENT, (F.SAVE, F.BECOME_SECONDARY, F.REFUSE_EDGES,
                                            F.STOP_RESYNC))
       for st in (S.RUNNING, S.PAUSED, S.SUSPENDED, S.RESYNCING)},
    **{(P, st, E.TERMINATE): (S.TERMINATED, (F.SAVE, F.STOP_RESYNC, F.RELEASE_WITNESS))
       for st in (S.RUNNING, S.PAUSED, S.SUSPENDED, S.RESYNCING)},
    (P, S.TERMINATED, E.PEER_UP): (S.TERMINATED, ()),
    (P, S.TERMINATED, E.PEER_DOWN): (S.TERMINATED, ()),
    (P, S.STANDALONE, E.PEER_DOWN): (S.STANDALONE, ()),
    # secondary
    (SEC, S.DISCONNECTED, E.PEER_UP): (S.REPLICA, ()),
    (SEC, S.REPLICA, E.PEER_DOWN): (S.DISCONNECTED, ()),
    (SEC, S.REPLICA, E.PEER_UP): (S.REPLICA, ()),
    (SEC, S.DISCONNECTED, E.PEER_DOWN): (S.DISCONNECTED, ()),
    (SEC, S.REPLICA, E.RESYNC_START): (S.INCONSISTENT, (F.SAVE,)),
    (SEC, S.DISCONNECTED, E.RESYNC_START): (S.INCONSISTENT, (F.SAVE,)),
    (SEC, S.INCONSISTENT, E.RESYNC_START): (S.INCONSISTENT, ()),
    (SEC, S.INCONSISTENT, E.PEER_UP): (S.INCONSISTENT, ()),
    (SEC, S.INCONSISTENT, E.PEER_DOWN): (S.INCONSISTENT, ()),
    (SEC, S.INCONSISTENT, E.RESYNC_DONE): (S.REPLICA, (F.SAVE,)),
    (SEC, S.REPLICA, E.RESYNC_DONE): (S.REPLICA, ()),
    (SEC, S.DISCONNECTED, E.FAILOVER_GRANTED): (S.SUSPENDED, (
        F.SAVE, F.BUMP_EPOCH, F.BECOME_PRIMARY)),
    (SEC, S.REPLICA, E.FAILOVER_GRANTED): (S.SUSPENDED, (
        F.SAVE, F.BUMP_EPOCH, F.BECOME_PRIMARY)),
    **{(SEC, st, E.TERMINATE): (S.TERMINATED, (F.SAVE,))
       for st in (S.REPLICA, S.DISCONNECTED, S.INCONSISTENT)},
    **{(SEC, st, E.DEMOTE): (st, ()) for st in (S.REPLICA, S.DISCONNECTED, S.INCONSISTENT)},
}

REASONS: dict[tuple[Role, Event], str] = {
    (P, Event.RESUME): "replication is not suspended: there is nothing to resume",
    (SEC, Event.SUSPEND_GRANTED): "suspend runs on the primary Core",
    (SEC, Event.RESUME): "resume runs on the primary Core",
    (P, Event.FAILOVER_GRANTED): "failover runs on the secondary Core",
    (SEC, Event.FAILOVER_GRANTED): (
        "this replica is inconsistent (a resync was under way): promoting it would lose data; "
        "use --force only if the primary's data is gone for good"),
}


def step(rep: Rep, event: Event, *, force: bool = False) -> tuple[Rep, tuple[Effect, ...]]:
    """Apply one event. Raises :class:`Refused` if the table has no entry for it."""
    key = (rep.role, rep.state, event)
    entry = TABLE.get(key)
    if entry is None and force and event is Event.FAILOVER_GRANTED and rep.role == SEC \
            and rep.state is State.INCONSISTENT:
        entry = (State.SUSPENDED, (Effect.SAVE, Effect.BUMP_EPOCH, Effect.BECOME_PRIMARY))
    if entry is None:
        reason = REASONS.get((rep.role, event)) or (
            f"{event.value} is not allowed while {rep.role} is {rep.state.value}")
        raise Refused(reason)
    nxt, effects = entry
    role = rep.role
    epoch = rep.epoch
    if Effect.BECOME_PRIMARY in effects:
        role = Role.PRIMARY
    if Effect.BECOME_SECONDARY in effects:
        role = Role.SECONDARY
    if Effect.BUMP_EPOCH in effects:
        epoch += 1
    return replace(rep, role=role, state=nxt, epoch=epoch), effects


def adopt_epoch(rep: Rep, epoch: int) -> Rep:
    """A newer epoch learned from the peer, the Witness or a failover grant; role and state
    stay as the table left them. Epochs never go backwards (DESIGN.md invariant 2): an older
    one is a bug upstream, refused rather than taken."""
    if epoch < rep.epoch:
        raise Refused(f"epoch {epoch} is older than this Core's epoch {rep.epoch}: epochs never "
                      "go backwards")
    return replace(rep, epoch=epoch)


def initial(role: str, has_peer: bool, epoch: int = 1) -> Rep:
    if role == Role.PRIMARY:
        return Rep(Role.PRIMARY, State.PAUSED if has_peer else State.STANDALONE, epoch)
    return Rep(Role.SECONDARY, State.DISCONNECTED, epoch)


def restarted(saved: Mapping[str, Any], config_role: str, has_peer: bool) -> Rep:
    """The state a Core starts in from its saved role/state/epoch (``core-state.json``;
    empty on a first start, when the config's role counts).

    A restart keeps what must survive: suspension (the journal holds its
    regions and the Witness its approval), inconsistency, termination. Link
    states start over, and a primary that was resyncing is suspended again.
    """
    role = saved.get("role", config_role)
    epoch = int(saved.get("epoch", 1))
    rep = initial(role, has_peer, epoch)
    try:
        state = State(saved.get("state", rep.state.value))
    except ValueError:
        state = rep.state
    if role == Role.PRIMARY and state is State.RESYNCING:
        state = State.SUSPENDED
    if state in (State.SUSPENDED, State.TERMINATED, State.INCONSISTENT):
        return replace(rep, state=state)
    return rep
