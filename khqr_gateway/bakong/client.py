"""Async Bakong Open API client: batched md5 checks, per-md5 checks, deep links, token renewal."""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from khqr_gateway.bakong.model import CheckKind, CheckResult, ErrorKind
from khqr_gateway.metrics import BAKONG_CALLS, BAKONG_GEO_BLOCKED, BAKONG_LATENCY
from khqr_gateway.times import parse_retry_after

log = logging.getLogger(__name__)

MAX_BATCH = 50
# Bakong answering 403 to every call for this long is taken for its refusal of hosts
# outside Cambodia (/ready says so and names BAKONG_PROXY_URL).
GEO_BLOCK_AFTER_S = 60.0
NOT_FOUND_CODE = 1
STATIC_QR_CODE = 2
FAILED_CODE = 3
LINK_PROVIDER_CODE = 4
UNAUTHORIZED_CODE = 6
NOT_REGISTERED_CODE = 10
# A deep link ends up in a page's href: a plain URL (https, or an app's own scheme), never
# javascript: or data:, whatever Bakong (or whatever answers in its place) sends.
LINK_MAX = 2048
_LINK = re.compile(r"^(?!(?:javascript|data|vbscript|file|blob):)[a-z][a-z0-9+.-]*://[!-~]+$", re.I)


class BakongError(Exception):
    """A Bakong call that gave no trustworthy answer, and why (`kind`)."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retry_after = retry_after

    @property
    def unauthorized(self) -> bool:
        return self.kind is ErrorKind.UNAUTHORIZED

    @property
    def list_unsupported(self) -> bool:
        """403/404 on the list endpoint: fall back to per-md5 checks."""
        return self.status in (403, 404)


def _retry_after(headers: Any) -> float | None:
    return parse_retry_after(headers.get("Retry-After"))


def _error_for_status(status: int, headers: Any) -> BakongError:
    if status == 407:
        return BakongError(ErrorKind.PROXY_REFUSED, "BAKONG_PROXY_URL answered 407", status=status)
    if status == 401:
        return BakongError(ErrorKind.UNAUTHORIZED, "Bakong answered 401", status=status)
    if status == 403:
        return BakongError(ErrorKind.FORBIDDEN, "Bakong answered 403", status=status)
    if status == 404:
        return BakongError(ErrorKind.ENDPOINT_NOT_FOUND, "Bakong answered 404", status=status)
    if status == 429:
        return BakongError(
            ErrorKind.RATE_LIMITED,
            "Bakong answered 429",
            status=status,
            retry_after=_retry_after(headers),
        )
    if status >= 500:
        return BakongError(ErrorKind.SERVER_ERROR, f"Bakong answered {status}", status=status)
    return BakongError(ErrorKind.BAD_STATUS, f"Bakong answered {status}", status=status)


def result_from_envelope(body: Any) -> CheckResult:
    """Map a check_transaction_by_md5 reply to what it says about the payment."""
    if not isinstance(body, dict):
        return CheckResult(CheckKind.ERROR, error=ErrorKind.MALFORMED_REPLY)
    code = body.get("responseCode")
    error_code = body.get("errorCode")
    if code == 0:
        data = body.get("data")
        if isinstance(data, dict):
            return CheckResult(CheckKind.PAID, data=data)
        return CheckResult(CheckKind.ERROR, error=ErrorKind.MALFORMED_REPLY)
    if error_code == NOT_FOUND_CODE:
        return CheckResult(CheckKind.NOT_FOUND)
    if error_code == FAILED_CODE:
        return CheckResult(CheckKind.FAILED)
    if error_code == UNAUTHORIZED_CODE:
        return CheckResult(CheckKind.ERROR, error=ErrorKind.UNAUTHORIZED)
    if error_code == STATIC_QR_CODE:
        return CheckResult(CheckKind.ERROR, error=ErrorKind.STATIC_QR)
    return CheckResult(CheckKind.ERROR, error=ErrorKind.BAKONG_ERROR, code=_error_code(error_code))


def _error_code(value: Any) -> int | None:
    """An errorCode as the number (0 or more) it should be; None for anything else."""
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def results_from_list(body: Any, md5s: Sequence[str]) -> dict[str, CheckResult | None]:
    """Map a check_transaction_by_md5_list reply by md5 (never by position).

    A value of None means the list gave no usable answer for that md5 (missing, an
    unknown status such as a failed payment): the caller asks the per-md5 endpoint.
    """
    if not isinstance(body, dict):
        raise BakongError(ErrorKind.MALFORMED_REPLY, "Bakong list reply is not an object")
    if body.get("responseCode") != 0:
        if body.get("errorCode") == UNAUTHORIZED_CODE:
            raise BakongError(ErrorKind.UNAUTHORIZED, "Bakong list reply: token expired or invalid")
        if body.get("errorCode") == NOT_FOUND_CODE:
            # Some deployments answer "not found" for the whole list when nothing is paid.
            return {md5: CheckResult(CheckKind.NOT_FOUND) for md5 in md5s}
        raise BakongError(ErrorKind.BAKONG_ERROR, f"Bakong list errorCode {body.get('errorCode')}")
    items = body.get("data")
    if not isinstance(items, list):
        raise BakongError(ErrorKind.MALFORMED_REPLY, "Bakong list reply has no data array")
    wanted = set(md5s)
    out: dict[str, CheckResult | None] = dict.fromkeys(md5s)
    for item in items:
        if not isinstance(item, dict):
            continue
        md5 = str(item.get("md5", "")).lower()
        if md5 not in wanted:
            continue
        out[md5] = _list_item_result(item)
    return out


def _list_item_result(item: dict[str, Any]) -> CheckResult | None:
    status = str(item.get("status", "")).upper()
    if status == "SUCCESS" and isinstance(item.get("data"), dict):
        return CheckResult(CheckKind.PAID, data=item["data"])
    if status == "NOT_FOUND":
        return CheckResult(CheckKind.NOT_FOUND)
    return None


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What the Bakong app shows of the app that sent the payer, and where it returns them."""

    app_name: str
    app_icon_url: str
    callback_url: str

    def to_json(self) -> dict[str, str]:
        return {
            "appName": self.app_name,
            "appIconUrl": self.app_icon_url,
            "appDeepLinkCallback": self.callback_url,
        }


