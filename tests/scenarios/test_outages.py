"""Dependency outages against real Postgres and Redis reached through a proxy a test can cut:
the service stays up, says so, answers 503 (never a hang or a 500), and loses nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from khqr_gateway import service
from khqr_gateway.bakong.sandbox import make_token
from khqr_gateway.config import Settings
from khqr_gateway.http.app import create_app
from tests.conftest import REDIS_URL, Receiver, SimulatedBakong, random_md5
from tests.proxy import Proxy


@pytest.fixture
async def proxies(database_url: str) -> AsyncIterator[tuple[Proxy, Proxy]]:
    pg = urlsplit(database_url)
    rd = urlsplit(REDIS_URL)
    pg_proxy = Proxy(pg.hostname or "127.0.0.1", pg.port or 5432)
    redis_proxy = Proxy(rd.hostname or "127.0.0.1", rd.port or 6379)
    await pg_proxy.start()
    await redis_proxy.start()
    yield pg_proxy, redis_proxy
    await pg_proxy.cut()
    await redis_proxy.cut()


@pytest.fixture
def reconcile_every_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reconcile tick every second instead of every 10 s, for a gateway made after it: a
    test waiting on it still waits on it, for less long."""
    monkeypatch.setattr(service, "RECONCILE_INTERVAL_S", 1.0)


@pytest.fixture
async def proxied(
    settings: Settings, database_url: str, pg: asyncpg.Connection, proxies: tuple[Proxy, Proxy]
) -> AsyncIterator[TestClient]:
    pg_proxy, redis_proxy = proxies
    db = urlsplit(database_url)
    app = create_app(
        replace(settings, webhook_retry_schedule=(0.5, 1, 1, 1, 1, 1, 1, 1)),
        database_url=f"postgresql://{db.username}@127.0.0.1:{pg_proxy.port}{db.path}",
        redis_url=f"redis://127.0.0.1:{redis_proxy.port}/0",
    )
    client = TestClient(TestServer(app))
    await client.start_server()
    yield client
    await client.close()


async def create(client: TestClient, url: str, md5: str | None = None) -> tuple[int, Any, float]:
    start = time.monotonic()
    body = {"md5": md5 or random_md5(), "webhookUrl": url}
    resp = await client.post("/api/v1/transactions", json=body)
    return resp.status, await resp.json(), time.monotonic() - start


async def wait_ready(client: TestClient, want: int, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        resp = await client.get("/ready")
        body: dict[str, Any] = await resp.json()
        if resp.status == want or time.monotonic() > deadline:
            assert resp.status == want, body
            return body
        await asyncio.sleep(0.2)


# The POST refused while Redis was down is scheduled by the reconcile tick once it is back.
@pytest.mark.usefixtures("reconcile_every_second")
async def test_redis_down_for_10_s(
    proxied: TestClient, proxies: tuple[Proxy, Proxy], bakong: SimulatedBakong, receiver: Receiver
) -> None:
    _, redis_proxy = proxies
    status, before, _ = await create(proxied, receiver.url)
    assert status == 201
    await redis_proxy.cut()
    down_at = time.monotonic()
    body = await wait_ready(proxied, 503)
    assert body["checks"]["redis"] != "ok"
    assert (await proxied.get("/health")).status == 200
    refused_md5 = random_md5()
    status, error, took = await create(proxied, receiver.url, refused_md5)
    assert status == 503, error
    assert error["error"]["code"] == "redis_unavailable"
    assert took < 6, "a clear answer, not a hang"
    bakong.pay(before["md5"])
    await asyncio.sleep(max(0.0, 10 - (time.monotonic() - down_at)))
    await redis_proxy.restore()
    await wait_ready(proxied, 200, timeout=15)
    [hook] = await receiver.wait_for(1, timeout=20)
    assert hook.json()["jobId"] == before["jobId"]
    # The POST that got 503 lost nothing: its retry finds one transaction, and it is tracked.
    status, again, _ = await create(proxied, receiver.url, refused_md5)
    assert status in (200, 201)
    bakong.pay(refused_md5)
    hooks = await receiver.wait_for(2, timeout=15)
    assert hooks[1].json()["jobId"] == again["jobId"]


@pytest.mark.usefixtures("reconcile_every_second")
async def test_redis_loses_everything_and_the_reconcile_tick_rebuilds_it(
    proxied: TestClient, bakong: SimulatedBakong, receiver: Receiver, namespace: str
) -> None:
    made = []
    for _ in range(20):
        status, body, _ = await create(proxied, receiver.url)
        assert status == 201
        made.append(body)
    for item in made[:10]:
        bakong.pay(item["md5"])
    await receiver.wait_for(10)
    redis = Redis.from_url(REDIS_URL)
    stale = [k async for k in redis.scan_iter(match="{" + namespace + "}*")]
    await redis.delete(*stale)  # a Redis restart without persistence, for this namespace
    await redis.aclose()
    for item in made[10:]:
        bakong.pay(item["md5"])
    started = time.monotonic()
    hooks = await receiver.wait_for(20, timeout=20)
    print(f"rebuilt and delivered in {time.monotonic() - started:.1f} s")
    assert sorted(h.json()["jobId"] for h in hooks) == sorted(m["jobId"] for m in made)


async def test_postgres_restart_loses_and_doubles_nothing(
    proxied: TestClient,
    proxies: tuple[Proxy, Proxy],
    bakong: SimulatedBakong,
    receiver: Receiver,
    pg: asyncpg.Connection,
) -> None:
    pg_proxy, _ = proxies
    made = []
    for _ in range(10):
        status, body, _ = await create(proxied, receiver.url)
        assert status == 201
        made.append(body)
    await pg_proxy.cut()
    for item in made:
        bakong.pay(item["md5"])
    await wait_ready(proxied, 503)
    status, error, took = await create(proxied, receiver.url)
    assert status == 503, error
    assert error["error"]["code"] == "postgres_unavailable"
    assert took < 6
    await asyncio.sleep(3)
    await pg_proxy.restore()
    await wait_ready(proxied, 200, timeout=15)
    hooks = await receiver.wait_for(10, timeout=20)
    await asyncio.sleep(1)
    ids = [h.json()["jobId"] for h in receiver.received]
    assert sorted(set(ids)) == sorted(m["jobId"] for m in made)
    per_job = await pg.fetch(
        "select transaction_id, count(*) as n from deliveries group by transaction_id"
    )
    assert all(r["n"] == 1 for r in per_job) and len(per_job) == 10
    assert len({h.headers["webhook-id"] for h in hooks}) == 10


async def test_the_compat_routes_answer_an_outage_in_their_own_shape(
    proxied: TestClient, proxies: tuple[Proxy, Proxy], receiver: Receiver
) -> None:
    """A client of the rachhen/khqr-webhook routes reads `name` and `message`: Postgres
    down is a 503 in that shape there, and in the v1 shape on the v1 routes."""
    pg_proxy, _ = proxies
    await pg_proxy.cut()
    body = {"md5": random_md5(), "webhookUrl": receiver.url, "token": make_token()}
    resp = await proxied.post("/api/v1/transaction/token", json=body)
    answer = await resp.json()
    assert resp.status == 503 and resp.headers["Retry-After"] == "5"
    assert answer["name"] == "SERVICE_UNAVAILABLE"
    assert answer["message"] == answer["error"]["message"]
    assert answer["error"]["code"] == "postgres_unavailable"
    status, v1, _ = await create(proxied, receiver.url)
    assert status == 503 and "name" not in v1 and v1["error"]["code"] == "postgres_unavailable"
