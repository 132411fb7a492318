"""The Edge's iSCSI target: a thin asyncio adapter over ``edge.iscsi_session``.

All protocol logic lives in :class:`edge.iscsi_session.TargetConnection`;
this module only moves bytes between it and a TCP transport, runs each SCSI
command as its own asyncio task (so a slow read never blocks the loop or
other commands), and keeps one connection's failure from touching any other:
an :class:`IscsiProtocolError` logs ``iscsi_protocol_error`` and drops only
that connection.

Run standalone for manual tests::

    python -m edge.target --file /tmp/lun0.img --size 64M --port 3260 \\
        --iqn iqn.2024-01.io.steelfusion:edge
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import socket
import stat
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge import scsi
from edge.aio import StartedCoroutine
from edge.backends import BlockBackend, FileBackend
from edge.iscsi_session import (
    Authenticator,
    CloseConnection,
    LoginComplete,
    LoginFailed,
    LogoutComplete,
    ResetRequested,
    ScsiCommandReady,
    SessionConfig,
    TargetConnection,
    TargetInfo,
    TasksAborted,
    TmfFunction,
)
from edge.scsi.lu import CopyResolver
from steelfusion import log
from steelfusion.iscsi.pdu import Buffer, IscsiProtocolError
from steelfusion.iscsi.text import TargetLimits
from steelfusion.units import parse_size

ISCSI_PORT = 3260


@dataclass
class TargetNode:
    """One iSCSI target node as it runs: its IQN, its LUNs' backends (and,
    once an :class:`IscsiTarget` serves it, their logical units) and an
    optional alias.  Built from a ``steelfusion.config.TargetConfig`` section
    by the Edge, or directly by the standalone target and tests.

    ``state_dir`` keeps each LU's persistent reservations
    (``pr-<NAA>.json``, atomic replace) so they survive restarts; None keeps
    them in memory.  ``atomic_write_max_bytes`` is how much the backend can
    write crash-atomically (WRITE ATOMIC is offered only when it is set and
    nonzero)."""

    iqn: str
    luns: dict[int, BlockBackend]
    alias: str | None = None
    vendor: str = "STEELFUS"
    product: str = "Edge LUN"
    max_transfer_bytes: int = 8 * 1024 * 1024
    read_only: bool = False
    state_dir: str | None = None
    atomic_write_max_bytes: int | None = None
    logical_units: dict[int, scsi.LogicalUnit] = field(default_factory=dict, repr=False)

    def pr_path(self, backend: BlockBackend) -> Path | None:
        if self.state_dir is None:
            return None
        return Path(self.state_dir) / f"pr-{bytes(backend.naa_id).hex()}.json"


def portal_with_port(address: str, port: int) -> str:
    """"host", "host:port", "v6::addr" or "[v6::addr]:port" → "host:port"
    with IPv6 literals bracketed, as TargetAddress wants (RFC 7143 §13.8)."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        p = rest[1:] if rest.startswith(":") and rest[1:] else str(port)
        return f"[{host}]:{p}"
    if address.count(":") > 1:
        return f"[{address}]:{port}"
    host, sep, p = address.partition(":")
    return f"{host}:{p if sep and p and p != '0' else port}"


