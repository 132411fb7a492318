"""``steelfusion``: run a node from its config, or drive the one-command lab."""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import click

from steelfusion import __version__, log
from steelfusion.config import ConfigError, CoreConfig, EdgeConfig, WitnessConfig
from steelfusion.units import format_size, parse_size

GC_GEN0_THRESHOLD = 20_000


def _tune_gc() -> None:
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)


def _run(coro: Coroutine[Any, Any, None]) -> None:
    """uvloop when present (faster loop, see README), else the stock loop.

    A node allocates a few short-lived objects per host write and keeps many
    long-lived ones (uncommitted records, tables), so CPython's default
    cyclic GC (a young collection every 700 allocations, old ones scanning
    everything) cost about 12% of the Edge's per-write CPU. Objects made
    during start-up are frozen out of collection and young collections run
    every GC_GEN0_THRESHOLD allocations; the few reference cycles asyncio
    makes are still collected.
    """
    _tune_gc()
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


class _Loadable(Protocol):
    """A config class: CoreConfig, EdgeConfig or WitnessConfig (``load`` is a classmethod)."""

    def load(self, path: str) -> Any: ...


def _load(kind: _Loadable, path: str) -> Any:
    try:
        return kind.load(path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # unreadable, a directory, ...
        raise click.ClickException(f"{path}: cannot read the config file: "
                                   f"{e.strerror or e}") from None


def _serve(role: str, cfg: Any, quiet: bool, main: Callable[[], Coroutine[Any, Any, None]],
           known: tuple[type[BaseException], ...] = ()) -> None:
    """Run a node; a failed start is one line naming the port or path (and its config key),
    also written to the node's log as ``<role>_start_failed``, and a non-zero exit."""
    from steelfusion.startup import StartupError, explain

    try:
        log.setup(cfg.name, cfg.log_file, level="warning" if quiet else "info")
    except OSError as e:
        raise click.ClickException(f"{role} {cfg.name}: cannot start: {explain(e, cfg)}"
                                   ) from None
    from steelfusion.statefile import StateFileError

    errors: tuple[type[BaseException], ...] = (StartupError, ConfigError, OSError,
                                               StateFileError, *known)
    try:
        _run(main())
    except errors as e:
        msg = f"{role} {cfg.name}: cannot start: {explain(e, cfg)}"
        # the event to the log file only: the operator gets the one line below
        log.setup(cfg.name, None, tty=False)
        log.get(role).error(f"{role}_start_failed", error=msg)
        raise click.ClickException(msg) from None


class SizeType(click.ParamType):
    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


SIZE = SizeType()


class LunSizeType(SizeType):
    """A LUN size: its examples are ones a LUN may have (a whole number of 4 KiB blocks)."""

    name = "lun-size"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        try:
            return parse_size(value)
        except ValueError:
            self.fail(f"not a size: {value!r} (a multiple of 4K, e.g. 64M, 1G, 2T)", param, ctx)


LUN_SIZE = LunSizeType()
LUN_SIZE_HELP = "Size of each LUN: a multiple of 4K (e.g. 64M, 1G, 2T)."


@click.group()
@click.version_option(__version__)
def main() -> None:
    """steelfusion: Edge / Core / Witness nodes and a one-command lab."""


# -- nodes -------------------------------------------------------------------------
def _node(name: str, about: str) -> Callable[[Callable[..., None]], click.Command]:
    """``steelfusion NAME run --config FILE [--quiet]``: each node kind is a group with a
    ``run`` command (room for more commands per kind)."""
    group = click.Group(name, help=about)
    main.add_command(group)

    def register(fn: Callable[..., None]) -> click.Command:
        fn = click.option("--quiet", is_flag=True,
                          help="Log to the file only (warnings still to stderr).")(fn)
        fn = click.option("--config", "config", required=True,
                          type=click.Path(dir_okay=False))(fn)
        return group.command("run")(fn)

    return register


@_node("core", "A Core: serves LUNs to Edges and mirrors writes to its peer Core.")
def core_run(config: str, quiet: bool) -> None:
    """Run a Core from its TOML config until SIGTERM."""
    from core.lunstore import LunError
    from core.node import run

    cfg = _load(CoreConfig, config)
    if cfg.ha != "none":  # an HA pair's Core (issue 16): core/hahost.py runs it
        from core import hahost

        _serve("core", cfg, quiet, lambda: hahost.run(cfg), (LunError, ConfigError))
        return
    _serve("core", cfg, quiet, lambda: run(cfg), (LunError,))


@_node("edge", "An Edge: exports LUNs over iSCSI, buffers writes, ships them to the primary "
               "Core.")
@click.option("--witness", "witness", default=None,
              help="Also run a Witness inside this Edge on HOST:PORT (the Witness may be a "
                   "role assigned to one of the Edges).")
def edge_run(config: str, witness: str | None, quiet: bool) -> None:
    """Run an Edge from its TOML config until SIGTERM."""
    import dataclasses

    from edge.blockstore import BlockstoreError
    from edge.node import run
    from steelfusion.units import parse_addr
    from witness.logic import WitnessStateError

    cfg = _load(EdgeConfig, config)
    if witness:
        try:
            cfg = dataclasses.replace(cfg, witness=parse_addr(witness))
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--witness") from None
    key = "--witness" if witness else "[witness] listen"
    _serve("edge", cfg, quiet, lambda: run(cfg, key), (BlockstoreError, WitnessStateError))


@_node("witness", "A Witness: approves suspension for at most one Core of a pair.")
def witness_run(config: str, quiet: bool) -> None:
    """Run a standalone Witness from its TOML config until SIGTERM."""
    from witness.node import run

    cfg = _load(WitnessConfig, config)
    _serve("witness", cfg, quiet, lambda: run(cfg))


@_node("wan", "The netns lab's WAN link emulator: a TUN device per site port (root).")
def wan_run(config: str, quiet: bool) -> None:
    """Run the WAN emulator from its JSON config until SIGTERM or `stop`."""
    from steelfusion.wanemu import WanConfig, run

    cfg = _load(WanConfig, config)
    _serve("wan", cfg, quiet, lambda: run(cfg))


@_node("disk", "The lab's fault-injecting disk: a FUSE file system for Journal LUNs (root).")
def disk_run(config: str, quiet: bool) -> None:
    """Serve a folder through FUSE until SIGTERM; `lab journal CORE --full` makes it fail."""
    from steelfusion.faultdisk import DiskConfig, serve

    cfg = _load(DiskConfig, config)
    _blocking("disk", cfg, quiet, lambda: serve(cfg), (OSError, RuntimeError))


@_node("san", "The lab's data center storage array: tgtd exporting LUN files over iSCSI.")
def san_run(config: str, quiet: bool) -> None:
    """Run tgtd with the config's target and LUNs until SIGTERM (then tgtd stops too)."""
    from steelfusion.san import SanConfig, SanError, serve

    cfg = _load(SanConfig, config)
    _blocking("san", cfg, quiet, lambda: serve(cfg), (OSError, SanError))


def _blocking(role: str, cfg: Any, quiet: bool, serve: Callable[[], None],
              errors: tuple[type[BaseException], ...]) -> None:
    """A node that is not asyncio (FUSE, a tgtd supervisor): a failed start is one line."""
    try:
        log.setup(cfg.name, cfg.log_file, level="warning" if quiet else "info")
        serve()
    except errors as e:
        raise click.ClickException(f"{role} {cfg.name}: cannot start: {e}") from None


# -- lab ---------------------------------------------------------------------------
class _LabGroup(click.Group):
    """Usage errors of ``steelfusion lab ...`` (a missing argument, an unknown option) in
    one line, like every other refusal of the lab commands."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as e:
            raise _lab_usage(e) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            raise _lab_usage(e) from None


class _LabUsage(click.ClickException):
    exit_code = 2


def _lab_usage(e: click.UsageError) -> click.ClickException:
    if type(e).__name__ == "NoArgsIsHelpError":  # a bare group: its help is the answer
        return e
    where = e.ctx.command_path if e.ctx is not None else "steelfusion lab"
    return _LabUsage(f"{e.format_message()} (`{where} --help` says more)")


@main.group(cls=_LabGroup)
def lab() -> None:
    """The embedded default: Witness, two Cores and Edges on loopback (or, with
    `lab up --netns`, sites in network namespaces joined by emulated WAN links)."""


def _lab(workdir: str) -> Any:
    from steelfusion.lab import Lab

    return Lab(workdir)


def _lab_errors(fn: Any) -> Any:
    import functools

    @functools.wraps(fn)
    def wrapper(*a: Any, **k: Any) -> Any:
        from steelfusion.lab import LabError

        try:
            return fn(*a, **k)
        except LabError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


WORKDIR = click.option("--workdir", required=True, type=click.Path(),
                       help="Folder holding the lab's configs, LUN files, logs and lab.json.")


@lab.command("up")
@WORKDIR
@click.option("--luns", default=1, show_default=True, help="LUNs per Edge (1..256).")
@click.option("--lun-size", default="1G", show_default=True, type=LUN_SIZE, help=LUN_SIZE_HELP)
@click.option("--edges", default=None, type=int,
              help="Number of Edges  [default: 1; 2 with --ha]")
@click.option("--reserve", default="256M", show_default=True, type=SIZE,
              help="Each Edge's write reserve: uncommitted bytes before host writes wait "
                   "(at least 4M).")
@click.option("--witness-in-edge", is_flag=True,
              help="Run the Witness inside edge-1 instead of as its own process.")
@click.option("--netns", is_flag=True,
              help="Root: each site (branch, dc-a, dc-b, witness) in its own network "
                   "namespace, joined by emulated WAN links (`lab link`, `lab port`).")
@click.option("--journal-faults", is_flag=True,
              help="Root: each Core's Journal LUN on a FUSE disk that `lab journal CORE "
                   "--full/--offline` makes fail.")
@click.option("--san", type=click.Choice(["tgt"]), default=None,
              help="Each data center gets a storage array (tgtd: lab nodes san-a, san-b) "
                   "holding its Core's LUNs and Journal LUN, reached over iSCSI.")
@click.option("--ha", is_flag=True,
              help="Core HA (loopback; implies --san tgt): core-a1/core-a2 in dc-a and "
                   "core-b1/core-b2 in dc-b, each pair sharing its data center's array; Edges "
                   "spread over core-a1 and core-a2.")
@click.option("--json", "as_json", is_flag=True, help="Print lab.json.")
@_lab_errors
def lab_up(workdir: str, luns: int, lun_size: int, edges: int | None, reserve: int,
           witness_in_edge: bool, netns: bool, journal_faults: bool, san: str | None,
           ha: bool, as_json: bool) -> None:
    """Start a lab and return when every node is ready."""
    lab_ = _lab(workdir)
    data = lab_.up(luns=luns, lun_size=lun_size, edges=edges, reserve=reserve,
                   witness_in_edge=witness_in_edge, netns=netns,
                   journal_faults=journal_faults, san=san, ha=ha)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"lab up in {lab_.dir}" + (" (sites in network namespaces)" if netns else ""))

    def ns(n: dict[str, Any]) -> str:
        return f"  netns {n['netns']}" if n.get("netns") else ""

    w = data["witness"]
    where = f"inside {w['embedded_in']}" if w.get("embedded_in") else f"pid {w['pid']}"
    click.echo(f"  witness  {w['address']}  control {w['control']}  {where}{ns(w)}")
    for c in data["cores"]:
        pair = (f"  ({c['ha']} in {c['datacenter']}, partner {c['partner']}, {c['pair']})"
                if c.get("ha") else "")
        click.echo(f"  {c['name']:<8} {c['role']:<9} control {c['control']}  pid {c['pid']}"
                   f"{ns(c)}{pair}")
    for k in data.get("sans", []):
        whose = " and ".join(k.get("cores") or [k["core"]])
        click.echo(f"  {k['name']:<8} array    portal {k['portal']}  pid {k['pid']}  "
                   f"({whose}'s LUNs and Journal LUN; `lab kill {k['name']}` is its outage)")
    for k in data.get("disks", []):
        click.echo(f"  {k['name']}  {k['mount']}  pid {k['pid']}  (`steelfusion lab journal "
                   f"{k['core']} --full` makes it fail)")
    for e in data["edges"]:
        click.echo(f"  {e['name']:<8} portal {e['portal']}  control {e['control']}  "
                   f"pid {e['pid']}{ns(e)}")
        for t in e["targets"]:
            click.echo(f"           {t['url']}  (LUN id {t['lun_id']}, "
                       f"{format_size(t['size'])})")
    if data.get("netns"):
        wan = data["wan"]
        click.echo(f"  wan      control {wan['control']}  pid {wan['pid']}  (the WAN emulator; "
                   f"`steelfusion lab link` changes its links)")
        branch = data["sites"]["branch"]["netns"]
        click.echo(f"  hosts reach the portals from namespace {branch}, e.g. "
                   f"`ip netns exec {branch} qemu-img info URL`")


@lab.command("status")
@WORKDIR
@click.option("--json", "as_json", is_flag=True)
@_lab_errors
def lab_status(workdir: str, as_json: bool) -> None:
    """Roles, replication state and uncommitted data of every node."""
    st = _lab(workdir).status()
    if as_json:
        click.echo(json.dumps(st, indent=2, default=str))
        return
    from steelfusion.labview import status_lines

    click.echo("\n".join(status_lines(st)))


@lab.command("kill")
@click.argument("node")
@WORKDIR
@_lab_errors
def lab_kill(node: str, workdir: str) -> None:
    """SIGKILL one node (a crash, not a shutdown)."""
    n = _lab(workdir).kill(node, signal.SIGKILL)
    click.echo(f"killed {node} (pid {n['pid']})" if n.get("killed")
               else f"{node} was not running (pid {n['pid']} is gone); nothing to kill")


@lab.command("start")
@click.argument("node")
@WORKDIR
@_lab_errors
def lab_start(node: str, workdir: str) -> None:
    """Restart one node with its own config."""
    n = _lab(workdir).start(node)
    click.echo(f"started {node} (pid {n['pid']})")


@lab.command("down")
@WORKDIR
@_lab_errors
def lab_down(workdir: str) -> None:
    """Stop every node of the lab (SIGTERM, then SIGKILL after 15 s); a netns lab's
    WAN emulator and namespaces too."""
    stopped = _lab(workdir).down()
    click.echo("stopped " + (", ".join(stopped) if stopped else "nothing (no node was running)"))


@lab.command("link")
@click.argument("a", metavar="SITE_A")
@click.argument("b", metavar="SITE_B")
@WORKDIR
@click.option("--delay", default=None, help="One-way delay, e.g. 30ms, 0.2s.")
@click.option("--jitter", default=None, help="Random extra delay up to this, e.g. 5ms.")
@click.option("--rate", default=None,
              help="Bandwidth: bit, kbit, mbit, gbit (bits/s) or bps, kbps, mbps, gbps "
                   "(bytes/s), e.g. 100mbit; 0 or unlimited for no limit.")
@click.option("--loss", default=None, help="Packets lost at random, e.g. 0.5%.")
@click.option("--cut", is_flag=True, help="Pass nothing (a partition).")
@click.option("--heal", is_flag=True, help="Back to the defaults: no delay, limit or loss, "
                                           "not cut.")
@click.option("--one-way", is_flag=True, help="Only SITE_A -> SITE_B (default: both ways).")
@_lab_errors
def lab_link(a: str, b: str, workdir: str, delay: str | None, jitter: str | None,
             rate: str | None, loss: str | None, cut: bool, heal: bool, one_way: bool) -> None:
    """Change (or, with no setting, show) the WAN link between two sites of a netns lab."""
    from steelfusion.lab import parse_duration, parse_loss, parse_rate

    lab_ = _lab(workdir)
    args = {"delay": parse_duration(delay, "--delay") if delay is not None else None,
            "jitter": parse_duration(jitter, "--jitter") if jitter is not None else None,
            "rate": parse_rate(rate) if rate is not None else None,
            "loss": parse_loss(loss) if loss is not None else None}
    if not cut and not heal and all(v is None for v in args.values()):
        for ln in lab_.links(a, b):  # nothing to change: show it
            dropped = sum((ln.get("dropped") or {}).values())
            click.echo(f"link {ln['src']} -> {ln['dst']}: {_link_words(ln)} "
                       f"({ln.get('forwarded', 0)} packets, {format_size(ln.get('bytes', 0))}"
                       f"{f', {dropped} dropped' if dropped else ''})")
        return
    out = lab_.link(a, b, cut=cut, heal=heal, one_way=one_way, **args)
    for ln in out.get("links", []):
        click.echo(f"link {ln['src']} -> {ln['dst']}: " + _link_words(ln))


def _link_words(ln: dict[str, Any]) -> str:
    from steelfusion.lab import format_duration, format_rate

    if ln.get("cut"):
        return "cut"
    return (f"delay {format_duration(ln.get('delay') or 0)}, jitter "
            f"{format_duration(ln.get('jitter') or 0)}, rate {format_rate(ln.get('rate') or 0)}"
            f", loss {(ln.get('loss') or 0) * 100:g}%")


@lab.command("port")
@click.argument("port", metavar="SITE/N")
@WORKDIR
@click.option("--down", is_flag=True, help="Take the interface down.")
@click.option("--up", is_flag=True, help="Bring it back up.")
@_lab_errors
def lab_port(port: str, workdir: str, down: bool, up: bool) -> None:
    """Take one site interface of a netns lab down or up (dc-a/1: core-a's second
    replication interface)."""
    if down == up:
        raise _LabUsage(f"lab port {port}: say either --down or --up")
    out = _lab(workdir).port(port, up)
    click.echo(f"port {out.get('port', port)} {'up' if out.get('up', up) else 'down'}")


@lab.command("san-path")
@click.argument("core", metavar="CORE")
@click.argument("state", type=click.Choice(["cut", "ok"]))
@WORKDIR
@_lab_errors
def lab_san_path(core: str, state: str, workdir: str) -> None:
    """Cut a Core's own path to its array, or heal it (an HA lab: the Core is partitioned
    from the SAN while its partner keeps its path)."""
    out = _lab(workdir).san_path(core, state)
    click.echo(f"{out['core']}'s path to {out['array']}: {out['state']} "
               f"({out['connections']} connection(s), cut {out['cuts']} time(s))")


@lab.command("journal")
@click.argument("core", metavar="CORE")
@WORKDIR
@click.option("--full", "mode", flag_value="full",
              help="Writes fail ENOSPC: a thin Journal LUN out of space.")
@click.option("--offline", "mode", flag_value="offline",
              help="Every I/O fails EIO: a Journal LUN whose paths are gone.")
@click.option("--heal", "mode", flag_value="ok", help="Back to working.")
@_lab_errors
def lab_journal(core: str, workdir: str, mode: str | None) -> None:
    """Make a Core's Journal LUN fail, or work again (a lab started with --journal-faults)."""
    if mode is None:
        raise _LabUsage(f"lab journal {core}: say --full, --offline or --heal")
    out = _lab(workdir).journal_fault(core, mode)
    click.echo(f"{out['core']}'s Journal LUN ({out['disk']}): {out['mode']}")


