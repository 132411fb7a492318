"""``coredr``: the operator's replication CLI, talking to a Core's control address.

Human tables by default, ``--json`` for scripts; a refused command exits
non-zero with the Core's reason.
"""

from __future__ import annotations

import json
from typing import Any

import click

from steelfusion import control
from steelfusion.units import format_size, parse_addr


def _call(ctx: click.Context, cmd: str, **args: Any) -> dict[str, Any]:
    addr = ctx.obj["core"]
    try:
        reply = control.call(addr, cmd, **args)
    except OSError as e:
        raise click.ClickException(f"cannot reach Core at {addr[0]}:{addr[1]}: {e}") from None
    except control.ControlError as e:
        raise click.ClickException(str(e)) from None
    if not reply.get("ok"):
        raise click.ClickException(f"refused: {reply.get('error')}")
    reply.pop("ok", None)
    return reply


@click.group()
@click.option("--core", "core", required=True, envvar="COREDR_CORE",
              help="The Core's control address HOST:PORT (or $COREDR_CORE).")
@click.pass_context
def main(ctx: click.Context, core: str) -> None:
    """Replication (FusionSync) operations on a Core."""
    try:
        ctx.obj = {"core": parse_addr(core)}
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--core") from None


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Name, role, epoch, replication state, peer, connections, LUNs, alarms."""
    st = _call(ctx, "status")
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    peer = st.get("peer") or {}
    conns = st.get("connections") or {}
    repl = conns.get("replication", [])
    click.echo(f"Core        {st['name']}")
    click.echo(f"Role        {st['role']}   epoch {st['epoch']}")
    click.echo(f"Replication {st['replication']}")
    click.echo(f"Peer        {peer.get('name') or '-'} ({peer.get('address') or 'none'})")
    click.echo(f"Connections edges {len(conns.get('edges', []))}, replication "
               f"{sum(1 for c in repl if c['established'])} established "
               f"(outbound expected {conns.get('replication_expected_out', 0)}), witness "
               f"{'up' if conns.get('witness') else 'down'}")
    click.echo("LUN   size        applied     durable     acked       mirror-q   edge")
    for lun, info in sorted(st.get("luns", {}).items(), key=lambda kv: int(kv[0])):
        click.echo(f"{lun:<5} {format_size(info['size']):<11} {info['applied_seq']:<11} "
                   f"{info['durable_seq']:<11} {info['acked_seq']:<11} "
                   f"{format_size(info['mirror_queue_bytes']):<10} {info.get('edge') or '-'}")
    alarms = st.get("alarms") or []
    click.echo("Alarms      " + ("none" if not alarms else ""))
    for a in alarms:
        click.echo(f"  {a['alarm']}: {a['message']}")


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def alarms(ctx: click.Context, as_json: bool) -> None:
    """Active alarms."""
    al = _call(ctx, "alarms")["alarms"]
    if as_json:
        click.echo(json.dumps(al, indent=2))
    elif not al:
        click.echo("no alarms")
    else:
        for a in al:
            click.echo(f"{a['alarm']}: {a['message']}")


def _simple(ctx: click.Context, cmd: str, as_json: bool, **args: Any) -> dict[str, Any]:
    out = _call(ctx, cmd, **args)
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
        click.echo(f"replication {out['state']}" + (f" ({out['note']})" if out.get("note") else ""))


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Show resync progress until replication is running again.")
@click.pass_context
def resume(ctx: click.Context, as_json: bool, wait: bool) -> None:
    """Resume after suspension: resync the journaled regions, then run."""
    out = _simple(ctx, "resume", as_json)
    if as_json:
        return
    click.echo(f"replication {out['state']}")
    if wait and out["state"] == "resyncing":
        _progress(ctx, "resync")


def _progress(ctx: click.Context, what: str) -> None:
    """A progress bar fed by status polls (resync bytes done/total, rate, ETA)."""
    import time

    with click.progressbar(length=1000, label=what, show_eta=False,
                           item_show_func=lambda x: x) as bar:
        shown = 0
        while True:
            st = _call(ctx, "status")
            prog = st.get("resync")
            if st["replication"] != "resyncing" and not prog:
                bar.update(1000 - shown)
                break
            if prog:
                pos = int(10 * (prog.get("percent") or 0))
                rate = format_size(prog.get("rate_bytes_s") or 0) + "/s"
                eta = prog.get("eta_s")
                bar.update(max(0, pos - shown),
                           f"{format_size(prog['bytes_done'])}/{format_size(prog['bytes_total'])}"
                           f" {rate} ETA {eta if eta is not None else '?'}s")
                shown = max(shown, pos)
            if st["replication"] != "resyncing":
                bar.update(1000 - shown)
                break
            time.sleep(0.2)
    st = _call(ctx, "status")
    click.echo(f"replication {st['replication']}")


@main.command()
@click.option("--force", is_flag=True,
              help="Promote even an inconsistent replica, or without the Witness's answer. "
                   "Data the old primary had and this Core lacks is then lost.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def failover(ctx: click.Context, force: bool, as_json: bool) -> None:
    """Make this secondary the primary (only when neither it nor the Witness reach the primary)."""
    out = _simple(ctx, "failover", as_json, force=force)
    if not as_json:
        click.echo(f"now {out['role']} at epoch {out['epoch']}, replication {out['state']}; "
                   "Edges move here automatically")


@main.command()
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def terminate(ctx: click.Context, yes: bool, as_json: bool) -> None:
    """End the replication pairing on this Core."""
    if not yes and not as_json:
        click.confirm("Terminate replication? The pair must be set up again afterwards",
                      abort=True)
    out = _simple(ctx, "terminate", as_json)
    if not as_json:
        click.echo(f"replication {out['state']}")


@main.group()
def journal() -> None:
    """The Journal LUN."""


@journal.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def journal_status(ctx: click.Context, as_json: bool) -> None:
    """Size, log use, dirty regions and activity log per LUN."""
    j = _call(ctx.find_root(), "journal")["journal"]
    if as_json:
        click.echo(json.dumps(j, indent=2))
        return
    click.echo(f"Journal     {j['path']}")
    click.echo(f"Size        {format_size(j['size'])} (needs {format_size(j['required_size'])})")
    click.echo(f"Log         {format_size(j['used_log_bytes'])} of {format_size(j['log_bytes'])}")
    click.echo(f"AL          {j['al_regions']} regions ({j['al_busy_regions']} busy), "
               f"max {j['al_regions_max']}")
    if j.get("offline"):
        click.echo(f"OFFLINE     {j['offline']['alarm']}: {j['offline']['message']}")
    click.echo("LUN   regions   dirty     dirty bytes   AL   crashed-AL")
    for lu in j["luns"]:
        click.echo(f"{lu['lun']:<5} {lu['regions']:<9} {lu['dirty_regions']:<9} "
                   f"{format_size(lu['dirty_bytes']):<13} {lu['al_regions']:<4} "
                   f"{lu['crashed_al_regions']}")


@main.command()
@click.option("--repair", is_flag=True, help="Queue mismatched regions for resync.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def verify(ctx: click.Context, repair: bool, as_json: bool) -> None:
    """Compare primary and replica by block hashes, region by region."""
    import threading

    result: dict[str, Any] = {}
    err: list[BaseException] = []
    root = ctx.find_root()

    def run() -> None:
        try:
            addr = root.obj["core"]
            reply = control.call(addr, "verify", timeout=3600, repair=repair)
            result.update(reply)
        except BaseException as e:  # shown below
            err.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    if not as_json:
        import time

        with click.progressbar(length=1000, label="verify") as bar:
            shown = 0
            while t.is_alive():
                t.join(0.3)
                try:
                    v = control.call(root.obj["core"], "verify_status", timeout=5)
                except (OSError, control.ControlError):
                    continue
                prog = v.get("progress")
                if prog:
                    pos = int(10 * prog["percent"])
                    bar.update(max(0, pos - shown))
                    shown = max(shown, pos)
                time.sleep(0.1)
            bar.update(1000 - shown)
    t.join()
    if err:
        raise click.ClickException(str(err[0]))
    if not result.get("ok"):
        raise click.ClickException(f"refused: {result.get('error')}")
    result.pop("ok", None)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        for lun, v in sorted(result["luns"].items()):
            click.echo(f"LUN {lun}: {v['regions']} regions, {v['mismatched']} mismatched"
                       + (f" {v['mismatched_regions'][:20]}" if v["mismatched"] else ""))
        click.echo("IDENTICAL" if result["identical"] else "MISMATCH"
                   + (f" — {result['repair']}" if result.get("repair") else ""))
    if not result["identical"] and not repair:
        ctx.exit(3)


@main.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events.")
@click.pass_context
def events(ctx: click.Context, follow: bool) -> None:
    """State changes as JSON lines (like DRBD's events2)."""
    import time

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
