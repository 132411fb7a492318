"""Node configuration: one TOML file per node, the same inside and outside the lab.

Each loader checks everything a node needs before it starts and raises
:class:`ConfigError` with the file, the table, the key and what to write
instead. Every table lists the keys it knows: a typo (``windw``) is an error
that suggests the key that was meant, never a silently applied default.
Files that may hold secrets are written 0600.
"""

from __future__ import annotations

import builtins
import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from steelfusion.units import format_addr, parse_addr, parse_size

ROLES = ("primary", "secondary")

# The keys each table knows (the schema; to_dict() writes a subset of these).
CORE_KEYS = ("name", "role", "listen", "control", "state_dir", "log_file", "ping_interval",
             "dead_after")
REPLICATION_KEYS = ("peer", "interfaces", "witness", "window", "pair", "ha", "initial_sync",
                    "verify_interval", "verify_rate")
JOURNAL_KEYS = ("path", "size")
CORE_LUN_KEYS = ("id", "path", "size")
AUTH_KEYS = ("key_file", "key_id")
EDGE_KEYS = ("name", "portal", "control", "blockstore", "cores", "reserve", "cache_region",
             "window", "read_timeout", "log_file", "advertise", "ping_interval", "dead_after",
             "discovery_chap_user", "discovery_chap_secret", "discovery_mutual_user",
             "discovery_mutual_secret")
TARGET_KEYS = ("iqn", "alias", "lun", "chap_user", "chap_secret", "mutual_user", "mutual_secret",
               "initiators", "initiator")
TARGET_LUN_KEYS = ("lun", "lun_id", "size")
TARGET_INITIATOR_KEYS = ("name", "chap_user", "chap_secret")
EDGE_WITNESS_KEYS = ("listen", "state_dir")
WITNESS_KEYS = ("name", "listen", "state_dir", "control", "lease_seconds", "log_file")

# Top-level tables per config kind: name -> (is an array of tables, its keys).
_TOP: dict[str, dict[str, tuple[bool, tuple[str, ...]]]] = {
    "core": {"core": (False, CORE_KEYS), "replication": (False, REPLICATION_KEYS),
             "journal": (False, JOURNAL_KEYS), "lun": (True, CORE_LUN_KEYS),
             "auth": (False, AUTH_KEYS)},
    "edge": {"edge": (False, EDGE_KEYS), "target": (True, TARGET_KEYS),
             "witness": (False, EDGE_WITNESS_KEYS), "auth": (False, AUTH_KEYS)},
    "witness": {"witness": (False, WITNESS_KEYS), "auth": (False, AUTH_KEYS)},
}

_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
_WILDCARD = ("0.0.0.0", "::", "")
BACKEND_BLOCK = 512  # core/lunstore.py BLOCK: a LUN backend is a whole number of these
EDGE_LUN_BLOCK = 4096  # an exported LUN is a whole number of 4 KiB blocks
EDGE_RESERVE_MIN = 4 << 20  # below this host writes go a few at a time (issue 13)


class ConfigError(Exception):
    """A configuration file is missing, malformed or inconsistent."""


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


