"""Hourly peaks in Redis: the highest value of each hour, shared by processes, a day kept."""

from __future__ import annotations

from typing import Any

from khqr_gateway.infra.keys import keys
from khqr_gateway.infra.peaks import HOUR_MS, HourlyPeaks

NOON = 1_764_676_800_000  # 2025-12-02T12:00:00Z, an hour's start in epoch ms


def peaks(redis: Any, namespace: str) -> HourlyPeaks:
    return HourlyPeaks(redis, keys(namespace)["lag_peaks"])


async def test_each_hour_keeps_the_highest_value_any_process_recorded(
    redis: Any, namespace: str
) -> None:
    one, two = peaks(redis, namespace), peaks(redis, namespace)
    await one.record(NOON + 1_000, 300)
    await two.record(NOON + 2_000, 900)
    await one.record(NOON + 3_000, 500)
    await two.record(NOON + HOUR_MS + 10, 0)
    assert await one.read() == {NOON // 1000: 900, NOON // 1000 + 3600: 0}


async def test_a_new_hour_forgets_the_hours_older_than_a_day(redis: Any, namespace: str) -> None:
    p = peaks(redis, namespace)
    for hour in range(30):
        await p.record(NOON + hour * HOUR_MS, hour)
    kept = await p.read()
    assert sorted(kept) == [NOON // 1000 + h * 3600 for h in range(5, 30)]
    assert kept[NOON // 1000 + 29 * 3600] == 29


async def test_a_field_that_is_not_a_number_is_dropped_not_a_failure(
    redis: Any, namespace: str
) -> None:
    key = keys(namespace)["lag_peaks"]
    await redis.hset(key, mapping={"junk": "1", str(NOON // 1000): "many"})
    p = peaks(redis, namespace)
    assert await p.read() == {}
    await p.record(NOON, 40)
    assert await p.read() == {NOON // 1000: 40}
    assert await redis.hlen(key) == 1


async def test_a_value_under_what_this_process_wrote_this_hour_costs_no_write(
    redis: Any, namespace: str
) -> None:
    p = peaks(redis, namespace)
    await p.record(NOON, 700)
    # Were the lower value sent, this hand-lowered peak would be raised to 650.
    await redis.hset(keys(namespace)["lag_peaks"], str(NOON // 1000), "1")
    await p.record(NOON + 5_000, 650)
    assert await p.read() == {NOON // 1000: 1}
    await p.record(NOON + 6_000, 800)
    assert await p.read() == {NOON // 1000: 800}


async def test_a_hash_redis_lost_is_written_again_within_a_minute(
    redis: Any, namespace: str
) -> None:
    p = peaks(redis, namespace)
    await p.record(NOON, 5_000)
    await redis.delete(keys(namespace)["lag_peaks"])  # a flush, a failover
    await p.record(NOON + 1_000, 100)
    assert await p.read() == {}, "under what it wrote a moment ago: no write yet"
    await p.record(NOON + 61_000, 100)
    assert await p.read() == {NOON // 1000: 100}, "the hour shows a gateway ran"
