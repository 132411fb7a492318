"""The embedded default: a whole FusionSync topology on loopback, one process per node.

``steelfusion lab up`` writes one TOML config per node into the lab folder,
starts a Witness, the primary Core, the secondary Core and the Edges (in that
order), waits until every Edge is connected to the primary and the Cores are
replicating, and records what it started in ``lab.json``. Every node's log is
a JSON-lines file in the same folder; its ``.out`` file holds the same events
(info and above) as readable lines, and the one-line error of a failed start.

What can be checked before a node starts is (options, the folder, whether the
file system holds a LUN that large, LUN files of an earlier lab); a refusal
changes nothing. A node that fails to start stops every node started before
it, puts back the lab files it had replaced and reports the node's own
one-line error.

``lab up --netns`` (root) puts the sites in network namespaces instead: the
Edges (and the hosts) in ``branch``, core-a in ``dc-a``, core-b in ``dc-b`` and
the Witness in ``witness``, each with private addresses 10.99.SITE.PORT, the
Cores with two replication interfaces each. The sites reach each other only
through the userspace WAN emulator (``steelfusion wan run``, the lab node
``wan``, steelfusion/wanemu.py), so ``lab link`` and ``lab port`` can delay,
limit, lose or cut what crosses between them. Every other command works the
same on both kinds of lab.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from journal import required_size
from steelfusion import control, faultdisk, labdisk, labha, labsan
from steelfusion.atomic import atomic_write
from steelfusion.authconfig import make_key_file
from steelfusion.config import (
    EDGE_RESERVE_MIN,
    CoreConfig,
    EdgeConfig,
    EdgeLunConfig,
    LunConfig,
    TargetConfig,
    WitnessConfig,
    write_toml,
)
from steelfusion.labnet import (
    CORE_SITES,
    NS_PATTERN,
    SITES,
    WanLinks,
    format_duration,
    format_rate,
    netns_configs,
    parse_duration,
    parse_loss,
    parse_rate,
    remove_namespaces,
    remove_stale_namespaces,
    stale_namespaces,
)
from steelfusion.labproc import (
    LabError,
    call_node,
    disk_status,
    free_ports,
    last_error,
    node_alive,
    pid_alive,
    read_or_none,
    spawn,
    stop_pids,
    wait_control,
    wait_mounted,
)
from steelfusion.nodeauth import read_key_file
from steelfusion.san import SanConfig
from steelfusion.units import format_addr, format_size, parse_addr

# the lab's whole surface in one import: its processes (labproc) and network (labnet) too
__all__ = ["CORE_SITES", "SITES", "Lab", "LabError", "call_node", "core_pair_configs",
           "format_duration", "format_rate", "free_ports", "node_alive", "parse_duration",
           "parse_loss", "parse_rate", "pid_alive", "remove_stale_namespaces", "size_arg",
           "spawn", "stale_namespaces", "wait_control"]

IQN_PREFIX = "iqn.2026-11.io.steelfusion"
CONSOLE_PASSWORD_FILE = "console.password"  # 0600; the consoles' password, never in lab.json
LUN_BLOCK = 4096  # an exported LUN is a whole number of 4 KiB blocks
MAX_LUNS_PER_EDGE = 256  # SCSI LUN numbers 0..255 in one target


def size_arg(n: int) -> str:
    """``n`` bytes as a ``--lun-size`` argument: 8M, 1G, 12K (the largest exact unit)."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def core_pair_configs(d: Path, luns: dict[int, int], *, names: tuple[str, str] = ("core-a", "core-b"),
                      host: str = "127.0.0.1", ports: Iterator[int] | None = None,
                      replica_luns: dict[int, int] | None = None, with_peer: bool = True,
                      journal: bool = True, journal_size: int | None = None,
                      journal_dir: str | None = None,
                      per_core: tuple[dict[str, Any], dict[str, Any]] = ({}, {}),
                      **common: Any) -> tuple[CoreConfig, CoreConfig]:
    """A primary and a secondary Core peered on loopback, their files under ``d``.

    ``luns`` maps LUN id -> size (``replica_luns`` overrides it for the
    secondary); each Core gets a sparse journal of the seed's required size
    unless ``journal`` is off (in ``<core>/<journal_dir>/`` when given: the lab's
    failing disk is mounted there); ``common`` and ``per_core`` are CoreConfig fields.
    """
    it = ports if ports is not None else iter(free_ports(4, host))
    addrs = [((host, next(it)), (host, next(it))) for _ in names]
    out = []
    for i, name in enumerate(names):
        sizes = luns if i == 0 or replica_luns is None else replica_luns
        out.append(CoreConfig(
            name=name, role="primary" if i == 0 else "secondary", listen=addrs[i][0],
            control=addrs[i][1], state_dir=str(d / name),
            luns=tuple(LunConfig(k, str(d / name / f"lun-{k}.img"), v) for k, v in sizes.items()),
            peer=addrs[1 - i][0] if with_peer else None, interfaces=(host,),
            journal_path=(str(d / name / (journal_dir or ".") / "journal.img")
                          if journal else None),
            journal_size=(journal_size or required_size(len(sizes))) if journal else 0,
            log_file=str(d / f"{name}.log"), **common, **per_core[i]))
    return out[0], out[1]