def _clash(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Two listen addresses that cannot both be bound (same port, same or wildcard host)."""
    return a[1] == b[1] != 0 and (a[0] == b[0] or a[0] in _WILDCARD or b[0] in _WILDCARD)


class _Reader:
    """Typed access to one TOML table, with errors that name file, table and key.

    ``where`` is how the table is shown: ``[core]``, ``[[lun]] #2``. The
    methods ``str``/``int``/``float``/``bool`` shadow the builtins inside the
    class body, so annotations after them spell ``builtins.str`` etc.
    """

    def __init__(self, path: Path | str, table: dict[str, Any], where: str) -> None:
        self.path = str(path)
        self.t = table
        self.where = where

    def _err(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.path}: {self.where} {key}: {msg}")

    def keys(self, allowed: Iterable[builtins.str]) -> None:
        """Refuse any key this table does not know, suggesting the closest known one."""
        allowed = tuple(allowed)
        for k in self.t:
            if k not in allowed:
                raise ConfigError(f"{self.path}: unknown key '{k}' in {self.where}"
                                  f"{_suggest(k, allowed)}")

    def str(self, key: builtins.str, default: builtins.str | None = None) -> builtins.str:
        v = self.t.get(key, default)
        if v is None:
            raise self._err(key, "required string")
        if not isinstance(v, str) or not v:
            raise self._err(key, f"must be a non-empty string, got {v!r}")
        return v

    def opt_str(self, key: builtins.str) -> builtins.str | None:
        v = self.t.get(key)
        if v is None:
            return None
        if not isinstance(v, str):
            raise self._err(key, f"must be a string, got {v!r}")
        return v

    def addr(self, key: builtins.str, default: builtins.str | None = None,
             dial: builtins.bool = False) -> tuple[builtins.str, builtins.int]:
        """``host:port``; ``dial``: an address this node connects to (port 0 is no port)."""
        return self.parse_addr(key, self.str(key, default), dial)

    def parse_addr(self, key: builtins.str, text: builtins.str,
                   dial: builtins.bool = False) -> tuple[builtins.str, builtins.int]:
        try:
            host, port = parse_addr(text)
        except ValueError as e:
            raise self._err(key, str(e)) from None
        if not host_ok(host):
            raise self._err(key, f"address {text!r}: host {host!r} is not an IP address or "
                                 "host name")
        if dial and port == 0:
            raise self._err(key, f"address {text!r}: port 0 cannot be dialled; give the "
                                 "port the other node listens on")
        return host, port

    def opt_addr(self, key: builtins.str,
                 dial: builtins.bool = False) -> tuple[builtins.str, builtins.int] | None:
        return self.addr(key, dial=dial) if self.t.get(key) is not None else None

    def size(self, key: builtins.str, default: builtins.str | builtins.int | None = None,
             positive: builtins.bool = False, multiple: builtins.int = 1) -> builtins.int:
        v = self.t.get(key, default)
        if v is None:
            raise self._err(key, "required size (e.g. 1G)")
        try:
            n = parse_size(v)
        except ValueError as e:
            raise self._err(key, str(e)) from None
        if positive and n <= 0:
            raise self._err(key, f"must be a positive size, got {v!r}")
        if n % multiple:
            raise self._err(key, f"must be a multiple of {multiple} bytes, got {v!r}")
        return n

    def int(self, key: builtins.str, default: builtins.int | None = None, lo: builtins.int = 0,
            hi: builtins.int = 2**63) -> builtins.int:
        v = self.t.get(key, default)
        if v is None:
            raise self._err(key, f"required integer in {lo}..{hi}")
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise self._err(key, f"must be an integer in {lo}..{hi}, got {v!r}")
        return v

    def float(self, key: builtins.str, default: builtins.float) -> builtins.float:
        v = self.t.get(key, default)
        if not isinstance(v, int | float) or isinstance(v, bool) or not 0 < v < float("inf"):
            raise self._err(key, f"must be a positive number (seconds), got {v!r}")
        return float(v)

    def bool(self, key: builtins.str, default: builtins.bool) -> builtins.bool:
        v = self.t.get(key, default)
        if not isinstance(v, bool):
            raise self._err(key, f"must be true or false, got {v!r}")
        return v

    def list_str(self, key: builtins.str,
                 default: list[builtins.str] | None = None) -> list[builtins.str]:
        v = self.t.get(key, default)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self._err(key, f"must be a list of strings, got {v!r}")
        if not all(v):
            raise self._err(key, f"must not hold an empty string, got {v!r}")
        return list(v)

    def tables(self, key: builtins.str, label: builtins.str, allowed: Iterable[builtins.str],
               of: builtins.str = "") -> list[_Reader]:
        """The entries of an array of tables, each checked against ``allowed``."""
        v = self.t.get(key, [])
        if isinstance(v, dict):
            raise ConfigError(f"{self.path}: {label}{of} must be an array of tables: write "
                              f"{label} (double brackets), not [{label.strip('[]')}]")
        if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
            raise ConfigError(f"{self.path}: {label}{of} must be an array of tables "
                              f"({label} entries), got {v!r}")
        out = [_Reader(self.path, t, f"{label} #{i + 1}{of}") for i, t in enumerate(v)]
        for r in out:
            r.keys(allowed)
        return out

    def table(self, key: builtins.str, allowed: Iterable[builtins.str],
              required: builtins.bool = True) -> _Reader:
        v = self.t.get(key)
        if v is None:
            if required:
                raise ConfigError(f"{self.path}: missing table [{key}]")
            v = {}
        if not isinstance(v, dict):
            raise ConfigError(f"{self.path}: [{key}] must be a table, got {v!r}")
        r = _Reader(self.path, v, f"[{key}]")
        r.keys(allowed)
        return r


def _load(path: Path | str, kind: str) -> _Reader:
    """Parse the file and refuse any top-level table or key ``kind`` does not know."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{p}: cannot read the config file (permission denied)") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML (not UTF-8: {e.reason})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    top = _TOP[kind]
    for k, v in data.items():
        if k in top:
            continue
        is_array = isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)
        if isinstance(v, dict) or is_array:
            shown = f"[[{k}]]" if is_array else f"[{k}]"
            fmt = "[[{}]]" if is_array else "[{}]"
            raise ConfigError(f"{p}: unknown table {shown}"
                              f"{_suggest(k, [n for n, (a, _) in top.items() if a == is_array], fmt)}")
        homes = [n for n, (_, keys) in top.items() if k in keys]
        hint = (f" (put it under [{homes[0]}])" if homes
                else _suggest(k, top, "[{}]"))
        raise ConfigError(f"{p}: unknown key '{k}' at the top level{hint}")
    return _Reader(p, data, "the top level")


