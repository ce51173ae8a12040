"""Handlers of /api/v1/apps (an admin key's: apps, their API keys and webhook secrets) and
/api/v1/app (any caller's own app). A key or a secret is shown once, in the answer that
makes it; no list or read shows one, nor a bot token."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiohttp import web
from aiohttp_apigami import docs, match_info_schema, request_schema, response_schema
from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_load,
    pre_load,
    validate,
    validates_schema,
)

from khqr_gateway.apps import store
from khqr_gateway.apps.model import (
    KEY_DAYS_MAX,
    NAME_MAX,
    ApiKey,
    App,
    AppChanges,
    AppError,
    Merchant,
    app_name,
    new_app_id,
)
from khqr_gateway.bakong import khqr
from khqr_gateway.config import Settings
from khqr_gateway.credentials import store as credential_store
from khqr_gateway.credentials.model import token_expired
from khqr_gateway.deliveries.ssrf import AddressPolicy
from khqr_gateway.http.errors import ApiError, invalid
from khqr_gateway.http.fields import CredentialCreateSchema, Pattern, cursor_field, url_field
from khqr_gateway.http.json import iso, json_response
from khqr_gateway.http.openapi import errors, links, operation_ref
from khqr_gateway.http.paging import page_response, page_schema
from khqr_gateway.http.request import caller_of, load, load_body, load_query, read_json
from khqr_gateway.notices.model import LANGUAGES
from khqr_gateway.service import SERVICE_KEY, Service

log = logging.getLogger(__name__)

NOT_FOUND = "no app with this id"
KEY_NOT_FOUND = "this app has no key with this id"
RATE_LIMIT_MAX = 1_000_000
# On the answers that show a key or a secret: no cache along the way keeps a copy.
NO_STORE = {"Cache-Control": "no-store"}
# Ids are url-safe text (app_..., key_...): anything else names nothing, and is not asked of
# Postgres (a NUL in a path cannot even be).
ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
# A bot token as BotFather makes them: the bot's id, a colon, the secret part. It is written
# into the Bot API's URL path, so nothing else is taken.
BOT_TOKEN_RE = re.compile(r"^[0-9]{1,20}:[A-Za-z0-9_-]{20,200}$")
# A chat's numeric id (groups and channels are negative) or a public channel's @username.
CHAT_ID_RE = re.compile(r"^(-?[0-9]{1,20}|@[A-Za-z][A-Za-z0-9_]{3,31})$")
# khqr.build's argument names as the request spells them.
_MERCHANT_FIELDS = {
    "account_id": "accountId",
    "merchant_name": "merchantName",
    "merchant_city": "merchantCity",
}
# Where the default app's settings come from, by the field a request would change.
_ENV_OF = {
    "merchant": "KHQR_ACCOUNT_ID, KHQR_MERCHANT_NAME, KHQR_MERCHANT_CITY",
    "bakong": "BAKONG_TOKEN, BAKONG_EMAIL",
    "telegram": "TELEGRAM_BOT_TOKEN, TELEGRAM_CHAT_ID",
    "rateLimit": "API_RATE_LIMIT",
}


def _check_name(value: str) -> None:
    try:
        app_name(value)
    except AppError as exc:
        raise ValidationError(str(exc).removeprefix("name: ")) from None


def _name_field(**kwargs: Any) -> fields.String:
    return fields.String(
        validate=_check_name,
        metadata={
            "description": "Unique among enabled apps (any case); trimmed",
            "minLength": 1,
            "maxLength": NAME_MAX,
        },
        **kwargs,
    )


class MerchantSchema(Schema):
    """The merchant profile POST /api/v1/khqr encodes for the app (KHQR_* for the default)."""

    class Meta:
        unknown = RAISE

    accountId = fields.String(
        required=True,
        validate=validate.Length(min=3, max=32),
        metadata={"description": "Bakong account paid, name@bank"},
    )
    merchantName = fields.String(
        required=True,
        validate=validate.Length(min=1, max=25),
        metadata={"description": "Shown to the payer"},
    )
    merchantCity = fields.String(required=True, validate=validate.Length(min=1, max=15))

    @validates_schema
    def _encodable(self, data: dict[str, Any], **kwargs: Any) -> None:
        # Held to what a QR can carry, as a POST /api/v1/khqr with these values would be.
        try:
            khqr.build(
                account_id=data["accountId"],
                merchant_name=data["merchantName"],
                merchant_city=data["merchantCity"],
            )
        except khqr.KhqrError as exc:
            field = _MERCHANT_FIELDS.get(exc.rule.split(".")[0], "accountId")
            raise ValidationError(str(exc), field_name=field) from None


class TelegramSchema(Schema):
    """Where the app's payment notices go."""

    class Meta:
        unknown = RAISE

    botToken = fields.String(
        required=True,
        validate=Pattern(BOT_TOKEN_RE, error="must be a bot token as BotFather gives it"),
        metadata={"description": "123456789:AA...; stored, never shown again"},
    )
    chatId = fields.String(
        required=True,
        validate=Pattern(CHAT_ID_RE, error="must be a chat id (-1001234567890) or @channel"),
        metadata={"description": "A chat id (a number, given as a string or not) or @channel"},
    )
    language = fields.String(
        load_default="en",
        validate=validate.OneOf(LANGUAGES),
        metadata={"description": "The words of its notices: en (English) or km (Khmer)"},
    )

    @pre_load
    def _chat_id_as_text(self, data: Any, **kwargs: Any) -> Any:
        # Telegram hands out chat ids as numbers: one given so is taken as its digits.
        if isinstance(data, dict) and type(data.get("chatId")) is int:
            return {**data, "chatId": str(data["chatId"])}
        return data


