"""What a request brings, read and checked: its JSON body, its query string, its jobId.

A body is read in bounded time; a body or a query is loaded by a schema, every error named by
its field.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import orjson
from aiohttp import web
from marshmallow import Schema, ValidationError

from khqr_gateway.apps.model import OPEN, Caller
from khqr_gateway.http import CALLER
from khqr_gateway.http.errors import ApiError, field_errors
from khqr_gateway.http.fields import LONG_DIGITS, walk_json

BODY_LIMIT = 64 * 1024
JSON_TYPES = ("application/json",)
BODY_READ_TIMEOUT_S = 10.0
# The standard parser, which keeps such integers exact, recurses: deeper bodies are not
# read again (every schema refuses nesting this deep, metadata past METADATA_MAX_DEPTH).
EXACT_READ_MAX_DEPTH = 100
NUL_MESSAGE = "must not contain the NUL character (U+0000)"


async def read_json(request: web.Request) -> tuple[bytes, Any]:
    """The raw body and its JSON; 415 for another content type, 400 for bad JSON."""
    if request.content_type not in JSON_TYPES and not request.content_type.endswith("+json"):
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    raw = await _body(request)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    return raw, _exact_integers(raw, body)


def _exact_integers(raw: bytes, body: Any) -> Any:
    """`body` with every integer as written, for validators to hold to 64 bits. The rare
    body with a long run of digits is read again by the standard parser, which agrees with
    orjson on everything orjson accepts but such integers."""
    if LONG_DIGITS.search(raw) is None:
        return body
    if max(depth for _, depth, _ in walk_json(body)) > EXACT_READ_MAX_DEPTH:
        return body
    return json.loads(raw)


async def _body(request: web.Request) -> bytes:
    if request.content.is_eof():
        # All of it has arrived already (the usual case): no timer to arm.
        return await request.read()
    try:
        async with asyncio.timeout(BODY_READ_TIMEOUT_S):
            return await request.read()
    except TimeoutError:
        # A client that trickles its body would hold a connection forever.
        raise ApiError(408, "request_timeout", "the body took too long to arrive") from None


def _nul_fields(value: Any) -> Iterator[str]:
    """The fields of `value` that hold U+0000, which Postgres text (and jsonb, once read as
    text) cannot store: refused here rather than failing in the database as a 500. A loop,
    not recursion: orjson reads nesting deeper than Python's recursion limit."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        name, item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                yield name or "body"
        elif isinstance(item, dict):
            for key, child in item.items():
                if "\x00" in str(key):
                    yield name or "body"
                else:
                    stack.append((f"{name}.{key}" if name else str(key), child))
        elif isinstance(item, list):
            stack.extend((name, child) for child in item)


def load(schema: Schema, data: Any) -> dict[str, Any]:
    """`data` loaded by `schema`; 422 listing every field that is not valid."""
    if not isinstance(data, dict):
        raise ApiError(422, "validation_error", "the body must be a JSON object")
    nul = sorted(set(_nul_fields(data)))
    if nul:
        details = [{"field": field, "message": NUL_MESSAGE} for field in nul]
        raise ApiError(422, "validation_error", "some fields are not valid", details)
    try:
        loaded: dict[str, Any] = schema.load(data)
    except ValidationError as exc:
        raise ApiError(
            422, "validation_error", "some fields are not valid", field_errors(exc.messages)
        ) from None
    return loaded


def load_query(request: web.Request, schema: Schema) -> dict[str, Any]:
    """The query string loaded by `schema`."""
    return load(schema, dict(request.query))


async def load_body(request: web.Request, schema: Schema) -> dict[str, Any]:
    """The JSON body loaded by `schema`."""
    _, body = await read_json(request)
    return load(schema, body)


def job_id_of(request: web.Request) -> UUID:
    """The {jobId} of the path; 404 for one that is no UUID, as for an unknown one."""
    try:
        return UUID(request.match_info["jobId"])
    except ValueError:
        raise ApiError(404, "not_found", "no transaction with this jobId") from None


def caller_of(request: web.Request) -> Caller:
    """Who an /api/ request acts for, as the auth middleware found it."""
    caller: Caller = request.get(CALLER, OPEN)
    return caller


def app_of(request: web.Request) -> str:
    """The id of the app an /api/ request acts for."""
    return caller_of(request).app_id
