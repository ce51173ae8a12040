"""The results: table rows of every figure, the markdown report and bench/README.md's block."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import growth
import on_cluster
from harness import BENCH_DIR, div
from list_forbidden import YOUNG_S

README_START = "<!-- bench:results -->"
README_END = "<!-- /bench:results -->"
Row = tuple[str, str, str, str, str, str]


def fmt(value: float | None, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}{unit}"


def met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def rows(res: dict[str, Any]) -> list[Row]:
    """(figure, measured, same-run ratio, goal, reference, goal met) for the table."""
    return [row for part in ROWS for row in part(res)]


def ingest_rows(res: dict[str, Any]) -> list[Row]:
    """Figure 1: ingest with no pending md5s and while polling; the poll gap meanwhile."""
    iv = res["config"]["interval_s"]
    out: list[Row] = []
    for key, label in (("ingest_idle", "no pending"), ("ingest", "while polling")):
        x = res.get(key)
        if not x:
            continue
        ok = x["rps"] >= 3000 and (x["ratio_to_health"] or 0) >= 0.5
        out.append(
            (
                f"1. ingest POST /api/v1/transactions, {res['config']['connections']} conns"
                f" ({label})",
                f"{fmt(x['rps'])} req/s"
                + (f" ({x['errors']:,} errors)" if x["errors"] else "")
                + ";"
                f" p50 {fmt(x['p50_ms'], 1)} ms, p99 {fmt(x['p99_ms'], 1)} ms",
                f"{fmt(x['ratio_to_health'], 2)}x /health ({fmt(x['health_rps'])} req/s)",
                "≥ 3,000 req/s and ≥ 0.5x /health",
                "~3,000 req/s, p50 16 ms, p99 35 ms",
                met(ok),
            )
        )
    x = res.get("ingest")
    if x and x["poll_gap"]["count"]:
        g = x["poll_gap"]
        out.append(
            (
                "1. poll gap during the ingest burst",
                f"mean {fmt(g['mean'], 2)} s, p99 {fmt(g['p99'], 2)} s, max {fmt(g['max'], 2)} s",
                f"p99 {fmt(g['p99'] / iv, 2)}x interval",
                "p99 ≤ 1.2x interval",
                "starves: ~500 polls in 10 s while 12-18k were due",
                met(g["p99"] <= 1.2 * iv),
            )
        )
    return out


def capacity_rows(res: dict[str, Any]) -> list[Row]:
    """Figure 2: the poll gap, Bakong requests, CPU and memory at the seed's size."""
    x = res.get("capacity")
    if not x:
        return []
    iv = res["config"]["interval_s"]
    out: list[Row] = []
    g, o = x["gap"], x["open_gap"]
    out.append(
        (
            f"2. poll gap at {x['pending']:,} pending, {iv:g} s interval",
            f"mean {fmt(g['mean'], 2)} s, p99 {fmt(g['p99'], 2)} s;"
            f" oldest unpolled {fmt(o['max'], 2)} s",
            f"mean {fmt(div(g['mean'], iv), 2)}x, p99 {fmt(div(g['p99'], iv), 2)}x interval",
            "p99 ≤ 1.2x interval",
            "~6,900 pending at most; 13 polls/min at 10k",
            met(g["p99"] is not None and g["p99"] <= 1.2 * iv and (o["max"] or 0) <= 1.2 * iv),
        )
    )
    rq = x["bakong_requests_per_md5_min"]
    out.append(
        (
            "2. Bakong HTTP requests per pending md5 per minute",
            fmt(rq, 2),
            f"{fmt(x['checks_per_md5_min'], 1)} checks/md5/min ="
            f" {fmt(div(x['checks_per_md5_min'], 60 / iv), 2)}x nominal",
            "≤ 0.5",
            "18.0",
            met(rq is not None and rq <= 0.5),
        )
    )
    cpu = x["cpu_cores"]
    out.append(
        (
            "2. CPU of the gateway process (capacity)",
            f"{fmt(cpu.get('gateway', 0) * 100)}% of one core",
            f"machine {fmt(cpu['machine'] / int(res['machine']['nproc']) * 100)}% busy;"
            f" postgres {fmt(cpu['postgres'], 2)}, bakong {fmt(cpu.get('bakong'), 2)},"
            f" other users {fmt(cpu.get('rest'), 2)} cores",
            "-",
            "-",
            "n/a",
        )
    )
    peak = res["peak_rss_kib"] / 1024
    out.append(
        (
            f"2. peak RSS of the gateway ({x['pending']:,} pending)",
            f"{fmt(peak)} MiB",
            f"{fmt(div(peak * 1024, res['idle_rss_kib']), 1)}x its idle RSS"
            f" ({fmt((res['idle_rss_kib'] or 0) / 1024)} MiB)",
            "≤ 250 MB",
            "146 MiB at 1k, 188 MiB at 10k",
            met(peak * 1024 * 1024 <= 250e6),
        )
    )
    return out