class AppUpdateSchema(Schema):
    """PATCH /api/v1/apps/{appId}: the fields given are set; null clears an optional one."""

    class Meta:
        unknown = RAISE

    name = _name_field()
    webhookUrl = url_field(
        "Where the app's webhooks go when a transaction gives no webhookUrl (checked as one is)",
        allow_none=True,
    )
    merchant = fields.Nested(MerchantSchema, allow_none=True)
    bakong = fields.Nested(
        CredentialCreateSchema,
        allow_none=True,
        metadata={"description": "The app's Bakong credential (null: the default one)"},
    )
    telegram = fields.Nested(TelegramSchema, allow_none=True)
    rateLimit = fields.Integer(
        strict=True,
        allow_none=True,
        validate=validate.Range(min=1, max=RATE_LIMIT_MAX),
        metadata={"description": "Requests a second for this app (null: API_RATE_LIMIT)"},
    )

    @post_load
    def _trimmed(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        if "name" in data:
            data["name"] = app_name(data["name"])
        return data


class AppCreateSchema(AppUpdateSchema):
    """POST /api/v1/apps."""

    name = _name_field(required=True)


class AppListQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=500))
    cursor = cursor_field()


class KeyCreateSchema(Schema):
    """POST /api/v1/apps/{appId}/keys."""

    class Meta:
        unknown = RAISE

    expiresInDays = fields.Integer(
        strict=True,
        validate=validate.Range(min=1, max=KEY_DAYS_MAX),
        metadata={"description": "The key stops working after this many days (default never)"},
    )


class AppIdPathSchema(Schema):
    appId = fields.String(required=True, metadata={"description": "The app's id (app_...)"})


class AppKeyPathSchema(AppIdPathSchema):
    keyId = fields.String(required=True, metadata={"description": "The key's id (key_...)"})


class TelegramChatSchema(Schema):
    chatId = fields.String(required=True)
    language = fields.String(required=True, validate=validate.OneOf(LANGUAGES))


class AppSchema(Schema):
    """An app as the API shows it: never a key, a webhook secret or a bot token."""

    id = fields.String(required=True)
    name = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf(["active", "disabled"]))
    isDefault = fields.Boolean(
        required=True,
        metadata={"description": "The environment's app (API_KEY, KHQR_*, ...): shown as set"},
    )
    webhookUrl = fields.String(allow_none=True)
    merchant = fields.Nested(MerchantSchema, allow_none=True)
    credentialId = fields.Integer(
        allow_none=True,
        metadata={"description": "Its Bakong credential (null: the default one)"},
    )
    telegram = fields.Nested(
        TelegramChatSchema,
        allow_none=True,
        metadata={"description": "The chat its notices go to (the bot token is never shown)"},
    )
    rateLimit = fields.Integer(
        allow_none=True, metadata={"description": "Requests a second (null: API_RATE_LIMIT)"}
    )
    createdAt = fields.DateTime(required=True)
    updatedAt = fields.DateTime(required=True)
    disabledAt = fields.DateTime(allow_none=True)


