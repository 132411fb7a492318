"""Node configuration: one TOML file per node, the same inside and outside the lab.

Each config field is written once: its dataclass field carries a :class:`Key`
(``field(metadata=toml("replication.window", Size(positive=True)))``) that
says where the value lives in the file and how it is read, checked and
written back. One generic reader and one writer follow those keys, so the
loader, the list of known keys and ``to_dict`` cannot drift apart. Rules that
span several fields (clashing addresses, duplicate LUN ids, dead_after >
ping_interval) are explicit code in each config's ``_check``.

A loader raises :class:`ConfigError` with the file, the table, the key and
what to write instead. A typo (``windw``) is an error that suggests the key
that was meant, never a silently applied default. Files that may hold
secrets are written 0600.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterable
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Self

import tomli_w

from steelfusion.configkinds import (
    ADDR,
    AS_FIELD,
    BACKEND_BLOCK,
    BOOL,
    CHAP_SECRET_MAX,
    CHAP_SECRET_MIN,
    CONSOLE_PASSWORD_MIN,
    DIAL,
    EDGE_LUN_BLOCK,
    EDGE_RESERVE_MIN,
    HA_ROLES,
    PASSWORD,
    ROLES,
    SECONDS,
    SECRET,
    STR,
    STRS,
    TEXT,
    Addr,
    Addrs,
    Bool,
    Choice,
    ConfigError,
    Entries,
    Int,
    Kind,
    Password,
    Seconds,
    Secret,
    Size,
    Str,
    Strs,
    _addr,
    _clash,
    _norm,
    _suggest,
    host_ok,
    load_json,
)
from steelfusion.units import format_addr


@dataclass(frozen=True, slots=True)
class Key:
    """Where one dataclass field lives in the file and how it is read.

    ``table`` "" is the field's own table: the document for a node config, the
    entry for an ``[[lun]]``-like one. ``file_default``: the file's default when the
    dataclass has none (``role``). ``check``: a per-field rule raising
    ValueError. ``needs``: a key of the same table without which this one
    means nothing (it is refused alone, and not written when that one is unset).
    """

    table: str
    key: str
    kind: Kind
    file_default: Any = AS_FIELD
    check: Callable[[Any], None] | None = None
    needs: str | None = None


def toml(where: str, kind: Kind, **kw: Any) -> dict[str, Key]:
    """The metadata of a config field: ``toml("replication.window", Size())``."""
    table, _, key = where.rpartition(".")
    return {"toml": Key(table, key, kind, **kw)}


NOT_IN_FILE: dict[str, Key | None] = {"toml": None}  # e.g. ``source``: where it was loaded from


def _spec(cls: type) -> list[tuple[Field[Any], Key]]:
    """The fields of ``cls`` kept in the file, with their keys; a field without a spec is a bug."""
    out = []
    for f in fields(cls):
        if "toml" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} has no toml(...) spec")
        if f.metadata["toml"] is not None:
            out.append((f, f.metadata["toml"]))
    return out


def _layout(cls: type) -> dict[str, tuple[bool, tuple[str, ...]]]:
    """The top-level tables of a node config file: name -> (array of tables?, its keys)."""
    out: dict[str, tuple[bool, tuple[str, ...]]] = {}
    for c in (cls, AuthConfig):
        for _, k in _spec(c):
            if isinstance(k.kind, Entries):
                out[k.key] = (True, tuple(e.key for _, e in _spec(k.kind.cls)))
            else:
                is_array, keys = out.get(k.table, (False, ()))
                out[k.table] = (is_array, (*keys, k.key))
    return out


class _Errors:
    """``bad(where, key, msg)``: the one-line error naming file, table and key."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)

    def __call__(self, where: str, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.path}: {where} {key}: {msg}")


def _known(path: str, where: str, t: dict[str, Any], allowed: Iterable[str]) -> None:
    """Refuse any key the table does not know, suggesting the closest known one."""
    allowed = tuple(allowed)
    for k in t:
        if k not in allowed:
            raise ConfigError(f"{path}: unknown key '{k}' in {where}{_suggest(k, allowed)}")


def _parse(path: Path | str, cls: type) -> dict[str, Any]:
    """Parse the file and refuse any top-level table or key ``cls`` does not know."""
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
    top = _layout(cls)
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
    return data


