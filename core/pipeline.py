"""Ordering rules of one write stream on a Core: sans-IO, no sockets, no clocks.

Every stream a Core receives (an Edge's writes to one LUN, the primary's
mirror copies, a resync) is applied in sequence with no gap: DESIGN.md
invariant 6, "a duplicate may be skipped, a gap is refused and resent, and an
acknowledgement covers only a contiguous applied prefix".

Each WRITE names its own ``seq`` and the ``prev`` seq that comes before it
in its stream (:class:`steelfusion.wire.Write`), so the receiver can tell
the three cases apart from the frame alone, whatever else was lost:

===========  ==========================  ======================================
verdict      when                        what the receiver does
===========  ==========================  ======================================
duplicate    ``seq <= received``         skip the data (a resend), ack as usual
next         ``prev <= received < seq``  apply (a resent coalesced frame may
                                         overlap what it has: same bytes)
gap          ``prev > received``         refuse, alarm, drop the connection so
                                         the sender resends from what was acked
===========  ==========================  ======================================

Issue 9 was a gap skipped as if it were a resend: a restarted secondary got
seq 523 with 508-522 lost on the way and acknowledged 523, which let the
primary free 508-522. With ``prev`` that frame is a gap.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from steelfusion.wire import Write, WriteFlags


class Order(enum.Enum):
    DUPLICATE = "duplicate"
    NEXT = "next"
    GAP = "gap"
    MALFORMED = "malformed"  # prev >= seq: the sender broke the protocol


def order(received: int, prev: int, seq: int) -> Order:
    """Where a write with (``prev``, ``seq``) falls for a receiver that has ``received``."""
    if prev >= seq:
        return Order.MALFORMED
    if seq <= received:
        return Order.DUPLICATE
    if prev <= received:
        return Order.NEXT
    return Order.GAP


class Backend(Protocol):
    """Where a LUN's writes land: :class:`core.lunstore.LunStore`, or a simulated disk."""

    size: int
    remote: bool  # reads wait on the network (a SAN LUN): the Core reads it off its loop

    def check_range(self, offset: int, length: int) -> bool: ...
    def pwrite(self, offset: int, data: bytes | memoryview) -> int: ...
    def discard(self, offset: int, length: int) -> int: ...
    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]: ...
    def pread(self, offset: int, length: int) -> bytes: ...
    def request_sync(self, force: bool = False) -> None: ...


B = TypeVar("B", bound=Backend)


