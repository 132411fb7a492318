"""The netns lab's WAN link emulator process (issue 10): TUN devices around :mod:`wan`.

``steelfusion wan run --config FILE`` creates one TUN device per site port,
inside that site's namespace (a TUN device is created in the namespace of
the thread that opens ``/dev/net/tun``), names it ``wanK``, gives it its /32
address and routes 10.99.0.0/16 through it (a second port gets a policy rule
so a socket bound to its address leaves through it). Then every packet a
site sends to another site comes out of a TUN fd here, goes through
:class:`steelfusion.wan.Wan` (delay, jitter, rate, loss, cuts, ports down)
and is written into the destination site's TUN.

The devices live exactly as long as their fds: stop, SIGTERM, SIGKILL or a
crash all remove them; the namespaces are the lab's. Operators and the lab
change links at run time over the control channel (``status``, ``link``,
``port``, ``stop``).
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import errno
import fcntl
import ipaddress
import os
import signal
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steelfusion import control, log, netns
from steelfusion.config import ConfigError, load_json
from steelfusion.startup import StartupError, listening
from steelfusion.units import parse_addr
from steelfusion.wan import LinkParams, Wan

_log = log.get("wan")

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
DEFAULT_MTU = 9000
DEFAULT_PREFIX = "10.99.0.0/16"
TXQLEN = 5000  # the TUN's queue towards us: slack for bursts while we are busy
MAX_BATCH = 1024  # packets read per readable event before others get a turn
RULE_PRIORITY = 1000
PARAM_KEYS = ("delay", "jitter", "rate", "loss", "cut", "queue_bytes")
TOP_KEYS = ("name", "control", "mtu", "seed", "log_file", "prefix", "sites", "links")
SITE_KEYS = ("netns", "ports")
LINK_KEYS = ("a", "b", "one_way", *PARAM_KEYS)
CMD_LINK_KEYS = ("cmd", "a", "b", "one_way", "heal", *PARAM_KEYS)


@dataclass
class SiteConfig:
    name: str
    netns: str
    ports: list[str]


@dataclass
class WanConfig:
    """The emulator's JSON config; ``links`` hold (a, b, one_way, params)."""

    control: tuple[str, int]
    sites: dict[str, SiteConfig]
    links: list[tuple[str, str, bool, LinkParams]] = field(default_factory=list)
    name: str = "wan"
    mtu: int = DEFAULT_MTU
    seed: int = 0
    log_file: str | None = None
    prefix: str = DEFAULT_PREFIX
    source: str = ""

    @classmethod
    def load(cls, path: Path | str) -> WanConfig:
        return cls.parse(load_json(path), str(path))

    @classmethod
    def parse(cls, data: Any, source: str = "<config>") -> WanConfig:
        def err(where: str, msg: str) -> ConfigError:
            return ConfigError(f"{source}: {where}: {msg}")

        def keys(d: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
            for k in d:
                if k not in allowed:
                    close = difflib.get_close_matches(k, allowed, n=1)
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                    raise ConfigError(f"{source}: unknown key '{k}' in {where}{hint}")

        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the config must be a JSON object")
        keys(data, TOP_KEYS, "the config")
        if "control" not in data:
            raise err("control", "required (\"127.0.0.1:PORT\")")
        try:
            ctl = parse_addr(str(data["control"]))
        except ValueError as e:
            raise err("control", str(e)) from None
        name = data.get("name", "wan")
        if not isinstance(name, str) or not name:
            raise err("name", f"must be a non-empty string, got {name!r}")
        mtu: Any = data.get("mtu", DEFAULT_MTU)
        if not isinstance(mtu, int) or isinstance(mtu, bool) or not 576 <= mtu <= 65535:
            raise err("mtu", f"must be a whole number from 576 to 65535, got {mtu!r}")
        seed = data.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise err("seed", f"must be a whole number, got {seed!r}")
        log_file = data.get("log_file")
        if log_file is not None and not isinstance(log_file, str):
            raise err("log_file", f"must be a path, got {log_file!r}")
        prefix = data.get("prefix", DEFAULT_PREFIX)
        try:
            net = ipaddress.IPv4Network(prefix)
        except (ValueError, TypeError):
            raise err("prefix", f"must be an IPv4 network like {DEFAULT_PREFIX}, "
                                f"got {prefix!r}") from None
        sites_in = data.get("sites")
        if not isinstance(sites_in, dict) or not sites_in:
            raise err("sites", "required: an object of sites, each {\"netns\": NAME, "
                               "\"ports\": [ADDRESS, ...]}")
        sites: dict[str, SiteConfig] = {}
        seen: dict[str, str] = {}
        for sname, s in sites_in.items():
            where = f"sites.{sname}"
            if not sname or "/" in sname:
                raise err(where, "a site name is non-empty and has no '/'")
            if not isinstance(s, dict):
                raise err(where, "must be an object {\"netns\": NAME, \"ports\": [...]}")
            keys(s, SITE_KEYS, where)
            ns = s.get("netns")
            if not isinstance(ns, str) or not ns or "/" in ns:
                raise err(f"{where}.netns", f"must be a namespace name, got {ns!r}")
            other = next((o.name for o in sites.values() if o.netns == ns), None)
            if other is not None:
                raise err(f"{where}.netns", f"{ns} is also site {other}'s namespace")
            ports = s.get("ports")
            if not isinstance(ports, list) or not ports:
                raise err(f"{where}.ports", "must be a non-empty list of IPv4 addresses")
            for k, a in enumerate(ports):
                try:
                    ip = ipaddress.IPv4Address(a)
                except (ValueError, TypeError):
                    raise err(f"{where}.ports[{k}]", f"not an IPv4 address: {a!r}") from None
                if ip not in net:
                    raise err(f"{where}.ports[{k}]", f"{a} is outside prefix {net}")
                if str(ip) in seen:
                    raise err(f"{where}.ports[{k}]", f"{a} is also {seen[str(ip)]}")
                seen[str(ip)] = f"{sname}/{k}"
            sites[sname] = SiteConfig(sname, ns, [str(ipaddress.IPv4Address(a)) for a in ports])
        links_in = data.get("links", [])
        if not isinstance(links_in, list):
            raise err("links", "must be a list of {\"a\": SITE, \"b\": SITE, ...}")
        links = []
        for i, ln in enumerate(links_in):
            where = f"links[{i}]"
            if not isinstance(ln, dict):
                raise err(where, "must be an object {\"a\": SITE, \"b\": SITE, ...}")
            keys(ln, LINK_KEYS, where)
            a, b = ln.get("a"), ln.get("b")
            for key, v in (("a", a), ("b", b)):
                if not isinstance(v, str) or v not in sites:
                    raise err(f"{where}.{key}",
                              f"unknown site {v!r}; sites: {', '.join(sites)}")
            if a == b:
                raise err(where, f"a link joins two different sites, got {a!r} twice")
            one_way = ln.get("one_way", False)
            if not isinstance(one_way, bool):
                raise err(f"{where}.one_way", f"must be true or false, got {one_way!r}")
            try:
                params = LinkParams(**{k: ln[k] for k in PARAM_KEYS if k in ln})
            except ValueError as e:
                raise err(where, str(e)) from None
            links.append((str(a), str(b), one_way, params))
        return cls(control=ctl, sites=sites, links=links, name=name, mtu=mtu, seed=seed,
                   log_file=log_file, prefix=str(net), source=source)


class _Tun:
    """One site port's TUN device: its fd, name in the namespace and address."""

    def __init__(self, port: str, site: SiteConfig, k: int, fd: int) -> None:
        self.port = port
        self.site = site
        self.k = k
        self.ifname = f"wan{k}"
        self.address = site.ports[k]
        self.fd = fd


def _open_tun(ifname: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def _configure(site: SiteConfig, tuns: list[_Tun], mtu: int, prefix: str) -> None:
    """Addresses, routes and policy rules of one site namespace (pyroute2, this thread)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")
        if lo:
            ipr.link("set", index=lo[0], state="up")
        for t in tuns:
            # no IPv6 chatter on the WAN
            with contextlib.suppress(OSError), \
                    open(f"/proc/sys/net/ipv6/conf/{t.ifname}/disable_ipv6", "w") as f:
                f.write("1")
            idx = ipr.link_lookup(ifname=t.ifname)[0]
            ipr.link("set", index=idx, mtu=mtu, txqlen=TXQLEN)
            ipr.addr("add", index=idx, address=t.address, prefixlen=32)
            ipr.link("set", index=idx, state="up")
            if t.k == 0:
                ipr.route("add", dst=prefix, oif=idx, prefsrc=t.address)
            else:
                table = 100 + t.k
                ipr.route("add", dst=prefix, oif=idx, prefsrc=t.address, table=table)
                try:  # rules outlive devices: a restarted emulator finds its own
                    ipr.rule("add", src=t.address, src_len=32, table=table,
                             priority=RULE_PRIORITY + t.k)
                except NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise


class WanEmulator:
    """The running emulator: TUN fds, the :class:`Wan`, the timer, the control server."""

    def __init__(self, cfg: WanConfig) -> None:
        self.cfg = cfg
        self.wan = Wan(seed=cfg.seed)
        self.tuns: dict[str, _Tun] = {}
        self.fds: dict[str, int] = {}
        self.write_errors = 0
        self.read_errors = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at: float | None = None
        self.stopping = asyncio.Event()
        self.bufsize = cfg.mtu + 64
        for sname, site in cfg.sites.items():
            for k, addr in enumerate(site.ports):
                self.wan.add_port(f"{sname}/{k}", sname, addr)
        for a, b, one_way, params in cfg.links:
            self.wan.set_link(a, b, params)
            if not one_way:
                self.wan.set_link(b, a, params.replace())

    # -- devices ------------------------------------------------------------------------
    def open_devices(self) -> None:
        """Create and configure every TUN; on failure close what was opened (they vanish)."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            for sname, site in self.cfg.sites.items():
                key = f"sites.{sname}.netns"
                src = f" in {self.cfg.source}" if self.cfg.source else ""
                made: list[_Tun] = []
                try:
                    with netns.in_netns(site.netns):
                        for k in range(len(site.ports)):
                            try:
                                fd = _open_tun(f"wan{k}")
                            except OSError as e:
                                raise StartupError(self._tun_error(site, k, e, key, src)
                                                   ) from None
                            t = _Tun(f"{sname}/{k}", site, k, fd)
                            self.tuns[t.port] = t
                            self.fds[t.port] = fd
                            made.append(t)
                        _configure(site, made, self.cfg.mtu, self.cfg.prefix)
                except netns.NetnsError as e:
                    raise StartupError(f"site {sname}: {e} ({key}{src}; the lab creates it: "
                                       f"`steelfusion lab up --netns`)") from None
                except (OSError, ValueError, NetlinkError) as e:
                    raise StartupError(f"site {sname}: cannot configure the WAN devices in "
                                       f"network namespace {site.netns}: {e}") from None
        except BaseException:
            self.close_devices()
            raise

    @staticmethod
    def _tun_error(site: SiteConfig, k: int, e: OSError, key: str, src: str) -> str:
        what = f"site {site.name}: cannot create TUN device wan{k} in {site.netns}"
        if e.errno == errno.EBUSY:
            return (f"{what}: it exists and is in use (another WAN emulator serves this lab? "
                    f"stop it first; {key}{src})")
        if e.errno in (errno.EPERM, errno.EACCES):
            return f"{what}: permission denied (the WAN emulator needs root)"
        if e.errno == errno.ENOENT:
            return f"{what}: no /dev/net/tun on this host (load the tun module)"
        return f"{what}: {e.strerror or e}"

    def close_devices(self) -> None:
        for fd in self.fds.values():
            if self.loop is not None:
                with contextlib.suppress(Exception):
                    self.loop.remove_reader(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        self.tuns.clear()

    # -- the data path ------------------------------------------------------------------
    def _on_readable(self, port: str, fd: int) -> None:
        assert self.loop is not None
        now = self.loop.time()
        read = os.read
        receive = self.wan.receive
        size = self.bufsize
        for _ in range(MAX_BATCH):
            try:
                pkt = read(fd, size)
            except BlockingIOError:
                break
            except OSError as e:  # the device is gone (its namespace removed?): stop reading
                self.read_errors += 1
                self.loop.remove_reader(fd)
                self.wan.set_port(port, False)
                _log.error("wan_port_failed", port=port, error=str(e))
                break
            receive(port, pkt, now)
        self._flush(now)

    def _flush(self, now: float) -> None:
        fds = self.fds
        write = os.write
        for port, pkt in self.wan.due(now):
            try:
                write(fds[port], pkt)
            except OSError:  # the device queue is full, or it is going away
                self.write_errors += 1
        d = self.wan.next_deadline()
        if d is not None and (self.timer_at is None or d < self.timer_at):
            assert self.loop is not None
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at = d
            self.timer = self.loop.call_at(d, self._on_timer)

    def _on_timer(self) -> None:
        assert self.loop is not None
        self.timer = None
        self.timer_at = None
        self._flush(self.loop.time())

    # -- control ------------------------------------------------------------------------
    async def cmd_status(self, req: dict[str, Any]) -> dict[str, Any]:
        st = self.wan.status()
        for p, info in st["ports"].items():
            t = self.tuns.get(p)
            if t is not None:
                info["netns"] = t.site.netns
                info["ifname"] = t.ifname
        st["counters"]["write_errors"] = self.write_errors
        st["counters"]["read_errors"] = self.read_errors
        return {"name": self.cfg.name, "pid": os.getpid(), "mtu": self.cfg.mtu, **st}

    async def cmd_link(self, req: dict[str, Any]) -> dict[str, Any]:
        for k in req:
            if k not in CMD_LINK_KEYS:
                close = difflib.get_close_matches(k, CMD_LINK_KEYS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(f"link: unknown field '{k}'{hint}")
        a, b = req.get("a"), req.get("b")
        sites = list(self.cfg.sites)
        for name, v in (("a", a), ("b", b)):
            if not isinstance(v, str) or v not in sites:
                raise ValueError(f"link: {name}: unknown site {v!r}; sites: {', '.join(sites)}")
        assert isinstance(a, str) and isinstance(b, str)
        if a == b:
            raise ValueError(f"link: a link joins two different sites, got {a!r} twice")
        one_way, heal = req.get("one_way", False), req.get("heal", False)
        for name, v in (("one_way", one_way), ("heal", heal)):
            if not isinstance(v, bool):
                raise ValueError(f"link: {name} must be true or false, got {v!r}")
        changes = {k: req[k] for k in PARAM_KEYS if k in req}
        pairs = [(a, b)] if one_way else [(a, b), (b, a)]
        new = []
        for src, dst in pairs:  # all checked before any is applied
            base = LinkParams() if heal else self.wan.params(src, dst)
            try:
                new.append((src, dst, base.replace(**changes)))
            except ValueError as e:
                raise ValueError(f"link {a} {b}: {e}") from None
        for src, dst, params in new:
            self.wan.set_link(src, dst, params)
            _log.info("wan_link_set", src=src, dst=dst, heal=heal, **params.as_dict())
        return {"links": [{"src": s, "dst": d, **p.as_dict()} for s, d, p in new]}

    async def cmd_port(self, req: dict[str, Any]) -> dict[str, Any]:
        port, up = req.get("port"), req.get("up")
        if not isinstance(port, str) or port not in self.tuns:
            raise ValueError(f"port: unknown port {port!r}; ports: {', '.join(self.tuns)}")
        if not isinstance(up, bool):
            raise ValueError(f"port: up must be true or false, got {up!r}")
        self.wan.set_port(port, up)
        _log.info("wan_port_set", port=port, up=up)
        return {"port": port, "up": up}

    async def cmd_stop(self, req: dict[str, Any]) -> dict[str, Any]:
        asyncio.get_running_loop().call_soon(self.stopping.set)
        return {"stopping": True}

    # -- life -----------------------------------------------------------------------------
    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        # pyroute2's blocking API runs its own event loop: not on this thread's
        await asyncio.to_thread(self.open_devices)
        server: asyncio.Server | None = None
        try:
            for t in self.tuns.values():
                self.loop.add_reader(t.fd, self._on_readable, t.port, t.fd)
            src = f" in {self.cfg.source}" if self.cfg.source else ""
            server = await listening(
                control.serve(*self.cfg.control, {"status": self.cmd_status,
                                                  "link": self.cmd_link,
                                                  "port": self.cmd_port,
                                                  "stop": self.cmd_stop}),
                self.cfg.control, "control", src.removeprefix(" in "))
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.loop.add_signal_handler(sig, self.stopping.set)
            _log.info("wan_started", control=f"{self.cfg.control[0]}:{self.cfg.control[1]}",
                      ports={p: f"{t.site.netns}/{t.ifname} {t.address}"
                             for p, t in self.tuns.items()}, mtu=self.cfg.mtu)
            await self.stopping.wait()
        finally:
            if self.timer is not None:
                self.timer.cancel()
            self.close_devices()
            if server is not None:
                server.close()
            _log.info("wan_stopped", counters=self.wan.status()["counters"])


async def run(cfg: WanConfig) -> None:
    await WanEmulator(cfg).run()
