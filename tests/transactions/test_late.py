"""Late payments: a QR paid after the gateway gave up on it (timeout, cancel) is reported."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from khqr_gateway.bakong import khqr
from khqr_gateway.infra.keys import keys
from khqr_gateway.metrics import REGISTRY
from tests.conftest import Gateway, GatewayFactory, Receiver, SimulatedBakong, random_md5

# Late checks every 0.2 s, watched 2 s past the deadline (or the cancel).
LATE = {"late_check_interval_s": 0.2, "late_watch_s": 2, "late_margin_s": 1}


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway(**LATE)


def late_metric() -> float:
    labels = {"status": "success", "previous": "timeout"}
    return REGISTRY.get_sample_value("khqr_late_payments_total", labels) or 0.0


async def timed_out(gw: Gateway, receiver: Receiver, **extra: Any) -> dict[str, Any]:
    status, created = await gw.post(
        "/api/v1/transactions",
        {"md5": random_md5(), "webhookUrl": receiver.url, "timeoutSeconds": 1, **extra},
    )
    assert status == 201, created
    await gw.wait_status(created["jobId"], "timeout")
    return created


async def test_a_payment_after_a_timeout_is_a_second_webhook_saying_late(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    created = await timed_out(gateway, receiver, metadata={"orderId": "A-9"})
    [first] = await receiver.wait_for(1)
    assert first.json()["status"] == "timeout"
    _, body = await gateway.get(f"/api/v1/transactions/{created['jobId']}")
    assert body["late"] is False and body["lateWatchUntil"] is not None

    counted = late_metric()
    bakong.pay(created["md5"], amount=3)
    _, second = await receiver.wait_for(2)
    late = second.json()
    assert (late["status"], late["late"], late["previousStatus"]) == ("success", True, "timeout")
    assert late["data"]["amount"] == 3 and late["metadata"] == {"orderId": "A-9"}
    assert second.headers["webhook-id"] != first.headers["webhook-id"]

    done = await gateway.wait_status(created["jobId"], "success")
    assert (done["late"], done["previousStatus"]) == (True, "timeout")
    assert done["delivery"]["id"] == second.headers["webhook-id"]
    await asyncio.sleep(1)  # five late intervals: nothing more is sent
    assert len(receiver.received) == 2
    deadline = time.monotonic() + 10
    while (stats := (await gateway.get("/api/v1/stats"))[1]).get("latePayments") != {"success": 1}:
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.2)
    assert late_metric() == counted + 1


async def test_a_payment_after_a_cancel_is_reported_once(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    status, created = await gateway.post(
        "/api/v1/transactions", {"md5": random_md5(), "webhookUrl": receiver.url}
    )
    assert status == 201
    resp = await gateway.client.delete(
        f"/api/v1/transactions/{created['jobId']}", headers=gateway.headers
    )
    assert resp.status == 200
    bakong.pay(created["md5"])
    [hook] = await receiver.wait_for(1)
    body = hook.json()
    assert (body["status"], body["late"], body["previousStatus"]) == (
        "success",
        True,
        "cancelled",
    )
    await asyncio.sleep(1)
    assert len(receiver.received) == 1


async def test_a_late_payment_that_differs_is_a_late_mismatch(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    created = await timed_out(gateway, receiver, expected={"amount": 5, "currency": "USD"})
    bakong.pay(created["md5"], amount=4, currency="USD")
    _, second = await receiver.wait_for(2)
    late = second.json()
    assert (late["status"], late["late"], late["previousStatus"]) == ("mismatch", True, "timeout")
    assert "amount" in late["reason"]


async def test_the_watch_ends_and_no_check_follows_it(
    make_gateway: GatewayFactory,
    bakong: SimulatedBakong,
    receiver: Receiver,
    pg: asyncpg.Connection,
) -> None:
    # Watched 4 s: a slow machine may take 3 s to show the timeout, and checks must follow it.
    gateway = await make_gateway(**{**LATE, "late_watch_s": 4})
    created = await timed_out(gateway, receiver)
    at_timeout = bakong.state.checks[created["md5"]]
    until = await pg.fetchval(
        "select late_watch_until from transactions where id = $1", created["jobId"]
    )
    deadline = await pg.fetchval(
        "select deadline_at from transactions where id = $1", created["jobId"]
    )
    assert (until - deadline).total_seconds() == 4
    while time.time() < until.timestamp() + 0.5:
        await asyncio.sleep(0.1)
    checks = bakong.state.checks[created["md5"]]
    assert checks > at_timeout, "checked while watched"
    bakong.pay(created["md5"])
    await asyncio.sleep(1.5)
    assert bakong.state.checks[created["md5"]] == checks
    assert len(receiver.received) == 1  # the timeout only
    assert await gateway.service.late.schedule.size() == 0


async def test_late_checks_are_batched_in_list_calls(
    make_gateway: GatewayFactory, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    # Watched long enough for 120 final checks (one call each, 50 a second) to be made.
    gateway = await make_gateway(**{**LATE, "late_watch_s": 30})
    created = await asyncio.gather(*(timed_out(gateway, receiver) for _ in range(120)))
    await receiver.wait_for(120)
    # The final checks booked turns in the rate limit: late checks wait for those to pass.
    await asyncio.sleep(2.5)
    md5s = [c["md5"] for c in created]
    singles = sum(bakong.state.single_checks[m] for m in md5s)
    checks = sum(bakong.state.checks[m] for m in md5s)
    calls = bakong.state.calls["check_transaction_by_md5_list"]
    await asyncio.sleep(1)
    late_checks = sum(bakong.state.checks[m] for m in md5s) - checks
    late_calls = bakong.state.calls["check_transaction_by_md5_list"] - calls
    assert late_checks >= 240, "every md5 checked at least twice in 1 s"
    assert sum(bakong.state.single_checks[m] for m in md5s) == singles, "no per-md5 call"
    # Batched: 20 md5s a call at the least (a round of 120 is 3 calls when the ticks line up,
    # 4 or 5 on a loaded machine; one call each would be 120).
    assert late_calls <= late_checks / 20, (late_calls, late_checks)


async def test_redis_losing_the_late_watches_is_mended_by_reconcile(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver, redis: Any, namespace: str
) -> None:
    created = await timed_out(gateway, receiver)
    await receiver.wait_for(1)
    await redis.delete(keys(namespace)["late"])
    await gateway.service.reconcile()
    assert await gateway.service.late.schedule.size() == 1
    bakong.pay(created["md5"])
    _, second = await receiver.wait_for(2)
    assert second.json()["late"] is True


async def test_two_processes_report_each_late_payment_once(
    make_gateway: GatewayFactory, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    one, two = await make_gateway(**LATE), await make_gateway(**LATE)
    created = await asyncio.gather(*(timed_out(gw, receiver) for gw in [one, two] * 10))
    await receiver.wait_for(20)
    for c in created:
        bakong.pay(c["md5"])
    await receiver.wait_for(40)
    await asyncio.sleep(1)
    late = [r for r in receiver.received if r.json().get("late")]
    assert len(late) == 20
    assert len({r.json()["jobId"] for r in late}) == 20


async def test_the_tracking_window_never_outlives_the_qr(
    gateway: Gateway, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    expires_ms = int(time.time() * 1000) + 60_000
    qr = khqr.build(
        account_id="shop@devb",
        merchant_name="Shop",
        amount="1.50",
        currency="USD",
        expires_at_ms=expires_ms,
    )
    status, created = await gateway.post(
        "/api/v1/transactions", {"qr": qr, "webhookUrl": receiver.url, "timeoutSeconds": 600}
    )
    assert status == 201, created
    row = await pg.fetchrow(
        "select deadline_at, qr_expires_at from transactions where id = $1", created["jobId"]
    )
    assert row["deadline_at"].timestamp() * 1000 == pytest.approx(expires_ms, abs=1)
    assert row["qr_expires_at"] == row["deadline_at"]


async def test_a_late_payment_stops_the_timeout_webhook_still_being_retried(
    make_gateway: GatewayFactory,
    bakong: SimulatedBakong,
    aiohttp_server: Any,
    pg: asyncpg.Connection,
) -> None:
    """A `timeout` retried after the late `success` arrived would read as the last word."""
    got: list[str] = []

    async def refuses_timeouts(request: web.Request) -> web.Response:
        status = (await request.json())["status"]
        got.append(status)
        return web.Response(status=500 if status == "timeout" else 200)

    app = web.Application()
    app.router.add_post("/hook", refuses_timeouts)
    server = await aiohttp_server(app)
    gw = await make_gateway(**LATE, webhook_retry_schedule=(0.5,) * 8)
    status, created = await gw.post(
        "/api/v1/transactions",
        {"md5": random_md5(), "webhookUrl": str(server.make_url("/hook")), "timeoutSeconds": 1},
    )
    assert status == 201
    await gw.wait_status(created["jobId"], "timeout")
    bakong.pay(created["md5"])
    await gw.wait_status(created["jobId"], "success")
    deadline = time.monotonic() + 5
    while "success" not in got:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.5)  # three retry intervals of the timeout webhook
    assert got[got.index("success") :].count("timeout") <= 1  # at most one already in flight
    rows = await pg.fetch(
        "select d.status, d.last_error, t.status as tx from deliveries d"
        " join transactions t on t.id = d.transaction_id order by d.created_at"
    )
    assert [(r["status"], r["last_error"]) for r in rows] == [
        ("failed", "superseded_by_late_payment"),
        ("delivered", None),
    ]
