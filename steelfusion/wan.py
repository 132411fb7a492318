"""A WAN between lab sites, sans-IO: IPv4 packets in, delayed packets out (issue 10).

This kernel has no tc netem, so the netns lab emulates its WAN links in
userspace: :mod:`steelfusion.wanemu` reads each packet a site sends from that
site's TUN device, hands it to :meth:`Wan.receive` with the time, and writes
what :meth:`Wan.due` returns into the destination site's TUN. Everything
that decides a packet's fate is here, with no clock, sockets or tasks, so it
is tested by feeding packets and times.

Each directed link (source site -> destination site) is a serializer plus a
delay line: a packet starts when the link is free (``busy_until``), takes
``len/rate`` seconds, then ``delay`` plus a seeded jitter sample, and never
arrives before the packet ahead of it on that link (no reordering, like a
real cable). ``queue_bytes`` is the bottleneck buffer: bytes still waiting
for the serializer; past it packets are dropped, as a router would. Loss is
drawn from the same seeded generator, so one seed and one packet sequence
give one outcome. Every drop is counted by reason.
"""

from __future__ import annotations

import dataclasses
import heapq
import ipaddress
import itertools
import random
from collections import deque
from dataclasses import dataclass
from typing import Any

#: Why a packet was dropped (status counters).
DROP_REASONS = ("not_ipv4", "no_route", "port_down", "cut", "loss", "queue_full", "held_full")

DEFAULT_QUEUE_BYTES = 4 << 20
DEFAULT_MAX_HELD = 256 << 20