def _read(cls: type, t: dict[str, Any], path: str, where: str, outer: str = "",
          **extra: Any) -> Any:
    """An instance of ``cls`` from ``t``: a whole document, or one entry of an array of tables.

    ``where`` is how ``t`` is shown in errors (``[[lun]] #2``); ``outer`` is the
    dotted name of the enclosing array (``target.``) for nested arrays; ``extra``:
    the fields not in the file.
    """
    bad = _Errors(path)
    tables: dict[str, list[tuple[Field[Any], Key]]] = {}
    for f, k in _spec(cls):
        tables.setdefault(k.table, []).append((f, k))
    values: dict[str, Any] = {}
    for name, keys in tables.items():
        sub: Any = t
        w = where
        if name:
            w, sub = f"[{name}]", t.get(name)
            if sub is None:
                if any(_default(f, k) is MISSING for f, k in keys):
                    raise ConfigError(f"{path}: missing table [{name}]")
                sub = {}
            if isinstance(sub, list) and sub and all(isinstance(x, dict) for x in sub):
                raise ConfigError(f"{path}: [{name}] must be a table: write [{name}] (single "
                                  f"brackets), not [[{name}]]")
            if not isinstance(sub, dict):
                raise ConfigError(f"{path}: [{name}] must be a table, got {sub!r}")
            _known(path, w, sub, (k.key for _, k in keys))
        for f, k in keys:
            if isinstance(k.kind, Entries):
                values[f.name] = _entries(k.kind.cls, sub, k.key, path, w, outer)
                continue
            raw = sub.get(k.key)
            if raw is None:
                values[f.name] = _default(f, k)
                if values[f.name] is MISSING:
                    raise bad(w, k.key, f"required {k.kind.need}")
                continue
            if k.needs is not None and sub.get(k.needs) is None:
                raise bad(w, k.needs, f"required when {w} {k.key} is set")
            try:
                values[f.name] = k.kind.read(raw)
                if k.check is not None:
                    k.check(values[f.name])
            except ValueError as e:
                raise bad(w, k.key, str(e)) from None
    return cls(**values, **extra)


def _default(f: Field[Any], k: Key) -> Any:
    return f.default if k.file_default is AS_FIELD else k.file_default


def _entries(cls: type, t: dict[str, Any], key: str, path: str, where: str,
             outer: str) -> tuple[Any, ...]:
    """The entries of the array of tables ``t[key]``, each checked against ``cls``'s keys."""
    label, of = f"[[{outer}{key}]]", f" of {where}" if outer else ""
    v = t.get(key, [])
    if isinstance(v, dict):
        raise ConfigError(f"{path}: {label}{of} must be an array of tables: write "
                          f"{label} (double brackets), not [{outer}{key}]")
    if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
        raise ConfigError(f"{path}: {label}{of} must be an array of tables "
                          f"({label} entries), got {v!r}")
    out = []
    for i, e in enumerate(v):
        w = f"{label} #{i + 1}{of}"
        _known(path, w, e, (k.key for _, k in _spec(cls)))
        out.append(_read(cls, e, path, w, f"{outer}{key}."))
    return tuple(out)


def _dump(obj: Any) -> dict[str, Any]:
    """The TOML document of ``obj``: every key set (None is not written; nor is an empty array)."""
    spec = _spec(type(obj))
    by_key = {(k.table, k.key): f.name for f, k in spec}
    out: dict[str, Any] = {}
    for f, k in spec:
        v = getattr(obj, f.name)
        if v is None or (k.needs and getattr(obj, by_key[k.table, k.needs]) is None):
            continue
        if isinstance(k.kind, Entries):
            if not v:
                continue
            v = [_dump(e) for e in v]
        else:
            v = k.kind.dump(v)
        (out.setdefault(k.table, {}) if k.table else out)[k.key] = v
    return out


class _NodeFile:
    """``load`` and ``to_dict`` of a node config, both driven by its fields' keys."""

    __slots__ = ()

    @classmethod
    def load(cls, path: Path | str) -> Self:
        data = _parse(path, cls)
        cfg: Self = _read(cls, data, str(path), "the top level", source=str(path))
        cfg._check(_Errors(path))
        if "auth" in data:
            _read(AuthConfig, data, str(path), "the top level")
        return cfg

    def _check(self, bad: _Errors) -> None:
        """The rules that span several fields (one field's rules are in its Key)."""

    def to_dict(self) -> dict[str, Any]:
        return _dump(self)


