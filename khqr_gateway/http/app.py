"""The aiohttp application: middlewares (request log, errors, auth), routes, lifecycle."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
from aiohttp import web
from redis.exceptions import RedisClusterException, RedisError

from khqr_gateway.bakong.sandbox import MOUNT_PATH, Expectations, create_sandbox_app
from khqr_gateway.config import Settings
from khqr_gateway.http import (
    API_KEY_ID,
    REQUEST_ID,
    compat,
    credentials,
    dashboard,
    deliveries,
    exports,
    khqr,
    live,
    notices,
    ops,
    pay,
    transactions,
)
from khqr_gateway.http.errors import ApiError, error_response
from khqr_gateway.http.openapi import setup_openapi
from khqr_gateway.infra.keys import keys, sub_key
from khqr_gateway.notices.sandbox import create_bot_sandbox_app, redact_token
from khqr_gateway.service import SERVICE_KEY, Service
from khqr_gateway.transactions import store as tx_store

log = logging.getLogger("khqr_gateway.http")

BODY_LIMIT = 64 * 1024
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SETTINGS_KEY = web.AppKey("settings", Settings)
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


def _request_id(request: web.Request) -> str:
    given = request.headers.get("x-request-id", "")
    if 0 < len(given) <= 128 and given.isprintable():
        return given
    # Only has to tell requests apart in the logs: not a secret, so not os.urandom per request.
    return f"{random.getrandbits(64):016x}"


@web.middleware
async def request_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One log line per request, and the request id echoed back."""
    request_id = _request_id(request)
    request[REQUEST_ID] = request_id
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        response.headers["x-request-id"] = request_id
        return response
    finally:
        level = _request_level(request.path)
        if level is not None and log.isEnabledFor(level):
            log.log(
                level,
                "request",
                extra={
                    "method": request.method,
                    # A Bot API path (the sandbox's, or a mistaken one) holds a bot token.
                    "path": redact_token(request.path),
                    "status": status,
                    "durationMs": round((time.perf_counter() - start) * 1000, 2),
                    "requestId": request_id,
                },
            )


def _request_level(path: str) -> int | None:
    # Probes and scrapes would drown the requests that users make, and so would the
    # in-process sandbox's own polls (a third of the lines in sandbox mode): at debug.
    if path in ("/health", "/metrics"):
        return None
    return logging.DEBUG if path.startswith(MOUNT_PATH + "/") else logging.INFO


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as `{"error": {...}}`; never a stack trace to the client."""
    try:
        return await handler(request)
    except ApiError as exc:
        if compat.is_compat(request):
            return compat.compat_error(exc)
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _STATUS_CODES.get(exc.status, "http_error")
        message = exc.reason if exc.status != 413 else f"the body is larger than {BODY_LIMIT} bytes"
        return error_response(exc.status, code, message, headers=_kept_headers(exc))
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise
    except Exception as exc:
        dependency = unavailable_dependency(exc)
        if dependency is not None:
            name = type(exc).__name__
            log.warning("%s unavailable: %s", dependency, name, extra={"path": request.path})
            return error_response(
                503,
                f"{dependency}_unavailable",
                f"{dependency.capitalize()} is unavailable; nothing was lost, retry shortly",
                headers={"Retry-After": "5"},
            )
        log.exception(
            "unhandled error", extra={"path": request.path, "requestId": request.get(REQUEST_ID)}
        )
        return error_response(500, "internal_error", "something went wrong on our side")


def unavailable_dependency(exc: BaseException) -> str | None:
    """'postgres' or 'redis' when `exc` means that dependency cannot be reached."""
    if isinstance(exc, RedisError | RedisClusterException):  # the latter: no node answers
        return "redis"
    if isinstance(
        exc,
        asyncpg.exceptions.ConnectionDoesNotExistError
        | asyncpg.exceptions.CannotConnectNowError
        | asyncpg.exceptions.TooManyConnectionsError
        | asyncpg.exceptions.AdminShutdownError
        | asyncpg.exceptions.InterfaceError
        | ConnectionError
        | OSError
        | TimeoutError,
    ):
        return "postgres"
    return None


def _kept_headers(exc: web.HTTPException) -> dict[str, str]:
    return {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}


def _key_digests(keys: tuple[str, ...]) -> list[bytes]:
    return [hashlib.sha256(k.encode()).digest() for k in keys]


def auth_middleware(settings: Settings) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Every /api/ route needs one of API_KEY's keys, compared as hashes in constant time."""
    digests = _key_digests(settings.api_keys)

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not digests or not request.path.startswith("/api/"):
            return await handler(request)
        given = _presented_key(request)
        digest = hashlib.sha256(given.encode()).digest() if given else b""
        matched = -1
        for index, expected in enumerate(digests):
            if hmac.compare_digest(digest, expected):
                matched = index
        if matched < 0:
            raise ApiError(
                401, "unauthorized", "a valid API key is required (Authorization: Bearer <key>)"
            )
        key_id = digests[matched].hex()[:16]
        request[API_KEY_ID] = key_id
        if settings.api_rate_limit:
            await _rate_limit(request, key_id, settings.api_rate_limit)
        return await handler(request)

    return auth


