"""Text Request/Response exchanges in Full Feature Phase, sans-IO (RFC 7143 §11.10-11).

A Text Request may be continued over several PDUs (C bit), each answered by
an empty Text Response with a Target Transfer Tag; a long answer goes out in
pieces of at most the initiator's MaxRecvDataSegmentLength, the next piece
when the initiator sends an empty request with the TTT we gave (§11.10.4).
A new request abandons an unfinished answer.  :class:`TextExchange` keeps
that state; which keys are answered, and how (SendTargets, Appendix C), is up
to :class:`~edge.iscsi_session.TargetConnection`, which also builds the PDUs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from steelfusion.iscsi.pdu import RESERVED_TAG, IscsiProtocolError, RejectReason, TextRequest
from steelfusion.iscsi.text import Pairs, decode_text, encode_text, split_text

TEXT_MAX_BYTES = 65536
"""Text we accept across continued Text Requests."""


@dataclass(frozen=True, slots=True)
class TextReply:
    """The Text Response to send: its TTT, F and C bits and data."""

    ttt: int
    final: bool
    cont: bool
    data: bytes


class TextExchange:
    """One connection's Text exchanges; ``new_ttt`` allocates Target
    Transfer Tags (shared with R2Ts)."""

    def __init__(self, new_ttt: Callable[[], int]) -> None:
        self._new_ttt = new_ttt
        self._buf = bytearray()
        self._more: list[bytes] = []
        self._ttt = RESERVED_TAG

    def receive(self, pdu: TextRequest) -> TextReply | Pairs | RejectReason:
        """Take a Text Request: a reply to send now, the keys of a whole
        request (to answer through :meth:`answer`), or why to Reject it."""
        if pdu.ttt != RESERVED_TAG:
            if pdu.ttt != self._ttt:
                return RejectReason.INVALID_PDU_FIELD
            if self._more:  # initiator asks for the rest of a long answer
                return self._piece()
        elif self._more:
            self._more = []  # a new request resets an unfinished answer
        if len(self._buf) + len(pdu.data) > TEXT_MAX_BYTES:
            self._buf = bytearray()
            return RejectReason.PROTOCOL_ERROR
        self._buf += pdu.data
        if pdu.cont:
            self._ttt = self._new_ttt()
            return TextReply(self._ttt, final=False, cont=False, data=b"")
        raw = bytes(self._buf)
        self._buf = bytearray()
        try:
            return decode_text(raw)
        except IscsiProtocolError:
            return RejectReason.INVALID_PDU_FIELD

    def answer(self, pairs: Pairs, max_recv_data_segment_length: int) -> TextReply:
        """The first piece of the answer ``pairs``; the rest waits for the
        initiator to ask."""
        self._more = split_text(encode_text(pairs), max_recv_data_segment_length)
        return self._piece()

    def _piece(self) -> TextReply:
        piece = self._more.pop(0)
        more = bool(self._more)
        self._ttt = self._new_ttt() if more else RESERVED_TAG
        return TextReply(self._ttt, final=not more, cont=more, data=piece)
