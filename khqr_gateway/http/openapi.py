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
from khqr_gateway.http.errors import ErrorSchema

ERROR = {"schema": ErrorSchema}
ERROR_REF = {"$ref": "#/components/schemas/Error"}
# Answered by the middlewares whatever the route, so every /api/ operation can answer them.
API_ERRORS = (401, 429, 503)
# Where links() keeps a handler's links until the spec is built.
LINKS = "x-links"
# Answered while the body is read (read_json, aiohttp's size limit), before any validation.
BODY_ERRORS = (400, 408, 413, 415)


def errors(*codes: int) -> dict[int, dict[str, Any]]:
    """Response entries for the error codes a route can answer, all in the error shape."""
    described = {
        400: "The body is not valid JSON",
        401: "A valid API key is required",
        403: "Only an admin key (ADMIN_API_KEY) may call this",
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


def links(by_code: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """`@docs(**links({201: {name: link}}))`: OpenAPI links of a handler's answers, which
    apigami's response decorator has no room for; moved into place once the spec is built."""
    return {LINKS: by_code}


def operation_ref(path: str, method: str) -> str:
    """The operationRef of a link to the operation at `path`."""
    return "#/paths/" + path.replace("~", "~0").replace("/", "~1") + "/" + method


def _place_links(operation: dict[str, Any]) -> None:
    for code, links in operation.pop(LINKS, {}).items():
        operation.setdefault("responses", {}).setdefault(str(code), {})["links"] = links


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


# The order of /reference: the v1 API first, what receivers and operators need after it.
TAGS = (
    ("transactions", "Track a payment by md5 (or KHQR), read it, cancel it, follow it live."),
    ("khqr", "Make a dynamic KHQR for an amount, and track it."),
    (
        "deliveries",
        "Webhook deliveries and their attempts; send again. The body sent is "
        "`WebhookBody` (under Schemas), with the headers described at the top.",
    ),
    ("credentials", "Bakong tokens and emails the gateway checks payments with."),
    (
        "apps",
        "Apps (tenants), their API keys and webhook secrets: an admin key's (ADMIN_API_KEY); "
        "`GET /api/v1/app` is every caller's own.",
    ),
    ("payment page", "The hosted payment page and the checkout script."),
    ("compatibility", "The routes of rachhen/khqr-webhook, unchanged."),
    ("operations", "Health, readiness, metrics, figures, the dashboard."),
)
WEBHOOK_DESCRIPTION = """

## Webhooks

When a transaction ends the gateway POSTs `WebhookBody` (see Schemas) to its `webhookUrl`,
`content-type: application/json`, and retries until the receiver answers 2xx (410 stops
retries; redirects are not followed). Headers:

- `webhook-id`: the same on every retry of one delivery: dedupe on it.
- `webhook-timestamp`: unix seconds of this attempt.
- `webhook-signature` (with `WEBHOOK_SECRET`): Standard Webhooks, `v1,` + base64
  HMAC-SHA256 of `id.timestamp.body`. Verify this one, and refuse a timestamp more than
  5 minutes away.
- `x-webhook-signature` (with `WEBHOOK_SECRET`): `sha256=` + hex HMAC-SHA256 of the body
  only, for simple receivers. It covers no id or time, so a captured request can be
  replayed: prefer `webhook-signature`.
"""
_STATUS_REASONS = (
    "Why, for every status but success: failed `transaction_failed`; timeout `not_paid` "
    "(the final check at the deadline found nothing), `bakong_unreachable` or "
    "`bakong_unauthorized` (Bakong gave no answer through the deadline and its grace); "
    "mismatch each field that differs, `; `-separated, e.g. `amount: expected 5, got 4`."
)
WEBHOOK_BODY: dict[str, Any] = {
    "type": "object",
    "description": "The body of the webhook POSTed to `webhookUrl` (that of "
    "rachhen/khqr-webhook, plus `reason`, `metadata` and the late-payment fields). The "
    "exact bytes signed are the bytes sent.",
    "required": ["status", "data", "md5", "jobId"],
    "properties": {
        "status": {"type": "string", "enum": ["success", "failed", "timeout", "mismatch"]},
        "late": {
            "type": "boolean",
            "description": "Present (true) on a payment found after a timeout or a cancel: "
            "one more webhook, with its own webhook-id",
        },
        "previousStatus": {
            "type": "string",
            "enum": ["timeout", "cancelled"],
            "description": "With `late`: what the transaction was before",
        },
        "data": {
            "allOf": [{"$ref": "#/components/schemas/BakongTransaction"}],
            "nullable": True,
            "description": "Bakong's transaction data when paid (success and mismatch: the "
            "payment as made); null for failed and timeout",
        },
        "md5": {"type": "string", "description": "The md5 tracked"},
        "jobId": {"type": "string", "format": "uuid"},
        "reason": {"type": "string", "description": _STATUS_REASONS},
        "metadata": {
            "type": "object",
            "additionalProperties": True,
            "description": "As given when the transaction was created, when it was given",
        },
    },
    "example": {
        "status": "mismatch",
        "data": {"hash": "...", "toAccountId": "shop@aclb", "currency": "USD", "amount": 4},
        "md5": "0f2a8c4e6b1d3f5a7c9e0b2d4f6a8c1e",
        "jobId": "5d0c6a3e-2f41-4c7b-9a55-1c2e3f4a5b6c",
        "reason": "amount: expected 5, got 4",
        "metadata": {"orderId": "A-1"},
    },
}
WEBHOOK_HEADERS = {
    "webhook-id": "The delivery's id (`msg_...`), the same on every retry: dedupe on it.",
    "webhook-timestamp": "Unix seconds of this attempt.",
    "webhook-signature": "With WEBHOOK_SECRET: `v1,` + base64 HMAC-SHA256 of "
    "`id.timestamp.body` (Standard Webhooks); one per secret, space-separated, while "
    "secrets rotate.",
    "x-webhook-signature": "With WEBHOOK_SECRET: `sha256=` + hex HMAC-SHA256 of the body "
    "only: no id, no time, so a captured request can be replayed; prefer "
    "webhook-signature.",
}


def _document_webhooks(spec: dict[str, Any]) -> None:
    components = spec.setdefault("components", {})
    components.setdefault("schemas", {})["WebhookBody"] = WEBHOOK_BODY
    components["headers"] = {
        name: {"description": text, "schema": {"type": "string"}}
        for name, text in WEBHOOK_HEADERS.items()
    }
    info = spec.setdefault("info", {})
    info["description"] = info.get("description", "") + WEBHOOK_DESCRIPTION


def _order(spec: dict[str, Any]) -> None:
    """HEAD (aiohttp adds one to every GET) out, tags and paths in the order of TAGS."""
    rank = {name: index for index, (name, _) in enumerate(TAGS)}
    paths: dict[str, Any] = spec.get("paths", {})
    for operations in paths.values():
        operations.pop("head", None)

    def first_rank(item: tuple[str, Any]) -> int:
        tags = [t for op in item[1].values() if isinstance(op, dict) for t in op.get("tags", ())]
        return min((rank.get(t, len(rank)) for t in tags), default=len(rank))

    spec["paths"] = dict(sorted(paths.items(), key=first_rank))
    spec["tags"] = [{"name": name, "description": text} for name, text in TAGS]


async def _finish_spec(app: web.Application) -> None:
    spec = app[SWAGGER_DICT]
    _strip_produces(spec)
    _order(spec)
    _document_webhooks(spec)
    components = spec.setdefault("components", {})
    components["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "API_KEY"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
    }
    for path, operations in spec.get("paths", {}).items():
        for operation in operations.values():
            if not isinstance(operation, dict):
                continue
            _place_links(operation)
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
