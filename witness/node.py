"""The Witness process: the asyncio adapter around :mod:`witness.logic`.

Seed 002: "A Witness registers requests to suspend replication from the
Cores ... makes sure that only one Core at a time suspends its replication"
and it "makes sure that both primary and secondary Cores do not get approval
for suspension at the same time". DESIGN.md ("Witness"): it "keeps that
decision across its own restarts".

This module owns no rule. It

* listens with :func:`steelfusion.link.listen`; a Core dials with
  ``Hello(node, role, purpose="witness", epoch, info={"pair": PAIR})``;
* renews a Core's lease on every frame it sends (requests, and the link's
  PING/PONG heartbeats, read from the link's ``last_rx``);
* answers :class:`~steelfusion.wire.Control` requests (schema in
  :mod:`witness.protocol`) with the logic's decisions, after writing any
  change of durable state to ``state_dir/witness-state.json`` with
  :func:`steelfusion.atomic.atomic_write` (temp, fsync, rename, fsync dir).
  A decision whose write fails is dropped and answered as refused;
* serves ``status`` and ``stop`` on the control port (JSON lines).

It can run alone (``steelfusion witness run --config F`` → :func:`run`) or
inside an Edge (``Witness(name, addr, state_dir)``, ``start``, ``stop``,
``status``), as the seed allows ("A role assigned to one of the Edges").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steelfusion import control, log, metrics
from steelfusion.atomic import atomic_write
from steelfusion.config import WitnessConfig
from steelfusion.link import Link, listen
from steelfusion.nodeauth import Keyring
from steelfusion.startup import StartupError, listening
from steelfusion.units import format_addr
from steelfusion.wire import Control, Hello, Message, Welcome
from witness.logic import (
    PAIR_FULL,
    Decision,
    DurableState,
    Op,
    Request,
    Verdict,
    WitnessError,
    WitnessLogic,
    WitnessStateError,
)
from witness.metrics import WitnessCollector
from witness.protocol import ProtocolError, WireReply, parse_request, request_id

_log = log.get("witness")

STATE_FILE = "witness-state.json"
PERSIST_FAILED = "persist-failed"
DUPLICATE_QUIET = 30.0  # a duplicate_node_* alarm clears this long after the last refused copy
_OPS = {"suspend": Op.SUSPEND, "release": Op.RELEASE, "failover": Op.FAILOVER,
        "terminate": Op.TERMINATE}


@dataclass(frozen=True, slots=True)
class _Peer:
    """What a connected Core said about itself in its HELLO."""

    node: str
    role: str
    pair: str | None
    epoch: int


def load_state(path: Path) -> DurableState:
    """The durable state, or an empty one if the file does not exist.

    A corrupt file raises :class:`WitnessStateError`: starting empty could
    approve both Cores of a pair (DESIGN.md invariant 2), so an operator must
    look first.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return DurableState()
    return DurableState.from_json(data)


