"""Phases of figures 1-7 and 13: ingest, capacity, detection, delivery, recovery, scale-out,
compat, apps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import load
from harness import Arrivals, Bench, div, pct
from procs import CpuMeter, memory_kib

from khqr_gateway.bakong.sandbox import make_token

# Figure 13: ingest spread over this many apps' keys.
APPS = 100


async def load_pair(b: Bench, name: str, seconds: float, profile: str) -> dict[str, Any]:
    """GET /health, then POST new transactions, on the same server with the same clients."""
    conns = b.scale.connections
    health = await load.run(
        b.url(name) + "/health", seconds=b.scale.health_s, connections=conns, tool=b.tool
    )
    await b.bakong_post("/bench/window", {})
    meter = b.meter()
    before, started = meter.read(), time.perf_counter()
    spy = b.profile(profile, seconds)
    ingest = await load.run(
        b.url(name) + "/api/v1/transactions",
        seconds=seconds,
        connections=conns,
        tool=b.tool,
        post_hook=b.url("receiver") + "/ingest",
    )
    cpu = CpuMeter.cores(before, meter.read(), time.perf_counter() - started)
    window = await b.bakong_get("/bench/window")
    if spy:
        spy.wait(timeout=30)
    cancelled = await b.cancel_ingested()
    b.note_rss()
    return {
        "tool": ingest.tool,
        "rps": ingest.rps,
        "p50_ms": ingest.p50_ms,
        "p99_ms": ingest.p99_ms,
        "errors": ingest.errors,
        "requests": ingest.requests,
        "created": cancelled,
        "health_rps": health.rps,
        "health_p99_ms": health.p99_ms,
        "ratio_to_health": ingest.rps / health.rps if health.rps else None,
        "poll_gap": window["gaps"],
        "poll_open_gap": window["openGaps"],
        "cpu_cores": cpu,
    }


async def phase_ingest_idle(b: Bench) -> None:
    b.results["ingest_idle"] = await load_pair(b, "gateway", b.scale.ingest_s, "ingest-idle")


async def phase_capacity(b: Bench) -> None:
    s = b.scale
    await b.seed_pending(s.pending)
    await asyncio.sleep(s.warmup_s)
    await b.bakong_post("/bench/window", {})
    meter = b.meter()
    before, started = meter.read(), time.perf_counter()
    spy = b.profile("capacity", s.capacity_s)
    await asyncio.sleep(s.capacity_s)
    cpu = CpuMeter.cores(before, meter.read(), time.perf_counter() - started)
    window = await b.bakong_get("/bench/window")
    if spy:
        spy.wait(timeout=30)
    b.note_rss()
    minutes = window["elapsedS"] / 60
    calls = window["listCalls"] + window["singleCalls"]
    pending = window["tracked"]
    b.results["capacity"] = {
        "pending": pending,
        "gap": window["gaps"],
        "open_gap": window["openGaps"],
        "bakong_requests_per_md5_min": calls / pending / minutes if pending else None,
        "checks_per_md5_min": window["md5Checks"] / pending / minutes if pending else None,
        "list_calls": window["listCalls"],
        "single_calls": window["singleCalls"],
        "cpu_cores": cpu,
        "rss_kib": memory_kib(b.pid("gateway"), "VmRSS"),
        "peak_rss_kib": b.peak_rss_kib,
    }


async def phase_detection(b: Bench) -> None:
    s = b.scale
    md5s = b.take_unpaid(s.detect)
    step = s.detect_spread_s / max(1, len(md5s))
    start = time.monotonic()
    tasks = []

    for i, md5 in enumerate(md5s):
        await asyncio.sleep(max(0.0, start + i * step - time.monotonic()))
        tasks.append(asyncio.create_task(b.pay([md5])))
    await asyncio.gather(*tasks)
    arrivals = Arrivals(b.url("receiver"))
    complete = await arrivals.wait_for(b.http, md5s, timeout_s=4 * s.interval_s + 5)
    paid_at = await b.bakong_get("/bench/paid")
    latencies = sorted(arrivals.first[m] - paid_at[m] for m in md5s if m in arrivals.first)
    # Split: paid -> recorded by the poll tick (completed_at), recorded -> webhook arrived.
    rows = await b.db.fetch(
        "select md5, extract(epoch from completed_at)::float8 as at from transactions"
        " where md5 = any($1::text[]) and completed_at is not null",
        md5s,
    )
    recorded = {r["md5"]: r["at"] for r in rows}
    polled = sorted(recorded[m] - paid_at[m] for m in md5s if m in recorded)
    sent = sorted(
        arrivals.first[m] - recorded[m] for m in md5s if m in recorded and m in arrivals.first
    )
    b.results["detection"] = {
        "recorded_p50_s": pct(polled, 0.5),
        "recorded_p99_s": pct(polled, 0.99),
        "sent_p50_s": pct(sent, 0.5),
        "sent_p99_s": pct(sent, 0.99),
        "count": len(md5s),
        "arrived": len(latencies),
        "complete": complete,
        "p50_s": pct(latencies, 0.5),
        "p99_s": pct(latencies, 0.99),
        "max_s": latencies[-1] if latencies else None,
    }


async def phase_ingest_loaded(b: Bench) -> None:
    b.results["ingest"] = await load_pair(b, "gateway", b.scale.ingest_s, "ingest-loaded")


async def deliver_batch(b: Bench, count: int, tag: str) -> dict[str, Any]:
    meter = b.meter()
    before = meter.read()
    started = time.perf_counter()
    spy = b.profile("delivery", min(15, b.scale.delivery_wait_s)) if tag == "d1" else None
    await b.enqueue_deliveries(count, tag)
    queued = time.perf_counter()
    deadline = queued + b.scale.delivery_wait_s
    done = 0
    while time.perf_counter() < deadline:
        done = await b.delivered(tag)
        if done >= count:
            break
        await asyncio.sleep(0.1)
    elapsed = time.perf_counter() - queued
    cpu = CpuMeter.cores(before, meter.read(), time.perf_counter() - started)
    if done < count:
        await b.abandon_deliveries(tag)
    if spy:
        spy.wait(timeout=30)
    b.note_rss()
    return {
        "count": count,
        "delivered": done,
        "seconds": elapsed,
        "rate": done / elapsed if elapsed else None,
        "complete": done >= count,
        "cpu_cores": cpu,
    }


async def phase_delivery(b: Bench) -> None:
    sink = await load.run(
        b.url("receiver") + "/sink",
        seconds=b.scale.sink_s,
        connections=16,
        tool=b.tool,
        post_hook="x",
    )
    result = await deliver_batch(b, b.scale.deliveries, "d1")
    result["receiver_rps"] = sink.rps
    b.results["delivery"] = result


async def phase_recovery(b: Bench) -> None:
    """kill -9 with polls and deliveries in flight; how long after restart until all is sent."""
    s = b.scale
    arrivals = Arrivals(b.url("receiver"))
    await arrivals.refresh(b.http)
    delivery_md5s, unfinished = await slow_deliveries_in_flight(b, arrivals)
    leased_ids = await leased_polls(b, timeout_s=3)
    prefer = [j for j in leased_ids if j in b.seed][: s.recovery_paid_before // 2]
    before = b.take_unpaid(s.recovery_paid_before, prefer=prefer)
    await b.pay(before)
    b.note_rss()
    b.procs.kill9("gateway")
    killed = time.monotonic()
    during = b.take_unpaid(s.recovery_paid_during)
    await b.pay(during)
    await asyncio.sleep(1.0)
    restarted = time.monotonic()
    ready_s = await b.start_gateway("gateway")
    since = time.time()
    wanted = before + during + delivery_md5s
    complete = await arrivals.wait_for(b.http, wanted, timeout_s=s.recovery_wait_s)
    arrived_s = time.monotonic() - restarted
    stored_s = await stored_within(b, wanted, restarted, s.recovery_wait_s) if complete else None
    late = arrived_after(arrivals, wanted, since)
    b.results["recovery"] = {
        "paid_before_kill": len(before),
        "polls_leased_at_pay": len(leased_ids),
        "paid_before_kill_in_flight": len(prefer),
        "paid_while_down": len(during),
        "deliveries": s.recovery_deliveries,
        "deliveries_unfinished_at_kill": unfinished,
        "down_s": restarted - killed,
        "ready_s": ready_s,
        "complete": stored_s is not None,
        "arrived_s": arrived_s if complete else None,
        "all_s": stored_s,
        "p50_s": pct(late, 0.5),
        "missing": sum(1 for x in late if x == float("inf")),
        "later_than_15s": sum(1 for x in late if x > 15),
        "last_by_kind_s": {
            "paid_before_kill": last_arrival(arrivals, before, since),
            "paid_while_down": last_arrival(arrivals, during, since),
            "deliveries": last_arrival(arrivals, delivery_md5s, since),
        },
    }
    if stored_s is None:
        missing = [m for m in wanted if m not in arrivals.first]
        b.results["recovery"]["missing_by_state"] = await states(b, missing or wanted)
        await b.abandon_deliveries("rec")


async def slow_deliveries_in_flight(b: Bench, arrivals: Arrivals) -> tuple[list[str], int]:
    """Deliveries to the receiver's slow path, begun (a few have arrived, up to 5 s): their md5s,
    and how many Postgres does not yet record as delivered."""
    count = b.scale.recovery_deliveries
    md5s = await b.enqueue_deliveries(count, "rec", path="slow")
    seen = arrivals.total
    wait_until = time.monotonic() + 5
    while arrivals.total - seen < min(16, count) and time.monotonic() < wait_until:
        await arrivals.refresh(b.http)
        await asyncio.sleep(0.02)
    return md5s, count - await b.delivered("rec")


async def stored_within(b: Bench, md5s: list[str], since: float, wait_s: float) -> float | None:
    """Seconds from `since` (monotonic) until Postgres records every md5's delivery as
    delivered; None if that takes more than `wait_s`."""
    while time.monotonic() - since < wait_s:
        if await stored_delivered(b, md5s) >= len(md5s):
            return time.monotonic() - since
        await asyncio.sleep(0.1)
    return None


def arrived_after(arrivals: Arrivals, md5s: Sequence[str], since: float) -> list[float]:
    """Seconds after `since` (epoch) that each md5's webhook arrived, sorted; inf if not yet."""
    found = (arrivals.first.get(m, float("inf")) - since for m in md5s)
    return sorted(max(0.0, x) for x in found)


