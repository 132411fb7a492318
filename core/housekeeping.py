"""What a Core checks every half second (``CoreEngine.tick``): the Witness's word, alarms.

The Witness may know more than this Core: a newer epoch (another Core was
made primary: step down; or our own failover was granted and its answer
lost: take the role), or that our lease ran out while suspended (DESIGN.md
invariant 2: then nothing is acknowledged). Alarms tell a storage admin
what will not work before the day they need it: no Witness (nothing can be
suspended or failed over), a stalled Witness client, a failed Journal LUN,
a second process with this node's name.

Functions over the engine (:class:`core.engine.CoreEngine`), split out of it
by topic, which they take as :class:`HousekeepingEngine`; role and epoch
changes go through :mod:`core.peering` (demotion) and the engine's
``failover_decided`` (:mod:`core.operator`), so through the replication table.
"""

from __future__ import annotations

from typing import Any, Protocol

from core import peering
from core.ports import WitnessView
from core.replication import Role, State
from steelfusion import control
from witness.logic import Decision

WITNESS_ALARM_AFTER = 3.0  # seconds without the Witness before alarm witness_unreachable
IMPOSTOR_QUIET = 30.0  # a duplicate_node_* alarm clears this long after the last refused copy


class HousekeepingEngine(peering.PeeringEngine, Protocol):
    """What the half-second checks use of the engine, beyond what a demotion takes.

    It demotes with :func:`core.peering.demote`, hence :class:`~core.peering.PeeringEngine`.
    """

    failover_pending: bool  # a failover waits for the Witness's answer
    _failover_doubt_until: float
    _witness_lost_at: float | None

    def _progress_all(self) -> None: ...
    def failover_decided(self, d: Decision | None, force: bool) -> dict[str, Any]: ...


def tick(core: HousekeepingEngine) -> None:
    w = core.witness
    if w is not None and w.connected and w.pair_epoch > core.epoch \
            and core.role == Role.PRIMARY:
        if w.holder == core.name:
            # the newer epoch is ours (a grant whose answer we did not act on): take it
            # rather than step down from our own role (simulation seed 2019987 --full)
            core._adopt_epoch(w.pair_epoch)
            core.event("epoch_adopted", epoch=w.pair_epoch)
        else:
            peering.demote(core, w.pair_epoch, "the Witness knows a newer epoch")
    if core.journal is not None and any(p.gate or p.jpending for p in core.pipes.values()):
        core.journal.request_commit()
    if core.rep.state is State.SUSPENDED:
        if w is not None and not w.lease_valid():
            core.raise_alarm("witness_lease", "suspended without a live Witness lease: "
                             "Edge writes are not acknowledged until the Witness answers")
        else:
            core.clear_alarm("witness_lease")
        core._progress_all()
    else:
        core.clear_alarm("witness_lease")  # it concerns a suspension only (stayed for good)
    if core.journal is not None and core.journal.failed is not None:
        f = core.journal.failed
        core.raise_alarm(getattr(f, "alarm", "journal_offline"), str(f))
    _failover_grant(core, w)
    if w is not None and getattr(w, "alive", True) is False:
        # the client's reconnect loop stopped moving (issue 9): say so, loudly
        core.raise_alarm("witness_client_stalled", "the Witness client has made no "
                         f"progress (last error: {getattr(w, 'last_error', None)}); "
                         "suspend and failover cannot be approved")
    elif w is not None:
        core.clear_alarm("witness_client_stalled")
    watch_witness(core, w)
    now = core.mono()
    for node, seen in list(core._impostors.items()):
        if now - seen > IMPOSTOR_QUIET:
            del core._impostors[node]
            core.clear_alarm(f"duplicate_node_{node}")


def _failover_grant(core: HousekeepingEngine, w: WitnessView | None) -> None:
    """A secondary's failover request: granted after all, or nothing came of it."""
    if w is not None and core.role == Role.SECONDARY and w.connected \
            and w.pair_epoch > core.epoch and w.holder == core.name:
        # The Witness says we are primary at a newer epoch: our failover was granted but
        # its answer lost. Adopt it, or both Cores end up secondary (found by the
        # simulation, seed 1407 --full).
        core.event("failover_grant_learned", epoch=w.pair_epoch)
        try:
            core.failover_decided(Decision(True, "failed-over", w.pair_epoch, core.name), False)
        except control.ControlError as e:
            core.raise_alarm("failover_grant_unusable", f"the Witness made this Core primary "
                             f"at epoch {w.pair_epoch} but it cannot take the role: {e}")
    elif core.failover_pending and core._failover_doubt_until \
            and core.mono() > core._failover_doubt_until:
        core.failover_pending = False  # no grant came to light: take links again
        core._failover_doubt_until = 0.0


def watch_witness(core: HousekeepingEngine, w: WitnessView | None) -> None:
    """Alarm while the Witness is out of reach (issue 13: it was only seen on suspend).

    Without a Witness nothing can be suspended or failed over, so a storage admin
    must hear of it before the day they need it, not from a refused command.
    """
    if w is None:
        return
    if w.connected:
        core._witness_lost_at = None
        core.clear_alarm("witness_unreachable")
        core.clear_alarm("duplicate_node")
        return
    now = core.mono()
    if core._witness_lost_at is None:
        core._witness_lost_at = now
    ref = getattr(w, "last_refusal", None)
    if ref is not None and ref.code == "duplicate-node":
        core.raise_alarm("duplicate_node", f"the Witness refused this Core: {ref.reason}")
    if now - core._witness_lost_at >= WITNESS_ALARM_AFTER:
        addr = getattr(w, "addr", None)
        where = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "its address"
        why = (f"refused: {ref.code}: {ref.reason}" if ref is not None
               else getattr(w, "last_error", None) or "no connection")
        core.raise_alarm("witness_unreachable",
                         f"cannot reach the Witness at {where} for "
                         f"{now - core._witness_lost_at:.0f} s ({why}); suspend and failover "
                         "cannot be approved until it is back")
