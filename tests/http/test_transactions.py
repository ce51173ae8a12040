"""End to end: POST an md5, the simulated Bakong reports it, the webhook reaches a real socket."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from khqr_gateway.deliveries.model import Lane
from khqr_gateway.http.json import iso
from khqr_gateway.infra.keys import keys
from tests.conftest import Gateway, GatewayFactory, Receiver, SimulatedBakong, random_md5


async def create(gw: Gateway, receiver: Receiver, **extra: Any) -> dict[str, Any]:
    status, body = await gw.post(
        "/api/v1/transactions",
        {"md5": extra.pop("md5", random_md5()), "webhookUrl": receiver.url, **extra},
    )
    assert status == 201, body
    return body


async def test_paid_transaction_sends_success_webhook(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    created = await create(gateway, receiver, metadata={"orderId": "A-1"})
    assert created["status"] == "pending"
    bakong.pay(created["md5"], amount=10, currency="USD", toAccountId="shop@aclb")

    [hook] = await receiver.wait_for(1)
    body = hook.json()
    assert body["status"] == "success"
    assert body["md5"] == created["md5"]
    assert body["jobId"] == created["jobId"]
    assert body["data"]["amount"] == 10
    assert body["data"]["toAccountId"] == "shop@aclb"
    assert body["metadata"] == {"orderId": "A-1"}
    assert hook.headers["Content-Type"] == "application/json"
    assert hook.headers["webhook-id"].startswith("msg_")

    done = await gateway.wait_status(created["jobId"], "success")
    assert done["data"]["currency"] == "USD"
    assert done["delivery"]["id"] == hook.headers["webhook-id"]


async def test_failed_payment_sends_failed_webhook(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    created = await create(gateway, receiver)
    bakong.fail(created["md5"])
    [hook] = await receiver.wait_for(1)
    assert hook.json()["status"] == "failed"
    assert hook.json()["data"] is None
    # The list endpoint cannot say "failed": the per-md5 endpoint was asked for the truth.
    assert bakong.state.single_checks[created["md5"]] >= 1


async def test_unpaid_transaction_times_out_after_a_final_check(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    created = await create(gateway, receiver, timeoutSeconds=10)
    # Shorten the window rather than wait 10 s: the deadline logic is what is under test.
    await pg.execute(
        "update transactions set deadline_at = now() + interval '300 milliseconds' where id = $1",
        created["jobId"],
    )
    [hook] = await receiver.wait_for(1)
    body = hook.json()
    assert body["status"] == "timeout"
    assert body["reason"] == "not_paid"
    assert body["data"] is None
    assert bakong.state.single_checks[created["md5"]] == 1, "exactly one final check"


async def test_a_one_second_window_times_out_no_sooner(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    """The shortest window the API takes: the timeout comes after it, not before."""
    start = time.time()
    created = await create(gateway, receiver, timeoutSeconds=1)
    [hook] = await receiver.wait_for(1, timeout=5)
    assert hook.json()["status"] == "timeout"
    assert hook.json()["jobId"] == created["jobId"]
    assert hook.at >= start + 1


async def test_paid_at_the_final_check_is_success_not_timeout(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    created = await create(gateway, receiver, timeoutSeconds=10)
    await pg.execute(
        "update transactions set deadline_at = now() - interval '1 second' where id = $1",
        created["jobId"],
    )
    bakong.pay(created["md5"])
    [hook] = await receiver.wait_for(1)
    assert hook.json()["status"] == "success"


async def test_bakong_down_at_deadline_is_not_a_timeout_until_grace_ends(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    created = await create(gateway, receiver, timeoutSeconds=10)
    bakong.state.faults.status = 500
    await pg.execute("update transactions set deadline_at = now() where id = $1", created["jobId"])
    await asyncio.sleep(0.5)  # within the 1 s grace of these tests: still pending
    _, body = await gateway.get(f"/api/v1/transactions/{created['jobId']}")
    assert body["status"] == "pending"
    [hook] = await receiver.wait_for(1, timeout=5)
    assert hook.json()["status"] == "timeout"
    assert hook.json()["reason"] == "bakong_unreachable"


async def test_bakong_recovering_within_grace_finds_the_payment(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    created = await create(gateway, receiver, timeoutSeconds=10)
    bakong.state.faults.status = 503
    await pg.execute("update transactions set deadline_at = now() where id = $1", created["jobId"])
    await asyncio.sleep(0.3)
    bakong.pay(created["md5"])
    bakong.state.faults.status = None
    [hook] = await receiver.wait_for(1)
    assert hook.json()["status"] == "success"


async def test_same_md5_while_pending_returns_the_first(
    gateway: Gateway, receiver: Receiver
) -> None:
    md5 = random_md5()
    first = await create(gateway, receiver, md5=md5)
    status, again = await gateway.post(
        "/api/v1/transactions", {"md5": md5.upper(), "webhookUrl": receiver.url}
    )
    assert status == 200
    assert again["jobId"] == first["jobId"]
    _, page = await gateway.get(f"/api/v1/transactions?md5={md5}")
    assert len(page["data"]) == 1


async def test_same_md5_concurrently_creates_one_transaction(
    gateway: Gateway, receiver: Receiver
) -> None:
    md5 = random_md5()
    results = await asyncio.gather(
        *(
            gateway.post("/api/v1/transactions", {"md5": md5, "webhookUrl": receiver.url})
            for _ in range(10)
        )
    )
    assert sorted(s for s, _ in results) == [200] * 9 + [201]
    assert len({b["jobId"] for _, b in results}) == 1


async def test_a_paid_md5_posted_again_is_the_same_paid_transaction_and_no_second_notice(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    body = {"md5": random_md5(), "webhookUrl": receiver.url, "metadata": {"orderId": "A-7"}}
    status, first = await gateway.post("/api/v1/transactions", body)
    assert status == 201
    bakong.pay(first["md5"])
    await receiver.wait_for(1)
    await gateway.wait_status(first["jobId"], "success")

    status, again = await gateway.post("/api/v1/transactions", body)
    assert status == 200, again
    assert (again["jobId"], again["status"]) == (first["jobId"], "success")
    await asyncio.sleep(1)  # five poll intervals: time enough for a second notice
    assert len(receiver.received) == 1
    assert await pg.fetchval("select count(*) from deliveries") == 1
    assert await pg.fetchval("select count(*) from transactions") == 1


async def test_a_cancelled_md5_posted_again_stays_cancelled(
    gateway: Gateway, receiver: Receiver
) -> None:
    created = await create(gateway, receiver)
    resp = await gateway.client.delete(f"/api/v1/transactions/{created['jobId']}")
    assert resp.status == 200
    status, again = await gateway.post(
        "/api/v1/transactions", {"md5": created["md5"], "webhookUrl": receiver.url}
    )
    assert (status, again["jobId"], again["status"]) == (200, created["jobId"], "cancelled")


@pytest.mark.parametrize(
    "change",
    [
        {"webhookUrl": "http://127.0.0.1:9/other"},
        {"expected": {"amount": 2}},
        {"metadata": {"orderId": "B-2"}},
        {"metadata": None},
    ],
    ids=["webhookUrl", "expected", "metadata", "no-metadata"],
)
async def test_a_repeat_asking_for_something_else_is_409_naming_the_job(
    gateway: Gateway, receiver: Receiver, change: dict[str, Any]
) -> None:
    body = {
        "md5": random_md5(),
        "webhookUrl": receiver.url,
        "expected": {"amount": 1},
        "metadata": {"orderId": "A-1"},
    }
    status, first = await gateway.post("/api/v1/transactions", body)
    assert status == 201
    repeat = {k: v for k, v in {**body, **change}.items() if v is not None}
    status, refused = await gateway.post("/api/v1/transactions", repeat)
    assert status == 409, refused
    assert refused["error"]["code"] == "md5_already_tracked"
    assert refused["error"]["details"]["jobId"] == first["jobId"]
    assert refused["error"]["details"]["differs"] == [next(iter(change))]
    # The same body again is still the same transaction; the amount may be written otherwise.
    status, same = await gateway.post(
        "/api/v1/transactions", {**body, "expected": {"amount": "1.00"}}
    )
    assert (status, same["jobId"]) == (200, first["jobId"])


async def test_two_processes_posting_one_md5_at_once_make_one_transaction(
    make_gateway: GatewayFactory, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    one, two = await make_gateway(), await make_gateway()
    md5 = random_md5()
    body = {"md5": md5, "webhookUrl": receiver.url}
    results = await asyncio.gather(
        *(gw.post("/api/v1/transactions", body) for gw in [one, two] * 10)
    )
    assert sorted(s for s, _ in results) == [200] * 19 + [201]
    assert len({b["jobId"] for _, b in results}) == 1
    assert await pg.fetchval("select count(*) from transactions where md5 = $1", md5) == 1


async def test_idempotency_key_replays_the_first_response(
    gateway: Gateway, receiver: Receiver
) -> None:
    body = {"md5": random_md5(), "webhookUrl": receiver.url}
    first = await gateway.client.post(
        "/api/v1/transactions", json=body, headers={"Idempotency-Key": "order-42"}
    )
    second = await gateway.client.post(
        "/api/v1/transactions", json=body, headers={"Idempotency-Key": "order-42"}
    )
    assert first.status == second.status == 201
    assert await first.read() == await second.read()
    assert second.headers["Idempotent-Replayed"] == "true"

    other = await gateway.client.post(
        "/api/v1/transactions",
        json={"md5": random_md5(), "webhookUrl": receiver.url},
        headers={"Idempotency-Key": "order-42"},
    )
    assert other.status == 422
    assert (await other.json())["error"]["code"] == "idempotency_key_reused"


async def test_cancel_stops_tracking_and_sends_no_webhook(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    created = await create(gateway, receiver)
    resp = await gateway.client.delete(f"/api/v1/transactions/{created['jobId']}")
    assert resp.status == 200
    assert (await resp.json())["status"] == "cancelled"
    bakong.pay(created["md5"])
    await asyncio.sleep(0.6)
    assert receiver.received == []
    again = await gateway.client.delete(f"/api/v1/transactions/{created['jobId']}")
    assert again.status == 409
    missing = await gateway.client.delete(
        "/api/v1/transactions/7b0e3f0e-0000-4000-8000-000000000000"
    )
    assert missing.status == 404


async def test_unknown_or_malformed_job_id_is_404(gateway: Gateway) -> None:
    for job_id in ("7b0e3f0e-0000-4000-8000-000000000000", "not-a-uuid"):
        status, body = await gateway.get(f"/api/v1/transactions/{job_id}")
        assert status == 404
        assert body["error"]["code"] == "not_found"


async def test_list_filters_and_paginates(gateway: Gateway, receiver: Receiver) -> None:
    made = [await create(gateway, receiver) for _ in range(5)]
    await gateway.client.delete(f"/api/v1/transactions/{made[0]['jobId']}")
    seen: list[str] = []
    cursor = None
    while True:
        query = "limit=2" + (f"&cursor={cursor}" if cursor else "")
        status, page = await gateway.get(f"/api/v1/transactions?{query}")
        assert status == 200
        seen += [t["jobId"] for t in page["data"]]
        cursor = page["nextCursor"]
        if not page["hasMore"]:
            break
    assert seen == [m["jobId"] for m in reversed(made)]
    _, cancelled = await gateway.get("/api/v1/transactions?status=cancelled")
    assert [t["jobId"] for t in cancelled["data"]] == [made[0]["jobId"]]


async def test_restart_loses_nothing(
    make_gateway: GatewayFactory, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    first = await make_gateway()
    made = [await create(first, receiver) for _ in range(20)]
    await first.stop()
    for item in made:
        bakong.pay(item["md5"])
    second = await make_gateway()
    hooks = await receiver.wait_for(20)
    assert sorted(h.json()["jobId"] for h in hooks) == sorted(m["jobId"] for m in made)
    assert all(h.json()["status"] == "success" for h in hooks)
    await second.stop()


async def test_lost_redis_schedule_is_rebuilt_from_postgres(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver, redis: Any
) -> None:
    created = await create(gateway, receiver)
    await redis.delete(gateway.service.polls.key)
    bakong.pay(created["md5"])
    await gateway.service.reconcile()
    [hook] = await receiver.wait_for(1)
    assert hook.json()["jobId"] == created["jobId"]


async def test_lost_delivery_lanes_are_rebuilt_from_postgres(
    make_gateway: GatewayFactory,
    bakong: SimulatedBakong,
    receiver: Receiver,
    redis: Any,
    namespace: str,
) -> None:
    # The first attempt fails and the retry waits a minute: pending in the retry lane.
    gateway = await make_gateway(webhook_retry_schedule=(60.0,))
    receiver.statuses = [500]
    created = await create(gateway, receiver)
    bakong.pay(created["md5"])
    await receiver.wait_for(1)
    lanes = gateway.service.lanes
    waiting = {Lane.FIRST: 0, Lane.RETRY: 1}
    deadline = time.monotonic() + 10
    while await lanes.sizes() != waiting:
        assert time.monotonic() < deadline, await lanes.sizes()
        await asyncio.sleep(0.05)
    await redis.delete(*(keys(namespace)[lane] for lane in Lane))
    assert await lanes.sizes() == {Lane.FIRST: 0, Lane.RETRY: 0}
    await gateway.service.reconcile()
    assert await lanes.sizes() == waiting


async def _search(gw: Gateway, q: str, extra: str = "") -> set[str]:
    from urllib.parse import quote

    status, body = await gw.get(f"/api/v1/transactions?q={quote(q)}{extra}")
    assert status == 200, (q, body)
    return {t["jobId"] for t in body["data"]}


async def test_q_finds_a_job_id_an_md5_prefix_a_bill_number_and_metadata_values(
    gateway: Gateway, receiver: Receiver
) -> None:
    from khqr_gateway.bakong import khqr

    qr = khqr.build(
        account_id="shop@devb",
        merchant_name="Shop",
        amount="1.50",
        currency="USD",
        bill_number="INV-2026-77",
        expires_at_ms=int(time.time() * 1000) + 600_000,
    )
    billed = await create(gateway, receiver, qr=qr, md5=khqr.md5_of(qr))
    order = await create(
        gateway, receiver, metadata={"orderId": "ORD-123", "customer": {"phone": "012345678"}}
    )
    counted = await create(gateway, receiver, metadata={"table": 12, "note": "ហាងកាហ្វេ"})
    other = await create(gateway, receiver, metadata={"orderId": "ORD-124"})

    assert await _search(gateway, order["jobId"]) == {order["jobId"]}
    assert await _search(gateway, order["md5"][:8]) == {order["jobId"]}
    assert await _search(gateway, order["md5"].upper()) == {order["jobId"]}
    assert await _search(gateway, "inv-2026-77") == {billed["jobId"]}, "bill number, any case"
    assert await _search(gateway, "ORD-123") == {order["jobId"]}
    assert await _search(gateway, "012345678") == {order["jobId"]}, "a nested value"
    assert await _search(gateway, "12") == {counted["jobId"]}, "a number"
    assert await _search(gateway, "ហាងកាហ្វេ") == {counted["jobId"]}
    # Misses: a part of a value, a key, a value nobody has, another status.
    assert await _search(gateway, "ORD-12") == set()
    assert await _search(gateway, "orderId") == set()
    assert await _search(gateway, "nothing-here") == set()
    assert await _search(gateway, "ORD-124", "&status=success") == set()
    assert await _search(gateway, "ORD-124", "&status=pending") == {other["jobId"]}


async def test_q_pages_with_a_cursor_and_refuses_what_it_cannot_search(
    gateway: Gateway, receiver: Receiver
) -> None:
    made = [await create(gateway, receiver, metadata={"shop": "S-1"}) for _ in range(3)]
    status, page = await gateway.get("/api/v1/transactions?q=S-1&limit=2")
    assert status == 200 and len(page["data"]) == 2 and page["hasMore"]
    _, rest = await gateway.get(f"/api/v1/transactions?q=S-1&limit=2&cursor={page['nextCursor']}")
    seen = {t["jobId"] for t in page["data"] + rest["data"]}
    assert seen == {m["jobId"] for m in made}
    for bad in ("", "x" * 201):
        status, body = await gateway.get(f"/api/v1/transactions?q={bad}")
        assert status == 422, body
        assert body["error"]["details"][0]["field"] == "q"


async def test_q_is_an_index_lookup_at_scale(gateway: Gateway, pg: asyncpg.Connection) -> None:
    """The plan of a metadata search over 10,000 rows reads the GIN index, not the table (the
    planner already picks it at 5,000; each row inserted costs about 0.1 ms)."""
    from khqr_gateway.transactions import store

    await pg.execute(
        """
        insert into transactions (id, md5, webhook_url, deadline_at, metadata)
        select gen_random_uuid(), md5(n::text), 'http://x/hook', now(),
               json_build_object('orderId', 'order-' || n)
        from generate_series(1, 10000) n
        """
    )
    await pg.execute("analyze transactions")
    condition, value = store.search_filter("order-777")
    plan = await pg.fetchval(
        "explain (format json) select t.id from transactions t where "
        + condition.replace("{}", "$1")
        + " order by t.created_at desc, t.id desc limit 21",
        value,
    )
    text = str(plan)
    assert "transactions_search" in text, text
    assert "Seq Scan" not in text, text


async def test_the_list_filters_by_creation_time(
    gateway: Gateway, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    old = await create(gateway, receiver)
    new = await create(gateway, receiver)
    await pg.execute(
        "update transactions set created_at = now() - interval '2 days' where id = $1",
        old["jobId"],
    )
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 86400))
    status, body = await gateway.get(f"/api/v1/transactions?since={since}")
    assert status == 200, body
    assert [t["jobId"] for t in body["data"]] == [new["jobId"]]
    _, before = await gateway.get(f"/api/v1/transactions?until={since}")
    assert [t["jobId"] for t in before["data"]] == [old["jobId"]]
    status, bad = await gateway.get(f"/api/v1/transactions?since={since}&until={since}")
    assert status == 422 and bad["error"]["details"][0]["field"] == "until"


@given(
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from(
            [UTC, timezone(timedelta(hours=7)), timezone(-timedelta(hours=5))]
        ),
    )
)
def test_times_are_written_as_javascript_writes_them(value: datetime) -> None:
    """`iso` (fast, through orjson) writes what toISOString would: UTC, milliseconds, Z."""
    utc = value.astimezone(UTC)
    expected = utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert iso(value) == expected