@dataclass
class LinkParams:
    """One direction of a link.

    ``delay`` and ``jitter`` are seconds (a packet's delay is uniform in
    delay ± jitter, never below 0); ``rate`` is bytes/s (0: unlimited);
    ``loss`` a probability 0..1; ``queue_bytes`` the bottleneck buffer (bytes
    waiting for ``rate``; unused when unlimited).
    """

    delay: float = 0.0
    jitter: float = 0.0
    rate: float = 0.0
    loss: float = 0.0
    cut: bool = False
    queue_bytes: int = DEFAULT_QUEUE_BYTES

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse values no link can have, naming the field."""
        for name in ("delay", "jitter", "rate"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0 \
                    or v == float("inf"):
                raise ValueError(f"link {name} must be a finite number >= 0, not {v!r}")
        if not isinstance(self.loss, (int, float)) or isinstance(self.loss, bool) \
                or not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"link loss must be between 0 and 1, not {self.loss!r}")
        if not isinstance(self.cut, bool):
            raise ValueError(f"link cut must be true or false, not {self.cut!r}")
        if not isinstance(self.queue_bytes, int) or isinstance(self.queue_bytes, bool) \
                or self.queue_bytes <= 0:
            raise ValueError(f"link queue_bytes must be a whole number > 0, "
                             f"not {self.queue_bytes!r}")

    def replace(self, **changes: Any) -> LinkParams:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Port:
    __slots__ = ("address", "key", "name", "routes", "rx_bytes", "rx_packets", "site",
                 "tx_bytes", "tx_packets", "up")

    def __init__(self, name: str, site: str, address: str) -> None:
        self.name = name
        self.site = site
        self.address = address
        self.key = ipaddress.IPv4Address(address).packed
        self.up = True
        self.rx_packets = self.rx_bytes = self.tx_packets = self.tx_bytes = 0
        # destination address -> (link, destination port): filled on first use
        self.routes: dict[bytes, tuple[_Link, _Port]] = {}


class _Link:
    __slots__ = ("busy_until", "bytes", "dropped", "dst", "forwarded", "held_bytes", "in_heap",
                 "items", "last_deliver", "params", "src", "times")

    def __init__(self, src: str, dst: str) -> None:
        self.src = src
        self.dst = dst
        self.params = LinkParams()
        self.busy_until = 0.0
        self.last_deliver = 0.0
        # two parallel FIFOs: deliver_at, and the (port, packet) handed out by due()
        self.times: deque[float] = deque()
        self.items: deque[tuple[str, bytes]] = deque()
        self.held_bytes = 0
        self.in_heap = False
        self.forwarded = 0
        self.bytes = 0
        self.dropped = dict.fromkeys(DROP_REASONS, 0)


class Wan:
    """Sites, their ports (one address each) and a directed link between every two sites."""

    def __init__(self, seed: int = 0, max_held: int = DEFAULT_MAX_HELD) -> None:
        self.rng = random.Random(seed)
        self.max_held = max_held
        self.ports: dict[str, _Port] = {}
        self.by_addr: dict[bytes, _Port] = {}
        self.sites: list[str] = []
        self.links: dict[tuple[str, str], _Link] = {}
        self.heap: list[tuple[float, int, _Link]] = []
        self.seq = itertools.count()
        self.held_bytes = 0
        self.held_packets = 0
        self.forwarded = 0
        self.dropped = dict.fromkeys(DROP_REASONS, 0)

    # -- topology ---------------------------------------------------------------------
    def add_port(self, port: str, site: str, address: str) -> None:
        """A site's interface ``port`` (e.g. ``dc-a/1``) with its IPv4 ``address``."""
        if port in self.ports:
            raise ValueError(f"port {port} already exists")
        p = _Port(port, site, address)
        if p.key in self.by_addr:
            raise ValueError(f"address {address} of port {port} is already port "
                             f"{self.by_addr[p.key].name}'s")
        self.ports[port] = p
        self.by_addr[p.key] = p
        if site not in self.sites:
            self.sites.append(site)
        for q in self.ports.values():
            q.routes.clear()

    def _site(self, site: str) -> str:
        if site not in self.sites:
            raise ValueError(f"unknown site {site!r}; sites: {', '.join(self.sites)}")
        return site

    def link(self, src: str, dst: str) -> _Link:
        key = (src, dst)
        ln = self.links.get(key)
        if ln is None:
            ln = self.links[key] = _Link(src, dst)
        return ln

    def params(self, src_site: str, dst_site: str) -> LinkParams:
        return self.link(self._site(src_site), self._site(dst_site)).params

    def set_link(self, src_site: str, dst_site: str, params: LinkParams) -> None:
        """Set one direction's parameters. Cutting it loses what is on the wire."""
        params.validate()
        ln = self.link(self._site(src_site), self._site(dst_site))
        ln.params = params
        if params.cut:
            self._flush(ln, "cut")

    def set_port(self, port: str, up: bool) -> None:
        """An interface down drops what it sends and what is sent to it."""
        p = self.ports.get(port)
        if p is None:
            raise ValueError(f"unknown port {port!r}; ports: {', '.join(self.ports)}")
        p.up = up

    def _flush(self, ln: _Link, reason: str) -> None:
        n = len(ln.items)
        if not n:
            return
        ln.times.clear()
        ln.items.clear()
        self.held_packets -= n
        self.held_bytes -= ln.held_bytes
        ln.held_bytes = 0
        ln.dropped[reason] += n
        self.dropped[reason] += n
        # its heap entry, if any, is found empty by due() and discarded

    # -- packets ----------------------------------------------------------------------
    def _drop(self, ln: _Link | None, reason: str) -> None:
        self.dropped[reason] += 1
        if ln is not None:
            ln.dropped[reason] += 1

    def receive(self, port: str, packet: bytes | memoryview, now: float) -> None:
        """An IPv4 packet that ``port``'s site sent out of ``port``, at time ``now``."""
        src = self.ports[port]
        size = len(packet)
        src.rx_packets += 1
        src.rx_bytes += size
        if size < 20 or packet[0] >> 4 != 4:
            self._drop(None, "not_ipv4")
            return
        dkey = bytes(packet[16:20])
        route = src.routes.get(dkey)
        if route is None:
            dst = self.by_addr.get(dkey)
            if dst is None:
                self._drop(None, "no_route")
                return
            route = src.routes[dkey] = (self.link(src.site, dst.site), dst)
        ln, dst = route
        if not src.up or not dst.up:
            self._drop(ln, "port_down")
            return
        p = ln.params
        if p.cut:
            self._drop(ln, "cut")
            return
        if p.loss and self.rng.random() < p.loss:
            self._drop(ln, "loss")
            return
        start = ln.busy_until if ln.busy_until > now else now
        if p.rate:
            if (start - now) * p.rate + size > p.queue_bytes:
                self._drop(ln, "queue_full")
                return
            done = start + size / p.rate
        else:
            done = start
        if self.held_bytes + size > self.max_held:
            self._drop(ln, "held_full")
            return
        ln.busy_until = done
        at = done + p.delay
        if p.jitter:
            at += self.rng.uniform(-min(p.jitter, p.delay), p.jitter)
        if at < ln.last_deliver:
            at = ln.last_deliver
        ln.last_deliver = at
        if isinstance(packet, memoryview):
            packet = packet.tobytes()
        ln.times.append(at)
        ln.items.append((dst.name, packet))
        ln.held_bytes += size
        self.held_bytes += size
        self.held_packets += 1
        if not ln.in_heap:
            ln.in_heap = True
            heapq.heappush(self.heap, (at, next(self.seq), ln))

    def due(self, now: float) -> list[tuple[str, bytes]]:
        """Packets whose time has come, as (destination port, packet), FIFO per link."""
        out: list[tuple[str, bytes]] = []
        heap = self.heap
        ports = self.ports
        while heap and heap[0][0] <= now:
            _, _, ln = heapq.heappop(heap)
            times, items = ln.times, ln.items
            n = 0
            nbytes = 0
            while times and times[0] <= now:
                times.popleft()
                item = items.popleft()
                size = len(item[1])
                nbytes += size
                n += 1
                dst = ports[item[0]]
                if dst.up:
                    out.append(item)
                    dst.tx_packets += 1
                    dst.tx_bytes += size
                    ln.forwarded += 1
                    ln.bytes += size
                else:  # went down while the packet was on the wire
                    self._drop(ln, "port_down")
            if n:
                ln.held_bytes -= nbytes
                self.held_bytes -= nbytes
                self.held_packets -= n
            if times:
                heapq.heappush(heap, (times[0], next(self.seq), ln))
            else:
                ln.in_heap = False
        self.forwarded += len(out)
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`due` next has something (possibly earlier: then it returns nothing)."""
        return self.heap[0][0] if self.heap else None

    # -- status -----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        links = []
        for a in self.sites:
            for b in self.sites:
                if a == b:
                    continue
                ln = self.link(a, b)
                links.append({"src": a, "dst": b, **ln.params.as_dict(),
                              "forwarded": ln.forwarded, "bytes": ln.bytes,
                              "queued": len(ln.items), "queued_bytes": ln.held_bytes,
                              "dropped": {k: v for k, v in ln.dropped.items() if v}})
        total_bytes = sum(ln.bytes for ln in self.links.values())
        return {
            "ports": {p.name: {"site": p.site, "address": p.address, "up": p.up,
                               "rx_packets": p.rx_packets, "rx_bytes": p.rx_bytes,
                               "tx_packets": p.tx_packets, "tx_bytes": p.tx_bytes}
                      for p in self.ports.values()},
            "links": links,
            "counters": {"forwarded": self.forwarded, "bytes": total_bytes,
                         "dropped": dict(self.dropped),
                         "queued": self.held_packets, "queued_bytes": self.held_bytes},
        }
