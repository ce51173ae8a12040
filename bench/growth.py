"""Growth and retention phases of the bench: the figures again with a long history behind
them, and ingest while the retention tick prunes old rows.

Both seed history straight into Postgres with `INSERT ... SELECT generate_series` (a
transaction, its delivered webhook and that webhook's attempt per row), in chunks so that
no statement holds millions of rows at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import load
from procs import CpuMeter

if TYPE_CHECKING:
    from harness import Bench

LIST_PATH = "/api/v1/transactions?status=success&limit=50"
# The same route and query shape on a page that is always empty: no bench row is ever a
# mismatch (nothing here sets expectations), before the seed or after it.
EMPTY_STATUS = "mismatch"
EMPTY_PATH = f"/api/v1/transactions?status={EMPTY_STATUS}&limit=50"
SEED_CHUNK = 250_000
# Goals of the issue that brought these phases (bench/README.md lists them beside each figure).
STATS_GOAL_MS = 5.0
LIST_P99_GOAL_MS = {"empty": 50.0, "history": 100.0}
PRUNING_GOAL = 0.8

# $1 rows ended between $2 and $3 days ago: 70% paid (with Bakong's data), 20% timed out,
# 10% failed; each with its delivered webhook and one attempt, as a real history has them.
HISTORY_SQL = """
with made as (
    insert into transactions (id, md5, status, reason, webhook_url, metadata, bakong_data,
                              created_at, updated_at, deadline_at, completed_at)
    select gen_random_uuid(), md5(random()::text || g), s.status,
           case when s.status <> 'success' then s.status end,
           'http://127.0.0.1:9/history', json_build_object('orderId', 'H-' || g),
           case when s.status = 'success' then json_build_object(
               'hash', md5(g::text) || md5(g::text), 'fromAccountId', 'payer@aba',
               'toAccountId', 'shop@devb', 'currency', 'USD', 'amount', 5.0,
               'description', 'bench history', 'createdDateMs', 1700000000000,
               'acknowledgedDateMs', 1700000000500, 'externalRef', 'ref' || g) end,
           at, at, at + interval '5 minutes', at + interval '1 minute'
    from generate_series(1, $1::int) g
    cross join lateral (
        select now() - ($2::float8 + random() * ($3::float8 - $2::float8))
                       * interval '1 day' as at) t
    cross join lateral (
        select case when g % 10 < 7 then 'success' when g % 10 < 9 then 'timeout'
                    else 'failed' end as status) s
    returning id, completed_at
), sent as (
    insert into deliveries (id, transaction_id, url, payload, status, attempt_count,
                            series_attempts, last_attempt_at, last_status_code, created_at,
                            updated_at, delivered_at)
    select 'msg_h' || replace(id::text, '-', ''), id, 'http://127.0.0.1:9/history',
           convert_to(repeat('x', 400), 'UTF8'), 'delivered', 1, 1, completed_at, 200,
           completed_at, completed_at, completed_at
    from made
    returning id, created_at
)
insert into delivery_attempts (delivery_id, attempt, started_at, duration_ms, status_code,
                               response_body)
