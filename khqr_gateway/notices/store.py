"""Postgres queries of Telegram notices: made from paid transitions, leased, attempted."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

import asyncpg

from khqr_gateway.infra.db import row_as, safe_text
from khqr_gateway.notices.model import AppChat, DueNotice, NoticeAttempt, NoticeRow, NoticeStatus
from khqr_gateway.transactions.model import Status

# How far back the first sweep of a process looks when no notice exists yet: a bot set up
# today does not announce last month's payments.
FIRST_SWEEP_LOOKBACK_S = 600
# Overlap of one sweep with the previous: a transition committed late (a slow transaction)
# still falls inside the next window.
SWEEP_OVERLAP_S = 300
CLAIM_LIMIT = 20


async def sweep_start(pool: asyncpg.Pool) -> datetime:
    """Where the first sweep of a process starts: just before the newest notice, so that a
    restart after downtime misses none, else a few minutes back."""
    value: datetime = await pool.fetchval(
        """
        select coalesce(max(created_at) - $1 * interval '1 second',
                        now() - $2 * interval '1 second')
        from telegram_notices
        """,
        SWEEP_OVERLAP_S,
        FIRST_SWEEP_LOOKBACK_S,
    )
    return value


async def make_notices(pool: asyncpg.Pool, chats: Mapping[str, str], since: datetime) -> int:
    """A notice to each app's chat (`chats`: app id to chat id) for each of its paid or
    mismatched transitions completed since `since` that has none, in one statement; once per
    transition whichever process (or sweep) gets there first. An app not named is told
    nothing."""
    if not chats:
        return 0
    result = await pool.execute(
        """
        insert into telegram_notices (transaction_id, late, chat_id, app_id)
        select t.id, t.late, c.chat_id, t.app_id
        from unnest($1::text[], $2::text[]) as c (app_id, chat_id)
        join transactions t on t.app_id = c.app_id
        where t.completed_at >= $3 and not t.superseded
          and t.status in ('success', 'mismatch')
          -- Most of a sweep's window was noticed by the sweeps before: skipped here, they
          -- cost no insert attempt and no number of the sequence. The conflict clause is
          -- for two processes sweeping at once.
          and not exists (select 1 from telegram_notices n
                          where n.transaction_id = t.id and n.late = t.late)
        on conflict (transaction_id, late) do nothing
        """,
        list(chats),
        list(chats.values()),
        since,
    )
    return int(result.split()[-1])


async def app_chats(pool: asyncpg.Pool) -> list[AppChat]:
    """The apps told of their payments on Telegram (disabled ones too: their pending payments
    are still reported)."""
    rows = await pool.fetch(
        "select id as app_id, telegram_chat_id as chat_id, telegram_bot_token as bot_token,"
        " telegram_language as language"
        " from apps where telegram_chat_id is not null and telegram_bot_token is not null"
    )
    return [row_as(AppChat, r) for r in rows]


async def claim(pool: asyncpg.Pool, lease_s: float) -> list[DueNotice]:
    """Lease the due notices (no other process takes them until the lease ends)."""
    rows = await pool.fetch(
        """
        with due as (
            select id from telegram_notices
            where status = 'pending' and next_attempt_at <= now()
              and (lease_until is null or lease_until < now())
            order by next_attempt_at limit $2 for update skip locked
        ), leased as (
            update telegram_notices n set lease_until = now() + $1 * interval '1 second'
            from due where n.id = due.id
            returning n.id, n.chat_id, n.attempt_count, n.late, n.transaction_id, n.app_id
        )
        select leased.id, leased.chat_id, leased.attempt_count, leased.late, leased.app_id,
               t.status,
               t.reason, t.bakong_data as data, t.metadata, t.bill_number, t.completed_at,
               t.previous_status
        from leased join transactions t on t.id = leased.transaction_id
        """,
        lease_s,
        CLAIM_LIMIT,
    )
    return [
        row_as(
            DueNotice,
            r,
            status=Status(r["status"]),
            previous_status=Status(r["previous_status"]) if r["previous_status"] else None,
        )
        for r in rows
    ]


async def record(pool: asyncpg.Pool, attempts: Sequence[NoticeAttempt]) -> None:
    """Store the attempts and each notice's outcome, releasing their leases."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.executemany(
            """
            insert into telegram_attempts (notice_id, attempt, started_at, duration_ms,
                status_code, error, response_body)
            values ($1, $2, $3, $4, $5, $6, $7)
            """,
            [
                (
                    a.notice_id,
                    a.attempt,
                    a.started_at,
                    a.duration_ms,
                    a.status_code,
                    safe_text(a.error),
                    safe_text(a.body),
                )
                for a in attempts
            ],
        )
        await conn.executemany(
            """
            update telegram_notices set attempt_count = $2, last_status_code = $3,
                last_error = $4, lease_until = null,
                status = case when $6 then 'failed' when $5::timestamptz is null then 'sent'
                              else 'pending' end,
                next_attempt_at = coalesce($5, next_attempt_at),
                sent_at = case when not $6 and $5::timestamptz is null then now() end
            where id = $1
            """,
            [
                (
                    a.notice_id,
                    a.attempt,
                    a.status_code,
                    safe_text(a.error),
                    a.next_attempt_at,
                    a.failed,
                )
                for a in attempts
            ],
        )


async def newest(
    pool: asyncpg.Pool, app_id: str, *, status: NoticeStatus | None, limit: int
) -> list[NoticeRow]:
    """The app's newest notices, optionally of one status (what an operator checks)."""
    rows = await pool.fetch(
        """
        select id, transaction_id, late, chat_id, status, attempt_count, next_attempt_at,
               last_status_code, last_error, created_at, sent_at
        from telegram_notices where app_id = $3 and ($1::text is null or status = $1)
        order by created_at desc, id desc limit $2
        """,
        status,
        limit,
        app_id,
    )
    return [row_as(NoticeRow, r, status=NoticeStatus(r["status"])) for r in rows]
