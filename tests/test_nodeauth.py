"""Shared-key mutual authentication of node connections (steelfusion.nodeauth),
carried in the wire protocol's Hello / Welcome / Control frames."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steelfusion.nodeauth import (
    ClientHandshake,
    Keyring,
    NodeAuthError,
    NodeKey,
    ServerHandshake,
    generate_key,
    read_key_file,
    write_key_file,
)
from steelfusion.wire import Control, FrameDecoder, Hello, Refuse, Welcome, encode_bytes

KEY = NodeKey("site-a", b"k" * 32)
OTHER = NodeKey("site-a", b"x" * 32)


def over_the_wire(msg: Any) -> Any:
    (out,) = FrameDecoder().feed(encode_bytes(msg))
    return out


def handshake(ckey: NodeKey = KEY, ring: Keyring | None = None, *, client: str = "edge-1",
              server: str = "core-a", purpose: str = "edge"
              ) -> tuple[ClientHandshake, ServerHandshake]:
    c = ClientHandshake(ckey, client, purpose)
    s = ServerHandshake(ring or Keyring([KEY]), server)
    hello = over_the_wire(Hello(client, "edge", purpose, info=c.hello_info()))
    welcome_info = s.on_hello(hello.info, hello.node, hello.purpose)
    welcome = over_the_wire(Welcome(server, "primary", info={"epoch": 1, **welcome_info}))
    body = c.on_welcome(welcome.info, welcome.node)
    control = over_the_wire(Control(body))
    s.on_control(control.body)
    return c, s


def test_mutual_handshake_over_the_frames() -> None:
    c, s = handshake()
    assert c.authenticated and s.authenticated
    assert s.peer == "edge-1" and s.key_id == "site-a" and c.server == "core-a"
    assert c.session_key == s.session_key and c.session_key is not None
    c2, _s2 = handshake()
    assert c2.session_key != c.session_key  # fresh nonces each connection


def test_wrong_key_is_caught_by_both_sides() -> None:
    # A client with the wrong key learns the server is not who it thinks...
    with pytest.raises(NodeAuthError) as e:
        handshake(OTHER)
    assert e.value.code == "auth_bad_proof" and "core-a" in e.value.reason
    # ...and a server never accepts a client that cannot prove the key.
    bad = ClientHandshake(OTHER, "edge-1", "edge")
    s = ServerHandshake(Keyring([KEY]), "core-a")
    s.on_hello(bad.hello_info(), "edge-1", "edge")
    with pytest.raises(NodeAuthError) as e:  # it can only guess a proof
        s.on_control({"auth": {"v": 1, "proof": "00" * 32}})
    assert e.value.code == "auth_bad_proof" and not s.authenticated
    refuse = over_the_wire(Refuse(**e.value.refuse_fields()))
    assert refuse.code == "auth_bad_proof"


def test_a_node_without_authentication_is_refused() -> None:
    s = ServerHandshake(Keyring([KEY]), "core-a")
    with pytest.raises(NodeAuthError) as e:
        s.on_hello({"stream": 5}, "intruder", "edge")
    assert e.value.code == "auth_required" and "intruder" in e.value.reason
    with pytest.raises(NodeAuthError) as e:
        s.on_control({})
    assert e.value.code == "auth_state"


@pytest.mark.parametrize("mutate,code", [
    (lambda a: {**a, "v": 2}, "auth_version"),
    (lambda a: {**a, "alg": "md5"}, "auth_malformed"),
    (lambda a: {**a, "key_id": "site-b"}, "auth_unknown_key"),
    (lambda a: {**a, "key_id": 7}, "auth_unknown_key"),
    (lambda a: {**a, "nonce": "00"}, "auth_malformed"),
    (lambda a: {**a, "nonce": "zz" * 32}, "auth_malformed"),
    (lambda a: "not an object", "auth_malformed"),
])
def test_malformed_hello(mutate: Any, code: str) -> None:
    auth = ClientHandshake(KEY, "edge-1", "edge").hello_info()["auth"]
    s = ServerHandshake(Keyring([KEY]), "core-a")
    with pytest.raises(NodeAuthError) as e:
        s.on_hello({"auth": mutate(auth)}, "edge-1", "edge")
    assert e.value.code == code


def test_key_restricted_to_nodes() -> None:
    ring = Keyring([NodeKey("site-a", KEY.key, frozenset({"edge-1"}))])
    handshake(ring=ring)
    with pytest.raises(NodeAuthError) as e:
        handshake(ring=ring, client="edge-2")
    assert e.value.code == "auth_node_not_allowed"


def test_replayed_proof_fails() -> None:
    """An eavesdropper who recorded a whole good exchange cannot replay it:
    the server's nonce is new on every connection."""
    c = ClientHandshake(KEY, "edge-1", "edge")
    s = ServerHandshake(Keyring([KEY]), "core-a")
    hello = c.hello_info()
    body = c.on_welcome(s.on_hello(hello, "edge-1", "edge"), "core-a")
    s.on_control(body)
    replay = ServerHandshake(Keyring([KEY]), "core-a")
    replay.on_hello(hello, "edge-1", "edge")
    with pytest.raises(NodeAuthError) as e:
        replay.on_control(body)
    assert e.value.code == "auth_bad_proof"


