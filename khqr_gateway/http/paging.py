"""Pages of a list: the newest-first cursors the API hands out, and the page it answers."""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar
from uuid import UUID

import orjson
from aiohttp import web
from marshmallow import Schema, fields

from khqr_gateway.http.errors import invalid
from khqr_gateway.http.fields import CURSOR_ERROR
from khqr_gateway.http.json import json_response


class Positioned(Protocol):
    """A row of a newest-first list: its place is its (created_at, id)."""

    @property
    def created_at(self) -> datetime: ...

    @property
    def id(self) -> UUID | str: ...


def encode_cursor(created_at: datetime, row_id: UUID | str) -> str:
    """The position after a row in a newest-first page: its (created_at, id)."""
    raw = orjson.dumps([created_at.isoformat(), str(row_id)])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def row_cursor(row: Positioned) -> str:
    """The cursor after a row of a newest-first page."""
    return encode_cursor(row.created_at, row.id)


def cursor_position(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) of encode_cursor; 422 for anything else, however it was made."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, row_id = orjson.loads(raw)
        if not isinstance(created, str) or not isinstance(row_id, str) or "\x00" in row_id:
            raise ValueError(cursor)
        at = datetime.fromisoformat(created)
        # Aware and in UTC, so that no offset can push it out of the driver's range.
        return (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC), row_id
    except (ValueError, TypeError, OverflowError, orjson.JSONDecodeError):
        raise invalid("cursor", CURSOR_ERROR) from None


def decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    """cursor_position, for a list whose ids are UUIDs."""
    created, row_id = cursor_position(cursor)
    try:
        return created, UUID(row_id)
    except ValueError:
        raise invalid("cursor", CURSOR_ERROR) from None


Row = TypeVar("Row")


def page_schema(item: type[Schema]) -> type[Schema]:
    """The schema of page_response's body for a list of `item`s: TransactionSchema's page is
    TransactionPageSchema (its name in /openapi.json: TransactionPage)."""
    page = {
        "data": fields.List(fields.Nested(item)),
        "nextCursor": fields.String(allow_none=True),
        "hasMore": fields.Boolean(),
    }
    return Schema.from_dict(page, name=item.__name__.removesuffix("Schema") + "PageSchema")


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
