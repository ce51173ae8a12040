"""Simulated Bakong: the Open API endpoints of bakong-api.md plus control routes for tests.

Served on its own port by `khqr-gateway sandbox`, or mounted in-process under `/sandbox`
in development when no Bakong is configured.

Bakong endpoints (`POST /v1/<name>`, bearer token required except for renew_token):
`check_transaction_by_md5`, `check_transaction_by_md5_list` (a bare array of at most 50
md5s, or `{"md5List": [...]}`), `generate_deeplink_by_qr` (`{qr, sourceInfo}`: a link to
this sandbox's own `GET /link/{id}`, which pays the QR's amount to its account when opened,
as paying in the Bakong app would, then goes back to `appDeepLinkCallback`) and
`renew_token` (`{"email"}`). A token is refused with 401 / errorCode 6 once its JWT `exp`
has passed or after it was revoked.

Control routes (under `/control`, JSON in and out; errors as the gateway's
`{"error": {"code", "message", "details"}}`; all state is in memory, lost on restart):
- `POST /control/transactions/{md5}/pay` `{amount?, currency?, toAccountId?, ...}`: paid;
  a field left out is what the gateway expects of that md5 when the sandbox is mounted in
  it and the transaction has expectations, else 1 USD to `merchant@devb`.
- `POST /control/transactions/{md5}/fail`: failed (errorCode 3).
- `GET /control/transactions/{md5}`: its status and how often it was checked.
- `GET /control/stats`: calls per endpoint, md5s checked (distinct, and checks in all),
  the most calls that were in flight at once, calls that came through a proxy (`Via`).
- `POST /control/faults`: replaces the injected faults (`{}` clears them). Fields:
  `status` (HTTP status for every Bakong call, e.g. 500, 429, 401, 403),
  `listStatus` (status for the list endpoint only, e.g. 403; wins over `status` there),
  `retryAfter` (Retry-After header sent with those statuses, e.g. "2"),
  `delayS` (seconds to wait before answering: slow replies, client timeouts),
  `malformed` (`true` or `"html"`: a 200 that is not JSON; `"shape"`: JSON that is not
  a Bakong envelope), `endpoints` (names the faults apply to; default every endpoint),
  `deeplinkError` (`true`: generate_deeplink_by_qr answers errorCode 4, the link provider
  failed), `shortLink` (generate_deeplink_by_qr answers this as its link, whatever it is),
  `count` (how many calls the faults last; default until replaced), `geoBlock` (`true`:
  a bare nginx 403 page to every Bakong call, as Bakong answers hosts outside Cambodia).
- `POST /control/token` `{email?, exp?}`: a token the sandbox accepts (expired if `exp`
  is past).
- `POST /control/tokens/revoke` `{token}`: refuse that token from now on (401).
- `POST /control/emails` `{registered: [..] | null}`: only these emails can renew a
  token (errorCode 10 "Not registered yet" for others); null: every email can.
- `POST /control/reset`: forget payments, calls, faults, revocations.
- `POST /control/inbox/{name}`, `GET /control/inbox/{name}`: a webhook receiver for trying
  the gateway out, and what it received.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import secrets
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
from aiohttp import web

from khqr_gateway import times
from khqr_gateway.bakong import khqr

TOKEN_LIFETIME_S = 90 * 24 * 3600
# What the gateway expects of an md5 (`amount`, `currency`, `toAccountId`, any absent).
Expectations = Callable[[str], Awaitable[Mapping[str, Any]]]
# Where the gateway mounts the sandbox in sandbox mode (its payment page's simulate buttons).
MOUNT_PATH = "/sandbox"
# Deep links kept (the oldest forgotten first): a long sandbox session must not grow forever.
LINKS_MAX = 10_000


def make_token(email: str = "dev@example.com", *, exp: int | None = None) -> str:
    """A JWT-shaped Bakong token (unsigned: the gateway reads only its `exp`)."""
    now = int(time.time())

    def b64(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(value)).rstrip(b"=").decode()

    claims = {
        "data": {"id": email},
        "iat": now,
        "exp": exp if exp is not None else now + TOKEN_LIFETIME_S,
    }
    return f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64(claims)}.{secrets.token_urlsafe(16)}"


def _token_exp(token: str) -> int | None:
    try:
        payload = token.split(".")[1]
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return int(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError, orjson.JSONDecodeError):
        return None


@dataclass
class Payment:
    status: str  # "paid" | "failed"
    data: dict[str, Any] | None = None


@dataclass
class Faults:
    """Injected misbehaviour; each applies to the next `remaining` calls (None = until reset)."""

    status: int | None = None
    list_status: int | None = None
    retry_after: str | None = None
    delay_s: float = 0.0
    malformed: str | None = None  # "html" or "shape"
    endpoints: frozenset[str] | None = None  # None = every Bakong endpoint
    remaining: int | None = None
    geo_block: bool = False
    deeplink_error: bool = False
    short_link: Any = None  # None: a link to this sandbox

    def applies(self, endpoint: str) -> bool:
        return self.endpoints is None or endpoint in self.endpoints

    def take(self) -> bool:
        if self.remaining is None:
            return True
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True


@dataclass
class Link:
    """A deep link handed out: the QR it pays and the sourceInfo it was asked with."""

    qr: str
    source: dict[str, Any]


@dataclass
class SandboxState:
    payments: dict[str, Payment] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    checks: Counter[str] = field(default_factory=Counter)
    single_checks: Counter[str] = field(default_factory=Counter)
    faults: Faults = field(default_factory=Faults)
    revoked: set[str] = field(default_factory=set)
    registered_emails: set[str] | None = None  # None = every email is registered
    inboxes: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    links: dict[str, Link] = field(default_factory=dict)
    # (time.monotonic(), endpoint) of recent Bakong calls, for rate assertions in tests.
    call_log: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=100_000))
    # Bakong calls that came through a proxy (BAKONG_PROXY_URL): on a connection whose first
    # request carried its `Via` header (a proxy passes later ones on unchanged).
    proxied: int = 0
    proxied_peers: set[Any] = field(default_factory=set)
    in_flight: int = 0
    peak_in_flight: int = 0


STATE_KEY = web.AppKey("sandbox_state", SandboxState)
EXPECTATIONS_KEY: web.AppKey[Expectations] = web.AppKey("sandbox_expectations")


class SandboxError(Exception):
    """A control request refused, answered in the gateway's error shape by `_errors`.

    Not an aiohttp HTTPException: mounted in the gateway, its error middleware would answer
    one with the bare reason ("Unprocessable Entity") and lose the message."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