def last_arrival(arrivals: Arrivals, md5s: Sequence[str], since: float) -> float | None:
    return arrived_after(arrivals, md5s, since)[-1] if md5s else None


async def leased_polls(b: Bench, timeout_s: float) -> list[str]:
    """Members whose poll is in flight now: their score is a lease end, past any due time."""
    deadline = time.monotonic() + timeout_s
    while True:
        now_ms = int(time.time() * 1000)
        low = now_ms + int(b.scale.interval_s * 1000) + 500
        leased = await b.r.zrangebyscore(b.keys["poll"], low, "+inf", start=0, num=5000)
        if leased or time.monotonic() > deadline:
            return [m.decode() for m in leased]
        await asyncio.sleep(0.005)


async def stored_delivered(b: Bench, md5s: list[str]) -> int:
    """How many of these md5s have a delivery that Postgres records as delivered."""
    count: int = await b.db.fetchval(
        "select count(*) from transactions t join deliveries d on d.transaction_id = t.id"
        " where t.md5 = any($1::text[]) and d.status = 'delivered'",
        md5s,
    )
    return count


async def states(b: Bench, md5s: list[str]) -> dict[str, int]:
    """Transaction and delivery status of md5s whose webhook never came (a diagnosis)."""
    rows = await b.db.fetch(
        "select t.status || '/' || coalesce(d.status, 'no delivery') as state, count(*) as n"
        " from transactions t left join deliveries d on d.transaction_id = t.id"
        " where t.md5 = any($1::text[]) group by 1",
        md5s,
    )
    return {r["state"]: r["n"] for r in rows}


