"""Time as the gateway keeps it: epoch milliseconds in Redis scores, aware UTC datetimes
elsewhere, and the delays an HTTP peer asks for (pure)."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def now_ms() -> int:
    """The wall clock in epoch milliseconds, as schedule scores and KHQR timestamps hold it."""
    return int(time.time() * 1000)


def to_ms(moment: datetime) -> int:
    """An aware datetime as epoch milliseconds."""
    return int(moment.timestamp() * 1000)


def from_ms(ms: float) -> datetime:
    """Epoch milliseconds as an aware UTC datetime."""
    return datetime.fromtimestamp(ms / 1000, UTC)


def seconds_to_ms(seconds: float) -> int:
    """A duration in seconds as whole milliseconds (truncated, as every score is)."""
    return int(seconds * 1000)
