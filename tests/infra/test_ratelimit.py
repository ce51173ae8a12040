"""The Redis token bucket and 429 pauses that every gateway process shares."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from khqr_gateway.infra.keys import keys
from khqr_gateway.infra.ratelimit import PerSecond, RateLimit


def limit(redis: Any, namespace: str, rate: float = 10, capacity: float | None = None) -> RateLimit:
    names = keys(namespace)
    return RateLimit(
        redis,
        bucket_key=names["bakong_rate"],
        pause_prefix=names["bakong_pause"],
        rate=rate,
        capacity=capacity,
    )


async def test_a_full_bucket_grants_a_burst_then_refills_at_the_rate(
    redis: Any, namespace: str
) -> None:
    bucket = limit(redis, namespace, rate=10)
    t = 1_000_000
    assert (await bucket.take({1: 25}, now_ms=t)).calls == 10, "capacity: one second's worth"
    assert (await bucket.take({1: 25}, now_ms=t)).calls == 0, "empty"
    assert (await bucket.take({1: 25}, now_ms=t + 250)).calls == 2, "10/s: 2.5 tokens in 250 ms"
    assert (await bucket.take({1: 25}, now_ms=t + 300)).calls == 1, "the half token carried over"
    assert (await bucket.take({1: 25}, now_ms=t + 60_000)).calls == 10, "never more than capacity"


async def test_a_tick_takes_its_calls_for_every_credential_in_one_go(
    redis: Any, namespace: str
) -> None:
    bucket = limit(redis, namespace, rate=10)
    grant = await bucket.take({1: 3, 2: 4, None: 1}, now_ms=5_000)
    assert grant.calls == 8
    assert grant.paused_s == {}


async def test_processes_share_one_bucket(redis: Any, namespace: str) -> None:
    one, two = limit(redis, namespace, rate=20), limit(redis, namespace, rate=20)
    grants = await asyncio.gather(*(b.take({1: 3}, now_ms=9_000) for b in [one, two] * 10))
    assert sum(g.calls for g in grants) == 20


async def test_redis_clock_is_used_when_no_time_is_given(redis: Any, namespace: str) -> None:
    bucket = limit(redis, namespace, rate=5)
    assert (await bucket.take({1: 100})).calls == 5
    assert (await bucket.take({1: 100})).calls == 0
    await asyncio.sleep(0.45)
    assert 2 <= (await bucket.take({1: 100})).calls <= 3, "5/s for about 0.45 s"


async def test_a_paused_credential_gets_nothing_and_spends_nothing(
    redis: Any, namespace: str
) -> None:
    bucket = limit(redis, namespace, rate=10)
    await bucket.pause(7, 2.0)
    grant = await bucket.take({7: 5, 8: 3}, now_ms=1_000)
    assert grant.calls == 3, "only credential 8's calls"
    assert 1.5 < grant.paused_s[7] <= 2.0
    assert 8 not in grant.paused_s


async def test_a_pause_is_lengthened_never_shortened(redis: Any, namespace: str) -> None:
    bucket = limit(redis, namespace)
    await bucket.pause(None, 5.0)
    await bucket.pause(None, 0.1)
    grant = await bucket.take({None: 1})
    assert grant.paused_s[None] > 4.0
    await bucket.pause(None, 9.0)
    assert (await bucket.take({None: 1})).paused_s[None] > 8.0


async def test_pauses_run_out(redis: Any, namespace: str) -> None:
    bucket = limit(redis, namespace)
    await bucket.pause(3, 0.1)
    await asyncio.sleep(0.15)
    grant = await bucket.take({3: 1})
    assert grant.calls == 1 and grant.paused_s == {}


async def test_a_request_served_in_full_books_no_turn_behind_an_old_line(
    redis: Any, namespace: str
) -> None:
    """A burst books a line of turns; demand below the rate afterwards is served at once and
    told no turn: the md5s it checks keep their own cadence instead of the line's."""
    bucket = limit(redis, namespace, rate=10)
    t = 1_000_000
    burst = await bucket.take({1: 25}, now_ms=t)
    assert burst.calls == 10 and burst.turn_s == 0.0, "15 put off: a line of 2.5 s"
    later = await bucket.take({1: 5}, now_ms=t + 1000)
    assert later.calls == 5, "refilled"
    assert later.turn_s is None, "served in full: no turn, whatever the line booked"
    short = await bucket.take({1: 8}, now_ms=t + 1100)
    assert short.calls == 6 and short.turn_s == pytest.approx(1.4), "put off: behind the line"


async def test_a_request_that_can_wait_leaves_the_bucket_its_share(
    redis: Any, namespace: str
) -> None:
    bucket = limit(redis, namespace, rate=10)
    t = 2_000_000
    assert (await bucket.take({1: 4}, now_ms=t, keep=0.5)).calls == 4, "10 held, 5 to spare"
    assert (await bucket.take({1: 4}, now_ms=t, keep=0.5)).calls == 1
    assert (await bucket.take({1: 4}, now_ms=t)).calls == 4, "the rest is for the others"
    grant = await bucket.take({1: 4}, now_ms=t + 100, queue=False, keep=0.5)
    assert grant.calls == 0 and grant.turn_s is None, "none to spare, and no turn"
    waits = await bucket.take({1: 4}, now_ms=t + 100, keep=0.2)
    assert waits.calls == 0 and waits.turn_s is not None, "put off, with a turn"


async def test_the_turns_of_calls_that_can_wait_never_hold_back_the_others(
    redis: Any, namespace: str
) -> None:
    bucket = limit(redis, namespace, rate=10)
    t = 3_000_000
    waits = await bucket.take({1: 58}, now_ms=t, keep=0.2)
    assert waits.calls == 8 and waits.turn_s == 0.0, "50 put off: 5.8 s of turns booked"
    urgent = await bucket.take({1: 3}, now_ms=t)
    assert urgent.calls == 2 and urgent.turn_s == pytest.approx(0.0), "behind no one"


async def test_request_counts_are_shared_between_processes_without_a_call_each(
    redis: Any, namespace: str
) -> None:
    """Each process counts at once, and sees the other's calls once it has synced."""
    prefix = keys(namespace)["api_rate"]
    for _ in range(5):  # a try that straddles a second starts again
        one, two = PerSecond(redis, prefix, sync_s=0.01), PerSecond(redis, prefix, sync_s=0.01)
        second = int(time.time())
        counted = [await one.count("app_a") for _ in range(5)]
        await asyncio.sleep(0.1)
        first_of_two = await two.count("app_a")
        await asyncio.sleep(0.1)
        seen = await two.count("app_a")
        other_app = await one.count("app_b")
        await one.close()
        await two.close()
        if int(time.time()) == second:
            break
    assert counted == [1, 2, 3, 4, 5]
    assert first_of_two == 1  # this process learns of the other's at its first sync
    assert seen == 7 and other_app == 1
