"""Each app's webhooks are signed with its own secrets: verified by the standardwebhooks
package with that app's secret and never with another's; a rotated secret signs beside the
new one for the overlap window, then no more; an app's default webhookUrl; a disabled app's
pending payments are still reported."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import orjson
import pytest
from standardwebhooks import Webhook
from standardwebhooks import WebhookVerificationError as StandardVerificationError

from khqr_gateway.apps import store as apps
from tests.conftest import Gateway, GatewayFactory, Receiver, SimulatedBakong, random_md5, secret

DEFAULT_KEY = "default-key-" + "d" * 20
ENV_SECRET = bytes(range(7, 39))


def whsec(key: bytes) -> str:
    return "whsec_" + base64.b64encode(key).decode()


@pytest.fixture
async def gw(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway(
        api_keys=(DEFAULT_KEY,), webhook_secrets=(ENV_SECRET,), secret_overlap_s=0.5
    )


async def made_app(gw: Gateway, name: str, **fields: Any) -> tuple[str, str, str]:
    app, key, webhook_secret = await apps.create(gw.service.pool, name, **fields)
    return app.id, secret(key.key), secret(webhook_secret)


async def paid(
    gw: Gateway, bakong: SimulatedBakong, key: str, body: dict[str, Any]
) -> dict[str, Any]:
    resp = await gw.client.post(
        "/api/v1/transactions",
        json={"md5": random_md5(), **body},
        headers={"Authorization": f"Bearer {key}"},
    )
    created: dict[str, Any] = await resp.json()
    assert resp.status == 201, created
    bakong.pay(created["md5"])
    return created


async def test_each_apps_webhook_verifies_with_its_own_secret_only(
    gw: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    _, shop_key, shop_secret = await made_app(gw, "Shop")
    mine = await paid(gw, bakong, shop_key, {"webhookUrl": receiver.url})
    theirs = await paid(gw, bakong, DEFAULT_KEY, {"webhookUrl": receiver.url})
    by_job = {orjson.loads(h.body)["jobId"]: h for h in await receiver.wait_for(2)}
    assert set(by_job) == {mine["jobId"], theirs["jobId"]}
    shops, defaults = by_job[mine["jobId"]], by_job[theirs["jobId"]]
    assert Webhook(shop_secret).verify(shops.body, shops.headers)["status"] == "success"
    assert Webhook(whsec(ENV_SECRET)).verify(defaults.body, defaults.headers)
    with pytest.raises(StandardVerificationError):
        Webhook(whsec(ENV_SECRET)).verify(shops.body, shops.headers)
    with pytest.raises(StandardVerificationError):
        Webhook(shop_secret).verify(defaults.body, defaults.headers)


async def test_a_rotated_secret_signs_beside_the_new_one_for_the_window_then_not(
    gw: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    shop_id, shop_key, old = await made_app(gw, "Shop")
    new = secret(await apps.rotate_secret(gw.service.pool, shop_id))
    gw.service.signing.forget()  # this process reads its secrets now, not within the TTL
    await paid(gw, bakong, shop_key, {"webhookUrl": receiver.url})
    [during] = await receiver.wait_for(1)
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    for current in (old, new):
        Webhook(current).verify(during.body, during.headers)

    await asyncio.sleep(0.6)  # past the overlap window of this gateway
    gw.service.signing.forget()
    await paid(gw, bakong, shop_key, {"webhookUrl": receiver.url})
    after = (await receiver.wait_for(2))[1]
    assert len(after.headers["webhook-signature"].split(" ")) == 1
    Webhook(new).verify(after.body, after.headers)
    with pytest.raises(StandardVerificationError):
        Webhook(old).verify(after.body, after.headers)


async def test_a_post_may_leave_out_the_webhook_url_of_an_app_that_has_one(
    gw: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    _, shop_key, shop_secret = await made_app(gw, "Shop", webhook_url=receiver.url)
    created = await paid(gw, bakong, shop_key, {})
    [hook] = await receiver.wait_for(1)
    assert Webhook(shop_secret).verify(hook.body, hook.headers)["jobId"] == created["jobId"]
    # The default app has none: the field is required, and named.
    resp = await gw.client.post(
        "/api/v1/transactions",
        json={"md5": random_md5()},
        headers={"Authorization": f"Bearer {DEFAULT_KEY}"},
    )
    body = await resp.json()
    assert resp.status == 422
    assert [d["field"] for d in body["error"]["details"]] == ["webhookUrl"]


async def test_a_disabled_app_still_gets_its_pending_webhooks(
    gw: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    shop_id, shop_key, shop_secret = await made_app(gw, "Shop")
    resp = await gw.client.post(
        "/api/v1/transactions",
        json={"md5": random_md5(), "webhookUrl": receiver.url},
        headers={"Authorization": f"Bearer {shop_key}"},
    )
    created = await resp.json()
    await apps.disable(gw.service.pool, shop_id)
    bakong.pay(created["md5"])
    [hook] = await receiver.wait_for(1)
    body = Webhook(shop_secret).verify(hook.body, hook.headers)
    assert body["jobId"] == created["jobId"] and body["status"] == "success"
