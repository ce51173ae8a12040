"""Retention: old final transactions go with their webhooks, in small batches, one process
at a time; what is still watched or sent stays; old response bodies are blanked."""

from __future__ import annotations

import asyncio
from uuid import UUID

import asyncpg

from khqr_gateway.metrics import REGISTRY
from khqr_gateway.transactions import retention
from khqr_gateway.transactions.retention import RETENTION_LOCK_ID, prune_batch
from tests.conftest import GatewayFactory, random_md5

HOOK = "https://merchant.example.com/hooks/khqr"

SEED = """
with made as (
    insert into transactions (id, md5, status, webhook_url, created_at, deadline_at,
                              completed_at, late_watch_until)
    select gen_random_uuid(), md5(random()::text || g), $2::text, 'http://x/',
           now() - $3::int * interval '1 day', now() - $3::int * interval '1 day',
           case when $2::text <> 'pending' then now() - $3::int * interval '1 day' end,
           $6::timestamptz
    from generate_series(1, $1) g
    returning id
), sent as (
    insert into deliveries (id, transaction_id, url, payload, status, attempt_count,
                            series_attempts)
    select 'msg_' || id, id, 'http://x/', '{}', $5::text, $4, $4 from made
    where $5::text is not null
    returning id
), tried as (
    insert into delivery_attempts (delivery_id, attempt, started_at, duration_ms, status_code,
                                   response_body)
    select sent.id, a, now() - $3::int * interval '1 day', 5, 200, 'thanks'
    from sent, generate_series(1, $4) a
)
select id from made
"""


async def seed(
    pg: asyncpg.Connection,
    n: int,
    *,
    days_ago: int,
    status: str = "success",
    attempts: int = 1,
    delivery: str | None = "delivered",
    watched_until: str | None = None,
) -> list[UUID]:
    """`n` transactions ended `days_ago`, each with a delivery of `attempts` attempts."""
    watch = await pg.fetchval(f"select {watched_until}") if watched_until else None
    rows = await pg.fetch(SEED, n, status, days_ago, attempts, delivery, watch)
    return [r["id"] for r in rows]


async def ids(pg: asyncpg.Connection, table: str, column: str = "id") -> set[object]:
    return {r[0] for r in await pg.fetch(f"select {column} from {table}")}


async def test_final_transactions_past_retention_go_with_their_webhooks(
    make_gateway: GatewayFactory, pg: asyncpg.Connection
) -> None:
    gw = await make_gateway(run_ticks=False, retention_days=180)
    old = await seed(pg, 1500, days_ago=200)  # 4,500 rows: several batches
    [watched] = await seed(pg, 1, days_ago=200, status="timeout", watched_until="now() + '1h'")
    [sending] = await seed(pg, 1, days_ago=200, status="failed", delivery="pending")
    [recent] = await seed(pg, 1, days_ago=170)
    [waiting] = await seed(pg, 1, days_ago=200, status="pending", delivery=None)
    status, created = await gw.post(
        "/api/v1/transactions", {"md5": random_md5(), "webhookUrl": HOOK}
    )
    assert status == 201

    await gw.service.retention.tick()

    kept = {watched, sending, recent, waiting, UUID(created["jobId"])}
    assert await ids(pg, "transactions") == kept
    assert await ids(pg, "deliveries", "transaction_id") == {watched, sending, recent}
    assert await pg.fetchval("select count(*) from delivery_attempts") == 3
    status, body = await gw.get(f"/api/v1/transactions/{old[0]}")
    assert status == 404 and body["error"]["code"] == "not_found"
    await gw.service.refresh_figures()
    _, stats = await gw.get("/api/v1/stats")
    assert stats["transactions"] == {"timeout": 1, "failed": 1, "success": 1, "pending": 2}
    assert stats["deliveries"] == {"delivered": 2, "pending": 1}


async def test_no_statement_deletes_more_than_a_thousand_rows(
    make_gateway: GatewayFactory, pg: asyncpg.Connection
) -> None:
    gw = await make_gateway(run_ticks=False)
    await seed(pg, 700, days_ago=200, attempts=2)  # 4 rows each
    [retried] = await seed(pg, 1, days_ago=300, attempts=1500)  # heavier than a batch
    batches = []
    after = None
    while True:
        batch = await prune_batch(gw.service.pool, days=180, after=after)
        if batch.after is None:
            break
        batches.append(batch)
        after = batch.after
    assert (batches[0].transactions, batches[0].attempts) == (1, 1500), "the heavy one, alone"
    assert all(b.rows <= 1000 for b in batches[1:])
    assert sum(b.transactions for b in batches) == 701
    assert await pg.fetchval("select count(*) from transactions") == 0
    assert await pg.fetchval("select count(*) from delivery_attempts") == 0
    assert retried not in await ids(pg, "transactions")


