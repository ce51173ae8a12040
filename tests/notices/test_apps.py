"""Telegram notices of two apps: each notice takes its transaction's app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from khqr_gateway.infra import db
from khqr_gateway.notices import store
from tests.conftest import random_md5


@pytest.fixture
async def pool(database_url: str, pg: asyncpg.Connection) -> AsyncIterator[asyncpg.Pool]:
    made = await db.create_pool(database_url)
    yield made
    await made.close()


async def test_a_notice_takes_its_transactions_app(
    pool: asyncpg.Pool, pg: asyncpg.Connection
) -> None:
    for app_id in ("app_default", "app_b"):
        await pg.execute(
            "insert into transactions (id, md5, status, webhook_url, deadline_at, completed_at,"
            " app_id) values (gen_random_uuid(), $1, 'success', 'http://x/', now(), now(), $2)",
            random_md5(),
            app_id,
        )
    assert await store.make_notices(pool, "1", datetime.now(UTC) - timedelta(minutes=1)) == 2
    rows = await pg.fetch(
        "select n.app_id as notice, t.app_id as transaction from telegram_notices n"
        " join transactions t on t.id = n.transaction_id"
    )
    assert sorted((r["notice"], r["transaction"]) for r in rows) == [
        ("app_b", "app_b"),
        ("app_default", "app_default"),
    ]
