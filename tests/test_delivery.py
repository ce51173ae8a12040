"""Webhook delivery against a real receiver: retries, give-up, attempts stored, fairness."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import asyncpg
from aiohttp import web

from tests.conftest import Gateway, GatewayFactory, Receiver, SimulatedBakong, random_md5


async def paid(gw: Gateway, bakong: SimulatedBakong, url: str) -> dict[str, Any]:
    status, created = await gw.post(
        "/api/v1/transactions", {"md5": random_md5(), "webhookUrl": url}
    )
    assert status == 201, created
    bakong.pay(created["md5"])
    return created


async def attempts(pg: asyncpg.Connection, job_id: str) -> list[asyncpg.Record]:
    return await pg.fetch(
        """
        select a.* from delivery_attempts a join deliveries d on d.id = a.delivery_id
        where d.transaction_id = $1 order by a.attempt
        """,
        job_id,
    )


async def test_500_500_200_makes_three_attempts_with_one_webhook_id(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    receiver.statuses = [500, 500, 200]
    created = await paid(gateway, bakong, receiver.url)
    hooks = await receiver.wait_for(3)
    assert len({h.headers["webhook-id"] for h in hooks}) == 1
    assert len({h.body for h in hooks}) == 1, "every retry sends the same bytes"
    gaps = [b.at - a.at for a, b in itertools.pairwise(hooks)]
    assert gaps[0] >= 0.15 and gaps[1] > gaps[0] * 0.9, gaps  # schedule 0.2 s, 0.4 s (+-20%)
    done = await gateway.wait_status(created["jobId"], "success")
    await asyncio.sleep(0.2)
    rows = await attempts(pg, created["jobId"])
    assert [r["status_code"] for r in rows] == [500, 500, 200]
    assert [r["attempt"] for r in rows] == [1, 2, 3]
    _, body = await gateway.get(f"/api/v1/transactions/{created['jobId']}")
    assert body["delivery"]["status"] == "delivered"
    assert body["delivery"]["attempts"] == 3
    assert done["jobId"] == created["jobId"]


async def test_gives_up_after_the_schedule_and_keeps_the_delivery(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    receiver.statuses = [503] * 10
    created = await paid(gateway, bakong, receiver.url)
    await receiver.wait_for(4)  # 1 + 3 retries of the test schedule
    await asyncio.sleep(1.0)
    assert len(receiver.received) == 4
    status = await pg.fetchval(
        "select status from deliveries where transaction_id = $1", created["jobId"]
    )
    assert status == "failed"


async def test_410_stops_at_once(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    receiver.statuses = [410]
    created = await paid(gateway, bakong, receiver.url)
    await receiver.wait_for(1)
    await asyncio.sleep(0.6)
    assert len(receiver.received) == 1
    assert (
        await pg.fetchval(
            "select status from deliveries where transaction_id = $1", created["jobId"]
        )
        == "failed"
    )


async def test_redirect_is_not_followed(
    gateway: Gateway,
    bakong: SimulatedBakong,
    receiver: Receiver,
    aiohttp_server: Any,
    pg: asyncpg.Connection,
) -> None:
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(receiver.url)

    app = web.Application()
    app.router.add_post("/hook", redirect)
    server = await aiohttp_server(app)
    created = await paid(gateway, bakong, str(server.make_url("/hook")))
    await asyncio.sleep(1.5)
    assert receiver.received == [], "the redirect target never got the webhook"
    rows = await attempts(pg, created["jobId"])
    assert rows and all(r["status_code"] == 302 for r in rows)


async def test_timeout_is_recorded_as_an_attempt(
    make_gateway: GatewayFactory,
    bakong: SimulatedBakong,
    receiver: Receiver,
    pg: asyncpg.Connection,
) -> None:
    gw = await make_gateway(webhook_timeout_s=0.3)
    receiver.delay_s = 1.0
    created = await paid(gw, bakong, receiver.url)
    await receiver.wait_for(1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not await attempts(pg, created["jobId"]):
        await asyncio.sleep(0.1)
    rows = await attempts(pg, created["jobId"])
    assert rows[0]["error_kind"] == "timeout"
    assert rows[0]["status_code"] is None


async def test_refused_connection_is_recorded_and_retried(
    gateway: Gateway, bakong: SimulatedBakong, pg: asyncpg.Connection, unused_tcp_port: int
) -> None:
    created = await paid(gateway, bakong, f"http://127.0.0.1:{unused_tcp_port}/hook")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(await attempts(pg, created["jobId"])) < 2:
        await asyncio.sleep(0.1)
    rows = await attempts(pg, created["jobId"])
    assert len(rows) >= 2
    assert rows[0]["error_kind"] == "connect"


async def test_large_response_body_is_cut_to_4kb(
    gateway: Gateway, bakong: SimulatedBakong, aiohttp_server: Any, pg: asyncpg.Connection
) -> None:
    async def chatty(request: web.Request) -> web.Response:
        return web.Response(text="x" * 100_000)

    app = web.Application()
    app.router.add_post("/hook", chatty)
    server = await aiohttp_server(app)
    created = await paid(gateway, bakong, str(server.make_url("/hook")))
    await gateway.wait_status(created["jobId"], "success")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not await attempts(pg, created["jobId"]):
        await asyncio.sleep(0.1)
    [row] = await attempts(pg, created["jobId"])
    assert row["status_code"] == 200
    assert len(row["response_body"]) == 4096


async def test_a_hanging_receiver_does_not_delay_a_healthy_one(
    make_gateway: GatewayFactory, bakong: SimulatedBakong, receiver: Receiver, aiohttp_server: Any
) -> None:
    gw = await make_gateway(webhook_timeout_s=3.0)

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(3.5)
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", hang)
    slow = await aiohttp_server(app)
    for _ in range(40):
        await paid(gw, bakong, str(slow.make_url("/hook")))
    await asyncio.sleep(0.5)
    start = time.time()
    await paid(gw, bakong, receiver.url)
    [hook] = await receiver.wait_for(1, timeout=2.5)
    assert hook.at - start < 1.5
