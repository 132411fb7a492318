"""The WAN emulator as a real process between real network namespaces (issue 10).

Each test creates its own namespaces (names from its tmp folder), starts
``steelfusion wan run`` and runs small Python agents inside the namespaces:
a TCP echo / UDP printing server, and clients that connect, echo, send.
Needs root (namespaces, /dev/net/tun); as root the tests must run.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from steelfusion import control, netns
from tests.nodes import SPAWNED, wait_for

pytestmark = pytest.mark.lab  # the emulator process, namespaces

SITES = {"branch": ["10.99.0.1"], "dc-a": ["10.99.1.1", "10.99.1.2"], "dc-b": ["10.99.2.1"]}
PORT = 5000

AGENT = r'''
import json, socket, sys, threading, time

def serve(port):
    tcp = socket.socket()
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", port))
    tcp.listen(64)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", port))

    def echo(c):
        with c:
            while d := c.recv(65536):
                c.sendall(d)

    def accept():
        while True:
            c, _ = tcp.accept()
            threading.Thread(target=echo, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    print("ready", flush=True)
    while True:
        data, src = udp.recvfrom(65536)
        print("udp", src[0], data.decode(), flush=True)

def connect(dst, port, timeout, src=None):
    t0 = time.monotonic()
    try:
        c = socket.create_connection((dst, port), timeout=timeout,
                                     source_address=(src, 0) if src else None)
        t1 = time.monotonic()
        c.sendall(b"x")
        if c.recv(1) != b"x":
            raise OSError("bad echo")
        t2 = time.monotonic()
        print(json.dumps({"ok": True, "connect": t1 - t0, "rtt": t2 - t1,
                          "local": c.getsockname()[0]}))
    except OSError as e:
        print(json.dumps({"ok": False, "error": type(e).__name__ + ": " + str(e)}))

def session(dst, port):
    c = socket.create_connection((dst, port), timeout=5)
    sent = got = 0
    print(json.dumps({"ok": True}), flush=True)
    for line in sys.stdin:
        limit = time.monotonic() + float(line.split()[1])
        c.sendall(b"x")
        sent += 1
        while got < sent and time.monotonic() < limit:
            c.settimeout(max(0.01, limit - time.monotonic()))
            try:
                got += len(c.recv(65536))
            except TimeoutError:
                pass
        print(json.dumps({"ok": got == sent}), flush=True)

def udp(dst, port, msg):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(msg.encode(), (dst, port))

cmd, *args = sys.argv[1:]
if cmd == "serve":
    serve(int(args[0]))
elif cmd == "connect":
    connect(args[0], int(args[1]), float(args[2]), *args[3:])
elif cmd == "session":
    session(args[0], int(args[1]))
elif cmd == "udp":
    udp(args[0], int(args[1]), args[2])
'''


def _need_root() -> None:
    why = netns.available()
    if why is not None:
        if os.geteuid() != 0:
            pytest.skip(why)
        pytest.fail(f"running as root but {why}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _devices(ns: str) -> list[str]:
    with netns.in_netns(ns):
        return sorted(n for _, n in socket.if_nameindex() if n.startswith("wan"))


class WanLab:
    """Namespaces, the emulator process, and agents started inside the namespaces."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.labid = netns.labid_for(tmp)
        self.prefix = netns.lab_prefix(self.labid)
        self.control = ("127.0.0.1", _free_port())
        self.agent = tmp / "agent.py"
        self.agent.write_text(AGENT)
        self.config = tmp / "wan.json"
        self.log = tmp / "wan.log"
        self.procs: list[subprocess.Popen[str]] = []
        self.emu: subprocess.Popen[str] | None = None
        for site in SITES:
            netns.create(self.ns(site))

    def ns(self, site: str) -> str:
        return netns.ns_name(self.labid, site)

    def write_config(self, **extra: Any) -> Path:
        cfg = {"name": "wan", "control": f"{self.control[0]}:{self.control[1]}",
               "log_file": str(self.log), "mtu": 9000,
               "sites": {s: {"netns": self.ns(s), "ports": p} for s, p in SITES.items()},
               **extra}
        self.config.write_text(json.dumps(cfg))
        return self.config

    def start(self, **extra: Any) -> subprocess.Popen[str]:
        self.write_config(**extra)
        self.emu = subprocess.Popen(
            [sys.executable, "-m", "steelfusion.cli", "wan", "run", "--quiet",
             "--config", str(self.config)], text=True)
        SPAWNED.append(self.emu.pid)
        emu = self.emu
        wait_for(lambda: emu.poll() is not None or self.status(), 30, "the WAN emulator")
        assert emu.poll() is None, "the WAN emulator exited at start"
        return emu

    def ctl(self, cmd: str, **args: Any) -> dict[str, Any]:
        reply = control.call(self.control, cmd, **args)
        assert reply["ok"], reply
        return reply

    def status(self) -> dict[str, Any]:
        return self.ctl("status")

    def link(self, src: str, dst: str) -> dict[str, Any]:
        return next(ln for ln in self.status()["links"] if (ln["src"], ln["dst"]) == (src, dst))

    def popen(self, site: str, *args: str, stdin: bool = False) -> subprocess.Popen[str]:
        p = subprocess.Popen([sys.executable, str(self.agent), *args], text=True,
                             stdout=subprocess.PIPE, bufsize=1,
                             stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                             preexec_fn=netns.preexec(self.ns(site)))
        self.procs.append(p)
        SPAWNED.append(p.pid)
        return p

    def server(self, site: str) -> subprocess.Popen[str]:
        p = self.popen(site, "serve", str(PORT))
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        return p

    def connect(self, site: str, dst: str, timeout: float = 5.0,
                src: str | None = None) -> dict[str, Any]:
        args = [sys.executable, str(self.agent), "connect", dst, str(PORT), str(timeout)]
        out = subprocess.run([*args, *([src] if src else [])], text=True, capture_output=True,
                             timeout=timeout + 30, preexec_fn=netns.preexec(self.ns(site)))
        assert out.returncode == 0, out.stderr
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def close(self) -> None:
        for p in [*self.procs, *([self.emu] if self.emu else [])]:
            if p.poll() is None:
                p.kill()
            p.wait()
        netns.remove_all(self.prefix)


