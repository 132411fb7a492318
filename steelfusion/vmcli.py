"""``steelfusion vm build|run``: the Linux guest image and User-mode Linux guests (issue 11)."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TextIO

import click

from steelfusion.vmimage import VmError


@click.group()
def vm() -> None:
    """Linux guests (User-mode Linux) for the lab: open-iscsi, LIO, real file systems."""
    from steelfusion import log

    log.setup("vm", None, level="warning")  # stdout is the guest script's output


@vm.command()
@click.option("--force", is_flag=True, help="Build again even if the cache has this recipe.")
@click.option("--prune", is_flag=True, help="Remove cached images of other recipes.")
@click.option("--json", "as_json", is_flag=True, help="Print the image's description as JSON.")
def build(force: bool, prune: bool, as_json: bool) -> None:
    """Build the guest image from Debian packages (mmdebstrap), or find it in the cache.

    The recipe is vagrant/uml/ (recipe.toml and the files under rootfs/); images live in
    /var/cache/steelfusion/vm/KEY/ ($STEELFUSION_VM_CACHE), rebuilt only when it changes."""
    from steelfusion import vmimage

    say = (lambda s: None) if as_json else (lambda s: click.echo(s, err=True))
    t0 = time.monotonic()
    try:
        img = vmimage.build(force=force, say=say)
    except VmError as e:
        raise click.ClickException(str(e)) from None
    if prune:
        for key in vmimage.prune(img.key):
            say(f"removed the cached image {key}")
    if as_json:
        click.echo(json.dumps({"path": str(img.path), **img.meta}, indent=2))
        return
    m = img.meta
    how = f"built in {m['build_seconds']} s" if time.monotonic() - t0 > 1 else "cached"
    click.echo(f"image {img.path} ({how})")
    click.echo(f"kernel: user-mode-linux {m.get('uml')}")
    click.echo("packages: " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()))


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@vm.command()
@click.argument("script", type=click.File("r"))
@click.option("--netns", "netns_name", metavar="NAME",
              help="Run in this existing network namespace (e.g. a netns lab's branch); "
                   "default: one made for the guest and removed after.")
@click.option("--address", default="10.98.0.2/24", show_default=True,
              help="The guest's address on the tap link (host side: the subnet's first).")
@click.option("--tap", default="sfvm0", show_default=True, help="The tap device's name.")
@click.option("--mem", default="512M", show_default=True, help="Guest memory.")
@click.option("--iqn", help="open-iscsi's initiator name in the guest.")
@click.option("--systemd", is_flag=True, help="Boot with systemd (slower) instead of sf-init.")
@click.option("--timeout", type=float, default=600.0, show_default=True,
              help="Seconds the script may run.")
@click.option("--workdir", type=click.Path(file_okay=False),
              help="Keep the console log and shared folder here (default: a temporary "
                   "folder, removed).")
def run(script: TextIO, netns_name: str | None, address: str, tap: str, mem: str,
        iqn: str | None, systemd: bool, timeout: float, workdir: str | None) -> None:
    """Boot a guest, run SCRIPT (bash; - for stdin) in it, print its output, power it off.

    Exits with the script's exit code. Writes to the guest's disk are thrown away; the
    guest's /lab is a shared folder. Needs root, /dev/net/tun and user-mode-linux."""
    import ipaddress

    from steelfusion import vmimage
    from steelfusion.vm import Guest, GuestNet

    try:
        iface = ipaddress.ip_interface(address)
        hosts = list(iface.network.hosts())
        if iface.network.prefixlen > 30 or iface.ip == hosts[0]:
            raise ValueError(f"{address}: the subnet's first address is the host side; give "
                             f"another, e.g. {hosts[1] if len(hosts) > 1 else '10.98.0.2'}/24")
        net = GuestNet(host=str(hosts[0]), guest=str(iface.ip),
                       prefixlen=iface.network.prefixlen, tap=tap)
    except (ValueError, IndexError) as e:
        raise click.BadParameter(str(e), param_hint="--address") from None
    text = script.read()
    signal.signal(signal.SIGTERM, _interrupt)
    # Ctrl-C (SIGINT) cleans up even when started where SIGINT is ignored (a background job
    # of a non-interactive shell inherits SIG_IGN, and Python then never raises it)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        img = vmimage.build(say=lambda s: click.echo(s, err=True))
        with Guest(img, netns_name=netns_name, workdir=Path(workdir) if workdir else None,
                   net=net, mem=mem, iqn=iqn, systemd=systemd) as g:
            click.echo(f"guest up in {g.boot_seconds:.1f} s ({g.ready}; netns {g.ns})", err=True)
            res = g.run(text, timeout=timeout)
    except VmError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # the namespace or tap could not be made
        raise click.ClickException(f"cannot start the guest: {e}") from None
    click.echo(res.output, nl=False)
    click.echo(f"script exited {res.rc} after {res.seconds:.1f} s", err=True)
    sys.exit(res.rc)
