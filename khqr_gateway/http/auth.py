"""Who a request to /api/ acts for, and how often it may: the middleware that finds the
caller's app from its key, and counts its requests.

- A key of `ADMIN_API_KEY` may call every route; it acts for the app its `Khqr-App` header
  names (the default app without one). Only such a key may call the app routes.
- A key of `API_KEY` acts for the default app; with no `API_KEY` the default app is open.
- A key made for an app (`kgw_...`) acts for its app, found through the process's cache.
Keys of the environment are compared as hashes in constant time, every one of them.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from redis.exceptions import RedisError

from khqr_gateway.apps.model import DEFAULT_APP_ID, KEY_ID_PREFIX, OPEN, Caller, looks_like_key
from khqr_gateway.config import Settings
from khqr_gateway.http import CALLER
from khqr_gateway.http.errors import ApiError
from khqr_gateway.service import SERVICE_KEY

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[..., Awaitable[web.StreamResponse]]
APP_HEADER = "Khqr-App"
# The app routes: an admin key's only.
ADMIN_PATH = "/api/v1/apps"
UNAUTHORIZED = "a valid API key is required (Authorization: Bearer <key>)"
# Made keys that find nothing, per client address and second, before its next ones are not
# looked up (each costs a query): guessing keys, or a flood of made-up ones, is 429.
WRONG_KEYS_PER_S = 20
WRONG_KEYS_TRACKED = 10_000


class WrongKeys:
    """How many unknown made keys each client address presented this second (this process)."""

    def __init__(self) -> None:
        self._second = 0
        self._counts: dict[str, int] = {}

    def _now(self) -> int:
        second = int(time.time())
        if second != self._second or len(self._counts) > WRONG_KEYS_TRACKED:
            self._second, self._counts = second, {}
        return second

    def too_many(self, address: str) -> bool:
        self._now()
        return self._counts.get(address, 0) >= WRONG_KEYS_PER_S

    def add(self, address: str) -> None:
        self._now()
        self._counts[address] = self._counts.get(address, 0) + 1


def auth_middleware(settings: Settings) -> Middleware:
    """Every /api/ route acts for the app of its caller's key; 401 without a valid one."""
    default_keys = _digests(settings.api_keys)
    admin_keys = _digests(settings.admin_api_keys)
    wrong = WrongKeys()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/api/"):
            return await handler(request)
        caller = await _caller(request, default_keys, admin_keys, wrong)
        if _admin_route(request.path) and not caller.admin:
            _refuse_admin(caller, admin_keys)
        request[CALLER] = caller
        # The open default app (no API_KEY) is not counted, as before apps: nothing tells
        # its callers apart. Admin keys are the operator's own.
        if caller.key_id is not None and not caller.admin:
            limit = (caller.app.rate_limit if caller.app else None) or settings.api_rate_limit
            if limit:
                await _rate_limit(request, caller.app_id, limit)
        return await handler(request)

    return auth


def _digests(keys: Sequence[str]) -> list[bytes]:
    return [hashlib.sha256(k.encode()).digest() for k in keys]


def _matched(digest: bytes, expected: list[bytes]) -> bytes | None:
    found = None
    # Every key compared, so that the time taken says nothing of which one matched.
    for candidate in expected:
        if hmac.compare_digest(digest, candidate):
            found = candidate
    return found


async def _caller(
    request: web.Request, default_keys: list[bytes], admin_keys: list[bytes], wrong: WrongKeys
) -> Caller:
    given = _presented_key(request)
    digest = hashlib.sha256(given.encode()).digest() if given else b""
    admin = _matched(digest, admin_keys) if given else None
    if admin is not None:
        return await _admin_caller(request, "admin:" + admin.hex()[:16])
    default = _matched(digest, default_keys) if given else None
    if default is not None:
        return Caller(DEFAULT_APP_ID, "env:" + default.hex()[:16])
    if looks_like_key(given):
        # A made key that is not (or no longer) valid never falls back to the open default
        # app: its requests would land in an app they are not meant for.
        address = request.remote or ""
        keys = request.app[SERVICE_KEY].keys
        if wrong.too_many(address) and not keys.knows(given):
            raise ApiError(
                429,
                "rate_limited",
                f"more than {WRONG_KEYS_PER_S} unknown API keys a second from this address",
                headers={"Retry-After": "1"},
            )
        found = await keys.caller(given)
        if found is None:
            wrong.add(address)
            raise ApiError(401, "unauthorized", UNAUTHORIZED)
        return found
    if default_keys:
        raise ApiError(401, "unauthorized", UNAUTHORIZED)
    return OPEN


async def _admin_caller(request: web.Request, key_id: str) -> Caller:
    named = request.headers.get(APP_HEADER, "").strip()
    if not named or named == DEFAULT_APP_ID or _admin_route(request.path):
        return Caller(DEFAULT_APP_ID, key_id, admin=True)
    app = await request.app[SERVICE_KEY].keys.app(named)
    if app is None:
        raise ApiError(404, "app_not_found", f"no app with the id in {APP_HEADER}")
    return Caller(app.id, key_id, admin=True, app=app)


def _admin_route(path: str) -> bool:
    return path == ADMIN_PATH or path.startswith(ADMIN_PATH + "/")


def _refuse_admin(caller: Caller, admin_keys: list[bytes]) -> None:
    if not admin_keys:
        raise ApiError(403, "forbidden", "the app routes are off: set ADMIN_API_KEY to use them")
    if caller.key_id is None:
        raise ApiError(401, "unauthorized", "the app routes need an admin key (ADMIN_API_KEY)")
    raise ApiError(403, "forbidden", "the app routes need an admin key (ADMIN_API_KEY)")


def _presented_key(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.headers.get("x-api-key", "").strip()


async def _rate_limit(request: web.Request, app_id: str, limit: int) -> None:
    """At most `limit` requests a second per app, counted in Redis across processes."""
    try:
        count = await request.app[SERVICE_KEY].api_requests.count(app_id)
    except RedisError:
        return  # no Redis, no counting: the request itself will say what is down
    if count > limit:
        raise ApiError(
            429,
            "rate_limited",
            f"more than {limit} requests a second for this app",
            headers={"Retry-After": "1"},
        )


async def still_valid(request: web.Request) -> bool:
    """Whether the made key a long request (a live stream) came with still works: revoked,
    expired or its app disabled, the request ends as a new one would be refused. A cache
    lookup; Postgres away keeps it going (the next check asks again)."""
    caller = request.get(CALLER)
    if caller is None or caller.key_id is None or not caller.key_id.startswith(KEY_ID_PREFIX):
        return True
    try:
        return await request.app[SERVICE_KEY].keys.caller(_presented_key(request)) is not None
    except Exception:
        return True