def _auth(r: _Reader) -> None:
    """``[auth]`` (read by steelfusion/authconfig.py at start): check it here, once.

    The key file is read now so that a missing or group-readable key is a
    config error at load, not a traceback half-way through start-up.
    """
    if "auth" not in r.t:
        return
    a = r.table("auth", AUTH_KEYS)
    key_file = a.str("key_file")
    if "key_id" in a.t:
        a.str("key_id")
    from steelfusion.nodeauth import read_key_file

    try:
        read_key_file(key_file)
    except OSError as e:
        raise a._err("key_file", f"cannot read {key_file}: {e.strerror or e}") from None
    except ValueError as e:
        raise a._err("key_file", str(e)) from None


def _timers(r: _Reader) -> tuple[float, float]:
    """ping_interval and dead_after: a peer is declared dead only after missing some pings."""
    ping, dead = r.float("ping_interval", 1.0), r.float("dead_after", 5.0)
    if dead <= ping:
        raise r._err("dead_after", f"must be more than ping_interval ({ping}), got {dead}")
    return ping, dead


def write_toml(path: Path | str, data: dict[str, Any], mode: int = 0o600) -> None:
    """Atomic replace (temp, fsync, rename, fsync dir); files are 0600 by default."""
    from steelfusion.atomic import atomic_write

    atomic_write(path, tomli_w.dumps(data).encode(), mode=mode)


def _ha(r: _Reader) -> str:
    v = r.str("ha", "none")
    if v not in ("none", "leader", "follower"):
        raise r._err("ha", f"must be none, leader or follower, got {v!r}")
    return v


def _norm(p: str) -> str:
    return os.path.normpath(os.path.abspath(p))


@dataclass(frozen=True, slots=True)
class LunConfig:
    id: int
    path: str
    size: int  # bytes; created sparse if the file does not exist


