"""The sans-IO WAN (steelfusion/wan.py): packets and virtual time in, packets out."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from steelfusion.wan import LinkParams, Wan

BRANCH, DCA, DCA2, DCB = "10.99.0.1", "10.99.1.1", "10.99.1.2", "10.99.2.1"


def ipv4(src: str, dst: str, payload: bytes = b"", size: int | None = None,
         tag: int = 0) -> bytes:
    """A minimal IPv4/UDP-ish packet; ``tag`` goes in the identification field."""
    if size is not None:
        payload = payload + bytes(max(0, size - 20 - len(payload)))
    total = 20 + len(payload)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, tag & 0xFFFF, 0, 64, 17, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return hdr + payload


def tag_of(pkt: bytes) -> int:
    return int(struct.unpack_from("!H", pkt, 4)[0])


def make(seed: int = 0) -> Wan:
    w = Wan(seed=seed)
    w.add_port("branch/0", "branch", BRANCH)
    w.add_port("dc-a/0", "dc-a", DCA)
    w.add_port("dc-a/1", "dc-a", DCA2)
    w.add_port("dc-b/0", "dc-b", DCB)
    return w


def run_until_empty(w: Wan, start: float = 0.0) -> list[tuple[float, str, bytes]]:
    """Drain the WAN by jumping from deadline to deadline; (time, port, packet) out."""
    out: list[tuple[float, str, bytes]] = []
    now = start
    for _ in range(1_000_000):
        d = w.next_deadline()
        if d is None:
            return out
        now = max(now, d)
        out.extend((now, port, pkt) for port, pkt in w.due(now))
    raise AssertionError("the WAN never emptied")


def test_default_link_forwards_at_once_to_the_destination_port() -> None:
    w = make()
    p = ipv4(BRANCH, DCA2, b"hello")
    w.receive("branch/0", p, 5.0)
    assert w.next_deadline() == 5.0
    assert w.due(5.0) == [("dc-a/1", p)]
    assert w.next_deadline() is None
    st = w.status()
    assert st["counters"]["forwarded"] == 1
    assert st["counters"]["bytes"] == len(p)
    assert st["ports"]["dc-a/1"]["tx_packets"] == 1
    assert st["ports"]["branch/0"]["rx_bytes"] == len(p)


def test_memoryview_packets_are_copied() -> None:
    w = make()
    buf = bytearray(ipv4(BRANCH, DCA, b"abc"))
    w.receive("branch/0", memoryview(buf), 0.0)
    buf[-1] = ord("z")
    [(port, pkt)] = w.due(0.0)
    assert port == "dc-a/0" and pkt.endswith(b"abc")


def test_delay_holds_each_packet_for_the_link_delay() -> None:
    w = make()
    w.set_link("branch", "dc-a", LinkParams(delay=0.05))
    w.receive("branch/0", ipv4(BRANCH, DCA, tag=1), 1.0)
    w.receive("branch/0", ipv4(BRANCH, DCA, tag=2), 1.01)
    assert w.due(1.0499) == []
    assert w.next_deadline() == pytest.approx(1.05)
    assert [tag_of(p) for _, p in w.due(1.05)] == [1]
    assert [tag_of(p) for _, p in w.due(1.06)] == [2]
    # the other direction was not set: no delay
    w.receive("dc-a/0", ipv4(DCA, BRANCH, tag=3), 2.0)
    assert [(port, tag_of(p)) for port, p in w.due(2.0)] == [("branch/0", 3)]


def test_jitter_varies_the_delay_but_never_reorders() -> None:
    w = make(seed=7)
    w.set_link("branch", "dc-a", LinkParams(delay=0.03, jitter=0.01))
    for i in range(500):
        w.receive("branch/0", ipv4(BRANCH, DCA, tag=i), i * 0.001)
    out = run_until_empty(w)
    assert [tag_of(p) for _, _, p in out] == list(range(500))
    delays = [t - i * 0.001 for i, (t, _, _) in enumerate(out)]
    assert min(delays) >= 0.02 - 1e-9
    assert max(delays) <= 0.04 + 1e-9
    assert max(delays) - min(delays) > 0.01  # it did vary


def test_jitter_larger_than_the_delay_never_delivers_before_sent() -> None:
    w = make(seed=3)
    w.set_link("branch", "dc-a", LinkParams(delay=0.001, jitter=0.05))
    for i in range(200):
        w.receive("branch/0", ipv4(BRANCH, DCA, tag=i), 10.0 + i * 0.01)
    out = run_until_empty(w)
    assert all(t >= 10.0 + i * 0.01 for i, (t, _, _) in enumerate(out))


def test_rate_a_megabyte_burst_at_one_megabyte_per_second_takes_a_second() -> None:
    w = make()
    w.set_link("branch", "dc-a", LinkParams(rate=1_000_000))
    for i in range(1000):
        w.receive("branch/0", ipv4(BRANCH, DCA, size=1000, tag=i), 0.0)
    out = run_until_empty(w)
    assert len(out) == 1000
    assert out[0][0] == pytest.approx(0.001)
    assert out[-1][0] == pytest.approx(1.0)
    assert [tag_of(p) for _, _, p in out] == list(range(1000))


def test_rate_and_delay_add_up_and_an_idle_link_starts_fresh() -> None:
    w = make()
    w.set_link("dc-a", "dc-b", LinkParams(rate=10_000, delay=0.1))
    w.receive("dc-a/0", ipv4(DCA, DCB, size=1000), 0.0)
    w.receive("dc-a/1", ipv4(DCA2, DCB, size=1000), 0.0)  # same link, other port
    w.receive("dc-a/0", ipv4(DCA, DCB, size=1000), 5.0)  # link idle again
    times = [t for t, _, _ in run_until_empty(w)]
    assert times == pytest.approx([0.2, 0.3, 5.2])


def test_queue_full_drops_past_the_bottleneck_buffer() -> None:
    w = make()
    w.set_link("branch", "dc-a", LinkParams(rate=1000, queue_bytes=3000))
    for i in range(5):
        w.receive("branch/0", ipv4(BRANCH, DCA, size=1000, tag=i), 0.0)
    out = run_until_empty(w)
    assert [tag_of(p) for _, _, p in out] == [0, 1, 2]
    st = w.status()
    assert st["counters"]["dropped"]["queue_full"] == 2
    ab = next(ln for ln in st["links"] if ln["src"] == "branch" and ln["dst"] == "dc-a")
    assert ab["dropped"] == {"queue_full": 2}
    # the buffer drains with time: later packets get in again
    w.receive("branch/0", ipv4(BRANCH, DCA, size=1000, tag=9), 10.0)
    assert [tag_of(p) for _, _, p in run_until_empty(w, 10.0)] == [9]


def test_held_bytes_are_capped_for_the_whole_emulator() -> None:
    w = Wan(max_held=2500)
    w.add_port("a/0", "a", BRANCH)
    w.add_port("b/0", "b", DCA)
    w.set_link("a", "b", LinkParams(delay=1.0))
    for i in range(4):
        w.receive("a/0", ipv4(BRANCH, DCA, size=1000, tag=i), 0.0)
    assert w.status()["counters"]["queued_bytes"] == 2000
    assert w.status()["counters"]["dropped"]["held_full"] == 2
    assert len(run_until_empty(w)) == 2
    assert w.status()["counters"]["queued_bytes"] == 0


def test_loss_is_seeded_and_deterministic() -> None:
    def survivors(seed: int) -> list[int]:
        w = make(seed=seed)
        w.set_link("branch", "dc-a", LinkParams(loss=0.3))
        for i in range(1000):
            w.receive("branch/0", ipv4(BRANCH, DCA, tag=i), i * 0.001)
        return [tag_of(p) for _, _, p in run_until_empty(w)]

    a, b, c = survivors(1), survivors(1), survivors(2)
    assert a == b
    assert a != c
    assert 600 < len(a) < 800
    w = make()
    w.set_link("branch", "dc-a", LinkParams(loss=1.0))
    w.receive("branch/0", ipv4(BRANCH, DCA), 0.0)
    assert run_until_empty(w) == []
    assert w.status()["counters"]["dropped"]["loss"] == 1


def test_cut_drops_new_packets_and_those_on_the_wire_heal_restores() -> None:
    w = make()
    w.set_link("dc-a", "dc-b", LinkParams(delay=0.5))
    w.receive("dc-a/0", ipv4(DCA, DCB, tag=1), 0.0)
    w.set_link("dc-a", "dc-b", LinkParams(delay=0.5, cut=True))
    w.receive("dc-a/0", ipv4(DCA, DCB, tag=2), 0.1)
    assert run_until_empty(w) == []
    assert w.status()["counters"]["dropped"]["cut"] == 2
    assert w.status()["counters"]["queued"] == 0
    w.set_link("dc-a", "dc-b", LinkParams())  # heal
    w.receive("dc-a/0", ipv4(DCA, DCB, tag=3), 1.0)
    assert [tag_of(p) for _, p in w.due(1.0)] == [3]


def test_a_cut_and_refilled_link_keeps_fifo_and_its_deadline() -> None:
    w = make()
    w.set_link("dc-a", "dc-b", LinkParams(delay=0.5))
    w.receive("dc-a/0", ipv4(DCA, DCB, tag=1), 0.0)
    w.set_link("dc-a", "dc-b", LinkParams(cut=True))
    w.set_link("dc-a", "dc-b", LinkParams(delay=0.2))
    w.receive("dc-a/0", ipv4(DCA, DCB, tag=2), 0.4)
    w.receive("dc-a/0", ipv4(DCA, DCB, tag=3), 0.41)
    out = run_until_empty(w)
    assert [(round(t, 6), tag_of(p)) for t, _, p in out] == [(0.6, 2), (0.61, 3)]


def test_one_way_cut_drops_one_direction_only() -> None:
    w = make()
    w.set_link("branch", "dc-a", LinkParams(cut=True))
    w.receive("branch/0", ipv4(BRANCH, DCA, tag=1), 0.0)
    w.receive("dc-a/0", ipv4(DCA, BRANCH, tag=2), 0.0)
    assert [(port, tag_of(p)) for port, p in w.due(0.0)] == [("branch/0", 2)]
    st = w.status()
    cut = {(ln["src"], ln["dst"]): ln["cut"] for ln in st["links"]}
    assert cut[("branch", "dc-a")] is True
    assert cut[("dc-a", "branch")] is False


def test_port_down_drops_both_directions_of_that_port_only() -> None:
    w = make()
    w.set_port("dc-a/1", up=False)
    w.receive("branch/0", ipv4(BRANCH, DCA2, tag=1), 0.0)  # to the down port
    w.receive("dc-a/1", ipv4(DCA2, BRANCH, tag=2), 0.0)  # from it
    w.receive("branch/0", ipv4(BRANCH, DCA, tag=3), 0.0)  # the other port still works
    assert [(port, tag_of(p)) for port, p in w.due(0.0)] == [("dc-a/0", 3)]
    assert w.status()["counters"]["dropped"]["port_down"] == 2
    assert w.status()["ports"]["dc-a/1"]["up"] is False
    w.set_port("dc-a/1", up=True)
    w.receive("branch/0", ipv4(BRANCH, DCA2, tag=4), 1.0)
    assert [(port, tag_of(p)) for port, p in w.due(1.0)] == [("dc-a/1", 4)]


def test_a_port_going_down_loses_what_is_on_the_wire_to_it() -> None:
    w = make()
    w.set_link("branch", "dc-a", LinkParams(delay=0.1))
    w.receive("branch/0", ipv4(BRANCH, DCA2, tag=1), 0.0)
    w.set_port("dc-a/1", up=False)
    assert run_until_empty(w) == []
    st = w.status()
    assert st["counters"]["dropped"]["port_down"] == 1
    assert st["counters"]["queued"] == 0


def test_unknown_destination_and_non_ipv4_are_dropped_and_counted() -> None:
    w = make()
    w.receive("branch/0", ipv4(BRANCH, "10.99.9.9"), 0.0)
    w.receive("branch/0", ipv4(BRANCH, "127.0.0.1"), 0.0)
    w.receive("branch/0", bytes([0x60]) + bytes(47), 0.0)  # IPv6
    w.receive("branch/0", b"\x45\x00", 0.0)  # truncated
    assert w.due(0.0) == []
    assert w.next_deadline() is None
    d = w.status()["counters"]["dropped"]
    assert d["no_route"] == 2
    assert d["not_ipv4"] == 2


def test_counters_per_link_and_totals() -> None:
    w = make()
    w.set_link("branch", "dc-a", LinkParams(delay=0.01))
    for i in range(3):
        w.receive("branch/0", ipv4(BRANCH, DCA, size=100, tag=i), 0.0)
    w.receive("dc-a/0", ipv4(DCA, DCB, size=200), 0.0)
    st = w.status()
    assert st["counters"]["queued"] == 4 and st["counters"]["queued_bytes"] == 500
    run_until_empty(w)
    st = w.status()
    links = {(ln["src"], ln["dst"]): ln for ln in st["links"]}
    assert len(links) == 6  # every ordered pair of the three sites
    assert links[("branch", "dc-a")]["forwarded"] == 3
    assert links[("branch", "dc-a")]["bytes"] == 300
    assert links[("branch", "dc-a")]["delay"] == 0.01
    assert links[("dc-a", "dc-b")]["bytes"] == 200
    assert links[("dc-b", "dc-a")]["forwarded"] == 0
    assert st["counters"] == {"forwarded": 4, "bytes": 500, "queued": 0, "queued_bytes": 0,
                              "dropped": dict.fromkeys(st["counters"]["dropped"], 0)}


@pytest.mark.parametrize("bad", [
    {"delay": -1}, {"jitter": float("nan")}, {"rate": float("inf")}, {"loss": 1.5},
    {"loss": -0.1}, {"cut": "yes"}, {"queue_bytes": 0}, {"delay": "30ms"},
])
def test_bad_link_params_are_refused_naming_the_field(bad: dict[str, object]) -> None:
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        LinkParams(**bad)  # type: ignore[arg-type]


def test_unknown_site_port_and_duplicate_address_are_refused() -> None:
    w = make()
    with pytest.raises(ValueError, match="unknown site 'dc-c'"):
        w.set_link("dc-a", "dc-c", LinkParams())
    with pytest.raises(ValueError, match="unknown port 'dc-a/7'"):
        w.set_port("dc-a/7", up=False)
    with pytest.raises(ValueError, match="already"):
        w.add_port("dc-b/1", "dc-b", DCA)
    with pytest.raises(ValueError, match="already exists"):
        w.add_port("dc-b/0", "dc-b", "10.99.2.9")
