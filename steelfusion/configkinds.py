"""How one config value is read, checked and written (the kinds a config field's
:class:`steelfusion.config.Key` names: addresses, sizes, secrets, choices, ...), and the
one-line :class:`ConfigError` every bad value becomes (issue 13)."""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steelfusion.units import format_addr, parse_addr, parse_size

ROLES = ("primary", "secondary")
HA_ROLES = ("none", "leader", "follower")  # Core HA role; both Cores of a pair must agree

_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
_WILDCARD = ("0.0.0.0", "::", "")
BACKEND_BLOCK = 512  # core/lunstore.py BLOCK: a LUN backend is a whole number of these
EDGE_LUN_BLOCK = 4096  # an exported LUN is a whole number of 4 KiB blocks
EDGE_RESERVE_MIN = 4 << 20  # below this host writes go a few at a time (issue 13)
CHAP_SECRET_MIN = 12  # RFC 7143 §12.1.3: at least 96 bits
CHAP_SECRET_MAX = 255
CONSOLE_PASSWORD_MIN = 8


class ConfigError(Exception):
    """A configuration file is missing, malformed or inconsistent."""


def load_json(path: Path | str) -> Any:
    """A JSON config file's value (the lab's own: WAN emulator, failing disk)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None


def _suggest(word: str, choices: Iterable[str], fmt: str = "'{}'") -> str:
    """`` (did you mean 'window'?)`` when one of ``choices`` is close to ``word``."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {fmt.format(close[0])}?)" if close else ""


def host_ok(host: str) -> bool:
    """An IP address literal or an RFC 1123 host name (``300.1.2.3`` is neither)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or all(lb.isdigit() for lb in labels):
        return False
    return all(_LABEL.match(lb) for lb in labels)


def _addr(text: str, dial: bool = False) -> tuple[str, int]:
    """``host:port``; ``dial``: an address this node connects to (port 0 is no port)."""
    host, port = parse_addr(text)
    if not host_ok(host):
        raise ValueError(f"address {text!r}: host {host!r} is not an IP address or host name")
    if dial and port == 0:
        raise ValueError(f"address {text!r}: port 0 cannot be dialled; give the port the other "
                         "node listens on")
    return host, port


def _clash(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Two listen addresses that cannot both be bound (same port, same or wildcard host)."""
    return a[1] == b[1] != 0 and (a[0] == b[0] or a[0] in _WILDCARD or b[0] in _WILDCARD)


def _norm(p: str) -> str:
    return os.path.normpath(os.path.abspath(p))


# -- kinds: how one TOML value is read (ValueError says what is wrong) and written back


class Kind:
    """A TOML value type; ``need`` completes "required ..." when the key is missing."""

    need = "value"

    def read(self, v: Any) -> Any:
        return v

    def dump(self, v: Any) -> Any:
        return v


@dataclass(frozen=True)
class Str(Kind):
    """A string; empty only with ``empty_ok`` (a log file of "" means none)."""

    empty_ok: bool = False

    need = "string"

    def read(self, v: Any) -> str:
        if not isinstance(v, str) or not (v or self.empty_ok):
            raise ValueError(f"must be a {'' if self.empty_ok else 'non-empty '}string, "
                             f"got {v!r}")
        return v


STR, TEXT = Str(), Str(empty_ok=True)


@dataclass(frozen=True)
class Secret(Str):
    """A CHAP secret (RFC 7143 §12.1.3): 12..255 bytes; errors never show it."""

    def read(self, v: Any) -> str:
        if not isinstance(v, str):
            raise ValueError("must be a string; value not shown")
        if not CHAP_SECRET_MIN <= len(v.encode()) <= CHAP_SECRET_MAX:
            raise ValueError(f"must be {CHAP_SECRET_MIN}..{CHAP_SECRET_MAX} bytes "
                             "(RFC 7143 §12.1.3); value not shown")
        return v


@dataclass(frozen=True)
class Choice(Kind):
    options: tuple[str, ...]
    need = "string"

    def read(self, v: Any) -> str:
        if STR.read(v) not in self.options:
            *head, last = self.options
            raise ValueError(f"must be {', '.join(head)} or {last}, got {v!r}")
        return v