AppPageSchema = page_schema(AppSchema)


class CreatedKeySchema(Schema):
    id = fields.String(required=True, metadata={"description": "key_..."})
    key = fields.String(
        required=True, metadata={"description": "kgw_...: shown this once, never again"}
    )


class NewKeySchema(CreatedKeySchema):
    expiresAt = fields.DateTime(allow_none=True)


class AppCreatedSchema(AppSchema):
    apiKey = fields.Nested(CreatedKeySchema, required=True)
    webhookSecret = fields.String(
        required=True,
        metadata={"description": "whsec_...: signs this app's webhooks; shown this once"},
    )


class ApiKeySchema(Schema):
    """A key as a list shows it: never the key."""

    id = fields.String(required=True)
    prefix = fields.String(required=True, metadata={"description": "Its first characters"})
    status = fields.String(required=True, validate=validate.OneOf(["active", "expired", "revoked"]))
    createdAt = fields.DateTime(required=True)
    expiresAt = fields.DateTime(allow_none=True)
    lastUsedAt = fields.DateTime(
        allow_none=True, metadata={"description": "Written every few seconds, not per request"}
    )
    revokedAt = fields.DateTime(allow_none=True)


class ApiKeyListSchema(Schema):
    data = fields.List(fields.Nested(ApiKeySchema))


class WebhookSecretSchema(Schema):
    webhookSecret = fields.String(
        required=True,
        metadata={
            "description": "whsec_...: shown this once; the previous one signs beside it for 24 h"
        },
    )


CREATE_SCHEMA = AppCreateSchema()
UPDATE_SCHEMA = AppUpdateSchema()
LIST_QUERY_SCHEMA = AppListQuerySchema()
KEY_CREATE_SCHEMA = KeyCreateSchema()


def merchant_json(merchant: Merchant | None) -> dict[str, str] | None:
    if merchant is None:
        return None
    return {
        "accountId": merchant.account_id,
        "merchantName": merchant.merchant_name,
        "merchantCity": merchant.merchant_city,
    }


def app_json(app: App, settings: Settings) -> dict[str, Any]:
    """An app as the API shows it; the default app with what the environment sets for it."""
    if app.default:
        app = as_configured(app, settings)
    return {
        "id": app.id,
        "name": app.name,
        "status": "disabled" if app.disabled else "active",
        "isDefault": app.default,
        "webhookUrl": app.webhook_url,
        "merchant": merchant_json(app.merchant),
        "credentialId": app.credential_id,
        "telegram": (
            {"chatId": app.telegram_chat_id, "language": app.telegram_language}
            if app.telegram_chat_id
            else None
        ),
        "rateLimit": app.rate_limit,
        "createdAt": iso(app.created_at),
        "updatedAt": iso(app.updated_at),
        "disabledAt": iso(app.disabled_at),
    }


def as_configured(app: App, settings: Settings) -> App:
    """The default app's row with the settings the environment gives it (none secret)."""
    merchant = None
    if settings.khqr_account_id and settings.khqr_merchant_name:
        city = settings.khqr_merchant_city or khqr.DEFAULT_CITY
        merchant = Merchant(settings.khqr_account_id, settings.khqr_merchant_name, city)
    notifies = settings.telegram_bot_token and settings.telegram_chat_id
    return dataclasses.replace(
        app,
        webhook_url=None,
        merchant=merchant,
        credential_id=None,
        telegram_chat_id=settings.telegram_chat_id if notifies else None,
        telegram_bot_token=None,
        telegram_language=settings.telegram_language,
        rate_limit=settings.api_rate_limit or None,
    )


