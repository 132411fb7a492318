"""Witness rules, sans-IO: who may suspend replication, and when a failover is allowed.

Seed 002 ("Overview of SteelFusion replication", split brain paragraph): "A
Witness registers requests to suspend replication from the Cores. A Witness
makes sure that only one Core at a time suspends its replication" and "makes
sure that both primary and secondary Cores do not get approval for suspension
at the same time". Failover "is only possible if the primary Core is not
reachable by the secondary Core and the Witness". DESIGN.md, invariant 2 (no
split brain): "the Witness never approves suspension for both Cores of a pair;
a stale primary (older epoch) is refused".

This module holds every rule and no I/O: time is always an argument (``now``,
seconds on any monotonic clock), nothing here reads a clock, a socket or a
file. The asyncio adapter (:mod:`witness.node`) persists and answers.

State
-----
*Durable* (:class:`DurableState`, survives restarts): per pair, the highest
epoch seen, the one Core holding the suspension approval (or none), the
members (at most two Cores) and whether the pairing was terminated.

*Volatile* (:class:`WitnessLogic`): one lease per Core, renewed by every frame
the Core sends (:meth:`WitnessLogic.heartbeat`). A Core is *reachable* while
its lease is live. Leases are not persisted: after a restart every lease is
unknown, and for one full lease period (the *grace*) no Core counts as
unreachable, so a Core that held its lease before the crash has time to
reconnect before its peer can fail over (lease fencing, as in Chubby/etcd).

Durable before answering
------------------------
:meth:`WitnessLogic.decide` does not change the durable state: it returns a
:class:`Verdict` carrying the new state (or ``None`` if nothing durable
changed). The adapter writes ``verdict.new_state.to_json()`` with
:func:`steelfusion.atomic.atomic_write`, then calls
:meth:`WitnessLogic.commit` and only then answers. If the write fails the
verdict is dropped and the Core gets a refusal, so a restarted Witness never
forgets an approval it gave. The convenience methods
(:meth:`~WitnessLogic.request_suspend` etc.) decide and commit at once, for
tests and in-memory use.

Decision table
--------------
:data:`TABLE` maps (who holds the pair's approval, as seen by the requester;
operation) to an :class:`Action`. Guards that apply to every row (stale epoch,
full pair, peer still reachable for a failover) are checked in
:meth:`WitnessLogic.decide`. A pair missing from the table is a
:class:`WitnessError` (h2's state machine habit, STYLE.md).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from steelfusion import statefile

STATE_KIND = "witness-state"  # magic "steelfusion-witness-state"
STATE_FORMAT = 1
MAX_MEMBERS = 2  # a replication pair is one primary and one secondary Core (seed 002)
MAX_NAME = 256
MAX_EPOCH = 2**63 - 1
DECISIONS_MAX = 200  # decisions kept in memory for ``status``


class WitnessError(Exception):
    """The Witness logic was misused (bad argument, a transition not in the table).

    Never raised for a well-formed request: those get a refused
    :class:`Decision` with a reason instead.
    """


class WitnessStateError(WitnessError):
    """The durable state file is corrupt, of another format, or fails its checksum.

    The Witness refuses to start on it: starting empty could approve both
    Cores of a pair (DESIGN.md invariant 2).
    """


class Op(enum.Enum):
    REGISTER = "register"
    SUSPEND = "suspend"
    RELEASE = "release"
    FAILOVER = "failover"
    TERMINATE = "terminate"


class Hold(enum.Enum):
    """Who holds the pair's suspension approval, seen from the requesting Core."""

    FREE = "free"  # nobody
    SELF = "self"  # the requester
    PEER = "peer"  # another Core of the pair
    TERMINATED = "terminated"  # the pairing is over


class Action(enum.Enum):
    JOIN = "join"  # register: learn membership and epoch, nothing else
    TAKE = "take"  # grant the approval to the requester
    KEEP = "keep"  # granted, idempotent: the requester already holds it
    DROP = "drop"  # release: the requester gives the approval back
    NOT_HELD = "not-held"  # release with nothing held: granted, no change
    TAKEOVER = "takeover"  # failover: requester takes the approval, epoch + 1
    END = "end"  # terminate the pairing
    REFUSE_PEER_HOLDS = "peer-holds"
    REFUSE_NOT_HOLDER = "not-holder"
    REFUSE_TERMINATED = "terminated"


