"""The peer Core: pairing, the replication links' coming and going, demotion, diverged regions.

A primary dials its peer and mirrors to the links on which the peer
welcomed it as secondary; a secondary takes the primary's mirror stream on
the links the primary dialled (seed 002: two TCP connections per
interface). A primary that learns a newer epoch from its peer (or the
Witness) steps down: its role changes only through the replication table
(:func:`core.replication.step` with ``DEMOTE``, then
:func:`core.replication.adopt_epoch`), and the regions it may hold that the
new primary lacks are handed over to be resynced (DESIGN.md invariant 5).

Functions over the engine (:class:`core.engine.CoreEngine`), split out of it
by topic, which they take as :class:`PeeringEngine`; the refusal rules
themselves are :mod:`core.admission`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any, Protocol

from core.admission import PAIRING_CODES, Refusal, impostor_holder, mirror_refusal, peer_refusal
from core.pipeline import LunPipe
from core.ports import Engine, LinkKind, Port, WitnessView
from core.replication import Event, Rep, Role, State
from steelfusion import log
from steelfusion.config import CoreConfig
from steelfusion.wire import Control, Hello, Refuse, Welcome

_log = log.get("core")


class PeerLinks(Protocol):
    """The engine's links to the peer, whichever way they were dialled."""

    @property
    def peer_out(self) -> dict[int, Port]: ...  # dialler index -> our link to the peer
    @property
    def peer_in(self) -> set[Port]: ...  # the peer dialled us, and is not our primary
    @property
    def mirror_in(self) -> set[Port]: ...  # our primary's mirror streams


class Pairing(Engine, PeerLinks, Protocol):
    """What pairing and the operator's commands (:mod:`core.operator`) both use of the engine.

    Who this Core is, its Witness and its links to the peer, and the
    replication table's two ways in: ``_fire`` (state) and ``_adopt_epoch``.
    """

    _peer_up: bool  # a usable link to the peer (PEER_UP fired)

    @property
    def cfg(self) -> CoreConfig: ...
    @property
    def name(self) -> str: ...
    @property
    def rep(self) -> Rep: ...
    @property
    def witness(self) -> WitnessView | None: ...
    @property
    def mirror_links(self) -> list[Port]: ...
    def _fire(self, ev: Event, *, force: bool = False, **kv: Any) -> bool: ...
    def _adopt_epoch(self, epoch: int) -> None: ...


class PeeringEngine(Pairing, Protocol):
    """What pairing, demotion and diverged regions use of the engine, beyond :class:`Pairing`."""

    peer_info: dict[str, Any]  # the peer's name, role and epoch, as it last told us
    peer_synced: bool
    diverged: dict[int, list[int]]

    @property
    def failover_pending(self) -> bool: ...
    @property
    def _impostors(self) -> dict[str, float]: ...
    def raise_alarm(self, key: str, message: str) -> None: ...
    def clear_alarm(self, key: str) -> None: ...
    def _save_state(self) -> None: ...
    def _welcome(self, link: Port, **info: Any) -> None: ...
    def _mirror_acked_to(self, lun: int, p: LunPipe, seq: int) -> None: ...
    def _resend_mirror(self, lun: int, p: LunPipe) -> None: ...
    def _check_paused(self) -> None: ...


def impostor(core: PeeringEngine, link: Port, h: Hello, links: Iterable[Port]) -> bool:
    """A live link from another process already holds ``h.node``: alarm, and refuse ``h``."""
    lk = impostor_holder(link, h, links)
    if lk is None:
        return False
    core.raise_alarm(f"duplicate_node_{h.node}",
                     f"a second process calls itself {h.node} (from {link.peer}) while "
                     f"{h.node} is connected from {lk.peer}: refused; stop the copy")
    core._impostors[h.node] = core.mono()
    core.event("duplicate_node_refused", peer_node=h.node, peer=link.peer, holder=lk.peer)
    return True


def accept_peer(core: PeeringEngine, link: Port, h: Hello) -> None:
    """A HELLO for replication: our primary's mirror stream, or the peer dialling us."""
    def refuse(r: Refusal) -> None:
        _log.error("peer_refused", peer_node=h.node, peer=link.peer, code=r.code,
                   reason=r.reason)
        if r.code in PAIRING_CODES:
            core.raise_alarm("pairing_refused", f"refused replication from {h.node}: "
                             f"{r.code}: {r.reason}")
        link.send(Refuse(r.code, r.reason, {"node": core.name, "epoch": core.epoch, **r.info}))
        link.close(r.reason)

    if impostor(core, link, h, [*core.mirror_in, *core.peer_in]):
        return refuse(Refusal("duplicate-node", f"{h.node} is already connected to "
                              f"{core.name} from another process; stop the copy (two nodes "
                              "started with one config?)"))
    r = peer_refusal(h, core.name, core.rep, failover_pending=core.failover_pending,
                     ha=core.cfg.ha, pair=core.cfg.pair)
    if r is not None:
        if r.step_down_to is not None:
            demote(core, r.step_down_to, f"peer {h.node} is primary at epoch {h.epoch}")
        return refuse(r)
    core.peer_info = {"name": h.node, "role": h.role, "epoch": h.epoch}
    if h.role != Role.PRIMARY:
        link.ctx = LinkKind.PEER_IN
        core.peer_in.add(link)
        core._welcome(link)
        return
    # we are the secondary: this is a mirror stream
    r = mirror_refusal(h, core.name, core.epoch, core.pipes)
    if r is not None:
        return refuse(r)
    if h.epoch > core.epoch:
        core._adopt_epoch(h.epoch)
    link.ctx = LinkKind.MIRROR_IN
    core.mirror_in.add(link)
    core.clear_alarm("pairing_refused")
    core._welcome(link)
    _log.info("replication_link_up", direction="in", peer_node=h.node, peer=link.peer)
    update_peer(core)
    send_diverged(core, link)


