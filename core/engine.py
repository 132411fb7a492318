"""The Core's replication logic, sans-IO: what each message, ack and commit does.

:class:`CoreEngine` is everything a Core decides, over objects it is handed:
links and a Witness client (:mod:`core.ports`), backends
(:class:`core.pipeline.Backend`), a journal. It reads no clock
(``now``/``mono`` are hooks), opens no socket, starts no task.
:class:`core.node.Core` is its asyncio adapter (sockets, diallers, the
control server, the resync driver, verify); the seeded simulation
(:mod:`steelfusion.sim`) drives the same engine on a virtual clock.

This module is the write path and the wiring; the rules are
:mod:`core.replication` (the state machine: every role, state and epoch
change goes through its table; :meth:`CoreEngine._fire` carries out its
effects) and :mod:`core.admission` (who may connect), and the rest of the
engine is split by topic, as functions over it; each takes the engine as a
Protocol of its own, naming what it uses (:class:`core.ports.Engine` and
up), so none of them imports this module:

- :mod:`core.peering`: the peer's links, demotion, diverged regions;
- :mod:`core.resync`: copying journaled regions to the peer, and taking them;
- :mod:`core.operator`: ``coredr`` suspend, resume, failover, terminate;
- :mod:`core.housekeeping`: the half-second checks (the Witness's word, alarms).

Write path (seed 002, "SteelFusion replication design overview", steps 1-5):

1. an Edge's WRITE arrives on its link (``_on_edge_write``), in the Edge's
   write order for that LUN, chained by ``prev`` (a gap is refused);
2. the primary notes the regions in the journal's activity log (DESIGN
   invariant 5), applies the write to the backend (``_apply_write``) and
   queues a copy for the secondary (``_mirror``);
3. the backend write becomes durable with the next group commit
   (``_on_durable``);
4. the secondary applies the copy (``_on_mirror_write``), makes it durable
   and ACKs (``_on_mirror_ack`` here);
5. the primary ACKs the Edge (cumulatively) only when both are durable
   (:meth:`CoreEngine._progress`, under :meth:`CoreEngine._ack_limit`).

Replication states (:mod:`core.replication`): when the secondary is
unreachable the primary is *paused* — writes keep being applied and queued
up to the mirror window, none is acknowledged, and once the window is full
the Edges' connections stop being read, so the Edges buffer. When the link
returns, the queue is resent and acks flow again by themselves.
*Suspended* (Witness-approved) writes are journaled and acknowledged after
the journal write (the journal gate: ``p.gate``, ``_on_journal_durable``);
*resume* resyncs the journaled regions while new writes are mirrored.
*Failover* makes the secondary primary (suspended, epoch + 1) when neither
it nor the Witness can reach the primary; a primary that learns a newer
epoch becomes secondary.
"""

from __future__ import annotations

import contextlib
import errno
import functools
from collections import deque
from collections.abc import Callable
from typing import Any

from core import housekeeping, operator, peering, resync
from core.admission import Refusal, edge_refusal, stale_edge_links
from core.pipeline import Backend, LunPipe, Order
from core.ports import LinkKind, Port, WitnessView
from core.replication import Effect, Event, Refused, Role, State, adopt_epoch, restarted, step
from core.resync import RESYNC_STREAM, Progress
from journal.journal import Journal
from steelfusion import log
from steelfusion.config import CoreConfig
from steelfusion.wire import (
    Ack,
    Control,
    Hello,
    Message,
    Read,
    ReadReply,
    ReadStatus,
    Refuse,
    Welcome,
    Write,
    WriteFlags,
)
from witness.logic import Decision

_log = log.get("core")

AL_LOOKAHEAD = 4 << 20  # activity-log regions noted ahead of a sequential stream
NEVER = 1 << 62  # a journal ticket no commit reaches