def test_reflection_and_binding() -> None:
    c = ClientHandshake(KEY, "edge-1", "edge")
    s = ServerHandshake(Keyring([KEY]), "core-a")
    welcome = s.on_hello(c.hello_info(), "edge-1", "edge")
    # the server's own proof, reflected back as the client's, is refused
    with pytest.raises(NodeAuthError):
        s.on_control({"auth": {"v": 1, "proof": welcome["auth"]["proof"]}})
    # a proof made for another purpose or server name does not verify
    for purpose, server in (("replication", "core-a"), ("edge", "core-b")):
        c = ClientHandshake(KEY, "edge-1", purpose)
        s = ServerHandshake(Keyring([KEY]), "core-a")
        w = s.on_hello(c.hello_info(), "edge-1", "edge")
        with pytest.raises(NodeAuthError):
            s.on_control(c.on_welcome(w, server))
    # a server that echoes the client's nonce is not trusted
    c = ClientHandshake(KEY, "edge-1", "edge")
    h = c.hello_info()
    with pytest.raises(NodeAuthError):
        c.on_welcome({"auth": {"v": 1, "nonce": h["auth"]["nonce"], "proof": "00" * 32}},
                     "core-a")


def test_state_machine_misuse() -> None:
    c = ClientHandshake(KEY, "edge-1", "edge")
    with pytest.raises(NodeAuthError, match="auth_state"):
        c.on_welcome({}, "core-a")
    c.hello_info()
    with pytest.raises(NodeAuthError, match="auth_state"):
        c.hello_info()
    _c2, s2 = handshake()
    with pytest.raises(NodeAuthError, match="auth_state"):
        s2.on_control({})
    with pytest.raises(NodeAuthError, match="auth_state"):
        s2.on_hello({}, "x", "edge")


def test_no_secret_in_errors_or_repr() -> None:
    secret = b"very-secret-key-material!"
    key = NodeKey("k1", secret)
    assert secret.hex() not in repr(key) and "very-secret" not in repr(key)
    with pytest.raises(NodeAuthError) as e:
        handshake(key, Keyring([NodeKey("k1", b"y" * 32)]))
    assert secret.hex() not in str(e.value) and "very-secret" not in str(e.value)
    assert secret.hex() not in repr(e.value) and "very-secret" not in repr(e.value)
    with pytest.raises(ValueError):
        NodeKey("bad id!", b"x" * 32)
    with pytest.raises(ValueError):
        NodeKey("k", b"short")
    with pytest.raises(ValueError):
        Keyring([KEY, KEY])


def test_key_files(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    key = generate_key()
    write_key_file(path, key)
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_key_file(path) == key
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        read_key_file(path)
    os.chmod(path, 0o600)
    path.write_text("nothex")
    with pytest.raises(ValueError):
        read_key_file(path)
    path.write_text("00" * 4)
    with pytest.raises(ValueError):
        read_key_file(path)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=80),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["auth", "x"]), _json | st.fixed_dictionaries({
    "v": st.sampled_from([1, 2, "1"]), "alg": st.sampled_from(["hmac-sha256", "x"]),
    "key_id": st.sampled_from(["site-a", "zz"]),
    "nonce": st.text("0123456789abcdef", min_size=0, max_size=70)})), _json)
def test_garbage_only_raises_nodeautherror(hello: dict[str, Any], control: Any) -> None:
    s = ServerHandshake(Keyring([KEY]), "core-a")
    try:
        s.on_hello(hello, "edge-1", "edge")
        s.on_control(control if isinstance(control, dict) else {"auth": control})
    except NodeAuthError:
        pass
    assert not s.authenticated
