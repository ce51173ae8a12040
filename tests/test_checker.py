"""The checker against the simulated Bakong: processes share one rate limit, and what the
limit puts off is answered `throttled` with a turn to come back at, never dropped."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import asyncpg
import pytest

from khqr_gateway.bakong.checker import BREAKER_THRESHOLD, THROTTLED, Checker
from khqr_gateway.bakong.client import BakongClient
from khqr_gateway.bakong.sandbox import Faults, make_token
from khqr_gateway.credentials import Credentials
from khqr_gateway.metrics import REGISTRY
from khqr_gateway.models import CheckKind, PollItem
from khqr_gateway.store import db
from khqr_gateway.store.ratelimit import RateLimit
from khqr_gateway.store.schedule import keys
from tests.conftest import SimulatedBakong, random_md5


@pytest.fixture
async def pool(database_url: str, pg: asyncpg.Connection) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(database_url)
    yield pool
    await pool.close()


async def process(
    pool: asyncpg.Pool, redis: Any, namespace: str, bakong: SimulatedBakong, rate: float
) -> Checker:
    """What one gateway process builds: its own client, credentials and breakers."""
    client = BakongClient(bakong.url, timeout_s=2)
    credentials = Credentials(pool, client)
    await credentials.setup_default(bakong.token, None)
    names = keys(namespace)
    limits = RateLimit(
        redis, bucket_key=names["bakong_rate"], pause_prefix=names["bakong_pause"], rate=rate
    )
    return Checker(bakong=client, credentials=credentials, limits=limits, interval_s=0.2)


def final_checks(count: int) -> list[PollItem]:
    """Items past their deadline: one per-md5 call each."""
    past = datetime.now(UTC) - timedelta(seconds=1)
    return [PollItem(uuid4(), random_md5(), past, None, None) for _ in range(count)]


async def test_two_processes_share_one_rate_limit(
    pool: asyncpg.Pool, redis: Any, namespace: str, bakong: SimulatedBakong
) -> None:
    checkers = [await process(pool, redis, namespace, bakong, rate=5) for _ in range(2)]
    start = time.monotonic()

    async def poll(checker: Checker) -> int:
        items, throttled = final_checks(20), 0
        while time.monotonic() - start < 2.0:
            results = await checker.check(items, datetime.now(UTC))
            assert len(results) == len(items), "every item gets a result"
            throttled += sum(r.error == THROTTLED for r in results.values())
            await asyncio.sleep(random.uniform(0.01, 0.09))
        return throttled

    throttled = await asyncio.gather(*(poll(c) for c in checkers))
    # Each wants 20 calls a tick; together they may make 5 (the bucket) + 5 a second.
    calls = bakong.state.calls["check_transaction_by_md5"]
    assert calls <= 5 + 5 * 2.1
    assert calls >= 8
    assert all(c.bakong.calls > 0 for c in checkers), "both processes got turns"
    assert all(t > 0 for t in throttled)
    for checker in checkers:
        await checker.bakong.close()


async def test_what_the_limit_puts_off_gets_turns_not_a_verdict(
    pool: asyncpg.Pool, redis: Any, namespace: str, bakong: SimulatedBakong
) -> None:
    checker = await process(pool, redis, namespace, bakong, rate=10)
    items = final_checks(25)
    results = await checker.check(items, datetime.now(UTC))
    answered = [r for r in results.values() if r.kind is CheckKind.NOT_FOUND]
    put_off = sorted((r.retry_after or 0.0) for r in results.values() if r.error == THROTTLED)
    assert len(answered) == 10 and len(put_off) == 15, "a full bucket holds 10"
    assert put_off == pytest.approx([n / 10 for n in range(1, 16)]), "one turn each, 0.1 s apart"
    answered_next = {r.retry_after for r in answered}
    assert min(answered_next) > max(put_off), "those answered come back behind those waiting"
    await checker.bakong.close()


def circuit_series() -> dict[str, float]:
    series = {}
    for m in REGISTRY.collect():
        if m.name == "khqr_bakong_circuit_open":
            series.update({s.labels["credential"]: s.value for s in m.samples})
    return series


async def test_open_circuits_of_many_credentials_share_one_series(
    pool: asyncpg.Pool, redis: Any, namespace: str, bakong: SimulatedBakong
) -> None:
    checker = await process(pool, redis, namespace, bakong, rate=1000)
    ahead = datetime.now(UTC) + timedelta(minutes=5)
    items = [PollItem(uuid4(), random_md5(), ahead, None, None)]  # the default credential
    for n in range(50):
        credential = await checker.credentials.add(
            token=make_token(f"shop{n}@example.com"), email=None
        )
        items.append(PollItem(uuid4(), random_md5(), ahead, credential, None))
    bakong.state.faults = Faults(status=500)
    for _ in range(BREAKER_THRESHOLD):
        await checker.check(items, datetime.now(UTC))
    assert len(checker.circuits()) == 51, "every credential's breaker opened"
    series = circuit_series()
    assert set(series) == {"default", "per_transaction"}, "51 breakers, not 51 series"
    assert series == {"default": 1, "per_transaction": 50}, "how many are open"

    bakong.state.faults = Faults()
    await asyncio.sleep(checker.backoff_base_s)  # each breaker lets its probe through
    await checker.check(items, datetime.now(UTC))
    assert circuit_series() == {"default": 0, "per_transaction": 0}
    await checker.bakong.close()
