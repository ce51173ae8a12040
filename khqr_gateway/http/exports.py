"""Handlers of the merchant's ledger: the transaction export and the daily report."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web
from aiohttp_apigami import docs, request_schema, response_schema
from marshmallow import RAISE, Schema, fields, validate

from khqr_gateway.http.errors import ApiError, invalid
from khqr_gateway.http.fields import Instant, checks_window
from khqr_gateway.http.json import iso, json_response
from khqr_gateway.http.openapi import errors
from khqr_gateway.http.request import app_of, load_query
from khqr_gateway.service import SERVICE_KEY
from khqr_gateway.transactions import exports as store
from khqr_gateway.transactions.model import DayTotals, Status

REPORT_MAX_DAYS = 366
REPORT_DEFAULT_DAYS = 7
# Each export holds a pooled connection for as long as its client reads: a few at once, so
# that exports can never starve the API of connections.
EXPORTS_AT_ONCE = 2
EXPORT_SLOTS: web.AppKey[asyncio.Semaphore] = web.AppKey("export_slots", asyncio.Semaphore)
# The apps exporting in this process now: one export an app, so that one app can never hold
# every slot while another waits.
EXPORTING: web.AppKey[set[str]] = web.AppKey("exporting", set)
CONTENT_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson"}


class ExportQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    # `from` is a Python keyword: the field is named by data_key.
    since = Instant(data_key="from", metadata={"description": "Created at or after this time"})
    until = Instant(data_key="to", metadata={"description": "Created before this ISO 8601 time"})
    status = fields.String(validate=validate.OneOf([s.value for s in Status]))
    format = fields.String(load_default="csv", validate=validate.OneOf(list(CONTENT_TYPES)))
    _window = checks_window(since="from", until="to")


class DailyReportQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    first = fields.Date(data_key="from", metadata={"description": "First day (Asia/Phnom_Penh)"})
    last = fields.Date(data_key="to", metadata={"description": "Last day, included"})


class DailyRowSchema(Schema):
    day = fields.Date(required=True)
    currency = fields.String(allow_none=True)
    account = fields.String(allow_none=True, metadata={"description": "The account paid"})
    paidCount = fields.Integer(metadata={"description": "Payments, late ones included"})
    paidAmount = fields.Float()
    lateCount = fields.Integer(metadata={"description": "Of paidCount, found after a timeout"})
    mismatchCount = fields.Integer()
    mismatchAmount = fields.Float()
    failedCount = fields.Integer()
    timeoutCount = fields.Integer()


class DailyReportSchema(Schema):
    timezone = fields.String()
    # Named as the query names them: `from` is a Python keyword.
    first = fields.Date(data_key="from")
    last = fields.Date(data_key="to")
    data = fields.List(fields.Nested(DailyRowSchema))


EXPORT_SCHEMA = ExportQuerySchema()
REPORT_SCHEMA = DailyReportQuerySchema()


@docs(
    tags=["transactions"],
    summary="Export transactions (CSV or JSON lines), oldest first",
    description="Every transaction created in [from, to), streamed in constant memory. CSV "
    "is UTF-8 with a byte-order mark (spreadsheets then read Khmer right), times in ISO 8601 "
    "UTC, amounts as numbers; a text cell starting with = + - @ is prefixed with ' so that "
    "no spreadsheet runs it as a formula. metadata is the JSON stored.",
    responses={
        200: {
            "description": "The rows",
            "content": {
                "text/csv": {"schema": {"type": "string"}},
                "application/x-ndjson": {"schema": {"type": "string"}},
            },
        },
        **errors(401, 422, 429),
    },
)
@request_schema(ExportQuerySchema, location="querystring")
async def export_transactions(request: web.Request) -> web.StreamResponse:
    """GET /api/v1/transactions/export?from=&to=&status=&format=csv|jsonl."""
    query = load_query(request, EXPORT_SCHEMA)
    slots, exporting, app_id = request.app[EXPORT_SLOTS], request.app[EXPORTING], app_of(request)
    if app_id in exporting:
        raise _busy("an export of this app is running; retry when it ends")
    if slots.locked():
        raise _busy(f"{EXPORTS_AT_ONCE} exports are running; retry when one ends")
    exporting.add(app_id)
    try:
        async with slots:
            return await _stream(request, query)
    finally:
        exporting.discard(app_id)


def _busy(message: str) -> ApiError:
    return ApiError(429, "export_busy", message, headers={"Retry-After": "5"})


async def _stream(request: web.Request, query: dict[str, Any]) -> web.StreamResponse:
    kind = query["format"]
    wanted = store.ExportFilter(query.get("since"), query.get("until"), query.get("status"))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    response = web.StreamResponse(
        headers={
            "Content-Type": CONTENT_TYPES[kind],
            "Content-Disposition": f'attachment; filename="transactions-{stamp}.{kind}"',
            "Cache-Control": "no-store",
        }
    )
    pool, app_id = request.app[SERVICE_KEY].pool, app_of(request)

    async def write(chunk: bytes) -> None:
        # The head goes out with the first rows (the header line at least), so that a
        # database error before them is still answered as one, not as a cut stream.
        if not response.prepared:
            await response.prepare(request)
            if kind == "csv":
                await response.write("\ufeff".encode())
        await response.write(chunk)

    export = store.export_csv if kind == "csv" else store.export_jsonl
    await export(pool, app_id, wanted, write)
    if not response.prepared:  # a JSON export of no rows
        await response.prepare(request)
    await response.write_eof()
    return response


def report_days(query: dict[str, Any], today: date) -> tuple[date, date]:
    """The report's first and last day: the last REPORT_DEFAULT_DAYS by default."""
    last = query.get("last") or max(today, query.get("first") or today)
    first = query.get("first") or _days_before(last, REPORT_DEFAULT_DAYS - 1)
    if first > last:
        raise invalid("to", "must be the same day as from or later")
    if (last - first).days >= REPORT_MAX_DAYS:
        raise invalid("to", f"at most {REPORT_MAX_DAYS} days from from")
    return first, last


