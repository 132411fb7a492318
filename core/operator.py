"""The operator's commands on a Core (``coredr suspend | resume | failover | terminate``).

Each command is checked first (a refusal carries a code from
:data:`steelfusion.control.CODES` that scripts test and README lists, and a
text saying what to do), then, where it needs one, the Witness is asked by
the adapter (:mod:`core.node`; the simulation asks its own), and the answer
is applied through the replication table (:func:`core.replication.step`,
:func:`core.replication.adopt_epoch`). A command whose end state already
holds answers ``{"state": ..., "already": True}``.

Seed 002: suspension and failover need the Witness's approval, so that the
two Cores never run alone at once; failover is allowed only when neither the
secondary nor the Witness reaches the primary.

Functions over the engine (:class:`core.engine.CoreEngine`), split out of it
by topic, which they take as :class:`OperatorEngine`.
"""

from __future__ import annotations

from typing import Any, Protocol

from core import peering
from core.replication import Event, Refused, Rep, Role, State, step
from core.resync import Progress
from steelfusion import control
from steelfusion.wire import Control
from witness.logic import Decision

# the Witness client's reasons when no answer came (witness.client): nothing was decided
WITNESS_UNANSWERED = frozenset({"witness-unreachable", "witness-timeout", "witness-disconnected"})


class OperatorEngine(peering.Pairing, Protocol):
    """What the operator's commands use of the engine, beyond :class:`core.peering.Pairing`."""

    failover_pending: bool  # a failover waits for the Witness's answer
    _failover_doubt_until: float

    @property
    def peer_info(self) -> dict[str, Any]: ...
    @property
    def resync(self) -> Progress: ...


def refuse_on_role_or_end(rep: Rep, cmd: str, want: Role) -> None:
    """Refusals every operator command shares: wrong role, terminated, no peer."""
    if rep.role != want:
        raise control.ControlError(
            f"this Core is already primary (epoch {rep.epoch}): {cmd} runs on the "
            "secondary Core" if want == Role.SECONDARY else
            f"{cmd} runs on the {want} Core; this Core is {rep.role}", "wrong-role")
    if rep.state is State.TERMINATED:
        raise control.ControlError(f"replication was terminated on this Core: {cmd} has no "
                                   "pairing to act on (the pair must be set up again)",
                                   "terminated")
    if rep.state is State.STANDALONE:
        raise control.ControlError(f"this Core has no peer ([replication] peer in its "
                                   f"config): there is no replication to {cmd}", "no-peer")


# -- suspend ------------------------------------------------------------------------------
def suspend_check(core: OperatorEngine) -> dict[str, Any] | None:
    """May this Core ask the Witness to suspend? A dict if there is nothing to do."""
    if core.role == Role.PRIMARY and core.rep.state is State.SUSPENDED:
        return {"state": core.rep.state.value, "already": True}
    refuse_on_role_or_end(core.rep, "suspend", Role.PRIMARY)
    if core.journal is None:
        raise control.ControlError(
            ("no usable Journal LUN (see `coredr alarms`)" if core.cfg.journal_path else
             "no Journal LUN configured ([journal] path in this Core's config)")
            + ": suspension needs one to log the changed regions", "no-journal")
    if core.witness is None:
        raise control.ControlError("no Witness configured ([replication] witness in this "
                                   "Core's config): suspension needs the Witness's approval, "
                                   "so that both Cores never run alone", "no-witness")
    return None


def suspend_decided(core: OperatorEngine, d: Decision) -> dict[str, Any]:
    """The Witness answered a suspension request."""
    if not d.granted:
        core.event("suspend_refused", reason=d.reason, detail=d.detail)
        if d.reason in WITNESS_UNANSWERED:
            raise control.ControlError(
                f"the Witness did not answer ({d.reason}): suspension needs its approval; "
                "check that it runs and that this Core reaches it (`coredr status`)",
                "witness-unreachable")
        raise control.ControlError(f"the Witness refused suspension ({d.reason})"
                                   + (f": {d.detail}" if d.detail else ""), "witness-refused")
    core._fire(Event.SUSPEND_GRANTED)
    return {"state": core.rep.state.value}


# -- resume -------------------------------------------------------------------------------
def resume_check(core: OperatorEngine) -> None:
    refuse_on_role_or_end(core.rep, "resume", Role.PRIMARY)
    if core.rep.state is State.PAUSED:
        raise control.ControlError("replication is paused (the secondary is unreachable), "
                                   "not suspended: it resumes by itself when the link returns",
                                   "paused")


def resume_apply(core: OperatorEngine) -> dict[str, Any]:
    if core.rep.state in (State.RUNNING, State.RESYNCING):
        return {"state": core.rep.state.value, "already": True}
    if core.rep.state is State.SUSPENDED and not core.mirror_links:
        raise control.ControlError("the secondary is not reachable: resume when it is back "
                                   "(`coredr status` shows the replication connections)",
                                   "peer-unreachable")
    try:
        nxt, _ = step(core.rep, Event.RESUME)
    except Refused as e:
        raise control.ControlError(str(e), "bad-state") from None
    if nxt != core.rep:
        core._fire(Event.RESUME)
    out: dict[str, Any] = {"state": core.rep.state.value}
    if core.rep.state is State.RESYNCING:  # the totals, should it end before a status poll
        out["resync"] = core.resync.view(core.mono())
    return out


