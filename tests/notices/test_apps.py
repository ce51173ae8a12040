"""Telegram notices of two apps: each app's chat is told of its own payments only."""

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


async def test_an_apps_chat_is_told_of_its_own_payments_only(
    pool: asyncpg.Pool, pg: asyncpg.Connection
) -> None:
    for app_id in ("app_default", "app_b"):
        await pg.execute(
            "insert into transactions (id, md5, status, webhook_url, deadline_at, completed_at,"
            " app_id) values (gen_random_uuid(), $1, 'success', 'http://x/', now(), now(), $2)",
            random_md5(),
            app_id,
        )
    since = datetime.now(UTC) - timedelta(minutes=1)
    assert await store.make_notices(pool, {"app_default": "1"}, since) == 1
    assert await store.make_notices(pool, {"app_default": "1", "app_b": "2"}, since) == 1
    assert await store.make_notices(pool, {"app_b": "2"}, since) == 0
    assert await store.make_notices(pool, {}, since) == 0
    rows = await pg.fetch(
        "select n.app_id as notice, n.chat_id, t.app_id as transaction from telegram_notices n"
        " join transactions t on t.id = n.transaction_id"
    )
    assert sorted((r["notice"], r["chat_id"], r["transaction"]) for r in rows) == [
        ("app_b", "2", "app_b"),
        ("app_default", "1", "app_default"),
    ]


async def test_a_sweep_over_transitions_already_noticed_writes_nothing(
    pool: asyncpg.Pool, pg: asyncpg.Connection
) -> None:
    """The sweep runs twice a second over the last minutes' payments: those with a notice
    cost no insert attempt (nor a number of the notices' sequence)."""
    for _ in range(3):
        await pg.execute(
            "insert into transactions (id, md5, status, webhook_url, deadline_at, completed_at)"
            " values (gen_random_uuid(), $1, 'success', 'http://x/', now(), now())",
            random_md5(),
        )
    since = datetime.now(UTC) - timedelta(minutes=1)
    assert await store.make_notices(pool, {"app_default": "1"}, since) == 3
    sequence = "select nextval(pg_get_serial_sequence('telegram_notices', 'id'))"
    before = await pg.fetchval(sequence)
    for _ in range(5):
        assert await store.make_notices(pool, {"app_default": "1"}, since) == 0
    assert await pg.fetchval(sequence) == before + 1, "no number taken by the sweeps between"