def _invalid(name: str, message: str) -> SandboxError:
    return SandboxError(422, "validation_error", message, [{"field": name, "message": message}])


def _envelope(code: int, message: str, error: int | None, data: Any) -> web.Response:
    return web.json_response(
        {"responseCode": code, "responseMessage": message, "errorCode": error, "data": data},
        dumps=lambda v: orjson.dumps(v).decode(),
    )


def _unauthorized() -> web.Response:
    return web.json_response(
        {"responseCode": 1, "responseMessage": "Unauthorized", "errorCode": 6, "data": None},
        status=401,
    )


def _authorized(request: web.Request, state: SandboxState) -> bool:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer ") or len(header) <= 7:
        return False
    token = header[7:]
    exp = _token_exp(token)
    if token in state.revoked:
        return False
    return exp is None or exp > time.time()


LIST_ENDPOINT = "check_transaction_by_md5_list"
DEEPLINK_ENDPOINT = "generate_deeplink_by_qr"
ENDPOINTS = frozenset({"check_transaction_by_md5", LIST_ENDPOINT, DEEPLINK_ENDPOINT, "renew_token"})


# What Bakong answers a host outside Cambodia, as other clients report it: every call.
GEO_BLOCK_PAGE = (
    "<html>\r\n<head><title>403 Forbidden</title></head>\r\n<body>\r\n"
    "<center><h1>403 Forbidden</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)


async def _fault_response(state: SandboxState, endpoint: str) -> web.Response | None:
    faults = state.faults
    if faults.geo_block:
        return web.Response(status=403, text=GEO_BLOCK_PAGE, content_type="text/html")
    if not faults.applies(endpoint):
        return None
    status = faults.list_status if endpoint == LIST_ENDPOINT and faults.list_status else None
    status = status or faults.status
    if not (status or faults.delay_s or faults.malformed):
        return None
    if not faults.take():
        return None
    if faults.delay_s:
        await asyncio.sleep(faults.delay_s)
    if status:
        headers = {"Retry-After": faults.retry_after} if faults.retry_after else None
        return web.Response(status=status, text="simulated fault", headers=headers)
    if faults.malformed == "shape":
        return web.json_response({"responseCode": 0, "data": "not what you expect"})
    if faults.malformed:
        return web.Response(text="<html>not json", content_type="text/html")
    return None


async def _json(request: web.Request) -> Any:
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return None


def _check_one(state: SandboxState, md5: str) -> web.Response:
    payment = state.payments.get(md5)
    state.checks[md5] += 1
    state.single_checks[md5] += 1
    if payment is None:
        return _envelope(1, "Transaction could not be found. Please check and try again.", 1, None)
    if payment.status == "failed":
        return _envelope(1, "Transaction failed.", 3, None)
    return _envelope(0, "Getting transaction successfully.", None, payment.data)


async def check_md5(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.calls["check_transaction_by_md5"] += 1
    if fault := await _fault_response(state, "check_transaction_by_md5"):
        return fault
    if not _authorized(request, state):
        return _unauthorized()
    body = await _json(request)
    md5 = body.get("md5") if isinstance(body, dict) else None
    if not isinstance(md5, str) or not md5:
        return _envelope(1, "Missing required fields", 5, None)
    return _check_one(state, md5.lower())


def _list_item(state: SandboxState, md5: str) -> dict[str, Any]:
    state.checks[md5] += 1
    payment = state.payments.get(md5)
    if payment is not None and payment.status == "paid":
        return {
            "md5": md5,
            "status": "SUCCESS",
            "message": "Transaction found",
            "data": payment.data,
        }
    if payment is not None:
        # The sheet lists only SUCCESS / NOT_FOUND / STATIC_QR; a failed payment is reported
        # with its own status so that clients ask the per-md5 endpoint for the truth.
        return {"md5": md5, "status": "FAILED", "message": "Transaction failed", "data": None}
    return {"md5": md5, "status": "NOT_FOUND", "message": "Transaction not found", "data": None}


async def check_md5_list(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.calls["check_transaction_by_md5_list"] += 1
    if fault := await _fault_response(state, LIST_ENDPOINT):
        return fault
    if not _authorized(request, state):
        return _unauthorized()
    body = await _json(request)
    if isinstance(body, dict):
        body = body.get("md5List")
    if not isinstance(body, list) or not all(isinstance(m, str) for m in body):
        return _envelope(1, "Missing required fields", 5, None)
    if len(body) > 50:
        return _envelope(1, "Too many md5s: at most 50", 5, None)
    items = [_list_item(state, m.lower()) for m in body]
    return _envelope(0, "Getting transaction successfully.", None, items)


async def renew_token(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.calls["renew_token"] += 1
    if fault := await _fault_response(state, "renew_token"):
        return fault
    body = await _json(request)
    email = body.get("email") if isinstance(body, dict) else None
    if not isinstance(email, str) or "@" not in email:
        return _envelope(1, "Missing required fields", 5, None)
    if state.registered_emails is not None and email.lower() not in state.registered_emails:
        return _envelope(1, "Not registered yet", 10, None)
    return _envelope(0, "Token has been issued", None, {"token": make_token(email)})


async def generate_deeplink(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.calls[DEEPLINK_ENDPOINT] += 1
    if fault := await _fault_response(state, DEEPLINK_ENDPOINT):
        return fault
    if not _authorized(request, state):
        return _unauthorized()
    body = await _json(request)
    qr = body.get("qr") if isinstance(body, dict) else None
    source = body.get("sourceInfo") if isinstance(body, dict) else None
    if not isinstance(qr, str) or not isinstance(source, dict) or not _payable(qr):
        return _envelope(1, "Missing required fields", 5, None)
    if state.faults.deeplink_error:
        return _envelope(1, "Failed to generate deeplink", 4, None)
    if state.faults.short_link is not None:
        return _envelope(0, "Success", None, {"shortLink": state.faults.short_link})
    key = secrets.token_urlsafe(12)
    state.links[key] = Link(qr, source)
    while len(state.links) > LINKS_MAX:
        del state.links[next(iter(state.links))]
    # Where this sandbox is mounted (its own port, or /sandbox in the gateway).
    base = str(request.url.with_query(None)).rsplit("/v1/", 1)[0]
    return _envelope(0, "Success", None, {"shortLink": f"{base}/link/{key}"})


def _payable(qr: str) -> bool:
    try:
        return khqr.parse(qr).dynamic
    except khqr.KhqrError:
        return False


LINK_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">%(refresh)s
<title>Simulated Bakong</title></head>
<body>
<p><strong>Simulated Bakong</strong> (sandbox: no real money)</p>
<h1 id="paid">%(what)s</h1>
<p>%(back)s</p></body></html>"""


async def open_link(request: web.Request) -> web.Response:
    """GET /link/{id}: what paying in the Bakong app does: the QR is paid, then back."""
    state = request.app[STATE_KEY]
    link = state.links.get(request.match_info["key"])
    if link is None:
        return web.Response(status=404, text="no such link", content_type="text/plain")
    parsed = khqr.parse(link.qr)
    if parsed.md5 not in state.payments:  # opened twice, paid once
        state.payments[parsed.md5] = Payment("paid", _qr_payment(parsed))
    what = f"Paid {parsed.amount} {parsed.currency} to {parsed.merchant_name}"
    callback = str(link.source.get("appDeepLinkCallback") or "")
    name = str(link.source.get("appName") or "the app")
    back, refresh = "", ""
    if callback.lower().startswith(("https://", "http://")):
        href = html.escape(callback, quote=True)
        back = f'<a id="back" href="{href}">Back to {html.escape(name)}</a>'
        refresh = f'\n<meta http-equiv="refresh" content="2;url={href}">'
    page = LINK_PAGE % {"what": html.escape(what), "back": back, "refresh": refresh}
    return web.Response(
        text=page,
        content_type="text/html",
        headers={"Content-Security-Policy": "default-src 'none'"},
    )


def _qr_payment(parsed: khqr.Khqr) -> dict[str, Any]:
    return _payment_data(
        parsed.md5,
        {
            "amount": str(parsed.amount or 0),
            "currency": parsed.currency,
            "toAccountId": parsed.account_id,
            "fromAccountId": "sandbox@bakong",
        },
    )


PAYMENT_DEFAULTS = {"amount": 1, "currency": "USD", "toAccountId": "merchant@devb"}


def _amount(value: Any) -> int | float:
    """A JSON number as Bakong sends one: whole amounts as integers."""
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        amount = None
    if isinstance(value, bool) or amount is None or not amount.is_finite():
        raise _invalid("amount", "amount must be a number")
    return int(amount) if amount == amount.to_integral() else float(amount)


def _payment_data(
    md5: str, body: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    now = times.now_ms()
    body = {**PAYMENT_DEFAULTS, **(defaults or {}), **body}
    amount_value = _amount(body["amount"])
    return {
        "hash": hashlib.sha256(f"{md5}:{now}".encode()).hexdigest(),
        "fromAccountId": body.get("fromAccountId", "customer@aclb"),
        "toAccountId": body["toAccountId"],
        "currency": body["currency"],
        "amount": amount_value,
        "description": body.get("description", ""),
        "createdDateMs": now,
        "acknowledgedDateMs": now,
        "trackingStatus": None,
        "receiverBank": None,
        "receiverBankAccount": None,
        "instructionRef": None,
        "externalRef": body.get("externalRef", f"100FT{now}"),
    }


def _md5_param(request: web.Request) -> str:
    md5 = request.match_info["md5"].lower()
    if len(md5) != 32 or any(c not in "0123456789abcdef" for c in md5):
        raise _invalid("md5", "md5 must be 32 hex characters")
    return md5


async def _object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; no body is `{}`, anything else is a 400."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise SandboxError(400, "bad_request", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise SandboxError(400, "bad_request", "the body must be a JSON object")
    return body


async def control_pay(request: web.Request) -> web.Response:
    md5 = _md5_param(request)
    body = await _object(request)
    expectations = request.app.get(EXPECTATIONS_KEY)
    defaults: Mapping[str, Any] = {}
    if expectations is not None and not PAYMENT_DEFAULTS.keys() <= body.keys():
        # Paying what the transaction expects, so that trying a payment out is a success,
        # not a mismatch; what the body names is paid as named.
        defaults = await expectations(md5)
    data = _payment_data(md5, body, defaults)
    request.app[STATE_KEY].payments[md5] = Payment("paid", data)
    return web.json_response({"md5": md5, "status": "paid", "data": data})


async def control_fail(request: web.Request) -> web.Response:
    md5 = _md5_param(request)
    request.app[STATE_KEY].payments[md5] = Payment("failed")
    return web.json_response({"md5": md5, "status": "failed"})


async def control_get(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    md5 = _md5_param(request)
    payment = state.payments.get(md5)
    return web.json_response(
        {
            "md5": md5,
            "status": payment.status if payment else "unpaid",
            "checks": state.checks[md5],
            "singleChecks": state.single_checks[md5],
        }
    )


async def control_stats(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return web.json_response(
        {
            "calls": dict(state.calls),
            "md5sChecked": len(state.checks),
            "md5Checks": sum(state.checks.values()),
            "peakInFlight": state.peak_in_flight,
            "proxied": state.proxied,
        }
    )


def _bad_request(message: str) -> SandboxError:
    return SandboxError(400, "bad_request", message)


def parse_faults(body: Any) -> Faults:
    """The body of POST /control/faults as Faults; ValueError names what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    unknown = set(body) - {
        "status",
        "listStatus",
        "retryAfter",
        "delayS",
        "malformed",
        "endpoints",
        "count",
        "geoBlock",
        "deeplinkError",
        "shortLink",
    }
    if unknown:
        raise ValueError(f"unknown fields: {', '.join(sorted(unknown))}")

    def status(name: str) -> int | None:
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or not 100 <= value <= 599):
            raise ValueError(f"{name} must be an HTTP status")
        return value

    retry_after = body.get("retryAfter")
    delay = body.get("delayS", 0)
    if isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 <= delay <= 120:
        raise ValueError("delayS must be a number of seconds (0-120)")
    malformed = body.get("malformed", False)
    if malformed not in (True, False, None, "html", "shape"):
        raise ValueError('malformed must be true, "html" or "shape"')
    endpoints = body.get("endpoints")
    if endpoints is not None and (
        not isinstance(endpoints, list) or not set(endpoints) <= ENDPOINTS
    ):
        raise ValueError(f"endpoints must be a list of {', '.join(sorted(ENDPOINTS))}")
    count = body.get("count")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise ValueError("count must be a whole number")
    geo_block = body.get("geoBlock", False)
    if not isinstance(geo_block, bool):
        raise ValueError("geoBlock must be true or false")
    deeplink_error = body.get("deeplinkError", False)
    if not isinstance(deeplink_error, bool):
        raise ValueError("deeplinkError must be true or false")
    return Faults(
        status=status("status"),
        list_status=status("listStatus"),
        retry_after=str(retry_after) if retry_after is not None else None,
        delay_s=float(delay),
        malformed="html" if malformed is True else (malformed or None),
        endpoints=frozenset(endpoints) if endpoints is not None else None,
        remaining=count,
        geo_block=geo_block,
        deeplink_error=deeplink_error,
        short_link=body.get("shortLink"),
    )


async def control_faults(request: web.Request) -> web.Response:
    try:
        faults = parse_faults(await _object(request))
    except ValueError as exc:
        raise _bad_request(str(exc)) from None
    request.app[STATE_KEY].faults = faults
    return web.json_response({"ok": True})


async def control_revoke(request: web.Request) -> web.Response:
    token = (await _object(request)).get("token")
    if not isinstance(token, str) or not token:
        raise _bad_request("give the token to revoke")
    request.app[STATE_KEY].revoked.add(token)
    return web.json_response({"ok": True})


async def control_emails(request: web.Request) -> web.Response:
    body = await _object(request)
    if "registered" not in body:
        raise _bad_request("give registered: a list of emails, or null for every email")
    registered = body["registered"]
    if registered is not None and (
        not isinstance(registered, list) or not all(isinstance(e, str) for e in registered)
    ):
        raise _bad_request("registered must be a list of emails or null")
    request.app[STATE_KEY].registered_emails = (
        None if registered is None else {e.lower() for e in registered}
    )
    return web.json_response({"ok": True})


async def control_token(request: web.Request) -> web.Response:
    body = await _object(request)
    email, exp = body.get("email", "dev@example.com"), body.get("exp")
    if not isinstance(email, str) or (exp is not None and type(exp) is not int):
        raise _bad_request("email must be a string and exp a unix time in seconds")
    return web.json_response({"token": make_token(email, exp=exp)})


async def control_reset(request: web.Request) -> web.Response:
    request.app[STATE_KEY] = SandboxState()
    return web.json_response({"ok": True})


INBOX_LIMIT = 100


async def inbox_receive(request: web.Request) -> web.Response:
    """A webhook receiver for trying the gateway out: keeps the last 100 per inbox."""
    name = request.match_info["name"][:64]
    raw = await request.read()
    try:
        body: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = raw.decode("utf-8", "replace")
    inbox = request.app[STATE_KEY].inboxes.setdefault(name, [])
    headers = {
        k.lower(): v
        for k, v in request.headers.items()
        if k.lower().startswith(("webhook-", "x-webhook"))
    }
    inbox.append({"receivedAt": times.now_ms(), "headers": headers, "body": body})
    del inbox[:-INBOX_LIMIT]
    return web.json_response({"ok": True})


async def inbox_list(request: web.Request) -> web.Response:
    inbox = request.app[STATE_KEY].inboxes.get(request.match_info["name"][:64], [])
    return web.json_response(
        inbox, dumps=lambda v: orjson.dumps(v, option=orjson.OPT_INDENT_2).decode()
    )


@web.middleware
async def _count_calls(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Log each Bakong call and how many are in flight at once."""
    if "/v1/" not in request.path:
        return await handler(request)
    state = request.app[STATE_KEY]
    state.call_log.append((time.monotonic(), request.path.rsplit("/", 1)[-1]))
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if "Via" in request.headers:
        state.proxied_peers.add(peer)
    if peer in state.proxied_peers:
        state.proxied += 1
    state.in_flight += 1
    state.peak_in_flight = max(state.peak_in_flight, state.in_flight)
    try:
        return await handler(request)
    finally:
        state.in_flight -= 1


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except SandboxError as exc:
        body = {"error": {"code": exc.code, "message": exc.message, "details": exc.details}}
        return web.Response(
            body=orjson.dumps(body), status=exc.status, content_type="application/json"
        )


def create_sandbox_app(
    state: SandboxState | None = None, *, expectations: Expectations | None = None
) -> web.Application:
    """The simulated Bakong as an aiohttp application; `expectations` (mounted in the
    gateway) tells what a pay with no amount, currency or account pays."""
    app = web.Application(client_max_size=1024 * 1024, middlewares=[_errors, _count_calls])
    app[STATE_KEY] = state or SandboxState()
    if expectations is not None:
        app[EXPECTATIONS_KEY] = expectations
    app.router.add_post("/v1/check_transaction_by_md5", check_md5)
    app.router.add_post("/v1/check_transaction_by_md5_list", check_md5_list)
    app.router.add_post("/v1/renew_token", renew_token)
    app.router.add_post(f"/v1/{DEEPLINK_ENDPOINT}", generate_deeplink)
    app.router.add_get("/link/{key}", open_link)
    app.router.add_post("/control/transactions/{md5}/pay", control_pay)
    app.router.add_post("/control/transactions/{md5}/fail", control_fail)
    app.router.add_get("/control/transactions/{md5}", control_get)
    app.router.add_get("/control/stats", control_stats)
    app.router.add_post("/control/faults", control_faults)
    app.router.add_post("/control/token", control_token)
    app.router.add_post("/control/tokens/revoke", control_revoke)
    app.router.add_post("/control/emails", control_emails)
    app.router.add_post("/control/reset", control_reset)
    app.router.add_post("/control/inbox/{name}", inbox_receive)
    app.router.add_get("/control/inbox/{name}", inbox_list)
    return app
