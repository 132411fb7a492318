"""The lab's per-Core path to an array (steelfusion/sanpath.py): relays, cut stalls, ok heals."""

from __future__ import annotations

import asyncio

import pytest

from steelfusion import control
from steelfusion.labproc import free_ports
from steelfusion.sanpath import Paths, serve_control


def free_port() -> int:
    return free_ports(1)[0]


async def _echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(65536):
        w.write(data)
        await w.drain()
    w.close()


def test_a_cut_path_stalls_both_ways_and_ok_delivers_what_was_held() -> None:
    async def go() -> None:
        portal = await asyncio.start_server(_echo, "127.0.0.1", 0)
        paddr = portal.sockets[0].getsockname()[:2]
        a, b = ("127.0.0.1", free_port()), ("127.0.0.1", free_port())
        paths = Paths(paddr, {"core-x": a, "core-y": b})
        await paths.start()
        rx, wx = await asyncio.open_connection(*a)
        ry, wy = await asyncio.open_connection(*b)
        wx.write(b"ping")
        assert await asyncio.wait_for(rx.readexactly(4), 5) == b"ping"
        paths.set("core-y", "cut")
        wy.write(b"held")
        with pytest.raises(TimeoutError):  # nothing comes back while cut ...
            await asyncio.wait_for(ry.readexactly(4), 0.5)
        wx.write(b"other")  # ... while the partner's path still works
        assert await asyncio.wait_for(rx.readexactly(5), 5) == b"other"
        late_r, late_w = await asyncio.open_connection(*b)  # accepted, held
        late_w.write(b"late")
        st = paths.status()["paths"]
        assert st["core-y"]["state"] == "cut" and st["core-y"]["cuts"] == 1
        assert st["core-x"]["state"] == "ok"
        paths.set("core-y", "ok")
        assert await asyncio.wait_for(ry.readexactly(4), 5) == b"held"
        assert await asyncio.wait_for(late_r.readexactly(4), 5) == b"late"
        for w in (wx, wy, late_w):
            w.close()
        await paths.stop()
        portal.close()

    asyncio.run(go())


def test_the_control_port_names_bad_paths_and_states() -> None:
    async def go() -> None:
        paths = Paths(("127.0.0.1", 9), {"core-x": ("127.0.0.1", free_port())})
        addr = ("127.0.0.1", free_port())
        srv = await serve_control(paths, addr)
        out = await asyncio.to_thread(control.call, addr, "path", core="core-x", state="cut")
        assert out["paths"]["core-x"]["state"] == "cut"
        bad = await asyncio.to_thread(control.call, addr, "path", core="core-z", state="cut")
        assert bad["ok"] is False and "no path for Core 'core-z'" in bad["error"]
        bad = await asyncio.to_thread(control.call, addr, "path", core="core-x", state="down")
        assert bad["ok"] is False and "give cut or ok" in bad["error"]
        srv.close()

    asyncio.run(go())
