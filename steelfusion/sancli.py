"""``steelfusion san create|status|delete``: a data center's LIO target for the Cores (issue 11).

On a Linux host whose kernel has LIO (configfs, target_core_mod, iscsi_target_mod), one
command exports the replicated LUNs and the Journal LUN the Cores use over iSCSI: fileio
backstores for files (made sparse when missing), block backstores for devices, one iSCSI
target, an ACL per Core initiator with its own CHAP credentials, and LIO's saved config
(``rtslib-fb-targetctl.service`` restores it at boot). The work is done by
:class:`steelfusion.san.Lio` (rtslib-fb); this module turns options or a TOML file into a
:class:`LioSpec` and checks everything it can before touching the kernel.

    steelfusion san create --target iqn.2026-11.io.steelfusion:san-a --portal 0.0.0.0:3260 \\
        --lun 1:/srv/san/lun-1.img:1G --journal /srv/san/journal.img:3G \\
        --acl iqn.2026-11.io.steelfusion:core-a=core-a:secretsecret12
    steelfusion san create --config /etc/steelfusion/san-a.toml    # the same, from a file
    steelfusion san status [--target IQN] [--json]
    steelfusion san delete --target IQN                             # files are kept
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from steelfusion.config import (
    ADDR,
    BOOL,
    CHAP_SECRET_MAX,
    CHAP_SECRET_MIN,
    SECRET,
    STR,
    TEXT,
    ConfigError,
    Entries,
    Int,
    Size,
    _Errors,
    _iqn,
    _NodeFile,
    toml,
)
from steelfusion.san import JOURNAL_LUN, Acl, Lio, SanError, lun_file_size
from steelfusion.units import format_addr, format_size, parse_addr, parse_size

DEFAULT_PORTAL = ("0.0.0.0", 3260)
LUN_MAX = 16383


@dataclass(frozen=True, slots=True)
class LunSpec:
    """``[[lun]]``: a SCSI LUN number and what backs it; size 0: the file's or device's own."""

    id: int = field(metadata=toml("id", Int(0, LUN_MAX)))
    path: str = field(metadata=toml("path", STR))
    size: int = field(default=0, metadata=toml("size", Size(multiple=512)))


@dataclass(frozen=True, slots=True)
class AclSpec:
    """``[[acl]]``: an initiator (a Core) that may log in, with its CHAP credentials."""

    initiator: str = field(metadata=toml("initiator", STR, check=_iqn))
    chap_user: str | None = field(default=None, metadata=toml("chap_user", STR))
    chap_secret: str | None = field(default=None, repr=False,
                                    metadata=toml("chap_secret", SECRET))


@dataclass(frozen=True, slots=True)
class LioSpec(_NodeFile):
    """What ``san create`` makes: one target, its LUNs, who may log in, where it is saved."""

    target: str = field(metadata=toml("san.target", STR, check=_iqn))
    portal: tuple[str, int] = field(default=DEFAULT_PORTAL, metadata=toml("san.portal", ADDR))
    luns: tuple[LunSpec, ...] = field(default=(), metadata=toml("lun", Entries(LunSpec)))
    acls: tuple[AclSpec, ...] = field(default=(), metadata=toml("acl", Entries(AclSpec)))
    any_initiator: bool = field(default=False, metadata=toml("san.any_initiator", BOOL))
    # None: rtslib-fb's default, the file the boot-time restore reads
    save_file: str | None = field(default=None, metadata=toml("san.save_file", TEXT))
    source: str = field(default="", metadata={"toml": None})

    def _check(self, bad: _Errors) -> None:
        if not isinstance(bad, _OptionErrors):
            bad = _SpecErrors(bad.path)
        if not self.luns:
            raise bad("[[lun]]", "", "none given; export at least one LUN")
        seen: dict[int, str] = {}
        for lu in self.luns:
            if lu.id in seen:
                raise bad("[[lun]]", "id", f"LUN {lu.id} appears twice ({seen[lu.id]} and "
                                           f"{lu.path})")
            seen[lu.id] = lu.path
        paths = [str(Path(lu.path).resolve()) for lu in self.luns]
        for p in paths:
            if paths.count(p) > 1:
                raise bad("[[lun]]", "path", f"{p} backs two LUNs")
        names = [a.initiator for a in self.acls]
        for n in names:
            if names.count(n) > 1:
                raise bad("[[acl]]", "initiator", f"{n} is listed twice")
        for a in self.acls:
            if (a.chap_user is None) != (a.chap_secret is None):
                raise bad("[[acl]]", "chap_user", f"{a.initiator}: set both chap_user and "
                                                  "chap_secret, or neither")
        chap = [a.chap_user is not None for a in self.acls]
        if any(chap) and not all(chap):
            raise bad("[[acl]]", "chap_user", "CHAP for every ACL or for none (LIO turns "
                                              "authentication on per target portal group)")
        if not self.acls and not self.any_initiator:
            raise bad("[[acl]]", "", "none given; name the initiators that may log in (the Cores), "
                                     "or allow any ([san] any_initiator = true)")
        if self.acls and self.any_initiator:
            raise bad("[san]", "any_initiator", "true, but [[acl]] entries are listed too: "
                                                "one or the other")

    def acl_list(self) -> list[Acl] | None:
        if self.any_initiator:
            return None
        return [Acl(a.initiator, a.chap_user, a.chap_secret) for a in self.acls]

    def plan(self) -> list[tuple[LunSpec, str, int]]:
        """Each LUN with its backstore kind and size, checked before LIO is touched: a
        file or device of another size than asked is refused here."""
        return [(lu, *lun_file_size(lu.path, lu.size or None)) for lu in self.luns]


# -- options -> spec ---------------------------------------------------------------------
def parse_lun(text: str) -> LunSpec:
    """``ID:PATH[:SIZE]``: ``1:/srv/san/lun-1.img:1G``, ``2:/dev/sdb``."""
    head, sep, rest = text.partition(":")
    if not sep or not head.strip().isdigit() or not rest:
        raise ValueError(f"{text!r}: want ID:PATH[:SIZE], e.g. 1:/srv/san/lun-1.img:1G")
    lun = int(head)
    if not 0 <= lun <= LUN_MAX:
        raise ValueError(f"{text!r}: LUN {lun} is not in 0..{LUN_MAX}")
    return _lun(lun, rest, text)


def parse_journal(text: str) -> LunSpec:
    """``PATH[:SIZE]``: the Journal LUN, exported as LUN 200 (steelfusion.san.JOURNAL_LUN)."""
    return _lun(JOURNAL_LUN, text, text)


def _lun(lun: int, rest: str, text: str) -> LunSpec:
    path, size = rest, 0
    if ":" in rest:
        p, _, tail = rest.rpartition(":")
        try:
            size = parse_size(tail)
        except ValueError:
            pass  # a ':' inside the path
        else:
            path = p
    if not path:
        raise ValueError(f"{text!r}: no path")
    if size % 512:
        raise ValueError(f"{text!r}: size {size} is not a multiple of 512 bytes")
    return LunSpec(lun, path, size)


def parse_acl(text: str) -> AclSpec:
    """``INITIATOR[=USER:SECRET]``; an initiator name holds no ``=``, a secret may hold ``:``."""
    name, sep, cred = text.partition("=")
    try:
        _iqn(name)
    except ValueError as e:
        raise ValueError(f"{name!r}: not an initiator name ({e})") from None
    if not sep:
        return AclSpec(name)
    user, colon, secret = cred.partition(":")
    if not colon or not user or not secret:
        raise ValueError(f"{name}: want {name}=USER:SECRET")
    if not CHAP_SECRET_MIN <= len(secret.encode()) <= CHAP_SECRET_MAX:
        raise ValueError(f"{name}: the CHAP secret must be {CHAP_SECRET_MIN}..{CHAP_SECRET_MAX}"
                         " bytes (RFC 7143 §12.1.3); value not shown")
    return AclSpec(name, user, secret)


def spec_from_options(target: str, portal: str | None, luns: tuple[str, ...],
                      journal: str | None, acls: tuple[str, ...], any_initiator: bool,
                      save_file: str | None) -> LioSpec:
    """The spec of the command-line form; the same checks as a file's."""
    try:
        _iqn(target)
        addr = parse_addr(portal, default_host="0.0.0.0") if portal else DEFAULT_PORTAL
        lun_specs = [parse_lun(x) for x in luns]
        if journal is not None:
            lun_specs.append(parse_journal(journal))
        acl_specs = tuple(parse_acl(x) for x in acls)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    spec = LioSpec(target, addr, tuple(lun_specs), acl_specs, any_initiator, save_file,
                   source="options")
    spec._check(_OptionErrors())
    return spec


