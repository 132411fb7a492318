"""Versioned, checksummed JSON state files (``core-state.json``, the Edge's ``state.json``).

A state file holds what a node must not forget across a restart (a Core's
role and epoch, an Edge's stream and sequence leases). One flipped byte or a
torn copy must stop the node with a line an operator can act on, never load
as a silent default: a Core that forgets it was demoted comes back primary.

Every file is one JSON object (the same envelope ``witness-state.json`` has
used from its first version)::

    {"magic": "steelfusion-<kind>", "format": N, "crc32c": C, "state": {...}}

``C`` is the CRC32C of ``state`` as canonical JSON (sorted keys, no spaces),
so a change anywhere in the body, a truncation or a file of another kind is
caught on load; ``format`` is checked against what this build reads. Files
of the previous layout (a bare JSON object, no magic) are read once and
rewritten in this one (an appliance upgrade keeps its state). Writes use
:func:`steelfusion.atomic.atomic_write` (temp, fsync, rename, fsync dir).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crc32c import crc32c

from steelfusion import log
from steelfusion.atomic import atomic_write

_log = log.get("statefile")

MAGIC_PREFIX = "steelfusion-"
_ENVELOPE = ("magic", "format", "crc32c", "state")

Body = dict[str, Any]


class StateFileError(Exception):
    """A state file is corrupt, truncated, of another kind or from a newer build.

    The message is one line: the file, what is wrong, what to do.
    """

    def __init__(self, path: Path | str, problem: str, remedy: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}; {remedy}")


def _canon(body: Body) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def encode(kind: str, fmt: int, body: Body) -> bytes:
    """The file's bytes: the envelope around ``body`` (readable: one key per line)."""
    env = {"magic": MAGIC_PREFIX + kind, "format": fmt, "crc32c": int(crc32c(_canon(body))),
           "state": body}
    return json.dumps(env, sort_keys=True, indent=1).encode() + b"\n"


def decode(data: bytes, kind: str, fmt: int) -> Body:
    """The body of a file written by :func:`encode`; ValueError says what is wrong."""
    env = parse(data)
    if "magic" not in env:
        raise ValueError("no magic: not a steelfusion state file")
    return unwrap(env, kind, fmt)


def parse(data: bytes) -> Body:
    """The file as a JSON object (either layout); ValueError if it is not one."""
    if not data.strip():
        raise ValueError("the file is empty (truncated)")
    try:
        env = json.loads(data)
    except UnicodeDecodeError:
        raise ValueError("not text (corrupt)") from None
    except ValueError as e:
        raise ValueError(f"not valid JSON (truncated or corrupt: {e})") from None
    if not isinstance(env, dict):
        raise ValueError(f"not a JSON object (corrupt): {type(env).__name__}")
    return env


def unwrap(env: Body, kind: str, fmt: int) -> Body:
    magic = MAGIC_PREFIX + kind
    if env.get("magic") != magic:
        raise ValueError(f"magic {env.get('magic')!r} is not {magic!r} (not a {kind} file, "
                         "or corrupt)")
    got = env.get("format")
    if not isinstance(got, int) or isinstance(got, bool):
        raise ValueError(f"format {got!r} is not a number (corrupt)")
    if got > fmt:
        raise ValueError(f"format {got} was written by a newer steelfusion (this one reads "
                         f"format {fmt}): run the newer version")
    if got != fmt:
        raise ValueError(f"format {got} is not one this steelfusion reads (format {fmt})")
    body = env.get("state")
    if not isinstance(body, dict):
        raise ValueError("no 'state' object (corrupt)")
    if env.get("crc32c") != int(crc32c(_canon(body))):
        raise ValueError("checksum mismatch (the file is corrupt)")
    extra = sorted(set(env) - set(_ENVELOPE))
    if extra:
        raise ValueError(f"unexpected field {extra[0]!r} (corrupt)")
    return body


def _is_legacy(env: Body) -> bool:
    """A previous-layout file: a bare object with none of the envelope's fields.

    A new-layout file whose ``magic`` key was damaged still has its
    ``format``/``crc32c``/``state``, so it is reported corrupt, not migrated.
    """
    return ("magic" not in env and "format" not in env and "crc32c" not in env
            and not isinstance(env.get("state"), dict))


def save(path: Path | str, kind: str, fmt: int, body: Body, mode: int = 0o644) -> None:
    """Atomic replace with the envelope (temp, fsync, rename, fsync dir)."""
    atomic_write(path, encode(kind, fmt, body), mode=mode)


def load(path: Path | str, kind: str, fmt: int, *, remedy: str,
         check: Callable[[Body], None] | None = None,
         legacy: Callable[[Body], Body] | None = None, mode: int = 0o644) -> Body | None:
    """The body of ``path``, or None if the file does not exist.

    ``check`` raises ValueError on a body that cannot be right (checked after
    the CRC: it catches a bug or a hand edit, not a bit flip). ``legacy``
    turns a previous-layout object into a body (ValueError: it is not one);
    such a file is rewritten at once in this layout. Anything else wrong
    raises :class:`StateFileError` naming the file, the problem and
    ``remedy`` (what the operator should do); the node logs it as it refuses
    to start (``core_start_failed``, ``edge_start_failed``).
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateFileError(p, f"cannot be read: {e.strerror or e}", remedy) from None
    try:
        env = parse(data)
        migrated = legacy is not None and _is_legacy(env)
        if migrated:
            assert legacy is not None
            body = legacy(env)
        elif "magic" not in env:
            raise ValueError("no magic (corrupt, or not a steelfusion state file)")
        else:
            body = unwrap(env, kind, fmt)
        if check is not None:
            check(body)
    except (ValueError, TypeError, KeyError) as e:
        raise StateFileError(p, str(e) or type(e).__name__, remedy) from None
    if migrated:
        save(p, kind, fmt, body, mode)
        _log.warning("state_file_migrated", path=str(p), kind=kind, format=fmt)
    return body