def write_toml(path: Path | str, data: dict[str, Any], mode: int = 0o600) -> None:
    """Atomic replace (temp, fsync, rename, fsync dir); files are 0600 by default."""
    from steelfusion.atomic import atomic_write

    atomic_write(path, tomli_w.dumps(data).encode(), mode=mode)


# -- per-field rules (a ValueError names what is wrong; the reader adds file, table, key)


def _hosts(v: tuple[str, ...]) -> None:
    for host in v:
        if not host_ok(host):
            raise ValueError(f"{host!r} is not an IP address or host name")


def _some_core(v: tuple[tuple[str, int], ...]) -> None:
    if not v:
        raise ValueError("list at least one Core address")


def _iqn(v: str) -> None:
    if not v.startswith(("iqn.", "eui.", "naa.")):
        raise ValueError(f"{v!r} must start with iqn., eui. or naa.")


def _advertise(v: str) -> None:
    if v.startswith("[") or v.count(":") == 1:
        _addr(v)
    elif not host_ok(v):
        raise ValueError(f"{v!r} is not host or host:port")


def _key_file(v: str) -> None:
    """Read the key now: a missing or group-readable key is a config error at load, not a
    traceback half-way through start-up."""
    from steelfusion.nodeauth import read_key_file

    try:
        read_key_file(v)
    except OSError as e:
        raise ValueError(f"cannot read {v}: {e.strerror or e}") from None


# -- cross-field rules


def _timers(bad: _Errors, where: str, ping: float, dead: float) -> None:
    """A peer is declared dead only after missing some pings."""
    if dead <= ping:
        raise bad(where, "dead_after", f"must be more than ping_interval ({ping}), got {dead}")


def _chap_pair(bad: _Errors, where: str, user_key: str, user: str | None, secret_key: str,
               secret: str | None) -> None:
    """A CHAP user and its secret: both or neither."""
    if (user is None) != (secret is None):
        raise bad(where, user_key if user is None else secret_key,
                  f"set both {user_key} and {secret_key}, or neither")


def _observe(bad: _Errors, cfg: Any, own: dict[str, tuple[str, int] | None]) -> None:
    """``[metrics] listen`` and ``[console] listen`` (issue 15): off unless set, each on a
    port of its own, and no console without its password."""
    addrs = {**own, "[metrics] listen": cfg.metrics}
    console = getattr(cfg, "console", None)
    if console is not None:
        addrs["[console] listen"] = console
        if cfg.console_password is None:
            raise bad("[console]", "password", "required when [console] listen is set (the "
                      "console's login; not the node key)")
    seen: list[tuple[str, tuple[str, int]]] = []
    for key, a in addrs.items():
        if a is None:
            continue
        for other, b in seen:
            if _clash(a, b):
                table, _, name = key.partition(" ")
                raise bad(table, name, f"{format_addr(a)} is also {other}")
        seen.append((key, a))


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """``[auth]``, used by steelfusion/authconfig.py at start; checked here, once, at load."""

    key_file: str = field(metadata=toml("auth.key_file", STR, check=_key_file))
    key_id: str | None = field(default=None, metadata=toml("auth.key_id", STR))


@dataclass(frozen=True, slots=True)
class LunConfig:
    id: int = field(metadata=toml("id", Int(0, 2**32 - 1)))
    path: str = field(metadata=toml("path", STR))
    # bytes; created sparse if the file does not exist; 0: the backend's own size
    size: int = field(metadata=toml("size", Size(multiple=BACKEND_BLOCK, why="or 0: the "
                                                 "backend's own size"), file_default=0))


