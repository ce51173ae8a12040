"""The aiohttp application: its factory, its routes and its lifecycle."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from khqr_gateway.bakong.sandbox import MOUNT_PATH, Expectations, create_sandbox_app
from khqr_gateway.config import Settings
from khqr_gateway.http import (
    SETTINGS_KEY,
    apps,
    compat,
    credentials,
    dashboard,
    deliveries,
    exports,
    khqr,
    notices,
    ops,
    pay,
    sse,
    transactions,
)
from khqr_gateway.http.auth import auth_middleware
from khqr_gateway.http.middleware import error_middleware, request_log
from khqr_gateway.http.openapi import setup_openapi
from khqr_gateway.http.request import BODY_LIMIT
from khqr_gateway.notices.sandbox import create_bot_sandbox_app
from khqr_gateway.service import SERVICE_KEY, Service
from khqr_gateway.transactions import store as tx_store

log = logging.getLogger("khqr_gateway.http")

Route = tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]
# The routes of rachhen/khqr-webhook: they answer errors in that service's shape.
COMPAT_ROUTES: tuple[Route, ...] = (
    ("POST", "/api/v1/transaction/token", compat.create_with_token),
    ("POST", "/api/v1/transaction/email", compat.create_with_email),
    ("GET", "/api/v1/transaction/{md5}/md5", compat.get_by_md5),
    ("GET", "/api/v1/transaction/{jobId}/track", compat.track),
)
# Matched in this order: the export and the reports before /api/v1/transactions/{jobId},
# which would take `export` for a jobId. /openapi.json lists each tag's paths in this order.
ROUTES: tuple[Route, ...] = (
    ("GET", "/health", ops.health),
    ("GET", "/ready", ops.ready),
    ("GET", "/metrics", ops.metrics),
    ("GET", "/api/v1/stats", ops.stats),
    ("POST", "/api/v1/transactions", transactions.post_transaction),
    ("GET", "/api/v1/transactions", transactions.list_transactions),
    ("GET", "/api/v1/transactions/export", exports.export_transactions),
    ("GET", "/api/v1/reports/daily", exports.daily_report),
    ("GET", "/api/v1/reports/hourly", exports.hourly_report),
    ("GET", "/api/v1/transactions/{jobId}", transactions.get_transaction),
    ("DELETE", "/api/v1/transactions/{jobId}", transactions.delete_transaction),
    ("GET", "/api/v1/credentials", credentials.list_credentials),
    ("POST", "/api/v1/credentials", credentials.post_credential),
    ("GET", "/api/v1/transactions/{jobId}/events", transactions.transaction_events),
    ("POST", "/api/v1/apps", apps.post_app),
    ("GET", "/api/v1/apps", apps.list_apps),
    ("GET", "/api/v1/apps/{appId}", apps.get_app),
    ("PATCH", "/api/v1/apps/{appId}", apps.patch_app),
    ("DELETE", "/api/v1/apps/{appId}", apps.delete_app),
    ("POST", "/api/v1/apps/{appId}/keys", apps.post_key),
    ("GET", "/api/v1/apps/{appId}/keys", apps.list_keys),
    ("DELETE", "/api/v1/apps/{appId}/keys/{keyId}", apps.delete_key),
    ("POST", "/api/v1/apps/{appId}/webhook-secret", apps.post_webhook_secret),
    ("GET", "/api/v1/app", apps.get_own_app),
    *COMPAT_ROUTES,
    ("POST", "/api/v1/khqr", khqr.post_khqr),
    ("GET", "/pay/{jobId}", pay.pay_page),
    ("GET", "/pay/{jobId}/events", pay.pay_events),
    ("GET", "/static/{name}", pay.asset),
    ("GET", "/sdk.js", pay.sdk),
    ("GET", "/api/v1/deliveries", deliveries.list_deliveries),
    ("POST", "/api/v1/deliveries/retry", deliveries.retry_deliveries),
    ("GET", "/api/v1/deliveries/{id}", deliveries.get_delivery),
    ("POST", "/api/v1/deliveries/{id}/retry", deliveries.retry_delivery),
    ("GET", "/api/v1/notices", notices.list_notices),
    ("GET", "/", dashboard.home),
    ("GET", "/queue", dashboard.dashboard),
    ("GET", "/queue/{name}", dashboard.asset),
)


def create_app(
    settings: Settings,
    *,
    database_url: str,
    redis_url: str,
    bakong_url: str | None = None,
    run_ticks: bool = True,
) -> web.Application:
    """The gateway as an aiohttp application; the service starts with the app."""
    shapes = {path: compat.compat_error for _, path, _ in COMPAT_ROUTES}
    app = web.Application(
        client_max_size=BODY_LIMIT,
        middlewares=[request_log, error_middleware(shapes), auth_middleware(settings)],
    )
    app[SETTINGS_KEY] = settings
    app[exports.EXPORT_SLOTS] = asyncio.Semaphore(exports.EXPORTS_AT_ONCE)
    app[exports.EXPORTING] = set()
    if settings.sandbox:
        # Before the sandbox's own mount, whose prefix would take its paths.
        app.add_subapp(MOUNT_PATH + "/telegram", create_bot_sandbox_app())
        app.add_subapp(MOUNT_PATH, create_sandbox_app(expectations=_expectations(app)))
    app.cleanup_ctx.append(_lifecycle(settings, database_url, redis_url, bakong_url, run_ticks))
    for method, path, handler in ROUTES:
        if method == "GET":
            app.router.add_get(path, handler)
        else:
            app.router.add_route(method, path, handler)
    app.on_shutdown.append(sse.close_streams)
    setup_openapi(app)
    return app


def _lifecycle(
    settings: Settings,
    database_url: str,
    redis_url: str,
    bakong_url: str | None,
    run_ticks: bool,
) -> Callable[[web.Application], AsyncIterator[None]]:
    url = bakong_url or _bakong_url(settings)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        service = await Service.create(
            settings, database_url=database_url, redis_url=redis_url, bakong_url=url
        )
        app[SERVICE_KEY] = service
        if settings.sandbox:
            log.warning(
                "SANDBOX MODE: checking payments against the simulated Bakong at %s; "
                "set BAKONG_TOKEN or BAKONG_EMAIL to use the real one",
                url,
            )
        if run_ticks:
            service.start_ticks()
        yield
        await service.stop()

    return lifecycle


def _expectations(app: web.Application) -> Expectations:
    """What the mounted sandbox pays by default: what the md5's transaction expects."""

    async def expected(md5: str) -> dict[str, str]:
        # Bakong knows nothing of apps: an md5 tracked by two apps is paid as one expects.
        found = await tx_store.expected_of(app[SERVICE_KEY].pool, None, md5)
        return found.to_json() if found else {}

    return expected


def _bakong_url(settings: Settings) -> str:
    if not settings.sandbox:
        return settings.bakong_url
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return f"http://{host}:{settings.port}{MOUNT_PATH}"
