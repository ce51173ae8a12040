"""Handlers of /api/v1/credentials: list Bakong credentials (never their tokens), add one."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp_apigami import docs, request_schema, response_schema
from marshmallow import RAISE, Schema, fields, validate

from khqr_gateway.credentials import store as credential_store
from khqr_gateway.credentials.model import Credential, token_expired
from khqr_gateway.http.errors import invalid
from khqr_gateway.http.fields import (
    CURSOR_ERROR,
    ID_CURSOR_RE,
    CredentialCreateSchema,
    Pattern,
)
from khqr_gateway.http.json import iso, json_response
from khqr_gateway.http.openapi import errors
from khqr_gateway.http.paging import page_response, page_schema
from khqr_gateway.http.request import app_of, load_body, load_query
from khqr_gateway.service import SERVICE_KEY

log = logging.getLogger(__name__)

CREDENTIAL_STATUSES = ("active", "expired")


class CredentialListQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    status = fields.String(validate=validate.OneOf(CREDENTIAL_STATUSES))
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=500))
    cursor = fields.String(
        validate=Pattern(ID_CURSOR_RE, error=CURSOR_ERROR),
        metadata={"description": "nextCursor of the previous page"},
    )


class CredentialSchema(Schema):
    """A credential as the API shows it: never its token."""

    id = fields.Integer(required=True, metadata={"description": "Also the metrics label"})
    email = fields.String(allow_none=True)
    hasToken = fields.Boolean(required=True)
    expiresAt = fields.DateTime(allow_none=True, metadata={"description": "The token's JWT exp"})
    status = fields.String(
        required=True,
        validate=validate.OneOf(CREDENTIAL_STATUSES),
        metadata={"description": "expired: no usable token and renewal failed (see lastError)"},
    )
    isDefault = fields.Boolean(required=True)
    lastError = fields.String(allow_none=True)
    createdAt = fields.DateTime(required=True)
    updatedAt = fields.DateTime(required=True)


CredentialPageSchema = page_schema(CredentialSchema)


CREATE_SCHEMA = CredentialCreateSchema()
LIST_QUERY_SCHEMA = CredentialListQuerySchema()


def credential_json(cred: Credential) -> dict[str, Any]:
    """A credential as the API shows it: whether it has a token, never the token."""
    return {
        "id": cred.id,
        "email": cred.email,
        "hasToken": cred.token is not None,
        "expiresAt": iso(cred.expires_at),
        "status": cred.status,
        "isDefault": cred.is_default,
        "lastError": cred.last_error,
        "createdAt": iso(cred.created_at),
        "updatedAt": iso(cred.updated_at),
    }


def _after(cursor: str | None) -> int | None:
    # The schema's pattern keeps it to at most 18 ASCII digits: it fits Postgres' bigint.
    return None if cursor is None else int(cursor)


@docs(
    tags=["credentials"],
    summary="List Bakong credentials (tokens are never shown)",
    description="Each credential with its email, whether it has a token, when that token "
    "expires (its JWT `exp`), its status and the last renewal error. `expired` means the "
    "credential has no usable token and could not be renewed: its transactions time out as "
    "`bakong_unauthorized`; POST it again (a fresh token, or the email) to revive it. A "
    "token-only credential that Bakong refused (401) before its `exp` revives by itself: "
    "while it is in use Bakong is asked again with backoff (5 s doubling to 5 min).",
    responses=errors(401, 422),
)
@request_schema(CredentialListQuerySchema, location="querystring")
@response_schema(CredentialPageSchema, 200)
async def list_credentials(request: web.Request) -> web.Response:
    """GET /api/v1/credentials?status=&limit=&cursor=."""
    query = load_query(request, LIST_QUERY_SCHEMA)
    limit = query["limit"]
    rows = await credential_store.list_credentials(
        request.app[SERVICE_KEY].pool,
        app_of(request),
        status=query.get("status"),
        after=_after(query.get("cursor")),
        limit=limit + 1,
    )
    return page_response(rows, limit, credential_json, lambda c: str(c.id))


@docs(
    tags=["credentials"],
    summary="Add or replace a Bakong credential",
    description="Stores a token, an email, or both (the same email, or the same token, is "
    "one credential: sending it again replaces its token and revives it if expired). An "
    "email credential without a usable token is renewed at once through `renew_token`, so "
    "the answer says whether the email works (`status`, `lastError`). Transactions name a "
    "credential by giving the same `token` or `email`. The token is never shown again.",
    responses={
        200: {"description": "Replaced: the credential existed", "schema": CredentialSchema},
        **errors(400, 401, 413, 415, 422),
    },
)
@request_schema(CredentialCreateSchema, required=True)
@response_schema(CredentialSchema, 201, description="Added")
async def post_credential(request: web.Request) -> web.Response:
    """POST /api/v1/credentials."""
    service = request.app[SERVICE_KEY]
    data = await load_body(request, CREATE_SCHEMA)
    token, email = data.get("token"), data.get("email")
    if token and not email and token_expired(token):
        raise invalid("token", "has expired (its JWT exp is past): give a fresh one or an email")
    cred, created = await service.credentials.save(token=token, email=email, app_id=app_of(request))
    log.info(
        "bakong credential %s",
        "added" if created else "replaced",
        extra={"credentialId": cred.id, "status": cred.status},
    )
    return json_response(credential_json(cred), 201 if created else 200)
