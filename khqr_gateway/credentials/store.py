"""Postgres queries for Bakong credentials."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime

import asyncpg

from khqr_gateway.apps.model import DEFAULT_APP_ID
from khqr_gateway.credentials.model import Credential, CredentialStatus
from khqr_gateway.infra.db import row_as

CREDENTIAL_COLUMNS = (
    "id, token, email, expires_at, status, is_default, last_error, created_at, updated_at"
)


def _credential(row: asyncpg.Record) -> Credential:
    return row_as(Credential, row, status=CredentialStatus(row["status"]))


def fingerprint(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def credential_fingerprint(*, token: str | None, email: str | None) -> str:
    """The dedupe key of a credential: its email when it has one, else its token."""
    return fingerprint(("email:" + email.lower()) if email else ("token:" + (token or "")))


async def upsert_credential(
    pool: asyncpg.Pool,
    *,
    token: str | None,
    email: str | None,
    expires_at: datetime | None,
    is_default: bool = False,
    app_id: str = DEFAULT_APP_ID,
) -> Credential:
    """One row per token (or per email): the same credential sent twice is stored once."""
    credential, _ = await save_credential(
        pool,
        token=token,
        email=email,
        expires_at=expires_at,
        is_default=is_default,
        app_id=app_id,
    )
    return credential


async def save_credential(
    pool: asyncpg.Pool,
    *,
    token: str | None,
    email: str | None,
    expires_at: datetime | None,
    is_default: bool = False,
    app_id: str = DEFAULT_APP_ID,
) -> tuple[Credential, bool]:
    """`upsert_credential`, also saying whether the row is new. A new token reactivates it.
    A new row is the app's that sent it (which lists it)."""
    key = credential_fingerprint(token=token, email=email)
    async with pool.acquire() as conn, conn.transaction():
        if is_default:
            await conn.execute(
                "update credentials set is_default = false"
                " where is_default and (fingerprint, app_id) <> ($1, $2)",
                key,
                app_id,
            )
        row = await conn.fetchrow(
            f"""
            insert into credentials (fingerprint, email, token, expires_at, is_default, app_id)
            values ($1, $2, $3, $4, $5, $6)
            on conflict (app_id, fingerprint) do update set
                token = coalesce(excluded.token, credentials.token),
                expires_at = case when excluded.token is null then credentials.expires_at
                                  else excluded.expires_at end,
                is_default = credentials.is_default or excluded.is_default,
                status = case when excluded.token is null then credentials.status
                              else 'active' end,
                last_error = case when excluded.token is null then credentials.last_error
                                  else null end,
                updated_at = now()
            returning {CREDENTIAL_COLUMNS}, (xmax = 0) as inserted
            """,
            key,
            email,
            token,
            expires_at,
            is_default,
            app_id,
        )
    return _credential(row), bool(row["inserted"])


async def delete_unowned_credentials(pool: asyncpg.Pool, app_id: str) -> int:
    """Delete the credentials made for `app_id` if no such app exists (one whose create
    lost a race for its name); none of an app that does."""
    result = await pool.execute(
        "delete from credentials where app_id = $1"
        " and not exists (select 1 from apps where id = $1)",
        app_id,
    )
    return int(result.split()[-1])


async def credentials_by_id(pool: asyncpg.Pool, ids: Sequence[int]) -> dict[int, Credential]:
    rows = await pool.fetch(
        f"select {CREDENTIAL_COLUMNS} from credentials where id = any($1::bigint[])",
        list(ids),
    )
    return {r["id"]: _credential(r) for r in rows}


async def list_credentials(
    pool: asyncpg.Pool,
    app_id: str | None,
    *,
    status: CredentialStatus | None = None,
    after: int | None = None,
    limit: int = 100,
) -> list[Credential]:
    """The app's credentials (None: every app's) in id order, optionally of one status, after
    the id `after`."""
    rows = await pool.fetch(
        f"""
        select {CREDENTIAL_COLUMNS} from credentials
        where ($4::text is null or app_id = $4) and ($1::text is null or status = $1)
              and ($2::bigint is null or id > $2)
        order by id limit $3
        """,
        status,
        after,
        limit,
        app_id,
    )
    return [_credential(r) for r in rows]


async def credentials_needing_care(pool: asyncpg.Pool, renew_before: datetime) -> list[Credential]:
    """Email credentials to renew (no token, or expiring before `renew_before`; expired ones
    only while the default or a pending transaction needs them) and token-only credentials
    whose token has expired but are still marked active."""
    rows = await pool.fetch(
        f"""
        select {CREDENTIAL_COLUMNS} from credentials c
        where (email is not null and status = 'active'
               and (token is null or expires_at < $1))
           or (email is not null and status = 'expired'
               and (is_default or exists (select 1 from transactions t
                                          where t.credential_id = c.id
                                            and t.status = 'pending')))
           or (email is null and status = 'active' and expires_at <= now())
        order by id
        """,
        renew_before,
    )
    return [_credential(r) for r in rows]


async def mark_credential_expired(pool: asyncpg.Pool, credential_id: int, error: str) -> bool:
    """Mark a credential unusable with why; True when it was active until now."""
    was = await pool.fetchval(
        """
        update credentials c set status = 'expired', last_error = $2, updated_at = now()
        from (select id, status from credentials where id = $1 for update) old
        where c.id = old.id returning old.status
        """,
        credential_id,
        error,
    )
    return bool(was == CredentialStatus.ACTIVE)


async def reactivate_credential(pool: asyncpg.Pool, credential_id: int, token: str) -> bool:
    """Active again with the same token (Bakong accepts it again); False if it changed."""
    done = await pool.fetchval(
        """
        update credentials set status = 'active', last_error = null, updated_at = now()
        where id = $1 and token = $2 and status = 'expired' returning true
        """,
        credential_id,
        token,
    )
    return bool(done)


async def set_credential_error(pool: asyncpg.Pool, credential_id: int, error: str | None) -> None:
    await pool.execute(
        "update credentials set last_error = $2, updated_at = now() where id = $1",
        credential_id,
        error,
    )


async def save_token(
    pool: asyncpg.Pool, credential_id: int, token: str, expires_at: datetime | None
) -> None:
    await pool.execute(
        """
        update credentials set token = $2, expires_at = $3, status = 'active',
            last_error = null, updated_at = now()
        where id = $1
        """,
        credential_id,
        token,
        expires_at,
    )
