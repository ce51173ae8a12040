"""Counts by status that triggers keep as rows change (sql/006): read without a scan."""

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
    delete from status_count_changes where (select lock from got) returning kind, status, n
), folded as (
    insert into status_counts (kind, status, n)
    select kind, status, sum(n) from moved group by kind, status
    on conflict (kind, status) do update set n = status_counts.n + excluded.n
)
select kind, status, sum(n)::bigint as n
from (select kind, status, n from status_counts
      union all select kind, status, n from status_count_changes) rows
group by kind, status having sum(n) <> 0
"""


async def fold_and_read(pool: asyncpg.Pool) -> dict[str, dict[str, int]]:
    """Counts by kind (`transactions`, `deliveries`, `late`) and status; statuses with no
    rows are left out. Reads a row per status and per write since the last fold."""
    counts: dict[str, dict[str, int]] = {kind: {} for kind in KINDS}
    for row in await pool.fetch(_FOLD_AND_READ, FOLD_LOCK_ID):
        counts.setdefault(row["kind"], {})[row["status"]] = row["n"]
    return counts
