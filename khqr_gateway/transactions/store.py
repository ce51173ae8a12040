"""Postgres queries for transactions and their terminal transitions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson

from khqr_gateway.deliveries.model import DeliveryStatus
from khqr_gateway.infra import keyset
from khqr_gateway.infra.db import row_as, safe_text
from khqr_gateway.transactions.model import (
    CancelledRow,
    Expected,
    LateItem,
    LateTransition,
    LateWindow,
    PollItem,
    Reason,
    Status,
    Transition,
)

TRANSACTION_COLUMNS = """
    t.id, t.md5, t.status, t.reason, t.webhook_url, t.expected, t.metadata, t.bakong_data,
    t.created_at, t.updated_at, t.deadline_at, t.completed_at, t.late, t.previous_status,
    t.late_watch_until, t.deeplink,
    d.id as delivery_id, d.status as delivery_status, d.attempt_count as delivery_attempts,
    d.last_status_code as delivery_last_status, d.next_attempt_at as delivery_next_attempt_at,
    d.delivered_at as delivery_delivered_at
"""
# A transaction's delivery is its latest: a late payment's, once there is one.
_FROM = """transactions t left join lateral (
    select * from deliveries where transaction_id = t.id
    order by created_at desc, id desc limit 1
) d on true"""
# What a batch insert returns of each new row: a CreatedRow.
CREATED_COLUMNS = "id, md5, status, created_at, deadline_at"


@dataclass(frozen=True, slots=True)
class CreatedRow:
    """What the answer to a create shows of its transaction."""

    id: UUID
    md5: str
    status: Status
    created_at: datetime
    deadline_at: datetime


@dataclass(frozen=True, slots=True)
class LatestDelivery:
    """A transaction's latest webhook delivery: a late payment's, once there is one."""

    id: str
    status: DeliveryStatus
    attempts: int
    last_status_code: int | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None


@dataclass(frozen=True, slots=True)
class TransactionRow(CreatedRow):
    """A transaction as the API shows it (TRANSACTION_COLUMNS); JSON columns as stored."""

    reason: str | None
    webhook_url: str
    expected: dict[str, Any] | None
    metadata: Any
    bakong_data: dict[str, Any] | None
    updated_at: datetime
    completed_at: datetime | None
    late: bool
    previous_status: Status | None
    late_watch_until: datetime | None
    deeplink: str | None
    delivery: LatestDelivery | None


def _created(r: asyncpg.Record) -> tuple[UUID, str, Status, datetime, datetime]:
    """The CreatedRow fields of a row, in their order."""
    return r["id"], r["md5"], Status(r["status"]), r["created_at"], r["deadline_at"]


def _created_row(r: asyncpg.Record) -> CreatedRow:
    return CreatedRow(*_created(r))


def _transaction_row(r: asyncpg.Record) -> TransactionRow:
    previous = r["previous_status"]
    return TransactionRow(
        *_created(r),
        reason=r["reason"],
        webhook_url=r["webhook_url"],
        expected=r["expected"],
        metadata=r["metadata"],
        bakong_data=r["bakong_data"],
        updated_at=r["updated_at"],
        completed_at=r["completed_at"],
        late=r["late"],
        previous_status=None if previous is None else Status(previous),
        late_watch_until=r["late_watch_until"],
        deeplink=r["deeplink"],
        delivery=_latest_delivery(r),
    )


def _latest_delivery(r: asyncpg.Record) -> LatestDelivery | None:
    if r["delivery_id"] is None:
        return None
    return LatestDelivery(
        id=r["delivery_id"],
        status=DeliveryStatus(r["delivery_status"]),
        attempts=r["delivery_attempts"],
        last_status_code=r["delivery_last_status"],
        next_attempt_at=r["delivery_next_attempt_at"],
        delivered_at=r["delivery_delivered_at"],
    )


@dataclass(frozen=True, slots=True)
class NewTransaction:
    app_id: str
    id: UUID
    md5: str
    webhook_url: str
    credential_id: int | None
    expected: Expected | None
    metadata: Any
    qr: str | None
    deadline_at: datetime
    qr_expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Due:
    """A transaction as reconcile schedules it: its id, and its deadline (a poll) or the end
    of its late watch."""

    id: UUID
    at: datetime


@dataclass(frozen=True, slots=True)
class PendingCounts:
    """What checking every pending md5 costs in Bakong calls (see `pending_demand`)."""

    young: int
    old: int
    ending: int
    lists: int


async def insert_or_get(pool: asyncpg.Pool, new: NewTransaction) -> tuple[TransactionRow, bool]:
    """Insert a pending transaction, or return the md5's transaction in its app, whatever its
    status."""
    async with pool.acquire() as conn:
        inserted = await conn.fetchval(
            """
            insert into transactions
                (id, md5, webhook_url, credential_id, expected, metadata, qr, deadline_at,
                 qr_expires_at, app_id)
            values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
            on conflict (app_id, md5) where not superseded do nothing
            returning id
            """,
            new.id,
            new.md5,
            new.webhook_url,
            new.credential_id,
            new.expected.to_json() if new.expected else None,
            new.metadata,
            new.qr,
            new.deadline_at,
            new.qr_expires_at,
            new.app_id,
        )
        row = await conn.fetchrow(
            f"select {TRANSACTION_COLUMNS} from {_FROM} where t.app_id = $2 and "
            + ("t.id = $1" if inserted else "t.md5 = $1 and not t.superseded"),
            inserted or new.md5,
            new.app_id,
        )
    if row is None:  # only if retention pruned the md5's row between the two statements
        raise RuntimeError("could not insert or find the transaction of an md5")
    return _transaction_row(row), inserted is not None


async def insert_pending(pool: asyncpg.Pool, news: Sequence[NewTransaction]) -> list[CreatedRow]:
    """Insert pending transactions in one statement; returns the rows inserted.

    One whose md5 is already tracked in its app is skipped, so it is not among the rows
    returned; `news` must not repeat an (app, md5). Rows go in (app, md5) order: two batches
    that share md5s wait for each other in the same order, never in a cycle (a deadlock).
    """
    rows = await pool.fetch(
        f"""
        insert into transactions
            (id, md5, webhook_url, credential_id, expected, metadata, qr, deadline_at,
             qr_expires_at, app_id)
        select id, md5, webhook_url, credential_id, expected::jsonb, metadata::json, qr,
               deadline_at, qr_expires_at, app_id
        from unnest($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[],
                    $7::text[], $8::timestamptz[], $9::timestamptz[], $10::text[])
            as u(id, md5, webhook_url, credential_id, expected, metadata, qr, deadline_at,
                 qr_expires_at, app_id)
        order by app_id, md5
        on conflict (app_id, md5) where not superseded do nothing
        returning {CREATED_COLUMNS}
        """,
        [n.id for n in news],
        [n.md5 for n in news],
        [n.webhook_url for n in news],
        [n.credential_id for n in news],
        [_json_text(n.expected.to_json()) if n.expected else None for n in news],
        [_json_text(n.metadata) for n in news],
        [n.qr for n in news],
        [n.deadline_at for n in news],
        [n.qr_expires_at for n in news],
        [n.app_id for n in news],
    )
    return [_created_row(r) for r in rows]


async def get(pool: asyncpg.Pool, app_id: str, job_id: UUID) -> TransactionRow | None:
    """The app's transaction with this id; None when there is none (or another app's)."""
    row = await pool.fetchrow(
        f"select {TRANSACTION_COLUMNS} from {_FROM} where t.app_id = $1 and t.id = $2",
        app_id,
        job_id,
    )
    return None if row is None else _transaction_row(row)


async def expected_of(pool: asyncpg.Pool, app_id: str | None, md5: str) -> Expected | None:
    """What the md5's transaction in the app (None: in any app, a pending one first, then the
    newest) expects of its payment, if it is tracked with any."""
    value = await pool.fetchval(
        """
        select expected from transactions
        where ($1::text is null or app_id = $1) and md5 = $2 and not superseded
        order by status = 'pending' desc, created_at desc, id desc limit 1
        """,
        app_id,
        md5,
    )
    return Expected.from_json(value)


async def list_page(
    pool: asyncpg.Pool,
    app_id: str,
    *,
    md5: str | None,
    status: Status | None,
    limit: int,
    before: tuple[datetime, UUID] | None,
    q: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[TransactionRow]:
    """Newest first; `before` is the (created_at, id) of the last row of the previous page;
    `q` as search_filter finds it; `since` and `until` bound the creation time."""
    filters: list[tuple[str, Any]] = [
        ("t.app_id =", app_id),
        ("t.md5 =", md5),
        ("t.status =", status.value if status else None),
        ("t.created_at >=", since),
        ("t.created_at <", until),
    ]
    if q is not None:
        filters.append(search_filter(q))
    return await keyset.newest_first(
        pool,
        f"select {TRANSACTION_COLUMNS} from {_FROM}",
        "t",
        filters,
        as_row=_transaction_row,
        before=before,
        limit=limit,
    )


MD5_PREFIX_MIN = 4
_HEX = frozenset("0123456789abcdef")


def search_filter(q: str) -> tuple[str, str]:
    """The condition (its value written `{}`) and value of a search: the jobId `q`, the md5s
    that start with it, or a bill number or metadata value equal to it in any case. Only the
    branches `q` can match are asked, so that a value is never cast in vain."""
    term = q.strip().lower()
    branches = ["s.search_terms @> array[{}::text]"]
    if MD5_PREFIX_MIN <= len(term) <= 32 and set(term) <= _HEX:
        # A range of the text_pattern_ops index: hex digits all sort before 'g'.
        branches.append("(s.md5 ~>=~ {}::text and s.md5 ~<~ ({}::text || 'g'))")
    if _is_uuid(term):
        branches.append("s.id = {}::text::uuid")
    # The matches are found first, by their indexes (GIN transactions_search,
    # transactions_md5_prefix, the key), and only they are sorted: asked as one condition
    # of a newest-first page, the planner would walk every row by created_at instead,
    # betting that matches are common.
    return (
        "t.id = any(array(select s.id from transactions s where " + " or ".join(branches) + "))",
        term,
    )


def _is_uuid(text: str) -> bool:
    try:
        return str(UUID(text)) == text
    except ValueError:
        return False


async def cancel(
    pool: asyncpg.Pool, app_id: str, job_id: UUID, *, window: LateWindow
) -> CancelledRow | None:
    """Cancel the app's transaction if pending, starting its late watch; None when it was not
    pending (or is another app's)."""
    row = await pool.fetchrow(
        f"""
        update transactions t set status = 'cancelled', reason = $4,
            completed_at = now(), updated_at = now(),
            late_watch_until = {late_watch_sql("now()", "$2", "$3")}
        where id = $1 and app_id = $5 and status = 'pending' returning id, late_watch_until
        """,
        job_id,
        window.margin_s,
        window.watch_s,
        Reason.CANCELLED_BY_REQUEST,
        app_id,
    )
    return None if row is None else row_as(CancelledRow, row)


async def load_pending(pool: asyncpg.Pool, ids: Sequence[UUID | str]) -> list[PollItem]:
    """The still-pending transactions among `ids`, in the order of `ids` (the claim's
    oldest-due-first order, which the rate limit's fairness relies on)."""
    rows = await pool.fetch(
        """
        select t.id, t.md5, t.deadline_at, t.credential_id, t.expected, t.created_at
        from unnest($1::uuid[]) with ordinality as wanted (id, n)
        join transactions t on t.id = wanted.id
        where t.status = 'pending'
        order by wanted.n
        """,
        list(ids),
    )
    return [_poll_item(r) for r in rows]


def _poll_item(row: asyncpg.Record) -> PollItem:
    return row_as(PollItem, row, expected=Expected.from_json(row["expected"]))


async def pending_demand(
    pool: asyncpg.Pool,
    *,
    single: Sequence[int],
    default_id: int | None,
    young_s: float,
    ending_s: float,
    batch: int,
) -> PendingCounts:
    """What checking every pending md5 costs in Bakong calls: of the credentials in `single`
    (one call per md5), how many md5s are younger than `young_s` (`young`) and how many
    older (`old`); of all, how many reach their deadline within `ending_s` (`ending`: one
    final call each); of the others, the list calls of `batch` md5s one round takes
    (`lists`)."""
    row = await pool.fetchrow(
        """
        with pending as (
            select credential_id, created_at, deadline_at,
                   coalesce(coalesce(credential_id, $2::bigint) = any($1::bigint[]), false)
                       as single
            from transactions
            where status = 'pending'
        )
        select
            count(*) filter (
                where single and created_at > now() - make_interval(secs => $3)) as young,
            count(*) filter (
                where single and created_at <= now() - make_interval(secs => $3)) as old,
            count(*) filter (where deadline_at < now() + make_interval(secs => $4)) as ending,
            (select coalesce(sum(ceil(n / $5::float8)), 0)::bigint
             from (select count(*) as n from pending where not single
                   group by credential_id) as per_credential) as lists
        from pending
        """,
        list(single),
        default_id,
        young_s,
        ending_s,
        batch,
    )
    return row_as(PendingCounts, row)


async def metadata_of(pool: asyncpg.Pool, ids: Sequence[UUID]) -> dict[UUID, Any]:
    """The metadata of these transactions (for their webhooks), where they have some.

    Apart from load_pending: a check needs none of it, and up to 4 KB of JSON per md5 per
    check would be most of what polling reads and decodes."""
    if not ids:
        return {}
    rows = await pool.fetch(
        "select id, metadata from transactions where id = any($1::uuid[]) and metadata is not null",
        list(ids),
    )
    return {r["id"]: r["metadata"] for r in rows}


async def record_transitions(
    pool: asyncpg.Pool, transitions: Sequence[Transition], *, window: LateWindow
) -> list[tuple[UUID, str | None]]:
    """Apply terminal transitions that are still allowed, with their deliveries, atomically.

    One statement: the conditional UPDATE decides which transitions happen (a transaction
    leaves `pending` once), and only those get their delivery row. A timeout starts its late
    watch (see `late_watch_sql`). Returns the (transaction id, delivery id) of each
    transition that happened.
    """
    if not transitions:
        return []
    rows = await pool.fetch(
        f"""
        with input as (
            select * from unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                                 $6::bytea[])
                as u(id, status, reason, data, delivery_id, payload)
        ), done as (
            update transactions t
            set status = input.status, reason = input.reason, bakong_data = input.data::json,
                completed_at = now(), updated_at = now(),
                late_watch_until = case when input.status = 'timeout'
                    then {late_watch_sql("t.deadline_at", "$7", "$8")} end
            from input
            where t.id = input.id and t.status = 'pending'
            returning t.id, t.webhook_url, t.app_id
        ), delivered as (
            insert into deliveries (id, transaction_id, url, payload, next_attempt_at, app_id)
            select input.delivery_id, done.id, done.webhook_url, input.payload, now(), done.app_id
            from done join input on input.id = done.id
            where input.delivery_id is not null
            returning id, transaction_id
        )
        select done.id, delivered.id as delivery_id
        from done left join delivered on delivered.transaction_id = done.id
        """,
        [t.id for t in transitions],
        [t.status.value for t in transitions],
        # A reason quotes Bakong's reply (a mismatch's currency, account), so any bytes.
        [safe_text(t.reason) for t in transitions],
        [_json_text(t.data) for t in transitions],
        [t.delivery_id for t in transitions],
        [t.payload for t in transitions],
        window.margin_s,
        window.watch_s,
    )
    return [(r["id"], r["delivery_id"]) for r in rows]


def late_watch_sql(given_up_at: str, margin: str, watch: str) -> str:
    """Until when a transaction given up on at `given_up_at` is watched for a late payment:
    its QR's expiry plus the margin when known, else the watch past `given_up_at`."""
    return (
        f"coalesce(t.qr_expires_at + {margin}::int * interval '1 second', "
        f"{given_up_at} + {watch}::int * interval '1 second')"
    )


async def load_late(pool: asyncpg.Pool, ids: Sequence[UUID | str]) -> list[LateItem]:
    """The transactions among `ids` still watched for a late payment, in the order of `ids`."""
    rows = await pool.fetch(
        """
        select t.id, t.md5, t.deadline_at, t.credential_id, t.expected, t.status,
               t.late_watch_until as watch_until
        from unnest($1::uuid[]) with ordinality as wanted (id, n)
        join transactions t on t.id = wanted.id
        where t.status in ('timeout', 'cancelled') and t.late_watch_until is not null
        order by wanted.n
        """,
        list(ids),
    )
    return [row_as(LateItem, r, poll=_poll_item(r), status=Status(r["status"])) for r in rows]


async def record_late(
    pool: asyncpg.Pool, late: Sequence[LateTransition]
) -> list[tuple[UUID, str | None]]:
    """Record late payments with their deliveries, atomically, each at most once: only a
    transaction still in the state it was watched in moves. A `timeout` webhook still being
    retried stops (failed, `superseded_by_late_payment`): arriving after the late `success`
    it would read as the last word. Returns, like `record_transitions`, the (transaction id,
    delivery id) of each that happened."""
    if not late:
        return []
    rows = await pool.fetch(
        """
        with input as (
            select * from unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                                 $6::bytea[], $7::text[])
                as u(id, status, reason, data, delivery_id, payload, previous)
        ), done as (
            update transactions t
            set previous_status = t.status, status = input.status, reason = input.reason,
                bakong_data = input.data::json, late = true, completed_at = now(),
                updated_at = now()
            from input
            where t.id = input.id and t.status = input.previous
            returning t.id, t.webhook_url, t.app_id
        ), superseded as (
            update deliveries d set status = 'failed', last_error = 'superseded_by_late_payment',
                next_attempt_at = null, updated_at = now()
            from done where d.transaction_id = done.id and d.status = 'pending'
        ), delivered as (
            insert into deliveries (id, transaction_id, url, payload, next_attempt_at, app_id)
            select input.delivery_id, done.id, done.webhook_url, input.payload, now(), done.app_id
            from done join input on input.id = done.id
            returning id, transaction_id
        )
        select done.id, delivered.id as delivery_id
        from done left join delivered on delivered.transaction_id = done.id
        """,
        [x.transition.id for x in late],
        [x.transition.status.value for x in late],
        [safe_text(x.transition.reason) for x in late],
        [_json_text(x.transition.data) for x in late],
        [x.transition.delivery_id for x in late],
        [x.transition.payload for x in late],
        [x.previous.value for x in late],
    )
    return [(r["id"], r["delivery_id"]) for r in rows]


async def late_watch_page(
    pool: asyncpg.Pool, *, after: tuple[datetime, UUID] | None, limit: int
) -> list[Due]:
    """A page of the late watches still running (`at` their end), for reconcile."""
    rows = await pool.fetch(
        """
        select id, late_watch_until as at from transactions
        where status in ('timeout', 'cancelled') and late_watch_until > now()
          and ($1::timestamptz is null or (late_watch_until, id) > ($1, $2::uuid))
        order by late_watch_until, id limit $3
        """,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )
    return [row_as(Due, r) for r in rows]


def _json_text(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


async def pending_ids(pool: asyncpg.Pool, *, after: UUID | None, limit: int) -> list[Due]:
    """A page of pending transactions (`at` their deadline) in id order, for reconcile."""
    rows = await pool.fetch(
        """
        select id, deadline_at as at from transactions
        where status = 'pending' and ($1::uuid is null or id > $1)
        order by id limit $2
        """,
        after,
        limit,
    )
    return [row_as(Due, r) for r in rows]


async def oldest_pending_by_app(pool: asyncpg.Pool) -> dict[str, float]:
    """How long each app's oldest pending transaction has waited, for apps with one pending:
    one index probe per app (transactions_app_status_created), however many rows are final."""
    rows = await pool.fetch(
        """
        select a.id, extract(epoch from now() - o.oldest) as age
        from apps a cross join lateral (
            select min(created_at) as oldest from transactions t
            where t.app_id = a.id and t.status = 'pending'
        ) o
        where o.oldest is not null
        """
    )
    return {r["id"]: float(r["age"]) for r in rows}
