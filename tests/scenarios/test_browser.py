"""The payment page and sdk.js in a real headless Chromium (skipped when it is not installed)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import zxingcpp
from aiohttp import web
from PIL import Image

from khqr_gateway.bakong.sandbox import Faults
from tests.browser import Browser, Tab, chromium_path, keep, launch
from tests.conftest import Gateway, Receiver, SimulatedBakong, secret

pytestmark = pytest.mark.slow

PAY = {"amount": "3.75", "currency": "USD", "toAccountId": "shop@aclb"}
STATUS = "document.getElementById('checkout').dataset.status"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = chromium_path()
    if executable is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    with launch(executable) as running:
        yield running


SHOP_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>shop</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<script src="%(sdk)s"></script></head>
<body><h1>Shop</h1><script>
window.outcome = [];
var checkout = new KhqrCheckout({
  url: new URLSearchParams(location.search).get("pay"),
  autoCloseMs: 300,
  onSuccess: function (r) { window.outcome.push(["success", r.status, r.jobId]); },
  onFailure: function (r) { window.outcome.push(["failure", r.status, r.jobId]); },
  onClose: function (r) { window.outcome.push(["close", r && r.status, r && r.jobId]); }
});
checkout.open();
</script></body></html>"""


async def shop(aiohttp_server: Any, gateway: Gateway) -> str:
    """A merchant's site on another origin: a checkout page and a page to return to."""
    sdk = str(gateway.client.make_url("/sdk.js"))

    async def checkout(request: web.Request) -> web.Response:
        return web.Response(text=SHOP_PAGE % {"sdk": sdk}, content_type="text/html")

    async def done(request: web.Request) -> web.Response:
        return web.Response(text="<title>thanks</title>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/checkout", checkout)
    app.router.add_get("/done", done)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


async def khqr(gateway: Gateway, receiver: Receiver, **extra: Any) -> dict[str, Any]:
    status, body = await gateway.post(
        "/api/v1/khqr",
        {
            "amount": PAY["amount"],
            "currency": PAY["currency"],
            "accountId": PAY["toAccountId"],
            "merchantName": "Coffee & <Tea>",
            "webhookUrl": receiver.url,
            **extra,
        },
    )
    assert status == 201, body
    return dict(body)


def assert_clean(tab: Tab) -> None:
    problems = [p for p in tab.problems() if "favicon" not in p]
    assert problems == [], "the page logged errors (CSP violations, exceptions)"


async def test_page_shows_the_qr_and_turns_paid_without_a_reload(
    browser: Browser,
    gateway: Gateway,
    bakong: SimulatedBakong,
    receiver: Receiver,
    aiohttp_server: Any,
) -> None:
    site = await shop(aiohttp_server, gateway)
    made = await khqr(gateway, receiver, returnUrl=f"{site}/done")
    async with browser.tab() as tab:
        await tab.navigate(made["payUrl"])
        await tab.wait_for(f"document.querySelector('#qr svg path') && {STATUS} === 'pending'")
        assert await tab.evaluate("document.getElementById('merchant').textContent") == (
            "Coffee & <Tea>"
        )
        assert await tab.evaluate("document.getElementById('amount').textContent") == "3.75 USD"
        # The countdown is written by pay.js: once it shows a time, the script is running.
        remaining = await tab.wait_for(
            "(t => /^[0-9]{2}:[0-9]{2}$/.test(t) && t)"
            "(document.getElementById('remaining').textContent)"
        )
        assert remaining[:2] in ("04", "05"), remaining
        await tab.evaluate("window.sameDocument = true")

        bakong.pay(made["md5"], **PAY)
        await tab.wait_for(f"{STATUS} === 'success' && window.sameDocument === true")
        assert await tab.evaluate("document.getElementById('status').textContent") == (
            "Paid. Thank you!"
        )
        # Then on to the returnUrl the request gave.
        await tab.wait_for(f"location.href === {json.dumps(site + '/done')}", timeout=5)
        assert_clean(tab)


