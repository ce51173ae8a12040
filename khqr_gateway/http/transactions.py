"""Handlers of /api/v1/transactions: create (idempotent), read, list, cancel."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import orjson
from aiohttp import web
from aiohttp_apigami import docs, match_info_schema, request_schema, response_schema
from marshmallow import Schema, ValidationError

from khqr_gateway.bakong import khqr
from khqr_gateway.credentials.model import token_expired
from khqr_gateway.deliveries import store as delivery_store
from khqr_gateway.deliveries.ssrf import AddressPolicy
from khqr_gateway.http import API_KEY_ID
from khqr_gateway.http.errors import (
    ApiError,
    error_response,
    field_errors,
    iso,
    json_response,
    page_response,
)
from khqr_gateway.http.openapi import ERROR, errors
from khqr_gateway.http.schemas import (
    CURSOR_ERROR,
    LONG_DIGITS,
    JobIdPathSchema,
    TransactionCreatedSchema,
    TransactionCreateSchema,
    TransactionListQuerySchema,
    TransactionPageSchema,
    TransactionSchema,
    quick_load_create,
    walk_json,
)
from khqr_gateway.infra import idempotency
from khqr_gateway.service import SERVICE_KEY, Service
from khqr_gateway.transactions import store
from khqr_gateway.transactions.events import Change
from khqr_gateway.transactions.model import Expected, Status
from khqr_gateway.transactions.store import NewTransaction

log = logging.getLogger(__name__)

JSON_TYPES = ("application/json",)
IDEMPOTENCY_KEY_MAX = 255
BODY_READ_TIMEOUT_S = 10.0
# The standard parser, which keeps such integers exact, recurses: deeper bodies are not
# read again (every schema refuses nesting this deep, metadata past METADATA_MAX_DEPTH).
EXACT_READ_MAX_DEPTH = 100
# One instance each: loading keeps no state in the schema, and building one per request
# (its fields copied) cost a tenth of a create.
CREATE_SCHEMA = TransactionCreateSchema()
LIST_QUERY_SCHEMA = TransactionListQuerySchema()


async def read_json(request: web.Request) -> tuple[bytes, Any]:
    """The raw body and its JSON; 415 for another content type, 400 for bad JSON."""
    if request.content_type not in JSON_TYPES and not request.content_type.endswith("+json"):
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    raw = await _body(request)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    return raw, _exact_integers(raw, body)


def _exact_integers(raw: bytes, body: Any) -> Any:
    """`body` with every integer as written, for validators to hold to 64 bits. The rare
    body with a long run of digits is read again by the standard parser, which agrees with
    orjson on everything orjson accepts but such integers."""
    if LONG_DIGITS.search(raw) is None:
        return body
    if max(depth for _, depth, _ in walk_json(body)) > EXACT_READ_MAX_DEPTH:
        return body
    return json.loads(raw)


async def _body(request: web.Request) -> bytes:
    if request.content.is_eof():
        # All of it has arrived already (the usual case): no timer to arm.
        return await request.read()
    try:
        async with asyncio.timeout(BODY_READ_TIMEOUT_S):
            return await request.read()
    except TimeoutError:
        # A client that trickles its body would hold a connection forever.
        raise ApiError(408, "request_timeout", "the body took too long to arrive") from None


def _nul_fields(value: Any) -> Iterator[str]:
    """The fields of `value` that hold U+0000, which Postgres text (and jsonb, once read as
    text) cannot store: refused here rather than failing in the database as a 500. A loop,
    not recursion: orjson reads nesting deeper than Python's recursion limit."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        name, item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                yield name or "body"
        elif isinstance(item, dict):
            for key, child in item.items():
                if "\x00" in str(key):
                    yield name or "body"
                else:
                    stack.append((f"{name}.{key}" if name else str(key), child))
        elif isinstance(item, list):
            stack.extend((name, child) for child in item)


