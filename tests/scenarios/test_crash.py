"""Real gateway processes: kill -9 mid-work and restart; two instances sharing one Redis and
Postgres. Every transaction gets its webhook, each transition exactly one webhook-id."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from khqr_gateway.bakong.sandbox import make_token
from tests.conftest import REDIS_CLUSTER, REDIS_URL
from tests.test_cli import Proc, free_port

ROOT = Path(__file__).resolve().parents[2]


class Hooks:
    """A receiver in the test process: webhook-ids per jobId."""

    def __init__(self) -> None:
        self.ids: dict[str, set[str]] = defaultdict(set)
        self.count = 0
        self.slow_until = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.ids[body["jobId"]].add(request.headers["webhook-id"])
        self.count += 1
        if time.monotonic() < self.slow_until:
            await asyncio.sleep(0.5)  # keeps deliveries in flight for the kill
        return web.Response(text="ok")

    async def wait_jobs(self, jobs: set[str], timeout: float) -> float:
        start = time.monotonic()
        while not jobs <= set(self.ids):
            if time.monotonic() - start > timeout:
                raise AssertionError(f"{len(jobs - set(self.ids))} of {len(jobs)} never arrived")
            await asyncio.sleep(0.1)
        return time.monotonic() - start


@pytest.fixture
async def stack(
    aiohttp_server: Any, database_url: str, pg: asyncpg.Connection, namespace: str
) -> AsyncIterator[dict[str, Any]]:
    """A simulated Bakong process, a receiver, and a starter for gateway processes."""
    bakong_port = free_port()
    bakong = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "khqr_gateway",
        "sandbox",
        "--port",
        str(bakong_port),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "HOST": "127.0.0.1", "PYTHONPATH": str(ROOT)},
    )
    hooks = Hooks()
    app = web.Application()
    app.router.add_post("/hook", hooks.handle)
    server = await aiohttp_server(app)
    gateways: list[Proc] = []
    env = {
        "APP_ENV": "test",
        "HOST": "127.0.0.1",
        "DATABASE_URL": database_url,
        "REDIS_URL": REDIS_URL,
        "REDIS_CLUSTER": "true" if REDIS_CLUSTER else "false",
        "REDIS_NAMESPACE": namespace,
        "BAKONG_BASE_URL": f"http://127.0.0.1:{bakong_port}",
        "BAKONG_TOKEN": make_token(),
        "POLL_INTERVAL_S": "0.5",
        "WEBHOOK_RETRY_SCHEDULE": "0.5,1,1,1,1,1",
        "ALLOW_PRIVATE_WEBHOOK_URLS": "true",
        "LOG_LEVEL": "warn",
        "PYTHONPATH": str(ROOT),
    }

    async def start_gateway(**extra: str) -> Proc:
        port = free_port()
        full = {**os.environ, **env, **extra, "PORT": str(port)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "khqr_gateway",
            "serve",
            cwd=ROOT,
            env=full,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        gateway = Proc(proc, port)
        gateways.append(gateway)
        await gateway.wait_ready()
        return gateway

    yield {
        "bakong": f"http://127.0.0.1:{bakong_port}",
        "hook": str(server.make_url("/hook")),
        "hooks": hooks,
        "start": start_gateway,
    }
    for g in gateways:
        if g.proc.returncode is None:
            g.proc.kill()
            await g.proc.wait()
    bakong.kill()
    await bakong.wait()


async def create_many(
    http: aiohttp.ClientSession, gateway: Proc, hook: str, n: int, timeout_s: int = 600
) -> dict[str, str]:
    async def one() -> tuple[str, str]:
        md5 = secrets.token_hex(16)
        body = {"md5": md5, "webhookUrl": hook, "timeoutSeconds": timeout_s}
        async with http.post(f"{gateway.url}/api/v1/transactions", json=body) as resp:
            assert resp.status == 201, await resp.text()
            return (await resp.json())["jobId"], md5

    pairs = await asyncio.gather(*(one() for _ in range(n)))
    return dict(pairs)


async def metric(http: aiohttp.ClientSession, gateway: Proc, name: str) -> int:
    async with http.get(f"{gateway.url}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[-1]))
    return 0


async def pay_all(http: aiohttp.ClientSession, bakong: str, md5s: Any) -> None:
    async def pay(md5: str) -> None:
        async with http.post(f"{bakong}/control/transactions/{md5}/pay", json={"amount": 1}) as r:
            assert r.status == 200

    await asyncio.gather(*(pay(m) for m in md5s))


async def test_kill_9_mid_work_loses_nothing_and_sends_one_webhook_id_each(
    stack: dict[str, Any],
) -> None:
    hooks: Hooks = stack["hooks"]
    gateway = await stack["start"]()
    async with aiohttp.ClientSession() as http:
        jobs = await create_many(http, gateway, stack["hook"], 200)
        hooks.slow_until = time.monotonic() + 3
        await pay_all(http, stack["bakong"], list(jobs.values())[:100])
        await asyncio.sleep(0.8)  # polls and deliveries in flight
        gateway.proc.send_signal(signal.SIGKILL)
        await gateway.proc.wait()
        await pay_all(http, stack["bakong"], list(jobs.values())[100:])
        restarted = await stack["start"]()
        took = await hooks.wait_jobs(set(jobs), timeout=30)
        print(f"after kill -9: every webhook within {took:.1f} s of restart")
        assert restarted.proc.returncode is None
    await asyncio.sleep(1.5)  # any duplicate would arrive now
    assert all(len(ids) == 1 for ids in hooks.ids.values()), "one webhook-id per transition"


async def test_two_instances_share_the_work_and_never_double_a_webhook(
    stack: dict[str, Any], pg: asyncpg.Connection
) -> None:
    hooks: Hooks = stack["hooks"]
    first = await stack["start"]()
    second = await stack["start"]()
    async with aiohttp.ClientSession() as http:
        half = await create_many(http, first, stack["hook"], 250)
        other = await create_many(http, second, stack["hook"], 250)
        jobs = {**half, **other}
        await asyncio.sleep(1.5)
        async with http.get(f"{stack['bakong']}/control/stats") as r:
            before = (await r.json())["calls"].get("check_transaction_by_md5_list", 0)
        await asyncio.sleep(3)
        async with http.get(f"{stack['bakong']}/control/stats") as r:
            calls = (await r.json())["calls"].get("check_transaction_by_md5_list", 0) - before
        await pay_all(http, stack["bakong"], jobs.values())
        await hooks.wait_jobs(set(jobs), timeout=30)
        await asyncio.sleep(1)
        delivered = [
            await metric(http, g, 'khqr_webhook_attempts_total{outcome="delivered"}')
            for g in (first, second)
        ]
        checked = [
            await metric(http, g, 'khqr_md5_checks_total{result="not_found"}')
            for g in (first, second)
        ]
    assert sum(delivered) == 500
    assert min(checked) > 0, f"one instance did all the polling: {checked}"
    assert all(len(ids) == 1 for ids in hooks.ids.values())
    assert hooks.count == 500, "no webhook sent twice"
    # 500 md5s every 0.5 s for 3 s, 50 a call: what one instance needs is about 60 calls.
    assert calls <= 80, f"{calls} list calls: the two instances polled the same md5s"
    assert await pg.fetchval("select count(*) from deliveries") == 500


async def test_kill_9_during_late_watches_loses_no_late_payment_and_doubles_none(
    stack: dict[str, Any],
) -> None:
    """50 md5s timed out and watched for a late payment; the gateway is killed while it checks
    them, they are paid while it is down: after the restart each gets its late webhook, once."""
    hooks: Hooks = stack["hooks"]
    late = {"LATE_CHECK_INTERVAL_S": "0.3", "LATE_WATCH_S": "120", "BAKONG_GRACE_S": "1"}
    gateway = await stack["start"](**late)
    async with aiohttp.ClientSession() as http:
        jobs = await create_many(http, gateway, stack["hook"], 50, timeout_s=1)
        await hooks.wait_jobs(set(jobs), timeout=30)  # the 50 timeouts
        await asyncio.sleep(0.5)  # late checks under way
        gateway.proc.send_signal(signal.SIGKILL)
        await gateway.proc.wait()
        await pay_all(http, stack["bakong"], jobs.values())
        await stack["start"](**late)
        deadline = time.monotonic() + 30
        while sum(len(hooks.ids[j]) for j in jobs) < 100:
            assert time.monotonic() < deadline, "late payments missing after the restart"
            await asyncio.sleep(0.1)
    await asyncio.sleep(1.5)  # any duplicate would arrive now
    assert all(len(hooks.ids[j]) == 2 for j in jobs), "a timeout, then one late success each"