@dataclass(frozen=True, slots=True)
class CoreConfig(_NodeFile):
    name: str = field(metadata=toml("core.name", STR))
    role: str = field(metadata=toml("core.role", Choice(ROLES), file_default="primary"))
    listen: tuple[str, int] = field(metadata=toml("core.listen", ADDR))
    control: tuple[str, int] = field(metadata=toml("core.control", ADDR))
    state_dir: str = field(metadata=toml("core.state_dir", STR))
    luns: tuple[LunConfig, ...] = field(metadata=toml("lun", Entries(LunConfig)))
    peer: tuple[str, int] | None = field(default=None, metadata=toml("replication.peer", DIAL))
    # two replication connections are made per interface
    interfaces: tuple[str, ...] = field(
        default=("127.0.0.1",), metadata=toml("replication.interfaces", STRS, check=_hosts))
    witness: tuple[str, int] | None = field(default=None,
                                            metadata=toml("replication.witness", DIAL))
    journal_path: str | None = field(default=None, metadata=toml("journal.path", STR))
    journal_size: int = field(default=0, metadata=toml("journal.size", Size(), needs="path"))
    log_file: str | None = field(default=None, metadata=toml("core.log_file", TEXT))
    ping_interval: float = field(default=1.0, metadata=toml("core.ping_interval", SECONDS))
    dead_after: float = field(default=5.0, metadata=toml("core.dead_after", SECONDS))
    # connect every iscsi:// LUN through this address instead of the URL's portal (the lab's
    # per-Core path to its array, steelfusion/sanpath.py: a cable it can pull)
    san_via: tuple[str, int] | None = field(default=None, metadata=toml("core.san_via", DIAL))
    mirror_window_bytes: int = field(default=64 << 20,
                                     metadata=toml("replication.window", Size(positive=True)))
    # the replication pair's name at the Witness
    pair: str = field(default="pair-1", metadata=toml("replication.pair", STR))
    # Core HA role here (must match the peer's)
    ha: str = field(default="none", metadata=toml("replication.ha", Choice(HA_ROLES)))
    # where this Core's HA partner serves the peer's LUNs after a takeover (Core HA, issue 16):
    # the dialler tries ``peer`` first, then these
    peer_alternates: tuple[tuple[str, int], ...] = field(
        default=(), metadata=toml("replication.peer_alternates", Addrs(dial=True)))
    # Core HA (issue 16, seed "FusionSync and Core HA"): the partner Core in this data
    # center, its config (to take its LUNs over), the HA heartbeat link, and where this Core
    # serves the partner's LUNs and control after a takeover
    ha_partner: str | None = field(default=None, metadata=toml("ha.partner", STR))
    ha_datacenter: str | None = field(default=None, metadata=toml("ha.datacenter", STR))
    ha_listen: tuple[str, int] | None = field(default=None, metadata=toml("ha.listen", ADDR))
    ha_partner_address: tuple[str, int] | None = field(
        default=None, metadata=toml("ha.partner_address", DIAL))
    ha_partner_config: str | None = field(default=None, metadata=toml("ha.partner_config", STR))
    ha_takeover_listen: tuple[str, int] | None = field(
        default=None, metadata=toml("ha.takeover_listen", ADDR))
    ha_takeover_control: tuple[str, int] | None = field(
        default=None, metadata=toml("ha.takeover_control", ADDR))
    # seconds the partner must be unreachable (after dead_after) before a takeover; the
    # follower adds this again, so in a split the leader fences first
    ha_takeover_grace: float = field(default=1.0, metadata=toml("ha.takeover_grace", SECONDS,
                                                             needs="partner"))
    # a new pair copies every LUN to the replica first
    initial_sync: bool = field(default=True, metadata=toml("replication.initial_sync", BOOL))
    # seconds between online verifies (and after each resync)
    verify_interval_s: float = field(default=3600.0,
                                     metadata=toml("replication.verify_interval", SECONDS))
    # per second, so the verify stays off the write path
    verify_rate_bytes: int = field(default=64 << 20,
                                   metadata=toml("replication.verify_rate", Size(positive=True)))
    # Prometheus metrics and the web console (issue 15): off unless set
    metrics: tuple[str, int] | None = field(default=None, metadata=toml("metrics.listen", ADDR))
    console: tuple[str, int] | None = field(default=None, metadata=toml("console.listen", ADDR))
    console_password: str | None = field(default=None, repr=False,
                                         metadata=toml("console.password", PASSWORD,
                                                       needs="listen"))
    source: str = field(default="", metadata=NOT_IN_FILE)

    def _check(self, bad: _Errors) -> None:
        if _clash(self.listen, self.control):
            raise bad("[core]", "control", f"{format_addr(self.control)} is also [core] listen")
        _observe(bad, self, {"[core] listen": self.listen, "[core] control": self.control})
        ids: dict[int, str] = {}
        paths: dict[str, str] = {}
        for i, lu in enumerate(self.luns):
            w = f"[[lun]] #{i + 1}"
            if lu.id in ids:
                raise bad(w, "id", f"LUN id {lu.id} appears twice (also in {ids[lu.id]})")
            ids[lu.id] = w
            if _norm(lu.path) in paths:
                raise bad(w, "path", f"{lu.path} is also the path of {paths[_norm(lu.path)]}")
            paths[_norm(lu.path)] = w
        if self.peer is not None and self.peer == self.listen:
            raise bad("[replication]", "peer", f"{format_addr(self.peer)} is this Core's own "
                                               "[core] listen address; give the other Core's")
        if self.peer is not None and not self.interfaces:
            raise bad("[replication]", "interfaces", "list at least one local address (two "
                                                     "replication connections are made per "
                                                     "interface)")
        if self.journal_path is not None and _norm(self.journal_path) in paths:
            raise bad("[journal]", "path", f"{self.journal_path} is also the path of "
                                           f"{paths[_norm(self.journal_path)]}")
        _timers(bad, "[core]", self.ping_interval, self.dead_after)
        _check_ha(bad, self)


