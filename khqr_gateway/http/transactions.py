"""Handlers of /api/v1/transactions and their schemas: create, read, list, cancel, follow."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp_apigami import docs, match_info_schema, request_schema, response_schema
from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_load,
    validate,
    validates_schema,
)

from khqr_gateway.apps.model import Caller
from khqr_gateway.http import idempotency, sse, tracking
from khqr_gateway.http.errors import ApiError
from khqr_gateway.http.fields import (
    ACCOUNT_ID_MAX,
    ACCOUNT_ID_MIN,
    CURRENCIES,
    TIMEOUT_MAX_S,
    TIMEOUT_MIN_S,
    AmountField,
    Instant,
    JobIdPathSchema,
    checks_metadata,
    checks_window,
    cursor_field,
    email_field,
    md5_field,
    metadata_field,
    token_field,
    url_field,
)
from khqr_gateway.http.json import iso, json_response
from khqr_gateway.http.openapi import ERROR, errors
from khqr_gateway.http.paging import decode_cursor, page_response, page_schema, row_cursor
from khqr_gateway.http.quickload import quick_load_create, quick_load_list_query
from khqr_gateway.http.request import (
    app_of,
    caller_of,
    job_id_of,
    load,
    read_json,
)
from khqr_gateway.service import SERVICE_KEY
from khqr_gateway.transactions import store
from khqr_gateway.transactions.model import Status
from khqr_gateway.transactions.store import LatestDelivery, TransactionRow

log = logging.getLogger(__name__)

SEARCH_MAX = 200
LIST_LIMIT_DEFAULT = 20
LIST_LIMIT_MAX = 100


class ExpectedSchema(Schema):
    class Meta:
        unknown = RAISE

    amount = AmountField(metadata={"description": "Amount the payment must carry"})
    currency = fields.String(
        validate=validate.OneOf(CURRENCIES), metadata={"description": "KHR or USD"}
    )
    toAccountId = fields.String(
        validate=validate.Length(min=ACCOUNT_ID_MIN, max=ACCOUNT_ID_MAX),
        metadata={"description": "Bakong account the payment must reach, e.g. name@bank"},
    )

    @validates_schema
    def _not_empty(self, data: dict[str, Any], **kwargs: Any) -> None:
        if not data:
            raise ValidationError("give at least one of amount, currency, toAccountId")


class TransactionCreateSchema(Schema):
    """POST /api/v1/transactions."""

    class Meta:
        unknown = RAISE

    md5 = md5_field("md5 of the KHQR string (32 hex)")
    qr = fields.String(
        validate=validate.Length(min=20, max=1024),
        metadata={"description": "The whole KHQR string; md5 and expectations come from it"},
    )
    webhookUrl = url_field("Where the webhook goes (required unless the app has a default one)")
    token = token_field("Bakong token for this transaction (else the default)")
    email = email_field("Registered Bakong email; tokens are renewed through it")
    expected = fields.Nested(ExpectedSchema, metadata={"description": "Payment must match"})
    timeoutSeconds = fields.Integer(
        strict=True,
        validate=validate.Range(min=TIMEOUT_MIN_S, max=TIMEOUT_MAX_S),
        metadata={"description": "Tracking window in seconds (default POLL_TIMEOUT_S)"},
    )
    metadata = metadata_field()
    _metadata = checks_metadata()

    @validates_schema
    def _one_source(self, data: dict[str, Any], **kwargs: Any) -> None:
        if "md5" not in data and "qr" not in data:
            raise ValidationError("give md5 or qr", field_name="md5")
        if "token" in data and "email" in data:
            raise ValidationError("give token or email, not both", field_name="token")

    @post_load
    def _normalise(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        if "md5" in data:
            data["md5"] = data["md5"].lower()
        return data


class TransactionListQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    md5 = md5_field("Only transactions of this md5")
    status = fields.String(validate=validate.OneOf([s.value for s in Status]))
    q = fields.String(
        validate=validate.Length(min=1, max=SEARCH_MAX),
        metadata={
            "description": "A jobId, an md5 prefix (4 hex digits or more), a bill number, or "
            "a value anywhere in the metadata (the whole value, any case)"
        },
    )
    since = Instant(metadata={"description": "Created at or after this ISO 8601 time"})
    until = Instant(metadata={"description": "Created before this ISO 8601 time"})
    limit = fields.Integer(
        load_default=LIST_LIMIT_DEFAULT, validate=validate.Range(min=1, max=LIST_LIMIT_MAX)
    )
    cursor = cursor_field()

    _window = checks_window()


class DeliverySummarySchema(Schema):
    id = fields.String()
    status = fields.String()
    attempts = fields.Integer()
    lastStatusCode = fields.Integer(allow_none=True)
    nextAttemptAt = fields.DateTime(allow_none=True)
    deliveredAt = fields.DateTime(allow_none=True)


class TransactionCreatedSchema(Schema):
    jobId = fields.UUID(required=True)
    md5 = fields.String(required=True)
    status = fields.String(required=True)
    createdAt = fields.DateTime(required=True)
    deadlineAt = fields.DateTime(required=True)


class TransactionSchema(TransactionCreatedSchema):
    reason = fields.String(allow_none=True)
    webhookUrl = fields.String()
    expected = fields.Dict(allow_none=True)
    metadata = fields.Raw(allow_none=True)
    data = fields.Dict(allow_none=True, metadata={"description": "Bakong transaction data"})
    updatedAt = fields.DateTime()
    completedAt = fields.DateTime(allow_none=True)
    late = fields.Boolean(
        metadata={"description": "Paid after the gateway had given up on it (a late payment)"}
    )
    previousStatus = fields.String(
        allow_none=True,
        metadata={"description": "For a late payment: `timeout` or `cancelled`, before it"},
    )
    deeplink = fields.String(
        allow_none=True, metadata={"description": "POST /api/v1/khqr's deep link, if any"}
    )
    lateWatchUntil = fields.DateTime(
        allow_none=True,
        metadata={
            "description": "After a timeout or a cancel, the md5 is still checked for a late "
            "payment until then (the QR's expiry plus LATE_MARGIN_S, else LATE_WATCH_S)"
        },
    )
    delivery = fields.Nested(
        DeliverySummarySchema,
        allow_none=True,
        metadata={"description": "Its latest webhook delivery (a late payment's, once made)"},
    )


TransactionPageSchema = page_schema(TransactionSchema)


# One instance each: loading keeps no state in the schema, and building one per request
# (its fields copied) cost a tenth of a create.
CREATE_SCHEMA = TransactionCreateSchema()
LIST_QUERY_SCHEMA = TransactionListQuerySchema()


def _list_query(request: web.Request) -> dict[str, Any]:
    """The list's query: the usual one by quick_load_list_query, the rest by the schema."""
    query = dict(request.query)
    quick = quick_load_list_query(query, default_limit=LIST_LIMIT_DEFAULT, max_limit=LIST_LIMIT_MAX)
    return quick if quick is not None else load(LIST_QUERY_SCHEMA, query)


