"""Postgres queries of the merchant's ledger: exports streamed from a cursor, daily totals."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import asyncpg

from khqr_gateway.infra.db import conditions, row_as
from khqr_gateway.transactions.model import DayTotals, HourCounts

# Bakong has no settlement report: these queries are the merchant's ledger, so money is read
# exactly (numeric), and a value Bakong sent that is not a number reads as null, never as an
# error halfway through a stream.
NUMBER_RE = r"^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$"
REPORT_TZ = "Asia/Phnom_Penh"

EXPORT_COLUMNS = (
    "jobId",
    "md5",
    "status",
    "late",
    "amount",
    "currency",
    "toAccountId",
    "fromAccountId",
    "hash",
    "externalRef",
    "billNumber",
    "createdAt",
    "paidAt",
    "completedAt",
    "metadata",
)
# Rows a cursor fetches per round trip: large enough to stream fast, small enough that memory
# stays flat (each row is at most a few KB, metadata included).
EXPORT_BATCH = 500


def _number(expr: str) -> str:
    return f"case when ({expr}) ~ '{NUMBER_RE}' then ({expr})::numeric end"


def _iso(expr: str) -> str:
    return f"""to_char(({expr}) at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"""


_PAID_MS = "coalesce(t.bakong_data->>'acknowledgedDateMs', t.bakong_data->>'createdDateMs')"
# What was paid when Bakong says, else what was asked for (a timeout still names its amount).
AMOUNT_SQL = _number("coalesce(t.bakong_data->>'amount', t.expected->>'amount')")
CURRENCY_SQL = "coalesce(t.bakong_data->>'currency', t.expected->>'currency')"
ACCOUNT_SQL = "coalesce(t.bakong_data->>'toAccountId', t.expected->>'toAccountId')"
_EXPORT_SELECT = f"""
    t.id::text as "jobId", t.md5, t.status, t.late, {AMOUNT_SQL} as amount,
    {CURRENCY_SQL} as currency, {ACCOUNT_SQL} as "toAccountId",
    t.bakong_data->>'fromAccountId' as "fromAccountId", t.bakong_data->>'hash' as hash,
    t.bakong_data->>'externalRef' as "externalRef", t.bill_number as "billNumber",
    {_iso("t.created_at")} as "createdAt",
    {_iso(f"to_timestamp({_number(_PAID_MS)} / 1000.0)")} as "paidAt",
    {_iso("t.completed_at")} as "completedAt", t.metadata::text as metadata
"""


@dataclass(frozen=True, slots=True)
class ExportFilter:
    since: datetime | None
    until: datetime | None
    status: str | None


def _csv_cell(name: str) -> str:
    # A spreadsheet runs a cell starting with = + - @ (or a tab or CR before them) as a
    # formula: such text gets a leading '. An amount is a number, never touched.
    column = f'e."{name}"'
    if name == "late":
        return "case when e.late then 'true' else 'false' end as late"
    if name == "amount":
        return column
    return (
        f"case when {column} ~ E'^[-=+@\\t\\r]' then '''' || {column} "
        f'else {column} end as "{name}"'
    )


def _export_query(app_id: str, wanted: ExportFilter, *, as_json: bool) -> tuple[str, list[Any]]:
    args: list[Any] = []
    filters = [
        ("t.app_id =", app_id),
        ("t.created_at >=", wanted.since),
        ("t.created_at <", wanted.until),
        ("t.status =", wanted.status),
    ]
    # Superseded rows are history of an md5 whose payment another row reports: exporting
    # them would count one payment twice.
    where = [*conditions(filters, args), "not t.superseded"]
    # Built by Postgres: numbers stay exact, metadata stays the JSON stored, and CSV is
    # quoted by COPY, which knows every rule of it.
    columns = (
        f"json_build_object({_json_pairs()})::text as line"
        if as_json
        else ", ".join(_csv_cell(name) for name in EXPORT_COLUMNS)
    )
    query = (
        f"select {columns} from (select {_EXPORT_SELECT} from transactions t"
        f" where {' and '.join(where)} order by t.created_at, t.id) e"
    )
    return query, args


def _json_pairs() -> str:
    pairs = [
        f"'{name}', e.\"{name}\"" if name != "metadata" else "'metadata', e.metadata::json"
        for name in EXPORT_COLUMNS
    ]
    return ", ".join(pairs)


async def export_csv(
    pool: asyncpg.Pool,
    app_id: str,
    wanted: ExportFilter,
    write: Callable[[bytes], Awaitable[None]],
) -> None:
    """The app's export as CSV with a header line, handed to `write` chunk by chunk as COPY sends
    it: each write is awaited, so a slow reader slows the query instead of filling memory."""
    query, args = _export_query(app_id, wanted, as_json=False)
    async with pool.acquire() as conn:
        await conn.copy_from_query(query, *args, output=write, format="csv", header=True)


async def export_jsonl(
    pool: asyncpg.Pool,
    app_id: str,
    wanted: ExportFilter,
    write: Callable[[bytes], Awaitable[None]],
) -> None:
    """The app's export as JSON lines, oldest first, handed to `write` a batch of lines at a
    time from a server-side cursor in one read-only snapshot: each write is awaited before
    the next batch is read, so memory stays flat however many rows there are."""
    query, args = _export_query(app_id, wanted, as_json=True)
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        cursor = await conn.cursor(query, *args)
        while batch := await cursor.fetch(EXPORT_BATCH):
            await write("".join(r["line"] + "\n" for r in batch).encode())


# One range read of the completed_at index, grouped once: no query per day.
DAILY_REPORT_SQL = f"""
        select (t.completed_at at time zone '{REPORT_TZ}')::date as day,
               {CURRENCY_SQL} as currency, {ACCOUNT_SQL} as account,
               count(*) filter (where t.status = 'success') as paid_count,
               coalesce(sum({AMOUNT_SQL}) filter (where t.status = 'success'), 0) as paid_sum,
               count(*) filter (where t.status = 'success' and t.late) as late_count,
               count(*) filter (where t.status = 'mismatch') as mismatch_count,
               coalesce(sum({AMOUNT_SQL}) filter (where t.status = 'mismatch'), 0)
                   as mismatch_sum,
               count(*) filter (where t.status = 'failed') as failed_count,
               count(*) filter (where t.status = 'timeout') as timeout_count
        from transactions t
        where t.app_id = $3 and not t.superseded
          and t.completed_at >= ($1::date::timestamp at time zone '{REPORT_TZ}')
          and t.completed_at < (($2::date + 1)::timestamp at time zone '{REPORT_TZ}')
          and t.status in ('success', 'mismatch', 'failed', 'timeout')
        group by 1, 2, 3
        order by 1, 2 nulls last, 3 nulls last
        """


async def daily_report(pool: asyncpg.Pool, app_id: str, first: date, last: date) -> list[DayTotals]:
    """Of the app, per day (Asia/Phnom_Penh, the day it completed), currency and account:
    payments (late ones included), mismatches, failures and timeouts, from `first` to `last`
    included."""
    rows = await pool.fetch(DAILY_REPORT_SQL, first, last, app_id)
    return [row_as(DayTotals, r) for r in rows]


# The dashboard's charts: two range reads of indexes (transactions_finished,
# deliveries_created) over the last 24 hours, grouped by UTC hour whatever the server's
# TimeZone (the poll-lag peaks beside them are kept by UTC hour).
HOURLY_SQL = """
    with hours as (
        select generate_series(date_trunc('hour', now(), 'UTC') - interval '23 hours',
                               date_trunc('hour', now(), 'UTC'), interval '1 hour') as hour
    ), paid as (
        select date_trunc('hour', completed_at, 'UTC') as hour,
               count(*) filter (where status = 'success') as paid,
               count(*) filter (where status = 'mismatch') as mismatch
        from transactions
        where not superseded
          and completed_at >= date_trunc('hour', now(), 'UTC') - interval '23 hours'
          and status in ('success', 'mismatch') and app_id = $1
        group by 1
    ), hooks as (
        select date_trunc('hour', created_at, 'UTC') as hour,
               count(*) filter (where status = 'delivered') as delivered,
               count(*) filter (where status = 'failed') as failed,
               count(*) filter (where status = 'pending' and attempt_count > 0) as retrying
        from deliveries
        where app_id = $1 and created_at >= date_trunc('hour', now(), 'UTC') - interval '23 hours'
        group by 1
    )
    select hours.hour, coalesce(paid.paid, 0) as paid, coalesce(paid.mismatch, 0) as mismatch,
           coalesce(hooks.delivered, 0) as delivered, coalesce(hooks.failed, 0) as failed,
           coalesce(hooks.retrying, 0) as retrying
    from hours left join paid using (hour) left join hooks using (hour)
    order by hours.hour
"""


async def hourly(pool: asyncpg.Pool, app_id: str) -> list[HourCounts]:
    """Per hour of the last 24, of the app: payments, mismatches, and webhooks delivered,
    failed and being retried (by the hour they were made)."""
    return [row_as(HourCounts, r) for r in await pool.fetch(HOURLY_SQL, app_id)]
