"""Webhook retry policy: when to retry a delivery, when to give up, how long to wait."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

DEFAULT_SCHEDULE: tuple[float, ...] = (5, 30, 120, 600, 3600)
MAX_DELAY_S = 7 * 24 * 3600.0
MAX_SCHEDULE_ITEMS = 20
# Statuses whose Retry-After means "come back later"; on other answers it is noise.
RETRY_AFTER_STATUSES = frozenset({429, 503})
GONE = 410


class AttemptVerdict(StrEnum):
    """What becomes of a delivery after an attempt."""

    DELIVERED = "delivered"
    RETRY = "retry"
    GIVE_UP = "give_up"


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on an attempt; ``delay_s`` is set only for RETRY."""

    verdict: AttemptVerdict
    delay_s: float | None = None


def parse_schedule(value: str) -> tuple[float, ...]:
    """Parse WEBHOOK_RETRY_SCHEDULE, e.g. ``"5,30,120"``, into delays in seconds."""
    items = [item.strip() for item in value.split(",")]
    if items == [""]:
        raise ValueError("retry schedule is empty")
    if len(items) > MAX_SCHEDULE_ITEMS:
        raise ValueError(f"retry schedule has {len(items)} items, at most {MAX_SCHEDULE_ITEMS}")
    return tuple(_parse_delay(item, index) for index, item in enumerate(items, start=1))


def _parse_delay(item: str, index: int) -> float:
    try:
        delay = float(item)
    except ValueError:
        raise ValueError(f"retry schedule item {index} ({item!r}) is not a number") from None
    # The comparison also rejects nan, which float() accepts.
    if not 0 < delay <= MAX_DELAY_S:
        raise ValueError(
            f"retry schedule item {index} ({item!r}) must be > 0 and <= {MAX_DELAY_S:g} seconds"
        )
    return delay


def next_attempt(
    *,
    attempt: int,
    status: int | None,
    retry_after_s: float | None,
    schedule: Sequence[float],
    rand: float,
    jitter: float = 0.2,
) -> Decision:
    """What follows attempt number ``attempt`` (1-based) that got ``status``.

    ``status`` is None when no HTTP answer came back (timeout, connection error).
    ``rand`` is a uniform draw in [0, 1) supplied by the caller so this stays pure.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    if status is not None and 200 <= status < 300:
        return Decision(AttemptVerdict.DELIVERED)
    # 410 Gone is the receiver saying the endpoint is retired for good.
    if status == GONE or attempt > len(schedule):
        return Decision(AttemptVerdict.GIVE_UP)
    base = schedule[attempt - 1]
    delay = _jittered(base, rand, jitter)
    if status in RETRY_AFTER_STATUSES and retry_after_s is not None:
        delay = _clamp_retry_after(retry_after_s, delay, base)
    return Decision(AttemptVerdict.RETRY, delay)


def _jittered(base: float, rand: float, jitter: float) -> float:
    # Spreads retries of deliveries that failed together, so they do not return together.
    return base * (1 + jitter * (2 * rand - 1))


def _clamp_retry_after(retry_after_s: float, jittered: float, base: float) -> float:
    # Never sooner than our own schedule (a receiver cannot make us hammer it), and at most
    # twice it (a receiver cannot park a delivery for days with one header).
    if math.isnan(retry_after_s):
        return jittered
    return min(max(retry_after_s, jittered), 2 * base)
