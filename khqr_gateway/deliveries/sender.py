"""Webhook delivery: claims due deliveries, sends them signed, stores every attempt."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg

from khqr_gateway import __version__
from khqr_gateway.deliveries import store
from khqr_gateway.deliveries.model import DeliveryStatus
from khqr_gateway.deliveries.retry import AttemptVerdict, next_attempt
from khqr_gateway.deliveries.signing import sign_headers
from khqr_gateway.deliveries.ssrf import Blocked
from khqr_gateway.deliveries.store import AttemptRecord, DueDelivery
from khqr_gateway.infra.db import write_isolated
from khqr_gateway.infra.schedule import Lease, Schedule
from khqr_gateway.metrics import DELIVERY_ATTEMPTS, DELIVERY_LATENCY
from khqr_gateway.times import parse_retry_after

log = logging.getLogger(__name__)

RESPONSE_BODY_LIMIT = 4096
KEPT_RESPONSE_HEADERS = ("retry-after", "content-type")
MAX_IN_FLIGHT = 256
KEEPALIVE_S = 30.0
# A host already at its cap gets its further deliveries back this much later.
HOST_BUSY_DELAY_MS = 250
# How many deliveries per receiver may wait in this process for a free slot, per slot.
HOST_QUEUE_FACTOR = 4
# Sends at once to one receiver; a receiver failing SICK_AFTER_FAILURES times in a row
# (timeouts, refused connections, 5xx) gets SICK_HOST_CAP until it answers again.
PER_HOST = 64
SICK_AFTER_FAILURES = 3
SICK_HOST_CAP = 4
# Claims one tick makes at most while kicks keep asking for more.
MAX_PASSES = 8


@dataclass(frozen=True, slots=True)
class SendResult:
    status: int | None
    error_kind: str | None
    error_message: str | None
    body: str | None
    headers: dict[str, str] | None
    started_at: datetime
    duration_ms: int


@dataclass(slots=True)
class _Claimed:
    delivery: DueDelivery
    lease: Lease


def error_kind(exc: BaseException) -> str:
    """A short word for why an attempt got no HTTP answer."""
    if isinstance(exc, Blocked):
        return "ssrf-blocked"
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return "timeout"
    if isinstance(
        exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError | ssl.SSLError
    ):
        return "tls"
    dns_error = getattr(aiohttp, "ClientConnectorDNSError", None)
    if dns_error is not None and isinstance(exc, dns_error):
        return "dns"
    if isinstance(
        exc, aiohttp.ClientConnectorError | aiohttp.ServerDisconnectedError | ConnectionError
    ):
        return "connect"
    if isinstance(exc, aiohttp.InvalidURL):
        return "invalid-url"
    return "network"


async def _read_limited(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await resp.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


class Deliverer:
    """The delivery tick: first attempts before retries, a cap per receiver host."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        first: Schedule,
        retry: Schedule,
        secrets: Sequence[bytes],
        retry_schedule: Sequence[float],
        timeout_s: float,
        max_in_flight: int = MAX_IN_FLIGHT,
        per_host: int = PER_HOST,
        connector_factory: Callable[[], aiohttp.BaseConnector] | None = None,
    ) -> None:
        self.pool = pool
        self.first = first
        self.retry = retry
        self.secrets = tuple(secrets)
        self.retry_schedule = tuple(retry_schedule)
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        # Kept alive while sends go on: a killed process's deliveries are due again in seconds.
        self.lease_ms = 10_000
        self._leases: set[Lease] = set()
        # Deliveries claimed for a receiver already at its cap wait here, under their lease,
        # and go out the moment one of its sends finishes.
        self._queues: dict[str, deque[_Claimed]] = {}
        self._queued = 0
        self._host_failures: Counter[str] = Counter()
        self._stopping = False
        self._tick_lock = asyncio.Lock()
        self._again = False
        self._kicked: asyncio.Task[None] | None = None
        # The last claim filled all the room it had: more is due than was taken.
        self._backlog = False
        self.max_in_flight = max_in_flight
        self.per_host = per_host
        self._connector_factory = connector_factory
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._host_load: Counter[str] = Counter()
        self._done: list[tuple[_Claimed, AttemptRecord]] = []
        self._flushing: asyncio.Task[None] | None = None
        self.last_tick: float | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = (
                self._connector_factory()
                if self._connector_factory
                else aiohttp.TCPConnector(limit=self.max_in_flight, keepalive_timeout=KEEPALIVE_S)
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self.timeout,
                # Bodies are stored as sent, not decompressed: ask for them uncompressed.
                headers={
                    "User-Agent": f"khqr-gateway/{__version__}",
                    "Accept-Encoding": "identity",
                },
                auto_decompress=False,
            )
        return self._session

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def _room(self) -> int:
        """Deliveries this process may still take on: sending or waiting for their host."""
        return self.max_in_flight - len(self._tasks) - self._queued

    def kick(self) -> None:
        """New deliveries were just scheduled: claim them now, not at the next tick."""
        if self._tick_lock.locked():
            self._again = True
        elif self._kicked is None or self._kicked.done():
            self._kicked = asyncio.create_task(self._kicked_tick())

    async def _kicked_tick(self) -> None:
        with contextlib.suppress(Exception):  # the regular tick reports errors
            await self.tick()

    async def tick(self) -> int:
        """Start sending what is due, within capacity; returns how many sends started."""
        if self._tick_lock.locked():
            self._again = True
            return 0
        started = 0
        async with self._tick_lock:
            # Bounded, so that a tick returns (its health in /ready) even while kicks keep
            # coming; what is still due is claimed by the next kick or tick.
            for _ in range(MAX_PASSES):
                self._again = False
                started += await self._claim_and_start()
                if not self._again:
                    break
        return started

    async def _claim_and_start(self) -> int:
        self.last_tick = time.time()
        room = self._room
        if room <= 0 or self._stopping:
            return 0
        now_ms = int(self.last_tick * 1000)
        claimed: list[_Claimed] = []
        failed: Exception | None = None
        self._backlog = False
        try:
            for lane in (self.first, self.retry):
                if room <= 0:
                    self._backlog = True  # the retry lane was not even asked
                    break
                members, until = await lane.claim(now_ms, room, self.lease_ms)
                if len(members) >= room:
                    self._backlog = True
                if not members:
                    continue
                lease = self._keep(Lease(lane, members, until, self.lease_ms))
                try:
                    claimed += await self._load(lease, members, now_ms)
                except Exception:
                    await self._give_back([lease], 1000)
                    raise
                room -= len(members)
        except Exception as exc:
            failed = exc  # what an earlier lane claimed still goes out
            self._backlog = False  # no claiming again on every finished send meanwhile
        started = await self._start(claimed, now_ms)
        if failed is not None:
            raise failed
        return started

    def _keep(self, lease: Lease) -> Lease:
        lease.__enter__()
        self._leases.add(lease)
        return lease

    async def _load(self, lease: Lease, members: list[str], now_ms: int) -> list[_Claimed]:
        rows = await store.load_due(self.pool, members)
        rows = await self._hold_early(rows, lease, now_ms)
        found = {r.id for r in rows}
        await self._finish(lease, [], [m for m in members if m not in found])
        return [_Claimed(r, lease) for r in rows]

    async def _finish(
        self, lease: Lease, reschedule: Sequence[tuple[str, int]], remove: Sequence[str]
    ) -> None:
        await lease.finish(reschedule, remove)
        if not lease.members:
            lease.__exit__()
            self._leases.discard(lease)

    async def _give_back(self, leases: Sequence[Lease], delay_ms: int) -> None:
        """Make claimed deliveries due again soon (Postgres trouble, or shutting down)."""
        due = int(time.time() * 1000) + delay_ms
        for lease in leases:
            try:
                await self._finish(lease, [(m, due) for m in lease.members], [])
            except Exception:  # Redis down too: the leases run out instead
                lease.__exit__()
                self._leases.discard(lease)

    async def _give_back_items(self, items: Sequence[_Claimed], delay_ms: int) -> None:
        """Make these deliveries (only these: others of their lease may still be sending)
        due again soon."""
        due = int(time.time() * 1000) + delay_ms
        by_lease: dict[int, tuple[Lease, list[tuple[str, int]]]] = {}
        for item in items:
            by_lease.setdefault(id(item.lease), (item.lease, []))[1].append((item.delivery.id, due))
        for lease, again in by_lease.values():
            with contextlib.suppress(Exception):  # Redis down too: the lease runs out instead
                await self._finish(lease, again, [])

    async def _hold_early(
        self, rows: list[DueDelivery], lease: Lease, now_ms: int
    ) -> list[DueDelivery]:
        """Postgres says when a delivery is due: one found early in a lane waits its turn."""
        due: list[tuple[DueDelivery, int]] = []
        early: list[tuple[DueDelivery, int]] = []
        for row in rows:
            at_ms = int(row.next_attempt_at.timestamp() * 1000) if row.next_attempt_at else 0
            (early if at_ms > now_ms + 1000 else due).append((row, at_ms))
        if early:
            # Into the retry lane first: a delivery is never in neither lane (reconcile).
            await self.retry.add((row.id, at_ms) for row, at_ms in early)
            await self._finish(lease, [], [row.id for row, _ in early])
        return [row for row, _ in due]

    async def _start(self, claimed: list[_Claimed], now_ms: int) -> int:
        started = 0
        overflow: dict[int, tuple[Lease, list[tuple[str, int]]]] = {}
        for item in claimed:
            host = _origin(item.delivery.url)
            if self._host_load[host] < self._cap(host):
                self._launch(item, host)
                started += 1
                continue
            queue = self._queues.setdefault(host, deque())
            if len(queue) < self.per_host * HOST_QUEUE_FACTOR:
                queue.append(item)
                self._queued += 1
                continue
            # A receiver this far behind: its surplus goes back to Redis for a while.
            due = (item.delivery.id, now_ms + HOST_BUSY_DELAY_MS)
            overflow.setdefault(id(item.lease), (item.lease, []))[1].append(due)
        if overflow:
            self._backlog = False  # its receiver is the limit, not the room
        for lease, later in overflow.values():
            await self._finish(lease, later, [])
        return started

    def _cap(self, host: str) -> int:
        """Sends at once to one receiver: fewer while it keeps failing or timing out, so a
        dead receiver holds a handful of slots, not a quarter of them."""
        if self._host_failures[host] >= SICK_AFTER_FAILURES:
            return SICK_HOST_CAP
        return self.per_host

    def _launch(self, item: _Claimed, host: str) -> None:
        self._host_load[host] += 1
        task = asyncio.create_task(self._deliver(item, host))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _next_for(self, host: str) -> None:
        """A send to `host` finished: free its slot, start its next queued delivery."""
        self._host_load[host] -= 1
        queue = self._queues.get(host)
        if queue and not self._stopping and self._host_load[host] < self._cap(host):
            self._queued -= 1
            self._launch(queue.popleft(), host)
            if not queue:
                del self._queues[host]
        if self._host_load[host] <= 0:
            del self._host_load[host]

    async def _deliver(self, item: _Claimed, host: str) -> None:
        try:
            result = await self.send(item.delivery)
            answered = result.status is not None and result.status < 500
            if answered:
                self._host_failures.pop(host, None)
            else:
                self._host_failures[host] += 1
        finally:
            self._next_for(host)
            self._refill()
        self._done.append((item, self._record(item.delivery, result)))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())

    def _refill(self) -> None:
        """With a backlog, claim again as soon as a quarter of the room is free rather than
        at the next tick: the tick period would otherwise cap sends at room per tick."""
        if not self._backlog or self._stopping:
            return
        if self._room >= max(1, self.max_in_flight // 4):
            self.kick()

    async def send(self, delivery: DueDelivery) -> SendResult:
        """One attempt: POST the stored bytes, signed now, never following redirects."""
        timestamp = int(time.time())
        headers = {"Content-Type": "application/json"}
        headers.update(sign_headers(self.secrets, delivery.id, timestamp, delivery.payload))
        started_at = datetime.now(UTC)
        start = time.perf_counter()
        try:
            async with self.session.post(
                delivery.url, data=delivery.payload, headers=headers, allow_redirects=False
            ) as resp:
                body = await _read_limited(resp, RESPONSE_BODY_LIMIT)
                kept = {k: resp.headers[k] for k in KEPT_RESPONSE_HEADERS if k in resp.headers}
                return SendResult(
                    resp.status,
                    None,
                    None,
                    body.decode("utf-8", "replace"),
                    kept or None,
                    started_at,
                    _ms_since(start),
                )
        except Exception as exc:  # every failure is an attempt to record, never a crash
            return SendResult(
                None,
                error_kind(exc),
                str(exc)[:500] or type(exc).__name__,
                None,
                None,
                started_at,
                _ms_since(start),
            )

    def _record(self, delivery: DueDelivery, result: SendResult) -> AttemptRecord:
        retry_after = None
        if result.headers and "retry-after" in result.headers:
            retry_after = parse_retry_after(result.headers["retry-after"], time.time())
        decision = next_attempt(
            attempt=delivery.series_attempts + 1,
            status=result.status,
            retry_after_s=retry_after,
            schedule=self.retry_schedule,
            rand=random.random(),
        )
        new_status = {
            AttemptVerdict.DELIVERED: DeliveryStatus.DELIVERED,
            AttemptVerdict.RETRY: DeliveryStatus.PENDING,
            AttemptVerdict.GIVE_UP: DeliveryStatus.FAILED,
        }[decision.verdict]
        next_at = None
        if decision.verdict is AttemptVerdict.RETRY and decision.delay_s is not None:
            next_at = datetime.now(UTC) + timedelta(seconds=decision.delay_s)
        return AttemptRecord(
            delivery_id=delivery.id,
            attempt=delivery.attempt_count + 1,
            started_at=result.started_at,
            duration_ms=result.duration_ms,
            status_code=result.status,
            error_kind=result.error_kind,
            error_message=result.error_message,
            response_body=result.body,
            response_headers=result.headers,
            new_status=new_status,
            next_attempt_at=next_at,
        )

    async def _flush(self) -> None:
        """Group commit: store every finished attempt so far in one statement, then repeat."""
        while self._done:
            batch, self._done = self._done, []
            try:
                batch = await self._store(batch)
            except Exception as exc:
                # Unrecorded attempts are made again later, with the same webhook-id.
                log.warning("could not record %d delivery attempts: %s", len(batch), exc)
                await self._give_back_items([item for item, _ in batch], 2000)
                continue
            try:
                await self._reschedule(batch)
            except Exception as exc:  # Redis: the reconcile tick puts them back from Postgres
                log.warning("could not reschedule %d deliveries: %s", len(batch), exc)
            for item, record in batch:
                _log_attempt(item.delivery, record)

    async def _store(
        self, batch: list[tuple[_Claimed, AttemptRecord]]
    ) -> list[tuple[_Claimed, AttemptRecord]]:
        """Store the attempts of `batch`; returns those stored. A row Postgres refuses fails
        only itself: it is stored again without what the receiver sent, so that the attempt
        still counts and the retry schedule holds; one refused even so is handed back."""
        write = partial(store.record_attempts, self.pool)
        _, refused = await write_isolated(write, [record for _, record in batch])
        if not refused:
            return batch
        bare = {id(record): _without_answer(record, exc) for record, exc in refused}
        _, lost = await write_isolated(write, list(bare.values()))
        for record, exc in lost:
            log.error(
                "could not record a delivery attempt: %s",
                exc,
                extra={"deliveryId": record.delivery_id},
            )
        lost_ids = {id(record) for record, _ in lost}
        stored: list[tuple[_Claimed, AttemptRecord]] = []
        dropped: list[_Claimed] = []
        for item, record in batch:
            kept = bare.get(id(record), record)
            if id(kept) in lost_ids:
                dropped.append(item)
            else:
                stored.append((item, kept))
        await self._give_back_items(dropped, 2000)
        return stored

    async def _reschedule(self, batch: list[tuple[_Claimed, AttemptRecord]]) -> None:
        """Done ones leave their lane; retries go to (or stay in) the retry lane, atomically
        where they already are in it."""
        by_lease: dict[int, tuple[Lease, list[tuple[str, int]], list[str]]] = {}
        moved: list[tuple[str, int]] = []
        for item, record in batch:
            lease = item.lease
            _, again, done = by_lease.setdefault(id(lease), (lease, [], []))
            if record.next_attempt_at is None:
                done.append(item.delivery.id)
                continue
            due = (item.delivery.id, int(record.next_attempt_at.timestamp() * 1000))
            if lease.schedule is self.retry:
                again.append(due)
            else:
                done.append(item.delivery.id)
                moved.append(due)
        await self.retry.add(moved)
        for lease, again, done in by_lease.values():
            await self._finish(lease, again, done)

    async def drain(self, timeout_s: float) -> None:
        """Wait for in-flight sends (up to `timeout_s`) and store their attempts."""
        self._stopping = True
        # A claim under way (a tick or a kick) starts its sends before it lets go of the
        # lock: wait for it, so that those sends are waited for too, not handed back while
        # they are still going out (another process would send them again).
        async with self._tick_lock:
            pass
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)
        if self._flushing is not None:
            await asyncio.wait([self._flushing], timeout=timeout_s)
        # Whatever is still in flight is handed to the other processes at once.
        await self._give_back(list(self._leases), 0)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _origin(url: str) -> str:
    """The receiver a per-host cap counts against: scheme, host and port."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.scheme}://{parts.hostname}:{port or ''}"


def _without_answer(record: AttemptRecord, exc: Exception) -> AttemptRecord:
    """The attempt as it happened, without the receiver's bytes that Postgres refused."""
    why = f"the receiver's answer could not be stored: {type(exc).__name__}"
    return replace(record, response_body=None, response_headers=None, error_message=why)


def _ms_since(start: float) -> int:
    return int((time.perf_counter() - start) * 1000)


def _log_attempt(delivery: DueDelivery, record: AttemptRecord) -> None:
    fields: dict[str, Any] = {
        "deliveryId": delivery.id,
        "jobId": str(delivery.transaction_id),
        "md5": delivery.md5,
        "attempt": record.attempt,
        "statusCode": record.status_code,
        "errorKind": record.error_kind,
        "durationMs": record.duration_ms,
        "deliveryStatus": record.new_status.value,
    }
    outcome = {"pending": "retry"}.get(record.new_status.value, record.new_status.value)
    DELIVERY_ATTEMPTS.labels(outcome).inc()
    DELIVERY_LATENCY.observe(record.duration_ms / 1000)
    level = logging.INFO if record.new_status is not DeliveryStatus.PENDING else logging.WARNING
    log.log(level, "webhook attempt", extra=fields)
