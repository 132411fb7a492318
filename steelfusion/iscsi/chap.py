"""CHAP for iSCSI logins, both sides' shared math and the initiator's half
(RFC 7143 §12.1.3, RFC 1994).

The target's half (challenge, verify, ACLs) is ``edge.auth``; the initiator's
(:class:`ChapClient`) is used by :mod:`steelfusion.iscsi.initiator`.  What
both need lives here once: the algorithm table, the response
``R = H(I ‖ secret ‖ C)``, binary-value decoding and the credential rules.

The exchange, as ctld and libiscsi run it:

1. initiator: ``CHAP_A=<list>`` → target: ``CHAP_A=<a>``, ``CHAP_I=<id>``,
   ``CHAP_C=<challenge>``;
2. initiator: ``CHAP_N``, ``CHAP_R`` (and for mutual CHAP its own ``CHAP_I``,
   ``CHAP_C``) → target checks R and, for mutual CHAP, answers ``CHAP_N``,
   ``CHAP_R`` computed with the target's secret, which the initiator checks.

Nothing here logs or formats a secret or a response.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

Pairs = list[tuple[str, str]]

CHAP_ALGORITHMS: dict[int, Callable[[], hashlib._Hash]] = {
    5: hashlib.md5, 6: hashlib.sha1, 7: hashlib.sha256, 8: hashlib.sha3_256}
"""CHAP_A values (RFC 7143 §12.1.3 and the IANA CHAP algorithm registry)."""

SECRET_MIN_BYTES = 12
"""RFC 7143 §12.1.3: CHAP secrets must be at least 96 bits."""
SECRET_MAX_BYTES = 255
CHALLENGE_BYTES = 32
MIN_INITIATOR_CHALLENGE_BYTES = 8


class AuthConfigError(ValueError):
    """Credentials that RFC 7143 forbids (too short, reused both ways)."""


@dataclass(frozen=True, slots=True)
class ChapCredentials:
    """A CHAP name and secret.  The secret never appears in ``repr``."""

    user: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not self.user:
            raise AuthConfigError("CHAP user name is empty")
        if not SECRET_MIN_BYTES <= len(self.secret) <= SECRET_MAX_BYTES:
            raise AuthConfigError(f"CHAP secret for {self.user!r} must be {SECRET_MIN_BYTES}.."
                                  f"{SECRET_MAX_BYTES} bytes (RFC 7143 §12.1.3)")

    @classmethod
    def of(cls, user: str | None, secret: str | bytes | None) -> ChapCredentials | None:
        if user is None and secret is None:
            return None
        if not user or not secret:
            raise AuthConfigError("CHAP needs both a user name and a secret")
        return cls(user, secret.encode() if isinstance(secret, str) else bytes(secret))


def decode_binary(value: str) -> bytes | None:
    """A binary-value: ``0x`` hex or ``0b`` base64 (RFC 7143 §6.1); None if bad."""
    try:
        if value[:2] in ("0x", "0X"):
            h = value[2:]
            return bytes.fromhex(h if len(h) % 2 == 0 else "0" + h) if h else None
        if value[:2] in ("0b", "0B"):
            return base64.b64decode(value[2:], validate=True) or None
    except (ValueError, binascii.Error):
        return None
    return None


def chap_response(algorithm: int, ident: int, secret: bytes, challenge: bytes) -> bytes:
    """RFC 1994 §4.1: H(Identifier ‖ secret ‖ Challenge)."""
    h = CHAP_ALGORITHMS[algorithm]()
    h.update(bytes((ident & 0xFF,)))
    h.update(secret)
    h.update(challenge)
    return h.digest()


def _decimal(value: str) -> bool:
    """Digits ``int()`` takes: ASCII only (``"²".isdigit()`` is true)."""
    return value.isascii() and value.isdigit() and len(value) <= 10


class ChapError(Exception):
    """The target's side of a CHAP exchange was unacceptable (a bad or
    missing key, an algorithm we did not offer, a failed mutual check).  The
    message names what failed, never a secret or a response."""


class ChapClient:
    """The initiator's side of one CHAP exchange (one login).

    ``credentials`` prove who we are; with ``mutual`` (the target's name and
    secret) the target must prove itself too, and :meth:`verify` checks it.
    ``algorithms`` is our CHAP_A list, best first.
    """

    def __init__(self, credentials: ChapCredentials, mutual: ChapCredentials | None = None, *,
                 algorithms: Sequence[int] = (5,),
                 token: Callable[[int], bytes] = secrets.token_bytes) -> None:
        if not algorithms or any(a not in CHAP_ALGORITHMS for a in algorithms):
            raise AuthConfigError(f"CHAP_A must be among {sorted(CHAP_ALGORITHMS)}")
        if mutual is not None and hmac.compare_digest(mutual.secret, credentials.secret):
            raise AuthConfigError("the mutual CHAP secret must differ from the "
                                  "initiator's (RFC 7143 §12.1.3)")
        self.credentials = credentials
        self.mutual = mutual
        self.algorithms = tuple(algorithms)
        self._token = token
        self.algorithm: int | None = None
        self._ident = 0
        self._challenge = b""

    def offer(self) -> Pairs:
        """Step 1: the algorithms we accept."""
        return [("CHAP_A", ",".join(str(a) for a in self.algorithms))]

    def answer(self, keys: Mapping[str, str]) -> Pairs:
        """Step 2: our response to the target's CHAP_A/CHAP_I/CHAP_C, and our
        own challenge for mutual CHAP."""
        a, i, c = keys.get("CHAP_A"), keys.get("CHAP_I"), keys.get("CHAP_C")
        if a is None or i is None or c is None:
            raise ChapError("target sent no CHAP_A, CHAP_I and CHAP_C")
        if not _decimal(a) or int(a) not in self.algorithms:
            raise ChapError(f"target chose CHAP_A={a[:12]!r}, which we did not offer")
        if not _decimal(i) or int(i) > 255:
            raise ChapError("CHAP_I is not 0..255")
        challenge = decode_binary(c)
        if challenge is None:
            raise ChapError("CHAP_C is not a binary value")
        self.algorithm = int(a)
        r = chap_response(self.algorithm, int(i), self.credentials.secret, challenge)
        out = [("CHAP_N", self.credentials.user), ("CHAP_R", "0x" + r.hex())]
        if self.mutual is not None:
            self._ident = self._token(1)[0]
            self._challenge = self._token(CHALLENGE_BYTES)
            if hmac.compare_digest(self._challenge, challenge):
                raise ChapError("target challenge equals ours")  # a reflection attempt
            out += [("CHAP_I", str(self._ident)), ("CHAP_C", "0x" + self._challenge.hex())]
        return out

    def verify(self, keys: Mapping[str, str]) -> None:
        """Step 3 (mutual CHAP only): the target's CHAP_N and CHAP_R."""
        mutual = self.mutual
        if mutual is None or self.algorithm is None:
            return
        name, resp = keys.get("CHAP_N"), keys.get("CHAP_R")
        if name is None or resp is None:
            raise ChapError("target did not answer the mutual CHAP challenge")
        got = decode_binary(resp)
        want = chap_response(self.algorithm, self._ident, mutual.secret, self._challenge)
        name_ok = hmac.compare_digest(name.encode(), mutual.user.encode())
        resp_ok = got is not None and hmac.compare_digest(got, want)
        if not (name_ok and resp_ok):
            raise ChapError("target failed mutual CHAP (name or response mismatch)")