@dataclass(slots=True)
class LunPipeline(Generic[B]):
    """One LUN's write stream on a Core: admission, apply, durability, acks, mirror queue.

    Plain state and rules over :class:`~steelfusion.wire.Write` values and a
    :class:`Backend`; the Core (:mod:`core.node`) feeds it from its links
    and the seeded simulation (``tests/sim``) from a simulated network, so
    both run the same rules. Sequence numbers only grow within ``stream``;
    a write is acknowledged upstream only once it is durable here (and, as
    the caller's ``limit`` says, on the peer or in the journal), and only as
    a contiguous prefix (``waiting`` is in arrival order, each admitted
    write follows the one before it).
    """

    store: B
    stream: int = 0
    applied_seq: int = 0  # highest seq written to the backend (maybe not durable yet)
    durable_seq: int = 0  # highest seq durable on the backend
    issued: deque[tuple[int, int]] = field(default_factory=deque)  # (store counter, seq)
    upstream: Any = None  # the Edge (primary) or the primary's mirror link (secondary)
    waiting: deque[int] = field(default_factory=deque)  # upstream seqs not yet acked
    acked_seq: int = 0
    received_seq: int = 0  # highest seq admitted (applied, or gated behind the journal)
    floor: int = 0  # an Edge's acknowledged seq this Core lacks (after a failover): no gap
    hole: str | None = None  # a gap refused in the upstream stream, until it is filled
    failed: str | None = None  # the backend's sync failed: nothing more is acknowledged
    gate: deque[tuple[int, Write]] = field(default_factory=deque)  # (journal ticket, write)
    jlimit: int = 0  # suspended: highest seq whose journal records are durable
    jpending: tuple[int, int] | None = None  # (journal ticket, seq) for queue-to-journal
    mirror_q: deque[Write] = field(default_factory=deque)  # copies the peer has not acked
    mirror_bytes: int = 0
    mirror_acked: int = 0  # peer's durable seq in ``stream``
    mirror_link: Any = None  # sticky, so one LUN's copies never race on two links
    mirror_top: int = 0  # highest seq queued for the peer (it cannot acknowledge more)
    mirror_hole: bool = False  # writes applied but not mirrored since the last copy
    hole_seq: int = 0  # the newest write the peer gets by resync, not by mirror
    # mirror round trip (issue 15): set by core.metrics; while None nothing is timed
    on_mirror_rtt: Callable[[float], None] | None = None
    mirror_sent: deque[tuple[int, float]] = field(default_factory=deque)  # (seq, queued at)
    # resync (primary side)
    resync_regions: deque[int] = field(default_factory=deque)
    resync_inflight: deque[tuple[int, int, bool, int]] = field(default_factory=deque)
    resync_bytes: int = 0
    rseq: int = 0
    resync_on: Any = None  # the link this LUN's resync frames go out on
    rseq_prev: int = 0  # prev of the next resync frame on ``resync_on``
    # resync (secondary side): (store counter, rseq, link)
    resync_issued: deque[tuple[int, int, Any]] = field(default_factory=deque)
    resync_link: Any = None  # where resync frames for this LUN come from
    # region -> the primary's applied seq when it read that region for this resync
    resync_floor: dict[int, int] = field(default_factory=dict)
    resync_rb: int = 1 << 20
    resync_last: int = 0  # last rseq received on ``resync_link``
    writes: int = 0
    bytes_written: int = 0
    discards: int = 0
    bytes_discarded: int = 0
    last_end: int = 0  # end offset of the previous Edge write (sequential detection)

    @classmethod
    def restarted(cls, store: B, stream: int, seq: int) -> LunPipeline[B]:
        """After a start: everything up to the durable applied ``seq`` is here."""
        return cls(store, stream=stream, applied_seq=seq, durable_seq=seq, acked_seq=seq,
                   received_seq=seq, jlimit=seq)

    def switch_stream(self, stream: int) -> None:
        """A new sequence space (a new Edge blockstore): nothing of it is here yet."""
        self.stream = stream
        self.applied_seq = self.durable_seq = self.acked_seq = self.mirror_acked = 0
        self.jlimit = self.received_seq = self.floor = self.mirror_top = 0
        self.hole = None
        self.issued.clear()
        self.mirror_q.clear()
        self.mirror_sent.clear()
        self.mirror_bytes = 0

    # -- upstream ----------------------------------------------------------------------
    def admit(self, w: Write, *, resynced_hole_ok: bool = False) -> Order:
        """Classify an upstream write (:func:`order`) and, unless refused, take it in.

        ``resynced_hole_ok``: a secondary accepts a gap the primary marked
        :attr:`~steelfusion.wire.WriteFlags.HOLE_RESYNCED` (a resync fills it).
        """
        verdict = order(max(self.received_seq, self.floor), w.prev, w.seq)
        if verdict is Order.GAP and resynced_hole_ok and w.flags & WriteFlags.HOLE_RESYNCED:
            verdict = Order.NEXT
        elif verdict is Order.NEXT and self.received_seq < w.prev:
            self.mirror_hole = True  # accepted over the floor: the peer cannot get these
        if verdict is Order.NEXT:
            self.received_seq = w.seq
        return verdict

    def apply(self, w: Write) -> bool:
        """Write to the backend unless it has it (a resend); may raise ``OSError``."""
        if w.seq <= self.applied_seq:
            return False
        if w.flags & WriteFlags.DISCARD:
            counter = self.store.discard(w.offset, w.extent)
            self.discards += 1
            self.bytes_discarded += w.extent
        else:
            counter = self.store.pwrite(w.offset, w.data)
            self.writes += 1
            self.bytes_written += len(w.data)
        self.applied_seq = w.seq
        self.issued.append((counter, w.seq))
        self.store.request_sync()
        return True

    def skip_apply(self, w: Write) -> None:
        """(Peer) ``w`` is older than what a resync already wrote there: count it, skip it.

        Acknowledged with the next group commit, which also covers the resync
        data written before it.
        """
        if w.seq > self.applied_seq:
            self._applied_without_write(w.seq)

    def _applied_without_write(self, seq: int) -> None:
        """Take ``seq`` as applied with no backend write of its own.

        It becomes durable, and is sealed, with the next group commit (forced:
        there may be no write to trigger one), which covers every write
        issued before it.
        """
        self.applied_seq = seq
        self.issued.append((getattr(self.store, "written", 0), seq))
        self.store.request_sync(force=True)

    def durable_to(self, target: int) -> None:
        """The backend's group commit reached write counter ``target``."""
        while self.issued and self.issued[0][0] <= target:
            self.durable_seq = self.issued.popleft()[1]

    def sealed_seq(self) -> int | None:
        """The seq a group commit starting now makes durable (every issued write)."""
        return self.issued[-1][1] if self.issued else None

    def take_acks(self, limit: int) -> int | None:
        """Upstream writes now acknowledged (up to ``limit``): the newest, or None."""
        last = None
        while self.waiting and self.waiting[0] <= limit:
            last = self.waiting.popleft()
        if last is not None:
            self.acked_seq = max(self.acked_seq, last)
        return last

    # -- mirror (primary) --------------------------------------------------------------
    def wants_copy(self, w: Write) -> bool:
        """Must ``w`` be mirrored (the peer neither acknowledged nor has it queued)?"""
        return w.seq > self.mirror_acked and not (self.mirror_q and w.seq <= self.mirror_q[-1].seq)

    def not_mirrored(self, w: Write) -> None:
        """``w`` was applied without a copy (journaled): the peer gets it by resync."""
        if w.seq > self.mirror_acked:
            self.mirror_hole = True
            self.hole_seq = max(self.hole_seq, w.seq)

    def queue_copy(self, lun: int, w: Write, now: float | None = None) -> Write:
        """The copy of ``w`` for the secondary, queued until it acknowledges it.

        ``now`` (monotonic seconds) is when it is queued, sent at once while a mirror
        link is up: kept while metrics time the mirror round trip. A resend of the queue
        keeps the first time (the latency the write saw), so an ACK after a reconnection
        observes each copy once.
        """
        if now is not None and self.on_mirror_rtt is not None:
            sent = self.mirror_sent
            if not self.mirror_q:
                sent.clear()  # times of copies dropped since (a demotion clears the queue)
            if not sent or w.seq > sent[-1][0]:
                sent.append((w.seq, now))
        flags = WriteFlags.MIRROR | (w.flags & (WriteFlags.FUA | WriteFlags.DISCARD))
        if self.mirror_hole:
            flags |= WriteFlags.HOLE_RESYNCED
            self.mirror_hole = False
        copy = Write(lun, flags, w.stream, w.seq, w.offset, w.data, w.prev)
        self.mirror_q.append(copy)
        self.mirror_bytes += len(w.data)
        self.mirror_top = max(self.mirror_top, w.seq)
        return copy

    def ack_possible(self, seq: int) -> bool:
        """An ACK from the peer may only cover what was sent to it."""
        return seq <= max(self.mirror_top, self.mirror_acked)

    def mirror_acked_to(self, seq: int, now: float | None = None) -> list[Write]:
        """The peer has everything up to ``seq`` durable: release those copies.

        With ``now``, each released copy that was timed reports its round trip to
        :attr:`on_mirror_rtt`; a duplicate ACK releases nothing and reports nothing.
        """
        self.mirror_acked = max(self.mirror_acked, seq)
        out = []
        while self.mirror_q and self.mirror_q[0].seq <= self.mirror_acked:
            w = self.mirror_q.popleft()
            self.mirror_bytes -= len(w.data)
            out.append(w)
        sent = self.mirror_sent
        if sent:
            seen = self.on_mirror_rtt
            top = out[-1].seq if out else 0  # only copies released now: never a stale time
            while sent and sent[0][0] <= self.mirror_acked:
                s, t = sent.popleft()
                if s <= top and seen is not None and now is not None:
                    seen(now - t)
        return out

    def drop_copies(self) -> list[Write]:
        """Suspension: the queued copies will not be sent; their regions go to the journal."""
        out = list(self.mirror_q)
        if out:
            self.mirror_hole = True
            self.hole_seq = max(self.hole_seq, out[-1].seq)
        self.mirror_q.clear()
        self.mirror_sent.clear()
        self.mirror_bytes = 0
        self.mirror_link = None
        return out

    def mark_hole(self) -> None:
        """The next copy tells the secondary a resync fills what is before it."""
        if self.mirror_q:
            w = self.mirror_q[0]
            self.mirror_q[0] = Write(w.lun, w.flags | WriteFlags.HOLE_RESYNCED, w.stream, w.seq,
                                     w.offset, w.data, w.prev)
            self.hole_seq = max(self.hole_seq, w.prev)
        else:
            self.mirror_hole = True
            self.hole_seq = max(self.hole_seq, self.received_seq)

    def covered(self) -> int | None:
        """A resync finished: the seq the peer now has everything up to, if it must be told.

        Every write journaled instead of mirrored (up to :attr:`hole_seq`) is
        in a region the resync copied, so the peer's stream may jump there;
        writes after it reach the peer as copies, in order, as before.
        """
        seq = self.hole_seq
        q = self.mirror_q
        for i, w in enumerate(q):  # every hole before a queued copy is filled now
            if w.flags & WriteFlags.HOLE_RESYNCED:
                seq = max(seq, w.prev)
                q[i] = Write(w.lun, w.flags & ~WriteFlags.HOLE_RESYNCED, w.stream, w.seq,
                             w.offset, w.data, w.prev)
        self.hole_seq = 0
        self.mirror_hole = False
        return seq or None

    def advance(self, seq: int) -> bool:
        """(Peer) everything up to ``seq`` arrived by resync: take it as applied.

        Sealed with the next group commit like any applied write, so a
        restart does not forget it.
        """
        if seq <= self.received_seq and seq <= self.applied_seq:
            return False
        self.received_seq = max(self.received_seq, seq)
        if seq > self.applied_seq:
            self._applied_without_write(seq)
        self.hole = None
        return True

    def rewind(self, seq: int) -> bool:
        """(Peer) a resync is replacing our data with the primary's as of its ``seq``.

        Writes after ``seq`` that we applied in an earlier life of the primary
        (it lost them in a crash, or we are a demoted primary with writes it
        never had) may be overwritten by the resync; their copies must be
        applied again when the primary resends them, not skipped as
        duplicates. Sealed with the next group commit, like an applied write.
        """
        if seq >= self.received_seq and seq >= self.applied_seq:
            return False
        self.received_seq = seq
        self.durable_seq = min(self.durable_seq, seq)
        self.issued.clear()
        self._applied_without_write(seq)
        self.hole = None
        return True

    def requeue_resync(self) -> None:
        """The link carrying the resync frames is gone: copy their regions again."""
        again: list[int] = []
        for _, r, _, _ in self.resync_inflight:
            if not again or again[-1] != r:
                again.append(r)
        self.resync_regions.extendleft(reversed(again))
        self.resync_inflight.clear()
        self.resync_bytes = 0
        self.resync_on = None
        self.rseq_prev = 0

    def resend_reaches(self, have: int) -> bool:
        """Would resending the queue give a peer that has up to ``have`` no hole?"""
        head = self.mirror_q[0].prev if self.mirror_q else self.received_seq
        return head <= have


#: a LUN's pipeline over whichever backend the Core was handed (a LunStore, a simulated disk)
LunPipe = LunPipeline[Any]

__all__ = ["Backend", "LunPipe", "LunPipeline", "Order", "order"]
