"""The one Retry-After parser (RFC 9110), shared by the webhook sender and the Bakong client."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from khqr_gateway.times import parse_retry_after

NOW = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT


@pytest.mark.parametrize(("value", "expected"), [("120", 120.0), (" 0 ", 0.0), ("7", 7.0)])
def test_delay_seconds(value: str, expected: float) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_an_http_date_is_the_wait_until_it() -> None:
    when = datetime.fromtimestamp(NOW + 90, tz=UTC)
    assert parse_retry_after(format_datetime(when, usegmt=True), NOW) == pytest.approx(90)
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:50 GMT", NOW) == 30.0


def test_the_obsolete_date_forms_are_read_as_gmt() -> None:
    assert parse_retry_after("Tuesday, 14-Nov-23 22:13:50 GMT", NOW) == 30.0
    assert parse_retry_after("Tue Nov 14 22:13:50 2023", NOW) == 30.0, "asctime: no zone"


@pytest.mark.parametrize(
    "value",
    [None, "", "soon", "-5", "1.5", "١٢", "Tue, 14 Nov 2023 22:12:00 GMT", "Mon, 99 Foo 2023"],
)
def test_unusable_values_name_no_wait(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None


def test_now_defaults_to_the_clock() -> None:
    now = datetime.now(UTC)
    assert parse_retry_after("120") == 120
    when = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(when) == pytest.approx(30, abs=1.5)
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
