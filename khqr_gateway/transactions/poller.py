"""Payment tracking: the state machine (pure) and the poll tick that drives it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from asyncio import FIRST_COMPLETED
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from uuid import UUID

import asyncpg

from khqr_gateway import times
from khqr_gateway.bakong.client import MAX_BATCH, BakongClient
from khqr_gateway.bakong.model import CheckResult, ErrorKind
from khqr_gateway.credentials.renewal import Credentials
from khqr_gateway.deliveries.lanes import Lanes
from khqr_gateway.infra.db import write_isolated
from khqr_gateway.infra.ratelimit import RateLimit
from khqr_gateway.infra.schedule import Lease, Schedule
from khqr_gateway.metrics import MD5_CHECKS, TRANSITIONS
from khqr_gateway.times import now_ms
from khqr_gateway.transactions import store
from khqr_gateway.transactions.checker import NO_RESULT, Checker
from khqr_gateway.transactions.events import EventHub
from khqr_gateway.transactions.model import (
    LateWindow,
    Outcome,
    PollItem,
    Status,
    Transition,
    decide,
    transition,
)

log = logging.getLogger(__name__)


# The state machine ----------------------------------------------------------------------


async def announce(
    transitions: Sequence[Transition],
    happened: Sequence[tuple[UUID, str | None]],
    *,
    lanes: Lanes,
    on_deliveries: Callable[[], None] | None,
    events: EventHub | None,
) -> None:
    """Queue the webhooks of the transitions that happened, send them now rather than at the
    next delivery tick, and tell live status."""
    new = [d for _, d in happened if d is not None]
    if await lanes.add(new, now_ms()) and on_deliveries is not None:
        on_deliveries()
    if events is not None:
        try:
            await events.publish_transitions(transitions, happened)
        except Exception as exc:  # live status re-reads Postgres on its heartbeat
            log.warning("could not publish status changes: %s", exc)


# The poll tick ------------------------------------------------------------------------


class Poller:
    """Claims due md5s, checks them with Bakong in batches, records what changed."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        schedule: Schedule,
        lanes: Lanes,
        bakong: BakongClient,
        credentials: Credentials,
        interval_s: float,
        grace_s: float,
        claim_limit: int = 1000,
        max_in_flight: int = 8,
        tick_s: float = 0.25,
        on_deliveries: Callable[[], None] | None = None,
        events: EventHub | None = None,
        limits: RateLimit | None = None,
        window: LateWindow,
        on_timeouts: Callable[[Sequence[str]], Awaitable[None]] | None = None,
    ) -> None:
        self.pool = pool
        self.schedule = schedule
        self.window = window
        # Timeouts that happened, for their late watch to start (late.LateWatch.watch).
        self.on_timeouts = on_timeouts
        self.lanes = lanes
        self.bakong = bakong
        self.credentials = credentials
        self.interval_ms = times.seconds_to_ms(interval_s)
        self.grace_s = grace_s
        self.claim_limit = claim_limit
        self.max_in_flight = max_in_flight
        self.events = events
        # Kept alive while a tick works on them: a killed process's md5s are due in seconds.
        self.lease_ms = 5_000
        self.checker = Checker(
            bakong=bakong,
            credentials=credentials,
            limits=limits,
            interval_s=interval_s,
            max_in_flight=max_in_flight,
        )
        self.tick_ms = times.seconds_to_ms(tick_s)
        # Partial Bakong batches are topped up with md5s due this much later.
        self.lookahead_ms = min(1000, self.interval_ms // 5)
        self.on_deliveries = on_deliveries
        self.last_tick: float | None = None
        self._claimed: set[Lease] = set()

    async def hand_back(self) -> None:
        """On shutdown: make what this process claimed due again at once for the others."""
        for claim in list(self._claimed):
            await self._give_back(claim, 0)

    async def tick(self) -> int:
        """Check everything due before the next tick; returns how many were checked.

        Claims are taken until one comes back short, and up to `max_in_flight` of them are
        worked on at once, so one process keeps up with tens of thousands of md5s.
        """
        started_ms = times.now_ms()
        self.last_tick = started_ms / 1000
        # Members due before the next tick are taken now: a check a little early keeps the
        # gap between checks at the interval instead of the interval plus a tick.
        horizon_ms = started_ms + self.tick_ms
        working: set[asyncio.Task[int]] = set()
        checked = 0
        try:
            while True:
                while len(working) >= self.max_in_flight:
                    done, working = await asyncio.wait(working, return_when=FIRST_COMPLETED)
                    checked += sum(t.result() for t in done)
                members, lease = await self.schedule.claim(
                    horizon_ms,
                    self.claim_limit,
                    self.lease_ms,
                    # Checked one call each, an md5 taken early is a call spent early.
                    lookahead_ms=0 if self.checker.one_by_one() else self.lookahead_ms,
                    batch=MAX_BATCH,
                )
                if members:
                    claim = Lease(self.schedule, members, lease, self.lease_ms)
                    working.add(asyncio.create_task(self._work(claim, started_ms)))
                if len(members) < self.claim_limit:
                    break
        finally:
            if working:
                await asyncio.wait(working)
        return checked + sum(t.result() for t in working)

    async def _work(self, claim: Lease, claimed_at_ms: int) -> int:
        self._claimed.add(claim)
        try:
            with claim:
                return await self._process(sorted(claim.members), claim, claimed_at_ms)
        except Exception as exc:
            # Postgres or Bakong trouble: try these again in one interval, not at lease end.
            log.warning("poll batch failed: %s", exc)
            await self._give_back(claim, self.interval_ms)
            return 0
        finally:
            self._claimed.discard(claim)

    async def _give_back(self, claim: Lease, delay_ms: int) -> None:
        due = times.now_ms() + delay_ms
        with contextlib.suppress(Exception):  # Redis down too: the lease runs out instead
            await claim.finish([(m, due) for m in claim.members], [])

    async def _process(self, members: list[str], lease: Lease, claimed_at_ms: int) -> int:
        try:
            # The driver takes the members as they are (a job id's text) and refuses the
            # whole list, before sending it, if one of them is not a UUID.
            items = await store.load_pending(self.pool, members)
        except asyncpg.DataError:
            items = await store.load_pending(self.pool, list(_uuids(members).values()))
        found = {str(i.id) for i in items}
        gone = [m for m in members if m not in found]
        now = datetime.now(UTC)
        results = await self.checker.check(items, now)
        reschedule, finished = await self._apply(items, results, now, claimed_at_ms)
        await lease.finish(reschedule, gone + finished)
        return len(items)

    async def _apply(
        self,
        items: Sequence[PollItem],
        results: dict[UUID, CheckResult],
        now: datetime,
        claimed_at_ms: int | None = None,
    ) -> tuple[list[tuple[str, int]], list[str]]:
        reschedule: list[tuple[str, int]] = []
        ending: list[tuple[PollItem, Outcome]] = []
        kinds: Counter[str] = Counter()
        # The next check is one interval after this one was due, not after it finished.
        base_ms = claimed_at_ms if claimed_at_ms is not None else times.to_ms(now)
        for item in items:
            result = results.get(item.id, NO_RESULT)
            if result.error is ErrorKind.THROTTLED:  # not asked at all: nothing to decide yet
                reschedule.append((str(item.id), self._next_due(item, result, now, base_ms)))
                continue
            kinds[result.kind.value] += 1
            outcome = decide(item, result, now, grace_s=self.grace_s)
            if outcome.status is Status.PENDING:
                reschedule.append((str(item.id), self._next_due(item, result, now, base_ms)))
            else:
                ending.append((item, outcome))
        for kind, count in kinds.items():
            MD5_CHECKS.labels(kind).inc(count)
        # Metadata only for the webhooks about to be written: checks never read it.
        metadata = await store.metadata_of(
            self.pool, [item.id for item, outcome in ending if outcome.status.notifies]
        )
        transitions = [transition(i, o, metadata.get(i.id)) for i, o in ending]
        happened, refused = await write_isolated(
            partial(store.record_transitions, self.pool, window=self.window), transitions
        )
        if refused:
            transitions = self._keep_pending(transitions, refused, reschedule, base_ms)
        await announce(
            transitions,
            happened,
            lanes=self.lanes,
            on_deliveries=self.on_deliveries,
            events=self.events,
        )
        done = {job for job, _ in happened}
        timed_out = [str(t.id) for t in transitions if t.status is Status.TIMEOUT and t.id in done]
        if timed_out and self.on_timeouts is not None:
            await self.on_timeouts(timed_out)
        for t in transitions:
            if t.id in done:
                TRANSITIONS.labels(t.status.value).inc()
                log.info(
                    "transaction %s",
                    t.status.value,
                    extra={
                        "jobId": str(t.id),
                        "status": t.status.value,
                        "deliveryId": t.delivery_id,
                    },
                )
        return reschedule, [str(t.id) for t in transitions]

    def _keep_pending(
        self,
        transitions: list[Transition],
        refused: list[tuple[Transition, Exception]],
        reschedule: list[tuple[str, int]],
        base_ms: int,
    ) -> list[Transition]:
        """Transitions Postgres refused stay pending, checked again in one interval: one bad
        row never holds back the batch it came in."""
        for t, exc in refused:
            log.error("could not record a transition: %s", exc, extra={"jobId": str(t.id)})
            reschedule.append((str(t.id), base_ms + self.interval_ms))
        gone = {id(t) for t, _ in refused}
        return [t for t in transitions if id(t) not in gone]

    def _next_due(
        self, item: PollItem, result: CheckResult, now: datetime, base_ms: int | None = None
    ) -> int:
        now_ms = times.to_ms(now)
        deadline_ms = times.to_ms(item.deadline_at)
        wait_ms = times.seconds_to_ms(self.checker.gap_s(item, now))
        if base_ms is not None and result.retry_after is None:
            now_ms = min(now_ms, base_ms)
        if result.retry_after is not None:
            # Throttled: again as soon as the rate limit has room; 429 / open circuit: later.
            hint = times.seconds_to_ms(result.retry_after)
            wait_ms = hint if result.error is ErrorKind.THROTTLED else max(wait_ms, hint)
        due = now_ms + wait_ms
        if now_ms < deadline_ms <= due:
            # The final check: late enough that no early claim (the next tick's horizon, a
            # batch top-up) takes it before the deadline and makes it a regular check.
            return deadline_ms + self.tick_ms + self.lookahead_ms
        return due


def _uuids(members: Sequence[str]) -> dict[str, UUID]:
    out: dict[str, UUID] = {}
    for member in members:
        try:
            out[member] = UUID(member)
        except ValueError:
            continue
    return out