def key_json(key: ApiKey, now: datetime) -> dict[str, Any]:
    if key.revoked_at is not None:
        status = "revoked"
    else:
        status = "active" if key.usable(now) else "expired"
    return {
        "id": key.id,
        "prefix": key.prefix,
        "status": status,
        "createdAt": iso(key.created_at),
        "expiresAt": iso(key.expires_at),
        "lastUsedAt": iso(key.last_used_at),
        "revokedAt": iso(key.revoked_at),
    }


def _path_id(request: web.Request, name: str, message: str) -> str:
    value = request.match_info[name]
    if not ID_RE.fullmatch(value):
        raise ApiError(404, "not_found", message)
    return value


async def _app(request: web.Request) -> App:
    """The app of the path; 404 when there is none."""
    app_id = _path_id(request, "appId", NOT_FOUND)
    app = await store.get(request.app[SERVICE_KEY].pool, app_id)
    if app is None:
        raise ApiError(404, "not_found", NOT_FOUND)
    return app


def _not_disabled(app: App, doing: str) -> None:
    if app.disabled:
        raise _disabled(doing)


def _disabled(doing: str) -> ApiError:
    return ApiError(409, "app_disabled", f"the app is disabled: it cannot {doing}")


def _not_default(app: App, message: str) -> None:
    if app.default:
        raise ApiError(409, "default_app", message)


def _env_message(data: dict[str, Any]) -> str:
    asked = [name for name in _ENV_OF if name in data] or list(_ENV_OF)
    settings = "; ".join(f"{name}: {_ENV_OF[name]}" for name in asked)
    return (
        "the default app is configured by the environment, not through the API: set "
        f"{settings} (and restart); its name and webhookUrl are fixed"
    )


async def _credential_id(service: Service, app_id: str, given: dict[str, Any]) -> int:
    """The credential `bakong` names, added or replaced as POST /api/v1/credentials does
    (a new one is the app's: its key lists it)."""
    token, email = given.get("token"), given.get("email")
    if token and not email and token_expired(token):
        raise invalid(
            "bakong.token", "has expired (its JWT exp is past): give a fresh one or an email"
        )
    cred, created = await service.credentials.save(token=token, email=email, app_id=app_id)
    log.info(
        "bakong credential %s for an app",
        "added" if created else "replaced",
        extra={"credentialId": cred.id, "status": cred.status, "appId": app_id},
    )
    return cred.id


async def _changes(service: Service, app_id: str, data: dict[str, Any]) -> AppChanges:
    """The store's changes to the app for a loaded body: checked against the deployment,
    its credential registered."""
    changes: AppChanges = {}
    if "name" in data:
        changes["name"] = data["name"]
    if "webhookUrl" in data:
        changes["webhook_url"] = _webhook_url(service.settings, data["webhookUrl"])
    if "merchant" in data:
        given = data["merchant"]
        changes["merchant"] = (
            None
            if given is None
            else Merchant(given["accountId"], given["merchantName"], given["merchantCity"])
        )
    if "telegram" in data:
        telegram = data["telegram"] or {}
        changes["telegram_chat_id"] = telegram.get("chatId")
        changes["telegram_bot_token"] = telegram.get("botToken")
        changes["telegram_language"] = telegram.get("language", "en")
    if "rateLimit" in data:
        changes["rate_limit"] = data["rateLimit"]
    if "bakong" in data:  # last: only a request valid in every other field registers one
        bakong = data["bakong"]
        changes["credential_id"] = (
            None if bakong is None else await _credential_id(service, app_id, bakong)
        )
    return changes


def _webhook_url(settings: Settings, url: str | None) -> str | None:
    """A webhookUrl the deployment may send to (as a transaction's is checked)."""
    if url is not None:
        refused = AddressPolicy.for_settings(settings).check_url(url)
        if refused:
            raise invalid("webhookUrl", refused)
    return url


def _name_taken() -> ApiError:
    return ApiError(409, "name_taken", "an enabled app has this name (names ignore case)")


