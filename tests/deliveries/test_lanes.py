"""The two delivery lanes against the real Redis: every move between them is one step, so a
pending delivery is never in neither lane, however movers race."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from khqr_gateway.deliveries.lanes import Claim, Lanes
from khqr_gateway.deliveries.model import Lane, PendingDelivery
from khqr_gateway.infra.keys import keys
from khqr_gateway.times import now_ms

# KEYS: both lanes; ARGV: members. Those in neither lane and those in both, read in one step.
_LOOK = """
local neither, both = {}, {}
for i = 1, #ARGV do
  local first = redis.call('ZSCORE', KEYS[1], ARGV[i])
  local retry = redis.call('ZSCORE', KEYS[2], ARGV[i])
  if not first and not retry then neither[#neither + 1] = ARGV[i] end
  if first and retry then both[#both + 1] = ARGV[i] end
end
return {neither, both}
"""


def lanes(redis: Any, namespace: str) -> Lanes:
    return Lanes(redis, keys(namespace))


async def scores(redis: Any, namespace: str, lane: Lane, ids: Sequence[str]) -> list[Any]:
    return list(await redis.zmscore(keys(namespace)[lane], list(ids)))


class Watcher:
    """Reads both lanes in one step, over and over, while movers run: any member ever seen
    in neither lane (or in both) is kept."""

    def __init__(self, redis: Any, namespace: str, ids: Sequence[str]) -> None:
        self.keys = [keys(namespace)[Lane.FIRST], keys(namespace)[Lane.RETRY]]
        self.ids = list(ids)
        self.neither: set[str] = set()
        self.both: set[str] = set()
        self.looks = 0
        self._look = redis.register_script(_LOOK)
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            neither, both = await self._look(keys=self.keys, args=self.ids)
            self.neither.update(_text(neither))
            self.both.update(_text(both))
            self.looks += 1
            await asyncio.sleep(0)

    async def during(self, *movers: Any) -> None:
        task = asyncio.create_task(self.run())
        try:
            await asyncio.gather(*movers)
        finally:
            self._stop.set()
            await task


def _text(members: Sequence[Any]) -> list[str]:
    return [m.decode() if isinstance(m, bytes) else m for m in members]


async def claimed(ls: Lanes, lane: Lane, limit: int = 1000, lease_ms: int = 60_000) -> Claim:
    claim = await ls.claim(lane, now_ms(), limit, lease_ms)
    assert claim is not None
    return claim


async def test_a_failed_first_attempt_moves_to_the_retry_lane_in_one_step(
    redis: Any, namespace: str
) -> None:
    ls = lanes(redis, namespace)
    await ls.add(["d1", "d2"], now_ms())
    claim = await claimed(ls, Lane.FIRST)
    assert await claim.retry([("d1", 42)]) == 1
    assert await claim.finish([], ["d2"]) == 1
    assert await scores(redis, namespace, Lane.FIRST, ["d1", "d2"]) == [None, None]
    assert await scores(redis, namespace, Lane.RETRY, ["d1", "d2"]) == [42.0, None]
    assert claim.members == set()


async def test_a_retry_claim_moves_within_its_own_lane(redis: Any, namespace: str) -> None:
    ls = lanes(redis, namespace)
    await ls.add(["d1"], now_ms(), Lane.RETRY)
    claim = await claimed(ls, Lane.RETRY)
    assert await claim.retry([("d1", 42)]) == 1
    assert await scores(redis, namespace, Lane.RETRY, ["d1"]) == [42.0]


async def test_a_mover_whose_lease_ran_out_moves_nothing(redis: Any, namespace: str) -> None:
    ls = lanes(redis, namespace)
    now = now_ms()
    await ls.add(["d1"], now - 60_000)
    stale = await ls.claim(Lane.FIRST, now - 60_000, 10, 1_000)  # its lease ran out long ago
    assert stale is not None
    fresh = await claimed(ls, Lane.FIRST)  # another process took it over and is sending it
    assert await stale.retry([("d1", 42)]) == 0
    assert await stale.give_back(7) == 0
    [lease] = await scores(redis, namespace, Lane.FIRST, ["d1"])
    assert lease == fresh.until
    assert await scores(redis, namespace, Lane.RETRY, ["d1"]) == [None]


async def test_add_keeps_a_queued_delivery_where_it_is(redis: Any, namespace: str) -> None:
    ls = lanes(redis, namespace)
    await ls.add(["d1"], 1000)
    claim = await claimed(ls, Lane.FIRST)
    assert await ls.add(["d1", "d2"], 5000) == 1, "d1 is leased: it keeps its lease"
    assert await scores(redis, namespace, Lane.FIRST, ["d1", "d2"]) == [claim.until, 5000.0]


async def test_retry_now_and_requeue_cross_lanes_but_leave_a_sending_one_alone(
    redis: Any, namespace: str
) -> None:
    ls = lanes(redis, namespace)
    await ls.add(["sending"], now_ms())
    await ls.add(["waiting"], now_ms() + 60_000, Lane.RETRY)
    await claimed(ls, Lane.FIRST)
    assert await ls.in_flight(["sending", "waiting"]) == ["sending"]
    assert await ls.retry_now(["sending", "waiting"]) == ["sending"]
    assert await scores(redis, namespace, Lane.RETRY, ["waiting"]) == [None]
    [waiting] = await scores(redis, namespace, Lane.FIRST, ["waiting"])
    assert waiting is not None and waiting <= now_ms()
    assert await ls.requeue(["waiting"]) == []
    assert await scores(redis, namespace, Lane.FIRST, ["waiting"]) == [None]
    assert (await scores(redis, namespace, Lane.RETRY, ["waiting"]))[0] is not None


async def test_restore_puts_back_only_what_is_in_neither_lane(redis: Any, namespace: str) -> None:
    ls = lanes(redis, namespace)
    at = datetime(2030, 1, 1, tzinfo=UTC)
    await ls.add(["in_retry"], 5, Lane.RETRY)
    pending = [
        PendingDelivery("lost_first", at, 0),
        PendingDelivery("lost_retry", at + timedelta(seconds=1), 2),
        PendingDelivery("in_retry", at, 0),  # a bulk replay put it there: it stays
    ]
    assert await ls.restore(pending) == 2
    first = await scores(redis, namespace, Lane.FIRST, ["lost_first", "lost_retry", "in_retry"])
    retry = await scores(redis, namespace, Lane.RETRY, ["lost_first", "lost_retry", "in_retry"])
    ms = int(at.timestamp() * 1000)
    assert first == [ms, None, None]
    assert retry == [None, ms + 1000, 5.0]
    assert await ls.sizes() == {Lane.FIRST: 1, Lane.RETRY: 2}


async def test_racing_movers_never_leave_a_delivery_in_neither_lane(
    redis: Any, namespace: str
) -> None:
    """Deliverers failing their claims, a stale one, retries by hand and bulk replays, all
    at once on the same deliveries: each is in exactly one lane all along."""
    ls = lanes(redis, namespace)
    ids = [f"d{i}" for i in range(200)]
    now = now_ms()
    await ls.add(ids[:100], now - 60_000)
    await ls.add(ids[100:], now - 60_000, Lane.RETRY)
    stale = await ls.claim(Lane.FIRST, now - 60_000, 50, 1_000)  # lease long run out
    assert stale is not None
    first = await claimed(ls, Lane.FIRST)  # takes over the stale claim's 50, and 50 more
    retry = await claimed(ls, Lane.RETRY)
    due = now + 5_000
    watcher = Watcher(redis, namespace, ids)
    await watcher.during(
        first.retry([(m, due) for m in sorted(first.members)]),
        stale.retry([(m, due + 1) for m in sorted(stale.members)]),
        retry.retry([(m, due) for m in sorted(retry.members)]),
        *(ls.retry_now(ids[i : i + 20]) for i in range(0, 200, 20)),
        *(ls.requeue(ids[i : i + 15]) for i in range(0, 200, 15)),
        *(ls.retry_now(ids[i : i + 30]) for i in range(5, 200, 30)),
    )
    assert watcher.looks > 0
    assert watcher.neither == set(), "seen in neither lane"
    assert watcher.both == set(), "seen in both lanes"
    in_first = await scores(redis, namespace, Lane.FIRST, ids)
    in_retry = await scores(redis, namespace, Lane.RETRY, ids)
    assert all((a is None) != (b is None) for a, b in zip(in_first, in_retry, strict=True))
    assert all(score != due + 1 for score in in_retry), "the stale claim moved nothing"


async def test_two_lane_moves_of_one_delivery_race_to_one_lane(redis: Any, namespace: str) -> None:
    """A retry by hand and a bulk replay of the same deliveries at once, over and over."""
    ls = lanes(redis, namespace)
    ids = [f"d{i}" for i in range(50)]
    await ls.add(ids, now_ms())
    watcher = Watcher(redis, namespace, ids)
    movers = [ls.retry_now(ids) if n % 2 else ls.requeue(ids) for n in range(40)]
    await watcher.during(*movers)
    assert watcher.neither == set() and watcher.both == set()
    sizes = await ls.sizes()
    assert sizes[Lane.FIRST] + sizes[Lane.RETRY] == len(ids)