def _lines(p: subprocess.Popen[str], until: float) -> Iterator[str]:
    """Lines of ``p``'s stdout until the deadline (monotonic)."""
    assert p.stdout is not None
    while (left := until - time.monotonic()) > 0:
        r, _, _ = select.select([p.stdout], [], [], left)
        if r:
            line = p.stdout.readline()
            if not line:
                return
            yield line.strip()


def _ask(p: subprocess.Popen[str], line: str, timeout: float = 30) -> dict[str, Any]:
    assert p.stdin is not None
    p.stdin.write(line + "\n")
    p.stdin.flush()
    for out in _lines(p, time.monotonic() + timeout):
        result: dict[str, Any] = json.loads(out)
        return result
    raise AssertionError(f"no answer to {line!r}")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[WanLab]:
    _need_root()
    w = WanLab(tmp_path)
    try:
        yield w
    finally:
        w.close()
    assert netns.listing(w.prefix) == []


def test_traffic_flows_through_both_ports_and_status_counts_it(lab: WanLab) -> None:
    lab.start()
    lab.server("dc-a")
    for dst in SITES["dc-a"]:
        r = lab.connect("branch", dst)
        assert r["ok"], r
    # a socket bound to the second address leaves through the second interface
    lab.server("branch")
    r = lab.connect("dc-a", "10.99.0.1", src="10.99.1.2")
    assert r["ok"] and r["local"] == "10.99.1.2", r
    st = lab.status()
    assert {p: (i["netns"], i["ifname"]) for p, i in st["ports"].items()} == {
        "branch/0": (lab.ns("branch"), "wan0"), "dc-a/0": (lab.ns("dc-a"), "wan0"),
        "dc-a/1": (lab.ns("dc-a"), "wan1"), "dc-b/0": (lab.ns("dc-b"), "wan0")}
    assert st["ports"]["dc-a/1"]["rx_packets"] > 0 and st["ports"]["dc-a/1"]["tx_packets"] > 0
    assert st["counters"]["forwarded"] > 0
    assert lab.link("branch", "dc-a")["forwarded"] > 0
    assert lab.link("dc-a", "branch")["forwarded"] > 0
    assert len(st["links"]) == 6
    assert _devices(lab.ns("dc-a")) == ["wan0", "wan1"]


def test_delay_makes_each_round_trip_at_least_twice_the_delay(lab: WanLab) -> None:
    lab.start(links=[{"a": "branch", "b": "dc-a", "delay": 0.05}])
    lab.server("dc-a")
    r = lab.connect("branch", "10.99.1.1")
    assert r["ok"], r
    assert r["connect"] >= 0.1 and r["rtt"] >= 0.1, r
    assert lab.link("dc-a", "branch")["delay"] == 0.05
    # changed at run time, one direction only
    reply = lab.ctl("link", a="branch", b="dc-b", delay=0.08, one_way=True)
    assert [(ln["src"], ln["dst"], ln["delay"]) for ln in reply["links"]] == [
        ("branch", "dc-b", 0.08)]
    lab.server("dc-b")
    r = lab.connect("branch", "10.99.2.1")
    assert r["ok"] and r["rtt"] >= 0.08, r
    assert lab.link("dc-b", "branch")["delay"] == 0.0


