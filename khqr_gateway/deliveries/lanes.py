"""The two lanes pending deliveries wait in (first attempts, retries): the one owner of both.

A pending delivery is always in one lane, never in neither: Postgres holds it pending, but
only a lane gets it sent (until the reconcile tick notices). So every move from one lane to
the other is one script (`Schedule.finish` into another schedule, `Schedule.requeue`),
fenced on the mover's lease where it has one: no crash, and no other process moving the
same delivery, can come between leaving a lane and entering the other. The lanes' keys
share one hash tag (`infra.schedule.keys`), so the scripts run on a Redis Cluster too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from khqr_gateway.deliveries.model import Lane, PendingDelivery
from khqr_gateway.infra.keys import RedisKeys
from khqr_gateway.infra.schedule import Lease, RedisClient, Schedule
from khqr_gateway.times import now_ms, to_ms


class Lanes:
    """Both delivery lanes; the only way in, out and across."""

    def __init__(self, redis: RedisClient, names: RedisKeys) -> None:
        sets = {Lane.FIRST: names["deliver"], Lane.RETRY: names["deliver_retry"]}
        self._schedules = {lane: Schedule(redis, key) for lane, key in sets.items()}

    async def add(self, ids: Iterable[str], due_ms: int, lane: Lane = Lane.FIRST) -> int:
        """Queue new deliveries; one the lane already has keeps its place (reconcile may have
        queued it, a deliverer leased it). Returns how many were added."""
        return await self._schedules[lane].add(((i, due_ms) for i in ids), only_new=True)

    async def claim(self, lane: Lane, now: int, limit: int, lease_ms: int) -> Claim | None:
        """Lease up to `limit` deliveries due in `lane`; None when none is due."""
        members, until = await self._schedules[lane].claim(now, limit, lease_ms)
        return Claim(self, lane, members, until, lease_ms) if members else None

    async def retry_now(self, ids: Sequence[str]) -> list[str]:
        """Due now in the lane of first attempts (a person is waiting on them), out of the
        retry lane; returns those left alone because an attempt of theirs is being sent."""
        return await self._requeue(Lane.FIRST, ids)

    async def requeue(self, ids: Sequence[str]) -> list[str]:
        """Due now in the retry lane, behind every first attempt (a bulk replay never delays
        new payments' webhooks), out of the other; returns those being sent, left alone."""
        return await self._requeue(Lane.RETRY, ids)

    async def in_flight(self, ids: Sequence[str]) -> list[str]:
        """Those of `ids` an attempt is being sent for right now, in either lane."""
        return await self._schedules[Lane.FIRST].leased(ids, [self._schedules[Lane.RETRY]])

    async def restore(self, pending: Sequence[PendingDelivery]) -> int:
        """Put back the pending deliveries that are in neither lane (Redis lost them), each in
        the lane its attempts so far say; returns how many."""
        added = 0
        for lane in Lane:
            items = [(p.id, _due_ms(p)) for p in pending if p.lane is lane]
            if items:
                added += await self._schedules[lane].add_missing(items, [self._other(lane)])
        return added

    async def sizes(self) -> dict[Lane, int]:
        return {lane: await schedule.size() for lane, schedule in self._schedules.items()}

    async def _requeue(self, lane: Lane, ids: Sequence[str]) -> list[str]:
        return await self._schedules[lane].requeue(ids, now_ms(), [self._other(lane)])

    def _other(self, lane: Lane) -> Schedule:
        return self._schedules[Lane.RETRY if lane is Lane.FIRST else Lane.FIRST]


class Claim(Lease):
    """Deliveries leased together from one lane. Each one finishes in place (`finish`: due
    again there, or done) or moves to the retry lane in the same step (`retry`)."""

    def __init__(
        self, lanes: Lanes, lane: Lane, members: Sequence[str], until: float, length_ms: int
    ) -> None:
        super().__init__(lanes._schedules[lane], members, until, length_ms)
        self._retry_lane = lanes._schedules[Lane.RETRY]

    async def retry(self, items: Sequence[tuple[str, int]]) -> int:
        """Into the retry lane at their due times (ms), those still under this lease."""
        return await self.finish(items, [], into=self._retry_lane)

    async def give_back(self, due_ms: int) -> int:
        """Every member not yet finished due again at `due_ms`, in its lane."""
        return await self.finish([(m, due_ms) for m in sorted(self.members)], [])


def _due_ms(pending: PendingDelivery) -> int:
    return to_ms(pending.next_attempt_at) if pending.next_attempt_at else now_ms()
