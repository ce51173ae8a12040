"""The tick runner: a tick under way at shutdown gets its grace instead of being cut off."""

from __future__ import annotations

import asyncio

from khqr_gateway.infra.scheduler import Ticks


async def test_stop_lets_a_running_tick_finish_and_starts_no_new_one() -> None:
    ticks = Ticks()
    started = asyncio.Event()
    runs: list[str] = []

    async def slow() -> None:
        runs.append("start")
        started.set()
        await asyncio.sleep(0.3)
        runs.append("end")

    ticks.add("slow", 0.05, slow)
    ticks.start()
    await asyncio.wait_for(started.wait(), 5)
    await ticks.stop(grace_s=5)
    assert runs == ["start", "end"]
    await asyncio.sleep(0.2)
    assert runs == ["start", "end"], "no tick after stop"
    assert "slow" not in ticks.health.last_error
