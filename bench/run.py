"""khqr-gateway benchmark: one command, one table (see bench/README.md).

    .venv/bin/python bench/run.py            # the full run (under 5 minutes on 2 cores)
    .venv/bin/python bench/run.py --quick    # tiny counts, for the smoke test

Starts, as separate processes on 127.0.0.1: the simulated Bakong (bench/bakong.py, the
package's sandbox plus a recorder of per-md5 check times), a webhook receiver
(bench/receiver.py) and `khqr-gateway serve` against a fresh Postgres database and Redis
namespace; drives them from here (wrk when installed, else aiohttp) and removes everything
it made at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

import growth
import list_forbidden
import load
import on_cluster
import phases
import via_proxy
from harness import (
    QUICK,
    REDIS_URL,
    Bench,
    Scale,
    clear_redis,
    create_database,
    drop_database,
    machine,
    start_helpers,
)
from procs import Procs, memory_kib
from report import report, write_readme

PHASES: list[tuple[str, Callable[[Bench], Awaitable[None]]]] = [
    ("ingest (idle)", phases.phase_ingest_idle),
    ("compat ingest", phases.phase_compat),
    ("apps ingest", phases.phase_apps),
    ("capacity", phases.phase_capacity),
    ("detection", phases.phase_detection),
    ("ingest (loaded)", phases.phase_ingest_loaded),
    ("delivery", phases.phase_delivery),
    ("recovery", phases.phase_recovery),
    ("scale-out", phases.phase_scale_out),
    ("list-forbidden", list_forbidden.phase_list_forbidden),
    ("proxy", via_proxy.phase_proxy),
    # Before growth: the retention phase leaves pruning going on for minutes.
    (
        "cluster",
        lambda b: on_cluster.phase_cluster(b, phases.phase_capacity, phases.phase_delivery),
    ),
    ("growth", growth.phase_growth),
    ("retention", growth.phase_retention),
]


async def run_phases(b: Bench, only: set[str] | None) -> None:
    ready_s = await b.start_gateway("gateway")
    b.results["startup_s"] = ready_s
    b.idle_rss_kib = memory_kib(b.pid("gateway"), "VmRSS")
    b.pool = await asyncpg.create_pool(b.dsn, min_size=1, max_size=4)
    for title, phase in PHASES:
        if only and title.split()[0] not in only:
            continue
        print(f"[bench] {title} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            await phase(b)
        except Exception as exc:
            traceback.print_exc()
            b.results.setdefault("errors", {})[title] = f"{type(exc).__name__}: {exc}"
        await revive_gateways(b, title)
        print(f"[bench] {title}: {time.perf_counter() - started:.1f} s", file=sys.stderr)


async def revive_gateways(b: Bench, title: str) -> None:
    """A gateway that died during a phase is reported (with its last log lines) and restarted."""
    for name in ("gateway", "gateway-2"):
        proc = b.procs.running.get(name)
        if proc is None or proc.poll() is None:
            continue
        tail = b.procs.log_tail(name, 8)
        print(f"[bench] {name} exited ({proc.returncode}) during {title}:\n{tail}", file=sys.stderr)
        b.results.setdefault("errors", {})[title] = f"{name} exited ({proc.returncode}): {tail}"
        del b.procs.running[name]
        await b.start_gateway(name)


def _dirs(profile: str | None) -> tuple[Path, Path | None]:
    work = Path(tempfile.mkdtemp(prefix="khqr-bench-"))
    profile_dir = Path(profile).resolve() if profile else None
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)
    return work, profile_dir


def scale_of(args: argparse.Namespace) -> Scale:
    """QUICK or the full Scale, with every count and duration a flag set."""
    scale = QUICK if args.quick else Scale()
    overrides = {k: v for k, v in vars(args).items() if k in Scale.__annotations__ and v}
    return dataclasses.replace(scale, **overrides)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    scale = scale_of(args)
    tool = args.load
    if tool == "auto":
        tool = "wrk" if load.wrk_path() else "aiohttp"
    work, profile_dir = _dirs(args.profile)
    b = Bench(scale, tool, args.app_env, profile_dir, work, Procs(work), args.gateway_cmd)
    started = time.perf_counter()
    await create_database(b)
    b.session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=64), timeout=aiohttp.ClientTimeout(total=30)
    )
    b.redis = Redis.from_url(REDIS_URL)
    try:
        await start_helpers(b)
        await asyncio.wait_for(run_phases(b, set(args.only) if args.only else None), scale.max_s)
    except TimeoutError:
        b.results.setdefault("errors", {})["run"] = f"stopped at the {scale.max_s:.0f} s limit"
    finally:
        await tear_down(b, keep_logs=args.keep_logs)
    b.results["total_s"] = time.perf_counter() - started
    b.results["peak_rss_kib"] = b.peak_rss_kib
    b.results["idle_rss_kib"] = b.idle_rss_kib
    b.results["config"] = {**dataclasses.asdict(scale), "tool": tool, "app_env": args.app_env}
    b.results["machine"] = await machine()
    return b.results


async def tear_down(b: Bench, *, keep_logs: bool) -> None:
    """Stop every process; drop the run's database and Redis keys, and its logs unless kept."""
    b.procs.stop_all()
    if b.pool is not None:
        await b.pool.close()
    await b.http.close()
    await b.r.aclose()
    await drop_database(b)
    await clear_redis(b)
    if keep_logs:
        print(f"[bench] logs kept in {b.work}", file=sys.stderr)
    else:
        shutil.rmtree(b.work, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny counts, about a minute (smoke test)")
    p.add_argument("--load", choices=("auto", "wrk", "aiohttp"), default="auto")
    p.add_argument("--app-env", default="production", choices=("production", "test"))
    p.add_argument("--profile", metavar="DIR", help="py-spy the gateway (capacity, ingest) here")
    p.add_argument("--json", metavar="PATH", help="also write the raw figures as JSON")
    p.add_argument("--no-readme", action="store_true", help="do not update bench/README.md")
    p.add_argument(
        "--gateway-cmd",
        help="run the gateway with this command instead of `khqr-gateway serve` (A/B tries)",
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    p.add_argument("--only", nargs="*", help="phases to run (first word of each), e.g. capacity")
    for name, f in Scale.__dataclass_fields__.items():
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=type(f.default),
            default=None,
            help=f"default {f.default:g}",
        )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = asyncio.run(main_async(args))
    text = report(results)
    print(text)
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    if not (args.quick or args.no_readme or args.only):
        write_readme(text)
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