#: (holder as seen by the requester, operation) -> action. Missing pairs raise
#: :class:`WitnessError`. Guards common to all rows live in ``decide``.
TABLE: dict[tuple[Hold, Op], Action] = {
    (Hold.FREE, Op.REGISTER): Action.JOIN,
    (Hold.SELF, Op.REGISTER): Action.JOIN,
    (Hold.PEER, Op.REGISTER): Action.JOIN,
    (Hold.TERMINATED, Op.REGISTER): Action.REFUSE_TERMINATED,
    (Hold.FREE, Op.SUSPEND): Action.TAKE,
    (Hold.SELF, Op.SUSPEND): Action.KEEP,
    (Hold.PEER, Op.SUSPEND): Action.REFUSE_PEER_HOLDS,  # never both (seed 002)
    (Hold.TERMINATED, Op.SUSPEND): Action.REFUSE_TERMINATED,
    (Hold.FREE, Op.RELEASE): Action.NOT_HELD,
    (Hold.SELF, Op.RELEASE): Action.DROP,
    (Hold.PEER, Op.RELEASE): Action.REFUSE_NOT_HOLDER,
    (Hold.TERMINATED, Op.RELEASE): Action.NOT_HELD,
    (Hold.FREE, Op.FAILOVER): Action.TAKEOVER,
    (Hold.SELF, Op.FAILOVER): Action.TAKEOVER,
    (Hold.PEER, Op.FAILOVER): Action.TAKEOVER,  # only if the holder is unreachable
    (Hold.TERMINATED, Op.FAILOVER): Action.REFUSE_TERMINATED,
    (Hold.FREE, Op.TERMINATE): Action.END,
    (Hold.SELF, Op.TERMINATE): Action.END,
    (Hold.PEER, Op.TERMINATE): Action.END,
    (Hold.TERMINATED, Op.TERMINATE): Action.END,
}

#: Operations whose epoch is checked against the pair's highest epoch. A
#: release only ever lowers the number of holders, so it is always safe.
_EPOCH_CHECKED = frozenset({Op.REGISTER, Op.SUSPEND, Op.FAILOVER, Op.TERMINATE})
#: Operations that make the requester a member of the pair.
_JOINS = frozenset({Op.REGISTER, Op.SUSPEND, Op.FAILOVER})


# -- reasons (short codes on the wire; ``detail`` says it for a person) ----------
GRANTED = "granted"
ALREADY_HELD = "already-held"
RELEASED = "released"
NOT_HELD = "not-held"
REGISTERED = "registered"
FAILED_OVER = "failed-over"
FAILOVER_RETRY = "failover-retry"
TERMINATED = "terminated"
UNKNOWN_PAIR = "unknown-pair"
PEER_HOLDS = "peer-holds"
NOT_HOLDER = "not-holder"
STALE_EPOCH = "stale-epoch"
PEER_REACHABLE = "peer-reachable"
PEER_UNKNOWN = "peer-unknown"
PAIR_FULL = "pair-full"
NOT_MEMBER = "not-member"


@dataclass(frozen=True, slots=True)
class Decision:
    """The Witness's answer to one request.

    ``epoch`` is the pair's highest epoch after the decision: a Core refused
    with ``stale-epoch`` learns from it that it is no longer primary
    (DESIGN.md invariant 2); a granted failover returns the new epoch.
    """

    granted: bool
    reason: str
    epoch: int
    holder: str | None = None
    detail: str = ""
    #: refused for now: seconds until asking again may succeed (a live lease, the restart
    #: grace), so an operator hears when failover becomes possible, not only why not yet
    retry_in: float | None = None


@dataclass(frozen=True, slots=True)
class Member:
    role: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Failover:
    """The last failover of a pair, so a retried request (lost reply) is idempotent."""

    node: str
    from_epoch: int
    to_epoch: int


