"""The Core's replication state machine: the table, and the fencing drill on real engines.

Every (role, state, event) either follows :data:`core.replication.TABLE` or is
refused with a reason; the split-brain drill runs two real
:class:`core.engine.CoreEngine` instances and the real Witness logic in the
seeded simulation (:mod:`steelfusion.sim`).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.replication import TABLE, Event, Refused, Rep, State, step
from steelfusion.sim import LEASE, Sim, SimFailure


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


def _suspend_isolate_failover(plant: str | None = None) -> Sim:
    """The split-brain path the Witness exists for, on the real engines (steelfusion.sim):
    A is primary and suspended, then cut off from B and the Witness; B fails over."""
    s = Sim(1, full=True, plant=plant)
    s.clock.at(0.01, s.edge.dial)
    for i in range(20):
        s.clock.at(0.02 + i * 0.01, s.edge.host_write)
    s.clock.run_until(0.5)
    a = s.cores[0]
    s.drill_suspend()
    s.clock.run_until(0.8)
    assert a.rep.state is State.SUSPENDED and not a.fenced()
    s.isolate(a, 10.0)
    s.clock.run_until(0.8 + LEASE + 0.3)
    assert a.fenced()  # its lease ran out before the Witness could grant B anything
    s.drill_failover()
    s.clock.run_until(4.0)
    return s


def test_suspended_primary_is_fenced_after_failover() -> None:
    s = _suspend_isolate_failover()
    a, b = s.cores
    assert b.role == "primary" and b.epoch == 2 and b.rep.state is State.SUSPENDED
    assert a.can_ack() is False and b.can_ack() is True
    s.clock.run_until(60.0)  # the isolation heals (after 40 s): A learns epoch 2, steps down
    assert a.role == "secondary" and a.epoch == 2


def test_unfenced_primary_is_caught_as_split_brain() -> None:
    """The same drill with the lease check planted away: the checker must object."""
    with pytest.raises(SimFailure, match="split brain"):
        _suspend_isolate_failover("no-fence")


# Random sequences of cuts, Witness loss, suspend, resume, failover and crashes over the
# real engines and Witness logic are the simulation's ``--full`` seeds (tests/test_sim.py),
# which check "never two acknowledging Cores" after every event; the hand-written model of
# the Core that used to stand here is gone.


def test_epochs_are_adopted_forward_only() -> None:
    """Every epoch change goes through the table module; an older epoch is refused."""
    from core.replication import Refused, Rep, State, adopt_epoch

    rep = Rep("secondary", State.REPLICA, 3)
    assert adopt_epoch(rep, 5) == Rep("secondary", State.REPLICA, 5)
    assert adopt_epoch(rep, 3) == rep
    with pytest.raises(Refused, match="never go backwards"):
        adopt_epoch(rep, 2)