def detection_rows(res: dict[str, Any]) -> list[Row]:
    """Figure 3: webhook arrival minus mark-paid."""
    x = res.get("detection")
    if not x:
        return []
    iv = res["config"]["interval_s"]
    goal = 1.05 * iv + 0.1
    return [
        (
            f"3. detection, {x['count']:,} paid: webhook - mark-paid",
            f"p50 {fmt(x['p50_s'], 2)} s, p99 {fmt(x['p99_s'], 2)} s"
            + ("" if x["complete"] else f" ({x['arrived']}/{x['count']} arrived)")
            + f"; of which paid -> recorded p99 {fmt(x['recorded_p99_s'], 2)} s,"
            f" recorded -> received p99 {fmt(x['sent_p99_s'], 2)} s",
            f"p50 {fmt(div(x['p50_s'], iv), 2)}x, p99 {fmt(div(x['p99_s'], iv), 2)}x interval",
            f"p99 ≤ 1.05x interval + 0.1 s ({goal:.2f} s)",
            "p50 1.5 s, p99 3.2 s (~1.0x its 3.2 s)",
            met(x["complete"] and x["p99_s"] is not None and x["p99_s"] <= goal),
        )
    ]


def delivery_rows(res: dict[str, Any]) -> list[Row]:
    """Figure 4: due webhooks delivered a second, beside the receiver's own rate."""
    x = res.get("delivery")
    if not x:
        return []
    return [
        (
            f"4. delivery, {x['count']:,} due webhooks, each attempt stored",
            f"{fmt(x['rate'])} /s"
            + ("" if x["complete"] else f" ({x['delivered']:,} done in {x['seconds']:.0f} s)"),
            f"{fmt(div(x['rate'] * 100, x['receiver_rps']), 1)}% of the receiver's own rate"
            f" ({fmt(x['receiver_rps'])} req/s)",
            "≥ 2,000 /s",
            "-",
            met(x["rate"] is not None and x["rate"] >= 2000),
        )
    ]


def recovery_rows(res: dict[str, Any]) -> list[Row]:
    """Figure 5: everything sent and stored after a kill -9 and a restart."""
    x = res.get("recovery")
    if not x:
        return []
    iv = res["config"]["interval_s"]
    all_s = x["all_s"]
    kinds = x["last_by_kind_s"]
    return [
        (
            f"5. recovery after kill -9 ({x['paid_before_kill_in_flight']} paid md5s with"
            f" their poll in flight, {x['deliveries_unfinished_at_kill']} deliveries"
            f" unfinished, {x['paid_while_down']} paid while down): every webhook"
            " sent and stored, after restart",
            (f"{fmt(all_s, 1)} s" if all_s is not None else "not within the wait")
            + f" (all arrived at the receiver after {fmt(x['arrived_s'], 1)} s;"
            f" ready in {fmt(x['ready_s'], 1)} s; last arrival: paid before kill"
            f" {fmt(kinds['paid_before_kill'], 1)} s, paid while down"
            f" {fmt(kinds['paid_while_down'], 1)} s, deliveries"
            f" {fmt(kinds['deliveries'], 1)} s)",
            f"{fmt(div(all_s, iv), 1)}x interval" if all_s is not None else "n/a",
            "≤ 15 s",
            "60-90 s for the in-flight ones",
            met(all_s is not None and all_s <= 15),
        )
    ]


