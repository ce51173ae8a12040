"""Pages for people: `/` (where to go first) and the /queue dashboard, whose data comes
from the API with the key."""

from __future__ import annotations

import html

from aiohttp import web
from aiohttp_apigami import docs

from khqr_gateway import __version__
from khqr_gateway.config import Settings
from khqr_gateway.http import SETTINGS_KEY, assets
from khqr_gateway.http.errors import ApiError
from khqr_gateway.http.openapi import ERROR

ASSETS = {
    "dashboard.js": "application/javascript",
    "dashboard.css": "text/css",
    # The payment page on a phone, as tests/test_browser.py's Chromium took it.
    "phone-checkout.png": "image/png",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def enabled(settings: Settings) -> bool:
    # Without a key the dashboard would show payments to anyone: off in production.
    # ADMIN_API_KEY alone is not enough: the default app is open then, its payments too.
    return not (settings.production and not settings.api_keys)


def _check_enabled(request: web.Request) -> None:
    if not enabled(request.app[SETTINGS_KEY]):
        raise ApiError(404, "not_found", "the dashboard is off in production without API_KEY")


@docs(
    tags=["operations"],
    summary="Dashboard page: queues, pending transactions, failed deliveries",
    responses={
        200: {"description": "HTML page", "content": {"text/html": {}}},
        404: {"description": "Off: production without API_KEY", **ERROR},
    },
)
async def dashboard(request: web.Request) -> web.Response:
    _check_enabled(request)
    return web.Response(
        body=assets.read("dashboard.html"),
        headers=assets.page_headers("text/html; charset=utf-8", CSP),
    )


@docs(
    tags=["operations"],
    summary="Dashboard script and stylesheet",
    responses={
        200: {"description": "Static asset"},
        404: {"description": "No such asset, or the dashboard is off", **ERROR},
    },
)
async def asset(request: web.Request) -> web.Response:
    _check_enabled(request)
    name = request.match_info["name"]
    if name not in ASSETS:
        raise ApiError(404, "not_found", "no such asset")
    return web.Response(body=assets.read(name), headers=assets.page_headers(ASSETS[name], CSP))


HOME_CSP = "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
HOME = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>khqr-gateway</title></head>
<body>
<h1>khqr-gateway {version}</h1>
<p>Watches Bakong KHQR payments and tells your backend by signed webhook when they succeed,
fail or time out.</p>
<ul>
<li><a href="/reference">API docs</a> (<a href="/openapi.json">OpenAPI document</a>)</li>
<li>{dashboard}</li>
<li><a href="/health">/health</a>, <a href="/ready">/ready</a>, <a href="/metrics">/metrics</a></li>
</ul>
{sandbox}</body>
</html>
"""
WALK_THROUGH = """<h2>Sandbox mode: the README's walk-through</h2>
<p>Payments are checked against the simulated Bakong at <code>/sandbox</code>; its state is
in memory and lost on restart. In a terminal:</p>
<pre>
# 1. Track a payment; its webhook goes to the sandbox's test inbox.
MD5=$(python3 -c "import secrets; print(secrets.token_hex(16))")
curl -s {base}/api/v1/transactions -H 'content-type: application/json' \\
  -d "{{\\"md5\\":\\"$MD5\\",\\"webhookUrl\\":\\"{base}/sandbox/control/inbox/demo\\"}}"

# 2. The customer pays: mark the md5 paid in the simulated Bakong.
curl -s -X POST {base}/sandbox/control/transactions/$MD5/pay

# 3. Within one poll interval the webhook arrives:
curl -s {base}/sandbox/control/inbox/demo
</pre>
"""


def _base_url(request: web.Request) -> str:
    public = request.app[SETTINGS_KEY].public_url
    return public.rstrip("/") if public else str(request.url.origin())


@docs(
    tags=["operations"],
    summary="Where to go first: links to the API docs and the dashboard",
    description="A small HTML page; in sandbox mode it also shows the walk-through.",
    responses={200: {"description": "HTML page", "content": {"text/html": {}}}},
)
async def home(request: web.Request) -> web.Response:
    """GET /: links to /reference and /queue, and the walk-through in sandbox mode."""
    settings = request.app[SETTINGS_KEY]
    dashboard = (
        '<a href="/queue">Dashboard</a>: queues, pending transactions, failed deliveries'
        if enabled(settings)
        else "Dashboard: off in production without API_KEY"
    )
    base = html.escape(_base_url(request), quote=True)
    page = HOME.format(
        version=__version__,
        dashboard=dashboard,
        sandbox=WALK_THROUGH.format(base=base) if settings.sandbox else "",
    )
    return web.Response(
        text=page, headers=assets.page_headers("text/html; charset=utf-8", HOME_CSP)
    )
