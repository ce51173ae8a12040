"""Transactions of two apps in one database: each app reads and writes only its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from khqr_gateway.apps.model import DEFAULT_APP_ID
from khqr_gateway.config import Settings
from khqr_gateway.infra import db
from khqr_gateway.infra.keys import keys
from khqr_gateway.infra.schedule import Schedule
from khqr_gateway.transactions import exports, pages, store
from khqr_gateway.transactions.ingest import Ingest
from khqr_gateway.transactions.model import Status
from khqr_gateway.transactions.store import NewTransaction
from tests.conftest import random_md5
from tests.transactions.test_ingest import new

A = DEFAULT_APP_ID
B = "app_b"
WINDOW = Settings().late_window


@pytest.fixture
async def pool(database_url: str, pg: asyncpg.Connection) -> AsyncIterator[asyncpg.Pool]:
    made = await db.create_pool(database_url)
    yield made
    await made.close()


def of(app_id: str, md5: str | None = None, **fields: Any) -> NewTransaction:
    return new(md5, app_id=app_id, **fields)


async def created(pool: asyncpg.Pool, app_id: str, **fields: Any) -> store.TransactionRow:
    row, is_new = await store.insert_or_get(pool, of(app_id, **fields))
    assert is_new
    return row


async def test_the_same_md5_in_two_apps_is_two_transactions(pool: asyncpg.Pool) -> None:
    md5 = random_md5()
    mine, mine_new = await store.insert_or_get(pool, of(A, md5))
    theirs, theirs_new = await store.insert_or_get(pool, of(B, md5))
    assert mine_new and theirs_new and mine.id != theirs.id
    again, again_new = await store.insert_or_get(pool, of(B, md5))
    assert not again_new and again.id == theirs.id
    batch = await store.insert_pending(pool, [of(A, md5), of(B, md5), of(B)])
    assert len(batch) == 1 and batch[0].md5 != md5


async def test_one_batch_with_one_md5_in_two_apps_creates_both(
    pool: asyncpg.Pool, redis: Redis, namespace: str
) -> None:
    ingest = Ingest(pool, Schedule(redis, keys(namespace)["poll"]), interval_s=3)
    md5 = random_md5()
    outcomes = await asyncio.gather(*(ingest.create(of(app, md5)) for app in (A, B, A, B)))
    assert [is_new for _, is_new in outcomes] == [True, True, False, False]
    assert outcomes[0][0].id == outcomes[2][0].id != outcomes[1][0].id == outcomes[3][0].id


async def test_an_app_finds_only_its_own_transaction(pool: asyncpg.Pool) -> None:
    mine = await created(pool, A)
    assert await store.get(pool, B, mine.id) is None
    found = await store.get(pool, A, mine.id)
    assert found is not None and found.id == mine.id
    assert await pages.status_of(pool, B, mine.id) is None
    assert await pages.status_of(pool, A, mine.id) == (Status.PENDING, None)


async def test_an_app_cannot_cancel_another_apps_transaction(pool: asyncpg.Pool) -> None:
    mine = await created(pool, A)
    assert await store.cancel(pool, B, mine.id, window=WINDOW) is None
    still = await store.get(pool, A, mine.id)
    assert still is not None and still.status is Status.PENDING
    assert await store.cancel(pool, A, mine.id, window=WINDOW) is not None


async def test_a_page_opens_only_for_its_own_app(pool: asyncpg.Pool) -> None:
    mine = await created(pool, A)
    await pages.open_page(pool, B, mine.id, "token-b", None)
    assert await pages.page(pool, mine.id, "token-b") is None
    await pages.open_page(pool, A, mine.id, "token-a", None)
    assert await pages.page(pool, mine.id, "token-a") is not None


async def test_expectations_are_read_in_the_apps_own_transactions(pool: asyncpg.Pool) -> None:
    md5 = random_md5()
    await pool.execute(
        "insert into transactions (id, md5, webhook_url, deadline_at, app_id, expected)"
        " values (gen_random_uuid(), $1, 'http://x/', now(), $2, '{\"amount\": \"1.5\"}')",
        md5,
        B,
    )
    assert await store.expected_of(pool, A, md5) is None
    assert await store.expected_of(pool, B, md5) is not None
    assert await store.expected_of(pool, None, md5) is not None


async def test_lists_and_searches_show_only_the_apps_own_rows(pool: asyncpg.Pool) -> None:
    mine = [await created(pool, A, metadata={"order": "o-1"}) for _ in range(3)]
    theirs = [await created(pool, B, metadata={"order": "o-1"}) for _ in range(2)]

    async def ids(app_id: str, **query: Any) -> set[Any]:
        fields: dict[str, Any] = {"md5": None, "status": None, "limit": 10, "before": None}
        rows = await store.list_page(pool, app_id, **(fields | query))
        return {r.id for r in rows}

    assert await ids(A) == {r.id for r in mine}
    assert await ids(B) == {r.id for r in theirs}
    assert await ids(A, status=Status.PENDING) == {r.id for r in mine}
    assert await ids(B, md5=mine[0].md5) == set()
    assert await ids(B, q=str(mine[0].id)) == set()
    assert await ids(B, q=mine[0].md5[:8]) == set()
    assert await ids(B, q="o-1") == {r.id for r in theirs}
    newest = sorted(mine, key=lambda r: (r.created_at, r.id))[-1]
    older = await ids(A, before=(newest.created_at, newest.id))
    assert older == {r.id for r in mine} - {newest.id}


async def test_exports_and_reports_hold_only_the_apps_own_rows(pool: asyncpg.Pool) -> None:
    mine = await _paid(pool, A, "1.50")
    await _paid(pool, B, "7.00")
    wanted = exports.ExportFilter(None, None, None)
    chunks: list[bytes] = []

    async def write(chunk: bytes) -> None:
        chunks.append(chunk)

    await exports.export_jsonl(pool, A, wanted, write)
    lines = [orjson.loads(line) for line in b"".join(chunks).splitlines()]
    assert [line["jobId"] for line in lines] == [mine]
    chunks.clear()
    await exports.export_csv(pool, A, wanted, write)
    csv = b"".join(chunks).decode()
    assert mine in csv and "7.00" not in csv and len(csv.splitlines()) == 2
    today = datetime.now(ZoneInfo(exports.REPORT_TZ)).date()
    days = await exports.daily_report(pool, A, date.fromordinal(today.toordinal() - 2), today)
    assert [(r.paid_count, str(r.paid_sum)) for r in days] == [(1, "1.50")]


async def _paid(pool: asyncpg.Pool, app_id: str, amount: str) -> str:
    row = await created(pool, app_id)
    data = {"amount": amount, "currency": "USD", "createdDateMs": 0}
    await pool.execute(
        "update transactions set status = 'success', completed_at = $2, bakong_data = $3::json"
        " where id = $1",
        row.id,
        datetime.now().astimezone(),
        data,
    )
    return str(row.id)
