"""Who a request acts for: the default app's keys, keys made for an app, admin keys and the
`Khqr-App` header, with each app's data its own and its requests counted per app."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from khqr_gateway.apps import store as apps
from khqr_gateway.apps.model import DEFAULT_APP_ID
from tests.conftest import Gateway, GatewayFactory, Receiver, random_md5, secret

DEFAULT_KEY = "default-key-" + "d" * 20
ADMIN_KEY = "admin-key-" + "a" * 20


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def made_app(gw: Gateway, name: str, **fields: Any) -> tuple[str, str]:
    """An app made in the gateway's database: its id and its key (a secret)."""
    app, key, webhook_secret = await apps.create(gw.service.pool, name, **fields)
    secret(webhook_secret)
    return app.id, secret(key.key)


async def call(
    gw: Gateway, method: str, path: str, key: str | None, body: Any = None, **headers: str
) -> tuple[int, Any]:
    sent = {**(bearer(key) if key else {}), **headers}
    resp = await gw.client.request(method, path, json=body, headers=sent)
    text = await resp.text()
    return resp.status, (await resp.json()) if text else None


@pytest.fixture
async def gw(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway(api_keys=(DEFAULT_KEY,), admin_api_keys=(ADMIN_KEY,))


async def test_a_made_key_acts_for_its_app_and_no_other_sees_its_transaction(
    gw: Gateway, receiver: Receiver
) -> None:
    _, shop = await made_app(gw, "Shop")
    md5 = random_md5()
    status, created = await call(
        gw, "POST", "/api/v1/transactions", shop, {"md5": md5, "webhookUrl": receiver.url}
    )
    assert status == 201
    path = f"/api/v1/transactions/{created['jobId']}"
    assert (await call(gw, "GET", path, shop))[0] == 200
    status, body = await call(gw, "GET", path, DEFAULT_KEY)
    assert status == 404 and body["error"]["code"] == "not_found"
    assert (await call(gw, "DELETE", path, DEFAULT_KEY))[0] == 404
    _, listed = await call(gw, "GET", "/api/v1/transactions", DEFAULT_KEY)
    assert md5 not in {row["md5"] for row in listed["data"]}
    _, mine = await call(gw, "GET", "/api/v1/transactions", shop)
    assert [row["md5"] for row in mine["data"]] == [md5]


async def test_one_md5_in_two_apps_is_two_payments(gw: Gateway, receiver: Receiver) -> None:
    _, shop = await made_app(gw, "Shop")
    body = {"md5": random_md5(), "webhookUrl": receiver.url}
    mine_status, mine = await call(gw, "POST", "/api/v1/transactions", shop, body)
    theirs_status, theirs = await call(gw, "POST", "/api/v1/transactions", DEFAULT_KEY, body)
    again_status, again = await call(gw, "POST", "/api/v1/transactions", shop, body)
    assert (mine_status, theirs_status, again_status) == (201, 201, 200)
    assert mine["jobId"] != theirs["jobId"] and again["jobId"] == mine["jobId"]


async def test_an_idempotency_key_is_the_apps_own(gw: Gateway, receiver: Receiver) -> None:
    _, shop = await made_app(gw, "Shop")
    key = {"Idempotency-Key": "order-42"}
    first = {"md5": random_md5(), "webhookUrl": receiver.url}
    other = {"md5": random_md5(), "webhookUrl": receiver.url}
    status, mine = await call(gw, "POST", "/api/v1/transactions", shop, first, **key)
    assert status == 201
    # Another app's same key with another body is its own request, not a reuse.
    status, theirs = await call(gw, "POST", "/api/v1/transactions", DEFAULT_KEY, other, **key)
    assert status == 201 and theirs["md5"] == other["md5"]
    status, replay = await call(gw, "POST", "/api/v1/transactions", shop, first, **key)
    assert status == 201 and replay == mine
    status, reused = await call(gw, "POST", "/api/v1/transactions", shop, other, **key)
    assert status == 422 and reused["error"]["code"] == "idempotency_key_reused"


@pytest.mark.parametrize(
    "key",
    ["kgw_" + "n" * 43, "wrong-key-" + "w" * 20, None],
    ids=["unknown made key", "unknown key", "no key"],
)
async def test_a_key_that_is_not_ours_is_refused(gw: Gateway, key: str | None) -> None:
    status, body = await call(gw, "GET", "/api/v1/transactions", key)
    assert status == 401 and body["error"]["code"] == "unauthorized"


async def test_with_no_api_key_the_default_app_is_open_but_a_bad_made_key_is_not(
    make_gateway: GatewayFactory, receiver: Receiver
) -> None:
    gw = await make_gateway(api_keys=())
    _, shop = await made_app(gw, "Shop")
    body = {"md5": random_md5(), "webhookUrl": receiver.url}
    status, opened = await call(gw, "POST", "/api/v1/transactions", None, body)
    assert status == 201
    # Any other text is no key at all on an open gateway (as in rachhen/khqr-webhook).
    assert (await call(gw, "GET", "/api/v1/transactions", "whatever-" + "x" * 20))[0] == 200
    # A made key acts for its own app: the default app's transaction is not its.
    assert (await call(gw, "GET", f"/api/v1/transactions/{opened['jobId']}", shop))[0] == 404
    # A made key that is not valid never falls back to the open default app.
    status, refused = await call(gw, "POST", "/api/v1/transactions", "kgw_" + "r" * 43, body)
    assert status == 401 and refused["error"]["code"] == "unauthorized"


async def test_an_admin_key_acts_for_the_app_its_header_names(
    gw: Gateway, receiver: Receiver
) -> None:
    shop_id, shop = await made_app(gw, "Shop")
    body = {"md5": random_md5(), "webhookUrl": receiver.url}
    status, created = await call(
        gw, "POST", "/api/v1/transactions", ADMIN_KEY, body, **{"Khqr-App": shop_id}
    )
    assert status == 201
    path = f"/api/v1/transactions/{created['jobId']}"
    assert (await call(gw, "GET", path, shop))[0] == 200
    # Without the header an admin key acts for the default app.
    assert (await call(gw, "GET", path, ADMIN_KEY))[0] == 404
    status, _ = await call(gw, "GET", path, ADMIN_KEY, **{"Khqr-App": DEFAULT_APP_ID})
    assert status == 404
    status, missing = await call(gw, "GET", path, ADMIN_KEY, **{"Khqr-App": "app_nope"})
    assert status == 404 and missing["error"]["code"] == "app_not_found"
    # The header means nothing to any other key.
    assert (await call(gw, "GET", path, DEFAULT_KEY, **{"Khqr-App": shop_id}))[0] == 404


async def test_only_an_admin_key_may_call_the_app_routes(
    gw: Gateway, make_gateway: GatewayFactory
) -> None:
    _, shop = await made_app(gw, "Shop")
    for key in (shop, DEFAULT_KEY):
        status, body = await call(gw, "GET", "/api/v1/apps", key)
        assert status == 403 and "ADMIN_API_KEY" in body["error"]["message"]
    assert (await call(gw, "GET", "/api/v1/apps", None))[0] == 401
    closed = await make_gateway(api_keys=())
    status, body = await call(closed, "GET", "/api/v1/apps", None)
    assert status == 403 and "set ADMIN_API_KEY" in body["error"]["message"]


async def test_a_revoked_key_and_a_disabled_apps_key_stop_in_every_process_within_5_s(
    gw: Gateway, make_gateway: GatewayFactory
) -> None:
    other = await make_gateway(api_keys=(DEFAULT_KEY,), admin_api_keys=(ADMIN_KEY,))
    shop_id, shop = await made_app(gw, "Shop")
    bar_id, bar = await made_app(gw, "Bar")
    for process in (gw, other):  # both have the keys cached now
        for key in (shop, bar):
            assert (await call(process, "GET", "/api/v1/transactions", key))[0] == 200
    (listed,) = await apps.list_keys(gw.service.pool, shop_id)
    assert await apps.revoke_key(gw.service.pool, shop_id, listed.id)
    assert await apps.disable(gw.service.pool, bar_id) is not None
    deadline = time.monotonic() + 5.0
    refused: set[tuple[int, str]] = set()
    while time.monotonic() < deadline and len(refused) < 4:
        for n, process in enumerate((gw, other)):
            for key in (shop, bar):
                if (await call(process, "GET", "/api/v1/transactions", key))[0] == 401:
                    refused.add((n, key))
        await asyncio.sleep(0.1)
    assert len(refused) == 4, "every process refuses both keys within 5 s"


async def test_requests_are_counted_per_app_with_retry_after(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(api_keys=(DEFAULT_KEY, "second-key-" + "s" * 20), api_rate_limit=5)
    _, shop = await made_app(gw, "Shop")
    first, second = DEFAULT_KEY, "second-key-" + "s" * 20

    async def statuses(key: str, n: int) -> list[int]:
        return [(await call(gw, "GET", "/api/v1/transactions", key))[0] for _ in range(n)]

    seen = await statuses(first, 4) + await statuses(second, 4)
    if seen.count(429) < 3:  # the second ticked over mid-way: try once more
        await asyncio.sleep(0.05)
        seen = await statuses(first, 4) + await statuses(second, 4)
    # The default app's two keys share its limit.
    assert seen.count(429) >= 3
    limited = await gw.client.get("/api/v1/transactions", headers=bearer(second))
    if limited.status == 429:
        assert limited.headers["Retry-After"] == "1"
        assert (await limited.json())["error"]["code"] == "rate_limited"
    # Another app is not held back by the default app's requests.
    assert (await call(gw, "GET", "/api/v1/transactions", shop))[0] == 200
    await asyncio.sleep(1.1)
    assert (await call(gw, "GET", "/api/v1/transactions", first))[0] == 200


async def test_an_apps_own_rate_limit_holds_for_it(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(api_keys=(DEFAULT_KEY,), api_rate_limit=1000)
    _, shop = await made_app(gw, "Shop", rate_limit=2)
    seen = [(await call(gw, "GET", "/api/v1/transactions", shop))[0] for _ in range(6)]
    assert 429 in seen
    assert (await call(gw, "GET", "/api/v1/transactions", DEFAULT_KEY))[0] == 200


async def test_stats_count_each_apps_own_transactions(gw: Gateway, receiver: Receiver) -> None:
    _, shop = await made_app(gw, "Shop")
    for key, n in ((shop, 2), (DEFAULT_KEY, 1)):
        for _ in range(n):
            body = {"md5": random_md5(), "webhookUrl": receiver.url}
            assert (await call(gw, "POST", "/api/v1/transactions", key, body))[0] == 201
    await gw.service.refresh_figures()
    _, mine = await call(gw, "GET", "/api/v1/stats", shop)
    _, theirs = await call(gw, "GET", "/api/v1/stats", DEFAULT_KEY)
    assert sum(mine["transactions"].values()) == 2
    assert sum(theirs["transactions"].values()) == 1
    if mine["transactions"].get("pending"):
        assert mine["oldestPendingSeconds"] is not None


async def test_another_apps_payment_shows_on_no_route_of_mine(
    gw: Gateway, receiver: Receiver, bakong: Any
) -> None:
    """Every read and write of one app, tried with another's key: 404 for its ids, absent
    from every list, report and export; and the same the other way round."""
    _, shop = await made_app(gw, "Shop")
    jobs: dict[str, dict[str, Any]] = {}
    for key in (shop, DEFAULT_KEY):
        body = {"md5": random_md5(), "webhookUrl": receiver.url}
        status, created = await call(gw, "POST", "/api/v1/transactions", key, body)
        assert status == 201
        bakong.pay(created["md5"])
        jobs[key] = created
    await receiver.wait_for(2)
    deliveries: dict[str, str] = {}
    for key, created in jobs.items():
        deadline = time.monotonic() + 10
        while key not in deliveries and time.monotonic() < deadline:
            _, page = await call(gw, "GET", f"/api/v1/deliveries?jobId={created['jobId']}", key)
            if page["data"] and page["data"][0]["status"] == "delivered":
                deliveries[key] = page["data"][0]["id"]
            await asyncio.sleep(0.05)
    assert set(deliveries) == {shop, DEFAULT_KEY}

    for mine, other in ((shop, DEFAULT_KEY), (DEFAULT_KEY, shop)):
        job, md5, delivery = jobs[other]["jobId"], jobs[other]["md5"], deliveries[other]
        for method, path in (
            ("GET", f"/api/v1/transactions/{job}"),
            ("DELETE", f"/api/v1/transactions/{job}"),
            ("GET", f"/api/v1/transactions/{job}/events"),
            ("GET", f"/api/v1/transaction/{job}/track"),
            ("GET", f"/api/v1/deliveries/{delivery}"),
            ("POST", f"/api/v1/deliveries/{delivery}/retry"),
        ):
            status, _ = await call(gw, method, path, mine)
            assert status == 404, (method, path)
        for path in (
            "/api/v1/transactions",
            f"/api/v1/transactions?md5={md5}",
            f"/api/v1/transactions?q={job}",
            "/api/v1/deliveries",
            f"/api/v1/deliveries?jobId={job}",
        ):
            _, page = await call(gw, "GET", path, mine)
            assert all(job not in str(row) for row in page["data"]), path
        resp = await gw.client.get("/api/v1/transactions/export?format=csv", headers=bearer(mine))
        exported = await resp.text()
        assert resp.status == 200 and md5 not in exported and jobs[mine]["md5"] in exported
        _, hourly = await call(gw, "GET", "/api/v1/reports/hourly", mine)
        assert sum(hour["paid"] for hour in hourly["data"]) == 1
        # Retrying all my delivered deliveries touches none of the other app's.
        status, retried = await call(
            gw, "POST", "/api/v1/deliveries/retry", mine, {"status": "delivered"}
        )
        assert status == 202 and delivery not in retried["ids"]


async def test_credentials_are_listed_to_the_app_that_added_them(gw: Gateway) -> None:
    _, shop = await made_app(gw, "Shop")
    status, added = await call(
        gw, "POST", "/api/v1/credentials", shop, {"email": "shop@example.com"}
    )
    assert status in (200, 201)
    _, mine = await call(gw, "GET", "/api/v1/credentials", shop)
    _, theirs = await call(gw, "GET", "/api/v1/credentials", DEFAULT_KEY)
    assert [c["id"] for c in mine["data"]] == [added["id"]]
    assert added["id"] not in [c["id"] for c in theirs["data"]]


async def test_an_apps_qr_pays_its_own_merchant(gw: Gateway) -> None:
    from khqr_gateway.apps.model import Merchant
    from khqr_gateway.bakong.khqr import parse

    _, shop = await made_app(gw, "Shop", merchant=Merchant("shop@aclb", "Noodle Bar", "Kampot"))
    status, made = await call(
        gw, "POST", "/api/v1/khqr", shop, {"amount": 10000, "currency": "KHR"}
    )
    assert status == 200
    parsed = parse(made["qr"])
    assert (parsed.account_id, parsed.merchant_name, parsed.merchant_city) == (
        "shop@aclb",
        "Noodle Bar",
        "Kampot",
    )
    # The default app has no profile here (no KHQR_* set): the field is named.
    status, refused = await call(
        gw, "POST", "/api/v1/khqr", DEFAULT_KEY, {"amount": 10000, "currency": "KHR"}
    )
    assert status == 422 and refused["error"]["details"][0]["field"] == "accountId"


async def test_an_app_without_a_merchant_never_gets_the_operators(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(
        api_keys=(DEFAULT_KEY,), khqr_account_id="operator@aclb", khqr_merchant_name="Operator"
    )
    _, shop = await made_app(gw, "Shop")
    body = {"amount": 10000, "currency": "KHR"}
    status, refused = await call(gw, "POST", "/api/v1/khqr", shop, body)
    assert status == 422 and refused["error"]["details"][0]["field"] == "accountId"
    assert "operator@aclb" not in str(refused)
    status, made = await call(gw, "POST", "/api/v1/khqr", DEFAULT_KEY, body)
    assert status == 200 and "operator@aclb" in made["qr"]


async def test_one_token_in_two_apps_is_two_credentials(gw: Gateway) -> None:
    _, shop = await made_app(gw, "Shop")
    _, bar = await made_app(gw, "Bar")
    email = {"email": "shared@example.com"}
    status, mine = await call(gw, "POST", "/api/v1/credentials", shop, email)
    assert status == 201
    status, theirs = await call(gw, "POST", "/api/v1/credentials", bar, email)
    assert status == 201 and theirs["id"] != mine["id"]
    _, listed = await call(gw, "GET", "/api/v1/credentials", shop)
    assert [c["id"] for c in listed["data"]] == [mine["id"]]


async def test_the_open_default_app_is_not_counted(make_gateway: GatewayFactory) -> None:
    """With no API_KEY nothing tells callers apart: as before apps, no 429 for them."""
    gw = await make_gateway(api_keys=(), api_rate_limit=2)
    seen = [(await call(gw, "GET", "/api/v1/transactions", None))[0] for _ in range(8)]
    assert seen == [200] * 8


async def test_a_stream_opened_with_a_key_ends_once_the_key_is_revoked(
    gw: Gateway, receiver: Receiver
) -> None:
    shop_id, shop = await made_app(gw, "Shop")
    body = {"md5": random_md5(), "webhookUrl": receiver.url}
    _, created = await call(gw, "POST", "/api/v1/transactions", shop, body)
    resp = await gw.client.get(
        f"/api/v1/transactions/{created['jobId']}/events", headers=bearer(shop)
    )
    assert resp.status == 200
    assert b"pending" in await resp.content.readline() + await resp.content.readline()
    (key,) = await apps.list_keys(gw.service.pool, shop_id)
    await apps.revoke_key(gw.service.pool, shop_id, key.id)
    # The transaction is still pending: only the revocation can end the stream.
    async with asyncio.timeout(6):
        while await resp.content.readline():
            pass
    assert (await call(gw, "GET", f"/api/v1/transactions/{created['jobId']}", shop))[0] == 401


async def test_a_key_revoked_in_one_process_is_refused_by_the_other_at_once(
    gw: Gateway, make_gateway: GatewayFactory
) -> None:
    """The revoking process tells the others over Redis: the other refuses the key although
    its cache would keep it for an hour."""
    other = await make_gateway(api_keys=(DEFAULT_KEY,), admin_api_keys=(ADMIN_KEY,))
    other.service.keys._keys.ttl_s = 3600.0
    shop_id, shop = await made_app(gw, "Shop")
    assert (await call(other, "GET", "/api/v1/transactions", shop))[0] == 200
    (key,) = await apps.list_keys(gw.service.pool, shop_id)
    path = f"/api/v1/apps/{shop_id}/keys/{key.id}"
    assert (await call(gw, "DELETE", path, ADMIN_KEY))[0] == 204
    deadline = time.monotonic() + 3
    while (await call(other, "GET", "/api/v1/transactions", shop))[0] != 401:
        assert time.monotonic() < deadline, "the other process still takes the revoked key"
        await asyncio.sleep(0.05)


async def test_a_flood_of_made_up_keys_is_429_before_it_costs_queries(gw: Gateway) -> None:
    _, shop = await made_app(gw, "Shop")
    assert (await call(gw, "GET", "/api/v1/transactions", shop))[0] == 200
    # 45 within at most two seconds: one of them sees more than 20.
    made_up = [f"kgw_{n:043d}" for n in range(45)]
    seen = [(await call(gw, "GET", "/api/v1/transactions", key))[0] for key in made_up]
    assert 401 in seen and 429 in seen
    # A key in use from the same address (a shop behind the same proxy) still works: only
    # keys this process does not know are held back.
    assert (await call(gw, "GET", "/api/v1/transactions", shop))[0] == 200
