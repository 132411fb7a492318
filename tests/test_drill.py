"""`steelfusion drill` (issue 10 item 3): the runner (steelfusion/drill.py).

The schedule builder and the refusals are checked without a lab; the drill itself runs as
the issue asks: a seeded two-minute drill on a real netns lab (root), real qemu-io writers,
real faults, then the checker's verdict (tests/test_drillcheck.py tests the checker alone).

``drill --ha`` (issue 16 item 6, steelfusion/drillha.py): its fault kinds and schedule
without a lab, the checker's HA rules (per-pair split brain, a Core's LUNs served by its
partner, takeover and handback timings) on hand-built histories, then a short real drill on
the loopback Core HA lab: a SAN path cut, both Cores of a pair killed, one Core killed.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest

from steelfusion import drill, labha
from steelfusion.drill import FAULT_KINDS, GAP, HOLD, build_schedule, parse_duration
from steelfusion.drillcheck import Copy, History, check
from steelfusion.drillpayload import BLOCK, payloads
from steelfusion.drillplan import (
    DEFAULT_KINDS,
    HA_BOTH,
    HA_CORES,
    HA_FAULT_KINDS,
    HA_KINDS,
    HA_SAN,
    SAN_KINDS,
)
from steelfusion.drillreport import from_json, render_html, render_text, summary_line, to_json
from tests.nodes import procs_in, refused

# Seed 117 over 2m plans 18 faults of every kind; about the first 10 fit in the two minutes:
# two isolations of the primary (a failover, then the failback), a Journal LUN out of space
# on a suspended primary, kills, stops, cuts, a slow link and an operator's suspend: the
# drill's whole runbook in two minutes.
DRILL_SEED = 117
# Seed 450 with --ha over 35s plans an ha-san on X (the leader cut from its array: the
# follower Y takes over), ha-both of X and X' (Y serves X's LUNs, Y' X''s), an ha-kill of Y,
# all within 15 s of the start with holds under 3.5 s: three faults in 35 s.
HA_SEED = 450
HA_DURATION = 35


def _why_not() -> str | None:
    return drill.refusal()


WHY_NOT = _why_not()


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "steelfusion.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_the_same_seed_gives_the_same_schedule() -> None:
    a = build_schedule(7, 300, FAULT_KINDS, edges=2)
    assert a == build_schedule(7, 300, FAULT_KINDS, edges=2)
    assert a != build_schedule(8, 300, FAULT_KINDS, edges=2)
    # a longer drill starts with the same faults (the stream is consumed the same way)
    assert build_schedule(7, 600, FAULT_KINDS, edges=2)[:len(a)] == a
    assert {f.kind for f in a} == set(FAULT_KINDS)
    for prev, f in zip([None, *a], a, strict=False):
        gap = f.at - (prev.at if prev else 0.0)
        assert GAP[0] - 0.11 <= gap <= GAP[1] + 0.11 and f.at < 300, f
        assert HOLD[0] <= f.hold <= HOLD[1] or f.kind == "outage", f
        assert f.n == (prev.n + 1 if prev else 1)
    targets = {f.target for f in a if f.kind in ("kill", "stop")}
    assert targets <= {"witness", "primary", "secondary", "edge-1", "edge-2"}
    assert all(f.target == "primary" for f in a if f.kind in ("isolate", "operator"))
    for f in a:
        if f.kind == "wan":
            assert 0.010 <= f.delay <= 0.050 and 0.001 <= f.loss <= 0.02, f
    # only the kinds asked for; a two-minute drill plans at least the 8 faults
    only = build_schedule(7, 120, ("kill", "wan"))
    assert {f.kind for f in only} <= {"kill", "wan"} and len(only) >= 8
    # the test drill's seed: every kind, and isolations for a failover and a failback
    planned = build_schedule(DRILL_SEED, 120, DEFAULT_KINDS)
    assert {f.kind for f in planned} == set(DEFAULT_KINDS)
    assert sum(f.kind == "isolate" for f in planned) >= 2
    assert any(f.kind == "journal" and f.suspend for f in planned[:10])
    # a branch outage lasts a minute or more, and one per ten minutes of schedule at most
    long = build_schedule(7, 3600, FAULT_KINDS)
    assert {f.target for f in long if f.kind == "san"} == {"primary", "secondary"}
    outages = [f for f in long if f.kind == "outage"]
    assert outages and all(60 <= f.hold <= 100 for f in outages)
    assert all(b.at - a.at >= 600 for a, b in itertools.pairwise(outages))
    journal = [f for f in long if f.kind == "journal"]
    assert {f.mode for f in journal} == {"full", "offline"}
    assert {f.suspend for f in journal} == {True, False}
    assert not any(f.suspend for f in journal if f.target == "secondary")


@pytest.mark.lab
@pytest.mark.parametrize("args,want", [
    ("--duration 5x", ["--duration", "5m"]),
    ("--duration 3s", ["--duration"]),
    ("--faults kill,bogus", ["'bogus' is not a fault kind", "isolate"]),
    ("--faults ,", ["no fault kind"]),
    ("--lun-size 12345", ["--lun-size", "4 KiB"]),
    ("--lun-size 32K", ["--lun-size", "64K"]),
    ("--luns 0", ["--luns"]),
    ("--edges 0", ["--edges"]),
    ("--seed x", ["--seed"]),
    ("--bogus", ["--bogus"]),
    ("--faults ha-kill", ["ha-kill", "add --ha"]),
    ("--ha --faults kill,partition", ["partition", "with --ha", "ha-both"]),
    ("--ha --edges 1", ["at least 2 Edges"]),
])
def test_bad_options_are_refused_in_one_line(tmp_path: Path, args: str, want: list[str]) -> None:
    wd = tmp_path / "d"
    refused(cli("drill", "--workdir", str(wd), *args.split()), *want)
    assert not wd.exists()


def test_durations_and_fault_lists_parse() -> None:
    assert parse_duration("2m") == 120 and parse_duration("90") == 90
    assert drill.format_duration(120) == "2m" and drill.format_duration(90) == "90s"
    assert drill.parse_faults("all") == DEFAULT_KINDS == drill.parse_faults(None)
    assert "san" not in DEFAULT_KINDS and "journal" in DEFAULT_KINDS
    assert drill.parse_faults("all", san="tgt") == SAN_KINDS == drill.parse_faults(None, "tgt")
    assert "san" in SAN_KINDS and "journal" not in SAN_KINDS
    with pytest.raises(drill.DrillError, match="add --san tgt"):
        drill.parse_faults("kill,san")
    with pytest.raises(drill.DrillError, match="Journal LUN is on the array"):
        drill.parse_faults("journal", san="tgt")
    assert drill.parse_faults("wan, kill") == ("kill", "wan")


def test_not_root_is_refused_in_one_line_naming_why() -> None:
    why = drill.refusal(euid=1000)
    assert why is not None and "\n" not in why
    assert "needs root" in why and "network namespaces" in why


@pytest.mark.lab
@pytest.mark.skipif(WHY_NOT is not None, reason=f"no drill here: {WHY_NOT}")
def test_a_folder_that_is_not_a_drills_is_refused_and_left_alone(tmp_path: Path) -> None:
    wd = tmp_path / "d"
    wd.mkdir()
    (wd / "mine.txt").write_text("keep me\n")
    refused(cli("drill", "--workdir", str(wd), "--duration", "1m"), "not empty", "drill.json")
    assert (wd / "mine.txt").read_text() == "keep me\n"


class _Html(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)


@pytest.mark.lab
@pytest.mark.timeout(600)
@pytest.mark.skipif(WHY_NOT is not None, reason=f"no drill here: {WHY_NOT}")
def test_a_seeded_two_minute_drill_passes_with_rpo_0_and_identical_cores(
        tmp_path: Path) -> None:
    wd = tmp_path / "drill"
    report, js = tmp_path / "r.html", tmp_path / "r.json"
    p = cli("drill", "--workdir", str(wd), "--seed", str(DRILL_SEED), "--duration", "2m",
            "--report", str(report), "--json", str(js), timeout=540)
    assert p.returncode == 0, (p.stdout[-6000:], p.stderr[-3000:])
    out = p.stdout
    assert f"replay: steelfusion drill --workdir {wd} --seed {DRILL_SEED} --duration 2m" in out
    summary = next(ln for ln in out.splitlines() if ln.startswith(("PASS seed", "FAIL seed")))
    assert summary.startswith(f"PASS seed {DRILL_SEED}: ") and "RPO 0;" in summary, summary

    result = from_json(js.read_text())
    assert result.passed and result.rpo == 0 and not result.findings, result.findings
    assert result.counts["writes_ok"] > 1000
    info = json.loads((wd / "drill.json").read_text())
    assert len(info["injected"]) >= 8, info["injected"]
    # the Journal LUN of the suspended primary ran out of space, and the Core reopened it
    assert any(i["kind"] == "journal" and i["suspend"] for i in info["injected"])
    assert info["problems"] == [] and info["passed"] is True
    # failovers happened and each recovered (writes acknowledged on the new primary)
    assert len(result.rto) >= 2 and all(r.from_failure is not None for r in result.rto)
    assert {r.kind for r in result.rto} == {"failover", "failback"}
    # the same seed printed the same schedule it replays
    planned = [dataclasses.asdict(f) for f in build_schedule(DRILL_SEED, 120, DEFAULT_KINDS)]
    assert info["schedule"] == planned
    # both Cores hold identical LUNs (the checker compared them too)
    lab = json.loads((wd / "lab.json").read_text())
    for lun in ("1", "2"):
        a, b = (Path(c["luns"][lun]).read_bytes() for c in lab["cores"])
        assert a == b, f"LUN {lun} differs between the Cores"
    # the HTML page parses and holds the timeline
    parser = _Html()
    parser.feed(report.read_text())
    assert {"html", "svg", "table"} <= parser.tags
    # the lab is down: nothing of it runs, its namespaces are gone
    from steelfusion import netns
    from steelfusion.lab import node_alive

    assert not any(node_alive(n) for n in [lab["wan"], lab["witness"], *lab["cores"],
                                           *lab["edges"]])
    assert netns.listing(netns.lab_prefix(lab["labid"])) == []


# -- drill --ha: plan and options ---------------------------------------------------------


def test_ha_fault_kinds_only_with_ha() -> None:
    assert tuple(seat.name for seat in labha.SEATS) == HA_CORES  # X, Y, X', Y'
    assert drill.parse_faults("all", ha=True) == HA_KINDS == drill.parse_faults(None, ha=True)
    assert set(HA_FAULT_KINDS) < set(HA_KINDS) and not set(HA_FAULT_KINDS) & set(FAULT_KINDS)
    assert drill.parse_faults("ha-san, kill,ha-both", ha=True) == ("kill", "ha-both", "ha-san")
    for kind in HA_FAULT_KINDS:  # refused without --ha, in one line saying so
        with pytest.raises(drill.DrillError, match="add --ha") as e:
            drill.parse_faults(f"kill,{kind}")
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError, match=kind):
            build_schedule(1, 60, ("kill", kind))
    for kind in ("partition", "isolate", "wan", "operator", "journal", "outage", "san"):
        with pytest.raises(drill.DrillError, match="with --ha choose from"):
            drill.parse_faults(f"ha-kill,{kind}", ha=True)
        with pytest.raises(ValueError, match=kind):
            build_schedule(1, 60, ("ha-kill", kind), ha=True)
    # the non-HA defaults do not change
    assert drill.parse_faults(None) == DEFAULT_KINDS
    assert drill.parse_faults(None, "tgt") == SAN_KINDS


def test_the_ha_schedule_is_the_seeds_and_targets_the_four_cores() -> None:
    a = build_schedule(7, 600, HA_KINDS, ha=True)
    assert a == build_schedule(7, 600, HA_KINDS, ha=True)
    assert a != build_schedule(8, 600, HA_KINDS, ha=True)
    assert build_schedule(7, 1200, HA_KINDS, ha=True)[:len(a)] == a
    assert {f.kind for f in a} == set(HA_KINDS)
    for f in a:
        assert HOLD[0] <= f.hold <= HOLD[1], f
        if f.kind in ("kill", "stop", "ha-kill"):
            assert f.target in HA_CORES, f
        elif f.kind == "ha-both":
            assert f.target in HA_BOTH, f
        else:
            assert f.target in HA_SAN, f
    assert {f.target for f in a if f.kind in ("kill", "stop", "ha-kill")} == set(HA_CORES)
    assert {f.target for f in a if f.kind == "ha-both"} == set(HA_BOTH)
    assert {f.target for f in a if f.kind == "ha-san"} == set(HA_SAN)
    assert "core-a2 (Y) and core-b2 (Y')" in next(
        f.describe() for f in a if f.target == "core-a2+core-b2")
    # the test drill's seed: a SAN cut, both Cores of a pair, one Core, early and short
    first = build_schedule(HA_SEED, HA_DURATION, HA_FAULT_KINDS, ha=True)[:3]
    assert [f.kind for f in first] == ["ha-san", "ha-both", "ha-kill"], first
    assert [f.target for f in first] == ["core-a1", "core-a1+core-b1", "core-a2"], first
    assert first[2].at < 15 and all(f.hold < 3.5 for f in first), first


def test_ha_options_replay_and_refusal() -> None:
    o = drill.Options(workdir=Path("/tmp/d"), seed=3, duration=40, faults=("ha-kill",),
                      luns=1, edges=2, lun_size=16 << 20, ha=True)
    assert o.replay() == ("steelfusion drill --ha --workdir /tmp/d --seed 3 --duration 40s "
                          "--faults ha-kill --luns 1 --edges 2 --lun-size 16M")
    assert "--ha" not in dataclasses.replace(o, ha=False).replay()
    # no root needed: the same answer for any user (only the arrays' and hosts' tools)
    assert drill.refusal(euid=1000, ha=True) == drill.refusal(euid=0, ha=True)
    assert "--ha" in (drill.refusal(euid=1000) or "")


# -- drill --ha: the checker's rules --------------------------------------------------------

X, Y, XP, YP = HA_CORES
YX = f"{Y}@{X}"  # Y's LUNs served by X after a takeover


def _sample(h: History, t: float, node: str, group: str, acking: bool, epoch: int = 1,
            role: str = "primary") -> None:
    h.node_state(t, node, role, epoch, "running", acking, since=t - 0.25, group=group)


def test_ha_split_brain_is_per_pair_and_a_hosted_core_is_the_same_core() -> None:
    h = History()
    for i in range(8):  # X and Y acknowledge at once: each its own LUNs, by design
        _sample(h, 10 + i * 0.25, X, "lab-pair-1", True)
        _sample(h, 10 + i * 0.25, Y, "lab-pair-2", True)
        _sample(h, 10 + i * 0.25, XP, "lab-pair-1", False, role="secondary")
    # after the takeover X serves Y's LUNs as Y did (same epoch: the same Core carries on)
    for i in range(4):
        _sample(h, 20 + i * 0.25, YX, "lab-pair-2", True)
    r = check(h, [], seed=1)
    assert r.passed and not r.findings, r.findings
    # Y still acknowledging while X serves its LUNs: the fence failed, split brain
    _sample(h, 20.5, Y, "lab-pair-2", True)
    r = check(h, [], seed=1)
    assert set(r.findings) == {"split_brain"}, r.findings
    assert {Y, YX} == set(r.findings["split_brain"][0].detail["nodes"])
    # two different Cores of one pair primary at one epoch is still reported
    h2 = History()
    _sample(h2, 1.0, Y, "lab-pair-2", False, epoch=3)
    _sample(h2, 2.0, YP, "lab-pair-2", False, epoch=3)
    _sample(h2, 2.0, X, "lab-pair-1", False, epoch=3)  # another pair: its own epochs
    r2 = check(h2, [], seed=1)
    assert set(r2.findings) == {"epoch_shared"}
    assert r2.findings["epoch_shared"][0].detail["nodes"] == [Y, YP]


def test_a_core_copy_holds_only_the_luns_it_expects() -> None:
    h = History()
    for wid, lun in ((1, 1), (2, 2)):
        h.write_started(wid, lun, 0, 1, 1.0 + wid)
        h.write_ended(wid, 1.5 + wid, "ok")
    img = {lun: payloads(5, wid, lun, 0, 1) + bytes(BLOCK) for wid, lun in ((1, 1), (2, 2))}
    copies = [Copy(X, "core", {1: img[1]}, expect=frozenset({1})),
              Copy(Y, "core", {2: img[2]}, expect=frozenset({2}))]
    assert check(h, copies, seed=5).passed
    copies[1] = Copy(Y, "core", {}, expect=frozenset({2}))
    r = check(h, copies, seed=5)
    assert set(r.findings) == {"missing_image"} and r.findings["missing_image"][0].copy == Y
    # without expect a Core copy must hold every LUN (the netns drill's rule)
    assert "missing_image" in check(h, [Copy(X, "core", {1: img[1]})], seed=5).findings


def test_takeover_and_handback_times_come_from_their_causes() -> None:
    h = History()
    kill = h.event(100.0, "kill", f"SIGKILL {Y}", node=Y)
    h.event(101.25, "takeover", f"{X} serves {Y}'s LUNs 2", node=X, cause=kill)
    start = h.event(104.0, "heal", f"lab start {Y}", node=Y)
    h.event(107.5, "handback", f"{X} handed {Y}'s LUNs back", node=Y, cause=start)
    r = check(h, [], seed=1)
    assert [(s.kind, s.core, s.node, s.cause_kind, s.seconds) for s in r.ha] == [
        ("takeover", Y, X, "kill", 1.25), ("handback", Y, Y, "heal", 3.5)]
    text = render_text(r)
    assert "Core HA: takeover median 1.2 s max 1.2 s (1), handback median 3.5 s" in text, text
    line = summary_line(r, 9, Counter({"ha-kill": 1}), 0, [], 30.0)
    assert line.startswith("PASS seed 9: 1 faults injected (ha-kill 1); RPO 0; takeover "
                           "median 1.2 s max 1.2 s (1), handback median 3.5 s"), line
    assert "RTO" not in line
    assert from_json(to_json(r)).ha == r.ha
    assert "Core HA: takeovers and handbacks" in render_html(r, h)
    assert from_json(to_json(check(History(), [], seed=1))).ha == []


# -- drill --ha: a real one -----------------------------------------------------------------

HA_WHY_NOT = drill.refusal(ha=True)


@pytest.mark.lab
@pytest.mark.timeout(300)
@pytest.mark.skipif(HA_WHY_NOT is not None, reason=f"no HA drill here: {HA_WHY_NOT}")
def test_a_short_ha_drill_passes_with_takeovers_handbacks_and_rpo_0(tmp_path: Path) -> None:
    wd = tmp_path / "ha"
    js = tmp_path / "r.json"
    p = cli("drill", "--ha", "--workdir", str(wd), "--seed", str(HA_SEED), "--duration",
            f"{HA_DURATION}s", "--faults", "ha-kill,ha-both,ha-san", "--luns", "1",
            "--lun-size", "16M", "--json", str(js), timeout=280)
    assert p.returncode == 0, (p.stdout[-6000:], p.stderr[-3000:])
    summary = next(ln for ln in p.stdout.splitlines() if ln.startswith(("PASS seed", "FAIL seed")))
    assert summary.startswith(f"PASS seed {HA_SEED}: ") and "RPO 0;" in summary, summary
    assert "takeover median" in summary and "handback median" in summary, summary
    result = from_json(js.read_text())
    assert result.passed and result.rpo == 0 and not result.findings, result.findings
    assert result.counts["writes_ok"] > 500
    info = json.loads((wd / "drill.json").read_text())
    assert info["problems"] == [] and info["passed"] is True
    planned = [dataclasses.asdict(f) for f in build_schedule(
        HA_SEED, HA_DURATION, HA_FAULT_KINDS, ha=True)]
    assert info["schedule"] == planned
    # the three faults ran: X cut from san-a, X and X' killed, Y killed
    assert [i["kind"] for i in info["injected"][:3]] == ["ha-san", "ha-both", "ha-kill"]
    # Y takes X's LUNs over (cut, then killed), Y' X''s, X Y's; each gets them back
    took = sorted((s.core, s.node) for s in result.ha if s.kind == "takeover")
    back = sorted(str(s.core) for s in result.ha if s.kind == "handback")
    assert took[:4] == [(X, Y), (X, Y), (Y, X), (XP, YP)], result.ha
    assert back[:4] == [X, X, Y, XP], result.ha
    assert all(s.seconds is not None and 0 < s.seconds < 30 for s in result.ha), result.ha
    cut = next(s for s in result.ha if s.kind == "takeover" and s.cause_kind == "partition")
    assert (cut.core, cut.node) == (X, Y)
    # every copy was checked: both Edges' read-backs and each Core's LUN on its array
    assert set(result.per_copy) == {"edge-1", "edge-2", *HA_CORES}
    assert json.loads((wd / "lab.json").read_text())["ha"] is True
    assert not procs_in(wd), procs_in(wd)  # the lab is down


@pytest.mark.lab
@pytest.mark.timeout(180)
@pytest.mark.skipif(HA_WHY_NOT is not None, reason=f"no HA drill here: {HA_WHY_NOT}")
def test_the_ha_drills_operator_resumes_a_suspended_pair(tmp_path: Path) -> None:
    """A pair left suspended (a resync cut short: RESYNCING + PEER_DOWN) is not the normal
    state; the runbook's operator resumes it on the HA leader, as the netns drill does."""
    from steelfusion.drillha import HaDrill

    said: list[str] = []
    d = HaDrill(drill.Options(workdir=tmp_path / "lab", seed=1, duration=60,
                              faults=("ha-kill",), luns=1, edges=2, lun_size=16 << 20,
                              ha=True), echo=said.append)
    try:
        d.lab_up()
        assert d.wait_healthy(60), d.health()
        rc, out = d.coredr(Y, "suspend")  # on the follower: refused, naming the leader
        assert rc != 0 and X in out, out
        rc, out = d.coredr(X, "suspend")
        assert rc == 0 and Y in out, out
        assert "suspended" in (d.health() or ""), d.health()
        assert d.wait_healthy(120), d.health()
        resumes = [e for e in d.rec.h.events if e.kind == "resume"]
        assert resumes and {e.node for e in resumes} == {X}, resumes
        assert any("the operator resumes it on its HA leader core-a1" in s for s in said), said
    finally:
        d.cleanup()
    assert not procs_in(d.lab.dir), procs_in(d.lab.dir)
