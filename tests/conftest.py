"""Fixtures: a real Postgres database and Redis namespace per test, the simulated Bakong,
a real webhook receiver socket, and a gateway factory."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from khqr_gateway.bakong.sandbox import STATE_KEY, SandboxState, create_sandbox_app, make_token
from khqr_gateway.config import AppEnv, Settings
from khqr_gateway.http.app import create_app
from khqr_gateway.infra import db
from khqr_gateway.infra.schedule import RedisClient, connect
from khqr_gateway.logs import PinoFilter, PinoFormatter
from khqr_gateway.service import SERVICE_KEY, Service
from tests import cluster

# Property tests check what the code does with their inputs, not how fast Hypothesis makes
# them: on a cold or busy machine the first draws (building its Unicode tables, say) can
# take over a second, which its too_slow health check would report as a failure. No
# deadline either: a shared CI machine's pauses are not the code's.
hypothesis_settings.register_profile(
    "khqr", suppress_health_check=[HealthCheck.too_slow], deadline=None
)
hypothesis_settings.load_profile("khqr")

ADMIN_DSN = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# TEST_REDIS_CLUSTER=1 (`make test-cluster`): the session starts a local Redis Cluster and
# every gateway and Redis client of the tests uses it (REDIS_URL then names one of its nodes).
REDIS_CLUSTER = bool(os.environ.get("TEST_REDIS_CLUSTER"))
CLUSTER: cluster.Cluster | None = None
TABLES = (
    "delivery_attempts, deliveries, transactions, credentials, idempotency_keys, operator_alerts,"
    " api_keys, webhook_secrets, apps"
)
# The same tables and those that TRUNCATE ... CASCADE empties with them, children before
# their parents: the order DELETE needs.
CHILDREN_FIRST = (
    "delivery_attempts",
    "deliveries",
    "telegram_attempts",
    "telegram_notices",
    "transactions",
    "idempotency_keys",
    "operator_alerts",
    "api_keys",
    "webhook_secrets",
    "apps",
    "credentials",
)
# A table left with this many rows is truncated: deleting them would then be the slow way.
DELETE_AT_MOST = 5_000
OWNED_SEQUENCES = """
    select s.oid::regclass::text from pg_class s
    join pg_depend d on d.classid = 'pg_class'::regclass and d.objid = s.oid
    join pg_class t on t.oid = d.refobjid
    where s.relkind = 'S' and d.deptype in ('a', 'i') and t.relname = any($1::text[])
"""


# Every secret a test configures; none may reach a log line or an API response.
SECRETS: set[str] = set()


def pytest_configure(config: pytest.Config) -> None:
    global CLUSTER, REDIS_URL
    if REDIS_CLUSTER and CLUSTER is None:
        import tempfile
        from pathlib import Path

        CLUSTER = cluster.start(Path(tempfile.mkdtemp(prefix="khqr-redis-cluster-")))
        REDIS_URL = CLUSTER.url


def pytest_unconfigure(config: pytest.Config) -> None:
    if CLUSTER is not None:
        CLUSTER.stop()


async def redis_client() -> RedisClient:
    """A client of the tests' Redis: the single server, or the local cluster."""
    return await connect(REDIS_URL, cluster=REDIS_CLUSTER)


def secret(value: str) -> str:
    SECRETS.add(value)
    return value


@pytest.fixture(autouse=True)
def no_secrets_leak() -> Iterator[None]:
    """Every log line of every test, formatted as in production, is scanned for secrets."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(PinoFilter())
    handler.setFormatter(PinoFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    text = stream.getvalue()
    leaked = [s[:6] + "…" for s in SECRETS if s and s in text]
    assert not leaked, f"secrets in the logs: {leaked}"


def assert_no_secret(text: str) -> None:
    leaked = [s[:6] + "…" for s in SECRETS if s and s in text]
    assert not leaked, f"secrets in a response: {leaked}"


def _dsn_for(database: str) -> str:
    base, _, _ = ADMIN_DSN.rpartition("/")
    return f"{base}/{database}"


@pytest.fixture(scope="session")
def database_url() -> Any:
    """A database of its own for this test session, migrated once, dropped at the end."""
    name = f"khqr_test_{secrets.token_hex(4)}"

    async def create() -> None:
        admin = await asyncpg.connect(ADMIN_DSN)
        try:
            await admin.execute(f'create database "{name}"')
        finally:
            await admin.close()
        conn = await asyncpg.connect(_dsn_for(name))
        try:
            await db.migrate(conn)
        finally:
            await conn.close()

    async def drop() -> None:
        admin = await asyncpg.connect(ADMIN_DSN)
        try:
            await admin.execute(f'drop database if exists "{name}" with (force)')
        finally:
            await admin.close()

    asyncio.run(create())
    yield _dsn_for(name)
    asyncio.run(drop())


async def empty_tables(conn: asyncpg.Connection) -> None:
    """What `truncate TABLES restart identity cascade` does, the fast way for the few rows a
    test makes: TRUNCATE takes 60-90 ms whatever the rows (a new file for every table and
    index it empties), DELETE a few ms. The counts by status go as TRUNCATE's trigger
    takes them. A big table, or a row that refers to one from a table not named here (a
    newer migration's), is truncated after all."""
    sizes = await conn.fetchrow(
        "select "
        + ", ".join(
            f"(select count(*) from (select from {t} limit {DELETE_AT_MOST}) s) as {t}"
            for t in CHILDREN_FIRST
        )
    )
    if max(sizes.values()) < DELETE_AT_MOST:
        try:
            async with conn.transaction():
                for table in (*CHILDREN_FIRST, "status_count_changes", "status_counts"):
                    await conn.execute(f"delete from {table}")
                for sequence in await conn.fetch(OWNED_SEQUENCES, list(CHILDREN_FIRST)):
                    await conn.execute(f"alter sequence {sequence[0]} restart")
            return
        except asyncpg.ForeignKeyViolationError:
            pass
    await conn.execute(f"truncate {TABLES} restart identity cascade")


@pytest.fixture
async def pg(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a database emptied for this test."""
    conn = await asyncpg.connect(database_url)
    await empty_tables(conn)
    await conn.execute("insert into apps (id, name) values ('app_default', 'default')")
    yield conn
    await conn.close()


@pytest.fixture
async def redis() -> AsyncIterator[RedisClient]:
    client = await redis_client()
    yield client
    await client.aclose()


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    """A Redis key namespace of this test's own, so tests never see each other's keys."""
    name = f"test-{secrets.token_hex(6)}"
    yield name
    client = await redis_client()
    stale = [k async for k in client.scan_iter(match="{" + name + "}*")]
    if stale:
        await client.delete(*stale)
    await client.aclose()


@pytest.fixture
async def bakong(aiohttp_server: Any) -> AsyncIterator[SimulatedBakong]:
    app = create_sandbox_app()
    server = await aiohttp_server(app)
    yield SimulatedBakong(str(server.make_url("")).rstrip("/"), app)


@dataclass
class SimulatedBakong:
    url: str
    app: web.Application
    token: str = field(default_factory=make_token)

    @property
    def state(self) -> SandboxState:
        return self.app[STATE_KEY]

    def pay(self, md5: str, **data: Any) -> None:
        from khqr_gateway.bakong.sandbox import Payment, _payment_data

        self.state.payments[md5] = Payment("paid", _payment_data(md5, data))

    def fail(self, md5: str) -> None:
        from khqr_gateway.bakong.sandbox import Payment

        self.state.payments[md5] = Payment("failed")


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Receiver:
    """A real HTTP server that records webhooks and answers with scripted statuses."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    delay_s: float = 0.0
    event: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(Received(dict(request.headers), await request.read(), time.time()))
        self.event.set()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status, text="ok")

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"expected {count} webhooks, got {len(self.received)}")
            self.event.clear()
            try:
                await asyncio.wait_for(self.event.wait(), remaining)
            except TimeoutError:
                pass
        return self.received


