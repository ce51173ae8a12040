"""Migrations against a real Postgres: what an older database holds survives them."""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from khqr_gateway.infra import db
from tests.conftest import ADMIN_DSN, _dsn_for, random_md5


@pytest.fixture
async def blank() -> AsyncIterator[asyncpg.Connection]:
    """A database of its own with no migration applied."""
    name = f"khqr_migrate_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'create database "{name}"')
    conn = await asyncpg.connect(_dsn_for(name))
    yield conn
    await conn.close()
    await admin.execute(f'drop database "{name}" with (force)')
    await admin.close()


async def test_an_md5_tracked_twice_before_keeps_one_transaction_for_it(
    blank: asyncpg.Connection, tmp_path: Path
) -> None:
    """Older versions tracked an md5 again once it had ended; after the migration the md5 is
    one payment, its paid transaction (else pending, else newest) the one that stays."""
    for migration in sorted(db.migrations_dir().glob("00[12]_*.sql")):
        shutil.copy(migration, tmp_path)
    await db.migrate(blank, tmp_path)
    paid, timed_out, pending, old = (random_md5() for _ in range(4))
    rows = [
        (paid, "timeout", timedelta(minutes=60)),
        (paid, "success", timedelta(minutes=50)),
        (paid, "cancelled", timedelta(minutes=40)),
        (paid, "pending", timedelta(minutes=5)),  # a repeat still being polled
        (timed_out, "timeout", timedelta(minutes=30)),
        (timed_out, "pending", timedelta(minutes=20)),
        (old, "timeout", timedelta(minutes=20)),
        (old, "failed", timedelta(minutes=10)),
        (pending, "pending", timedelta(minutes=1)),
    ]
    for md5, status, ago in rows:
        await blank.execute(
            "insert into transactions (id, md5, status, webhook_url, created_at, deadline_at)"
            " values (gen_random_uuid(), $1, $2, 'http://x/', now() - $3::interval, now())",
            md5,
            status,
            ago,
        )

    await db.migrate(blank)

    kept = await blank.fetch("select md5, status from transactions where not superseded")
    assert {r["md5"]: r["status"] for r in kept} == {
        paid: "success",
        timed_out: "pending",
        old: "failed",
        pending: "pending",
    }
    assert await blank.fetchval("select count(*) from transactions") == len(rows)
    # The repeat of the paid md5 is no longer polled: it would report the payment again.
    assert (
        await blank.fetchval(
            "select count(*) from transactions where md5 = $1 and status = 'pending'", paid
        )
        == 0
    )
    with pytest.raises(asyncpg.UniqueViolationError):
        await blank.execute(
            "insert into transactions (id, md5, status, webhook_url, deadline_at)"
            " values (gen_random_uuid(), $1, 'timeout', 'http://x/', now())",
            paid,
        )


async def test_the_counts_start_from_the_rows_already_there(
    blank: asyncpg.Connection, tmp_path: Path
) -> None:
    """Migration 006 counts what an older database holds; from then on triggers keep up."""
    for migration in sorted(db.migrations_dir().glob("00[1-4]_*.sql")):
        shutil.copy(migration, tmp_path)
    await db.migrate(blank, tmp_path)
    for status, late, n in [("success", False, 3), ("timeout", False, 2), ("success", True, 1)]:
        await blank.execute(
            "insert into transactions (id, md5, status, late, webhook_url, deadline_at)"
            " select gen_random_uuid(), md5(random()::text), $1, $2, 'http://x/', now()"
            " from generate_series(1, $3)",
            status,
            late,
            n,
        )
    await blank.execute(
        "insert into deliveries (id, transaction_id, url, payload, status)"
        " select 'msg_' || id, id, 'http://x/', '', 'delivered' from transactions"
    )

    await db.migrate(blank)
    await blank.execute(
        "update deliveries set status = 'pending' where transaction_id in"
        " (select id from transactions where status = 'timeout')"
    )

    got = await blank.fetch(
        "select kind, status, sum(n) as n from (select * from status_counts"
        " union all select * from status_count_changes) c group by 1, 2 having sum(n) <> 0"
    )
    assert {(r["kind"], r["status"]): r["n"] for r in got} == {
        ("transactions", "success"): 4,
        ("transactions", "timeout"): 2,
        ("late", "success"): 1,
        ("deliveries", "delivered"): 4,
        ("deliveries", "pending"): 2,
    }


