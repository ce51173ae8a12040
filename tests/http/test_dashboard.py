"""The /queue dashboard page: served with a strict CSP, off in production without a key."""

from __future__ import annotations

import io

from PIL import Image

from khqr_gateway.config import AppEnv
from tests.conftest import Gateway, GatewayFactory


async def test_dashboard_page_and_assets_are_served_with_a_strict_csp(gateway: Gateway) -> None:
    resp = await gateway.client.get("/queue")
    assert resp.status == 200
    html = await resp.text()
    assert "/queue/dashboard.js" in html
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert "<script>" not in html, "no inline script: the CSP forbids it"
    js = await gateway.client.get("/queue/dashboard.js")
    assert js.status == 200
    assert "innerHTML" not in await js.text(), "data is written with textContent only"
    assert (await gateway.client.get("/queue/../config.py")).status == 404


async def test_dashboard_is_off_in_production_without_an_api_key(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(app_env=AppEnv.PRODUCTION)
    assert (await gw.client.get("/queue")).status == 404
    keyed = await make_gateway(app_env=AppEnv.PRODUCTION, api_keys=("k" * 32,))
    assert (await keyed.client.get("/queue")).status == 200
    assert (await keyed.client.get("/api/v1/stats")).status == 401


async def test_the_root_is_a_page_that_links_the_docs_and_the_dashboard(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway()
    resp = await gw.client.get("/")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
    page = await resp.text()
    assert 'href="/reference"' in page and 'href="/queue"' in page
    assert "walk-through" not in page, "the walk-through needs sandbox mode"
    off = await make_gateway(app_env=AppEnv.PRODUCTION)
    assert 'href="/queue"' not in await (await off.client.get("/")).text()


async def test_the_root_shows_the_walk_through_in_sandbox_mode(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(
        app_env=AppEnv.DEVELOPMENT, bakong_base_url=None, bakong_token=None, run_ticks=False
    )
    page = await (await gw.client.get("/", headers={"Host": 'x"><script>'})).text()
    base = str(gw.client.make_url("")).rstrip("/")
    assert "walk-through" in page
    assert f"{base}/sandbox/control/inbox/demo" in await (await gw.client.get("/")).text()
    assert "<script>" not in page, "the Host header is written as text"


async def test_dashboard_shows_the_payment_page_on_a_phone(gateway: Gateway) -> None:
    """What customers see, as the test suite's browser took it (tests/scenarios/test_browser.py)."""
    html = await (await gateway.client.get("/queue")).text()
    assert '<img src="/queue/phone-checkout.png"' in html
    resp = await gateway.client.get("/queue/phone-checkout.png")
    assert resp.status == 200
    assert resp.content_type == "image/png"
    image = Image.open(io.BytesIO(await resp.read()))
    assert image.format == "PNG" and image.height > image.width, "a phone, upright"