NO_WEBHOOK_URL = [
    {
        "field": "webhookUrl",
        "message": "Missing data for required field (this app has no default webhookUrl).",
    }
]


def _with_default_url(body: Any, caller: Caller) -> Any:
    """The body, with the app's default webhookUrl where it gives none."""
    default = caller.app.webhook_url if caller.app is not None else None
    if default is None or not isinstance(body, dict) or "webhookUrl" in body:
        return body
    return {**body, "webhookUrl": default}


def load_create(raw: bytes, body: Any) -> dict[str, Any]:
    """The create body, loaded: the usual shape by quick_load_create, the rest (and every
    error) by the schema. A NUL can only arrive as the escape \\u0000 (JSON refuses raw
    control characters), so a body without that text needs no NUL scan."""
    if isinstance(body, dict) and b"\\u0000" not in raw:
        quick = quick_load_create(body)
        if quick is not None:
            return quick
    return load(CREATE_SCHEMA, body)


def transaction_json(row: TransactionRow) -> dict[str, Any]:
    return {
        "jobId": str(row.id),
        "md5": row.md5,
        "status": row.status,
        "reason": row.reason,
        "webhookUrl": row.webhook_url,
        "expected": row.expected,
        "metadata": row.metadata,
        "data": row.bakong_data,
        "createdAt": iso(row.created_at),
        "updatedAt": iso(row.updated_at),
        "deadlineAt": iso(row.deadline_at),
        "completedAt": iso(row.completed_at),
        "late": row.late,
        "previousStatus": row.previous_status,
        "lateWatchUntil": iso(row.late_watch_until),
        "deeplink": row.deeplink,
        "delivery": _delivery_json(row.delivery),
    }


def _delivery_json(delivery: LatestDelivery | None) -> dict[str, Any] | None:
    if delivery is None:
        return None
    return {
        "id": delivery.id,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "lastStatusCode": delivery.last_status_code,
        "nextAttemptAt": iso(delivery.next_attempt_at),
        "deliveredAt": iso(delivery.delivered_at),
    }


