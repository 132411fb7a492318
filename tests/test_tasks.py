"""steelfusion.tasks.Background: tasks are held, and a failure is reported, not lost."""

from __future__ import annotations

import asyncio
import gc

from steelfusion.tasks import Background


def test_failure_reaches_the_owner_and_cancel_is_quiet() -> None:
    async def main() -> None:
        seen: list[tuple[str, str]] = []
        bg = Background(lambda name, e: seen.append((name, str(e))))

        async def boom() -> None:
            await asyncio.sleep(0)
            raise RuntimeError("disk on fire")

        async def forever() -> None:
            await asyncio.Event().wait()

        bg.spawn(boom(), "boom")
        bg.spawn(forever(), "forever")
        gc.collect()  # nothing but the Background holds them
        for _ in range(50):
            await asyncio.sleep(0.01)
            if seen:
                break
        assert seen == [("boom", "disk on fire")] and bg.failures == 1 and len(bg) == 1
        await bg.cancel_all()
        assert len(bg) == 0 and bg.failures == 1

    asyncio.run(main())
