"""POST /api/v1/khqr: a dynamic KHQR for an amount, its image, its Bakong deep link, and
tracking with a payment page."""

from __future__ import annotations

import re
import secrets
from typing import Any

from aiohttp import web
from aiohttp_apigami import docs, request_schema, response_schema
from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from khqr_gateway.apps.model import DEFAULT_APP_ID, Caller
from khqr_gateway.bakong import khqr
from khqr_gateway.bakong.client import SourceInfo
from khqr_gateway.config import APP_NAME_MAX, Settings
from khqr_gateway.http import tracking
from khqr_gateway.http.errors import invalid
from khqr_gateway.http.fields import (
    CURRENCIES,
    TIMEOUT_MAX_S,
    TIMEOUT_MIN_S,
    URL_MAX,
    AmountField,
    Pattern,
    checks_metadata,
    email_field,
    metadata_field,
    token_field,
    url_field,
)
from khqr_gateway.http.json import iso, json_response
from khqr_gateway.http.openapi import errors
from khqr_gateway.http.qr import qr_image
from khqr_gateway.http.request import caller_of, load_body
from khqr_gateway.service import SERVICE_KEY, Service
from khqr_gateway.times import from_ms, now_ms, seconds_to_ms
from khqr_gateway.transactions import pages
from khqr_gateway.transactions.store import CreatedRow

PAGE_TOKEN_BYTES = 16  # 128 bits
DEFAULT_CITY = khqr.DEFAULT_CITY
# A deep link's sourceInfo when neither the request nor the settings give one: what the
# bakong-khqr package sends, which Bakong is known to take.
DEFAULT_ICON_URL = "https://bakong.nbc.gov.kh/images/logo.svg"
DEFAULT_CALLBACK_URL = "https://bakong.nbc.gov.kh"
# build()'s argument names as the request spells them, for errors that point at a field.
_FIELDS = {
    "account_information": "accountInformation",
    "acquiring_bank": "acquiringBank",
    "account_id": "accountId",
    "merchant_name": "merchantName",
    "merchant_city": "merchantCity",
    "merchant_category_code": "merchantCategoryCode",
    "bill_number": "billNumber",
    "mobile_number": "mobileNumber",
    "store_label": "storeLabel",
    "terminal_label": "terminalLabel",
    "purpose": "purpose",
    "amount": "amount",
    "currency": "currency",
}
_TAG_62 = (
    ("bill_number", "billNumber"),
    ("mobile_number", "mobileNumber"),
    ("store_label", "storeLabel"),
    ("terminal_label", "terminalLabel"),
    ("purpose", "purpose"),
)


# Where the Bakong app returns after a payment: an https URL or an app's own scheme
# (`myshop://orders/7`); never one a browser would run or read as a document.
CALLBACK_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:[!-~]+$")
REFUSED_SCHEMES = frozenset({"javascript", "data", "vbscript", "file", "blob"})


def check_callback(value: str) -> str:
    if value.split(":", 1)[0].lower() in REFUSED_SCHEMES:
        raise ValidationError("must be an https URL or an app link, not a script or a document")
    return value


class DeeplinkSourceSchema(Schema):
    """What the Bakong app shows of the app that sent the payer (generate_deeplink_by_qr)."""

    class Meta:
        unknown = RAISE

    appName = fields.String(
        validate=validate.Length(min=1, max=APP_NAME_MAX),
        metadata={"description": "Default KHQR_APP_NAME, else merchantName"},
    )
    appIconUrl = url_field("Default KHQR_APP_ICON_URL, else Bakong's logo")
    callbackUrl = fields.String(
        validate=[
            validate.Length(min=3, max=URL_MAX),
            Pattern(CALLBACK_RE, error="must be an https URL or an app link (myapp://...)"),
            check_callback,
        ],
        metadata={
            "description": "Where the Bakong app returns once paid: an https URL or an app "
            "link; default the payment page (with webhookUrl), else Bakong's site"
        },
    )


