"""Handler of /api/v1/notices: the Telegram notices and how each went."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp_apigami import docs, request_schema, response_schema
from marshmallow import RAISE, Schema, fields, validate

from khqr_gateway.http.json import iso, json_response
from khqr_gateway.http.openapi import errors
from khqr_gateway.http.request import app_of, load_query
from khqr_gateway.notices import store
from khqr_gateway.notices.model import NoticeRow, NoticeStatus
from khqr_gateway.service import SERVICE_KEY

NOTICE_STATUSES = [s.value for s in NoticeStatus]


class NoticeListQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    status = fields.String(validate=validate.OneOf(NOTICE_STATUSES))
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))


class NoticeSchema(Schema):
    id = fields.Integer(required=True)
    jobId = fields.UUID(required=True)
    late = fields.Boolean()
    chatId = fields.String()
    status = fields.String(metadata={"enum": NOTICE_STATUSES})
    attempts = fields.Integer()
    nextAttemptAt = fields.DateTime(allow_none=True)
    lastStatusCode = fields.Integer(allow_none=True)
    lastError = fields.String(
        allow_none=True,
        metadata={"description": "Telegram's description, e.g. 'Forbidden: bot was blocked'"},
    )
    createdAt = fields.DateTime()
    sentAt = fields.DateTime(allow_none=True)


class NoticeListSchema(Schema):
    data = fields.List(fields.Nested(NoticeSchema))


QUERY_SCHEMA = NoticeListQuerySchema()


def notice_json(row: NoticeRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "jobId": str(row.transaction_id),
        "late": row.late,
        "chatId": row.chat_id,
        "status": row.status,
        "attempts": row.attempt_count,
        "nextAttemptAt": iso(row.next_attempt_at) if row.status is NoticeStatus.PENDING else None,
        "lastStatusCode": row.last_status_code,
        "lastError": row.last_error,
        "createdAt": iso(row.created_at),
        "sentAt": iso(row.sent_at),
    }


@docs(
    tags=["deliveries"],
    summary="Telegram notices, newest first",
    description="One per payment, mismatch and late payment when TELEGRAM_BOT_TOKEN and "
    "TELEGRAM_CHAT_ID are set. `failed` ones stopped: the chat is gone, the bot was blocked "
    "or its token is wrong (lastError says which), or every retry failed.",
    responses=errors(401, 422),
)
@request_schema(NoticeListQuerySchema, location="querystring")
@response_schema(NoticeListSchema, 200)
async def list_notices(request: web.Request) -> web.Response:
    """GET /api/v1/notices?status=&limit=."""
    query = load_query(request, QUERY_SCHEMA)
    status = NoticeStatus(query["status"]) if "status" in query else None
    rows = await store.newest(
        request.app[SERVICE_KEY].pool, app_of(request), status=status, limit=query["limit"]
    )
    return json_response({"data": [notice_json(r) for r in rows]})
