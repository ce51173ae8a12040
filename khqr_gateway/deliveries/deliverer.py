"""The delivery tick: claims due deliveries from the lanes, sends them, stores every attempt,
and puts each back where its next attempt waits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import asyncpg

from khqr_gateway.deliveries import store
from khqr_gateway.deliveries.lanes import Claim, Lanes
from khqr_gateway.deliveries.model import AttemptRecord, DeliveryStatus, DueDelivery, Lane
from khqr_gateway.deliveries.retry import AttemptVerdict, next_attempt
from khqr_gateway.deliveries.sender import MAX_IN_FLIGHT, Sender, SendResult
from khqr_gateway.infra.db import write_isolated
from khqr_gateway.metrics import DELIVERY_ATTEMPTS, DELIVERY_LATENCY
from khqr_gateway.times import now_ms, parse_retry_after, to_ms

log = logging.getLogger(__name__)
T = TypeVar("T")

# Kept alive while sends go on: a killed process's deliveries are due again in seconds.
LEASE_MS = 10_000
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
# Postgres trouble: claimed deliveries come due again this much later.
LOAD_RETRY_MS = 1000
STORE_RETRY_MS = 2000
# Early in its lane: Postgres has it due more than this after the lane said.
EARLY_MS = 1000

STATUS_AFTER = {
    AttemptVerdict.DELIVERED: DeliveryStatus.DELIVERED,
    AttemptVerdict.RETRY: DeliveryStatus.PENDING,
    AttemptVerdict.GIVE_UP: DeliveryStatus.FAILED,
}


@dataclass(slots=True)
class _Claimed:
    delivery: DueDelivery
    claim: Claim


class Deliverer:
    """The delivery tick: first attempts before retries, a cap per receiver host."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        lanes: Lanes,
        sender: Sender,
        retry_schedule: Sequence[float],
        max_in_flight: int = MAX_IN_FLIGHT,
        per_host: int = PER_HOST,
    ) -> None:
        self.pool = pool
        self.lanes = lanes
        self.sender = sender
        self.retry_schedule = tuple(retry_schedule)
        self.max_in_flight = max_in_flight
        self.receivers: Receivers[_Claimed] = Receivers(per_host)
        self._claims: set[Claim] = set()
        self._stopping = False
        self._tick_lock = asyncio.Lock()
        self._again = False
        self._kicked: asyncio.Task[None] | None = None
        # The last claim filled all the room it had: more is due than was taken.
        self._backlog = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._done: list[tuple[_Claimed, AttemptRecord]] = []
        self._flushing: asyncio.Task[None] | None = None

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def _room(self) -> int:
        """Deliveries this process may still take on: sending or waiting for their host."""
        return self.max_in_flight - len(self._tasks) - self.receivers.queued

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
        if self._room <= 0 or self._stopping:
            return 0
        now = now_ms()
        claimed: list[_Claimed] = []
        failed: Exception | None = None
        self._backlog = False
        try:
            await self._claim_lanes(now, claimed)
        except Exception as exc:
            failed = exc  # what an earlier lane claimed still goes out
            self._backlog = False  # no claiming again on every finished send meanwhile
        started = await self._start(claimed, now)
        if failed is not None:
            raise failed
        return started

    async def _claim_lanes(self, now: int, claimed: list[_Claimed]) -> None:
        """First attempts, then retries with the room left; `claimed` gets what was taken."""
        room = self._room
        for lane in (Lane.FIRST, Lane.RETRY):
            if room <= 0:
                self._backlog = True  # the retry lane was not even asked
                return
            claim = await self.lanes.claim(lane, now, room, LEASE_MS)
            if claim is None:
                continue
            taken = len(claim.members)
            if taken >= room:
                self._backlog = True
            self._keep(claim)
            try:
                claimed += await self._load(claim, now)
            except Exception:
                await self._give_back([claim], LOAD_RETRY_MS)
                raise
            room -= taken

    def _keep(self, claim: Claim) -> None:
        claim.__enter__()
        self._claims.add(claim)

    def _let_go(self, claim: Claim) -> None:
        claim.__exit__()
        self._claims.discard(claim)

    async def _load(self, claim: Claim, now: int) -> list[_Claimed]:
        members = sorted(claim.members)
        rows = await store.load_due(self.pool, members)
        rows = await self._hold_early(rows, claim, now)
        found = {r.id for r in rows}
        await self._finish(claim, done=[m for m in members if m not in found])
        return [_Claimed(r, claim) for r in rows]

    async def _hold_early(
        self, rows: list[DueDelivery], claim: Claim, now: int
    ) -> list[DueDelivery]:
        """Postgres says when a delivery is due: one found early in a lane waits its turn,
        in the retry lane."""
        due: list[DueDelivery] = []
        early: list[tuple[str, int]] = []
        for row in rows:
            at_ms = to_ms(row.next_attempt_at) if row.next_attempt_at else 0
            if at_ms > now + EARLY_MS:
                early.append((row.id, at_ms))
            else:
                due.append(row)
        await self._finish(claim, retry=early)
        return due

    async def _finish(
        self,
        claim: Claim,
        *,
        again: Sequence[tuple[str, int]] = (),
        done: Sequence[str] = (),
        retry: Sequence[tuple[str, int]] = (),
    ) -> None:
        """Settle these members of `claim`: due `again` in its lane, `done`, or moved to the
        retry lane; a claim with nothing left is let go."""
        await claim.finish(again, done)
        await claim.retry(retry)
        if not claim.members:
            self._let_go(claim)

    async def _give_back(self, claims: Sequence[Claim], delay_ms: int) -> None:
        """Make claimed deliveries due again soon (Postgres trouble, or shutting down)."""
        due = now_ms() + delay_ms
        for claim in claims:
            with contextlib.suppress(Exception):  # Redis down too: the leases run out instead
                await claim.give_back(due)
            self._let_go(claim)

    async def _give_back_items(self, items: Sequence[_Claimed], delay_ms: int) -> None:
        """Make these deliveries (only these: others of their claim may still be sending)
        due again soon."""
        due = now_ms() + delay_ms
        for claim, ids in _by_claim(items).items():
            with contextlib.suppress(Exception):  # Redis down too: the lease runs out instead
                await self._finish(claim, again=[(i, due) for i in ids])

    async def _start(self, claimed: list[_Claimed], now: int) -> int:
        started = 0
        overflow: list[_Claimed] = []
        for item in claimed:
            host = _origin(item.delivery.url)
            if self.receivers.take(host):
                self._launch(item, host)
                started += 1
            elif not self.receivers.wait(host, item):
                overflow.append(item)  # a receiver this far behind: back to Redis for a while
        if overflow:
            self._backlog = False  # its receiver is the limit, not the room
        due = now + HOST_BUSY_DELAY_MS
        for claim, ids in _by_claim(overflow).items():
            await self._finish(claim, again=[(i, due) for i in ids])
        return started

    def _launch(self, item: _Claimed, host: str) -> None:
        """Send `item` to `host`, in a slot already taken for it."""
        task = asyncio.create_task(self._deliver(item, host))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _next_for(self, host: str) -> None:
        """A send to `host` finished: its slot goes to the next delivery waiting for it."""
        waiting = self.receivers.release(host, hand_on=not self._stopping)
        if waiting is not None:
            self._launch(waiting, host)

    async def _deliver(self, item: _Claimed, host: str) -> None:
        try:
            result = await self.sender.send(item.delivery)
            self.receivers.answered(host, result.status is not None and result.status < 500)
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

    def _record(self, delivery: DueDelivery, result: SendResult) -> AttemptRecord:
        decision = next_attempt(
            attempt=delivery.series_attempts + 1,
            status=result.status,
            retry_after_s=parse_retry_after((result.headers or {}).get("retry-after")),
            schedule=self.retry_schedule,
            rand=random.random(),
        )
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
            new_status=STATUS_AFTER[decision.verdict],
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
                await self._give_back_items([item for item, _ in batch], STORE_RETRY_MS)
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
        await self._give_back_items(dropped, STORE_RETRY_MS)
        return stored

    async def _reschedule(self, batch: list[tuple[_Claimed, AttemptRecord]]) -> None:
        """Done ones leave their lane; the others wait in the retry lane for their next
        attempt, moved there in one step from wherever they were claimed."""
        settled: dict[Claim, tuple[list[str], list[tuple[str, int]]]] = {}
        for item, record in batch:
            done, retry = settled.setdefault(item.claim, ([], []))
            if record.next_attempt_at is None:
                done.append(item.delivery.id)
            else:
                retry.append((item.delivery.id, to_ms(record.next_attempt_at)))
        for claim, (done, retry) in settled.items():
            await self._finish(claim, done=done, retry=retry)

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
        await self._give_back(list(self._claims), 0)

    async def close(self) -> None:
        await self.sender.close()


