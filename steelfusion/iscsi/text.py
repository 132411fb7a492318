"""iSCSI text keys: the key=value codec and operational negotiation.

Text and Login PDUs carry ``key=value`` pairs, each terminated by a NUL
(RFC 7143 §6.1).  :class:`Negotiator` answers an initiator's offers the way a
target must (RFC 7143 §6.2, §13): list keys pick the first value we support,
numerical keys use Min/Max, booleans OR/AND, declaratives are recorded, keys
we do not know get ``NotUnderstood`` and session-only keys get ``Irrelevant``
in a discovery session.  Only keys the initiator offered are answered (plus
our MaxRecvDataSegmentLength declaration), since open-iscsi fails a login
whose response holds a key it did not expect.  :class:`InitiatorNegotiator`
is the other side, for ``steelfusion.iscsi.initiator``: it makes the offers
and checks that each answer follows the key's rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from steelfusion.iscsi.pdu import Buffer, IscsiProtocolError, RejectReason

KEY_NAME_MAX = 63
"""RFC 7143 §6.1: a key name is at most 63 bytes."""
VALUE_MAX = 8192
"""RFC 7143 §6.1 limits most values to 255 bytes; some (CHAP) to 8192."""

NOT_UNDERSTOOD = "NotUnderstood"
IRRELEVANT = "Irrelevant"
REJECT = "Reject"

Pairs = list[tuple[str, str]]

DEFAULT_MAX_BURST_LENGTH = 262144


def decode_text(data: Buffer) -> Pairs:
    """Split a text data segment into (key, value) pairs (RFC 7143 §6.1).

    Empty items (stray NULs, padding) are skipped.  Raises
    :class:`IscsiProtocolError` for a pair without ``=``, a non-UTF-8 byte or
    an over-long key or value.
    """
    out: Pairs = []
    for item in bytes(data).split(b"\0"):
        if not item:
            continue
        key, sep, value = item.partition(b"=")
        if not sep or not key:
            raise IscsiProtocolError(f"malformed text item {item[:40]!r}",
                                     RejectReason.INVALID_PDU_FIELD)
        if len(key) > KEY_NAME_MAX or len(value) > VALUE_MAX:
            raise IscsiProtocolError("text key or value too long",
                                     RejectReason.INVALID_PDU_FIELD)
        try:
            out.append((key.decode("utf-8"), value.decode("utf-8")))
        except UnicodeDecodeError as e:
            raise IscsiProtocolError("text is not UTF-8", RejectReason.INVALID_PDU_FIELD) from e
    return out


def encode_text(pairs: Iterable[tuple[str, str]]) -> bytes:
    """Join pairs as ``key=value\\0`` (RFC 7143 §6.1)."""
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)


def split_text(data: bytes, limit: int) -> list[bytes]:
    """Cut an encoded text segment into pieces of at most ``limit`` bytes.

    Used to fit a long Text/Login response in the initiator's
    MaxRecvDataSegmentLength with the C (continue) bit (RFC 7143 §11.11.2).
    Cuts fall on NUL boundaries when possible so each piece stays readable.
    """
    if limit <= 0:
        raise ValueError("limit must be positive")
    pieces = []
    while len(data) > limit:
        cut = data.rfind(b"\0", 0, limit) + 1
        if cut <= 0:
            cut = limit
        pieces.append(data[:cut])
        data = data[cut:]
    pieces.append(data)
    return pieces


def _parse_number(value: str) -> int | None:
    """A numerical-value: decimal, or hex with 0x (RFC 7143 §6.1)."""
    try:
        if value[:2] in ("0x", "0X"):
            return int(value[2:], 16)
        if value.isdigit():
            return int(value)
    except ValueError:
        return None
    return None


def _parse_bool(value: str) -> bool | None:
    return {"Yes": True, "No": False}.get(value)


@dataclass(frozen=True, slots=True)
class TargetLimits:
    """What this target supports and prefers in a negotiation."""

    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 1048576
    first_burst_length: int = 262144
    max_outstanding_r2t: int = 8
    initial_r2t: bool = False
    immediate_data: bool = True
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_connections: int = 1
    error_recovery_level: int = 0
    digests: tuple[str, ...] = ("CRC32C", "None")


@dataclass(frozen=True, slots=True)
class SessionParams:
    """Negotiated operational parameters; defaults are RFC 7143 §13's.

    ``max_recv_data_segment_length`` is the initiator's declaration (the most
    we may put in one PDU to it); ``target_max_recv_data_segment_length`` is
    ours (the most it may send us).
    """

    header_digest: bool = False
    data_digest: bool = False
    max_connections: int = 1
    initial_r2t: bool = True
    immediate_data: bool = True
    max_recv_data_segment_length: int = 8192
    target_max_recv_data_segment_length: int = 8192
    max_burst_length: int = DEFAULT_MAX_BURST_LENGTH
    first_burst_length: int = 65536
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0


# (result function, low, high, field name) for numerical keys (RFC 7143 §13).
_NUMERIC: dict[str, tuple[str, int, int, str]] = {
    "MaxConnections": ("min", 1, 65535, "max_connections"),
    "MaxBurstLength": ("min", 512, 2**24 - 1, "max_burst_length"),
    "FirstBurstLength": ("min", 512, 2**24 - 1, "first_burst_length"),
    "DefaultTime2Wait": ("max", 0, 3600, "default_time2wait"),
    "DefaultTime2Retain": ("min", 0, 3600, "default_time2retain"),
    "MaxOutstandingR2T": ("min", 1, 65535, "max_outstanding_r2t"),
    "ErrorRecoveryLevel": ("min", 0, 2, "error_recovery_level"),
}
# (result function, field name) for boolean keys.
_BOOLEAN: dict[str, tuple[str, str]] = {
    "InitialR2T": ("or", "initial_r2t"),
    "ImmediateData": ("and", "immediate_data"),
    "DataPDUInOrder": ("or", "data_pdu_in_order"),
    "DataSequenceInOrder": ("or", "data_sequence_in_order"),
}
# Keys that mean nothing in a discovery session (RFC 7143 §13 "Irrelevant when").
DISCOVERY_IRRELEVANT = frozenset({
    "MaxConnections", "InitialR2T", "ImmediateData", "MaxBurstLength", "FirstBurstLength",
    "MaxOutstandingR2T", "DataPDUInOrder", "DataSequenceInOrder", "TaskReporting",
})
# Declarative keys the initiator sends; the session records them, no answer.
INITIATOR_DECLARATIVE = frozenset({"InitiatorName", "InitiatorAlias", "TargetName",
                                   "SessionType"})
# Keys only a target may send.
TARGET_ONLY = frozenset({"TargetAlias", "TargetAddress", "TargetPortalGroupTag"})


class Negotiator:
    """Target side of operational parameter negotiation (RFC 7143 §6.2, §13).

    Feed each Login/Text request's pairs (less the declaratives the session
    handles) to :meth:`respond`; read the outcome from :attr:`params`.
    """

    def __init__(self, limits: TargetLimits | None = None, discovery: bool = False) -> None:
        self.limits = limits or TargetLimits()
        self.discovery = discovery
        self._values: dict[str, object] = {
            "target_max_recv_data_segment_length": self.limits.max_recv_data_segment_length}
        self._declared = False

    def declarations(self) -> Pairs:
        """Our own declaratives, once per login (ctld and LIO always declare
        MaxRecvDataSegmentLength)."""
        if self._declared:
            return []
        self._declared = True
        return [("MaxRecvDataSegmentLength", str(self.limits.max_recv_data_segment_length))]

    def respond(self, pairs: Sequence[tuple[str, str]]) -> Pairs:
        """Answers for one batch of offers, in offer order."""
        out: Pairs = []
        lim = self.limits
        for key, value in pairs:
            if value in (NOT_UNDERSTOOD, IRRELEVANT, REJECT):
                continue  # an answer to an offer we never made
            if key in INITIATOR_DECLARATIVE:
                continue
            if key in TARGET_ONLY:
                out.append((key, REJECT))
            elif self.discovery and key in DISCOVERY_IRRELEVANT:
                out.append((key, IRRELEVANT))
            elif key in ("HeaderDigest", "DataDigest"):
                choice = next((v for v in value.split(",") if v in lim.digests), None)
                if choice is None:
                    out.append((key, REJECT))
                else:
                    self._values["header_digest" if key == "HeaderDigest" else "data_digest"] = \
                        choice == "CRC32C"
                    out.append((key, choice))
            elif key == "MaxRecvDataSegmentLength":
                n = _parse_number(value)
                if n is None or not 512 <= n <= 2**24 - 1:
                    out.append((key, REJECT))
                else:
                    self._values["max_recv_data_segment_length"] = n
            elif key in _NUMERIC:
                fn, lo, hi, name = _NUMERIC[key]
                n = _parse_number(value)
                if n is None or not lo <= n <= hi:
                    out.append((key, REJECT))
                    continue
                ours = getattr(lim, name)
                result = min(n, ours) if fn == "min" else max(n, ours)
                if key == "FirstBurstLength":
                    result = min(result, self._mbl())
                self._values[name] = result
                out.append((key, str(result)))
            elif key in _BOOLEAN:
                fn, name = _BOOLEAN[key]
                b = _parse_bool(value)
                if b is None:
                    out.append((key, REJECT))
                    continue
                ours_b = getattr(lim, name)
                result_b = (b or ours_b) if fn == "or" else (b and ours_b)
                self._values[name] = result_b
                out.append((key, "Yes" if result_b else "No"))
            elif key in ("IFMarker", "OFMarker"):
                out.append((key, "No"))  # markers are gone from RFC 7143; ctld says No
            elif key in ("IFMarkInt", "OFMarkInt"):
                out.append((key, IRRELEVANT))
            elif key == "iSCSIProtocolLevel":
                n = _parse_number(value)
                out.append((key, REJECT if n is None or n > 31 else str(min(n, 1))))
            elif key == "TaskReporting":
                out.append((key, "RFC3720"))
            elif key == "SendTargets":
                out.append((key, IRRELEVANT))  # only in Full Feature Phase
            else:
                out.append((key, NOT_UNDERSTOOD))
        # FirstBurstLength must not exceed MaxBurstLength (RFC 7143 §13.14),
        # whichever order the two keys came in, and also when only
        # MaxBurstLength was offered (the default FirstBurstLength is 65536).
        fbl = self._values.get("first_burst_length", SessionParams().first_burst_length)
        if isinstance(fbl, int) and fbl > self._mbl():
            self._values["first_burst_length"] = self._mbl()
            out = [(k, str(self._mbl())) if k == "FirstBurstLength" else (k, v) for k, v in out]
        return out

    def _mbl(self) -> int:
        v = self._values.get("max_burst_length", DEFAULT_MAX_BURST_LENGTH)
        return v if isinstance(v, int) else DEFAULT_MAX_BURST_LENGTH

    @property
    def params(self) -> SessionParams:
        """The negotiated result so far (defaults for keys not negotiated)."""
        return replace(SessionParams(), **self._values)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class InitiatorLimits:
    """What an initiator offers in its login (RFC 7143 §13); the target
    answers with the values both will use.  Defaults follow open-iscsi and
    libiscsi: no R2T for the first burst, immediate data, 256 KiB segments."""

    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 16776192
    first_burst_length: int = 262144
    max_outstanding_r2t: int = 16
    initial_r2t: bool = False
    immediate_data: bool = True
    header_digest: bool = False
    data_digest: bool = False


class NegotiationError(Exception):
    """The target answered an offer with a value the rules do not allow
    (RFC 7143 §6.2: a result outside the offered range ends the login)."""


# Keys the initiator offers and the target must answer (RFC 7143 §13).
_INITIATOR_OFFERS = ("HeaderDigest", "DataDigest", "InitialR2T", "ImmediateData",
                     "MaxBurstLength", "FirstBurstLength", "MaxOutstandingR2T",
                     "ErrorRecoveryLevel", "MaxConnections", "DataPDUInOrder",
                     "DataSequenceInOrder")


class InitiatorNegotiator:
    """Initiator side of operational negotiation (RFC 7143 §6.2, §13).

    :meth:`offers` are the keys of our first operational Login Request;
    :meth:`take` checks each batch of the target's answers (and answers what
    the target offers on its own); :attr:`params` is the outcome, in the
    target's terms of :class:`SessionParams`: ``max_recv_data_segment_length``
    is our declaration (what the target may send us),
    ``target_max_recv_data_segment_length`` the target's (what we may send).
    """

    def __init__(self, limits: InitiatorLimits | None = None) -> None:
        self.limits = lim = limits or InitiatorLimits()
        if lim.first_burst_length > lim.max_burst_length:
            raise ValueError("FirstBurstLength must not exceed MaxBurstLength")
        self._offered: dict[str, str] = {}
        self._values: dict[str, object] = {
            "max_recv_data_segment_length": lim.max_recv_data_segment_length}
        self.declared: dict[str, str] = {}
        """The target's declaratives (TargetAlias, TargetPortalGroupTag, ...)."""

    def offers(self) -> Pairs:
        lim = self.limits
        yes = {True: "Yes", False: "No"}
        offered = {
            "HeaderDigest": "CRC32C,None" if lim.header_digest else "None",
            "DataDigest": "CRC32C,None" if lim.data_digest else "None",
            "InitialR2T": yes[lim.initial_r2t], "ImmediateData": yes[lim.immediate_data],
            "MaxBurstLength": str(lim.max_burst_length),
            "FirstBurstLength": str(lim.first_burst_length),
            "MaxOutstandingR2T": str(lim.max_outstanding_r2t),
            "ErrorRecoveryLevel": "0", "MaxConnections": "1",
            "DataPDUInOrder": "Yes", "DataSequenceInOrder": "Yes"}
        self._offered = offered
        return [*((k, offered[k]) for k in _INITIATOR_OFFERS),
                ("MaxRecvDataSegmentLength", str(lim.max_recv_data_segment_length))]

    def take(self, pairs: Sequence[tuple[str, str]]) -> Pairs:
        """Record the target's answers; return our answers to keys it offered."""
        out: Pairs = []
        for key, value in pairs:
            mine = self._offered.get(key)
            if key in ("TargetAlias", "TargetPortalGroupTag", "TargetAddress"):
                self.declared[key] = value
            elif key == "MaxRecvDataSegmentLength":
                n = _parse_number(value)
                if n is None or not 512 <= n <= 2**24 - 1:
                    raise NegotiationError(f"target MaxRecvDataSegmentLength={value[:20]!r}")
                self._values["target_max_recv_data_segment_length"] = n
            elif value in (NOT_UNDERSTOOD, IRRELEVANT, REJECT):
                continue  # the key keeps its RFC default (no digests, ERL 0, ...)
            elif mine is not None:
                self._answer(key, value, mine)
            elif key in _NUMERIC or key in _BOOLEAN:
                # The target offers a key we did not: answer with the RFC
                # defaults as our own value (RFC 7143 §6.2).
                ours = getattr(SessionParams(), (_NUMERIC.get(key) or _BOOLEAN[key])[-1])
                mine = ("Yes" if ours else "No") if isinstance(ours, bool) else str(ours)
                self._answer(key, value, mine, offer=True)
                out.append((key, self._render(key)))
            else:
                out.append((key, NOT_UNDERSTOOD))
        fbl = self._values.get("first_burst_length", SessionParams().first_burst_length)
        mbl = self._values.get("max_burst_length", DEFAULT_MAX_BURST_LENGTH)
        if isinstance(fbl, int) and isinstance(mbl, int) and fbl > mbl:
            raise NegotiationError(f"FirstBurstLength {fbl} > MaxBurstLength {mbl}")
        if self._values.get("error_recovery_level", 0) != 0:
            raise NegotiationError("ErrorRecoveryLevel must be 0")
        return out

    def _answer(self, key: str, value: str, mine: str, offer: bool = False) -> None:
        """One answer to our offer ``mine`` (or, with ``offer``, one offer of
        the target's answered with ``mine``): check it, keep the result."""
        if key in ("HeaderDigest", "DataDigest"):
            if value not in mine.split(","):
                raise NegotiationError(f"{key}={value[:20]!r} was not offered")
            self._values["header_digest" if key == "HeaderDigest" else "data_digest"] = \
                value == "CRC32C"
        elif key in _NUMERIC:
            fn, lo, hi, name = _NUMERIC[key]
            n, m = _parse_number(value), _parse_number(mine)
            if n is None or m is None or not lo <= n <= hi:
                raise NegotiationError(f"{key}={value[:20]!r}")
            if offer:
                n = min(n, m) if fn == "min" else max(n, m)
            elif n > m if fn == "min" else n < m:
                raise NegotiationError(f"{key}={n} where we offered {m}")
            self._values[name] = n
        elif key in _BOOLEAN:
            fn, name = _BOOLEAN[key]
            b, m_b = _parse_bool(value), _parse_bool(mine)
            if b is None or m_b is None:
                raise NegotiationError(f"{key}={value[:20]!r}")
            if offer:
                b = (b or m_b) if fn == "or" else (b and m_b)
            elif b != ((b or m_b) if fn == "or" else (b and m_b)):
                raise NegotiationError(f"{key}={value} breaks the {fn.upper()} rule")
            self._values[name] = b

    def _render(self, key: str) -> str:
        v = self._values[(_NUMERIC.get(key) or _BOOLEAN[key])[-1]]
        return ("Yes" if v else "No") if isinstance(v, bool) else str(v)

    @property
    def params(self) -> SessionParams:
        """The negotiated result so far (RFC defaults for keys not answered)."""
        return replace(SessionParams(), **self._values)  # type: ignore[arg-type]


def send_targets(value: str, targets: Sequence[tuple[str, Sequence[str]]],
                 current: str | None) -> Pairs:
    """Answer a ``SendTargets`` request (RFC 7143 Appendix C).

    ``targets`` lists (target name, ["host:port,tpgt", ...]).  ``All`` lists
    every target; an empty value means the session's own target (normal
    sessions only); a target name lists that target.  Anything else gets
    ``SendTargets=Reject`` so libiscsi's invalid-request tests see a failure.
    """
    if value == "All":
        chosen = list(targets)
    elif value == "":
        chosen = [t for t in targets if t[0] == current] if current else []
        if not chosen:
            return [("SendTargets", REJECT)]
    else:
        chosen = [t for t in targets if t[0] == value]
        if not chosen:
            return [("SendTargets", REJECT)]
    out: Pairs = []
    for name, addresses in chosen:
        out.append(("TargetName", name))
        out.extend(("TargetAddress", a) for a in addresses)
    return out
