"""BAKONG_MAX_RPS spent by need when md5s are checked one call each (list endpoint refused)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from khqr_gateway.bakong.client import MAX_BATCH
from khqr_gateway.transactions import store
from khqr_gateway.transactions.model import PollItem

log = logging.getLogger(__name__)

# Customers pay within a minute or two of seeing a QR, most of them early: md5s this young
# are checked first. Wider, the young alone would take the whole rate at 1,000 pending.
YOUNG_S = 30.0
# However many are pending, a young md5 is asked at least every 2 intervals and an older one
# every 15 but at most 45 s apart (within a minute, with room for a turn in the rate limit's
# line), while the rate allows it at all.
YOUNG_MAX_INTERVALS = 2
OLD_MAX_INTERVALS = 15
OLD_MAX_S = 45.0
# Of the rate: the rest is for token renewals, retries after them and the late watch.
USE = 0.95
# Final checks of the next minute are counted as a rate of their own, taken first.
ENDING_S = 60.0


@dataclass(frozen=True, slots=True)
class Demand:
    """What checking every pending md5 takes: md5s checked one call each, young and older;
    final checks a second (one call each, whatever the mode); list calls a second of the
    credentials whose list endpoint works."""

    young: int
    old: int
    finals_per_s: float = 0.0
    lists_per_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Cadence:
    """Seconds between two checks of a young md5, and of an older one."""

    young_s: float
    old_s: float


def young(item: PollItem, now: datetime) -> bool:
    """Created less than YOUNG_S ago (or when, unknown: treated as young)."""
    return item.created_at is None or now - item.created_at < timedelta(seconds=YOUNG_S)


def _stretch(count: int, calls_per_s: float, low: float, high: float) -> float:
    """The gap that lets `count` md5s share `calls_per_s`, kept within [low, high]."""
    if count == 0:
        return low
    if calls_per_s <= 0:
        return high
    return min(high, max(low, count / calls_per_s))


def cadence(demand: Demand, rate: float, interval_s: float) -> Cadence:
    """The shortest gaps that fit the rate, given up in order of need: older md5s slow down
    first (to OLD_MAX_S), then young ones (to YOUNG_MAX_INTERVALS), then all alike, so that
    no md5 starves. Final checks and list calls are taken off the rate first."""
    budget = rate * USE - demand.finals_per_s - demand.lists_per_s
    young_max = YOUNG_MAX_INTERVALS * interval_s
    old_max = max(interval_s, min(OLD_MAX_S, OLD_MAX_INTERVALS * interval_s))

    def need(young_s: float, old_s: float) -> float:
        return demand.young / young_s + demand.old / old_s

    old_s = _stretch(demand.old, budget - demand.young / interval_s, interval_s, old_max)
    if need(interval_s, old_s) <= budget:
        return Cadence(interval_s, old_s)
    young_s = _stretch(demand.young, budget - demand.old / old_max, interval_s, young_max)
    if need(young_s, old_max) <= budget:
        return Cadence(young_s, old_max)
    # More pending than the rate can check at these gaps: stretched alike, the limiter's
    # queue (store/ratelimit.py) then keeps any excess fair.
    factor = need(young_max, old_max) / max(budget, 0.1 * rate)
    return Cadence(young_max * factor, old_max * factor)


class Budget:
    """The cadence of md5s checked one call each, from counts that every process reads
    from Postgres alike (at most every few seconds, and only while some list endpoint is
    refused), so that all processes together fit the shared rate limit."""

    def __init__(self, pool: asyncpg.Pool, *, rate: float, interval_s: float) -> None:
        self.pool = pool
        self.rate = rate
        self.interval_s = interval_s
        self.refresh_s = min(5.0, max(1.0, interval_s))
        self.demand: Demand | None = None
        self.cadence: Cadence | None = None
        self._read_at = -math.inf
        self._reading = asyncio.Lock()

    def gap_s(self, item: PollItem, now: datetime) -> float:
        """Seconds from one check of an md5 checked one call each to its next."""
        if self.cadence is None:
            return self.interval_s
        return self.cadence.young_s if young(item, now) else self.cadence.old_s

    def clear(self) -> None:
        """Every list endpoint works again: back to one interval for all."""
        self.demand = self.cadence = None
        self._read_at = -math.inf

    async def refresh(self, single: Iterable[int | None], default_id: int | None) -> None:
        """Count again if the last count is older than `refresh_s`; one read at a time."""
        if time.monotonic() - self._read_at < self.refresh_s or self._reading.locked():
            return
        async with self._reading:
            self._read_at = time.monotonic()
            try:
                self.demand = await self._count([c for c in single if c is not None], default_id)
            except Exception as exc:  # the last cadence holds; checks go on meanwhile
                log.warning("could not count pending md5s for the Bakong budget: %s", exc)
                return
            self.cadence = cadence(self.demand, self.rate, self.interval_s)

    async def _count(self, single: list[int], default_id: int | None) -> Demand:
        row = await store.pending_demand(
            self.pool,
            single=single,
            default_id=default_id,
            young_s=YOUNG_S,
            ending_s=ENDING_S,
            batch=MAX_BATCH,
        )
        return Demand(
            young=row.young,
            old=row.old,
            finals_per_s=row.ending / ENDING_S,
            lists_per_s=row.lists / self.interval_s,
        )

    def summary(self) -> dict[str, Any] | None:
        """The counts and gaps in use, for /api/v1/stats and /ready."""
        if self.demand is None or self.cadence is None:
            return None
        return {
            "maxRps": self.rate,
            "young": self.demand.young,
            "old": self.demand.old,
            "youngGapS": round(self.cadence.young_s, 2),
            "oldGapS": round(self.cadence.old_s, 2),
        }
