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
from khqr_gateway.bakong.client import BakongClient, SourceInfo
from khqr_gateway.bakong.model import CheckKind, ErrorKind
from khqr_gateway.bakong.sandbox import Faults, make_token, parse_faults
from khqr_gateway.credentials.renewal import Credentials
from khqr_gateway.infra import db
from khqr_gateway.infra.keys import keys
from khqr_gateway.infra.ratelimit import RateLimit
from khqr_gateway.metrics import REGISTRY
from khqr_gateway.transactions.budget import Cadence, Demand, cadence
from khqr_gateway.transactions.checker import BREAKER_THRESHOLD, Checker
from khqr_gateway.transactions.model import PollItem
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
            throttled += sum(r.error is ErrorKind.THROTTLED for r in results.values())
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
    put_off = sorted(
        (r.retry_after or 0.0) for r in results.values() if r.error is ErrorKind.THROTTLED
    )
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


def waiting(count: int) -> list[PollItem]:
    """Items before their deadline (a late watch checks those past it the same way)."""
    ahead = datetime.now(UTC) + timedelta(minutes=5)
    return [PollItem(uuid4(), random_md5(), ahead, None, None) for _ in range(count)]


async def test_late_checks_take_only_what_the_live_checks_leave(
    pool: asyncpg.Pool, redis: Any, namespace: str, bakong: SimulatedBakong
) -> None:
    checker = await process(pool, redis, namespace, bakong, rate=10)
    bakong.state.faults = Faults(list_status=403)  # one call per md5, late checks too
    live = await checker.check(final_checks(6), datetime.now(UTC))
    assert all(r.kind is CheckKind.NOT_FOUND for r in live.values())
    calls = bakong.state.calls["check_transaction_by_md5"]
    late = await checker.check(waiting(4), datetime.now(UTC), late=True)
    assert bakong.state.calls["check_transaction_by_md5"] == calls, "the bucket's last 4 stay"
    assert {r.error for r in late.values()} == {ErrorKind.THROTTLED}
    await checker.bakong.close()


def test_the_budget_checks_young_md5s_every_interval_and_older_ones_with_what_is_left() -> None:
    """The issue's figures: 50 calls a second, a 3 s interval, md5s of every age to 300 s."""
    idle = cadence(Demand(young=2, old=10), rate=50, interval_s=3)
    assert idle == Cadence(3, 3), "room for all: nothing changes"
    at_150 = cadence(Demand(young=15, old=135, finals_per_s=0.5), rate=50, interval_s=3)
    assert at_150.young_s == 3 and at_150.old_s == pytest.approx(3.21, abs=0.01)
    at_1000 = cadence(Demand(young=100, old=900, finals_per_s=3.3), rate=50, interval_s=3)
    assert at_1000.old_s == 45, "older md5s first give up their share, to 45 s"
    assert 3 < at_1000.young_s <= 6, "then the young, to twice the interval at most"
    crowd = cadence(Demand(young=400, old=3600, finals_per_s=13), rate=50, interval_s=3)
    assert crowd.young_s / 6 == pytest.approx(crowd.old_s / 45) and crowd.old_s > 45, (
        "beyond that all stretch alike: none starves"
    )


def aged(count: int, age: timedelta) -> list[PollItem]:
    now = datetime.now(UTC)
    ahead, created = now + timedelta(minutes=30), now - age
    return [
        PollItem(uuid4(), random_md5(), ahead, None, None, created_at=created) for _ in range(count)
    ]


async def test_older_md5s_leave_the_last_of_the_bucket_to_young_ones(
    pool: asyncpg.Pool, redis: Any, namespace: str, bakong: SimulatedBakong
) -> None:
    """However many older md5s come due at once (the first round after the list endpoint is
    refused, a restart), they leave room for md5s whose customers are paying now."""
    checker = await process(pool, redis, namespace, bakong, rate=10)
    bakong.state.faults = Faults(list_status=403)
    await checker.check(waiting(1), datetime.now(UTC))  # from now on, one call per md5
    await asyncio.sleep(1.0)  # the bucket holds 10 again
    old = await checker.check(aged(10, timedelta(minutes=10)), datetime.now(UTC))
    assert sum(r.error is ErrorKind.THROTTLED for r in old.values()) == 2, (
        "8 of 10: a fifth is kept"
    )
    young = await checker.check(aged(2, timedelta(seconds=5)), datetime.now(UTC))
    assert all(r.kind is CheckKind.NOT_FOUND for r in young.values()), "for young ones"
    await checker.bakong.close()