def test_cut_stalls_a_live_connection_and_new_ones_heal_restores_both(lab: WanLab) -> None:
    lab.start()
    lab.server("dc-b")
    s = lab.popen("dc-a", "session", "10.99.2.1", str(PORT), stdin=True)
    assert s.stdout is not None and json.loads(s.stdout.readline())["ok"]
    assert _ask(s, "echo 10")["ok"]
    lab.ctl("link", a="dc-a", b="dc-b", cut=True)
    assert lab.link("dc-a", "dc-b")["cut"] and lab.link("dc-b", "dc-a")["cut"]
    assert _ask(s, "echo 0.5") == {"ok": False}  # stalls
    r = lab.connect("dc-a", "10.99.2.1", timeout=1.0)
    assert not r["ok"] and "timed out" in r["error"], r
    assert lab.link("dc-a", "dc-b")["dropped"]["cut"] > 0
    lab.ctl("link", a="dc-a", b="dc-b", heal=True)
    assert not lab.link("dc-a", "dc-b")["cut"]
    # the same connection recovers by itself (TCP retransmits), nothing restarted
    wait_for(lambda: _ask(s, "echo 1")["ok"], 30, "the connection to recover after heal")
    assert lab.connect("dc-a", "10.99.2.1")["ok"]


def test_one_way_cut_drops_one_direction_only(lab: WanLab) -> None:
    lab.start()
    a = lab.server("dc-a")
    b = lab.server("branch")
    lab.ctl("link", a="branch", b="dc-a", cut=True, one_way=True)
    assert lab.link("branch", "dc-a")["cut"] and not lab.link("dc-a", "branch")["cut"]
    lab.popen("dc-a", "udp", "10.99.0.1", str(PORT), "from-dc-a").wait(10)
    assert next(_lines(b, time.monotonic() + 10)) == "udp 10.99.1.1 from-dc-a"
    lab.popen("branch", "udp", "10.99.1.1", str(PORT), "from-branch").wait(10)
    wait_for(lambda: lab.link("branch", "dc-a")["dropped"].get("cut"), 10, "the cut drop")
    assert list(_lines(a, time.monotonic() + 0.5)) == []
    r = lab.connect("branch", "10.99.1.1", timeout=1.0)  # TCP needs both directions
    assert not r["ok"], r
    lab.ctl("link", a="branch", b="dc-a", cut=False, one_way=True)
    lab.popen("branch", "udp", "10.99.1.1", str(PORT), "again").wait(10)
    assert next(_lines(a, time.monotonic() + 10)) == "udp 10.99.0.1 again"


def test_port_down_stops_the_second_address_only(lab: WanLab) -> None:
    lab.start()
    lab.server("dc-a")
    assert lab.ctl("port", port="dc-a/1", up=False) == {"ok": True, "port": "dc-a/1",
                                                         "up": False}
    assert lab.status()["ports"]["dc-a/1"]["up"] is False
    r = lab.connect("branch", "10.99.1.2", timeout=1.0)
    assert not r["ok"], r
    assert lab.connect("branch", "10.99.1.1")["ok"]
    assert lab.status()["counters"]["dropped"]["port_down"] > 0
    lab.ctl("port", port="dc-a/1", up=True)
    assert lab.connect("branch", "10.99.1.2")["ok"]


def test_bad_control_requests_get_one_line_errors(lab: WanLab) -> None:
    lab.start()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"a": "branch", "b": "dc-c"}, "unknown site 'dc-c'"),
        ({"a": "branch", "b": "branch"}, "two different sites"),
        ({"a": "branch", "b": "dc-a", "delay": -1}, "delay must be"),
        ({"a": "branch", "b": "dc-a", "loss": 2}, "loss must be"),
        ({"a": "branch", "b": "dc-a", "dealy": 0.1}, "did you mean 'delay'"),
        ({"a": "branch", "b": "dc-a", "cut": "yes"}, "cut must be"),
        ({"a": "branch", "b": "dc-a", "one_way": 1}, "one_way must be"),
        ({"a": "branch", "b": "dc-a", "queue_bytes": 0}, "queue_bytes must be"),
        ({"b": "dc-a"}, "a: unknown site None"),
    ]
    for args, expect in cases:
        reply = control.call(lab.control, "link", **args)
        assert not reply["ok"] and expect in reply["error"], (args, reply)
    reply = control.call(lab.control, "port", port="dc-a/9", up=False)
    assert not reply["ok"] and "unknown port 'dc-a/9'" in reply["error"]
    reply = control.call(lab.control, "port", port="dc-a/1", up="no")
    assert not reply["ok"] and "up must be" in reply["error"]
    # nothing was half-applied
    assert all(ln["delay"] == 0 and not ln["cut"] for ln in lab.status()["links"])


