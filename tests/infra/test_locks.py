"""Redis locks shared by processes: one holder, released only by it, freed when it dies."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from khqr_gateway.infra.keys import keys
from khqr_gateway.infra.locks import Locks, LockTimeout


def locks(redis: Any, namespace: str) -> Locks:
    return Locks(redis, keys(namespace)["bakong_renew"])


async def test_one_holder_at_a_time(redis: Any, namespace: str) -> None:
    a, b = locks(redis, namespace), locks(redis, namespace)
    token = await a.acquire("1", 10_000)
    assert token is not None
    assert await b.acquire("1", 10_000) is None
    assert await b.acquire("2", 10_000) is not None, "locks are per name"
    assert await a.release("1", token)
    assert await b.acquire("1", 10_000) is not None


async def test_only_the_holder_releases(redis: Any, namespace: str) -> None:
    a = locks(redis, namespace)
    token = await a.acquire("1", 10_000)
    assert not await a.release("1", "not-the-token")
    assert await a.acquire("1", 10_000) is None
    assert token is not None and await a.release("1", token)


async def test_a_dead_holders_lock_runs_out(redis: Any, namespace: str) -> None:
    a = locks(redis, namespace)
    stale = await a.acquire("1", 100)
    await asyncio.sleep(0.15)
    fresh = await a.acquire("1", 10_000)
    assert fresh is not None
    assert stale is not None and not await a.release("1", stale), "cannot free the new holder"


async def test_hold_waits_for_the_holder_or_gives_up(redis: Any, namespace: str) -> None:
    a = locks(redis, namespace)
    order: list[str] = []

    async def worker(name: str) -> None:
        async with a.hold("1", ttl_ms=5_000, wait_s=2):
            order.append(f"{name} in")
            await asyncio.sleep(0.1)
            order.append(f"{name} out")

    await asyncio.gather(worker("a"), worker("b"))
    assert order in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])
    token = await a.acquire("1", 5_000)
    assert token is not None
    with pytest.raises(LockTimeout):
        async with a.hold("1", ttl_ms=5_000, wait_s=0.1):
            pass
