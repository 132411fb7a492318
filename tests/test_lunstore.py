"""LunStore: a failed fdatasync is fail-stop (no durability reported after it, ever)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from core.lunstore import AppliedState, LunStore


def watched(tmp_path: Path) -> tuple[LunStore, list[int], list[OSError]]:
    """A 1 MiB LunStore for LUN 1, and the lists its durability and failure reports go to."""
    st = LunStore(1, str(tmp_path / "lun"), 1 << 20)
    durable: list[int] = []
    failed: list[OSError] = []
    st.on_durable(durable.append)
    st.on_failure(failed.append)
    return st, durable, failed


async def write_and_sync(st: LunStore, offset: int, reports: list[Any]) -> None:
    """Write a 4 KiB block, ask for a sync, and give ``reports`` a second to get an entry."""
    st.pwrite(offset, b"w" * 4096)
    st.request_sync()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if reports:
            return


def test_failed_sync_is_reported_once_and_nothing_is_durable_after(tmp_path: Path) -> None:
    """After EIO from fdatasync the kernel may have dropped the dirty pages; a retried sync
    would "succeed" without them. The store must never report those writes durable."""

    async def main() -> None:
        st, durable, failed = watched(tmp_path)
        await write_and_sync(st, 0, durable)
        assert durable == [1]

        def eio(after: object) -> None:
            raise OSError(5, "Input/output error")

        st._sync_job = eio  # type: ignore[method-assign]
        await write_and_sync(st, 4096, failed)
        assert len(failed) == 1 and st.failed is not None
        del st._sync_job  # the device "recovers": a retry would now succeed...
        st.pwrite(8192, b"c" * 4096)
        st.request_sync()
        st.request_sync(force=True)
        await asyncio.sleep(0.1)
        assert durable == [1] and len(failed) == 1  # ...but nothing more is reported durable
        st.close()

    asyncio.run(main())


def test_applied_state_sealer_writes_and_syncs(tmp_path: Path) -> None:
    a = AppliedState(tmp_path / "applied.state")
    job = a.sealer(3, 77, 12)
    assert job is not None and a.sealer(3, 77, 12) is None  # nothing new to seal
    job()
    a.close()
    assert AppliedState(tmp_path / "applied.state").get(3) == (77, 12)


def test_a_bug_in_the_group_commit_is_fail_stop_and_reported(tmp_path: Path) -> None:
    """Not only EIO: any exception in the commit task (here the seal) must reach the failure
    listeners (the Core raises alarm lun_N_io), never die in an unwatched task (issue 13)."""

    async def main() -> None:
        st, durable, failed = watched(tmp_path)

        def broken_seal(target: int) -> None:
            raise RuntimeError("seal bug")

        st.seal = broken_seal
        await write_and_sync(st, 0, failed)
        assert len(failed) == 1 and "seal bug" in str(failed[0])
        assert st.failed is failed[0] and st.io_errors == 1 and durable == []
        st.close()

    asyncio.run(main())


def test_applied_state_short_file(tmp_path: Path) -> None:
    """A torn creation (a prefix of the magic) starts clean; other short content is counted
    as corrupt (the Core raises applied_state_corrupt) instead of being silently reset."""
    from core.lunstore import STATE_MAGIC

    torn = tmp_path / "torn.state"
    torn.write_bytes(STATE_MAGIC[:3])
    a = AppliedState(torn)
    assert a.corrupt_slots == 0 and a.get(1) == (0, 0)
    a.close()
    junk = tmp_path / "junk.state"
    junk.write_bytes(b"xy")
    b = AppliedState(junk)
    assert b.corrupt_slots == 1
    b.set(1, 7, 9)
    b.close()
    assert AppliedState(junk).get(1) == (7, 9)


def test_a_lun_the_file_system_cannot_hold_leaves_no_file(tmp_path: Path) -> None:
    """ext4 and others refuse files past their limit (EFBIG): one clear error, and no
    0-byte LUN left for the next start to misreport as the wrong size."""
    import pytest

    from core.lunstore import LunError

    path = tmp_path / "lun-1.img"
    with pytest.raises(LunError, match="cannot create backend"):
        LunStore(1, str(path), 1 << 62)
    assert not path.exists() and list(tmp_path.iterdir()) == []
