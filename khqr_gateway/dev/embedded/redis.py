"""The embedded Redis: one server in `<server dir>/redis` (append-only file on), our child."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from khqr_gateway.dev.embedded.layout import Layout, private_dir
from khqr_gateway.dev.embedded.processes import (
    Child,
    holds_dir,
    run_until_ready,
    spawn,
    stop_foreign,
)


class Redis:
    """One Redis in `<server dir>/redis` (append-only file on), run as our child process."""

    name = "Redis"
    _STOP = (signal.SIGTERM,)  # shuts down cleanly, flushing the append-only file

    def __init__(self, binary: Path, layout: Layout, log: logging.Logger) -> None:
        self.binary = binary
        self.dir = layout.server_dir / "redis"
        self.account = layout.account
        self.log_path = layout.logs / "redis.log"
        # Redis has no lock file that names its port: we keep one.
        self.state = self.dir / "embedded.json"
        self._log = log
        self.child: Child | None = None

    async def start(self) -> str:
        began = time.monotonic()
        await asyncio.to_thread(private_dir, self.dir, self.account)
        port = await self._running_port()
        reused = port is not None
        if port is None:
            port = await run_until_ready(self._spawn, self._ready, self.log_path, self.name)
            assert self.child is not None
            self.state.write_text(json.dumps({"pid": self.child.proc.pid, "port": port}))
        self._log.info(
            "embedded Redis %s on 127.0.0.1:%d (data %s) in %.2f s",
            "reused (already running on this dir)" if reused else "listening",
            port,
            self.dir,
            time.monotonic() - began,
        )
        return f"redis://127.0.0.1:{port}/0"

    async def stop(self) -> None:
        child, self.child = self.child, None
        if child:
            await child.stop()
            self.state.unlink(missing_ok=True)

    def stop_now(self) -> None:
        if self.child:
            self.child.stop_now()

    async def _running_port(self) -> int | None:
        """The port of a Redis a previous run left on this dir, if it still answers."""
        try:
            state = json.loads(self.state.read_text())
            pid, port = int(state["pid"]), int(state["port"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not holds_dir(pid, self.dir):
            return None
        if await _redis_dir(port) == str(self.dir):
            return port
        # Two servers on one append-only file would corrupt it: stop the silent one.
        await stop_foreign(pid, self.dir, (*self._STOP, signal.SIGKILL))
        return None

    def _spawn(self, port: int) -> Child:
        argv = [str(self.binary), "--port", str(port), "--bind", "127.0.0.1"]
        argv += ["--dir", str(self.dir), "--appendonly", "yes", "--save", ""]
        argv += ["--daemonize", "no", "--protected-mode", "yes"]
        self.child = spawn(
            argv,
            cwd=self.dir,
            log_path=self.log_path,
            account=self.account,
            stop_signals=self._STOP,
        )
        return self.child

    async def _ready(self, child: Child, port: int) -> bool:
        return await _redis_dir(port) is not None


async def _redis_dir(port: int) -> str | None:
    """The data dir of the Redis answering on `port`, or None if none answers yet."""
    client = aioredis.Redis(
        host="127.0.0.1",
        port=port,
        socket_timeout=2,
        socket_connect_timeout=2,
        decode_responses=True,
    )
    try:
        # PING first: it is refused while the append-only file loads, CONFIG is not.
        await client.ping()
        config = await client.config_get("dir")
    except (RedisError, OSError):
        return None
    finally:
        await client.aclose()
    value = config.get("dir")
    return str(value) if value else None
