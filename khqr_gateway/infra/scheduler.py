"""The periodic ticks (poll, deliver, reconcile) on APScheduler's AsyncIOScheduler."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from khqr_gateway.metrics import TICK_ERRORS

log = logging.getLogger(__name__)


@dataclass
class TickHealth:
    """When each tick last finished, and its last error: for /ready and /metrics."""

    last_ok: dict[str, float] = field(default_factory=dict)
    last_error: dict[str, str] = field(default_factory=dict)
    intervals: dict[str, float] = field(default_factory=dict)

    def stale(self, now: float | None = None) -> list[str]:
        """Ticks that have not finished within a few of their intervals."""
        now = time.time() if now is None else now
        late = []
        for name, interval in self.intervals.items():
            limit = max(interval * 5, 30.0)
            if now - self.last_ok.get(name, now) > limit:
                late.append(name)
        return late


class Ticks:
    """Runs each tick on its own interval, never two runs of one tick at once."""

    def __init__(self) -> None:
        # In-memory job store on purpose: the per-item schedules live in Redis sorted sets.
        self.scheduler = AsyncIOScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None}
        )
        self.health = TickHealth()
        self._running: set[asyncio.Task[Any]] = set()
        self._started_at = time.time()

    def add(self, name: str, interval_s: float, tick: Callable[[], Awaitable[Any]]) -> None:
        self.health.intervals[name] = interval_s
        self.health.last_ok[name] = time.time()

        async def run() -> None:
            task = asyncio.current_task()
            if task is not None:
                self._running.add(task)
            try:
                await tick()
            except Exception as exc:
                TICK_ERRORS.labels(name).inc()
                if self.health.last_error.get(name) != repr(exc):
                    log.error("%s tick failed: %s", name, exc, exc_info=exc)
                self.health.last_error[name] = repr(exc)
                return
            finally:
                if task is not None:
                    self._running.discard(task)
            self.health.last_ok[name] = time.time()
            self.health.last_error.pop(name, None)

        # First run at once rather than one interval after start-up.
        self.scheduler.add_job(
            run, "interval", seconds=interval_s, id=name, name=name, next_run_time=datetime.now(UTC)
        )

    def start(self) -> None:
        self.scheduler.start()

    @property
    def running(self) -> bool:
        return bool(self.scheduler.running)

    async def stop(self, grace_s: float) -> None:
        """Start no new tick; let running ones finish within `grace_s`.

        Paused first and shut down only after: APScheduler's asyncio executor cancels the
        runs still going when it shuts down, which would cut a tick off mid-claim (and log
        the CancelledError as a failed job) instead of giving it its grace."""
        if self.scheduler.running:
            self.scheduler.pause()
        if self._running:
            await asyncio.wait(list(self._running), timeout=grace_s)
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
