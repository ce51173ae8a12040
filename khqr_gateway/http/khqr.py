"""POST /api/v1/khqr: a dynamic KHQR for an amount, its image, its Bakong deep link, and
tracking with a payment page."""

from __future__ import annotations

import base64
import io
import secrets
import time
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import asyncpg
import segno
from aiohttp import web
from aiohttp_apigami import docs, request_schema, response_schema

from khqr_gateway.bakong import khqr
from khqr_gateway.bakong.client import SourceInfo
from khqr_gateway.config import Settings
from khqr_gateway.http import transactions
from khqr_gateway.http.errors import ApiError, iso, json_response
from khqr_gateway.http.openapi import errors
from khqr_gateway.http.schemas import KhqrCreatedSchema, KhqrCreateSchema
from khqr_gateway.service import SERVICE_KEY, Service
from khqr_gateway.transactions import pages

PAGE_TOKEN_BYTES = 16  # 128 bits
DEFAULT_CITY = "Phnom Penh"
IMAGE_TYPES = {"svg": "image/svg+xml", "png": "image/png"}
# A deep link's sourceInfo when neither the request nor the settings give one: what the
# bakong-khqr package sends, which Bakong is known to take.
DEFAULT_ICON_URL = "https://bakong.nbc.gov.kh/images/logo.svg"
DEFAULT_CALLBACK_URL = "https://bakong.nbc.gov.kh"
# One instance: loading keeps no state in a schema, and building one costs more.
CREATE_SCHEMA = KhqrCreateSchema()
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


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(
        422, "validation_error", "some fields are not valid", [{"field": field, "message": message}]
    )


def _field_of(message: str) -> str:
    found = [(message.find(name), camel) for name, camel in _FIELDS.items() if name in message]
    return min(found)[1] if found else "body"


def _merchant(settings: Settings, data: dict[str, Any]) -> tuple[str, str, str]:
    account = data.get("accountId") or settings.khqr_account_id
    name = data.get("merchantName") or settings.khqr_merchant_name
    city = data.get("merchantCity") or settings.khqr_merchant_city or DEFAULT_CITY
    if not account:
        raise _invalid("accountId", "required: give accountId or set KHQR_ACCOUNT_ID")
    if not name:
        raise _invalid("merchantName", "required: give merchantName or set KHQR_MERCHANT_NAME")
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
        raise _invalid(_field_of(str(exc)), str(exc)) from None


def qr_image(qr: str, kind: str) -> str:
    """The QR code of `qr` as a data URL (SVG or PNG)."""
    buffer = io.BytesIO()
    segno.make_qr(qr, error="m").save(buffer, kind=kind, scale=8, border=4)
    return f"data:{IMAGE_TYPES[kind]};base64,{base64.b64encode(buffer.getvalue()).decode()}"


# Payment pages drawn at once: the QR of each is drawn once (8 ms of CPU, several KB each);
# without it every view of a page drew it again, and a link open on many screens slowed the
# whole process.
QR_CACHE_SIZE = 1024


@lru_cache(maxsize=QR_CACHE_SIZE)
def qr_svg_inline(qr: str) -> str:
    """The QR code of `qr` as an <svg> element that scales to its box (for HTML pages)."""
    svg: str = segno.make_qr(qr, error="m").svg_inline(scale=1, border=4, omitsize=True)
    return svg


def base_url(request: web.Request, settings: Settings) -> str:
    if settings.public_url:
        return settings.public_url.rstrip("/")
    return f"{request.scheme}://{request.host}"


def _tracking(data: dict[str, Any], qr: str, expires_s: int) -> dict[str, Any]:
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
    return await service.poller.checker.deeplink(credential, qr, source)


async def _track(
    request: web.Request, data: dict[str, Any], qr: str, expires_s: int
) -> tuple[asyncpg.Record, str, str | None]:
    """Track the QR and open its payment page; returns the row, the page URL and the deep
    link, which returns the payer to that page once paid (unless the request says where)."""
    service = request.app[SERVICE_KEY]
    tracking = _tracking(data, qr, expires_s)
    row, _ = await transactions.create(service, tracking)
    token = secrets.token_urlsafe(PAGE_TOKEN_BYTES)
    pay_url = f"{base_url(request, service.settings)}/pay/{row['id']}?t={token}"
    credential = await transactions.credential_id(service, tracking)
    deeplink = await _deeplink(service, data, qr, credential, pay_url)
    await pages.open_page(service.pool, row["id"], token, data.get("returnUrl"), deeplink)
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
    _, body = await transactions.read_json(request)
    data = transactions.load(CREATE_SCHEMA, body)
    expires_s: int = data.get("expiresInSeconds", service.settings.poll_timeout_s)
    expires_at_ms = int(time.time() * 1000) + expires_s * 1000
    qr = build_qr(service.settings, data, expires_at_ms)
    out: dict[str, Any] = {
        "qr": qr,
        "md5": khqr.md5_of(qr),
        "expiresAt": iso(datetime.fromtimestamp(expires_at_ms / 1000, UTC)),
    }
    if "image" in data:
        out["image"] = qr_image(qr, data["image"])
    if "webhookUrl" not in data:
        out["deeplink"] = await _deeplink(service, data, qr, None, None)
        return json_response(out, 200)
    row, out["payUrl"], out["deeplink"] = await _track(request, data, qr, expires_s)
    out.update(transactions.created_json(row))
    return json_response(out, 201)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/khqr", post_khqr)