def link_from_envelope(body: Any) -> str:
    """The short link of a generate_deeplink_by_qr reply; BakongError when there is none."""
    if not isinstance(body, dict):
        raise BakongError(ErrorKind.MALFORMED_REPLY, "Bakong deeplink reply is not an object")
    if body.get("responseCode") != 0:
        error_code = body.get("errorCode")
        if error_code == UNAUTHORIZED_CODE:
            raise BakongError(ErrorKind.UNAUTHORIZED, "Bakong deeplink: token expired or invalid")
        if error_code == LINK_PROVIDER_CODE:
            raise BakongError(
                ErrorKind.LINK_PROVIDER_FAILED, "Bakong deeplink: the link provider failed"
            )
        raise BakongError(ErrorKind.BAKONG_ERROR, f"Bakong deeplink errorCode {error_code}")
    data = body.get("data")
    link = data.get("shortLink") if isinstance(data, dict) else None
    if not isinstance(link, str) or len(link) > LINK_MAX or not _LINK.fullmatch(link):
        raise BakongError(
            ErrorKind.MALFORMED_REPLY, "Bakong deeplink reply has no usable shortLink"
        )
    return link


class RecentCalls:
    """Bakong call outcomes of the last few minutes, per minute, for /api/v1/stats."""

    def __init__(self, minutes: int = 5) -> None:
        self.minutes = minutes
        self._buckets: dict[int, Counter[str]] = {}
        self.last: tuple[float, str] | None = None  # when (epoch s) the newest call ended, how

    def add(self, outcome: str, now: float | None = None) -> None:
        at = time.time() if now is None else now
        minute = int(at // 60)
        self._buckets.setdefault(minute, Counter())[outcome] += 1
        if self.last is None or at >= self.last[0]:
            self.last = (at, outcome)
        for old in [m for m in self._buckets if m <= minute - self.minutes]:
            del self._buckets[old]

    def summary(self, now: float | None = None) -> dict[str, Any]:
        minute = int((time.time() if now is None else now) // 60)
        total: Counter[str] = Counter()
        for m, bucket in self._buckets.items():
            if m > minute - self.minutes:
                total.update(bucket)
        calls = sum(total.values())
        errors = calls - total["ok"]
        return {
            "windowMinutes": self.minutes,
            "calls": calls,
            "errors": errors,
            "errorRate": round(errors / calls, 4) if calls else 0.0,
            "byError": {k: v for k, v in total.items() if k != "ok"},
        }


class Refusals:
    """Whether Bakong has answered 403 to every call for a while: how it treats a host
    outside Cambodia (a bare nginx page). One warning per episode, and a gauge."""

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self._since: float | None = None
        self._reported = False

    def refused(self, now: float) -> None:
        if self._since is None:
            self._since = now
        if not self._reported and now - self._since >= self.after_s:
            self._reported = True
            BAKONG_GEO_BLOCKED.set(1)
            log.warning(
                "Bakong has refused every call with 403 for %.0f s: it refuses hosts outside "
                "Cambodia; set BAKONG_PROXY_URL to an http(s) proxy there",
                now - self._since,
            )

    def answered(self) -> None:
        if self._reported:
            BAKONG_GEO_BLOCKED.set(0)
            log.info("Bakong answers again after refusing every call")
        self._since = None
        self._reported = False

    def blocked_for(self, now: float) -> float | None:
        """Seconds Bakong has refused every call, once that is `after_s` or more."""
        if self._since is None or now - self._since < self.after_s:
            return None
        return now - self._since


class BakongClient:
    """One per process: a keep-alive session with explicit timeouts, through
    BAKONG_PROXY_URL when one is set."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 10.0,
        max_connections: int = 32,
        proxy_url: str | None = None,
        geo_block_after_s: float = GEO_BLOCK_AFTER_S,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(timeout_s, 5.0))
        self._max_connections = max_connections
        # aiohttp sends the URL's user:password as Proxy-Authorization (CONNECT for https).
        self.proxy_url = proxy_url
        self._session: aiohttp.ClientSession | None = None
        self.calls = 0
        self.recent = RecentCalls()
        self.refusals = Refusals(geo_block_after_s)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self.timeout,
                json_serialize=lambda v: orjson.dumps(v).decode(),
                headers={"User-Agent": "khqr-gateway"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _post(self, name: str, body: Any, token: str | None) -> Any:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.calls += 1
        start = time.perf_counter()
        try:
            reply = await self._send(name, body, headers)
        except BakongError as exc:
            BAKONG_CALLS.labels(name, exc.kind).inc()
            self.recent.add(exc.kind.value)
            if exc.status == 403:
                self.refusals.refused(time.monotonic())
            elif exc.status is not None:
                self.refusals.answered()
            raise
        finally:
            BAKONG_LATENCY.labels(name).observe(time.perf_counter() - start)
        self.refusals.answered()
        BAKONG_CALLS.labels(name, "ok").inc()
        self.recent.add("ok")
        return reply

    async def _send(self, name: str, body: Any, headers: dict[str, str]) -> Any:
        try:
            async with self.session.post(
                f"{self.base_url}/v1/{name}",
                data=orjson.dumps(body),
                headers=headers,
                proxy=self.proxy_url,
            ) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise _error_for_status(resp.status, resp.headers)
        except TimeoutError:
            raise BakongError(ErrorKind.TIMEOUT, f"Bakong {name} timed out") from None
        except aiohttp.ClientProxyConnectionError:
            # Never the proxy's URL: it may hold a password.
            raise BakongError(
                ErrorKind.PROXY_UNREACHABLE, "BAKONG_PROXY_URL is unreachable"
            ) from None
        except aiohttp.ClientError as exc:
            raise BakongError(ErrorKind.NETWORK, f"Bakong {name}: {type(exc).__name__}") from None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise BakongError(
                ErrorKind.MALFORMED_REPLY, f"Bakong {name} reply is not JSON"
            ) from None

    async def check_md5_list(
        self, token: str | None, md5s: Sequence[str]
    ) -> dict[str, CheckResult | None]:
        """Check up to 50 md5s in one call; see `results_from_list`."""
        if len(md5s) > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} md5s a call")
        body = await self._post("check_transaction_by_md5_list", list(md5s), token)
        return results_from_list(body, md5s)

    async def check_md5(self, token: str | None, md5: str) -> CheckResult:
        """Check one md5; every failure comes back as an ERROR result, never raised."""
        try:
            body = await self._post("check_transaction_by_md5", {"md5": md5}, token)
        except BakongError as exc:
            return CheckResult(CheckKind.ERROR, error=exc.kind, retry_after=exc.retry_after)
        return result_from_envelope(body)

    async def deeplink(self, token: str | None, qr: str, source: SourceInfo) -> str:
        """A link that opens the Bakong app with `qr` filled in; BakongError when none."""
        body = {"qr": qr, "sourceInfo": source.to_json()}
        return link_from_envelope(await self._post("generate_deeplink_by_qr", body, token))

    async def renew_token(self, email: str) -> str:
        """Ask Bakong for a fresh token for a registered email."""
        body = await self._post("renew_token", {"email": email}, None)
        if isinstance(body, dict) and body.get("responseCode") == 0:
            token = (body.get("data") or {}).get("token")
            if isinstance(token, str) and token:
                return token
        if isinstance(body, dict) and body.get("errorCode") == NOT_REGISTERED_CODE:
            raise BakongError(ErrorKind.NOT_REGISTERED, "Bakong: email not registered")
        raise BakongError(ErrorKind.RENEW_FAILED, "Bakong renew_token gave no token")
