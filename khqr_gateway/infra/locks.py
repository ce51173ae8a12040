"""Locks shared by gateway processes: Redis SET NX PX with a random token, compare-and-delete."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from khqr_gateway.infra.keys import sub_key
from khqr_gateway.infra.schedule import RedisClient

# KEYS[1] the lock; ARGV[1] the holder's token. Only the holder can release it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LockTimeout(Exception):
    """Another holder kept the lock for longer than we were willing to wait."""


class Locks:
    """Named locks under one key prefix; a holder that dies frees its lock after `ttl_ms`."""

    def __init__(self, redis: RedisClient, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self._release: Any = redis.register_script(_RELEASE)

    def key(self, name: str) -> str:
        return sub_key(self.prefix, name)

    async def acquire(self, name: str, ttl_ms: int) -> str | None:
        """The lock's token if we got it, None if someone else holds it."""
        token = secrets.token_hex(16)
        ok = await self.redis.set(self.key(name), token, nx=True, px=ttl_ms)
        return token if ok else None

    async def release(self, name: str, token: str) -> bool:
        """Release the lock if we still hold it (it may have expired and been taken over)."""
        return bool(await self._release(keys=[self.key(name)], args=[token]))

    @asynccontextmanager
    async def hold(
        self, name: str, *, ttl_ms: int, wait_s: float, poll_s: float = 0.05
    ) -> AsyncIterator[None]:
        """Hold the lock for the block, waiting up to `wait_s` for the current holder."""
        deadline = time.monotonic() + wait_s
        while (token := await self.acquire(name, ttl_ms)) is None:
            if time.monotonic() >= deadline:
                raise LockTimeout(name)
            await asyncio.sleep(poll_s)
        try:
            yield
        finally:
            await self.release(name, token)
