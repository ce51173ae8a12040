"""When to stop asking Bakong: a per-credential circuit breaker with exponential backoff (pure).

Times are `time.monotonic()` values passed in, so the rules are tested without a clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

RETRY_AFTER_MAX_S = 300.0


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """base, 2 base, 4 base, ... at most cap; `attempt` counts from 0."""
    return float(min(cap_s, base_s * 2 ** min(max(attempt, 0), 30)))


def retry_after_s(given: float | None, fallback_s: float) -> float:
    """How long to pause after a 429: Bakong's Retry-After if it gave one (clamped)."""
    if given is None:
        return fallback_s
    return min(max(given, 0.1), RETRY_AFTER_MAX_S)


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class Breaker:
    """One credential's breaker: opens after `threshold` failures in a row, probes when due.

    Closed: calls go out. Open: none do, until `open_until`. Half-open: one call (the probe)
    per tick; its success closes the breaker, its failure opens it again for twice as long.
    429s do not count as failures; they pause the credential for Retry-After instead, and
    consecutive 429s without Retry-After pause it for longer each time.
    """

    threshold: int = 5
    base_s: float = 3.0
    cap_s: float = 30.0
    failures: int = 0
    opened: int = 0
    open_until: float = 0.0
    throttled: int = 0

    def state(self, now: float) -> CircuitState:
        if self.failures < self.threshold:
            return CircuitState.CLOSED
        return CircuitState.OPEN if now < self.open_until else CircuitState.HALF_OPEN

    def allowed_calls(self, now: float) -> int | None:
        """How many calls may go out this tick: None for no limit."""
        state = self.state(now)
        if state is CircuitState.CLOSED:
            return None
        return 0 if state is CircuitState.OPEN else 1

    def wait_s(self, now: float) -> float:
        """Seconds until calls may go out again (0 when they may now)."""
        return max(0.0, self.open_until - now) if self.state(now) is CircuitState.OPEN else 0.0

    def success(self) -> None:
        self.failures = 0
        self.opened = 0
        self.open_until = 0.0
        self.throttled = 0

    def failure(self, now: float) -> bool:
        """Record a failed call; True when this failure opened (or re-opened) the breaker."""
        state = self.state(now)
        if state is CircuitState.OPEN:
            return False  # a call that was in flight when the breaker opened
        self.failures += 1
        if self.failures < self.threshold:
            return False
        self.open_until = now + backoff_s(self.opened, self.base_s, self.cap_s)
        self.opened += 1
        return True

    def rate_limited(self, retry_after: float | None) -> float:
        """Record a 429; returns how many seconds the credential should pause."""
        pause = retry_after_s(retry_after, backoff_s(self.throttled, self.base_s, self.cap_s))
        self.throttled += 1
        return pause
