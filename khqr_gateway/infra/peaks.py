"""The highest value of a figure in each hour, kept in one Redis hash for the dashboard's charts."""

from __future__ import annotations

from typing import Any

from khqr_gateway.infra.schedule import RedisClient

HOUR_MS = 3_600_000
# A value at or under what this process wrote in the hour is written again after this long
# anyway: a hash Redis lost (a flush, a failover) is mended within a minute.
REWRITE_MS = 60_000

# KEYS[1] the hash (field: the hour's start in unix seconds, value: its peak);
# ARGV[1] the hour, ARGV[2] the value, ARGV[3] the oldest hour kept. Raises the hour's peak
# if the value is higher; an hour's first value also forgets the hours before the window.
# A field that is not a number (never written by us) is dropped, not compared.
_RAISE = """
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
if old == nil or tonumber(ARGV[2]) > old then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
if old == nil then
  local oldest = tonumber(ARGV[3])
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    local hour = tonumber(field)
    if hour == nil or hour < oldest then redis.call('HDEL', KEYS[1], field) end
  end
end
return 1
"""


class HourlyPeaks:
    """Per hour, the highest value any process recorded: every process records what it
    reads, and the hash keeps the maximum, so two processes agree without coordinating."""

    def __init__(self, redis: RedisClient, key: str, keep_hours: int = 25) -> None:
        self.redis = redis
        self.key = key
        self.keep_hours = keep_hours
        self._raise: Any = redis.register_script(_RAISE)
        # What this process last wrote (hour, value, when): a value at or under it needs no
        # write in that hour for REWRITE_MS.
        self._written: tuple[int, int, int] | None = None

    async def record(self, at_ms: int, value: int) -> None:
        """Count `value` towards the peak of the hour holding `at_ms` (epoch ms)."""
        hour = at_ms // HOUR_MS * (HOUR_MS // 1000)
        if self._written is not None:
            written_hour, written, written_at = self._written
            if written_hour == hour and value <= written and at_ms - written_at < REWRITE_MS:
                return
        oldest = hour - (self.keep_hours - 1) * (HOUR_MS // 1000)
        await self._raise(keys=[self.key], args=[hour, value, oldest])
        self._written = (hour, value, at_ms)

    async def read(self) -> dict[int, int]:
        """Each hour kept (its start in unix seconds) and its peak; a bad field is left out."""
        raw = await self.redis.hgetall(self.key)
        peaks: dict[int, int] = {}
        for field, value in raw.items():
            try:
                peaks[int(field)] = int(value)
            except ValueError:
                continue
        return peaks
