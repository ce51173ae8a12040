"""Telegram notices as values: their states and the rows kept of them (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID

from khqr_gateway.transactions.model import Status

# The languages a notice is written in: an app's `telegram.language`, TELEGRAM_LANGUAGE.
LANGUAGES = ("en", "km")


class NoticeStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class DueNotice:
    """What sending one notice needs: its chat, and the transition it announces."""

    id: int
    chat_id: str
    attempt_count: int
    late: bool
    status: Status
    reason: str | None
    data: dict[str, Any] | None
    metadata: Any
    bill_number: str | None
    completed_at: datetime
    app_id: str  # whose bot sends it
    previous_status: Status | None = None  # of a late payment: timeout or cancelled


@dataclass(frozen=True, slots=True)
class AppChat:
    """Where an app's payments are told: its chat, and its bot's token (a secret)."""

    app_id: str
    chat_id: str
    bot_token: str = field(repr=False)
    language: str = "en"


@dataclass(frozen=True, slots=True)
class NoticeAttempt:
    notice_id: int
    attempt: int
    started_at: datetime
    duration_ms: int
    status_code: int | None
    error: str | None
    body: str | None
    # None: sent; a time: try again then; "failed" when neither.
    next_attempt_at: datetime | None
    failed: bool


@dataclass(frozen=True, slots=True)
class NoticeRow:
    """A notice as an operator sees it (GET /api/v1/notices)."""

    id: int
    transaction_id: UUID
    late: bool
    chat_id: str
    status: NoticeStatus
    attempt_count: int
    next_attempt_at: datetime
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None
