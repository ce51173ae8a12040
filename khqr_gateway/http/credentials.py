"""Handlers of /api/v1/credentials: list Bakong credentials (never their tokens), add one."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp_apigami import docs, request_schema, response_schema

from khqr_gateway.credentials import store as credential_store
from khqr_gateway.credentials.model import Credential, token_expired
from khqr_gateway.http.errors import ApiError, iso, json_response, page_response
from khqr_gateway.http.openapi import errors
from khqr_gateway.http.schemas import (
    CredentialCreateSchema,
    CredentialListQuerySchema,
    CredentialPageSchema,
    CredentialSchema,
)
from khqr_gateway.http.transactions import load, read_json
from khqr_gateway.service import SERVICE_KEY

log = logging.getLogger(__name__)


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


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(
        422, "validation_error", "some fields are not valid", [{"field": field, "message": message}]
    )


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
    query = load(CredentialListQuerySchema(), dict(request.query))
    limit = query["limit"]
    rows = await credential_store.list_credentials(
        request.app[SERVICE_KEY].pool,
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
    _, body = await read_json(request)
    data = load(CredentialCreateSchema(), body)
    token, email = data.get("token"), data.get("email")
    if token and not email and token_expired(token):
        raise _invalid("token", "has expired (its JWT exp is past): give a fresh one or an email")
    cred, created = await service.credentials.save(token=token, email=email)
    log.info(
        "bakong credential %s",
        "added" if created else "replaced",
        extra={"credentialId": cred.id, "status": cred.status},
    )
    return json_response(credential_json(cred), 201 if created else 200)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/credentials", list_credentials)
    app.router.add_post("/api/v1/credentials", post_credential)
