"""Witness rules, sans-IO (witness/logic.py, witness/protocol.py).

Seed 002: the Witness "makes sure that both primary and secondary Cores do not
get approval for suspension at the same time"; failover "is only possible if
the primary Core is not reachable by the secondary Core and the Witness".
DESIGN.md invariant 2: no split brain; a stale (older epoch) Core is refused.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from witness.logic import (
    ALREADY_HELD,
    FAILED_OVER,
    FAILOVER_RETRY,
    GRANTED,
    NOT_HELD,
    NOT_HOLDER,
    NOT_MEMBER,
    PAIR_FULL,
    PEER_HOLDS,
    PEER_REACHABLE,
    PEER_UNKNOWN,
    RELEASED,
    STALE_EPOCH,
    TABLE,
    TERMINATED,
    UNKNOWN_PAIR,
    DurableState,
    Hold,
    Member,
    Op,
    PairRecord,
    Request,
    WitnessError,
    WitnessLogic,
    WitnessStateError,
)
from witness.protocol import ProtocolError, WireReply, WireRequest, parse_reply, parse_request

L = 1.0  # lease seconds in these tests
P = "pair-1"


def fresh(now: float = 0.0) -> WitnessLogic:
    w = WitnessLogic(L, now)
    w.register("a", P, "primary", 1, now)
    w.register("b", P, "secondary", 1, now)
    return w


# -- suspension: never both ------------------------------------------------------------
def test_first_core_granted_second_refused() -> None:
    w = fresh()
    d = w.request_suspend("a", P, 1, 0.1)
    assert (d.granted, d.reason, d.epoch, d.holder) == (True, GRANTED, 1, "a")
    d = w.request_suspend("b", P, 1, 0.2)
    assert (d.granted, d.reason, d.holder) == (False, PEER_HOLDS, "a")
    assert w.holder(P) == "a"


def test_same_core_again_is_idempotent() -> None:
    w = fresh()
    w.request_suspend("a", P, 1, 0.1)
    version = w.state.version
    d = w.request_suspend("a", P, 1, 0.2)
    assert (d.granted, d.reason) == (True, ALREADY_HELD)
    assert w.state.version == version  # nothing new to persist


def test_release_then_peer_may_suspend() -> None:
    w = fresh()
    w.request_suspend("a", P, 1, 0.1)
    assert w.release_suspend("b", P, 0.2).reason == NOT_HOLDER
    d = w.release_suspend("a", P, 0.3)
    assert (d.granted, d.reason, d.holder) == (True, RELEASED, None)
    assert w.release_suspend("a", P, 0.35).reason == NOT_HELD  # idempotent
    assert w.request_suspend("b", P, 1, 0.4).granted
    assert w.request_suspend("a", P, 1, 0.5).reason == PEER_HOLDS


def test_release_of_unknown_pair_is_harmless() -> None:
    w = WitnessLogic(L, 0.0)
    d = w.release_suspend("a", "nope")
    assert (d.granted, d.reason) == (True, UNKNOWN_PAIR)
    assert w.state.pairs == {}


def test_third_core_is_refused_pair_full() -> None:
    w = fresh()
    d = w.request_suspend("c", P, 1, 0.1)
    assert (d.granted, d.reason) == (False, PAIR_FULL)
    assert "c" not in w.pair(P).members  # type: ignore[union-attr]


# -- epochs ----------------------------------------------------------------------------
def test_stale_epoch_refused_for_every_epoch_checked_op() -> None:
    w = fresh()
    w.request_suspend("a", P, 3, 0.1)  # the pair learns epoch 3
    assert w.epoch(P) == 3
    for d in (w.request_suspend("b", P, 2, 0.2), w.request_failover("b", P, 2, 5.0, peer="a"),
              w.register("b", P, "secondary", 2, 0.3), w.terminate(P, "b", 2, 0.4)):
        assert (d.granted, d.reason, d.epoch) == (False, STALE_EPOCH, 3)
    assert w.holder(P) == "a" and not w.pair(P).terminated  # type: ignore[union-attr]


def test_stale_holder_is_refused_but_still_blocks_its_peer() -> None:
    w = fresh()
    w.request_suspend("a", P, 1, 0.1)
    w.register("b", P, "secondary", 4, 0.2)  # b says the pair is at epoch 4
    assert w.request_suspend("a", P, 1, 0.3).reason == STALE_EPOCH
    assert w.request_suspend("b", P, 4, 0.3).reason == PEER_HOLDS  # never both
    assert w.release_suspend("a", P, 0.4).granted  # a release is always safe
    assert w.request_suspend("b", P, 4, 0.5).granted


# -- leases and failover ---------------------------------------------------------------
def test_lease_is_live_for_lease_seconds_after_each_frame() -> None:
    w = WitnessLogic(L, 0.0)
    assert not w.can_reach("a", 0.0)
    w.heartbeat("a", 1.0)
    assert w.can_reach("a", 1.0) and w.can_reach("a", 1.999)
    assert not w.can_reach("a", 2.0)
    w.heartbeat("a", 0.5)  # an older frame never shortens the lease
    assert w.leases["a"] == 2.0


def test_failover_refused_while_peer_reachable_then_granted() -> None:
    w = fresh()
    w.request_suspend("a", P, 1, 0.1)
    w.heartbeat("a", 0.9)
    d = w.request_failover("b", P, 1, 1.5, peer="a")
    assert (d.granted, d.reason, d.epoch) == (False, PEER_REACHABLE, 1)
    d = w.request_failover("b", P, 1, 1.9, peer="a")
    assert (d.granted, d.reason, d.epoch, d.holder) == (True, FAILED_OVER, 2, "b")
    rec = w.pair(P)
    assert rec is not None and rec.members["b"].role == "primary"
    # The old holder was revoked and learns the newer epoch when it returns.
    assert not w.holds("a", P)
    d = w.request_suspend("a", P, 1, 2.0)
    assert (d.granted, d.reason, d.epoch) == (False, STALE_EPOCH, 2)


def test_failover_retry_after_lost_reply_is_granted_same_epoch() -> None:
    w = fresh()
    d1 = w.request_failover("b", P, 1, 2.0, peer="a")
    assert d1.granted and d1.epoch == 2
    d2 = w.request_failover("b", P, 1, 2.1, peer="a")
    assert (d2.granted, d2.reason, d2.epoch) == (True, FAILOVER_RETRY, 2)


def test_failover_checks_a_named_peer_the_witness_never_paired() -> None:
    w = WitnessLogic(L, 0.0)
    w.heartbeat("x", 1.5)  # x is alive, but never said which pair it is in
    assert w.request_failover("b", P, 1, 2.0, peer="x").reason == PEER_REACHABLE
    assert w.request_failover("b", P, 1, 2.6, peer="x").granted


def test_failback_new_primary_stopped_old_site_fails_over_again() -> None:
    w = fresh()
    assert w.request_failover("b", P, 1, 2.0, peer="a").epoch == 2
    w.heartbeat("b", 2.5)
    w.register("a", P, "secondary", 2, 3.0)  # a returns, resynced, learns epoch 2
    assert w.request_failover("a", P, 2, 3.0, peer="b").reason == PEER_REACHABLE
    d = w.request_failover("a", P, 2, 3.6, peer="b")  # b stopped (seed: stop it first)
    assert (d.granted, d.epoch, d.holder) == (True, 3, "a")


# -- restart ---------------------------------------------------------------------------
def test_restart_keeps_the_holder_and_leases_start_unknown() -> None:
    w = fresh()
    w.request_suspend("a", P, 1, 0.1)
    w2 = WitnessLogic.from_json(w.to_json(), L, 10.0)
    assert w2.state == w.state
    assert w2.request_suspend("b", P, 1, 10.0).reason == PEER_HOLDS
    # a is not heartbeating, but for one lease after the restart it is unknown.
    assert w2.request_failover("b", P, 1, 10.5, peer="a").reason == PEER_UNKNOWN
    assert w2.reach("a", 10.5).known is False
    w2.heartbeat("a", 10.6)  # a reconnects within the grace
    assert w2.request_failover("b", P, 1, 11.2, peer="a").reason == PEER_REACHABLE
    assert w2.request_failover("b", P, 1, 11.6, peer="a").granted


def test_decide_does_not_change_state_until_commit() -> None:
    w = fresh()
    before = w.state
    v = w.decide(Request(Op.SUSPEND, "a", P, 1), 0.1)
    assert v.decision.granted and v.new_state is not None
    assert w.state is before and w.holder(P) is None  # not yet: persist first
    v2 = w.decide(Request(Op.SUSPEND, "b", P, 1), 0.1)
    assert v2.decision.granted  # computed against the same base ...
    w.commit(v, 0.1)
    with pytest.raises(WitnessError):  # ... so it can no longer be committed
        w.commit(v2, 0.1)
    assert w.holder(P) == "a"


def test_state_file_corruption_is_detected() -> None:
    w = fresh()
    w.request_suspend("a", P, 1, 0.1)
    good = w.to_json()
    assert DurableState.from_json(good) == w.state
    env = json.loads(good)
    env["state"]["pairs"][P]["holder"] = "b"  # flipped without a new checksum
    bad = [b"", b"{", b"[]", good[: len(good) // 2], json.dumps(env).encode(),
           good.replace(b"steelfusion-witness-state", b"something-else"),
           good.replace(b'"format": 1', b'"format": 9')]
    for data in bad:
        with pytest.raises(WitnessStateError):
            DurableState.from_json(data)


# -- terminate -------------------------------------------------------------------------
def test_terminate_ends_the_pairing() -> None:
    w = fresh()
    w.request_suspend("a", P, 1, 0.1)
    assert w.terminate(P, "c", 1, 0.2).reason == NOT_MEMBER
    d = w.terminate(P, "a", 1, 0.3)
    assert (d.granted, d.reason, d.holder) == (True, TERMINATED, None)
    assert w.request_suspend("b", P, 1, 0.4).reason == TERMINATED
    assert w.request_failover("b", P, 1, 9.0, peer="a").reason == TERMINATED
    assert w.terminate(P).granted  # operator, idempotent
    assert w.terminate("other").reason == UNKNOWN_PAIR


# -- the table ---------------------------------------------------------------------------
def test_table_covers_every_state_and_operation() -> None:
    missing = [(h, o) for h in Hold for o in Op if (h, o) not in TABLE]
    assert missing == []


def test_bad_arguments_raise_the_module_error_only() -> None:
    w = WitnessLogic(L, 0.0)
    for req in (Request(Op.SUSPEND, "", P, 1), Request(Op.SUSPEND, "a", "", 1),
                Request(Op.SUSPEND, "a", P, -1), Request(Op.SUSPEND, "a", P, True),  # type: ignore[arg-type]
                Request(Op.FAILOVER, "a", P, 1, peer="")):
        with pytest.raises(WitnessError):
            w.decide(req, 0.0)
    with pytest.raises(WitnessError):
        w.decide(Request(Op.SUSPEND, "a", P, 1), float("nan"))
    with pytest.raises(WitnessError):
        WitnessLogic(0, 0.0)


# -- hypothesis: interleavings ---------------------------------------------------------
@dataclass
class Core:
    """What a Core believes, learning only from the Witness's answers."""

    name: str
    epoch: int = 1
    holds: bool = False
    last_contact: float | None = None  # when the Witness last heard from it

    def valid_holder(self, now: float) -> bool:
        # Lease fencing: a holder that cannot renew its lease stops acting on it.
        return self.holds and self.last_contact is not None and now < self.last_contact + L


