"""The routes of rachhen/khqr-webhook, so its clients only change the base URL.

Same paths, status codes and bodies (`{"message": "Transaction created", "jobId"}`; errors
`{"name", "code", "message", "details"}`, with our `error` object beside them). Where
that service broke (its email route always answered 500, its track stream never ended),
these behave as it documented.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

from aiohttp import web
from aiohttp_apigami import docs, match_info_schema, request_schema, response_schema
from marshmallow import EXCLUDE, INCLUDE, Schema, ValidationError, fields, post_load

from khqr_gateway.apps.model import Caller
from khqr_gateway.bakong.client import FAILED_CODE, NOT_FOUND_CODE, STATIC_QR_CODE
from khqr_gateway.bakong.model import CheckKind, CheckResult, ErrorKind
from khqr_gateway.credentials.model import token_expired
from khqr_gateway.credentials.renewal import REFUSED, NoToken
from khqr_gateway.http import sse, tracking
from khqr_gateway.http.errors import ApiError, ErrorDetailSchema, error_body, invalid
from khqr_gateway.http.fields import (
    JobIdPathSchema,
    Md5PathSchema,
    check_md5,
    email_field,
    md5_field,
    token_field,
    url_field,
)
from khqr_gateway.http.json import json_response
from khqr_gateway.http.request import app_of, caller_of, job_id_of, load_body, load_query
from khqr_gateway.service import SERVICE_KEY, Service
from khqr_gateway.transactions.model import Status

CREATED = "Transaction created"
UNAUTHORIZED_CODE = 6
NAMES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    408: "REQUEST_TIMEOUT",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    417: "EXPECTATION_FAILED",
    422: "VALIDATION_ERROR",
    429: "TOO_MANY_REQUESTS",
    502: "BAD_GATEWAY",
    503: "SERVICE_UNAVAILABLE",
}
TRACK_NAMES = {Status.PENDING: b"PENDING", Status.SUCCESS: b"COMPLETED"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class CompatCreateSchema(Schema):
    """The body of that service's create routes; unknown fields are dropped, as there."""

    class Meta:
        unknown = EXCLUDE

    md5 = md5_field("md5 of the KHQR string", required=True)
    webhookUrl = url_field("Where the webhook goes", required=True)

    @post_load
    def _normalise(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        data["md5"] = data["md5"].lower()
        return data


class CompatTokenCreateSchema(CompatCreateSchema):
    """POST /api/v1/transaction/token."""

    token = token_field("Bakong token; refused with 401 when its JWT has expired", required=True)


class CompatEmailCreateSchema(CompatCreateSchema):
    """POST /api/v1/transaction/email."""

    email = email_field("Registered Bakong email; tokens are renewed through it", required=True)


class CompatMd5QuerySchema(Schema):
    class Meta:
        unknown = EXCLUDE

    token = token_field("Bakong token")
    email = email_field("Registered Bakong email")


class CompatCreatedSchema(Schema):
    message = fields.String(required=True, metadata={"example": "Transaction created"})
    jobId = fields.String(required=True)


class CompatErrorSchema(Schema):
    """That service's error body, with ours beside it under `error`."""

    name = fields.String(required=True, metadata={"example": "NOT_FOUND"})
    code = fields.Raw(metadata={"description": "Bakong errorCode, when Bakong gave one"})
    message = fields.String(required=True)
    details = fields.Raw(allow_none=True)
    error = fields.Nested(ErrorDetailSchema, required=True)


class BakongTransactionSchema(Schema):
    """Bakong's transaction `data`, passed on as Bakong sent it (with whatever else it sent)."""

    class Meta:
        unknown = INCLUDE

    hash = fields.String(allow_none=True)
    fromAccountId = fields.String(allow_none=True)
    toAccountId = fields.String(allow_none=True)
    currency = fields.String(allow_none=True)
    amount = fields.Float(allow_none=True)
    description = fields.String(allow_none=True)
    createdDateMs = fields.Integer(allow_none=True)
    acknowledgedDateMs = fields.Integer(allow_none=True)


# One instance: loading keeps no state in a schema, and building one costs more.
MD5_QUERY_SCHEMA = CompatMd5QuerySchema()


class BakongRefusal(ApiError):
    """An error that carries Bakong's errorCode as the body's `code`, as that service did."""

    def __init__(self, status: int, code: str, message: str, bakong_code: int) -> None:
        super().__init__(status, code, message, {"errorCode": bakong_code})
        self.bakong_code = bakong_code


def compat_error(exc: ApiError) -> web.Response:
    body: dict[str, Any] = {"name": NAMES.get(exc.status, "INTERNAL_SERVER_ERROR")}
    if isinstance(exc, BakongRefusal):
        body["code"] = exc.bakong_code
    body.update(message=exc.message, details=exc.details)
    body.update(error_body(exc.code, exc.message, exc.details))
    return json_response(body, exc.status, exc.headers)


def compat_errors(handler: Handler) -> Handler:
    """Answer this handler's errors in that service's shape."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return compat_error(exc)

    return wrapped


def _documented_errors(*codes: int) -> dict[int, dict[str, Any]]:
    # The middlewares' refusals (API key, rate limit) come in that shape too.
    return {
        code: {"description": NAMES[code], "schema": CompatErrorSchema}
        for code in (*codes, 401, 429)
    }


async def _email_token(service: Service, app_id: str, email: str) -> tuple[int, str | None]:
    """The credential of a registered email and a live token, renewed through it if need be."""
    credential_id = await service.credentials.add(token=None, email=email, app_id=app_id)
    try:
        return credential_id, await service.credentials.token(credential_id)
    except NoToken:
        raise ApiError(
            401, "bakong_email_refused", "Bakong gave no token for this email; is it registered?"
        ) from None


def _check_token(token: str) -> None:
    if token_expired(token):
        raise ApiError(401, "token_expired", "Token is expired")


async def _create(request: web.Request, schema: Schema) -> web.Response:
    """Track the md5 like POST /api/v1/transactions, answering as that service did.

    An md5 already pending answers 201 with the jobId tracking it: that service answered
    201 to every create, so its clients check for 201 and keep the jobId; the one webhook
    for that payment goes to the first request's webhookUrl.
    """
    service = request.app[SERVICE_KEY]
    data = await load_body(request, schema)
    if "token" in data:
        _check_token(data["token"])
    else:
        await _email_token(service, app_of(request), data["email"])
    # As rachhen/khqr-webhook answers: 201 with the md5's job, whatever the repeat asked for.
    row, _ = await tracking.create(service, caller_of(request), data, repeat_must_match=False)
    return json_response({"message": CREATED, "jobId": str(row.id)}, 201)


def _create_route(schema: type[CompatCreateSchema], *, summary: str, description: str) -> Handler:
    """A create route of that service, whose body `schema` loads."""
    loader = schema()  # one instance: loading keeps no state in a schema

    @docs(
        tags=["compatibility"],
        summary=summary,
        description=description,
        responses=_documented_errors(400, 401, 408, 415, 422),
    )
    @request_schema(schema, required=True)
    @response_schema(CompatCreatedSchema, 201, description="Tracking started")
    @compat_errors
    async def create(request: web.Request) -> web.StreamResponse:
        return await _create(request, loader)

    return create


create_with_token = _create_route(
    CompatTokenCreateSchema,
    summary="Track an md5 with a Bakong token (rachhen/khqr-webhook)",
    description="201 `{message, jobId}`; an md5 already pending answers 201 with the jobId "
    "already tracking it. 401 when the token's JWT has expired.",
)
create_with_email = _create_route(
    CompatEmailCreateSchema,
    summary="Track an md5 with a registered Bakong email (rachhen/khqr-webhook)",
    description="201 `{message, jobId}`. A token is obtained through the email now (401 when "
    "Bakong gives none) and renewed through it for as long as the transaction is tracked.",
)


async def _query_credential(
    service: Service, caller: Caller, query: dict[str, Any]
) -> tuple[int | None, str | None]:
    app_id = caller.app_id
    if query.get("token"):
        _check_token(query["token"])
        return None, query["token"]
    if query.get("email"):
        return await _email_token(service, app_id, query["email"])
    own = caller.app.credential_id if caller.app is not None else None
    if own is None and service.credentials.default_id is None:
        raise ApiError(400, "bad_request", "Token or email is required")
    try:
        return own or service.credentials.default_id, await service.credentials.token(own)
    except NoToken:
        raise ApiError(401, "unauthorized", "the default Bakong credential has no token") from None


def _answer(result: CheckResult) -> web.Response:
    if result.kind is CheckKind.PAID:
        return json_response(result.data, 200)
    if result.kind is CheckKind.NOT_FOUND:
        raise BakongRefusal(
            404,
            "not_found",
            "Transaction could not be found. Please check and try again.",
            NOT_FOUND_CODE,
        )
    if result.kind is CheckKind.FAILED:
        raise BakongRefusal(417, "transaction_failed", "Transaction failed.", FAILED_CODE)
    if result.error is ErrorKind.UNAUTHORIZED:
        raise BakongRefusal(
            401, "unauthorized", "Bakong refused the token (expired or invalid)", UNAUTHORIZED_CODE
        )
    if result.error is ErrorKind.STATIC_QR:
        raise BakongRefusal(404, "not_found", "Static KHQR is not supported", STATIC_QR_CODE)
    if result.error is ErrorKind.BAKONG_ERROR and result.code is not None:
        raise BakongRefusal(404, "not_found", f"Bakong errorCode {result.code}", result.code)
    raise ApiError(502, "bakong_unavailable", f"Bakong gave no answer ({_why(result)})")


def _why(result: CheckResult) -> str:
    if result.error is ErrorKind.BAKONG_ERROR:
        return f"{result.error}_{result.code}"  # an errorCode that is not a number
    return result.error or "unknown"


@docs(
    tags=["compatibility"],
    summary="Ask Bakong about an md5 now (rachhen/khqr-webhook)",
    description="200 with Bakong's transaction `data`; 404 when Bakong does not know it (`code` "
    "is Bakong's errorCode, 1); 417 when it failed (`code` 3). Uses `token`, else `email`, else "
    "the default credential. 502 when Bakong gives no answer.",
    responses=_documented_errors(400, 401, 404, 417, 422, 502),
)
@match_info_schema(Md5PathSchema)
@request_schema(CompatMd5QuerySchema, location="querystring")
@response_schema(BakongTransactionSchema, 200, description="Bakong's transaction data")
@compat_errors
async def get_by_md5(request: web.Request) -> web.StreamResponse:
    """GET /api/v1/transaction/{md5}/md5?token=|email=."""
    service = request.app[SERVICE_KEY]
    md5 = _md5_of(request)
    query = load_query(request, MD5_QUERY_SCHEMA)
    credential_id, token = await _query_credential(service, caller_of(request), query)
    try:
        result, _ = await service.credentials.renewing(
            credential_id, token, lambda fresh: service.bakong.check_md5(fresh, md5)
        )
    except NoToken:
        result = REFUSED
    return _answer(result)


def _md5_of(request: web.Request) -> str:
    try:
        return check_md5(request.match_info["md5"])
    except ValidationError as exc:
        raise invalid("md5", str(exc.messages[0])) from None


def _track_event(job_id: UUID, status: Status, reason: str | None) -> bytes:
    return b"data: " + TRACK_NAMES.get(status, b"FAILED") + b"\n\n"


# As there: `data: PENDING` every 3 s while waiting (ours also ends after a final status).
TRACK = sse.Format(
    event=_track_event, heartbeat=lambda _: b"data: PENDING\n\n", heartbeat_s=3.0, ids=False
)


@docs(
    tags=["compatibility"],
    summary="Track a transaction (Server-Sent Events, rachhen/khqr-webhook)",
    description="`data: PENDING` now and every 3 s while pending, then `data: COMPLETED` "
    "(paid) or `data: FAILED` (failed, timed out, mismatched or cancelled), and the stream "
    "ends.",
    responses={200: sse.SSE_RESPONSE, **_documented_errors(401, 404), **sse.STREAM_LIMIT},
)
@match_info_schema(JobIdPathSchema)
@compat_errors
async def track(request: web.Request) -> web.StreamResponse:
    """GET /api/v1/transaction/{jobId}/track."""
    return await sse.stream(request, app_of(request), job_id_of(request), TRACK)
