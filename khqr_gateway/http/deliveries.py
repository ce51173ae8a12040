"""Handlers of /api/v1/deliveries: list, read with attempts, retry one, retry in bulk."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from aiohttp import web
from aiohttp_apigami import docs, request_schema, response_schema
from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from khqr_gateway.deliveries import store
from khqr_gateway.deliveries.model import Attempt, Delivery, DeliveryStatus
from khqr_gateway.http.errors import ApiError
from khqr_gateway.http.fields import Instant, checks_window, cursor_field
from khqr_gateway.http.json import iso, json_response
from khqr_gateway.http.openapi import ERROR, errors
from khqr_gateway.http.paging import cursor_position, encode_cursor, page_response, page_schema
from khqr_gateway.http.request import app_of, load, load_query, read_json
from khqr_gateway.service import SERVICE_KEY

log = logging.getLogger(__name__)

NOT_FOUND = "no delivery with this id"


DELIVERY_STATUSES = [s.value for s in DeliveryStatus]
BULK_RETRY_MAX = 1000


class DeliveryListQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    status = fields.String(validate=validate.OneOf(DELIVERY_STATUSES))
    jobId = fields.UUID(metadata={"description": "Only the deliveries of this transaction"})
    transactionId = fields.UUID(metadata={"description": "The same as jobId"})
    since = Instant(
        metadata={"description": "Only deliveries created at or after this ISO 8601 time"}
    )
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    cursor = cursor_field()

    @validates_schema
    def _one_job(self, data: dict[str, Any], **kwargs: Any) -> None:
        if "jobId" in data and "transactionId" in data and data["jobId"] != data["transactionId"]:
            raise ValidationError("jobId and transactionId differ", field_name="transactionId")


class DeliveryRetryFilterSchema(Schema):
    """POST /api/v1/deliveries/retry."""

    class Meta:
        unknown = RAISE

    status = fields.String(
        load_default=DeliveryStatus.FAILED.value,
        validate=validate.OneOf(DELIVERY_STATUSES),
        metadata={"description": "Deliveries in this status (default failed)"},
    )
    since = Instant(metadata={"description": "Created at or after this ISO 8601 time"})
    until = Instant(metadata={"description": "Created before this ISO 8601 time"})
    limit = fields.Integer(
        strict=True,
        load_default=BULK_RETRY_MAX,
        validate=validate.Range(min=1, max=BULK_RETRY_MAX),
        metadata={"description": f"At most this many, oldest first (max {BULK_RETRY_MAX})"},
    )

    _window = checks_window()


class DeliveryAttemptSchema(Schema):
    attempt = fields.Integer(required=True)
    startedAt = fields.DateTime(required=True)
    durationMs = fields.Integer(required=True)
    statusCode = fields.Integer(allow_none=True)
    errorKind = fields.String(
        allow_none=True,
        metadata={"description": "timeout, connect, dns, tls, ssrf-blocked, ... (no answer)"},
    )
    errorMessage = fields.String(allow_none=True)
    responseBody = fields.String(allow_none=True, metadata={"description": "First 4 KB"})
    responseHeaders = fields.Dict(keys=fields.String(), values=fields.String(), allow_none=True)


class DeliverySchema(Schema):
    id = fields.String(required=True, metadata={"description": "Also the webhook-id header"})
    jobId = fields.UUID(required=True)
    md5 = fields.String(required=True)
    url = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf(DELIVERY_STATUSES))
    attemptCount = fields.Integer(required=True)
    nextAttemptAt = fields.DateTime(allow_none=True)
    lastAttemptAt = fields.DateTime(allow_none=True)
    lastStatusCode = fields.Integer(allow_none=True)
    lastError = fields.String(allow_none=True)
    createdAt = fields.DateTime(required=True)
    updatedAt = fields.DateTime(required=True)
    deliveredAt = fields.DateTime(allow_none=True)


class DeliveryDetailSchema(DeliverySchema):
    payload = fields.Raw(metadata={"description": "The webhook body, as sent"})
    attempts = fields.List(fields.Nested(DeliveryAttemptSchema))


DeliveryPageSchema = page_schema(DeliverySchema)


class DeliveryRetryResultSchema(Schema):
    retried = fields.Integer(required=True)
    ids = fields.List(fields.String())
    hasMore = fields.Boolean(metadata={"description": "More deliveries match the filter"})


LIST_QUERY_SCHEMA = DeliveryListQuerySchema()


def delivery_json(row: Delivery) -> dict[str, Any]:
    return {
        "id": row.id,
        "jobId": str(row.transaction_id),
        "md5": row.md5,
        "url": row.url,
        "status": row.status.value,
        "attemptCount": row.attempt_count,
        "nextAttemptAt": iso(row.next_attempt_at),
        "lastAttemptAt": iso(row.last_attempt_at),
        "lastStatusCode": row.last_status_code,
        "lastError": row.last_error,
        "createdAt": iso(row.created_at),
        "updatedAt": iso(row.updated_at),
        "deliveredAt": iso(row.delivered_at),
    }


def attempt_json(row: Attempt) -> dict[str, Any]:
    return {
        "attempt": row.attempt,
        "startedAt": iso(row.started_at),
        "durationMs": row.duration_ms,
        "statusCode": row.status_code,
        "errorKind": row.error_kind,
        "errorMessage": row.error_message,
        "responseBody": row.response_body,
        "responseHeaders": row.response_headers,
    }


def _row_cursor(row: Delivery) -> str:
    return encode_cursor(row.created_at, row.id)


def _delivery_id(request: web.Request) -> str:
    delivery_id = request.match_info["id"]
    if "\x00" in delivery_id:  # no id holds one, and Postgres text cannot be asked for it
        raise ApiError(404, "not_found", NOT_FOUND)
    return delivery_id


@docs(
    tags=["deliveries"],
    summary="List webhook deliveries, newest first",
    responses=errors(401, 422),
)
@request_schema(DeliveryListQuerySchema, location="querystring")
@response_schema(DeliveryPageSchema, 200)
async def list_deliveries(request: web.Request) -> web.Response:
    """GET /api/v1/deliveries?status=&jobId=&since=&limit=&cursor=."""
    query = load_query(request, LIST_QUERY_SCHEMA)
    limit = query["limit"]
    rows = await store.list_page(
        request.app[SERVICE_KEY].pool,
        app_of(request),
        status=DeliveryStatus(query["status"]) if "status" in query else None,
        transaction_id=query.get("jobId", query.get("transactionId")),
        since=query.get("since"),
        limit=limit + 1,
        before=cursor_position(query["cursor"]) if "cursor" in query else None,
    )
    return page_response(rows, limit, delivery_json, _row_cursor)


@docs(
    tags=["deliveries"],
    summary="Get a delivery with every attempt",
    description="The webhook body as sent and each attempt: when, how long, the status code "
    "or why there was no answer, the first 4 KB of the response.",
    responses=errors(401, 404),
)
@response_schema(DeliveryDetailSchema, 200)
async def get_delivery(request: web.Request) -> web.Response:
    """GET /api/v1/deliveries/{id}."""
    pool = request.app[SERVICE_KEY].pool
    app_id, delivery_id = app_of(request), _delivery_id(request)
    row = await store.get(pool, app_id, delivery_id)
    if row is None:
        raise ApiError(404, "not_found", NOT_FOUND)
    body = delivery_json(row)
    body["payload"] = orjson.loads(row.payload) if row.payload is not None else None
    body["attempts"] = [attempt_json(a) for a in await store.attempts_of(pool, app_id, delivery_id)]
    return json_response(body)


@docs(
    tags=["deliveries"],
    summary="Send a delivery again now",
    description="Starts a new attempt series at once, with the full retry schedule, whatever "
    "the delivery's status (a delivered one is replayed). The webhook-id stays the same, so "
    "a receiver that already processed it can drop the repeat. 409 `delivery_in_flight` "
    "while an attempt of it is being sent: nothing is changed, and the retry can be asked "
    "again once that attempt is stored (at most `WEBHOOK_TIMEOUT_S` later).",
    responses={
        **errors(401, 404),
        409: {"description": "An attempt is being sent right now", **ERROR},
    },
)
@response_schema(DeliverySchema, 202, description="Queued for sending")
async def retry_delivery(request: web.Request) -> web.Response:
    """POST /api/v1/deliveries/{id}/retry."""
    service = request.app[SERVICE_KEY]
    app_id, delivery_id = app_of(request), _delivery_id(request)
    # Another app's delivery is not found, whether or not it is being sent now.
    if await store.get(service.pool, app_id, delivery_id) is None:
        raise ApiError(404, "not_found", NOT_FOUND)
    # Checked before the restart, so that a 409 leaves the delivery as it was.
    if await service.lanes.in_flight([delivery_id]):
        raise _in_flight(delivery_id)
    row = await store.restart(service.pool, app_id, delivery_id)
    if row is None:
        raise ApiError(404, "not_found", NOT_FOUND)
    # A person is waiting on this one: it goes in the lane of first attempts.
    if await _queue(service.lanes.retry_now, [row.id]):
        raise _in_flight(delivery_id)  # claimed since the check: that attempt goes on alone
    log.info("delivery retried", extra={"deliveryId": row.id, "md5": row.md5})
    return json_response(delivery_json(row), 202)


def _in_flight(delivery_id: str) -> ApiError:
    return ApiError(
        409,
        "delivery_in_flight",
        "an attempt of this delivery is being sent now; retry once it has finished",
        {"id": delivery_id},
    )


@docs(
    tags=["deliveries"],
    summary="Retry deliveries in bulk",
    description="Starts a new attempt series for up to `limit` deliveries (oldest first) in "
    "`status` (default failed) created in [since, until). An empty body retries up to "
    "1000 failed deliveries. They are queued behind first attempts, so a bulk replay never "
    "delays new payments' webhooks. `hasMore` says whether more match: call again.",
    responses=errors(400, 401, 413, 415, 422),
)
@request_schema(DeliveryRetryFilterSchema)
@response_schema(DeliveryRetryResultSchema, 202, description="Queued for sending")
async def retry_deliveries(request: web.Request) -> web.Response:
    """POST /api/v1/deliveries/retry."""
    service = request.app[SERVICE_KEY]
    body: Any = (await read_json(request))[1] if request.body_exists else {}
    query = load(DeliveryRetryFilterSchema(), body)
    ids, more = await store.restart_matching(
        service.pool,
        app_of(request),
        status=DeliveryStatus(query["status"]),
        since=query.get("since"),
        until=query.get("until"),
        limit=query["limit"],
    )
    await _queue(service.lanes.requeue, ids)
    log.info("deliveries retried in bulk", extra={"count": len(ids), "status": query["status"]})
    return json_response({"retried": len(ids), "ids": ids, "hasMore": more}, 202)


async def _queue(
    move: Callable[[Sequence[str]], Awaitable[list[str]]], ids: Sequence[str]
) -> list[str]:
    """Due now in one lane and out of the other (`move`: see Lanes), so one delivery is never
    sent twice; returns those left alone because an attempt of theirs is being sent."""
    try:
        held = await move(ids)
    except Exception as exc:
        # Postgres has them pending and due: the reconcile tick queues them when Redis is back.
        log.warning("could not queue retried deliveries: %s", exc, extra={"count": len(ids)})
        return []
    if held:
        log.info("retried deliveries still in flight left alone", extra={"count": len(held)})
    return held