@contextlib.asynccontextmanager
async def _forget_credentials_unless_made(service: Service, app_id: str) -> AsyncIterator[None]:
    """A create that fails after its credential was registered (another create took the
    name since it was checked) leaves no credential under an app that never was."""
    try:
        yield
    except BaseException:
        # Shielded, so that a request cancelled here still cleans up; a failure to clean up
        # is logged, and the create's own error is the one answered.
        try:
            await asyncio.shield(credential_store.delete_unowned_credentials(service.pool, app_id))
        except Exception as exc:
            log.warning(
                "credentials of an app never made were kept: %s", exc, extra={"appId": app_id}
            )
        raise


@contextlib.contextmanager
def _unique_name() -> Iterator[None]:
    """409 for a name another enabled app has (the unique index apps_name says so)."""
    try:
        yield
    except asyncpg.UniqueViolationError as exc:
        if getattr(exc, "constraint_name", None) != "apps_name":
            raise
        raise _name_taken() from None


ADMIN_ERRORS = (401, 403, 404)
APP_PATH = "/api/v1/apps/{appId}"
# Where a made app leads, and a made key: the docs show them, the fuzzer follows them.
APP_LINKS = {
    name: {
        "operationRef": operation_ref(path, method),
        "parameters": {"appId": "$response.body#/id"},
    }
    for name, path, method in (
        ("GetApp", APP_PATH, "get"),
        ("ChangeApp", APP_PATH, "patch"),
        ("DisableApp", APP_PATH, "delete"),
        ("MakeKey", APP_PATH + "/keys", "post"),
        ("ListKeys", APP_PATH + "/keys", "get"),
        ("MakeWebhookSecret", APP_PATH + "/webhook-secret", "post"),
    )
}
KEY_LINKS = {
    "RevokeKey": {
        "operationRef": operation_ref(APP_PATH + "/keys/{keyId}", "delete"),
        "parameters": {"appId": "$request.path.appId", "keyId": "$response.body#/id"},
    }
}


@docs(
    tags=["apps"],
    summary="Make an app, with its first API key and webhook secret",
    description="The answer holds the app's first API key (`apiKey.key`) and its webhook "
    "secret (`webhookSecret`): shown this once, never again (keep them; make another key or "
    "secret if lost). `bakong` is registered as POST /api/v1/credentials registers one, and "
    "the app uses it; `webhookUrl` is checked as a transaction's is. An admin key only.",
    responses=errors(401, 403, 409, 422),
    **links({201: APP_LINKS}),
)
@request_schema(AppCreateSchema, required=True)
@response_schema(AppCreatedSchema, 201, description="Made; the key and secret shown once")
async def post_app(request: web.Request) -> web.Response:
    """POST /api/v1/apps."""
    service = request.app[SERVICE_KEY]
    data = await load_body(request, CREATE_SCHEMA)
    # Asked first, so that a request refused for its name registers no credential.
    if await store.name_in_use(service.pool, data["name"]):
        raise _name_taken()
    app_id = new_app_id()  # before the app: its credential is made for it
    changes = await _changes(service, app_id, data)
    async with _forget_credentials_unless_made(service, app_id):
        with _unique_name():
            app, key, secret = await store.create(
                service.pool,
                data["name"],
                app_id=app_id,
                webhook_url=changes.get("webhook_url"),
                merchant=changes.get("merchant"),
                credential_id=changes.get("credential_id"),
                telegram_chat_id=changes.get("telegram_chat_id"),
                telegram_bot_token=changes.get("telegram_bot_token"),
                telegram_language=changes.get("telegram_language", "en"),
                rate_limit=changes.get("rate_limit"),
            )
    log.info("app created", extra={"appId": app.id, "keyId": key.id})
    body = app_json(app, service.settings)
    body["apiKey"] = {"id": key.id, "key": key.key}
    body["webhookSecret"] = secret
    return json_response(body, 201, NO_STORE)


@docs(
    tags=["apps"],
    summary="List apps, by id",
    description="Every app, the default one and disabled ones included; never a key, a "
    "secret or a bot token. An admin key only.",
    responses=errors(401, 403, 422),
)
@request_schema(AppListQuerySchema, location="querystring")
@response_schema(AppPageSchema, 200)
async def list_apps(request: web.Request) -> web.Response:
    """GET /api/v1/apps?limit=&cursor=."""
    service = request.app[SERVICE_KEY]
    query = load_query(request, LIST_QUERY_SCHEMA)
    limit = query["limit"]
    rows = await store.list_page(service.pool, after=query.get("cursor"), limit=limit + 1)
    return page_response(rows, limit, lambda a: app_json(a, service.settings), lambda a: a.id)


