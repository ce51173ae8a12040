"""Which app a presented API key belongs to: one indexed lookup of its hash, then cached
briefly, so that a revoked or expired key, or a disabled app, stops working in every process
within 5 s while a request costs no query; when keys were last used is written in batches."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from khqr_gateway.apps import store
from khqr_gateway.apps.model import ApiKey, App, key_hash

# Every process re-reads a key at least this often: the bound on how long a revocation takes.
TTL_S = 4.0
# Keys remembered per process, wrong ones included (a flood of wrong keys evicts only itself).
CACHE_MAX = 10_000


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the app, and the key it used."""

    app: App
    key: ApiKey


@dataclass(frozen=True, slots=True)
class _Entry:
    found: tuple[ApiKey, App] | None
    until: float


class KeyCache:
    """Presented keys to their app, for at most `ttl_s` before Postgres is asked again."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        ttl_s: float = TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._loading: dict[bytes, asyncio.Future[tuple[ApiKey, App] | None]] = {}
        self._used: dict[str, datetime] = {}

    async def caller(self, presented: str) -> Caller | None:
        """The app and key of a presented key, or None when it is unknown or may not be used."""
        found = await self._lookup(key_hash(presented))
        if found is None:
            return None
        key, app = found
        now = datetime.now(UTC)
        if app.disabled or not key.usable(now):
            return None
        self._used[key.id] = now
        return Caller(app, key)

    def forget(self) -> None:
        """Drop every cached key: the next use of each asks Postgres."""
        self._entries.clear()

    async def flush_used(self) -> None:
        """Write when keys were last used (a tick calls this; a request never waits for it)."""
        used, self._used = self._used, {}
        try:
            await store.touch_keys(self.pool, used)
        except BaseException:
            for key_id, at in used.items():  # kept for the next flush
                self._used[key_id] = max(at, self._used.get(key_id, at))
            raise

    async def _lookup(self, digest: bytes) -> tuple[ApiKey, App] | None:
        entry = self._entries.get(digest)
        if entry is not None and entry.until > self.clock():
            self._entries.move_to_end(digest)
            return entry.found
        loading = self._loading.get(digest)
        if loading is not None:  # the same key asked for at once: one query for all of them
            try:
                return await asyncio.shield(loading)
            except asyncio.CancelledError:
                if not loading.cancelled():
                    raise  # this caller was cancelled, not the lookup it waited for
            return await store.find_key(self.pool, digest)
        future: asyncio.Future[tuple[ApiKey, App] | None]
        future = asyncio.get_running_loop().create_future()
        self._loading[digest] = future
        try:
            found = await store.find_key(self.pool, digest)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # marked retrieved: without waiters nobody else reads it
            raise
        finally:
            del self._loading[digest]
        future.set_result(found)
        self._remember(digest, found)
        return found

    def _remember(self, digest: bytes, found: tuple[ApiKey, App] | None) -> None:
        self._entries[digest] = _Entry(found, self.clock() + self.ttl_s)
        self._entries.move_to_end(digest)
        while len(self._entries) > CACHE_MAX:
            self._entries.popitem(last=False)
