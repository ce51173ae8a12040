"""Tests for the webhook retry policy."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from khqr_gateway.deliveries.retry import (
    DEFAULT_SCHEDULE,
    AttemptVerdict,
    Decision,
    next_attempt,
    parse_schedule,
)

SCHEDULE = (5.0, 30.0, 120.0)
rands = st.floats(min_value=0, max_value=1, exclude_max=True)


def after(attempt: int, status: int | None, retry_after_s: float | None = None) -> Decision:
    return next_attempt(
        attempt=attempt, status=status, retry_after_s=retry_after_s, schedule=SCHEDULE, rand=0.5
    )


# next_attempt


def test_default_schedule_is_five_retries() -> None:
    assert DEFAULT_SCHEDULE == (5, 30, 120, 600, 3600)


def test_500_500_200_retries_with_growing_delays_then_delivers() -> None:
    first, second, third = after(1, 500), after(2, 500), after(3, 200)
    assert (first.verdict, second.verdict) == (AttemptVerdict.RETRY, AttemptVerdict.RETRY)
    assert first.delay_s is not None and second.delay_s is not None
    assert first.delay_s < second.delay_s
    assert third == Decision(AttemptVerdict.DELIVERED, None)


@pytest.mark.parametrize("status", [200, 201, 204, 299])
def test_any_2xx_is_delivered(status: int) -> None:
    assert after(1, status).verdict is AttemptVerdict.DELIVERED


def test_410_gives_up_at_once() -> None:
    assert after(1, 410) == Decision(AttemptVerdict.GIVE_UP, None)


@pytest.mark.parametrize("status", [None, 301, 302, 307, 308, 400, 404, 429, 500, 503, 100])
def test_other_answers_and_no_answer_retry(status: int | None) -> None:
    assert after(1, status) == Decision(AttemptVerdict.RETRY, 5.0)


def test_exhaustion_after_len_schedule_plus_one_attempts() -> None:
    verdicts = [after(attempt, 500).verdict for attempt in range(1, len(SCHEDULE) + 2)]
    assert verdicts == [AttemptVerdict.RETRY] * len(SCHEDULE) + [AttemptVerdict.GIVE_UP]
    assert after(len(SCHEDULE) + 5, 500).verdict is AttemptVerdict.GIVE_UP


def test_success_on_last_attempt_still_delivered() -> None:
    assert after(len(SCHEDULE) + 1, 200).verdict is AttemptVerdict.DELIVERED


def test_default_schedule_gives_six_attempts() -> None:
    decisions = [
        next_attempt(
            attempt=n, status=None, retry_after_s=None, schedule=DEFAULT_SCHEDULE, rand=0.5
        )
        for n in range(1, 7)
    ]
    assert [d.delay_s for d in decisions] == [5, 30, 120, 600, 3600, None]


def test_jitter_extremes() -> None:
    low = next_attempt(attempt=2, status=500, retry_after_s=None, schedule=SCHEDULE, rand=0.0)
    assert low.delay_s == pytest.approx(24.0)
    no_jitter = next_attempt(
        attempt=2, status=500, retry_after_s=None, schedule=SCHEDULE, rand=0.0, jitter=0
    )
    assert no_jitter.delay_s == 30.0


def test_attempt_must_be_one_based() -> None:
    with pytest.raises(ValueError, match="attempt"):
        after(0, 500)


@given(attempt=st.integers(1, len(DEFAULT_SCHEDULE)), rand=rands)
def test_jitter_within_twenty_percent(attempt: int, rand: float) -> None:
    base = DEFAULT_SCHEDULE[attempt - 1]
    decision = next_attempt(
        attempt=attempt, status=500, retry_after_s=None, schedule=DEFAULT_SCHEDULE, rand=rand
    )
    assert decision.verdict is AttemptVerdict.RETRY
    assert decision.delay_s is not None
    assert base * 0.8 <= decision.delay_s <= base * 1.2


@given(
    attempt=st.integers(1, len(DEFAULT_SCHEDULE)),
    rand=rands,
    retry_after=st.floats(min_value=0, max_value=1e9),
    status=st.sampled_from([429, 503]),
)
def test_retry_after_clamped_between_jittered_and_twice_base(
    attempt: int, rand: float, retry_after: float, status: int
) -> None:
    base = DEFAULT_SCHEDULE[attempt - 1]
    jittered = next_attempt(
        attempt=attempt, status=status, retry_after_s=None, schedule=DEFAULT_SCHEDULE, rand=rand
    ).delay_s
    honoured = next_attempt(
        attempt=attempt,
        status=status,
        retry_after_s=retry_after,
        schedule=DEFAULT_SCHEDULE,
        rand=rand,
    ).delay_s
    assert jittered is not None and honoured is not None
    assert jittered <= honoured <= 2 * base


def test_retry_after_honoured_for_429_and_503() -> None:
    assert after(2, 429, retry_after_s=45).delay_s == 45
    assert after(2, 503, retry_after_s=500).delay_s == 60  # clamped to 2 * base
    assert after(2, 503, retry_after_s=1).delay_s == 30  # never sooner than the schedule


def test_retry_after_ignored_for_500() -> None:
    assert after(2, 500, retry_after_s=45).delay_s == 30


def test_retry_after_nan_falls_back_to_schedule() -> None:
    assert after(2, 429, retry_after_s=float("nan")).delay_s == 30


# parse_schedule


def test_parse_schedule() -> None:
    assert parse_schedule("5,30,120") == (5.0, 30.0, 120.0)
    assert parse_schedule(" 1.5 , 604800 ") == (1.5, 604800.0)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        ("  ", "empty"),
        ("5,abc,10", r"item 2 \('abc'\) is not a number"),
        ("5,,10", r"item 2 \(''\) is not a number"),
        ("0", r"item 1 \('0'\) must be > 0"),
        ("5,-1", r"item 2 \('-1'\) must be > 0"),
        ("604801", "<= 604800 seconds"),
        ("nan", "must be > 0"),
        ("inf", "must be > 0"),
        (",".join(["1"] * 21), "21 items, at most 20"),
    ],
)
def test_parse_schedule_errors(value: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_schedule(value)


def test_parse_schedule_accepts_twenty_items() -> None:
    assert len(parse_schedule(",".join(["1"] * 20))) == 20
