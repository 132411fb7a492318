"""Two real Links over loopback: the buffered receive path end to end, on uvloop and asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from steelfusion import wire
from steelfusion.link import Link, dial, listen
from tests.conftest import Runner

POOL = random.Random(5).randbytes(1 << 20)
SIZES = [1, 512, 4096, 65_000, 65_509, 65_510, 100_000, 128 * 1024, 512 * 1024]


def _ignore(link: Link, error: BaseException | None) -> None:
    pass


@contextlib.asynccontextmanager
async def serving(on_message: Callable[[Link, wire.Message], None],
                  on_close: Callable[[Link, BaseException | None], None] = _ignore,
                  **kw: Any) -> AsyncIterator[int]:
    """A Link server on a free loopback port (the port is what it yields), closed after."""
    server = await listen("127.0.0.1", 0, on_message, on_close, **kw)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def _writes(n: int) -> list[tuple[int, int]]:
    """(offset into POOL, size) per write: mostly small, every few a large one."""
    rnd = random.Random(n)
    out = []
    for _ in range(n):
        size = rnd.choice(SIZES) if rnd.random() < 0.3 else rnd.randint(1, 8192)
        out.append((rnd.randrange(len(POOL) - size), size))
    return out


@pytest.mark.timeout(120)
def test_thousands_of_writes_arrive_intact(aio_run: Runner) -> None:
    plan = _writes(3000)

    async def main() -> None:
        got: list[wire.Write] = []
        bad: list[str] = []
        done = asyncio.get_running_loop().create_future()
        servers: list[Link] = []

        def on_server(link: Link, m: wire.Message) -> None:
            if isinstance(m, wire.Hello):
                servers.append(link)
                link.send(wire.Welcome("core", "primary"))
            elif isinstance(m, wire.Write):
                off, size = plan[m.seq]
                if m.seq != len(got) or bytes(m.data) != POOL[off:off + size]:
                    bad.append(f"write seq {m.seq} ({size} bytes) damaged")
                got.append(m)  # keep them all: none may change as more bytes arrive
                if m.seq % 500 == 499 and link.transport is not None:  # flow control mid-stream
                    link.transport.pause_reading()
                    link.loop.call_later(0.01, link.transport.resume_reading)
            elif isinstance(m, wire.Control):
                link.send(wire.Ack(1, 7, len(got)))

        def on_client(link: Link, m: wire.Message) -> None:
            if isinstance(m, wire.Ack) and not done.done():
                done.set_result(m.seq)

        async with serving(on_server) as port:
            client = await dial("127.0.0.1", port, wire.Hello("edge", "edge", "edge"),
                                on_client, _ignore)
            for seq, (off, size) in enumerate(plan):
                client.send(wire.Write(1, 0, 7, seq, off, memoryview(POOL)[off:off + size]))
                if not client.writable or seq % 64 == 0:
                    await client.drain()
                    await asyncio.sleep(0)
            client.send(wire.Control({"done": True}))
            assert await asyncio.wait_for(done, 60) == len(plan)
            assert bad == []
            assert all(bytes(w.data) == POOL[w.offset:w.offset + len(w.data)] for w in got)
            assert servers[0].bytes_in == client.bytes_out
            client.close()

    aio_run(main())


@pytest.mark.timeout(30)
def test_garbage_gets_a_refuse_and_the_link_dropped(aio_run: Runner) -> None:
    async def main() -> None:
        closed: asyncio.Future[Link] = asyncio.get_running_loop().create_future()

        def on_server(link: Link, m: wire.Message) -> None:
            if isinstance(m, wire.Hello):
                link.send(wire.Welcome("core", "primary"))

        hello = wire.encode_bytes(wire.Hello("edge", "edge", "edge"))
        big = wire.encode_bytes(wire.Write(1, 0, 7, 1, 0, b"\x01" * 200_000))
        async with serving(on_server, lambda lk, e: closed.set_result(lk)) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(hello + big + b"XX" + big[2:14])
            received = await asyncio.wait_for(reader.read(), 10)  # until the server hangs up
            msgs = wire.FrameDecoder().feed(received)
            assert isinstance(msgs[0], wire.Welcome)
            assert isinstance(msgs[-1], wire.Refuse) and msgs[-1].code == "bad-magic"
            link = await asyncio.wait_for(closed, 10)
            assert link.close_reason.startswith("protocol error")
            writer.close()

    aio_run(main())


@pytest.mark.timeout(60)
def test_frames_in_the_same_read_as_the_auth_proof_are_delivered(aio_run: Runner) -> None:
    """Issue 9: a primary that resends its mirror queue right after WELCOME puts those
    WRITEs in the same segment as its authentication proof; every one must reach the
    role (they were dropped, leaving a hole in the replica)."""
    from steelfusion.nodeauth import Keyring, NodeKey

    key = NodeKey("pair", b"s" * 32)

    async def main() -> None:
        got: list[int] = []
        done = asyncio.get_running_loop().create_future()

        def on_server(link: Link, m: wire.Message) -> None:
            if isinstance(m, wire.Hello):
                link.send(wire.Welcome("core-b", "secondary", 1))
            elif isinstance(m, wire.Write):
                got.append(m.seq)
                if m.seq == 40 and not done.done():
                    done.set_result(None)

        def on_client(link: Link, m: wire.Message) -> None:
            if isinstance(m, wire.Welcome):  # resend the whole queue at once, as the primary does
                link.send_many([wire.Write(0, 0, 7, s, s * 4096, bytes([s]) * 4096)
                                for s in range(1, 41)])

        async with serving(on_server, keyring=Keyring([key]), local_name="core-b") as port:
            link = await dial("127.0.0.1", port, wire.Hello("core-a", "primary", "replication", 1),
                              on_client, _ignore, key=key)
            await asyncio.wait_for(done, 10)
            assert got == list(range(1, 41))
            link.close()

    aio_run(main())
