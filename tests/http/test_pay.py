"""The hosted payment page: token guard, escaping, CSP, its live status and its assets."""

from __future__ import annotations

import hashlib
import html
import json
import re
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import pytest
import segno
from aiohttp.test_utils import make_mocked_request

from khqr_gateway.bakong.sandbox import Faults
from khqr_gateway.http import qr as qr_images
from khqr_gateway.http.pay import client_of
from khqr_gateway.transactions.events import PAGE_STREAMS_PER_JOB
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
    assert "12,500 KHR to Coffee Shop" in receipt.group(1)
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


async def page_stream(gw: Gateway, made: dict[str, Any], **headers: str) -> aiohttp.ClientResponse:
    return await gw.client.get(f"{made['path']}/events?t={made['token']}", headers=headers)


async def assert_refused(resp: aiohttp.ClientResponse, status: int) -> None:
    assert resp.status == status  # no body in the message: a 200 here is an endless stream
    assert resp.headers["Retry-After"].isdigit()
    error = (await resp.json())["error"]
    assert error["code"] == "too_many_streams"
    assert error["message"]


async def test_a_flood_of_one_link_is_refused_and_api_streams_still_open(
    gateway: Gateway, receiver: Receiver
) -> None:
    hub = gateway.service.events
    hub.max_streams = 20  # the process's 1,000, scaled down
    made = await checkout(gateway, receiver)
    flood = [await page_stream(gateway, made) for _ in range(25)]
    assert [r.status for r in flood].count(200) == PAGE_STREAMS_PER_JOB
    for resp in flood[PAGE_STREAMS_PER_JOB:]:
        await assert_refused(resp, 429)
    api = await gateway.client.get(f"/api/v1/transactions/{made['jobId']}/events")
    assert api.status == 200, "a flood of the public page must not starve the API's streams"
    assert hub.open_streams == PAGE_STREAMS_PER_JOB + 1


async def test_one_address_is_capped_across_links_by_its_transport_peer(
    gateway: Gateway, receiver: Receiver
) -> None:
    hub = gateway.service.events
    hub.page_per_job, hub.page_per_client = 2, 3
    links = [await checkout(gateway, receiver) for _ in range(3)]
    opened = [await page_stream(gateway, made) for made in (links[0], links[0], links[1])]
    assert [r.status for r in opened] == [200, 200, 200]
    # X-Forwarded-For is anyone's to write: the address is the connection's.
    await assert_refused(
        await page_stream(gateway, links[2], **{"X-Forwarded-For": "192.0.2.7"}), 429
    )
    elsewhere = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=elsewhere) as other:
        made = links[2]
        resp = await other.get(gateway.client.make_url(f"{made['path']}/events?t={made['token']}"))
        assert resp.status == 200, "another address has its own allowance"
        resp.close()


async def test_page_streams_leave_the_api_its_share_of_the_process(
    gateway: Gateway, receiver: Receiver
) -> None:
    hub = gateway.service.events
    hub.max_streams, hub.page_per_client = 8, 100  # pages may hold 6, the API keeps 2
    links = [await checkout(gateway, receiver) for _ in range(7)]
    pages = [await page_stream(gateway, made) for made in links]
    assert [r.status for r in pages[:6]] == [200] * 6
    await assert_refused(pages[6], 503)
    path = f"/api/v1/transactions/{links[0]['jobId']}/events"
    api = [await gateway.client.get(path) for _ in range(3)]
    assert [r.status for r in api[:2]] == [200, 200]
    await assert_refused(api[2], 503)


class _Peer:
    """The one thing client_of asks of a transport."""

    def __init__(self, peername: Any) -> None:
        self.peername = peername

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peername if name == "peername" else default


@pytest.mark.parametrize(
    ("peername", "client"),
    [
        (("203.0.113.9", 5000), "203.0.113.9"),
        (("::ffff:203.0.113.9", 5000, 0, 0), "203.0.113.9"),
        (("2001:db8:1:2::1", 5000, 0, 0), "2001:db8:1:2::/64"),
        (("2001:db8:1:2:ffff::9", 5000, 0, 0), "2001:db8:1:2::/64"),
        ("", ""),
    ],
)
def test_the_client_is_the_transport_peer_and_an_ipv6_host_its_64(
    peername: Any, client: str
) -> None:
    request = make_mocked_request(
        "GET", "/", headers={"X-Forwarded-For": "192.0.2.1"}, transport=_Peer(peername)
    )
    assert client_of(request) == client


# Checkout on a phone ----------------------------------------------------------------------


async def page_of(gw: Gateway, made: dict[str, Any], query: str = "", **headers: str) -> str:
    resp = await gw.client.get(f"{made['path']}?t={made['token']}{query}", headers=headers)
    assert resp.status == 200
    return await resp.text()


def element(page: str, element_id: str) -> str:
    """The opening tag of the element with this id (empty when there is none)."""
    found = re.search(rf'<[a-z]+ [^>]*id="{element_id}"[^>]*>', page)
    return found.group(0) if found else ""


async def test_a_phone_gets_open_in_bakong_and_save_qr_image(
    gateway: Gateway, receiver: Receiver
) -> None:
    made = await checkout(gateway, receiver)
    assert made["deeplink"], "the simulated Bakong gives a link"
    page = await page_of(gateway, made)
    link = element(page, "deeplink")
    assert f'href="{made["deeplink"]}"' in link
    assert "Open in Bakong" in page
    assert element(page, "save"), "the Save QR image button"
    assert "Save QR image" in page
    assert "Scan from gallery" in page, "one line on how to pay a saved QR"


