"""``lab up --ha``: two Core HA pairs on loopback, one storage array per data center
(issue 16; seed 002, "FusionSync and Core HA").

The seed's picture, with the lab's names::

    dc-a (primary)                         dc-b (secondary)
    core-a1  X   leader   ── lab-pair-1 ── core-b1  X'  leader
    core-a2  Y   follower ── lab-pair-2 ── core-b2  Y'  follower
    san-a: X's and Y's LUNs, ONE Journal   san-b: the same for X' and Y'

* **Arrays.** Both Cores of a data center reach the same array (a tgtd, as ``lab up --san
  tgt``): their LUNs and one Journal LUN (LUN 200) they share, X using its first half
  (``#part=1/2``), Y the second (``#part=2/2``). Each half holds the seed's required size
  for the larger of the two Cores' LUN counts (after the LUN's 1 MiB part table). Each Core's ``state_dir`` is
  ``<workdir>/<name>``: on one machine both Cores of the pair reach it, the lab's stand-in
  for state on storage both see.
* **Replication.** X↔X' and Y↔Y' are ordinary FusionSync pairs on one Witness. Each Core
  dials its peer first, then where the peer's HA partner would serve the peer's LUNs after
  a takeover (``peer_alternates``: X tries Y'.takeover_listen).
* **Edges.** Spread over both HA Cores: edge-1 on X, edge-2 on Y, edge-3 on X, ... Each
  dials, in order, its Core, that Core's partner's takeover address, the peer Core, and the
  peer's partner's takeover address; a Core that does not serve the Edge's LUNs refuses it
  or is not listening.
* **LUN ids.** X's LUNs are 1..N·(Edges on X), Y's the next ones; a replica has its
  primary's id and size.

Loopback only: every address comes from :func:`steelfusion.labproc.free_ports`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from journal import required_size
from steelfusion.config import CoreConfig, LunConfig
from steelfusion.labproc import LabError
from steelfusion.partdev import TABLE_BYTES
from steelfusion.san import IQN_PREFIX, JOURNAL_LUN, SanConfig, SanLun, free_tgt_control_port
from steelfusion.units import format_addr

Addr = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Seat:
    """One Core's place in the HA topology."""

    name: str
    role: str  # replication role: primary / secondary
    ha: str  # leader / follower
    datacenter: str
    partner: str  # the other Core of this data center
    peer: str  # the replication peer in the other data center
    pair: str  # the replication pair's name at the Witness
    san: str  # the data center's array
    part: int  # which half of the shared Journal LUN


SEATS = (
    Seat("core-a1", "primary", "leader", "dc-a", "core-a2", "core-b1", "lab-pair-1", "san-a", 1),
    Seat("core-a2", "primary", "follower", "dc-a", "core-a1", "core-b2", "lab-pair-2", "san-a", 2),
    Seat("core-b1", "secondary", "leader", "dc-b", "core-b2", "core-a1", "lab-pair-1", "san-b", 1),
    Seat("core-b2", "secondary", "follower", "dc-b", "core-b1", "core-a2", "lab-pair-2", "san-b",
         2),
)
SEAT = {s.name: s for s in SEATS}
SANS: dict[str, tuple[str, ...]] = {"san-a": ("core-a1", "core-a2"),
                                    "san-b": ("core-b1", "core-b2")}
CORE_PORTS = 6  # listen, control, ha listen, takeover listen, takeover control, SAN path
PORTS_PER_LAB = len(SEATS) * CORE_PORTS + 2 * len(SANS)  # + each array's portal and path
# control; plus the Witness's and the Edges'


def check(*, edges: int, luns: int, netns: bool, journal_faults: bool) -> None:
    """Refuse what an HA lab cannot run with, before anything is written or started."""
    if netns:
        raise LabError("--ha runs on loopback only: leave out --netns (the netns lab has one "
                       "Core per data center)")
    if journal_faults:
        raise LabError("--ha puts each data center's shared Journal LUN on its array; "
                       "--journal-faults puts Journal LUNs on a local failing disk: choose one")
    if edges < 2:
        raise LabError(f"--ha needs at least 2 Edges (edge-1 on core-a1, edge-2 on core-a2, "
                       f"...), got --edges {edges}")
    if luns * edges >= JOURNAL_LUN:
        raise LabError(f"--ha puts every LUN of a data center on one array, whose LUNs "
                       f"1..{JOURNAL_LUN - 1} are free (LUN {JOURNAL_LUN} is the Journal "
                       f"LUN): --luns {luns} x --edges {edges} = {luns * edges} is too many")


def serving(edge: int) -> str:
    """The primary Core that serves Edge number ``edge`` (0-based): X, Y, X, ..."""
    return SEATS[edge % 2].name


def lun_ids(luns: int, edges: int) -> dict[str, list[list[int]]]:
    """Per primary Core, the LUN ids of each Edge it serves (in Edge order): X's Edges get
    1.., Y's the ids after X's."""
    out: dict[str, list[list[int]]] = {SEATS[0].name: [], SEATS[1].name: []}
    for e in range(edges):
        out[serving(e)].append([])
    nxt = 1
    for core in out:
        for ids in out[core]:
            ids.extend(range(nxt, nxt + luns))
            nxt += luns
    return out


def journal_size(luns: int, edges: int) -> int:
    """The shared Journal LUN: its part table, then two halves, each the seed's size for
    the larger Core (steelfusion/partdev.py)."""
    ids = lun_ids(luns, edges)
    most = max(sum(len(x) for x in v) for v in ids.values())
    return TABLE_BYTES + 2 * required_size(most)


@dataclass(frozen=True, slots=True)
class Plan:
    """What ``lab up --ha`` starts: the four Cores (X, Y, X', Y'), the two arrays, and per
    Edge its LUN ids and the Core addresses it dials, in order."""

    cores: tuple[CoreConfig, ...]
    sans: list[SanConfig]
    edges: list[tuple[list[int], tuple[Addr, ...]]]