HA_KEYS = ("partner", "datacenter", "listen", "partner_address", "partner_config",
           "takeover_listen", "takeover_control")


def _check_ha(bad: _Errors, c: CoreConfig) -> None:
    """Core HA needs all of ``[ha]`` and its LUNs on the array (fencing is SCSI-3 persistent
    reservations, steelfusion/fence.py); without HA, no ``[ha]`` at all."""
    from steelfusion.blockdev import is_san

    given = [k for k in HA_KEYS if getattr(c, f"ha_{k}") is not None]
    if c.ha == "none":
        if given:
            raise bad("[ha]", given[0], "set [replication] ha = \"leader\" or \"follower\" "
                                        "to use Core HA, or remove the [ha] table")
        return
    for k in HA_KEYS:
        if getattr(c, f"ha_{k}") is None:
            raise bad("[ha]", k, f"required with [replication] ha = {c.ha!r}")
    if c.ha_partner == c.name:
        raise bad("[ha]", "partner", "names this Core itself; give the other Core of the pair")
    own = [("[core] listen", c.listen), ("[core] control", c.control)]
    for key in ("listen", "takeover_listen", "takeover_control"):
        a = getattr(c, f"ha_{key}")
        for what, b in own:
            if _clash(a, b):
                raise bad("[ha]", key, f"{format_addr(a)} is also {what}")
        own.append((f"[ha] {key}", a))
    for i, lu in enumerate(c.luns):
        if not is_san(lu.path):
            raise bad(f"[[lun]] #{i + 1}", "path", "Core HA needs the LUN on the array "
                      "(iscsi://...): the partner must reach it, and fencing uses SCSI-3 "
                      "persistent reservations")
    if c.journal_path is None or not is_san(c.journal_path):
        raise bad("[journal]", "path", "Core HA needs the pair's shared Journal LUN on the "
                  "array (iscsi://...#part=1/2 for one Core, #part=2/2 for the other)")


@dataclass(frozen=True, slots=True)
class EdgeLunConfig:
    lun: int = field(metadata=toml("lun", Int(0, 255)))  # SCSI LUN number inside the target
    lun_id: int = field(metadata=toml("lun_id", Int(0, 2**32 - 1)))  # the Core's LUN id
    size: int = field(metadata=toml("size", Size(positive=True, multiple=EDGE_LUN_BLOCK)))


@dataclass(frozen=True, slots=True)
class InitiatorChapConfig:
    """Per-initiator CHAP credentials inside a ``[[target]]`` (``[[target.initiator]]``)."""

    name: str = field(metadata=toml("name", STR))
    chap_user: str = field(metadata=toml("chap_user", STR))
    chap_secret: str = field(repr=False, metadata=toml("chap_secret", SECRET))


@dataclass(frozen=True, slots=True)
class TargetConfig:
    """One ``[[target]]``: its LUNs and who may log in (RFC 7143 §12).

    ``chap_user``/``chap_secret``: initiators must authenticate with CHAP;
    ``mutual_user``/``mutual_secret``: the target's own credentials for mutual
    CHAP; ``initiators``: IQN allow-list (None: any initiator);
    ``initiator_chap``: per-initiator credentials overriding the target's.
    Secrets are kept out of ``repr`` so they never reach a log."""

    iqn: str = field(metadata=toml("iqn", STR, check=_iqn))
    luns: tuple[EdgeLunConfig, ...] = field(metadata=toml("lun", Entries(EdgeLunConfig)))
    alias: str | None = field(default=None, metadata=toml("alias", TEXT))
    chap_user: str | None = field(default=None, metadata=toml("chap_user", STR))
    chap_secret: str | None = field(default=None, repr=False, metadata=toml("chap_secret", SECRET))
    mutual_user: str | None = field(default=None, metadata=toml("mutual_user", STR))
    mutual_secret: str | None = field(default=None, repr=False,
                                      metadata=toml("mutual_secret", SECRET))
    initiators: tuple[str, ...] | None = field(default=None, metadata=toml("initiators", STRS))
    initiator_chap: tuple[InitiatorChapConfig, ...] = field(
        default=(), metadata=toml("initiator", Entries(InitiatorChapConfig)))


