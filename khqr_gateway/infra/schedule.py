"""Redis sorted-set schedules: due members are claimed atomically under a lease.

A member's score is the time (epoch ms) it is next due. Claiming moves the score to the
end of a lease, so a process killed mid-work loses nothing: the member simply comes due
again when its lease runs out. Finishing (reschedule or remove) is fenced on the lease
score, so a process whose lease ran out cannot undo the claim of the process that took
the member over. Due times are whole milliseconds and lease ends half a millisecond past
one, so a member being worked on is told from one merely due later (`requeue` leaves it
alone: a lease overwritten would have it sent twice at once).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from khqr_gateway import times

log = logging.getLogger(__name__)

# Added to every lease end and to nothing else; exact in a double until long after year 9999.
LEASE_MARK = 0.5

# KEYS[1] schedule; ARGV: now_ms, limit, lease_until_ms, lookahead_ms, batch
# Takes due members (oldest first); when the last batch would be partly empty it is
# topped up with members due within the lookahead, so Bakong calls go out full.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local batch = tonumber(ARGV[5])
local room = tonumber(ARGV[2]) - #due
local short = (batch - (#due % batch)) % batch
if short > 0 and room > 0 and tonumber(ARGV[4]) > 0 then
  local upto = tonumber(ARGV[1]) + tonumber(ARGV[4])
  local extra = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], upto,
                           'LIMIT', 0, math.min(short, room))
  for _, m in ipairs(extra) do due[#due + 1] = m end
end
for _, m in ipairs(due) do redis.call('ZADD', KEYS[1], 'XX', ARGV[3], m) end
return due
"""

# KEYS[1] schedule, KEYS[2] (if given) where rescheduled members go instead; ARGV:
# lease_until_ms, then member, due_ms pairs (due_ms '' = remove). A member moved to another
# schedule leaves this one in the same step: never in neither, never in both.
_FINISH = """
local lease = tonumber(ARGV[1])
local into = KEYS[2] or KEYS[1]
local done = 0
for i = 2, #ARGV, 2 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == lease then
    if ARGV[i + 1] == '' or into ~= KEYS[1] then
      redis.call('ZREM', KEYS[1], ARGV[i])
    end
    if ARGV[i + 1] ~= '' then
      redis.call('ZADD', into, ARGV[i + 1], ARGV[i])
    end
    done = done + 1
  end
end
return done
"""

# KEYS[1] schedule; ARGV: old lease, new lease, members; extends those still under the old one.
_EXTEND = """
local kept = 0
for i = 3, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[1]) then
    redis.call('ZADD', KEYS[1], ARGV[2], ARGV[i])
    kept = kept + 1
  end
end
return kept
"""

# KEYS: the target schedule, then every schedule a member may already be in;
# ARGV: member, due_ms pairs. Adds only the members found in none of them.
_ADD_MISSING = """
local added = 0
for i = 1, #ARGV, 2 do
  local present = false
  for k = 1, #KEYS do
    if redis.call('ZSCORE', KEYS[k], ARGV[i]) then present = true; break end
  end
  if not present then
    redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i])
    added = added + 1
  end
end
return added
"""


# KEYS: the lane to queue in, then the other lanes a member may be in; ARGV: now_ms, due_ms,
# members. Queues each member (out of the other lanes) unless a live lease holds it in any
# lane (its score ends in LEASE_MARK and is still ahead); returns the members held.
_REQUEUE = """
local now = tonumber(ARGV[1])
local held = {}
for i = 3, #ARGV do
  local leased = false
  for k = 1, #KEYS do
    local score = tonumber(redis.call('ZSCORE', KEYS[k], ARGV[i]) or '')
    if score and score % 1 == 0.5 and score > now then leased = true; break end
  end
  if leased then
    held[#held + 1] = ARGV[i]
  else
    for k = 2, #KEYS do redis.call('ZREM', KEYS[k], ARGV[i]) end
    redis.call('ZADD', KEYS[1], ARGV[2], ARGV[i])
  end
end
return held
"""


def under_lease(score: float | None, now_ms: float) -> bool:
    """The score of a member that a live lease holds: someone is working on it now."""
    return score is not None and score % 1 == LEASE_MARK and score > now_ms