async def test_one_process_prunes_at_a_time(
    make_gateway: GatewayFactory, pg: asyncpg.Connection
) -> None:
    first = await make_gateway(run_ticks=False)
    second = await make_gateway(run_ticks=False)
    await seed(pg, 1200, days_ago=200)
    await pg.execute("select pg_advisory_lock($1)", RETENTION_LOCK_ID)
    batch = await prune_batch(first.service.pool, days=180)
    assert not batch.locked and batch.transactions == 0
    await first.service.retention.tick()
    assert await pg.fetchval("select count(*) from transactions") == 1200, "the holder's turn"
    await pg.execute("select pg_advisory_unlock($1)", RETENTION_LOCK_ID)

    await asyncio.gather(first.service.retention.tick(), second.service.retention.tick())
    for _ in range(3):  # whichever lost the lock left the rest to the next run
        await first.service.retention.tick()
    assert await pg.fetchval("select count(*) from transactions") == 0
    assert await pg.fetchval("select count(*) from deliveries") == 0


async def test_response_bodies_are_blanked_after_attempt_body_days(
    make_gateway: GatewayFactory, pg: asyncpg.Connection
) -> None:
    gw = await make_gateway(run_ticks=False)
    old = await seed(pg, 1100, days_ago=40)
    recent = await seed(pg, 1, days_ago=20)
    await gw.service.retention.tick()
    bodies = await pg.fetch(
        "select t.id, a.response_body from delivery_attempts a"
        " join deliveries d on d.id = a.delivery_id join transactions t on t.id = d.transaction_id"
    )
    assert {r["id"]: r["response_body"] for r in bodies} == {
        **dict.fromkeys(old, None),
        recent[0]: "thanks",
    }
    assert await pg.fetchval("select count(*) from transactions") == 1101, "the rows stay"


async def test_zero_days_keeps_everything(
    make_gateway: GatewayFactory, pg: asyncpg.Connection
) -> None:
    gw = await make_gateway(run_ticks=False, retention_days=0, attempt_body_days=0)
    await seed(pg, 10, days_ago=3000)
    await gw.service.retention.tick()
    assert await pg.fetchval("select count(*) from transactions") == 10
    assert (
        await pg.fetchval("select count(*) from delivery_attempts where response_body = 'thanks'")
        == 10
    )


def test_a_batch_is_at_most_a_thousand_rows() -> None:
    assert retention.BATCH_ROWS == 1000


async def test_telegram_notices_go_with_their_transaction_and_a_pending_one_keeps_it(
    make_gateway: GatewayFactory, pg: asyncpg.Connection
) -> None:
    gw = await make_gateway(run_ticks=False)
    sent, waiting = await seed(pg, 1, days_ago=200), await seed(pg, 1, days_ago=200)
    for job, status in ((sent[0], "sent"), (waiting[0], "pending")):
        notice = await pg.fetchval(
            "insert into telegram_notices (transaction_id, late, chat_id, status)"
            " values ($1, false, '-100', $2) returning id",
            job,
            status,
        )
        await pg.execute(
            "insert into telegram_attempts (notice_id, attempt, started_at, duration_ms)"
            " values ($1, 1, now(), 3)",
            notice,
        )
    await gw.service.retention.tick()
    assert await ids(pg, "transactions") == set(waiting)
    assert await ids(pg, "telegram_notices", "transaction_id") == set(waiting)


def removed(kind: str) -> float:
    return REGISTRY.get_sample_value("khqr_retention_rows_total", {"kind": kind}) or 0.0


async def test_metrics_count_what_retention_removed(
    make_gateway: GatewayFactory, pg: asyncpg.Connection
) -> None:
    """An operator sees retention at work in /metrics: rows deleted by table, bodies blanked."""
    gw = await make_gateway(run_ticks=False)
    await seed(pg, 30, days_ago=200, attempts=2)
    await seed(pg, 5, days_ago=40)
    before = {k: removed(k) for k in ("transactions", "deliveries", "attempts", "response_bodies")}
    await gw.service.retention.tick()
    after = {k: removed(k) - before[k] for k in before}
    assert after == {"transactions": 30, "deliveries": 30, "attempts": 60, "response_bodies": 5}
