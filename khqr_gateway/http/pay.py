"""The hosted payment page, its live status and the embeddable checkout script.

Public routes: guarded by the transaction's page token (`?t=`), never by the API key, so
the key never reaches a browser.
"""

from __future__ import annotations

import html
import ipaddress
from datetime import UTC, datetime, timedelta, timezone
from functools import cache
from string import Template
from typing import Any
from urllib.parse import quote
from uuid import UUID

import orjson
from aiohttp import web
from aiohttp_apigami import docs, match_info_schema

from khqr_gateway.bakong import khqr
from khqr_gateway.bakong.sandbox import MOUNT_PATH
from khqr_gateway.http import assets, i18n, sse
from khqr_gateway.http.errors import ApiError, ErrorSchema
from khqr_gateway.http.fields import JobIdPathSchema
from khqr_gateway.http.openapi import errors
from khqr_gateway.http.qr import qr_svg_inline
from khqr_gateway.service import SERVICE_KEY
from khqr_gateway.transactions import pages
from khqr_gateway.transactions.model import Status

TOKEN_MAX = 64
ASSETS = {"pay.js": "application/javascript; charset=utf-8", "pay.css": "text/css; charset=utf-8"}
# Framed by merchants' sites (sdk.js), whose origins the gateway cannot know: any ancestor.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors *"
)
# Cambodia keeps UTC+7 all year: receipts show the time there.
PHNOM_PENH = timezone(timedelta(hours=7), "ICT")
TOKEN_PARAM = {"in": "query", "name": "t", "required": True, "schema": {"type": "string"}}
LANG_PARAM = {
    "in": "query",
    "name": "lang",
    "required": False,
    "description": "The page's language; another value is as none (Accept-Language decides)",
    "schema": {"type": "string", "enum": list(i18n.LANGUAGES)},
}
NOT_FOUND_PAGE = (
    '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Not found</title>'
    '<link rel="stylesheet" href="/static/pay.css"></head><body><main class="checkout">'
    "<p>This payment link is not valid.</p>"
    '<p lang="km">តំណទូទាត់នេះមិនត្រឹមត្រូវទេ។</p></main></body></html>'
).encode()


def _asset_headers(content_type: str) -> dict[str, str]:
    return {
        "Content-Type": content_type,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "public, max-age=300",
        "Cross-Origin-Resource-Policy": "cross-origin",
    }


async def _page_of(request: web.Request) -> tuple[pages.Page | None, str]:
    token = request.query.get("t", "")
    try:
        job_id = UUID(request.match_info["jobId"])
    except ValueError:
        return None, token
    if not token or len(token) > TOKEN_MAX:
        return None, token
    return await pages.page(request.app[SERVICE_KEY].pool, job_id, token), token


def render(
    page: pages.Page, token: str, lang: str = i18n.ENGLISH, *, sandbox: bool = False
) -> bytes:
    """The page's HTML in `lang`; every value from a request or Bakong is escaped. A final
    page has no QR at all: a paid, expired or mismatched QR must not be scannable."""
    parsed = _parsed(page.qr)
    expires_ms = int(page.deadline_at.timestamp() * 1000)
    if parsed is not None and parsed.expires_at_ms is not None:
        expires_ms = parsed.expires_at_ms
    merchant = parsed.merchant_name if parsed else ""
    reference = reference_of(page, parsed)
    has_bill = parsed is not None and bool(parsed.bill_number)
    values = {
        "lang": lang,
        "title": i18n.say(lang, "title", merchant=merchant),
        "merchant": merchant,
        "amount": _amount(parsed),
        "currency": parsed.currency if parsed else "",
        "status": page.status.value,
        "status_text": i18n.say(lang, f"status.{page.status.value}"),
        "expires_ms": str(expires_ms),
        "events_url": f"/pay/{page.id}/events?t={quote(token, safe='')}",
        "return_url": page.return_url or "",
        "job_id": str(page.id),
        "reference": reference,
        "reference_label": i18n.say(lang, "bill" if has_bill else "reference"),
        "expires_in": i18n.say(lang, "expires_in"),
        "language": i18n.say(lang, "language"),
        "text": _catalogue(lang),
    }
    escaped = {key: html.escape(value, quote=True) for key, value in values.items()}
    escaped["payable"] = (
        _payable(page, lang, parsed, sandbox) if page.status is Status.PENDING else ""
    )
    escaped["next"] = _next(page, lang, merchant or i18n.say(lang, "the_merchant"), reference)
    escaped["languages"] = _languages(token, lang)
    return Template(assets.read("pay.html").decode()).substitute(escaped).encode()


def _amount(parsed: khqr.Khqr | None) -> str:
    if parsed is None or parsed.amount is None:
        return ""
    return i18n.amount_number(parsed.amount, parsed.currency)


@cache
def _catalogue(lang: str) -> str:
    """The words pay.js says once the page changes (data-text), in the page's language."""
    return orjson.dumps(i18n.TEXT[lang]).decode()


