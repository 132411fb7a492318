"""Resync: copying the journaled regions to the peer, and taking them on the peer.

After a suspension (or a failover, a journal reopen, a replica found
behind) the primary's Journal LUN names every region the secondary may
lack. *Resume* copies them (128 KiB payloads, seed 002 "replication
metrics") while new writes are mirrored; the secondary is *inconsistent*
until every region is acknowledged durable and it is told ``resync-done``.

Functions over the engine (:class:`core.engine.CoreEngine`), split out of it
by topic, which they take as :class:`ResyncEngine`; the engine's hooks ``_resync_run`` / ``_resync_halt`` /
``_resync_wakeup`` let its adapter drive :func:`pump` (asyncio in
:mod:`core.node`, the virtual clock in :mod:`steelfusion.sim`).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from core.pipeline import LunPipe
from core.ports import Engine, Port
from core.replication import Event, Role
from steelfusion.wire import Ack, Control, Message, Write, WriteFlags, discard_data

RESYNC_STREAM = 2**64 - 1  # acks of resync payloads travel on this stream id
RESYNC_CHUNK = 128 * 1024  # seed: initial synchronization payloads are 128 KB
_ZEROS = bytes(RESYNC_CHUNK)  # a resync chunk that reads as this goes as a DISCARD
RESYNC_WINDOW = 16 << 20


@dataclass(slots=True)
class Progress:
    total: int = 0
    done: int = 0
    started: float = 0.0

    def view(self, now: float) -> dict[str, Any]:
        el = max(1e-6, now - self.started)
        rate = self.done / el
        left = self.total - self.done
        return {"bytes_done": self.done, "bytes_total": self.total,
                "percent": round(100 * self.done / self.total, 1) if self.total else 100.0,
                "rate_bytes_s": round(rate), "eta_s": round(left / rate, 1) if rate > 0 else None,
                "elapsed_s": round(el, 1)}


class ResyncEngine(Engine, Protocol):
    """What the resync reads, changes and calls of the engine (its hooks drive :func:`pump`)."""

    peer_synced: bool
    resync: Progress
    resync_drain: Port | None  # the link a resync driver waits to drain

    @property
    def mirror_links(self) -> list[Port]: ...
    def _fire(self, ev: Event, *, force: bool = False, **kv: Any) -> bool: ...
    def _save_state(self) -> None: ...
    def _mirror_link_for(self, lun: int, p: LunPipe) -> Port | None: ...
    def _mirror_acked_to(self, lun: int, p: LunPipe, seq: int) -> None: ...
    def _switch_stream(self, lun: int, p: LunPipe, stream: int) -> None: ...
    def _refuse_gap(self, link: Port, lun: int, p: LunPipe, w: Write, source: str) -> None: ...
    def _resync_run(self) -> None: ...
    def _resync_halt(self) -> None: ...
    def _resync_wakeup(self) -> None: ...


# -- primary ----------------------------------------------------------------------------

def start(core: ResyncEngine) -> None:
    """Queue every dirty region of the journal and tell the secondary (effect START_RESYNC)."""
    j = core.journal
    if j is None:
        return
    stop(core)
    total = 0
    for lun, p in core.pipes.items():
        regions = j.dirty(lun)
        p.resync_regions = deque(int(r) for r in regions)
        total += j.dirty_bytes(lun)
    core.resync = Progress(total=total, started=core.mono())
    links = core.mirror_links
    if links:
        links[0].send(Control({"op": "resync-start", "epoch": core.epoch}))
    core.event("resync_started", bytes_total=total)
    core._resync_run()


def stop(core: ResyncEngine) -> None:
    """Effect STOP_RESYNC: what was in flight goes back to the queue, the queue is dropped."""
    core._resync_halt()
    for p in core.pipes.values():
        p.requeue_resync()
        p.resync_regions.clear()


def pump(core: ResyncEngine) -> str:
    """Queue the next resync frames; says what the driver should do next.

    ``"sent"``: call again soon; ``"drain"``: wait until ``core.resync_drain``
    is writable; ``"wait"``: the window is full or no link is up, call again
    on ``_resync_wakeup`` (or after a second); ``"commit"``: every region is
    copied and acknowledged, commit the journal then call :func:`committed`.

    A region is read and queued on the LUN's mirror link at once, so every
    mirrored write is ordered either wholly before (and included in the
    data read) or wholly after it: old resync data never lands on top of a
    newer write.
    """
    j = core.journal
    assert j is not None
    progressed = False
    for lun, p in core.pipes.items():
        rb = j.region_bytes(lun)
        while p.resync_regions and p.resync_bytes < RESYNC_WINDOW:
            link = core._mirror_link_for(lun, p)
            if link is None:
                break
            if link is not p.resync_on:
                p.requeue_resync()  # a new link: its chain starts from 0
                p.resync_on = link
                # The peer may hold writes newer than ours in what we overwrite (ours were
                # lost in a crash, or it is a demoted primary): it must take their copies
                # again rather than skip them (found by the simulation, seed 673 --full).
                link.send(Control({"op": "resync-rewind", "lun": lun, "stream": p.stream,
                                   "seq": p.received_seq}))
            _send_region(lun, p, link, p.resync_regions.popleft(), rb)
            progressed = True
            if not link.writable:
                core.resync_drain = link
                return "drain"
    if all(not p.resync_regions and not p.resync_inflight for p in core.pipes.values()):
        if any(j.dirty_count(lun) for lun in core.pipes):
            # regions dirtied again meanwhile (not expected while mirroring): go again
            for lun, p in core.pipes.items():
                p.resync_regions = deque(int(r) for r in j.dirty(lun))
            return "sent"
        return "commit"
    if not progressed or any(p.resync_bytes >= RESYNC_WINDOW for p in core.pipes.values()):
        return "wait"
    return "sent"


def _send_region(lun: int, p: LunPipe, link: Port, r: int, rb: int) -> None:
    """Region ``r`` of ``lun`` as it is now, in RESYNC_CHUNK frames chained by rseq."""
    base = r * rb
    end = min(base + rb, p.store.size)
    # The data read now holds every write up to ``applied_seq``: a copy of an older write
    # that reaches the peer after it (a gated resend) must not be laid over it (simulation
    # seed 2020834 --full).
    link.send(Control({"op": "resync-region", "lun": lun, "region": r, "region_bytes": rb,
                       "stream": p.stream, "seq": p.applied_seq}))
    frames: list[Message] = []
    for off in range(base, end, RESYNC_CHUNK):
        n = min(RESYNC_CHUNK, end - off)
        p.rseq += 1
        data = p.store.pread(off, n)
        if data == _ZEROS[:n]:  # deallocated (or zeros): the peer punches it, frees space
            frames.append(Write(lun, WriteFlags.RESYNC | WriteFlags.DISCARD, RESYNC_STREAM,
                                p.rseq, off, discard_data(n), p.rseq_prev))
        else:
            frames.append(Write(lun, WriteFlags.RESYNC, RESYNC_STREAM, p.rseq, off, data,
                                p.rseq_prev))
        p.rseq_prev = p.rseq
        p.resync_inflight.append((p.rseq, r, off + n >= end, n))
        p.resync_bytes += n
    link.send_many(frames)


def committed(core: ResyncEngine) -> None:
    """The journal holds no dirty region any more: the peer is a replica again."""
    core.peer_synced = True
    for lun, p in core.pipes.items():
        seq = p.covered()
        if seq is None:
            continue
        link = core._mirror_link_for(lun, p)
        if link is not None:
            # on the LUN's mirror link, so it comes before the copies that follow the hole
            link.send(Control({"op": "resync-covered", "lun": lun, "stream": p.stream,
                               "seq": seq}))
        # Every write up to ``seq`` is on the peer now (copies it acknowledged, or regions
        # it acknowledged durable in this resync): the Edge's writes up to there may be
        # acknowledged, or an idle host's last writes would wait for a next write that
        # never comes (found by the simulation, seed 181 --full).
        core._mirror_acked_to(lun, p, seq)
    # on every mirror link: it must come after any copy sent before it on that link
    for link in core.mirror_links:
        link.send(Control({"op": "resync-done", "epoch": core.epoch}))
    core.event("resync_done", **core.resync.view(core.mono()))
    core._fire(Event.RESYNC_DONE)


def on_ack(core: ResyncEngine, a: Ack) -> None:
    """The secondary made resync frames up to ``a.seq`` durable: whole regions are clean."""
    p = core.pipes.get(a.lun)
    j = core.journal
    if p is None or j is None:
        return
    done = []
    while p.resync_inflight and p.resync_inflight[0][0] <= a.seq:
        _, r, last, n = p.resync_inflight.popleft()
        p.resync_bytes -= n
        core.resync.done += n
        if last:
            done.append(r)
    if done:
        with contextlib.suppress(Exception):
            j.clear_dirty(a.lun, done)
    core._resync_wakeup()


# -- secondary --------------------------------------------------------------------------
def take_frame(core: ResyncEngine, link: Port, p: LunPipe, w: Write) -> None:
    """A resync frame: write it, and ACK it on RESYNC_STREAM once durable (``_on_durable``).

    Resync frames of a LUN come on one link, rseqs chained by prev; a chain
    starts at prev 0 whenever the primary starts over (a new resync, a new
    link: it requeued everything unacknowledged of the old chain).
    """
    if w.prev == 0:
        p.resync_link = link
        p.resync_last = 0
    if link is not p.resync_link or w.prev != p.resync_last or w.seq <= w.prev:
        core._refuse_gap(link, w.lun, p, w, "resync")
        return
    p.resync_last = w.seq
    if w.flags & WriteFlags.DISCARD:  # a region that reads zeros on the primary
        counter = p.store.discard(w.offset, w.extent)
        p.bytes_discarded += w.extent
    else:
        counter = p.store.pwrite(w.offset, w.data)
        p.bytes_written += len(w.data)
    p.resync_issued.append((counter, w.seq, link))
    p.store.request_sync()


def newer(p: LunPipe, w: Write) -> bool:
    """Does every region ``w`` touches hold resync data at least as new as ``w``?"""
    rb = p.resync_rb
    first, last = w.offset // rb, (w.offset + w.extent - 1) // rb
    return all(p.resync_floor.get(r, 0) >= w.seq for r in range(first, last + 1))


def on_control(core: ResyncEngine, op: object, body: dict[str, Any]) -> bool:
    """The primary's resync notices to a secondary; False if ``op`` is none of them."""
    if core.role != Role.SECONDARY:
        return False
    if op == "resync-start":
        core._fire(Event.RESYNC_START)
    elif op == "resync-done":
        for p in core.pipes.values():
            p.hole = None  # every region was copied: whatever the hole held is here
            p.resync_floor.clear()
        core.peer_synced = True
        core._fire(Event.RESYNC_DONE)
        core._save_state()
    elif op == "resync-rewind":
        _rewind(core, body)
    elif op == "resync-region":
        _region(core.pipes, body)
    elif op == "resync-covered":
        _covered(core, body)
    else:
        return False
    return True


