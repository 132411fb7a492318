"""Node configuration: one TOML file per node, the same inside and outside the lab.

Each loader checks everything a node needs before it starts and raises
:class:`ConfigError` with the file, the key and what to write instead.
Files that may hold secrets are written 0600.
"""

from __future__ import annotations

import builtins
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from steelfusion.units import format_addr, parse_addr, parse_size

ROLES = ("primary", "secondary")


class ConfigError(Exception):
    """A configuration file is missing, malformed or inconsistent."""


class _Reader:
    """Typed access to one TOML table, with errors that name file and key.

    The methods ``str``/``int``/``float``/``bool`` shadow the builtins inside
    the class body, so annotations after them spell ``builtins.str`` etc.
    """

    def __init__(self, path: Path | str, table: dict[str, Any], prefix: str) -> None:
        self.path = str(path)
        self.t = table
        self.prefix = prefix

    def _err(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.path}: [{self.prefix}] {key}: {msg}")

    def str(self, key: builtins.str, default: builtins.str | None = None) -> builtins.str:
        v = self.t.get(key, default)
        if not isinstance(v, str) or not v:
            raise self._err(key, "required string" if v is None else f"must be a string, got {v!r}")
        return v

    def opt_str(self, key: builtins.str) -> builtins.str | None:
        v = self.t.get(key)
        if v is None:
            return None
        if not isinstance(v, str):
            raise self._err(key, f"must be a string, got {v!r}")
        return v

    def addr(self, key: builtins.str,
             default: builtins.str | None = None) -> tuple[builtins.str, builtins.int]:
        try:
            return parse_addr(self.str(key, default))
        except ValueError as e:
            raise self._err(key, str(e)) from None

    def size(self, key: builtins.str,
             default: builtins.str | builtins.int | None = None) -> builtins.int:
        v = self.t.get(key, default)
        if v is None:
            raise self._err(key, "required size (e.g. 1G)")
        try:
            return parse_size(v)
        except ValueError as e:
            raise self._err(key, str(e)) from None

    def int(self, key: builtins.str, default: builtins.int | None = None, lo: builtins.int = 0,
            hi: builtins.int = 2**63) -> builtins.int:
        v = self.t.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise self._err(key, f"must be an integer in {lo}..{hi}, got {v!r}")
        return v

    def float(self, key: builtins.str, default: builtins.float) -> builtins.float:
        v = self.t.get(key, default)
        if not isinstance(v, int | float) or isinstance(v, bool) or v <= 0:
            raise self._err(key, f"must be a positive number, got {v!r}")
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
        return list(v)

    def tables(self, key: builtins.str) -> list[dict[builtins.str, Any]]:
        v = self.t.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
            raise self._err(key, "must be an array of tables ([[...]])")
        return v

    def table(self, key: builtins.str, required: builtins.bool = True) -> _Reader:
        v = self.t.get(key)
        if v is None and not required:
            v = {}
        if not isinstance(v, dict):
            raise ConfigError(f"{self.path}: missing table [{key}]")
        return _Reader(self.path, v, key)


def _load(path: Path | str) -> _Reader:
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    return _Reader(p, data, "")


def write_toml(path: Path | str, data: dict[str, Any], mode: int = 0o600) -> None:
    """Atomic replace (temp, fsync, rename, fsync dir); files are 0600 by default."""
    from steelfusion.atomic import atomic_write

    atomic_write(path, tomli_w.dumps(data).encode(), mode=mode)


def _ha(path: Path | str, v: str) -> str:
    if v not in ("none", "leader", "follower"):
        raise ConfigError(f"{path}: [replication] ha: must be none, leader or follower, got {v!r}")
    return v


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
        r = _load(path)
        c = r.table("core")
        role = c.str("role", "primary")
        if role not in ROLES:
            raise ConfigError(f"{path}: [core] role: must be one of {ROLES}, got {role!r}")
        luns = []
        seen: set[int] = set()
        for i, t in enumerate(r.tables("lun")):
            lr = _Reader(path, t, f"lun #{i + 1}")
            lid = lr.int("id", lo=0, hi=2**32 - 1)
            if lid in seen:
                raise ConfigError(f"{path}: LUN id {lid} appears twice")
            seen.add(lid)
            luns.append(LunConfig(lid, lr.str("path"), lr.size("size", 0)))
        rep = r.table("replication", required=False)
        peer = rep.addr("peer") if rep.t.get("peer") else None
        witness = rep.addr("witness") if rep.t.get("witness") else None
        j = r.table("journal", required=False)
        return cls(
            name=c.str("name"), role=role, listen=c.addr("listen"), control=c.addr("control"),
            state_dir=c.str("state_dir"), luns=tuple(luns), peer=peer,
            interfaces=tuple(rep.list_str("interfaces", ["127.0.0.1"])), witness=witness,
            journal_path=j.opt_str("path"), journal_size=j.size("size", 0),
            log_file=c.opt_str("log_file"), ping_interval=c.float("ping_interval", 1.0),
            dead_after=c.float("dead_after", 5.0),
            mirror_window_bytes=rep.size("window", 64 << 20), pair=rep.str("pair", "pair-1"),
            initial_sync=rep.bool("initial_sync", True), ha=_ha(path, rep.str("ha", "none")),
            verify_interval_s=rep.float("verify_interval", 3600.0),
            verify_rate_bytes=rep.size("verify_rate", 64 << 20), source=str(path))

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


