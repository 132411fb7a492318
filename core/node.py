"""The Core process: the asyncio adapter around :class:`core.engine.CoreEngine`.

The engine decides (admission, write streams, mirror, resync, states); this
module gives it sockets (:mod:`steelfusion.link`), backend files
(:mod:`core.lunstore`), the Journal LUN, the Witness client, a clock, the
diallers to the peer, the resync driver, online verify and the control
server for ``coredr``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.engine import CoreEngine
from core.lunstore import AppliedState, LunError, LunStore
from core.metrics import CoreCollector, core_histograms
from core.pipeline import Backend, LunPipeline
from core.ports import LinkKind
from core.replication import Event, Role, State
from core.resync import Progress
from journal.errors import JournalError
from journal.journal import Journal
from steelfusion import authconfig, control, log, metrics, statefile
from steelfusion.blockdev import Device
from steelfusion.config import CoreConfig
from steelfusion.link import Link, dial, listen
from steelfusion.startup import listening, serve_until_stopped
from steelfusion.tasks import Background
from steelfusion.units import format_addr
from steelfusion.wire import Control, Hello, Read

if TYPE_CHECKING:
    from witness.client import WitnessClient

_log = log.get("core")

VERIFY_BATCH = 64  # regions per hash request
JOURNAL_RETRY_S = 5.0  # a failed Journal LUN is tried again this often
STOP_CLOSE_S = 10.0  # seconds a stop waits for the LUNs and the journal to close
CORE_STATE_KIND, CORE_STATE_FORMAT = "core-state", 1  # core-state.json (steelfusion/statefile.py)


def _check_core_state(cfg: CoreConfig, st: dict[str, Any]) -> None:
    """A ``core-state.json`` body that passed its CRC but cannot be this Core's: refuse it."""
    if st.get("role") not in tuple(Role):
        raise ValueError(f"role {st.get('role')!r} is not primary or secondary")
    epoch = st.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise ValueError(f"epoch {epoch!r} is not a whole number")
    if "state" in st:
        try:
            State(st["state"])
        except ValueError:
            raise ValueError(f"replication state {st['state']!r} is unknown") from None
    if "synced" in st and not isinstance(st["synced"], bool):
        raise ValueError(f"synced {st['synced']!r} is not true or false")
    if st.get("name", cfg.name) != cfg.name:
        raise ValueError(f"it belongs to Core {st['name']!r}, not {cfg.name!r} (two Cores "
                         "sharing or copying one state_dir?)")


def _check_ha_change(cfg: CoreConfig, st: dict[str, Any]) -> None:
    """Seed 002: "HA must be set up before configuring replication" and "after you have
    configured replication, you cannot clear the Core HA". A pairing that ran with one HA
    setting refuses to start with another until it is terminated."""
    was = st.get("ha")
    if was is None or was == cfg.ha or st.get("state") in ("terminated", "standalone"):
        return
    where = cfg.source or "the config"
    if cfg.ha == "none":
        raise LunError(f"{where}: Core HA cannot be cleared once replication is configured "
                       f"(this Core paired as ha = {was!r}; seed 002): terminate replication "
                       f"first (coredr terminate), or set [replication] ha = {was!r} again")
    if was == "none":
        raise LunError(f"{where}: Core HA must be set up before replication is configured "
                       "(seed 002): this Core is paired without HA; terminate replication "
                       "(coredr terminate), then configure HA and pair again")
    # leader <-> follower swaps are a reconfiguration of the pair, allowed


