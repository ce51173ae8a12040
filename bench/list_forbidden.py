"""Figure 8: a gateway of its own polling while Bakong's list endpoint answers 403."""

from __future__ import annotations

import asyncio
import random
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from harness import JSON, Arrivals, Bench, pct, side_stack
from procs import CpuMeter

# A payment made this young is a young payment; a check of an md5 this young, a young check.
YOUNG_S = 30.0


async def seed_ages(side: Bench, count: int, life_s: float, hook: str) -> None:
    """`count` pending transactions of every age up to `life_s`, each timing out at that age,
    their polls spread over one interval (as the list endpoint left them)."""
    now = datetime.now(UTC)
    rows = []
    for _ in range(count):
        created = now - timedelta(seconds=random.uniform(0, life_s))
        deadline = created + timedelta(seconds=life_s)
        rows.append((uuid.uuid4(), secrets.token_hex(16), hook, created, deadline))
    await side.db.copy_records_to_table(
        "transactions",
        records=rows,
        columns=["id", "md5", "webhook_url", "created_at", "deadline_at"],
    )
    now_ms = int(time.time() * 1000)
    span = int(side.scale.interval_s * 1000)
    await side.r.zadd(
        side.keys["poll"], {str(r[0]): now_ms + random.randint(100, span) for r in rows}
    )
    items = [[r[1], r[3].timestamp(), r[4].timestamp(), None] for r in rows]
    await side.bakong_post("/bench/track", {"items": items})


async def keep_creating(
    side: Bench, per_s: float, hook: str, paid: list[str], stop: asyncio.Event
) -> int:
    """Create transactions through the API at `per_s`; pay a share of them while young (each
    md5 goes into `paid` when it is marked paid). Returns how many were created."""
    s = side.scale
    url = side.url("gateway") + "/api/v1/transactions"
    payments: set[asyncio.Task[None]] = set()

    async def pay_at(md5: str, age_s: float) -> None:
        await asyncio.sleep(age_s)
        await side.pay([md5])
        paid.append(md5)

    start, n = time.monotonic(), 0
    while not stop.is_set():
        await asyncio.sleep(max(0.0, start + n / per_s - time.monotonic()))
        n += 1
        md5, born = secrets.token_hex(16), time.time()
        until = born + s.lf_lifetime_s
        await side.bakong_post("/bench/track", {"items": [[md5, born, until, born]]})
        body = {"md5": md5, "webhookUrl": hook, "timeoutSeconds": int(s.lf_lifetime_s)}
        async with side.http.post(url, data=orjson.dumps(body), headers=JSON) as resp:
            resp.raise_for_status()
        if random.random() < s.lf_pay_share:
            task = asyncio.create_task(pay_at(md5, random.uniform(2.0, YOUNG_S - 2.0)))
            payments.add(task)
            task.add_done_callback(payments.discard)
    for task in list(payments):
        task.cancel()
    return n


async def final_checks(side: Bench, since: float, until: float, hook: str) -> dict[str, int]:
    """What became of the transactions whose deadline fell in [since, until): `timeout
    not_paid` only after a final check answered."""
    rows = await side.db.fetch(
        "select status || coalesce(' ' || reason, '') as outcome, count(*) as n"
        " from transactions where webhook_url = $1"
        " and deadline_at >= to_timestamp($2) and deadline_at < to_timestamp($3) group by 1",
        hook,
        since,
        until,
    )
    return {r["outcome"]: r["n"] for r in rows}


async def steady_list_forbidden(side: Bench, count: int) -> dict[str, Any]:
    """`count` pending md5s kept at that number while the list endpoint answers 403."""
    s = side.scale
    hook = side.url("receiver") + "/lf"
    await side.bakong_post("/control/faults", {"listStatus": 403})
    arrivals = Arrivals(side.url("receiver"))
    await arrivals.refresh(side.http)
    await seed_ages(side, count, s.lf_lifetime_s, hook)
    paid: list[str] = []
    stop = asyncio.Event()
    creator = asyncio.create_task(keep_creating(side, count / s.lf_lifetime_s, hook, paid, stop))
    try:
        w = await measure_window(side, paid)
    finally:
        stop.set()
        created = await creator
    young_paid = paid[w.paid_before :]
    detect = await detections(side, arrivals, young_paid)
    # Final checks are made a tick after the deadline, later when put off by the limit.
    finals = await final_checks(side, w.since, w.until - 2 * s.interval_s, hook)
    window = w.bakong
    gaps, opened = window["gaps"], window["openGaps"]
    return {
        "pending": count,
        "lifetime_s": s.lf_lifetime_s,
        "created": created,
        "requests_per_s": (window["listCalls"] + window["singleCalls"]) / window["elapsedS"],
        "checks_per_s": window["md5Checks"] / window["elapsedS"],
        "gap": gaps,
        "young_gap": window["youngGaps"],
        "old_gap": window["oldGaps"],
        "gap_begun_before": window["gapsBegunBefore"],
        "checks": w.checks,  # what /api/v1/stats says of the mode and the budget
        "open_gap": opened,
        "longest_unchecked_s": max(gaps["max"] or 0.0, opened["max"] or 0.0),
        "finals": finals,
        "young_paid": len(young_paid),
        "detected": len(detect),
        "detect_p50_s": pct(detect, 0.5),
        "detect_p90_s": pct(detect, 0.9),
        "detect_max_s": detect[-1] if detect else None,
        "cpu_cores": w.cpu,
    }


@dataclass(frozen=True)
class Window:
    """One measured stretch: what the simulated Bakong and /api/v1/stats said of it."""

    bakong: dict[str, Any]
    checks: dict[str, Any]
    cpu: dict[str, float]
    since: float  # epoch seconds
    until: float
    paid_before: int  # md5s marked paid before it began


async def measure_window(side: Bench, paid: list[str]) -> Window:
    """After the warm-up, `lf_window_s` of checks, CPU and the gateway's own account of them."""
    s = side.scale
    await asyncio.sleep(s.lf_warmup_s)
    await side.bakong_post("/bench/window", {})
    since, paid_before = time.time(), len(paid)
    meter = side.meter()
    before, started = meter.read(), time.perf_counter()
    await asyncio.sleep(s.lf_window_s)
    window = await side.bakong_get(f"/bench/window?young={YOUNG_S:g}")
    cpu = CpuMeter.cores(before, meter.read(), time.perf_counter() - started)
    async with side.http.get(side.url("gateway") + "/api/v1/stats") as resp:
        checks = (await resp.json())["bakong"]["checks"]
    return Window(window, checks, cpu, since, time.time(), paid_before)


async def detections(side: Bench, arrivals: Arrivals, md5s: list[str]) -> list[float]:
    """Webhook arrival minus mark-paid of these md5s, sorted (once they arrived, or a wait)."""
    await arrivals.wait_for(side.http, md5s, timeout_s=4 * side.scale.interval_s + 10)
    paid_at = await side.bakong_get("/bench/paid")
    return sorted(
        arrivals.first[m] - paid_at[m] for m in md5s if m in arrivals.first and m in paid_at
    )


async def phase_list_forbidden(b: Bench) -> None:
    s = b.scale
    out: dict[str, Any] = {"rps": s.lf_rps}
    for key, count in (("small", s.lf_small), ("large", s.lf_pending)):
        if not count:
            continue
        async with side_stack(b, f"lf{count}", BAKONG_MAX_RPS=f"{s.lf_rps:g}") as side:
            out[key] = await steady_list_forbidden(side, count)
    b.results["list_forbidden"] = out
