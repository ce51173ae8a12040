"""Export bench: N transactions streamed as CSV by a real `khqr-gateway serve`, its RSS sampled.

    .venv/bin/python bench/export.py               # 1,000,000 rows (about 3 minutes on 2 cores)
    .venv/bin/python bench/export.py --rows 50000  # a short run

Makes a fresh database, fills it in one INSERT ... SELECT, starts the gateway as its own
process, reads GET /api/v1/transactions/export to the end (counting bytes and lines, keeping
none) while sampling the gateway's VmRSS from /proc every 50 ms, prints one line, and drops
the database.

Result (2 shared cores, 2026-12-01): export of 1,000,000 rows: 1,000,000 lines, 261 MB of
CSV in 24.4 s (41,066 rows/s); gateway RSS 60 MB -> peak 61 MB (+0.4 MB); fill 150 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import sys
import time

import aiohttp
import asyncpg

ADMIN_DSN = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
FILL = """
insert into transactions (id, md5, status, webhook_url, deadline_at, completed_at,
    bakong_data, metadata)
select gen_random_uuid(), md5(n::text), 'success', 'http://x/hook', now(), now(),
       json_build_object('amount', n, 'currency', 'USD', 'toAccountId', 'shop@aclb',
                         'fromAccountId', 'customer@aclb', 'hash', md5(n::text),
                         'externalRef', 'FT' || n),
       json_build_object('orderId', 'order-' || n, 'note', 'ហាង')
from generate_series(1, $1::int) n
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def _wait_ready(url: str) -> None:
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"{url}/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("the gateway did not start")


async def _export(url: str, key: str, pid: int) -> tuple[int, int, int, int, float]:
    base = _rss_kib(pid)
    peak = base
    size = lines = 0
    started = time.monotonic()
    last = started
    timeout = aiohttp.ClientTimeout(total=None)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(
            f"{url}/api/v1/transactions/export", headers={"Authorization": f"Bearer {key}"}
        ) as resp,
    ):
        resp.raise_for_status()
        async for chunk in resp.content.iter_chunked(1 << 16):
            size += len(chunk)
            lines += chunk.count(b"\n")
            if time.monotonic() - last > 0.05:
                peak = max(peak, _rss_kib(pid))
                last = time.monotonic()
    return base, max(peak, _rss_kib(pid)), size, lines, time.monotonic() - started


async def main(rows: int) -> None:
    name = f"khqr_bench_export_{secrets.token_hex(4)}"
    base_dsn = ADMIN_DSN.rpartition("/")[0]
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'create database "{name}"')
    proc: asyncio.subprocess.Process | None = None
    try:
        from khqr_gateway.infra import db

        conn = await asyncpg.connect(f"{base_dsn}/{name}")
        await db.migrate(conn)
        filled = time.monotonic()
        await conn.execute(FILL, rows)
        await conn.execute("vacuum analyze transactions")
        await conn.close()
        fill_s = time.monotonic() - filled
        port = _free_port()
        key = secrets.token_urlsafe(24)
        env = {
            **os.environ,
            "DATABASE_URL": f"{base_dsn}/{name}",
            "REDIS_URL": REDIS_URL,
            "REDIS_NAMESPACE": f"bench-{secrets.token_hex(4)}",
            "API_KEY": key,
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "LOG_LEVEL": "warn",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "khqr_gateway", "serve", env=env
        )
        url = f"http://127.0.0.1:{port}"
        await _wait_ready(url)
        base, peak, size, lines, took = await _export(url, key, proc.pid)
        print(
            f"export of {rows:,} rows: {lines - 1:,} lines, {size / 2**20:.0f} MB of CSV in "
            f"{took:.1f} s ({rows / took:,.0f} rows/s); gateway RSS {base / 1024:.0f} MB -> "
            f"peak {peak / 1024:.0f} MB (+{(peak - base) / 1024:.1f} MB); fill {fill_s:.0f} s"
        )
    finally:
        if proc is not None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)
        await admin.execute(f'drop database if exists "{name}" with (force)')
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    asyncio.run(main(parser.parse_args().rows))