class Witness:
    """One Witness: pairs, approvals and leases, served over the node protocol."""

    def __init__(self, name: str, addr: tuple[str, int], state_dir: str,
                 lease_seconds: float = 5.0, keyring: Keyring | None = None, *,
                 listen_key: str = "[witness] listen", source: str = "") -> None:
        self.name = name
        self.listen_key = listen_key  # the config key (and file) a failed bind names
        self.source = source
        self.keyring = keyring  # node authentication: Cores must prove the shared key
        self.addr = addr
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.state_dir / STATE_FILE
        self.lease_seconds = lease_seconds
        self.links: dict[str, Link] = {}
        self.last_seen: dict[str, float] = {}  # wall clock, for people reading status
        self.logic: WitnessLogic | None = None
        self.persist_failures = 0
        # decisions by operation (suspend, failover, ...), for metrics
        self.granted: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.duplicates: dict[str, dict[str, Any]] = {}  # node -> the last copy refused
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.started = time.time()

    # -- life cycle --------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            state = load_state(self.state_path)
        except WitnessStateError as e:
            _log.error("witness_state_corrupt", path=str(self.state_path), error=str(e))
            # Starting empty could approve both Cores of a pair: an operator must look.
            # Said here, so a Witness inside an Edge says it too.
            raise StartupError(f"{e} ({self.state_path}; move it away only if no Core holds "
                               "an approval)") from None
        # Leases start unknown: nobody counts as unreachable for one lease period.
        self.logic = WitnessLogic(self.lease_seconds, self._now(), state)
        ping = max(0.05, min(1.0, self.lease_seconds / 3))
        self._server = await listening(
            listen(*self.addr, self._on_message, self._on_close, name="witness",
                   ping_interval=ping, dead_after=max(2.0, 2 * self.lease_seconds),
                   keyring=self.keyring, local_name=self.name),
            self.addr, self.listen_key, self.source)
        _log.info("witness_started", listen=format_addr(self.addr), state=str(self.state_path),
                  pairs=len(state.pairs), state_version=state.version,
                  lease_seconds=self.lease_seconds,
                  holders={p: r.holder for p, r in state.pairs.items()})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for lk in list(self.links.values()):
            lk.close("witness stopping")

    def _now(self) -> float:
        """The loop's monotonic clock: the same one links stamp ``last_rx`` with."""
        return self._loop.time() if self._loop is not None else time.monotonic()

    def _logic(self) -> WitnessLogic:
        if self.logic is None:
            raise RuntimeError("Witness.start() was not called")
        return self.logic

    # -- leases ------------------------------------------------------------------------
    def _refresh_leases(self) -> None:
        """Every frame renews a lease, PING/PONG included (they never reach ``_on_message``)."""
        logic = self._logic()
        for node, lk in self.links.items():
            if lk.established:
                logic.heartbeat(node, lk.machine.last_rx)

    def reachable(self, node: str) -> bool:
        """True while ``node``'s lease is live."""
        if self.logic is None:
            return False
        self._refresh_leases()
        return self.logic.can_reach(node, self._now())

    # -- connections ---------------------------------------------------------------------
    def _on_message(self, link: Link, msg: Message) -> None:
        if isinstance(msg, Hello):
            self._on_hello(link, msg)
        elif isinstance(msg, Control):
            peer = link.ctx
            if isinstance(peer, _Peer):
                self.last_seen[peer.node] = time.time()
                self._on_request(link, peer, msg.body)

    def _on_hello(self, link: Link, msg: Hello) -> None:
        if msg.purpose != "witness":
            link.refuse("bad-purpose", f"this is a Witness; {msg.purpose!r} connections "
                        "are not served here")
            return
        pair = msg.info.get("pair")
        if pair is not None and (not isinstance(pair, str) or not pair):
            link.refuse("bad-hello", "info.pair must be a non-empty string")
            return
        old = self.links.get(msg.node)
        if old is not None and old is not link and old.established \
                and msg.impostor_of(old.hello):
            # First come, first served: replacing the holder made the Witness's view of a
            # node flip between two copies every heartbeat (issue 13).
            since = self.duplicates.get(msg.node, {}).get("since", time.time())
            self.duplicates[msg.node] = {"node": msg.node, "from": link.peer,
                                         "holder": old.peer, "since": since,
                                         "last_mono": self._now()}
            _log.error("duplicate_node_refused", node=msg.node, peer=link.peer, holder=old.peer)
            link.refuse("duplicate-node", f"{msg.node} is already connected to Witness "
                        f"{self.name} from {old.peer} (another process); stop the copy "
                        "(two nodes started with one config?)")
            return
        logic = self._logic()
        now = self._now()
        try:
            logic.heartbeat(msg.node, now)
        except WitnessError as e:
            link.refuse("bad-hello", str(e))
            return
        peer = _Peer(msg.node, msg.role, pair, msg.epoch)
        link.ctx = peer
        self.links[msg.node] = link
        self.last_seen[msg.node] = time.time()
        if old is not None and old is not link:
            old.close("replaced by a newer connection from the same node")
        info: dict[str, Any] = {"lease_seconds": self.lease_seconds, "pair": pair}
        epoch = 0
        if pair is not None:
            try:
                d = self._decide(Request(Op.REGISTER, msg.node, pair, msg.epoch, role=msg.role),
                                 now)
            except WitnessError as e:
                del self.links[msg.node]
                link.refuse("bad-hello", str(e))
                return
            if d.reason == PAIR_FULL or d.reason == PERSIST_FAILED:
                del self.links[msg.node]
                link.refuse(d.reason, d.detail)
                return
            epoch = d.epoch
            info.update(holder=d.holder, holds=d.holder == msg.node, reason=d.reason,
                        granted=d.granted, detail=d.detail)
        link.send(Welcome(self.name, "witness", epoch, {}, info))
        _log.info("witness_node_connected", node=msg.node, role=msg.role, epoch=msg.epoch,
                  pair=pair, pair_epoch=epoch)

    def _on_close(self, link: Link, exc: BaseException | None) -> None:
        peer = link.ctx
        if isinstance(peer, _Peer) and self.links.get(peer.node) is link:
            del self.links[peer.node]
            self.last_seen[peer.node] = time.time()
            # The lease is not dropped: it runs out on its own (a Core that lost
            # its connection may still believe it holds; lease fencing).
            _log.warning("witness_node_lost", node=peer.node, reason=link.close_reason)

    # -- requests ----------------------------------------------------------------------
    def _decide(self, req: Request, now: float) -> Decision:
        """Decide, persist if anything durable changed, commit, log — in that order."""
        logic = self._logic()
        self._refresh_leases()
        v: Verdict = logic.decide(req, now)
        if v.new_state is not None:
            try:
                atomic_write(self.state_path, v.new_state.to_json())
            except OSError as e:
                self.persist_failures += 1
                _log.error("witness_persist_failed", path=str(self.state_path), error=str(e),
                           op=req.op.value, node=req.node, pair=req.pair)
                return Decision(False, PERSIST_FAILED, logic.epoch(req.pair),
                                logic.holder(req.pair),
                                f"the Witness could not record the decision: {e}")
        d = logic.commit(v, now)
        counts = self.granted if d.granted else self.refused
        counts[req.op.value] = counts.get(req.op.value, 0) + 1
        event = f"witness_{req.op.value}_{'granted' if d.granted else 'refused'}"
        fields = {"node": req.node, "pair": req.pair, "epoch": req.epoch, "peer": req.peer,
                  "reason": d.reason, "detail": d.detail, "pair_epoch": d.epoch,
                  "holder": d.holder, "persisted": v.new_state is not None}
        if d.granted:
            _log.info(event, **fields)
        else:
            _log.warning(event, **fields)
        return d

    def _on_request(self, link: Link, peer: _Peer, body: dict[str, Any]) -> None:
        logic = self._logic()
        now = self._now()
        logic.heartbeat(peer.node, now)
        rid = request_id(body)
        try:
            wr = parse_request(body)
        except ProtocolError as e:
            _log.warning("witness_bad_request", node=peer.node, code=e.code, error=str(e))
            if rid is not None:
                link.send(Control(WireReply(rid, False, e.code, 0, detail=str(e)).body()))
            return
        pair = wr.pair or peer.pair
        if wr.op == "heartbeat" or wr.op == "reach":
            self._refresh_leases()
            ep = logic.epoch(pair) if pair else 0
            holder = logic.holder(pair) if pair else None
            if wr.op == "heartbeat":
                reply = WireReply(wr.req, True, "alive", ep, holder=holder,
                                  holds=holder == peer.node)
            else:
                assert wr.peer is not None
                r = logic.reach(wr.peer, now)
                why = "reachable" if r.reachable else ("unreachable" if r.known else "unknown")
                reply = WireReply(wr.req, True, why, ep, holder=holder, holds=holder == peer.node,
                                  reachable=r.reachable, known=r.known,
                                  detail=(f"lease expires in {r.expires_in}s"
                                          if r.expires_in is not None else "no lease"))
            link.send(Control(reply.body()))
            return
        if pair is None:
            link.send(Control(WireReply(wr.req, False, "no-pair", 0,
                                        detail="no pair in the request or the HELLO").body()))
            return
        try:
            d = self._decide(Request(_OPS[wr.op], peer.node, pair, wr.epoch, wr.peer,
                                     role=peer.role), now)
        except WitnessError as e:
            link.send(Control(WireReply(wr.req, False, "bad-request", logic.epoch(pair),
                                        detail=str(e)).body()))
            return
        link.send(Control(WireReply(wr.req, d.granted, d.reason, d.epoch, detail=d.detail,
                                    holder=d.holder, holds=d.holder == peer.node,
                                    retry_in=d.retry_in).body()))

    # -- status ------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "witness",  # which node's control port this is (coredr checks it)
            "name": self.name, "role": "witness", "pid": os.getpid(),
            "address": format_addr(self.addr), "state_file": str(self.state_path),
            "uptime_seconds": round(time.time() - self.started, 3),
            "persist_failures": self.persist_failures,
        }
        nodes: dict[str, Any] = {}
        if self.logic is not None:
            self._refresh_leases()
            now = self._now()
            out.update(self.logic.status(now))
            for n in sorted(set(self.last_seen) | set(self.logic.leases)):
                lk = self.links.get(n)
                nodes[n] = {"connected": lk is not None and lk.established,
                            "reachable": self.logic.can_reach(n, now),
                            "pair": lk.ctx.pair if lk is not None and isinstance(lk.ctx, _Peer)
                            else None,
                            "last_seen": self.last_seen.get(n)}
        out["nodes"] = nodes
        now = self._now()
        for node, d in list(self.duplicates.items()):
            if now - d["last_mono"] > DUPLICATE_QUIET:
                del self.duplicates[node]
        out["alarms"] = [
            {"alarm": f"duplicate_node_{n}", "since": d["since"],
             "message": f"a second process calls itself {n} (from {d['from']}) while {n} is "
                        f"connected from {d['holder']}: refused; stop the copy"}
            for n, d in sorted(self.duplicates.items())]
        return out