ACTIONS = ["suspend", "release", "failover", "heartbeat", "restart", "advance",
           "crash_after_persist"]
step_st = st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(ACTIONS),
                    st.sampled_from(["own", "own", "stale", "bump"]),
                    st.sampled_from([0.0, 0.1, 0.4, 0.5, 0.99, 1.0, 1.01, 2.5]))


class Sim:
    """The Witness logic behind a model of its adapter: persist, then commit, then answer."""

    def __init__(self) -> None:
        self.now = 0.0
        self.w = WitnessLogic(L, self.now)
        self.disk = self.w.to_json()
        self.cores = {n: Core(n) for n in ("a", "b")}
        self.max_epoch = 0

    def ask(self, req: Request, commit: bool = True) -> Any:
        before = self.w.epoch(req.pair)
        v = self.w.decide(req, self.now)
        if v.new_state is not None:
            self.disk = v.new_state.to_json()  # the adapter's atomic_write
        if not commit:
            return None
        d = self.w.commit(v, self.now)
        retry = d.reason == FAILOVER_RETRY
        if (req.op in (Op.SUSPEND, Op.FAILOVER, Op.REGISTER) and req.epoch is not None
                and req.epoch < before and not retry):
            assert (d.granted, d.reason) == (False, STALE_EPOCH), (req, d)
        return d

    def step(self, node: str, action: str, ep: str, dt: float) -> None:
        c = self.cores[node]
        other = "b" if node == "a" else "a"
        epoch = {"own": c.epoch, "stale": max(0, c.epoch - 1), "bump": c.epoch + 1}[ep]
        if action == "advance":
            self.now += dt
        elif action == "restart":
            self.w = WitnessLogic.from_json(self.disk, L, self.now)
        elif action == "heartbeat":
            self.w.heartbeat(node, self.now)
            c.last_contact = self.now
            c.holds = self.w.holds(node, P)
        elif action == "crash_after_persist":
            # The decision reached the disk, the Witness died before answering.
            self.ask(Request(Op.SUSPEND if ep == "own" else Op.FAILOVER, node, P, epoch,
                             peer=other), commit=False)
            self.w = WitnessLogic.from_json(self.disk, L, self.now)
        else:
            op = {"suspend": Op.SUSPEND, "release": Op.RELEASE, "failover": Op.FAILOVER}[action]
            d = self.ask(Request(op, node, P, None if op is Op.RELEASE else epoch,
                                 peer=other if op is Op.FAILOVER else None))
            c.last_contact = self.now
            c.holds = d.holder == node
            if d.reason == STALE_EPOCH or (op is Op.FAILOVER and d.granted):
                c.epoch = d.epoch
            elif op is not Op.RELEASE:
                c.epoch = epoch
            if op is Op.SUSPEND and d.granted:
                assert d.holder == node
        self.check()

    def check(self) -> None:
        # Never both: at most one Core believes, with a live lease, that it may suspend.
        valid = [c.name for c in self.cores.values() if c.valid_holder(self.now)]
        assert len(valid) <= 1, (valid, self.now, self.w.status(self.now))
        # The Witness never answered from a state it had not written.
        assert DurableState.from_json(self.disk) == self.w.state
        rec = self.w.pair(P)
        if rec is not None:
            assert rec.holder is None or rec.holder in rec.members
            assert len(rec.members) <= 2
            assert rec.epoch >= self.max_epoch  # epochs never go back, restarts included
            self.max_epoch = rec.epoch


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step_st, max_size=60))
def test_interleavings_never_approve_both(steps: list[tuple[str, str, str, float]]) -> None:
    sim = Sim()
    for s in steps:
        sim.step(*s)


