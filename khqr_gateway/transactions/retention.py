"""Retention: old final transactions deleted with their webhooks, old response bodies blanked."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import asyncpg

from khqr_gateway.metrics import RETENTION_ROWS

log = logging.getLogger(__name__)

# One process prunes at a time: each batch holds this lock for its statement, so a second
# process finds it taken and leaves the run to the first.
RETENTION_LOCK_ID = 0x6B687174
# Rows one statement deletes at most (transactions, deliveries and attempts together), so
# that no statement holds locks or fills the WAL for long. One transaction with more rows
# than this still goes, alone.
BATCH_ROWS = 1000
# Work per run at most; the next run carries on. Keeps a shutdown's wait short.
RUN_BUDGET_S = 5.0

# The oldest final transactions ended before the cutoff, from transactions_finished, each
# weighed by the rows it takes with it; those whose late watch still runs or that have a
# webhook still being sent are weighed 0 and kept. As many as fit in $5 rows go, with their
# deliveries and attempts, in one statement; the last one looked at is where the next starts.
# A transaction weighs 3 rows as a rule (itself, its webhook, one attempt): $6 candidates
# weighed are enough to fill a batch without weighing many that will not fit.
_PRUNE = """
with got as (
    select pg_try_advisory_xact_lock($1) as lock
), candidates as (
    select t.id, t.completed_at,
        case when t.late_watch_until > now() or exists (
                select 1 from deliveries d where d.transaction_id = t.id and d.status = 'pending')
             or exists (
                select 1 from telegram_notices n
                where n.transaction_id = t.id and n.status = 'pending')
             then 0
             else 1 + (select count(*) + coalesce(sum(
                     (select count(*) from delivery_attempts a where a.delivery_id = d.id)), 0)
                       from deliveries d where d.transaction_id = t.id)
        end as weight
    from transactions t
    where (select lock from got) and t.status <> 'pending'
      and t.completed_at < now() - $2::int * interval '1 day'
      and ($3::timestamptz is null or (t.completed_at, t.id) > ($3, $4::uuid))
    order by t.completed_at, t.id
    limit $6
), weighed as (
    select id, completed_at, weight,
           sum(weight) over (order by completed_at, id) as running,
           row_number() over (order by completed_at, id) as n
    from candidates
), taken as (
    select * from weighed where running <= $5 or n = 1
), doomed as (
    select id from taken where weight > 0
), gone_attempts as (
    delete from delivery_attempts a using deliveries d, doomed
    where d.transaction_id = doomed.id and a.delivery_id = d.id
    returning 1
), gone_deliveries as (
    -- a webhook sent again since the weighing stays, and so (by its foreign key) does its
    -- transaction: the statement fails and the next run weighs it again
    delete from deliveries d using doomed
    where d.transaction_id = doomed.id and d.status <> 'pending'
    returning 1
), gone_notice_attempts as (
    delete from telegram_attempts a using telegram_notices n, doomed
    where n.transaction_id = doomed.id and a.notice_id = n.id
), gone_notices as (
    -- as for webhooks: a notice being sent since the weighing keeps its transaction
    delete from telegram_notices n using doomed
    where n.transaction_id = doomed.id and n.status <> 'pending'
), gone_transactions as (
    delete from transactions t using doomed where t.id = doomed.id returning 1
), last as (
    select completed_at, id from taken order by completed_at desc, id desc limit 1
)
select (select lock from got) as locked,
       (select count(*) from taken) as examined,
       (select count(*) from gone_transactions) as transactions,
       (select count(*) from gone_deliveries) as deliveries,
       (select count(*) from gone_attempts) as attempts,
       (select completed_at from last) as last_at,
       (select id from last) as last_id