@docs(
    tags=["transactions"],
    summary="Track a KHQR payment",
    description="Starts polling Bakong for the md5 (or the md5 of `qr`) and sends the webhook "
    "when it is paid, failed, mismatched or timed out. One md5 is one payment: 200 with the "
    "existing transaction, in whatever status, when the md5 is already tracked; 409 "
    "`md5_already_tracked` (its jobId in `details`) when the repeat asks for another "
    "webhookUrl, expected or metadata. A repeated `Idempotency-Key` replays the first response.",
    parameters=[idempotency.PARAMETER],
    responses={
        200: {
            "description": "This md5 is already tracked: its transaction, in whatever status",
            "schema": TransactionCreatedSchema,
        },
        **errors(401, 409, 408, 413, 415, 422),
        400: {"description": "The body is not valid JSON, or a bad Idempotency-Key", **ERROR},
    },
)
@request_schema(TransactionCreateSchema, required=True)
@response_schema(TransactionCreatedSchema, 201, description="Tracking started")
async def post_transaction(request: web.Request) -> web.Response:
    """POST /api/v1/transactions."""
    service = request.app[SERVICE_KEY]
    raw, body = await read_json(request)

    async def handle() -> web.Response:
        data = load_create(raw, _with_default_url(body, caller_of(request)))
        if "webhookUrl" not in data:
            raise ApiError(422, "validation_error", "some fields are not valid", NO_WEBHOOK_URL)
        row, created = await tracking.create(service, caller_of(request), data)
        return json_response(tracking.created_json(row), 201 if created else 200)

    return await idempotency.idempotent(request, service.pool, raw, handle)


@docs(tags=["transactions"], summary="Get a transaction", responses=errors(401, 404))
@match_info_schema(JobIdPathSchema)
@response_schema(TransactionSchema, 200)
async def get_transaction(request: web.Request) -> web.Response:
    """GET /api/v1/transactions/{jobId}."""
    row = await store.get(request.app[SERVICE_KEY].pool, app_of(request), job_id_of(request))
    if row is None:
        raise ApiError(404, "not_found", "no transaction with this jobId")
    return json_response(transaction_json(row))


@docs(tags=["transactions"], summary="List transactions, newest first", responses=errors(401, 422))
@request_schema(TransactionListQuerySchema, location="querystring")
@response_schema(TransactionPageSchema, 200)
async def list_transactions(request: web.Request) -> web.Response:
    """GET /api/v1/transactions?md5=&status=&q=&since=&until=&limit=&cursor=."""
    query = _list_query(request)
    before = decode_cursor(query["cursor"]) if "cursor" in query else None
    limit = query["limit"]
    rows = await store.list_page(
        request.app[SERVICE_KEY].pool,
        app_of(request),
        md5=query.get("md5", "").lower() or None,
        status=Status(query["status"]) if "status" in query else None,
        limit=limit + 1,
        before=before,
        q=query.get("q"),
        since=query.get("since"),
        until=query.get("until"),
    )
    return page_response(rows, limit, transaction_json, row_cursor)


@docs(
    tags=["transactions"],
    summary="Cancel a pending transaction (no webhook)",
    responses=errors(401, 404, 409),
)
@match_info_schema(JobIdPathSchema)
@response_schema(TransactionSchema, 200)
async def delete_transaction(request: web.Request) -> web.Response:
    """DELETE /api/v1/transactions/{jobId}: cancel a pending transaction; no webhook."""
    service = request.app[SERVICE_KEY]
    app_id, job_id = app_of(request), job_id_of(request)
    cancelled = await store.cancel(
        service.pool, app_id, job_id, window=service.settings.late_window
    )
    row = await store.get(service.pool, app_id, job_id)
    if row is None:
        raise ApiError(404, "not_found", "no transaction with this jobId")
    if cancelled is None:
        raise ApiError(
            409,
            "not_pending",
            f"the transaction is already {row.status}",
            {"status": row.status},
        )
    await service.after_cancel(job_id, row.reason)
    log.info("transaction cancelled", extra={"jobId": str(job_id), "md5": row.md5})
    return json_response(transaction_json(row))


@docs(
    tags=["transactions"],
    summary="Live status of a transaction (Server-Sent Events)",
    description="One event with the status now, then one per change, and the stream ends "
    "after a final status. Each event is `id: <status>` and `data: {jobId, status, reason}`; "
    "comment lines keep the connection alive every 15 s. An EventSource that reconnects "
    "after the final event (Last-Event-ID) is answered 204, which stops it.",
    responses={
        200: sse.SSE_RESPONSE,
        204: {"description": "The stream already ended with a final status"},
        **errors(401, 404),
        **sse.STREAM_LIMIT,
    },
)
@match_info_schema(JobIdPathSchema)
async def transaction_events(request: web.Request) -> web.StreamResponse:
    """GET /api/v1/transactions/{jobId}/events."""
    return await sse.stream(request, app_of(request), job_id_of(request), sse.V1)