class KhqrCreateSchema(Schema):
    """POST /api/v1/khqr."""

    class Meta:
        unknown = RAISE

    amount = AmountField(required=True, metadata={"description": "KHR whole; USD 2 decimals"})
    currency = fields.String(required=True, validate=validate.OneOf(CURRENCIES))
    accountId = fields.String(
        validate=validate.Length(min=3, max=32),
        metadata={"description": "Bakong account paid, name@bank (default KHQR_ACCOUNT_ID)"},
    )
    merchantName = fields.String(
        validate=validate.Length(min=1, max=25),
        metadata={"description": "Shown to the payer (default KHQR_MERCHANT_NAME)"},
    )
    merchantCity = fields.String(
        validate=validate.Length(min=1, max=15),
        metadata={"description": "Default KHQR_MERCHANT_CITY, else Phnom Penh"},
    )
    merchantType = fields.String(
        load_default="individual", validate=validate.OneOf(["individual", "merchant"])
    )
    accountInformation = fields.String(validate=validate.Length(min=1, max=32))
    acquiringBank = fields.String(validate=validate.Length(min=1, max=32))
    merchantCategoryCode = fields.String(validate=Pattern(r"^[0-9]{4}$"))
    billNumber = fields.String(validate=validate.Length(min=1, max=25))
    mobileNumber = fields.String(validate=validate.Length(min=1, max=25))
    storeLabel = fields.String(validate=validate.Length(min=1, max=25))
    terminalLabel = fields.String(validate=validate.Length(min=1, max=25))
    purpose = fields.String(validate=validate.Length(min=1, max=25))
    expiresInSeconds = fields.Integer(
        strict=True,
        validate=validate.Range(min=TIMEOUT_MIN_S, max=TIMEOUT_MAX_S),
        metadata={"description": "QR validity and tracking window (default POLL_TIMEOUT_S)"},
    )
    image = fields.String(
        validate=validate.OneOf(["svg", "png"]),
        metadata={"description": "Also return the QR image as a data URL"},
    )
    webhookUrl = url_field("Given: tracking starts at once")
    returnUrl = url_field("The payment page goes here once paid")
    deeplink = fields.Nested(
        DeeplinkSourceSchema,
        metadata={
            "description": "How the Bakong app presents the deep link of the answer (each "
            "field has a default)"
        },
    )
    token = token_field("Bakong token for the tracking (else the default)")
    email = email_field("Registered Bakong email for the tracking")
    metadata = metadata_field()
    _metadata = checks_metadata()

    @validates_schema
    def _tracking_fields(self, data: dict[str, Any], **kwargs: Any) -> None:
        if "webhookUrl" in data:
            if "token" in data and "email" in data:
                raise ValidationError("give token or email, not both", field_name="token")
            return
        for name in ("returnUrl", "token", "email", "metadata"):
            if name in data:
                raise ValidationError("applies only with webhookUrl", field_name=name)


class KhqrCreatedSchema(Schema):
    qr = fields.String(required=True, metadata={"description": "The KHQR string to show"})
    md5 = fields.String(required=True)
    expiresAt = fields.DateTime(required=True)
    image = fields.String(metadata={"description": "data:image/svg+xml or image/png, base64"})
    jobId = fields.UUID(metadata={"description": "With webhookUrl: the tracked transaction"})
    status = fields.String()
    createdAt = fields.DateTime()
    deadlineAt = fields.DateTime()
    payUrl = fields.String(metadata={"description": "With webhookUrl: the hosted payment page"})
    deeplink = fields.String(
        required=True,
        allow_none=True,
        metadata={
            "description": "Bakong's link that opens its app with this payment filled in, for a "
            "customer on the phone that shows the QR; null when Bakong gave none (the QR "
            "still works). Opaque: use it as given"
        },
    )


# One instance: loading keeps no state in a schema, and building one costs more.
CREATE_SCHEMA = KhqrCreateSchema()


def _field_of(message: str) -> str:
    found = [(message.find(name), camel) for name, camel in _FIELDS.items() if name in message]
    return min(found)[1] if found else "body"


