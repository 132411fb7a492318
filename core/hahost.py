"""A Core of an HA pair: its own Core, the HA link to its partner, fencing, takeover and
handback (issue 16; seed 002, "FusionSync and Core HA"). The decisions are
:class:`core.ha.HaState`'s; this module carries them out.

* **Own Core.** The Core this config describes (:class:`core.node.Core`), started when
  :class:`~core.ha.HaState` says so and stopped when it stands by. The host serves its
  control port, so ``coredr`` is answered in every mode.
* **HA link.** Each Core dials its partner's ``[ha] listen`` and sends a heartbeat every
  ``ping_interval`` (mode, whether it serves the partner's LUNs, whether its storage
  answers); the partner's heartbeats arrive on the link it dialled. Operator commands the
  leader forwards, and ``taken-over`` / ``handback``, are requests with replies on it.
* **Fencing** (:mod:`steelfusion.fence`). At start the host opens one session of its own on
  every shared LUN of the pair (both Cores' LUNs and the Journal LUN) and registers its key
  there; the leader also reserves (WRITE EXCLUSIVE - REGISTRANTS ONLY). Every session the
  Cores then open registers too (:func:`steelfusion.sandev.register_new_sessions`). Before a
  takeover the host first writes a marker into the partner's ``state_dir``
  (``ha-fenced.json``: a restarted partner reads it and stands by), then PREEMPTs the
  partner's key on every shared LUN, so a partner that is only cut off can write no more.
* **Takeover.** The partner's Core runs inside this process from the partner's config, on
  ``[ha] takeover_listen`` and ``takeover_control``: it serves the partner's LUNs to the
  partner's Edges (their ``cores`` list that address) and replicates them to the partner's
  peer (which lists it in ``peer_alternates``). Its state is the partner's ``state_dir``,
  which both Cores reach (the seed keeps it on the shared array; the lab on one disk).
* **Leader-only commands.** Suspend, resume, failover and terminate are accepted only on
  the acting leader and run on every Core of the pair: here, the partner's Core if this
  host runs it, and the partner through the HA link.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any

from core.ha import Action, HaState, Mode, PartnerView
from core.node import Core
from steelfusion import authconfig, control, log, sandev, statefile
from steelfusion.blockdev import parse_part
from steelfusion.config import ConfigError, CoreConfig
from steelfusion.fence import Fence, Fenced, FenceError, reservation_key
from steelfusion.link import Link, dial, listen
from steelfusion.startup import listening, serve_until_stopped
from steelfusion.tasks import Background
from steelfusion.units import format_addr
from steelfusion.wire import Control, Hello, Message, Refuse, Welcome

_log = log.get("ha")

MARKER = "ha-fenced.json"
MARKER_KIND, MARKER_FORMAT = "ha-fenced", 1
LEADER_COMMANDS = ("suspend", "resume", "failover", "terminate")
AGAIN_LATER = frozenset({"witness-lease-live", "peer-reachable"})  # refusals time lifts
HEALTH_EVERY = 1.0  # seconds between looks at the shared LUNs' reservations
HEALTH_TIMEOUT = 3.0  # a READ KEYS unanswered this long: the array is unreachable


def san_base(path: str) -> str:
    """The LUN a path names, without a ``#part=K/N`` suffix (the shared Journal LUN)."""
    return parse_part(path)[0]


def partner_config(cfg: CoreConfig) -> CoreConfig:
    """The partner's config, checked against ours (seed: HA Cores share the replication
    role and the data center name; one is the leader, the other the follower)."""
    assert cfg.ha_partner_config is not None
    p = CoreConfig.load(cfg.ha_partner_config)
    where = f"{cfg.source}: [ha] partner_config {cfg.ha_partner_config}"
    if p.name != cfg.ha_partner:
        raise ConfigError(f"{where} is Core {p.name!r}, but [ha] partner is {cfg.ha_partner!r}")
    if p.ha_partner != cfg.name:
        raise ConfigError(f"{where}: its [ha] partner is {p.ha_partner!r}, not this Core "
                          f"({cfg.name!r}); the two configs must name each other")
    if {p.ha, cfg.ha} != {"leader", "follower"}:
        raise ConfigError(f"{where}: both Cores are ha = {cfg.ha!r}; one must be the leader "
                          "and the other the follower")
    if p.role != cfg.role or p.ha_datacenter != cfg.ha_datacenter:
        raise ConfigError(f"{where}: Cores of an HA pair must have the same replication role "
                          f"and data center (this Core: {cfg.role} in {cfg.ha_datacenter}, "
                          f"{p.name}: {p.role} in {p.ha_datacenter}) (seed 002)")
    return p


