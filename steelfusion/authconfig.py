"""The ``[auth]`` table of a node config: which shared key a node proves and accepts.

::

    [auth]
    key_file = "/etc/steelfusion/node.key"   # hex, mode 0600 (steelfusion/nodeauth.py)
    key_id = "site-1"                        # default "default"

When present, the node's listeners refuse any peer that cannot prove the key
(``auth_required``, ``auth_bad_proof``, ``auth_unknown_key``) and its
outbound connections prove it. Absent, connections are not authenticated.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from steelfusion.config import ConfigError
from steelfusion.nodeauth import Keyring, NodeKey, generate_key, read_key_file, write_key_file


@dataclass(frozen=True)
class NodeAuth:
    key: NodeKey
    keyring: Keyring


def load(config_path: str | Path) -> NodeAuth | None:
    """Read ``[auth]`` from a node's TOML config; None when the table is absent."""
    if not config_path:
        return None
    try:
        with open(config_path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return None  # the node's own loader has already reported the file
    t = data.get("auth")
    if t is None:
        return None
    if not isinstance(t, dict) or not isinstance(t.get("key_file"), str):
        raise ConfigError(f"{config_path}: [auth] key_file: required path to a key file")
    key_id = t.get("key_id", "default")
    try:
        key = NodeKey(str(key_id), read_key_file(t["key_file"]))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{config_path}: [auth] {e}") from None
    return NodeAuth(key, Keyring([key]))


def make_key_file(path: str | Path) -> str:
    """Create a new random key file (0600) for a lab or a first setup; returns its path."""
    write_key_file(path, generate_key())
    return str(path)