class _SpecErrors(_Errors):
    """``FILE: [[lun]] id: msg`` (no key: ``FILE: [[lun]]: msg``)."""

    def __call__(self, where: str, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.path}: {where}{' ' + key if key else ''}: {msg}")


class _OptionErrors(_Errors):
    """The file form's errors, worded for options (``--lun``, ``--acl``)."""

    OPTION = {"[[lun]]": "--lun", "[[acl]]": "--acl", "[san]": "--any-initiator"}

    def __init__(self) -> None:
        super().__init__("options")

    def __call__(self, where: str, key: str, msg: str) -> ConfigError:
        msg = msg.replace("[san] any_initiator = true", "--any-initiator").replace(
            "[[acl]] entries", "--acl options")
        return ConfigError(f"{self.OPTION.get(where, where)}: {msg}")


# -- commands ----------------------------------------------------------------------------
def _fail(e: Exception) -> click.ClickException:
    return click.ClickException(str(e))


@click.command("create")
@click.option("--config", "config", default=None, type=click.Path(dir_okay=False),
              help="A TOML file ([san] target/portal/save_file, [[lun]] id/path/size, [[acl]] "
                   "initiator/chap_user/chap_secret) instead of the options below.")
@click.option("--target", default=None, help="The target's IQN, e.g. "
              "iqn.2026-11.io.steelfusion:san-a.")
