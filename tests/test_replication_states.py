"""The Core's replication state machine: the table, and a pair of Cores with a Witness.

Hypothesis drives two Cores (their :mod:`core.replication` states), the real
Witness logic (:mod:`witness.logic`) and a virtual clock through random
sequences of link cuts, Witness reachability changes, heartbeats, suspend,
resume, failover, demotion and crashes, and checks DESIGN.md invariants 1-3
after every step: at most one Core can acknowledge Edge writes, epochs never
go back, and a resyncing replica is never promoted without force.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.replication import TABLE, Event, Refused, Rep, State, initial, step
from witness.logic import WitnessLogic

LEASE = 3.0


@given(st.sampled_from(["primary", "secondary"]), st.sampled_from(list(State)),
       st.sampled_from(list(Event)))
def test_every_pair_follows_the_table_or_is_refused(role: str, state: State, ev: Event) -> None:
    rep = Rep(role, state, 4)
    try:
        nxt, _ = step(rep, ev)
    except Refused as e:
        assert (role, state, ev) not in TABLE
        assert str(e)
        return
    assert (role, state, ev) in TABLE
    assert nxt.epoch >= rep.epoch
    # only a failover may turn a secondary into a primary, and it bumps the epoch
    if rep.role == "secondary" and nxt.role == "primary":
        assert ev is Event.FAILOVER_GRANTED and nxt.epoch == rep.epoch + 1
    # acknowledging without the peer (journaling) is entered only on a Witness-gated event
    if nxt.journals and not rep.journals:
        assert ev in (Event.SUSPEND_GRANTED, Event.FAILOVER_GRANTED, Event.RESYNC_DONE) or \
            ev is Event.PEER_DOWN
    assert nxt.accepts_edges == (nxt.role == "primary")


def test_inconsistent_replica_needs_force() -> None:
    rep = Rep("secondary", State.INCONSISTENT, 3)
    with pytest.raises(Refused, match="inconsistent"):
        step(rep, Event.FAILOVER_GRANTED)
    nxt, _ = step(rep, Event.FAILOVER_GRANTED, force=True)
    assert nxt.role == "primary" and nxt.state is State.SUSPENDED and nxt.epoch == 4


@dataclass
class Node:
    name: str
    rep: Rep
    alive: bool = True
    reach: bool = True  # can talk to the Witness
    lease_from: float = -1e9
    epochs: list[int] = field(default_factory=list)


class Pair:
    def __init__(self) -> None:
        self.now = 0.0
        self.w = WitnessLogic(LEASE, self.now)
        self.a = Node("a", initial("primary", True))
        self.b = Node("b", initial("secondary", True))
        self.link = True
        for n in (self.a, self.b):
            self.w.register(n.name, "p", n.rep.role, n.rep.epoch, self.now)
            self.hb(n)

    def other(self, n: Node) -> Node:
        return self.b if n is self.a else self.a

    def fire(self, n: Node, ev: Event, force: bool = False) -> bool:
        try:
            n.rep, _ = step(n.rep, ev, force=force)
        except Refused:
            return False
        return True

    def hb(self, n: Node) -> None:
        if n.alive and n.reach:
            self.w.heartbeat(n.name, self.now)
            n.lease_from = self.now

    def link_ok(self) -> bool:
        return self.link and self.a.alive and self.b.alive

    def sync_links(self) -> None:
        """What the links tell each Core: peer up/down, newer epochs (demotion)."""
        for n in (self.a, self.b):
            if not n.alive:
                continue
            o = self.other(n)
            if self.link_ok():
                if n.rep.role == o.rep.role == "primary" and n.rep.epoch < o.rep.epoch:
                    self.fire(n, Event.DEMOTE)
                    n.rep = Rep(n.rep.role, n.rep.state, max(n.rep.epoch, o.rep.epoch))
                up = (n.rep.role != o.rep.role and
                      (n.rep.epoch >= o.rep.epoch if n.rep.role == "primary"
                       else o.rep.epoch >= n.rep.epoch))
                self.fire(n, Event.PEER_UP if up else Event.PEER_DOWN)
            else:
                self.fire(n, Event.PEER_DOWN)

    def acking(self, n: Node) -> bool:
        """Can ``n`` acknowledge an Edge write right now?"""
        if not n.alive or n.rep.role != "primary":
            return False
        if n.rep.journals:
            return self.now < n.lease_from + LEASE  # fenced without a live lease (core/node.py)
        if n.rep.state in (State.RUNNING, State.RESYNCING):
            o = self.other(n)
            return (self.link_ok() and o.rep.role == "secondary"
                    and n.rep.epoch >= o.rep.epoch)
        return False

    def check(self) -> None:
        assert sum(self.acking(n) for n in (self.a, self.b)) <= 1, (self.a, self.b)
        for n in (self.a, self.b):
            n.epochs.append(n.rep.epoch)
            assert n.epochs == sorted(n.epochs)


ACTIONS = st.lists(st.tuples(
    st.sampled_from(["tick", "tick", "tick", "cut", "heal", "unreach", "reach", "hb", "hb",
                     "suspend", "suspend", "resume", "failover", "failover", "failover", "crash",
                     "restart", "resync_done", "wrestart"]),
    st.sampled_from(["a", "b"]), st.floats(0.1, 4.0)), max_size=60)


def test_suspended_primary_is_fenced_after_failover() -> None:
    """The split-brain path the Witness exists for: A suspended, cut off, B fails over."""
    p = Pair()
    assert p.w.request_suspend("a", "p", p.a.rep.epoch, p.now).granted
    p.fire(p.a, Event.SUSPEND_GRANTED)
    p.a.lease_from = p.now
    p.a.reach = False
    p.link = False
    p.sync_links()
    assert p.acking(p.a)
    p.now += 2 * LEASE
    d = p.w.request_failover("b", "p", p.b.rep.epoch, p.now, peer="a")
    assert d.granted and d.epoch == 2
    p.fire(p.b, Event.FAILOVER_GRANTED)
    p.b.lease_from = p.now
    assert p.acking(p.b) and not p.acking(p.a)  # A's lease ran out before B was granted
    p.check()


@given(ACTIONS)
@settings(max_examples=1500, deadline=None)
def test_never_two_acknowledging_cores(actions: list[tuple[str, str, float]]) -> None:
    p = Pair()
    for act, who, dt in actions:
        n = p.a if who == "a" else p.b
        if act == "tick":
            p.now += dt
        elif act == "cut":
            p.link = False
        elif act == "heal":
            p.link = True
        elif act == "unreach":
            n.reach = False
        elif act == "reach":
            n.reach = True
        elif act == "hb":
            p.hb(n)
        elif act == "suspend" and n.alive and n.reach and n.rep.role == "primary":
            d = p.w.request_suspend(n.name, "p", n.rep.epoch, p.now)
            if d.granted:
                n.lease_from = p.now
                p.fire(n, Event.SUSPEND_GRANTED)
            elif d.epoch > n.rep.epoch:
                p.fire(n, Event.DEMOTE)
                n.rep = Rep(n.rep.role, n.rep.state, d.epoch)
        elif act == "resume" and n.alive and p.link_ok():
            p.fire(n, Event.RESUME)
        elif act == "resync_done" and n.alive and n.rep.state is State.RESYNCING:
            p.fire(n, Event.RESYNC_DONE)
            if n.reach:
                p.w.release_suspend(n.name, "p", p.now)
        elif act == "failover" and n.alive and n.reach and n.rep.role == "secondary" \
                and not p.link_ok():
            d = p.w.request_failover(n.name, "p", n.rep.epoch, p.now, peer=p.other(n).name)
            if d.granted and p.fire(n, Event.FAILOVER_GRANTED):
                n.rep = Rep(n.rep.role, n.rep.state, max(n.rep.epoch, d.epoch))
                n.lease_from = p.now
        elif act == "crash":
            n.alive = False
        elif act == "restart" and not n.alive:
            n.alive = True
            r = n.rep
            # core/node.py _restart_rep: link states start over, suspension survives
            if r.state in (State.RUNNING, State.PAUSED, State.RESYNCING) and r.role == "primary":
                n.rep = Rep(r.role, State.SUSPENDED if r.state is State.RESYNCING
                            else State.PAUSED, r.epoch)
            elif r.role == "secondary" and r.state is State.REPLICA:
                n.rep = Rep(r.role, State.DISCONNECTED, r.epoch)
            n.lease_from = -1e9  # a restarted client has no answered request yet
        elif act == "wrestart":
            p.w = WitnessLogic.from_json(p.w.to_json(), LEASE, p.now)
        # a primary that hears of a newer epoch from the Witness steps down
        for m in (p.a, p.b):
            if m.alive and m.reach and m.rep.role == "primary" and p.w.epoch("p") > m.rep.epoch:
                p.fire(m, Event.DEMOTE)
                m.rep = Rep(m.rep.role, m.rep.state, p.w.epoch("p"))
        p.sync_links()
        p.check()
