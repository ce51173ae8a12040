"""Time as the gateway keeps it: epoch milliseconds in Redis scores, aware UTC datetimes
elsewhere, and the delays an HTTP peer asks for (pure)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


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


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After field value, or None when it names no usable wait.

    RFC 9110 section 10.2.3: ``Retry-After = HTTP-date / delay-seconds``.
    - ``delay-seconds`` is ``1*DIGIT``: ASCII digits only. A sign, a fraction, an exponent
      or another script's digits make the value invalid, and an invalid field is ignored.
    - ``HTTP-date`` (section 5.6.7) is always GMT, and recipients must accept the obsolete
      RFC 850 and asctime forms; asctime (or a ``-0000`` zone) parses without a zone and is
      read as GMT.
    - The RFC says nothing of a date already past. It comes from a sender whose clock is
      behind ours, so it names no wait we can trust: None, and the caller's own backoff
      applies rather than an immediate retry.
    ``now`` is epoch seconds (the clock when not given).
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    return _seconds_until_http_date(value, time.time() if now is None else now)


def _seconds_until_http_date(value: str, now: float) -> float | None:
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delay = when.timestamp() - now
    return delay if delay >= 0 else None
