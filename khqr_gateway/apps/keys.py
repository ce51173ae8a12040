"""Which app a presented API key belongs to: one indexed lookup of its hash, then cached
briefly, so that a revoked or expired key, or a disabled app, stops working in every process
within 5 s while a request costs no query; when keys were last used is written in batches.
Apps named by id (an admin key's `Khqr-App`, a webhook's signing) are cached the same way."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

import asyncpg

from khqr_gateway.apps import store
from khqr_gateway.apps.model import DEFAULT_APP_ID, ApiKey, App, Caller, key_hash
from khqr_gateway.deliveries.signing import decode_secret

# Every process re-reads a key at least this often: the bound on how long a revocation takes.
TTL_S = 4.0
# Keys remembered per process, wrong ones included (a flood of wrong keys evicts only itself).
CACHE_MAX = 10_000

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class _Entry(Generic[V]):
    value: V
    until: float


class TtlCache(Generic[K, V]):
    """Values loaded once per `ttl_s` per key; callers asking for one key at once share one
    load; at most `size` keys, the least recently used dropped first."""

    def __init__(
        self,
        load: Callable[[K], Awaitable[V]],
        *,
        ttl_s: float,
        size: int = CACHE_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.load = load
        self.ttl_s = ttl_s
        self.size = size
        self.clock = clock
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._loading: dict[K, asyncio.Future[V]] = {}

    def clear(self) -> None:
        self._entries.clear()

    def peek(self, key: K) -> V | None:
        """The value remembered for `key` now, without loading it; None when there is none."""
        entry = self._entries.get(key)
        return entry.value if entry is not None and entry.until > self.clock() else None

    async def get(self, key: K) -> V:
        entry = self._entries.get(key)
        if entry is not None and entry.until > self.clock():
            self._entries.move_to_end(key)
            return entry.value
        loading = self._loading.get(key)
        if loading is not None:  # the same key asked for at once: one load for all of them
            try:
                return await asyncio.shield(loading)
            except asyncio.CancelledError:
                if not loading.cancelled():
                    raise  # this caller was cancelled, not the load it waited for
            return await self.load(key)
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            value = await self.load(key)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # marked retrieved: without waiters nobody else reads it
            raise
        finally:
            del self._loading[key]
        future.set_result(value)
        self._entries[key] = _Entry(value, self.clock() + self.ttl_s)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value


class KeyCache:
    """Presented keys to their app, and app ids to their app, for at most `ttl_s` before
    Postgres is asked again."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        ttl_s: float = TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.ttl_s = ttl_s
        self._keys: TtlCache[bytes, tuple[ApiKey, App] | None] = TtlCache(
            self._find_key, ttl_s=ttl_s, clock=clock
        )
        self._apps: TtlCache[str, App | None] = TtlCache(self._find_app, ttl_s=ttl_s, clock=clock)
        self._used: dict[str, datetime] = {}

    async def caller(self, presented: str) -> Caller | None:
        """The app and key of a presented key, or None when it is unknown or may not be used."""
        found = await self._keys.get(key_hash(presented))
        if found is None:
            return None
        key, app = found
        now = datetime.now(UTC)
        if app.disabled or not key.usable(now):
            return None
        self._used[key.id] = now
        return Caller(app.id, key.id, app=app)

    def knows(self, presented: str) -> bool:
        """Whether this key was found (a valid key's app) at the last look, within the TTL."""
        return self._keys.peek(key_hash(presented)) is not None

    async def app(self, app_id: str) -> App | None:
        """The app with this id (disabled ones too), as read at most `ttl_s` ago."""
        return await self._apps.get(app_id)

    def forget(self) -> None:
        """Drop every cached key and app: the next use of each asks Postgres."""
        self._keys.clear()
        self._apps.clear()

    async def flush_used(self) -> None:
        """Write when keys were last used (a tick calls this; a request never waits for it)."""
        used, self._used = self._used, {}
        try:
            await store.touch_keys(self.pool, used)
        except BaseException:
            for key_id, at in used.items():  # kept for the next flush
                self._used[key_id] = max(at, self._used.get(key_id, at))
            raise

    async def _find_key(self, digest: bytes) -> tuple[ApiKey, App] | None:
        return await store.find_key(self.pool, digest)

    async def _find_app(self, app_id: str) -> App | None:
        return await store.get(self.pool, app_id)


class SigningKeys:
    """The secrets that sign each app's webhooks, newest first: the environment's
    (`WEBHOOK_SECRET`) for the default app, each other app's own from Postgres, read at most
    once per `ttl_s` (a rotated secret keeps signing for `overlap_s`, so a stale read never
    drops the one a receiver still checks)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        default: tuple[bytes, ...],
        *,
        overlap_s: float,
        ttl_s: float = TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.default = default
        self.overlap = timedelta(seconds=overlap_s)
        self._cache: TtlCache[str, tuple[bytes, ...]] = TtlCache(
            self._load, ttl_s=ttl_s, clock=clock
        )

    async def of(self, app_id: str) -> tuple[bytes, ...]:
        if app_id == DEFAULT_APP_ID:
            return self.default
        return await self._cache.get(app_id)

    def forget(self) -> None:
        self._cache.clear()

    async def _load(self, app_id: str) -> tuple[bytes, ...]:
        stored = await store.signing_secrets(self.pool, app_id, self.overlap)
        return tuple(decode_secret(secret) for secret in stored)
