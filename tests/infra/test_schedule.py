"""Redis schedules: atomic claims, leases that come due again, fenced finishing."""

from __future__ import annotations

import asyncio
from typing import Any

from khqr_gateway.infra.keys import keys
from khqr_gateway.infra.schedule import Lease, Schedule


def schedule(redis: Any, namespace: str, name: str = "poll") -> Schedule:
    return Schedule(redis, keys(namespace)[name])


async def test_claims_only_due_members_oldest_first(redis: Any, namespace: str) -> None:
    s = schedule(redis, namespace)
    await s.add([("late", 5000), ("a", 1000), ("b", 2000)])
    members, _ = await s.claim(3000, 10, 60_000)
    assert members == ["a", "b"]


async def test_concurrent_claimers_never_share_a_member(redis: Any, namespace: str) -> None:
    s = schedule(redis, namespace)
    await s.add([(f"m{i}", 1000) for i in range(500)])
    claims = await asyncio.gather(*(s.claim(2000, 60, 60_000) for _ in range(20)))
    claimed = [m for members, _ in claims for m in members]
    assert len(claimed) == 500
    assert len(set(claimed)) == 500


async def test_a_lease_that_runs_out_comes_due_again(redis: Any, namespace: str) -> None:
    s = schedule(redis, namespace)
    await s.add([("job", 1000)])
    first, _ = await s.claim(1000, 10, lease_ms=5_000)
    assert first == ["job"]
    assert (await s.claim(3000, 10, 5_000))[0] == [], "leased: not due"
    assert (await s.claim(6001, 10, 5_000))[0] == ["job"], "the claimer died: due again"


async def test_finish_is_fenced_on_the_lease(redis: Any, namespace: str) -> None:
    s = schedule(redis, namespace)
    await s.add([("job", 1000)])
    _, stale_lease = await s.claim(1000, 10, 1_000)
    _, fresh_lease = await s.claim(2500, 10, 60_000)  # a second process took it over
    assert await s.finish(stale_lease, [], ["job"]) == 0, "the stale holder cannot remove it"
    assert await s.scores(["job"]) == [float(fresh_lease)]
    assert await s.finish(fresh_lease, [("job", 9000)], []) == 1
    assert await s.scores(["job"]) == [9000.0]


async def test_lookahead_tops_up_a_partial_batch(redis: Any, namespace: str) -> None:
    s = schedule(redis, namespace)
    await s.add([(f"due{i}", 1000) for i in range(30)] + [(f"soon{i}", 1500) for i in range(40)])
    members, _ = await s.claim(1000, 1000, 60_000, lookahead_ms=600, batch=50)
    assert len(members) == 50, "30 due + 20 of the next ones fill one Bakong call"
    assert all(m.startswith("due") for m in members[:30])


async def test_add_missing_skips_members_in_any_lane(redis: Any, namespace: str) -> None:
    first = schedule(redis, namespace, "deliver")
    retry = schedule(redis, namespace, "deliver_retry")
    await retry.add([("d1", 5000)])
    added = await first.add_missing([("d1", 1000), ("d2", 1000)], [retry])
    assert added == 1
    assert await first.scores(["d1", "d2"]) == [None, 1000.0]


async def test_a_kept_lease_outlives_its_length_and_finishes(redis: Any, namespace: str) -> None:
    import time

    s = schedule(redis, namespace)
    now = int(time.time() * 1000)
    await s.add([("job", now)])
    members, until = await s.claim(now, 10, lease_ms=300)
    lease = Lease(s, members, until, 300)
    with lease:
        await asyncio.sleep(0.7)  # two lease lengths: the keeper renewed it
        assert (await s.claim(int(time.time() * 1000), 10, 300))[0] == []
        assert await lease.finish([("job", 42)], []) == 1
    assert await s.scores(["job"]) == [42.0]


async def test_requeue_leaves_members_under_a_live_lease_alone(redis: Any, namespace: str) -> None:
    import time

    first = schedule(redis, namespace, "deliver")
    retry = schedule(redis, namespace, "deliver_retry")
    now = int(time.time() * 1000)
    await first.add([("sending", now)])
    await retry.add([("waiting", now + 5_000)])  # due later, not being worked on
    assert (await first.claim(now, 1, 60_000))[0] == ["sending"]
    lease = (await first.scores(["sending"]))[0]
    await first.add([("dead", now - 60_000)])
    assert (await first.claim(now - 60_000, 1, 1_000))[0] == ["dead"]  # its lease ran out
    assert await first.leased(["sending", "dead", "waiting"], [retry]) == ["sending"]
    held = await first.requeue(["sending", "dead", "waiting"], now, [retry])
    assert held == ["sending"]
    assert await first.scores(["sending", "dead", "waiting"]) == [lease, now, now]
    assert await retry.scores(["waiting"]) == [None], "moved out of the other lane"
    assert lease is not None
    assert await first.finish(lease, [], ["sending"]) == 1, "the lease still fences"


async def test_finish_into_another_schedule_moves_in_one_step(redis: Any, namespace: str) -> None:
    first = schedule(redis, namespace, "deliver")
    retry = schedule(redis, namespace, "deliver_retry")
    await first.add([("moved", 1000), ("done", 1000), ("taken", 1000)])
    _, lease = await first.claim(1000, 10, 60_000)
    await first.finish(lease, [("taken", 1000)], [])
    _, other = await first.claim(2000, 10, 60_000)  # "taken": another lease now
    moves = [("moved", 9000), ("taken", 9000)]
    assert await first.finish(lease, moves, ["done"], into=retry) == 2
    assert await first.scores(["moved", "done", "taken"]) == [None, None, float(other)]
    assert await retry.scores(["moved", "done", "taken"]) == [9000.0, None, None]