select id, 1, created_at, 12, 200, 'ok' from sent
"""


async def seed_history(b: Bench, count: int, *, min_days: float, max_days: float) -> float:
    """`count` finished transactions with their webhooks; returns the seconds it took."""
    started = time.perf_counter()
    for start in range(0, count, SEED_CHUNK):
        await b.db.execute(
            HISTORY_SQL, min(SEED_CHUNK, count - start), float(min_days), float(max_days)
        )
    await b.db.execute("vacuum analyze transactions, deliveries, delivery_attempts")
    return time.perf_counter() - started


async def ingest(b: Bench) -> dict[str, Any]:
    """POST new transactions at 50 connections (after /health on the same server, for the
    ratio); what they made is cancelled after, so that polling it weighs on nothing later."""
    s = b.scale
    url = b.url("gateway")
    health = await load.run(
        url + "/health", seconds=s.health_s, connections=s.connections, tool=b.tool
    )
    meter = b.meter()
    before, started = meter.read(), time.perf_counter()
    made = await load.run(
        url + "/api/v1/transactions",
        seconds=s.ingest_s,
        connections=s.connections,
        tool=b.tool,
        post_hook=b.url("receiver") + "/ingest",
    )
    cpu = CpuMeter.cores(before, meter.read(), time.perf_counter() - started)
    await b.cancel_ingested()
    return {
        "rps": made.rps,
        "p99_ms": made.p99_ms,
        "errors": made.errors,
        "ratio_to_health": made.rps / health.rps if health.rps else None,
        "cpu_cores": cpu,
    }


async def one_client_ms(b: Bench, path: str, seconds: float) -> dict[str, float | None]:
    """One client asking `path` again and again: p50 and p99 of what it waited."""
    waited: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        async with b.http.get(b.url("gateway") + path) as resp:
            await resp.read()
            resp.raise_for_status()
        waited.append((time.perf_counter() - started) * 1000)
    waited.sort()
    return {"p50": pct(waited, 0.5), "p99": pct(waited, 0.99), "count": len(waited)}


async def list_load(b: Bench, path: str) -> dict[str, Any]:
    """`path` at 50 connections: rate, p50 and p99, and the cores of every process."""
    s = b.scale
    meter = b.meter()
    before, started = meter.read(), time.perf_counter()
    listing = await load.run(
        b.url("gateway") + path, seconds=s.ingest_s, connections=s.connections, tool=b.tool
    )
    return {
        "rps": listing.rps,
        "p50_ms": listing.p50_ms,
        "p99_ms": listing.p99_ms,
        "errors": listing.errors,
        "cpu_cores": CpuMeter.cores(before, meter.read(), time.perf_counter() - started),
    }


async def status_rows(b: Bench, status: str) -> int:
    count: int = await b.db.fetchval("select count(*) from transactions where status = $1", status)
    return count


async def measure(b: Bench) -> dict[str, Any]:
    """Ingest, the list route at 50 connections (paid rows, then an empty page), stats and
    /metrics from one client."""
    s = b.scale
    made = await ingest(b)
    paid = await status_rows(b, "success")
    listing = await list_load(b, LIST_PATH)
    empty = await list_load(b, EMPTY_PATH)
    await asyncio.sleep(s.figures_wait_s)  # a figures tick has run since the ingest burst
    rows: int = await b.db.fetchval("select count(*) from transactions")
    return {
        "transactions": rows,
        "success_rows": paid,
        "ingest_rps": made["rps"],
        "ingest_ratio_to_health": made["ratio_to_health"],
        "list_rps": listing["rps"],
        "list_p50_ms": listing["p50_ms"],
        "list_p99_ms": listing["p99_ms"],
        "list_errors": listing["errors"],
        "list_cpu_cores": listing["cpu_cores"],
        "empty_rows": await status_rows(b, EMPTY_STATUS),
        "empty_list": empty,
        "stats_ms": await one_client_ms(b, "/api/v1/stats", s.health_s),
        "metrics_ms": await one_client_ms(b, "/metrics", s.health_s),
    }


async def quiesce(b: Bench) -> None:
    """End what earlier phases left pending, so that polling them does not weigh on these
    figures (the same for the empty and the grown measurement)."""
    rows = await b.db.fetch(
        "update transactions set status = 'cancelled', completed_at = now()"
        " where status = 'pending' returning id"
    )
    for start in range(0, len(rows), 5000):
        await b.r.zrem(b.keys["poll"], *[str(r["id"]) for r in rows[start : start + 5000]])
    b.seed.clear()


async def phase_growth(b: Bench) -> None:
    s = b.scale
    if not s.history:
        return
    await quiesce(b)
    empty = await measure(b)
    # Ended 1 to 170 days ago: history, not yet old enough for retention (180 days).
    seed_s = await seed_history(b, s.history, min_days=1, max_days=170)
    size: int = await b.db.fetchval("select pg_database_size(current_database())")
    grown = await measure(b)
    b.results["growth"] = {
        "history": s.history,
        "seed_s": seed_s,
        "database_bytes": size,
        "empty": empty,
        "history_figures": grown,
    }


async def old_rows(b: Bench) -> int:
    count: int = await b.db.fetchval(
        "select count(*) from transactions where completed_at < now() - interval '180 days'"
    )
    return count


async def phase_retention(b: Bench) -> None:
    """Ingest alone, then ingest while the retention tick prunes `old_rows` old transactions
    (with their webhooks and attempts); the ratio of the two, and the pruning rate."""
    s = b.scale
    if not s.old_rows:
        return
    await quiesce(b)
    alone = await ingest(b)
    seed_s = await seed_history(b, s.old_rows, min_days=200, max_days=400)
    seeded = await old_rows(b)
    # The retention tick comes every 10 s: measure once it is at work.
    deadline = time.monotonic() + s.prune_wait_s
    before = seeded
    for _ in range(150):
        before = await old_rows(b)
        if before < seeded or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    started = time.perf_counter()
    pruning = await ingest(b)
    window_s = time.perf_counter() - started
    after = await old_rows(b)
    b.results["retention"] = {
        "old_rows": s.old_rows,
        "seed_s": seed_s,
        "pruned_while_seeding": s.old_rows - seeded,
        "left_when_measured": before,
        "pruned_in_window": before - after,
        "window_s": window_s,
        "prune_rate": (before - after) / window_s if window_s else None,
        "ingest_alone_rps": alone["rps"],
        "ingest_pruning_rps": pruning["rps"],
        "ratio": pruning["rps"] / alone["rps"] if alone["rps"] else None,
        "cpu_cores": pruning["cpu_cores"],
    }


def rows(res: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """The growth and retention rows of the results table."""
    out: list[tuple[str, str, str, str, str, str]] = []
    g = res.get("growth")
    if g:
        e, h = g["empty"], g["history_figures"]
        n = f"{g['history']:,}"
        size = f"{g['database_bytes'] / 2**30:.1f} GiB"
        out.append(
            (
                f"10. growth: ingest with {n} finished transactions ({size})",
                f"{fmt(h['ingest_rps'])} vs {fmt(e['ingest_rps'])} req/s empty",
                f"{fmt(_ratio(h['ingest_rps'], e['ingest_rps']), 2)}x empty",
                "≥ 0.9x empty",
                "0.91x",
                met(_at_least(h["ingest_rps"], e["ingest_rps"], 0.9)),
            )
        )
        for key, x in (("empty", e), ("history", h)):
            out.append(_list_row(x, LIST_PATH, LIST_P99_GOAL_MS[key], key == "empty"))
        for x in (e, h):
            out.append(_empty_page_row(x))
        for key, label in (("stats_ms", "GET /api/v1/stats"), ("metrics_ms", "GET /metrics")):
            out.append(
                (
                    f"10. growth: {label}, one client, with {n}",
                    f"p50 {fmt(h[key]['p50'], 2)} ms (empty {fmt(e[key]['p50'], 2)} ms)",
                    f"{fmt(_ratio(h[key]['p50'], e[key]['p50']), 2)}x empty",
                    f"p50 ≤ {STATS_GOAL_MS:g} ms, independent of rows",
                    "stats 711 ms at 2M (1.2 ms empty)",
                    met(h[key]["p50"] is not None and h[key]["p50"] <= STATS_GOAL_MS),
                )
            )
    r = res.get("retention")
    if r:
        out.append(
            (
                f"11. retention: ingest while {r['old_rows']:,} old transactions are pruned",
                f"{fmt(r['ingest_pruning_rps'])} vs {fmt(r['ingest_alone_rps'])} req/s alone;"
                f" {fmt(r['pruned_in_window'])} pruned in {fmt(r['window_s'], 0)} s"
                f" ({fmt(r['prune_rate'])} /s, each with its webhook and attempt)",
                f"{fmt(r['ratio'], 2)}x alone",
                f"≥ {PRUNING_GOAL:g}x alone",
                "-",
                met(r["ratio"] is not None and r["ratio"] >= PRUNING_GOAL),
            )
        )
    return out


Row6 = tuple[str, str, str, str, str, str]


def _list_row(x: dict[str, Any], path: str, goal: float, empty: bool) -> Row6:
    # Before the seed the paid page is empty only when no earlier phase paid a row.
    label = f"{x['transactions']:,} rows, {x.get('success_rows', 0):,} of them success"
    return (
        f"10. growth: GET {path}, 50 conns ({label})",
        f"p50 {fmt(x['list_p50_ms'], 1)} ms, p99 {fmt(x['list_p99_ms'], 1)} ms;"
        f" {fmt(x['list_rps'])} req/s",
        f"p99 {fmt(_ratio(x['list_p99_ms'], x['list_p50_ms']), 1)}x p50",
        f"p99 < {goal:g} ms",
        "p99 713 ms empty, 837 ms at 2M" if empty else "p99 837 ms at 2M",
        met(x["list_p99_ms"] is not None and x["list_p99_ms"] < goal),
    )


def _empty_page_row(x: dict[str, Any]) -> Row6:
    page = x["empty_list"]
    goal = LIST_P99_GOAL_MS["empty"]
    return (
        f"10. growth: GET {EMPTY_PATH}, 50 conns: an empty page"
        f" ({x['empty_rows']:,} {EMPTY_STATUS} rows of {x['transactions']:,})",
        f"p50 {fmt(page['p50_ms'], 1)} ms, p99 {fmt(page['p99_ms'], 1)} ms;"
        f" {fmt(page['rps'])} req/s",
        f"p99 {fmt(_ratio(page['p99_ms'], page['p50_ms']), 1)}x p50",
        f"p99 < {goal:g} ms",
        "p99 713 ms, p50 3 ms",
        met(page["p99_ms"] is not None and page["p99_ms"] < goal),
    )


def pct(values: list[float], p: float) -> float | None:
    return values[min(len(values) - 1, int(p * len(values)))] if values else None


def fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _at_least(a: float | None, b: float | None, ratio: float) -> bool | None:
    value = _ratio(a, b)
    return None if value is None else value >= ratio