def scale_rows(res: dict[str, Any]) -> list[Row]:
    """Figure 6: ingest and delivery of two gateways beside one."""
    x = res.get("scale")
    if not x or x.get("ingest_2") is None:
        return []
    out: list[Row] = []
    out.append(
        (
            "6. scale-out ingest: 2 vs 1 gateway",
            f"{fmt(x['ingest_2'])} vs {fmt(x['ingest_1'])} req/s",
            f"{fmt(x['ingest_ratio'], 2)}x",
            "≥ 1.6x",
            "-",
            met(x["ingest_ratio"] is not None and x["ingest_ratio"] >= 1.6),
        )
    )
    out.append(
        (
            "6. scale-out delivery: 2 vs 1 gateway",
            f"{fmt(x['delivery_2'])} vs {fmt(x['delivery_1'])} /s",
            f"{fmt(x['delivery_ratio'], 2)}x",
            "≥ 1.6x",
            "-",
            met(x["delivery_ratio"] is not None and x["delivery_ratio"] >= 1.6),
        )
    )
    return out


def compat_rows(res: dict[str, Any]) -> list[Row]:
    x = res.get("compat")
    if not x:
        return []
    runs = x["runs"]["compat"]
    ok = (x["ratio"] or 0) >= 0.9 and (x["trend"] or 0) >= 0.9
    return [
        (
            f"7. ingest, rachhen/khqr-webhook's route (the same token in every body),"
            f" {len(runs)} runs in turns with ours, one database",
            f"median {fmt(x['compat_median'])} req/s (runs {', '.join(fmt(r) for r in runs)});"
            f" ours {fmt(x['ours_median'])} req/s"
            + (f" ({x['errors']:,} errors)" if x["errors"] else ""),
            f"median {fmt(x['ratio'], 2)}x ours, pair by pair"
            f" ({', '.join(fmt(r, 2) for r in x['ratios'])}); last third"
            f" {fmt(x['trend'], 2)}x the first",
            "≥ 0.9x ours, and flat (≥ 0.9x)",
            "872 req/s, falling with use (1,134 -> 568 over 4 runs): 0.19x",
            met(ok),
        )
    ]


def list_forbidden_rows(res: dict[str, Any]) -> list[Row]:
    x = res.get("list_forbidden")
    if not x:
        return []
    iv, rps = res["config"]["interval_s"], x["rps"]
    out: list[Row] = []
    small, large = x.get("small"), x.get("large")
    if small:
        g = small["gap"]
        longest = small["longest_unchecked_s"]
        out.append(
            (
                f"8. list endpoint 403, {small['pending']:,} pending, BAKONG_MAX_RPS={rps:g}:"
                " gap between checks of an md5",
                f"mean {fmt(g['mean'], 2)} s, p99 {fmt(g['p99'], 2)} s; longest unchecked"
                f" {fmt(longest, 1)} s; {fmt(small['requests_per_s'], 1)} Bakong req/s",
                f"p99 {fmt(div(g['p99'], iv), 2)}x, longest {fmt(div(longest, iv), 1)}x interval",
                "p99 ≤ 1.2x interval, none unchecked > 2x",
                "3 runs in 6 left some md5s unchecked 23-40 s",
                met(g["p99"] is not None and g["p99"] <= 1.2 * iv and longest <= 2 * iv),
            )
        )
    if large:
        out += _large_rows(large, iv, rps)
    return out