async def test_no_qr_is_left_to_scan_once_the_page_is_final(
    browser: Browser, gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    """Paid while open: the QR leaves the page (not faded: gone) and a receipt takes its
    place; a page opened once final never had one."""
    made = await khqr(gateway, receiver)
    async with browser.tab() as tab:
        await tab.navigate(made["payUrl"])
        await tab.wait_for(f"document.querySelector('#qr svg') && {STATUS} === 'pending'")
        bakong.pay(made["md5"], **PAY)
        await tab.wait_for(f"{STATUS} === 'success'")
        assert await tab.evaluate("document.querySelectorAll('#qr, svg, canvas, img').length") == 0
        receipt = await tab.evaluate("document.getElementById('receipt').innerText")
        assert "3.75 USD to Coffee & <Tea>" in receipt
        await tab.navigate(made["payUrl"])
        await tab.wait_for("document.getElementById('receipt') !== null")
        assert await tab.evaluate("document.querySelectorAll('#qr, svg, canvas, img').length") == 0
        assert "(Phnom Penh)" in await tab.evaluate("document.getElementById('receipt').innerText")
        assert_clean(tab)


async def test_a_page_refused_its_stream_asks_again_and_still_turns_paid(
    browser: Browser, gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    """A page whose live stream was refused (its link or the process at the limit: 429, 503)
    tries again later rather than waiting forever on a closed EventSource."""
    made = await khqr(gateway, receiver)
    hub = gateway.service.events
    hub.page_per_job = 0
    async with browser.tab() as tab:
        await tab.navigate(made["payUrl"])
        await tab.wait_for(f"document.querySelector('#qr svg') && {STATUS} === 'pending'")
        bakong.pay(made["md5"], **PAY)
        await gateway.wait_status(made["jobId"], "success")
        hub.page_per_job = 5
        await tab.wait_for(f"{STATUS} === 'success'", timeout=15)
        assert await tab.evaluate("document.querySelectorAll('#qr').length") == 0


async def test_sdk_opens_the_page_in_a_modal_and_reports_success(
    browser: Browser,
    gateway: Gateway,
    bakong: SimulatedBakong,
    receiver: Receiver,
    aiohttp_server: Any,
) -> None:
    site = await shop(aiohttp_server, gateway)
    made = await khqr(gateway, receiver)
    async with browser.tab() as tab:
        await tab.navigate(f"{site}/checkout?pay={quote(made['payUrl'], safe='')}")
        frame = "document.querySelector('iframe')"
        await tab.wait_for(f"{frame} && {frame}.src === {json.dumps(made['payUrl'])}")
        # A message that is not from the page in our frame is ignored, whatever it says.
        await tab.evaluate(
            "window.postMessage({type: 'khqr:status', status: 'success', jobId: 'forged'}, '*')"
        )
        await tab.evaluate("new Promise(r => setTimeout(r, 300))")
        assert await tab.evaluate("window.outcome") == []
        # Let the framed page connect its live status before the payment lands.
        await tab.evaluate("new Promise(r => setTimeout(r, 700))")

        bakong.pay(made["md5"], **PAY)
        outcome = await tab.wait_for("window.outcome.length >= 2 && window.outcome")
        assert outcome == [
            ["success", "success", made["jobId"]],
            ["close", "success", made["jobId"]],
        ]
        assert await tab.evaluate(f"{frame} === null"), "the modal closed itself"
        assert await tab.evaluate("location.pathname") == "/checkout", "the shop page stayed"
        assert_clean(tab)


async def test_sdk_reports_failure(
    browser: Browser,
    gateway: Gateway,
    bakong: SimulatedBakong,
    receiver: Receiver,
    aiohttp_server: Any,
) -> None:
    site = await shop(aiohttp_server, gateway)
    made = await khqr(gateway, receiver)
    async with browser.tab() as tab:
        await tab.navigate(f"{site}/checkout?pay={quote(made['payUrl'], safe='')}")
        await tab.wait_for("document.querySelector('iframe') !== null")
        await tab.evaluate("new Promise(r => setTimeout(r, 700))")
        bakong.fail(made["md5"])
        outcome = await tab.wait_for("window.outcome.length >= 1 && window.outcome")
        assert outcome[0] == ["failure", "failed", made["jobId"]]


def dashboard_problems(tab: Any) -> list[str]:
    """What went wrong in a dashboard tab but the answers it asks for on purpose: 401 before
    a key is given (how it knows to ask), and 403 to the app list from a key that is not an
    admin's (how it knows to show no app picker)."""
    return [
        p
        for p in tab.problems()
        if "401" not in p and "favicon" not in p and not ("403" in p and "/api/v1/apps" in p)
    ]


async def test_dashboard_lists_transactions_and_its_retry_button_sends_again(
    browser: Browser,
    make_gateway: Any,
    bakong: SimulatedBakong,
    receiver: Receiver,
) -> None:
    key = "dashboard-key-" + "k" * 20
    gw = await make_gateway(api_keys=(key,))
    receiver.statuses = [410]  # the receiver refuses once: the delivery fails at once
    status, created = await gw.post(
        "/api/v1/transactions",
        {"md5": "ab" * 16, "webhookUrl": receiver.url, "metadata": {"note": "<b>x</b>"}},
    )
    assert status == 201
    status, pending = await gw.post(
        "/api/v1/transactions", {"md5": "cd" * 16, "webhookUrl": receiver.url}
    )
    bakong.pay(created["md5"])
    await receiver.wait_for(1)
    async with browser.tab() as tab:
        await tab.navigate(str(gw.client.make_url("/queue")))
        await tab.wait_for("!document.getElementById('login').hidden")
        await tab.evaluate(
            f"document.getElementById('key').value = {json.dumps(key)};"
            "document.getElementById('login').requestSubmit()"
        )
        job = json.dumps(created["jobId"])
        await tab.wait_for(f"document.getElementById('recent').textContent.includes({job})")
        pending_table = "document.getElementById('pending').textContent"
        assert pending["jobId"] in await tab.evaluate(pending_table)
        # Metadata is shown as text, never as markup.
        assert await tab.evaluate("document.querySelector('#pending b') === null")
        button = "document.querySelector('#attention button[data-delivery]')"
        await tab.wait_for(f"!!{button}", timeout=10)
        await tab.evaluate(f"{button}.click()")
        await receiver.wait_for(2)
        assert await tab.evaluate("sessionStorage.length") == 1, "the key stays in this tab"
        problems = dashboard_problems(tab)
        assert problems == []
    assert receiver.received[1].headers["webhook-id"] == receiver.received[0].headers["webhook-id"]


async def test_dashboard_asks_for_a_key_without_an_error_until_one_is_refused(
    browser: Browser, make_gateway: Any
) -> None:
    gw = await make_gateway(api_keys=("dashboard-key-" + "k" * 20,))
    error = "document.getElementById('error')"
    async with browser.tab() as tab:
        await tab.navigate(str(gw.client.make_url("/queue")))
        await tab.wait_for("!document.getElementById('login').hidden")
        # Every request of the first refresh has been answered 401 by now.
        await tab.evaluate("new Promise(r => setTimeout(r, 500))")
        assert await tab.evaluate(f"{error}.hidden"), await tab.evaluate(f"{error}.textContent")
        await tab.evaluate(
            "document.getElementById('key').value = 'not-the-key';"
            "document.getElementById('login').requestSubmit()"
        )
        shown = await tab.wait_for(f"!{error}.hidden && {error}.textContent")
        assert "refused" in shown
        assert await tab.evaluate("!document.getElementById('login').hidden"), "asked again"


async def test_a_401_to_a_request_sent_before_the_key_does_not_forget_the_key(
    browser: Browser, make_gateway: Any
) -> None:
    """The first refresh, sent with no key, is answered 401 six times; the page asks for a
    key at the first. A 401 that arrives after the key was given (a slow answer) says nothing
    of that key: the key stays, the dashboard stays."""
    key = "dashboard-key-" + "k" * 20
    gw = await make_gateway(api_keys=(key,))
    async with browser.tab() as tab:
        # Hold the first refresh's hourly request, to answer it late.
        await tab.send("Fetch.enable", patterns=[{"urlPattern": "*/api/v1/reports/hourly*"}])
        await tab.navigate(str(gw.client.make_url("/queue")))
        await tab.wait_for("!document.getElementById('login').hidden")
        held = await _paused(tab, with_key=False)
        await tab.evaluate(
            f"document.getElementById('key').value = {json.dumps(key)};"
            "document.getElementById('login').requestSubmit()"
        )
        # Every request sent with the key goes on (a refresh may fail, on a 503 of stats
        # before the figures were first read, and the next one is needed).
        deadline = time.monotonic() + 15
        while not await tab.evaluate("!document.getElementById('main').hidden"):
            assert time.monotonic() < deadline, "the dashboard never opened"
            with contextlib.suppress(AssertionError):
                keyed = await _paused(tab, with_key=True, timeout=0.5)
                await tab.send("Fetch.continueRequest", requestId=keyed)
        unauthorized = json.dumps({"error": {"code": "unauthorized", "message": "no key"}})
        await tab.send(
            "Fetch.fulfillRequest",
            requestId=held,
            responseCode=401,
            responseHeaders=[{"name": "Content-Type", "value": "application/json"}],
            body=base64.b64encode(unauthorized.encode()).decode(),
        )
        await tab.send("Fetch.disable")
        await tab.evaluate("new Promise(r => setTimeout(r, 300))")
        assert await tab.evaluate("sessionStorage.length") == 1, "the key was forgotten"
        assert await tab.evaluate("document.getElementById('login').hidden"), "asked again"
        assert await tab.evaluate("document.getElementById('error').hidden")


async def _paused(tab: Tab, *, with_key: bool, timeout: float = 10) -> str:
    """The id of the next request the tab holds, sent with an Authorization or without."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in list(tab.events):
            if event.get("method") != "Fetch.requestPaused":
                continue
            headers = {k.lower() for k in event["params"]["request"]["headers"]}
            if ("authorization" in headers) == with_key:
                tab.events.remove(event)
                return str(event["params"]["requestId"])
        await tab.evaluate("1")  # events arrive while a command waits
        await asyncio.sleep(0.05)
    raise AssertionError("no request was held")


async def test_an_open_dashboard_takes_an_admin_key_for_its_app_picker(
    browser: Browser, make_gateway: Any
) -> None:
    """With no API_KEY the dashboard opens without asking (the default app is open), yet an
    admin needs to give a key for the picker: a button asks for one."""
    from khqr_gateway.apps import store as apps

    admin = "dashboard-admin-" + "a" * 20
    gw = await make_gateway(admin_api_keys=(admin,))
    _, shop_key, webhook_secret = await apps.create(gw.service.pool, "Noodle Bar")
    secret(shop_key.key)
    secret(webhook_secret)
    async with browser.tab() as tab:
        await tab.navigate(str(gw.client.make_url("/queue")))
        await tab.wait_for("!document.getElementById('main').hidden")
        assert await tab.evaluate("document.getElementById('app-picker').hidden")
        await tab.wait_for("!document.getElementById('use-key').hidden")
        await tab.click("#use-key")
        await tab.wait_for("!document.getElementById('login').hidden")
        await tab.evaluate(
            f"document.getElementById('key').value = {json.dumps(admin)};"
            "document.getElementById('login').requestSubmit()"
        )
        await tab.wait_for("!document.getElementById('app-picker').hidden")
        names = await tab.evaluate("[...document.getElementById('app').options].map(o => o.text)")
        assert "Noodle Bar" in names
        assert await tab.evaluate("document.getElementById('use-key').hidden")
        assert dashboard_problems(tab) == []


async def test_an_admin_key_picks_the_app_the_dashboard_shows(
    browser: Browser, make_gateway: Any, receiver: Receiver
) -> None:
    from khqr_gateway.apps import store as apps

    admin = "dashboard-admin-" + "a" * 20
    gw = await make_gateway(api_keys=("dashboard-key-" + "k" * 20,), admin_api_keys=(admin,))
    shop, shop_key, webhook_secret = await apps.create(gw.service.pool, "Noodle Bar")
    secret(shop_key.key)
    secret(webhook_secret)
    resp = await gw.client.post(
        "/api/v1/transactions",
        json={"md5": "ef" * 16, "webhookUrl": receiver.url},
        headers={"Authorization": f"Bearer {shop_key.key}"},
    )
    shops = (await resp.json())["jobId"]
    status, defaults = await gw.post(
        "/api/v1/transactions", {"md5": "12" * 16, "webhookUrl": receiver.url}
    )
    assert resp.status == 201 and status == 201
    recent = "document.getElementById('recent').textContent"
    async with browser.tab() as tab:
        await tab.navigate(str(gw.client.make_url("/queue")))
        await tab.wait_for("!document.getElementById('login').hidden")
        await tab.evaluate(
            f"document.getElementById('key').value = {json.dumps(admin)};"
            "document.getElementById('login').requestSubmit()"
        )
        # The default app first: its transaction, not the shop's.
        await tab.wait_for(f"{recent}.includes({json.dumps(defaults['jobId'])})")
        assert shops not in await tab.evaluate(recent)
        await tab.wait_for("!document.getElementById('app-picker').hidden")
        names = await tab.evaluate("[...document.getElementById('app').options].map(o => o.text)")
        assert "Noodle Bar" in names and "default" in names
        await tab.evaluate(
            f"const s = document.getElementById('app'); s.value = {json.dumps(shop.id)};"
            "s.dispatchEvent(new Event('change'))"
        )
        await tab.wait_for(f"{recent}.includes({json.dumps(shops)})")
        assert defaults["jobId"] not in await tab.evaluate(recent)


# Checkout on a phone ----------------------------------------------------------------------

ARTIFACTS = Path(__file__).parents[1] / "artifacts"
# The README's and the dashboard's picture of the page, made here: KHQR_DOCS_SCREENSHOTS=1.
DOCS_SCREENSHOT = Path(__file__).parents[2] / "khqr_gateway" / "static" / "phone-checkout.png"
PHONE = (390, 844)
PAGE_GREY = (246, 247, 249)  # the page's background around its card (pay.css)
DESKTOP = (1280, 800)


def shown(element_id: str) -> str:
    """A JS expression: the element exists and takes room on the screen."""
    return f"(e => !!e && e.getClientRects().length > 0)(document.getElementById('{element_id}'))"


async def pending_page(tab: Tab, url: str, *, phone: bool) -> None:
    await tab.viewport(*(PHONE if phone else DESKTOP), phone=phone)
    await tab.navigate(url)
    await tab.wait_for(f"{shown('save')} && {STATUS} === 'pending'")


async def saved_image(tab: Tab, downloads: Path) -> bytes:
    """Press "Save QR image" and read the PNG it saves."""
    await tab.click("#save")
    deadline = time.monotonic() + 10
    while (png := _saved(downloads)) is None:
        assert time.monotonic() < deadline, "nothing was saved"
        await asyncio.sleep(0.1)
    return png


def _saved(downloads: Path) -> bytes | None:
    done = [p for p in downloads.glob("*.png") if p.stat().st_size > 0]
    return done[0].read_bytes() if done else None


def read_qr(png: bytes) -> tuple[str, int, int]:
    """What a bank app's "scan from gallery" would read: the QR's text, and the image's size."""
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    found = zxingcpp.read_barcodes(image.convert("L"))
    assert len(found) == 1, f"{len(found)} codes in the saved image"
    return found[0].text, image.width, image.height


async def test_a_phone_opens_bakong_or_saves_a_qr_image_a_bank_app_reads(
    browser: Browser,
    gateway: Gateway,
    bakong: SimulatedBakong,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    made = await khqr(gateway, receiver, merchantName="Riverside Coffee", billNumber="INV-1042")
    async with browser.tab(downloads=tmp_path) as tab:
        await pending_page(tab, made["payUrl"], phone=True)
        assert await tab.evaluate(shown("deeplink")), "Open in Bakong, on a phone"
        assert await tab.evaluate("document.getElementById('deeplink').href") == made["deeplink"]
        assert await tab.evaluate(shown("how")), "and the line on how"
        assert await tab.evaluate("document.getElementById('bill').textContent") == (
            "Bill number INV-1042"
        )
        shot = await tab.screenshot(ARTIFACTS / "phone-pending.png")
        if os.environ.get("KHQR_DOCS_SCREENSHOTS"):
            keep(DOCS_SCREENSHOT, shot)

        text, width, height = read_qr(await saved_image(tab, tmp_path))
        assert text == made["qr"], "the saved image holds the very QR"
        assert width >= 600 and height > width
        assert (tmp_path / "khqr-INV-1042.png").exists()
        assert "saved" in await tab.evaluate("document.getElementById('note').textContent")

        # The simulated Bakong's link pays, as its app would, and comes back to the page.
        await tab.click("#deeplink")
        await tab.wait_for(
            "document.getElementById('paid') && "
            "document.getElementById('paid').textContent.startsWith('Paid 3.75 USD')"
        )
        await tab.wait_for(f"location.href === {json.dumps(made['payUrl'])}", timeout=10)
        await tab.wait_for(f"{STATUS} === 'success'", timeout=10)
        assert await tab.evaluate("document.querySelectorAll('#qr, #save, #deeplink').length") == 0
        await tab.screenshot(ARTIFACTS / "phone-paid.png")
        assert_clean(tab)


async def test_a_desktop_shows_the_qr_and_saves_it_but_no_app_link(
    browser: Browser, gateway: Gateway, receiver: Receiver, tmp_path: Path
) -> None:
    made = await khqr(gateway, receiver)
    async with browser.tab(downloads=tmp_path) as tab:
        await pending_page(tab, made["payUrl"], phone=False)
        assert await tab.evaluate(shown("qr")) and await tab.evaluate(shown("scan"))
        assert not await tab.evaluate(shown("deeplink")), "no Bakong app on a desktop"
        await tab.screenshot(ARTIFACTS / "desktop-pending.png")
        text, width, _ = read_qr(await saved_image(tab, tmp_path))
        assert text == made["qr"] and width >= 600
        assert_clean(tab)


async def test_with_no_deeplink_a_phone_can_still_save_the_qr(
    browser: Browser,
    gateway: Gateway,
    bakong: SimulatedBakong,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    bakong.state.faults = Faults(deeplink_error=True)
    made = await khqr(gateway, receiver)
    assert made["deeplink"] is None
    async with browser.tab(downloads=tmp_path) as tab:
        await pending_page(tab, made["payUrl"], phone=True)
        assert await tab.evaluate("document.getElementById('deeplink') === null")
        assert "Scan from gallery" in await tab.evaluate("document.getElementById('how').innerText")
        text, _, _ = read_qr(await saved_image(tab, tmp_path))
        assert text == made["qr"]
        assert_clean(tab)


async def test_the_page_in_khmer_and_its_switch_to_english(
    browser: Browser, gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    made = await khqr(gateway, receiver, billNumber="INV-7")
    async with browser.tab() as tab:
        await pending_page(tab, made["payUrl"] + "&lang=km", phone=True)
        assert await tab.evaluate("document.documentElement.lang") == "km"
        assert await tab.evaluate("document.getElementById('status').textContent") == (
            "កំពុងរង់ចាំការទូទាត់…"
        )
        assert await tab.evaluate("document.getElementById('save').textContent") == (
            "រក្សាទុករូបភាព QR"
        )
        assert "INV-7" in await tab.evaluate("document.getElementById('bill').textContent")
        await tab.screenshot(ARTIFACTS / "phone-km.png")
        bakong.pay(made["md5"], **PAY)
        # pay.js says it in Khmer too, from the page's own catalogue.
        await tab.wait_for(f"{STATUS} === 'success'")
        assert await tab.evaluate("document.getElementById('status').textContent") == (
            "បានទូទាត់រួចរាល់។ សូមអរគុណ!"
        )
        assert "ទៅ" in await tab.evaluate("document.getElementById('receipt').innerText")
        await tab.click("#lang-en")
        await tab.wait_for("document.documentElement.lang === 'en'")
        assert await tab.evaluate("document.getElementById('status').textContent") == (
            "Paid. Thank you!"
        )
        assert_clean(tab)


@pytest.mark.parametrize(("button", "status"), [("pay", "success"), ("fail", "failed")])
async def test_a_sandbox_page_simulates_the_payment_or_its_failure(
    browser: Browser, sandbox_gateway: Gateway, receiver: Receiver, button: str, status: str
) -> None:
    made = await khqr(sandbox_gateway, receiver)
    async with browser.tab() as tab:
        await pending_page(tab, made["payUrl"], phone=True)
        await tab.click(f"#simulate-{button}")
        await tab.wait_for(f"{STATUS} === {json.dumps(status)}")
        assert await tab.evaluate("document.querySelectorAll('#qr, #sandbox').length") == 0
        assert_clean(tab)
    done = await sandbox_gateway.wait_status(made["jobId"], status)
    if status == "success":
        assert (done["data"]["amount"], done["data"]["currency"]) == (3.75, "USD")


async def test_the_sdk_modal_is_the_card_itself_and_fills_a_phone(
    browser: Browser, gateway: Gateway, receiver: Receiver, aiohttp_server: Any
) -> None:
    site = await shop(aiohttp_server, gateway)
    made = await khqr(gateway, receiver)
    frame = "document.querySelector('iframe')"
    rect = "(e => (r => [r.left, r.top, r.right, r.bottom])(e.getBoundingClientRect()))"
    async with browser.tab() as tab:
        await tab.viewport(*DESKTOP, phone=False)
        await tab.navigate(f"{site}/checkout?pay={quote(made['payUrl'], safe='')}")
        await tab.wait_for(f"{frame} !== null")
        await tab.evaluate("new Promise(r => setTimeout(r, 1000))")  # the page drawn in it
        left, top, right, bottom = await tab.evaluate(f"{rect}({frame})")
        close = await tab.evaluate(f"{rect}(document.querySelector('[aria-label=Close]'))")
        assert left <= close[0] and close[2] <= right and top <= close[1] and close[3] <= bottom, (
            "the close control is inside the modal"
        )
        shot = Image.open(io.BytesIO(await tab.screenshot(ARTIFACTS / "sdk-desktop.png")))
        modal = shot.convert("RGB").crop((int(left), int(top), int(right), int(bottom)))
        assert PAGE_GREY not in {colour for _, colour in modal.getcolors(1 << 16) or []}, (
            "no grey frame around the card"
        )

        await tab.viewport(*PHONE, phone=True)
        await tab.evaluate("new Promise(r => setTimeout(r, 300))")
        assert await tab.evaluate(f"{rect}({frame})") == [0, 0, *PHONE], "full screen on a phone"
        await tab.screenshot(ARTIFACTS / "sdk-phone.png")
        await tab.click("[aria-label=Close]")
        await tab.wait_for(f"{frame} === null")


async def test_the_keyboard_reaches_every_control_and_shows_where_it_is(
    browser: Browser, gateway: Gateway, receiver: Receiver
) -> None:
    made = await khqr(gateway, receiver)
    async with browser.tab() as tab:
        await pending_page(tab, made["payUrl"], phone=False)
        reached = []
        for _ in range(3):
            for kind in ("keyDown", "keyUp"):
                await tab.send(
                    "Input.dispatchKeyEvent",
                    type=kind,
                    key="Tab",
                    code="Tab",
                    windowsVirtualKeyCode=9,
                )
            reached.append(
                await tab.evaluate(
                    "(e => [e.id, getComputedStyle(e).outlineStyle, e.innerText.trim() ||"
                    " e.getAttribute('aria-label')])(document.activeElement)"
                )
            )
        assert [r[0] for r in reached] == ["save", "lang-en", "lang-km"]
        assert all(r[1] != "none" for r in reached), "a visible focus ring"
        assert all(r[2] for r in reached), "each has a name"
        labels = await tab.evaluate(
            "[document.getElementById('qr').getAttribute('aria-label'),"
            " document.querySelector('nav.lang').getAttribute('aria-label')]"
        )
        assert labels == ["KHQR code of 3.75 USD to Coffee & <Tea>", "Language"]


async def test_dashboard_shows_money_retrying_webhooks_search_and_one_transaction(
    browser: Browser,
    make_gateway: Any,
    bakong: SimulatedBakong,
    receiver: Receiver,
    tmp_path: Any,
) -> None:
    key = "dashboard-key-" + "k" * 20
    # One attempt, then the next a minute away: the delivery stays retrying while we look.
    gw = await make_gateway(api_keys=(key,), webhook_retry_schedule=(60.0,))
    receiver.statuses = [500]
    _, paid = await gw.post(
        "/api/v1/transactions",
        {"md5": "ab" * 16, "webhookUrl": receiver.url, "metadata": {"orderId": "A-77"}},
    )
    _, other = await gw.post(
        "/api/v1/transactions",
        {"md5": "cd" * 16, "webhookUrl": receiver.url, "metadata": {"orderId": "B-88"}},
    )
    bakong.pay(paid["md5"], amount=3.75, currency="USD", toAccountId="shop@aclb")
    await receiver.wait_for(1)
    async with browser.tab() as tab:
        await tab.send(
            "Emulation.setDeviceMetricsOverride",
            width=1280,
            height=1400,
            deviceScaleFactor=1,
            mobile=False,
        )
        await tab.navigate(str(gw.client.make_url("/queue")))
        await tab.wait_for("!document.getElementById('login').hidden")
        await tab.evaluate(
            f"document.getElementById('key').value = {json.dumps(key)};"
            "document.getElementById('login').requestSubmit()"
        )
        retrying = "document.getElementById('attention').textContent"
        await tab.wait_for(f"{retrying}.includes({json.dumps(paid['jobId'])})")
        text = await tab.evaluate(retrying)
        assert "HTTP 500" in text and "retrying" in text, text
        assert await tab.evaluate("document.querySelector('#attention td.next').textContent")
        recent = "document.getElementById('recent').textContent"
        await tab.wait_for(f"{recent}.includes('3.75') && {recent}.includes('USD')")
        # The charts: 24 bars each; this hour's payment bar is drawn, with its tooltip.
        bars = "document.querySelectorAll('#chart-paid rect')"
        await tab.wait_for(f"{bars}.length === 24")
        assert float(await tab.evaluate(f"[...{bars}].at(-1).getAttribute('height')")) > 50
        assert "1 paid" in await tab.evaluate(f"[...{bars}].at(-1).textContent")
        # The poll lag: this hour's peak as the figures tick saw it, earlier hours had none.
        lag = "document.querySelectorAll('#chart-lag rect')"
        await tab.wait_for(f"{lag}.length === 24")
        assert "poll lag up to" in await tab.evaluate(f"[...{lag}].at(-1).textContent")
        assert "no gateway running" in await tab.evaluate(f"[...{lag}].at(0).textContent")
        assert "peak" in await tab.evaluate("document.getElementById('lag-peak').textContent")
        shot = tmp_path / "dashboard.png"
        shot.write_bytes(base64.b64decode((await tab.send("Page.captureScreenshot"))["data"]))
        # The search box asks the API's q= and shows only what it finds.
        await tab.evaluate(
            "document.getElementById('q').value = 'B-88';"
            "document.getElementById('filters').requestSubmit()"
        )
        await tab.wait_for(f"!{recent}.includes({json.dumps(paid['jobId'])})")
        assert other["jobId"] in await tab.evaluate(recent)
        # Created more than a day ago: gone from "last 24 h", back with "any time".
        await gw.service.pool.execute(
            "update transactions set created_at = now() - interval '2 days' where id = $1",
            other["jobId"],
        )
        await tab.evaluate(
            "document.getElementById('q').value = '';"
            "document.getElementById('since').value = '86400000';"
            "document.getElementById('filters').requestSubmit()"
        )
        await tab.wait_for(f"!{recent}.includes({json.dumps(other['jobId'])})")
        assert paid["jobId"] in await tab.evaluate(recent)
        await tab.evaluate(
            "document.getElementById('since').value = '';"
            "document.getElementById('filters').requestSubmit()"
        )
        await tab.wait_for(f"{recent}.includes({json.dumps(other['jobId'])})")
        await tab.evaluate(
            "document.getElementById('status').value = 'success';"
            "document.getElementById('filters').requestSubmit()"
        )
        await tab.wait_for(f"!{recent}.includes({json.dumps(other['jobId'])})")
        # One transaction: its Bakong data, metadata and every attempt.
        link = f"document.querySelector('#recent a[data-job={json.dumps(paid['jobId'])}]')"
        await tab.wait_for(f"!!{link}")
        await tab.evaluate(f"{link}.click()")
        detail = "document.getElementById('detail')"
        await tab.wait_for(f"!{detail}.hidden && {detail}.textContent.includes('HTTP 500')")
        shown = await tab.evaluate(f"{detail}.textContent")
        assert "A-77" in shown and "shop@aclb" in shown
        (tmp_path / "detail.png").write_bytes(
            base64.b64decode((await tab.send("Page.captureScreenshot"))["data"])
        )
        problems = dashboard_problems(tab)
        assert problems == []
    assert shot.stat().st_size > 10_000
