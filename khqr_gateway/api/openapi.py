"""OpenAPI 3.0.3 at /openapi.json and the offline Swagger UI at /reference (aiohttp-apigami).

aiohttp-apispec, the design card's first choice, fails on import with marshmallow 4, emits
only Swagger 2.0 and breaks on Python 3.12+; aiohttp-apigami is its maintained successor.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp_apigami import OpenApiVersion, setup_aiohttp_apispec
from aiohttp_apigami.constants import SWAGGER_DICT

from khqr_gateway import __version__
from khqr_gateway.api.schemas import ErrorSchema

ERROR = {"schema": ErrorSchema}
ERROR_REF = {"$ref": "#/components/schemas/Error"}
# Answered by the middlewares whatever the route, so every /api/ operation can answer them.
API_ERRORS = (401, 429, 503)
# Answered while the body is read (read_json, aiohttp's size limit), before any validation.
BODY_ERRORS = (400, 408, 413, 415)


def errors(*codes: int) -> dict[int, dict[str, Any]]:
    """Response entries for the error codes a route can answer, all in the error shape."""
    described = {
        400: "The body is not valid JSON",
        401: "A valid API key is required",
        404: "Not found",
        408: "The body took too long to arrive",
        409: "Conflict with the current state",
        413: "The body is larger than 64 KB",
        415: "The body is not application/json",
        422: "Some fields are not valid; details lists each",
        429: "More than API_RATE_LIMIT requests a second with this API key; see Retry-After",
        503: "Postgres or Redis is unavailable; nothing was lost, retry after Retry-After",
    }
    return {code: {"description": described.get(code, "Error"), **ERROR} for code in codes}


def _strip_produces(node: Any) -> None:
    # apigami's @docs adds Swagger 2.0's `produces`, which OpenAPI 3 validators reject.
    if isinstance(node, dict):
        node.pop("produces", None)
        node.pop("consumes", None)
        for value in node.values():
            _strip_produces(value)
    elif isinstance(node, list):
        for value in node:
            _strip_produces(value)


def _add_errors(operation: dict[str, Any], codes: tuple[int, ...]) -> None:
    """Document `codes` in the error shape where the route's own docs do not say otherwise."""
    responses = operation.setdefault("responses", {})
    for code in codes:
        if code not in responses and str(code) not in responses:
            described = errors(code)[code]["description"]
            responses[str(code)] = {
                "description": described,
                "content": {"application/json": {"schema": ERROR_REF}},
            }


async def _finish_spec(app: web.Application) -> None:
    spec = app[SWAGGER_DICT]
    _strip_produces(spec)
    components = spec.setdefault("components", {})
    components["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "API_KEY"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
    }
    for path, operations in spec.get("paths", {}).items():
        for operation in operations.values():
            if not isinstance(operation, dict):
                continue
            if "requestBody" in operation:
                _add_errors(operation, BODY_ERRORS)
            if path.startswith("/api/"):
                operation.setdefault("security", [{"bearer": []}, {"apiKey": []}])
                _add_errors(operation, API_ERRORS)


def setup_openapi(app: web.Application) -> None:
    """Serve the spec and the docs UI; call after every documented route is added."""
    setup_aiohttp_apispec(
        app,
        title="khqr-gateway",
        version=__version__,
        url="/openapi.json",
        swagger_path="/reference",
        static_path="/reference/static",
        openapi_version=OpenApiVersion.V303,
        info={
            "description": "Watches Bakong KHQR payments and sends signed webhooks when they "
            "succeed, fail or time out."
        },
    )
    app.on_startup.append(_finish_spec)
