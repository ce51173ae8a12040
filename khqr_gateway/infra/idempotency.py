"""Postgres queries for Idempotency-Key reservations and their stored responses, per app."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from khqr_gateway.infra.db import row_as


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A key already reserved: the hash of its request body, and its response once there is
    one (no status yet while the first request is still in progress)."""

    request_hash: str
    status_code: int | None
    response: bytes | None


async def claim_idempotency_key(
    pool: asyncpg.Pool, app_id: str, key_hash: str, request_hash: str
) -> StoredResponse | None:
    """Reserve the app's key; returns None when reserved now, else what it holds."""
    inserted = await pool.fetchval(
        """
        insert into idempotency_keys (app_id, key_hash, request_hash) values ($1, $2, $3)
        on conflict (app_id, key_hash) do nothing returning key_hash
        """,
        app_id,
        key_hash,
        request_hash,
    )
    if inserted:
        return None
    row = await pool.fetchrow(
        "select request_hash, status_code, response from idempotency_keys"
        " where app_id = $1 and key_hash = $2",
        app_id,
        key_hash,
    )
    return None if row is None else row_as(StoredResponse, row)


async def complete_idempotency_key(
    pool: asyncpg.Pool, app_id: str, key_hash: str, status_code: int, response: bytes
) -> None:
    await pool.execute(
        "update idempotency_keys set status_code = $3, response = $4"
        " where app_id = $1 and key_hash = $2",
        app_id,
        key_hash,
        status_code,
        response,
    )


async def release_idempotency_key(pool: asyncpg.Pool, app_id: str, key_hash: str) -> None:
    await pool.execute(
        "delete from idempotency_keys where app_id = $1 and key_hash = $2 and status_code is null",
        app_id,
        key_hash,
    )


async def expire_idempotency_keys(pool: asyncpg.Pool, older_than_s: int = 86400) -> int:
    result = await pool.execute(
        "delete from idempotency_keys where created_at < now() - make_interval(secs => $1)",
        float(older_than_s),
    )
    return int(result.split()[-1])