@pytest.fixture
async def receiver(aiohttp_server: Any) -> Receiver:
    recv = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", recv.handle)
    server = await aiohttp_server(app)
    recv.url = str(server.make_url("/hook"))
    return recv


@pytest.fixture
def settings(bakong: SimulatedBakong, namespace: str) -> Settings:
    secret(bakong.token)
    return Settings(
        app_env=AppEnv.TEST,
        redis_namespace=namespace,
        bakong_base_url=bakong.url,
        bakong_token=bakong.token,
        poll_interval_s=0.2,
        webhook_retry_schedule=(0.2, 0.4, 0.6),
        webhook_timeout_s=2.0,
        bakong_grace_s=1,
        bakong_timeout_s=2.0,
        shutdown_grace_s=2.0,
        allow_private_webhook_urls=True,
        redis_cluster=REDIS_CLUSTER,
    )


@dataclass
class Gateway:
    client: TestClient
    headers: dict[str, str]

    @property
    def service(self) -> Service:
        return self.client.server.app[SERVICE_KEY]

    async def post(self, path: str, body: Any, **headers: str) -> tuple[int, Any]:
        resp = await self.client.post(path, json=body, headers={**self.headers, **headers})
        assert_no_secret(await resp.text())
        return resp.status, await resp.json()

    async def get(self, path: str) -> tuple[int, Any]:
        resp = await self.client.get(path, headers=self.headers)
        assert_no_secret(await resp.text())
        return resp.status, await resp.json()

    async def wait_status(self, job_id: str, status: str, timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        body: Any = None
        while time.monotonic() < deadline:
            _, body = await self.get(f"/api/v1/transactions/{job_id}")
            if body.get("status") == status:
                return body
            await asyncio.sleep(0.05)
        raise AssertionError(f"{job_id} never became {status}: {body}")

    async def stop(self) -> None:
        await self.client.close()


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(
    settings: Settings, database_url: str, pg: asyncpg.Connection
) -> AsyncIterator[GatewayFactory]:
    """Start gateways (each a real aiohttp server) on this test's database and Redis."""
    started: list[Gateway] = []

    async def make(**overrides: Any) -> Gateway:
        run_ticks = overrides.pop("run_ticks", True)
        these = replace(settings, **overrides)
        port = None
        if these.sandbox:
            # The gateway asks the simulated Bakong mounted in it at its own host and port.
            port = free_port()
            these = replace(these, host="127.0.0.1", port=port)
        app = create_app(these, database_url=database_url, redis_url=REDIS_URL, run_ticks=run_ticks)
        client = TestClient(TestServer(app, host="127.0.0.1", port=port))
        await client.start_server()
        for value in (*these.api_keys, *these.admin_api_keys):
            secret(value)
        for raw in these.webhook_secrets:
            secret(base64.b64encode(raw).decode())
        key = these.api_keys[0] if these.api_keys else None
        gateway = Gateway(client, {"Authorization": f"Bearer {key}"} if key else {})
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        await gateway.stop()


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway()


@pytest.fixture
async def sandbox_gateway(make_gateway: GatewayFactory) -> Gateway:
    """A gateway in sandbox mode: development, no Bakong configured, the simulated one
    mounted in it under /sandbox."""
    return await make_gateway(app_env=AppEnv.DEVELOPMENT, bakong_base_url=None, bakong_token=None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def random_md5() -> str:
    return secrets.token_hex(16)
