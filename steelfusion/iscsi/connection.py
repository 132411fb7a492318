"""What both ends of an iSCSI connection share, sans-IO (RFC 7143).

The Edge's target (:class:`edge.iscsi_session.TargetConnection`) and the
Core's initiator (:class:`steelfusion.iscsi.initiator.InitiatorConnection`)
take bytes in the same way (whole buffers, or an asyncio
``BufferedProtocol``'s :meth:`~PduConnection.get_buffer` and
:meth:`~PduConnection.buffer_updated`), decode them with one
:class:`~steelfusion.iscsi.pdu.PduDecoder`, queue what they send as buffers
for ``writelines`` and switch digests on after the login in the same way.
:class:`PduConnection` is that plumbing, written once; what each end does
with a PDU is its own :meth:`~PduConnection._process`.  The sequence numbers
both ends keep (CmdSN, StatSN) compare as serial numbers (:func:`sn_gt`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from typing import Generic, TypeVar

from steelfusion.iscsi.pdu import Buffer, Pdu, PduDecoder
from steelfusion.iscsi.text import SessionParams

_M = 0xFFFFFFFF

E = TypeVar("E")


def sn_lt(a: int, b: int) -> bool:
    """Serial-number a < b for 32-bit sequence numbers (RFC 1982, RFC 7143 §4.2.2.1)."""
    return a != b and ((b - a) & _M) < 0x80000000


def sn_gt(a: int, b: int) -> bool:
    """Serial-number a > b (RFC 1982, RFC 7143 §4.2.2.1)."""
    return a != b and ((a - b) & _M) < 0x80000000


class PduConnection(ABC, Generic[E]):
    """Bytes in, events of type ``E`` out, buffers queued for the wire.

    ``max_recv_data_segment_length`` is what this end declares at login; until
    the login has settled the real limit, the decoder takes data segments up
    to that (at least 8192) plus 4 KiB of slack.  ``accept`` are the opcodes
    the peer may send (a target's PDUs to an initiator and the reverse).
    """

    def __init__(self, max_recv_data_segment_length: int, accept: Collection[int]) -> None:
        self._decoder = PduDecoder(
            max_data_segment_length=max(max_recv_data_segment_length, 8192) + 4096,
            accept=accept)
        self._out: list[Buffer] = []
        self._events: list[E] = []
        self._hd = False
        self._dd = False

    @property
    @abstractmethod
    def closed(self) -> bool:
        """The connection is over: received bytes are ignored."""

    @abstractmethod
    def _process(self) -> list[E]:
        """Act on the PDUs the decoder holds; returns the events they made."""

    def receive_data(self, data: Buffer) -> list[E]:
        """Process bytes from the peer; returns events.  Raises the end's
        protocol error when the connection must be dropped."""
        if self.closed:
            return []
        self._decoder.add(data)
        return self._process()

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """For an asyncio ``BufferedProtocol``: where to receive the next bytes
        (large data segments land straight in their PDU's own buffer)."""
        return self._decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> list[E]:
        """:meth:`receive_data` for bytes received into :meth:`get_buffer`."""
        if self.closed:
            return []
        self._decoder.buffer_updated(nbytes)
        return self._process()

    def data_to_send(self) -> list[Buffer]:
        """Buffers queued for the wire since the last call (for writelines)."""
        out = self._out
        self._out = []
        return out

    def _send(self, pdu: Pdu) -> None:
        self._out.extend(pdu.encode_parts(self._hd, self._dd))

    def _start_digests(self, params: SessionParams) -> None:
        """Digests as negotiated, from the first PDU after the final Login
        Response on, both ways (RFC 7143 §13.1)."""
        self._hd = self._decoder.header_digest = params.header_digest
        self._dd = self._decoder.data_digest = params.data_digest
