"""Live status: terminal transitions published on Redis pub/sub, fanned out to local streams.

Every process publishes the transitions it records on one channel and keeps one pub/sub
connection that hands each message to the streams of this process watching that
transaction, so a stream on one process sees a payment found by another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any
from uuid import UUID

import orjson

from khqr_gateway.infra.broadcast import Broadcast
from khqr_gateway.infra.schedule import RedisClient
from khqr_gateway.transactions.model import Status, Transition

log = logging.getLogger(__name__)

MAX_STREAMS = 1000
# Of MAX_STREAMS, kept for the API's streams: public page streams (anyone with a link) never
# take these, so a flood of the payment page cannot starve the merchant's backend.
API_RESERVED_SHARE = 0.25
# A customer's few tabs and devices on one payment link; more is a flood of that link.
PAGE_STREAMS_PER_JOB = 5
# Per connecting address, across links. Behind a reverse proxy every customer shares the
# proxy's address (X-Forwarded-For is anyone's to write, so it is not read): 50 of the
# 750 page slots bounds one address without making a proxied shop's checkout the limit.
PAGE_STREAMS_PER_CLIENT = 50
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


class Scope(Enum):
    """Whose stream limit was reached."""

    PROCESS = "process"  # this process's streams, or its share for public pages
    TRANSACTION = "transaction"  # public page streams of one transaction
    CLIENT = "client"  # public page streams from one address


class StreamLimit(Exception):
    """No room for another stream; `scope` says whose limit it is."""

    def __init__(self, scope: Scope) -> None:
        super().__init__(scope.value)
        self.scope = scope


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


def _release(counts: Counter[Any], key: Any) -> None:
    # Drop keys at zero: a counter of every address ever seen would only grow.
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]


class EventHub:
    """Publishes changes and fans them out to the local subscriptions of this process."""

    def __init__(
        self,
        redis: RedisClient,
        channel: str,
        *,
        max_streams: int = MAX_STREAMS,
        api_reserved_share: float = API_RESERVED_SHARE,
        page_per_job: int = PAGE_STREAMS_PER_JOB,
        page_per_client: int = PAGE_STREAMS_PER_CLIENT,
    ) -> None:
        self.redis = redis
        self.channel = channel
        self.max_streams = max_streams
        self.api_reserved_share = api_reserved_share
        self.page_per_job = page_per_job
        self.page_per_client = page_per_client
        self.heartbeat_s = HEARTBEAT_S
        self._subs: dict[UUID, set[Subscription]] = {}
        self._open = 0
        self._pages: Counter[UUID] = Counter()
        self._page_clients: Counter[str] = Counter()
        self._closing = False
        self._channel = Broadcast(
            redis,
            channel,
            what="live status",
            on_message=self._dispatch,
            on_connect=self._connected,
        )

    @property
    def open_streams(self) -> int:
        return self._open

    async def publish(self, changes: Iterable[Change]) -> None:
        """Tell every process; a failure is logged, never raised (Postgres has the truth)."""
        items = list(changes)
        if not items:
            return
        try:
            await self._channel.publish([c.to_bytes() for c in items])
        except Exception as exc:
            log.warning("could not publish %d status changes: %s", len(items), exc)

    async def publish_transitions(
        self, transitions: Sequence[Transition], happened: Sequence[tuple[UUID, Any]]
    ) -> None:
        """Publish the transitions that `record_transitions` says happened."""
        done = {job_id for job_id, _ in happened}
        await self.publish(Change(t.id, t.status, t.reason) for t in transitions if t.id in done)

    @property
    def page_streams(self) -> int:
        return self._pages.total()

    def check(self, job_id: UUID, client: str | None = None) -> None:
        """Raise StreamLimit unless a stream could open now; `client` marks a public one."""
        if self._closing or self._open >= self.max_streams:
            raise StreamLimit(Scope.PROCESS)
        if client is None:
            return
        if self._pages[job_id] >= self.page_per_job:
            raise StreamLimit(Scope.TRANSACTION)
        if self._page_clients[client] >= self.page_per_client:
            raise StreamLimit(Scope.CLIENT)
        reserved = math.ceil(self.max_streams * self.api_reserved_share)
        if self.page_streams >= self.max_streams - reserved:
            raise StreamLimit(Scope.PROCESS)

    @contextlib.asynccontextmanager
    async def subscribe(
        self, job_id: UUID, client: str | None = None
    ) -> AsyncIterator[Subscription]:
        """Watch one transaction; the Redis subscription is live before this yields.

        `client` is the address of a public (payment page) stream, None for the API's.
        Read the current status after entering, never before: a change made in between
        then arrives here rather than being lost.
        """
        self.check(job_id, client)
        sub = Subscription(job_id)
        self._open += 1
        self._subs.setdefault(job_id, set()).add(sub)
        if client is not None:
            self._pages[job_id] += 1
            self._page_clients[client] += 1
        try:
            await self._wait_ready()
            yield sub
        finally:
            self._open -= 1
            if client is not None:
                _release(self._pages, job_id)
                _release(self._page_clients, client)
            watchers = self._subs.get(job_id)
            if watchers is not None:
                watchers.discard(sub)
                if not watchers:
                    del self._subs[job_id]

    async def _wait_ready(self) -> None:
        self._channel.start()
        if self._channel.ready.is_set():
            return
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await self._channel.ready.wait()
        except TimeoutError:
            # Streams still re-read Postgres on every heartbeat; they just learn later.
            log.warning("live status: Redis pub/sub is not connected yet")

    def _connected(self, again: bool) -> None:
        if again:  # changes published while away were missed: every stream reads again
            self._broadcast(Signal.RESYNC)

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
        await self._channel.stop()
