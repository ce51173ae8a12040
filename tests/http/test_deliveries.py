"""The deliveries API: list with filters and cursor pages, one delivery with its attempts."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import asyncpg
import orjson
import pytest

from tests.conftest import Gateway, GatewayFactory, Receiver, SimulatedBakong, random_md5

T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)


async def stored(
    pg: asyncpg.Connection, status: str, created_at: datetime, delivery_id: str | None = None
) -> tuple[str, str]:
    """A finished transaction and its delivery, as the poll tick stores them."""
    job_id = uuid.uuid4()
    delivery_id = delivery_id or f"msg_{uuid.uuid4().hex[:26]}"
    await pg.execute(
        """
        insert into transactions (id, md5, status, webhook_url, created_at, deadline_at)
        values ($1, $2, 'success', 'https://shop.example/hook', $3, $3)
        """,
        job_id,
        random_md5(),
        created_at,
    )
    await pg.execute(
        """
        insert into deliveries (id, transaction_id, url, payload, status, created_at)
        values ($1, $2, 'https://shop.example/hook', $3, $4, $5)
        """,
        delivery_id,
        job_id,
        orjson.dumps({"status": "success", "jobId": str(job_id)}),
        status,
        created_at,
    )
    return delivery_id, str(job_id)


@pytest.fixture
async def idle(make_gateway: GatewayFactory) -> Gateway:
    """A gateway that sends nothing: its deliveries stay as the test stored them."""
    return await make_gateway(run_ticks=False)


async def test_list_is_newest_first_in_cursor_pages(idle: Gateway, pg: asyncpg.Connection) -> None:
    ids = [(await stored(pg, "failed", T0 + timedelta(minutes=i)))[0] for i in range(5)]
    seen: list[str] = []
    path = "/api/v1/deliveries?limit=2"
    pages = 0
    while path:
        status, page = await idle.get(path)
        assert status == 200, page
        seen += [d["id"] for d in page["data"]]
        pages += 1
        assert page["hasMore"] is (page["nextCursor"] is not None)
        path = f"/api/v1/deliveries?limit=2&cursor={page['nextCursor']}" if page["hasMore"] else ""
    assert seen == ids[::-1]
    assert pages == 3


async def test_list_filters_by_status_transaction_and_time(
    idle: Gateway, pg: asyncpg.Connection
) -> None:
    old_failed, _ = await stored(pg, "failed", T0)
    new_failed, _ = await stored(pg, "failed", T0 + timedelta(hours=2))
    delivered, delivered_job = await stored(pg, "delivered", T0 + timedelta(hours=3))

    async def ids(query: str) -> list[str]:
        status, page = await idle.get(f"/api/v1/deliveries?{query}")
        assert status == 200, page
        return [d["id"] for d in page["data"]]

    assert await ids("status=failed") == [new_failed, old_failed]
    assert await ids("status=delivered") == [delivered]
    assert await ids(f"jobId={delivered_job}") == [delivered]
    assert await ids(f"transactionId={delivered_job}") == [delivered]
    since = quote((T0 + timedelta(hours=1)).isoformat())
    assert await ids(f"since={since}") == [delivered, new_failed]
    assert await ids(f"status=failed&since={since}") == [new_failed]
    assert await ids(f"jobId={uuid.uuid4()}") == []


async def test_list_item_shape(idle: Gateway, pg: asyncpg.Connection) -> None:
    delivery_id, job_id = await stored(pg, "failed", T0)
    _, page = await idle.get("/api/v1/deliveries")
    [item] = page["data"]
    assert item["id"] == delivery_id and item["jobId"] == job_id
    assert item["status"] == "failed" and item["attemptCount"] == 0
    assert item["url"] == "https://shop.example/hook"
    assert item["createdAt"] == "2025-03-01T08:00:00.000Z"
    assert "attempts" not in item and "payload" not in item


@pytest.mark.parametrize(
    "query",
    ["status=lost", "limit=0", "limit=101", "cursor=nonsense", "since=yesterday", "jobId=1", "x=1"],
)
async def test_list_rejects_bad_queries(idle: Gateway, query: str) -> None:
    status, body = await idle.get(f"/api/v1/deliveries?{query}")
    assert status == 422, body
    assert body["error"]["code"] == "validation_error"


async def test_unknown_delivery_is_404(idle: Gateway) -> None:
    status, body = await idle.get("/api/v1/deliveries/msg_unknown")
    assert status == 404 and body["error"]["code"] == "not_found"


async def test_deliveries_need_the_api_key(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(api_keys=("k" * 24,), run_ticks=False)
    for method, path in (
        ("GET", "/api/v1/deliveries"),
        ("GET", "/api/v1/deliveries/msg_x"),
        ("POST", "/api/v1/deliveries/msg_x/retry"),
        ("POST", "/api/v1/deliveries/retry"),
    ):
        resp = await gw.client.request(method, path)
        assert resp.status == 401, (method, path)
    status, _ = await gw.get("/api/v1/deliveries")
    assert status == 200


async def test_attempt_timeline_of_a_recovering_delivery(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    """500, 500, 200: three attempts, growing gaps, each with its answer, then delivered."""
    receiver.statuses = [500, 500, 200]
    status, created = await gateway.post(
        "/api/v1/transactions",
        {"md5": random_md5(), "webhookUrl": receiver.url, "metadata": {"orderId": "A-1"}},
    )
    assert status == 201
    bakong.pay(created["md5"])
    hooks = await receiver.wait_for(3)
    delivery = await _delivered(gateway, created["jobId"])

    assert delivery["id"] == hooks[0].headers["webhook-id"]
    assert delivery["status"] == "delivered" and delivery["attemptCount"] == 3
    assert delivery["lastStatusCode"] == 200 and delivery["nextAttemptAt"] is None
    assert delivery["payload"] == hooks[0].json()
    assert delivery["payload"]["metadata"] == {"orderId": "A-1"}
    attempts = delivery["attempts"]
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert [a["statusCode"] for a in attempts] == [500, 500, 200]
    assert all(a["errorKind"] is None and a["responseBody"] == "ok" for a in attempts)
    assert all(isinstance(a["durationMs"], int) and a["durationMs"] >= 0 for a in attempts)
    started = [datetime.fromisoformat(a["startedAt"]) for a in attempts]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(started)]
    assert gaps[0] >= 0.15 and gaps[1] > gaps[0] * 0.9, gaps  # schedule 0.2 s, 0.4 s (+-20%)
    assert datetime.fromisoformat(delivery["deliveredAt"]) >= started[2]


async def _delivered(gw: Gateway, job_id: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        _, page = await gw.get(f"/api/v1/deliveries?jobId={job_id}")
        if page["data"] and page["data"][0]["status"] == "delivered":
            _, body = await gw.get(f"/api/v1/deliveries/{page['data'][0]['id']}")
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"never delivered: {body}")
