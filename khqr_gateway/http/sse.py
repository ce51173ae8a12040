"""Live status over Server-Sent Events: the status now, each change, then the end.

The streams of the API, of the payment page and of rachhen/khqr-webhook's route share it,
each in its own Format.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID

import orjson
from aiohttp import hdrs, web

from khqr_gateway.http.auth import still_valid
from khqr_gateway.http.errors import ApiError, ErrorSchema, error_response
from khqr_gateway.service import SERVICE_KEY
from khqr_gateway.transactions import pages
from khqr_gateway.transactions.events import (
    Change,
    EventHub,
    Scope,
    Signal,
    StreamLimit,
    Subscription,
)
from khqr_gateway.transactions.model import Status

# How often an idle stream notices a client that went away (aiohttp does not cancel
# handlers on disconnect unless told to, and `serve` does not).
GONE_CHECK_S = 1.0
# A stream opened with a made key ends this soon after the key is revoked (the cache's TTL on
# top): as every other request, within 5 s.
KEY_CHECK_S = 1.0
RETRY_AFTER_S = "5"
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache, no-store",
    "X-Accel-Buffering": "no",  # nginx and friends: do not buffer the stream
}
# A public page's own limits are the caller's (429); the process's are everyone's (503).
LIMIT_ANSWERS = {
    Scope.PROCESS: (503, "this process has too many open streams; try again shortly"),
    Scope.TRANSACTION: (429, "this payment link has too many open streams; close some first"),
    Scope.CLIENT: (429, "this address has too many open payment page streams; close some first"),
}
STREAM_LIMIT = {
    503: {
        "description": "Too many open streams in this process; try again after Retry-After",
        "schema": ErrorSchema,
    }
}
# On OpenAPI 3.0 the schema of an event stream describes one event (3.2 calls it itemSchema).
SSE_RESPONSE = {
    "description": "Server-Sent Events",
    "content": {
        "text/event-stream": {
            "schema": {
                "type": "object",
                "required": ["data"],
                "properties": {
                    "id": {"type": "string", "description": "The status the event carries"},
                    "event": {"type": "string"},
                    "data": {"type": "string", "description": "The event's payload"},
                },
            }
        }
    },
}


@dataclass(frozen=True, slots=True)
class Format:
    """How one kind of stream writes a status and keeps the connection alive."""

    event: Callable[[UUID, Status, str | None], bytes]
    heartbeat: Callable[[Status], bytes]
    # None: the hub's heartbeat interval.
    heartbeat_s: float | None = None
    # Events carry `id: <status>`, so a client reconnecting after the end is told 204.
    ids: bool = True


def _comment(status: Status) -> bytes:
    return b": keep-alive\n\n"


def _v1_event(job_id: UUID, status: Status, reason: str | None) -> bytes:
    data = orjson.dumps({"jobId": str(job_id), "status": status.value, "reason": reason})
    return b"id: " + status.value.encode() + b"\ndata: " + data + b"\n\n"


V1 = Format(event=_v1_event, heartbeat=_comment)


def _already_ended(request: web.Request) -> bool:
    """An EventSource reconnecting after the last event: 204 tells it to stop."""
    try:
        return Status(request.headers.get("Last-Event-ID", "")).terminal
    except ValueError:
        return False


async def stream(
    request: web.Request, app_id: str, job_id: UUID, fmt: Format, client: str | None = None
) -> web.StreamResponse:
    """Answer with the live status of `app_id`'s `job_id` in `fmt`; 404 when it has no such id.

    `client` is the address of a public stream (the payment page's), None for the API's.
    """
    service = request.app[SERVICE_KEY]
    if fmt.ids and _already_ended(request):
        return web.Response(status=204)
    try:
        if request.method == hdrs.METH_HEAD:
            return await _head(request, app_id, job_id, client)
        async with service.events.subscribe(job_id, client) as sub:
            # Subscribed first, read second: a change in between is queued, not lost.
            current = await pages.status_of(service.pool, app_id, job_id)
            if current is None:
                raise ApiError(404, "not_found", "no transaction with this jobId")
            response = web.StreamResponse(headers=SSE_HEADERS)
            await response.prepare(request)
            with contextlib.suppress(ConnectionError):
                await _pump(request, response, service.events, sub, app_id, current, fmt)
                await response.write_eof()
            return response
    except StreamLimit as exc:
        status, message = LIMIT_ANSWERS[exc.scope]
        return error_response(
            status, "too_many_streams", message, headers={"Retry-After": RETRY_AFTER_S}
        )


async def _head(
    request: web.Request, app_id: str, job_id: UUID, client: str | None
) -> web.StreamResponse:
    """GET's status and headers, no body and no stream: an event written after a bodiless
    answer would be read as the next response on this keep-alive connection."""
    service = request.app[SERVICE_KEY]
    service.events.check(job_id, client)
    if await pages.status_of(service.pool, app_id, job_id) is None:
        raise ApiError(404, "not_found", "no transaction with this jobId")
    return web.StreamResponse(headers=SSE_HEADERS)


async def _pump(
    request: web.Request,
    response: web.StreamResponse,
    hub: EventHub,
    sub: Subscription,
    app_id: str,
    current: tuple[Status, str | None],
    fmt: Format,
) -> None:
    loop = asyncio.get_running_loop()
    status, reason = current
    await response.write(fmt.event(sub.job_id, status, reason))
    beat_s = fmt.heartbeat_s or hub.heartbeat_s
    last_beat = last_read = last_key = loop.time()
    while not status.terminal:
        item = await sub.get(min(GONE_CHECK_S, beat_s))
        if item is Signal.CLOSE or _gone(request):
            return
        now = loop.time()
        if now - last_key >= KEY_CHECK_S:
            last_key = now
            if not await still_valid(request):
                return
        if item is Signal.RESYNC or now - last_read >= hub.heartbeat_s:
            # Also every heartbeat interval: a change published while Redis was away is found.
            last_read = now
            item = await _reread(request, app_id, sub.job_id) or item
        if isinstance(item, Change) and item.status is not status:
            status, reason = item.status, item.reason
            await response.write(fmt.event(sub.job_id, status, reason))
            last_beat = now
        elif now - last_beat >= beat_s:
            await response.write(fmt.heartbeat(status))
            last_beat = now


async def _reread(request: web.Request, app_id: str, job_id: UUID) -> Change | None:
    try:
        found = await pages.status_of(request.app[SERVICE_KEY].pool, app_id, job_id)
    except Exception:  # Postgres away for a moment: the next heartbeat tries again
        return None
    return None if found is None else Change(job_id, *found)


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def close_streams(app: web.Application) -> None:
    """At shutdown: open streams end instead of holding it up until the grace runs out."""
    service = app.get(SERVICE_KEY)
    if service is not None:
        service.events.close_streams()