class CoreEngine:
    """A Core's decisions (sans-IO); subclasses supply the hooks at the end."""

    def __init__(self, cfg: CoreConfig, state: dict[str, Any]) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.rep = restarted(state, cfg.role, cfg.peer is not None)
        self.peer_synced = bool(state.get("synced", not cfg.initial_sync))
        self.events: deque[dict[str, Any]] = deque(maxlen=2000)
        self.event_sink: Callable[[dict[str, Any]], None] | None = None
        self._event_no = 0
        self.alarms: dict[str, dict[str, Any]] = {}
        self.pipes: dict[int, LunPipe] = {}
        self.journal: Journal | None = None
        self.replication_enabled = cfg.peer is not None
        # links, as the adapter made them (steelfusion.link.Link, the simulation's End)
        self.edge_links: set[Any] = set()
        self.peer_out: dict[int, Any] = {}  # dialler index -> established link to peer
        self.peer_in: set[Any] = set()
        self.mirror_in: set[Any] = set()
        self.peer_info: dict[str, Any] = {}
        self.witness: WitnessView | None = None
        self.resync = Progress()
        self.resync_drain: Any = None  # the link a resync driver waits to drain
        self.diverged: dict[int, list[int]] = {}  # regions to hand to the new primary
        self._peer_up = False
        self._reading_paused = False
        # A secondary waiting for the Witness's answer to a failover takes no replication
        # stream meanwhile: the primary must not start resyncing it (it would be
        # inconsistent when the granted failover arrives, and refuse it; found by the
        # simulation, seed 1207 --full: both Cores ended up secondary).
        self.failover_pending = False
        self._failover_doubt_until = 0.0
        self._impostors: dict[str, float] = {}  # node name -> mono() of the last refused copy
        self._witness_lost_at: float | None = None

    # -- hooks: the adapter (core.node) or the simulation supplies these ------------------
    def now(self) -> float:
        """Wall-clock seconds, for events and alarms."""
        raise NotImplementedError

    def mono(self) -> float:
        """Monotonic seconds, for rates."""
        raise NotImplementedError

    def _persist(self, state: dict[str, Any]) -> None:
        """Make role/state/epoch durable before going on (atomic replace)."""
        raise NotImplementedError

    def _release_witness(self) -> None:
        """Give the suspension approval back to the Witness (in the background)."""

    def _later(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the current callback has returned."""
        raise NotImplementedError

    def _read_in_worker(self, store: Backend, r: Read,
                        done: Callable[[bytes | OSError], None]) -> None:
        """Read from a LUN whose reads wait on the network (a SAN LUN) off the event loop;
        ``done`` gets the bytes or the OSError, back on the loop."""
        raise NotImplementedError

    def _resync_run(self) -> None:
        """Start driving :meth:`resync_pump`."""

    def _resync_halt(self) -> None:
        """Stop driving :meth:`resync_pump`."""

    def _resync_wakeup(self) -> None:
        """An ACK or a link change: a waiting resync driver may go on."""

    def _on_hashes(self, link: Port, body: dict[str, Any]) -> None:
        """A peer asks for region hashes (verify)."""

    def _on_reply(self, link: Port, body: dict[str, Any]) -> None:
        """A peer answers one of our requests."""

    def tick(self) -> None:
        """Housekeeping every half second (the adapter's timer, the simulation's clock)."""
        housekeeping.tick(self)

    def _adopt_epoch(self, epoch: int) -> None:
        """Take a newer epoch (the replication table's rule) and make it durable at once."""
        self.rep = adopt_epoch(self.rep, epoch)
        self._save_state()

    def _save_state(self) -> None:
        self._persist({"role": self.rep.role, "state": self.rep.state.value,
                       "epoch": self.rep.epoch, "name": self.name, "synced": self.peer_synced,
                       "ha": self.cfg.ha})

    @property
    def role(self) -> Role:
        return self.rep.role

    @property
    def epoch(self) -> int:
        return self.rep.epoch

    def raise_alarm(self, key: str, message: str) -> None:
        if key not in self.alarms:
            _log.error("alarm_raised", alarm=key, message=message)
        self.alarms[key] = {"alarm": key, "message": message, "since": self.now()}

    def clear_alarm(self, key: str) -> None:
        if self.alarms.pop(key, None) is not None:
            _log.info("alarm_cleared", alarm=key)

    def event(self, name: str, **kv: Any) -> None:
        """A state change: logged, and kept for ``coredr events`` (like DRBD's events2)."""
        self._event_no += 1
        ev = {"n": self._event_no, "time": self.now(), "event": name, "node": self.name,
              "role": self.rep.role, "state": self.rep.state.value, "epoch": self.rep.epoch, **kv}
        self.events.append(ev)
        if self.event_sink is not None:  # an HA host numbers its Cores' events in one stream
            self.event_sink(ev)
        _log.info(name, **{k: v for k, v in ev.items() if k not in ("n", "time", "event", "node")})

    # -- replication state ----------------------------------------------------------
    @property
    def replication(self) -> str:
        if self.role == Role.PRIMARY and not self.cfg.peer:
            return "standalone"
        if self.role == Role.PRIMARY and not self.replication_enabled:
            return "disabled"
        if self.rep.state is State.REPLICA and any(p.hole for p in self.pipes.values()):
            return State.INCONSISTENT.value  # never "replica" over a hole we know of
        return self.rep.state.value

    def _fire(self, ev: Event, *, force: bool = False, **kv: Any) -> bool:
        """Step the state machine and carry out its effects; False if the table refuses."""
        try:
            nxt, effects = step(self.rep, ev, force=force)
        except Refused as e:
            _log.debug("replication_event_ignored", replication_event=ev.value, reason=str(e))
            return False
        old = self.rep
        self.rep = nxt
        if Effect.SAVE in effects or nxt != old:
            self._save_state()
        if nxt != old:
            self.event("replication_state", from_state=old.state.value, to=nxt.state.value,
                       from_role=old.role, cause=ev.value, **kv)
        for eff in effects:
            self._effect(eff)
        return True

    def _effect(self, eff: Effect) -> None:
        if eff is Effect.JOURNAL_QUEUE:
            self._queue_to_journal()
        elif eff is Effect.START_RESYNC:
            resync.start(self)
        elif eff is Effect.STOP_RESYNC:
            resync.stop(self)
        elif eff is Effect.RELEASE_WITNESS and self.witness is not None:
            self._release_witness()
        elif eff is Effect.REFUSE_EDGES:
            for lk in list(self.edge_links):
                lk.refuse("not-primary", f"Core {self.name} is no longer primary (epoch "
                          f"{self.epoch})")
        elif eff is Effect.MIRROR:
            for lun, p in self.pipes.items():
                self._resend_mirror(lun, p)
        self._check_paused()
        self._progress_all()

    @property
    def mirror_links(self) -> list[Any]:
        """Outbound links to a peer that accepted us as its primary."""
        return [lk for lk in self.peer_out.values()
                if lk.established and lk.welcome is not None and lk.welcome.role == Role.SECONDARY]

    # -- link events --------------------------------------------------------------
    def _on_close(self, link: Port, exc: BaseException | None) -> None:
        kind = link.ctx
        reason = link.close_reason or (str(exc) if exc else "closed")
        if kind == LinkKind.EDGE:
            self.edge_links.discard(link)
            for p in self.pipes.values():
                if p.upstream is link:
                    p.upstream = None
                    p.waiting.clear()
            self.event("edge_disconnected", peer=link.peer,
                       edge=link.hello.node if link.hello else None, reason=reason)
        elif kind == LinkKind.MIRROR_IN:
            self.mirror_in.discard(link)
            for p in self.pipes.values():
                if p.upstream is link:
                    p.upstream = None
                    p.waiting.clear()
            _log.warning("replication_link_down", direction="in", peer=link.peer, reason=reason)
        elif kind == LinkKind.PEER_IN:
            self.peer_in.discard(link)
        elif kind == LinkKind.PEER_OUT:
            for lun, p in self.pipes.items():
                if p.resync_on is link:
                    p.requeue_resync()
                if p.mirror_link is link:
                    p.mirror_link = None
                    # what was in flight on it may be lost: resend the queue on another link
                    # at once (the peer skips what it has) rather than leave a hole behind
                    # the next copy
                    if self.rep.mirrors:
                        self._resend_mirror(lun, p)
            self._resync_wakeup()
        peering.update_peer(self)
        self._check_paused()

    def _on_message(self, link: Port, msg: Message) -> None:
        if isinstance(msg, Write):
            if link.ctx == LinkKind.EDGE:
                self._on_edge_write(link, msg)
            elif link.ctx == LinkKind.MIRROR_IN:
                self._on_mirror_write(link, msg)
            else:
                link.refuse("unexpected-write", f"WRITE on a {link.ctx} connection")
        elif isinstance(msg, Ack):
            if link.ctx == LinkKind.PEER_OUT:
                if msg.stream == RESYNC_STREAM:
                    resync.on_ack(self, msg)
                else:
                    self._on_mirror_ack(msg)
        elif isinstance(msg, Read):
            self._on_read(link, msg)
        elif isinstance(msg, Hello):
            self._on_hello(link, msg)
        elif isinstance(msg, Welcome):
            peering.on_welcome(self, link, msg)
        elif isinstance(msg, Refuse):
            peering.on_refuse(self, link, msg)
        elif isinstance(msg, Control):
            self._on_control(link, msg.body)

    def _on_hello(self, link: Port, h: Hello) -> None:
        if h.purpose == "edge":
            self._accept_edge(link, h)
        elif h.purpose == "replication":
            peering.accept_peer(self, link, h)
        else:
            _log.warning("hello_refused", peer=link.peer, node=h.node, purpose=h.purpose)
            link.refuse("bad-purpose", f"unknown connection purpose {h.purpose!r}")

    def _welcome(self, link: Port, **info: Any) -> None:
        applied = {lun: (p.stream, p.durable_seq) for lun, p in self.pipes.items()}
        link.send(Welcome(self.name, self.role, self.epoch, applied,
                          {"state": self.rep.state.value, "synced": self.peer_synced, **info}))

    def _accept_edge(self, link: Port, h: Hello) -> None:
        def refuse(r: Refusal) -> None:
            _log.error("edge_refused", edge=h.node, peer=link.peer, code=r.code, reason=r.reason)
            link.send(Refuse(r.code, r.reason, r.info))
            link.close(r.reason)

        if peering.impostor(self, link, h, self.edge_links):
            return refuse(Refusal("duplicate-node", f"Edge {h.node} is already connected to "
                                  f"{self.name} from another process; stop the copy (two Edges "
                                  "started with one config?)"))
        r = edge_refusal(h, link, self.name, self.rep, self.pipes)
        if r is not None:
            return refuse(r)
        for old in set(stale_edge_links(h, link, self.pipes)):
            old.close("replaced by a newer connection from the same Edge")
        link.ctx = LinkKind.EDGE
        self.edge_links.add(link)
        stream = h.info.get("stream")
        committed = h.info.get("committed")
        committed = committed if isinstance(committed, dict) else {}
        for lun in h.luns:
            p = self.pipes[lun]
            p.upstream = link
            p.waiting.clear()
            if isinstance(stream, int) and stream and stream != p.stream:
                self._switch_stream(lun, p, stream)
            c = committed.get(str(lun))
            p.floor = 0
            if isinstance(c, int) and c > p.received_seq:
                # The Edge was told writes up to ``c`` are safe, and this Core lacks some.
                # After a failover from a suspended primary that is the seed's documented
                # loss (the old primary journaled them); anywhere else it is a bug to see.
                p.floor = c
                info = dict(lun=lun, edge=h.node, edge_committed=c, have=p.received_seq)
                if h.epoch < self.epoch:
                    self.event("edge_ahead_after_failover", **info)
                else:
                    self.raise_alarm(f"lun_{lun}_edge_ahead",
                                     f"Edge {h.node} had LUN id {lun}'s writes up to seq {c} "
                                     f"acknowledged, this Core has only up to {p.received_seq}: "
                                     "the writes between are not on this Core")
                    self.event("edge_ahead", **info)
        self._welcome(link)
        self.event("edge_connected", edge=h.node, peer=link.peer, luns=sorted(h.luns))
        if self._reading_paused:
            link.pause_reading()

    # -- primary: Edge writes ------------------------------------------------------
    def _on_edge_write(self, link: Port, w: Write) -> None:
        p = self.pipes.get(w.lun)
        if p is None or p.upstream is not link:
            link.refuse("not-your-lun", f"LUN id {w.lun} was not opened on this connection")
            return
        if not p.store.check_range(w.offset, w.extent):
            link.refuse("out-of-range", f"write at {w.offset}+{w.extent} beyond LUN id "
                        f"{w.lun} of {p.store.size} bytes")
            return
        if w.stream != p.stream:
            self._switch_stream(w.lun, p, w.stream)
        verdict = p.admit(w)
        if verdict is Order.GAP or verdict is Order.MALFORMED:
            self._refuse_gap(link, w.lun, p, w, "edge")
            return
        if verdict is Order.NEXT and p.hole is not None:
            self._hole_filled(w.lun, p)
        p.waiting.append(w.seq)
        ticket = 0
        j = self.journal
        if j is not None and w.seq > p.applied_seq and self.replication_enabled:
            try:
                if self.rep.journals:
                    must = j.mark_dirty(w.lun, w.offset, w.extent)
                elif self.rep.mirrors:
                    must = j.note_inflight(w.lun, w.offset, w.extent)
                    self._al_lookahead(j, w.lun, p, w.offset + w.extent)
                else:
                    must = False
            except Exception as e:  # an offline journal must not take the Core down...
                self.raise_alarm("journal_offline", f"journal write failed: {e}")
                must = False
                if self.rep.journals:
                    # ...nor acknowledge a write whose region it could not record: the
                    # resync would miss it. Gate it behind a ticket that never comes.
                    ticket = NEVER
            if must and not ticket:
                ticket = j.ticket
        if ticket or p.gate:
            p.gate.append((ticket, w))
            if ticket:
                assert j is not None  # a ticket comes from the journal
                j.request_commit()
            return
        self._apply_write(w.lun, p, w)

    def _al_lookahead(self, j: Journal, lun: int, p: LunPipe, end: int) -> None:
        """Sequential stream: put the next regions in the activity log ahead of time.

        They enter idle (noted, then released at once), ride along with the
        commit already under way, and the stream's next writes then find their
        region durable in the AL instead of waiting for a journal commit each
        (DRBD keeps hot extents for the same reason). Extra AL regions only
        widen a post-crash resync, never narrow it.
        """
        if p.last_end and end > p.last_end and end - p.last_end <= 1 << 20:
            ahead = min(AL_LOOKAHEAD, p.store.size - end)
            if ahead > 0:
                j.note_inflight(lun, end, ahead)
                j.peer_acked(lun, end, ahead)
        p.last_end = end

    def _apply_write(self, lun: int, p: LunPipe, w: Write) -> None:
        self._apply(lun, p, w)
        if self.rep.mirrors and self.cfg.peer:
            if p.wants_copy(w):
                self._mirror(lun, p, w)
        else:
            if self.rep.journals:
                p.jlimit = max(p.jlimit, w.seq)
            p.not_mirrored(w)  # the peer will get this one by resync, not by mirror
        self._progress(lun, p)

    def _refuse_gap(self, link: Port, lun: int, p: LunPipe, w: Write, source: str) -> None:
        """A write whose predecessor this Core never got: refuse it, never skip the hole.

        Dropping the connection makes the sender resend from what this Core
        acknowledged, which fills the hole (DESIGN invariant 6).
        """
        have = max(p.received_seq, p.floor) if source == "edge" else p.received_seq
        detail = (f"LUN id {lun}: {source} write seq {w.seq} follows seq {w.prev}, but this Core "
                  f"has only up to seq {have} of stream {p.stream:#x}")
        p.hole = detail
        self.raise_alarm(f"lun_{lun}_sequence_gap", f"{detail}; refused, the sender resends")
        self.event("sequence_gap", lun=lun, source=source, seq=w.seq, prev=w.prev, have=have,
                   peer=link.peer)
        link.send(Refuse("sequence-gap", detail, {"lun": lun, "have": have, "source": source}))
        link.close(detail)

    def _hole_filled(self, lun: int, p: LunPipe) -> None:
        self.event("sequence_gap_filled", lun=lun, seq=p.received_seq)
        p.hole = None
        self.clear_alarm(f"lun_{lun}_sequence_gap")

    def _on_journal_durable(self, durable: int) -> None:
        more = False
        for lun, p in self.pipes.items():
            while p.gate and p.gate[0][0] <= durable:
                self._apply_write(lun, p, p.gate.popleft()[1])
            if p.jpending is not None and p.jpending[0] <= durable:
                p.jlimit = max(p.jlimit, p.jpending[1])
                p.jpending = None
                self._progress(lun, p)
            more = more or bool(p.gate) or p.jpending is not None
        if more and self.journal is not None:
            # records appended during that commit need the next one; this runs inside the
            # finishing commit, so ask once it is done
            self._later(self.journal.request_commit)

    def replace_journal(self, j: Journal) -> None:
        """Take over a reopened Journal LUN from one that failed (forward recovery).

        What the failed journal could not record is unknown (its last
        commit's records, regions of writes whose mark failed), so a primary
        marks every LUN dirty and the resync copies all of it, as DRBD does
        when its metadata device comes back. Writes held behind the old
        journal's tickets wait for the new journal's next commit, then are
        applied and acknowledged: none was acknowledged before, none is lost.
        """
        old = self.journal
        self.journal = j
        j.on_durable(self._on_journal_durable)
        if old is not None and old.failed is not None:
            self.clear_alarm(getattr(old.failed, "alarm", "journal_offline"))
        self.clear_alarm("journal_offline")
        primary = self.role == Role.PRIMARY
        if primary:
            for lun in self.pipes:
                j.mark_all_dirty(lun)
        ticket = j.ticket
        held = 0
        for p in self.pipes.values():
            held += len(p.gate)
            p.gate = deque((ticket, w) for _, w in p.gate)
            if p.jpending is not None:
                p.jpending = (ticket, p.jpending[1])
        self.event("journal_reopened", path=str(j.path), held_writes=held,
                   resync="every region" if primary else "none")
        j.request_commit()
        if primary and self.rep.mirrors:
            self._fire(Event.RESYNC_NEEDED)

    def _switch_stream(self, lun: int, p: LunPipe, stream: int) -> None:
        if p.stream:
            _log.warning("lun_stream_changed", lun=lun, old=p.stream, new=stream)
        p.switch_stream(stream)

    def _apply(self, lun: int, p: LunPipe, w: Write) -> None:
        if w.stream != p.stream:
            self._switch_stream(lun, p, w.stream)
        try:
            p.apply(w)  # a resend of a write this backend already has is skipped
        except OSError as e:
            if e.errno == errno.ENOSPC:  # a thin LUN that cannot grow (issue 18)
                self.raise_alarm(f"lun_{lun}_io", f"LUN id {lun} is out of space: its storage "
                                 f"could not allocate the blocks of a write ({e}); the write is "
                                 f"not acknowledged: free space there, or grow the pool")
            else:
                self.raise_alarm(f"lun_{lun}_io", f"LUN id {lun} backend write failed: {e}")
            raise

    def _on_durable(self, lun: int, target: int) -> None:
        p = self.pipes[lun]
        p.durable_to(target)  # its applied slot is durable already (_seal)
        last = None
        link = None
        while p.resync_issued and p.resync_issued[0][0] <= target:
            _, last, link = p.resync_issued.popleft()
        if last is not None and link is not None:
            link.send(Ack(lun, RESYNC_STREAM, last))
        self._progress(lun, p)

    def _on_store_failed(self, lun: int, err: BaseException) -> None:
        """A backend sync failed: fail-stop this LUN (acknowledge nothing more).

        After a failed fdatasync the kernel may have dropped the dirty pages
        and a later sync would "succeed" without them (PostgreSQL's fsync
        lesson): retrying could acknowledge writes that are gone. The applied
        seq was not sealed past the last good sync, so a restart redoes them
        from the Edge's and the primary's copies.
        """
        p = self.pipes[lun]
        if p.failed is None:
            p.failed = str(err)
            self.raise_alarm(f"lun_{lun}_io", f"LUN id {lun}: backend sync failed ({err}); this "
                             "Core acknowledges no more writes to it: fix the storage and "
                             "restart the Core (the writes since the last good sync are redone)")
            self.event("lun_failed", lun=lun, error=str(err))

    def _ack_limit(self, p: LunPipe) -> int:
        if p.failed is not None:
            return 0
        limit = p.durable_seq
        if self.rep.role != Role.PRIMARY or not self.cfg.peer or not self.replication_enabled:
            return limit
        if self.rep.journals:
            if self.fenced():
                # The Witness may be granting (or has granted) the peer: promise nothing new.
                # Not even up to ``acked_seq``: after a restart that is the durable applied
                # seq, writes this Core never acknowledged (found by the simulation, seed 276
                # --full: a restarted stale primary acknowledged 18 resent writes after the
                # failover, and they were lost).
                return 0
            return min(limit, p.jlimit)
        if self.rep.mirrors:
            return min(limit, p.mirror_acked)
        return limit

    def fenced(self) -> bool:
        """Suspended without the Witness's backing: acknowledge nothing (DESIGN invariant 2).

        The lease must be live, and the Witness must not have told us of a
        newer epoch or taken the approval back: a lease renewed by an answer
        that says "core-b is primary at epoch 2" is no licence to acknowledge
        until the next housekeeping demotes us (found by the simulation, seed
        290 --full: both Cores acknowledged for up to half a second).
        """
        w = self.witness
        if w is None:
            return False
        return not w.lease_valid() or w.pair_epoch > self.epoch or w.holds is False

    def _progress(self, lun: int, p: LunPipe) -> None:
        """Acknowledge upstream everything durable here and, per state, on the peer/journal."""
        last = p.take_acks(self._ack_limit(p))
        if last is not None and p.upstream is not None:
            p.upstream.send(Ack(lun, p.stream, last))

    def _progress_all(self) -> None:
        for lun, p in self.pipes.items():
            self._progress(lun, p)

    # -- primary: mirroring ---------------------------------------------------------
    def _mirror(self, lun: int, p: LunPipe, w: Write) -> None:
        link = self._mirror_link_for(lun, p)  # (a new link gets the queue first)
        copy = p.queue_copy(lun, w, self.mono())
        if link is not None:
            link.send(copy)
        self._check_paused()

    def _mirror_link_for(self, lun: int, p: LunPipe) -> Port | None:
        """The LUN's mirror link; a new one first gets every queued copy again.

        Copies sent on the previous link may never have been applied (it
        closed), and the next copy would follow a hole: the secondary would
        refuse it. Resending the queue (it skips what it has) keeps the
        chain whole. Found by the simulation (seed 178 --full).
        """
        if p.mirror_link is not None and p.mirror_link.established:
            return p.mirror_link
        links = self.mirror_links
        if not links:
            p.mirror_link = None
            return None
        link = p.mirror_link = links[lun % len(links)]
        if p.mirror_q:
            link.send_many(list(p.mirror_q))
        return link

    def _resend_mirror(self, lun: int, p: LunPipe) -> None:
        """Send the queue again (a new link, or the peer asked): the peer skips what it has."""
        had = p.mirror_link
        if had is not None and not had.established:
            had = None
        link = self._mirror_link_for(lun, p)
        if link is not None and link is had and p.mirror_q:
            link.send_many(list(p.mirror_q))

    def _on_mirror_ack(self, a: Ack) -> None:
        p = self.pipes.get(a.lun)
        if p is None or a.stream != p.stream:
            return
        if not p.ack_possible(a.seq):
            # an ACK may only cover what was sent (a contiguous prefix of it): never release
            # on an acknowledgement of writes the peer cannot have had
            self.raise_alarm(f"lun_{a.lun}_bad_ack", f"the secondary acknowledged LUN id {a.lun} "
                             f"up to seq {a.seq}, but only up to {p.mirror_top} was sent")
            return
        self._mirror_acked_to(a.lun, p, a.seq)
        self._check_paused()

    def _mirror_acked_to(self, lun: int, p: LunPipe, seq: int) -> None:
        j = self.journal
        for w in p.mirror_acked_to(seq, self.mono()):
            if j is not None:
                with contextlib.suppress(Exception):
                    j.peer_acked(lun, w.offset, w.extent)
        self._progress(lun, p)

    def _queue_to_journal(self) -> None:
        """Suspension: what the peer never acknowledged becomes dirty in the journal."""
        j = self.journal
        if j is None:
            return
        lost: BaseException | None = None
        try:
            j.peer_lost()
        except Exception as e:
            lost = e
        for lun, p in self.pipes.items():
            failed = lost
            for w in p.drop_copies():
                try:
                    j.mark_dirty(lun, w.offset, w.extent)
                except Exception as e:
                    failed = e
            if failed is None:
                p.jpending = (j.ticket, p.applied_seq)
            else:
                # Regions the resync must copy could not be recorded: acknowledging those
                # writes would let the replica miss them for good (simulation seed 2020834
                # --full). Nothing up to here is acknowledged; the alarm says why.
                p.jpending = (NEVER, p.applied_seq)
                self.raise_alarm(getattr(failed, "alarm", "journal_offline"),
                                 f"suspension could not record LUN id {lun}'s unmirrored "
                                 f"regions: {failed}; its writes are not acknowledged")
        j.request_commit()
        if j.durable >= j.ticket:
            self._on_journal_durable(j.durable)

    def _check_paused(self) -> None:
        """Stop reading Edges while the mirror queue is over its window (they buffer)."""
        total = sum(p.mirror_bytes for p in self.pipes.values())
        want_pause = total > self.cfg.mirror_window_bytes
        if want_pause and not self._reading_paused:
            self._reading_paused = True
            _log.warning("edge_intake_paused", mirror_queue_bytes=total,
                         replication=self.replication)
            for lk in self.edge_links:
                lk.pause_reading()
        elif self._reading_paused and total <= self.cfg.mirror_window_bytes // 2:
            self._reading_paused = False
            _log.info("edge_intake_resumed", mirror_queue_bytes=total)
            for lk in self.edge_links:
                lk.resume_reading()

    # -- resync (primary), in core.resync ---------------------------------------------------
    def resync_pump(self) -> str:
        """Queue the next resync frames; what the driver does next (:func:`core.resync.pump`)."""
        return resync.pump(self)

    def resync_committed(self) -> None:
        """The journal holds no dirty region any more: the peer is a replica again."""
        resync.committed(self)

    # -- secondary: applying the primary's copies -----------------------------------
    def _on_mirror_write(self, link: Port, w: Write) -> None:
        p = self.pipes.get(w.lun)
        if p is None or not p.store.check_range(w.offset, w.extent):
            link.refuse("out-of-range", f"replicated write to LUN id {w.lun} at {w.offset} "
                        "is outside the replica")
            return
        if w.flags & WriteFlags.RESYNC:
            resync.take_frame(self, link, p, w)
            return
        if w.stream != p.stream:
            self._switch_stream(w.lun, p, w.stream)
        have = p.received_seq
        verdict = p.admit(w, resynced_hole_ok=True)
        if verdict is Order.GAP or verdict is Order.MALFORMED:
            self._refuse_gap(link, w.lun, p, w, "mirror")
            return
        if verdict is Order.NEXT and w.prev > have:
            # the primary journaled what is missing and resyncs it: not a replica until done
            self.event("mirror_hole_resynced", lun=w.lun, seq=w.seq, prev=w.prev, have=have)
            self._fire(Event.RESYNC_START)
        if verdict is Order.NEXT and p.hole is not None:
            self._hole_filled(w.lun, p)
        p.upstream = link
        if p.resync_floor and resync.newer(p, w):
            p.skip_apply(w)  # the region already holds newer data from the resync
        else:
            self._apply(w.lun, p, w)
        p.waiting.append(w.seq)
        self._progress(w.lun, p)

    def _on_control(self, link: Port, body: dict[str, Any]) -> None:
        op = body.get("op")
        if op == "reply":
            self._on_reply(link, body)
        elif op == "hashes":
            self._on_hashes(link, body)
        elif op == "diverged" and self.role == Role.PRIMARY:
            peering.take_diverged(self, link, body)
        elif op == "map":
            self._on_map(link, body)
        elif op == "terminate" and link.ctx in (LinkKind.MIRROR_IN, LinkKind.PEER_IN,
                                                  LinkKind.PEER_OUT):
            operator.terminated_by_peer(self, str(body.get("by")))
        elif not resync.on_control(self, op, body):  # the primary's resync notices
            _log.info("control_notice", peer=link.peer, body=body)

    # -- reads --------------------------------------------------------------------
    def _on_read(self, link: Port, r: Read) -> None:
        p = self.pipes.get(r.lun)
        if link.ctx != LinkKind.EDGE or self.role != Role.PRIMARY:
            link.send(ReadReply(r.req, ReadStatus.NOT_PRIMARY, b""))
            return
        if p is None:
            link.send(ReadReply(r.req, ReadStatus.NO_SUCH_LUN, b""))
            return
        if not p.store.check_range(r.offset, r.length):
            link.send(ReadReply(r.req, ReadStatus.OUT_OF_RANGE, b""))
            return
        if p.store.remote:
            self._read_in_worker(p.store, r, functools.partial(self._read_reply, link, r))
            return
        try:
            data = p.store.pread(r.offset, r.length)
        except OSError as e:
            self._read_reply(link, r, e)
            return
        link.send(ReadReply(r.req, ReadStatus.OK, data))

    def _on_map(self, link: Port, body: dict[str, Any]) -> None:
        """An Edge's GET LBA STATUS: what the LUN has allocated over a range (issue 18).
        Answered with ``map-reply`` (extents, or an error in words)."""
        reply: dict[str, Any] = {"op": "map-reply", "req": body.get("req")}
        lun, offset, length = body.get("lun"), body.get("offset"), body.get("length")
        p = self.pipes.get(lun) if isinstance(lun, int) else None
        if link.ctx != LinkKind.EDGE or self.role != Role.PRIMARY:
            reply["error"] = "not the primary"
        elif p is None or not isinstance(offset, int) or not isinstance(length, int) \
                or not p.store.check_range(offset, length):
            reply["error"] = f"no LUN id {lun} range {offset}+{length}"
        else:
            try:
                reply["extents"] = [list(e) for e in p.store.extents(offset, length)]
            except OSError as e:
                reply["error"] = str(e)
        link.send(Control(reply))

    def _read_reply(self, link: Port, r: Read, got: bytes | OSError) -> None:
        if isinstance(got, OSError):
            self.raise_alarm(f"lun_{r.lun}_io", f"LUN id {r.lun} backend read failed: {got}")
            link.send(ReadReply(r.req, ReadStatus.IO_ERROR, b""))
        else:
            link.send(ReadReply(r.req, ReadStatus.OK, got))

    # -- operator commands, in core.operator (the adapter asks the Witness in between) ------
    def suspend_check(self) -> dict[str, Any] | None:
        return operator.suspend_check(self)

    def suspend_decided(self, d: Decision) -> dict[str, Any]:
        return operator.suspend_decided(self, d)

    def resume_check(self) -> None:
        operator.resume_check(self)

    def resume_apply(self) -> dict[str, Any]:
        return operator.resume_apply(self)

    def failover_begin(self, force: bool) -> None:
        operator.failover_begin(self, force)

    def failover_decided(self, d: Decision | None, force: bool) -> dict[str, Any]:
        return operator.failover_decided(self, d, force)

    def terminate_apply(self) -> dict[str, Any]:
        return operator.terminate_apply(self)
