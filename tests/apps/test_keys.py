"""Key lookup as two gateway processes see it: cached, one query per key, revocations within
the TTL everywhere, last use written in batches."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from khqr_gateway.apps import keys as keys_module
from khqr_gateway.apps import store
from khqr_gateway.apps.keys import KeyCache


@pytest.fixture
async def pool(database_url: str, pg: asyncpg.Connection) -> AsyncIterator[asyncpg.Pool]:
    made = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    yield made
    await made.close()


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The hashes looked up in Postgres (the real query runs; this only counts it)."""
    seen: list[bytes] = []
    real = store.find_key

    async def counted(pool: asyncpg.Pool, digest: bytes) -> Any:
        seen.append(digest)
        return await real(pool, digest)

    monkeypatch.setattr(keys_module.store, "find_key", counted)
    return seen


async def test_many_requests_with_one_key_cost_one_query(
    pool: asyncpg.Pool, lookups: list[bytes]
) -> None:
    app, key, _ = await store.create(pool, "Shop")
    cache = KeyCache(pool)
    callers = await asyncio.gather(*(cache.caller(key.key) for _ in range(50)))
    callers += [await cache.caller(key.key) for _ in range(50)]
    assert {c.app_id for c in callers if c} == {app.id} and all(callers)
    assert len(lookups) == 1


async def test_a_wrong_key_finds_nothing_and_is_not_asked_again_at_once(
    pool: asyncpg.Pool, lookups: list[bytes]
) -> None:
    cache = KeyCache(pool)
    assert await cache.caller("kgw_" + "x" * 43) is None
    assert await cache.caller("kgw_" + "x" * 43) is None
    assert len(lookups) == 1


async def test_a_revoked_key_stops_working_in_every_process_within_the_ttl(
    pool: asyncpg.Pool,
) -> None:
    """Two processes (two caches on one Postgres) have used the key; it is revoked through
    one of them. Both refuse it once the TTL has passed, and not before is allowed."""
    app, key, _ = await store.create(pool, "Shop")
    first, second = KeyCache(pool, ttl_s=0.5), KeyCache(pool, ttl_s=0.5)
    assert await first.caller(key.key) and await second.caller(key.key)
    revoked_at = time.monotonic()
    assert await store.revoke_key(pool, app.id, key.id)
    while await first.caller(key.key) or await second.caller(key.key):
        assert time.monotonic() - revoked_at < 0.5 + 0.3, "still accepted past the TTL"
        await asyncio.sleep(0.02)
    assert await first.caller(key.key) is None and await second.caller(key.key) is None


async def test_an_expired_key_is_refused_without_asking_postgres(
    pool: asyncpg.Pool, pg: asyncpg.Connection, lookups: list[bytes]
) -> None:
    app, _, _ = await store.create(pool, "Shop")
    soon = datetime.now(UTC) + timedelta(seconds=0.3)
    key = await store.add_key(pool, app.id, expires_at=soon)
    cache = KeyCache(pool, ttl_s=60)
    assert await cache.caller(key.key) is not None
    await asyncio.sleep(max(0.0, (soon - datetime.now(UTC)).total_seconds()) + 0.05)
    assert await cache.caller(key.key) is None
    assert len(lookups) == 1


async def test_a_disabled_app_s_keys_stop_working(pool: asyncpg.Pool) -> None:
    app, key, _ = await store.create(pool, "Shop")
    cache = KeyCache(pool, ttl_s=0.2)
    assert await cache.caller(key.key) is not None
    await store.disable(pool, app.id)
    await asyncio.sleep(0.25)
    assert await cache.caller(key.key) is None


async def test_last_use_is_written_by_the_flush_and_survives_a_failed_one(
    pool: asyncpg.Pool,
) -> None:
    app, key, _ = await store.create(pool, "Shop")
    cache = KeyCache(pool)
    assert await cache.caller(key.key) is not None
    (stored,) = await store.list_keys(pool, app.id)
    assert stored.last_used_at is None, "a request writes nothing"
    broken = KeyCache(pool)
    broken._used = dict(cache._used)
    await pool.close()
    with pytest.raises(asyncpg.InterfaceError):
        await broken.flush_used()
    assert key.id in broken._used, "kept for the next flush"


async def test_flush_writes_the_moment_of_last_use(pool: asyncpg.Pool) -> None:
    app, key, _ = await store.create(pool, "Shop")
    cache = KeyCache(pool)
    before = datetime.now(UTC)
    await cache.caller(key.key)
    await cache.flush_used()
    (stored,) = await store.list_keys(pool, app.id)
    assert stored.last_used_at is not None and stored.last_used_at >= before - timedelta(seconds=1)