def _large_rows(x: dict[str, Any], iv: float, rps: float) -> list[Row]:
    y, w = x["young_gap"], x["gap_begun_before"]
    budget = x["checks"].get("budget") or {}
    head = (
        f"8. list endpoint 403, {x['pending']:,} pending (ages 0-{x['lifetime_s']:g} s),"
        f" BAKONG_MAX_RPS={rps:g}"
    )
    longest = x["longest_unchecked_s"]
    finals = x["finals"]
    due = sum(n for k, n in finals.items() if k.startswith("timeout") or k == "pending")
    made = finals.get("timeout not_paid", 0)
    return [
        (
            f"{head}: gap between checks begun in the window, of md5s younger than {YOUNG_S:g} s",
            f"mean {fmt(y['mean'], 2)} s, p99 {fmt(y['p99'], 2)} s, max {fmt(y['max'], 2)} s"
            f" ({y['count']:,} gaps); /api/v1/stats: mode {x['checks'].get('mode')},"
            f" young every {fmt(budget.get('youngGapS'), 1)} s, older every"
            f" {fmt(budget.get('oldGapS'), 1)} s",
            f"young p99 {fmt(div(y['p99'], iv), 2)}x interval;"
            f" {fmt(x['requests_per_s'], 1)} Bakong req/s",
            "young p99 ≤ 2x interval",
            "8.9 s on average",
            met(y["p99"] is not None and y["p99"] <= 2 * iv),
        ),
        (
            f"{head}: longest any md5 went unchecked",
            f"{fmt(longest, 1)} s (of gaps begun in the warm-up: {fmt(w['max'], 1)} s)",
            f"{fmt(div(longest, iv), 1)}x interval",
            "≤ 60 s",
            "every md5 every ~20 s",
            met(longest <= 60),
        ),
        (
            f"{head}: final checks at the deadline",
            f"{made} of {due} made" + "".join(f"; {n} {k}" for k, n in finals.items()),
            "-",
            "every one",
            "-",
            met(due > 0 and made == due),
        ),
        (
            f"{head}: detection of payments made younger than {YOUNG_S:g} s",
            f"p50 {fmt(x['detect_p50_s'], 2)} s, p90 {fmt(x['detect_p90_s'], 2)} s"
            f" ({x['detected']} of {x['young_paid']} arrived)",
            f"p50 {fmt(div(x['detect_p50_s'], iv), 2)}x interval",
            "p50 ≤ 5 s",
            "p50 5.5 s, p90 11.4 s",
            met(x["detect_p50_s"] is not None and x["detect_p50_s"] <= 5),
        ),
    ]


def proxy_rows(res: dict[str, Any]) -> list[Row]:
    x = res.get("proxy")
    if not x:
        return []
    d, p = x["direct"], x["proxied"]
    through = div(p["proxied"] * 100, p["calls"])
    added = _sub(p["latency_ms"], d["latency_ms"])
    cpu = _sub(
        _sum(p["gateway_us_per_request"], p["proxy_us_per_request"]), d["gateway_us_per_request"]
    )
    return [
        (
            f"9. polling {x['pending']:,} pending through BAKONG_PROXY_URL (proxy.py, a password)",
            f"{fmt(through, 1)}% of {p['calls']:,} Bakong requests through the proxy;"
            f" latency {fmt(p['latency_ms'], 2)} ms vs {fmt(d['latency_ms'], 2)} ms direct;"
            f" CPU per request: gateway {fmt(p['gateway_us_per_request'])} us"
            f" (direct {fmt(d['gateway_us_per_request'])} us), proxy"
            f" {fmt(p['proxy_us_per_request'])} us; gap p99 {fmt(p['gap']['p99'], 2)} s"
            f" (direct {fmt(d['gap']['p99'], 2)} s)",
            f"+{fmt(added, 2)} ms and +{fmt(cpu)} us of CPU per request"
            f" (+{fmt(div(cpu, 50), 1)} us per md5 checked in lists of 50)",
            "every request through it",
            "-",
            met(through is not None and through >= 99.9),
        )
    ]


