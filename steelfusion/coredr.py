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


if __name__ == "__main__":
    main()
