"""The /queue dashboard: static page and assets; its data comes from the API with the key."""

from __future__ import annotations

from aiohttp import web
from aiohttp_apigami import docs

from khqr_gateway.api import assets
from khqr_gateway.api.errors import ApiError
from khqr_gateway.api.openapi import ERROR
from khqr_gateway.config import Settings

SETTINGS = web.AppKey("dashboard_settings", Settings)
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


def _check_enabled(request: web.Request) -> None:
    settings = request.app[SETTINGS]
    if settings.production and not settings.api_keys:
        # Without a key the dashboard would show payments to anyone: off in production.
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


def add_routes(app: web.Application, settings: Settings) -> None:
    app[SETTINGS] = settings
    app.router.add_get("/queue", dashboard)
    app.router.add_get("/queue/{name}", asset)
