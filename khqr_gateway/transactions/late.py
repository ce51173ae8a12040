"""The late watch: md5s given up on (timed out, cancelled) are still checked, slowly and in
batches, until their QR can no longer be paid, so that money that arrives is reported."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from uuid import UUID

import asyncpg

from khqr_gateway import times
from khqr_gateway.bakong.client import MAX_BATCH
from khqr_gateway.bakong.model import CheckKind, CheckResult, ErrorKind
from khqr_gateway.deliveries.lanes import Lanes
from khqr_gateway.infra.db import write_isolated
from khqr_gateway.infra.schedule import Lease, Schedule
from khqr_gateway.metrics import LATE_PAYMENTS, MD5_CHECKS
from khqr_gateway.transactions import store
from khqr_gateway.transactions.checker import NO_RESULT, Checker
from khqr_gateway.transactions.events import EventHub
from khqr_gateway.transactions.model import LateItem, LateTransition, LateWindow, decide, transition
from khqr_gateway.transactions.poller import announce

log = logging.getLogger(__name__)

# md5s one tick claims at most: 2 list calls, so a late tick never holds the calls in flight
# that live polls and final checks need.
CLAIM_LIMIT = 100
LEASE_MS = 5_000
# The last check of a watch is made this long before it ends, not after.
LAST_CHECK_LEAD_MS = 1_000


class LateWatch:
    """The late tick. It runs behind the live polls: while they are overdue it checks
    nothing, and its calls take only what the shared Bakong rate limit has free."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        schedule: Schedule,
        polls: Schedule,
        lanes: Lanes,
        checker: Checker,
        window: LateWindow,
        poll_interval_s: float,
        grace_s: float,
        events: EventHub | None = None,
        on_deliveries: Callable[[], None] | None = None,
    ) -> None:
        self.pool = pool
        self.schedule = schedule
        self.polls = polls
        self.lanes = lanes
        self.checker = checker
        self.window = window
        self.interval_ms = times.seconds_to_ms(window.check_interval_s)
        self.poll_interval_ms = times.seconds_to_ms(poll_interval_s)
        # Past the watch's end, an md5 Bakong gave no answer for is asked this much longer.
        self.grace_ms = times.seconds_to_ms(grace_s)
        self.events = events
        self.on_deliveries = on_deliveries

    async def watch(self, ids: Sequence[str], delay_ms: int | None = None) -> None:
        """Start watching these transactions (just timed out or cancelled)."""
        if not ids:
            return
        due_ms = times.now_ms() + (self.interval_ms if delay_ms is None else delay_ms)
        try:
            await self.schedule.add((i, due_ms) for i in ids)
        except Exception as exc:  # the reconcile tick puts them there from Postgres
            log.warning("could not start %d late watches: %s", len(ids), exc)

    async def tick(self) -> int:
        """Check the watches that are due; returns how many md5s were checked."""
        now_ms = times.now_ms()
        if await self._live_polls_behind(now_ms):
            return 0
        # A late check a little early costs nothing at this cadence, and fills list calls.
        members, until = await self.schedule.claim(
            now_ms, CLAIM_LIMIT, LEASE_MS, lookahead_ms=self.interval_ms // 2, batch=MAX_BATCH
        )
        if not members:
            return 0
        lease = Lease(self.schedule, members, until, LEASE_MS)
        with lease:
            try:
                return await self._process(lease, members)
            except Exception as exc:
                log.warning("late watch batch failed: %s", exc)
                due = times.now_ms() + self.interval_ms
                with contextlib.suppress(Exception):  # Redis too: the lease runs out instead
                    await lease.finish([(m, due) for m in lease.members], [])
                return 0

    async def _live_polls_behind(self, now_ms: int) -> bool:
        oldest = await self.polls.oldest_due_ms()
        return oldest is not None and oldest < now_ms - self.poll_interval_ms

    async def _process(self, lease: Lease, members: list[str]) -> int:
        items = await store.load_late(self.pool, members)
        found = {str(i.poll.id) for i in items}
        done = [m for m in members if m not in found]
        now = datetime.now(UTC)
        # Past its end a watch still gets the check it is owed (a tick skipped while live
        # polls were behind, Bakong silent at the end), within the grace.
        ends = {i.poll.id: times.to_ms(i.watch_until) + self.grace_ms for i in items}
        now_ms = times.to_ms(now)
        watching = [i for i in items if now_ms < ends[i.poll.id]]
        done += [str(i.poll.id) for i in items if now_ms >= ends[i.poll.id]]
        results = (
            await self.checker.check([i.poll for i in watching], now, late=True) if watching else {}
        )
        reschedule: list[tuple[str, int]] = []
        paid: list[LateItem] = []
        for item in watching:
            result = results.get(item.poll.id, NO_RESULT)
            if result.error is not ErrorKind.THROTTLED:
                MD5_CHECKS.labels(result.kind.value).inc()
            if result.kind is CheckKind.PAID:
                paid.append(item)
            elif (due := self._next_due(item, result, now_ms)) is not None:
                reschedule.append((str(item.poll.id), due))
            else:
                done.append(str(item.poll.id))
        retry = await self._record(paid, results, now)
        reschedule += [(str(i), now_ms + self.interval_ms) for i in retry]
        done += [str(i.poll.id) for i in paid if i.poll.id not in retry]
        await lease.finish(reschedule, done)
        return len(watching)

    def _next_due(self, item: LateItem, result: CheckResult, now_ms: int) -> int | None:
        """When to check again, or None once the watch is over: after a real answer at its
        end, or once the grace past its end is spent without one."""
        # Put off by the rate limit, paused by a 429 or an open circuit: a late turn later.
        wait_ms = max(self.interval_ms, times.seconds_to_ms(result.retry_after or 0))
        last_ms = times.to_ms(item.watch_until) - LAST_CHECK_LEAD_MS
        if now_ms + wait_ms < last_ms:
            return now_ms + wait_ms
        if now_ms < last_ms:
            return last_ms  # the last check, just before the QR stops being payable
        answered = result.kind in (CheckKind.NOT_FOUND, CheckKind.FAILED)
        give_up_ms = last_ms + LAST_CHECK_LEAD_MS + self.grace_ms
        if answered or now_ms >= give_up_ms:
            return None
        return min(now_ms + wait_ms, give_up_ms - 1)

    async def _record(
        self, paid: list[LateItem], results: dict[UUID, CheckResult], now: datetime
    ) -> set[UUID]:
        """Record the late payments found; returns the ids to check again (Postgres refused
        the row)."""
        if not paid:
            return set()
        metadata = await store.metadata_of(self.pool, [i.poll.id for i in paid])
        late = [
            LateTransition(
                transition(
                    i.poll,
                    decide(i.poll, results[i.poll.id], now, grace_s=0),
                    metadata.get(i.poll.id),
                    late_from=i.status,
                ),
                i.status,
            )
            for i in paid
        ]
        happened, refused = await write_isolated(partial(store.record_late, self.pool), late)
        for row, exc in refused:
            log.error(
                "could not record a late payment: %s", exc, extra={"jobId": str(row.transition.id)}
            )
        await self._announce(late, happened)
        return {row.transition.id for row, _ in refused}

    async def _announce(
        self, late: list[LateTransition], happened: list[tuple[UUID, str | None]]
    ) -> None:
        await announce(
            [x.transition for x in late],
            happened,
            lanes=self.lanes,
            on_deliveries=self.on_deliveries,
            events=self.events,
        )
        done = {job for job, _ in happened}
        for x in late:
            if x.transition.id in done:
                LATE_PAYMENTS.labels(x.transition.status.value, x.previous.value).inc()
                log.warning(
                    "late payment",
                    extra={
                        "jobId": str(x.transition.id),
                        "status": x.transition.status.value,
                        "previousStatus": x.previous.value,
                        "deliveryId": x.transition.delivery_id,
                    },
                )
