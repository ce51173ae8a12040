"""Postgres queries of live status and the hosted payment page."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from khqr_gateway.infra.db import row_as
from khqr_gateway.transactions.model import Status


@dataclass(frozen=True, slots=True)
class Page:
    """What the payment page of one transaction shows."""

    id: UUID
    app_id: str
    md5: str
    status: Status
    qr: str | None
    expected: dict[str, Any] | None
    deadline_at: datetime
    return_url: str | None
    # Once paid: Bakong's data (its time and hash make the receipt); once final, when.
    paid: dict[str, Any] | None = None
    completed_at: datetime | None = None
    deeplink: str | None = None  # Bakong's "open in the app" link for this QR, if it gave one


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def status_of(
    pool: asyncpg.Pool, app_id: str, job_id: UUID
) -> tuple[Status, str | None] | None:
    """The status and reason of the app's transaction; None when it has none with this id."""
    row = await pool.fetchrow(
        "select status, reason from transactions where app_id = $1 and id = $2", app_id, job_id
    )
    return None if row is None else (Status(row["status"]), row["reason"])


async def open_page(
    pool: asyncpg.Pool,
    app_id: str,
    job_id: UUID,
    token: str,
    return_url: str | None,
    deeplink: str | None = None,
) -> None:
    """Guard the page of the app's transaction with `token` (only its hash is kept)."""
    await pool.execute(
        "update transactions set page_token_hash = $2, return_url = $3, deeplink = $4"
        " where id = $1 and app_id = $5",
        job_id,
        token_hash(token),
        return_url,
        deeplink,
        app_id,
    )


async def page(pool: asyncpg.Pool, job_id: UUID, token: str) -> Page | None:
    """The page of a transaction when `token` is its page token; None otherwise."""
    row = await pool.fetchrow(
        """
        select id, app_id, md5, status, qr, expected, deadline_at, return_url, page_token_hash,
               bakong_data as paid, completed_at, deeplink
        from transactions where id = $1
        """,
        job_id,
    )
    stored = row["page_token_hash"] if row is not None else None
    # Compared in constant time even when there is no such page, so timing tells nothing.
    matches = hmac.compare_digest(token_hash(token), stored or "0" * 64)
    if row is None or stored is None or not matches:
        return None
    return row_as(Page, row, status=Status(row["status"]))