def test_seeded_long_runs_never_approve_both() -> None:
    """VOPR-style: one seeded Random per run; a failing seed replays exactly."""
    for seed in range(30):
        rnd = random.Random(seed)
        sim = Sim()
        for _ in range(400):
            sim.step(rnd.choice("ab"), rnd.choice(ACTIONS),
                     rnd.choice(["own", "own", "own", "stale", "bump"]),
                     rnd.choice([0.0, 0.1, 0.3, 0.5, 1.0, 1.2]))


# -- hypothesis: the (state x event) product ---------------------------------------------
names = st.sampled_from(["a", "b", "c"])
any_names = st.one_of(names, names, names, st.sampled_from(["", "x" * 300]), st.integers(),
                      st.none())
any_epochs = st.one_of(st.integers(0, 8), st.integers(0, 8), st.integers(0, 8), st.none(),
                       st.integers(-3, -1), st.booleans(),
                       st.sampled_from([2**63 - 1, 2**63, 2**64]), st.floats())
any_now = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 1.5, 1.99, 2.0, 3.0, 5.0]),
                    st.sampled_from([0.0, 0.5, 1.0, 1.5, 1.99, 2.0, 3.0, 5.0]), st.floats())
members_st = st.dictionaries(names, st.builds(Member, st.sampled_from(["primary", "secondary"]),
                                              st.integers(0, 6)), max_size=2)


