"""Node authentication: a shared-key HMAC-SHA256 mutual challenge/response, sans-IO.

Edge↔Core, Core↔Core and Core→Witness connections start with the
``Hello``/``Welcome`` frames of :mod:`steelfusion.wire`.  This module adds a
mutual proof of a pre-shared key to them, in three messages, without a new
frame type::

    client (Hello.info["auth"])    {"v": 1, "alg": "hmac-sha256", "key_id": K, "nonce": Nc}
    server (Welcome.info["auth"])  {"v": 1, "nonce": Ns, "proof": HMAC(key, T("server"))}
    client (Control body["auth"])  {"v": 1, "proof": HMAC(key, T("client"))}

where ``T(role)`` is the transcript: a fixed label, the role, the key id,
both nonces, both node names and the connection's purpose, each
length-prefixed.  So:

* both sides prove they know the key (mutual); neither ever sends it;
* nonces are 32 bytes from :mod:`secrets`, one fresh per side per
  connection, so a recorded proof is worthless on any other connection
  (replay) and a proof for one role cannot be reflected as the other's;
* binding node names and purpose stops a proof made for ``edge-1 → core-a
  (edge)`` from vouching for another node or purpose; a keyring entry may
  also restrict which node names may use a key;
* proofs are compared with :func:`hmac.compare_digest`.

The server must not act on any frame after ``Welcome`` until
:meth:`ServerHandshake.on_control` accepts the client's proof.  Failures
raise :class:`NodeAuthError` whose ``code``/``reason`` fit a
``wire.Refuse`` and a log event: they never contain key material or proofs.
Both sides can derive :attr:`session_key` (HMAC of the key over the
transcript) for later per-frame MACs.  This authenticates the connection's
start; it does not encrypt or protect later frames against an on-path
attacker (use TLS for that).
"""

from __future__ import annotations

import enum
import hmac
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

VERSION = 1
ALGORITHM = "hmac-sha256"
NONCE_BYTES = 32
KEY_MIN_BYTES = 16
LABEL = b"steelfusion-nodeauth-v1"
_KEY_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_HEX = re.compile(r"[0-9a-fA-F]*")


