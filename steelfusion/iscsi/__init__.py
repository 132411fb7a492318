"""iSCSI wire formats shared by the Edge target and test initiators.

``pdu`` is the PDU codec (RFC 7143 §11) and ``text`` the key=value codec and
operational-parameter negotiation (RFC 7143 §6, §13). Both are sans-IO: bytes
in, objects out, one error type (:class:`IscsiProtocolError`).
"""

from steelfusion.iscsi.pdu import IscsiProtocolError, PduDecoder, RejectReason

__all__ = ["IscsiProtocolError", "PduDecoder", "RejectReason"]