# -- failover -----------------------------------------------------------------------------
def peer_name(core: OperatorEngine) -> str:
    return str(core.peer_info.get("name") or "(the peer)")


def failover_check(core: OperatorEngine, force: bool) -> None:
    """May this secondary ask the Witness to become primary?"""
    refuse_on_role_or_end(core.rep, "failover", Role.SECONDARY)
    if peering.reachable(core):
        raise control.ControlError(
            f"the primary Core {peer_name(core)} is still reachable from this Core: failover "
            "is allowed only when neither this Core nor the Witness reach it; stop the "
            "primary first (`coredr failover --wait` waits until then)", "peer-reachable")
    if core.rep.state is State.INCONSISTENT and not force:
        # the table's own refusal (core/replication.py), asked, not copied
        try:
            step(core.rep, Event.FAILOVER_GRANTED)
        except Refused as e:
            raise control.ControlError(str(e), "inconsistent") from None


def failover_begin(core: OperatorEngine, force: bool) -> None:
    """Check, then hold off the primary's links until :func:`failover_decided`."""
    if core.failover_pending:
        # a second request would be granted a second epoch this Core never takes
        raise control.ControlError("a failover request is already waiting for the "
                                   "Witness's answer", "busy")
    failover_check(core, force)
    core.failover_pending = True


def failover_decided(core: OperatorEngine, d: Decision | None, force: bool) -> dict[str, Any]:
    """The Witness's answer (None: no Witness configured): become primary, or refuse."""
    core.failover_pending = False
    new_epoch = core.epoch + 1
    if d is not None:
        unanswered = d.reason in WITNESS_UNANSWERED
        if d.granted:
            new_epoch = max(new_epoch, d.epoch)
        elif not (force and unanswered):
            if unanswered:
                # The Witness may have granted it and the answer been lost: take no
                # replication stream until it tells us (tick adopts a grant it reports).
                w = core.witness
                core.failover_pending = True
                core._failover_doubt_until = core.mono() + 3 * (
                    (w.lease_seconds if w is not None else None) or 3.0)
            core.event("failover_refused", reason=d.reason, detail=d.detail)
            raise failover_refusal(d, peer_name(core))
    elif not force:
        raise control.ControlError("no Witness configured: nothing can confirm the primary "
                                   "is down; use --force if you are sure it is down for good",
                                   "no-witness")
    if not core._fire(Event.FAILOVER_GRANTED, force=force):
        raise control.ControlError(f"failover is not allowed while this Core is "
                                   f"{core.rep.state.value}", "bad-state")
    core._adopt_epoch(new_epoch)
    core._peer_up = False
    for p in core.pipes.values():
        p.upstream = None
        p.waiting.clear()
        p.jlimit = p.durable_seq
    if core.witness is not None:
        core.witness.role = core.role
    core.event("failed_over", epoch=new_epoch, forced=force)
    peering.drop_links(core)
    return {"role": core.role, "state": core.rep.state.value, "epoch": core.epoch}


def failover_refusal(d: Decision, peer: str) -> control.ControlError:
    """Why the Witness said no, and when asking again may work (``retry_in``)."""
    if d.reason in WITNESS_UNANSWERED:
        return control.ControlError(
            f"the Witness did not answer ({d.reason}): nothing confirms {peer} is down; "
            f"check the Witness, or use --force if you are sure {peer} is down for good",
            "witness-unreachable")
    if d.reason in ("peer-reachable", "peer-unknown"):
        return control.ControlError(
            f"{d.detail or 'the Witness still reaches ' + peer}: {peer} may still be alive; "
            "failover becomes possible when that lease ends (`coredr failover --wait` "
            "retries until then)", "witness-lease-live", retry_in=d.retry_in)
    return control.ControlError(f"the Witness refused failover ({d.reason})"
                                + (f": {d.detail}" if d.detail else ""), "witness-refused")


# -- terminate ----------------------------------------------------------------------------
def terminate_apply(core: OperatorEngine) -> dict[str, Any]:
    if core.rep.state is State.TERMINATED:
        return {"state": core.rep.state.value, "already": True}
    if core.rep.state is State.STANDALONE:
        raise control.ControlError("this Core has no peer ([replication] peer in its config): "
                                   "there is no pairing to terminate", "no-peer")
    if not core._fire(Event.TERMINATE):
        raise control.ControlError(f"cannot terminate while {core.rep.state.value}",
                                   "bad-state")
    for lk in [*core.peer_out.values(), *core.peer_in, *core.mirror_in]:
        # the peer ends the pairing too (seed: terminating on an HA primary ends FusionSync
        # on all four nodes; a pairing is never half over)
        lk.send(Control({"op": "terminate", "by": core.name}))
        lk.refuse("terminated", f"replication terminated on {core.name}")
    return {"state": core.rep.state.value}



def terminated_by_peer(core: OperatorEngine, by: str) -> None:
    """The peer Core terminated the pairing: end it here too."""
    if core.rep.state in (State.TERMINATED, State.STANDALONE):
        return
    if core._fire(Event.TERMINATE):
        core.event("terminated_by_peer", peer=by)