def _parsed(qr: str | None) -> khqr.Khqr | None:
    """The page's QR, read leniently; one stored before a codec fix may not parse now (its
    lengths counted otherwise), and the page still shows its status."""
    if not qr:
        return None
    try:
        return khqr.parse(qr)
    except khqr.KhqrError:
        return None


def reference_of(page: pages.Page, parsed: khqr.Khqr | None) -> str:
    """What a customer quotes to the merchant: the bill number, else the start of the jobId."""
    if parsed is not None and parsed.bill_number:
        return parsed.bill_number
    return str(page.id)[:8].upper()


def _payable(page: pages.Page, lang: str, parsed: khqr.Khqr | None, sandbox: bool) -> str:
    """What a pending page offers: the QR to scan, "Open in Bakong" (the deep link, on a
    phone), "Save QR image" (for a bank app's scan from gallery), and the sandbox's buttons."""
    parts = [_qr_figure(page, lang, parsed), '<div class="actions">']
    if page.deeplink:
        parts.append(
            f'<a class="button primary phone" id="deeplink" href="{_esc(page.deeplink)}" '
            f'rel="noopener">{_esc(i18n.say(lang, "open_bakong"))}</a>'
        )
    # Shown by pay.js, which draws the image: without it the button would do nothing.
    parts.append(
        f'<button type="button" class="button" id="save" hidden>'
        f"{_esc(i18n.say(lang, 'save_qr'))}</button></div>"
    )
    how = i18n.say(lang, "how_with_link" if page.deeplink else "how")
    parts.append(f'<p class="how phone" id="how">{_esc(how)}</p>')
    parts.append(f'<p class="scan" id="scan">{_esc(i18n.say(lang, "scan"))}</p>')
    if sandbox and parsed is not None:
        parts.append(_simulate(page, lang, parsed))
    return f'<section class="payable" id="payable">{"".join(parts)}</section>'


def _qr_figure(page: pages.Page, lang: str, parsed: khqr.Khqr | None) -> str:
    svg = qr_svg_inline(page.qr) if page.qr else ""
    amount = i18n.amount_text(parsed.amount, parsed.currency) if parsed and parsed.amount else ""
    label = i18n.say(
        lang, "qr_label", amount=amount, merchant=parsed.merchant_name if parsed else ""
    )
    return f'<figure class="qr" id="qr" role="img" aria-label="{_esc(label)}">{svg}</figure>'


def _simulate(page: pages.Page, lang: str, parsed: khqr.Khqr) -> str:
    """Sandbox mode: buttons that pay (what the QR asks) or fail this md5 in the simulated
    Bakong, as a payer's app would; shown by pay.js."""
    control = f"{MOUNT_PATH}/control/transactions/{page.md5}"
    pay = {
        "amount": str(parsed.amount),
        "currency": parsed.currency,
        "toAccountId": parsed.account_id,
    }
    return (
        f'<div class="sandbox" id="sandbox" data-control="{_esc(control)}" '
        f'data-pay="{_esc(orjson.dumps(pay).decode())}" hidden>'
        f"<p>{_esc(i18n.say(lang, 'sandbox'))}</p>"
        f'<button type="button" class="button" id="simulate-pay">'
        f"{_esc(i18n.say(lang, 'simulate_pay'))}</button>"
        f'<button type="button" class="button" id="simulate-fail">'
        f"{_esc(i18n.say(lang, 'simulate_fail'))}</button></div>"
    )


def _languages(token: str, lang: str) -> str:
    """Links to this page in each language (no script needed), the current one marked."""
    links = []
    for code in i18n.LANGUAGES:
        href = f"?t={quote(token, safe='')}&lang={code}"
        current = ' aria-current="true"' if code == lang else ""
        links.append(
            f'<a id="lang-{code}" href="{_esc(href)}" lang="{code}" hreflang="{code}"{current}>'
            f"{i18n.NATIVE_NAMES[code]}</a>"
        )
    return " \u00b7 ".join(links)


def _esc(value: str) -> str:
    return html.escape(value, quote=True)


def _next(page: pages.Page, lang: str, merchant: str, reference: str) -> str:
    """The final page's next step (HTML, escaped): a receipt once paid, else what to do."""
    if page.status is Status.PENDING:
        return ""
    if page.status is Status.SUCCESS:
        return _receipt(page, lang, merchant, reference)
    text = i18n.say(lang, f"next.{page.status.value}", merchant=merchant, reference=reference)
    return f"<p>{_esc(text)}</p>"


def _receipt(page: pages.Page, lang: str, merchant: str, reference: str) -> str:
    paid = page.paid or {}
    amount = paid.get("amount")
    what = (
        i18n.amount_text(amount, paid.get("currency"))
        if amount is not None
        else i18n.say(lang, "status.success")
    )
    lines = [i18n.say(lang, "receipt_to", amount=what, merchant=merchant)]
    when = _paid_at(paid) or page.completed_at
    if when is not None:
        local = when.astimezone(PHNOM_PENH)
        stamp = local.strftime("%d %b %Y, %H:%M" if lang == i18n.ENGLISH else "%d/%m/%Y %H:%M")
        lines.append(f"{stamp} {i18n.say(lang, 'phnom_penh')}")
    lines.append(f"{i18n.say(lang, 'reference')} {reference}")
    if isinstance(paid.get("hash"), str):
        lines.append(i18n.say(lang, "bakong_hash", hash=paid["hash"][:8]))
    items = "".join(f"<li>{_esc(line)}</li>" for line in lines)
    return f'<ul class="receipt" id="receipt">{items}</ul>'


