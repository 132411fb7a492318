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


__all__ = ["Order", "order"]