@lab.command("wait-committed")
@WORKDIR
@click.option("--timeout", default=120.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds to wait.")
@_lab_errors
def lab_wait_committed(workdir: str, timeout: float) -> None:
    """Return when every Edge holds nothing uncommitted."""
    took = _lab(workdir).wait_committed(timeout)
    click.echo(f"all committed ({took:.2f}s)")


@main.command()
@click.option("--workdir", default=None, type=click.Path(),
              help="Lab folder (default: a new temporary folder, removed afterwards).")
@click.option("--size", "size", default="64M", show_default=True, type=SIZE,
              help="How much random data the host writes.")
@click.option("--lun-size", default="256M", show_default=True, type=LUN_SIZE,
              help=LUN_SIZE_HELP)
@click.option("--keep", is_flag=True, help="Leave the lab running.")
def demo(workdir: str | None, size: int, lun_size: int, keep: bool) -> None:
    """Lab up, a real workload through qemu-img, prove three copies identical, lab down."""
    from steelfusion.demo import run_demo

    sys.exit(run_demo(workdir, size, lun_size, keep))


@main.command()
@click.option("--workdir", default=None, type=click.Path(file_okay=False))
@click.option("--rounds", default=3, show_default=True, help="Alternating A/B rounds.")
@click.option("--quick", is_flag=True, help="A short smoke run (1/20 of the I/O; --wan: 1/4 "
                                              "of the time per run).")
@click.option("--lun-size", default="1G", show_default=True, type=LUN_SIZE,
              help=LUN_SIZE_HELP)
@click.option("--workload", "only", multiple=True,
              help="Run only this workload (repeatable), e.g. '4K write QD32'.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--precondition/--no-precondition", default=None,
              help="Write both LUNs once before measuring (no first-touch allocation in "
                   "any round). Default: on, except with --wan (it would warm the Edge's "
                   "cache).")
@click.option("--wan", "wan", default=None, metavar="DELAY",
              help="The WAN benchmark (root): the branch in its own network namespace, the "
                   "data centers DELAY away one way (e.g. 30ms); the Edge at the branch "
                   "beside tgt in dc-a reached over that WAN.")
@click.option("--rate", default=None, help="With --wan: the branch links' rate, e.g. 100mbit "
                                           "(default unlimited).")
@click.option("--jitter", default=None, help="With --wan: delay varies by up to this, e.g. "
                                             "2ms.")
@click.option("--loss", default=None, help="With --wan: packets lost on the branch links, "
                                           "e.g. 0.1%.")
@click.option("--dc-delay", default=None,
              help="With --wan: one-way delay between dc-a and dc-b (default 1ms, metro).")
@click.option("--san", type=click.Choice(["tgt"]), default=None,
              help="The Cores' LUNs on the lab's storage arrays (lab up --san), to weigh the "
                   "iSCSI hop to the array against the file-backed run.")
@click.option("--observe-cost", is_flag=True,
              help="What metrics and consoles cost writes: two labs, observation on (every "
                   "metrics endpoint scraped each second, every console's event stream "
                   "open) and off, the same workloads in alternating rounds; on/off ratios.")
def bench(workdir: str | None, rounds: int, quick: bool, lun_size: int, only: tuple[str, ...],
          as_json: bool, precondition: bool | None, wan: str | None, rate: str | None,
          jitter: str | None, loss: str | None, dc_delay: str | None, san: str | None,
          observe_cost: bool) -> None:
    """qemu-img bench against a lab Edge (with replication) and tgt, side by side; with
    --wan, across an emulated WAN (the benchmark SteelFusion exists for); with
    --observe-cost, a lab with metrics and consoles watched against one without."""
    from steelfusion.bench import BenchError
    from steelfusion.bench import main as bench_main
    from steelfusion.benchobserve import main_observe
    from steelfusion.benchwan import main_wan, parse_wan_options
    from steelfusion.initiator import InitiatorError
    from steelfusion.lab import LabError

    try:
        if observe_cost and (wan is not None or san is not None):
            raise BenchError(f"--observe-cost runs two loopback labs with file-backed Cores; "
                             f"leave out {'--wan' if wan is not None else '--san'}")
        if wan is None:
            given = [n for n, v in (("--rate", rate), ("--jitter", jitter), ("--loss", loss),
                                    ("--dc-delay", dc_delay)) if v is not None]
            if given:
                raise BenchError(f"{given[0]} applies only to the WAN benchmark: add --wan "
                                 f"DELAY (e.g. steelfusion bench --wan 30ms {given[0]} ...)")
            if observe_cost:
                sys.exit(main_observe(workdir, rounds, quick, lun_size, as_json,
                                      list(only) or None, precondition is not False))
            sys.exit(bench_main(workdir, rounds, quick, lun_size, as_json, list(only) or None,
                                precondition is not False, san))
        if san is not None:
            raise BenchError("--san is for the loopback benchmark; the WAN benchmark keeps "
                             "file-backed Cores")
        if precondition:
            raise BenchError("--precondition does not apply with --wan: writing the LUN "
                             "through the Edge would put it all in the Edge's cache (no "
                             "cold reads left); leave it out")
        spec = parse_wan_options(wan, rate, jitter, loss, dc_delay)
        sys.exit(main_wan(workdir, spec, rounds, quick, lun_size, as_json, list(only) or None))
    except (InitiatorError, LabError, BenchError) as e:
        raise click.ClickException(str(e)) from None


@main.command("bench-path")
@click.option("--count", default=100_000, show_default=True, help="Commands per workload.")
@click.option("--quick", is_flag=True, help="A short smoke run.")
@click.option("--json", "as_json", is_flag=True)
def bench_path(count: int, quick: bool, as_json: bool) -> None:
    """CPU per command of the Edge's own iSCSI path (one process, no network, no Cores)."""
    import dataclasses

    from steelfusion.benchpath import render, run

    log.setup("bench-path", None, level="warning")
    _tune_gc()  # as in a node process
    results = run(count, quick)
    if as_json:
        print(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    else:
        print(render(results))


@main.command()
@click.option("--seeds", default=2000, show_default=True, help="How many seeds to run.")
@click.option("--seed", "first", default=0, show_default=True, help="First seed (replay one).")
@click.option("--writes", default=120, show_default=True, help="Host writes per seed.")
@click.option("--full", is_flag=True, help="Journal LUNs, the Witness and operator drills "
              "(suspend, resume, failover, partitions) too.")
@click.option("--plant", default=None, help="Plant bugs on purpose (comma-separated): "
              "ack-before-fsync, skip-gap, lost-frames, seal-late, no-fence, "
              "ack-unjournaled.")
@click.option("--jobs", default=0, show_default=True, help="Processes (0: one per CPU).")
@click.option("-v", "--verbose", is_flag=True, help="Replay one seed and print its events.")
def sim(seeds: int, first: int, writes: int, full: bool, plant: str | None, jobs: int,
        verbose: bool) -> None:
    """Seeded in-memory simulation of Edge, Cores, Journal and Witness under faults (issue 9).

    Each seed runs the real Core engine, Edge shipping rules, journal and Witness logic on a
    virtual clock with a network and disks that misbehave, then checks DESIGN.md's
    invariants. A failure prints the command that replays it.
    """
    import time

    from steelfusion.sim import Sim, SimFailure, run_many

    if "--seed" in sys.argv and "--seeds" not in sys.argv:
        seeds = 1  # ``--seed N`` alone replays that seed
    try:
        if verbose or seeds == 1:
            s = Sim(first, plant=plant, writes=writes, full=full)
            try:
                r = s.run()
            finally:
                if verbose:
                    click.echo("\n".join(s.log))
                    for core in s.cores:
                        for ev in core.events:
                            click.echo(f"{ev['time']:9.4f} {core.name} {ev['event']} "
                                       f"{ {k: v for k, v in ev.items() if k not in ('n', 'time', 'event', 'node')} }")
            click.echo(f"seed {first}: {r.writes} writes, {r.committed} committed, "
                       f"{len(r.faults)} faults, {r.failovers} failovers, {r.gaps} gaps refused")
            click.echo("1 passed, 0 failed")
            return
        t0 = time.monotonic()
        ran, failures = run_many(range(first, first + seeds), plant, writes, full, jobs)
    except SimFailure as e:
        click.echo(f"FAIL {e}", err=True)
        click.echo("0 passed, 1 failed")
        sys.exit(1)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    for f in failures:
        click.echo(f"FAIL {f}", err=True)
    el = time.monotonic() - t0
    kind = "full" if full else "write path"
    click.echo(f"{ran - len(failures)} passed, {len(failures)} failed ({kind}, {el:.1f} s, "
               f"seeds {first}..{first + seeds - 1}{', planted ' + plant if plant else ''})")
    if failures:
        sys.exit(1)


class _OneLineCommand(click.Command):
    """Usage errors (a bad or unknown option) in one line, like every other refusal."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as e:
            raise _lab_usage(e) from None


@main.command(cls=_OneLineCommand)
@click.option("--workdir", required=True, type=click.Path(),
              help="The drill's own folder (new, empty, or an earlier drill's): lab, logs, "
                   "history.")
@click.option("--seed", default=None, type=int, help="Seed of the fault schedule and the "
              "workload (default: a random one, printed).")
@click.option("--duration", default="5m", show_default=True, help="How long faults are "
              "injected, e.g. 2m, 90s, 1h.")
@click.option("--faults", default=None, help="Fault kinds to inject (comma-separated, or all): "
              "kill,stop,partition,isolate,wan,operator,journal,outage by default; with --san, "
              "san (the array down) instead of journal; with --ha, kill,stop,ha-kill,ha-both,"
              "ha-san.")
@click.option("--luns", default=2, show_default=True, help="LUNs per Edge (one writer each).")
@click.option("--edges", default=None, type=int, help="Number of Edges (default 1; 2 with "
              "--ha).")
@click.option("--lun-size", default="64M", show_default=True, type=LUN_SIZE, help=LUN_SIZE_HELP)
@click.option("--report", default=None, type=click.Path(dir_okay=False),
              help="HTML report (default: WORKDIR-report.html next to the folder).")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="JSON report (default: WORKDIR-report.json next to the folder).")
@click.option("--keep", is_flag=True, help="Leave the lab running afterwards.")
@click.option("--san", type=click.Choice(["tgt"]), default=None,
              help="Each data center's Core keeps its LUNs and Journal LUN on a storage array "
                   "(as lab up --san).")
@click.option("--ha", is_flag=True, help="The Core HA drill on loopback (no root): lab up --ha, "
              "four Cores, HA faults with takeover and handback.")
def drill(workdir: str, seed: int | None, duration: str, faults: str | None, luns: int,
          edges: int | None, lun_size: int, report: str | None, json_path: str | None,
          keep: bool, san: str | None, ha: bool) -> None:
    """A failover drill (root): a netns lab, a seeded schedule of faults under a real
    workload, the runbook's operator actions, then a check of every copy; exit 0 on PASS.
    With --ha: the Core HA lab on loopback instead."""
    import random
    from pathlib import Path

    from steelfusion.drill import DrillError, Options, parse_duration, parse_faults, run

    try:
        opts = Options(workdir=Path(workdir),
                       seed=seed if seed is not None else random.randrange(1, 1_000_000),
                       duration=parse_duration(duration),
                       faults=parse_faults(faults, san, ha=ha), luns=luns,
                       edges=edges if edges is not None else 2 if ha else 1,
                       lun_size=lun_size, san=None if ha else san, ha=ha,
                       report=Path(report) if report else None,
                       json_path=Path(json_path) if json_path else None, keep=keep)
        sys.exit(run(opts, click.echo))
    except DrillError as e:
        raise click.ClickException(str(e)) from None


main.add_command(__import__("steelfusion.vmcli", fromlist=["vm"]).vm)  # steelfusion vm build|run
__import__("steelfusion.sancli", fromlist=["attach"]).attach(main.commands["san"])  # san create|status|delete (LIO)

if __name__ == "__main__":
    main()