@dataclass(frozen=True, slots=True)
class CoreConfig:
    name: str
    role: str
    listen: tuple[str, int]
    control: tuple[str, int]
    state_dir: str
    luns: tuple[LunConfig, ...]
    peer: tuple[str, int] | None = None
    interfaces: tuple[str, ...] = ("127.0.0.1",)
    witness: tuple[str, int] | None = None
    journal_path: str | None = None
    journal_size: int = 0
    log_file: str | None = None
    ping_interval: float = 1.0
    dead_after: float = 5.0
    mirror_window_bytes: int = 64 << 20
    pair: str = "pair-1"  # the replication pair's name at the Witness
    ha: str = "none"  # Core HA role here: none | leader | follower (must match the peer's)
    initial_sync: bool = True  # a new pair copies every LUN to the replica first
    verify_interval_s: float = 3600.0  # seconds between online verifies (and after each resync)
    verify_rate_bytes: int = 64 << 20  # per second, so the verify stays off the write path
    source: str = ""

    @classmethod
    def load(cls, path: Path | str) -> CoreConfig:
        r = _load(path, "core")
        c = r.table("core", CORE_KEYS)
        role = c.str("role", "primary")
        if role not in ROLES:
            raise c._err("role", f"must be one of {ROLES}, got {role!r}")
        listen, control = c.addr("listen"), c.addr("control")
        if _clash(listen, control):
            raise c._err("control", f"{format_addr(control)} is also [core] listen")
        luns = []
        seen: dict[int, str] = {}
        paths: dict[str, str] = {}
        for lr in r.tables("lun", "[[lun]]", CORE_LUN_KEYS):
            lid = lr.int("id", lo=0, hi=2**32 - 1)
            if lid in seen:
                raise lr._err("id", f"LUN id {lid} appears twice (also in {seen[lid]})")
            seen[lid] = lr.where
            lpath = lr.str("path")
            if _norm(lpath) in paths:
                raise lr._err("path", f"{lpath} is also the path of {paths[_norm(lpath)]}")
            paths[_norm(lpath)] = lr.where
            size = lr.size("size", 0)
            if size % BACKEND_BLOCK:
                raise lr._err("size", f"must be a multiple of {BACKEND_BLOCK} bytes (or 0: the "
                                      f"backend's own size), got {lr.t.get('size')!r}")
            luns.append(LunConfig(lid, lpath, size))
        rep = r.table("replication", REPLICATION_KEYS, required=False)
        peer = rep.opt_addr("peer", dial=True)
        if peer is not None and peer == listen:
            raise rep._err("peer", f"{format_addr(peer)} is this Core's own [core] listen "
                                   "address; give the other Core's")
        witness = rep.opt_addr("witness", dial=True)
        interfaces = rep.list_str("interfaces", ["127.0.0.1"])
        for iface in interfaces:
            if not host_ok(iface):
                raise rep._err("interfaces", f"{iface!r} is not an IP address or host name")
        if peer is not None and not interfaces:
            raise rep._err("interfaces", "list at least one local address (two replication "
                                         "connections are made per interface)")
        j = r.table("journal", JOURNAL_KEYS, required=False)
        journal_path = j.str("path") if j.t else None
        if journal_path is not None and _norm(journal_path) in paths:
            raise j._err("path", f"{journal_path} is also the path of "
                                 f"{paths[_norm(journal_path)]}")
        ping, dead = _timers(c)
        _auth(r)
        return cls(
            name=c.str("name"), role=role, listen=listen, control=control,
            state_dir=c.str("state_dir"), luns=tuple(luns), peer=peer,
            interfaces=tuple(interfaces), witness=witness,
            journal_path=journal_path, journal_size=j.size("size", 0),
            log_file=c.opt_str("log_file"), ping_interval=ping, dead_after=dead,
            mirror_window_bytes=rep.size("window", 64 << 20, positive=True),
            pair=rep.str("pair", "pair-1"),
            initial_sync=rep.bool("initial_sync", True), ha=_ha(rep),
            verify_interval_s=rep.float("verify_interval", 3600.0),
            verify_rate_bytes=rep.size("verify_rate", 64 << 20, positive=True),
            source=str(path))

    def to_dict(self) -> dict[str, Any]:
        core: dict[str, Any] = {"name": self.name, "role": self.role,
                                "listen": format_addr(self.listen),
                                "control": format_addr(self.control), "state_dir": self.state_dir,
                                "ping_interval": self.ping_interval, "dead_after": self.dead_after}
        if self.log_file:
            core["log_file"] = self.log_file
        rep: dict[str, Any] = {"interfaces": list(self.interfaces),
                               "window": self.mirror_window_bytes, "pair": self.pair,
                               "ha": self.ha,
                               "initial_sync": self.initial_sync,
                               "verify_interval": self.verify_interval_s,
                               "verify_rate": self.verify_rate_bytes}
        if self.peer:
            rep["peer"] = format_addr(self.peer)
        if self.witness:
            rep["witness"] = format_addr(self.witness)
        out: dict[str, Any] = {"core": core, "replication": rep,
                               "lun": [{"id": lu.id, "path": lu.path, "size": lu.size}
                                       for lu in self.luns]}
        if self.journal_path:
            out["journal"] = {"path": self.journal_path, "size": self.journal_size}
        return out