@st.composite
def pair_records(draw: st.DrawFn) -> PairRecord:
    members = draw(members_st)
    holder = draw(st.sampled_from([None, *sorted(members)]))
    return PairRecord(P, epoch=draw(st.integers(0, 6)), holder=holder,
                      holder_epoch=draw(st.integers(0, 6)), members=members,
                      terminated=draw(st.booleans()))


def _check_transition(w: WitnessLogic, rec: PairRecord, op: Op, node: Any, epoch: Any,
                      peer: Any, now: Any, leases: dict[str, float], boot: float) -> None:
    try:
        v = w.decide(Request(op, node, P, epoch, peer), now)
    except WitnessError:
        return
    d = v.decision
    new = v.new_state.pairs[P] if v.new_state is not None else rec
    assert new.holder is None or new.holder in new.members
    assert len(new.members) <= 2
    assert new.epoch >= rec.epoch
    if v.new_state is not None:
        assert DurableState.from_json(v.new_state.to_json()) == v.new_state
    if rec.holder is not None and new.holder not in (None, rec.holder):
        # The approval moved from one Core to another: only a failover, only with
        # the old holder's lease over and past the post-restart grace.
        assert op is Op.FAILOVER and d.granted
        assert now >= leases.get(rec.holder, float("-inf")), "holder's lease was live"
        assert now >= boot + L, "granted during the post-restart grace"
    if d.granted and op is Op.SUSPEND:
        assert new.holder == node
    if rec.terminated and op in (Op.SUSPEND, Op.FAILOVER):
        assert not d.granted
    if op is not Op.RELEASE and isinstance(epoch, int) and epoch < rec.epoch and rec.members:
        assert not d.granted or (op is Op.TERMINATE and rec.terminated), "stale epoch granted"