async def run(cfg: WitnessConfig) -> None:
    """``steelfusion witness run``: serve until SIGTERM/SIGINT or the ``stop`` command."""
    from steelfusion import authconfig

    auth = authconfig.load(cfg.source)
    w = Witness(cfg.name, cfg.listen, cfg.state_dir, cfg.lease_seconds,
                keyring=auth.keyring if auth else None, source=cfg.source)
    stopping = asyncio.Event()

    async def status(_: dict[str, Any]) -> dict[str, Any]:
        return w.status()

    async def stop(_: dict[str, Any]) -> dict[str, Any]:
        asyncio.get_running_loop().call_later(0.05, stopping.set)
        return {"stopping": True}

    ctl_addr = cfg.control or (cfg.listen[0], cfg.listen[1] + 1)
    ctl_key = "[witness] control" if cfg.control else "[witness] control (unset: listen port + 1)"
    http: list[metrics.WebServer] = []
    try:
        await w.start()
        ctl = await listening(control.serve(*ctl_addr, {"status": status, "stop": stop}),
                              ctl_addr, ctl_key, cfg.source)
        await metrics.start_http(cfg, http, lambda: [WitnessCollector(w)])
    except BaseException:
        with contextlib.suppress(Exception):
            await w.stop()  # nothing it started outlives a failed start
            for web in http:
                await web.stop()
        raise
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    ctl.close()
    for web in http:
        await web.stop()
    await w.stop()
    _log.info("witness_stopped")