def _days_before(day: date, days: int) -> date:
    try:
        return day - timedelta(days=days)
    except OverflowError:
        return date.min


def _amount(value: Decimal) -> int | float:
    # Summed exactly in Postgres; a JSON number here (KHR sums are whole, USD has cents).
    return int(value) if value == value.to_integral_value() else float(value)


def report_row(row: DayTotals) -> dict[str, Any]:
    return {
        "day": row.day.isoformat(),
        "currency": row.currency,
        "account": row.account,
        "paidCount": row.paid_count,
        "paidAmount": _amount(row.paid_sum),
        "lateCount": row.late_count,
        "mismatchCount": row.mismatch_count,
        "mismatchAmount": _amount(row.mismatch_sum),
        "failedCount": row.failed_count,
        "timeoutCount": row.timeout_count,
    }


@docs(
    tags=["transactions"],
    summary="Daily totals per currency and account (Asia/Phnom_Penh days)",
    description="For each day from `from` to `to` (both included, default the last 7 days), "
    "currency and account paid: payments and their sum (late payments included, counted on "
    "the day they were found), mismatches, failures and timeouts.",
    responses=errors(401, 422),
)
@request_schema(DailyReportQuerySchema, location="querystring")
@response_schema(DailyReportSchema, 200)
async def daily_report(request: web.Request) -> web.Response:
    """GET /api/v1/reports/daily?from=&to=."""
    query = load_query(request, REPORT_SCHEMA)
    today = datetime.now(ZoneInfo(store.REPORT_TZ)).date()
    first, last = report_days(query, today)
    rows = await store.daily_report(request.app[SERVICE_KEY].pool, app_of(request), first, last)
    return json_response(
        {
            "timezone": store.REPORT_TZ,
            "from": first.isoformat(),
            "to": last.isoformat(),
            "data": [report_row(r) for r in rows],
        }
    )


class HourSchema(Schema):
    hour = fields.DateTime(required=True)
    paid = fields.Integer()
    mismatch = fields.Integer()
    delivered = fields.Integer(metadata={"description": "Webhooks made this hour, delivered"})
    failed = fields.Integer()
    retrying = fields.Integer()
    pollLagSeconds = fields.Float(
        allow_none=True,
        metadata={
            "description": "The highest poll lag the gateway saw this hour (of every app); "
            "null for an hour no gateway process ran in"
        },
    )


class HourlySchema(Schema):
    data = fields.List(fields.Nested(HourSchema))


@docs(
    tags=["transactions"],
    summary="The last 24 hours, hour by hour: payments and webhook outcomes",
    description="What the dashboard's charts draw: per hour (UTC), payments and mismatches "
    "completed, the webhooks made that hour by their outcome so far, and the gateway's "
    "highest poll lag.",
    responses=errors(401),
)
@response_schema(HourlySchema, 200)
async def hourly_report(request: web.Request) -> web.Response:
    """GET /api/v1/reports/hourly."""
    service = request.app[SERVICE_KEY]
    rows = await store.hourly(service.pool, app_of(request))
    lag_ms = await service.lag_peaks.read()
    return json_response(
        {
            "data": [
                {
                    "hour": iso(r.hour),
                    "paid": r.paid,
                    "mismatch": r.mismatch,
                    "delivered": r.delivered,
                    "failed": r.failed,
                    "retrying": r.retrying,
                    "pollLagSeconds": _seconds(lag_ms.get(int(r.hour.timestamp()))),
                }
                for r in rows
            ]
        }
    )


def _seconds(ms: int | None) -> float | None:
    return None if ms is None else ms / 1000