lease_choice = st.sampled_from([None, 0.5, 1.0, 2.0, 4.0])


@pytest.mark.parametrize("op", list(Op), ids=lambda o: o.value)
@pytest.mark.parametrize("hold", list(Hold), ids=lambda h: h.value)
@settings(max_examples=150, deadline=None)
@given(data=st.data(), node=names, epoch=st.one_of(st.none(), st.integers(0, 8)),
       peer=st.one_of(st.none(), names), pair_epoch=st.integers(0, 6),
       now=st.sampled_from([0.0, 0.5, 1.0, 1.5, 1.99, 2.0, 3.0, 5.0]),
       lease_of=st.tuples(lease_choice, lease_choice, lease_choice),
       boot=st.sampled_from([0.0, 1.0]))
def test_state_event_product(hold: Hold, op: Op, data: st.DataObject, node: str,
                             epoch: int | None, peer: str | None, pair_epoch: int, now: float,
                             lease_of: tuple[float | None, ...], boot: float) -> None:
    """Well-formed requests over every (holder state x operation): the rules hold."""
    others = [n for n in "abc" if n != node]
    members = {n: Member("primary", pair_epoch) for n in data.draw(
        st.lists(st.sampled_from(others), max_size=1 if hold is not Hold.FREE else 2,
                 unique=True))}
    holder: str | None = None
    if hold is Hold.SELF or (hold is not Hold.PEER and data.draw(st.booleans())):
        members[node] = Member("secondary", data.draw(st.integers(0, 6)))
    if hold is Hold.SELF:
        holder = node
    elif hold is Hold.PEER:
        holder = data.draw(st.sampled_from(others))
        members[holder] = Member("primary", pair_epoch)
    while len(members) > 2:
        members.pop(next(n for n in members if n not in (node, holder)))
    rec = PairRecord(P, epoch=pair_epoch, holder=holder, holder_epoch=pair_epoch,
                     members=members, terminated=hold is Hold.TERMINATED)
    leases = {n: v for n, v in zip("abc", lease_of, strict=True) if v is not None}
    w = WitnessLogic(L, boot, DurableState(1, {P: rec}))
    w.leases.update(leases)
    _check_transition(w, rec, op, node, epoch, peer, now, leases, boot)


@settings(max_examples=800, deadline=None)
@given(rec=pair_records(), op=st.sampled_from(list(Op)), node=any_names, epoch=any_epochs,
       peer=st.one_of(st.none(), any_names), now=any_now,
       leases=st.dictionaries(names, st.sampled_from([0.5, 1.0, 2.0, 4.0])),
       boot=st.sampled_from([0.0, 1.0]))
def test_state_event_product_malformed(rec: PairRecord, op: Op, node: Any, epoch: Any, peer: Any,
                                       now: Any, leases: dict[str, float], boot: float) -> None:
    """Any input: a decision, or the module's own WitnessError, nothing else."""
    w = WitnessLogic(L, boot, DurableState(1, {P: rec}))
    w.leases.update(leases)
    _check_transition(w, rec, op, node, epoch, peer, now, leases, boot)


# -- protocol ----------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4),
    max_leaves=12)
request_like = st.fixed_dictionaries(
    {}, optional={"op": st.sampled_from(["suspend", "release", "failover", "reach", "terminate",
                                         "heartbeat", "nope"]) | json_values,
                  "req": st.integers(-1, 2**64) | json_values, "pair": json_values | st.just(P),
                  "epoch": st.integers(-1, 2**64) | json_values, "peer": json_values})


@settings(max_examples=800, deadline=None)
@given(body=st.one_of(json_values, request_like))
def test_protocol_parsers_raise_only_protocol_error(body: Any) -> None:
    for parse in (parse_request, parse_reply):
        try:
            parse(body)
        except ProtocolError:
            pass


def test_protocol_round_trip() -> None:
    wr = WireRequest("failover", 7, P, 3, "core-a")
    assert parse_request(json.loads(json.dumps(wr.body()))) == wr
    rp = WireReply(7, True, FAILED_OVER, 4, "detail", "core-b", True, None, None)
    assert parse_reply(json.loads(json.dumps(rp.body()))) == rp
    with pytest.raises(ProtocolError):
        parse_request({"op": "suspend", "req": 1})  # no epoch
    with pytest.raises(ProtocolError):
        parse_request({"op": "reach", "req": 1})  # no peer
    assert replace(wr, peer=None).body() == {"op": "failover", "req": 7, "pair": P, "epoch": 3}