class Lab(WanLinks):
    """A lab folder: its ``lab.json`` and the nodes it describes."""
    def __init__(self, workdir: str | Path) -> None:
        self.dir = Path(workdir).resolve()
        self.file = self.dir / "lab.json"

    # -- description ----------------------------------------------------------
    def load(self) -> dict[str, Any]:
        if self.dir.exists() and not self.dir.is_dir():
            raise LabError(f"--workdir {self.dir} is not a directory (give the lab's folder)")
        try:
            text = self.file.read_text()
        except FileNotFoundError:
            raise LabError(f"no lab in {self.dir} (no lab.json); run `steelfusion lab up "
                           f"--workdir {self.dir}` first") from None
        except OSError as e:
            raise LabError(f"cannot read {self.file}: {e.strerror or e}") from None
        try:
            data = json.loads(text)
        except ValueError as e:
            raise LabError(f"{self.file} is not valid JSON ({e}); stop any node of that lab by "
                           f"hand (see `ps`), then remove {self.file}") from None
        if not _well_formed(data):
            raise LabError(f"{self.file} does not describe a lab (no witness, cores and edges "
                           f"with names and pids); stop any node of that lab by hand (see "
                           f"`ps`), then remove {self.file}")
        assert isinstance(data, dict)
        return data
    def save(self, data: dict[str, Any]) -> None:
        atomic_write(self.file, json.dumps(data, indent=2).encode())
    def nodes(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        """The replication nodes (Witness, Cores, Edges), not the WAN emulator."""
        w = data.get("witness")
        standalone = [w] if w and not w.get("embedded_in") else []
        return [*standalone, *data.get("cores", []), *data.get("edges", [])]
    def processes(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        """Every process of the lab: the WAN emulator of a netns lab and the Journal disks of
        a ``--journal-faults`` lab first, then the nodes."""
        wan = data.get("wan")
        return [*([wan] if isinstance(wan, dict) else []), *data.get("disks", []),
                *data.get("sans", []), *self.nodes(data)]
    def labid(self, data: dict[str, Any] | None = None) -> str:
        """The 6 hex characters in the names of this lab's namespaces."""
        from steelfusion import netns as ns_mod

        lid = (data or {}).get("labid")
        if isinstance(lid, str) and NS_PATTERN.match(f"sf{lid}-"):
            return lid
        return ns_mod.labid_for(self.dir)
    def node(self, data: dict[str, Any], name: str, cmd: str = "") -> dict[str, Any]:
        for n in self.processes(data):
            if n["name"] == name:
                return n
        w = data.get("witness") or {}
        if name == "witness" and w.get("embedded_in"):
            edge = w["embedded_in"]
            raise LabError(f"the Witness runs inside {edge} in this lab (--witness-in-edge); "
                           f"`steelfusion lab {cmd or 'kill'} {edge} --workdir {self.dir}` "
                           f"{cmd or 'kill'}s it with its Edge")
        names = ", ".join(n["name"] for n in self.processes(data))
        raise LabError(f"no node {name!r} in this lab (nodes: {names})")

    # -- up -----------------------------------------------------------------------
    @staticmethod
    def check_options(luns: int = 1, lun_size: int = 1 << 30, edges: int = 1,
                      reserve: int = 256 << 20) -> None:
        """Refuse what no lab can run with, before anything is written or started."""
        if luns < 1:
            raise LabError(f"--luns must be at least 1 (LUNs per Edge), got {luns}")
        if luns > MAX_LUNS_PER_EDGE:
            raise LabError(f"--luns must be at most {MAX_LUNS_PER_EDGE} (an Edge target has "
                           f"SCSI LUNs 0..{MAX_LUNS_PER_EDGE - 1}), got {luns}")
        if edges < 1:
            raise LabError(f"--edges must be at least 1, got {edges}")
        if lun_size <= 0 or lun_size % LUN_BLOCK:
            raise LabError(f"--lun-size must be a positive multiple of 4 KiB (e.g. 64M, 1G), "
                           f"got {lun_size} bytes")
        if reserve < EDGE_RESERVE_MIN:
            raise LabError(f"--reserve must be at least {size_arg(EDGE_RESERVE_MIN)} (room for "
                           f"a few 512 KiB writes in flight), got {format_size(reserve)}")
    def up(self, luns: int = 1, lun_size: int = 1 << 30, edges: int | None = None,
           reserve: int = 256 << 20, host: str = "127.0.0.1",
           timeout: float = 60.0, witness_lease: float = 3.0,
           witness_in_edge: bool = False, *, chap: tuple[str, str] | None = None,
           mutual_chap: tuple[str, str] | None = None,
           initiators: Sequence[str] | None = None,
           discovery_chap: tuple[str, str] | None = None,
           netns: bool = False, journal_faults: bool = False,
           links: Sequence[dict[str, Any]] = (), san: str | None = None,
           observe: bool = True, ha: bool = False) -> dict[str, Any]:
        """Start the lab. ``witness_in_edge`` runs the Witness inside edge-1 (seed: "A role
        assigned to one of the Edges") instead of as its own process.

        ``netns`` (root) puts each site in its own network namespace, joined by the
        WAN emulator (``host`` is then unused: the sites have their own addresses).

        ``links`` (with ``netns``) are the WAN links' settings from the start, each
        ``{"a": SITE, "b": SITE, "delay": s, "jitter": s, "rate": bytes/s, "loss": p,
        "cut": bool, "one_way": bool}``: nodes connect over them, so TCP learns the
        real RTT at once (no settling, as after a later ``lab link``).

        ``san="tgt"`` gives each data center a storage array (a tgtd, lab nodes
        ``san-a``/``san-b``, :mod:`steelfusion.labsan`) holding its Core's LUNs and
        Journal LUN; the Cores reach them over iSCSI.

        ``journal_faults`` (root) serves each Core's Journal LUN through a FUSE
        disk (:mod:`steelfusion.faultdisk`) that :meth:`journal_fault` makes
        fail: out of space, or offline.

        iSCSI security (RFC 7143 §12): ``chap`` (user, secret) makes every Edge
        target require CHAP, ``mutual_chap`` gives the targets credentials for
        mutual CHAP, ``initiators`` is an IQN allow-list for every target and
        ``discovery_chap`` protects discovery sessions.  Secrets go only into
        the 0600 node configs, never into ``lab.json``.

        ``observe`` (on by default) gives every node a Prometheus metrics port and
        each Core and Edge a web console, password in ``console.password`` (0600).

        ``ha`` (loopback only; implies ``san="tgt"``) starts two Core HA pairs instead of
        one Core per data center: core-a1/core-a2 in dc-a, core-b1/core-b2 in dc-b, one
        array per data center, Edges (2 by default) spread over both primaries
        (:mod:`steelfusion.labha`).

        A refusal changes nothing; a failed start stops every node it started,
        restores the lab files it replaced, and raises :class:`LabError` with
        the failing node's own one-line error."""
        if edges is None:
            edges = 2 if ha else 1
        self.check_options(luns, lun_size, edges, reserve)
        if ha:
            labha.check(edges=edges, luns=luns, netns=netns, journal_faults=journal_faults)
            if san is None:
                san = "tgt"
        if links and not netns:
            raise LabError("WAN link settings need a netns lab (--netns): the loopback lab has "
                           "no links between sites")
        if san is not None and san not in labsan.KINDS:
            raise LabError(f"--san {san!r}: the lab's arrays are {', '.join(labsan.KINDS)}")
        if san is not None and journal_faults:
            raise LabError("--journal-faults puts the Journal LUN on a local failing disk; with "
                           "--san it is on the array (`lab kill san-a` is that array's outage): "
                           "choose one")
        if journal_faults:
            why = faultdisk.available()
            if why is not None:
                raise LabError(f"lab up --journal-faults needs root and FUSE: {why}; leave out "
                               "--journal-faults for plain Journal LUN files")
        if netns:
            from steelfusion import netns as ns_mod

            why = ns_mod.available()
            if why is not None:
                raise LabError(f"lab up --netns needs root with network namespaces and "
                               f"/dev/net/tun: {why}; run it as root, or leave out --netns "
                               f"for the loopback lab")
        d = self.dir
        if d.exists() and not d.is_dir():
            raise LabError(f"--workdir {d} is not a directory (give a folder for the lab)")
        if d.exists() and self.file.exists():
            self._check_previous(self.load(), luns, lun_size, edges, journal_faults, ha)
        created = not d.exists()
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LabError(f"cannot create --workdir {d}: {e.strerror or e} (choose another "
                           "folder)") from None
        with self._lock():
            try:
                if self.file.exists():  # again, now that no other `lab up` can start one
                    self._check_previous(self.load(), luns, lun_size, edges, journal_faults,
                                         ha)
                lun_ids = list(range(1, luns * edges + 1))
                self._check_lun_files(lun_ids, lun_size, tuple(labha.SANS) if ha
                                      else ("core-a", "core-b"))
                self._probe(lun_size, "--lun-size", "choose a smaller --lun-size")
                jsize = labha.journal_size(luns, edges) if ha else required_size(len(lun_ids))
                self._probe(jsize, f"the Journal LUN ({format_size(jsize)}: 1 GiB + 2 GiB "
                                   "per LUN)", "use fewer --luns or --edges")
            except LabError:
                if created:  # a refusal leaves no trace, not even the folder
                    with contextlib.suppress(OSError):
                        d.rmdir()
                raise
            if self.file.exists() and not netns and self.load().get("netns"):
                # a netns lab of this folder that crashed (none of its processes runs:
                # checked above) may have left its namespaces; a netns start replaces them
                remove_namespaces(self.labid(self.load()))
            return self._up(luns, lun_size, edges, reserve, host, timeout, witness_lease,
                            witness_in_edge, chap, mutual_chap, initiators, discovery_chap,
                            netns, journal_faults, tuple(links), san, observe, ha)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One ``lab up`` at a time per folder (a lock on the folder itself)."""
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise LabError(f"another `steelfusion lab up` is starting a lab in {self.dir}; "
                               "wait for it") from None
            yield
        finally:
            os.close(fd)
    def _check_previous(self, prev: dict[str, Any], luns: int, lun_size: int,
                        edges: int, journal_faults: bool = False, ha: bool = False) -> None:
        """Refuse to start over a running lab, or over a stopped one of another shape."""
        alive = [n["name"] for n in self.processes(prev) if node_alive(n)]
        if alive:
            raise LabError(f"a lab is already running (or starting) in {self.dir} "
                           f"({', '.join(alive)}); run `steelfusion lab down --workdir "
                           f"{self.dir}` first")
        if bool(prev.get("ha")) != ha and prev.get("cores"):
            # four Cores on shared arrays against two: LUN ids, files and Journal LUNs differ
            flag = "with" if prev.get("ha") else "without"
            raise LabError(f"{self.dir} holds a stopped lab made {flag} --ha; start it again "
                           f"{flag} it, or use another --workdir")
        if bool(prev.get("journal_faults")) != journal_faults and prev.get("cores"):
            # the Journal LUNs live elsewhere with and without it: a Core would start on a
            # blank journal and forget the regions its suspension logged
            flag = "with" if prev.get("journal_faults") else "without"
            raise LabError(f"{self.dir} holds a stopped lab made {flag} --journal-faults; "
                           f"start it again {flag} it, or use another --workdir")
        try:
            was = (len(prev["edges"]), len(prev["edges"][0]["targets"]),
                   int(prev["edges"][0]["targets"][0]["size"]))
        except (LookupError, TypeError, ValueError):
            return  # an up that failed before its Edges: nothing to keep consistent with
        if was != (edges, luns, lun_size):
            raise LabError(f"{self.dir} holds a stopped lab made with --edges {was[0]} --luns "
                           f"{was[1]} --lun-size {size_arg(was[2])}; start it again with those "
                           f"options, or use another --workdir (or delete {self.dir})")
    def _check_lun_files(self, lun_ids: list[int], lun_size: int,
                         dirs: tuple[str, ...] = ("core-a", "core-b")) -> None:
        """LUN files an earlier lab left must have this size (a Core never resizes one)."""
        for name in dirs:
            for lid in lun_ids:
                path = self.dir / name / f"lun-{lid}.img"
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                except OSError as e:
                    raise LabError(f"cannot use {path}: {e.strerror or e}") from None
                if not path.is_file():
                    raise LabError(f"{path} is in the way (not a LUN file); remove it or use "
                                   "another --workdir")
                if st.st_size != lun_size:
                    raise LabError(f"{path} holds a {format_size(st.st_size)} LUN of an earlier "
                                   f"lab; use --lun-size {size_arg(st.st_size)}, or another "
                                   f"--workdir (or delete {self.dir})")
    def _probe(self, size: int, what: str, todo: str) -> None:
        """Can this folder's file system hold a (sparse) file of ``size`` bytes?"""
        probe = self.dir / f".size-probe-{os.getpid()}"
        try:
            fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        except OSError as e:
            if e.errno == errno.EFBIG:
                raise LabError(f"{what} {format_size(size)} does not fit: the file system of "
                               f"{self.dir} cannot hold a file that large (or a file size "
                               f"limit is set: ulimit -f); {todo}") from None
            raise LabError(f"cannot write in {self.dir}: {e.strerror or e}") from None
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
    def _up(self, luns: int, lun_size: int, edges: int, reserve: int, host: str,
            timeout: float, witness_lease: float, witness_in_edge: bool,
            chap: tuple[str, str] | None, mutual_chap: tuple[str, str] | None,
            initiators: Sequence[str] | None,
            discovery_chap: tuple[str, str] | None, netns: bool = False,
            journal_faults: bool = False,
            links: tuple[dict[str, Any], ...] = (), san: str | None = None,
            observe: bool = True, ha: bool = False) -> dict[str, Any]:
        d = self.dir
        # node ports, then metrics and console ports on loopback (issue 15; in a netns lab
        # they are the loopback inside each site's namespace, like the control ports)
        ncores = len(labha.SEATS) if ha else 2
        nports = 2 + (labha.PORTS_PER_LAB if ha else 2 * 2) + 2 * edges
        ports = iter(free_ports(nports, host))
        web = iter(free_ports(1 + 2 * ncores + 2 * edges, "127.0.0.1"))
        password = secrets.token_urlsafe(12)

        def observed(console: bool = True) -> dict[str, Any]:
            """A node's ``[metrics]`` (and ``[console]``) on ports of their own."""
            if not observe:
                return {}
            out: dict[str, Any] = {"metrics": ("127.0.0.1", next(web))}
            if console:
                out.update(console=("127.0.0.1", next(web)), console_password=password)
            return out

        witness = WitnessConfig(name="witness", listen=(host, next(ports)),
                                control=(host, next(ports)), state_dir=str(d / "witness"),
                                lease_seconds=witness_lease, log_file=str(d / "witness.log"),
                                **observed(console=False))
        lun_ids = list(range(1, luns * edges + 1))
        cores: tuple[CoreConfig, ...]
        sans: tuple[list[SanConfig], tuple[CoreConfig, ...]] | None = None
        if ha:  # four Cores and their arrays (steelfusion/labha.py)
            hp = labha.plan(d, luns=luns, lun_size=lun_size, edges=edges, host=host,
                            ports=ports, witness=witness.listen, observed=observed)
            cores, edge_plan, sans = hp.cores, hp.edges, (hp.sans, hp.cores)
        else:
            cores = core_pair_configs(
                d, dict.fromkeys(lun_ids, lun_size), host=host, ports=ports,
                per_core=(observed(), observed()),
                witness=witness.listen, pair="lab-pair",
                # both LUN files are created empty (all zeros) together: already in sync
                initial_sync=False, journal_dir="jdisk" if journal_faults else None)
            edge_plan = [(lun_ids[e * luns:(e + 1) * luns], tuple(c.listen for c in cores))
                         for e in range(edges)]
        edge_cfgs = []
        for e in range(edges):
            name = f"edge-{e + 1}"
            ids, dial = edge_plan[e]
            target = TargetConfig(iqn=f"{IQN_PREFIX}:{name}",
                                  luns=tuple(EdgeLunConfig(k, lid, lun_size)
                                             for k, lid in enumerate(ids)), alias=name,
                                  chap_user=chap[0] if chap else None,
                                  chap_secret=chap[1] if chap else None,
                                  mutual_user=mutual_chap[0] if mutual_chap else None,
                                  mutual_secret=mutual_chap[1] if mutual_chap else None,
                                  initiators=tuple(initiators) if initiators is not None
                                  else None)
            embed = witness_in_edge and e == 0
            edge_cfgs.append(EdgeConfig(
                discovery_chap_user=discovery_chap[0] if discovery_chap else None,
                discovery_chap_secret=discovery_chap[1] if discovery_chap else None,
                name=name, portal=(host, next(ports)), control=(host, next(ports)),
                blockstore=str(d / name / "blockstore"),
                cores=dial, targets=(target,), reserve_bytes=reserve,
                log_file=str(d / f"{name}.log"),
                witness=witness.listen if embed else None,
                witness_state_dir=str(d / "witness") if embed else None, **observed()))
        net: dict[str, Any] | None = None
        if netns:
            assert len(cores) == 2
            net = self._net_plan(links)
            witness, pair, edge_cfgs = netns_configs(witness, (cores[0], cores[1]), edge_cfgs,
                                                      witness_in_edge)
            cores = pair
        if san is not None and sans is None:
            assert len(cores) == 2
            sans = labsan.san_configs(d, (cores[0], cores[1]), host=host,
                                      netns=net is not None)
        if sans is not None:
            cores = sans[1]

        # What this start replaces or creates, to put back if it fails.
        names = ["witness", *(c.name for c in cores), *(e.name for e in edge_cfgs),
                 *(s.name for s in (sans[0] if sans else []))]
        files = [self.file, d / "node.key", d / "wan.json", d / CONSOLE_PASSWORD_FILE,
                 *(d / f"{n}.toml" for n in names)]
        before = {f: read_or_none(f) for f in files}
        new_dirs = [d / n for n in names if not (d / n).exists()]
        started: list[tuple[str, int]] = []
        try:
            atomic_write(d / CONSOLE_PASSWORD_FILE, f"{password}\n".encode(), mode=0o600)
            return self._start(d, witness, cores, edge_cfgs, witness_in_edge, timeout, started,
                               net, journal_faults, sans[0] if sans else None, ha)
        except BaseException as e:
            stopped = stop_pids(started)
            labdisk.unmount_disks(cores)
            if net is not None:
                remove_namespaces(net["labid"])
            for f, content in before.items():
                with contextlib.suppress(OSError):
                    if content is None:
                        f.unlink(missing_ok=True)
                    else:
                        atomic_write(f, content, mode=0o600 if f.suffix != ".json" else 0o644)
            for nd in new_dirs:
                shutil.rmtree(nd, ignore_errors=True)
            for tmp in d.glob(f".*.tmp.{os.getpid()}"):  # an atomic write cut short (^C)
                tmp.unlink(missing_ok=True)
            if isinstance(e, LabError):
                gone = " and removed its network namespaces" if net is not None else ""
                raise LabError(f"lab up failed: {e}; stopped {', '.join(stopped) or 'nothing'}"
                               f"{gone} and left {d} as it was (logs: {d}/*.log)") from None
            raise

    def _start(self, d: Path, witness: WitnessConfig, cores: tuple[CoreConfig, ...],
               edge_cfgs: list[EdgeConfig], witness_in_edge: bool, timeout: float,
               started: list[tuple[str, int]],
               net: dict[str, Any] | None = None,
               journal_faults: bool = False,
               sans: list[SanConfig] | None = None, ha: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {"version": 1, "workdir": str(d), "created": time.time(),
                                "netns": False, "journal_faults": journal_faults,
                                "console_password_file": str(d / CONSOLE_PASSWORD_FILE),
                                **({"ha": True} if ha else {})}

        def where(site: str) -> dict[str, Any]:
            """A node's namespace and site in ``lab.json`` (None on loopback)."""
            if net is None:
                return {"netns": None}
            return {"netns": net["sites"][site]["netns"], "site": site}

        def ns(site: str) -> str | None:
            return net["sites"][site]["netns"] if net is not None else None

        if net is not None:
            self._start_wan(d, net, data, timeout, started)
        # every node proves one shared key to the others (steelfusion/nodeauth.py); a
        # stopped lab started again keeps its key
        key = d / "node.key"
        try:
            read_key_file(key)
        except (OSError, ValueError):
            make_key_file(key)
        auth = {"auth": {"key_file": str(key), "key_id": "lab"}}
        if not witness_in_edge:
            wpath = d / "witness.toml"
            write_toml(wpath, {**witness.to_dict(), **auth})
            wpid = spawn("witness", wpath, d, "witness", ns("witness"))
            started.append(("witness", wpid))
            data["witness"] = {"name": "witness", "pid": wpid,
                               "address": format_addr(witness.listen),
                               "control": format_addr(witness.control or witness.listen),
                               "config": str(wpath), "role": "witness", **where("witness"),
                               **_web(witness)}
            self.save(data)
            wait_control(witness.control or witness.listen, wpid, timeout, "witness", d,
                         ns("witness"))
        if journal_faults:
            labdisk.start_disks(d, cores, data, timeout, started, self.save)
        if sans:
            labsan.start_sans(d, sans, data,
                              {c.name: ns(CORE_SITES.get(c.name, "dc-a")) for c in cores},
                              timeout, started, labha.SANS if ha else None)
            self.save(data)
        data["cores"] = []
        for c in cores:  # all first: an HA Core reads its partner's config when it starts
            write_toml(d / f"{c.name}.toml", {**c.to_dict(), **auth})
        for c in cores:
            path = d / f"{c.name}.toml"
            site = CORE_SITES.get(c.name, "dc-a")
            pid = spawn("core", path, d, c.name, ns(site))
            started.append((c.name, pid))
            data["cores"].append({"name": c.name, "pid": pid, "control": format_addr(c.control),
                                  "listen": format_addr(c.listen), "role": c.role,
                                  "config": str(path), "log": c.log_file,
                                  "luns": {str(lu.id): lu.path for lu in c.luns},
                                  "journal": c.journal_path,
                                  "interfaces": list(c.interfaces), **where(site), **_web(c),
                                  **labha.core_entry(c)})
            self.save(data)
            wait_control(c.control, pid, timeout, c.name, d, ns(site))
        data["edges"] = []
        for ec in edge_cfgs:
            path = d / f"{ec.name}.toml"
            write_toml(path, {**ec.to_dict(), **auth})
            pid = spawn("edge", path, d, ec.name, ns("branch"))
            started.append((ec.name, pid))
            data["edges"].append({
                "name": ec.name, "pid": pid, "portal": format_addr(ec.portal),
                "control": format_addr(ec.control), "config": str(path), "log": ec.log_file,
                "role": "edge", **where("branch"), **_web(ec),
                "targets": [{"iqn": t.iqn, "lun": lu.lun, "lun_id": lu.lun_id, "size": lu.size,
                             "url": f"iscsi://{format_addr(ec.portal)}/{t.iqn}/{lu.lun}"}
                            for t in ec.targets for lu in t.luns]})
            self.save(data)
            wait_control(ec.control, pid, timeout, ec.name, d, ns("branch"))
            if ec.witness:
                data["witness"] = {"name": ec.name, "pid": pid,
                                   "address": format_addr(ec.witness),
                                   "control": format_addr(ec.control), "config": str(path),
                                   "role": "witness", "embedded_in": ec.name,
                                   **where("branch"), "metrics": _web(ec).get("metrics")}
                self.save(data)
        self.wait_ready(data, timeout)
        return data
    def journal_fault(self, core: str, mode: str) -> dict[str, Any]:
        """Make ``core``'s Journal LUN fail (``full``, ``offline``) or work again (``ok``)."""
        data = self.load()
        disk = next((n for n in data.get("disks", []) if n.get("core") == core), None)
        if disk is None:
            cores = [c["name"] for c in data.get("cores", [])]
            if core not in cores:
                raise LabError(f"no Core {core!r} in this lab (Cores: {', '.join(cores)})")
            raise LabError("the Journal LUNs of this lab are plain files: start it with "
                           "`steelfusion lab up --journal-faults` to make them fail")
        if not node_alive(disk):
            raise LabError(f"{disk['name']} (the disk under {core}'s Journal LUN) is not "
                           f"running: `steelfusion lab start {disk['name']} --workdir "
                           f"{self.dir}`")
        try:
            return {"core": core, "disk": disk["name"], **faultdisk.set_mode(disk["mount"], mode)}
        except (OSError, ValueError) as e:
            raise LabError(f"cannot set {disk['name']} to {mode}: {e}") from None
    def san_path(self, core: str, state: str) -> dict[str, Any]:
        """Cut (``cut``) or heal (``ok``) ``core``'s own path to its array (an HA lab:
        steelfusion/sanpath.py); the array and the other Cores' paths are untouched."""
        data = self.load()
        for node in data.get("sans", []):
            cfg = SanConfig.load(node["config"])
            if core in cfg.paths and cfg.path_control is not None:
                if not node_alive(node):
                    raise LabError(f"{node['name']} (the array with {core}'s path) is not "
                                   "running")
                try:
                    out = control.call(cfg.path_control, "path", core=core, state=state)
                except (control.ControlError, OSError) as e:
                    raise LabError(f"{node['name']}: {e}") from None
                if out.get("ok") is False:
                    raise LabError(f"{node['name']}: {out.get('error')}")
                return {"core": core, "array": node["name"], **out["paths"][core]}
        raise LabError(f"no array of this lab has a path for {core!r}: paths exist in "
                       "`lab up --ha` labs, one per Core")

    def wait_ready(self, data: dict[str, Any], timeout: float = 60.0) -> None:
        """Until every Edge is connected to a Core and every primary is replicating (both
        of an HA lab's, core-a1 and core-a2)."""
        deadline = time.monotonic() + timeout
        why = ""
        while time.monotonic() < deadline:
            st = self.status(data)
            down = [n["name"] for n in [*st["cores"], *st["edges"]] if not n.get("running")]
            if down:
                name = down[0]
                raise LabError(f"{name} exited during start-up: {last_error(self.dir, name)}")
            prim = [c for c in st["cores"] if c.get("role") == "primary"]
            edges_ok = all(e.get("core_connected") for e in st["edges"])
            repl_ok = bool(prim) and all(c.get("replication") == "running" for c in prim)
            if edges_ok and repl_ok:
                return
            repl = ", ".join(f"{c['name']} {c.get('replication')}" for c in prim)
            why = f"edges connected: {edges_ok}, replication: {repl or 'no primary'}"
            time.sleep(0.1)
        raise LabError(f"lab not ready after {timeout:.0f}s ({why}); see the logs in {self.dir}")

    # -- status -----------------------------------------------------------------
    def status(self, data: dict[str, Any] | None = None) -> dict[str, Any]:
        data = data or self.load()

        def ask(node: dict[str, Any]) -> dict[str, Any]:
            if not node_alive(node):
                return {"name": node["name"], "running": False, "pid": node["pid"]}
            try:
                reply = call_node(node, "status", timeout=3)
            except (OSError, ValueError, control.ControlError) as e:
                return {"name": node["name"], "running": True, "pid": node["pid"],
                        "error": str(e)}
            reply.pop("ok", None)
            return {"running": True, **reply}

        cores = []
        for c in data.get("cores", []):
            s = ask(c)
            cores.append({"name": c["name"], "pid": c["pid"], "running": s.get("running"),
                          "role": s.get("role", c.get("role")),
                          "replication": s.get("replication",
                                               "no-answer" if s.get("running") else "down"),
                          "epoch": s.get("epoch"), "connections": s.get("connections"),
                          "alarms": s.get("alarms", []), "luns": s.get("luns", {}),
                          "control": c.get("control"), "listen": c.get("listen"),
                          "netns": c.get("netns"), "site": c.get("site"),
                          "interfaces": c.get("interfaces"),
                          "coredr": coredr_command(c),
                          "metrics": c.get("metrics"), "console": c.get("console"),
                          **_ha_status(c, s),
                          **({"error": s["error"]} if "error" in s else {})})
        edges = []
        for e in data.get("edges", []):
            s = ask(e)
            core = s.get("core") or {}
            edges.append({"name": e["name"], "pid": e["pid"], "running": s.get("running"),
                          "uncommitted_bytes": s.get("uncommitted_bytes"),
                          "core_connected": bool(core.get("connected")),
                          "core": core.get("core"), "blockstore": s.get("blockstore"),
                          "portal": e["portal"], "control": e.get("control"),
                          "witness": s.get("witness"), "alarms": s.get("alarms", []),
                          "netns": e.get("netns"), "site": e.get("site"),
                          "metrics": e.get("metrics"), "console": e.get("console"),
                          **({"error": s["error"]} if "error" in s else {})})
        w = data.get("witness")
        witness: dict[str, Any] = {}
        if w and w.get("embedded_in"):
            host = next((e for e in edges if e["name"] == w["embedded_in"]), None)
            inner = (host or {}).get("witness") or {}
            witness = {**inner, "name": "witness", "embedded_in": w["embedded_in"],
                       "pid": w["pid"], "running": bool(host and host["running"] and inner),
                       "address": w.get("address"), "control": w.get("control"),
                       "netns": w.get("netns"), "site": w.get("site"),
                       "metrics": w.get("metrics")}
        elif w:
            witness = {**ask(w), "address": w.get("address"), "control": w.get("control"),
                       "netns": w.get("netns"), "site": w.get("site"),
                       "metrics": w.get("metrics")}
        out = {"workdir": str(self.dir), "netns": bool(data.get("netns")), "witness": witness,
               "cores": cores, "edges": edges, **({"ha": True} if data.get("ha") else {}),
               "console_password_file": data.get("console_password_file")}
        if data.get("netns"):
            out["sites"] = data.get("sites", {})
            out["wan"] = self._wan_status(data)
        if data.get("disks"):
            out["disks"] = [disk_status(n) for n in data["disks"]]
        if data.get("sans"):
            out["sans"] = [labsan.san_status(n) for n in data["sans"]]
        return out

    # -- kill / start / down -------------------------------------------------------
    def kill(self, name: str, sig: int = signal.SIGKILL) -> dict[str, Any]:
        """Signal one node and wait until it is gone; ``killed`` says whether it ran."""
        data = self.load()
        node = self.node(data, name, "kill")
        node["killed"] = node_alive(node)
        if node["killed"]:
            os.kill(node["pid"], sig)
            deadline = time.monotonic() + 10
            while pid_alive(node["pid"]) and time.monotonic() < deadline:
                time.sleep(0.02)
        return node
    def start(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        data = self.load()
        node = self.node(data, name, "start")
        if node_alive(node):
            raise LabError(f"{name} is already running (pid {node['pid']}); `steelfusion lab "
                           f"kill {name} --workdir {self.dir}` first to restart it")
        role = ("core" if node in data["cores"] else "edge" if node in data["edges"]
                else "wan" if node is data.get("wan")
                else "disk" if node in data.get("disks", [])
                else "san" if node in data.get("sans", []) else "witness")
        if data.get("netns"):
            self._check_namespaces(data, f"cannot start {name}")
        node["pid"] = spawn(role, Path(node["config"]), self.dir, name, node.get("netns"))
        w = data.get("witness")
        if w and w.get("embedded_in") == name:
            w["pid"] = node["pid"]
        self.save(data)
        if role == "disk":
            wait_mounted(node, timeout, self.dir)
            return node
        if role == "san":
            labsan.wait_portal(node, timeout, self.dir)
            return node
        wait_control(parse_addr(node["control"]), node["pid"], timeout, name, self.dir,
                     node.get("netns"))
        return node
    def down(self, timeout: float = 15.0) -> list[str]:
        """Stop every node, then the WAN emulator (the Edges flush to the Cores through
        it), then remove the lab's own namespaces."""
        data = self.load()
        # Edges first, so they flush to the Core
        stopped = stop_pids([(n["name"], n["pid"]) for n in self.nodes(data) if node_alive(n)],
                             timeout)
        wan = data.get("wan")
        if isinstance(wan, dict) and node_alive(wan):
            stopped += stop_pids([("wan", wan["pid"])], timeout)
        disks = data.get("disks", [])
        stopped += stop_pids([(n["name"], n["pid"]) for n in [*disks, *data.get("sans", [])]
                              if node_alive(n)], timeout)
        for n in disks:  # one killed earlier left its mount behind
            with contextlib.suppress(OSError):
                faultdisk.unmount(n["mount"])
        if data.get("netns"):
            remove_namespaces(self.labid(data))
        return stopped
    def wait_committed(self, timeout: float = 120.0, edges: list[str] | None = None) -> float:
        """Wait until the Edges hold nothing uncommitted; returns the seconds it took."""
        t0 = time.monotonic()
        while True:
            st = self.status()
            mine = [e for e in st["edges"] if edges is None or e["name"] in edges]
            down = [e["name"] for e in mine if not e["running"]]
            if down:
                raise LabError(f"{', '.join(down)} not running: nothing can commit its writes; "
                               f"`steelfusion lab start {down[0]} --workdir {self.dir}` first")
            # writes, not only bytes: a discard is an uncommitted write of no bytes
            pending = {e["name"]: (e["uncommitted_bytes"], (e.get("blockstore") or {}).get(
                "uncommitted_writes", 0)) for e in mine}
            if all(v == (0, 0) for v in pending.values()):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise LabError(f"still uncommitted after {timeout:.0f}s: {pending}")
            time.sleep(0.05)


def _well_formed(data: Any) -> bool:
    """lab.json as :meth:`Lab.up` writes it: nodes with a name and a pid."""
    if not isinstance(data, dict):
        return False
    nodes = [*data.get("cores", []), *data.get("edges", [])]
    for extra in (data.get("witness"), data.get("wan")):
        if extra is not None:
            nodes.append(extra)
    disks = [*data.get("disks", []), *data.get("sans", [])]
    return (isinstance(data.get("cores", []), list) and isinstance(data.get("edges", []), list)
            and all(isinstance(n, dict) and isinstance(n.get("name"), str)
                    and isinstance(n.get("pid"), int) and isinstance(n.get("control"), str)
                    for n in nodes)
            and isinstance(disks, list)
            and all(isinstance(n, dict) and isinstance(n.get("name"), str)
                    and isinstance(n.get("pid"), int)
                    and isinstance(n.get("mount") or n.get("portal"), str)
                    for n in disks))


def _ha_status(core: dict[str, Any], st: dict[str, Any]) -> dict[str, Any]:
    """An HA Core's part of ``lab status``: its place (from ``lab.json``) and the ``ha``
    section of its own status (None while it has none, or is down)."""
    if not core.get("ha"):
        return {}
    ha = st.get("ha")
    return {"ha_role": core["ha"], "partner": core.get("partner"),
            "datacenter": core.get("datacenter"), "pair": core.get("pair"),
            "takeover_control": core.get("takeover_control"),
            "ha": ha if isinstance(ha, dict) else None}


def _web(cfg: Any) -> dict[str, Any]:
    """A node's metrics and console addresses in ``lab.json`` (HOST:PORT; absent: off)."""
    out = {}
    for key in ("metrics", "console"):
        addr = getattr(cfg, key, None)
        if addr is not None:
            out[key] = format_addr(addr)
    return out


def coredr_command(core: dict[str, Any]) -> str:
    """The coredr command line that reaches this lab Core (from the root namespace)."""
    ns = f" --netns {core['netns']}" if core.get("netns") else ""
    return f"coredr{ns} --core {core.get('control')} status"
