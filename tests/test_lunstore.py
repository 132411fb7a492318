"""LunStore: a failed fdatasync is fail-stop (no durability reported after it, ever)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from core.lunstore import AppliedState, LunStore


def test_failed_sync_is_reported_once_and_nothing_is_durable_after(tmp_path: Path) -> None:
    """After EIO from fdatasync the kernel may have dropped the dirty pages; a retried sync
    would "succeed" without them. The store must never report those writes durable."""

    async def main() -> None:
        st = LunStore(1, str(tmp_path / "lun"), 1 << 20)
        durable: list[int] = []
        failed: list[OSError] = []
        st.on_durable(durable.append)
        st.on_failure(failed.append)
        st.pwrite(0, b"a" * 4096)
        st.request_sync()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if durable:
                break
        assert durable == [1]

        def eio(after: object) -> None:
            raise OSError(5, "Input/output error")

        st._sync_job = eio  # type: ignore[method-assign]
        st.pwrite(4096, b"b" * 4096)
        st.request_sync()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if failed:
                break
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
