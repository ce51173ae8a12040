"""The bench's harness: its scale, the processes it starts and stops, the data it seeds."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import platform
import random
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
from procs import CpuMeter, Procs, descendants, memory_kib
from redis.asyncio import Redis

from khqr_gateway.bakong.sandbox import make_token
from khqr_gateway.infra.keys import keys

BENCH_DIR = Path(__file__).resolve().parent
ADMIN_DSN = os.environ.get(
    "BENCH_DATABASE_URL",
    os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
)
REDIS_URL = os.environ.get(
    "BENCH_REDIS_URL", os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
)
HOST = "127.0.0.1"
JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Scale:
    """Every count and duration of a run; `--quick` and the flags below change them."""

    interval_s: float = 3.0
    pending: int = 50_000
    warmup_s: float = 6.0
    capacity_s: float = 25.0
    health_s: float = 5.0
    ingest_s: float = 10.0
    detect: int = 1000
    detect_spread_s: float = 6.0
    deliveries: int = 20_000
    delivery_wait_s: float = 30.0
    # The receiver's own rate (its /sink), measured before the delivery phase.
    sink_s: float = 2.0
    recovery_deliveries: int = 200
    recovery_paid_before: int = 200
    recovery_paid_during: int = 300
    recovery_wait_s: float = 70.0
    scale_deliveries: int = 20_000
    connections: int = 50
    # The simulated Bakong has no limit; the default 50/s would cap capacity at
    # 50 x 50 x interval = 7,500 pending md5s (see README).
    bakong_max_rps: float = 1000.0
    # Growth and retention (bench/growth.py): off unless asked, since seeding 2,000,000 rows
    # takes minutes: `--history 2000000 --old-rows 1000000 --max-s 1800`.
    history: int = 0
    old_rows: int = 0
    # Between an ingest burst and the stats and /metrics figures: one figures tick (2 s).
    figures_wait_s: float = 2.5
    # How long the retention phase waits for the tick (every 10 s) to start pruning.
    prune_wait_s: float = 30.0
    # 1: the capacity and delivery phases again on a local Redis Cluster (bench/on_cluster.py)
    cluster: int = 0
    # rachhen/khqr-webhook's create route (a token in every body) beside ours, alternately.
    compat_runs: int = 10
    compat_s: float = 3.0
    # The list endpoint forbidden (403): a gateway of its own at the default BAKONG_MAX_RPS,
    # pending md5s of every age up to their timeout (`lf_lifetime_s`), new ones created at
    # the rate that keeps their number, a share of the new ones paid while young.
    lf_rps: float = 50.0
    lf_small: int = 150
    lf_pending: int = 1000
    lf_lifetime_s: float = 300.0
    lf_warmup_s: float = 30.0
    lf_window_s: float = 30.0
    lf_pay_share: float = 0.3
    # The seed polled direct, then through BAKONG_PROXY_URL (proxy.py), this long each.
    proxy_s: float = 10.0
    max_s: float = 480.0


# Each phase of a quick run has to produce its numbers, not steady ones. wrk loads last at
# least 1 s whatever is asked (its -d is in whole seconds); what is shorter here is waits
# and the one-client loops.
QUICK = Scale(
    interval_s=1.0,
    pending=300,
    warmup_s=1.0,
    capacity_s=1.5,
    health_s=0.5,
    ingest_s=1.0,
    detect=20,
    detect_spread_s=1.0,
    deliveries=200,
    delivery_wait_s=10.0,
    sink_s=1.0,
    recovery_deliveries=20,
    recovery_paid_before=10,
    recovery_paid_during=10,
    recovery_wait_s=5.0,
    scale_deliveries=200,
    history=5_000,
    old_rows=3_000,
    figures_wait_s=0.0,
    prune_wait_s=0.0,  # 0-10 s of waiting for a tick, for a number the test only reads
    cluster=1,
    compat_runs=1,
    compat_s=0.5,
    lf_rps=10.0,
    lf_small=0,
    lf_pending=40,
    lf_lifetime_s=30.0,
    lf_warmup_s=1.0,
    lf_window_s=4.5,
    proxy_s=1.0,
    max_s=180.0,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Arrivals:
    """Webhooks the receiver saw, first arrival per md5."""

    url: str
    first: dict[str, float] = field(default_factory=dict)
    total: int = 0
    index: int = 0

    async def refresh(self, session: aiohttp.ClientSession) -> None:
        async with session.get(f"{self.url}/arrivals?since={self.index}") as resp:
            data = orjson.loads(await resp.read())
        for md5, at, _status in data["items"]:
            self.first.setdefault(md5, at)
        self.total += len(data["items"])
        self.index = data["next"]

    async def wait_for(
        self, session: aiohttp.ClientSession, md5s: Sequence[str], timeout_s: float
    ) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            await self.refresh(session)
            if all(m in self.first for m in md5s):
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)


@dataclass
class Bench:
    """One run: its processes, connections, seeded data and results."""

    scale: Scale
    tool: str
    app_env: str
    profile_dir: Path | None
    work: Path
    procs: Procs
    gateway_cmd: str | None = None
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    extra_env: dict[str, str] = field(default_factory=dict)  # for the gateways of this stack
    ports: dict[str, int] = field(default_factory=dict)
    session: aiohttp.ClientSession | None = None
    pool: asyncpg.Pool | None = None
    redis: Redis | None = None
    redis_url: str = REDIS_URL  # the cluster phase points the gateway at a cluster's node
    redis_cluster: bool = False
    seed: dict[str, str] = field(default_factory=dict)  # job id -> md5, still unpaid
    results: dict[str, Any] = field(default_factory=dict)
    peak_rss_kib: int = 0
    idle_rss_kib: int | None = None
    webhook_secret: str = field(
        default_factory=lambda: "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    )

    @property
    def database(self) -> str:
        return f"khqr_bench_{self.run_id}"

    @property
    def dsn(self) -> str:
        return ADMIN_DSN.rpartition("/")[0] + "/" + self.database

    @property
    def namespace(self) -> str:
        return f"bench-{self.run_id}"

    @property
    def keys(self) -> dict[str, str]:
        return keys(self.namespace)

    def url(self, name: str) -> str:
        return f"http://{HOST}:{self.ports[name]}"

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self.session is not None
        return self.session

    @property
    def db(self) -> asyncpg.Pool:
        assert self.pool is not None
        return self.pool

    @property
    def r(self) -> Redis:
        assert self.redis is not None
        return self.redis

    # Processes ---------------------------------------------------------------------

    def gateway_env(self, port: int) -> dict[str, str]:
        # PYTHONPATH: a run from a git worktree runs that worktree's code.
        kept = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "PYTHONPATH")
        env = {k: v for k, v in os.environ.items() if k in kept}
        env.update(
            APP_ENV=self.app_env,
            HOST=HOST,
            PORT=str(port),
            DATABASE_URL=self.dsn,
            REDIS_URL=self.redis_url,
            REDIS_CLUSTER="true" if self.redis_cluster else "false",
            REDIS_NAMESPACE=self.namespace,
            BAKONG_BASE_URL=self.url("bakong"),
            BAKONG_TOKEN=make_token("bench@khqr-gateway.local"),
            ALLOW_PRIVATE_WEBHOOK_URLS="true",
            LOG_LEVEL="warn",
            POLL_INTERVAL_S=f"{self.scale.interval_s:g}",
            WEBHOOK_SECRET=self.webhook_secret,
            BAKONG_MAX_RPS=f"{self.scale.bakong_max_rps:g}",
            SHUTDOWN_GRACE_S="2",
        )
        env.update(self.extra_env)
        return env

    def gateway_command(self) -> list[str]:
        if self.gateway_cmd:
            return shlex.split(self.gateway_cmd)
        script = Path(sys.executable).parent / "khqr-gateway"
        if script.exists():
            return [str(script), "serve"]
        return [sys.executable, "-m", "khqr_gateway", "serve"]

    async def start_gateway(self, name: str) -> float:
        """Start a gateway process; returns the seconds until it answered /ready."""
        if name not in self.ports:
            self.ports[name] = free_port()
        started = time.perf_counter()
        self.procs.start(
            name,
            self.gateway_command(),
            env=self.gateway_env(self.ports[name]),
            cwd=self.work,
        )
        await self.wait_http(name, "/ready", timeout_s=45)
        return time.perf_counter() - started

    async def wait_http(self, name: str, path: str, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        proc = self.procs.running[name]
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited:\n{self.procs.log_tail(name)}")
            try:
                async with self.http.get(self.url(name) + path) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{name} not ready after {timeout_s} s:\n{self.procs.log_tail(name)}")

    def pid(self, name: str) -> int:
        return self.procs.running[name].pid

    def note_rss(self) -> None:
        for name in ("gateway", "gateway-2"):
            if name in self.procs.running:
                peak = memory_kib(self.pid(name)) or 0
                self.peak_rss_kib = max(self.peak_rss_kib, peak)

    def meter(self) -> CpuMeter:
        parts = {
            name: [self.pid(name)]
            for name in ("gateway", "gateway-2", "bakong", "receiver")
            if name in self.procs.running
        }
        if "proxy" in self.procs.running:  # proxy.py works in child processes
            parts["proxy"] = [self.pid("proxy"), *descendants(self.pid("proxy"))]
        parts["bench"] = [os.getpid()]
        return CpuMeter(parts, self.database)

    # Data --------------------------------------------------------------------------

    async def seed_pending(self, count: int) -> None:
        """`count` pending transactions straight into Postgres, polls spread over one interval."""
        deadline = datetime.now(UTC) + timedelta(hours=1)
        hook = self.url("receiver") + "/paid"
        rows = [(uuid.uuid4(), secrets.token_hex(16), hook, deadline) for _ in range(count)]
        await self.db.copy_records_to_table(
            "transactions", records=rows, columns=["id", "md5", "webhook_url", "deadline_at"]
        )
        now_ms = int(time.time() * 1000)
        span = int(self.scale.interval_s * 1000)
        for start in range(0, count, 5000):
            chunk = rows[start : start + 5000]
            await self.r.zadd(
                self.keys["poll"], {str(r[0]): now_ms + random.randint(100, span) for r in chunk}
            )
        self.seed.update({str(r[0]): r[1] for r in rows})
        for start in range(0, count, 10_000):
            chunk = rows[start : start + 10_000]
            await self.bakong_post("/bench/track", {"md5s": [r[1] for r in chunk]})

    async def enqueue_deliveries(self, count: int, tag: str, path: str = "") -> list[str]:
        """`count` due deliveries of paid transactions, in Postgres and the Redis lane."""
        now = datetime.now(UTC)
        hook = self.url("receiver") + f"/{path or tag}"
        txs, deliveries = [], []
        for i in range(count):
            job, md5 = uuid.uuid4(), secrets.token_hex(16)
            body = orjson.dumps(
                {
                    "status": "success",
                    "data": {"hash": secrets.token_hex(32), "amount": 5, "currency": "USD"},
                    "md5": md5,
                    "jobId": str(job),
                }
            )
            txs.append((job, md5, "success", hook, now, now))
            deliveries.append((f"msg_{tag}_{i:08d}", job, hook, body, now))
        await self.db.copy_records_to_table(
            "transactions",
            records=txs,
            columns=["id", "md5", "status", "webhook_url", "deadline_at", "completed_at"],
        )
        await self.db.copy_records_to_table(
            "deliveries",
            records=deliveries,
            columns=["id", "transaction_id", "url", "payload", "next_attempt_at"],
        )
        now_ms = int(time.time() * 1000)
        for start in range(0, count, 5000):
            chunk = deliveries[start : start + 5000]
            await self.r.zadd(self.keys["deliver"], {d[0]: now_ms for d in chunk})
        return [t[1] for t in txs]

    async def delivered(self, tag: str) -> int:
        count: int = await self.db.fetchval(
            "select count(*) from deliveries where id >= $1 and id < $2 and status = 'delivered'",
            f"msg_{tag}_",
            f"msg_{tag}_~",
        )
        return count

    async def abandon_deliveries(self, tag: str) -> None:
        """Stop what is left of a batch that did not finish in time (so later phases are clean)."""
        ids = await self.db.fetch(
            "update deliveries set status = 'failed' where id >= $1 and id < $2"
            " and status = 'pending' returning id",
            f"msg_{tag}_",
            f"msg_{tag}_~",
        )
        for start in range(0, len(ids), 5000):
            chunk = [r["id"] for r in ids[start : start + 5000]]
            await self.r.zrem(self.keys["deliver"], *chunk)
            await self.r.zrem(self.keys["deliver_retry"], *chunk)

    async def cancel_ingested(self) -> int:
        """Cancel what an ingest burst created, so that later phases poll the seed only."""
        rows = await self.db.fetch(
            "update transactions set status = 'cancelled', completed_at = now()"
            " where status = 'pending' and webhook_url = $1 returning id",
            self.url("receiver") + "/ingest",
        )
        for start in range(0, len(rows), 5000):
            chunk = [str(r["id"]) for r in rows[start : start + 5000]]
            await self.r.zrem(self.keys["poll"], *chunk)
        return len(rows)

    async def bakong_post(self, path: str, body: Any) -> Any:
        async with self.http.post(self.url("bakong") + path, data=orjson.dumps(body)) as resp:
            resp.raise_for_status()
            return orjson.loads(await resp.read())

    async def pay(self, md5s: Sequence[str]) -> None:
        """Mark md5s paid through the simulated Bakong's control route, 32 at a time."""
        slots = asyncio.Semaphore(32)

        async def one(md5: str) -> None:
            async with (
                slots,
                self.http.post(self.url("bakong") + f"/control/transactions/{md5}/pay") as resp,
            ):
                resp.raise_for_status()

        await asyncio.gather(*(one(m) for m in md5s))

    async def bakong_get(self, path: str) -> Any:
        async with self.http.get(self.url("bakong") + path) as resp:
            return orjson.loads(await resp.read())

    def take_unpaid(self, count: int, prefer: Sequence[str] = ()) -> list[str]:
        """Pick seed md5s to pay (those of `prefer` job ids first); they leave the seed."""
        chosen = [j for j in prefer if j in self.seed][:count]
        rest = [j for j in self.seed if j not in set(chosen)]
        chosen += random.sample(rest, min(len(rest), count - len(chosen)))
        return [self.seed.pop(j) for j in chosen]

    # Profiling ---------------------------------------------------------------------

    def profile(self, phase: str, seconds: float) -> subprocess.Popen[bytes] | None:
        if self.profile_dir is None:
            return None
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            print("py-spy is not installed: no profile", file=sys.stderr)
            return None
        out = self.profile_dir / f"{phase}.txt"
        return subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(self.pid("gateway")),
                "--duration",
                str(max(1, int(seconds))),
                "--rate",
                "250",
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


