"""Postgres queries for webhook deliveries and their attempts."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from uuid import UUID

import asyncpg
import orjson

from khqr_gateway.deliveries.model import (
    Attempt,
    AttemptRecord,
    Delivery,
    DeliveryStatus,
    DueDelivery,
    PendingDelivery,
)
from khqr_gateway.infra import keyset
from khqr_gateway.infra.db import safe_text


async def load_due(pool: asyncpg.Pool, ids: Sequence[str]) -> list[DueDelivery]:
    rows = await pool.fetch(
        """
        select d.id, d.transaction_id, t.md5, d.url, d.payload, d.attempt_count, d.series_attempts,
               d.next_attempt_at, d.app_id
        from deliveries d join transactions t on t.id = d.transaction_id
        where d.id = any($1::text[]) and d.status = 'pending'
        """,
        list(ids),
    )
    return [DueDelivery(**dict(r)) for r in rows]


async def record_attempts(pool: asyncpg.Pool, records: Sequence[AttemptRecord]) -> list[str]:
    """Store a batch of attempts and their deliveries' new state in one statement; returns
    the delivery ids. What the receiver sent is stored as text Postgres can hold."""
    if not records:
        return []
    await pool.execute(
        """
        with input as (
            select * from unnest($1::text[], $2::int[], $3::timestamptz[], $4::int[], $5::int[],
                                 $6::text[], $7::text[], $8::text[], $9::text[], $10::text[],
                                 $11::timestamptz[])
                as u(delivery_id, attempt, started_at, duration_ms, status_code, error_kind,
                     error_message, response_body, response_headers, new_status, next_attempt_at)
        ), attempts as (
            insert into delivery_attempts (delivery_id, attempt, started_at, duration_ms,
                status_code, error_kind, error_message, response_body, response_headers)
            select delivery_id, attempt, started_at, duration_ms, status_code, error_kind,
                   error_message, response_body, response_headers::jsonb
            from input
        )
        update deliveries d set
            status = input.new_status,
            attempt_count = greatest(d.attempt_count, input.attempt),
            series_attempts = d.series_attempts + 1,
            next_attempt_at = input.next_attempt_at,
            last_attempt_at = input.started_at,
            last_status_code = input.status_code,
            last_error = coalesce(input.error_kind, case when input.status_code >= 300
                                  then 'http_' || input.status_code end),
            -- a replay that fails keeps the time the delivery last got through
            delivered_at = case when input.new_status = 'delivered' then now()
                                else d.delivered_at end,
            updated_at = now()
        from input
        where d.id = input.delivery_id and d.status = 'pending'
        """,
        [r.delivery_id for r in records],
        [r.attempt for r in records],
        [r.started_at for r in records],
        [r.duration_ms for r in records],
        [r.status_code for r in records],
        [r.error_kind for r in records],
        [safe_text(r.error_message) for r in records],
        [safe_text(r.response_body) for r in records],
        [_headers_json(r.response_headers) for r in records],
        [r.new_status.value for r in records],
        [r.next_attempt_at for r in records],
    )
    return [r.delivery_id for r in records]


def _headers_json(headers: dict[str, str] | None) -> str | None:
    if not headers:
        return None
    return orjson.dumps({k: safe_text(v) for k, v in headers.items()}).decode()


async def pending_page(
    pool: asyncpg.Pool, *, after: str | None, limit: int
) -> list[PendingDelivery]:
    """A page of pending deliveries, by id, for the reconcile tick."""
    rows = await pool.fetch(
        """
        select id, next_attempt_at, series_attempts from deliveries
        where status = 'pending' and ($1::text is null or id > $1)
        order by id limit $2
        """,
        after,
        limit,
    )
    return [PendingDelivery(**dict(r)) for r in rows]


DELIVERY_COLUMNS = """
    d.id, d.transaction_id, t.md5, d.url, d.status, d.attempt_count, d.next_attempt_at,
    d.last_attempt_at, d.last_status_code, d.last_error, d.created_at, d.updated_at,
    d.delivered_at