def _fmt_addr(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


class IscsiTarget:
    """An iSCSI target portal serving one or more :class:`TargetNode`.

    ``host``/``port`` is where to listen (``port=0`` picks a free port; read
    :attr:`port` after :meth:`start`).  ``portal_address`` is the
    "host[:port]" to advertise in SendTargets; by default each connection
    advertises the local address it arrived on, which is right even when
    listening on 0.0.0.0.  ``max_inflight_per_session`` bounds commands
    executing at once per connection; the CmdSN window (``cmd_window``)
    bounds what the initiator may queue.  ``barrier`` is called before any
    response leaves: what a command did must be stored before it is
    acknowledged (the Edge passes ``Blockstore.drain``, which writes the
    queued appends to its log).
    """

    def __init__(self, targets: TargetNode | Iterable[TargetNode], host: str = "0.0.0.0",
                 port: int = ISCSI_PORT, *, portal_address: str | None = None,
                 portal_group_tag: int = 1, limits: TargetLimits | None = None,
                 cmd_window: int = 128, max_inflight_per_session: int = 128,
                 login_timeout_s: float = 15.0,
                 authenticator: Authenticator | None = None,
                 barrier: Callable[[], None] | None = None) -> None:
        self.targets = [targets] if isinstance(targets, TargetNode) else list(targets)
        self.host = host
        self._port = port
        self._advertise = portal_address
        self.portal_address: str | None = None
        infos: dict[str, TargetInfo] = {}
        for t in self.targets:
            if t.iqn in infos:
                raise ValueError(f"duplicate target {t.iqn}")
            infos[t.iqn] = TargetInfo(t.iqn, frozenset(t.luns), t.alias)
            t.logical_units = {
                n: scsi.LogicalUnit(b, vendor=t.vendor, product=t.product,
                                    max_transfer_bytes=t.max_transfer_bytes,
                                    read_only=t.read_only, pr_state_path=t.pr_path(b),
                                    atomic_write_max_bytes=t.atomic_write_max_bytes,
                                    on_abort=self._preempt_abort,
                                    copy_resolver=self._resolver(t))
                for n, b in t.luns.items()}
        max_xfer = max((t.max_transfer_bytes for t in self.targets), default=8 << 20)
        self.session_config = SessionConfig(
            targets=infos, limits=limits or TargetLimits(), portal_group_tag=portal_group_tag,
            cmd_window=cmd_window, login_timeout_s=login_timeout_s,
            max_command_bytes=max(max_xfer, 1 << 20) + 65536, authenticator=authenticator,
            defer_resets=True)
        self.max_inflight_per_session = max_inflight_per_session
        self.barrier = barrier
        self._by_iqn = {t.iqn: t for t in self.targets}
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()
        self._sessions: dict[tuple[str, int, str | None], _Connection] = {}
        self._next_tsih = 1
        self._session_ids = itertools.count(1)
        self._log = log.get("iscsi")

    @property
    def port(self) -> int:
        """The bound TCP port (the real one when constructed with port 0)."""
        return self._port

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), self.host,
                                                self._port, reuse_address=True, backlog=128)
        sock = self._server.sockets[0]
        self._port = sock.getsockname()[1]
        if self._advertise:
            self.portal_address = portal_with_port(self._advertise, self._port)
        self._log.info("iscsi_target_started", host=self.host, port=self._port,
                       targets=[t.iqn for t in self.targets])

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    async def close(self) -> None:
        """Stop listening, drop every connection, wait for running commands."""
        if self._server is not None:
            self._server.close()
        conns = list(self._connections)
        for c in conns:
            c.abort("target shutting down")
        pending = [t for c in conns for t in c.tasks]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    # -- bookkeeping used by connections

    def _alloc_tsih(self) -> int:
        tsih = self._next_tsih
        self._next_tsih = tsih % 0xFFFF + 1
        return tsih

    def _register(self, conn: _Connection, key: tuple[str, int, str | None]) -> None:
        """Session reinstatement (RFC 7143 §6.3.5): a new login with the same
        initiator name and ISID replaces the old session."""
        old = self._sessions.get(key)
        self._sessions[key] = conn
        if old is not None and old is not conn:
            old.log.info("iscsi_session_reinstated", initiator=key[0], isid=f"{key[1]:012x}")
            old.abort("session reinstated")

    def _unregister(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        key = conn.session_key
        if key is not None and self._sessions.get(key) is conn:
            del self._sessions[key]

    def _resolver(self, target: TargetNode) -> CopyResolver:
        """EXTENDED COPY may name any LU of the same target node by NAA."""
        def resolve(designator: bytes) -> scsi.LogicalUnit | None:
            for lu in target.logical_units.values():
                if bytes(lu.backend.naa_id) == designator:
                    return lu
            return None
        return resolve

    def _preempt_abort(self, lu: scsi.LogicalUnit, pr_ids: set[str]) -> None:
        """PREEMPT AND ABORT: the preempted nexuses lose their tasks on ``lu``."""
        for c in list(self._connections):
            if c.nexus is None or c.nexus.pr_id not in pr_ids or c.conn is None:
                continue
            luns = {n for n, x in c.luns.items() if x is lu}
            if luns:
                c._handle(c.conn.abort_tasks(luns))
                c._flush()

    def peers(self, conn: _Connection) -> list[_Connection]:
        """Other live connections logged in to the same target node."""
        return [c for c in self._connections
                if c is not conn and c.target is conn.target and c.target is not None
                and c.conn is not None and not c.closing]


_DISCARD = bytearray(65536)
"""Where bytes go that arrive after a connection is done with."""


class _Connection(asyncio.BufferedProtocol):
    """One TCP connection: feeds bytes to a TargetConnection, runs commands.

    A ``BufferedProtocol`` (uvloop uses the buffered path only for a protocol
    that is not an ``asyncio.Protocol``): the kernel writes a large write's
    data segment straight into its PDU's own buffer, which the blockstore
    then keeps as the record's data — no copy in Python for 128 KiB writes.
    ``data_received`` stays for callers that hand bytes in directly.
    """

    def __init__(self, server: IscsiTarget) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.conn: TargetConnection | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.session_key: tuple[str, int, str | None] | None = None
        self.luns: Mapping[int, scsi.LogicalUnit] = {}
        self.lun_ids: tuple[int, ...] = ()
        self.target: TargetNode | None = None
        self.nexus: scsi.ItNexus | None = None
        self.running: dict[int, tuple[asyncio.Task[None], int]] = {}
        self.closing = False
        self.peer = "?"
        self.log: Any = server._log
        self._sem = asyncio.Semaphore(server.max_inflight_per_session)
        self._flush_pending = False
        self._timer: asyncio.TimerHandle | None = None
        self._close_reason = "peer closed"

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = _fmt_addr(transport.get_extra_info("peername"))
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        portal = self.server.portal_address or _fmt_addr(transport.get_extra_info("sockname"))
        self.log = log.get("iscsi").bind(peer=self.peer)
        self.conn = TargetConnection(self.server.session_config, portal=portal,
                                     tsih=self.server._alloc_tsih(), now=self.loop.time(),
                                     fast=self._fast_lane)
        self.server._connections.add(self)
        deadline = self.conn.get_timer()
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def get_buffer(self, sizehint: int) -> memoryview:
        conn = self.conn
        if conn is None or self.closing:
            return memoryview(_DISCARD)
        return conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        conn = self.conn
        if conn is None or self.closing:
            return
        self._received(conn, conn.buffer_updated, nbytes)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is None or self.closing:
            return
        self._received(conn, conn.receive_data, data)

    def _received(self, conn: TargetConnection, feed: Callable[[Any], list[Any]],
                  arg: Any) -> None:
        try:
            events = feed(arg)
        except IscsiProtocolError as e:
            self.log.warning("iscsi_protocol_error", reason=str(e), reject_reason=e.reason,
                             initiator=conn.initiator_name)
            self._flush()
            self._close("protocol error: " + str(e))
            return
        except Exception as e:
            self.log.error("iscsi_internal_error", error=repr(e), exc_info=True)
            self.abort("internal error")
            return
        if events:
            self._handle(events)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        conn = self.conn
        self.closing = True
        self.log.info("iscsi_connection_closed", reason=self._close_reason if exc is None
                      else f"{self._close_reason}: {exc!r}",
                      initiator=conn.initiator_name if conn else None,
                      target=conn.target.name if conn and conn.target else None,
                      outstanding=conn.outstanding if conn else 0)
        if conn is not None:
            conn.close()
        if self.nexus is not None:
            for lu in self.luns.values():
                lu.detach(self.nexus)
        self.server._unregister(self)

    def pause_writing(self) -> None:
        # The initiator is not reading: stop reading its requests too, so
        # output cannot pile up without bound.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()

    # -- events

    def _handle(self, events: list[Any]) -> None:
        for ev in events:
            t = type(ev)
            if t is ScsiCommandReady:
                # A plain READ/WRITE that can finish now (a cached read, a write
                # into the reserve) is answered inline: no coroutine at all.
                if self._fast(ev):
                    continue
                # Eager start: the rest usually finish without ever waiting
                # too, and then need no asyncio Task.
                coro = self._run(ev)
                try:
                    yielded = coro.send(None)
                except StopIteration:
                    continue
                task = self.loop.create_task(StartedCoroutine(coro, yielded))
                self.tasks.add(task)
                self.running[ev.task_tag] = (task, ev.lun)
                task.add_done_callback(functools.partial(self._task_done, ev.task_tag))
            elif t is ResetRequested:
                reset = self.loop.create_task(self._reset(ev))
                self.tasks.add(reset)
                reset.add_done_callback(self.tasks.discard)
            elif t is LoginComplete:
                self._logged_in(ev)
            elif t is LoginFailed:
                # The reason names what failed, never a secret or a response.
                self.log.warning("iscsi_login_failed", status=f"0x{ev.status:04x}",
                                 reason=ev.reason, initiator=ev.initiator_name,
                                 target=ev.target_name)
            elif t is LogoutComplete:
                self.log.info("iscsi_logout", reason=ev.reason,
                              initiator=self.conn.initiator_name if self.conn else None)
                self._flush()
                self._close("logout")
            elif t is CloseConnection:
                self._flush()
                self._close(ev.reason)
            elif t is TasksAborted:
                self.log.info("iscsi_tasks_aborted", task_tags=list(ev.task_tags))
                self._cancel(ev.task_tags)

    def _fast(self, ev: ScsiCommandReady) -> bool:
        """Answer ``ev`` through the fast lane if it can; True when done."""
        res = self._fast_lane(ev.lun, ev.cdb, ev.data)
        if res is None:
            return False
        self._answer(ev.task_tag, *res)
        return True

    def _answer(self, itt: int, status: int, data: Buffer, sense: Buffer,
                transfer_length: int | None) -> None:
        """Hand a finished command to the session and schedule the flush, so the
        responses of every command finishing in this loop iteration leave in one
        writelines."""
        conn = self.conn
        if conn is None or self.closing:
            return
        events = conn.complete(itt, status, data, sense, transfer_length)
        if events:
            self._handle(events)
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush)

    def _fast_lane(self, lun: int, cdb: bytes, data: Buffer
                   ) -> tuple[int, Buffer, Buffer, int | None] | None:
        """The session's fast lane (``TargetConnection.fast``): a plain READ/WRITE
        answered while its PDU is decoded, through ``LogicalUnit.try_fast``."""
        lu = self.luns.get(lun)
        if lu is None:
            return None
        try:
            res = lu.try_fast(cdb, data, self.nexus or scsi.LOCAL_NEXUS)
        except Exception as e:
            self.log.error("scsi_execute_failed", error=repr(e), exc_info=True)
            res = scsi.check_condition(scsi.SenseKey.HARDWARE_ERROR, 0x44, 0x00)
        if res is None:
            return None
        return res.status, res.data, res.sense, res.transfer_length

    def _logged_in(self, ev: LoginComplete) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        target = self.server._by_iqn.get(ev.target_name) if ev.target_name else None
        if target is not None:
            self.target = target
            self.luns = target.logical_units
            self.lun_ids = tuple(sorted(target.logical_units))
            self.nexus = scsi.ItNexus(ev.initiator_name, ev.isid, target.iqn,
                                      self.server.session_config.portal_group_tag,
                                      next(self.server._session_ids))
            for lu in self.luns.values():
                lu.attach(self.nexus)
        p = ev.params
        self.log = self.log.bind(initiator=ev.initiator_name, target=ev.target_name)
        self.log.info("iscsi_login", session_type=ev.session_type, tsih=ev.tsih,
                      isid=f"{ev.isid:012x}", header_digest=p.header_digest,
                      data_digest=p.data_digest, mrdsl=p.max_recv_data_segment_length,
                      max_burst=p.max_burst_length, first_burst=p.first_burst_length,
                      initial_r2t=p.initial_r2t, immediate_data=p.immediate_data)
        if ev.session_type == "Normal":
            self.session_key = (ev.initiator_name, ev.isid, ev.target_name)
            self.server._register(self, self.session_key)

    def _cancel(self, task_tags: Iterable[int]) -> None:
        """Stop the commands of aborted tasks (SAM-5 §7.2) rather than wait
        for them: a read stuck on an unreachable Core or a write queued behind
        a sanitize would hold the TMF answer back for as long.  Each unwinds
        at its next await (range locks and backend writes in flight are
        finished or released on the way out, see ``edge.aio.to_the_end``), and
        :meth:`_task_done` then tells the session, which answers the TMF."""
        running = self.running
        for itt in task_tags:
            entry = running.get(itt)
            if entry is not None:
                entry[0].cancel()

    def _task_done(self, itt: int, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        entry = self.running.get(itt)
        if entry is None or entry[0] is not task:
            return
        del self.running[itt]
        if task.cancelled():
            # Cancelled by _cancel: it never reached complete().  The session
            # drops its status and answers the TMF waiting for it.
            conn = self.conn
            if conn is None or self.closing:
                return
            events = conn.task_cancelled(itt)
            if events:
                self._handle(events)
            self._flush()

    async def _run(self, ev: ScsiCommandReady) -> None:
        """Execute one SCSI command and queue its response."""
        async with self._sem:
            conn = self.conn
            if self.closing or conn is None:
                # The connection died while this command waited for a slot:
                # do not run it, so a stale write cannot land after the
                # initiator has retried it elsewhere.
                return
            if conn.is_aborted(ev.task_tag):
                result = scsi.ScsiResult(scsi.TASK_ABORTED)  # dropped by complete()
            else:
                try:
                    result = await scsi.execute(self.luns.get(ev.lun), ev.cdb, ev.data,
                                                self.lun_ids, self.nexus or scsi.LOCAL_NEXUS)
                except Exception as e:
                    self.log.error("scsi_execute_failed", error=repr(e), exc_info=True)
                    result = scsi.check_condition(scsi.SenseKey.HARDWARE_ERROR, 0x44, 0x00)
        self._answer(ev.task_tag, result.status, result.data, result.sense,
                     result.transfer_length)

    async def _reset(self, ev: ResetRequested) -> None:
        """LOGICAL UNIT RESET / TARGET WARM or COLD RESET across sessions
        (SAM-5 §7.6, RFC 7143 §11.5.1): abort the tasks other sessions have on
        the LU(s) (their commands are cancelled, not waited for) and wait
        only for those to unwind, reset the LU state (SPC-2 reservation, mode
        pages, a unit attention for every nexus), then answer.  A COLD
        reset also ends every other session of the target; after a WARM one
        the sessions go on (RFC 7143 §11.5.1).  A sanitize operation goes on
        (SBC-3 §4.11.1)."""
        target = self.target
        lun_reset = ev.function == TmfFunction.LOGICAL_UNIT_RESET
        if target is not None:
            luns = {ev.lun} if lun_reset else set(target.logical_units)
            peers = self.server.peers(self)
            waits: list[asyncio.Task[None]] = []
            for c in peers:
                assert c.conn is not None
                c._handle(c.conn.abort_tasks(luns))  # TasksAborted: cancels them
                c._flush()
                waits += [t for t, lun in c.running.values() if lun in luns]
            if waits:
                await asyncio.gather(*waits, return_exceptions=True)
            ua = scsi.UA_BUS_DEVICE_RESET if lun_reset else (
                scsi.UA_POWER_ON_RESET if ev.function == TmfFunction.TARGET_COLD_RESET
                else scsi.UA_BUS_RESET)
            for n in luns:
                lu = target.logical_units.get(n)
                if lu is not None:
                    lu.reset(ua)
            self.log.info("iscsi_reset", function=TmfFunction(ev.function).name.lower(),
                          lun=ev.lun if lun_reset else None, sessions_aborted=len(peers))
            if ev.function == TmfFunction.TARGET_COLD_RESET:
                for c in peers:
                    c._close("target cold reset by another session")
        conn = self.conn
        if conn is None or self.closing:
            return
        self._handle(conn.complete_tmf(ev.task_tag))
        self._flush()

    def _flush(self) -> None:
        self._flush_pending = False
        conn, transport = self.conn, self.transport
        if conn is None or transport is None or transport.is_closing():
            return
        parts: list[Buffer] = conn.data_to_send()
        if parts:
            barrier = self.server.barrier
            if barrier is not None:
                try:
                    barrier()
                except Exception as e:
                    # What we were about to acknowledge may not be stored:
                    # answer nothing; the initiator retries elsewhere or later.
                    self.log.error("iscsi_barrier_failed", error=repr(e))
                    self.abort(f"storage error: {e}")
                    return
            transport.writelines(parts)

    def _on_timer(self) -> None:
        self._timer = None
        if self.conn is None or self.closing:
            return
        events = self.conn.handle_timer(self.loop.time())
        if events:
            self._handle(events)
        else:
            deadline = self.conn.get_timer()
            if deadline is not None:
                self._timer = self.loop.call_at(deadline, self._on_timer)

    def _close(self, reason: str) -> None:
        """Close after flushing what is queued."""
        if self.closing:
            return
        self.closing = True
        self._close_reason = reason
        if self.transport is not None:
            self.transport.close()

    def abort(self, reason: str) -> None:
        """Drop the connection now, discarding queued output."""
        self.closing = True
        self._close_reason = reason
        if self.conn is not None:
            self.conn.close()
        if self.transport is not None:
            self.transport.abort()


# --------------------------------------------------------------------------- standalone mode


def _size_arg(text: str) -> int:
    """``--size`` as ``steelfusion.units.parse_size`` reads sizes everywhere."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _port_arg(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0-65535; 0 picks one)")
    return port


def _block_size_arg(text: str) -> int:
    """A logical block of 512 bytes to 64 KiB, a power of two (what the Block
    Limits and copy pages can describe)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 512 <= n <= 65536 or n & (n - 1):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a block size: give a power of two from 512 to 65536")
    return n


def default_state_dir(path: str) -> str | None:
    """Where the standalone target keeps persistent reservations: next to a
    regular backing file (``<file>.state``); nowhere for a block device."""
    try:
        if stat.S_ISBLK(Path(path).stat().st_mode):
            return None
    except FileNotFoundError:
        pass
    return f"{path}.state"


def _authenticator(args: argparse.Namespace) -> Authenticator | None:
    """CHAP/ACL from the command line; secrets may come from the environment
    (STEELFUSION_CHAP_SECRET, STEELFUSION_MUTUAL_SECRET, ...) to keep them
    out of ``ps``."""
    import os

    from edge import auth

    def secret(flag: str | None, env: str) -> str | None:
        return flag if flag is not None else os.environ.get(env)

    access = auth.Access(
        chap=auth.ChapCredentials.of(args.chap_user,
                                     secret(args.chap_secret, "STEELFUSION_CHAP_SECRET")),
        mutual=auth.ChapCredentials.of(args.mutual_user,
                                       secret(args.mutual_secret, "STEELFUSION_MUTUAL_SECRET")),
        initiators=frozenset(args.initiator) if args.initiator else None)
    discovery = auth.Access(
        chap=auth.ChapCredentials.of(
            args.discovery_chap_user,
            secret(args.discovery_chap_secret, "STEELFUSION_DISCOVERY_CHAP_SECRET")),
        mutual=auth.ChapCredentials.of(
            args.discovery_mutual_user,
            secret(args.discovery_mutual_secret, "STEELFUSION_DISCOVERY_MUTUAL_SECRET")))
    if access == auth.Access() and discovery == auth.Access():
        return None
    return auth.ChapAuthenticator({args.iqn: access}, discovery)


class _Refused(Exception):
    """A bad --file or --host/--port: one line for the operator, exit 1."""


async def _main_async(args: argparse.Namespace) -> None:
    try:
        backend = FileBackend(args.file, args.size, block_size=args.block_size)
    except OSError as e:
        raise _Refused(f"cannot open --file {args.file}: {e.strerror}; give a regular file "
                       "(in an existing folder) or a block device") from None
    try:
        if not backend.size_bytes:
            raise _Refused(f"--file {args.file} holds no whole {args.block_size}-byte block: "
                           "give --size (e.g. --size 64M) to create or extend it")
        state_dir = args.state_dir if args.state_dir is not None \
            else default_state_dir(args.file)
        target = IscsiTarget(TargetNode(args.iqn, {0: backend}, alias=args.alias,
                                        state_dir=state_dir or None),
                             host=args.host, port=args.port, portal_address=args.portal_address,
                             authenticator=_authenticator(args))
        try:
            await target.start()
        except OSError as e:
            raise _Refused(f"cannot listen on {args.host}:{args.port}: {e.strerror}; pick "
                           "another --port (0 picks a free one) or --host") from None
        print(f"iscsi://{args.portal_address or '127.0.0.1'}:{target.port}/{args.iqn}/0",
              file=sys.stderr, flush=True)
        try:
            await target.serve_forever()
        finally:
            await target.close()
    finally:
        backend.close()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m edge.target",
                                 description="Serve a file as an iSCSI LUN 0.")
    ap.add_argument("--file", required=True, help="backing file or block device")
    ap.add_argument("--size", type=_size_arg,
                    help="create/extend the file to this size (e.g. 64M)")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=_port_arg, default=ISCSI_PORT)
    ap.add_argument("--iqn", default="iqn.2024-01.io.steelfusion:edge")
    ap.add_argument("--alias", default=None)
    ap.add_argument("--portal-address", default=None,
                    help="host[:port] to advertise in SendTargets")
    ap.add_argument("--block-size", type=_block_size_arg, default=512)
    ap.add_argument("--chap-user", default=None, help="initiators must log in with CHAP")
    ap.add_argument("--chap-secret", default=None, help="or $STEELFUSION_CHAP_SECRET")
    ap.add_argument("--mutual-user", default=None, help="target name for mutual CHAP")
    ap.add_argument("--mutual-secret", default=None, help="or $STEELFUSION_MUTUAL_SECRET")
    ap.add_argument("--initiator", action="append", default=[],
                    help="allow only this initiator IQN (repeatable)")
    ap.add_argument("--discovery-chap-user", default=None)
    ap.add_argument("--discovery-chap-secret", default=None)
    ap.add_argument("--discovery-mutual-user", default=None)
    ap.add_argument("--discovery-mutual-secret", default=None)
    ap.add_argument("--state-dir", default=None,
                    help="keep persistent reservations here (default: FILE.state; '' = memory)")
    ap.add_argument("--log-file", default=None)
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--no-uvloop", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    log.setup("edge-target", args.log_file, level=args.log_level)
    run: Any = asyncio.run
    if not args.no_uvloop:
        try:
            import uvloop

            run = uvloop.run
        except ImportError:
            pass
    try:
        with contextlib.suppress(KeyboardInterrupt):
            run(_main_async(args))
    except _Refused as e:
        print(f"python -m edge.target: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