def plan(d: Path, *, luns: int, lun_size: int, edges: int, host: str, ports: Iterator[int],
         witness: Addr, observed: Callable[[], dict[str, Any]]) -> Plan:
    """The configs of an HA lab in ``d``; ``ports`` yields at least :data:`PORTS_PER_LAB`
    free ports, ``observed`` each Core's metrics/console fields."""
    addr: dict[str, dict[str, Addr]] = {
        s.name: {k: (host, next(ports)) for k in
                 ("listen", "control", "ha_listen", "takeover_listen", "takeover_control",
                  "san_path")}
        for s in SEATS}
    ids = lun_ids(luns, edges)
    own = {s.name: [i for x in ids[s.name if s.role == "primary" else s.peer] for i in x]
           for s in SEATS}
    jsize = journal_size(luns, edges)
    sans = []
    for name, members in SANS.items():
        slun = [SanLun(i, str(d / name / f"lun-{i}.img"), lun_size)
                for core in members for i in own[core]]
        slun.append(SanLun(JOURNAL_LUN, str(d / name / "journal.img"), jsize))
        sans.append(SanConfig(name=name, portal=(host, next(ports)),
                              control_port=free_tgt_control_port(), iqn=f"{IQN_PREFIX}:{name}",
                              luns=tuple(slun), log_file=str(d / f"{name}.log"),
                              # each Core's own path to the array, that `lab san-path` cuts
                              paths={c: addr[c]["san_path"] for c in members},
                              path_control=(host, next(ports))))
    san = {s.name: s for s in sans}
    cores = []
    for s in SEATS:
        a, partner, peer = addr[s.name], addr[s.partner], addr[s.peer]
        array = san[s.san]
        cores.append(CoreConfig(
            name=s.name, role=s.role, listen=a["listen"], control=a["control"],
            state_dir=str(d / s.name),
            luns=tuple(LunConfig(i, array.url(i), lun_size) for i in own[s.name]),
            peer=peer["listen"], peer_alternates=(addr[SEAT[s.peer].partner]["takeover_listen"],),
            interfaces=(host,), witness=witness, pair=s.pair, ha=s.ha,
            journal_path=f"{array.url(JOURNAL_LUN)}#part={s.part}/2", journal_size=0,
            ha_partner=s.partner, ha_datacenter=s.datacenter, ha_listen=a["ha_listen"],
            ha_partner_address=partner["ha_listen"],
            ha_partner_config=str(d / f"{s.partner}.toml"),
            ha_takeover_listen=a["takeover_listen"], ha_takeover_control=a["takeover_control"],
            # the LUN files are created empty (all zeros) on both arrays: already in sync
            initial_sync=False, log_file=str(d / f"{s.name}.log"),
            san_via=a["san_path"], **observed()))
    edge_plan: list[tuple[list[int], tuple[Addr, ...]]] = []
    nth = dict.fromkeys(ids, 0)  # Edges of each primary so far
    for e in range(edges):
        x = SEAT[serving(e)]
        mine = ids[x.name][nth[x.name]]
        nth[x.name] += 1
        dial = (addr[x.name]["listen"], addr[x.partner]["takeover_listen"],
                addr[x.peer]["listen"], addr[SEAT[x.peer].partner]["takeover_listen"])
        edge_plan.append((mine, dial))
    return Plan(tuple(cores), sans, edge_plan)


def core_entry(c: CoreConfig) -> dict[str, Any]:
    """An HA Core's extra fields in ``lab.json`` (nothing for a Core without HA)."""
    if c.ha == "none":
        return {}
    assert c.ha_listen and c.ha_takeover_listen and c.ha_takeover_control
    return {"ha": c.ha, "partner": c.ha_partner, "datacenter": c.ha_datacenter,
            "ha_listen": format_addr(c.ha_listen),
            "takeover_listen": format_addr(c.ha_takeover_listen),
            "takeover_control": format_addr(c.ha_takeover_control), "pair": c.pair}


def lun_list(ids: list[int]) -> str:
    """LUN ids as ranges: 1-3,7."""
    runs: list[list[int]] = []
    for i in sorted(ids):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def ha_words(core: dict[str, Any]) -> str:
    """An HA Core's line in ``lab status``: configured role (and who leads now), its partner
    up or down, and which LUNs it serves (its own, and its partner's after a takeover).
    Tolerant of a Core whose status has no ``ha`` section yet (or that is down)."""
    role = core.get("ha_role")
    if not role:
        return ""
    ha = core.get("ha") if isinstance(core.get("ha"), dict) else None
    partner = core.get("partner") or "?"
    if ha is None:
        return f"ha={role} partner={partner}"
    words = f"ha={role}"
    if ha.get("leader") == core.get("name") and role != "leader":
        words += "(acting-leader)"
    mode = ha.get("mode")
    if mode and mode != "active":
        words += f" mode={mode}"
    up = ha.get("partner_up")
    words += f" partner={ha.get('partner') or partner}:" + (
        "up" if up else "down" if up is not None else "?")
    serving = [int(k) for k in (core.get("luns") or {})]
    words += f" luns={lun_list(serving) if serving else '-'}"
    hosted = ha.get("hosted")
    if isinstance(hosted, dict):
        words += (f" +{hosted.get('name') or partner}:{lun_list(list(hosted.get('luns') or []))}"
                  f"({hosted.get('replication') or '?'})")
    return words


__all__ = ["PORTS_PER_LAB", "SANS", "SEAT", "SEATS", "Plan", "check", "core_entry",
           "ha_words", "journal_size", "lun_ids", "plan", "serving"]
