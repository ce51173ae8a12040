"""The hosted payment page: token guard, escaping, CSP, its live status and its assets."""

from __future__ import annotations

import hashlib
import re
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest

from tests.conftest import Gateway, Receiver, SimulatedBakong
from tests.sse import Reader

MERCHANT = {"accountId": "shop@aclb", "merchantName": "Coffee Shop"}


async def checkout(gw: Gateway, receiver: Receiver, **extra: Any) -> dict[str, Any]:
    body = {
        "amount": 12500,
        "currency": "KHR",
        "webhookUrl": receiver.url,
        **MERCHANT,
        **extra,
    }
    status, answer = await gw.post("/api/v1/khqr", body)
    assert status == 201, answer
    parts = urlsplit(answer["payUrl"])
    answer["path"] = parts.path
    answer["token"] = parse_qs(parts.query)["t"][0]
    return dict(answer)


async def test_page_shows_the_qr_amount_merchant_and_expiry(
    gateway: Gateway, receiver: Receiver
) -> None:
    made = await checkout(gateway, receiver)
    resp = await gateway.client.get(f"{made['path']}?t={made['token']}")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    page = await resp.text()
    assert re.search(r'<figure class="qr"[^>]*><svg viewBox=', page)
    assert '<p class="merchant" id="merchant">Coffee Shop</p>' in page
    assert '12,500 <span class="currency">KHR</span>' in page
    assert 'data-status="pending"' in page
    assert f'data-events="/pay/{made["jobId"]}/events?t={made["token"]}"' in page
    assert "<script>" not in page, "no inline script: the CSP forbids it"


async def test_page_headers_are_strict(gateway: Gateway, receiver: Receiver) -> None:
    made = await checkout(gateway, receiver)
    resp = await gateway.client.get(f"{made['path']}?t={made['token']}")
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


async def test_user_input_is_escaped(gateway: Gateway, receiver: Receiver) -> None:
    made = await checkout(
        gateway,
        receiver,
        merchantName='<img src=x onerror="1">',
        returnUrl='https://shop.example/done?a=1&b="><script>',
    )
    page = await (await gateway.client.get(f"{made['path']}?t={made['token']}")).text()
    assert "<img" not in page
    assert "&lt;img src=x onerror=&quot;1&quot;&gt;" in page
    assert 'data-return="https://shop.example/done?a=1&amp;b=&quot;&gt;&lt;script&gt;"' in page


async def test_wrong_missing_or_other_tokens_are_404(gateway: Gateway, receiver: Receiver) -> None:
    one, two = await checkout(gateway, receiver), await checkout(gateway, receiver)
    for url in (
        one["path"],
        f"{one['path']}?t=",
        f"{one['path']}?t={one['token']}x",
        f"{one['path']}?t={two['token']}",
        f"/pay/{uuid.uuid4()}?t={one['token']}",
        f"/pay/not-a-uuid?t={one['token']}",
    ):
        resp = await gateway.client.get(url)
        assert resp.status == 404, url
        assert "Coffee Shop" not in await resp.text()
    events = await gateway.client.get(f"{one['path']}/events?t={two['token']}")
    assert events.status == 404


