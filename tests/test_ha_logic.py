"""Core HA decisions (core/ha.py), in memory: who leads, when to take over and hand back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from core.ha import Action, HaState, Mode, PartnerView


def view(mode: Mode = Mode.ACTIVE, *, hosting: bool = False, storage_ok: bool = True,
         name: str = "y") -> PartnerView:
    return PartnerView(name, mode, hosting, storage_ok, "primary", "dc-a", "follower")


def state(leader: bool = True, now: float = 0.0) -> HaState:
    return HaState("x", "y", leader=leader, grace=1.0, start_wait=10.0, now=now)


def test_a_starting_core_serves_its_luns_once_the_partner_answers_without_them() -> None:
    s = state()
    assert s.decide(0.5) == []
    s.heartbeat(view(Mode.STARTING), 0.6)
    assert s.decide(0.7) == [Action.START_OWN] and s.mode is Mode.ACTIVE


def test_a_starting_core_whose_partner_serves_its_luns_stands_by() -> None:
    s = state()
    s.heartbeat(view(hosting=True), 0.1)
    assert s.decide(0.2) == [] and s.mode is Mode.STANDBY
    assert s.acting_leader() == "y"  # a standby Core is never the leader


def test_no_partner_at_start_serves_after_start_wait() -> None:
    s = state()
    assert s.decide(9.9) == []
    assert s.decide(10.0) == [Action.START_OWN]


def started(leader: bool = True) -> HaState:
    s = state(leader)
    s.heartbeat(view(), 0.0)
    assert s.decide(0.0) == [Action.START_OWN]
    return s


def test_the_leader_takes_over_after_grace_the_follower_after_twice_grace() -> None:
    lead, follow = started(True), started(False)
    for s in (lead, follow):
        s.partner_lost(5.0)
    assert lead.decide(5.9) == [] and lead.decide(6.0) == [Action.TAKEOVER]
    assert lead.hosting and lead.takeovers == 1
    assert follow.decide(6.5) == [] and follow.decide(7.0) == [Action.TAKEOVER]
    assert lead.decide(9.0) == []  # once


def test_a_partner_that_cannot_reach_its_storage_is_taken_over() -> None:
    s = started()
    s.heartbeat(view(storage_ok=False), 1.0)
    assert s.decide(1.5) == []
    s.heartbeat(view(storage_ok=False), 2.0)
    assert s.decide(2.0) == [Action.TAKEOVER]


def test_no_takeover_while_our_own_storage_is_down() -> None:
    s = started()
    s.storage_ok = False
    s.partner_lost(1.0)
    assert s.decide(10.0) == []
    s.storage_ok = True
    assert s.decide(10.1) == [Action.TAKEOVER]


def test_the_luns_go_back_when_the_partner_stands_by_healthy_for_settle() -> None:
    s = started()
    s.partner_lost(1.0)
    assert s.decide(2.0) == [Action.TAKEOVER]
    s.heartbeat(view(Mode.STANDBY, storage_ok=False), 3.0)  # back, but its array is not
    assert s.decide(10.0) == []
    s.heartbeat(view(Mode.STANDBY), 11.0)
    s.heartbeat(view(Mode.STANDBY), 13.9)
    assert s.decide(13.9) == []
    s.heartbeat(view(Mode.STANDBY), 14.0)
    assert s.decide(14.0) == [Action.HANDBACK] and not s.hosting and s.handbacks == 1


def test_fenced_stands_by_once_and_only_a_handback_or_the_operator_brings_it_back() -> None:
    s = started(leader=True)
    assert s.fenced("preempted") == [Action.STANDBY] and s.fenced("again") == []
    assert s.acting_leader() == "y"
    s.partner_lost(1.0)
    assert s.decide(100.0) == []  # a standby Core never takes over by itself
    s.heartbeat(view(hosting=True), 100.5)  # sent just before the partner let them go
    assert s.handed_back() == [Action.START_OWN] and s.mode is Mode.ACTIVE
    assert s.decide(100.6) == []  # that stale heartbeat does not send it back to standby
    s.fenced("again")
    assert s.forced_takeover() == [Action.START_OWN, Action.TAKEOVER]


def test_leader_is_the_configured_leader_while_it_is_up_else_the_follower() -> None:
    f = started(leader=False)
    assert f.acting_leader() == "y"
    f.partner_lost(1.0)
    assert f.acting_leader() == "x"
    f.heartbeat(view(Mode.STANDBY), 2.0)
    assert f.acting_leader() == "x"  # the leader is back but stands by
    f.heartbeat(view(Mode.ACTIVE), 3.0)
    assert f.acting_leader() == "y"


def test_a_heartbeat_from_another_core_or_malformed_is_refused() -> None:
    s = state()
    with pytest.raises(ValueError, match="partner is 'y'"):
        s.heartbeat(view(name="z"), 0.0)
    with pytest.raises(ValueError, match="malformed"):
        PartnerView.of({"name": "y", "mode": "dancing"})
    good = {"name": "y", "mode": "active", "hosting": False, "storage_ok": True,
            "role": "primary", "ha": "follower"}
    assert PartnerView.of(good).mode is Mode.ACTIVE


def test_pairing_refuses_a_peer_with_other_ha_settings() -> None:
    """Seed: "If the primary Core is set up for HA, the secondary Core must be configured
    for HA too"; X pairs with X' (leader with leader), Y with Y'."""
    from core.admission import peer_refusal
    from core.replication import Rep, Role, State
    from steelfusion.wire import Hello

    rep = Rep(Role.SECONDARY, State.REPLICA, 0)
    for mine, theirs in (("none", "leader"), ("leader", "follower"), ("follower", "none")):
        h = Hello("x", "primary", "replication", 0, {}, {"ha": theirs, "pair": "p"})
        r = peer_refusal(h, "x2", rep, failover_pending=False, ha=mine, pair="p")
        assert r is not None and r.code == "ha-mismatch" and f"ha={theirs}" in r.reason
    h = Hello("x", "primary", "replication", 0, {}, {"ha": "leader", "pair": "p"})
    assert peer_refusal(h, "x2", rep, failover_pending=False, ha="leader", pair="p") is None


def test_ha_cannot_be_set_after_pairing_or_cleared_after(tmp_path: Path) -> None:
    from core.lunstore import LunError
    from core.node import _check_ha_change
    from steelfusion.config import CoreConfig

    cfg = CoreConfig(name="x", role="primary", listen=("127.0.0.1", 1),
                     control=("127.0.0.1", 2), state_dir=str(tmp_path), luns=())
    with pytest.raises(LunError, match="cannot be cleared once replication is configured"):
        _check_ha_change(cfg, {"ha": "leader", "state": "running"})
    ha = dataclasses.replace(cfg, ha="leader")
    with pytest.raises(LunError, match="must be set up before replication is configured"):
        _check_ha_change(ha, {"ha": "none", "state": "running"})
    _check_ha_change(ha, {"ha": "none", "state": "terminated"})  # a new pairing may
    _check_ha_change(ha, {"ha": "follower", "state": "running"})
    _check_ha_change(cfg, {"state": "running"})  # a state file from before the key


def test_an_active_core_whose_partner_serves_its_luns_stands_by() -> None:
    s = started()
    s.heartbeat(view(hosting=True), 1.0)
    assert s.decide(1.0) == [Action.STANDBY] and s.mode is Mode.STANDBY and not s.hosting
