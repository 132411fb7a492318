"""The Core <-> Witness request/reply schema, carried in :class:`steelfusion.wire.Control` frames.

A Core dials the Witness and says who it is::

    Hello(node, role, purpose="witness", epoch, info={"pair": PAIR_ID})

and is answered with ``Welcome(witness_name, "witness", pair_epoch,
info={"lease_seconds": L, "pair": PAIR_ID, "holder": NAME|None, "reason": ...})``
(a stale Core learns the newer epoch right there, DESIGN.md invariant 2), or a
``Refuse`` (``bad-purpose``, ``pair-full``, ``bad-hello``).

Then requests, one JSON object each (``req`` is the Core's id, echoed back)::

    {"op": "suspend"|"release"|"failover"|"reach"|"terminate"|"heartbeat",
     "req": N, "pair": PAIR_ID, "epoch": E, "peer": NAME}

``pair`` defaults to the HELLO's pair; ``epoch`` is required for suspend and
failover; ``peer`` names the Core that must be unreachable for a failover, or
the Core asked about by ``reach``. Every request (and every frame at all)
renews the sender's lease. Replies::

    {"op": "reply", "req": N, "granted": bool, "reason": CODE, "detail": TEXT,
     "epoch": PAIR_EPOCH, "holder": NAME|null, "holds": bool,
     "reachable": bool|null, "known": bool|null, "retry_in": SECONDS (refusals only)}

``retry_in``, on a refusal that time will lift (the peer's lease is still live, the
Witness's restart grace), says in how many seconds asking again may succeed.
``holds`` tells the Core whether it holds the approval now, so a Core whose
approval was revoked by a failover learns it on its next heartbeat.

Sans-IO: these functions only build and check dicts; they raise
:class:`ProtocolError` (the peer broke the schema) and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

OPS = ("suspend", "release", "failover", "reach", "terminate", "heartbeat")
MAX_REQ = 2**63 - 1
MAX_TEXT = 256


class ProtocolError(Exception):
    """A request or reply body does not follow the schema; ``code`` goes in the reply."""

    def __init__(self, message: str, code: str = "bad-request") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class WireRequest:
    op: str
    req: int
    pair: str | None = None
    epoch: int | None = None
    peer: str | None = None

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op, "req": self.req}
        if self.pair is not None:
            out["pair"] = self.pair
        if self.epoch is not None:
            out["epoch"] = self.epoch
        if self.peer is not None:
            out["peer"] = self.peer
        return out


@dataclass(frozen=True, slots=True)
class WireReply:
    req: int
    granted: bool
    reason: str
    epoch: int
    detail: str = ""
    holder: str | None = None
    holds: bool = False
    reachable: bool | None = None
    known: bool | None = None
    retry_in: float | None = None

    def body(self) -> dict[str, Any]:
        out = {"op": "reply", "req": self.req, "granted": self.granted, "reason": self.reason,
               "detail": self.detail, "epoch": self.epoch, "holder": self.holder,
               "holds": self.holds, "reachable": self.reachable, "known": self.known}
        if self.retry_in is not None:
            out["retry_in"] = self.retry_in
        return out


def _opt_text(body: dict[str, Any], key: str) -> str | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or not v or len(v) > MAX_TEXT:
        raise ProtocolError(f"{key!r} must be a non-empty string of at most {MAX_TEXT} chars")
    return v


def _opt_int(body: dict[str, Any], key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_REQ:
        raise ProtocolError(f"{key!r} must be an integer in 0..2^63-1")
    return v


def request_id(body: Any) -> int | None:
    """The ``req`` of a body, if it has a usable one (to answer even a bad request)."""
    if isinstance(body, dict):
        v = body.get("req")
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_REQ:
            return v
    return None


def parse_request(body: Any) -> WireRequest:
    if not isinstance(body, dict):
        raise ProtocolError("request body is not an object")
    op = body.get("op")
    if op not in OPS:
        raise ProtocolError(f"unknown op {op!r}; known: {', '.join(OPS)}", "unknown-op")
    req = _opt_int(body, "req")
    if req is None:
        raise ProtocolError("missing 'req'")
    epoch = _opt_int(body, "epoch")
    peer = _opt_text(body, "peer")
    if op in ("suspend", "failover") and epoch is None:
        raise ProtocolError(f"{op} needs an 'epoch'")
    if op == "reach" and peer is None:
        raise ProtocolError("reach needs a 'peer'")
    return WireRequest(op=op, req=req, pair=_opt_text(body, "pair"), epoch=epoch, peer=peer)


def parse_reply(body: Any) -> WireReply:
    if not isinstance(body, dict) or body.get("op") != "reply":
        raise ProtocolError("not a reply")
    req = _opt_int(body, "req")
    epoch = _opt_int(body, "epoch")
    granted = body.get("granted")
    reason = body.get("reason")
    if req is None or epoch is None or not isinstance(granted, bool) or not isinstance(reason, str):
        raise ProtocolError("reply needs req, epoch, granted and reason")
    holder = body.get("holder")
    reachable = body.get("reachable")
    known = body.get("known")
    detail = body.get("detail", "")
    retry_in = body.get("retry_in")
    if not (isinstance(retry_in, int | float) and not isinstance(retry_in, bool)
            and 0 <= retry_in < 86400):
        retry_in = None  # advice only: a bad value is dropped, not a protocol error
    return WireReply(req=req, granted=granted, reason=reason, epoch=epoch,
                     detail=detail if isinstance(detail, str) else "",
                     holder=holder if isinstance(holder, str) else None,
                     holds=body.get("holds") is True,
                     reachable=reachable if isinstance(reachable, bool) else None,
                     known=known if isinstance(known, bool) else None,
                     retry_in=None if retry_in is None else float(retry_in))
