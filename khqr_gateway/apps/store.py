"""Postgres queries for apps, their API keys (hashes only) and their webhook secrets."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson

from khqr_gateway.apps.model import (
    ApiKey,
    App,
    AppChanges,
    Merchant,
    NewKey,
    new_app_id,
    new_key,
    new_webhook_secret,
)

APP_COLUMNS = (
    "id, name, webhook_url, merchant, credential_id, telegram_chat_id, telegram_bot_token,"
    " telegram_language, rate_limit, disabled_at, created_at, updated_at"
)
KEY_COLUMNS = "id, app_id, prefix, created_at, expires_at, last_used_at, revoked_at"
# What an update may set: the settings, never an id, a time or whether it is disabled.
UPDATABLE = frozenset(AppChanges.__annotations__)


def _merchant(value: Any) -> Merchant | None:
    if value is None:
        return None
    data = orjson.loads(value) if isinstance(value, str | bytes) else value
    return Merchant(data["accountId"], data["merchantName"], data["merchantCity"])


def _merchant_json(merchant: Merchant | None) -> str | None:
    if merchant is None:
        return None
    body = {
        "accountId": merchant.account_id,
        "merchantName": merchant.merchant_name,
        "merchantCity": merchant.merchant_city,
    }
    return orjson.dumps(body).decode()


def _app(row: Mapping[str, Any]) -> App:
    values = {c: row[c] for c in APP_COLUMNS.split(", ")}
    return App(**values | {"merchant": _merchant(values["merchant"])})


def _key(row: Mapping[str, Any]) -> ApiKey:
    return ApiKey(**{c: row[c] for c in KEY_COLUMNS.split(", ")})


async def create(
    pool: asyncpg.Pool,
    name: str,
    *,
    webhook_url: str | None = None,
    merchant: Merchant | None = None,
    credential_id: int | None = None,
    telegram_chat_id: str | None = None,
    telegram_bot_token: str | None = None,
    telegram_language: str = "en",
    rate_limit: int | None = None,
    key_expires_at: datetime | None = None,
    app_id: str | None = None,
) -> tuple[App, NewKey, str]:
    """A new app with its first key and webhook secret, made together or not at all; its id
    is made here unless given (one chosen first, for rows made for it beforehand)."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"""
            insert into apps (id, name, webhook_url, merchant, credential_id, telegram_chat_id,
                              telegram_bot_token, telegram_language, rate_limit)
            values ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9)
            returning {APP_COLUMNS}
            """,
            app_id or new_app_id(),
            name,
            webhook_url,
            _merchant_json(merchant),
            credential_id,
            telegram_chat_id,
            telegram_bot_token,
            telegram_language,
            rate_limit,
        )
        key = await _insert_key(conn, row["id"], key_expires_at)
        secret = await _insert_secret(conn, row["id"])
    return _app(row), key, secret


async def get(pool: asyncpg.Pool, app_id: str) -> App | None:
    row = await pool.fetchrow(f"select {APP_COLUMNS} from apps where id = $1", app_id)
    return _app(row) if row else None


async def name_in_use(pool: asyncpg.Pool, name: str) -> bool:
    """Whether an enabled app has this name (any case), as the unique index apps_name says."""
    found = await pool.fetchval(
        "select 1 from apps where lower(name) = lower($1) and disabled_at is null", name
    )
    return found is not None


async def find(pool: asyncpg.Pool, id_or_name: str) -> App | None:
    """The app with this id, else the enabled app with this name (any case)."""
    row = await pool.fetchrow(
        f"""
        select {APP_COLUMNS} from apps
        where id = $1 or (lower(name) = lower($1) and disabled_at is null)
        order by id = $1 desc limit 1
        """,
        id_or_name,
    )
    return _app(row) if row else None


async def list_page(pool: asyncpg.Pool, *, after: str | None, limit: int) -> list[App]:
    """Apps by id, `limit` after the id `after` (keyset paging on the primary key)."""
    rows = await pool.fetch(
        f"select {APP_COLUMNS} from apps where $1::text is null or id > $1 order by id limit $2",
        after,
        limit,
    )
    return [_app(r) for r in rows]


async def update(pool: asyncpg.Pool, app_id: str, changes: AppChanges) -> App | None:
    """The enabled app with `changes` set (the columns they name, no other); None when no
    enabled app has this id. A name another enabled app has raises UniqueViolationError."""
    unknown = set(changes) - UPDATABLE
    if unknown:  # column names are written into the statement: only ours, ever
        raise ValueError(f"not a setting of an app: {sorted(unknown)}")
    values: list[Any] = [app_id]
    sets = ["updated_at = now()"]
    for column, value in changes.items():
        if column == "merchant":
            values.append(_merchant_json(changes["merchant"]))
            sets.append(f"merchant = ${len(values)}::jsonb")
        else:
            values.append(value)
            sets.append(f"{column} = ${len(values)}")
    row = await pool.fetchrow(
        f"""
        update apps set {", ".join(sets)}
        where id = $1 and disabled_at is null returning {APP_COLUMNS}
        """,
        *values,
    )
    return _app(row) if row else None


async def disable(pool: asyncpg.Pool, app_id: str) -> App | None:
    """Disabled apps keep their rows (their pending transactions are still reported)."""
    row = await pool.fetchrow(
        f"""
        update apps set disabled_at = coalesce(disabled_at, now()), updated_at = now()
        where id = $1 returning {APP_COLUMNS}
        """,
        app_id,
    )
    return _app(row) if row else None


async def add_key(
    pool: asyncpg.Pool | asyncpg.Connection, app_id: str, *, expires_at: datetime | None = None
) -> NewKey:
    return await _insert_key(pool, app_id, expires_at)


async def _insert_key(
    conn: asyncpg.Pool | asyncpg.Connection, app_id: str, expires_at: datetime | None
) -> NewKey:
    key = new_key()
    await conn.execute(
        "insert into api_keys (id, app_id, key_hash, prefix, expires_at)"
        " values ($1, $2, $3, $4, $5)",
        key.id,
        app_id,
        key.hash,
        key.prefix,
        expires_at,
    )
    return key


async def usable_key_counts(pool: asyncpg.Pool) -> dict[str, int]:
    """Keys neither revoked nor expired, by app."""
    rows = await pool.fetch(
        """
        select app_id, count(*) as n from api_keys
        where revoked_at is null and (expires_at is null or expires_at > now())
        group by app_id
        """
    )
    return {r["app_id"]: r["n"] for r in rows}


async def list_keys(pool: asyncpg.Pool, app_id: str) -> list[ApiKey]:
    rows = await pool.fetch(
        f"select {KEY_COLUMNS} from api_keys where app_id = $1 order by created_at, id", app_id
    )
    return [_key(r) for r in rows]


async def revoke_key(pool: asyncpg.Pool, app_id: str, key_id: str) -> bool:
    """False when the app has no such key; revoking twice keeps the first moment."""
    found = await pool.fetchval(
        """
        update api_keys set revoked_at = coalesce(revoked_at, now())
        where id = $1 and app_id = $2 returning id
        """,
        key_id,
        app_id,
    )
    return found is not None


async def find_key(pool: asyncpg.Pool, digest: bytes) -> tuple[ApiKey, App] | None:
    """The key with this hash and its app: one lookup on the unique index of the hash."""
    row = await pool.fetchrow(
        f"""
        select {", ".join("k." + c for c in KEY_COLUMNS.split(", "))},
               {", ".join("a." + c + " as app_" + c for c in APP_COLUMNS.split(", "))}
        from api_keys k join apps a on a.id = k.app_id
        where k.key_hash = $1
        """,
        digest,
    )
    if row is None:
        return None
    return _key(row), _app({c: row["app_" + c] for c in APP_COLUMNS.split(", ")})


async def touch_keys(pool: asyncpg.Pool, used: Mapping[str, datetime]) -> None:
    """Record when keys were last used, many in one statement (a tick's batch, not a request's)."""
    if not used:
        return
    await pool.execute(
        """
        update api_keys k set last_used_at = u.at
        from unnest($1::text[], $2::timestamptz[]) as u (id, at)
        where k.id = u.id and (k.last_used_at is null or k.last_used_at < u.at)
        """,
        list(used),
        list(used.values()),
    )


async def rotate_secret(pool: asyncpg.Pool, app_id: str) -> str:
    """A new webhook secret; the one it replaces keeps signing for the rotation window."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "update webhook_secrets set replaced_at = now()"
            " where app_id = $1 and replaced_at is null",
            app_id,
        )
        return await _insert_secret(conn, app_id)


async def _insert_secret(conn: asyncpg.Connection, app_id: str) -> str:
    secret = new_webhook_secret()
    await conn.execute(
        "insert into webhook_secrets (app_id, secret) values ($1, $2)", app_id, secret
    )
    return secret


async def signing_secrets(pool: asyncpg.Pool, app_id: str, window: timedelta) -> list[str]:
    """The secrets that sign this app's webhooks now, newest first."""
    rows = await pool.fetch(
        """
        select secret from webhook_secrets
        where app_id = $1 and (replaced_at is null or replaced_at > now() - $2::interval)
        order by id desc
        """,
        app_id,
        window,
    )
    return [r["secret"] for r in rows]
