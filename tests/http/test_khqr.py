"""POST /api/v1/khqr: a dynamic KHQR that decodes back to what was asked, and its tracking."""

from __future__ import annotations

import base64
import time
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
from bakong_khqr import KHQR
from bakong_khqr.sdk.emv_parser import EMVParser

from khqr_gateway.bakong.khqr import crc16, md5_of, parse, verify
from khqr_gateway.bakong.sandbox import parse_faults
from tests import khqr_sdk
from tests.conftest import Gateway, GatewayFactory, Receiver, SimulatedBakong

MERCHANT = {"accountId": "shop@aclb", "merchantName": "Coffee Shop", "merchantCity": "Siem Reap"}


async def generate(gw: Gateway, expect: int = 200, **body: Any) -> dict[str, Any]:
    status, answer = await gw.post("/api/v1/khqr", body)
    assert status == expect, answer
    return dict(answer)


def epoch_ms(value: str) -> int:
    return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)


async def test_khqr_decodes_back_to_the_request_with_a_valid_crc(gateway: Gateway) -> None:
    before = int(time.time() * 1000)
    body = await generate(
        gateway,
        amount="1.5",
        currency="USD",
        billNumber="INV-42",
        mobileNumber="85512345678",
        storeLabel="Riverside",
        terminalLabel="Till 2",
        purpose="Coffee",
        expiresInSeconds=120,
        **MERCHANT,
    )
    qr = body["qr"]
    assert set(body) == {"qr", "md5", "expiresAt", "deeplink"}
    assert qr[-4:] == crc16(qr[:-4])
    assert body["md5"] == md5_of(qr) == KHQR().generate_md5(qr)
    parsed = parse(qr)
    assert parsed.dynamic
    assert (parsed.amount, parsed.currency) == (Decimal("1.50"), "USD")
    assert (parsed.account_id, parsed.merchant_name, parsed.merchant_city) == (
        "shop@aclb",
        "Coffee Shop",
        "Siem Reap",
    )
    assert (parsed.bill_number, parsed.mobile_number, parsed.store_label) == (
        "INV-42",
        "85512345678",
        "Riverside",
    )
    assert (parsed.terminal_label, parsed.purpose) == ("Till 2", "Coffee")
    assert parsed.expires_at_ms == epoch_ms(body["expiresAt"])
    assert before + 120_000 <= parsed.expires_at_ms <= int(time.time() * 1000) + 120_000
    # An independent decoder reads the same amount (written as the official SDK does).
    assert EMVParser(qr).get("54") == "1.50"


async def test_khqr_is_exactly_what_the_official_sdk_generates(gateway: Gateway) -> None:
    sdk = khqr_sdk.shared()
    fields = {"merchantName": "Noodle \U0001f35c", "merchantCity": "ភ្នំពេញ", "billNumber": "INV-7"}
    body = await generate(gateway, amount="2.5", currency="USD", accountId="noodle@aclb", **fields)
    stamps = parse(body["qr"])
    assert stamps.created_at_ms is not None and stamps.expires_at_ms is not None
    theirs = sdk.generate(
        stamps.created_at_ms,
        account_id="noodle@aclb",
        merchant_name="Noodle \U0001f35c",
        merchant_city="ភ្នំពេញ",
        bill_number="INV-7",
        amount=Decimal("2.5"),
        currency="USD",
        expires_at_ms=stamps.expires_at_ms,
    )
    assert body["qr"] == theirs
    assert sdk.verify(body["qr"], stamps.created_at_ms).valid
    assert verify(body["qr"]).merchant_name == "Noodle \U0001f35c"


async def test_a_name_payer_apps_count_as_too_long_is_422(gateway: Gateway) -> None:
    # 13 emoji are 13 code points but 26 UTF-16 units: the SDK and payer apps refuse it.
    name = "\U0001f35c" * 13
    body = await generate(
        gateway, 422, amount=1000, currency="KHR", **MERCHANT | {"merchantName": name}
    )
    [detail] = body["error"]["details"]
    assert detail["field"] == "merchantName", detail
    assert "26 UTF-16 units" in detail["message"]