@dataclass(frozen=True, slots=True)
class EdgeLunConfig:
    lun: int  # SCSI LUN number inside the target
    lun_id: int  # the Core's LUN id
    size: int


CHAP_SECRET_MIN = 12  # RFC 7143 §12.1.3: at least 96 bits
CHAP_SECRET_MAX = 255


@dataclass(frozen=True, slots=True)
class InitiatorChapConfig:
    """Per-initiator CHAP credentials inside a ``[[target]]`` (``[[target.initiator]]``)."""

    name: str
    chap_user: str
    chap_secret: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class TargetConfig:
    """One ``[[target]]``: its LUNs and who may log in (RFC 7143 §12).

    ``chap_user``/``chap_secret``: initiators must authenticate with CHAP;
    ``mutual_user``/``mutual_secret``: the target's own credentials for mutual
    CHAP; ``initiators``: IQN allow-list (None: any initiator);
    ``initiator_chap``: per-initiator credentials overriding the target's.
    Secrets are kept out of ``repr`` so they never reach a log."""

    iqn: str
    luns: tuple[EdgeLunConfig, ...]
    alias: str | None = None
    chap_user: str | None = None
    chap_secret: str | None = field(default=None, repr=False)
    mutual_user: str | None = None
    mutual_secret: str | None = field(default=None, repr=False)
    initiators: tuple[str, ...] | None = None
    initiator_chap: tuple[InitiatorChapConfig, ...] = ()

    def auth_dict(self) -> dict[str, Any]:
        """The CHAP/ACL keys for ``to_dict`` (only those set)."""
        out: dict[str, Any] = {}
        for k in ("chap_user", "chap_secret", "mutual_user", "mutual_secret"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        if self.initiators is not None:
            out["initiators"] = list(self.initiators)
        if self.initiator_chap:
            out["initiator"] = [{"name": c.name, "chap_user": c.chap_user,
                                 "chap_secret": c.chap_secret} for c in self.initiator_chap]
        return out


def _chap_pair(r: _Reader, user_key: str, secret_key: str) -> tuple[str | None, str | None]:
    """Read a CHAP user/secret pair: both or neither, secret 12..255 bytes."""
    user, secret = r.opt_str(user_key), r.opt_str(secret_key)
    if (user is None) != (secret is None):
        raise r._err(user_key if user is None else secret_key,
                     f"set both {user_key} and {secret_key}, or neither")
    if secret is not None and not CHAP_SECRET_MIN <= len(secret.encode()) <= CHAP_SECRET_MAX:
        raise r._err(secret_key, f"must be {CHAP_SECRET_MIN}..{CHAP_SECRET_MAX} bytes "
                                 "(RFC 7143 §12.1.3); value not shown")
    if user == "":
        raise r._err(user_key, "must not be empty")
    return user, secret


def _target_auth(tr: _Reader) -> dict[str, Any]:
    chap_user, chap_secret = _chap_pair(tr, "chap_user", "chap_secret")
    mutual_user, mutual_secret = _chap_pair(tr, "mutual_user", "mutual_secret")
    initiators = tuple(tr.list_str("initiators")) if tr.t.get("initiators") is not None \
        else None
    per = []
    names: set[str] = set()
    for ir in tr.tables("initiator", "[[target.initiator]]", TARGET_INITIATOR_KEYS,
                        of=f" of {tr.where}"):
        u, sec = _chap_pair(ir, "chap_user", "chap_secret")
        if u is None or sec is None:
            raise ir._err("chap_user", "an [[target.initiator]] entry needs chap_user and "
                                       "chap_secret")
        name = ir.str("name")
        if name in names:
            raise ir._err("name", f"initiator {name!r} appears twice in this target")
        names.add(name)
        per.append(InitiatorChapConfig(name, u, sec))
    if mutual_secret is not None and mutual_secret in {chap_secret, *(c.chap_secret for c in per)}:
        raise tr._err("mutual_secret", "must differ from the initiator secrets "
                                       "(RFC 7143 §12.1.3)")
    return {"chap_user": chap_user, "chap_secret": chap_secret, "mutual_user": mutual_user,
            "mutual_secret": mutual_secret, "initiators": initiators,
            "initiator_chap": tuple(per)}


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    name: str
    portal: tuple[str, int]
    control: tuple[str, int]
    blockstore: str
    cores: tuple[tuple[str, int], ...]
    targets: tuple[TargetConfig, ...]
    reserve_bytes: int = 256 << 20
    cache_region_bytes: int = 64 << 10
    window_bytes: int = 32 << 20
    read_timeout: float = 30.0
    log_file: str | None = None
    advertise: str | None = None
    ping_interval: float = 1.0
    dead_after: float = 5.0
    witness: tuple[str, int] | None = None  # run a Witness inside this Edge on this address
    witness_state_dir: str | None = None
    source: str = ""
    discovery_chap_user: str | None = None  # discovery sessions must use CHAP
    discovery_chap_secret: str | None = field(default=None, repr=False)
    discovery_mutual_user: str | None = None
    discovery_mutual_secret: str | None = field(default=None, repr=False)

    @classmethod
    def load(cls, path: Path | str) -> EdgeConfig:
        r = _load(path, "edge")
        e = r.table("edge", EDGE_KEYS)
        targets = []
        lun_ids: dict[int, str] = {}
        iqns: dict[str, str] = {}
        for tr in r.tables("target", "[[target]]", TARGET_KEYS):
            luns = []
            scsi_luns: set[int] = set()
            for lr in tr.tables("lun", "[[target.lun]]", TARGET_LUN_KEYS, of=f" of {tr.where}"):
                ent = EdgeLunConfig(lr.int("lun", lo=0, hi=255),
                                    lr.int("lun_id", lo=0, hi=2**32 - 1),
                                    lr.size("size", positive=True, multiple=EDGE_LUN_BLOCK))
                if ent.lun in scsi_luns:
                    raise lr._err("lun", f"SCSI LUN {ent.lun} appears twice in this target")
                scsi_luns.add(ent.lun)
                if ent.lun_id in lun_ids:
                    raise lr._err("lun_id", f"LUN id {ent.lun_id} exported twice (also in "
                                            f"{lun_ids[ent.lun_id]})")
                lun_ids[ent.lun_id] = lr.where
                luns.append(ent)
            iqn = tr.str("iqn")
            if not (iqn.startswith("iqn.") or iqn.startswith("eui.") or iqn.startswith("naa.")):
                raise tr._err("iqn", f"{iqn!r} must start with iqn., eui. or naa.")
            if iqn in iqns:
                raise tr._err("iqn", f"{iqn!r} is also the iqn of {iqns[iqn]}")
            iqns[iqn] = tr.where
            targets.append(TargetConfig(iqn, tuple(luns), tr.opt_str("alias"),
                                        **_target_auth(tr)))
        if not targets:
            raise ConfigError(f"{path}: no [[target]] defined; an Edge exports at least one")
        cores: list[tuple[str, int]] = []
        for a in e.list_str("cores"):
            c = e.parse_addr("cores", a, dial=True)
            if c in cores:
                raise e._err("cores", f"{a} is listed twice")
            cores.append(c)
        if not cores:
            raise e._err("cores", "list at least one Core address")
        portal, control = e.addr("portal"), e.addr("control")
        if _clash(portal, control):
            raise e._err("control", f"{format_addr(control)} is also [edge] portal")
        w = r.table("witness", EDGE_WITNESS_KEYS, required=False)
        witness = w.opt_addr("listen")
        if witness is not None:
            for other, what in ((portal, "portal"), (control, "control")):
                if _clash(witness, other):
                    raise w._err("listen", f"{format_addr(witness)} is also [edge] {what}")
        elif w.t.get("state_dir") is not None:
            raise w._err("listen", "required when [witness] state_dir is set (the embedded "
                                   "Witness listens there)")
        d_user, d_secret = _chap_pair(e, "discovery_chap_user", "discovery_chap_secret")
        dm_user, dm_secret = _chap_pair(e, "discovery_mutual_user", "discovery_mutual_secret")
        if dm_secret is not None and dm_secret == d_secret:
            raise e._err("discovery_mutual_secret", "must differ from discovery_chap_secret")
        advertise = e.opt_str("advertise")
        if advertise is not None:
            if advertise.startswith("[") or advertise.count(":") == 1:
                e.parse_addr("advertise", advertise)
            elif not host_ok(advertise):
                raise e._err("advertise", f"{advertise!r} is not host or host:port")
        ping, dead = _timers(e)
        _auth(r)
        reserve = e.size("reserve", 256 << 20)
        if reserve < EDGE_RESERVE_MIN:
            raise e._err("reserve", f"must be at least {EDGE_RESERVE_MIN >> 20}M (room for a few "
                                    f"512 KiB writes in flight), got {e.t.get('reserve')!r}")
        return cls(
            discovery_chap_user=d_user, discovery_chap_secret=d_secret,
            discovery_mutual_user=dm_user, discovery_mutual_secret=dm_secret,
            name=e.str("name"), portal=portal, control=control,
            blockstore=e.str("blockstore"), cores=tuple(cores), targets=tuple(targets),
            reserve_bytes=reserve,
            cache_region_bytes=e.size("cache_region", 64 << 10, positive=True,
                                      multiple=BACKEND_BLOCK),
            window_bytes=e.size("window", 32 << 20, positive=True),
            read_timeout=e.float("read_timeout", 30.0),
            log_file=e.opt_str("log_file"), advertise=advertise,
            ping_interval=ping, dead_after=dead,
            witness=witness, witness_state_dir=w.opt_str("state_dir"), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        edge: dict[str, Any] = {
            "name": self.name, "portal": format_addr(self.portal),
            "control": format_addr(self.control), "blockstore": self.blockstore,
            "cores": [format_addr(c) for c in self.cores], "reserve": self.reserve_bytes,
            "cache_region": self.cache_region_bytes, "window": self.window_bytes,
            "read_timeout": self.read_timeout, "ping_interval": self.ping_interval,
            "dead_after": self.dead_after}
        if self.log_file:
            edge["log_file"] = self.log_file
        if self.advertise:
            edge["advertise"] = self.advertise
        for k in ("discovery_chap_user", "discovery_chap_secret", "discovery_mutual_user",
                  "discovery_mutual_secret"):
            if getattr(self, k) is not None:
                edge[k] = getattr(self, k)
        out: dict[str, Any] = {"edge": edge, "target": [
            {"iqn": t.iqn, **({"alias": t.alias} if t.alias else {}), **t.auth_dict(),
             "lun": [{"lun": lu.lun, "lun_id": lu.lun_id, "size": lu.size} for lu in t.luns]}
            for t in self.targets]}
        if self.witness:
            out["witness"] = {"listen": format_addr(self.witness),
                              **({"state_dir": self.witness_state_dir}
                                 if self.witness_state_dir else {})}
        return out


@dataclass(frozen=True, slots=True)
class WitnessConfig:
    name: str
    listen: tuple[str, int]
    state_dir: str
    control: tuple[str, int] | None = None
    lease_seconds: float = 5.0
    log_file: str | None = None
    source: str = ""

    @classmethod
    def load(cls, path: Path | str) -> WitnessConfig:
        r = _load(path, "witness")
        w = r.table("witness", WITNESS_KEYS)
        listen = w.addr("listen")
        control = w.opt_addr("control")
        if control is not None and _clash(listen, control):
            raise w._err("control", f"{format_addr(control)} is also [witness] listen")
        _auth(r)
        return cls(name=w.str("name"), listen=listen, state_dir=w.str("state_dir"),
                   control=control, lease_seconds=w.float("lease_seconds", 5.0),
                   log_file=w.opt_str("log_file"), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        w: dict[str, Any] = {"name": self.name, "listen": format_addr(self.listen),
                             "state_dir": self.state_dir, "lease_seconds": self.lease_seconds}
        if self.control:
            w["control"] = format_addr(self.control)
        if self.log_file:
            w["log_file"] = self.log_file
        return {"witness": w}