def on_welcome(core: PeeringEngine, link: Port, w: Welcome) -> None:
    """The peer accepted a link we dialled: mirror to it (primary), or hand it our regions."""
    if link.ctx != LinkKind.PEER_OUT:
        return
    if core.witness is None or core.witness.connected:
        core.clear_alarm("duplicate_node")
    core.clear_alarm("pairing_refused")
    core.peer_info = {"name": w.node, "role": w.role, "epoch": w.epoch}
    _log.info("replication_link_up", direction="out", peer_node=w.node, peer=link.peer,
              link=link.name)
    if core.role == Role.PRIMARY and w.role == Role.SECONDARY:
        _welcomed_by_secondary(core, link, w)
    elif core.role == Role.SECONDARY and w.role == Role.PRIMARY:
        send_diverged(core, link)


def _welcomed_by_secondary(core: PeeringEngine, link: Port, w: Welcome) -> None:
    if w.info.get("synced") is True and not core.peer_synced:
        core.peer_synced = True
        core._save_state()
    for lun, p in core.pipes.items():
        if not core.peer_synced:
            p.mark_hole()  # the initial sync brings what came before
        stream, seq = w.applied.get(lun, (0, 0))
        # Never take the peer's word beyond what we have: writes we lost in a crash come
        # again from the Edge and must be copied again (see resync-rewind).
        seq = min(seq, p.received_seq)
        if stream == p.stream and seq > p.mirror_acked:
            core._mirror_acked_to(lun, p, seq)
        if core.rep.mirrors and (p.mirror_link is None or not p.mirror_link.established):
            p.mirror_link = None
            core._resend_mirror(lun, p)
    update_peer(core)
    core._check_paused()
    j = core.journal
    if w.info.get("state") == State.INCONSISTENT.value and core.rep.state is State.RUNNING \
            and j is not None and not any(j.dirty_count(lun) for lun in core.pipes):
        # The secondary missed "resync-done" (it restarted just before it came): every
        # region was copied and acknowledged durable, so tell it again. Found by the
        # simulation (seed 19 --full): it stayed inconsistent for good.
        link.send(Control({"op": "resync-done", "epoch": core.epoch}))
        core.event("resync_done_resent", peer_node=w.node)


def on_refuse(core: PeeringEngine, link: Port, msg: Refuse) -> None:
    """The other end refused us: alarm what an operator must fix, step down if outdated."""
    _log.error("refused_by_peer", peer=link.peer, link=link.name,
               code=msg.code, reason=msg.reason)
    if msg.code == "duplicate-node":
        core.raise_alarm("duplicate_node", f"the peer Core refused this Core: {msg.reason}")
    elif msg.code in PAIRING_CODES and link.ctx == LinkKind.PEER_OUT:
        core.raise_alarm("pairing_refused", f"peer Core {msg.info.get('node', link.peer)} "
                         f"refused replication: {msg.code}: {msg.reason}")
    outbound_primary = link.ctx == LinkKind.PEER_OUT and core.role == Role.PRIMARY
    if msg.code == "sequence-gap" and outbound_primary:
        lun, have = msg.info.get("lun"), msg.info.get("have")
        if isinstance(lun, int) and isinstance(have, int) and msg.info.get("source") == "mirror":
            peer_gap(core, lun, have)
    if msg.code == "stale-primary" and outbound_primary:
        newer = msg.info.get("epoch")
        if isinstance(newer, int) and newer > core.epoch:
            demote(core, newer, f"peer {msg.info.get('node', '?')} is primary at epoch {newer}")
    link.close(f"refused: {msg.reason}")


