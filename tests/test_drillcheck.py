"""The drill's payloads, checker and report (steelfusion/drillpayload.py, drillcheck.py,
drillreport.py; issue 10 item 3).

Hand-built histories and images, no processes: every check is shown to pass a history that
is fine and to report the fault it exists for (a checker that cannot fail proves nothing)."""

from __future__ import annotations

import json
import random
import struct
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steelfusion.drillcheck import Copy, History, Result, check, ranges
from steelfusion.drillpayload import (
    BAD,
    BLOCK,
    FOREIGN,
    GARBAGE,
    TORN,
    VALID,
    ZERO,
    identify,
    payload,
    payloads,
    scan,
)
from steelfusion.drillreport import from_json, render_html, render_text, to_json
from steelfusion.wire import crc32c

SEED = 1234
NBLOCKS = 32


class Drill:
    """A hand-driven drill: writes go into the history and, if they land, into the images
    of every copy (the Edge's read-back and two Cores)."""

    def __init__(self, luns: tuple[int, ...] = (0,), nblocks: int = NBLOCKS) -> None:
        self.h = History()
        self.t = 100.0
        self.next_id = 1
        self.images: dict[str, dict[int, bytearray]] = {
            name: {lun: bytearray(nblocks * BLOCK) for lun in luns}
            for name in ("edge", "core-a", "core-b")}

    def tick(self, dt: float = 0.01) -> float:
        self.t += dt
        return self.t

    def land(self, wid: int, lun: int, first: int, n: int, copies: tuple[str, ...] | None = None
             ) -> None:
        data = payloads(SEED, wid, lun, first, n)
        for name in copies or tuple(self.images):
            self.images[name][lun][first * BLOCK:(first + n) * BLOCK] = data

    def write(self, lun: int, first: int, n: int = 1, outcome: str | None = "ok",
              land: bool = True) -> int:
        """A serial write: started, landed (or not), answered."""
        wid = self.next_id
        self.next_id += 1
        self.h.write_started(wid, lun, first, n, self.tick())
        if land:
            self.land(wid, lun, first, n)
        if outcome is not None:
            self.h.write_ended(wid, self.tick(), outcome)
        return wid

    def put(self, copy: str, lun: int, block: int, data: bytes) -> None:
        self.images[copy][lun][block * BLOCK:(block + 1) * BLOCK] = data

    def copies(self) -> list[Copy]:
        return [Copy(name, "edge" if name == "edge" else "core",
                     {lun: bytes(img) for lun, img in luns.items()})
                for name, luns in self.images.items()]

    def check(self, replay: str = "steelfusion drill --seed 1234") -> Result:
        return check(self.h, self.copies(), SEED, replay=replay)


def kinds(r: Result) -> set[str]:
    return set(r.findings)


# --- payloads ---------------------------------------------------------------------------------

