"""The asyncio iSCSI client against tgtd (a real target, on loopback; marked
lab): login and CHAP, capacity, 64 MiB of pipelined writes read back, sync,
per-range order of overlapping writes, persistent reservations, and
reconnect-and-retry through a TCP proxy the test cuts under load.  The
unmarked tests use the project's own target session in this process, for
what tgt cannot be made to do (BUSY, unit attentions, Async Messages)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.iscsi_session import (
    CloseConnection,
    LoginComplete,
    LogoutComplete,
    ScsiCommandReady,
    SessionConfig,
    TargetConnection,
    TargetInfo,
)
from edge.scsi import LogicalUnit
from edge.scsi.lu import ItNexus
from steelfusion.bench import TgtServer
from steelfusion.iscsi.client import (
    CheckCondition,
    ConnectionLost,
    IscsiClient,
    LoginError,
    ReservationConflict,
    Timeout,
    parse_url,
    split_portal,
)
from steelfusion.iscsi.pdu import AsyncMessage
from tests.test_scsi import MemBackend

lab = pytest.mark.lab  # the tests that start tgtd

MiB = 1 << 20
INITIATOR = "iqn.2026-01.io.steelfusion:client-test"


@pytest.fixture(scope="module")
def tgt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TgtServer]:
    server = TgtServer(tmp_path_factory.mktemp("tgt"), 160 * MiB)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class LoopbackServer:
    """A server on a free loopback port whose connections the test can cut."""

    port = 0
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"iscsi://127.0.0.1:{self.port}/{TgtServer.IQN}/1"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()

    def cut(self) -> None:
        raise NotImplementedError

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class Proxy(LoopbackServer):
    """A TCP proxy on loopback that the test can cut (every connection
    aborted), stall (the connections open now pass nothing any more) or
    make refuse new connections."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.port = 0
        self.links: dict[asyncio.Transport, asyncio.Event] = {}
        self.refuse = False
        self.connections = 0

    def cut(self) -> None:
        for t in list(self.links):
            t.abort()
        self.links.clear()

    def stall(self) -> None:
        for flowing in self.links.values():
            flowing.clear()

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.transport.abort()
            return
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        flowing = asyncio.Event()
        flowing.set()
        ends = (writer.transport, up_writer.transport)
        for t in ends:
            self.links[t] = flowing  # type: ignore[index]

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await r.read(1 << 18):
                    await flowing.wait()
                    w.write(data)
                    await w.drain()
            for t in ends:
                t.abort()
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        for t in ends:
            self.links.pop(t, None)  # type: ignore[call-overload]