async def test_the_pool_serves_callers_in_the_order_they_asked(database_url: str) -> None:
    """A caller gets a connection once those that asked before it had theirs: with 10 callers
    querying over 2 connections, nobody sees more than the 9 others served first. (asyncpg's
    own pool let callers jump the line: the list route's p99 at 50 connections was 70x its
    p50.)"""
    pool = await db.create_pool(database_url, min_size=2, max_size=2)
    granted = 0
    worst = 0

    async def caller() -> None:
        nonlocal granted, worst
        for _ in range(20):
            asked = granted
            async with pool.acquire() as conn:
                worst = max(worst, granted - asked)
                granted += 1
                await conn.fetchval("select 1")

    try:
        await asyncio.gather(*(caller() for _ in range(10)))
    finally:
        await pool.close()
    assert worst <= 9, f"a caller waited while {worst} others were served"


async def test_a_database_from_before_apps_gets_the_default_app_once(
    blank: asyncpg.Connection,
) -> None:
    """Rows made before apps existed belong to the default app: its row is there after the
    migration, and migrating again (a second process starting) changes nothing."""
    await db.migrate(blank)
    assert await db.migrate(blank) == []
    rows = await blank.fetch("select id, name, disabled_at from apps")
    assert [tuple(r) for r in rows] == [("app_default", "default", None)]


APP_TABLES = ("transactions", "deliveries", "idempotency_keys", "credentials", "telegram_notices")


async def test_rows_from_before_app_columns_are_the_default_apps(
    blank: asyncpg.Connection, tmp_path: Path
) -> None:
    """A database migrated up to 013 keeps its rows through the migrations of apps, every one
    of them the default app's (their counts too), and the md5 stays one payment of that app
    while another app may track it as its own."""
    before = [m for m in sorted(db.migrations_dir().glob("*.sql")) if m.name < "014"]
    assert before[-1].name.startswith("013_")
    for migration in before:
        shutil.copy(migration, tmp_path)
    await db.migrate(blank, tmp_path)
    md5 = random_md5()
    await _insert_one_of_each(blank, md5)

    applied = await db.migrate(blank)

    assert applied == [
        "014_app_columns",
        "015_app_indexes",
        "016_app_uniques",
        "017_app_counts",
        "018_app_credentials",
        "019_app_language",
    ]
    for table in APP_TABLES:
        apps = await blank.fetch(f"select distinct app_id from {table}")
        assert [r["app_id"] for r in apps] == ["app_default"], table
    with pytest.raises(asyncpg.UniqueViolationError):
        await blank.execute(
            "insert into transactions (id, md5, webhook_url, deadline_at, app_id)"
            " values (gen_random_uuid(), $1, 'http://x/', now(), 'app_default')",
            md5,
        )
    await blank.execute("insert into apps (id, name) values ('app_b', 'b')")
    await blank.execute(
        "insert into transactions (id, md5, webhook_url, deadline_at, app_id)"
        " values (gen_random_uuid(), $1, 'http://x/', now(), 'app_b')",
        md5,
    )
    counted = await blank.fetch(
        "select app_id, kind, status, sum(n) as n from (select app_id, kind, status, n"
        " from status_counts union all select app_id, kind, status, n from status_count_changes)"
        " c where kind = 'transactions' group by 1, 2, 3 having sum(n) <> 0 order by 1"
    )
    assert [(r["app_id"], r["status"], r["n"]) for r in counted] == [
        ("app_b", "pending", 1),
        ("app_default", "pending", 1),
    ]