class HaHost:
    """One HA Core process (see the module docstring)."""

    def __init__(self, cfg: CoreConfig) -> None:
        self.cfg = cfg
        self.pcfg = partner_config(cfg)
        self.name, self.partner = cfg.name, self.pcfg.name
        self.auth = authconfig.load(cfg.source)
        self.ha = HaState(self.name, self.partner, leader=cfg.ha == "leader",
                          grace=cfg.ha_takeover_grace, start_wait=2 * cfg.dead_after,
                          now=time.monotonic())
        self.key = reservation_key(self.name)
        self.own: Core | None = None
        self.hosted: Core | None = None
        self.fence: Fence | None = None
        self.out: Link | None = None
        self.ins: set[Link] = set()
        self.alarms: dict[str, dict[str, Any]] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=2000)
        self._ev_no = 0
        self._n = itertools.count(1)
        self._rpc: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._bg = Background(lambda name, e: self.alarm(
            f"task_{name}_failed", f"HA task {name} stopped: {e!r}; restart this Core"))
        self._tasks: list[asyncio.Task[None]] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._busy = asyncio.Lock()  # one start/stop/takeover at a time
        self._health_at = 0.0
        self._health: asyncio.Task[None] | None = None
        self._keys: asyncio.Future[tuple[int, list[int]]] | None = None
        self._keys_at = 0.0
        self._retry_at = 0.0  # a failed start of the own Core is tried again from then
        self._takeover_at = 0.0  # likewise a failed takeover
        self._held: list[socket.socket] = []  # the takeover ports, bound while unused
        self.stopping = asyncio.Event()

    # -- alarms and events -------------------------------------------------------------
    def alarm(self, key: str, message: str) -> None:
        if self.alarms.get(key, {}).get("message") != message:
            self.alarms[key] = {"alarm": key, "message": message, "since": time.time()}
            _log.warning("ha_alarm", key=key, message=message)

    def clear(self, key: str) -> None:
        if self.alarms.pop(key, None) is not None:
            _log.info("ha_alarm_cleared", key=key)

    def event(self, name: str, **kv: Any) -> None:
        self._keep({"time": time.time(), "event": name, "node": self.name, **kv})
        _log.info(name, core=self.name, **kv)

    def _keep(self, ev: dict[str, Any]) -> None:
        """One numbered stream for ``coredr events``: the host's own events and those of
        every Core it runs (each restarted Core would count from 1 again)."""
        self._ev_no += 1
        self.events.append({**ev, "n": self._ev_no})

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        src = self.cfg.source
        self._servers.append(await listening(
            control.serve(*self.cfg.control, self._handlers()), self.cfg.control,
            "[core] control", src))
        assert self.cfg.ha_listen is not None
        self._servers.append(await listening(
            listen(*self.cfg.ha_listen, self._on_message, self._on_close, name="ha-listen",
                   ping_interval=self.cfg.ping_interval, dead_after=self.cfg.dead_after,
                   keyring=self.auth.keyring if self.auth else None, local_name=self.name),
            self.cfg.ha_listen, "[ha] listen", src))
        paths = sorted({san_base(p) for c in (self.cfg, self.pcfg)
                        for p in [*(lu.path for lu in c.luns), c.journal_path or ""] if p})
        self.fence = Fence(self.name, await asyncio.to_thread(self._open_all, paths),
                           names=[self.partner])
        marker = self._marker(self.cfg)
        if marker is not None:
            self.ha.mode = Mode.STANDBY
            self.ha.why = (f"fenced by {marker.get('by')} ({marker.get('why')}); waiting for "
                           "it to hand this Core's LUNs back")
            self.alarm("ha_standby", self.ha.why)
        self._hold_takeover_ports()
        self._tasks.append(self._bg.spawn(self._dialler(), "ha-dialler"))
        self._tasks.append(self._bg.spawn(self._ticker(), "ha-ticker"))
        self.event("ha_started", partner=self.partner, leader=self.ha.leader,
                   mode=self.ha.mode.value, shared_luns=len(paths))

    def _hold_takeover_ports(self) -> None:
        """Bind the takeover addresses now, without listening: an outgoing connection's
        ephemeral port can then never take them before a takeover needs them (a bound port
        is skipped by connect's port choice); released right before the partner's Core
        binds them, taken again once it has stopped."""
        for addr in (self.cfg.ha_takeover_listen, self.cfg.ha_takeover_control):
            assert addr is not None
            s = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as e:
                s.close()
                self.alarm("ha_takeover_port", f"{format_addr(addr)} ([ha] takeover address) "
                           f"is in use by another process: {e.strerror}; a takeover would "
                           "fail until it is free")
                continue
            self._held.append(s)

    def _release_takeover_ports(self) -> None:
        for s in self._held:
            s.close()
        self._held.clear()

    @staticmethod
    def _open_all(paths: list[str]) -> list[sandev.IscsiDevice]:
        out = []
        try:
            for p in paths:
                out.append(sandev.IscsiDevice.open(p))
        except BaseException:
            for d in out:
                with contextlib.suppress(Exception):
                    d.close()
            raise
        return out

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for srv in self._servers:
            srv.close()
        for lk in [*self.ins, *([self.out] if self.out else [])]:
            lk.close("core stopping")
        for core in (self.hosted, self.own):
            if core is not None:
                with contextlib.suppress(Exception):
                    await core.stop()
        self._release_takeover_ports()
        if self.fence is not None:
            for d in self.fence.devices:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(d.close)  # type: ignore[attr-defined]
        _log.info("ha_stopped")

    # -- the marker in a state_dir -----------------------------------------------------
    @staticmethod
    def _marker(c: CoreConfig) -> dict[str, Any] | None:
        return statefile.load(Path(c.state_dir) / MARKER, MARKER_KIND, MARKER_FORMAT,
                              remedy="remove it only if the partner Core is down for good")

    def _set_marker(self, why: str) -> None:
        statefile.save(Path(self.pcfg.state_dir) / MARKER, MARKER_KIND, MARKER_FORMAT,
                       {"by": self.name, "why": why, "at": time.time()})

    @staticmethod
    def _drop_marker(c: CoreConfig) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(Path(c.state_dir) / MARKER)

    # -- HA link -----------------------------------------------------------------------
    def _beat(self) -> dict[str, Any]:
        return {"op": "ha", "name": self.name, "mode": self.ha.mode.value,
                "hosting": self.ha.hosting, "storage_ok": self.ha.storage_ok,
                "role": self.own.role if self.own is not None else self.cfg.role,
                "datacenter": self.cfg.ha_datacenter, "ha": self.cfg.ha}

    async def _dialler(self) -> None:
        assert self.cfg.ha_partner_address is not None
        host, port = self.cfg.ha_partner_address
        while True:
            hello = Hello(self.name, self.cfg.role, "ha", 0, {},
                          {"ha": self.cfg.ha, "datacenter": self.cfg.ha_datacenter})
            try:
                link = await dial(host, port, hello, self._on_message, self._on_close,
                                  name="ha-out", ping_interval=self.cfg.ping_interval,
                                  dead_after=self.cfg.dead_after,
                                  key=self.auth.key if self.auth else None)
            except (TimeoutError, OSError):
                await asyncio.sleep(0.5)
                continue
            self.out = link
            await link.closed.wait()
            if self.out is link:
                self.out = None
            await asyncio.sleep(5.0 if link.close_reason.startswith("refused") else 0.5)

    def _links(self) -> list[Link]:
        return [lk for lk in [*self.ins, self.out] if lk is not None and lk.established]

    def _on_close(self, link: Link, exc: BaseException | None) -> None:
        _log.info("ha_link_closed", link=link.name, peer=link.peer,
                  reason=link.close_reason or (str(exc) if exc else "closed by the partner"))
        self.ins.discard(link)
        if link is self.out:
            self.out = None
        if not self._links():
            for fut in list(self._rpc.values()):
                if not fut.done():
                    fut.set_exception(ConnectionError(f"the HA link to {self.partner} closed"))
        if not self._links() and self.ha.seen is not None:
            # both directions gone (a killed partner's sockets close at once): count the
            # grace from now, not from the heartbeat timeout
            self.ha.partner_lost(time.monotonic())
            self.event("ha_partner_lost", partner=self.partner, reason=link.close_reason)

    def _on_message(self, link: Link, msg: Message) -> None:
        if isinstance(msg, Hello):
            if msg.purpose != "ha" or msg.node != self.partner:
                link.send(Refuse("unknown-peer", f"this is the HA link of {self.name}; only "
                                 f"its partner {self.partner} may connect (got {msg.node!r}, "
                                 f"{msg.purpose!r})", {}))
                link.close("not the partner")
                return
            if msg.info.get("datacenter") != self.cfg.ha_datacenter:
                link.refuse("ha-mismatch", f"{msg.node} is in data center "
                            f"{msg.info.get('datacenter')!r}, {self.name} in "
                            f"{self.cfg.ha_datacenter!r}: HA Cores share one (seed 002)")
                return
            self.ins.add(link)
            link.send(Welcome(self.name, self.cfg.role, 0, {}, {}))
        elif isinstance(msg, Refuse):
            self.alarm("ha_link_refused", f"{self.partner} refused the HA link: {msg.code}: "
                       f"{msg.reason}")
            link.close(f"refused: {msg.reason}")  # the dialler waits longer after this
        elif isinstance(msg, Control):
            self._on_control(link, msg.body)

    def _on_control(self, link: Link, body: dict[str, Any]) -> None:
        op = body.get("op")
        if op == "ha":
            try:
                view = PartnerView.of(body)
                self.ha.heartbeat(view, time.monotonic())
            except ValueError as e:
                self.alarm("ha_bad_heartbeat", str(e))
                return
            self.clear("ha_bad_heartbeat")
            self.clear("ha_link_refused")
            if view.role != (self.own.role if self.own is not None else view.role):
                self.alarm("ha_role_mismatch", f"{self.partner} is {view.role}, this Core "
                           f"{self.own.role if self.own else '?'}: HA Cores share the role "
                           "(fail both over: run failover on the leader)")
            else:
                self.clear("ha_role_mismatch")
        elif op == "ha-cmd":
            self._bg.spawn(self._answer(link, body), "ha-answer")
        elif op == "ha-reply":
            fut = self._rpc.pop(body.get("req"), None)  # type: ignore[arg-type]
            if fut is not None and not fut.done():
                fut.set_result(body)

    async def _ask(self, cmd: str, timeout: float = 60.0, **kw: Any) -> dict[str, Any]:
        links = self._links()
        if not links:
            raise control.ControlError(f"the HA partner {self.partner} is not connected",
                                       "peer-unreachable")
        link = links[-1]  # ours (the dialled one) when it is up
        req = next(self._n)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._rpc[req] = fut
        link.send(Control({"op": "ha-cmd", "req": req, "cmd": cmd, **kw}))
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            self._rpc.pop(req, None)

    async def _answer(self, link: Link, body: dict[str, Any]) -> None:
        cmd = body.get("cmd")
        out: dict[str, Any] = {"op": "ha-reply", "req": body.get("req")}
        try:
            if cmd == "taken-over":
                self.event("ha_taken_over", by=self.partner, why=body.get("why"))
                await self._apply(self.ha.fenced(f"{self.partner} took this Core's LUNs over "
                                                 f"({body.get('why')})"))
                out["ok"] = True
            elif cmd == "handback":
                self.event("ha_handed_back", by=self.partner)
                await self._apply(self.ha.handed_back())
                out["ok"] = self.ha.mode is Mode.ACTIVE
            elif cmd in LEADER_COMMANDS:
                out["result"] = await self._run_here(str(cmd), body.get("args") or {})
            else:
                out["error"], out["code"] = f"unknown HA request {cmd!r}", "bad-request"
        except control.ControlError as e:
            out["error"], out["code"] = str(e), e.code
        except Exception as e:  # the HA link must survive a failed request
            _log.exception("ha_request_failed", cmd=cmd)
            out["error"], out["code"] = repr(e), "internal-error"
        if not link.closed.is_set():
            link.send(Control(out))

    # -- the ticker: health, decisions ---------------------------------------------------
    async def _ticker(self) -> None:
        beat_at = 0.0
        while True:
            await asyncio.sleep(0.2)
            now = time.monotonic()
            if now - beat_at >= self.cfg.ping_interval / 2:
                beat_at = now  # both ways on every link: one working direction is enough
                for lk in self._links():
                    lk.send(Control(self._beat()))
            if self.ha.seen_at is not None and self.ha.seen is not None \
                    and now - self.ha.seen_at > self.cfg.dead_after:
                self.ha.partner_lost(now)
                self.event("ha_partner_lost", partner=self.partner)
            if now - self._health_at >= HEALTH_EVERY and (self._health is None
                                                          or self._health.done()):
                self._health_at = now
                self._health = self._bg.spawn(self._check_health(), "ha-health")
            await self._apply(self.ha.decide(now))
            if self.ha.mode is Mode.STANDBY and self.ha.seen is None:
                self.alarm("ha_standby_partner_down", f"this Core's LUNs were taken over by "
                           f"{self.partner}, which is unreachable now: nobody may be serving "
                           f"them. If {self.partner} is down for good, run `coredr ha "
                           "takeover` on this Core")
            else:
                self.clear("ha_standby_partner_down")

    async def _check_health(self) -> None:
        """Does the array answer (within ``HEALTH_TIMEOUT``: a cut path stalls rather than
        fails), and are we still registered (not fenced)?"""
        assert self.fence is not None
        devs = self.fence.devices
        down = [d.trouble() for d in devs if d.trouble() is not None  # type: ignore[attr-defined]
                and d.fenced is None]  # type: ignore[attr-defined]
        own = self.own
        if own is not None:
            down += [f"LUN id {lun}: {p.store.dev.trouble()}" for lun, p in own.pipes.items()
                     if p.store.dev is not None and p.store.dev.trouble() is not None]
        fut = self._keys
        if fut is None or fut.done():  # one READ KEYS at a time: a stalled one is waited for
            fut = self._keys = asyncio.ensure_future(asyncio.to_thread(devs[0].pr_read_keys))
            self._keys_at = time.monotonic()
        done, _ = await asyncio.wait({fut}, timeout=HEALTH_TIMEOUT)
        keys: list[int] | None = None
        if fut in done:
            try:
                keys = fut.result()[1]
            except OSError as e:
                down.append(f"READ KEYS failed: {e}")
        else:
            down.append(f"the array has not answered READ KEYS for "
                        f"{time.monotonic() - self._keys_at:.0f} s")
        self.ha.storage_ok = not down
        if down:
            self.alarm("ha_storage", f"the shared storage does not answer: {down[0]}")
        else:
            self.clear("ha_storage")
        # a join under way has not registered yet: no verdict before the own Core runs
        if keys and self.ha.mode is Mode.ACTIVE and own is not None and self.own is own \
                and self.key not in keys:
            self.event("ha_fenced", by=self.partner)
            await self._apply(self.ha.fenced(f"fenced on the array by {self.partner}"))

    async def _apply(self, actions: list[Action]) -> None:
        for a in actions:
            async with self._busy:
                if a is Action.START_OWN:
                    await self._start_own()
                elif a is Action.STANDBY:
                    await self._standby()
                elif a is Action.TAKEOVER:
                    await self._takeover()
                elif a is Action.HANDBACK:
                    await self._handback()

    async def _start_own(self) -> None:
        assert self.fence is not None
        if time.monotonic() < self._retry_at:
            self.ha.mode = Mode.STARTING
            return
        rejoin = self._marker(self.cfg) is not None or any(
            d.fenced for d in self.fence.devices)  # type: ignore[attr-defined]
        try:
            await asyncio.to_thread(self.fence.join, leader=self.ha.leader, rejoin=True)
        except (OSError, FenceError) as e:
            self.alarm("ha_join_failed", f"could not register on the shared LUNs: {e}")
            self.ha.mode = Mode.STARTING
            self._retry_at = time.monotonic() + 2.0
            return
        self.clear("ha_join_failed")
        self._drop_marker(self.cfg)
        sandev.register_new_sessions(self.key)
        try:
            core = self._core(self.cfg)
        except Exception as e:  # the array is down, a LUN is missing: say so, try again
            self.alarm("ha_start_failed", f"this Core could not open its LUNs: {e}; trying "
                       "again")
            _log.warning("ha_start_failed", error=repr(e))
            self.ha.mode = Mode.STARTING
            self._retry_at = time.monotonic() + 2.0
            return
        try:
            await core.start(control_port=False)
        except Exception as e:  # e.g. its metrics port taken meanwhile: say so, try again
            with contextlib.suppress(Exception):
                await core.stop()
            self.alarm("ha_start_failed", f"this Core could not start: {e}; trying again")
            _log.warning("ha_start_failed", error=repr(e))
            self.ha.mode = Mode.STARTING
            self._retry_at = time.monotonic() + 2.0
            return
        self.clear("ha_start_failed")
        self.own = core
        self.clear("ha_standby")
        self.event("ha_serving_own", rejoin=rejoin, luns=sorted(core.pipes))

    def _core(self, cfg: CoreConfig) -> Core:
        core = Core(cfg)
        core.event_sink = self._keep
        for ev in core.events:  # what it said while opening (journal crash regions, ...)
            self._keep(ev)
        return core

    async def _standby(self) -> None:
        sandev.register_new_sessions(None)
        hosted = self.hosted
        for attr in ("hosted", "own"):
            core = getattr(self, attr)
            setattr(self, attr, None)
            if core is not None:
                with contextlib.suppress(Exception):
                    await core.stop()
        if hosted is not None:
            self._hold_takeover_ports()
        self.alarm("ha_standby", f"this Core stands by: {self.ha.why}")
        self.event("ha_standby", why=self.ha.why)

    async def _takeover(self) -> None:
        assert self.fence is not None
        why = self.ha.why
        if time.monotonic() < self._takeover_at:
            self.ha.took_over()  # decided again on a later tick
            return
        try:
            await asyncio.to_thread(self._set_marker, why)
            reports = await asyncio.to_thread(self.fence.fence, self.partner)
        except (FenceError, OSError) as e:
            self.ha.took_over()
            if isinstance(e, Fenced) or "not registered" in str(e):
                self._drop_marker(self.pcfg)
                self.event("ha_takeover_lost", why=str(e))
                await self._standby_now(f"{self.partner} fenced this Core first ({e})")
            else:
                self.alarm("ha_takeover_failed", f"could not fence {self.partner} to take its "
                           f"LUNs over: {e}; its LUNs are not served by this Core")
            return
        self.clear("ha_takeover_failed")
        self.event("ha_partner_fenced", partner=self.partner, why=why,
                   luns=len(reports), seconds=round(sum(r.seconds for r in reports), 3),
                   aborted=all(r.aborted for r in reports))
        if self._links():
            self._bg.spawn(self._tell("taken-over", why=why), "ha-tell")
        assert self.cfg.ha_takeover_listen is not None and self.cfg.ha_takeover_control
        pc = dataclasses.replace(self.pcfg, listen=self.cfg.ha_takeover_listen,
                                 control=self.cfg.ha_takeover_control, metrics=None,
                                 console=None, console_password=None)
        core = None
        try:
            core = self._core(pc)
            self._release_takeover_ports()
            await core.start()
        except Exception as e:
            if core is not None:
                with contextlib.suppress(Exception):
                    await core.stop()
            self._hold_takeover_ports()
            self.ha.took_over()
            self._takeover_at = time.monotonic() + 5.0
            self.alarm("ha_takeover_failed", f"{self.partner}'s LUNs were fenced but could not "
                       f"be served here: {e}; trying again in 5 s")
            _log.exception("ha_takeover_failed")
            return
        self.hosted = core
        self.event("ha_took_over", partner=self.partner, luns=sorted(core.pipes),
                   listen=format_addr(pc.listen), why=why)

    async def _standby_now(self, why: str) -> None:
        acts = self.ha.fenced(why)
        for a in acts:
            if a is Action.STANDBY:
                await self._standby()

    async def _tell(self, cmd: str, **kw: Any) -> None:
        with contextlib.suppress(control.ControlError, ConnectionError, TimeoutError):
            await self._ask(cmd, timeout=10.0, **kw)

    async def _handback(self) -> None:
        core, self.hosted = self.hosted, None
        if core is not None:
            await core.stop()
        self._hold_takeover_ports()
        self._drop_marker(self.pcfg)
        self.event("ha_handing_back", partner=self.partner)
        try:
            r = await self._ask("handback", timeout=60.0)
        except (control.ControlError, ConnectionError, TimeoutError) as e:
            r = {"error": str(e)}
        if not r.get("ok"):
            self.alarm("ha_handback_failed", f"{self.partner} did not take its LUNs back: "
                       f"{r.get('error', r)}; they are served by nobody until it does "
                       f"(`coredr ha takeover` on this Core serves them here again)")
        else:
            self.clear("ha_handback_failed")

    # -- operator commands ---------------------------------------------------------------
    def _leader_check(self, cmd: str) -> None:
        leader = self.ha.acting_leader()
        if leader != self.name:
            addr = format_addr(self.pcfg.control)
            raise control.ControlError(
                f"{cmd} runs on the HA leader: {self.name} is the "
                f"{'standby Core' if self.ha.mode is Mode.STANDBY else 'follower'}; run it on "
                f"{leader} (control {addr})", "not-leader", leader=leader)

    async def _run_here(self, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        """``cmd`` on the Cores this process runs: its own and the partner's it serves."""
        out: dict[str, Any] = {}
        for core in (self.own, self.hosted):
            if core is None:
                continue
            if cmd == "failover" and core.role == "primary":
                # a pair's failover asked again (``coredr failover --wait``) until both
                # Cores took it: the one that already did says so instead of refusing
                out[core.name] = {"role": core.role, "epoch": core.epoch,
                                  "state": core.rep.state.value, "already": True}
                continue
            try:
                out[core.name] = await getattr(core, f"cmd_{cmd}")(**args)
            except control.ControlError as e:
                out[core.name] = {"refused": e.code, "reason": str(e), **e.extra}
        if not out:
            raise control.ControlError(f"{self.name} stands by and runs no Core", "standby")
        return out

    async def _leader_command(self, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        self._leader_check(cmd)
        cores = await self._run_here(cmd, args)
        if self.hosted is None:
            try:
                r = await self._ask(cmd, args=args)
                cores.update(r.get("result") or {self.partner: {"refused": r.get("code"),
                                                                 "reason": r.get("error")}})
            except (control.ControlError, ConnectionError, TimeoutError) as e:
                cores[self.partner] = {"refused": "peer-unreachable",
                                       "reason": f"{self.partner} did not answer: {e}"}
        mine = cores.get(self.name)
        if mine is not None and "refused" in mine:
            raise control.ControlError(mine["reason"], mine["refused"], cores=cores,
                                       **{k: v for k, v in mine.items()
                                          if k not in ("refused", "reason")})
        later = next(((n, r) for n, r in cores.items()
                      if r.get("refused") in AGAIN_LATER), None)
        if later is not None:  # the pair is half done: --wait asks again for the rest
            name, r = later
            raise control.ControlError(f"{name}: {r['reason']}", r["refused"], cores=cores,
                                       **({"retry_in": r["retry_in"]} if "retry_in" in r
                                          else {}))
        first = next(v for v in cores.values())
        return {**(mine or first), "cores": cores}

    # -- status and control --------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        if self.own is not None:
            st = self.own.status()
        else:
            st = {"kind": "core", "name": self.name, "role": self.cfg.role, "epoch": None,
                  "replication": "standby", "pid": os.getpid(),
                  "peer": {"address": format_addr(self.cfg.peer) if self.cfg.peer else None},
                  "connections": {"edges": [], "replication": [],
                                  "replication_expected_out": 0,
                                  "replication_interfaces": {}, "witness": False},
                  "luns": {}, "alarms": []}
        hosted = self.hosted
        st["ha"] = {**self.ha.view(), "datacenter": self.cfg.ha_datacenter,
                    "partner_control": format_addr(self.pcfg.control),
                    "hosted": None if hosted is None else self._hosted_view(hosted)}
        st["alarms"] = [*st.get("alarms", []), *self.alarms.values()]
        return st

    def _hosted_view(self, core: Core) -> dict[str, Any]:
        s = core.status()
        return {"name": core.name, "role": s["role"], "epoch": s["epoch"],
                "replication": s["replication"], "listen": format_addr(core.cfg.listen),
                "control": format_addr(core.cfg.control), "luns": sorted(core.pipes),
                "connections": s["connections"]["replication_interfaces"],
                "edges": [e["node"] for e in s["connections"]["edges"]]}

    def _handlers(self) -> dict[str, control.Handler]:
        def own_only(op: str) -> control.Handler:
            async def h(req: dict[str, Any]) -> dict[str, Any]:
                if self.own is None:
                    raise control.ControlError(
                        f"{self.name} stands by ({self.ha.why}); its LUNs are served by "
                        f"{self.partner} (control {format_addr(self.pcfg.control)})", "standby")
                return await self.own._control_handlers()[op](req)
            return h

        async def status(_: dict[str, Any]) -> dict[str, Any]:
            return self.status()

        async def alarms(_: dict[str, Any]) -> dict[str, Any]:
            return {"alarms": self.status()["alarms"]}

        async def events(req: dict[str, Any]) -> dict[str, Any]:
            since = req.get("since", 0)
            return {"events": [e for e in self.events if e["n"] > since]}

        def leader(cmd: str) -> control.Handler:
            async def h(req: dict[str, Any]) -> dict[str, Any]:
                args = {"force": bool(req.get("force"))} if cmd == "failover" else {}
                return await self._leader_command(cmd, args)
            return h

        async def ha(req: dict[str, Any]) -> dict[str, Any]:
            action = req.get("action")
            if action == "takeover":
                self.event("ha_forced_takeover")
                await self._apply(self.ha.forced_takeover())
                return {"ha": self.ha.view()}
            if action in (None, "status"):
                return {"ha": self.status()["ha"]}
            raise control.ControlError(f"unknown ha action {action!r} (status, takeover)",
                                       "bad-request")

        async def stop(_: dict[str, Any]) -> dict[str, Any]:
            asyncio.get_running_loop().call_later(0.05, self.stopping.set)
            return {"stopping": True}

        hs: dict[str, control.Handler] = {op: own_only(op) for op in
                                          ("journal", "verify", "verify_status")}
        hs.update({cmd: leader(cmd) for cmd in LEADER_COMMANDS})
        hs.update(status=status, alarms=alarms, events=events, ha=ha, stop=stop)
        return hs


async def run(cfg: CoreConfig) -> None:
    """``steelfusion core run`` for a Core with ``[replication] ha`` leader or follower.
    Its SAN sessions, and those of the partner's Core it may run, take its own path."""
    sandev.route_through(cfg.san_via)
    host = HaHost(cfg)
    await serve_until_stopped(host)


__all__ = ["HaHost", "partner_config", "run"]