@contextlib.asynccontextmanager
async def proxied(tgt: TgtServer) -> AsyncIterator[Proxy]:
    proxy = Proxy(tgt.host, tgt.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


@contextlib.asynccontextmanager
async def client(url: str, **kw: object) -> AsyncIterator[IscsiClient]:
    c = IscsiClient(url, INITIATOR, **kw)  # type: ignore[arg-type]
    await c.connect()
    try:
        yield c
    finally:
        await c.close()


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_url_parsing() -> None:
    u = parse_url("iscsi://alice%se%cret@[::1]:3261/iqn.2026-01.x:y/3")
    assert (u.host, u.port, u.target, u.lun, u.user, u.secret) == \
        ("::1", 3261, "iqn.2026-01.x:y", 3, "alice", "se%cret")
    assert u.portal == "[::1]:3261"
    u = parse_url("iscsi://127.0.0.1/iqn.2026-01.x:y/0")
    assert (u.port, u.user, u.secret) == (3260, None, None)
    for bad in ("http://h/i/0", "iscsi://h/iqn", "iscsi://h/iqn/x", "iscsi://h:0/i/0",
                "iscsi://@h/i/0", "iscsi://h/i/0?header_digest=crc32c", "iscsi:///i/0"):
        with pytest.raises(ValueError):
            parse_url(bad)
    assert split_portal("10.0.0.1:3262,1") == ("10.0.0.1", 3262)
    assert split_portal("[fe80::1],1") == ("fe80::1", 3260)


@lab
def test_connect_capacity_and_inquiry(tgt: TgtServer) -> None:
    async def go() -> None:
        async with client(tgt.url) as c:
            assert (c.block_size, c.blocks) == (512, 160 * MiB // 512)
            assert await c.capacity() == (512, 160 * MiB // 512)
            await c.test_unit_ready()
            inq = await c.inquiry()
            assert inq[0] & 0x1F == 0 and len(inq) >= 36
            assert 1 in await c.report_luns()
            params = c._conn.params  # type: ignore[union-attr]
            # tgt's answers: InitialR2T=Yes, 8 KiB segments to it, one R2T at a time.
            assert params.initial_r2t and params.target_max_recv_data_segment_length == 8192
            assert params.max_outstanding_r2t == 1 and params.first_burst_length == 65536
            with pytest.raises(CheckCondition) as e:
                await c.read(c.blocks * 512, 512)
            assert (e.value.key, e.value.asc) == (5, 0x21)
            with pytest.raises(ValueError):
                await c.write(100, b"x" * 512)
    run(go())


@lab
def test_login_refused(tgt: TgtServer) -> None:
    async def go() -> None:
        c = IscsiClient(f"iscsi://{tgt.portal}/iqn.2026-01.io.steelfusion:nope/1", INITIATOR)
        with pytest.raises(LoginError) as e:
            await c.connect()
        assert e.value.status is not None and e.value.status >> 8 == 2
        closed = IscsiClient(f"iscsi://127.0.0.1:{_free_port()}/{TgtServer.IQN}/1", INITIATOR)
        with pytest.raises(ConnectionLost):
            await closed.connect()
    run(go())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@lab
def test_64_mib_pipelined_writes_read_back(tgt: TgtServer) -> None:
    data = random.Random(64).randbytes(64 * MiB)

    async def go() -> None:
        async with client(tgt.url, max_io_bytes=512 * 1024) as c:
            view = memoryview(data)
            chunk = 256 * 1024
            await asyncio.gather(*(c.write(off, view[off:off + chunk])
                                   for off in range(0, len(data), chunk)))
            await c.sync()
            assert await c.read(0, len(data)) == data
            # And through a fresh session: it reached the target, not a cache of ours.
        async with client(tgt.url) as c2:
            assert await c2.read(0, len(data)) == data
    run(go())


@lab
def test_overlapping_writes_keep_their_order(tgt: TgtServer) -> None:
    rng = random.Random(5)
    base = 100 * MiB

    async def go() -> None:
        async with client(tgt.url, max_io_bytes=64 * 1024) as c:
            expected = bytearray(4 * MiB)
            calls = []
            for i in range(200):
                blocks = rng.choice((1, 8, 64, 300, 2048))
                lba = rng.randrange(0, len(expected) // 512 - blocks)
                payload = bytes([i % 251 + 1]) * (blocks * 512)
                expected[lba * 512:(lba + blocks) * 512] = payload
                calls.append(c.write(base + lba * 512, payload))
                if i % 50 == 49:  # reads issued among the writes see what came before
                    snapshot = bytes(expected)
                    calls.append(_expect(c.read(base, len(snapshot)), snapshot))
            await asyncio.gather(*calls)
            await c.sync()
            assert await c.read(base, len(expected)) == expected
    run(go())


async def _expect(read: object, want: bytes) -> None:
    got = await read  # type: ignore[misc]
    assert got == want


@lab
def test_persistent_reservations(tgt: TgtServer) -> None:
    async def go() -> None:
        async with client(tgt.url) as a, client(tgt.url) as b:
            await a.pr_register(0xA1)
            await a.pr_register(0xA1)  # again: REGISTER AND IGNORE EXISTING KEY
            await b.pr_register(0xB2)
            _, keys = await a.pr_read_keys()
            assert sorted(keys) == [0xA1, 0xB2]
            await a.pr_reserve(0xA1, 1)  # write exclusive
            assert (await b.pr_read_reservation())[1:] == (0xA1, 1)
            with pytest.raises(ReservationConflict):
                await b.write(0, bytes(512))
            await b.pr_preempt(0xB2, 0xA1, 1)
            assert (await a.pr_read_reservation())[1:] == (0xB2, 1)
            await b.pr_release(0xB2, 1)
            await b.pr_register(0)
            assert (await b.pr_read_keys())[1] == []
    run(go())


@lab
def test_a_registration_survives_a_reconnect_and_a_preemption_is_not_undone(
        tgt: TgtServer) -> None:
    """tgt forgets a session's registration when the initiator logs in again (see
    tests/test_fence.py); the client registers again after a reconnect, before re-sending
    anything, so a mere reconnect is not a fence. A key preempted while the connection was
    down stays gone: the next write gets RESERVATION CONFLICT and nobody re-registered it."""
    async def go() -> None:
        async with proxied(tgt) as proxy, client(tgt.url) as a, client(
                proxy.url, reconnect_delay_s=(0.02, 0.1)) as b:
            await a.pr_register(0xA1)
            await b.pr_register(0xB2)
            await a.pr_reserve(0xA1, 5)  # write exclusive, registrants only
            await b.write(0, bytes(4096))
            proxy.cut()
            await b.write(4096, b"b" * 4096)  # after a new login: still a registrant
            assert b.reconnects == 1 and b.pr_key == 0xB2 and not b.pr_lost
            assert sorted((await a.pr_read_keys())[1]) in ([0xA1, 0xB2], [0xA1, 0xB2, 0xB2])
            proxy.refuse = True
            proxy.cut()
            await a.pr_preempt(0xA1, 0xB2, 5)  # fenced while its connection is down
            proxy.refuse = False
            with pytest.raises(ReservationConflict):
                await b.write(8192, b"x" * 4096)
            assert b.pr_lost and b.pr_key is None and b.reconnects == 2
            assert (await a.pr_read_keys())[1] == [0xA1]
            assert await a.read(8192, 4096) != b"x" * 4096
            await a.pr_release(0xA1, 5)
            await a.pr_register(0)
    run(go())


def tgtadm(tgt: TgtServer, *args: str) -> None:
    subprocess.run(["tgtadm", "-C", str(tgt.ctl), "--lld", "iscsi", *args], check=True,
                   capture_output=True, timeout=30)


@lab
def test_chap_one_way_and_mutual(tgt: TgtServer) -> None:
    user, secret = "core-user", "core-secret-123"
    tuser, tsecret = "tgt-user", "tgt-secret-4567"
    tgtadm(tgt, "--op", "new", "--mode", "account", "--user", user, "--password", secret)
    tgtadm(tgt, "--op", "new", "--mode", "account", "--user", tuser, "--password", tsecret)
    tgtadm(tgt, "--op", "bind", "--mode", "account", "--tid", "1", "--user", user)

    async def go() -> None:
        try:
            async with client(tgt.url, chap=(user, secret)) as c:
                await c.test_unit_ready()
            url = f"iscsi://{user}%{secret}@{tgt.portal}/{TgtServer.IQN}/1"
            async with client(url) as c:
                await c.test_unit_ready()
            with pytest.raises(LoginError) as e:
                await client(tgt.url, chap=(user, "wrong-secret-999")).__aenter__()
            assert e.value.status == 0x0201
            tgtadm(tgt, "--op", "bind", "--mode", "account", "--tid", "1", "--user", tuser,
                     "--outgoing")
            async with client(tgt.url, chap=(user, secret), mutual=(tuser, tsecret)) as c:
                await c.test_unit_ready()
            with pytest.raises(LoginError) as e:
                await client(tgt.url, chap=(user, secret),
                             mutual=(tuser, "not-the-target-1")).__aenter__()
            assert e.value.status is None and "mutual" in str(e.value)
        finally:
            tgtadm(tgt, "--op", "unbind", "--mode", "account", "--tid", "1", "--user", user)
            with contextlib.suppress(Exception):
                tgtadm(tgt, "--op", "unbind", "--mode", "account", "--tid", "1", "--user", tuser,
                         "--outgoing")
    run(go())


# --------------------------------------------------------------------------- reconnect and retry


@lab
def test_reconnect_and_retry_when_the_connection_is_cut_under_load(tgt: TgtServer) -> None:
    rng = random.Random(12)
    data = rng.randbytes(64 * MiB)
    tail = rng.randbytes(4 * MiB)

    async def go() -> None:
        async with proxied(tgt) as proxy, client(proxy.url, reconnect_delay_s=(0.02, 0.2),
                                                 give_up_s=60) as c:
            view = memoryview(data)
            chunk = 512 * 1024
            writes = [asyncio.ensure_future(c.write(off, view[off:off + chunk]))
                      for off in range(0, len(data), chunk)]
            # Overlapping rewrites of the first 4 MiB, issued last: they must win.
            writes.append(asyncio.ensure_future(c.write(0, tail)))
            cuts = 0
            while not all(w.done() for w in writes) and cuts < 6:
                await asyncio.sleep(0.05)
                proxy.cut()
                cuts += 1
            await asyncio.gather(*writes)  # no await failed
            await c.sync()
            assert c.reconnects >= 2 and proxy.connections >= 3, (cuts, c.reconnects)
            assert c.reissued > 0
            want = tail + data[len(tail):]
            assert await c.read(0, len(want)) == want
    run(go())


@lab
def test_keepalive_finds_a_stalled_connection_and_heals(tgt: TgtServer) -> None:
    async def go() -> None:
        async with proxied(tgt) as proxy, client(proxy.url, nop_interval_s=0.2,
                                                 nop_timeout_s=0.3,
                                                 reconnect_delay_s=(0.02, 0.1)) as c:
            proxy.stall()  # the connection stays open and passes nothing
            payload = os.urandom(MiB)
            await asyncio.wait_for(c.write(8 * MiB, payload), 10)
            assert c.reconnects == 1 and proxy.connections == 2
            assert "NOP-Out" in c._last_loss
            assert await c.read(8 * MiB, MiB) == payload
    run(go())


@lab
def test_give_up_when_the_target_stays_away(tgt: TgtServer) -> None:
    async def go() -> None:
        async with proxied(tgt) as proxy:
            c = IscsiClient(proxy.url, INITIATOR, give_up_s=1.0, reconnect_delay_s=(0.05, 0.2))
            await c.connect()
            proxy.refuse = True
            proxy.cut()
            with pytest.raises(ConnectionLost, match="no connection"):
                await c.write(0, bytes(4096))
            proxy.refuse = False
            await asyncio.sleep(0.5)  # it heals in the background
            await c.write(0, bytes(4096))
            await c.close()
            with pytest.raises(ConnectionLost):
                await c.read(0, 512)
    run(go())


@lab
def test_lun_file_sees_the_writes(tgt: TgtServer, tmp_path: Path) -> None:
    payload = os.urandom(MiB)

    async def go() -> None:
        async with client(tgt.url) as c:
            await c.write(120 * MiB, payload)
            await c.sync()
    run(go())
    with open(tgt.lun, "rb") as f:
        f.seek(120 * MiB)
        assert f.read(MiB) == payload


# --------------------------------------------------------------------------- our own target, in process


class MemTarget(LoopbackServer):
    """edge.iscsi_session.TargetConnection over an in-memory LU behind a
    loopback socket.  ``busy`` answers that many commands with BUSY;
    :meth:`message` sends an Async Message on every connection."""

    def __init__(self, blocks: int = 8192) -> None:
        self.backend = MemBackend(blocks, 512)
        self.lu = LogicalUnit(self.backend)
        self.config = SessionConfig(targets={TgtServer.IQN: TargetInfo(TgtServer.IQN,
                                                                       frozenset({1}))})
        self.busy = 0
        self.hang = False  # take commands, never answer them
        self.logins = 0
        self.conns: list[tuple[Any, asyncio.StreamWriter]] = []

    def cut(self) -> None:
        for _, w in self.conns:
            w.transport.abort()
        self.conns.clear()

    def message(self, event: int, parameter2: int = 0, parameter3: int = 0) -> None:
        for conn, w in self.conns:
            w.write(AsyncMessage(event=event, statsn=conn._take_statsn(),
                                 exp_cmdsn=conn._exp_cmdsn, max_cmdsn=conn._maxsn(),
                                 parameter2=parameter2, parameter3=parameter3).encode())

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        conn = TargetConnection(self.config, portal=f"127.0.0.1:{self.port}", tsih=7)
        self.conns.append((conn, writer))
        nexus = ItNexus()
        try:
            while data := await reader.read(1 << 18):
                events = conn.receive_data(data)
                while events:
                    ev = events.pop(0)
                    if isinstance(ev, LoginComplete):
                        self.logins += 1
                        nexus = ItNexus(ev.initiator_name, ev.isid, TgtServer.IQN, 1, 1)
                        self.lu.attach(nexus)
                    elif isinstance(ev, ScsiCommandReady):
                        if self.hang:
                            continue
                        if self.busy > 0:
                            self.busy -= 1
                            events += conn.complete(ev.task_tag, 0x08)
                            continue
                        r = await self.lu.execute(ev.cdb, ev.data, (1,), nexus)
                        events += conn.complete(ev.task_tag, r.status, r.data, r.sense,
                                                r.transfer_length)
                    elif isinstance(ev, LogoutComplete | CloseConnection):
                        writer.writelines(conn.data_to_send())
                        writer.close()
                        return
                writer.writelines(conn.data_to_send())
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()


@contextlib.asynccontextmanager
async def mem_target() -> AsyncIterator[MemTarget]:
    t = MemTarget()
    await t.start()
    try:
        yield t
    finally:
        await t.stop()


def test_in_process_round_trip_ua_and_busy_are_retried() -> None:
    async def go() -> None:
        async with mem_target() as t, client(t.url) as c:
            assert (c.block_size, c.blocks) == (512, 8192)
            data = os.urandom(3 * MiB)
            await c.write(0, data)
            t.lu.establish_ua(0x2A, 0x03)  # reservations preempted
            t.busy = 3
            assert await c.read(0, len(data)) == data
            assert [(u.key, u.asc, u.ascq) for u in c.unit_attentions][-1] == (6, 0x2A, 3)
            with pytest.raises(CheckCondition):
                await c.read(8192 * 512, 512)
    run(go())


def test_in_process_cut_reconnect_and_order() -> None:
    async def go() -> None:
        async with mem_target() as t, client(t.url, reconnect_delay_s=(0.01, 0.05),
                                             max_io_bytes=64 * 1024) as c:
            first = [c.write(0, bytes([i + 1]) * MiB) for i in range(8)]
            tasks = [asyncio.ensure_future(w) for w in first]
            await asyncio.sleep(0)
            t.cut()
            await asyncio.gather(*tasks)
            assert await c.read(0, MiB) == bytes([8]) * MiB
            assert c.reconnects >= 1 and t.logins >= 2
    run(go())


def test_in_process_async_logout_request_and_drop_notice() -> None:
    async def go() -> None:
        async with mem_target() as t, client(t.url, reconnect_delay_s=(0.01, 0.05)) as c:
            await c.write(0, bytes(4096))
            t.message(1, parameter3=5)  # please log out
            await asyncio.sleep(0.2)
            assert t.logins == 2 and c.reconnects == 1
            await c.write(4096, b"\1" * 4096)
            t.message(2, parameter2=0)  # the target will drop the connection
            await c.write(8192, b"\2" * 4096)
            await asyncio.sleep(0.2)
            assert t.logins == 3
            assert await c.read(0, 12288) == bytes(4096) + b"\1" * 4096 + b"\2" * 4096
    run(go())


def test_in_process_unanswered_commands_reconnect_then_time_out() -> None:
    async def go() -> None:
        async with mem_target() as t, client(t.url, give_up_s=1.0, command_timeout_s=0.2,
                                             reconnect_delay_s=(0.01, 0.05),
                                             login_timeout_s=1.0) as c:
            t.hang = True
            with pytest.raises(Timeout, match="no answer"):
                await c.write(0, bytes(4096))
            assert t.logins >= 2  # the watchdog gave the stuck connection up, more than once
            t.hang = False
            await c.write(0, bytes(4096))
        # (closing waited for the Logout Response: the target still held the lost write)
    run(go())
