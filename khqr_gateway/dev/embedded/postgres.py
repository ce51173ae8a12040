"""The embedded Postgres: one cluster in `<server dir>/pg`, made once, run as our child."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import subprocess
import time
from pathlib import Path

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from khqr_gateway.dev.embedded.engines import EmbeddedError
from khqr_gateway.dev.embedded.layout import Layout, private_dir
from khqr_gateway.dev.embedded.processes import (
    Child,
    holds_dir,
    run_until_ready,
    spawn,
    stop_foreign,
)

DATABASE = "khqr"
# The superuser initdb creates: fixed, so the URL is the same whichever OS user runs us.
SUPERUSER = "khqr"
# sun_path holds 108 bytes on Linux and 104 on macOS; longer socket paths cannot be bound.
_MAX_SOCKET_PATH = 100


class Postgres:
    """One Postgres cluster in `<server dir>/pg`, run as our child process."""

    name = "Postgres"
    _STOP = (signal.SIGINT, signal.SIGQUIT)  # fast shutdown, then immediate

    def __init__(self, bindir: Path, layout: Layout, log: logging.Logger) -> None:
        self.bindir = bindir
        self.pgdata = layout.server_dir / "pg"
        self.account = layout.account
        self.log_path = layout.logs / "postgres.log"
        self._log = log
        self.child: Child | None = None

    async def start(self) -> str:
        began = time.monotonic()
        created = await asyncio.to_thread(self._initdb_once)
        port = await self._running_port()
        reused = port is not None
        if port is None:
            port = await run_until_ready(self._spawn, self._ready, self.log_path, self.name)
        await _ensure_database(port)
        self._log.info(
            "embedded Postgres %s on 127.0.0.1:%d (data %s%s) in %.2f s",
            "reused (already running on this dir)" if reused else "listening",
            port,
            self.pgdata,
            ", new cluster" if created else "",
            time.monotonic() - began,
        )
        return f"postgresql://{SUPERUSER}@127.0.0.1:{port}/{DATABASE}"

    async def stop(self) -> None:
        child, self.child = self.child, None
        if child:
            await child.stop()

    def stop_now(self) -> None:
        if self.child:
            self.child.stop_now()

    def _initdb_once(self) -> bool:
        if (self.pgdata / "PG_VERSION").exists():
            return False
        # initdb into a staging dir renamed at the end: a run killed mid-initdb leaves
        # no half-made cluster behind.
        staging = self.pgdata.with_name("pg.init")
        shutil.rmtree(staging, ignore_errors=True)
        private_dir(staging, self.account)
        argv = [str(self.bindir / "initdb"), "-D", str(staging), "-U", SUPERUSER]
        argv += ["--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync"]
        result = subprocess.run(
            argv,
            cwd=staging,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            user=self.account.uid if self.account else None,
            group=self.account.gid if self.account else None,
            extra_groups=list(self.account.groups) if self.account else None,
        )
        if result.returncode != 0:
            raise EmbeddedError(f"initdb failed in {staging}: {result.stderr.strip()[-2000:]}")
        try:
            staging.rename(self.pgdata)
        except OSError as exc:
            raise EmbeddedError(f"{self.pgdata} exists but holds no cluster: remove it") from exc
        return True

    async def _running_port(self) -> int | None:
        """The port of a server a previous run left on this dir, if it still answers."""
        lock = _read_lines(self.pgdata / "postmaster.pid")
        try:
            pid, port = int(lock[0]), int(lock[3])
        except (IndexError, ValueError):
            return None
        if not holds_dir(pid, self.pgdata):
            return None  # a stale lock file: postgres itself takes it over
        if await _serves_pgdata(port, self.pgdata):
            return port
        await stop_foreign(pid, self.pgdata, self._STOP)
        return None

    def _spawn(self, port: int) -> Child:
        socket_dir = str(self.pgdata)
        if len(f"{socket_dir}/.s.PGSQL.{port}") > _MAX_SOCKET_PATH:
            socket_dir = ""  # TCP only: the path is too long for a unix socket
        argv = [str(self.bindir / "postgres"), "-D", str(self.pgdata), "-p", str(port)]
        argv += ["-k", socket_dir, "-c", "listen_addresses=127.0.0.1"]
        self.child = spawn(
            argv,
            cwd=self.pgdata,
            log_path=self.log_path,
            account=self.account,
            stop_signals=self._STOP,
        )
        return self.child

    async def _ready(self, child: Child, port: int) -> bool:
        # What pg_ctl -w waits for: our postmaster's lock file saying "ready".
        lock = _read_lines(self.pgdata / "postmaster.pid")
        return len(lock) >= 8 and lock[0] == str(child.proc.pid) and lock[7].strip() == "ready"


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []


async def _pg_connect(port: int, database: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1", port=port, user=SUPERUSER, database=database, ssl=False, timeout=5
    )


async def _serves_pgdata(port: int, pgdata: Path) -> bool:
    try:
        conn = await _pg_connect(port, "postgres")
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    try:
        return Path(await conn.fetchval("SHOW data_directory")) == pgdata
    finally:
        await conn.close()


async def _ensure_database(port: int) -> None:
    conn = await _pg_connect(port, "postgres")
    try:
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
            return
        with contextlib.suppress(asyncpg.DuplicateDatabaseError):  # another process won
            await conn.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await conn.close()
