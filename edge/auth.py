"""iSCSI login security: CHAP, mutual CHAP and initiator ACLs (RFC 7143 §12.1.3,
RFC 1994), sans-IO.

:class:`ChapAuthenticator` plugs into ``edge.iscsi_session`` as its
:class:`~edge.iscsi_session.Authenticator`: per login it says whether the
initiator may see the target at all (the ACL, an IQN allow-list per target:
refusal is login status 0x0202) and, when the target or the discovery portal
has CHAP credentials, returns a :class:`ChapExchange` that runs the exchange:

1. initiator: ``CHAP_A=<list>`` → target: ``CHAP_A=<a>``, ``CHAP_I=<id>``,
   ``CHAP_C=0x<random>`` (hex, which libiscsi 1.19 requires);
2. initiator: ``CHAP_N``, ``CHAP_R`` (and for mutual CHAP ``CHAP_I``,
   ``CHAP_C``) → target checks ``R = H(I ‖ secret ‖ C)`` in constant time and,
   for mutual CHAP, answers ``CHAP_N``/``CHAP_R`` with its own secret.

Algorithms: MD5 (5), SHA-1 (6), SHA-256 (7), SHA3-256 (8); the first one in
the initiator's list that we know wins.  A wrong name or response, a reused
or reflected challenge, a missing key or a mutual request we have no
credentials for all fail the login (0x0201).  Reasons are short phrases for
the log and never contain a secret or a response.  The math both sides
share (algorithms, responses, credentials) is ``steelfusion.iscsi.chap``,
whose names are importable from here too.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from steelfusion.iscsi.chap import CHALLENGE_BYTES as CHALLENGE_BYTES
from steelfusion.iscsi.chap import CHAP_ALGORITHMS as CHAP_ALGORITHMS
from steelfusion.iscsi.chap import MIN_INITIATOR_CHALLENGE_BYTES as MIN_INITIATOR_CHALLENGE_BYTES
from steelfusion.iscsi.chap import SECRET_MAX_BYTES as SECRET_MAX_BYTES
from steelfusion.iscsi.chap import SECRET_MIN_BYTES as SECRET_MIN_BYTES
from steelfusion.iscsi.chap import AuthConfigError as AuthConfigError
from steelfusion.iscsi.chap import ChapCredentials as ChapCredentials
from steelfusion.iscsi.chap import chap_response as chap_response
from steelfusion.iscsi.chap import decode_binary as decode_binary

Pairs = list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Access:
    """Who may log in to one target (or to the discovery portal).

    ``initiators`` is the IQN allow-list (None: everyone); ``chap`` the
    credentials initiators must prove (None: no CHAP); ``per_initiator``
    overrides them for named initiators; ``mutual`` is the target's own
    credentials for mutual CHAP."""

    chap: ChapCredentials | None = None
    mutual: ChapCredentials | None = None
    initiators: frozenset[str] | None = None
    per_initiator: Mapping[str, ChapCredentials] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mutual is not None:
            for c in (self.chap, *self.per_initiator.values()):
                if c is not None and hmac.compare_digest(c.secret, self.mutual.secret):
                    raise AuthConfigError("the mutual CHAP secret must differ from the "
                                          "initiator's (RFC 7143 §12.1.3)")

    def allows(self, initiator: str) -> bool:
        return self.initiators is None or initiator in self.initiators

    def credentials_for(self, initiator: str) -> ChapCredentials | None:
        return self.per_initiator.get(initiator, self.chap)


class ChapExchange:
    """The target's side of one CHAP exchange (one login).

    ``step(keys)`` takes the CHAP keys of one Login Request and returns
    (keys to answer, outcome): True authenticated, False refused (``reason``
    says why), None need another round trip."""

    def __init__(self, access: Access, initiator: str, *,
                 token: Callable[[int], bytes] = secrets.token_bytes) -> None:
        self.access = access
        self.initiator = initiator
        self._token = token
        self.algorithm: int | None = None
        self.ident = 0
        self.challenge = b""
        self.reason = ""
        self.user: str | None = None
        self.mutual = False
        self._done: bool | None = None

    def methods(self) -> Sequence[str]:
        return ("CHAP",)

    def _fail(self, reason: str) -> tuple[Pairs, bool]:
        self.reason = reason
        self._done = False
        return [], False

    def step(self, method: str, keys: Mapping[str, str]) -> tuple[Pairs, bool | None]:
        if self._done is not None:
            return self._fail("CHAP keys after the exchange ended")
        if method != "CHAP":
            return self._fail(f"unsupported AuthMethod {method}")
        if self.algorithm is None:
            return self._offer(keys)
        return self._verify(keys)

    def _offer(self, keys: Mapping[str, str]) -> tuple[Pairs, bool | None]:
        offered = keys.get("CHAP_A")
        if offered is None:
            return [], None  # AuthMethod round only; CHAP_A comes next
        extra = set(keys) - {"CHAP_A"}
        if extra:
            return self._fail(f"unexpected keys with CHAP_A: {sorted(extra)}")
        choice = None
        for a in offered.split(","):
            a = a.strip()
            if a.isdigit() and int(a) in CHAP_ALGORITHMS:
                choice = int(a)
                break
        if choice is None:
            self.reason = f"no supported CHAP_A in {offered[:40]!r}"
            self._done = False
            return [("CHAP_A", "Reject")], False
        self.algorithm = choice
        self.ident = self._token(1)[0]
        self.challenge = self._token(CHALLENGE_BYTES)
        return [("CHAP_A", str(choice)), ("CHAP_I", str(self.ident)),
                ("CHAP_C", "0x" + self.challenge.hex())], None

    def _verify(self, keys: Mapping[str, str]) -> tuple[Pairs, bool | None]:
        assert self.algorithm is not None
        name, resp = keys.get("CHAP_N"), keys.get("CHAP_R")
        if name is None or resp is None:
            return self._fail("CHAP_N or CHAP_R missing")
        self.user = name
        creds = self.access.credentials_for(self.initiator)
        got = decode_binary(resp)
        if creds is None:
            return self._fail("no CHAP credentials configured")
        want = chap_response(self.algorithm, self.ident, creds.secret, self.challenge)
        # Compare both the name and the response, always, in constant time.
        name_ok = hmac.compare_digest(name.encode(), creds.user.encode())
        resp_ok = got is not None and hmac.compare_digest(got, want)
        if not (name_ok and resp_ok):
            return self._fail("CHAP name or response mismatch")
        ci, cc = keys.get("CHAP_I"), keys.get("CHAP_C")
        if ci is None and cc is None:
            self._done = True
            return [], True
        # Mutual CHAP: the initiator challenges us (RFC 7143 §12.1.3).
        if ci is None or cc is None or not ci.isdigit() or int(ci) > 255:
            return self._fail("mutual CHAP needs CHAP_I (0..255) and CHAP_C")
        challenge = decode_binary(cc)
        if challenge is None or len(challenge) < MIN_INITIATOR_CHALLENGE_BYTES:
            return self._fail("mutual CHAP challenge missing or too short")
        if hmac.compare_digest(challenge, self.challenge):
            return self._fail("mutual CHAP challenge reflects ours")
        target = self.access.mutual
        if target is None:
            return self._fail("initiator asked for mutual CHAP; no target credentials")
        self.mutual = True
        self._done = True
        answer = chap_response(self.algorithm, int(ci), target.secret, challenge)
        return [("CHAP_N", target.user), ("CHAP_R", "0x" + answer.hex())], True


class ChapAuthenticator:
    """Authenticator for :class:`edge.iscsi_session.SessionConfig`: ACLs and
    CHAP per target, and for discovery sessions.

    ``targets`` maps target IQN → :class:`Access`; a target missing from it
    has no ACL and no CHAP.  ``discovery`` applies to discovery sessions
    (CHAP there; its ACL, if any, also limits who may discover at all)."""

    def __init__(self, targets: Mapping[str, Access] | None = None,
                 discovery: Access | None = None, *,
                 token: Callable[[int], bytes] = secrets.token_bytes) -> None:
        self.targets = dict(targets or {})
        self.discovery = discovery or Access()
        self._token = token

    def _access(self, target_name: str | None) -> Access:
        if target_name is None:
            return self.discovery
        return self.targets.get(target_name, Access())

    def authorize(self, initiator_name: str, target_name: str | None) -> bool:
        """The ACL (RFC 7143 §11.13.5 status 0x0202 when False)."""
        return self._access(target_name).allows(initiator_name)

    def visible(self, initiator_name: str, target_names: Iterable[str]) -> list[str]:
        """Targets a discovery session may list (SendTargets honours ACLs)."""
        return [t for t in target_names if self.authorize(initiator_name, t)]

    def begin(self, initiator_name: str, target_name: str | None) -> ChapExchange | None:
        access = self._access(target_name)
        if access.credentials_for(initiator_name) is None:
            return None
        return ChapExchange(access, initiator_name, token=self._token)


def access_from_config(t: Any) -> Access:
    """:class:`Access` for one ``steelfusion.config.TargetConfig``."""
    per = {c.name: ChapCredentials(c.chap_user, c.chap_secret.encode())
           for c in t.initiator_chap}
    return Access(chap=ChapCredentials.of(t.chap_user, t.chap_secret),
                  mutual=ChapCredentials.of(t.mutual_user, t.mutual_secret),
                  initiators=frozenset(t.initiators) if t.initiators is not None else None,
                  per_initiator=per)


def from_edge_config(cfg: Any) -> ChapAuthenticator | None:
    """The authenticator an Edge's config asks for; None when it configures
    neither CHAP nor ACLs anywhere (the login path then stays as before)."""
    targets = {t.iqn: access_from_config(t) for t in cfg.targets}
    discovery = Access(chap=ChapCredentials.of(cfg.discovery_chap_user,
                                               cfg.discovery_chap_secret),
                       mutual=ChapCredentials.of(cfg.discovery_mutual_user,
                                                 cfg.discovery_mutual_secret))
    if all(a == Access() for a in targets.values()) and discovery == Access():
        return None
    return ChapAuthenticator(targets, discovery)