@docs(tags=["apps"], summary="Get an app", responses=errors(*ADMIN_ERRORS))
@match_info_schema(AppIdPathSchema)
@response_schema(AppSchema, 200)
async def get_app(request: web.Request) -> web.Response:
    """GET /api/v1/apps/{appId}."""
    return json_response(app_json(await _app(request), request.app[SERVICE_KEY].settings))


@docs(
    tags=["apps"],
    summary="Change an app's settings",
    description="Sets the fields given (the same as POST's); `null` clears an optional one "
    "(`bakong: null`: the default credential; `rateLimit: null`: API_RATE_LIMIT). The "
    "default app's settings are the environment's: 409 naming the variables to set. A "
    "disabled app: 409. An admin key only.",
    responses=errors(*ADMIN_ERRORS, 409, 422),
)
@match_info_schema(AppIdPathSchema)
@request_schema(AppUpdateSchema, required=True)
@response_schema(AppSchema, 200)
async def patch_app(request: web.Request) -> web.Response:
    """PATCH /api/v1/apps/{appId}."""
    service = request.app[SERVICE_KEY]
    app = await _app(request)
    data = await load_body(request, UPDATE_SCHEMA)
    _not_default(app, _env_message(data))
    _not_disabled(app, "be changed")
    changes = await _changes(service, app.id, data)
    if not changes:
        return json_response(app_json(app, service.settings))
    with _unique_name():
        changed = await store.update(service.pool, app.id, changes)
    if changed is None:
        raise _disabled("be changed")  # since it was read
    await service.apps_changed()  # its new settings (a rate limit) hold at once
    log.info("app changed", extra={"appId": app.id, "fields": sorted(data)})
    return json_response(app_json(changed, service.settings))


@docs(
    tags=["apps"],
    summary="Disable an app",
    description="Its keys stop working (in this process at once, in every other within "
    "5 s); its pending transactions are still tracked and their webhooks sent. Its rows are "
    "kept; its name is free again. The default app cannot be disabled (409). Disabling "
    "again answers the app as it is. An admin key only.",
    responses=errors(*ADMIN_ERRORS, 409),
)
@match_info_schema(AppIdPathSchema)
@response_schema(AppSchema, 200, description="Disabled")
async def delete_app(request: web.Request) -> web.Response:
    """DELETE /api/v1/apps/{appId}."""
    service = request.app[SERVICE_KEY]
    app = await _app(request)
    _not_default(
        app,
        "the default app cannot be disabled: it is the environment's (API_KEY); remove "
        "API_KEY to stop its keys",
    )
    disabled = await store.disable(service.pool, app.id)
    if disabled is None:
        raise ApiError(404, "not_found", NOT_FOUND)
    await service.apps_changed()
    log.info("app disabled", extra={"appId": app.id})
    return json_response(app_json(disabled, service.settings))


@docs(
    tags=["apps"],
    summary="Make an API key for an app",
    description="The key (`kgw_...`) is shown this once and stored only as a hash. It works "
    "at once. The default app's keys are API_KEY's (409); a disabled app's: 409. An admin "
    "key only.",
    responses=errors(*ADMIN_ERRORS, 409, 422),
    **links({201: KEY_LINKS}),
)
@match_info_schema(AppIdPathSchema)
@request_schema(KeyCreateSchema)
@response_schema(NewKeySchema, 201, description="Made; the key shown once")
async def post_key(request: web.Request) -> web.Response:
    """POST /api/v1/apps/{appId}/keys."""
    service = request.app[SERVICE_KEY]
    app = await _app(request)
    data = await _optional_body(request, KEY_CREATE_SCHEMA)
    _not_default(app, "the default app's keys are API_KEY's (comma-separated): set it there")
    _not_disabled(app, "have new keys")
    days = data.get("expiresInDays")
    expires = datetime.now(UTC) + timedelta(days=days) if days else None
    key = await store.add_key(service.pool, app.id, expires_at=expires)
    log.info("api key made", extra={"appId": app.id, "keyId": key.id})
    body = {"id": key.id, "key": key.key, "expiresAt": iso(expires)}
    return json_response(body, 201, NO_STORE)


