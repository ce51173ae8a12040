"""The group commit of new transactions: batches, the 201/200 split, and errors per request."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from khqr_gateway.apps.model import DEFAULT_APP_ID
from khqr_gateway.config import Settings
from khqr_gateway.credentials import store as credential_store
from khqr_gateway.http.middleware import unavailable_dependency
from khqr_gateway.infra import db
from khqr_gateway.infra.keys import keys
from khqr_gateway.infra.schedule import Schedule
from khqr_gateway.transactions import store
from khqr_gateway.transactions.ingest import Ingest
from khqr_gateway.transactions.model import Expected
from khqr_gateway.transactions.store import NewTransaction
from tests.conftest import Gateway, Receiver, random_md5
from tests.proxy import Proxy

HOOK = "http://127.0.0.1:9/hook"


def new(md5: str | None = None, **fields: Any) -> NewTransaction:
    values: dict[str, Any] = {
        "app_id": DEFAULT_APP_ID,
        "id": uuid.uuid4(),
        "md5": md5 or random_md5(),
        "webhook_url": HOOK,
        "credential_id": None,
        "expected": None,
        "metadata": None,
        "qr": None,
        "deadline_at": datetime.now(UTC) + timedelta(minutes=10),
    }
    values.update(fields)
    return NewTransaction(**values)


@pytest.fixture
async def pool(database_url: str, pg: asyncpg.Connection) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(database_url)
    yield pool
    await pool.close()


@pytest.fixture
def polls(redis: Redis, namespace: str) -> Schedule:
    return Schedule(redis, keys(namespace)["poll"])


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every batch INSERT made."""
    sizes: list[int] = []
    insert = store.insert_pending

    async def counted(pool: asyncpg.Pool, news: Sequence[NewTransaction]) -> list[Any]:
        sizes.append(len(news))
        return await insert(pool, news)

    monkeypatch.setattr(store, "insert_pending", counted)
    return sizes


async def test_concurrent_creates_share_statements_and_split_201_200(
    pool: asyncpg.Pool, polls: Schedule, pg: asyncpg.Connection, statements: list[int]
) -> None:
    ingest = Ingest(pool, polls, interval_s=3)
    already = await ingest.create(new())
    md5s = [random_md5() for _ in range(100)] + [already[0].md5]
    # Every md5 three times, interleaved, all at once: 303 creates.
    results = await asyncio.gather(*(ingest.create(new(m)) for _ in range(3) for m in md5s))

    by_md5: dict[str, list[tuple[Any, bool]]] = {}
    for row, created in results:
        by_md5.setdefault(row.md5, []).append((row.id, created))
    assert sorted(by_md5) == sorted(md5s)
    for md5, answers in by_md5.items():
        assert len({job_id for job_id, _ in answers}) == 1, md5
        news = sum(created for _, created in answers)
        assert news == (0 if md5 == already[0].md5 else 1), md5
    assert await pg.fetchval("select count(*) from transactions") == 101
    assert max(statements) > 1, "concurrent creates were not batched"
    assert sum(statements) < len(results) + 1
    assert await polls.size() == 101


async def test_created_rows_carry_every_field_and_the_first_poll(
    pool: asyncpg.Pool, polls: Schedule, redis: Redis, pg: asyncpg.Connection
) -> None:
    ingest = Ingest(pool, polls, interval_s=60)
    soon = datetime.now(UTC) + timedelta(seconds=5)
    credential = await credential_store.upsert_credential(
        pool, token="t", email=None, expires_at=None
    )
    item = new(
        credential_id=credential.id,
        expected=Expected(currency="USD", to_account_id="shop@aclb"),
        metadata={"orderId": "A-1", "n": [1, 2]},
        qr="000201010212" + "x" * 20,
        deadline_at=soon,
    )
    before_ms = time.time() * 1000
    row, created = await ingest.create(item)

    assert created
    assert (row.id, row.md5, row.status) == (item.id, item.md5, "pending")
    assert row.deadline_at == soon
    assert row.created_at is not None
    stored = await pg.fetchrow("select * from transactions where id = $1", item.id)
    assert stored["credential_id"] == credential.id
    assert stored["webhook_url"] == HOOK
    assert stored["qr"] == item.qr
    assert await pg.fetchval("select expected::text from transactions where id = $1", item.id) == (
        '{"currency": "USD", "toAccountId": "shop@aclb"}'
    )
    assert await pg.fetchval("select metadata::text from transactions where id = $1", item.id) == (
        '{"orderId":"A-1","n":[1,2]}'
    )
    # The first poll is one interval away, but never after the deadline.
    due = await redis.zscore(polls.key, str(item.id))
    assert due is not None
    assert due == int(soon.timestamp() * 1000)
    assert due < before_ms + 60_000


async def test_a_batch_with_a_pending_md5_in_it_answers_each_request(
    pool: asyncpg.Pool, polls: Schedule, pg: asyncpg.Connection, statements: list[int]
) -> None:
    ingest = Ingest(pool, polls, interval_s=3)
    pending, _ = await ingest.create(new())
    statements.clear()
    a, b = random_md5(), random_md5()
    batch = [new(a), new(pending.md5), new(b), new(a), new(pending.md5)]
    results = await asyncio.gather(*(ingest.create(item) for item in batch))

    assert statements == [3], "one statement for the distinct md5s of the batch"
    [(ra, ca), (rp, cp), (rb, cb), (ra2, ca2), (rp2, cp2)] = results
    assert (ca, cp, cb, ca2, cp2) == (True, False, True, False, False)
    assert ra.id == batch[0].id and ra2.id == batch[0].id
    assert rp.id == rp2.id == pending.id
    assert rb.id == batch[2].id
    assert await pg.fetchval("select count(*) from transactions") == 3
    # Only the new ones were scheduled now (the pending one was already).
    assert await polls.size() == 3