"""

# Bodies of attempts started before the cutoff, oldest first, from delivery_attempts_body.
_BLANK = """
with got as (
    select pg_try_advisory_xact_lock($1) as lock
), old as (
    select id from delivery_attempts
    where (select lock from got) and response_body is not null
      and started_at < now() - $2::int * interval '1 day'
    order by started_at limit $3
), blanked as (
    update delivery_attempts a set response_body = null from old where a.id = old.id
    returning 1
)
select (select lock from got) as locked, (select count(*) from blanked) as blanked
"""


@dataclass(frozen=True, slots=True)
class Pruned:
    """What one batch did."""

    locked: bool  # False: another process holds the retention lock, nothing was done
    examined: int
    transactions: int
    deliveries: int
    attempts: int
    after: tuple[object, object] | None  # where the next batch starts

    @property
    def rows(self) -> int:
        return self.transactions + self.deliveries + self.attempts


async def prune_batch(
    pool: asyncpg.Pool,
    *,
    days: int,
    after: tuple[object, object] | None = None,
    max_rows: int = BATCH_ROWS,
) -> Pruned:
    """Delete one batch of final transactions ended more than `days` ago, with their
    deliveries and attempts: at most `max_rows` rows in all, one short transaction."""
    row = await pool.fetchrow(
        _PRUNE,
        RETENTION_LOCK_ID,
        days,
        after[0] if after else None,
        after[1] if after else None,
        max_rows,
        max(1, max_rows // 2),
    )
    last = (row["last_at"], row["last_id"]) if row["last_id"] is not None else None
    return Pruned(
        locked=bool(row["locked"]),
        examined=row["examined"],
        transactions=row["transactions"],
        deliveries=row["deliveries"],
        attempts=row["attempts"],
        after=last,
    )


async def blank_batch(pool: asyncpg.Pool, *, days: int, max_rows: int = BATCH_ROWS) -> int | None:
    """Blank the response bodies of up to `max_rows` attempts started more than `days` ago;
    how many, or None when another process holds the retention lock."""
    row = await pool.fetchrow(_BLANK, RETENTION_LOCK_ID, days, max_rows)
    return int(row["blanked"]) if row["locked"] else None


def _count(batch: Pruned) -> None:
    RETENTION_ROWS.labels("transactions").inc(batch.transactions)
    RETENTION_ROWS.labels("deliveries").inc(batch.deliveries)
    RETENTION_ROWS.labels("attempts").inc(batch.attempts)


class Retention:
    """The retention tick: prunes and blanks in batches, paced to leave Postgres to ingest."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        days: int,
        body_days: int,
        budget_s: float = RUN_BUDGET_S,
        max_rows: int = BATCH_ROWS,
    ) -> None:
        self.pool = pool
        self.days = days
        self.body_days = body_days
        self.budget_s = budget_s
        self.max_rows = max_rows

    async def tick(self) -> None:
        """One run: as many batches as fit in the budget, each followed by a pause as long
        as it took (the other half of Postgres's time stays with ingest and polling)."""
        deadline = time.monotonic() + self.budget_s
        if self.days:
            await self._prune(deadline)
        if self.body_days:
            await self._blank(deadline)

    async def _prune(self, deadline: float) -> None:
        after = None
        total = 0
        while time.monotonic() < deadline:
            started = time.monotonic()
            batch = await prune_batch(
                self.pool, days=self.days, after=after, max_rows=self.max_rows
            )
            total += batch.transactions
            _count(batch)
            if not batch.locked or batch.after is None:
                break
            after = batch.after
            await asyncio.sleep(time.monotonic() - started)
        if total:
            log.info("retention: %d transactions older than %d days deleted", total, self.days)

    async def _blank(self, deadline: float) -> None:
        total = 0
        while time.monotonic() < deadline:
            started = time.monotonic()
            blanked = await blank_batch(self.pool, days=self.body_days, max_rows=self.max_rows)
            total += blanked or 0
            RETENTION_ROWS.labels("response_bodies").inc(blanked or 0)
            if not blanked:
                break
            await asyncio.sleep(time.monotonic() - started)
        if total:
            log.info(
                "retention: %d response bodies older than %d days blanked", total, self.body_days
            )