def _with_app_merchant(data: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """The request, with its app's merchant profile where it gives none of its own. KHQR_*
    of the environment are the default app's alone (filled in by `_merchant`): another
    app's QR never pays the operator's account, nor shows the operator's app name."""
    if caller.app_id == DEFAULT_APP_ID:
        return data
    merchant = caller.app.merchant if caller.app is not None else None
    given: dict[str, str] = {}
    if merchant is not None:
        given = {
            "accountId": merchant.account_id,
            "merchantName": merchant.merchant_name,
            "merchantCity": merchant.merchant_city,
        }
    filled = {"merchantCity": DEFAULT_CITY, **{k: v for k, v in given.items() if v}, **data}
    for name in ("accountId", "merchantName"):
        if not filled.get(name):
            raise invalid(name, f"required: give {name} or set the app's merchant")
    link = filled.get("deeplink") or {}
    filled["deeplink"] = {
        "appName": filled["merchantName"],
        "appIconUrl": DEFAULT_ICON_URL,
        **link,
    }
    return filled


def _merchant(settings: Settings, data: dict[str, Any]) -> tuple[str, str, str]:
    account = data.get("accountId") or settings.khqr_account_id
    name = data.get("merchantName") or settings.khqr_merchant_name
    city = data.get("merchantCity") or settings.khqr_merchant_city or DEFAULT_CITY
    if not account:
        raise invalid("accountId", "required: give accountId or set KHQR_ACCOUNT_ID")
    if not name:
        raise invalid("merchantName", "required: give merchantName or set KHQR_MERCHANT_NAME")
    return account, name, city


def build_qr(settings: Settings, data: dict[str, Any], expires_at_ms: int) -> str:
    """The KHQR string a request asks for; 422 naming the field that cannot be encoded."""
    account, name, city = _merchant(settings, data)
    try:
        return khqr.build(
            account_id=account,
            merchant_name=name,
            merchant_city=city,
            amount=data["amount"],
            currency=data["currency"],
            dynamic=True,
            merchant_type=data["merchantType"],
            account_information=data.get("accountInformation"),
            acquiring_bank=data.get("acquiringBank"),
            merchant_category_code=data.get("merchantCategoryCode", "5999"),
            expires_at_ms=expires_at_ms,
            **{arg: data.get(key) for arg, key in _TAG_62},
        )
    except khqr.KhqrError as exc:
        raise invalid(_field_of(str(exc)), str(exc)) from None


def base_url(request: web.Request, settings: Settings) -> str:
    if settings.public_url:
        return settings.public_url.rstrip("/")
    return f"{request.scheme}://{request.host}"


def _tracking_request(data: dict[str, Any], qr: str, expires_s: int) -> dict[str, Any]:
    """The POST /api/v1/transactions body that tracks this QR."""
    request = {"qr": qr, "webhookUrl": data["webhookUrl"], "timeoutSeconds": expires_s}
    request.update({k: data[k] for k in ("token", "email", "metadata") if k in data})
    return request


def source_info(settings: Settings, data: dict[str, Any], callback: str | None) -> SourceInfo:
    """The deep link's sourceInfo: the request's, else the settings', else defaults."""
    given = data.get("deeplink") or {}
    return SourceInfo(
        app_name=given.get("appName") or settings.khqr_app_name or _merchant(settings, data)[1],
        app_icon_url=given.get("appIconUrl") or settings.khqr_app_icon_url or DEFAULT_ICON_URL,
        callback_url=given.get("callbackUrl") or callback or DEFAULT_CALLBACK_URL,
    )


async def _deeplink(
    service: Service, data: dict[str, Any], qr: str, credential: int | None, page: str | None
) -> str | None:
    source = source_info(service.settings, data, page)
    return await service.deeplink(credential, qr, source)


async def _track(
    request: web.Request, data: dict[str, Any], qr: str, expires_s: int
) -> tuple[CreatedRow, str, str | None]:
    """Track the QR and open its payment page; returns the row, the page URL and the deep
    link, which returns the payer to that page once paid (unless the request says where)."""
    service = request.app[SERVICE_KEY]
    body = _tracking_request(data, qr, expires_s)
    caller = caller_of(request)
    app_id = caller.app_id
    row, _ = await tracking.create(service, caller, body)
    token = secrets.token_urlsafe(PAGE_TOKEN_BYTES)
    pay_url = f"{base_url(request, service.settings)}/pay/{row.id}?t={token}"
    credential = await tracking.credential_id(service, caller, body)
    deeplink = await _deeplink(service, data, qr, credential, pay_url)
    await pages.open_page(service.pool, app_id, row.id, token, data.get("returnUrl"), deeplink)
    return row, pay_url, deeplink


@docs(
    tags=["khqr"],
    summary="Generate a dynamic KHQR, and track it",
    description="Builds a dynamic KHQR for `amount` and `currency`, paid to `accountId` "
    "(default KHQR_ACCOUNT_ID), valid for `expiresInSeconds` (default POLL_TIMEOUT_S). "
    '`image: "svg"|"png"` adds the QR image as a data URL. With `webhookUrl` it also starts '
    "tracking (the amount, currency and account are expected of the payment; 201) and "
    "returns `jobId` and `payUrl`, the hosted payment page; without it, 200. `deeplink` is "
    "Bakong's link that opens its app with the payment filled in (generate_deeplink_by_qr, "
    "presented as `deeplink: {appName, appIconUrl, callbackUrl}` or KHQR_APP_NAME and "
    "KHQR_APP_ICON_URL say), for a customer on the phone that shows the QR; null when Bakong "
    "gives none, and the QR works all the same.",
    responses={
        200: {"description": "Generated; nothing tracked", "schema": KhqrCreatedSchema},
        **errors(400, 401, 413, 415, 422),
    },
)
@request_schema(KhqrCreateSchema, required=True)
@response_schema(KhqrCreatedSchema, 201, description="Generated and tracking started")
async def post_khqr(request: web.Request) -> web.Response:
    """POST /api/v1/khqr."""
    service = request.app[SERVICE_KEY]
    data = _with_app_merchant(await load_body(request, CREATE_SCHEMA), caller_of(request))
    expires_s: int = data.get("expiresInSeconds", service.settings.poll_timeout_s)
    expires_at_ms = now_ms() + seconds_to_ms(expires_s)
    qr = build_qr(service.settings, data, expires_at_ms)
    out: dict[str, Any] = {
        "qr": qr,
        "md5": khqr.md5_of(qr),
        "expiresAt": iso(from_ms(expires_at_ms)),
    }
    if "image" in data:
        out["image"] = qr_image(qr, data["image"])
    if "webhookUrl" not in data:
        out["deeplink"] = await _deeplink(service, data, qr, None, None)
        return json_response(out, 200)
    row, out["payUrl"], out["deeplink"] = await _track(request, data, qr, expires_s)
    out.update(tracking.created_json(row))
    return json_response(out, 201)