class NodeAuthError(Exception):
    """Authentication failed or the peer broke the handshake.

    ``code`` is machine-readable (``auth_required``, ``auth_malformed``,
    ``auth_version``, ``auth_unknown_key``, ``auth_node_not_allowed``,
    ``auth_bad_proof``, ``auth_state``); ``reason`` is for people and logs and
    holds no secret."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason

    def refuse_fields(self) -> dict[str, str]:
        """Keyword arguments for ``wire.Refuse``."""
        return {"code": self.code, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class NodeKey:
    """One shared key.  ``nodes`` limits which node names may authenticate
    with it (None: any); the key bytes never appear in ``repr``."""

    key_id: str
    key: bytes = field(repr=False)
    nodes: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if not _KEY_ID.match(self.key_id):
            raise ValueError(f"key id {self.key_id!r}: 1-64 of A-Z a-z 0-9 . _ : -")
        if len(self.key) < KEY_MIN_BYTES:
            raise ValueError(f"key {self.key_id!r} must be at least {KEY_MIN_BYTES} bytes")


class Keyring:
    """The keys a server accepts, by key id (several allow rotation)."""

    def __init__(self, keys: Iterable[NodeKey] = ()) -> None:
        self._keys: dict[str, NodeKey] = {}
        for k in keys:
            self.add(k)

    def add(self, key: NodeKey) -> None:
        if key.key_id in self._keys:
            raise ValueError(f"duplicate key id {key.key_id!r}")
        self._keys[key.key_id] = key

    def get(self, key_id: str) -> NodeKey | None:
        return self._keys.get(key_id)

    def __len__(self) -> int:
        return len(self._keys)


def _transcript(role: bytes, key_id: str, nonce_c: bytes, nonce_s: bytes, client: str,
                server: str, purpose: str) -> bytes:
    parts = [LABEL, role, key_id.encode(), nonce_c, nonce_s, client.encode(), server.encode(),
             purpose.encode()]
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _proof(key: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, transcript, sha256).digest()


def _session_key(key: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, b"session" + transcript, sha256).digest()


def _get_auth(info: Mapping[str, Any] | None, what: str) -> Mapping[str, Any]:
    auth = info.get("auth") if isinstance(info, Mapping) else None
    if auth is None:
        raise NodeAuthError("auth_required", f"{what} carries no authentication")
    if not isinstance(auth, Mapping):
        raise NodeAuthError("auth_malformed", f"{what}: auth is not an object")
    v = auth.get("v")
    if v != VERSION:
        raise NodeAuthError("auth_version", f"{what}: version {v!r}, we speak {VERSION}")
    return auth


def _hex(auth: Mapping[str, Any], key: str, n: int, what: str) -> bytes:
    v = auth.get(key)
    if not isinstance(v, str) or len(v) != 2 * n or not _HEX.fullmatch(v):
        raise NodeAuthError("auth_malformed", f"{what}: {key} must be {n} bytes of hex")
    return bytes.fromhex(v)


class _State(enum.Enum):
    START = "start"
    WAIT = "wait"
    DONE = "done"
    FAILED = "failed"


class ClientHandshake:
    """The connecting side (Edge to Core, Core to peer Core, Core to Witness).

    ``hello_info()`` → merge into ``Hello.info``; ``on_welcome(info,
    server_node)`` checks the server's proof and returns the ``Control`` body
    to send next."""

    def __init__(self, key: NodeKey, node: str, purpose: str, *,
                 token: Callable[[int], bytes] = secrets.token_bytes) -> None:
        self.key = key
        self.node = node
        self.purpose = purpose
        self._token = token
        self._state = _State.START
        self._nonce = b""
        self.server: str | None = None
        self.session_key: bytes | None = None

    @property
    def authenticated(self) -> bool:
        return self._state is _State.DONE

    def hello_info(self) -> dict[str, Any]:
        if self._state is not _State.START:
            raise NodeAuthError("auth_state", "hello already sent")
        self._nonce = self._token(NONCE_BYTES)
        self._state = _State.WAIT
        return {"auth": {"v": VERSION, "alg": ALGORITHM, "key_id": self.key.key_id,
                         "nonce": self._nonce.hex()}}

    def on_welcome(self, info: Mapping[str, Any] | None, server_node: str) -> dict[str, Any]:
        if self._state is not _State.WAIT:
            raise NodeAuthError("auth_state", "welcome before hello, or twice")
        try:
            auth = _get_auth(info, "welcome")
            nonce_s = _hex(auth, "nonce", NONCE_BYTES, "welcome")
            proof = _hex(auth, "proof", 32, "welcome")
            if hmac.compare_digest(nonce_s, self._nonce):
                raise NodeAuthError("auth_bad_proof", "server echoed our nonce")
            t = _transcript(b"server", self.key.key_id, self._nonce, nonce_s, self.node,
                            server_node, self.purpose)
            if not hmac.compare_digest(proof, _proof(self.key.key, t)):
                raise NodeAuthError("auth_bad_proof",
                                    f"server {server_node!r} does not know key "
                                    f"{self.key.key_id!r}")
        except NodeAuthError:
            self._state = _State.FAILED
            raise
        self.server = server_node
        tc = _transcript(b"client", self.key.key_id, self._nonce, nonce_s, self.node,
                         server_node, self.purpose)
        self.session_key = _session_key(self.key.key, tc)
        self._state = _State.DONE
        return {"auth": {"v": VERSION, "proof": _proof(self.key.key, tc).hex()}}


class ServerHandshake:
    """The accepting side (Core, Witness).

    ``on_hello(info, client_node, purpose)`` → merge the result into
    ``Welcome.info``; ``on_control(body)`` checks the client's proof.  Until
    it returns, treat the peer as unauthenticated and read nothing else."""

    def __init__(self, keyring: Keyring, node: str, *,
                 token: Callable[[int], bytes] = secrets.token_bytes) -> None:
        self.keyring = keyring
        self.node = node
        self._token = token
        self._state = _State.START
        self._expect = b""
        self._tc = b""
        self._key: NodeKey | None = None
        self.peer: str | None = None
        self.key_id: str | None = None
        self.session_key: bytes | None = None

    @property
    def authenticated(self) -> bool:
        return self._state is _State.DONE

    def _fail(self, code: str, reason: str) -> NodeAuthError:
        self._state = _State.FAILED
        return NodeAuthError(code, reason)

    def on_hello(self, info: Mapping[str, Any] | None, client_node: str,
                 purpose: str) -> dict[str, Any]:
        if self._state is not _State.START:
            raise self._fail("auth_state", "second hello")
        try:
            auth = _get_auth(info, f"hello from {client_node!r}")
        except NodeAuthError as e:
            raise self._fail(e.code, e.reason) from None
        if auth.get("alg") != ALGORITHM:
            raise self._fail("auth_malformed", f"algorithm {str(auth.get('alg'))[:32]!r}")
        key_id = auth.get("key_id")
        key = self.keyring.get(key_id) if isinstance(key_id, str) else None
        if key is None:
            raise self._fail("auth_unknown_key",
                             f"{client_node!r} offered an unknown key id "
                             f"{str(key_id)[:64]!r}")
        if key.nodes is not None and client_node not in key.nodes:
            raise self._fail("auth_node_not_allowed",
                             f"key {key.key_id!r} is not for node {client_node!r}")
        try:
            nonce_c = _hex(auth, "nonce", NONCE_BYTES, "hello")
        except NodeAuthError as e:
            raise self._fail(e.code, e.reason) from None
        nonce_s = self._token(NONCE_BYTES)
        ts = _transcript(b"server", key.key_id, nonce_c, nonce_s, client_node, self.node,
                         purpose)
        self._tc = _transcript(b"client", key.key_id, nonce_c, nonce_s, client_node,
                               self.node, purpose)
        self._expect = _proof(key.key, self._tc)
        self._key = key
        self.peer = client_node
        self.key_id = key.key_id
        self._state = _State.WAIT
        return {"auth": {"v": VERSION, "nonce": nonce_s.hex(), "proof": _proof(key.key, ts).hex()}}

    def on_control(self, body: Mapping[str, Any] | None) -> None:
        if self._state is not _State.WAIT:
            raise self._fail("auth_state", "proof before hello, after the end, or twice")
        try:
            auth = _get_auth(body, "proof")
            proof = _hex(auth, "proof", 32, "proof")
        except NodeAuthError as e:
            raise self._fail(e.code, e.reason) from None
        if not hmac.compare_digest(proof, self._expect):
            raise self._fail("auth_bad_proof",
                             f"{self.peer!r} does not know key {self.key_id!r}")
        assert self._key is not None
        self.session_key = _session_key(self._key.key, self._tc)
        self._state = _State.DONE


# --------------------------------------------------------------------------- key files


def generate_key(nbytes: int = 32) -> bytes:
    return secrets.token_bytes(nbytes)


def write_key_file(path: str | os.PathLike[str], key: bytes) -> None:
    """Hex, one line, mode 0600 (atomic replace)."""
    from steelfusion.atomic import atomic_write

    atomic_write(Path(path), key.hex().encode() + b"\n", mode=0o600)


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    """Read a key written by :func:`write_key_file`; refuses a file that
    group or others can read, as ssh does for private keys."""
    p = Path(path)
    mode = p.stat().st_mode
    if stat.S_IMODE(mode) & 0o077:
        raise ValueError(f"{p}: key file must not be readable by group or others "
                         f"(chmod 600 {p})")
    text = p.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{p}: not a hex key") from None
    if len(key) < KEY_MIN_BYTES:
        raise ValueError(f"{p}: key shorter than {KEY_MIN_BYTES} bytes")
    return key
