"""JSON out: how the API writes values and times, and its JSON responses."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import orjson
from aiohttp import web


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, UUID):
        return str(value)
    raise TypeError


def iso(value: datetime | None) -> str | None:
    """UTC ISO 8601 with milliseconds and a Z, as JavaScript's toISOString writes it."""
    if value is None:
        return None
    if value.tzinfo is not UTC:  # what Postgres gives is UTC already
        value = value.astimezone(UTC)
    # orjson writes it in C, a third of isoformat(timespec=...)'s time: a list page has 300.
    # It writes microseconds, or no fraction at all when there are none.
    text = orjson.dumps(value, option=orjson.OPT_UTC_Z)
    if len(text) == 22:  # "YYYY-MM-DDTHH:MM:SSZ" quoted
        return text[1:20].decode() + ".000Z"
    return text[1:24].decode() + "Z"


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_default, option=orjson.OPT_UTC_Z)


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=dumps(body), status=status, content_type="application/json", headers=headers
    )
