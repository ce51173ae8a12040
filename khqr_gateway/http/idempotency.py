"""Idempotency-Key: a repeated key replays the first response, status included (24 h)."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable

import asyncpg
from aiohttp import web

from khqr_gateway.http.errors import ApiError, error_response
from khqr_gateway.http.request import app_of
from khqr_gateway.infra import idempotency

KEY_MAX = 255
# The header as /openapi.json documents it.
PARAMETER = {
    "in": "header",
    "name": "Idempotency-Key",
    "schema": {"type": "string", "minLength": 1, "maxLength": KEY_MAX},
}


async def idempotent(
    request: web.Request,
    pool: asyncpg.Pool,
    raw: bytes,
    handle: Callable[[], Awaitable[web.Response]],
) -> web.Response:
    """`handle()`'s response, or the first response to a repeated Idempotency-Key."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return await handle()
    app_id, key_hash = app_of(request), _key_hash(request, key)
    request_hash = hashlib.sha256(raw).hexdigest()
    existing = await idempotency.claim_idempotency_key(pool, app_id, key_hash, request_hash)
    if existing is not None:
        return _replay(existing, request_hash)
    try:
        response = await handle()
    except ApiError as exc:
        response = error_response(exc.status, exc.code, exc.message, exc.details)
    except BaseException:
        await idempotency.release_idempotency_key(pool, app_id, key_hash)
        raise
    await _keep(pool, app_id, key_hash, response)
    return response


def _key_hash(request: web.Request, key: str) -> str:
    """The key as stored (in its app's rows): scoped to the method and the path."""
    if not key or len(key) > KEY_MAX:
        raise ApiError(
            400, "invalid_idempotency_key", f"Idempotency-Key must be 1 to {KEY_MAX} characters"
        )
    return hashlib.sha256(f"{request.method}:{request.path}:{key}".encode()).hexdigest()


async def _keep(pool: asyncpg.Pool, app_id: str, key_hash: str, response: web.Response) -> None:
    if response.status >= 300:
        # Only a success is replayed; a refused request may be corrected and sent again.
        await idempotency.release_idempotency_key(pool, app_id, key_hash)
        return
    assert isinstance(response.body, bytes)
    await idempotency.complete_idempotency_key(
        pool, app_id, key_hash, response.status, response.body
    )


def _replay(existing: idempotency.StoredResponse, request_hash: str) -> web.Response:
    if existing.request_hash != request_hash:
        raise ApiError(
            422, "idempotency_key_reused", "this Idempotency-Key was used with a different body"
        )
    if existing.status_code is None:
        raise ApiError(
            409, "idempotency_key_in_use", "a request with this Idempotency-Key is in progress"
        )
    return web.Response(
        body=existing.response,
        status=existing.status_code,
        content_type="application/json",
        headers={"Idempotent-Replayed": "true"},
    )