class Schedule:
    """One sorted set of due work, shared by every gateway process."""

    def __init__(self, redis: RedisClient, key: str) -> None:
        self.redis = redis
        self.key = key
        self._claim: Any = redis.register_script(_CLAIM)
        self._finish: Any = redis.register_script(_FINISH)
        self._add_missing: Any = redis.register_script(_ADD_MISSING)
        self._extend: Any = redis.register_script(_EXTEND)
        self._requeue: Any = redis.register_script(_REQUEUE)

    async def add(self, items: Iterable[tuple[str, int]], *, only_new: bool = False) -> int:
        """Schedule members at their due times (ms); `only_new` keeps existing scores."""
        mapping = {member: due for member, due in items}
        if not mapping:
            return 0
        added: int = await self.redis.zadd(self.key, mapping, nx=only_new)  # type: ignore[assignment]
        return added

    async def add_missing(
        self, items: Sequence[tuple[str, int]], also_in: Sequence[Schedule] = ()
    ) -> int:
        """Add members that are in neither this schedule nor `also_in` (reconcile)."""
        if not items:
            return 0
        args: list[str | int] = []
        for member, due in items:
            args += [member, due]
        keys = [self.key, *(other.key for other in also_in)]
        return int(await self._add_missing(keys=keys, args=args))

    async def requeue(
        self, members: Sequence[str], due_ms: int, also_in: Sequence[Schedule] = ()
    ) -> list[str]:
        """Due at `due_ms` here and out of `also_in`, except members a live lease holds in
        any of them (an overwritten lease would send them twice at once): returns those."""
        if not members:
            return []
        keys = [self.key, *(other.key for other in also_in)]
        held = await self._requeue(keys=keys, args=[times.now_ms(), due_ms, *members])
        return [m.decode() if isinstance(m, bytes) else m for m in held]

    async def leased(self, members: Sequence[str], also_in: Sequence[Schedule] = ()) -> list[str]:
        """The members a live lease holds, here or in `also_in`."""
        now_ms = times.now_ms()
        held: list[str] = []
        for lane in (self, *also_in):
            scores = await lane.scores(members)
            held += [
                m for m, score in zip(members, scores, strict=True) if under_lease(score, now_ms)
            ]
        return held

    async def claim(
        self,
        now_ms: int,
        limit: int,
        lease_ms: int,
        *,
        lookahead_ms: int = 0,
        batch: int = 1,
    ) -> tuple[list[str], float]:
        """Claim up to `limit` due members; returns them and the lease score to finish with."""
        lease_until = now_ms + lease_ms + LEASE_MARK
        members = await self._claim(
            keys=[self.key], args=[now_ms, limit, lease_until, lookahead_ms, batch]
        )
        return [m.decode() if isinstance(m, bytes) else m for m in members], lease_until

    async def finish(
        self,
        lease_until: float,
        reschedule: Sequence[tuple[str, int]],
        remove: Sequence[str],
        *,
        into: Schedule | None = None,
    ) -> int:
        """Reschedule (here, or moved `into` another schedule with the same hash tag) and
        remove members claimed under `lease_until`; others are left alone."""
        args: list[str | float] = [lease_until]
        for member, due in reschedule:
            args += [member, due]
        for member in remove:
            args += [member, ""]
        if len(args) == 1:
            return 0
        keys = [self.key] if into is None else [self.key, into.key]
        return int(await self._finish(keys=keys, args=args))

    async def extend(self, lease_until: float, new_until: float, members: Sequence[str]) -> int:
        """Push the lease of `members` still held under `lease_until` out to `new_until`."""
        if not members:
            return 0
        return int(await self._extend(keys=[self.key], args=[lease_until, new_until, *members]))

    async def remove(self, members: Sequence[str]) -> int:
        if not members:
            return 0
        return int(await self.redis.zrem(self.key, *members))

    async def size(self) -> int:
        return int(await self.redis.zcard(self.key))

    async def oldest_due_ms(self) -> int | None:
        first = await self.redis.zrange(self.key, 0, 0, withscores=True)
        return int(first[0][1]) if first else None

    async def scores(self, members: Sequence[str]) -> list[float | None]:
        if not members:
            return []
        return list(await self.redis.zmscore(self.key, list(members)))


class Lease:
    """Members claimed together, kept alive while work on them goes on.

    Short leases make a killed process's work come due again within seconds; the keeper
    renews them while this process is alive. Renewing and finishing share one lock, so a
    finish always fences on the current lease.
    """

    def __init__(
        self, schedule: Schedule, members: Sequence[str], until: float, length_ms: int
    ) -> None:
        self.schedule = schedule
        self.until = until
        self.length_ms = length_ms
        self.members = set(members)
        self._lock = asyncio.Lock()
        self._keeper: asyncio.Task[None] | None = None

    def __enter__(self) -> Lease:
        self._keeper = asyncio.create_task(self._keep())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._keeper is not None:
            self._keeper.cancel()

    async def _keep(self) -> None:
        while self.members:
            await asyncio.sleep(self.length_ms / 3000)
            async with self._lock:
                new_until = times.now_ms() + self.length_ms + LEASE_MARK
                try:
                    await self.schedule.extend(self.until, new_until, sorted(self.members))
                except RedisError:
                    continue  # the lease runs out and the work comes due again: nothing lost
                self.until = new_until

    async def finish(
        self,
        reschedule: Sequence[tuple[str, int]],
        remove: Sequence[str],
        *,
        into: Schedule | None = None,
    ) -> int:
        async with self._lock:
            done = await self.schedule.finish(self.until, reschedule, remove, into=into)
            self.members.difference_update(m for m, _ in reschedule)
            self.members.difference_update(remove)
            return done


# One Redis or a Redis Cluster: every key the service uses together shares one hash tag
# (see infra/keys.py), so every script and pipeline runs on the one node holding that slot.
RedisClient = Redis | RedisCluster


async def connect(url: str, *, cluster: bool) -> RedisClient:
    """A client for the Redis at `url`, or for the Redis Cluster that `url` is a node of."""
    if not cluster:
        return Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    client = RedisCluster.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        # Learn the slots now: commands that first meet an uninitialized cluster client
        # all at once trip over each other in redis-py (a connection without its writer).
        await client.initialize()
    except (RedisError, RedisClusterException) as exc:  # down: retried on use, as one Redis
        log.warning("Redis Cluster not reachable at start-up: %s", exc)
    return client