async def test_an_md5_that_turned_terminal_is_the_same_transaction(
    pool: asyncpg.Pool, polls: Schedule, pg: asyncpg.Connection
) -> None:
    """One md5 is one payment: once ended it is never tracked a second time."""
    ingest = Ingest(pool, polls, interval_s=3)
    first, _ = await ingest.create(new())
    await store.cancel(pool, DEFAULT_APP_ID, first.id, window=Settings().late_window)
    polled = await polls.size()
    again, created = await ingest.create(new(first.md5))
    assert not created and again.id == first.id and again.status == "cancelled"
    both = await asyncio.gather(*(ingest.create(new(first.md5)) for _ in range(5)))
    assert {(r.id, c) for r, c in both} == {(first.id, False)}
    assert await pg.fetchval("select count(*) from transactions") == 1
    assert await polls.size() == polled


async def test_a_bad_row_fails_only_its_own_request(
    pool: asyncpg.Pool, polls: Schedule, pg: asyncpg.Connection
) -> None:
    ingest = Ingest(pool, polls, interval_s=3)
    good = [new() for _ in range(5)]
    bad = new("NOT-AN-MD5")  # refused by the table's check constraint
    results = await asyncio.gather(
        *(ingest.create(item) for item in [*good[:2], bad, *good[2:]]), return_exceptions=True
    )
    assert isinstance(results[2], asyncpg.CheckViolationError)
    assert [r[1] for i, r in enumerate(results) if i != 2] == [True] * 5  # type: ignore[index]
    assert await pg.fetchval("select count(*) from transactions") == 5
    assert await polls.size() == 5


async def test_postgres_down_reaches_every_waiter(
    database_url: str, pg: asyncpg.Connection, polls: Schedule
) -> None:
    url = urlsplit(database_url)
    proxy = Proxy(url.hostname or "127.0.0.1", url.port or 5432)
    await proxy.start()
    pool = await db.create_pool(
        f"postgresql://{url.username}@127.0.0.1:{proxy.port}{url.path}", min_size=1, max_size=2
    )
    try:
        ingest = Ingest(pool, polls, interval_s=3)
        await ingest.create(new())
        await proxy.cut()
        results = await asyncio.gather(
            *(ingest.create(new()) for _ in range(20)), return_exceptions=True
        )
    finally:
        await proxy.cut()
        pool.terminate()
    # What the error middleware answers as 503 postgres_unavailable, to each of them.
    assert all(unavailable_dependency(r) == "postgres" for r in results), results
    assert await pg.fetchval("select count(*) from transactions") == 1


async def test_redis_down_fails_new_rows_after_they_are_durable(
    pool: asyncpg.Pool, polls: Schedule, pg: asyncpg.Connection
) -> None:
    pending, _ = await Ingest(pool, polls, interval_s=3).create(new())
    down = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    try:
        ingest = Ingest(pool, Schedule(down, polls.key), interval_s=3)
        items = [new() for _ in range(10)]
        results = await asyncio.gather(
            ingest.create(new(pending.md5)),
            *(ingest.create(item) for item in items),
            return_exceptions=True,
        )
    finally:
        await down.aclose()
    # The md5 already pending needs no Redis: it is answered as usual.
    assert not isinstance(results[0], BaseException)
    assert results[0][0].id == pending.id and results[0][1] is False
    assert all(isinstance(r, RedisError) for r in results[1:]), results
    stored = await pg.fetch("select id from transactions")
    assert {r["id"] for r in stored} == {pending.id, *(i.id for i in items)}


async def test_a_cancelled_request_still_has_its_row_written(
    pool: asyncpg.Pool, polls: Schedule, pg: asyncpg.Connection
) -> None:
    ingest = Ingest(pool, polls, interval_s=3)
    item = new()
    waiting = asyncio.create_task(ingest.create(item))
    others = asyncio.gather(*(ingest.create(new()) for _ in range(3)))
    await asyncio.sleep(0)
    waiting.cancel()
    assert len(await others) == 3
    with pytest.raises(asyncio.CancelledError):
        await waiting
    for _ in range(50):
        if await pg.fetchval("select count(*) from transactions where id = $1", item.id):
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the cancelled request's row was not written")


async def test_many_concurrent_posts_get_one_201_per_md5(
    gateway: Gateway, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    md5s = [random_md5() for _ in range(20)]
    results = await asyncio.gather(
        *(
            gateway.post("/api/v1/transactions", {"md5": m, "webhookUrl": receiver.url})
            for _ in range(3)
            for m in md5s
        )
    )
    by_md5: dict[str, list[tuple[int, str]]] = {}
    for status, body in results:
        by_md5.setdefault(body["md5"], []).append((status, body["jobId"]))
    for answers in by_md5.values():
        assert sorted(s for s, _ in answers) == [200, 200, 201]
        assert len({job_id for _, job_id in answers}) == 1
    assert await pg.fetchval("select count(*) from transactions") == 20
