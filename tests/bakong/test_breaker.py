"""When to stop asking Bakong: backoff timing, Retry-After, the circuit breaker (pure)."""

from __future__ import annotations

import pytest

from khqr_gateway.bakong.breaker import (
    RETRY_AFTER_MAX_S,
    Breaker,
    CircuitState,
    backoff_s,
    retry_after_s,
)


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff_s(n, 3, 30) for n in range(6)] == [3, 6, 12, 24, 30, 30]
    assert backoff_s(10_000, 3, 30) == 30, "no overflow however long Bakong stays down"


def test_retry_after_is_honoured_within_bounds() -> None:
    assert retry_after_s(7, fallback_s=3) == 7
    assert retry_after_s(None, fallback_s=3) == 3
    assert retry_after_s(86_400, fallback_s=3) == RETRY_AFTER_MAX_S
    assert retry_after_s(0, fallback_s=3) > 0, "Retry-After: 0 must not mean a hot loop"


def test_breaker_opens_after_threshold_failures_in_a_row() -> None:
    b = Breaker(threshold=3, base_s=1, cap_s=8)
    assert not b.failure(0) and not b.failure(0)
    assert b.allowed_calls(0) is None, "closed: no limit"
    assert b.failure(0), "the third failure opens it"
    assert b.state(0.5) is CircuitState.OPEN
    assert b.allowed_calls(0.5) == 0
    assert b.wait_s(0.5) == pytest.approx(0.5)


def test_a_success_before_the_threshold_resets_the_count() -> None:
    b = Breaker(threshold=3, base_s=1, cap_s=8)
    b.failure(0)
    b.failure(0)
    b.success()
    b.failure(0)
    b.failure(0)
    assert b.state(0) is CircuitState.CLOSED


def test_half_open_allows_one_probe_and_its_failure_doubles_the_wait() -> None:
    b = Breaker(threshold=2, base_s=1, cap_s=8)
    b.failure(0)
    b.failure(0)  # open until 1
    assert b.state(1.0) is CircuitState.HALF_OPEN
    assert b.allowed_calls(1.0) == 1, "one probe"
    assert b.failure(1.0), "the probe failed: open again"
    assert b.open_until == pytest.approx(3.0), "for twice as long"
    b.failure(3.0)
    assert b.open_until == pytest.approx(7.0)
    for t in (7.0, 15.0, 23.0):
        b.failure(t)
    assert b.open_until == pytest.approx(31.0), "capped at 8 s"


def test_failures_of_calls_in_flight_when_it_opened_do_not_extend_it() -> None:
    b = Breaker(threshold=2, base_s=1, cap_s=8)
    b.failure(0)
    b.failure(0)
    assert not b.failure(0.1)
    assert b.open_until == pytest.approx(1.0)


def test_a_successful_probe_closes_it() -> None:
    b = Breaker(threshold=2, base_s=1, cap_s=8)
    b.failure(0)
    b.failure(0)
    b.success()
    assert b.state(1.0) is CircuitState.CLOSED
    assert b.allowed_calls(1.0) is None


def test_429s_pause_for_retry_after_or_longer_each_time() -> None:
    b = Breaker(threshold=5, base_s=1, cap_s=8)
    assert b.rate_limited(4.0) == 4.0
    assert b.rate_limited(None) == 2.0, "no Retry-After: backoff, growing"
    assert b.rate_limited(None) == 4.0
    assert b.state(0) is CircuitState.CLOSED, "a 429 is not a failure of Bakong"
    b.success()
    assert b.rate_limited(None) == 1.0
