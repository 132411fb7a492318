"""``coredr``: the operator's replication CLI, talking to a Core's control address.

Human tables by default, ``--json`` for scripts. One vocabulary (issue 13):

* done: ``replication suspended``, exit 0;
* nothing to do, the end state already holds: ``replication already suspended``,
  exit 0 (``"already": true`` in JSON);
* refused by the Core: ``refused: REASON`` on stderr, exit 1; with ``--json``
  also ``{"refused": CODE, "reason": REASON}`` on stdout, CODE from
  :data:`steelfusion.control.CODES`;
* could not ask (nothing listens, the wrong kind of port, the Core went away):
  one ``Error:`` line, exit 1; with ``--json`` ``{"error": CODE, "reason": ...}``;
* bad input (no or a malformed ``--core``): one ``Error:`` line, exit 2.
"""

from __future__ import annotations

import errno
import json
import socket
import sys
import time
from typing import IO, Any

import click

from steelfusion import control
from steelfusion.units import format_size, parse_addr

PROBE_TIMEOUT = 5.0  # a control port answers ``status`` at once; some ports say nothing
HINT = "`steelfusion lab status` lists the control addresses"
HINT_NS = "`steelfusion lab status` prints each lab Core's coredr command line"
#: failover refusals that time lifts (the primary's lease, its links): ``--wait`` retries
FAILOVER_RETRY = frozenset({"witness-lease-live", "peer-reachable"})


class BadInput(click.ClickException):
    """The operator's input is wrong: one line, exit 2 like click's usage errors."""

    exit_code = 2


