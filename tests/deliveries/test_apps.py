"""Deliveries of two apps in one database: each takes its transaction's app, and an app reads
and restarts only its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from uuid import uuid4

import asyncpg
import pytest

from khqr_gateway.apps.model import DEFAULT_APP_ID
from khqr_gateway.config import Settings
from khqr_gateway.deliveries import store
from khqr_gateway.deliveries.model import AttemptRecord, DeliveryStatus
from khqr_gateway.infra import db
from khqr_gateway.transactions import store as tx_store
from khqr_gateway.transactions.model import Status, Transition
from tests.transactions.test_ingest import new

A = DEFAULT_APP_ID
B = "app_b"


@pytest.fixture
async def pool(database_url: str, pg: asyncpg.Connection) -> AsyncIterator[asyncpg.Pool]:
    made = await db.create_pool(database_url)
    yield made
    await made.close()


async def delivered(pool: asyncpg.Pool, app_id: str) -> str:
    """A paid transaction of the app, and the id of its delivery (one attempt, failed)."""
    row, _ = await tx_store.insert_or_get(pool, new(app_id=app_id))
    delivery_id = f"msg_{uuid4().hex}"
    paid = Transition(row.id, Status.SUCCESS, None, {}, delivery_id, b"{}")
    await tx_store.record_transitions(pool, [paid], window=Settings().late_window)
    attempt = AttemptRecord(
        delivery_id=delivery_id,
        attempt=1,
        started_at=datetime.now(UTC),
        duration_ms=5,
        status_code=500,
        error_kind=None,
        error_message=None,
        response_body="no",
        response_headers=None,
        new_status=DeliveryStatus.FAILED,
        next_attempt_at=None,
    )
    await store.record_attempts(pool, [attempt])
    return delivery_id


async def test_a_delivery_takes_its_transactions_app(
    pool: asyncpg.Pool, pg: asyncpg.Connection
) -> None:
    theirs = await delivered(pool, B)
    assert await pg.fetchval("select app_id from deliveries where id = $1", theirs) == B


async def test_an_app_reads_only_its_own_deliveries(pool: asyncpg.Pool) -> None:
    mine, theirs = await delivered(pool, A), await delivered(pool, B)
    assert await store.get(pool, B, mine) is None
    found = await store.get(pool, A, mine)
    assert found is not None and found.id == mine
    assert await store.attempts_of(pool, B, mine) == []
    assert len(await store.attempts_of(pool, A, mine)) == 1

    async def listed(app_id: str, status: DeliveryStatus | None = None) -> list[str]:
        rows = await store.list_page(
            pool, app_id, status=status, transaction_id=None, since=None, limit=10, before=None
        )
        return [r.id for r in rows]

    assert await listed(A) == [mine] and await listed(B) == [theirs]
    assert await listed(B, DeliveryStatus.FAILED) == [theirs]


async def test_an_app_restarts_only_its_own_deliveries(pool: asyncpg.Pool) -> None:
    mine, theirs = await delivered(pool, A), await delivered(pool, B)
    assert await store.restart(pool, B, mine) is None
    restarted = await store.restart(pool, A, mine)
    assert restarted is not None and restarted.status is DeliveryStatus.PENDING
    ids, more = await store.restart_matching(
        pool, A, status=DeliveryStatus.FAILED, since=None, until=None, limit=10
    )
    assert (ids, more) == ([], False)
    ids, more = await store.restart_matching(
        pool, B, status=DeliveryStatus.FAILED, since=None, until=None, limit=10
    )
    assert (ids, more) == ([theirs], False)
