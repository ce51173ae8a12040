"""Counts by app and status that triggers keep as rows change (sql/006, 017): read without a
scan."""

from __future__ import annotations

import asyncpg

KINDS = ("transactions", "deliveries", "late")
# Only one process folds at a time; any number read.
FOLD_LOCK_ID = 0x6B687173

# Folds the changes appended since the last fold into status_counts and reads the totals,
# in one statement. Its parts share one snapshot, so the read sees the changes as they were
# before this fold moved them: counts plus changes is the total either way.
_FOLD_AND_READ = """
with got as (
    select pg_try_advisory_xact_lock($1) as lock
), moved as (
    delete from status_count_changes where (select lock from got)
    returning app_id, kind, status, n
), folded as (
    insert into status_counts (app_id, kind, status, n)
    select app_id, kind, status, sum(n) from moved group by app_id, kind, status
    on conflict (app_id, kind, status) do update set n = status_counts.n + excluded.n
)
select app_id, kind, status, sum(n)::bigint as n
from (select app_id, kind, status, n from status_counts
      union all select app_id, kind, status, n from status_count_changes) rows
group by app_id, kind, status having sum(n) <> 0
"""

# By kind (`transactions`, `deliveries`, `late`), then status.
Counts = dict[str, dict[str, int]]


def empty() -> Counts:
    return {kind: {} for kind in KINDS}


async def fold_and_read(pool: asyncpg.Pool) -> dict[str, Counts]:
    """Counts of each app by kind and status; statuses with no rows are left out. Reads a
    row per app and status, and per write since the last fold."""
    by_app: dict[str, Counts] = {}
    for row in await pool.fetch(_FOLD_AND_READ, FOLD_LOCK_ID):
        counts = by_app.setdefault(row["app_id"], empty())
        counts.setdefault(row["kind"], {})[row["status"]] = row["n"]
    return by_app


def total(by_app: dict[str, Counts]) -> Counts:
    """Every app's counts added up (what /metrics shows: no label per app)."""
    summed = empty()
    for counts in by_app.values():
        for kind, statuses in counts.items():
            into = summed.setdefault(kind, {})
            for status, n in statuses.items():
                into[status] = into.get(status, 0) + n
    return summed