# KEYS[1] this key's counter for this second; returns the count so far.
_COUNT = (
    "local n = redis.call('INCR', KEYS[1]) "
    "if n == 1 then redis.call('PEXPIRE', KEYS[1], 2000) end return n"
)


async def _rate_limit(request: web.Request, key_id: str, limit: int) -> None:
    """At most `limit` requests a second per API key, counted in Redis across processes."""
    service = request.app[SERVICE_KEY]
    second = int(time.time())
    counter = sub_key(keys(service.settings.redis_namespace)["api_rate"], key_id, second)
    try:
        count = int(await service.redis.eval(_COUNT, 1, counter))
    except RedisError:
        return  # no Redis, no counting: the request itself will say what is down
    if count > limit:
        raise ApiError(
            429,
            "rate_limited",
            f"more than {limit} requests a second with this API key",
            headers={"Retry-After": "1"},
        )


def _presented_key(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.headers.get("x-api-key", "").strip()


def create_app(
    settings: Settings,
    *,
    database_url: str,
    redis_url: str,
    bakong_url: str | None = None,
    run_ticks: bool = True,
) -> web.Application:
    """The gateway as an aiohttp application; the service starts with the app."""
    app = web.Application(
        client_max_size=BODY_LIMIT,
        middlewares=[request_log, errors, auth_middleware(settings)],
    )
    app[SETTINGS_KEY] = settings
    if settings.sandbox:
        # Before the sandbox's own mount, whose prefix would take its paths.
        app.add_subapp(MOUNT_PATH + "/telegram", create_bot_sandbox_app())
        app.add_subapp(MOUNT_PATH, create_sandbox_app(expectations=_expectations(app)))
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

    app.cleanup_ctx.append(lifecycle)
    ops.add_routes(app)
    transactions.add_routes(app, before_job_id=exports.add_routes)
    credentials.add_routes(app)
    live.add_routes(app)
    compat.add_routes(app)
    khqr.add_routes(app)
    pay.add_routes(app)
    deliveries.add_routes(app)
    notices.add_routes(app)
    dashboard.add_routes(app, settings)
    setup_openapi(app)
    return app


def _expectations(app: web.Application) -> Expectations:
    """What the mounted sandbox pays by default: what the md5's transaction expects."""

    async def expected(md5: str) -> dict[str, str]:
        found = await tx_store.expected_of(app[SERVICE_KEY].pool, md5)
        return found.to_json() if found else {}

    return expected


def _bakong_url(settings: Settings) -> str:
    if not settings.sandbox:
        return settings.bakong_url
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return f"http://{host}:{settings.port}{MOUNT_PATH}"
