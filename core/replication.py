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
from dataclasses import dataclass, replace


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
    role: str  # primary | secondary
    state: State
    epoch: int

    @property
    def acks_need_peer(self) -> bool:
        """Edge writes are acknowledged only once the peer has them (running, resyncing)."""
        return self.role == "primary" and self.state in (State.RUNNING, State.RESYNCING,
                                                         State.PAUSED)

    @property
    def journals(self) -> bool:
        """Writes are journaled and acknowledged after the journal (suspended)."""
        return self.role == "primary" and self.state is State.SUSPENDED

    @property
    def accepts_edges(self) -> bool:
        return self.role == "primary"

    @property
    def mirrors(self) -> bool:
        return self.role == "primary" and self.state in (State.RUNNING, State.RESYNCING,
                                                         State.PAUSED)


S, E, F = State, Event, Effect
_T = tuple[State, tuple[Effect, ...]]

#: (role, state, event) -> (next state, effects). Anything else is refused.
TABLE: dict[tuple[str, State, Event], _T] = {
    # primary
    ("primary", S.PAUSED, E.PEER_UP): (S.RUNNING, (F.MIRROR,)),
    ("primary", S.RUNNING, E.PEER_DOWN): (S.PAUSED, ()),
    ("primary", S.RUNNING, E.PEER_UP): (S.RUNNING, ()),
    ("primary", S.PAUSED, E.PEER_DOWN): (S.PAUSED, ()),
    ("primary", S.RUNNING, E.SUSPEND_GRANTED): (S.SUSPENDED, (F.SAVE, F.JOURNAL_QUEUE)),
    ("primary", S.PAUSED, E.SUSPEND_GRANTED): (S.SUSPENDED, (F.SAVE, F.JOURNAL_QUEUE)),
    ("primary", S.SUSPENDED, E.SUSPEND_GRANTED): (S.SUSPENDED, ()),
    ("primary", S.SUSPENDED, E.PEER_UP): (S.SUSPENDED, ()),
    ("primary", S.SUSPENDED, E.PEER_DOWN): (S.SUSPENDED, ()),
    ("primary", S.SUSPENDED, E.RESUME): (S.RESYNCING, (F.SAVE, F.MIRROR, F.START_RESYNC)),
    ("primary", S.RESYNCING, E.PEER_UP): (S.RESYNCING, ()),
    ("primary", S.RESYNCING, E.PEER_DOWN): (S.SUSPENDED, (F.SAVE, F.STOP_RESYNC,
                                                          F.JOURNAL_QUEUE)),
    ("primary", S.RESYNCING, E.RESYNC_DONE): (S.RUNNING, (F.SAVE, F.RELEASE_WITNESS)),
    ("primary", S.RESYNCING, E.SUSPEND_GRANTED): (S.SUSPENDED, (F.SAVE, F.STOP_RESYNC,
                                                                F.JOURNAL_QUEUE)),
    ("primary", S.RUNNING, E.RESUME): (S.RUNNING, ()),
    ("primary", S.RUNNING, E.RESYNC_NEEDED): (S.RESYNCING, (F.SAVE, F.START_RESYNC)),
    ("primary", S.RESYNCING, E.RESYNC_NEEDED): (S.RESYNCING, ()),
    ("primary", S.RESYNCING, E.RESUME): (S.RESYNCING, ()),
    **{("primary", st, E.DEMOTE): (S.INCONSISTENT, (F.SAVE, F.BECOME_SECONDARY, F.REFUSE_EDGES,
                                                     F.STOP_RESYNC))
       for st in (S.RUNNING, S.PAUSED, S.SUSPENDED, S.RESYNCING)},
    **{("primary", st, E.TERMINATE): (S.TERMINATED, (F.SAVE, F.STOP_RESYNC, F.RELEASE_WITNESS))
       for st in (S.RUNNING, S.PAUSED, S.SUSPENDED, S.RESYNCING)},
    ("primary", S.TERMINATED, E.PEER_UP): (S.TERMINATED, ()),
    ("primary", S.TERMINATED, E.PEER_DOWN): (S.TERMINATED, ()),
    ("primary", S.STANDALONE, E.PEER_DOWN): (S.STANDALONE, ()),
    # secondary
    ("secondary", S.DISCONNECTED, E.PEER_UP): (S.REPLICA, ()),
    ("secondary", S.REPLICA, E.PEER_DOWN): (S.DISCONNECTED, ()),
    ("secondary", S.REPLICA, E.PEER_UP): (S.REPLICA, ()),
    ("secondary", S.DISCONNECTED, E.PEER_DOWN): (S.DISCONNECTED, ()),
    ("secondary", S.REPLICA, E.RESYNC_START): (S.INCONSISTENT, (F.SAVE,)),
    ("secondary", S.DISCONNECTED, E.RESYNC_START): (S.INCONSISTENT, (F.SAVE,)),
    ("secondary", S.INCONSISTENT, E.RESYNC_START): (S.INCONSISTENT, ()),
    ("secondary", S.INCONSISTENT, E.PEER_UP): (S.INCONSISTENT, ()),
    ("secondary", S.INCONSISTENT, E.PEER_DOWN): (S.INCONSISTENT, ()),
    ("secondary", S.INCONSISTENT, E.RESYNC_DONE): (S.REPLICA, (F.SAVE,)),
    ("secondary", S.REPLICA, E.RESYNC_DONE): (S.REPLICA, ()),
    ("secondary", S.DISCONNECTED, E.FAILOVER_GRANTED): (S.SUSPENDED, (
        F.SAVE, F.BUMP_EPOCH, F.BECOME_PRIMARY)),
    ("secondary", S.REPLICA, E.FAILOVER_GRANTED): (S.SUSPENDED, (
        F.SAVE, F.BUMP_EPOCH, F.BECOME_PRIMARY)),
    **{("secondary", st, E.TERMINATE): (S.TERMINATED, (F.SAVE,))
       for st in (S.REPLICA, S.DISCONNECTED, S.INCONSISTENT)},
    **{("secondary", st, E.DEMOTE): (st, ()) for st in (S.REPLICA, S.DISCONNECTED,
                                                         S.INCONSISTENT)},
}

REASONS: dict[tuple[str, Event], str] = {
    ("primary", Event.RESUME): "replication is not suspended: there is nothing to resume",
    ("secondary", Event.SUSPEND_GRANTED): "suspend runs on the primary Core",
    ("secondary", Event.RESUME): "resume runs on the primary Core",
    ("primary", Event.FAILOVER_GRANTED): "failover runs on the secondary Core",
    ("secondary", Event.FAILOVER_GRANTED): (
        "this replica is inconsistent (a resync was under way): promoting it would lose data; "
        "use --force only if the primary's data is gone for good"),
}


def step(rep: Rep, event: Event, *, force: bool = False) -> tuple[Rep, tuple[Effect, ...]]:
    """Apply one event. Raises :class:`Refused` if the table has no entry for it."""
    key = (rep.role, rep.state, event)
    entry = TABLE.get(key)
    if entry is None and force and event is Event.FAILOVER_GRANTED and rep.role == "secondary" \
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
        role = "primary"
    if Effect.BECOME_SECONDARY in effects:
        role = "secondary"
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
    if role == "primary":
        return Rep("primary", State.PAUSED if has_peer else State.STANDALONE, epoch)
    return Rep("secondary", State.DISCONNECTED, epoch)
