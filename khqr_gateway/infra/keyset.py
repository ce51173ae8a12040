"""Keyset pages: the newest-first listing query every list route shares, and walking pages."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import asyncpg

from khqr_gateway.infra.db import conditions

Row = TypeVar("Row")
Key = TypeVar("Key")


async def newest_first(
    pool: asyncpg.Pool,
    select: str,
    alias: str,
    filters: Sequence[tuple[str, Any]],
    *,
    as_row: Callable[[asyncpg.Record], Row],
    before: tuple[datetime, Any] | None,
    limit: int,
) -> list[Row]:
    """Rows of `select` (aliased `alias`) matching every `(column op, value)` with a value,
    strictly older than `before` (the last row of the previous page), newest first, each
    made a value by `as_row`. A condition that names its value more than once says where
    with `{}` (see `db.conditions`)."""
    args: list[Any] = []
    where = conditions(filters, args)
    if before:
        args += [before[0], before[1]]
        where.append(f"({alias}.created_at, {alias}.id) < (${len(args) - 1}, ${len(args)})")
    args.append(limit)
    clause = ("where " + " and ".join(where)) if where else ""
    rows = await pool.fetch(
        f"{select} {clause} order by {alias}.created_at desc, {alias}.id desc limit ${len(args)}",
        *args,
    )
    return [as_row(r) for r in rows]


async def pages(
    fetch: Callable[[Key | None], Awaitable[Sequence[Row]]], key: Callable[[Row], Key]
) -> AsyncIterator[Sequence[Row]]:
    """Every page `fetch` gives, from the first (after None) on, each asked after the `key`
    of the last row of the one before, until a page comes back empty."""
    after: Key | None = None
    while rows := await fetch(after):
        yield rows
        after = key(rows[-1])
