"""Live status: terminal transitions published on Redis pub/sub, fanned out to local streams.

Every process publishes the transitions it records on one channel and keeps one pub/sub
connection that hands each message to the streams of this process watching that
transaction, so a stream on one process sees a payment found by another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any
from uuid import UUID

import orjson
from redis.asyncio import Redis

from khqr_gateway.models import Status, Transition

log = logging.getLogger(__name__)

MAX_STREAMS = 1000
HEARTBEAT_S = 15.0
# How long a new stream waits for the pub/sub connection before relying on re-reads alone.
READY_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class Change:
    """A transaction reached `status`."""

    job_id: UUID
    status: Status
    reason: str | None = None

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {"jobId": str(self.job_id), "status": self.status.value, "reason": self.reason}
        )

    @classmethod
    def from_bytes(cls, raw: bytes | str) -> Change | None:
        try:
            value = orjson.loads(raw)
            reason = value.get("reason")
            return cls(
                UUID(value["jobId"]),
                Status(value["status"]),
                reason if isinstance(reason, str) else None,
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            return None


class Signal(Enum):
    """What a stream may be told besides a change."""

    RESYNC = "resync"  # something may have been missed: read the status from Postgres
    CLOSE = "close"  # the process is shutting down


class StreamLimit(Exception):
    """This process already holds its maximum of open streams."""


class Subscription:
    """The changes of one transaction, for one stream."""

    def __init__(self, job_id: UUID) -> None:
        self.job_id = job_id
        self._queue: asyncio.Queue[Change | Signal] = asyncio.Queue()

    def put(self, item: Change | Signal) -> None:
        self._queue.put_nowait(item)

    async def get(self, within_s: float) -> Change | Signal | None:
        """The next change or signal, or None when `within_s` seconds pass first."""
        try:
            async with asyncio.timeout(within_s):
                return await self._queue.get()
        except TimeoutError:
            return None


class EventHub:
    """Publishes changes and fans them out to the local subscriptions of this process."""

    def __init__(self, redis: Redis, channel: str, *, max_streams: int = MAX_STREAMS) -> None:
        self.redis = redis
        self.channel = channel
        self.max_streams = max_streams
        self.heartbeat_s = HEARTBEAT_S
        self._subs: dict[UUID, set[Subscription]] = {}
        self._open = 0
        self._ready = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def open_streams(self) -> int:
        return self._open

    async def publish(self, changes: Iterable[Change]) -> None:
        """Tell every process; a failure is logged, never raised (Postgres has the truth)."""
        items = list(changes)
        if not items:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for change in items:
                    pipe.publish(self.channel, change.to_bytes())
                await pipe.execute()
        except Exception as exc:
            log.warning("could not publish %d status changes: %s", len(items), exc)

    async def publish_transitions(
        self, transitions: Sequence[Transition], happened: Sequence[tuple[UUID, Any]]
    ) -> None:
        """Publish the transitions that `record_transitions` says happened."""
        done = {job_id for job_id, _ in happened}
        await self.publish(Change(t.id, t.status, t.reason) for t in transitions if t.id in done)

    @contextlib.asynccontextmanager
    async def subscribe(self, job_id: UUID) -> AsyncIterator[Subscription]:
        """Watch one transaction; the Redis subscription is live before this yields.

        Read the current status after entering, never before: a change made in between
        then arrives here rather than being lost.
        """
        if self._closing or self._open >= self.max_streams:
            raise StreamLimit
        sub = Subscription(job_id)
        self._open += 1
        self._subs.setdefault(job_id, set()).add(sub)
        try:
            await self._wait_ready()
            yield sub
        finally:
            self._open -= 1
            watchers = self._subs.get(job_id)
            if watchers is not None:
                watchers.discard(sub)
                if not watchers:
                    del self._subs[job_id]

    async def _wait_ready(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="khqr-events")
        if self._ready.is_set():
            return
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await self._ready.wait()
        except TimeoutError:
            # Streams still re-read Postgres on every heartbeat; they just learn later.
            log.warning("live status: Redis pub/sub is not connected yet")

    async def _listen(self) -> None:
        backoff = 0.1
        connected_before = False
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self._ready.set()
                        if connected_before:
                            self._broadcast(Signal.RESYNC)
                        connected_before = True
                        backoff = 0.1
                    elif message["type"] == "message":
                        self._dispatch(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._ready.clear()
                log.warning("live status: Redis pub/sub lost (%s); reconnecting", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]

    def _dispatch(self, raw: bytes | str) -> None:
        change = Change.from_bytes(raw)
        if change is None:
            return
        for sub in self._subs.get(change.job_id, ()):
            sub.put(change)

    def _broadcast(self, signal: Signal) -> None:
        for watchers in self._subs.values():
            for sub in watchers:
                sub.put(signal)

    def close_streams(self) -> None:
        """Ask every open stream to end and refuse new ones (shutdown)."""
        self._closing = True
        self._broadcast(Signal.CLOSE)

    async def stop(self) -> None:
        self.close_streams()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
