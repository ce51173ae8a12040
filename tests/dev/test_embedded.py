"""Embedded Postgres and Redis: real servers started, used, restarted, killed and stopped."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from khqr_gateway.dev.embedded import EmbeddedError, EmbeddedServices, EmbeddedUrls, engines

# One event loop for the module, so the servers started once serve every test.
pytestmark = pytest.mark.asyncio(loop_scope="module")


# Server dirs that root's runs put under /var/tmp (pytest's temp dirs are private to root).
_FALLBACKS: set[Path] = set()


@pytest.fixture(scope="module", autouse=True)
def _remove_fallbacks() -> Iterator[None]:
    yield
    for server_dir in _FALLBACKS:
        shutil.rmtree(server_dir, ignore_errors=True)


@asynccontextmanager
async def running(data_dir: Path, **need: bool) -> AsyncIterator[EmbeddedServices]:
    """Started services, stopped afterwards."""
    services = EmbeddedServices(
        data_dir,
        need_postgres=need.get("postgres", True),
        need_redis=need.get("redis", True),
    )
    try:
        await services.start()
        yield services
    finally:
        await services.stop()
        _forget(services.server_dir, services.data_dir)


def _forget(server_dir: Path | None, data_dir: Path) -> None:
    if server_dir and not server_dir.is_relative_to(data_dir):
        _FALLBACKS.add(server_dir)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedServices]:
    async with running(tmp_path_factory.mktemp("embedded") / "data") as services:
        yield services


def _urls(services: EmbeddedServices) -> EmbeddedUrls:
    assert services.urls is not None
    return services.urls


def _port(url: str | None) -> int:
    assert url is not None
    port = urlsplit(url).port
    assert port is not None
    return port


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


async def _closed_soon(*ports: int, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while any(_listening(port) for port in ports):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def _pg(url: str | None) -> asyncpg.Connection:
    assert url is not None
    return await asyncpg.connect(url)


def _redis(url: str | None) -> aioredis.Redis:
    assert url is not None
    return aioredis.Redis.from_url(url, decode_responses=True)


async def _write(urls: EmbeddedUrls, value: str) -> None:
    conn = await _pg(urls.database_url)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS kept (value text)")
        await conn.execute("INSERT INTO kept VALUES ($1)", value)
    finally:
        await conn.close()
    client = _redis(urls.redis_url)
    try:
        await client.zadd("{khqr}:poll", {value: 1})
    finally:
        await client.aclose()


async def _read(urls: EmbeddedUrls) -> tuple[list[str], list[str]]:
    conn = await _pg(urls.database_url)
    try:
        rows = [r["value"] for r in await conn.fetch("SELECT value FROM kept ORDER BY value")]
    finally:
        await conn.close()
    client = _redis(urls.redis_url)
    try:
        members = await client.zrange("{khqr}:poll", 0, -1)
    finally:
        await client.aclose()
    return rows, members


def _uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("Uid:")).split()[1])


# One start shared by the module


async def test_database_url_accepts_queries(shared: EmbeddedServices) -> None:
    urls = _urls(shared)
    assert urls.database_url is not None
    assert urls.database_url.startswith("postgresql://khqr@127.0.0.1:")
    assert urls.database_url.endswith("/khqr")
    conn = await _pg(urls.database_url)
    try:
        await conn.execute("CREATE TABLE probe (id int PRIMARY KEY, note text)")
        await conn.execute("INSERT INTO probe VALUES (1, 'ក្រុង')")  # UTF8 cluster
        assert await conn.fetchval("SELECT note FROM probe WHERE id = 1") == "ក្រុង"
        assert await conn.fetchval("SELECT current_database()") == "khqr"
    finally:
        await conn.close()


async def test_redis_url_accepts_commands(shared: EmbeddedServices) -> None:
    urls = _urls(shared)
    assert urls.redis_url is not None
    assert urls.redis_url.startswith("redis://127.0.0.1:")
    client = _redis(urls.redis_url)
    try:
        await client.set("greeting", "sousdey")
        assert await client.get("greeting") == "sousdey"
        assert await client.config_get("appendonly") == {"appendonly": "yes"}
    finally:
        await client.aclose()


async def test_start_again_returns_the_same_urls(shared: EmbeddedServices) -> None:
    assert await shared.start() == _urls(shared)


async def test_postgres_also_listens_on_a_unix_socket_in_its_dir(shared: EmbeddedServices) -> None:
    assert shared.server_dir is not None
    pgdata = shared.server_dir / "pg"
    port = _port(_urls(shared).database_url)
    assert (pgdata / f".s.PGSQL.{port}").is_socket()
    conn = await asyncpg.connect(host=str(pgdata), port=port, user="khqr", database="khqr")
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root needs another user")
async def test_root_runs_servers_as_an_unprivileged_user(shared: EmbeddedServices) -> None:
    urls = _urls(shared)
    conn = await _pg(urls.database_url)
    try:
        assert _uid_of(await conn.fetchval("SELECT pg_backend_pid()")) != 0
    finally:
        await conn.close()
    client = _redis(urls.redis_url)
    try:
        assert _uid_of((await client.info("server"))["process_id"]) != 0
    finally:
        await client.aclose()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root needs another user")
async def test_root_falls_back_to_var_tmp_without_opening_private_parents(
    shared: EmbeddedServices,
) -> None:
    # pytest's base temp dir is 0700 root: the service user cannot reach the data dir.
    private = next(p for p in shared.data_dir.parents if p.stat().st_mode & 0o077 == 0)
    assert private.stat().st_mode & 0o777 == 0o700
    assert shared.server_dir is not None
    assert not shared.server_dir.is_relative_to(shared.data_dir)
    assert shared.server_dir.name.startswith("khqr-")
    assert shared.server_dir.stat().st_mode & 0o777 == 0o700
    assert (shared.data_dir / "logs" / "postgres.log").is_file()


# Their own data dirs


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A folder every user may search, as a project folder holding `./.khqr-data` usually is."""
    path = Path(tempfile.mkdtemp(dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root needs another user")
async def test_root_keeps_server_files_in_a_reachable_data_dir(reachable_dir: Path) -> None:
    data_dir = reachable_dir / "data"
    async with running(data_dir) as services:
        assert services.server_dir == data_dir
        owners = {(data_dir / name).stat().st_uid for name in ("pg", "redis")}
        assert len(owners) == 1
        assert 0 not in owners
        assert data_dir.stat().st_uid == 0  # only the server dirs change hands
        assert (data_dir / "pg").stat().st_mode & 0o777 == 0o700


async def test_data_survives_stop_and_start_and_stop_closes_ports(tmp_path: Path) -> None:
    async with running(tmp_path / "data") as first:
        urls = _urls(first)
        await _write(urls, "before restart")
    assert await _closed_soon(_port(urls.database_url), _port(urls.redis_url))
    async with running(tmp_path / "data") as second:
        assert await _read(_urls(second)) == (["before restart"], ["before restart"])


async def test_start_works_after_postgres_was_killed(tmp_path: Path) -> None:
    killed = EmbeddedServices(tmp_path / "data", need_postgres=True, need_redis=False)
    try:
        urls = await killed.start()
        conn = await _pg(urls.database_url)
        await conn.execute("CREATE TABLE kept (value text)")
        await conn.execute("INSERT INTO kept VALUES ('committed')")
        assert killed.server_dir is not None
        postmaster = int((killed.server_dir / "pg" / "postmaster.pid").read_text().split()[0])
        os.kill(postmaster, signal.SIGKILL)
        await conn.close(timeout=1)
    finally:
        await killed.stop()  # its child is gone: must not raise
        _forget(killed.server_dir, killed.data_dir)
    assert (killed.server_dir / "pg" / "postmaster.pid").exists()  # stale lock left behind
    async with running(tmp_path / "data", redis=False) as again:
        conn = await _pg(_urls(again).database_url)
        try:
            assert await conn.fetchval("SELECT value FROM kept") == "committed"
        finally:
            await conn.close()


async def test_reuses_servers_another_process_left_running_on_the_dir(tmp_path: Path) -> None:
    async with running(tmp_path / "data") as owner:
        async with running(tmp_path / "data") as guest:
            assert guest.urls == owner.urls
        # The guest did not start them, so did not stop them.
        urls = _urls(owner)
        assert _listening(_port(urls.database_url))
        assert _listening(_port(urls.redis_url))
    assert await _closed_soon(_port(urls.database_url), _port(urls.redis_url))


_HOLDER = """
import asyncio, json, sys
from pathlib import Path
from khqr_gateway.dev.embedded import EmbeddedServices

async def main() -> None:
    services = EmbeddedServices(Path(sys.argv[1]), need_postgres=True, need_redis=True)
    urls = await services.start()
    print(json.dumps([urls.database_url, urls.redis_url, str(services.server_dir)]), flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


async def test_servers_die_with_a_killed_parent(tmp_path: Path) -> None:
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLDER, str(tmp_path / "data"), stdout=subprocess.PIPE
    )
    server_dir = None
    try:
        assert holder.stdout is not None
        line = await asyncio.wait_for(holder.stdout.readline(), 60)
        database_url, redis_url, server_dir = json.loads(line)
        ports = _port(database_url), _port(redis_url)
        assert all(_listening(port) for port in ports)
        holder.kill()  # SIGKILL: no atexit, no stop(); only the kernel can tell the children
        await holder.wait()
        assert await _closed_soon(*ports)
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
        if server_dir:
            _forget(Path(server_dir), tmp_path)


async def test_only_the_servers_asked_for_are_started(tmp_path: Path) -> None:
    async with running(tmp_path / "data", postgres=False) as services:
        urls = _urls(services)
        assert urls.database_url is None
        assert urls.redis_url is not None
        assert services.server_dir is not None
        assert not (services.server_dir / "pg").exists()


async def test_nothing_asked_for_starts_nothing(tmp_path: Path) -> None:
    async with running(tmp_path / "data", postgres=False, redis=False) as services:
        assert services.urls == EmbeddedUrls(None, None)
    assert not (tmp_path / "data").exists()


async def test_stop_before_start_and_twice_is_harmless(tmp_path: Path) -> None:
    services = EmbeddedServices(tmp_path / "data", need_postgres=True, need_redis=True)
    await services.stop()
    await services.stop()


# Missing engines


def _no_postgres(monkeypatch: pytest.MonkeyPatch) -> None:
    for finder in ("_pg_config_bindir", "_debian_bindir", "_pgserver_bindir"):
        monkeypatch.setattr(engines, finder, lambda: None)


def _no_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engines.shutil, "which", lambda name, **_: None)
    monkeypatch.setattr(engines, "_packaged_redis", lambda module: None)


async def test_missing_postgres_says_how_to_fix_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_postgres(monkeypatch)
    services = EmbeddedServices(tmp_path / "data", need_postgres=True, need_redis=True)
    with pytest.raises(EmbeddedError) as caught:
        await services.start()
    message = str(caught.value)
    for fix in ("apt-get install postgresql", "khqr-gateway[embedded]", "DATABASE_URL"):
        assert fix in message
    assert services.urls is None
    assert not (tmp_path / "data").exists()  # failed before starting anything


async def test_missing_redis_says_how_to_fix_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_redis(monkeypatch)
    services = EmbeddedServices(tmp_path / "data", need_postgres=False, need_redis=True)
    with pytest.raises(EmbeddedError) as caught:
        await services.start()
    message = str(caught.value)
    for fix in ("apt-get install redis-server", "khqr-gateway[embedded]", "REDIS_URL"):
        assert fix in message