def test_stop_and_sigkill_remove_the_devices_and_a_restart_works(lab: WanLab) -> None:
    emu = lab.start()
    assert lab.ctl("stop")["stopping"]
    assert emu.wait(10) == 0
    assert all(_devices(lab.ns(s)) == [] for s in SITES)
    emu = lab.start()
    lab.server("dc-a")
    assert lab.connect("branch", "10.99.1.2")["ok"]
    emu.send_signal(signal.SIGKILL)
    emu.wait(10)
    wait_for(lambda: all(_devices(lab.ns(s)) == [] for s in SITES), 10, "the TUNs to vanish")
    # a new emulator in the same namespaces (policy rules left behind are reused)
    lab.start()
    assert lab.connect("branch", "10.99.1.2")["ok"]
    assert lab.connect("branch", "10.99.1.1")["ok"]


def _run_cli(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "steelfusion.cli", "wan", "run", "--quiet",
                           "--config", str(config)], text=True, capture_output=True, timeout=60)


def test_start_errors_are_one_line_and_leave_nothing(lab: WanLab) -> None:
    cfg = lab.write_config()
    data = json.loads(cfg.read_text())
    # a missing namespace
    bad = dict(data, sites={**data["sites"], "dc-b": {"netns": lab.prefix + "nope",
                                                      "ports": ["10.99.2.1"]}})
    cfg.write_text(json.dumps(bad))
    out = _run_cli(cfg)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"network namespace {lab.prefix}nope does not exist" in out.stderr
    assert "sites.dc-b.netns" in out.stderr
    assert all(_devices(lab.ns(s)) == [] for s in ("branch", "dc-a"))
    # a second emulator for the same lab
    lab.start()
    cfg2 = lab.tmp / "wan2.json"
    cfg2.write_text(json.dumps(dict(data, control=f"127.0.0.1:{_free_port()}")))
    out = _run_cli(cfg2)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "in use" in out.stderr and "another WAN emulator" in out.stderr, out.stderr
    lab.server("dc-a")
    assert lab.connect("branch", "10.99.1.1")["ok"]  # the first one is untouched
    # its control port taken (by the first emulator)
    lab.ctl("stop")
    assert lab.emu is not None and lab.emu.wait(10) == 0
    with socket.socket() as busy:
        busy.bind(lab.control)
        busy.listen()
        cfg.write_text(json.dumps(data))
        out = _run_cli(cfg)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"cannot listen on 127.0.0.1:{lab.control[1]} (control" in out.stderr, out.stderr
    assert all(_devices(lab.ns(s)) == [] for s in SITES)


@pytest.mark.parametrize("change, expect", [
    ({"sites": {}}, "sites: required"),
    ({"control": "nowhere"}, "control: address 'nowhere' needs a port"),
    ({"mtu": 100}, "mtu: must be a whole number from 576"),
    ({"sites": {"a": {"netns": "x", "ports": ["10.99.0.1", "10.99.0.1"]}}},
     "10.99.0.1 is also a/0"),
    ({"sites": {"a": {"netns": "x", "ports": ["192.168.1.1"]}}}, "outside prefix"),
    ({"sites": {"a": {"netns": "x", "ports": ["10.99.0.300"]}}}, "not an IPv4 address"),
    ({"sites": {"a": {"netns": "x", "portz": []}}}, "did you mean 'ports'"),
    ({"links": [{"a": "branch", "b": "mars"}]}, "links[0].b: unknown site 'mars'"),
    ({"links": [{"a": "branch", "b": "dc-a", "loss": 3}]}, "loss must be between 0 and 1"),
    ({"delay": 1}, "unknown key 'delay' in the config"),
    ({"sites": {"a": {"netns": "x", "ports": ["10.99.0.1"]},
                "b": {"netns": "x", "ports": ["10.99.1.1"]}}}, "x is also site a's namespace"),
    ({"links": [{"a": "branch", "b": "dc-a", "one_way": "yes"}]}, "one_way: must be true"),
    ({"links": [{"a": "branch", "b": "branch"}]}, "two different sites"),
    ({"control": "127.0.0.1:99999"}, "port out of range"),
    ({"log_file": "/proc/nope/wan.log"}, "(log_file in "),
])
def test_bad_config_is_one_line(tmp_path: Path, change: dict[str, Any], expect: str) -> None:
    cfg = {"control": "127.0.0.1:1", "sites": {s: {"netns": f"sfx-{s}", "ports": p}
                                               for s, p in SITES.items()}, **change}
    path = tmp_path / "wan.json"
    path.write_text(json.dumps(cfg))
    out = _run_cli(path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert expect in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
