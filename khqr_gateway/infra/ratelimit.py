"""Rate limits shared by every gateway process, in Redis: Bakong's token bucket and 429
pauses, and the API's requests a second."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from khqr_gateway import times
from khqr_gateway.infra.keys import sub_key
from khqr_gateway.infra.schedule import RedisClient

log = logging.getLogger(__name__)

# KEYS[1] the bucket (a hash: tokens, ts, and the end of each line); KEYS[2..] the pause key
# of each credential. ARGV[1] rate (tokens a second), ARGV[2] capacity, ARGV[3] now in ms
# ('' = Redis's clock, so that processes with skewed clocks share one bucket fairly), ARGV[4]
# 1 to queue (below), ARGV[5] the share of the bucket this request must leave (0 for most;
# calls that can wait leave the bucket's last tokens to those that cannot: it only holds
# them while the demand is below the rate), ARGV[6] the line to queue in, ARGV[7..] the
# calls each credential wants, in the order of KEYS[2..].
# A paused credential gets nothing and is told how long its pause lasts; the others share
# what the bucket holds. A request the bucket cannot serve in full books a turn for every
# call it asked for (granted or not) in a virtual queue served at the rate (its line's end:
# when the turns booked so far come), the calls put off first and then those granted now for
# their next check: while the demand exceeds the rate every process lines up behind every
# other, and each md5 gets its turn. A request served in full books nothing, so the queue is
# gone as soon as the demand is below the rate again (a burst's line does not stretch the
# calls that come after it). Calls that leave a share of the bucket queue in a line of their
# own, so that the turns they book never hold back the others'.
# Returns {calls granted, ms until this request's first turn (0: no queue), ms of pause left
# for each credential}.
_TAKE = """
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local queue = ARGV[4] == '1'
local keep = tonumber(ARGV[5]) * capacity
local line = ARGV[6]
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local out = {0, 0}
local wanted = 0
for i = 2, #KEYS do
  local left = redis.call('PTTL', KEYS[i])
  if left > 0 then
    out[i + 1] = left
  else
    out[i + 1] = 0
    wanted = wanted + tonumber(ARGV[i + 5])
  end
end
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts', line)
local tokens = tonumber(state[1]) or capacity
local ts = tonumber(state[2]) or now
local qend = tonumber(state[3]) or 0
if now > ts then
  tokens = math.min(capacity, tokens + (now - ts) * rate / 1000)
  ts = now
end
local granted = math.max(0, math.min(wanted, math.floor(tokens - keep)))
tokens = tokens - granted
local start = -1
if queue and wanted > granted then
  start = math.max(now, qend)
  qend = start + wanted * 1000 / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts), line, tostring(qend))
-- Never shorter than it was: the other line may end later.
local ttl = math.max(redis.call('PTTL', KEYS[1]), capacity / rate * 1000 + 1000, qend - now + 1000)
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl))
out[1] = granted
out[2] = start - now + 1
return out
"""

# KEYS[1] a credential's pause key; ARGV[1] ms. Lengthens a pause, never shortens one.
_PAUSE = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return 1
"""


@dataclass(frozen=True, slots=True)
class Grant:
    """What one `take` allows: how many calls may go out now, and who is paused.

    `turn_s` is None unless the demand exceeds the rate; then the calls asked for have
    turns `turn_s + n / rate` seconds from now (n = 1, 2, ...): first those put off, then,
    for their next check, those granted.
    """

    calls: int
    paused_s: dict[int | None, float]
    turn_s: float | None = None

    def turns(self, count: int, rate: float, *, after: int = 0) -> list[float | None]:
        """Seconds until each of `count` calls' turn, the first `after` turns being taken."""
        if self.turn_s is None:
            return [None] * count
        return [self.turn_s + (after + n) / rate for n in range(1, count + 1)]


