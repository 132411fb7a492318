"""iSCSI wire formats shared by the Edge target and test initiators.

``pdu`` is the PDU codec (RFC 7143 §11), each header layout written once, as
the fields of its class, and compiled by ``bhs``; ``text`` is the key=value
codec and operational-parameter negotiation (RFC 7143 §6, §13). Both are
sans-IO: bytes in, objects out, one error type (:class:`IscsiProtocolError`).
"""

from steelfusion.iscsi.pdu import IscsiProtocolError, PduDecoder, RejectReason

__all__ = ["IscsiProtocolError", "PduDecoder", "RejectReason"]
