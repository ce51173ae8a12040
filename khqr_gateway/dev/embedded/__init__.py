"""Private Postgres and Redis child processes under a data dir, for a first run with no URLs."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from khqr_gateway.dev.embedded.engines import EmbeddedError, postgres_bindir, redis_server_binary
from khqr_gateway.dev.embedded.layout import Layout, prepare_layout
from khqr_gateway.dev.embedded.postgres import Postgres
from khqr_gateway.dev.embedded.redis import Redis

__all__ = ["EmbeddedError", "EmbeddedServices", "EmbeddedUrls"]


@dataclass(frozen=True)
class EmbeddedUrls:
    """Where the embedded servers listen; None for a server that was not asked for."""

    database_url: str | None
    redis_url: str | None


class EmbeddedServices:
    """Private Postgres and/or Redis for this process: started on demand, stopped with it.

    Use as `async with EmbeddedServices(dir, need_postgres=..., need_redis=...) as e:`
    then `urls = await e.start()` (started already; returns the same URLs).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        need_postgres: bool,
        need_redis: bool,
        log: logging.Logger | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self._need_postgres = need_postgres
        self._need_redis = need_redis
        self._log = log or logging.getLogger(__name__)
        self._lock = asyncio.Lock()
        self._layout: Layout | None = None
        self._servers: list[Postgres | Redis] = []
        self._urls: EmbeddedUrls | None = None

    @property
    def urls(self) -> EmbeddedUrls | None:
        """The URLs once started, else None."""
        return self._urls

    @property
    def server_dir(self) -> Path | None:
        """Where `pg/` and `redis/` live once started: the data dir or its private fallback."""
        return self._layout.server_dir if self._layout else None

    async def start(self) -> EmbeddedUrls:
        """Starts (or reuses) the servers asked for; a second call returns the same URLs."""
        async with self._lock:
            if self._urls is None:
                self._urls = await self._start()
            return self._urls

    async def stop(self) -> None:
        """Stops the servers this object started (fast shutdown); never raises."""
        servers, self._servers, self._urls = self._servers, [], None
        atexit.unregister(self._stop_now)
        results = await asyncio.gather(*(s.stop() for s in servers), return_exceptions=True)
        for server, result in zip(servers, results, strict=True):
            if isinstance(result, BaseException):
                self._log.warning("embedded %s did not stop cleanly: %r", server.name, result)

    async def __aenter__(self) -> EmbeddedServices:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _start(self) -> EmbeddedUrls:
        if not (self._need_postgres or self._need_redis):
            return EmbeddedUrls(None, None)
        pg_bin, redis_bin = await asyncio.to_thread(self._binaries)
        self._layout = layout = await asyncio.to_thread(prepare_layout, self.data_dir, self._log)
        postgres = Postgres(pg_bin, layout, self._log) if pg_bin else None
        redis = Redis(redis_bin, layout, self._log) if redis_bin else None
        self._servers = [s for s in (postgres, redis) if s is not None]
        # A fallback for a clean interpreter exit without stop(); a crash is covered by
        # the parent-death signal each child asks the kernel for.
        atexit.register(self._stop_now)
        tasks = [asyncio.create_task(_start(postgres)), asyncio.create_task(_start(redis))]
        try:
            database_url, redis_url = await asyncio.gather(*tasks)
        except BaseException:
            # Let neither half go on to spawn a server after the stop below.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.stop()
            raise
        return EmbeddedUrls(database_url, redis_url)

    def _binaries(self) -> tuple[Path | None, Path | None]:
        pg_bin = postgres_bindir() if self._need_postgres else None
        redis_bin = redis_server_binary() if self._need_redis else None
        return pg_bin, redis_bin

    def _stop_now(self) -> None:
        for server in self._servers:
            with contextlib.suppress(Exception):
                server.stop_now()


async def _start(server: Postgres | Redis | None) -> str | None:
    return await server.start() if server else None