"""
_FROM = "deliveries d join transactions t on t.id = d.transaction_id"
# A new attempt series, due now; the webhook-id (the delivery id) stays.
_RESTART = """
    status = 'pending', series_attempts = 0, next_attempt_at = now(), updated_at = now()
"""


async def list_page(
    pool: asyncpg.Pool,
    app_id: str,
    *,
    status: DeliveryStatus | None,
    transaction_id: UUID | None,
    since: datetime | None,
    limit: int,
    before: tuple[datetime, str] | None,
) -> list[Delivery]:
    """Newest first; `before` is the (created_at, id) of the last row of the previous page."""
    return await keyset.newest_first(
        pool,
        f"select {DELIVERY_COLUMNS} from {_FROM}",
        "d",
        [
            ("d.app_id =", app_id),
            ("d.status =", status.value if status else None),
            ("d.transaction_id =", transaction_id),
            ("d.created_at >=", since),
        ],
        as_row=_delivery,
        before=before,
        limit=limit,
    )


async def get(pool: asyncpg.Pool, app_id: str, delivery_id: str) -> Delivery | None:
    """One delivery of the app with the webhook body it sends."""
    row = await pool.fetchrow(
        f"select {DELIVERY_COLUMNS}, d.payload from {_FROM} where d.app_id = $1 and d.id = $2",
        app_id,
        delivery_id,
    )
    return _delivery(row) if row is not None else None


async def attempts_of(pool: asyncpg.Pool, app_id: str, delivery_id: str) -> list[Attempt]:
    """The attempts of the app's delivery; none for another app's."""
    rows = await pool.fetch(
        """
        select a.attempt, a.started_at, a.duration_ms, a.status_code, a.error_kind,
               a.error_message, a.response_body, a.response_headers
        from delivery_attempts a join deliveries d on d.id = a.delivery_id
        where d.app_id = $1 and a.delivery_id = $2 order by a.attempt, a.id
        """,
        app_id,
        delivery_id,
    )
    return [_attempt(r) for r in rows]


async def restart(pool: asyncpg.Pool, app_id: str, delivery_id: str) -> Delivery | None:
    """Start a new attempt series now, whatever the status; None if the app has no such
    delivery."""
    row = await pool.fetchrow(
        f"""
        update deliveries d set {_RESTART}
        from transactions t where d.app_id = $1 and d.id = $2 and t.id = d.transaction_id
        returning {DELIVERY_COLUMNS}
        """,
        app_id,
        delivery_id,
    )
    return _delivery(row) if row is not None else None


async def restart_matching(
    pool: asyncpg.Pool,
    app_id: str,
    *,
    status: DeliveryStatus,
    since: datetime | None,
    until: datetime | None,
    limit: int,
) -> tuple[list[str], bool]:
    """Restart up to `limit` of the app's deliveries with `status` created in [since, until),
    oldest first.

    Returns the restarted ids and whether more deliveries match. One statement.
    """
    row = await pool.fetchrow(
        f"""
        with picked as (
            select id from deliveries
            where app_id = $5 and status = $1 and ($2::timestamptz is null or created_at >= $2)
              and ($3::timestamptz is null or created_at < $3)
            order by created_at, id
            limit $4
            for update skip locked
        ), restarted as (
            update deliveries d set {_RESTART}
            from picked where d.id = picked.id
            returning d.id
        )
        select array(select id from restarted) as ids, exists(
            select 1 from deliveries
            where app_id = $5 and status = $1 and ($2::timestamptz is null or created_at >= $2)
              and ($3::timestamptz is null or created_at < $3)
              and id not in (select id from picked)
        ) as more
        """,
        status.value,
        since,
        until,
        limit,
        app_id,
    )
    return list(row["ids"]), bool(row["more"])


def _delivery(row: asyncpg.Record) -> Delivery:
    fields = dict(row)
    fields["status"] = DeliveryStatus(fields["status"])
    return Delivery(**fields)


def _attempt(row: asyncpg.Record) -> Attempt:
    fields = dict(row)
    if isinstance(fields["response_headers"], str):  # a connection without the JSON codec
        fields["response_headers"] = orjson.loads(fields["response_headers"])
    return Attempt(**fields)