def apps_rows(res: dict[str, Any]) -> list[Row]:
    x = res.get("apps")
    if not x:
        return []
    runs = x["runs"]["apps"]
    return [
        (
            f"13. ingest with the API keys of {x['apps']} apps (each request the next app's),"
            f" {len(runs)} runs in turns with no key",
            f"median {fmt(x['apps_median'])} req/s (runs {', '.join(fmt(r) for r in runs)});"
            f" no key {fmt(x['open_median'])} req/s"
            + (f" ({x['errors']:,} errors)" if x["errors"] else ""),
            f"median {fmt(x['ratio'], 2)}x no key, pair by pair"
            f" ({', '.join(fmt(r, 2) for r in x['ratios'])})",
            "≥ 0.9x no key (a cached lookup: no query a request)",
            "one API key for all",
            met((x["ratio"] or 0) >= 0.9),
        )
    ]


ROWS: tuple[Callable[[dict[str, Any]], list[Row]], ...] = (
    ingest_rows,
    capacity_rows,
    detection_rows,
    delivery_rows,
    recovery_rows,
    scale_rows,
    compat_rows,
    apps_rows,
    list_forbidden_rows,
    proxy_rows,
    growth.rows,
    on_cluster.rows,
)


def _sub(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _sum(a: float | None, b: float | None) -> float | None:
    return a + b if a is not None and b is not None else None


def table(res: dict[str, Any]) -> str:
    head = ("figure", "measured", "same-run ratio", "goal", "reference", "met")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(res)]
    return "\n".join(lines)


def cpu_lines(res: dict[str, Any]) -> list[str]:
    out = []
    for key, label in (
        ("ingest_idle", "ingest, no pending"),
        ("capacity", "capacity"),
        ("ingest", "ingest, while polling"),
        ("delivery", "delivery"),
        ("scale", "2 gateways, ingest"),
        ("retention", "ingest while pruning"),
    ):
        cpu = (res.get(key) or {}).get("cpu_cores")
        if cpu:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
            out.append(f"- {label}: {parts}")
    return out


def report(res: dict[str, Any]) -> str:
    m, c = res["machine"], res["config"]
    lines = [
        f"Run of {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {res['total_s']:.0f} s in all;"
        f" load by {c['tool']}; APP_ENV={c['app_env']}; POLL_INTERVAL_S={c['interval_s']:g}.",
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['memory']}, Linux {m['kernel']},"
        f" Python {m['python']}, Postgres {m['postgres']}, Redis {m['redis']}; everything"
        " (gateway, Postgres, Redis, simulated Bakong, receiver, load) on the same machine.",
        "",
        table(res),
        "",
        "CPU used during each phase, in cores (machine = every process on the machine;"
        " rest = machine minus the processes named: wrk, other users, the kernel):",
        *cpu_lines(res),
    ]
    noisy = [
        key
        for key in ("ingest_idle", "capacity", "ingest", "delivery", "scale")
        if ((res.get(key) or {}).get("cpu_cores") or {}).get("rest", 0) > 0.3
    ]
    if noisy:
        lines.append(
            f"- **noisy run**: other processes used > 0.3 cores during {', '.join(noisy)};"
            " compare the same-run ratios rather than absolute figures"
        )
    for phase, error in (res.get("errors") or {}).items():
        lines.append(f"- **{phase} failed**: {error}")
    return "\n".join(lines)


def write_readme(text: str) -> None:
    path = BENCH_DIR / "README.md"
    empty = f"# Benchmark\n\n{README_START}\n{README_END}\n"
    current = path.read_text() if path.exists() else empty
    if README_START not in current:
        current += f"\n{README_START}\n{README_END}\n"
    before, rest = current.split(README_START, 1)
    after = rest.split(README_END, 1)[1] if README_END in rest else ""
    path.write_text(f"{before}{README_START}\n{text}\n{README_END}{after}")
