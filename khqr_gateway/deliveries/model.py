"""Webhook deliveries as values: their states, their two lanes and the rows kept of them (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from uuid import UUID


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class Lane(StrEnum):
    """The two schedules a pending delivery waits in: first attempts go before retries, so a
    receiver that keeps failing never delays a new payment's webhook.

    A value is the lane's name in `infra.keys.keys` and its `khqr_queue_depth` label,
    both kept as they were: the Redis keys are persisted state, the label a metric's contract.
    """

    FIRST = "deliver"
    RETRY = "deliver_retry"

    @classmethod
    def after(cls, series_attempts: int) -> Lane:
        """Where a pending delivery waits once its series has made this many attempts."""
        return cls.FIRST if series_attempts == 0 else cls.RETRY


@dataclass(frozen=True, slots=True)
class DueDelivery:
    """What one attempt needs: where to send which bytes, and how many attempts went before."""

    id: str
    transaction_id: UUID
    md5: str
    url: str
    payload: bytes
    attempt_count: int
    series_attempts: int
    next_attempt_at: datetime | None
    app_id: str  # whose secrets sign it


@dataclass(frozen=True, slots=True)
class PendingDelivery:
    """A pending delivery as the reconcile tick sees it: which lane, due when."""

    id: str
    next_attempt_at: datetime | None
    series_attempts: int

    @property
    def lane(self) -> Lane:
        return Lane.after(self.series_attempts)


@dataclass(frozen=True, slots=True)
class Delivery:
    """A delivery as the API shows it; `payload` only where it was asked for."""

    id: str
    transaction_id: UUID
    md5: str
    url: str
    status: DeliveryStatus
    attempt_count: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None
    payload: bytes | None = None


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt of a delivery, as stored: when, how long, and what the receiver said (or
    why it said nothing)."""

    attempt: int
    started_at: datetime
    duration_ms: int
    status_code: int | None
    error_kind: str | None
    error_message: str | None
    response_body: str | None
    response_headers: dict[str, str] | None


@dataclass(frozen=True, slots=True)
class AttemptRecord(Attempt):
    """An attempt just made, and what it means for its delivery."""

    delivery_id: str
    new_status: DeliveryStatus
    next_attempt_at: datetime | None
