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
from redis.asyncio import Redis

from khqr_gateway.bakong import khqr
from khqr_gateway.bakong.checker import BREAKER_THRESHOLD, THROTTLED, Checker
from khqr_gateway.bakong.client import BakongClient, SourceInfo
from khqr_gateway.bakong.sandbox import Faults, make_token, parse_faults
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


# Deep links ------------------------------------------------------------------------------

SOURCE = SourceInfo(
    app_name="Coffee Shop",
    app_icon_url="https://shop.example/icon.png",
    callback_url="https://shop.example/paid",
)


def a_qr() -> str:
    expires = int(time.time() * 1000) + 300_000
    return khqr.build(
        account_id="shop@aclb",
        merchant_name="Coffee Shop",
        amount="3.75",
        currency="USD",
        dynamic=True,
        expires_at_ms=expires,
    )


async def test_a_deeplink_is_bakongs_link_for_the_qr_and_the_source(
    pool: asyncpg.Pool, redis: Any, namespace: str, bakong: SimulatedBakong
) -> None:
    checker = await process(pool, redis, namespace, bakong, rate=50)
    qr = a_qr()
    link = await checker.deeplink(None, qr, SOURCE)
    assert link is not None and link.startswith(f"{bakong.url}/link/"), link
    asked = bakong.state.links[link.rsplit("/", 1)[1]]
    assert asked.qr == qr
    assert asked.source == {
        "appName": "Coffee Shop",
        "appIconUrl": "https://shop.example/icon.png",
        "appDeepLinkCallback": "https://shop.example/paid",
    }
    await checker.bakong.close()


@pytest.mark.parametrize(
    "faults",
    [
        {"deeplinkError": True},  # errorCode 4: the link provider failed
        {"status": 500},
        {"status": 401},
        {"malformed": "html"},
        {"malformed": "shape"},
        {"delayS": 2.5},  # past the client's 2 s timeout
    ],
)
async def test_a_deeplink_bakong_does_not_give_is_none_never_an_error(
    pool: asyncpg.Pool,
    redis: Any,
    namespace: str,
    bakong: SimulatedBakong,
    faults: dict[str, Any],
) -> None:
    checker = await process(pool, redis, namespace, bakong, rate=50)
    bakong.state.faults = parse_faults({**faults, "endpoints": ["generate_deeplink_by_qr"]})
    assert await checker.deeplink(None, a_qr(), SOURCE) is None
    assert bakong.state.calls["generate_deeplink_by_qr"] >= 1
    await checker.bakong.close()


async def test_a_link_that_is_not_a_url_is_no_link(
    pool: asyncpg.Pool, redis: Any, namespace: str, bakong: SimulatedBakong
) -> None:
    """Bakong's reply ends up in a link on the page: only a plain URL is taken."""
    checker = await process(pool, redis, namespace, bakong, rate=50)
    for link in ("javascript:alert(1)", "data:text/html,x", "not a url", "", 42):
        bakong.state.faults = Faults(short_link=link)
        assert await checker.deeplink(None, a_qr(), SOURCE) is None, link
    await checker.bakong.close()


async def test_deeplinks_wait_for_the_open_breaker_and_the_shared_limit(
    pool: asyncpg.Pool, redis: Any, namespace: str, bakong: SimulatedBakong
) -> None:
    checker = await process(pool, redis, namespace, bakong, rate=50)
    bakong.state.faults = Faults(status=500)
    for _ in range(BREAKER_THRESHOLD):
        assert await checker.deeplink(None, a_qr(), SOURCE) is None
    default = str(checker.credentials.default_id)
    assert checker.circuits() == {default: "open"}, "deeplink failures count as the checks'"
    sent = bakong.state.calls["generate_deeplink_by_qr"]
    assert await checker.deeplink(None, a_qr(), SOURCE) is None
    assert bakong.state.calls["generate_deeplink_by_qr"] == sent, "an open breaker sends nothing"
    await checker.bakong.close()

    bakong.state.faults = Faults()
    slow = await process(pool, redis, f"{namespace}-slow", bakong, rate=1)
    links = [await slow.deeplink(None, a_qr(), SOURCE) for _ in range(3)]
    assert links[0] is not None
    assert links[1:] == [None, None], "past the shared limit: no link rather than a wait"
    await slow.bakong.close()


async def test_no_shared_limit_to_ask_is_no_link_not_an_error(
    pool: asyncpg.Pool, redis: Any, namespace: str, bakong: SimulatedBakong
) -> None:
    """A QR made while Redis is away (the shared limit lives there) still comes back."""
    checker = await process(pool, redis, namespace, bakong, rate=50)
    unreachable = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    assert checker.limits is not None
    checker.limits = RateLimit(
        unreachable, bucket_key="b", pause_prefix="p", rate=checker.limits.rate
    )
    assert await checker.deeplink(None, a_qr(), SOURCE) is None
    assert bakong.state.calls["generate_deeplink_by_qr"] == 0
    await unreachable.aclose()
    await checker.bakong.close()