class RateLimit:
    """BAKONG_MAX_RPS for all processes together; one round trip takes a whole tick's calls."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        bucket_key: str,
        pause_prefix: str,
        rate: float,
        capacity: float | None = None,
    ) -> None:
        self.bucket_key = bucket_key
        self.pause_prefix = pause_prefix
        self.rate = rate
        # One second's worth: a tick may send a burst, the average stays at `rate`.
        self.capacity = capacity if capacity is not None else max(1.0, rate)
        self._take: Any = redis.register_script(_TAKE)
        self._pause: Any = redis.register_script(_PAUSE)

    def pause_key(self, credential: int | None) -> str:
        return sub_key(self.pause_prefix, "default" if credential is None else credential)

    async def take(
        self,
        wanted: Mapping[int | None, int],
        now_ms: int | None = None,
        *,
        queue: bool = True,
        keep: float = 0.0,
    ) -> Grant:
        """Take tokens for the calls each credential wants; paused credentials get none.

        `queue=False` for calls that book no turn (a one-off retry after renewal, the late
        watch); `keep`, the share of the bucket left untouched, for calls that can wait
        (older md5s, the late watch): they get only what the others leave, and queue in a
        line of their own.
        """
        credentials = list(wanted)
        line = "qend" if keep == 0 else "qend:waits"
        now = "" if now_ms is None else now_ms
        reply = await self._take(
            keys=[self.bucket_key, *(self.pause_key(c) for c in credentials)],
            args=[self.rate, self.capacity, now, int(queue), keep, line]
            + [wanted[c] for c in credentials],
        )
        paused = {c: int(ms) / 1000 for c, ms in zip(credentials, reply[2:], strict=True) if ms}
        turn_ms = int(reply[1]) - 1
        return Grant(int(reply[0]), paused, turn_ms / 1000 if turn_ms >= 0 else None)

    async def pause(self, credential: int | None, seconds: float) -> None:
        """Stop every process calling Bakong for `credential` for `seconds` (after a 429)."""
        ms = max(1, times.seconds_to_ms(seconds))
        await self._pause(keys=[self.pause_key(credential)], args=[ms])


# KEYS: the counters of this second of the keys counted since the last sync; ARGV: how many
# calls of each. Returns each counter's total: every process's calls so far.
_SYNC = """
local totals = {}
for i = 1, #KEYS do
    local n = redis.call('INCRBY', KEYS[i], ARGV[i])
    if n == tonumber(ARGV[i]) then redis.call('PEXPIRE', KEYS[i], 2000) end
    totals[i] = n
end
return totals
"""
# Counts reach Redis this often: what other processes made in the last SYNC_S is seen late.
SYNC_S = 0.05


class PerSecond:
    """Counts the calls of each key in each wall-clock second, across processes, without a
    round trip a call: counted here at once, shared through Redis every `sync_s` (one script
    call for every key counted meanwhile). A count is Redis's total at the last sync plus this
    process's calls since, so the calls other processes made in the last `sync_s` are the
    most it can miss."""

    def __init__(self, redis: RedisClient, prefix: str, *, sync_s: float = SYNC_S) -> None:
        self.redis = redis
        self.prefix = prefix
        self.sync_s = sync_s
        self._second = 0
        self._unsent: Counter[str] = Counter()
        self._sending: Counter[str] = Counter()  # on its way to Redis
        self._shared: dict[str, int] = {}
        self._sync_task: asyncio.Task[None] | None = None
        self._sync: Any = redis.register_script(_SYNC)

    async def count(self, key: str) -> int:
        """This call's number in the current second for `key`, 1 for the first (as far as
        this process knows; see the class)."""
        second = int(time.time())
        if second != self._second:
            self._second, self._unsent, self._sending, self._shared = (
                second,
                Counter(),
                Counter(),
                {},
            )
        self._unsent[key] += 1
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.create_task(self._send(), name="khqr-api-rate")
        return self._shared.get(key, 0) + self._sending[key] + self._unsent[key]

    async def close(self) -> None:
        """Stop sending (at shutdown, before Redis closes)."""
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task

    async def _send(self) -> None:
        """Send what was counted, every `sync_s`, until nothing is left to send."""
        while True:
            await asyncio.sleep(self.sync_s)
            if not self._unsent:
                return
            second, self._sending, self._unsent = self._second, self._unsent, Counter()
            sending = self._sending
            names = list(sending)
            try:
                totals = await self._sync(
                    keys=[sub_key(self.prefix, name, second) for name in names],
                    args=[sending[name] for name in names],
                )
            except Exception as exc:  # Redis away: counted here alone until it is back
                log.debug("could not share request counts: %s", exc)
                # Sent again while its second lasts; a second gone no longer counts.
                if second == self._second == int(time.time()):
                    self._unsent.update(sending)
                    self._sending = Counter()
                continue
            if second == self._second:
                self._shared.update(zip(names, map(int, totals), strict=True))
                self._sending = Counter()