def load(schema: Schema, data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ApiError(422, "validation_error", "the body must be a JSON object")
    nul = sorted(set(_nul_fields(data)))
    if nul:
        message = "must not contain the NUL character (U+0000)"
        raise ApiError(
            422,
            "validation_error",
            "some fields are not valid",
            [{"field": field, "message": message} for field in nul],
        )
    try:
        loaded: dict[str, Any] = schema.load(data)
    except ValidationError as exc:
        raise ApiError(
            422, "validation_error", "some fields are not valid", field_errors(exc.messages)
        ) from None
    return loaded


def load_create(raw: bytes, body: Any) -> dict[str, Any]:
    """The create body, loaded: the usual shape by quick_load_create, the rest (and every
    error) by the schema. A NUL can only arrive as the escape \\u0000 (JSON refuses raw
    control characters), so a body without that text needs no NUL scan."""
    if isinstance(body, dict) and b"\\u0000" not in raw:
        quick = quick_load_create(body)
        if quick is not None:
            return quick
    return load(CREATE_SCHEMA, body)


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(
        422, "validation_error", "some fields are not valid", [{"field": field, "message": message}]
    )


def transaction_json(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "jobId": str(row["id"]),
        "md5": row["md5"],
        "status": row["status"],
        "reason": row["reason"],
        "webhookUrl": row["webhook_url"],
        "expected": row["expected"],
        "metadata": row["metadata"],
        "data": row["bakong_data"],
        "createdAt": iso(row["created_at"]),
        "updatedAt": iso(row["updated_at"]),
        "deadlineAt": iso(row["deadline_at"]),
        "completedAt": iso(row["completed_at"]),
        "late": row["late"],
        "previousStatus": row["previous_status"],
        "lateWatchUntil": iso(row["late_watch_until"]),
        "deeplink": row["deeplink"],
        "delivery": _delivery_json(row),
    }


def _delivery_json(row: asyncpg.Record) -> dict[str, Any] | None:
    summary = delivery_store.summary(row)
    if summary is None:
        return None
    return {
        "id": summary.id,
        "status": summary.status.value,
        "attempts": summary.attempts,
        "lastStatusCode": summary.last_status_code,
        "nextAttemptAt": iso(summary.next_attempt_at),
        "deliveredAt": iso(summary.delivered_at),
    }


def created_json(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "jobId": str(row["id"]),
        "md5": row["md5"],
        "status": row["status"],
        "createdAt": iso(row["created_at"]),
        "deadlineAt": iso(row["deadline_at"]),
    }


def _from_qr(data: dict[str, Any]) -> datetime | None:
    """Fill md5 and expectations from a KHQR string (explicit fields win); returns when the
    QR expires, when it says."""
    try:
        # Every rule payer apps apply: a QR they refuse can never be paid.
        parsed = khqr.verify(data["qr"])
    except khqr.KhqrError as exc:
        detail = {"field": "qr", "message": str(exc), "rule": exc.rule}
        raise ApiError(422, "validation_error", "some fields are not valid", [detail]) from None
    if not parsed.dynamic:
        raise _invalid("qr", "a static KHQR cannot be tracked by md5; use a dynamic one")
    if "md5" in data and data["md5"] != parsed.md5:
        raise _invalid("md5", "does not match the md5 of qr")
    data["md5"] = parsed.md5
    derived = {
        "amount": parsed.amount,
        "currency": parsed.currency,
        "toAccountId": parsed.account_id,
    }
    expected = {k: v for k, v in derived.items() if v is not None}
    expected.update(data.get("expected") or {})
    data["expected"] = expected
    if parsed.expires_at_ms is None:
        return None
    return datetime.fromtimestamp(parsed.expires_at_ms / 1000, UTC)


async def credential_id(service: Service, data: dict[str, Any]) -> int | None:
    """The Bakong credential a request names (None: the default); stored once, then cached."""
    token, email = data.get("token"), data.get("email")
    if token:
        if token_expired(token):
            raise ApiError(401, "token_expired", "the Bakong token has expired")
        return await service.credentials.add(token=token, email=None)
    if email:
        return await service.credentials.add(token=None, email=email)
    if service.credentials.default_id is None:
        raise _invalid(
            "token", "no Bakong credential: give token or email, or set BAKONG_TOKEN/BAKONG_EMAIL"
        )
    return None


async def create(
    service: Service, data: dict[str, Any], *, repeat_must_match: bool = True
) -> tuple[asyncpg.Record, bool]:
    """Track a validated request; returns the row and whether it is new.

    An md5 already tracked is that transaction, whatever its status: with
    `repeat_must_match`, a repeat that asks for another webhookUrl, expected or metadata is
    refused (409) rather than silently answered with what the first request asked for.
    """
    refused = AddressPolicy.for_settings(service.settings).check_url(data["webhookUrl"])
    if refused:
        raise _invalid("webhookUrl", refused)
    qr_expires_at = _from_qr(data) if "qr" in data else None
    credential = await credential_id(service, data)
    timeout_s = data.get("timeoutSeconds", service.settings.poll_timeout_s)
    deadline_at = datetime.now(UTC) + timedelta(seconds=timeout_s)
    if qr_expires_at is not None:
        # The tracking window never outlives the QR: past its expiry it cannot be paid.
        deadline_at = min(deadline_at, qr_expires_at)
    expected = data.get("expected")
    new = NewTransaction(
        id=uuid.uuid4(),
        md5=data["md5"],
        webhook_url=data["webhookUrl"],
        credential_id=credential,
        expected=_expected(expected),
        metadata=data.get("metadata"),
        qr=data.get("qr"),
        deadline_at=deadline_at,
        qr_expires_at=qr_expires_at,
    )
    # Written together with the creates of other requests waiting at the same moment.
    row, created = await service.ingest.create(new)
    if created:
        log.debug("transaction created", extra={"jobId": str(row["id"]), "md5": row["md5"]})
    elif repeat_must_match:
        _check_repeat(row, new)
    return row, created


def _expected(given: dict[str, Any] | None) -> Expected | None:
    """What the request expects of the payment; None when it expects nothing (as stored)."""
    expected = Expected(
        amount=(given or {}).get("amount"),
        currency=(given or {}).get("currency"),
        to_account_id=(given or {}).get("toAccountId"),
    )
    return None if expected == Expected() else expected


def _check_repeat(row: asyncpg.Record, new: NewTransaction) -> None:
    """A repeated md5 must ask for what its transaction already does."""
    differ = [
        name
        for name, same in (
            ("webhookUrl", row["webhook_url"] == new.webhook_url),
            ("expected", Expected.from_json(row["expected"]) == new.expected),
            ("metadata", row["metadata"] == new.metadata),
        )
        if not same
    ]
    if differ:
        raise ApiError(
            409,
            "md5_already_tracked",
            f"this md5 is already tracked, with another {', '.join(differ)}: one md5 is one "
            "payment; use a new KHQR for a new payment",
            {"jobId": str(row["id"]), "status": row["status"], "differs": differ},
        )


@docs(
    tags=["transactions"],
    summary="Track a KHQR payment",
    description="Starts polling Bakong for the md5 (or the md5 of `qr`) and sends the webhook "
    "when it is paid, failed, mismatched or timed out. One md5 is one payment: 200 with the "
    "existing transaction, in whatever status, when the md5 is already tracked; 409 "
    "`md5_already_tracked` (its jobId in `details`) when the repeat asks for another "
    "webhookUrl, expected or metadata. A repeated `Idempotency-Key` replays the first response.",
    parameters=[
        {
            "in": "header",
            "name": "Idempotency-Key",
            "schema": {"type": "string", "minLength": 1, "maxLength": IDEMPOTENCY_KEY_MAX},
        }
    ],
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
        data = load_create(raw, body)
        row, created = await create(service, data)
        return json_response(created_json(row), 201 if created else 200)

    return await idempotent(request, service, raw, handle)


async def idempotent(
    request: web.Request, service: Service, raw: bytes, handle: Any
) -> web.Response:
    """Replay the first response to a repeated Idempotency-Key (24 h), status included."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        response: web.Response = await handle()
        return response
    if not key or len(key) > IDEMPOTENCY_KEY_MAX:
        raise ApiError(
            400,
            "invalid_idempotency_key",
            f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} characters",
        )
    scope = request.get(API_KEY_ID, "")
    key_hash = hashlib.sha256(f"{scope}:{request.method}:{request.path}:{key}".encode()).hexdigest()
    request_hash = hashlib.sha256(raw).hexdigest()
    existing = await idempotency.claim_idempotency_key(service.pool, key_hash, request_hash)
    if existing is not None:
        return _replay(existing, request_hash)
    try:
        response = await handle()
    except ApiError as exc:
        response = error_response(exc.status, exc.code, exc.message, exc.details)
    except BaseException:
        await idempotency.release_idempotency_key(service.pool, key_hash)
        raise
    if response.status >= 300:
        # Only a success is replayed; a refused request may be corrected and sent again.
        await idempotency.release_idempotency_key(service.pool, key_hash)
    else:
        assert isinstance(response.body, bytes)
        await idempotency.complete_idempotency_key(
            service.pool, key_hash, response.status, response.body
        )
    return response


def _replay(existing: asyncpg.Record, request_hash: str) -> web.Response:
    if existing["request_hash"] != request_hash:
        raise ApiError(
            422, "idempotency_key_reused", "this Idempotency-Key was used with a different body"
        )
    if existing["status_code"] is None:
        raise ApiError(
            409, "idempotency_key_in_use", "a request with this Idempotency-Key is in progress"
        )
    return web.Response(
        body=existing["response"],
        status=existing["status_code"],
        content_type="application/json",
        headers={"Idempotent-Replayed": "true"},
    )


def _job_id(request: web.Request) -> UUID:
    try:
        return UUID(request.match_info["jobId"])
    except ValueError:
        raise ApiError(404, "not_found", "no transaction with this jobId") from None


@docs(tags=["transactions"], summary="Get a transaction", responses=errors(401, 404))
@match_info_schema(JobIdPathSchema)
@response_schema(TransactionSchema, 200)
async def get_transaction(request: web.Request) -> web.Response:
    """GET /api/v1/transactions/{jobId}."""
    row = await store.get(request.app[SERVICE_KEY].pool, _job_id(request))
    if row is None:
        raise ApiError(404, "not_found", "no transaction with this jobId")
    return json_response(transaction_json(row))


def encode_cursor(created_at: datetime, row_id: UUID | str) -> str:
    """The position after a row in a newest-first page: its (created_at, id)."""
    raw = orjson.dumps([created_at.isoformat(), str(row_id)])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def row_cursor(row: asyncpg.Record) -> str:
    """The cursor after a row of a newest-first page."""
    return encode_cursor(row["created_at"], row["id"])


def cursor_position(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) of encode_cursor; 422 for anything else, however it was made."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, row_id = orjson.loads(raw)
        if not isinstance(created, str) or not isinstance(row_id, str) or "\x00" in row_id:
            raise ValueError(cursor)
        at = datetime.fromisoformat(created)
        # Aware and in UTC, so that no offset can push it out of the driver's range.
        return (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC), row_id
    except (ValueError, TypeError, OverflowError, orjson.JSONDecodeError):
        raise _invalid("cursor", CURSOR_ERROR) from None


def decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    created, row_id = cursor_position(cursor)
    try:
        return created, UUID(row_id)
    except ValueError:
        raise _invalid("cursor", CURSOR_ERROR) from None


@docs(tags=["transactions"], summary="List transactions, newest first", responses=errors(401, 422))
@request_schema(TransactionListQuerySchema, location="querystring")
@response_schema(TransactionPageSchema, 200)
async def list_transactions(request: web.Request) -> web.Response:
    """GET /api/v1/transactions?md5=&status=&q=&since=&until=&limit=&cursor=."""
    query = load(LIST_QUERY_SCHEMA, dict(request.query))
    before = decode_cursor(query["cursor"]) if "cursor" in query else None
    limit = query["limit"]
    rows = await store.list_page(
        request.app[SERVICE_KEY].pool,
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
    job_id = _job_id(request)
    cancelled = await store.cancel(service.pool, job_id, window=service.settings.late_window)
    row = await store.get(service.pool, job_id)
    if row is None:
        raise ApiError(404, "not_found", "no transaction with this jobId")
    if cancelled is None:
        raise ApiError(
            409,
            "not_pending",
            f"the transaction is already {row['status']}",
            {"status": row["status"]},
        )
    try:
        await service.polls.remove([str(job_id)])
    except Exception as exc:  # the poll tick drops it anyway: it is no longer pending
        log.warning("could not unschedule a cancelled transaction: %s", exc)
    # The QR can still be paid: a payment made after the cancel is reported all the same.
    await service.late.watch([str(job_id)])
    await service.events.publish([Change(job_id, Status.CANCELLED, row["reason"])])
    log.info("transaction cancelled", extra={"jobId": str(job_id), "md5": row["md5"]})
    return json_response(transaction_json(row))


def add_routes(
    app: web.Application, before_job_id: Callable[[web.Application], None] | None = None
) -> None:
    """The routes; `before_job_id` adds those under /api/v1/transactions/ that the {jobId}
    route, matched in the order added, would otherwise take for a jobId."""
    app.router.add_post("/api/v1/transactions", post_transaction)
    app.router.add_get("/api/v1/transactions", list_transactions)
    if before_job_id is not None:
        before_job_id(app)
    app.router.add_get("/api/v1/transactions/{jobId}", get_transaction)
    app.router.add_delete("/api/v1/transactions/{jobId}", delete_transaction)