async def test_with_no_deeplink_the_qr_image_can_still_be_saved(
    gateway: Gateway, receiver: Receiver, bakong: SimulatedBakong
) -> None:
    bakong.state.faults = Faults(deeplink_error=True)
    made = await checkout(gateway, receiver)
    assert made["deeplink"] is None
    page = await page_of(gateway, made)
    assert element(page, "deeplink") == "" and ">Open in Bakong<" not in page
    assert element(page, "save") and "Scan from gallery" in page
    assert re.search(r'<figure class="qr"[^>]*><svg viewBox=', page)


async def test_the_page_speaks_khmer_or_english(gateway: Gateway, receiver: Receiver) -> None:
    made = await checkout(gateway, receiver)
    km = await page_of(gateway, made, "&lang=km")
    assert '<html lang="km">' in km
    assert "កំពុងរង់ចាំការទូទាត់" in km and "រក្សាទុករូបភាព QR" in km
    assert "Waiting for payment" not in km
    by_header = await page_of(gateway, made, **{"Accept-Language": "km-KH,km;q=0.9,en;q=0.8"})
    assert '<html lang="km">' in by_header
    for query, header in (
        ("", "en-US,en;q=0.9,km;q=0.5"),
        ("", "fr-FR, de"),
        ("", ""),
        ("&lang=en", "km"),
        ("&lang=xx", "en"),
        ("&lang=", "en"),
    ):
        page = await page_of(gateway, made, query, **{"Accept-Language": header})
        assert '<html lang="en">' in page, (query, header)
        assert "Waiting for payment" in page
    resp = await gateway.client.get(f"{made['path']}?t={made['token']}")
    assert "Accept-Language" in resp.headers["Vary"]


async def test_the_language_switch_keeps_the_page(gateway: Gateway, receiver: Receiver) -> None:
    made = await checkout(gateway, receiver)
    page = await page_of(gateway, made)
    token = made["token"]
    assert f'href="?t={token}&amp;lang=km"' in page
    assert f'href="?t={token}&amp;lang=en"' in page
    assert 'aria-current="true"' in element(page, "lang-en")


async def test_the_words_of_the_script_come_with_the_page(
    gateway: Gateway, receiver: Receiver
) -> None:
    """pay.js says what the server would, in the page's language: the same catalogue."""
    made = await checkout(gateway, receiver)
    page = await page_of(gateway, made, "&lang=km")
    text = re.search(r'data-text="([^"]*)"', page)
    assert text, "the catalogue is handed to the script"
    words = json.loads(html.unescape(text.group(1)))
    assert words["status.success"] == "បានទូទាត់រួចរាល់។ សូមអរគុណ!"
    assert "{merchant}" in words["next.timeout"]


async def test_the_bill_number_and_amounts_are_written_alike(
    gateway: Gateway, receiver: Receiver
) -> None:
    made = await checkout(gateway, receiver, billNumber="INV-42")
    page = await page_of(gateway, made)
    assert re.search(r'id="bill"[^>]*>Bill number <strong[^>]*>INV-42</strong>', page), page
    assert '12,500 <span class="currency">KHR</span>' in page
    made = await checkout(gateway, receiver, amount=1, currency="USD")
    page = await page_of(gateway, made)
    assert '1.00 <span class="currency">USD</span>' in page
    assert re.search(r'id="bill"[^>]*>Reference <strong[^>]*>[0-9A-F]{8}</strong>', page)


async def test_a_final_page_in_khmer_says_what_to_do_in_khmer(
    gateway: Gateway, receiver: Receiver
) -> None:
    made = await checkout(gateway, receiver)
    resp = await gateway.client.delete(
        f"/api/v1/transactions/{made['jobId']}", headers=gateway.headers
    )
    assert resp.status == 200
    page = await page_of(gateway, made, "&lang=km")
    assert "Coffee Shop បានលុបចោលការទូទាត់នេះ" in page
    assert element(page, "save") == "" and element(page, "deeplink") == ""


async def test_the_qr_is_drawn_once_per_transaction(
    gateway: Gateway, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each view drew it anew (8 ms of CPU): 32 customers on one link slowed every request."""
    drawn: list[str] = []
    make_qr = segno.make_qr

    def counting(content: str, **kwargs: Any) -> Any:
        drawn.append(content)
        return make_qr(content, **kwargs)

    monkeypatch.setattr(qr_images.segno, "make_qr", counting)
    made = await checkout(gateway, receiver)
    pages = [await page_of(gateway, made) for _ in range(5)]
    assert drawn == [made["qr"]]
    assert len(set(pages)) == 1


async def test_only_a_sandbox_page_can_simulate_a_payment(
    gateway: Gateway, sandbox_gateway: Gateway, receiver: Receiver
) -> None:
    made = await checkout(gateway, receiver)
    assert element(await page_of(gateway, made), "simulate-pay") == ""
    made = await checkout(sandbox_gateway, receiver, billNumber="INV-9")
    page = await page_of(sandbox_gateway, made)
    assert element(page, "simulate-pay") and element(page, "simulate-fail")
    control = element(page, "sandbox")
    assert f'data-control="/sandbox/control/transactions/{made["md5"]}"' in control
    pay = re.search(r'data-pay="([^"]*)"', control)
    assert pay and json.loads(html.unescape(pay.group(1))) == {
        "amount": "12500",
        "currency": "KHR",
        "toAccountId": "shop@aclb",
    }