@click.option("--portal", default=None, help="Listen on ADDRESS:PORT [default: 0.0.0.0:3260].")
@click.option("--lun", "luns", multiple=True, metavar="ID:PATH[:SIZE]",
              help="A replicated LUN: a file (made sparse at SIZE when missing; an existing one "
                   "must be SIZE) or a block device. Repeatable.")
@click.option("--journal", default=None, metavar="PATH[:SIZE]",
              help=f"The Journal LUN (exported as LUN {JOURNAL_LUN}).")
@click.option("--acl", "acls", multiple=True, metavar="INITIATOR[=USER:SECRET]",
              help="An initiator (a Core) that may log in, with its CHAP user and secret "
                   "(12..255 bytes). Repeatable.")
@click.option("--any-initiator", is_flag=True, help="No ACLs: any initiator may log in (a lab).")
@click.option("--save-file", default=None, type=click.Path(dir_okay=False),
              help="Where LIO's config is saved [default: rtslib-fb's, which the boot-time "
                   "restore (rtslib-fb-targetctl.service) reads].")
@click.option("--no-save", is_flag=True, help="Do not save LIO's config (lost at reboot).")
def create(config: str | None, target: str | None, portal: str | None, luns: tuple[str, ...],
           journal: str | None, acls: tuple[str, ...], any_initiator: bool,
           save_file: str | None, no_save: bool) -> None:
    """Export LUNs and a Journal LUN through the kernel's LIO target (root, rtslib-fb)."""
    try:
        if config is not None:
            if target or portal or luns or journal or acls or any_initiator:
                raise click.UsageError("--config replaces --target/--portal/--lun/--journal/"
                                       "--acl/--any-initiator: give one or the other")
            spec = LioSpec.load(config)
        elif target is None:
            raise click.UsageError("--target IQN (or --config FILE) is required")
        else:
            spec = spec_from_options(target, portal, luns, journal, acls, any_initiator,
                                     save_file)
        plan = spec.plan()
        lio = Lio(spec.portal)
        lio.create_target(spec.target)
        try:
            for lu, _, size in plan:
                lio.add_lun(spec.target, lu.id, lu.path, size)
            lio.allow(spec.target, spec.acl_list())
        except SanError:
            lio.remove(spec.target)  # nothing half-made is left behind
            raise
        saved = None if no_save else lio.save(save_file or spec.save_file)
    except (ConfigError, SanError) as e:
        raise _fail(e) from None
    click.echo(f"target {spec.target} on {format_addr(spec.portal)}")
    for lu, kind, size in plan:
        what = "Journal LUN" if lu.id == JOURNAL_LUN else "LUN"
        click.echo(f"  {what} {lu.id}: {lu.path} ({kind}, {format_size(size)})")
    for a in spec.acls:
        click.echo(f"  ACL {a.initiator}" + (f" (CHAP user {a.chap_user})" if a.chap_user
                                             else ""))
    if spec.any_initiator:
        click.echo("  any initiator may log in (no ACLs)")
    click.echo(f"saved to {saved}" if saved else "not saved (--no-save): gone at reboot")


