"""Group commit of new transactions: the creates waiting together share one INSERT and one ZADD."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import asyncpg
from redis.exceptions import RedisError

from khqr_gateway.infra.schedule import Schedule
from khqr_gateway.times import now_ms, seconds_to_ms, to_ms
from khqr_gateway.transactions import store
from khqr_gateway.transactions.store import CreatedRow, NewTransaction

log = logging.getLogger(__name__)

# Rows in one INSERT at most.
MAX_BATCH = 200
# Statements in flight at once; what arrives meanwhile waits and goes in the next, bigger one.
# Below the pool's size, so that polling and delivery still get connections under ingest.
MAX_IN_FLIGHT = 4
# Errors one row can cause (a bad value, a deadlock with another writer): the batch is then
# written row by row, so that only that row's request hears it.
_ROW_ERRORS = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.TransactionRollbackError,
)

# The row and whether it is new; a row not new is the md5's whole TransactionRow.
Created = tuple[CreatedRow, bool]


@dataclass(slots=True)
class _Waiter:
    new: NewTransaction
    future: asyncio.Future[Created]


class Ingest:
    """Inserts the pending transactions of concurrent requests in batches.

    A request's row waits only until the event loop has run once more, so that requests that
    arrive together are written together: one `INSERT ... SELECT FROM unnest(...)` whose
    RETURNING gives the new rows, then one ZADD of their first polls. An md5 already tracked,
    or repeated within the batch, goes the row-by-row way (`insert_or_get`) and gets the md5's
    transaction, whatever its status. Each request then hears what it would have heard alone:
    its row and whether it is new, or the error of Postgres (for the whole batch) or of Redis (for
    the new rows only, which are durable in Postgres by then; the reconcile tick schedules
    them).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        polls: Schedule,
        *,
        interval_s: float,
        max_batch: int = MAX_BATCH,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self.pool = pool
        self.polls = polls
        self.interval_s = interval_s
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._queue: list[_Waiter] = []
        self._armed = False
        self._writing: set[asyncio.Task[None]] = set()

    async def create(self, new: NewTransaction) -> Created:
        """Insert `new`, or find the transaction of its md5 (one md5 is one payment): the row
        and whether it is new. A new row is durable and its first poll scheduled on return."""
        future: asyncio.Future[Created] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiter(new, future))
        self._arm()
        # A cancelled request cancels only its wait: its row is written all the same.
        return await future

    def _arm(self) -> None:
        if not self._armed and len(self._writing) < self.max_in_flight:
            self._armed = True
            asyncio.get_running_loop().call_soon(self._start)

    def _start(self) -> None:
        self._armed = False
        while self._queue and len(self._writing) < self.max_in_flight:
            batch = self._queue[: self.max_batch]
            del self._queue[: self.max_batch]
            task = asyncio.create_task(self._write(batch), name="khqr-ingest")
            self._writing.add(task)
            task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[None]) -> None:
        self._writing.discard(task)
        if self._queue:
            self._arm()

    async def _write(self, batch: list[_Waiter]) -> None:
        try:
            outcomes = await self._insert(batch)
            await self._schedule(outcomes)
        except BaseException as exc:
            for waiter in batch:
                _settle(waiter, exc)
            if not isinstance(exc, Exception):
                raise
            return
        for waiter, outcome in outcomes:
            _settle(waiter, outcome)

    async def _insert(self, batch: list[_Waiter]) -> list[tuple[_Waiter, Created | BaseException]]:
        # One md5 is one payment of one app: the same md5 in two apps is two rows.
        first: dict[tuple[str, str], _Waiter] = {}
        others: list[_Waiter] = []
        for waiter in batch:
            payment = (waiter.new.app_id, waiter.new.md5)
            if payment in first:
                others.append(waiter)
            else:
                first[payment] = waiter
        by_id = {w.new.id: w for w in first.values()}
        try:
            rows = await store.insert_pending(self.pool, [w.new for w in first.values()])
        except _ROW_ERRORS:
            rows = []
            others = batch
        else:
            inserted = {row.id for row in rows}
            others += [w for w in first.values() if w.new.id not in inserted]
        outcomes: list[tuple[_Waiter, Created | BaseException]] = [
            (by_id[row.id], (row, True)) for row in rows
        ]
        # After the batch has committed: what conflicted finds its md5's row (200).
        alone = await asyncio.gather(
            *(store.insert_or_get(self.pool, w.new) for w in others),
            return_exceptions=True,
        )
        outcomes += zip(others, alone, strict=True)
        return outcomes

    async def _schedule(self, outcomes: list[tuple[_Waiter, Created | BaseException]]) -> None:
        """The first poll of every new row, one interval from now (or at its deadline)."""
        new = [o[0] for _, o in outcomes if not isinstance(o, BaseException) and o[1]]
        if not new:
            return
        due_ms = now_ms() + seconds_to_ms(self.interval_s)
        try:
            await self.polls.add([(str(r.id), min(due_ms, to_ms(r.deadline_at))) for r in new])
        except RedisError as exc:
            # Postgres has them and the reconcile tick schedules them when Redis is back; the
            # clients still hear 503, and a retry gets the same transaction (200).
            log.warning("redis down: first polls of %d left to reconcile", len(new))
            for i, (waiter, outcome) in enumerate(outcomes):
                if not isinstance(outcome, BaseException) and outcome[1]:
                    outcomes[i] = (waiter, exc)


def _settle(waiter: _Waiter, outcome: Created | BaseException) -> None:
    if waiter.future.done():  # its request was cancelled
        return
    if isinstance(outcome, asyncio.CancelledError):
        waiter.future.cancel()
    elif isinstance(outcome, BaseException):
        waiter.future.set_exception(outcome)
    else:
        waiter.future.set_result(outcome)