def peer_gap(core: PeeringEngine, lun: int, have: int) -> None:
    """The secondary refused a copy: it lacks writes before it (it has up to ``have``).

    A resend of the mirror queue fills the hole when the queue reaches back
    that far. When it does not (a replica that lost acknowledged writes,
    or one never synced), only a resync can: the next copy says so and
    every region is queued for resync.
    """
    p = core.pipes.get(lun)
    if p is None or not core.rep.mirrors:
        return
    if p.resend_reaches(have):
        return  # the resend on reconnection fills it
    p.mark_hole()
    core.raise_alarm(f"lun_{lun}_replica_behind",
                     f"the secondary has LUN id {lun} only up to seq {have}, older than "
                     "anything the primary can resend: the whole LUN is resynced")
    if core.journal is not None:
        core.journal.mark_all_dirty(lun)
        core.journal.request_commit()
        core._fire(Event.RESYNC_NEEDED)


def reachable(core: PeerLinks) -> bool:
    """Any established link to the peer, whichever way it was dialled."""
    return (any(lk.established for lk in core.peer_out.values())
            or any(lk.established for lk in [*core.peer_in, *core.mirror_in]))


def update_peer(core: PeeringEngine) -> None:
    """Fire PEER_UP / PEER_DOWN when the set of usable links changes."""
    up = bool(core.mirror_links) if core.role == Role.PRIMARY else any(
        lk.established for lk in core.mirror_in)
    if up == core._peer_up:
        return
    core._peer_up = up
    if not up:
        core._fire(Event.PEER_DOWN)
        return
    core._fire(Event.PEER_UP)
    j = core.journal
    if core.role == Role.PRIMARY and j is not None:
        if not core.peer_synced:
            for lun in core.pipes:
                j.mark_all_dirty(lun)
            core.event("initial_sync_needed")
        if core.rep.state is State.RUNNING and any(j.dirty_count(lun) for lun in core.pipes):
            core._fire(Event.RESYNC_NEEDED)


def drop_links(core: PeerLinks) -> None:
    """Our role changed: links set up under the old roles must not carry on.

    A link the old primary dialled to us while we were its secondary is a
    mirror stream into this, now primary, Core; one we dialled as
    secondary is no mirror link for us as primary. Closing them all makes
    both sides dial again with their new roles and epochs, so the old
    primary learns the new epoch from our HELLO and steps down. Found by
    the simulation (seed 290 --full: after a failover the new primary kept
    the links of its old role and never mirrored again).
    """
    for lk in [*core.peer_out.values(), *core.peer_in, *core.mirror_in]:
        lk.close("role changed")


# -- demotion and diverged regions ------------------------------------------------------
def demote(core: PeeringEngine, epoch: int, why: str) -> None:
    """A newer epoch exists elsewhere: become a secondary to be resynced (effect DEMOTE)."""
    if core.role != Role.PRIMARY:
        return
    j = core.journal
    if j is not None:
        with contextlib.suppress(Exception):
            j.peer_lost()
        core.diverged = {lun: [int(r) for r in j.dirty(lun)] for lun in core.pipes}
    for p in core.pipes.values():
        p.mirror_q.clear()
        p.mirror_bytes = 0
        p.gate.clear()
        p.waiting.clear()
    if core._fire(Event.DEMOTE, why=why):
        core._adopt_epoch(epoch)
        if core.witness is not None:
            core.witness.role = core.role
        core.event("demoted", why=why, diverged_regions={
            lun: len(v) for lun, v in core.diverged.items()})
        drop_links(core)


def send_diverged(core: PeeringEngine, link: Port) -> None:
    """Tell the new primary which regions we may hold that it lacks (DESIGN invariant 5)."""
    if not core.diverged or core.role != Role.SECONDARY:
        return
    j = core.journal
    for lun, regions in core.diverged.items():
        rb = j.region_bytes(lun) if j is not None else 1 << 20
        link.send(Control({"op": "diverged", "lun": lun, "region_bytes": rb,
                           "regions": regions}))
    if j is not None:
        for lun, regions in core.diverged.items():
            with contextlib.suppress(Exception):
                j.clear_dirty(lun, regions)
    core.event("diverged_regions_sent", regions={k: len(v) for k, v in core.diverged.items()})
    core.diverged = {}


def take_diverged(core: PeeringEngine, link: Port, body: dict[str, Any]) -> None:
    """(New primary) the demoted one's regions: journal them, so the resync copies them."""
    j = core.journal
    lun = body.get("lun")
    rb = body.get("region_bytes")
    regions = body.get("regions")
    if j is None or lun not in core.pipes or not isinstance(rb, int) or rb <= 0 \
            or not isinstance(regions, list):
        _log.warning("diverged_regions_ignored", peer=link.peer)
        return
    size = core.pipes[lun].store.size
    try:
        for r in regions:
            if isinstance(r, int) and 0 <= r * rb < size:
                j.mark_dirty(lun, r * rb, min(rb, size - r * rb))
    except Exception as e:  # a full or offline journal: say so, keep serving
        core.raise_alarm(getattr(e, "alarm", "journal_offline"),
                         f"cannot record the regions {link.peer} may hold that this Core "
                         f"lacks (LUN id {lun}): {e}; the replica may differ there until "
                         "`coredr verify --repair`")
        return
    j.request_commit()
    core.event("diverged_regions_received", lun=lun, regions=len(regions))
