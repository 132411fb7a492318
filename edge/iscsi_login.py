"""The login phase of an iSCSI target connection, sans-IO (RFC 7143 §6, §11.12-13, §12).

:class:`LoginPhase` holds what one connection learns while it logs in (who
the initiator is, which target it wants, how far the security exchange has
gone, the operational keys negotiated so far) and decides how to answer each
Login Request.  It never builds a PDU: :meth:`LoginPhase.step` returns a
:class:`LoginReply` (text, transit bit, status) and the connection, which
owns the sequence numbers, turns it into the Login Response, closes on a
failure and enters Full Feature Phase on the final answer.

The security stage is skipped unless the :class:`~edge.iscsi_config.Authenticator`
demands it; operational negotiation is ``steelfusion.iscsi.text.Negotiator``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from edge.iscsi_config import Authenticator, AuthExchange, TargetInfo
from steelfusion.iscsi.pdu import IscsiProtocolError, LoginRequest
from steelfusion.iscsi.text import (
    REJECT,
    Negotiator,
    Pairs,
    SessionParams,
    TargetLimits,
    decode_text,
    encode_text,
)

LOGIN_TEXT_MAX_BYTES = 65536
"""Login text we accept across continued Login Requests (§11.12.3)."""


class LoginStatus(enum.IntEnum):
    """Login Response status class/detail (RFC 7143 §11.13.5)."""

    SUCCESS = 0x0000
    INITIATOR_ERROR = 0x0200
    AUTH_FAILURE = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    NOT_FOUND = 0x0203
    UNSUPPORTED_VERSION = 0x0205
    MISSING_PARAMETER = 0x0207
    SESSION_TYPE_UNSUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300


@dataclass(frozen=True, slots=True)
class LoginReply:
    """How to answer one Login Request.  A nonzero ``status`` refuses the
    login (``reason`` is for the log, without secrets): the connection
    answers with that status and closes.  Otherwise ``transit`` to NSG=3
    is the final answer, after which the connection is in Full Feature
    Phase."""

    data: bytes
    transit: bool
    status: int = LoginStatus.SUCCESS
    reason: str = ""


class LoginPhase:
    """One connection's login: Login Requests in, :class:`LoginReply` out.

    ``targets`` are the target nodes an initiator may name, ``authenticator``
    the access list and authentication hook (None: anyone, no secret),
    ``portal_group_tag`` what we declare as TargetPortalGroupTag.
    """

    def __init__(self, targets: Mapping[str, TargetInfo], authenticator: Authenticator | None,
                 portal_group_tag: int, limits: TargetLimits) -> None:
        self._targets = targets
        self._authenticator = authenticator
        self._portal_group_tag = portal_group_tag
        self.started = False
        """A first Login Request was seen (it set ISID, CID and the numbering)."""
        self.isid = 0
        self.cid = 0
        self.initiator_name: str | None = None
        self.initiator_alias: str | None = None
        self.target: TargetInfo | None = None
        self.session_type = "Normal"
        self.discovery = False
        self._buf = bytearray()
        self._stage: int | None = None
        self._negotiator = Negotiator(limits)
        self._auth_method: str | None = None
        self._auth: AuthExchange | None = None
        self._authenticated = False

    @property
    def params(self) -> SessionParams:
        """The operational parameters negotiated so far."""
        return self._negotiator.params

    def step(self, pdu: LoginRequest) -> LoginReply:
        """Take one Login Request; return its answer."""
        first = not self.started
        if first:
            self.started = True
            self.isid = pdu.isid
            self.cid = pdu.cid
        elif pdu.isid != self.isid or pdu.tsih != 0:
            return _fail(LoginStatus.INITIATOR_ERROR, "ISID/TSIH changed during login")
        if pdu.version_min > 0 or pdu.version_max < pdu.version_min:
            return _fail(LoginStatus.UNSUPPORTED_VERSION, "unsupported version")
        if pdu.tsih != 0:
            # Adding a connection to a session: we negotiate MaxConnections=1.
            return _fail(LoginStatus.SESSION_DOES_NOT_EXIST, "unknown TSIH")
        if len(self._buf) + len(pdu.data) > LOGIN_TEXT_MAX_BYTES:
            return _fail(LoginStatus.INITIATOR_ERROR, "login text too long")
        self._buf += pdu.data
        if pdu.cont:
            # More text follows; answer with an empty response (§11.12.3).
            return LoginReply(b"", transit=False)
        try:
            pairs = decode_text(self._buf)
        except IscsiProtocolError:
            return _fail(LoginStatus.INITIATOR_ERROR, "malformed login text")
        finally:
            self._buf = bytearray()
        keys = dict(pairs)
        response: Pairs = []
        if first:
            refused = self._first_checks(keys, response)
            if refused is not None:
                return refused
        if pdu.csg not in (0, 1) or (self._stage == 1 and pdu.csg == 0):
            return _fail(LoginStatus.INVALID_DURING_LOGIN, f"bad CSG {pdu.csg}")
        self._stage = pdu.csg
        need_auth = self._auth is not None
        if pdu.csg == 1 and need_auth and not self._authenticated:
            return _fail(LoginStatus.AUTH_FAILURE, "authentication required")
        security_keys = {k: v for k, v in pairs if k == "AuthMethod" or k.startswith("CHAP_")}
        if pdu.csg == 0:
            outcome = self._security(security_keys, need_auth, response)
            if outcome is False:
                why = self._auth.reason if self._auth is not None and self._auth.reason \
                    else "authentication failed"
                return _fail(LoginStatus.AUTH_FAILURE, why)
        elif security_keys:
            response.extend((k, REJECT) for k in security_keys)
        op_pairs = [(k, v) for k, v in pairs if k not in security_keys]
        response.extend(self._negotiator.respond(op_pairs))
        transit = pdu.transit
        if transit:
            if (pdu.csg == 0 and pdu.nsg not in (1, 3)) or (pdu.csg == 1 and pdu.nsg != 3):
                return _fail(LoginStatus.INVALID_DURING_LOGIN, f"bad NSG {pdu.nsg}")
            if pdu.csg == 0 and need_auth and not self._authenticated:
                transit = False  # stay in the security stage until the exchange ends
        if pdu.csg == 1 or (transit and pdu.nsg == 3):
            response.extend(self._negotiator.declarations())
        return LoginReply(encode_text(response), transit=transit)

    def _first_checks(self, keys: dict[str, str], response: Pairs) -> LoginReply | None:
        """The leading Login Request's names (§6.3.1): who, which session
        type, which target, and whether this initiator may log in to it."""
        name = keys.get("InitiatorName")
        if not name:
            return _fail(LoginStatus.MISSING_PARAMETER, "InitiatorName missing")
        self.initiator_name = name
        self.initiator_alias = keys.get("InitiatorAlias")
        stype = keys.get("SessionType", "Normal")
        if stype not in ("Normal", "Discovery"):
            return _fail(LoginStatus.SESSION_TYPE_UNSUPPORTED, f"SessionType {stype}")
        self.session_type = stype
        self.discovery = stype == "Discovery"
        self._negotiator.discovery = self.discovery
        if not self.discovery:
            tname = keys.get("TargetName")
            if not tname:
                return _fail(LoginStatus.MISSING_PARAMETER, "TargetName missing")
            target = self._targets.get(tname)
            if target is None:
                return _fail(LoginStatus.NOT_FOUND, f"no target {tname}")
            self.target = target
        auth = self._authenticator
        if auth is not None:
            tname = self.target.name if self.target else None
            if not auth.authorize(name, tname):
                return _fail(LoginStatus.AUTHORIZATION_FAILURE,
                             "initiator not on the access list")
            self._auth = auth.begin(name, tname)
        if self.target is not None:
            response.append(("TargetPortalGroupTag", str(self._portal_group_tag)))
            if self.target.alias:
                response.append(("TargetAlias", self.target.alias))
        return None

    def _security(self, keys: dict[str, str], need_auth: bool, response: Pairs) -> bool | None:
        """Security stage (RFC 7143 §6.3.2): pick AuthMethod, run the exchange."""
        auth = self._auth
        offered = keys.get("AuthMethod")
        if offered is not None:
            methods = offered.split(",")
            if need_auth and auth is not None:
                choice = next((m for m in auth.methods() if m in methods), None)
            else:
                choice = "None" if "None" in methods else None
            if choice is None:
                response.append(("AuthMethod", REJECT))
                return False
            self._auth_method = choice
            response.append(("AuthMethod", choice))
            if choice == "None":
                self._authenticated = True
        elif not need_auth:
            self._authenticated = True
        exchange = {k: v for k, v in keys.items() if k != "AuthMethod"}
        if need_auth and auth is not None and self._auth_method and self._auth_method != "None" \
                and exchange:
            answer, ok = auth.step(self._auth_method, exchange)
            response.extend(answer)
            if ok is False:
                return False
            if ok:
                self._authenticated = True
        return self._authenticated or None


def _fail(status: LoginStatus, reason: str) -> LoginReply:
    return LoginReply(b"", transit=False, status=status, reason=reason)