@dataclass(frozen=True, slots=True)
class PairRecord:
    """Durable record of one replication pair. Treat ``members`` as read-only."""

    pair: str
    epoch: int = 0
    holder: str | None = None
    holder_epoch: int = 0
    members: Mapping[str, Member] = field(default_factory=dict)
    terminated: bool = False
    failover: Failover | None = None

    def to_obj(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "holder": self.holder, "holder_epoch": self.holder_epoch,
            "members": {n: {"role": m.role, "epoch": m.epoch}
                        for n, m in sorted(self.members.items())},
            "terminated": self.terminated,
            "failover": (None if self.failover is None else
                         {"node": self.failover.node, "from_epoch": self.failover.from_epoch,
                          "to_epoch": self.failover.to_epoch}),
        }

    @classmethod
    def from_obj(cls, pair: str, o: Any) -> PairRecord:
        if not isinstance(o, dict):
            raise WitnessStateError(f"pair {pair!r}: record is not an object")
        try:
            members = {str(n): Member(_s(m["role"]), _check_epoch(m["epoch"]))
                       for n, m in dict(o["members"]).items()}
            fo = o.get("failover")
            failover = (None if fo is None else
                        Failover(_s(fo["node"]), _check_epoch(fo["from_epoch"]),
                                 _check_epoch(fo["to_epoch"])))
            holder = o["holder"]
            if holder is not None:
                holder = _s(holder)
            rec = cls(pair=pair, epoch=_check_epoch(o["epoch"]), holder=holder,
                      holder_epoch=_check_epoch(o["holder_epoch"]), members=members,
                      terminated=bool(o["terminated"]), failover=failover)
        except (KeyError, TypeError, ValueError, AttributeError, WitnessError) as e:
            raise WitnessStateError(f"pair {pair!r}: bad record: {e}") from None
        if rec.holder is not None and rec.holder not in rec.members:
            raise WitnessStateError(f"pair {pair!r}: holder {rec.holder!r} is not a member")
        if len(rec.members) > MAX_MEMBERS:
            raise WitnessStateError(f"pair {pair!r}: more than {MAX_MEMBERS} members")
        return rec