@click.command("status")
@click.option("--target", default=None, help="Only this target (an unknown one is an error).")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
def status(target: str | None, as_json: bool) -> None:
    """The host's LIO iSCSI targets: portals, LUNs with sizes, ACLs, sessions."""
    try:
        tpgs = Lio().describe(target)
    except SanError as e:
        raise _fail(e) from None
    if as_json:
        click.echo(json.dumps(tpgs, indent=2))
        return
    if not tpgs:
        click.echo("no iSCSI targets")
    for t in tpgs:
        click.echo(format_tpg(t))


def format_tpg(t: dict[str, Any]) -> str:
    """One target portal group as ``san status`` prints it."""
    auth = "CHAP" if t["authentication"] else "none"
    who = "any initiator" if t["generate_node_acls"] else f"{len(t['acls'])} ACLs"
    lines = [f"target {t['target']} tpg {t['tpg']} "
             f"({'enabled' if t['enabled'] else 'disabled'}; auth {auth}; {who})",
             f"  portals: {', '.join(t['portals']) or '-'}"]
    for lu in t["luns"]:
        lines.append(f"  LUN {lu['lun']}: {format_size(lu['size'])} ({lu['size']} bytes) "
                     f"{lu['backstore']} {lu['path']}")
    for a in t["acls"]:
        chap = f" CHAP user {a['chap_user']}" if a["chap_user"] else ""
        lines.append(f"  ACL {a['initiator']}{chap} LUNs {a['luns']}")
    for s in t["sessions"]:
        lines.append(f"  session {s['initiator']} {s['state']} {s['type']} from "
                     f"{', '.join(s['connections']) or '?'}")
    if not t["sessions"]:
        lines.append("  sessions: none")
    return "\n".join(lines)


@click.command("delete")
@click.option("--target", default=None, help="The target's IQN.")
@click.option("--config", "config", default=None, type=click.Path(dir_okay=False),
              help="The file `san create --config` used (its target is deleted).")
@click.option("--save-file", default=None, type=click.Path(dir_okay=False),
              help="Where LIO's config is saved [default: as create].")
@click.option("--no-save", is_flag=True, help="Do not save LIO's config afterwards.")
def delete(target: str | None, config: str | None, save_file: str | None,
           no_save: bool) -> None:
    """Remove the target and the backstores `san create` made for it (LUN files stay)."""
    try:
        if (target is None) == (config is None):
            raise click.UsageError("give --target IQN or --config FILE")
        if config is not None:
            spec = LioSpec.load(config)
            target, save_file = spec.target, save_file or spec.save_file
        assert target is not None
        lio = Lio()
        gone = lio.remove(target)
        saved = None if no_save else lio.save(save_file)
    except (ConfigError, SanError) as e:
        raise _fail(e) from None
    for g in gone:
        click.echo(f"removed {g}")
    click.echo(f"saved to {saved}" if saved else "not saved (--no-save)")


def attach(group: click.Command) -> None:
    """Add create/status/delete to the ``steelfusion san`` group (whose ``run`` is the lab's
    tgtd supervisor)."""
    assert isinstance(group, click.Group), group
    group.help = ("A data center's storage array: `run` supervises the lab's tgtd; create, "
                  "status and delete provision the kernel's LIO target (rtslib-fb).")
    for cmd in (create, status, delete):
        group.add_command(cmd)