@dataclass(frozen=True)
class Addr(Kind):
    """``host:port`` in the file, ``(host, port)`` in memory."""

    dial: bool = False  # an address this node connects to: port 0 is refused

    need = "string"

    def read(self, v: Any) -> tuple[str, int]:
        return _addr(STR.read(v), self.dial)

    def dump(self, v: tuple[str, int]) -> str:
        return format_addr(v)


@dataclass(frozen=True)
class Size(Kind):
    """Bytes, written ``64M`` or ``67108864``; ``why`` explains a block multiple or minimum."""

    positive: bool = False
    multiple: int = 1
    least: int = 0
    why: str = ""

    need = "size (e.g. 1G)"

    def read(self, v: Any) -> int:
        n = parse_size(v)
        why = f" ({self.why})" if self.why else ""
        if self.positive and n <= 0:
            raise ValueError(f"must be a positive size, got {v!r}")
        if n % self.multiple:
            raise ValueError(f"must be a multiple of {self.multiple} bytes{why}, got {v!r}")
        if n < self.least:
            raise ValueError(f"must be at least {self.least >> 20}M{why}, got {v!r}")
        return n


@dataclass(frozen=True)
class Int(Kind):
    lo: int = 0
    hi: int = 2**63

    def __post_init__(self) -> None:
        object.__setattr__(self, "need", f"integer in {self.lo}..{self.hi}")

    def read(self, v: Any) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or not self.lo <= v <= self.hi:
            raise ValueError(f"must be an {self.need}, got {v!r}")
        return v


@dataclass(frozen=True)
class Seconds(Kind):
    need = "positive number (seconds)"

    def read(self, v: Any) -> float:
        if not isinstance(v, int | float) or isinstance(v, bool) or not 0 < v < float("inf"):
            raise ValueError(f"must be a {self.need}, got {v!r}")
        return float(v)


@dataclass(frozen=True)
class Bool(Kind):
    need = "true or false"

    def read(self, v: Any) -> bool:
        if not isinstance(v, bool):
            raise ValueError(f"must be {self.need}, got {v!r}")
        return v


@dataclass(frozen=True)
class Strs(Kind):
    """A list of non-empty strings, a tuple in memory."""

    need = "list of strings"

    def read(self, v: Any) -> tuple[Any, ...]:
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ValueError(f"must be a {self.need}, got {v!r}")
        if not all(v):
            raise ValueError(f"must not hold an empty string, got {v!r}")
        return tuple(v)

    def dump(self, v: Any) -> list[Any]:
        return list(v)


@dataclass(frozen=True)
class Addrs(Kind):
    """A list of ``host:port``, each listed once."""

    dial: bool = False

    need = "list of strings"

    def read(self, v: Any) -> tuple[tuple[str, int], ...]:
        out: list[tuple[str, int]] = []
        for text in STRS.read(v):
            a = _addr(text, self.dial)
            if a in out:
                raise ValueError(f"{text} is listed twice")
            out.append(a)
        return tuple(out)

    def dump(self, v: Any) -> list[Any]:
        return [format_addr(a) for a in v]


@dataclass(frozen=True)
class Password(Str):
    """The web console's password: at least 8 characters; errors never show it."""

    def read(self, v: Any) -> str:
        if not isinstance(v, str):
            raise ValueError("must be a string; value not shown")
        if len(v) < CONSOLE_PASSWORD_MIN:
            raise ValueError(f"must be at least {CONSOLE_PASSWORD_MIN} characters; value not "
                             "shown")
        return v


STRS, SECONDS, BOOL, SECRET, PASSWORD = Strs(), Seconds(), Bool(), Secret(), Password()
ADDR, DIAL = Addr(), Addr(dial=True)


@dataclass(frozen=True)
class Entries(Kind):
    """An array of tables (``[[lun]]``), each entry a ``cls`` read by its own field keys."""

    cls: type


AS_FIELD: Any = object()  # Key.file_default: the file's default is the dataclass field's