def test_every_block_names_its_write_and_a_torn_or_foreign_one_names_none() -> None:
    p = payload(SEED, 42, 3, 9)
    assert len(p) == BLOCK
    assert identify(SEED, p) == (42, 3, 9)
    assert identify(SEED, bytes(BLOCK)) == "zero"
    assert identify(SEED + 1, p) is None  # another run's data
    assert payloads(SEED, 42, 3, 8, 3)[BLOCK:2 * BLOCK] == p
    assert payload(SEED, 43, 3, 9) != p and payload(SEED, 42, 4, 9) != p
    # torn: the first half of one write, the second of another (headers intact)
    torn = p[:BLOCK // 2] + payload(SEED, 41, 3, 9)[BLOCK // 2:]
    assert identify(SEED, torn) is None
    for at in (0, 20, 33, 37, 100, BLOCK - 1):  # a bit flipped anywhere: header, CRC, body
        bad = bytearray(p)
        bad[at] ^= 0x10
        assert identify(SEED, bytes(bad)) is None, at
    # a body no write produced is caught even with a CRC that matches it
    forged = bytearray(p)
    forged[200] ^= 1
    struct.pack_into("<I", forged, 32, crc32c(bytes(forged[36:]), crc32c(bytes(forged[:32]))))
    assert identify(SEED, bytes(forged)) is None
    # whole-image scan agrees with identify block by block
    img = (bytes(BLOCK) + p + torn + payload(SEED, 7, 0, 1) + payload(SEED + 1, 7, 0, 4)
           + b"\xff" * BLOCK)
    s = scan(SEED, img)
    assert s.status.tolist() == [ZERO, VALID, BAD, VALID, BAD, BAD]
    assert s.why is not None and s.why.tolist() == [0, 0, TORN, 0, FOREIGN, GARBAGE]
    assert int(s.wid[2]) == 42  # a torn block keeps what its header claims, for debugging
    assert (int(s.wid[1]), int(s.lun[1]), int(s.block[1])) == (42, 3, 9)
    assert (int(s.wid[3]), int(s.lun[3]), int(s.block[3])) == (7, 0, 1)


def test_other_block_sizes_and_bad_sizes() -> None:
    p = payload(SEED, 5, 1, 2, size=512)
    assert len(p) == 512 and identify(SEED, p) == (5, 1, 2)
    with pytest.raises(ValueError, match="multiple of 8"):
        payload(SEED, 5, 1, 2, size=100)


# --- check 1: acknowledged writes lost, per copy --------------------------------------------

def test_a_clean_history_passes() -> None:
    d = Drill(luns=(0, 1))
    for i in range(20):
        d.write(i % 2, (i * 3) % (NBLOCKS - 4), 1 + i % 4)
    r = d.check()
    assert r.passed, render_text(r)
    assert r.rpo == 0 and not r.findings
    assert r.counts["writes"] == 20 and r.counts["writes_ok"] == 20
    assert r.per_copy["core-b"]["blocks_checked"] == 2 * NBLOCKS
    assert render_text(r).startswith("PASS")


def test_a_lost_acknowledged_write_is_reported_on_the_copy_that_lost_it() -> None:
    d = Drill()
    d.write(0, 0, 4)
    lost = d.write(0, 10, 3)
    d.put("core-b", 0, 11, bytes(BLOCK))  # core-b never got block 11 of it
    r = d.check()
    assert not r.passed and r.rpo == 1 and r.lost_write_ids == [lost]
    (f,) = r.findings["lost_write"]
    assert (f.copy, f.lun, f.write_id, f.blocks) == ("core-b", 0, lost, [[11, 11]])
    assert f.detail["found"] == "zeros"
    assert r.per_copy["core-b"]["lost_writes"] == 1
    assert r.per_copy["core-a"]["lost_writes"] == 0 and r.per_copy["edge"]["lost_writes"] == 0
    assert render_text(r).startswith("FAIL")
    # and once more on the Edge: still one acknowledged write lost (RPO counts writes)
    d.put("edge", 0, 12, bytes(BLOCK))
    r = d.check()
    assert r.rpo == 1 and {f.copy for f in r.findings["lost_write"]} == {"core-b", "edge"}
    assert [r.per_copy[c]["lost_writes"] for c in ("edge", "core-a", "core-b")] == [1, 0, 1]


def test_an_older_value_reappearing_after_a_newer_ack_is_lost() -> None:
    d = Drill()
    old = d.write(0, 5, 2)
    old_bytes = payload(SEED, old, 0, 6)
    new = d.write(0, 6, 1)
    d.put("core-a", 0, 6, old_bytes)  # core-a rolled back to the earlier write
    r = d.check()
    assert r.lost_write_ids == [new]
    (f,) = r.findings["lost_write"]
    assert (f.copy, f.write_id, f.blocks) == ("core-a", new, [[6, 6]])
    assert f.detail["found_write"] == old


def test_an_indeterminate_write_may_have_landed_or_not() -> None:
    for land in (True, False):
        d = Drill()
        before = d.write(0, 3)
        d.write(0, 3, outcome="indeterminate", land=land)
        d.write(0, 4, outcome=None, land=land)  # never answered at all
        r = d.check()
        assert r.passed, (land, render_text(r))
        assert r.counts["writes_indeterminate"] == 2
        found = identify(SEED, bytes(d.images["core-a"][0][3 * BLOCK:4 * BLOCK]))
        assert found == ((before + 1 if land else before), 0, 3)


def test_an_indeterminate_write_may_land_after_a_later_ack() -> None:
    """Its answer never came, so it may take effect any time after it started."""
    d = Drill()
    late = d.write(0, 3, outcome="indeterminate", land=False)
    d.write(0, 3)
    d.land(late, 0, 3, 1)
    assert d.check().passed


def test_a_failed_write_may_have_landed_but_not_after_its_error() -> None:
    d = Drill()
    d.write(0, 2)
    failed = d.write(0, 2, outcome="failed")
    assert d.check().passed
    d2 = Drill()
    d2.write(0, 2)
    failed = d2.write(0, 2, outcome="failed", land=False)
    assert d2.check().passed
    acked = d2.write(0, 2)
    d2.land(failed, 0, 2, 1, ("core-b",))  # the failed write landing after a later ack
    r = d2.check()
    assert r.lost_write_ids == [acked] and r.findings["lost_write"][0].copy == "core-b"


def test_concurrent_overlapping_writes_may_land_in_either_order() -> None:
    for winner in ("a", "b"):
        d = Drill()
        d.h.write_started(1, 0, 0, 4, 10.0)
        d.h.write_started(2, 0, 2, 4, 10.5)  # overlaps write 1 on blocks 2-3, in time too
        d.h.write_ended(1, 11.0, "ok")
        d.h.write_ended(2, 11.2, "ok")
        first, second = (2, 1) if winner == "a" else (1, 2)
        for wid in (first, second):
            d.land(wid, 0, *((0, 4) if wid == 1 else (2, 4)))
        r = d.check()
        assert r.passed, (winner, render_text(r))
        # a write that began after both ended must win
        d.h.write_started(3, 0, 3, 1, 12.0)
        d.h.write_ended(3, 12.1, "ok")
        r = d.check()
        assert r.lost_write_ids == [3] and r.findings["lost_write"][0].blocks == [[3, 3]]


def test_zeros_where_only_an_acked_write_could_be_are_a_loss_zeros_elsewhere_are_fine() -> None:
    d = Drill()
    d.write(0, 0)
    r = d.check()
    assert r.passed and r.per_copy["edge"]["blocks_checked"] == NBLOCKS
    d.put("edge", 0, 0, bytes(BLOCK))
    assert d.check().lost_write_ids == [1]
    # of two writes to the block, the one that should be visible is lost, not the overwritten
    d.write(0, 0)
    d.put("edge", 0, 0, bytes(BLOCK))
    assert d.check().lost_write_ids == [2]


def test_a_stale_value_loses_only_the_writes_that_began_after_it() -> None:
    """w [0, 5], a [6, 7], f [4, 10] on one block, w found: a is lost (it began after w
    ended); f is not (it may have landed before w)."""
    d = Drill()
    d.h.write_started(1, 0, 0, 1, 0.0)
    d.h.write_started(3, 0, 0, 1, 4.0)
    d.h.write_ended(1, 5.0, "ok")
    d.h.write_started(2, 0, 0, 1, 6.0)
    d.h.write_ended(2, 7.0, "ok")
    d.h.write_ended(3, 10.0, "ok")
    d.land(1, 0, 0, 1)
    r = d.check()
    assert r.lost_write_ids == [2] and r.findings["lost_write"][0].detail["found_write"] == 1
    d.land(3, 0, 0, 1)  # f last: fine, whatever a did
    assert d.check().passed


# --- check 2: values no write produced --------------------------------------------------------

def test_a_corrupt_block_is_reported_and_hides_the_write_that_was_there() -> None:
    d = Drill()
    wid = d.write(0, 8, 2)
    d.put("edge", 0, 20, b"\x01" * BLOCK)  # a block nobody wrote
    r = d.check()
    assert kinds(r) == {"corrupt"} and r.rpo == 0 and not r.passed
    (f,) = r.findings["corrupt"]
    assert (f.copy, f.lun, f.blocks) == ("edge", 0, [[20, 20]])
    torn = bytearray(payload(SEED, wid, 0, 9))
    torn[3000:] = bytes(BLOCK - 3000)  # a torn write over the acknowledged one
    d.put("core-b", 0, 9, bytes(torn))
    r = d.check()
    assert kinds(r) == {"corrupt", "lost_write", "cores_differ"} and r.lost_write_ids == [wid]
    assert "(block 9: a torn or corrupt block (its header names write 1," in " ".join(
        f.message for f in r.findings["corrupt"])
    assert {(f.copy, f.blocks[0][0]) for f in r.findings["corrupt"]} == {("edge", 20),
                                                                           ("core-b", 9)}


def test_a_block_from_another_lun_or_block_is_misplaced() -> None:
    d = Drill(luns=(0, 1))
    w0 = d.write(0, 4)
    w1 = d.write(1, 4)
    d.put("core-b", 1, 4, payload(SEED, w0, 0, 4))  # LUN 0's block on LUN 1
    d.put("core-a", 0, 5, payload(SEED, w0, 0, 4))  # block 4's data on block 5
    r = d.check()
    assert kinds(r) == {"misplaced", "lost_write", "cores_differ"}
    got = {(f.copy, f.lun, f.blocks[0][0], f.detail["found_lun"], f.detail["found_block"])
           for f in r.findings["misplaced"]}
    assert got == {("core-b", 1, 4, 0, 4), ("core-a", 0, 5, 0, 4)}
    assert r.lost_write_ids == [w1]  # LUN 1 block 4 lost its write on core-b


def test_a_write_the_history_does_not_have_there_is_a_phantom() -> None:
    d = Drill()
    w = d.write(0, 4)
    d.put("edge", 0, 7, payload(SEED, 999, 0, 7))  # no write 999
    w2 = d.write(0, 9)
    d.put("edge", 0, 9, payload(SEED, w2 + 500, 0, 9))  # no such write, though one covers 9
    for core in ("core-a", "core-b"):  # write w exists but never covered block 7
        d.put(core, 0, 7, payload(SEED, w, 0, 7))
    r = d.check()
    assert kinds(r) == {"phantom", "lost_write"} and r.lost_write_ids == [w2]
    assert {(f.copy, f.write_id) for f in r.findings["phantom"]} == {
        ("edge", 999), ("edge", w2 + 500), ("core-a", w), ("core-b", w)}


def test_short_and_missing_images() -> None:
    d = Drill()
    d.write(0, NBLOCKS - 1)
    copies = d.copies()
    copies[1] = Copy("core-a", "core", {0: bytes(d.images["core-a"][0][:-BLOCK])})
    copies[2] = Copy("core-b", "core", {})
    r = check(d.h, copies, SEED)
    assert kinds(r) == {"image_size", "missing_image", "lost_write"}
    assert r.findings["missing_image"][0].copy == "core-b"
    assert r.findings["lost_write"][0].copy == "core-a"


def test_images_can_be_files(tmp_path: Path) -> None:
    d = Drill()
    d.write(0, 1, 3)
    paths = {}
    for name in d.images:
        p = tmp_path / f"{name}.img"
        p.write_bytes(bytes(d.images[name][0]))
        paths[name] = p
    copies = [Copy(n, "edge" if n == "edge" else "core", {0: p}) for n, p in paths.items()]
    assert check(d.h, copies, SEED).passed
    data = bytearray(paths["core-b"].read_bytes())
    data[2 * BLOCK + 100] ^= 1
    paths["core-b"].write_bytes(bytes(data))
    r = check(d.h, copies, SEED)
    assert kinds(r) == {"corrupt", "lost_write", "cores_differ"}


# --- check 3: Cores that differ ---------------------------------------------------------------

def test_cores_that_differ_are_reported_as_compact_ranges() -> None:
    d = Drill()
    w = d.write(0, 0, 8, outcome="indeterminate", land=False)
    d.land(w, 0, 0, 8, ("core-a",))  # both histories are fine, but the Cores disagree
    d.land(w, 0, 2, 1, ("core-b",))
    r = d.check()
    assert kinds(r) == {"cores_differ"}
    (f,) = r.findings["cores_differ"]
    assert f.copy == "core-a|core-b" and f.blocks == [[0, 1], [3, 7]]
    assert "7 blocks (0-1,3-7)" in f.message
    assert ranges([5, 1, 2, 3, 9]) == [[1, 3], [5, 5], [9, 9]]


# --- checks 4, 5: split brain and epochs ------------------------------------------------------

def samples_handoff(h: History, overlap: bool) -> None:
    """core-a primary and acknowledging until 12, core-b from 14 (or from 11)."""
    for t in range(10, 18):
        a_acks = t <= 12
        b_acks = t >= (11 if overlap else 14)
        h.node_state(float(t), "core-a", "primary", 1, "running" if a_acks else None, a_acks)
        h.node_state(float(t), "core-b", "primary" if b_acks else "secondary",
                     2 if b_acks else 1, "suspended" if b_acks else "replica", b_acks)


def test_two_cores_acknowledging_at_once_is_split_brain() -> None:
    d = Drill()
    samples_handoff(d.h, overlap=False)
    assert d.check().passed
    d = Drill()
    samples_handoff(d.h, overlap=True)
    r = d.check()
    assert kinds(r) == {"split_brain"}
    (f,) = r.findings["split_brain"]
    assert f.detail["nodes"] == ["core-a", "core-b"]
    assert (f.detail["from"], f.detail["to"]) == (10.0, 12.0)


def test_an_explicit_since_narrows_an_acking_window() -> None:
    h = History()
    h.node_state(10.0, "core-a", "primary", 1, "running", True, since=9.0)
    h.node_state(20.0, "core-b", "primary", 2, "running", True, since=15.0)
    h.node_state(14.0, "core-a", "primary", 1, "running", False)
    r = check(h, [], SEED)
    assert r.passed, render_text(r)
    h.node_state(30.0, "core-a", "primary", 1, "running", True, since=19.0)
    assert kinds(check(h, [], SEED)) == {"split_brain"}


def test_an_epoch_going_backwards_is_reported() -> None:
    h = History()
    for t, e in ((1.0, 1), (2.0, 2), (3.0, 2), (4.0, None), (5.0, 2)):
        h.node_state(t, "core-b", "secondary", e, "replica", False)
    assert check(h, [], SEED).passed
    h.node_state(6.0, "core-b", "secondary", 1, "replica", False)
    r = check(h, [], SEED)
    assert kinds(r) == {"epoch_backward"}
    f = r.findings["epoch_backward"][0]
    assert (f.detail["node"], f.detail["from"], f.detail["to"]) == ("core-b", 2, 1)


def test_two_primaries_at_one_epoch_are_reported() -> None:
    h = History()
    h.node_state(1.0, "core-a", "primary", 3, "running", False)
    h.node_state(1.0, "core-b", "secondary", 3, "replica", False)
    h.node_state(2.0, "core-b", "primary", 4, "suspended", False)
    assert check(h, [], SEED).passed
    h.node_state(3.0, "core-a", "primary", 4, "paused", False)
    r = check(h, [], SEED)
    assert kinds(r) == {"epoch_shared"}
    assert r.findings["epoch_shared"][0].detail == {"epoch": 4, "nodes": ["core-b", "core-a"],
                                                    "first_seen": [2.0, 3.0]}


# --- check 6: RTO -----------------------------------------------------------------------------

def failover_timeline(commits: bool, named_cause: bool = False) -> History:
    """Kill core-a at 10, failover to core-b at 14 (core-b primary from the 15 s sample),
    the Edge's buffered writes committed on core-b from 16.5; an unrelated WAN change at 12."""
    h = History()
    for t in range(0, 20):
        ft = float(t)
        if t < 10:
            h.node_state(ft, "core-a", "primary", 1, "running", True)
        h.node_state(ft, "core-b", "primary" if t >= 15 else "secondary", 2 if t >= 15 else 1,
                     "suspended" if t >= 15 else "replica", t >= 17)
    h.event(5.0, "partition", "dc-a|witness", node="core-a")
    h.event(6.0, "heal", "dc-a|witness")
    kill = h.event(10.0, "kill", "SIGKILL core-a", node="core-a")
    h.event(12.0, "wan", "branch|dc-b delay 30ms")
    h.event(14.0, "failover", "coredr failover", node="core-b",
            cause=kill if named_cause else None)
    for i, at in enumerate((8.0, 11.0, 13.0, 15.5, 18.0)):
        h.write_started(i, 0, i, 1, at)
        h.write_ended(i, at + 0.001, "ok")  # the Edge acknowledges from its cache
        if commits and (at < 10 or at > 15):
            h.write_committed(i, 16.5 if 10 < at < 16.5 else at + 0.2)
    return h


def landed(h: History) -> list[Copy]:
    """One Core holding every acknowledged write of ``h``, in start order."""
    img = bytearray(NBLOCKS * BLOCK)
    for w in sorted(h.writes.values(), key=lambda w: w.start):
        if w.acked:
            img[w.first * BLOCK:(w.first + w.nblocks) * BLOCK] = payloads(
                SEED, w.id, w.lun, w.first, w.nblocks)
    return [Copy("core-b", "core", {0: bytes(img)})]


def test_rto_on_a_hand_built_failover_timeline() -> None:
    for named in (False, True):
        (r,) = check(failover_timeline(commits=True, named_cause=named), [], SEED).rto
        assert (r.kind, r.new_primary, r.cause_kind, r.cause_t) == ("failover", "core-b",
                                                                    "kill", 10.0)
        assert (r.takeover_t, r.recovered_t, r.basis) == (15.0, 16.5, "commit")
        assert r.from_failure == pytest.approx(6.5) and r.from_command == pytest.approx(2.5)
    # without commit times, the new primary's first acknowledging sample marks recovery
    (r,) = check(failover_timeline(commits=False), [], SEED).rto
    assert (r.basis, r.recovered_t, r.from_failure) == ("acking", 17.0, 7.0)
    h = failover_timeline(commits=True)
    res = check(h, landed(h), SEED)
    assert res.passed and "RTO 6.5 s from the failure (kill at +10.0 s)" in render_text(res)


def test_a_failover_after_which_nothing_commits_is_reported() -> None:
    h = failover_timeline(commits=True)
    for w in h.writes.values():
        if w.committed is not None and w.committed > 14:
            w.committed = None
    r = check(h, landed(h), SEED)
    assert kinds(r) == {"no_recovery"} and r.rto[0].recovered_t is None


# --- history input --------------------------------------------------------------------------

def test_history_refuses_inconsistent_input() -> None:
    h = History()
    h.write_started(1, 0, 0, 1, 1.0)
    with pytest.raises(ValueError, match="started twice"):
        h.write_started(1, 0, 0, 1, 1.0)
    with pytest.raises(ValueError, match="outcome 'acked'"):
        h.write_ended(1, 2.0, "acked")
    with pytest.raises(ValueError, match="never started"):
        h.write_ended(2, 2.0, "ok")
    h.write_ended(1, 2.0, "ok")
    with pytest.raises(ValueError, match="ended twice"):
        h.write_ended(1, 3.0, "failed")
    with pytest.raises(ValueError, match="count > 0"):
        h.write_started(3, 0, 0, 0, 1.0)
    with pytest.raises(ValueError, match="cause 5"):
        h.event(1.0, "failover", cause=5)
    with pytest.raises(ValueError, match="unique"):
        check(h, [Copy("x", "edge", {}), Copy("x", "core", {})], SEED)
    assert History.from_dict(json.loads(json.dumps(h.to_dict()))).to_dict() == h.to_dict()


# --- report ---------------------------------------------------------------------------------

class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def a_failing_drill() -> tuple[History, Result]:
    d = Drill()
    evil = "<script>alert('x')</script>&"
    for t in range(5):
        d.h.node_state(100.0 + t, evil, "primary", 1, "running", True)
        d.h.node_state(100.0 + t, "core-b", "primary", 2, "running", True)
        d.h.write_latency(100.0 + t, 0.002 * (t + 1))
    d.h.event(101.5, "kill", evil, node=evil)
    d.h.event(102.0, "failover", "to core-b", node="core-b")
    d.write(0, 3)
    d.put("core-a", 0, 3, bytes(BLOCK))
    copies = d.copies()
    copies[1] = Copy(evil, "core", copies[1].images)
    return d.h, check(d.h, copies, SEED, replay="steelfusion drill --seed 1234 --duration 2m")


def test_the_html_page_has_the_timeline_and_escapes_what_it_shows() -> None:
    h, r = a_failing_drill()
    assert {"lost_write", "split_brain"} <= kinds(r)
    page = render_html(r, h)
    p = _Page()
    p.feed(page)
    p.close()
    assert "svg" in p.tags and "rect" in p.tags and "circle" in p.tags
    assert "script" not in p.tags and "<script>" not in page  # every string escaped
    text = "".join(p.text)
    assert "<script>alert('x')</script>&" in text  # ... and shown as text
    assert "steelfusion drill: FAIL" in text
    assert "steelfusion drill --seed 1234 --duration 2m" in text
    assert any("lost on blocks 3" in t for t in p.text)


def test_an_empty_history_renders() -> None:
    h = History()
    r = check(h, [], SEED)
    assert r.passed
    assert "svg" in render_html(r, h)


def test_the_json_round_trips_and_the_text_starts_with_the_verdict() -> None:
    _, r = a_failing_drill()
    text = to_json(r)
    assert from_json(text) == r
    d = json.loads(text)
    assert d["passed"] is False and d["rpo"] == 1 and d["rto_summary"]["failovers"] == 1
    summary = render_text(r)
    assert summary.splitlines()[0].startswith("FAIL: RPO 1")
    assert summary.splitlines()[-1] == "  replay: steelfusion drill --seed 1234 --duration 2m"
    ok = Drill()
    ok.write(0, 1)
    assert from_json(to_json(ok.check())) == ok.check()


def test_many_findings_are_capped_but_counted() -> None:
    d = Drill(nblocks=64)
    for b in range(0, 64, 2):
        d.write(0, b)
    for b in range(64):
        d.put("core-b", 0, b, bytes(BLOCK))
    r = check(d.h, d.copies(), SEED, max_findings=5)
    assert len(r.findings["lost_write"]) == 5 and r.finding_counts["lost_write"] == 32
    assert r.rpo == 32
    summary = render_text(r, 3)
    assert "  lost_write: 32" in summary and "... 29 more" in summary


# --- properties -------------------------------------------------------------------------------

serial_writes = st.lists(st.tuples(st.integers(0, 1), st.integers(0, 12), st.integers(1, 4)),
                         min_size=1, max_size=25)


def build(writes: list[tuple[int, int, int]], skip: int | None = None
          ) -> tuple[History, dict[int, bytes]]:
    h = History()
    imgs = {lun: bytearray(16 * BLOCK) for lun in (0, 1)}
    for i, (lun, first, n) in enumerate(writes):
        h.write_started(i, lun, first, n, 2.0 * i)
        h.write_ended(i, 2.0 * i + 1, "ok")
        if i != skip:
            imgs[lun][first * BLOCK:(first + n) * BLOCK] = payloads(SEED, i, lun, first, n)
    return h, {lun: bytes(img) for lun, img in imgs.items()}


@settings(max_examples=60, deadline=None)
@given(serial_writes, st.data())
def test_serial_histories_pass_and_dropping_a_visible_write_fails(
        writes: list[tuple[int, int, int]], data: st.DataObject) -> None:
    h, full = build(writes)
    assert check(h, [Copy("core", "core", full)], SEED).passed
    k = data.draw(st.integers(0, len(writes) - 1))
    _, dropped = build(writes, skip=k)
    r = check(h, [Copy("core", "core", dropped)], SEED)
    # a write later ones fully overwrote leaves no trace; any other one must be missed
    assert r.passed == (dropped == full)
    if not r.passed:
        assert r.lost_write_ids == [k] and set(r.findings) == {"lost_write"}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(1, 4), st.floats(0, 20),
                          st.floats(0, 5), st.sampled_from(["ok", "ok", "failed",
                                                            "indeterminate"]),
                          st.floats(0, 1), st.booleans()),
                min_size=1, max_size=20))