async def phase_scale_out(b: Bench) -> None:
    s = b.scale
    await b.start_gateway("gateway-2")
    half = max(1, s.connections // 2)
    meter = b.meter()
    before, started = meter.read(), time.perf_counter()
    both = await asyncio.gather(
        *(
            load.run(
                b.url(name) + "/api/v1/transactions",
                seconds=s.ingest_s,
                connections=half,
                tool=b.tool,
                post_hook=b.url("receiver") + "/ingest",
                threads=1,
            )
            for name in ("gateway", "gateway-2")
        )
    )
    cpu = CpuMeter.cores(before, meter.read(), time.perf_counter() - started)
    await b.cancel_ingested()
    ingest2 = sum(r.requests - r.errors for r in both) / max(r.duration_s for r in both)
    delivery2 = await deliver_batch(b, s.scale_deliveries, "d2")
    one_ingest = b.results.get("ingest", {}).get("rps")
    one_delivery = b.results.get("delivery", {}).get("rate")
    b.results["scale"] = {
        "ingest_1": one_ingest,
        "ingest_2": ingest2,
        "ingest_ratio": ingest2 / one_ingest if one_ingest else None,
        "cpu_cores": cpu,
        "delivery_1": one_delivery,
        "delivery_2": delivery2["rate"],
        "delivery_2_complete": delivery2["complete"],
        "delivery_ratio": delivery2["rate"] / one_delivery if one_delivery else None,
        "delivery_cpu_cores": delivery2["cpu_cores"],
    }


async def delete_ingested(b: Bench) -> int:
    """Delete what an ingest run created (pending, never paid), its polls with it: the runs
    of one phase on one database, without the rows of the runs before it in every scan."""
    rows = await b.db.fetch(
        "delete from transactions where status = 'pending' and webhook_url = $1 returning id",
        b.url("receiver") + "/ingest",
    )
    for start in range(0, len(rows), 5000):
        chunk = [str(r["id"]) for r in rows[start : start + 5000]]
        await b.r.zrem(b.keys["poll"], *chunk)
    return len(rows)


async def phase_compat(b: Bench) -> None:
    """Our create route and rachhen/khqr-webhook's (the same token in every body), in turns
    (which goes first alternates), on one database: the second must cost about what the
    first does, run after run. Compared pair by pair, as the machine's noise moves both."""
    s = b.scale
    token = make_token("compat@khqr-gateway.local")
    hook = b.url("receiver") + "/ingest"
    runs: dict[str, list[float]] = {"ours": [], "compat": []}
    routes = {
        "ours": ("/api/v1/transactions", None),
        "compat": ("/api/v1/transaction/token", token),
    }
    errors = 0
    for n in range(s.compat_runs):
        for kind in ("ours", "compat") if n % 2 == 0 else ("compat", "ours"):
            route, body_token = routes[kind]
            result = await load.run(
                b.url("gateway") + route,
                seconds=s.compat_s,
                connections=s.connections,
                tool=b.tool,
                post_hook=hook,
                token=body_token,
            )
            runs[kind].append(result.rps)
            errors += result.errors
            await delete_ingested(b)
    ratios = [c / o for c, o in zip(runs["compat"], runs["ours"], strict=True) if o]
    third = max(1, len(ratios) // 3)
    b.results["compat"] = {
        "runs": runs,
        "ratios": ratios,
        "errors": errors,
        "ours_median": pct(sorted(runs["ours"]), 0.5),
        "compat_median": pct(sorted(runs["compat"]), 0.5),
        "ratio": pct(sorted(ratios), 0.5),
        # Flat: the last pairs' ratio as the first's (a row rewritten per create is not).
        "trend": div(sum(ratios[-third:]) / third, sum(ratios[:third]) / third) if ratios else None,
    }


async def phase_apps(b: Bench) -> None:
    """Ingest with no key (today's figure), and with the keys of 100 apps, each request the
    next app's: the key lookup is cached per process, so it must cost no query a request.
    In turns, pair by pair, as figure 7."""
    from khqr_gateway.apps import store as app_store

    s = b.scale
    keys = []
    for n in range(APPS):
        _, key, _ = await app_store.create(b.db, f"bench app {n} {load.md5_seed()[:6]}")
        keys.append(key.key)
    hook = b.url("receiver") + "/ingest"
    runs: dict[str, list[float]] = {"open": [], "apps": []}
    errors = 0
    for n in range(s.compat_runs):
        for kind in ("open", "apps") if n % 2 == 0 else ("apps", "open"):
            result = await load.run(
                b.url("gateway") + "/api/v1/transactions",
                seconds=s.compat_s,
                connections=s.connections,
                tool=b.tool,
                post_hook=hook,
                keys=keys if kind == "apps" else (),
            )
            runs[kind].append(result.rps)
            errors += result.errors
            await delete_ingested(b)
    ratios = [a / o for a, o in zip(runs["apps"], runs["open"], strict=True) if o]
    b.results["apps"] = {
        "apps": APPS,
        "runs": runs,
        "ratios": ratios,
        "errors": errors,
        "open_median": pct(sorted(runs["open"]), 0.5),
        "apps_median": pct(sorted(runs["apps"]), 0.5),
        "ratio": pct(sorted(ratios), 0.5),
    }
