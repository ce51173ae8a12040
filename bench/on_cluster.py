"""Cluster phase of the bench: the capacity and delivery phases again with the gateway on a
local Redis Cluster (6 redis-server nodes, 3 masters with a replica each, as the suite's
`make test-cluster` starts them), beside the single-Redis figures of the same run."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from growth import fmt, met, quiesce

from khqr_gateway.infra.schedule import connect

if TYPE_CHECKING:
    from harness import Bench

ROOT = Path(__file__).resolve().parents[1]
Phase = Callable[["Bench"], Awaitable[None]]


async def phase_cluster(b: Bench, capacity: Phase, delivery: Phase) -> None:
    if not b.scale.cluster:
        return
    sys.path.insert(0, str(ROOT))
    from tests import cluster as local

    nodes = await asyncio.to_thread(local.start, b.work / "redis-cluster")
    single = {k: b.results.get(k) for k in ("capacity", "delivery")}
    single_redis, single_url = b.redis, b.redis_url
    try:
        await quiesce(b)
        await switch(b, nodes.url, cluster=True)
        await capacity(b)
        await forget_deliveries(b, "d1")  # the delivery phase makes its ids again
        await delivery(b)
        b.results["cluster"] = {
            "capacity": b.results["capacity"],
            "delivery": b.results["delivery"],
        }
        await quiesce(b)
    finally:
        for key, value in single.items():
            b.results[key] = value
        if b.redis is not single_redis and b.redis is not None:
            await b.redis.aclose()
        b.redis = single_redis
        await switch(b, single_url, cluster=False, client=False)
        nodes.stop()


async def switch(b: Bench, url: str, *, cluster: bool, client: bool = True) -> None:
    """Restart the gateway (and the bench's own client) on the Redis at `url`."""
    for name in ("gateway", "gateway-2"):
        b.procs.stop(name)
    b.ports.pop("gateway-2", None)
    b.redis_url, b.redis_cluster = url, cluster
    if client:
        b.redis = await connect(url, cluster=cluster)
    await b.start_gateway("gateway")


async def forget_deliveries(b: Bench, tag: str) -> None:
    ids = (f"msg_{tag}_", f"msg_{tag}_~")
    await b.db.execute(
        "delete from delivery_attempts where delivery_id >= $1 and delivery_id < $2", *ids
    )
    await b.db.execute(
        "with gone as (delete from deliveries where id >= $1 and id < $2"
        " returning transaction_id) delete from transactions t using gone"
        " where t.id = gone.transaction_id",
        *ids,
    )


def rows(res: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    c = res.get("cluster")
    if not c:
        return []
    out: list[tuple[str, str, str, str, str, str]] = []
    one, many = res.get("capacity") or {}, c["capacity"]
    if many:
        iv = res["config"]["interval_s"]
        p99 = many["gap"]["p99"]
        out.append(
            (
                f"12. Redis Cluster: poll gap at {res['config']['pending']:,} pending",
                f"p99 {fmt(p99, 2)} s (one Redis: {fmt((one.get('gap') or {}).get('p99'), 2)} s)",
                f"p99 {fmt(p99 / iv if p99 else None, 2)}x interval",
                "p99 ≤ 1.2x interval",
                "-",
                met(p99 is not None and p99 <= 1.2 * iv),
            )
        )
    one_d, many_d = res.get("delivery") or {}, c["delivery"]
    if many_d:
        rate, base = many_d["rate"], one_d.get("rate")
        out.append(
            (
                f"12. Redis Cluster: delivery, {many_d['count']:,} due webhooks",
                f"{fmt(rate)} /s (one Redis: {fmt(base)} /s)",
                f"{fmt(rate / base if rate and base else None, 2)}x one Redis",
                "≥ 2,000 /s",
                "-",
                met(rate is not None and rate >= 2000),
            )
        )
    return out