def test_any_order_the_writes_could_have_taken_effect_in_passes(
        ws: list[tuple[int, int, float, float, str, float, bool]]) -> None:
    """Concurrent writes, failed and indeterminate ones: each takes effect at some instant
    between its start and its answer (any time after the start, or never, without an answer;
    maybe never if it failed). Every image made that way passes."""
    h = History()
    effects: list[tuple[float, int, int, int]] = []
    for i, (first, n, start, dur, outcome, frac, lands) in enumerate(ws):
        h.write_started(i, 0, first, n, start)
        h.write_ended(i, start + dur, outcome)
        if outcome == "ok" or lands:
            at = start + frac * (dur if outcome != "indeterminate" else 100.0)
            effects.append((at, i, first, n))
    img = bytearray(16 * BLOCK)
    for _, i, first, n in sorted(effects):
        img[first * BLOCK:(first + n) * BLOCK] = payloads(SEED, i, 0, first, n)
    r = check(h, [Copy("core", "core", {0: bytes(img)})], SEED)
    assert r.passed, render_text(r)


def test_a_64_mib_lun_scans_whole() -> None:
    """Not a timing test: one big image with random writes is attributed block by block."""
    nb = 16384
    rnd = random.Random(3)
    img = bytearray(nb * BLOCK)
    h = History()
    for i in range(300):
        first, n = rnd.randrange(nb - 8), rnd.randrange(1, 9)
        h.write_started(i, 0, first, n, float(i))
        h.write_ended(i, i + 0.5, "ok")
        img[first * BLOCK:(first + n) * BLOCK] = payloads(SEED, i, 0, first, n)
    r = check(h, [Copy("core", "core", {0: bytes(img)})], SEED)
    assert r.passed and r.counts["blocks_checked"] == nb
    img[(nb - 1) * BLOCK] = 1
    assert kinds(check(h, [Copy("core", "core", {0: bytes(img)})], SEED)) == {"corrupt"}