def _target_auth(path: Path | str, tr: _Reader, where: str) -> dict[str, Any]:
    chap_user, chap_secret = _chap_pair(tr, "chap_user", "chap_secret")
    mutual_user, mutual_secret = _chap_pair(tr, "mutual_user", "mutual_secret")
    initiators = tuple(tr.list_str("initiators")) if tr.t.get("initiators") is not None \
        else None
    per = []
    for k, it in enumerate(tr.tables("initiator")):
        ir = _Reader(path, it, f"{where} initiator #{k + 1}")
        u, sec = _chap_pair(ir, "chap_user", "chap_secret")
        if u is None or sec is None:
            raise ir._err("chap_user", "an [[target.initiator]] entry needs chap_user and "
                                       "chap_secret")
        per.append(InitiatorChapConfig(ir.str("name"), u, sec))
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
    extra: dict[str, Any] = field(default_factory=dict)
    discovery_chap_user: str | None = None  # discovery sessions must use CHAP
    discovery_chap_secret: str | None = field(default=None, repr=False)
    discovery_mutual_user: str | None = None
    discovery_mutual_secret: str | None = field(default=None, repr=False)

    @classmethod
    def load(cls, path: Path | str) -> EdgeConfig:
        r = _load(path)
        e = r.table("edge")
        targets = []
        lun_ids: set[int] = set()
        for i, t in enumerate(r.tables("target")):
            tr = _Reader(path, t, f"target #{i + 1}")
            luns = []
            for j, lt in enumerate(tr.tables("lun")):
                lr = _Reader(path, lt, f"target #{i + 1} lun #{j + 1}")
                ent = EdgeLunConfig(lr.int("lun", lo=0, hi=255), lr.int("lun_id", lo=0, hi=2**32 - 1),
                                    lr.size("size"))
                if ent.size <= 0 or ent.size % 4096:
                    raise ConfigError(f"{path}: LUN id {ent.lun_id}: size must be a positive "
                                      f"multiple of 4096 bytes, got {ent.size}")
                if ent.lun_id in lun_ids:
                    raise ConfigError(f"{path}: LUN id {ent.lun_id} exported twice")
                lun_ids.add(ent.lun_id)
                luns.append(ent)
            iqn = tr.str("iqn")
            if not (iqn.startswith("iqn.") or iqn.startswith("eui.") or iqn.startswith("naa.")):
                raise ConfigError(f"{path}: target iqn {iqn!r} must start with iqn., eui. or naa.")
            targets.append(TargetConfig(iqn, tuple(luns), tr.opt_str("alias"),
                                        **_target_auth(path, tr, f"target #{i + 1}")))
        if not targets:
            raise ConfigError(f"{path}: no [[target]] defined; an Edge exports at least one")
        cores = []
        for a in e.list_str("cores"):
            try:
                cores.append(parse_addr(a))
            except ValueError as ex:
                raise ConfigError(f"{path}: [edge] cores: {ex}") from None
        if not cores:
            raise ConfigError(f"{path}: [edge] cores: list at least one Core address")
        w = r.table("witness", required=False)
        d_user, d_secret = _chap_pair(e, "discovery_chap_user", "discovery_chap_secret")
        dm_user, dm_secret = _chap_pair(e, "discovery_mutual_user", "discovery_mutual_secret")
        if dm_secret is not None and dm_secret == d_secret:
            raise e._err("discovery_mutual_secret", "must differ from discovery_chap_secret")
        return cls(
            discovery_chap_user=d_user, discovery_chap_secret=d_secret,
            discovery_mutual_user=dm_user, discovery_mutual_secret=dm_secret,
            name=e.str("name"), portal=e.addr("portal"), control=e.addr("control"),
            blockstore=e.str("blockstore"), cores=tuple(cores), targets=tuple(targets),
            reserve_bytes=e.size("reserve", 256 << 20),
            cache_region_bytes=e.size("cache_region", 64 << 10),
            window_bytes=e.size("window", 32 << 20), read_timeout=e.float("read_timeout", 30.0),
            log_file=e.opt_str("log_file"), advertise=e.opt_str("advertise"),
            ping_interval=e.float("ping_interval", 1.0), dead_after=e.float("dead_after", 5.0),
            witness=w.addr("listen") if w.t.get("listen") else None,
            witness_state_dir=w.opt_str("state_dir"), source=str(path))

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
        r = _load(path)
        w = r.table("witness")
        return cls(name=w.str("name"), listen=w.addr("listen"), state_dir=w.str("state_dir"),
                   control=w.addr("control") if w.t.get("control") else None,
                   lease_seconds=w.float("lease_seconds", 5.0), log_file=w.opt_str("log_file"),
                   source=str(path))

    def to_dict(self) -> dict[str, Any]:
        w: dict[str, Any] = {"name": self.name, "listen": format_addr(self.listen),
                             "state_dir": self.state_dir, "lease_seconds": self.lease_seconds}
        if self.control:
            w["control"] = format_addr(self.control)
        if self.log_file:
            w["log_file"] = self.log_file
        return {"witness": w}


def ensure_dir(path: str | Path) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