class Refused(click.ClickException):
    """The Core refused the command; shown as ``refused: REASON``."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"refused: {self.message}", err=True)


def _root(ctx: click.Context) -> dict[str, Any]:
    obj: dict[str, Any] = ctx.find_root().obj
    return obj


def _enter_netns(ctx: click.Context) -> None:
    """Move into ``--netns`` before the first connection (this thread, and the threads it
    starts afterwards), until the command ends; only when a command needs the Core, so
    ``--help`` works anywhere."""
    obj = _root(ctx)
    name = obj.get("netns")
    if not name or obj.get("in_netns"):
        return
    if "/" in name or name in (".", "..") or "\0" in name:
        raise BadInput(f"--netns {name!r} is not a namespace name; {HINT_NS}")
    from steelfusion import netns

    try:
        ctx.find_root().with_resource(netns.in_netns(name))
    except netns.NetnsError as e:
        if e.errno == errno.ENOENT:
            raise BadInput(f"--netns {name}: no such network namespace (no "
                           f"{netns.path(name)}); {HINT_NS}") from None
        raise click.ClickException(f"--netns {name}: {e}") from None
    except OSError as e:
        why = " (coredr --netns needs root)" if e.errno in (errno.EPERM, errno.EACCES) else ""
        raise click.ClickException(f"--netns {name}: cannot enter the network namespace: "
                                   f"{e.strerror or e}{why}") from None
    obj["in_netns"] = True


def _addr(ctx: click.Context) -> tuple[str, int]:
    """``--core`` parsed when a command needs it, so ``--help`` needs no Core (item 7)."""
    obj = _root(ctx)
    _enter_netns(ctx)
    if obj.get("addr") is None:
        text = obj.get("core")
        if not text:
            raise BadInput("no Core given: use --core HOST:PORT (the Core's control address) "
                           "or set $COREDR_CORE")
        try:
            addr = parse_addr(text)
        except ValueError as e:
            why = str(e).replace(f"address {text.strip()!r}: ", "").replace(
                f"address {text.strip()!r} ", "")
            raise BadInput(f"--core {text!r}: {why}; give the Core's control address as "
                           "HOST:PORT") from None
        if addr[1] == 0:
            raise BadInput(f"--core {text}: port 0 is not a control port; {HINT}")
        obj["addr"] = addr
    addr_: tuple[str, int] = obj["addr"]
    return addr_


def _where(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


def _fail(ctx: click.Context, code: str, reason: str) -> click.ClickException:
    """Could not ask the Core: one line on stderr, and JSON on stdout for ``--json``."""
    if _root(ctx).get("json"):
        click.echo(json.dumps({"error": code, "reason": reason}))
    return click.ClickException(reason)


def _explain(ctx: click.Context, e: BaseException, timeout: float) -> click.ClickException:
    """One line for a failure to talk to ``--core``, before or after it answered once."""
    addr = _addr(ctx)
    where = _where(addr)
    if _root(ctx).get("netns"):
        where += f" in network namespace {_root(ctx)['netns']}"
    lost = _root(ctx).get("checked")  # it answered as a Core before: it went away since
    if isinstance(e, control.NotControlPort):
        return _fail(ctx, "not-a-core", str(e))
    if isinstance(e, control.ControlClosed):
        if lost:
            return _fail(ctx, "closed", f"lost the Core at {where}: it closed the connection "
                         "before answering (did it stop? see its log)")
        return _fail(ctx, "not-a-core", f"{where} is not a Core control port: it closed the "
                     f"connection without answering (an iSCSI portal?); {HINT}")
    if isinstance(e, socket.gaierror):
        return _fail(ctx, "unreachable", f"cannot resolve host {addr[0]!r} (--core {where}): "
                     f"{e.strerror or e}")
    if isinstance(e, ConnectionRefusedError):
        if lost:
            return _fail(ctx, "closed", f"lost the Core at {where}: nothing listens there any "
                         "more (did it stop? see its log)")
        return _fail(ctx, "unreachable", f"nothing listens on {where} (is the Core running? "
                     f"{HINT})")
    if isinstance(e, TimeoutError):
        if lost:
            return _fail(ctx, "no-answer", f"lost the Core at {where}: no answer within "
                         f"{timeout:g} s")
        return _fail(ctx, "no-answer", f"no answer from {where} within {timeout:g} s: not a "
                     f"Core control port (an iSCSI portal or something else?), or the Core is "
                     f"stuck; {HINT}")
    if isinstance(e, ConnectionError):
        return _fail(ctx, "closed", f"lost the connection to {where}: {e.strerror or e}")
    if isinstance(e, OSError):
        return _fail(ctx, "unreachable", f"cannot reach {where}: {e.strerror or e}")
    return _fail(ctx, "unreachable", f"{where}: {e}")


def _ask(ctx: click.Context, cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """The Core's reply to ``cmd``, refused or not; the first call checks it is a Core."""
    _check(ctx)
    return _raw(ctx, cmd, timeout, **args)


def _raw(ctx: click.Context, cmd: str, timeout: float, **args: Any) -> dict[str, Any]:
    try:
        return control.call(_addr(ctx), cmd, timeout=timeout, **args)
    except (OSError, control.ControlError) as e:
        raise _explain(ctx, e, timeout) from None


def _check(ctx: click.Context) -> dict[str, Any] | None:
    """Is ``--core`` a Core's control port? Says what it is instead (item 4).

    Returns the ``status`` reply of that first call (the ``status`` command
    shows it), or None once checked.
    """
    obj = _root(ctx)
    if obj.get("checked"):
        return None
    where = _where(_addr(ctx))
    st = _raw(ctx, "status", PROBE_TIMEOUT)
    if not st.get("ok"):
        raise _fail(ctx, "not-a-core", f"{where} is not a Core control port: it refused "
                    f"`status` ({st.get('error')}); {HINT}")
    kind = st.get("kind") or ("witness" if st.get("role") == "witness" else
                              "core" if "replication" in st and "epoch" in st else
                              "edge" if "portal" in st else None)
    if kind != "core":
        what = {"witness": "a Witness control port", "edge": "an Edge control port"}.get(
            str(kind), "a control port of something else")
        name = f" ({st['name']})" if isinstance(st.get("name"), str) else ""
        raise _fail(ctx, "not-a-core", f"{where} is not a Core control port: it is {what}{name}; "
                    f"{HINT}")
    obj["checked"] = True
    return st


