"""The API's error shape `{"error": {"code", "message", "details"}}`, raised and answered."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from marshmallow import Schema, fields

from khqr_gateway.http.json import json_response


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


def invalid(field: str, message: str) -> ApiError:
    """A 422 that names one field of the request."""
    return ApiError(
        422, "validation_error", "some fields are not valid", [{"field": field, "message": message}]
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


class ErrorDetailSchema(Schema):
    code = fields.String(required=True)
    message = fields.String(required=True)
    details = fields.Raw(allow_none=True)


class ErrorSchema(Schema):
    error = fields.Nested(ErrorDetailSchema, required=True)
