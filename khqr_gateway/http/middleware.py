"""The middlewares every request goes through: its log line and the error shape (the API
key's is in `auth`)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping

import asyncpg
from aiohttp import web
from redis.exceptions import RedisClusterException, RedisError

from khqr_gateway.bakong.sandbox import MOUNT_PATH
from khqr_gateway.http import REQUEST_ID
from khqr_gateway.http.errors import ApiError, error_response
from khqr_gateway.http.request import BODY_LIMIT
from khqr_gateway.notices.sandbox import redact_token

log = logging.getLogger("khqr_gateway.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[..., Awaitable[web.StreamResponse]]
# How the routes that answer errors in another shape answer them, by their canonical path.
ErrorShape = Callable[[ApiError], web.Response]
ErrorShapes = Mapping[str, ErrorShape]
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


def error_middleware(shapes: ErrorShapes) -> Middleware:
    """Every error as `{"error": {...}}` (or in the shape of its route); never a stack trace
    to the client."""

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return _answer(request, shapes, exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _http_error(exc)
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:
            # In the route's shape too: a client of the compat routes reads `name` on a 503.
            return _answer(request, shapes, _unexpected(request, exc))

    return errors


def _shape_of(request: web.Request, shapes: ErrorShapes) -> ErrorShape | None:
    # Also for the middlewares' own refusals (a missing API key, a rate limit).
    resource = request.match_info.route.resource
    return None if resource is None else shapes.get(resource.canonical)


def _http_error(exc: web.HTTPException) -> web.Response:
    code = _STATUS_CODES.get(exc.status, "http_error")
    message = exc.reason if exc.status != 413 else f"the body is larger than {BODY_LIMIT} bytes"
    return error_response(exc.status, code, message, headers=_kept_headers(exc))


def _answer(request: web.Request, shapes: ErrorShapes, exc: ApiError) -> web.Response:
    shape = _shape_of(request, shapes)
    if shape is not None:
        return shape(exc)
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


def _unexpected(request: web.Request, exc: Exception) -> ApiError:
    dependency = unavailable_dependency(exc)
    if dependency is not None:
        name = type(exc).__name__
        log.warning("%s unavailable: %s", dependency, name, extra={"path": request.path})
        return ApiError(
            503,
            f"{dependency}_unavailable",
            f"{dependency.capitalize()} is unavailable; nothing was lost, retry shortly",
            headers={"Retry-After": "5"},
        )
    log.exception(
        "unhandled error", extra={"path": request.path, "requestId": request.get(REQUEST_ID)}
    )
    return ApiError(500, "internal_error", "something went wrong on our side")


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