def _done(ctx: click.Context, reply: dict[str, Any]) -> dict[str, Any]:
    """A successful reply without ``ok``; a refusal raises :class:`Refused`."""
    if not reply.get("ok"):
        code = str(reply.get("code") or "refused")
        reason = str(reply.get("error"))
        if _root(ctx).get("json"):
            extra = {k: v for k, v in reply.items() if k not in ("ok", "error", "code")}
            click.echo(json.dumps({"refused": code, "reason": reason, **extra}))
        raise Refused(reason)
    out = dict(reply)
    out.pop("ok", None)
    return out


def _call(ctx: click.Context, cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    return _done(ctx, _ask(ctx, cmd, timeout, **args))


def _json_mode(ctx: click.Context, as_json: bool) -> None:
    _root(ctx)["json"] = as_json


def _tty() -> bool:
    """Progress bars only on a terminal: piped, click would print their label alone."""
    return sys.stdout.isatty()


class _OneLineGroup(click.Group):
    """Click's usage errors (a bad option, a missing command) in one line, like ours."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as e:
            raise _one_line(e) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            raise _one_line(e) from None


def _one_line(e: click.UsageError) -> click.ClickException:
    if type(e).__name__ == "NoArgsIsHelpError":  # a bare group: its help is the answer
        return e
    where = e.ctx.command_path if e.ctx is not None else "coredr"
    return BadInput(f"{e.format_message()} (`{where} --help` says more)")


@click.group(cls=_OneLineGroup)
@click.option("--core", "core", envvar="COREDR_CORE", metavar="HOST:PORT",
              help="The Core's control address (or $COREDR_CORE); not needed for --help.")
@click.option("--netns", "netns", envvar="COREDR_NETNS", metavar="NAME",
              help="Reach the Core from inside this network namespace (or $COREDR_NETNS; "
                   "root): a netns lab's Core, e.g. sf1a2b3c-dc-a.")
@click.pass_context
def main(ctx: click.Context, core: str | None, netns: str | None) -> None:
    """Replication (FusionSync) operations on a Core."""
    ctx.obj = {"core": core, "netns": netns or None}


def _echo_table(rows: list[list[str]]) -> None:
    """Columns as wide as their widest cell, two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _echo_fields(fields: list[tuple[str, str]], *later: str) -> int:
    """``name  value`` lines with the values in one column, wide enough for
    the names ``later`` printed after them too; returns its width."""
    width = max(len(k) for k in [*(k for k, _ in fields), *later]) + 2
    for k, v in fields:
        click.echo(f"{k:<{width}}{v}")
    return width


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Name, role, epoch, replication state, peer, connections, LUNs, alarms."""
    _json_mode(ctx, as_json)
    first = _check(ctx)
    st = _done(ctx, first) if first is not None else _call(ctx, "status")
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    peer = st.get("peer") or {}
    conns = st.get("connections") or {}
    repl = conns.get("replication", [])
    fields = [("Core", st["name"]), ("Role", st["role"]), ("Epoch", str(st["epoch"])),
              ("Replication", st["replication"]),
              ("Peer", f"{peer.get('name') or '-'} ({peer.get('address') or 'none'})"),
              ("Connections", f"edges {len(conns.get('edges', []))}, replication "
                              f"{sum(1 for c in repl if c['established'])} established "
                              f"(outbound expected {conns.get('replication_expected_out', 0)}), "
                              f"witness {'up' if conns.get('witness') else 'down'}")]
    for iface, n in (conns.get("replication_interfaces") or {}).items():
        if n.get("expected"):
            fields.append((f"  via {iface}", f"{n['established']}/{n['expected']} "
                                             "outbound replication connections"))
    ha = st.get("ha")
    if ha:  # Core HA (issue 16)
        fields.append(("HA", f"{ha['configured']} in {ha.get('datacenter') or '-'}, "
                             f"{ha['mode']}; acting leader {ha['leader']}"))
        fields.append(("  partner", f"{ha['partner']} "
                                    f"{'up (' + str(ha['partner_mode']) + ')' if ha['partner_up'] else 'unreachable'}"
                                    f", control {ha.get('partner_control') or '-'}"))
        h = ha.get("hosted")
        if h:
            conn = ", ".join(f"{i} {n['established']}/{n['expected']}"
                             for i, n in (h.get("connections") or {}).items())
            fields.append(("  serving", f"{h['name']}'s LUNs {h['luns']} ({h['role']}, "
                                        f"{h['replication']}) on {h['listen']}, control "
                                        f"{h['control']}; replication {conn or '-'}"))
    prog = st.get("resync")
    if prog:
        fields.append(("Resync", f"{format_size(prog['bytes_done'])}/"
                                 f"{format_size(prog['bytes_total'])} ({prog['percent']}%)"))
    width = _echo_fields(fields, "Alarms")
    # on a secondary the seqs are the primary's stream as this Core has it: applied,
    # durable here, acknowledged to the primary
    rows = [["LUN", "size", "allocated", "applied", "durable", "acked", "mirror-q", "edge"]]
    for lun, info in sorted(st.get("luns", {}).items(), key=lambda kv: int(kv[0])):
        used = info.get("allocated_bytes")
        rows.append([lun, format_size(info["size"]), "-" if used is None else format_size(used),
                     str(info["applied_seq"]),
                     str(info["durable_seq"]), str(info["acked_seq"]),
                     format_size(info["mirror_queue_bytes"]), info.get("edge") or "-"])
    _echo_table(rows)
    alarms = st.get("alarms") or []
    click.echo(f"{'Alarms':<{width}}" + ("none" if not alarms else str(len(alarms))))
    for a in alarms:
        click.echo(f"  {a['alarm']}: {a['message']}")


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def alarms(ctx: click.Context, as_json: bool) -> None:
    """Active alarms."""
    al = _simple(ctx, "alarms", as_json, part="alarms")
    if as_json:
        return
    if not al:
        click.echo("no alarms")
    else:
        for a in al:
            click.echo(f"{a['alarm']}: {a['message']}")


def _simple(ctx: click.Context, cmd: str, as_json: bool, *, part: str | None = None,
            **args: Any) -> Any:
    """The Core's reply to ``cmd`` (or its ``part``), printed as it is for ``--json``."""
    _json_mode(ctx, as_json)
    out = _call(ctx, cmd, **args)
    if part is not None:
        out = out[part]
    if as_json:
        click.echo(json.dumps(out, indent=2))
    return out


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def suspend(ctx: click.Context, as_json: bool) -> None:
    """Suspend replication (the Witness must approve); writes are journaled."""
    out = _simple(ctx, "suspend", as_json)
    if not as_json:
        click.echo(control.replication_said(out))


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait (with a progress bar on a terminal) until the resync is done.")
@click.pass_context
def resume(ctx: click.Context, as_json: bool, wait: bool) -> None:
    """Resume after suspension: resync the journaled regions, then run."""
    out = _simple(ctx, "resume", as_json)
    if as_json:
        return
    click.echo(control.replication_said(out))
    if wait and out["state"] == "resyncing":
        _resync_progress(ctx, out.get("resync"))


def _resync_progress(ctx: click.Context, start: dict[str, Any] | None) -> None:
    """Until the resync ends: a bar on a terminal (bytes, rate, ETA), silence otherwise.

    Ends at the real totals (the bar used to stop at the last poll's figures,
    "100% 414.0 MiB/500.0 MiB"), and fails if the resync stopped instead.
    """
    last = start
    bar = click.progressbar(length=1000, label="resync", show_eta=False,
                            item_show_func=lambda x: x) if _tty() else None
    shown = 0
    state = "resyncing"
    try:
        if bar is not None:
            bar.__enter__()
        while True:
            st = _call(ctx, "status")
            state = st["replication"]
            prog = st.get("resync")
            if prog and state == "resyncing":
                last = prog
                if bar is not None:
                    pos = min(999, int(10 * (prog.get("percent") or 0)))
                    eta = prog.get("eta_s")
                    bar.update(max(0, pos - shown),
                               f"{format_size(prog['bytes_done'])}/"
                               f"{format_size(prog['bytes_total'])} "
                               f"{format_size(prog.get('rate_bytes_s') or 0)}/s "
                               f"ETA {eta if eta is not None else '?'}s")
                    shown = max(shown, pos)
            if state != "resyncing":
                break
            time.sleep(0.2)
        if bar is not None and state == "running":
            total = format_size(last["bytes_total"]) if last else "?"
            bar.update(1000 - shown, f"{total}/{total} done")
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    if state != "running":
        raise _fail(ctx, "resync-stopped", f"the resync stopped: replication is {state} now "
                    "(the secondary went away?); `coredr resume` again when it is back")
    click.echo(f"replication {state}")


@main.command()
@click.option("--force", is_flag=True,
              help="Promote even an inconsistent replica, or without the Witness's answer. "
                   "Data the old primary had and this Core lacks is then lost.")
@click.option("--wait", "wait", type=float, is_flag=False, flag_value=60.0, default=None,
              metavar="[SECONDS]",
              help="While the primary may still be alive (the Witness holds its lease, this "
                   "Core still reaches it), ask again until it is not, for at most SECONDS "
                   "(60 without a value), saying what it waits for.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def failover(ctx: click.Context, force: bool, wait: float | None, as_json: bool) -> None:
    """Make this secondary the primary (only when neither it nor the Witness reach the primary)."""
    _json_mode(ctx, as_json)
    if wait is not None and not 0 <= wait <= 86400:
        raise BadInput(f"--wait {wait:g}: give seconds from 0 to 86400")
    deadline = time.monotonic() + (wait or 0)
    said = ""
    while True:
        reply = _ask(ctx, "failover", force=force)
        left = deadline - time.monotonic()
        if reply.get("ok") or wait is None or reply.get("code") not in FAILOVER_RETRY \
                or left <= 0:
            break
        why = str(reply.get("error")).split(": ", 1)[0]
        if why != said:
            click.echo(f"waiting: {why} (asking again for up to {left:.0f} s more)",
                       err=as_json)
            said = why
        retry = reply.get("retry_in")
        pause = retry + 0.1 if isinstance(retry, int | float) and retry > 0 else 0.5
        time.sleep(max(0.1, min(pause, left)))
    out = _done(ctx, reply)
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(f"now {out['role']} at epoch {out['epoch']}, replication {out['state']}; "
                   "Edges move here automatically")
        for name, r in (out.get("cores") or {}).items():  # an HA leader: each Core's answer
            click.echo(f"  {name}: " + (f"refused ({r['refused']}): {r['reason']}"
                                        if "refused" in r else
                                        f"{r.get('role')} at epoch {r.get('epoch')}, "
                                        f"replication {r.get('state')}"))


@main.command()
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def terminate(ctx: click.Context, yes: bool, as_json: bool) -> None:
    """End the replication pairing on this Core."""
    _json_mode(ctx, as_json)
    _check(ctx)  # the wrong port is said before the question, not after
    if not yes and not as_json:
        try:
            click.confirm("Terminate replication? The pair must be set up again afterwards",
                          abort=True)
        except click.Abort:
            raise click.ClickException("not confirmed: replication not terminated (--yes "
                                       "skips the question, for scripts)") from None
    out = _simple(ctx, "terminate", as_json)
    if not as_json:
        click.echo(control.replication_said(out))


@main.command("ha")
@click.argument("action", type=click.Choice(["status", "takeover"]), default="status")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (takeover).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ha_cmd(ctx: click.Context, action: str, yes: bool, as_json: bool) -> None:
    """Core HA: this Core's view of its pair, or take the partner's LUNs over.

    ``takeover`` fences the partner on the shared LUNs and serves its LUNs here: for a
    standby Core whose partner is down for good (the automatic takeover never starts from
    standby).
    """
    _json_mode(ctx, as_json)
    _check(ctx)
    if action == "takeover" and not yes and not as_json:
        try:
            click.confirm("Fence the HA partner on the array and serve its LUNs here?",
                          abort=True)
        except click.Abort:
            raise click.ClickException("not confirmed: nothing taken over") from None
    out = _simple(ctx, "ha", as_json, part="ha", action=action)
    if as_json:
        return
    click.echo(f"{out['mode']} ({out['configured']}), acting leader {out['leader']}, "
               f"partner {out['partner']} {'up' if out['partner_up'] else 'unreachable'}, "
               f"serving the partner's LUNs: {'yes' if out['hosting_partner'] else 'no'}"
               + (f" ({out['why']})" if out.get("why") else ""))


@main.group(cls=_OneLineGroup)
def journal() -> None:
    """The Journal LUN."""


@journal.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def journal_status(ctx: click.Context, as_json: bool) -> None:
    """Size, log use, dirty regions and activity log per LUN."""
    j = _simple(ctx, "journal", as_json, part="journal")
    if as_json:
        return
    fields = [("Journal", j["path"]),
              ("Size", f"{format_size(j['size'])} (needs {format_size(j['required_size'])})"),
              ("Log", f"{format_size(j['used_log_bytes'])} of {format_size(j['log_bytes'])}"),
              ("AL", f"{j['al_regions']} regions ({j['al_busy_regions']} busy), "
                     f"max {j['al_regions_max']}")]
    if j.get("offline"):
        fields.append(("OFFLINE", f"{j['offline']['alarm']}: {j['offline']['message']}"))
    _echo_fields(fields)
    rows = [["LUN", "regions", "dirty", "dirty bytes", "AL", "crashed-AL"]]
    rows += [[str(lu["lun"]), str(lu["regions"]), str(lu["dirty_regions"]),
              format_size(lu["dirty_bytes"]), str(lu["al_regions"]),
              str(lu["crashed_al_regions"])] for lu in j["luns"]]
    _echo_table(rows)


@main.command()
@click.option("--repair", is_flag=True, help="Queue mismatched regions for resync.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def verify(ctx: click.Context, repair: bool, as_json: bool) -> None:
    """Compare primary and replica by block hashes, region by region (exit 3 if they differ)."""
    import threading

    _json_mode(ctx, as_json)
    _check(ctx)
    addr = _addr(ctx)
    result: dict[str, Any] = {}
    err: list[BaseException] = []

    def run() -> None:
        try:
            result.update(control.call(addr, "verify", timeout=3600, repair=repair))
        except (OSError, control.ControlError) as e:  # said below, in the main thread
            err.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    if not as_json and _tty():
        with click.progressbar(length=1000, label="verify") as bar:
            shown = 0
            while t.is_alive():
                t.join(0.3)
                try:
                    v = control.call(addr, "verify_status", timeout=5)
                except (OSError, control.ControlError):
                    continue
                prog = v.get("progress")
                if prog:
                    pos = int(10 * prog["percent"])
                    bar.update(max(0, pos - shown))
                    shown = max(shown, pos)
            if result.get("ok"):
                bar.update(1000 - shown)
    t.join()
    if err:
        raise _explain(ctx, err[0], 3600)
    out = _done(ctx, result)
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        for lun, v in sorted(out["luns"].items()):
            click.echo(f"LUN {lun}: {v['regions']} regions, {v['mismatched']} mismatched"
                       + (f" {v['mismatched_regions'][:20]}" if v["mismatched"] else ""))
        click.echo("IDENTICAL" if out["identical"] else "MISMATCH"
                   + (f" — {out['repair']}" if out.get("repair") else ""))
    if not out["identical"] and not repair:
        ctx.exit(3)


@main.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events.")
@click.pass_context
def events(ctx: click.Context, follow: bool) -> None:
    """State changes as JSON lines (like DRBD's events2)."""
    since = 0
    while True:
        evs = _call(ctx, "events", since=since)["events"]
        for e in evs:
            click.echo(json.dumps(e))
            since = max(since, e["n"])
        if not follow:
            break
        time.sleep(0.3)


if __name__ == "__main__":
    main()
