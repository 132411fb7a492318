"""The Edge's shipping rules, sans-IO: what to send to the primary Core, in what frames.

DESIGN.md write path step 2: writes go to the primary in the hosts' order per
LUN. :class:`Shipper` holds the queue of uncommitted writes, coalesces
contiguous runs into frames of at most 512 KiB (seed 002, "replication
metrics"), keeps at most ``window_bytes`` in flight, chains every frame to
the one before it with ``prev`` (so the Core can tell a resend from a hole,
:mod:`core.pipeline`), and frees the window on the Core's cumulative ACKs.
:class:`edge.uplink.CoreUplink` drives it from a socket; the seeded
simulation drives it from a simulated network.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

COALESCE_BYTES = 512 * 1024
BATCH_BYTES = 4 << 20


class Rec(Protocol):
    """A write in the blockstore (:class:`edge.blockstore.Record`)."""

    @property
    def lun(self) -> int: ...
    @property
    def seq(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def discard(self) -> int: ...  # a discard's range (length 0): shipped alone, never coalesced


@dataclass(slots=True)
class Frame:
    """One WRITE to send: the run ``recs`` (contiguous, in order) as one payload."""

    lun: int
    seq: int  # the run's last seq
    prev: int  # the seq before the run's first, as far as the Core is concerned
    offset: int
    recs: list[Rec]
    nbytes: int


@dataclass(slots=True)
class Shipper:
    window_bytes: int
    coalesce_bytes: int = COALESCE_BYTES
    batch_bytes: int = BATCH_BYTES
    send_q: deque[Rec] = field(default_factory=deque)
    inflight_bytes: int = 0
    unshipped_bytes: int = 0  # queued, not yet framed
    # lun -> frames in flight: (seq, bytes, writes, sent at)
    frames: dict[int, deque[tuple[int, int, int, float]]] = field(default_factory=dict)
    prev: dict[int, int] = field(default_factory=dict)  # lun -> last seq shipped
    # Edge->ack latency (issue 15): set by edge.metrics, called as
    # (lun, seconds, writes) once per acknowledged frame; while None nothing is timed
    on_commit: Callable[[int, float, int], None] | None = None

    def reset(self, uncommitted: Iterable[Rec], committed: Mapping[int, int]) -> None:
        """A new connection: everything uncommitted goes again, in order."""
        self.send_q = deque(uncommitted)
        self.unshipped_bytes = sum(r.length for r in self.send_q)
        self.frames.clear()
        self.prev = dict(committed)  # the Core has everything up to these
        self.inflight_bytes = 0

    def append(self, rec: Rec) -> None:
        self.send_q.append(rec)
        self.unshipped_bytes += rec.length

    def next_frames(self, committed: Mapping[int, int], now: float = 0.0) -> list[Frame]:
        """Frames to send now, within the window and one batch; ``now`` (monotonic
        seconds, one reading per batch) dates them for :attr:`on_commit`."""
        out: list[Frame] = []
        size = 0
        q = self.send_q
        while q and self.inflight_bytes < self.window_bytes and size < self.batch_bytes:
            rec = q.popleft()
            self.unshipped_bytes -= rec.length
            lun = rec.lun
            floor = committed.get(lun, 0)
            if rec.seq <= floor:
                continue  # committed meanwhile
            # Coalesce a run of contiguous writes to one LUN, in order, into one frame. It
            # carries the run's last seq: a Core that already applied part of the run
            # re-applies those same bytes, and nothing newer can have touched them.
            recs = [rec]
            n = rec.length
            last = rec
            while q and not rec.discard:
                nxt = q[0]
                if (nxt.lun != lun or nxt.offset != last.offset + last.length or nxt.discard
                        or n + nxt.length > self.coalesce_bytes or nxt.seq <= floor):
                    break
                last = q.popleft()
                recs.append(last)
                n += last.length
                self.unshipped_bytes -= last.length
            # the write before this frame: the last one shipped here, or one the Core has
            # acknowledged since (it has everything up to ``committed``)
            prev = max(self.prev.get(lun, 0), floor)
            self.prev[lun] = last.seq
            out.append(Frame(lun, last.seq, prev, rec.offset, recs, n))
            fr = self.frames.get(lun)
            if fr is None:
                fr = self.frames[lun] = deque()
            fr.append((last.seq, n, len(recs), now))
            self.inflight_bytes += n
            size += n
        return out

    def on_ack(self, lun: int, seq: int, now: float | None = None) -> int:
        """The Core has ``lun`` up to ``seq``: frames up to it leave the window.

        With ``now``, each frame reports its writes' latency to :attr:`on_commit` (one
        call per frame, weighted by its writes). A frame is in flight once: a
        reconnection resends what is uncommitted as new frames, dated anew.
        """
        fr = self.frames.get(lun)
        freed = 0
        seen = self.on_commit
        while fr and fr[0][0] <= seq:
            _, n, writes, sent = fr.popleft()
            freed += n
            if seen is not None and now is not None:
                seen(lun, now - sent, writes)
        self.inflight_bytes -= freed
        if self.inflight_bytes < 0:
            raise AssertionError(f"in-flight bytes below zero ({self.inflight_bytes})")
        return freed

    @property
    def more(self) -> bool:
        """Queued writes that the window would let go now."""
        return bool(self.send_q) and self.inflight_bytes < self.window_bytes


__all__ = ["COALESCE_BYTES", "Frame", "Rec", "Shipper"]
