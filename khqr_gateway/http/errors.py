"""The API's error shape `{"error": {"code", "message", "details"}}` and JSON helpers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar
from uuid import UUID

import orjson
from aiohttp import web


class ApiError(Exception):
    """An error answered to the client as JSON with its HTTP status."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers


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


Row = TypeVar("Row")


def page_response(
    rows: Sequence[Row],
    limit: int,
    item_json: Callable[[Row], Any],
    cursor_after: Callable[[Row], str],
) -> web.Response:
    """One page of a list: `rows` holds up to `limit` + 1 rows, the extra one only there to
    say that more follow (and the cursor is then the position after the last row shown)."""
    more = len(rows) > limit
    shown = rows[:limit]
    cursor = cursor_after(shown[-1]) if more and shown else None
    return json_response(
        {"data": [item_json(r) for r in shown], "nextCursor": cursor, "hasMore": more}
    )


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


def error_response(
    status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> web.Response:
    return json_response(error_body(code, message, details), status, headers)


def field_errors(messages: Any, prefix: str = "") -> list[dict[str, str]]:
    """Flatten marshmallow's nested error dict into `[{"field", "message"}]`."""
    out: list[dict[str, str]] = []
    if isinstance(messages, dict):
        for key, value in messages.items():
            name = prefix if key == "_schema" else (f"{prefix}.{key}" if prefix else str(key))
            out += field_errors(value, name)
    elif isinstance(messages, list):
        for item in messages:
            out += (
                field_errors(item, prefix)
                if isinstance(item, dict | list)
                else [{"field": prefix or "body", "message": str(item)}]
            )
    else:
        out.append({"field": prefix or "body", "message": str(messages)})
    return out