async def test_the_token_is_128_bits_and_stored_hashed(
    gateway: Gateway, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    made = await checkout(gateway, receiver)
    assert len(made["token"]) == 22  # 16 random bytes, url-safe base64
    stored = await pg.fetchval(
        "select page_token_hash from transactions where id = $1", uuid.UUID(made["jobId"])
    )
    assert stored == hashlib.sha256(made["token"].encode()).hexdigest()
    assert made["token"] not in str(await pg.fetch("select * from transactions"))


async def test_the_api_key_is_not_needed_or_used(
    make_gateway: Any, receiver: Receiver, bakong: SimulatedBakong
) -> None:
    gw = await make_gateway(api_keys=("k" * 32,))
    made = await checkout(gw, receiver)
    page = await gw.client.get(f"{made['path']}?t={made['token']}")  # no Authorization
    assert page.status == 200
    assert "k" * 32 not in await page.text()
    stream = await gw.client.get(f"{made['path']}/events?t={made['token']}")
    assert stream.status == 200
    first = await Reader(stream).next()
    assert first is not None
    assert first.json() == {"status": "pending"}, "the public stream carries only the status"
    bakong.pay(made["md5"], amount=12500, currency="KHR", toAccountId="shop@aclb")
    assert [e.json() for e in await Reader(stream).rest()] == [{"status": "success"}]


async def test_a_paid_page_renders_paid(
    gateway: Gateway, receiver: Receiver, bakong: SimulatedBakong
) -> None:
    made = await checkout(gateway, receiver)
    bakong.pay(made["md5"], amount=12500, currency="KHR", toAccountId="shop@aclb")
    await gateway.wait_status(made["jobId"], "success")
    page = await (await gateway.client.get(f"{made['path']}?t={made['token']}")).text()
    assert 'data-status="success"' in page
    assert "Paid. Thank you!" in page


async def test_assets_and_sdk(gateway: Gateway) -> None:
    for path, kind in (
        ("/sdk.js", "application/javascript"),
        ("/static/pay.js", "application/javascript"),
        ("/static/pay.css", "text/css"),
    ):
        resp = await gateway.client.get(path)
        assert resp.status == 200, path
        assert resp.content_type == kind
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    sdk = await (await gateway.client.get("/sdk.js")).text()
    assert "KhqrCheckout" in sdk
    assert "event.origin" in sdk
    assert len(sdk.encode()) < 4096, "small: no framework"
    for name in ("pay.html", "../config.py", "dashboard.js"):
        assert (await gateway.client.get(f"/static/{name}")).status == 404


async def final_page(gw: Gateway, made: dict[str, Any], status: str) -> str:
    await gw.wait_status(made["jobId"], status)
    resp = await gw.client.get(f"{made['path']}?t={made['token']}")
    assert resp.status == 200
    page = await resp.text()
    assert f'data-status="{status}"' in page
    # No QR at all: not faded, not hidden, absent.
    assert "<svg" not in page and 'class="qr"' not in page and made["qr"] not in page
    return page


async def test_a_paid_page_is_a_receipt_with_no_qr(
    gateway: Gateway, receiver: Receiver, bakong: SimulatedBakong
) -> None:
    made = await checkout(gateway, receiver, billNumber="INV-42")
    bakong.pay(made["md5"], amount=12500, currency="KHR", toAccountId="shop@aclb")
    page = await final_page(gateway, made, "success")
    receipt = re.search(r'<ul class="receipt" id="receipt">(.*?)</ul>', page)
    assert receipt, page
    assert "12500 KHR to Coffee Shop" in receipt.group(1)
    assert "(Phnom Penh)" in receipt.group(1) and "Reference INV-42" in receipt.group(1)


@pytest.mark.parametrize(
    ("status", "says"),
    [
        ("mismatch", "Please contact Coffee Shop, quoting reference"),
        ("timeout", "This QR code can no longer be paid"),
        ("cancelled", "Coffee Shop cancelled this payment"),
    ],
)
async def test_a_page_that_ended_unpaid_has_no_qr_and_says_what_to_do(
    gateway: Gateway, receiver: Receiver, bakong: SimulatedBakong, status: str, says: str
) -> None:
    made = await checkout(gateway, receiver, expiresInSeconds=1 if status == "timeout" else 300)
    if status == "mismatch":
        bakong.pay(made["md5"], amount=100, currency="KHR", toAccountId="shop@aclb")
    elif status == "cancelled":
        resp = await gateway.client.delete(
            f"/api/v1/transactions/{made['jobId']}", headers=gateway.headers
        )
        assert resp.status == 200
    page = await final_page(gateway, made, status)
    assert says in page


async def test_a_stored_qr_that_no_longer_parses_still_renders_its_page(
    gateway: Gateway, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    """A QR stored before a codec fix (lengths counted in code points) must not make its
    page a 500 for the rest of its life."""
    made = await checkout(gateway, receiver)
    await pg.execute("update transactions set qr = 'not a khqr' where id = $1", made["jobId"])
    resp = await gateway.client.get(f"{made['path']}?t={made['token']}")
    assert resp.status == 200
    assert 'data-status="pending"' in await resp.text()