# Setup and teardown -------------------------------------------------------------------


async def create_database(b: Bench) -> None:
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'create database "{b.database}"')
    finally:
        await admin.close()


async def drop_database(b: Bench) -> None:
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'drop database if exists "{b.database}" with (force)')
    finally:
        await admin.close()


async def clear_redis(b: Bench) -> None:
    client = Redis.from_url(REDIS_URL)
    try:
        stale = [k async for k in client.scan_iter(match="{" + b.namespace + "}*", count=1000)]
        if stale:
            await client.delete(*stale)
    finally:
        await client.aclose()


async def start_helpers(b: Bench) -> None:
    for name in ("bakong", "receiver"):
        b.ports[name] = free_port()
        b.procs.start(
            name,
            [sys.executable, str(BENCH_DIR / f"{name}.py"), "--port", str(b.ports[name])],
            cwd=b.work,
        )
    await b.wait_http("bakong", "/bench/window")
    await b.wait_http("receiver", "/count")


@contextlib.asynccontextmanager
async def side_stack(b: Bench, tag: str, **env: str) -> AsyncIterator[Bench]:
    """A gateway with a simulated Bakong, database and Redis namespace of its own (its faults
    and rate limit touch nothing else); the receiver and the HTTP session are shared."""
    work = b.work / tag
    work.mkdir()
    side = Bench(
        b.scale,
        b.tool,
        b.app_env,
        None,
        work,
        Procs(work),
        b.gateway_cmd,
        run_id=f"{b.run_id}{tag}",
        extra_env=env,
    )
    side.session, side.redis = b.session, b.redis
    side.ports["receiver"] = b.ports["receiver"]
    await create_database(side)
    try:
        side.ports["bakong"] = free_port()
        side.procs.start(
            "bakong",
            [sys.executable, str(BENCH_DIR / "bakong.py"), "--port", str(side.ports["bakong"])],
            cwd=work,
        )
        await side.wait_http("bakong", "/bench/window")
        await side.start_gateway("gateway")
        side.pool = await asyncpg.create_pool(side.dsn, min_size=1, max_size=4)
        yield side
    finally:
        side.procs.stop_all()
        if side.pool is not None:
            await side.pool.close()
        await drop_database(side)
        await clear_redis(side)


def _cpu_and_memory() -> tuple[str, int]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return cpu, int(Path("/proc/meminfo").read_text().split()[1])


async def machine() -> dict[str, str]:
    cpu, mem_kib = _cpu_and_memory()
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        pg = (await conn.fetchval("show server_version")).split()[0]
    finally:
        await conn.close()
    client = Redis.from_url(REDIS_URL)
    try:
        redis_version = (await client.info("server"))["redis_version"]
    finally:
        await client.aclose()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "python": platform.python_version(),
        "kernel": platform.release(),
        "postgres": str(pg),
        "redis": str(redis_version),
    }


# Figures ------------------------------------------------------------------------------


def pct(values: Sequence[float], p: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(p * len(values)))]


def div(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    return a / b if a is not None and b else None