@dataclass(frozen=True, slots=True)
class EdgeConfig(_NodeFile):
    name: str = field(metadata=toml("edge.name", STR))
    portal: tuple[str, int] = field(metadata=toml("edge.portal", ADDR))
    control: tuple[str, int] = field(metadata=toml("edge.control", ADDR))
    blockstore: str = field(metadata=toml("edge.blockstore", STR))
    cores: tuple[tuple[str, int], ...] = field(
        metadata=toml("edge.cores", Addrs(dial=True), check=_some_core))
    targets: tuple[TargetConfig, ...] = field(metadata=toml("target", Entries(TargetConfig)))
    reserve_bytes: int = field(default=256 << 20, metadata=toml("edge.reserve", Size(
        least=EDGE_RESERVE_MIN, why="room for a few 512 KiB writes in flight")))
    cache_region_bytes: int = field(default=64 << 10, metadata=toml(
        "edge.cache_region", Size(positive=True, multiple=BACKEND_BLOCK)))
    window_bytes: int = field(default=32 << 20, metadata=toml("edge.window", Size(positive=True)))
    read_timeout: float = field(default=30.0, metadata=toml("edge.read_timeout", SECONDS))
    log_file: str | None = field(default=None, metadata=toml("edge.log_file", TEXT))
    advertise: str | None = field(default=None,
                                  metadata=toml("edge.advertise", STR, check=_advertise))
    ping_interval: float = field(default=1.0, metadata=toml("edge.ping_interval", SECONDS))
    dead_after: float = field(default=5.0, metadata=toml("edge.dead_after", SECONDS))
    # run a Witness inside this Edge on this address
    witness: tuple[str, int] | None = field(default=None, metadata=toml("witness.listen", ADDR))
    witness_state_dir: str | None = field(
        default=None, metadata=toml("witness.state_dir", TEXT, needs="listen"))
    # Prometheus metrics and the web console (issue 15): off unless set
    metrics: tuple[str, int] | None = field(default=None, metadata=toml("metrics.listen", ADDR))
    console: tuple[str, int] | None = field(default=None, metadata=toml("console.listen", ADDR))
    console_password: str | None = field(default=None, repr=False,
                                         metadata=toml("console.password", PASSWORD,
                                                       needs="listen"))
    source: str = field(default="", metadata=NOT_IN_FILE)
    # discovery sessions must use CHAP
    discovery_chap_user: str | None = field(default=None,
                                            metadata=toml("edge.discovery_chap_user", STR))
    discovery_chap_secret: str | None = field(
        default=None, repr=False, metadata=toml("edge.discovery_chap_secret", SECRET))
    discovery_mutual_user: str | None = field(default=None,
                                              metadata=toml("edge.discovery_mutual_user", STR))
    discovery_mutual_secret: str | None = field(
        default=None, repr=False, metadata=toml("edge.discovery_mutual_secret", SECRET))

    def _check(self, bad: _Errors) -> None:
        if not self.targets:
            raise ConfigError(f"{bad.path}: no [[target]] defined; an Edge exports at least one")
        lun_ids: dict[int, str] = {}
        iqns: dict[str, str] = {}
        for i, t in enumerate(self.targets):
            tw = f"[[target]] #{i + 1}"
            scsi_luns: set[int] = set()
            for j, lu in enumerate(t.luns):
                w = f"[[target.lun]] #{j + 1} of {tw}"
                if lu.lun in scsi_luns:
                    raise bad(w, "lun", f"SCSI LUN {lu.lun} appears twice in this target")
                scsi_luns.add(lu.lun)
                if lu.lun_id in lun_ids:
                    raise bad(w, "lun_id", f"LUN id {lu.lun_id} exported twice (also in "
                                           f"{lun_ids[lu.lun_id]})")
                lun_ids[lu.lun_id] = w
            if t.iqn in iqns:
                raise bad(tw, "iqn", f"{t.iqn!r} is also the iqn of {iqns[t.iqn]}")
            iqns[t.iqn] = tw
            _chap_pair(bad, tw, "chap_user", t.chap_user, "chap_secret", t.chap_secret)
            _chap_pair(bad, tw, "mutual_user", t.mutual_user, "mutual_secret", t.mutual_secret)
            names: set[str] = set()
            for j, c in enumerate(t.initiator_chap):
                if c.name in names:
                    raise bad(f"[[target.initiator]] #{j + 1} of {tw}", "name",
                              f"initiator {c.name!r} appears twice in this target")
                names.add(c.name)
            if t.mutual_secret is not None and t.mutual_secret in {
                    t.chap_secret, *(c.chap_secret for c in t.initiator_chap)}:
                raise bad(tw, "mutual_secret", "must differ from the initiator secrets "
                                               "(RFC 7143 §12.1.3)")
        if _clash(self.portal, self.control):
            raise bad("[edge]", "control", f"{format_addr(self.control)} is also [edge] portal")
        for other, what in ((self.portal, "portal"), (self.control, "control")):
            if self.witness is not None and _clash(self.witness, other):
                raise bad("[witness]", "listen",
                          f"{format_addr(self.witness)} is also [edge] {what}")
        _chap_pair(bad, "[edge]", "discovery_chap_user", self.discovery_chap_user,
                   "discovery_chap_secret", self.discovery_chap_secret)
        _chap_pair(bad, "[edge]", "discovery_mutual_user", self.discovery_mutual_user,
                   "discovery_mutual_secret", self.discovery_mutual_secret)
        if (self.discovery_mutual_secret is not None
                and self.discovery_mutual_secret == self.discovery_chap_secret):
            raise bad("[edge]", "discovery_mutual_secret", "must differ from "
                                                           "discovery_chap_secret")
        _timers(bad, "[edge]", self.ping_interval, self.dead_after)
        _observe(bad, self, {"[edge] portal": self.portal, "[edge] control": self.control,
                             "[witness] listen": self.witness})


