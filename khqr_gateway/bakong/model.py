"""What Bakong said about one md5: the result of one check (pure)."""

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


@dataclass(frozen=True, slots=True)
class CheckResult:
    kind: CheckKind
    data: dict[str, Any] | None = None
    # Why there was no answer (ERROR) or why Bakong refused (FAILED); short snake_case words.
    error: str | None = None
    # No answer yet and not worth asking again for this many seconds (429, open circuit).
    retry_after: float | None = None