def _s(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {type(v).__name__}")
    return v


@dataclass(frozen=True, slots=True)
class DurableState:
    """Everything the Witness must remember across a restart.

    ``version`` counts committed changes; :meth:`WitnessLogic.commit` refuses a
    verdict computed against an older version.
    """

    version: int = 0
    pairs: Mapping[str, PairRecord] = field(default_factory=dict)

    def with_pair(self, rec: PairRecord) -> DurableState:
        return DurableState(self.version + 1, {**self.pairs, rec.pair: rec})

    def to_json(self) -> bytes:
        """The state file (steelfusion/statefile.py: magic, format, CRC32C of the body)."""
        body = {"version": self.version,
                "pairs": {p: r.to_obj() for p, r in sorted(self.pairs.items())}}
        return statefile.encode(STATE_KIND, STATE_FORMAT, body)

    @classmethod
    def from_json(cls, data: bytes) -> DurableState:
        try:
            body = statefile.decode(data, STATE_KIND, STATE_FORMAT)
        except ValueError as e:
            raise WitnessStateError(f"witness state: {e}") from None
        pairs = body.get("pairs")
        if not isinstance(pairs, dict):
            raise WitnessStateError("witness state has no 'pairs' object")
        try:
            version = _check_epoch(body.get("version"))
        except WitnessError as e:
            raise WitnessStateError(f"witness state version: {e}") from None
        return cls(version, {str(p): PairRecord.from_obj(str(p), r) for p, r in pairs.items()})


@dataclass(frozen=True, slots=True)
class Request:
    """One request from a Core. ``node`` is who asks (the adapter takes it from
    the connection's HELLO, never from the request body)."""

    op: Op
    node: str
    pair: str
    epoch: int | None = None
    peer: str | None = None
    role: str | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """A decision plus the durable state to write before answering (``None``: no change)."""

    request: Request
    decision: Decision
    new_state: DurableState | None
    base_version: int


@dataclass(frozen=True, slots=True)
class Reach:
    """Can the Witness reach ``node``? ``known`` is false during the post-restart grace."""

    reachable: bool
    known: bool
    expires_in: float | None


def _check_name(what: str, v: object) -> str:
    if not isinstance(v, str) or not v or len(v) > MAX_NAME:
        raise WitnessError(f"{what} must be a non-empty string of at most {MAX_NAME} characters")
    return v


def _check_epoch(v: object) -> int:
    """An epoch, in a request or in the state file (where the version is one too)."""
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_EPOCH:
        raise WitnessError(f"epoch must be an integer in 0..2^63-1, got {v!r}")
    return v


def _check_now(v: object) -> float:
    if not isinstance(v, int | float) or isinstance(v, bool) or v != v:
        raise WitnessError(f"now must be a number, got {v!r}")
    return float(v)


class WitnessLogic:
    """The Witness state machine: durable pair records plus volatile leases.

    ``now`` at construction is the boot time: for ``lease_seconds`` after it,
    a Core with no lease is *unknown*, not unreachable (post-restart grace).
    """

    def __init__(self, lease_seconds: float, now: float,
                 state: DurableState | None = None) -> None:
        if not isinstance(lease_seconds, int | float) or not lease_seconds > 0:
            raise WitnessError(f"lease_seconds must be > 0, got {lease_seconds!r}")
        self.lease_seconds = float(lease_seconds)
        self.boot = _check_now(now)
        self.state = state if state is not None else DurableState()
        self.leases: dict[str, float] = {}  # node -> lease expiry (same clock as ``now``)
        self.decisions: deque[dict[str, Any]] = deque(maxlen=DECISIONS_MAX)

    # -- persistence --------------------------------------------------------------
    def to_json(self) -> bytes:
        return self.state.to_json()

    @classmethod
    def from_json(cls, data: bytes, lease_seconds: float, now: float) -> WitnessLogic:
        """A restarted Witness: durable state back, every lease unknown."""
        return cls(lease_seconds, now, DurableState.from_json(data))

    # -- leases ---------------------------------------------------------------------
    def heartbeat(self, node: str, now: float) -> None:
        """``node`` sent a frame at ``now``: its lease runs to ``now + lease_seconds``."""
        _check_name("node", node)
        now = _check_now(now)
        exp = now + self.lease_seconds
        if exp > self.leases.get(node, float("-inf")):
            self.leases[node] = exp

    def can_reach(self, node: str, now: float) -> bool:
        """True while ``node``'s lease is live."""
        return _check_now(now) < self.leases.get(node, float("-inf"))

    def in_grace(self, now: float) -> bool:
        """True for one lease period after (re)start, while leases are still unknown."""
        return _check_now(now) < self.boot + self.lease_seconds

    def reach(self, node: str, now: float) -> Reach:
        exp = self.leases.get(node)
        live = exp is not None and now < exp
        return Reach(reachable=live, known=live or not self.in_grace(now),
                     expires_in=None if exp is None else round(exp - now, 3))

    # -- queries --------------------------------------------------------------------
    def pair(self, pair: str) -> PairRecord | None:
        return self.state.pairs.get(pair)

    def holder(self, pair: str) -> str | None:
        rec = self.state.pairs.get(pair)
        return None if rec is None else rec.holder

    def epoch(self, pair: str) -> int:
        rec = self.state.pairs.get(pair)
        return 0 if rec is None else rec.epoch

    def holds(self, node: str, pair: str) -> bool:
        return self.holder(pair) == node

    # -- the rules ------------------------------------------------------------------
    def decide(self, req: Request, now: float, renew: bool = True) -> Verdict:
        """Apply the table and guards to ``req``; renews the requester's lease.

        Does not change the durable state: write ``verdict.new_state`` (if
        any), then :meth:`commit`. ``renew=False`` leaves the lease alone (a
        caller with no time at hand, e.g. a release).
        """
        if not isinstance(req, Request) or not isinstance(req.op, Op):
            raise WitnessError(f"not a witness request: {req!r}")
        node = _check_name("node", req.node)
        pair_id = _check_name("pair", req.pair)
        epoch = None if req.epoch is None else _check_epoch(req.epoch)
        if req.peer is not None:
            _check_name("peer", req.peer)
        if req.role is not None and not isinstance(req.role, str):
            raise WitnessError("role must be a string")
        now = _check_now(now)
        if renew:
            self.heartbeat(node, now)  # a request is a frame: proof of life
        base = self.state
        rec = base.pairs.get(pair_id)
        new_rec = rec if rec is not None else PairRecord(pair_id)

        def verdict(granted: bool, reason: str, detail: str = "",
                    out: PairRecord | None = None, retry_in: float | None = None) -> Verdict:
            r = out if out is not None else new_rec
            changed = r != rec and not (rec is None and r == PairRecord(pair_id))
            return Verdict(req, Decision(granted, reason, r.epoch, r.holder, detail, retry_in),
                           base.with_pair(r) if changed else None, base.version)

        if rec is None and req.op in (Op.RELEASE, Op.TERMINATE):
            return verdict(True, UNKNOWN_PAIR, f"the Witness has no record of pair {pair_id!r}")

        if new_rec.terminated:
            hold = Hold.TERMINATED
        elif new_rec.holder is None:
            hold = Hold.FREE
        elif new_rec.holder == node:
            hold = Hold.SELF
        else:
            hold = Hold.PEER
        action = TABLE.get((hold, req.op))
        if action is None:
            raise WitnessError(f"no rule for {req.op.value} when the approval is {hold.value}")

        # A failover retried after its reply was lost: same Core, same old epoch.
        fo = new_rec.failover
        if (req.op is Op.FAILOVER and fo is not None and fo.node == node and hold is Hold.SELF
                and epoch == fo.from_epoch and new_rec.epoch == fo.to_epoch):
            return verdict(True, FAILOVER_RETRY, f"failover to epoch {fo.to_epoch} already granted")

        if action is Action.REFUSE_TERMINATED:
            return verdict(False, TERMINATED, f"pair {pair_id!r} was terminated")
        if req.op is Op.TERMINATE and new_rec.members and node not in new_rec.members:
            return verdict(False, NOT_MEMBER, f"{node} is not a member of pair {pair_id!r}")
        if req.op in _EPOCH_CHECKED and epoch is not None and epoch < new_rec.epoch:
            return verdict(False, STALE_EPOCH,
                           f"epoch {epoch} is older than the pair's epoch {new_rec.epoch}: "
                           "another Core has become primary")

        # Membership and epoch learning (durable: a member stays a member).
        if req.op in _JOINS:
            if node not in new_rec.members and len(new_rec.members) >= MAX_MEMBERS:
                return verdict(False, PAIR_FULL,
                               f"pair {pair_id!r} already has Cores "
                               f"{', '.join(sorted(new_rec.members))}")
            old = new_rec.members.get(node)
            m_epoch = epoch if epoch is not None else (old.epoch if old else 0)
            role = req.role if req.role is not None else (old.role if old else "")
            member = Member(role, max(m_epoch, old.epoch) if old else m_epoch)
            if old != member:
                new_rec = replace(new_rec, members={**new_rec.members, node: member})
        if epoch is not None and epoch > new_rec.epoch and req.op is not Op.RELEASE:
            new_rec = replace(new_rec, epoch=epoch)

        if action is Action.JOIN:
            return verdict(True, REGISTERED)
        if action is Action.TAKE:
            new_rec = replace(new_rec, holder=node,
                              holder_epoch=epoch if epoch is not None else new_rec.epoch)
            return verdict(True, GRANTED, f"{node} may suspend replication of {pair_id!r}")
        if action is Action.KEEP:
            if epoch is not None and epoch > new_rec.holder_epoch:
                new_rec = replace(new_rec, holder_epoch=epoch)
            return verdict(True, ALREADY_HELD, f"{node} already holds the approval")
        if action is Action.REFUSE_PEER_HOLDS:
            return verdict(False, PEER_HOLDS,
                           f"{new_rec.holder} holds the suspension approval of {pair_id!r}")
        if action is Action.DROP:
            new_rec = replace(new_rec, holder=None, holder_epoch=0)
            return verdict(True, RELEASED)
        if action is Action.NOT_HELD:
            return verdict(True, NOT_HELD, f"{node} held no approval")
        if action is Action.REFUSE_NOT_HOLDER:
            return verdict(False, NOT_HOLDER, f"{new_rec.holder} holds the approval, not {node}")
        if action is Action.END:
            new_rec = replace(new_rec, terminated=True, holder=None, holder_epoch=0)
            return verdict(True, TERMINATED, f"pair {pair_id!r} terminated")
        if action is Action.TAKEOVER:
            return self._takeover(req, node, epoch, new_rec, now, verdict)
        raise WitnessError(f"unhandled action {action}")  # pragma: no cover

    def _takeover(self, req: Request, node: str, epoch: int | None, rec: PairRecord,
                  now: float, verdict: Callable[..., Verdict]) -> Verdict:
        """Failover (seed 002): allowed only if the Witness cannot reach the peer.

        Every other party of the pair (the named peer, the other member, the
        current holder) must be confirmed unreachable: lease over and past the
        restart grace. The requester then holds the approval (a new primary
        starts suspended, DESIGN.md) at epoch + 1; the old holder's approval
        is revoked and it learns the newer epoch when it returns.
        """
        others = {n for n in rec.members if n != node}
        if req.peer is not None and req.peer != node:
            others.add(req.peer)
        if rec.holder is not None and rec.holder != node:
            others.add(rec.holder)
        for other in sorted(others):
            if self.can_reach(other, now):
                left = self.leases[other] - now
                heard = self.lease_seconds - left
                return verdict(False, PEER_REACHABLE,
                               f"the Witness holds {other}'s lease for {left:.1f} s more "
                               f"(it heard from {other} {heard:.1f} s ago)",
                               retry_in=round(left, 3))
            if self.in_grace(now):
                wait = self.boot + self.lease_seconds - now
                return verdict(False, PEER_UNKNOWN,
                               f"the Witness restarted; {other}'s lease is unknown for "
                               f"{wait:.1f} s more", retry_in=round(wait, 3))
        new_epoch = max(rec.epoch, epoch if epoch is not None else 0) + 1
        if new_epoch > MAX_EPOCH:
            raise WitnessError("epoch space exhausted")
        members = {n: (Member("secondary", m.epoch) if n != node else Member("primary", new_epoch))
                   for n, m in rec.members.items()}
        members[node] = Member("primary", new_epoch)
        old = rec.holder
        rec = replace(rec, epoch=new_epoch, holder=node, holder_epoch=new_epoch, members=members,
                      failover=Failover(node, epoch if epoch is not None else rec.epoch,
                                        new_epoch))
        detail = f"{node} is primary at epoch {new_epoch}"
        if old is not None and old != node:
            detail += f"; approval of {old} revoked"
        return verdict(True, FAILED_OVER, detail, rec)

    def commit(self, v: Verdict, now: float) -> Decision:
        """Make ``v`` the current state (after the adapter persisted it) and log it."""
        if v.new_state is not None:
            if v.base_version != self.state.version:
                raise WitnessError(f"verdict computed at state version {v.base_version}, "
                                   f"state is now {self.state.version}")
            self.state = v.new_state
        d = v.decision
        self.decisions.append({
            "t": round(_check_now(now), 3), "op": v.request.op.value, "node": v.request.node,
            "pair": v.request.pair, "epoch": v.request.epoch, "peer": v.request.peer,
            "granted": d.granted, "reason": d.reason, "pair_epoch": d.epoch, "holder": d.holder})
        return d

    def apply(self, req: Request, now: float | None) -> Decision:
        """Decide and commit at once (in-memory use and tests).

        ``now=None`` (only sensible for release/terminate) renews no lease.
        """
        if now is None:
            return self.commit(self.decide(req, self.boot, renew=False), self.boot)
        return self.commit(self.decide(req, now), now)

    # -- the API of DESIGN.md / the brief (decide + commit) ------------------------------
    def register(self, node: str, pair: str, role: str, epoch: int, now: float) -> Decision:
        return self.apply(Request(Op.REGISTER, node, pair, epoch, role=role), now)

    def request_suspend(self, node: str, pair: str, epoch: int, now: float) -> Decision:
        return self.apply(Request(Op.SUSPEND, node, pair, epoch), now)

    def release_suspend(self, node: str, pair: str, now: float | None = None) -> Decision:
        """Give the approval back (after resync completes). Always safe, so no epoch."""
        return self.apply(Request(Op.RELEASE, node, pair), now)

    def request_failover(self, node: str, pair: str, epoch: int, now: float,
                         peer: str | None = None) -> Decision:
        return self.apply(Request(Op.FAILOVER, node, pair, epoch, peer=peer), now)

    def terminate(self, pair: str, node: str | None = None, epoch: int | None = None,
                  now: float | None = None) -> Decision:
        """End the pairing. ``node``/``epoch``, when given, must be a current member."""
        if node is None:
            rec = self.state.pairs.get(_check_name("pair", pair))
            if rec is None:
                return Decision(True, UNKNOWN_PAIR, 0)
            new = replace(rec, terminated=True, holder=None, holder_epoch=0)
            v = Verdict(Request(Op.TERMINATE, "operator", pair, epoch),
                        Decision(True, TERMINATED, new.epoch),
                        None if new == rec else self.state.with_pair(new), self.state.version)
            return self.commit(v, self.boot if now is None else now)
        return self.apply(Request(Op.TERMINATE, node, pair, epoch), now)

    # -- status -------------------------------------------------------------------------
    def status(self, now: float) -> dict[str, Any]:
        return {
            "lease_seconds": self.lease_seconds,
            "grace_remaining": round(max(0.0, self.boot + self.lease_seconds - now), 3),
            "state_version": self.state.version,
            "pairs": {p: {**r.to_obj(), "pair": p} for p, r in sorted(self.state.pairs.items())},
            "holders": {p: r.holder for p, r in sorted(self.state.pairs.items())},
            "epochs": {p: r.epoch for p, r in sorted(self.state.pairs.items())},
            "leases": {n: {"reachable": now < exp, "expires_in": round(exp - now, 3)}
                       for n, exp in sorted(self.leases.items())},
            "decisions": list(self.decisions),
        }