@dataclass(frozen=True, slots=True)
class WitnessConfig(_NodeFile):
    name: str = field(metadata=toml("witness.name", STR))
    listen: tuple[str, int] = field(metadata=toml("witness.listen", ADDR))
    state_dir: str = field(metadata=toml("witness.state_dir", STR))
    control: tuple[str, int] | None = field(default=None, metadata=toml("witness.control", ADDR))
    lease_seconds: float = field(default=5.0, metadata=toml("witness.lease_seconds", SECONDS))
    log_file: str | None = field(default=None, metadata=toml("witness.log_file", TEXT))
    # Prometheus metrics (issue 15): off unless set
    metrics: tuple[str, int] | None = field(default=None, metadata=toml("metrics.listen", ADDR))
    source: str = field(default="", metadata=NOT_IN_FILE)

    def _check(self, bad: _Errors) -> None:
        if self.control is not None and _clash(self.listen, self.control):
            raise bad("[witness]", "control",
                      f"{format_addr(self.control)} is also [witness] listen")
        _observe(bad, self, {"[witness] listen": self.listen, "[witness] control": self.control})


__all__ = [
    "ADDR",
    "BACKEND_BLOCK",
    "BOOL",
    "CHAP_SECRET_MAX",
    "CHAP_SECRET_MIN",
    "CONSOLE_PASSWORD_MIN",
    "DIAL",
    "EDGE_LUN_BLOCK",
    "EDGE_RESERVE_MIN",
    "HA_ROLES",
    "PASSWORD",
    "ROLES",
    "SECONDS",
    "SECRET",
    "STR",
    "STRS",
    "TEXT",
    "Addr",
    "Addrs",
    "AuthConfig",
    "Bool",
    "Choice",
    "ConfigError",
    "CoreConfig",
    "EdgeConfig",
    "EdgeLunConfig",
    "Entries",
    "InitiatorChapConfig",
    "Int",
    "Key",
    "Kind",
    "LunConfig",
    "Password",
    "Seconds",
    "Secret",
    "Size",
    "Str",
    "Strs",
    "TargetConfig",
    "WitnessConfig",
    "host_ok",
    "load_json",
    "toml",
    "write_toml",
]