async def _optional_body(request: web.Request, schema: Schema) -> dict[str, Any]:
    """A body that may be left out: none is `{}`."""
    if not request.body_exists:
        return load(schema, {})
    _, body = await read_json(request)
    return load(schema, body)


@docs(
    tags=["apps"],
    summary="List an app's API keys (never a key)",
    description="Each key's id, first characters, when made, when it expires, when last "
    "used and when revoked, oldest first. An admin key only.",
    responses=errors(*ADMIN_ERRORS),
)
@match_info_schema(AppIdPathSchema)
@response_schema(ApiKeyListSchema, 200)
async def list_keys(request: web.Request) -> web.Response:
    """GET /api/v1/apps/{appId}/keys."""
    app = await _app(request)
    keys = await store.list_keys(request.app[SERVICE_KEY].pool, app.id)
    now = datetime.now(UTC)
    return json_response({"data": [key_json(k, now) for k in keys]})


@docs(
    tags=["apps"],
    summary="Revoke an app's API key",
    description="It stops working in this process at once, in every other within 5 s. "
    "Revoking again answers 204 too; another app's key id is 404. An admin key only.",
    responses={204: {"description": "Revoked"}, **errors(*ADMIN_ERRORS)},
)
@match_info_schema(AppKeyPathSchema)
async def delete_key(request: web.Request) -> web.Response:
    """DELETE /api/v1/apps/{appId}/keys/{keyId}."""
    service = request.app[SERVICE_KEY]
    app_id = _path_id(request, "appId", NOT_FOUND)
    key_id = _path_id(request, "keyId", KEY_NOT_FOUND)
    if not await store.revoke_key(service.pool, app_id, key_id):
        if await store.get(service.pool, app_id) is None:
            raise ApiError(404, "not_found", NOT_FOUND)
        raise ApiError(404, "not_found", KEY_NOT_FOUND)
    await service.apps_changed()
    log.info("api key revoked", extra={"appId": app_id, "keyId": key_id})
    return web.Response(status=204)


@docs(
    tags=["apps"],
    summary="Make a new webhook secret for an app",
    description="Shown this once. The new secret signs the app's webhooks from now on; the "
    "one it replaces signs beside it for 24 h (two `v1,` signatures in `webhook-signature`), "
    "time to move receivers to the new one. The default app's secret is WEBHOOK_SECRET "
    "(409). An admin key only.",
    responses=errors(*ADMIN_ERRORS, 409),
)
@match_info_schema(AppIdPathSchema)
@response_schema(WebhookSecretSchema, 201, description="Made; shown once")
async def post_webhook_secret(request: web.Request) -> web.Response:
    """POST /api/v1/apps/{appId}/webhook-secret."""
    service = request.app[SERVICE_KEY]
    app = await _app(request)
    _not_default(app, "the default app's webhook secret is WEBHOOK_SECRET's: set it there")
    secret = await store.rotate_secret(service.pool, app.id)
    await service.apps_changed()  # it signs the app's next webhook, in every process
    log.info("webhook secret rotated", extra={"appId": app.id})
    return json_response({"webhookSecret": secret}, 201, NO_STORE)


@docs(
    tags=["apps"],
    summary="The caller's own app",
    description="The app of the API key used (an admin key: the one `Khqr-App` names, "
    "else the default app); never a secret. The default app is shown with what the "
    "environment sets for it: merchant from KHQR_*, rateLimit API_RATE_LIMIT.",
    responses=errors(401, 404),
)
@response_schema(AppSchema, 200)
async def get_own_app(request: web.Request) -> web.Response:
    """GET /api/v1/app."""
    service = request.app[SERVICE_KEY]
    app = await store.get(service.pool, caller_of(request).app_id)
    if app is None:
        raise ApiError(404, "not_found", NOT_FOUND)
    return json_response(app_json(app, service.settings))