class Receivers(Generic[T]):
    """Sends at once per receiver: at most `per_host` each, a handful while one keeps failing
    or timing out (a dead receiver holds a few slots, not a quarter of them), and per receiver
    a short queue of work waiting, under its lease, for the moment a slot is free."""

    def __init__(self, per_host: int) -> None:
        self.per_host = per_host
        self.queued = 0
        self._load: Counter[str] = Counter()
        self._failures: Counter[str] = Counter()
        self._queues: dict[str, deque[T]] = {}

    def take(self, host: str) -> bool:
        """A slot for one more send to `host`, if one is free."""
        if self._load[host] >= self._cap(host):
            return False
        self._load[host] += 1
        return True

    def wait(self, host: str, item: T) -> bool:
        """Queue `item` for `host`'s next free slot; False when that queue is full."""
        queue = self._queues.setdefault(host, deque())
        if len(queue) >= self.per_host * HOST_QUEUE_FACTOR:
            return False
        queue.append(item)
        self.queued += 1
        return True

    def answered(self, host: str, healthy: bool) -> None:
        """How a send to `host` went: an answer below 500, or not."""
        if healthy:
            self._failures.pop(host, None)
        else:
            self._failures[host] += 1

    def release(self, host: str, *, hand_on: bool) -> T | None:
        """A send to `host` finished. With `hand_on`, its slot goes to the next item waiting
        for `host`, returned (the slot taken for it)."""
        self._load[host] -= 1
        waiting = self._queues.get(host)
        item = None
        if waiting and hand_on and self._load[host] < self._cap(host):
            item = waiting.popleft()
            self.queued -= 1
            self._load[host] += 1
            if not waiting:
                del self._queues[host]
        if self._load[host] <= 0:
            del self._load[host]
        return item

    def _cap(self, host: str) -> int:
        if self._failures[host] >= SICK_AFTER_FAILURES:
            return SICK_HOST_CAP
        return self.per_host


def _by_claim(items: Sequence[_Claimed]) -> dict[Claim, list[str]]:
    grouped: dict[Claim, list[str]] = {}
    for item in items:
        grouped.setdefault(item.claim, []).append(item.delivery.id)
    return grouped


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
