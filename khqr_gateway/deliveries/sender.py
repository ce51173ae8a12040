"""One webhook attempt: POST the stored bytes signed now, read a bounded answer, name the error."""

from __future__ import annotations

import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp

from khqr_gateway import __version__
from khqr_gateway.deliveries.model import DueDelivery
from khqr_gateway.deliveries.signing import sign_headers
from khqr_gateway.deliveries.ssrf import Blocked

RESPONSE_BODY_LIMIT = 4096
KEPT_RESPONSE_HEADERS = ("retry-after", "content-type")
# Sends at once from one process, and so connections kept open.
MAX_IN_FLIGHT = 256
KEEPALIVE_S = 30.0
# The secrets that sign an app's webhooks now, newest first.
SecretsOf = Callable[[str], Awaitable[Sequence[bytes]]]


@dataclass(frozen=True, slots=True)
class SendResult:
    """What one attempt got: an HTTP answer (status, first bytes, kept headers) or an error."""

    status: int | None
    error_kind: str | None
    error_message: str | None
    body: str | None
    headers: dict[str, str] | None
    started_at: datetime
    duration_ms: int


class Sender:
    """Sends webhooks over one keep-alive session that never follows redirects."""

    def __init__(
        self,
        *,
        secrets: Sequence[bytes],
        timeout_s: float,
        connector_factory: Callable[[], aiohttp.BaseConnector] | None = None,
        secrets_of: SecretsOf | None = None,
    ) -> None:
        self.secrets = tuple(secrets)
        self.secrets_of = secrets_of
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._connector_factory = connector_factory
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = (
                self._connector_factory()
                if self._connector_factory
                else aiohttp.TCPConnector(limit=MAX_IN_FLIGHT, keepalive_timeout=KEEPALIVE_S)
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self.timeout,
                # Bodies are stored as sent, not decompressed: ask for them uncompressed.
                headers={
                    "User-Agent": f"khqr-gateway/{__version__}",
                    "Accept-Encoding": "identity",
                },
                auto_decompress=False,
            )
        return self._session

    async def send(self, delivery: DueDelivery) -> SendResult:
        """One attempt: POST the stored bytes, signed now, never following redirects."""
        started_at = datetime.now(UTC)
        start = time.perf_counter()
        try:
            timestamp = int(time.time())
            headers = {"Content-Type": "application/json"}
            secrets = await self._secrets(delivery.app_id)
            headers.update(sign_headers(secrets, delivery.id, timestamp, delivery.payload))
            async with self.session.post(
                delivery.url, data=delivery.payload, headers=headers, allow_redirects=False
            ) as resp:
                return await _answer(resp, started_at, start)
        except Exception as exc:  # every failure is an attempt to record, never a crash
            return SendResult(
                None,
                error_kind(exc),
                str(exc)[:500] or type(exc).__name__,
                None,
                None,
                started_at,
                _ms_since(start),
            )

    async def _secrets(self, app_id: str) -> Sequence[bytes]:
        """The app's secrets (`secrets` for all without `secrets_of`); an error reading them
        fails the attempt: a webhook never goes out unsigned by mistake."""
        if self.secrets_of is None:
            return self.secrets
        try:
            return await self.secrets_of(app_id)
        except Exception as exc:
            raise SecretsUnavailable(f"the app's webhook secrets could not be read: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


async def _answer(resp: aiohttp.ClientResponse, started_at: datetime, start: float) -> SendResult:
    body = await _read_limited(resp, RESPONSE_BODY_LIMIT)
    kept = {k: resp.headers[k] for k in KEPT_RESPONSE_HEADERS if k in resp.headers}
    return SendResult(
        resp.status,
        None,
        None,
        body.decode("utf-8", "replace"),
        kept or None,
        started_at,
        _ms_since(start),
    )


class SecretsUnavailable(Exception):
    """What signs an app's webhook could not be read: the attempt is not sent (and retried)."""


def error_kind(exc: BaseException) -> str:
    """A short word for why an attempt got no HTTP answer."""
    if isinstance(exc, SecretsUnavailable):
        return "secrets-unavailable"
    if isinstance(exc, Blocked):
        return "ssrf-blocked"
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return "timeout"
    if isinstance(
        exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError | ssl.SSLError
    ):
        return "tls"
    dns_error = getattr(aiohttp, "ClientConnectorDNSError", None)
    if dns_error is not None and isinstance(exc, dns_error):
        return "dns"
    if isinstance(
        exc, aiohttp.ClientConnectorError | aiohttp.ServerDisconnectedError | ConnectionError
    ):
        return "connect"
    if isinstance(exc, aiohttp.InvalidURL):
        return "invalid-url"
    return "network"


async def _read_limited(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await resp.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _ms_since(start: float) -> int:
    return int((time.perf_counter() - start) * 1000)