class Core(CoreEngine):
    witness: WitnessClient | None

    def __init__(self, cfg: CoreConfig) -> None:
        self.auth = authconfig.load(cfg.source)
        self.state_dir = Path(cfg.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_file = self.state_dir / "core-state.json"
        state = self._load_state(cfg)
        _check_ha_change(cfg, state)
        super().__init__(cfg, state)
        # before applied.state exists: a first start cut short between the two must not look
        # like a Core that lost its core-state.json
        self._save_state()
        self.applied = AppliedState(self.state_dir / "applied.state")
        if self.applied.corrupt_slots:
            self.raise_alarm("applied_state_corrupt", f"{self.applied.corrupt_slots} slot(s) of "
                             "applied.state failed their CRC; resent writes will be re-applied")
        for lc in cfg.luns:
            try:
                store = LunStore(lc.id, lc.path, lc.size)
            except OSError as e:  # name the LUN's path (ftruncate's EFBIG has none)
                raise OSError(e.errno, e.strerror, e.filename or lc.path) from None
            stream, seq = self.applied.get(lc.id)
            self.pipes[lc.id] = LunPipeline.restarted(store, stream, seq)
            store.on_durable(functools.partial(self._on_durable, lc.id))  # called with target
            store.on_failure(functools.partial(self._on_store_failed, lc.id))
            store.seal = functools.partial(self._seal, lc.id)
        if cfg.journal_path:
            self._open_journal()
        self._save_state()
        self.verify_last: dict[str, Any] | None = None
        self._resync_task: asyncio.Task[None] | None = None
        self._resync_wake = asyncio.Event()
        self._rpc_no = 0
        # every background task is held and its failure raised as an alarm (issue 13)
        self._bg = Background(self._task_failed)
        self._tasks: list[asyncio.Task[None]] = []
        self._diallers: list[asyncio.Task[None]] = []
        self._server: asyncio.AbstractServer | None = None
        self._control: asyncio.AbstractServer | None = None
        self._http: list[Any] = []  # metrics and console listeners (steelfusion.metrics)
        self.started = time.time()
        self.stopping = asyncio.Event()
        self._verify_due = time.monotonic() + cfg.verify_interval_s
        self._verify_soon = False  # a resync just finished: check the replica
        self._bg_verify: asyncio.Task[dict[str, Any]] | None = None

    # -- engine hooks ---------------------------------------------------------------------
    def now(self) -> float:
        return time.time()

    def mono(self) -> float:
        return time.monotonic()

    def _persist(self, state: dict[str, Any]) -> None:
        statefile.save(self.state_file, CORE_STATE_KIND, CORE_STATE_FORMAT, state)

    def _task_failed(self, name: str, exc: BaseException) -> None:
        """A background task ended with an exception: say so, it will not run again."""
        self.raise_alarm(f"task_{name}_failed", f"background task {name} stopped: {exc!r}; "
                         "restart the Core (and report the bug with its log)")

    def _release_witness(self) -> None:
        if self.witness is not None:
            self._bg.spawn(self.witness.release(), "witness-release")

    def _later(self, fn: Callable[[], None]) -> None:
        asyncio.get_running_loop().call_soon(fn)

    def _resync_run(self) -> None:
        self._resync_halt()
        self._resync_task = self._bg.spawn(self._resync_loop(), "resync")

    def _resync_halt(self) -> None:
        if self._resync_task is not None:
            self._resync_task.cancel()
            self._resync_task = None

    def _resync_wakeup(self) -> None:
        self._resync_wake.set()

    def _on_hashes(self, link: Any, body: dict[str, Any]) -> None:
        self._bg.spawn(self._answer_hashes(link, body), "answer-hashes")

    def _on_reply(self, link: Any, body: dict[str, Any]) -> None:
        fut = getattr(link, "rpc", {}).pop(body.get("req"), None)
        if fut is not None and not fut.done():
            fut.set_result(body)

    async def _resync_loop(self) -> None:
        """Drive :meth:`CoreEngine.resync_pump` until every journaled region is copied."""
        while True:
            what = self.resync_pump()
            if what == "drain":
                await self.resync_drain.drain()
            elif what == "wait":
                self._resync_wake.clear()
                # asyncio.timeout, not wait_for: a halt (cancel) must never be swallowed
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._resync_wake.wait()
            elif what == "sent":
                await asyncio.sleep(0)
            else:
                j = self.journal  # the Journal LUN may have been reopened meanwhile
                assert j is not None  # a resync runs only with a journal
                await j.commit()
                self._resync_task = None
                self.resync_committed()
                return

    # -- persistent role/state/epoch ------------------------------------------------
    def _load_state(self, cfg: CoreConfig) -> dict[str, Any]:
        """Role, state and epoch as last made durable (``core-state.json``).

        Never a guess: a corrupt file, or a missing one on a primary that has
        run before (``applied.state`` exists), refuses the start (LunError,
        one line for ``steelfusion core run``). Coming back primary at a
        default epoch after a demotion is how split brain starts. A file
        from before the envelope (no magic) is migrated once.
        """
        remedy = ("restore it from a backup, or, only if the peer Core is primary (coredr "
                  "status), move it away and set role = \"secondary\" in "
                  f"{cfg.source or 'the config'}: this Core then takes its epoch from the peer")
        try:
            st = statefile.load(self.state_file, CORE_STATE_KIND, CORE_STATE_FORMAT,
                                remedy=remedy, check=functools.partial(_check_core_state, cfg),
                                legacy=dict)
        except statefile.StateFileError as e:
            raise LunError(str(e)) from None
        if st is not None:
            return st
        applied = self.state_dir / "applied.state"
        if cfg.role == Role.PRIMARY and applied.is_file() and applied.stat().st_size:
            raise LunError(f"{self.state_file}: missing, but {applied.name} shows this Core has "
                           "run before: its role and epoch are lost (it may have been failed "
                           f"over since); {remedy.replace('move it away and ', '')}")
        return {}

    def _journal_open(self) -> Journal:
        path = self.cfg.journal_path
        if path is None:
            raise RuntimeError(f"{self.cfg.name}: _open_journal called without journal_path")
        return Journal.open(path, {lu.id: p.store.size for lu, p in
                                   zip(self.cfg.luns, self.pipes.values(), strict=True)},
                            size=self.cfg.journal_size)

    def _open_journal(self) -> None:
        try:
            self.journal = self._journal_open()
        except (JournalError, ValueError, OSError) as e:
            alarm = getattr(e, "alarm", "journal_error")
            self.raise_alarm(alarm, str(e))
            self.replication_enabled = False
            _log.error("replication_service_not_started", alarm=alarm, reason=str(e))
            return
        self.journal.on_durable(self._on_journal_durable)
        crashed = {lun: int(self.journal.crashed_al_regions(lun).size) for lun in self.pipes}
        if any(crashed.values()):
            self.event("journal_crash_regions", regions=crashed)

    # -- lifecycle ---------------------------------------------------------------
    async def start(self, control_port: bool = True) -> None:
        """Listen, dial, heartbeat. ``control_port`` False: an HA host (:mod:`core.hahost`)
        serves this Core's control port itself, so that it answers while the Core stands by."""
        host, port = self.cfg.listen
        src = self.cfg.source
        self._server = await listening(
            listen(host, port, self._on_message, self._on_close, name="core-listen",
                   ping_interval=self.cfg.ping_interval, dead_after=self.cfg.dead_after,
                   keyring=self.auth.keyring if self.auth else None, local_name=self.name),
            self.cfg.listen, "[core] listen", src)
        if control_port:
            self._control = await listening(control.serve(*self.cfg.control,
                                                          self._control_handlers()),
                                            self.cfg.control, "[core] control", src)
        await metrics.start_http(self.cfg, self._http, lambda: [CoreCollector(self)],
                                 self._console_view, lambda reg: core_histograms(self, reg))
        self._start_diallers()
        if self.cfg.witness:
            from witness.client import WitnessClient

            self.witness = WitnessClient(self.cfg.witness, self.name, self.role, self.cfg.pair,
                                         lambda: self.epoch,
                                         key=self.auth.key if self.auth else None)
            self._tasks.append(self._bg.spawn(self.witness.start(), "witness-client"))
        self._tasks.append(self._bg.spawn(self._housekeeping(), "housekeeping"))
        self._tasks.append(self._bg.spawn(self._verify_loop(), "verify-loop"))
        self.event("core_started", listen=format_addr(self.cfg.listen),
                   control=format_addr(self.cfg.control), luns=sorted(self.pipes),
                   peer=format_addr(self.cfg.peer) if self.cfg.peer else None)

    def _start_diallers(self) -> None:
        if self.cfg.peer and self.replication_enabled and self.rep.state is not State.TERMINATED:
            for i, iface in enumerate(self.cfg.interfaces):
                for j in range(2):  # seed: two TCP replication connections per interface
                    idx = 2 * i + j
                    self._diallers.append(self._bg.spawn(self._peer_dialler(idx, iface),
                                                         f"peer-dialler-{idx}"))

    async def stop(self) -> None:
        for t in [*self._tasks, *self._diallers]:
            t.cancel()
        if self._resync_task is not None:
            self._resync_task.cancel()
        if self.witness is not None:
            with contextlib.suppress(Exception):
                await self.witness.stop()
        for srv in (self._server, self._control):
            if srv is not None:
                srv.close()
        for web in self._http:
            await web.stop()
        for link in [*self.edge_links, *self.peer_out.values(), *self.peer_in, *self.mirror_in]:
            link.close("core stopping")
        clean = not any(p.mirror_q for p in self.pipes.values())
        closers = [p.store.close for p in self.pipes.values()]
        if self.journal is not None:
            closers.append(functools.partial(self.journal.close, clean=clean))
        await self._close_all(closers)
        self.applied.close()
        _log.info("core_stopped")

    async def _close_all(self, closers: list[Callable[[], None]]) -> None:
        """Close the LUN stores and the journal off the event loop, in parallel, giving up
        after ``STOP_CLOSE_S``: a SAN LUN whose path is cut would hold a close (it waits for
        the queued writes) far longer, and an HA Core standing by must keep answering."""
        async def one(fn: Callable[[], None]) -> None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(fn)

        tasks = [asyncio.ensure_future(one(fn)) for fn in closers]
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=STOP_CLOSE_S)
        if late:
            _log.warning("core_stop_close_late", left=len(late), after_s=STOP_CLOSE_S,
                         why="a LUN or the journal did not close (storage unreachable?); "
                             "left to finish in the background")

    async def _housekeeping(self) -> None:
        next_reopen = 0.0
        while True:
            await asyncio.sleep(0.5)
            self.tick()
            self._check_devices()
            j = self.journal
            if j is None:
                continue
            if j.failed is None:
                with contextlib.suppress(Exception):
                    j.refresh_size()
            elif time.monotonic() >= next_reopen:
                next_reopen = time.monotonic() + JOURNAL_RETRY_S
                self._reopen_journal(j)

    def _read_in_worker(self, store: Backend, r: Read,
                        done: Callable[[bytes | OSError], None]) -> None:
        def finished(f: asyncio.Future[bytes]) -> None:
            if f.cancelled():  # the loop is closing
                return
            e = f.exception()
            if e is not None and not isinstance(e, OSError):
                self._task_failed("san-read", e)
                e = OSError(errno.EIO, f"read failed: {e!r}")
            done(e if e is not None else f.result())

        asyncio.get_running_loop().run_in_executor(None, store.pread, r.offset, r.length
                                                   ).add_done_callback(finished)

    def _check_devices(self) -> None:
        """An alarm while a SAN LUN's session is down (issue 12): writes to it wait, unacknowledged."""
        devs = {f"lun_{lun}_storage": (f"LUN id {lun}", p.store.dev) for lun, p in self.pipes.items()}
        if self.journal is not None and self.journal.failed is None:
            devs["journal_storage"] = ("the Journal LUN", self.journal.device)
        for key, (what, dev) in devs.items():
            why = dev.trouble() if dev is not None else None
            if why is None:
                if key in self.alarms:
                    self.clear_alarm(key)
                    self.event("storage_back", what=what)
            elif key not in self.alarms:
                self.raise_alarm(key, f"{what}: {why}; writes to it are held, not acknowledged, "
                                 "until the array answers again")
                self.event("storage_unreachable", what=what, reason=why)

    def _reopen_journal(self, old: Journal) -> None:
        """Try the failed Journal LUN again: space freed, the path back, the LUN grown back.

        The old descriptor is let go first (its lock would refuse the new
        one). On success the engine takes the new journal over
        (:meth:`CoreEngine.replace_journal`); on failure the alarm stays and
        the next try is ``JOURNAL_RETRY_S`` later.
        """
        old.abandon()
        try:
            new = self._journal_open()
        except (JournalError, ValueError, OSError) as e:
            alarm = getattr(e, "alarm", "journal_error")
            self.raise_alarm(alarm, f"{e} (retried every {JOURNAL_RETRY_S:.0f} s)")
            _log.warning("journal_reopen_failed", alarm=alarm, error=str(e))
            return
        self.replace_journal(new)

    def _seal(self, lun: int, target: int) -> functools.partial[None] | None:
        """A group commit of ``lun`` starts: persist its applied seq right after the data.

        Every write issued so far is covered by ``target``, so the newest one
        is what becomes durable; its slot is synced before anything is
        acknowledged (:mod:`core.lunstore`), so this Core never forgets a write
        it acknowledged and never takes a resend for a gap.
        """
        seq = self.pipes[lun].sealed_seq()
        return None if seq is None else self.applied.sealer(lun, self.pipes[lun].stream, seq)

    # -- verify ------------------------------------------------------------------------
    async def _rpc(self, link: Link, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        if not hasattr(link, "rpc"):
            link.rpc = {}  # type: ignore[attr-defined]
        self._rpc_no += 1
        req = self._rpc_no
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        link.rpc[req] = fut  # type: ignore[attr-defined]
        link.send(Control({**body, "req": req}))
        async with asyncio.timeout(timeout):
            return await fut

    @staticmethod
    def _hash_regions(dev: Device, size: int, rb: int, start: int, count: int) -> bytes:
        """Region digests, read in a worker thread (a file or a SAN LUN: both block)."""
        out = bytearray()
        for r in range(start, start + count):
            base = r * rb
            if base >= size:
                break
            data = dev.pread(min(rb, size - base), base)
            out += hashlib.blake2b(data, digest_size=16).digest()
        return bytes(out)

    async def _answer_hashes(self, link: Link, body: dict[str, Any]) -> None:
        p = self.pipes.get(body.get("lun"))  # type: ignore[arg-type]
        rb, start, count = body.get("region_bytes"), body.get("start"), body.get("count")
        if p is None or not isinstance(rb, int) or not isinstance(start, int) \
                or not isinstance(count, int) or min(rb, start, count) < 0 \
                or not rb or count > 4096:
            link.send(Control({"op": "reply", "req": body.get("req"), "error": "bad request"}))
            return
        digests = await asyncio.get_running_loop().run_in_executor(
            None, self._hash_regions, p.store.dev, p.store.size, rb, start, count)
        link.send(Control({"op": "reply", "req": body.get("req"), "digests": digests.hex()}))

    def resync_committed(self) -> None:
        super().resync_committed()
        self._verify_soon = True

    async def _verify_loop(self) -> None:
        """Online verify, periodically and after every resync (DESIGN invariant 6).

        Rate-limited and off the write path; a region that differs is hashed
        again once the mirror queue has caught up with what was applied when
        it was first hashed (writes in flight make regions differ for a
        moment), and only a difference that persists raises an alarm.
        """
        while True:
            await asyncio.sleep(1.0)
            due = self._verify_soon or time.monotonic() >= self._verify_due
            if not due or (self.verify_last or {}).get("running"):
                continue
            if self.role != Role.PRIMARY or self.rep.state is not State.RUNNING \
                    or not self.mirror_links:
                continue
            self._verify_soon = False
            self._verify_due = time.monotonic() + self.cfg.verify_interval_s
            bg = self._bg_verify = asyncio.create_task(self.verify(False, background=True))
            await asyncio.wait({bg})  # not cancelled with it: an operator's verify may stop it
            self._bg_verify = None
            if bg.cancelled():
                self.event("verify_skipped", reason="an operator's verify took over")
                continue
            e = bg.exception()
            if isinstance(e, control.ControlError | TimeoutError | OSError | ConnectionError):
                self.event("verify_skipped", reason=str(e))
            elif e is not None:  # never let the checker die silently
                _log.error("verify_failed", error=repr(e))

    async def _peer_hashes(self, lun: int, rb: int, start: int, count: int) -> np.ndarray:
        links = self.mirror_links
        if not links:
            raise control.ControlError("the secondary went away during verify: run it again "
                                       "when it is back", "peer-unreachable")
        try:
            theirs = await self._rpc(links[0], {"op": "hashes", "lun": lun, "region_bytes": rb,
                                                "start": start, "count": count})
        except TimeoutError:
            raise control.ControlError(f"the secondary did not answer for LUN id {lun}'s hashes "
                                       "within 60 s: verify stopped", "peer-unreachable") from None
        if "digests" not in theirs:
            raise control.ControlError(f"the secondary could not hash LUN id {lun}: "
                                       f"{theirs.get('error', theirs)}", "peer-error")
        return np.frombuffer(bytes.fromhex(theirs["digests"]), dtype=np.uint8).reshape(-1, 16)

    async def _still_differ(self, lun: int, p: Any, rb: int, regions: list[int]) -> list[int]:
        """Hash ``regions`` again on both sides once the peer has caught up; those that differ."""
        loop = asyncio.get_running_loop()
        for _ in range(3):
            target = p.applied_seq
            for _ in range(100):  # up to 10 s for the mirror queue to reach ``target``
                if p.mirror_acked >= target or self.rep.state is not State.RUNNING:
                    break
                await asyncio.sleep(0.1)
            left = []
            for r in regions:
                mine = await loop.run_in_executor(None, self._hash_regions, p.store.dev,
                                                  p.store.size, rb, r, 1)
                theirs = await self._peer_hashes(lun, rb, r, 1)
                if mine[:16] != theirs[:1].tobytes():  # one 16-byte digest each
                    left.append(r)
            regions = left
            if not regions:
                break
        return regions

    async def verify(self, repair: bool, background: bool = False) -> dict[str, Any]:
        """Compare every region's hash here and on the peer (DESIGN invariant 4)."""
        if self.role != Role.PRIMARY:
            raise control.ControlError("verify runs on the primary Core; this Core is secondary",
                                       "wrong-role")
        if (self.verify_last or {}).get("running"):
            bg = self._bg_verify
            if background or bg is None or bg.done():
                raise control.ControlError("an operator's verify is already running on this "
                                           "Core: wait for it to finish", "busy")
            bg.cancel()  # the operator's verify replaces the background one
            await asyncio.wait({bg})
        links = self.mirror_links
        if not links:
            raise control.ControlError("the secondary is not connected: nothing to compare with "
                                       "(`coredr status` shows the replication connections)",
                                       "peer-unreachable")
        loop = asyncio.get_running_loop()
        rb = self.journal.region_bytes(next(iter(self.pipes))) if self.journal else 1 << 20
        report: dict[str, Any] = {"region_bytes": rb, "luns": {}, "started": time.time()}
        prog = Progress(total=sum(p.store.size for p in self.pipes.values()),
                        started=time.monotonic())
        self.verify_last = {"running": True, "progress": prog}
        try:
            return await self._verify(repair, background, report, prog, rb, loop)
        except BaseException as e:
            self.verify_last = {"running": False, "report": None, "error": str(e)}
            raise

    async def _verify(self, repair: bool, background: bool, report: dict[str, Any],
                      prog: Progress, rb: int, loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        for lun, p in self.pipes.items():
            nreg = (p.store.size + rb - 1) // rb
            mism: list[int] = []
            for start in range(0, nreg, VERIFY_BATCH):
                count = min(VERIFY_BATCH, nreg - start)
                mine_f = loop.run_in_executor(None, self._hash_regions, p.store.dev, p.store.size,
                                              rb, start, count)
                try:
                    b = await self._peer_hashes(lun, rb, start, count)
                finally:
                    mine = await mine_f
                a = np.frombuffer(mine, dtype=np.uint8).reshape(-1, 16)
                n = min(len(a), len(b))
                diff = np.flatnonzero((a[:n] != b[:n]).any(axis=1)) + start
                mism.extend(int(x) for x in diff)
                done = min(count * rb, p.store.size - start * rb)
                prog.done += done
                if background:  # stay under verify_rate_bytes
                    ahead = prog.done / self.cfg.verify_rate_bytes - (time.monotonic()
                                                                      - prog.started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
            if background and mism:
                mism = await self._still_differ(lun, p, rb, mism)
                key = f"lun_{lun}_replica_mismatch"
                if mism:
                    self.raise_alarm(key, f"online verify: LUN id {lun}'s replica differs in "
                                     f"{len(mism)} region(s) of {rb} bytes (first: {mism[:8]}); "
                                     "run `coredr verify --repair` to resync them")
                else:
                    self.clear_alarm(key)
            elif background:
                self.clear_alarm(f"lun_{lun}_replica_mismatch")
            report["luns"][str(lun)] = {"regions": nreg, "mismatched": len(mism),
                                        "mismatched_regions": mism[:1000]}
            if repair and mism and self.journal is not None:
                for r in mism:
                    self.journal.mark_dirty(lun, r * rb, min(rb, p.store.size - r * rb))
                await self.journal.commit()
        report["identical"] = all(v["mismatched"] == 0 for v in report["luns"].values())
        report["elapsed_s"] = round(time.monotonic() - prog.started, 2)
        self.verify_last = {"running": False, "report": report}
        self.event("verify_done", identical=report["identical"], background=background,
                   mismatched={k: v["mismatched"] for k, v in report["luns"].items()})
        if repair and not report["identical"] and self.rep.state is State.RUNNING:
            self._fire(Event.RESYNC_NEEDED)
            report["repair"] = "mismatched regions queued for resync"
        return report

    # -- outbound connections -------------------------------------------------------
    async def _peer_dialler(self, idx: int, iface: str) -> None:
        assert self.cfg.peer is not None
        # the peer, then where its HA partner serves it after a takeover (Core HA, issue 16)
        addrs = [self.cfg.peer, *self.cfg.peer_alternates]
        turn = 0
        backoff = 0.2
        while True:
            host, port = addrs[turn % len(addrs)]
            hello = Hello(self.name, self.role, "replication", self.epoch,
                          {lun: p.store.size for lun, p in self.pipes.items()},
                          {"interface": iface, "index": idx, "state": self.rep.state.value,
                           "ha": self.cfg.ha, "pair": self.cfg.pair})
            try:
                link = await dial(host, port, hello, self._on_message, self._on_close,
                                  name=f"repl-{idx}", local_addr=(iface, 0),
                                  ping_interval=self.cfg.ping_interval,
                                  dead_after=self.cfg.dead_after,
                                  key=self.auth.key if self.auth else None)
            except (TimeoutError, OSError) as e:
                _log.debug("peer_dial_failed", peer=format_addr((host, port)), error=str(e))
                turn += 1
                if turn % len(addrs) == 0:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                continue
            link.ctx = LinkKind.PEER_OUT
            self.peer_out[idx] = link
            await link.closed.wait()
            self.peer_out.pop(idx, None)
            if link.close_reason.startswith("refused"):
                turn += 1  # e.g. an HA partner's takeover address that no longer serves it
                await asyncio.sleep(1.0)
            backoff = 0.2
            await asyncio.sleep(0.1)

    # -- operator commands ----------------------------------------------------------------
    async def cmd_suspend(self) -> dict[str, Any]:
        already = self.suspend_check()
        if already is not None:
            return already
        assert self.witness is not None  # suspend_check refuses without one
        return self.suspend_decided(await self.witness.request_suspend())

    async def cmd_resume(self) -> dict[str, Any]:
        self.resume_check()
        if self.rep.state is State.SUSPENDED and not self.mirror_links:
            for _ in range(30):  # the links may be coming up right now
                await asyncio.sleep(0.1)
                if self.mirror_links:
                    break
        return self.resume_apply()

    async def cmd_failover(self, force: bool) -> dict[str, Any]:
        self.failover_begin(force)
        d = None
        try:
            if self.witness is not None:
                # no name yet (the peer never connected) is sent as none: the client's
                # _decision takes ``str | None``
                d = await self.witness.request_failover(
                    self.peer_info.get("name"))  # type: ignore[arg-type]
        finally:
            self.failover_pending = False
        return self.failover_decided(d, force)

    async def cmd_terminate(self) -> dict[str, Any]:
        out = self.terminate_apply()
        for t in self._diallers:
            t.cancel()
        self._diallers.clear()
        if self.witness is not None:
            with contextlib.suppress(Exception):
                await self.witness.terminate()
        return out

    # -- status ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        def linfo(lk: Link, direction: str) -> dict[str, Any]:
            return {"direction": direction, "peer": lk.peer, "local": lk.local, "name": lk.name,
                    "node": (lk.hello.node if lk.hello else (lk.welcome.node if lk.welcome else None)),
                    "established": lk.established, "rtt_ms": (round(lk.machine.rtt * 1000, 3)
                                                              if lk.machine.rtt is not None else None),
                    "bytes_in": lk.bytes_in, "bytes_out": lk.bytes_out}

        repl = [linfo(lk, "out") for lk in self.peer_out.values()]
        repl += [linfo(lk, "in") for lk in [*self.mirror_in, *self.peer_in]]
        # seed: two replication connections per interface; per interface, what this Core
        # dialled and holds (the peer's own dial-ins are counted on the peer)
        per_iface = {iface: {"established": sum(
            1 for lk in self.peer_out.values()
            if lk.established and lk.local.rsplit(":", 1)[0] == iface),
            "expected": 2 if self.cfg.peer and self.replication_enabled else 0}
            for iface in self.cfg.interfaces}
        j = self.journal
        resync = None
        if self.rep.state is State.RESYNCING or (self._resync_task is not None):
            resync = self.resync.view(self.mono())
        w = self.witness
        return {
            "kind": "core",  # which node's control port this is (coredr checks it)
            "name": self.name, "role": self.role, "epoch": self.epoch,
            "replication": self.replication, "pid": os.getpid(),
            "peer": {"address": format_addr(self.cfg.peer) if self.cfg.peer else None,
                     "synced": self.peer_synced, **self.peer_info},
            "connections": {
                "edges": [linfo(lk, "in") for lk in self.edge_links],
                "replication": repl,
                "replication_expected_out": (2 * len(self.cfg.interfaces)
                                             if self.cfg.peer and self.replication_enabled else 0),
                "replication_interfaces": per_iface,
                "witness": bool(w is not None and w.connected),
            },
            "witness": None if w is None else {
                "connected": w.connected, "lease_valid": w.lease_valid(),
                "pair": self.cfg.pair, "pair_epoch": w.pair_epoch, "holds": w.holds,
                "holder": w.holder, "client_alive": w.alive, "attempts": w.attempts,
                "errors": w.errors, "last_error": w.last_error},
            "journal": None if j is None else self._journal_summary(j),
            "resync": resync,
            "luns": {str(lun): {"path": p.store.path, "size": p.store.size, "stream": p.stream,
                                "applied_seq": p.applied_seq, "durable_seq": p.durable_seq,
                                "acked_seq": p.acked_seq, "mirror_acked_seq": p.mirror_acked,
                                "mirror_queue_bytes": p.mirror_bytes, "writes": p.writes,
                                "bytes_written": p.bytes_written, "gated_writes": len(p.gate),
                                "received_seq": p.received_seq, "hole": p.hole,
                                "io_errors": p.store.io_errors, "failed": p.failed,
                                "allocated_bytes": p.store.allocated(),
                                "discards": p.discards, "bytes_discarded": p.bytes_discarded,
                                "edge": (p.upstream.hello.node if p.upstream is not None
                                         and p.upstream.hello is not None and p.upstream.ctx == LinkKind.EDGE
                                         else None)}
                     for lun, p in self.pipes.items()},
            "alarms": list(self.alarms.values()),
            "uptime_s": round(time.time() - self.started, 1),
        }

    def _journal_summary(self, j: Any) -> dict[str, Any]:
        u = j.usage()
        return {"path": str(j.path), "size": u["size"], "used_log_bytes": u["used_log_bytes"],
                "dirty_bytes": {str(lun): j.dirty_bytes(lun) for lun in self.pipes},
                "al_regions": u["al_regions"]}

    def _console_view(self) -> Any:
        """The console's view of this Core: its status, events and the coredr commands."""
        from steelfusion.console import NodeView

        return NodeView("core", self.name, self.status,
                        lambda since: [e for e in self.events if e["n"] > since],
                        self._control_handlers(),
                        ("suspend", "resume", "failover", "terminate"))

    def _control_handlers(self) -> dict[str, control.Handler]:
        async def status(_: dict[str, Any]) -> dict[str, Any]:
            return self.status()

        async def alarms(_: dict[str, Any]) -> dict[str, Any]:
            return {"alarms": list(self.alarms.values())}

        async def suspend(_: dict[str, Any]) -> dict[str, Any]:
            return await self.cmd_suspend()

        async def resume(_: dict[str, Any]) -> dict[str, Any]:
            return await self.cmd_resume()

        async def failover(req: dict[str, Any]) -> dict[str, Any]:
            return await self.cmd_failover(bool(req.get("force")))

        async def terminate(_: dict[str, Any]) -> dict[str, Any]:
            return await self.cmd_terminate()

        async def journal(_: dict[str, Any]) -> dict[str, Any]:
            if self.journal is None:
                raise control.ControlError(
                    ("this Core's Journal LUN is not open (see `coredr alarms`)"
                     if self.cfg.journal_path else
                     "this Core has no Journal LUN configured ([journal] path in its config)"),
                    "no-journal")
            return {"journal": self.journal.usage()}

        async def verify(req: dict[str, Any]) -> dict[str, Any]:
            return await self.verify(bool(req.get("repair")))

        async def verify_status(_: dict[str, Any]) -> dict[str, Any]:
            v = self.verify_last or {}
            out = {"running": v.get("running", False), "report": v.get("report")}
            if v.get("progress") is not None and v.get("running"):
                out["progress"] = v["progress"].view(self.mono())
            return out

        async def events(req: dict[str, Any]) -> dict[str, Any]:
            since = req.get("since", 0)
            return {"events": [e for e in self.events if e["n"] > since]}

        async def stop(_: dict[str, Any]) -> dict[str, Any]:
            asyncio.get_running_loop().call_later(0.05, self.stopping.set)
            return {"stopping": True}

        return {"status": status, "alarms": alarms, "suspend": suspend, "resume": resume,
                "failover": failover, "terminate": terminate, "journal": journal,
                "verify": verify, "verify_status": verify_status, "events": events, "stop": stop}



async def run(cfg: CoreConfig) -> None:
    """``steelfusion core run``; a failed start stops whatever it had started, then raises."""
    from steelfusion import sandev

    sandev.route_through(cfg.san_via)
    core = Core(cfg)
    await serve_until_stopped(core)


__all__ = ["Core", "run"]