async def _insert_one_of_each(conn: asyncpg.Connection, md5: str) -> None:
    job = await conn.fetchval(
        "insert into transactions (id, md5, webhook_url, deadline_at)"
        " values (gen_random_uuid(), $1, 'http://x/', now()) returning id",
        md5,
    )
    await conn.execute(
        "insert into deliveries (id, transaction_id, url, payload) values ('msg_1', $1, 'x', '')",
        job,
    )
    await conn.execute(
        "insert into telegram_notices (transaction_id, late, chat_id) values ($1, false, '1')",
        job,
    )
    await conn.execute("insert into idempotency_keys (key_hash, request_hash) values ('k', 'r')")
    await conn.execute("insert into credentials (fingerprint, token) values ('f', 't')")


NO_TX_INDEX = """-- migrate: no transaction
create unique index concurrently if not exists things_name on things (name);
"""


async def test_an_index_is_built_concurrently_and_a_failed_build_is_redone(
    blank: asyncpg.Connection, tmp_path: Path
) -> None:
    """`create index concurrently` refuses to run in a transaction, so a migration that makes
    one runs outside; a build that failed leaves an invalid index, which the next start
    drops and builds again instead of taking it for done."""
    (tmp_path / "001_things.sql").write_text("create table things (name text);")
    (tmp_path / "002_things_name.sql").write_text(NO_TX_INDEX)
    await blank.execute("create table things (name text)")
    await blank.execute("insert into things values ('a'), ('a')")
    with pytest.raises(asyncpg.UniqueViolationError):
        await _migrate_skipping_001(blank, tmp_path)
    valid = "select indisvalid from pg_index where indexrelid = 'things_name'::regclass"
    assert await blank.fetchval(valid) is False
    await blank.execute("delete from things where ctid in (select max(ctid) from things)")
    assert await _migrate_skipping_001(blank, tmp_path) == ["002_things_name"]
    assert await blank.fetchval(valid) is True
    with pytest.raises(asyncpg.UniqueViolationError):
        await blank.execute("insert into things values ('a')")


async def _migrate_skipping_001(conn: asyncpg.Connection, folder: Path) -> list[str]:
    """Migrate as if 001 (the table, made by the test) were applied already."""
    await conn.execute(
        "create table if not exists schema_migrations (version integer primary key,"
        " name text not null, applied_at timestamptz not null default now())"
    )
    await conn.execute(
        "insert into schema_migrations (version, name) values (1, '001_things')"
        " on conflict do nothing"
    )
    return await db.migrate(conn, folder)


@pytest.mark.parametrize(
    "statement",
    [
        "create index things_name on things (name);",
        "create index concurrently things_name on things (name);",
        "CREATE UNIQUE INDEX if not exists things_name on things (name);",
    ],
)
def test_outside_a_transaction_only_a_rerunnable_index_is_accepted(
    tmp_path: Path, statement: str
) -> None:
    (tmp_path / "001_x.sql").write_text("-- migrate: no transaction\n" + statement)
    with pytest.raises(RuntimeError, match="create index concurrently if not exists"):
        db.load_migrations(tmp_path)


def test_every_migration_of_the_project_loads() -> None:
    names = [m.name for m in db.load_migrations()]
    assert names[0] == "001_init" and "007_retention" in names
    assert not next(m for m in db.load_migrations() if m.name == "007_retention").in_transaction


def test_conditions_number_only_the_values_given() -> None:
    args: list[object] = ["app"]
    found = db.conditions(
        [("t.md5 =", None), ("t.status =", "paid"), ("(s.md5 ~>=~ {} or s.id = {})", "ab")], args
    )
    assert found == ["t.status = $2", "(s.md5 ~>=~ $3 or s.id = $3)"]
    assert args == ["app", "paid", "ab"]