def _paid_at(paid: dict[str, Any]) -> datetime | None:
    stamp = paid.get("acknowledgedDateMs") or paid.get("createdDateMs")
    if not isinstance(stamp, int) or isinstance(stamp, bool):
        return None
    try:
        return datetime.fromtimestamp(stamp / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return None


@docs(
    tags=["payment page"],
    summary="Hosted payment page (public, guarded by its token)",
    description="The QR, amount, merchant name, bill number, a countdown to expiry and the "
    'live status; on a phone also "Open in Bakong" (the deep link) and "Save QR image". '
    "Once final it shows no QR, and a receipt or what to do next; once paid it goes to the "
    "`returnUrl` of POST /api/v1/khqr. In Khmer or English: `lang`, else Accept-Language. "
    "The URL comes from that call's `payUrl`; a wrong or missing token is 404.",
    parameters=[TOKEN_PARAM, LANG_PARAM],
    responses={
        200: {"description": "HTML page", "content": {"text/html": {}}},
        404: {"description": "No page for this jobId and token", "content": {"text/html": {}}},
        **errors(503),
    },
)
@match_info_schema(JobIdPathSchema)
async def pay_page(request: web.Request) -> web.Response:
    """GET /pay/{jobId}?t=<token>."""
    page, token = await _page_of(request)
    headers = assets.page_headers("text/html; charset=utf-8", PAGE_CSP)
    if page is None:
        return web.Response(status=404, body=NOT_FOUND_PAGE, headers=headers)
    lang = i18n.language(request.query.get("lang"), request.headers.get("Accept-Language"))
    headers["Vary"] = "Accept-Language"
    sandbox = request.app[SERVICE_KEY].settings.sandbox
    return web.Response(body=render(page, token, lang, sandbox=sandbox), headers=headers)


def _page_event(job_id: UUID, status: Status, reason: str | None) -> bytes:
    data = orjson.dumps({"status": status.value})
    return b"id: " + status.value.encode() + b"\ndata: " + data + b"\n\n"


PAGE_EVENTS = sse.Format(event=_page_event, heartbeat=sse.V1.heartbeat)


@docs(
    tags=["payment page"],
    summary="Live status of the payment page (Server-Sent Events, public)",
    description="As /api/v1/transactions/{jobId}/events, guarded by the page token; events "
    "carry only `{status}`. A few streams per link and per address (429 past them), and a "
    "share of the process's streams kept for the API (503 when the pages have used theirs).",
    parameters=[TOKEN_PARAM],
    responses={
        200: sse.SSE_RESPONSE,
        204: {"description": "The stream already ended with a final status"},
        404: {"description": "No page for this jobId and token"},
        429: {
            "description": "This link or this address already has its most open streams; "
            "try again after Retry-After",
            "schema": ErrorSchema,
        },
        **sse.STREAM_LIMIT,
    },
)
@match_info_schema(JobIdPathSchema)
async def pay_events(request: web.Request) -> web.StreamResponse:
    """GET /pay/{jobId}/events?t=<token>."""
    page, _ = await _page_of(request)
    if page is None:
        raise ApiError(404, "not_found", "no payment page for this jobId and token")
    return await sse.stream(request, page.app_id, page.id, PAGE_EVENTS, client_of(request))


def client_of(request: web.Request) -> str:
    """The connection's peer address, never X-Forwarded-For (anyone can write that header).

    An IPv6 client is its /64: one host is handed a whole /64 and may use any address in it.
    """
    try:
        address = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return ""  # a Unix socket has no peer address: its clients share one allowance
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@docs(
    tags=["payment page"],
    summary="Payment page script and stylesheet",
    responses={200: {"description": "Static asset"}, **errors(404)},
)
async def asset(request: web.Request) -> web.Response:
    """GET /static/{name}: the page's own script and stylesheet, nothing else."""
    name = request.match_info["name"]
    if name not in ASSETS:
        raise ApiError(404, "not_found", "no such asset")
    return web.Response(body=assets.read(name), headers=_asset_headers(ASSETS[name]))


@docs(
    tags=["payment page"],
    summary="Embeddable checkout script",
    description="`new KhqrCheckout({url, onSuccess, onFailure, onClose}).open()` opens the "
    "payment page `url` (a `payUrl`) in a modal and reports its outcome through postMessage.",
    responses={200: {"description": "JavaScript", "content": {"application/javascript": {}}}},
)
async def sdk(request: web.Request) -> web.Response:
    """GET /sdk.js."""
    return web.Response(
        body=assets.read("sdk.js"), headers=_asset_headers("application/javascript; charset=utf-8")
    )