def _rewind(core: ResyncEngine, body: dict[str, Any]) -> None:
    """Take the copies after ``seq`` again: the resync overwrites what we had of them."""
    lun = body.get("lun")
    seq = body.get("seq")
    pipe = core.pipes.get(lun) if isinstance(lun, int) else None
    if pipe is not None and isinstance(seq, int):
        had = pipe.received_seq
        if body.get("stream") != pipe.stream:
            seq = 0  # the primary has nothing of our stream (it lost it all)
        if pipe.rewind(seq):
            core.event("resync_rewind", lun=lun, seq=seq, had=had)


def _region(pipes: Mapping[int, LunPipe], body: dict[str, Any]) -> None:
    """The primary read region ``r`` at its applied ``seq``: older copies must not overlay it."""
    lun, r, rb, seq = (body.get(k) for k in ("lun", "region", "region_bytes", "seq"))
    pipe = pipes.get(lun) if isinstance(lun, int) else None
    if pipe is not None and isinstance(r, int) and isinstance(rb, int) and rb > 0 \
            and isinstance(seq, int) and body.get("stream") == pipe.stream:
        if pipe.resync_rb != rb:
            pipe.resync_floor.clear()
            pipe.resync_rb = rb
        pipe.resync_floor[r] = max(pipe.resync_floor.get(r, 0), seq)


def _covered(core: ResyncEngine, body: dict[str, Any]) -> None:
    """Every write up to ``seq`` is here (copied, or resynced and acknowledged)."""
    lun = body.get("lun")
    seq = body.get("seq")
    stream = body.get("stream")
    pipe = core.pipes.get(lun) if isinstance(lun, int) else None
    if pipe is not None and isinstance(lun, int) and isinstance(seq, int) \
            and isinstance(stream, int) and stream > 0 and stream != pipe.stream:
        # Every write of this stream so far came by resync, none as a copy (suspended from
        # the start): it is this replica's stream now, as a first copy would make it.
        # Ignoring it left status at seq 0 over a full replica and refused the next copy as
        # a gap (issue 13).
        core._switch_stream(lun, pipe, stream)
    if pipe is not None and isinstance(seq, int) and stream == pipe.stream \
            and pipe.advance(seq):
        # the primary sends this once this Core acknowledged every resynced region
        pipe.acked_seq = max(pipe.acked_seq, seq)
        core.event("resync_covered", lun=body.get("lun"), seq=seq)