async def test_merchant_defaults_come_from_settings(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(
        khqr_account_id="default@devb", khqr_merchant_name="Default Shop", poll_timeout_s=300
    )
    body = await generate(gw, amount=10000, currency="KHR")
    parsed = parse(body["qr"])
    assert (parsed.account_id, parsed.merchant_name, parsed.merchant_city) == (
        "default@devb",
        "Default Shop",
        "Phnom Penh",
    )
    assert parsed.amount == 10000
    # The expiry defaults to the tracking window.
    assert abs(parsed.expires_at_ms - (time.time() * 1000 + 300_000)) < 5_000


async def test_refusals_name_the_field(gateway: Gateway) -> None:
    status, body = await gateway.post("/api/v1/khqr", {"amount": 5, "currency": "USD"})
    assert status == 422
    assert body["error"]["details"][0]["field"] == "accountId"
    status, body = await gateway.post(
        "/api/v1/khqr", {"amount": "10.5", "currency": "KHR", **MERCHANT}
    )
    assert status == 422
    assert body["error"]["details"][0]["field"] == "amount"
    status, body = await gateway.post(
        "/api/v1/khqr", {"amount": 1, "currency": "USD", "returnUrl": "https://x.y", **MERCHANT}
    )
    assert status == 422
    assert body["error"]["details"][0]["field"] == "returnUrl"
    status, body = await gateway.post(
        "/api/v1/khqr",
        {
            "amount": 1,
            "currency": "USD",
            "webhookUrl": "https://x.y/hook",
            "returnUrl": "javascript:alert(1)",
            **MERCHANT,
        },
    )
    assert status == 422
    assert body["error"]["details"][0]["field"] == "returnUrl"


async def test_image_as_svg_or_png_data_url(gateway: Gateway) -> None:
    svg = await generate(gateway, amount=1, currency="USD", image="svg", **MERCHANT)
    prefix, _, data = svg["image"].partition(",")
    assert prefix == "data:image/svg+xml;base64"
    assert b"<svg" in base64.b64decode(data)
    png = await generate(gateway, amount=1, currency="USD", image="png", **MERCHANT)
    prefix, _, data = png["image"].partition(",")
    assert prefix == "data:image/png;base64"
    assert base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n")


async def test_with_webhook_it_tracks_with_expectations_and_gives_a_page(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    body = await generate(
        gateway,
        expect=201,
        amount="2.25",
        currency="USD",
        webhookUrl=receiver.url,
        metadata={"orderId": "A-7"},
        **MERCHANT,
    )
    assert body["status"] == "pending"
    base = str(gateway.client.make_url("")).rstrip("/")
    assert body["payUrl"].startswith(f"{base}/pay/{body['jobId']}?t=")
    _, tx = await gateway.get(f"/api/v1/transactions/{body['jobId']}")
    assert tx["md5"] == body["md5"]
    assert tx["expected"] == {"amount": "2.25", "currency": "USD", "toAccountId": "shop@aclb"}

    page = await gateway.client.get(body["payUrl"][len(base) :])
    assert page.status == 200

    bakong.pay(body["md5"], amount=2.25, currency="USD", toAccountId="shop@aclb")
    [hook] = await receiver.wait_for(1)
    assert hook.json()["status"] == "success"
    assert hook.json()["metadata"] == {"orderId": "A-7"}


async def test_underpaid_is_a_mismatch(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    body = await generate(
        gateway, expect=201, amount=10, currency="USD", webhookUrl=receiver.url, **MERCHANT
    )
    bakong.pay(body["md5"], amount=1, currency="USD", toAccountId="shop@aclb")
    [hook] = await receiver.wait_for(1)
    assert hook.json()["status"] == "mismatch"


async def test_pay_url_uses_public_url_when_set(
    make_gateway: GatewayFactory, receiver: Receiver
) -> None:
    gw = await make_gateway(public_url="https://pay.example.com/")
    body = await generate(
        gw, expect=201, amount=1, currency="USD", webhookUrl=receiver.url, **MERCHANT
    )
    assert body["payUrl"].startswith(f"https://pay.example.com/pay/{body['jobId']}?t=")


# Deep links: checkout on the phone that shows the QR ------------------------------------

SOURCE = {
    "appName": "Coffee App",
    "appIconUrl": "https://shop.example/icon.png",
    "callbackUrl": "coffeeapp://orders/7",
}


def asked_with(bakong: SimulatedBakong, link: str) -> dict[str, Any]:
    """The sourceInfo the simulated Bakong was asked for `link` with."""
    return dict(bakong.state.links[link.rsplit("/", 1)[1]].source)


async def test_khqr_answers_bakongs_deeplink_asked_with_the_bodys_source(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    body = await generate(
        gateway,
        expect=201,
        amount="3.75",
        currency="USD",
        webhookUrl=receiver.url,
        deeplink=SOURCE,
        **MERCHANT,
    )
    assert body["deeplink"].startswith(f"{bakong.url}/link/"), body
    assert bakong.state.links[body["deeplink"].rsplit("/", 1)[1]].qr == body["qr"]
    assert asked_with(bakong, body["deeplink"]) == {
        "appName": "Coffee App",
        "appIconUrl": "https://shop.example/icon.png",
        "appDeepLinkCallback": "coffeeapp://orders/7",
    }
    _, tx = await gateway.get(f"/api/v1/transactions/{body['jobId']}")
    assert tx["deeplink"] == body["deeplink"], "the link is kept on the transaction"

    # Opening it is paying in the (simulated) Bakong app: the transaction turns paid.
    page = await gateway.client.session.get(body["deeplink"])
    assert page.status == 200
    assert "Paid 3.75 USD to Coffee Shop" in await page.text()
    await gateway.wait_status(body["jobId"], "success")


async def test_the_source_defaults_to_the_settings_and_returns_to_the_page(
    make_gateway: GatewayFactory, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    gw = await make_gateway(
        khqr_app_name="Noodle Bar", khqr_app_icon_url="https://noodle.example/i.png"
    )
    tracked = await generate(
        gw, expect=201, amount=1, currency="USD", webhookUrl=receiver.url, **MERCHANT
    )
    assert asked_with(bakong, tracked["deeplink"]) == {
        "appName": "Noodle Bar",
        "appIconUrl": "https://noodle.example/i.png",
        "appDeepLinkCallback": tracked["payUrl"],  # back to the page, which shows it paid
    }
    untracked = await generate(gw, amount=1, currency="USD", **MERCHANT)
    assert asked_with(bakong, untracked["deeplink"])["appName"] == "Noodle Bar"
    plain = await generate(
        await make_gateway(),
        amount=1,
        currency="USD",
        deeplink={"callbackUrl": "https://s.example"},
        **MERCHANT,
    )
    asked = asked_with(bakong, plain["deeplink"])
    assert asked["appName"] == "Coffee Shop", "no app name set: the merchant's"
    assert asked["appDeepLinkCallback"] == "https://s.example"
    assert asked["appIconUrl"].startswith("https://")


@pytest.mark.parametrize(
    "faults",
    [{"deeplinkError": True}, {"status": 500}, {"status": 429}, {"malformed": "html"}],
)
async def test_no_deeplink_never_fails_the_qr(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver, faults: dict[str, Any]
) -> None:
    bakong.state.faults = parse_faults({**faults, "endpoints": ["generate_deeplink_by_qr"]})
    body = await generate(
        gateway, expect=201, amount=1, currency="USD", webhookUrl=receiver.url, **MERCHANT
    )
    assert body["deeplink"] is None
    _, tx = await gateway.get(f"/api/v1/transactions/{body['jobId']}")
    assert tx["deeplink"] is None
    assert (await gateway.client.get(body["payUrl"].split("/", 3)[3])).status == 200
    bakong.pay(body["md5"], amount=1, currency="USD", toAccountId="shop@aclb")
    await gateway.wait_status(body["jobId"], "success")


@pytest.mark.parametrize(
    ("deeplink", "field"),
    [
        ({"appIconUrl": "javascript:alert(1)"}, "deeplink.appIconUrl"),
        ({"appIconUrl": "ftp://x.example/i.png"}, "deeplink.appIconUrl"),
        ({"callbackUrl": "javascript:alert(1)//"}, "deeplink.callbackUrl"),
        ({"callbackUrl": "no scheme"}, "deeplink.callbackUrl"),
        ({"callbackUrl": "app://\x00"}, "deeplink.callbackUrl"),
        ({"appName": ""}, "deeplink.appName"),
        ({"appName": "x" * 65}, "deeplink.appName"),
        ({"appName": 7}, "deeplink.appName"),
        ({"colour": "red"}, "deeplink.colour"),
        ("yes", "deeplink"),
    ],
)
async def test_a_bad_deeplink_source_is_422_naming_the_field(
    gateway: Gateway, bakong: SimulatedBakong, deeplink: Any, field: str
) -> None:
    status, body = await gateway.post(
        "/api/v1/khqr", {"amount": 1, "currency": "USD", "deeplink": deeplink, **MERCHANT}
    )
    assert status == 422, body
    assert body["error"]["code"] == "validation_error"
    assert [d["field"] for d in body["error"]["details"]] == [field]
    assert bakong.state.calls["generate_deeplink_by_qr"] == 0
