"""The app routes: an admin key makes, reads, changes and disables apps, makes and revokes
their keys and webhook secrets; a key or a secret is shown once; every caller reads its own
app at /api/v1/app."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from standardwebhooks import Webhook

from khqr_gateway.apps import store as apps
from khqr_gateway.apps.model import DEFAULT_APP_ID
from khqr_gateway.bakong.khqr import parse
from khqr_gateway.bakong.sandbox import make_token
from khqr_gateway.config import AppEnv
from tests.conftest import (
    Gateway,
    GatewayFactory,
    Receiver,
    SimulatedBakong,
    assert_no_secret,
    random_md5,
    secret,
)

DEFAULT_KEY = "default-key-" + "d" * 20
ADMIN_KEY = "admin-key-" + "a" * 20
BOT_TOKEN = "123456789:" + "B" * 35
MERCHANT = {"accountId": "shop@aclb", "merchantName": "Coffee Shop", "merchantCity": "Siem Reap"}


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def call(
    gw: Gateway, method: str, path: str, key: str | None = ADMIN_KEY, body: Any = None
) -> tuple[int, Any]:
    """A request; its answer holds no secret registered so far."""
    kwargs: dict[str, Any] = {} if body is None else {"json": body}
    resp = await gw.client.request(method, path, headers=bearer(key), **kwargs)
    text = await resp.text()
    assert_no_secret(text)
    return resp.status, (await resp.json()) if text else None


async def make(gw: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    """An app made through the API; its key and webhook secret registered as secrets from
    here on (so that no later answer or log line may show them)."""
    resp = await gw.client.post("/api/v1/apps", json=body, headers=bearer(ADMIN_KEY))
    assert_no_secret(await resp.text())  # none of those registered before (a bot token)
    made = await resp.json()
    assert resp.status == 201, made
    assert resp.headers["Cache-Control"] == "no-store"
    secret(made["apiKey"]["key"])
    secret(made["webhookSecret"])
    return made


def field_errors(body: Any) -> dict[str, str]:
    assert body["error"]["code"] == "validation_error", body
    return {d["field"]: d["message"] for d in body["error"]["details"]}


@pytest.fixture
async def gw(make_gateway: GatewayFactory) -> Gateway:
    secret(BOT_TOKEN)
    return await make_gateway(api_keys=(DEFAULT_KEY,), admin_api_keys=(ADMIN_KEY,))


async def test_an_app_is_made_with_its_settings_a_key_and_a_secret_shown_once(
    gw: Gateway, receiver: Receiver
) -> None:
    made = await make(
        gw,
        {
            "name": "  Coffee Shop ",
            "webhookUrl": "https://shop.example/hook",
            "merchant": MERCHANT,
            "telegram": {"botToken": BOT_TOKEN, "chatId": -1001234567890},
            "rateLimit": 50,
        },
    )
    assert made["id"].startswith("app_") and made["name"] == "Coffee Shop"
    assert made["apiKey"]["id"].startswith("key_")
    assert made["apiKey"]["key"].startswith("kgw_") and made["webhookSecret"].startswith("whsec_")
    shown = {k: v for k, v in made.items() if k not in ("apiKey", "webhookSecret")}
    assert shown["merchant"] == MERCHANT and shown["telegram"] == {
        "chatId": "-1001234567890",
        "language": "en",
    }
    assert (shown["status"], shown["isDefault"], shown["rateLimit"]) == ("active", False, 50)
    assert shown["credentialId"] is None and shown["disabledAt"] is None
    # Never again: not in a read, not in the list (call() checks every answer for them).
    status, read = await call(gw, "GET", f"/api/v1/apps/{made['id']}")
    assert status == 200 and read == shown
    status, listed = await call(gw, "GET", "/api/v1/apps")
    assert status == 200 and shown in listed["data"]
    assert {a["id"] for a in listed["data"]} == {made["id"], DEFAULT_APP_ID}
    # The key works at once, for its app.
    body = {"md5": random_md5(), "webhookUrl": receiver.url}
    key = made["apiKey"]["key"]
    assert (await call(gw, "POST", "/api/v1/transactions", key, body))[0] == 201
    _, own = await call(gw, "GET", "/api/v1/transactions", key)
    assert [t["md5"] for t in own["data"]] == [body["md5"]]
    # Its bot token is kept for the notices, only there.
    stored = await apps.get(gw.service.pool, made["id"])
    assert stored is not None and stored.telegram_bot_token == BOT_TOKEN


async def test_the_list_pages_by_id(gw: Gateway) -> None:
    made = {(await make(gw, {"name": f"app {i}"}))["id"] for i in range(5)}
    seen: list[str] = []
    path = "/api/v1/apps?limit=2"
    while True:
        status, page = await call(gw, "GET", path)
        assert status == 200 and len(page["data"]) <= 2
        seen += [a["id"] for a in page["data"]]
        if not page["hasMore"]:
            break
        path = f"/api/v1/apps?limit=2&cursor={page['nextCursor']}"
    assert seen == sorted(made | {DEFAULT_APP_ID})
    status, body = await call(gw, "GET", "/api/v1/apps?cursor=no%20such")
    assert status == 422 and "cursor" in field_errors(body)


ROUTES = [
    ("POST", "/api/v1/apps"),
    ("GET", "/api/v1/apps"),
    ("GET", "/api/v1/apps/{app}"),
    ("PATCH", "/api/v1/apps/{app}"),
    ("DELETE", "/api/v1/apps/{app}"),
    ("POST", "/api/v1/apps/{app}/keys"),
    ("GET", "/api/v1/apps/{app}/keys"),
    ("DELETE", "/api/v1/apps/{app}/keys/{key}"),
    ("POST", "/api/v1/apps/{app}/webhook-secret"),
]


async def test_only_an_admin_key_reaches_any_app_route(gw: Gateway) -> None:
    made = await make(gw, {"name": "Shop"})
    for method, template in ROUTES:
        path = template.format(app=made["id"], key=made["apiKey"]["id"])
        body = {"name": "Other"} if method in ("POST", "PATCH") else None
        for key in (made["apiKey"]["key"], DEFAULT_KEY):
            status, refused = await call(gw, method, path, key, body)
            assert status == 403, (method, path, refused)
            assert "ADMIN_API_KEY" in refused["error"]["message"]
        assert (await call(gw, method, path, None, body))[0] == 401, (method, path)
    # Nothing was done: the app, its key and its name are as they were.
    status, read = await call(gw, "GET", f"/api/v1/apps/{made['id']}")
    assert status == 200 and (read["name"], read["status"]) == ("Shop", "active")
    _, keys = await call(gw, "GET", f"/api/v1/apps/{made['id']}/keys")
    assert [k["status"] for k in keys["data"]] == ["active"]


@pytest.mark.parametrize("app_id", ["app_nope", "x" * 101, "a%00b", "app%2Fx"])
async def test_an_unknown_app_is_404_on_every_route(gw: Gateway, app_id: str) -> None:
    for method, template in ROUTES[2:]:
        path = template.format(app=app_id, key="key_nope")
        body = {"rateLimit": 5} if method in ("POST", "PATCH") else None
        status, missing = await call(gw, method, path, ADMIN_KEY, body)
        assert status == 404 and missing["error"]["code"] == "not_found", (method, path)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "name"),
        ({"name": "   "}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "tab\there"}, "name"),
        ({"name": 7}, "name"),
        ({"name": "Shop", "webhookUrl": "ftp://shop.example/hook"}, "webhookUrl"),
        ({"name": "Shop", "webhookUrl": "https://shop example/hook"}, "webhookUrl"),
        ({"name": "Shop", "merchant": {**MERCHANT, "accountId": "no-bank"}}, "merchant.accountId"),
        (
            {"name": "Shop", "merchant": {**MERCHANT, "merchantName": "x" * 26}},
            "merchant.merchantName",
        ),
        # 13 emoji are 13 characters but 26 UTF-16 units: a QR cannot carry them.
        (
            {"name": "Shop", "merchant": {**MERCHANT, "merchantName": "🍵" * 13}},
            "merchant.merchantName",
        ),
        ({"name": "Shop", "merchant": {**MERCHANT, "merchantCity": ""}}, "merchant.merchantCity"),
        ({"name": "Shop", "merchant": {"accountId": "shop@aclb"}}, "merchant.merchantName"),
        ({"name": "Shop", "merchant": {**MERCHANT, "x": 1}}, "merchant.x"),
        ({"name": "Shop", "bakong": {}}, "bakong.token"),
        ({"name": "Shop", "bakong": {"token": "short"}}, "bakong.token"),
        ({"name": "Shop", "bakong": {"email": "not-an-email"}}, "bakong.email"),
        ({"name": "Shop", "telegram": {"botToken": "nope", "chatId": "42"}}, "telegram.botToken"),
        (
            {"name": "Shop", "telegram": {"botToken": "1:" + "a" * 30 + "/x", "chatId": "42"}},
            "telegram.botToken",
        ),
        ({"name": "Shop", "telegram": {"botToken": BOT_TOKEN, "chatId": "4 2"}}, "telegram.chatId"),
        ({"name": "Shop", "telegram": {"chatId": "42"}}, "telegram.botToken"),
        (
            {"name": "Shop", "telegram": {"botToken": BOT_TOKEN, "chatId": "42", "language": "fr"}},
            "telegram.language",
        ),
        ({"name": "Shop", "rateLimit": 0}, "rateLimit"),
        ({"name": "Shop", "rateLimit": 1_000_001}, "rateLimit"),
        ({"name": "Shop", "rateLimit": "5"}, "rateLimit"),
        ({"name": "Shop", "rateLimit": True}, "rateLimit"),
        ({"name": "Shop", "apiKey": "kgw_mine"}, "apiKey"),
    ],
)
async def test_each_bad_field_is_a_422_naming_it(
    gw: Gateway, body: dict[str, Any], field: str
) -> None:
    status, refused = await call(gw, "POST", "/api/v1/apps", body=body)
    assert status == 422 and field in field_errors(refused), refused
    _, listed = await call(gw, "GET", "/api/v1/apps")
    assert [a["id"] for a in listed["data"]] == [DEFAULT_APP_ID], "nothing was made"


async def test_bad_fields_of_a_patch_are_422_and_change_nothing(gw: Gateway) -> None:
    made = await make(gw, {"name": "Shop", "rateLimit": 5})
    path = f"/api/v1/apps/{made['id']}"
    status, refused = await call(gw, "PATCH", path, body={"name": None, "rateLimit": -1})
    assert status == 422 and set(field_errors(refused)) == {"name", "rateLimit"}
    _, read = await call(gw, "GET", path)
    assert (read["name"], read["rateLimit"]) == ("Shop", 5)


async def test_a_private_webhook_url_is_refused_in_production(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(
        app_env=AppEnv.PRODUCTION, allow_private_webhook_urls=False, admin_api_keys=(ADMIN_KEY,)
    )
    for url in ("http://127.0.0.1:9/hook", "http://169.254.169.254/latest"):
        status, refused = await call(
            gw, "POST", "/api/v1/apps", body={"name": "Shop", "webhookUrl": url}
        )
        assert status == 422 and "public address" in field_errors(refused)["webhookUrl"]
    made = await make(gw, {"name": "Shop"})
    status, refused = await call(
        gw, "PATCH", f"/api/v1/apps/{made['id']}", body={"webhookUrl": "http://10.0.0.1/h"}
    )
    assert status == 422 and "webhookUrl" in field_errors(refused)


async def test_two_creates_racing_for_one_name_leave_no_credential_behind(gw: Gateway) -> None:
    """The loser of the race is a 409, and the credential made for the app it never became
    is gone (else it would sit under no app, renewed for nobody)."""
    for n in range(5):
        tokens = [
            secret(make_token(f"race{n}-{i}@example.com", exp=int(time.time()) + 86_400))
            for i in range(2)
        ]
        answers = await asyncio.gather(
            *(
                gw.client.post(
                    "/api/v1/apps",
                    json={"name": f"Race {n}", "bakong": {"token": token}},
                    headers=bearer(ADMIN_KEY),
                )
                for token in tokens
            )
        )
        assert sorted(a.status for a in answers) == [201, 409]
        for answer in answers:
            body = await answer.json()
            if answer.status == 201:
                secret(body["apiKey"]["key"])
                secret(body["webhookSecret"])
    orphans = await gw.service.pool.fetchval(
        "select count(*) from credentials c where not exists (select 1 from apps a"
        " where a.id = c.app_id)"
    )
    assert orphans == 0


async def test_bakong_is_registered_as_a_credential_and_the_app_uses_it(
    gw: Gateway, bakong: SimulatedBakong
) -> None:
    token = secret(make_token("shop@example.com", exp=int(time.time()) + 86_400))
    made = await make(gw, {"name": "Shop", "bakong": {"token": token}})
    assert isinstance(made["credentialId"], int)
    # The app's own: listed to its key, not to the default app's.
    _, mine = await call(gw, "GET", "/api/v1/credentials", made["apiKey"]["key"])
    assert [c["id"] for c in mine["data"]] == [made["credentialId"]]
    _, theirs = await call(gw, "GET", "/api/v1/credentials", DEFAULT_KEY)
    assert made["credentialId"] not in {c["id"] for c in theirs["data"]}
    stored = await apps.get(gw.service.pool, made["id"])
    assert stored is not None and stored.credential_id == made["credentialId"]
    expired = secret(make_token(exp=int(time.time()) - 60))
    status, refused = await call(
        gw, "PATCH", f"/api/v1/apps/{made['id']}", body={"bakong": {"token": expired}}
    )
    assert status == 422 and "expired" in field_errors(refused)["bakong.token"]
    status, cleared = await call(gw, "PATCH", f"/api/v1/apps/{made['id']}", body={"bakong": None})
    assert status == 200 and cleared["credentialId"] is None


async def test_a_patch_sets_what_it_gives_and_null_clears(gw: Gateway) -> None:
    made = await make(
        gw,
        {
            "name": "Shop",
            "webhookUrl": "https://shop.example/hook",
            "merchant": MERCHANT,
            "telegram": {"botToken": BOT_TOKEN, "chatId": "@shopnews"},
            "rateLimit": 5,
        },
    )
    path = f"/api/v1/apps/{made['id']}"
    status, changed = await call(gw, "PATCH", path, body={"name": "Shop 2", "rateLimit": None})
    assert status == 200
    assert (changed["name"], changed["rateLimit"]) == ("Shop 2", None)
    assert changed["telegram"] == {"chatId": "@shopnews", "language": "en"}
    khmer = {"telegram": {"botToken": BOT_TOKEN, "chatId": "@shopnews", "language": "km"}}
    status, changed = await call(gw, "PATCH", path, body=khmer)
    assert status == 200 and changed["telegram"] == {"chatId": "@shopnews", "language": "km"}
    assert changed["merchant"] == MERCHANT and changed["webhookUrl"] == "https://shop.example/hook"
    assert changed["updatedAt"] > made["updatedAt"]
    status, cleared = await call(
        gw, "PATCH", path, body={"webhookUrl": None, "merchant": None, "telegram": None}
    )
    assert status == 200
    assert (cleared["webhookUrl"], cleared["merchant"], cleared["telegram"]) == (None, None, None)
    stored = await apps.get(gw.service.pool, made["id"])
    assert stored is not None and stored.telegram_bot_token is None
    status, same = await call(gw, "PATCH", path, body={})
    assert status == 200 and same == cleared
    assert (await call(gw, "GET", path))[1] == cleared


async def test_a_new_rate_limit_holds_at_once(gw: Gateway) -> None:
    made = await make(gw, {"name": "Shop"})
    key = made["apiKey"]["key"]
    assert (await call(gw, "GET", "/api/v1/transactions", key))[0] == 200  # cached now
    assert (await call(gw, "PATCH", f"/api/v1/apps/{made['id']}", body={"rateLimit": 1}))[0] == 200
    seen = [(await call(gw, "GET", "/api/v1/transactions", key))[0] for _ in range(6)]
    assert 429 in seen, seen


async def test_names_are_unique_among_enabled_apps(gw: Gateway) -> None:
    first = await make(gw, {"name": "Shop"})
    status, taken = await call(gw, "POST", "/api/v1/apps", body={"name": "SHOP"})
    assert status == 409 and taken["error"]["code"] == "name_taken"
    # The default app is named "default" too.
    assert (await call(gw, "POST", "/api/v1/apps", body={"name": "Default"}))[0] == 409
    other = await make(gw, {"name": "Bar"})
    status, taken = await call(gw, "PATCH", f"/api/v1/apps/{other['id']}", body={"name": "shop"})
    assert status == 409 and taken["error"]["code"] == "name_taken"
    assert (await call(gw, "DELETE", f"/api/v1/apps/{first['id']}"))[0] == 200
    again = await make(gw, {"name": "Shop"})
    assert again["id"] != first["id"]


async def test_the_default_app_is_the_environments(gw: Gateway) -> None:
    path = f"/api/v1/apps/{DEFAULT_APP_ID}"
    status, refused = await call(gw, "PATCH", path, body={"merchant": MERCHANT})
    assert status == 409 and refused["error"]["code"] == "default_app"
    assert "KHQR_ACCOUNT_ID" in refused["error"]["message"]
    status, refused = await call(gw, "PATCH", path, body={"rateLimit": 5})
    assert status == 409 and "API_RATE_LIMIT" in refused["error"]["message"]
    status, refused = await call(gw, "DELETE", path)
    assert status == 409 and "cannot be disabled" in refused["error"]["message"]
    status, refused = await call(gw, "POST", f"{path}/keys")
    assert status == 409 and "API_KEY" in refused["error"]["message"]
    status, refused = await call(gw, "POST", f"{path}/webhook-secret")
    assert status == 409 and "WEBHOOK_SECRET" in refused["error"]["message"]
    # Still there, still enabled, its key still working.
    status, read = await call(gw, "GET", path)
    assert status == 200 and (read["status"], read["isDefault"]) == ("active", True)
    assert (await call(gw, "GET", "/api/v1/transactions", DEFAULT_KEY))[0] == 200


async def test_a_disabled_apps_keys_stop_at_once_and_its_payments_are_still_reported(
    gw: Gateway, receiver: Receiver, bakong: SimulatedBakong
) -> None:
    made = await make(gw, {"name": "Shop"})
    key, path = made["apiKey"]["key"], f"/api/v1/apps/{made['id']}"
    md5 = random_md5()
    body = {"md5": md5, "webhookUrl": receiver.url}
    status, created = await call(gw, "POST", "/api/v1/transactions", key, body)
    assert status == 201
    status, disabled = await call(gw, "DELETE", path)
    assert status == 200 and disabled["status"] == "disabled" and disabled["disabledAt"]
    status, refused = await call(gw, "GET", "/api/v1/transactions", key)
    assert status == 401 and refused["error"]["code"] == "unauthorized"
    # Disabling again answers the app as it is.
    status, again = await call(gw, "DELETE", path)
    assert status == 200 and again["disabledAt"] == disabled["disabledAt"]
    for method, sub, sent in (("PATCH", "", {"rateLimit": 5}), ("POST", "/keys", None)):
        status, conflict = await call(gw, method, path + sub, body=sent)
        assert status == 409 and conflict["error"]["code"] == "app_disabled"
    # Its pending transaction is still watched, and its webhook sent.
    bakong.pay(md5)
    (webhook,) = await receiver.wait_for(1)
    assert webhook.json()["jobId"] == created["jobId"] and webhook.json()["status"] == "success"


async def test_a_key_made_works_at_once_and_a_revoked_one_stops_at_once(
    gw: Gateway, receiver: Receiver
) -> None:
    made = await make(gw, {"name": "Shop"})
    keys = f"/api/v1/apps/{made['id']}/keys"
    status, new = await call(gw, "POST", keys, body={"expiresInDays": 30})
    assert status == 201
    secret(new["key"])
    assert new["id"].startswith("key_") and new["key"].startswith("kgw_")
    expires = datetime.fromisoformat(new["expiresAt"])
    assert abs(expires - (datetime.now(UTC) + timedelta(days=30))) < timedelta(minutes=1)
    body = {"md5": random_md5(), "webhookUrl": receiver.url}
    assert (await call(gw, "POST", "/api/v1/transactions", new["key"], body))[0] == 201
    status, listed = await call(gw, "GET", keys)
    assert status == 200
    assert [k["id"] for k in listed["data"]] == [made["apiKey"]["id"], new["id"]]
    assert {k["prefix"] for k in listed["data"]} == {
        made["apiKey"]["key"][:8],
        new["key"][:8],
    }
    assert set(listed["data"][1]) == {
        "id",
        "prefix",
        "status",
        "createdAt",
        "expiresAt",
        "lastUsedAt",
        "revokedAt",
    }
    assert (await call(gw, "DELETE", f"{keys}/{new['id']}"))[0] == 204
    status, refused = await call(gw, "GET", "/api/v1/transactions", new["key"])
    assert status == 401 and refused["error"]["code"] == "unauthorized"
    # The other key is untouched; revoking again is 204 and keeps the first moment.
    assert (await call(gw, "GET", "/api/v1/transactions", made["apiKey"]["key"]))[0] == 200
    _, before = await call(gw, "GET", keys)
    assert (await call(gw, "DELETE", f"{keys}/{new['id']}"))[0] == 204
    _, after = await call(gw, "GET", keys)
    assert before == after
    assert [(k["status"], bool(k["revokedAt"])) for k in after["data"]] == [
        ("active", False),
        ("revoked", True),
    ]


async def test_a_key_is_made_without_a_body_and_never_expires(gw: Gateway) -> None:
    made = await make(gw, {"name": "Shop"})
    resp = await gw.client.post(f"/api/v1/apps/{made['id']}/keys", headers=bearer(ADMIN_KEY))
    assert resp.status == 201 and resp.headers["Cache-Control"] == "no-store"
    new = await resp.json()
    secret(new["key"])
    assert new["expiresAt"] is None
    assert (await call(gw, "GET", "/api/v1/app", new["key"]))[1]["id"] == made["id"]
    for days in (0, 3651, "7", 1.5):
        status, refused = await call(
            gw, "POST", f"/api/v1/apps/{made['id']}/keys", body={"expiresInDays": days}
        )
        assert status == 422 and "expiresInDays" in field_errors(refused)


async def test_another_apps_key_id_is_404_and_stays_usable(gw: Gateway) -> None:
    shop = await make(gw, {"name": "Shop"})
    bar = await make(gw, {"name": "Bar"})
    path = f"/api/v1/apps/{shop['id']}/keys/{bar['apiKey']['id']}"
    status, missing = await call(gw, "DELETE", path)
    assert status == 404 and missing["error"]["code"] == "not_found"
    status, missing = await call(gw, "DELETE", f"/api/v1/apps/{shop['id']}/keys/key_nope")
    assert status == 404
    assert (await call(gw, "GET", "/api/v1/transactions", bar["apiKey"]["key"]))[0] == 200


async def test_a_new_webhook_secret_is_shown_once_and_signs_beside_the_old_at_once(
    gw: Gateway, receiver: Receiver, bakong: SimulatedBakong
) -> None:
    made = await make(gw, {"name": "Shop", "webhookUrl": receiver.url})
    key = made["apiKey"]["key"]
    first = await paid(gw, bakong, key)  # signed with the first secret: now cached here
    (before,) = await receiver.wait_for(1)
    assert Webhook(made["webhookSecret"]).verify(before.body, before.headers)
    status, rotated = await call(gw, "POST", f"/api/v1/apps/{made['id']}/webhook-secret")
    assert status == 201
    new = secret(rotated["webhookSecret"])
    assert new.startswith("whsec_") and new != made["webhookSecret"]
    second = await paid(gw, bakong, key)
    _, after = await receiver.wait_for(2)
    assert [orjson.loads(r.body)["jobId"] for r in (before, after)] == [first, second]
    # Signed by both at once: the old one for receivers not yet moved, the new one.
    assert len(after.headers["webhook-signature"].split(" ")) == 2
    for current in (made["webhookSecret"], new):
        assert Webhook(current).verify(after.body, after.headers)["status"] == "success"
    assert (await call(gw, "GET", f"/api/v1/apps/{made['id']}"))[0] == 200


async def paid(gw: Gateway, bakong: SimulatedBakong, key: str) -> str:
    """The jobId of a transaction of the key's app, with no webhookUrl (its app's), paid."""
    status, created = await call(gw, "POST", "/api/v1/transactions", key, {"md5": random_md5()})
    assert status == 201, created
    bakong.pay(created["md5"])
    job_id: str = created["jobId"]
    return job_id


async def test_a_new_merchant_is_encoded_at_once(gw: Gateway) -> None:
    made = await make(gw, {"name": "Shop", "merchant": MERCHANT})
    key, body = made["apiKey"]["key"], {"amount": 10000, "currency": "KHR"}
    status, qr = await call(gw, "POST", "/api/v1/khqr", key, body)
    assert status == 200 and parse(qr["qr"]).merchant_name == "Coffee Shop"
    other = {**MERCHANT, "merchantName": "Tea House"}
    assert (await call(gw, "PATCH", f"/api/v1/apps/{made['id']}", body={"merchant": other}))[
        0
    ] == 200
    status, qr = await call(gw, "POST", "/api/v1/khqr", key, body)
    assert status == 200 and parse(qr["qr"]).merchant_name == "Tea House"


async def test_every_caller_reads_its_own_app(gw: Gateway) -> None:
    made = await make(gw, {"name": "Shop", "merchant": MERCHANT})
    status, own = await call(gw, "GET", "/api/v1/app", made["apiKey"]["key"])
    assert status == 200 and own["id"] == made["id"] and own["merchant"] == MERCHANT
    status, own = await call(gw, "GET", "/api/v1/app", DEFAULT_KEY)
    assert status == 200 and (own["id"], own["isDefault"]) == (DEFAULT_APP_ID, True)
    resp = await gw.client.get("/api/v1/app", headers={**bearer(ADMIN_KEY), "Khqr-App": made["id"]})
    assert resp.status == 200 and (await resp.json())["id"] == made["id"]
    assert (await call(gw, "GET", "/api/v1/app", None))[0] == 401


async def test_the_default_app_shows_what_the_environment_sets_but_no_secret(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(
        api_keys=(DEFAULT_KEY,),
        khqr_account_id="env@aclb",
        khqr_merchant_name="Env Shop",
        telegram_bot_token=secret("987654321:" + "T" * 35),
        telegram_chat_id="-100555",
        api_rate_limit=250,
    )
    status, own = await call(gw, "GET", "/api/v1/app", DEFAULT_KEY)
    assert status == 200
    assert own["name"] == "default" and own["webhookUrl"] is None
    assert own["merchant"] == {
        "accountId": "env@aclb",
        "merchantName": "Env Shop",
        "merchantCity": "Phnom Penh",
    }
    assert (own["telegram"], own["rateLimit"], own["credentialId"]) == (
        {"chatId": "-100555", "language": "en"},
        250,
        None,
    )
    bare = await make_gateway(api_keys=(DEFAULT_KEY,))
    status, own = await call(bare, "GET", "/api/v1/app", DEFAULT_KEY)
    assert status == 200 and (own["merchant"], own["telegram"]) == (None, None)


async def test_the_spec_links_a_made_app_and_key_to_their_routes(gw: Gateway) -> None:
    spec = await (await gw.client.get("/openapi.json")).json()
    made = spec["paths"]["/api/v1/apps"]["post"]["responses"]["201"]
    assert "schema" in made["content"]["application/json"]
    targets = {link["operationRef"] for link in made["links"].values()}
    for ref in targets:
        path, method = ref.removeprefix("#/paths/").rsplit("/", 1)
        assert method in spec["paths"][path.replace("~1", "/")], ref
    assert len(targets) == 6
    key = spec["paths"]["/api/v1/apps/{appId}/keys"]["post"]["responses"]["201"]
    assert key["links"]["RevokeKey"]["parameters"]["keyId"] == "$response.body#/id"
    assert "x-links" not in str(spec)
