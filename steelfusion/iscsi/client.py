"""An iSCSI client for one LUN: a thin asyncio adapter over
:class:`steelfusion.iscsi.initiator.InitiatorConnection`.

The Core uses it to reach data-center SAN LUNs (issue 12).  All protocol
rules live in the sans-IO connection; this module moves bytes between it and
a TCP transport and adds what a storage client needs on top:

* **Pipelining.**  Calls run concurrently, up to ``max_inflight`` commands
  and ``max_inflight_bytes`` of data; beyond the target's CmdSN window they
  wait inside the connection.  Large reads and writes are cut into commands
  of at most ``max_io_bytes``.
* **Order.**  The target may run SIMPLE tasks in any order (SAM-5 §8.6), so a
  command waits for every earlier, still unfinished command whose LBA range
  it overlaps when either writes: per range, commands take effect in the
  order they were issued.  :meth:`IscsiClient.sync` waits for every write
  issued before it, then sends SYNCHRONIZE CACHE.
* **Reconnect and retry.**  When the connection drops, the keepalive finds it
  dead, a command gets no answer for ``command_timeout_s`` or the target asks
  for a logout, the client logs in again (backoff from
  ``reconnect_delay_s``) with the same ISID and re-issues every command that
  had no answer: a READ or WRITE at the same LBA is idempotent, and
  overlapping writes still go in their order since each waits for the one
  before it.  Commands whose second copy could change the outcome
  (PERSISTENT RESERVE OUT PREEMPT, REGISTER with the old key) fail with
  :class:`ConnectionLost` instead.  UNIT ATTENTION, BUSY, TASK SET FULL and
  TASK ABORTED are retried too.  A call fails only once ``give_up_s`` has
  passed since it was issued.

Errors are :class:`IscsiError` subclasses: :class:`LoginError`,
:class:`CheckCondition` (key/ASC/ASCQ), :class:`ReservationConflict`,
:class:`CommandFailed`, :class:`ConnectionLost`, :class:`Timeout`
(:mod:`steelfusion.iscsi.errors`); where a target is, an ``iscsi://`` URL or
a portal, is parsed by :mod:`steelfusion.iscsi.url`.  Their public names are
importable from here.

Everything runs on one event loop; the client is not thread-safe.  Buffers
passed to :meth:`IscsiClient.write` are sent without a copy: do not change
them before the call returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import Iterable
from typing import Any

from steelfusion import log
from steelfusion.iscsi import commands as cdbs
from steelfusion.iscsi.chap import ChapCredentials
from steelfusion.iscsi.errors import (
    CheckCondition,
    CommandFailed,
    ConnectionLost,
    IscsiError,
    LoginError,
    ReservationConflict,
    Timeout,
)
from steelfusion.iscsi.initiator import (
    AsyncEvent,
    CommandComplete,
    CommandRejected,
    ConnectionDead,
    Event,
    InitiatorConfig,
    InitiatorConnection,
    LoginComplete,
    LoginFailed,
    LogoutComplete,
    LogoutRequested,
    Rejected,
    State,
    TargetProtocolError,
    TargetWillDrop,
    random_isid,
)
from steelfusion.iscsi.pdu import Buffer, RejectReason
from steelfusion.iscsi.text import InitiatorLimits
from steelfusion.iscsi.url import ISCSI_PORT as ISCSI_PORT
from steelfusion.iscsi.url import IscsiUrl as IscsiUrl
from steelfusion.iscsi.url import parse_url, split_portal

DEFAULT_INITIATOR_NAME = "iqn.2026-01.io.steelfusion:initiator"

_GOOD, _CHECK_CONDITION, _BUSY, _CONFLICT, _TASK_SET_FULL, _TASK_ABORTED = \
    0x00, 0x02, 0x08, 0x18, 0x28, 0x40
_UNIT_ATTENTION = 0x6
RETRIES_MAX = 32
"""Retries of one command for UNIT ATTENTION, BUSY and the like."""
REDIRECTS_MAX = 4


# --------------------------------------------------------------------------- commands


UNMAP_BLOCKS_MAX = 1 << 21
"""Blocks per UNMAP descriptor sent (1 GiB of 512-byte blocks; tgt takes far more)."""

class _Op:
    """One command as the caller issued it, across retries and reconnects."""

    __slots__ = ("cdb", "data", "deadline", "done", "end", "future", "into", "read_length",
                 "reissue", "sent_at", "seq", "start", "sync", "tag", "what", "write")

    def __init__(self, seq: int, what: str, cdb: bytes, *, data: Buffer = b"",
                 read_length: int = 0, into: memoryview | None = None,
                 span: tuple[int, int] | None = None, write: bool = False, sync: bool = False,
                 reissue: bool = True) -> None:
        self.seq, self.what, self.cdb, self.data = seq, what, cdb, data
        self.read_length, self.into = read_length, into
        self.start, self.end = span if span is not None else (0, 0)
        self.write, self.sync, self.reissue = write, sync, reissue
        self.tag: int | None = None
        self.sent_at = self.deadline = 0.0
        self.done: asyncio.Future[None] | None = None
        self.future: asyncio.Future[CommandComplete] | None = None

    def waits_for(self, earlier: _Op) -> bool:
        """Per-range order: overlapping, and one of the two writes; a sync
        waits for every earlier write."""
        if self.sync:
            return earlier.write
        return (earlier.write or self.write) and self.start < earlier.end \
            and earlier.start < self.end


class _Protocol(asyncio.BufferedProtocol):
    """One TCP connection: feeds the sans-IO connection, hands events up."""

    def __init__(self, client: IscsiClient, conn: InitiatorConnection) -> None:
        self.client = client
        self.conn = conn
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            events = self.conn.buffer_updated(nbytes)
        except TargetProtocolError as e:
            self.client._lost(self, f"protocol error: {e}")
            return
        self.client._handle(self, events)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._lost(self, f"connection lost: {exc!r}" if exc else "connection closed")

    def pause_writing(self) -> None:
        self.client._writable = False

    def resume_writing(self) -> None:
        self.client._writable = True
        self.client._wake()


class IscsiClient:
    """One LUN of one iSCSI target, over one connection that heals itself.

    Give ``url`` (``iscsi://[user%secret@]host[:port]/iqn/lun``) or
    ``portal``/``iqn``/``lun``.  ``chap`` is our (user, secret), ``mutual``
    the target's for mutual CHAP.  See the module docstring for ordering,
    retries and errors.
    """

    def __init__(self, url: str | None = None, initiator_name: str = DEFAULT_INITIATOR_NAME, *,
                 portal: str | None = None, iqn: str | None = None, lun: int = 0,
                 chap: tuple[str, str | bytes] | None = None,
                 mutual: tuple[str, str | bytes] | None = None,
                 chap_algorithms: tuple[int, ...] = (5,),
                 limits: InitiatorLimits | None = None, isid: int | None = None,
                 give_up_s: float = 120.0, command_timeout_s: float = 60.0,
                 login_timeout_s: float = 15.0, nop_interval_s: float | None = 5.0,
                 nop_timeout_s: float = 5.0, reconnect_delay_s: tuple[float, float] = (0.05, 2.0),
                 max_inflight: int = 128, max_inflight_bytes: int = 64 << 20,
                 max_io_bytes: int = 1 << 20) -> None:
        if url is not None:
            u = parse_url(url)
            host, port, iqn, lun = u.host, u.port, u.target, u.lun
            if chap is None and u.user is not None:
                chap = (u.user, u.secret or "")
        elif portal is not None and iqn is not None:
            host, port = split_portal(portal)
        else:
            raise ValueError("give a URL, or portal and iqn")
        self.host, self.port, self.lun = host, port, lun
        self.config = InitiatorConfig(
            initiator_name, iqn, isid=isid if isid is not None else random_isid(),
            chap=ChapCredentials.of(*chap) if chap else None,
            mutual=ChapCredentials.of(*mutual) if mutual else None,
            chap_algorithms=chap_algorithms, limits=limits or InitiatorLimits(),
            login_timeout_s=login_timeout_s, nop_interval_s=nop_interval_s,
            nop_timeout_s=nop_timeout_s)
        self.give_up_s, self.command_timeout_s = give_up_s, command_timeout_s
        self.reconnect_delay_s = reconnect_delay_s
        self.max_inflight, self.max_inflight_bytes = max_inflight, max_inflight_bytes
        self.max_io_bytes = max_io_bytes
        self.block_size = self.blocks = 0
        self.reconnects = 0
        """Logins after the first (for status pages and tests)."""
        self.reissued = 0
        """Commands sent again after a reconnect."""
        self.pr_key: int | None = None
        """The reservation key this client registered (PERSISTENT RESERVE OUT), kept across
        reconnects by :meth:`_keep_registration`."""
        self.pr_lost = False
        """After a reconnect our key was gone from the LUN: another initiator preempted it
        (fenced); the client did not register again."""
        self.unit_attentions: list[cdbs.Sense] = []
        """Unit attentions seen (and retried through), the last 64."""
        self._log = log.get("iscsi-client").bind(target=iqn, portal=f"{host}:{port}")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proto: _Protocol | None = None
        self._up = False  # the current connection logged in
        self._conn: InitiatorConnection | None = None
        self._login: asyncio.Future[Event] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_soon, self._writable = False, True
        self._seq = itertools.count()
        self._pending: dict[int, _Op] = {}  # issued, not finished: for the order rules
        self._by_tag: dict[int, _Op] = {}  # on the current connection
        self._backlog: list[_Op] = []  # holding a slot, waiting for a connection
        self._inflight = self._inflight_bytes = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._reconnect: asyncio.Task[None] | None = None
        self._broken: IscsiError | None = None
        self._closed = False
        self._last_loss = ""

    # ----------------------------------------------------------------- connect / close

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.state is State.FULL_FEATURE

    @property
    def last_loss(self) -> str:
        """Why the last connection ended or the last login failed ("" before any)."""
        return self._last_loss

    async def connect(self) -> None:
        """TCP connection, login, READ CAPACITY(16).  Raises
        :class:`LoginError`, :class:`ConnectionLost` or :class:`Timeout`."""
        first = self._loop is None
        self._loop = asyncio.get_running_loop()
        await self._open()
        if first:
            self._arm_watchdog()
        await self.capacity()

    async def close(self) -> None:
        """Log out (the target finishes what runs first) and close.  Calls
        still waiting fail with :class:`ConnectionLost`."""
        if self._closed:
            return
        self._closed = True
        if self._reconnect is not None:
            self._reconnect.cancel()
            with contextlib.suppress(BaseException):
                await self._reconnect
        conn, proto = self._conn, self._proto
        if conn is not None and proto is not None and conn.state is State.FULL_FEATURE:
            self._login = self._future()
            conn.logout()
            self._flush()
            with contextlib.suppress(TimeoutError, IscsiError):
                async with asyncio.timeout(self.config.login_timeout_s):
                    await self._login
        self._drop("client closed")
        self._fail_all(ConnectionLost("client closed"))

    async def __aenter__(self) -> IscsiClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _future(self) -> asyncio.Future[Any]:
        assert self._loop is not None
        return self._loop.create_future()

    async def _open(self) -> None:
        """One login, following redirects (RFC 7143 §11.13.5, class 1)."""
        assert self._loop is not None
        host, port = self.host, self.port
        for _ in range(REDIRECTS_MAX + 1):
            conn = InitiatorConnection(self.config, now=self._loop.time())
            self._login = login = self._future()
            try:
                async with asyncio.timeout(self.config.login_timeout_s):
                    _, proto = await self._loop.create_connection(
                        lambda c=conn: _Protocol(self, c), host, port)  # type: ignore[misc]
                    self._proto, self._conn = proto, conn
                    self._writable = True
                    self._flush()
                    self._arm()
                    ev = await login
            except TimeoutError:
                self._drop("login timed out")
                raise Timeout(f"login to {host}:{port} timed out") from None
            except OSError as e:
                raise ConnectionLost(f"cannot connect to {host}:{port}: {e}") from None
            if isinstance(ev, LoginComplete):
                self._up = True
                self._log.info("iscsi_client_logged_in", tsih=ev.tsih, params=repr(ev.params))
                return
            assert isinstance(ev, LoginFailed)
            self._drop(ev.reason)
            if ev.redirect and ev.target_address:
                host, port = split_portal(ev.target_address)
                if ev.status == 0x0102:  # moved permanently
                    self.host, self.port = host, port
                self._log.info("iscsi_client_redirected", to=f"{host}:{port}")
                continue
            raise LoginError(f"login to {host}:{port} failed: {ev.reason}", ev.status)
        raise LoginError(f"more than {REDIRECTS_MAX} login redirects")

    # ----------------------------------------------------------------- the calls

    async def read(self, offset: int, length: int) -> bytearray:
        """``length`` bytes at ``offset`` (both whole blocks)."""
        out = bytearray(length)
        await self.readinto(offset, memoryview(out))
        return out

    async def readinto(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` (whole blocks) from ``offset``: Data-In lands there."""
        view = view.cast("B")
        lba, blocks = self._blocks(offset, len(view))
        step = max(1, self.max_io_bytes // self.block_size)
        await self._all(
            self._run(_Op(next(self._seq), "READ(16)", cdbs.read16(lba + i, n),
                          read_length=n * self.block_size,
                          into=view[i * self.block_size:(i + n) * self.block_size],
                          span=(lba + i, lba + i + n)))
            for i, n in _cut(blocks, step))

    async def write(self, offset: int, data: Buffer) -> None:
        """Write ``data`` (whole blocks) at ``offset``."""
        view = memoryview(data).cast("B")
        lba, blocks = self._blocks(offset, len(view))
        bs = self.block_size
        step = max(1, self.max_io_bytes // bs)
        await self._all(
            self._run(_Op(next(self._seq), "WRITE(16)", cdbs.write16(lba + i, n),
                          data=view[i * bs:(i + n) * bs], span=(lba + i, lba + i + n),
                          write=True))
            for i, n in _cut(blocks, step))

    async def sync(self) -> None:
        """SYNCHRONIZE CACHE(16) over the LUN, after every write issued before it."""
        await self._run(_Op(next(self._seq), "SYNCHRONIZE CACHE(16)", cdbs.sync_cache16(),
                            sync=True))

    async def capacity(self) -> tuple[int, int]:
        """(block size, blocks), from READ CAPACITY(16)."""
        done = await self._run(_Op(next(self._seq), "READ CAPACITY(16)",
                                   cdbs.read_capacity16(), read_length=32))
        self.block_size, self.blocks = cdbs.parse_capacity16(done.data)
        return self.block_size, self.blocks

    async def test_unit_ready(self) -> None:
        await self._run(_Op(next(self._seq), "TEST UNIT READY", cdbs.tur()))

    async def inquiry(self, page: int | None = None) -> bytes:
        done = await self._run(_Op(next(self._seq), "INQUIRY", cdbs.inquiry(page),
                                   read_length=255))
        return bytes(done.data)

    async def unmap(self, offset: int, length: int) -> None:
        """UNMAP the byte range (whole blocks), ordered like a write over it."""
        lba, blocks = self._blocks(offset, length)
        for first, n in _cut(blocks, UNMAP_BLOCKS_MAX):
            cdb, params = cdbs.unmap([(lba + first, n)])
            await self._run(_Op(next(self._seq), "UNMAP", cdb, data=params,
                                span=(offset + first * self.block_size,
                                      offset + (first + n) * self.block_size), write=True))

    async def lba_status(self, lba: int) -> list[tuple[int, int, int]]:
        """GET LBA STATUS from ``lba``: (LBA, blocks, 0 mapped / 1 deallocated / 2 anchored)."""
        done = await self._run(_Op(next(self._seq), "GET LBA STATUS",
                                   cdbs.get_lba_status(lba), read_length=4096))
        return cdbs.parse_lba_status(done.data)

    async def report_luns(self) -> list[int]:
        done = await self._run(_Op(next(self._seq), "REPORT LUNS", cdbs.report_luns(),
                                   read_length=4096))
        return cdbs.parse_report_luns(done.data)

    async def pr_read_keys(self) -> tuple[int, list[int]]:
        """(PRgeneration, registered keys)."""
        done = await self._run(_Op(next(self._seq), "PR IN READ KEYS",
                                   cdbs.pr_in(cdbs.PrIn.READ_KEYS), read_length=8192))
        return cdbs.parse_read_keys(done.data)

    async def pr_read_reservation(self) -> tuple[int, int | None, int | None]:
        """(PRgeneration, holder's key, type); key and type None when unreserved."""
        done = await self._run(_Op(next(self._seq), "PR IN READ RESERVATION",
                                   cdbs.pr_in(cdbs.PrIn.READ_RESERVATION), read_length=8192))
        return cdbs.parse_read_reservation(done.data)

    async def pr_register(self, key: int, *, old_key: int | None = None,
                          aptpl: bool = False) -> None:
        """Register ``key`` for this I_T nexus (0 unregisters).  Without
        ``old_key`` it is REGISTER AND IGNORE EXISTING KEY, which is safe
        to re-issue after a reconnect."""
        if old_key is None:
            await self._pr_out(cdbs.PrOut.REGISTER_AND_IGNORE, 0, key, aptpl=aptpl)
        else:
            await self._pr_out(cdbs.PrOut.REGISTER, old_key, key, aptpl=aptpl, reissue=False)
        self.pr_key, self.pr_lost = key or None, False

    async def pr_reserve(self, key: int, pr_type: int) -> None:
        await self._pr_out(cdbs.PrOut.RESERVE, key, pr_type=pr_type)

    async def pr_release(self, key: int, pr_type: int) -> None:
        await self._pr_out(cdbs.PrOut.RELEASE, key, pr_type=pr_type)

    async def pr_preempt(self, key: int, victim_key: int, pr_type: int, *,
                         abort: bool = False) -> None:
        """PREEMPT (or PREEMPT AND ABORT) the registrations of ``victim_key``;
        never re-issued after a reconnect (its outcome would be unknown)."""
        await self._pr_out(cdbs.PrOut.PREEMPT_AND_ABORT if abort else cdbs.PrOut.PREEMPT, key,
                           victim_key, pr_type=pr_type, reissue=False)

    async def _pr_out(self, action: cdbs.PrOut, key: int, sa_key: int = 0, *, pr_type: int = 0,
                      aptpl: bool = False, reissue: bool = True) -> None:
        cdb, params = cdbs.pr_out(action, key, sa_key, pr_type, aptpl=aptpl)
        # It changes who may write: ordered after earlier commands and before later ones.
        await self._run(_Op(next(self._seq), f"PR OUT {action.name}", cdb, data=params,
                            span=(0, 1 << 64), write=True, reissue=reissue))

    def _blocks(self, offset: int, length: int) -> tuple[int, int]:
        bs = self.block_size
        if not bs:
            raise IscsiError("not connected: call connect() first")
        if offset < 0 or offset % bs or length % bs:
            raise ValueError(f"offset {offset} and length {length} must be whole "
                             f"{bs}-byte blocks")
        return offset // bs, length // bs

    @staticmethod
    async def _all(runs: Iterable[Any]) -> None:
        """Run the commands of one call together; the first failure is raised
        once all have ended (none is left running behind the caller)."""
        results = await asyncio.gather(*runs, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    # ----------------------------------------------------------------- one command

    async def _run(self, op: _Op) -> CommandComplete:
        if self._broken is not None:
            raise self._broken
        if self._closed or self._loop is None:
            raise ConnectionLost("client closed" if self._closed else "not connected")
        loop = self._loop
        op.deadline = loop.time() + self.give_up_s
        op.done = loop.create_future()
        deps = [e.done for e in self._pending.values() if op.waits_for(e) and e.done]
        self._pending[op.seq] = op
        slot = False
        try:
            async with asyncio.timeout_at(op.deadline):
                for dep in deps:
                    await asyncio.shield(dep)
                await self._acquire(op)
                slot = True
                return await self._attempts(op)
        except TimeoutError:
            self._forget(op)
            if not self.connected:
                raise ConnectionLost(f"{op.what}: no connection to {self.host}:{self.port} "
                                     f"for {self.give_up_s:g}s ({self._last_loss})") from None
            raise Timeout(f"{op.what}: no answer within {self.give_up_s:g}s") from None
        finally:
            if slot:
                self._inflight -= 1
                self._inflight_bytes -= len(op.data) + op.read_length
                self._wake()
            del self._pending[op.seq]
            op.done.set_result(None)

    async def _attempts(self, op: _Op) -> CommandComplete:
        """Send ``op`` until it has an answer that is not worth retrying."""
        assert self._loop is not None
        pause = 0.01
        for _ in range(RETRIES_MAX):
            if self._broken is not None or self._closed:
                raise self._broken or ConnectionLost("client closed")
            op.future = self._loop.create_future()
            self._send(op)
            done = await op.future
            status = done.status
            if status == _GOOD and not done.response:
                if op.read_length and len(done.data) < op.read_length and op.into is not None:
                    raise CommandFailed(f"{op.what}: {len(done.data)} of {op.read_length} "
                                        "bytes returned")
                return done
            sense = done.sense
            if status == _CHECK_CONDITION and sense is not None and sense.key == _UNIT_ATTENTION:
                self.unit_attentions = [*self.unit_attentions[-63:], sense]
                self._log.info("iscsi_client_unit_attention", sense=str(sense), op=op.what)
                continue
            if status in (_BUSY, _TASK_SET_FULL, _TASK_ABORTED) or (
                    status == _CHECK_CONDITION and sense is not None
                    and (sense.key, sense.asc, sense.ascq) == (0x2, 0x04, 0x01)):
                await asyncio.sleep(pause)  # busy, or becoming ready
                pause = min(pause * 2, 1.0)
                continue
            if done.response:
                raise CommandFailed(f"{op.what}: iSCSI response 0x{done.response:02x} "
                                    "(target failure)")
            if status == _CHECK_CONDITION:
                raise CheckCondition(sense, op.what)
            if status == _CONFLICT:
                raise ReservationConflict(f"{op.what}: RESERVATION CONFLICT", status)
            raise CommandFailed(f"{op.what}: status 0x{status:02x}", status)
        raise CommandFailed(f"{op.what}: still failing after {RETRIES_MAX} retries")

    async def _acquire(self, op: _Op) -> None:
        """A slot under ``max_inflight`` and ``max_inflight_bytes`` (one
        command always fits) while the transport takes data."""
        size = len(op.data) + op.read_length
        while not (self._inflight < self.max_inflight and self._writable and (
                not self._inflight or self._inflight_bytes + size <= self.max_inflight_bytes)):
            waiter = self._future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        self._inflight += 1
        self._inflight_bytes += size

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _send(self, op: _Op) -> None:
        conn = self._conn
        if conn is None or conn.state is not State.FULL_FEATURE:
            self._backlog.append(op)
            return
        op.tag = tag = conn.submit(op.cdb, lun=self.lun, data=op.data,
                                   read_length=op.read_length, into=op.into)
        self._by_tag[tag] = op
        assert self._loop is not None
        op.sent_at = self._loop.time()
        if not self._flush_soon:
            self._flush_soon = True
            self._loop.call_soon(self._flush)

    def _forget(self, op: _Op) -> None:
        """``op`` gave up: take it back where it has not gone out yet."""
        with contextlib.suppress(ValueError):
            self._backlog.remove(op)
        if op.tag is not None and self._by_tag.get(op.tag) is op:
            del self._by_tag[op.tag]
            if self._conn is not None:
                self._conn.cancel(op.tag)

    # ----------------------------------------------------------------- events

    def _handle(self, proto: _Protocol, events: list[Event]) -> None:
        if proto is not self._proto:
            return
        for ev in events:
            if isinstance(ev, CommandComplete):
                op = self._by_tag.pop(ev.tag, None)
                if op is not None and op.future is not None and not op.future.done():
                    op.future.set_result(ev)
            elif isinstance(ev, CommandRejected):
                op = self._by_tag.pop(ev.tag, None)
                if op is None or op.future is None or op.future.done():
                    continue
                if ev.reason == RejectReason.WAITING_FOR_LOGOUT and op.reissue:
                    op.tag = None
                    self._backlog.append(op)  # again after the new login
                else:
                    op.future.set_exception(CommandFailed(
                        f"{op.what}: rejected by the target (reason 0x{ev.reason:02x})"))
            elif isinstance(ev, LoginComplete | LoginFailed | LogoutComplete):
                if self._login is not None and not self._login.done():
                    self._login.set_result(ev)
                if isinstance(ev, LogoutComplete) and not self._closed:
                    self._lost(proto, "logged out")
                    return
            elif isinstance(ev, ConnectionDead):
                self._lost(proto, ev.reason)
                return
            elif isinstance(ev, LogoutRequested):
                self._log.warning("iscsi_client_logout_requested")
                if self._conn is not None and self._conn.state is State.FULL_FEATURE:
                    self._conn.logout()
                    assert self._loop is not None
                    self._loop.call_later(self.config.login_timeout_s, self._lost, proto,
                                          "no Logout Response")
            elif isinstance(ev, TargetWillDrop):
                self._lost(proto, "the target announced it drops the connection",
                           ev.time2wait_s)
                return
            elif isinstance(ev, AsyncEvent | Rejected):
                self._log.warning("iscsi_client_target_event", event=repr(ev))
        self._flush()

    def _flush(self) -> None:
        self._flush_soon = False
        proto, conn = self._proto, self._conn
        if proto is None or conn is None or proto.transport is None:
            return
        parts = conn.data_to_send()
        if parts and not proto.transport.is_closing():
            proto.transport.writelines(parts)
        self._arm()

    def _arm(self) -> None:
        """Keep one loop timer on the connection's next deadline."""
        conn, loop = self._conn, self._loop
        when = conn.get_timer() if conn is not None else None
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None and loop is not None:
            self._timer = loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        conn, proto, loop = self._conn, self._proto, self._loop
        if conn is None or proto is None or loop is None:
            return
        self._handle(proto, conn.handle_timer(loop.time()))

    def _arm_watchdog(self) -> None:
        """Every quarter of ``command_timeout_s``: a command without an answer
        for that long means the connection is stuck (ERL 0: start over)."""
        loop = self._loop
        if loop is None or self._closed:
            return
        now = loop.time()
        if self._proto is not None and any(now - op.sent_at > self.command_timeout_s
                                           for op in self._by_tag.values()):
            self._lost(self._proto, f"a command had no answer for {self.command_timeout_s:g}s")
        loop.call_later(self.command_timeout_s / 4, self._arm_watchdog)

    # ----------------------------------------------------------------- losing and healing

    def _drop(self, reason: str) -> None:
        """Close the current connection (if any) without healing."""
        proto, conn = self._proto, self._conn
        self._proto = self._conn = None
        self._up = False
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_at = None
        if conn is not None:
            conn.close()
        if proto is not None and proto.transport is not None:
            proto.transport.abort()
        if self._login is not None and not self._login.done():
            self._login.set_exception(ConnectionLost(reason))

    def _lost(self, proto: _Protocol, reason: str, delay_s: float = 0.0) -> None:
        """The connection is gone: keep its unanswered commands for the next
        one and start healing."""
        if proto is not self._proto:
            return
        self._last_loss = reason
        was_up = self._up
        self._drop(reason)
        if not was_up:
            return  # a login that failed: _open reports it
        self._log.warning("iscsi_client_connection_lost", reason=reason,
                          in_flight=len(self._by_tag))
        ops, self._by_tag = list(self._by_tag.values()), {}
        for op in ops:
            op.tag = None
            if op.future is None or op.future.done():
                continue
            if op.reissue:
                self._backlog.append(op)
            else:
                op.future.set_exception(ConnectionLost(
                    f"{op.what}: connection lost with the command in flight; its outcome is "
                    f"unknown ({reason})"))
        if not self._closed and self._reconnect is None:
            assert self._loop is not None
            self._reconnect = self._loop.create_task(self._heal(delay_s))

    async def _heal(self, delay_s: float) -> None:
        low, high = self.reconnect_delay_s
        delay = max(delay_s, low)
        try:
            while not self._closed:
                await asyncio.sleep(delay)
                try:
                    await self._open()
                except LoginError as e:
                    if e.status in (0x0201, 0x0202):
                        self._broken = e  # our credentials or ACL: no retry heals that
                        self._fail_all(e)
                        return
                    self._last_loss = str(e)
                except IscsiError as e:
                    self._last_loss = str(e)
                else:
                    if self.pr_key is not None and not await self._keep_registration():
                        delay = min(delay * 2, high)
                        continue  # lost again while asking: log in again
                    self.reconnects += 1
                    backlog, self._backlog = sorted(self._backlog, key=lambda o: o.seq), []
                    self.reissued += len(backlog)
                    for op in backlog:
                        self._send(op)
                    self._flush()
                    self._wake()
                    return
                delay = min(delay * 2, high)
        finally:
            self._reconnect = None

    async def keep_registration(self, key: int) -> None:
        """Right after login: register this session with ``key`` if the key is still
        listed on the LUN, else remember it as lost (:attr:`pr_lost`: preempted, fenced).
        A LUN with no registration at all is a fresh (or restarted) array: register."""
        done = await self._run(_Op(next(self._seq), "PR IN READ KEYS",
                                   cdbs.pr_in(cdbs.PrIn.READ_KEYS), read_length=8192))
        keys = cdbs.parse_read_keys(done.data)[1]
        if keys and key not in keys:
            self.pr_key, self.pr_lost = None, True
            self._log.warning("iscsi_client_registration_gone", key=f"0x{key:016x}",
                              why="not listed at login: preempted (fenced)")
            return
        await self.pr_register(key)

    async def _keep_registration(self) -> bool:
        """After a new login, before any command is re-sent: is this I_T nexus still
        registered with :attr:`pr_key`? SPC-4 (§5.13.7) keeps a registration across a new
        login with the same ISID; tgt binds it to the session instead, so there the key is
        still listed but the new session is not registered, and every write after a mere
        reconnect would be refused as if fenced. REGISTER with our key as both keys answers
        it in one command; when refused, READ KEYS tells tgt's forgetting (our key is still
        listed: register again) from a preemption (it is gone: stay fenced, never register
        silently — the writes then get RESERVATION CONFLICT). False: the connection was
        lost again meanwhile. A fencer PREEMPTing between our READ KEYS and REGISTER is not
        seen here: it reads the keys back after fencing (steelfusion/fence.py)."""
        key = self.pr_key
        assert key is not None

        async def ask(what: str, cdb: bytes, data: bytes = b"", read_length: int = 0
                      ) -> CommandComplete:
            # straight to the new connection: the re-sent commands wait behind this
            return await self._attempts(_Op(next(self._seq), what, cdb, data=data,
                                            read_length=read_length, reissue=False))

        try:
            try:
                await ask("PR OUT REGISTER (still ours?)",
                          *cdbs.pr_out(cdbs.PrOut.REGISTER, key, key))
                return True
            except ReservationConflict:
                pass
            done = await ask("PR IN READ KEYS", cdbs.pr_in(cdbs.PrIn.READ_KEYS),
                             read_length=8192)
            if key in cdbs.parse_read_keys(done.data)[1]:
                await ask("PR OUT REGISTER AND IGNORE EXISTING KEY",
                          *cdbs.pr_out(cdbs.PrOut.REGISTER_AND_IGNORE, 0, key))
                self._log.info("iscsi_client_registered_again", key=f"0x{key:016x}",
                               why="the target forgot this session's registration on login")
                return True
            self.pr_key, self.pr_lost = None, True
            self._log.warning("iscsi_client_registration_gone", key=f"0x{key:016x}",
                              why="preempted while the connection was down: fenced")
            return True
        except ConnectionLost:
            return False
        except IscsiError as e:  # e.g. a target without PR: nothing to keep
            self._log.warning("iscsi_client_registration_unknown", key=f"0x{key:016x}",
                              error=str(e))
            return True

    def _fail_all(self, error: IscsiError) -> None:
        ops = list(self._backlog) + list(self._by_tag.values())
        self._backlog, self._by_tag = [], {}
        for op in ops:
            if op.future is not None and not op.future.done():
                op.future.set_exception(error)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(error)
        self._waiters = []


def _cut(blocks: int, step: int) -> list[tuple[int, int]]:
    """(first block, count) pieces of at most ``step`` blocks."""
    return [(i, min(step, blocks - i)) for i in range(0, blocks, step)]
