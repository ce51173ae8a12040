"""What Bakong said about one md5: the result of one check, and why there was no answer (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class CheckKind(StrEnum):
    """What one Bakong check said about one md5."""

    PAID = "paid"
    FAILED = "failed"
    NOT_FOUND = "not_found"
    # No trustworthy answer: network, 5xx, 429, 401/403, malformed reply, static QR.
    ERROR = "error"


class ErrorKind(StrEnum):
    """Why a Bakong call gave no trustworthy answer. The values are metric labels, stats keys
    and words of stored errors: they stay as they are."""

    # The way to Bakong, or Bakong itself, failed.
    TIMEOUT = "timeout"
    NETWORK = "network"
    PROXY_UNREACHABLE = "proxy_unreachable"
    PROXY_REFUSED = "proxy_refused"
    SERVER_ERROR = "server_error"
    BAD_STATUS = "bad_status"
    MALFORMED_REPLY = "malformed_reply"
    FORBIDDEN = "forbidden"
    ENDPOINT_NOT_FOUND = "endpoint_not_found"
    RATE_LIMITED = "rate_limited"
    # Bakong answered, refusing: the token, the QR, or an errorCode of its own (`code`).
    UNAUTHORIZED = "unauthorized"
    STATIC_QR = "static_qr_not_supported"
    BAKONG_ERROR = "bakong_error"
    LINK_PROVIDER_FAILED = "link_provider_failed"
    NOT_REGISTERED = "not_registered"
    RENEW_FAILED = "renew_failed"
    # Bakong was not asked, or its answer not read, for a reason of the gateway's own.
    THROTTLED = "throttled"  # the shared rate limit had no room
    CIRCUIT_OPEN = "circuit_open"
    NO_TOKEN = "no_token"
    CLIENT_ERROR = "client_error"
    NO_RESULT = "no_result"

    @property
    def unhealthy(self) -> bool:
        """Says that Bakong (or the way to it) is unwell. Any other answer, `unauthorized`
        and errorCodes in a well-formed envelope included, shows that Bakong is up."""
        return self in _UNHEALTHY

    @property
    def unauthorized(self) -> bool:
        """No usable token: Bakong refused it, or there was none to send."""
        return self in (ErrorKind.UNAUTHORIZED, ErrorKind.NO_TOKEN)


_UNHEALTHY = frozenset(
    {
        ErrorKind.SERVER_ERROR,
        ErrorKind.TIMEOUT,
        ErrorKind.NETWORK,
        ErrorKind.MALFORMED_REPLY,
        ErrorKind.BAD_STATUS,
        ErrorKind.FORBIDDEN,
        ErrorKind.ENDPOINT_NOT_FOUND,
    }
)


@dataclass(frozen=True, slots=True)
class CheckResult:
    kind: CheckKind
    data: dict[str, Any] | None = None
    # Why there was no answer (ERROR only).
    error: ErrorKind | None = None
    # No answer yet and not worth asking again for this many seconds (429, open circuit).
    retry_after: float | None = None
    # Bakong's errorCode when it refused with one the gateway has no word for (BAKONG_ERROR).
    code: int | None = None
